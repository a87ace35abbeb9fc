"""Convolutional building blocks: the residual block with a timestep input, down- and up-sampling.

Names follow diffusers (``norm1``, ``conv1``, ``time_emb_proj``, ``norm2``, ``conv2``, ``conv_shortcut``).
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

TimeEmbeddingNorm = Literal["default", "scale_shift"]


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the timestep embedding injected in between (Ho et al. 2020).

    ``time_embedding_norm="default"`` adds the projected embedding before the second norm;
    ``"scale_shift"`` modulates after it (Dhariwal & Nichol 2021, AdaGN). ``temb_channels=None`` makes a
    block without a timestep input (the VAE's).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        dropout: float = 0.0,
        time_embedding_norm: TimeEmbeddingNorm = "default",
        output_scale_factor: float = 1.0,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.time_embedding_norm = time_embedding_norm
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj: nn.Linear | None = None
        if temb_channels is not None:
            mult = 2 if time_embedding_norm == "scale_shift" else 1
            self.time_emb_proj = nn.Linear(temb_channels, mult * out_channels)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        # x: (B, Cin, H, W); temb: (B, T) before its activation, or None
        h = self.conv1(F.silu(self.norm1(x)))  # (B, Cout, H, W)
        t = None
        if self.time_emb_proj is not None and temb is not None:
            t = self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, Cout or 2*Cout, 1, 1)
        # In-place adds below are safe for autograd: convolution backward needs the conv's input and
        # weight, never its output, so the output buffer can be reused (one allocation less each).
        if self.time_embedding_norm == "scale_shift":
            if t is None:
                raise ValueError("a scale_shift ResnetBlock2D needs a timestep embedding")
            scale, shift = t.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h if t is None else h.add_(t))
        h = self.conv2(self.dropout(F.silu(h)))  # (B, Cout, H, W)
        h = h.add_(x if self.conv_shortcut is None else self.conv_shortcut(x))
        if self.output_scale_factor != 1.0:
            h = h.div_(self.output_scale_factor)
        return h


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution. ``padding=0`` pads right/bottom only, as the LDM VAE does."""

    def __init__(self, channels: int, out_channels: int | None = None, *, padding: int = 1) -> None:
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling (or to ``size``, for odd skip sizes) followed by a 3x3 convolution."""

    def __init__(self, channels: int, out_channels: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)  # (B, C, 2H, 2W)
