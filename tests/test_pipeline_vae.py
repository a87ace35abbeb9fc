"""VAE around the pipeline: tiled encode/decode against the untiled result (and against diffusers' own tiling),
the fp16 NaN fallback, and the cheap latent preview."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdengine import vae_utils as vu
from sdengine.models.vae import TINY, AutoencoderKL

# Stated tolerance of tiled decoding: each tile normalises (GroupNorm) and attends on its own, so tiles are not
# bit-equal to one decode. On this random tiny VAE, tiles of 16 latents overlapping by 4 give a mean absolute
# difference of ~0.03 on 0..1 pixels (~0.04 for the posterior mean); diffusers' `enable_tiling` on the same
# weights and tile size does no better. On SD's trained VAE with the default 64-latent tiles the seams are
# far smaller; the bound here is what the tests can promise for any weights.
TILED_DECODE_TOL = 0.06
TILED_ENCODE_TOL = 0.08


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    m = AutoencoderKL(TINY).eval().requires_grad_(False)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def _smooth_latent(h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.interpolate(torch.randn(1, 4, h // 4, w // 4, generator=g), size=(h, w), mode="bicubic")


def test_tiles_cover_and_blend():
    assert vu.tile_starts(10, 16, 4) == [0]
    assert vu.tile_starts(40, 16, 4) == [0, 12, 24]
    w = vu.blend_ramp(16, 4, True, False, torch.device("cpu"))
    assert w[0] < w[3] < 1 and bool((w[4:] == 1).all())


@torch.no_grad()
def test_tiled_decode_is_untiled_when_it_fits(vae):
    z = _smooth_latent(16, 16)
    a, _ = vu.decode(vae, z, tiled=False)
    b, _ = vu.decode(vae, z, tiled=True, tile=16, overlap=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


@torch.no_grad()
def test_tiled_decode_within_the_stated_tolerance(vae):
    z = _smooth_latent(40, 48)
    full, _ = vu.decode(vae, z, tiled=False)
    tiled, _ = vu.decode(vae, z, tiled=True, tile=16, overlap=4)
    assert tiled.shape == full.shape == (1, 3, 80, 96)
    err = (vu.to_unit(full) - vu.to_unit(tiled)).abs().mean().item()
    assert err < TILED_DECODE_TOL, err


@torch.no_grad()
def test_tiled_decode_no_worse_than_diffusers_tiling(vae):
    diffusers = pytest.importorskip("diffusers")
    cfg = TINY.to_diffusers()
    cfg.pop("_class_name")
    ref = diffusers.AutoencoderKL(**cfg).eval()
    ref.load_state_dict(vae.state_dict())
    z = _smooth_latent(40, 48)
    full = vu.to_unit(vu.decode(vae, z, tiled=False)[0])
    ours = vu.to_unit(vu.decode(vae, z, tiled=True, tile=16, overlap=4)[0])
    ref.enable_tiling()  # tiles of sample_size (32 px = 16 latents), 25% overlap
    theirs = vu.to_unit(ref.decode(vae.unscale_latents(z)).sample)
    e_ours, e_theirs = (full - ours).abs().mean().item(), (full - theirs).abs().mean().item()
    assert e_ours <= 1.25 * e_theirs, (e_ours, e_theirs)


@torch.no_grad()
def test_tiled_encode_within_the_stated_tolerance(vae):
    img = vu.decode(vae, _smooth_latent(40, 48), tiled=False)[0].clamp(-1, 1)
    full = vu.encode_moments(vae, img, tiled=False)
    tiled = vu.encode_moments(vae, img, tiled=True, tile=16, overlap=4)
    assert tiled.mean.shape == full.mean.shape
    assert (full.mean - tiled.mean).abs().mean().item() < TILED_ENCODE_TOL
    # the posterior sample draws the same numbers: with the same generator it differs only by the moments
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    a = vu.encode(vae, img, [g1], tiled=False)
    b = vu.encode(vae, img, [g2], tiled=True)  # default tiles are bigger than this image: untiled
    torch.testing.assert_close(a, b)


@torch.no_grad()
def test_fp16_nan_decode_is_redone_in_fp32_with_a_warning(vae):
    half = AutoencoderKL(TINY).eval().requires_grad_(False)
    half.load_state_dict(vae.state_dict())
    # Make the decoder's first conv overflow float16 (> 65504) while float32 copes: GroupNorm follows it.
    half.decoder.conv_in.weight.mul_(3e4)
    half = half.half()
    z = _smooth_latent(8, 8)
    with pytest.warns(RuntimeWarning, match="NaN/inf values; decoding again in float32"):
        img, upcast = vu.decode(half, z)
    assert upcast and bool(torch.isfinite(img).all())
    assert next(half.parameters()).dtype == torch.float16  # given back in half precision
    ref = AutoencoderKL(TINY).eval()
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
    torch.testing.assert_close(img, ref.decode(ref.unscale_latents(z)), rtol=1e-4, atol=1e-4)
    img2, upcast2 = vu.decode(half, z, upcast=True)  # later images go straight to float32
    assert upcast2
    torch.testing.assert_close(img2, img)


def test_latent_preview():
    z = torch.zeros(2, 4, 5, 7)
    p = vu.latent_preview(z)
    assert p.shape == (2, 5, 7, 3) and p.dtype.name == "uint8"
    assert int(p[0, 0, 0, 0]) == 128  # zero latent -> mid grey
    assert vu.latent_preview(torch.zeros(1, 3, 2, 2)).shape == (1, 2, 2, 3)


def test_latent_previewer_on_the_cpu_gives_each_frame_once_and_the_newest():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 4, 5, 7, generator=g), torch.randn(2, 4, 5, 7, generator=g)
    pv = vu.LatentPreviewer()
    assert pv.take() is None
    pv.submit(a, 3)
    tag, frame = pv.take()
    assert tag == 3 and np.array_equal(frame, vu.latent_preview(a))
    assert pv.take() is None  # handed out once
    pv.submit(a, 4)
    pv.submit(b, 6)  # a newer submission replaces one not yet taken
    tag, frame = pv.take(wait=True)
    assert tag == 6 and np.array_equal(frame, vu.latent_preview(b))
    assert np.array_equal(vu.latent_rgb(b).numpy(), vu.latent_preview(b))  # same pixels where computed


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_latent_previewer_on_a_gpu_matches_the_cpu_preview():  # pragma: no cover - CI has no GPU
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    pv = vu.LatentPreviewer()
    pv.submit(z.cuda(), 1)
    tag, frame = pv.take(wait=True)
    assert tag == 1 and np.abs(frame.astype(int) - vu.latent_preview(z).astype(int)).max() <= 1
