"""Where one generation's time goes: a profiler trace of one image, cut into the pipeline's stages.

The GPU bench (sdengine.bench_gpu) times whole images and their parts alone; on the H200 the compiled path's
image took 190 ms while its 25 U-Net steps and its decode, each timed alone, add up to about 170 ms. This module
says where the rest goes. :func:`profile_image` runs one generation under ``torch.profiler`` (CPU, and the GPU's
kernels and copies when there is one) with each stage of the pipeline marked (:func:`stage_marks`: the text
encoders' ``conditioning_pair``, ``sample_latents``, which contains it, and ``decode_latents``), and
:func:`summarise` reads the trace:

* ``wall_ms``: the generation, as the caller sees it;
* ``gpu_busy_ms``: the time at least one kernel, copy or fill ran (the union of their intervals), and
  ``gpu_idle_ms``, the rest of the wall time: the GPU waiting on the CPU (launches, Python, synchronisations);
* per stage (``image`` is what is outside every other mark: preparing the request, the images out): the CPU
  time inside its mark (inclusive: ``sampling`` contains ``text``), and the GPU time of what it launched (each
  kernel belongs to the innermost mark around its launch);
* ``gaps``: the longest idle stretches of the GPU inside the generation, each with the mark the CPU was in when
  it began and the stage of the GPU work that ended it.

A kernel replayed from a CUDA graph is traced with its graph's launch, so it is attributed like a launched one.
On the CPU there are no GPU events: the stages' CPU times are all the summary has (the tests check them there,
and the GPU arithmetic on a made-up trace).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PREFIX = "sdengine."
# pipeline method -> stage name; the methods are public and every generation goes through them
STAGES = {"conditioning_pair": "text", "sample_latents": "sampling", "decode_latents": "decode"}
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")


@contextmanager
def stage_marks(pipe: Any) -> Iterator[None]:
    """Within the block, each of the pipeline's stage methods runs inside ``record_function("sdengine.STAGE")``
    (an instance attribute over the method; removed again on exit)."""
    from torch.profiler import record_function

    def marked(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            with record_function(PREFIX + name):
                return fn(*args, **kwargs)

        return call

    for method, stage in STAGES.items():
        setattr(pipe, method, marked(stage, getattr(pipe, method)))
    try:
        yield
    finally:
        for method in STAGES:
            vars(pipe).pop(method, None)


def profile_image(pipe: Any, generate: Callable[[], Any], *, top_gaps: int = 10) -> dict[str, Any]:
    """Profile one call of ``generate`` (one generation with ``pipe``) and :func:`summarise` its trace."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    cuda = torch.device(pipe.device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize(pipe.device)
    with stage_marks(pipe), profile(activities=activities) as prof:
        with record_function(PREFIX + "image"):
            generate()
            if cuda:
                torch.cuda.synchronize(pipe.device)
    with tempfile.TemporaryDirectory(prefix="sdengine-trace-") as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text()).get("traceEvents", [])
    return summarise(events, top_gaps=top_gaps)


def _union_ms(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total / 1000.0


def summarise(events: list[dict[str, Any]], *, top_gaps: int = 10) -> dict[str, Any]:
    """The module docstring's summary of a Chrome trace's events (times in microseconds, as torch writes them)."""
    marks = [
        e
        for e in events
        if e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(PREFIX) and "dur" in e
    ]
    image = next((m for m in marks if m["name"] == PREFIX + "image"), None)
    if image is None:
        raise ValueError("the trace has no sdengine.image mark")
    t0, t1 = float(image["ts"]), float(image["ts"]) + float(image["dur"])
    marks = [m for m in marks if t0 <= float(m["ts"]) <= t1]

    def innermost(ts: float) -> str:
        inside = [m for m in marks if float(m["ts"]) <= ts <= float(m["ts"]) + float(m["dur"])]
        best = min(inside, key=lambda m: float(m["dur"]), default=image)
        return str(best["name"]).removeprefix(PREFIX)

    launches = {
        e["args"]["correlation"]: float(e["ts"])
        for e in events
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})
    }
    gpu = sorted(
        (float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0)), e)
        for e in events
        if e.get("cat") in GPU_CATEGORIES and t0 <= float(e["ts"]) <= t1
    )
    stages: dict[str, dict[str, Any]] = {}
    for m in marks:
        s = stages.setdefault(str(m["name"]).removeprefix(PREFIX), {"cpu_ms": 0.0, "gpu_events": 0})
        s["cpu_ms"] += float(m["dur"]) / 1000.0
    spans: dict[str, list[tuple[float, float]]] = {}
    stage_of: list[str] = []
    for a, b, e in gpu:
        launch = launches.get(e.get("args", {}).get("correlation"))
        stage = innermost(launch) if launch is not None else "unattributed"
        stage_of.append(stage)
        spans.setdefault(stage, []).append((a, b))
        stages.setdefault(stage, {"cpu_ms": 0.0, "gpu_events": 0})["gpu_events"] += 1
    for stage, s in stages.items():
        s["gpu_busy_ms"] = _union_ms(spans.get(stage, []))
    busy = _union_ms([(a, b) for a, b, _ in gpu])
    gaps = []
    end, next_i = t0, 0
    for i, (a, b, _) in enumerate(gpu):
        if a > end:
            gaps.append((a - end, end, i))
        end = max(end, b)
        next_i = i + 1
    if t1 > end:
        gaps.append((t1 - end, end, next_i))
    gaps.sort(key=lambda g: -g[0])
    wall = (t1 - t0) / 1000.0
    return {
        "wall_ms": wall,
        "gpu_busy_ms": busy,
        "gpu_idle_ms": wall - busy if gpu else None,
        "gpu_events": len(gpu),
        "stages": stages,
        "gaps": [
            {
                "ms": length / 1000.0,
                "at_ms": (start - t0) / 1000.0,
                "cpu_in": innermost(start),
                "ended_by": stage_of[i] if i < len(stage_of) else "end of the image",
            }
            for length, start, i in gaps[:top_gaps]
        ]
        if gpu
        else [],
    }


__all__ = ["STAGES", "profile_image", "stage_marks", "summarise"]
