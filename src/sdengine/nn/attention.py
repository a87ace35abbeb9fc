"""Attention: the one scaled-dot-product wrapper, multi-head attention and the spatial self-attention block.

Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``)
so that checkpoints load with a strict ``load_state_dict``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdengine.sdpa_backends import attention

_HALF = (torch.float16, torch.bfloat16)

# Above this many scores (heads x Lq x Lk) per batch row, the query rows run in chunks of about this many
# scores. Python handles Ctrl-C only between kernel calls, so one giant attention call (4096x4096 pixels on a
# small model: 262,144 tokens, 7e10 scores per head) could not be stopped for minutes; in chunks it stops
# within one chunk, and no kernel ever holds more than this many scores. Every query row is computed from
# the same keys and values either way, so the result does not depend on the chunking. SD at 1024x1024
# (8 heads x 16,384^2 = 2**31) already runs in chunks; 512x512 and below in one call.
CHUNK_SCORES = 2**28


def scaled_dot_product_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    heads: int,
    *,
    mask: Tensor | None = None,
    is_causal: bool = False,
    upcast: bool = False,
) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over ``heads`` heads (Vaswani et al. 2017, eq. 1).

    q: (B, Lq, heads * d), k and v: (B, Lk, heads * d) -> (B, Lq, heads * d).
    ``mask`` is added to the scores (float) or selects them (bool), broadcastable to (B, heads, Lq, Lk).
    ``upcast`` computes in float32 for half inputs (SD2.x overflows in fp16 without it).
    Every attention in sdengine goes through here, so that one place picks the fused kernel (and splits the
    queries of a huge attention into chunks, see ``CHUNK_SCORES``).
    """
    B, Lq, inner = q.shape
    Lk = k.shape[1]
    d = inner // heads
    dtype = q.dtype
    if upcast and dtype in _HALF:
        q, k, v = q.float(), k.float(), v.float()
        if mask is not None and mask.is_floating_point():
            mask = mask.float()
    q = q.view(B, Lq, heads, d).transpose(1, 2)  # (B, h, Lq, d)
    k = k.view(B, Lk, heads, d).transpose(1, 2)  # (B, h, Lk, d)
    v = v.view(B, Lk, heads, d).transpose(1, 2)  # (B, h, Lk, d)
    rows = max(1, CHUNK_SCORES // max(1, heads * Lk))
    if is_causal or rows >= Lq:
        out = attention(q, k, v, mask=mask, is_causal=is_causal)  # (B, h, Lq, d)
    else:
        per_query = mask is not None and mask.dim() >= 2 and mask.shape[-2] == Lq  # else it broadcasts over Lq
        parts = []
        for i in range(0, Lq, rows):
            m = mask[..., i : i + rows, :] if mask is not None and per_query else mask
            parts.append(attention(q[:, :, i : i + rows], k, v, mask=m))
        out = torch.cat(parts, dim=2)
    return out.transpose(1, 2).reshape(B, Lq, inner).to(dtype)  # (B, Lq, h * d)


class Attention(nn.Module):
    """Multi-head attention over token sequences; cross-attention when ``cross_attention_dim`` is set."""

    def __init__(
        self,
        query_dim: int,
        heads: int,
        head_dim: int,
        *,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        dropout: float = 0.0,
        upcast: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        context_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.upcast = upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        # A ModuleList (not Sequential) only to keep diffusers' key names `to_out.0.*`.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        # x: (B, L, C); context: (B, S, D) or None for self-attention
        context = x if context is None else context
        h = scaled_dot_product_attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask=mask, upcast=self.upcast
        )  # (B, L, inner)
        return self.to_out[1](self.to_out[0](h))  # (B, L, C)


class SpatialSelfAttention(Attention):
    """GroupNorm + self-attention over the H*W positions of a feature map, with a residual.

    The attention block of the DDPM U-Net (Ho et al. 2020) and of the VAE's middle block
    (diffusers' ``Attention(..., _from_deprecated_attn_block=True)``).
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        *,
        norm_groups: int | None = 32,
        eps: float = 1e-5,
        rescale_output_factor: float = 1.0,
    ) -> None:
        super().__init__(channels, heads, channels // heads, bias=True)
        self.group_norm = nn.GroupNorm(norm_groups, channels, eps=eps) if norm_groups is not None else None
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        out = h + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out
