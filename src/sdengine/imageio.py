"""Small image helpers: tensors <-> PIL, and labelled sample grids."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``(N, C, H, W)`` floats in ``[0, 1]`` -> ``(N, H, W, C)`` uint8 (round half up, clipped)."""
    x = images.detach().float().clamp(0, 1).mul(255).add(0.5).floor().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    arr = to_uint8(images)
    if arr.shape[-1] == 1:
        return [Image.fromarray(a[..., 0], mode="L") for a in arr]
    return [Image.fromarray(a, mode="RGB") for a in arr]


def make_grid(
    images: torch.Tensor,
    ncols: int,
    *,
    row_labels: Sequence[str] | None = None,
    scale: int = 1,
    pad: int = 2,
) -> Image.Image:
    """Tile ``(N, C, H, W)`` images in ``[0, 1]`` into a grid, optionally with a label per row."""
    tiles = to_pil(images)
    if not tiles:
        raise ValueError("no images to put in a grid")
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
    """Save a PNG under a temporary name, then rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    img.save(tmp, **kwargs)
    tmp.replace(path)
    return path
