"""`sdengine bench` on the tiny random model, the fast-path options' image tolerance, and the thread choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sdengine import bench, fastpath, threads
from sdengine.cli import main
from sdengine.errors import SdengineError

SRC = str(Path(bench.__file__).resolve().parent.parent)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return bench.make_random_folder(tmp_path_factory.mktemp("bench") / "tiny", "tiny")


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_random_folder_is_a_diffusers_folder_and_reused(tiny_folder):
    index = json.loads((tiny_folder / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    stamp = (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert bench.make_random_folder(tiny_folder, "tiny") == tiny_folder
    assert (tiny_folder / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(SdengineError, match="unknown random model"):
        bench.preset_configs("huge")


def test_bench_command_against_diffusers(tiny_folder, tmp_path, capsys, keep_threads):
    pytest.importorskip("diffusers")
    out = tmp_path / "r.json"
    rc = main(
        [
            "--threads",
            "1",
            "bench",
            "--model",
            str(tiny_folder),
            "--size",
            "32",
            "--steps",
            "4",
            "--repeats",
            "2",
            "--no-memory",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    assert torch.get_num_threads() == 1  # the global option reached torch
    r = json.loads(out.read_text())
    assert r["spec"] == {
        "size": 32,
        "steps": 4,
        "batch": 1,
        "sampler": "dpmpp_2m",
        "cfg": 7.5,
        "seed": 0,
        "device": "cpu",
        "dtype": "fp32",
    }
    assert r["threads"] == "1 torch thread(s)" and r["repeats"] == 2
    assert set(r["engines"]) == {"sdengine", "diffusers"}
    for e in r["engines"].values():
        assert len(e["times_s"]) == 2 and all(t > 0 for t in e["times_s"]) and e["warmup_s"] > 0
        assert e["median_s"] == pytest.approx(float(np.median(e["times_s"])))
    ratio = r["engines"]["diffusers"]["median_s"] / r["engines"]["sdengine"]["median_s"]
    assert r["speedup_vs_diffusers"] == pytest.approx(ratio)
    # same weights, same sampler, fp32: the images agree to float rounding
    assert 0 <= r["agreement_mean_abs"] < 1e-4
    table = capsys.readouterr().out
    assert "speed-up sdengine vs diffusers" in table and "images agree" in table and "warm-up s" in table


def test_bench_refuses_bad_arguments(tiny_folder, capsys):
    assert main(["bench", "--random", "tiny", "--model", str(tiny_folder)]) == 2
    assert "exactly one of --model" in capsys.readouterr().err
    assert main(["bench", "--random", "tiny", "--options", "turbo", "--no-memory"]) == 2
    assert "unknown fast-path option" in capsys.readouterr().err
    assert main(["--threads", "0", "bench", "--random", "tiny"]) == 2
    assert "--threads must be a positive integer" in capsys.readouterr().err


def test_bench_of_the_built_in_emoji_model_by_name(capsys, keep_threads, monkeypatch):
    # `bench --model emoji` once said "emoji: not a diffusers folder"; its folder with --size once stopped in a
    # diffusers traceback (its MiniLM text encoder is sdengine's own); without --size it asked for one although
    # --help says the default is the model's own size
    monkeypatch.setattr(bench, "peer_module", lambda: pytest.fail("diffusers was loaded"))
    argv = ["--threads", "1", "bench", "--model", "emoji", "--steps", "1", "--repeats", "1", "--no-memory"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diffusers cannot load this model" in err[0] and "--compare none" in err[0], err
    assert "MiniLMTextEncoder" in err[0]
    assert main([*argv, "--compare", "none"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert head.startswith("emoji: 64x64, batch 1, 1 steps dpmpp_2m") and "diffusers" not in head, head
    assert "sdengine" in out and "speed-up" not in out


def test_a_folders_own_size_is_read_from_its_configs(tiny_folder, tmp_path):
    assert bench.folder_default_size(tiny_folder) == 32  # sample size 16, VAE 2x (the tiny preset)
    with pytest.raises(bench.BenchError, match="give --size"):
        bench.folder_default_size(tmp_path)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "--seed must be in [0, 2**64 - 1]"),  # once two unrelated images called "agreement"
        (["--out", "{tmp}/o"], "--out applies to --device cuda only"),  # the GPU flags, once ignored on the CPU
        (["--budget-s", "-5"], "--budget-s applies to --device cuda only"),
        (["--no-compile"], "--no-compile applies to --device cuda only"),
        (["--json", "{tmp}"], "is a folder; give a file name"),  # once found after the whole run
        (["--json", "{tmp}/afile/x.json"], "cannot write there"),
    ],
)
def test_bench_refuses_before_running(tmp_path, capsys, args, message):
    (tmp_path / "afile").write_text("x")
    argv = ["bench", "--random", "tiny", "--workdir", str(tmp_path), "--steps", "1", "--repeats", "1", "--no-memory"]
    assert main([*argv, *[x.replace("{tmp}", str(tmp_path)) for x in args]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "random-tiny").exists()  # refused before the model was even written


def test_bench_takes_the_global_fast_path(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SDENGINE_FAST_PATH", "bogus")  # as every command: an unknown name is one line
    argv = ["bench", "--model", str(tiny_folder), "--size", "32", "--steps", "1", "--repeats", "1", "--no-memory"]
    assert main([*argv, "--compare", "none"]) == 2
    assert "unknown fast-path option" in capsys.readouterr().err
    monkeypatch.setenv("SDENGINE_FAST_PATH", "channels_last")
    out = tmp_path / "b.json"
    assert main([*argv, "--compare", "none", "--json", str(out)]) == 0
    assert "sdengine fast path: channels_last" in capsys.readouterr().out
    assert json.loads(out.read_text())["fast_path"] == ["channels_last"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--dtype", "bf8"], "unknown dtype 'bf8'"),
        (["--dtype", "bf16", "--device", "cuda"], "--dtype is for the CPU comparison; --device cuda"),
        (["--dtype", "bf16", "--options", "channels_last"], "--dtype is for the CPU comparison; --options"),
        (["--dtype", "bf16", "--scaling"], "--dtype is for the CPU comparison; --scaling"),
    ],
)
def test_bench_dtype_refusals(tmp_path, capsys, args, message):
    assert main(["bench", "--random", "tiny", "--workdir", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_bench_in_bf16_against_diffusers_fp32(tiny_folder, capsys):
    """sdengine in bfloat16 on the CPU against diffusers' fp32 eager: the table says which precision each ran
    in and whether this CPU has bf16 arithmetic; the images still agree to bf16's rounding."""
    pytest.importorskip("diffusers")
    spec = bench.GenSpec(size=32, steps=4, dtype="bf16")
    report = bench.run_bench(tiny_folder, spec, model="tiny", repeats=1, memory=False)
    text = report.table()
    assert "sdengine bf16, diffusers fp32, cpu" in text
    native = "note: bf16 on this CPU: native (AVX-512-BF16 or AMX)" in text
    assert native or "note: bf16 on this CPU: emulated" in text
    assert report.agreement is not None and 1e-5 < report.agreement < 2e-2  # not fp32's 1e-6 parity, but close


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    from sdengine.devices import cpu_native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16\n")
    assert cpu_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma amx_tile amx_bf16\n")
    assert cpu_native_bf16(str(info))
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma avx512f avx512_vnni\n")  # AVX-512 without bf16
    assert not cpu_native_bf16(str(info))
    assert not cpu_native_bf16(str(tmp_path / "missing"))


