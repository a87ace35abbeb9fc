"""Noise schedules, as pure functions: betas -> alphas_cumprod -> sigmas, and the sigma grids samplers walk.

Two views of the same forward process (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"):

* variance preserving (VP), what the network is trained on: ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
  with ``a_t = alphas_cumprod[t]``;
* variance exploding (VE), what the samplers integrate (Karras et al. 2022, "Elucidating the Design
  Space of Diffusion-Based Generative Models"): ``x = x0 + sigma eps`` with ``sigma = sqrt((1 - a) / a)``,
  so ``x_VE = x_VP / sqrt(a)``.

Everything here is a function of tensors or a frozen dataclass; nothing holds sampler state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from sdengine.errors import UsageError
from sdengine.models.config_checks import check_config
from sdengine.names import unknown_name

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Stable Diffusion's betas (SD 1.x, 2.x, SDXL, and the models trained here on its schedule), as the scheduler
# configs of their diffusers folders give them (over 1000 training steps)
SD_BETAS: dict[str, Any] = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

# The alphas_cumprod that zero-terminal-SNR leaves at exactly 0 is replaced by this value wherever a
# finite sigma is needed (sigma_max = 4096). diffusers' sigma-based schedulers use the same number, so
# the VE samplers start from the same point as theirs.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24
# AUTOMATIC1111's "Zero Terminal SNR" noise schedule option sets the rescaled alphas_cumprod's last value to this
# (modules/sd_models.py, rescale_zero_terminal_snr_abar; ComfyUI's ModelSamplingDiscrete zsnr uses it too):
# sigma_max = sqrt((1 - a) / a) ~ 4518.8 in float32.
A1111_ZERO_SNR_ALPHA_CUMPROD = 4.8973451890853435e-08


# ---------------------------------------------------------------------------------------------------
# Training schedule: betas, alphas_cumprod
# ---------------------------------------------------------------------------------------------------


def make_betas(
    kind: str,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> Tensor:
    """Beta schedule of the forward process: linear (Ho 2020), scaled_linear (LDM / Stable Diffusion),
    squaredcos_cap_v2 (Nichol & Dhariwal 2021, "Improved DDPM", eq. 17 with betas capped at 0.999)."""
    if num_train_timesteps < 1:
        raise UsageError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    n = num_train_timesteps
    if kind == "linear":
        # float32 linspace, as the reference checkpoints were trained with it.
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    if kind == "scaled_linear":
        # Linear in sqrt(beta): the schedule Stable Diffusion was trained with.
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float32) ** 2
    if kind == "squaredcos_cap_v2":
        # alpha_bar(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; beta_i = 1 - abar(i+1)/abar(i).
        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)]
        return torch.tensor(betas, dtype=torch.float32)
    raise UsageError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")


def alphas_cumprod_from_betas(betas: Tensor) -> Tensor:
    """``a_t = prod_{s<=t} (1 - beta_s)`` (Ho 2020, eq. 4)."""
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(alphas_cumprod) so the last timestep has SNR exactly 0 and the first keeps its
    value (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Algorithm 1)."""
    sqrt_ab = alphas_cumprod_from_betas(betas).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def a1111_zero_terminal_snr(schedule: NoiseSchedule) -> NoiseSchedule:
    """``schedule`` under AUTOMATIC1111's "Zero Terminal SNR" noise schedule option (its ``sd_noise_schedule``):
    the same shift and scale of ``sqrt(alphas_cumprod)`` as Lin et al.'s Algorithm 1, done on the model's float32
    ``alphas_cumprod`` (not on the betas), whose last value is then set to :data:`A1111_ZERO_SNR_ALPHA_CUMPROD`
    rather than 0, so that every sampler (its DDIM and PLMS too) sees a finite sigma_max of about 4518.8. A
    schedule that is zero-terminal-SNR already keeps its values, bar that last one."""
    root = schedule.alphas_cumprod.to(torch.float32).sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * (first / (first - last))
    ac = root**2
    ac[-1] = A1111_ZERO_SNR_ALPHA_CUMPROD
    betas = 1.0 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return NoiseSchedule(
        betas=betas,
        alphas_cumprod=ac,
        sigmas=sigmas_from_alphas_cumprod(ac),
        num_train_timesteps=schedule.num_train_timesteps,
        beta_schedule=schedule.beta_schedule,
        rescale_betas_zero_snr=True,
    )


def sigmas_from_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """VE noise level of each training timestep: ``sigma = sqrt((1 - a) / a)`` (Karras 2022, table 1)."""
    return ((1.0 - alphas_cumprod) / alphas_cumprod) ** 0.5


