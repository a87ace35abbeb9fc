"""FLUX.2 [klein] through sdengine's ComfyUI nodes: ComfyUI's own klein graph (its ``image_flux2_klein`` templates:
UNETLoader, CLIPLoader type ``flux2``, VAELoader ``flux2-vae.safetensors``, CLIPTextEncode, EmptyFlux2LatentImage,
Flux2Scheduler, KSamplerSelect euler, RandomNoise, CFGGuider, SamplerCustomAdvanced, VAEDecode; klein edit with
VAEEncode + ReferenceLatent) on ComfyUI's three files written from a tiny random klein folder
(``tests/_flux2_models.py``, 128-wide heads, the release's 128 latent channels: a 32-channel VAE; Qwen2's tokenizer
in ComfyUI's ``qwen25_tokenizer`` layout beside the text encoder), held against sdengine's own FLUX.2 pipeline on the
same files.

The pipeline is ComfyUI's graph with no setting changed: Flux2Scheduler's list is the pipeline's ``normal`` grid
(diffusers' ``linspace(1, 1/n, n)`` shifted by the empirical ``mu``, then 0), its text states are diffusers' for a
prompt of up to 512 tokens (the template, layers 9 / 18 / 27, padded to 512 with every position attended), its
latent format is the VAE's normalised 2x2 patches and a reference's ids are diffusers'. The differences (a prompt over
512 tokens: kept whole there, cut here; KSampler's schedule: ComfyUI's ``mu`` 2.02) are their own tests."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux2_models import FILE_TRANSFORMER, FILE_VAE, make_klein_folder  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pixels, _run  # noqa: E402
from test_flux2_files import bfl_layout, comfy_vae_layout  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry low quality, watermark"
SEED, STEPS = 5, 4
SIDE = 64  # EmptyFlux2LatentImage 64: a 4 x 4 latent of 128 channels, 32 pixels out of the tiny 4x VAE (its 2x2
# patches: 8 pixels a latent pixel); the pipeline's 32 x 32 image has the same 16 image tokens
PIXELS = SIDE // 2
MODEL, TEXT, VAE = "flux-2-klein-4b-tiny.safetensors", "qwen_3_4b_tiny.safetensors", "flux2-vae.safetensors"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """ComfyUI's files of a tiny klein under models/ (the folder itself too: CheckpointLoaderSimple lists it), the VAE
    in vaes/; the pipeline loaded from the same three files."""
    root = tmp_path_factory.mktemp("comfy_flux2")
    models = root / "models"
    folder = make_klein_folder(
        models / "klein-folder",
        seed=3,
        distilled=True,
        transformer={**FILE_TRANSFORMER, "in_channels": 128},
        vae={**FILE_VAE, "latent_channels": 32},
    )
    (models / "diffusion_models").mkdir()
    (models / "text_encoders").mkdir()
    (root / "vaes").mkdir()
    net = load_file(next((folder / "transformer").glob("*.safetensors")))
    model = models / "diffusion_models" / MODEL
    save_file(bfl_layout(net, "model.diffusion_model."), model)
    text = models / "text_encoders" / TEXT
    te = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    save_file({k: v.contiguous() for k, v in te.items()}, text)
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = root / "vaes" / VAE
    save_file(comfy_vae_layout(load_file(next((folder / "vae").glob("*.safetensors")))), vae)
    pipe = sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae)
    return root, pipe, {"model": model, "text": text, "vae": vae, "te": te, "folder": folder}


def klein_graph(*, cfg: float = 1.0, negative: str = "", steps: int = STEPS, side: int = SIDE) -> dict:
    """ComfyUI's klein text-to-image template, API format."""
    return {
        "75": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "71": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT, "type": "flux2", "device": "default"}},
        "72": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "74": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["71", 0]}},
        "76": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["71", 0]}},
        "63": {"class_type": "CFGGuider",
               "inputs": {"model": ["75", 0], "positive": ["74", 0], "negative": ["76", 0], "cfg": cfg}},
        "66": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "62": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": side, "height": side}},
        "61": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "73": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "64": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["73", 0], "guider": ["63", 0],
               "sampler": ["61", 0], "sigmas": ["62", 0], "latent_image": ["66", 0]}},
        "65": {"class_type": "VAEDecode", "inputs": {"samples": ["64", 0], "vae": ["72", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["65", 0], "filename_prefix": "klein"}},
    }  # fmt: skip


def _image(pipe: Any, *, cfg: float = 1.0, negative: str = "", steps: int = STEPS, **kw: Any) -> np.ndarray:
    out = pipe(PROMPT, negative, steps=steps, seed=SEED, width=PIXELS, height=PIXELS, sampler="euler",
               schedule="normal", cfg_scale=cfg, progress=False, **kw)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_pipeline(klein):
    """The template's image is the pipeline's (no rule changed); its text states are the pipeline's (512 tokens,
    the padding's kept), Flux2Scheduler's sigmas the pipeline's grid."""
    from sdengine.diffusion.flow import flow_grid

    root, pipe, _ = klein
    out = _run(root, klein_graph())
    ours = _pixels(out["65"][0])
    assert ours.shape == (PIXELS, PIXELS, 3) and ours.std() > 0.01
    entry = out["74"][0][0]
    cond = pipe.conditioner.text(PROMPT)
    assert entry.cond["crossattn"].shape == (1, 512, 3 * 16) and "text_mask" not in entry.cond
    assert torch.allclose(entry.cond["crossattn"], cond["crossattn"].float(), atol=1e-6)
    sigmas = out["62"][0].values
    grid = flow_grid(pipe.flow_schedule(PIXELS, PIXELS, STEPS), STEPS, "normal").sigmas
    assert sigmas.shape == (STEPS + 1,) and float(sigmas[-1]) == 0.0
    assert torch.allclose(sigmas, grid.float(), atol=1e-6), (sigmas, grid)
    latent = out["64"][0]["samples"]
    assert latent.shape == (1, 128, SIDE // 16, SIDE // 16)
    theirs = _image(pipe)
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    # another step count is another image
    assert np.abs(_pixels(_run(root, klein_graph(steps=2))["65"][0]) - ours).max() > 1e-3
