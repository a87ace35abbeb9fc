"""Live previews of Qwen-Image and FLUX.2: each family's latent -> RGB map (ComfyUI's Wan21 and Flux2 factors) on
tiny random pipelines, checked against ComfyUI's formula computed here by hand in ComfyUI's own latent space.

ComfyUI's Latent2RGBPreviewer applies ``latent_rgb_factors`` (one row per channel) and ``latent_rgb_factors_bias``
to the sampler's x0 in the model's space: the VAE latent after the latent format's ``process_in``. For Qwen-Image
(ComfyUI's Wan21 format) that is ``(z - latents_mean) / latents_std``; for FLUX.2 (ComfyUI's Flux2 format, identity
``process_in``) the VAE's own output, which ComfyUI's FLUX.2 VAE gives as 2x2 patches normalised by its batch-norm
statistics, and whose previewer lays the 128 channels out as 32 at twice the size (``latent_rgb_factors_reshape``)
before the factors. The tests below go from sdengine's sampling latent to the raw VAE latent (the VAE's
``unscale_latents``), rebuild ComfyUI's x0 from it with ComfyUI's constants, apply the factors by hand and compare
with sdengine's preview.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from sdengine import vae_utils  # noqa: E402

# ComfyUI's Wan21 latent format (comfy/latent_formats.py): latents_mean, latents_std, scale_factor 1.0
WAN21_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip
COMFY_BN_EPS = 1e-4  # ComfyUI's AutoencoderKL with batch_norm_latent: bn_eps
# a tiny klein with FLUX.2's 32 VAE channels (128 in 2x2 patches: the map's count; tests/_flux2_models.py has 4)
KLEIN_32 = dict(distilled=True, vae={"latent_channels": 32}, transformer={"in_channels": 128})


def _by_hand(x: torch.Tensor, m: vae_utils.LatentRGBMap) -> np.ndarray:
    """ComfyUI's Latent2RGBPreviewer on (B, C, h, w) already laid out per factor row: ``linear(x, factors.T,
    bias)`` per pixel, then ``preview_to_image``'s (x + 1) / 2 to 0..255 (rounded, as sdengine's uint8)."""
    f = torch.tensor(m.factors, dtype=torch.float64)
    rgb = torch.einsum("bchw,cr->bhwr", x.double(), f) + torch.tensor(m.bias, dtype=torch.float64)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()


def _close_uint8(got: np.ndarray, want: np.ndarray) -> None:
    """Equal but for float rounding at a level's edge: at most one level apart, almost every value equal."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.98, (diff.max(), (diff == 0).mean())


def _steps(pipe, **kw):
    """Each step's (preview_array, denoised) of a 2-step run."""
    seen = []

    def cb(info):
        seen.append((info.preview_array(), info.denoised.detach().clone()))

    pipe("a red apple", steps=2, seed=3, width=32, height=32, callback=cb, progress=False, **kw)
    return seen


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from _qwen_models import make_qwen_folder

    folder = make_qwen_folder(tmp_path_factory.mktemp("qwenprev") / "tiny-qwen")
    return sdengine.load_pipeline(folder, device="cpu")


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    from _flux2_models import make_klein_folder

    folder = make_klein_folder(tmp_path_factory.mktemp("kleinprev") / "tiny-klein", **KLEIN_32)
    return sdengine.load_pipeline(folder, device="cpu")


