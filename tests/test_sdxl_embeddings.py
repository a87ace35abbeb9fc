"""SDXL textual-inversion embeddings (A1111's and kohya's `{"clip_l": (n, 768), "clip_g": (n, 1280)}` files): each
encoder takes its own vectors, as diffusers' load_textual_inversion does when given each half with its encoder
and tokenizer (the oracle); SD 1.x files are refused when an SDXL prompt uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_scheduler  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.metadata import parse_parameters  # noqa: E402
from sdengine.text.embeddings import EmbeddingError, embedding_hash, read_embedding  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402

SIZE, STEPS, SEED = 32, 3, 4


def _vectors(n: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed)) * 0.5


@pytest.fixture(scope="module")
def sdxl_ti(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sdxl-ti")
    folder = make_sdxl_folder(tmp / "tiny-sdxl")
    # transformers' pooled vector is at the first EOS for configs with the real EOS id; with the legacy
    # eos_token_id=2 it takes the largest id, which is an added token's: there sdengine follows A1111 (the
    # placeholders count as id 0, pooled at the EOS) and diffusers does not, so the oracle runs the modern rule.
    for sub in ("text_encoder", "text_encoder_2"):
        cfg_path = folder / sub / "config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "eos_token_id": 49407}))
    emb = tmp / "embeddings"
    emb.mkdir()
    files = {
        "zqxstyle": {"clip_l": _vectors(2, 32, 1), "clip_g": _vectors(2, 48, 2)},
        "negxl": {"clip_l": _vectors(1, 32, 3), "clip_g": _vectors(1, 48, 4)},
    }
    for name, tensors in files.items():
        save_safetensors(tensors, emb / f"{name}.safetensors")
    save_safetensors({"emb_params": _vectors(1, 32, 5)}, emb / "sdone.safetensors")  # an SD 1.x embedding
    return folder, emb, files


def test_sdxl_images_with_embeddings_equal_diffusers(sdxl_ti):
    folder, emb, files = sdxl_ti
    prompt, negative = "a zqxstyle lighthouse", "negxl"
    ref = diffusers_sdxl(folder)
    for name, t in files.items():
        ref.load_textual_inversion(t["clip_l"], token=name, text_encoder=ref.text_encoder, tokenizer=ref.tokenizer)
        ref.load_textual_inversion(t["clip_g"], token=name, text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2)
    ref.scheduler = diffusers_scheduler(folder, "euler")
    theirs = ref(
        prompt,
        negative_prompt=negative,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images
    ours = sdengine.load_pipeline(folder, device="cpu", embeddings_dir=emb)
    plain = sdengine.load_pipeline(folder, device="cpu")
    kw = dict(steps=STEPS, sampler="euler", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    mine = ours(prompt, negative, progress=False, **kw)
    without = plain(prompt, negative, progress=False, **kw).arrays
    mad = float(np.abs(mine.arrays.astype(np.float64) - theirs).mean())
    assert mad < 1e-4, mad
    assert float(np.abs(without.astype(np.float64) - theirs).mean()) > 10 * max(mad, 1e-6)  # the vectors matter
    hashes = ", ".join(f"{n}: {embedding_hash(emb / f'{n}.safetensors')}" for n in ("zqxstyle", "negxl"))
    assert parse_parameters(mine.infotexts[0])["TI hashes"] == hashes


def test_an_sd1_embedding_in_an_sdxl_prompt_is_one_line(sdxl_ti):
    folder, emb, _ = sdxl_ti
    pipe = sdengine.load_pipeline(folder, device="cpu", embeddings_dir=emb)
    with pytest.raises(EmbeddingError, match=r"sdone\.safetensors: not an SDXL embedding") as e:
        pipe("a sdone cat", steps=1, width=SIZE, height=SIZE, progress=False)
    assert "\n" not in str(e.value)


def test_sdxl_halves_must_have_as_many_vectors(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_safetensors({"clip_l": torch.zeros(2, 32), "clip_g": torch.zeros(3, 48)}, path)
    with pytest.raises(EmbeddingError, match="clip_l has 2 vectors but clip_g 3"):
        read_embedding(path, part="clip_g")
    good = tmp_path / "good.safetensors"
    save_safetensors({"clip_l": torch.ones(2, 32), "clip_g": torch.zeros(2, 48)}, good)
    assert torch.equal(read_embedding(good, width=32, part="clip_l"), torch.ones(2, 32))
    with pytest.raises(EmbeddingError, match="SDXL embedding"):  # an SD 1.x/2.x model still refuses it
        read_embedding(good)


def test_the_folder_summary_counts_an_sdxl_file_as_a1111_does(sdxl_ti):
    from sdengine.text.embeddings import folder_summary

    _, emb, _ = sdxl_ti
    summary = folder_summary(emb)
    assert summary["loaded"]["zqxstyle"]["shape"] == 32 + 48  # A1111: clip_g's width + clip_l's
    assert summary["loaded"]["zqxstyle"]["vectors"] == 2
    assert summary["loaded"]["sdone"]["shape"] == 32


def test_the_refiner_reads_clip_g_and_records_the_hash(sdxl_ti, tmp_path):
    _, emb, files = sdxl_ti
    folder = make_sdxl_folder(tmp_path / "tiny-refiner", refiner=True)
    cfg_path = folder / "text_encoder_2" / "config.json"
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "eos_token_id": 49407}))
    ref = diffusers_sdxl(folder, img2img=True)
    ref.load_textual_inversion(
        files["zqxstyle"]["clip_g"], token="zqxstyle", text_encoder=ref.text_encoder_2, tokenizer=ref.tokenizer_2
    )
    states, _, pooled, _ = ref.encode_prompt("a zqxstyle lighthouse", device="cpu", do_classifier_free_guidance=False)
    ours = sdengine.load_pipeline(folder, device="cpu", embeddings_dir=emb)
    z, p = ours.conditioner.text("a zqxstyle lighthouse", "a zqxstyle lighthouse")
    torch.testing.assert_close(z[:, :77], states, rtol=0, atol=1e-5)
    torch.testing.assert_close(p, pooled, rtol=0, atol=1e-5)
    out = ours(
        "a zqxstyle lighthouse",
        init_image=np.zeros((SIZE, SIZE, 3), np.uint8),
        strength=0.5,
        steps=2,
        seed=1,
        progress=False,
    )
    assert (
        parse_parameters(out.infotexts[0])["TI hashes"] == f"zqxstyle: {embedding_hash(emb / 'zqxstyle.safetensors')}"
    )
