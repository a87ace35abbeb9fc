"""sdengine.aot: networks compiled ahead of time (AOTInductor), on the CPU (the same code path runs on a GPU).

Compiling a package takes tens of seconds on this CPU, so the unit tests compile one tiny module once and reuse
its package; the whole pipeline with the U-Net and VAE compiled is a slow test (make test-all)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from sdengine.aot import PACKAGINGS, AOTCompiled, default_packaging, package_digest
from sdengine.errors import UsageError


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * scale


# "disk" (neither device's default) in make test-all only: each packaging compiles a package (about 6 s here)
@pytest.fixture(
    scope="module",
    params=[pytest.param(p, marks=pytest.mark.slow) if p == "disk" else p for p in sorted(PACKAGINGS)],
)
def compiled(request, tmp_path_factory):
    """One package per packaging (the ways weights meet a package; CUDA and the CPU default to different ones)."""
    torch.manual_seed(0)
    m = Small().eval()
    cache = tmp_path_factory.mktemp("aoti")
    a = AOTCompiled(m, name="small", cache_dir=cache, packaging=request.param)
    x = torch.randn(3, 8)
    with torch.inference_mode():
        out = a(x)
    return m, a, cache, x, out


def test_first_call_compiles_a_package_equal_to_the_module(compiled):
    m, a, cache, x, out = compiled
    assert (a.compiled, a.loaded) == (1, 0) and not a.failed
    assert len(list(cache.glob("small-*.pt2"))) == 1 and not list(cache.glob(".partial-*"))
    with torch.no_grad():
        torch.testing.assert_close(out, m(x), rtol=1e-5, atol=1e-6)


def test_a_later_process_loads_the_package_and_binds_its_own_weights(compiled):
    _, _, cache, x, _ = compiled
    torch.manual_seed(1)
    other = Small().eval()  # same architecture, other weights: the package is shared, the weights are not
    b = AOTCompiled(other, name="small", cache_dir=cache, packaging=compiled[1].packaging)
    with torch.inference_mode():
        got = b(x)
    assert (b.compiled, b.loaded) == (0, 1)  # a package that carries weights still computes with the live ones
    with torch.no_grad():
        torch.testing.assert_close(got, other(x), rtol=1e-5, atol=1e-6)


def test_weights_changed_in_place_are_bound_again_and_hooks_run_the_module(compiled):
    m, a, _, x, _ = compiled
    with torch.no_grad():
        m.lin.weight.mul_(1.5)
    assert a.usable() and not a.runners  # the version counter moved: bound again on the next call
    with torch.inference_mode():
        got = a(x)
    assert not a.failed and a.loaded == 1  # served by the package, bound again
    with torch.no_grad():
        torch.testing.assert_close(got, m(x), rtol=1e-5, atol=1e-6)
    h = m.lin.register_forward_hook(lambda mod, i, o: o * 0)
    assert not a.usable()  # the pipeline then calls the module itself
    h.remove()
    assert a.usable()


def test_the_digest_follows_shapes_layout_and_dtype_not_values():
    m = Small()
    d = package_digest(m, ("call",), "cpu")
    with torch.no_grad():
        m.lin.weight.add_(1)
    assert package_digest(m, ("call",), "cpu") == d
    assert package_digest(m, ("other call",), "cpu") != d
    assert package_digest(m.half(), ("call",), "cpu") != d
    assert package_digest(m, ("call",), "cuda-sm90") != package_digest(m, ("call",), "cpu")
    assert package_digest(m, ("call",), "cpu", "carried") != package_digest(m, ("call",), "cpu", "bound")


def test_the_packaging_follows_the_device_unless_the_environment_picks_one(monkeypatch):
    monkeypatch.delenv("SDENGINE_AOT_PACKAGING", raising=False)
    assert (default_packaging("cuda"), default_packaging("cpu")) == ("carried", "bound")
    monkeypatch.setenv("SDENGINE_AOT_PACKAGING", "bound")
    assert default_packaging("cuda") == "bound"
    monkeypatch.setenv("SDENGINE_AOT_PACKAGING", "baked")
    with pytest.raises(UsageError, match="SDENGINE_AOT_PACKAGING='baked': expected one of bound, carried, disk"):
        AOTCompiled(Small(), name="small", cache_dir="unused")  # at once, not as a plain run at the first call
    with pytest.raises(UsageError, match="AOT packaging 'x'"):
        AOTCompiled(Small(), name="small", cache_dir="unused", packaging="x")


def test_a_package_that_baked_in_a_weight_is_refused(tmp_path, caplog, monkeypatch):
    """Without runtime constant folding AOTInductor folds the bias into the product when it compiles: such a
    package would silently compute with the compile-time weights, so it is refused and the module runs."""
    import sdengine.aot

    monkeypatch.setitem(sdengine.aot.COMPILE_OPTIONS, "aot_inductor.use_runtime_constant_folding", False)
    torch.manual_seed(0)
    m = Small().eval()
    a = AOTCompiled(m, name="small", cache_dir=tmp_path, packaging="carried")
    x = torch.randn(3, 8)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        got = a(x)
    assert len(a.failed) == 1 and a.compiled == 1 and not list(tmp_path.glob("*.pt2"))
    assert any("baked in weights it would not take from the module: ['lin.bias']" in r.message for r in caplog.records)
    with torch.no_grad():
        torch.testing.assert_close(got, m(x))


def test_a_network_that_cannot_be_exported_runs_as_it_is(tmp_path, caplog):
    class DataDependent(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2 if float(x.sum()) > 0 else x  # a branch on a value: export refuses it

    a = AOTCompiled(DataDependent(), name="dd", cache_dir=tmp_path)
    x = torch.ones(2, 3)
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        assert torch.equal(a(x), x * 2) and torch.equal(a(x), x * 2)
    assert len(a.failed) == 1 and sum("not compiled ahead of time" in r.message for r in caplog.records) == 1
    assert not list(tmp_path.glob("*.pt2"))


def test_a_package_that_fails_on_its_first_run_is_dropped_and_the_module_runs(tmp_path, caplog, monkeypatch):
    """A package's first run sets up the weights bound into it (on CUDA, where the H200 processes crashed, not
    proven): an error there runs the module instead, with one warning, and that call is not tried again."""
    from sdengine.cuda_graphs import call_signature

    torch.manual_seed(0)
    m = Small().eval()
    a = AOTCompiled(m, name="small", cache_dir=tmp_path, packaging="bound")
    x = torch.randn(3, 8)
    key = call_signature((x,), {})[0]
    (tmp_path / f"small-{package_digest(m, key, 'cpu', 'bound')}.pt2").write_bytes(b"")  # an earlier process's

    class Broken:  # what a package that cannot run on this device does
        calls = 0

        def get_constant_fqns(self) -> list[str]:
            return ["lin.weight", "lin.bias"]

        def load_constants(self, *args, **kwargs) -> None:
            pass

        def __call__(self, *args, **kwargs):
            Broken.calls += 1
            raise RuntimeError("The specified pointer resides on host memory")

    monkeypatch.setattr(torch._inductor, "aoti_load_package", lambda path: Broken())
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        got = [a(x), a(x)]
        want = m(x)
    assert Broken.calls == 1 and a.loaded == 1 and len(a.failed) == 1 and not a.runners
    for g in got:
        torch.testing.assert_close(g, want, rtol=0, atol=0)
    assert [r.message for r in caplog.records if "first run" in r.message] == [
        "small: the package failed on its first run (RuntimeError: The specified pointer resides on host memory); "
        "running it as it is"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("packaging", sorted(PACKAGINGS))
def test_pipeline_with_aot_equals_the_plain_pipeline(tiny_sd1_folder, tmp_path, monkeypatch, packaging):
    import sdengine

    monkeypatch.setenv("SDENGINE_AOT_PACKAGING", packaging)
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args = {"steps": 3, "seed": 2, "width": 64, "height": 64, "progress": False}
    plain = pipe("a red cube", "blurry", **args).arrays
    pipe.enable_aot(tmp_path)
    compiled = pipe("a red cube", "blurry", **args).arrays
    assert pipe.aot["unet"].compiled == 1 and pipe.aot["vae"].compiled == 1 and pipe.aot["vae"].packaging == packaging
    assert not pipe.aot["unet"].failed and not pipe.aot["vae"].failed
    np.testing.assert_allclose(compiled, plain, atol=1e-4)

    def record(fn, warmup):  # what a CUDA graph does, on the CPU (see tests/test_cuda_graphs.py)
        out = fn()
        return (lambda: out.copy_(fn())), out

    pipe.enable_cuda_graphs(backend=record, device_type="cpu")  # graphs over the compiled networks
    graphed = pipe("a red cube", "blurry", **args).arrays
    assert pipe.cuda_graphs["unet"].replays == 3 and pipe.aot["unet"].compiled == 1  # 3 steps; no second compile
    np.testing.assert_allclose(graphed, compiled, atol=1e-6)


_CUDA_CHILD = """
import sys
import numpy as np
import sdengine

