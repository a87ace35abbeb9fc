"""Samplers: pure functions over an x0-denoiser, k-diffusion style (Karras et al. 2022 notation).

Every sampler has the same signature::

    sample_<name>(denoiser, x, sigmas, *, generators=None, callback=None, extra_args=None, **options) -> x

* ``denoiser(x, sigma, **extra_args) -> x0`` with ``x = x0 + sigma * eps`` (VE scaling; see denoisers.py);
  ``sigma`` is passed as a (B,) tensor. A denoiser with ``takes_step = True`` also gets
  ``step=SamplerStep(index, first)``: which grid step the call belongs to, given by the loop.
* ``x`` is the starting sample *in VE scaling* (noise * sigma-ish); ``sigmas`` is a decreasing (N+1,)
  tensor, ``sigmas[-1]`` the level the last step lands on (normally 0). The result is VE at that level. The
  deterministic ODE samplers of ``sampling.RISING_SIGMA_SAMPLERS`` also walk a rising list (unsampling), as written.
* ``generators``: one CPU ``torch.Generator`` per batch row. Ancestral/SDE samplers draw each step's
  noise per row, in step order, as ``randn((1, C, H, W), generator=generators[row])``, so a row never
  depends on the rest of its batch (docs/CONTRACTS.md, Seeds). Deterministic samplers ignore it. The SDE samplers
  (DPM++ SDE, 2M SDE, 2M SDE Heun, 3M SDE) also take a Brownian tree's noise in its place
  (:class:`sdengine.diffusion.brownian.BrownianNoise`, A1111's and ComfyUI's). ComfyUI's rule hands the other
  samplers a :class:`BatchNoise` instead: one generator drawing the whole batch's noise each step.
* ``callback(step, sigma, x, denoised)`` runs after each step with the new ``x`` and the step's x0
  estimate. Returning ``False`` (or raising :class:`SamplingInterrupted` itself) stops sampling: the
  sampler raises :class:`SamplingInterrupted`, which carries the step, ``x`` and ``denoised``.

Scalar coefficients are computed in Python floats (float64) once per step, so each step costs a handful
of tensor operations; the per-step work of the samplers themselves is what benchmarks/ measures.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch
from torch import Tensor

from sdengine.diffusion.brownian import BrownianNoise
from sdengine.diffusion.philox import NoiseGenerator, randn
from sdengine.errors import SdengineError, UsageError

Denoise = Callable[..., Tensor]
# one CPU generator per batch row (torch's, or diffusion.philox's NVIDIA numbers), or the per-step noise drawn
# from them beforehand (NoiseBank), or a Brownian tree's
# noise (the SDE samplers' under A1111's and ComfyUI's rules, sdengine.diffusion.brownian)
# or ComfyUI's one generator for the whole batch (BatchNoise)
Generators: TypeAlias = "Sequence[NoiseGenerator] | NoiseBank | BrownianNoise | BatchNoise"
Callback = Callable[[int, float, Tensor, Tensor], "bool | None"]


@dataclass(frozen=True)
class SamplerStep:
    """Where a denoiser call sits in the run: ``index`` is the 0-based step of the sampler's grid the call
    belongs to (a second-order sampler's midpoint call counts with the step it starts from, a call at the
    next grid point with that point), ``first`` marks the run's very first model call, ``sigma`` is the
    noise level of this very call (a midpoint's own sigma; ComfyUI's ControlNet window is judged on it)."""

    index: int
    first: bool = False
    sigma: float | None = None


class GuidanceParts:
    """What a CFG++ sampler asks of classifier-free guidance besides the guided x0: the unconditional x0 of the
    same call. A denoiser that declares ``takes_guidance_parts = True`` (the guidance wrapper, and the wrappers
    around it, which hand it on) is then called with ``guidance_parts=GuidanceParts()`` and fills ``uncond``,
    running its unconditional pass even at scale 1 (ComfyUI's CFG++ turns its scale-1 shortcut off too). A
    denoiser without guidance has no unconditional x0 apart from its own answer: :meth:`_Loop.model_guided` then
    takes that one, so a CFG++ sampler is its plain counterpart there."""

    __slots__ = ("uncond",)

    def __init__(self) -> None:
        self.uncond: Tensor | None = None


class SamplingInterrupted(SdengineError):
    """Raised when a callback stops sampling; ``x`` is the sample after ``step``, ``denoised`` its x0."""

    def __init__(self, step: int, x: Tensor, denoised: Tensor) -> None:
        super().__init__(f"sampling stopped by the callback after step {step}")
        self.step = step
        self.x = x
        self.denoised = denoised


# ---------------------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------------------


def row_noise(generators: Sequence[NoiseGenerator], shape: Sequence[int]) -> Tensor:
    """THE per-row noise draw: ``randn((1, *shape), generator=g)`` for each row's generator, float32 on the
    CPU, stacked. Start noise, per-step noise of the ancestral/SDE samplers and every caller use it, so a
    row's numbers never depend on its batch. A row's generator may be a
    :class:`sdengine.diffusion.philox.PhiloxGenerator` (NVIDIA's numbers, A1111's NV source)."""
    return torch.cat([randn((1, *shape), g) for g in generators])


class NoiseBank:
    """Per-step noise drawn before sampling, handed to a sampler in place of its ``generators``: the sampler's
    k-th draw is ``draws[k]`` (each (B, C, H, W), drawn beforehand by :func:`row_noise` from the rows'
    generators in the order the sampler asks, so the numbers are the ones it would have drawn). What a sampling
    loop recorded as one CUDA graph reads (sdengine.pipeline.loop_graph): the graph cannot call the CPU
    generators, but it reads a device tensor refilled before every replay.

    ``draws=None`` counts the draws instead (each one zeros): :func:`sdengine.diffusion.sampling.noise_draws`.
    """

    def __init__(self, draws: Tensor | None, batch: int) -> None:
        if draws is not None and (draws.ndim < 2 or draws.shape[1] != batch):
            raise UsageError(f"noise bank of shape {tuple(draws.shape)} for a batch of {batch}")
        self.draws = draws
        self.batch = batch
        self.used = 0

    def __len__(self) -> int:  # one "generator" per batch row, as sample() checks
        return self.batch

    def next_noise(self, like: Tensor) -> Tensor:
        k, self.used = self.used, self.used + 1
        if self.draws is None:
            return torch.zeros_like(like)
        if k >= self.draws.shape[0]:
            raise UsageError(f"the sampler asked for noise draw {k + 1} of a bank of {self.draws.shape[0]}")
        return self.draws[k].to(dtype=like.dtype)


class BatchNoise:
    """ComfyUI's per-step noise (its k-diffusion ``default_noise_sampler``, seeded by the sampler's seed): ONE CPU
    generator, ``Generator().manual_seed(seed)``, draws each step's noise for the whole batch at once,
    ``randn(x.shape)``, so a row's noise depends on the batch it is in. ``churn``: the generator of the Karras churn
    noise of Euler, Heun, DPM2 and Heun++ (``torch.randn_like``: torch's global generator, which ComfyUI's
    ``prepare_noise`` seeded with the seed and drew the start noise from); None draws it from ``step`` too.
    Handed to a sampler as its ``generators`` (``len`` is the batch, as :func:`sdengine.diffusion.sampling.sample`
    checks); float32 draws on the CPU, as ComfyUI's on a CPU."""

    def __init__(self, batch: int, step: torch.Generator, churn: torch.Generator | None = None) -> None:
        self.batch = batch
        self.step = step
        self.churn = churn if churn is not None else step

    @classmethod
    def seeded(cls, batch: int, seed: int, churn: torch.Generator | None = None) -> BatchNoise:
        """ComfyUI's: the step generator seeded by ``seed`` (any value in [0, 2**64 - 1])."""
        return cls(batch, torch.Generator("cpu").manual_seed(int(seed)), churn)

    def __len__(self) -> int:
        return self.batch

    def draw(self, shape: Sequence[int], *, churn: bool = False) -> Tensor:
        """The next ``randn(shape)`` (the whole batch) from the step generator, or from the churn one."""
        return torch.randn(tuple(shape), generator=self.churn if churn else self.step, dtype=torch.float32)


class _Loop:
    """The bits every sampler shares: float sigmas, the (B,) sigma tensors, noise, callbacks."""

    def __init__(
        self,
        denoiser: Denoise,
        x: Tensor,
        sigmas: Tensor,
        generators: Generators | None,
        callback: Callback | None,
        extra_args: dict[str, Any] | None,
    ) -> None:
        if sigmas.ndim != 1 or sigmas.shape[0] < 2:
            raise UsageError("sigmas must be a 1-D tensor of at least 2 values (start ... end)")
        if generators is not None and len(generators) != x.shape[0]:
            raise UsageError(f"need one generator per batch row: {x.shape[0]} rows, {len(generators)} generators")
        self.denoiser = denoiser
        # Calls at sigmas that are not grid points (midpoints) go to `off_grid` when the denoiser pins
        # grid timesteps (Denoiser.with_timesteps): a midpoint may coincide with a grid sigma (DPM2 a's
        # always does) yet diffusers hands the network the interpolated timestep there.
        self.off_grid = getattr(denoiser, "off_grid", denoiser)
        self.s = [float(v) for v in sigmas.detach().cpu()]
        self.n = len(self.s) - 1
        self.batch = x.shape[0]
        self.generators = generators
        self.callback = callback
        self.extra = extra_args or {}
        self.device, self.dtype = x.device, x.dtype
        self.takes_step = bool(getattr(denoiser, "takes_step", False))
        self.calls = 0  # model calls so far in this run (the first one is marked in SamplerStep)

    def model(
        self, x: Tensor, sigma: float, *, step: int, on_grid: bool = True, parts: GuidanceParts | None = None
    ) -> Tensor:
        """The denoiser at ``sigma`` during step ``step`` (0-based, the grid point the call belongs to).
        A denoiser with ``takes_step = True`` is also handed ``step=SamplerStep(...)``, so that wrappers
        that act per step (ControlNet start/end, inpaint blending) read it instead of inferring it.
        ``parts``: handed on as ``guidance_parts=`` (only to a denoiser that takes it: :meth:`model_guided`)."""
        # On the CPU whatever the device: denoisers read it back as a Python float (no device sync per step).
        s_in = torch.full((self.batch,), sigma, dtype=torch.float32)
        den = self.denoiser if on_grid else self.off_grid
        extra = self.extra if parts is None else {**self.extra, "guidance_parts": parts}
        if self.takes_step:
            first, self.calls = self.calls == 0, self.calls + 1
            return den(x, s_in, step=SamplerStep(step, first, float(sigma)), **extra)
        return den(x, s_in, **extra)

    def model_guided(self, x: Tensor, sigma: float, *, step: int, on_grid: bool = True) -> tuple[Tensor, Tensor]:
        """(guided x0, unconditional x0) of one denoiser call, for the CFG++ samplers (:class:`GuidanceParts`);
        a denoiser without guidance answers its own x0 for both."""
        den = self.denoiser if on_grid else self.off_grid
        if not getattr(den, "takes_guidance_parts", False):
            denoised = self.model(x, sigma, step=step, on_grid=on_grid)
            return denoised, denoised
        parts = GuidanceParts()
        denoised = self.model(x, sigma, step=step, on_grid=on_grid, parts=parts)
        if parts.uncond is None:
            raise UsageError(f"{type(den).__name__} takes guidance_parts but left its unconditional x0 unset")
        return denoised, parts.uncond

    def model_rows(self, x: Tensor, sigmas: Sequence[float], *, step: int) -> Tensor:
        """The denoiser with each row at its own sigma (all off the grid); one sigma for all is :meth:`model`.
        A ``takes_step`` denoiser's ``SamplerStep.sigma`` is then the highest of them."""
        if all(v == sigmas[0] for v in sigmas):
            return self.model(x, sigmas[0], step=step, on_grid=False)
        s_in = torch.tensor(list(sigmas), dtype=torch.float32)
        if self.takes_step:
            first, self.calls = self.calls == 0, self.calls + 1
            return self.off_grid(x, s_in, step=SamplerStep(step, first, max(sigmas)), **self.extra)
        return self.off_grid(x, s_in, **self.extra)

    @property
    def brownian(self) -> bool:
        """Whether the step noise is a Brownian tree's (:meth:`step_noise`)."""
        return isinstance(self.generators, BrownianNoise)

    def step_noise(self, x: Tensor, sigma: float, sigma_next: float) -> Tensor:
        """The SDE samplers' noise of a step from ``sigma`` to ``sigma_next``: a Brownian tree's increment over it
        (:class:`sdengine.diffusion.brownian.BrownianNoise` handed as ``generators``), else :meth:`noise`."""
        if isinstance(self.generators, BrownianNoise):
            return self.generators.between(sigma, sigma_next).to(device=self.device, dtype=self.dtype)
        return self.noise(x)

    def noise(self, x: Tensor) -> Tensor:
        """Standard normal noise, each row from its own generator (shape (1, C, H, W) per draw)."""
        if self.generators is None:
            raise UsageError("this sampler draws noise each step: pass generators=[torch.Generator(), ...]")
        if isinstance(self.generators, BrownianNoise):
            raise UsageError("Brownian noise is the SDE samplers' (DPM++ SDE, 2M SDE, 3M SDE); this one draws rows")
        if isinstance(self.generators, NoiseBank):
            return self.generators.next_noise(x)
        if isinstance(self.generators, BatchNoise):
            return self.generators.draw(x.shape).to(device=self.device, dtype=self.dtype)
        return row_noise(self.generators, tuple(x.shape[1:])).to(device=self.device, dtype=self.dtype)

    def churn_noise(self, x: Tensor) -> Tensor:
        """The Karras churn's noise (:func:`churn`): :meth:`noise`, except that ComfyUI's (:class:`BatchNoise`)
        comes from its churn generator."""
        if isinstance(self.generators, BatchNoise):
            return self.generators.draw(x.shape, churn=True).to(device=self.device, dtype=self.dtype)
        return self.noise(x)

    def done(self, i: int, x: Tensor, denoised: Tensor) -> None:
        if self.callback is not None and self.callback(i, self.s[i], x, denoised) is False:
            raise SamplingInterrupted(i, x, denoised)


