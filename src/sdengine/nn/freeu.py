"""FreeU (Si et al. 2023, "FreeU: Free Lunch in Diffusion U-Net"): at the skip concatenations of a U-Net's up blocks,
a backbone factor ``b`` on the first half of the hidden state's channels and a factor ``s`` on the lowest frequencies
of the skip features. It has no weights; it changes how the decoder mixes the two.

The skip filter: the 2-D FFT of the skip (in float32 whatever the network's dtype; torch makes complex32 of half
input), shifted so the zero frequency is at ``(H // 2, W // 2)``, the ``2 x 2`` square there (threshold 1) times
``s``, back by the inverse FFT, its real part in the skip's dtype.

The backbone factor: version 1 multiplies the first ``C // 2`` channels by ``b``; version 2 (the authors' later
code, ComfyUI's FreeU_V2, Forge's FreeU) by ``1 + (b - 1) * m``, where ``m`` (B, 1, H, W) is the channel mean of the
hidden state min-max normalised over each sample's pixels (a sample whose mean is flat gets ``m = 0``: factor 1,
where ComfyUI divides by zero).

Which concatenations, ``rule``:

- ``"width"`` (the authors' code, ComfyUI, Forge): where the hidden state has 4x the first level's channels (1280 in
  SD 1.x/2.x and SDXL), ``(b1, s1)``; where it has 2x (640), ``(b2, s2)``; others none.
- ``"diffusers"`` (``UNet2DConditionModel.enable_freeu``): every concatenation of the first up block (the lowest
  resolution) ``(b1, s1)``, of the second ``(b2, s2)``. In SD 1.x/2.x both of those blocks are 1280 wide, so this
  differs from the width rule there.

:func:`freeu_applied` switches it on a :class:`sdengine.models.unet.UNet` for a block of code (each up block calls
its ``freeu`` in place of the plain concatenation; ``None``, the default, costs one attribute test);
:class:`FreeUNet` wraps a network call in it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import UsageError

FREEU_VERSIONS = (1, 2)
FREEU_RULES = ("width", "diffusers")
MAX_FREEU_FACTOR = 10.0  # ComfyUI's node range is [0, 10]
# the usual values (the FreeU authors' tables; ComfyUI's FreeU_V2 defaults are the SDXL row)
FREEU_PRESETS: dict[str, tuple[float, float, float, float]] = {
    "sd1": (1.5, 1.6, 0.9, 0.2),
    "sd2": (1.4, 1.6, 0.9, 0.2),
    "sdxl": (1.3, 1.4, 0.9, 0.2),
}


@dataclass(frozen=True)
class FreeU:
    """The FreeU settings of a call: backbone factors ``b1``, ``b2``, skip factors ``s1``, ``s2`` (each in
    [0, 10]; 1 leaves that part as it is), ``version`` 1 or 2, ``rule`` "width" or "diffusers" (module docstring)."""

    b1: float
    b2: float
    s1: float
    s2: float
    version: int = 2
    rule: str = "width"

    def __post_init__(self) -> None:
        for name in ("b1", "b2", "s1", "s2"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise UsageError(f"FreeU {name} must be a finite number, got {v!r}")
            if not 0.0 <= v <= MAX_FREEU_FACTOR:
                raise UsageError(f"FreeU {name} must be in [0, {MAX_FREEU_FACTOR:g}], got {v!r}")
            object.__setattr__(self, name, float(v))
        if isinstance(self.version, bool) or self.version not in FREEU_VERSIONS:
            raise UsageError(f"FreeU version must be 1 or 2, got {self.version!r}")
        if self.rule not in FREEU_RULES:
            raise UsageError(f"unknown FreeU rule {self.rule!r}; use one of: {', '.join(FREEU_RULES)}")

    @property
    def key(self) -> tuple[float, float, float, float, int, str]:
        """(b1, b2, s1, s2, version, rule): the settings as plain values (``FreeU(*key)`` makes them again)."""
        return (self.b1, self.b2, self.s1, self.s2, self.version, self.rule)

    @property
    def factors(self) -> tuple[float, float, float, float]:
        """(b1, b2, s1, s2)."""
        return (self.b1, self.b2, self.s1, self.s2)


def fourier_filter(x: Tensor, scale: float, threshold: int = 1) -> Tensor:
    """``x`` (B, C, H, W) with its centred ``2 * threshold`` square of shifted FFT frequencies times ``scale``,
    computed in float32, returned in ``x``'s dtype."""
    dims = (-2, -1)
    freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=dims), dim=dims)
    ch, cw = freq.shape[-2] // 2, freq.shape[-1] // 2
    freq[..., ch - threshold : ch + threshold, cw - threshold : cw + threshold] *= scale
    return torch.fft.ifftn(torch.fft.ifftshift(freq, dim=dims), dim=dims).real.to(x.dtype)


