"""Qwen-Image-Edit: the Qwen2.5-VL vision tower and image processor against transformers, the prompt encoding with
an image against diffusers' ``QwenImageEditPipeline.encode_prompt``, on tiny random models in the real layouts
(tests/_qwen_edit_models.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from _qwen_edit_models import diffusers_qwen_edit, make_qwen_edit_folder
from sdengine.errors import UsageError
from sdengine.models.qwen_vision import QwenVisionConfig, QwenVisionTower, qwen_vision_pixels, smart_resize


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def edit_folder(tmp_path_factory):
    return make_qwen_edit_folder(tmp_path_factory.mktemp("qwen_edit") / "Qwen-Image-Edit")


def test_vision_tower_matches_transformers():
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    vc = Qwen2_5_VLVisionConfig(
        depth=3, hidden_size=32, intermediate_size=40, num_heads=2, out_hidden_size=48, fullatt_block_indexes=[1]
    )
    torch.manual_seed(0)
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = QwenVisionTower(QwenVisionConfig.from_transformers(vc.to_dict()))
    ours.load_state_dict(ref.state_dict(), strict=True)
    grids = [(1, 12, 20), (1, 10, 8)]  # several windows (4x4 merged blocks each, the last ones cut), two images
    x = torch.randn(sum(t * h * w for t, h, w in grids), ours.config.patch_dim)
    with torch.no_grad():
        want = ref(x, grid_thw=torch.tensor(grids)).pooler_output
        got = ours(x, grids)
    assert got.shape == want.shape == (80, 48)
    assert (got - want).abs().max().item() < 1e-4


@pytest.mark.parametrize("size", [(64, 48), (100, 37), (30, 30), (1000, 1300), (2000, 1500)])
def test_processor_matches_transformers(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    img = _image(*size)
    want = Qwen2VLImageProcessorPil()(images=img, return_tensors="pt")
    got, grid = qwen_vision_pixels(img)
    assert [list(grid)] == want["image_grid_thw"].tolist()
    assert got.shape == want["pixel_values"].shape
    assert (got - want["pixel_values"]).abs().max().item() < 1e-5


def test_processor_refusals():
    with pytest.raises(UsageError, match="aspect ratio"):
        smart_resize(10, 2500)
    with pytest.raises(UsageError, match="PIL image"):
        qwen_vision_pixels(np.zeros((28, 28, 3)))  # type: ignore[arg-type]


def test_vision_tower_refuses_wrong_rows():
    tower = QwenVisionTower(
        QwenVisionConfig(
            depth=1, hidden_size=32, intermediate_size=8, num_heads=2, out_hidden_size=8, fullatt_block_indexes=(0,)
        )
    )
    with pytest.raises(UsageError, match="pixel_values"):
        tower(torch.zeros(10, tower.config.patch_dim), [(1, 4, 4)])
    with pytest.raises(UsageError, match="grid_thw"):
        tower(torch.zeros(15, tower.config.patch_dim), [(1, 3, 5)])


def test_edit_prompt_encoding_matches_diffusers(edit_folder):
    from sdengine.text.qwen_prompt import encode_prompt_qwen_edit
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    img = _image(130, 90)
    pipe = diffusers_qwen_edit(edit_folder)
    encoder = load_qwen_text_encoder(edit_folder / "text_encoder")
    vision = load_qwen_vision_tower(edit_folder)
    tokenizer = load_qwen_tokenizer(edit_folder / "tokenizer")
    prompts = ["make the apple green", "turn the cat into a dog and add a hat"]
    states, mask = encode_prompt_qwen_edit(encoder, vision, tokenizer, prompts, img)
    for i, prompt in enumerate(prompts):
        with torch.no_grad():
            want, _ = pipe.encode_prompt(prompt, image=img, device="cpu")
        n = want.shape[1]
        assert int(mask[i].sum()) == n
        assert (states[i, :n] - want[0]).abs().max().item() < 1e-4
        assert not states[i, n:].any()


def test_edit_prompt_refusals(edit_folder):
    from sdengine.text.qwen_prompt import encode_prompt_qwen_edit
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    encoder = load_qwen_text_encoder(edit_folder / "text_encoder")
    vision = load_qwen_vision_tower(edit_folder)
    tokenizer = load_qwen_tokenizer(edit_folder / "tokenizer")
    with pytest.raises(UsageError, match="image_pad"):
        encode_prompt_qwen_edit(encoder, vision, tokenizer, "a <|image_pad|> here", _image(56, 56))
    with pytest.raises(UsageError, match="image_token_id"):
        encode_prompt_qwen_edit(encoder, vision, tokenizer, "a", _image(56, 56), image_token_id=3)


def test_vision_loader_refuses_a_file_without_the_tower(tmp_path, edit_folder):
    from safetensors.torch import load_file, save_file

    from sdengine.weights.qwen_vision_file import QwenVisionFileError, load_qwen_vision_tower

    state = load_file(next((edit_folder / "text_encoder").glob("*.safetensors")))
    save_file({k: v for k, v in state.items() if "visual" not in k}, tmp_path / "text_only.safetensors")
    with pytest.raises(QwenVisionFileError, match="no Qwen2.5-VL vision tower"):
        load_qwen_vision_tower(tmp_path / "text_only.safetensors")
    # a single file with the tower: the config from the shapes needs the release's 16 heads, which 32 wide has not
    visual = {k: v for k, v in state.items() if "visual" in k}
    save_file(visual, tmp_path / "visual.safetensors")
    with pytest.raises(QwenVisionFileError, match="hidden_size=32"):
        load_qwen_vision_tower(tmp_path / "visual.safetensors")


# ----------------------------------------------------------------------------------------------------------
# The pipeline against diffusers' QwenImageEditPipeline. diffusers fits the input image to 1024 x 1024 pixels
# (calculate_dimensions(1024 * 1024, ratio)), which is slow on a CPU: both sides are run at 64 x 64 here (the
# oracle's calculate_dimensions wrapped, sdengine's edit_area set), the same rule at another area.

EDIT_AREA = 64 * 64


@pytest.fixture(scope="module")
def edit_oracle(edit_folder):
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module

    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(EDIT_AREA, ratio)
    try:
        yield diffusers_qwen_edit(edit_folder)
    finally:
        module.calculate_dimensions = original


@pytest.fixture(scope="module")
def edit_pipe(edit_folder):
    import sdengine

    pipe = sdengine.load_pipeline(edit_folder, device="cpu")
    pipe.edit_area = EDIT_AREA
    return pipe


@pytest.mark.parametrize(
    ("size", "negative", "cfg"), [((48, 32), " ", 4.0), (None, "blurry, low quality", 2.5), ((32, 48), None, 1.0)]
)
def test_edit_matches_diffusers(edit_pipe, edit_oracle, size, negative, cfg):
    img = _image(130, 90)
    kw = {} if size is None else {"width": size[0], "height": size[1]}
    with torch.no_grad():
        want = edit_oracle(
            image=img,
            prompt="make the apple green",
            negative_prompt=negative,
            true_cfg_scale=cfg,
            num_inference_steps=3,
            generator=torch.Generator().manual_seed(7),
            output_type="np",
            **kw,
        ).images
    got = edit_pipe(
        "make the apple green",
        negative_prompt=negative or "",
        reference_images=[img],
        cfg_scale=cfg,
        steps=3,
        seed=7,
        **kw,
    )
    assert got.arrays.shape == want.shape
    diff = np.abs(got.arrays - want)
    assert diff.mean() < 1e-5 and diff.max() < 1e-4, (diff.mean(), diff.max())


def test_edit_pipeline_is_detected(edit_pipe):
    from sdengine.pipeline.qwen_image_edit import QwenImageEditPipeline

    assert isinstance(edit_pipe, QwenImageEditPipeline)
    assert edit_pipe.variant == "qwen_image_edit"


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({}, "reference_images=\\[image\\] \\(got 0"),
        ({"reference_images": [_image(40, 40), _image(40, 40)]}, "got 2 images"),
        ({"reference_images": [_image(40, 40)], "reference_auto_resize": False}, "reference_auto_resize"),
        ({"reference_images": [_image(40, 40)], "init_image": _image(32, 32)}, "init_image"),
        ({"reference_images": [_image(40, 40)], "enable_hr": True}, "hires fix"),
        ({"reference_images": [_image(40, 40)], "controlnets": [("cn.safetensors", _image(40, 40))]}, "ControlNets"),
    ],
)
def test_edit_refusals(edit_pipe, extra, match):
    from sdengine.errors import GenerationError

    with pytest.raises(GenerationError, match=match):
        edit_pipe(extra.pop("prompt", "a"), steps=1, seed=1, **extra)


def test_edit_folder_refuses_other_text_encoders(edit_folder):
    import sdengine
    from sdengine.errors import GenerationError

    with pytest.raises(GenerationError, match="--qwen-text is not supported for a Qwen-Image-Edit folder"):
        sdengine.load_pipeline(edit_folder, device="cpu", qwen_text=str(edit_folder / "text_encoder"))


def test_cli_edits_the_reference_image(edit_folder, edit_pipe, tmp_path, monkeypatch):
    """``sdengine generate --reference-image IMAGE`` on a Qwen-Image-Edit folder: the Python pipeline's image."""
    from sdengine.cli import main
    from sdengine.pipeline.qwen_image_edit import QwenImageEditPipeline

    monkeypatch.setattr(QwenImageEditPipeline, "edit_area", EDIT_AREA)
    src, out = tmp_path / "in.png", tmp_path / "out.png"
    _image(90, 60).save(src)
    args = ["generate", "--model", str(edit_folder), "make the apple green", "--reference-image", str(src),
            "--steps", "2", "--seed", "3", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    want = edit_pipe("make the apple green", reference_images=[Image.open(src)], steps=2, seed=3, progress=False)
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert got.shape == want.arrays[0].shape
    assert np.abs(got - want.arrays[0]).max() <= 1 / 255 + 1e-6


def test_vision_tower_from_a_single_file_reads_its_shapes(tmp_path):
    """A single file (ComfyUI's ``qwen_2.5_vl_7b.safetensors`` keeps the tower as ``visual.*``): the config from the
    shapes with the release's 16 heads and full-attention blocks 7, 15, 23, 31 (a 32-block tower, 64 wide here)."""
    from safetensors.torch import save_file
    from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

    vc = Qwen2_5_VLVisionConfig(depth=32, hidden_size=64, intermediate_size=16, num_heads=16, out_hidden_size=24)
    torch.manual_seed(1)
    ref = Qwen2_5_VisionTransformerPretrainedModel._from_config(vc).eval()
    save_file({f"visual.{k}": v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "qwen_vl.safetensors")
    tower = load_qwen_vision_tower(tmp_path / "qwen_vl.safetensors")
    assert tower.config.fullatt_block_indexes == (7, 15, 23, 31) and tower.config.num_heads == 16
    grid = [(1, 12, 10)]
    x = torch.randn(120, tower.config.patch_dim)
    with torch.no_grad():
        want = ref(x, grid_thw=torch.tensor(grid)).pooler_output
    assert (tower(x, grid) - want).abs().max().item() < 1e-4


def test_rows_of_a_batch_equal_their_own_calls(edit_pipe):
    """Two prompts with different negatives in one call: each row equals its call alone (the texts are padded to
    one width with a mask)."""
    img = _image(90, 60)
    both = edit_pipe(["a", "make the apple green"], negative_prompt=["", "blurry"], steps=2, seed=[1, 2],
                     reference_images=[img], progress=False)  # fmt: skip
    alone = edit_pipe("make the apple green", negative_prompt="blurry", steps=2, seed=2, reference_images=[img],
                      progress=False)  # fmt: skip
    assert np.abs(both.arrays[1] - alone.arrays[0]).max() < 1e-5


def test_a_lora_matches_diffusers_load_lora_weights(edit_folder, edit_pipe, tmp_path):
    """A random LoRA on every Linear of the transformer (diffusers' layout): the edit equals diffusers'
    ``QwenImageEditPipeline.load_lora_weights``; a ``<lora:NAME:W>`` tag gives the ``loras=`` image."""
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as module

    from test_lora_qwen_image import _layout, _pairs, _write

    img = _image(90, 60)
    pairs = _pairs(edit_pipe.transformer, seed=11)
    path = _write(_layout(pairs, "diffusers"), tmp_path / "loras" / "edit.safetensors")
    kw = {"negative_prompt": "blurry", "reference_images": [img], "cfg_scale": 4.0, "steps": 3, "seed": 3}
    ours = edit_pipe("make the apple green", loras=[(path, 1.0)], progress=False, **kw).arrays
    tagged = edit_pipe("make the apple green <lora:edit:1>", lora_dir=tmp_path / "loras", progress=False, **kw).arrays
    plain = edit_pipe("make the apple green", progress=False, **kw).arrays
    original = module.calculate_dimensions
    module.calculate_dimensions = lambda area, ratio: original(EDIT_AREA, ratio)
    try:
        oracle = diffusers_qwen_edit(edit_folder)
        oracle.load_lora_weights(_layout(pairs, "diffusers"), adapter_name="edit")
        with torch.no_grad():
            want = oracle(image=img, prompt="make the apple green", negative_prompt="blurry", true_cfg_scale=4.0,
                          num_inference_steps=3, generator=torch.Generator().manual_seed(3),
                          output_type="np").images  # fmt: skip
    finally:
        module.calculate_dimensions = original
    assert np.abs(ours - want).mean() < 1e-5 and np.abs(ours - want).max() < 1e-4
    assert np.abs(ours - plain).mean() > 1e-3  # the LoRA acts
    np.testing.assert_allclose(tagged, ours, atol=1e-6)
