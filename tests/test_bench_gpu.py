"""`sdengine bench --device cuda` (sdengine.bench_gpu): its phases run on the CPU with the tiny random model, the
JSON they leave, the budget, and the CLI's refusals. The GPU numbers themselves come from a GPU machine
(docs/performance.md, "GPU")."""

from __future__ import annotations

import json
import os

import pytest
import torch

from sdengine import bench, bench_gpu
from sdengine.cli import main


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return bench.make_random_folder(tmp_path_factory.mktemp("bench-gpu") / "tiny", "tiny")


def _on_the_cpu(folder, out, **kw):
    """The GPU flow's phases on the CPU: the tiny model, 32x32, 2 steps, one repeat, nothing compiled."""
    return bench_gpu.run_gpu_bench(
        folder, model="tiny", out_dir=out, size=32, steps=2, repeats=1, device="cpu", compile=False, **kw
    )


def test_the_gpu_flow_runs_its_phases_on_the_cpu(tiny_folder, tmp_path):
    pytest.importorskip("diffusers")
    data = _on_the_cpu(tiny_folder, tmp_path, aot=False)
    phases = data["phases"]
    for name in ("info", "sdengine_eager", "sdengine_graphs", "sdengine_fp32", "diffusers_eager"):
        assert name in phases, (name, data["errors"], data["skipped"])
    # the child processes (without compile: the graphs options in a fresh process, timed from its start)
    assert "sdengine_graphs_process_cold" in phases and "sdengine_graphs_process_warm" in phases
    assert not data["errors"]
    warm = phases["sdengine_graphs_process_warm"]
    assert warm["first_image_s"] > warm["load_s"] > 0 and warm["batch8_images_per_s"] > 0
    parts = warm["load_parts_s"]  # on the CPU: no driver start-up to time
    assert set(parts) == {"weights_s", "fast_path_s"} and sum(parts.values()) <= warm["load_s"]
    # the children run in the parent's dtype: fp32 on the CPU (fp16 there was slow, and unlike the other phases)
    assert warm["dtype"] == phases["sdengine_graphs_process_cold"]["dtype"] == "float32"
    # the e4m3 layers in their own process (without compile here): applied, and the image close to fp32's
    fp8 = phases["sdengine_fp8"]
    assert any(n.startswith("fp8: ") and "e4m3" in n for n in fp8["notes"]), fp8["notes"]
    assert 0 < data["agreement"]["sdengine_fp8 vs sdengine_fp32"] < 2e-2
    assert phases["sdengine_graphs"]["batch8_images_per_s"] > 0
    # where the graphs path's image goes, stage by stage; the whole loop as one graph is CUDA-only
    timeline = phases["sdengine_graphs"]["image_timeline"]
    assert isinstance(timeline, dict) and timeline["stages"]["sampling"]["cpu_ms"] > 0, timeline
    assert phases["sdengine_graphs"]["graph_loop"] == {"skipped": "CUDA only (the pipeline is on cpu)"}
    # the VAE decode in both layouts in one process (channels_last is a CUDA default; on the CPU the weights are NCHW)
    layout = phases["sdengine_graphs"]["vae_decode_ms_by_layout"]
    assert isinstance(layout, dict) and layout["nhwc"] > 0 and layout["nchw"] > 0, layout
    # graphs without channels_last: its own phase, so the GPU run says what channels_last is worth at batch 1 and 8
    nchw = phases["sdengine_graphs_nchw"]
    assert nchw["batch8_images_per_s"] > 0 and not any(n.startswith("channels_last") for n in nchw["notes"])
    assert data["agreement"]["sdengine_graphs_nchw vs sdengine_fp32"] == 0.0  # on the CPU: plain fp32 eager
    assert "sdengine_graphs_nchw/sdengine_graphs batch8_s" in data["ratios"]
    # fused q/k/v products on the graphs path: their own phase, the image as plain fp32's (the same products)
    fused = phases["sdengine_graphs_fused"]
    assert any(n.startswith("fused_qkv: ") for n in fused["notes"]), fused["notes"]
    assert data["agreement"]["sdengine_graphs_fused vs sdengine_fp32"] < 1e-5
    assert "sdengine_graphs/sdengine_graphs_fused unet_step_ms" in data["ratios"]
    for name in ("sdengine_eager", "diffusers_eager"):
        assert phases[name]["unet_step_ms"] > 0 and phases[name]["vae_decode_ms"] > 0
        assert phases[name]["text_encode_ms"] > 0
    assert "diffusers_eager/sdengine_eager text_encode_ms" in data["ratios"]
    assert phases["sdengine_eager"]["tiny_vae_decode_ms"] > 0  # TAESD's 64 channels: more work than this tiny VAE
    agree = data["agreement"]
    assert agree["sdengine_eager vs sdengine_fp32"] == 0.0  # fp32 on the CPU: the same computation
    assert agree["diffusers_eager vs sdengine_fp32"] < 1e-3  # the parity the CPU bench shows
    assert agree["sdengine_graphs_process_warm vs sdengine_fp32"] < 2e-3  # another process, channels_last
    lat = data["latent_agreement"]
    assert lat["sdengine_eager vs sdengine_fp32"] == 0.0 and lat["diffusers_eager vs sdengine_fp32"] < 1e-3
    assert phases["sdengine_eager"]["vae_upcast"] is False and phases["diffusers_eager"]["vae_output_finite"]
    stages = phases["diffusers_eager"]["stages_vs_sdengine"]
    assert isinstance(stages, dict), stages
    for key in ("text_cond", "text_uncond", "unet", "vae_decode"):
        assert stages[key] < 1e-4, (key, stages)  # fp32 on the CPU: the engines agree stage by stage
    assert stages["timesteps_max_abs"] == 0.0 and stages["sigmas_max_rel"] < 1e-5
    # diffusers under another attention-kernel order (on the CPU: the math kernel first) gives its own sample
    order = phases["diffusers_eager"]["attention_order_check"]
    assert isinstance(order, dict) and (order["chosen"], order["other"]) == ("default", "math"), order
    for key in ("text_cond", "text_uncond", "unet", "latent"):
        assert order[f"{key}_rel"] < 1e-4, (key, order)
    assert lat["diffusers_eager_attention_math vs sdengine_fp32"] < 1e-3
    # diffusers started from sdengine's seed-contract noise (latents=): the same sample as its own draw here,
    # where a half-precision CPU draw is not involved (fp32 on the CPU)
    noise = phases["diffusers_eager"]["noise_check"]
    assert isinstance(noise, dict) and noise["randn_half_vs_float"] < 1e-2, noise
    assert lat["diffusers_eager_sdengine_noise vs sdengine_fp32"] < 1e-3
    assert lat["sdengine_eager vs diffusers_eager_sdengine_noise"] < 1e-3
    assert agree["sdengine_eager vs diffusers_eager_sdengine_noise"] < 1e-3  # and the images it decodes to
    ratio = data["ratios"]["diffusers_eager/sdengine_eager image_s"]
    assert ratio == pytest.approx(phases["diffusers_eager"]["image_s"] / phases["sdengine_eager"]["image_s"])
    written = json.loads((tmp_path / bench_gpu.FILE_NAME).read_text())
    assert written["phases"].keys() == phases.keys() and written["ratios"] == data["ratios"]
    text = bench_gpu.table(data)
    assert "sdengine_graphs" in text and "agreement sdengine_eager vs sdengine_fp32: 0.00000" in text


