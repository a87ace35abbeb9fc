"""Attention: the one scaled-dot-product wrapper, multi-head attention and the spatial self-attention block.

Parameter names follow diffusers' ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``, ``group_norm``)
so that checkpoints load with a strict ``load_state_dict``.

Perturbed-attention guidance (Ahn et al. 2024, "Self-Rectifying Diffusion Sampling with Perturbed-Attention
Guidance") runs some rows of a call with the identity attention map in chosen self-attention layers: there
``softmax(q k^T / sqrt(d)) v`` becomes ``v``, so the layer answers ``to_out(to_v(x))``. :func:`pag_layers` picks the
layers (diffusers' ``pag_applied_layers`` rule), :func:`identity_attention` switches them for a block.

IP-Adapter (:mod:`sdengine.nn.ip_adapter`) sets a cross-attention layer's ``ip_attention`` for a call: the layer's
queries then also attend to the image tokens, and that answer, scaled, is added to the text's before ``to_out``.

Reference control (:mod:`sdengine.nn.reference`) sets a self-attention layer's ``reference`` for a call: it records
the layer's input in the reference image's pass and, in the generation's, lets the queries attend to the recorded
tokens too (they are concatenated to the keys and values).

HyperTile (:mod:`sdengine.nn.hypertile`) sets a self-attention layer's ``hypertile`` for a block: the layer then
hands its self-attention to it, which runs it on each tile of the feature map as its own batch row. On a
:class:`SpatialSelfAttention` (the VAE decoder's middle block), ``spatial_tiles`` is set instead: the whole block
(group norm, attention, residual) is handed over, as A1111's Hypertile VAE wraps it.

Self-attention guidance (Hong et al. 2023, "Improving Sample Quality of Diffusion Models Using Self-Attention
Guidance") reads a self-attention map: an :class:`AttentionMass` set on a layer (``map_probe``) records, for some rows
of each call while it is set, how much attention each key position receives (the softmax map averaged over the heads
and summed over the queries); the layer's output does not change.

Fused projections (:func:`enable_fused_qkv`, the fast-path option ``fused_qkv``): a self-attention computes its
query, key and value as ONE matrix product with the three weights stacked (``[3 * inner, dim]``), and a
cross-attention its key and value of the text states as one (``[2 * inner, context_dim]``); the query of a
cross-attention stays its own product (it reads other tokens). Three kernel launches become one and the product
is wider (better use of a GPU's tensor cores at SD's small widths); the arithmetic is the same rows of the same
products, so the outputs equal the separate products' up to the GEMM's summation order (tests/test_fused_qkv.py).

Why the stacked weight is built lazily and checked at every call, and not made once at load time: the three
``nn.Linear`` layers stay the model's real parameters (state-dict keys ``to_q.weight`` ... load and save as
before), and everything that changes weights keeps writing them: ``load_state_dict`` (in place: the tensors'
version counters move), LoRA/LyCORIS fusing and unfusing (``weight.data`` swapped: another storage), ``.to()``,
a pipeline swapping networks, ControlNet copies (other tensors). The stack is a cache kept beside them with the
identity (a reference, so the storage cannot be reused by a new tensor at the same address) and the version
counter of every source tensor, and rebuilt when any differs. Where no cached stack can be trusted or used, the
layer does without one, automatically, call by call:

* three separate products as before for a projection that is not a plain ``nn.Linear`` (``fp8`` replaced it),
  carries a forward (pre-)hook (a LoRA or LyCORIS patched on unfused, a debugging hook) or has its ``forward``
  replaced on the instance: the hook or the replacement must see its own layer's call. The one hook let through
  is one that says it returns the output unchanged (``passes_through``: a fused LoRA's, whose change is in the
  weight, where the stack sees it);
* three separate products for a weight that is an inference tensor (made under ``torch.inference_mode``): it has
  no version counter, so an in-place change could not be seen;
* one product of ``torch.cat`` of the live weights, made per call, with autograd on and a weight that needs
  gradients (training), so gradients flow to ``to_q.weight`` etc.; the same live ``cat`` is traced under
  ``torch.compile``/export (``aot``), so a compiled or AOT-packaged network reads the live parameters, which is
  what those paths bind.

One trap stays: ``weight.data.copy_(...)`` changes a tensor in place WITHOUT moving its version counter (as for
autograd). Nothing in sdengine writes weights so; code that does must call :func:`clear_fused_cache` (or switch
fusion off and on). A recorded CUDA graph sees weight changes through its own fingerprint of the parameters
(sdengine.cuda_graphs) and records again, rebuilding the stack in its warm-up; dropping the stack otherwise
(fusion switched off, :func:`clear_fused_cache`) bumps the layer's ``derived_version``, which that fingerprint
counts too (sdengine.nn.fingerprint), so no graph replays a freed stack. A stack is replaced at a call only when
a source weight changed, which the fingerprint sees by itself. The cost: a second copy of the
attention projection weights (SD 1.5's U-Net: about 56M parameters, 112 MB in fp16).

GEGLU's projection (``sdengine.nn.transformer.GEGLU``) is already one ``nn.Linear`` of width ``2 * dim_out``: it
needs no fusing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
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
        # IP-Adapter: called as ip_attention(q) in a cross-attention, its answer (the image tokens' attention,
        # scaled) added to the text's (sdengine.nn.ip_adapter; set only inside ip_attention_applied())
        self.ip_attention: Callable[[Tensor], Tensor | None] | None = None
        # reference control (sdengine.nn.reference; set only inside reference_applied()): called as
        # reference(x, attend) in place of the self-attention, attend(queries, keys_values or None for x itself)
        self.reference: Callable[[Tensor, Callable[[Tensor, Tensor | None], Tensor]], Tensor] | None = None
        # fused query/key/value products (enable_fused_qkv); the stacked weights are a cache, not parameters
        self.fused_projections = False
        # bumped when the stacked weights are dropped (sdengine.nn.fingerprint: a CUDA graph reading them is stale)
        self.derived_version = 0
        self._fused_cache: dict[str, tuple[list[Tensor], list[int], tuple[Tensor, Tensor | None]]] = {}
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
        elif context is None and self.reference is not None:  # reference control: recorded tokens join the keys
            h = self.reference(x, lambda q, kv: self._self_attend(q, mask) if kv is None else self._attend(q, kv, None))
        elif context is None:
            h = self._self_attend(x, mask)  # (B, L, inner)
        elif self.ip_attention is None:
            h = self._attend(x, context, mask)  # (B, L, inner)
        else:  # IP-Adapter's decoupled cross-attention: the same queries attend to the image tokens too
            q, k, v = self._projections(x, context)
            h = scaled_dot_product_attention(q, k, v, self.heads, mask=mask, upcast=self.upcast)
            extra = self.ip_attention(q)
            if extra is not None:
                h = h + extra
        return self.to_out[1](self.to_out[0](h))  # (B, L, C)

    def _self_attend(self, x: Tensor, mask: Tensor | None) -> Tensor:
        tiles = self.hypertile
        if tiles is not None and mask is None:  # HyperTile: each tile of the feature map attends within itself
            return tiles(x, lambda t: self._attend(t, None, None), self.hypertile_grid)
        return self._attend(x, None, mask)

    def _attend(self, x: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        # context None: self-attention
        q, k, v = self._projections(x, context)
        return scaled_dot_product_attention(q, k, v, self.heads, mask=mask, upcast=self.upcast)

    def _projections(self, x: Tensor, context: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(q, k, v) of ``x`` attending to ``context`` (None: to itself); with fused projections one product for
        q, k and v (self-attention) or for k and v (cross-attention) where it can be used now."""
        if self.fused_projections:
            if context is None:
                stack = self._stacked("qkv", (self.to_q, self.to_k, self.to_v))
                if stack is not None:
                    q, k, v = F.linear(x, *stack).chunk(3, dim=-1)  # (B, L, inner) each: views of (B, L, 3 inner)
                    return q, k, v
            else:
                stack = self._stacked("kv", (self.to_k, self.to_v))
                if stack is not None:
                    k, v = F.linear(context, *stack).chunk(2, dim=-1)  # (B, S, inner) each
                    return self.to_q(x), k, v
        if context is None:
            context = x
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def drop_fused_cache(self) -> None:
        """Drop the stacked projection weights (rebuilt at the next fused call)."""
        if self._fused_cache:
            self._fused_cache.clear()
            self.derived_version += 1

    def _stacked(self, which: str, layers: tuple[nn.Module, ...]) -> tuple[Tensor, Tensor | None] | None:
        """The weights (and biases) of ``layers`` stacked along their outputs, current as of now; None when the
        layers must run on their own (see the module docstring)."""
        weights: list[Tensor] = []
        biases: list[Tensor] = []
        for m in layers:
            if type(m) is not nn.Linear or m._forward_pre_hooks or "forward" in m.__dict__:
                return None
            if any(not getattr(h, "passes_through", False) for h in m._forward_hooks.values()):
                return None  # a hook that acts (a patched LoRA) must see its layer's own call
            weights.append(m.weight)
            if m.bias is not None:
                biases.append(m.bias)
        if biases and len(biases) != len(weights):
            return None  # some with a bias, some without: not one product (never so in SD)
        sources = weights + biases
        if torch.compiler.is_compiling() or (
            torch.is_grad_enabled() and any(t.requires_grad for t in sources)
        ):  # traced or trained: the live parameters, never a cache
            return torch.cat(weights), torch.cat(biases) if biases else None
        if any(t.is_inference() for t in sources):
            return None  # no version counter: an in-place change could not be seen
        cached = self._fused_cache.get(which)
        if cached is not None:
            kept, versions, stack = cached
            if len(kept) == len(sources) and all(
                k.data_ptr() == t.data_ptr() and k.dtype == t.dtype and k.device == t.device and v == t._version
                for k, t, v in zip(kept, sources, versions, strict=True)
            ):
                return stack
        with torch.no_grad():
            stack = (torch.cat(weights), torch.cat(biases) if biases else None)
        # references to the sources keep their storage from being reused at the same address by another tensor
        self._fused_cache[which] = ([t.detach() for t in sources], [t._version for t in sources], stack)
        return stack


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
        # HyperTile on the VAE: called as spatial_tiles(x, block) in place of this block, which it runs on tiles of
        # the (B, C, H, W) map (sdengine.nn.hypertile.vae_hypertile_applied; set only inside it)
        self.spatial_tiles: Callable[[Tensor, Callable[[Tensor], Tensor]], Tensor] | None = None

    def forward(self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        tiles = self.spatial_tiles
        if tiles is not None:
            return tiles(x, self._block)
        return self._block(x)

    def _block(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x) if self.group_norm is not None else x
        h = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        h = h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        out = h + x
        if self.rescale_output_factor != 1.0:
            out = out / self.rescale_output_factor
        return out


def enable_fused_qkv(module: nn.Module, enabled: bool = True) -> int:
    """Switch fused query/key/value products on (or off) for every :class:`Attention` layer in ``module``
    (see the module docstring); returns how many layers were switched. Switching off drops the stacked weights."""
    n = 0
    for m in module.modules():
        if isinstance(m, Attention):
            m.fused_projections = bool(enabled)
            if not enabled:
                m.drop_fused_cache()
            n += 1
    return n


def clear_fused_cache(module: nn.Module) -> None:
    """Drop the stacked projection weights of every :class:`Attention` layer in ``module`` (rebuilt at the next
    call): needed only after changing a weight through ``weight.data`` in place, which no version counter sees."""
    for m in module.modules():
        if isinstance(m, Attention):
            m.drop_fused_cache()


def fused_qkv_layers(module: nn.Module) -> int:
    """How many :class:`Attention` layers of ``module`` have fused projections switched on."""
    return sum(1 for m in module.modules() if isinstance(m, Attention) and m.fused_projections)


def pag_layers(module: nn.Module, patterns: Sequence[str]) -> list[Attention]:
    """The self-attention layers of ``module`` that perturbed-attention guidance perturbs, by diffusers' rule for
    ``pag_applied_layers`` (:func:`match_pag_layers`; "mid" is the middle block's, "down.block_1" does not match,
    "down_blocks.1" the second down block's)."""
    named = [(name, m) for name, m in module.named_modules() if isinstance(m, Attention) and not m.is_cross_attention]
    return match_pag_layers(
        named,
        patterns,
        "self-attention layer of the U-Net (try 'mid', 'down', 'up', or a part of a layer name such as 'up_blocks.1')",
    )


def match_pag_layers(named: Sequence[tuple[str, Any]], patterns: Sequence[str], what: str) -> list[Any]:
    """diffusers' rule for ``pag_applied_layers`` over the (name, layer) pairs ``named``: every layer whose name the
    regular expression matches somewhere (``re.search``), except where the pattern and the name both end in the
    same number; each layer once, in ``named``'s order. A pattern that is not a regular expression or matches no
    layer is a one-line error ending "matches no ``what``"."""
    chosen: set[int] = set()
    for pattern in patterns:
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise UsageError(f"PAG layer {pattern!r} is not a regular expression: {e}") from None
        tail = pattern.split(".")[-1]
        found = [
            id(m)
            for name, m in named
            if rx.search(name) is not None and not (tail.isnumeric() and tail == name.split(".")[-1])
        ]
        if not found:
            raise UsageError(f"PAG layer {pattern!r} matches no {what}")
        chosen.update(found)
    return [m for _, m in named if id(m) in chosen]


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
