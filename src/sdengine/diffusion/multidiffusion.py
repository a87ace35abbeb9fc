"""MultiDiffusion (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation"):
a latent larger than the network's comfortable size is denoised as overlapping windows ("views"), and every model
call's x0 predictions of the views are averaged per latent cell, so the network only ever sees window-sized latents
(its memory is bounded by the window, and an oversized canvas does not repeat its subject).

:class:`MultiDiffusion` holds the settings (window and stride in latent cells, as diffusers'
``StableDiffusionPanoramaPipeline`` and the Tiled Diffusion extension of A1111 count them), :func:`views` lays the
windows out, :class:`MultiDiffusionDenoiser` wraps an x0 denoiser (classifier-free guidance included, so each view
is guided on its own, as diffusers does) and averages its views' answers. See docs/multidiffusion.md for where
this equals diffusers' panorama pipeline exactly (deterministic samplers) and where it differs.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion.samplers import GuidanceParts
from sdengine.errors import UsageError

METHODS = ("multidiffusion",)
MAX_WINDOW = 1024  # latent cells (8192 pixels in SD's latent space)
MAX_VIEW_BATCH = 64
DECODE_PADDING = 8  # latent cells wrapped around each side for a circular run's VAE decode (diffusers')
# (the call's views or None when done, the latent's (height, width), its rows): MultiDiffusionDenoiser's view_hook
ViewHook = Callable[[list[tuple[int, int, int, int]] | None, tuple[int, int], int], None]
FIELDS = ("window", "stride", "circular", "view_batch", "window_height", "method")


def _cells(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and float(v).is_integer():
        n = int(float(v))
        if lo <= n <= hi:
            return n
    raise UsageError(f"tiled diffusion {name} must be a whole number in [{lo}, {hi}], got {v!r}")


@dataclass(frozen=True)
class MultiDiffusion:
    """MultiDiffusion's settings. ``window``: the views' width in latent cells (8 pixels each for SD and SDXL;
    diffusers' default 64, the extension's 96); ``window_height``: their height (None: ``window``); ``stride``:
    the step between views in latent cells (diffusers' 8; the extension's overlap is ``window - stride``);
    ``circular``: the views wrap around the left and right edges (diffusers' ``circular_padding``: a 360-degree
    panorama, the VAE decoding with 8 cells of wrapped padding each side); ``view_batch``: how many views one
    network call takes (diffusers' ``view_batch_size``, the extension's tile batch size)."""

    window: int = 64
    stride: int = 8
    circular: bool = False
    view_batch: int = 1
    window_height: int | None = None
    method: str = "multidiffusion"

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _cells("window", self.window, 1, MAX_WINDOW))
        if self.window_height is not None:
            object.__setattr__(self, "window_height", _cells("window_height", self.window_height, 1, MAX_WINDOW))
        object.__setattr__(self, "stride", _cells("stride", self.stride, 1, MAX_WINDOW))
        object.__setattr__(self, "view_batch", _cells("view_batch", self.view_batch, 1, MAX_VIEW_BATCH))
        if not isinstance(self.circular, bool):
            raise UsageError(f"tiled diffusion circular must be true or false, got {self.circular!r}")
        if not isinstance(self.method, str) or self.method.lower() not in METHODS:
            raise UsageError(f"unknown tiled diffusion method {self.method!r}; use one of: {', '.join(METHODS)}")
        object.__setattr__(self, "method", self.method.lower())
        if self.stride > min(self.window, self.height):
            raise UsageError(
                f"tiled diffusion stride {self.stride} is larger than the window ({self.window}x{self.height} cells): "
                "the views would leave gaps"
            )

    @property
    def height(self) -> int:
        """The views' height in latent cells."""
        return self.window if self.window_height is None else int(self.window_height)

    @classmethod
    def coerce(cls, value: Any) -> MultiDiffusion:
        """Settings from a :class:`MultiDiffusion`, a mapping of :data:`FIELDS` (missing ones take the defaults), or
        a sequence ``(window, stride[, circular[, view_batch]])``."""
        if isinstance(value, MultiDiffusion):
            return value
        if isinstance(value, Mapping):
            unknown = [str(k) for k in value if k not in FIELDS]
            if unknown:
                raise UsageError(f"unknown tiled diffusion setting {unknown[0]!r}; the settings: {', '.join(FIELDS)}")
            return cls(**{str(k): v for k, v in value.items()})
        if isinstance(value, Sequence) and not isinstance(value, str | bytes) and 2 <= len(value) <= 4:
            return cls(*value)
        raise UsageError(
            "tiled diffusion takes (window, stride[, circular[, view_batch]]) or a mapping of "
            f"{', '.join(FIELDS)}; got {repr(value)[:100]}"
        )

    def infotext(self) -> dict[str, Any]:
        """sdengine's infotext fields (read back by :func:`sdengine.metadata.tiled_diffusion_kwargs`): "Tiled
        Diffusion: MultiDiffusion", "Tiled Diffusion window: WxH" (latent cells), "Tiled Diffusion stride", and
        "Tiled Diffusion circular: True", "Tiled Diffusion batch" where not false and 1."""
        row: dict[str, Any] = {
            "Tiled Diffusion": "MultiDiffusion",
            "Tiled Diffusion window": f"{self.window}x{self.height}",
            "Tiled Diffusion stride": self.stride,
        }
        if self.circular:
            row["Tiled Diffusion circular"] = True
        if self.view_batch != 1:
            row["Tiled Diffusion batch"] = self.view_batch
        return row

    def check_size(self, height: int, width: int) -> None:
        """One line where a latent of ``height`` x ``width`` cells cannot be laid out so."""
        if self.circular and width <= self.window:
            raise UsageError(
                f"circular tiled diffusion needs a latent wider than the window: {width} cells wide, window "
                f"{self.window} (make the image wider or the window smaller)"
            )


