"""Timestep embeddings: sinusoidal features (Vaswani et al. 2017; Ho et al. 2020) and their MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def timestep_embedding(
    t: Tensor,
    dim: int,
    *,
    flip_sin_to_cos: bool = True,
    freq_shift: float = 0.0,
    max_period: float = 10000.0,
) -> Tensor:
    """Sinusoidal features of (fractional) timesteps: (B,) -> (B, dim), always float32.

    Frequencies are ``max_period ** (-i / (dim/2 - freq_shift))``; ``flip_sin_to_cos`` puts the cosines
    first (what SD and most DDPM checkpoints were trained with).
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period))
    freqs = torch.exp(exponent / (half - freq_shift))  # (half,)
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    first, second = (torch.cos(args), torch.sin(args)) if flip_sin_to_cos else (torch.sin(args), torch.cos(args))
    emb = torch.cat([first, second], dim=-1)  # (B, 2*half)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear on the sinusoidal features (names ``linear_1``, ``linear_2``); ``bias=False``:
    without biases (FLUX.2's, diffusers' ``sample_proj_bias=False``)."""

    def __init__(self, in_channels: int, embed_dim: int, *, bias: bool = True) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, embed_dim, bias=bias)
        self.linear_2 = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # (B, embed_dim)
