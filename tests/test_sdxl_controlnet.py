"""SDXL ControlNet (diffusers ControlNetModel with the SDXL U-Net's config, text_time conditioning) against
diffusers' StableDiffusionXLControlNetPipeline on a tiny random SDXL folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import _pipeline_models as _models  # noqa: E402
import sdengine  # noqa: E402
from _sdxl_models import make_sdxl_folder  # noqa: E402
from sdengine import control as C  # noqa: E402
from sdengine.models.controlnet import ControlNet, ControlNetConfig  # noqa: E402

TOL = 1e-3
SIZE, STEPS, SEED = 32, 6, 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sdxl-cn")
    folder = make_sdxl_folder(root / "tiny-sdxl")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    _models._perturb(net, 100, 0.05)  # zero convs non-zero, so the ControlNet matters
    net.eval().save_pretrained(root / "cn")
    cmap = C.preprocess("canny", _models.picture(40, 36, seed=1), low=30, high=90)
    return folder, sdengine.load_pipeline(folder, device="cpu"), net, root / "cn", cmap


def _run(setup, sampler: str, scale: float, guess: bool):
    folder, pipe, net, path, cmap = setup
    kw = dict(steps=STEPS, sampler=sampler, schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    ours = pipe(PROMPT, NEGATIVE, progress=False, controlnets=[(path, cmap, scale)], guess_mode=guess, **kw).arrays
    plain = pipe(PROMPT, NEGATIVE, progress=False, **kw).arrays
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(folder, controlnet=net, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = _models.diffusers_scheduler(folder, sampler)
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=cmap,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="np",
        height=SIZE,
        width=SIZE,
        controlnet_conditioning_scale=scale,
        guess_mode=guess,
    ).images
    return ours, theirs, plain


@pytest.mark.parametrize(("sampler", "scale", "guess"), [("euler", 0.9, False), ("dpmpp_2m", 1.0, True)])
def test_sdxl_controlnet_matches_diffusers(setup, sampler, scale, guess):
    ours, theirs, plain = _run(setup, sampler, scale, guess)
    mad = float(np.abs(ours.astype(np.float64) - theirs).mean())
    effect = float(np.abs(ours - plain).mean())
    print(f"sdxl controlnet {sampler} scale {scale} guess {guess}: mean abs {mad:.2e} (effect {effect:.2e})")
    assert mad < TOL and effect > 1e-2


def test_sdxl_controlnet_config_and_from_unet(setup):
    folder, pipe, net, _, _ = setup
    cfg = ControlNetConfig.from_diffusers(dict(net.config))
    assert cfg.unet.text_time and cfg.unet.transformer_layers_per_block == pipe.unet.config.transformer_layers_per_block
    fresh = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
    assert torch.equal(fresh.add_embedding.linear_1.weight, pipe.unet.add_embedding.linear_1.weight)


def test_original_layout_sdxl_controlnet_file_gives_the_same_image(setup, tmp_path):
    """An SDXL ControlNet in the original layout (control_model.*, label_emb.0.*), no config: its architecture
    is read off the shapes and the image equals the diffusers folder's."""
    from sdengine.control.files import controlnet_layout
    from sdengine.weights import controlnet_keys as ck
    from sdengine.weights import save_safetensors

    folder, pipe, net, path, cmap = setup
    cfg = ControlNetConfig.from_diffusers(dict(net.config))
    original, bad = ck.controlnet_diffusers_to_original(net.state_dict(), controlnet_layout(cfg), 2, sdxl=True)
    assert not bad and "label_emb.0.0.weight" in original
    single = tmp_path / "control_sdxl_tiny.safetensors"
    save_safetensors({ck.CONTROL_PREFIX + k: v.contiguous() for k, v in original.items()}, single)
    kw = dict(steps=4, sampler="euler", schedule="normal", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    a = pipe(PROMPT, NEGATIVE, progress=False, controlnets=[(path, cmap, 0.9)], **kw).arrays
    b = pipe(PROMPT, NEGATIVE, progress=False, controlnets=[(single, cmap, 0.9)], **kw).arrays
    assert float(np.abs(a - b).max()) < 1e-6
