"""AUTOMATIC1111's built-in "Soft Inpainting" (its ``extensions-builtin/soft-inpainting``, since 1.8): inpainting
with a grey mask, in two parts.

* **While sampling** (:class:`SoftInpaintBlend`, A1111's ``on_mask_blend`` hook in ``CFGDenoiser.apply_blend``):
  each model call's x0 prediction ``b`` is blended with the init latent ``a`` by the *modified* mask
  ``t = nmask ** (sigma ** schedule_bias * preservation_strength)`` (:func:`modified_mask`; ``nmask``: A1111's
  latent mask, 1 = repaint, left grey: the script turns A1111's ``mask_round`` off), and the blended vectors'
  lengths (over the channels) are set to ``((1 - t) |a| ** p + t |b| ** p) ** (1 / p)``, ``p`` the transition
  contrast boost (:func:`latent_blend`). A1111's timestep samplers (DDIM, PLMS, UniPC) blend the network's noisy
  input (VP scaling) instead, before the call, and hand the call's *timestep* over as ``sigma`` (see
  :class:`SoftInpaintBlend`). The final hard blend of the sampled latent with the init latent is skipped
  (``is_final_blend``).
* **After sampling** (:func:`composite_mask`, A1111's ``post_sample`` / ``apply_adaptive_masks``): the pixel
  mask that lays the generated image over the original comes from how far each latent pixel moved from the init
  latent (the channel norm, through two weighted-percentile filters), divided by ``difference_threshold`` times
  a scale of the latent mask (``mask_influence``), turned into an opacity by ``1 / (1 + x ** difference_contrast)``
  and smootherstep, made 8-bit, resized to the image and blurred (PIL Gaussian, radius 4). 255 = the generated
  pixel, 0 = the original's.

A1111's settings, their order in ``alwayson_scripts`` args (after ``enabled``), their defaults and ranges (its
sliders') are :data:`FIELDS`; its infotext keys are :data:`sdengine.metadata.SOFT_INPAINTING_KEYS` (read back by
:func:`sdengine.metadata.soft_inpainting_kwargs`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from sdengine.diffusion.samplers import SamplerStep
from sdengine.errors import GenerationError
from sdengine.io.resize import resize_image
from sdengine.metadata import SOFT_INPAINTING_ENABLED, SOFT_INPAINTING_KEYS
from sdengine.pipeline.latents import LatentBlend

# (name, A1111's label, default, low, high) in A1111's argument order (after ``enabled``)
FIELDS: tuple[tuple[str, str, float, float, float], ...] = (
    ("schedule_bias", "Schedule bias", 1.0, 0.0, 8.0),  # its mask_blend_power
    ("preservation_strength", "Preservation strength", 0.5, 0.0, 8.0),  # mask_blend_scale
    ("transition_contrast_boost", "Transition contrast boost", 4.0, 1.0, 32.0),  # inpaint_detail_preservation
    ("mask_influence", "Mask influence", 0.0, 0.0, 1.0),  # composite_mask_influence
    ("difference_threshold", "Difference threshold", 0.5, 0.0, 8.0),  # composite_difference_threshold
    ("difference_contrast", "Difference contrast", 2.0, 0.0, 8.0),  # composite_difference_contrast
)
# A1111's difference-mask filters: a 5x5 Gaussian kernel (stddev 1.5 px, tapered to 0 one pixel past radius 2)
KERNEL_STDDEV, KERNEL_RADIUS = 1.5, 2
COMPOSITE_BLUR = 4  # PIL GaussianBlur radius of the resized composite mask


@dataclass(frozen=True)
class SoftInpainting:
    """A1111's soft inpainting settings (its defaults). ``schedule_bias`` (its mask_blend_power): how the latent
    blend's strength follows sigma; ``preservation_strength`` (mask_blend_scale): how much the partly masked
    latents keep the original; ``transition_contrast_boost`` (inpaint_detail_preservation): the power of the
    length interpolation; ``mask_influence``, ``difference_threshold``, ``difference_contrast``: the pixel
    composite's (see the module docstring)."""

    schedule_bias: float = 1.0
    preservation_strength: float = 0.5
    transition_contrast_boost: float = 4.0
    mask_influence: float = 0.0
    difference_threshold: float = 0.5
    difference_contrast: float = 2.0
    # whether the pipeline lays its images over the init image (A1111's overlay); False: the images as generated,
    # the masks in ``GenerationResult.composite_masks`` (for a caller that lays them over another picture, as the
    # A1111 route does after its "fill" and in "Only masked" inpainting). Not one of A1111's settings
    composite: bool = True

    @classmethod
    def of(cls, value: Any) -> Self | None:
        """The settings of a request's ``soft_inpainting``: None / False (off), True (A1111's defaults), a mapping
        of the field names (the others at their defaults) or a :class:`SoftInpainting`; checked (one line)."""
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if isinstance(value, cls):
            value.check()
            return value
        if not isinstance(value, Mapping):
            raise GenerationError(
                "soft_inpainting must be true, a SoftInpainting or a mapping of "
                f"{', '.join(n for n, *_ in FIELDS)}; got {type(value).__name__}"
            )
        names = {n for n, *_ in FIELDS} | {"composite"}
        unknown = [str(k) for k in value if k not in names]
        if unknown:
            raise GenerationError(f"soft_inpainting: unknown setting {unknown[0]!r}; use: {', '.join(sorted(names))}")
        out = cls(**{k: value[k] for k in value})
        out.check()
        return out

    def check(self) -> None:
        """Each setting a number in A1111's slider range (one-line GenerationError naming it)."""
        if not isinstance(self.composite, bool):
            raise GenerationError(f"soft_inpainting composite must be true or false, got {self.composite!r}")
        for name, _, _, low, high in FIELDS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not low <= v <= high:
                raise GenerationError(f"soft_inpainting {name} must be a number in [{low:g}, {high:g}], got {v!r}")

    def values(self) -> tuple[float, ...]:
        """The six settings in A1111's argument order."""
        return tuple(float(getattr(self, name)) for name, *_ in FIELDS)

    def infotext(self) -> dict[str, Any]:
        """A1111's infotext fields of these settings ("Soft inpainting enabled: True" and the six)."""
        out: dict[str, Any] = {SOFT_INPAINTING_ENABLED: True}
        for (name, *_), v in zip(FIELDS, self.values(), strict=True):
            out[SOFT_INPAINTING_KEYS[name]] = int(v) if float(v).is_integer() else v
        return out


