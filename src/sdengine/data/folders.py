"""Any folder of images as a dataset: resize + centre-crop, RGB or grayscale, optional captions.

Captions follow the kohya / A1111 convention used for LoRA datasets: ``cat.png`` is captioned by
``cat.txt`` beside it (UTF-8, a byte-order mark and whitespace stripped; other encodings are refused).
Images are returned in ``[-1, 1]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TypedDict

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sdengine.errors import SdengineError, UsageError
from sdengine.io.images import load_image as read_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageFolder",
    "ImageFolderError",
    "ImageItem",
    "list_images",
    "load_image",
    "pil_to_tensor",
    "read_caption",
    "read_captions",
    "resize_center_crop",
    "verify_images",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
Channels = Literal[1, 3]


class ImageFolderError(SdengineError, ValueError):
    """A folder without images, or an image file that cannot be decoded (the message names it)."""


class ImageItem(TypedDict):
    image: torch.Tensor  # (C, size, size) float32 in [-1, 1]
    caption: str
    path: str


def list_images(root: str | os.PathLike[str]) -> list[Path]:
    """All image files under ``root`` (recursive, extension case-insensitive), sorted for determinism."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        exts = "/".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
        raise ImageFolderError(f"no images ({exts}) found under {root}")
    return files


def verify_images(paths: Sequence[Path]) -> None:
    """Cheap up-front check (PIL ``verify()``, no full decode); raises naming the first bad file."""
    for p in paths:
        try:
            with Image.open(p) as im:
                im.verify()
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, SyntaxError, OSError...)
            raise ImageFolderError(f"{p}: not a readable image ({type(e).__name__}: {e})") from e


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is ``size`` (Lanczos), then crop the centre ``size x size``."""
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def pil_to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL ``L``/``RGB`` image -> float32 ``(C, H, W)`` in ``[-1, 1]``."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1)  # (C, H, W)
    return x.to(torch.float32).div_(127.5).sub_(1.0)


def load_image(
    path: str | os.PathLike[str],
    size: int | None = None,
    channels: Channels = 3,
    background: tuple[int, int, int] = (255, 255, 255),
) -> torch.Tensor:
    """Decode one image to ``(C, size, size)`` in ``[-1, 1]`` (no resize when ``size`` is None).

    EXIF orientation is applied (phone photos). Decode errors are re-raised naming the file.
    """
    if channels not in (1, 3):
        raise UsageError(f"channels must be 1 or 3, got {channels}")
    # The one reader (sdengine.io.images): EXIF, 16-bit scaling, alpha composited on ``background`` (transparent
    # pixels often hold black RGB); its errors name the file, raised as ImageFolderError.
    im = read_image(
        Path(path), "image", mode="RGB" if channels == 3 else "L", background=background, error=ImageFolderError
    )
    if size is not None:
        im = resize_center_crop(im, size)
    return pil_to_tensor(im)


def read_captions(image_path: Path) -> list[str] | None:
    """The captions in ``<stem>.txt`` beside the image, one per non-empty line (an empty file: one empty
    caption), or None when there is no such file. Several lines are several wordings of the same image; a
    trainer that takes caption variety draws one per step (``train lora``), the others use the first."""
    txt = image_path.with_suffix(".txt")
    if not txt.is_file():
        return None
    try:  # utf-8-sig: a byte-order mark (Windows editors) is not part of the caption
        text = txt.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:  # kohya refuses these too; a guessed encoding would train on a wrong word
        raise ImageFolderError(
            f"caption {txt} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save it as UTF-8"
        ) from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line] or [""]


def read_caption(image_path: Path) -> str | None:
    """The first caption in ``<stem>.txt`` beside the image (see :func:`read_captions`), or None."""
    captions = read_captions(image_path)
    return None if captions is None else captions[0]


class ImageFolder(Dataset[ImageItem]):
    """Images under ``root`` as ``{"image": (C, size, size) in [-1, 1], "caption": str, "path": str}``.

    - ``channels``: 3 (RGB) or 1 (grayscale); transparency is composited on ``background``.
    - ``require_captions``: every image must have its ``.txt`` (checked up front, names the missing
      ones); otherwise images without one get ``default_caption``.
    - ``flip_p``: probability of a horizontal flip, drawn from ``generator`` (explicit RNG; with
      DataLoader workers give each worker its own generator or flip in the training loop instead).
    - ``verify``: check every file with PIL ``verify()`` at construction (cheap, no decode); decode
      errors later are still raised naming the file.
    - ``cache``: keep decoded, resized tensors in memory (small LoRA/ControlNet sets).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int,
        channels: Channels = 3,
        *,
        require_captions: bool = False,
        default_caption: str = "",
        flip_p: float = 0.0,
        generator: torch.Generator | None = None,
        verify: bool = True,
        cache: bool = False,
        background: tuple[int, int, int] = (255, 255, 255),
    ) -> None:
        if channels not in (1, 3):
            raise UsageError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise UsageError(f"size must be positive, got {size}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        if flip_p > 0 and generator is None:
            raise ValueError("flip_p > 0 needs an explicit torch.Generator (no global RNG)")
        self.root = Path(root)
        self.size, self.channels, self.background = size, channels, background
        self.flip_p, self.generator = flip_p, generator
        self.paths = list_images(self.root)
        if verify:
            verify_images(self.paths)
        sets = [read_captions(p) for p in self.paths]
        if require_captions:
            missing = [str(p) for p, c in zip(self.paths, sets, strict=True) if c is None]
            if missing:
                shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                raise ImageFolderError(f"{len(missing)} image(s) under {self.root} have no .txt caption: {shown}")
        # every wording of each image (one per line of its .txt), and the first one as "the" caption
        self.caption_sets: list[list[str]] = [[default_caption] if c is None else c for c in sets]
        self.captions = [c[0] for c in self.caption_sets]
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, i: int) -> torch.Tensor:
        if self._cache is not None and i in self._cache:
            return self._cache[i]
        x = load_image(self.paths[i], self.size, self.channels, self.background)
        if self._cache is not None:
            self._cache[i] = x
        return x

    def __getitem__(self, i: int) -> ImageItem:
        x = self._load(i)
        if self.flip_p > 0 and torch.rand((), generator=self.generator).item() < self.flip_p:
            x = x.flip(-1)
        return {"image": x, "caption": self.captions[i], "path": str(self.paths[i])}

    def stack(self) -> torch.Tensor:
        """All images as one ``(N, C, size, size)`` tensor, un-augmented (small datasets only)."""
        return torch.stack([self._load(i) for i in range(len(self))])
