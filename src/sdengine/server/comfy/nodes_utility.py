"""ComfyUI's small utility nodes that modern workflows use everywhere: the primitives (a value typed once and linked
into many widget inputs), the image size, string concatenation and replacement, and the image nodes that size or
noise an image (scale to a longest side, resize and pad, add seeded noise).

Each follows the ComfyUI node of the same name (inputs, defaults, ranges, category and arithmetic: ComfyUI's
``comfy_extras/nodes_primitive.py``, ``nodes_string.py`` and ``nodes_images.py``), written here from that
description. Their INT / FLOAT / STRING / BOOLEAN outputs link into widget inputs of those types; the executor checks
a linked value against the input's range when the node that reads it runs (see ``graph.Executor``).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from sdengine.server.comfy.nodes import (
    MAX_SEED,
    SIDE_MAX,
    Input,
    NodeDef,
    NodeError,
    RunContext,
    image_scale,
)

MAX_DIMENSION_METHODS = ("area", "lanczos", "bilinear", "nearest-exact", "bicubic")
PAD_METHODS = ("area", "bicubic", "nearest-exact", "bilinear", "lanczos")
PAD_COLORS = ("white", "black")


def _image(image: Any, node: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeError(f"{node}: image must be an IMAGE (B, H, W, 3 or 4), got {shape}")
    return image.float()


# ---------------------------------------------------------------------------------------------- primitives


def _identity(ctx: RunContext, value: Any) -> tuple[Any]:
    return (value,)


# ------------------------------------------------------------------------------------------------- strings


def string_concatenate(ctx: RunContext, string_a: str, string_b: str, delimiter: str) -> tuple[str]:
    """ComfyUI's StringConcatenate: ``string_a``, the delimiter, ``string_b``."""
    return (f"{string_a}{delimiter}{string_b}",)


def string_replace(ctx: RunContext, string: str, find: str, replace: str) -> tuple[str]:
    """ComfyUI's StringReplace: every occurrence of ``find`` replaced (Python's str.replace: an empty ``find``
    matches between every two characters and at both ends)."""
    return (string.replace(find, replace),)


# -------------------------------------------------------------------------------------------------- images


def get_image_size(ctx: RunContext, image: torch.Tensor) -> tuple[int, int, int]:
    """ComfyUI's GetImageSize: (width, height, batch_size)."""
    x = _image(image, "GetImageSize")
    return (int(x.shape[2]), int(x.shape[1]), int(x.shape[0]))


def _scale(ctx: RunContext, x: torch.Tensor, method: str, w: int, h: int) -> torch.Tensor:
    """``x`` resized to w x h with ComfyUI's upscale method, no crop (an RGBA image's alpha scaled on its own on the
    Lanczos path, which is RGB)."""
    if x.shape[-1] == 4 and method == "lanczos":
        (rgb,) = image_scale(ctx, x[..., :3], method, w, h, "disabled")
        (alpha,) = image_scale(ctx, x[..., 3:].expand(-1, -1, -1, 3).contiguous(), method, w, h, "disabled")
        return torch.cat([rgb, alpha[..., :1]], dim=-1)
    (out,) = image_scale(ctx, x, method, w, h, "disabled")
    return out


def max_dimension_size(w0: int, h0: int, largest: int) -> tuple[int, int]:
    """ComfyUI's ImageScaleToMaxDimension size: the longer side ``largest``, the other at the aspect (Python's
    round); a square image ``largest`` both ways."""
    if h0 > w0:
        return round(w0 / h0 * largest), largest
    if w0 > h0:
        return largest, round(h0 / w0 * largest)
    return largest, largest


def image_scale_to_max_dimension(
    ctx: RunContext, image: torch.Tensor, upscale_method: str, largest_size: int
) -> tuple[torch.Tensor]:
    """ComfyUI's ImageScaleToMaxDimension: scaled (no crop) so that its longer side is ``largest_size``."""
    x = _image(image, "ImageScaleToMaxDimension")
    w, h = max_dimension_size(x.shape[2], x.shape[1], int(largest_size))
    if w < 1 or h < 1:
        raise NodeError(
            f"ImageScaleToMaxDimension: largest_size {largest_size} leaves {w}x{h} for a {x.shape[2]}x{x.shape[1]} "
            "image; give a larger size"
        )
    return (_scale(ctx, x, upscale_method, w, h),)


