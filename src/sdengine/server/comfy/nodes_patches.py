"""ComfyUI's model patch nodes that change how the U-Net runs between its blocks: ``PatchModelAddDownscale`` (kohya-ss's
Deep Shrink, ComfyUI's ``comfy_extras/nodes_model_downscale.py``), written here from that description; and
``DifferentialDiffusion`` (Levin & Fried 2023, ComfyUI's ``comfy_extras/nodes_differential_diffusion.py``), which
changes how a LATENT's noise mask is applied at each model call
(:class:`sdengine.pipeline.latents.DifferentialMask`).

A MODEL is sdengine's :class:`sdengine.server.comfy.nodes.ModelHandle`: a patch node returns the handle with its
settings recorded, and the samplers apply them while they run (:func:`sdengine.latent_sampling.sample_latents`).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from sdengine.errors import SdengineError
from sdengine.nn.deep_shrink import (
    DEEP_SHRINK_METHODS,
    MAX_DEEP_SHRINK_BLOCK,
    MAX_DEEP_SHRINK_CHAIN,
    MAX_DEEP_SHRINK_FACTOR,
    MIN_DEEP_SHRINK_FACTOR,
    DeepShrink,
)
from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext


def patch_model_add_downscale(
    ctx: RunContext,
    model: ModelHandle,
    block_number: int,
    downscale_factor: float,
    start_percent: float,
    end_percent: float,
    downscale_after_skip: bool,
    downscale_method: str,
    upscale_method: str,
) -> tuple[Any]:
    """ComfyUI's PatchModelAddDownscale: input block ``block_number``'s output divided by ``downscale_factor`` in the
    model calls whose sigma lies between the percents' sigmas, resized back where the up blocks meet a full-size
    skip (:mod:`sdengine.nn.deep_shrink`). Chained nodes stack in order, as ComfyUI's patch lists do (a chain:
    :func:`sdengine.nn.deep_shrink.deep_shrink_chain`)."""
    try:
        settings = DeepShrink(
            block_number,
            downscale_factor,
            start_percent,
            end_percent,
            downscale_after_skip,
            downscale_method,
            upscale_method,
        )
    except SdengineError as e:
        raise NodeError(str(e)) from None
    if len(model.deep_shrink) >= MAX_DEEP_SHRINK_CHAIN:
        raise NodeError(f"at most {MAX_DEEP_SHRINK_CHAIN} chained PatchModelAddDownscale nodes")
    return (replace(model, deep_shrink=(*model.deep_shrink, settings.key)),)


def differential_diffusion(ctx: RunContext, model: ModelHandle, strength: float = 1.0) -> tuple[Any]:
    """ComfyUI's DifferentialDiffusion: the sampler reads a LATENT's noise mask as grey levels, each model call
    repainting where the mask is at or above a threshold that falls from 1 to 0 over the run (ComfyUI's model
    timestep space); ``strength`` below 1 blends that binary mask with the grey one (0 counts as 1, as ComfyUI's
    ``if strength and strength < 1``). Without a noise mask it changes nothing, as there."""
    s = float(strength)
    if not 0.0 <= s <= 1.0:
        raise NodeError(f"DifferentialDiffusion strength must be in [0, 1], got {strength!r}")
    return (replace(model, differential=s),)


PATCH_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "PatchModelAddDownscale",
            "PatchModelAddDownscale (Kohya Deep Shrink)",
            "model_patches/unet",
            (
                Input("model", "MODEL"),
                Input("block_number", "INT", 3, 1, MAX_DEEP_SHRINK_BLOCK, 1),
                Input("downscale_factor", "FLOAT", 2.0, MIN_DEEP_SHRINK_FACTOR, MAX_DEEP_SHRINK_FACTOR, 0.001),
                Input("start_percent", "FLOAT", 0.0, 0.0, 1.0, 0.001),
                Input("end_percent", "FLOAT", 0.35, 0.0, 1.0, 0.001),
                Input("downscale_after_skip", "BOOLEAN", True),
                Input("downscale_method", "COMBO", DEEP_SHRINK_METHODS[0], choices=DEEP_SHRINK_METHODS),
                Input("upscale_method", "COMBO", DEEP_SHRINK_METHODS[0], choices=DEEP_SHRINK_METHODS),
            ),
            ("MODEL",),
            patch_model_add_downscale,
            description="Kohya's Deep Shrink: the U-Net's hidden state after input block block_number (3: the first "
            "downsample) divided by downscale_factor while the sampling is between start_percent and end_percent, "
            "resized back where it meets a full-size skip; for images larger than the model's training size.",
        ),
        NodeDef(
            "DifferentialDiffusion",
            "Differential Diffusion",
            "_for_testing",
            (Input("model", "MODEL"), Input("strength", "FLOAT", 1.0, 0.0, 1.0, 0.01, optional=True)),
            ("MODEL",),
            differential_diffusion,
            description="Soft inpainting (Levin & Fried 2023): a LATENT's noise mask read as grey levels, a pixel of "
            "level g changing during about the last g of the steps (at each model call the region repainted is where "
            "the mask is at or above a threshold falling from 1 to 0 in the model's timestep); strength below 1 "
            "blends that binary mask with the grey one. SD 1.x / SDXL and the flow families (SD3, Flux); without a "
            "noise mask it changes nothing.",
        ),
    )
}

__all__ = ["PATCH_NODES", "differential_diffusion", "patch_model_add_downscale"]
