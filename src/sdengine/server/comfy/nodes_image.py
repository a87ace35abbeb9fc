"""ComfyUI's everyday image and mask utility nodes: blend, blur, sharpen, quantize, scale to a pixel count, flip,
rotate, batch picking, alpha split / join, Porter-Duff compositing, and the mask threshold, crop and colour key.

Each follows the ComfyUI node of the same name (its inputs, defaults, ranges, category and arithmetic: ComfyUI's
``comfy_extras/nodes_post_processing.py``, ``nodes_images.py``, ``nodes_mask.py`` and ``nodes_compositing.py``),
written here from that description. IMAGE is float (B, H, W, C) in [0, 1], C = 3 (RGB) or 4 (RGBA, what
JoinImageWithAlpha makes); MASK is float (B, H, W). Where ComfyUI fails with a tensor error or silently drops rows
(mismatched batches), a node here says so in one line (see docs/CONTRACTS.md).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdengine.server.comfy.nodes import (
    SIDE_MAX,
    Input,
    NodeDef,
    NodeError,
    RunContext,
    image_scale,
    repeat_to_batch,
    resize_nchw,
)

BLEND_MODES = ("normal", "multiply", "screen", "overlay", "soft_light", "difference")
DITHERS = ("none", "floyd-steinberg", "bayer-2", "bayer-4", "bayer-8", "bayer-16")
TOTAL_PIXELS_METHODS = ("nearest-exact", "bilinear", "area", "bicubic", "lanczos")
ROTATIONS = ("none", "90 degrees", "180 degrees", "270 degrees")
FLIPS = ("x-axis: vertically", "y-axis: horizontally")
# ComfyUI's PorterDuffMode, in its order (the combo lists them so; DST is the default)
PORTER_DUFF_MODES = (
    "ADD",
    "CLEAR",
    "DARKEN",
    "DST",
    "DST_ATOP",
    "DST_IN",
    "DST_OUT",
    "DST_OVER",
    "LIGHTEN",
    "MULTIPLY",
    "OVERLAY",
    "SCREEN",
    "SRC",
    "SRC_ATOP",
    "SRC_IN",
    "SRC_OUT",
    "SRC_OVER",
    "XOR",
)


def _image(image: torch.Tensor, node: str, what: str = "image") -> torch.Tensor:
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise NodeError(f"{node}: {what} must be an IMAGE (B, H, W, 3 or 4), got shape {tuple(image.shape)}")
    return image.float()


def _mask3(mask: torch.Tensor) -> torch.Tensor:
    return mask.float().reshape(-1, mask.shape[-2], mask.shape[-1])


def _match_channels(image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
    """ComfyUI's image_alpha_fix for two images: ``image2`` cut to ``image1``'s channels, or given an opaque alpha."""
    if image2.shape[-1] > image1.shape[-1]:
        return image2[..., : image1.shape[-1]]
    if image2.shape[-1] < image1.shape[-1]:
        return torch.cat([image2, torch.ones_like(image2[..., :1])], dim=-1)
    return image2


def _resized_like(x: torch.Tensor, h: int, w: int, method: str) -> torch.Tensor:
    """(B, H, W, C) resized to h x w by ComfyUI's common_upscale with a centre crop to the target's aspect."""
    if tuple(x.shape[1:3]) == (h, w):
        return x
    return resize_nchw(x.movedim(-1, 1), w, h, method, "center").movedim(1, -1)


def _pair_batches(a: torch.Tensor, b: torch.Tensor, node: str, names: tuple[str, str]) -> tuple[int, int]:
    """The batch of a row-by-row result of ``a`` and ``b``: equal batches, or one of them a single row that every
    row of the other takes (ComfyUI broadcasts one row and fails on other mismatches)."""
    na, nb = a.shape[0], b.shape[0]
    if na != nb and 1 not in (na, nb):
        raise NodeError(
            f"{node}: {names[0]} has {na} rows and {names[1]} {nb}; give batches of the same size, or one row"
        )
    return na, nb


# ---------------------------------------------------------------------------------------------- filters


def image_blend(
    ctx: RunContext, image1: torch.Tensor, image2: torch.Tensor, blend_factor: float, blend_mode: str
) -> tuple[Any]:
    """ComfyUI's ImageBlend: ``image1 * (1 - f) + mode(image1, image2) * f``, clamped to [0, 1]; ``image2`` first
    scaled (bicubic, cut to the aspect around its centre) to ``image1``'s size when the sizes differ."""
    a, b = _image(image1, "ImageBlend", "image1"), _image(image2, "ImageBlend", "image2")
    b = _match_channels(a, b)
    _pair_batches(a, b, "ImageBlend", ("image1", "image2"))
    b = _resized_like(b, a.shape[1], a.shape[2], "bicubic")
    if blend_mode == "normal":
        mixed = b
    elif blend_mode == "multiply":
        mixed = a * b
    elif blend_mode == "screen":
        mixed = 1 - (1 - a) * (1 - b)
    elif blend_mode == "overlay":
        mixed = torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    elif blend_mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a.clamp(min=0)))
        mixed = torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    elif blend_mode == "difference":
        mixed = a - b  # ComfyUI's "difference": the plain difference, negative parts clamped to 0 below
    else:
        raise NodeError(f"ImageBlend: unknown blend_mode {blend_mode!r}")
    f = float(blend_factor)
    return ((a * (1 - f) + mixed * f).clamp(0, 1).contiguous(),)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """ComfyUI's blur kernel: exp(-d^2 / (2 sigma^2)) on a ``size`` x ``size`` grid spanning [-1, 1] on both axes
    (sigma in units of the kernel's half width, whatever the radius), normalised to sum 1."""
    t = torch.linspace(-1, 1, size)
    d2 = t[:, None] ** 2 + t[None, :] ** 2
    g = torch.exp(-d2 / (2.0 * sigma * sigma))
    return g / g.sum()


