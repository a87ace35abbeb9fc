"""Stable Diffusion 3 / 3.5 behind the same pipeline: an MMDiT on a rectified flow, three text encoders.

SD3 (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis") changes three
things against SD 1.x/2.x/SDXL, and only those differ here; everything else is
:class:`sdengine.pipeline.core.Pipeline`'s one generation path (seeds, batching, CFG, img2img, inpainting, VAE
decode, infotext):

* the network is an MMDiT (:class:`sdengine.models.mmdit.MMDiT`), held where the U-Net is held (``unet``; also
  ``transformer``) and called through :class:`MMDiTAdapter`: the conditioning dict's ``crossattn`` becomes its
  ``encoder_hidden_states``, ``vector`` its ``pooled_projections``;
* it predicts the velocity of a rectified flow ``x_s = (1 - s) x0 + s eps``: the x0-denoiser is
  :class:`sdengine.diffusion.flow.FlowDenoiser` and the schedule a :class:`sdengine.diffusion.flow.FlowSchedule`
  with SD3's time shift (the model's scheduler config's ``shift``, 3.0; a request's ``shift`` replaces it for that
  call); img2img starts at diffusers' SD3 step (:func:`sdengine.diffusion.flow.flow_img2img_start`) from
  ``s eps + (1 - s) x0``, and inpainting blends the known region on that path too;
* the text side is :class:`sdengine.text.sd3_conditioner.SD3Conditioner` (CLIP-L, OpenCLIP bigG, T5-XXL or zeros).

The 16-channel VAE needs nothing new: ``shift_factor`` and ``scaling_factor`` come from its config
(:meth:`sdengine.models.vae.AutoencoderKL.scale_latents`).

SD3.5's skip-layer guidance (the request's ``sd3`` settings, :class:`SD3Options`) runs inside
:class:`MMDiTAdapter`; SD3 ControlNets through :mod:`sdengine.pipeline.dit_control` (:meth:`controlled_network`).
Perturbed-attention guidance (``pag_scale``, ``pag_layers``, the ``sd3`` setting ``pag_adaptive_scale``) runs as
diffusers' ``StableDiffusion3PAGPipeline``: the core's third pass of the conditional rows with PAG's joint attention
in the layers :func:`sdengine.models.mmdit.pag_joint_layers` picks (:meth:`SD3Pipeline.pag_perturber`); the
request's default ``pag_layers`` "mid" (the U-Net's middle block) stands for diffusers' SD3 default "blocks.1".
What is made for U-Nets is refused before any work, one line each (:func:`refusals`; U-Net ControlNets by
:mod:`sdengine.pipeline.dit_control`): T2I-Adapters, IP-Adapters, U-Net patches (SAG, FreeU, Deep Shrink,
HyperTile),
instruct-pix2pix guidance, A1111's step rules where they would change the run, Zero Terminal SNR, another hires
model, tiled diffusion, tiling, textual-inversion files, and samplers that are not right on a flow model. Prompt
editing, the hires fix and LoRAs in diffusers' SD3 format (:mod:`sdengine.weights.lora_keys`: ``transformer.``,
``text_encoder.``, ``text_encoder_2.`` PEFT names) run as for the other families.

The core learns all of this through its family hooks (``training_schedule``, ``network_adapter``, ``x0_denoiser``,
``img2img_first_step``, ``noised_latent``, ``network_activation_bytes``, ``pag_perturber``, ``infotext_fields``),
which SD 1.x/2.x and SDXL keep at their defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine import vae_utils
from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_img2img_start, flow_noise_scaling
from sdengine.errors import GenerationError
from sdengine.pipeline.core import Pipeline, Prepared, as_request
from sdengine.pipeline.infotext import files_hash_cached, hashed_files
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import GenerationResult
from sdengine.text.sd3_conditioner import T5_LENGTH, SD3Conditioner

# PAG's layers where a request names the U-Net default "mid" (diffusers' StableDiffusion3PAGPipeline's
# pag_applied_layers: the joint attention of block 1, and of blocks 10-19 where the model has them, by its rule)
SD3_PAG_LAYERS = "blocks.1"

# The defaults of an SD3 run where the caller chose none (the CLI's; diffusers' StableDiffusion3Pipeline: its
# FlowMatchEulerDiscreteScheduler is Euler on the `normal` flow grid, guidance_scale 7.0, 28 steps)
SD3_DEFAULTS: dict[str, Any] = {"sampler": "euler", "schedule": "normal", "cfg_scale": 7.0, "steps": 28}


@dataclass(frozen=True)
class SD3Options:
    """SD3-only settings of a request (``GenerationRequest.sd3``): skip-layer guidance (SD3.5 Medium's
    recommended extra guidance; diffusers' ``skip_guidance_layers``, ``skip_layer_guidance_scale``,
    ``skip_layer_guidance_start``, ``skip_layer_guidance_stop``, with its defaults). Empty ``skip_guidance_layers``:
    off. Stability recommends layers 7, 8, 9 for SD3.5 Medium. ``pag_adaptive_scale``: perturbed-attention
    guidance's scale falls with the step, ``max(0, pag_scale - pag_adaptive_scale * (1000 - t))`` at timestep
    ``t = 1000 sigma`` (diffusers' ``StableDiffusion3PAGPipeline``); 0: ``pag_scale`` at every step."""

    skip_guidance_layers: tuple[int, ...] = ()
    skip_layer_guidance_scale: float = 2.8
    skip_layer_guidance_start: float = 0.01
    skip_layer_guidance_stop: float = 0.2
    pag_adaptive_scale: float = 0.0

    @classmethod
    def coerce(cls, value: Any, num_layers: int | None = None) -> SD3Options:
        """From a request's ``sd3`` dict (a list for the layers); a bad value is a one-line GenerationError."""
        if value is None:
            opts = cls()
        elif isinstance(value, SD3Options):
            opts = value
        else:
            if not isinstance(value, Mapping):
                raise GenerationError(f"sd3 settings must be a mapping, got {type(value).__name__}")
            names = [f.name for f in dataclasses.fields(cls)]
            unknown = sorted(str(k) for k in set(value) - set(names))
            if unknown:
                raise GenerationError(f"unknown sd3 settings: {', '.join(unknown)}; valid: {', '.join(names)}")
            kw: dict[str, Any] = {}
            layers = value.get("skip_guidance_layers")
            if layers is not None:
                if isinstance(layers, int) and not isinstance(layers, bool):
                    layers = [layers]
                if not isinstance(layers, list | tuple) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in layers
                ):
                    raise GenerationError(f"sd3 skip_guidance_layers must be a list of block numbers, got {layers!r}")
                kw["skip_guidance_layers"] = tuple(int(i) for i in layers)
            for key in names[1:]:
                v = value.get(key)
                if v is None:
                    continue
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise GenerationError(f"sd3 {key} must be a number, got {v!r}")
                kw[key] = float(v)
            opts = cls(**kw)
        if not -100.0 <= opts.skip_layer_guidance_scale <= 100.0:
            raise GenerationError(
                f"sd3 skip_layer_guidance_scale must be in [-100, 100], got {opts.skip_layer_guidance_scale}"
            )
        if not 0.0 <= opts.pag_adaptive_scale <= 1.0:
            raise GenerationError(f"sd3 pag_adaptive_scale must be in [0, 1], got {opts.pag_adaptive_scale}")
        if not 0.0 <= opts.skip_layer_guidance_start <= opts.skip_layer_guidance_stop <= 1.0:
            raise GenerationError(
                "sd3 skip_layer_guidance_start and _stop must be fractions of the steps with start <= stop, got "
                f"{opts.skip_layer_guidance_start} and {opts.skip_layer_guidance_stop}"
            )
        if len(set(opts.skip_guidance_layers)) != len(opts.skip_guidance_layers):
            raise GenerationError(f"sd3 skip_guidance_layers repeats a block: {list(opts.skip_guidance_layers)}")
        if num_layers is not None:
            bad = [i for i in opts.skip_guidance_layers if not 0 <= i < num_layers]
            if bad:
                raise GenerationError(
                    f"sd3 skip_guidance_layers {bad[0]} is not a joint block of this MMDiT (0 to {num_layers - 1})"
                )
        return opts

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults, JSON-ready (what :meth:`coerce` reads back)."""
        default = SD3Options()
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v != getattr(default, f.name):
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out


@dataclass(frozen=True)
class SkipLayerRun:
    """Skip-layer guidance as one call runs it: the blocks left out, its scale divided by the CFG scale (see
    :class:`MMDiTAdapter`), and the steps ``i`` it acts on, ``first < i < last`` with ``first = start * steps``,
    ``last = stop * steps`` (diffusers' rule, ``i`` counted from 0 over the steps that run)."""

    layers: tuple[int, ...]
    scale_over_cfg: float
    first: float
    last: float

    def on(self, index: int) -> bool:
        return self.first < index < self.last


def adaptive_pag_scale(scale: float, adaptive: float, multiplier: float, sigma: Tensor | float) -> float:
    """diffusers' adaptive PAG scale at flow sigma ``sigma``: ``max(0, scale - adaptive * (1000 - t))``, ``t =
    multiplier * sigma`` the MMDiT's timestep (1000 for SD3)."""
    t = float(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0]) * multiplier
    return max(0.0, scale - adaptive * (1000.0 - t))


