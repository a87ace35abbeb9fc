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
its channels are many (:func:`worth_it`, measured: docs/performance.md). The filter transform ``U`` is
computed once per weight and cached on the layer.

Precision: in fp32 the result differs from a direct convolution by about twice the direct convolution's own
rounding error (both measured against float64 in tests/test_winograd.py); the tiles' transforms are exact in
binary floating point except for the 1/6 and 1/24 of ``G``.

The fast path is for fp32 inference on the CPU: on CUDA, cuDNN chooses its own algorithms (Winograd among
them); under autograd (training) the direct convolution runs, because the cached filter transform is not
differentiable with respect to the weight.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

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


def transform_filter(weight: torch.Tensor) -> torch.Tensor:
    """(C_out, C_in, 3, 3) filters -> U, (36, C_in, C_out) fp32: ``G g G^T`` per filter, in float64."""
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd F(4x4,3x3) needs 3x3 filters, got shape {tuple(weight.shape)}")
    g = _G64.to(weight.device)
    u = torch.einsum("ai,kcij,bj->abck", g, weight.detach().double(), g)  # (6, 6, C_in, C_out)
    return u.reshape(ALPHA * ALPHA, weight.shape[1], weight.shape[0]).float().contiguous()


def winograd_conv3x3(x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A 3x3 convolution, stride 1, zero padding 1, of ``x`` (N, C_in, H, W) with the transformed filters
    ``u`` (:func:`transform_filter`); returns (N, C_out, H, W) contiguous, as ``F.conv2d`` would."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = -(-h // TILE), -(-w // TILE)  # tiles per column / row (the last ones padded)
    # Channels last and zero-padded: every tile's pixels are then C-contiguous rows.
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 1, tw * TILE + 1 - w, 1, th * TILE + 1 - h))
    hp, wp = xp.shape[1], xp.shape[2]
    # The 36 tile positions as leading dimensions: (6, 6, N, th, tw, C), overlapping tiles by strides.
    tiles = xp.as_strided((ALPHA, ALPHA, n, th, tw, c), (wp * c, c, hp * wp * c, TILE * wp * c, TILE * c, 1)).reshape(
        ALPHA * ALPHA, -1
    )
    v = (_B2.to(x.device) @ tiles).view(ALPHA * ALPHA, n * th * tw, c)  # input transform
    m = torch.bmm(v, u)  # the 36 GEMMs: (36, tiles, C_out)
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


class WinogradConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters, same state dict, same hooks) whose fp32 CPU inference runs
    :func:`winograd_conv3x3`. Layers are converted in place by :func:`enable_winograd`.

    The filter transform is cached with the identity and version of the weight tensor it came from (and a
    reference to it, so its memory cannot be reused by another tensor while the cache stands): replacing the
    weight (``weight.data = ...``, as LoRA fusing does), moving the module or changing it in place through
    autograd-visible ops recomputes it. Changing ``weight.data`` in place bypasses the version counter, as it
    does for autograd; call :meth:`clear_cache` after doing that.
    """

    _winograd_cache: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def clear_cache(self) -> None:
        self._winograd_cache = None

    def _filters(self) -> torch.Tensor | None:
        w = self.weight
        if w.is_inference():  # no version counter: a change could not be seen, so do not cache
            return None
        cached = self._winograd_cache
        if cached is not None and cached[0].data_ptr() == w.data_ptr() and cached[1] == w._version:
            return cached[2]
        u = transform_filter(w)
        self._winograd_cache = (w.detach(), w._version, u)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type == "cpu"
            and x.dim() == 4
            and min(x.shape[2], x.shape[3]) >= MIN_SIDE
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            u = self._filters()
            if u is not None:
                return winograd_conv3x3(x, u, self.bias)
        return super().forward(x)


def _convs(model: nn.Module) -> Iterator[nn.Conv2d]:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            yield m


def enable_winograd(model: nn.Module, min_channels: float = MIN_CHANNELS) -> int:
    """Convert every layer of ``model`` that is :func:`worth_it` to :class:`WinogradConv2d`, in place (the
    class of the module object changes; its parameters, buffers and hooks stay). Returns how many."""
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
            conv.__class__ = nn.Conv2d
            count += 1
    return count
