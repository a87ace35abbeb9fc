"""Every protocol's request becomes ONE dict of the pipeline's keyword arguments, here.

The dict's keys are the fields of :class:`sdengine.pipeline.GenerationRequest` (``GenerationRequest(**kwargs)`` is
built and validated here; the worker calls ``pipe(**kwargs)``). ``build_generation`` is the only place that turns
request fields into what ``Pipeline.__call__`` takes (the names are the pipeline's: prompt, negative_prompt, steps,
sampler, schedule, cfg_scale, seed, width, height, batch_size, init_image, strength, mask, mask_blur, controlnets,
loras, clip_skip). The native, AUTOMATIC1111 and OpenAI routes each map their own field names onto its arguments.
It checks limits, draws the seed for -1, resolves every LoRA (argument or ``<lora:NAME:W>`` prompt tag) and
ControlNet name inside its folder, decodes images (limits before decoding) and runs ControlNet preprocessors, so
that a job that reaches the queue only fails for reasons found while generating.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageOps

from sdengine.diffusion import sampling
from sdengine.metadata import REFERENCE_MODULES
from sdengine.server.catalog import Catalog, strip_title
from sdengine.server.config import ServerConfig
from sdengine.server.errors import BadRequest, redact_paths
from sdengine.server.uploads import UploadStore

ImageRef = str | Image.Image  # an upload id, base64, or an image already decoded by the route

MAX_SEED = 2**53 - 1
MAX_LORAS = 16  # LoRAs of one request (the request's and the prompt's <lora:...> tags together)
MAX_CONTROLNETS = 4  # ControlNet units of one request
# the range of each sampler option a request may set (A1111's eta, and k-diffusion's churn and noise options:
# s_churn as A1111's slider, 0..100; the sigma bounds up to any model's largest sigma)
OPTION_LIMITS = {
    "eta": (0.0, 10.0),
    "s_churn": (0.0, 100.0),
    "s_tmin": (0.0, 10000.0),
    "s_tmax": (0.0, 10000.0),
    "s_noise": (0.0, 10.0),
}  # exact in JavaScript numbers, so the web page can show and send it back
SAMPLER_OPTION_KINDS: dict[str, type] = {"variant": str, "order": int}  # not numbers to check as above


@dataclass(frozen=True)
class ControlRequest:
    """One ControlNet unit as a route received it."""

    model: str
    image: ImageRef
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocessor: str = "none"
    options: dict[str, float] = field(default_factory=dict)  # preprocessor options (canny: low, high)
    rule: str = "diffusers"  # how start/end pick the steps (pipeline.control.STEP_RULES); A1111's routes: "a1111"
    processor_res: int | None = None  # the short side the image was scaled to before the preprocessor (A1111's)
    mode: str = "balanced"  # the control mode (pipeline.control.CONTROL_MODES); A1111's unit's control_mode
    hires_mode: str | None = None  # the hires fix's second pass (A1111's canny units: the extension's soft weights)
    mask: ImageRef | None = None  # an SD3 inpainting ControlNet's mask (white = repaint)
    union_mode: int | str | None = None  # a Flux Union ControlNet's control kind (name or number)
    inpaint_image: ImageRef | None = None  # a Z-Image inpainting ControlNet's picture to inpaint (with mask)


@dataclass
class Generation:
    """What the queue runs: the pipeline call (``kwargs``), the model, and ``n_iter`` repeats (A1111)."""

    model: str  # the loader's reference (built-in name or path)
    model_name: str  # as listed
    kwargs: dict[str, Any]
    n_iter: int = 1
    notes: list[str] = field(default_factory=list)  # the route's notes about the job (copied into the Job's)
    # applied to every image before it is saved or answered (A1111's inpainting overlay), None: as generated; where
    # the pipeline answers with composite masks (soft inpainting: GenerationResult.composite_masks) it is called
    # with the image's mask too (see finished)
    finish: Callable[..., Image.Image] | None = None
    # an SDXL refiner hand-off (A1111's refiner_checkpoint / refiner_switch_at): the refiner's loader reference,
    # its listed name and the switch; the worker loads the refiner for the job (SDXLPipeline.generate_with_refiner)
    refiner: str | None = None
    refiner_name: str | None = None
    refiner_switch_at: float | None = None
    # the switch's rule (sdengine.pipeline.sdxl.SWITCH_RULES): A1111's on the A1111 routes, the request's on the
    # native one (diffusers' by default, as the Python API's)
    refiner_switch_rule: str = "a1111"
    # A1111's hires_fix_refiner_pass: which pass of the hires fix hands off ("first pass", "second pass", "both
    # passes"; sdengine.pipeline.sdxl.HIRES_REFINER_PASSES)
    hires_refiner_pass: str = "second pass"
    # A1111's hr_checkpoint_name naming another model: the hires fix's second pass runs on it (loader reference,
    # listed name); the worker loads it beside the job's model
    hr_model: str | None = None
    hr_model_name: str | None = None
    # A1111's SDXL options as ``sdxl`` settings: the worker adds them to an SDXL model's request (the aesthetic
    # scores to a refiner's only); other models ignore them, as A1111 does
    sdxl_options: dict[str, Any] | None = None
    # A1111's sd_vae for this job: a VAE file/folder (loader path) and its listed name; ``checkpoint_vae``: the
    # model's own VAE ("None"); neither: the VAE the model was loaded with ("Automatic"). The worker sets it on
    # the job's pipelines before the job runs (Pipeline.set_vae), so a job never decodes with another job's VAE.
    vae: str | None = None
    vae_name: str | None = None
    checkpoint_vae: bool = False
    # a script the worker calls instead of the pipeline, with the pipeline's call and the fields (A1111's SD
    # upscale: sdengine.server.a1111.sd_upscale_script); None: the pipeline's call
    script: Callable[..., Any] | None = None
    # entries added to the end of every image's infotext (A1111's inpainting "Mask blur", which the A1111 route's
    # own blur does not leave to the pipeline to write), in order; None: the pipeline's infotext as it is
    infotext_extra: dict[str, str] | None = None

    @property
    def images(self) -> int:
        return int(self.kwargs["batch_size"]) * self.n_iter

    def finished(self, image: Image.Image, mask: Image.Image | None = None) -> Image.Image:
        """An image as answered: ``finish(image)``, or ``finish(image, mask)`` with the pipeline's composite mask of
        the image (soft inpainting), or the image itself without a finish."""
        if self.finish is None:
            return image
        return self.finish(image) if mask is None else self.finish(image, mask)

    def labelled(self, text: str) -> str:
        """An image's infotext with :attr:`infotext_extra` added to its last line (A1111's ``Key: value`` list)."""
        if not self.infotext_extra:
            return text
        extra = ", ".join(f"{k}: {v}" for k, v in self.infotext_extra.items())
        return f"{text}, {extra}" if text else extra

    def release_images(self) -> None:
        """Drop the decoded input images (init image, mask, ControlNet images, the overlay that holds the init
        image) of a job that has finished long ago: the job table keeps hundreds of finished jobs, and their
        inputs (up to the pixel limit each) would stay in memory with them. The settings stay."""
        for key in ("init_image", "mask", "reference_images", "control_image"):
            if self.kwargs.get(key) is not None:
                self.kwargs[key] = None
        units = self.kwargs.get("controlnets")
        if units:
            self.kwargs["controlnets"] = [dataclasses.replace(u, image=None) for u in units]
        ip_units = self.kwargs.get("ip_adapters")
        if ip_units:
            self.kwargs["ip_adapters"] = [dataclasses.replace(u, images=None) for u in ip_units]
        redux = self.kwargs.get("redux")
        if redux:
            self.kwargs["redux"] = [dataclasses.replace(u, image=None) for u in redux]
        self.finish = None


# A job's VAE choice (A1111's sd_vae, the native and OpenAI routes' ``vae``): these words, or a VAE file's name
VAE_WORDS = ("Automatic", "None")
_VAES_READ: dict[tuple[str, int, int], bool] = {}  # VAE files read once as VAEs (path, mtime, size)


def check_vae_choice(catalog: Catalog, value: Any, what: str = "vae") -> str:
    """A job's VAE as A1111's ``sd_vae`` takes it: "Automatic" (A1111's old "auto" too), "None" or a VAE's file
    name as GET /sdapi/v1/sd-vae and GET /v1/vaes list it (an ``[hash]`` title suffix is dropped); anything else
    is a one-line 400 naming ``what``. The file is read once (and again when it changes), so that what is no VAE
    at all (another kind of weights, a damaged file) is said before any job is queued."""
    if not isinstance(value, str):
        raise BadRequest(f'{what} must be "Automatic", "None" or a VAE file name, got {value!r}')
    if value in ("Automatic", "auto", "None"):
        return "Automatic" if value == "auto" else value
    try:
        path = catalog.resolve_sd_vae(value)
    except BadRequest as e:
        raise BadRequest(f"{what}: {e}") from None
    from sdengine.errors import SdengineError
    from sdengine.weights.loading import load_vae

    try:
        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        if key not in _VAES_READ:
            load_vae(path)
            if len(_VAES_READ) > 64:
                _VAES_READ.clear()
            _VAES_READ[key] = True
    except (SdengineError, OSError) as e:
        raise BadRequest(f"{what} {value!r}: {redact_paths(str(e))}") from None
    return strip_title(value)


def set_job_vae(generation: Generation, catalog: Catalog, choice: str, server_vae: Any = None) -> None:
    """The job's VAE (``Generation.vae``) for a checked ``choice``: "None" the model file's own VAE; a name that
    file; "Automatic" the --vaes-dir file named as the model (Catalog.automatic_vae), else the model's as loaded
    (with the server's --vae, ``server_vae``: that one, as A1111's --vae-path)."""
    if choice == "None":
        generation.checkpoint_vae = True
        return
    if choice == "Automatic":
        path = catalog.automatic_vae(generation.model) if server_vae is None else None
    else:
        path = catalog.resolve_sd_vae(choice)
    if path is not None:
        generation.vae, generation.vae_name = str(path), path.name


MAX_PAG_LAYERS = 32  # patterns in one request's pag_layers
MAX_PAG_PATTERN = 200  # characters of one pattern (a regular expression searched in the U-Net's layer names)


def check_pag(scale: Any, layers: Any) -> tuple[float, tuple[str, ...]]:
    """Perturbed-attention guidance's ``pag_scale`` (a number in [0, MAX_PAG_SCALE]) and ``pag_layers`` (a string of
    comma-separated patterns or a list of strings, each a regular expression: diffusers' ``pag_applied_layers``) as
    (scale, the patterns as a tuple: one form, so that equal settings compare equal in batch_key, whichever way they
    came); a one-line BadRequest for anything else. Whether a pattern matches a layer of the model is the
    precheck's to say (a loaded model's), else the job's."""
    import re

    from sdengine.pipeline.request import MAX_PAG_SCALE

    scale = _finite(scale, "pag_scale", 0.0, MAX_PAG_SCALE)
    if isinstance(layers, str):
        items = layers.split(",")
    elif isinstance(layers, list | tuple) and all(isinstance(x, str) for x in layers):
        items = list(layers)  # a pattern of a list may hold a comma ("a{1,2}"), as the pipeline takes it
    else:
        raise BadRequest(f"pag_layers must be a string or a list of strings, got {repr(layers)[:100]}")
    items = [x.strip() for x in items]
    if not all(items):
        got = repr(layers)[:100]
        raise BadRequest(f"pag_layers holds an empty layer name: {got} (e.g. 'mid' or 'mid,up_blocks.1')")
    if len(items) > MAX_PAG_LAYERS:
        raise BadRequest(f"pag_layers holds {len(items)} patterns, over the limit of {MAX_PAG_LAYERS}")
    for x in items:
        if len(x) > MAX_PAG_PATTERN:
            raise BadRequest(f"pag_layers: a pattern is {len(x)} characters long, over the limit of {MAX_PAG_PATTERN}")
        try:
            re.compile(x)
        except re.error as e:
            raise BadRequest(f"pag_layers: {x!r} is not a regular expression: {e}") from None
    return scale, tuple(items)