class MMDiTAdapter:
    """THE map from the conditioning dict onto the MMDiT's arguments (as :class:`UNetAdapter` is for U-Nets):
    ``crossattn`` -> ``encoder_hidden_states``, ``vector`` -> ``pooled_projections``; the network runs in
    ``dtype`` and its velocity comes back as float32.

    ``slg``: skip-layer guidance (Stability's SD3.5 recipe; diffusers' ``skip_guidance_layers``). At the steps it
    acts on, CFG's conditional rows run a second time with ``slg.layers`` left out, and diffusers' guided velocity
    ``u + g (c - u) + s (c - c_skip)`` comes out of the guidance's own ``u + g (c' - u)`` when the conditional rows
    answer ``c' = c + (s / g) (c - c_skip)``; x0 is affine in the velocity at one ``x`` and sigma, so the same holds
    for the x0 the guidance mixes. It acts only where guidance runs unconditional rows (diffusers: with
    ``guidance_scale > 1``)."""

    takes_step = False
    takes_row_kinds = False

    def __init__(self, net: Any, dtype: torch.dtype, slg: SkipLayerRun | None = None) -> None:
        self.net = net
        self.dtype = dtype
        self.slg = slg
        self.controlled = bool(getattr(net, "takes_step", False))  # ControlNets attached (pipeline.dit_control)
        if slg is not None or self.controlled:
            self.takes_step = self.takes_row_kinds = True

    def _run(self, x: Tensor, t: Tensor, crossattn: Tensor, vector: Tensor, **kw: Any) -> Tensor:
        out = self.net(
            x.to(self.dtype),
            t.to(x.device),
            encoder_hidden_states=crossattn.to(self.dtype),
            pooled_projections=vector.to(self.dtype),
            **kw,
        )
        return out.float()

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        crossattn: Tensor,
        vector: Tensor | None = None,
        concat: Tensor | None = None,
        step: Any = None,
        row_kinds: Any = None,
        **_: Any,
    ) -> Tensor:
        if vector is None:
            raise GenerationError("the MMDiT needs the pooled text vector ('vector' of the conditioning)")
        if concat is not None:
            raise GenerationError("the MMDiT takes no extra latent channels ('concat' conditioning)")
        control = {"step": step, "row_kinds": row_kinds} if self.controlled else {}
        v = self._run(x, t, crossattn, vector, **control)
        slg = self.slg
        if slg is None or step is None or row_kinds is None or "uncond" not in row_kinds or not slg.on(step.index):
            return v
        rows = [i for i, kind in enumerate(row_kinds) if kind == "cond"]
        if self.controlled:
            control["row_kinds"] = ["cond"] * len(rows)
        skipped = self._run(x[rows], t[rows], crossattn[rows], vector[rows], skip_layers=slg.layers, **control)
        v[rows] = v[rows] + slg.scale_over_cfg * (v[rows] - skipped)
        return v


