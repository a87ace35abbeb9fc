"""Exhaustive parity matrix (slow): every sampler x every schedule diffusers offers for it x every
timestep_spacing (leading with steps_offset 1, trailing, linspace) x epsilon / v_prediction, at 7 and
12 steps (7 makes trailing/linspace land off the t - T//N grid of DDIM/PLMS), plus zero-terminal-SNR
v-prediction for the samplers whose diffusers scheduler supports it. Same harness and tolerance as
test_samplers.py."""

import pytest

from _sampler_parity import SD_CONFIG, TinyNet, ours, start_noise, theirs
from sdengine.diffusion import sampling

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")]

SPACINGS = [("leading", 1), ("trailing", 0), ("linspace", 0)]
CASES = [(n, s) for n, spec in sampling.SAMPLERS.items() for s in spec.parity_schedules]


@pytest.mark.parametrize("steps", [7, 12])
@pytest.mark.parametrize("spacing,offset", SPACINGS)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("sampler,schedule", CASES)
def test_parity_matrix(sampler, schedule, prediction, spacing, offset, steps):
    config = {**SD_CONFIG, "timestep_spacing": spacing, "steps_offset": offset}
    net, noise = TinyNet(), start_noise()
    a = ours(sampler, schedule, steps, config, prediction, net, noise)
    b = theirs(sampler, schedule, steps, config, prediction, net, noise)
    assert (a - b).abs().max().item() < 1e-4


# diffusers' Euler / Euler a / DPM-Solver / UniPC replace alphas_cumprod[-1] = 0 by 2**-24 as we do;
# DDIM/DDPM/LCM keep the exact 0 (sigma = inf), which our VE view cannot represent, so they are left out.
@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_parity_zero_terminal_snr(sampler):
    config = {**SD_CONFIG, "timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": True}
    net, noise = TinyNet(), start_noise()
    a = ours(sampler, "normal", 8, config, "v_prediction", net, noise)
    b = theirs(sampler, "normal", 8, config, "v_prediction", net, noise)
    assert (a - b).abs().max().item() < 1e-4
