"""Textual-inversion embeddings: every file format against diffusers' ``load_textual_inversion`` (the oracle)
on the tiny SD 1.x and SD 2.x models, images included; the A1111 rules (token-level names, chunks, TI hashes);
and the one-line refusals."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.metadata import parse_parameters, read_png_parameters  # noqa: E402
from sdengine.prompts import prompt_chunks  # noqa: E402
from sdengine.text.embeddings import (  # noqa: E402
    EmbeddingError,
    EmbeddingsUnsupported,
    read_embedding,
    save_embedding,
)
from sdengine.weights.io import save_safetensors  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 5
NEG = "blurry, dark"
TOL_STATES = 1e-5  # max abs on the text states
TOL_IMAGES = 1e-3  # mean abs on 0..1 pixels (docs/CONTRACTS.md, Test oracles)


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    # Token embeddings of the tiny encoders are ~N(0, 0.02); larger vectors make the difference visible.
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


def write_file(path: Path, kind: str, vec: torch.Tensor) -> Path:
    """An embedding file as each tool writes it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "a1111_pt":  # A1111's Embedding.save
        data = {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": torch.nn.Parameter(vec.clone())},
            "name": path.stem,
            "step": 100,
            "sd_checkpoint": "abcdef12",
            "sd_checkpoint_name": "model",
        }
        torch.save(data, path)
    elif kind == "ldm_pt":  # the original textual-inversion code (Gal et al.): an nn.ParameterDict
        vectors = torch.nn.ParameterDict({"*": torch.nn.Parameter(vec.clone())})
        torch.save({"string_to_token": {"*": 265}, "string_to_param": vectors}, path)
    elif kind == "a1111_safetensors":  # A1111 / kohya safetensors
        save_safetensors({"emb_params": vec}, path)
    elif kind == "diffusers_safetensors":  # diffusers' learned_embeds.safetensors
        save_safetensors({f"<{path.stem}>": vec[0] if len(vec) == 1 else vec}, path)
    elif kind == "diffusers_bin":  # diffusers' learned_embeds.bin (torch.save of {token: tensor})
        torch.save({f"<{path.stem}>": vec[0] if len(vec) == 1 else vec}, path)
    else:
        raise ValueError(kind)
    return path


# name, file kind, suffix, vectors
FILES = [
    ("pekora", "a1111_pt", ".pt", 3),
    ("mignon", "a1111_safetensors", ".safetensors", 2),
    ("sunsetstyle", "diffusers_safetensors", ".safetensors", 1),
    ("badhands", "diffusers_bin", ".bin", 4),
]


def _embeddings_dir(root: Path, width: int) -> Path:
    d = root / "embeddings"
    for i, (name, kind, suffix, n) in enumerate(FILES):
        sub = d / "negative" if name == "badhands" else d  # sub-folders are read too, as in A1111
        write_file(sub / f"{name}{suffix}", kind, _vectors(n, width, seed=10 + i))
    return d


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def models(request, tiny_sd1_folder, tiny_sd2_folder, tmp_path_factory):
    """(kind, folder, embeddings dir, our pipeline, diffusers' pipeline with every file loaded, ours without it)."""
    kind = request.param
    folder = tiny_sd1_folder if kind == "sd1" else tiny_sd2_folder
    width = 32
    emb_dir = _embeddings_dir(tmp_path_factory.mktemp(f"ti-{kind}"), width)
    ours = sdengine.load_pipeline(folder, device="cpu", embeddings_dir=emb_dir)
    ref = diffusers_pipeline(folder)
    for name, _, suffix, _ in FILES:
        path = next(emb_dir.rglob(f"{name}{suffix}"))
        ref.load_textual_inversion(str(path), token=name)
    plain = sdengine.load_pipeline(folder, device="cpu")
    return kind, folder, emb_dir, ours, ref, plain


def _diffusers_states(ref, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, negative)
    return cond, uncond


