"""Self-attention guidance's degraded input (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using
Self-Attention Guidance", section 4.2 and eq. 16).

The model's clean-image estimate ``x0`` is blurred where the middle block's self-attention looks most (a Gaussian
blur of a 9 x 9 kernel, reflected at the edges, kept only on the positions whose attention mass is above 1, the
average; nearest-neighbour upsampled from the map to the latent), then noised back to the step's noise level with the
same noise the model's estimate implies: ``x_degraded = x - x0 + blurred``. The guidance itself (one more pass of the
network on ``x_degraded``, and its term) is :class:`sdengine.diffusion.guidance.CFGDenoiser`'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.errors import UsageError

SAG_KERNEL = 9  # the blur's kernel side (the authors', diffusers' and ComfyUI's)
SAG_THRESHOLD = 1.0  # attention mass above this is "attended" (everywhere the same: the average)
MAX_SAG_BLUR_SIGMA = 10.0  # ComfyUI's node stops at 10


def check_blur_sigma(sigma: float) -> float:
    """``sigma`` as a float in (0, MAX_SAG_BLUR_SIGMA]; anything else a one-line error (a zero sigma would divide by
    zero in the kernel: ComfyUI's node gives NaN there)."""
    if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma):
        raise UsageError(f"SAG blur sigma must be a finite number, got {sigma!r}")
    if not 0.0 < sigma <= MAX_SAG_BLUR_SIGMA:
        raise UsageError(f"SAG blur sigma must be in (0, {MAX_SAG_BLUR_SIGMA:g}], got {sigma!r}")
    return float(sigma)


def gaussian_blur(x: Tensor, sigma: float, kernel: int = SAG_KERNEL) -> Tensor:
    """Each channel of ``x`` (B, C, H, W) convolved with the normalised ``kernel`` x ``kernel`` Gaussian of standard
    deviation ``sigma`` (taps at integer offsets from the centre), the border reflected; H and W must exceed
    ``kernel // 2``."""
    r = kernel // 2
    offsets = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    taps = (taps / taps.sum()).to(device=x.device, dtype=x.dtype)
    c = x.shape[1]
    weight = (taps[:, None] * taps[None, :]).expand(c, 1, kernel, kernel)  # (C, 1, k, k)
    return F.conv2d(F.pad(x, (r, r, r, r), mode="reflect"), weight, groups=c)


def attention_mask(mass: Tensor, size: tuple[int, int], latent_hw: tuple[int, int]) -> Tensor:
    """(B, 1, h, w) of 0/1: where the attention mass (B, H*W) of the map of ``size`` (H, W) is above
    :data:`SAG_THRESHOLD`, nearest-neighbour resized to the latent's ``latent_hw``."""
    b = mass.shape[0]
    m = (mass > SAG_THRESHOLD).to(torch.float32).reshape(b, 1, *size)
    return F.interpolate(m, size=latent_hw, mode="nearest")


def degraded_x0(x0: Tensor, mask: Tensor, sigma: float) -> Tensor:
    """``x0`` blurred (:func:`gaussian_blur`) where ``mask`` is 1, as it is where 0."""
    mask = mask.to(x0.dtype)
    return gaussian_blur(x0, sigma) * mask + x0 * (1 - mask)


def fits_blur(h: int, w: int) -> bool:
    """Whether a latent of h x w takes the blur's reflected border (each side above ``SAG_KERNEL // 2``)."""
    return min(h, w) > SAG_KERNEL // 2


__all__ = [
    "MAX_SAG_BLUR_SIGMA",
    "SAG_KERNEL",
    "SAG_THRESHOLD",
    "attention_mask",
    "check_blur_sigma",
    "degraded_x0",
    "fits_blur",
    "gaussian_blur",
]