def _filter(image: torch.Tensor, kernel: torch.Tensor, radius: int, node: str) -> torch.Tensor:
    """Each channel convolved with ``kernel`` over the image mirrored (reflect) ``radius`` pixels past its edges."""
    _, h, w, c = image.shape
    if radius >= h or radius >= w:
        raise NodeError(f"{node}: a radius of {radius} needs an image larger than {radius} pixels a side, got {w}x{h}")
    x = F.pad(image.movedim(-1, 1), (radius, radius, radius, radius), mode="reflect")
    k = kernel.to(x.dtype).expand(c, 1, *kernel.shape).contiguous()
    return F.conv2d(x, k, groups=c).movedim(1, -1).contiguous()


def image_blur(ctx: RunContext, image: torch.Tensor, blur_radius: int, sigma: float) -> tuple[Any]:
    """ComfyUI's ImageBlur: a (2r + 1)-wide Gaussian (:func:`gaussian_kernel`) over the reflect-padded image."""
    x = _image(image, "ImageBlur")
    r = int(blur_radius)
    if r == 0:
        return (x,)
    return (_filter(x, gaussian_kernel(2 * r + 1, float(sigma)), r, "ImageBlur"),)


def image_sharpen(ctx: RunContext, image: torch.Tensor, sharpen_radius: int, sigma: float, alpha: float) -> tuple[Any]:
    """ComfyUI's ImageSharpen: the Gaussian kernel times -10 alpha, its centre raised so that the kernel sums to 1
    (the image plus 10 alpha times its difference from the blurred image), reflect-padded, clamped to [0, 1]."""
    x = _image(image, "ImageSharpen")
    r = int(sharpen_radius)
    if r == 0:
        return (x,)
    k = gaussian_kernel(2 * r + 1, float(sigma)) * -(float(alpha) * 10)
    k[r, r] = k[r, r] - k.sum() + 1.0
    return (_filter(x, k, r, "ImageSharpen").clamp(0, 1),)


def bayer_matrix(order: int) -> np.ndarray:
    """The normalised Bayer matrix of side ``order`` (a power of 2) as ComfyUI's ordered dither builds it: M_0 = 0,
    M_n = [[m - 1.5, m + 0.5], [m + 1.5, m - 0.5]] / 4^n with m = 4^n M_(n-1)."""
    m = np.zeros((1, 1))
    for n in range(1, int(math.log2(order)) + 1):
        q = 4**n
        prev = q * m
        m = np.block([[prev - 1.5, prev + 0.5], [prev + 1.5, prev - 0.5]]) / q
    return m


