"""Random tiny model folders built once per test process and copied where each later call asks for them.

The builders (``make_flux_folder``, ``make_sd3_folder``, ...) seed torch themselves and write the same files for
the same arguments, so a second call with those arguments gets a copy of the first one's folder (into its own
``dst``: a test may change its copy) instead of building the diffusers models and tokenizers again, and torch's
random state afterwards is the one the build would have left. ``SDENGINE_TEST_FOLDER_CACHE=0`` turns it off.
"""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

F = TypeVar("F", bound=Callable[..., Path])

_BUILT: dict[tuple[Any, ...], tuple[Path, torch.Tensor]] = {}
_ROOT: list[Path] = []


def _root() -> Path:
    if not _ROOT:
        root = Path(tempfile.mkdtemp(prefix="sdengine-test-folders-"))
        atexit.register(shutil.rmtree, root, True)
        _ROOT.append(root)
    return _ROOT[0]


def built_once(build: F) -> F:
    """``build(dst, *args, **kw)`` (which writes a folder at ``dst`` and returns it), run once per process for each
    set of arguments; later calls copy that folder to their ``dst``."""

    @functools.wraps(build)
    def cached(dst: Path, *args: Any, **kw: Any) -> Path:
        dst = Path(dst)
        if os.environ.get("SDENGINE_TEST_FOLDER_CACHE") == "0":
            return build(dst, *args, **kw)
        key = (build.__module__, build.__qualname__, args, tuple(sorted(kw.items())))
        if key not in _BUILT:  # what is written does not depend on the folder's name (nor on torch's random state)
            src = Path(tempfile.mkdtemp(dir=_root())) / "folder"
            build(src, *args, **kw)
            _BUILT[key] = (src, torch.get_rng_state())
        src, rng = _BUILT[key]
        shutil.copytree(src, dst, dirs_exist_ok=True)
        torch.set_rng_state(rng)
        return dst

    return cached  # type: ignore[return-value]
