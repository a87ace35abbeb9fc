"""Rectified-flow sampling (sdengine.diffusion.flow) against diffusers' flow schedulers and exact Gaussian flows.

The "network" is analytic: per channel the data is Gaussian, x0 ~ N(m, c^2), so on ``x_s = (1 - s) x0 + s eps``
the exact posterior mean is ``E[x0 | x_s] = m + (1 - s) c^2 / ((1 - s)^2 c^2 + s^2) (x_s - (1 - s) m)`` and the
network answers ``v = (x_s - E[x0 | x_s]) / s`` at timestep ``t = 1000 s`` (it reads s back from t). For the
diffusers parity tests a small smooth nonlinear term is added, so that the two loops' arithmetic is exercised off
the exact solution too. Stated tolerances:

* grids: sdengine's float32 sigmas and timesteps equal diffusers' ``scheduler.sigmas`` / ``timesteps`` exactly (the
  same float64 arithmetic rounded once) or to 1 float32 ulp where diffusers rounds in another order;
* trajectories: |ours - diffusers| <= 2e-5 on values of order 1 (float32: the two write the same step as
  ``x + (s' - s) v`` and ``lerp(x0, x, s'/s)``; 10-28 steps accumulate a few ulps);
* Gaussian data: the exact flow carries eps to ``m + c eps``; every deterministic sampler allowed on flow models
  lands within 0.06 of that per element after 80 steps and converges; the stochastic ones have mean within 0.04
  and std within 5 % of (m, c) over 4096 samples (see each test).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.flow import (
    FLOW_SAMPLERS,
    FlowDenoiser,
    FlowSchedule,
    dynamic_shift_mu,
    flow_grid,
    flow_img2img_start,
    flow_noise_scaling,
    flux_image_seq_len,
)
from sdengine.diffusion.schedules import NoiseSchedule, beta_ppf
from sdengine.errors import UsageError

M = torch.tensor([0.3, -0.5, 0.1, 0.8])
C = torch.tensor([0.5, 1.2, 0.3, 0.8])


def _ch(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x).reshape(1, -1, *([1] * (x.ndim - 2)))


def _rows(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(x).reshape(-1, *([1] * (x.ndim - 1)))


def gaussian_x0(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m, c = _ch(M, x), _ch(C, x)
    s = _rows(s, x)
    var = (1 - s) ** 2 * c**2 + s**2
    return m + (1 - s) * c**2 / var * (x - (1 - s) * m)


def gaussian_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The exact v of the Gaussian data at timestep t = 1000 s."""
    s = t.to(torch.float32) / 1000
    return (x - gaussian_x0(x, s)) / _rows(s, x)


