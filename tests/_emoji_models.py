"""A tiny random-weight model in the emoji model's folder format, for fast tests (no training)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from sdengine.models.unet import UNet
from sdengine.models.vae import AutoencoderKL
from sdengine.train.emoji import EMOJI_UNET, EMOJI_VAE, export_folder

# 16x16 images, 2x VAE (8x8x4 latents), the real 384-wide MiniLM context.
TINY_EMOJI_VAE = dataclasses.replace(
    EMOJI_VAE, block_out_channels=(16, 32), norm_num_groups=8, sample_size=16, scaling_factor=0.5
)
TINY_EMOJI_UNET = dataclasses.replace(
    EMOJI_UNET,
    sample_size=8,
    block_out_channels=(32, 64),
    attention=("cross", "cross"),
    num_heads=(2, 2),
    norm_num_groups=8,
)


def make_tiny_emoji_folder(dst: str | Path, seed: int = 0) -> Path:
    """Write a random-weight emoji-format folder (fp16 weights, the MiniLM text encoder by reference)."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(TINY_EMOJI_VAE).eval()
    unet = UNet(TINY_EMOJI_UNET).eval()
    return export_folder(vae, unet, Path(dst), extra={"tiny": True})
