"""LyCORIS weight updates: LoHa, LoKr, (IA)^3, GLoRA, OFT, BOFT, LoCon's Tucker core, DoRA, norm-layer differences.

Each algorithm stores factors from which the layer's weight update is rebuilt (W: (out, in) or (out, in, kh, kw)):

- LoHa (Hyeon-Woo et al. 2022): ``dW = (w1a @ w1b) * (w2a @ w2b)``, a Hadamard product of two low-rank products;
  with Tucker cores ``t1``, ``t2`` (convolutions) each half is ``t x_0 w_a x_1 w_b`` (a 1-mode/2-mode product).
- LoKr (Yeh et al. 2023): ``dW = kron(w1, w2)``, where either factor may be stored whole or as a low-rank pair
  (``w1 = w1_a @ w1_b``); a convolution's kernel lives in ``w2`` (whole, flattened into ``w2_b``, or in a
  Tucker core ``t2``).
- (IA)^3 (Liu et al. 2022): a learned vector scales the weight per output (or input) channel: ``dW = W * w``.
- LoRA with a Tucker core (LoCon ``lora_mid``): ``dW = mid x_0 up x_1 down``.
- GLoRA (Chavan et al. 2023): ``dW = W a1 a2 + b1 b2``, an input-channel mixing before the layer plus a
  low-rank term (ComfyUI also reads an older layout with the factors' names swapped); with a Tucker core ``bm``
  (r, r, kh, kw) the low-rank term of a convolution is ``bm x_0 b1 x_1 b2`` as for LoCon.
- OFT (Qiu et al. 2023; LyCORIS' diag-OFT and kohya's OFT): the weight's output rows are rotated block by block,
  ``W' = R^T W`` with ``R = blockdiag(R_1..R_n)``, each ``R_k = (I + Q_k)(I - Q_k)^-1`` the Cayley transform of the
  skew-symmetric ``Q_k = B_k - B_k^T`` of a stored block ``B_k`` (so ``R_k`` is orthogonal). A constraint
  ``c = alpha * out`` (alpha > 0) shrinks ``Q`` to Frobenius norm ``c`` (over all blocks) when larger; an optional
  ``rescale`` (out, 1, ...) multiplies the rows after: ``W' = rescale * R^T W``.
- BOFT (Liu et al. 2024, butterfly OFT): m stages of block-diagonal orthogonal ``R_i`` (Cayley transforms as for
  OFT, the constraint over all stages), stage i applied to the rows after a butterfly permutation that pairs rows
  ``2^i * b/2`` apart: ``W' = rescale * P_m^T R_m P_m ... P_1^T R_1 P_1 W``.
- DoRA (Liu et al. 2024) on any of these: the updated weight ``W + dW`` is renormalised to the stored magnitude
  ``m`` per output row (PEFT's ``lora_magnitude_vector``, LyCORIS' ``dora_scale`` shaped (out, 1, ...)) or per
  input column (older LyCORIS files, ``dora_scale`` shaped (1, in, ...)): ``W' = (W + dW) * m / ||W + dW||``.

The update is scaled by alpha / rank (LoHa, LoKr with a low-rank factor, LoCon, GLoRA) and by the user's
multiplier (OFT/BOFT read alpha as their constraint, not as a scale).
OFT's and BOFT's update is ``mult * (W' - W)`` (A1111's reading; linear in the weight, weight 0 is the base
model); at weight 1 it is LyCORIS' and kohya's ``W'``. (LyCORIS and kohya interpolate each rotation instead,
``I + mult (R - I)``, and ComfyUI applies the weight twice: all agree at weight 1.)
DoRA's update is ``mult * (W' - W)``, the convention of A1111 and ComfyUI (weight 0 is the base model, the
effect is linear in the weight); at weight 1 it is the same ``W'`` that LyCORIS and PEFT compute.

Unlike a plain LoRA, these updates are not a product of two thin maps, so the layer builds the dense ``dW``
(from the current base weight, which DoRA and (IA)^3 need) and runs it as one more Linear/Conv2d; the built
update is kept until the weight, the base weight or the input's device/dtype changes (bit-identical to a
rebuild); ``fuse`` folds it into the weight as for LoRA. File layouts and key names are
:mod:`sdengine.weights.lycoris_file`.

Differences of 1-d parameters (a GroupNorm/LayerNorm's weight and bias, an RMSNorm's scale, or a Linear/Conv2d
bias alone) are a :class:`DiffLayer`: patched, it adds ``normalize(x) * m dw + m db`` to the layer's output;
fused, the parameters change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .lora import LayerUpdate, LoRAError

ALGORITHMS = ("loha", "lokr", "ia3", "locon_tucker", "lora", "full", "glora", "oft", "boft")
# the norm layers whose weight and bias a file may change (RMSNorm: the diffusion transformers' q/k norms, a scale only)
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)
# the algorithms whose update is built from the file's factors alone (no base weight, no DoRA): their rows can be
# cut into the parts of a fused layer (Flux's qkv), each part's layer taking its rows (LycorisLayer's ``rows``)
FACTOR_ONLY = frozenset({"loha", "lokr", "locon_tucker", "lora"})


def _tucker(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """``t`` (r1, r2, *k) with ``wa`` (r1, out) on its first mode and ``wb`` (r2, in) on its second: (out, in, *k)."""
    return torch.einsum("ij...,io,jn->on...", t, wa, wb)


def loha_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoHa's unscaled ``dW``: (out, in_flat) without Tucker cores, (out, in, *k) with them."""
    w1a, w1b, w2a, w2b = (parts[k].float() for k in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
    if "hada_t1" in parts:  # Tucker: w?a is (r, out), w?b is (r, in), t? is (r, r, *k)
        return _tucker(parts["hada_t1"].float(), w1a, w1b) * _tucker(parts["hada_t2"].float(), w2a, w2b)
    return (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1))


