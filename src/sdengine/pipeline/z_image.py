"""Z-Image (Tongyi-MAI's Z-Image / Z-Image-Turbo) behind sdengine's pipeline: a 6 B single-stream DiT
(:mod:`sdengine.models.z_image`), Qwen3-4B's text states, FLUX.1's 16-channel VAE.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (seeds, the sampling loop,
img2img, the VAE decode, infotext), through the hooks Flux uses (:class:`sdengine.pipeline.flux.FluxPipeline`, whose
flow schedule, img2img and inpainting rules and VAE handling this keeps). What Z-Image changes, as diffusers'
``ZImagePipeline`` / ``ZImageImg2ImgPipeline`` / ``ZImageInpaintPipeline`` run it:

* the conditioning (:class:`ZImageConditioner`): ``crossattn``, the text encoder's states of the prompt (Qwen3's
  chat template, ``hidden_states[-2]``, the real tokens only: :mod:`sdengine.text.z_image_prompt`), zero-padded to
  ``max_sequence_length`` (512) with ``text_mask`` marking the real ones. The transformer reads each row's real
  tokens only (its own padding to 32 is its pad token), so the zeros change nothing but let rows batch;
* the network's time and sign (:class:`ZImageAdapter`): it is called at ``(1000 - 1000 s) / 1000`` and its output
  negated into the flow's velocity;
* guidance (:class:`ZImageCFG`): diffusers' Z-Image runs CFG when its ``guidance_scale`` g is above 0, as
  ``pos + g (pos - neg)``. sdengine's ``cfg_scale`` keeps the usual meaning (ComfyUI's, A1111's): ``cfg_scale`` =
  1 + g, so ``cfg_scale`` 1 is one pass per step without the negative prompt (Turbo's guidance 0). diffusers'
  ``cfg_normalization`` (each image's guided prediction scaled down to at most that multiple of the conditional
  one's norm; ``True`` is 1) and ``cfg_truncation`` (no guidance at the steps whose ``1 - s`` is above it; 1, the
  default, never) are this pipeline's call keywords of the same names;
* the schedule: ``linspace(1, 1/n, n)`` shifted by the scheduler config (Turbo's static shift 3; a config with
  dynamic shifting takes diffusers' ``calculate_shift`` of the token count), the Euler sampler
  (FlowMatchEulerDiscreteScheduler).

Defaults (:attr:`ZImagePipeline.family_defaults`): Z-Image-Turbo's (9 steps, ``cfg_scale`` 1, ``euler`` on the
``normal`` grid). The base Z-Image model is run with more steps and CFG (diffusers' defaults: 50 steps, guidance 5,
i.e. ``cfg_scale`` 6). What does not apply is refused in one line before any model runs (IP-Adapters,
textual inversion, PAG, SAG, FreeU, ..., the distilled guidance, CFG++ samplers, prompt editing;
:func:`z_image_refusals`).

ControlNets (``controlnets=[ControlUnit(path, image, weight, start, end)]``, ``--control`` / ``--controlnet``, a
server job's ``controlnets``): alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union through
:mod:`sdengine.pipeline.dit_control` (:meth:`ZImagePipeline.controlled_network`), as diffusers'
``ZImageControlNetPipeline`` / ``ZImageControlNetInpaintPipeline`` (a unit's ``mask`` + ``inpaint_image``).

LoRAs (``loras=``, ``<lora:NAME:W>`` tags, ``--lora``) apply to the transformer through the core's path as Flux's
and Qwen-Image's do: :mod:`sdengine.weights.lora_dit_keys` reads diffusers' / PEFT names (``transformer.``),
ai-toolkit's (``diffusion_model.`` + diffusers' names), kohya-style ones (``lora_unet_``) and ComfyUI's original
layout (fused ``attention.qkv`` split by rows); a file with text-encoder layers, or another family's, is refused in
one line.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion.flow import FlowSchedule, flux_image_seq_len
from sdengine.errors import GenerationError
from sdengine.pipeline.flux import refusals
from sdengine.pipeline.qwen_image import MASK_KEY, QwenAdapter, QwenConditioner, QwenTextFlowPipeline
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning

TURBO_STEPS = 9  # Z-Image-Turbo's model card: 9 steps, guidance 0
TURBO_CFG = 1.0  # sdengine's cfg_scale of diffusers' guidance_scale 0
MAX_SEQUENCE_LENGTH = 512  # diffusers' ZImagePipeline max_sequence_length default
PATCH = 2

# texts -> (states (B, L, D), mask (B, L)): each row's real tokens first (Qwen3's hidden_states[-2])
TextEncode = Callable[[list[str]], tuple[Tensor, Tensor]]


class ZImageConditioner(QwenConditioner):
    """Z-Image's text side over ``encode`` (texts -> states and their mask); Qwen-Image's padding and caching
    (:class:`sdengine.pipeline.qwen_image.QwenConditioner`) with Z-Image's names."""

    kind = "z_image"
    family = "Z-Image"
    no_clip_name = "Z-Image (no CLIP)"
    encoder_name = "Qwen3"


