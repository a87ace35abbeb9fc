"""sdengine's Z-Image pipeline against diffusers' ZImagePipeline / ZImageImg2ImgPipeline on a tiny random folder.

The loop tests run sdengine's transformer, schedule, CFG (with diffusers' cfg_normalization and cfg_truncation),
noise, img2img and sdengine's VAE (FLUX.1's, :func:`sdengine.pipeline.flux_loading.load_flux_vae`) with the oracle's
own prompt encoding plugged in; the prompt encoding is checked on its own in ``test_z_image_prompt.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _pipeline_models import picture
from _z_image_models import diffusers_z, make_z_folder
from sdengine.errors import GenerationError
from sdengine.pipeline.flux_loading import load_flux_vae
from sdengine.pipeline.z_image import ZImagePipeline, cfg_options
from sdengine.weights.z_image_file import load_z_image_transformer

SIZE = 32  # 16x16 latents (the tiny VAE's 2x), 8x8 tokens
TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "a red apple on a table"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_z_folder(tmp_path_factory.mktemp("zimage") / "z-image-tiny")


@pytest.fixture(scope="module")
def oracle(folder: Path):
    return diffusers_z(folder)


def oracle_encode(ref):
    """texts -> (states, mask) by diffusers' own ``_encode_prompt`` (rows left-aligned, zero-padded)."""

    def encode(texts: list[str]):
        with torch.no_grad():
            rows = ref._encode_prompt(list(texts), device="cpu", max_sequence_length=512)
        states = torch.zeros(len(rows), max(len(r) for r in rows), rows[0].shape[1])
        mask = torch.zeros(states.shape[:2], dtype=torch.bool)
        for i, r in enumerate(rows):
            states[i, : len(r)], mask[i, : len(r)] = r, True
        return states, mask

    return encode


@pytest.fixture(scope="module")
def pipe(folder: Path, oracle) -> ZImagePipeline:
    return ZImagePipeline(
        transformer=load_z_image_transformer(folder),
        text_encode=oracle_encode(oracle),
        vae=load_flux_vae(folder / "vae", torch.float32, "cpu"),
        scheduler_config=json.loads((folder / "scheduler" / "scheduler_config.json").read_text()),
        device=torch.device("cpu"),
        dtype=torch.float32,
        name="z-image-tiny",
    )


def _want(ref, prompt, seed, steps, **kw):
    with torch.no_grad():
        return ref(
            prompt,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
            **kw,
        ).images


@pytest.mark.parametrize(
    ("negative", "cfg", "extra"),
    [
        ("", 1.0, {}),  # Turbo: guidance 0, one pass per step
        ("", 4.0, {}),
        ("blurry, low quality", 3.5, {"cfg_normalization": True, "cfg_truncation": 0.2}),
    ],
)
def test_loop_matches_diffusers(pipe, oracle, negative: str, cfg: float, extra: dict) -> None:
    got = pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=4, seed=7, width=SIZE, height=SIZE, **extra)
    want = _want(oracle, PROMPT, 7, 4, negative_prompt=negative, guidance_scale=cfg - 1.0, **extra)
    diff = np.abs(got.arrays - want)
    assert diff.mean() < TOL and diff.max() < 1e-3, (diff.mean(), diff.max())
    if extra:  # the options change the image (the truncated steps and the clamp are real)
        plain = pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=4, seed=7, width=SIZE, height=SIZE)
        assert np.abs(plain.arrays - got.arrays).mean() > 10 * TOL
        assert got.parameters.get("CFG truncation") == 0.2


def test_img2img_matches_diffusers(pipe, folder: Path) -> None:
    ref = diffusers_z(folder, img2img=True)
    init = picture(SIZE, SIZE)
    got = pipe(PROMPT, negative_prompt="blurry", cfg_scale=3.0, steps=5, seed=3, width=SIZE, height=SIZE,
               init_image=init, strength=0.6)  # fmt: skip
    want = _want(ref, PROMPT, 3, 5, negative_prompt="blurry", guidance_scale=2.0, image=init, strength=0.6)
    diff = np.abs(got.arrays - want)
    assert diff.mean() < TOL, diff.mean()


def test_rows_batch_as_alone(pipe, oracle) -> None:
    """Two prompts of different token counts and their negatives in one call: each row equals its own call (the
    seed contract), the first one diffusers' image of its seed."""
    both = pipe(["a cat", "a photo of a dog sitting in the sun"], negative_prompt=["", "blurry"], cfg_scale=3.0,
                steps=2, seed=[1, 2], width=SIZE, height=SIZE)  # fmt: skip
    alone = pipe("a photo of a dog sitting in the sun", negative_prompt="blurry", cfg_scale=3.0, steps=2, seed=2,
                 width=SIZE, height=SIZE)  # fmt: skip
    assert np.abs(both.arrays[1] - alone.arrays[0]).max() < 1e-5
    want = _want(oracle, "a cat", 1, 2, negative_prompt="", guidance_scale=2.0)
    assert np.abs(both.arrays[0] - want[0]).mean() < TOL


