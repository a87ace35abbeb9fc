"""sdengine.cuda_graphs and the pipeline's graphed U-Net/VAE path, on the CPU.

A CUDA graph cannot be recorded without a GPU, so the recording backend is replaced by one with the same
contract on the CPU: it runs the function ``warmup`` times, keeps the output of one more call as the static
output, and its replay re-runs the function on the static inputs and writes the result INTO that static output.
Everything else (signatures, static input buffers, copies out, fingerprints, LoRA hooks, fall-backs) is the
code that runs on a GPU. The real CUDA recording is exercised by the GPU test at the end when a GPU is present.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import sdengine
from _cpu_graphs import CPUBackend
from sdengine.cuda_graphs import GraphedCallable, module_fingerprint


class Affine(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale: float = 1.0, extra=None, tags=None):
        y = self.lin(x) * scale
        return y if extra is None else y + extra


def _graphed(module: nn.Module, **kw: Any) -> tuple[GraphedCallable, CPUBackend]:
    backend = CPUBackend()
    return GraphedCallable(module, module=module, backend=backend, device_type="cpu", **kw), backend


@torch.no_grad()
def test_replays_equal_eager_calls_and_record_once_per_signature():
    torch.manual_seed(0)
    m = Affine()
    g, backend = _graphed(m)
    for _ in range(3):
        x = torch.randn(2, 4)
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    assert (backend.recorded, g.recordings, g.replays) == (1, 1, 3)
    x5 = torch.randn(5, 4)  # a new shape: a second graph
    torch.testing.assert_close(g(x5), m(x5), rtol=0, atol=0)
    torch.testing.assert_close(g(x5, scale=2.0), m(x5, scale=2.0), rtol=0, atol=0)  # a new constant: a third
    assert g.recordings == 3 and len(g.graphs) == 3


@torch.no_grad()
def test_outputs_are_copies_and_inputs_are_copied_in():
    m = Affine()
    g, _ = _graphed(m)
    x = torch.randn(2, 4)
    first = g(x)
    kept = first.clone()
    second = g(x * 3)  # replays over the same static buffers
    torch.testing.assert_close(first, kept, rtol=0, atol=0)  # the first answer was not overwritten
    torch.testing.assert_close(second, m(x * 3), rtol=0, atol=0)
    second.zero_()  # a caller writing into its answer does not reach the graph's output
    torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)


@torch.no_grad()
def test_least_recently_used_graph_is_dropped():
    g, _ = _graphed(Affine(), max_graphs=2)
    a, b, c = torch.randn(1, 4), torch.randn(2, 4), torch.randn(3, 4)
    g(a), g(b), g(a), g(c)  # b is the least recently used when c arrives
    shapes = [k[0][1][1] for k in g.graphs]
    assert shapes == [(1, 4), (3, 4)]


def test_calls_that_cannot_be_graphed_run_plainly():
    m = Affine()
    g, backend = _graphed(m)
    x = torch.randn(2, 4)
    with torch.no_grad():
        g(x, tags=["cond"])  # an argument that is neither a tensor nor a constant
    y = g(x.requires_grad_(True))  # autograd on: plain call, and gradients flow
    y.sum().backward()
    assert m.lin.weight.grad is not None
    other = GraphedCallable(m, module=m, backend=backend)  # device_type cuda: CPU tensors run plainly
    with torch.no_grad():
        other(torch.randn(2, 4))
    assert backend.recorded == 0 and g.replays == 0 and other.replays == 0


@torch.no_grad()
def test_failed_recording_falls_back_once_with_a_warning(caplog):
    def broken(fn, warmup):
        raise RuntimeError("operation not permitted when stream is capturing")

    m = Affine()
    g = GraphedCallable(m, module=m, backend=broken, device_type="cpu", name="net")
    x = torch.randn(2, 4)
    with caplog.at_level("WARNING"):
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
        torch.testing.assert_close(g(x), m(x), rtol=0, atol=0)
    assert sum("CUDA graph not recorded" in r.message for r in caplog.records) == 1
    assert g.replays == 0


@torch.no_grad()
def test_fingerprint_follows_storage_versions_and_hooks():
    m = Affine()
    g, _ = _graphed(m)
    g(torch.randn(2, 4))
    fp = module_fingerprint(m)
    assert module_fingerprint(m) == fp and g.usable() and len(g.graphs) == 1  # nothing changed: graphs kept
    m.lin.weight.mul_(2)  # in place: the version counter moves, graphs are recorded again
    assert module_fingerprint(m) != fp and g.usable() and len(g.graphs) == 0
    g(torch.randn(2, 4))
    fp = module_fingerprint(m)
    m.lin.weight = nn.Parameter(m.lin.weight.detach().clone())  # a new tensor: graphs are stale
    assert module_fingerprint(m) != fp
    assert g.usable() and len(g.graphs) == 0
    h = m.lin.register_forward_hook(lambda mod, i, o: o + 1)  # a LoRA-style hook: graphs not used at all
    assert not g.usable()
    h.remove()
    assert g.usable()


# ---------------------------------------------------------------------------------------------------
# The pipeline's graphed path
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")


def _gen(pipe, **kw: Any) -> np.ndarray:
    # 32x32: the tiny VAE's 16x16 latents, the tiny U-Net's sample size (what a replay must equal needs no more)
    args: dict[str, Any] = {"steps": 4, "seed": 3, "width": 32, "height": 32, "progress": False}
    args.update(kw)
    return pipe("a red cube", "blurry", **args).arrays


def test_pipeline_images_equal_with_graphs(tiny_pipe):
    plain = _gen(tiny_pipe, batch_size=2)
    backend = CPUBackend()
    try:
        assert tiny_pipe.enable_cuda_graphs(backend=backend, device_type="cpu")
        assert not tiny_pipe.enable_cuda_graphs()  # a CPU pipeline: no CUDA graphs
        graphed = _gen(tiny_pipe, batch_size=2)
        again = _gen(tiny_pipe, batch_size=2)
        unet, vae = tiny_pipe.cuda_graphs["unet"], tiny_pipe.cuda_graphs["vae"]
        assert unet.recordings == 1 and unet.replays == 8  # 4 steps x 2 calls, one CFG batch each
        assert vae.recordings == 1 and vae.replays == 4  # one row at a time
        np.testing.assert_array_equal(graphed, plain)
        np.testing.assert_array_equal(again, plain)
    finally:
        tiny_pipe.cuda_graphs = None


def test_pipeline_with_a_lora_hook_runs_eagerly_and_correctly(tiny_pipe):
    backend = CPUBackend()
    try:
        tiny_pipe.enable_cuda_graphs(backend=backend, device_type="cpu")
        _gen(tiny_pipe)  # graphs recorded without the LoRA
        lin = next(m for n, m in tiny_pipe.unet.named_modules() if n.endswith("attn1.to_q"))
        handle = lin.register_forward_hook(lambda mod, i, o: o * 1.5)  # as a patched LoRA does
        replays = tiny_pipe.cuda_graphs["unet"].replays
        hooked = _gen(tiny_pipe)
        assert tiny_pipe.cuda_graphs["unet"].replays == replays  # not replayed: the hook would be missed
        tiny_pipe.cuda_graphs = None
        expected = _gen(tiny_pipe)
        handle.remove()
        np.testing.assert_array_equal(hooked, expected)
        assert not np.array_equal(hooked, _gen(tiny_pipe))  # the hook did change the image
    finally:
        tiny_pipe.cuda_graphs = None


def test_text_encoder_replays_from_graphs_and_gives_the_same_states(tiny_pipe):
    from sdengine.cuda_graphs import through
    from sdengine.text import encode_cache

    enc = tiny_pipe.text_encoder
    encode_cache.clear()
    plain = _gen(tiny_pipe)
    assert through(enc) is enc  # nothing routed yet
    backend = CPUBackend()
    try:
        tiny_pipe.enable_cuda_graphs(backend=backend, device_type="cpu")
        text = tiny_pipe.cuda_graphs["text_encoder"]
        assert through(enc) is text
        encode_cache.clear()  # else the cache answers the repeated prompt without the encoder
        graphed = _gen(tiny_pipe)
        assert text.recordings == 1 and text.replays == 2  # the prompt and the negative: one shape, one graph
        np.testing.assert_array_equal(graphed, plain)
        long_prompt = "a red cube " * 40  # two chunks: a second signature, a second graph
        encode_cache.clear()
        with_graphs = tiny_pipe.encode_prompt(long_prompt, "blurry")
        assert text.recordings == 2
    finally:
        tiny_pipe.cuda_graphs = None
    assert through(enc) is enc  # the route goes with the pipeline's graphs
    encode_cache.clear()
    for a, b in zip(with_graphs, tiny_pipe.encode_prompt(long_prompt, "blurry"), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_text_encoder_runs_eagerly_with_embeddings_or_a_lora_hook(tiny_pipe):
    from sdengine.cuda_graphs import through

    enc = tiny_pipe.text_encoder
    try:
        tiny_pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
        graphs = tiny_pipe.cuda_graphs["text_encoder"]
        # textual-inversion vectors: the embedding lookup branches on them, which a graph would not see
        enc.set_extra_tokens(torch.zeros(2, enc.config.hidden_size))
        assert through(enc) is enc
        enc.set_extra_tokens(None)
        assert through(enc) is graphs
        handle = enc.text_model.encoder.layers[0].mlp.fc1.register_forward_hook(lambda m, i, o: o * 2)
        assert through(enc) is enc
        handle.remove()
        assert through(enc) is graphs
    finally:
        enc.set_extra_tokens(None)
        tiny_pipe.cuda_graphs = None


def test_sdxl_text_encoders_replay_from_graphs(tmp_path):
    from _sdxl_models import make_sdxl_folder
    from sdengine.text import encode_cache

    pipe = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "tiny-sdxl"), device="cpu", fast_path="none")
    kw: dict[str, Any] = {"steps": 3, "seed": 2, "width": 32, "height": 32, "progress": False}
    encode_cache.clear()
    plain = pipe("a red apple", "blurry", **kw).arrays
    pipe.enable_cuda_graphs(backend=CPUBackend(), device_type="cpu")
    encode_cache.clear()
    graphed = pipe("a red apple", "blurry", **kw).arrays
    np.testing.assert_array_equal(graphed, plain)
    assert {n: pipe.cuda_graphs[n].replays > 0 for n in ("text_encoder", "text_encoder_2", "unet")} == {
        "text_encoder": True,
        "text_encoder_2": True,
        "unet": True,
    }


def test_cuda_only_fast_path_options_are_skipped_on_the_cpu(tiny_sd1_folder):
    from sdengine.fastpath import CUDA_ONLY, apply_fast_path, parse_options

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    before = torch.backends.cudnn.benchmark
    notes = apply_fast_path(pipe, parse_options(",".join(sorted(CUDA_ONLY))))
    assert len(notes) == len(CUDA_ONLY) == 4 and all("skipped (a CUDA option" in n for n in notes)
    assert pipe.cuda_graphs is None and torch.backends.cudnn.benchmark == before


def test_a_cuda_option_asked_for_on_the_cpu_is_said_when_the_pipeline_loads(tiny_sd1_folder, caplog):
    """docs/cli.md: the CUDA options are "skipped, with a note, on the CPU". load_pipeline dropped
    apply_fast_path's notes, so `sdengine --fast-path cuda_graphs generate ...` on a CPU did nothing without a
    word; now each skipped option is a warning (the CLI's "sdengine: WARNING" line); channels_last, which
    runs, is no warning."""
    with caplog.at_level(logging.WARNING, logger="sdengine"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="cuda_graphs,channels_last")
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "cuda_graphs: skipped (a CUDA option; the pipeline is on cpu)" in said[0], said


def test_widest_attention_of_a_pipeline(tiny_pipe):
    from sdengine.fastpath import widest_attention

    heads, head_dim, tokens = widest_attention(tiny_pipe)
    first = next(m for m in tiny_pipe.unet.modules() if hasattr(m, "heads") and hasattr(m, "to_q"))
    assert heads == first.heads and heads * head_dim == first.to_q.out_features
    assert tokens == (tiny_pipe.default_size // tiny_pipe.vae_scale_factor) ** 2


# ---------------------------------------------------------------------------------------------------
# The attention kernel choice
# ---------------------------------------------------------------------------------------------------


def test_attention_backend_choice_orders_kernels_and_keeps_results():
    from sdengine import sdpa_backends as sb
    from sdengine.errors import UsageError

    q, k, v = (torch.randn(1, 2, 16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    default_order = torch._C._get_sdp_priority_order()
    try:
        sb.use_backend("efficient")
        assert sb.current_backend() == "efficient"
        order = torch._C._get_sdp_priority_order()
        assert order[0] == int(torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION)
        assert order[-2] == int(torch.nn.attention.SDPBackend.MATH)  # math last among the four
        sb.use_backend("math")
        torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(q, k, v), ref)
        with pytest.raises(UsageError, match="unknown attention backend 'fast'"):
            sb.use_backend("fast")
    finally:
        sb.use_backend("default")
    assert sb.current_backend() == "default" and torch._C._get_sdp_priority_order() == default_order


def test_time_backends_on_the_cpu_times_what_runs():
    from sdengine import sdpa_backends as sb

    times = sb.time_backends("cpu", torch.float32, batch=1, heads=2, tokens=64, head_dim=8, repeats=2)
    assert set(times) == set(sb.BACKENDS)
    assert times["math"] is not None and times["math"] > 0
    assert times["cudnn"] is None  # no cuDNN attention on the CPU
    assert sb.fastest(times) in [k for k, v in times.items() if v is not None]
    assert sb.fastest({"flash": None}) == "default"


# ---------------------------------------------------------------------------------------------------
# On a GPU (skipped on the CPU): the real recording
# ---------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_graph_equals_eager(tiny_sd1_folder):  # pragma: no cover - CI has no GPU
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    from sdengine.text import encode_cache

    plain = _gen(pipe)
    assert pipe.enable_cuda_graphs()
    encode_cache.clear()  # the text encoder runs (from its graphs), not the cache
    graphed = _gen(pipe)
    encode_cache.clear()
    again = _gen(pipe)  # replays every graph, the text encoder's too
    assert pipe.cuda_graphs["unet"].replays > 0 and pipe.cuda_graphs["text_encoder"].replays > 0
    np.testing.assert_allclose(graphed, plain, atol=2e-3)
    np.testing.assert_allclose(again, plain, atol=2e-3)


def test_cuda_defaults_are_the_measured_graph_options(monkeypatch):
    from sdengine.fastpath import ENV, resolve_options

    monkeypatch.delenv(ENV, raising=False)
    # resolve_options is pure logic: a device name is enough, no GPU needed
    assert resolve_options(None, "cuda", torch.float16) == (
        "channels_last",
        "cudnn_benchmark",
        "cuda_graphs",
    )
    assert resolve_options("default", "cuda:0", torch.bfloat16) == (
        "channels_last",
        "cudnn_benchmark",
        "cuda_graphs",
    )
    assert resolve_options("default", "cuda", torch.float32) == ()  # measured in half precision only
    assert resolve_options("none", "cuda", torch.float16) == ()
    monkeypatch.setenv(ENV, "compile,cuda_graphs")
    assert resolve_options(None, "cuda", torch.float16) == ("compile", "cuda_graphs")


def test_masked_attention_is_unchanged_on_the_cpu():
    from sdengine.sdpa_backends import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, 10, generator=g) > 0.3
    F = torch.nn.functional
    torch.testing.assert_close(attention(q, k, v, mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(
        attention(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_masked_attention_never_reaches_cudnn_on_a_gpu():  # pragma: no cover - CI has no GPU
    from sdengine import sdpa_backends as sb

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 77, 64, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 77, 77, device="cuda", dtype=torch.bool)  # a padding mask, as the text encoders pass
    mask[..., 40:] = False
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    try:
        sb.use_backend("cudnn")
        out = sb.attention(q, k, v, mask=mask)
    finally:
        sb.use_backend("default")
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)


def test_compile_and_aot_together_are_refused_in_one_line():
    from sdengine.errors import UsageError
    from sdengine.fastpath import parse_options

    with pytest.raises(UsageError, match="compile and aot are two ways to compile the same networks"):
        parse_options("aot,compile")
    assert parse_options("cuda_graphs, aot") == ("aot", "cuda_graphs")  # applied in OPTIONS' order


def _on_meta(module):
    import copy

    return copy.deepcopy(module).to("meta")


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_graphed_networks_never_read_the_device_nor_copy_from_the_host(kind, tiny_sd1_folder, tmp_path):
    """Each call the pipeline records (the U-Net step, the VAE and tiny VAE decodes, the text encoders), with its
    arguments as the pipeline passes them, run with the ``meta`` device as the GPU: nothing in it may wait on the
    device or copy from the host (either would make the CUDA recording fail, or replay a stale value)."""
    from _cpu_graphs import HostTraffic

    if kind == "sdxl":
        from _sdxl_models import make_sdxl_folder

        folder = make_sdxl_folder(tmp_path / "tiny-sdxl")
    else:
        folder = tiny_sd1_folder
    pipe = sdengine.load_pipeline(folder, device="cpu", dtype="fp32", fast_path="none")
    unet, vae = _on_meta(pipe.unet), _on_meta(pipe.vae)
    encoders = [_on_meta(pipe.text_encoder)] + ([_on_meta(pipe.text_encoder_2)] if kind == "sdxl" else [])
    meta = {"device": "meta"}
    ctx = torch.zeros(2, 77, unet.config.cross_attention_dim, **meta)
    step_kw: dict[str, Any] = {"encoder_hidden_states": ctx}
    if unet.config.projection_class_embeddings_input_dim is not None:  # SDXL's pooled text + size vector
        step_kw["class_labels"] = torch.zeros(2, unet.config.projection_class_embeddings_input_dim, **meta)
    ids = torch.zeros(2, 77, dtype=torch.long, **meta)
    from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig

    tiny = _on_meta(
        TinyAutoencoder(
            TinyVAEConfig(
                decoder_channels=(8, 8), decoder_blocks=(1, 1), encoder_channels=(8, 8), encoder_blocks=(1, 1)
            )
        )
    )
    with torch.inference_mode(), HostTraffic() as traffic:
        out = unet(torch.zeros(2, 4, 8, 8, **meta), torch.full((2,), 500.0, **meta), **step_kw)
        img = vae.decode(torch.zeros(1, 4, 8, 8, **meta))
        tiny_img = tiny.decode(torch.zeros(1, 4, 8, 8, **meta))
        if kind == "sdxl":  # called as the SDXL conditioner calls them
            states = [enc(ids, output_hidden_states=True).hidden_states[-2] for enc in encoders]
        else:  # as sdengine.prompts.encode_chunks calls it
            states = [encoders[0](ids, clip_skip=1).last_hidden_state]
    assert out.shape == (2, 4, 8, 8) and img.shape[-1] == 8 * pipe.vae_scale_factor and tiny_img.shape[-1] == 16
    assert all(s.shape[:2] == (2, 77) for s in states)
    assert traffic.seen == []


def test_aot_on_a_cuda_pipeline_warns_what_the_h200_runs_showed(tmp_path, monkeypatch, caplog):
    """load_pipeline keeps no fast-path notes, so the warning is what a user sees (no GPU needed: only the
    pipeline's device is read before ``enable_aot``, which is recorded here)."""
    from sdengine import fastpath

    monkeypatch.setattr(fastpath, "compile_cache_dir", lambda: tmp_path)

    class Pipe:
        device = torch.device("cuda")
        dtype = torch.float16

        def __init__(self) -> None:
            self.aot_dirs: list = []

        def enable_aot(self, cache):
            self.aot_dirs.append(cache)

    cuda, cpu = Pipe(), Pipe()
    cpu.device = torch.device("cpu")
    with caplog.at_level("WARNING", logger="sdengine.fastpath"):
        notes = fastpath.apply_fast_path(cuda, ["aot"])
    assert cuda.aot_dirs == [tmp_path / "aoti"] and fastpath.AOT_ON_CUDA in notes
    assert [r.getMessage() for r in caplog.records] == [fastpath.AOT_ON_CUDA]
    caplog.clear()
    with caplog.at_level("WARNING", logger="sdengine.fastpath"):
        notes = fastpath.apply_fast_path(cpu, ["aot"])
    assert fastpath.AOT_ON_CUDA not in notes and not caplog.records


@torch.no_grad()
def test_two_threads_calling_one_graph_each_get_their_own_result():
    """A graph's inputs and output are static buffers: a server thread decoding a preview on demand while the
    worker decoded through the same graph copied its input over the worker's before the replay (the worker got
    the other image). Calls are one at a time now."""
    import threading
    import time

    class SlowReplays(CPUBackend):
        def __call__(self, fn, warmup):
            replay, out = super().__call__(fn, warmup)

            def slow() -> None:
                time.sleep(0.1)  # a long replay: room for another thread's copy into the inputs
                replay()

            return slow, out

    torch.manual_seed(0)
    net = Affine()
    g = GraphedCallable(net, module=net, backend=SlowReplays(), device_type="cpu")
    inputs = [torch.randn(2, 4) for _ in range(2)]
    g(inputs[0])  # recorded
    got: dict[int, torch.Tensor] = {}

    def call(i: int) -> None:
        with torch.no_grad():
            got[i] = g(inputs[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(2)]
    threads[0].start()
    time.sleep(0.03)
    threads[1].start()
    for t in threads:
        t.join(10)
    for i in range(2):
        torch.testing.assert_close(got[i], net(inputs[i]))


def _tiny_vae():
    from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig

    torch.manual_seed(0)
    tiny = TinyAutoencoder(TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), has_encoder=False))
    tiny.name = "dec"
    return tiny


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_graphs_with_tiling_and_the_tiny_vae(tiny_sd1_folder):  # pragma: no cover - CI has no GPU
    """Tiling after the graphs were recorded (zero padding): the tiled image is the plain pipeline's tiled image,
    for the full and the tiny decode, and no graph replays during it."""
    import copy

    tiny = _tiny_vae()
    plain = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    plain.set_tiny_vae(copy.deepcopy(tiny))
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    pipe.set_tiny_vae(copy.deepcopy(tiny))
    assert pipe.enable_cuda_graphs()
    for decode in ("tiny", "full"):
        _gen(pipe, vae_decode=decode)  # recorded with zero padding
        counts = {k: g.replays for k, g in pipe.cuda_graphs.items() if k != "text_encoder"}
        got = _gen(pipe, tiling=True, vae_decode=decode)
        assert {k: g.replays for k, g in pipe.cuda_graphs.items() if k != "text_encoder"} == counts
        np.testing.assert_allclose(got, _gen(plain, tiling=True, vae_decode=decode), atol=2e-3)
        np.testing.assert_allclose(_gen(pipe, vae_decode=decode), _gen(plain, vae_decode=decode), atol=2e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_graphs_with_previews_decoded_on_another_thread(tiny_sd1_folder):  # pragma: no cover - CI has no GPU
    """A server decodes a job's preview on a request thread (sdengine.server.jobs, Job.preview) while the worker
    records and replays its graphs: one graphed call at a time, the worker's image unchanged, the previews equal
    the eager decode."""
    import copy
    import threading

    from sdengine.vae_utils import tiny_vae_rgb

    tiny = _tiny_vae()
    plain = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    plain.set_tiny_vae(copy.deepcopy(tiny))
    want = _gen(plain, steps=8)
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="none")
    pipe.set_tiny_vae(copy.deepcopy(tiny))
    assert pipe.enable_cuda_graphs()
    kept: list[torch.Tensor] = []
    frames: list[tuple[np.ndarray, np.ndarray]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def requests() -> None:  # the request thread: decode the newest kept latents, again and again
        to_rgb, eager = tiny_vae_rgb(pipe.tiny_vae), tiny_vae_rgb(plain.tiny_vae)
        try:
            while not stop.is_set():
                if kept:
                    z = kept[-1]
                    with torch.inference_mode():
                        frames.append((to_rgb(z).cpu().numpy(), eager(z).cpu().numpy()))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    def keep(info) -> None:
        kept.append(info.denoised[:1].clone())

    thread = threading.Thread(target=requests)
    thread.start()
    try:
        got = [_gen(pipe, steps=8, callback=keep) for _ in range(3)]  # the first records, the others replay
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    assert frames and pipe.cuda_graphs["unet"].replays > 0
    for image in got:
        np.testing.assert_allclose(image, want, atol=2e-3)
    for graphed, eager in frames:
        assert np.abs(graphed.astype(int) - eager.astype(int)).max() <= 2
