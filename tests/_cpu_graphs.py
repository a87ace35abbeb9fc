"""A stand-in for CUDA graph recording on the CPU (the backend of sdengine.cuda_graphs.GraphedCallable), and a
check of what a recording could not contain (:class:`HostTraffic`, with the ``meta`` device playing the GPU).

A CUDA graph cannot be recorded without a GPU, so tests replace the recording backend by one with the same
contract: it runs the function ``warmup`` times, keeps the output of one more call as the static output, and its
replay re-runs the function on the static inputs and writes the result INTO that static output.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode


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


def images_per_recorded_loop(pipe: Any, settings: list[dict[str, Any]], **args: Any) -> tuple[list[Any], Any]:
    """Records ``pipe``'s denoising loop with :class:`CPUBackend` (``record_after=0``) and generates "a red cube"
    (negative "blurry", keywords ``args``) once per setting in ``settings``, asserting that each setting records a
    loop of its own (the stand-in replays the first plan of a key, so a setting missing from the key would show as
    another setting's image), that its image is the plain path's (no graphs), and that no two neighbouring
    settings give the same image. Returns the images and the loop graph."""
    import numpy as np

    def plain(**kw: Any) -> Any:
        graphs, pipe.cuda_graphs = pipe.cuda_graphs, None
        try:
            return pipe("a red cube", "blurry", **args, **kw).arrays
        finally:
            pipe.cuda_graphs = graphs

    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    loop = pipe.cuda_graphs["loop"]
    images = []
    for n, kw in enumerate(settings, start=1):
        images.append(pipe("a red cube", "blurry", **args, **kw).arrays)
        assert loop.recordings == n
        np.testing.assert_array_equal(images[-1], plain(**kw))
    for a, b in zip(images, images[1:], strict=False):
        assert not np.array_equal(a, b)
    return images, loop


class _Dispatch(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
        name = str(func.overloadpacket.__name__)
        if name == "_local_scalar_dense" and any(t.device.type == "meta" for t in tensors):
            self.seen.append(f"{name}: a device tensor read back")  # (the call below then fails on meta)
        out = func(*args, **kwargs)
        if name in ("to", "_to_copy", "copy_") and isinstance(out, torch.Tensor) and out.device.type == "meta":
            if any(t.device.type == "cpu" for t in tensors):
                self.seen.append(f"{name}: host tensor of shape {tuple(tensors[0].shape)} copied to the device")
        return out


class _Factories(TorchFunctionMode):
    """``torch.tensor(data, device=...)`` and its kin: host data copied to the device before any dispatch."""

    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        factory = func in (torch.tensor, torch.as_tensor, torch.asarray)
        host_data = bool(args) and not isinstance(args[0], torch.Tensor)  # a tensor's own copy is seen by _Dispatch
        if factory and host_data and str(kwargs.get("device", "")).startswith("meta"):
            self.seen.append(f"{func.__name__}: host data copied to the device")
        return func(*args, **kwargs)


class HostTraffic:
    """Every operation that would copy between the host and the device, with the device played by ``meta``: a
    tensor read back (``item``, ``float``, ``bool``), a host tensor copied over, or host data made into a device
    tensor (``torch.tensor(..., device=...)``). Inside a CUDA graph's recording each one fails (a read back waits
    on the GPU; a copy from pageable host memory too). ``seen`` lists them."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._modes = (_Factories(self.seen), _Dispatch(self.seen))

    def __enter__(self) -> HostTraffic:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
