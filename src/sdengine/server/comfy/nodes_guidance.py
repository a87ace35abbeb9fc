"""ComfyUI's guidance model patches that live outside the core node list: SelfAttentionGuidance.

Self-attention guidance (Hong et al. 2023) is the engine's (:mod:`sdengine.diffusion.sag`,
:class:`sdengine.diffusion.guidance.CFGDenoiser` under the "comfyui" rule): the node only records its settings on the
MODEL handle, and the samplers (KSampler, KSamplerAdvanced, SamplerCustom) run it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from sdengine.diffusion.sag import MAX_SAG_BLUR_SIGMA
from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext


def self_attention_guidance(ctx: RunContext, model: ModelHandle, scale: float, blur_sigma: float) -> tuple[Any]:
    """ComfyUI's SelfAttentionGuidance: after CFG (and RescaleCFG), ``scale * (blurred - x0(degraded))`` where
    ``blurred`` is the unconditional x0 blurred (9 x 9, ``blur_sigma``) where the middle block's self-attention looks
    most and ``degraded`` that noised back; the unconditional pass runs at cfg 1 too."""
    scale, blur_sigma = float(scale), float(blur_sigma)
    if model.sag:
        # ComfyUI's second node replaces the first one's attention recorder, whose post-CFG function then fails
        raise NodeError("SelfAttentionGuidance: the model already has one; apply it once (set its scale there)")
    if not math.isfinite(blur_sigma) or blur_sigma <= 0.0:
        # ComfyUI's kernel divides by the sigma: 0 makes NaN there
        raise NodeError(f"SelfAttentionGuidance: blur_sigma must be above 0, got {blur_sigma:g}")
    if scale == 0.0:  # no term to add (ComfyUI adds 0 times it)
        return (model,)
    return (replace(model, sag=(scale, blur_sigma)),)


GUIDANCE_NODES: dict[str, NodeDef] = {
    "SelfAttentionGuidance": NodeDef(
        "SelfAttentionGuidance",
        "Self-Attention Guidance",
        "_for_testing",
        (
            Input("model", "MODEL"),
            Input("scale", "FLOAT", 0.5, -2.0, 5.0, 0.01),
            Input("blur_sigma", "FLOAT", 2.0, 0.0, MAX_SAG_BLUR_SIGMA, 0.1),
        ),
        ("MODEL",),
        self_attention_guidance,
        description="Self-attention guidance (Hong et al. 2023) as ComfyUI's: the unconditional x0 blurred where the "
        "middle block's self-attention looks most, one more U-Net pass on it, its difference added after CFG; skipped "
        "on a latent of a side 4 or less; not with area or mask conditioning. blur_sigma 0: a node error.",
    ),
}