def _a1111_rule_changes_nothing(r: GenerationRequest) -> bool:
    """Whether A1111's step rules (``strength_rule`` "a1111", what the server's A1111 routes set) leave this request
    as the "diffusers" rule runs it: txt2img without the hires fix, with a sampler whose grid, sigmas and noise they
    do not touch (not DDIM / PLMS, DPM2 / DPM2 a / DPM++ 3M SDE, or the Brownian-tree SDE samplers). A1111's
    img2img and hires step counts are not SD3's (diffusers'), so those are refused."""
    from sdengine.diffusion.sampling import A1111_DISCARD_SAMPLERS, BROWNIAN_SAMPLERS, resolve
    from sdengine.diffusion.schedules import A1111_GRID_SAMPLERS

    if r.init_image is not None or r.enable_hr:
        return False
    try:
        name = resolve(r.sampler, r.schedule)[0]
    except ValueError:
        return True  # the sampler's own one-line error comes from the core
    return name not in (*A1111_GRID_SAMPLERS, *A1111_DISCARD_SAMPLERS, *BROWNIAN_SAMPLERS)


def refusals(request: GenerationRequest) -> list[str]:
    """The settings of ``request`` an SD3 model cannot run, each as its one-line reason (empty: it can run)."""
    r = request
    checks = [
        (bool(r.ip_adapters), "IP-Adapters are made for U-Nets; SD3 takes none here"),
        (
            bool(r.pag_scale) and bool(SD3Options.coerce(r.sd3).skip_guidance_layers),
            "pag_scale (perturbed-attention guidance) and skip-layer guidance together are not supported; use one",
        ),
        (bool(r.sag_scale), "sag_scale (self-attention guidance) reads the U-Net's middle block; not for SD3"),
        (r.freeu_settings() is not None, "FreeU scales U-Net decoder features; not for SD3"),
        (r.deep_shrink_settings() is not None, "Deep Shrink resizes U-Net blocks; not for SD3"),
        (r.hypertile_config() is not None, "HyperTile tiles the U-Net's self-attention; not for SD3"),
        (r.image_cfg_scale is not None, "image_cfg_scale guides instruct-pix2pix U-Nets; not for SD3"),
        (bool(r.zero_terminal_snr), "zero_terminal_snr rescales a VP schedule; SD3's flow has none to rescale"),
        (
            r.strength_rule != "diffusers" and not _a1111_rule_changes_nothing(r),
            f"strength_rule {r.strength_rule!r}: A1111's step rules are not supported for SD3 with an init image, the "
            "hires fix, or a sampler whose run they change (DDIM, PLMS, DPM2, the SDE samplers); use 'diffusers'",
        ),
        (bool(r.discard_penultimate_sigma), "discard_penultimate_sigma is not supported for SD3"),
        (r.tiled_diffusion_settings() is not None, "tiled diffusion is not supported for SD3 yet"),
        (bool(r.tiling), "tiling (seamless images) pads U-Net convolutions; not for SD3"),
        (r.sdxl is not None, "sdxl settings apply to SDXL models only"),
        (bool(r.guess_mode), "guess_mode is a U-Net ControlNet setting; SD3 ControlNets do not take it"),
    ]
    return [why for on, why in checks if on]


