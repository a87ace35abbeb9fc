"""ComfyUI's smaller tool nodes that shared workflows use and the other modules do not cover: the string nodes
(substring, length, case, trim, contains, compare, regular expressions), the image morphology and YUV split / join,
the mask and text previews, the image loader of the output folder, the latent concat / cut and latent operations
(Reinhard tonemap, sharpen), the OptimalSteps scheduler, ModelSamplingContinuousEDM where it restates an EDM
model's own sampling, and TorchCompileModel (the same model, run uncompiled).

Each follows the ComfyUI node of the same name (its inputs, defaults, ranges, category and arithmetic: ComfyUI's
``comfy_extras/nodes_string.py``, ``nodes_morphology.py``, ``nodes_mask.py``, ``nodes_latent.py``,
``nodes_optimalsteps.py``, ``nodes_model_advanced.py``, ``nodes_preview_any.py``, ``nodes_torch_compile.py``
and ``nodes.py``), written here
from that description. IMAGE is float (B, H, W, C) in [0, 1]; MASK is float (B, H, W); a LATENT is sdengine's dict
(see :mod:`nodes`; ``samples`` None is an empty latent, made once the model is known). Where ComfyUI answers a bad
input with a silent empty result (a regular expression that does not compile) or with a tensor error or a cut of the
wrong axis (``t`` on an image latent, which has no time axis), a node here says so in one line (docs/CONTRACTS.md).
"""

from __future__ import annotations

import json
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import regex as re  # Python's re with a time limit per call (a backtracking pattern cannot hold a worker)
import torch
import torch.nn.functional as F

from sdengine.server.comfy.nodes import (
    ANY_TYPE,
    IMAGE_SUFFIXES,
    Input,
    ModelHandle,
    NodeDef,
    NodeError,
    RunContext,
    Sigmas,
    annotated_image_exists,
    composite_latents,
    input_file_token,
    input_files,
    load_image,
    preview_image,
    repeat_to_batch,
    with_samples,
)
from sdengine.server.comfy.nodes_image import gaussian_kernel

