"""ComfyUI's guidance hooks around classifier-free guidance, as its model-patch nodes register them.

ComfyUI's sampling function predicts the conditional and unconditional x0 (the unconditional one all zeros where it
skips that pass, at cfg 1), runs every *pre-CFG* function on the pair in the order the nodes were applied, combines
the pair (CFG, or RescaleCFG's function), then runs every *post-CFG* function on the guided x0 in order. The hooks
here are those functions, in sdengine's terms: :class:`CFGHook` is a node's settings (frozen, part of a MODEL handle
and its cache key); :meth:`CFGHook.start` answers the hook for one sampling run (APG keeps a running average across
the run's calls), which :class:`sdengine.diffusion.guidance.CFGDenoiser` calls with its x0s.

- ``apg`` (APG, adaptive projected guidance; pre-CFG): ``g = cond - uncond``, a running average ``m * avg + g``
  when the momentum ``m`` is above 0 (reset when sigma rises), scaled down to an L2 norm (over C, H, W) of at most
  ``norm_threshold`` (above 0), split into the part along ``cond`` and the rest; the conditional x0 becomes
  ``uncond + (rest + eta * along) + (cond - uncond) / cfg``, so that the CFG gives ``uncond + cfg * modified``.
- ``tcfg`` (TCFG, tangential damping; pre-CFG): the scores ``x - cond`` and ``x - uncond`` of each row stacked as two
  rows of a matrix; the unconditional score projected onto the matrix's first right singular vector; skipped where
  the unconditional pass does not run.
- ``cfg_zero_star`` (CFGZeroStar; post-CFG): ``alpha = <x - cond, x - uncond> / (|x - uncond|^2 + 1e-8)`` per row;
  ``out + uncond (alpha - 1) + cfg uncond (1 - alpha)``.
- ``mahiro`` (Mahiro; post-CFG): ``leap = cfg cond``, ``merge = (leap + out) / 2``; the mean cosine similarity
  (over the channels, averaged over everything) of the signed square roots of ``cfg uncond`` and ``merge`` gives
  ``s = 2 (sim + 1)``; ``(s out + (4 - s) leap) / 4``.
- ``epsilon_scaling`` (Epsilon Scaling; post-CFG): ``x - (x - out) / factor``.
- ``tsr`` (TemporalScoreRescaling; post-CFG): with the half log-SNR ``h`` of sigma (``-log sigma``; a flow model's
  ``-logit sigma``), ``snr = exp(2 h)``, ``r = (snr v + 1) / (snr v / k + 1)`` (``v = tsr_sigma^2``) and ``alpha =
  sigma exp(h)``: ``lerp(x / alpha, out, r)``; nothing at ``k`` 1, at sigma 0 or where ``snr`` is 0.
- ``renorm_cfg`` (RenormCFG; ComfyUI's CFG function, in place of the CFG): where sigma is below ``cfg_trunc`` the
  CFG, its norm (over C, H, W) then capped at ``renorm_cfg`` times the conditional x0's when ``renorm_cfg`` is above
  0; from ``cfg_trunc`` up the conditional x0 alone. A batch of one row (ComfyUI's comparison fails on more).
- ``latent_op`` (LatentApplyOperationCFG; pre-CFG): the conditional x0 becomes ``op(cond - uncond) + uncond`` for
  its latent operation ``op`` (a LATENT_OPERATION: a latent -> latent callable; the unconditional x0 zeros where
  that pass is skipped, as ComfyUI's).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.errors import UsageError

PRE_HOOKS = ("apg", "tcfg", "latent_op")
POST_HOOKS = ("cfg_zero_star", "mahiro", "epsilon_scaling", "tsr")
CFG_FUNCTIONS = ("renorm_cfg",)  # in place of the CFG combination (ComfyUI's sampler_cfg_function: one, the last)


@dataclass(frozen=True)
class CFGHook:
    """One hook: ``kind`` (one of :data:`PRE_HOOKS` / :data:`POST_HOOKS`) and its settings (APG: eta,
    norm_threshold, momentum; Epsilon Scaling: its factor)."""

    kind: str
    params: tuple[Any, ...] = ()

    def __post_init__(self) -> None:
        kinds = PRE_HOOKS + POST_HOOKS + CFG_FUNCTIONS
        if self.kind not in kinds:
            raise UsageError(f"unknown CFG hook {self.kind!r}; use one of {', '.join(kinds)}")

    @property
    def pre(self) -> bool | None:
        """True: a pre-CFG hook; False: a post-CFG one; None: a CFG function."""
        return None if self.kind in CFG_FUNCTIONS else self.kind in PRE_HOOKS

    def start(self, flow: bool = False) -> Callable[..., Any]:
        """The hook for one sampling run (``flow``: on a flow model, ComfyUI's CONST sampling). A pre-CFG hook:
        ``(x, sigma, cond, uncond, scale, has_uncond) -> (cond, uncond)``; a post-CFG one: ``(x, sigma, out, cond,
        uncond, scale) -> out``; a CFG function: ``(x, sigma, cond, uncond, scale) -> guided``."""
        if self.kind == "apg":
            return _APG(*self.params)
        if self.kind == "latent_op":
            return _LatentOpHook(self.params[0])
        if self.kind == "renorm_cfg":
            return _RenormCFG(*self.params)
        if self.kind == "tsr":
            return _TSR(*self.params, flow=flow)
        if self.kind == "epsilon_scaling":
            return _EpsilonScaling(*self.params)
        fns: dict[str, Callable[..., Any]] = {"tcfg": _tcfg, "cfg_zero_star": _cfg_zero_star, "mahiro": _mahiro}
        return fns[self.kind]


def start_hooks(hooks: Any, flow: bool = False) -> tuple[tuple[bool | None, Callable[..., Any]], ...]:
    """The hooks of one sampling run, in the order given: (:attr:`CFGHook.pre`, the hook). A CFG function
    ``(x, sigma, cond, uncond, scale) -> guided`` replaces the CFG; of several, the last counts (as ComfyUI's)."""
    out = []
    for h in hooks:
        if not isinstance(h, CFGHook):
            raise UsageError(f"a CFG hook must be a CFGHook, got {type(h).__name__}")
        out.append((h.pre, h.start(flow)))
    return tuple(out)


class _APG:
    def __init__(self, eta: float, norm_threshold: float, momentum: float) -> None:
        self.eta, self.threshold, self.momentum = float(eta), float(norm_threshold), float(momentum)
        self.avg: Tensor | None = None
        self.prev: float | None = None

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Tensor, scale: float, has: bool) -> Any:
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        if self.prev is not None and s > self.prev:
            self.avg = None
        self.prev = s
        g = cond - uncond
        if self.momentum > 0:
            self.avg = g if self.avg is None else self.momentum * self.avg + g
            g = self.avg
        dims = [-1, -2, -3]
        if self.threshold > 0:
            n = g.norm(p=2, dim=dims, keepdim=True)
            g = g * torch.minimum(torch.ones_like(n), self.threshold / n)
        # F.normalize over the three dims: cond / max(|cond|, 1e-12), its L2 norm per row
        unit = cond / cond.norm(p=2, dim=dims, keepdim=True).clamp_min(1e-12)
        along = (g * unit).sum(dim=dims, keepdim=True) * unit
        modified = (g - along) + self.eta * along
        return (uncond + modified) + (cond - uncond) / scale, uncond


class _TSR:
    def __init__(self, k: float, tsr_sigma: float, *, flow: bool) -> None:
        self.k, self.var, self.flow = float(k), float(tsr_sigma) ** 2, flow

    def __call__(self, x: Tensor, sigma: Tensor, out: Tensor, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0]
        if self.k == 1 or float(s) == 0:
            return out
        h = s.logit().neg() if self.flow else s.log().neg()
        snr = (2 * h).exp()
        if float(snr) == 0:
            return out
        r = (snr * self.var + 1) / (snr * self.var / self.k + 1)
        r = torch.where(torch.isposinf(snr), torch.tensor(self.k), r)
        alpha = (s * h.exp()).to(x.device)
        return torch.lerp(x / alpha, out, r.to(device=x.device, dtype=out.dtype))


class _RenormCFG:
    def __init__(self, cfg_trunc: float, renorm: float) -> None:
        self.trunc, self.renorm = float(cfg_trunc), float(renorm)

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
        if cond.shape[0] != 1:
            raise UsageError(
                f"RenormCFG takes a batch of one latent (ComfyUI's norm comparison fails on more), got {cond.shape[0]}"
            )
        if not float(torch.as_tensor(sigma).reshape(-1)[0]) < self.trunc:
            return cond
        out = uncond + scale * (cond - uncond)
        if self.renorm > 0.0:
            dims = tuple(range(1, cond.ndim))
            cap = torch.linalg.vector_norm(cond, dim=dims, keepdim=True) * self.renorm
            norm = torch.linalg.vector_norm(out, dim=dims, keepdim=True)
            if bool(norm >= cap):
                out = out * (cap / norm)
        return out


class _LatentOpHook:
    def __init__(self, op: Callable[[Tensor], Tensor]) -> None:
        if not callable(op):
            raise UsageError(f"LatentApplyOperationCFG takes a latent operation, got {type(op).__name__}")
        self.op = op

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor, uncond: Tensor, scale: float, has: bool) -> Any:
        return self.op(cond - uncond) + uncond, uncond


