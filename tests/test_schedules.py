"""Training schedules against diffusers' DDPMScheduler, and the forward process by sampling."""

import pytest
import torch
from diffusers import DDPMScheduler

from sdengine.diffusion import schedules as S

CONFIGS = [
    ("linear", {}),
    ("scaled_linear", {"beta_start": 0.00085, "beta_end": 0.012}),
    ("squaredcos_cap_v2", {}),
]


@pytest.mark.parametrize("kind,kw", CONFIGS)
@pytest.mark.parametrize("zero_snr", [False, True])
def test_alphas_cumprod_match_diffusers(kind, kw, zero_snr):
    ref = DDPMScheduler(beta_schedule=kind, rescale_betas_zero_snr=zero_snr, **kw)
    ours = S.NoiseSchedule.from_config(**ref.config)
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)


def test_zero_snr_rescale_matches_diffusers_function():
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    betas = S.make_betas("scaled_linear", 1000, 0.00085, 0.012)
    torch.testing.assert_close(S.rescale_zero_terminal_snr(betas), rescale_zero_terminal_snr(betas.clone()))
    ac = S.alphas_cumprod_from_betas(S.rescale_zero_terminal_snr(betas))
    assert ac[-1].item() == pytest.approx(0.0, abs=1e-12)
    # finite sigma_max for the VE view, like diffusers' Euler (alphas_cumprod[-1] = 2**-24)
    sched = S.NoiseSchedule.from_betas(betas, rescale_betas_zero_snr=True)
    assert sched.sigma_max == pytest.approx((1 - 2**-24) ** 0.5 * 2**12, rel=1e-5)


def test_unknown_beta_schedule_is_one_line_error():
    with pytest.raises(ValueError, match="valid: linear, scaled_linear, squaredcos_cap_v2"):
        S.make_betas("cosine")


def test_q_sample_mean_and_variance_per_timestep():
    sched = S.NoiseSchedule.from_config(beta_schedule="linear")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 250, 999])
    x0 = torch.tensor([1.0, -2.0, 0.5]).reshape(3, 1)
    n = 200_000
    noise = torch.randn(3, n, generator=g)
    xt = S.q_sample(x0.expand(3, n), t, noise, sched.alphas_cumprod)
    a = sched.alphas_cumprod[t]
    torch.testing.assert_close(xt.mean(1), a.sqrt() * x0[:, 0], atol=5e-3, rtol=0)
    torch.testing.assert_close(xt.var(1), 1 - a, atol=5e-3, rtol=2e-2)


def test_q_sample_equals_diffusers_add_noise():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        S.q_sample(x0, t, noise, S.NoiseSchedule.from_config(**ref.config).alphas_cumprod),
        ref.add_noise(x0, noise, t),
    )


def test_q_sample_rejects_wrong_t_shape():
    with pytest.raises(ValueError, match="t must have shape"):
        S.q_sample(torch.zeros(2, 1), torch.tensor([1]), torch.zeros(2, 1), torch.ones(10))


def test_sigma_t_round_trip_and_log_interpolation():
    sched = S.NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.tensor([0.0, 0.5, 1.0, 123.25, 998.9, 999.0])
    torch.testing.assert_close(sched.sigma_to_t(sched.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    # halfway in t is the geometric mean in sigma
    mid = sched.t_to_sigma(torch.tensor(10.5))
    torch.testing.assert_close(mid, (sched.sigmas[10] * sched.sigmas[11]).sqrt())
    # out of range clamps to the ends
    assert sched.sigma_to_t(torch.tensor(1e-9)).item() == 0.0
    assert sched.sigma_to_t(torch.tensor(1e9)).item() == 999.0


def test_normal_schedule_follows_each_schedulers_own_spacing_rule():
    """docs/CONTRACTS.md, Test oracles: with leading spacing and steps_offset 1, DPM++ gives 901, 811, ..., 91
    for 10 steps while DDIM and Euler give 901, 801, ..., 1; trailing gives 999 ... 99 for all of them."""
    from sdengine.diffusion.sampling import make_grid

    ns = S.NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sd = {"timestep_spacing": "leading", "steps_offset": 1}
    assert make_grid("dpmpp_2m", 10, ns, "normal", sd).timesteps.tolist() == list(range(901, 90, -90))
    for name in ("ddim", "euler", "plms"):
        assert make_grid(name, 10, ns, "normal", sd).timesteps.tolist() == list(range(901, 0, -100))
    trailing = {"timestep_spacing": "trailing"}
    for name in ("ddim", "euler", "dpmpp_2m", "unipc"):
        assert make_grid(name, 10, ns, "normal", trailing).timesteps.tolist() == list(range(999, 0, -100))
    # karras: the Euler family spans its spaced grid, DPM-Solver the whole training range
    assert make_grid("euler", 10, ns, "karras", sd).sigmas[0] < ns.sigma_max - 1
    assert abs(float(make_grid("dpmpp_2m", 10, ns, "karras", sd).sigmas[0]) - ns.sigma_max) < 1e-4
    with pytest.raises(ValueError, match="unknown timestep_spacing"):
        make_grid("euler", 10, ns, "normal", {"timestep_spacing": "even"})
