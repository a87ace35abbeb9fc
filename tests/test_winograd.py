"""Winograd F(4x4,3x3) convolution (sdengine.nn.winograd) and the fast-path switch that turns it on."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sdengine.errors import UsageError
from sdengine.fastpath import DEFAULT_OPTIONS, ENV, OPTIONS, resolve_options
from sdengine.nn import winograd
from sdengine.nn.winograd import (
    MIN_SIDE,
    WinogradConv2d,
    convertible,
    disable_winograd,
    enable_winograd,
    transform_filter,
    winograd_conv3x3,
    worth_it,
)


@pytest.fixture(autouse=True)
def cache_budget(monkeypatch):
    """A budget for the filter-transform cache (the default keeps none): the tests below cache on purpose."""
    monkeypatch.setenv(winograd.CACHE_ENV, "1024")


def _errors(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> tuple[float, float, float]:
    """(Winograd's, direct fp32's) max abs error against the float64 convolution, and its max abs value."""
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double(), padding=1)
    win = winograd_conv3x3(x, transform_filter(w), b)
    direct = F.conv2d(x, w, b, padding=1)
    assert win.shape == direct.shape and win.is_contiguous()
    return (win.double() - ref).abs().max().item(), (direct.double() - ref).abs().max().item(), ref.abs().max().item()


@pytest.mark.parametrize(
    "n,c,k,h,w,bias",
    [
        (1, 8, 5, 8, 8, True),
        (3, 6, 7, 9, 13, True),
        (2, 16, 16, 4, 6, False),
        (1, 3, 2, 1, 1, True),
        (2, 40, 24, 17, 12, True),
    ],
)
def test_equals_the_convolution_within_fp32_rounding(n, c, k, h, w, bias):
    g = torch.Generator().manual_seed(n * 100 + h)
    x = torch.randn(n, c, h, w, generator=g)
    wt = torch.randn(k, c, 3, 3, generator=g) * 0.1
    b = torch.randn(k, generator=g) if bias else None
    err, direct, scale = _errors(x, wt, b)
    # Winograd adds rounding in its transforms (entries up to 8 and 1/24): a few fp32 ulps of the output's
    # scale beyond the direct convolution's own error; a wrong tile or padding would be off by O(scale)
    assert err <= 8 * direct + 1e-5 * scale, (err, direct, scale)


def test_sd_sized_layer_error_is_of_the_direct_convolutions_order():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 320, 16, 16, generator=g)
    wt = torch.randn(320, 320, 3, 3, generator=g) * 0.02
    err, direct, scale = _errors(x, wt, torch.randn(320, generator=g))
    # fp32 rounding at the output's scale, as the test above bounds it: the direct convolution's own error
    # depends on the CPU's kernels (on an AVX-512 EPYC: direct 1.9e-6, Winograd 4.2e-5 of a 6.0 scale, 7e-6
    # relative); a wrong tile, padding or channel sum would be off by O(scale)
    assert err <= 8 * direct + 1e-5 * scale and err < 1e-5 * scale, (err, direct, scale)


def test_filter_transform_needs_3x3():
    with pytest.raises(ValueError, match="3x3"):
        transform_filter(torch.zeros(4, 4, 5, 5))


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(320, 320, 3, padding=1),  # worth it
        nn.Conv2d(320, 320, 3, stride=2, padding=1),  # strided: not convertible
        nn.Conv2d(320, 8, 3, padding=1),  # too few output channels to pay for the transforms
        nn.Conv2d(8, 320, 1),  # 1x1
    )


def test_enable_converts_only_the_layers_worth_it_and_keeps_the_state_dict():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert [convertible(m) for m in net] == [True, False, True, False]
    assert [worth_it(m) for m in net] == [True, False, False, False]
    assert enable_winograd(net) == 1
    assert type(net[0]) is WinogradConv2d and all(type(m) is nn.Conv2d for m in net[1:])
    assert enable_winograd(net) == 0  # idempotent
    after = net.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    assert disable_winograd(net) == 1 and type(net[0]) is nn.Conv2d


def test_converted_layer_runs_winograd_on_cpu_fp32_and_direct_elsewhere():
    conv = nn.Conv2d(320, 320, 3, padding=1)
    x = torch.randn(2, 320, 16, 16)  # batch x pixels in the range where the transform is cached
    with torch.inference_mode():
        direct = conv(x)
        enable_winograd(conv)
        win = conv(x)
        assert not torch.equal(win, direct)  # another algorithm: other rounding
        torch.testing.assert_close(win, direct, rtol=0, atol=1e-4)
        small = torch.randn(1, 320, MIN_SIDE - 1, MIN_SIDE + 3)  # below the size where it pays
        assert torch.equal(conv(small), F.conv2d(small, conv.weight, conv.bias, padding=1))
        conv.double()
        xd = x.double()
        assert torch.equal(conv(xd), F.conv2d(xd, conv.weight, conv.bias, padding=1))


def test_training_uses_the_direct_convolution_and_its_gradients():
    conv = nn.Conv2d(320, 320, 3, padding=1)
    ref = nn.Conv2d(320, 320, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    enable_winograd(conv)
    x = torch.randn(1, 320, 8, 8)
    conv(x).square().mean().backward()
    ref(x).square().mean().backward()
    assert conv.weight.grad is not None and ref.weight.grad is not None
    assert torch.equal(conv.weight.grad, ref.weight.grad)


def test_the_cached_filters_follow_every_change_of_the_weight():
    conv = nn.Conv2d(320, 320, 3, padding=1)
    enable_winograd(conv)
    x = torch.randn(2, 320, 16, 16)

    def check() -> None:
        with torch.inference_mode():
            want = F.conv2d(x, conv.weight, conv.bias, padding=1)
            # a stale cache would be off by the weight's change (a factor of 2 or more), not by rounding
            torch.testing.assert_close(conv(x), want, rtol=0, atol=2e-5 * want.abs().max().item())

    check()
    assert conv.cached_bytes() == 36 * 320 * 320 * 4  # the transform is cached (the budget allows it)
    with torch.no_grad():
        conv.weight.mul_(-2.0)  # in place: the version counter moves
    check()
    original = conv.weight.data
    conv.weight.data = original * 0.5  # replaced, as LoRA fusing does
    check()
    conv.weight.data = original  # and restored (the address of the first tensor again)
    check()
    for scale in (3.0, 4.0):  # replaced twice in a row: a freed tensor's address must not be taken for it
        conv.weight.data = original * scale
        check()
    conv.load_state_dict({"weight": torch.randn(320, 320, 3, 3) * 0.01, "bias": torch.zeros(320)})
    check()


def test_forward_hooks_still_apply():
    conv = nn.Conv2d(320, 320, 3, padding=1)
    enable_winograd(conv)
    conv.register_forward_hook(lambda m, args, out: out + 1.0)
    x = torch.randn(2, 320, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, padding=1) + 1.0, rtol=0, atol=1e-4)


def test_fast_path_defaults_and_names(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    assert "winograd" in OPTIONS
    # winograd is a memory-for-speed trade, not on by default (docs/performance.md)
    assert resolve_options(None, "cpu", torch.float32) == tuple(sorted(DEFAULT_OPTIONS)) == ()
    monkeypatch.setattr("sdengine.fastpath.DEFAULT_OPTIONS", frozenset({"winograd"}))
    assert resolve_options("default", "cpu", torch.float32) == ("winograd",)  # the defaults are for fp32 CPU
    assert resolve_options("default", "cpu", torch.float16) == ()
    assert resolve_options("none", "cpu", torch.float32) == ()
    assert resolve_options("channels_last, winograd", "cpu", torch.float32) == ("winograd", "channels_last")
    monkeypatch.setenv(ENV, "none")
    assert resolve_options(None, "cpu", torch.float32) == ()
    with pytest.raises(UsageError, match="unknown fast-path option"):
        resolve_options("winograd,turbo", "cpu", torch.float32)


def test_cli_refuses_an_unknown_fast_path_option_before_loading(capsys, monkeypatch):
    from sdengine.cli import main

    monkeypatch.setenv(ENV, "default")  # recorded, so that what main() sets is undone after the test
    code = main(["--fast-path", "winograd,turbo", "generate", "a cat", "--model", "no/such/model"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "unknown fast-path option(s) turbo" in err[0]


def test_cli_fast_path_sets_what_load_pipeline_applies(monkeypatch):
    from sdengine.cli import main

    monkeypatch.setenv(ENV, "default")  # recorded, so that what main() sets is undone after the test
    assert main(["--fast-path", "none", "list", "samplers"]) == 0
    import os

    assert os.environ.get(ENV) == "none" and resolve_options(None, "cpu", torch.float32) == ()


def test_the_cache_budget_bounds_memory_and_large_calls_still_gain(monkeypatch):
    torch.manual_seed(0)  # fixed inputs: with fresh random ones each run the error bound below was once exceeded
    convs = [nn.Conv2d(320, 320, 3, padding=1) for _ in range(3)]
    for conv in convs:
        enable_winograd(conv)
    one = 36 * 320 * 320 * 4  # bytes of one layer's transform
    monkeypatch.setenv(winograd.CACHE_ENV, str((1.5 * one + winograd.BUDGET.used()) / 2**20))
    x = torch.randn(2, 320, 16, 16)
    with torch.inference_mode():
        for conv in convs:
            conv(x)
    assert [c.cached_bytes() for c in convs] == [one, 0, 0]  # only the first fitted
    assert winograd.BUDGET.used() <= winograd.BUDGET.limit()
    big = torch.randn(2, 320, 32, 32)  # batch x pixels >= MIN_WORK_PER_CALL: transform recomputed, not kept
    small = torch.randn(1, 320, 16, 16)  # below: the direct convolution
    with torch.inference_mode():
        out = convs[1](big)
        want = F.conv2d(big, convs[1].weight, convs[1].bias, padding=1)
        assert not torch.equal(out, want)
        torch.testing.assert_close(out, want, rtol=0, atol=2e-5 * want.abs().max().item())  # as the other fp32 bound
        assert convs[1].cached_bytes() == 0
        assert torch.equal(convs[2](small), F.conv2d(small, convs[2].weight, convs[2].bias, padding=1))
    assert big.shape[0] * big.shape[2] * big.shape[3] >= winograd.MIN_WORK_PER_CALL


def test_a_unet_with_winograd_layers_stays_within_the_fast_path_tolerance():
    import dataclasses

    from sdengine.fastpath import TOLERANCE
    from sdengine.models.unet import TINY_SD, UNet

    torch.manual_seed(0)
    cfg = dataclasses.replace(TINY_SD, block_out_channels=(320, 320), attention=("none", "none"), norm_num_groups=32)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # away from the zero-initialised output layer
    x = torch.randn(2, 4, 32, 32)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.inference_mode():
        direct = unet(x, 500.0, encoder_hidden_states=ctx)
        assert enable_winograd(unet) > 0
        win = unet(x, 500.0, encoder_hidden_states=ctx)
    assert not torch.equal(win, direct)  # the converted layers ran
    # the U-Net's output (a noise prediction) within the image tolerance of the fast path, with a wide margin
    assert (win - direct).abs().mean().item() < TOLERANCE / 100


def test_a_zero_budget_keeps_no_transform(monkeypatch):
    monkeypatch.setenv(winograd.CACHE_ENV, "0")
    assert winograd.BUDGET.limit() == 0
    monkeypatch.delenv(winograd.CACHE_ENV)
    assert winograd.BUDGET.limit() == int(winograd.DEFAULT_CACHE_MB * 2**20)
    monkeypatch.setenv(winograd.CACHE_ENV, "0")
    conv = nn.Conv2d(320, 320, 3, padding=1)
    enable_winograd(conv)
    with torch.inference_mode():
        conv(torch.randn(2, 320, 32, 32))  # large enough to run Winograd with a per-call transform
    assert conv.cached_bytes() == 0


@pytest.mark.parametrize("value", ["2G", "abc", "-5", "nan", "inf"])
def test_a_bad_cache_budget_is_one_clear_error_when_the_option_is_applied(monkeypatch, value):
    """`SDENGINE_WINOGRAD_CACHE_MB=2G` (or any value that is no number of MiB >= 0) silently meant the 4 GiB
    default; now a UsageError naming the variable when the option is applied (the CLI's one line), before any
    generation."""

    model = nn.Sequential(nn.Conv2d(320, 320, 3, padding=1))
    monkeypatch.setenv(winograd.CACHE_ENV, value)
    with pytest.raises(UsageError, match=r"SDENGINE_WINOGRAD_CACHE_MB must be a number of MiB >= 0") as e:
        winograd.enable_winograd(model)
    assert value in str(e.value) and type(model[0]) is nn.Conv2d  # nothing converted
    monkeypatch.setenv(winograd.CACHE_ENV, "0.5")
    assert winograd.cache_limit_bytes() == 2**19
