"""Errors a request can cause, each with the HTTP status it is answered with."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading

from sdengine.errors import SdengineError


class ServerError(SdengineError):
    """Base of the server's own refusals; ``status`` is the HTTP status code."""

    status = 400


class BadRequest(ServerError, ValueError):
    """A request the server cannot run (bad field, unknown name, unreadable image)."""

    status = 400


class Unprocessable(ServerError, ValueError):
    """A well-formed request that names nothing usable (the ControlNet extension's 422 answers)."""

    status = 422


class ServerFault(ServerError):
    """The server's own files cannot be read (e.g. its styles file, edited into something broken since start)."""

    status = 500


class Unauthorized(ServerError):
    status = 401


class Forbidden(ServerError):
    """A browser request from a foreign page (Origin), or a Host header that is not this server's."""

    status = 403


class NotFound(ServerError, LookupError):
    status = 404


class PayloadTooLarge(ServerError, ValueError):
    """A body over the byte limit, or an image over the pixel limit (found before decoding)."""

    status = 413


class BodyTimeout(ServerError):
    """A request body that stopped arriving (nothing for the server's body timeout): the connection is freed."""

    status = 408


class QueueFull(ServerError):
    """The job queue holds its maximum; the client should retry after ``retry_after`` seconds."""

    status = 429

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ClientQueueFull(QueueFull):
    """This client already has its share of the queue waiting (``--max-queued-per-client``); others are served."""


class ServerStopping(QueueFull):
    """The server is shutting down: no job is accepted (503, which a load balancer retries on another server)."""

    status = 503


class ServerConfigError(SdengineError, ValueError):
    """A server setting that is refused at start (a public bind without a key, a missing folder)."""


def status_of(exc: BaseException) -> int:
    """The HTTP status for an error raised while handling a request (400 for sdengine's input errors)."""
    if isinstance(exc, ServerError):
        return exc.status
    if isinstance(exc, FileNotFoundError):
        return 404
    return 400


# --- the server's own paths, kept out of what a client reads ------------------------------------------------------
# An error's text may hold an absolute path of the server (an OSError names the file it could not write, a loader
# the file it could not read): the folders a client names things in, the temp folder, the Python install. A
# client gave a name (a model, an image, a SaveImage prefix): it reads that name back, never where the server
# keeps it. Folders registered with :func:`register_client_folder` (the outputs, models, ComfyUI input/temp
# folders) are cut to the name inside them ("sub/x.png"); any other path under a private root (the temp folder,
# the home folder, the working folder, the Python install, the usual system prefixes) to its last part.

_CLIENT_FOLDERS: set[str] = set()
_FOLDERS_LOCK = threading.Lock()
_SYSTEM_PREFIXES = (
    "/tmp",
    "/var",
    "/home",
    "/root",
    "/usr",
    "/opt",
    "/srv",
    "/mnt",
    "/media",
    "/data",
    "/workspace",
    "/content",
    "/scratch",
    "/nfs",
    "/private",
    "/Users",
)
# an absolute path in quotes (as an OSError's repr shows it; spaces allowed), or one standing alone (to a space)
_QUOTED_PATH = re.compile(r"""(?P<q>['"])(?P<p>(?:[A-Za-z]:)?[\\/][^'"\n]*)(?P=q)""")
_BARE_PATH = re.compile(r"""(?<![\w.~%/\\'"-])(?P<p>(?:[A-Za-z]:[\\/]|/)[^\s'"]*)""")
# the words after a bare path, on its line: a server path with spaces ("/tmp/My Models/x.ckpt") goes on to the
# last word holding a separator inside it ("Models/x.ckpt"), within a few words and before a clause ends
_NEXT_WORD = re.compile(r"""[ \t]+(?P<w>[^\s'"]+)""")
_CONTINUATION_WORDS = 6


def _forms(path: str | os.PathLike[str]) -> set[str]:
    """The absolute spellings of ``path`` (as given, and with links resolved), without a trailing separator."""
    out: set[str] = set()
    try:
        spellings = (os.path.abspath(path), os.path.realpath(path))
    except OSError:  # a relative path while the working folder is gone
        return out
    for p in spellings:
        p = p.rstrip("/\\")
        if len(p) > 1:
            out.add(p)
    return out


