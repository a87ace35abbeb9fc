"""Training checkpoint files: written atomically, read back safely.

A checkpoint is one ``torch.save`` file holding plain tensors, numbers, strings, lists and dicts only,
so it loads with ``weights_only=True`` (no code can run on load). It is first written under a
temporary name in the same folder and then renamed over the old one (:mod:`sdengine.io.atomic`): a crash
mid-write leaves the previous checkpoint untouched. The file format lives here, below the pipeline,
because loaders (the pixel DDPM reads a run's EMA weights) need it as well as the trainers
(:mod:`sdengine.train.checkpoint` adds the run-folder policy: resume, overwrite).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdengine.errors import SdengineError
from sdengine.io.atomic import atomic_write

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
