"""A1111's "Tiling" (circular convolutions) and "Resize seed from width/height" in the pipeline and the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdengine.diffusion.variation import seed_resized_noise, slerp
from sdengine.errors import GenerationError
from sdengine.metadata import parse_parameters, to_generate_kwargs

FAST = {"steps": 3, "sampler": "euler", "schedule": "normal", "progress": False}


# -- Resize seed from --------------------------------------------------------------------------------------


def _a1111_noise(shape, seed, size, subseed=None, strength=0.0):
    """A1111's modules/rng.py ImageRNG.first for one image, CPU random source, written from its code: the
    seed's noise at the resized shape (a fresh generator), slerped with the subseed's at that shape, pasted
    centred into the generator's own first draw at the real shape."""
    c, big_h, big_w = shape
    noise_shape = (c, size[0], size[1])
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(noise_shape, generator=torch.Generator("cpu").manual_seed(seed))
    if subseed is not None and strength != 0:
        sub = torch.randn(noise_shape, generator=torch.Generator("cpu").manual_seed(subseed))
        noise = slerp(strength, noise[None], sub[None])[0]
    x = torch.randn(shape, generator=generator)
    dx = (shape[2] - noise_shape[2]) // 2
    dy = (shape[1] - noise_shape[1]) // 2
    w = noise_shape[2] if dx >= 0 else noise_shape[2] + 2 * dx
    h = noise_shape[1] if dy >= 0 else noise_shape[1] + 2 * dy
    tx = 0 if dx < 0 else dx
    ty = 0 if dy < 0 else dy
    dx = max(-dx, 0)
    dy = max(-dy, 0)
    x[:, ty : ty + h, tx : tx + w] = noise[:, dy : dy + h, dx : dx + w]
    return x


@pytest.mark.parametrize("size", [(6, 10), (12, 16), (11, 7), (8, 8), (13, 5), (3, 19)])
def test_seed_resized_noise_is_a1111s(size):
    shape = (4, 8, 12)
    seeds = [5, 77]
    noise = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds])
    got = seed_resized_noise(noise, seeds, size)
    want = torch.stack([_a1111_noise(shape, s, size) for s in seeds])
    assert torch.equal(got, want)
    # with a variation seed: slerped at the drawn size, before the paste
    got = seed_resized_noise(noise, seeds, size, [9, 10], 0.4)
    want = torch.stack([_a1111_noise(shape, s, size, sub, 0.4) for s, sub in zip(seeds, [9, 10], strict=True)])
    assert torch.allclose(got, want, atol=1e-6)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(str(tiny_sd1_folder), device="cpu")


def test_seed_resize_changes_the_start_noise_and_round_trips(pipe):
    plain = pipe("a cat", seed=5, **FAST)
    # the same size as the image: A1111 draws the noise as without it (the same image; the field is written)
    same = pipe("a cat", seed=5, seed_resize_from_w=pipe.default_size, seed_resize_from_h=pipe.default_size, **FAST)
    np.testing.assert_array_equal(plain.arrays, same.arrays)
    resized = pipe("a cat", seed=5, seed_resize_from_w=32, seed_resize_from_h=96, **FAST)
    assert not np.array_equal(plain.arrays, resized.arrays)
    assert "Seed resize from: 32x96" in resized.infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(resized.infotexts[0]))
    assert (kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"]) == (32, 96)
    again = pipe(**{**kwargs, **FAST})
    np.testing.assert_array_equal(again.arrays, resized.arrays)


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"seed_resize_from_w": 64}, "go together"),
        ({"seed_resize_from_w": 64, "seed_resize_from_h": 1.5}, "seed_resize_from_h must be an integer"),
        ({"seed_resize_from_w": -5, "seed_resize_from_h": 64}, "seed_resize_from_w must be an integer"),
        ({"seed_resize_from_w": 10**6, "seed_resize_from_h": 64}, r"in \[1, 8192\]"),
        ({"tiling": "yes"}, "tiling must be true or false"),
        ({"tiling": True, "vae_tiling": True}, "cannot be combined with vae_tiling"),
    ],
)
def test_bad_values_are_one_line(pipe, bad, message):
    with pytest.raises(GenerationError, match=message):
        pipe("a cat", **bad, **FAST)