def check_freeu(factors: Any, version: Any = 2, rule: Any = "width") -> tuple[tuple[float, ...], int, str] | None:
    """FreeU's ``freeu`` ([b1, b2, s1, s2], each a number in [0, MAX_FREEU_FACTOR]; None: off), ``freeu_version``
    (1 or 2) and ``freeu_rule`` ("width" or "diffusers") as (the factors as a tuple, version, rule), or None when
    off (version and rule then not read); a one-line BadRequest for anything else. Whether the model has up blocks
    the rule picks is the precheck's to say (a loaded model's), else the job's."""
    from sdengine.nn.freeu import FREEU_RULES, FREEU_VERSIONS, MAX_FREEU_FACTOR

    if factors is None:
        return None
    if not isinstance(factors, list | tuple) or len(factors) != 4:
        got = repr(factors)[:100]
        raise BadRequest(f"freeu must be four numbers [b1, b2, s1, s2], e.g. [1.3, 1.4, 0.9, 0.2], got {got}")
    out = tuple(
        _finite(x, f"freeu {n}", 0.0, MAX_FREEU_FACTOR) for n, x in zip(("b1", "b2", "s1", "s2"), factors, strict=True)
    )
    if isinstance(version, float) and version.is_integer():
        version = int(version)
    if isinstance(version, bool) or version not in FREEU_VERSIONS:
        raise BadRequest(f"freeu_version must be 1 or 2, got {repr(version)[:100]}")
    if not isinstance(rule, str) or rule not in FREEU_RULES:
        raise BadRequest(f"unknown freeu_rule {repr(rule)[:100]}; use one of: {', '.join(FREEU_RULES)}")
    return out, int(version), rule


