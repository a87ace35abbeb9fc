"""The Stable Diffusion pipeline: one batched core for text-to-image, img2img and inpainting.

Data flows one way::

    GenerationRequest --validate--> rows (prompt_i, negative_i, seed_i)
    prompts --conditioner.pair--> cond / uncond conditioning dicts (crossattn [, vector])
    seed_i --Generator--> [init posterior] -> noise -> [masked-image posterior]      (latents.start_latents)
    noise --sampling.sample(sampler, steps, schedule, init_latent, strength)--> latent
              ^ denoiser = [InpaintBlend or A1111Blend] o CFGDenoiser o Denoiser o UNetAdapter o U-Net [+ ControlNets]
    latent --vae_utils.decode (one row at a time, fp16 NaN fallback, tiles)--> image in [0, 1]

Rows whose text states differ in length (CLIP prompts of more than 75 tokens take more chunks) run as
separate sub-batches, so every row equals the same row generated alone.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdengine import vae_utils
from sdengine.diffusion import sampling
from sdengine.diffusion.brownian import BrownianSpec
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.edm import EDMDenoiser, EDMSchedule, is_edm_config
from sdengine.diffusion.guidance import CFGDenoiser, ImageCFGDenoiser
from sdengine.diffusion.multidiffusion import DECODE_PADDING, MultiDiffusionDenoiser
from sdengine.diffusion.philox import make_generator
from sdengine.diffusion.sag import fits_blur
from sdengine.diffusion.samplers import NoiseBank, SamplingInterrupted, row_noise
from sdengine.diffusion.schedules import (
    A1111_GRID_SAMPLERS,
    A1111_STRENGTH_RULES,
    A1111_TIMESTEP_SAMPLERS,
    NoiseSchedule,
    a1111_timestep_start,
    a1111_zero_terminal_snr,
    img2img_start,
    img2img_steps,
)
from sdengine.diffusion.variation import seed_resized_noise, variation_noise
from sdengine.errors import GenerationError, UsageError
from sdengine.io.images import load_image, to_uint8
from sdengine.io.resize import resize_image, resize_mode_name
from sdengine.nn.attention import CHUNK_SCORES, identity_attention, pag_layers
from sdengine.nn.deep_shrink import DeepShrink, DeepShrinkDenoiser, check_deep_shrink, deep_shrink_infotext
from sdengine.nn.freeu import FreeU, FreeUNet, check_freeu
from sdengine.nn.hypertile import (
    HyperTile,
    HyperTileNet,
    HyperTileRun,
    check_hypertile,
    vae_hypertile_applied,
    vae_hypertile_layer,
)
from sdengine.nn.ip_adapter import AdapterLayers, IPAdapterNet
from sdengine.nn.transformer import middle_attention_mass, middle_transformer
from sdengine.pipeline.control import ControlledUNet, ControlUnit, GraphedControlledUNet, build_controlled_unet
from sdengine.pipeline.finite import require_finite
from sdengine.pipeline.infotext import (
    call_parameters,
    files_hash_cached,
    format_infotext,
    hashed_files,
    init_resize_mode,
)
from sdengine.pipeline.ip_adapter import check_units, image_tokens
from sdengine.pipeline.latents import (
    A1111Blend,
    DifferentialBlend,
    DifferentialMask,
    InpaintBlend,
    blur_mask,
    cat_start_latents,
    differential_latent_mask,
    image_latent,
    start_latents,
)
from sdengine.pipeline.loop_graph import LoopPlan
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import Cancelled, GenerationResult, StepInfo
from sdengine.pipeline.soft_inpaint import SoftInpaintBlend, composite, composite_mask
from sdengine.pipeline.unet_adapter import UNetAdapter
from sdengine.text.conditioners import (
    Conditioning,
    TextConditioner,
    a1111_clip_skip_note,
    cat_conditioning,
    effective_clip_skip,
    make_conditioner,
)

log = logging.getLogger(__name__)


def grid_strength(r: GenerationRequest) -> float:
    """The strength the sampling grid is made for: the request's under diffusers' rule (LCM's grid depends on
    it), 1 under A1111's, whose schedule is the plain ``steps``-step one (the start step says where it begins)."""
    return float(r.strength) if r.strength_rule == "diffusers" else 1.0


def _a1111_grid(p: Prepared) -> bool:
    """Whether the run walks A1111's own DDIM / PLMS grid: A1111's step rules (strength_rule "a1111", its API
    routes) with one of those samplers (:func:`sdengine.diffusion.schedules.a1111_timestep_grid`)."""
    return p.request.strength_rule in A1111_STRENGTH_RULES and p.sampler in A1111_GRID_SAMPLERS


def a1111_changes_run(p: Prepared) -> bool:
    """Whether A1111's rules change the run's sigmas or its noise beyond the schedule (its discarded next-to-last
    sigma, its SDE samplers' Brownian trees), so that the infotext must say the rule."""
    a1111 = p.request.strength_rule in A1111_STRENGTH_RULES
    return discards_penultimate(p) or (a1111 and p.sampler in sampling.BROWNIAN_SAMPLERS)


def discards_penultimate(p: Prepared) -> bool:
    """Whether the grid drops its next-to-last sigma (:func:`sdengine.diffusion.sampling.make_grid`): asked for
    (A1111's ``always_discard_next_to_last_sigma``), or under A1111's rules with a sampler A1111 runs so
    (:data:`sdengine.diffusion.sampling.A1111_DISCARD_SAMPLERS`: DPM2, DPM2 a, DPM++ 3M SDE)."""
    r = p.request
    if bool(r.discard_penultimate_sigma):
        return True
    return r.strength_rule in A1111_STRENGTH_RULES and p.sampler in sampling.A1111_DISCARD_SAMPLERS


def _comfy_sag(r: GenerationRequest) -> bool:
    """Whether the request runs SAG under ComfyUI's rule, which reads the unconditional pass at cfg 1 too."""
    return bool(r.sag_scale) and r.sag_rule == "comfyui"


def _grid_steps(p: Prepared) -> int:
    """The steps of the sampling grid: the request's, or under A1111's img2img_fix_steps (strength_rule
    "a1111_fix_steps") img2img's ``steps / strength`` (:func:`sdengine.diffusion.schedules.img2img_steps`)."""
    r = p.request
    if p.init is not None and p.start_step is None and r.strength_rule == "a1111_fix_steps":
        return img2img_steps(int(r.steps), float(r.strength), r.strength_rule, p.sampler)[0]
    return int(r.steps)


# A1111's Hypertile U-Net defaults: its infotext writes a setting only where it is not the default
A1111_HYPERTILE_DEFAULTS = {"tile_size": 256, "swap_size": 3, "max_depth": 3}
A1111_HYPERTILE_VAE_DEFAULTS = {"tile_size": 128, "swap_size": 3, "max_depth": 3}  # its Hypertile VAE's


def hypertile_infotext(request: GenerationRequest) -> dict[str, Any]:
    """The infotext fields of a request's HyperTile: A1111's "Hypertile U-Net: True" (or, tiling only the hires
    fix's second pass, "Hypertile U-Net second pass: True" where a second pass runs), its "Hypertile U-Net max tile
    size", "max depth", "swap size" where not its defaults 256, 3, 3; sdengine's "Hypertile rule" and "Hypertile
    scale depth" where not "a1111" and true; then A1111's "Hypertile VAE: True" and its "Hypertile VAE max depth", "max
    tile size", "swap size" where not its defaults 3, 128, 3 (``hypertile_vae``)."""
    row: dict[str, Any] = {}
    tiles = request.hypertile_config()
    if tiles is not None and not (request.hypertile_hires_only and not request.enable_hr):
        row.update(_unet_hypertile_infotext(request, tiles))
    vae = request.hypertile_vae_config()
    if vae is not None:
        row["Hypertile VAE"] = True
        for key, name in (("max_depth", "max depth"), ("tile_size", "max tile size"), ("swap_size", "swap size")):
            if getattr(vae, key) != A1111_HYPERTILE_VAE_DEFAULTS[key]:
                row[f"Hypertile VAE {name}"] = getattr(vae, key)
    return row


def _unet_hypertile_infotext(request: GenerationRequest, tiles: HyperTile) -> dict[str, Any]:
    row: dict[str, Any] = {}
    row["Hypertile U-Net second pass" if request.hypertile_hires_only else "Hypertile U-Net"] = True
    for key, name in (("max_depth", "max depth"), ("tile_size", "max tile size"), ("swap_size", "swap size")):
        value = getattr(tiles, key)
        if value != A1111_HYPERTILE_DEFAULTS[key]:
            row[f"Hypertile U-Net {name}"] = value
    if tiles.rule != "a1111":
        row["Hypertile rule"] = tiles.rule
    if not tiles.scale_depth:
        row["Hypertile scale depth"] = False
    return row


@dataclass
class Prepared:
    """A validated request with the model-dependent facts settled, before any model runs."""

    request: GenerationRequest
    width: int
    height: int
    sampler: str
    schedule: str
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    init: Image.Image | None
    mask: np.ndarray | None  # float32 (H, W) in [0, 1], white = repaint
    tiled: bool | None
    notes: list[str]
    subseeds: list[int] | None = None  # variation seeds per row (None: no variation)
    hires: Any = None  # a sdengine.pipeline.hires.HiresPlan when the request asks for the hires fix
    # the first step of an img2img run where the request's strength does not say it (the hires second pass)
    start_step: int | None = None
    # HyperTile on the VAE (request.hypertile_vae): its generator, seeded with the first seed and shared by the
    # copies of this (the hires fix's passes), so the decodes draw in turn as A1111's (sdengine.nn.hypertile)
    vae_tiles: HyperTileRun | None = None
    # FLUX.1 Kontext's reference images, read and fitted (sdengine.pipeline.flux_kontext); None: none
    references: list[Any] | None = None
    # soft inpainting's composite mask of each row ("L", the output's size; 255 = the generated pixel), set while
    # sampling (sdengine.pipeline.soft_inpaint.composite_mask); empty without soft inpainting
    composite_masks: list[Any] = dataclasses.field(default_factory=list)
    # A1111's latent_mask (request.latent_mask): float32 (h, w) in [0, 1] at its own size, white = repaint; None:
    # the latent mask is made from ``mask``
    latent_mask: np.ndarray | None = None
    # per-row init images and masks (request.init_image / mask given as lists; ``init`` / ``mask`` are row 0's),
    # fitted as ``init`` / ``mask``; None: ``init`` / ``mask`` is every row's
    inits: list[Image.Image] | None = None
    masks: list[np.ndarray] | None = None


def _no_extra_tokens(encoder: Any) -> Any:
    """A graph guard: true while ``encoder`` has no textual-inversion vectors set (held weakly)."""
    ref = weakref.ref(encoder)

    def guard() -> bool:
        enc = ref()
        return enc is not None and enc.extra_token_vectors is None

    return guard


def _not_tiling(pipe: Pipeline) -> Any:
    """A graph guard: true unless ``pipe`` is inside a call with ``tiling`` (held weakly). Its networks then pad
    circularly, and a graph recorded with zero padding would replay that (:meth:`Pipeline.graphed` checks the same
    for the U-Net and the VAE; this one is for what is reached through :func:`sdengine.cuda_graphs.through`)."""
    ref = weakref.ref(pipe)

    def guard() -> bool:
        p = ref()
        return p is not None and not p._tiling

    return guard


def _note(notes: list[str], text: str) -> None:
    notes.append(text)
    log.warning(text)


# The size rule (Pipeline._check_work): each side at most MAX_SIZE_FACTOR x the model's training size and at
# most MAX_SIDE pixels, besides the memory estimate.
MAX_SIZE_FACTOR = 8
MAX_SIDE = 8192