class SD3Pipeline(Pipeline):
    """Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo). Build it with
    :func:`sdengine.pipeline.load_pipeline` on an SD3 folder or single file; call it as any pipeline."""

    per_row_init_images = False  # one init image per call (Pipeline.refuse_row_images)

    def __init__(
        self,
        *,
        transformer: Any,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        text_encoder_2: torch.nn.Module,
        text_encoder_3: torch.nn.Module | None,
        tokenizer: Any,
        tokenizer_2: Any,
        tokenizer_3: Any | None,
        scheduler_config: dict[str, Any],
        pad_token_id: int,
        pad_token_id_2: int,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "model",
        source: Path | None = None,
        encoder_sources: dict[str, Path] | None = None,
        lora_dir: str | Path | None = None,
    ) -> None:
        self.text_encoder_2 = text_encoder_2.eval().requires_grad_(False)
        self.text_encoder_3 = text_encoder_3.eval().requires_grad_(False) if text_encoder_3 is not None else None
        self.tokenizer_2 = tokenizer_2
        self.tokenizer_3 = tokenizer_3
        self.encoder_sources = dict(encoder_sources or {})  # text encoders given apart from the model (--clip-l ...)
        self._call_shift: float | None = None
        self._call_slg: SkipLayerRun | None = None
        self._call_pag_adaptive = 0.0  # the call's sd3 pag_adaptive_scale while PAG runs
        cfg = transformer.config  # an MMDiTConfig
        conditioner = SD3Conditioner(
            text_encoder.eval().requires_grad_(False),
            self.text_encoder_2,
            tokenizer,
            tokenizer_2,
            self.text_encoder_3,
            tokenizer_3 if text_encoder_3 is not None else None,
            pad_token_id=pad_token_id,
            pad_token_id_2=pad_token_id_2,
            joint_attention_dim=int(cfg.joint_attention_dim),
            pooled_projection_dim=int(cfg.pooled_projection_dim),
            dtype=dtype,
            device=device,
            name=name,
        )
        super().__init__(
            unet=transformer,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            scheduler_config=scheduler_config,
            prediction_type="flow",
            pad_token_id=pad_token_id,
            device=device,
            dtype=dtype,
            name=name,
            source=source,
            conditioner=conditioner,
            lora_dir=lora_dir,
        )
        if int(cfg.in_channels) != self.latent_channels:
            raise GenerationError(
                f"{name}: the MMDiT reads {cfg.in_channels}-channel latents, the VAE makes {self.latent_channels}"
            )

    # -- the family's hooks of the core -----------------------------------------------------------------------

    def training_schedule(self) -> FlowSchedule:
        """SD3's flow schedule from its scheduler config (the shift, 3.0 for every release)."""
        from sdengine.errors import UsageError

        try:
            return FlowSchedule.from_config(self.scheduler_config)
        except UsageError as e:
            raise GenerationError(f"{self.name}: scheduler config: {e}") from None

    @property
    def noise_schedule(self) -> Any:
        """The model's flow schedule, or during a call with a ``shift`` that shift's."""
        if self._call_shift is None:
            return self.base_schedule
        return dataclasses.replace(self.base_schedule, shift=self._call_shift, mu=None)  # the rest as the model's

    @property
    def latent_rgb_map(self) -> vae_utils.LatentRGBMap:
        """SD3's latent -> RGB preview map (ComfyUI's; docs/tiny-vae.md)."""
        return vae_utils.SD3_LATENT_RGB

    def network_adapter(self, net: Any) -> MMDiTAdapter:
        return MMDiTAdapter(net, self.dtype, self._call_slg)

    def x0_denoiser(self, model: Any) -> FlowDenoiser:
        return FlowDenoiser(model, self.noise_schedule)

    def pag_perturber(self, patterns: Sequence[str]) -> Callable[[int], AbstractContextManager[None]]:
        """PAG's switch on the MMDiT: the joint-attention layers ``patterns`` name (diffusers' rule,
        :func:`sdengine.models.mmdit.pag_joint_layers`) take PAG's perturbed map in the last rows of each call; a
        pattern that matches none is a one-line error; "mid" alone (the request's default) is :data:`SD3_PAG_LAYERS`."""
        from sdengine.errors import UsageError
        from sdengine.models.mmdit import pag_joint_layers, perturbed_attention

        if tuple(patterns) == ("mid",):  # the request's U-Net default: diffusers' SD3 default
            patterns = (SD3_PAG_LAYERS,)
        try:
            layers = pag_joint_layers(self.unet, list(patterns))
        except UsageError as e:
            raise GenerationError(f"{self.name} (SD3): {e}") from None
        return partial(perturbed_attention, layers)

    def guided_denoiser(self, cfg_scale: float, uncond: Any, rescale: float, **kw: Any) -> Any:
        """The core's guided denoiser, with PAG's scale falling with the step where ``pag_adaptive_scale`` is set
        (:class:`SD3Options`)."""
        den = super().guided_denoiser(cfg_scale, uncond, rescale, **kw)
        adaptive = self._call_pag_adaptive
        if adaptive and getattr(den, "pag_scale", 0.0) > 0:
            den.pag_schedule = partial(adaptive_pag_scale, den.pag_scale, adaptive, self.noise_schedule.multiplier)
        return den

    def controlled_network(self, net: Any, units: list[Any], **kw: Any) -> Any:
        """SD3 ControlNets on the MMDiT (:func:`sdengine.pipeline.dit_control.build_controlled_dit`)."""
        from sdengine.pipeline.dit_control import build_controlled_dit, vae_encoder

        return build_controlled_dit(net, units, family="sd3", **vae_encoder(self.vae), **kw)

    def loop_plan(self, p: Prepared, from_init: bool, first: int, noise_from: int | None = None) -> Any:
        """The core's plan, keyed also by the call's SD3 settings a recorded loop bakes in (the shift, skip-layer
        guidance, PAG's adaptive scale), in its scheduler-config field, which only keys the recording."""
        import json

        plan = super().loop_plan(p, from_init, first, noise_from)
        call = {"shift": self._call_shift, "slg": self._call_slg, "pag_adaptive_scale": self._call_pag_adaptive}
        config = {**json.loads(plan.scheduler_config), "sd3_call": call}
        return dataclasses.replace(plan, scheduler_config=json.dumps(config, sort_keys=True, default=str))

    def img2img_first_step(self, steps: int, strength: float, rule: str, sampler: str) -> int:
        return flow_img2img_start(steps, strength)

    def noised_latent(self, latent: Tensor, noise: Tensor, sigma: Any) -> Tensor:
        return flow_noise_scaling(sigma, noise, latent)

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """ "Shift": the flow shift the run sampled with (Forge's field name); skip-layer guidance's "Skip layer
        guidance" (its scale), "Skip layers", "Skip layer start" and "Skip layer stop" where it is on (sdengine's
        fields); read back by ``--from-png``."""
        row: dict[str, Any] = {"Shift": float(self.shift_of(request))}
        opts = SD3Options.coerce(request.sd3)
        if opts.skip_guidance_layers:
            row["Skip layer guidance"] = opts.skip_layer_guidance_scale
            row["Skip layers"] = ",".join(str(i) for i in opts.skip_guidance_layers)
            row["Skip layer start"] = opts.skip_layer_guidance_start
            row["Skip layer stop"] = opts.skip_layer_guidance_stop
        if opts.pag_adaptive_scale and request.pag_scale:
            row["PAG adaptive scale"] = opts.pag_adaptive_scale
        return row

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        """The MMDiT's: every block holds the image and text tokens at its width, a 4x MLP and a few
        temporaries (counted as 12 maps), plus attention scores where a kernel materialises them (heads x N x N
        in float32, at most CHUNK_SCORES per row)."""
        from sdengine.nn.attention import CHUNK_SCORES

        cfg = self.unet.config
        p = int(cfg.patch_size)
        n = (h // p) * (w // p) + 77 + T5_LENGTH  # image patches and (one chunk of) text tokens
        width = int(cfg.num_attention_heads) * int(cfg.attention_head_dim)
        scores = min(CHUNK_SCORES, int(cfg.num_attention_heads) * n * n) * 4
        return rows * (n * width * bytes_per * 12 + scores)

    # -- facts ----------------------------------------------------------------------------------------------

    @property
    def transformer(self) -> Any:
        """The MMDiT (held as ``unet``, the core's name for the denoising network)."""
        return self.unet

    @property
    def pooled_dim(self) -> int | None:
        return None  # no U-Net class embedding: the pooled vector goes to the MMDiT's own input

    @property
    def size_multiple(self) -> int:
        """Sides are multiples of the VAE factor x the patch size (16 for SD3)."""
        return self.vae_scale_factor * int(self.unet.config.patch_size)

    @property
    def has_t5(self) -> bool:
        return self.text_encoder_3 is not None

    def shift_of(self, request: GenerationRequest) -> float:
        return float(request.shift) if request.shift is not None else float(self.base_schedule.shift)

    def model_hash(self) -> str | None:
        """A1111's "Model hash": of the single file, or of a folder's transformer weights."""
        if self._model_hash is None:
            self._model_hash = files_hash_cached(hashed_files(self.source, "transformer"))
        return self._model_hash

    @property
    def family_defaults(self) -> dict[str, Any]:
        """The settings an SD3 run takes where its caller chose none (:data:`SD3_DEFAULTS`)."""
        return dict(SD3_DEFAULTS)

    # -- the call -------------------------------------------------------------------------------------------

    def prepare(self, request: GenerationRequest) -> Prepared:
        refused = refusals(request)
        if refused:
            raise GenerationError(f"{self.name} (SD3): {refused[0]}")
        SD3Options.coerce(request.sd3, int(self.unet.config.num_layers))  # bad settings: one line, before any work
        if isinstance(request.schedule, str) and request.schedule.strip().lower() == "auto":
            # SD3's own grid (diffusers' FlowMatchEulerDiscreteScheduler), unless the sampler's name says one
            request = request.replace(schedule=None)
        p = super().prepare(request)
        from sdengine.diffusion.flow import FLOW_SCHEDULES, flow_sampler_view
        from sdengine.errors import UsageError

        passes = [(p.sampler, p.schedule)] + ([(p.hires.sampler, p.hires.schedule)] if p.hires is not None else [])
        for sampler, schedule in passes:
            try:  # the samplers and schedules that are right on a flow model (sdengine.diffusion.flow)
                flow_sampler_view(sampler)
            except UsageError as e:
                raise GenerationError(f"{self.name} (SD3): {e}") from None
            if schedule not in FLOW_SCHEDULES:
                flows = ", ".join(FLOW_SCHEDULES)
                raise GenerationError(f"{self.name} (SD3): schedule {schedule!r} is not one of a flow model's: {flows}")
        if p.hires is not None:  # the second pass is an SD3 img2img: its first step by diffusers' SD3 rule
            start = flow_img2img_start(p.hires.steps, float(request.strength))
            if start >= p.hires.steps:
                raise GenerationError(
                    f"{self.name} (SD3): hires strength {request.strength} of {p.hires.steps} steps runs no step"
                )
            p = dataclasses.replace(p, hires=dataclasses.replace(p.hires, start=start))
        return p

    @contextmanager
    def _call_settings(self, request: GenerationRequest) -> Iterator[None]:
        """A call's shift and skip-layer guidance, which the schedule and the adapter read while it runs."""
        self._call_shift = None if request.shift is None else float(request.shift)
        self.conditioner.edit_chunks = self._edit_chunks(request)  # type: ignore[attr-defined]
        opts = SD3Options.coerce(request.sd3, int(self.unet.config.num_layers))
        self._call_pag_adaptive = opts.pag_adaptive_scale if request.pag_scale else 0.0
        cfg = float(request.cfg_scale)
        if opts.skip_guidance_layers and cfg > 1.0:  # diffusers: with guidance only
            steps = int(request.steps)
            self._call_slg = SkipLayerRun(
                opts.skip_guidance_layers,
                opts.skip_layer_guidance_scale / cfg,
                steps * opts.skip_layer_guidance_start,
                steps * opts.skip_layer_guidance_stop,
            )
        try:
            yield
        finally:
            self._call_shift = None
            self._call_slg = None
            self._call_pag_adaptive = 0.0

    def _edit_chunks(self, request: GenerationRequest) -> int:
        """The most CLIP chunks a text of the call's prompt-editing schedules takes (prompts, negative prompts and
        the hires fix's, at either pass's step count): what every scheduled text is padded to."""
        from sdengine.prompts import extract_lora_tags
        from sdengine.text.schedule import prompt_schedule

        r = request
        if not isinstance(r.steps, int) or r.steps < 1:
            return 1  # validate() says why
        texts = [t for t in (*r.prompts(), *r.negative_prompts(), r.hr_prompt, r.hr_negative_prompt) if t]
        if not any("[" in t for t in texts):
            return 1  # no editing: the pair path pads on its own
        counts = {r.steps, int(r.hr_second_pass_steps) or r.steps} if r.enable_hr else {r.steps}
        cond: Any = self.conditioner
        chunks = 1
        for text in texts:
            plain, _ = extract_lora_tags(text)
            for steps in counts:
                for _, scheduled in prompt_schedule(plain, steps):
                    chunks = max(chunks, cond.chunk_count(scheduled))
        return chunks

    def __call__(
        self, prompt: Any = "", negative_prompt: Any = None, *, hr_model: Any = None, **kwargs: Any
    ) -> GenerationResult:
        request = as_request(prompt, negative_prompt, kwargs)
        layers = request.pag_layers
        if request.pag_scale and isinstance(layers, str | list | tuple) and request.pag_layer_list() == ("mid",):
            request = request.replace(pag_layers=SD3_PAG_LAYERS)  # the request's U-Net default -> diffusers' SD3 one
        if hr_model is not None and hr_model is not self:
            raise GenerationError(
                f"{self.name} (SD3): another model for the hires fix's second pass (hr_model) is not supported"
            )
        with self._call_settings(request):
            return super().__call__(request)


# -- loading -------------------------------------------------------------------------------------------------

ENCODER_FLAGS = {"clip_l": "--clip-l", "clip_g": "--clip-g", "t5": "--t5"}


def load_sd3(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    name: str | None = None,
    lora_dir: str | Path | None = None,
) -> SD3Pipeline:
    """An SD3 / SD3.5 diffusers folder or Stability single file -> :class:`SD3Pipeline` (see
    :mod:`sdengine.weights.sd3_files` for the layouts). ``clip_l``, ``clip_g``, ``t5``: text encoders given apart
    (files or folders), used in place of the model's own; a model without CLIP encoders needs both CLIP ones; T5
    is optional (without it its 256 tokens are zeros, as diffusers' ``text_encoder_3=None``)."""
    from sdengine.pipeline.loading import clip_pad_token_id, clip_tokenizer
    from sdengine.text.t5_tokenizer import load_t5_tokenizer
    from sdengine.weights import sd3_files as sf
    from sdengine.weights.io import load_file
    from sdengine.weights.mmdit_file import load_mmdit
    from sdengine.weights.t5_file import load_t5_encoder

    folder = path.is_dir()
    given = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5}
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise GenerationError(f"{ENCODER_FLAGS[key]} {value}: no such file or folder")
    # what the model holds itself
    if folder:  # (a component given apart need not be in the folder)
        subs = {"clip_l": "text_encoder", "clip_g": "text_encoder_2", "t5": "text_encoder_3"}
        own = {k: sf.folder_component(path, sub) if given[k] is None else None for k, sub in subs.items()}
    else:
        keys = list(load_file(path)[0])  # a memory map: no tensor is read here
        own = {
            "clip_l": path if sf.has_clip(keys, "clip_l") else None,
            "clip_g": path if sf.has_clip(keys, "clip_g") else None,
            "t5": path if any(k.startswith(sf.T5_PREFIX) for k in keys) else None,
        }
    where = {k: Path(given[k]) if given[k] is not None else own[k] for k in given}  # type: ignore[arg-type]
    missing = [k for k in ("clip_l", "clip_g") if where[k] is None]
    if missing:
        flags = " and ".join(f"{ENCODER_FLAGS[k]} FILE" for k in missing)
        raise GenerationError(
            f"{path.name} has no {' and no '.join(missing)} text encoder: give {flags} (ComfyUI's clip_l.safetensors / "
            "clip_g.safetensors; --t5 FILE for T5-XXL, optional)"
        )
    transformer = load_mmdit(path, device=device, dtype=dtype)
    vae = sf.load_sd3_vae(path, device=device, dtype=dtype)
    encoders = {
        k: sf.load_clip_encoder(p, k, device=device, dtype=dtype)
        for k in ("clip_l", "clip_g")
        if (p := where[k]) is not None
    }
    t5_model = None
    tokenizer_3 = None
    if where["t5"] is not None:
        t5_model = load_t5_encoder(where["t5"], device=device, dtype=dtype)
        tok3 = path / "tokenizer_3" if folder else None
        tokenizer_3 = load_t5_tokenizer(tok3 if tok3 is not None and (tok3 / "tokenizer.json").is_file() else None)
    tok_dir = path / "tokenizer" if folder and (path / "tokenizer").is_dir() else None
    tok2_dir = path / "tokenizer_2" if folder and (path / "tokenizer_2").is_dir() else None
    tokenizer, tokenizer_2 = clip_tokenizer(tok_dir), clip_tokenizer(tok2_dir)
    return SD3Pipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=encoders["clip_l"],
        text_encoder_2=encoders["clip_g"],
        text_encoder_3=t5_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        scheduler_config=sf.scheduler_config(path),
        # SD3's CLIP-L pads with its end token, bigG with "!" (as SDXL's): the folders' tokenizer configs say so
        pad_token_id=clip_pad_token_id(tok_dir, tokenizer.vocab, "sd1"),
        pad_token_id_2=clip_pad_token_id(tok2_dir, tokenizer_2.vocab, "sd2"),
        device=device,
        dtype=dtype,
        name=name or path.name.removesuffix(path.suffix) or path.name,
        source=path,
        encoder_sources={k: Path(v) for k, v in given.items() if v is not None},
        lora_dir=lora_dir,
    )


__all__ = [
    "ENCODER_FLAGS",
    "SD3_DEFAULTS",
    "SD3_PAG_LAYERS",
    "MMDiTAdapter",
    "SD3Options",
    "SD3Pipeline",
    "SkipLayerRun",
    "adaptive_pag_scale",
    "load_sd3",
    "refusals",
]
