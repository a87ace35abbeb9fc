"""CUDA graphs for the networks a generation calls many times with the same shapes.

A U-Net step of SD 1.5 is about a thousand kernel launches. Run eagerly, the GPU waits on Python between them
(diffusers' eager fp16 step on an H200: 28 ms, most of it idle). A CUDA graph records the launches of one call
once and replays them as one unit, so the GPU runs them back to back.

:class:`GraphedCallable` wraps a callable (the U-Net, the VAE's decode): the first call with a new *signature*
(each tensor argument's shape, dtype, device and strides; every other argument's value) runs it eagerly
``warmup`` times on a side stream (cuDNN picks its algorithms, ``torch.compile`` compiles) and then records it
into a graph with static input buffers. Every later call with that signature copies its tensors into those
buffers, replays the graph and returns a copy of its output. Graphs are kept per signature (at most
``max_graphs``, least recently used dropped).

A graph replays the kernels it recorded, on the memory it recorded; so the wrapper falls back to plain calls, or
records again, whenever that could differ:

* not CUDA (every CPU call is a plain call: the same code path, which the tests cover), autograd on, or a
  stream already capturing;
* an argument that is neither a tensor nor a hashable constant;
* the network's *fingerprint* changed (:func:`module_fingerprint`: every parameter's and buffer's storage
  address and version counter, and the count of forward hooks, which is how LoRAs are patched on): all its
  graphs are dropped (and a wrapped ahead-of-time compiled network binds its weights again);
* recording failed (a call inside that synchronises with the CPU): that signature runs eagerly from then on,
  with one warning;
* the wrapper's ``guard`` says no: state the fingerprint cannot see (the text encoder's textual-inversion
  vectors, a plain attribute read by a branch the graph would not take again).

A network called from deep inside other code (the text encoder, called by the prompt encoder) is reached with
:func:`through`: ``through(module)`` is the graphed callable :func:`route` registered for that module when it
is usable now, else the module itself.

A graph reads the weights afresh at every replay, so weights changed in place (``load_state_dict`` into the same
tensors) would need no new recording; the version counter drops the graphs anyway, because what a graph wraps
may have folded weights in (sdengine.aot), and recording again costs a few calls.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.nn.fingerprint import ModuleWatch, module_fingerprint

log = logging.getLogger(__name__)

Backend = Callable[[Callable[[], Any], int], tuple[Callable[[], None], Any]]


@dataclass
class _Entry:
    inputs: list[Tensor]  # the static input buffers, in argument order
    replay: Callable[[], None]
    output: Any  # the static output (a tensor or a structure of tensors)


def _tensor_key(t: Tensor) -> tuple[Any, ...]:
    return ("T", tuple(t.shape), t.dtype, str(t.device), tuple(t.stride()), t.requires_grad)


def call_signature(args: Sequence[Any], kwargs: dict[str, Any]) -> tuple[Hashable, list[Tensor]] | None:
    """(hashable key, tensor arguments in order), or None when an argument cannot be keyed."""
    key: list[Any] = []
    tensors: list[Tensor] = []
    items = [(None, a) for a in args] + sorted(kwargs.items())
    for name, value in items:
        if isinstance(value, Tensor):
            key.append((name, _tensor_key(value)))
            tensors.append(value)
        elif value is None or isinstance(value, bool | int | float | str):
            key.append((name, ("V", type(value).__name__, value)))
        else:
            return None
    return tuple(key), tensors


def _rebuild(
    args: Sequence[Any], kwargs: dict[str, Any], tensors: Iterator[Tensor]
) -> tuple[list[Any], dict[str, Any]]:
    """``args``/``kwargs`` with each tensor replaced by the next of ``tensors`` (the static buffers)."""
    new_args = [next(tensors) if isinstance(a, Tensor) else a for a in args]
    new_kwargs = {k: kwargs[k] for k in kwargs}
    for k in sorted(kwargs):
        if isinstance(kwargs[k], Tensor):
            new_kwargs[k] = next(tensors)
    return new_args, new_kwargs


def _copy_out(out: Any) -> Any:
    """A fresh copy of a static output: a tensor, a tuple/list, or a dataclass of tensors (None kept)."""
    if isinstance(out, Tensor):
        return out.clone()
    if out is None or isinstance(out, bool | int | float | str):
        return out
    if isinstance(out, tuple) and hasattr(out, "_fields"):  # a NamedTuple
        return type(out)(*(_copy_out(v) for v in out))
    if isinstance(out, list | tuple):
        return type(out)(_copy_out(v) for v in out)
    if is_dataclass(out) and not isinstance(out, type):
        return replace(out, **{f.name: _copy_out(getattr(out, f.name)) for f in fields(out)})
    raise TypeError(f"cannot copy a graph output of type {type(out).__name__}")


def cuda_graph_backend(fn: Callable[[], Any], warmup: int) -> tuple[Callable[[], None], Any]:
    """Run ``fn`` ``warmup`` times on a side stream, then record one call into a CUDA graph.
    Returns (replay, static output)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: another thread of the process (a server answering a status request) may use CUDA meanwhile
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph.replay, out


