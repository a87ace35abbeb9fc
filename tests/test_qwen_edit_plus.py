"""Qwen-Image-Edit-2509 (diffusers' ``QwenImageEditPlusPipeline``): several input images, each fitted for the
vision tower (~384^2) and for the VAE (~1024^2), against diffusers on tiny random models in the real layout
(tests/_qwen_edit_models.py). Both areas are made smaller on both sides for CPU speed: the oracle's
``calculate_dimensions`` wrapped (1024^2 -> 64^2, 384^2 -> 48^2), sdengine's ``edit_area`` / ``condition_area`` set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _qwen_edit_models import diffusers_qwen_edit, make_qwen_edit_folder

EDIT_AREA = 64 * 64
CONDITION_AREA = 48 * 48
AREAS = {1024 * 1024: EDIT_AREA, 384 * 384: CONDITION_AREA}


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def plus_folder(tmp_path_factory):
    return make_qwen_edit_folder(tmp_path_factory.mktemp("qwen_edit_plus") / "Qwen-Image-Edit-2509", plus=True)


@pytest.fixture(scope="module")
def plus_oracle(plus_folder):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus as module

    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(AREAS[area], ratio)
    try:
        yield diffusers_qwen_edit(plus_folder, plus=True)
    finally:
        module.calculate_dimensions = original


@pytest.fixture(scope="module")
def plus_pipe(plus_folder):
    import sdengine

    pipe = sdengine.load_pipeline(plus_folder, device="cpu")
    pipe.edit_area = EDIT_AREA
    pipe.condition_area = CONDITION_AREA
    return pipe


def test_plus_folder_loads_as_edit_plus(plus_pipe):
    from sdengine.pipeline.qwen_image_edit import QwenImageEditPlusPipeline

    assert isinstance(plus_pipe, QwenImageEditPlusPipeline)
    assert plus_pipe.variant == "qwen_image_edit_plus"


def test_plus_prompt_encoding_matches_diffusers(plus_folder, plus_oracle):
    """Two images of different sizes: the states of "Picture 1: ... Picture 2: ... prompt" equal diffusers'."""
    from sdengine.text.qwen_prompt import encode_prompt_qwen_edit
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    images = [_image(130, 90), _image(60, 100, seed=1)]
    encoder = load_qwen_text_encoder(plus_folder / "text_encoder")
    vision = load_qwen_vision_tower(plus_folder)
    tokenizer = load_qwen_tokenizer(plus_folder / "tokenizer")
    states, mask = encode_prompt_qwen_edit(encoder, vision, tokenizer, ["make the apple green"], images, plus=True)
    with torch.no_grad():
        want, _ = plus_oracle.encode_prompt("make the apple green", image=images, device="cpu")
    assert int(mask[0].sum()) == want.shape[1]
    assert (states[0] - want[0]).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("sizes", "negative", "cfg"),
    [
        ([(130, 90)], None, 1.0),  # one image, one pass
        ([(130, 90), (60, 100)], "blurry, low quality", 4.0),  # two images of different sizes, true CFG
        ([(130, 90), (60, 100), (80, 80)], " ", 2.5),  # three (the model card's most)
    ],
)
def test_plus_matches_diffusers(plus_pipe, plus_oracle, sizes, negative, cfg):
    images = [_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    with torch.no_grad():
        want = plus_oracle(
            image=images,
            prompt="make the apple green",
            negative_prompt=negative,
            true_cfg_scale=cfg,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
        ).images
    got = plus_pipe(
        "make the apple green",
        negative_prompt=negative or "",
        reference_images=images,
        cfg_scale=cfg,
        steps=3,
        seed=7,
        progress=False,
    )
    assert got.arrays.shape == want.shape  # the last image's size
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-5 and diff.max() < 1e-4, (diff.mean(), diff.max())


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({}, "1 to 3 input images.*got 0"),
        ({"reference_images": [_image(40, 40)] * 4}, "got 4 images"),
        ({"reference_images": [_image(40, 40)], "init_image": _image(32, 32)}, "init_image"),
        ({"reference_images": [_image(40, 40)], "reference_auto_resize": False}, "reference_auto_resize"),
        ({"reference_images": [_image(40, 40), _image(4000, 20)]}, "reference image 1 .*too extreme"),
    ],
)
def test_plus_refusals(plus_pipe, extra, match):
    from sdengine.errors import GenerationError

    with pytest.raises(GenerationError, match=match) as e:
        plus_pipe("a", steps=1, seed=1, progress=False, **extra)
    assert "\n" not in str(e.value) and "Qwen-Image-Edit-2509" in str(e.value)


def test_cli_edits_several_reference_images(plus_folder, plus_pipe, tmp_path, monkeypatch):
    """``sdengine generate --reference-image A --reference-image B`` on a 2509 folder: the Python pipeline's image."""
    from sdengine.cli import main
    from sdengine.pipeline.qwen_image_edit import QwenImageEditPlusPipeline

    monkeypatch.setattr(QwenImageEditPlusPipeline, "edit_area", EDIT_AREA)
    monkeypatch.setattr(QwenImageEditPlusPipeline, "condition_area", CONDITION_AREA)
    a, b, out = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "out.png"
    _image(90, 60).save(a)
    _image(50, 80, seed=1).save(b)
    args = ["generate", "--model", str(plus_folder), "make the apple green", "--reference-image", str(a),
            "--reference-image", str(b), "--steps", "2", "--seed", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    want = plus_pipe("make the apple green", reference_images=[Image.open(a), Image.open(b)], steps=2, seed=3,
                     progress=False)  # fmt: skip
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert got.shape == want.arrays[0].shape
    assert np.abs(got - want.arrays[0]).max() <= 1 / 255 + 1e-6


def test_plus_rows_of_a_batch_equal_their_own_calls(plus_pipe):
    """Two prompts with different negatives on two images in one call (diffusers' Plus pipeline takes one prompt
    per call): each row equals its call alone (the texts padded to one width with a mask)."""
    images = [_image(90, 60), _image(50, 80, seed=1)]
    both = plus_pipe(["a", "make the apple green"], negative_prompt=["", "blurry"], steps=2, seed=[1, 2],
                     reference_images=images, progress=False)  # fmt: skip
    alone = plus_pipe("make the apple green", negative_prompt="blurry", steps=2, seed=2, reference_images=images,
                      progress=False)  # fmt: skip
    assert np.abs(both.arrays[1] - alone.arrays[0]).max() < 1e-5