folder, cache = sys.argv[1], sys.argv[2]
pipe = sdengine.load_pipeline(folder, device="cuda", dtype="fp16", fast_path="channels_last")  # the bench's layout
args = {"steps": 3, "seed": 2, "width": 64, "height": 64, "progress": False}
plain = pipe("a red cube", "blurry", **args).arrays
print("stage plain", flush=True)
pipe.enable_aot(cache)
aot = pipe("a red cube", "blurry", **args).arrays
u = pipe.aot["unet"]
print("stage aot", u.compiled, u.loaded, len(u.failed), float(np.abs(aot - plain).mean()), u.packaging, flush=True)
pipe.enable_cuda_graphs()
graphed = pipe("a red cube", "blurry", **args).arrays
print("stage graphs", pipe.cuda_graphs["unet"].replays, float(np.abs(graphed - aot).mean()), flush=True)
"""


CHILD_TIMEOUT_S = 200  # one child process (compile or load, then 3 images of the tiny model); the GPU check's
# test timeout must leave room for a cold and a warm one (the packagings run side by side)


def _text(out) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else (out or "")


def _aot_children(folder, root, packaging):  # pragma: no cover - no GPU in CI
    """Two child processes with one packaging (cold: compiles the packages; warm: loads them): a dict of what
    each reached, or the failure (exit status, last stage, the end of its stderr with faulthandler's stack)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    src = str(Path(__file__).resolve().parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env["SDENGINE_AOT_PACKAGING"] = packaging
    runs = []
    for run in ("cold", "warm"):
        argv = [sys.executable, "-X", "faulthandler", "-c", _CUDA_CHILD, str(folder), str(root / packaging)]
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
            code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
        except subprocess.TimeoutExpired as e:  # a hang: what it printed so far, and the next packaging goes on
            code, stdout, stderr = f"timeout {CHILD_TIMEOUT_S} s", _text(e.stdout), _text(e.stderr)
        stages = {ln.split()[1]: ln.split()[2:] for ln in stdout.splitlines() if ln.startswith("stage ")}
        runs.append({"run": run, "exit": code, "stages": stages, "stderr_tail": stderr[-3000:]})
        if code != 0:
            break
    return runs


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_aot_packages_on_cuda_compile_load_and_replay(tiny_sd1_folder, tmp_path):  # pragma: no cover - no GPU
    """On the H200 the bench's AOT processes died (SIGSEGV) at SD 1.5's size with the packaging then used (no
    weights in the package). Here each packaging runs the same steps on the tiny model in child processes, side
    by side (a crash fails only its child): compile and run the packages, graphs over them, then a second process
    that loads them. Every packaging's outcome goes to ``$SDENGINE_GPU_OUT/aot_packagings.json`` when set (the
    GPU check's output folder); the test fails when CUDA's default packaging fails."""
    import json
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from sdengine.aot import PACKAGINGS, default_packaging

    names = sorted(PACKAGINGS)
    results: dict = {}
    lock = threading.Lock()

    def one(packaging: str) -> None:  # written as each packaging ends: a run cut short keeps the ones that ended
        runs = _aot_children(tiny_sd1_folder, tmp_path, packaging)
        with lock:
            results[packaging] = runs
            if os.environ.get("SDENGINE_GPU_OUT"):
                with open(os.path.join(os.environ["SDENGINE_GPU_OUT"], "aot_packagings.json"), "w") as f:
                    json.dump(results, f, indent=1)

    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(one, names))
    summary = {p: [(r["run"], r["exit"], sorted(r["stages"])) for r in runs] for p, runs in results.items()}
    runs = results[default_packaging("cuda")]
    assert len(runs) == 2 and all(r["exit"] == 0 for r in runs), f"{summary}\n{runs[-1]['stderr_tail']}"
    for i, r in enumerate(runs):
        compiled, loaded, failed, diff, _ = r["stages"]["aot"]
        assert (int(compiled), int(loaded)) == ((1, 0) if i == 0 else (0, 1)) and failed == "0", summary
        graphs = r["stages"]["graphs"]
        assert float(diff) < 2e-3 and float(graphs[1]) < 2e-3 and int(graphs[0]) == 3, summary