@pytest.mark.parametrize("name", [f[0] for f in FILES])
def test_prompt_states_equal_diffusers_load_textual_inversion(models, name):
    kind, _, _, ours, ref, _ = models
    prompt, negative = f"a photo of {name}, red apple", f"{NEG}, {name}"
    cond, uncond = ours.encode_prompt(prompt, negative)
    theirs_c, theirs_u = _diffusers_states(ref, prompt, negative)
    assert cond.shape == theirs_c.shape == (1, 77, 32)
    diff = max((cond - theirs_c).abs().max().item(), (uncond - theirs_u).abs().max().item())
    print(f"{kind} {name}: max abs {diff:.2e} against diffusers' load_textual_inversion")
    assert (cond - theirs_c).abs().max().item() <= TOL_STATES
    assert (uncond - theirs_u).abs().max().item() <= TOL_STATES
    # The embedding changes the states: the same prompt without the folder differs.
    plain = models[5].encode_prompt(prompt, negative)[0]
    assert (cond - plain).abs().max().item() > 1e-2


def test_several_embeddings_in_one_prompt_equal_diffusers(models):
    _, _, _, ours, ref, _ = models
    prompt = "pekora and mignon, sunsetstyle"
    cond, uncond = ours.encode_prompt(prompt, "badhands")
    theirs_c, theirs_u = _diffusers_states(ref, prompt, "badhands")
    assert (cond - theirs_c).abs().max().item() <= TOL_STATES
    assert (uncond - theirs_u).abs().max().item() <= TOL_STATES


def test_images_equal_diffusers(models):
    kind, folder, _, ours, ref, _ = models
    prompt, negative = "a photo of pekora, mignon", "badhands"
    mine = ours(
        prompt,
        negative,
        steps=STEPS,
        sampler="euler",
        schedule="normal",
        cfg_scale=7.5,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    )
    ref.scheduler = diffusers_scheduler(folder, "euler")
    theirs = ref(
        prompt,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(SEED),
        width=SIZE,
        height=SIZE,
        output_type="np",
    ).images
    assert mine.arrays.shape == theirs.shape
    print(f"{kind} images: mean abs {float(np.abs(mine.arrays.astype(np.float64) - theirs).mean()):.2e}")
    assert float(np.abs(mine.arrays.astype(np.float64) - theirs).mean()) < TOL_IMAGES
    # TI hashes as A1111 writes them: the first 12 hex digits of each file's SHA-256, prompt before negative.
    fields = parse_parameters(mine.infotexts[0])
    emb_dir = models[2]
    expect = ", ".join(
        f"{n}: {hashlib.sha256(next(emb_dir.rglob(n + '.*')).read_bytes()).hexdigest()[:12]}"
        for n in ("pekora", "mignon", "badhands")
    )
    assert fields["TI hashes"] == expect
    assert f'TI hashes: "{expect}"' in mine.infotexts[0]
    # A LoRA tag of the same name is not a use of the embedding (tags are removed before tokenising).
    assert models[3].tokenizer.embeddings.used("a cat <lora:pekora:0.5>", "") == {}


def test_read_each_format_gives_the_written_vectors(tmp_path):
    for i, (name, kind, suffix, n) in enumerate(FILES):
        vec = _vectors(n, 768, seed=i)
        got = read_embedding(write_file(tmp_path / f"{name}{suffix}", kind, vec), width=768)
        assert got.shape == (n, 768) and torch.equal(got, vec)
    ldm = _vectors(3, 768, seed=8)
    assert torch.equal(read_embedding(write_file(tmp_path / "ldm.pt", "ldm_pt", ldm), width=768), ldm)
    sd2 = _vectors(2, 1024, seed=9)  # an SD 2.x (OpenCLIP ViT-H) embedding
    assert torch.equal(read_embedding(write_file(tmp_path / "sd2.pt", "a1111_pt", sd2), width=1024), sd2)


# ------------------------------------------------------------------------------------------ A1111's rules


@pytest.fixture(scope="module")
def sd1_ti(tiny_sd1_folder, tmp_path_factory):
    emb_dir = _embeddings_dir(tmp_path_factory.mktemp("ti-rules"), 32)
    return emb_dir, sdengine.load_pipeline(tiny_sd1_folder, device="cpu", embeddings_dir=emb_dir)


