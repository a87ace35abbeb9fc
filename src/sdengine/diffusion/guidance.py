"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

``CFGDenoiser(inner, scale, uncond)`` answers ``denoise(x, sigma, **cond)`` with
``x0_uncond + scale * (x0_cond - x0_uncond)``, running the conditional and unconditional halves in ONE
batched call of ``inner``. ``uncond`` holds, for every conditioning keyword, the value that means "no
condition" (the null class, the empty prompt's text states). A scale of 1 skips the unconditional pass.
Guidance rescale (Lin et al. 2023, section 3.4) pulls the guided x0's per-sample std back towards the
conditional one's, which keeps zero-terminal-SNR models from over-exposing.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import UsageError

from .denoisers import vp_scalings


class CFGDenoiser:
    """See the module docstring. An inner denoiser with ``takes_row_kinds = True`` is also handed
    ``row_kinds``: a tuple with "cond" or "uncond" for every row of the batch it gets."""

    def __init__(self, inner: Any, scale: float, uncond: Mapping[str, Tensor], rescale: float = 0.0) -> None:
        if scale < 0:
            raise UsageError(f"guidance scale must be >= 0, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.rescale = float(rescale)

    @property
    def takes_row_kinds(self) -> bool:
        return False  # the tags are made here; a wrapper around this one sees one kind of row

    # The sampling entry point reads these from the denoiser it is given.
    @property
    def schedule(self) -> Any:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def off_grid(self) -> CFGDenoiser:
        """The same guidance over the inner denoiser's un-pinned timesteps (for off-grid sigmas)."""
        inner_off = getattr(self.inner, "off_grid", self.inner)
        return self if inner_off is self.inner else CFGDenoiser(inner_off, self.scale, self.uncond, self.rescale)

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.inner, "takes_step", False))

    # The CFG++ samplers' hook (sdengine.diffusion.samplers.GuidanceParts): the unconditional x0 of each call.
    takes_guidance_parts = True

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> CFGDenoiser:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return CFGDenoiser(inner, self.scale, self.uncond, self.rescale)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, guidance_parts: Any = None, **cond: Any) -> Tensor:
        """The guided x0; ``guidance_parts`` (a CFG++ sampler's GuidanceParts) also gets the unconditional x0, the
        unconditional pass then running at scale 1 too."""
        tags = getattr(self.inner, "takes_row_kinds", False)
        if self.scale == 1.0 and guidance_parts is None:
            if tags:
                cond["row_kinds"] = ("cond",) * x.shape[0]
            return self.inner(x, sigma, **cond)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32)  # kept where it is (the CPU): no device sync
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        both: dict[str, Any] = {}
        for k, v in cond.items():
            if k in self.uncond:
                u = self.uncond[k].to(v.device)
                if u.shape[0] != b:  # one unconditional value for the whole batch
                    u = u.expand(b, *u.shape[1:]) if u.shape[0] == 1 else u
                both[k] = torch.cat([v, u])
            elif isinstance(v, Tensor) and v.shape[:1] == (b,):
                both[k] = torch.cat([v, v])
            else:
                both[k] = v
        if tags:  # which rows are conditional: ControlNet's guess mode leaves the unconditional ones alone
            both["row_kinds"] = ("cond",) * b + ("uncond",) * b
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        x0_c, x0_u = out.chunk(2)
        guided = x0_c if self.scale == 1.0 else x0_u + self.scale * (x0_c - x0_u)
        if guidance_parts is not None:
            guidance_parts.uncond = x0_u
        if self.rescale > 0:
            guided = self._rescale(x, sigma, x0_c, guided)
        return guided

    def _rescale(self, x: Tensor, sigma: Tensor, x0_c: Tensor, x0_g: Tensor) -> Tensor:
        # The std matching acts on the network's own output (eps or v), as diffusers applies it; x0 is
        # affine in that output, x0 = c_skip x + c_out F, so go there and back.
        c_skip, c_out, _ = vp_scalings(sigma, self.prediction)  # on the CPU, where sigma is
        shape = (-1,) + (1,) * (x.ndim - 1)
        c_skip, c_out = _on_device_of(c_skip, x).reshape(shape), _on_device_of(c_out, x).reshape(shape)
        f_c, f_g = (x0_c - c_skip * x) / c_out, (x0_g - c_skip * x) / c_out
        dims = tuple(range(1, x.ndim))
        std_c, std_g = f_c.std(dim=dims, keepdim=True), f_g.std(dim=dims, keepdim=True)
        f = self.rescale * f_g * (std_c / std_g) + (1 - self.rescale) * f_g
        return c_skip * x + c_out * f


def _on_device_of(v: Tensor, like: Tensor) -> Tensor:
    """A small CPU tensor on ``like``'s device: one fill when its values are all equal (every sampler step: no
    copy from the host, which a CUDA graph could not record), else a copy."""
    flat = v.reshape(-1)
    if flat.numel() and bool((flat == flat[0]).all()):
        return torch.full(v.shape, float(flat[0]), dtype=v.dtype, device=like.device)
    return v.to(like.device)
