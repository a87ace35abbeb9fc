"""Parity of sdengine's U-Net with diffusers' UNet2DModel / UNet2DConditionModel on random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.models.unet import FASHION_MNIST, TINY_PIXEL, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def _pair(cfg: UNetConfig, seed: int = 0):
    """A diffusers model with random weights and ours with the same weights (strict load)."""
    dcfg = cfg.to_diffusers()
    cls = getattr(diffusers, dcfg.pop("_class_name"))
    torch.manual_seed(seed)
    ref = cls(**dcfg).eval()
    # Random init leaves some layers at zero/one; perturb every tensor so each one matters.
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "cfg",
    [
        TINY_PIXEL,
        dataclasses.replace(TINY_PIXEL, num_class_embeds=5),
        dataclasses.replace(TINY_PIXEL, attention=("none", "none"), mid_attention="none"),
        dataclasses.replace(TINY_PIXEL, mid_block=False, attention=("self", "self"), num_heads=(2, 4)),
        dataclasses.replace(TINY_PIXEL, resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8),
        dataclasses.replace(
            TINY_PIXEL,
            block_out_channels=(32, 32, 64),
            attention=("self", "none", "self"),
            num_heads=(4, 4, 8),
            downsample_padding=0,
            freq_shift=1,
            flip_sin_to_cos=False,
        ),
    ],
    ids=["attn", "class", "no_attn", "no_mid", "scale_shift", "three_levels"],
)
def test_unet2d_parity(cfg: UNetConfig) -> None:
    ref, ours = _pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, 16, 16, generator=g)
    t = torch.tensor([3, 750])
    labels = torch.tensor([1, 4]) if cfg.num_class_embeds else None
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
    assert got.shape == want.shape
    assert _max_err(got, want) < TOL


def test_fashion_mnist_preset_parity_and_conditioning() -> None:
    cfg = FASHION_MNIST
    n_params = sum(p.numel() for p in UNet(cfg).parameters())
    assert n_params <= 4_000_000, n_params
    ref, ours = _pair(cfg)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 32, 32, generator=g)
    t = torch.tensor([10.0, 500.5])  # float (fractional) timesteps as samplers pass them
    labels = torch.tensor([0, 9])
    with torch.no_grad():
        want = ref(x, t, class_labels=labels).sample
        got = ours(x, t, class_labels=labels)
        assert _max_err(got, want) < TOL
        # The prediction must depend on the timestep and on the class label.
        other_t = ours(x, torch.tensor([11.0, 500.5]), class_labels=labels)
        other_y = ours(x, t, class_labels=torch.tensor([3, 9]))
    assert _max_err(other_t[0], got[0]) > 1e-3 and _max_err(other_t[1], got[1]) == 0
    assert _max_err(other_y[0], got[0]) > 1e-3 and _max_err(other_y[1], got[1]) == 0


def test_scalar_and_long_timesteps() -> None:
    ours = UNet(TINY_PIXEL).eval()
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        a = ours(x, 250)
        b = ours(x, torch.tensor(250))
        c = ours(x, torch.full((3,), 250.0))
    assert torch.equal(a, b) and _max_err(a, c) < 1e-6


def test_missing_or_unexpected_class_labels() -> None:
    cond = UNet(dataclasses.replace(TINY_PIXEL, num_class_embeds=3))
    with pytest.raises(ValueError, match="class_labels"):
        cond(torch.randn(1, 3, 16, 16), 1)
    with pytest.raises(ValueError, match="class_labels"):
        UNet(TINY_PIXEL)(torch.randn(1, 3, 16, 16), 1, class_labels=torch.tensor([0]))


def test_from_diffusers_pixel_config_round_trip() -> None:
    for cfg in (TINY_PIXEL, FASHION_MNIST):
        assert UNetConfig.from_diffusers(cfg.to_diffusers()) == dataclasses.replace(cfg)
    # A real DDPM config (google/ddpm-cifar10-32), written the way its config.json is.
    ddpm_cifar = {
        "_class_name": "UNet2DModel",
        "act_fn": "silu",
        "attention_head_dim": None,
        "block_out_channels": [128, 256, 256, 256],
        "center_input_sample": False,
        "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        "downsample_padding": 0,
        "flip_sin_to_cos": False,
        "freq_shift": 1,
        "in_channels": 3,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-06,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 32,
        "time_embedding_type": "positional",
        "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    }
    cfg = UNetConfig.from_diffusers(ddpm_cifar)
    assert cfg.attention == ("none", "self", "none", "none") and cfg.num_heads == (1, 1, 1, 1)
    assert cfg.downsample_padding == 0 and not cfg.flip_sin_to_cos and cfg.freq_shift == 1


def test_from_diffusers_rejects_unsupported_options_by_name() -> None:
    bad = {**TINY_PIXEL.to_diffusers(), "time_embedding_type": "fourier", "class_embed_type": "timestep"}
    with pytest.raises(ValueError, match="time_embedding_type='fourier'.*class_embed_type='timestep'"):
        UNetConfig.from_diffusers(bad)
    with pytest.raises(ValueError, match="unknown U-Net config options: frobnicate"):
        UNetConfig.from_diffusers({**TINY_PIXEL.to_diffusers(), "frobnicate": 1})


def test_training_gradients_match_diffusers() -> None:
    cfg = dataclasses.replace(TINY_PIXEL, num_class_embeds=3)
    ref, ours = _pair(cfg)
    ref.train()
    ours.train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 16, generator=g)
    target = torch.randn(2, 3, 16, 16, generator=g)
    t, y = torch.tensor([5, 600]), torch.tensor([2, 0])
    torch.nn.functional.mse_loss(ref(x, t, class_labels=y).sample, target).backward()
    torch.nn.functional.mse_loss(ours(x, t, class_labels=y), target).backward()
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert _max_err(p.grad, ref_grads[name]) < 1e-5, name
