"""VAE files for the VAE-choice tests: the emoji model's VAE with other weights, in either key layout."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from sdengine.weights import keymaps as km
from sdengine.weights.detect import vae_layout_from_diffusers

EMOJI_VAE = Path(__file__).resolve().parent.parent / "src/sdengine/assets/models/emoji/vae"


def other_vae(seed: int) -> dict[str, torch.Tensor]:
    """The emoji model's VAE with other weights (each tensor moved by 5% of its spread), diffusers names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in load_file(EMOJI_VAE / "diffusion_pytorch_model.safetensors").items():
        if v.is_floating_point() and v.numel() > 1:
            v = v + 0.05 * v.std() * torch.randn(v.shape, generator=g)
        out[k] = v.contiguous()
    return out


def ldm_layout(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ldm, unknown = km.vae_diffusers_to_ldm(sd, vae_layout_from_diffusers(sd))
    assert not unknown
    return {k: v.contiguous() for k, v in ldm.items()}