def _quantize_row(rgb: np.ndarray, colors: int, dither: str) -> np.ndarray:
    im = Image.fromarray(rgb)
    palette = im.quantize(colors=colors)  # the palette first (median cut), then the image mapped onto it
    if dither == "none":
        out = im.quantize(palette=palette, dither=Image.Dither.NONE)
    elif dither == "floyd-steinberg":
        out = im.quantize(palette=palette, dither=Image.Dither.FLOYDSTEINBERG)
    else:  # bayer-N: the matrix (spread over 2 * 256 / palette size levels) added, then the nearest colour
        n_colors = len(palette.getpalette() or []) // 3
        threshold = (2 * 256 / max(1, n_colors)) * bayer_matrix(int(dither.split("-")[1])) + 0.5
        h, w = rgb.shape[:2]
        tiled = np.tile(threshold, (math.ceil(h / threshold.shape[0]), math.ceil(w / threshold.shape[1])))[:h, :w]
        biased = np.clip(rgb.astype(np.float32) + tiled[..., None].astype(np.float32), 0, 255).astype(np.uint8)
        out = Image.fromarray(biased).quantize(palette=palette, dither=Image.Dither.NONE)
    return np.asarray(out.convert("RGB"))


def image_quantize(ctx: RunContext, image: torch.Tensor, colors: int, dither: str) -> tuple[Any]:
    """ComfyUI's ImageQuantize: each image's 8-bit colours (truncated, x * 255 -> uint8) reduced to a palette of
    ``colors`` (PIL's median cut), mapped onto it without dither, with Floyd-Steinberg, or with an ordered Bayer
    dither. An RGBA image keeps its alpha (ComfyUI's node takes RGB only)."""
    x = _image(image, "ImageQuantize")
    if dither not in DITHERS:
        raise NodeError(f"ImageQuantize: unknown dither {dither!r}")
    rows = (x[..., :3].clamp(0, 1) * 255).to(torch.uint8).cpu().numpy()
    out = np.stack([_quantize_row(np.ascontiguousarray(r), int(colors), dither) for r in rows])
    q = torch.from_numpy(out.astype(np.float32) / 255.0)
    if x.shape[-1] == 4:
        q = torch.cat([q, x[..., 3:]], dim=-1)
    return (q,)


def image_scale_to_total_pixels(
    ctx: RunContext, image: torch.Tensor, upscale_method: str, megapixels: float, resolution_steps: int = 1
) -> tuple[Any]:
    """ComfyUI's ImageScaleToTotalPixels: scaled by sqrt(megapixels * 1024^2 / (w h)), each side rounded to a
    multiple of ``resolution_steps`` (Python's round, as ComfyUI), no crop."""
    x = _image(image, "ImageScaleToTotalPixels")
    h0, w0 = x.shape[1], x.shape[2]
    s = math.sqrt(float(megapixels) * 1024 * 1024 / (w0 * h0))
    step = int(resolution_steps)
    w, h = round(w0 * s / step) * step, round(h0 * s / step) * step
    if w < 1 or h < 1:
        raise NodeError(
            f"ImageScaleToTotalPixels: {megapixels} megapixels in steps of {step} leaves {w}x{h} for a {w0}x{h0} image"
        )
    if x.shape[-1] == 4 and upscale_method == "lanczos":  # PIL's Lanczos path is RGB: the alpha scaled on its own
        (rgb,) = image_scale(ctx, x[..., :3], upscale_method, w, h, "disabled")
        (alpha,) = image_scale(ctx, x[..., 3:].expand(-1, -1, -1, 3), upscale_method, w, h, "disabled")
        return (torch.cat([rgb, alpha[..., :1]], dim=-1),)
    return image_scale(ctx, x, upscale_method, w, h, "disabled")


# ---------------------------------------------------------------------------------------- transforms