def float32_midpoint(sigma: float, sigma_next: float) -> float:
    """DPM++ SDE's midpoint ``exp(-(lambda + h / 2))``, lambda = -log sigma, h = lambda' - lambda, in float32 tensor
    arithmetic as k-diffusion (ComfyUI's ``sigma_s_1``): where its Brownian tree is read."""
    lam = torch.tensor(sigma, dtype=torch.float32).log().neg()
    lam_next = torch.tensor(sigma_next, dtype=torch.float32).log().neg()
    return float((lam + 0.5 * (lam_next - lam)).neg().exp())


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to ``sigma_down`` and fresh noise ``sigma_up``, so the
    marginal at ``sigma_to`` is right (Song et al. 2021 DDIM eq. 16 with eta, in VE form; k-diffusion)."""
    if not eta or sigma_to == 0.0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(max(sigma_to**2 - up**2, 0.0)), up


def _euler_to(x: Tensor, denoised: Tensor, sigma: float, sigma_to: float) -> Tensor:
    """``x + (x - denoised) / sigma * (sigma_to - sigma)``, written as one lerp."""
    return torch.lerp(denoised, x, sigma_to / sigma)


def churn(
    loop: _Loop,
    x: Tensor,
    i: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    *,
    every_step: bool = False,
) -> tuple[Tensor, float]:
    """Karras et al. 2022's stochastic "churn" (Algorithm 2, lines 4-6), as k-diffusion's Euler, Heun and DPM2
    take it: where ``s_tmin <= sigma_i <= s_tmax`` the sample is noised up to ``sigma_hat = sigma_i (1 + gamma)``,
    ``gamma = min(s_churn / steps, sqrt(2) - 1)``, with fresh noise scaled by ``s_noise``; the step then starts
    from ``sigma_hat``. Returns (x, sigma_hat); no noise is drawn where gamma is 0 (the default), except that
    ``every_step`` draws (and drops) one each step from ComfyUI's churn generator (:class:`BatchNoise`), as its
    Heun++ does."""
    sigma = loop.s[i]
    gamma = min(s_churn / loop.n, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    eps = loop.churn_noise(x) if every_step and isinstance(loop.generators, BatchNoise) else None
    if gamma <= 0:
        return x, sigma
    sigma_hat = sigma * (gamma + 1)
    eps = loop.churn_noise(x) if eps is None else eps
    return x + eps * (s_noise * math.sqrt(sigma_hat**2 - sigma**2)), sigma_hat


# ---------------------------------------------------------------------------------------------------
# First-order and ancestral
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler method on the probability-flow ODE (Karras et al. 2022, Algorithm 2; its churn, :func:`churn`,
    off by default)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        x, sigma = churn(loop, x, i, s_churn, s_tmin, s_tmax, s_noise)
        denoised = loop.model(x, sigma, step=i, on_grid=sigma == loop.s[i])
        x = _euler_to(x, denoised, sigma, loop.s[i + 1])
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_euler_a(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    flow: bool = False,
) -> Tensor:
    """Ancestral Euler: an Euler step to sigma_down plus fresh noise of size sigma_up (k-diffusion). ``flow``: on a
    flow model's ``x = (1 - s) x0 + s eps`` (sdengine.diffusion.flow), with :func:`flow_ancestral_step`'s split."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if flow:
            down, rescale, up = flow_ancestral_step(sigma, sigma_next, eta)
            x = _euler_to(x, denoised, sigma, down) * rescale
        else:
            down, up = ancestral_step(sigma, sigma_next, eta)
            x = _euler_to(x, denoised, sigma, down)
        if sigma_next > 0 and (eta > 0 or not flow):  # ComfyUI's flow rule draws nothing at eta 0
            x = x + loop.noise(x) * up
        loop.done(i, x, denoised)
    return x


def flow_ancestral_step(s_from: float, s_to: float, eta: float = 1.0) -> tuple[float, float, float]:
    """ComfyUI's ancestral step on a flow model (its ``sample_euler_ancestral_RF``): (s_down, rescale, noise).
    Euler goes down to ``s_down = s_to (1 + (s_to / s_from - 1) eta)``, where ``x = (1 - s_down) x0 + s_down eps``;
    ``rescale = (1 - s_to) / (1 - s_down)`` brings x0's share to ``1 - s_to``, leaving noise of size ``s_down
    rescale``, and fresh noise of size ``sqrt(s_to^2 - (s_down rescale)^2)`` tops it up to ``s_to``. At ``s_to = 0``
    the step is x0 itself (0, 1, 0)."""
    if s_to == 0.0:
        return 0.0, 1.0, 0.0
    down = s_to * (1 + (s_to / s_from - 1) * eta)
    rescale = (1 - s_to) / (1 - down)
    return down, rescale, math.sqrt(max(s_to**2 - (down * rescale) ** 2, 0.0))


@torch.no_grad()
def sample_ddim(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 0.0,
    targets: Tensor | None = None,
) -> Tensor:
    """DDIM (Song et al. 2021, eq. 12) in VE form: ``x' = x0 + sqrt(tau^2 - s_up^2) eps + s_up z``, which
    at eta=0 is an Euler step and at eta=1 the DDPM posterior sample.

    ``targets[i]`` is the sigma step i lands on when it differs from ``sigmas[i+1]`` (diffusers' DDIM
    steps from t to t - T//N); the VP sample is then carried over unchanged to the next grid point,
    exactly as diffusers does, which in VE means rescaling by ``sqrt(1 + s_next^2) / sqrt(1 + tau^2)``.
    """
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    tau = loop.s[1:] if targets is None else [float(v) for v in targets.detach().cpu()]
    for i in range(loop.n):
        sigma, to = loop.s[i], tau[i]
        denoised = loop.model(x, sigma, step=i)
        up = eta * math.sqrt(to**2 * (sigma**2 - to**2) / sigma**2) if to > 0 else 0.0
        down = math.sqrt(max(to**2 - up**2, 0.0))
        x = _euler_to(x, denoised, sigma, down)
        if up > 0:
            x = x + loop.noise(x) * up
        if i + 1 < loop.n and to != loop.s[i + 1]:
            x = x * math.sqrt((1 + loop.s[i + 1] ** 2) / (1 + to**2))
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    clip_denoised: float | None = None,
) -> Tensor:
    """Ancestral sampling from the DDPM posterior q(x_{t'} | x_t, x0) (Ho et al. 2020, Algorithm 2,
    eqs. 6-7, variance beta-tilde), stepping between the grid's timesteps; ``clip_denoised`` clamps x0
    first as the original pixel-space DDPM does."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, to = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if clip_denoised is not None:
            denoised = denoised.clamp(-clip_denoised, clip_denoised)
        # Posterior of a DDPM step == DDIM with eta = 1 (Song 2021, section 4.1), in VE form.
        down, up = ancestral_step(sigma, to, 1.0)
        x = _euler_to(x, denoised, sigma, down)
        if up > 0:
            x = x + loop.noise(x) * up
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# Second order (two model calls per step)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_heun(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Algorithm 1; with its churn, :func:`churn`, Algorithm 2);
    Euler on the last step to sigma 0."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        x, sigma = churn(loop, x, i, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i, on_grid=sigma == loop.s[i])
        x_euler = _euler_to(x, denoised, sigma, sigma_next)
        if sigma_next == 0:
            x = x_euler
        else:
            denoised_2 = loop.model(x_euler, sigma_next, step=i + 1)  # grid point i + 1
            d = (x - denoised) / sigma
            d_2 = (x_euler - denoised_2) / sigma_next
            x = x + (d + d_2) * ((sigma_next - sigma) / 2)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-2 (Lu et al. 2022, "DPM-Solver", Algorithm 1) as k-diffusion's midpoint method with
    the midpoint at the geometric mean of the two sigmas; Euler on the last step to sigma 0. Churn as
    :func:`churn`."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        x, sigma = churn(loop, x, i, s_churn, s_tmin, s_tmax, s_noise)
        sigma_next = loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i, on_grid=sigma == loop.s[i])
        if sigma_next == 0:
            x = _euler_to(x, denoised, sigma, sigma_next)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            x_2 = _euler_to(x, denoised, sigma, sigma_mid)
            denoised_2 = loop.model(x_2, sigma_mid, step=i, on_grid=False)
            x = x + (x_2 - denoised_2) * ((sigma_next - sigma) / sigma_mid)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpm2_a(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver-2 (Lu et al. 2022; k-diffusion): midpoint step to sigma_down, then noise (scaled
    by ``s_noise``, k-diffusion's)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0:
            x = _euler_to(x, denoised, sigma, down)
        else:
            sigma_mid = _log_midpoint(sigma, down)
            x_2 = _euler_to(x, denoised, sigma, sigma_mid)
            denoised_2 = loop.model(x_2, sigma_mid, step=i, on_grid=False)
            x = x + (x_2 - denoised_2) * ((down - sigma) / sigma_mid)
            x = x + loop.noise(x) * (up * s_noise)
        loop.done(i, x, denoised)
    return x


def _log_midpoint(a: float, b: float) -> float:
    """exp(lerp(log a, log b, 1/2)) in float32, the value diffusers' KDPM2 tables hold."""
    t = torch.tensor([a, b], dtype=torch.float32).log()
    return float(torch.lerp(t[0], t[1], 0.5).exp())


# ---------------------------------------------------------------------------------------------------
# Linear multistep
# ---------------------------------------------------------------------------------------------------


def lms_coefficient(sigmas: Sequence[float], order: int, i: int, j: int) -> float:
    """Integral over [sigma_i, sigma_{i+1}] of the Lagrange basis polynomial of node sigma_{i-j} on the
    nodes sigma_i ... sigma_{i-order+1} (Adams-Bashforth on a non-uniform grid; k-diffusion's LMS).
    Computed exactly as a polynomial integral rather than by quadrature."""
    poly = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            poly = poly * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    antideriv = poly.integ()
    return float(antideriv(sigmas[i + 1]) - antideriv(sigmas[i]))


