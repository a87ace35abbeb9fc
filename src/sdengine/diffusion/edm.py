"""Models trained with EDM noise conditioning (Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models"): Playground v2.5 (SDXL), Stability's CosXL and CosXL Edit.

Such a network is trained in the VE scaling ``x = x0 + sigma n`` on a continuous range of sigmas, with the
preconditioning of the paper's table 1 ("EDM" column)::

    c_in = 1 / sqrt(sigma^2 + sigma_data^2)          the network reads c_in x
    c_noise = 0.25 ln sigma                          the network's "timestep"
    c_skip = sigma_data^2 / (sigma^2 + sigma_data^2)
    c_out = sigma sigma_data / sqrt(sigma^2 + sigma_data^2)
    x0 = c_skip x + c_out F(c_in x; c_noise)

``prediction`` "epsilon" (Playground v2.5; diffusers' EDM schedulers' name for it, ComfyUI's ``EDM`` model type) is
that ``F``; "v_prediction" (CosXL, ComfyUI's ``V_PREDICTION_EDM``) is the same with ``c_out`` negated (the
network predicts ``-F``, i.e. v). The samplers already integrate in the VE scaling, so the samplers that need no
VP table run as written on :class:`EDMDenoiser`; the ones that step on a VP model's training timesteps (DDIM, PLMS,
LCM, DDPM) or read a VP table are refused (:func:`edm_sampler_check`).

The schedule (:class:`EDMSchedule`) is the continuous range ``[sigma_min, sigma_max]``; its grids
(:func:`edm_grid`) are diffusers' EDMEulerScheduler / EDMDPMSolverMultistepScheduler ones (``karras``, rho 7, or
``exponential``, ending at 0), and ComfyUI's table schedules (``simple``, ``sgm_uniform``, ``beta``) on ComfyUI's
ModelSamplingContinuousEDM table: 1000 sigmas evenly spaced in log sigma from sigma_min to sigma_max.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion.flow import FLOW_SAMPLERS
from sdengine.diffusion.schedules import SamplingGrid, beta_sigmas, simple_sigmas
from sdengine.errors import UsageError

# The diffusers scheduler classes of an EDM model's scheduler config.
EDM_SCHEDULER_CLASSES: tuple[str, ...] = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")
EDM_PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction")
EDM_SIGMA_SCHEDULES: tuple[str, ...] = ("karras", "exponential")
# The schedules an EDM model takes: `normal` is its scheduler config's own sigma_schedule (karras unless it says
# exponential), as diffusers runs it.
EDM_SCHEDULES: tuple[str, ...] = ("normal", "karras", "exponential", "simple", "sgm_uniform", "beta")
EDM_TABLE_LENGTH = 1000  # ComfyUI's ModelSamplingContinuousEDM table
# Playground v2.5 (diffusers' EDMDPMSolverMultistepScheduler config) and CosXL (ComfyUI's V_PREDICTION_EDM
# defaults with the edm_vpred.* values of the released files)
PLAYGROUND_SCHEDULER: dict[str, Any] = {
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "solver_order": 2,
    "final_sigmas_type": "zero",
}
COSXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EDMEulerScheduler",
    "sigma_min": 0.002,
    "sigma_max": 120.0,
    "sigma_data": 1.0,
    "sigma_schedule": "karras",
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "rho": 7.0,
    "final_sigmas_type": "zero",
}


def is_edm_config(config: Mapping[str, Any] | None) -> bool:
    """Whether a diffusers scheduler config is an EDM scheduler's (:data:`EDM_SCHEDULER_CLASSES`)."""
    return bool(config) and str((config or {}).get("_class_name", "")) in EDM_SCHEDULER_CLASSES


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise UsageError(f"EDM {name} must be a finite number above 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class EDMSchedule:
    """The continuous sigma range of an EDM model and its preconditioning constants.

    ``ramp64``: its karras grid is computed from a float64 ramp (EDMEulerScheduler) rather than a float32 one
    (EDMDPMSolverMultistepScheduler, k-diffusion, ComfyUI); the two differ in the last float32 bit."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    prediction: str = "epsilon"
    sigma_schedule: str = "karras"
    rho: float = 7.0
    ramp64: bool = False
    num_train_timesteps: int = EDM_TABLE_LENGTH

    def __post_init__(self) -> None:
        lo, hi = _positive("sigma_min", self.sigma_min), _positive("sigma_max", self.sigma_max)
        _positive("sigma_data", self.sigma_data)
        _positive("rho", self.rho)
        if lo >= hi:
            raise UsageError(f"EDM sigma_min {lo} must be below sigma_max {hi}")
        if self.prediction not in EDM_PREDICTIONS:
            valid = ", ".join(EDM_PREDICTIONS)
            raise UsageError(f"EDM models predict {valid}; got prediction type {self.prediction!r}")
        if self.sigma_schedule not in EDM_SIGMA_SCHEDULES:
            valid = ", ".join(EDM_SIGMA_SCHEDULES)
            raise UsageError(f"EDM sigma_schedule must be one of {valid}, got {self.sigma_schedule!r}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EDMSchedule:
        """From a diffusers EDMEulerScheduler / EDMDPMSolverMultistepScheduler config. Options sdengine does not
        follow (``final_sigmas_type`` "sigma_min", thresholding, a third solver order, the SDE algorithm) are
        refused by name rather than ignored; the sampler is the request's."""
        cfg = {k: v for k, v in config.items() if not str(k).startswith("_") and v is not None}
        name = str(config.get("_class_name", ""))
        if name not in EDM_SCHEDULER_CLASSES:
            raise UsageError(f"not an EDM scheduler config: _class_name={name!r}")
        for key, fine in (
            ("final_sigmas_type", "zero"),
            ("thresholding", False),
            ("algorithm_type", "dpmsolver++"),
            ("euler_at_final", False),
        ):
            if key in cfg and cfg[key] != fine:
                raise UsageError(f"EDM scheduler option {key}={cfg[key]!r} is not supported (only {fine!r})")
        if "solver_order" in cfg and cfg["solver_order"] not in (1, 2):
            raise UsageError(f"EDM scheduler option solver_order={cfg['solver_order']!r} is not supported (1 or 2)")
        return cls(
            sigma_min=cfg.get("sigma_min", 0.002),
            sigma_max=cfg.get("sigma_max", 80.0),
            sigma_data=cfg.get("sigma_data", 0.5),
            prediction=str(cfg.get("prediction_type", "epsilon")),
            sigma_schedule=str(cfg.get("sigma_schedule", "karras")),
            rho=cfg.get("rho", 7.0),
            ramp64=name == "EDMEulerScheduler",
        )

    # -- the table (ComfyUI's) and the timestep --------------------------------------------------------------

    @property
    def sigmas(self) -> Tensor:
        """ComfyUI's table: 1000 sigmas evenly spaced in log sigma from sigma_min to sigma_max, float32, rising."""
        return torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.num_train_timesteps).exp()

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """The network's timestep ``c_noise = 0.25 ln sigma`` (float32)."""
        return 0.25 * torch.as_tensor(sigma, dtype=torch.float32).log()

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        return (torch.as_tensor(t, dtype=torch.float32) / 0.25).exp()

    def percent_to_sigma(self, percent: float) -> float:
        """ComfyUI's ModelSamplingContinuousEDM.percent_to_sigma: log-linear from sigma_max at 0 % to sigma_min,
        a huge sigma at or below 0 % and 0 at or above 100 %."""
        if percent <= 0.0:
            return 999999999.9
        if percent >= 1.0:
            return 0.0
        lo = math.log(self.sigma_min)
        return math.exp((math.log(self.sigma_max) - lo) * (1.0 - percent) + lo)

    # -- preconditioning ---------------------------------------------------------------------------------------

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in)`` at ``sigma`` (EDM table 1; ``c_out`` negated for v-prediction)."""
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2) ** 0.5
        if self.prediction == "v_prediction":
            c_out = -c_out
        return c_skip, c_out, 1 / (sigma**2 + sd**2) ** 0.5


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------


def _karras(schedule: EDMSchedule, steps: int) -> Tensor:
    """diffusers' EDM karras sigmas (k-diffusion's get_sigmas_karras without its 0), from a float64 ramp
    (EDMEulerScheduler) or a float32 one (EDMDPMSolverMultistepScheduler), computed in the ramp's dtype."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64 if schedule.ramp64 else torch.float32)
    lo, hi = schedule.sigma_min ** (1 / schedule.rho), schedule.sigma_max ** (1 / schedule.rho)
    return (hi + ramp * (lo - hi)) ** schedule.rho