def image_flip(ctx: RunContext, image: torch.Tensor, flip_method: str) -> tuple[Any]:
    """ComfyUI's ImageFlip: "x-axis" flips top to bottom, "y-axis" left to right."""
    x = _image(image, "ImageFlip")
    return (torch.flip(x, dims=[1] if flip_method.startswith("x") else [2]).contiguous(),)


def image_rotate(ctx: RunContext, image: torch.Tensor, rotation: str) -> tuple[Any]:
    """ComfyUI's ImageRotate: quarter turns clockwise (torch.rot90 from the width axis to the height axis)."""
    x = _image(image, "ImageRotate")
    k = ROTATIONS.index(rotation)
    return (torch.rot90(x, k=k, dims=[2, 1]).contiguous(),)


# --------------------------------------------------------------------------------------------- batches


def repeat_image_batch(ctx: RunContext, image: torch.Tensor, amount: int) -> tuple[Any]:
    """ComfyUI's RepeatImageBatch: the batch ``amount`` times over (the server's batch limit applies)."""
    x = _image(image, "RepeatImageBatch")
    b, h, w, _ = x.shape
    ctx.check_size(w, h, b * int(amount))
    return (x.repeat(int(amount), 1, 1, 1),)


def image_from_batch(ctx: RunContext, image: torch.Tensor, batch_index: int, length: int) -> tuple[Any]:
    """ComfyUI's ImageFromBatch: ``length`` rows from ``batch_index`` on (a negative index counts from the end;
    both cut to the batch)."""
    x = _image(image, "ImageFromBatch")
    b = x.shape[0]
    i = int(batch_index)
    if i < 0:
        i += b
    i = max(0, min(b - 1, i))
    n = min(b - i, int(length))
    return (x[i : i + n].clone(),)


# ------------------------------------------------------------------------------------------------ alpha


def split_image_with_alpha(ctx: RunContext, image: torch.Tensor) -> tuple[Any, Any]:
    """ComfyUI's SplitImageWithAlpha: the colour, and the MASK 1 - alpha (0 everywhere for an RGB image)."""
    x = _image(image, "SplitImageWithAlpha")
    alpha = x[..., 3] if x.shape[-1] == 4 else torch.ones_like(x[..., 0])
    return x[..., :3].contiguous(), (1.0 - alpha).contiguous()


def _resize_mask(mask: torch.Tensor, h: int, w: int) -> torch.Tensor:
    m = _mask3(mask)
    if tuple(m.shape[1:]) == (h, w):
        return m
    return F.interpolate(m[:, None], size=(h, w), mode="bilinear")[:, 0]


def join_image_with_alpha(ctx: RunContext, image: torch.Tensor, alpha: torch.Tensor) -> tuple[Any]:
    """ComfyUI's JoinImageWithAlpha: an RGBA image, its alpha 1 - the MASK (bilinearly resized to the image). One
    mask row serves every image (ComfyUI keeps only as many rows as the shorter batch: refused here)."""
    x = _image(image, "JoinImageWithAlpha")
    m = _mask3(alpha)
    na, nb = _pair_batches(x, m, "JoinImageWithAlpha", ("image", "alpha"))
    if nb > na:
        raise NodeError(f"JoinImageWithAlpha: {nb} alpha masks for {na} images")
    a = repeat_to_batch(1.0 - _resize_mask(m, x.shape[1], x.shape[2]), na)
    return (torch.cat([x[..., :3], a[..., None]], dim=-1).contiguous(),)