def test_maps_hold_comfyuis_numbers_with_each_familys_shape():
    """Qwen-Image: ComfyUI's Wan21 rows, 16 channels read as they are; FLUX.2: ComfyUI's Flux2 rows (32, one per VAE
    channel), read from 128 channels in 2x2 patches. Spot checks against comfy/latent_formats.py."""
    q, f2 = vae_utils.QWEN_IMAGE_LATENT_RGB, vae_utils.FLUX2_LATENT_RGB
    assert (len(q.factors), q.patch, q.channels) == (16, 1, 16)
    assert (len(f2.factors), f2.patch, f2.channels) == (32, 2, 128)
    assert f2.factors[0] == (0.0058, 0.0113, 0.0073) and f2.factors[3] == (0.2144, 0.3009, 0.3652)
    assert f2.factors[8] == (-0.3527, -0.2712, -0.1666) and f2.factors[31] == (-0.0111, -0.0460, -0.0614)
    assert f2.bias == (-0.0329, -0.0718, -0.0851)
    assert vae_utils.LATENT_RGB_MAPS["flux2"] is f2 and vae_utils.LATENT_RGB_MAPS["qwen_image"] is q
    # the preview of a (B, 128, h, w) latent is (B, 2h, 2w, 3); a 128-channel latent with another map is grey
    z = torch.randn(2, 128, 3, 5, generator=torch.Generator().manual_seed(1))
    assert vae_utils.latent_rgb(z, f2).shape == (2, 6, 10, 3)
    grey = vae_utils.latent_rgb(z, vae_utils.FLUX_LATENT_RGB)
    assert grey.shape == (2, 3, 5, 3) and torch.equal(grey[..., 0], grey[..., 2])


def test_each_pipeline_names_its_familys_map():
    """Qwen-Image and its Edit pipelines: the Wan21 map; FLUX.2 (klein and dev, one class): the Flux2 map; Z-Image
    keeps FLUX.1's (its VAE is FLUX.1's: ComfyUI's ZImage model takes the Flux latent format)."""
    from sdengine.pipeline.flux2 import Flux2Pipeline
    from sdengine.pipeline.qwen_image import QwenImagePipeline
    from sdengine.pipeline.qwen_image_edit import QwenImageEditPipeline, QwenImageEditPlusPipeline
    from sdengine.pipeline.z_image import ZImagePipeline

    for cls in (QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline):
        assert cls.latent_rgb_map.fget(None) is vae_utils.QWEN_IMAGE_LATENT_RGB  # type: ignore[attr-defined]
    assert Flux2Pipeline.latent_rgb_map.fget(None) is vae_utils.FLUX2_LATENT_RGB  # type: ignore[attr-defined]
    assert ZImagePipeline.latent_rgb_map.fget(None) is vae_utils.FLUX_LATENT_RGB  # type: ignore[attr-defined]


