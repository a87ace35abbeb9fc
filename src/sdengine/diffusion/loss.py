"""The diffusion training loss that every trainer uses (pixel DDPM, LoRA, ControlNet, the emoji model).

One training step, after Ho et al. 2020 (algorithm 1): draw a timestep t ~ U{0..T-1} and noise eps per
example, form x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, and regress the network's output on the target
of its prediction type (eps; v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0, Salimans & Ho 2022; or x0 itself),
by mean squared error, optionally weighted per example by min-SNR-gamma (Hang et al. 2023).

Condition dropout (Ho & Salimans 2022): a fraction ``cond_dropout`` of the examples get the "no condition"
input (the null class, the empty prompt's states), so the same network also learns the unconditional model
that classifier-free guidance needs. Every trainer calls it ``cond_dropout``.

All randomness comes from the generator passed in (the training loop's per-step generator), so a resumed
run draws exactly what an uninterrupted one does. The draws are separate methods because each trainer has
its own, fixed, draw order (changing it would change every trained model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError
from .denoisers import PREDICTIONS, diffusion_loss, prediction_target
from .schedules import q_sample

TIMESTEP_SAMPLINGS = ("uniform", "cubic")


@dataclass(frozen=True, eq=False)
class DiffusionLoss:
    """Timestep/noise draws, the noised input, the target by prediction type, and the (min-SNR) loss.

    ``alphas_cumprod``: the (T,) training schedule, on the device the training runs on.
    """

    alphas_cumprod: Tensor
    prediction: str = "epsilon"
    min_snr_gamma: float | None = None
    cond_dropout: float = 0.0
    # "uniform" (Ho et al.), or "cubic": t = (1 - u^3) T, which favours the noisy end where the layout of the
    # image is decided (the T2I-Adapter paper's sampling for structure-control training).
    timestep_sampling: str = "uniform"

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise UsageError(f"unknown prediction type {self.prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if self.alphas_cumprod.ndim != 1 or self.alphas_cumprod.numel() < 1:
            raise UsageError(f"alphas_cumprod must be a (T,) tensor, got shape {tuple(self.alphas_cumprod.shape)}")
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise UsageError(f"min_snr_gamma must be > 0 (or None for plain MSE), got {self.min_snr_gamma}")
        check_cond_dropout(self.cond_dropout)
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise UsageError(
                f"unknown timestep sampling {self.timestep_sampling!r}; valid: {', '.join(TIMESTEP_SAMPLINGS)}"
            )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    @property
    def device(self) -> torch.device:
        return self.alphas_cumprod.device

    # ------------------------------------------------------------------------------------------ draws

    def timesteps(self, batch: int, generator: torch.Generator) -> Tensor:
        """(B,) integer timesteps: uniform over the training schedule, or cubic (biased to the noisy end: with
        u uniform in [0, 1), t = floor((1 - u^3) T), so P(t >= T/2) = 0.79)."""
        big_t = self.num_train_timesteps
        if self.timestep_sampling == "cubic":
            u = torch.rand((batch,), generator=generator, device=self.device)
            return ((1.0 - u**3) * big_t).long().clamp_(0, big_t - 1)
        return torch.randint(0, big_t, (batch,), generator=generator, device=self.device)

    def noise(self, like: Tensor, generator: torch.Generator) -> Tensor:
        """Standard normal noise of ``like``'s shape (float32, on the training device)."""
        return torch.randn(like.shape, generator=generator, device=self.device)

    def dropped(self, batch: int, generator: torch.Generator) -> Tensor:
        """(B,) bool: which examples get the "no condition" input. Always draws (B,) uniforms, also when
        ``cond_dropout`` is 0, so that the draw order does not depend on the setting."""
        return torch.rand((batch,), generator=generator, device=self.device) < self.cond_dropout

    def draw(self, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """``(t, noise, x_t)``: timesteps first, then noise (the order of the DDPM, LoRA and emoji trainers)."""
        t = self.timesteps(x0.shape[0], generator)
        noise = self.noise(x0, generator)
        return t, noise, self.noisy(x0, t, noise)

    # ------------------------------------------------------------------------------------ the formula

    def noisy(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return q_sample(x0, t, noise, self.alphas_cumprod)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses on, by prediction type."""
        return prediction_target(self.prediction, x0, noise, self.alphas_cumprod[t])

    def __call__(self, model_output: Tensor, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The scalar loss: MSE against :meth:`target` (in float32), min-SNR-gamma weighted when set."""
        return diffusion_loss(
            model_output.float(),
            self.target(x0, noise, t),
            alphas_cumprod_t=self.alphas_cumprod[t],
            prediction=self.prediction,
            min_snr_gamma=self.min_snr_gamma,
        )

    @staticmethod
    def drop(cond: Tensor, null: Tensor, dropped: Tensor) -> Tensor:
        """``cond`` with the rows where ``dropped`` is set replaced by ``null`` (broadcast to a row)."""
        mask = dropped.reshape(dropped.shape[0], *([1] * (cond.ndim - 1)))
        return torch.where(mask, null, cond)


def check_cond_dropout(p: float) -> float:
    """``p`` if it is a probability, else a one-line UsageError."""
    if not 0.0 <= float(p) <= 1.0:
        raise UsageError(f"cond_dropout must be in [0, 1], got {p}")
    return float(p)


__all__ = ["TIMESTEP_SAMPLINGS", "DiffusionLoss", "check_cond_dropout"]
