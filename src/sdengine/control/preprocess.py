"""ControlNet preprocessors: turn a photo into the map a ControlNet was trained on, with OpenCV/NumPy only.

Available: ``canny`` (Canny edges, ``low``/``high`` thresholds), ``scribble`` (dark strokes on a light
background -> white strokes on black), ``threshold`` (binarise at ``threshold``), ``softedge`` (Sobel
gradient magnitude of a blurred image, a model-free stand-in for HED/PiDiNet soft edges), ``invert``
(black-on-white line art -> white-on-black) and ``none`` (a map you prepared yourself: a depth map, a pose
drawing, a segmentation, a tile). The usual preprocessors listed in :data:`NEEDS_A_MODEL` (depth, openpose,
normal, HED, MLSD, lineart, segmentation) run neural networks whose weights cannot be had here: make those
maps with another tool and pass them with ``none``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import numpy as np
from PIL import Image

from sdengine.errors import ControlNetError
from sdengine.io.images import ImageInput, load_image
from sdengine.names import did_you_mean

ImageLike = ImageInput


def load_control_image(image: ImageLike) -> Image.Image:
    """Any supported input -> an RGB PIL image. Grayscale becomes RGB; transparency is composited onto
    black, which is "nothing here" for every control map (edges, scribbles and poses are drawn on black).
    A path that cannot be read raises ControlNetError naming it."""
    return load_image(image, "control image", mode="RGB", background=(0, 0, 0), error=ControlNetError)


def _gray(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L"), dtype=np.uint8)  # (H, W)


def _rgb(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(a[:, :, None], 3, axis=2).astype(np.uint8))


def canny(img: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges (Canny 1986) as white lines on black; ``low``/``high`` are the hysteresis thresholds
    (100/200 as in the ControlNet examples)."""
    import cv2

    if not 0 <= low <= high:
        raise ControlNetError(f"canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    return _rgb(cv2.Canny(np.asarray(img.convert("RGB")), float(low), float(high)))


def _gaussian_1d(size: int, sigma: float) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - size // 2
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return (g / g.sum()).astype(np.float32)


def _filter_separable(a: np.ndarray, kx: np.ndarray, ky: np.ndarray, pad: str) -> np.ndarray:
    """Correlate (H, W) ``a`` with the outer product ky x kx, the border padded by NumPy mode ``pad``."""
    r = len(kx) // 2
    p = np.pad(a, r, mode=pad)  # type: ignore[call-overload]
    h, w = a.shape
    rows = sum(k * p[:, i : i + w] for i, k in enumerate(kx))  # (H + 2r, W)
    return np.asarray(sum(k * rows[i : i + h] for i, k in enumerate(ky)), dtype=np.float32)


# The 8 neighbours (dy, dx), in the order of the gradient direction rounded to 45 degrees: 0 = +x (right),
# 1 = 45 degrees (+x, +y: down-right in image rows), ..., 7 = 315 degrees.
_DIRECTIONS = ((0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1))


def canny_fractions(
    image: np.ndarray, low: float = 0.4, high: float = 0.8, *, kernel_size: int = 5, sigma: float = 1.0
) -> np.ndarray:
    """Canny edges as ComfyUI's ``Canny`` node makes them (it calls ``kornia.filters.canny``), a bool (H, W)
    map. ``image``: float (H, W) grey or (H, W, 3) RGB in [0, 1] (grey = 0.299 R + 0.587 G + 0.114 B).
    The steps: a ``kernel_size`` Gaussian blur of ``sigma`` (mirrored border), unnormalised 3x3 Sobel
    gradients (replicated border), magnitude sqrt(gx^2 + gy^2 + 1e-6) (the L2 norm, 0 to 4 on an image in
    0..1; a sharp black-to-white step, blurred, about 2.6), non-maximum suppression along the direction
    rounded to 45 degrees (strictly greater than both neighbours; outside the image counts as 0), then
    hysteresis: a pixel above ``high`` is an edge, one above ``low`` is an edge when 8-connected to one.
    ``low``/``high`` are therefore on that magnitude scale, with 0 < low <= high < 1 as kornia requires;
    OpenCV's :func:`canny` (thresholds 0..255, the L1 norm, no blur) is another algorithm."""
    import cv2

    if not (math.isfinite(low) and math.isfinite(high)) or not 0 < low <= high < 1:
        raise ControlNetError(f"canny thresholds must satisfy 0 < low <= high < 1, got low={low}, high={high}")
    a = np.asarray(image, dtype=np.float32)
    if a.ndim == 3 and a.shape[2] == 3:
        a = a[..., 0] * np.float32(0.299) + a[..., 1] * np.float32(0.587) + a[..., 2] * np.float32(0.114)
    elif a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim != 2:
        raise ControlNetError(f"canny takes a grey (H, W) or RGB (H, W, 3) image, got shape {tuple(image.shape)}")
    if kernel_size % 2 != 1 or kernel_size < 1 or sigma <= 0:
        raise ControlNetError(f"canny blur: kernel_size must be odd and sigma > 0, got {kernel_size}, {sigma}")
    if min(a.shape) <= kernel_size // 2:  # the mirrored border needs more pixels than the kernel's radius
        raise ControlNetError(f"canny: an image of {a.shape[1]}x{a.shape[0]} is too small for a {kernel_size} blur")
    g = _gaussian_1d(kernel_size, sigma)
    blurred = _filter_separable(a, g, g, "reflect")
    deriv, smooth = np.array([-1, 0, 1], np.float32), np.array([1, 2, 1], np.float32)
    gx = _filter_separable(blurred, deriv, smooth, "edge")
    gy = _filter_separable(blurred, smooth, deriv, "edge")
    mag = np.sqrt(gx * gx + gy * gy + np.float32(1e-6))
    direction = np.round(np.arctan2(gy, gx) * np.float32(4 / math.pi)).astype(np.int64) % 8
    h, w = mag.shape
    padded = np.pad(mag, 1)  # zeros outside the image
    neighbour = np.stack([padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _DIRECTIONS])
    ahead = np.take_along_axis(neighbour, direction[None], 0)[0]
    behind = np.take_along_axis(neighbour, ((direction + 4) % 8)[None], 0)[0]
    thin = np.where((mag > ahead) & (mag > behind), mag, np.float32(0))
    weak, strong = thin > low, thin > high
    n, labels = cv2.connectedComponents(weak.astype(np.uint8), connectivity=8)
    keep = np.zeros(n, bool)
    keep[np.unique(labels[strong])] = True
    keep[0] = False  # the background
    return np.asarray(keep[labels] & weak)


def threshold(img: Image.Image, threshold: float = 127) -> Image.Image:
    """Binarise as A1111's ControlNet extension's ``threshold`` does: a pixel whose every channel is above
    ``threshold`` (0..255), i.e. min(R, G, B) > threshold, becomes white, the rest black (a saturated colour
    such as yellow is black; grey pixels compare their grey level)."""
    low = np.asarray(img.convert("RGB"), dtype=np.uint8).min(axis=2)
    return _rgb(np.where(low > threshold, 255, 0))


def scribble(img: Image.Image, threshold: float = 127) -> Image.Image:
    """A hand drawing -> white strokes on black, what the scribble ControlNets take. Strokes are whatever
    differs from the background: dark strokes on a light page are inverted, light on dark kept."""
    g = _gray(img)
    if np.median(g) > 127:  # a light page
        g = 255 - g
    return _rgb(np.where(g > 255 - threshold, 255, 0))


def softedge(img: Image.Image, blur: float = 1.5) -> Image.Image:
    """Soft edges: Sobel gradient magnitude of the Gaussian-blurred image, scaled to 0..255 (a model-free
    stand-in for HED/PiDiNet, which are networks)."""
    import cv2

    g = _gray(img).astype(np.float32) / 255.0
    if blur > 0:
        g = np.asarray(cv2.GaussianBlur(g, (0, 0), blur), dtype=np.float32)
    gx = cv2.Sobel(g, cv2.CV_32F, 1, 0, ksize=3)
    gy = cv2.Sobel(g, cv2.CV_32F, 0, 1, ksize=3)
    mag = np.sqrt(gx * gx + gy * gy)
    peak = float(mag.max())
    if peak > 0:
        mag = mag / peak
    return _rgb(np.round(mag * 255.0))


def invert(img: Image.Image) -> Image.Image:
    """255 - pixel: black-on-white line art becomes the white-on-black the line-art ControlNets expect."""
    return Image.fromarray(255 - np.asarray(img.convert("RGB"), dtype=np.uint8))


def identity(img: Image.Image) -> Image.Image:
    return img


PREPROCESSORS: dict[str, Callable[..., Image.Image]] = {
    "canny": canny,
    "scribble": scribble,
    "threshold": threshold,
    "softedge": softedge,
    "invert": invert,
    "none": identity,
}

# Usual ControlNet preprocessors that are neural networks (weights not available offline here).
NEEDS_A_MODEL: dict[str, str] = {
    "depth": "MiDaS / ZoeDepth / Depth Anything depth estimation",
    "openpose": "OpenPose body/hand/face keypoint networks",
    "normal": "BAE / NormalBae normal estimation",
    "hed": "HED edge network (softedge uses Sobel instead)",
    "pidinet": "PiDiNet edge network (softedge uses Sobel instead)",
    "mlsd": "M-LSD line-segment network",
    "lineart": "the lineart / lineart_anime networks (use invert on drawn line art)",
    "seg": "UperNet / OneFormer semantic segmentation",
}


def preprocess(kind: str, image: ImageLike, **options: float) -> Image.Image:
    """The control map for ``image`` (RGB PIL) by preprocessor ``kind`` (see :data:`PREPROCESSORS`)."""
    if kind not in PREPROCESSORS:
        raise ControlNetError(unknown_type_message(kind))
    return PREPROCESSORS[kind](load_control_image(image), **options)


def unknown_type_message(kind: str) -> str:
    """The one-line error for a control type that is not in :data:`PREPROCESSORS`."""
    valid = ", ".join(PREPROCESSORS)
    if kind in NEEDS_A_MODEL:
        return (
            f"control type {kind!r} needs a model that is not available here ({NEEDS_A_MODEL[kind]}): "
            f"make the map with another tool and use type 'none'; valid types: {valid}"
        )
    guess = did_you_mean(kind, [*PREPROCESSORS, *NEEDS_A_MODEL])
    return (
        f"unknown control type {kind!r}{guess} (valid types: {valid})"
        if guess
        else (f"unknown control type {kind!r}; valid types: {valid}")
    )


def option_names(kind: str) -> set[str]:
    """The options (keyword names) preprocessor ``kind`` takes, e.g. {"low", "high"} for canny."""
    return set(list(inspect.signature(PREPROCESSORS[kind]).parameters)[1:])


def option_defaults(kind: str) -> dict[str, float]:
    """The options preprocessor ``kind`` runs with when none is given, e.g. {"low": 100, "high": 200} for canny."""
    params = list(inspect.signature(PREPROCESSORS[kind]).parameters.values())[1:]
    return {p.name: float(p.default) for p in params}


def processor_resize(image: Image.Image, res: int) -> Image.Image:
    """The control image scaled so that its short side is ``res``, as A1111's ControlNet extension's preprocessors
    take it (its ``processor_res``; ``resize_image_with_pad``: OpenCV's cubic up, area down; each side rounded)."""
    import cv2

    w, h = image.size
    k = res / min(w, h)
    if k == 1:
        return image
    size = (round(w * k), round(h * k))
    how = cv2.INTER_CUBIC if k > 1 else cv2.INTER_AREA
    return Image.fromarray(cv2.resize(np.asarray(image.convert("RGB")), size, interpolation=how))


def pixel_perfect_resolution(size: tuple[int, int], width: int, height: int, fill: bool = False) -> int:
    """A1111's ControlNet extension's "Pixel Perfect" resolution: the short side to scale an image of ``size``
    (w, h) to before its preprocessor so that it maps onto the ``width`` x ``height`` output one pixel to one: its
    short side times the larger of the two scale factors (the smaller when the unit's resize mode is "Resize and
    Fill", ``fill``), rounded half to even as NumPy's round. The extension gives it the output's size rounded down
    to a multiple of 8 (the first pass's, with the hires fix)."""
    w, h = size
    if min(w, h, width, height) <= 0:
        raise ControlNetError(f"pixel perfect: sizes must be positive, got an image of {w}x{h} for {width}x{height}")
    k_h, k_w = float(height) / float(h), float(width) / float(w)
    k = min(k_h, k_w) if fill else max(k_h, k_w)
    return max(1, round(k * float(min(w, h))))


__all__ = [
    "NEEDS_A_MODEL",
    "PREPROCESSORS",
    "canny",
    "canny_fractions",
    "identity",
    "invert",
    "load_control_image",
    "option_defaults",
    "option_names",
    "pixel_perfect_resolution",
    "processor_resize",
    "preprocess",
    "scribble",
    "softedge",
    "threshold",
    "unknown_type_message",
]