def _starts(size: int, window: int, stride: int, circular: bool) -> list[int]:
    """The first cells of the views along one side of ``size`` cells."""
    if circular:  # diffusers' size // stride views where the stride divides the size; one more covers the rest
        return [i * stride for i in range(-(-size // stride))]
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        # diffusers' get_views stops here and leaves the last cells uncovered (their latents become zeros); one
        # more view, flush with the edge, covers them (the extension's rule)
        starts.append(size - window)
    return starts


def views(height: int, width: int, settings: MultiDiffusion) -> list[tuple[int, int, int, int]]:
    """The views of a latent of ``height`` x ``width`` cells as (top, bottom, left, right), rows first, in
    diffusers' order; ``right`` may pass ``width`` where the views wrap (circular), a window larger than the
    latent is cut to it."""
    settings.check_size(height, width)
    wh, ww = min(settings.height, height), settings.window
    out = []
    for top in _starts(height, wh, settings.stride, False):
        for left in _starts(width, ww, settings.stride, settings.circular):
            out.append((top, top + wh, left, left + min(ww, width) if not settings.circular else left + ww))
    return out


def _crop(t: Tensor, batch: list[tuple[int, int, int, int]], cols: list[Tensor]) -> Tensor:
    """The views ``batch`` (their columns ``cols``, wrapped) of ``t``, stacked view by view along the rows."""
    return torch.cat(
        [t[..., top:bottom, :].index_select(-1, c) for (top, bottom, _, _), c in zip(batch, cols, strict=True)]
    )


class MultiDiffusionDenoiser:
    """An x0 denoiser (``inner``; classifier-free guidance and all) run on the views of its input and averaged:
    each call crops every view of ``x`` (and of any conditioning tensor with the latent's height and width, e.g.
    an inpainting model's ``concat``), calls ``inner`` on ``view_batch`` views at a time (the rows of all views
    in one batch, view by view; the other conditioning tensors repeated per view), and returns each cell's mean
    over the views that cover it. A CFG++ sampler's unconditional x0 (``guidance_parts``) is averaged the same
    way. ``schedule``, ``prediction``, ``off_grid``, ``with_timesteps`` and ``takes_step`` pass through.

    ``view_hook``: called before each network call with the call's views (top, bottom, left, right in latent
    cells, as :func:`views` gives them), the latent's (height, width) and its row count, and with ``None`` once the
    views are done: how a network holding conditioning of its own at the image's size (a ControlNet's hints,
    :meth:`sdengine.pipeline.control.ControlledUNet.view_hints`) crops it to the views."""

    def __init__(self, inner: Any, settings: MultiDiffusion, *, view_hook: ViewHook | None = None) -> None:
        self.inner = inner
        self.settings = settings
        self.view_hook = view_hook

    @property
    def takes_guidance_parts(self) -> bool:
        """Whether a CFG++ sampler's unconditional x0 can be had (the inner denoiser's guidance gives it)."""
        return bool(getattr(self.inner, "takes_guidance_parts", False))

    def _over(self, inner: Any) -> MultiDiffusionDenoiser:
        return MultiDiffusionDenoiser(inner, self.settings, view_hook=self.view_hook)

    @property
    def schedule(self) -> Any:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return str(getattr(self.inner, "prediction", "epsilon"))

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.inner, "takes_step", False))

    @property
    def off_grid(self) -> MultiDiffusionDenoiser:
        inner_off = getattr(self.inner, "off_grid", self.inner)
        return self if inner_off is self.inner else self._over(inner_off)

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> MultiDiffusionDenoiser:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return self._over(inner)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, guidance_parts: Any = None, **cond: Any) -> Tensor:
        b, _, h, w = x.shape
        layout = views(h, w, self.settings)
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        # the sums in float32 whatever the latent's precision (a cell may take window / stride squared views)
        acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        value = torch.zeros_like(x, dtype=acc)
        count = torch.zeros((1, 1, h, w), dtype=acc, device=x.device)
        uncond = torch.zeros_like(x, dtype=acc) if guidance_parts is not None else None
        k = self.settings.view_batch
        hook = self.view_hook
        try:
            self._views(x, sigma, layout, k, hook, value, count, uncond, guidance_parts, cond)
        finally:
            if hook is not None:
                hook(None, (h, w), b)
        # every cell is covered (views() leaves no gap); the division of diffusers' torch.where(count > 0, ...)
        if uncond is not None:
            guidance_parts.uncond = (uncond / count).to(x.dtype)
        return (value / count).to(x.dtype)

    def _views(
        self,
        x: Tensor,
        sigma: Tensor,
        layout: list[tuple[int, int, int, int]],
        k: int,
        hook: ViewHook | None,
        value: Tensor,
        count: Tensor,
        uncond: Tensor | None,
        guidance_parts: Any,
        cond: dict[str, Any],
    ) -> None:
        b, _, h, w = x.shape
        acc = value.dtype
        columns = torch.arange(w, device=x.device)
        for first in range(0, len(layout), k):
            batch = layout[first : first + k]
            n = len(batch)
            cols = [columns[torch.arange(left, right, device=x.device) % w] for _, _, left, right in batch]

            args: dict[str, Any] = {}
            for key, v in cond.items():
                if isinstance(v, Tensor) and v.ndim == 4 and v.shape[0] == b and tuple(v.shape[-2:]) == (h, w):
                    args[key] = _crop(v, batch, cols)
                elif isinstance(v, Tensor) and v.ndim >= 1 and v.shape[0] == b:
                    args[key] = torch.cat([v] * n) if n > 1 else v
                else:
                    args[key] = v
            if hook is not None:
                hook(batch, (h, w), b)
            parts = GuidanceParts() if guidance_parts is not None else None
            extra = {} if parts is None else {"guidance_parts": parts}
            out = self.inner(_crop(x, batch, cols), torch.cat([sigma] * n) if n > 1 else sigma, **extra, **args)
            for j, ((top, bottom, _, _), c) in enumerate(zip(batch, cols, strict=True)):
                rows = slice(j * b, (j + 1) * b)
                value[..., top:bottom, :].index_add_(-1, c, out[rows].to(acc))
                count[..., top:bottom, :].index_add_(-1, c, torch.ones_like(out[:1, :1], dtype=acc))
                if uncond is not None:
                    assert parts is not None
                    if parts.uncond is None:
                        raise UsageError(f"{type(self.inner).__name__} left the views' unconditional x0 unset")
                    uncond[..., top:bottom, :].index_add_(-1, c, parts.uncond[rows].to(acc))


__all__ = [
    "DECODE_PADDING",
    "FIELDS",
    "MAX_VIEW_BATCH",
    "MAX_WINDOW",
    "METHODS",
    "MultiDiffusion",
    "MultiDiffusionDenoiser",
    "ViewHook",
    "views",
]
