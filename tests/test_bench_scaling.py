"""`sdengine bench --scaling` on the tiny random model: every point for both engines, the U-Net agreement, the
memory-estimate and time-budget skips, the JSON report, and the refusal of bad --sizes / --batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import sdengine
from sdengine import bench, bench_scaling
from sdengine.cli import main
from sdengine.errors import SdengineError


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return bench.make_random_folder(tmp_path_factory.mktemp("scaling") / "tiny", "tiny")


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _bench(folder: Path, *args: str) -> int:
    return main(["--threads", "1", "bench", "--model", str(folder), "--scaling", "--repeats", "1", *args])


def test_every_point_for_both_engines_and_they_agree(tiny_folder, tmp_path, capsys, keep_threads):
    pytest.importorskip("diffusers")
    out = tmp_path / "scaling.json"
    rc = _bench(tiny_folder, "--sizes", "64,32", "--batches", "2,1", "--steps", "4", "--no-memory", "--json", str(out))
    assert rc == 0
    raw = json.loads(out.read_text())
    assert raw["mode"] == "scaling" and raw["sizes"] == [32, 64] and raw["batches"] == [1, 2] and raw["steps"] == 4
    report = bench_scaling.ScalingReport.from_json(raw)
    assert report.to_json() == raw  # the JSON round-trips
    assert [(p.size, p.batch) for p in report.points] == [(32, 1), (32, 2), (64, 1), (64, 2)]
    for p in report.points:
        assert set(p.engines) == {"sdengine", "diffusers"}
        for name, e in p.engines.items():
            assert e.skipped is None and e.peak_rss_mb is None  # --no-memory: no child processes
            assert len(e.step_times_s) == 1 and len(e.decode_times_s) == 1
            assert e.step_s is not None and e.step_s > 0 and e.step_warmup_s is not None and e.step_warmup_s > 0
            assert e.decode_s is not None and e.decode_s > 0 and e.decode_warmup_s is not None
            assert e.total_s == pytest.approx(report.text[name].time_s + 4 * e.step_s + e.decode_s)
        # same weights, same inputs, fp32: the U-Nets and VAEs agree to float rounding
        assert p.unet_max_abs is not None and 0 <= p.unet_max_abs < 1e-4
        assert p.decode_max_abs is not None and 0 <= p.decode_max_abs < 1e-4
        assert p.step_ratio == pytest.approx(p.engines["sdengine"].step_s / p.engines["diffusers"].step_s)
        assert p.rss_ratio is None
    assert report.text_max_abs is not None and report.text_max_abs < 1e-4
    table = capsys.readouterr().out
    rows = [ln.split() for ln in table.splitlines() if ln.split()[:1] in (["32"], ["64"])]
    assert [r[:3] for r in rows] == [
        [s, b, e] for s in ("32", "64") for b in ("1", "2") for e in ("sdengine", "diffusers")
    ]
    assert report.unet_calls == 4 and "est. total = text + 4 x step + decode" in table and "step ratio" in table


def test_agreement_check_sees_a_difference(tiny_folder, monkeypatch, keep_threads):
    """The agreement is measured, not assumed: a peer whose U-Net output is off by 1e-3 is reported so."""
    pytest.importorskip("diffusers")
    real = bench_scaling.make_parts

    class Off:
        def __init__(self, inner):
            self.inner = inner

        def text(self, prompt, negative):
            return self.inner.text(prompt, negative)

        def step(self, x, t, context):
            return self.inner.step(x, t, context) + 1e-3

        def decode(self, latents):
            return self.inner.decode(latents)

    monkeypatch.setattr(bench_scaling, "make_parts", lambda engine, *a, **k: Off(real(engine, *a, **k)))
    torch.set_num_threads(1)
    r = bench_scaling.run_scaling(
        tiny_folder, model="tiny", sizes=(32,), batches=(1,), steps=2, repeats=1, memory=False
    )
    p = r.point(32, 1)
    assert p.unet_max_abs == pytest.approx(1e-3, rel=0.05)
    assert p.decode_max_abs is not None and p.decode_max_abs < 1e-4


def test_peak_rss_per_point_and_engine(tiny_folder, keep_threads):
    pytest.importorskip("diffusers")
    torch.set_num_threads(1)
    r = bench_scaling.run_scaling(tiny_folder, model="tiny", sizes=(32,), batches=(1,), steps=2, repeats=1)
    p = r.point(32, 1)
    for name in ("sdengine", "diffusers"):
        e = p.engines[name]
        # each engine's own fresh child: its VmHWM, not this process's memory (both engines are loaded here)
        assert e.peak_rss_mb is not None and 50 < e.peak_rss_mb < 1500, (name, e.peak_rss_mb, e.peak_note)
        assert e.peak_note is None and e.child_need_bytes is not None and e.child_need_bytes > e.need_bytes
    assert p.rss_ratio == pytest.approx(p.engines["sdengine"].peak_rss_mb / p.engines["diffusers"].peak_rss_mb)


def test_points_over_the_memory_budget_are_skipped(tiny_folder, keep_threads):
    """The budget is injectable: a point whose estimate is over it is skipped with the reason; a point whose
    timing fits but whose peak-memory child (a second copy of the weights) does not keeps its times."""
    torch.set_num_threads(1)
    pipe = sdengine.load_pipeline(tiny_folder, device="cpu", dtype="fp32")
    need = {s: bench_scaling.memory_need(pipe, s, 1, child=False) for s in (32, 64)}
    child_32 = bench_scaling.memory_need(pipe, 32, 1, child=True)
    assert need[64] > need[32] and child_32 > need[64]  # at this size the weights outweigh the activations
    assert child_32 - need[32] > bench_scaling.weights_bytes(pipe) > 0  # the child's copy of the weights
    budget = need[64] - 1
    r = bench_scaling.run_scaling(
        tiny_folder, model="tiny", sizes=(32, 64), batches=(1,), steps=2, repeats=1, compare=None, memory_budget=budget
    )
    ran, skipped = r.point(32, 1).engines["sdengine"], r.point(64, 1).engines["sdengine"]
    assert ran.skipped is None and ran.step_s is not None and ran.need_bytes == need[32]
    assert ran.peak_rss_mb is None and ran.peak_note is not None and ran.peak_note.startswith("skipped: needs ~")
    assert skipped.skipped is not None and skipped.skipped.startswith("needs ~") and "available" in skipped.skipped
    assert skipped.step_times_s == [] and skipped.total_s is None
    assert "skipped: needs ~" in r.table()


def test_compare_none_and_the_time_budget(tiny_folder, tmp_path, capsys, keep_threads):
    """Without diffusers; a step over --max-seconds skips every later point at least as large."""
    out = tmp_path / "r.json"
    rc = _bench(
        tiny_folder,
        "--compare",
        "none",
        "--no-memory",
        "--sizes",
        "32,64",
        "--batches",
        "1,2",
        "--steps",
        "3",
        "--sampler",
        "heun",
        "--max-seconds",
        "1e-9",
        "--json",
        str(out),
    )
    assert rc == 0
    r = bench_scaling.ScalingReport.from_json(json.loads(out.read_text()))
    first = r.point(32, 1).engines
    assert set(first) == {"sdengine"} and first["sdengine"].skipped is None and first["sdengine"].step_s
    assert r.point(32, 1).unet_max_abs is None and r.point(32, 1).step_ratio is None
    # Heun calls the U-Net twice per step but for the last: 5 calls in 3 steps, counted from the sampler itself
    assert r.sampler == "heun" and r.unet_calls == 5
    e = first["sdengine"]
    assert e.total_s == pytest.approx(r.text["sdengine"].time_s + 5 * e.step_s + e.decode_s)
    for size, batch in ((32, 2), (64, 1), (64, 2)):
        e = r.point(size, batch).engines["sdengine"]
        assert e.skipped is not None and "over --max-seconds" in e.skipped and "32 px, batch 1" in e.skipped
        assert e.step_times_s == []
    assert r.text["sdengine"].time_s > 0 and "diffusers" not in r.text
    table = capsys.readouterr().out
    assert table.count("skipped: the step at 32 px, batch 1") == 3


@pytest.mark.parametrize(
    "args, message",
    [
        (["--sizes", "30"], "--sizes: 30 is not a multiple of 8"),
        (["--sizes", "0"], "--sizes: 0 is not positive"),
        (["--sizes", "big"], "--sizes: 'big' is not a whole number"),
        (["--sizes", "256,,512"], "--sizes takes comma-separated"),
        (["--sizes", "16384"], "over the largest image side"),
        (["--batches", "0"], "--batches: 0 is not positive"),
        (["--batches", "1.5"], "--batches: '1.5' is not a whole number"),
        (["--size", "64"], "--size does not apply to --scaling"),
        (["--batch", "2"], "--batch does not apply to --scaling"),
        (["--cfg", "3"], "--cfg 3 does not apply to --scaling"),  # once taken without a word
        (["--max-seconds", "0"], "--max-seconds must be positive"),
        (["--max-memory", "-1"], "--max-memory must be positive"),
        (["--sampler", "fastest"], "fastest"),
    ],
)
def test_bad_scaling_arguments_are_one_line_errors(tiny_folder, capsys, args, message):
    assert main(["bench", "--model", str(tiny_folder), "--scaling", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sdengine: error: ") and message in err, err


def test_scaling_flags_need_scaling_and_parse(tiny_folder, capsys):
    assert main(["bench", "--model", str(tiny_folder), "--sizes", "64"]) == 2
    assert "--sizes is an option of --scaling" in capsys.readouterr().err
    assert bench_scaling.parse_sizes(" 512, 256,512 ") == (256, 512)
    assert bench_scaling.parse_batches("4,1,2") == (1, 2, 4)
    with pytest.raises(bench.BenchError, match="not a multiple of 8"):
        bench_scaling.parse_sizes("100")
    assert issubclass(bench.BenchError, SdengineError)


def test_sdengine_text_time_is_never_a_cache_hit(tiny_folder):
    """The scaling bench times sdengine's text encoding as the peer's is timed: each call encodes (the
    text-encoder cache would answer the repeated prompt in ~0 s and make the composed estimate too small)."""
    from sdengine.text import encode_cache

    parts = bench_scaling.SdengineParts(tiny_folder, "cpu")
    encoder = parts.pipe.text_encoder
    parts.text("a photo", "blurry")
    info = encode_cache.cache_info(encoder)
    assert info["misses"] > 0 and info["hits"] == 0
    parts.text("a photo", "blurry")  # the same texts again: encoded again, not looked up
    info = encode_cache.cache_info(encoder)
    assert info["misses"] > 0 and info["hits"] == 0