def test_names_match_whole_token_runs_only(sd1_ti):
    _, pipe = sd1_ti
    tok = pipe.tokenizer
    base = len(tok.vocab)
    assert sum(i >= base for i in tok.encode("a pekora, b")) == 3
    assert sum(i >= base for i in tok.encode("(pekora:1.2)")) == 3  # punctuation is its own token
    assert all(i < base for i in tok.encode("peko ra"))  # other tokens than the name's
    assert tok.decode(tok.encode("a pekora b")) == "a pekora b"
    # ComfyUI's "embedding:NAME[.pt]": the same ids as the bare name, prefix and extension dropped.
    assert tok.encode("a embedding:pekora.pt, b") == tok.encode("a pekora, b")
    assert tok.encode("(embedding:mignon:1.2)") == tok.encode("(mignon:1.2)")
    assert tok.encode("embedding: cat") == tok.encode("embedding: cat")  # no name after it: left alone
    # a file in a subfolder as ComfyUI names it (and its /embeddings lists it): embedding:negative/badhands
    assert tok.encode("a embedding:negative/badhands.bin, b") == tok.encode("a badhands, b")
    assert tok.encode("embedding:other/badhands") == tok.encode("embedding:other/") + tok.encode("badhands")
    assert tok.embeddings.used("embedding:badhands.safetensors", "") == {
        "badhands": tok.embeddings.load("badhands").hash
    }


def test_embedding_is_weighted_like_its_text(sd1_ti):
    """(name:1.3) multiplies the embedding's vectors' states like any word's (A1111 emphasis)."""
    _, pipe = sd1_ti
    plain = pipe.encode_prompt("a photo of pekora", "")[0]
    weighted = pipe.encode_prompt("a photo of (pekora:1.3)", "")[0]
    assert (plain - weighted).abs().max().item() > 1e-3


def test_vectors_count_towards_chunks_and_are_never_split(sd1_ti):
    _, pipe = sd1_ti
    tok = pipe.tokenizer
    base = len(tok.vocab)
    words = " ".join(["cat"] * 73)  # 73 tokens, so pekora's 3 vectors do not fit in chunk one
    chunks = prompt_chunks(tok, f"{words} pekora", pad_token_id=pipe.pad_token_id)
    assert len(chunks) == 2
    assert not any(i >= base for i in chunks[0].ids)
    assert chunks[1].ids[1:4] == [i for i in chunks[1].ids if i >= base] and len(chunks[1].ids[1:4]) == 3
    fits = prompt_chunks(tok, " ".join(["cat"] * 72) + " pekora", pad_token_id=pipe.pad_token_id)
    assert len(fits) == 1 and sum(i >= base for i in fits[0].ids) == 3


def test_a_new_file_in_the_folder_is_seen_and_unused_broken_files_do_not_matter(sd1_ti, tmp_path):
    emb_dir, _ = sd1_ti
    d = tmp_path / "emb"
    shutil.copytree(emb_dir, d)
    (d / "broken.pt").write_bytes(b"not a pickle at all")
    pipe = sdengine.load_pipeline(_folder(sd1_ti), device="cpu", embeddings_dir=d)
    pipe.encode_prompt("pekora", "")  # the broken file is not named: no error
    with pytest.raises(SdengineError, match="broken.pt"):
        pipe.encode_prompt("a broken vase", "")
    write_file(d / "newstyle.safetensors", "a1111_safetensors", _vectors(2, 32, seed=3))
    assert sum(i >= len(pipe.tokenizer.vocab) for i in pipe.tokenizer.encode("newstyle")) == 2


def _folder(sd1_ti):
    return Path(sd1_ti[1].source)


# ------------------------------------------------------------------------------------------ refusals


def test_wrong_width_is_refused_in_one_line(sd1_ti, tmp_path):
    d = tmp_path / "emb"
    write_file(d / "sdtwo.pt", "a1111_pt", _vectors(2, 1024, seed=1))
    pipe = sdengine.load_pipeline(_folder(sd1_ti), device="cpu", embeddings_dir=d)
    with pytest.raises(EmbeddingError, match=r"sdtwo.pt: the embedding is 1024 wide but the text encoder is 32") as e:
        pipe("sdtwo", steps=1, width=SIZE, height=SIZE, progress=False)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"a": torch.zeros(2, 8), "b": torch.zeros(2, 8)}, "holds 2 tensors"),
        ({"string_to_param": {"*": torch.zeros(1, 8), "#": torch.zeros(1, 8)}}, "holds 2 'string_to_param'"),
        ({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, "SDXL embedding"),
        ({"step": 3, "name": "x"}, "holds no embedding"),
        ({"emb_params": torch.zeros(2, 3, 8)}, r"shape \(2, 3, 8\)"),
        ({"emb_params": torch.zeros(2, 8, dtype=torch.int64)}, "not floating-point"),
        ({"emb_params": torch.full((2, 8), float("nan"))}, "NaN"),
        ({"emb_params": torch.zeros(76, 8)}, "76 vectors"),
    ],
)
def test_files_that_hold_no_usable_embedding_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.pt"
    torch.save(content, path)
    with pytest.raises(EmbeddingError, match=message) as e:
        read_embedding(path)
    assert "\n" not in str(e.value)