def _exponential(schedule: EDMSchedule, steps: int) -> Tensor:
    """diffusers' EDM exponential sigmas: float32 ``exp(linspace(ln sigma_min, ln sigma_max, n))`` reversed."""
    return torch.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max), steps).exp().flip(0)


def _sgm_uniform(schedule: EDMSchedule, steps: int) -> Tensor:
    """ComfyUI's sgm_uniform on a continuous EDM model: timesteps ``0.25 ln sigma`` evenly from the table's top to
    its bottom (n + 1 points, the last dropped), each made a sigma again."""
    table = schedule.sigmas
    start, end = float(schedule.sigma_to_t(table[-1])), float(schedule.sigma_to_t(table[0]))
    ts = torch.linspace(start, end, steps + 1)[:-1]
    return schedule.t_to_sigma(ts)


def _comfy_sigmas(schedule: EDMSchedule, steps: int, name: str) -> Tensor:
    """ComfyUI's lists on a continuous EDM model, between its table's ends: ``normal`` its normal_scheduler
    (timesteps ``0.25 ln sigma`` evenly from the top to the bottom, n points: log-linear), ``karras`` /
    ``exponential`` k-diffusion's get_sigmas_karras / get_sigmas_exponential (float32)."""
    table = schedule.sigmas
    lo, hi = float(table[0]), float(table[-1])
    if name == "normal":
        ts = torch.linspace(float(schedule.sigma_to_t(table[-1])), float(schedule.sigma_to_t(table[0])), steps)
        return schedule.t_to_sigma(ts)
    if name == "karras":
        ramp = torch.linspace(0, 1, steps)
        lo_r, hi_r = lo ** (1 / schedule.rho), hi ** (1 / schedule.rho)
        return (hi_r + ramp * (lo_r - hi_r)) ** schedule.rho
    return torch.linspace(math.log(hi), math.log(lo), steps).exp()


