"""Variation seeds (A1111's ``subseed`` / ``subseed_strength``): a row's start noise is the spherical
interpolation between its seed's noise and its variation seed's noise.

Both are unit Gaussian draws of the same shape; slerp keeps the result on the sphere where such draws live
(their norm), which a straight mix would shrink by up to sqrt(2) at strength 0.5. Strength 0 is the seed's
noise exactly and strength 1 the variation seed's noise exactly (no arithmetic, so the images are equal).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Above this cosine the two draws are nearly parallel and sin(omega) ~ 0: a straight mix is the same to
# float precision and does not divide by ~0.
_PARALLEL = 0.9995


def slerp(strength: float, a: Tensor, b: Tensor) -> Tensor:
    """Per row (dim 0): the point ``strength`` of the way from ``a`` to ``b`` on the great circle through them
    (angle measured between the flattened rows)."""
    if strength <= 0.0:
        return a
    if strength >= 1.0:
        return b
    fa, fb = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    cos = ((fa / fa.norm(dim=1, keepdim=True)) * (fb / fb.norm(dim=1, keepdim=True))).sum(1).clamp(-1.0, 1.0)
    omega = torch.acos(cos)
    so = torch.sin(omega)
    wa = torch.where(cos > _PARALLEL, 1.0 - strength, torch.sin((1.0 - strength) * omega) / so)
    wb = torch.where(cos > _PARALLEL, torch.full_like(cos, strength), torch.sin(strength * omega) / so)
    out = wa[:, None] * fa + wb[:, None] * fb
    return out.reshape(a.shape).to(a.dtype)


def variation_noise(noise: Tensor, subseeds: list[int], strength: float) -> Tensor:
    """``noise`` (one row per seed) moved ``strength`` of the way towards each row's variation-seed noise
    (drawn like the start noise: ``randn`` from ``Generator("cpu").manual_seed(subseed)``)."""
    if strength <= 0.0:
        return noise
    if len(subseeds) != noise.shape[0]:
        raise ValueError(f"{noise.shape[0]} rows of noise but {len(subseeds)} variation seeds")
    sub = torch.cat(
        [
            torch.randn((1, *noise.shape[1:]), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
            for s in subseeds
        ]
    ).to(noise.device)
    return slerp(strength, noise, sub.to(noise.dtype))


__all__ = ["slerp", "variation_noise"]