class _Payload:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_with_code_is_refused_not_run(tmp_path, capsys):
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": _Payload()}}))
    with pytest.raises(SdengineError, match="refusing to load"):
        read_embedding(path)
    assert "pickle code ran" not in capsys.readouterr().out


def test_two_files_for_one_name_are_refused_when_used(sd1_ti, tmp_path):
    d = tmp_path / "emb"
    write_file(d / "twin.pt", "a1111_pt", _vectors(1, 32, seed=1))
    write_file(d / "sub" / "twin.safetensors", "a1111_safetensors", _vectors(1, 32, seed=2))
    pipe = sdengine.load_pipeline(_folder(sd1_ti), device="cpu", embeddings_dir=d)
    with pytest.raises(EmbeddingError, match="two files for the embedding 'twin'"):
        pipe.encode_prompt("twin", "")


def test_names_that_tokenise_alike_are_refused_when_used(sd1_ti, tmp_path):
    d = tmp_path / "emb"
    write_file(d / "EasyNeg.pt", "a1111_pt", _vectors(1, 32, seed=1))
    write_file(d / "easyneg.safetensors", "a1111_safetensors", _vectors(1, 32, seed=2))
    pipe = sdengine.load_pipeline(_folder(sd1_ti), device="cpu", embeddings_dir=d)
    pipe.encode_prompt("a cat", "")  # not named: no error
    with pytest.raises(EmbeddingError, match="'EasyNeg', 'easyneg' .* are one word to the tokenizer"):
        pipe.encode_prompt("a cat", "easyneg")


def test_folder_must_exist_and_models_without_clip_refuse_it(sd1_ti, tiny_emoji_folder, tmp_path):
    with pytest.raises(EmbeddingError, match="does not exist"):
        sdengine.load_pipeline(_folder(sd1_ti), device="cpu", embeddings_dir=tmp_path / "nope")
    with pytest.raises(EmbeddingsUnsupported, match="MiniLM"):
        sdengine.load_pipeline(tiny_emoji_folder, device="cpu", embeddings_dir=tmp_path)


def test_saved_embedding_loads_in_diffusers(tmp_path, tiny_sd1_folder):
    vec = _vectors(2, 32, seed=4)
    path = save_embedding(tmp_path / "mine.safetensors", vec)
    assert torch.equal(read_embedding(path, width=32), vec)
    ref = diffusers_pipeline(tiny_sd1_folder)
    ref.load_textual_inversion(str(path), token="zorbleq")
    table = ref.text_encoder.get_input_embeddings().weight
    ids = ref.tokenizer.convert_tokens_to_ids(["zorbleq", "zorbleq_1"])
    assert torch.allclose(table[ids].detach(), vec)


def test_absurd_values_are_refused(tmp_path):
    path = write_file(tmp_path / "huge.safetensors", "a1111_safetensors", torch.full((1, 8), 1e30))
    with pytest.raises(EmbeddingError, match="over 10000"):
        read_embedding(path)


# ------------------------------------------------------------------------------------------ CLI and server


