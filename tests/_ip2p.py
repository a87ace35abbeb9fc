"""Shared by the InstructPix2Pix tests (SD's 8-channel U-Net, SDXL's, the EDM CosXL Edit model): a run's settings,
the pixel difference, and ComfyUI's InstructPixToPixConditioning + KSampler path (sdengine.latent_sampling) held
against the pipeline at image_cfg_scale 1 (the three-way formula at 1 is plain CFG)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

SIZE, STEPS, SEED = 32, 5, 3
PROMPT, NEGATIVE = "make it red", "blurry"


def mad(a: Any, b: Any) -> float:
    """The mean absolute difference of two arrays of the same shape (float64)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).mean())


def run_ip2p(pipe: Any, image: Any, negative: str = NEGATIVE, **kw: Any) -> Any:
    """The pipeline on ``image`` with the tests' settings (euler, normal, SEED, STEPS, SIZE) unless ``kw`` says."""
    args: dict[str, Any] = dict(
        init_image=image, steps=STEPS, sampler="euler", schedule="normal", seed=SEED, width=SIZE, height=SIZE
    )
    args.update(kw)
    return pipe(PROMPT, negative, progress=False, **args)


def comfy_conditioning(pipe: Any, image: Any, prompt: str = PROMPT, negative: str = NEGATIVE) -> tuple[Any, Any, Any]:
    """ComfyUI's InstructPixToPixConditioning on ``pipe``'s encodings of the prompts: (positive, negative, latent)."""
    from sdengine.latent_sampling import encode_text
    from sdengine.server.comfy.nodes import RunContext, VaeHandle, image_to_tensor
    from sdengine.server.comfy.nodes_edit import instruct_pix_to_pix_conditioning

    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    pos, neg = [encode_text(pipe, prompt)], [encode_text(pipe, negative)]
    return instruct_pix_to_pix_conditioning(ctx, pos, neg, VaeHandle("m"), image_to_tensor(image))


def comfy_and_pipeline_latents(
    pipe: Any,
    image: Any,
    *,
    cfg: float,
    schedule: str,
    prompt: str = PROMPT,
    negative: str = NEGATIVE,
    seed: int = SEED,
    steps: int = STEPS,
    size: int = SIZE,
) -> tuple[torch.Tensor, torch.Tensor, tuple[Any, Any, Any]]:
    """ComfyUI's sampled latent (euler, the sdengine seed rule), the pipeline's at image_cfg_scale 1 with the same
    settings, and the node's (positive, negative, latent)."""
    from sdengine.latent_sampling import sample_latents
    from sdengine.pipeline.request import GenerationRequest

    pos, neg, latent = comfy_conditioning(pipe, image, prompt, negative)
    z = sample_latents(pipe, pos, neg, latent["samples"], seed=seed, steps=steps, cfg=cfg, sampler="euler",
                       schedule=schedule, seed_rule="sdengine")  # fmt: skip
    kw = dict(steps=steps, sampler="euler", schedule=schedule, cfg_scale=cfg, seed=seed, width=size, height=size)
    r = GenerationRequest(prompt, negative, init_image=image, image_cfg_scale=1.0, progress=False, **kw)
    return z, pipe.sample_latents(pipe.prepare(r)), (pos, neg, latent)
