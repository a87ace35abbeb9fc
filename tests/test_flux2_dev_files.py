"""FLUX.2 [dev] single files: BFL's / ComfyUI's transformer file (told by ``guidance_in``), ComfyUI's Mistral Small 3
text encoder file (``model.*`` names, the tokenizer's ``tekken_model`` bytes beside them), the FLUX.2 VAE file and
Mistral's tokenizer folder, written from a tiny [dev] folder (:mod:`_flux2_dev_models`, its Mistral at the release's
128-wide heads, which a file's config takes): the folder's image through ``load_pipeline``, ``sdengine generate``
and the server's folders; wrong or missing parts refused in one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

from _flux2_dev_models import make_dev_folder, tekken_json  # noqa: E402
from _flux2_models import FILE_TRANSFORMER, FILE_VAE  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline import load_pipeline  # noqa: E402
from sdengine.weights.qwen_text_file import load_qwen_text_encoder  # noqa: E402
from test_flux2_files import bfl_layout, comfy_vae_layout  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48
MISTRAL_FILE_TEXT = dict(num_attention_heads=1, num_key_value_heads=1, head_dim=128)  # the release's head width


def comfy_mistral_layout(te: dict[str, torch.Tensor], tekken: bytes | None) -> dict[str, torch.Tensor]:
    """transformers' ``Mistral3ForConditionalGeneration`` tensors -> ComfyUI's ``mistral_3_small_flux2_*.safetensors``:
    the language model under ``model.``, the LM head, no vision tower or projector, and the tokenizer's tekken.json as
    a uint8 tensor (``tekken_model``) where given."""
    out: dict[str, torch.Tensor] = {}
    for k, v in te.items():
        for old in ("model.language_model.", "language_model.model."):  # transformers 5's / the release's names
            if k.startswith(old):
                out["model." + k[len(old) :]] = v.contiguous()
        if k.startswith(("lm_head.", "language_model.lm_head.")):
            out["lm_head." + k.rsplit("lm_head.", 1)[1]] = v.contiguous()
    if tekken is not None:
        out["tekken_model"] = torch.frombuffer(bytearray(tekken), dtype=torch.uint8)
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(the [dev] folder, {part: file}): ComfyUI's layout under ``models/`` (the Mistral file with its tekken.json
    inside); ``bare``: the Mistral file without it, Mistral's tokenizer folder beside it as ``mistral_tokenizer/``."""
    root = tmp_path_factory.mktemp("devfiles")
    folder = make_dev_folder(root / "dev", seed=5, transformer=FILE_TRANSFORMER, text=MISTRAL_FILE_TEXT, vae=FILE_VAE)
    out = {
        "transformer": root / "models" / "diffusion_models" / "flux2-dev.safetensors",
        "text": root / "models" / "text_encoders" / "mistral_3_small_flux2_bf16.safetensors",
        "vae": root / "models" / "vae" / "flux2-vae.safetensors",
        "bare": root / "bare" / "mistral_3_small_flux2_bf16.safetensors",
    }
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    net = load_file(next((folder / "transformer").glob("*.safetensors")))
    assert "time_guidance_embed.guidance_embedder.linear_1.weight" in net
    save_file(bfl_layout(net, "model.diffusion_model."), out["transformer"])
    te: dict[str, torch.Tensor] = {}
    for f in sorted((folder / "text_encoder").glob("*.safetensors")):
        te |= load_file(f)
    save_file(comfy_mistral_layout(te, tekken_json(folder / "tokenizer")), out["text"])
    save_file(comfy_mistral_layout(te, None), out["bare"])
    save_file(comfy_vae_layout(load_file(next((folder / "vae").glob("*.safetensors")))), out["vae"])
    shutil.copytree(folder / "tokenizer", out["bare"].parent / "mistral_tokenizer")
    return folder, out