def porter_duff(src: torch.Tensor, src_a: torch.Tensor, dst: torch.Tensor, dst_a: torch.Tensor, mode: str) -> Any:
    """The Porter-Duff operator ``mode`` on alpha-premultiplied colours (``src_a`` / ``dst_a`` the alphas, not
    masks); returns the un-premultiplied colour (0 where the alpha is under 1e-5) clamped to [0, 1], and alpha."""
    sa, da = src_a, dst_a
    s, d = src * sa, dst * da
    union = sa + da - sa * da
    if mode == "ADD":
        a, c = (sa + da).clamp(0, 1), (s + d).clamp(0, 1)
    elif mode == "CLEAR":
        a, c = torch.zeros_like(da), torch.zeros_like(d)
    elif mode == "DARKEN":
        a, c = union, (1 - da) * s + (1 - sa) * d + torch.minimum(s, d)
    elif mode == "DST":
        a, c = da, d
    elif mode == "DST_ATOP":
        a, c = sa, sa * d + (1 - da) * s
    elif mode == "DST_IN":
        a, c = sa * da, d * sa
    elif mode == "DST_OUT":
        a, c = (1 - sa) * da, (1 - sa) * d
    elif mode == "DST_OVER":
        a, c = da + (1 - da) * sa, d + (1 - da) * s
    elif mode == "LIGHTEN":
        a, c = union, (1 - da) * s + (1 - sa) * d + torch.maximum(s, d)
    elif mode == "MULTIPLY":
        a, c = sa * da, s * d
    elif mode == "OVERLAY":
        a, c = union, torch.where(2 * d < da, 2 * s * d, sa * da - 2 * (da - s) * (sa - d))
    elif mode == "SCREEN":
        a, c = union, s + d - s * d
    elif mode == "SRC":
        a, c = sa, s
    elif mode == "SRC_ATOP":
        a, c = da, da * s + (1 - sa) * d
    elif mode == "SRC_IN":
        a, c = sa * da, s * da
    elif mode == "SRC_OUT":
        a, c = (1 - da) * sa, (1 - da) * s
    elif mode == "SRC_OVER":
        a, c = sa + (1 - sa) * da, s + (1 - sa) * d
    elif mode == "XOR":
        a, c = (1 - da) * sa + (1 - sa) * da, (1 - da) * s + (1 - sa) * d
    else:
        raise NodeError(f"PorterDuffImageComposite: unknown mode {mode!r}")
    c = torch.where(a > 1e-5, c / torch.where(a > 1e-5, a, torch.ones_like(a)), torch.zeros_like(c))
    return c.clamp(0, 1), a


def porter_duff_image_composite(
    ctx: RunContext,
    source: torch.Tensor,
    source_alpha: torch.Tensor,
    destination: torch.Tensor,
    destination_alpha: torch.Tensor,
    mode: str,
) -> tuple[Any, Any]:
    """ComfyUI's PorterDuffImageComposite: ``source`` (alpha 1 - ``source_alpha``) composited with ``destination``
    (alpha 1 - ``destination_alpha``) by the Porter-Duff ``mode``; returns the image and its MASK (1 - alpha). The
    destination's alpha is scaled to the destination, the source and its alpha to them (bicubic, centre cut).
    A batch of one row serves every row (ComfyUI keeps only as many rows as the shortest input: refused here)."""
    src, dst = _image(source, "PorterDuffImageComposite", "source"), _image(destination, "PorterDuffImageComposite")
    if src.shape[-1] != dst.shape[-1]:
        raise NodeError(
            f"PorterDuffImageComposite: source has {src.shape[-1]} channels and destination {dst.shape[-1]}"
        )
    sm, dm = _mask3(source_alpha), _mask3(destination_alpha)
    counts = {"source": src.shape[0], "source_alpha": sm.shape[0], "destination": dst.shape[0]}
    counts["destination_alpha"] = dm.shape[0]
    n = max(counts.values())
    if any(v not in (1, n) for v in counts.values()):
        rows = ", ".join(f"{k} {v}" for k, v in counts.items())
        raise NodeError(f"PorterDuffImageComposite: rows {rows}; give batches of the same size, or one row")
    h, w = dst.shape[1], dst.shape[2]
    da = _resized_like(1 - dm[..., None], h, w, "bicubic")
    src = _resized_like(src, h, w, "bicubic")
    sa = _resized_like(1 - sm[..., None], da.shape[1], da.shape[2], "bicubic")
    src, sa, dst, da = (repeat_to_batch(t, n) for t in (src, sa, dst, da))
    image, alpha = porter_duff(src, sa, dst, da, mode)
    return image.contiguous(), (1 - alpha[..., 0]).contiguous()


# ------------------------------------------------------------------------------------------------ masks