def test_only_the_phases_asked_for_run(tiny_folder, tmp_path, monkeypatch):
    import tempfile

    scratch = tmp_path / "tmp"  # the run's temporary folders go here, and are gone when it ends
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    data = _on_the_cpu(tiny_folder, tmp_path, compare=False, only="sdengine_eager, sdengine_fp32")
    assert list(scratch.iterdir()) == []  # (an inductor cache folder was once left behind by every run)
    assert list(data["phases"]) == ["info", "sdengine_eager", "sdengine_fp32"]
    assert data["skipped"]["sdengine_graphs"] == "not asked for" and not data["errors"]
    assert data["agreement"]["sdengine_eager vs sdengine_fp32"] == 0.0
    with pytest.raises(bench.BenchError, match="unknown phase.*sdengine_warp.*valid: info, sdengine_eager"):
        bench_gpu.run_gpu_bench(tiny_folder, model="tiny", out_dir=tmp_path, device="cpu", only=["sdengine_warp"])


def test_a_machine_without_diffusers_still_runs_every_sdengine_phase(tiny_folder, tmp_path, monkeypatch):
    """A device image that lacks diffusers (it was carried as a wheel before): the diffusers phases fail in one
    line each and the sdengine phases after them still run (the import once ended the run before them)."""

    def missing() -> None:
        raise bench.BenchError("--compare diffusers needs the dev extras (pip install -e '.[dev]'): no diffusers")

    started = []

    def child_process(job, **kw):  # the child's own run is another test's: here, only whether it was started
        import numpy as np

        started.append(job["engine"])
        np.save(job["image_path"], np.zeros((1, 32, 32, 3), np.float32))
        return {"first_image_s": 1.0}

    monkeypatch.setattr(bench_gpu, "peer_module", missing)
    monkeypatch.setattr(bench_gpu, "run_worker", child_process)
    data = _on_the_cpu(tiny_folder, tmp_path, compare=True, only="diffusers_eager,sdengine_graphs_process_cold")
    assert list(data["errors"]) == ["diffusers_eager"]
    assert data["errors"]["diffusers_eager"].startswith("BenchError: --compare diffusers needs the dev extras")
    assert started == ["sdengine (cold cache)"] and data["phases"]["sdengine_graphs_process_cold"]["first_image_s"] == 1
    saved = json.loads((tmp_path / bench_gpu.FILE_NAME).read_text())
    assert list(saved["phases"]) == ["info", "sdengine_graphs_process_cold"]


