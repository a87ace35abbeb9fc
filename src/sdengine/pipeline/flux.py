"""FLUX.1 [dev] and [schnell] behind the same pipeline: a rectified-flow transformer, T5 + CLIP-L, a 16-channel VAE.

Black Forest Labs' FLUX.1 (2024) is a rectified flow (Liu et al. 2023; Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis") in a 16-channel latent; [dev] is guidance-distilled (Meng et al.
2023, "On Distillation of Guided Diffusion Models"), [schnell] timestep-distilled for 1-4 steps (latent adversarial
diffusion distillation, Sauer et al. 2024). The network is :mod:`sdengine.models.flux`.

Everything after the conditioning dict is :class:`sdengine.pipeline.core.Pipeline`'s (seeds, samplers, img2img,
VAE decode with its fp32 fall-back, infotext); what Flux changes goes through the core's model-family hooks:

* the conditioning: :class:`sdengine.text.flux_conditioner.FluxConditioner` (T5's states as ``crossattn``,
  CLIP-L's pooled output as ``vector``, the distilled guidance scale as ``guidance`` for [dev]; prompt editing's
  texts each with the call's guidance, the positive ones with FLUX.1 Redux's image tokens);
* the network's arguments: :class:`FluxAdapter` (``crossattn`` -> ``encoder_hidden_states``, ``vector`` ->
  ``pooled_projections``, ``guidance`` -> ``guidance``);
* the denoiser and schedule: the flow's (:mod:`sdengine.diffusion.flow`, ``x0 = x - s v``), with the grid
  diffusers' ``FluxPipeline`` hands its scheduler, ``sigmas = linspace(1, 1/n, n)``, time-shifted: [dev] by
  its resolution-dependent ``mu`` (diffusers' ``calculate_shift``: linear in the image token count
  ``(H/16)(W/16)``, 0.5 at 256 tokens and 1.15 at 4096, the scheduler config's ``base_shift``, ``max_shift``,
  ``base_image_seq_len``, ``max_image_seq_len``), [schnell] not at all (its config has no dynamic shifting and
  shift 1); ``s' = e^mu / (e^mu + 1/s - 1)``;
* img2img: the flow start ``s x_noise + (1 - s) x_init`` at the first step ``int(n - min(n * strength, n))``
  (diffusers' ``FluxImg2ImgPipeline``); the init latent is the VAE posterior's sample, shifted and scaled
  (``(z - 0.1159) * 0.3611`` for Flux.1's VAE); inpainting (a mask on the plain model) puts the known region back
  on the same path before every step (``FluxInpaintPipeline``).

Flux's defaults (:attr:`FluxPipeline.family_defaults`) differ from SD's: ``cfg_scale`` 1 (one pass per step,
no negative prompt: Flux has no real CFG; above 1 with a negative prompt it is diffusers' ``true_cfg_scale``),
the ``euler`` sampler on the ``normal`` grid (diffusers' FlowMatchEulerDiscreteScheduler), 28 steps for [dev]
and 4 for [schnell] (the step counts of diffusers' examples), the distilled guidance 3.5 for [dev]
(``distilled_cfg_scale``; infotext "Distilled CFG Scale", Forge's name). Sizes are multiples of 16 (the VAE's 8
x the 2x2 patches).

What does not apply to Flux is refused before any model runs (:meth:`FluxPipeline.prepare`): U-Net ControlNets,
T2I-Adapters, SD / SDXL IP-Adapters (:func:`sdengine.nn.ip_adapter.check_family`) and their sigma windows,
textual-inversion embeddings, PAG, SAG, FreeU, Deep Shrink, HyperTile, tiled diffusion, InstructPix2Pix's image
guidance, SDXL settings, clip skip, SD3's shift, a hires pass on another model.
The hires fix runs as for SD, its second pass starting as Flux's img2img does. LoRAs
(``loras=``, ``<lora:...>`` tags) apply through the core's path (:mod:`sdengine.weights.lora_dit_keys` reads
their names). Flux ControlNets (the Union ones
too) run through :mod:`sdengine.pipeline.dit_control` (:meth:`FluxPipeline.controlled_network`).

IP-Adapters made for FLUX.1 (XLabs' ``flux-ip-adapter``, ``ip_adapters=`` units as for SD) run through the core's
path: their image tokens ride in the conditioning as ``ip_tokens`` (the unconditional rows of true CFG get a black
picture's, diffusers' default ``negative_ip_adapter_image``) and :class:`sdengine.nn.ip_adapter.IPAdapterNet` sets
the transformer's double blocks' image attention for each call (:class:`sdengine.models.flux.DoubleStreamBlock`).

FLUX.1 Kontext's reference images (``reference_images``) are read and fitted by :mod:`sdengine.pipeline.flux_kontext`
in :meth:`FluxPipeline.prepare` (the output takes the first one's size where the call gives none), encoded once per
call (:meth:`FluxPipeline._call_settings`) and handed to the transformer by :class:`FluxAdapter` at every call; the
transformer then runs as it is (:meth:`FluxPipeline.graphed`: no step graph, no recorded loop). With an init image
(and a mask) they are FluxKontextInpaintPipeline's (:func:`sdengine.pipeline.flux_kontext.start_options`).

FLUX.1 Fill (inpainting / outpainting) and Depth / Canny (a ``control_image``) are told by the transformer's
shapes (:attr:`FluxPipeline.kind`); their image latents and checks are :mod:`sdengine.pipeline.flux_fill`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor

from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.flow import (
    FLUX_TABLE_LENGTH,
    FlowDenoiser,
    FlowSchedule,
    flow_img2img_start,
    flow_noise_scaling,
    flow_sampler_view,
    flux_image_seq_len,
)
from sdengine.diffusion.text_groups import run_text_groups
from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline import flux_fill, flux_kontext, redux
from sdengine.pipeline.core import Pipeline, Prepared, a1111_changes_run
from sdengine.pipeline.infotext import files_hash_cached, hashed_files
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning
from sdengine.text.flux_conditioner import FluxConditioner

log = logging.getLogger(__name__)

DEV_GUIDANCE = 3.5  # diffusers' FluxPipeline guidance_scale default (BFL's reference for [dev])
DEV_STEPS = 28  # diffusers' FLUX.1 [dev] example
SCHNELL_STEPS = 4  # diffusers' FLUX.1 [schnell] example (timestep-distilled: 1-4 steps)
MAX_DISTILLED_CFG = 100.0
PATCH = 2  # the transformer's 2x2 latent patches
REDUX_TOKENS = 729  # FLUX.1 Redux: SigLIP so400m-patch14-384's 27 x 27 tokens per image (the memory estimate)


class FluxAdapter:
    """The conditioning dict -> the Flux transformer's arguments: ``crossattn`` -> ``encoder_hidden_states``,
    ``vector`` -> ``pooled_projections``, ``guidance`` -> ``guidance`` (FLUX.1 [dev]'s distilled guidance
    scale, one per row), ``ip_tokens`` (IP-Adapters' image tokens, to :class:`sdengine.nn.ip_adapter.IPAdapterNet`),
    ``concat`` (FLUX.1 Fill's masked image and mask, Depth / Canny's control latent)
    appended to the noisy latent's channels. The network runs in ``dtype``; its velocity comes back in float32.
    ``references``: FLUX.1 Kontext's reference latents, the same for every row (the transformer's
    ``reference_latents``). ``text_len``: each row's own text token count where the rows' ``crossattn`` are
    zero-padded to the longest (FLUX.1 Redux's tokens lengthen the positive text only): the rows run in one call
    of the transformer per count, each with its own text unpadded, as diffusers' FluxPipeline runs true CFG's two
    passes apart."""

    def __init__(self, net: Any, dtype: torch.dtype, references: list[Tensor] | None = None) -> None:
        self.net = net
        self.dtype = dtype
        self.references = references
        self.reference_method = "offset"  # ComfyUI's FluxKontextMultiReferenceLatentMethod may set another
        # ControlNets attached (sdengine.pipeline.dit_control): the step and the rows' CFG kinds go through
        self.takes_step = bool(getattr(net, "takes_step", False))
        self.takes_row_kinds = bool(getattr(net, "takes_row_kinds", self.takes_step))
        # IP-Adapters (sdengine.nn.ip_adapter.IPAdapterNet on the double blocks): the rows' image tokens go through
        self.takes_ip_tokens = bool(getattr(net, "takes_ip_tokens", False))

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        crossattn: Tensor,
        vector: Tensor,
        guidance: Tensor | None = None,
        concat: Tensor | None = None,
        ip_tokens: Tensor | None = None,
        step: Any = None,
        row_kinds: Any = None,
        text_len: Tensor | None = None,
    ) -> Tensor:
        if text_len is not None:  # rows whose texts are of several token counts (FLUX.1 Redux under true CFG)
            return run_text_groups(
                self, x, t, text_len=text_len, crossattn=crossattn, vector=vector, guidance=guidance, concat=concat,
                ip_tokens=ip_tokens, step=step, row_kinds=row_kinds,
            )  # fmt: skip
        control: dict[str, Any] = {"step": step} if self.takes_step else {}
        if self.takes_row_kinds:
            control["row_kinds"] = row_kinds
        if ip_tokens is not None:  # XLabs' flux-ip-adapter's image tokens (IPAdapterNet takes them)
            if not self.takes_ip_tokens:
                raise GenerationError("the conditioning has IP-Adapter image tokens and the Flux network takes none")
            control["ip_tokens"] = ip_tokens.to(self.dtype)
        if self.references:
            control["reference_latents"] = self.references
            if self.reference_method != "offset":
                control["reference_method"] = self.reference_method
        if concat is not None:  # FLUX.1 Fill / Depth / Canny: the image latent beside the noisy one
            x = torch.cat([x, concat.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.net(
            x.to(self.dtype),
            t,
            encoder_hidden_states=crossattn.to(self.dtype),
            pooled_projections=vector.to(self.dtype),
            guidance=None if guidance is None else guidance.to(device=x.device, dtype=torch.float32),
            **control,
        ).float()


# What Flux refuses: (request field, how to tell it is set, the one line)
_REFUSED: tuple[tuple[str, Any, str], ...] = (
    ("guess_mode", bool, "guess_mode is a U-Net ControlNet setting; Flux ControlNets do not take it"),
    ("pag_scale", bool, "perturbed-attention guidance (pag_scale) reads U-Net attention layers"),
    ("sag_scale", bool, "self-attention guidance (sag_scale) reads the U-Net's middle block"),
    ("freeu", lambda v: v is not None, "FreeU changes the U-Net's up blocks"),
    ("deep_shrink", lambda v: v is not None, "Deep Shrink resizes the U-Net's blocks"),
    ("hypertile", lambda v: v is not None, "HyperTile tiles the U-Net's self-attention"),
    ("hypertile_vae", lambda v: v is not None, "HyperTile on the VAE is not supported for Flux"),
    ("tiled_diffusion", lambda v: v is not None, "tiled diffusion (MultiDiffusion) is not supported for Flux yet"),
    ("image_cfg_scale", lambda v: v is not None, "image_cfg_scale is InstructPix2Pix's (an 8-channel U-Net)"),
    ("sdxl", lambda v: v is not None, "sdxl settings apply to SDXL models only"),
    ("guidance_rescale", bool, "guidance_rescale rescales CFG of a noise-predicting U-Net"),
    ("zero_terminal_snr", bool, "zero_terminal_snr rescales a U-Net's discrete schedule; Flux's flow ends at 1"),
    ("tiling", bool, "tiling (seamless images) is not supported for Flux yet"),
    ("seed_resize_from_w", bool, "seed_resize_from is not supported for Flux"),
    ("discard_penultimate_sigma", bool, "discard_penultimate_sigma is A1111's option for SD's schedules"),
    ("shift", lambda v: v is not None, "Flux [dev] shifts its schedule by the image size, [schnell] not at all"),
)


def refusals(r: GenerationRequest) -> list[str]:
    """The settings of ``r`` a Flux model cannot run, each as its one-line reason (empty: it can run); needs no loaded
    model (the server asks before a worker holds it). The distilled guidance's checks need the model
    (:meth:`FluxPipeline.distilled_guidance`)."""
    reasons = [f"{field}: {why}" for field, is_set, why in _REFUSED if is_set(getattr(r, field, None))]
    reasons += flux_kontext.reference_refusals(r)
    for u in getattr(r, "ip_adapters", None) or ():
        start, end = getattr(u, "start", 0.0), getattr(u, "end", 1.0)
        if (isinstance(start, int | float) and start > 0) or (isinstance(end, int | float) and end < 1):
            reasons.append(
                "ip_adapters: an IP-Adapter's start / end (ComfyUI's sigma window) is not supported for Flux: leave "
                "them at 0 and 1"
            )
            break
    if r.clip_skip != 1 and r.clip_skip_rule == "sdengine":
        reasons.append(
            f"clip_skip {r.clip_skip} does not apply to Flux (it reads CLIP-L's pooled output): leave it at 1"
        )
    return reasons


def token_refusal(
    width: int, height: int, reference_sizes: list[tuple[int, int]], multiple: int, max_side: int, name: str
) -> str | None:
    """Why a call of ``width`` x ``height`` with FLUX.1 Kontext references of these (fitted) pixel sizes is too
    much work (one line), or None: each reference's tokens (one per ``multiple`` x ``multiple`` cell, the 2x2
    patch of the latent) join the image's at every step, and a step may hold at most the tokens of the largest
    image the model makes (``max_side`` x ``max_side``, :meth:`Pipeline.max_side`). Needs no loaded model."""
    if not reference_sizes:
        return None
    own = (width // multiple) * (height // multiple)
    refs = sum((w // multiple) * (h // multiple) for w, h in reference_sizes)
    cap = (max_side // multiple) ** 2
    if own + refs <= cap:
        return None
    n = len(reference_sizes)
    return (
        f"{n} reference image{'s add' if n > 1 else ' adds'} {refs} tokens to each step of the {width}x{height} "
        f"image's {own}: {own + refs} in all, over {name}'s limit of {cap} (a {max_side}x{max_side} image's); use "
        "smaller or fewer references (reference_auto_resize puts each at about 1024x1024) or a smaller size"
    )


class FluxPipeline(Pipeline):
    """FLUX.1 [dev] (guidance-distilled) or [schnell] (timestep-distilled). Build it with
    :func:`sdengine.pipeline.load_pipeline` on a Flux diffusers folder or BFL / ComfyUI files."""

    # FLUX.1 Kontext's reference latents of the call under way, and (while prepare checks memory) the tokens its
    # reference images add; class defaults, so that a subclass with its own constructor (Chroma) has them too
    _call_references: list[Tensor] | None = None
    _reference_tokens = 0
    _call_redux: Tensor | None = None  # FLUX.1 Redux's tokens of the call under way (1, N, joint_attention_dim)
    _redux_apart = False  # the call's texts under true CFG are of two lengths (Redux's tokens): run apart
    _redux_units: list[Any] = []  # while prepare checks memory: the call's Redux units
    per_row_init_images = False  # one init image per call (Pipeline.refuse_row_images)

    def __init__(
        self,
        *,
        transformer: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        tokenizer_2: Any,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> None:
        self.transformer: Any = transformer.eval().requires_grad_(False)
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.tokenizer_2 = tokenizer_2
        te = kwargs["text_encoder"].eval().requires_grad_(False)
        cfg: Any = self.transformer.config
        conditioner = FluxConditioner(
            te,
            kwargs["tokenizer"],
            self.text_encoder_2,
            tokenizer_2,
            pad_token_id=kwargs["pad_token_id"],
            joint_attention_dim=int(cfg.joint_attention_dim),
            pooled_projection_dim=int(cfg.pooled_projection_dim),
            guidance=bool(cfg.guidance_embeds),
            max_sequence_length=max_sequence_length,
            dtype=kwargs["dtype"],
            device=kwargs["device"],
            name=kwargs.get("name", "model"),
        )
        self._call_schedule: FlowSchedule | None = None
        super().__init__(unet=transformer, conditioner=conditioner, prediction_type="flow", **kwargs)
        vae_channels = int(self.vae.config.latent_channels)
        if vae_channels != int(cfg.out_latent_channels):
            raise GenerationError(
                f"{self.name}: the VAE's latents have {vae_channels} channels but the Flux transformer takes "
                f"{cfg.out_latent_channels}: not this model's VAE (Flux.1's is ae.safetensors, 16 channels)"
            )
        _ = self.kind  # a transformer of no known kind: one line at load

    # -- the model family's hooks ---------------------------------------------------------------------------

    def training_schedule(self) -> FlowSchedule:
        """The flow schedule of the scheduler config, at the model's own size (a [dev] call shifts by its own
        size: :meth:`flow_schedule`)."""
        return self.flow_schedule(self.default_size, self.default_size)

    def flow_schedule(self, width: int, height: int) -> FlowSchedule:
        """The schedule of a ``width`` x ``height`` image: [dev]'s ``mu`` from its token count, the `normal` grid
        spaced as diffusers' Flux pipelines space it (``linspace(1, 1/n, n)``), the 10000-entry table of ComfyUI's
        ModelSamplingFlux for the table schedules (``simple``, ``beta``, ``sgm_uniform``)."""
        f = self.vae_scale_factor
        tokens = flux_image_seq_len(height // f, width // f, PATCH)
        try:
            schedule = FlowSchedule.from_config(self.scheduler_config, image_seq_len=tokens)
        except Exception as e:  # a UsageError naming the option
            raise GenerationError(f"{self.name}: scheduler config: {e}") from None
        # the `normal` grid is diffusers' Flux pipelines'; the table (simple, beta, sgm_uniform) ComfyUI's for Flux
        return dataclasses.replace(schedule, spacing="flux", num_train_timesteps=FLUX_TABLE_LENGTH)

    @property
    def noise_schedule(self) -> Any:
        """The schedule of the call under way (its size's shift), else the model's own."""
        return self._call_schedule if self._call_schedule is not None else self.base_schedule

    def network_adapter(self, net: Any) -> FluxAdapter:
        return FluxAdapter(net, self.dtype, self._call_references)

    def graphed(self, name: str) -> Any:
        """As the core's, but the transformer runs as it is in a call with reference images (its step graphs and
        compiled packages take no reference tokens)."""
        if name == "unet" and (self._call_references or self._redux_apart):
            return None  # (FLUX.1 Redux under true CFG: texts of two lengths, run apart)
        return super().graphed(name)

    @property
    def latent_rgb_map(self) -> vae_utils.LatentRGBMap:
        """Flux.1's latent -> RGB preview map (ComfyUI's; docs/tiny-vae.md)."""
        return vae_utils.FLUX_LATENT_RGB

    def x0_denoiser(self, model: Any) -> FlowDenoiser:
        return FlowDenoiser(model, self.noise_schedule)

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        """Flux ControlNets on the transformer (:func:`sdengine.pipeline.dit_control.build_controlled_dit`)."""
        from sdengine.pipeline.dit_control import build_controlled_dit, vae_encoder

        return build_controlled_dit(net, units, family="flux", **vae_encoder(self.vae), **kw)

    def start_latent_options(self, p: Prepared) -> dict[str, Any]:
        """FLUX.1 Fill's masked-image concat, Depth / Canny's control image (:mod:`sdengine.pipeline.flux_fill`)."""
        return {**flux_fill.start_options(self.kind, p), **flux_kontext.start_options(p)}

    @property
    def kind(self) -> str:
        """``"plain"`` (FLUX.1 [dev] / [schnell], and Chroma), ``"fill"`` (FLUX.1 Fill) or ``"control"`` (FLUX.1
        Depth / Canny), from the transformer's widths (:func:`sdengine.pipeline.flux_fill.flux_kind`)."""
        cfg: Any = self.transformer.config
        out = int(getattr(cfg, "out_channels", None) or cfg.in_channels)
        return flux_fill.flux_kind(int(cfg.in_channels), out, self.vae_scale_factor, self.name)

    @property
    def takes_control_image(self) -> bool:
        """FLUX.1 Depth / Canny."""
        return self.kind == flux_fill.CONTROL

    def img2img_first_step(self, steps: int, strength: float, rule: str, sampler: str) -> int:
        """diffusers' FluxImg2ImgPipeline: ``int(n - min(n strength, n))``."""
        return flow_img2img_start(steps, strength)

    def noised_latent(self, latent: Tensor, noise: Tensor, sigma: Any) -> Tensor:
        """The flow's ``s noise + (1 - s) latent`` (inpainting's known region, as FluxInpaintPipeline's)."""
        return flow_noise_scaling(sigma, noise, latent)

    # -- facts about the model ------------------------------------------------------------------------------

    @property
    def guidance_distilled(self) -> bool:
        """FLUX.1 [dev]: the transformer takes the distilled guidance scale."""
        return bool(self.transformer.config.guidance_embeds)

    @property
    def variant(self) -> str:
        """ "dev" (guidance-distilled) or "schnell"."""
        return "dev" if self.guidance_distilled else "schnell"

    @property
    def default_size(self) -> int:
        """The VAE config's sample size (1024 for Flux.1)."""
        return int(self.vae.config.sample_size)

    @property
    def size_multiple(self) -> int:
        """The VAE's factor x the 2x2 patches (16 for Flux.1)."""
        return PATCH * self.vae_scale_factor

    @property
    def inpainting(self) -> bool:
        return False

    @property
    def instruct_pix2pix(self) -> bool:
        return False

    @property
    def pooled_dim(self) -> int | None:
        return None  # the vector is not a U-Net's class embedding (see unet_text_kwargs of Pipeline)

    def model_hash(self) -> str | None:
        """A1111's "Model hash" of the transformer's weights (a single file itself, a folder's ``transformer/``)."""
        if self._model_hash is None:
            self._model_hash = files_hash_cached(hashed_files(self.source, "transformer"))
        return self._model_hash

    @property
    def family_defaults(self) -> dict[str, Any]:
        """The settings a Flux run takes where its caller chose none (see the module docstring)."""
        out: dict[str, Any] = {
            "steps": DEV_STEPS if self.guidance_distilled else SCHNELL_STEPS,
            "cfg_scale": 1.0,
            "sampler": "euler",
            "schedule": "normal",
        }
        if self.guidance_distilled:
            out["distilled_cfg_scale"] = DEV_GUIDANCE
        fill = flux_fill.family_defaults(self.kind)  # FLUX.1 Fill: strength 1, guidance 30
        out.update({k: v for k, v in fill.items() if k != "distilled_cfg_scale" or self.guidance_distilled})
        return out

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        """The transformer's: every block holds the image and text tokens at its width, a 4x MLP and a few
        temporaries (counted as 12 maps), plus attention scores where a kernel materialises them (heads x N x N
        in float32, at most CHUNK_SCORES per row)."""
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.transformer.config
        n = (h // PATCH) * (w // PATCH) + int(self.conditioner.max_sequence_length)  # type: ignore[attr-defined]
        n += self._reference_tokens  # FLUX.1 Kontext's reference images' tokens
        n += REDUX_TOKENS * len(self._redux_units)  # FLUX.1 Redux's image tokens (SigLIP so400m's 27 x 27 each)
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        scores = min(CHUNK_SCORES, int(cfg.num_attention_heads) * n * n) * 4
        return rows * (n * width * bytes_per * 12 + scores)

    # -- a call ---------------------------------------------------------------------------------------------

    def distilled_guidance(self, r: GenerationRequest) -> float | None:
        """The distilled guidance scale of a request ([dev]: its ``distilled_cfg_scale``, 3.5 by default;
        [schnell]: None, a scale given refused)."""
        value = getattr(r, "distilled_cfg_scale", None)
        if not self.guidance_distilled:
            if value is not None:
                raise GenerationError(
                    f"distilled_cfg_scale (--guidance) applies to FLUX.1 [dev]; {self.name} is [schnell]-like (no "
                    "guidance embedding): drop it"
                )
            return None
        if value is None:
            return flux_fill.FILL_GUIDANCE if self.kind == flux_fill.FILL else DEV_GUIDANCE
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise GenerationError(f"distilled_cfg_scale must be a number, got {value!r}")
        if not 0.0 <= float(value) <= MAX_DISTILLED_CFG:
            raise GenerationError(f"distilled_cfg_scale must be in [0, {MAX_DISTILLED_CFG:g}], got {value}")
        return float(value)

    def check_request(self, r: GenerationRequest) -> None:
        """What Flux cannot run, one line each, before any work."""
        reasons = refusals(r)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a Flux model")
        kind_refusal = flux_fill.request_refusal(self.kind, r)
        if kind_refusal is not None:
            raise GenerationError(f"{self.name}: {kind_refusal}")
        self.distilled_guidance(r)

    def prepare(self, request: GenerationRequest) -> Prepared:
        self.check_request(request)
        if isinstance(request.schedule, str) and request.schedule.strip().lower() == "auto":
            request = request.replace(schedule="normal")  # Flux's own grid (diffusers' FluxPipeline sigmas)
        notes: list[str] = []
        references = None
        if request.reference_list():  # FLUX.1 Kontext: read and fitted before the size and memory are settled
            request.validate_references()
            references = flux_kontext.prepare_references(request, self.size_multiple, notes)
            if request.width is None and request.height is None:  # the init image's size, else the first reference's
                w, h = flux_kontext.output_size(request, self.size_multiple, references)
                request = request.replace(width=w, height=h)
            sizes = [im.size for im in references]
            w, h = (request.width or self.default_size), (request.height or self.default_size)
            why = token_refusal(w, h, sizes, self.size_multiple, self.max_side(), self.name)
            if why is not None and self.text_kind == "flux":  # every step's work, before any model runs (the
                # server's precheck too); a model that takes no references (Chroma) says so in Pipeline.prepare
                raise GenerationError(why)
            self._reference_tokens = flux_kontext.reference_tokens(sizes, self.vae_scale_factor, PATCH)
        self._redux_units = redux.check_units(request.redux)
        try:
            p = super().prepare(request)
        finally:
            self._reference_tokens = 0
            self._redux_units = []
        if request.redux:
            self._check_redux(p)
        p.references = references
        for text in notes:
            p.notes.append(text)
            log.warning(text)
        try:  # a sampler with no right form on a flow model: one line before any model runs
            flow_sampler_view(p.sampler)
            if p.hires is not None:
                flow_sampler_view(p.hires.sampler)
        except UsageError as e:
            raise GenerationError(str(e)) from None
        if request.strength_rule != "diffusers" and (
            p.init is not None or p.hires is not None or a1111_changes_run(p)
        ):  # A1111's step rules (its API routes set them) are accepted where they change nothing: plain txt2img
            raise GenerationError(
                f"strength_rule {request.strength_rule!r}: A1111's step rules are not supported for Flux with an init "
                "image, the hires fix or a sampler whose run they change (the Brownian SDE samplers); Flux counts "
                "img2img steps as diffusers' FluxImg2ImgPipeline ('diffusers')"
            )
        if p.hires is not None:  # the second pass starts as Flux's img2img does (FluxImg2ImgPipeline's rule)
            start = flow_img2img_start(p.hires.steps, float(request.strength))
            p.hires = dataclasses.replace(p.hires, start=start)
        return p

    def _check_redux(self, p: Prepared) -> None:
        """What FLUX.1 Redux cannot run with, one line (its tokens lengthen the conditional rows' text only)."""
        if self.text_kind != "flux":
            raise GenerationError(
                f"redux (FLUX.1 Redux image prompts) applies to FLUX.1 models; {self.name} is not one"
            )

    def edited_positive(self, p: Prepared) -> Callable[[Conditioning], Conditioning] | None:
        """Under prompt editing with FLUX.1 Redux: the call's image tokens appended to each step's positive T5
        tokens, as to a plain prompt's (:meth:`conditioning_pair`); the negative texts as they are."""
        tokens = self._call_redux
        if tokens is None:
            return None

        def add(cond: Conditioning) -> Conditioning:
            text = cond["crossattn"]
            more = tokens.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
            return {**cond, "crossattn": torch.cat([text, more], dim=1)}

        return add

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) of a row with the request's distilled guidance ([dev]); FLUX.1 Redux's tokens of the call
        appended to the conditional row's T5 tokens."""
        conditioner: FluxConditioner = self.conditioner  # type: ignore[assignment]
        guidance = self.distilled_guidance(p.request)
        if float(p.request.cfg_scale) == 1.0 and p.sampler not in sampling.CFG_PP_SAMPLERS:
            # one pass per step: the unconditional half is never run (CFGDenoiser at scale 1), so T5 does not
            # encode the (empty) negative prompt for it
            cond = conditioner.with_guidance(conditioner.text(prompt, note=note), guidance)
            if self._call_redux is not None:
                text = cond["crossattn"]
                tokens = self._call_redux.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)
                cond = {**cond, "crossattn": torch.cat([text, tokens], dim=1)}
            return cond, cond
        pair = conditioner.pair(prompt, negative, note=note, guidance=guidance)
        if self._call_redux is not None:  # the positive text longer than the negative: the two run apart
            return redux.padded_pair(pair[0], pair[1], self._call_redux)
        return pair

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        with self._call_settings(p):
            return super().sample_latents(p, init_latent)

    @contextmanager
    def _call_settings(self, p: Prepared) -> Iterator[None]:
        """For one call: the schedule of its size, and its distilled guidance for the texts prompt editing encodes
        one by one (:meth:`FluxConditioner.encode`)."""
        conditioner: FluxConditioner = self.conditioner  # type: ignore[assignment]
        self._call_schedule = self.flow_schedule(p.width, p.height)
        conditioner.call_guidance = self.distilled_guidance(p.request)
        graphs = self._cuda_graphs
        if p.request.redux:  # FLUX.1 Redux: the images' tokens, made once for the call
            width = int(self.transformer.config.joint_attention_dim)
            self._call_redux = redux.redux_tokens(redux.check_units(p.request.redux), width, self.device, self.dtype)
            self._redux_apart = float(p.request.cfg_scale) != 1.0 or p.sampler in sampling.CFG_PP_SAMPLERS
            if graphs and "loop" in graphs and self._redux_apart:  # a recorded loop runs the two texts together
                self._cuda_graphs = {k: v for k, v in graphs.items() if k != "loop"}
        if p.references:  # FLUX.1 Kontext: the references' latents, made once for the call's every step
            self._call_references = flux_kontext.encode_references(self, p.references, p.tiled)
            if graphs and "loop" in graphs:  # a recorded loop would replay another call's references
                self._cuda_graphs = {k: v for k, v in graphs.items() if k != "loop"}
        try:
            yield
        finally:
            self._call_schedule = None
            self._call_references = None
            self._call_redux = None
            self._redux_apart = False
            self._cuda_graphs = graphs
            conditioner.call_guidance = None

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """Forge's "Distilled CFG Scale" of a [dev] call."""
        g = self.distilled_guidance(request)
        out: dict[str, Any] = {} if g is None else {"Distilled CFG Scale": g}
        if request.reference_list():  # FLUX.1 Kontext's reference images (their sizes read again)
            sizes = flux_kontext.reference_sizes(request, self.size_multiple)
            out.update(flux_kontext.infotext_fields(request, sizes))
        if request.control_preprocessor != "none":  # FLUX.1 Depth / Canny's map made from a photo
            out["Control preprocessor"] = request.control_preprocessor
        if request.redux:  # FLUX.1 Redux's units: the image's file name and pixel hash, the models', the strength
            out.update(redux.infotext_fields(request.redux))
        return out

    def __call__(self, prompt: Any = "", negative_prompt: Any = None, *, hr_model: Any = None, **kwargs: Any) -> Any:
        """As :meth:`Pipeline.__call__`, with Flux's defaults (:attr:`family_defaults`) for the settings a call
        given as keywords leaves out (a :class:`GenerationRequest` is taken as it is)."""
        if not isinstance(prompt, GenerationRequest):
            kwargs = {**self.family_defaults, **kwargs}
        if hr_model is not None and hr_model is not self:
            raise GenerationError(f"hr_model: the hires fix's second pass runs on {self.name} itself for Flux")
        return super().__call__(prompt, negative_prompt, **kwargs)


__all__ = ["DEV_GUIDANCE", "DEV_STEPS", "SCHNELL_STEPS", "FluxAdapter", "FluxPipeline", "refusals", "token_refusal"]
