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

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "squaredcos_cap_v2")

# The alphas_cumprod that zero-terminal-SNR leaves at exactly 0 is replaced by this value wherever a
# finite sigma is needed (sigma_max = 4096). diffusers' sigma-based schedulers use the same number, so
# the VE samplers start from the same point as theirs.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


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
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
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
    raise ValueError(f"unknown beta schedule {kind!r}; valid: {', '.join(BETA_SCHEDULES)}")


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
        raise ValueError(f"t must have shape ({x0.shape[0]},), got {tuple(t.shape)}")
    a = alphas_cumprod.to(device=x0.device, dtype=x0.dtype)[t.to(x0.device).long()]
    a = _per_row(a, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def config_get(config: Mapping[str, Any] | None, key: str, default: Any) -> Any:
    """Read a scheduler-config key, treating a missing config as empty."""
    if not config:
        return default
    value = config.get(key, default)
    return default if value is None else value