def lokr_factors(parts: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """LoKr's two Kronecker factors, rebuilt: w1 (a, c) and w2 (b, d) or (b, d*kh*kw) or (b, d, kh, kw)."""
    if "lokr_w1" in parts:
        w1 = parts["lokr_w1"].float()
    else:
        w1 = parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
    if "lokr_w2" in parts:
        w2 = parts["lokr_w2"].float()
    elif "lokr_t2" in parts:  # Tucker: w2_a is (r, b), w2_b is (r, d), t2 is (r, r, kh, kw)
        w2 = _tucker(parts["lokr_t2"].float(), parts["lokr_w2_a"].float(), parts["lokr_w2_b"].float())
    else:  # w2_a (b, r) @ w2_b (r, d[*kh*kw]); an older layout keeps w2_b as (r, d, kh, kw)
        w2b = parts["lokr_w2_b"].float()
        w2 = (parts["lokr_w2_a"].float() @ w2b.flatten(1)).reshape(-1, *w2b.shape[1:])
    return w1, w2


def lokr_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoKr's unscaled ``dW = kron(w1, w2)``: (a*b, c*d[*kh*kw]) or (a*b, c*d, kh, kw)."""
    w1, w2 = lokr_factors(parts)
    w1 = w1.reshape(*w1.shape, *[1] * (w2.ndim - 2))  # kron over the kernel dims keeps w2's kernel
    return torch.kron(w1, w2.contiguous())


def locon_tucker_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """LoCon with a Tucker core: ``lora_up`` (out, r), ``lora_mid`` (r, r, kh, kw), ``lora_down`` (r, in)."""
    up, mid, down = (parts[k].float() for k in ("lora_up", "lora_mid", "lora_down"))
    return _tucker(mid, up.flatten(1).T, down.flatten(1))


def lora_delta(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Plain LoRA's unscaled ``up @ down`` (for DoRA on a LoRA): (out, in_flat)."""
    return parts["lora_up"].float().flatten(1) @ parts["lora_down"].float().flatten(1)


def glora_old_layout(parts: Mapping[str, torch.Tensor], out: int | None = None, inn: int | None = None) -> bool:
    """Whether GLoRA factors are in the older layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)) rather
    than LyCORIS' current one (a1 (in, r), a2 (r, in), b1 (out, r), b2 (r, in[, kh, kw])): ComfyUI's test, which
    keeps the old reading for a square ``out == in`` layer whose current-layout rank would equal ``in``."""
    a1, a2, b1, b2 = (tuple(parts[k].shape) for k in ("a1", "a2", "b1", "b2"))
    old = len(a1) > 1 and len(a2) > 1 and len(b1) > 1 and len(b2) > 1 and b2[1] == b1[0] == a1[0] == a2[1]
    new = len(a1) > 1 and len(a2) > 1 and len(b1) > 1 and b2[0] == b1[1] == a1[1] == a2[0]
    if new and not (old and out is not None and a2[0] == out == inn):
        return False
    return old


def glora_delta(parts: Mapping[str, torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """GLoRA's unscaled ``dW = W A + B`` (Chavan et al. 2023; LyCORIS' ``W a1 a2 + b1 b2``): A (in, in) mixes the
    layer's input channels before W (for a convolution, before its kernel), B is a low-rank term of the layer's
    shape. Without a base, only B (out, in_flat): its shape is what the layer's weight must have."""
    old = glora_old_layout(parts, *((int(base.shape[0]), int(base.shape[1])) if base is not None else ()))
    a1, a2, b1, b2 = (parts[k].float().flatten(1) for k in ("a1", "a2", "b1", "b2"))
    up, down = (b2, b1) if old else (b1, b2)  # (out, r), (r, in[*kh*kw])
    # with a Tucker core bm (r, r, kh, kw) between them (1x1 b1, b2): the kernel is bm's
    b = _tucker(parts["bm"].float(), up.T, down) if "bm" in parts else up @ down
    if base is None:
        return b
    mix = a2 @ a1 if old else a1 @ a2  # (in, in)
    return torch.einsum("oi...,ij->oj...", base.float(), mix) + b.reshape(base.shape)


def cayley(blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """Orthogonal ``R = (I + Q)(I - Q)^-1`` per block of ``blocks`` (..., b, b), ``Q = B - B^T`` the skew-symmetric
    part; with ``constraint`` > 0, ``Q`` is first scaled down to that Frobenius norm (over all blocks) when larger."""
    b = blocks.float()
    q = b - b.transpose(-1, -2)
    if constraint > 0:
        norm = torch.linalg.vector_norm(q) + 1e-8  # LyCORIS' and kohya's epsilon
        if bool(norm > constraint):
            q = q * (constraint / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype, device=q.device)
    return (eye + q) @ torch.linalg.inv(eye - q)


def oft_weight(base: torch.Tensor, blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """OFT's rotated weight ``R^T W`` (before any rescale): ``blocks`` (n, b, b) rotate the n groups of b output
    rows of ``base`` (out = n*b, ...)."""
    r = cayley(blocks, constraint)
    n, bsize = int(r.shape[0]), int(r.shape[-1])
    w = base.float().reshape(n, bsize, *base.shape[1:])
    return torch.einsum("knm,kn...->km...", r, w).reshape(base.shape)


def boft_weight(base: torch.Tensor, blocks: torch.Tensor, constraint: float = 0.0) -> torch.Tensor:
    """BOFT's rotated weight (before any rescale): ``blocks`` (m, n, b, b) are m butterfly stages, each n blocks of
    b rows; stage i groups the rows in pairs of runs ``k = 2^i * b/2`` long, interleaves each pair (rows j and
    j + k side by side), rotates each run of b by its block ``R`` (``R x``), and undoes the interleaving."""
    r = cayley(blocks, constraint)
    m, bsize = int(r.shape[0]), int(r.shape[-1])
    rest = base.shape[1:]
    w = base.float()
    for i in range(m):
        k = 2**i * (bsize // 2)
        w = w.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, bsize, *rest)  # (c, 2, k) -> (c, k, 2) -> blocks
        w = torch.einsum("bij,bj...->bi...", r[i], w)
        w = w.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(base.shape)
    return w


def orthogonal_delta(algo: str, parts: Mapping[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """OFT's or BOFT's ``dW = rescale * W_rotated - W`` for the layer weight ``base``; the constraint is
    ``parts["constraint"]`` (alpha * out, 0: none)."""
    c = float(parts["constraint"].flatten()[0]) if "constraint" in parts else 0.0
    rotate = oft_weight if algo == "oft" else boft_weight
    w = rotate(base, parts["oft_blocks"], c)
    if "rescale" in parts:
        w = w * parts["rescale"].float().reshape(-1, *[1] * (base.ndim - 1))
    return w - base.float()


def ia3_delta(base: torch.Tensor, vector: torch.Tensor, on_input: bool) -> torch.Tensor:
    """(IA)^3's ``dW = W * w`` with ``w`` along the output (or input) channels."""
    v = vector.float().flatten()
    shape = [1] * base.ndim
    shape[1 if on_input else 0] = v.numel()
    return base * v.reshape(shape)


def dora_weight(base: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, on_output: bool) -> torch.Tensor:
    """DoRA's merged weight ``(W + dW) * m / ||W + dW||``, the norm per output row or per input column."""
    merged = base + delta
    if on_output:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (merged.ndim - 1))
        m = magnitude.float().reshape(norm.shape)
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (merged.ndim - 2))
        m = magnitude.float().reshape(norm.shape)
    # the eps keeps an all-zero row finite (LyCORIS and ComfyUI add the same float32 eps)
    return merged * (m / (norm + torch.finfo(torch.float32).eps))


def magnitude_on_output(
    magnitude: torch.Tensor, out_features: int, in_features: int, *, peft: bool = False
) -> bool | None:
    """Which axis a DoRA magnitude belongs to: True (out), False (in), None (fits neither).

    PEFT's ``lora_magnitude_vector`` is always per output (a convolution's is shaped (1, out, 1, 1)); LyCORIS'
    ``dora_scale`` tells by its shape, (out, 1, ...) or (1, in, ...)."""
    if peft:
        return True if magnitude.numel() == out_features else None
    shape = tuple(magnitude.shape)
    if magnitude.ndim >= 2 and shape[0] == 1 and magnitude.numel() == in_features and shape[1] == in_features:
        return False
    if magnitude.numel() == out_features and (magnitude.ndim == 1 or shape[0] == out_features):
        return True
    return None


def unscaled_delta(algo: str, parts: Mapping[str, torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """The algorithm's ``dW`` (before alpha / rank), float32, in ``base``'s shape (without a base: as the factors
    give it, (out, in*kh*kw) or (out, in, kh, kw); (IA)^3, OFT and BOFT need the base)."""
    if algo == "loha":
        d = loha_delta(parts)
    elif algo == "lokr":
        d = lokr_delta(parts)
    elif algo == "locon_tucker":
        d = locon_tucker_delta(parts)
    elif algo == "lora":
        d = lora_delta(parts)
    elif algo == "full":  # LyCORIS' full finetuning: the difference itself, (out, in[, kh, kw])
        d = parts["diff"].float()
    elif algo == "glora":
        d = glora_delta(parts, base)
    elif algo in ("oft", "boft") and base is not None:
        d = orthogonal_delta(algo, parts, base)
    elif algo == "ia3" and base is not None:
        d = ia3_delta(base, parts["weight"], bool(parts["on_input"].flatten()[0]))
    else:
        raise LoRAError(f"unknown LyCORIS algorithm {algo!r} (known: {', '.join(ALGORITHMS)})")
    if base is None:
        return d
    if d.numel() != base.numel():
        raise LoRAError(f"{algo} update has {tuple(d.shape)}, the layer's weight {tuple(base.shape)}")
    return d.reshape(base.shape)


class LycorisLayer(LayerUpdate):
    """One layer's LyCORIS update, patched onto (or fused into) its base Linear/Conv2d like a LoRA layer.

    ``forward`` rebuilds ``multiplier * dW`` from the factors and the base weight as it is now, and applies it
    with the base layer's geometry; ``delta_weight`` is that ``dW`` (float32) for fusing."""

    def __init__(
        self,
        algo: str,
        parts: Mapping[str, torch.Tensor],
        base: nn.Module,
        *,
        scale: float,
        multiplier: float = 1.0,
        magnitude: torch.Tensor | None = None,
        magnitude_on_output: bool = True,
        conv: dict[str, tuple[int, ...]] | None = None,
        rows: tuple[tuple[int, int], ...] = (),
    ) -> None:
        super().__init__()
        if algo not in ALGORITHMS:
            raise LoRAError(f"unknown LyCORIS algorithm {algo!r} (known: {', '.join(ALGORITHMS)})")
        if rows and (algo not in FACTOR_ONLY or magnitude is not None):
            raise LoRAError(f"{algo} updates (with DoRA: any) depend on the whole base layer: not cut by rows")
        # rows: this layer is a part of a fused one (Flux's q of a qkv); the file's update is the fused layer's,
        # and these (start, stop) blocks of its rows, joined, are this layer's update. Empty: the whole update.
        self.rows = tuple(rows)
        self.algo = algo
        self.parts = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) for k, v in parts.items()})
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude, requires_grad=False)
        self.magnitude_on_output = magnitude_on_output
        self.scale = float(scale)
        self._cache: tuple[tuple[Any, ...], torch.Tensor, torch.Tensor | None] | None = None
        self.multiplier = float(multiplier)
        self.conv = conv
        self._base = (base,)  # a tuple: the base layer is read, not registered as a submodule

    def base_weight(self) -> torch.Tensor:
        w = self._base[0].weight
        assert isinstance(w, torch.Tensor)
        return w.detach()

    def delta_weight(self) -> torch.Tensor:
        """``multiplier * (W' - W)`` in float32, in the base weight's shape."""
        base = self.base_weight().float()
        parts = {k: v.detach().to(base.device) for k, v in self.parts.items()}
        if self.rows:
            whole = unscaled_delta(self.algo, parts, None)
            d = torch.cat([whole[a:b] for a, b in self.rows]).reshape(base.shape) * self.scale
        else:
            d = unscaled_delta(self.algo, parts, base) * self.scale
        if self.magnitude is not None:
            d = dora_weight(base, d, self.magnitude.detach().to(base.device), self.magnitude_on_output) - base
        return d * self.multiplier

    def delta_bias(self) -> torch.Tensor | None:
        """``multiplier * diff_b`` (float32) for a full difference that changes the bias too, else None."""
        if "diff_b" not in self.parts:
            return None
        return self.parts["diff_b"].detach().float() * self.multiplier

    @property
    def multiplier(self) -> float:
        return self._multiplier

    @multiplier.setter
    def multiplier(self, value: float) -> None:
        self._multiplier = float(value)
        self._cache = None  # a new weight: the update is rebuilt at the next forward

    def clear_cache(self) -> None:
        """Drop the update kept for the next forwards (also done when the weight changes)."""
        self._cache = None

    def _cache_key(self, x: torch.Tensor, dtype: torch.dtype) -> tuple[Any, ...]:
        w = self._base[0].weight
        assert isinstance(w, torch.Tensor)
        try:
            version = w._version  # an in-place change of the base weight
        except RuntimeError:  # an inference tensor has no version counter (it cannot be changed in place either)
            version = -1
        return (self._multiplier, w.data_ptr(), version, w.dtype, w.device, x.device, dtype)

    def cached_update(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(multiplier * dW, multiplier * db)`` on ``x``'s device in its dtype, built once and reused while the
        weight, the base weight and ``x``'s device and dtype stay the same: the very tensors the uncached
        computation gives (the same operations on the same values), so the output is bit-identical."""
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        key = self._cache_key(x, dtype)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        self._cache = None  # free the old update before building the new one
        d = self.delta_weight().to(device=x.device, dtype=dtype)
        db = self.delta_bias()
        b = None if db is None else db.to(device=x.device, dtype=dtype)
        self._cache = (key, d, b)
        return d, b

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor | None:
        """As ``LoRALayer.forward`` (``padded``: ``x`` is padded already). The dense update is rebuilt only when
        the weight, the base weight or ``x``'s device or dtype changed (:meth:`cached_update`)."""
        if self.multiplier == 0.0:
            return None
        d, b = self.cached_update(x)
        if self.conv is None:
            return F.linear(x, d, b)
        c = self.conv
        return F.conv2d(x, d, b, c["stride"], (0, 0) if padded else c["padding"], c["dilation"])

    @property
    def rank(self) -> int | None:
        return rank_of(self.algo, dict(self.parts))


class DiffLayer(LayerUpdate):
    """A difference added to a layer's 1-d parameters: a norm layer's weight and/or bias (ComfyUI's 1-d ``diff`` /
    ``diff_b``, LyCORIS' ``w_norm`` / ``b_norm``), or the bias alone of a Linear/Conv2d (ComfyUI's ``diff_b``
    next to a LoRA pair): ``W + multiplier * dw``, ``b + multiplier * db``, no alpha.

    Patched, the term added to the output is ``normalize(x) * m dw + m db`` (a norm's output is
    ``normalize(x) * W + b``, linear in both), or ``m db`` (a Linear/Conv2d bias), broadcast along the layer's
    channel axis; fused, the parameters themselves change."""

    def __init__(
        self,
        base: nn.Module,
        weight_diff: torch.Tensor | None,
        bias_diff: torch.Tensor | None,
        *,
        multiplier: float = 1.0,
    ) -> None:
        super().__init__()
        if weight_diff is None and bias_diff is None:
            raise LoRAError("a difference layer needs a weight or a bias difference")
        if weight_diff is not None and not isinstance(base, NORM_TYPES):
            raise LoRAError(f"a 1-d weight difference fits norm layers only, not {type(base).__name__}")
        self.weight_diff = None if weight_diff is None else nn.Parameter(weight_diff, requires_grad=False)
        self.bias_diff = None if bias_diff is None else nn.Parameter(bias_diff, requires_grad=False)
        self.multiplier = float(multiplier)
        self._base = (base,)  # read, not registered as a submodule

    def _channels_first(self, v: torch.Tensor, ndim: int) -> torch.Tensor:
        """``v`` shaped to broadcast over the base layer's output (of ``ndim`` dimensions)."""
        base = self._base[0]
        if isinstance(base, nn.GroupNorm | nn.Conv2d):  # (B, C, ...)
            return v.reshape(-1, *[1] * (ndim - 2))
        return v  # Linear (..., out) and LayerNorm (..., *normalized_shape): trailing dims

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor | None:
        """The change of the base layer's output for its input ``x`` (``padded`` is only for convolutions, whose
        bias term does not depend on the input)."""
        m = self.multiplier
        if m == 0.0:
            return None
        base = self._base[0]
        dtype = x.dtype if torch.is_floating_point(x) else torch.float32
        out: torch.Tensor | None = None
        if self.weight_diff is not None:
            xf = x.to(dtype)
            if isinstance(base, nn.GroupNorm):
                normed = F.group_norm(xf, base.num_groups, None, None, base.eps)
            elif isinstance(base, nn.RMSNorm):
                normed = F.rms_norm(xf, base.normalized_shape, None, base.eps)
            else:
                assert isinstance(base, nn.LayerNorm)
                normed = F.layer_norm(xf, base.normalized_shape, None, None, base.eps)
            w = (self.weight_diff.detach().float() * m).to(device=x.device, dtype=dtype)
            out = normed * self._channels_first(w, normed.ndim)
        if self.bias_diff is not None:
            b = (self.bias_diff.detach().float() * m).to(device=x.device, dtype=dtype)
            b = self._channels_first(b, x.ndim)  # the output has the input's rank (Linear: trailing anyway)
            out = b if out is None else out + b
        return out

    def delta_weight(self) -> torch.Tensor:
        """``multiplier * dw`` in float32 (zeros for a bias-only difference), in the base weight's shape."""
        w = self._base[0].weight
        assert isinstance(w, torch.Tensor)
        if self.weight_diff is None:
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return self.weight_diff.detach().float().reshape(w.shape).to(w.device) * self.multiplier

    def delta_bias(self) -> torch.Tensor | None:
        if self.bias_diff is None:
            return None
        return self.bias_diff.detach().float() * self.multiplier


def rank_of(algo: str, parts: Mapping[str, torch.Tensor], layer_shape: tuple[int, ...] | None = None) -> int | None:
    """The rank that alpha divides (None where the file has no low-rank factor: LoKr with two whole factors,
    (IA)^3). ``layer_shape``: the weight's shape, which GLoRA's layout test needs for a square layer."""
    if algo == "loha":
        return int(parts["hada_w1_b"].shape[0])
    if algo == "lokr":
        for k in ("lokr_w1_b", "lokr_w2_b"):
            if k in parts:
                return int(parts[k].shape[0])
        return None
    if algo in ("lora", "locon_tucker"):
        return int(parts["lora_down"].shape[0])
    if algo == "glora":
        dims = (int(layer_shape[0]), int(layer_shape[1])) if layer_shape is not None else ()
        return int(parts["a1" if glora_old_layout(parts, *dims) else "a2"].shape[0])
    return None


def lycoris_scale(
    algo: str, parts: Mapping[str, torch.Tensor], alpha: float | None, layer_shape: tuple[int, ...] | None = None
) -> float:
    """alpha / rank as LyCORIS reads it: no alpha (or 0) means alpha = rank; no rank means scale 1."""
    rank = rank_of(algo, parts, layer_shape)
    if rank is None or not alpha or not math.isfinite(alpha):
        return 1.0
    return alpha / rank


__all__ = [
    "ALGORITHMS",
    "FACTOR_ONLY",
    "NORM_TYPES",
    "DiffLayer",
    "LycorisLayer",
    "boft_weight",
    "cayley",
    "dora_weight",
    "glora_delta",
    "glora_old_layout",
    "ia3_delta",
    "locon_tucker_delta",
    "loha_delta",
    "lokr_delta",
    "lokr_factors",
    "lora_delta",
    "lycoris_scale",
    "magnitude_on_output",
    "oft_weight",
    "orthogonal_delta",
    "rank_of",
    "unscaled_delta",
]