def edm_grid(schedule: EDMSchedule, steps: int, name: str = "normal", *, comfy: bool = False) -> SamplingGrid:
    """The sigmas (``steps + 1``, ending at 0) and network timesteps (``0.25 ln sigma``, float32) of ``steps``
    steps of schedule ``name`` (:data:`EDM_SCHEDULES`) on an EDM model; ``comfy``: ``normal``, ``karras`` and
    ``exponential`` are ComfyUI's lists (:func:`_comfy_sigmas`) rather than diffusers' (``normal`` the model's
    scheduler config's own sigma_schedule)."""
    if name not in EDM_SCHEDULES:
        raise UsageError(f"EDM models cannot use schedule {name!r}; they take: {', '.join(EDM_SCHEDULES)}")
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise UsageError(f"steps must be an integer between 1 and {schedule.num_train_timesteps}, got {steps!r}")
    kind = schedule.sigma_schedule if name == "normal" and not comfy else name
    if comfy and kind in ("normal", "karras", "exponential"):
        sigmas = _comfy_sigmas(schedule, steps, kind)
    elif kind == "karras":
        sigmas = _karras(schedule, steps)
    elif kind == "exponential":
        sigmas = _exponential(schedule, steps)
    elif kind == "simple":
        sigmas = simple_sigmas(steps, schedule.sigmas)
    elif kind == "beta":
        sigmas = beta_sigmas(steps, schedule.sigmas)
    else:
        sigmas = _sgm_uniform(schedule, steps)
    s32 = torch.cat([sigmas.to(torch.float32), torch.zeros(1)])
    return SamplingGrid(sigmas=s32, timesteps=schedule.sigma_to_t(s32[:-1]))


