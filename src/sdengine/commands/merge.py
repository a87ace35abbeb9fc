"""``sdengine merge A B [C]``: AUTOMATIC1111's Checkpoint Merger on single files (sdengine.weights.merge)."""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from ..errors import UsageError

METHOD_CHOICES = ("weighted_sum", "add_difference", "no_interpolation")


def run(a: argparse.Namespace) -> int:
    if not math.isfinite(a.multiplier):
        raise UsageError(f"--multiplier must be a finite number, got {a.multiplier}")
    models = [a.a, *a.models]
    if len(models) > 3:
        raise UsageError(f"at most three models (A B C), got {len(models)}")
    wanted = {"weighted_sum": 2, "add_difference": 3, "no_interpolation": 1}[a.method]
    if len(models) != wanted:
        formula = {"weighted_sum": "A * (1 - M) + B * M", "add_difference": "A + (B - C) * M"}.get(a.method, "A")
        names = " ".join("ABC"[:wanted])
        raise UsageError(
            f"--method {a.method} takes {wanted} model{'s' if wanted > 1 else ''} ({names}: {formula}), "
            f"got {len(models)}"
        )
    from ..io.atomic import remove_stale_temp_files
    from ..weights.merge import describe_method, merge_checkpoints

    out = Path(a.out)
    if out.parent.is_dir():
        remove_stale_temp_files(out.parent)  # leftovers of a merge killed mid-write
    t = time.perf_counter()
    report = merge_checkpoints(
        models[0],
        models[1] if wanted > 1 else None,
        models[2] if wanted > 2 else None,
        out=out,
        method=a.method,
        multiplier=a.multiplier,
        fp16=a.fp16,
        bake_vae=a.bake_vae,
        discard=a.discard_weights,
        discard_ema=a.discard_ema,
        overwrite=a.overwrite,
    )
    took = time.perf_counter() - t
    print(f"{describe_method(a.method, a.multiplier)} -> {report.path} in {took:.1f} s: {report.summary()}")
    if report.config is not None:
        print(f"config copied beside it: {report.config}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "merge",
        help="merge checkpoints as A1111's Checkpoint Merger (weighted sum, add difference)",
        description="Merge single-file checkpoints key by key, one tensor at a time: weighted_sum A*(1-M) + B*M, "
        "add_difference A + (B-C)*M, no_interpolation A alone (with --fp16 / --bake-vae / --discard-*). The result "
        "is a .safetensors file with A1111's sd_merge_recipe metadata.",
    )
    p.add_argument("a", metavar="A", help="model A (.safetensors or .ckpt): its network is the result's")
    p.add_argument("models", metavar="B [C]", nargs="*", help="model B, and model C for add_difference")
    p.add_argument("--method", choices=METHOD_CHOICES, default="weighted_sum", help="how to combine them")
    p.add_argument(
        "--multiplier", "-M", type=float, default=0.3, help="M (0 gives A under weighted_sum; A1111's default 0.3)"
    )
    p.add_argument("--out", required=True, help="the merged model, a .safetensors file")
    p.add_argument("--fp16", action="store_true", help="write float32 tensors as float16 (half the size)")
    p.add_argument("--bake-vae", default=None, metavar="FILE", help="a VAE file whose weights replace the result's")
    p.add_argument("--discard-ema", action="store_true", help="leave out the EMA copy (model_ema.*)")
    p.add_argument(
        "--discard-weights", default=None, metavar="REGEX", help="leave out keys matching this regular expression"
    )
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.set_defaults(func=run)