class ZImageAdapter(QwenAdapter):
    """The conditioning dict -> the transformer's arguments (``crossattn`` -> the caption states, ``text_mask`` ->
    their mask), the flow's timestep ``1000 s`` -> the network's ``(1000 - 1000 s) / 1000``, its output negated
    into the velocity (float32), as diffusers' ``ZImagePipeline`` calls it (the rest is :class:`QwenAdapter`'s)."""

    family = "Z-Image"

    def velocity(self, x: Tensor, t: Tensor, text: Tensor, mask: Tensor | None, control: dict[str, Any]) -> Tensor:
        return -self.net(x, (1000 - t.float()) / 1000, text, mask, **control).float()


def z_image_cfg(cond: Tensor, uncond: Tensor, scale: float, normalization: float = 0.0) -> Tensor:
    """diffusers' Z-Image guidance on (B, ...) predictions: ``c + (scale - 1) (c - u)``; with ``normalization``
    above 0, each row whose result's norm exceeds ``normalization`` x the conditional row's norm is scaled down to
    it (norms over the whole row, float32)."""
    out = cond.float() + (float(scale) - 1.0) * (cond.float() - uncond.float())
    if normalization > 0:
        rows = []
        for c, o in zip(cond.float(), out, strict=True):
            limit = torch.linalg.vector_norm(c) * float(normalization)
            norm = torch.linalg.vector_norm(o)
            rows.append(o * (limit / norm) if norm > limit else o)
        out = torch.stack(rows)
    return out