def test_the_mistral_file_loads_as_the_folders_encoder(files) -> None:
    """ComfyUI's Mistral file: the config from the shapes (128-wide heads, eps 1e-5, RoPE theta 1e9: Mistral Small
    3's) is the folder's config.json, the tensors the folder's (``tekken_model`` and the LM head skipped)."""
    folder, out = files
    got = load_qwen_text_encoder(out["text"], family="mistral")
    want = load_qwen_text_encoder(folder / "text_encoder", family="mistral")
    assert got.config == want.config
    assert got.config.head_dim == 128 and got.config.rms_norm_eps == 1e-5 and got.config.rope_theta == 1e9
    assert got.state_dict().keys() == want.state_dict().keys()
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in got.state_dict().items())


def test_files_give_the_folders_image(files) -> None:
    """flux2-dev.safetensors with the Mistral file (its own tokenizer inside) and the VAE file: a [dev] pipeline (50
    steps, guidance 4, no CFG) giving the folder's image, with and without a guidance given; the same with the Mistral
    file without its tokenizer and the tokenizer folder beside it, or given apart (with ``config=`` the folder)."""
    folder, out = files
    pipe = load_pipeline(out["transformer"], device="cpu", qwen_text=str(out["text"]), vae=str(out["vae"]))
    want_pipe = load_pipeline(folder, device="cpu")
    assert pipe.dev and not pipe.distilled and pipe.family_defaults == want_pipe.family_defaults
    plain = {k: v for k, v in want_pipe.scheduler_config.items() if not k.startswith("_")}
    assert {k: v for k, v in pipe.scheduler_config.items() if not k.startswith("_")} == plain
    for extra in ({}, {"distilled_cfg_scale": 2.5}):  # the float images bit-equal (measured max abs 0)
        kw = dict(seed=4, width=W, height=H, steps=3, progress=False, **extra)
        got = pipe(PROMPT, **kw).arrays[0]
        want = want_pipe(PROMPT, **kw).arrays[0]
        assert got.shape == (H, W, 3)
        np.testing.assert_array_equal(got, want)
    want = want_pipe(PROMPT, seed=4, width=W, height=H, steps=3, progress=False).arrays[0]
    for kw in (  # the tokenizer folder beside the bare file; given apart, with config= a [dev] folder (its scheduler)
        {"qwen_text": str(out["bare"])},
        {"qwen_text": str(out["bare"]), "qwen_tokenizer": str(folder / "tokenizer"), "config": str(folder)},
    ):
        pipe = load_pipeline(out["transformer"], device="cpu", vae=str(out["vae"]), **kw)
        got = pipe(PROMPT, seed=4, width=W, height=H, steps=3, progress=False).arrays[0]
        np.testing.assert_array_equal(got, want)