# ---------------------------------------------------------------------------------------------------
# NoiseSchedule: the frozen training schedule and the timestep <-> sigma maps
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """The discrete forward process a model was trained with (what a diffusers scheduler config describes).

    ``alphas_cumprod`` is exact (it reaches 0 under zero-terminal-SNR, as training needs); ``sigmas`` is
    finite everywhere because the terminal 0 is replaced by ``ZERO_SNR_ALPHA_CUMPROD`` for the VE view.
    """

    betas: Tensor  # (T,) float32
    alphas_cumprod: Tensor  # (T,) float32
    sigmas: Tensor  # (T,) float32, increasing with t
    num_train_timesteps: int
    beta_schedule: str = "scaled_linear"
    rescale_betas_zero_snr: bool = False

    @classmethod
    def from_betas(
        cls, betas: Tensor, *, beta_schedule: str = "custom", rescale_betas_zero_snr: bool = False
    ) -> NoiseSchedule:
        betas = betas.to(torch.float32)
        if rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        ac = alphas_cumprod_from_betas(betas)
        ac_for_sigmas = ac.clone()
        if rescale_betas_zero_snr:
            ac_for_sigmas[-1] = ZERO_SNR_ALPHA_CUMPROD
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            sigmas=sigmas_from_alphas_cumprod(ac_for_sigmas),
            num_train_timesteps=int(betas.shape[0]),
            beta_schedule=beta_schedule,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    @classmethod
    def from_config(cls, **config: Any) -> NoiseSchedule:
        """Build from diffusers scheduler-config keys (``num_train_timesteps``, ``beta_start``, ``beta_end``,
        ``beta_schedule``, ``trained_betas``, ``rescale_betas_zero_snr``); other keys are ignored here."""
        check_config("scheduler", config)  # num_train_timesteps=1e8 would allocate GBs of tables
        trained = config.get("trained_betas")
        zero_snr = bool(config.get("rescale_betas_zero_snr", False))
        if trained is not None:
            return cls.from_betas(
                torch.as_tensor(trained, dtype=torch.float32),
                beta_schedule="trained_betas",
                rescale_betas_zero_snr=zero_snr,
            )
        kind = config.get("beta_schedule", "linear")
        betas = make_betas(
            kind,
            int(config.get("num_train_timesteps", 1000)),
            float(config.get("beta_start", 1e-4)),
            float(config.get("beta_end", 0.02)),
        )
        return cls.from_betas(betas, beta_schedule=kind, rescale_betas_zero_snr=zero_snr)

    @property
    def log_sigmas(self) -> Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: Tensor | float) -> Tensor:
        """Fractional timestep whose sigma is ``sigma``, interpolating linearly in log-sigma between the two
        neighbouring training timesteps (k-diffusion's DiscreteSchedule; diffusers' ``_sigma_to_t``)."""
        return sigma_to_t(sigma, self.log_sigmas)

    def t_to_sigma(self, t: Tensor | float) -> Tensor:
        """Sigma at a (possibly fractional) timestep, interpolating linearly in log-sigma."""
        return t_to_sigma(t, self.log_sigmas)


def sigma_to_t(sigma: Tensor | float, log_sigmas: Tensor) -> Tensor:
    """Inverse of the discrete sigma table, piecewise linear in log-sigma, clamped to [0, T-1]."""
    sigma = torch.as_tensor(sigma, dtype=log_sigmas.dtype)
    log_sigma = sigma.clamp(min=1e-10).log()
    flat = log_sigma.reshape(-1)
    dists = flat[None, :] - log_sigmas[:, None]  # (T, N)
    # Last table index whose log-sigma is <= the query; kept one below the end so high_idx exists.
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - flat) / (low - high)).clamp(0, 1)
    t = (1 - w) * low_idx + w * high_idx
    return t.reshape(log_sigma.shape)


def t_to_sigma(t: Tensor | float, log_sigmas: Tensor) -> Tensor:
    """Sigma at fractional timestep ``t``: exp of the linear interpolation of the log-sigma table."""
    t = torch.as_tensor(t, dtype=log_sigmas.dtype).clamp(0, log_sigmas.shape[0] - 1)
    low_idx = t.floor().long()
    high_idx = t.ceil().long()
    w = t - low_idx
    return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[high_idx]).exp()