def toy_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The Gaussian v plus a smooth nonlinear term (a fixed channel mix through tanh, varying with t)."""
    mix = torch.tensor([[0.3, -0.2, 0.1, 0.0], [0.1, 0.2, -0.3, 0.2], [0.0, 0.1, 0.1, -0.2], [-0.2, 0.0, 0.2, 0.1]])
    s = _rows(t.to(torch.float32) / 1000, x)
    return gaussian_net(x, t) + 0.2 * torch.tanh(torch.einsum("oc,bchw->bohw", mix, x)) * torch.cos(3 * s)


def _noise(batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 4, 6, 5, generator=torch.Generator().manual_seed(seed))


def _diffusers_loop(scheduler, x: torch.Tensor, timesteps, net=toy_net) -> torch.Tensor:
    for t in timesteps:
        v = net(x, t.reshape(1).expand(x.shape[0]).to(torch.float32))
        x = scheduler.step(v, t, x).prev_sample
    return x


# ---------------------------------------------------------------------------------------------------
# Grids
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4, 10, 28])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_normal_grid_equals_flow_match_euler(steps: int, shift: float) -> None:
    sch = FlowMatchEulerDiscreteScheduler(shift=shift)
    sch.set_timesteps(steps)
    grid = flow_grid(FlowSchedule(shift=shift), steps)
    assert torch.equal(grid.sigmas, sch.sigmas)
    assert torch.equal(grid.timesteps, sch.timesteps)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 6000])
def test_dynamic_shift_grid_equals_flow_match_euler(seq_len: int) -> None:
    mu = dynamic_shift_mu(seq_len)
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, shift=3.0)
    sch.set_timesteps(12, mu=mu)
    grid = flow_grid(FlowSchedule(mu=mu), 12)
    assert torch.equal(grid.sigmas, sch.sigmas)
    assert torch.equal(grid.timesteps, sch.timesteps)
    # FlowSchedule.from_config reads the same config (and the latent's token count)
    from_cfg = FlowSchedule.from_config(dict(sch.config), image_seq_len=seq_len)
    assert from_cfg.mu == pytest.approx(mu, abs=1e-12)


@pytest.mark.parametrize("steps", [4, 20, 28])
def test_flux_spacing_equals_flux_pipeline_sigmas(steps: int) -> None:
    # FluxPipeline hands the scheduler sigmas=linspace(1, 1/n, n) and mu from the packed latent's token count
    mu = dynamic_shift_mu(flux_image_seq_len(128, 128))
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    grid = flow_grid(FlowSchedule.flux(image_seq_len=flux_image_seq_len(128, 128)), steps)
    torch.testing.assert_close(grid.sigmas, sch.sigmas, rtol=0, atol=1.2e-7)
    torch.testing.assert_close(grid.timesteps, sch.timesteps, rtol=0, atol=1.2e-4)


def test_flux_mu_from_latent_size() -> None:
    # 1024x1024 image: 128x128 latent, 64x64 = 4096 tokens -> max_shift; 512x512: 1024 tokens
    assert dynamic_shift_mu(flux_image_seq_len(128, 128)) == pytest.approx(1.15)
    assert dynamic_shift_mu(flux_image_seq_len(64, 64)) == pytest.approx(0.5 + 0.65 * (1024 - 256) / 3840)
    assert FlowSchedule.flux().mu is None  # schnell: no shift
    assert flow_grid(FlowSchedule.flux(), 4).sigmas.tolist() == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_flux_table_schedules_rederived() -> None:
    """ComfyUI's ModelSamplingFlux: a 10000-entry table e^mu / (e^mu + 1/t - 1), t = k / 10000; its simple
    schedule picks from it, and lands (n dividing 10000) on the Flux pipelines' linspace(1, 1/n, n) grid."""
    mu, T, steps = 1.0, 10_000, 8
    fs = FlowSchedule.flux(mu=mu)
    table = math.exp(mu) / (math.exp(mu) + (1 / (np.arange(1, T + 1) / T) - 1))
    np.testing.assert_allclose(fs.sigmas.numpy(), table, rtol=3e-7)
    simple = [table[-(1 + int(x * (T / steps)))] for x in range(steps)] + [0.0]
    np.testing.assert_allclose(flow_grid(fs, steps, "simple").sigmas.numpy(), simple, rtol=3e-7)
    np.testing.assert_allclose(flow_grid(fs, steps, "simple").sigmas.numpy(), flow_grid(fs, steps).sigmas.numpy(), 3e-7)


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_karras_exponential_grids_equal_flow_match_euler(kind: str) -> None:
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, **{f"use_{kind}_sigmas": True})
    sch.set_timesteps(15)
    grid = flow_grid(FlowSchedule.sd3(), 15, kind)
    assert torch.equal(grid.sigmas, sch.sigmas)
    assert torch.equal(grid.timesteps, sch.timesteps)


def test_shift_terminal_equals_flow_match_euler() -> None:
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0, shift_terminal=0.1)
    sch.set_timesteps(10)
    grid = flow_grid(FlowSchedule.from_config(dict(sch.config)), 10)
    assert torch.equal(grid.sigmas, sch.sigmas)


def _shift64(u: np.ndarray | float, shift: float) -> np.ndarray:
    return shift * np.asarray(u, dtype=np.float64) / (1 + (shift - 1) * np.asarray(u, dtype=np.float64))