def test_generate_cli_embeddings_dir(sd1_ti, tmp_path, capsys):
    from sdengine.cli import main

    emb_dir, pipe = sd1_ti
    common = ["--model", str(_folder(sd1_ti)), "--steps", "2", "--width", "32", "--height", "32", "--seed", "4"]
    out = tmp_path / "o.png"
    rc = main(
        ["generate", "a mignon cat", *common, "--embeddings-dir", str(emb_dir), "--out", str(out), "--no-progress"]
    )
    assert rc == 0, capsys.readouterr().err
    png = read_png_parameters(out)
    assert png is not None and 'TI hashes: "mignon: ' in png
    api = pipe("a mignon cat", steps=2, width=32, height=32, seed=4, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(api), np.asarray(Image.open(out).convert("RGB")))
    capsys.readouterr()
    # A file for another model: one line, exit 2.
    bad = tmp_path / "bad"
    write_file(bad / "wide.pt", "a1111_pt", _vectors(1, 768, seed=0))
    rc = main(
        ["generate", "wide", *common, "--embeddings-dir", str(bad), "--out", str(tmp_path / "b.png"), "--no-progress"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "768 wide but the text encoder is 32" in err[0], err


def test_server_loader_passes_the_folder(sd1_ti, tiny_emoji_folder):
    pytest.importorskip("fastapi")
    from sdengine.server.app import default_loader

    emb_dir, _ = sd1_ti
    pipe = default_loader(None, embeddings_dir=emb_dir)(str(_folder(sd1_ti)), "cpu")
    assert pipe.tokenizer.embeddings is not None and "pekora" in pipe.tokenizer.embeddings.names
    emoji = default_loader(None, embeddings_dir=emb_dir)(
        str(tiny_emoji_folder), "cpu"
    )  # MiniLM: served without the folder
    assert emoji.text_kind == "minilm"


A1111_EULER = {
    "schedule": "uniform",
    "cfg_scale": 7.0,
    "progress": False,
}  # A1111's defaults for "Euler" (Automatic: uniform)


def test_server_uses_and_lists_the_folder(sd1_ti, tmp_path):
    """A1111's txt2img route with --embeddings-dir: the image equals the Python API's and its infotext has the
    TI hashes; /sdapi/v1/embeddings and ComfyUI's /embeddings list the folder."""
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    from _live_server import live_server, server_config
    from sdengine.server.app import default_loader

    emb_dir, pipe = sd1_ti
    (emb_dir / "junk.pt").write_bytes(b"not an embedding")  # listed as skipped
    try:
        config = server_config(tmp_path, model=str(_folder(sd1_ti)), embeddings_dir=emb_dir)
        with live_server(config, loader=default_loader(None, embeddings_dir=emb_dir)) as server:
            with httpx.Client(base_url=server.url, timeout=120) as c:
                body = {"prompt": "a mignon dog", "negative_prompt": "badhands", "steps": 2, "width": 32}
                r = c.post("/sdapi/v1/txt2img", json={**body, "height": 32, "seed": 7, "sampler_name": "Euler"})
                assert r.status_code == 200, r.text
                info = json.loads(r.json()["info"])
                summary = c.get("/sdapi/v1/embeddings").json()
                comfy = c.get("/embeddings").json()
                assert c.post("/sdapi/v1/refresh-embeddings").status_code == 200
    finally:
        (emb_dir / "junk.pt").unlink()
    want = pipe("a mignon dog", "badhands", steps=2, width=32, height=32, seed=7, sampler="euler", **A1111_EULER)
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    assert info["infotexts"][0] == want.infotexts[0] and 'TI hashes: "mignon: ' in want.infotexts[0]
    assert summary["loaded"]["pekora"] == {
        "step": None,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": 32,
        "vectors": 3,
    }
    assert set(summary["loaded"]) == {"badhands", "mignon", "pekora", "sunsetstyle"}
    assert set(summary["skipped"]) == {"junk"}
    # ComfyUI's names: the path in the folder without the suffix, sorted by path (the stem alone was once listed
    # for a file in a subfolder, which `embedding:NAME` in ComfyUI's prompts does not find there)
    assert comfy == ["junk", "mignon", "negative/badhands", "pekora", "sunsetstyle"]
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want.images[0]))


