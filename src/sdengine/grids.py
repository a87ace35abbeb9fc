"""X/Y/Z plots (A1111's "X/Y/Z plot" script) and image grids.

An axis is ``NAME=V1,V2,...``: ``steps``, ``sampler``, ``schedule``, ``cfg``, ``seed``, ``strength``,
``clip_skip`` or ``prompt`` (A1111's "Prompt S/R": the first value is searched for in the prompt and the
negative prompt, and each value replaces it in turn, so the first cell is the prompt as given). Values are
comma-separated (CSV: a value with a comma goes in double quotes); number axes also take ranges as A1111
does: ``10-30`` (every integer), ``10-30 (+10)`` (a step), ``1-9 [3]`` (a count, evenly spaced).

:func:`plan_cells` makes the pipeline arguments of every cell, :func:`run_xyz` generates them with one
pipeline (one image per cell, the same seed in every cell unless ``seed`` is an axis) and
:func:`draw_xyz_grid` lays them out: X across, Y down, one sub-grid per Z value side by side, labels drawn
with Pillow's default font. :func:`batch_grid` is the plain grid of a batch (no labels), as A1111 saves it.

Nothing here imports torch at module level: the sampler table is read only when an axis needs it.
"""

from __future__ import annotations

import csv
import math
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from sdengine.errors import UsageError

# axis name -> (value type, the pipeline keyword it sets; None for prompt S/R)
AXES: dict[str, tuple[type, str | None]] = {
    "steps": (int, "steps"),
    "sampler": (str, "sampler"),
    "schedule": (str, "schedule"),
    "cfg": (float, "cfg_scale"),
    "seed": (int, "seed"),
    "strength": (float, "strength"),
    "clip_skip": (int, "clip_skip"),
    "prompt": (str, None),
}
ALIASES = {
    "cfg_scale": "cfg",
    "scheduler": "schedule",
    "prompt_sr": "prompt",
    "sr": "prompt",
    "denoising_strength": "strength",
    "clipskip": "clip_skip",
}
MAX_CELLS = 1000  # a typo in a range ("1-10000") should not start a day-long run

_INT_RANGE = re.compile(r"^([+-]?\d+)\s*-\s*([+-]?\d+)(?:\s*\(\s*([+-]?\d+)\s*\)|\s*\[\s*(\d+)\s*\])?$")
_FLOAT = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_FLOAT_RANGE = re.compile(rf"^({_FLOAT})\s*-\s*({_FLOAT})(?:\s*\(\s*({_FLOAT})\s*\)|\s*\[\s*(\d+)\s*\])?$")


@dataclass(frozen=True)
class Axis:
    """One axis of a plot: its name (one of :data:`AXES`) and its values (typed)."""

    name: str
    values: tuple[Any, ...]

    def label(self, value: Any) -> str:
        """What the grid writes next to a row/column: ``steps: 20``; prompt S/R shows the text itself."""
        if self.name == "prompt":
            return str(value)
        if isinstance(value, float):
            value = f"{value:g}"
        return f"{self.name}: {value}"


def _split_values(text: str) -> list[str]:
    rows = list(csv.reader([text], skipinitialspace=True))
    return [v.strip() for v in (rows[0] if rows else []) if v.strip()]


def _range(name: str, item: str, kind: type) -> list[Any] | None:
    """``a-b``, ``a-b (+step)``, ``a-b [count]`` -> values; None when ``item`` is not a range."""
    m = (_INT_RANGE if kind is int else _FLOAT_RANGE).match(item)
    if m is None:
        return None
    start, end = kind(m.group(1)), kind(m.group(2))
    step_text, count_text = m.group(3), m.group(4)
    if count_text is not None:
        count = int(count_text)
        if not 1 <= count <= MAX_CELLS:
            raise UsageError(f"axis {name}: {item!r} asks for {count} values (1 to {MAX_CELLS})")
        if count == 1:
            return [start]
        vals = [start + (end - start) * k / (count - 1) for k in range(count)]
        return [int(round(v)) for v in vals] if kind is int else [round(v, 10) for v in vals]
    step = kind(step_text) if step_text is not None else kind(1 if end >= start else -1)
    if step == 0 or (end - start) * step < 0:
        raise UsageError(f"axis {name}: the step of {item!r} never reaches {m.group(2)}")
    n = int(math.floor((end - start) / step + 1e-9)) + 1
    if n > MAX_CELLS:
        raise UsageError(f"axis {name}: {item!r} makes {n} values (at most {MAX_CELLS})")
    return [start + k * step for k in range(n)] if kind is int else [round(start + k * step, 10) for k in range(n)]


