"""Training checkpoints: written atomically, read back safely, resumed exactly.

A checkpoint is one ``torch.save`` file holding plain tensors, numbers, strings, lists and dicts only,
so it loads with ``weights_only=True`` (no code can run on load). It is first written under a
temporary name in the same folder and then renamed over the old one (``sdengine.io.atomic``): a crash
mid-write leaves the previous checkpoint untouched, and a ``*.tmp`` file is never picked up on resume.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from sdengine.errors import SdengineError, UsageError
from sdengine.io.atomic import atomic_write
from sdengine.io.paths import check_name

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = "sdengine-train-checkpoint"
_VERSION = 1


class CheckpointError(SdengineError, RuntimeError):
    """A checkpoint is missing, unreadable or not one of ours."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically (temporary file, fsync, rename)."""
    path = Path(path)
    payload = {"format": _FORMAT, "version": _VERSION, **state}
    with atomic_write(path) as f:
        torch.save(payload, f)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear ``CheckpointError`` otherwise."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(f"no checkpoint to resume from at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to unpickle means the file is unusable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({first[:200]})") from e
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not an sdengine training checkpoint")
    return state


def check_resumable(out_dir: str | Path) -> None:
    """Raise ``CheckpointError`` unless ``out_dir`` holds a readable checkpoint. Trainers call this before
    their slow set-up (data, models), so a bad ``--resume`` fails at once and changes nothing."""
    load_checkpoint(Path(out_dir) / CHECKPOINT_NAME)


class RunExistsError(SdengineError, ValueError):
    """The output folder already holds a training run and neither resuming nor overwriting was asked for."""


def ensure_new_run(
    out_dir: str | Path, *, resume: bool, overwrite: bool, outputs: Iterable[str] = ()
) -> list[Path]:
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
    for p in removed:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    return removed
