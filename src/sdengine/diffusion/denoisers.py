"""What the network predicts, what it is trained against, and how it becomes an x0-denoiser.

A network is trained in the VP scaling (``x_t = sqrt(a) x0 + sqrt(1-a) eps``) to predict one of

* ``epsilon``       the noise ``eps`` (Ho et al. 2020),
* ``v_prediction``  ``v = sqrt(a) eps - sqrt(1-a) x0`` (Salimans & Ho 2022, "Progressive Distillation"),
* ``sample``        ``x0`` itself.

Samplers (``samplers.py``) only ever see a :class:`Denoiser`: ``denoiser(x, sigma, **cond) -> x0`` in the
VE scaling ``x = x0 + sigma * eps`` (Karras et al. 2022, section 2 / table 1). The wrapper applies
``c_in = 1 / sqrt(sigma^2 + 1)`` (which turns VE back into VP), gives the network a timestep, and
turns its output into x0 with ``c_skip`` / ``c_out``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.errors import UsageError

Prediction = Literal["epsilon", "v_prediction", "sample"]
PREDICTIONS: tuple[str, ...] = ("epsilon", "v_prediction", "sample")
TimestepMode = Literal["interpolated", "rounded", "nearest"]
TIMESTEP_MODES: tuple[str, ...] = ("interpolated", "rounded", "nearest")


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise UsageError(f"unknown prediction type {prediction!r}; valid: {', '.join(PREDICTIONS)}")


def _per_row(values: Tensor, like: Tensor) -> Tensor:
    """Broadcast a scalar or (B,) tensor against ``like`` of shape (B, ...)."""
    values = torch.as_tensor(values, device=like.device, dtype=like.dtype)
    if values.ndim == 0:
        return values
    return values.reshape(values.shape[0], *([1] * (like.ndim - 1)))


# ---------------------------------------------------------------------------------------------------
# Training targets and loss
# ---------------------------------------------------------------------------------------------------


def prediction_target(prediction: str, x0: Tensor, noise: Tensor, alphas_cumprod_t: Tensor) -> Tensor:
    """The regression target for ``q_sample(x0, t, noise)``; ``alphas_cumprod_t`` is scalar or (B,)."""
    _check_prediction(prediction)
    if prediction == "epsilon":
        return noise
    if prediction == "sample":
        return x0
    a = _per_row(alphas_cumprod_t, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022, section 4)


def min_snr_weights(alphas_cumprod_t: Tensor, gamma: float, prediction: str = "epsilon") -> Tensor:
    """Per-sample loss weights ``min(SNR, gamma) / SNR`` expressed for the given prediction type
    (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy", eq. 8)."""
    _check_prediction(prediction)
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    clipped = torch.clamp(snr, max=gamma)
    if prediction == "epsilon":
        return clipped / snr  # eps-MSE is SNR-weighted x0-MSE, so divide SNR out
    if prediction == "v_prediction":
        return clipped / (snr + 1)  # v-MSE is (SNR + 1)-weighted x0-MSE
    return clipped


def diffusion_loss(
    model_output: Tensor,
    target: Tensor,
    *,
    alphas_cumprod_t: Tensor | None = None,
    prediction: str = "epsilon",
    min_snr_gamma: float | None = None,
) -> Tensor:
    """Mean squared error (Ho 2020, eq. 14 "L_simple"), optionally min-SNR-gamma weighted per sample."""
    _check_prediction(prediction)
    if min_snr_gamma is None:
        return F.mse_loss(model_output.float(), target.float())
    if alphas_cumprod_t is None:
        raise UsageError("min_snr_gamma needs alphas_cumprod_t (the (B,) alphas_cumprod of each sample)")
    per_sample = F.mse_loss(model_output.float(), target.float(), reduction="none")
    per_sample = per_sample.mean(dim=tuple(range(1, per_sample.ndim)))
    w = min_snr_weights(alphas_cumprod_t.to(per_sample), float(min_snr_gamma), prediction)
    return (per_sample * w).mean()


# ---------------------------------------------------------------------------------------------------
# Denoiser: network -> x0 in the VE view
# ---------------------------------------------------------------------------------------------------


def vp_scalings(sigma: Tensor, prediction: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in)`` with ``x0 = c_skip x + c_out F(c_in x)`` for a VP-trained network
    (Karras 2022, table 1, "VP" column, with the v-parameterisation of Salimans & Ho 2022)."""
    _check_prediction(prediction)
    c_in = 1 / (sigma**2 + 1) ** 0.5
    if prediction == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


class Denoiser:
    """``denoiser(x, sigma, **cond) -> x0`` for ``x = x0 + sigma * eps``; wraps ``model(x_vp, t, **cond)``.

    Timesteps given to the model: by default ``schedule.sigma_to_t(sigma)`` (fractional, log-sigma
    interpolation), as diffusers' Euler/Heun/LMS/KDPM2 schedulers do; ``timestep_mode="rounded"`` rounds
    to an integer as DPM-Solver/UniPC do for Karras-type sigmas. :meth:`with_timesteps` pins the exact
    timestep a diffusers scheduler would pass for given sigmas (its integer grid), so no interpolation
    round trip changes the time embedding.

    ``timestep_mode="nearest"`` is ComfyUI's rule (its ``ModelSamplingDiscrete.timestep``, which every ComfyUI
    sampler goes through, for epsilon and v-prediction models alike): the training timestep whose log-sigma is
    nearest, ``argmin |log sigma - log_sigmas|`` in float32 (the lower one on a tie), for every sigma a sampler
    calls the model at, on the grid or between its points. The timestep follows from sigma alone there, so
    :meth:`with_timesteps` pins nothing in this mode.
    """

    def __init__(
        self,
        model: Callable[..., Tensor],
        schedule: NoiseSchedule,
        prediction: str = "epsilon",
        *,
        timestep_mode: TimestepMode = "interpolated",
    ) -> None:
        _check_prediction(prediction)
        if timestep_mode not in TIMESTEP_MODES:
            raise UsageError(f"unknown timestep_mode {timestep_mode!r}; valid: {', '.join(TIMESTEP_MODES)}")
        self.model = model
        self.schedule = schedule
        self.prediction = prediction
        self.timestep_mode = timestep_mode
        self._table_sigmas: Tensor | None = None
        self._table_timesteps: Tensor | None = None
        # the denoiser samplers use at off-grid sigmas (midpoints): never pinned
        self.off_grid: Denoiser = self
        self._cache: dict[float, float] = {}  # pinned sigma -> timestep
        self._log_sigmas: list[float] | None = None

    @property
    def takes_row_kinds(self) -> bool:
        """Whether the model wants CFG's ``row_kinds`` tags (cond/uncond per row) among its keywords."""
        return bool(getattr(self.model, "takes_row_kinds", False))

    @property
    def takes_step(self) -> bool:
        """Whether the model wants the sampler's ``step`` (see samplers.SamplerStep) among its keywords."""
        return bool(getattr(self.model, "takes_step", False))

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> Denoiser:
        """A copy that gives the model ``timesteps[i]`` whenever it is called at ``sigmas[i]``."""
        if sigmas.shape != timesteps.shape:
            raise UsageError("sigmas and timesteps must have the same shape")
        if self.timestep_mode == "nearest":
            return self  # ComfyUI's rule: the timestep follows from sigma alone, whatever grid it belongs to
        other = Denoiser(self.model, self.schedule, self.prediction, timestep_mode=self.timestep_mode)
        other._table_sigmas = sigmas.detach().to(torch.float32).cpu()
        other._table_timesteps = timesteps.detach().to(torch.float32).cpu()
        other.off_grid = self.off_grid
        other._cache = {float(a): float(b) for a, b in zip(other._table_sigmas, other._table_timesteps, strict=True)}
        return other

    def _scalar_timestep(self, sigma: float) -> float:
        """Timestep for one sigma value: the pinned table first (exact float32 keys), else the same
        log-sigma interpolation as :meth:`timestep`, done on Python floats with a bisection."""
        t = self._cache.get(sigma)
        if t is None and self.timestep_mode == "nearest":
            t = float(self._nearest(torch.tensor([sigma], dtype=torch.float32))[0])
            self._cache[sigma] = t  # nothing is pinned in this mode: the cache only remembers
        if t is None:
            if self._log_sigmas is None:
                self._log_sigmas = self.schedule.log_sigmas.tolist()
            ls = self._log_sigmas
            log_sigma = math.log(max(sigma, 1e-10))
            low = min(max(bisect.bisect_right(ls, log_sigma) - 1, 0), len(ls) - 2)
            w = min(max((ls[low] - log_sigma) / (ls[low] - ls[low + 1]), 0.0), 1.0)
            t = (1 - w) * low + w * (low + 1)
            if self.timestep_mode == "rounded":
                t = float(round(t))
        return t

    def _nearest(self, sigma: Tensor) -> Tensor:
        """ComfyUI's timestep of float32 CPU ``sigma`` (any shape): the table index of the nearest log-sigma."""
        log_sigmas = self.schedule.log_sigmas.to(torch.float32)
        dists = (sigma.reshape(1, -1).log() - log_sigmas[:, None]).abs()
        return dists.argmin(dim=0).to(torch.float32).reshape(sigma.shape)

    def timestep(self, sigma: Tensor) -> Tensor:
        """Training-timestep units for ``sigma`` (any shape), float32 on sigma's device."""
        s = sigma.detach().to(torch.float32).cpu()
        if self.timestep_mode == "nearest":
            return self._nearest(s).to(sigma.device)
        t = self.schedule.sigma_to_t(s)
        if self.timestep_mode == "rounded":
            t = t.round()
        if self._table_sigmas is not None and self._table_timesteps is not None:
            # Exact (relative 1e-6) table hits take the pinned timestep; anything else interpolates.
            close = (s.reshape(-1, 1) - self._table_sigmas[None]).abs() <= 1e-6 * self._table_sigmas.abs()[None].clamp(
                min=1e-12
            )
            hit = close.any(dim=1)
            if hit.any():
                idx = close.float().argmax(dim=1)
                flat = t.reshape(-1).clone()
                flat[hit] = self._table_timesteps[idx[hit]]
                t = flat.reshape(s.shape)
        return t.to(sigma.device)

    def __call__(self, x: Tensor, sigma: Tensor | float, **cond: Any) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        flat = sigma.reshape(-1)
        first = float(flat[0])
        if flat.shape[0] == 1 or bool((flat == first).all()):
            # One noise level for the whole batch (every sampler step): scalar coefficients, cached t.
            t = torch.full((x.shape[0],), self._scalar_timestep(first), device=x.device)
            c = (first**2 + 1) ** 0.5
            out = self.model(x * (1 / c), t, **cond).to(x.dtype)
            if self.prediction == "epsilon":
                return torch.add(x, out, alpha=-first)
            if self.prediction == "v_prediction":
                return torch.add(x * (1 / c**2), out, alpha=-first / c)
            return out
        sigma = sigma.to(x.device)
        if sigma.ndim == 0:
            sigma = sigma.expand(x.shape[0])
        c_skip, c_out, c_in = (_per_row(c, x) for c in vp_scalings(sigma, self.prediction))
        out = self.model(x * c_in, self.timestep(sigma), **cond)
        return c_skip * x + c_out * out.to(x.dtype)