def _typed(name: str, item: str, kind: type) -> Any:
    try:
        return kind(item)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise UsageError(f"axis {name}: {item!r} is not {what} (e.g. {name}=10,20,30 or {name}=10-30 (+10))") from None


def _check_value(name: str, value: Any) -> None:
    if name == "steps" and value < 1:
        raise UsageError(f"axis steps: {value} is not a positive number of steps")
    if name == "clip_skip" and value < 1:
        raise UsageError(f"axis clip_skip: {value} must be at least 1 (1 = the last layer)")
    if name == "strength" and not 0 < value <= 1:
        raise UsageError(f"axis strength: {value:g} is not in (0, 1]")
    if name == "sampler":
        from sdengine.diffusion.sampling import resolve

        try:
            resolve(value)
        except ValueError as e:
            raise UsageError(f"axis sampler: {e}") from None
    if name == "schedule":
        from sdengine.diffusion.sampling import resolve

        try:
            resolve("euler", value)  # euler takes every schedule
        except ValueError as e:
            raise UsageError(f"axis schedule: {e}") from None


def axis_name(name: str) -> str:
    """The canonical axis name of ``name`` (case, ``-`` and aliases such as ``cfg_scale`` accepted)."""
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = ALIASES.get(key, key)
    if key not in AXES:
        raise UsageError(f"unknown axis {name.strip()!r}; valid: {', '.join(AXES)}")
    return key


def parse_axis(spec: str) -> Axis:
    """``"steps=10,20,30"`` -> ``Axis("steps", (10, 20, 30))``; a one-line :class:`UsageError` if it is not
    one (unknown name, a value of the wrong type, an unknown sampler or schedule, no values)."""
    head, sep, text = spec.partition("=")
    if not sep:
        raise UsageError(f"axis {spec!r}: expected NAME=V1,V2,... with NAME one of {', '.join(AXES)}")
    name = axis_name(head)
    kind = AXES[name][0]
    items = _split_values(text)
    if not items:
        raise UsageError(f"axis {name}: no values given")
    values: list[Any] = []
    for item in items:
        expanded = _range(name, item, kind) if kind is not str else None
        values.extend(expanded if expanded is not None else [_typed(name, item, kind) if kind is not str else item])
    for v in values:
        _check_value(name, v)
    return Axis(name, tuple(values))


def fix_axis_seeds(axis: Axis) -> Axis:
    """A ``seed`` axis with its ``-1`` values drawn (each its own random seed), as A1111's ``fix_axis_seeds``:
    the labels, the cells and the grid's record then name the seeds the images were made with; any other axis
    as it is."""
    if axis.name != "seed" or -1 not in axis.values:
        return axis
    return Axis(axis.name, tuple(secrets.randbelow(2**32) if v == -1 else v for v in axis.values))


@dataclass
class Cell:
    """One generation of a plot: where it goes (z, row, col) and the pipeline's arguments."""

    z: int
    row: int
    col: int
    kwargs: dict[str, Any] = field(default_factory=dict)  # includes "prompt"


def default_schedule(sampler: str) -> str | None:
    """The schedule a cell gets when none was chosen: ``karras`` (the CLI's default) where the sampler takes
    it, else the sampler's own (``None``: a combined A1111 name such as "DPM++ 2M Exponential" names its
    schedule; LCM and PLMS do not take karras)."""
    from sdengine.diffusion.sampling import A1111_NAMES, SAMPLERS, resolve

    if sampler in A1111_NAMES and A1111_NAMES[sampler][1] is not None:
        return None
    name, _ = resolve(sampler)
    return "karras" if "karras" in SAMPLERS[name].schedules else None


