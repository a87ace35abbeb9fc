"""Resizing (N, C, H, W) tensors by ComfyUI's method names (its ``common_upscale`` without a crop): ``nearest-exact``,
``bilinear``, ``area``, ``bicubic`` (``torch.nn.functional.interpolate``, corners not aligned) and ``bislerp`` (each
pixel's channel vector slerped between its source neighbours, below). The ComfyUI latent and image nodes and Deep
Shrink (:mod:`sdengine.nn.deep_shrink`) resize with these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.errors import UsageError

RESIZE_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "bislerp")


def _slerp_rows(a: Tensor, b: Tensor, r: Tensor) -> Tensor:
    """Spherical interpolation of the vectors along the last axis of ``a`` and ``b`` (r broadcast, last axis 1):
    the directions slerped, the length interpolated linearly; nearly equal directions keep ``a``, nearly opposite
    ones interpolate linearly; a zero vector has no direction (taken as zero)."""
    na, nb = a.norm(dim=-1, keepdim=True), b.norm(dim=-1, keepdim=True)
    ua = torch.where(na == 0, torch.zeros_like(a), a / na)
    ub = torch.where(nb == 0, torch.zeros_like(b), b / nb)
    cos = (ua * ub).sum(dim=-1, keepdim=True)
    angle = torch.acos(cos)
    sin = torch.sin(angle)
    out = (torch.sin((1 - r) * angle) * ua + torch.sin(r * angle) * ub) / sin * (na * (1 - r) + nb * r)
    out = torch.where(cos < 1e-5 - 1, a * (1 - r) + b * r, out)
    return torch.where(cos > 1 - 1e-5, a, out)


def _bislerp_axis(x: Tensor, size: int, axis: int) -> Tensor:
    """Resize ``x`` (N, C, H, W) along ``axis`` (2 or 3) to ``size`` by slerping each output position's two source
    neighbours (the half-pixel-centred source position, clamped to the edges, as bilinear resizing finds it)."""
    n_old = x.shape[axis]
    pos = (torch.arange(size, dtype=torch.float64, device=x.device) + 0.5) * (n_old / size) - 0.5
    pos = pos.clamp(0, n_old - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=n_old - 1)
    r = (pos - lo).float()
    a, b = x.index_select(axis, lo).movedim(1, -1), x.index_select(axis, hi).movedim(1, -1)
    shape = [1, 1, 1, 1]
    shape[axis - 1] = size  # the channel axis moved last: H and W sit one place earlier
    return _slerp_rows(a, b, r.reshape(shape)).movedim(-1, 1)


def bislerp(x: Tensor, width: int, height: int) -> Tensor:
    """ComfyUI's ``bislerp`` resize of a latent (N, C, H, W): each pixel's channel vector slerped between its two
    source neighbours along the width first, then along the height, in float32; back in ``x``'s dtype."""
    y = _bislerp_axis(x.float(), int(width), 3)
    return _bislerp_axis(y, int(height), 2).to(x.dtype)


def resize_nchw(x: Tensor, width: int, height: int, method: str) -> Tensor:
    """``x`` (N, C, H, W) resized to ``height`` x ``width`` by ``method`` (one of :data:`RESIZE_METHODS`)."""
    if method == "bislerp":
        return bislerp(x, width, height)
    if method in ("nearest-exact", "area"):
        return F.interpolate(x, size=(height, width), mode=method)
    if method in ("bilinear", "bicubic"):
        return F.interpolate(x, size=(height, width), mode=method, align_corners=False)
    raise UsageError(f"unknown resize method {method!r}; use one of: {', '.join(RESIZE_METHODS)}")


__all__ = ["RESIZE_METHODS", "bislerp", "resize_nchw"]