def _tcfg(x: Tensor, sigma: Tensor, cond: Tensor, uncond: Tensor, scale: float, has: bool) -> Any:
    if not has:
        return cond, uncond
    b = cond.shape[0]
    sc = (x - cond).reshape(b, 1, -1).float()
    su = (x - uncond).reshape(b, 1, -1).float()
    _, _, vh = torch.linalg.svd(torch.cat((su, sc), dim=1), full_matrices=False)
    v1 = vh[:, 0:1, :]
    damped = ((su @ v1.transpose(-2, -1)) * v1).reshape_as(uncond).to(uncond.dtype)
    return cond, x - damped


def _cfg_zero_star(x: Tensor, sigma: Tensor, out: Tensor, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    b = x.shape[0]
    p, n = (x - cond).reshape(b, -1), (x - uncond).reshape(b, -1)
    alpha = (p * n).sum(dim=1, keepdim=True) / ((n**2).sum(dim=1, keepdim=True) + 1e-8)
    alpha = alpha.reshape([b] + [1] * (x.ndim - 1))
    return out + uncond * (alpha - 1.0) + scale * uncond * (1.0 - alpha)


def _mahiro(x: Tensor, sigma: Tensor, out: Tensor, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    leap = cond * scale
    u_leap = uncond * scale
    merge = (leap + out) / 2
    normu = torch.sqrt(u_leap.abs()) * u_leap.sign()
    normm = torch.sqrt(merge.abs()) * merge.sign()
    sim = F.cosine_similarity(normu, normm).mean()
    s = 2 * (sim + 1)
    return (s * out + (4 - s) * leap) / 4


class _EpsilonScaling:
    def __init__(self, factor: float) -> None:
        self.factor = float(factor) if float(factor) != 0 else 1e-9  # ComfyUI's guard against a zero

    def __call__(self, x: Tensor, sigma: Tensor, out: Tensor, cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
        return x - (x - out) / self.factor
