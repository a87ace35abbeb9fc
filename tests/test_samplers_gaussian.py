"""Samplers without an oracle: Gaussian data has an exact x0-denoiser, so the samples' law is known.

If every pixel of the data is N(mu, s^2), then x = x0 + sigma * eps is N(mu, s^2 + sigma^2) and
E[x0 | x] = mu + s^2 / (s^2 + sigma^2) (x - mu) exactly. A correct sampler driven by that denoiser must
return samples with mean ~mu and std ~s after 50 steps. Stated tolerances, from what can be expected:

* mean: |mean - mu| < 0.03. Starting noise is centred at 0, not mu, which leaves a bias of about
  mu * s / sigma_max = 0.011; the sampling error of the mean over 32768 pixels is 0.003.
* std: |std / s - 1| < 0.035 for the 2nd-order and multistep solvers (observed <= 2.2 %, of which
  ~0.6 % is the start noise's own sample std), < 0.08 for the first-order and ancestral ones (Euler,
  DDIM, Euler a, DDPM, DPM++ SDE): at 50 Karras steps their O(h) error shrinks the std by 3-6.5 %.
* LCM jumps to x0 and re-noises, which needs the consistency function (the ODE end point
  mu + s / sqrt(s^2 + sigma^2) (x - mu)), not the posterior mean: it gets that one.
"""

import pytest
import torch

from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule

MU, STD = 0.3, 0.5
CONFIG = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
}
# (ComfyUI's Heun++ blends its slopes with sigma-proportional weights, mostly the first slope's: about as exact)
FIRST_ORDER = {"euler", "ddim", "euler_a", "ddpm", "dpmpp_sde", "heunpp2", "euler_cfg_pp", "euler_a_cfg_pp"}


def _col(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + STD**2 / (STD**2 + _col(sigma, x) ** 2) * (x - MU)


def gaussian_consistency(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return MU + STD / (STD**2 + _col(sigma, x) ** 2) ** 0.5 * (x - MU)


def _run(sampler, denoiser, schedule="normal"):
    ns = NoiseSchedule.from_config(**CONFIG)
    generators = [torch.Generator().manual_seed(100 + i) for i in range(8)]
    noise = torch.cat([torch.randn((1, 1, 64, 64), generator=g) for g in generators])
    return sampling.sample(
        denoiser,
        noise,
        sampler=sampler,
        steps=50,
        schedule=schedule,
        scheduler_config=CONFIG,
        generators=generators,
        noise_schedule=ns,
    )


@pytest.mark.parametrize("sampler", list(sampling.SAMPLERS))
def test_samples_have_the_data_mean_and_std(sampler):
    schedule = "karras" if "karras" in sampling.SAMPLERS[sampler].schedules else "normal"
    out = _run(sampler, gaussian_consistency if sampler == "lcm" else gaussian_denoiser, schedule)
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() / STD - 1) < (0.08 if sampler in FIRST_ORDER else 0.035)


def test_gaussian_check_can_fail():
    """A denoiser that ignores the data variance (assumes s = 1) is caught by the same tolerances."""
    out = _run("heun", lambda x, s: MU + 1.0 / (1.0 + _col(s, x) ** 2) * (x - MU))
    assert abs(out.std().item() / STD - 1) > 0.035