def image_add_noise(ctx: RunContext, image: torch.Tensor, seed: int, strength: float) -> tuple[torch.Tensor]:
    """ComfyUI's ImageAddNoise: ``clip(image + strength * randn(image's shape), 0, 1)``, the normal noise drawn on
    the CPU from a generator seeded with ``seed`` (ComfyUI seeds torch's global CPU generator, ``torch.manual_seed``;
    a generator of its own seeded alike draws the same numbers and leaves the global one alone)."""
    x = _image(image, "ImageAddNoise")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(x.shape), generator=g, device="cpu", dtype=torch.float32).to(x)
    return ((x + float(strength) * noise).clamp(0.0, 1.0),)


def resize_and_pad_image(
    ctx: RunContext,
    image: torch.Tensor,
    target_width: int,
    target_height: int,
    padding_color: str,
    interpolation: str,
) -> tuple[torch.Tensor]:
    """ComfyUI's ResizeAndPadImage: scaled by min(target_w / w, target_h / h) (each side truncated, no crop) and
    centred (offsets floored) on a ``target_width`` x ``target_height`` canvas of white (1) or black (0), every
    channel of it (an RGBA canvas is opaque white or transparent black)."""
    x = _image(image, "ResizeAndPadImage")
    b, h0, w0, c = x.shape
    tw, th = int(target_width), int(target_height)
    ctx.check_size(tw, th)
    s = min(tw / w0, th / h0)
    w, h = int(w0 * s), int(h0 * s)
    if w < 1 or h < 1:
        raise NodeError(
            f"ResizeAndPadImage: a {w0}x{h0} image fitted into {tw}x{th} is {w}x{h} pixels; give a larger target"
        )
    resized = _scale(ctx, x, interpolation, w, h)
    out = torch.full((b, th, tw, c), 0.0 if padding_color == "black" else 1.0, dtype=resized.dtype)
    y0, x0 = (th - h) // 2, (tw - w) // 2
    out[:, y0 : y0 + h, x0 : x0 + w, :] = resized
    return (out,)


STITCH_DIRECTIONS = ("right", "down", "left", "up")
STITCH_COLORS: dict[str, tuple[float, ...]] = {
    "white": (1.0,),  # one value: every colour channel (and the padding) takes it
    "black": (0.0,),
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
}


def _pad_centred(x: torch.Tensor, dim: int, size: int, value: float) -> torch.Tensor:
    """``x`` grown along ``dim`` (1: rows, 2: columns) to ``size`` with ``value``, the extra split floor / ceil
    before / after."""
    extra = size - x.shape[dim]
    if extra <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra // 2
    before = torch.full(shape, value, dtype=x.dtype)
    shape[dim] = extra - extra // 2
    after = torch.full(shape, value, dtype=x.dtype)
    return torch.cat([before, x, after], dim=dim)


