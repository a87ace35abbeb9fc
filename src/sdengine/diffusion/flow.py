"""Rectified-flow (flow matching) models: their noise schedule, their x0-denoiser and their noise scaling.

A flow model (Stable Diffusion 3 / 3.5, Flux) is trained on the straight path between data and noise
(Liu et al. 2023, "Flow Straight and Fast"; Lipman et al. 2023, "Flow Matching for Generative Modeling";
Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", the SD3 paper)::

    x_s = (1 - s) x0 + s eps,   s in [0, 1],   the network predicts v = eps - x0 at timestep 1000 s,

so ``x0 = x_s - s v`` (:class:`FlowDenoiser`). Its probability-flow ODE in ``s`` is ``dx/ds = v = (x - x0) / s``:
the same form as the VE ODE ``dx/dsigma = (x - x0) / sigma`` the samplers integrate, so an ODE sampler written with
``d = (x - denoised) / sigma`` is right with ``sigma = s`` ("the flow view"; its Euler step is diffusers'
FlowMatchEulerDiscreteScheduler step). What is not right there as written: fresh noise in VE units (ancestral and
SDE samplers) and exponential integrators in ``lambda = -log sigma``. For those the flow model is read as the VP
model it is, with ``alpha_s = 1 - s`` and ``sigma_s = s``: in the VE view ``x_ve = x_s / (1 - s)`` with
``sigma_ve = s / (1 - s)``, whose ``-log sigma_ve = log((1 - s) / s)`` is the half-log-SNR (diffusers'
DPMSolverMultistepScheduler with ``use_flow_sigmas``, ComfyUI's ``sigma_to_half_log_snr``), and every VE sampler
is exact (:class:`VEView`). Euler ancestral has ComfyUI's own flow rule (``samplers.sample_euler_a(flow=True)``).

The schedule (:class:`FlowSchedule`) is the time shift: SD3's ``s' = shift s / (1 + (shift - 1) s)`` (shift 3.0),
Flux dev's resolution-dependent ``s' = e^mu / (e^mu + 1/s - 1)`` with ``mu`` linear in the image token count
(:func:`dynamic_shift_mu`), Flux schnell none. :func:`flow_grid` turns it into the sigma grid of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion.samplers import SamplerStep
from sdengine.diffusion.schedules import (
    SamplingGrid,
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    simple_sigmas,
)
from sdengine.errors import UsageError

# The schedules a flow model takes (:func:`flow_grid`).
FLOW_SCHEDULES: tuple[str, ...] = ("normal", "karras", "exponential", "simple", "sgm_uniform", "beta")
# How the `normal` grid spaces its points before the shift: "scheduler", diffusers' FlowMatchEulerDiscreteScheduler
# (n points from the table's sigma_max to its sigma_min; SD3's pipelines); "flux", what diffusers' Flux pipelines
# hand the scheduler (``linspace(1, 1/n, n)``).
FLOW_SPACINGS: tuple[str, ...] = ("scheduler", "flux")
# ComfyUI's offset_first_sigma_for_snr: a VE-view sampler cannot start at s = 1 (sigma_ve = inf); it starts at
# the schedule's sigma of this percent instead, from the same noise.
FIRST_SIGMA_PERCENT = 1e-4
# ComfyUI's ModelSamplingFlux keeps a 10000-entry table (its simple / beta / sgm_uniform pick from it)
FLUX_TABLE_LENGTH = 10_000
# diffusers' calculate_shift defaults (FluxPipeline; FlowMatchEulerDiscreteScheduler's config keys)
FLUX_SHIFT_DEFAULTS: dict[str, float] = {
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


def dynamic_shift_mu(
    image_seq_len: int,
    *,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
    base_image_seq_len: int = 256,
    max_image_seq_len: int = 4096,
) -> float:
    """Flux dev's ``mu``: linear in the number of image tokens, ``base_shift`` at ``base_image_seq_len`` and
    ``max_shift`` at ``max_image_seq_len`` (extrapolated beyond; diffusers' ``calculate_shift``)."""
    if not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise UsageError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    if max_image_seq_len == base_image_seq_len:
        raise UsageError("max_image_seq_len must differ from base_image_seq_len")
    m = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * m + (base_shift - m * base_image_seq_len)


def flux_image_seq_len(latent_height: int, latent_width: int, patch: int = 2) -> int:
    """The image token count of a Flux latent of this size: one token per ``patch`` x ``patch`` cell."""
    if latent_height < patch or latent_width < patch:
        raise UsageError(f"latent {latent_height}x{latent_width} is smaller than one {patch}x{patch} patch")
    return (latent_height // patch) * (latent_width // patch)


@dataclass(frozen=True)
class FlowSchedule:
    """The time shift of a flow model (the flow counterpart of :class:`sdengine.diffusion.schedules.NoiseSchedule`).

    ``shift``: SD3's static shift (3.0; 1.0 is none). ``mu``: the dynamic (resolution-dependent) shift of Flux dev,
    which replaces ``shift`` when set (:func:`dynamic_shift_mu`). ``multiplier``: the network's timestep per unit of
    ``s`` (1000). ``num_train_timesteps``: the table's length (ComfyUI's ModelSamplingDiscreteFlow, 1000).
    ``shift_terminal``: diffusers' option that stretches the grid to end at that sigma. ``spacing``: see
    :data:`FLOW_SPACINGS`."""

    shift: float = 1.0
    mu: float | None = None
    multiplier: float = 1000.0
    num_train_timesteps: int = 1000
    shift_terminal: float | None = None
    spacing: str = "scheduler"

    def __post_init__(self) -> None:
        if not (isinstance(self.shift, int | float) and math.isfinite(self.shift) and self.shift > 0):
            raise UsageError(f"flow shift must be a finite number above 0, got {self.shift!r}")
        if self.mu is not None and not (isinstance(self.mu, int | float) and math.isfinite(self.mu)):
            raise UsageError(f"flow mu must be a finite number, got {self.mu!r}")
        if not (isinstance(self.multiplier, int | float) and self.multiplier > 0):
            raise UsageError(f"flow multiplier must be above 0, got {self.multiplier!r}")
        if not isinstance(self.num_train_timesteps, int) or not 2 <= self.num_train_timesteps <= 100_000:
            raise UsageError(f"num_train_timesteps must be an integer in [2, 100000], got {self.num_train_timesteps!r}")
        if self.shift_terminal is not None and not 0.0 < float(self.shift_terminal) < 1.0:
            raise UsageError(f"shift_terminal must be in (0, 1), got {self.shift_terminal!r}")
        if self.spacing not in FLOW_SPACINGS:
            raise UsageError(f"unknown flow spacing {self.spacing!r}; valid: {', '.join(FLOW_SPACINGS)}")

    # -- building ------------------------------------------------------------------------------------------------

    @classmethod
    def sd3(cls, shift: float = 3.0) -> FlowSchedule:
        """Stable Diffusion 3 / 3.5 (shift 3.0 unless the model's scheduler config says otherwise)."""
        return cls(shift=shift)

    @classmethod
    def flux(cls, *, mu: float | None = None, image_seq_len: int | None = None, **shift_config: float) -> FlowSchedule:
        """Flux: dev with its dynamic shift (``mu``, or ``image_seq_len`` tokens: :func:`flux_image_seq_len`;
        ``shift_config``: base_shift, max_shift, base_image_seq_len, max_image_seq_len), schnell with neither (no
        shift). The `normal` grid is the Flux pipelines' ``linspace(1, 1/n, n)``; the table has the 10000 entries of
        ComfyUI's ModelSamplingFlux."""
        unknown = sorted(set(shift_config) - set(FLUX_SHIFT_DEFAULTS))
        if unknown:
            valid = ", ".join(FLUX_SHIFT_DEFAULTS)
            raise UsageError(f"unknown Flux shift setting {', '.join(unknown)}; valid: {valid}")
        if mu is None and image_seq_len is not None:
            settings = {**FLUX_SHIFT_DEFAULTS, **shift_config}
            mu = dynamic_shift_mu(
                image_seq_len,
                base_shift=float(settings["base_shift"]),
                max_shift=float(settings["max_shift"]),
                base_image_seq_len=int(settings["base_image_seq_len"]),
                max_image_seq_len=int(settings["max_image_seq_len"]),
            )
        return cls(mu=mu, spacing="flux", num_train_timesteps=FLUX_TABLE_LENGTH)

    @classmethod
    def from_config(
        cls, config: Mapping[str, Any], *, mu: float | None = None, image_seq_len: int | None = None
    ) -> FlowSchedule:
        """From a diffusers FlowMatchEulerDiscreteScheduler config (``shift``, ``use_dynamic_shifting`` with
        ``base_shift`` / ``max_shift`` / ``base_image_seq_len`` / ``max_image_seq_len``, ``shift_terminal``,
        ``num_train_timesteps``). A dynamic-shift config needs ``mu`` or the latent's ``image_seq_len``. Options
        sdengine does not follow (``invert_sigmas``, linear ``time_shift_type``, ``stochastic_sampling``) are
        refused rather than ignored."""
        cfg = {k: v for k, v in config.items() if not str(k).startswith("_") and v is not None}
        for key, fine in (("invert_sigmas", False), ("stochastic_sampling", False), ("time_shift_type", "exponential")):
            if key in cfg and cfg[key] != fine:
                raise UsageError(f"flow scheduler option {key}={cfg[key]!r} is not supported (only {fine!r})")
        if any(cfg.get(k) for k in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")):
            raise UsageError("a scheduler config's use_*_sigmas option is a schedule: pass schedule= to sample()")
        terminal = cfg.get("shift_terminal")
        common: dict[str, Any] = {
            "num_train_timesteps": int(cfg.get("num_train_timesteps", 1000)),
            "shift_terminal": float(terminal) if terminal else None,
        }
        if bool(cfg.get("use_dynamic_shifting", False)):
            if mu is None:
                if image_seq_len is None:
                    raise UsageError("this flow scheduler shifts by resolution: give mu or image_seq_len")
                mu = dynamic_shift_mu(
                    image_seq_len,
                    base_shift=float(cfg.get("base_shift", FLUX_SHIFT_DEFAULTS["base_shift"])),
                    max_shift=float(cfg.get("max_shift", FLUX_SHIFT_DEFAULTS["max_shift"])),
                    base_image_seq_len=int(cfg.get("base_image_seq_len", FLUX_SHIFT_DEFAULTS["base_image_seq_len"])),
                    max_image_seq_len=int(cfg.get("max_image_seq_len", FLUX_SHIFT_DEFAULTS["max_image_seq_len"])),
                )
            return cls(mu=float(mu), **common)
        return cls(shift=float(cfg.get("shift", 1.0)), **common)

    # -- the shift and the table ---------------------------------------------------------------------------------

    @property
    def dynamic(self) -> bool:
        return self.mu is not None

    def shifted(self, u: Tensor) -> Tensor:
        """The schedule's sigma at un-shifted time ``u`` (in (0, 1]), in ``u``'s dtype: ``e^mu / (e^mu + 1/u - 1)``
        with a dynamic shift, else ``shift u / (1 + (shift - 1) u)``."""
        if self.mu is not None:
            e = math.exp(self.mu)
            return e / (e + (1 / u - 1))
        return self.shift * u / (1 + (self.shift - 1) * u)

    @property
    def sigmas(self) -> Tensor:
        """The table (ComfyUI's ModelSamplingDiscreteFlow): ``shifted(k / T)`` for k = 1..T, float32, increasing."""
        T = self.num_train_timesteps
        return self.shifted(torch.arange(1, T + 1, dtype=torch.float32) / T)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The network's timestep at ``sigma``: ``multiplier * sigma`` (float32)."""
        return torch.as_tensor(sigma, dtype=torch.float32) * self.multiplier

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Inverse of :meth:`sigma_to_t` (float32)."""
        return torch.as_tensor(t, dtype=torch.float32) / self.multiplier

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's percent_to_sigma of a flow model: 1 at 0 %, 0 at 100 %, else ``shifted(1 - percent)``."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return float(self.shifted(torch.tensor(1.0 - percent, dtype=torch.float64)))

    def _scheduler_ends(self) -> tuple[float, float]:
        """FlowMatchEulerDiscreteScheduler's sigma_max and sigma_min: the ends of its float32 training table (shifted
        unless the shift is dynamic, which it applies at set_timesteps only)."""
        T = self.num_train_timesteps
        ends = torch.tensor([float(T), 1.0], dtype=torch.float32) / T
        if self.mu is None:
            ends = self.shift * ends / (1 + (self.shift - 1) * ends)
        return float(ends[0]), float(ends[1])


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------


def _stretch_to_terminal(sigmas: Tensor, terminal: float) -> Tensor:
    """diffusers' shift_terminal: ``1 - (1 - s) / ((1 - s_last) / (1 - terminal))``, so the last sigma is
    ``terminal``."""
    scale = (1 - sigmas[-1]) / (1 - terminal)
    return 1 - (1 - sigmas) / scale


def _normal_sigmas(schedule: FlowSchedule, steps: int) -> Tensor:
    """The `normal` grid without its final 0: FlowMatchEulerDiscreteScheduler.set_timesteps(steps) (spacing
    "scheduler": float64 timesteps evenly from 1000 sigma_max to 1000 sigma_min, then shifted), or with the Flux
    pipelines' float32 ``linspace(1, 1/n, n)`` shifted in float32 (spacing "flux"); then shift_terminal."""
    if schedule.spacing == "flux":
        u = torch.linspace(1.0, 1.0 / steps, steps, dtype=torch.float64).to(torch.float32)
        sigmas = schedule.shifted(u).to(torch.float64)
    else:
        hi, lo = schedule._scheduler_ends()
        T = schedule.num_train_timesteps
        u = torch.linspace(hi * T, lo * T, steps, dtype=torch.float64) / T
        sigmas = schedule.shifted(u)
    if schedule.shift_terminal is not None:
        if steps < 2:  # one sigma (1) has no span to stretch: diffusers' rule divides 0 by 0 (NaN latents)
            raise UsageError(
                f"this model's schedule ends at shift_terminal {schedule.shift_terminal:g} (a stretched grid): it "
                "needs at least 2 steps, got 1"
            )
        sigmas = _stretch_to_terminal(sigmas, float(schedule.shift_terminal))
    return sigmas


def _comfy_sgm_uniform(schedule: FlowSchedule, steps: int) -> Tensor:
    """ComfyUI's sgm_uniform on a flow model (its normal_scheduler with sgm): timesteps evenly from the table's
    top to its bottom in float32, n + 1 points with the last dropped, each made a sigma by the shift."""
    table = schedule.sigmas
    start = float(schedule.sigma_to_t(table[-1]))
    end = float(schedule.sigma_to_t(table[0]))
    ts = torch.linspace(start, end, steps + 1, dtype=torch.float32)[:-1]
    return schedule.shifted(ts / schedule.multiplier).to(torch.float64)


def flow_grid(schedule: FlowSchedule, steps: int, name: str = "normal", *, comfy: bool = False) -> SamplingGrid:
    """The sigmas (``steps + 1``, ending at 0) and network timesteps (``multiplier * sigma``) of ``steps`` steps
    of schedule ``name`` on a flow model:

    * ``normal``: diffusers' FlowMatchEulerDiscreteScheduler (see :data:`FLOW_SPACINGS`);
    * ``karras`` / ``exponential``: diffusers' ``use_karras_sigmas`` / ``use_exponential_sigmas`` (rho 7 / even in
      log sigma between the ends of the `normal` grid); with ``comfy``, ComfyUI's (between the table's ends);
    * ``simple``, ``sgm_uniform``, ``beta`` (alpha = beta = 0.6): ComfyUI's schedulers on the 1000-entry table.
    """
    if name not in FLOW_SCHEDULES:
        raise UsageError(f"flow models cannot use schedule {name!r}; they take: {', '.join(FLOW_SCHEDULES)}")
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise UsageError(f"steps must be an integer between 1 and {schedule.num_train_timesteps}, got {steps!r}")
    if name in ("normal", "karras", "exponential") and not comfy:
        sigmas = _normal_sigmas(schedule, steps)
        hi, lo = float(sigmas[0]), float(sigmas[-1])
        if name == "karras":
            sigmas = karras_sigmas(steps, lo, hi)
        elif name == "exponential":
            sigmas = exponential_sigmas(steps, lo, hi)
    elif name == "normal":  # ComfyUI's normal_scheduler on a flow model: the sgm one with n points, not n + 1
        table = schedule.sigmas
        ts = torch.linspace(
            float(schedule.sigma_to_t(table[-1])), float(schedule.sigma_to_t(table[0])), steps, dtype=torch.float32
        )
        sigmas = schedule.shifted(ts / schedule.multiplier).to(torch.float64)
    elif name == "karras":
        sigmas = karras_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    elif name == "exponential":
        sigmas = exponential_sigmas(steps, schedule.sigma_min, schedule.sigma_max)
    elif name == "simple":
        sigmas = simple_sigmas(steps, schedule.sigmas).to(torch.float64)
    elif name == "sgm_uniform":
        sigmas = _comfy_sgm_uniform(schedule, steps)
    else:  # beta
        sigmas = beta_sigmas(steps, schedule.sigmas).to(torch.float64)
    s32 = torch.cat([sigmas.to(torch.float32), torch.zeros(1)])
    return SamplingGrid(sigmas=s32, timesteps=s32[:-1] * schedule.multiplier)


def flow_img2img_start(steps: int, strength: float) -> int:
    """The first step img2img runs on a flow grid of ``steps`` steps: diffusers' SD3 / Flux img2img pipelines'
    ``int(max(steps - min(steps * strength, steps), 0))``, in floats: strength 0.35 of 10 steps runs 4 (VP models'
    rule: 3), and any strength above 0 runs at least one."""
    if not 0.0 < float(strength) <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}")
    return int(max(steps - min(steps * strength, steps), 0))


# ---------------------------------------------------------------------------------------------------
# Noise scaling and the denoiser
# ---------------------------------------------------------------------------------------------------


def _rows(values: Tensor | float, like: Tensor) -> Tensor:
    v = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return v if v.ndim == 0 else v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def flow_noise_scaling(sigma: Tensor | float, noise: Tensor, latent: Tensor) -> Tensor:
    """The flow model's sample at ``sigma`` from clean ``latent`` and unit ``noise``: ``sigma noise + (1 - sigma)
    latent`` (diffusers' ``scale_noise``, ComfyUI's CONST noise_scaling); ``sigma`` a scalar or one per row."""
    if noise.shape != latent.shape:
        raise UsageError(f"noise shape {tuple(noise.shape)} != latent shape {tuple(latent.shape)}")
    s = _rows(sigma, noise)
    return s * noise + (1.0 - s) * latent


class FlowDenoiser:
    """``denoiser(x, sigma, **cond) -> x0`` for a flow network ``net(x, t, **cond) -> v``, ``t = multiplier *
    sigma`` (one per row, float32), ``x0 = x - sigma v``. ``sigma`` is the flow ``s`` (a float or (B,) tensor)."""

    prediction = "flow"

    def __init__(self, net: Callable[..., Tensor], schedule: FlowSchedule) -> None:
        if not isinstance(schedule, FlowSchedule):
            raise UsageError(f"FlowDenoiser needs a FlowSchedule, got {type(schedule).__name__}")
        self.net = net
        self.schedule = schedule

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.net, "takes_step", False))

    @property
    def takes_row_kinds(self) -> bool:
        return bool(getattr(self.net, "takes_row_kinds", False))

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1)
        if s.shape[0] == 1:
            s = s.expand(x.shape[0])
        if s.shape[0] != x.shape[0]:
            raise UsageError(f"{s.shape[0]} sigmas for a batch of {x.shape[0]}")
        t = (s * self.schedule.multiplier).to(x.device)  # float32, as diffusers' sigmas * 1000
        v = self.net(x, t, **cond).to(x.dtype)
        first = float(s[0])
        if bool((s == first).all()):
            return torch.add(x, v, alpha=-first)
        return x - _rows(s, x) * v


