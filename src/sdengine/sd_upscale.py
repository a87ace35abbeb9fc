"""A1111's "SD upscale" img2img script over the pipeline: upscale, cut into tiles, img2img each tile, blend back.

The init image is upscaled by ``scale`` with an upscaler ("None" leaves it as it is, "Lanczos", or an upscaler
model of ``--upscalers-dir``; A1111's ``Upscaler.upscale``: each side times the scale rounded down to a multiple
of 8). The result is cut into tiles of the request's width x height that overlap by at least ``overlap`` pixels
(:func:`split_grid`, A1111's ``images.split_grid``), each tile is an img2img of its crop, and the tiles are put
back with A1111's linear overlap masks (:func:`combine_grid`, ``images.combine_grid``): within a row each tile's
first ``overlap`` columns are blended over the tile before it by a ramp ``floor(255 * i / overlap)``, the rest
pasted over; rows are blended the same way down the image.

Seeds are A1111's (``scripts/sd_upscale.py``): upscale ``n`` of ``n_iter`` starts at ``seed + n``; the tiles
run in batches of ``batch_size``, batch ``i`` starting at that start seed + ``i`` (A1111 sets the next batch's
seed to the last batch's first seed + 1), its row ``j`` the batch's seed + ``j`` (with variation seeds on, every
row keeps the batch's seed and the variation seed is ``subseed + j``). Every tile here is its own pipeline call
(one init image per call) with that tile's seed: a row's noise depends on its seed only, so the tiles are the
same as A1111's batches. Every image's infotext is the first tile's with ``SD upscale overlap`` and ``SD upscale
upscaler`` added.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdengine.errors import GenerationError
from sdengine.io.images import load_image

TITLE = "SD upscale"  # A1111's script title (its script_name)
PIXEL_UPSCALERS = ("None", "Lanczos")  # then the upscaler models of --upscalers-dir
MAX_SIDE = 8192  # the upscaled image's largest side (as the extras' limit)


@dataclass(frozen=True)
class TileGrid:
    """Where A1111's ``split_grid`` puts the tiles: ``rows`` of (y, [x of each tile])."""

    tile_w: int
    tile_h: int
    image_w: int
    image_h: int
    overlap: int
    rows: tuple[tuple[int, tuple[int, ...]], ...]

    @property
    def count(self) -> int:
        return sum(len(xs) for _, xs in self.rows)

    @property
    def boxes(self) -> list[tuple[int, int, int, int]]:
        """(x0, y0, x1, y1) of every tile, row by row (boxes may reach outside the image: A1111 crops with black)."""
        return [(x, y, x + self.tile_w, y + self.tile_h) for y, xs in self.rows for x in xs]


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise GenerationError(f"SD upscale: {name} must be a whole number >= {low}, got {value!r}")
    return value