# The longest prompt (and negative prompt) of any request, in characters: OpenAI's limit, the widest of the
# protocols' (the native schema's is 20000); every route's prompts pass here (A1111's had none).
MAX_PROMPT_CHARS = 32000


def _finite(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{what} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def _integer(value: Any, what: str, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{what} must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{what} must be in [{lo}, {hi}], got {value}")
    return value


def build_generation(
    config: ServerConfig,
    catalog: Catalog,
    uploads: UploadStore,
    *,
    model: str | None,
    prompt: str,
    negative_prompt: str = "",
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    schedule: str | None = "karras",
    cfg_scale: float = 7.5,
    seed: int | None = -1,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    init_image: ImageRef | None = None,
    strength: float = 0.75,
    strength_rule: str = "diffusers",
    mask: ImageRef | None = None,
    mask_blur: float = 0,
    control_image: ImageRef | None = None,
    control_preprocessor: str = "none",
    controlnets: Sequence[ControlRequest] = (),
    loras: Sequence[tuple[str, Any]] = (),
    clip_skip: int = 1,
    clip_skip_rule: str = "sdengine",
    guess_mode: bool = False,
    ip_adapters: Any = (),
    n_iter: int = 1,
    default_model: str | None = None,
    hires: dict[str, Any] | None = None,
    vae_decode: str = "full",
    vae_encode: str = "full",
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    same_seed: bool = False,
    resize_mode: str | int = 0,
    init_latent_resize: bool = False,
    sampler_options: dict[str, Any] | None = None,
    tiling: bool = False,
    seed_resize_from: tuple[int, int] | None = None,
    noise_multiplier: float = 1.0,
    noise_seed_delta: int = 0,
    noise_source: str = "cpu",
    discard_penultimate_sigma: bool = False,
    zero_terminal_snr: bool = False,
    masked_content: str = "original",
    differential_diffusion: float = 0.0,
    soft_inpainting: bool | dict[str, Any] | None = None,
    mask_round: bool = True,
    latent_mask: ImageRef | None = None,
    sdxl: dict[str, Any] | None = None,
    vae: str | None = None,
    sag_scale: float = 0.0,
    sag_blur_sigma: float = 1.0,
    sag_rule: str = "diffusers",
    pag_scale: float = 0.0,
    pag_layers: str | Sequence[str] = "mid",
    freeu: Sequence[float] | None = None,
    freeu_version: int = 2,
    freeu_rule: str = "width",
    deep_shrink: Any = None,
    hypertile: Sequence[int] | None = None,
    hypertile_hires_only: bool = False,
    hypertile_rule: str = "a1111",
    hypertile_scale_depth: bool = True,
    hypertile_vae: Sequence[int] | None = None,
    tiled_diffusion: dict[str, Any] | None = None,
    image_cfg_scale: float | None = None,
    distilled_cfg_scale: float | None = None,
    shift: float | None = None,
    sd3: dict[str, Any] | None = None,
    modules: Sequence[str] | None = None,
    reference_images: Sequence[ImageRef] | None = None,
    reference_auto_resize: bool = True,
    redux: Any = None,
) -> Generation:
    """The pipeline call for one request; a BadRequest (one line) for anything that cannot run. ``vae``: the
    job's VAE (:func:`check_vae_choice`; None: the VAE the model was loaded with). ``pag_scale`` / ``pag_layers``:
    perturbed-attention guidance (:func:`check_pag`; the layers are kept only with a scale above 0). ``freeu`` /
    ``freeu_version`` / ``freeu_rule``: FreeU (:func:`check_freeu`; None: off). ``sag_scale`` / ``sag_blur_sigma``:
    self-attention guidance (the blur sigma and ``sag_rule``, "diffusers" or "comfyui", kept only with a scale other
    than 0). ``deep_shrink``: Deep Shrink's settings (the pipeline's ``deep_shrink``; checked by
    GenerationRequest.validate below). ``hypertile``:
    HyperTile's (tile size, swap size, max depth), None: off; ``hypertile_hires_only``: the hires fix's second pass
    only; ``hypertile_rule``, ``hypertile_scale_depth``: how it tiles (checked by GenerationRequest.validate; such a
    job runs alone, its tiles drawn from its own first seed); ``hypertile_vae``: HyperTile on the VAE's decoder (tile
    size, swap size, max depth), None: off (such a job runs alone too). ``ip_adapters``: IP-Adapter units
    (:class:`sdengine.server.ip_adapters.IPAdapterRequest`, or the native job's list of objects): names resolved in
    their folders, the CLIP vision encoder chosen, the pictures decoded; the worker loads the files.
    ``tiled_diffusion``: MultiDiffusion's settings (the pipeline's ``tiled_diffusion``; checked by
    GenerationRequest.validate; such a job runs alone). ``distilled_cfg_scale`` (FLUX.1 [dev]'s distilled guidance),
    ``shift`` (SD3's flow time shift) and ``sd3`` (SD3's skip-layer guidance, :class:`sdengine.pipeline.sd3.SD3Options`
    keys): the model family's own settings, None: the model's defaults; their ranges are checked here, whether the
    job's model takes them by the precheck (``app.check_family_settings``). ``redux``: FLUX.1 Redux units (the
    native job's list of objects: :mod:`sdengine.server.redux`), names resolved in their folders, pictures decoded."""
    from sdengine.diffusion.sag import MAX_SAG_BLUR_SIGMA, SAG_RULES
    from sdengine.nn.lora import LoRAWeight, lora_weight
    from sdengine.pipeline.request import MAX_SAG_SCALE
    from sdengine.prompts import extract_lora_tags

    vae_choice = None if vae is None else check_vae_choice(catalog, vae)

    if not isinstance(prompt, str) or not isinstance(negative_prompt, str):
        raise BadRequest("prompt and negative_prompt must be strings")
    for what, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:  # A1111's route took megabytes: thousands of chunks for the text encoder
            raise BadRequest(f"{what} is {len(text)} characters long, over the limit of {MAX_PROMPT_CHARS}")
    steps = _integer(steps, "steps", 1, config.max_steps)
    batch_size = _integer(batch_size, "batch_size", 1, config.max_batch)
    n_iter = _integer(n_iter, "n_iter", 1, 100)
    if batch_size * n_iter > 4 * config.max_batch:
        raise BadRequest(
            f"batch_size x n_iter = {batch_size * n_iter} images, over the limit of {4 * config.max_batch}"
        )
    cfg_scale = _finite(cfg_scale, "cfg_scale", 0.0, 100.0)
    sag_scale = _finite(sag_scale, "sag_scale", -MAX_SAG_SCALE, MAX_SAG_SCALE)
    sag_blur_sigma = _finite(sag_blur_sigma, "sag_blur_sigma", 0.0, MAX_SAG_BLUR_SIGMA)
    if sag_scale and sag_blur_sigma <= 0:
        raise BadRequest(f"sag_blur_sigma must be above 0, got {sag_blur_sigma:g}")
    if not isinstance(sag_rule, str) or sag_rule not in SAG_RULES:
        raise BadRequest(f"unknown sag_rule {repr(sag_rule)[:100]}; use one of: {', '.join(SAG_RULES)}")
    pag_scale, pag_layer_text = check_pag(pag_scale, pag_layers)
    freeu_settings = check_freeu(freeu, freeu_version, freeu_rule)
    strength = _finite(strength, "strength", 0.0, 1.0)
    mask_blur = _finite(mask_blur, "mask_blur", 0.0, 256.0)
    clip_skip = _integer(clip_skip, "clip_skip", 1, 24)
    for what, v in (("width", width), ("height", height)):
        if v is not None:
            _integer(v, what, 8, config.max_side)
    if seed is None or seed == -1:
        seed = secrets.randbelow(2**32)
    seed = _integer(seed, "seed", 0, MAX_SEED)
    # A variation seed (A1111's subseed): drawn here when random, so that the answer can name it; row k of
    # all batch_size x n_iter images uses subseed + k. same_seed: every image has the one seed (A1111's rule
    # with a variation strength above 0), else seed + k.
    subseed_strength = _finite(subseed_strength, "subseed_strength", 0.0, 1.0)
    if subseed_strength:
        if subseed is None or subseed == -1:
            subseed = secrets.randbelow(2**32)
        subseed = _integer(subseed, "subseed", 0, MAX_SEED - batch_size * n_iter)
    if not isinstance(sampler, str) or not (schedule is None or isinstance(schedule, str)):
        raise BadRequest("sampler and schedule must be names")
    try:
        sampler, schedule = sampling.resolve(sampler, schedule)
    except ValueError as e:
        raise BadRequest(str(e)) from None

    # LoRAs: the request's and the prompt's <lora:NAME:W> tags, every name resolved inside the LoRA folder
    # here (the pipeline would otherwise also accept a path), and the tags taken out of the prompt.
    try:
        clean_prompt, tags = extract_lora_tags(prompt)
        _, negative_tags = extract_lora_tags(negative_prompt)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    # the spaces a tag at the start or end leaves are dropped, as the pipeline drops them where it takes the tags
    # out itself (Qwen2's and Qwen3's tokenizers read spaces: "a cat <lora:x:1>" reads as "a cat"; CLIP's and T5's
    # drop them anyway), so that a served image is the Python call's with the same prompt
    if tags and isinstance(clean_prompt, str):
        clean_prompt = clean_prompt.strip()
    if negative_tags:
        raise BadRequest("<lora:...> tags belong in the prompt, not the negative prompt")
    lora_list = []
    for name, weight in [*loras, *tags]:
        if not isinstance(name, str):
            raise BadRequest(f"a LoRA is named by a string, got {name!r}")
        # a weight is a number, or (A1111's <lora:NAME:TE:UNET>) separate text-encoder and U-Net multipliers:
        # a LoRAWeight from a tag, a (te, unet) pair from the native API's unet_weight
        te, unet = (weight.te, weight.unet) if isinstance(weight, LoRAWeight) else (weight, weight)
        if isinstance(weight, tuple) and len(weight) == 2:
            te, unet = weight
        te = _finite(te, f"LoRA {name} weight", -10.0, 10.0)
        unet = _finite(unet, f"LoRA {name} U-Net weight", -10.0, 10.0)
        lora_list.append((str(catalog.resolve_lora(name)), lora_weight(te, unet)))
    if len(lora_list) > MAX_LORAS:
        raise BadRequest(f"at most {MAX_LORAS} LoRAs per request, got {len(lora_list)}")

    def image(ref: ImageRef | None, what: str) -> Image.Image | None:
        if ref is None:
            return None
        if isinstance(ref, Image.Image):
            return ref
        # Turned upright by its EXIF orientation, as a browser shows it (and the page's mask is painted on it)
        # and as A1111's fix_image does: a phone's JPEG was once used on its side, squashed into the size.
        return ImageOps.exif_transpose(uploads.image(ref, what))

    init = image(init_image, "init_image")
    from sdengine.pipeline.request import MAX_REFERENCE_IMAGES

    if reference_images and len(reference_images) > MAX_REFERENCE_IMAGES:
        raise BadRequest(f"at most {MAX_REFERENCE_IMAGES} reference_images, got {len(reference_images)}")
    if not reference_auto_resize and not reference_images:
        raise BadRequest("reference_auto_resize applies to reference_images: give them, or leave it out")
    references = [image(ref, f"reference_images[{k}]") for k, ref in enumerate(reference_images or ())]
    mask_img = image(mask, "mask")
    control_img = image(control_image, "control_image")  # FLUX.1 Depth / Canny's map (the pipeline checks the model)
    if mask_img is not None and init is None:
        raise BadRequest("a mask needs an init image to inpaint")
    if init is not None and strength <= 0 and strength_rule == "diffusers":  # A1111's rule runs one step at 0
        raise BadRequest("strength must be > 0 for img2img")

    from sdengine.pipeline.control import ControlUnit  # torch: imported when a request is built, not with the routes

    units = []
    if len(controlnets) > MAX_CONTROLNETS:
        raise BadRequest(f"at most {MAX_CONTROLNETS} ControlNet units per request, got {len(controlnets)}")
    for k, unit in enumerate(controlnets):
        if unit.model in REFERENCE_MODULES:  # no model: the reference image as it is (sdengine.nn.reference)
            if unit.preprocessor not in ("none", "") or set(unit.options) - {"style_fidelity"}:
                raise BadRequest(f"ControlNet unit {k}: {unit.model} takes the image as it is (no preprocessor)")
            if unit.mask is not None:
                raise BadRequest(
                    f"ControlNet unit {k}: a mask is an SD3 inpainting ControlNet's; {unit.model} takes none"
                )
            if unit.union_mode is not None or getattr(unit, "inpaint_image", None) is not None:
                raise BadRequest(
                    f"ControlNet unit {k}: union_mode / inpaint_image are Flux / Z-Image ControlNets'; "
                    f"{unit.model} takes none"
                )
            picture = image(unit.image, f"ControlNet unit {k} image")
            assert picture is not None
            start = _finite(unit.start, f"ControlNet unit {k} start", 0.0, 1.0)
            end = _finite(unit.end, f"ControlNet unit {k} end", 0.0, 1.0)
            if start >= end:
                raise BadRequest(f"ControlNet unit {k}: start ({start:g}) must be less than end ({end:g})")
            weight = _finite(unit.weight, f"ControlNet unit {k} weight", 0.0, 2.0)
            fidelity = unit.options.get("style_fidelity")
            if fidelity is not None:
                fidelity = _finite(fidelity, f"ControlNet unit {k} style fidelity", 0.0, 1.0)
            units.append(
                ControlUnit(
                    unit.model,
                    ImageOps.exif_transpose(picture).convert("RGB"),
                    weight,
                    start,
                    end,
                    unit.rule,
                    mode=unit.mode,
                    style_fidelity=fidelity,
                )
            )
            continue
        if "style_fidelity" in unit.options:
            raise BadRequest(
                f"ControlNet unit {k}: style_fidelity is a reference unit's ({', '.join(REFERENCE_MODULES)})"
            )
        path = catalog.resolve_controlnet(unit.model)
        control = image(unit.image, f"ControlNet unit {k} image")
        assert control is not None
        control = run_preprocessor(unit.preprocessor, ImageOps.exif_transpose(control).convert("RGB"), unit.options, k)
        start = _finite(unit.start, f"ControlNet unit {k} start", 0.0, 1.0)
        end = _finite(unit.end, f"ControlNet unit {k} end", 0.0, 1.0)
        if start >= end:  # the pipeline refuses it when the job runs: refused before anything is queued
            raise BadRequest(f"ControlNet unit {k}: start ({start:g}) must be less than end ({end:g})")
        weight = _finite(unit.weight, f"ControlNet unit {k} weight", 0.0, 2.0)
        unit_mask = image(unit.mask, f"ControlNet unit {k} mask")
        picture_ref = getattr(unit, "inpaint_image", None)  # Z-Image's inpainting ControlNets (with the mask)
        inpaint_image = image(picture_ref, f"ControlNet unit {k} inpaint_image") if picture_ref is not None else None
        if inpaint_image is not None and unit_mask is None:
            raise BadRequest(f"ControlNet unit {k}: inpaint_image (Z-Image's inpainting ControlNets) needs its mask")
        units.append(
            ControlUnit(
                str(path),
                control,
                weight,
                start,
                end,
                unit.rule,
                module=unit.preprocessor,
                module_options=preprocessor_options(unit.preprocessor, unit.options),
                processor_res=unit.processor_res,
                mode=unit.mode,
                hires_mode=unit.hires_mode,
                mask=unit_mask,
                union_mode=unit.union_mode,
                inpaint_image=(
                    ImageOps.exif_transpose(inpaint_image).convert("RGB") if inpaint_image is not None else None
                ),
            )
        )

    from sdengine.server.ip_adapters import IPAdapterRequest, build_units, parse_units

    ip_requests = ip_adapters
    if not (isinstance(ip_adapters, list | tuple) and all(isinstance(u, IPAdapterRequest) for u in ip_adapters)):
        ip_requests = parse_units(ip_adapters)  # the native job's objects (OpenAI's extra_body, a form's JSON)
    ip_units = build_units(catalog, ip_requests, image)
    from sdengine.server import redux as redux_units

    redux_list = redux_units.build_units(catalog, redux, image)

    chosen = model if model else (default_model or config.model)
    ref = catalog.resolve_model(chosen)
    from sdengine.server.dit_parts import fill

    ref = fill(catalog, ref, modules)  # an SD3 / Flux file's text encoders and VAE from the folders (Forge's rule)
    kwargs: dict[str, Any] = {
        "prompt": clean_prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "sampler": sampler,
        "schedule": schedule,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "width": width,
        "height": height,
        "batch_size": batch_size,
        "init_image": init,
        "strength": strength,
        "mask": mask_img,
        "mask_blur": mask_blur,
        "controlnets": units or None,
        "loras": lora_list or None,
        "clip_skip": clip_skip,
    }
    if guess_mode:
        kwargs["guess_mode"] = True
    if references:  # FLUX.1 Kontext (whether the model takes them: the precheck, app.check_family_settings)
        kwargs["reference_images"] = references
        if not reference_auto_resize:
            kwargs["reference_auto_resize"] = False
    if control_img is not None:  # left out without one (a job with one runs alone: batch_key knows no control_image)
        kwargs["control_image"] = control_img
    if control_preprocessor != "none":  # checked by GenerationRequest.validate below (a depth estimator refused)
        kwargs["control_preprocessor"] = control_preprocessor
    if ip_units:  # left out without units (such a job runs alone: batch_key knows no ip_adapters)
        kwargs["ip_adapters"] = ip_units
    if redux_list:  # FLUX.1 Redux (such a job runs alone: batch_key knows no redux)
        kwargs["redux"] = redux_list
    if vae_decode != "full":  # checked by GenerationRequest.validate below; whether the model has one, by the job
        kwargs["vae_decode"] = vae_decode
    if vae_encode != "full":
        kwargs["vae_encode"] = vae_encode
    if sampler_options:  # the sampler's keyword options (eta); checked against the sampler by the pipeline
        kwargs["sampler_options"] = {
            # UniPC's variant (a name) and order (an integer) as they are (A1111's uni_pc_* options)
            k: v
            if k in SAMPLER_OPTION_KINDS and isinstance(v, SAMPLER_OPTION_KINDS[k]) and not isinstance(v, bool)
            else _finite(v, k, *OPTION_LIMITS.get(k, (0.0, 10.0)))
            for k, v in sampler_options.items()
        }
    if subseed_strength:  # left out at 0 (the seed's image), so that such jobs batch as before
        kwargs.update(subseed=subseed, subseed_strength=subseed_strength)
        if same_seed:
            kwargs["seed"] = [seed] * batch_size
    if not isinstance(tiling, bool):
        raise BadRequest(f"tiling must be true or false, got {tiling!r}")
    if tiling:  # A1111's "Tiling" (left out when off, as above)
        kwargs["tiling"] = True
    if seed_resize_from is not None:  # A1111's "Resize seed from width/height" (pixels)
        from sdengine.pipeline.request import MAX_SEED_RESIZE

        w = _integer(seed_resize_from[0], "seed_resize_from_w", 1, MAX_SEED_RESIZE)
        h = _integer(seed_resize_from[1], "seed_resize_from_h", 1, MAX_SEED_RESIZE)
        kwargs.update(seed_resize_from_w=w, seed_resize_from_h=h)
    if masked_content != "original":  # A1111's latent noise / nothing (checked by GenerationRequest.validate)
        kwargs["masked_content"] = masked_content
    if differential_diffusion:  # soft inpainting (left out when off; checked by GenerationRequest.validate)
        kwargs["differential_diffusion"] = _finite(differential_diffusion, "differential_diffusion", 0.0, 1.0)
    if soft_inpainting not in (None, False):  # A1111's soft inpainting (checked by GenerationRequest.validate)
        kwargs["soft_inpainting"] = dict(soft_inpainting) if isinstance(soft_inpainting, dict) else soft_inpainting
    if mask_round is not True:  # A1111's mask_round off (left out when on; checked by GenerationRequest.validate)
        kwargs["mask_round"] = mask_round
    if latent_mask is not None:  # A1111's separate latent mask (checked by GenerationRequest.validate)
        kwargs["latent_mask"] = image(latent_mask, "latent_mask")
    if noise_seed_delta != 0:  # A1111's ENSD (left out at 0, so such jobs batch as before)
        kwargs["noise_seed_delta"] = noise_seed_delta  # checked by GenerationRequest.validate below
    if noise_source != "cpu":  # A1111's randn_source NV / GPU (left out at the default, so such jobs batch as before)
        kwargs["noise_source"] = noise_source  # checked by GenerationRequest.validate below
    if discard_penultimate_sigma:  # A1111's always_discard_next_to_last_sigma (left out when off, as above)
        kwargs["discard_penultimate_sigma"] = discard_penultimate_sigma  # checked by GenerationRequest.validate
    if zero_terminal_snr:  # A1111's sd_noise_schedule Zero Terminal SNR (left out when off, as above)
        kwargs["zero_terminal_snr"] = zero_terminal_snr  # checked by GenerationRequest.validate below
    if image_cfg_scale is not None:  # instruct-pix2pix's image guidance (checked by GenerationRequest.validate)
        kwargs["image_cfg_scale"] = image_cfg_scale
    if distilled_cfg_scale is not None:  # FLUX.1 [dev]'s (Forge's "Distilled CFG Scale"); None: the model's 3.5
        from sdengine.pipeline.flux import MAX_DISTILLED_CFG

        kwargs["distilled_cfg_scale"] = _finite(distilled_cfg_scale, "distilled_cfg_scale", 0.0, MAX_DISTILLED_CFG)
    if shift is not None:  # SD3's time shift (checked by GenerationRequest.validate below); None: the model's
        kwargs["shift"] = shift
    if sd3 is not None:  # SD3's skip-layer guidance: its keys and ranges (the blocks against the model: precheck)
        from sdengine.errors import GenerationError
        from sdengine.pipeline.sd3 import SD3Options

        try:
            SD3Options.coerce(sd3)
        except GenerationError as e:
            raise BadRequest(str(e)) from None
        kwargs["sd3"] = dict(sd3)
    if noise_multiplier != 1:  # A1111's img2img "Noise multiplier" (left out at 1, so such jobs batch as before)
        kwargs["noise_multiplier"] = noise_multiplier  # checked by GenerationRequest.validate below
    if strength_rule != "diffusers":  # checked by GenerationRequest.validate below
        kwargs["strength_rule"] = strength_rule
    if clip_skip_rule != "sdengine":  # checked by GenerationRequest.validate below
        kwargs["clip_skip_rule"] = clip_skip_rule
    if resize_mode not in (0, "just resize"):
        kwargs["resize_mode"] = resize_mode  # checked by GenerationRequest.validate below
    if sag_scale:  # left out at 0 (no SAG), so that such jobs batch as before
        kwargs.update(sag_scale=sag_scale, sag_blur_sigma=sag_blur_sigma)
        if sag_rule != "diffusers":
            kwargs["sag_rule"] = sag_rule
    if pag_scale:  # left out at 0 (no PAG: the layers do nothing), so that such jobs batch as before
        kwargs.update(pag_scale=pag_scale, pag_layers=pag_layer_text)  # a tuple: batch_key compares it
    if hypertile is not None:  # left out when off, so that such jobs batch as before
        kwargs.update(hypertile=tuple(hypertile), hypertile_hires_only=hypertile_hires_only)
        if hypertile_rule != "a1111" or hypertile_scale_depth is not True:
            kwargs.update(hypertile_rule=hypertile_rule, hypertile_scale_depth=hypertile_scale_depth)
    if hypertile_vae is not None:  # left out when off (batch_key: a job with it runs alone, its draws its own)
        kwargs["hypertile_vae"] = tuple(hypertile_vae)
    if freeu_settings is not None:  # left out when off, so that such jobs batch as before
        kwargs.update(zip(("freeu", "freeu_version", "freeu_rule"), freeu_settings, strict=True))
    if deep_shrink is not None:  # checked by GenerationRequest.validate below
        kwargs["deep_shrink"] = deep_shrink
    if tiled_diffusion is not None:  # checked by GenerationRequest.validate below (a job with it runs alone)
        kwargs["tiled_diffusion"] = dict(tiled_diffusion)
    if init_latent_resize:  # A1111's img2img resize mode 3 (left out when off, so such jobs batch as before)
        kwargs["init_latent_resize"] = init_latent_resize  # checked by GenerationRequest.validate below
    if hires is not None:
        kwargs.update(_hires_fields(config, hires, width, height), enable_hr=True)
        if config.upscalers_dir is not None:  # hr_upscaler may name one of its models
            kwargs["upscalers_dir"] = str(config.upscalers_dir)
    if sdxl:  # SDXL's second prompts, micro-conditioning and aesthetic scores (SDXL models only: said by the job)
        from sdengine.errors import GenerationError
        from sdengine.text.sdxl_conditioner import SDXLOptions

        try:
            SDXLOptions.coerce(sdxl)
        except GenerationError as e:
            raise BadRequest(str(e)) from None
        kwargs["sdxl"] = dict(sdxl)
    # The pipeline's own request object checks what it can without the model (GenerationError -> 400), so
    # that such a mistake is answered now instead of failing the job later.
    from sdengine.pipeline import GenerationRequest

    GenerationRequest(**kwargs).validate()
    generation = Generation(model=ref, model_name=catalog.model_name_of(ref), kwargs=kwargs, n_iter=n_iter)
    if vae_choice is not None:
        set_job_vae(generation, catalog, vae_choice, config.vae)
    return generation


HIRES_KEYS = (
    "hr_scale",
    "hr_resize_x",
    "hr_resize_y",
    "hr_upscaler",
    "hr_second_pass_steps",
    "hr_sampler",
    "hr_schedule",
    "hr_prompt",
    "hr_negative_prompt",
)


def _hires_fields(config: ServerConfig, hires: dict[str, Any], width: int | None, height: int | None) -> dict[str, Any]:
    """The hires-fix settings (GenerationRequest's names) within the server's limits: the second pass's size
    and steps count against max_side and max_steps like the first's."""
    unknown = sorted(set(hires) - set(HIRES_KEYS))
    if unknown:
        raise BadRequest(f"unknown hires settings: {', '.join(unknown)}")
    out = dict(hires)
    if "hr_scale" in out:
        out["hr_scale"] = _finite(out["hr_scale"], "hr_scale", 0.0, 16.0)
    if not out.get("hr_resize_x") and not out.get("hr_resize_y"):  # the scale decides the size
        for what, v in (("width", width), ("height", height)):
            big = int(v * out.get("hr_scale", 2.0)) if v is not None else 0
            if big > config.max_side:
                raise BadRequest(f"hires {what} {big} is over the limit of {config.max_side}")
    for what in ("hr_resize_x", "hr_resize_y"):
        if what in out:
            out[what] = _integer(out[what], what, 0, config.max_side)
    if "hr_second_pass_steps" in out:
        out["hr_second_pass_steps"] = _integer(out["hr_second_pass_steps"], "hr_second_pass_steps", 0, config.max_steps)
    for what in ("hr_upscaler", "hr_sampler", "hr_schedule", "hr_prompt", "hr_negative_prompt"):
        if what in out and out[what] is not None and not isinstance(out[what], str):
            raise BadRequest(f"{what} must be a string")
    return out


def preprocessor_options(kind: str, options: dict[str, float]) -> dict[str, float]:
    """The options preprocessor ``kind`` ran with (its defaults, and the ones it takes of ``options``), for the
    infotext; {} for an unknown kind (refused by :func:`run_preprocessor`)."""
    from sdengine.control import PREPROCESSORS
    from sdengine.control.preprocess import option_defaults

    if kind not in PREPROCESSORS:
        return {}
    defaults = option_defaults(kind)
    return {**defaults, **{n: float(v) for n, v in options.items() if n in defaults}}


def run_preprocessor(kind: str, img: Image.Image, options: dict[str, float], k: int) -> Image.Image:
    """ControlNet unit ``k``'s preprocessor ``kind`` on ``img`` with the options it takes; a BadRequest naming the
    unit for an unknown preprocessor or a bad option."""
    from sdengine.control import PREPROCESSORS, ControlNetError, preprocess

    kind = (kind or "none").strip().lower()
    if kind not in PREPROCESSORS:
        raise BadRequest(f"ControlNet unit {k}: unknown preprocessor {kind!r}; available: {', '.join(PREPROCESSORS)}")
    import inspect

    accepted = set(list(inspect.signature(PREPROCESSORS[kind]).parameters)[1:])
    try:
        return preprocess(kind, img, **{n: float(v) for n, v in options.items() if n in accepted})
    except (ControlNetError, ValueError) as e:
        raise BadRequest(f"ControlNet unit {k}: {e}") from None
