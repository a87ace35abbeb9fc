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

A chain (ComfyUI's chained ``PatchModelAddDownscale`` nodes: a sequence of settings, first node first) stacks, as
ComfyUI's patch lists do: in a call, every setting whose window holds the call's sigma shrinks its block; at one
block the settings shrinking before the skip run first (chain order), then the skip is kept, then those shrinking
after it (chain order); where an up block meets a skip of another size, the hidden state is resized with the
*first* setting's ``upscale_method`` (ComfyUI's first output patch does the resize, the later ones then see equal
sizes), whichever settings shrank in that call. A call with two or more settings in their windows runs them
through forward hooks on the blocks' layers (a "before" setting on the layer that makes its block's output, an
"after" one on the layer that takes it next), as a down block's single slot holds one.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
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
        if isinstance(value, Sequence) and value and isinstance(value[0], DeepShrink | Mapping | list | tuple):
            raise UsageError(
                "deep shrink here takes one setting, not a chain of them (chained settings stack in ComfyUI's "
                "PatchModelAddDownscale nodes and sdengine.nn.deep_shrink.deep_shrink_applied)"
            )
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


MAX_DEEP_SHRINK_CHAIN = 16  # chained PatchModelAddDownscale nodes sdengine takes (a bound on one call's hooks)


def _setting_like(v: Any) -> bool:
    return isinstance(v, DeepShrink | Mapping) or (isinstance(v, Sequence) and not isinstance(v, str | bytes))


def deep_shrink_chain(value: Any) -> tuple[DeepShrink, ...]:
    """The settings of ``value`` as a chain, first applied first: one setting (what :meth:`DeepShrink.coerce`
    takes) is a chain of one; a non-empty sequence of settings (each a :class:`DeepShrink`, a mapping or a key) is
    ComfyUI's chained nodes in order; ``None`` or an empty sequence is no chain (``()``)."""
    if value is None or (isinstance(value, Sequence) and not isinstance(value, str | bytes) and len(value) == 0):
        return ()
    if isinstance(value, DeepShrink | Mapping) or not _setting_like(value[0]):  # a key starts with its block
        return (DeepShrink.coerce(value),)
    if len(value) > MAX_DEEP_SHRINK_CHAIN:
        raise UsageError(f"at most {MAX_DEEP_SHRINK_CHAIN} chained deep shrink settings, got {len(value)}")
    return tuple(DeepShrink.coerce(v) for v in value)


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