def image_stitch(
    ctx: RunContext,
    image1: torch.Tensor,
    direction: str,
    match_image_size: bool,
    spacing_width: int,
    spacing_color: str,
    image2: torch.Tensor | None = None,
) -> tuple[torch.Tensor]:
    """ComfyUI's ImageStitch: ``image2`` put to the ``direction`` of ``image1`` (without image2, image1 as it is).
    The shorter batch is filled up with its last image. ``match_image_size``: image2 scaled (Lanczos) to image1's
    height (right / left; width ``int(h1 * w2 / h2)``) or width (down / up; height ``int(w1 * h2 / w2)``); else the
    smaller image is padded, centred, to the other's height / width with the spacing colour (0 for red, green,
    blue). An RGB image next to an RGBA one gets an opaque alpha. ``spacing_width`` (rounded up to even) columns /
    rows of ``spacing_color`` (opaque) go between."""
    a = _image(image1, "ImageStitch")
    if image2 is None:
        return (a,)
    b = _image(image2, "ImageStitch")
    horizontal = direction in ("left", "right")
    n = max(a.shape[0], b.shape[0])
    a = torch.cat([a, a[-1:].expand(n - a.shape[0], -1, -1, -1)]) if a.shape[0] < n else a
    b = torch.cat([b, b[-1:].expand(n - b.shape[0], -1, -1, -1)]) if b.shape[0] < n else b
    color = STITCH_COLORS[spacing_color]
    if match_image_size:
        h1, w1, h2, w2 = a.shape[1], a.shape[2], b.shape[1], b.shape[2]
        tw, th = (int(h1 * (w2 / h2)), h1) if horizontal else (w1, int(w1 / (w2 / h2)))
        if tw < 1 or th < 1:
            raise NodeError(f"ImageStitch: image2 ({w2}x{h2}) matched to image1 ({w1}x{h1}) would be {tw}x{th}")
        b = _scale(ctx, b, "lanczos", tw, th) if (tw, th) != (w2, h2) else b
    else:
        pad = color[0] if len(color) == 1 else 0.0
        dim = 1 if horizontal else 2
        size = max(a.shape[dim], b.shape[dim])
        a, b = _pad_centred(a, dim, size, pad), _pad_centred(b, dim, size, pad)
    c = max(a.shape[-1], b.shape[-1])
    a = torch.cat([a, torch.ones(*a.shape[:-1], c - a.shape[-1])], dim=-1) if a.shape[-1] < c else a
    b = torch.cat([b, torch.ones(*b.shape[:-1], c - b.shape[-1])], dim=-1) if b.shape[-1] < c else b
    parts = [b, a] if direction in ("left", "up") else [a, b]
    gap = int(spacing_width) + int(spacing_width) % 2
    if gap > 0:
        shape = (n, max(a.shape[1], b.shape[1]), gap, c) if horizontal else (n, gap, max(a.shape[2], b.shape[2]), c)
        spacer = torch.zeros(shape)
        fill = color if len(color) == 3 else color * 3
        for i, v in enumerate(fill[: min(3, c)]):
            spacer[..., i] = v
        if c == 4:
            spacer[..., 3] = 1.0
        parts.insert(1, spacer)
    out = torch.cat(parts, dim=2 if horizontal else 1)
    if out.shape[1] * out.shape[2] > ctx.max_pixels:
        raise NodeError(
            f"ImageStitch: the stitched image is {out.shape[2]}x{out.shape[1]}, over the server's "
            f"{ctx.max_pixels} pixels"
        )
    return (out,)


# ----------------------------------------------------------------------------------------------- registry

_PRIMITIVE = "utils/primitive"
_STRING = "utils/string"

