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

Self-attention guidance (Hong et al. 2023) adds ``sag_scale`` times the difference between a prediction and the
network's prediction on a degraded input (:mod:`sdengine.diffusion.sag`: the x0 estimate blurred where the middle
block's self-attention looks most, noised back to the step's level). ``attention_map(start, count)`` is a context
manager under which the inner network records that attention map for its rows ``start .. start + count``
(:func:`sdengine.nn.transformer.middle_attention_mass`). The degraded pass is one more call of the inner network, after
the batched one (its input depends on that one's output).

Two rules (``rule``) place these as the two front ends do. "diffusers" (the pipeline): the rescale matches stds of the
network's own output (eps or v) and acts after the PAG term (diffusers' StableDiffusionPAGPipeline). "comfyui"
(ComfyUI's RescaleCFG and PerturbedAttentionGuidance nodes): the rescale matches stds of the v-prediction whatever the
model predicts (RescaleCFG converts x0 to v), and the PAG term is added after it (a post-CFG function there).

For SAG, "diffusers" is StableDiffusionSAGPipeline: the map and x0 of the unconditional rows (of the conditional ones
when the scale is 1: no unconditional pass), the degraded pass under the same conditioning, the term
``sag_scale * (F_src - F_degraded)`` in the network's own output space (eps or v; for eps that is
``sag_scale * (x0_blurred - x0_degraded)`` in x0), added before the rescale; a latent too small for the blur (a side of
4 or less) is an error. "comfyui" is its SelfAttentionGuidance node: always the unconditional rows (it runs them at
scale 1 too), the term ``sag_scale * (x0_blurred - x0_degraded)`` in x0 whatever the model predicts, after the rescale;
a latent too small for the blur skips the term, as ComfyUI does. ``sag_rule`` places SAG alone by another rule than
the rescale's and PAG's (the pipeline's ``GenerationRequest.sag_rule``); None: ``rule``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, ExitStack
from typing import Any, Self

import torch
from torch import Tensor

from sdengine.errors import UsageError

from .denoisers import vp_scalings
from .sag import attention_mask, check_blur_sigma, degraded_x0, fits_blur

GUIDANCE_RULES = ("diffusers", "comfyui")
Perturb = Callable[[int], AbstractContextManager[Any]]
# (start, count) -> a block under which the network records the attention mass of those rows (mass, size)
AttentionMap = Callable[[int, int], AbstractContextManager[Any]]


class GuidedDenoiser:
    """What every guidance wrapper here is to the samplers: the inner denoiser's schedule, prediction and step
    argument passed on, and the same guidance over another inner denoiser (:meth:`_over`) for off-grid sigmas and
    pinned timesteps. Subclasses hold ``inner`` and define ``_over``."""

    inner: Any

    def _over(self, inner: Any) -> Self:
        raise NotImplementedError

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
    def off_grid(self) -> Self:
        """The same guidance over the inner denoiser's un-pinned timesteps (for off-grid sigmas)."""
        inner_off = getattr(self.inner, "off_grid", self.inner)
        return self if inner_off is self.inner else self._over(inner_off)

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.inner, "takes_step", False))

    # The CFG++ samplers' hook (sdengine.diffusion.samplers.GuidanceParts): the unconditional x0 of each call.
    takes_guidance_parts = True

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> Self:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return self._over(inner)