def modified_mask(nmask: Tensor, sigma: Tensor | float, settings: SoftInpainting) -> Tensor:
    """A1111's ``get_modified_nmask``: ``nmask ** (sigma ** schedule_bias * preservation_strength)`` (1 = the
    denoised latent, 0 = the init latent; a 0 exponent makes every pixel 1, as there)."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0]
    return torch.pow(nmask, (s**settings.schedule_bias) * settings.preservation_strength)


def latent_blend(a: Tensor, b: Tensor, t: Tensor, detail: float) -> Tensor:
    """A1111's ``latent_blend``: ``a (1 - t) + b t`` with each latent pixel's vector (over dim 1) rescaled to
    ``((1 - t) |a| ** detail + t |b| ** detail) ** (1 / detail)`` (lengths in float64; ``t`` (B|1, C|1, h, w),
    its first channel weighting the lengths)."""
    t3 = t[:, :1]
    mixed = a * (1 - t) + b * t
    current = torch.linalg.vector_norm(mixed, dim=1, keepdim=True).double() + 0.00001
    la = torch.linalg.vector_norm(a, dim=1, keepdim=True).double().pow(detail) * (1 - t3).double()
    lb = torch.linalg.vector_norm(b, dim=1, keepdim=True).double().pow(detail) * t3.double()
    desired = (la + lb).pow(1.0 / detail)
    return mixed * (desired / current).to(mixed.dtype)


def gaussian_kernel(stddev: float = KERNEL_STDDEV, radius: int = KERNEL_RADIUS) -> np.ndarray:
    """A1111's ``get_gaussian_kernel``: ``exp(-d^2 / stddev^2)`` on a (2 radius + 1)^2 grid, shifted and scaled so
    that it is 1 at the centre and 0 at distance ``radius + 1`` (negative values cut to 0)."""
    zero = math.exp(-((radius + 1.0) ** 2) / (stddev * stddev))
    ys, xs = np.mgrid[-radius : radius + 1, -radius : radius + 1].astype(np.float64)
    g = np.exp(-(ys**2 + xs**2) / (stddev * stddev))
    return np.maximum((g - zero) / (1.0 - zero), 0.0)


def weighted_percentile_filter(
    img: np.ndarray, kernel: np.ndarray, low: float, high: float, min_width: float = 1.0
) -> np.ndarray:
    """A1111's ``weighted_histogram_filter``: at each pixel, the neighbours under the (centred) kernel inside the
    image, sorted by value and stacked by their kernel weights; the mean of the values over the stack's
    ``[low, high]`` fraction (widened about its centre to at least ``min_width``, kept inside the stack), each
    value weighted by its overlap with that window. (H, W) float32 in and out; whole-array, not per pixel."""
    h, w = img.shape
    r = kernel.shape[0] // 2
    vals, wts = [], []
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            v = np.zeros((h, w), np.float64)
            k = np.zeros((h, w), np.float64)
            ys, xs = slice(max(0, -dy), min(h, h - dy)), slice(max(0, -dx), min(w, w - dx))
            src = img[max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)]
            v[ys, xs] = src
            k[ys, xs] = kernel[dy + r, dx + r]
            vals.append(v)
            wts.append(k)
    v, k = np.stack(vals, -1), np.stack(wts, -1)
    key = np.where(k > 0, v, np.inf)  # outside the image: no weight, sorted last
    order = np.argsort(key, axis=-1, kind="stable")
    v, k = np.take_along_axis(v, order, -1), np.take_along_axis(k, order, -1)
    top = np.cumsum(k, -1)
    bottom = top - k
    total = top[..., -1]
    lo, hi = total * low, total * high
    narrow = hi - lo < min_width
    centre = (lo + hi) / 2
    lo = np.where(narrow, centre - min_width / 2, lo)
    hi = np.where(narrow, centre + min_width / 2, hi)
    over = narrow & (hi > total)
    hi, lo = np.where(over, total, hi), np.where(over, total - min_width, lo)
    under = narrow & (lo < 0)
    lo, hi = np.where(under, 0.0, lo), np.where(under, min_width, hi)
    part = np.clip(np.minimum(hi[..., None], top) - np.maximum(lo[..., None], bottom), 0.0, None)
    weight = part.sum(-1)
    value = (v * part).sum(-1)
    return np.where(weight != 0, value / np.where(weight != 0, weight, 1.0), 0.0).astype(img.dtype)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """``x^3 (x (6 x - 15) + 10)``."""
    return x * x * x * (x * (6 * x - 15) + 10)


def difference_opacity(
    latent_orig: Tensor, latent_processed: Tensor, nmask: Tensor, settings: SoftInpainting
) -> np.ndarray:
    """The composite mask of each row at the latent's size, float32 (B, h, w) in [0, 1] before A1111 makes it
    8-bit: 1 where the generated pixel is laid over the original. A1111's ``apply_adaptive_masks`` up to its
    ``255. * converted_mask`` (a distance of 0 over a threshold of 0 is taken as far over it: 1)."""
    lm = nmask[:, 0].float()
    scalar = 1 - torch.clamp(lm, min=0, max=1) ** (settings.preservation_strength / 2)
    scalar = 0.5 * (1 - settings.mask_influence) + scalar * settings.mask_influence
    scalars = (scalar / (1.00001 - scalar)).cpu().numpy()
    distance = torch.linalg.vector_norm((latent_processed - latent_orig).float(), dim=1).cpu().numpy()
    kernel = gaussian_kernel()
    out = []
    for i, d in enumerate(distance):
        d = weighted_percentile_filter(d.astype(np.float32), kernel, 0.9, 1.0)
        d = weighted_percentile_filter(d, kernel, 0.25, 0.75)
        half = settings.difference_threshold * scalars[i if scalars.shape[0] > i else 0]
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            x = d / half
            x = np.where(np.isnan(x), np.float32(np.inf), x)
            x = 1 / (1 + x**settings.difference_contrast)
        out.append(1 - smootherstep(x))
    return np.stack(out).astype(np.float32)


def composite_mask(
    latent_orig: Tensor, latent_processed: Tensor, nmask: Tensor, settings: SoftInpainting, width: int, height: int
) -> list[Image.Image]:
    """A1111's composite mask of each row as an 8-bit ("L") image of ``width`` x ``height``: the opacity
    (:func:`difference_opacity`) times 255 cut to an integer, resized to the image (Lanczos, "resize and fill"),
    blurred (PIL Gaussian, radius 4). 255 = the generated pixel."""
    out = []
    for o in difference_opacity(latent_orig, latent_processed, nmask, settings):
        m8 = Image.fromarray((255.0 * o).astype(np.uint8), "L")
        m8 = resize_image(m8, width, height, "resize and fill")
        out.append(m8.filter(ImageFilter.GaussianBlur(radius=COMPOSITE_BLUR)))
    return out


def composite(generated: np.ndarray, original: np.ndarray, mask: Image.Image) -> np.ndarray:
    """The generated image laid over the original by a composite mask: ``original (1 - m) + generated m``,
    ``m`` = mask / 255, float (H, W, 3) in [0, 1] (A1111 does it in PIL's 8-bit alpha composite: at most one
    level apart); the original's pixels exactly where the mask is 0."""
    m = np.asarray(mask, dtype=np.float32)[..., None] / 255.0
    return original * (1.0 - m) + generated * m


