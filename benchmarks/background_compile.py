"""Compiling the U-Net in a background thread while the main thread keeps calling it eagerly, on the CPU: whether
the compiled function can be installed afterwards without compiling again, and what the compile costs the
eager calls made meanwhile (the GIL and the cores are shared).

    python benchmarks/background_compile.py CACHE_DIR

Run it twice with the same CACHE_DIR (a cold, then a warm compile). The shipped ``emoji`` U-Net, batch 2 (one CFG
step), 2 threads. The background thread compiles ``unet._call_impl`` (what ``nn.Module.compile`` compiles) and
calls it once; the main thread calls the plain module until that is done, then installs the compiled function as
``nn.Module.compile`` would and calls it twice. The result (docs/gpu.md, "Not done") is why no "compile in the
background" option was built without a GPU to measure it on.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

if len(sys.argv) != 2:
    sys.exit(__doc__)
os.environ["TORCHINDUCTOR_CACHE_DIR"] = sys.argv[1]

import torch  # noqa: E402  (after the cache directory is set)

import sdengine  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    unet = pipe.unet
    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 500.0)
    cond, _ = pipe.conditioner.pair("a cat", "")
    kw = {"encoder_hidden_states": torch.cat([cond["crossattn"]] * 2)}
    if "vector" in cond:
        kw["class_labels"] = torch.cat([cond["vector"]] * 2)

    def call(fn: Callable[..., torch.Tensor] = unet) -> torch.Tensor:
        with torch.inference_mode():
            return fn(x, t, **kw)

    ref = call()
    eager = min(_timed(call) for _ in range(5))
    done: dict[str, Any] = {}

    def compile_in_background() -> None:
        t0 = time.perf_counter()
        fn = torch.compile(unet._call_impl)
        out = call(fn)
        done.update(fn=fn, seconds=time.perf_counter() - t0, diff=float((out - ref).abs().max()))

    thread = threading.Thread(target=compile_in_background)
    thread.start()
    calls, slowest = 0, 0.0
    while thread.is_alive():
        slowest = max(slowest, _timed(call))
        calls += 1
    thread.join()
    unet._compiled_call_impl = done["fn"]  # what nn.Module.compile sets
    first, second = _timed(call), _timed(call)
    print(
        f"compile in the background {done['seconds']:.1f} s (max abs {done['diff']:.1e}); meanwhile {calls} eager "
        f"calls, the slowest {slowest * 1000:.0f} ms (alone: {eager * 1000:.0f} ms); after installing it: first call "
        f"{first * 1000:.0f} ms, then {second * 1000:.0f} ms"
    )


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
