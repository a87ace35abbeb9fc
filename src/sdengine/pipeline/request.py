"""One generation request: every setting of a call, its default written once, and one ``validate()``.

The CLI, the Python API (``pipe(**kwargs)`` or ``pipe(request)``) and a server all build a
:class:`GenerationRequest`. Field names are the keyword names of ``Pipeline.__call__``.

Batches: ``prompt`` may be a list (one row each), ``negative_prompt`` and ``seed`` too (one per row). A
single prompt with ``batch_size`` N makes N rows with seeds ``seed, seed + 1, ...``. Row ``i`` owns the
generator ``torch.Generator("cpu").manual_seed(seed_i)`` for every random draw it needs, so an image does
not depend on the batch it was made in.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.diffusion import sampling
from sdengine.diffusion.multidiffusion import MultiDiffusion
from sdengine.diffusion.sag import MAX_SAG_BLUR_SIGMA, SAG_RULES
from sdengine.diffusion.schedules import A1111_STRENGTH_RULES, STRENGTH_RULES, img2img_start
from sdengine.errors import GenerationError, SdengineError
from sdengine.io.images import ImageInput
from sdengine.metadata import MASKED_CONTENT
from sdengine.nn.deep_shrink import DeepShrink
from sdengine.nn.freeu import FREEU_RULES, FreeU
from sdengine.nn.hypertile import HYPERTILE_RULES, MAX_DEPTH, MAX_SWAP_SIZE, MAX_TILE_SIZE, HyperTile
from sdengine.pipeline.control import ControlUnit
from sdengine.pipeline.ip_adapter import IPAdapterUnit
from sdengine.pipeline.redux import ReduxUnit, check_units
from sdengine.pipeline.result import StepCallback
from sdengine.pipeline.soft_inpaint import SoftInpainting
from sdengine.text.conditioners import CLIP_SKIP_RULES

LoRAInput = tuple[Any, Any] | str | Path  # (source, weight): a float, or a LoRAWeight (text-encoder, U-Net)
TextOrList = str | Sequence[str]

# Bounds that keep values finite. cfg: A1111's slider stops at 30, the server's schema at 100; past that the
# guided prediction only grows until it overflows (1e308 gave a black PNG). Seeds: torch.Generator takes
# 64-bit unsigned seeds, and row i uses seed + i, so the last row's seed must fit too.
MAX_CFG_SCALE = 100.0
MAX_SEED = 2**64 - 1
# Mask blur is a Gaussian sigma in pixels (A1111's slider stops at 64); inf overflowed and 1e9 broke OpenCV.
MAX_MASK_BLUR = 256.0
# "Resize seed from": the largest side (pixels) a seed's noise may be drawn at (the pipeline's own limit on sizes).
MAX_SEED_RESIZE = 8192
MAX_SEED_DELTA = 2**32 - 1  # noise_seed_delta (A1111's ENSD)
NOISE_SOURCES = ("cpu", "nv")  # noise_source: torch's CPU generator, or NVIDIA's numbers (diffusion.philox)
MAX_REFERENCE_IMAGES = 4  # reference_images (FLUX.1 Kontext): each adds its tokens to every step
MAX_NOISE_MULTIPLIER = 10.0  # noise_multiplier (A1111's own setting goes to 1.5)
# How sampled latents become pixels: the model's VAE, or the tiny VAE loaded beside it (sdengine.models.tiny_vae).
VAE_DECODE_METHODS = ("full", "tiny")
# How init images become latents (img2img, inpainting, the hires fix's pixel path): the VAE's encoder (a posterior
# sample), or the tiny VAE's encoder (one latent, no spread; A1111's "VAE type for encode: TAESD").
VAE_ENCODE_METHODS = ("full", "tiny")
# Perturbed-attention guidance's scale: ComfyUI's node stops at 100 (useful values: 1-5)
MAX_PAG_SCALE = 100.0
MAX_FREEU_FACTOR = 10.0  # each of FreeU's b1, b2, s1, s2 (ComfyUI's node range; sdengine.nn.freeu)
# Self-attention guidance's scale, either sign (ComfyUI's node takes -2..5, A1111's extension -2..10)
MAX_SAG_SCALE = 10.0
MAX_SHIFT = 100.0  # a flow model's time shift (SD3 trains with 3.0; ComfyUI's ModelSamplingSD3 node takes up to 100)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


@dataclass(frozen=True)
class GenerationRequest:
    """Everything one call generates from. ``schedule`` "auto" (default) fits the sampler (karras where it
    takes it, else its own), None or "normal" is the model's own timestep spacing; ``seed`` None or -1 draws
    one; ``width``/``height`` None is the model's training size;
    ``mask``: white = repaint (read as grayscale); ``mask_blur``: Gaussian sigma in pixels (A1111's), 0 =
    diffusers' hard mask; ``controlnets``: :class:`ControlUnit` or ``(model_or_path, image, scale[, start,
    end])``; ``ip_adapters``: :class:`sdengine.pipeline.ip_adapter.IPAdapterUnit` (adapter, CLIP vision outputs,
    scale); ``loras``: ``(path_or_name, weight)`` (``<lora:NAME:W>`` tags in the prompt are added, names
    looked up in ``lora_dir``); ``clip_skip`` counts as A1111 (1 = last layer); ``callback(StepInfo)``
    runs after every step, returning False cancels; ``vae_tiling`` None = automatic."""

    prompt: TextOrList = ""
    negative_prompt: TextOrList = ""
    steps: int = 25
    sampler: str = "dpmpp_2m"
    schedule: str | None = sampling.AUTO_SCHEDULE
    cfg_scale: float = 7.5
    seed: int | Sequence[int] | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    # one image for every row, or a list / tuple of them, one per row (a U-Net model's img2img / inpainting; each
    # row is then the call of its own image alone: the server's batches of img2img jobs); row images are of one size
    init_image: ImageInput | Sequence[ImageInput] | None = None
    strength: float = 0.75
    # how ``strength`` counts the img2img (and hires second-pass) steps: "diffusers" (int(steps * strength)
    # steps) or "a1111" (A1111's, sdengine.diffusion.schedules.img2img_start / hires_steps)
    strength_rule: str = "diffusers"
    # one mask, or a list / tuple of them, one per row (needs init_image as a list too; masks of one size)
    mask: ImageInput | Sequence[ImageInput] | None = None
    mask_blur: float = 0
    controlnets: Sequence[ControlUnit | tuple[Any, ...]] | None = None
    guess_mode: bool = False
    # IP-Adapter image prompts (sdengine.pipeline.ip_adapter): each a loaded adapter, its images' CLIP vision
    # outputs and a scale; [] / None: none
    ip_adapters: Sequence[IPAdapterUnit] | None = None
    loras: Sequence[LoRAInput] | None = None
    lora_dir: str | Path | None = None
    clip_skip: int = 1
    # what ``clip_skip`` means: "sdengine" (each text encoder's own, see the conditioners) or "a1111" (A1111's
    # CLIP_stop_at_last_layers: applied to SD 1.x's CLIP only, ignored for SD 2.x, SDXL and MiniLM, as there;
    # sdengine.text.conditioners.effective_clip_skip)
    clip_skip_rule: str = "sdengine"
    guidance_rescale: float = 0.0
    # InstructPix2Pix's image guidance (an 8-channel U-Net; docs/instruct-pix2pix.md): x0 = uncond + cfg_scale *
    # (cond - image_cond) + image_cfg_scale * (image_cond - uncond). None: 1.5 (diffusers' default) under
    # strength_rule "diffusers", 1 under A1111's (its API's None: plain CFG, the image in both rows). Infotext
    # "Image CFG scale" (A1111's key)
    image_cfg_scale: float | None = None
    # FLUX.1 Kontext (Flux only; sdengine.pipeline.flux_kontext): the reference images to edit / take from, one
    # image or a list (diffusers' FluxKontextPipeline ``image``, ComfyUI's ReferenceLatent); None / [] = none.
    # ``reference_auto_resize``: each one put at the Kontext resolution of its aspect ratio (diffusers'
    # _auto_resize); off: its own size, sides floored to the size multiple. Infotext "Reference images"
    reference_images: ImageInput | Sequence[ImageInput] | None = None
    reference_auto_resize: bool = True
    # FLUX.1 Redux (Flux only; sdengine.pipeline.redux): image prompts whose SigLIP tokens, through the Redux image
    # encoder and times their strength, are appended to the prompt's T5 tokens; None / [] = none
    redux: Sequence[ReduxUnit] | None = None
    # FLUX.1 [dev] and FLUX.2 [dev] only: the distilled guidance scale, an input of their transformers
    # (sdengine.pipeline.flux, sdengine.pipeline.flux2); None = the model's default (3.5; 4 for FLUX.2 [dev]).
    # Infotext "Distilled CFG Scale" (Forge's name)
    distilled_cfg_scale: float | None = None
    # Perturbed-attention guidance (Ahn et al. 2024; diffusers' StableDiffusionPAGPipeline): a third pass of the
    # conditional rows with the identity attention map in the self-attention layers ``pag_layers`` names (diffusers'
    # pag_applied_layers: regular expressions searched in the U-Net's layer names, a list or one comma-separated
    # string; "mid" = the middle block's), adding ``pag_scale * (cond - perturbed)``; 0 = off. Infotext "PAG scale",
    # "PAG layers" (sdengine.diffusion.guidance, sdengine.nn.attention)
    pag_scale: float = 0.0
    pag_layers: str | Sequence[str] = "mid"
    # FreeU (Si et al. 2023): (b1, b2, s1, s2), the backbone factors on the first half of the decoder's hidden
    # channels and the skip factors on the skip features' lowest frequencies, at the concatenations that are 4x (b1,
    # s1) and 2x (b2, s2) the first level's width (``freeu_rule`` "width", the authors', ComfyUI's and Forge's rule),
    # or of the first and second up block ("diffusers", its enable_freeu); None = off. ``freeu_version`` 2 (the
    # authors' later code, ComfyUI's FreeU_V2, Forge's FreeU) scales by the hidden state's normalised channel mean;
    # 1 (ComfyUI's FreeU, diffusers') by the factor as it is. Infotext: sdengine writes "FreeU: b1,b2,s1,s2" (and
    # "FreeU version" / "FreeU rule" when not 2 / width) and reads Forge's "freeu_enabled", "freeu_b1" ...
    # "freeu_s2" too (sdengine.metadata, sdengine.nn.freeu)
    # Self-attention guidance (Hong et al. 2023; diffusers' StableDiffusionSAGPipeline): one more U-Net pass per step on
    # the x0 estimate blurred (Gaussian, ``sag_blur_sigma``, 9 x 9) where the middle block's self-attention looks most,
    # noised back, adding ``sag_scale * (prediction - degraded prediction)``; 0 = off (diffusers' default scale 0.75,
    # blur sigma 1.0; ComfyUI's node 0.5 and 2.0). Infotext "SAG scale", "SAG blur sigma" (sdengine.diffusion.sag).
    # ``sag_rule`` "diffusers" (its pipeline: the term in the network's output space, before guidance rescale) or
    # "comfyui" (ComfyUI's node, Forge's script: the unconditional rows always, the term in x0 after the rescale,
    # skipped on a latent too small for the blur); infotext "SAG rule" when not diffusers
    sag_scale: float = 0.0
    sag_blur_sigma: float = 1.0
    sag_rule: str = "diffusers"
    freeu: Sequence[float] | None = None
    freeu_version: int = 2
    freeu_rule: str = "width"
    # Deep Shrink (kohya-ss; ComfyUI's PatchModelAddDownscale, Forge's Kohya HRFix Integrated): the U-Net's hidden
    # state shrunk below one input block while the noise is high, for sizes above the model's own. A
    # sdengine.nn.deep_shrink.DeepShrink, a mapping of its fields (block, factor, start, end, after_skip,
    # downscale_method, upscale_method) or (block, factor[, start, end[, ...]]); None = off. The base model's U-Net
    # only (not an SDXL refiner's); both hires passes. Infotext Forge's "kohya_hrfix_*" fields
    deep_shrink: Any = None
    # HyperTile (tfernd; A1111's built-in Hypertile, ComfyUI's HyperTile node): (tile_size, swap_size, max_depth),
    # the U-Net's self-attention within tiles of the feature map: tile_size in pixels (A1111's "max tile size",
    # 256), swap_size how many tile counts to draw from per side (A1111 3, ComfyUI 2), max_depth the deepest layers
    # tiled (A1111 3, ComfyUI 0); None = off. ``hypertile_hires_only``: only the hires fix's second pass (A1111's
    # hypertile_enable_unet_secondpass alone). ``hypertile_rule`` "a1111" or "comfyui" (how the tile is chosen
    # and which layers have which depth), ``hypertile_scale_depth`` (the smallest tile doubles per depth; A1111
    # always, ComfyUI's default off). The tile counts are drawn from a generator seeded with the first seed at each
    # pass. Infotext: A1111's "Hypertile U-Net" (or "Hypertile U-Net second pass"), "Hypertile U-Net max tile size",
    # "... max depth", "... swap size" where not A1111's defaults (256, 3, 3), sdengine's "Hypertile rule" /
    # "Hypertile scale depth" where not "a1111" / true (sdengine.nn.hypertile, sdengine.metadata)
    hypertile: Sequence[int] | None = None
    hypertile_hires_only: bool = False
    hypertile_rule: str = "a1111"
    hypertile_scale_depth: bool = True
    # HyperTile on the VAE (A1111's Hypertile VAE): (tile_size, swap_size, max_depth) of the VAE decoder's
    # middle-block attention (A1111's defaults 128, 3, 3; its one layer is depth 0, so every max_depth tiles it),
    # A1111's rule, drawn from the first seed; None = off. Infotext "Hypertile VAE" (sdengine.nn.hypertile)
    hypertile_vae: Sequence[int] | None = None
    callback: StepCallback | None = None
    progress: bool = True
    vae_tiling: bool | None = None
    # "full": the model's VAE; "tiny": the pipeline's tiny VAE (TAESD, ``load_pipeline(tiny_vae=...)``),
    # ~10x cheaper and a little softer; named "Tiny VAE" in the infotext
    vae_decode: str = "full"
    # "full": the VAE's encoder; "tiny": the tiny VAE's encoder (it must have one); named "Tiny VAE encode"
    vae_encode: str = "full"
    sampler_options: Mapping[str, Any] | None = None
    resize_mode: str | int = "just resize"  # init and control images of another size: sdengine.io.resize
    # A1111's img2img resize mode 3, "Just resize (latent upscale)": the init image is encoded at its own size
    # (sides a multiple of the VAE's factor) and its latent resized bilinearly to the output's (no mask; on a
    # 9-channel inpainting model only at the output size); infotext "Resize mode: just resize (latent upscale)"
    init_latent_resize: bool = False
    subseed: int | None = None  # variation seed (A1111's); None / -1 draws one; row i uses subseed + i
    subseed_strength: float = 0.0  # 0 = the seed's image, 1 = the variation seed's (slerp of the noise)
    # A1111's "Resize seed from width/height": the start noise is drawn at this size (pixels) and pasted centred
    # into the noise of the real size (sdengine.diffusion.variation.seed_resized_noise), so that a seed keeps
    # its composition at another size; 0 (or -1, A1111's default) = off. Both or neither.
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    # A1111's "Tiling": every Conv2d of the U-Net and the VAE pads circularly for this call, so that the image
    # tiles seamlessly (its left edge continues its right one, its top its bottom)
    tiling: bool = False
    # A1111's img2img "Noise multiplier" (initial_noise_multiplier): the noise added to the init image's latent
    # (img2img and inpainting; not the hires fix's second pass) is multiplied by it; 1 = as drawn
    noise_multiplier: float = 1.0
    # A1111's "Eta noise seed delta" (ENSD, its eta_noise_seed_delta setting): once the start noise is drawn, each
    # row's generator is seeded again with its seed + this, so the per-step noise of the ancestral and SDE
    # samplers (and churn) comes from there; 0 = the seed's own generator goes on (under A1111's rules the SDE
    # samplers draw from a Brownian tree seeded by the seed instead, as A1111: sdengine.diffusion.brownian)
    noise_seed_delta: int = 0
    # Where the rows' noise comes from (A1111's "Random number generator source", randn_source): "cpu" torch's CPU
    # generator (A1111's CPU); "nv" NVIDIA's numbers, torch.randn on CUDA, drawn on any device
    # (sdengine.diffusion.philox; A1111's NV, and its default GPU on an NVIDIA card). Both the start noise and the
    # per-step noise of the ancestral samplers (and variation seeds, ENSD, "Resize seed from") follow it.
    noise_source: str = "cpu"
    # A1111's "Always discard next-to-last sigma" (its always_discard_next_to_last_sigma setting): the sampling grid
    # is made for steps + 1 steps and its next-to-last sigma dropped (sdengine.diffusion.sampling.make_grid), as
    # A1111 does anyway for DPM2, DPM2 a and DPM++ 3M SDE under its rules (strength_rule "a1111")
    discard_penultimate_sigma: bool = False
    # A1111's "Noise schedule for sampling: Zero Terminal SNR" (its sd_noise_schedule setting): the model's
    # alphas_cumprod rescaled to zero terminal SNR for this call as A1111 does (last value 4.8973e-8, sigma_max about
    # 4518.8: sdengine.diffusion.schedules.a1111_zero_terminal_snr); infotext "Noise Schedule: Zero Terminal SNR".
    # For models trained so (v-prediction); a model whose scheduler config says rescale_betas_zero_snr walks that
    # schedule without it (diffusers' rule, sigma_max 4096)
    zero_terminal_snr: bool = False
    # A1111's inpainting "Masked content" done in the latent (inpainting_fill 2 and 3): "latent noise" puts the
    # row's unit noise in place of the init latent where the (rounded) latent mask repaints, "latent nothing"
    # zeros there; "original" keeps the init image's latent (A1111's "fill" is made on the image beforehand)
    masked_content: str = "original"
    # Differential Diffusion (Levin & Fried 2023; ComfyUI's DifferentialDiffusion node): the mask's grey levels say
    # how much each pixel may change: at each model call the region repainted is where the mask is at or above a
    # threshold falling from 1 to 0 over the run (sdengine.pipeline.latents.DifferentialMask). 0 = off (plain
    # inpainting, the mask binarised); in (0, 1]: on, the value being the node's strength (1: the paper's rule;
    # below: that binary mask blended with the grey one). Needs a mask and a 4-channel model. Infotext
    # "Differential diffusion"
    differential_diffusion: float = 0.0
    # A1111's built-in "Soft Inpainting" (sdengine.pipeline.soft_inpaint): the grey latent mask blended into each
    # step's x0 by a sigma-dependent power with the vectors' lengths kept, and the result laid over the init image
    # by a mask of how much each region changed. None / False = off; True = A1111's defaults; a SoftInpainting or
    # a mapping of its fields (schedule_bias, preservation_strength, transition_contrast_boost, mask_influence,
    # difference_threshold, difference_contrast). Needs a mask and a U-Net on a discrete schedule (an inpainting
    # one's mask input left grey, as A1111's); not with differential_diffusion. Infotext A1111's "Soft inpainting
    # enabled: True", "Soft inpainting schedule bias", ...
    soft_inpainting: Any = None
    # A1111's mask_round (on by default): its latent mask (the blend's, "latent noise" / "latent nothing"'s)
    # rounded to 0 / 1 after its shrink to the latent, and an inpainting (9-channel) model's mask input made binary.
    # False: both left grey, as A1111 then leaves them (soft inpainting turns it off itself). Needs a mask and an
    # A1111 strength_rule (the blend it changes is A1111's)
    mask_round: bool = True
    # A1111's latent_mask: a separate mask (white = repaint, read as grayscale, at any size: not blurred or fitted)
    # that its latent mask is shrunk from in place of ``mask``; ``mask`` still makes an inpainting model's mask
    # input and masked image (and the caller's overlay). None: the latent mask is the mask's. Needs a mask and an
    # A1111 strength_rule
    latent_mask: ImageInput | None = None
    # SDXL only: prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size, negative_*,
    # aesthetic_score (sdengine.text.sdxl_conditioner.SDXLOptions); None = the defaults
    sdxl: Mapping[str, Any] | None = None
    # Flow models only (SD3 / 3.5): the time shift of the sampling schedule, s' = shift s / (1 + (shift - 1) s)
    # (sdengine.diffusion.flow.FlowSchedule); None = the model's own (its scheduler config's, 3.0 for SD3).
    # Infotext "Shift"
    shift: float | None = None
    # SD3 only: skip-layer guidance (skip_guidance_layers, skip_layer_guidance_scale / _start / _stop;
    # sdengine.pipeline.sd3.SD3Options); None = off. Infotext "Skip layer guidance", "Skip layers", ...
    sd3: Mapping[str, Any] | None = None
    # The hires fix (A1111's names; sdengine.pipeline.hires): a txt2img pass at width x height, an upscale,
    # then an img2img pass at ``strength`` (A1111's denoising_strength).
    enable_hr: bool = False
    hr_scale: float = 2.0  # used when hr_resize_x and hr_resize_y are 0
    hr_resize_x: int = 0  # pixels; one side given keeps the aspect ratio, both cover the box then cut it
    hr_resize_y: int = 0
    hr_upscaler: str = "Latent"  # "Latent", "Latent (antialiased|bicubic|bicubic antialiased|nearest|nearest-exact)",
    # "None" / "Lanczos" (pixel Lanczos resize, then the VAE encodes it again), or the name of an upscaler model
    # (ESRGAN, Real-ESRGAN) in ``upscalers_dir``: the model upscales, then Lanczos resizes to the size
    upscalers_dir: str | Path | None = None  # the folder of upscaler models (.pth / .safetensors) hr_upscaler names
    hr_second_pass_steps: int = 0  # 0 = steps
    hr_sampler: str | None = None  # None = sampler
    hr_schedule: str | None = None  # None = the schedule rule of ``schedule`` (A1111's hr_scheduler)
    hr_prompt: str = ""  # "" = the row's prompt
    hr_negative_prompt: str = ""  # "" = the row's negative prompt
    # MultiDiffusion (sdengine.diffusion.multidiffusion, docs/multidiffusion.md): the latent denoised as overlapping
    # windows whose x0 predictions are averaged at every model call. A MultiDiffusion, a mapping of its fields
    # (window, stride, circular, view_batch, window_height, method; window and stride in latent cells) or
    # (window, stride[, circular[, view_batch]]); None = off. Both hires passes. Infotext "Tiled Diffusion: ..."
    tiled_diffusion: Any = None
    # FLUX.1 Depth / Canny's control map (diffusers' FluxControlPipeline ``control_image``: a depth map or canny
    # edges, used as given, fitted to the output size), VAE-encoded beside the noisy latent; only those models
    # take it (sdengine.pipeline.flux_fill)
    control_image: ImageInput | None = None
    # what makes that map from ``control_image`` first: "none" (the image is the map) or "canny" (OpenCV's Canny
    # edges, thresholds 100 / 200, of the image fitted to the output size); a depth estimator is refused (no such
    # network here). Infotext "Control preprocessor" (sdengine.pipeline.flux_fill.CONTROL_PREPROCESSORS)
    control_preprocessor: str = "none"

    # -- building ---------------------------------------------------------------------------------------

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Every field's default (the one place they are written)."""
        return {f.name: f.default for f in dataclasses.fields(cls)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationRequest:
        """A request from a JSON-like dict (unknown keys are an error naming them; lists stay lists,
        ControlNet units may be dicts ``{"model", "image", "scale", "start", "end"}`` or lists)."""
        unknown = sorted(set(data) - set(cls.field_names()))
        if unknown:
            raise GenerationError(
                f"unknown generation settings: {', '.join(unknown)}; valid: {', '.join(cls.field_names())}"
            )
        kw = dict(data)
        if kw.get("controlnets") is not None:
            kw["controlnets"] = tuple(ControlUnit.coerce(u) for u in kw["controlnets"])
        if kw.get("loras") is not None:
            kw["loras"] = tuple(tuple(x) if isinstance(x, list) else x for x in kw["loras"])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict (images stay PIL / array / path values; the callback is left out)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "callback"}
        if self.controlnets is not None:
            out["controlnets"] = [
                {"model": u.model, "image": u.image, "scale": u.scale, "start": u.start, "end": u.end, "rule": u.rule}
                | ({"mode": u.mode} if u.mode != "balanced" else {})
                | ({"hires_mode": u.hires_mode} if u.hires_mode is not None else {})
                | ({"style_fidelity": u.style_fidelity} if u.style_fidelity is not None else {})
                for u in self.control_units()
            ]  # the same image objects, not copies
        return out

    def replace(self, **changes: Any) -> GenerationRequest:
        return dataclasses.replace(self, **changes)

    # -- rows ---------------------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """Images this request makes: the length of the list fields, else ``batch_size``."""
        lengths = {len(v) for v in (self.prompt, self.negative_prompt, self.seed) if isinstance(v, list | tuple)}
        return lengths.pop() if len(lengths) == 1 else int(self.batch_size)

    def prompts(self) -> list[str]:
        return _per_row(self.prompt, self.n_rows)

    @property
    def row_images(self) -> bool:
        """Whether ``init_image`` (and ``mask``) hold one image per row (a list or tuple) rather than one image."""
        return _is_list(self.init_image) or _is_list(self.mask)

    def init_images(self) -> list[Any]:
        """The init image of each row: the list given, or the one image for every row; [] without one."""
        return _row_images(self.init_image, self.n_rows)

    def masks(self) -> list[Any]:
        """The mask of each row: the list given, or the one mask for every row; [] without one."""
        return _row_images(self.mask, self.n_rows)

    def one_init_image(self) -> ImageInput:
        """The call's one init image (where one per row is not taken: a one-line error for a list)."""
        return _one_image(self.init_image, "init_image")

    def one_mask(self) -> ImageInput:
        """The call's one mask (where one per row is not taken: a one-line error for a list)."""
        return _one_image(self.mask, "mask")

    def _validate_row_images(self) -> None:
        """Per-row init images and masks (lists): one per row, none empty, a mask list only with an init list,
        and none of the options that read one image for the whole call."""
        init, mask = self.init_image, self.mask
        if not self.row_images:
            return
        rows = self.n_rows
        for what, v in (("init_image", init), ("mask", mask)):
            if not _is_list(v):
                continue
            n = len(v)  # type: ignore[arg-type]
            if n != rows:
                raise GenerationError(
                    f"{what} holds {n} images for {rows} rows: give one per row (or one image for every row)"
                )
            if any(x is None for x in v):  # type: ignore[union-attr]
                raise GenerationError(f"{what} holds an empty entry (None): give one image per row")
        if _is_list(mask) and not _is_list(init):
            raise GenerationError("a list of masks (one per row) needs a list of init images (one per row)")
        for what, on in (
            ("init_latent_resize", bool(self.init_latent_resize)),
            ("soft_inpainting", self.soft_inpainting not in (None, False)),
            ("differential_diffusion", _is_number(self.differential_diffusion) and self.differential_diffusion > 0),
            ("enable_hr", bool(self.enable_hr)),
        ):
            if on:
                raise GenerationError(f"{what} takes one init image for the call, not one per row (a list)")

    def negative_prompts(self) -> list[str]:
        return _per_row(self.negative_prompt, self.n_rows)

    def seeds(self) -> list[int]:
        """One seed per row: ``seed + i``, or ``seed`` for every row when variation seeds are on
        (``subseed_strength`` not 0: A1111's rule, so that a batch is variations of one image, each row's own
        variation seed ``subseed + i``); a random one is drawn for None / -1 (call once and keep the answer)."""
        if _is_list(self.seed):
            return [int(s) for s in self.seed]  # type: ignore[union-attr]
        seed = self.seed
        if seed is None or int(seed) == -1:  # type: ignore[arg-type]
            seed = secrets.randbelow(2**32)
        step = 0 if self.subseed_strength else 1
        return [int(seed) + i * step for i in range(self.n_rows)]  # type: ignore[arg-type]

    def subseeds(self) -> list[int] | None:
        """One variation seed per row (``subseed + i``), None when ``subseed_strength`` is 0; a random one
        is drawn for None / -1 (call once and keep the answer)."""
        if not self.subseed_strength:
            return None
        sub = self.subseed
        if sub is None or int(sub) == -1:
            sub = secrets.randbelow(2**32)
        return [int(sub) + i for i in range(self.n_rows)]

    @property
    def seed_resize_from(self) -> tuple[int, int] | None:
        """(width, height) the start noise is drawn at ("Resize seed from"), or None when off."""
        w, h = int(self.seed_resize_from_w), int(self.seed_resize_from_h)
        return (w, h) if w > 0 and h > 0 else None

    def pag_layer_list(self) -> tuple[str, ...]:
        """``pag_layers`` as a tuple of patterns (a string is split at its commas)."""
        v = self.pag_layers
        items = v.split(",") if isinstance(v, str) else list(v)
        return tuple(str(x).strip() for x in items)

    def sag_settings(self) -> tuple[Any, ...] | None:
        """Self-attention guidance's (scale, blur sigma) under the diffusers rule, (scale, blur sigma, "comfyui")
        under ComfyUI's; None when off (what the pipeline's guided denoiser and its recorded loop take)."""
        if not self.sag_scale:
            return None
        settings: tuple[Any, ...] = (float(self.sag_scale), float(self.sag_blur_sigma))
        return settings if self.sag_rule == "diffusers" else (*settings, str(self.sag_rule))

    def soft_inpainting_settings(self) -> SoftInpainting | None:
        """``soft_inpainting`` as :class:`sdengine.pipeline.soft_inpaint.SoftInpainting` settings (None: off),
        checked (one-line GenerationError)."""
        return SoftInpainting.of(self.soft_inpainting)

    def freeu_settings(self) -> FreeU | None:
        """``freeu`` as :class:`sdengine.nn.freeu.FreeU` settings (None: off); call after :meth:`validate`."""
        if self.freeu is None:
            return None
        b1, b2, s1, s2 = (float(x) for x in self.freeu)
        return FreeU(b1, b2, s1, s2, version=int(self.freeu_version), rule=self.freeu_rule)

    def deep_shrink_settings(self) -> DeepShrink | None:
        """``deep_shrink`` as :class:`sdengine.nn.deep_shrink.DeepShrink` settings (None: off); call after
        :meth:`validate`."""
        return None if self.deep_shrink is None else DeepShrink.coerce(self.deep_shrink)

    def hypertile_config(self) -> HyperTile | None:
        """``hypertile`` as :class:`sdengine.nn.hypertile.HyperTile` settings, whichever passes it runs on (None:
        off); call after :meth:`validate`."""
        if self.hypertile is None:
            return None
        tile, swap, depth = (int(x) for x in self.hypertile)
        return HyperTile(tile, swap, depth, rule=self.hypertile_rule, scale_depth=bool(self.hypertile_scale_depth))

    def hypertile_vae_config(self) -> HyperTile | None:
        """``hypertile_vae`` as A1111-rule :class:`sdengine.nn.hypertile.HyperTile` settings (None: off); call after
        :meth:`validate`."""
        if self.hypertile_vae is None:
            return None
        tile, swap, depth = (int(x) for x in self.hypertile_vae)
        return HyperTile(tile, swap, depth)

    def hypertile_settings(self) -> HyperTile | None:
        """The HyperTile settings of this request's own sampling pass (None: off; also with
        ``hypertile_hires_only``, which the hires fix's second pass clears); call after :meth:`validate`."""
        return None if self.hypertile_hires_only else self.hypertile_config()

    def tiled_diffusion_settings(self) -> MultiDiffusion | None:
        """``tiled_diffusion`` as :class:`sdengine.diffusion.multidiffusion.MultiDiffusion` (None: off); call after
        :meth:`validate`."""
        return None if self.tiled_diffusion is None else MultiDiffusion.coerce(self.tiled_diffusion)

    def _validate_tiled_diffusion(self) -> None:
        if self.tiled_diffusion is None:
            return
        try:
            MultiDiffusion.coerce(self.tiled_diffusion)
        except GenerationError:
            raise
        except SdengineError as e:
            raise GenerationError(str(e)) from None
        # ControlNets and T2I-Adapters take their maps cut to each view (ControlledUNet.view_hints); a reference
        # unit's passes run the U-Net on the whole reference latent, not a view's
        if any(u.reference is not None for u in self.control_units()):
            raise GenerationError("tiled diffusion cannot run with reference control units: drop one of the two")

    def control_units(self) -> list[ControlUnit]:
        return [ControlUnit.coerce(u) for u in (self.controlnets or [])]

    # -- checks ---------------------------------------------------------------------------------------

    def _validate_freeu(self) -> None:
        v, version, rule = self.freeu, self.freeu_version, self.freeu_rule
        if not _is_int(version) or version not in (1, 2):
            raise GenerationError(f"freeu_version must be 1 or 2, got {version!r}")
        if not isinstance(rule, str) or rule not in FREEU_RULES:
            raise GenerationError(f"unknown freeu_rule {rule!r}; use one of: {', '.join(FREEU_RULES)}")
        if v is None:
            return
        if isinstance(v, str | bytes) or not isinstance(v, Sequence) or len(v) != 4:
            raise GenerationError(f"freeu must be four numbers (b1, b2, s1, s2), e.g. (1.3, 1.4, 0.9, 0.2); got {v!r}")
        for name, x in zip(("b1", "b2", "s1", "s2"), v, strict=True):
            if not _is_number(x) or not math.isfinite(x) or not 0.0 <= x <= MAX_FREEU_FACTOR:
                raise GenerationError(f"freeu {name} must be a number in [0, {MAX_FREEU_FACTOR:g}], got {x!r}")

    def _validate_deep_shrink(self) -> None:
        if self.deep_shrink is None:
            return
        try:
            DeepShrink.coerce(self.deep_shrink)
        except GenerationError:
            raise
        except SdengineError as e:
            raise GenerationError(str(e)) from None
        if self.controlnets:  # their residuals have the full-size skips' shapes
            raise GenerationError("deep shrink cannot run with ControlNets or T2I-Adapters: drop one of the two")

    def _validate_hypertile(self) -> None:
        v, rule = self.hypertile, self.hypertile_rule
        if not isinstance(rule, str) or rule not in HYPERTILE_RULES:
            raise GenerationError(f"unknown hypertile_rule {rule!r}; use one of: {', '.join(HYPERTILE_RULES)}")
        for name in ("hypertile_hires_only", "hypertile_scale_depth"):
            if not isinstance(getattr(self, name), bool):
                raise GenerationError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.hypertile_vae is not None and self.vae_decode == "tiny":
            raise GenerationError("hypertile_vae tiles the full VAE's decoder; vae_decode='tiny' runs none: drop one")
        for field, v, e in (
            ("hypertile", self.hypertile, "(256, 3, 3)"),
            ("hypertile_vae", self.hypertile_vae, "(128, 3, 3)"),
        ):
            if v is None:
                continue
            if isinstance(v, str | bytes) or not isinstance(v, Sequence) or len(v) != 3:
                raise GenerationError(
                    f"{field} must be three whole numbers (tile_size, swap_size, max_depth), e.g. {e}; got {v!r}"
                )
            for name, x, hi in zip(
                ("tile_size", "swap_size", "max_depth"), v, (MAX_TILE_SIZE, MAX_SWAP_SIZE, MAX_DEPTH), strict=True
            ):
                if not _is_int(x) or not 0 <= x <= hi:
                    raise GenerationError(f"{field} {name} must be a whole number in [0, {hi}], got {x!r}")

    def _validate_image_cfg(self) -> None:
        """InstructPix2Pix's image guidance scale: None or a number in [0, MAX_CFG_SCALE]; it needs an init image
        (whether the model is an instruct-pix2pix one is the pipeline's check)."""
        v = self.image_cfg_scale
        if v is None:
            return
        if not _is_number(v) or not math.isfinite(v) or not 0 <= v <= MAX_CFG_SCALE:
            raise GenerationError(f"image_cfg_scale must be a number in [0, {MAX_CFG_SCALE:g}], got {v!r}")
        if self.init_image is None:
            raise GenerationError("image_cfg_scale guides towards an init image: it needs one (instruct-pix2pix)")

    def reference_list(self) -> list[ImageInput]:
        """The reference images (FLUX.1 Kontext) as a list: one image given alone is a list of one."""
        refs = self.reference_images
        if refs is None:
            return []
        return list(refs) if isinstance(refs, list | tuple) else [refs]  # type: ignore[arg-type, list-item]

    def validate_references(self) -> None:
        """The reference images' checks of :meth:`validate` (how many, none empty, the auto-resize a bool)."""
        if not isinstance(self.reference_auto_resize, bool | np.bool_):
            raise GenerationError(f"reference_auto_resize must be true or false, got {self.reference_auto_resize!r}")
        refs = self.reference_list()
        if not self.reference_auto_resize and not refs:
            raise GenerationError("reference_auto_resize applies to reference_images (FLUX.1 Kontext): give them")
        if any(x is None for x in refs):
            raise GenerationError("reference_images holds an empty entry (None)")
        if len(refs) > MAX_REFERENCE_IMAGES:
            raise GenerationError(
                f"{len(refs)} reference images: at most {MAX_REFERENCE_IMAGES} (each adds its tokens to every step)"
            )

    def image_cfg(self) -> float:
        """The image guidance scale an instruct-pix2pix run uses (None: diffusers' 1.5, A1111's 1)."""
        if self.image_cfg_scale is not None:
            return float(self.image_cfg_scale)
        return 1.0 if self.strength_rule in ("a1111", "a1111_fix_steps") else 1.5

    def validate(self) -> GenerationRequest:
        """Raise a one-line GenerationError for the first setting that cannot run; return self. Checks that
        need the model (size multiple, step limit, memory) are the pipeline's."""
        steps, batch = self.steps, self.batch_size
        if not _is_int(steps) or steps < 1:
            raise GenerationError(f"steps must be a positive integer, got {steps!r}")
        if not _is_int(batch) or batch < 1:
            raise GenerationError(f"batch_size must be a positive integer, got {batch!r}")
        lists = {
            name: len(v)
            for name, v in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt), ("seed", self.seed))
            if isinstance(v, list | tuple)
        }
        for name, v in (("prompt", self.prompt), ("negative_prompt", self.negative_prompt)):
            items = v if _is_list(v) else [v]
            if any(x is not None and not isinstance(x, str) for x in items):  # type: ignore[union-attr]
                raise GenerationError(f"{name} must be a string or a list of strings")
            for x in items:  # type: ignore[union-attr]
                text = str(x or "")  # a str here (checked above)
                try:  # a byte that is not UTF-8 in argv arrives as a lone surrogate; the tokenizers choke on it
                    text.encode("utf-8")
                except UnicodeEncodeError as e:
                    raise GenerationError(
                        f"{name} holds a character that is not valid text (an invalid UTF-8 byte?) at position "
                        f"{e.start}: {text[max(0, e.start - 10) : e.start]!r}"
                    ) from None
        if any(n == 0 for n in lists.values()):
            raise GenerationError(f"empty list for {', '.join(k for k, n in lists.items() if n == 0)}")
        if len(set(lists.values())) > 1:
            raise GenerationError("one value per row: " + ", ".join(f"{k} has {n}" for k, n in lists.items()))
        if lists and batch != 1 and batch != next(iter(lists.values())):
            n = next(iter(lists.values()))
            raise GenerationError(f"batch_size {batch} does not match the {n} rows of the lists given")
        if _is_list(self.seed):
            bad = [s for s in self.seed if not _is_int(s) or not 0 <= s <= MAX_SEED]  # type: ignore[union-attr]
            if bad:
                raise GenerationError(f"seeds in a list must be integers >= 0 and <= 2**64 - 1, got {bad[0]!r}")
        elif self.seed is not None:
            # no int() coercion: 1.5 or True as a seed is a mistake, not seed 1
            seed = self.seed
            if not _is_int(seed):
                raise GenerationError(f"seed must be an integer (or -1 / None for a random one), got {seed!r}")
            if seed < 0 and seed != -1:  # type: ignore[operator]
                raise GenerationError(f"seed must be >= 0 (or -1 / None for a random one), got {seed}")
            last = int(seed) + self.n_rows - 1  # type: ignore[arg-type]
            if last > MAX_SEED:
                raise GenerationError(
                    f"seed {seed} is out of range: seeds run from 0 to 2**64 - 1 = {MAX_SEED} "
                    f"(the last row's seed, seed + rows - 1, included)"
                )
        cfg, rescale, strength, blur = self.cfg_scale, self.guidance_rescale, self.strength, self.mask_blur
        if not _is_number(cfg) or not math.isfinite(cfg) or cfg < 0:
            raise GenerationError(f"cfg_scale must be a number >= 0, got {cfg!r}")
        if cfg > MAX_CFG_SCALE:
            raise GenerationError(f"cfg_scale {cfg} is over the limit of {MAX_CFG_SCALE:g} (useful values: 1-30)")
        if not _is_number(rescale) or not 0.0 <= rescale <= 1.0:
            raise GenerationError(f"guidance_rescale must be in [0, 1], got {rescale!r}")
        shift = self.shift
        if shift is not None and (not _is_number(shift) or not math.isfinite(shift) or not 0 < shift <= MAX_SHIFT):
            raise GenerationError(f"shift must be a number in (0, {MAX_SHIFT:g}], got {shift!r}")
        pag = self.pag_scale
        if not _is_number(pag) or not math.isfinite(pag) or not 0.0 <= pag <= MAX_PAG_SCALE:
            raise GenerationError(f"pag_scale must be a number in [0, {MAX_PAG_SCALE:g}], got {pag!r}")
        layers = self.pag_layers
        if not isinstance(layers, str) and not (
            isinstance(layers, list | tuple) and all(isinstance(x, str) for x in layers)
        ):
            raise GenerationError(f"pag_layers must be a string or a list of strings, got {layers!r}")
        if not all(self.pag_layer_list()):
            raise GenerationError(f"pag_layers holds an empty layer name: {layers!r} (e.g. 'mid' or 'mid,up_blocks.1')")
        sag, sag_blur = self.sag_scale, self.sag_blur_sigma  # not ``blur``: mask_blur's, checked below
        if not _is_number(sag) or not math.isfinite(sag) or not -MAX_SAG_SCALE <= sag <= MAX_SAG_SCALE:
            raise GenerationError(f"sag_scale must be a number in [-{MAX_SAG_SCALE:g}, {MAX_SAG_SCALE:g}], got {sag!r}")
        if not _is_number(sag_blur) or not math.isfinite(sag_blur) or not 0.0 < sag_blur <= MAX_SAG_BLUR_SIGMA:
            raise GenerationError(f"sag_blur_sigma must be a number in (0, {MAX_SAG_BLUR_SIGMA:g}], got {sag_blur!r}")
        if not isinstance(self.sag_rule, str) or self.sag_rule not in SAG_RULES:
            raise GenerationError(f"unknown sag_rule {self.sag_rule!r}; use one of: {', '.join(SAG_RULES)}")
        self._validate_row_images()
        self._validate_image_cfg()
        self.validate_references()
        if self.control_preprocessor != "none" or self.control_image is not None:
            from sdengine.pipeline.flux_fill import control_preprocessor_refusal

            why = control_preprocessor_refusal(self.control_preprocessor, self.control_image)
            if why is not None:
                raise GenerationError(why)
        self._validate_freeu()
        self._validate_deep_shrink()
        self._validate_hypertile()
        self._validate_tiled_diffusion()
        if self.clip_skip_rule not in CLIP_SKIP_RULES:
            raise GenerationError(
                f"unknown clip_skip_rule {self.clip_skip_rule!r}; use one of: {', '.join(CLIP_SKIP_RULES)}"
            )
        if self.strength_rule not in STRENGTH_RULES:
            raise GenerationError(
                f"unknown strength_rule {self.strength_rule!r}; use one of: {', '.join(STRENGTH_RULES)}"
            )
        a1111 = self.strength_rule == "a1111"
        if not _is_number(strength) or not (0.0 <= strength <= 1.0 if a1111 else 0.0 < strength <= 1.0):
            # A1111's rule runs one step even at strength 0
            raise GenerationError(f"strength must be in {'[' if a1111 else '('}0, 1], got {strength!r}")
        if not _is_number(blur) or not math.isfinite(blur) or not 0 <= blur <= MAX_MASK_BLUR:
            raise GenerationError(f"mask_blur must be in [0, {MAX_MASK_BLUR:g}] pixels, got {blur!r}")
        try:
            sampler, _ = sampling.resolve(self.sampler, self.schedule)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if self.init_image is not None and img2img_start(
            int(steps), float(strength), self.strength_rule, sampler
        ) >= int(steps):
            raise GenerationError(
                f"strength {strength} with {steps} steps runs no step (int(steps * strength) = 0): "
                "raise steps or strength"
            )
        if self.mask is not None and self.init_image is None:
            raise GenerationError("a mask needs an init_image to inpaint")
        if not isinstance(self.init_latent_resize, bool):
            raise GenerationError(f"init_latent_resize must be true or false, got {self.init_latent_resize!r}")
        if self.init_latent_resize and (self.init_image is None or self.mask is not None or self.controlnets):
            raise GenerationError(
                "init_latent_resize (A1111's latent upscale resize mode) needs an init_image and takes no mask or "
                "ControlNet"
            )
        if self.masked_content not in MASKED_CONTENT:
            raise GenerationError(
                f"unknown masked_content {self.masked_content!r}; use one of: {', '.join(MASKED_CONTENT)}"
            )
        if self.masked_content != "original" and self.mask is None:
            raise GenerationError(f"masked_content {self.masked_content!r} needs a mask (inpainting)")
        dd = self.differential_diffusion
        if not _is_number(dd) or not 0.0 <= dd <= 1.0:
            raise GenerationError(f"differential_diffusion must be a number in [0, 1] (0 = off), got {dd!r}")
        if dd and self.mask is None:
            raise GenerationError(
                "differential_diffusion needs a mask (its grey levels say how much each pixel changes)"
            )
        if dd and self.strength_rule != "diffusers":
            raise GenerationError(
                f"differential_diffusion blends by ComfyUI's rule; strength_rule {self.strength_rule!r} blends as "
                "A1111: use strength_rule 'diffusers' or turn differential_diffusion off"
            )
        soft = self.soft_inpainting_settings()
        if soft is not None and self.mask is None:
            raise GenerationError("soft_inpainting needs a mask (inpainting: an init_image and a grey mask)")
        if soft is not None and dd:
            raise GenerationError(
                "soft_inpainting and differential_diffusion are two ways of inpainting with a grey mask: use one"
            )
        if not isinstance(self.mask_round, bool):
            raise GenerationError(f"mask_round must be true or false, got {self.mask_round!r}")
        for what, given in (("mask_round false", not self.mask_round), ("latent_mask", self.latent_mask is not None)):
            if given and self.mask is None:
                raise GenerationError(f"{what} needs a mask (inpainting: an init_image and a mask)")
            if given and self.strength_rule not in A1111_STRENGTH_RULES:
                raise GenerationError(
                    f"{what} is A1111's (its latent mask, which blends under its strength rule): use strength_rule "
                    f"'a1111' or 'a1111_fix_steps', not {self.strength_rule!r}"
                )
        self.control_units()  # the tuple forms parse
        if self.ip_adapters is not None:
            if not isinstance(self.ip_adapters, list | tuple):
                raise GenerationError(
                    f"ip_adapters must be a list of IPAdapterUnit, got {type(self.ip_adapters).__name__}"
                )
            for unit in self.ip_adapters:
                if not isinstance(unit, IPAdapterUnit):
                    raise GenerationError(f"ip_adapters takes IPAdapterUnit values, got {type(unit).__name__}")
                unit.check()
        check_units(self.redux)
        from sdengine.io.resize import resize_mode_name

        if self.vae_decode not in VAE_DECODE_METHODS:
            raise GenerationError(f"vae_decode must be one of {', '.join(VAE_DECODE_METHODS)}, got {self.vae_decode!r}")
        if self.vae_encode not in VAE_ENCODE_METHODS:
            raise GenerationError(f"vae_encode must be one of {', '.join(VAE_ENCODE_METHODS)}, got {self.vae_encode!r}")

        resize_mode_name(self.resize_mode)
        sub, sub_strength = self.subseed, self.subseed_strength
        if not _is_number(sub_strength) or not 0.0 <= sub_strength <= 1.0:
            raise GenerationError(f"subseed_strength must be in [0, 1], got {sub_strength!r}")
        if sub is not None and _is_int(sub) and sub >= 0 and sub <= MAX_SEED < sub + self.n_rows - 1:
            raise GenerationError(
                f"subseed {sub} is out of range for {self.n_rows} rows: subseeds run from 0 to 2**64 - 1 = {MAX_SEED} "
                "(the last row's subseed, subseed + rows - 1, included)"
            )
        if sub is not None and (not _is_int(sub) or (sub < 0 and sub != -1) or sub > MAX_SEED):
            raise GenerationError(
                f"subseed must be an integer in [0, 2**64 - 1] (or -1 / None for a random one), got {sub!r}"
            )
        if not isinstance(self.tiling, bool | np.bool_):
            raise GenerationError(f"tiling must be true or false, got {self.tiling!r}")
        if not isinstance(self.discard_penultimate_sigma, bool | np.bool_):
            raise GenerationError(
                f"discard_penultimate_sigma must be true or false, got {self.discard_penultimate_sigma!r}"
            )
        if not isinstance(self.zero_terminal_snr, bool | np.bool_):
            raise GenerationError(f"zero_terminal_snr must be true or false, got {self.zero_terminal_snr!r}")
        if self.noise_source not in NOISE_SOURCES:
            raise GenerationError(
                f"unknown noise_source {self.noise_source!r}; use one of: {', '.join(NOISE_SOURCES)} "
                "(A1111's randn_source CPU is 'cpu', NV and GPU are 'nv')"
            )
        delta = self.noise_seed_delta
        if not _is_int(delta) or not 0 <= delta <= MAX_SEED_DELTA:
            raise GenerationError(f"noise_seed_delta must be an integer in [0, {MAX_SEED_DELTA}], got {delta!r}")
        m = self.noise_multiplier
        if not _is_number(m) or not 0.0 <= m <= MAX_NOISE_MULTIPLIER:
            raise GenerationError(f"noise_multiplier must be a number in [0, {MAX_NOISE_MULTIPLIER:g}], got {m!r}")
        if m != 1 and self.init_image is None:
            raise GenerationError(
                f"noise_multiplier {m:g} scales the noise added to an init image: it needs one (img2img, inpainting)"
            )
        resize_from = {"seed_resize_from_w": self.seed_resize_from_w, "seed_resize_from_h": self.seed_resize_from_h}
        for side, pixels in resize_from.items():
            if not _is_int(pixels) or not -1 <= pixels <= MAX_SEED_RESIZE:
                raise GenerationError(
                    f"{side} must be an integer in [1, {MAX_SEED_RESIZE}] pixels (0 or -1: off), got {pixels!r}"
                )
        if sum(v > 0 for v in resize_from.values()) == 1:
            raise GenerationError(
                "seed_resize_from_w and seed_resize_from_h go together (A1111's 'Resize seed from width/height'): "
                "give both, or neither"
            )
        if not isinstance(self.enable_hr, bool | np.bool_):
            raise GenerationError(f"enable_hr must be true or false, got {self.enable_hr!r}")
        if self.enable_hr:
            from sdengine.pipeline.hires import validate_hires

            validate_hires(self)
        return self

    def precheck(self) -> GenerationRequest:
        """Every check that needs no model, before one is loaded: :meth:`validate`, then the prompts' syntax
        (prompt weights, ``<lora:...>`` tags), the LoRA weights' hard bound and image files that do not exist.
        A command that renders many requests (a prompt list, an X/Y/Z plot) runs it on all of them first, so a
        bad one fails before any is drawn. Returns self."""
        from sdengine.nn.lora import WEIGHT_LIMIT, LoRAWeight, check_weight, part_weights
        from sdengine.prompts import extract_lora_tags, parse_prompt_attention

        self.validate()
        texts = [*_per_row(self.prompt, 1), *_per_row(self.negative_prompt, 1)]
        weights = [(Path(str(x[0])).stem, x[1]) for x in (self.loras or []) if isinstance(x, tuple) and len(x) > 1]
        for text in texts:
            rest, tags = extract_lora_tags(text)
            parse_prompt_attention(rest)
            weights += [(str(name), w) for name, w in tags]
        for name, weight in weights:  # only the hard bound here; the pipeline warns about large weights once
            for w in part_weights(weight) if isinstance(weight, LoRAWeight) else (weight,):
                if _is_number(w) and (not math.isfinite(w) or abs(w) > WEIGHT_LIMIT):
                    check_weight(w, name)
        images: list[tuple[str, Any]] = [("control image", self.control_image)]
        for what, v in (("init image", self.init_image), ("mask", self.mask)):
            if _is_list(v):
                images += [(f"{what} {k}", x) for k, x in enumerate(v)]  # type: ignore[arg-type]
            else:
                images.append((what, v))
        images.append(("latent mask", self.latent_mask))
        images += [(f"ControlNet unit {k} image", u.image) for k, u in enumerate(self.control_units())]
        images += [(f"reference image {k}", x) for k, x in enumerate(self.reference_list())]
        for what, image in images:  # the words sdengine.io.images.load_image says it in
            if isinstance(image, str | Path) and not Path(image).is_file():
                raise GenerationError(f"{what} not found: {image}")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            # checked whether or not a tag uses it (a mistyped folder once went unnoticed until a tag did)
            from sdengine.weights.lora_file import LoRAFileError

            what = "is not a folder" if Path(self.lora_dir).exists() else "does not exist"
            raise LoRAFileError(f"LoRA folder {self.lora_dir} {what}")
        return self


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple)