def backbone_factor(h: Tensor, b: float, version: int) -> Tensor | float:
    """What the first half of ``h``'s channels is multiplied by: ``b`` (version 1), or (version 2) the
    (B, 1, H, W) ``1 + (b - 1) * m`` of the min-max normalised channel mean ``m``, in ``h``'s dtype."""
    if version == 1:
        return b
    m = h.float().mean(dim=1, keepdim=True)  # (B, 1, H, W)
    flat = m.flatten(1)
    lo = flat.amin(dim=1).view(-1, 1, 1, 1)
    span = flat.amax(dim=1).view(-1, 1, 1, 1) - lo
    m = (m - lo) / torch.where(span > 0, span, torch.ones_like(span))
    return (1.0 + (b - 1.0) * m).to(h.dtype)


def freeu_concat(h: Tensor, skip: Tensor, b: float, s: float, version: int) -> Tensor:
    """``cat([h, skip], dim=1)`` with FreeU's backbone factor ``b`` on ``h`` and skip factor ``s`` on ``skip``."""
    half = h.shape[1] // 2
    if not (version == 1 and b == 1.0):
        h = torch.cat([h[:, :half] * backbone_factor(h, b, version), h[:, half:]], dim=1)
    if s != 1.0:
        skip = fourier_filter(skip, s)
    return torch.cat([h, skip], dim=1)


class _Stage:
    """An up block's concatenation: the factors of its stage, or (width rule) chosen by the hidden state's width."""

    def __init__(self, table: dict[int, tuple[float, float]], version: int, fixed: bool) -> None:
        self.table, self.version, self.fixed = table, version, fixed

    def __call__(self, h: Tensor, skip: Tensor) -> Tensor:
        bs = next(iter(self.table.values())) if self.fixed else self.table.get(int(h.shape[1]))
        if bs is None:
            return torch.cat([h, skip], dim=1)
        return freeu_concat(h, skip, bs[0], bs[1], self.version)


def _concat_widths(unet: Any) -> list[tuple[int, ...]]:
    """The hidden state's width at each skip concatenation, per up block (in order)."""
    return [tuple(block.concat_widths) for block in unet.up_blocks]


def _stages(unet: Any, settings: FreeU) -> list[_Stage | None]:
    b1, b2, s1, s2 = settings.factors
    n = len(unet.up_blocks)
    if settings.rule == "diffusers":
        stages: list[_Stage | None] = [None] * n
        for i, pair in enumerate(((b1, s1), (b2, s2))[:n]):
            stages[i] = _Stage({0: pair}, settings.version, fixed=True)
        return stages
    base = int(unet.config.block_out_channels[0])
    table = {4 * base: (b1, s1), 2 * base: (b2, s2)}
    return [_Stage(table, settings.version, fixed=False) for _ in range(n)]


def freeu_stage_count(unet: Any, settings: FreeU) -> int:
    """How many skip concatenations of ``unet`` FreeU changes under ``settings.rule``."""
    if settings.rule == "diffusers":
        return sum(len(block.resnets) for block in list(unet.up_blocks)[:2])
    base = int(unet.config.block_out_channels[0])
    return sum(w in (4 * base, 2 * base) for widths in _concat_widths(unet) for w in widths)


def check_freeu(unet: Any, settings: FreeU) -> None:
    """Raise (one line) when FreeU would change nothing in ``unet`` (no up block of the widths its rule picks)."""
    if not hasattr(unet, "up_blocks"):
        raise UsageError(f"FreeU needs a U-Net with up blocks, not a {type(unet).__name__}")
    if freeu_stage_count(unet, settings) == 0:
        base = int(unet.config.block_out_channels[0])
        raise UsageError(
            f"FreeU changes no up block of this U-Net: none of its hidden states is {4 * base} or {2 * base} "
            f"channels wide (4x and 2x its first level's {base}); try freeu rule 'diffusers'"
        )


@contextmanager
def freeu_applied(unet: Any, settings: FreeU | None) -> Iterator[None]:
    """``unet``'s up blocks run FreeU with ``settings`` inside the block (``None``: as they are); restored after."""
    if settings is None:
        yield
        return
    check_freeu(unet, settings)
    blocks = list(unet.up_blocks)
    before = [block.freeu for block in blocks]
    try:
        for block, stage in zip(blocks, _stages(unet, settings), strict=True):
            block.freeu = stage
        yield
    finally:
        for block, old in zip(blocks, before, strict=True):
            block.freeu = old


class FreeUNet:
    """``net`` (the U-Net, or what calls it: a controlled U-Net) called with FreeU on ``unet`` for each call."""

    def __init__(self, net: Callable[..., Tensor], unet: Any, settings: FreeU) -> None:
        check_freeu(unet, settings)
        self.net, self.unet, self.settings = net, unet, settings
        # what UNetAdapter asks of the network it calls
        self.takes_step = bool(getattr(net, "takes_step", False))
        self.takes_row_kinds = bool(getattr(net, "takes_row_kinds", False))

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        with freeu_applied(self.unet, self.settings):
            return self.net(*args, **kwargs)


__all__ = [
    "FREEU_PRESETS",
    "FREEU_RULES",
    "FREEU_VERSIONS",
    "MAX_FREEU_FACTOR",
    "FreeU",
    "FreeUNet",
    "backbone_factor",
    "check_freeu",
    "fourier_filter",
    "freeu_applied",
    "freeu_concat",
    "freeu_stage_count",
]
