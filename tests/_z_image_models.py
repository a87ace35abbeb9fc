"""Random tiny Z-Image models saved in the real layouts, for parity tests of sdengine's Z-Image transformer and
pipeline against diffusers' ``ZImageTransformer2DModel`` / ``ZImagePipeline`` / ``ZImageImg2ImgPipeline``.

The transformer is Z-Image's at a fraction of the width: 64 wide (two 32-wide heads, RoPE axes 8 + 12 + 12), two
main layers and two refiner layers of each kind, 16 latent channels, a 48-wide caption input. The VAE is the tiny
FLUX.1-style one of ``_flux_models`` (16 channels, Flux's scaling and shift, 2x).
"""

from __future__ import annotations

import logging

import torch

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

Z_TRANSFORMER = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=48,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 64, 64],
)
# Tongyi-MAI/Z-Image-Turbo's scheduler/scheduler_config.json
Z_SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights that are not the zero-initialised ones (pad tokens, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def z_transformer(seed: int = 0, **overrides):
    """A tiny random diffusers ``ZImageTransformer2DModel`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.ZImageTransformer2DModel(**{**Z_TRANSFORMER, **overrides})
    return perturb(model, seed + 1).eval()
