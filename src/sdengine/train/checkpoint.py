"""Training runs in a folder: resume a run, refuse to replace one, or start it again; one run at a time.

The checkpoint file itself (atomic write, safe read) is :mod:`sdengine.io.checkpoint`; this module re-exports
it so trainers import one place. A ``*.tmp`` file left by a crash mid-write is never picked up on resume.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sdengine import distributed
from sdengine.errors import SdengineError, UsageError
from sdengine.io.checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint
from sdengine.io.paths import check_name, is_inside

# The file format moved to sdengine.io.checkpoint (loaders below the trainers read it); re-exported here.
__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "LOCK_NAME",
    "RunExistsError",
    "RunLockedError",
    "check_resumable",
    "ensure_new_run",
    "load_checkpoint",
    "locks_out_dir",
    "model_identity",
    "run_lock",
    "save_checkpoint",
]


def model_identity(model: str | Path) -> str:
    """What a run was trained on, as its checkpoint records it: a file or folder by its resolved absolute path (so
    ``./m`` and ``m`` are one model), a built-in name (``emoji``) as it is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def check_resumable(
    out_dir: str | Path,
    same: Mapping[str, tuple[str, Any]] | None = None,
    trained_on: Mapping[str, tuple[str, Any]] | None = None,
    force: bool = False,
) -> None:
    """Raise ``CheckpointError`` unless ``out_dir`` holds a readable checkpoint. Trainers call this before
    their slow set-up (data, models), so a bad ``--resume`` fails at once and changes nothing.

    ``same``: ``{meta key: (flag, value)}``, settings the resumed run must share with the checkpoint's run (as
    the seed): e.g. the embedding's ``--name``, which names the file the run writes. ``trained_on``: the same for
    what the run learns from, its ``--model`` (:func:`model_identity`) or ControlNet ``--condition``: another one
    of the same shape would load and train on without a word, the result fitting neither; refused unless
    ``force`` (``--force-resume``: the model file was moved, or the user means it). A checkpoint without the key
    (an older release's) is not checked."""
    path = Path(out_dir) / CHECKPOINT_NAME
    state = load_checkpoint(path)
    meta = state.get("meta") if isinstance(state, dict) else None
    checks = [(k, v, False) for k, v in (same or {}).items()]
    checks += [(k, v, True) for k, v in (trained_on or {}).items() if not force]

    def said(flag: str, value: Any) -> str:  # None: the flag was not given (a run started without --init)
        return f"with {flag} {value}" if value is not None else f"without {flag}"

    for key, (flag, value), can_force in checks:
        if isinstance(meta, dict) and key in meta and meta[key] != value:
            also = f", or add --force-resume to continue it {said(flag, value)}" if can_force else ""
            was, now = said(flag, meta[key]), value if value is not None else "without it"
            raise CheckpointError(
                f"checkpoint {path} was trained {was}, not {now}: resume {was}, or train into another --out{also}"
            )


class RunExistsError(SdengineError, ValueError):
    """The output folder already holds a training run and neither resuming nor overwriting was asked for."""


def ensure_new_run(
    out_dir: str | Path,
    *,
    resume: bool,
    overwrite: bool,
    outputs: Iterable[str] = (),
    same: Mapping[str, tuple[str, Any]] | None = None,
    data: str | Path | None = None,
    trained_on: Mapping[str, tuple[str, Any]] | None = None,
    force_resume: bool = False,
) -> list[Path]:
    """Decide what a trainer may do with ``out_dir`` before its slow set-up; returns the paths removed.

    A folder holds a run when it has a ``checkpoint.pt`` or one of ``outputs`` (the names a trainer exports,
    e.g. ``"lora.safetensors"`` or ``"controlnet"``). Then: ``resume`` continues it (the checkpoint must be
    readable, and its run must share the settings ``same`` names, and ``trained_on``'s unless ``force_resume``:
    see :func:`check_resumable`), ``overwrite``
    deletes the old run's checkpoint, left-over checkpoint temp files and outputs (nothing else) so that the new
    run starts clean, and neither is a ``RunExistsError``: running the same
    command twice must never silently replace finished work. ``data``: the trainer's image folder, which must not
    hold ``out_dir`` (the run's images would become training images).
    """
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise UsageError("--resume and --overwrite exclude each other: continue the run or replace it")
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a folder")
    if force_resume and not resume:
        raise UsageError("--force-resume continues a run: give it with --resume")
    if resume:
        check_resumable(out_dir, same, trained_on, force_resume)
    if data is not None and Path(data).is_dir() and is_inside(data, out_dir):
        raise UsageError(
            f"--out {out_dir} is inside --data {data}: the run's loss plot and samples would be read as training "
            "images; choose an --out outside the data folder"
        )
    if resume:
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


# ---------------------------------------------------------------------------------------------------
# One run per folder at a time

LOCK_NAME = ".sdengine-train.lock"
_LOCK_TRIES = 5


class RunLockedError(SdengineError, RuntimeError):
    """Another training run (another process, or another thread of this one) is writing to the same folder."""