def test_file_refusals(files, tmp_path: Path) -> None:
    """A missing part (before the transformer is read), a Qwen3 file given to [dev], a Mistral file given to klein, a
    tokenizer that is not Mistral's, a klein folder as [dev]'s config: one line each."""
    folder, out = files
    parts = {"qwen_text": str(out["text"]), "vae": str(out["vae"]), "qwen_tokenizer": str(folder / "tokenizer")}
    qwen3 = tmp_path / "qwen_3_4b.safetensors"  # a Qwen3 file's names (its header is what is read first)
    save_file(
        {
            "model.embed_tokens.weight": torch.zeros(8, 4),
            "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
            "model.layers.0.self_attn.q_norm.weight": torch.zeros(4),
        },
        qwen3,
    )
    klein = tmp_path / "flux-2-klein-4b.safetensors"  # the same transformer without the guidance embedding
    save_file({k: v for k, v in load_file(out["transformer"]).items() if ".guidance_in." not in k}, klein)
    lonely = tmp_path / "alone" / "mistral_3_small_flux2_bf16.safetensors"  # no tokenizer inside nor beside it
    lonely.parent.mkdir()
    lonely.symlink_to(out["bare"])
    garbled = tmp_path / "garbled" / "mistral_3_small_flux2_bf16.safetensors"  # tekken_model not tekken.json
    garbled.parent.mkdir()
    save_file(
        {**load_file(out["bare"]), "tekken_model": torch.tensor(list(b'{"vocab": 1}'), dtype=torch.uint8)}, garbled
    )
    qwen_tok = tmp_path / "qwen_tok"  # a tokenizer without Mistral's control tokens
    qwen_tok.mkdir()
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])  # Qwen2's
    tok.save(str(qwen_tok / "tokenizer.json"))
    dev = out["transformer"]
    cases = [
        (dev, {"vae": parts["vae"]}, "holds no Mistral Small 3 text encoder: give it with --qwen-text (qwen_text="),
        (dev, {**parts, "vae": None}, "holds no VAE: give it with --vae"),
        (dev, {**parts, "qwen_text": str(lonely), "qwen_tokenizer": None}, "holds no Mistral tokenizer"),
        (dev, {**parts, "qwen_text": str(qwen3)}, "a Qwen3 text encoder (Z-Image's or FLUX.2 [klein]'s), but"),
        (klein, parts, "a Mistral Small 3 text encoder (FLUX.2 [dev]'s), but flux-2-klein-4b.safetensors is FLUX.2"),
        (dev, {**parts, "qwen_tokenizer": str(qwen_tok)}, "a tokenizer without Mistral's [SYSTEM_PROMPT] token"),
        (
            dev,
            {**parts, "qwen_text": str(garbled), "qwen_tokenizer": None},
            "not a Mistral tekken tokenizer (no config",
        ),
        (dev, {**parts, "config": str(tmp_path)}, f"--config {tmp_path.name}: not a FLUX.2 [dev] folder"),
        (dev, {**parts, "vae": str(out["text"])}, "not a VAE"),
    ]
    for model, kw, needle in cases:
        with pytest.raises(GenerationError) as e:
            load_pipeline(model, device="cpu", **{k: v for k, v in kw.items() if v is not None})
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))


def test_cli_generate_with_the_files(files, tmp_path: Path) -> None:
    """``sdengine generate --model flux2-dev.safetensors --qwen-text ... --vae ... --qwen-tokenizer ...``: the
    folder's PNG."""
    from PIL import Image

    from sdengine.cli import main

    folder, out = files
    args = ["generate", PROMPT, "--steps", "2", "--seed", "6", "--width", str(W), "--height", str(H), "--no-progress"]
    parts = ["--qwen-text", str(out["text"]), "--vae", str(out["vae"]), "--qwen-tokenizer", str(folder / "tokenizer")]
    assert main([*args, "--model", str(out["transformer"]), *parts, "--out", str(tmp_path / "file")]) == 0
    assert main([*args, "--model", str(folder), "--out", str(tmp_path / "folder")]) == 0
    (a,), (b,) = ([np.asarray(Image.open(p)) for p in (tmp_path / d).glob("*.png")] for d in ("file", "folder"))
    assert a.shape == (H, W, 3)
    np.testing.assert_array_equal(a, b)