# ---------------------------------------------------------------------------------------------------
# The VE view
# ---------------------------------------------------------------------------------------------------


def ve_sigma(s: float) -> float:
    """``s / (1 - s)``: the VE sigma of flow sigma ``s`` < 1 (``alpha = 1 - s``, VP sigma ``s``)."""
    return s / (1.0 - s)


def flow_sigma(sigma_ve: float) -> float:
    """``sigma / (1 + sigma)``: the flow sigma of a VE sigma."""
    return sigma_ve / (1.0 + sigma_ve)


class VEView:
    """A flow denoiser seen as a VE one: ``view(x_ve, sigma_ve) = flow(x_ve (1 - s), s)`` with ``s = sigma_ve /
    (1 + sigma_ve)`` (x0 is the same in both scalings). ``grid``: the flow sigmas of the run, so their VE sigmas
    (float32, as the samplers hand them on) map back to exactly those (no round-trip error in the network's
    timestep); other sigmas (midpoints) are converted. Hands on ``step`` (its sigma made a flow one) and the CFG++
    hook."""

    def __init__(self, inner: Callable[..., Tensor], grid: Tensor) -> None:
        self.inner = inner
        self.exact = {float(torch.tensor(ve_sigma(float(s)), dtype=torch.float32)): float(s) for s in grid if s < 1}
        self.takes_step = bool(getattr(inner, "takes_step", False))
        self.takes_guidance_parts = bool(getattr(inner, "takes_guidance_parts", False))

    def flow_sigma(self, sigma_ve: float) -> float:
        hit = self.exact.get(sigma_ve)
        return flow_sigma(sigma_ve) if hit is None else hit

    def __call__(self, x: Tensor, sigma: Tensor | float, **extra: Any) -> Tensor:
        ve = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1)
        if bool((ve == ve[0]).all()):  # one level for the batch (every sampler step)
            s = torch.full((ve.shape[0],), self.flow_sigma(float(ve[0])), dtype=torch.float32)
        else:
            s = torch.tensor([self.flow_sigma(float(v)) for v in ve], dtype=torch.float32)
        step = extra.get("step")
        if isinstance(step, SamplerStep) and step.sigma is not None:
            extra["step"] = replace(step, sigma=self.flow_sigma(float(step.sigma)))
        scale = 1.0 - s.to(torch.float64)
        x_flow = x * float(scale[0]) if bool((s == s[0]).all()) else x * _rows(scale.to(torch.float32), x)
        return self.inner(x_flow, s if s.shape[0] > 1 else s[0].expand(x.shape[0]), **extra)