@dataclass
class _Held:
    thread: int
    count: int
    fd: int
    path: Path
    created: list[Path]


_held: dict[str, _Held] = {}
_held_guard = threading.Lock()


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting: True when taken, False when another holder has it."""
    try:
        import fcntl
    except ImportError:  # Windows: a one-byte lock far past the text, so the holder's line stays readable
        import msvcrt

        os.lseek(fd, 1 << 20, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # type: ignore[attr-defined]
        except OSError:
            return False
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(text: str) -> str:
    """The lock file's line, in words: 'pid 123 on host, started 2026-01-01 10:00:00 UTC: sdengine train ...'."""
    try:
        info = json.loads(text)
        words = f"pid {int(info['pid'])} on {info.get('host', '?')}, started {info.get('started', '?')}"
    except (ValueError, TypeError, KeyError):
        return "a run that is starting" if not text.strip() else "an unknown run"
    command = " ".join(str(info.get("command", "")).split())
    if len(command) > 160:
        command = command[:157] + "..."
    return f"{words}: {command}" if command else words


def _read(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    data = os.read(fd, 4096)
    return data.decode("utf-8", "replace")


def _acquire(out_dir: Path) -> _Held:
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"output {out_dir} exists and is not a folder")
    created = [p for p in (out_dir, *out_dir.parents) if not p.exists()]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK_NAME
    try:
        for _ in range(_LOCK_TRIES):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = _try_lock(fd)
            except OSError as e:  # a file system without locks (some network mounts): run unguarded, say so
                os.close(fd)
                print(
                    f"note: cannot lock {out_dir} ({e}): nothing stops a second run from writing there too",
                    file=sys.stderr,
                )
                return _Held(threading.get_ident(), 1, -1, path, created)
            if not locked:
                holder = _holder(_read(fd))
                os.close(fd)
                raise RunLockedError(
                    f"{out_dir} is in use by another training run ({holder}); wait for it to end, or train into "
                    "another --out"
                )
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous.strip():  # its process ended without removing the file (killed): the lock is free
                print(
                    f"note: {out_dir}: taking over the lock of a run that is no longer running ({_holder(previous)})",
                    file=sys.stderr,
                )
            line = json.dumps(
                {
                    "pid": os.getpid(),
                    "host": socket.gethostname(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                    "command": " ".join(["sdengine", *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
                }
            )
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (line + "\n").encode())
            return _Held(threading.get_ident(), 1, fd, path, created)
    except BaseException:
        _remove_created(created)
        raise
    _remove_created(created)
    raise RunLockedError(f"{out_dir} is in use by another training run (its lock file keeps changing)")


def _remove_created(created: list[Path]) -> None:
    for p in created:  # innermost first; a folder that has anything in it stays
        try:
            p.rmdir()
        except OSError:
            break


def _release(held: _Held) -> None:
    if held.fd < 0:
        return
    try:
        if os.path.samestat(os.fstat(held.fd), os.stat(held.path)):
            held.path.unlink()  # while still locked, so that nobody locks a file that is about to go
    except OSError:
        pass
    os.close(held.fd)
    _remove_created(held.created)


@contextlib.contextmanager
def run_lock(out_dir: str | Path) -> Iterator[None]:
    """Hold ``out_dir``'s run lock for the duration: a second run on the same folder (another process, or another
    thread) is a ``RunLockedError`` naming the folder and the run that holds it, while the same thread may take
    it again (a trainer calls the shared loop on its own folder). The lock is ``OUT/.sdengine-train.lock``, a
    ``flock``-ed file holding the holder's pid, host, start time and command; the kernel drops the lock when its
    process ends, however it ends, so the file of a killed run is taken over (with a note). The file is removed
    when the run ends, and so is ``out_dir`` if this made it and it is still empty (a refused ``--resume``
    leaves nothing behind). Under torchrun rank 0 holds it for the job: the other ranks take nothing."""
    if not str(out_dir).strip():  # Path("") is "."; an unset variable in a script (--out "$OUT"), not a choice
        raise UsageError("--out is empty: give the folder the run writes to")
    env = distributed.env_world()
    if env is not None and env.rank != 0:
        yield
        return
    out_dir = Path(out_dir)
    key = os.path.realpath(out_dir)
    me = threading.get_ident()
    with _held_guard:
        held = _held.get(key)
        if held is not None and held.thread == me:
            held.count += 1
        else:
            held = None
    if held is None:
        held = _acquire(out_dir)  # another thread's lock fails here: its flock is on another open file
        with _held_guard:
            _held[key] = held
    try:
        yield
    finally:
        with _held_guard:
            held.count -= 1
            last = held.count == 0
            if last:
                del _held[key]
        if last:
            _release(held)


P = ParamSpec("P")
R = TypeVar("R")


def locks_out_dir(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator for a trainer with an ``out_dir`` argument: the whole call holds :func:`run_lock` on it."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        out_dir = signature.bind(*args, **kwargs).arguments["out_dir"]
        with run_lock(out_dir):
            return fn(*args, **kwargs)

    return wrapper