CASE_MODES = ("UPPERCASE", "lowercase", "Capitalize", "Title Case")
TRIM_MODES = ("Both", "Left", "Right")
COMPARE_MODES = ("Starts With", "Ends With", "Equal")
EXTRACT_MODES = ("First Match", "All Matches", "First Group", "All Groups")
MORPHOLOGY_OPS = ("erode", "dilate", "open", "close", "gradient", "bottom_hat", "top_hat")
CONCAT_DIMS = ("x", "-x", "y", "-y", "t", "-t")
CUT_DIMS = ("x", "y", "t")
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION (LatentCut's index / amount range)
INT_RANGE = sys.maxsize  # an INT input ComfyUI gives no range (StringSubstring's start / end), as PrimitiveInt's

LatentOperation = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------- strings


def _text(value: Any, node: str, name: str) -> str:
    if not isinstance(value, str):
        raise NodeError(f"{node}: {name} must be a STRING, got {type(value).__name__}")
    return value


def string_substring(ctx: RunContext, string: str, start: int, end: int) -> tuple[Any]:
    """ComfyUI's StringSubstring: Python's ``string[start:end]`` (negative indices count from the end)."""
    return (_text(string, "StringSubstring", "string")[int(start) : int(end)],)


def string_length(ctx: RunContext, string: str) -> tuple[Any]:
    """ComfyUI's StringLength: the number of characters (code points)."""
    return (len(_text(string, "StringLength", "string")),)


def case_converter(ctx: RunContext, string: str, mode: str) -> tuple[Any]:
    """ComfyUI's CaseConverter: Python's upper(), lower(), capitalize() or title()."""
    s = _text(string, "CaseConverter", "string")
    ops = {"UPPERCASE": str.upper, "lowercase": str.lower, "Capitalize": str.capitalize, "Title Case": str.title}
    if mode not in ops:
        raise NodeError(f"CaseConverter: unknown mode {mode!r}; one of {', '.join(CASE_MODES)}")
    return (ops[mode](s),)


def string_trim(ctx: RunContext, string: str, mode: str) -> tuple[Any]:
    """ComfyUI's StringTrim: whitespace off both ends, the left or the right (Python's strip / lstrip / rstrip)."""
    s = _text(string, "StringTrim", "string")
    ops = {"Both": str.strip, "Left": str.lstrip, "Right": str.rstrip}
    if mode not in ops:
        raise NodeError(f"StringTrim: unknown mode {mode!r}; one of {', '.join(TRIM_MODES)}")
    return (ops[mode](s),)


def string_contains(ctx: RunContext, string: str, substring: str, case_sensitive: bool) -> tuple[Any]:
    """ComfyUI's StringContains: ``substring in string`` (both lower-cased unless ``case_sensitive``)."""
    s, sub = _text(string, "StringContains", "string"), _text(substring, "StringContains", "substring")
    if not case_sensitive:
        s, sub = s.lower(), sub.lower()
    return (sub in s,)


def string_compare(ctx: RunContext, string_a: str, string_b: str, mode: str, case_sensitive: bool) -> tuple[Any]:
    """ComfyUI's StringCompare: string_a starts with / ends with / equals string_b (lower-cased unless
    ``case_sensitive``)."""
    a, b = _text(string_a, "StringCompare", "string_a"), _text(string_b, "StringCompare", "string_b")
    if not case_sensitive:
        a, b = a.lower(), b.lower()
    if mode == "Equal":
        return (a == b,)
    if mode == "Starts With":
        return (a.startswith(b),)
    if mode == "Ends With":
        return (a.endswith(b),)
    raise NodeError(f"StringCompare: unknown mode {mode!r}; one of {', '.join(COMPARE_MODES)}")


def _flags(case_insensitive: bool, multiline: bool, dotall: bool) -> int:
    return (
        (re.IGNORECASE if case_insensitive else 0) | (re.MULTILINE if multiline else 0) | (re.DOTALL if dotall else 0)
    )


REGEX_SECONDS = 2.0  # the most one regex call of a node may take


def _timed(node: str, pattern: str, call: Any, *args: Any, **kw: Any) -> Any:
    """``call(*args, **kw)`` (a compiled pattern's search / findall / finditer / sub) stopped after
    :data:`REGEX_SECONDS`: a pattern that backtracks without end (``(a|aa)+$``) is a node error, not a held worker
    (ComfyUI's nodes have no limit)."""
    try:
        out = call(*args, timeout=REGEX_SECONDS, **kw)
        return list(out) if call.__name__ == "finditer" else out
    except TimeoutError:
        raise NodeError(
            f"{node}: regex_pattern {pattern!r} took over {REGEX_SECONDS:g} s on this string (a pattern that "
            "backtracks without end?)"
        ) from None


def _compile(pattern: Any, flags: int, node: str) -> Any:
    """The pattern compiled; one that does not compile is a node error (ComfyUI's RegexMatch / RegexExtract answer
    False / "" for it, a silent result that hides the typo)."""
    p = _text(pattern, node, "regex_pattern")
    try:
        return re.compile(p, flags)
    except re.error as e:
        raise NodeError(f"{node}: regex_pattern {p!r} is not a valid regular expression ({e})") from None


def regex_match(
    ctx: RunContext, string: str, regex_pattern: str, case_insensitive: bool, multiline: bool, dotall: bool
) -> tuple[Any]:
    """ComfyUI's RegexMatch: whether the pattern matches anywhere in the string (Python's re.search)."""
    rx = _compile(regex_pattern, _flags(case_insensitive, multiline, dotall), "RegexMatch")
    return (_timed("RegexMatch", rx.pattern, rx.search, _text(string, "RegexMatch", "string")) is not None,)


def regex_extract(
    ctx: RunContext,
    string: str,
    regex_pattern: str,
    mode: str,
    case_insensitive: bool,
    multiline: bool,
    dotall: bool,
    group_index: int,
) -> tuple[Any]:
    """ComfyUI's RegexExtract: "First Match" the first match's text; "All Matches" every match's text one a line (a
    pattern with groups: each match's first group, as re.findall gives them); "First Group" group ``group_index`` of
    the first match; "All Groups" that group of every match, one a line. No match, or fewer groups than
    ``group_index``: "" (a group that did not take part in its match counts as ""; ComfyUI's join fails there)."""
    rx = _compile(regex_pattern, _flags(case_insensitive, multiline, dotall), "RegexExtract")
    s, g = _text(string, "RegexExtract", "string"), int(group_index)
    if mode == "First Match":
        m = _timed("RegexExtract", rx.pattern, rx.search, s)
        return (m.group(0) if m else "",)
    if mode == "All Matches":
        found = _timed("RegexExtract", rx.pattern, rx.findall, s)
        return ("\n".join(f[0] if isinstance(f, tuple) else f for f in found),)
    if mode == "First Group":
        m = _timed("RegexExtract", rx.pattern, rx.search, s)
        return ((m.group(g) or "") if m and len(m.groups()) >= g else "",)
    if mode == "All Groups":
        every = _timed("RegexExtract", rx.pattern, rx.finditer, s)
        return ("\n".join(m.group(g) or "" for m in every if m.groups() and len(m.groups()) >= g),)
    raise NodeError(f"RegexExtract: unknown mode {mode!r}; one of {', '.join(EXTRACT_MODES)}")


def regex_replace(
    ctx: RunContext,
    string: str,
    regex_pattern: str,
    replace: str,
    case_insensitive: bool = True,
    multiline: bool = False,
    dotall: bool = False,
    count: int = 0,
) -> tuple[Any]:
    """ComfyUI's RegexReplace: Python's re.sub (``count`` 0: every match; backreferences such as ``\\1`` in
    ``replace``); a replacement that names a group the pattern lacks is a node error."""
    rx = _compile(regex_pattern, _flags(case_insensitive, multiline, dotall), "RegexReplace")
    s, rep = _text(string, "RegexReplace", "string"), _text(replace, "RegexReplace", "replace")
    try:
        return (_timed("RegexReplace", rx.pattern, rx.sub, rep, s, count=int(count)),)
    except (re.error, IndexError) as e:
        raise NodeError(f"RegexReplace: replace {rep!r} does not fit the pattern ({e})") from None


# ---------------------------------------------------------------------------------------------- images


def _image(image: Any, node: str, what: str = "image") -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in (3, 4):
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise NodeError(f"{node}: {what} must be an IMAGE (B, H, W, 3 or 4), got {shape}")
    return image.float()


def _dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    """The largest value over a k x k window (ComfyUI's max_pool2d, stride 1, padding k // 2 where the outside
    never wins), as two 1-D passes: the same maximum, k^2 -> 2k comparisons a pixel. An even ``k`` gives one more
    row and column than it takes, as ComfyUI's."""
    x = F.max_pool2d(x, (k, 1), stride=1, padding=(k // 2, 0))
    return F.max_pool2d(x, (1, k), stride=1, padding=(0, k // 2))


def _erode(x: torch.Tensor, k: int) -> torch.Tensor:
    return -_dilate(-x, k)


def morphology(ctx: RunContext, image: torch.Tensor, operation: str, kernel_size: int) -> tuple[Any]:
    """ComfyUI's Morphology (Apply Morphology): grey-scale erosion / dilation with a flat ``kernel_size`` square
    (each channel on its own, pixels outside the image never taken), opening (erode then dilate), closing, gradient
    (dilation - erosion), top hat (image - opening) and bottom hat (closing - image)."""
    x = _image(image, "Morphology").movedim(-1, 1)
    k = int(kernel_size)
    if k < 1:
        raise NodeError(f"Morphology: kernel_size must be 1 or more, got {k}")
    if operation == "erode":
        out = _erode(x, k)
    elif operation == "dilate":
        out = _dilate(x, k)
    elif operation == "open":
        out = _dilate(_erode(x, k), k)
    elif operation == "close":
        out = _erode(_dilate(x, k), k)
    elif operation == "gradient":
        out = _dilate(x, k) - _erode(x, k)
    elif operation in ("top_hat", "bottom_hat"):
        if k % 2 == 0:  # ComfyUI's opening / closing is one pixel larger there: its subtraction fails
            raise NodeError(f"Morphology: {operation} needs an odd kernel_size, got {k}")
        out = x - _dilate(_erode(x, k), k) if operation == "top_hat" else _erode(_dilate(x, k), k) - x
    else:
        raise NodeError(f"Morphology: unknown operation {operation!r}; one of {', '.join(MORPHOLOGY_OPS)}")
    return (out.movedim(1, -1).contiguous(),)


def image_rgb_to_yuv(ctx: RunContext, image: torch.Tensor) -> tuple[Any, Any, Any]:
    """ComfyUI's ImageRGBToYUV (kornia's rgb_to_ycbcr): Y = 0.299 R + 0.587 G + 0.114 B, U = (B - Y) 0.564 + 0.5,
    V = (R - Y) 0.713 + 0.5 (not clamped), each as a grey RGB image; an alpha channel is dropped."""
    x = _image(image, "ImageRGBToYUV")[..., :3]
    r, g, b = x.unbind(-1)
    y = 0.299 * r + 0.587 * g + 0.114 * b
    u = (b - y) * 0.564 + 0.5
    v = (r - y) * 0.713 + 0.5
    return tuple(c[..., None].expand(-1, -1, -1, 3).contiguous() for c in (y, u, v))  # type: ignore[return-value]


def image_yuv_to_rgb(ctx: RunContext, Y: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> tuple[Any]:  # noqa: N803
    """ComfyUI's ImageYUVToRGB (kornia's ycbcr_to_rgb): each input's mean over its RGB channels as Y, U, V, then
    R = Y + 1.403 (V - 0.5), G = Y - 0.714 (V - 0.5) - 0.344 (U - 0.5), B = Y + 1.773 (U - 0.5), clamped to [0, 1].
    The three must have one shape (ComfyUI's concatenation fails otherwise)."""
    planes = [_image(t, "ImageYUVToRGB", n)[..., :3].mean(dim=-1) for t, n in ((Y, "Y"), (U, "U"), (V, "V"))]
    if len({tuple(p.shape) for p in planes}) != 1:
        shapes = ", ".join(f"{n} {tuple(p.shape)}" for n, p in zip("YUV", planes, strict=True))
        raise NodeError(f"ImageYUVToRGB: Y, U and V must be images of one size and batch, got {shapes}")
    y, u, v = planes
    r = y + 1.403 * (v - 0.5)
    g = y - 0.714 * (v - 0.5) - 0.344 * (u - 0.5)
    b = y + 1.773 * (u - 0.5)
    return (torch.stack([r, g, b], dim=-1).clamp(0, 1),)


def mask_preview(ctx: RunContext, mask: torch.Tensor) -> dict[str, Any]:
    """ComfyUI's MaskPreview: each mask as a grey image, saved to the temp folder as PreviewImage does."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or mask.numel() == 0:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise NodeError(f"MaskPreview: mask must be a MASK (B, H, W), got {shape}")
    m = mask.float().reshape(-1, mask.shape[-2], mask.shape[-1]).clamp(0, 1)
    return preview_image(ctx, m[..., None].expand(-1, -1, -1, 3).contiguous())


_PRINT_LOCK = threading.Lock()  # torch's print options are global: one PreviewAny at a time sets them


def _printed(value: Any) -> str:
    """``str(value)`` with torch printing 6 items at each end of a long tensor (ComfyUI's PreviewAny sets that while
    it prints, tensors inside a LATENT dict too)."""
    with _PRINT_LOCK:
        torch.set_printoptions(edgeitems=6)
        try:
            return str(value.values if isinstance(getattr(value, "values", None), torch.Tensor) else value)
        except Exception:  # noqa: BLE001 - ComfyUI's wording for a value that cannot be printed
            return "source exists, but could not be serialized."
        finally:
            torch.set_printoptions(profile="default")


def preview_text(source: Any) -> str:
    """ComfyUI's PreviewAny text: a string as it is; an INT / FLOAT / BOOLEAN as Python prints it; what JSON can
    hold as JSON indented 4; anything else as Python prints it with torch's tensors at 6 edge items (IMAGE, MASK,
    SIGMAS' values, a LATENT's dict); sdengine's MODEL, CLIP... print as sdengine's objects, not ComfyUI's."""
    if source is None:
        return "None"
    if isinstance(source, str):
        return source
    if isinstance(source, (int, float, bool)):
        return str(source)
    try:
        return json.dumps(source, indent=4)
    except (TypeError, ValueError):
        return _printed(source)


def preview_any(ctx: RunContext, source: Any) -> dict[str, Any]:
    """ComfyUI's PreviewAny ("Preview as Text"): the value as text (:func:`preview_text`), shown by the page (its
    ``ui`` text) and given as a STRING."""
    text = preview_text(source)
    return {"ui": {"text": [text]}, "result": (text,)}


MAX_OUTPUT_CHOICES = 1000  # the newest output images LoadImageOutput lists (an output folder grows without end)


def output_images(env: Any) -> list[str]:
    """The output folder's images, newest first, as ``name [output]`` (subfolders as ``sub/name``): what ComfyUI's
    page lists for LoadImageOutput (its /internal/files/output, the newest first); at most MAX_OUTPUT_CHOICES."""
    root = Path(env.folders.output)
    if not root.is_dir():
        return []
    base = root.resolve()
    found = []
    for p in root.rglob("*"):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and p.resolve().is_relative_to(base):
            found.append((p.stat().st_mtime, p.relative_to(root).as_posix()))
    found.sort(key=lambda t: (-t[0], t[1]))
    return [f"{name} [output]" for _, name in found[:MAX_OUTPUT_CHOICES]]


def _loadable_image(env: Any, value: str) -> bool:
    """A LoadImageOutput value ComfyUI's LoadImage code reads: an annotated name of any folder ("x.png [temp]") or
    a plain name of the input folder (ComfyUI's default folder for an unannotated name)."""
    return annotated_image_exists(env, value) or value in input_files(env)


# ---------------------------------------------------------------------------------------------- latents


def _axis(dim: str, node: str) -> int:
    """The tensor axis of ComfyUI's ``x`` / ``y`` on an image latent (B, C, H, W); ``t`` names a video latent's
    time axis, which an image latent lacks (ComfyUI's index there is the channel axis: a silent wrong cut)."""
    d = dim.lstrip("-")
    if d == "x":
        return 3
    if d == "y":
        return 2
    if d == "t":
        raise NodeError(f"{node}: dim {dim!r} is a video latent's time axis; this latent is an image's (x or y)")
    raise NodeError(f"{node}: unknown dim {dim!r}")


def latent_concat(ctx: RunContext, samples1: dict[str, Any], samples2: dict[str, Any], dim: str) -> tuple[Any]:
    """ComfyUI's LatentConcat: samples2 (its rows repeated / cut to samples1's batch) joined after samples1 along
    the width (x) or height (y); "-x" / "-y" put samples2 first. The other side must match; samples1's noise mask
    and rows pass through as ComfyUI's copy passes them."""
    if dim not in CONCAT_DIMS:
        raise NodeError(f"LatentConcat: unknown dim {dim!r}; one of {', '.join(CONCAT_DIMS)}")
    axis = _axis(dim, "LatentConcat")
    b1, h1, w1 = samples1["size"]
    _, h2, w2 = samples2["size"]
    other = (h1, h2) if axis == 3 else (w1, w2)
    if other[0] != other[1]:
        side = "height" if axis == 3 else "width"
        raise NodeError(
            f"LatentConcat: joined along {dim.lstrip('-')}, the two latents need one {side}; got {other[0]} and "
            f"{other[1]} pixels"
        )
    size = (b1, h1, w1 + w2) if axis == 3 else (b1, h1 + h2, w1)
    ctx.check_size(size[2], size[1], b1)
    pair = composite_latents(samples1, samples2, "LatentConcat")
    if pair is None:  # both empty: an empty latent of the joined size
        out = {**samples1, "size": size, "posterior": None}
        out.pop("posterior_scaled", None)
        return (out,)
    a, b, f = pair
    b = repeat_to_batch(b, a.shape[0])
    parts = (b, a) if dim.startswith("-") else (a, b)
    z = torch.cat(parts, dim=axis)
    out = with_samples(samples1, z)
    out["size"] = (z.shape[0], z.shape[2] * f, z.shape[3] * f)
    return (out,)


def latent_cut(ctx: RunContext, samples: dict[str, Any], dim: str, index: int, amount: int) -> tuple[Any]:
    """ComfyUI's LatentCut: ``amount`` latent pixels from ``index`` on along the width (x) or height (y); a
    negative index counts from the end; both cut to the latent (an index past the end keeps the last pixel). An
    empty latent is cut at ComfyUI's factor 8; the noise mask stays as it is, as ComfyUI's."""
    if dim not in CUT_DIMS:
        raise NodeError(f"LatentCut: unknown dim {dim!r}; one of {', '.join(CUT_DIMS)}")
    axis = _axis(dim, "LatentCut")
    b, h, w = samples["size"]
    z = samples.get("samples")
    f = 8 if z is None else max(1, h // z.shape[2])
    n = (w if axis == 3 else h) // f if z is None else z.shape[axis]
    if n < 1:
        raise NodeError(f"LatentCut: the latent has no {dim} extent to cut")
    i, k = int(index), int(amount)
    if k < 1:
        raise NodeError(f"LatentCut: amount must be 1 or more, got {k}")
    if i >= 0:
        i = min(i, n - 1)
        k = min(n - i, k)
    else:
        i = max(i, -n)
        k = min(-i, k)
        i += n
    size = (b, h, k * f) if axis == 3 else (b, k * f, w)
    out = dict(samples)
    if z is not None:
        out["samples"] = z.narrow(axis, i, k).contiguous()
    post = samples.get("posterior")
    if post is not None:
        out["posterior"] = tuple(t.narrow(axis, i, k).contiguous() for t in post)
    out["size"] = size
    return (out,)


def _channel_norm(z: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.linalg.vector_norm(z, dim=1, keepdim=True) + eps


def latent_operation_tonemap_reinhard(ctx: RunContext, multiplier: float) -> tuple[Any]:
    """ComfyUI's LatentOperationTonemapReinhard: each latent pixel's channel vector keeps its direction; its length
    m (+ 1e-10) becomes top * (m / top) / (m / top + 1), top = (mean + 5 std of the row's lengths) * multiplier
    (std unbiased, over the row's pixels)."""
    mult = float(multiplier)

    def tonemap(z: torch.Tensor) -> torch.Tensor:
        m = _channel_norm(z, 1e-10)
        dims = list(range(1, m.ndim))
        top = (m.std(dim=dims, keepdim=True) * 5 + m.mean(dim=dims, keepdim=True)) * mult
        scaled = m * (1.0 / top)
        return (z / m) * (scaled / (scaled + 1.0) * top)

    return (tonemap,)


def latent_operation_sharpen(ctx: RunContext, sharpen_radius: int, sigma: float, alpha: float) -> tuple[Any]:
    """ComfyUI's LatentOperationSharpen: the latent's channel directions (each pixel's vector over its length +
    1e-6) sharpened with ImageSharpen's kernel (the Gaussian of side 2r + 1 times -10 alpha, its centre raised so
    that it sums to 1) over the reflect-padded latent, then scaled back by the lengths."""
    r, s, a = int(sharpen_radius), float(sigma), float(alpha)
    if r < 1:
        raise NodeError(f"LatentOperationSharpen: sharpen_radius must be 1 or more, got {r}")
    if not s > 0:
        raise NodeError(f"LatentOperationSharpen: sigma must be above 0, got {s:g}")

    def sharpen(z: torch.Tensor) -> torch.Tensor:
        if r >= z.shape[2] or r >= z.shape[3]:
            raise NodeError(
                f"LatentOperationSharpen: a radius of {r} needs a latent larger than {r} latent pixels a side, got "
                f"{z.shape[3]}x{z.shape[2]}"
            )
        lum = _channel_norm(z, 1e-6)
        k = gaussian_kernel(2 * r + 1, s) * (a * -10)
        k[r, r] = k[r, r] - k.sum() + 1.0
        c = z.shape[1]
        x = F.pad(z / lum, (r, r, r, r), mode="reflect")
        return lum * F.conv2d(x, k.to(x.dtype).expand(c, 1, *k.shape).contiguous(), groups=c)

    return (sharpen,)


def latent_apply_operation(ctx: RunContext, samples: dict[str, Any], operation: LatentOperation) -> tuple[Any]:
    """ComfyUI's LatentApplyOperation: the operation run on the samples. An empty latent stays empty (both
    operations map zeros to zeros); a VAE posterior no longer describes the result."""
    if not callable(operation):
        raise NodeError(f"LatentApplyOperation: operation must be a LATENT_OPERATION, got {type(operation).__name__}")
    z = samples.get("samples")
    if z is None:
        return (dict(samples),)
    return (with_samples(samples, operation(z.float())),)


# --------------------------------------------------------------------------------------------- schedulers

# The noise levels of "Optimal Stepsize for Diffusion Sampling" (Pei et al. 2025) as ComfyUI's
# OptimalStepsScheduler lists them, highest first (flow-matching sigmas, model-agnostic numbers)
OPTIMAL_STEPS_LEVELS: dict[str, tuple[float, ...]] = {
    "FLUX": (0.9968, 0.9886, 0.9819, 0.975, 0.966, 0.9471, 0.9158, 0.8287, 0.5512, 0.2808, 0.001),
    "Wan": (
        1.0, 0.997, 0.995, 0.993, 0.991, 0.989, 0.987, 0.985, 0.98, 0.975, 0.973, 0.968, 0.96, 0.946, 0.927, 0.902,
        0.864, 0.776, 0.539, 0.208, 0.001,
    ),
    "Chroma": (
        0.992, 0.99, 0.988, 0.985, 0.982, 0.978, 0.973, 0.968, 0.961, 0.953, 0.943, 0.931, 0.917, 0.9, 0.881, 0.858,
        0.832, 0.802, 0.769, 0.731, 0.69, 0.646, 0.599, 0.55, 0.501, 0.451, 0.402, 0.355, 0.311, 0.27, 0.232, 0.199,
        0.169, 0.143, 0.12, 0.101, 0.084, 0.07, 0.058, 0.048, 0.001,
    ),
}  # fmt: skip


def optimal_steps_scheduler(ctx: RunContext, model_type: str, steps: int, denoise: float) -> tuple[Any]:
    """ComfyUI's OptimalStepsScheduler: the table's levels (as they are when it has ``steps`` + 1 of them, else
    log-linearly interpolated to ``steps`` + 1 points over an even grid); with denoise < 1 the last
    ``round(steps * denoise)`` steps of them; the last sigma 0; denoise 0: no sigmas."""
    from sdengine.diffusion.schedules import align_your_steps_sigmas

    levels = OPTIMAL_STEPS_LEVELS.get(model_type)
    if levels is None:
        raise NodeError(
            f"OptimalStepsScheduler: unknown model_type {model_type!r}; one of {', '.join(OPTIMAL_STEPS_LEVELS)}"
        )
    steps, denoise = int(steps), float(denoise)
    if steps < 1:
        raise NodeError(f"OptimalStepsScheduler: steps must be 1 or more, got {steps}")
    if steps > ctx.max_steps:
        raise NodeError(f"steps {steps} is over the server's limit of {ctx.max_steps}")
    if denoise <= 0.0:
        return (Sigmas(torch.zeros(0)),)
    run = steps if denoise >= 1.0 else round(steps * denoise)
    if steps + 1 == len(levels):  # the table's own numbers (no exp(log(x)) round trip)
        table = torch.tensor(levels, dtype=torch.float64)
    else:  # Align Your Steps' interpolation, the same rule (its last value, 0 there, is 0 here too)
        table = align_your_steps_sigmas(steps, levels)
    values = table[-(run + 1) :].clone()
    values[-1] = 0.0
    return (Sigmas(values.to(torch.float32).contiguous()),)


# ------------------------------------------------------------------------------------------------- models

EDM_SAMPLINGS = ("v_prediction", "edm", "edm_playground_v2.5", "eps", "cosmos_rflow")
# ComfyUI's choice -> (sdengine's EDM prediction, sigma_data, Playground v2.5's latent statistics)
EDM_READINGS = {
    "v_prediction": ("v_prediction", 1.0, False),
    "edm": ("epsilon", 0.5, False),
    "edm_playground_v2.5": ("epsilon", 0.5, True),
}


def _edm_text(pred: str, lo: float, hi: float, sd: float, stats: bool) -> str:
    return f"{pred} at sigma {lo:g}..{hi:g}, sigma_data {sd:g}" + (", Playground v2.5 latents" if stats else "")


def model_sampling_continuous_edm(
    ctx: RunContext, model: ModelHandle, sampling: str, sigma_max: float, sigma_min: float
) -> tuple[Any]:
    """ComfyUI's ModelSamplingContinuousEDM where it describes the model as it is: an EDM model (CosXL, CosXL
    Edit, Playground v2.5, read as EDM from its own config or markers, docs/edm.md) with this prediction,
    sigma_data (1 for v_prediction, 0.5 for edm and edm_playground_v2.5), Playground's latent statistics or not,
    and this sigma range; the model then passes through unchanged (the samplers already run it so). Re-reading a
    model as another one (a VP model as EDM, another range, eps / cosmos_rflow) is a node error, not a silently
    different sampling."""
    from sdengine.diffusion.edm import EDMSchedule

    if sampling not in EDM_SAMPLINGS:
        raise NodeError(f"ModelSamplingContinuousEDM: unknown sampling {sampling!r}; one of {', '.join(EDM_SAMPLINGS)}")
    lo, hi = float(sigma_min), float(sigma_max)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 < lo < hi):
        raise NodeError(f"ModelSamplingContinuousEDM: needs 0 < sigma_min < sigma_max, got {lo:g} and {hi:g}")
    if sampling not in EDM_READINGS:
        raise NodeError(
            f"ModelSamplingContinuousEDM: sampling {sampling!r} is not supported here (v_prediction, edm and "
            "edm_playground_v2.5 are, where they describe the model as it is)"
        )
    pipe = ctx.pipeline(model.ref)
    sched = getattr(pipe, "noise_schedule", None)
    if not isinstance(sched, EDMSchedule):
        raise NodeError(
            "ModelSamplingContinuousEDM: the model has a discrete (VP) schedule; re-reading it as a continuous EDM "
            "model is not supported here (an EDM file such as CosXL or Playground v2.5 is read as EDM from its own "
            "markers)"
        )
    stats = getattr(getattr(getattr(pipe, "vae", None), "config", None), "latents_mean", None) is not None
    pred, sd, want_stats = EDM_READINGS[sampling]
    same = (
        sched.prediction == pred
        and math.isclose(sched.sigma_data, sd, rel_tol=1e-6)
        and stats == want_stats
        and math.isclose(sched.sigma_min, lo, rel_tol=1e-6)
        and math.isclose(sched.sigma_max, hi, rel_tol=1e-6)
    )
    if not same:
        have = _edm_text(sched.prediction, sched.sigma_min, sched.sigma_max, sched.sigma_data, stats)
        raise NodeError(
            f"ModelSamplingContinuousEDM: the model is an EDM model of {have}; {sampling} would re-read it as "
            f"{_edm_text(pred, lo, hi, sd, want_stats)}, which is not supported here (give the model's own values)"
        )
    return (model,)


TORCH_COMPILE_BACKENDS = ("inductor", "cudagraphs")


def torch_compile_model(ctx: RunContext, model: ModelHandle, backend: str) -> tuple[Any]:
    """ComfyUI's TorchCompileModel wraps the diffusion model in torch.compile: the same function, compiled for
    speed. Here the model passes through unchanged and runs as sdengine runs it (its own compiled paths are the
    server's settings, not a node's): the same images up to float rounding, none of the compile time."""
    if backend not in TORCH_COMPILE_BACKENDS:
        raise NodeError(f"TorchCompileModel: unknown backend {backend!r}; one of {', '.join(TORCH_COMPILE_BACKENDS)}")
    return (model,)


# ----------------------------------------------------------------------------------------------- registry

_STRING = "utils/string"
_OPS = "latent/advanced/operations"


def _ml(name: str) -> Input:
    return Input(name, "STRING", "", multiline=True)


def _flag_inputs(optional: bool = False) -> tuple[Input, ...]:
    return (
        Input("case_insensitive", "BOOLEAN", True, optional=optional),
        Input("multiline", "BOOLEAN", False, optional=optional),
        Input("dotall", "BOOLEAN", False, optional=optional),
    )


TOOL_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "StringSubstring",
            "Substring",
            _STRING,
            (
                _ml("string"),
                Input("start", "INT", 0, -INT_RANGE, INT_RANGE),
                Input("end", "INT", 0, -INT_RANGE, INT_RANGE),
            ),
            ("STRING",),
            string_substring,
            description="string[start:end], Python's slice (negative counts from the end).",
        ),
        NodeDef(
            "StringLength",
            "Length",
            _STRING,
            (_ml("string"),),
            ("INT",),
            string_length,
            output_names=("length",),
            description="The number of characters.",
        ),
        NodeDef(
            "CaseConverter",
            "Case Converter",
            _STRING,
            (_ml("string"), Input("mode", "COMBO", CASE_MODES[0], choices=CASE_MODES)),
            ("STRING",),
            case_converter,
            description="UPPERCASE, lowercase, Capitalize (first letter) or Title Case.",
        ),
        NodeDef(
            "StringTrim",
            "Trim",
            _STRING,
            (_ml("string"), Input("mode", "COMBO", TRIM_MODES[0], choices=TRIM_MODES)),
            ("STRING",),
            string_trim,
            description="Whitespace removed from both ends, the left or the right.",
        ),
        NodeDef(
            "StringContains",
            "Contains",
            _STRING,
            (_ml("string"), _ml("substring"), Input("case_sensitive", "BOOLEAN", True)),
            ("BOOLEAN",),
            string_contains,
            output_names=("contains",),
            description="Whether substring occurs in string.",
        ),
        NodeDef(
            "StringCompare",
            "Compare",
            _STRING,
            (
                _ml("string_a"),
                _ml("string_b"),
                Input("mode", "COMBO", COMPARE_MODES[0], choices=COMPARE_MODES),
                Input("case_sensitive", "BOOLEAN", True),
            ),
            ("BOOLEAN",),
            string_compare,
            description="Whether string_a starts with, ends with or equals string_b.",
        ),
        NodeDef(
            "RegexMatch",
            "Regex Match",
            _STRING,
            (_ml("string"), _ml("regex_pattern"), *_flag_inputs()),
            ("BOOLEAN",),
            regex_match,
            output_names=("matches",),
            description="Whether the regular expression matches anywhere in string (Python's re). A pattern that "
            "does not compile: a node error (ComfyUI answers False).",
        ),
        NodeDef(
            "RegexExtract",
            "Regex Extract",
            _STRING,
            (
                _ml("string"),
                _ml("regex_pattern"),
                Input("mode", "COMBO", EXTRACT_MODES[0], choices=EXTRACT_MODES),
                *_flag_inputs(),
                Input("group_index", "INT", 1, 0, 100, 1),
            ),
            ("STRING",),
            regex_extract,
            description="The first match, every match (one a line), or group group_index of the first / every "
            'match; none: an empty string. A pattern that does not compile: a node error (ComfyUI answers "").',
        ),
        NodeDef(
            "RegexReplace",
            "Regex Replace",
            _STRING,
            (
                _ml("string"),
                _ml("regex_pattern"),
                _ml("replace"),
                *_flag_inputs(optional=True),
                Input("count", "INT", 0, 0, 100, 1, optional=True),
            ),
            ("STRING",),
            regex_replace,
            description="Find and replace text using regex patterns (Python's re.sub; count 0: every match).",
        ),
        NodeDef(
            "Morphology",
            "Apply Morphology",
            "image/filters",
            (
                Input("image", "IMAGE"),
                Input("operation", "COMBO", MORPHOLOGY_OPS[0], choices=MORPHOLOGY_OPS),
                Input("kernel_size", "INT", 3, 3, 999, 1),
            ),
            ("IMAGE",),
            morphology,
            description="Grey-scale erode / dilate / open / close / gradient / top hat / bottom hat with a flat "
            "square kernel, each channel on its own. An even kernel_size makes the image one pixel larger a side "
            "per pass, as ComfyUI's; top / bottom hat need an odd one.",
        ),
        NodeDef(
            "ImageRGBToYUV",
            "Image RGB to YUV",
            "image/color",
            (Input("image", "IMAGE"),),
            ("IMAGE", "IMAGE", "IMAGE"),
            image_rgb_to_yuv,
            output_names=("Y", "U", "V"),
            description="The image's Y, U (Cb) and V (Cr) planes (kornia's YCbCr, offsets 0.5), each as a grey image.",
        ),
        NodeDef(
            "ImageYUVToRGB",
            "Image YUV to RGB",
            "image/color",
            (Input("Y", "IMAGE"), Input("U", "IMAGE"), Input("V", "IMAGE")),
            ("IMAGE",),
            image_yuv_to_rgb,
            description="Three grey images (their channel means) read as Y, U, V back to RGB, clamped to [0, 1].",
        ),
        NodeDef(
            "MaskPreview",
            "Preview Mask",
            "mask",
            (Input("mask", "MASK"),),
            (),
            mask_preview,
            output_node=True,
            description="The mask as a grey image in the temp folder, shown as PreviewImage's.",
        ),
        NodeDef(
            "LatentConcat",
            "LatentConcat",
            "latent/advanced",
            (
                Input("samples1", "LATENT"),
                Input("samples2", "LATENT"),
                Input("dim", "COMBO", CONCAT_DIMS[0], choices=CONCAT_DIMS),
            ),
            ("LATENT",),
            latent_concat,
            description="samples2 joined after samples1 along the width (x) or height (y); a leading minus puts it "
            "first. t (a video latent's time): a node error on an image latent.",
        ),
        NodeDef(
            "LatentCut",
            "LatentCut",
            "latent/advanced",
            (
                Input("samples", "LATENT"),
                Input("dim", "COMBO", CUT_DIMS[0], choices=CUT_DIMS),
                Input("index", "INT", 0, -MAX_RESOLUTION, MAX_RESOLUTION, 1),
                Input("amount", "INT", 1, 1, MAX_RESOLUTION, 1),
            ),
            ("LATENT",),
            latent_cut,
            description="amount latent pixels from index on along x or y (negative index: from the end; cut to the "
            "latent). t: a node error on an image latent.",
        ),
        NodeDef(
            "LatentApplyOperation",
            "LatentApplyOperation",
            _OPS,
            (Input("samples", "LATENT"), Input("operation", "LATENT_OPERATION")),
            ("LATENT",),
            latent_apply_operation,
            description="A LATENT_OPERATION (tonemap, sharpen) run on the latent.",
        ),
        NodeDef(
            "LatentOperationTonemapReinhard",
            "LatentOperationTonemapReinhard",
            _OPS,
            (Input("multiplier", "FLOAT", 1.0, 0.0, 100.0, 0.01),),
            ("LATENT_OPERATION",),
            latent_operation_tonemap_reinhard,
            description="Reinhard tonemapping of the latent's channel-vector lengths (top = (mean + 5 std) * "
            "multiplier).",
        ),
        NodeDef(
            "LatentOperationSharpen",
            "LatentOperationSharpen",
            _OPS,
            (
                Input("sharpen_radius", "INT", 9, 1, 31, 1),
                Input("sigma", "FLOAT", 1.0, 0.1, 10.0, 0.1),
                Input("alpha", "FLOAT", 0.1, 0.0, 5.0, 0.01),
            ),
            ("LATENT_OPERATION",),
            latent_operation_sharpen,
            description="An unsharp mask on the latent's channel directions (ImageSharpen's kernel), lengths kept.",
        ),
        NodeDef(
            "OptimalStepsScheduler",
            "OptimalStepsScheduler",
            "sampling/custom_sampling/schedulers",
            (
                Input("model_type", "COMBO", "FLUX", choices=tuple(OPTIMAL_STEPS_LEVELS)),
                Input("steps", "INT", 20, 3, 1000, 1, limit="steps"),
                Input("denoise", "FLOAT", 1.0, 0.0, 1.0, 0.01),
            ),
            ("SIGMAS",),
            optimal_steps_scheduler,
            description="The Optimal Stepsize noise levels of FLUX, Wan or Chroma (log-linearly interpolated to the "
            "steps), as ComfyUI's node; flow-matching sigmas for SamplerCustom(Advanced).",
        ),
        NodeDef(
            "ModelSamplingContinuousEDM",
            "ModelSamplingContinuousEDM",
            "advanced/model",
            (
                Input("model", "MODEL"),
                Input("sampling", "COMBO", EDM_SAMPLINGS[0], choices=EDM_SAMPLINGS),
                Input("sigma_max", "FLOAT", 120.0, 0.0, 1000.0, 0.001, round=False),
                Input("sigma_min", "FLOAT", 0.002, 0.0, 1000.0, 0.001, round=False),
            ),
            ("MODEL",),
            model_sampling_continuous_edm,
            description="An EDM model's continuous sampling as ComfyUI's node sets it; here only where it restates "
            "the model's own (CosXL: v_prediction 0.002..120; Playground v2.5: edm_playground_v2.5 0.002..80), "
            "which passes the model through; any other reading: a node error.",
        ),
        NodeDef(
            "PreviewAny",
            "Preview as Text",
            "utilities",
            (Input("source", ANY_TYPE),),
            ("STRING",),
            preview_any,
            output_node=True,
            description="Any value as text on the page (and as a STRING): strings as they are, numbers as Python "
            "prints them, lists / dicts as JSON, tensors as torch prints them.",
        ),
        NodeDef(
            "LoadImageOutput",
            "Load Image (from Outputs)",
            "image",
            (Input("image", "COMBO", choices=output_images, also_valid=_loadable_image, upload=True),),
            ("IMAGE", "MASK"),
            load_image,
            description='An image from the output folder ("name [output]", the newest first; any annotated or '
            "input-folder name too), read as LoadImage reads it; MASK = 1 - alpha.",
            changed=input_file_token,
        ),
        NodeDef(
            "TorchCompileModel",
            "TorchCompileModel",
            "_for_testing",
            (Input("model", "MODEL"), Input("backend", "COMBO", "inductor", choices=TORCH_COMPILE_BACKENDS)),
            ("MODEL",),
            torch_compile_model,
            description="ComfyUI compiles the model with torch.compile; here it passes through and runs uncompiled "
            "(the same model: its images up to float rounding).",
        ),
    )
}
