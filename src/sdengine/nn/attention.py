"""Attention: the one scaled-dot-product wrapper, multi-head attention and the spatial self-attention block.

Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``)
so that checkpoints load with a strict ``load_state_dict``.

Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance") runs some rows of a call with the identity attention map in chosen self-attention layers: there
``softmax(q k^T / sqrt(d)) v`` becomes ``v``, so the layer answers ``to_out(to_v(x))``. :func:`pag_layers` picks the
layers (diffusers' ``pag_applied_layers`` rule), :func:`identity_attention` switches them for a block.

HyperTile (:mod:`sdengine.nn.hypertile`) sets a self-attention layer's ``hypertile`` for a block: the layer then
hands its self-attention to it, which runs it on each tile of the feature map as its own batch row.

Self-attention guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance") reads a self-attention map: an :class:`AttentionMass` set on a layer (``map_probe``) records, for some rows
of each call while it is set, how much attention each key position receives (the softmax map averaged over the heads
and summed over the queries); the layer's output does not change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sdengine.errors import UsageError
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
        self.is_cross_attention = cross_attention_dim is not None
        # perturbed-attention guidance: this many trailing rows of each call take the identity attention map
        # (their output is to_out(to_v(x))); set only inside identity_attention()
        self.identity_rows = 0
        # HyperTile: called as hypertile(x, attend) in place of the self-attention (sdengine.nn.hypertile; set only
        # inside hypertile_applied())
        self.hypertile: Callable[[Tensor, Callable[[Tensor], Tensor], tuple[int, int] | None], Tensor] | None = None
        # the (H, W) of the feature map its tokens come from, told by its transformer while ``hypertile`` is set
        self.hypertile_grid: tuple[int, int] | None = None
        # self-attention guidance: records the attention mass of some rows of each call (set by a probe's owner)
        self.map_probe: AttentionMass | None = None
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        # A ModuleList (not Sequential) only to keep diffusers' key names `to_out.0.*`.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim, bias=out_bias), nn.Dropout(dropout)])

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        # x: (B, L, C); context: (B, S, D) or None for self-attention
        if self.map_probe is not None and context is None:
            self.map_probe.record(self, x)
        n = self.identity_rows
        if n and context is None:  # perturbed-attention guidance: the last n rows attend with the identity map
            b = x.shape[0] - n
            if b <= 0:
                h = self.to_v(x)  # (B, L, inner)
            else:
                m = mask[:b] if mask is not None and mask.dim() == 4 and mask.shape[0] == x.shape[0] else mask
                h = torch.cat([self._self_attend(x[:b], m), self.to_v(x[b:])])
        elif context is None:
            h = self._self_attend(x, mask)  # (B, L, inner)
        else:
            h = self._attend(x, context, mask)  # (B, L, inner)
        return self.to_out[1](self.to_out[0](h))  # (B, L, C)

    def _self_attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        tiles = self.hypertile
        if tiles is not None and mask is None:  # HyperTile: each tile of the feature map attends within itself
            return tiles(x, lambda t: self._attend(t, t, None), self.hypertile_grid)
        return self._attend(x, x, mask)

    def _attend(self, x: Tensor, context: Tensor, mask: Tensor | None) -> Tensor:
        return scaled_dot_product_attention(
            self.to_q(x), self.to_k(context), self.to_v(context), self.heads, mask=mask, upcast=self.upcast
        )


class AttentionMass:
    """What self-attention guidance reads of a self-attention layer: for the rows ``start`` .. ``start + count`` of a
    call, the attention each key position receives, ``sum_q mean_h softmax(q k^T / sqrt(d))[h, q, k]`` (count, L), in
    float32 whatever the layer's dtype, the queries taken in chunks of about ``CHUNK_SCORES / 4`` scores. Each position
    receives 1 on average (every query's row sums to 1), so ``mass > 1`` marks the positions attended above average.
    ``size``: the (H, W) of the feature map the L tokens come from, set by the layer's transformer."""

    def __init__(self, start: int, count: int) -> None:
        self.start, self.count = int(start), int(count)
        self.mass: Tensor | None = None
        self.size: tuple[int, int] | None = None

    def record(self, layer: Attention, x: Tensor) -> None:
        rows = x[self.start : self.start + self.count]  # (n, L, C)
        n, L, _ = rows.shape
        h = layer.heads
        q = layer.to_q(rows).float()
        k = layer.to_k(rows).float()
        d = q.shape[-1] // h
        q = q.view(n, L, h, d).transpose(1, 2) * d**-0.5  # (n, h, L, d)
        k = k.view(n, L, h, d).transpose(1, 2)  # (n, h, L, d)
        step = max(1, CHUNK_SCORES // 4 // max(1, n * h * L))  # float32 scores: at most 256 MiB at a time
        mass = torch.zeros(n, L, dtype=torch.float32, device=x.device)
        for i in range(0, L, step):
            probs = torch.matmul(q[:, :, i : i + step], k.transpose(-1, -2)).softmax(dim=-1)  # (n, h, rows, L)
            mass += probs.mean(dim=1).sum(dim=1)
        self.mass = mass


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


def pag_layers(module: nn.Module, patterns: Sequence[str]) -> list[Attention]:
    """The self-attention layers of ``module`` that perturbed-attention guidance perturbs, by diffusers' rule for
    ``pag_applied_layers``: every self-attention (no cross-attention) layer whose module name the regular expression
    matches somewhere (``re.search``; "mid" is the middle block's, "down.block_1" does not match, "down_blocks.1" the
    second down block's), except where the pattern and the name both end in the same number. A pattern that is not a
    regular expression or matches no layer is a one-line error."""
    chosen: dict[int, Attention] = {}
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise UsageError(f"PAG layer {pattern!r} is not a regular expression: {e}") from None
        tail = pattern.split(".")[-1]
        found = [
            m
            for name, m in named
            if rx.search(name) is not None and not (tail.isnumeric() and tail == name.split(".")[-1])
        ]
        if not found:
            raise UsageError(
                f"PAG layer {pattern!r} matches no self-attention layer of the U-Net (try 'mid', 'down', 'up', or "
                "a part of a layer name such as 'up_blocks.1')"
            )
        chosen.update((id(m), m) for m in found)
    return list(chosen.values())


@contextmanager
def identity_attention(layers: Sequence[Attention], rows: int) -> Iterator[None]:
    """Inside the block, the last ``rows`` rows of every call of ``layers`` take the identity attention map
    (perturbed-attention guidance's perturbed pass); as before after it, whatever happens."""
    for layer in layers:
        layer.identity_rows = int(rows)
    try:
        yield
    finally:
        for layer in layers:
            layer.identity_rows = 0