# ---------------------------------------------------------------------------------------------------
# Which samplers run on flow models, and how
# ---------------------------------------------------------------------------------------------------

# sampler -> the view it runs in on a flow model: "flow", as written with sigma = s (ODE samplers whose steps are
# built from d = (x - x0) / sigma); "rf", ComfyUI's flow form of its noise (Euler a); "ve", in the VE view
# (:class:`VEView`: exponential integrators and SDE samplers, exact there). tests/test_flow_sampling.py holds each
# against the exact x0 of Gaussian data, and Euler, Heun, DPM++ 2M, 2M SDE and UniPC against diffusers' flow
# schedulers.
FLOW_SAMPLERS: dict[str, str] = {
    **dict.fromkeys(("euler", "heun", "dpm2", "lms", "ipndm", "ipndm_v", "heunpp2", "gradient_estimation"), "flow"),
    "euler_a": "rf",
    **dict.fromkeys(
        (
            "dpmpp_2m",
            "dpmpp_2m_sde",
            "dpmpp_2m_sde_heun",
            "dpmpp_sde",
            "dpmpp_2s_a",
            "dpmpp_3m_sde",
            "dpm2_a",
            "unipc",
            "res_multistep",
            "res_multistep_a",
            "deis",
            "er_sde",
            "seeds_2",
            "seeds_3",
            "exp_heun_2_x0",
            "exp_heun_2_x0_sde",
            # CFG++ (Chung et al. 2024) in the VE view is the paper's rule with alpha = 1 - s: the next sample is
            # (1 - s') x0_guided + s' eps_uncond, eps_uncond = (x - (1 - s) x0_uncond) / s
            "euler_cfg_pp",
            "euler_a_cfg_pp",
            "dpmpp_2m_cfg_pp",
            "dpmpp_2s_a_cfg_pp",
            "res_multistep_cfg_pp",
            "res_multistep_a_cfg_pp",
            "gradient_estimation_cfg_pp",
        ),
        "ve",
    ),
}
_FLOW_REFUSED_WHY = {
    **dict.fromkeys(("ddpm", "ddim", "plms", "lcm"), "it steps on a VP model's training timesteps"),
    "restart": "it builds its own VP Karras grid",
    **dict.fromkeys(("sa_solver", "sa_solver_pece"), "its stochastic window is read off a VP table"),
    **dict.fromkeys(
        ("dpm_fast", "dpm_adaptive"), "in the VE view it misses the exact flow of Gaussian data: not right yet"
    ),
}


def flow_sampler_view(sampler: str) -> str:
    """How ``sampler`` runs on a flow model (:data:`FLOW_SAMPLERS`); a sampler that has no right form there is
    refused with one line listing those that do."""
    view = FLOW_SAMPLERS.get(sampler)
    if view is None:
        why = _FLOW_REFUSED_WHY.get(sampler, "it is not verified on flow models")
        raise UsageError(
            f"sampler {sampler!r} cannot run on a flow model ({why}); flow models take: {', '.join(FLOW_SAMPLERS)}"
        )
    return view