def test_qwen_preview_is_comfyuis_wan21_formula_in_its_space(qwen):
    """Each step's preview of a tiny Qwen-Image run: ComfyUI's Wan21 factors on ComfyUI's x0, rebuilt from the raw
    VAE latent by ComfyUI's process_in ``(z - mean) * 1.0 / std`` with its own constants."""
    assert qwen.latent_rgb_map is vae_utils.QWEN_IMAGE_LATENT_RGB
    assert tuple(qwen.vae.config.latents_mean) == WAN21_MEAN and tuple(qwen.vae.config.latents_std) == WAN21_STD
    seen = _steps(qwen)
    assert len(seen) == 2
    mean = torch.tensor(WAN21_MEAN, dtype=torch.float64).view(1, 16, 1, 1)
    std = torch.tensor(WAN21_STD, dtype=torch.float64).view(1, 16, 1, 1)
    for preview, denoised in seen:
        f = qwen.vae_scale_factor
        assert preview.shape == (1, 32 // f, 32 // f, 3)
        raw = qwen.vae.unscale_latents(denoised.float()).double()  # what the VAE decodes
        x0 = (raw - mean) * 1.0 / std  # ComfyUI's Wan21 process_in
        _close_uint8(preview, _by_hand(x0, vae_utils.QWEN_IMAGE_LATENT_RGB))
        # not the raw latent's picture, and not grey
        assert not np.array_equal(preview, _by_hand(raw, vae_utils.QWEN_IMAGE_LATENT_RGB))
        assert not np.array_equal(preview[..., 0], preview[..., 1])


def test_flux2_preview_is_comfyuis_flux2_formula_in_its_space(klein):
    """Each step's preview of a tiny FLUX.2 [klein] run: ComfyUI's Flux2 factors on ComfyUI's x0, rebuilt here from
    the raw VAE latent (B, 32, H/8, W/8) as ComfyUI's FLUX.2 VAE gives it (pixel (2i + dy, 2j + dx) of channel c
    into channel 4c + 2dy + dx, each of the 128 normalised by the VAE's batch-norm running mean and variance, eps
    1e-4), then laid out again by ComfyUI's latent_rgb_factors_reshape, written here by slices."""
    m = vae_utils.FLUX2_LATENT_RGB
    assert klein.latent_rgb_map is m
    bn = klein.vae.bn
    mean = bn.running_mean.double().view(1, 128, 1, 1)
    std = torch.sqrt(bn.running_var.double().view(1, 128, 1, 1) + COMFY_BN_EPS)
    assert float(bn.running_mean.abs().max()) > 0.1  # the tiny VAE's statistics are not the identity
    seen = _steps(klein)
    assert len(seen) == 2
    for preview, denoised in seen:
        b, c4, h, w = denoised.shape
        assert c4 == 128 and preview.shape == (b, 2 * h, 2 * w, 3)
        raw = klein.vae.unscale_latents(denoised.float()).double()  # (B, 32, 2h, 2w): what the VAE decodes
        packed = torch.empty(b, 128, h, w, dtype=torch.float64)
        for dy in (0, 1):
            for dx in (0, 1):
                packed[:, 2 * dy + dx :: 4] = raw[:, :, dy::2, dx::2]
        x0 = (packed - mean) / std  # ComfyUI's VAE encode output = its sampler's space (process_in: identity)
        shown = torch.empty(b, 32, 2 * h, 2 * w, dtype=torch.float64)  # latent_rgb_factors_reshape
        for dy in (0, 1):
            for dx in (0, 1):
                shown[:, :, dy::2, dx::2] = x0[:, 2 * dy + dx :: 4]
        _close_uint8(preview, _by_hand(shown, m))
        assert not np.array_equal(preview, _by_hand(raw, m))  # not the raw latent's picture
        assert not np.array_equal(preview[..., 0], preview[..., 1])  # colour, not grey


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("fastapi")
    import httpx

    from _flux2_models import make_klein_folder
    from _live_server import live_server, server_config
    from _qwen_models import make_qwen_folder

    root = tmp_path_factory.mktemp("servedprev")
    models = root / "models"
    make_qwen_folder(models / "tiny-qwen")
    make_klein_folder(models / "tiny-klein", **KLEIN_32)
    pipes = {name: sdengine.load_pipeline(models / name, device="cpu") for name in ("tiny-qwen", "tiny-klein")}
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipes


@pytest.mark.parametrize("model", ["tiny-qwen", "tiny-klein"])
def test_server_live_previews_are_the_familys_colours(served, model):
    """A native job on a tiny Qwen-Image / FLUX.2 model: its live preview (GET /v1/jobs/{id}/preview, the last
    step's, decoded when asked; the same frames the event stream and the web page show) is the Python pipeline's
    step preview with the family's map, in colour, no longer the grey channel mean; and the server's latent map
    for the model is the family's."""
    import io

    from PIL import Image

    from _live_server import run_job

    server, client, pipes = served
    pipe = pipes[model]
    body = {"model": model, "prompt": "a red apple", "negative_prompt": "", "steps": 2, "width": 32, "height": 32}
    _, job = run_job(client, {**body, "seed": 7})
    r = client.get(f"/v1/jobs/{job['id']}/preview")
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
    frames = []
    kw = {**pipe.family_defaults, "steps": 2}
    pipe("a red apple", "", **kw, seed=7, width=32, height=32, progress=False, callback=frames.append)
    last = frames[-1]
    np.testing.assert_array_equal(got, last.preview_array()[0])
    grey = vae_utils.latent_rgb(last.denoised)[0].numpy()
    assert got.shape != grey.shape or not np.array_equal(got, grey)
    assert not np.array_equal(got[..., 0], got[..., 1])  # colour
    z = last.denoised.float()
    assert torch.equal(server.services.manager.preview_rgb(pipe)(z), vae_utils.latent_rgb(z, pipe.latent_rgb_map))