@pytest.mark.parametrize("steps", [3, 7, 20])
def test_comfy_table_schedules_rederived(steps: int) -> None:
    """ComfyUI's ModelSamplingDiscreteFlow table shift(k/1000) and its schedulers on it, re-derived in float64."""
    shift, T = 3.0, 1000
    fs = FlowSchedule.sd3(shift)
    table = _shift64(np.arange(1, T + 1) / T, shift)
    np.testing.assert_allclose(fs.sigmas.numpy(), table, rtol=2e-7)
    assert fs.sigma_to_t(0.5).item() == 500.0 and fs.percent_to_sigma(0.25) == pytest.approx(_shift64(0.75, shift))

    simple = [table[-(1 + int(x * (T / steps)))] for x in range(steps)] + [0.0]
    sgm = list(_shift64(np.linspace(T * table[-1], T * table[0], steps + 1)[:-1] / T, shift)) + [0.0]
    normal = list(_shift64(np.linspace(T * table[-1], T * table[0], steps) / T, shift)) + [0.0]
    ts = np.rint([beta_ppf(q, 0.6, 0.6) * (T - 1) for q in 1 - np.linspace(0, 1, steps, endpoint=False)])
    beta = [table[int(t)] for i, t in enumerate(ts) if i == 0 or t != ts[i - 1]] + [0.0]
    rho = 7.0
    ramp = np.linspace(0, 1, steps)
    karras = list((table[-1] ** (1 / rho) + ramp * (table[0] ** (1 / rho) - table[-1] ** (1 / rho))) ** rho) + [0.0]
    for name, want in (("simple", simple), ("sgm_uniform", sgm), ("beta", beta)):
        np.testing.assert_allclose(flow_grid(fs, steps, name).sigmas.numpy(), want, rtol=3e-7, err_msg=name)
    np.testing.assert_allclose(flow_grid(fs, steps, "normal", comfy=True).sigmas.numpy(), normal, rtol=3e-7)
    np.testing.assert_allclose(flow_grid(fs, steps, "karras", comfy=True).sigmas.numpy(), karras, rtol=3e-7)
    assert torch.equal(flow_grid(fs, steps, "simple").timesteps, flow_grid(fs, steps, "simple").sigmas[:-1] * 1000)


# ---------------------------------------------------------------------------------------------------
# Trajectories against diffusers
# ---------------------------------------------------------------------------------------------------

TOL = {"rtol": 0, "atol": 2e-5}


@pytest.mark.parametrize("steps", [1, 10, 28])
def test_euler_txt2img_equals_flow_match_euler(steps: int) -> None:
    noise = _noise()
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(steps)
    want = _diffusers_loop(sch, noise.clone(), sch.timesteps)
    got = sampling.sample(FlowDenoiser(toy_net, FlowSchedule.sd3()), noise, sampler="euler", steps=steps)
    torch.testing.assert_close(got, want, **TOL)


def test_euler_dynamic_shift_equals_flow_match_euler() -> None:
    noise = _noise(seed=1)
    mu = dynamic_shift_mu(flux_image_seq_len(64, 96))
    sch = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    sch.set_timesteps(sigmas=np.linspace(1.0, 1 / 12, 12), mu=mu)
    want = _diffusers_loop(sch, noise.clone(), sch.timesteps)
    fs = FlowSchedule.flux(mu=mu)
    got = sampling.sample(FlowDenoiser(toy_net, fs), noise, sampler="euler", steps=12)
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("strength", [0.3, 0.35, 0.6, 1.0])
def test_euler_img2img_equals_flow_match_euler(strength: float) -> None:
    steps = 10
    noise, init = _noise(seed=2), _noise(seed=3) * 0.5
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(steps)
    # diffusers' SD3 img2img: get_timesteps, set_begin_index, scale_noise at the first timestep
    t_start = int(max(steps - min(steps * strength, steps), 0))
    timesteps = sch.timesteps[t_start:]
    sch.set_begin_index(t_start)
    x = sch.scale_noise(init, timesteps[:1].repeat(init.shape[0]), noise)
    want = _diffusers_loop(sch, x, timesteps)
    assert flow_img2img_start(steps, strength) == t_start
    got = sampling.sample(
        FlowDenoiser(toy_net, FlowSchedule.sd3()),
        noise,
        sampler="euler",
        steps=steps,
        init_latent=init,
        strength=strength,
    )
    torch.testing.assert_close(got, want, **TOL)


