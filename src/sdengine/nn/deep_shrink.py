"""Deep Shrink (kohya-ss's "Deep Shrink" high-resolution fix; ComfyUI's ``PatchModelAddDownscale``, Forge's "Kohya
HRFix Integrated"): while the noise level is high, the U-Net works on a smaller copy of its hidden state below one
input block, so that a large image gets the composition the model learned at its training size; the fine steps run
as usual.

The settings (:class:`DeepShrink`): ``block`` is an input block in ComfyUI's numbering of a U-Net's ``input_blocks``
(0 is ``conv_in``; then each level's layers in order, then its downsample: SD 1.x/2.x have blocks 1 to 11, SDXL 1 to
8; block 3 is the first downsample in both), ``factor`` what that block's output is divided by (the new size
``round(side * (1 / factor))`` of each side, at least 1), ``start`` / ``end`` the window of the sampling in
ComfyUI's percent of the schedule: a call at noise level ``sigma`` is patched when ``percent_to_sigma(end) <= sigma
<= percent_to_sigma(start)`` (:func:`sdengine.diffusion.schedules.percent_to_sigma` of the model's schedule; the
sigma of the call's first row, as ComfyUI reads it), ``after_skip`` whether the block's output is shrunk after it is
kept for its skip connection (the skip keeps the full size) or before, and the resize methods
(:data:`sdengine.nn.resize.RESIZE_METHODS`; ComfyUI's list, ``bicubic`` first).

In a patched call, wherever an up block meets a skip of another size (the first skip kept at full size), the hidden
state is resized to the skip's size with ``upscale_method`` before they are concatenated; an up block's own
upsample goes to the size of the next skip it meets, as the plain network's does. A resize to the size a tensor
already has is skipped, so factor 1 (or a factor close enough to 1 that no side changes) is the plain network, and
so is a call outside the window (``start`` after ``end``: no call).

:func:`deep_shrink_applied` switches the patch on a :class:`sdengine.models.unet.UNet` for a block of code (each
down block has a ``shrink`` slot and each up block a ``regrow`` slot; ``None``, the default, costs one attribute
test); :class:`DeepShrinkDenoiser` wraps a denoiser ``(x, sigma, **cond)`` and applies it to the calls whose sigma
is in the window.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion.schedules import percent_to_sigma
from sdengine.errors import UsageError
from sdengine.nn.resize import resize_nchw

# ComfyUI's choices for both methods (its node's order: bicubic first, the default)
DEEP_SHRINK_METHODS = ("bicubic", "nearest-exact", "bilinear", "area", "bislerp")
MIN_DEEP_SHRINK_FACTOR = 0.1  # ComfyUI's node range (below 1 the hidden state grows)
MAX_DEEP_SHRINK_FACTOR = 9.0
MAX_DEEP_SHRINK_BLOCK = 32  # ComfyUI's node range; the U-Net's own count decides (check_deep_shrink)
FIELDS = ("block", "factor", "start", "end", "after_skip", "downscale_method", "upscale_method")


def _number(name: str, v: Any, lo: float, hi: float) -> float:
    x = float(v) if isinstance(v, numbers.Real) and not isinstance(v, bool) else math.nan
    if not math.isfinite(x) or not lo <= x <= hi:
        raise UsageError(f"deep shrink {name} must be a number in [{lo:g}, {hi:g}], got {v!r}")
    return x


@dataclass(frozen=True)
class DeepShrink:
    """Deep Shrink settings (module docstring); the defaults are ComfyUI's node's and Forge's script's."""

    block: int = 3
    factor: float = 2.0
    start: float = 0.0
    end: float = 0.35
    after_skip: bool = True
    downscale_method: str = "bicubic"
    upscale_method: str = "bicubic"

    def __post_init__(self) -> None:
        b: Any = self.block
        if isinstance(b, numbers.Real) and not isinstance(b, bool) and float(b).is_integer():
            b = int(float(b))  # a slider's 3.0 (Forge's script takes int() of it), a NumPy integer
        if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= MAX_DEEP_SHRINK_BLOCK:
            raise UsageError(
                f"deep shrink block must be an input block number in [1, {MAX_DEEP_SHRINK_BLOCK}] (ComfyUI's "
                f"numbering: 3 is the first downsample), got {self.block!r}"
            )
        object.__setattr__(self, "block", b)
        factor = _number("factor", self.factor, MIN_DEEP_SHRINK_FACTOR, MAX_DEEP_SHRINK_FACTOR)
        object.__setattr__(self, "factor", factor)
        object.__setattr__(self, "start", _number("start", self.start, 0.0, 1.0))
        object.__setattr__(self, "end", _number("end", self.end, 0.0, 1.0))
        if not isinstance(self.after_skip, bool):
            raise UsageError(f"deep shrink after_skip must be true or false, got {self.after_skip!r}")
        for name in ("downscale_method", "upscale_method"):
            m = getattr(self, name)
            if not isinstance(m, str) or m not in DEEP_SHRINK_METHODS:
                raise UsageError(f"unknown deep shrink {name} {m!r}; use one of: {', '.join(DEEP_SHRINK_METHODS)}")

    @property
    def key(self) -> tuple[int, float, float, float, bool, str, str]:
        """The settings as plain values in :data:`FIELDS` order (``DeepShrink(*key)`` makes them again)."""
        return (
            self.block,
            self.factor,
            self.start,
            self.end,
            self.after_skip,
            self.downscale_method,
            self.upscale_method,
        )

    @classmethod
    def coerce(cls, value: Any) -> DeepShrink:
        """Settings from a :class:`DeepShrink`, a mapping of :data:`FIELDS` (missing ones take the defaults), or a
        sequence ``(block, factor[, start, end[, after_skip[, downscale_method[, upscale_method]]]])``."""
        if isinstance(value, DeepShrink):
            return value
        if isinstance(value, Mapping):
            unknown = [str(k) for k in value if k not in FIELDS]
            if unknown:
                raise UsageError(f"unknown deep shrink setting {unknown[0]!r}; the settings: {', '.join(FIELDS)}")
            return cls(**{str(k): v for k, v in value.items()})
        if isinstance(value, Sequence) and not isinstance(value, str | bytes) and len(value) in (2, 4, 5, 6, 7):
            return cls(*value)
        raise UsageError(
            "deep shrink takes (block, factor[, start, end[, after_skip, downscale_method, upscale_method]]) or a "
            f"mapping of {', '.join(FIELDS)}; got {repr(value)[:100]}"
        )

    def sigma_window(self, log_sigmas: Tensor) -> tuple[float, float]:
        """(sigma at ``start``, sigma at ``end``) on the schedule of ``log_sigmas``: a call is patched when its
        sigma lies between the two, both included (ComfyUI's rule)."""
        return percent_to_sigma(log_sigmas, self.start), percent_to_sigma(log_sigmas, self.end)


# Forge's "Kohya HRFix Integrated" infotext fields, in its order (its script's extra_generation_params)
INFOTEXT_FIELDS = (
    "kohya_hrfix_enabled",
    "kohya_hrfix_block_number",
    "kohya_hrfix_downscale_factor",
    "kohya_hrfix_start_percent",
    "kohya_hrfix_end_percent",
    "kohya_hrfix_downscale_after_skip",
    "kohya_hrfix_downscale_method",
    "kohya_hrfix_upscale_method",
)


def deep_shrink_infotext(settings: DeepShrink) -> dict[str, Any]:
    """The infotext fields of ``settings``: Forge's names and values (``kohya_hrfix_enabled: True``, the block an
    integer, the factor and percents as floats, after_skip True or False, the method names)."""
    return dict(zip(INFOTEXT_FIELDS, (True, *settings.key), strict=True))


def input_block_count(unet: Any) -> int:
    """How many input blocks ``unet`` has in ComfyUI's numbering (``conv_in`` included)."""
    return 1 + sum(len(b.resnets) + (b.downsamplers is not None) for b in unet.down_blocks)


def locate_input_block(unet: Any, block: int) -> tuple[int, int]:
    """(down block index, output index inside it: its layers' in order, then its downsample's) of input block
    ``block`` (1 or more) of ``unet``."""
    k = block - 1
    for i, b in enumerate(unet.down_blocks):
        n = len(b.resnets) + (b.downsamplers is not None)
        if k < n:
            return i, k
        k -= n
    raise UsageError(f"deep shrink block {block} is past the U-Net's last input block ({input_block_count(unet) - 1})")


def check_deep_shrink(unet: Any, settings: DeepShrink) -> None:
    """Raise (one line) when ``settings.block`` is not an input block of ``unet`` after ``conv_in``."""
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise UsageError(f"deep shrink needs a U-Net with down and up blocks, not a {type(unet).__name__}")
    last = input_block_count(unet) - 1
    if not 1 <= settings.block <= last:
        raise UsageError(
            f"deep shrink block {settings.block} is not an input block of this U-Net: it has blocks 1 to {last} "
            "(ComfyUI's numbering: 0 is conv_in, 3 the first downsample)"
        )


def shrunk_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """The (height, width) a hidden state of ``height`` x ``width`` is resized to: ``round(side * (1 / factor))``
    (ComfyUI's expression, Python's rounding), at least 1."""
    return max(1, round(height * (1.0 / factor))), max(1, round(width * (1.0 / factor)))


class _Shrink:
    def __init__(self, factor: float, method: str) -> None:
        self.factor, self.method = factor, method

    def __call__(self, x: Tensor) -> Tensor:
        h, w = shrunk_size(int(x.shape[-2]), int(x.shape[-1]), self.factor)
        if (h, w) == tuple(x.shape[-2:]):
            return x
        return resize_nchw(x, w, h, self.method)


class _Regrow:
    def __init__(self, method: str) -> None:
        self.method = method

    def __call__(self, x: Tensor, skip: Tensor) -> Tensor:
        if x.shape[-2:] == skip.shape[-2:]:
            return x
        return resize_nchw(x, int(skip.shape[-1]), int(skip.shape[-2]), self.method)


@contextmanager
def deep_shrink_applied(unet: Any, settings: DeepShrink | None) -> Iterator[None]:
    """``unet`` runs with ``settings``' patch in every call inside the block (``None``: as it is); restored after."""
    if settings is None:
        yield
        return
    check_deep_shrink(unet, settings)
    i, j = locate_input_block(unet, settings.block)
    down = unet.down_blocks[i]
    ups = list(unet.up_blocks)
    before = (down.shrink, [b.regrow for b in ups])
    try:
        down.shrink = (j, _Shrink(settings.factor, settings.downscale_method), settings.after_skip)
        regrow = _Regrow(settings.upscale_method)
        for b in ups:
            b.regrow = regrow
        yield
    finally:
        down.shrink = before[0]
        for b, old in zip(ups, before[1], strict=True):
            b.regrow = old


def first_sigma(sigma: Tensor | float) -> float:
    """The noise level of a call's first row (what ComfyUI's patch reads)."""
    return float(torch.as_tensor(sigma).reshape(-1)[0])


class DeepShrinkDenoiser:
    """``inner`` (a denoiser ``(x, sigma, **cond) -> x0`` over ``unet``: :class:`sdengine.diffusion.denoisers.Denoiser`
    or one that wraps it) with ``settings``' patch on ``unet`` for the calls whose sigma is in the window (read on the
    schedule ``inner.schedule``). What samplers read of a denoiser (``schedule``, ``prediction``, ``off_grid``,
    ``with_timesteps``, ``takes_step``, ``takes_row_kinds``) passes through."""

    def __init__(self, inner: Any, unet: Any, settings: DeepShrink) -> None:
        check_deep_shrink(unet, settings)
        self.inner, self.unet, self.settings = inner, unet, settings
        self.sigma_start, self.sigma_end = settings.sigma_window(inner.schedule.log_sigmas)

    def _over(self, inner: Any) -> DeepShrinkDenoiser:
        return DeepShrinkDenoiser(inner, self.unet, self.settings)

    def in_window(self, sigma: float) -> bool:
        """Whether a call at ``sigma`` is patched."""
        return self.sigma_end <= sigma <= self.sigma_start

    @property
    def schedule(self) -> Any:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return str(self.inner.prediction)

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.inner, "takes_step", False))

    @property
    def takes_row_kinds(self) -> bool:
        return bool(getattr(self.inner, "takes_row_kinds", False))

    @property
    def off_grid(self) -> DeepShrinkDenoiser:
        inner_off = getattr(self.inner, "off_grid", self.inner)
        return self if inner_off is self.inner else self._over(inner_off)

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> DeepShrinkDenoiser:
        if not hasattr(self.inner, "with_timesteps"):
            return self
        return self._over(self.inner.with_timesteps(sigmas, timesteps))

    def timestep(self, sigma: Tensor) -> Tensor:
        return self.inner.timestep(sigma)  # type: ignore[no-any-return]

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        if not self.in_window(first_sigma(sigma)):
            return self.inner(x, sigma, **cond)  # type: ignore[no-any-return]
        with deep_shrink_applied(self.unet, self.settings):
            return self.inner(x, sigma, **cond)  # type: ignore[no-any-return]


__all__ = [
    "DEEP_SHRINK_METHODS",
    "FIELDS",
    "INFOTEXT_FIELDS",
    "MAX_DEEP_SHRINK_BLOCK",
    "MAX_DEEP_SHRINK_FACTOR",
    "MIN_DEEP_SHRINK_FACTOR",
    "DeepShrink",
    "DeepShrinkDenoiser",
    "check_deep_shrink",
    "deep_shrink_applied",
    "deep_shrink_infotext",
    "first_sigma",
    "input_block_count",
    "locate_input_block",
    "shrunk_size",
]