# -- Tiling ------------------------------------------------------------------------------------------------


def _explicit_circular(*modules):
    """The reference: every padded Conv2d gets its input padded circularly by hand and pads nothing itself."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, torch.nn.Conv2d) and any(p > 0 for p in m.padding):
                ph, pw = m.padding
                m.register_forward_pre_hook(
                    lambda _, args, ph=ph, pw=pw: (F.pad(args[0], (pw, pw, ph, ph), "circular"),)
                )
                m.padding = (0, 0)


def test_tiling_is_circular_padding_and_leaves_nothing_behind(pipe, tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    plain = pipe("a cat", seed=3, **FAST)
    tiled = pipe("a cat", seed=3, tiling=True, **FAST)
    assert not np.array_equal(plain.arrays, tiled.arrays)
    assert "Tiling: True" in tiled.infotexts[0]
    ref = load_pipeline(str(tiny_sd1_folder), device="cpu")
    _explicit_circular(ref.unet, ref.vae)
    np.testing.assert_allclose(ref("a cat", seed=3, **FAST).arrays, tiled.arrays, atol=1e-5)
    # off again: every convolution pads with zeros and the next call is the plain image
    convs = [m for mod in (pipe.unet, pipe.vae) for m in mod.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.padding_mode == "zeros" for m in convs)
    np.testing.assert_array_equal(pipe("a cat", seed=3, **FAST).arrays, plain.arrays)
    kwargs = to_generate_kwargs(parse_parameters(tiled.infotexts[0]))
    assert kwargs["tiling"] is True
    np.testing.assert_array_equal(pipe(**{**kwargs, **FAST}).arrays, tiled.arrays)


def test_tiling_makes_the_controlnets_convolutions_circular_too(pipe, tiny_sd1_folder):
    """A tiled image with a ControlNet: A1111 leaves the ControlNet's convolutions at zero padding, so its residuals
    differ at the edges and the image may seam; sdengine pads them circularly too (the control map is then read as
    tiling as well): the image equals a reference whose U-Net, VAE and ControlNet pad circularly by hand, and the
    ControlNet (the caller's own module here) pads with zeros again after the call."""
    import copy

    from _pipeline_models import picture
    from sdengine.models.controlnet import ControlNet
    from sdengine.pipeline import load_pipeline

    net = ControlNet.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in net.parameters():  # the zero convs non-zero, so that the ControlNet matters
            param.add_(0.05 * torch.randn(param.shape, generator=gen))
    size = pipe.default_size
    hint = picture(size, size, seed=1)
    ref_net = copy.deepcopy(net)
    tiled = pipe("a cat", seed=3, tiling=True, controlnets=[(net, hint, 1.0, 0.0, 1.0)], **FAST)
    assert all(m.padding_mode == "zeros" for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    ref = load_pipeline(str(tiny_sd1_folder), device="cpu")
    _explicit_circular(ref.unet, ref.vae, ref_net)
    want = ref("a cat", seed=3, controlnets=[(ref_net, hint, 1.0, 0.0, 1.0)], **FAST)
    np.testing.assert_allclose(want.arrays, tiled.arrays, atol=1e-5)


def test_tiling_with_a_conv_lora_wraps_the_lora_term_too(pipe, tmp_path):
    """A LoRA on a 3x3 convolution adds its term through a hook; with tiling it must pad circularly as the
    base layer does (zero padding there left a seam of the LoRA's size)."""
    from sdengine.nn.lora import LoRALayer

    conv = next(m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    layer = LoRALayer(
        torch.randn(2, conv.in_channels, 3, 3, generator=torch.Generator().manual_seed(0)),
        torch.randn(conv.out_channels, 2, 1, 1, generator=torch.Generator().manual_seed(1)),
        scale=1.0,
        conv=LoRALayer.geometry(conv),
    )
    x = torch.randn(1, conv.in_channels, 8, 8, generator=torch.Generator().manual_seed(2))
    from sdengine.nn.lora import LoRAHandle
    from sdengine.pipeline.core import circular_padding

    handle = LoRAHandle()
    handle.attach("test", 1.0, [(conv, layer)])
    try:
        with torch.inference_mode(), circular_padding(conv):
            out = conv(x)
            shifted = conv(torch.roll(x, 3, dims=3))
        torch.testing.assert_close(shifted, torch.roll(out, 3, dims=3), atol=1e-4, rtol=1e-4)
    finally:
        handle.remove()


def _seam(a: np.ndarray) -> tuple[float, float]:
    """(the difference across the wrap: last column to first, last row to first; the median difference of
    adjacent interior columns and rows)."""
    a = a.astype(np.float32)
    wrap = (np.abs(a[:, 0] - a[:, -1]).mean() + np.abs(a[0] - a[-1]).mean()) / 2
    inner = (
        np.median(np.abs(np.diff(a, axis=1)).mean(axis=(0, 2)))
        + np.median(np.abs(np.diff(a, axis=0)).mean(axis=(1, 2)))
    ) / 2
    return float(wrap), float(inner)


def test_a_tiled_emoji_has_no_seam():
    from sdengine.pipeline import load_pipeline

    emoji = load_pipeline("emoji", device="cpu")
    for seed in (1, 2):
        kw = {"seed": seed, "steps": 6, "width": 64, "height": 64, "progress": False}
        plain = _seam(np.asarray(emoji("a green leaf pattern", **kw).images[0]))
        tiled = _seam(np.asarray(emoji("a green leaf pattern", tiling=True, **kw).images[0]))
        assert plain[0] > 1.8 * plain[1]  # the plain image's opposite edges do not meet
        assert tiled[0] < 1.5 * tiled[1]  # the tiled one's do, as any two neighbouring columns


def test_cli_tiling_and_seed_resize(tiny_sd1_folder, tmp_path):
    from sdengine.cli import main

    out = tmp_path / "o"
    args = ["generate", "a cat", "--model", str(tiny_sd1_folder), "--steps", "3", "--sampler", "euler"]
    args += ["--seed", "5", "--tiling", "--seed-resize-from", "48x80", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    made = out / "00000-5.png"
    text = Image.open(made).info["parameters"]
    assert "Seed resize from: 48x80" in text and "Tiling: True" in text
    again = tmp_path / "again"
    args = ["generate", "--from-png", str(made), "--model", str(tiny_sd1_folder), "--out", str(again)]
    assert main([*args, "--no-progress"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(again / "00000-5.png")))
    assert (
        main(["generate", "a cat", "--model", str(tiny_sd1_folder), "--seed-resize-from", "48", "--out", str(out)]) != 0
    )


def test_tiling_reaches_winograd_convolutions():
    """The CPU fast path's Winograd layers (sdengine.nn.winograd) ran their zero-padded transform whatever the
    layer's padding mode: with tiling on, the image was not seamless there."""
    from sdengine.nn.winograd import enable_winograd
    from sdengine.pipeline.core import circular_padding

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1))
    assert enable_winograd(model, min_channels=0) == 1
    conv = model[0]
    x = torch.randn(2, 8, 48, 48)
    want = F.conv2d(F.pad(x, (1, 1, 1, 1), "circular"), conv.weight, conv.bias)
    with torch.inference_mode(), circular_padding(model):
        torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)
    with torch.inference_mode():  # and zero padding again afterwards
        torch.testing.assert_close(model(x), F.conv2d(x, conv.weight, conv.bias, padding=1), atol=1e-4, rtol=1e-4)


def test_tiling_reaches_the_tiny_vae(tiny_sd1_folder):
    """vae_decode="tiny" with tiling: the tiny VAE's convolutions pad circularly too (A1111 leaves its TAESD
    out, so its decode has seams at the edges)."""
    import copy

    from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig
    from sdengine.pipeline import load_pipeline

    torch.manual_seed(0)
    tiny = TinyAutoencoder(TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), has_encoder=False))
    tiny.name = "dec"
    got_pipe = load_pipeline(str(tiny_sd1_folder), device="cpu")
    got_pipe.set_tiny_vae(copy.deepcopy(tiny))
    got = got_pipe("a cat", seed=3, tiling=True, vae_decode="tiny", **FAST)
    ref = load_pipeline(str(tiny_sd1_folder), device="cpu")
    ref.set_tiny_vae(copy.deepcopy(tiny))
    _explicit_circular(ref.unet, ref.vae, ref.tiny_vae)
    np.testing.assert_allclose(ref("a cat", seed=3, vae_decode="tiny", **FAST).arrays, got.arrays, atol=1e-5)


