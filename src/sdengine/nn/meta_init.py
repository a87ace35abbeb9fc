"""Initialisers that do nothing on meta tensors, while a model whose weights are about to be loaded is built.

A model loaded from a file is built on the meta device (shapes, no memory) and then takes the file's tensors.
Its layers' constructors still run their initialisers (``nn.init.normal_``, ``kaiming_uniform_``, ...) on those
meta tensors. That computes nothing, but the first such call in a process is not free: some of PyTorch's meta
kernels are Python decompositions, and the first one imports the machinery behind them (functorch, sympy):
about 1 s on the 2-core CPU, a third of ``sdengine generate``'s start-up, for values nobody reads.

:func:`skip_meta_init` turns the in-place fill and random-fill operations into no-ops for meta tensors (every
other tensor, and every other operation, is untouched). It is a ``TorchFunctionMode``, which PyTorch keeps per
thread, so a server thread loading a model never changes what another thread computes.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

# What nn.init's functions call on the tensor they fill (trunc_normal_ also uses erfinv_, mul_, add_, clamp_;
# orthogonal_ and the like copy_ into it). Each returns its own tensor unchanged in shape.
INITIALISERS: frozenset[str] = frozenset(
    {
        "normal_",
        "uniform_",
        "zero_",
        "fill_",
        "copy_",
        "erfinv_",
        "mul_",
        "add_",
        "clamp_",
        "exponential_",
        "bernoulli_",
        "random_",
    }
)


class _SkipMetaInit(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in INITIALISERS:
            # A Tensor method gets its tensor first; nn.init's functions pass theirs as the keyword "tensor".
            target = args[0] if args else kwargs.get("tensor")
            if isinstance(target, torch.Tensor) and target.device.type == "meta":
                return target
        return func(*args, **kwargs)


@contextmanager
def skip_meta_init() -> Iterator[None]:
    """Inside, in-place initialisers on meta tensors return at once (this thread only); see the module
    docstring."""
    with _SkipMetaInit():
        yield


__all__ = ["INITIALISERS", "skip_meta_init"]