def test_server_parts_are_told_and_filled(files, tmp_path: Path) -> None:
    """The server's folders: the Mistral file is told from Qwen3 / Qwen2.5-VL by its tensors, the [dev] file needs a
    Mistral text encoder and a FLUX.2 VAE, the tokenizer beside the text encoder; a missing tokenizer or text encoder
    is a one-line 400. The families' defaults before loading: [dev]'s (50 steps, no CFG)."""
    from sdengine.server import dit_parts
    from sdengine.server.errors import BadRequest
    from sdengine.server.page_api import flux2_dev_before_load

    folder, out = files
    assert dit_parts.kind_of(out["text"]) == ("mistral_text", 0)
    assert dit_parts.needed(out["transformer"]) == ("mistral_text", "flux2_vae")
    assert flux2_dev_before_load(str(out["transformer"])) and flux2_dev_before_load(str(folder))

    class Entry:
        def __init__(self, p: Path) -> None:
            self.name, self.ref = p.name, str(p)

    class Catalog:
        def __init__(self, text: list[Path]) -> None:
            self.text = text

        def text_encoders(self) -> list[Entry]:
            return [Entry(p) for p in self.text]

        def vaes(self) -> list[Entry]:
            return [Entry(out["vae"])]

    ref = dit_parts.fill(Catalog([out["text"]]), str(out["transformer"]), None)
    assert dit_parts.split(ref) == (
        str(out["transformer"]),
        {"mistral_text": str(out["text"]), "flux2_vae": str(out["vae"])},
    )
    lonely = tmp_path / "mistral_3_small_flux2_fp8.safetensors"  # no tokenizer inside nor beside it
    lonely.symlink_to(out["bare"])
    for catalog, needle in (
        (
            Catalog([lonely]),
            "needs Mistral's tokenizer: its text encoder mistral_3_small_flux2_fp8.safetensors carries none",
        ),
        (Catalog([]), "needs a Mistral Small 3 text encoder file: put one in text_encoders/"),
    ):
        with pytest.raises(BadRequest) as e:
            dit_parts.fill(catalog, str(out["transformer"]), None)
        assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def comfy_fp8_mixed(comfy: dict[str, torch.Tensor], fmt: str = "float8_e4m3fn") -> dict[str, torch.Tensor]:
    """ComfyUI's mixed-precision layout of a Mistral file (``mistral_3_small_flux2_fp8``): each layer's Linear weights
    in float8 (weight / scale) with ``.weight_scale`` (amax / 448), ``.input_scale`` and ``.comfy_quant`` (its JSON
    format) beside them; embeddings and norms as they were."""
    import json

    marker = torch.tensor(list(json.dumps({"format": fmt}).encode()), dtype=torch.uint8)
    out: dict[str, torch.Tensor] = {}
    for k, v in comfy.items():
        if k.startswith("model.layers.") and k.endswith("_proj.weight"):
            layer = k[: -len(".weight")]
            scale = v.float().abs().max() / 448.0
            out[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            out[f"{layer}.weight_scale"] = scale.reshape(())
            out[f"{layer}.input_scale"] = torch.tensor(1.0)
            out[f"{layer}.comfy_quant"] = marker.clone()
        else:
            out[k] = v
    return out


def test_comfy_fp8_mixed_mistral_file(files, tmp_path: Path) -> None:
    """ComfyUI's float8 Mistral file (``.comfy_quant`` float8 with ``.weight_scale``): every weight float(w8) x scale,
    the image near the bfloat16 file's; another quantization format is one line."""
    folder, out = files
    comfy = load_file(out["text"])
    fp8 = tmp_path / "mistral_3_small_flux2_fp8.safetensors"
    mixed = comfy_fp8_mixed(comfy)
    save_file(mixed, fp8)
    got = load_qwen_text_encoder(fp8, family="mistral").state_dict()
    want = load_qwen_text_encoder(out["text"], family="mistral").state_dict()
    assert got.keys() == want.keys()
    for k, v in got.items():
        layer = "model." + k[: -len(".weight")]
        if f"{layer}.weight_scale" in mixed:
            assert torch.equal(v, mixed["model." + k].float() * mixed[f"{layer}.weight_scale"]), k
        else:
            assert torch.equal(v, want[k]), k
    kw = dict(seed=4, width=W, height=H, steps=3, progress=False)
    a = load_pipeline(out["transformer"], device="cpu", qwen_text=str(fp8), vae=str(out["vae"]))(PROMPT, **kw)
    b = load_pipeline(out["transformer"], device="cpu", qwen_text=str(out["text"]), vae=str(out["vae"]))(PROMPT, **kw)
    diff = np.abs(a.arrays[0] - b.arrays[0])
    assert 0 < float(diff.mean()) < 2e-2, float(diff.mean())  # measured mean abs 4.5e-3 (max 3.3e-2)
    bad = tmp_path / "nvfp4" / "mistral_3_small_flux2_nvfp4.safetensors"
    bad.parent.mkdir()
    save_file(comfy_fp8_mixed(comfy, "nvfp4"), bad)
    with pytest.raises(GenerationError) as e:
        load_pipeline(out["transformer"], device="cpu", qwen_text=str(bad), vae=str(out["vae"]),
                      qwen_tokenizer=str(folder / "tokenizer"))  # fmt: skip
    assert "says format 'nvfp4': ComfyUI's quantized weights are read in float8 only" in str(e.value)
    assert "\n" not in str(e.value)


def test_comfy_fp8_mixed_transformer_file(files, tmp_path: Path) -> None:
    """ComfyUI's ``flux2_dev_fp8mixed.safetensors`` layout (the blocks' Linear weights float8 with ``.weight_scale``,
    ``.input_scale`` and ``.comfy_quant``; the rest as it was): every weight float(w8) x scale (the fused q / k / v
    split after), the image near the plain file's; another format is one line."""
    import json

    from sdengine.weights.flux2_file import load_flux2_transformer

    folder, out = files
    plain = load_file(out["transformer"])
    mixed: dict[str, torch.Tensor] = {}
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)
    for k, v in plain.items():
        if "_blocks." in k and k.endswith(".weight") and v.ndim == 2:
            layer = k[: -len(".weight")]
            scale = v.float().abs().max() / 448.0
            mixed[k] = (v.float() / scale).to(torch.float8_e4m3fn)
            mixed |= {f"{layer}.weight_scale": scale.reshape(()), f"{layer}.input_scale": torch.tensor(1.0)}
            mixed[f"{layer}.comfy_quant"] = marker.clone()
        else:
            mixed[k] = v
    fp8 = tmp_path / "flux2_dev_fp8mixed.safetensors"
    save_file(mixed, fp8)
    got = load_flux2_transformer(fp8, dtype=torch.float32)
    want = load_flux2_transformer(out["transformer"], dtype=torch.float32)
    assert got.config == want.config
    dequantized = {k: mixed[k].float() * mixed[k[: -len(".weight")] + ".weight_scale"] for k in mixed
                   if k.endswith(".weight") and k[: -len(".weight")] + ".weight_scale" in mixed}  # fmt: skip
    from sdengine.weights.flux2_file import bfl_to_diffusers  # the names are BFL's: compared after the renaming

    expected = bfl_to_diffusers(
        {k.removeprefix("model.diffusion_model."): dequantized.get(k, v) for k, v in plain.items()}
    )
    state = got.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k].float()) for k in state)
    assert not all(torch.equal(state[k], want.state_dict()[k]) for k in state)  # float8 rounding changed weights
    parts = {"qwen_text": str(out["text"]), "vae": str(out["vae"])}
    kw = dict(seed=4, width=W, height=H, steps=3, progress=False)
    a = load_pipeline(fp8, device="cpu", qwen_tokenizer=str(folder / "tokenizer"), **parts)(PROMPT, **kw).arrays[0]
    b = load_pipeline(out["transformer"], device="cpu", **parts)(PROMPT, **kw).arrays[0]
    diff = np.abs(a - b)
    assert 0 < float(diff.mean()) < 3e-2, float(diff.mean())  # measured mean abs 1.3e-2 (max 0.11)
    bad = tmp_path / "flux2_dev_nvfp4.safetensors"
    first = next(k for k in mixed if k.endswith(".comfy_quant"))
    save_file({**mixed, first: torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)}, bad)
    with pytest.raises(GenerationError) as e:
        load_pipeline(bad, device="cpu", qwen_tokenizer=str(folder / "tokenizer"), **parts)
    assert "says format 'nvfp4': ComfyUI's quantized weights are read in float8 only" in str(e.value)
    assert "\n" not in str(e.value)