def test_from_png_needs_the_same_embeddings(sd1_ti, tmp_path, capsys):
    from sdengine.cli import main

    emb_dir, _ = sd1_ti
    d = tmp_path / "emb"
    shutil.copytree(emb_dir, d)
    common = ["--model", str(_folder(sd1_ti)), "--no-progress"]
    first = tmp_path / "a.png"
    args = ["--steps", "2", "--width", "32", "--height", "32", "--seed", "3", "--embeddings-dir", str(d)]
    assert main(["generate", "a pekora", "--negative", "badhands", *common, *args, "--out", str(first)]) == 0
    again = tmp_path / "b.png"
    assert main(["generate", "--from-png", str(first), *common, "--embeddings-dir", str(d), "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    capsys.readouterr()
    errors = []
    assert main(["generate", "--from-png", str(first), *common, "--out", str(tmp_path / "c.png")]) == 2
    errors.append(capsys.readouterr().err.strip())
    write_file(d / "pekora.pt", "a1111_pt", _vectors(3, 32, seed=99))  # the same name, other vectors
    assert main(["generate", "--from-png", str(first), *common, "--embeddings-dir", str(d), "--out", str(again)]) == 2
    errors.append(capsys.readouterr().err.strip())
    assert len(errors[0].splitlines()) == 1 and "embeddings (pekora, badhands): give --embeddings-dir" in errors[0]
    assert len(errors[1].splitlines()) == 1 and "uses the embedding 'pekora' with hash" in errors[1]


def test_xyz_embeddings_dir(sd1_ti, tmp_path):
    from sdengine.cli import main

    emb_dir, _ = sd1_ti
    base = ["xyz", "a pekora", "--x", "steps=1,2", "--model", str(_folder(sd1_ti)), "--width", "32", "--height", "32"]
    base += ["--seed", "1", "--no-progress"]
    assert main([*base, "--embeddings-dir", str(emb_dir), "--out", str(tmp_path / "with")]) == 0
    assert main([*base, "--out", str(tmp_path / "without")]) == 0
    with_ti = np.asarray(Image.open(next((tmp_path / "with").glob("xyz-*.png"))).convert("RGB"), dtype=np.float64)
    plain = np.asarray(Image.open(next((tmp_path / "without").glob("xyz-*.png"))).convert("RGB"), dtype=np.float64)
    assert with_ti.shape == plain.shape and np.abs(with_ti - plain).mean() > 0.5


@pytest.mark.slow
def test_sd2_width_embedding_equals_diffusers(tmp_path):
    """An SD 2.x embedding at its real width (1024, OpenCLIP ViT-H) on a one-layer encoder of that width (SD 2's
    GELU and "!" padding): the text states equal those of diffusers' load_textual_inversion, exactly."""
    from diffusers.loaders import TextualInversionLoaderMixin
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel as HFModel
    from transformers import CLIPTokenizer as HFTokenizer

    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
    from sdengine.prompts import encode_prompt
    from sdengine.text.clip_tokenizer import SD2_PAD_TOKEN_ID, CLIPTokenizer
    from sdengine.text.embeddings import EmbeddingLibrary
    from sdengine.weights.loading import write_clip_tokenizer

    cfg = CLIPTextConfig(
        hidden_size=1024, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16, hidden_act="gelu"
    )
    torch.manual_seed(0)
    hf = HFModel(HFConfig(**cfg.to_transformers())).eval()
    ours = CLIPTextModel.from_state_dict(hf.state_dict(), cfg)
    write_clip_tokenizer(tmp_path / "tokenizer", pad="!")
    hf_tok = HFTokenizer.from_pretrained(tmp_path / "tokenizer")
    emb = write_file(tmp_path / "emb" / "widestyle.pt", "a1111_pt", _vectors(3, 1024, seed=5))

    class Loader(TextualInversionLoaderMixin):  # the mixin diffusers' SD pipelines use, on bare parts
        hf_device_map = None
        components: dict = {}

    ref = Loader()
    ref.tokenizer, ref.text_encoder = hf_tok, hf
    ref.load_textual_inversion(str(emb), token="widestyle", tokenizer=hf_tok, text_encoder=hf)
    prompt = "a photo of widestyle, red"
    ids = hf_tok(
        ref.maybe_convert_prompt(prompt, hf_tok), padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    library = EmbeddingLibrary(emb.parent, tokenizer=CLIPTokenizer.load(), text_encoder=ours, model_name="sd2")
    with torch.no_grad():
        theirs = hf(ids).last_hidden_state
        mine = encode_prompt(ours, CLIPTokenizer.load().with_embeddings(library), prompt, pad_token_id=SD2_PAD_TOKEN_ID)
    assert mine.shape == theirs.shape == (1, 77, 1024)
    assert (mine - theirs).abs().max().item() <= TOL_STATES