def percent_to_sigma(log_sigmas: Tensor, percent: float) -> float:
    """ComfyUI's ``percent_to_sigma`` of a discrete (1000-step) schedule: percent 0 is above every sigma
    (999999999.9), percent 1 is 0.0, otherwise the sigma at timestep ``(1 - percent) * 999``, linear in
    log-sigma between the two neighbouring training timesteps (float32, as ComfyUI computes it)."""
    if percent <= 0.0:
        return 999999999.9
    if percent >= 1.0:
        return 0.0
    table = log_sigmas.detach().to(torch.float32).cpu()
    t = torch.tensor((1.0 - percent) * 999.0, dtype=torch.float32).clamp(0, table.shape[0] - 1)
    low, high = int(t.floor()), int(t.ceil())
    w = t - t.floor()
    return float(((1 - w) * table[low] + w * table[high]).exp())


# ---------------------------------------------------------------------------------------------------
# Forward process
# ---------------------------------------------------------------------------------------------------


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, ...) broadcastable against ``like``."""
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


def q_sample(x0: Tensor, t: Tensor, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample ``q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I)`` for a (B,) batch of integer timesteps
    (Ho 2020, eq. 4), in the VP scaling the network is trained on."""
    if t.ndim != 1 or t.shape[0] != x0.shape[0]:
        raise UsageError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device).long()]
    a = _per_row(a, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def config_get(config: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """Read a scheduler-config key, treating a missing config as empty."""
    if not config:
        return default
    value = config.get(key, default)
    return default if value is None else value


# ---------------------------------------------------------------------------------------------------
# Sampling grids: which sigmas a sampler visits, and which timestep the network sees at each
# ---------------------------------------------------------------------------------------------------
#
# The `normal` schedule is "the model's own timestep spacing", and the diffusers schedulers do not agree
# on what that means, so each sampler names one of these rules (the facts below were read off diffusers
# 0.42; the code is ours):
#   "discrete"  DDPM / DDIM / PNDM: integer timesteps, linspace rounded, sigma looked up exactly.
#   "k"         Euler / Heun / LMS / KDPM2 / DPM-Solver-SDE: float timesteps (linspace not rounded),
#               sigma by *linear* interpolation in sigma; Karras/exponential end points are those of
#               that interpolated grid, not of the training schedule.
#   "multistep" DPM-Solver++ / UniPC: N+1 points of which the last is dropped (so DPM++ leading gives
#               901, 811, ..., 91 for 10 steps: docs/CONTRACTS.md, Test oracles), integer timesteps;
#               Karras/exponential span the whole training range and the network gets a rounded (Karras)
#               or truncated (exponential) timestep.
#   "lcm"       LCM: a grid of `original_inference_steps` (50) skipped timesteps (Luo et al. 2023).

SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")
SCHEDULES: tuple[str, ...] = (
    "normal",
    "karras",
    "exponential",
    "sgm_uniform",
    "simple",
    "ddim_uniform",
    "beta",
    "kl_optimal",
    "align_your_steps",
    "align_your_steps_sdxl",
    "uniform",
    "polyexponential",
    "linear_quadratic",
)
# The schedules that are a list of sigmas read off the training table (ComfyUI's / A1111's schedulers), not a
# diffusers timestep spacing: the network gets each sigma's fractional timestep (k-diffusion's sigma_to_t).
SIGMA_TABLE_SCHEDULES: tuple[str, ...] = SCHEDULES[4:]
SPACING_RULES: tuple[str, ...] = ("discrete", "k", "multistep", "lcm")


@dataclass(frozen=True, eq=False)
class SamplingGrid:
    """What a sampler walks: ``sigmas`` (N+1, last is where it ends), the timestep the network sees at
    each of ``sigmas[:-1]``, and, for DDIM/PNDM only, ``targets``: the sigma each step lands on when it
    is not the next grid point (diffusers steps those from t to t - T // N whatever the next t is)."""

    sigmas: Tensor  # (N+1,) float32, decreasing
    timesteps: Tensor  # (N,) float32
    targets: Tensor | None = None  # (N,) float32 or None (= sigmas[1:])

    @property
    def steps(self) -> int:
        return int(self.timesteps.shape[0])


def spaced_timesteps(
    spacing: str, steps: int, num_train_timesteps: int, steps_offset: int = 0, *, rule: str = "discrete"
) -> Tensor:
    """Descending timesteps of the `normal` schedule, float64 (fractional only for rule "k" linspace)."""
    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep_spacing {spacing!r}; valid: {', '.join(SPACINGS)}")
    T, n = num_train_timesteps, steps
    # The multistep solvers space N+1 points and drop the final one (t = 0) for leading / linspace.
    m = n + 1 if rule == "multistep" else n
    if spacing == "linspace":
        ts = torch.linspace(0, T - 1, m, dtype=torch.float64)
        if rule == "k":
            ts = ts.to(torch.float32).to(torch.float64)  # float32 linspace, not rounded
        else:
            ts = ts.round()
        ts = ts.flip(0)
    elif spacing == "leading":
        ratio = T // m
        ts = (torch.arange(m, dtype=torch.float64) * ratio).flip(0) + steps_offset
    else:  # trailing: always n points from T downwards
        ts = (torch.arange(T, 0, -T / n, dtype=torch.float64)).round() - 1
    if rule == "multistep" and spacing != "trailing":
        ts = ts[:-1]
    return ts


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """np.interp for increasing ``xp`` (float64)."""
    x = x.clamp(xp[0], xp[-1])
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.shape[0] - 1)
    x0, x1 = xp[idx - 1], xp[idx]
    w = (x - x0) / (x1 - x0)
    return fp[idx - 1] + w * (fp[idx] - fp[idx - 1])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """Karras et al. 2022, eq. 5: ``(max^(1/rho) + i/(n-1) (min^(1/rho) - max^(1/rho)))^rho``, float64."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Sigmas evenly spaced in log-sigma (k-diffusion's get_sigmas_exponential), float64."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp()


def sgm_uniform_sigmas(n: int, log_sigmas: Tensor) -> tuple[Tensor, Tensor]:
    """Timesteps evenly spaced from T-1 to 0 (n+1 points, the last dropped) and their sigmas, as the
    Stability "sgm" samplers and ComfyUI's sgm_uniform do; float64 (sigmas, timesteps)."""
    ts = torch.linspace(log_sigmas.shape[0] - 1, 0, n + 1, dtype=torch.float64)[:-1]
    return t_to_sigma(ts, log_sigmas.to(torch.float64)), ts


# Align Your Steps (Sabour, Fidler & Kreis 2024): the paper's optimised 10-step noise levels for Stable
# Diffusion 1.5 and SDXL (NVIDIA's how-to page; the numbers ComfyUI's AlignYourStepsScheduler ships).
AYS_NOISE_LEVELS: dict[str, tuple[float, ...]] = {
    "align_your_steps": (
        14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092,
        0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582,
    ),
    "align_your_steps_sdxl": (
        14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
        0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582,
    ),
}  # fmt: skip


def align_your_steps_sigmas(n: int, levels: tuple[float, ...]) -> Tensor:
    """n sigmas (then 0) of an Align Your Steps table: the table's values, linearly interpolated in log-sigma
    over an even grid of n + 1 points (the paper's how-to), of which the last (the table's sigma_min) is
    replaced by 0 (ComfyUI's AlignYourStepsScheduler); float64, n + 1 values."""
    ys = torch.tensor(levels, dtype=torch.float64).log().flip(0)  # increasing
    xs = torch.linspace(0, 1, len(levels), dtype=torch.float64)
    if n + 1 == len(levels):
        out = ys.exp().flip(0)
    else:
        out = _interp(torch.linspace(0, 1, n + 1, dtype=torch.float64), xs, ys).exp().flip(0)
    out[-1] = 0.0
    return out


def simple_sigmas(n: int, train_sigmas: Tensor) -> Tensor:
    """ComfyUI's / A1111's "simple": every (T / n)-th sigma of the training table from the top,
    ``sigmas[T - 1 - int(i T / n)]``; n values."""
    T = train_sigmas.shape[0]
    idx = [T - 1 - int(i * (T / n)) for i in range(n)]
    return train_sigmas[torch.tensor(idx)]


def ddim_uniform_sigmas(n: int, train_sigmas: Tensor) -> Tensor:
    """ComfyUI's ddim_uniform / A1111's "DDIM": the table's sigmas at timesteps 1, 1 + T // n, 1 + 2 T // n,
    ... below T, highest first (the original DDIM's uniform skip)."""
    T = train_sigmas.shape[0]
    idx = list(range(1, T, max(T // n, 1)))
    return train_sigmas[torch.tensor(idx[::-1])]


def _betainc(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta function I_x(a, b) by its continued fraction (modified Lentz), using the
    symmetry I_x(a, b) = 1 - I_{1-x}(b, a) where the fraction converges slowly."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(1.0 - x, b, a)
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return math.exp(log_front) * (f - 1.0) / a


def beta_ppf(q: float, a: float, b: float) -> float:
    """Quantile function of the Beta(a, b) distribution (scipy.stats.beta.ppf), by bisection on
    :func:`_betainc` to full double precision."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _betainc(mid, a, b) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def beta_sigmas(n: int, train_sigmas: Tensor, alpha: float = 0.6, beta: float = 0.6) -> Tensor:
    """ComfyUI's "beta" scheduler (Lee et al. 2024, "Beta Sampling is All You Need"): timesteps at the Beta(alpha,
    beta) quantiles of 1, 1 - 1/n, ..., 1/n scaled to T - 1 and rounded, a repeated timestep dropped (so there
    may be fewer than n), and their table sigmas."""
    T = train_sigmas.shape[0]
    ts: list[int] = []
    for i in range(n):
        t = round(beta_ppf(1.0 - i / n, alpha, beta) * (T - 1))  # round half to even, as numpy.rint
        if not ts or t != ts[-1]:
            ts.append(t)
    return train_sigmas[torch.tensor(ts)]


def kl_optimal_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """ComfyUI's "kl_optimal" (Align Your Steps' appendix; Sabour et al. 2024): even steps in arctan(sigma),
    ``tan((1 - i/(n-1)) atan(sigma_max) + i/(n-1) atan(sigma_min))``; n values (one: sigma_max)."""
    w = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    return (w * math.atan(sigma_min) + (1 - w) * math.atan(sigma_max)).tan()


def uniform_sigmas(n: int, log_sigmas: Tensor) -> Tensor:
    """A1111's "Uniform" (k-diffusion's DiscreteSchedule.get_sigmas): n timesteps evenly from T - 1 down to 0,
    both included, and their sigmas interpolated in log-sigma."""
    ts = torch.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=torch.float64)
    return t_to_sigma(ts, log_sigmas)


def polyexponential_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> Tensor:
    """k-diffusion's get_sigmas_polyexponential (A1111's "Polyexponential", rho 1): log-sigma from max to min
    along ``ramp ** rho``, ramp going 1 -> 0."""
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return (ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp()


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> Tensor:
    """k-diffusion's get_sigmas_vp (ComfyUI's VPScheduler): the continuous VP-SDE's sigmas
    ``sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1)`` at ``n`` times t from 1 down to ``eps_s``, evenly spaced; float64,
    without the last 0."""
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return torch.special.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt()


LAPLACE_EPSILON = 1e-5  # ComfyUI's get_sigmas_laplace keeps the logarithm's argument off 0 with it


def laplace_sigmas(n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5) -> Tensor:
    """ComfyUI's get_sigmas_laplace (Tiankai et al. 2024, the LaplaceScheduler node): at ``n`` points x evenly
    spaced over [0, 1], ``log sigma = mu - beta sign(1/2 - x) log(1 - 2 |1/2 - x| + 1e-5)`` (the Laplace
    distribution's inverse CDF in log sigma), the sigmas clamped to [sigma_min, sigma_max] (torch.clamp: the max wins
    where they cross); float64, n values, no 0 appended (ComfyUI's list ends at its last clamped sigma)."""
    x = torch.linspace(0, 1, n, dtype=torch.float64)
    lam = mu - beta * torch.sign(0.5 - x) * torch.log(1 - 2 * (0.5 - x).abs() + LAPLACE_EPSILON)
    return lam.exp().clamp(min=sigma_min, max=sigma_max)


def linear_quadratic_sigmas(n: int, sigma_max: float, threshold_noise: float = 0.025) -> Tensor:
    """ComfyUI's ``linear_quadratic`` (Mochi's schedule): a fraction of sigma_max that falls linearly by
    ``threshold_noise`` over the first n // 2 steps, then along a quadratic that reaches 0 at step n with a
    continuous slope; n values, sigma_max first (one step: sigma_max alone)."""
    if n == 1:
        return torch.tensor([sigma_max], dtype=torch.float64)
    lin = n // 2
    quad = n - lin
    diff = lin - threshold_noise * n
    a = diff / (lin * quad**2)
    b = threshold_noise / lin - 2 * diff / quad**2
    c = a * lin**2
    done = [i * threshold_noise / lin for i in range(lin)] + [a * i**2 + b * i + c for i in range(lin, n)]
    return torch.tensor([(1.0 - v) * sigma_max for v in done], dtype=torch.float64)


def table_schedule_sigmas(schedule: str, steps: int, train_sigmas: Tensor, log_sigmas: Tensor) -> Tensor:
    """The sigmas (without the final 0) of one of :data:`SIGMA_TABLE_SCHEDULES` for ``steps`` steps on the
    training table ``train_sigmas`` (float64, increasing); sigma_min/max are the table's ends."""
    lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
    if schedule == "simple":
        return simple_sigmas(steps, train_sigmas)
    if schedule == "ddim_uniform":
        return ddim_uniform_sigmas(steps, train_sigmas)
    if schedule == "beta":
        return beta_sigmas(steps, train_sigmas)
    if schedule == "kl_optimal":
        return kl_optimal_sigmas(steps, lo, hi)
    if schedule in AYS_NOISE_LEVELS:
        return align_your_steps_sigmas(steps, AYS_NOISE_LEVELS[schedule])[:-1]
    if schedule == "uniform":
        return uniform_sigmas(steps, log_sigmas)
    if schedule == "polyexponential":
        return polyexponential_sigmas(steps, lo, hi)
    if schedule == "linear_quadratic":
        return linear_quadratic_sigmas(steps, hi)
    raise UsageError(f"unknown sigma-table schedule {schedule!r}; valid: {', '.join(SIGMA_TABLE_SCHEDULES)}")


def sampling_grid(
    schedule: str,
    steps: int,
    noise_schedule: NoiseSchedule,
    *,
    rule: str,
    config: Mapping[str, Any] | None = None,
    round_karras_timesteps: bool = False,
    strength: float = 1.0,
    comfy: bool = False,
) -> SamplingGrid:
    """The sigmas (ending at 0, or at sigma_min where DDIM/PNDM's ``set_alpha_to_one`` is false) and
    model timesteps for ``steps`` steps of ``schedule`` under a diffusers spacing ``rule`` and the
    scheduler ``config`` keys ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``,
    ``original_inference_steps``. ``strength`` only matters for LCM, whose grid depends on it.

    ``comfy``: "karras" and "exponential" are ComfyUI's lists under every rule (its ``calculate_sigmas``:
    k-diffusion's get_sigmas_karras / get_sigmas_exponential between the training table's ends, the model's
    sigma_min and sigma_max), not the Euler family's diffusers grids (between the ends of the spaced timesteps,
    starting lower on a "leading" config); the network's timesteps follow the rule as ever (fractional for the
    Euler family, rounded where ``round_karras_timesteps``: ComfyUI's own nearest-timestep rounding)."""
    if schedule not in SCHEDULES:
        raise unknown_name("schedule", schedule, SCHEDULES, hint="`sdengine list schedules` lists all")
    if rule not in SPACING_RULES:
        raise UsageError(f"unknown spacing rule {rule!r}; valid: {', '.join(SPACING_RULES)}")
    T = noise_schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise UsageError(f"steps must be between 1 and {T} (the training timesteps), got {steps}")
    spacing = config_get(config, "timestep_spacing", "leading" if rule in ("discrete", "lcm") else "linspace")
    offset = int(config_get(config, "steps_offset", 0))
    train_sigmas = noise_schedule.sigmas.to(torch.float64)  # from float32, as diffusers
    # log taken in float32 like diffusers (np.log of a float32 array); it decides where a truncated
    # timestep falls (998.99998 -> 998).
    log_sigmas = noise_schedule.sigmas.log().to(torch.float64)
    grid_t = torch.arange(T, dtype=torch.float64)
    final = torch.zeros(1, dtype=torch.float64)
    targets = None

    if schedule == "sgm_uniform":
        sig, ts = sgm_uniform_sigmas(steps, log_sigmas)
    elif schedule in SIGMA_TABLE_SCHEDULES:
        sig = table_schedule_sigmas(schedule, steps, train_sigmas, log_sigmas)
        ts = sigma_to_t(sig, log_sigmas)
    elif rule == "lcm":
        if schedule != "normal":
            raise UsageError(f"the lcm grid has no {schedule!r} form")
        original = int(config_get(config, "original_inference_steps", 50))
        k = T // original
        origin = torch.arange(1, int(original * strength) + 1, dtype=torch.float64) * k - 1
        if steps > origin.shape[0]:
            raise UsageError(f"lcm can run at most {origin.shape[0]} steps here, got {steps}")
        idx = torch.linspace(0, origin.shape[0], steps + 1, dtype=torch.float64)[:-1].floor().long()
        ts = origin.flip(0)[idx]
        sig = train_sigmas[ts.long()]
    elif schedule == "normal":
        ts = spaced_timesteps(spacing, steps, T, offset, rule=rule)
        if ts.min() < 0 or ts.max() > T - 1:
            raise UsageError(f"timestep_spacing {spacing!r} with steps_offset {offset} leaves 0..{T - 1}")
        sig = _interp(ts, grid_t, train_sigmas)
        if rule == "discrete":
            # DDIM / PNDM land on t - T // N, and the last step on alphas_cumprod = 1 (sigma 0) or, when
            # set_alpha_to_one is false (SD 1.x configs), on alphas_cumprod[0].
            prev = ts - T // steps
            alpha_one = bool(config_get(config, "set_alpha_to_one", True))
            last = 0.0 if alpha_one else float(train_sigmas[0])
            tgt = torch.where(prev >= 0, train_sigmas[prev.clamp(min=0).long()], torch.full_like(prev, last))
            final = tgt[-1:].clone()
            targets = tgt
    else:
        if rule in ("k",) and not comfy:
            # diffusers' Euler-family: the end points of the spaced grid, not of the training schedule (ComfyUI's
            # lists span the training schedule under every sampler).
            base = _interp(spaced_timesteps(spacing, steps, T, offset, rule=rule), grid_t, train_sigmas)
            lo, hi = float(base[-1]), float(base[0])
        else:
            lo, hi = float(train_sigmas[0]), float(train_sigmas[-1])
        if schedule == "karras":
            sig = karras_sigmas(steps, lo, hi)
        else:
            sig = exponential_sigmas(steps, lo, hi)
        ts = sigma_to_t(sig, log_sigmas)
        if rule == "multistep":
            # DPM-Solver/UniPC hand the network an int64 timestep: rounded for Karras, truncated otherwise.
            ts = ts.round() if (schedule == "karras" and round_karras_timesteps) else ts.floor()
        elif schedule == "karras" and round_karras_timesteps:
            ts = ts.round()
    sigmas = torch.cat([sig, final]).to(torch.float32)
    if targets is not None:
        targets = targets.to(torch.float32)
        if torch.equal(targets, sigmas[1:]):
            targets = None
    return SamplingGrid(sigmas=sigmas, timesteps=ts.to(torch.float32), targets=targets)


# How img2img's strength counts the steps it runs: "diffusers" (the default) or "a1111" (AUTOMATIC1111's
# ``setup_img2img_steps`` and its two sampler families); see :func:`img2img_start` and :func:`hires_steps`.
# "a1111_fix_steps" is A1111's with its img2img_fix_steps option on ("With img2img, do exactly the amount of steps
# the slider specifies"): img2img counts its steps as the hires second pass does (:func:`img2img_steps`).
STRENGTH_RULES = ("diffusers", "a1111", "a1111_fix_steps")
A1111_STRENGTH_RULES = ("a1111", "a1111_fix_steps")

# A1111 caps the strength below 1 (``min(denoising_strength, 0.999)``) where it counts the steps.
_A1111_STRENGTH_CAP = 0.999

# The samplers A1111 runs in its "timestep" family (modules/sd_samplers_timesteps.py: DDIM, PLMS, UniPC), which
# count img2img steps differently from its k-diffusion samplers (every other one).
A1111_TIMESTEP_SAMPLERS = ("ddim", "plms", "unipc")


# The samplers whose grid A1111 makes its own way (``CompVisSampler.get_timesteps``): :func:`a1111_timestep_grid`.
A1111_GRID_SAMPLERS = ("ddim", "plms")


def a1111_timestep_grid(steps: int, noise_schedule: NoiseSchedule) -> SamplingGrid:
    """A1111's DDIM / PLMS grid (modules/sd_samplers_timesteps.py): the timesteps ``range(0, T, T // steps) + 1``
    (clipped to T - 1), walked from the highest down to the lowest, which is where sampling ends (t = 1, not 0):
    ``len(timesteps) - 1`` model calls, 19 for 20 steps. The network sees each integer timestep."""
    T = noise_schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise UsageError(f"steps must be between 1 and {T} (the training timesteps), got {steps}")
    ts = (torch.arange(0, T, T // steps, dtype=torch.int64) + 1).clamp(0, T - 1).flip(0)
    if ts.shape[0] < 2:
        raise UsageError(f"A1111's DDIM/PLMS grid of {steps} step makes no model call: use 2 steps or more")
    sigmas = noise_schedule.sigmas.to(torch.float64)[ts].to(torch.float32)
    return SamplingGrid(sigmas=sigmas, timesteps=ts[:-1].to(torch.float32))


def a1111_timestep_start(grid_steps: int, run: int) -> tuple[int, int]:
    """(first step, grid index the init is noised to) of an A1111 DDIM / PLMS img2img on
    :func:`a1111_timestep_grid` of ``grid_steps`` steps, ``run`` being its ``t_enc`` (what :func:`img2img_start`
    runs on a plain grid): A1111 noises the init to ``timesteps[t_enc]`` and steps from ``timesteps[t_enc - 1]``
    down, ``t_enc - 1`` calls. Under 2 (no call in A1111) one call runs, from the noise level itself."""
    if run >= 2:
        first = min(grid_steps + 1 - run, grid_steps - 1)
        return first, first - 1
    return grid_steps - 1, grid_steps - 1


def _check_rule(rule: str) -> None:
    if rule not in STRENGTH_RULES:
        raise UsageError(f"unknown strength rule {rule!r}; use one of: {', '.join(STRENGTH_RULES)}")


def img2img_start(steps: int, strength: float, rule: str = "diffusers", sampler: str | None = None) -> int:
    """Index of the first step img2img runs on the ``steps``-step schedule, by ``rule``:

    * "diffusers": ``t_start = steps - min(int(steps * strength), steps)``, so that exactly ``int(steps *
      strength)`` steps run (SDEdit, Meng et al. 2022); strength in (0, 1] (it may run no step: the start is
      then ``steps``);
    * "a1111": AUTOMATIC1111's ``t_enc = int(min(strength, 0.999) * steps)``; strength in [0, 1]. Its
      k-diffusion samplers run ``t_enc + 1`` steps from index ``steps - t_enc - 1`` (``sigmas[steps - t_enc -
      1:]``), so at least one, even at strength 0. Its timestep samplers (``sampler`` one of
      :data:`A1111_TIMESTEP_SAMPLERS`: DDIM, PLMS, UniPC) step from ``timesteps[t_enc - 1]`` down (ascending
      ``timesteps[:t_enc]``), the last ``t_enc`` steps of the schedule: index ``steps - t_enc``, and at least
      the last step (A1111 returns the barely noised init at strength 0)."""
    _check_rule(rule)
    if rule in A1111_STRENGTH_RULES:
        if not 0.0 <= strength <= 1.0:
            raise UsageError(f"strength must be in [0, 1], got {strength}")
        t_enc = int(min(strength, _A1111_STRENGTH_CAP) * steps)
        if sampler in A1111_TIMESTEP_SAMPLERS:
            return steps - max(t_enc, 1)
        return steps - t_enc - 1
    if not 0.0 < strength <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}")
    return max(steps - min(int(steps * strength), steps), 0)


def hires_steps(steps: int, strength: float, rule: str = "diffusers", sampler: str | None = None) -> tuple[int, int]:
    """(schedule steps, index of the first step run) of the hires fix's second pass of ``steps`` steps
    (``hr_second_pass_steps``, or the first pass's steps when that is 0), by ``rule``:

    * "diffusers": an img2img of ``steps`` steps at ``strength`` (:func:`img2img_start`);
    * "a1111": AUTOMATIC1111's second pass (its sampler is given the steps, ``setup_img2img_steps``' fixed-steps
      branch): a schedule of ``int(steps / min(strength, 0.999))`` steps with ``t_enc = steps - 1``, of which
      its k-diffusion samplers run the last ``steps``, its timestep samplers (``sampler`` in
      :data:`A1111_TIMESTEP_SAMPLERS`) the last ``t_enc`` (at least one)."""
    _check_rule(rule)
    if rule in A1111_STRENGTH_RULES:
        if not 0.0 < strength <= 1.0:
            raise UsageError(f"hires strength must be in (0, 1], got {strength}")
        total = int(steps / min(strength, _A1111_STRENGTH_CAP))
        run = max(steps - 1, 1) if sampler in A1111_TIMESTEP_SAMPLERS else steps
        return total, total - run
    return steps, img2img_start(steps, strength)


def img2img_steps(steps: int, strength: float, rule: str = "diffusers", sampler: str | None = None) -> tuple[int, int]:
    """(schedule steps, index of the first step run) of an img2img of ``steps`` steps at ``strength``: the
    ``steps``-step schedule from :func:`img2img_start`, except under "a1111_fix_steps" (A1111's img2img_fix_steps
    on: ``setup_img2img_steps``' fixed-steps branch, as its hires second pass, :func:`hires_steps`), where the
    schedule has ``int(steps / min(strength, 0.999))`` steps and ``steps`` of them run (its k-diffusion samplers;
    its timestep samplers ``steps - 1``); strength then in (0, 1] (A1111 makes a schedule of 0 steps at 0)."""
    _check_rule(rule)
    if rule == "a1111_fix_steps":
        if not 0.0 < strength <= 1.0:
            raise UsageError(f"strength must be in (0, 1] with img2img_fix_steps, got {strength}")
        return hires_steps(steps, strength, rule, sampler)
    return steps, img2img_start(steps, strength, rule, sampler)