def _one_image(v: Any, what: str) -> ImageInput:
    if _is_list(v):
        raise GenerationError(f"{what} is a list (one per row) where this call takes one image")
    return v  # type: ignore[no-any-return]


def _row_images(v: Any, n: int) -> list[Any]:
    if v is None:
        return []
    return list(v) if _is_list(v) else [v] * n


def _per_row(v: TextOrList | None, n: int) -> list[str]:
    if _is_list(v):
        return ["" if x is None else str(x) for x in v]  # type: ignore[union-attr]
    return ["" if v is None else str(v)] * n


def batch_count_seeds(
    seed: Any, subseed: int | None, subseed_strength: float, batch: int, k: int
) -> tuple[Any, int | None]:
    """(seed, subseed) of batch ``k`` of an A1111 batch count (``n_iter``) whose first batch has ``seed`` and
    ``subseed``: the batches continue one run's seeds, batch k at ``seed + k * batch``; with variation seeds on
    (``subseed_strength`` not 0) every image keeps the seed and the variation seed continues, ``subseed + k *
    batch`` (A1111's ``all_seeds`` / ``all_subseeds``). A list of per-row seeds is kept for every batch."""
    if not isinstance(seed, list) and not subseed_strength:
        seed = int(seed) + k * batch
    return seed, None if subseed is None else int(subseed) + k * batch


__all__ = [
    "MAX_CFG_SCALE",
    "MAX_MASK_BLUR",
    "MAX_FREEU_FACTOR",
    "MAX_PAG_SCALE",
    "MAX_SAG_SCALE",
    "MAX_SEED",
    "MAX_SEED_RESIZE",
    "GenerationRequest",
    "LoRAInput",
    "batch_count_seeds",
]
