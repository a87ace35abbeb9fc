"""Variation seeds (A1111's ``subseed`` / ``subseed_strength``): a row's start noise is the spherical
interpolation between its seed's noise and its variation seed's noise, computed as A1111 computes it.

A1111 (``modules/rng.py``) slerps each image's noise of shape (C, H, W) with norms and angles taken along its
dim 1, the height: every (channel, column) vector of H values is interpolated on its own great circle. That is
what :func:`slerp` does for (B, C, H, W) rows, in float32 as A1111 does, so a variation seed gives A1111's start
noise (with its CPU random source) and so its image. Each column keeps the norm of the draws, which a straight
mix would shrink by up to sqrt(2) at strength 0.5. Strength 0 is the seed's noise exactly and strength 1 the
variation seed's noise exactly (no arithmetic, so the images are equal).
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdengine.diffusion.philox import make_generator, randn

# A1111's test: when the mean cosine of the columns is above this, the two draws are nearly parallel and
# sin(omega) ~ 0, so a straight mix (the same to float precision) is used instead.
_PARALLEL = 0.9995


def _slerp_image(strength: float, low: Tensor, high: Tensor) -> Tensor:
    """A1111's slerp of one image's noise ``low`` -> ``high``: (C, H, W), angles along dim 1."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cos = (low_unit * high_unit).sum(1)  # (C, W)
    if cos.mean() > _PARALLEL:
        return low * (1.0 - strength) + high * strength
    omega = torch.acos(cos)
    so = torch.sin(omega)
    wa = (torch.sin((1.0 - strength) * omega) / so).unsqueeze(1)
    wb = (torch.sin(strength * omega) / so).unsqueeze(1)
    return wa * low + wb * high


def slerp(strength: float, a: Tensor, b: Tensor) -> Tensor:
    """Per row (dim 0): the point ``strength`` of the way from ``a`` to ``b``. Rows of shape (C, H, W) follow
    A1111 (each (channel, column) vector along H on its own great circle, see the module docstring); other
    shapes interpolate the flattened row."""
    if strength <= 0.0:
        return a
    if strength >= 1.0:
        return b
    # a row that is not (C, H, W) is one vector: shaped (1, N, 1), its one "column" is all of it
    shape = (lambda t: t.float()) if a.ndim == 4 else (lambda t: t.reshape(1, -1, 1).float())
    rows = [_slerp_image(strength, shape(a[i]), shape(b[i])).reshape(a.shape[1:]) for i in range(a.shape[0])]
    return torch.stack(rows).to(a.dtype)


def variation_noise(noise: Tensor, subseeds: list[int], strength: float, source: str = "cpu") -> Tensor:
    """``noise`` (one row per seed) moved ``strength`` of the way towards each row's variation-seed noise
    (drawn like the start noise: the first ``randn`` of a fresh generator of ``source`` seeded with the subseed,
    ``Generator("cpu").manual_seed(subseed)`` for "cpu", :class:`sdengine.diffusion.philox.PhiloxGenerator` for
    "nv", as A1111's ``randn(subseed, shape)``)."""
    if strength <= 0.0:
        return noise
    if len(subseeds) != noise.shape[0]:
        raise ValueError(f"{noise.shape[0]} rows of noise but {len(subseeds)} variation seeds")
    sub = torch.cat([randn((1, *noise.shape[1:]), make_generator(s, source)) for s in subseeds]).to(noise.device)
    return slerp(strength, noise, sub.to(noise.dtype))


def seed_resized_noise(
    noise: Tensor,
    seeds: list[int],
    size: tuple[int, int],
    subseeds: list[int] | None = None,
    strength: float = 0.0,
    source: str = "cpu",
) -> Tensor:
    """A1111's "Resize seed from width/height" (``modules/rng.py`` ``ImageRNG.first``): each row's noise is drawn
    again at the latent ``size`` (h, w) from a fresh ``Generator("cpu").manual_seed(seed)`` (its variation seed's
    noise too, at that size, slerped in as :func:`variation_noise` does), and pasted centred into ``noise``, the
    row's own draw at the real size, which stays around it (``source``: the generators' kind, as in
    :func:`variation_noise`). Centring as A1111 offsets it: ``(H - h) // 2`` (floor,
    so a larger draw loses ``-2 * offset`` rows, one more than the overhang when it is odd, as there)."""
    if len(seeds) != noise.shape[0]:
        raise ValueError(f"{noise.shape[0]} rows of noise but {len(seeds)} seeds")
    channels, big_h, big_w = noise.shape[1:]
    h, w = size
    out = noise.clone()
    for i, seed in enumerate(seeds):
        small = randn((1, channels, h, w), make_generator(seed, source))
        if subseeds is not None:
            small = variation_noise(small, [subseeds[i]], strength, source)
        dy, dx = (big_h - h) // 2, (big_w - w) // 2
        rows = h if dy >= 0 else h + 2 * dy
        cols = w if dx >= 0 else w + 2 * dx
        ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
        if rows > 0 and cols > 0:
            patch = small[0, :, sy : sy + rows, sx : sx + cols]
            out[i, :, ty : ty + rows, tx : tx + cols] = patch.to(out.device, out.dtype)
    return out


__all__ = ["seed_resized_noise", "slerp", "variation_noise"]
