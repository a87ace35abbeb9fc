"""A stand-in for CUDA graph recording on the CPU (the backend of sdengine.cuda_graphs.GraphedCallable).

A CUDA graph cannot be recorded without a GPU, so tests replace the recording backend by one with the same
contract: it runs the function ``warmup`` times, keeps the output of one more call as the static output, and its
replay re-runs the function on the static inputs and writes the result INTO that static output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, torch.Tensor):
        dst.copy_(src)
    elif isinstance(dst, list | tuple):
        for d, s in zip(dst, src, strict=True):
            _copy_into(d, s)
    elif dataclasses.is_dataclass(dst):  # the text encoder's output
        for f in dataclasses.fields(dst):
            _copy_into(getattr(dst, f.name), getattr(src, f.name))


class CPUBackend:
    """Records as a CUDA graph does, on the CPU (see the module docstring)."""

    def __init__(self) -> None:
        self.recorded = 0
        self.replayed = 0

    def __call__(self, fn, warmup):
        for _ in range(warmup):
            fn()
        out = fn()
        self.recorded += 1

        def replay() -> None:
            self.replayed += 1
            _copy_into(out, fn())

        return replay, out