class CFGDenoiser(GuidedDenoiser):
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
        sag_scale: float = 0.0,
        sag_blur_sigma: float = 1.0,
        attention_map: AttentionMap | None = None,
        sag_rule: str | None = None,
        hooks: tuple[tuple[bool | None, Callable[..., Any]], ...] = (),
    ) -> None:
        if scale < 0:
            raise UsageError(f"guidance scale must be >= 0, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise UsageError(f"guidance rescale must be in [0, 1], got {rescale}")
        if rule not in GUIDANCE_RULES:
            raise UsageError(f"unknown guidance rule {rule!r}; use one of: {', '.join(GUIDANCE_RULES)}")
        if sag_rule is not None and sag_rule not in GUIDANCE_RULES:
            raise UsageError(f"unknown SAG rule {sag_rule!r}; use one of: {', '.join(GUIDANCE_RULES)}")
        if not pag_scale >= 0:
            raise UsageError(f"PAG scale must be >= 0, got {pag_scale}")
        if pag_scale and perturb is None:
            raise UsageError("a PAG scale needs the layers to perturb")
        if isinstance(sag_scale, bool) or not isinstance(sag_scale, int | float) or not math.isfinite(sag_scale):
            raise UsageError(f"SAG scale must be a finite number, got {sag_scale!r}")
        if sag_scale and attention_map is None:
            raise UsageError("a SAG scale needs the network's self-attention map")
        self.inner = inner
        self.scale = float(scale)
        self.uncond = dict(uncond)
        self.rescale = float(rescale)
        self.rule = rule
        self.pag_scale = float(pag_scale)
        self.perturb = perturb
        self.pag_schedule: Callable[[Tensor], float] | None = None  # sigma -> PAG's scale at that step (SD3's adaptive)
        self.sag_scale = float(sag_scale)
        self.sag_blur_sigma = check_blur_sigma(sag_blur_sigma)
        self.attention_map = attention_map
        self.sag_rule = rule if sag_rule is None else sag_rule
        # ComfyUI's pre- and post-CFG functions of the model-patch nodes (sdengine.diffusion.cfg_hooks.start_hooks)
        self.hooks = tuple(hooks)

    def _over(self, inner: Any) -> CFGDenoiser:
        """The same guidance over another inner denoiser."""
        den = CFGDenoiser(
            inner,
            self.scale,
            self.uncond,
            self.rescale,
            rule=self.rule,
            pag_scale=self.pag_scale,
            perturb=self.perturb,
            sag_scale=self.sag_scale,
            sag_blur_sigma=self.sag_blur_sigma,
            attention_map=self.attention_map,
            sag_rule=self.sag_rule,
            hooks=self.hooks,
        )
        den.pag_schedule = self.pag_schedule
        return den

    def __call__(self, x: Tensor, sigma: Tensor | float, *, guidance_parts: Any = None, **cond: Any) -> Tensor:
        """The guided x0; ``guidance_parts`` (a CFG++ sampler's GuidanceParts) also gets the unconditional x0, the
        unconditional pass then running at scale 1 too."""
        tags = getattr(self.inner, "takes_row_kinds", False)
        pag = self.pag_scale > 0
        comfy = self.rule == "comfyui"
        sag = self.sag_scale != 0
        hooks = self.hooks
        if self.scale == 1.0 and guidance_parts is None and not pag and not sag and not hooks:
            if tags:
                cond["row_kinds"] = ("cond",) * x.shape[0]
            return self.inner(x, sigma, **cond)
        # ComfyUI's SAG reads the unconditional rows whatever the scale (it turns off its cfg-1 shortcut)
        sag_comfy = self.sag_rule == "comfyui"
        uncond_pass = self.scale != 1.0 or guidance_parts is not None or (sag and sag_comfy)
        kinds: tuple[str, ...] = ("cond", "uncond") if uncond_pass else ("cond",)
        kinds += ("cond",) if pag else ()  # the perturbed pass: the conditional rows again, last
        n = len(kinds)
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32)  # kept where it is (the CPU): no device sync
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        both = self._rows(cond, kinds, b, tags)
        with ExitStack() as stack:
            if pag:
                assert self.perturb is not None
                stack.enter_context(self.perturb(b))
            probe = None
            if sag:  # the attention map of the rows SAG degrades: the unconditional ones where they run
                assert self.attention_map is not None
                probe = stack.enter_context(self.attention_map(b if uncond_pass else 0, b))
            out = self.inner(torch.cat([x] * n), torch.cat([sigma] * n), **both)
        parts = out.chunk(n)
        x0_c = parts[0]
        x0_u = parts[1] if uncond_pass else x0_c
        hook_u = x0_u if uncond_pass else torch.zeros_like(x0_c)  # ComfyUI's x0 of a pass it skips: zeros
        for pre, fn in hooks:  # ComfyUI's pre-CFG functions, in the order applied
            if pre is True:
                x0_c, hook_u = fn(x, sigma, x0_c, hook_u, self.scale, uncond_pass)
        if uncond_pass:
            x0_u = hook_u
        cfg_fns = [fn for pre, fn in hooks if pre is None]
        if cfg_fns:  # ComfyUI's sampler_cfg_function (RenormCFG) in place of the CFG: the last one counts
            guided = cfg_fns[-1](x, sigma, x0_c, hook_u, self.scale)
        else:
            guided = x0_c if self.scale == 1.0 else x0_u + self.scale * (x0_c - x0_u)
        if guidance_parts is not None:
            guidance_parts.uncond = x0_u
        sag_term = None
        if sag:
            source = ("uncond",) if uncond_pass else ("cond",)  # the degraded rows' conditioning: the map's rows'
            sag_term = self._sag_term(x, sigma, x0_u, probe, self._rows(cond, source, b, tags))
        pag_scale = self.pag_scale if self.pag_schedule is None or not pag else self.pag_schedule(sigma)
        if pag and not comfy:  # diffusers: the PAG term joins the guided prediction before the rescale
            guided = guided + pag_scale * (x0_c - parts[-1])
        if sag_term is not None and not sag_comfy:
            guided = guided + sag_term
        if self.rescale > 0 and uncond_pass:
            guided = self._rescale(x, sigma, x0_c, guided)
        if pag and comfy:  # ComfyUI: a post-CFG function, after RescaleCFG
            guided = guided + pag_scale * (x0_c - parts[-1])
        if sag_term is not None and sag_comfy:
            guided = guided + sag_term
        for pre, fn in hooks:  # ComfyUI's post-CFG functions (applied after PAG's and SAG's: the nodes see to it)
            if pre is False:
                guided = fn(x, sigma, guided, x0_c, hook_u, self.scale)
        return guided

    def _rows(self, cond: Mapping[str, Any], kinds: tuple[str, ...], b: int, tags: bool) -> dict[str, Any]:
        """The conditioning of a batched call whose row blocks (``b`` rows each) are ``kinds``."""
        n = len(kinds)
        uncond = "uncond" in kinds
        both: dict[str, Any] = {}
        for k, v in cond.items():
            if k in self.uncond and uncond:
                u = self.uncond[k].to(v.device)
                if u.shape[0] == 1 and b != 1:  # one unconditional value for the whole batch
                    u = u.expand(b, *u.shape[1:])
                elif 0 < u.shape[0] < b and b % u.shape[0] == 0:
                    # the rows repeated in blocks (MultiDiffusion's view batches, sdengine.diffusion.multidiffusion:
                    # the rows of each view in turn): the unconditional rows repeated alike
                    u = u.repeat(b // u.shape[0], *([1] * (u.ndim - 1)))
                both[k] = torch.cat([v if kind == "cond" else u for kind in kinds])
            elif isinstance(v, Tensor) and v.shape[:1] == (b,):
                both[k] = torch.cat([v] * n)
            else:
                both[k] = v
        if tags:  # which rows are conditional: ControlNet's guess mode leaves the unconditional ones alone
            both["row_kinds"] = tuple(kind for kind in kinds for _ in range(b))
        return both

    def _sag_term(self, x: Tensor, sigma: Tensor, x0: Tensor, probe: Any, args: dict[str, Any]) -> Tensor | None:
        """Self-attention guidance's term (module docstring) from the rows' x0 and their recorded attention map; one
        more call of the inner network on the degraded input, under the rows' own conditioning ``args``."""
        h, w = x.shape[-2:]
        if not fits_blur(h, w):
            if self.sag_rule == "comfyui":
                return None  # ComfyUI skips SAG on a latent this small
            raise UsageError(
                f"self-attention guidance blurs with a 9 x 9 kernel and needs a latent of at least 5 x 5, got "
                f"{w} x {h} (make the image larger)"
            )
        if probe is None or probe.mass is None or probe.size is None:
            raise UsageError("self-attention guidance found no self-attention map in the network's call")
        mask = attention_mask(probe.mass, probe.size, (h, w)).to(x.device)
        blurred = degraded_x0(x0, mask, self.sag_blur_sigma)
        x_deg = x - x0 + blurred  # the blurred x0 under the noise x0 implies: x = x0 + sigma * eps
        x0_deg = self.inner(x_deg, sigma, **args)
        if self.sag_rule == "comfyui":
            return self.sag_scale * (blurred - x0_deg)
        # diffusers: s * (F(x, x0) - F(x_deg, x0_deg)) for the network's output F (eps or v; x0 = c_skip x + c_out F),
        # taken back to x0 at x: s * (x0 - x0_deg - c_skip (x - x_deg))
        c_skip, _, _ = vp_scalings(sigma, self.prediction)
        c_skip = _on_device_of(c_skip, x).reshape((-1,) + (1,) * (x.ndim - 1))
        return self.sag_scale * (x0 - x0_deg - c_skip * (x0 - blurred))

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


# ------------------------------------------------------------------------ guidance over three conditionings
#
# ComfyUI's DualCFGGuider and PerpNegGuider predict x0 under three conditionings (their own calc_cond_batch call,
# each conditioning's entries weighed as usual) and combine the three. A rule names the combination: sampling
# hands ``combine`` the predictions in the order (positive, negative, third) and leaves out the passes ``active``
# says are not needed, handing zeros for them (what ComfyUI's calc_cond_batch answers for a conditioning it is
# given as None). ``combine`` answers the guided x0 and the x0 a CFG++ sampler takes as the unconditional one (the
# ``uncond_denoised`` ComfyUI's post-CFG hooks see under that guider).


class GuidanceRuleError(UsageError):
    """A guider's settings that cannot guide (a scale below 0, not a number)."""


def _scale(name: str, value: float) -> float:
    v = float(value)
    if not v >= 0 or v == float("inf"):
        raise GuidanceRuleError(f"{name} must be a finite number of at least 0, got {value!r}")
    return v


class DualCFG:
    """ComfyUI's DualCFGGuider: ``cond1`` (the positive), ``cond2`` (the third conditioning, ComfyUI's "middle")
    and the negative. Style "regular": ``neg + cfg_cond2_negative (cond2 - neg) + cfg_conds (cond1 - cond2)``, the
    negative pass left out where cfg_cond2_negative is 1 and cond2's too where cfg_conds is also 1 (the left-out
    passes count as 0, as in ComfyUI). Style "nested": ``neg + cfg_cond2_negative (t - neg)`` with ``t = cond2 +
    cfg_conds (cond1 - cond2)``, every pass run. A CFG++ sampler's unconditional x0: the negative's (regular), cond2's
    (nested), the uncond of the CFG step ComfyUI runs through its cfg_function; it then runs every pass."""

    STYLES = ("regular", "nested")
    order = (0, 2, 1)  # ComfyUI's order of the conditionings (its conds dict: positive, middle, negative)

    def __init__(self, cfg_conds: float, cfg_cond2_negative: float, style: str = "regular") -> None:
        if style not in self.STYLES:
            raise GuidanceRuleError(f"DualCFG style must be one of {', '.join(self.STYLES)}, got {style!r}")
        self.cfg1 = _scale("cfg_conds", cfg_conds)
        self.cfg2 = _scale("cfg_cond2_negative", cfg_cond2_negative)
        self.nested = style == "nested"

    def active(self, every: bool = False) -> tuple[bool, bool, bool]:
        """Which passes run, (positive, negative, cond2); ``every``: all of them (a CFG++ sampler's run)."""
        if every or self.nested or not math.isclose(self.cfg2, 1.0):
            return (True, True, True)
        return (True, False, not math.isclose(self.cfg1, 1.0))

    def combine(self, preds: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos, neg, mid = preds
        if self.nested:
            text = mid + (pos - mid) * self.cfg1
            return neg + self.cfg2 * (text - neg), mid
        return neg + (mid - neg) * self.cfg2 + (pos - mid) * self.cfg1, neg

    def __repr__(self) -> str:
        style = "nested" if self.nested else "regular"
        return f"DualCFG(cfg_conds {self.cfg1:g}, cfg_cond2_negative {self.cfg2:g}, {style})"


class PerpNeg:
    """ComfyUI's PerpNegGuider (Armandpour et al. 2023, "Perp-Neg"): with ``e`` the empty conditioning's x0,
    ``p = pos - e`` and ``n = neg - e``, the negative's part perpendicular to ``p``, ``n - (<n, p> / |p|^2) p``
    (the dot product and norm over the whole batch tensor, as ComfyUI's), is what the negative takes away:
    ``e + cfg (p - neg_scale perp)``. The negative pass is left out where neg_scale is 0, the empty one too where
    cfg is also 1 (counting as 0, as in ComfyUI). A CFG++ sampler's unconditional x0: the negative's.

    ``patch``: ComfyUI's older PerpNeg model patch, its CFG function in place of CFG: the same combination, the
    negative pass left out where cfg is 1 (ComfyUI's sampling_function's), the empty one always run."""

    order = (0, 2, 1)  # ComfyUI's order: positive, empty_negative_prompt, negative

    def __init__(self, cfg: float, neg_scale: float, patch: bool = False) -> None:
        self.cfg = _scale("cfg", cfg)
        self.neg_scale = _scale("neg_scale", neg_scale)
        self.patch = patch

    def active(self, every: bool = False) -> tuple[bool, bool, bool]:
        if self.patch:
            return (True, every or not math.isclose(self.cfg, 1.0), True)
        if every or not math.isclose(self.neg_scale, 0.0):
            return (True, True, True)
        return (True, False, not math.isclose(self.cfg, 1.0))

    def combine(self, preds: list[Tensor]) -> tuple[Tensor, Tensor]:
        pos, neg, empty = preds
        p, n = pos - empty, neg - empty
        perp = n - (n * p).sum() / torch.linalg.vector_norm(p) ** 2 * p
        return empty + self.cfg * (p - perp * self.neg_scale), neg

    def __repr__(self) -> str:
        return f"PerpNeg{' patch' * self.patch}(cfg {self.cfg:g}, neg_scale {self.neg_scale:g})"


# ------------------------------------------------------------------------ InstructPix2Pix's image guidance


class ImageCFGDenoiser(GuidedDenoiser):
    """InstructPix2Pix's guidance (Brooks et al. 2023, eq. 3; diffusers' StableDiffusionInstructPix2PixPipeline,
    A1111's ``combine_denoised_for_edit_model``): three row blocks in ONE batched call of ``inner``, in the order
    both stack them: (prompt, image), (negative prompt, image), (negative prompt, no image: zeros in the
    ``concat`` channels), and ``x0 = u + scale * (c - i) + image_scale * (i - u)`` for their x0s ``c``, ``i``,
    ``u`` (x0 is affine in the network's output at one x and sigma, so this equals the formula on eps).
    ``uncond`` holds the negative prompt's values for the conditioning keys (as :class:`CFGDenoiser`'s); the
    image latent rides in ``concat``. Row kinds for a ``takes_row_kinds`` inner denoiser: "cond", then "uncond"
    for both other blocks. A CFG++ sampler's unconditional x0: the last block's (neither text nor image)."""

    def __init__(self, inner: Any, scale: float, image_scale: float, uncond: Mapping[str, Tensor]) -> None:
        for name, v in (("guidance scale", scale), ("image guidance scale", image_scale)):
            if not float(v) >= 0 or not math.isfinite(float(v)):
                raise UsageError(f"{name} must be a finite number >= 0, got {v!r}")
        self.inner = inner
        self.scale = float(scale)
        self.image_scale = float(image_scale)
        self.uncond = dict(uncond)

    def _over(self, inner: Any) -> ImageCFGDenoiser:
        return ImageCFGDenoiser(inner, self.scale, self.image_scale, self.uncond)

    def __call__(self, x: Tensor, sigma: Tensor | float, *, guidance_parts: Any = None, **cond: Any) -> Tensor:
        if "concat" not in cond:
            raise UsageError("instruct-pix2pix guidance needs the image latent (the 'concat' conditioning)")
        b = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma.reshape(-1).expand(b) if sigma.numel() == 1 else sigma
        args: dict[str, Any] = {}
        for k, v in cond.items():
            if k == "concat":
                args[k] = torch.cat([v, v, torch.zeros_like(v)])
            elif k in self.uncond:
                u = self.uncond[k].to(v.device)
                u = u.expand(b, *u.shape[1:]) if u.shape[0] == 1 and b != 1 else u
                args[k] = torch.cat([v, u, u])
            elif isinstance(v, Tensor) and v.shape[:1] == (b,):
                args[k] = torch.cat([v] * 3)
            else:
                args[k] = v
        if getattr(self.inner, "takes_row_kinds", False):
            args["row_kinds"] = ("cond",) * b + ("uncond",) * (2 * b)
        out = self.inner(torch.cat([x] * 3), torch.cat([sigma] * 3), **args)
        x0_c, x0_i, x0_u = out.chunk(3)
        if guidance_parts is not None:
            guidance_parts.uncond = x0_u
        return x0_u + self.scale * (x0_c - x0_i) + self.image_scale * (x0_i - x0_u)

    def __repr__(self) -> str:
        return f"ImageCFGDenoiser(scale {self.scale:g}, image scale {self.image_scale:g})"