def test_img2img_start_is_diffusers_float_rule() -> None:
    assert flow_img2img_start(10, 0.35) == 6  # int(10 - 3.5): four steps run, as diffusers (VP models: three)
    assert flow_img2img_start(28, 0.6) == 11
    assert flow_img2img_start(10, 0.6) == 4
    assert flow_img2img_start(10, 1.0) == 0
    with pytest.raises(UsageError, match=r"strength must be in \(0, 1\]"):
        flow_img2img_start(10, 0.0)
    assert flow_img2img_start(4, 0.01) == 3  # any strength above 0 runs a step
    with pytest.raises(UsageError, match=r"start_step must be in \[0, 4\), got 4"):
        sampling.sample(
            FlowDenoiser(toy_net, FlowSchedule.sd3()),
            _noise(),
            sampler="euler",
            steps=4,
            init_latent=_noise(seed=5),
            start_step=4,
        )


def test_heun_equals_flow_match_heun() -> None:
    noise = _noise(seed=4)
    sch = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    want = _diffusers_loop(sch, noise.clone(), sch.timesteps)
    got = sampling.sample(FlowDenoiser(toy_net, FlowSchedule.sd3()), noise, sampler="heun", steps=8)
    torch.testing.assert_close(got, want, **TOL)


def _dpm_loop(sch, x: torch.Tensor, generators=None) -> torch.Tensor:
    # the network gets 1000 * sigma (diffusers' flow DPM-Solver hands it int64 timesteps; the solver's arithmetic,
    # not that rounding, is what is compared here)
    for i, t in enumerate(sch.timesteps):
        v = toy_net(x, (sch.sigmas[i] * 1000).reshape(1).expand(x.shape[0]))
        x = (sch.step(v, t, x) if generators is None else sch.step(v, t, x, generator=generators)).prev_sample
    return x


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [6, 20])
def test_dpmpp_2m_equals_flow_dpm_solver(shift: float, steps: int) -> None:
    noise = _noise(seed=6)
    sch = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=shift,
        algorithm_type="dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    sch.set_timesteps(steps)
    want = _dpm_loop(sch, noise.clone())
    got = sampling.sample(
        FlowDenoiser(toy_net, FlowSchedule(shift=shift)), noise, sampler="dpmpp_2m", steps=steps, sigmas=sch.sigmas
    )
    torch.testing.assert_close(got, want, **TOL)


@pytest.mark.parametrize("steps", [6, 20])
def test_unipc_equals_flow_unipc(steps: int) -> None:
    noise = _noise(seed=16)
    sch = UniPCMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        final_sigmas_type="zero",
    )
    sch.set_timesteps(steps)
    want = _dpm_loop(sch, noise.clone())
    got = sampling.sample(
        FlowDenoiser(toy_net, FlowSchedule.sd3()), noise, sampler="unipc", steps=steps, sigmas=sch.sigmas
    )
    torch.testing.assert_close(got, want, **TOL)


def test_cfg_over_a_flow_denoiser_equals_diffusers_guided_euler() -> None:
    """Classifier-free guidance (sdengine.diffusion.guidance.CFGDenoiser) over a FlowDenoiser is SD3's guidance
    (``v = v_u + g (v_c - v_u)``, FlowMatchEulerDiscreteScheduler), x0 being affine in v."""
    from sdengine.diffusion.guidance import CFGDenoiser

    def net(x, t, encoder_hidden_states):
        return toy_net(x, t) + 0.3 * encoder_hidden_states.reshape(-1, 1, 1, 1)

    cond, uncond, g, noise = torch.tensor([1.0, -0.5]), torch.tensor([0.0]), 4.5, _noise(seed=17)
    sch = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(8)
    x = noise.clone()
    for t in sch.timesteps:
        tt = t.reshape(1).expand(2)
        v_c, v_u = net(x, tt, cond), net(x, tt, uncond.expand(2))
        x = sch.step(v_u + g * (v_c - v_u), t, x).prev_sample
    guided = CFGDenoiser(FlowDenoiser(net, FlowSchedule.sd3()), g, {"encoder_hidden_states": uncond})
    got = sampling.sample(guided, noise, sampler="euler", steps=8, extra_args={"encoder_hidden_states": cond})
    torch.testing.assert_close(got, x, rtol=0, atol=1e-4)