def test_tekken_tokenizer_matches_transformers_and_the_folders(files, tmp_path: Path) -> None:
    """The tekken.json a Mistral file carries, read by sdengine, vs transformers' ``convert_tekken_tokenizer`` of the
    same file and vs the folder's ``tokenizer.json`` it was written from: the same ids for plain, accented, CJK and
    emoji text, digits, whitespace runs, and the [dev] template with its control tokens; ``<pad>`` 11, left padding."""
    from transformers.integrations.mistral import convert_tekken_tokenizer

    from sdengine.pipeline.flux2_loading import read_tekken
    from sdengine.text.flux2_prompt import DEV_PROMPT_TEMPLATE, dev_prompt
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer

    folder, out = files
    ours = read_tekken(out["text"])
    (tmp_path / "tekken.json").write_bytes(tekken_json(folder / "tokenizer"))
    hf = convert_tekken_tokenizer(str(tmp_path / "tekken.json"))
    plain = load_qwen_tokenizer(folder / "tokenizer")
    texts = [
        "a red apple on a wooden table",
        "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()[]{}",
        "héllo wörld ☃ 日本語 🍎  two  spaces\n\tnew line",
        DEV_PROMPT_TEMPLATE.replace("{}", dev_prompt("make it green; [IMG] a cat holding a sign")),
    ]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False) == plain.encode(text), text
        assert ours.decode(ids) == text
    assert ours.pad_token_id == 11 and ours.padding_side == "left" and ours.token_id("[SYSTEM_PROMPT]") == 17