def test_a_summary_that_fails_is_an_error_line_and_the_others_are_kept(tiny_folder, tmp_path, monkeypatch):
    """The end of a run (agreement, ratios, the images' PNG): one that fails, such as images that cannot be put
    side by side, is recorded as an error, and the JSON still gets the others."""

    message = "all the input array dimensions except for the concatenation axis must match exactly"

    def broken(images, path):
        raise ValueError(message)

    monkeypatch.setattr(bench_gpu, "save_images", broken)
    data = _on_the_cpu(tiny_folder, tmp_path, compare=False, only="sdengine_eager,sdengine_fp32")
    saved = json.loads((tmp_path / bench_gpu.FILE_NAME).read_text())
    assert saved["errors"] == {"images_png": f"ValueError: {message}"} == data["errors"]
    assert saved["agreement"] == {"sdengine_eager vs sdengine_fp32": 0.0} and "ratios" in saved


@pytest.mark.slow
def test_the_aot_processes_say_which_packaging_ran_and_where_each_network_came_from(tiny_folder, tmp_path):
    """The GPU run's AOT phases on the CPU: the cold process compiles the packages, the warm one loads them, and
    each says so (``aot``) with the packaging it used, the CPU's default here."""
    data = _on_the_cpu(tiny_folder, tmp_path, compare=False, only="sdengine_fp32,sdengine_aot_cold,sdengine_aot_warm")
    assert not data["errors"], data["errors"]
    cold, warm = data["phases"]["sdengine_aot_cold"]["aot"], data["phases"]["sdengine_aot_warm"]["aot"]
    for name in ("unet", "vae"):
        assert cold[name]["packaging"] == warm[name]["packaging"] == "bound"
        assert (cold[name]["compiled"], cold[name]["loaded"], cold[name]["failed"]) == (1, 0, 0), cold
        assert (warm[name]["compiled"], warm[name]["loaded"], warm[name]["failed"]) == (0, 1, 0), warm
    assert data["agreement"]["sdengine_aot_warm vs sdengine_fp32"] < 2e-3  # as the graphs process's (fp16 there)


def test_phases_over_budget_are_skipped_and_failures_recorded(tmp_path):
    run = bench_gpu.Run(tmp_path, budget_s=5.0)
    assert run.phase("fits", 0, lambda: {"image_s": 1.0}) == {"image_s": 1.0, "phase_s": pytest.approx(0, abs=1)}
    assert run.phase("too_long", 60, lambda: {"image_s": 1.0}) is None
    assert run.phase("broken", 0, lambda: 1 / 0) is None
    saved = json.loads((tmp_path / bench_gpu.FILE_NAME).read_text())
    assert list(saved["phases"]) == ["fits"]
    assert "needs about 60 s" in saved["skipped"]["too_long"]
    assert saved["errors"]["broken"].startswith("ZeroDivisionError")


def test_ratios_are_peer_over_sdengine():
    phases = {
        "sdengine_graphs": {"image_s": 0.5, "unet_step_ms": 4.0},
        "diffusers_eager": {"image_s": 1.0, "unet_step_ms": 12.0},
    }
    r = bench_gpu.ratios(phases)
    assert r == {"diffusers_eager/sdengine_graphs image_s": 2.0, "diffusers_eager/sdengine_graphs unet_step_ms": 3.0}
    # batch 8 of compiled diffusers is its own phase (a second compile): compared on batch8_s only
    phases["diffusers_compiled_batch8"] = {"batch8_s": 1.5, "batch8_images_per_s": 8 / 1.5}
    phases["sdengine_graphs"]["batch8_s"] = 1.0
    r = bench_gpu.ratios(phases)
    assert r["diffusers_compiled_batch8/sdengine_graphs batch8_s"] == 1.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the answer on a machine without a GPU")
