"""Parity of sdengine's AutoencoderKL with diffusers' on random weights; posterior sampling and seeds."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.models.vae import MEDIUM, SD, TINY, AutoencoderKL, DiagonalGaussian, VAEConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def _pair(cfg: VAEConfig, seed: int = 0):
    dcfg = cfg.to_diffusers()
    dcfg.pop("_class_name")
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKL(**dcfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = AutoencoderKL(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "cfg",
    [TINY, dataclasses.replace(TINY, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=False)],
    ids=["tiny", "no_quant_no_attn"],
)
def test_encode_decode_parity(cfg: VAEConfig) -> None:
    ref, ours = _pair(cfg)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x).latent_dist
        got = ours.encode(x)
        assert _err(got.mean, want.mean) < TOL
        assert _err(got.logvar, want.logvar) < TOL
        # the same generator must give the same posterior sample (img2img seeds)
        zs_want = want.sample(torch.Generator().manual_seed(42))
        zs_got = got.sample(torch.Generator().manual_seed(42))
        assert _err(zs_got, zs_want) < TOL
        gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
        gens2 = [torch.Generator().manual_seed(s) for s in (7, 8)]
        assert _err(got.sample(gens), want.sample(gens2)) < TOL
        z = torch.randn(2, cfg.latent_channels, 16, 16, generator=torch.Generator().manual_seed(3))
        assert _err(ours.decode(z), ref.decode(z).sample) < TOL
        assert _err(ours(x), ref(x).sample) < TOL


def test_per_sample_generators_match_batch_of_one() -> None:
    moments = torch.randn(3, 8, 4, 4)
    post = DiagonalGaussian(moments)
    batch = post.sample([torch.Generator().manual_seed(10 + i) for i in range(3)])
    for i in range(3):
        single = DiagonalGaussian(moments[i : i + 1]).sample(torch.Generator().manual_seed(10 + i))
        assert torch.equal(batch[i : i + 1], single)
    assert post.kl().shape == (3,)


def test_scaling_round_trip_and_config() -> None:
    vae = AutoencoderKL(TINY)
    z = torch.randn(1, 4, 8, 8)
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)
    assert torch.allclose(vae.scale_latents(z), z * 0.18215)
    assert TINY.downscale_factor == 2 and SD.downscale_factor == 8
    for cfg in (SD, MEDIUM, TINY):
        assert VAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # stabilityai/sd-vae-ft-mse / the SD1.5 vae config.json
    sd_vae = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.4.2",
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 512,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert VAEConfig.from_diffusers(sd_vae) == SD
    with pytest.raises(ValueError, match="unknown options foo"):
        VAEConfig.from_diffusers({**sd_vae, "latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "foo": 1})
    # Playground v2.5's per-channel statistics (docs/edm.md): both or neither, one finite number per channel
    with pytest.raises(ValueError, match="latents_mean without its partner"):
        VAEConfig.from_diffusers({**sd_vae, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="latents_std must be 4 finite numbers above 0"):
        VAEConfig.from_diffusers({**sd_vae, "latents_mean": [0.0] * 4, "latents_std": [1.0, 1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="latents_mean must be 4 finite numbers"):
        VAEConfig.from_diffusers({**sd_vae, "latents_mean": [0.0] * 3, "latents_std": [1.0] * 4})
    stats = {"latents_mean": [-1.0, 2.0, 0.5, 0.0], "latents_std": [8.0, 6.0, 6.5, 5.0], "scaling_factor": 0.5}
    cfg = VAEConfig.from_diffusers({**sd_vae, **stats})
    assert {k: cfg.to_diffusers()[k] for k in stats} == stats
    assert "latents_mean" not in SD.to_diffusers()
    with torch.device("meta"):
        vae = AutoencoderKL(cfg)
    z = torch.randn(2, 4, 3, 3)
    mean, std = (
        torch.tensor(stats["latents_mean"]).view(1, 4, 1, 1),
        torch.tensor(stats["latents_std"]).view(1, 4, 1, 1),
    )
    assert torch.allclose(vae.scale_latents(z), (z - mean) * 0.5 / std)  # diffusers' SDXL pipelines' rule
    assert torch.allclose(vae.unscale_latents(vae.scale_latents(z)), z, atol=1e-6)


def test_meta_build_of_sd_vae() -> None:
    with torch.device("meta"):
        vae = AutoencoderKL(SD)
    n = sum(p.numel() for p in vae.parameters())
    assert 83e6 < n < 84e6, n


@pytest.mark.slow
def test_medium_vae_parity() -> None:
    ref, ours = _pair(MEDIUM)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        assert _err(got.mean, want.mean) < TOL and _err(got.logvar, want.logvar) < TOL
        z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        assert _err(ours.decode(z), ref.decode(z).sample) < TOL


@pytest.mark.slow
def test_full_size_sd_vae_parity() -> None:
    ref, ours = _pair(SD)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
        assert _err(got.mean, want.mean) < TOL and _err(got.logvar, want.logvar) < TOL
        z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
        assert _err(ours.decode(z), ref.decode(z).sample) < TOL