# ---------------------------------------------------------------------------------------------------
# The denoiser
# ---------------------------------------------------------------------------------------------------


class EDMDenoiser:
    """``denoiser(x, sigma, **cond) -> x0`` for an EDM network ``net(c_in x, c_noise, **cond)``: the
    preconditioning of :meth:`EDMSchedule.scalings`, computed in float32 from float32 sigmas (as diffusers' EDM
    schedulers); ``sigma`` a float or one per row."""

    def __init__(self, net: Callable[..., Tensor], schedule: EDMSchedule) -> None:
        if not isinstance(schedule, EDMSchedule):
            raise UsageError(f"EDMDenoiser needs an EDMSchedule, got {type(schedule).__name__}")
        self.net = net
        self.schedule = schedule
        self.prediction = schedule.prediction

    @property
    def takes_step(self) -> bool:
        return bool(getattr(self.net, "takes_step", False))

    @property
    def takes_row_kinds(self) -> bool:
        return bool(getattr(self.net, "takes_row_kinds", False))

    def timestep(self, sigma: Tensor) -> Tensor:
        """The network's timestep ``0.25 ln sigma`` (float32, on sigma's device)."""
        return self.schedule.sigma_to_t(sigma.detach().to(torch.float32).cpu()).to(sigma.device)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float32).detach().cpu().reshape(-1)
        if s.shape[0] == 1:
            s = s.expand(x.shape[0])
        if s.shape[0] != x.shape[0]:
            raise UsageError(f"{s.shape[0]} sigmas for a batch of {x.shape[0]}")
        c_skip, c_out, c_in = self.schedule.scalings(s)
        t = self.schedule.sigma_to_t(s).to(x.device)
        if bool((s == s[0]).all()):  # one level for the batch (every sampler step): scalar coefficients
            out = self.net(x * float(c_in[0]), t, **cond).to(x.dtype)
            return x * float(c_skip[0]) + out * float(c_out[0])
        shape = (x.shape[0], *([1] * (x.ndim - 1)))
        rows = [c.to(x.device, x.dtype).reshape(shape) for c in (c_skip, c_out, c_in)]
        out = self.net(x * rows[2], t, **cond).to(x.dtype)
        return rows[0] * x + rows[1] * out


# ---------------------------------------------------------------------------------------------------
# Which samplers run on EDM models
# ---------------------------------------------------------------------------------------------------

# The samplers that integrate in the VE scaling on any sigma grid: the ones right on flow models (held there
# against the exact x0 of Gaussian data), which run on an EDM model as written.
EDM_SAMPLERS: tuple[str, ...] = tuple(FLOW_SAMPLERS)
_EDM_REFUSED_WHY = {
    **dict.fromkeys(("ddpm", "ddim", "plms", "lcm"), "it steps on a VP model's training timesteps"),
    "restart": "it builds its own VP Karras grid",
    **dict.fromkeys(("sa_solver", "sa_solver_pece"), "its stochastic window is read off a VP table"),
    **dict.fromkeys(("dpm_fast", "dpm_adaptive"), "it is not verified on EDM models"),
}


def edm_sampler_check(sampler: str) -> None:
    """One line for a sampler that has no right form on an EDM model (:data:`EDM_SAMPLERS` have)."""
    allowed = EDM_SAMPLERS
    if sampler not in allowed:
        why = _EDM_REFUSED_WHY.get(sampler, "it is not verified on EDM models")
        raise UsageError(
            f"sampler {sampler!r} cannot run on an EDM model ({why}); EDM models take: {', '.join(allowed)}"
        )


__all__ = [
    "COSXL_SCHEDULER",
    "EDM_PREDICTIONS",
    "EDM_SAMPLERS",
    "EDM_SCHEDULER_CLASSES",
    "EDM_SCHEDULES",
    "PLAYGROUND_SCHEDULER",
    "EDMDenoiser",
    "EDMSchedule",
    "edm_grid",
    "edm_sampler_check",
    "is_edm_config",
]
