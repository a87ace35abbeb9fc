"""Medium-size ControlNet parity (marked slow): residuals of an SD1-topology ControlNet (four levels, two layers,
the real 4-level hint encoder) vs diffusers' ControlNetModel, and end-to-end images vs diffusers'
StableDiffusionControlNetPipeline on a medium random model with two ControlNets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import MEDIUM_SD

diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sd2", [False, True], ids=["sd1_medium", "sd2_medium_linear_proj"])
def test_medium_residuals_parity(sd2: bool) -> None:
    ucfg = MEDIUM_SD if not sd2 else dataclasses.replace(MEDIUM_SD, use_linear_projection=True, num_heads=(1, 2, 4, 4))
    cfg = ControlNetConfig.from_unet(ucfg)  # hint encoder (16, 32, 96, 256): 8x down, as released ControlNets
    d = cfg.to_diffusers()
    d.pop("_class_name")
    torch.manual_seed(0)
    ref = diffusers.ControlNetModel(**d).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    ours = ControlNet(ControlNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 4, 32, 32, generator=g)
    ctx = torch.randn(2, 77, 128, generator=g)
    img = torch.rand(2, 3, 256, 256, generator=g)
    with torch.no_grad():
        want, want_mid = ref(
            x,
            torch.tensor([999, 500]),
            encoder_hidden_states=ctx,
            controlnet_cond=img,
            conditioning_scale=0.9,
            return_dict=False,
        )
        got, got_mid = ours(x, torch.tensor([999, 500]), img, encoder_hidden_states=ctx, scale=0.9)
    assert len(got) == 12
    assert max((a - b).abs().max().item() for a, b in zip(got, want, strict=True)) < 1e-4
    assert (got_mid - want_mid).abs().max().item() < 1e-4


def test_medium_two_controlnets_image_parity(tmp_path) -> None:
    import _pipeline_models as models
    import sdengine
    from sdengine import control as C

    folder = models.make_sd_folder(tmp_path / "model", size="medium", kind="sd1")
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet")
    nets, paths = [], []
    for k in range(2):  # the medium VAE is 4x: a 3-level hint encoder
        net = diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32, 96))
        models._perturb(net, 50 + k, 0.02)
        net.save_pretrained(tmp_path / f"cn{k}")
        nets.append(net.eval())
        paths.append(tmp_path / f"cn{k}")
    size, steps, seed = 64, 8, 5
    maps = [
        C.preprocess("canny", models.picture(size, size, seed=1), low=30, high=90),
        C.preprocess("softedge", models.picture(size, size, seed=2)),
    ]
    scales, starts, ends = [1.0, 0.6], [0.0, 0.25], [0.75, 1.0]
    pipe = sdengine.load_pipeline(folder, device="cpu")
    ours = pipe(
        "a cat",
        "blurry",
        steps=steps,
        sampler="dpmpp_2m",
        schedule="normal",
        cfg_scale=6.0,
        seed=seed,
        width=size,
        height=size,
        progress=False,
        controlnets=[(paths[k], maps[k], scales[k], starts[k], ends[k]) for k in range(2)],
    ).arrays
    ref = diffusers.StableDiffusionControlNetPipeline.from_pretrained(
        folder, controlnet=nets, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = models.diffusers_scheduler(folder, "dpmpp_2m")
    theirs = ref(
        "a cat",
        negative_prompt="blurry",
        num_inference_steps=steps,
        guidance_scale=6.0,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        height=size,
        width=size,
        image=maps,
        controlnet_conditioning_scale=scales,
        control_guidance_start=starts,
        control_guidance_end=ends,
    ).images
    assert float(np.abs(ours - theirs).mean()) < 1e-3
