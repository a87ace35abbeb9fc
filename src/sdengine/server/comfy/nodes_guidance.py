"""ComfyUI's guidance model patches that live outside the core node list: SelfAttentionGuidance; the pre- / post-CFG
functions of APG, TCFG, LatentApplyOperationCFG, CFGZeroStar, Mahiro, Epsilon Scaling and TemporalScoreRescaling;
RenormCFG's CFG function.

Self-attention guidance (Hong et al. 2023) is the engine's (:mod:`sdengine.diffusion.sag`,
:class:`sdengine.diffusion.guidance.CFGDenoiser` under the "comfyui" rule): the node only records its settings on the
MODEL handle, and the samplers (KSampler, KSamplerAdvanced, SamplerCustom) run it.

The CFG hooks (:mod:`sdengine.diffusion.cfg_hooks`) are appended to the MODEL handle's ``cfg_hooks`` in the order the
nodes are applied, as ComfyUI appends its functions; they run on U-Nets and on the flow models (SD3, Flux, ...), with
one plain positive and negative. The pre-CFG ones (APG, TCFG) run before the CFG whatever the order against the
others, as in ComfyUI; the post-CFG ones run after PerturbedAttentionGuidance and SelfAttentionGuidance, which are
therefore refused after them (a node error), and not with CFGNorm or SkipLayerGuidanceSD3 (an error at the sampler).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from sdengine.diffusion.cfg_hooks import CFGHook
from sdengine.diffusion.sag import MAX_SAG_BLUR_SIGMA
from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext, after_post_cfg_hooks


def self_attention_guidance(ctx: RunContext, model: ModelHandle, scale: float, blur_sigma: float) -> tuple[Any]:
    """ComfyUI's SelfAttentionGuidance: after CFG (and RescaleCFG), ``scale * (blurred - x0(degraded))`` where
    ``blurred`` is the unconditional x0 blurred (9 x 9, ``blur_sigma``) where the middle block's self-attention looks
    most and ``degraded`` that noised back; the unconditional pass runs at cfg 1 too."""
    scale, blur_sigma = float(scale), float(blur_sigma)
    after_post_cfg_hooks("SelfAttentionGuidance", model)
    if model.sag:
        # ComfyUI's second node replaces the first one's attention recorder, whose post-CFG function then fails
        raise NodeError("SelfAttentionGuidance: the model already has one; apply it once (set its scale there)")
    if not math.isfinite(blur_sigma) or blur_sigma <= 0.0:
        # ComfyUI's kernel divides by the sigma: 0 makes NaN there
        raise NodeError(f"SelfAttentionGuidance: blur_sigma must be above 0, got {blur_sigma:g}")
    if scale == 0.0:  # no term to add (ComfyUI adds 0 times it)
        return (model,)
    return (replace(model, sag=(scale, blur_sigma)),)


def _finite(node: str, **values: float) -> None:
    for name, v in values.items():
        if not math.isfinite(float(v)):
            raise NodeError(f"{node}: {name} must be a finite number, got {v!r}")


def _hooked(model: ModelHandle, hook: CFGHook) -> tuple[Any]:
    return (replace(model, cfg_hooks=(*model.cfg_hooks, hook)),)


def apg(ctx: RunContext, model: ModelHandle, eta: float, norm_threshold: float, momentum: float) -> tuple[Any]:
    """ComfyUI's APG (adaptive projected guidance, a pre-CFG function): the guidance ``cond - uncond`` (a running
    average with ``momentum``, reset when sigma rises; its norm capped at ``norm_threshold``) split along the
    conditional x0 and across it, the part along it times ``eta`` (sdengine.diffusion.cfg_hooks)."""
    _finite("APG", eta=eta, norm_threshold=norm_threshold, momentum=momentum)
    return _hooked(model, CFGHook("apg", (float(eta), float(norm_threshold), float(momentum))))


def tcfg(ctx: RunContext, model: ModelHandle) -> tuple[Any]:
    """ComfyUI's TCFG (tangential damping CFG, a pre-CFG function): the unconditional score projected on the first
    right singular vector of the two scores (sdengine.diffusion.cfg_hooks)."""
    return _hooked(model, CFGHook("tcfg"))


def cfg_zero_star(ctx: RunContext, model: ModelHandle) -> tuple[Any]:
    """ComfyUI's CFGZeroStar (a post-CFG function): the unconditional part rescaled by the optimised scale
    ``<x - cond, x - uncond> / |x - uncond|^2`` (sdengine.diffusion.cfg_hooks)."""
    return _hooked(model, CFGHook("cfg_zero_star"))


def mahiro(ctx: RunContext, model: ModelHandle) -> tuple[Any]:
    """ComfyUI's Mahiro (a post-CFG function): the guided x0 blended with ``cfg * cond`` by the similarity of the
    unconditional and merged predictions (sdengine.diffusion.cfg_hooks)."""
    return _hooked(model, CFGHook("mahiro"))


def epsilon_scaling(ctx: RunContext, model: ModelHandle, scaling_factor: float) -> tuple[Any]:
    """ComfyUI's Epsilon Scaling (a post-CFG function): the guided noise ``x - x0`` divided by ``scaling_factor``
    (sdengine.diffusion.cfg_hooks)."""
    _finite("Epsilon Scaling", scaling_factor=scaling_factor)
    return _hooked(model, CFGHook("epsilon_scaling", (float(scaling_factor),)))


def latent_apply_operation_cfg(ctx: RunContext, model: ModelHandle, operation: Any) -> tuple[Any]:
    """ComfyUI's LatentApplyOperationCFG (a pre-CFG function): the conditional x0 becomes ``op(cond - uncond) +
    uncond`` at every model call (sdengine.diffusion.cfg_hooks)."""
    if not callable(operation):
        raise NodeError(
            f"LatentApplyOperationCFG: operation must be a LATENT_OPERATION, got {type(operation).__name__}"
        )
    return _hooked(model, CFGHook("latent_op", (operation,)))


def temporal_score_rescaling(ctx: RunContext, model: ModelHandle, tsr_k: float, tsr_sigma: float) -> tuple[Any]:
    """ComfyUI's TemporalScoreRescaling (a post-CFG function): the guided x0 moved towards ``x / alpha`` by the
    rescaling ratio of the step's SNR (sdengine.diffusion.cfg_hooks)."""
    _finite("TemporalScoreRescaling", tsr_k=tsr_k, tsr_sigma=tsr_sigma)
    return _hooked(model, CFGHook("tsr", (float(tsr_k), float(tsr_sigma))))