def threshold_mask(ctx: RunContext, mask: torch.Tensor, value: float) -> tuple[Any]:
    """ComfyUI's ThresholdMask: 1 where the mask is over ``value``, else 0."""
    return ((mask.float() > float(value)).float(),)


def crop_mask(ctx: RunContext, mask: torch.Tensor, x: int, y: int, width: int, height: int) -> tuple[Any]:
    """ComfyUI's CropMask: the box at (x, y), cut to the mask; a box wholly outside the mask is refused."""
    m = _mask3(mask)
    x, y = int(x), int(y)
    out = m[:, y : y + int(height), x : x + int(width)]
    if out.shape[1] == 0 or out.shape[2] == 0:
        raise NodeError(f"CropMask: the box at ({x}, {y}) lies outside the {m.shape[2]}x{m.shape[1]} mask")
    return (out.contiguous(),)


def image_color_to_mask(ctx: RunContext, image: torch.Tensor, color: int) -> tuple[Any]:
    """ComfyUI's ImageColorToMask: 1 where the pixel's 8-bit colour (rounded) is ``color`` (0xRRGGBB), else 0."""
    x = _image(image, "ImageColorToMask")
    v = (x[..., :3].clamp(0, 1) * 255.0).round().to(torch.int64)
    packed = (v[..., 0] << 16) + (v[..., 1] << 8) + v[..., 2]
    return ((packed == int(color)).float(),)


# ------------------------------------------------------------------------------------------------ table


def _int(name: str, default: int, lo: int, hi: int, **kw: Any) -> Input:
    return Input(name, "INT", default, lo, hi, 1, **kw)


def _float(name: str, default: float, lo: float, hi: float, step: float = 0.01) -> Input:
    return Input(name, "FLOAT", default, lo, hi, step)


