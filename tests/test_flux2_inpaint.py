"""FLUX.2 [klein] img2img and inpainting against diffusers' ``Flux2KleinInpaintPipeline`` on tiny random parts saved
in diffusers' layout (``_flux2_models``), with the same prompt embeddings and seeds: the init image's size and
latent, the strength's first step, the init image as a reference, the mask binarised and shrunk bilinearly, the
blend after every step, a reference image beside the init image. img2img is that pipeline with an all-white mask.
Then ``sdengine generate --init-image --mask --strength`` against the Python call, and the refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from _flux2_models import diffusers_klein_inpaint, save_parts  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from test_flux2_pipeline import TEXT, _ours  # noqa: E402

W, H = 40, 24  # the tiny VAE's 4x and the 2x2 patches: multiples of 8


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_parts(tmp_path_factory.mktemp("flux2inp") / "klein-tiny")


@pytest.fixture(scope="module")
def table() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    return {text: torch.randn(1, TEXT, 24, generator=g) for text in ("a red apple", "", "blurry")}


def _picture(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def grey_edged_mask(w: int = W, h: int = H) -> Image.Image:
    """White inside a box, its edges grey (100, 140, 180: either side of the 0.5 binarisation), black outside."""
    m = np.zeros((h, w), np.uint8)
    m[4:20, 8:30] = 255
    m[4:20, 8] = 100
    m[4:20, 29] = 180
    m[3, 8:30] = 140
    return Image.fromarray(m, "L")


def _diffusers(oracle, table, *, init, mask, seed, strength, steps=5, scale=2.5, reference=None) -> np.ndarray:
    kw = {"image_reference": reference} if reference is not None else {}
    return oracle(
        image=init,
        mask_image=mask if mask is not None else Image.new("L", init.size, 255),  # img2img: all white
        prompt_embeds=table["a red apple"],
        negative_prompt_embeds=table[""],
        guidance_scale=scale,
        num_inference_steps=steps,
        strength=strength,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=TEXT,
        output_type="np",
        **kw,
    ).images[0]


def test_img2img_and_inpainting_match_diffusers(folder: Path, table) -> None:
    """img2img at strength 0.6 (a batch of two: row 1 is seed + 1's), inpainting with a grey-edged mask at 0.6 and
    at 1 (pure noise start), inpainting with a 75x66 reference image beside the init image, and an init image of
    43x29 with no size given (the output takes its floored 40x24, the image resized to it): mean abs difference on
    0..1 pixels under 1e-4 (measured 1.9e-7 to 2.3e-7, max 2.9e-6)."""
    oracle = diffusers_klein_inpaint(folder)
    pipe = _ours(folder, table)
    init, mask, ref = _picture(W, H, 3), grey_edged_mask(), _picture(75, 66, 4)
    common = {"cfg_scale": 2.5, "steps": 5, "seed": 5, "width": W, "height": H}
    images = {}

    got = pipe("a red apple", init_image=init, strength=0.6, batch_size=2, **common).arrays
    for row in (0, 1):
        want = _diffusers(oracle, table, init=init, mask=None, seed=5 + row, strength=0.6)
        assert float(np.abs(got[row] - want).mean()) < 1e-4, row
    images["img2img"] = got[0]
    for strength in (0.6, 1.0):
        got = pipe("a red apple", init_image=init, mask=mask, strength=strength, **common).arrays[0]
        want = _diffusers(oracle, table, init=init, mask=mask, seed=5, strength=strength)
        assert float(np.abs(got - want).mean()) < 1e-4, strength
        images[f"inpaint {strength}"] = got
    got = pipe("a red apple", init_image=init, mask=mask, strength=0.6, reference_images=[ref], **common).arrays[0]
    want = _diffusers(oracle, table, init=init, mask=mask, seed=5, strength=0.6, reference=ref)
    assert float(np.abs(got - want).mean()) < 1e-4
    images["reference"] = got
    odd = _picture(43, 29, 6)
    result = pipe("a red apple", init_image=odd, strength=0.6, cfg_scale=2.5, steps=5, seed=5)
    want = _diffusers(oracle, table, init=odd, mask=None, seed=5, strength=0.6)
    assert result.arrays[0].shape == want.shape == (H, W, 3)
    assert float(np.abs(result.arrays[0] - want).mean()) < 1e-4
    # each setting changes the image (the test would see a setting dropped)
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert float(np.abs(images[a] - images[b]).mean()) > 1e-3, (a, b)


def test_latent_mask_is_binarised_then_bilinear(folder: Path, table) -> None:
    """The blend's latent mask: diffusers' ``mask_processor`` (binarised at 0.5) then ``prepare_mask_latents``
    (bilinear to the latent grid); its edge cells grey."""
    from sdengine.pipeline.latents import start_latents

    pipe = _ours(folder, table)
    oracle = diffusers_klein_inpaint(folder)
    mask = grey_edged_mask()
    processed = oracle.mask_processor.preprocess(mask, height=H, width=W)
    want = oracle.prepare_mask_latents(processed, 1, 1, H, W, torch.float32, "cpu")  # (1, h*w, 1)
    start = start_latents(
        pipe.vae,
        generators=[torch.Generator().manual_seed(0)],
        latent_channels=pipe.latent_channels,
        width=W,
        height=H,
        scale_factor=pipe.vae_scale_factor,
        init=_picture(W, H, 3),
        mask=np.asarray(mask, np.float32) / 255,
        mask_blur=0,
        strength=0.6,
        nine_channels=False,
        tiled=None,
        device=torch.device("cpu"),
        init_mode=True,
        mask_rule="bilinear",
        encode_masked=False,
    )
    assert start.blend_mask is not None
    got = start.blend_mask.reshape(1, -1, 1)
    assert torch.equal(got, want)
    assert bool(((got > 0) & (got < 1)).any())  # grey edge cells


def test_cli_generate_with_init_image_and_mask_is_the_python_call(tmp_path: Path) -> None:
    """``sdengine generate --model FOLDER --init-image --mask --strength``: the PNG is the Python call's image."""
    from _flux2_models import make_klein_folder
    from sdengine import load_pipeline
    from sdengine.cli import main

    folder = make_klein_folder(tmp_path / "klein", seed=3)
    init, mask = _picture(W, H, 3), grey_edged_mask()
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), "a red apple", "--steps", "3", "--seed", "7", "--cfg", "2"]
    args += ["--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"), "--strength", "0.6"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    pipe = load_pipeline(folder, device="cpu")
    want = pipe("a red apple", steps=3, seed=7, cfg_scale=2, init_image=init, mask=mask, strength=0.6)
    assert want.images[0].size == (W, H)  # the init image's size (none given)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"init_latent_resize": True}, "init_latent_resize: A1111's latent upscale is not supported for FLUX.2"),
        ({"init_image": None, "mask": "mask"}, "mask"),
        ({"strength": 1.5}, "strength"),
        ({"strength_rule": "a1111"}, "A1111's step rules are not supported for Flux with an init image"),
        ({"init_image": _picture(7, 30, 1), "width": None, "height": None}, "init image 7x30 is smaller than 8x8"),
        ({"width": 4096, "height": 2560}, "the init image's tokens join each step as a reference"),
    ],
)
def test_refusals(folder: Path, table, kwargs: dict, message: str) -> None:
    pipe = _ours(folder, table)
    args = {"prompt": "a red apple", "seed": 1, "width": W, "height": H, "steps": 2, "init_image": _picture(W, H, 3)}
    args.update(kwargs)
    if args.get("mask") == "mask":
        args["mask"] = grey_edged_mask()
    with pytest.raises(GenerationError) as e:
        pipe(**args)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert pipe.encoded == []  # refused before any model ran
