"""Names that must stay inside a configured folder (LoRA names, model names, uploads, image names).

A name that comes from outside (a prompt's ``<lora:NAME:W>`` tag, a PNG's parameters, an HTTP request)
may only ever select a file *inside* its folder. The rule: reject absolute names, drive letters,
backslashes, NUL bytes and ``..`` segments outright (after percent-decoding, so that ``%2e%2e%2f``
is seen too), then resolve with ``realpath`` and require the result to lie under the folder's own
realpath (so a symlink that points out is refused as well).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import unquote

from sdengine.errors import SdengineError

NAME_MAX = 255  # bytes of one file or folder name (ext4, NTFS, APFS...)


class UnsafePathError(SdengineError, ValueError):
    """A name that would select a file outside its configured folder."""


class ExternalName(str):
    """A name that came from outside the Python caller (a prompt's ``<lora:NAME>`` tag, a PNG's parameters, an
    HTTP field). Functions that accept either a path or a name look an ``ExternalName`` up only inside their
    folder (:func:`resolve_inside`), never as a path of its own; a plain ``str`` from the caller may be a path."""

    __slots__ = ()


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` (with forward slashes) if it is a plain relative name; else raise UnsafePathError."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what}: expected a non-empty name, got {name!r}")
    decoded = name
    for _ in range(3):  # %252e%252e -> %2e%2e -> ..
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        decoded = nxt
    for candidate in (name, decoded):
        if "\x00" in candidate or "\\" in candidate:
            raise UnsafePathError(f"{what} {name!r}: backslashes and NUL bytes are not allowed")
        if candidate.startswith("/") or (len(candidate) > 1 and candidate[1] == ":"):
            raise UnsafePathError(f"{what} {name!r}: absolute paths are not allowed, give a name inside the folder")
        if any(part == ".." for part in candidate.split("/")):
            raise UnsafePathError(f"{what} {name!r}: '..' is not allowed, give a name inside the folder")
    longest = max(len(part.encode("utf-8", "surrogatepass")) for part in name.split("/"))
    if longest > NAME_MAX:  # no file system stores it: the OS error (with the folder's path) was a 500
        raise UnsafePathError(
            f"{what} {name[:40]!r}...: a part of it is {longest} bytes long, over the {NAME_MAX} a file name may have"
        )
    return name


def resolve_inside(
    root: str | os.PathLike[str], name: str, what: str = "name", suffixes: Iterable[str] = ("",)
) -> Path:
    """The existing file ``root/name[+suffix]``, guaranteed (by realpath) to lie inside ``root``.

    ``suffixes`` are tried in order (``""`` = the name as given). Raises UnsafePathError for a name that
    escapes and FileNotFoundError (naming the folder, not the outside path) for one that is not there.
    """
    check_name(name, what)
    base = Path(os.path.realpath(root))
    for suffix in suffixes:
        target = Path(os.path.realpath(base / (name + suffix)))
        if not is_inside(base, target):
            raise UnsafePathError(f"{what} {name!r} resolves outside {root} (a symlink out of the folder?)")
        if target.exists():
            return target
    raise FileNotFoundError(f"{what} {name!r} not found in {root}")


def is_inside(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> bool:
    """True when ``path`` (after realpath) is ``root`` or lies under it (after realpath)."""
    base = os.path.realpath(root)
    target = os.path.realpath(path)
    return target == base or target.startswith(base.rstrip(os.sep) + os.sep)


def file_state(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(total size in bytes, newest modification time in ns) of a file, or of every file under a folder: what a
    cache of loaded files keys an entry on, so that a file replaced at the same path is read again.
    ``OSError`` when it cannot be read."""
    p = Path(path)
    files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
    stats = [f.stat() for f in files]
    return sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0)


def walk_folders_once(root: str | os.PathLike[str]) -> Iterator[tuple[str, list[str], list[str]]]:
    """``os.walk(root)`` following linked folders, each real folder once: a link back to a parent would otherwise
    be walked until the path is too long, and two such links take exponential time. A folder that cannot be
    read is passed over. Callers may prune or sort the yielded ``dirs`` in place, as with ``os.walk``."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirs, names in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        yield dirpath, dirs, names