def test_dpmpp_2m_sde_equals_flow_dpm_solver() -> None:
    noise = _noise(seed=7)
    sch = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        flow_shift=3.0,
        algorithm_type="sde-dpmsolver++",
        solver_order=2,
        final_sigmas_type="zero",
    )
    sch.set_timesteps(10)
    want = _dpm_loop(sch, noise.clone(), [torch.Generator().manual_seed(40 + i) for i in range(2)])
    got = sampling.sample(
        FlowDenoiser(toy_net, FlowSchedule.sd3()),
        noise,
        sampler="dpmpp_2m_sde",
        steps=10,
        sigmas=sch.sigmas,
        generators=[torch.Generator().manual_seed(40 + i) for i in range(2)],
    )
    torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------------
# Euler a on flow models: ComfyUI's sample_euler_ancestral_RF, re-derived
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_a_flow_rule_rederived(eta: float) -> None:
    steps = 6
    noise = _noise(seed=8)
    grid = flow_grid(FlowSchedule.sd3(), steps)
    draws = torch.randn(steps, *noise.shape, generator=torch.Generator().manual_seed(9))
    got = sampling.sample(
        FlowDenoiser(toy_net, FlowSchedule.sd3()),
        noise,
        sampler="euler_a",
        steps=steps,
        generators=S.NoiseBank(draws, noise.shape[0]),
        sampler_options={"eta": eta},
    )
    # float64 re-derivation of ComfyUI's rule: Euler down to s_down, rescale x0's share, renoise up to s_next
    s = grid.sigmas.double().tolist()
    x, k = noise.double(), 0
    for i in range(steps):
        v = toy_net(x.float(), torch.full((x.shape[0],), s[i] * 1000)).double()
        x0 = x - s[i] * v
        if s[i + 1] == 0:
            x = x0
            continue
        down = s[i + 1] * (1 + (s[i + 1] / s[i] - 1) * eta)
        alpha_next, alpha_down = 1 - s[i + 1], 1 - down
        renoise = math.sqrt(s[i + 1] ** 2 - down**2 * alpha_next**2 / alpha_down**2)
        x = (down / s[i]) * x + (1 - down / s[i]) * x0
        x = (alpha_next / alpha_down) * x + draws[k].double() * renoise
        k += 1
    torch.testing.assert_close(got.double(), x, rtol=0, atol=5e-5)
    assert sampling.noise_draws(sampler="euler_a", steps=steps, noise_schedule=FlowSchedule.sd3()) == steps - 1


# ---------------------------------------------------------------------------------------------------
# Gaussian data: every allowed sampler lands on the right law
# ---------------------------------------------------------------------------------------------------

STOCHASTIC = {name for name in FLOW_SAMPLERS if sampling.SAMPLERS[name].stochastic}


@pytest.mark.parametrize("name", sorted(set(FLOW_SAMPLERS) - STOCHASTIC))
def test_ode_samplers_follow_the_exact_flow(name: str) -> None:
    """The exact flow of Gaussian data carries eps (s = 1) to m + c eps: on SD3's grid (shift 3) every ODE sampler
    lands within 0.06 of it at 80 steps and converges (4 times the steps: the error shrinks over 3-fold; measured:
    4.0 for Euler, 11-100 for the others)."""
    noise = torch.randn(64, 4, 1, 1, generator=torch.Generator().manual_seed(10))
    want = _ch(M, noise) + _ch(C, noise) * noise
    errs = []
    for steps in (20, 80):
        got = sampling.sample(FlowDenoiser(gaussian_net, FlowSchedule.sd3()), noise, sampler=name, steps=steps)
        errs.append(float((got - want).abs().max()))
    assert errs[1] < 0.06 and errs[0] / errs[1] > 3.0, errs