def register_client_folder(path: str | os.PathLike[str] | None) -> None:
    """Name a folder clients name files in: a path inside it is answered as the name inside it."""
    if path is None:
        return
    with _FOLDERS_LOCK:
        _CLIENT_FOLDERS.update(_forms(path))


def _private_roots() -> list[str]:
    roots = set(_SYSTEM_PREFIXES)
    try:
        cwd = os.getcwd()
    except OSError:  # the working folder was removed: no path is under it
        cwd = sys.prefix
    for p in (tempfile.gettempdir(), os.path.expanduser("~"), cwd, sys.prefix, sys.base_prefix):
        roots |= _forms(p)
    roots |= _forms(os.path.dirname(os.path.dirname(__file__)))  # the sdengine package itself
    return sorted(roots, key=len, reverse=True)


def _inside(path: str, root: str) -> str | None:
    """``path``'s part inside ``root`` ("" for the root itself), or None."""
    if path == root:
        return ""
    for sep in ("/", "\\"):
        if path.startswith(root + sep):
            return path[len(root) + 1 :]
    return None


def _redact_one(path: str, roots: list[str]) -> str | None:
    """What a client reads for the absolute ``path``, or None when it is no path of the server's."""
    with _FOLDERS_LOCK:
        folders = sorted(_CLIENT_FOLDERS, key=len, reverse=True)
    for folder in folders:
        inner = _inside(path, folder)
        if inner is not None:
            return inner.replace("\\", "/") or "."
    windows = len(path) > 2 and path[1] == ":"
    if windows or any(_inside(path, r) is not None for r in roots):
        last = path.replace("\\", "/").rstrip("/").rpartition("/")[2]
        return last or "."
    return None


def redact_paths(text: str) -> str:
    """``text`` with every absolute path of the server replaced by the name a client knows (see above); other
    text (a route such as ``/v1/jobs``, a name the client sent) is left as it is."""
    if not isinstance(text, str) or ("/" not in text and "\\" not in text):
        return text
    roots = _private_roots()

    def quoted(m: re.Match[str]) -> str:
        new = _redact_one(m.group("p"), roots)
        return m.group(0) if new is None else f"{m.group('q')}{new}{m.group('q')}"

    return _redact_bare(_QUOTED_PATH.sub(quoted, text), roots)


def _redact_bare(text: str, roots: list[str]) -> str:
    out: list[str] = []
    at = 0
    for m in _BARE_PATH.finditer(text):
        if m.start() < at:  # inside a path already taken with its spaces
            continue
        path, end = m.group("p"), m.end()
        if _redact_one(path, roots) is None:  # a route, a path the client sent: as it is
            continue
        # a server path may hold spaces: it takes the words up to the last one that goes on with a separator,
        # looking a few words past each separator (the count starts again at each: "/tmp/a b c d e/f g h i j/x")
        pos = end
        budget = _CONTINUATION_WORDS if path[-1] not in ",;:!?" else 0
        while budget > 0:
            w = _NEXT_WORD.match(text, pos)
            if w is None or w.group("w")[0] in "/\\" or re.match(r"[A-Za-z]:[\\/]", w.group("w")):
                break  # the line ended, or another absolute path starts
            pos = w.end()
            word = w.group("w")
            budget -= 1
            if "/" in word or "\\" in word:
                end = pos
                budget = _CONTINUATION_WORDS
            if word[-1] in ",;:!?":  # a clause ends here
                break
        new = _redact_one(text[m.start() : end], roots)
        out += [text[at : m.start()], text[m.start() : end] if new is None else new]
        at = end
    out.append(text[at:])
    return "".join(out)


def redact_tree(value: object) -> object:
    """A JSON value with :func:`redact_paths` applied to every string in it."""
    if isinstance(value, str):
        return redact_paths(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_tree(v) for v in value]
    return value
