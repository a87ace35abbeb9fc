"""Images in and out, one set of rules for the whole package.

* In: :func:`load_image` takes a path, a PIL image, an array or a tensor and gives a PIL image. Files get
  their EXIF orientation applied (phone photos); 16-bit images are scaled by their bit depth (a 16-bit
  grayscale PNG is not read as near-white); float arrays and tensors are read as [0, 1]; transparency is
  either composited onto a background colour or dropped, as the caller says. An unreadable or missing
  file raises the caller's error class (a :class:`~sdengine.errors.SdengineError`) naming it.
* Out: :func:`to_uint8` is THE float -> 8-bit rule (clip to [0, 1], times 255, round half to even, as
  NumPy and diffusers' ``numpy_to_pil`` do); :func:`to_pil`, :func:`make_grid` and
  :func:`save_image_atomic` build on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import Tensor

from sdengine.errors import UsageError
from sdengine.io.atomic import atomic_write

ImageInput = Image.Image | np.ndarray | Tensor | str | Path

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageError(UsageError):
    """An image that cannot be read or used: one line naming it."""


# ---------------------------------------------------------------------------------------------------
# Out
# ---------------------------------------------------------------------------------------------------


def to_uint8(a: np.ndarray | Tensor) -> np.ndarray:
    """Floats in [0, 1] -> uint8: clipped, times 255, rounded half to even. Arrays keep their layout;
    a tensor ``(N, C, H, W)`` becomes ``(N, H, W, C)``."""
    if isinstance(a, Tensor):
        t = a.detach().float().cpu()
        if t.ndim == 4:
            t = t.permute(0, 2, 3, 1)
        a = t.numpy()
    return np.round(np.clip(np.asarray(a, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def to_pil(images: Tensor | np.ndarray) -> list[Image.Image]:
    """``(N, C, H, W)`` tensor or ``(N, H, W, C)`` array in [0, 1] -> PIL images (L for one channel)."""
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a) for a in arr]


def make_grid(
    images: Tensor,
    ncols: int,
    *,
    row_labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Image.Image:
    """Tile ``(N, C, H, W)`` images in ``[0, 1]`` into a grid, optionally with a label per row."""
    tiles = to_pil(images)
    if not tiles:
        raise ImageError("no images to put in a grid")
    w, h = tiles[0].size
    w, h = w * scale, h * scale
    nrows = (len(tiles) + ncols - 1) // ncols
    font = ImageFont.load_default()
    label_w = 0
    if row_labels:
        probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        label_w = 8 + max(int(probe.textlength(str(s), font=font)) for s in row_labels)
    grid = Image.new("RGB", (label_w + ncols * (w + pad) + pad, nrows * (h + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncols)
        tile = tile.convert("RGB")
        if scale != 1:
            tile = tile.resize((w, h), Image.Resampling.NEAREST)
        grid.paste(tile, (label_w + pad + c * (w + pad), pad + r * (h + pad)))
    if row_labels:
        for r, text in enumerate(row_labels[:nrows]):
            draw.text((4, pad + r * (h + pad) + h // 2 - 5), str(text), fill="black", font=font)
    return grid


def save_image_atomic(img: Image.Image, path: str | Path, **kwargs: object) -> Path:
    """Save through :func:`sdengine.io.atomic.atomic_write`: readers never see half a file, concurrent
    writers never share a temporary file, and the file gets the mode a plain ``open`` would (the umask)."""
    path = Path(path)
    # The format comes from the final name: the temporary name ends in ``.tmp``, which PIL cannot map.
    fmt = kwargs.pop("format", None) or Image.registered_extensions().get(path.suffix.lower())
    with atomic_write(path) as f:
        img.save(f, format=str(fmt) if fmt else None, **kwargs)  # type: ignore[arg-type]
    return path


# ---------------------------------------------------------------------------------------------------
# In
# ---------------------------------------------------------------------------------------------------


def _scale_deep(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit integer) grayscale -> 8-bit L, scaled by the bit depth rather than clipped."""
    a = np.asarray(im)
    depth = 65535.0 if im.mode.startswith("I;16") or int(a.max(initial=0)) <= 65535 else float(a.max())
    return Image.fromarray(np.round(np.clip(a.astype(np.float64) / depth, 0.0, 1.0) * 255.0).astype(np.uint8))


def _array_to_pil(a: np.ndarray, what: str, error: type[Exception]) -> Image.Image:
    shape = a.shape
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
        raise error(f"{what}: cannot make an image of an array of shape {shape}; use (H, W), (H, W, 3) or (H, W, 4)")
    if a.dtype == np.uint16:
        a = np.round(a.astype(np.float64) / 65535.0 * 255.0).astype(np.uint8)
    elif a.dtype != np.uint8:
        a = to_uint8(a)  # float arrays are 0..1
    return Image.fromarray(a)


def load_image(
    image: ImageInput,
    what: str = "image",
    *,
    mode: str | None = None,
    background: tuple[int, int, int] | None = None,
    error: type[Exception] = ImageError,
) -> Image.Image:
    """A path, PIL image, uint8/uint16/float array ``(H, W[, C])`` or tensor (``[1,] C, H, W`` in [0, 1])
    -> PIL image.

    ``mode``: convert to it ("RGB", "L"; None keeps the image's own, 16-bit read as 8-bit). With
    ``background`` transparency is composited onto that colour first (control maps: black = nothing);
    without it an alpha channel is dropped. A file that is missing or unreadable raises ``error`` naming
    ``what`` and the path."""
    if isinstance(image, str | Path):
        path = Path(image)
        try:
            with Image.open(path) as im:
                im.load()
                image = ImageOps.exif_transpose(im)
                if image is im:
                    image = im.copy()
        except FileNotFoundError:
            raise error(f"{what} not found: {path}") from None
        except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise error(f"cannot read the {what} {path}: {type(e).__name__}: {e}") from None
    if isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            if t.shape[0] != 1:
                raise error(f"{what}: expected one image, got a batch of {t.shape[0]}")
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3, 4):
            t = t.permute(1, 2, 0)  # (C, H, W) -> (H, W, C)
        image = t.numpy()
    if isinstance(image, np.ndarray):
        image = _array_to_pil(image, what, error)
    if not isinstance(image, Image.Image):
        raise error(f"{what} must be a path, a PIL image, an array or a tensor, got {type(image).__name__}")
    if image.mode in _SIXTEEN_BIT:
        image = _scale_deep(image)
    if background is not None and (
        image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (image.mode == "P" and "transparency" in image.info)
    ):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (*background, 255)), rgba)
    if mode is not None and image.mode != mode:
        image = image.convert(mode)
    return image


def image_tensor(img: Image.Image) -> Tensor:
    """RGB PIL -> (1, 3, H, W) in [-1, 1] (diffusers' VaeImageProcessor: /255, then 2x - 1)."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a).permute(2, 0, 1)[None] * 2.0 - 1.0


__all__ = [
    "ImageError",
    "ImageInput",
    "image_tensor",
    "load_image",
    "make_grid",
    "save_image_atomic",
    "to_pil",
    "to_uint8",
]
