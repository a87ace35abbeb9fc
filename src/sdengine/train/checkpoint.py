"""Training runs in a folder: resume a run, refuse to replace one, or start it again.

The checkpoint file itself (atomic write, safe read) is :mod:`sdengine.io.checkpoint`; this module re-exports
it so trainers import one place. A ``*.tmp`` file left by a crash mid-write is never picked up on resume.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path

from sdengine import distributed
from sdengine.errors import SdengineError, UsageError
from sdengine.io.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from sdengine.io.paths import check_name

# The file format moved to sdengine.io.checkpoint (loaders below the trainers read it); re-exported here.
__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "RunExistsError",
    "check_resumable",
    "ensure_new_run",
    "load_checkpoint",
    "save_checkpoint",
]


def check_resumable(out_dir: str | Path) -> None:
    """Raise ``CheckpointError`` unless ``out_dir`` holds a readable checkpoint. Trainers call this before
    their slow set-up (data, models), so a bad ``--resume`` fails at once and changes nothing."""
    load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)


class RunExistsError(SdengineError, ValueError):
    """The output folder already holds a training run and neither resuming nor overwriting was asked for."""


def ensure_new_run(out_dir: str | Path, *, resume: bool, overwrite: bool, outputs: Iterable[str] = ()) -> list[Path]:
    """Decide what a trainer may do with ``out_dir`` before its slow set-up; returns the paths removed.

    A folder holds a run when it has a ``checkpoint.pt`` or one of ``outputs`` (the names a trainer exports,
    e.g. ``"lora.safetensors"`` or ``"controlnet"``). Then: ``resume`` continues it (the checkpoint must be
    readable), ``overwrite`` deletes the old run's checkpoint, left-over checkpoint temp files and outputs
    (nothing else) so that the new run starts clean, and neither is a ``RunExistsError``: running the same
    command twice must never silently replace finished work.
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a folder")
    if resume:
        check_resumable(out_dir)
        return []
    names = [check_name(n, "output") for n in outputs]
    ckpt = out_dir / CHECKPOINT_NAME
    found = [p for p in (ckpt, *(out_dir / n for n in names)) if p.exists() or p.is_symlink()]
    if not found:
        if overwrite:
            distributed.barrier()  # every rank passes the same barriers (another rank may have found the run)
        return []
    if not overwrite:
        where = f"{found[0].name}"
        if ckpt.is_file():
            try:
                where += f" at step {int(load_checkpoint(ckpt).get('step', 0))}"
            except (CheckpointError, TypeError, ValueError):
                where += " (unreadable)"
        raise RunExistsError(
            f"{out_dir} already holds a training run ({where}); pass --resume to continue it or --overwrite to "
            "start again (the old run is deleted)"
        )
    removed = [*found, *sorted(out_dir.glob(f".{CHECKPOINT_NAME}.*.tmp"))]
    if distributed.current_world().is_main:  # under torchrun rank 0 deletes, the others wait for it
        for p in removed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    distributed.barrier()
    return removed