def test_peak_rss_is_the_childs_own(tiny_folder):
    """Measured in a fresh process, and not inflated by the parent's memory (ru_maxrss would be)."""
    ballast = np.ones(700 * 2**20 // 8)  # 700 MiB in this process
    spec = bench.GenSpec(size=32, steps=2)
    rss = bench.peak_rss(tiny_folder, spec, "sdengine", 1)
    assert 50 < rss < 600, rss
    del ballast


@pytest.mark.parametrize(
    "option",
    [o if o not in ("compile", "aot") else pytest.param(o, marks=pytest.mark.slow) for o in fastpath.OPTIONS],
)
def test_fast_path_option_keeps_the_image(tiny_folder, option):
    spec = bench.GenSpec(size=32, steps=4)
    eager, _ = bench.sdengine_engine(tiny_folder, spec)
    fast, notes = bench.sdengine_engine(tiny_folder, spec, (option,))
    assert len(notes) == 1 and notes[0].startswith(option)
    a, b = eager(), fast()
    assert a.shape == b.shape == (1, 32, 32, 3)
    assert bench.mean_abs(a, b) <= fastpath.tolerance(option)
    assert option in fastpath.APPROXIMATE or fastpath.tolerance(option) == fastpath.TOLERANCE
    assert not fastpath.APPROXIMATE.keys() & (fastpath.DEFAULT_OPTIONS | fastpath.CUDA_DEFAULT_OPTIONS)


def test_fast_path_options_parse():
    assert fastpath.parse_options("compile, channels_last") == ("channels_last", "compile")
    assert fastpath.parse_options(None) == ()
    assert fastpath.DEFAULT_OPTIONS <= set(fastpath.OPTIONS)
    with pytest.raises(SdengineError, match="unknown fast-path option"):
        fastpath.parse_options("channels_last,turbo")


def test_thread_choice(monkeypatch, keep_threads):
    assert threads.threads_for(2, 0) == 2
    assert threads.threads_for(2, 1) == 1
    assert threads.threads_for(2, 5) == 1  # never fewer than one
    assert threads.threads_for(8, 3) == 5
    assert threads.choose_threads(3)[:2] == (3, "--threads")
    monkeypatch.setenv(threads.THREADS_ENV, "2")
    assert threads.choose_threads()[:2] == (2, threads.THREADS_ENV)
    monkeypatch.setenv(threads.THREADS_ENV, "many")
    with pytest.raises(SdengineError, match=threads.THREADS_ENV):
        threads.choose_threads()
    monkeypatch.delenv(threads.THREADS_ENV)
    n, source, busy = threads.choose_threads()
    assert source == "auto" and 1 <= n <= threads.usable_cpus() and busy >= 0
    s = threads.configure_threads(1)
    assert torch.get_num_threads() == 1 and s.threads == 1 and "1 thread(s)" in s.describe()


def test_more_threads_than_cpus_is_warned(caplog, keep_threads):
    """SDENGINE_THREADS=1000 on 2 CPUs was taken silently (one 64x64 image: 10.8 s instead of 0.5 s)."""
    cpus = threads.usable_cpus()
    with caplog.at_level("WARNING", logger="sdengine.threads"):
        threads.configure_threads(cpus)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="sdengine.threads"):
        threads.configure_threads(cpus + 1)
    assert len(caplog.records) == 1
    assert f"{cpus + 1} threads for {cpus} usable CPUs" in caplog.records[0].getMessage()


