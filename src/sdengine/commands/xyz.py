"""``sdengine xyz PROMPT --x NAME=VALUES [--y ...] [--z ...]``: an X/Y/Z plot as A1111 makes it.

One image per cell (every cell the same seed unless ``seed`` is an axis), each saved like ``sdengine generate``
saves (``NNNNN-SEED.png`` with its A1111 ``parameters``, so ``--from-png`` makes any cell again), and one
labelled grid ``xyz-NNNNN.png``. The axes and their values are described in :mod:`sdengine.grids`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import SdengineError, UsageError
from .generate import lora_arg, next_index, output_target

if TYPE_CHECKING:
    from ..pipeline import GenerationResult

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
# the flag of each pipeline keyword an axis may set (sdengine.grids.AXES)
AXIS_FLAGS = {
    "steps": "--steps",
    "sampler": "--sampler",
    "schedule": "--schedule",
    "cfg_scale": "--cfg",
    "seed": "--seed",
    "strength": "--strength",
    "clip_skip": "--clip-skip",
}


def run(a: argparse.Namespace) -> int:
    from PIL import PngImagePlugin

    from ..grids import AXES, fix_axis_seeds, parse_axis, plan_cells, run_xyz
    from ..imageio import save_image_atomic
    from ..metadata import save_png
    from ..pipeline import load_pipeline

    if Path(a.out).suffix.lower() in IMAGE_SUFFIXES:
        raise UsageError(f"--out {a.out!r} names an image; it is the folder the cells and the grid are written to")
    output_target(a.out, 1)  # not a file, nor under one, and writable: before any cell is drawn
    if a.strength is not None and a.init_image is None:  # as generate (and the strength axis): never dropped
        raise UsageError("--strength has no effect without --init-image (img2img): drop it, or add the init image")
    # a -1 on a seed axis is drawn now, so the labels, the cells' files and the grid's record name the seed used
    x = fix_axis_seeds(parse_axis(a.x))
    y = fix_axis_seeds(parse_axis(a.y)) if a.y else None
    z = fix_axis_seeds(parse_axis(a.z)) if a.z else None
    given = {
        "negative_prompt": a.negative,
        "steps": a.steps,
        "sampler": a.sampler,
        "schedule": a.schedule,
        "cfg_scale": a.cfg,
        "seed": a.seed,
        "width": a.width,
        "height": a.height,
        "strength": a.strength,
        "clip_skip": a.clip_skip,
        "init_image": a.init_image,
        "mask": a.mask,
        "lora_dir": a.lora_dir,
    }
    base = {k: v for k, v in given.items() if v is not None}
    # a flag for what an axis sets: every cell takes the axis's value, so the flag would change nothing
    for which, axis in (("X", x), ("Y", y), ("Z", z)):
        key = AXES[axis.name][1] if axis is not None else None
        if axis is not None and key is not None and key in base:
            flag = AXIS_FLAGS[key]
            raise UsageError(
                f"{flag} {base[key]} has no effect: {axis.name} is the {which} axis, whose values every cell takes "
                f"(drop {flag}, or make it a value of the axis)"
            )
    if a.lora:
        base["loras"] = [lora_arg(t) for t in a.lora]
    base["progress"] = not a.no_progress

    # Every one-line error (prompt S/R text not found, sampler/schedule mismatch) before the model loads; the
    # seed drawn here is the one every cell gets.
    cells = plan_cells(a.prompt, base, x, y, z)
    if a.lora_dir is not None and not a.lora and Path(a.lora_dir).is_dir():  # as generate: never looked at
        from .generate import names_loras

        if not names_loras(*(str(c.kwargs.get("prompt") or "") for c in cells)):
            raise UsageError(
                "--lora-dir is where <lora:NAME> tags and --lora names are looked up: no cell's prompt has such a "
                "tag and no --lora is given, so it would change nothing"
            )
    if base.get("seed") in (None, -1):
        base["seed"] = cells[0].kwargs["seed"]
    from ..pipeline.core import as_request

    for k, cell in enumerate(cells):  # every cell's settings (a cfg of 101, a seed past 2**64 - 1) before any runs
        fields = {key: v for key, v in cell.kwargs.items() if key != "progress"}
        try:
            as_request(fields.pop("prompt", ""), None, fields).precheck()
        except SdengineError as e:
            raise UsageError(f"cell {k + 1}/{len(cells)}: {e}") from None

    t0 = time.perf_counter()
    pipe = load_pipeline(a.model, device=a.device, dtype=a.dtype, embeddings_dir=a.embeddings_dir)
    t1 = time.perf_counter()

    def on_cell(i: int, n: int, cell: object) -> None:
        if not a.no_progress:
            print(f"cell {i + 1}/{n}", file=sys.stderr)

    out = Path(a.out)
    index = next_index(out) if out.is_dir() else 0

    def on_result(i: int, cell: object, r: GenerationResult) -> None:
        # each image is saved as soon as it exists: an interrupted plot keeps what it made
        print(save_png(r.images[0], out / f"{index + i:05d}-{r.seeds[0]}.png", r.infotexts[0]), flush=True)

    res = run_xyz(pipe, a.prompt, base, x, y, z, on_cell=on_cell, on_result=on_result)
    t2 = time.perf_counter()
    # The grid is not one generation, so it carries no 'parameters' (--from-png would make one cell of it);
    # it records the plot instead.
    info = PngImagePlugin.PngInfo()
    plot = {
        "prompt": a.prompt,
        "model": a.model,
        **{n: list(ax.values) for n, ax in (("x", x), ("y", y), ("z", z)) if ax is not None},
        "axes": [ax.name for ax in (x, y, z) if ax is not None],
        "seed": res.cells[0].kwargs.get("seed"),
    }
    info.add_text("sdengine-xyz", json.dumps(plot, ensure_ascii=False))
    grid_path = save_image_atomic(res.grid, out / f"xyz-{index:05d}.png", pnginfo=info)
    print(grid_path)
    print(
        f"{len(res.cells)} cells in {t2 - t1:.1f} s (model loaded in {t1 - t0:.1f} s), seed "
        f"{res.cells[0].kwargs.get('seed')}, grid {res.grid.width}x{res.grid.height}",
        file=sys.stderr,
    )
    return 0


class OneAxis(argparse.Action):
    """``--x``/``--y``/``--z`` given once: argparse keeps the last of a repeated flag, so ``--x steps=1,2 --x
    cfg=1,2`` once plotted cfg alone, without a word; an axis flag takes one ``NAME=VALUES``."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        before = getattr(namespace, self.dest, None)
        if before is not None:
            raise argparse.ArgumentError(
                self,
                f"given twice ({before} and {values}): one NAME=VALUES each; --x, --y and --z are the three axes",
            )
        setattr(namespace, self.dest, values)


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "xyz",
        help="X/Y/Z plot: a labelled grid over steps, sampler, schedule, cfg, seed, strength, clip_skip, prompt S/R",
        description="Generate one image per combination of the axes' values and write them (PNGs with their "
        "parameters) and one labelled grid. An axis is NAME=V1,V2,...: steps, sampler, schedule, cfg, seed, "
        "strength, clip_skip, or prompt (search and replace: the first value is found in the prompt and each "
        "value replaces it). Number axes take ranges: 10-30 (+10), 1-9 [3]. Quote values with commas: "
        "prompt='apple,\"red, shiny\"'. Every cell has the same seed unless seed is an axis.",
    )
    p.add_argument("prompt", help="the prompt of every cell (A1111 syntax)")
    p.add_argument(
        "--x", action=OneAxis, required=True, metavar="NAME=VALUES", help="the axis across, e.g. steps=10,20,30"
    )
    p.add_argument(
        "--y", action=OneAxis, default=None, metavar="NAME=VALUES", help="the axis down, e.g. sampler=euler,dpmpp_2m"
    )
    p.add_argument("--z", action=OneAxis, default=None, metavar="NAME=VALUES", help="one grid per value, side by side")
    p.add_argument("--model", default="emoji", help="model folder, file or built-in name (default: emoji)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument("--steps", type=int, default=None, help="steps where not an axis (default 25)")
    p.add_argument("--sampler", default=None, help="sampler where not an axis (default dpmpp_2m)")
    p.add_argument(
        "--schedule", default=None, help="schedule where not an axis (default: karras where the sampler takes it)"
    )
    p.add_argument("--cfg", type=float, default=None, help="guidance scale where not an axis (default 7.5)")
    p.add_argument("--seed", type=int, default=None, help="the seed of every cell; -1 or none = one random seed")
    p.add_argument("--width", type=int, default=None, help="default: the model's size")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--init-image", default=None, help="img2img source (needed for a strength axis)")
    p.add_argument("--strength", type=float, default=None, help="img2img denoising strength where not an axis")
    p.add_argument("--mask", default=None, help="inpainting mask, white = repaint")
    p.add_argument("--clip-skip", type=int, default=None, help="A1111's clip skip where not an axis (CLIP models)")
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="FILE[:WEIGHT[:UNET_WEIGHT]]",
        help="a LoRA (repeatable); two weights: the text encoder's, the U-Net's",
    )
    p.add_argument("--lora-dir", default=None, help="where <lora:NAME> tags are looked up")
    p.add_argument("--embeddings-dir", default=None, help="textual-inversion embeddings, used by file name in prompts")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"])
    p.add_argument("--out", default="outputs", help="output folder (default outputs)")
    p.add_argument("--no-progress", action="store_true", help="no progress output")
    p.set_defaults(func=run)