class SoftInpaintBlend(LatentBlend):
    """A1111's soft inpainting while sampling (its ``CFGDenoiser.apply_blend`` with the script's ``on_mask_blend``),
    the grey latent mask ``mask`` (1 = repaint) made :func:`modified_mask` at the call's "sigma" (the first row's,
    as A1111 reads ``sigma[0]``) and :func:`latent_blend` of the init latent and a latent by it:

    * ``before=False`` (its k-diffusion samplers): each call's x0 is blended, at the call's sigma;
    * ``before=True`` (its timestep samplers DDIM, PLMS, UniPC: ``mask_before_denoising``): the network reads the
      blend of the init latent and the sampler's x in VP scaling (``x / sqrt(1 + sigma^2)``, the latent A1111's
      timestep samplers carry), and the "sigma" A1111 hands the script there is the call's *timestep* (what its
      timestep samplers call the model with: ``timesteps[index]``, UniPC's ``(t - 1/N) * 1000``), not the noise
      level, so the schedule-bias exponent is ``timestep ** schedule_bias * preservation_strength`` (in the
      hundreds early in a run: the partly masked latents are then the init latent's almost wholly). The timestep is
      the one the network is handed (the grid's pinned timesteps, :meth:`with_timesteps`; else the schedule's
      log-sigma inverse). As A1111's sampler keeps its own x, the returned x0 is the one whose noise the sampler
      finds for its own x (``x0(blended) + (x - blended)``).

    :meth:`finish` keeps the sampled latent as it is (A1111's final blend is skipped)."""

    def __init__(
        self, inner: Any, init: Tensor, mask: Tensor, settings: SoftInpainting, *, before: bool = False
    ) -> None:
        super().__init__(inner, init, mask)
        self.settings = settings
        self.before = before
        self._pinned: tuple[list[float], list[float]] | None = None

    def blend(self, x0: Tensor, sigma: Tensor | float) -> Tensor:
        t = modified_mask(self.mask, sigma, self.settings).to(x0.dtype)
        return latent_blend(self.init.to(x0.dtype), x0, t, float(self.settings.transition_contrast_boost))

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> Self:
        out = super().with_timesteps(sigmas, timesteps)
        out._pinned = ([float(v) for v in sigmas.detach().cpu()], [float(v) for v in timesteps.detach().cpu()])
        return out

    def timestep(self, sigma: float) -> float:
        """The network's timestep at ``sigma``: the grid's pinned one (relative 1e-6), else the log-sigma inverse."""
        if self._pinned is not None:
            for s, t in zip(*self._pinned, strict=True):
                if abs(s - sigma) <= 1e-6 * abs(s):
                    return t
        return float(self.schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))

    def __call__(self, x: Tensor, sigma: Tensor | float, *, step: SamplerStep, **cond: Any) -> Tensor:
        parts = cond.get("guidance_parts")  # the unconditional x0 (CFG++) is blended as the guided one
        if not self.before:
            out = self.blend(self.denoise(x, sigma, step, cond), sigma)
            if parts is not None and parts.uncond is not None:
                parts.uncond = self.blend(parts.uncond, sigma)
            return out
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        scale = math.sqrt(1.0 + s * s)  # VE = VP * scale
        blended = self.blend(x / scale, self.timestep(s)) * scale
        out = self.denoise(blended, sigma, step, cond) + (x - blended)
        if parts is not None and parts.uncond is not None:
            parts.uncond = parts.uncond + (x - blended)
        return out

    def finish(self, x: Tensor) -> Tensor:
        return x


__all__ = [
    "FIELDS",
    "SoftInpaintBlend",
    "SoftInpainting",
    "composite",
    "composite_mask",
    "difference_opacity",
    "gaussian_kernel",
    "latent_blend",
    "modified_mask",
    "smootherstep",
    "weighted_percentile_filter",
]
