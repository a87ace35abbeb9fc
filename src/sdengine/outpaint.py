"""Outpainting: extend an image's canvas on any side and let the model fill the new area.

The plan (:func:`plan_outpaint`) pads the image to the new canvas by repeating its edge pixels (a start
that already has the right colours, so strength 1 inpainting blends in), and makes the inpainting mask:
white over the new area and ``overlap`` pixels into the original (so the seam itself is repainted), black
over the rest. The run is ordinary inpainting of that canvas (:func:`outpaint`); afterwards the original
pixels are put back where the mask is black (:func:`finish_outpaint`), so the original area outside the
overlap is kept exactly, as A1111 pastes its overlay after inpainting.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sdengine.errors import GenerationError
from sdengine.io.images import load_image


@dataclass(frozen=True)
class OutpaintPlan:
    """The padded canvas, its mask (L, white = generate) and where the original sits on it."""

    canvas: Image.Image
    mask: Image.Image
    original: Image.Image
    left: int
    top: int

    @property
    def box(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the original on the canvas."""
        return self.left, self.top, self.left + self.original.width, self.top + self.original.height


def parse_sides(text: str) -> tuple[int, int, int, int]:
    """``L,R,T,B`` pixels (``--outpaint 32,32,0,0``), or one number for all four sides."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise GenerationError(f"--outpaint {text!r}: expected LEFT,RIGHT,TOP,BOTTOM pixels, e.g. 32,32,0,0") from None
    if len(values) == 1:
        values *= 4
    if len(values) != 4:
        raise GenerationError(f"--outpaint {text!r}: expected 4 numbers LEFT,RIGHT,TOP,BOTTOM (or one for all)")
    return values[0], values[1], values[2], values[3]


def plan_outpaint(
    image: Any,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    *,
    overlap: int = 8,
    multiple: int = 8,
    max_side: int | None = None,
) -> OutpaintPlan:
    """The canvas and mask for extending ``image`` (PIL, array or path) by the given pixels on each side.
    The new size must be a multiple of ``multiple`` (the model's) and, when given, at most ``max_side`` a side
    (checked before the canvas is made: a huge pad once filled the machine's memory before any check);
    ``overlap`` pixels of the original along each extended side are repainted too."""
    sides = {"left": left, "right": right, "top": top, "bottom": bottom}
    bad = [f"{k} {v!r}" for k, v in sides.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if bad:
        raise GenerationError(f"outpaint sides must be whole pixels >= 0, got {', '.join(bad)}")
    if not any(sides.values()):
        raise GenerationError("outpaint: give at least one side to extend (left, right, top, bottom)")
    if not isinstance(overlap, int) or overlap < 0:
        raise GenerationError(f"outpaint overlap must be whole pixels >= 0, got {overlap!r}")
    img = load_image(image, "outpaint image", mode="RGB", error=GenerationError)
    w, h = img.width + left + right, img.height + top + bottom
    if max_side is not None and max(w, h) > max_side:
        raise GenerationError(
            f"outpaint: the new size {w}x{h} is too large: each side may be at most {max_side} px for this model"
        )
    for name, size, extra in (("width", w, "left/right"), ("height", h, "top/bottom")):
        if size % multiple:
            raise GenerationError(
                f"outpaint: the new {name} {size} is not a multiple of {multiple}; add "
                f"{multiple - size % multiple} more pixels {extra}"
            )
    arr = np.asarray(img)
    canvas = np.pad(arr, ((top, bottom), (left, right), (0, 0)), mode="edge")
    mask = np.full((h, w), 255, np.uint8)
    # keep the original except `overlap` pixels along each side that is extended (not the others)
    x0 = left + (min(overlap, img.width) if left else 0)
    x1 = left + img.width - (min(overlap, img.width) if right else 0)
    y0 = top + (min(overlap, img.height) if top else 0)
    y1 = top + img.height - (min(overlap, img.height) if bottom else 0)
    if x1 > x0 and y1 > y0:
        mask[y0:y1, x0:x1] = 0
    return OutpaintPlan(Image.fromarray(canvas), Image.fromarray(mask, mode="L"), img, left, top)


def finish_outpaint(plan: OutpaintPlan, generated: Image.Image) -> Image.Image:
    """``generated`` with the original's pixels put back wherever the mask is black."""
    if generated.size != plan.canvas.size:
        raise GenerationError(f"outpaint: generated image is {generated.size}, the canvas {plan.canvas.size}")
    out = np.asarray(generated.convert("RGB")).copy()
    keep = np.asarray(plan.mask) == 0
    out[keep] = np.asarray(plan.canvas)[keep]
    return Image.fromarray(out)


def outpaint(
    pipe: Any,
    prompt: Any = "",
    image: Any = None,
    left: int = 0,
    right: int = 0,
    top: int = 0,
    bottom: int = 0,
    *,
    overlap: int = 8,
    **kwargs: Any,
) -> Any:
    """Extend ``image`` with ``pipe`` (a :class:`sdengine.pipeline.Pipeline`): inpainting of the padded canvas
    (strength 1 unless given, mask blur 4 unless given), then the original put back outside the overlap.
    Returns the pipeline's GenerationResult with its images and arrays finished."""
    if image is None:
        raise GenerationError("outpaint needs an image to extend")
    side = pipe.max_side() if hasattr(pipe, "max_side") else None
    plan = plan_outpaint(
        image, left, right, top, bottom, overlap=overlap, multiple=int(pipe.size_multiple), max_side=side
    )
    kwargs.setdefault("strength", 1.0)
    kwargs.setdefault("mask_blur", 4)
    result = pipe(
        prompt, init_image=plan.canvas, mask=plan.mask, width=plan.canvas.width, height=plan.canvas.height, **kwargs
    )
    images = [finish_outpaint(plan, im) for im in result.images]
    arrays = np.stack([np.asarray(im, np.float32) / 255.0 for im in images])
    keep = (np.asarray(plan.mask) != 0)[None, :, :, None]
    arrays = np.where(keep, result.arrays, arrays).astype(np.float32)  # generated pixels keep full precision
    return dataclasses.replace(result, images=images, arrays=arrays)


__all__ = ["OutpaintPlan", "finish_outpaint", "outpaint", "parse_sides", "plan_outpaint"]
