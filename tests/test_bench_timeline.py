"""sdengine.bench_timeline: one generation's trace cut into the pipeline's stages (on the CPU: the stages' CPU
times; the GPU arithmetic on a made-up trace)."""

from __future__ import annotations

import pytest

import sdengine
from sdengine.bench_timeline import STAGES, profile_image, summarise


def test_a_cpu_generation_is_cut_into_its_stages(tiny_sd1_folder):
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    out = profile_image(pipe, lambda: pipe("a red cube", "blurry", steps=3, seed=1, progress=False))
    stages = out["stages"]
    assert set(STAGES.values()) | {"image"} <= set(stages)
    assert out["wall_ms"] >= stages["sampling"]["cpu_ms"] >= stages["text"]["cpu_ms"] > 0  # text inside sampling
    assert stages["decode"]["cpu_ms"] > 0
    assert stages["sampling"]["cpu_ms"] + stages["decode"]["cpu_ms"] <= out["wall_ms"]
    assert out["gpu_events"] == 0 and out["gpu_idle_ms"] is None and out["gaps"] == []
    assert not any(m in vars(pipe) for m in STAGES)  # the marks are gone again


def _mark(name, ts, dur):
    return {"cat": "user_annotation", "name": f"sdengine.{name}", "ts": ts, "dur": dur}


def _launch(corr, ts):
    return {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5, "args": {"correlation": corr}}


def _kernel(corr, ts, dur):
    return {"cat": "kernel", "name": "k", "ts": ts, "dur": dur, "args": {"correlation": corr}}


def test_gpu_busy_time_idle_gaps_and_stages_of_a_made_up_trace():
    events = [
        _mark("image", 0, 1000),
        _mark("sampling", 0, 800),
        _mark("text", 0, 200),
        _mark("decode", 800, 150),
        _launch(1, 50),
        _launch(2, 300),
        _launch(3, 850),
        _kernel(1, 100, 50),
        _kernel(2, 400, 300),
        _kernel(2, 450, 100),  # overlaps the one before: counted once
        _kernel(3, 860, 40),
        _kernel(9, 2000, 10),  # after the image: not counted
        {"cat": "cpu_op", "name": "aten::add", "ts": 10, "dur": 3},
    ]
    out = summarise(events)
    assert out["wall_ms"] == pytest.approx(1.0)
    assert out["gpu_busy_ms"] == pytest.approx(0.39) and out["gpu_idle_ms"] == pytest.approx(0.61)
    stages = out["stages"]
    assert stages["text"]["gpu_busy_ms"] == pytest.approx(0.05) and stages["text"]["gpu_events"] == 1
    assert stages["sampling"]["gpu_busy_ms"] == pytest.approx(0.3) and stages["sampling"]["gpu_events"] == 2
    assert stages["decode"]["gpu_busy_ms"] == pytest.approx(0.04)
    assert stages["sampling"]["cpu_ms"] == pytest.approx(0.8)
    gaps = [(g["ms"], g["at_ms"], g["cpu_in"], g["ended_by"]) for g in out["gaps"]]
    assert gaps == [
        (pytest.approx(0.25), pytest.approx(0.15), "text", "sampling"),
        (pytest.approx(0.16), pytest.approx(0.7), "sampling", "decode"),
        (pytest.approx(0.1), pytest.approx(0.0), "text", "text"),
        (pytest.approx(0.1), pytest.approx(0.9), "decode", "end of the image"),
    ]
    with pytest.raises(ValueError, match="no sdengine.image mark"):
        summarise([_mark("text", 0, 10)])