def plan_cells(
    prompt: str, base: Mapping[str, Any], x: Axis, y: Axis | None = None, z: Axis | None = None
) -> list[Cell]:
    """The cells of a plot, row by row (z, then y, then x), each with the complete pipeline arguments.

    ``base``: the pipeline's keyword arguments every cell shares (``negative_prompt``, ``steps``, ...). A
    seed that is absent, None or -1 is drawn once here, so every cell has the same seed (as in A1111);
    without a chosen ``schedule`` each cell gets :func:`default_schedule` of its sampler."""
    axes = [a for a in (x, y, z) if a is not None]
    names = [a.name for a in axes]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"axis {dupes[0]} is given twice; each axis must be different")
    n_cells = math.prod(len(a.values) for a in axes)
    if n_cells > MAX_CELLS:
        raise UsageError(f"{n_cells} cells is too many (at most {MAX_CELLS})")
    negative = str(base.get("negative_prompt") or "")
    for a in axes:
        if a.name == "prompt" and a.values[0] not in prompt and a.values[0] not in negative:
            raise UsageError(
                f"axis prompt: {a.values[0]!r} (the first value, the text to replace) is not in the "
                "prompt or the negative prompt"
            )
        if a.name == "strength" and base.get("init_image") is None:
            raise UsageError("axis strength needs an init image (img2img): give --init-image")
    shared = dict(base)
    if shared.get("seed") is None or shared.get("seed") == -1:
        shared["seed"] = secrets.randbelow(2**32)
    choose_schedule = shared.get("schedule") is None and "schedule" not in names

    from sdengine.diffusion.sampling import resolve

    cells = []
    zs, ys = (z.values if z else (None,)), (y.values if y else (None,))
    for k, zv in enumerate(zs):
        for r, yv in enumerate(ys):
            for c, xv in enumerate(x.values):
                kw = {"prompt": prompt, **shared}
                for axis, value in ((x, xv), (y, yv), (z, zv)):
                    if axis is None:
                        continue
                    if axis.name == "prompt":
                        search = axis.values[0]
                        kw["prompt"] = kw["prompt"].replace(search, value)
                        if kw.get("negative_prompt"):
                            kw["negative_prompt"] = kw["negative_prompt"].replace(search, value)
                    else:
                        kw[AXES[axis.name][1]] = value  # type: ignore[index]
                if choose_schedule and "sampler" in kw:
                    kw["schedule"] = default_schedule(kw["sampler"])
                if "sampler" in kw or kw.get("schedule") is not None:
                    try:
                        resolve(kw.get("sampler", "dpmpp_2m"), kw.get("schedule"))
                    except ValueError as e:
                        raise UsageError(f"cell {_cell_name(x, xv, y, yv, z, zv)}: {e}") from None
                cells.append(Cell(k, r, c, kw))
    return cells


def _cell_name(x: Axis, xv: Any, y: Axis | None, yv: Any, z: Axis | None, zv: Any) -> str:
    return ", ".join(f"{a.name}={v}" for a, v in ((x, xv), (y, yv), (z, zv)) if a is not None)


# ------------------------------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class GridLayout:
    """Where each cell of :func:`draw_xyz_grid` lies: ``boxes[(z, row, col)] = (left, top, right, bottom)``."""

    width: int
    height: int
    boxes: dict[tuple[int, int, int], tuple[int, int, int, int]]


