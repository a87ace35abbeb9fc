"""FP8 (e4m3) linear layers (sdengine.nn.fp8, the ``fp8`` fast-path option): the product's scales, which layers
are converted, the shipped emoji model's images with them, and LoRAs refused on such a U-Net. The CPU runs the
same ``torch._scaled_mm`` arithmetic slowly; the speed is a GPU measurement (docs/gpu.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sdengine
from sdengine.fastpath import parse_options
from sdengine.nn import fp8
from sdengine.nn.lora import LoRAError


def test_quantize_rows_keeps_each_row_in_range_and_close():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 64, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 300.0, 1e4, 0.0])[:, None]
    q, scale = fp8.quantize_rows(t)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1) and scale.dtype == torch.float32
    back = q.float() * scale
    assert torch.isfinite(back).all() and float(q.float().abs().amax()) == fp8.E4M3_MAX  # a row's max sits at 448
    for i in range(5):  # e4m3 has 3 mantissa bits: each value within 1/16 of its own size (round to nearest)
        err = (back[i] - t[i]).abs() / t[i].abs().clamp_min(scale[i] * 2**-6)
        assert float(err.max()) <= 1 / 16 + 1e-6, i
    assert float(back[5].abs().max()) == 0.0  # an all-zero row stays zero (no division by zero)


def test_fp8_linear_is_the_scaled_product_of_its_quantized_operands():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    layer = fp8.FP8Linear(lin)
    x = torch.randn(2, 37, 64)
    with torch.no_grad():
        y, exact = layer(x), lin(x)
    assert y.shape == (2, 37, 48) and y.dtype == x.dtype
    x8, sx = fp8.quantize_rows(x.reshape(-1, 64))
    ref = (x8.float() * sx) @ layer.dequantized_weight().t() + lin.bias.detach()
    assert torch.allclose(y.reshape(-1, 48), ref, rtol=1e-5, atol=1e-5)  # the scales' orientation is right
    rel = float((y - exact).abs().mean() / exact.abs().mean())
    assert 1e-4 < rel < 0.06  # an approximation: not exact, and within e4m3's few percent


def test_only_the_transformer_blocks_linear_layers_are_converted():
    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    names = [n for n, m in pipe.unet.named_modules() if isinstance(m, nn.Linear)]
    expect = {n for n in names if ".transformer_blocks." in n and not n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert expect and len(expect) < len(names)  # the time embedding's and the cross-attention's k/v stay
    n = fp8.to_fp8(pipe.unet)
    converted = {name for name, m in pipe.unet.named_modules() if isinstance(m, fp8.FP8Linear)}
    assert n == len(converted) and converted == expect
    assert fp8.has_fp8(pipe.unet) and not fp8.has_fp8(
        pipe.text_encoder if isinstance(pipe.text_encoder, nn.Module) else None
    )


def test_the_emoji_model_draws_the_same_pictures_with_fp8_and_refuses_loras():
    assert parse_options("fp8,channels_last") == ("channels_last", "fp8")  # applied before compile/aot/graphs
    plain = sdengine.load_pipeline("emoji", fast_path="none")
    quant = sdengine.load_pipeline("emoji", fast_path="fp8")
    assert fp8.has_fp8(quant.unet) and not fp8.has_fp8(plain.unet)
    kw = dict(prompt=["a red apple", "a smiling cat face"], seed=[1, 2], steps=20, width=64, height=64, progress=False)
    a, b = plain(**kw).arrays, quant(**kw).arrays
    diff = float(np.abs(a - b).mean())
    assert 1e-5 < diff < 2e-2, diff  # differs, but by a few levels of 255 (docs/gpu.md has the recogniser's view)
    with pytest.raises(LoRAError, match="multiplies in FP8"):
        quant(prompt="an apple", loras=[("emoji-fruit", 1.0)], steps=2, width=64, height=64, progress=False)
    again = quant(**kw).arrays  # the refusal left the pipeline as it was
    assert np.array_equal(again, b)


def test_dtype_conversions_keep_the_quantized_weight():
    layer = fp8.FP8Linear(nn.Linear(32, 16))
    w8 = layer.weight_fp8.clone()
    layer.half()
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_fp8.view(torch.uint8), w8.view(torch.uint8)) and layer.bias.dtype == torch.float16
    x = torch.randn(3, 32)
    assert layer(x.half()).dtype == torch.float16 and torch.allclose(layer(x), layer.float()(x))


def test_supported_devices():
    assert fp8.supported("cpu") and not fp8.supported("meta")


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU of 8.9+"
)
def test_on_the_gpu_the_product_is_the_dequantized_operands_product():  # pragma: no cover - no GPU in CI
    torch.manual_seed(0)
    lin = nn.Linear(320, 640).half()
    layer = fp8.FP8Linear(lin)
    x = torch.randn(2, 4096, 320)
    # The reference without the CPU's _scaled_mm (torch 2.11's takes per-tensor scales only): the e4m3 operands
    # dequantized and multiplied in float64, from the half-precision input the GPU gets.
    x8, sx = fp8.quantize_rows(x.half().reshape(-1, 320))
    ref = (x8.double() * sx.double()) @ layer.dequantized_weight().double().t() + lin.bias.detach().double()
    gpu = layer.cuda()(x.cuda().half()).double().cpu().reshape(-1, 640)
    assert layer.weight_fp8.dtype == torch.float8_e4m3fn and layer.weight_fp8.is_cuda
    assert float((gpu - ref).abs().mean() / ref.abs().mean()) < 1e-2  # bf16 output, fp16 result on the GPU


@pytest.mark.cuda
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9), reason="needs a CUDA GPU of 8.9+"
)
def test_real_cuda_graphs_replay_the_fp8_network(tiny_sd1_folder):  # pragma: no cover - no GPU in CI
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cuda", dtype="fp16", fast_path="fp8")
    assert any(isinstance(m, fp8.FP8Linear) for m in pipe.unet.modules())
    kw = dict(prompt="a red apple", seed=4, steps=6, width=64, height=64, progress=False)
    plain = pipe(**kw).arrays
    assert pipe.enable_cuda_graphs()
    graphed = pipe(**kw).arrays
    assert pipe.cuda_graphs["unet"].replays == 6
    assert float(np.abs(graphed - plain).mean()) < 1e-3


def test_graphs_replay_the_fp8_network_exactly():
    """CUDA graphs record the e4m3 layers like any other (here a stand-in recorder on the CPU, as in
    tests/test_cuda_graphs.py): the replayed images equal the plain fp8 ones."""
    pipe = sdengine.load_pipeline("emoji", fast_path="fp8")
    kw = dict(prompt="a red apple", seed=4, steps=6, width=64, height=64, progress=False)
    plain = pipe(**kw).arrays

    def backend(fn, warmup):
        for _ in range(warmup):
            fn()
        out = fn()
        return (lambda: out.copy_(fn())), out

    assert pipe.enable_cuda_graphs(backend=backend, device_type="cpu")
    np.testing.assert_array_equal(pipe(**kw).arrays, plain)
    assert pipe.cuda_graphs["unet"].recordings == 1 and pipe.cuda_graphs["unet"].replays == 6


def test_a_recorded_fp8_unet_never_reads_the_device_nor_copies_from_the_host(tiny_sd1_folder):
    """The per-token activation scales are computed on the device: with ``meta`` playing the GPU, nothing in an fp8
    U-Net call waits on it or copies from the host (a CUDA graph could not record either)."""
    import copy

    from _cpu_graphs import HostTraffic

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    unet = copy.deepcopy(pipe.unet)
    assert fp8.to_fp8(unet) > 0
    unet = unet.to("meta")
    ctx = torch.zeros(2, 77, unet.config.cross_attention_dim, device="meta")
    with torch.inference_mode(), HostTraffic() as traffic:
        out = unet(
            torch.zeros(2, 4, 8, 8, device="meta"), torch.full((2,), 500.0, device="meta"), encoder_hidden_states=ctx
        )
    assert out.shape == (2, 4, 8, 8) and traffic.seen == []