def test_served_from_the_folders(files, tmp_path: Path) -> None:
    """``sdengine serve``: ``diffusion_models/flux2-dev.safetensors`` with ``text_encoders/``'s Mistral file (its own
    tokenizer inside) and ``--vaes-dir``'s FLUX.2 VAE: listed with [dev]'s defaults before it loads, and a native job
    (``distilled_cfg_scale`` 2.5) gives ``load_pipeline`` of the same files' image (equal pixels)."""
    pytest.importorskip("fastapi")
    import httpx

    from _live_server import live_server, run_job, server_config

    folder, out = files
    models, vaes = tmp_path / "models", tmp_path / "vaes"
    for sub in ("diffusion_models", "text_encoders"):
        (models / sub).mkdir(parents=True)
    vaes.mkdir()
    shutil.copy(out["transformer"], models / "diffusion_models" / "flux2-dev.safetensors")  # (links out are refused)
    shutil.copy(out["text"], models / "text_encoders" / out["text"].name)
    shutil.copy(out["vae"], vaes / "flux2-vae.safetensors")
    name = "diffusion_models/flux2-dev.safetensors"
    job = {"model": name, "prompt": PROMPT, "steps": 2, "seed": 3, "width": W, "height": H, "distilled_cfg_scale": 2.5}
    with live_server(server_config(tmp_path, models_dir=models, vaes_dir=vaes), loader=None) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert data[name]["family"] == "flux2"
            assert data[name]["defaults"] == {"steps": 50, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
            got, _ = run_job(client, job)
    pipe = load_pipeline(out["transformer"], device="cpu", qwen_text=str(out["text"]), vae=str(out["vae"]))
    want = pipe(PROMPT, steps=2, seed=3, width=W, height=H, distilled_cfg_scale=2.5, progress=False).images[0]
    np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))


def test_bad_tekken_files_are_one_line(files) -> None:
    """A tekken.json sdengine cannot read: one TekkenError line naming what is wrong."""
    import json

    from sdengine.text.tekken import TekkenError, tekken_tokenizer

    folder, _ = files
    good = json.loads(tekken_json(folder / "tokenizer"))
    no_pad = {**good, "special_tokens": [t for t in good["special_tokens"] if t["token_str"] != "<pad>"]}
    cases = [
        (b"\xff not json", "not JSON"),
        (b"[]", "no config object"),
        ({**good, "config": {**good["config"], "pattern": "("}}, "config.pattern does not compile"),
        ({**good, "vocab": [{"rank": 0, "token_bytes": "!!"}]}, "token_bytes is not base64"),
        ({**good, "vocab": [{"rank": 3, "token_bytes": "YQ=="}]}, "vocab entry 0 is not rank 0"),
        ({**good, "special_tokens": [{"rank": 99, "token_str": "<x>"}]}, "past default_num_special_tokens=19"),
        (no_pad, "no <pad> special token"),
    ]
    for data, needle in cases:
        raw = data if isinstance(data, bytes) else json.dumps(data).encode()
        with pytest.raises(TekkenError) as e:
            tekken_tokenizer(raw, name="t.json")
        assert str(e.value).startswith("t.json: not a Mistral tekken tokenizer (") and needle in str(e.value)
        assert "\n" not in str(e.value), str(e.value)