def label_size(cell_w: int, cell_h: int) -> int:
    """The label font size for cells of this size: about (w + h) / 25 pixels as A1111 has it, at least 10."""
    return max(10, (cell_w + cell_h) // 25)


def label_font(cell_w: int, cell_h: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's default font at :func:`label_size`."""
    return ImageFont.load_default(size=label_size(cell_w, cell_h))


def _text_w(font: Any, text: str) -> int:
    return int(math.ceil(font.getlength(text)))


def _wrap(font: Any, text: str, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than that is broken between characters."""
    lines: list[str] = []
    for para in text.split("\n"):
        line = ""
        for word in para.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_w(font, candidate) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and _text_w(font, line + ch) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def draw_xyz_grid(
    images: Sequence[Sequence[Sequence[Image.Image]]],
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    z_labels: Sequence[str] | None = None,
) -> tuple[Image.Image, GridLayout]:
    """``images[z][row][col]`` (all one size) as one white RGB picture with the labels: columns on top, rows at
    the left, one titled sub-grid per z side by side. Returns the picture and where each cell is."""
    n_z = len(images)
    n_rows = len(images[0]) if n_z else 0
    n_cols = len(images[0][0]) if n_rows else 0
    if not n_cols:
        raise UsageError("a grid needs at least one image")
    cell_w, cell_h = images[0][0][0].size
    for plane in images:
        if len(plane) != n_rows or any(len(row) != n_cols for row in plane):
            raise UsageError("every z plane of a grid needs the same rows and columns")
        if any(im.size != (cell_w, cell_h) for row in plane for im in row):
            raise UsageError("the images of a grid must all have the same size")
    for what, labels, n in (("column", col_labels, n_cols), ("row", row_labels, n_rows), ("z", z_labels, n_z)):
        if labels is not None and len(labels) != n:
            raise UsageError(f"{len(labels)} {what} labels for {n} {what}s")

    font = label_font(cell_w, cell_h)
    ascent, descent = font.getmetrics() if hasattr(font, "getmetrics") else (10, 2)
    line_h = ascent + descent + 1
    pad = max(2, line_h // 4)
    gap = max(2, cell_w // 32)

    col_lines = [_wrap(font, t, cell_w) for t in col_labels] if col_labels else []
    header_h = max(len(ls) for ls in col_lines) * line_h + pad if col_lines else 0
    # at most twice the cell width (long prompt S/R texts wrap), but room for a short label next to tiny images
    row_cap = max(2 * cell_w, 12 * label_size(cell_w, cell_h))
    row_text_w = min(max(_text_w(font, t) for t in row_labels), row_cap) if row_labels else 0
    row_lines = [_wrap(font, t, row_text_w) for t in row_labels] if row_labels else []
    row_w = row_text_w + 2 * pad if row_labels else 0
    body_w = n_cols * cell_w + (n_cols - 1) * gap
    sub_w = row_w + body_w
    z_lines = [_wrap(font, t, sub_w) for t in z_labels] if z_labels else []
    title_h = max(len(ls) for ls in z_lines) * line_h + pad if z_lines else 0
    sub_h = title_h + header_h + n_rows * cell_h + (n_rows - 1) * gap
    z_gap = 4 * gap
    width = 2 * pad + n_z * sub_w + (n_z - 1) * z_gap
    height = 2 * pad + sub_h

    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    boxes: dict[tuple[int, int, int], tuple[int, int, int, int]] = {}
    for k in range(n_z):
        left = pad + k * (sub_w + z_gap)
        top = pad
        cells_left = left + row_w
        for i, line in enumerate(z_lines[k] if z_lines else []):
            # centred over the cells where it fits, else over the whole sub-grid
            lw = _text_w(font, line)
            x0 = cells_left + (body_w - lw) // 2 if lw <= body_w else left + (sub_w - lw) // 2
            draw.text((max(left, x0), top + i * line_h), line, fill="black", font=font)
        cells_top = top + title_h + header_h
        for c, lines in enumerate(col_lines):
            x0 = cells_left + c * (cell_w + gap)
            y0 = top + title_h + header_h - pad - len(lines) * line_h  # bottom-aligned over the cells
            for i, line in enumerate(lines):
                draw.text((x0 + (cell_w - _text_w(font, line)) // 2, y0 + i * line_h), line, fill="black", font=font)
        for r, lines in enumerate(row_lines):
            y0 = cells_top + r * (cell_h + gap) + (cell_h - len(lines) * line_h) // 2
            for i, line in enumerate(lines):
                draw.text(
                    (left + pad + row_text_w - _text_w(font, line), y0 + i * line_h), line, fill="black", font=font
                )
        for r in range(n_rows):
            for c in range(n_cols):
                x0 = cells_left + c * (cell_w + gap)
                y0 = cells_top + r * (cell_h + gap)
                grid.paste(images[k][r][c].convert("RGB"), (x0, y0))
                boxes[(k, r, c)] = (x0, y0, x0 + cell_w, y0 + cell_h)
    return grid, GridLayout(width, height, boxes)


def batch_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """The images of a batch in one picture, left to right then top to bottom, no labels and no gaps (as
    A1111's batch grid); ``cols`` defaults to ceil(sqrt(n)). Empty places are black."""
    if not images:
        raise UsageError("a grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    if cols < 1:
        raise UsageError(f"a grid needs at least one column, got {cols}")
    rows = math.ceil(n / cols)
    w, h = images[0].size
    if any(im.size != (w, h) for im in images):
        raise UsageError("the images of a grid must all have the same size")
    grid = Image.new("RGB", (cols * w, rows * h), "black")
    for i, im in enumerate(images):
        grid.paste(im.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


# ----------------------------------------------------------------------------------------------- running


@dataclass
class XYZResult:
    """A finished plot: its cells (with their arguments), each cell's generation result and the grid."""

    cells: list[Cell]
    results: list[Any]  # sdengine.pipeline.GenerationResult of each cell, in the order of ``cells``
    grid: Image.Image
    layout: GridLayout


def run_xyz(
    pipe: Callable[..., Any],
    prompt: str,
    base: Mapping[str, Any],
    x: Axis,
    y: Axis | None = None,
    z: Axis | None = None,
    *,
    on_cell: Callable[[int, int, Cell], None] | None = None,
    on_result: Callable[[int, Cell, Any], None] | None = None,
) -> XYZResult:
    """Generate every cell of the plot with ``pipe`` (a :class:`sdengine.pipeline.Pipeline`; one image per
    cell) and draw the grid. ``on_cell(done, total, cell)`` is called before each generation and
    ``on_result(i, cell, result)`` after it (to save each image as soon as it exists). A ``-1`` on a seed axis
    is drawn first (:func:`fix_axis_seeds`), so its label is the seed used."""
    x = fix_axis_seeds(x)
    y, z = (fix_axis_seeds(a) if a is not None else None for a in (y, z))
    cells = plan_cells(prompt, {**base, "batch_size": 1}, x, y, z)
    results = []
    for i, cell in enumerate(cells):
        if on_cell is not None:
            on_cell(i, len(cells), cell)
        kw = dict(cell.kwargs)
        results.append(pipe(kw.pop("prompt"), **kw))
        if on_result is not None:
            on_result(i, cell, results[-1])
    n_rows = len(y.values) if y else 1
    n_z = len(z.values) if z else 1
    images = [[[None] * len(x.values) for _ in range(n_rows)] for _ in range(n_z)]
    for cell, res in zip(cells, results, strict=True):
        images[cell.z][cell.row][cell.col] = res.images[0]
    grid, layout = draw_xyz_grid(
        images,  # type: ignore[arg-type]
        col_labels=[x.label(v) for v in x.values],
        row_labels=[y.label(v) for v in y.values] if y else None,
        z_labels=[z.label(v) for v in z.values] if z else None,
    )
    return XYZResult(cells, results, grid, layout)


__all__ = [
    "ALIASES",
    "AXES",
    "MAX_CELLS",
    "Axis",
    "Cell",
    "GridLayout",
    "XYZResult",
    "axis_name",
    "batch_grid",
    "default_schedule",
    "draw_xyz_grid",
    "fix_axis_seeds",
    "label_font",
    "label_size",
    "parse_axis",
    "plan_cells",
    "run_xyz",
]
