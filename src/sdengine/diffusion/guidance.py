"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

``CFGDenoiser(inner, scale, uncond)`` answers ``denoise(x, sigma, **cond)`` with
``x0_uncond + scale * (x0_cond - x0_uncond)``, running the conditional and unconditional halves in ONE
batched call of ``inner``. ``uncond`` holds, for every conditioning keyword, the value that means "no
condition" (the null class, the empty prompt's text states). A scale of 1 skips the unconditional pass.
Guidance rescale (Lin et al. 2023, section 3.4) pulls the guided x0's per-sample std back towards the
conditional one's, which keeps zero-terminal-SNR models from over-exposing.

Perturbed-attention guidance (Ahn et al. 2024) adds ``pag_scale * (x0_cond - x0_perturbed)``, where the perturbed
pass is the conditional one run with the identity attention map in some self-attention layers: ``perturb(n)`` is a
context manager under which the inner network perturbs the last ``n`` rows of its calls
(:func:`sdengine.nn.attention.identity_attention`). The perturbed rows ride in the same batched call.

Two rules (``rule``) place these as the two front ends do. "diffusers" (the pipeline): the rescale matches stds of the
network's own output (eps or v) and acts after the PAG term (diffusers' StableDiffusionPAGPipeline). "comfyui"
(ComfyUI's RescaleCFG and PerturbedAttentionGuidance nodes): the rescale matches stds of the v-prediction whatever the
model predicts (RescaleCFG converts x0 to v), and the PAG term is added after it (a post-CFG function there).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import UsageError

from .denoisers import vp_scalings

GUIDANCE_RULES = ("diffusers", "comfyui")
Perturb = Callable[[int], AbstractContextManager[Any]]


class CFGDenoiser:
    """See the module docstring. An inner denoiser with ``takes_row_kinds = True`` is also handed
    ``row_kinds``: a tuple with "cond" or "uncond" for every row of the batch it gets (a perturbed row is "cond")."""

    def __init__(
        self,
        inner: Any,
        scale: float,
        uncond: Mapping[str, Tensor],
        rescale: float = 0.0,
        *,
        rule: str = "diffusers",
        pag_scale: float = 0.0,
        perturb: Perturb | None = None,
    ) -> None:
        if scale < 0:
            raise UsageError(f"guidance scale must be >= 0, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"guidance rescale must be in [0, 1], got {rescale}")
        if rule not in GUIDANCE_RULES:
            raise UsageError(f"unknown guidance rule {rule!r}; use one of: {', '.join(GUIDANCE_RULES)}")
        if not pag_scale >= 0:
            raise UsageError(f"PAG scale must be >= 0, got {pag_scale}")
        if pag_scale and perturb is None:
            raise UsageError("a PAG scale needs the layers to perturb")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.rescale = float(rescale)
        self.rule = rule
        self.pag_scale = float(pag_scale)
        self.perturb = perturb

    def _over(self, inner: Any) -> CFGDenoiser:
        """The same guidance over another inner denoiser."""
        return CFGDenoiser(
            inner, self.scale, self.uncond, self.rescale, rule=self.rule, pag_scale=self.pag_scale, perturb=self.perturb
        )

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
        return self if inner_off is self.inner else self._over(inner_off)

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.inner, "takes_step", False))

    # The CFG++ samplers' hook (sdengine.diffusion.samplers.GuidanceParts): the unconditional x0 of each call.
    takes_guidance_parts = True

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> CFGDenoiser:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return self._over(inner)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, guidance_parts: Any = None, **cond: Any) -> Tensor:
        """The guided x0; ``guidance_parts`` (a CFG++ sampler's GuidanceParts) also gets the unconditional x0, the
        unconditional pass then running at scale 1 too."""
        tags = getattr(self.inner, "takes_row_kinds", False)
        pag = self.pag_scale > 0
        if self.scale == 1.0 and guidance_parts is None and not pag:
            if tags:
                cond["row_kinds"] = ("cond",) * x.shape[0]
            return self.inner(x, sigma, **cond)
        uncond_pass = self.scale != 1.0 or guidance_parts is not None
        kinds: tuple[str, ...] = ("cond", "uncond") if uncond_pass else ("cond",)
        kinds += ("cond",) if pag else ()  # the perturbed pass: the conditional rows again, last
        n = len(kinds)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32)  # kept where it is (the CPU): no device sync
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        both: dict[str, Any] = {}
        for k, v in cond.items():
            if k in self.uncond and uncond_pass:
                u = self.uncond[k].to(v.device)
                if u.shape[0] != b:  # one unconditional value for the whole batch
                    u = u.expand(b, *u.shape[1:]) if u.shape[0] == 1 else u
                both[k] = torch.cat([v if kind == "cond" else u for kind in kinds])
            elif isinstance(v, Tensor) and v.shape[:1] == (b,):
                both[k] = torch.cat([v] * n)
            else:
                both[k] = v
        if tags:  # which rows are conditional: ControlNet's guess mode leaves the unconditional ones alone
            both["row_kinds"] = tuple(kind for kind in kinds for _ in range(b))
        if pag:
            assert self.perturb is not None
            with self.perturb(b):
                out = self.inner(torch.cat([x] * n), torch.cat([sigma] * n), **both)
        else:
            out = self.inner(torch.cat([x] * n), torch.cat([sigma] * n), **both)
        parts = out.chunk(n)
        x0_c = parts[0]
        x0_u = parts[1] if uncond_pass else x0_c
        guided = x0_c if self.scale == 1.0 else x0_u + self.scale * (x0_c - x0_u)
        if guidance_parts is not None:
            guidance_parts.uncond = x0_u
        comfy = self.rule == "comfyui"
        if pag and not comfy:  # diffusers: the PAG term joins the guided prediction before the rescale
            guided = guided + self.pag_scale * (x0_c - parts[-1])
        if self.rescale > 0 and uncond_pass:
            guided = self._rescale(x, sigma, x0_c, guided)
        if pag and comfy:  # ComfyUI: a post-CFG function, after RescaleCFG
            guided = guided + self.pag_scale * (x0_c - parts[-1])
        return guided

    def _rescale(self, x: Tensor, sigma: Tensor, x0_c: Tensor, x0_g: Tensor) -> Tensor:
        # The std matching acts on the network's own output (eps or v), as diffusers applies it, or on the
        # v-prediction under ComfyUI's rule (RescaleCFG); x0 is affine in either, x0 = c_skip x + c_out F, so go
        # there and back.
        space = "v_prediction" if self.rule == "comfyui" else self.prediction
        c_skip, c_out, _ = vp_scalings(sigma, space)  # on the CPU, where sigma is
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