def test_cli_without_a_gpu_says_so_in_one_line(tmp_path, capsys):
    rc = main(["bench", "--random", "tiny", "--workdir", str(tmp_path), "--device", "cuda", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "sees no CUDA device" in err[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--options", "compile"], "--options does not apply to --device cuda"),
        # the CPU comparison's flags that the GPU one does not read (once taken without a word)
        (["--batch", "4"], "--batch 4 does not apply to --device cuda"),
        (["--no-memory"], "--no-memory does not apply to --device cuda"),
        (["--json", "bench.json"], "--json does not apply to --device cuda (its JSON is bench_gpu.json in --out)"),
        (["--budget-s", "0"], "--budget-s must be positive"),
        (["--phases", "sdengine_eager,nope"], "unknown phase(s) nope; valid: info,"),
    ],
)
def test_cli_refuses_options_of_other_modes(tmp_path, capsys, args, message):
    rc = main(["bench", "--random", "tiny", "--workdir", str(tmp_path), "--device", "cuda", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and message in err[0]


def test_cli_phases_only_with_the_gpu_comparison(tmp_path, capsys):
    rc = main(["bench", "--random", "tiny", "--workdir", str(tmp_path), "--phases", "sdengine_eager"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--phases applies to --device cuda only" in err[0]


def test_the_graph_loop_measurement_on_the_cpu_with_a_stand_in_recorder(tiny_folder):
    """What the graphs phase runs on a GPU (bench_gpu.measure_graph_loop), here recorded by the CPU stand-in."""
    import numpy as np

    from _cpu_graphs import CPUBackend
    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(tiny_folder, device="cpu", dtype="fp32", fast_path="none")
    cfg = {"size": 32, "steps": 2, "sampler": "dpmpp_2m", "cfg": 7.5, "seed": 0}
    reference = bench_gpu.sdengine_gen(pipe, cfg, 1)()
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    res = bench_gpu.measure_graph_loop(pipe, cfg, 2, reference, backend=CPUBackend(), device_type="cpu")
    assert res["vs_step_graphs_mean_abs"] == 0.0 and res["image_s"] > 0 and res["batch8_images_per_s"] > 0
    assert res["recordings"] == 2 and res["replays"] >= 5  # batch 1 and batch 8; warm-up, 2 timed, batch 8 runs
    assert isinstance(res["image_timeline"], dict) and res["image_timeline"]["stages"]["sampling"]["cpu_ms"] > 0
    assert "loop" not in pipe.cuda_graphs  # dropped again: the phase's later measurements use the step graphs
    assert np.array_equal(bench_gpu.sdengine_gen(pipe, cfg, 1)(), reference)


def test_a_failed_child_is_reported_by_its_exception_line_not_a_warnings_source_line():
    from sdengine.bench import failure_line

    stderr = (
        'Traceback (most recent call last):\n  File "x.py", line 1, in <module>\n'
        "torch._inductor.exc.InductorError: RuntimeError: out of shared memory\n"
        "/lib/warnings.py:12: UserWarning: something\n  return cls.__new__(cls, *args)\n"
    )
    assert failure_line(stderr) == "torch._inductor.exc.InductorError: RuntimeError: out of shared memory"
    assert failure_line("just a line\n") == "just a line" and failure_line("") == "no output"


def test_a_child_killed_by_a_native_crash_leaves_its_python_stack(tmp_path):
    from sdengine.bench import BenchError, run_worker

    (tmp_path / "crashing_child.py").write_text("import ctypes\n\ndef crash():\n    ctypes.string_at(0)\n\ncrash()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = tmp_path / "child.log"
    with pytest.raises(BenchError, match=r"failed \(exit -11\)"):
        run_worker({"engine": "crash"}, env=env, timeout=60, module="crashing_child", stderr_path=log)
    text = log.read_text()
    assert "Segmentation fault" in text and "in crash" in text, text


def test_the_vae_layout_check_times_both_layouts_and_restores_the_vaes(tiny_folder):
    import sdengine

    pipe = sdengine.load_pipeline(tiny_folder, device="cpu", dtype="fp32", fast_path="none")
    cfg = {"size": 64}
    z = torch.randn(1, pipe.latent_channels, 8, 8)
    with torch.inference_mode():
        before = pipe.vae.decode(z)
    for fmt, name in ((torch.channels_last, "nhwc"), (torch.contiguous_format, "nchw")):
        pipe.vae.to(memory_format=fmt)
        out = bench_gpu.vae_decode_by_layout(pipe, cfg, n=1)
        assert out["weights_were"] == name and out["nhwc"] > 0 and out["nchw"] > 0
        conv = next(m for m in pipe.vae.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
        assert conv.weight.is_contiguous(memory_format=fmt)  # the layout it found is the layout it leaves
        with torch.inference_mode():
            torch.testing.assert_close(pipe.vae.decode(z), before, rtol=1e-5, atol=1e-5)


def test_compile_time_split_reports_dynamo_phases_largest_first():
    torch._dynamo.reset()

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x) * 2 + 1

    torch.compile(f, backend="eager")(torch.randn(3))  # traced by Dynamo, nothing generated: quick
    split = bench_gpu.compile_time_split(top=5)
    assert 0 < len(split) <= 5 and "_compile.compile_inner" in split
    values = list(split.values())
    assert values == sorted(values, reverse=True) and all(v >= 0 for v in values)