@pytest.mark.parametrize("name", sorted(STOCHASTIC))
def test_stochastic_samplers_land_on_the_data_law(name: str) -> None:
    """100 steps of ComfyUI's `simple` grid, 4096 samples: mean within 0.04 of m (standard error up to 0.019),
    std within 5 % of c (measured 1.1-4.2 %, the first-order Euler a and DPM++ SDE highest)."""
    n = 4096
    noise = torch.randn(n, 4, 1, 1, generator=torch.Generator().manual_seed(11))
    got = sampling.sample(
        FlowDenoiser(gaussian_net, FlowSchedule()),
        noise,
        sampler=name,
        steps=100,
        schedule="simple",
        generators=S.BatchNoise.seeded(n, 12),
    )
    mean, std = got.mean(dim=(0, 2, 3)), got.std(dim=(0, 2, 3))
    assert float((mean - M).abs().max()) < 0.04, mean
    assert float((std / C - 1).abs().max()) < 0.05, std


class _Guided:
    """A guided denoiser as the CFG++ samplers see it: a guided x0 (the Gaussian one) and an unconditional x0 (the
    Gaussian one pulled towards 0), handed back through ``guidance_parts``."""

    takes_guidance_parts = True

    def __init__(self) -> None:
        self.inner = FlowDenoiser(gaussian_net, FlowSchedule.sd3())
        self.schedule = self.inner.schedule

    def __call__(self, x, sigma, guidance_parts=None, **extra):
        x0 = self.inner(x, sigma, **extra)
        if guidance_parts is not None:
            guidance_parts.uncond = 0.7 * x0
        return x0


def test_euler_cfg_pp_is_the_papers_rule_with_flow_alpha() -> None:
    """CFG++ Euler (DDIM) on a flow model: ``x' = (1 - s') x0_guided + s' (x - (1 - s) x0_uncond) / s`` (Chung et
    al. 2024, with alpha = 1 - s), re-derived in float64."""
    steps, noise = 6, _noise(seed=15)
    got = sampling.sample(_Guided(), noise, sampler="euler_cfg_pp", steps=steps)
    s = flow_grid(FlowSchedule.sd3(), steps).sigmas.double().tolist()
    s[0] = FlowSchedule.sd3().percent_to_sigma(1e-4)  # the VE view's start (ComfyUI's offset), from the same noise
    s[0] = float(torch.tensor(s[0], dtype=torch.float32))
    x = noise.double()
    for i in range(steps):
        x0 = gaussian_x0(x, torch.tensor([s[i]], dtype=torch.float64))
        x = x0 if s[i + 1] == 0 else (1 - s[i + 1]) * x0 + s[i + 1] / s[i] * (x - (1 - s[i]) * 0.7 * x0)
    torch.testing.assert_close(got.double(), x, rtol=0, atol=1e-4)


def test_noise_scaling_and_denoiser() -> None:
    x0, eps = _noise(seed=13), _noise(seed=14)
    x = flow_noise_scaling(0.25, eps, x0)
    torch.testing.assert_close(x, 0.75 * x0 + 0.25 * eps)
    per_row = flow_noise_scaling(torch.tensor([0.25, 1.0]), eps, x0)
    torch.testing.assert_close(per_row[1], eps[1])
    den = FlowDenoiser(lambda x, t: (t / 1000).reshape(-1, 1, 1, 1) * (eps - x0), FlowSchedule.sd3())
    torch.testing.assert_close(den(x, torch.tensor([0.25, 0.25])), x - 0.25 * 0.25 * (eps - x0))
    torch.testing.assert_close(den(x, torch.tensor([0.25, 0.5]))[1], x[1] - 0.5 * 0.5 * (eps - x0)[1])


