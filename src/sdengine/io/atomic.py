"""Atomic writes: a file (or a folder) appears under its final name complete, or not at all.

The one scheme every writer in sdengine uses: a temporary file made by ``tempfile.mkstemp`` in the target's
own folder (so the final ``os.replace`` is a rename on one file system, atomic on POSIX and Windows), with a
name unique to this write (concurrent writers of one target never share a temporary file; the last rename
wins, whole), written, flushed and fsynced, renamed over the target, and the folder fsynced where the
platform allows (so the rename itself survives a power cut). Any error, including KeyboardInterrupt, removes
the temporary file and leaves the previous target untouched.

mkstemp creates files readable by their owner only; the finished file gets the mode a plain ``open`` would
give (``0o666`` minus the umask), since these are user-visible outputs.

Temporary names are ``.<target name>.<pid>.<random>.tmp``. A process that is killed (SIGKILL, power cut)
mid-write leaves one behind: :func:`remove_stale_temp_files` removes those whose process is gone, and the
training loop calls it when a run starts or resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sdengine.errors import UsageError

_TEMP_SUFFIX = ".tmp"
# `.<name>.<pid>.<mkstemp's 8 random chars>.tmp` (this module), or `.<name>.<pid>.tmp` (older releases).
_TEMP_RE = re.compile(r"^\..+\.(?P<pid>\d+)(?:\.[A-Za-z0-9_]{8})?\.tmp$")


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666`` minus the process umask."""
    return 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux reports it without changing it (os.umask can only read by setting, which races threads)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """fsync a folder so that a rename inside it is durable; a no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(
    path: str | os.PathLike[str], mode: str = "wb", *, encoding: str | None = None, newline: str | None = None
) -> Iterator[IO[Any]]:
    """``with atomic_write(path) as f: f.write(...)``: ``path`` gets the whole content when the block ends
    without an error, and is left as it was otherwise (no temporary file stays behind either way).

    ``mode``: ``"wb"`` (default) or ``"w"`` (text, with ``encoding``/``newline`` as ``open`` takes them).
    """
    if mode not in ("wb", "w"):
        raise UsageError(f"atomic_write: mode must be 'wb' or 'w', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with open(fd, mode, encoding=encoding, newline=newline) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), file_mode())
        if not hasattr(os, "fchmod"):  # Windows
            os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """``with atomic_dir(dst) as tmp: <fill tmp>``: on success ``dst`` is replaced as a whole by the filled
    folder; on an error ``dst`` is left as it was and the partial folder is removed.

    A folder cannot be renamed over a non-empty one, so an existing ``dst`` is first renamed aside and removed
    after the new one is in place: there is a moment with no ``dst``, never one with a partial ``dst``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=_TEMP_SUFFIX, dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    fsync_dir(path.parent)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process (or no way to tell): leave its files alone
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str], recursive: bool = False) -> list[Path]:
    """Remove temporary files (and folders) that atomic writes of a killed process left in ``folder``.

    Only names of this module's scheme (``.<name>.<pid>.<random>.tmp``) whose process is no longer running
    are removed, so a writer that is still at work in the same folder keeps its file. (The process test is
    per machine: on a folder shared between machines, run it where the writers ran.) Returns what was removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    removed: list[Path] = []
    candidates = root.rglob(".*" + _TEMP_SUFFIX) if recursive else root.glob(".*" + _TEMP_SUFFIX)
    for p in sorted(candidates):
        m = _TEMP_RE.match(p.name)
        if m is None or _alive(int(m["pid"])):
            continue
        try:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        except FileNotFoundError:
            continue
        removed.append(p)
    return removed


__all__ = [
    "atomic_dir",
    "atomic_write",
    "file_mode",
    "fsync_dir",
    "remove_stale_temp_files",
    "write_bytes_atomic",
    "write_text_atomic",
]