class ZImageCFG:
    """A velocity model ``(x, t, **cond) -> v`` running the conditional and unconditional rows in one batch and
    combining them with :func:`z_image_cfg`; ``scale`` 1, or a step whose ``(1000 - t) / 1000`` is above
    ``truncation``: the conditional rows alone."""

    def __init__(
        self, model: Any, scale: float, uncond: Conditioning, normalization: float = 0.0, truncation: float = 1.0
    ) -> None:
        self.model = model
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.normalization = float(normalization)
        self.truncation = float(truncation)
        self.takes_step = bool(getattr(model, "takes_step", False))
        self.takes_row_kinds = bool(getattr(model, "takes_row_kinds", False))

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        t_norm = float((1000 - t.float().reshape(-1)[0]) / 1000)
        if self.scale == 1.0 or (self.truncation <= 1 and t_norm > self.truncation):
            if self.takes_row_kinds:
                cond = {**cond, "row_kinds": ("cond",) * x.shape[0]}
            return self.model(x, t, **cond)
        b = x.shape[0]
        both: dict[str, Any] = {}
        if self.takes_row_kinds:  # the conditional rows, then the unconditional ones
            cond = {**cond, "row_kinds": ("cond",) * b + ("uncond",) * b}
        for k, v in cond.items():
            if isinstance(v, Tensor) and k in self.uncond:
                u = self.uncond[k].to(v.device)
                both[k] = torch.cat([v, u.expand(b, *u.shape[1:]) if u.shape[0] == 1 else u])
            else:
                both[k] = v
        v_c, v_u = self.model(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
        return z_image_cfg(v_c, v_u, self.scale, self.normalization)


# ----------------------------------------------------------------------------------------------------------
# Refusals


_OWN_REFUSALS: tuple[tuple[str, Any, str], ...] = (
    ("ip_adapters", bool, "IP-Adapters are not supported for Z-Image"),
    ("reference_images", bool, "reference images are FLUX.1 Kontext's; Z-Image takes none"),
    (
        "distilled_cfg_scale",
        lambda v: v is not None,
        "distilled_cfg_scale (--guidance) is FLUX.1 [dev]'s; use cfg_scale",
    ),
    ("guidance_rescale", bool, "guidance_rescale does not apply to Z-Image's CFG"),
)


def z_image_refusals(r: GenerationRequest) -> list[str]:
    """The settings of ``r`` a Z-Image model cannot run, one line each (Flux's, plus Z-Image's own); needs no loaded
    model."""
    reasons = [why.replace("for Flux", "for Z-Image").replace("Flux", "Z-Image") for why in refusals(r)]
    reasons += [f"{field}: {why}" for field, is_set, why in _OWN_REFUSALS if is_set(getattr(r, field, None))]
    return list(dict.fromkeys(reasons))


def cfg_options(normalization: Any, truncation: Any) -> tuple[float, float]:
    """diffusers' ``cfg_normalization`` (False / True / a factor >= 0; True is 1) and ``cfg_truncation`` (a number in
    [0, 1] applies; above 1 never truncates) as numbers, one line for a bad value."""
    if isinstance(normalization, bool):
        norm = 1.0 if normalization else 0.0
    elif isinstance(normalization, int | float) and math.isfinite(normalization) and normalization >= 0:
        norm = float(normalization)
    else:
        raise GenerationError(f"cfg_normalization must be true/false or a number >= 0, got {normalization!r}")
    if isinstance(truncation, bool) or not isinstance(truncation, int | float) or not math.isfinite(truncation):
        raise GenerationError(f"cfg_truncation must be a number, got {truncation!r}")
    if truncation < 0:
        raise GenerationError(f"cfg_truncation must be >= 0 (1: never truncate), got {truncation!r}")
    return norm, float(truncation)


# ----------------------------------------------------------------------------------------------------------
# The pipeline


class ZImagePipeline(QwenTextFlowPipeline):
    """Z-Image / Z-Image-Turbo. Build it with :func:`sdengine.pipeline.load_pipeline` on a diffusers
    ``ZImagePipeline`` folder (:mod:`sdengine.pipeline.z_image_loading`)."""

    family_label = "Z-Image"
    conditioner_class = ZImageConditioner
    text_width_field = "cap_feat_dim"
    latent_field = "in_channels"
    vae_hint = " (Z-Image's is FLUX.1's ae.safetensors)"

    def __init__(self, **kwargs: Any) -> None:
        self._call_cfg = (0.0, 1.0)  # a call's (cfg_normalization, cfg_truncation)
        super().__init__(**kwargs)

    # -- the model family's hooks ---------------------------------------------------------------------------

    def flow_schedule(self, width: int, height: int) -> FlowSchedule:
        """The scheduler config's shift (static for Turbo; a dynamic one from the token count), the `normal` grid
        spaced as diffusers' Z-Image pipelines space it (``linspace(1, 1/n, n)``), the config's 1000-entry table."""
        f = self.vae_scale_factor
        tokens = flux_image_seq_len(height // f, width // f, PATCH)
        try:
            schedule = FlowSchedule.from_config(self.scheduler_config, image_seq_len=tokens)
        except Exception as e:  # a UsageError naming the option
            raise GenerationError(f"{self.name}: scheduler config: {e}") from None
        return dataclasses.replace(schedule, spacing="flux")

    def network_adapter(self, net: Any) -> ZImageAdapter:  # type: ignore[override]
        return ZImageAdapter(net, self.dtype)

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        """Z-Image ControlNets on the transformer (:func:`sdengine.pipeline.dit_control.build_controlled_dit`)."""
        from sdengine.pipeline.dit_control import build_controlled_dit, vae_encoder

        return build_controlled_dit(net, units, family="z_image", **vae_encoder(self.vae), **kw)

    def family_refusals(self, r: GenerationRequest) -> list[str]:
        return z_image_refusals(r)

    def cfg_model(self, net: Any, cfg_scale: float, uncond: Conditioning) -> Any:
        normalization, truncation = self._call_cfg
        return ZImageCFG(net, cfg_scale, uncond, normalization, truncation)

    @property
    def variant(self) -> str:
        return "z_image"

    @property
    def family_defaults(self) -> dict[str, Any]:
        """Z-Image-Turbo's: 9 steps, no CFG (``cfg_scale`` 1: diffusers' guidance 0), Euler."""
        return {"steps": TURBO_STEPS, "cfg_scale": TURBO_CFG, "sampler": "euler", "schedule": "normal"}

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.transformer.config
        n = (h // PATCH) * (w // PATCH) + int(self.conditioner.max_sequence_length)  # type: ignore[attr-defined]
        scores = min(CHUNK_SCORES, int(cfg.n_heads) * n * n) * 4
        return 2 * rows * (n * int(cfg.dim) * bytes_per * 12 + scores)  # the conditional and unconditional rows

    # -- a call ---------------------------------------------------------------------------------------------

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        normalization, truncation = self._call_cfg
        out: dict[str, Any] = {}
        if normalization > 0:
            out["CFG normalization"] = normalization
        if truncation < 1:
            out["CFG truncation"] = truncation
        return out

    def __call__(
        self,
        prompt: Any = "",
        negative_prompt: Any = None,
        *,
        cfg_normalization: Any = False,
        cfg_truncation: Any = 1.0,
        **kwargs: Any,
    ) -> Any:
        """As :meth:`FluxPipeline.__call__` with Z-Image's defaults; ``cfg_normalization`` / ``cfg_truncation``:
        diffusers' options of the same names (module docstring)."""
        previous = self._call_cfg
        self._call_cfg = cfg_options(cfg_normalization, cfg_truncation)
        try:
            return super().__call__(prompt, negative_prompt, **kwargs)
        finally:
            self._call_cfg = previous


__all__ = [
    "MASK_KEY",
    "MAX_SEQUENCE_LENGTH",
    "TURBO_CFG",
    "TURBO_STEPS",
    "ZImageAdapter",
    "ZImageCFG",
    "ZImageConditioner",
    "ZImagePipeline",
    "cfg_options",
    "z_image_cfg",
    "z_image_refusals",
]