def test_defaults_and_refusals(pipe) -> None:
    assert pipe.family_defaults == {"steps": 9, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
    for kw, why in (
        ({"distilled_cfg_scale": 3.5}, "distilled_cfg_scale"),
        ({"pag_scale": 1.0}, "perturbed-attention"),
        ({"sampler": "euler_cfg_pp"}, "CFG\\+\\+"),
        ({"prompt": "a [cat:dog:0.5]", "cfg_scale": 2.0, "steps": 4}, "prompt editing"),
        ({"cfg_normalization": -1}, "cfg_normalization"),
        ({"cfg_truncation": "x"}, "cfg_truncation"),
    ):
        kw = {"prompt": PROMPT, "steps": 1, "width": SIZE, "height": SIZE, "progress": False, **kw}
        with pytest.raises(GenerationError, match=why) as e:
            pipe(**kw)
        assert "\n" not in str(e.value)
    assert cfg_options(True, 1.0) == (1.0, 1.0) and cfg_options(2, 0.5) == (2.0, 0.5)


# ----------------------------------------------------------------------------------------------------------
# The whole folder, loaded by sdengine (its Qwen3 text encoder, tokenizer, VAE, transformer, scheduler), prompt
# strings on both sides


@pytest.fixture(scope="module")
def loaded(folder: Path):
    import sdengine

    return sdengine.load_pipeline(folder, device="cpu")


@pytest.mark.parametrize(("negative", "cfg"), [("", 1.0), ("blurry, low quality", 3.0)])
def test_folder_matches_diffusers(loaded, oracle, negative: str, cfg: float) -> None:
    got = loaded(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=3, seed=11, width=SIZE, height=SIZE,
                 progress=False)  # fmt: skip
    want = _want(oracle, PROMPT, 11, 3, negative_prompt=negative, guidance_scale=cfg - 1.0)
    diff = np.abs(got.arrays - want)
    assert diff.mean() < TOL and diff.max() < 1e-3, (diff.mean(), diff.max())
    assert loaded.text_kind == "z_image" and loaded.variant == "z_image"


def test_folder_img2img_matches_diffusers(loaded, folder: Path) -> None:
    ref = diffusers_z(folder, img2img=True)
    init = picture(SIZE, SIZE)
    got = loaded(PROMPT, negative_prompt="blurry", cfg_scale=3.0, steps=5, seed=3, width=SIZE, height=SIZE,
                 init_image=init, strength=0.6, progress=False)  # fmt: skip
    want = _want(ref, PROMPT, 3, 5, negative_prompt="blurry", guidance_scale=2.0, image=init, strength=0.6)
    assert np.abs(got.arrays - want).mean() < TOL


@pytest.mark.parametrize(("strength", "cfg"), [(0.6, 3.0), (1.0, 1.0)])
def test_folder_inpainting_matches_diffusers(loaded, folder: Path, strength: float, cfg: float) -> None:
    """A mask on the plain model: the known region put back on its noising path after every step, as diffusers'
    ``ZImageInpaintPipeline`` (its binarised mask, nearest-resized to the latent)."""
    import diffusers

    from _pipeline_models import mask_picture

    ref = diffusers.ZImageInpaintPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    init, mask = picture(SIZE, SIZE), mask_picture(SIZE, SIZE)
    got = loaded(PROMPT, negative_prompt="blurry", cfg_scale=cfg, steps=5, seed=3, width=SIZE, height=SIZE,
                 init_image=init, mask=mask, strength=strength, progress=False)  # fmt: skip
    want = _want(ref, PROMPT, 3, 5, negative_prompt="blurry", guidance_scale=cfg - 1, image=init, mask_image=mask,
                 strength=strength)  # fmt: skip
    assert np.abs(got.arrays - want).mean() < TOL


def test_cli_generate_with_a_z_image_folder(folder: Path, oracle, tmp_path: Path) -> None:
    """``sdengine generate --model FOLDER``: Turbo's defaults (9 steps, no CFG), the PNG's pixels diffusers'."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters, read_png_parameters

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--seed", "5", "--width", str(SIZE), "--height", str(SIZE)]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["CFG scale"]) == 1.0 and parsed["Sampler"] == "Euler" and parsed["Steps"] == "9"
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    want = _want(oracle, PROMPT, 5, 9, guidance_scale=0.0)[0]
    assert np.abs(got - want).mean() < 1.0 / 255
    assert np.abs(got - np.round(want * 255) / 255).max() <= 1.0 / 255  # PNG rounding at most


def test_folder_refusals(folder: Path, tmp_path: Path) -> None:
    import shutil

    import sdengine

    for kw, why in (
        ({"qwen_text": str(folder / "text_encoder")}, "--qwen-text is not supported for a Z-Image folder"),
        ({"t5": str(folder / "text_encoder")}, "do not apply"),
        ({"config": str(folder)}, "config="),
        ({"vae": str(tmp_path / "nothing")}, "no such file"),
    ):
        with pytest.raises(GenerationError, match=why) as e:
            sdengine.load_pipeline(folder, device="cpu", **kw)
        assert "\n" not in str(e.value)
    other = tmp_path / "omni"
    shutil.copytree(folder, other)
    index = json.loads((other / "model_index.json").read_text())
    (other / "model_index.json").write_text(json.dumps({**index, "_class_name": "ZImageOmniPipeline"}))
    with pytest.raises(GenerationError, match="ZImageOmniPipeline is not supported"):
        sdengine.load_pipeline(other, device="cpu")