def renorm_cfg(ctx: RunContext, model: ModelHandle, cfg_trunc: float, renorm_cfg: float) -> tuple[Any]:
    """ComfyUI's RenormCFG (Lumina 2's; a CFG function, in place of the CFG): below ``cfg_trunc`` (sigma) the CFG with
    its norm capped at ``renorm_cfg`` times the conditional x0's, from it up the conditional x0 alone. It replaces
    RescaleCFG's function and an earlier RenormCFG, as ComfyUI's one CFG function (sdengine.diffusion.cfg_hooks)."""
    _finite("RenormCFG", cfg_trunc=cfg_trunc, renorm_cfg=renorm_cfg)
    kept = tuple(h for h in model.cfg_hooks if h.kind != "renorm_cfg")
    hook = CFGHook("renorm_cfg", (float(cfg_trunc), float(renorm_cfg)))
    return (replace(model, cfg_rescale=0.0, cfg_hooks=(*kept, hook)),)


_PATCHED = ("patched_model",)

GUIDANCE_NODES: dict[str, NodeDef] = {
    "TemporalScoreRescaling": NodeDef(
        "TemporalScoreRescaling",
        "TSR - Temporal Score Rescaling",
        "model/patch/unet",
        (
            Input("model", "MODEL"),
            Input("tsr_k", "FLOAT", 0.95, 0.01, 100.0, 0.001),
            Input("tsr_sigma", "FLOAT", 1.0, 0.01, 100.0, 0.001),
        ),
        ("MODEL",),
        temporal_score_rescaling,
        output_names=("patched_model",),
        description="Temporal score rescaling as ComfyUI's post-CFG function: the guided x0 moved towards x / alpha "
        "by r = (snr v + 1) / (snr v / tsr_k + 1), v = tsr_sigma^2; U-Nets (snr = 1 / sigma^2) and flow models "
        "(snr = ((1 - sigma) / sigma)^2).",
    ),
    "RenormCFG": NodeDef(
        "RenormCFG",
        "RenormCFG",
        "advanced/model",
        (
            Input("model", "MODEL"),
            Input("cfg_trunc", "FLOAT", 100.0, 0.0, 100.0, 0.01),
            Input("renorm_cfg", "FLOAT", 1.0, 0.0, 100.0, 0.01),
        ),
        ("MODEL",),
        renorm_cfg,
        description="Lumina 2's renormalised CFG as ComfyUI's CFG function: below cfg_trunc (sigma) the CFG with its "
        "norm capped at renorm_cfg x the conditional x0's (0: no cap), from it up the conditional x0 alone; replaces "
        "RescaleCFG. A latent batch of one (ComfyUI's fails on more).",
    ),
    "LatentApplyOperationCFG": NodeDef(
        "LatentApplyOperationCFG",
        "LatentApplyOperationCFG",
        "latent/advanced/operations",
        (Input("model", "MODEL"), Input("operation", "LATENT_OPERATION")),
        ("MODEL",),
        latent_apply_operation_cfg,
        description="A latent operation on the guidance before CFG (ComfyUI's pre-CFG function): the conditional x0 "
        "becomes op(cond - uncond) + uncond. U-Nets and flow models; one plain positive and negative.",
    ),
    "CFGZeroStar": NodeDef(
        "CFGZeroStar",
        "CFGZeroStar",
        "advanced/guidance",
        (Input("model", "MODEL"),),
        ("MODEL",),
        cfg_zero_star,
        output_names=_PATCHED,
        description="CFG-Zero* as ComfyUI's post-CFG function: the unconditional x0 rescaled by the optimised scale "
        "of the two noise predictions. U-Nets and flow models; one plain positive and negative.",
    ),
    "APG": NodeDef(
        "APG",
        "Adaptive Projected Guidance",
        "sampling/custom_sampling",
        (
            Input("model", "MODEL"),
            Input("eta", "FLOAT", 1.0, -10.0, 10.0, 0.01),
            Input("norm_threshold", "FLOAT", 5.0, 0.0, 50.0, 0.1),
            Input("momentum", "FLOAT", 0.0, 0.0, 1.0, 0.01),
        ),
        ("MODEL",),
        apg,
        description="Adaptive projected guidance as ComfyUI's pre-CFG function: the guidance's norm capped, its part "
        "along the conditional x0 scaled by eta, a running average with momentum. U-Nets and flow models.",
    ),
    "TCFG": NodeDef(
        "TCFG",
        "Tangential Damping CFG",
        "advanced/guidance",
        (Input("model", "MODEL"),),
        ("MODEL",),
        tcfg,
        output_names=_PATCHED,
        description="Tangential damping CFG as ComfyUI's pre-CFG function: the unconditional score kept along the "
        "two scores' first singular direction only; nothing at cfg 1. U-Nets and flow models.",
    ),
    "Mahiro": NodeDef(
        "Mahiro",
        "Mahiro is so cute that she deserves a better guidance function!! (。・ω・。)",
        "_for_testing",
        (Input("model", "MODEL"),),
        ("MODEL",),
        mahiro,
        output_names=_PATCHED,
        description="Mahiro as ComfyUI's post-CFG function: the guided x0 steered towards cfg times the conditional "
        "one by their similarity. U-Nets and flow models.",
    ),
    "Epsilon Scaling": NodeDef(
        "Epsilon Scaling",
        "Epsilon Scaling",
        "model/patch/unet",
        (Input("model", "MODEL"), Input("scaling_factor", "FLOAT", 1.005, 0.5, 1.5, 0.001)),
        ("MODEL",),
        epsilon_scaling,
        description="Epsilon scaling (exposure bias) as ComfyUI's post-CFG function: the guided noise prediction "
        "divided by scaling_factor. U-Nets and flow models.",
    ),
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