UTILITY_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "PrimitiveInt",
            "Int",
            _PRIMITIVE,
            (Input("value", "INT", 0, -sys.maxsize, sys.maxsize, 1, control=True),),
            ("INT",),
            _identity,
            description="An INT typed once, linked into INT widget inputs (checked against each input's range).",
        ),
        NodeDef(
            "PrimitiveFloat",
            "Float",
            _PRIMITIVE,
            (Input("value", "FLOAT", 0.0, -sys.maxsize, sys.maxsize, 0.1),),
            ("FLOAT",),
            _identity,
            description="A FLOAT typed once, linked into FLOAT widget inputs.",
        ),
        NodeDef(
            "PrimitiveString",
            "String",
            _PRIMITIVE,
            (Input("value", "STRING", ""),),
            ("STRING",),
            _identity,
            description="A STRING typed once, linked into STRING widget inputs.",
        ),
        NodeDef(
            "PrimitiveStringMultiline",
            "String (Multiline)",
            _PRIMITIVE,
            (Input("value", "STRING", "", multiline=True),),
            ("STRING",),
            _identity,
            description="A multi-line STRING (a prompt) typed once, linked into STRING widget inputs.",
        ),
        NodeDef(
            "PrimitiveBoolean",
            "Boolean",
            _PRIMITIVE,
            (Input("value", "BOOLEAN", False),),
            ("BOOLEAN",),
            _identity,
            description="A BOOLEAN typed once, linked into BOOLEAN widget inputs.",
        ),
        NodeDef(
            "StringConcatenate",
            "Concatenate",
            _STRING,
            (
                Input("string_a", "STRING", multiline=True),
                Input("string_b", "STRING", multiline=True),
                Input("delimiter", "STRING", ""),
            ),
            ("STRING",),
            string_concatenate,
            description="string_a + delimiter + string_b.",
        ),
        NodeDef(
            "StringReplace",
            "Replace",
            _STRING,
            (
                Input("string", "STRING", multiline=True),
                Input("find", "STRING", multiline=True),
                Input("replace", "STRING", multiline=True),
            ),
            ("STRING",),
            string_replace,
            description="Every occurrence of `find` in `string` replaced by `replace`.",
        ),
        NodeDef(
            "GetImageSize",
            "Get Image Size",
            "image",
            (Input("image", "IMAGE"),),
            ("INT", "INT", "INT"),
            get_image_size,
            output_names=("width", "height", "batch_size"),
            description="The image's width, height and batch size, as INTs to link into widget inputs.",
        ),
        NodeDef(
            "ImageScaleToMaxDimension",
            "Scale Image to Max Dimension",
            "image/upscaling",
            (
                Input("image", "IMAGE"),
                Input("upscale_method", "COMBO", choices=MAX_DIMENSION_METHODS),
                Input("largest_size", "INT", 512, 0, SIDE_MAX, 1),
            ),
            ("IMAGE",),
            image_scale_to_max_dimension,
            description="Scaled (no crop) so that its longer side is `largest_size`, the other at the aspect "
            "(rounded); a side of 0 pixels, or one over the server's side limit, fails.",
        ),
        NodeDef(
            "ImageAddNoise",
            "Add Noise to Image",
            "image",
            (
                Input("image", "IMAGE"),
                Input("seed", "INT", 0, 0, MAX_SEED, 1, tooltip="The random seed used for creating the noise."),
                Input("strength", "FLOAT", 0.5, 0.0, 1.0, 0.01),
            ),
            ("IMAGE",),
            image_add_noise,
            description="strength times normal noise (CPU generator seeded with `seed`, as ComfyUI's) added, "
            "clamped to [0, 1].",
        ),
        NodeDef(
            "ResizeAndPadImage",
            "Resize and Pad Image",
            "image/transform",
            (
                Input("image", "IMAGE"),
                Input("target_width", "INT", 512, 1, SIDE_MAX, 1),
                Input("target_height", "INT", 512, 1, SIDE_MAX, 1),
                Input("padding_color", "COMBO", choices=PAD_COLORS),
                Input("interpolation", "COMBO", choices=PAD_METHODS),
            ),
            ("IMAGE",),
            resize_and_pad_image,
            description="Fitted inside target_width x target_height at its aspect (sides truncated) and centred on "
            "a white or black canvas; a canvas over the server's side limit fails.",
        ),
        NodeDef(
            "ImageStitch",
            "Stitch Images",
            "image/transform",
            (
                Input("image1", "IMAGE"),
                Input("direction", "COMBO", "right", choices=STITCH_DIRECTIONS),
                Input("match_image_size", "BOOLEAN", True),
                Input("spacing_width", "INT", 0, 0, 1024, 2),
                Input("spacing_color", "COMBO", "white", choices=tuple(STITCH_COLORS)),
                Input("image2", "IMAGE", optional=True),
            ),
            ("IMAGE",),
            image_stitch,
            description="image2 put to the `direction` of image1 (scaled to its height / width, or padded), with "
            "`spacing_width` of `spacing_color` between; the shorter batch repeats its last image.",
        ),
    )
}