# ---------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(sampling.SAMPLERS) - set(FLOW_SAMPLERS)))
def test_other_samplers_are_refused(name: str) -> None:
    called = []

    def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        called.append(t)
        return torch.zeros_like(x)

    with pytest.raises(UsageError, match=r"cannot run on a flow model .*; flow models take: euler, heun"):
        sampling.sample(
            FlowDenoiser(net, FlowSchedule.sd3()),
            _noise(),
            sampler=name,
            steps=4,
            generators=[torch.Generator() for _ in range(2)],
        )
    assert not called


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "ddim_uniform"}, "flow models cannot use schedule 'ddim_uniform'"),
        ({"noise_scale": 1.0}, "noise_scale is a setting of VP models"),
        ({"sampler_options": {"s_churn": 1.0}}, "s_churn adds VE noise"),
        ({"sigmas": torch.tensor([2.0, 1.0, 0.5, 0.2, 0.0])}, "at most 1"),
        ({"sigmas": torch.tensor([0.2, 0.5, 0.7, 0.9, 1.0])}, "decreasing"),
    ],
)
def test_flow_refusals(kwargs: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        sampling.sample(FlowDenoiser(toy_net, FlowSchedule.sd3()), _noise(), sampler="euler", steps=4, **kwargs)


def test_flow_schedule_errors() -> None:
    with pytest.raises(UsageError, match="flow shift must be a finite number above 0"):
        FlowSchedule(shift=0.0)
    with pytest.raises(UsageError, match="give mu or image_seq_len"):
        FlowSchedule.from_config({"use_dynamic_shifting": True})
    with pytest.raises(UsageError, match="invert_sigmas=True is not supported"):
        FlowSchedule.from_config({"invert_sigmas": True})
    with pytest.raises(UsageError, match="needs a FlowSchedule"):
        FlowDenoiser(toy_net, NoiseSchedule.from_config(beta_schedule="scaled_linear"))  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="unknown Flux shift setting"):
        FlowSchedule.flux(image_seq_len=1024, max_shift_=1.0)


def test_callback_and_interrupt_see_flow_values() -> None:
    """A VE-view sampler's callback gets the flow sigma and the flow-scaled x, as a flow-view one's."""
    seen: dict[str, list] = {"euler": [], "dpmpp_2m": []}
    for name in seen:

        def cb(i, sigma, x, denoised, name=name):
            seen[name].append((i, sigma, x.clone()))

        sampling.sample(FlowDenoiser(gaussian_net, FlowSchedule.sd3()), _noise(), sampler=name, steps=6, callback=cb)
    grid = flow_grid(FlowSchedule.sd3(), 6).sigmas.tolist()
    assert [s for _, s, _ in seen["euler"]] == grid[:-1]
    assert [s for _, s, _ in seen["dpmpp_2m"]][1:] == pytest.approx(grid[1:-1], rel=1e-6)
    # the first step is first order in both: the same x after it
    torch.testing.assert_close(seen["euler"][0][2], seen["dpmpp_2m"][0][2], rtol=0, atol=2e-3)
    with pytest.raises(S.SamplingInterrupted) as stopped:
        sampling.sample(
            FlowDenoiser(gaussian_net, FlowSchedule.sd3()),
            _noise(),
            sampler="dpmpp_2m",
            steps=6,
            callback=lambda i, *_: i < 2,
        )
    torch.testing.assert_close(stopped.value.x, seen["dpmpp_2m"][2][2])


def test_step_aware_networks_see_flow_sigmas_in_the_ve_view() -> None:
    """A network that takes the sampler's step (ControlNet windows, inpainting blends) gets the flow sigma of each
    call and the flow timestep, in the VE view as in the flow one."""

    class Net:
        takes_step = True

        def __init__(self) -> None:
            self.seen: list[tuple[int, float, float]] = []

        def __call__(self, x, t, step=None):
            self.seen.append((step.index, step.sigma, float(t[0])))
            return gaussian_net(x, t)

    grid = flow_grid(FlowSchedule.sd3(), 5).sigmas.tolist()
    for name in ("euler", "dpmpp_2m"):
        net = Net()
        sampling.sample(FlowDenoiser(net, FlowSchedule.sd3()), _noise(), sampler=name, steps=5)
        assert [i for i, _, _ in net.seen] == list(range(5))
        assert [s for _, s, _ in net.seen][1:] == grid[1:-1]  # the VE view's start is the offset, 0.99997
        assert [t for _, _, t in net.seen][1:] == pytest.approx([1000 * s for s in grid[1:-1]], rel=1e-6)


def test_vp_models_untouched_by_flow_option() -> None:
    """The flow flag is sample()'s own: not a user option on VP models."""
    assert "flow" not in sampling.sampler_option_names("euler_a")
    with pytest.raises(UsageError, match="has no option flow"):
        sampling.sample(
            lambda x, sigma, **_: torch.zeros_like(x),
            _noise(),
            sampler="euler_a",
            steps=3,
            noise_schedule=NoiseSchedule.from_config(beta_schedule="scaled_linear"),
            generators=[torch.Generator() for _ in range(2)],
            sampler_options={"flow": True},
        )
