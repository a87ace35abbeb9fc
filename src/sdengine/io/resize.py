"""Fitting an init or control image to the output size: A1111's three resize modes.

- ``just resize`` (0, the default): stretch to the size; the aspect ratio changes when it differs.
- ``crop and resize`` (1): scale until the image covers the size, then cut the overhang evenly on both
  sides (nothing is stretched, the borders are lost).
- ``resize and fill`` (2): scale until the image fits inside the size, centre it, and fill the empty bands
  by repeating the image's edge rows/columns (A1111 stretches a zero-height strip of the edge, which is the
  same thing).

:func:`resize_image` works on PIL images, :func:`resize_tensor` on (N, C, H, W) float tensors with the same
geometry; :func:`resize_mode_name` accepts A1111's numbers and spelling variants.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from sdengine.errors import GenerationError

RESIZE_MODES = ("just resize", "crop and resize", "resize and fill")
# A1111's fourth img2img resize mode (3): the init image encoded at its own size and its latent resized
# (GenerationRequest.init_latent_resize; not an image fit, so not one of RESIZE_MODES); the infotext's name for it
LATENT_UPSCALE = "just resize (latent upscale)"
_ALIASES = {
    "just_resize": 0,
    "resize": 0,
    "stretch": 0,
    "crop_and_resize": 1,
    "crop": 1,
    "resize_and_fill": 2,
    "fill": 2,
    "pad": 2,
}


def resize_mode_name(mode: Any) -> str:
    """The canonical name of a resize mode: one of :data:`RESIZE_MODES`, A1111's index 0/1/2, or a variant
    (``crop``, ``fill``, ``just_resize``, ...). Anything else is a one-line GenerationError."""
    if isinstance(mode, int) and not isinstance(mode, bool) and 0 <= mode < len(RESIZE_MODES):
        return RESIZE_MODES[mode]
    if isinstance(mode, str):
        key = mode.strip().lower().replace("-", " ")
        if key in RESIZE_MODES:
            return key
        if key.isdigit() and int(key) < len(RESIZE_MODES):
            return RESIZE_MODES[int(key)]
        if key.replace(" ", "_") in _ALIASES:
            return RESIZE_MODES[_ALIASES[key.replace(" ", "_")]]
    raise GenerationError(f"unknown resize mode {mode!r}; use one of: {', '.join(RESIZE_MODES)} (or 0, 1, 2)")


def fit_geometry(src_w: int, src_h: int, width: int, height: int, mode: str) -> tuple[int, int, int, int]:
    """(scaled width, scaled height, x offset, y offset) of the scaled source on the output canvas: the
    offset is negative where ``crop and resize`` cuts, positive where ``resize and fill`` fills."""
    mode = resize_mode_name(mode)
    if mode == "just resize":
        return width, height, 0, 0
    ratio = (max if mode == "crop and resize" else min)(width / src_w, height / src_h)
    # the side that decides the ratio is exact; the other rounds (and at least 1 pixel)
    sw = width if ratio == width / src_w else max(1, round(src_w * ratio))
    sh = height if ratio == height / src_h else max(1, round(src_h * ratio))
    return sw, sh, (width - sw) // 2, (height - sh) // 2


def resize_image(image: Image.Image, width: int, height: int, mode: str = "just resize") -> Image.Image:
    """``image`` at ``width`` x ``height`` in resize ``mode`` (Lanczos)."""
    if image.size == (width, height):
        return image
    sw, sh, x, y = fit_geometry(image.width, image.height, width, height, mode)
    scaled = image.resize((sw, sh), Image.Resampling.LANCZOS)
    if (sw, sh) == (width, height):
        return scaled
    if x <= 0 and y <= 0:  # crop
        return scaled.crop((-x, -y, -x + width, -y + height))
    arr = np.asarray(scaled)
    pad = [(max(y, 0), height - sh - max(y, 0)), (max(x, 0), width - sw - max(x, 0))] + [(0, 0)] * (arr.ndim - 2)
    return Image.fromarray(np.pad(arr, pad, mode="edge"), mode=scaled.mode)


def resize_tensor(t: Any, width: int, height: int, mode: str = "just resize") -> Any:
    """A (N, C, H, W) float tensor at ``height`` x ``width`` in resize ``mode`` (bilinear, antialiased)."""
    import torch.nn.functional as F

    h, w = int(t.shape[-2]), int(t.shape[-1])
    if (w, h) == (width, height):
        return t
    sw, sh, x, y = fit_geometry(w, h, width, height, mode)
    t = F.interpolate(t, size=(sh, sw), mode="bilinear", antialias=True)
    if (sw, sh) == (width, height):
        return t
    if x <= 0 and y <= 0:
        return t[..., -y : -y + height, -x : -x + width]
    left, top = max(x, 0), max(y, 0)
    return F.pad(t, (left, width - sw - left, top, height - sh - top), mode="replicate")


def centre_cut_resize(t: Any, width: int, height: int, interpolation: str = "nearest-exact") -> Any:
    """A (N, C, H, W) float tensor cut to the aspect of ``width`` x ``height`` around its centre, then resized with
    ``interpolation`` (a ``torch.nn.functional.interpolate`` mode): ComfyUI's ``common_upscale`` with crop
    ``center``, how its ControlNets and T2I-Adapters fit a hint (``nearest-exact``). Unlike ``crop and resize``
    the cut comes first, on the source's pixels (each side's cut rounded), and nothing is antialiased."""
    import torch.nn.functional as F

    h, w = int(t.shape[-2]), int(t.shape[-1])
    src, dst = w / h, width / height
    dx = dy = 0
    if src > dst:  # wider than the output: columns cut on both sides
        dx = round((w - w * dst / src) / 2)
    elif src < dst:
        dy = round((h - h * src / dst) / 2)
    t = t[..., dy : h - dy, dx : w - dx]
    if (int(t.shape[-1]), int(t.shape[-2])) == (width, height):
        return t
    return F.interpolate(t, size=(height, width), mode=interpolation)


__all__ = [
    "LATENT_UPSCALE",
    "RESIZE_MODES",
    "centre_cut_resize",
    "fit_geometry",
    "resize_image",
    "resize_mode_name",
    "resize_tensor",
]
