"""How long the compiled U-Net takes to start, on the CPU, and what was tried to shorten it: torch.compile of the
whole U-Net against "regional" compilation (each ResNet block and transformer on its own, identical blocks sharing
their compiled code), torch's caching precompile, and compiling in a background thread.

    python benchmarks/compile_start.py whole|regional|regional_static|whole_precompile|background CACHE_DIR

Run each mode twice with the same CACHE_DIR: the first run compiles from nothing (a cold start), the second finds
the compiled code (a warm start). The shipped ``emoji`` U-Net, batch 2 (one CFG step), 2 threads. The results
(docs/gpu.md, "Not done") were too small, or too uncertain without a GPU, to add a fast-path option for.

``whole_precompile``: the whole U-Net with torch's experimental caching precompile (``TORCH_CACHING_PRECOMPILE``:
Dynamo's traced bytecode saved beside inductor's code by ``torch.compiler.save_cache_artifacts()``, so that a warm
start would skip tracing, the bulk of a warm first call). On torch 2.13 its warm run fails inside Dynamo.

``background``: a thread compiles ``unet._call_impl`` (what ``nn.Module.compile`` compiles) and calls it once while
the main thread keeps calling the plain module; then the compiled function is installed as ``nn.Module.compile``
would install it. Printed: what the compile cost the eager calls made meanwhile (the GIL and the cores are
shared), and whether the installed function runs at once (no second compile).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

MODES = ("whole", "regional", "regional_static", "whole_precompile", "background")
if len(sys.argv) != 3 or sys.argv[1] not in MODES:
    sys.exit(__doc__)
MODE = sys.argv[1]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[2]
if MODE == "whole_precompile":  # read when torch._dynamo is imported
    os.environ["TORCH_CACHING_PRECOMPILE"] = "1"

import torch  # noqa: E402  (after the cache directory is set)

import sdengine  # noqa: E402
from sdengine.nn.resnet import ResnetBlock2D  # noqa: E402
from sdengine.nn.transformer import SpatialTransformer  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    unet = pipe.unet
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    cond, _ = pipe.conditioner.pair("a cat", "")
    kw = {"encoder_hidden_states": torch.cat([cond["crossattn"]] * 2)}
    if "vector" in cond:
        kw["class_labels"] = torch.cat([cond["vector"]] * 2)

    def call(fn: Any = unet) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x, t, **kw)

    def best_ms() -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        return min(times) * 1000

    ref, eager = call(), best_ms()
    if MODE == "background":
        background(unet, call, ref, eager)
        return
    if MODE == "whole":
        unet.compile()
    elif MODE == "whole_precompile":  # the precompile cache is keyed by the module's forward: torch.compile(module)
        compiled = torch.compile(unet)

        def call() -> torch.Tensor:
            with torch.inference_mode():
                return compiled(x, t, **kw)
    else:
        if MODE == "regional_static":
            torch._dynamo.config.recompile_limit = 64  # one compiled variant per block shape
        for m in unet.modules():
            if isinstance(m, ResnetBlock2D | SpatialTransformer):
                m.compile(dynamic=False if MODE == "regional_static" else None)
    t0 = time.perf_counter()
    out = call()
    first = time.perf_counter() - t0
    if MODE == "whole_precompile":
        torch.compiler.save_cache_artifacts()  # writes Dynamo's part of the cache
    diff = float((out - ref).abs().max())
    print(f"{MODE}: first call {first:.1f} s, then {best_ms():.1f} ms (eager {eager:.1f} ms), max abs {diff:.2e}")


def background(unet: torch.nn.Module, call: Any, ref: torch.Tensor, eager_ms: float) -> None:
    """The ``background`` mode (module docstring); ``call(fn)`` calls ``fn`` on the step's inputs."""
    done: dict[str, Any] = {}

    def compile_in_background() -> None:
        t0 = time.perf_counter()
        fn = torch.compile(unet._call_impl)
        out = call(fn)
        done.update(fn=fn, seconds=time.perf_counter() - t0, diff=float((out - ref).abs().max()))

    def timed() -> float:
        t0 = time.perf_counter()
        call()
        return time.perf_counter() - t0

    thread = threading.Thread(target=compile_in_background)
    thread.start()
    calls, slowest = 0, 0.0
    while thread.is_alive():
        slowest = max(slowest, timed())
        calls += 1
    thread.join()
    unet._compiled_call_impl = done["fn"]  # what nn.Module.compile sets
    first, second = timed(), timed()
    print(
        f"background: compile {done['seconds']:.1f} s (max abs {done['diff']:.1e}); meanwhile {calls} eager calls, "
        f"the slowest {slowest * 1000:.0f} ms (alone: {eager_ms:.0f} ms); after installing it: first call "
        f"{first * 1000:.0f} ms, then {second * 1000:.0f} ms"
    )


if __name__ == "__main__":
    main()