def sag_size_error(width: int | None, height: int | None, factor: int) -> str:
    """Why an image of ``width`` x ``height`` (None: the model's size, not known here) is too small for
    self-attention guidance's 9 x 9 blur of its latent (``factor`` image pixels per latent pixel), or ""."""
    if width is None or height is None or fits_blur(int(height) // factor, int(width) // factor):
        return ""
    return (
        f"self-attention guidance blurs the latent with a 9 x 9 kernel and needs at least 5 x 5 latent pixels "
        f"({5 * factor} x {5 * factor} image pixels), got {width} x {height}"
    )


class Pipeline:
    """Stable Diffusion 1.x/2.x (and inpainting) text-to-image, img2img and inpainting. Build it with
    :func:`sdengine.pipeline.load_pipeline`; call it with a :class:`GenerationRequest` or its fields as
    keywords (``pipe("a cat", steps=20)``, ``pipe(["a", "b"], seed=[1, 2])``, ``pipe(request)``).

    Two text sides, decided once by :func:`sdengine.text.conditioners.make_conditioner`: CLIP (SD;
    ``text_encoder`` a CLIPTextModel, ``tokenizer`` a CLIPTokenizer) or, with ``context_length`` set,
    all-MiniLM-L6-v2 (the built-in ``emoji`` model). Everything after the conditioning dict is shared.
    """

    _tiling = False  # a call with tiling runs: the convolutions pad circularly, no recorded graph replays
    _zero_snr = False  # a call with zero_terminal_snr runs: noise_schedule is A1111's Zero Terminal SNR rescale
    weight_dtype = "default"  # load_pipeline(weight_dtype=...): the diffusion network's weights in fp8 (nn/fp8_storage)
    # init_image / mask as lists, one per row (each row's start latents its own image's: _sample_rows): U-Net models
    per_row_init_images = True

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: Any,
        tokenizer: Any,
        scheduler_config: Mapping[str, Any],
        prediction_type: str,
        pad_token_id: int,
        device: torch.device,
        dtype: torch.dtype,
        name: str = "model",
        source: Path | None = None,
        lora_dir: str | Path | None = None,
        context_length: int | None = None,
        vae_source: Path | None = None,
        conditioner: TextConditioner | None = None,
    ) -> None:
        # Any: the configs (unet.config, vae.config) are sdengine dataclasses the type checker cannot see.
        self.unet: Any = unet.eval().requires_grad_(False)
        self.vae: Any = vae.eval().requires_grad_(False)
        if isinstance(text_encoder, torch.nn.Module):
            text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.context_length = context_length  # MiniLM's fixed context (emoji: 32); None = CLIP chunks
        self.scheduler_config = dict(scheduler_config)
        self.prediction_type = prediction_type
        self.prediction_override: str | None = None  # set by load_pipeline(prediction_type=...): written in infotexts
        self.pad_token_id = pad_token_id
        self.device = device
        self.dtype = dtype
        self.name = name
        self.source = source
        self.lora_dir = lora_dir
        # the model's own training schedule; noise_schedule is it, or a call's Zero Terminal SNR rescale of it
        self.base_schedule = self.training_schedule()
        self._zero_snr_schedule: NoiseSchedule | None = None
        self.vae_upcast = False  # set once a half-precision decode gave NaN: later decodes go to fp32
        self._cuda_graphs: dict[str, Any] | None = None
        self._noise_draws: dict[str, int] = {}  # loop plan key -> per-step noise draws (see noise_draws)
        self._graph_opts: dict[str, Any] = {}  # how enable_cuda_graphs records (a tiny VAE set later uses it too)
        self.cuda_graphs = None  # see the property
        self.aot: dict[str, Any] | None = None  # name -> sdengine.aot.AOTCompiled, once enable_aot() was called
        # A family with its own conditioner (SDXL: two encoders) passes it in; the others are made here.
        self.conditioner: TextConditioner = conditioner or make_conditioner(
            text_encoder,
            tokenizer,
            unet_config=getattr(unet, "config", None),
            context_length=context_length,
            pad_token_id=pad_token_id,
            dtype=dtype,
            device=device,
            name=name,
        )
        self._model_hash: str | None = None
        self.vae_source = vae_source  # a VAE given apart from the model (--vae): named in the infotext
        self._vae_hash: str | None = None
        # sdengine.models.tiny_vae.TinyAutoencoder for previews and vae_decode="tiny" (set_tiny_vae)
        self.tiny_vae: Any = None

    # -- what a model family changes (SD3: sdengine.pipeline.sd3) ------------------------------------------

    def training_schedule(self) -> Any:
        """The model's own training schedule (``base_schedule``), from its scheduler config: the discrete VP
        schedule of the U-Net families."""
        if is_edm_config(self.scheduler_config):  # Playground v2.5, CosXL: EDM's continuous schedule
            try:
                return EDMSchedule.from_config(self.scheduler_config)
            except UsageError as e:
                raise GenerationError(f"{self.name}: scheduler config: {e}") from None
        return NoiseSchedule.from_config(**self.scheduler_config)

    def network_adapter(self, net: Any) -> Any:
        """The conditioning dict -> the network's arguments (:class:`UNetAdapter` for the U-Nets)."""
        return UNetAdapter(net, self.dtype)

    def controlled_network(self, net: Any, units: list[ControlUnit], **kw: Any) -> Any:
        """The network with the request's ControlNet units attached: the controlled U-Net
        (:func:`build_controlled_unet`, whose arguments ``kw`` are); SD3 and Flux attach their own."""
        return build_controlled_unet(net, units, **kw)

    def x0_denoiser(self, model: Any) -> Any:
        """The adapted network -> the x0-denoiser the samplers call: VP-trained U-Nets in the VE view
        (:class:`sdengine.diffusion.denoisers.Denoiser`, by ``prediction_type``)."""
        if isinstance(self.noise_schedule, EDMSchedule):  # EDM's preconditioning (sdengine.diffusion.edm)
            return EDMDenoiser(model, self.noise_schedule)
        return Denoiser(model, self.noise_schedule, self.prediction_type)

    def img2img_first_step(self, steps: int, strength: float, rule: str, sampler: str) -> int:
        """The first step of an img2img run on a grid of ``steps`` steps
        (:func:`sdengine.diffusion.schedules.img2img_start`, by ``rule``)."""
        return img2img_start(steps, strength, rule, sampler)

    def noised_latent(self, latent: Tensor, noise: Tensor, sigma: Any) -> Tensor:
        """A clean latent on the model's noising path at ``sigma`` (inpainting's known region): ``latent + sigma
        noise`` in the VE view the U-Net families sample in."""
        return latent + noise * sigma

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        """The infotext fields a model family adds to every image of ``request`` (none here)."""
        return {}

    # -- facts about the model ------------------------------------------------------------------------

    @property
    def noise_schedule(self) -> NoiseSchedule:
        """The training schedule the samplers walk: the model's own (``base_schedule``, its scheduler config's,
        ``rescale_betas_zero_snr`` included), or during a call with ``zero_terminal_snr`` A1111's Zero Terminal SNR
        rescale of it (:func:`sdengine.diffusion.schedules.a1111_zero_terminal_snr`)."""
        if not self._zero_snr:
            return self.base_schedule
        if self._zero_snr_schedule is None:
            self._zero_snr_schedule = a1111_zero_terminal_snr(self.base_schedule)
        return self._zero_snr_schedule

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downscale_factor

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def latent_rgb_map(self) -> vae_utils.LatentRGBMap | None:
        """The cheap previews' latent -> RGB map of this model family's latents (:class:`sdengine.vae_utils.
        LatentRGBMap`); SD's for 4-channel latents, None (grey previews) for a latent space with no known map. SD3
        and Flux name theirs."""
        return vae_utils.SD_LATENT_RGB if self.latent_channels == vae_utils.SD_LATENT_RGB.channels else None

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1

    @property
    def instruct_pix2pix(self) -> bool:
        """An InstructPix2Pix U-Net: the noisy latent and the image's latent in (8 channels for SD's 4)."""
        return self.unet.config.in_channels == 2 * self.latent_channels

    @property
    def default_size(self) -> int:
        """The training resolution: U-Net sample size x VAE factor (512 for SD 1.x, 768 for SD 2.x-v)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        return max(8, self.vae_scale_factor)

    @property
    def text_kind(self) -> str:
        """ "clip" (SD's chunked CLIP conditioning) or "minilm" (one fixed-length MiniLM context)."""
        return self.conditioner.kind

    @property
    def pooled_dim(self) -> int | None:
        """Size of the pooled text vector the U-Net adds to its timestep embedding (None: it has none)."""
        return getattr(getattr(self.unet, "config", None), "projection_class_embeddings_input_dim", None)

    def model_hash(self) -> str | None:
        """A1111's "Model hash" (SHA-256, 10 hex digits) of the weights file; computed once."""
        if self._model_hash is None:
            self._model_hash = files_hash_cached(hashed_files(self.source, "unet"))
        return self._model_hash

    def set_tiny_vae(self, tiny: Any) -> None:
        """Use ``tiny`` (a :class:`~sdengine.models.tiny_vae.TinyAutoencoder`, a TAESD file or an
        ``AutoencoderTiny`` folder; None removes it) for previews and ``vae_decode="tiny"``. It must decode this
        model's latents: the same channel count and pixels per latent, else a one-line error."""
        if tiny is None:
            self.tiny_vae = None
            if self.cuda_graphs is not None:
                self.cuda_graphs = {k: v for k, v in self.cuda_graphs.items() if k != "tiny_vae"}
            return
        from sdengine.models.tiny_vae import TinyAutoencoder

        if not isinstance(tiny, TinyAutoencoder):
            from sdengine.weights.tiny_vae_file import load_tiny_vae

            tiny = load_tiny_vae(tiny)
        cfg = tiny.config
        if cfg.latent_channels != self.latent_channels or (
            cfg.has_decoder and cfg.downscale_factor != self.vae_scale_factor
        ):
            raise GenerationError(
                f"the tiny VAE {tiny.name} decodes {cfg.latent_channels}-channel latents at "
                f"{cfg.downscale_factor}x, but {self.name}'s are {self.latent_channels}-channel at "
                f"{self.vae_scale_factor}x: use the tiny VAE made for this model family (taesd for SD 1.x/2.x, "
                "taesdxl for SDXL, taesd3 for SD3, taef1 for Flux.1)"
            )
        if not cfg.has_decoder:
            raise GenerationError(f"the tiny VAE {tiny.name} has no decoder (give its taesd_decoder file)")
        self._check_tiny_vae_family(tiny.name)
        self.tiny_vae = tiny.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        if self.cuda_graphs is not None:  # its decode replays from graphs as the VAE's does
            self.cuda_graphs = {**self.cuda_graphs, "tiny_vae": self._tiny_vae_graph(self.tiny_vae)}

    def _check_tiny_vae_family(self, name: str) -> None:
        """TAESD3 and TAEF1 both decode 16-channel 8x latents, so their shapes cannot tell them apart; their
        released names can: one named for the other 16-channel family is refused (it would give off colours)."""
        rgb = self.latent_rgb_map
        own = TINY_VAE_NAMES.get(rgb.name) if rgb is not None else None
        if rgb is None or own is None:
            return
        for family, prefix in TINY_VAE_NAMES.items():
            if prefix != own and name.lower().startswith(prefix):
                raise GenerationError(
                    f"the tiny VAE {name} is named for {TINY_VAE_FAMILIES[family]} ({prefix}), but {self.name} is "
                    f"{TINY_VAE_FAMILIES[rgb.name]}: its latents need {own} ({own}_decoder.safetensors)"
                )

    # How many separately chosen VAEs (set_vae) a pipeline keeps loaded for the next generations.
    VAES_KEPT = 3

    def set_vae(self, vae: str | Path | None, *, checkpoint_vae: bool = False) -> None:
        """Decode (and encode) with another VAE from now on: a VAE file (A1111's ``.vae.safetensors`` /
        ``.vae.pt``, a ``.safetensors`` in the LDM or diffusers layout) or a diffusers VAE folder, read as
        ``load_pipeline(vae=...)`` reads it (a file keeps the model's scaling factor) and named in the infotext
        (``VAE``, ``VAE hash``); None: the VAE the pipeline was loaded with again. ``checkpoint_vae``: the VAE
        the model itself carries, even where it was loaded with another (a ``NAME.vae.safetensors`` beside it,
        ``vae=``), A1111's ``sd_vae`` "None". Each VAE is read once and kept (:attr:`VAES_KEPT` of them); one
        that does not fit the model (other latent channels, wrong keys or shapes, not a VAE) is a one-line
        error that changes nothing. A chosen VAE decodes without the CUDA graphs / compiled decode of the
        pipeline's own."""
        from collections import OrderedDict

        from sdengine.io.paths import file_state
        from sdengine.weights.loading import build_on_meta, build_vae, load_checkpoint_vae

        if vae is not None and checkpoint_vae:
            raise GenerationError("set_vae: give a VAE or checkpoint_vae=True, not both")
        base = self.__dict__.setdefault(
            "_base_vae",
            (self.vae, self.vae_source, self._vae_hash, self.vae_upcast, self._accelerated_vae()),
        )
        if vae is None and (not checkpoint_vae or base[1] is None):
            if self.vae is not base[0]:
                self.vae, self.vae_source, self._vae_hash, self.vae_upcast = base[:4]
                self._route_vae(base[4])
            return
        cache: OrderedDict[tuple[Any, ...], torch.nn.Module] = self.__dict__.setdefault("_vae_cache", OrderedDict())
        unet_cfg = {"out_channels": getattr(self.unet.config, "out_channels", None)}
        if checkpoint_vae:
            if self.source is None:
                raise GenerationError(f"{self.name}: no model file to read its own VAE from")
            where: Path = Path(self.source)
        else:
            where = Path(vae)  # type: ignore[arg-type]
        try:
            key = ("own" if checkpoint_vae else "file", str(where.resolve()), *file_state(where))
        except OSError as e:
            raise GenerationError(f"VAE {where}: cannot be read ({e.strerror or e})") from None
        module: Any = cache.get(key)
        if module is None:
            if checkpoint_vae:
                from sdengine.models.vae import AutoencoderKL, VAEConfig

                sd, cfg = load_checkpoint_vae(where)
                vcfg = VAEConfig.from_diffusers(cfg)
                module = build_on_meta(lambda: AutoencoderKL(vcfg), sd, name="VAE", dtype=self.dtype).to(self.device)
            else:
                module = build_vae(
                    where,
                    scaling_factor=self._model_vae_scale(base),
                    model_vae_config={
                        "norm_num_groups": base[0].config.norm_num_groups,
                        "block_out_channels": list(base[0].config.block_out_channels),
                        "layers_per_block": base[0].config.layers_per_block,
                        # the model's latent statistics (Playground v2.5's), which the VAE takes (docs/edm.md)
                        "latents_mean": base[0].config.latents_mean,
                        "latents_std": base[0].config.latents_std,
                    },
                    unet_config=unet_cfg,
                    device=self.device,
                    dtype=self.dtype,
                )
            if module.config.latent_channels != base[0].config.latent_channels or (
                module.config.downscale_factor != base[0].config.downscale_factor
            ):
                raise GenerationError(
                    f"VAE {where.name}: it makes {module.config.latent_channels}-channel latents at "
                    f"{module.config.downscale_factor}x, {self.name}'s are {base[0].config.latent_channels}-channel "
                    f"at {base[0].config.downscale_factor}x: use a VAE made for this model"
                )
            module = _like(module.eval().requires_grad_(False), base[0])
            cache[key] = module
            while len(cache) > self.VAES_KEPT:
                cache.popitem(last=False)
        else:
            cache.move_to_end(key)
        if module is self.vae:
            return
        if self.vae is base[0]:  # keep the pipeline's own accelerated decode for when it comes back
            base = (*base[:4], self._accelerated_vae())
            self.__dict__["_base_vae"] = base
        self.vae = module
        self.vae_source = None if checkpoint_vae else where
        self._vae_hash = None
        self.vae_upcast = False
        self._route_vae((None, None))

    def _accelerated_vae(self) -> tuple[Any, Any]:
        return (self.cuda_graphs or {}).get("vae"), (self.aot or {}).get("vae")

    def _route_vae(self, accelerated: tuple[Any, Any]) -> None:
        graph, aot = accelerated
        if self.cuda_graphs is not None:
            graphs = {k: v for k, v in self.cuda_graphs.items() if k != "vae"}
            self.cuda_graphs = {**graphs, "vae": graph} if graph is not None else graphs
        if self.aot is not None:
            rest = {k: v for k, v in self.aot.items() if k != "vae"}
            self.aot = {**rest, "vae": aot} if aot is not None else rest

    def _model_vae_scale(self, base: tuple[Any, ...]) -> float:
        """The model's latent scaling factor, which a VAE *file* keeps (see load_vae_for_model): its own VAE's,
        from its folder's config where it was loaded with a VAE folder that states another."""
        import json

        own, source = base[0], base[1]
        if source is not None and Path(source).is_dir() and self.source is not None:
            cfg = Path(self.source) / "vae" / "config.json"
            if cfg.is_file():
                try:
                    value = json.loads(cfg.read_text(encoding="utf-8")).get("scaling_factor")
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        return float(value)
                except (OSError, ValueError):
                    pass
        return float(own.config.scaling_factor)

    def vae_name(self) -> str | None:
        """A1111's "VAE": the separate VAE's file name; None when the model's own VAE is used."""
        from sdengine.weights.vae_file import vae_display_name

        return vae_display_name(self.vae_source) if self.vae_source is not None else None

    def vae_hash(self) -> str | None:
        """A1111's "VAE hash": SHA-256 of the separate VAE's file, 10 hex digits (as "Model hash"); of a sharded
        VAE folder, of its shards' bytes in order (see :func:`hashed_files`); computed once."""
        if self._vae_hash is None and self.vae_source is not None:
            self._vae_hash = files_hash_cached(hashed_files(Path(self.vae_source), "vae"))
        return self._vae_hash

    # -- CUDA graphs -----------------------------------------------------------------------------------

    def enable_cuda_graphs(self, *, backend: Any = None, device_type: str = "cuda") -> bool:
        """Replay the U-Net's steps, the VAE decode and the CLIP text encoders from CUDA graphs
        (:mod:`sdengine.cuda_graphs`), recorded per shape on first use. Returns False, changing nothing, when
        the pipeline is not on ``device_type``. ``backend``: how a call is recorded (tests record on the CPU
        with a stand-in). A text encoder runs as it is while textual-inversion vectors are set on it (its
        embedding lookup branches on them) or a LoRA hooks it. The whole sampling loop as one graph:
        :meth:`enable_loop_graph`."""
        if self.device.type != device_type:
            return False
        from sdengine.cuda_graphs import GraphedCallable

        opts = {"backend": backend, "device_type": device_type}
        self._graph_opts = opts  # for a tiny VAE set later (set_tiny_vae)
        aot = self.aot or {}
        graphs: dict[str, Any] = {
            "unet": GraphedCallable(aot.get("unet", self.unet), module=self.unet, name="U-Net", **opts),
            "vae": GraphedCallable(aot.get("vae", self.vae.decode), module=self.vae, name="VAE decode", **opts),
        }
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(self, name, None)
            if isinstance(enc, torch.nn.Module) and hasattr(enc, "extra_token_vectors"):  # CLIP (not MiniLM)
                graphs[name] = GraphedCallable(
                    enc, module=enc, name=name.replace("_", " "), guard=_no_extra_tokens(enc), **opts
                )
        if self.tiny_vae is not None:
            graphs["tiny_vae"] = self._tiny_vae_graph(self.tiny_vae)
        self.cuda_graphs = graphs  # routes the text encoders' calls (the setter below)
        return True

    def _tiny_vae_graph(self, tiny: Any) -> Any:
        from sdengine.cuda_graphs import GraphedCallable

        # its decoder network, reached through cuda_graphs.through by every decode (outputs, previews); not while
        # a tiled call pads its convolutions circularly
        return GraphedCallable(
            tiny.decoder, module=tiny.decoder, name="tiny VAE decode", guard=_not_tiling(self), **self._graph_opts
        )

    def enable_loop_graph(self, *, backend: Any = None, device_type: str = "cuda", record_after: int = 1) -> bool:
        """Replay a generation's whole sampling loop as one CUDA graph where it can
        (:mod:`sdengine.pipeline.loop_graph`), beside the networks' own graphs (enabled here if they are not yet).
        Returns False, changing nothing, when the pipeline is not on ``device_type``. ``record_after``: how many
        times the same settings and shapes run the step graphs before their loop is recorded. Drop it again with
        ``pipe.cuda_graphs = {k: v for k, v in pipe.cuda_graphs.items() if k != "loop"}``."""
        if self.device.type != device_type:
            return False
        from sdengine.pipeline.loop_graph import SamplingLoopGraph

        if self.cuda_graphs is None:
            self.enable_cuda_graphs(backend=backend, device_type=device_type)
        loop = SamplingLoopGraph(
            self.run_loop_plan, module=self.unet, backend=backend, device_type=device_type, record_after=record_after
        )
        self.cuda_graphs = {**(self.cuda_graphs or {}), "loop": loop}
        return True

    @property
    def cuda_graphs(self) -> dict[str, Any] | None:
        """name -> GraphedCallable ("unet", "vae", "text_encoder", "text_encoder_2", "tiny_vae"), and "loop" (a
        :class:`sdengine.pipeline.loop_graph.SamplingLoopGraph`) when asked for, once :meth:`enable_cuda_graphs`
        was called; None: every network runs as it is."""
        return self._cuda_graphs

    @cuda_graphs.setter
    def cuda_graphs(self, graphs: dict[str, Any] | None) -> None:
        from sdengine.cuda_graphs import route

        # The prompt encoder calls a text encoder deep inside sdengine.prompts: it finds the graphs through
        # cuda_graphs.through, which follows these routes (set, or dropped with None, here).
        for name in ("text_encoder", "text_encoder_2"):
            enc = getattr(self, name, None)
            if isinstance(enc, torch.nn.Module):
                route(enc, (graphs or {}).get(name))
        tiny = getattr(self, "tiny_vae", None)  # (not set yet while __init__ runs)
        if tiny is not None and tiny.decoder is not None:  # sdengine.models.tiny_vae: its decode and previews
            route(tiny.decoder, (graphs or {}).get("tiny_vae"))
        self._cuda_graphs = graphs

    def enable_aot(self, cache_dir: str | Path) -> None:
        """Run the U-Net and the VAE decode from AOTInductor packages (:mod:`sdengine.aot`), compiled into
        ``cache_dir`` on first use per shape and loaded from there by later processes. Before
        :meth:`enable_cuda_graphs`, the graphs record the compiled networks."""
        from sdengine.aot import AOTCompiled, Decode

        self.aot = {
            "unet": AOTCompiled(self.unet, name="unet", cache_dir=cache_dir),
            "vae": AOTCompiled(Decode(self.vae), name="vae-decode", cache_dir=cache_dir),
        }

    def graphed(self, name: str) -> Any:
        """The accelerated callable ``name`` ("unet", "vae") for this generation: its CUDA graphs, else its
        ahead-of-time compiled network; None when there is neither, or the network carries hooks (a patched
        LoRA) and runs as it is."""
        if self._tiling:  # recorded / compiled with zero padding: the plain modules pad circularly
            return None
        g = (self.cuda_graphs or {}).get(name) or (self.aot or {}).get(name)
        return g if g is not None and g.usable() else None

    # -- text (the conditioner's, kept here for callers that hold a pipeline) ---------------------------

    def encode_prompt(
        self, prompt: str, negative_prompt: str, clip_skip: int = 1, notes: list[str] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(cond, uncond) token states in the U-Net's dtype: the conditioner's ``crossattn``."""
        cond, uncond = self.conditioner.pair(
            prompt,
            negative_prompt,
            clip_skip=clip_skip,
            note=(lambda t: _note(notes, t)) if notes is not None else _silent,
        )
        return cond["crossattn"], uncond["crossattn"]

    def encode_pooled(self, prompt: str, negative_prompt: str) -> tuple[Tensor, Tensor] | None:
        """(cond, uncond) pooled text vectors, each (1, D), for a U-Net that reads one; else None."""
        if self.pooled_dim is None:
            return None
        cond, uncond = self.conditioner.pair(prompt, negative_prompt)
        return cond["vector"], uncond["vector"]

    def unet_text_kwargs(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """What a trainer passes to the U-Net besides ``encoder_hidden_states`` for these captions:
        ``{"class_labels": (N, D) pooled vectors}`` for a U-Net that reads them, else nothing."""
        if self.pooled_dim is None:
            return {}
        return {"class_labels": self.conditioner(prompts)["vector"]}

    # -- checks ---------------------------------------------------------------------------------------

    def _check_size(self, what: str, value: Any) -> int:
        m = self.size_multiple
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise GenerationError(f"{what} must be an integer number of pixels, got {value!r}")
        value = int(value)
        if value <= 0:
            raise GenerationError(f"{what} must be positive, got {value}")
        if value % m:
            lo, hi = max(m, value // m * m), value // m * m + m
            near = lo if value - lo < hi - value else hi  # ties round up
            raise GenerationError(f"{what} {value} is not a multiple of {m}; the nearest valid {what} is {near}")
        return value

    def estimate_memory(self, width: int, height: int, batch_size: int, *, cfg: bool, tiled: bool) -> int:
        """Rough peak activation bytes of one call (the U-Net's widest level for the whole CFG batch, or
        the VAE decode of one image, whichever is larger). Errs high; used to refuse before allocating."""
        f = self.vae_scale_factor
        h, w = height // f, width // f
        bytes_per = torch.finfo(self.dtype).bits // 8
        rows = batch_size * (2 if cfg else 1)
        unet = self.network_activation_bytes(rows, h, w, bytes_per)
        vae = vae_utils.vae_decode_bytes(self.vae, height, width, tiled=tiled, bytes_per=bytes_per)
        images = batch_size * 3 * height * width * 4 * 3  # float images, arrays and uint8 copies
        return max(unet, vae) + images

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        """Rough peak activation bytes of one network call on ``rows`` latents of ``h`` x ``w`` (the U-Net's)."""
        c0 = int(self.unet.config.block_out_channels[0])
        # The first level keeps (layers + 1) skips and a few temporaries of c0 x h x w per row; the
        # attention runs through SDPA (fused kernels, no heads x N x N matrix), counted as one more map.
        unet = rows * c0 * h * w * bytes_per * 16
        # Plus the attention scores of the widest level where a kernel materialises them (the math path):
        # at most CHUNK_SCORES per row (sdengine.nn.attention runs larger attentions in query chunks), else
        # heads x N x N with 8 heads (SD 1.x's; errs high for fewer), in float32 for the softmax.
        n = h * w
        return unet + rows * min(CHUNK_SCORES, 8 * n * n) * 4

    def _check_memory(
        self, width: int, height: int, batch_size: int, cfg: bool, tiled: bool | None, notes: list[str]
    ) -> bool | None:
        avail = vae_utils.available_memory(self.device)
        if avail is None:
            return tiled
        budget = int(avail * 0.9)
        need = self.estimate_memory(width, height, batch_size, cfg=cfg, tiled=bool(tiled))
        if need <= budget:
            return tiled
        if tiled is None:  # would tiling the VAE make it fit?
            need_tiled = self.estimate_memory(width, height, batch_size, cfg=cfg, tiled=True)
            if need_tiled <= budget:
                _note(notes, f"{width}x{height}: decoding the VAE in tiles to fit in memory")
                return True
            need = need_tiled
        gib = 1024**3
        raise GenerationError(
            f"{width}x{height} x {batch_size} needs about {need / gib:.1f} GiB on {self.device.type}, only "
            f"{avail / gib:.1f} GiB is free: use a smaller size or batch"
        )

    def max_side(self) -> int:
        """The largest width or height this model takes: MAX_SIZE_FACTOR x its training size, and never over
        MAX_SIDE pixels (see ``_check_work``)."""
        return min(MAX_SIDE, MAX_SIZE_FACTOR * self.default_size)

    def _check_work(self, width: int, height: int) -> None:
        # Memory is not the only limit: self-attention work grows with the square of the pixel count, so
        # 4096x4096 on a 32-px model or 100000x64 ran for many minutes per step while fitting in memory. Past
        # 8x the training size a model only repeats its subject, so such sizes are refused up front.
        limit = self.max_side()
        if width > limit or height > limit:
            raise GenerationError(
                f"{width}x{height} is too large for {self.name}: each side may be at most {limit} px "
                f"({MAX_SIZE_FACTOR}x its training size {self.default_size}, never over {MAX_SIDE}); "
                "larger sizes take very long and only repeat the subject"
            )

    def prepare(self, request: GenerationRequest) -> Prepared:
        """Validate ``request`` against this model and read its images (no model runs but an IP-Adapter's image
        encoder)."""
        r = request
        notes: list[str] = []
        width = self._check_size("width", self.default_size if r.width is None else r.width)
        height = self._check_size("height", self.default_size if r.height is None else r.height)
        r.validate()
        self.refuse_row_images(r)
        if r.control_image is not None and not self.takes_control_image:
            raise GenerationError(
                f"control_image is the control map of a FLUX.1 Depth / Canny model; {self.name} takes none (a "
                "ControlNet takes its map in controlnets / --control)"
            )
        if r.clip_skip_rule != "sdengine":  # A1111 applies its clip skip to SD 1.x's CLIP only: say where not
            skipped = a1111_clip_skip_note(self.conditioner, r.clip_skip, r.clip_skip_rule)
            if skipped is not None:
                _note(notes, skipped)
        if r.vae_decode == "tiny" and self.tiny_vae is None:
            raise GenerationError(
                f"vae_decode='tiny' needs a tiny VAE and {self.name} has none loaded: "
                "load_pipeline(tiny_vae=FILE), or --tiny-vae FILE (a TAESD decoder)"
            )
        if r.pag_scale:  # the layers exist in this network (one line naming the pattern, before any model runs)
            self.pag_perturber(r.pag_layer_list())
        if r.sag_scale:  # the middle block's self-attention exists, the latent takes the 9 x 9 blur (before any run)
            middle_transformer(self.unet)
            if r.sag_rule == "diffusers":  # ComfyUI's rule skips SAG on a latent too small for the blur
                too_small = sag_size_error(r.width, r.height, self.vae_scale_factor)
                if too_small:
                    raise GenerationError(too_small)
        freeu = r.freeu_settings()
        if freeu is not None:  # FreeU changes some up block of this U-Net (one line, before any model runs)
            check_freeu(self.unet, freeu)
        shrink = r.deep_shrink_settings()
        if shrink is not None:  # Deep Shrink's block is one of this U-Net's (one line, before any model runs)
            try:
                check_deep_shrink(self.unet, shrink)
            except UsageError as e:
                raise GenerationError(str(e)) from None
        tiles = r.hypertile_config()
        if tiles is not None:  # HyperTile has a self-attention layer to tile in this U-Net (one line)
            check_hypertile(self.unet, tiles)
        multi = r.tiled_diffusion_settings()
        if multi is not None:  # the views can be laid out on this latent (one line, before any model runs)
            f = self.vae_scale_factor
            try:
                multi.check_size(height // f, width // f)
            except UsageError as e:
                raise GenerationError(str(e)) from None
            if r.sag_scale and r.sag_rule == "diffusers":  # SAG blurs each view's latent: the views must take it
                view = (min(multi.window, width // f) * f, min(multi.height, height // f) * f)
                too_small = sag_size_error(*view, f)
                if too_small:
                    raise GenerationError(f"tiled diffusion's views: {too_small}")
        vae_tiles = r.hypertile_vae_config()
        if vae_tiles is not None:  # and on the VAE, its decoder's middle-block attention (one line)
            try:
                vae_hypertile_layer(self.vae)
            except UsageError as e:
                raise GenerationError(str(e)) from None
        if r.sdxl is not None and self.text_kind != "sdxl":
            raise GenerationError(f"sdxl settings apply to SDXL models only; {self.name} is not one")
        flux2_dev = self.text_kind == "flux2" and bool(getattr(self, "dev", False))  # FLUX.2 [dev] takes it too
        if r.distilled_cfg_scale is not None and self.text_kind != "flux" and not flux2_dev:
            raise GenerationError(
                f"distilled_cfg_scale (--guidance) applies to FLUX.1 [dev] only (and FLUX.2 [dev]); {self.name} is "
                "neither"
            )
        if r.reference_list() and self.text_kind != "flux":
            raise GenerationError(
                f"reference_images (--reference-image) are FLUX.1 Kontext's; {self.name} is not a Flux model"
            )
        if r.redux and self.text_kind != "flux":
            raise GenerationError(
                f"redux (FLUX.1 Redux image prompts) applies to FLUX.1 models; {self.name} is not one"
            )
        if r.sd3 is not None and self.text_kind != "sd3":
            raise GenerationError(f"sd3 settings apply to SD3 models only; {self.name} is not one")
        if r.shift is not None and isinstance(self.base_schedule, NoiseSchedule | EDMSchedule):
            raise GenerationError(f"shift applies to flow models (SD3) only; {self.name} is not one")
        if r.zero_terminal_snr and isinstance(self.base_schedule, EDMSchedule):
            raise GenerationError(f"zero_terminal_snr rescales a VP schedule; {self.name} is an EDM model")
        check_instruct_pix2pix(self, r, notes)
        if int(r.steps) > self.noise_schedule.num_train_timesteps:
            raise GenerationError(f"steps must be at most {self.noise_schedule.num_train_timesteps}, got {r.steps}")
        name, sched = sampling.resolve(r.sampler, r.schedule, sdxl=self.text_kind == "sdxl")
        if r.init_image is not None and r.strength_rule == "a1111_fix_steps":
            total = img2img_steps(int(r.steps), float(r.strength), r.strength_rule, name)[0]
            if total > self.noise_schedule.num_train_timesteps:
                raise GenerationError(
                    f"strength {r.strength} with {r.steps} steps and img2img_fix_steps needs a schedule of {total} "
                    f"steps (steps / strength), over the model's {self.noise_schedule.num_train_timesteps}: raise "
                    "strength or lower the steps"
                )
        hires = None
        if r.enable_hr:
            from sdengine.pipeline.hires import plan_hires

            hires = plan_hires(self, r, width, height, name, sched)
        seeds = r.seeds()
        wide = sorted({s for s in seeds if s >= 2**32})
        if wide:  # docs/CONTRACTS.md "Seeds": what torch's CPU generator does with a 64-bit seed
            low = wide[0] % 2**32
            why = "torch's CPU generator keeps a seed's low 32 bits, as diffusers, A1111 and ComfyUI do"
            passes = (name, *((hires.sampler,) if hires is not None else ()))
            a1111 = r.strength_rule in A1111_STRENGTH_RULES
            sde = [n for n in passes if n in sampling.BROWNIAN_SAMPLERS] if a1111 else []
            if sde:  # A1111's Brownian tree (pipeline/core.py, sample) takes the whole seed as its entropy
                _note(
                    notes,
                    f"seed {wide[0]} starts from the same noise as seed {low} ({why}), but {sde[0]}'s Brownian-tree "
                    "noise under A1111's rules takes the whole seed: the two give different images",
                )
            else:
                _note(
                    notes,
                    f"seed {wide[0]} draws the same noise as seed {low} ({why}): seeds that agree modulo 2**32 give "
                    "one image",
                )
        big_w, big_h = (hires.width, hires.height) if hires is not None else (width, height)
        tiny_encodes = r.vae_encode == "tiny" and self._encodes_images(r.init_image is not None, hires)
        if tiny_encodes and (self.tiny_vae is None or self.tiny_vae.encoder is None):
            which = "has none loaded" if self.tiny_vae is None else f"has one without an encoder ({self.tiny_vae.name})"
            raise GenerationError(
                f"vae_encode='tiny' needs a tiny VAE with an encoder and {self.name} {which}: give a TAESD "
                "encoder too (taesd_encoder beside taesd_decoder, or an AutoencoderTiny folder)"
            )
        vae_tiling = r.vae_tiling
        if r.tiling:  # a tile's circular padding would wrap the tile, not the image
            if vae_tiling:
                raise GenerationError("tiling (seamless images) cannot be combined with vae_tiling (a tiled VAE)")
            vae_tiling = False
        two_passes = float(r.cfg_scale) != 1.0 or name in sampling.CFG_PP_SAMPLERS or _comfy_sag(r)
        tiled = self._check_memory(big_w, big_h, len(seeds), two_passes, vae_tiling, notes)
        self._check_work(width, height)
        if hires is not None:
            self._check_work(big_w, big_h)
        init = mask = None
        inits: list[Image.Image] | None = None
        masks: list[np.ndarray] | None = None

        def once(text: str) -> None:  # per-row images of one size: their fitting said once
            if text not in notes:
                _note(notes, text)

        def fit_init(init: Image.Image) -> Image.Image:
            if r.init_latent_resize and init.size != (width, height):
                # A1111's "Just resize (latent upscale)": encoded at its own size, the latent resized (start_latents)
                f = self.vae_scale_factor
                if init.width % f or init.height % f:
                    raise GenerationError(
                        f"init_latent_resize: the init image {init.width}x{init.height} is encoded at its own size, "
                        f"so its sides must be multiples of {f}"
                    )
                if self.inpainting:
                    raise GenerationError(
                        f"init_latent_resize: {self.name} is an inpainting model (9-channel U-Net), whose masked "
                        f"image must have the output size; give the init image at {width}x{height}"
                    )
                once(f"init image {init.size[0]}x{init.size[1]}: its latent resized to {width}x{height}")
            elif init.size != (width, height):
                mode = resize_mode_name(r.resize_mode)
                once(f"init image {init.size[0]}x{init.size[1]} fitted to {width}x{height} ({mode})")
                init = resize_image(init, width, height, mode)
            return init

        if r.init_image is not None:
            if r.row_images:  # one per row: read once per distinct image, of one size, each fitted as one alone
                inits = _row_images(r.init_images(), "init image", "RGB", fit_init)
                init = inits[0]
            else:
                init = fit_init(load_image(r.one_init_image(), "init image", mode="RGB", error=GenerationError))
        if r.differential_diffusion and self.inpainting:
            raise GenerationError(
                f"differential_diffusion: {self.name} is an inpainting model (9-channel U-Net), which takes the mask "
                "in its input rather than blending it; use a 4-channel model"
            )
        if r.soft_inpainting_settings() is not None:
            # (an inpainting model's mask input is left grey then, as A1111's mask_round off: start_latents)
            if not isinstance(self.base_schedule, NoiseSchedule):
                raise GenerationError(
                    f"soft_inpainting: {self.name} is not a U-Net on a discrete noise schedule (SD 1.x / 2.x / SDXL), "
                    "the models A1111's soft inpainting reads sigma of; not done for it in sdengine"
                )

        def fit_mask(m: Image.Image) -> np.ndarray:
            if m.size != (width, height):
                once(f"mask {m.size[0]}x{m.size[1]} resized to {width}x{height} (the image size)")
                m = m.resize((width, height), Image.Resampling.LANCZOS)
            out = np.asarray(m, dtype=np.float32) / 255.0
            if r.mask_blur > 0:
                out = blur_mask(out, float(r.mask_blur))
            return out

        if r.mask is not None:
            if r.row_images:
                masks = _row_images(r.masks(), "mask", "L", fit_mask)
                mask = masks[0]
            else:
                mask = fit_mask(load_image(r.one_mask(), "mask", mode="L", error=GenerationError))
        latent_mask = None
        if r.latent_mask is not None:  # A1111's: shrunk to the latent from its own size, neither blurred nor fitted
            lm = load_image(r.latent_mask, "latent mask", mode="L", error=GenerationError)
            latent_mask = np.asarray(lm, dtype=np.float32) / 255.0
        for k, unit in enumerate(r.control_units()):
            size = getattr(unit.image, "size", None)  # a PIL image's (w, h); tensors/arrays/paths are not said
            if isinstance(size, tuple) and len(size) == 2 and size != (width, height):
                _note(
                    notes,
                    f"control image {k} {size[0]}x{size[1]} fitted to {width}x{height} "
                    f"({resize_mode_name(r.resize_mode)})",
                )
        if (width, height) != (self.default_size, self.default_size) and multi is None:
            # larger sizes tend to repeat the subject (the model never saw them); say so rather than stay silent
            # (not under tiled diffusion: the U-Net sees the windows only)
            _note(
                notes,
                f"{width}x{height} is not the model's training size {self.default_size}x"
                f"{self.default_size}: subjects may repeat or be cut off",
            )
        if (
            r.ip_adapters
        ):  # files loaded, pictures encoded; they fit this U-Net and the batch (one line, before sampling)
            r = dataclasses.replace(r, ip_adapters=check_units(r.ip_adapters, self.unet, len(seeds), dtype=self.dtype))
        return Prepared(
            r,
            width,
            height,
            name,
            sched,
            r.prompts(),
            r.negative_prompts(),
            seeds,
            init,
            mask,
            tiled,
            notes,
            r.subseeds(),
            hires,
            vae_tiles=None if vae_tiles is None else HyperTileRun(vae_tiles, int(seeds[0]), self.vae_scale_factor),
            latent_mask=latent_mask,
            inits=inits,
            masks=masks,
        )

    def refuse_row_images(self, r: GenerationRequest) -> None:
        """One line where ``r`` gives an init image (or mask) per row and this model takes one per call."""
        if r.row_images and not self.per_row_init_images:
            raise GenerationError(
                f"init_image / mask as a list (one per row) is for U-Net models (SD 1.x, 2.x, SDXL); {self.name} "
                "takes one init image per call"
            )

    # -- the call -------------------------------------------------------------------------------------

    def __call__(
        self, prompt: Any = "", negative_prompt: Any = None, *, hr_model: Any = None, **kwargs: Any
    ) -> GenerationResult:
        """Generate the request's images: ``pipe(request)``, ``pipe(request, steps=10)`` (fields replaced)
        or ``pipe(prompt_or_prompts, negative_prompt, **fields)``; see :class:`GenerationRequest`.
        ``hr_model``: another loaded pipeline that runs the hires fix's second pass (A1111's
        ``hr_checkpoint_name``; it must share this model's latent space), None for this one."""
        request = as_request(prompt, negative_prompt, kwargs)
        self.refuse_row_images(request)  # before a family's own prepare reads the init image
        p = self.prepare(request)
        if hr_model is self:
            hr_model = None
        if hr_model is not None:
            check_hr_model(self, hr_model, request)
        from sdengine.prompts import extract_lora_tags

        tag_lists = [extract_lora_tags(t)[1] for t in p.prompts]
        if any(t != tag_lists[0] for t in tag_lists):
            raise GenerationError(
                "every prompt of a batch must name the same <lora:...> tags (the LoRAs are "
                "applied to the model once per call)"
            )
        from sdengine.weights.lora import lora_entry

        lora_list: list[tuple[Any, Any]] = [lora_entry(item) for item in (request.loras or [])]
        lora_list += tag_lists[0]
        lora_dir = request.lora_dir or self.lora_dir
        handle = None
        if lora_list:
            from sdengine.weights.lora import apply_loras

            # MiniLM is not an nn.Module: apply_loras refuses LoRAs with text-encoder layers for it.
            te2 = getattr(self, "text_encoder_2", None)  # SDXL
            handle = apply_loras(self.unet, self.text_encoder, lora_list, lora_dir, text_encoder_2=te2)
            p.notes.extend(n for n in handle.notes if n not in p.notes)  # a LoRA named twice (logged there)
        try:
            with torch.inference_mode(), zero_snr_call(request, self, hr_model):
                if request.tiling:  # the U-Net's and the VAE's convolutions, as A1111's; and the tiny VAE's and
                    # the ControlNets' (in generate), which A1111 leaves out (a decode or a residual that seams)
                    self._tiling = True
                    with circular_padding(self.unet, self.vae, self.tiny_vae):
                        images = self.generate(p, hr_model)
                else:
                    images = self.generate(p, hr_model)
        finally:
            self._tiling = False
            if handle is not None:
                handle.remove()

        arrays = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (N, H, W, 3)
        pil = [Image.fromarray(a) for a in to_uint8(arrays)]
        units = request.control_units()
        rows = []
        for prompt_i, negative_i, seed in zip(p.prompts, p.negatives, p.seeds, strict=True):
            rows.append(
                call_parameters(
                    prompt=prompt_i,
                    negative_prompt=negative_i,
                    steps=int(request.steps),
                    sampler=p.sampler,
                    schedule=sampling.infotext_schedule(p.schedule, sdxl=self.text_kind == "sdxl"),
                    cfg_scale=float(request.cfg_scale),
                    seed=seed,
                    width=p.width,
                    height=p.height,
                    model=self.name,
                    model_hash=self.model_hash(),
                    vae=self.vae_name(),
                    vae_hash=self.vae_hash(),
                    strength=float(request.strength)
                    if p.init is not None and not _ip2p_pure_noise(self, r=request)
                    else None,
                    clip_skip=request.clip_skip,
                    clip_skip_rule=request.clip_skip_rule,
                    guidance_rescale=float(request.guidance_rescale),
                    loras=lora_list,
                    n_tag_loras=len(tag_lists[0]),
                    lora_dir=lora_dir,
                    controlnets=units,
                    guess_mode=bool(request.guess_mode),
                    ip_adapters=request.ip_adapters or (),
                    mask_blur=float(request.mask_blur) if p.mask is not None else None,
                    resize_mode=init_resize_mode(request) if (p.init is not None or units) else None,
                    sampler_options=request.sampler_options,
                    prediction_override=self.prediction_override,
                    # how the img2img / hires second pass counted its steps
                    # txt2img has no strength, but DDIM / PLMS walk A1111's grid under its rules, DPM2, DPM2 a,
                    # DPM++ 3M SDE drop their next-to-last sigma and the SDE samplers draw Brownian noise: said too
                    strength_rule=request.strength_rule
                    if (p.init is not None or p.hires is not None or _a1111_grid(p) or a1111_changes_run(p))
                    else "diffusers",
                    sdxl=request.sdxl,
                )
            )
        for i, row in enumerate(rows):
            cfg = 0.0 if _comfy_sag(request) else float(request.cfg_scale)  # the negative is encoded then (below)
            if self.pads_conds(p.prompts[i], p.negatives[i], int(request.steps), cfg, p.sampler):
                row["Pad conds"] = True  # what A1111 writes when its "Pad prompt/negative prompt" padded
            if p.subseeds is not None:  # A1111's names, read back by sdengine.metadata.to_generate_kwargs
                row.update(
                    {"Variation seed": p.subseeds[i], "Variation seed strength": float(request.subseed_strength)}
                )
            if request.seed_resize_from is not None:  # A1111's field (width x height)
                row["Seed resize from"] = "{}x{}".format(*request.seed_resize_from)
            if request.tiling:
                row["Tiling"] = True  # A1111 writes "Tiling: True"
            if p.init is not None and float(request.noise_multiplier) != 1.0:
                row["Noise multiplier"] = float(request.noise_multiplier)  # A1111's field (img2img)
            if p.mask is not None and request.masked_content != "original":  # sdengine's (A1111 writes none)
                row["Masked content"] = request.masked_content
            if p.mask is not None and float(request.differential_diffusion) > 0:  # sdengine's
                row["Differential diffusion"] = float(request.differential_diffusion)
            soft = request.soft_inpainting_settings()
            if p.mask is not None and soft is not None:  # A1111's soft inpainting fields, as its script writes them
                row.update(soft.infotext())
            if request.noise_source == "nv":  # A1111's "RNG: NV" (it writes the field when not its default GPU)
                row["RNG"] = "NV"
            if int(request.noise_seed_delta) and sampling.SAMPLERS[p.sampler].stochastic:
                row["ENSD"] = int(request.noise_seed_delta)  # A1111's, written where the sampler draws noise
            if request.discard_penultimate_sigma:  # A1111's, where its option (not the sampler) discarded
                row["Discard penultimate sigma"] = True
            if request.zero_terminal_snr:  # A1111's, where its sd_noise_schedule option rescaled
                row["Noise Schedule"] = "Zero Terminal SNR"
            if request.pag_scale:  # sdengine's: perturbed-attention guidance (read back by to_generate_kwargs)
                row["PAG scale"] = float(request.pag_scale)
                if request.pag_layer_list() != ("mid",):
                    row["PAG layers"] = ",".join(request.pag_layer_list())
            if request.sag_scale:  # sdengine's: self-attention guidance (read back by to_generate_kwargs)
                row["SAG scale"] = float(request.sag_scale)
                row["SAG blur sigma"] = float(request.sag_blur_sigma)
                if request.sag_rule != "diffusers":
                    row["SAG rule"] = request.sag_rule
            freeu = request.freeu_settings()
            if freeu is not None:  # sdengine's "FreeU: b1,b2,s1,s2", its version and rule where not 2 and width
                row["FreeU"] = ",".join(f"{x:g}" for x in freeu.factors)
                if freeu.version != 2:
                    row["FreeU version"] = freeu.version
                if freeu.rule != "width":
                    row["FreeU rule"] = freeu.rule
            shrink = request.deep_shrink_settings()
            if shrink is not None:  # Forge's Kohya HRFix fields, as its script writes them
                row.update(deep_shrink_infotext(shrink))
            row.update(hypertile_infotext(request))
            multi = request.tiled_diffusion_settings()
            if multi is not None:  # sdengine's MultiDiffusion fields (sdengine.metadata.tiled_diffusion_kwargs)
                row.update(multi.infotext())
            if self.instruct_pix2pix:  # A1111's field: the image guidance of an instruct-pix2pix model
                row["Image CFG scale"] = request.image_cfg()
            row.update(self.infotext_fields(request))
        # sdengine.text.embeddings.EmbeddingLibrary (the SDXL refiner's is its one encoder's, tokenizer_2's)
        embeddings = getattr(self.tokenizer, "embeddings", None) or getattr(
            getattr(self, "tokenizer_2", None), "embeddings", None
        )
        if embeddings is not None:
            from sdengine.metadata import format_lora_hashes

            for i, row in enumerate(rows):
                used = embeddings.used(p.prompts[i], p.negatives[i])
                if used:  # A1111's field: "name: hash, ..." of the embeddings the prompt and negative use
                    row["TI hashes"] = format_lora_hashes(used)
        if request.vae_decode == "tiny":
            for row in rows:
                row["Tiny VAE"] = self.tiny_vae.name  # the pixels are the tiny decoder's, not the VAE's
        if request.vae_encode == "tiny" and self._encodes_images(p.init is not None, p.hires):
            for row in rows:
                row["Tiny VAE encode"] = self.tiny_vae.name  # the init latent is the tiny encoder's
        if p.hires is not None:
            from sdengine.pipeline.hires import infotext_fields

            for i, row in enumerate(rows):
                row.update(infotext_fields(p, i, sdxl=self.text_kind == "sdxl"))
                if hr_model is not None:  # A1111's field: the second pass's model, "name [hash]"
                    row["Hires checkpoint"] = model_title(hr_model)
        infotexts = [format_infotext(r) for r in rows]
        per_row = [{"prompt": r["prompt"], "negative_prompt": r["negative_prompt"], "seed": r["seed"]} for r in rows]
        masks = list(p.composite_masks) if p.composite_masks else None
        return GenerationResult(pil, arrays, rows[0], p.seeds, infotexts, p.notes, per_row, masks)

    def generate(self, p: Prepared, hr_model: Any = None) -> Tensor:
        """(N, 3, H, W) images in [0, 1] for a prepared request (the hires fix's second pass included, on
        ``hr_model`` where given)."""
        if p.hires is not None:
            from sdengine.pipeline.hires import generate_hires

            return generate_hires(self, p, hr_model)
        images = self.decode_latents(p, self.sample_latents(p))
        soft = p.request.soft_inpainting_settings()
        if p.composite_masks and p.init is not None and soft is not None and soft.composite:
            # A1111's soft inpainting: the generated image laid over the init image by each row's composite mask
            original = np.asarray(p.init.convert("RGB"), dtype=np.float32) / 255.0
            laid = [
                torch.from_numpy(composite(img.permute(1, 2, 0).float().cpu().numpy(), original, m))
                for img, m in zip(images, p.composite_masks, strict=True)
            ]
            images = torch.stack(laid).permute(0, 3, 1, 2).to(images.device, images.dtype)
        return images

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        """(N, C, h, w) sampled latents (before the VAE) for a prepared request; rows with text states of
        different lengths run as separate sub-batches. ``init_latent`` (N, C, h, w), scaled as the U-Net sees
        it, is an img2img start given as a latent (the hires fix's latent upscale): only the noise is drawn
        from each row's generator, and sampling starts at ``request.strength``."""
        r = p.request
        note = lambda t: _note(p.notes, t)  # noqa: E731
        from sdengine.pipeline.prompt_editing import first_conditioning, row_schedules

        negatives = self.encoded_negatives(p)
        schedules = row_schedules(
            self.conditioner,
            p.prompts,
            negatives,
            int(r.steps),
            clip_skip=self.clip_skip_of(r),
            note=note,
            positive=self.edited_positive(p),
        )
        if schedules is not None:  # prompt editing: each row's texts switch per step (A1111's [a:b:when], [a|b])
            by_length: dict[int, list[int]] = {}
            for i, s in enumerate(schedules):
                by_length.setdefault(s.length, []).append(i)
            done: list[Tensor | None] = [None] * len(p.seeds)
            for rows in by_length.values():
                cond, uncond = first_conditioning([schedules[i] for i in rows])
                start = None if init_latent is None else init_latent[rows]
                latents = self._sample_rows(p, rows, cond, uncond, start, [schedules[i] for i in rows])
                for j, i in enumerate(rows):
                    done[i] = latents[j : j + 1]
            return torch.cat([t for t in done if t is not None])
        pairs: dict[tuple[str, str], tuple[Conditioning, Conditioning]] = {}
        for key in zip(p.prompts, negatives, strict=True):
            if key not in pairs:
                pairs[key] = self.conditioning_pair(key[0], key[1], p, note)
        groups: dict[int, list[int]] = {}
        for i, key in enumerate(zip(p.prompts, negatives, strict=True)):
            groups.setdefault(int(pairs[key][0]["crossattn"].shape[1]), []).append(i)
        out: list[Tensor | None] = [None] * len(p.seeds)
        for rows in groups.values():
            keys = [(p.prompts[i], negatives[i]) for i in rows]
            cond = cat_conditioning([pairs[k][0] for k in keys])
            uncond = cat_conditioning([pairs[k][1] for k in keys])
            latents = self._sample_rows(p, rows, cond, uncond, None if init_latent is None else init_latent[rows])
            for j, i in enumerate(rows):
                out[i] = latents[j : j + 1]
        return torch.cat([t for t in out if t is not None])

    def pads_conds(self, prompt: str, negative: str, steps: int, cfg_scale: float, sampler: str = "") -> bool:
        """Whether a row's prompt and negative prompt states were of different chunk counts, so that the
        shorter was padded with the empty prompt's chunks (each counted at its longest over the prompt-editing
        schedule, as A1111 encodes a schedule's texts together). That is A1111's "Pad prompt/negative prompt"
        option, which A1111 records as "Pad conds: True" when it padded; without it A1111 runs the two
        halves unpadded, another image. CLIP models only (MiniLM has one fixed length; SDXL pads an empty
        negative with zeros, which A1111 does not), and never at cfg_scale 1 (no negative is encoded) unless the
        ``sampler`` is a CFG++ one (which reads the unconditional pass there too)."""
        conditioner: Any = self.conditioner
        if cfg_scale == 1.0 and sampler not in sampling.CFG_PP_SAMPLERS:
            return False
        if getattr(conditioner, "kind", None) != "clip":
            return False
        from sdengine.prompts import extract_lora_tags, prompt_chunks
        from sdengine.text.schedule import prompt_schedule

        def chunks(text: str) -> int:
            plain, _ = extract_lora_tags(text)
            texts = [t for _, t in prompt_schedule(plain, steps)]
            pad = conditioner.pad_token_id
            return max(len(prompt_chunks(conditioner.tokenizer, t, pad_token_id=pad)) for t in texts)

        return chunks(prompt) != chunks(negative)

    def encoded_negatives(self, p: Prepared) -> list[str]:
        """The negative prompts the call encodes: its own, except at ``cfg_scale`` 1, where guidance runs no
        unconditional pass (CFGDenoiser) and the negative must not touch the image; a long one once padded
        the prompt's states to its length. Empty then, as diffusers, ComfyUI and A1111 ignore it; except for the
        CFG++ samplers, whose steps read the unconditional pass at scale 1 too (ComfyUI's run it with the
        negative), and ComfyUI's SAG rule, which runs the unconditional rows at scale 1 too (its SelfAttentionGuidance
        node, with the negative)."""
        if float(p.request.cfg_scale) != 1.0 or p.sampler in sampling.CFG_PP_SAMPLERS or _comfy_sag(p.request):
            return list(p.negatives)
        return [""] * len(p.negatives)

    @property
    def takes_control_image(self) -> bool:
        """Whether the network takes a request's ``control_image`` (FLUX.1 Depth / Canny)."""
        return False

    def start_latent_options(self, p: Prepared) -> dict[str, Any]:
        """More arguments of :func:`start_latents` for a model family whose network takes an image's latent
        beside the noisy one (FLUX.1 Fill, Depth and Canny: :mod:`sdengine.pipeline.flux_fill`); none here."""
        return {}

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) of one row's prompts; a family that conditions on more than the text (SDXL: the
        image size) overrides this."""
        return self.conditioner.pair(prompt, negative, clip_skip=self.clip_skip_of(p.request), note=note)

    def edited_positive(self, p: Prepared) -> Callable[[Conditioning], Conditioning] | None:
        """Under prompt editing, what each step's positive text's conditioning becomes (None: as encoded); a
        family that adds to the conditional rows' text (FLUX.1 Redux's image tokens) overrides this."""
        return None

    def clip_skip_of(self, r: GenerationRequest) -> Any:
        """The conditioner's clip_skip for a request: its own, or A1111's mapped (``clip_skip_rule``; SDXL's
        "a1111_sdxl_clip_l": a (CLIP-L, bigG) pair)."""
        return effective_clip_skip(self.conditioner, r.clip_skip, r.clip_skip_rule)

    def _sample_rows(
        self,
        p: Prepared,
        rows: list[int],
        cond: Conditioning,
        uncond: Conditioning,
        init_latent: Tensor | None,
        texts: Any = None,
    ) -> Tensor:
        r = p.request
        dev = self.device
        steps, strength, cfg_scale = _grid_steps(p), float(r.strength), ip2p_cfg(self, r)
        gens = [make_generator(p.seeds[i], r.noise_source) for i in rows]
        pure_noise = _ip2p_pure_noise(self, r)  # diffusers' instruct-pix2pix: the image in the concat only
        common: dict[str, Any] = dict(
            latent_channels=self.latent_channels,
            width=p.width,
            height=p.height,
            scale_factor=self.vae_scale_factor,
            mask_blur=float(r.mask_blur),
            strength=strength,
            nine_channels=self.inpainting,
            tiled=p.tiled,
            device=dev,
            tiny=self.tiny_vae if r.vae_encode == "tiny" else None,
            # A1111 noises the init latent at strength 1 too (diffusers starts inpainting from pure noise)
            pure_noise_at_full_strength=r.strength_rule == "diffusers",
            latent_mask=p.latent_mask,
            # A1111's mask_round; its soft inpainting turns it off: the latent mask (nmask) stays grey
            mask_round=bool(r.mask_round) and r.soft_inpainting_settings() is None,
            **self.start_latent_options(p),
        )
        if p.inits is None:
            start = start_latents(self.vae, generators=gens, init=None if pure_noise else p.init, mask=p.mask, **common)
        else:  # an init image (and mask) per row: each run of rows sharing one is started as that image's call alone
            inits = p.inits
            row_masks: list[np.ndarray | None] = list(p.masks) if p.masks is not None else [None] * len(inits)
            runs: list[list[int]] = []  # positions in ``rows`` of consecutive rows with the same image and mask
            for k, i in enumerate(rows):
                j = rows[runs[-1][0]] if runs else None  # the current run's first row (its image read once)
                if j is not None and inits[i] is inits[j] and row_masks[i] is row_masks[j]:
                    runs[-1].append(k)
                else:
                    runs.append([k])
            start = cat_start_latents(
                [
                    start_latents(
                        self.vae,
                        generators=[gens[k] for k in run],
                        init=inits[rows[run[0]]],
                        mask=row_masks[rows[run[0]]],
                        **common,
                    )
                    for run in runs
                ]
            )
        if init_latent is not None:
            start.init_latent, start.from_init = init_latent.to(dev, start.noise.dtype), True
        subseeds = None if p.subseeds is None else [p.subseeds[i] for i in rows]
        if r.seed_resize_from is not None:  # A1111's "Resize seed from": drawn at that size, pasted centred
            f = self.vae_scale_factor
            size = (r.seed_resize_from[1] // f, r.seed_resize_from[0] // f)
            start.noise = seed_resized_noise(
                start.noise, [p.seeds[i] for i in rows], size, subseeds, float(r.subseed_strength), r.noise_source
            )
        elif subseeds is not None:
            start.noise = variation_noise(start.noise, subseeds, float(r.subseed_strength), r.noise_source)
        soft = r.soft_inpainting_settings()
        if init_latent is None and r.masked_content != "original" and start.init_latent is not None:
            # A1111's "latent noise" / "latent nothing": the init latent replaced where the rounded latent mask
            # repaints, by the row's unit noise or by zeros (its StableDiffusionProcessingImg2Img.init)
            lat = start.rounded_mask  # A1111's rounded latent mask (its nmask)
            if lat is not None:
                repaint = lat
                fill = start.noise if r.masked_content == "latent noise" else torch.zeros_like(start.noise)
                start.init_latent = start.init_latent * (1 - repaint) + fill * repaint
        if int(r.noise_seed_delta):  # A1111's ENSD: the per-step noise from seed + delta, after the start noise
            gens = [make_generator(p.seeds[i] + int(r.noise_seed_delta), r.noise_source) for i in rows]
        if init_latent is None and p.init is not None and float(r.noise_multiplier) != 1.0:
            # A1111's img2img "Noise multiplier": the noise it adds to the init image's latent (drawn as above),
            # not a hires second pass's (init_latent given)
            start.noise = start.noise * float(r.noise_multiplier)
        if start.concat is not None:
            cond = {**cond, "concat": start.concat}
        if self.instruct_pix2pix and p.init is not None:  # the image's latent: the VAE's mode, unscaled
            tiny = self.tiny_vae if r.vae_encode == "tiny" else None
            image = image_latent(self.vae, p.init, tiled=p.tiled, device=dev, tiny=tiny)
            if isinstance(self.base_schedule, EDMSchedule):  # CosXL Edit reads it scaled (is_cosxl_edit)
                image = image * float(self.vae.config.scaling_factor)
            cond = {**cond, "concat": image.expand(len(rows), -1, -1, -1)}
        image_cfg = image_guidance(self, r)
        a1111_grid = _a1111_grid(p)
        grid = sampling.make_grid(
            p.sampler,
            steps,
            self.noise_schedule,
            p.schedule,
            self.scheduler_config,
            grid_strength(r) if start.init_latent is not None else 1.0,
            a1111_grid=a1111_grid,
            discard_penultimate=discards_penultimate(p),
        )
        brownian = None
        if r.strength_rule in A1111_STRENGTH_RULES and p.sampler in sampling.BROWNIAN_SAMPLERS:
            # A1111's SDE noise: one Brownian tree per image, seeded by its seed, over the whole grid's sigma range
            brownian = BrownianSpec.over([p.seeds[i] for i in rows], grid.sigmas)
        first, noise_from = 0, None
        if start.from_init:
            # grid.steps: a sigma-table schedule may have another length than steps (ComfyUI's ddim_uniform);
            # A1111's DDIM / PLMS grid is counted on the steps asked, then placed on its own grid
            length = steps if a1111_grid else grid.steps
            if p.start_step is not None:
                first = p.start_step
            elif r.strength_rule == "a1111_fix_steps":  # the last steps of the longer schedule (_grid_steps)
                first = length - (steps - img2img_steps(int(r.steps), strength, r.strength_rule, p.sampler)[1])
            else:
                first = self.img2img_first_step(length, strength, r.strength_rule, p.sampler)
            if a1111_grid:
                first, noise_from = a1111_timestep_start(grid.steps, steps - first)
        net: Any = self.unet
        units = r.control_units()
        # PAG switches attention layers of the plain U-Net per call, which a step graph (or an ahead-of-time package)
        # would replay unswitched: those run the plain network (the whole-loop graph keys PAG in its plan)
        pag = (float(r.pag_scale), r.pag_layer_list()) if r.pag_scale else None
        # FreeU changes the up blocks of the plain U-Net during its calls: the same (a step graph would replay them
        # as recorded; the whole-loop graph keys FreeU in its plan)
        freeu = r.freeu_settings()
        # Deep Shrink resizes the plain U-Net's hidden states in some calls (a step graph has one shape per input)
        shrink = r.deep_shrink_settings()
        # HyperTile draws each call's tiles in Python: the plain network too (the whole-loop graph keys it and the
        # seed in its plan)
        tiles = r.hypertile_settings()
        hypertile: tuple[Any, ...] | None = None if tiles is None else (tiles, int(p.seeds[0]))
        # HyperTile on the VAE too: A1111's one generator, reseeded at this pass's start, draws the U-Net's tiles,
        # then the decode's (the whole-loop graph, whose draws are made once at its recording, is not replayed)
        shared_draws = hypertile is not None and p.vae_tiles is not None
        if shared_draws:
            assert p.vae_tiles is not None
            hypertile = (tiles, int(p.seeds[0]), p.vae_tiles.rng)
        # SAG records the middle block's attention map in the plain U-Net's calls: the same
        sag = r.sag_settings()
        # IP-Adapter sets the plain U-Net's cross-attention layers per call (its image tokens ride in the
        # conditioning dict as ip_tokens): the plain network too, and no whole-loop graph
        ip = (
            image_tokens(
                list(r.ip_adapters),
                len(p.seeds),
                dev,
                self.dtype,
                log_sigmas=getattr(self.noise_schedule, "log_sigmas", None),  # a flow schedule has none (Flux)
            )
            if r.ip_adapters
            else None
        )
        if ip is not None:
            cond = {**cond, "ip_tokens": ip.cond[rows]}
            uncond = {**uncond, "ip_tokens": ip.uncond[rows]}
        plain = pag is None and freeu is None and sag is None and shrink is None and hypertile is None and ip is None
        if not units and plain:
            net = self.graphed("unet") or net
        if units:
            if pag is not None and any(u.reference is not None for u in units):
                # PAG's perturbed layers answer with the identity map, without the reference's tokens
                raise GenerationError("reference control and PAG (pag_scale) cannot run together")
            units = [_rows_of(u, rows, len(p.seeds)) for u in units]
            net = self.controlled_network(
                net,
                units,
                width=p.width,
                height=p.height,
                grid=grid,
                guess_mode=r.guess_mode,
                device=dev,
                dtype=self.dtype,
                start_step=first,
                resize_mode=resize_mode_name(r.resize_mode),
                note=lambda t: _note(p.notes, t) if t not in p.notes else None,
                noise_schedule=self.noise_schedule,
                encode_reference=lambda img: self._reference_latents(img, p.tiled),
                reference_seed=int(p.seeds[rows[0]]),
            )
            # graphs on, the U-Net unhooked: the controlled step (reference units hook the U-Net's layers per call)
            plain = pag is None and freeu is None and sag is None and hypertile is None and ip is None
            views = r.tiled_diffusion is None  # MultiDiffusion's views cut the maps per call (view_hints)
            controlled = isinstance(net, ControlledUNet)  # SD3 / Flux attach their own (no graphs)
            if controlled and self.graphed("unet") is not None and plain and net.references is None and views:
                graphed_control = GraphedControlledUNet(net, **self._graph_opts)
                net = graphed_control if graphed_control.usable() else net
        den: Any = self.guided_denoiser(
            cfg_scale,
            uncond,
            float(r.guidance_rescale),
            net=net,
            texts=texts,
            pag=pag,
            freeu=freeu,
            sag=sag,
            deep_shrink=shrink,
            hypertile=hypertile,
            ip_adapters=None if ip is None else ip.layers,
            image_cfg=image_cfg,
        )
        multi = r.tiled_diffusion_settings()
        if multi is not None:  # MultiDiffusion: the guided denoiser run on windows of the latent, averaged
            if texts is not None and multi.view_batch > 1:  # prompt editing's rows count one view's
                multi = dataclasses.replace(multi, view_batch=1)
                _note(p.notes, "tiled diffusion: prompt editing runs one view per call (view_batch 1)")
            hook = net.view_hints if isinstance(net, ControlledUNet) else None  # each view's ControlNet hints
            den = MultiDiffusionDenoiser(den, multi, view_hook=hook)
        blend: Any = None
        if soft is not None:
            if start.rounded_mask is None or start.init_latent is None:
                raise GenerationError(f"soft_inpainting: {self.name} does not blend a mask while sampling")
            # A1111's timestep samplers blend the network's input, at the call's timestep (mask_before_denoising)
            before = r.strength_rule in A1111_STRENGTH_RULES and p.sampler in A1111_TIMESTEP_SAMPLERS
            den = blend = SoftInpaintBlend(den, start.init_latent, start.rounded_mask, soft, before=before)
        elif (
            r.strength_rule in A1111_STRENGTH_RULES and start.rounded_mask is not None and start.init_latent is not None
        ):
            # A1111's blend, for every U-Net: its k-diffusion samplers' on x0, its timestep samplers' on x
            before = p.sampler in A1111_TIMESTEP_SAMPLERS
            den = blend = A1111Blend(den, start.init_latent, start.rounded_mask, before=before)
        elif start.blend_mask is not None and float(r.differential_diffusion) > 0:
            # Differential Diffusion: the grey mask at the latent's size, each call's threshold in the model's
            # timestep between the run's first sigma and its last (ComfyUI's rule: DifferentialMask)
            assert start.init_latent is not None and p.mask is not None
            grey = differential_latent_mask(torch.from_numpy(p.mask), *start.noise.shape[-2:]).to(dev)
            rule = DifferentialMask.over(
                grey,
                self.noise_schedule,
                float(grid.sigmas[first]),
                float(grid.sigmas[-1]),
                float(r.differential_diffusion),
            )
            den = blend = DifferentialBlend(den, start.init_latent, start.noise, rule, noising=self.noised_latent)
        elif start.blend_mask is not None:
            assert start.init_latent is not None
            den = blend = InpaintBlend(
                den, start.init_latent, start.noise, start.blend_mask, noising=self.noised_latent
            )
        if float(r.differential_diffusion) > 0 and not isinstance(blend, DifferentialBlend):
            raise GenerationError(
                f"differential_diffusion: {self.name} does not blend the mask while sampling (it takes the masked "
                "image in its input); use a model without one"
            )

        run_steps = grid.steps - first
        from tqdm.auto import tqdm

        bar = tqdm(total=run_steps, disable=not r.progress, unit="step", desc="sampling", leave=False)
        callback = r.callback

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            bar.update(i + 1 - bar.n)
            if callback is not None:
                return callback(
                    StepInfo(i + 1, run_steps, float(sigma), x, denoised, self.tiny_vae, self.latent_rgb_map)
                )
            return None

        loop = None if self._tiling else (self.cuda_graphs or {}).get("loop")
        replay_loop = (
            loop is not None
            and not units
            and ip is None  # the adapters' layers are set per call of the plain U-Net: never recorded
            and texts is None
            and blend is None
            and start.noise.device.type == loop.device_type
            and loop.usable()
            and p.sampler not in sampling.ADAPTIVE_SAMPLERS  # its steps depend on the model's answers
            and brownian is None  # a Brownian tree's noise is read at the run's sigmas, not drawn beforehand
            and not shared_draws
            and multi is None  # the recorded loop calls the U-Net on the whole latent
            and image_cfg is None  # the three-way guidance is not the recorded loop's
        )
        init_latent = start.init_latent if start.from_init else None
        plan = self.loop_plan(p, init_latent is not None, first, noise_from)
        padding = ExitStack()
        if units and self._tiling:
            # Tiling: the ControlNets' convolutions pad circularly too (A1111 leaves them at zeros, so their
            # residuals differ at the edges and the image may seam); the control map is read as tiling as well.
            padding.enter_context(circular_padding(*(u.net for u in net.units)))
        try:
            x_loop = None
            if replay_loop:  # every step in one replay (sdengine.pipeline.loop_graph); the callback once, at the end
                assert loop is not None
                # the per-step noise, drawn now from the rows' generators in the order the sampler would draw it
                shape = tuple(start.noise.shape[1:])
                k = self.noise_draws(plan)
                draws = torch.stack([row_noise(gens, shape) for _ in range(k)]).to(dev) if k else None
                x_loop = loop(plan, start.noise, init_latent, cond, uncond, draws)
            if x_loop is not None:
                x = x_loop
                if on_step(run_steps - 1, float(grid.sigmas[-2]), x, x) is False:  # the last step's start
                    raise SamplingInterrupted(run_steps - 1, x, x)
            else:
                x = self.sample_plan(
                    den, plan, start.noise, init_latent, cond, generators=gens, callback=on_step, brownian=brownian
                )
        except SamplingInterrupted as e:
            raise Cancelled(e.step + 1, run_steps, vae_utils.latent_preview(e.denoised, self.latent_rgb_map)) from None
        finally:
            bar.close()
            padding.close()
        if blend is not None:
            x = blend.finish(x)
        require_finite(x, "latents after sampling")  # before the VAE: a NaN latent decodes to black
        if isinstance(blend, SoftInpaintBlend):  # A1111's post_sample: the composite mask of each row
            masks = composite_mask(blend.init, x, blend.mask, blend.settings, p.width, p.height)
            if len(p.composite_masks) != len(p.seeds):
                p.composite_masks = [None] * len(p.seeds)
            for i, m in zip(rows, masks, strict=True):
                p.composite_masks[i] = m
        return x

    def _reference_latents(self, images: Tensor, tiled: bool | None) -> Tensor:
        """Reference control's latents of (N, 3, H, W) images in [0, 1]: the VAE posterior's mean, scaled."""
        post = vae_utils.encode_moments(self.vae, images * 2.0 - 1.0, tiled=tiled)
        return self.vae.scale_latents(post.mean.float())

    def pag_perturber(self, patterns: Sequence[str]) -> Callable[[int], AbstractContextManager[None]]:
        """Perturbed-attention guidance's switch on this pipeline's network for the layer ``patterns``: ``f(rows)``,
        a context manager under which the last ``rows`` rows of its calls are the perturbed pass (a U-Net's: the
        identity map in the self-attention layers :func:`sdengine.nn.attention.pag_layers` picks). A pattern that
        matches no layer is a one-line error."""
        return partial(identity_attention, pag_layers(self.unet, list(patterns)))

    def guided_denoiser(
        self,
        cfg_scale: float,
        uncond: Conditioning,
        rescale: float,
        *,
        net: Any = None,
        texts: Any = None,
        pag: tuple[float, Sequence[str]] | None = None,
        freeu: FreeU | None = None,
        sag: tuple[Any, ...] | None = None,
        deep_shrink: DeepShrink | None = None,
        hypertile: tuple[Any, ...] | None = None,
        ip_adapters: Sequence[AdapterLayers] | None = None,
        image_cfg: float | None = None,
    ) -> Any:
        """The x0-denoiser the samplers call: classifier-free guidance over the U-Net (``net``: what runs in its
        place, a graph or a controlled U-Net); ``texts``: prompt editing's text rows of each step; ``pag``: (scale,
        layer patterns) of perturbed-attention guidance on this pipeline's U-Net (the plain network runs it: a
        step graph would replay its attention unperturbed); ``freeu``: FreeU on this pipeline's U-Net for each call
        (:mod:`sdengine.nn.freeu`; the plain network runs it too); ``sag``: (scale, blur sigma[, rule]) of
        self-attention guidance (:meth:`GenerationRequest.sag_settings`; the rule "diffusers" unless given), reading
        the middle-block attention map of this pipeline's U-Net (the plain network runs it too); ``deep_shrink``: Deep
        Shrink on this pipeline's U-Net in the calls whose sigma is in its window (:mod:`sdengine.nn.deep_shrink`; the
        plain network too); ``hypertile``: (settings, seed[, generator]) of HyperTile on this pipeline's U-Net's
        self-attention, one generator (the one given, else its own) seeded with ``seed`` for this denoiser's calls
        (:mod:`sdengine.nn.hypertile`); ``ip_adapters``:
        IP-Adapters on this pipeline's U-Net's cross-attention, the calls' image tokens read from the conditioning's
        ``ip_tokens`` (:mod:`sdengine.nn.ip_adapter`; the plain network too); ``image_cfg``: InstructPix2Pix's
        image guidance scale, the three-way guidance (:class:`sdengine.diffusion.guidance.ImageCFGDenoiser`) in
        place of CFG (None: CFG)."""
        net = self.unet if net is None else net
        if freeu is not None:
            net = FreeUNet(net, self.unet, freeu)
        if hypertile is not None:
            rng = hypertile[2] if len(hypertile) > 2 else None
            net = HyperTileNet(net, self.unet, hypertile[0], hypertile[1], scale=self.vae_scale_factor, rng=rng)
        if ip_adapters:
            net = IPAdapterNet(net, self.unet, ip_adapters)
        model: Any = self.network_adapter(net)
        if texts is not None:  # prompt editing: the text rows of each step (sdengine.pipeline.prompt_editing)
            from sdengine.pipeline.prompt_editing import StepTexts

            model = StepTexts(model, texts)
        den: Any = self.x0_denoiser(model)
        if deep_shrink is not None:
            den = DeepShrinkDenoiser(den, self.unet, deep_shrink)
        pag_scale, perturb = 0.0, None
        if pag is not None and float(pag[0]) > 0:
            pag_scale, perturb = float(pag[0]), self.pag_perturber(pag[1])
        sag_scale, sag_blur, sag_rule, attention_map = 0.0, 1.0, "diffusers", None
        if sag is not None and float(sag[0]) != 0:
            sag_scale, sag_blur = float(sag[0]), float(sag[1])
            sag_rule = str(sag[2]) if len(sag) > 2 else "diffusers"
            middle_transformer(self.unet)  # one line where the U-Net has no middle-block transformer
            attention_map = partial(middle_attention_mass, self.unet)
        if image_cfg is not None:
            return ImageCFGDenoiser(den, cfg_scale, image_cfg, uncond)
        return CFGDenoiser(
            den,
            cfg_scale,
            uncond,
            rescale=rescale,
            pag_scale=pag_scale,
            perturb=perturb,
            sag_scale=sag_scale,
            sag_blur_sigma=sag_blur,
            attention_map=attention_map,
            sag_rule=sag_rule,
        )

    def loop_plan(self, p: Prepared, from_init: bool, first: int, noise_from: int | None = None) -> LoopPlan:
        """The settings a recorded sampling loop of ``p`` bakes in (:class:`sdengine.pipeline.loop_graph.LoopPlan`):
        ``from_init``, an img2img start; ``first``, its first step; ``noise_from``, the grid index its init is
        noised to where that is not ``first`` (A1111's DDIM / PLMS)."""
        r = p.request
        freeu = r.freeu_settings()
        shrink = r.deep_shrink_settings()
        tiles = r.hypertile_settings()
        return LoopPlan.of(
            sampler=p.sampler,
            steps=_grid_steps(p),
            schedule=p.schedule,
            scheduler_config=self.scheduler_config,
            cfg_scale=ip2p_cfg(self, r),
            rescale=float(r.guidance_rescale),
            sampler_options=r.sampler_options,
            strength=grid_strength(r) if from_init else 1.0,
            start_step=first if from_init else None,
            dtype=self.dtype,
            a1111_grid=_a1111_grid(p),
            noise_from=noise_from if from_init else None,
            discard_penultimate=discards_penultimate(p),
            zero_snr=self._zero_snr,
            pag_scale=float(r.pag_scale),
            pag_layers=r.pag_layer_list() if r.pag_scale else (),
            freeu=() if freeu is None else freeu.key,
            sag=r.sag_settings() or (),
            deep_shrink=() if shrink is None else shrink.key,
            hypertile=() if tiles is None else (*tiles.key, int(p.seeds[0])),
        )

    def noise_draws(self, plan: LoopPlan) -> int:
        """How many per-step noise draws a sampling run of ``plan`` makes (remembered per plan)."""
        key = plan.key
        if key not in self._noise_draws:
            if len(self._noise_draws) >= 256:  # a server's many settings: counting again costs a millisecond
                self._noise_draws.clear()
            self._noise_draws[key] = sampling.noise_draws(
                sampler=plan.sampler,
                steps=plan.steps,
                noise_schedule=self.noise_schedule,
                schedule=plan.schedule,
                scheduler_config=self.scheduler_config,
                img2img=plan.start_step is not None,
                strength=plan.strength,
                start_step=plan.start_step,
                sampler_options=plan.options(),
                a1111_grid=plan.a1111_grid,
                discard_penultimate=plan.discard_penultimate,
            )
        return self._noise_draws[key]

    def run_loop_plan(
        self,
        plan: LoopPlan,
        noise: Tensor,
        init_latent: Tensor | None,
        cond: Conditioning,
        uncond: Conditioning,
        draws: Tensor | None = None,
    ) -> Tensor:
        """What the loop graph records: a generation's sampling call for ``plan`` with the plain network (or its
        ahead-of-time package) and no callback; the final latent of the start ``noise`` (and img2img
        ``init_latent``) under the conditioning pair. ``draws`` (K, B, C, h, w): the per-step noise, drawn
        beforehand (:meth:`noise_draws` of them), read in place of the rows' generators."""
        graphs = self.cuda_graphs or {}
        # PAG switches attention layers of the plain U-Net during its calls: an ahead-of-time package would not see it
        # and so does FreeU its up blocks
        # and Deep Shrink its hidden states' sizes, and HyperTile its self-attention layers
        plain = plan.pag_scale or plan.freeu or plan.sag or plan.deep_shrink or plan.hypertile  # SAG: the plain map
        net = graphs["unet"].fn if "unet" in graphs and not plain else self.unet
        pag = (plan.pag_scale, plan.pag_layers) if plan.pag_scale else None
        freeu = FreeU(*plan.freeu) if plan.freeu else None
        sag = tuple(plan.sag) if plan.sag else None
        shrink = DeepShrink(*plan.deep_shrink) if plan.deep_shrink else None
        hypertile = (HyperTile(*plan.hypertile[:5]), int(plan.hypertile[5])) if plan.hypertile else None
        den = self.guided_denoiser(
            plan.cfg_scale,
            uncond,
            plan.rescale,
            net=net,
            pag=pag,
            freeu=freeu,
            sag=sag,
            deep_shrink=shrink,
            hypertile=hypertile,
        )
        bank = None if draws is None else NoiseBank(draws, noise.shape[0])
        return self.sample_plan(den, plan, noise, init_latent, cond, generators=bank)

    def sample_plan(
        self,
        denoiser: Any,
        plan: LoopPlan,
        noise: Tensor,
        init_latent: Tensor | None,
        cond: Conditioning,
        *,
        generators: Any = None,
        callback: Any = None,
        brownian: BrownianSpec | None = None,
    ) -> Tensor:
        """THE sampling call of a generation (``sampling.sample`` with ``plan``'s settings), whether it runs as it
        is or is recorded as one graph (:meth:`run_loop_plan`); ``brownian``: A1111's Brownian-tree noise for an SDE
        sampler (never recorded: the run reads the trees at its sigmas)."""
        return sampling.sample(
            denoiser,
            noise,
            sampler=plan.sampler,
            steps=plan.steps,
            schedule=plan.schedule,
            scheduler_config=self.scheduler_config,
            generators=generators,
            callback=callback,
            extra_args=cond,
            init_latent=init_latent,
            strength=plan.strength,
            start_step=plan.start_step,
            noise_schedule=self.noise_schedule,
            sampler_options=plan.options(),
            a1111_grid=plan.a1111_grid,
            noise_from=plan.noise_from,
            discard_penultimate=plan.discard_penultimate,
            brownian=brownian,
        )

    def decode_latents(self, p: Prepared, x: Tensor) -> Tensor:
        """(N, 3, H, W) images in [0, 1] of sampled latents; circular tiled diffusion's decoded with the latent's
        columns wrapped around its sides (:data:`sdengine.diffusion.multidiffusion.DECODE_PADDING` cells each side,
        diffusers' ``decode_latents_with_padding``), then cut back, so that its left and right edges meet."""
        multi = p.request.tiled_diffusion_settings()
        pad = min(DECODE_PADDING, int(x.shape[-1])) if multi is not None and multi.circular else 0
        if not pad:
            return self._decode_latents(p, x)
        img = self._decode_latents(p, torch.cat([x[..., -pad:], x, x[..., :pad]], dim=-1))
        cut = pad * (img.shape[-1] // (x.shape[-1] + 2 * pad))
        return img[..., cut : img.shape[-1] - cut]

    def _decode_latents(self, p: Prepared, x: Tensor) -> Tensor:
        if p.request.vae_decode == "tiny":
            return self.decode_tiny(x)
        # Decode one image at a time: the VAE's activations at full size dominate memory, and a row's
        # pixels then never depend on the batch.
        out = []
        # HyperTile on the VAE draws each decode's tiles in Python: the VAE itself, not its graph
        decoder = self.graphed("vae") if p.vae_tiles is None else None
        for i in range(x.shape[0]):
            with vae_hypertile_applied(self.vae, p.vae_tiles, (int(x.shape[-2]), int(x.shape[-1]))):
                img, upcast = vae_utils.decode(
                    self.vae, x[i : i + 1], tiled=p.tiled, upcast=self.vae_upcast, warn=False, decoder=decoder
                )
            if upcast and not self.vae_upcast:
                self.vae_upcast = True
                _note(
                    p.notes,
                    "the VAE decode in half precision gave NaN/inf; decoded again in float32 (and will be from now on)",
                )
            # after the half-precision fall-back above had its chance; to_unit's clamp would hide NaN as black
            out.append(vae_utils.to_unit(require_finite(img, "decoded image")))
        return torch.cat(out)

    def _encodes_images(self, init: bool, hires: Any) -> bool:
        """Whether a request turns pixels into latents: an init image, an inpainting U-Net's masked (or grey)
        image, the hires fix's pixel upscale (``hires``: its plan or None). Only then does ``vae_encode`` act
        (A1111 sets its "VAE type for encode" once for every request)."""
        return init or self.inpainting or (hires is not None and not hires.latent)

    def decode_tiny(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) images in [0, 1] of sampled latents, by the tiny VAE (one row at a time, so a row's
        pixels never depend on its batch)."""
        if self.tiny_vae is None:
            raise GenerationError("vae_decode='tiny' needs a tiny VAE: load_pipeline(tiny_vae=...) or --tiny-vae FILE")
        out = []
        with torch.inference_mode():
            for i in range(x.shape[0]):  # its decoder replays from the pipeline's graphs when it has them
                img = self.tiny_vae.decode(x[i : i + 1].to(self.dtype)).float()
                out.append(vae_utils.to_unit(require_finite(img, "decoded image (tiny VAE)")))
        return torch.cat(out)


# The released tiny VAEs of the 16-channel latent spaces, by latent map name (docs/tiny-vae.md): both are 16
# channels at 8x, told apart only by their names (taesd3_decoder.safetensors, madebyollin/taef1, ...).
TINY_VAE_NAMES = {"sd3": "taesd3", "flux": "taef1"}
TINY_VAE_FAMILIES = {"sd3": "SD3", "flux": "FLUX.1"}


@contextmanager
def zero_snr_call(request: GenerationRequest, *pipes: Any) -> Iterator[None]:
    """For a request with ``zero_terminal_snr``: the given pipelines (None skipped) walk A1111's Zero Terminal SNR
    rescale of their schedules until the block ends (their ``noise_schedule``); otherwise nothing changes."""
    with zero_snr_schedule(bool(request.zero_terminal_snr), *pipes):
        yield


@contextmanager
def zero_snr_schedule(on: bool, *pipes: Any) -> Iterator[None]:
    """When ``on``: the given pipelines (None skipped) walk the Zero Terminal SNR rescale of their schedules until
    the block ends (A1111's sd_noise_schedule, ComfyUI's ModelSamplingDiscrete zsnr: the same numbers); otherwise
    nothing changes."""
    chosen = [p for p in dict.fromkeys(pipes) if isinstance(p, Pipeline)] if on else []
    for pipe in chosen:
        pipe._zero_snr = True
    try:
        yield
    finally:
        for pipe in chosen:
            pipe._zero_snr = False


@contextmanager
def circular_padding(*modules: Any) -> Iterator[int]:
    """A1111's "Tiling" (``sd_hijack.apply_circular``): every ``nn.Conv2d`` of ``modules`` pads circularly
    (``padding_mode="circular"``) inside the block, and as before after it, whatever happens. Yields how many
    layers it switched."""
    convs = [
        m
        for module in modules
        if isinstance(module, torch.nn.Module)
        for m in module.modules()
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros"
    ]
    for conv in convs:
        conv.padding_mode = "circular"
    try:
        yield len(convs)
    finally:
        for conv in convs:
            conv.padding_mode = "zeros"


def _ip2p_pure_noise(pipe: Any, r: GenerationRequest) -> bool:
    """Whether an instruct-pix2pix run starts from pure noise over the whole schedule, the image in the concat
    channels only (diffusers' pipeline, which has no strength): under strength_rule "diffusers". A1111's rules run
    it as img2img, the init latent noised to the strength."""
    return bool(getattr(pipe, "instruct_pix2pix", False)) and r.strength_rule == "diffusers"


def image_guidance(pipe: Any, r: GenerationRequest) -> float | None:
    """The image guidance scale of the three-way guidance an instruct-pix2pix run uses, or None where it is plain
    CFG: diffusers guides only where cfg_scale > 1 and the image scale >= 1 (else the prompt's rows alone: cfg 1,
    :func:`cfg_of`); A1111 guides three ways unless the image scale is 1 (then plain CFG with the image in both
    rows, which the three-way formula equals)."""
    if not getattr(pipe, "instruct_pix2pix", False) or r.init_image is None:
        return None
    g, ig = float(r.cfg_scale), r.image_cfg()
    if r.strength_rule == "diffusers":
        return ig if g > 1.0 and ig >= 1.0 else None
    return None if ig == 1.0 else ig


def ip2p_cfg(pipe: Any, r: GenerationRequest) -> float:
    """The CFG scale a run guides with: the request's, but 1 (the prompt's rows alone) for an instruct-pix2pix
    model under strength_rule "diffusers" where diffusers guides not at all (cfg_scale <= 1 or image scale < 1)."""
    if _ip2p_pure_noise(pipe, r) and image_guidance(pipe, r) is None:
        return 1.0
    return float(r.cfg_scale)


def check_instruct_pix2pix(pipe: Any, r: GenerationRequest, notes: list[str]) -> None:
    """One line for what an instruct-pix2pix request cannot run, before any model runs (docs/instruct-pix2pix.md)."""
    if not pipe.instruct_pix2pix:
        if r.image_cfg_scale is not None and r.strength_rule in A1111_STRENGTH_RULES:
            # A1111 keeps the image CFG scale of "edit" models only (its UI sends one for every img2img)
            _note(notes, f"image_cfg_scale is not used: {pipe.name} is not an instruct-pix2pix model (A1111's rule)")
        elif r.image_cfg_scale is not None:
            raise GenerationError(
                f"image_cfg_scale guides an instruct-pix2pix model (an 8-channel U-Net); {pipe.name} is not one"
            )
        return
    if r.init_image is None:
        raise GenerationError(f"{pipe.name} is an instruct-pix2pix model: it edits an init image, give one")
    if r.row_images:
        raise GenerationError(f"{pipe.name} is an instruct-pix2pix model: it takes one init image, not one per row")
    for on, what in ((r.mask is not None, "a mask (inpainting)"), (r.init_latent_resize, "init_latent_resize")):
        if on:  # (the hires fix takes no init image: refused by the request)
            raise GenerationError(f"{pipe.name} is an instruct-pix2pix model: it does not take {what}")
    if image_guidance(pipe, r) is not None:
        for value, what in (
            (r.pag_scale, "pag_scale"),
            (r.sag_scale, "sag_scale"),
            (r.guidance_rescale, "guidance_rescale"),
        ):
            if value:
                raise GenerationError(
                    f"{what} does not combine with instruct-pix2pix's image guidance (image_cfg_scale "
                    f"{r.image_cfg():g}); set image_cfg_scale 1 with strength_rule 'a1111' for plain CFG"
                )
    if _ip2p_pure_noise(pipe, r) and r.strength != GenerationRequest.defaults()["strength"]:
        _note(notes, "instruct-pix2pix starts from pure noise under strength_rule 'diffusers': strength is not used")


def _row_images(sources: list[Any], what: str, mode: str, fit: Callable[[Image.Image], Any]) -> list[Any]:
    """Each row's image (request.init_image / mask as a list) read and fitted by ``fit`` once per distinct source
    (a server batch repeats a job's image over its rows); one line where two rows' images differ in size."""
    done: dict[int, Any] = {}
    first: tuple[int, int] | None = None
    out = []
    for k, src in enumerate(sources):
        if id(src) not in done:
            img = load_image(src, f"{what} {k}", mode=mode, error=GenerationError)
            if first is None:
                first = img.size
            elif img.size != first:
                raise GenerationError(
                    f"the {what}s of one call must have one size: row 0's is {first[0]}x{first[1]}, row {k}'s "
                    f"{img.size[0]}x{img.size[1]}"
                )
            done[id(src)] = fit(img)
        out.append(done[id(src)])
    return out


def _silent(_: str) -> None:
    return None


def _rows_of(unit: ControlUnit, rows: list[int], n: int) -> ControlUnit:
    """The unit with its per-row maps cut to ``rows`` (a single map is shared by every row)."""
    image = unit.image
    if isinstance(image, list | tuple):
        if len(image) != n:
            raise GenerationError(f"a ControlNet has {len(image)} control images for {n} rows")
        return dataclasses.replace(unit, image=[image[i] for i in rows])
    if isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] > 1:
        if image.shape[0] != n:
            raise GenerationError(f"a ControlNet has {image.shape[0]} control images for {n} rows")
        return dataclasses.replace(unit, image=image[rows])
    return unit


def model_title(pipe: Any) -> str:
    """A model as A1111's infotext names a checkpoint: "name [hash]" (the name alone without a hash)."""
    h = pipe.model_hash()
    return f"{pipe.name} [{h}]" if h else str(pipe.name)


def check_hr_model(pipe: Any, hr_model: Any, request: GenerationRequest) -> None:
    """A one-line GenerationError where ``hr_model`` cannot run the hires fix's second pass of ``request``
    after ``pipe``'s first pass: no hires fix asked, not a pipeline, another latent space, or LoRAs (applied to
    one model per call)."""
    if not isinstance(hr_model, Pipeline):
        raise GenerationError("hr_model must be a pipeline loaded with load_pipeline")
    if not request.enable_hr:
        raise GenerationError("hr_model is the hires fix's second-pass model: it needs enable_hr")
    if hr_model.latent_channels != pipe.latent_channels or hr_model.vae_scale_factor != pipe.vae_scale_factor:
        raise GenerationError(f"the hires model {hr_model.name} does not share {pipe.name}'s latent space")
    if hr_model.inpainting != pipe.inpainting:
        raise GenerationError(
            f"the hires model {hr_model.name} and {pipe.name} must both be inpainting models or neither"
        )
    from sdengine.prompts import extract_lora_tags

    texts = [request.prompt] if isinstance(request.prompt, str) else list(request.prompt or [])
    if (
        request.loras
        or any(extract_lora_tags(t)[1] for t in texts if isinstance(t, str))
        or request.hr_prompt
        and (extract_lora_tags(request.hr_prompt)[1])
    ):
        raise GenerationError("LoRAs are not supported with another hires model (hr_model)")
    if request.tiling:
        raise GenerationError("tiling is not supported with another hires model (hr_model)")


def as_request(prompt: Any, negative_prompt: Any, kwargs: Mapping[str, Any]) -> GenerationRequest:
    """The request of a call ``pipe(prompt_or_request, negative_prompt, **fields)``."""
    unknown = sorted(set(kwargs) - set(GenerationRequest.field_names()))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    if isinstance(prompt, GenerationRequest):
        changes = dict(kwargs)
        if negative_prompt is not None:
            changes["negative_prompt"] = negative_prompt
        return prompt.replace(**changes) if changes else prompt
    fields = dict(kwargs)
    fields["prompt"] = "" if prompt is None else prompt
    if negative_prompt is not None:
        fields["negative_prompt"] = negative_prompt
    elif fields.get("negative_prompt") is None:
        fields["negative_prompt"] = ""
    return GenerationRequest(**fields)


__all__ = [
    "MAX_SIDE",
    "MAX_SIZE_FACTOR",
    "Pipeline",
    "Prepared",
    "as_request",
    "check_hr_model",
    "model_title",
    "sag_size_error",
    "zero_snr_schedule",
]


def _like(vae: Any, own: Any) -> Any:
    """``vae`` with the fast-path changes :mod:`sdengine.fastpath` made to the pipeline's own VAE (Winograd
    convolutions, channels-last weights, a compiled decoder), so that a VAE chosen later (``set_vae``) decodes
    as it would in a pipeline loaded with it."""
    from sdengine.nn.winograd import WinogradConv2d, enable_winograd

    if any(isinstance(m, WinogradConv2d) for m in own.modules()):
        enable_winograd(vae)
    conv = next((m for m in own.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)), None)
    if (
        conv is not None
        and not conv.weight.is_contiguous()
        and conv.weight.is_contiguous(memory_format=torch.channels_last)
    ):
        vae.to(memory_format=torch.channels_last)
    decoder = getattr(own, "decoder", None)
    if decoder is not None and getattr(decoder, "_compiled_call_impl", None) is not None:
        vae.decoder.compile()
    return vae
