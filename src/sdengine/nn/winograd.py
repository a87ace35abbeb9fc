"""Winograd convolution F(4x4, 3x3): the U-Net's 3x3 convolutions with 4x fewer multiplications on the CPU.

A 3x3 convolution computes each output pixel with 9 multiply-adds per input channel. Winograd's minimal
filtering (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2015) computes a 4x4 block of
outputs from the 6x6 input tile that covers it with 36 multiplications instead of 4*4*9 = 144:

    Y = A^T [ (G g G^T) * (B^T d B) ] A

``g`` is the 3x3 filter, ``d`` the 6x6 input tile, ``*`` the element-wise product and ``B``, ``G``, ``A`` fixed
small matrices (the interpolation points 0, 1, -1, 2, -2 and infinity). Summed over input channels, the
element-wise products become 36 independent matrix products, one per position in the 6x6 tile:

    M[p] = V[p] @ U[p]       V[p]: (tiles, C_in) input transform     U[p]: (C_in, C_out) filter transform

so the work moves from a direct convolution into 36 GEMMs of a quarter of its multiply-adds, plus the two
transforms, which are memory-bound passes over the input and output. They cost about as much as the saved
arithmetic when the channel counts are small or the image is large, so a layer is worth converting only when
its channels are many (:func:`worth_it`, measured: docs/performance.md). The filter transform ``U`` (4x the
filters' memory) is cached on the layer within a memory budget (:class:`CacheBudget`), else recomputed per call
where that still pays.

Precision: in fp32 the result's error against a float64 convolution is a few times the direct fp32
convolution's own (about 1e-5 of the output's scale at most; tests/test_winograd.py): the transforms' entries
go up to 8 (and 1/24 in ``G``), so their rounding is amplified a little.

The fast path is for fp32 inference on the CPU: on CUDA, cuDNN chooses its own algorithms (Winograd among
them); under autograd (training) the direct convolution runs, because the cached filter transform is not
differentiable with respect to the weight.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from sdengine.errors import UsageError

TILE = 4  # outputs per tile side
ALPHA = TILE + 2  # input tile side: 4 outputs of a 3-wide filter
# Smallest channel "harmonic mean" C_in*C_out/(C_in+C_out) for which a layer is converted: the GEMM saving
# grows with C_in*C_out, the transforms with C_in + C_out (docs/performance.md has the per-shape timings).
MIN_CHANNELS = 150
# Smallest image side (in the layer's input) for which it runs: below it the direct convolution is cheap
# anyway, and a tile of 4 would be mostly padding.
MIN_SIDE = 8

# The F(4x4, 3x3) matrices for the points 0, 1, -1, 2, -2 (and infinity), in float64.
_BT = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
_G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
_AT = (
    (1, 1, 1, 1, 1, 0),
    (0, 1, -1, 2, -2, 0),
    (0, 1, 1, 4, 4, 0),
    (0, 1, -1, 8, -8, 1),
)


def _matrices() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bt = torch.tensor(_BT, dtype=torch.float64)
    g = torch.tensor(_G, dtype=torch.float64)
    at = torch.tensor(_AT, dtype=torch.float64)
    return bt, g, at


_BT64, _G64, _AT64 = _matrices()
# The 2-D transforms as one matrix each: vec(B^T d B) = (B^T kron B^T) vec(d), so a whole batch of tiles
# is transformed by one (36 x 36) @ (36 x tiles*channels) GEMM instead of many small ones.
_B2 = torch.kron(_BT64, _BT64).float()  # (36, 36)
_A2 = torch.kron(_AT64, _AT64).float()  # (16, 36)


# vec(G g G^T) = (G kron G) vec(g): every filter's transform is one row of a (filters x 9) @ (9 x 36) GEMM.
_G2 = torch.kron(_G64, _G64).float()  # (36, 9)


def transform_filter(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) filters -> U, (36, C_out, C_in) fp32: ``G g G^T`` of every filter, one GEMM."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd F(4x4,3x3) needs 3x3 filters, got shape {tuple(weight.shape)}")
    k, c = weight.shape[0], weight.shape[1]
    g = weight.detach().float().reshape(k * c, 9)
    return (_G2.to(weight.device) @ g.t()).view(ALPHA * ALPHA, k, c)


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, of ``x`` (N, C_in, H, W) with the transformed filters
    ``u`` (:func:`transform_filter`); returns (N, C_out, H, W) contiguous, as ``F.conv2d`` would."""
    n, c, h, w = x.shape
    k = u.shape[1]
    th, tw = -(-h // TILE), -(-w // TILE)  # tiles per column / row (the last ones padded)
    # Channels last and zero-padded: every tile's pixels are then C-contiguous rows.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * TILE + 1 - w, 1, th * TILE + 1 - h))
    hp, wp = xp.shape[1], xp.shape[2]
    # The 36 tile positions as leading dimensions: (6, 6, N, th, tw, C), overlapping tiles by strides.
    tiles = xp.as_strided((ALPHA, ALPHA, n, th, tw, c), (wp * c, c, hp * wp * c, TILE * wp * c, TILE * c, 1)).reshape(
        ALPHA * ALPHA, -1
    )
    v = (_B2.to(x.device) @ tiles).view(ALPHA * ALPHA, n * th * tw, c)  # input transform
    m = torch.bmm(v, u.transpose(1, 2))  # the 36 GEMMs: (36, tiles, C_out); BLAS reads u transposed
    y = (_A2.to(x.device) @ m.view(ALPHA * ALPHA, -1)).view(TILE, TILE, n, th, tw, k)  # output transform
    # (4, 4, N, th, tw, K) -> (N, K, th, 4, tw, 4), adding the bias in the same pass.
    out = x.new_empty((n, k, th, TILE, tw, TILE))
    yp = y.permute(2, 5, 3, 0, 4, 1)
    if bias is None:
        out.copy_(yp)
    else:
        torch.add(yp, bias.view(1, k, 1, 1, 1, 1), out=out)
    out = out.view(n, k, th * TILE, tw * TILE)
    if th * TILE != h or tw * TILE != w:
        out = out[:, :, :h, :w].contiguous()
    return out


def convertible(conv: nn.Module) -> bool:
    """Whether a layer is a plain 3x3, stride-1, padding-1, ungrouped, zero-padded ``nn.Conv2d``."""
    return (
        isinstance(conv, nn.Conv2d)
        and tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.stride) == (1, 1)
        and conv.padding in ((1, 1), "same")
        and tuple(conv.dilation) == (1, 1)
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def worth_it(conv: nn.Conv2d, min_channels: float = MIN_CHANNELS) -> bool:
    """Convertible and with enough channels for the saved multiplications to pay for the transforms."""
    cin, cout = conv.in_channels, conv.out_channels
    return convertible(conv) and cin * cout / (cin + cout) >= min_channels


class CacheBudget:
    """How many bytes of filter transforms all converted layers together may keep.

    A transform ``U`` is 4x its filters (36 numbers per 9): caching every layer of SD 1.5's U-Net would hold
    8.4 GB beside its 3.4 GB of weights. So the cache has a budget (``$SDENGINE_WINOGRAD_CACHE_MB``, default
    :data:`DEFAULT_CACHE_MB`), and a layer that does not fit in
    it recomputes ``U`` at each call when the call's work (batch x pixels) is large enough for that to pay
    (:data:`MIN_WORK_PER_CALL`), and runs the direct convolution otherwise. Layers ask in the order they run,
    only in the range of work where a cache entry saves the most (:data:`MIN_WORK_TO_CACHE`,
    :data:`MAX_WORK_TO_CACHE`)."""

    def __init__(self) -> None:
        self.layers: weakref.WeakSet[WinogradConv2d] = weakref.WeakSet()

    @staticmethod
    def limit() -> int:
        return cache_limit_bytes()

    def used(self) -> int:
        return sum(layer.cached_bytes() for layer in list(self.layers))

    def fits(self, nbytes: int) -> bool:
        return self.used() + nbytes <= self.limit()


CACHE_ENV = "SDENGINE_WINOGRAD_CACHE_MB"
# The option is off by default (sdengine.fastpath); who turns it on trades memory for speed, and the cache is
# where the speed is: SD 1.5's U-Net step at 512x512 is 1.24x faster with 3.9 GB cached, 1.06x with 0.5 GB,
# about 1.0x with none (docs/performance.md). 4 GiB holds SD 1.5's transforms at 512x512.
DEFAULT_CACHE_MB = 4096.0
# Batch x output pixels from which a layer without a cached transform still gains by recomputing it per call
# (measured at 2 threads: 320->320 channels at 2x64x64 1.67x, 640->640 at 2x32x32 1.30x, 1280->1280 at 2x16x16
# 0.56x): the transform writes 36 numbers per filter pair, the saving grows with the pixels.
MIN_WORK_PER_CALL = 2 * 32 * 32
# The range of batch x output pixels in which a layer asks for a cache entry. Recomputing U costs in proportion
# to the filters, the convolution in proportion to filters x pixels: from 4x MIN_WORK_PER_CALL the per-call
# transform is a few per cent of the call (320->320 at 2x64x64: 1.67x per call against 1.76x cached), so the
# budget goes to the middle sizes, where the cache saves the most per byte (640->640 at 2x32x32: 2.47x cached,
# 1.30x per call); below MIN_WORK_TO_CACHE the saving is too small for 4x the filters' memory.
MIN_WORK_TO_CACHE = 2 * 16 * 16
MAX_WORK_TO_CACHE = 4 * MIN_WORK_PER_CALL
BUDGET = CacheBudget()


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict, same hooks) whose fp32 CPU inference runs
    :func:`winograd_conv3x3`. Layers are converted in place by :func:`enable_winograd`.

    The filter transform is cached (within :data:`BUDGET`) with the identity and version of the weight tensor it
    came from (and a reference to it, so its memory cannot be reused by another tensor while the cache stands):
    replacing the weight (``weight.data = ...``, as LoRA fusing does), moving the module or changing it in place
    through autograd-visible ops recomputes it. Changing ``weight.data`` in place bypasses the version counter,
    as it does for autograd; call :meth:`clear_cache` after doing that.
    """

    _winograd_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def clear_cache(self) -> None:
        self._winograd_cache = None

    def cached_bytes(self) -> int:
        c = self._winograd_cache
        return 0 if c is None else c[2].numel() * c[2].element_size()

    def _filters(self, work: int) -> torch.Tensor | None:
        """U for a call whose batch x pixels is ``work``, or None for the direct convolution."""
        w = self.weight
        cached = self._winograd_cache
        if cached is not None and not w.is_inference():
            if cached[0].data_ptr() == w.data_ptr() and cached[1] == w._version:
                return cached[2]
            self._winograd_cache = cached = None  # stale: the weight changed
        nbytes = ALPHA * ALPHA * w.shape[0] * w.shape[1] * 4
        # inference tensors have no version counter (a change could not be seen): never cached
        cacheable = MIN_WORK_TO_CACHE <= work < MAX_WORK_TO_CACHE and not w.is_inference()
        if cacheable and BUDGET.fits(nbytes):
            u = transform_filter(w)
            self._winograd_cache = (w.detach(), w._version, u)
            BUDGET.layers.add(self)
            return u
        if work >= MIN_WORK_PER_CALL:
            return transform_filter(w)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type == "cpu"
            and self.padding_mode == "zeros"  # circular (A1111's tiling) pads itself: the plain convolution
            and x.dim() == 4
            and min(x.shape[2], x.shape[3]) >= MIN_SIDE
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            u = self._filters(x.shape[0] * x.shape[2] * x.shape[3])
            if u is not None:
                return winograd_conv3x3(x, u, self.bias)
        return super().forward(x)


def _convs(model: nn.Module) -> Iterator[nn.Conv2d]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            yield m


def cache_limit_bytes() -> int:
    """The cache budget ``$SDENGINE_WINOGRAD_CACHE_MB`` sets (default :data:`DEFAULT_CACHE_MB`), in bytes. A value
    that is not a number of MiB >= 0 is a :class:`~sdengine.errors.UsageError` (``2G`` once meant the 4 GiB
    default without a word, to someone capping the memory)."""
    raw = os.environ.get(CACHE_ENV, "").strip()
    try:
        mb = float(raw) if raw else DEFAULT_CACHE_MB
    except ValueError:
        mb = math.nan
    if not (math.isfinite(mb) and mb >= 0):
        raise UsageError(f"{CACHE_ENV} must be a number of MiB >= 0 (0 caches nothing), got {raw!r}")
    return int(mb * 2**20)


def enable_winograd(model: nn.Module, min_channels: float = MIN_CHANNELS) -> int:
    """Convert every layer of ``model`` that is :func:`worth_it` to :class:`WinogradConv2d`, in place (the
    class of the module object changes; its parameters, buffers and hooks stay). Returns how many. A bad
    ``$SDENGINE_WINOGRAD_CACHE_MB`` fails here, when the option is applied, not in the middle of a generation."""
    cache_limit_bytes()
    count = 0
    for conv in _convs(model):
        if type(conv) is nn.Conv2d and worth_it(conv, min_channels):
            conv.__class__ = WinogradConv2d
            count += 1
    return count


def disable_winograd(model: nn.Module) -> int:
    """Turn the converted layers of ``model`` back into plain ``nn.Conv2d``; returns how many."""
    count = 0
    for conv in _convs(model):
        if isinstance(conv, WinogradConv2d):
            conv.__dict__.pop("_winograd_cache", None)
            plain: nn.Module = conv
            plain.__class__ = nn.Conv2d
            count += 1
    return count