class _FrozenPadding:
    """A stand-in CUDA graph recorder that bakes in what a real recording bakes in here: each convolution's
    padding (a recorded kernel pads as it did when recorded, whatever ``padding_mode`` says later)."""

    def __init__(self, *modules: torch.nn.Module) -> None:
        self.convs = [m for module in modules for m in module.modules() if isinstance(m, torch.nn.Conv2d)]

    def __call__(self, fn, warmup):
        from _cpu_graphs import _copy_into

        recorded = [c.padding_mode for c in self.convs]
        out = fn()

        def replay() -> None:
            now = [c.padding_mode for c in self.convs]
            for c, mode in zip(self.convs, recorded, strict=True):
                c.padding_mode = mode
            try:
                _copy_into(out, fn())
            finally:
                for c, mode in zip(self.convs, now, strict=True):
                    c.padding_mode = mode

        return replay, out


def test_tiling_never_replays_a_graph_recorded_with_zero_padding(tiny_sd1_folder):
    """CUDA graphs with tiling: every network that tiling pads circularly (the U-Net, the VAE and the tiny VAE,
    whose decode and previews reach their graphs through cuda_graphs.through) runs as it is during a tiled call,
    since a graph recorded before replays its zero padding (seams). On the CPU, with a recorder that keeps the
    padding a network had when recorded, as a real graph does."""
    import copy

    from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig
    from sdengine.pipeline import load_pipeline

    torch.manual_seed(0)
    tiny = TinyAutoencoder(TinyVAEConfig(decoder_channels=(8, 8), decoder_blocks=(1, 1), has_encoder=False))
    tiny.name = "dec"
    ref = load_pipeline(str(tiny_sd1_folder), device="cpu")
    ref.set_tiny_vae(copy.deepcopy(tiny))
    pipe = load_pipeline(str(tiny_sd1_folder), device="cpu")
    pipe.set_tiny_vae(copy.deepcopy(tiny))
    pipe.enable_cuda_graphs(backend=_FrozenPadding(pipe.unet, pipe.vae, pipe.tiny_vae), device_type="cpu")
    graphs = pipe.cuda_graphs
    nets = ("unet", "vae", "tiny_vae")
    for decode in ("tiny", "full"):
        kw = {"seed": 3, "vae_decode": decode, **FAST}
        pipe("a cat", **kw, callback=lambda info: info.preview_array("tiny"))  # every graph recorded, zero padding
        counts = {k: (graphs[k].recordings, graphs[k].replays) for k in nets}
        got = pipe("a cat", tiling=True, **kw, callback=lambda info: info.preview_array("tiny"))
        assert {k: (graphs[k].recordings, graphs[k].replays) for k in nets} == counts
        np.testing.assert_array_equal(got.arrays, ref("a cat", tiling=True, **kw).arrays)
        # a plain call afterwards replays the zero-padded graphs again
        np.testing.assert_array_equal(pipe("a cat", **kw).arrays, ref("a cat", **kw).arrays)
        assert (
            graphs["tiny_vae" if decode == "tiny" else "vae"].replays
            > counts["tiny_vae" if decode == "tiny" else "vae"][1]
        )
