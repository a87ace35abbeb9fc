"""sdengine.aot: networks compiled ahead of time (AOTInductor), on the CPU (the same code path runs on a GPU).

Compiling a package takes tens of seconds on this CPU, so the unit tests compile one tiny module once and reuse
its package; the whole pipeline with the U-Net and VAE compiled is a slow test (make test-all)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from sdengine.aot import AOTCompiled, package_digest


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return torch.tanh(self.lin(x)) * scale


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    torch.manual_seed(0)
    m = Small().eval()
    cache = tmp_path_factory.mktemp("aoti")
    a = AOTCompiled(m, name="small", cache_dir=cache)
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
    b = AOTCompiled(other, name="small", cache_dir=cache)
    with torch.inference_mode():
        got = b(x)
    assert (b.compiled, b.loaded) == (0, 1)
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


@pytest.mark.slow
def test_pipeline_with_aot_equals_the_plain_pipeline(tiny_sd1_folder, tmp_path):
    import sdengine

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args = {"steps": 3, "seed": 2, "width": 64, "height": 64, "progress": False}
    plain = pipe("a red cube", "blurry", **args).arrays
    pipe.enable_aot(tmp_path)
    compiled = pipe("a red cube", "blurry", **args).arrays
    assert pipe.aot["unet"].compiled == 1 and pipe.aot["vae"].compiled == 1
    assert not pipe.aot["unet"].failed and not pipe.aot["vae"].failed
    np.testing.assert_allclose(compiled, plain, atol=1e-4)

    def record(fn, warmup):  # what a CUDA graph does, on the CPU (see tests/test_cuda_graphs.py)
        out = fn()
        return (lambda: out.copy_(fn())), out

    pipe.enable_cuda_graphs(backend=record, device_type="cpu")  # graphs over the compiled networks
    graphed = pipe("a red cube", "blurry", **args).arrays
    assert pipe.cuda_graphs["unet"].replays == 3 and pipe.aot["unet"].compiled == 1  # 3 steps; no second compile
    np.testing.assert_allclose(graphed, compiled, atol=1e-6)