def check_deep_shrink(unet: Any, settings: DeepShrink | Sequence[DeepShrink]) -> None:
    """Raise (one line) when the block of ``settings`` (one, or each of a chain) is not an input block of ``unet``
    after ``conv_in``."""
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks"):
        raise UsageError(f"deep shrink needs a U-Net with down and up blocks, not a {type(unet).__name__}")
    last = input_block_count(unet) - 1
    for s in deep_shrink_chain(settings):
        if not 1 <= s.block <= last:
            raise UsageError(
                f"deep shrink block {s.block} is not an input block of this U-Net: it has blocks 1 to {last} "
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


def _in_turn(resizes: list[Callable[[Tensor], Tensor]]) -> Callable[[Tensor], Tensor]:
    def run(x: Tensor) -> Tensor:
        for r in resizes:
            x = r(x)
        return x

    return run


def block_layers(unet: Any) -> list[tuple[Any, Any]]:
    """For input block k = 1, 2, ... of ``unet`` (item k - 1): (the layer whose output is that block's output, the
    layer the output goes into next: the block's next layer, the next down block, the middle block or, without
    one, the first up block)."""
    made: list[Any] = []
    takes: list[Any] = []
    for b in unet.down_blocks:
        for j in range(len(b.resnets)):
            made.append(b.attentions[j] if b.attentions is not None else b.resnets[j])
            takes.append(b.resnets[j + 1] if j + 1 < len(b.resnets) else None)
        if b.downsamplers is not None:
            made.append(b.downsamplers[0])
            takes.append(None)
    k = 0
    for i, b in enumerate(unet.down_blocks):
        n = len(b.resnets) + (b.downsamplers is not None)
        if b.downsamplers is not None:
            takes[k + n - 2] = b.downsamplers[0]  # the last layer's output goes into the downsample
        nxt = unet.down_blocks[i + 1] if i + 1 < len(unet.down_blocks) else unet.mid_block
        takes[k + n - 1] = nxt if nxt is not None else unet.up_blocks[0]
        k += n
    return list(zip(made, takes, strict=True))


@contextmanager
def _hooked(unet: Any, chain: Sequence[DeepShrink]) -> Iterator[None]:
    """Every setting of ``chain`` shrinks its block in the calls inside the block, through forward hooks."""
    layers = block_layers(unet)
    before: dict[int, list[Callable[[Tensor], Tensor]]] = {}
    after: dict[int, list[Callable[[Tensor], Tensor]]] = {}
    for s in chain:
        (after if s.after_skip else before).setdefault(s.block, []).append(_Shrink(s.factor, s.downscale_method))
    handles = []
    try:
        for block, resizes in before.items():
            run = _in_turn(resizes)
            handles.append(layers[block - 1][0].register_forward_hook(lambda _m, _a, out, run=run: run(out)))
        for block, resizes in after.items():
            run = _in_turn(resizes)
            handles.append(
                layers[block - 1][1].register_forward_pre_hook(lambda _m, args, run=run: (run(args[0]), *args[1:]))
            )
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def deep_shrink_applied(unet: Any, settings: DeepShrink | Sequence[DeepShrink] | None) -> Iterator[None]:
    """``unet`` runs with the patch of ``settings`` (one, or a chain: all of it, stacked as the module docstring
    says) in every call inside the block (``None`` or an empty chain: as it is); restored after."""
    chain = deep_shrink_chain(settings)
    if not chain:
        yield
        return
    check_deep_shrink(unet, chain)
    first = chain[0]
    i, j = locate_input_block(unet, first.block)
    down = unet.down_blocks[i]
    ups = list(unet.up_blocks)
    before = (down.shrink, [b.regrow for b in ups])
    try:
        regrow = _Regrow(first.upscale_method)  # ComfyUI: the first output patch resizes, the later see equal sizes
        for b in ups:
            b.regrow = regrow
        if len(chain) == 1:
            down.shrink = (j, _Shrink(first.factor, first.downscale_method), first.after_skip)
            yield
        else:
            with _hooked(unet, chain):
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
    or one that wraps it) with the patch of ``settings`` (one, or a chain: module docstring) on ``unet`` for the calls
    whose sigma is in a setting's window (read on the schedule ``inner.schedule``); a chain's calls run the settings
    whose windows hold their sigma. What samplers read of a denoiser (``schedule``, ``prediction``, ``off_grid``,
    ``with_timesteps``, ``takes_step``, ``takes_row_kinds``) passes through."""

    def __init__(self, inner: Any, unet: Any, settings: DeepShrink | Sequence[DeepShrink]) -> None:
        chain = deep_shrink_chain(settings)
        if not chain:
            raise UsageError("deep shrink needs at least one setting")
        check_deep_shrink(unet, chain)
        self.inner, self.unet, self.chain = inner, unet, chain
        self.windows = [s.sigma_window(inner.schedule.log_sigmas) for s in chain]

    def _over(self, inner: Any) -> DeepShrinkDenoiser:
        return DeepShrinkDenoiser(inner, self.unet, self.chain)

    def active(self, sigma: float) -> tuple[DeepShrink, ...]:
        """The settings that patch a call at ``sigma``, in chain order."""
        return tuple(s for s, (hi, lo) in zip(self.chain, self.windows, strict=True) if lo <= sigma <= hi)

    def in_window(self, sigma: float) -> bool:
        """Whether a call at ``sigma`` is patched."""
        return bool(self.active(sigma))

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
        active = self.active(first_sigma(sigma))
        if not active:
            return self.inner(x, sigma, **cond)  # type: ignore[no-any-return]
        first = self.chain[0]
        if active[0] is not first:  # the chain's first setting still does the resizing up (ComfyUI's output patch)
            active = (DeepShrink(*active[0].key[:-1], first.upscale_method), *active[1:])
        with deep_shrink_applied(self.unet, active):
            return self.inner(x, sigma, **cond)  # type: ignore[no-any-return]


__all__ = [
    "DEEP_SHRINK_METHODS",
    "FIELDS",
    "INFOTEXT_FIELDS",
    "MAX_DEEP_SHRINK_BLOCK",
    "MAX_DEEP_SHRINK_CHAIN",
    "MAX_DEEP_SHRINK_FACTOR",
    "MIN_DEEP_SHRINK_FACTOR",
    "DeepShrink",
    "DeepShrinkDenoiser",
    "block_layers",
    "check_deep_shrink",
    "deep_shrink_applied",
    "deep_shrink_chain",
    "deep_shrink_infotext",
    "first_sigma",
    "input_block_count",
    "locate_input_block",
    "shrunk_size",
]