@pytest.mark.parametrize(
    "preset, busy, expected",
    [
        (None, False, "True default 10000"),  # idle: a short spin
        (None, True, "True PASSIVE None"),  # another process keeps a CPU busy: sleep at once
        ({"OMP_WAIT_POLICY": "ACTIVE"}, True, "True ACTIVE None"),  # the user's choice is kept
        ({"GOMP_SPINCOUNT": "5"}, True, "True default 5"),
    ],
)
def test_wait_policy_set_before_torch(preset, busy, expected):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(preset or {})
    env["PYTHONPATH"] = SRC
    code = (
        "import os; from sdengine import threads; threads.busy_elsewhere = lambda: BUSY; "
        "print(threads.prepare_environment(), os.environ.get('OMP_WAIT_POLICY', 'default'), "
        "os.environ.get('GOMP_SPINCOUNT'))"
    ).replace("BUSY", "1" if busy else "0")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == expected, out.stderr


def test_a_server_sleeps_its_waiting_threads_whatever_the_load_at_start():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = SRC
    code = (
        "import os; from sdengine import threads; threads.busy_elsewhere = lambda: 0; "
        "print(threads.prepare_environment(long_running=True), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "True PASSIVE", out.stderr


def test_parsing_the_command_line_imports_no_torch():
    # the CLI chooses the OpenMP wait policy after parsing (it depends on the command), before torch loads
    env = {**os.environ, "PYTHONPATH": SRC}
    code = (
        "import sys; from sdengine.cli import build_parser; "
        "[build_parser().parse_args(a) for a in (['serve'], ['generate', 'x'], ['bench', '--random', 'tiny'])]; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_busy_elsewhere_ignores_bursts_but_sees_a_busy_process(monkeypatch):
    from sdengine import threads

    # this process's own threads spin for a few ms after start-up; a busy process is runnable in every sample
    burst = iter([3, 1, 2, 1, 1, 4, 1, 1, 1, 1])
    monkeypatch.setattr(threads, "_running_tasks", lambda: next(burst))
    assert threads.busy_elsewhere(interval=0) == 0
    busy = iter([2, 3, 2, 2, 4, 2, 2, 3, 2, 2])
    monkeypatch.setattr(threads, "_running_tasks", lambda: next(busy))
    assert threads.busy_elsewhere(interval=0) == 1
