"""The transformer used inside Stable Diffusion's U-Net (Rombach et al. 2022, "SpatialTransformer").

Names follow diffusers' ``Transformer2DModel`` / ``BasicTransformerBlock`` / ``FeedForward`` / ``GEGLU``.

:func:`middle_attention_mass` reads the self-attention map of a U-Net's middle block (its first transformer block's
``attn1``, as diffusers' StableDiffusionSAGPipeline and ComfyUI's SelfAttentionGuidance read it) for
self-attention guidance.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.nn.attention import Attention, AttentionMass


class GEGLU(nn.Module):
    """x -> a * GELU(b) where [a, b] = Linear(x) (Shazeer 2020); names ``proj``.

    The projection is already one matrix product (``proj``, width ``2 * dim_out``: nothing to fuse). Without
    autograd the product with ``a`` is written into GELU's output, one (B, L, dim_out) tensor less per call: the
    same numbers (a product is a product, in either order), 1.2-1.4x faster for this step at SD 1.5's shapes on
    the CPU (``benchmarks/fused_qkv.py --layers``: a fresh large tensor there costs its page faults); on a GPU the
    caching allocator makes the allocation free, and ``torch.compile`` fuses the two either way."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)

    def forward(self, x: Tensor) -> Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        if torch.is_grad_enabled() and a.requires_grad:
            return a * F.gelu(gate)
        return F.gelu(gate).mul_(a)


class FeedForward(nn.Module):
    """GEGLU -> dropout -> Linear, inner width ``mult * dim`` (keys ``net.0.proj``, ``net.2``)."""

    def __init__(self, dim: int, *, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text states, GEGLU feed-forward."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        cross_attention_dim: int | None,
        dropout: float = 0.0,
        upcast_attention: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, dropout=dropout, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(
            dim, heads, head_dim, cross_attention_dim=cross_attention_dim, dropout=dropout, upcast=upcast_attention
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        # x: (B, L, C); context: (B, S, D). Without context attn2 attends to x itself, as diffusers does.
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        x = x + self.ff(self.norm3(x))
        return x  # (B, L, C)


class SpatialTransformer(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over the H*W tokens -> proj_out, plus a residual.

    SD1 projects with 1x1 convolutions, SD2 with linear layers (``use_linear_projection``); the two are the
    same map but store weights of different shapes, so the checkpoint decides.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        *,
        cross_attention_dim: int | None,
        num_layers: int = 1,
        norm_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        head_dim = channels // heads
        inner = heads * head_dim
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in: nn.Module
        self.proj_out: nn.Module
        if use_linear_projection:
            self.proj_in = nn.Linear(channels, inner)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                heads,
                head_dim,
                cross_attention_dim=cross_attention_dim,
                dropout=dropout,
                upcast_attention=upcast_attention,
            )
            for _ in range(num_layers)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear_projection else nn.Conv2d(inner, channels, 1)
        # self-attention guidance: told the feature map's size when its first block's attn1 records (see below)
        self.map_probe: AttentionMass | None = None

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        if self.map_probe is not None:
            self.map_probe.size = (H, W)
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(h.permute(0, 2, 3, 1).reshape(B, H * W, C))  # (B, HW, inner)
        else:
            h = self.proj_in(h)  # (B, inner, H, W)
            h = h.permute(0, 2, 3, 1).reshape(B, H * W, h.shape[1])  # (B, HW, inner)
        for block in self.transformer_blocks:
            attn1 = cast(Attention, block.attn1)
            if attn1.hypertile is not None:  # HyperTile tiles this feature map's grid (sdengine.nn.hypertile)
                attn1.hypertile_grid = (H, W)
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h).reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        else:
            h = self.proj_out(h.reshape(B, H, W, -1).permute(0, 3, 1, 2))  # (B, C, H, W)
        return h + x


def middle_transformer(unet: Any) -> SpatialTransformer:
    """The transformer of ``unet``'s middle block (the one whose self-attention map self-attention guidance reads); a
    U-Net without one (no middle block, or a plain attention block there) is a one-line error."""
    mid = getattr(unet, "mid_block", None)
    attentions = getattr(mid, "attentions", None)
    first = attentions[0] if attentions is not None and len(attentions) else None
    if not isinstance(first, SpatialTransformer) or not len(first.transformer_blocks):
        raise UsageError(
            "self-attention guidance reads the self-attention map of the U-Net's middle-block transformer, and this "
            "U-Net has none"
        )
    return first


@contextmanager
def middle_attention_mass(unet: Any, start: int, count: int) -> Iterator[AttentionMass]:
    """Inside the block, every call of ``unet`` records the attention mass of its rows ``start`` .. ``start + count``
    in the middle block's first self-attention layer (:class:`AttentionMass`, with the map's size); the U-Net's
    output is unchanged, and it records nothing after the block, whatever happens."""
    transformer = middle_transformer(unet)
    attn1 = cast(BasicTransformerBlock, transformer.transformer_blocks[0]).attn1
    probe = AttentionMass(start, count)
    transformer.map_probe = attn1.map_probe = probe
    try:
        yield probe
    finally:
        transformer.map_probe = attn1.map_probe = None
