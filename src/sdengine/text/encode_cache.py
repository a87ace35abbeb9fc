"""Text-encoder outputs remembered across calls: the same prompt is encoded once.

A server, an X/Y plot or a seed sweep sends the same prompt and negative prompt again and again; the text
encoder's forward pass is the only part of their conditioning that costs anything (tokenising, emphasis and
padding are cheap). :func:`cached_call` runs ``compute()`` once per ``key`` and network state and hands out
copies of the remembered result afterwards.

What makes an entry valid: the ``key`` the caller builds from everything the output depends on besides the
weights (token ids, clip skip, the textual-inversion vectors in use, the context length), and the network's
fingerprint (sdengine.nn.fingerprint: every weight's storage and version counter, so a fused LoRA, a dtype or
device move or ``load_state_dict`` gives a new state; the weight tensors are also held weakly, so new weights at a
freed address are not taken for the old ones). It is bypassed, neither read nor filled, when:

* autograd is on (a trainer encodes with gradients: textual inversion, a text-encoder LoRA);
* the network carries forward hooks (a LoRA applied unfused patches hooks on, and two LoRAs with the same
  number of hooks would look alike to the fingerprint);
* a weight is an inference tensor (made under ``torch.inference_mode``): it has no version counter, so an
  in-place change to it could not be seen;
* the cache is switched off: ``SDENGINE_TEXT_CACHE=0``.

Each network has its own least-recently-used table of at most ``SDENGINE_TEXT_CACHE`` entries (default 64;
an SD 1.5 prompt's states are 236 kB in fp32, SDXL's 630 kB). A table is dropped with its network.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch
from torch import nn

from sdengine.errors import UsageError
from sdengine.nn.fingerprint import module_fingerprint

DEFAULT_ENTRIES = 64
ENV = "SDENGINE_TEXT_CACHE"

T = TypeVar("T")


def max_entries() -> int:
    """Entries kept per network, from ``$SDENGINE_TEXT_CACHE`` (0 switches the cache off)."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_ENTRIES
    try:
        n = int(raw)
    except ValueError:
        raise UsageError(f"{ENV} must be a whole number of entries (0 switches the cache off), got {raw!r}") from None
    if n < 0:
        raise UsageError(f"{ENV} must be >= 0 (0 switches the cache off), got {n}")
    return n


class _Table:
    def __init__(self) -> None:
        self.fingerprint: tuple[Any, ...] | None = None
        # The weight tensors themselves, weakly: a storage address is only a name while its tensor lives, so
        # new weights at a freed address (with fresh version counters) must not pass for the old ones.
        self.tensors: list[weakref.ref[torch.Tensor]] = []
        self.entries: OrderedDict[Hashable, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0


_tables: weakref.WeakKeyDictionary[nn.Module, _Table] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _copy(value: T) -> T:
    """A copy the caller may change in place without touching the cache: tensors cloned, tuples and lists
    rebuilt, anything else (ints, strings, None) shared."""
    if isinstance(value, torch.Tensor):
        return value.clone()  # type: ignore[return-value]
    if isinstance(value, tuple):
        return tuple(_copy(v) for v in value)  # type: ignore[return-value]
    if isinstance(value, list):
        return [_copy(v) for v in value]  # type: ignore[return-value]
    return value


def _weights(module: nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _same(refs: list[weakref.ref[torch.Tensor]], tensors: list[torch.Tensor]) -> bool:
    return len(refs) == len(tensors) and all(r() is t for r, t in zip(refs, tensors, strict=True))


def cached_call(module: nn.Module, key: Hashable, compute: Callable[[], T]) -> T:
    """``compute()``, or a copy of what it returned the last time with this ``key`` while ``module``'s weights
    were the same (see the module notes for when the cache is bypassed). ``compute`` must return tensors,
    tuples/lists of them, or plain values."""
    limit = max_entries()
    if limit == 0 or torch.is_grad_enabled():
        return compute()
    fingerprint = module_fingerprint(module)
    if fingerprint[1] or any(t[2] is None for t in fingerprint[0]):
        return compute()  # forward hooks (an unfused LoRA), or weights whose in-place changes cannot be seen
    with _lock:
        table = _tables.get(module)
        if table is None:
            table = _tables[module] = _Table()
        tensors = _weights(module)
        if table.fingerprint != fingerprint or not _same(table.tensors, tensors):
            table.entries.clear()
            table.fingerprint = fingerprint
            table.tensors = [weakref.ref(t) for t in tensors]
        if key in table.entries:
            table.entries.move_to_end(key)
            table.hits += 1
            return _copy(table.entries[key])
        table.misses += 1
    value = compute()
    with _lock:
        if table.fingerprint == fingerprint:
            table.entries[key] = _copy(value)
            while len(table.entries) > limit:
                table.entries.popitem(last=False)
    return value


def cache_info(module: nn.Module) -> dict[str, int]:
    """``{"entries", "hits", "misses"}`` of ``module``'s table (zeros when it has none)."""
    with _lock:
        table = _tables.get(module)
        if table is None:
            return {"entries": 0, "hits": 0, "misses": 0}
        return {"entries": len(table.entries), "hits": table.hits, "misses": table.misses}


def clear(module: nn.Module | None = None) -> None:
    """Forget ``module``'s entries (every network's when None)."""
    with _lock:
        if module is None:
            _tables.clear()
        else:
            _tables.pop(module, None)


__all__ = ["DEFAULT_ENTRIES", "ENV", "cache_info", "cached_call", "clear", "max_entries"]