class GraphedCallable:
    """``fn`` (a network's forward, or any callable of tensors) replayed from CUDA graphs; see the module
    docstring. ``module``: the network whose weights and hooks ``fn`` reads (its fingerprint is checked by
    :meth:`check`). ``backend`` records a call (tests pass one that runs on the CPU)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        module: nn.Module | None = None,
        name: str = "network",
        warmup: int = 2,
        max_graphs: int = 4,
        backend: Backend | None = None,
        device_type: str = "cuda",
        guard: Callable[[], bool] | None = None,
    ) -> None:
        self.fn = fn
        self.guard = guard
        self.module = module
        self.name = name
        self.warmup = warmup
        self.max_graphs = max_graphs
        self.backend: Backend = backend or cuda_graph_backend
        self.device_type = device_type
        self.graphs: OrderedDict[Hashable, _Entry] = OrderedDict()
        self.eager: set[Hashable] = set()  # signatures whose recording failed
        self.watch = ModuleWatch(module)
        self.replays = 0
        self.recordings = 0
        # One call at a time: a call copies into the static inputs, replays and copies the static output out; a
        # second thread (a server decoding a preview on demand while the worker decodes) would mix them up.
        self._lock = threading.RLock()

    def usable(self) -> bool:
        """Whether graphs may serve the next generation: never while the module has forward hooks (a patched
        LoRA's weight can change between calls without changing the module); and every graph is dropped when
        the module's weights moved since they were recorded. Call it once per generation (the pipeline does)."""
        with self._lock:  # a preview decoded on a request thread may be between looking up and using a graph
            moved, hooked = self.watch.check()
            if moved:
                self.reset()
                reset = getattr(self.fn, "reset", None)  # an ahead-of-time compiled network binds its weights again
                if reset is not None:
                    reset()
        return not hooked and (self.guard is None or self.guard())

    def reset(self) -> None:
        with self._lock:
            self.graphs.clear()
            self.eager.clear()

    def _eligible(self, tensors: list[Tensor]) -> bool:
        if not tensors or any(t.device.type != self.device_type for t in tensors):
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        if self.device_type == "cuda" and torch.cuda.is_current_stream_capturing():
            return False
        return True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = call_signature(args, kwargs)
        if sig is None or not self._eligible(sig[1]):
            return self.fn(*args, **kwargs)
        key, tensors = sig
        if key in self.eager:
            return self.fn(*args, **kwargs)
        with self._lock:
            if self.device_type == "cuda":  # record and replay with the inputs' GPU current (one per GPU)
                with torch.cuda.device(tensors[0].device):
                    return self._run(key, args, kwargs, tensors)
            return self._run(key, args, kwargs, tensors)

    def _run(self, key: Hashable, args: Sequence[Any], kwargs: dict[str, Any], tensors: list[Tensor]) -> Any:
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._record(key, args, kwargs, tensors)
            if entry is None:
                return self.fn(*args, **kwargs)
            fresh = True
        else:
            self.graphs.move_to_end(key)
            fresh = False
        # Static buffers made under inference_mode (a generation) are written outside it too (a caller's own
        # encode_prompt): an inference tensor may only be changed inside that mode.
        with torch.inference_mode(any(b.is_inference() for b in entry.inputs)):
            if not fresh:
                for buf, t in zip(entry.inputs, tensors, strict=True):
                    buf.copy_(t)
            entry.replay()
        self.replays += 1
        return _copy_out(entry.output)

    def _record(
        self, key: Hashable, args: Sequence[Any], kwargs: dict[str, Any], tensors: list[Tensor]
    ) -> _Entry | None:
        inputs = [t.detach().clone() for t in tensors]
        call_args, call_kwargs = _rebuild(args, kwargs, iter(inputs))
        try:
            replay, output = self.backend(lambda: self.fn(*call_args, **call_kwargs), self.warmup)
            _copy_out(output)  # an output the wrapper cannot copy is refused here, before it is kept
        except Exception as e:  # noqa: BLE001 - any failure to record means: run this signature eagerly
            self.eager.add(key)
            log.warning("%s: CUDA graph not recorded (%s: %s); running it without one", self.name, type(e).__name__, e)
            return None
        entry = _Entry(inputs, replay, output)
        self.graphs[key] = entry
        self.recordings += 1
        while len(self.graphs) > self.max_graphs:
            self.graphs.popitem(last=False)
        return entry


# module id -> its graphed callable, held weakly: the owner (the pipeline's cuda_graphs) keeps it alive, and it
# keeps the module alive, so an entry never outlives its module and an id is never reused while it is here.
_routes: weakref.WeakValueDictionary[int, GraphedCallable] = weakref.WeakValueDictionary()


def route(module: nn.Module, graphed: GraphedCallable | None) -> None:
    """Calls of ``module`` made through :func:`through` go to ``graphed`` (None: to the module again) for as long
    as the caller keeps ``graphed``."""
    if graphed is None:
        _routes.pop(id(module), None)
    else:
        _routes[id(module)] = graphed


def through(module: Any) -> Any:
    """What to call for ``module`` now: its routed graphs when usable (weights unmoved or re-recorded, no
    hooks, the guard agreeing), else the module itself."""
    g = _routes.get(id(module))
    return g if g is not None and g.module is module and g.usable() else module


__all__ = [
    "GraphedCallable",
    "ModuleWatch",
    "call_signature",
    "cuda_graph_backend",
    "module_fingerprint",
    "route",
    "through",
]
