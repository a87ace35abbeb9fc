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
    )
}