def plan_grid(width: int, height: int, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """A1111's tile layout of a ``width`` x ``height`` image: ``ceil((w - overlap) / (tile_w - overlap))``
    columns spread evenly (``int(col * dx)``, the last one flush with the right edge), rows the same way."""
    _check_int("tile width", tile_w, 1)
    _check_int("tile height", tile_h, 1)
    _check_int("overlap", overlap, 0)
    if overlap >= min(tile_w, tile_h):
        raise GenerationError(
            f"SD upscale: the tile overlap {overlap} must be smaller than the tile size {tile_w}x{tile_h} "
            "(the request's width and height)"
        )
    if width <= overlap or height <= overlap:
        raise GenerationError(
            f"SD upscale: the upscaled image {width}x{height} must be larger than the tile overlap {overlap} "
            "on each side (no tile fits)"
        )
    cols = math.ceil((width - overlap) / (tile_w - overlap))
    nrows = math.ceil((height - overlap) / (tile_h - overlap))
    dx = (width - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (height - tile_h) / (nrows - 1) if nrows > 1 else 0
    rows = []
    for r in range(nrows):
        y = int(r * dy)
        if y + tile_h >= height:
            y = height - tile_h
        xs = []
        for c in range(cols):
            x = int(c * dx)
            if x + tile_w >= width:
                x = width - tile_w
            xs.append(x)
        rows.append((y, tuple(xs)))
    return TileGrid(tile_w, tile_h, width, height, overlap, tuple(rows))


def split_grid(image: Image.Image, tile_w: int, tile_h: int, overlap: int) -> tuple[TileGrid, list[Image.Image]]:
    """The grid and its tiles (row by row), each a crop of ``image`` (black outside it, as PIL crops)."""
    grid = plan_grid(image.width, image.height, tile_w, tile_h, overlap)
    return grid, [image.crop(box) for box in grid.boxes]


def _ramp(length: int, overlap: int, vertical: bool) -> Image.Image:
    """A1111's overlap mask: ``floor(i * 255 / overlap)`` along the overlap, ``length`` across it."""
    values = bytes(i * 255 // overlap for i in range(overlap))
    if vertical:  # overlap rows, each one value, ``length`` wide
        return Image.frombytes("L", (length, overlap), b"".join(bytes([v]) * length for v in values))
    return Image.frombytes("L", (overlap, length), values * length)


def combine_grid(grid: TileGrid, tiles: list[Image.Image]) -> Image.Image:
    """The tiles (row by row, each tile_w x tile_h) put back as A1111's ``combine_grid`` does: a row's first
    tile (x 0) pasted, each later one's first ``overlap`` columns blended over by the ramp mask and the rest
    pasted; rows the same way down the image (with PIL's mask paste, its rounding ``(a*(255-m) + b*m) / 255``)."""
    if len(tiles) != grid.count:
        raise GenerationError(f"SD upscale: {len(tiles)} tiles for a grid of {grid.count}")
    ov = grid.overlap
    mask_w = _ramp(grid.tile_h, ov, vertical=False) if ov else None
    mask_h = _ramp(grid.image_w, ov, vertical=True) if ov else None
    out = Image.new("RGB", (grid.image_w, grid.image_h))
    k = 0
    for y, xs in grid.rows:
        h = grid.tile_h
        row = Image.new("RGB", (grid.image_w, h))
        for x in xs:
            tile = tiles[k].convert("RGB")
            k += 1
            if tile.size != (grid.tile_w, grid.tile_h):
                raise GenerationError(f"SD upscale: a tile is {tile.size}, the grid's {(grid.tile_w, grid.tile_h)}")
            if x == 0:
                row.paste(tile, (0, 0))
                continue
            if mask_w is not None:
                row.paste(tile.crop((0, 0, ov, h)), (x, 0), mask=mask_w)
            row.paste(tile.crop((ov, 0, grid.tile_w, h)), (x + ov, 0))
        if y == 0:
            out.paste(row, (0, 0))
            continue
        if mask_h is not None:
            out.paste(row.crop((0, 0, row.width, ov)), (0, y), mask=mask_h)
        out.paste(row.crop((0, ov, row.width, h)), (0, y + ov))
    return out


def upscaled_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """A1111's ``Upscaler.upscale`` target: each side times ``scale`` rounded down to a multiple of 8."""
    return int((width * scale) // 8 * 8), int((height * scale) // 8 * 8)


def lanczos_upscale(image: Image.Image, scale: float) -> Image.Image:
    """A1111's ``Upscaler.upscale`` with its Lanczos upscaler: resized by ``scale`` (``int(side * scale)``)
    unless the image already covers the target (and the scale is not 1), then to the target where that is not
    it."""
    dest = upscaled_size(image.width, image.height, scale)
    if scale == 1 or image.width < dest[0] or image.height < dest[1]:
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.LANCZOS)
    if image.size != dest:
        image = image.resize(dest, Image.Resampling.LANCZOS)
    return image


def resolve_upscaler(name: Any, upscalers_dir: str | Path | None = None) -> tuple[str, Path | None]:
    """(listed name, model file or None) of an upscaler name: "None", "Lanczos" (case-blind, as A1111 matches a
    name in script_args) or an upscaler model in ``upscalers_dir``; a one-line GenerationError otherwise."""
    if isinstance(name, str):
        found = {u.lower(): u for u in PIXEL_UPSCALERS}.get(name.strip().lower())
        if found is not None:
            return found, None
        if upscalers_dir is not None and name.strip():
            from sdengine.weights.upscaler_file import UpscalerFileError
            from sdengine.weights.upscaler_file import resolve_upscaler as resolve_file

            try:
                return resolve_file(name, upscalers_dir)
            except UpscalerFileError as e:
                raise GenerationError(f"SD upscale upscaler: {e} (or one of {', '.join(PIXEL_UPSCALERS)})") from None
    where = "" if upscalers_dir is not None else " (an upscaler model such as ESRGAN needs --upscalers-dir)"
    raise GenerationError(f"SD upscale: unknown upscaler {name!r}; sdengine has: {', '.join(PIXEL_UPSCALERS)}{where}")


def check_scale(image_size: tuple[int, int], scale: Any, upscaler: str = "Lanczos") -> tuple[int, int]:
    """The upscaled size, after the checks: a finite scale > 0 (A1111's API takes any; its slider 1 to 4) and at
    least 8 and at most :data:`MAX_SIDE` pixels a side. "None" keeps the image's size."""
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise GenerationError(f"SD upscale: the scale factor must be a number > 0, got {scale!r}")
    size = image_size if upscaler == "None" else upscaled_size(*image_size, float(scale))
    if min(size) < 8 or max(size) > MAX_SIDE:
        raise GenerationError(
            f"SD upscale: upscaling {image_size[0]}x{image_size[1]} by {scale:g} gives {size[0]}x{size[1]}; each "
            f"side must be 8 to {MAX_SIDE} pixels"
        )
    return size


def upscale_init(
    image: Image.Image,
    scale: float,
    upscaler: str | tuple[str, Path | None] = "Lanczos",
    upscalers_dir: str | Path | None = None,
) -> tuple[str, Image.Image]:
    """(the upscaler's listed name, the upscaled image) as the script makes it: "None" leaves the image as it is.
    ``upscaler``: a name, or (name, model file or None) already resolved (the server's list)."""
    name, model_file = upscaler if isinstance(upscaler, tuple) else resolve_upscaler(upscaler, upscalers_dir)
    check_scale(image.size, scale, name)
    if name == "None":
        return name, image
    if model_file is None:
        return name, lanczos_upscale(image, float(scale))
    from sdengine.models.esrgan import upscale_image
    from sdengine.weights.upscaler_file import load_upscaler

    return name, upscale_image(load_upscaler(model_file), image, float(scale))


def tile_seeds(
    n_tiles: int, batch_size: int, seed: int, iteration: int = 0, subseed: int | None = None, variation: bool = False
) -> list[tuple[int, int | None]]:
    """(seed, variation seed) of each tile of upscale ``iteration`` as A1111's script gives them: tile ``k`` is row
    ``j = k % batch_size`` of batch ``i = k // batch_size``; its seed is ``seed + iteration + i + j`` (``+ i``
    only with variation seeds on), its variation seed ``subseed + j``."""
    out: list[tuple[int, int | None]] = []
    for k in range(n_tiles):
        i, j = divmod(k, batch_size)
        s = seed + iteration + i + (0 if variation else j)
        out.append((s, None if subseed is None else subseed + j))
    return out


def with_script_info(infotext: str, overlap: int, upscaler: str) -> str:
    """A tile's infotext with the script's two settings added (A1111's ``extra_generation_params``, before
    ``Version``)."""
    extra = f"SD upscale overlap: {overlap}, SD upscale upscaler: {upscaler}"
    lines = infotext.split("\n")
    last = lines[-1]
    at = last.rfind(", Version: ")  # A1111 writes its extra parameters before the version
    if at >= 0:
        lines[-1] = f"{last[:at]}, {extra}{last[at:]}"
    else:
        lines[-1] = f"{last}, {extra}" if last else extra
    return "\n".join(lines)


@dataclass
class SdUpscaleResult:
    """The upscales (one per ``n_iter``), their infotexts, each one's start seed and every tile's seed."""

    images: list[Image.Image]
    infotexts: list[str]
    seeds: list[int]
    grid: TileGrid
    tile_seeds: list[list[int]] = field(default_factory=list)
    upscaler: str = "Lanczos"
    notes: list[str] = field(default_factory=list)


def sd_upscale(
    pipe: Callable[..., Any],
    image: Any,
    prompt: Any = "",
    *,
    width: int,
    height: int,
    scale: float = 2.0,
    overlap: int = 64,
    upscaler: str | tuple[str, Path | None] = "Lanczos",
    upscalers_dir: str | Path | None = None,
    batch_size: int = 1,
    n_iter: int = 1,
    seed: Any = None,
    subseed: int | None = None,
    subseed_strength: float = 0.0,
    **kwargs: Any,
) -> SdUpscaleResult:
    """A1111's SD upscale of ``image`` with ``pipe`` (a :class:`sdengine.pipeline.Pipeline`, or any callable
    taking its fields and returning a GenerationResult): tiles of ``width`` x ``height``, ``overlap`` pixels,
    ``batch_size`` tiles per seed group and ``n_iter`` upscales (see the module's docstring for the seeds).
    ``kwargs`` are the img2img's other fields (steps, strength, sampler, negative prompt, ...); ``upscaler`` a
    name or (name, model file or None) already resolved."""
    for bad in ("mask", "init_image", "hires", "batch_count"):
        if kwargs.get(bad) not in (None, False):
            raise GenerationError(f"SD upscale: {bad} cannot be used with it (it tiles its own init image)")
        kwargs.pop(bad, None)
    _check_int("batch size", batch_size, 1)
    _check_int("n_iter", n_iter, 1)
    _check_int("width", width, 8)
    _check_int("height", height, 8)
    _check_int("overlap", overlap, 0)
    if overlap >= min(width, height):
        plan_grid(width, height, width, height, overlap)  # the overlap's one-line error
    if image is None:
        raise GenerationError("SD upscale needs an init image")
    img = load_image(image, "SD upscale init image", mode="RGB", background=(255, 255, 255), error=GenerationError)
    name = upscaler[0] if isinstance(upscaler, tuple) else resolve_upscaler(upscaler, upscalers_dir)[0]
    size = check_scale(img.size, scale, name)
    plan_grid(size[0], size[1], width, height, overlap)  # said before the upscaler model runs
    name, big = upscale_init(img, scale, upscaler, upscalers_dir)
    grid, crops = split_grid(big, width, height, overlap)
    if isinstance(seed, list | tuple):
        seed = seed[0] if seed else None
    if seed is None or int(seed) == -1:
        seed = secrets.randbelow(2**32)
    variation = bool(subseed_strength)
    if variation and (subseed is None or int(subseed) == -1):
        subseed = secrets.randbelow(2**32)
    callback = kwargs.pop("callback", None)
    calls = grid.count * n_iter
    images: list[Image.Image] = []
    infotexts: list[str] = []
    starts: list[int] = []
    all_tile_seeds: list[list[int]] = []
    notes: list[str] = []
    info: str | None = None
    for n in range(n_iter):
        seeds = tile_seeds(grid.count, batch_size, int(seed), n, subseed if variation else None, variation)
        outs: list[Image.Image] = []
        for k, (crop, (s, sub)) in enumerate(zip(crops, seeds, strict=True)):
            extra: dict[str, Any] = {"seed": s}
            if variation:
                extra.update(subseed=sub, subseed_strength=subseed_strength)
            if callback is not None:  # the steps counted over the whole script: every tile of every upscale
                extra["callback"] = _counting(callback, n * grid.count + k, calls)
            result = pipe(prompt=prompt, init_image=crop, width=width, height=height, batch_size=1, **extra, **kwargs)
            if info is None:
                info = with_script_info(result.infotexts[0], overlap, name)
            notes.extend(x for x in result.notes if x not in notes)
            outs.append(result.images[0])
        images.append(combine_grid(grid, outs))
        assert info is not None
        infotexts.append(info)
        starts.append(int(seed) + n)
        all_tile_seeds.append([s for s, _ in seeds])
    return SdUpscaleResult(images, infotexts, starts, grid, all_tile_seeds, name, notes)


def _counting(callback: Callable[[Any], Any], done: int, calls: int) -> Callable[[Any], Any]:
    """A tile's step callback: its StepInfo with ``step`` and ``steps`` counted over all ``calls`` tile runs."""

    def tile(info: Any) -> Any:
        return callback(dataclasses.replace(info, step=done * info.steps + info.step, steps=info.steps * calls))

    return tile


def parse_sd_upscale(text: str) -> tuple[float, int]:
    """``SCALE[,OVERLAP]`` (``--sd-upscale 2,64``): the scale factor and the tile overlap (64 unless given)."""
    parts = [p.strip() for p in str(text).split(",")]
    try:
        scale = float(parts[0])
        overlap = int(parts[1]) if len(parts) > 1 else 64
    except ValueError:
        raise GenerationError(f"--sd-upscale {text!r}: expected SCALE[,OVERLAP], e.g. 2 or 2,64") from None
    if len(parts) > 2:
        raise GenerationError(f"--sd-upscale {text!r}: expected SCALE[,OVERLAP], e.g. 2 or 2,64")
    return scale, overlap


__all__ = [
    "MAX_SIDE",
    "PIXEL_UPSCALERS",
    "TITLE",
    "SdUpscaleResult",
    "TileGrid",
    "check_scale",
    "combine_grid",
    "lanczos_upscale",
    "parse_sd_upscale",
    "plan_grid",
    "resolve_upscaler",
    "sd_upscale",
    "split_grid",
    "tile_seeds",
    "upscale_init",
    "upscaled_size",
]