IMAGE_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "ImageBlend",
            "Image Blend",
            "image/postprocessing",
            (
                Input("image1", "IMAGE"),
                Input("image2", "IMAGE"),
                _float("blend_factor", 0.5, 0.0, 1.0),
                Input("blend_mode", "COMBO", choices=BLEND_MODES),
            ),
            ("IMAGE",),
            image_blend,
            description="image1 * (1 - blend_factor) + mode(image1, image2) * blend_factor, clamped, as ComfyUI; "
            "image2 is scaled (bicubic, centre cut) to image1's size; one row of either serves every row.",
        ),
        NodeDef(
            "ImageBlur",
            "Image Blur",
            "image/postprocessing",
            (Input("image", "IMAGE"), _int("blur_radius", 1, 1, 31), _float("sigma", 1.0, 0.1, 10.0, 0.1)),
            ("IMAGE",),
            image_blur,
            description="ComfyUI's Gaussian blur: a (2 radius + 1)-wide kernel on a [-1, 1] grid (sigma in kernel "
            "half-widths), over the image mirrored at its edges.",
        ),
        NodeDef(
            "ImageSharpen",
            "Image Sharpen",
            "image/postprocessing",
            (
                Input("image", "IMAGE"),
                _int("sharpen_radius", 1, 1, 31),
                _float("sigma", 1.0, 0.1, 10.0),
                _float("alpha", 1.0, 0.0, 5.0),
            ),
            ("IMAGE",),
            image_sharpen,
            description="The image plus 10 alpha times its difference from ImageBlur's blur, clamped, as ComfyUI.",
        ),
        NodeDef(
            "ImageQuantize",
            "Image Quantize",
            "image/postprocessing",
            (Input("image", "IMAGE"), _int("colors", 256, 1, 256), Input("dither", "COMBO", choices=DITHERS)),
            ("IMAGE",),
            image_quantize,
            description="Each image reduced to a palette of `colors` (PIL's median cut), without dither, with "
            "Floyd-Steinberg or an ordered Bayer dither, as ComfyUI.",
        ),
        NodeDef(
            "ImageScaleToTotalPixels",
            "Scale Image to Total Pixels",
            "image/upscaling",
            (
                Input("image", "IMAGE"),
                Input("upscale_method", "COMBO", choices=TOTAL_PIXELS_METHODS),
                _float("megapixels", 1.0, 0.01, 16.0),
                _int("resolution_steps", 1, 1, 256),
            ),
            ("IMAGE",),
            image_scale_to_total_pixels,
            description="Scaled to `megapixels` * 1024^2 pixels at its aspect, each side rounded to a multiple of "
            "`resolution_steps`, as ComfyUI; a result over the server's side limit fails.",
        ),
        NodeDef(
            "ImageFlip",
            "Flip Image",
            "image/transform",
            (Input("image", "IMAGE"), Input("flip_method", "COMBO", choices=FLIPS)),
            ("IMAGE",),
            image_flip,
        ),
        NodeDef(
            "ImageRotate",
            "Rotate Image",
            "image/transform",
            (Input("image", "IMAGE"), Input("rotation", "COMBO", choices=ROTATIONS)),
            ("IMAGE",),
            image_rotate,
            description="Quarter turns clockwise, as ComfyUI.",
        ),
        NodeDef(
            "RepeatImageBatch",
            "Repeat Image Batch",
            "image/batch",
            (Input("image", "IMAGE"), _int("amount", 1, 1, 4096)),
            ("IMAGE",),
            repeat_image_batch,
            description="The batch `amount` times over (up to the server's batch limit).",
        ),
        NodeDef(
            "ImageFromBatch",
            "Get Image from Batch",
            "image/batch",
            (Input("image", "IMAGE"), _int("batch_index", 0, -SIDE_MAX, SIDE_MAX), _int("length", 1, 1, 4096)),
            ("IMAGE",),
            image_from_batch,
            description="`length` rows from `batch_index` on (negative: from the end), cut to the batch.",
        ),
        NodeDef(
            "SplitImageWithAlpha",
            "Split Image with Alpha",
            "mask/compositing",
            (Input("image", "IMAGE"),),
            ("IMAGE", "MASK"),
            split_image_with_alpha,
            description="The colour and the MASK 1 - alpha (0 for an RGB image).",
        ),
        NodeDef(
            "JoinImageWithAlpha",
            "Join Image with Alpha",
            "mask/compositing",
            (Input("image", "IMAGE"), Input("alpha", "MASK")),
            ("IMAGE",),
            join_image_with_alpha,
            description="An RGBA image, its alpha 1 - the mask (bilinearly resized); SaveImage writes it as an "
            "RGBA PNG. One mask row serves every image; other mismatched batches fail.",
        ),
        NodeDef(
            "PorterDuffImageComposite",
            "Porter-Duff Image Composite",
            "mask/compositing",
            (
                Input("source", "IMAGE"),
                Input("source_alpha", "MASK"),
                Input("destination", "IMAGE"),
                Input("destination_alpha", "MASK"),
                Input("mode", "COMBO", "DST", choices=PORTER_DUFF_MODES),
            ),
            ("IMAGE", "MASK"),
            porter_duff_image_composite,
            description="The Porter-Duff operator on the images with alphas 1 - the masks, as ComfyUI; the result's "
            "MASK is 1 - its alpha. One row of an input serves every row; other mismatched batches fail.",
        ),
        NodeDef(
            "ThresholdMask",
            "ThresholdMask",
            "mask",
            (Input("mask", "MASK"), _float("value", 0.5, 0.0, 1.0)),
            ("MASK",),
            threshold_mask,
        ),
        NodeDef(
            "CropMask",
            "CropMask",
            "mask",
            (
                Input("mask", "MASK"),
                _int("x", 0, 0, SIDE_MAX),
                _int("y", 0, 0, SIDE_MAX),
                _int("width", 512, 1, SIDE_MAX),
                _int("height", 512, 1, SIDE_MAX),
            ),
            ("MASK",),
            crop_mask,
            description="The box at (x, y), cut to the mask (a box outside it fails).",
        ),
        NodeDef(
            "ImageColorToMask",
            "Image Color to Mask",
            "mask",
            (Input("image", "IMAGE"), Input("color", "INT", 0, 0, 0xFFFFFF, 1, display="number")),
            ("MASK",),
            image_color_to_mask,
            description="1 where the pixel's 8-bit colour is `color` (0xRRGGBB), else 0.",
        ),
    )
}
