"""FLUX.1 Fill, Depth and Canny through sdengine's ComfyUI nodes: InpaintModelConditioning (Fill: the masked image
and the mask beside the noisy latent) and InstructPixToPixConditioning (Depth / Canny: the control image's latent)
on tiny random BFL transformer files, held against the Python pipeline (pipeline/flux_fill.py) on the same files.

Where the definitions differ the test follows ComfyUI's and writes the difference out: ComfyUI encodes with the VAE
posterior's mode where diffusers (and the pipeline) draw a sample, so the pipeline runs here with its posterior
draws replaced by the mode (``posterior_rows`` patched: no draw, so its noise is the row generator's first draw,
the noise of ComfyUI's seed rule for one image); ComfyUI's noise_mask (true by default) keeps the unmasked latent
(KSamplerX0Inpaint), which FluxFillPipeline does not: the parity runs with noise_mask false, and noise_mask true is
checked to give the original latent outside the mask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _pipeline_models import mask_picture, picture  # noqa: E402
from sdengine.server.comfy.nodes import NodeError  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import flux_concat  # noqa: E402
from test_comfy_sd3_flux import (  # noqa: E402, F401
    PROMPT,
    TOL,
    _clip_file,
    _ldm_vae,
    _node_error,
    _pixels,
    _run,
    _save,
    flux,
    flux_graph,
    ksampler_node,
    save_comfy_files,
)

SEED, STEPS = 5, 3
W, H = 48, 32  # the tiny VAE is 2x: a 24 x 16 latent, 12 x 8 = 96 tokens (ModelSamplingFlux's 192 x 128)


def _files(root: Path, kind: str, seed: int) -> Any:

    folder = make_flux_folder(root / f"flux-{kind}", kind=kind, seed=seed)
    save_comfy_files(folder, root, f"unet/flux1-{kind}.safetensors")
    (root / "in").mkdir(exist_ok=True)
    picture(W, H).save(root / "in" / "init.png")
    mask_picture(W, H).convert("RGB").save(root / "in" / "mask.png")
    picture(W, H, seed=3).save(root / "in" / "control.png")
    return root, sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("comfy_fill"), "fill", 5)


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    return _files(tmp_path_factory.mktemp("comfy_depth"), "control", 6)


def _graph(kind: str, guidance: float, noise_mask: bool = False, cfg: float = 1.0) -> dict:
    """test_comfy_sd3_flux's Flux graph on the ``kind`` transformer, sampling from ``kind``'s conditioning node
    "22" (its latent too) on the LoadImage "20" (and, Fill, the LoadImageMask "21")."""
    g: dict[str, Any] = flux_graph(guidance)
    del g["7"]  # the latent is the conditioning node's
    g["1"]["inputs"]["unet_name"] = f"flux1-{kind}.safetensors"
    g["6"]["inputs"].update(width=4 * W, height=4 * H)
    g["8"] = ksampler_node(["6", 0], ["22", 0], ["22", 1], ["22", 2], cfg=cfg, steps=STEPS)
    g["11"] = {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}}
    g["20"] = {"class_type": "LoadImage", "inputs": {"image": "control.png" if kind == "control" else "init.png"}}
    common = {"positive": ["4", 0], "negative": ["5", 0], "vae": ["9", 0], "pixels": ["20", 0]}
    if kind == "fill":
        g["21"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
        inputs = {**common, "mask": ["21", 0], "noise_mask": noise_mask}
        g["22"] = {"class_type": "InpaintModelConditioning", "inputs": inputs}
    else:
        g["22"] = {"class_type": "InstructPixToPixConditioning", "inputs": common}
    return g


def _mode_instead_of_a_sample(monkeypatch) -> None:
    """The pipeline's VAE posterior draws replaced by the posterior's mode (ComfyUI's encoding), drawing nothing."""
    import sdengine.pipeline.latents as latents

    monkeypatch.setattr(latents, "posterior_rows", lambda post, generators: post.mean)


def _pipeline(pipe: Any, **kw: Any) -> np.ndarray:
    args: dict[str, Any] = dict(steps=STEPS, seed=SEED, width=W, height=H, sampler="euler", schedule="simple")
    return pipe(PROMPT, cfg_scale=1.0, progress=False, **args, **kw).arrays[0].astype(np.float64)


def test_fill_workflow_equals_the_pipeline_with_the_vae_mode(fill, monkeypatch):
    root, pipe = fill
    out = _run(root, _graph("fill", 30.0))
    ours = _pixels(out["10"][0])
    _mode_instead_of_a_sample(monkeypatch)
    theirs = _pipeline(pipe, init_image=picture(W, H), mask=mask_picture(W, H))  # Fill's guidance 30 by default
    assert ours.shape == theirs.shape == (H, W, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01
    c = out["22"][0][0].cond
    assert c["concat_latent_image"].shape == (1, 16, H // 2, W // 2) and c["concat_mask"].shape == (1, 1, H, W)
    other = _pixels(_run(root, _graph("fill", 3.5))["10"][0])  # the guidance reaches the transformer
    assert np.abs(other - _pipeline(pipe, init_image=picture(W, H), mask=mask_picture(W, H),
                                    distilled_cfg_scale=3.5)).max() < TOL  # fmt: skip
    assert np.abs(other - ours).max() > 1e-3


def test_fill_noise_mask_keeps_the_original_latent_outside_the_mask(fill):
    """noise_mask true (ComfyUI's default): KSamplerX0Inpaint; the sampled latent outside the mask is the image's
    own (VAEEncode's raw mode), inside the model's; cfg above 1 runs the negative with the same image and mask."""
    root, _ = fill
    out = _run(root, _graph("fill", 30.0, noise_mask=True, cfg=2.0))
    sampled, start = out["8"][0]["samples"], out["22"][2]["samples"]
    keep = out["22"][2]["noise_mask"]
    latent_mask = torch.nn.functional.interpolate(keep, size=sampled.shape[-2:], mode="bilinear")[0, 0]
    outside, inside = latent_mask == 0, latent_mask == 1
    assert bool(outside.any()) and bool(inside.any())
    assert torch.allclose(sampled[0][:, outside], start[0][:, outside], atol=1e-5)
    assert (sampled[0][:, inside] - start[0][:, inside]).abs().max() > 1e-2
    assert np.isfinite(_pixels(out["10"][0])).all()


def test_depth_canny_workflow_equals_the_pipeline_with_the_vae_mode(control, monkeypatch):
    root, pipe = control
    out = _run(root, _graph("control", 3.5))
    ours = _pixels(out["10"][0])
    assert out["22"][2]["samples"].abs().max() == 0  # an empty latent of the image's size, as ComfyUI's node
    _mode_instead_of_a_sample(monkeypatch)
    theirs = _pipeline(pipe, control_image=picture(W, H, seed=3))
    assert ours.shape == theirs.shape == (H, W, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01


def test_flux_concat_folds_the_mask_as_comfyui():
    """ComfyUI's Flux.concat_cond written out: the image scaled in ((z - 0.1159) * 0.3611, zeros too), the mask's
    channels averaged and folded f x f per latent pixel, channel f * dy + dx; the latent's noise mask, else ones,
    where the conditioning carries none."""
    image = torch.randn(1, 16, 2, 3)
    mask = torch.zeros(1, 1, 16, 24)
    mask[0, 0, 8 + 3, 16 + 5] = 1.0  # latent pixel (1, 2), dy 3, dx 5
    out = flux_concat({"concat_latent_image": image, "concat_mask": mask}, "fill", 8, (2, 16, 2, 3), None)
    assert out.shape == (2, 16 + 64, 2, 3)
    assert torch.allclose(out[:, :16], (image - 0.1159) * 0.3611)
    assert out[0, 16 + 8 * 3 + 5, 1, 2] == 1.0 and out[:, 16:].sum() == 2.0
    empty = flux_concat({}, "fill", 2, (1, 16, 2, 2), None)
    assert torch.allclose(empty[:, :16], torch.full((1, 16, 2, 2), -0.1159 * 0.3611)) and empty[:, 16:].min() == 1
    by_noise_mask = flux_concat({}, "fill", 2, (1, 16, 2, 2), torch.zeros(1, 1, 4, 4))
    assert by_noise_mask[:, 16:].abs().max() == 0
    assert flux_concat({"concat": image}, "control", 0, (1, 16, 2, 3), None).shape == (1, 16, 2, 3)
    with pytest.raises(NodeError, match="FLUX.1 Fill / Depth / Canny read a 16-channel one"):
        flux_concat({"concat_latent_image": torch.zeros(1, 4, 2, 3)}, "fill", 8, (1, 16, 2, 3), None)
    with pytest.raises(NodeError, match="the image latent: a batch of 2 for a latent batch of 3"):
        flux_concat({"concat": torch.zeros(2, 16, 2, 3)}, "control", 0, (3, 16, 2, 3), None)


def test_inpaint_model_conditioning_refusals(fill):
    root, _ = fill
    g = _graph("fill", 30.0)
    g["23"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["20", 0], "amount": 2}}
    g["24"] = {"class_type": "ImageToMask", "inputs": {"image": ["23", 0], "channel": "red"}}
    g["25"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["20", 0], "amount": 3}}
    g["22"]["inputs"].update(mask=["24", 0], pixels=["25", 0])
    assert "InpaintModelConditioning: a batch of 2 masks for 3 images" in _node_error(root, g)


def test_flux_concat_resizes_about_the_centre():
    """An image latent of another size: cut to the latent's aspect about its centre, then bilinear (ComfyUI's
    common_upscale "center"); a mask likewise to the factor x the latent."""
    image = torch.zeros(1, 16, 2, 4)
    image[:, :, :, 1:3] = 1.0  # the middle half: what a 2 x 4 latent keeps for a 2 x 2 one
    out = flux_concat({"concat": image}, "control", 0, (1, 16, 2, 2), None)
    assert torch.allclose(out, torch.full((1, 16, 2, 2), (1.0 - 0.1159) * 0.3611))
    mask = torch.ones(1, 8, 8)
    out = flux_concat({"concat": torch.zeros(1, 16, 2, 2), "concat_mask": mask}, "fill", 2, (1, 16, 2, 2), None)
    assert out.shape == (1, 20, 2, 2) and out[:, 16:].min() == 1.0


def test_inpaint_model_conditioning_on_a_plain_flux_model_is_its_noise_mask(flux):  # noqa: F811
    """On FLUX.1 [dev] (64 numbers in per token) the conditionings' image and mask are left out, as ComfyUI's
    concat_cond leaves them: the same image as VAEEncode + SetLatentNoiseMask of the same picture and mask."""
    root, _ = flux
    (root / "in").mkdir(exist_ok=True)
    picture(W, H).save(root / "in" / "init.png")
    mask_picture(W, H).convert("RGB").save(root / "in" / "mask.png")
    g = flux_graph()
    g["20"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    g["21"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
    g["22"] = {
        "class_type": "InpaintModelConditioning",
        "inputs": {"positive": ["4", 0], "negative": ["5", 0], "vae": ["9", 0], "pixels": ["20", 0], "mask": ["21", 0]},
    }
    g["22"]["inputs"]["noise_mask"] = True
    g["8"]["inputs"].update(positive=["22", 0], negative=["22", 1], latent_image=["22", 2])
    ours = _pixels(_run(root, g)["10"][0])
    h = flux_graph()
    h["20"], h["21"] = g["20"], g["21"]
    h["23"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["9", 0]}}
    h["24"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["23", 0], "mask": ["21", 0]}}
    h["8"]["inputs"]["latent_image"] = ["24", 0]
    theirs = _pixels(_run(root, h)["10"][0])
    assert ours.shape == (H, W, 3) and np.abs(ours - theirs).max() < TOL