@torch.no_grad()
def sample_lms(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    order: int = 4,
) -> Tensor:
    """Linear multistep (Adams-Bashforth, up to ``order``) on dx/dsigma = (x - x0) / sigma (Karras 2022
    / k-diffusion's LMS; Liu et al. 2022 discuss multistep methods for diffusion ODEs)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    ds: list[Tensor] = []
    for i in range(loop.n):
        sigma = loop.s[i]
        denoised = loop.model(x, sigma, step=i)
        ds.append((x - denoised) / sigma)
        if len(ds) > order:
            ds.pop(0)
        cur = min(i + 1, order)
        for j, d in enumerate(reversed(ds)):
            x = x + lms_coefficient(loop.s, cur, i, j) * d
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_plms(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    targets: Tensor | None = None,
    prediction: str = "epsilon",
    corrector_from: float | None = None,
) -> Tensor:
    """Pseudo linear multistep (Liu et al. 2022, "PNDM", eq. 12 with the DDIM transfer eq. 11): an
    improved-Euler first step, then Adams-Bashforth 2/3/4. ``targets`` as in :func:`sample_ddim`.
    In VE the transfer with noise estimate e is simply ``x + (sigma_to - sigma) e``. The multistep
    combination is taken over the network's raw outputs, as diffusers' PNDMScheduler does, so for a
    ``v_prediction`` network the v's are combined and then turned into eps at the current point."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    tau = loop.s[1:] if targets is None else [float(v) for v in targets.detach().cpu()]
    use_v = prediction == "v_prediction"

    def carry(x: Tensor, i: int) -> Tensor:  # keep the VP sample when landing off-grid (diffusers)
        if i + 1 < loop.n and tau[i] != loop.s[i + 1]:
            return x * math.sqrt((1 + loop.s[i + 1] ** 2) / (1 + tau[i] ** 2))
        return x

    def raw(x: Tensor, denoised: Tensor, sigma: float) -> Tensor:
        e = (x - denoised) / sigma
        return (e - denoised * sigma) / math.sqrt(1 + sigma**2) if use_v else e

    def to_eps(out: Tensor, x: Tensor, sigma: float) -> Tensor:
        if not use_v:
            return out
        c = math.sqrt(1 + sigma**2)
        return (out + x * (sigma / c)) / c  # eps = sqrt(a) v + sqrt(1 - a) x_VP

    outs: list[Tensor] = []
    for i in range(loop.n):
        sigma, to = loop.s[i], tau[i]
        denoised = loop.model(x, sigma, step=i)
        out = raw(x, denoised, sigma)
        if i == 0:
            x_pred = carry(x + to_eps(out, x, sigma) * (to - sigma), i)
            if loop.n == 1:
                x = x_pred
            else:
                # Second call at the next grid point, then redo the step from x with the mean output,
                # landing exactly on that grid point. diffusers takes this step from t_1 + T // N
                # (`corrector_from`), which is t_0 only for leading spacing: x is read there unchanged in
                # VP scaling.
                out_2 = raw(x_pred, loop.model(x_pred, loop.s[1], step=1), loop.s[1])
                src = sigma if corrector_from is None else corrector_from
                x_src = x * math.sqrt((1 + src**2) / (1 + sigma**2))
                x = x_src + to_eps((out + out_2) / 2, x_src, src) * (loop.s[1] - src)
            outs.append(out)
        else:
            outs.append(out)
            outs = outs[-4:]
            if len(outs) == 2:
                out = (3 * outs[-1] - outs[-2]) / 2
            elif len(outs) == 3:
                out = (23 * outs[-1] - 16 * outs[-2] + 5 * outs[-3]) / 12
            else:
                out = (55 * outs[-1] - 59 * outs[-2] + 37 * outs[-3] - 9 * outs[-4]) / 24
            x = carry(x + to_eps(out, x, sigma) * (to - sigma), i)
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# DPM-Solver++ family (Lu et al. 2022, "DPM-Solver++"), in lambda = -log sigma
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2): multistep 2nd order in x0, first order on the
    first step and on the step to sigma 0."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    old: Tensor | None = None
    h_last = 0.0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            if old is None:
                d = denoised
            else:
                r = h_last / h
                d = denoised * (1 + 1 / (2 * r)) - old * (1 / (2 * r))
            x = torch.lerp(d, x, sigma_next / sigma)  # (s'/s) x - expm1(-h) d, since expm1(-h) = s'/s - 1
            h_last = h
        old = denoised
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, section 5 / appendix, midpoint form as in k-diffusion and
    diffusers' "sde-dpmsolver++"); ``s_noise`` scales the fresh noise (k-diffusion's)."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, heun=False)


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(2M) SDE with the Heun-type second-order term (k-diffusion's ``solver_type="heun"``, A1111's
    "DPM++ 2M SDE Heun"): the difference of the last two x0 estimates weighted by ``(1 - e^-hh) / -hh + 1``,
    ``hh = (1 + eta) h``, instead of the midpoint's ``(1 - e^-hh) / 2``."""
    return _dpmpp_2m_sde(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, heun=True)


def _dpmpp_2m_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    eta: float,
    s_noise: float,
    *,
    heun: bool,
) -> Tensor:
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    old: Tensor | None = None
    h_last = 0.0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            eta_h = eta * h
            coef = -math.expm1(-h - eta_h)
            x = x * (sigma_next / sigma * math.exp(-eta_h)) + denoised * coef
            if old is not None:
                r = h_last / h
                weight = (coef / (-h - eta_h) + 1) if heun else 0.5 * coef
                x = x + (denoised - old) * (weight / r)
            if eta:
                x = x + loop.step_noise(x, sigma, sigma_next) * (
                    sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
                )
            h_last = h
        old = denoised
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++ SDE, 2nd-order singlestep with the midpoint at r = 1/2 in lambda (Lu et al. 2022;
    k-diffusion's sample_dpmpp_sde). Noise comes from the row generators, or from a Brownian tree handed as
    ``generators`` (A1111's and ComfyUI's, :mod:`sdengine.diffusion.brownian`); ``s_noise`` scales it
    (k-diffusion's)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if sigma_next == 0:
            x = _euler_to(x, denoised, sigma, sigma_next)
        else:
            t, t_next = -math.log(sigma), -math.log(sigma_next)
            sigma_mid = math.exp(-(t + (t_next - t) / 2))
            down, up = ancestral_step(sigma, sigma_mid, eta)
            x_2 = torch.lerp(denoised, x, down / sigma)
            if up > 0:
                # a Brownian tree is read at the midpoint as k-diffusion computes it (float32)
                mid = float32_midpoint(sigma, sigma_next) if loop.brownian else sigma_mid
                x_2 = x_2 + loop.step_noise(x, sigma, mid) * (up * s_noise)
            denoised_2 = loop.model(x_2, sigma_mid, step=i, on_grid=False)
            down, up = ancestral_step(sigma, sigma_next, eta)
            x = torch.lerp(denoised_2, x, down / sigma)
            if up > 0:
                x = x + loop.step_noise(x, sigma, sigma_next) * (up * s_noise)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_a(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with r = 1/2; k-diffusion's
    sample_dpmpp_2s_ancestral, A1111's "DPM++ 2S a"): each step splits into a deterministic part down to
    sigma_down (:func:`ancestral_step`), solved by the second-order singlestep update with its midpoint halfway
    in lambda = -log sigma, then fresh noise of size sigma_up (scaled by ``s_noise``). A step down to sigma 0
    is a plain Euler step."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0.0:
            x = _euler_to(x, denoised, sigma, down)
        else:
            sigma_mid = math.sqrt(sigma * down)  # exp(-(t + h / 2)) with t = -log sigma, h = log(sigma / down)
            x_2 = torch.lerp(denoised, x, sigma_mid / sigma)  # (s_mid / s) x - expm1(-h / 2) x0
            denoised_2 = loop.model(x_2, sigma_mid, step=i, on_grid=False)
            x = torch.lerp(denoised_2, x, down / sigma)
        if sigma_next > 0 and up > 0:
            x = x + loop.noise(x) * (up * s_noise)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022, the third-order multistep data-prediction solver, in the SDE form
    of k-diffusion's sample_dpmpp_3m_sde, A1111's "DPM++ 3M SDE"): with ``h_eta = (1 + eta) h`` the step is
    ``x' = e^-h_eta x + (1 - e^-h_eta) x0`` plus the first and second divided differences of the last three x0
    estimates (weights phi_2 = (1 - e^-h_eta) / -h_eta + 1 and phi_3 = phi_2 / h_eta - 1/2), lower order on
    the first two steps, then fresh noise of size ``sigma' sqrt(1 - e^(-2 eta h)) s_noise``; the step to sigma 0
    returns x0. ``eta=0`` is the deterministic DPM-Solver++(3M)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    d_1: Tensor | None = None  # x0 estimates of the last two steps
    d_2: Tensor | None = None
    h_1 = h_2 = 0.0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        h = 0.0
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma) - math.log(sigma_next)
            h_eta = h * (eta + 1)
            x = x * math.exp(-h_eta) + denoised * (-math.expm1(-h_eta))
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if d_2 is not None and d_1 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif d_1 is not None:
                x = x + (denoised - d_1) * (phi_2 / (h_1 / h))
            if eta:
                noise = loop.step_noise(x, sigma, sigma_next)
                x = x + noise * (sigma_next * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise)
        d_1, d_2 = denoised, d_1
        h_1, h_2 = h, h_1
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# CFG++ (Chung et al. 2024, "CFG++: manifold-constrained classifier free guidance"), as ComfyUI runs it: the
# step's x0 is the guided one, the direction that renoises it (the noise estimate) the unconditional one's.
# Each model call hands out both (_Loop.model_guided, GuidanceParts); without guidance they are one.
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
) -> Tensor:
    """Euler with CFG++ (ComfyUI's ``euler_cfg_pp``): ``x' = x0_guided + sigma' (x - x0_uncond) / sigma``."""
    return _euler_a_cfg_pp(denoiser, x, sigmas, generators, callback, extra_args, 0.0, 0.0)


@torch.no_grad()
def sample_euler_a_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral Euler with CFG++ (ComfyUI's ``euler_ancestral_cfg_pp``): ``x' = x0_guided + sigma_down (x -
    x0_uncond) / sigma`` plus fresh noise of size ``sigma_up * s_noise`` (:func:`ancestral_step` with ``eta``)."""
    return _euler_a_cfg_pp(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise)


def _euler_a_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    eta: float,
    s_noise: float,
) -> Tensor:
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised, uncond = loop.model_guided(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
        else:
            down, up = ancestral_step(sigma, sigma_next, eta)
            x = denoised + (x - uncond) * (down / sigma)
            if up > 0 and s_noise > 0:
                x = x + loop.noise(x) * (up * s_noise)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
) -> Tensor:
    """DPM-Solver++(2M) with CFG++ (ComfyUI's ``dpmpp_2m_cfg_pp``): ``x' = x0_guided + (sigma'/sigma) (x -
    x0_uncond) + (1 - sigma'/sigma) / (2 r) (x0_guided - x0_uncond_prev)``, ``r = h_last / h`` in lambda = -log
    sigma; the first step without the last term; the step to sigma 0 returns the guided x0."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    old_uncond: Tensor | None = None
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised, uncond = loop.model_guided(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
        else:
            ratio = sigma_next / sigma  # e^-h
            x = denoised + (x - uncond) * ratio
            if old_uncond is not None:
                r = (math.log(loop.s[i - 1]) - math.log(sigma)) / (math.log(sigma) - math.log(sigma_next))
                x = x + (denoised - old_uncond) * ((1 - ratio) / (2 * r))
        old_uncond = uncond
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_dpmpp_2s_a_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) with CFG++ (ComfyUI's ``dpmpp_2s_ancestral_cfg_pp``): the step of
    :func:`sample_dpmpp_2s_a` walked with the unconditional x0 (at the start and at the midpoint), then fresh
    noise, then the start's guidance vector ``x0_guided - x0_uncond`` added."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised, uncond = loop.model_guided(x, sigma, step=i)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0.0:
            x = uncond
        else:
            sigma_mid = math.sqrt(sigma * down)
            x_2 = torch.lerp(uncond, x, sigma_mid / sigma)
            _, uncond_2 = loop.model_guided(x_2, sigma_mid, step=i, on_grid=False)
            x = torch.lerp(uncond_2, x, down / sigma)
        if sigma_next > 0 and up > 0 and s_noise > 0:
            x = x + loop.noise(x) * (up * s_noise)
        x = x + (denoised - uncond)
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# RES multistep (Zhang & Chen 2023, "Improved order analysis of exponential integrators", arXiv 2308.02157)
# ---------------------------------------------------------------------------------------------------


def _phi_1(z: float) -> float:
    return math.expm1(z) / z if z else 1.0


def _phi_2(z: float) -> float:
    return (_phi_1(z) - 1.0) / z if z else 0.5


@torch.no_grad()
def sample_res_multistep(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
) -> Tensor:
    """ComfyUI's ``res_multistep``: the second-order multistep exponential integrator of the RES paper in x0 and
    lambda = -log sigma (phi_1 / phi_2 weights on this and the last x0 estimate); Euler on the first step and
    on the step to sigma 0."""
    return _res_multistep(denoiser, x, sigmas, generators, callback, extra_args, 0.0, 1.0, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_a(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """ComfyUI's ``res_multistep_ancestral``: :func:`sample_res_multistep` down to sigma_down, then fresh noise
    of size ``sigma_up * s_noise`` (:func:`ancestral_step` with ``eta``)."""
    return _res_multistep(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, cfg_pp=False)


@torch.no_grad()
def sample_res_multistep_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
) -> Tensor:
    """ComfyUI's ``res_multistep_cfg_pp``: :func:`sample_res_multistep` with CFG++ (the unconditional x0 in the
    update, the guidance vector added before it)."""
    return _res_multistep(denoiser, x, sigmas, generators, callback, extra_args, 0.0, 1.0, cfg_pp=True)


@torch.no_grad()
def sample_res_multistep_a_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """ComfyUI's ``res_multistep_ancestral_cfg_pp``: :func:`sample_res_multistep_a` with CFG++."""
    return _res_multistep(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, cfg_pp=True)


def _res_multistep(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    eta: float,
    s_noise: float,
    *,
    cfg_pp: bool,
) -> Tensor:
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    old: Tensor | None = None
    old_down = 0.0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        if cfg_pp:
            denoised, uncond = loop.model_guided(x, sigma, step=i)
        else:
            denoised = uncond = loop.model(x, sigma, step=i)
        down, up = ancestral_step(sigma, sigma_next, eta)
        if down == 0 or old is None:
            # Euler (CFG++: the guided x0 renoised along the unconditional direction)
            x = denoised + (x - uncond) * (down / sigma)
        else:
            t, t_next = -math.log(sigma), -math.log(down)
            t_old, t_prev = -math.log(old_down), -math.log(loop.s[i - 1])
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1, phi2 = _phi_1(-h), _phi_2(-h)
            b1, b2 = (phi1 - phi2 / c2, phi2 / c2) if c2 else (phi1, 0.0)
            if cfg_pp:
                x = x + (denoised - uncond)
            x = x * math.exp(-h) + uncond * (h * b1) + old * (h * b2)
        if sigma_next > 0 and up > 0 and s_noise > 0:
            x = x + loop.noise(x) * (up * s_noise)
        old, old_down = uncond, down
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# ER-SDE-Solver (Cui et al. 2023, "Elucidating the solution space of extended reverse-time SDEs", arXiv 2309.06169)
# ---------------------------------------------------------------------------------------------------


def _power_noise_scaler(power: float, v: float) -> float:
    """The reverse-time SDE's noise scale function ``x^(eta + 1)`` (``power`` = eta + 1; ComfyUI's SamplerER_SDE)."""
    return v**power


def _er_sde_noise_scaler(v: float) -> float:
    """ER-SDE-Solver's default noise scale function (the paper's and ComfyUI's): ``x (e^(x^0.3) + 10)``."""
    return v * (math.exp(v**0.3) + 10.0)


@torch.no_grad()
def sample_er_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_noise: float = 1.0,
    max_stage: int = 3,
    reverse_time_eta: float | None = None,
) -> Tensor:
    """ER-SDE-Solver-3 (Cui et al. 2023; ComfyUI's ``er_sde``) in VE form, where the paper's lambda is sigma: with
    ``r = f(sigma') / f(sigma)`` (:func:`_er_sde_noise_scaler`) the first stage is ``x' = r x + (1 - r) x0``;
    stages 2 and 3 add the first and second divided differences of the last x0 estimates in sigma, weighted by
    the integrals of 1/f and (lambda - sigma)/f over the step (200-point sums, as the paper's code), then fresh
    noise ``sqrt(sigma'^2 - r^2 sigma^2) * s_noise``. ``max_stage`` 1 .. 3; the step to sigma 0 returns x0.
    ``reverse_time_eta``: the noise scale function ``x^(eta + 1)`` in place of ER-SDE's, the reverse-time SDE
    (ComfyUI's SamplerER_SDE "Reverse-time SDE"; eta 0 with s_noise 0 is its "ODE", whose first stage is Euler's
    step)."""
    if isinstance(max_stage, bool) or max_stage not in (1, 2, 3):
        raise UsageError(f"er_sde max_stage must be 1, 2 or 3, got {max_stage}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    f = _er_sde_noise_scaler
    if reverse_time_eta is not None:
        if isinstance(reverse_time_eta, bool) or not 0.0 <= float(reverse_time_eta) < math.inf:
            raise UsageError(f"er_sde reverse_time_eta must be a number of at least 0, got {reverse_time_eta!r}")
        f = functools.partial(_power_noise_scaler, float(reverse_time_eta) + 1.0)
    points = 200
    old: Tensor | None = None
    old_d: Tensor | None = None
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        stage = min(int(max_stage), i + 1)
        if sigma_next == 0:
            x = denoised
        else:
            r = f(sigma_next) / f(sigma)
            x = torch.lerp(denoised, x, r)
            if stage >= 2 and old is not None:
                dt = sigma_next - sigma
                step_size = -dt / points
                pos = [sigma_next + k * step_size for k in range(points)]
                s_1 = sum(1 / f(p) for p in pos) * step_size
                d = (denoised - old) / (sigma - loop.s[i - 1])
                x = x + d * (dt + s_1 * f(sigma_next))
                if stage >= 3 and old_d is not None:
                    s_u = sum((p - sigma) / f(p) for p in pos) * step_size
                    u = (d - old_d) / ((sigma - loop.s[i - 2]) / 2)
                    x = x + u * (dt**2 / 2 + s_u * f(sigma_next))
                old_d = d
            if s_noise > 0:
                size = math.sqrt(max(sigma_next**2 - sigma**2 * r**2, 0.0))
                if size > 0:
                    x = x + loop.noise(x) * (size * s_noise)
        old = denoised
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# Gradient estimation (Permenter & Yuan 2024, "Interpreting and improving diffusion models from an optimization
# perspective"): Euler plus (gamma - 1) times the change of the Euler direction since the last step
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_gradient_estimation(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    ge_gamma: float = 2.0,
) -> Tensor:
    """ComfyUI's ``gradient_estimation``: with ``d = (x - x0) / sigma`` an Euler step ``x' = x + d (sigma' -
    sigma)``, from the second step on plus ``(ge_gamma - 1)(d - d_prev)(sigma' - sigma)``; the step to sigma 0
    returns x0."""
    return _gradient_estimation(denoiser, x, sigmas, generators, callback, extra_args, ge_gamma, cfg_pp=False)


@torch.no_grad()
def sample_gradient_estimation_cfg_pp(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    ge_gamma: float = 2.0,
) -> Tensor:
    """ComfyUI's ``gradient_estimation_cfg_pp``: :func:`sample_gradient_estimation` with CFG++ (``d`` from the
    unconditional x0, the Euler step ``x' = x0_guided + d sigma'``)."""
    return _gradient_estimation(denoiser, x, sigmas, generators, callback, extra_args, ge_gamma, cfg_pp=True)


def _gradient_estimation(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    ge_gamma: float,
    *,
    cfg_pp: bool,
) -> Tensor:
    if isinstance(ge_gamma, bool) or not isinstance(ge_gamma, int | float) or not math.isfinite(ge_gamma):
        raise UsageError(f"gradient_estimation ge_gamma must be a finite number, got {ge_gamma!r}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    old_d: Tensor | None = None
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        if cfg_pp:
            denoised, uncond = loop.model_guided(x, sigma, step=i)
        else:
            denoised = uncond = loop.model(x, sigma, step=i)
        d = (x - uncond) / sigma
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = denoised
        else:
            x = denoised + d * sigma_next if cfg_pp else x + d * dt
            if old_d is not None:
                x = x + (d - old_d) * ((float(ge_gamma) - 1.0) * dt)
        old_d = d
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# SEEDS (Gonzalez et al. 2023, "SEEDS: Exponential SDE solvers for fast high-quality sampling", arXiv 2305.14267)
# in x0 and lambda = -log sigma (the VE form of the data-prediction solvers: alpha = 1), and the exponential Heun
# methods ComfyUI makes of SEEDS-2
# ---------------------------------------------------------------------------------------------------


def _h_phi_1(z: float) -> float:
    """``z phi_1(z) = e^z - 1``."""
    return math.expm1(z)


def _h_phi_2(z: float) -> float:
    """``z phi_2(z) = (e^z - 1 - z) / z`` (0 at z = 0)."""
    return (math.expm1(z) - z) / z if z else 0.0


def _sde_part(z: float) -> float:
    """``sqrt(1 - e^(2 z))`` for z <= 0: the size of fresh noise over a segment where the kept noise shrinks by
    ``e^z`` (0 for z >= 0)."""
    return math.sqrt(-math.expm1(2 * z)) if z < 0 else 0.0


SEEDS_SOLVER_TYPES = ("phi_1", "phi_2")


def _check_noise_options(name: str, eta: float, s_noise: float) -> None:
    for key, value in (("eta", eta), ("s_noise", s_noise)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
            raise UsageError(f"{name} {key} must be a number of at least 0, got {value!r}")


@torch.no_grad()
def sample_seeds_2(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    solver_type: str = "phi_1",
) -> Tensor:
    """SEEDS-2 (ComfyUI's ``seeds_2``): two model calls a step, the second at ``lambda + r h`` (lambda = -log
    sigma, h its step), each stage an exponential step in x0 whose kept noise shrinks by ``e^(-eta h)`` and whose
    fresh noise (``s_noise``) makes up the rest; ``solver_type`` ``phi_1`` (the x0s mixed ``1 - 1/(2r)`` :
    ``1/(2r)``) or ``phi_2`` (phi_2 weights). Two draws a step (none on the step to sigma 0, which returns x0, or
    where eta or s_noise is 0). ``r`` in (0, 1]."""
    return _seeds_2(denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, r, solver_type, "seeds_2")


@torch.no_grad()
def sample_exp_heun_2_x0(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    solver_type: str = "phi_2",
) -> Tensor:
    """ComfyUI's ``exp_heun_2_x0``: the exponential Heun method in x0 and lambda = -log sigma, :func:`sample_seeds_2`
    with ``r = 1`` and no noise (its second call at the next sigma)."""
    return _seeds_2(denoiser, x, sigmas, generators, callback, extra_args, 0.0, 0.0, 1.0, solver_type, "exp_heun_2_x0")


@torch.no_grad()
def sample_exp_heun_2_x0_sde(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "phi_2",
) -> Tensor:
    """ComfyUI's ``exp_heun_2_x0_sde``: :func:`sample_seeds_2` with ``r = 1``, stochastic (two draws a step, as
    ComfyUI's, the second weighted 0)."""
    return _seeds_2(
        denoiser, x, sigmas, generators, callback, extra_args, eta, s_noise, 1.0, solver_type, "exp_heun_2_x0_sde"
    )


def _seeds_2(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    eta: float,
    s_noise: float,
    r: float,
    solver_type: str,
    name: str,
) -> Tensor:
    if solver_type not in SEEDS_SOLVER_TYPES:
        raise UsageError(f"{name} solver_type must be one of {', '.join(SEEDS_SOLVER_TYPES)}, got {solver_type!r}")
    if isinstance(r, bool) or not isinstance(r, int | float) or not 0 < r <= 1:
        raise UsageError(f"{name} r must be in (0, 1], got {r!r}")
    _check_noise_options(name, eta, s_noise)
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    noisy = eta > 0 and s_noise > 0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
            loop.done(i, x, denoised)
            continue
        lam, lam_next = -math.log(sigma), -math.log(sigma_next)
        h = lam_next - lam
        h_eta = h * (eta + 1)
        sigma_1 = math.exp(-(lam + r * h))
        # stage 1: to lambda + r h
        x_2 = x * (sigma_1 / sigma * math.exp(-r * h * eta)) - denoised * _h_phi_1(-r * h_eta)
        kept: Tensor | None = None
        if noisy:
            kept = loop.noise(x) * _sde_part(-r * h * eta)
            x_2 = x_2 + kept * (sigma_1 * s_noise)
        denoised_2 = loop.model(x_2, sigma_1, step=i, on_grid=False)
        # stage 2: to lambda + h
        keep = sigma_next / sigma * math.exp(-h * eta)
        if solver_type == "phi_1":
            x = x * keep - torch.lerp(denoised, denoised_2, 1 / (2 * r)) * _h_phi_1(-h_eta)
        else:
            b2 = _h_phi_2(-h_eta) / r
            b1 = _h_phi_1(-h_eta) - b2
            x = x * keep - (denoised * b1 + denoised_2 * b2)
        if kept is not None:
            seg = (r - 1) * h * eta
            kept = kept * math.exp(seg) + loop.noise(x) * _sde_part(seg)
            x = x + kept * (sigma_next * s_noise)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_seeds_3(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r_1: float = 1.0 / 3,
    r_2: float = 2.0 / 3,
) -> Tensor:
    """SEEDS-3 (ComfyUI's ``seeds_3``): three model calls a step, at lambda, ``lambda + r_1 h`` and ``lambda +
    r_2 h``; the third stage weighs the first and the third x0 with phi_1 / phi_2 weights. Three draws a step
    (none on the step to sigma 0, which returns x0, or where eta or s_noise is 0). ``0 < r_1 < r_2 <= 1``."""
    for key, value in (("r_1", r_1), ("r_2", r_2)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise UsageError(f"seeds_3 {key} must be in (0, 1], got {value!r}")
    if not r_1 < r_2:
        raise UsageError(f"seeds_3 r_1 must be below r_2, got {r_1} and {r_2}")
    _check_noise_options("seeds_3", eta, s_noise)
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    noisy = eta > 0 and s_noise > 0
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if sigma_next == 0:
            x = denoised
            loop.done(i, x, denoised)
            continue
        lam, lam_next = -math.log(sigma), -math.log(sigma_next)
        h = lam_next - lam
        h_eta = h * (eta + 1)
        sigma_1, sigma_2 = math.exp(-(lam + r_1 * h)), math.exp(-(lam + r_2 * h))
        # stage 1
        x_2 = x * (sigma_1 / sigma * math.exp(-r_1 * h * eta)) - denoised * _h_phi_1(-r_1 * h_eta)
        kept: Tensor | None = None
        if noisy:
            kept = loop.noise(x) * _sde_part(-r_1 * h * eta)
            x_2 = x_2 + kept * (sigma_1 * s_noise)
        denoised_2 = loop.model(x_2, sigma_1, step=i, on_grid=False)
        # stage 2
        a_2 = r_2 / r_1 * _h_phi_2(-r_2 * h_eta)
        a_1 = _h_phi_1(-r_2 * h_eta) - a_2
        x_3 = x * (sigma_2 / sigma * math.exp(-r_2 * h * eta)) - (denoised * a_1 + denoised_2 * a_2)
        if kept is not None:
            seg = (r_1 - r_2) * h * eta
            kept = kept * math.exp(seg) + loop.noise(x) * _sde_part(seg)
            x_3 = x_3 + kept * (sigma_2 * s_noise)
        denoised_3 = loop.model(x_3, sigma_2, step=i, on_grid=False)
        # stage 3
        b_3 = _h_phi_2(-h_eta) / r_2
        b_1 = _h_phi_1(-h_eta) - b_3
        x = x * (sigma_next / sigma * math.exp(-h * eta)) - (denoised * b_1 + denoised_3 * b_3)
        if kept is not None:
            seg = (r_2 - 1) * h * eta
            kept = kept * math.exp(seg) + loop.noise(x) * _sde_part(seg)
            x = x + kept * (sigma_next * s_noise)
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# SA-Solver (Xue et al. 2023, "SA-Solver: Stochastic Adams solver for fast sampling of diffusion models", arXiv
# 2309.05019): stochastic Adams predictor-corrector in x0 and lambda = -log sigma, tau the stochasticity
# ---------------------------------------------------------------------------------------------------


def sa_solver_weights(lambdas: Sequence[float], lam_s: float, lam_t: float, tau: float) -> list[float]:
    """SA-Solver's weights ``b_j`` of the x0 estimates at ``lambdas`` for a step from ``lam_s`` to ``lam_t``
    (the paper's eqs. 15 and 18 in VE form, alpha = 1): ``b_j = (1 + tau^2) * integral from lam_s to lam_t of
    e^((1 + tau^2)(u - lam_t)) L_j(u) du``, L_j the Lagrange polynomial through ``lambdas`` that is 1 at the j-th.
    The moments of the weight are integrated by parts, the Lagrange integrals found from them (a Vandermonde
    system), in float64."""
    n = len(lambdas)
    k = 1.0 + tau * tau
    decay = math.exp(-k * (lam_t - lam_s))
    moments: list[float] = []  # m_p = k * integral of e^(k(u - lam_t)) u^p du over the step
    for p in range(n):
        m = lam_t**p - lam_s**p * decay
        if p:
            m -= p / k * moments[p - 1]
        moments.append(m)
    vander = np.array([[float(v) ** p for v in lambdas] for p in range(n)], dtype=np.float64)
    return [float(b) for b in np.linalg.solve(vander, np.array(moments, dtype=np.float64))]


def sa_solver_weights_simple(
    lambdas: Sequence[float], lam_s: float, lam_t: float, tau: float, corrector: bool
) -> list[float]:
    """SA-Solver's simpler order-2 weights (the paper's Appendix D), oldest estimate first, with ``k = 1 + tau^2``
    and ``w = 1 - e^(-k h)``: the corrector's ``[w - k h / 2, k h / 2]``, the predictor's ``[c, w - c]`` with ``c =
    k h^2 / (2 (lambda_old - lam_s))`` (negative: the older estimate lies behind)."""
    k = 1.0 + tau * tau
    h = lam_t - lam_s
    whole = -math.expm1(-k * h)
    if corrector:
        b_new = 0.5 * k * h
        return [whole - b_new, b_new]
    b_old = 0.5 * k * h * h / (lambdas[-2] - lam_s)
    return [b_old, whole - b_old]


@torch.no_grad()
def sample_sa_solver(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    sde_start_sigma: float = math.inf,
    sde_end_sigma: float = 0.0,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    use_pece: bool = False,
    simple_order_2: bool = False,
) -> Tensor:
    """SA-Solver (ComfyUI's ``sa_solver``): each step a stochastic Adams predictor of ``predictor_order`` (1 .. 6)
    x0 estimates to the next sigma, and, from the second step on, a corrector of ``corrector_order`` (0 .. 6)
    estimates, the newest the one at the predicted sample, redoing the last step (:func:`sa_solver_weights`); the
    stochasticity is ``tau = eta`` where ``sde_end_sigma <= sigma' <= sde_start_sigma`` (the sampling API sets
    ComfyUI's 20 % .. 80 % of the schedule, ``percent_to_sigma``), else 0: the predictor keeps ``e^(-tau^2 h)``
    of the noise and adds fresh (``s_noise``; one draw a step that does not end at sigma 0 with tau > 0), the
    corrector adds the same draw again. Towards a last sigma of 0 the orders drop to the steps left; the step to
    0 takes the x0 estimate. ``use_pece``: the model is asked again at the corrected sample (PECE; two calls a
    step). ``simple_order_2``: the paper's simpler order-2 weights."""
    return _sa_solver(
        denoiser, x, sigmas, generators, callback, extra_args, eta, sde_start_sigma, sde_end_sigma, s_noise,
        predictor_order, corrector_order, use_pece, simple_order_2, "sa_solver",
    )  # fmt: skip


@torch.no_grad()
def sample_sa_solver_pece(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    sde_start_sigma: float = math.inf,
    sde_end_sigma: float = 0.0,
    s_noise: float = 1.0,
    predictor_order: int = 3,
    corrector_order: int = 4,
    simple_order_2: bool = False,
) -> Tensor:
    """ComfyUI's ``sa_solver_pece``: :func:`sample_sa_solver` in PECE mode (the model asked again at each corrected
    sample)."""
    return _sa_solver(
        denoiser, x, sigmas, generators, callback, extra_args, eta, sde_start_sigma, sde_end_sigma, s_noise,
        predictor_order, corrector_order, True, simple_order_2, "sa_solver_pece",
    )  # fmt: skip


def _sa_solver(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    generators: Generators | None,
    callback: Callback | None,
    extra_args: dict[str, Any] | None,
    eta: float,
    sde_start_sigma: float,
    sde_end_sigma: float,
    s_noise: float,
    predictor_order: int,
    corrector_order: int,
    use_pece: bool,
    simple_order_2: bool,
    name: str,
) -> Tensor:
    if isinstance(predictor_order, bool) or predictor_order not in range(1, 7):
        raise UsageError(f"{name} predictor_order must be 1 .. 6, got {predictor_order!r}")
    if isinstance(corrector_order, bool) or corrector_order not in range(0, 7):
        raise UsageError(f"{name} corrector_order must be 0 .. 6, got {corrector_order!r}")
    _check_noise_options(name, eta, s_noise)
    for key, value in (("sde_start_sigma", sde_start_sigma), ("sde_end_sigma", sde_end_sigma)):
        if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
            raise UsageError(f"{name} {key} must be a sigma of at least 0, got {value!r}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    s = loop.s
    if any(v <= 0 for v in s[:-1]) or any(b >= a for a, b in zip(s, s[1:], strict=False)):
        raise UsageError(f"{name} walks falling sigmas above 0 (the last may be 0)")
    lam = [-math.log(v) if v > 0 else math.inf for v in s]
    predictor_order, corrector_order = int(predictor_order), int(corrector_order)
    most = max(predictor_order, corrector_order)
    to_zero = s[-1] == 0

    def tau_at(sigma: float) -> float:
        return float(eta) if eta > 0 and sde_end_sigma <= sigma <= sde_start_sigma else 0.0

    def weights(order: int, i_last: int, lam_s: float, lam_t: float, tau: float, corrector: bool) -> list[float]:
        points = lam[i_last - order + 1 : i_last + 1]
        if simple_order_2 and order == 2:
            return sa_solver_weights_simple(points, lam_s, lam_t, tau, corrector)
        return sa_solver_weights(points, lam_s, lam_t, tau)

    x_pred = x
    h, tau = 0.0, 0.0
    noise: Tensor | None = None
    estimates: list[Tensor] = []  # the last x0 estimates, newest last
    for i in range(loop.n):
        sigma, sigma_next = s[i], s[i + 1]
        denoised = loop.model(x_pred, sigma, step=i)
        estimates = [*estimates, denoised][-most:]
        p_order = min(predictor_order, len(estimates))
        c_order = 0 if i == 0 or (sigma_next == 0 and not use_pece) else min(corrector_order, len(estimates))
        if to_zero:
            p_order = min(p_order, loop.n - 1 - i)
            c_order = min(c_order, loop.n - i)
        # corrector: redo the last step with the estimate at the predicted sample
        if c_order == 0:
            x = x_pred
        else:
            b = weights(c_order, i, lam[i - 1], lam[i], tau, True)
            x = x * (sigma / s[i - 1] * math.exp(-(tau**2) * h))
            for w, est in zip(b, estimates[-c_order:], strict=True):
                x = x + est * w
            if noise is not None:
                x = x + noise
            if use_pece:
                denoised = loop.model(x, sigma, step=i)
                estimates[-1] = denoised
        # predictor
        if sigma_next == 0:
            x_pred = denoised
        else:
            tau = tau_at(sigma_next)
            b = weights(p_order, i, lam[i], lam[i + 1], tau, False)
            h = lam[i + 1] - lam[i]
            x_pred = x * (sigma_next / sigma * math.exp(-(tau**2) * h))
            for w, est in zip(b, estimates[-p_order:], strict=True):
                x_pred = x_pred + est * w
            noise = None
            if tau > 0 and s_noise > 0:
                noise = loop.noise(x) * (sigma_next * math.sqrt(-math.expm1(-2 * tau**2 * h)) * s_noise)
                x_pred = x_pred + noise
        loop.done(i, x_pred, denoised)
    return x_pred


# ---------------------------------------------------------------------------------------------------
# DEIS (Zhang & Chen 2023, "Fast sampling of diffusion models with exponential integrator"), ComfyUI's tAB form
# ---------------------------------------------------------------------------------------------------

# ComfyUI's DEIS maps sigmas to the time of a VP-SDE fixed by EDM's sigma range (sigma 0.002 .. 80, eps_s 1e-3),
# whatever the model, and interpolates the noise estimates in that time.
_DEIS_EPS_S, _DEIS_SIGMA_MIN, _DEIS_SIGMA_MAX = 1e-3, 0.002, 80.0
_DEIS_BETA_D = (
    2 * (math.log(_DEIS_SIGMA_MIN**2 + 1) / _DEIS_EPS_S - math.log(_DEIS_SIGMA_MAX**2 + 1)) / (_DEIS_EPS_S - 1)
)
_DEIS_BETA_MIN = math.log(_DEIS_SIGMA_MAX**2 + 1) - 0.5 * _DEIS_BETA_D


def deis_time(sigma: float) -> float:
    """The VP time DEIS interpolates in: the inverse of ``sigma(t) = sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1)``
    (ComfyUI's ``edm2t``)."""
    b_d, b_min = _DEIS_BETA_D, _DEIS_BETA_MIN
    return (math.sqrt(b_min**2 + 2 * b_d * math.log(sigma**2 + 1)) - b_min) / b_d


def deis_coefficients(sigmas: Sequence[float], max_order: int = 3) -> list[list[float]]:
    """The tAB-DEIS weights of each step (Zhang & Chen 2023, eq. 15; ComfyUI's ``get_deis_coeff_list`` 'tab'):
    step i moves ``x`` by ``sum_j c[i][j] eps_{i-j}``, with ``c[i][j]`` the integral over sigma from sigma_i to
    sigma_{i+1} of the Lagrange polynomial (in :func:`deis_time`) that is 1 at step i - j and 0 at the others used,
    ``order = min(max_order, i + 1)`` points. The integrand is smooth in sigma: 24-point Gauss-Legendre (ComfyUI
    sums 10000 points in time). Steps of order 1 (and steps to sigma 0) get ``[]``: an Euler step."""
    nodes, weights = np.polynomial.legendre.leggauss(24)
    ts = [deis_time(s) if s > 0 else 0.0 for s in sigmas]
    out: list[list[float]] = []
    for i in range(len(sigmas) - 1):
        order = min(max_order, i + 1)
        a, b = float(sigmas[i]), float(sigmas[i + 1])
        if order == 1 or b <= 0:
            out.append([])
            continue
        prev = [ts[i - k] for k in range(order)]
        mid, half = (a + b) / 2, (b - a) / 2
        taus = [deis_time(mid + half * float(z)) for z in nodes]
        row = []
        for j in range(order):
            total = 0.0
            for tau, w in zip(taus, weights, strict=True):
                poly = 1.0
                for k in range(order):
                    if k != j:
                        poly *= (tau - prev[k]) / (prev[j] - prev[k])
                total += float(w) * poly
            row.append(total * half)
        out.append(row)
    return out


@torch.no_grad()
def sample_deis(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS (Zhang & Chen 2023; ComfyUI's ``deis``, tAB of order ``max_order``, 3 by default, 1 .. 4): a multistep
    exponential integrator on the noise estimates ``(x - x0) / sigma`` with the weights of
    :func:`deis_coefficients`; Euler on the first step and on the step to sigma 0."""
    if isinstance(max_order, bool) or max_order not in (1, 2, 3, 4):
        raise UsageError(f"deis max_order must be 1 .. 4, got {max_order}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    coeffs = deis_coefficients(loop.s, int(max_order))
    eps_old: list[Tensor] = []  # newest last
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        eps = (x - denoised) / sigma
        c = coeffs[i]
        if not c:
            x = _euler_to(x, denoised, sigma, sigma_next)
        else:
            x = x + eps * c[0]
            for j in range(1, len(c)):
                x = x + eps_old[-j] * c[j]
        eps_old = [*eps_old, eps][-(int(max_order) - 1) :] if int(max_order) > 1 else []
        loop.done(i, x, denoised)
    return x


def restart_segments(sigmas: list[float]) -> tuple[list[tuple[float, float]], list[float]]:
    """The (from, to) sigma segments of A1111's Restart sampler for the grid ``sigmas`` (ending at 0), and the grid
    it walks. Below 20 steps: the grid as it is, no restart. From 20 steps: a Karras grid (rho 7) of ``steps -
    restart_steps * restart_times`` steps between the given grid's last non-zero sigma and its first (the
    schedule's spacing is replaced, as A1111 does), with ``restart_times`` restarts (1, or 2 from 36 steps) of
    ``restart_steps`` Heun steps (9, or steps // 4 from 36 steps) inserted after the step that lands nearest to
    sigma 0.1, each walking a Karras grid from the grid point nearest sigma 2 down to that one. The segments
    number ``steps`` in all."""
    steps = len(sigmas) - 1
    if steps < 20:
        return list(zip(sigmas[:-1], sigmas[1:], strict=True)), sigmas
    restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = [float(v) for v in karras_grid(steps - restart_steps * restart_times, sigmas[-2], sigmas[0])] + [0.0]

    def nearest(value: float) -> int:
        return min(range(len(main)), key=lambda k: (abs(main[k] - value), k))  # the first of equals, as argmin

    at, top = nearest(0.1), nearest(2.0)
    segments: list[tuple[float, float]] = []
    for i in range(len(main) - 1):
        segments.append((main[i], main[i + 1]))
        if i + 1 == at and top < at:
            again = [float(v) for v in karras_grid(restart_steps + 1, main[at], main[top])]
            for _ in range(restart_times):
                segments.extend(zip(again[:-1], again[1:], strict=True))
    return segments, main


def karras_grid(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> list[float]:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max down to sigma_min (no final 0), as float32 values (the
    precision k-diffusion's get_sigmas_karras computes them in)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(v) for v in (hi + ramp * (lo - hi)) ** rho]


@torch.no_grad()
def sample_restart(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_noise: float = 1.0,
) -> Tensor:
    """Restart sampling (Xu et al. 2023, "Restart Sampling for Improving Generative Processes"), as A1111's
    "Restart": Heun steps (Euler to sigma 0) along :func:`restart_segments`; where a segment starts above the
    level the last one ended at (a restart), fresh noise ``s_noise * sqrt(from^2 - last^2)`` lifts the sample
    back up first. The model sees each sigma's own (interpolated) timestep: the walk leaves the grid."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    if loop.s[-1] != 0.0:
        raise UsageError("the restart sampler runs down to sigma 0 (it cannot stop at a step and hand on)")
    segments, _ = restart_segments(loop.s)
    loop.s = [a for a, _ in segments] + [segments[-1][1]]  # what the callbacks report
    loop.n = len(segments)
    last: float | None = None
    for i, (sigma, sigma_next) in enumerate(segments):
        if last is not None and last < sigma:
            x = x + loop.noise(x) * (s_noise * math.sqrt(sigma**2 - last**2))
        denoised = loop.model(x, sigma, step=i, on_grid=False)
        d = (x - denoised) / sigma
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_2 = x + d * (sigma_next - sigma)
            d_2 = (x_2 - loop.model(x_2, sigma_next, step=i, on_grid=False)) / sigma_next
            x = x + (d + d_2) / 2 * (sigma_next - sigma)
        last = sigma_next
        loop.done(i, x, denoised)
    return x


# Adams-Bashforth weights of orders 1-4 for equal steps, newest derivative first, and their denominators.
_AB_WEIGHTS: tuple[tuple[tuple[int, ...], int], ...] = (
    ((1,), 1),
    ((3, -1), 2),
    ((23, -16, 5), 12),
    ((55, -59, 37, -9), 24),
)


@torch.no_grad()
def sample_ipndm(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    max_order: int = 4,
) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator", the
    iPNDM of its appendix; ComfyUI's ``ipndm``): Euler, then Adams-Bashforth of order up to ``max_order`` (1-4)
    on dx/dsigma = (x - x0) / sigma with the fixed equal-step weights (not rescaled to the step sizes, unlike
    :func:`sample_lms`); the step to sigma 0 returns x0."""
    if not 1 <= int(max_order) <= 4:
        raise UsageError(f"ipndm max_order must be 1 to 4, got {max_order}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    ds: list[Tensor] = []  # derivatives, newest first
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        ds.insert(0, (x - denoised) / sigma)
        del ds[int(max_order) :]
        if sigma_next == 0:
            x = denoised
        else:
            weights, div = _AB_WEIGHTS[len(ds) - 1]
            slope = ds[0] * (weights[0] / div)
            for w, d in zip(weights[1:], ds[1:], strict=True):
                slope = slope + d * (w / div)
            x = x + slope * (sigma_next - sigma)
        loop.done(i, x, denoised)
    return x


@torch.no_grad()
def sample_heunpp2(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun++ (ComfyUI's ``heunpp2``, from sd-webui-samplers-scheduler): an Euler predictor through the next two grid
    points, the slopes there (model calls at those points) averaged with weights sigma_{i+1} / (3 sigma_0) and
    sigma_{i+2} / (3 sigma_0), the first slope taking the rest; the step before the last blends two slopes
    (sigma_{i+1} / (2 sigma_0)), the last is Euler. Karras's churn as :func:`sample_euler` (drawing only where it
    is on; ComfyUI draws a discarded number each step, and so does its noise here, :class:`BatchNoise`)."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    s, end = loop.s, loop.s[-1]
    for i in range(loop.n):
        x, sigma = churn(loop, x, i, s_churn, s_tmin, s_tmax, s_noise, every_step=True)
        denoised = loop.model(x, sigma, step=i, on_grid=sigma == s[i])
        d = (x - denoised) / sigma
        dt = s[i + 1] - sigma
        if s[i + 1] == end:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - loop.model(x_2, s[i + 1], step=i + 1)) / s[i + 1]
            if s[i + 2] == end:
                w2 = s[i + 1] / (2 * s[0])
                x = x + (d * (1 - w2) + d_2 * w2) * dt
            else:
                x_3 = x_2 + d_2 * (s[i + 2] - s[i + 1])
                d_3 = (x_3 - loop.model(x_3, s[i + 2], step=i + 2)) / s[i + 2]
                w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
                x = x + (d * (1 - w2 - w3) + d_2 * w2 + d_3 * w3) * dt
        loop.done(i, x, denoised)
    return x


def ipndm_v_weights(h: Sequence[float]) -> list[float]:
    """The variable-step iPNDM weights (Zhang & Chen 2023; ComfyUI's ``ipndm_v``) of the current slope and the
    earlier ones, newest first, for step sizes ``h = [h_n, h_{n-1}, ...]`` (sigma differences, h_n the step being
    taken): Adams-Bashforth of order ``len(h)`` rescaled to the uneven steps."""
    if len(h) == 1:
        return [1.0]
    hn, h1 = h[0], h[1]
    c1, c2 = (2 + hn / h1) / 2, -(hn / h1) / 2
    if len(h) == 2:
        return [c1, c2]
    h2 = h[2]
    t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
    if len(h) == 3:
        return [c1 + t1, c2 - (1 + h1 / h2) * t1, t1 * h1 / h2]
    h3 = h[3]
    t2 = (
        ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2)))
        * (hn * (hn + h1) * (hn + h1 + h2))
        / (h1 * (h1 + h2) * (h1 + h2 + h3))
    )
    q = h1 * (h1 + h2) / (h2 * (h2 + h3))
    return [
        c1 + t1 + t2,
        c2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + q) * t2,
        t1 * h1 / h2 + (h1 / h2 + q * (1 + h2 / h3)) * t2,
        -t2 * q * h1 / h2,
    ]


@torch.no_grad()
def sample_ipndm_v(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    max_order: int = 4,
) -> Tensor:
    """Variable-step iPNDM (ComfyUI's ``ipndm_v``): :func:`sample_ipndm` with the Adams-Bashforth weights of
    :func:`ipndm_v_weights`, fitted to the grid's uneven sigma steps; the step to sigma 0 returns x0."""
    if not 1 <= int(max_order) <= 4:
        raise UsageError(f"ipndm_v max_order must be 1 to 4, got {max_order}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    s = loop.s
    ds: list[Tensor] = []  # slopes, newest first
    for i in range(loop.n):
        denoised = loop.model(x, s[i], step=i)
        ds.insert(0, (x - denoised) / s[i])
        del ds[int(max_order) :]
        if s[i + 1] == 0:
            x = denoised
        else:
            order = len(ds)
            h = [s[i + 1] - s[i]] + [s[i - k] - s[i - k - 1] for k in range(order - 1)]
            slope = ds[0] * 0.0
            for w, d in zip(ipndm_v_weights(h), ds, strict=True):
                slope = slope + d * w
            x = x + slope * (s[i + 1] - s[i])
        loop.done(i, x, denoised)
    return x


# ---------------------------------------------------------------------------------------------------
# DPM-Solver (Lu et al. 2022, "DPM-Solver", eps form, singlestep): A1111's "DPM fast" and "DPM adaptive"
# ---------------------------------------------------------------------------------------------------


def _dpm_solver_ends(loop: _Loop, name: str) -> tuple[float, float]:
    """(sigma_max, sigma_min) the DPM-Solver samplers integrate between: the grid's first sigma and its last
    non-zero one (as ComfyUI hands them to k-diffusion; A1111's txt2img hands over the model's own ends, which its
    "Uniform" grid starts and ends at). They land on sigma_min, not 0: the result keeps that much noise, as there."""
    hi = loop.s[0]
    lo = loop.s[-1] if loop.s[-1] > 0 else loop.s[-2]
    if not 0 < lo < hi:
        raise UsageError(
            f"{name} integrates from the grid's first sigma down to its last non-zero one and needs two distinct "
            f"non-zero sigmas (at least 2 steps), got {[round(v, 6) for v in loop.s]}"
        )
    return hi, lo


class _DPMSolver:
    """DPM-Solver-1/2/3 steps in t = -log sigma, each row with its own (t, t_next): the adaptive sampler's rows
    take their own step sizes (a row never depends on its batch). ``eps`` values at a step's points are cached
    by name, so DPM-Solver-2 with r1 = 1/3 and DPM-Solver-3 share their first intermediate point."""

    def __init__(self, loop: _Loop, like: Tensor) -> None:
        self.loop = loop
        self.like = like
        self.cache: dict[str, Tensor] = {}
        self.step = 0

    def col(self, values: list[float]) -> Tensor:
        shape = (len(values),) + (1,) * (self.like.ndim - 1)
        return (
            torch.tensor(values, dtype=torch.float64).to(dtype=self.like.dtype, device=self.like.device).reshape(shape)
        )

    def eps(self, key: str, x: Tensor, t: list[float]) -> Tensor:
        if key not in self.cache:
            sig = [math.exp(-v) for v in t]
            denoised = self.loop.model_rows(x, sig, step=self.step)
            self.cache[key] = (x - denoised) / self.col(sig)
        return self.cache[key]

    def first(self, x: Tensor, t: list[float], t_next: list[float]) -> Tensor:
        h = [b - a for a, b in zip(t, t_next, strict=True)]
        return x - self.col([math.exp(-b) * math.expm1(hh) for b, hh in zip(t_next, h, strict=True)]) * self.eps(
            "eps", x, t
        )

    def second(self, x: Tensor, t: list[float], t_next: list[float], r1: float = 0.5) -> Tensor:
        h = [b - a for a, b in zip(t, t_next, strict=True)]
        eps = self.eps("eps", x, t)
        s1 = [a + r1 * hh for a, hh in zip(t, h, strict=True)]
        u1 = x - self.col([math.exp(-s) * math.expm1(r1 * hh) for s, hh in zip(s1, h, strict=True)]) * eps
        eps_1 = self.eps(f"r{r1}", u1, s1)
        a = self.col([math.exp(-b) * math.expm1(hh) for b, hh in zip(t_next, h, strict=True)])
        return x - a * eps - a / (2 * r1) * (eps_1 - eps)

    def third(self, x: Tensor, t: list[float], t_next: list[float]) -> Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = [b - a for a, b in zip(t, t_next, strict=True)]
        eps = self.eps("eps", x, t)
        s1 = [a + r1 * hh for a, hh in zip(t, h, strict=True)]
        s2 = [a + r2 * hh for a, hh in zip(t, h, strict=True)]
        u1 = x - self.col([math.exp(-s) * math.expm1(r1 * hh) for s, hh in zip(s1, h, strict=True)]) * eps
        eps_1 = self.eps(f"r{r1}", u1, s1)
        u2 = (
            x
            - self.col([math.exp(-s) * math.expm1(r2 * hh) for s, hh in zip(s2, h, strict=True)]) * eps
            - self.col(
                [math.exp(-s) * (r2 / r1) * (math.expm1(r2 * hh) / (r2 * hh) - 1) for s, hh in zip(s2, h, strict=True)]
            )
            * (eps_1 - eps)
        )
        eps_2 = self.eps("r2/3", u2, s2)
        a = self.col([math.exp(-b) * math.expm1(hh) for b, hh in zip(t_next, h, strict=True)])
        c = self.col([math.exp(-b) / r2 * (math.expm1(hh) / hh - 1) for b, hh in zip(t_next, h, strict=True)])
        return x - a * eps - c * (eps_2 - eps)

    def denoised(self, x: Tensor, t: list[float]) -> Tensor:
        return x - self.col([math.exp(-v) for v in t]) * self.cache["eps"]


def _dpm_ancestral(t: float, t_next: float, t_end: float, eta: float) -> tuple[float, float]:
    """k-diffusion's ancestral split of a DPM-Solver step: (where the deterministic part lands, in t, no further
    than t_end; the size of the fresh noise that brings it back to sigma(t_next))."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = min(t_end, -math.log(down) if down > 0 else math.inf)
    return t_down, math.sqrt(max(math.exp(-2 * t_next) - math.exp(-2 * t_down), 0.0))


@torch.no_grad()
def sample_dpm_fast(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """DPM-Solver-fast (Lu et al. 2022, section 3.4; k-diffusion's sample_dpm_fast, A1111's "DPM fast"): as many
    model calls as the grid has steps (nfe), spent on ``nfe // 3 + 1`` steps evenly spaced in t = -log sigma from
    the grid's first sigma to its last non-zero one (:func:`_dpm_solver_ends`; the grid's own spacing is not
    used), of DPM-Solver-3 then a final DPM-Solver-2 and -1 (nfe % 3 == 0) or one of order nfe % 3. With ``eta``
    (A1111 passes its ancestral eta, 1 by default) each step lands lower and fresh noise (``s_noise``) brings it
    back, one draw a step; ``eta=0`` is k-diffusion's and ComfyUI's deterministic default. Ends at sigma_min."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    hi, lo = _dpm_solver_ends(loop, "dpm_fast")
    nfe = loop.n
    t_start, t_end = -math.log(hi), -math.log(lo)
    m = nfe // 3 + 1
    ts = [float(v) for v in torch.linspace(t_start, t_end, m + 1, dtype=torch.float64)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    b = x.shape[0]
    loop.s = [math.exp(-v) for v in ts[: len(orders) + 1]]  # what the callbacks report
    loop.n = len(orders)
    for i, order in enumerate(orders):
        solver = _DPMSolver(loop, x)
        solver.step = i
        t, t_next = ts[i], ts[i + 1]
        t_down, up = _dpm_ancestral(t, t_next, t_end, eta)
        tt, tn = [t] * b, [t_down] * b
        if order == 1:
            x_new = solver.first(x, tt, tn)
        elif order == 2:
            x_new = solver.second(x, tt, tn)
        else:
            x_new = solver.third(x, tt, tn)
        denoised = solver.denoised(x, tt)
        x = x_new
        if eta:
            x = x + loop.noise(x) * (up * s_noise)
        loop.done(i, x, denoised)
    return x


class _PIDStep:
    """The step-size controller of k-diffusion's adaptive DPM-Solver (a PID controller on the inverse error,
    Söderlind 2003, with its 1 + atan(x - 1) limiter): proposes the next step and accepts or rejects this one."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, safety: float) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.safety = safety
        self.errs: list[float] = []

    def propose(self, error: float) -> bool:
        inv = 1 / (error + 1e-8)
        if not self.errs:
            self.errs = [inv, inv, inv]
        self.errs[0] = inv
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.safety
        if accept:
            self.errs[2], self.errs[1] = self.errs[1], self.errs[0]
        self.h *= factor
        return accept


@torch.no_grad()
def sample_dpm_adaptive(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    eta: float = 1.0,
    s_noise: float = 1.0,
    max_attempts: int = 1000,
) -> Tensor:
    """Adaptive DPM-Solver-12 / -23 (Lu et al. 2022, Algorithm 5; k-diffusion's sample_dpm_adaptive, A1111's "DPM
    adaptive"): from the grid's first sigma to its last non-zero one (:func:`_dpm_solver_ends`; the step count
    does not matter), each attempt solves a step of size h in t = -log sigma with DPM-Solver-``order`` and with
    the order below (sharing model calls); the scaled difference, ``rtol`` and ``atol`` as k-diffusion's, decides
    acceptance and the next h (:class:`_PIDStep`, ``h_init``, the P/I/D coefficients, ``accept_safety``). ``eta``
    as in :func:`sample_dpm_fast` (A1111 passes 1). Each batch row controls its own steps (its error is its own:
    k-diffusion measures the whole batch's, so there a row depends on its batch); rows that are done ride along.
    Raises after ``max_attempts`` attempts without reaching sigma_min. Ends at sigma_min. The callback runs after
    every attempt with, as its step, the grid step as far along in t as the slowest row (``steps - 1`` at the
    end), so that a progress of ``(step + 1) / steps`` never passes 100 %."""
    if int(order) not in (2, 3):
        raise UsageError(f"dpm_adaptive order must be 2 or 3, got {order}")
    if int(max_attempts) < 1:
        raise UsageError(f"dpm_adaptive max_attempts must be at least 1, got {max_attempts}")
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    hi, lo = _dpm_solver_ends(loop, "dpm_adaptive")
    t_start, t_end = -math.log(hi), -math.log(lo)
    b = x.shape[0]
    s = [t_start] * b
    pids = [_PIDStep(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else int(order), accept_safety) for _ in range(b)]
    x_prev = x
    per_row = x[0].numel() ** 0.5
    attempt = 0
    while any(v < t_end - 1e-5 for v in s):
        if attempt >= int(max_attempts):
            raise UsageError(
                f"dpm_adaptive did not reach sigma {lo:.4g} in {max_attempts} attempts (at sigma "
                f"{math.exp(-min(s)):.4g}); loosen rtol/atol or raise max_attempts"
            )
        active = [v < t_end - 1e-5 for v in s]
        t = [min(t_end, v + p.h) if a else v + 0.05 for v, p, a in zip(s, pids, active, strict=True)]
        split = [
            _dpm_ancestral(a, bb, t_end, eta) if act else (bb, 0.0) for a, bb, act in zip(s, t, active, strict=True)
        ]
        t_down = [d for d, _ in split]
        # rows that are done ride along; a wrapper that edits the sample in place (inpainting's blend) must not
        # move them
        kept = None if all(active) else x.clone()
        solver = _DPMSolver(loop, x)
        solver.step = attempt
        if int(order) == 2:
            x_low = solver.first(x, s, t_down)
            x_high = solver.second(x, s, t_down)
        else:
            x_low = solver.second(x, s, t_down, r1=1 / 3)
            x_high = solver.third(x, s, t_down)
        denoised = solver.denoised(x, s)
        delta = torch.maximum(torch.full_like(x_low, atol), rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        errors = ((x_low - x_high) / delta).flatten(1).norm(dim=1) / per_row
        if kept is not None:
            x = torch.where(torch.tensor(active, device=x.device).reshape((b,) + (1,) * (x.ndim - 1)), x, kept)
        take = [act and pids[r].propose(float(errors[r])) for r, act in enumerate(active)]
        if any(take):
            mask = torch.tensor(take, device=x.device).reshape((b,) + (1,) * (x.ndim - 1))
            x_new = x_high
            if eta:
                ups = [split[r][1] * s_noise if take[r] else 0.0 for r in range(b)]
                x_new = x_new + _row_draws(loop, x, take) * solver.col(ups)
            x_prev = torch.where(mask, x_low, x_prev)
            x = torch.where(mask, x_new, x)
            s = [t[r] if take[r] else s[r] for r in range(b)]
        if callback is not None:
            # The step reported is the grid step this far along in t (the slowest row's): the attempts (accepted
            # or not) are not the grid's steps, and a progress of attempt / steps ran past 100 %.
            frac = min(max((min(s) - t_start) / (t_end - t_start), 0.0), 1.0)
            done = max(0, min(loop.n - 1, math.ceil(frac * loop.n - 1e-9) - 1))
            if callback(done, math.exp(-min(s)), x, denoised) is False:
                raise SamplingInterrupted(done, x, denoised)
        attempt += 1
    return x


def _row_draws(loop: _Loop, like: Tensor, rows: list[bool]) -> Tensor:
    """Fresh noise for the rows marked True, each from its own generator (one draw of that row's sequence);
    zeros for the others, which draw nothing."""
    if loop.generators is None:
        raise UsageError("this sampler draws noise each step: pass generators=[torch.Generator(), ...]")
    if isinstance(loop.generators, NoiseBank):
        raise UsageError("dpm_adaptive draws noise where its rows accept a step: it cannot read a noise bank")
    if isinstance(loop.generators, BrownianNoise):
        raise UsageError("dpm_adaptive draws noise where its rows accept a step: it needs the rows' generators")
    if isinstance(loop.generators, BatchNoise):  # ComfyUI's: one draw of the whole batch (its rows accept together)
        mask = torch.tensor(rows, device=like.device).reshape((like.shape[0],) + (1,) * (like.ndim - 1))
        return loop.noise(like) * mask
    out = torch.zeros_like(like)
    for r, draw in enumerate(rows):
        if draw:
            out[r] = row_noise([loop.generators[r]], tuple(like.shape[1:]))[0].to(device=like.device, dtype=like.dtype)
    return out


# ---------------------------------------------------------------------------------------------------
# UniPC (Zhao et al. 2023)
# ---------------------------------------------------------------------------------------------------


UNIPC_VARIANTS = ("bh1", "bh2")


def _unipc_coefficients(
    rks: list[float], h: float, order: int, variant: str = "bh2"
) -> tuple[float, list[float], list[float]]:
    """B(h) and the right-hand sides b_k of UniPC's linear systems (Zhao 2023, Algorithm 2/3, data prediction):
    returns (B_h, R rows flattened per order, b). ``variant`` "bh1": B(h) = -h (the paper's B_1, ComfyUI's
    ``uni_pc``); "bh2": B(h) = e^-h - 1 (B_2, diffusers' default, ComfyUI's ``uni_pc_bh2``)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    b = []
    for k in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return b_h, rks, b


@torch.no_grad()
def sample_unipc(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    order: int = 2,
    corrector: bool = True,
    steps_after: int = 0,
    variant: str = "bh2",
    zero_sigma: float = 0.0,
) -> Tensor:
    """UniPC (Zhao et al. 2023, "UniPC", Algorithms 2-3): UniP-``order`` predictor in x0 (``variant`` "bh2": B(h)
    = e^-h - 1, diffusers' default; "bh1": B(h) = -h, ComfyUI's ``uni_pc``) with the UniC corrector reusing each
    new model call; lower orders at the start and at the end of the grid. ``steps_after``: steps of the grid left
    after these ``sigmas`` (a run stopped early, the SDXL base's part of a hand-off), which keep its last steps at
    full order, as diffusers' scheduler does. ``zero_sigma`` > 0: a last sigma of 0 is walked as this sigma
    instead, the last step a first-order one to it, and the sample there (in the VE scaling, x0 + zero_sigma * eps)
    is the result: ComfyUI's ``uni_pc`` and ``uni_pc_bh2`` end at 0.001 (comfy/extra_samplers/uni_pc.py); 0 ends
    at the last x0 estimate."""
    if variant not in UNIPC_VARIANTS:
        raise UsageError(f"unipc variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}")
    if isinstance(order, bool) or order not in (1, 2, 3):
        raise UsageError(f"unipc order must be 1, 2 or 3, got {order}")
    zero_sigma = float(zero_sigma)
    if not math.isfinite(zero_sigma) or zero_sigma < 0:
        raise UsageError(f"unipc zero_sigma must be a finite sigma of 0 or more, got {zero_sigma}")
    if zero_sigma > 0 and sigmas.ndim == 1 and sigmas.shape[0] >= 2 and float(sigmas[-1]) == 0.0:
        if zero_sigma >= float(sigmas[-2]):
            raise UsageError(
                f"unipc zero_sigma {zero_sigma:g} must be below the last sigma above 0, {float(sigmas[-2]):g}"
            )
        sigmas = torch.cat([sigmas[:-1], torch.tensor([zero_sigma], dtype=sigmas.dtype, device=sigmas.device)])
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    lam = [(-math.log(s) if s > 0 else math.inf) for s in loop.s]
    ms: list[Tensor] = []  # x0 estimates, newest last
    x_last: Tensor | None = None
    order_last = 1
    for i in range(loop.n):
        denoised = loop.model(x, loop.s[i], step=i)
        if corrector and x_last is not None:
            # UniC: re-solve the last step [s_{i-1} -> s_i] with the new model value included.
            x = _unipc_update(x_last, ms, lam, i - 1, order_last, model_t=denoised, sigmas=loop.s, variant=variant)
        ms.append(denoised)
        ms = ms[-order:]
        cur = min(order, loop.n + steps_after - i, i + 1)
        x_last = x
        if loop.s[i + 1] == 0:
            x = denoised
        else:
            x = _unipc_update(x, ms, lam, i, cur, model_t=None, sigmas=loop.s, variant=variant)
        order_last = cur
        loop.done(i, x, denoised)
    return x


def _unipc_update(
    x: Tensor,
    ms: list[Tensor],
    lam: list[float],
    i: int,
    order: int,
    *,
    model_t: Tensor | None,
    sigmas: list[float],
    variant: str = "bh2",
) -> Tensor:
    """One UniP (model_t None) or UniC step from grid point i to i+1 in VE scaling; ``ms[-1]`` is the
    x0 estimate at point i and ``ms[-1-k]`` the one at point i-k."""
    m0 = ms[-1]
    h = lam[i + 1] - lam[i]
    rks = [(lam[i - k] - lam[i]) / h for k in range(1, order)]
    d1s = [(ms[-1 - k] - m0) / rks[k - 1] for k in range(1, order)]
    b_h, _, b = _unipc_coefficients(rks, h, order, variant)
    rk_all = [*rks, 1.0]
    x_t = torch.lerp(m0, x, sigmas[i + 1] / sigmas[i])  # (s_t/s_0) x - expm1(-h) m0
    if model_t is None:
        if order == 1:
            return x_t
        if order == 2:
            rhos = [0.5]
        else:
            r_mat = torch.tensor([[rk ** (p - 1) for rk in rk_all[:-1]] for p in range(1, order)], dtype=torch.float64)
            rhos = torch.linalg.solve(r_mat, torch.tensor(b[:-1], dtype=torch.float64)).tolist()
        res = sum(r * d for r, d in zip(rhos, d1s, strict=True))
        return x_t - b_h * res
    if order == 1:
        rhos_c = [0.5]
    else:
        r_mat = torch.tensor([[rk ** (p - 1) for rk in rk_all] for p in range(1, order + 1)], dtype=torch.float64)
        rhos_c = torch.linalg.solve(r_mat, torch.tensor(b, dtype=torch.float64)).tolist()
    corr = (model_t - m0) * rhos_c[-1]
    for r, d in zip(rhos_c[:-1], d1s, strict=True):
        corr = corr + d * r
    return x_t - b_h * corr


# ---------------------------------------------------------------------------------------------------
# Latent consistency models (Luo et al. 2023)
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_lcm(
    denoiser: Denoise,
    x: Tensor,
    sigmas: Tensor,
    *,
    generators: Generators | None = None,
    callback: Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    timesteps: Tensor | None = None,
    timestep_scaling: float = 10.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """Multistep consistency sampling (Luo et al. 2023, "Latent Consistency Models", Algorithm 1): jump to
    x0, re-noise to the next sigma with fresh noise. With ``timesteps``, the consistency boundary condition
    ``f = c_skip(t) x_t + c_out(t) x0`` of LCM's parameterisation (eq. 5, t scaled by ``timestep_scaling``)
    is applied as diffusers' LCMScheduler does."""
    loop = _Loop(denoiser, x, sigmas, generators, callback, extra_args)
    ts = None if timesteps is None else [float(t) for t in timesteps.detach().cpu()]
    for i in range(loop.n):
        sigma, sigma_next = loop.s[i], loop.s[i + 1]
        denoised = loop.model(x, sigma, step=i)
        if ts is not None:
            st = ts[i] * timestep_scaling
            c_skip = sigma_data**2 / (st**2 + sigma_data**2)
            c_out = st / math.sqrt(st**2 + sigma_data**2)
            denoised = denoised * c_out + x * (c_skip / math.sqrt(1 + sigma**2))  # x_t in VP scaling
        x = denoised
        if sigma_next > 0:
            x = x + loop.noise(x) * sigma_next
        loop.done(i, x, denoised)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_a": sample_euler_a,
    "heun": sample_heun,
    "dpm2": sample_dpm2,
    "dpm2_a": sample_dpm2_a,
    "lms": sample_lms,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2s_a": sample_dpmpp_2s_a,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "restart": sample_restart,
    "ipndm": sample_ipndm,
    "ipndm_v": sample_ipndm_v,
    "heunpp2": sample_heunpp2,
    "dpm_fast": sample_dpm_fast,
    "dpm_adaptive": sample_dpm_adaptive,
    "unipc": sample_unipc,
    "lcm": sample_lcm,
    "plms": sample_plms,
}
