"""The SIGMAS nodes of the ComfyUI runner, as values (no model run)."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from sdengine.server.comfy.nodes import (
    SigmaPlan,
    Sigmas,
    align_your_steps_scheduler,
    karras_scheduler,
    split_sigmas,
    split_sigmas_denoise,
)

CTX = SimpleNamespace(max_steps=150)


def test_align_your_steps_node_gives_comfyui_levels():
    (s,) = align_your_steps_scheduler(CTX, "SD1", 10, 1.0)
    want = [14.6146, 6.4746, 3.8637, 2.6946, 1.8842, 1.3944, 0.9643, 0.6524, 0.3977, 0.1515, 0.0]
    assert s.values.tolist() == pytest.approx(want, abs=1e-4)
    (half,) = align_your_steps_scheduler(CTX, "SD1", 10, 0.5)  # the last round(10 * 0.5) steps
    assert half.values.tolist() == pytest.approx(want[-6:], abs=1e-4)
    (none,) = align_your_steps_scheduler(CTX, "SDXL", 10, 0.0)
    assert none.values.numel() == 0


def test_split_sigmas_as_comfyui():
    (s,) = karras_scheduler(CTX, 4, 14.614642, 0.0291675, 7.0)
    v = s.values
    assert v.shape == (5,) and float(v[-1]) == 0.0 and float(v[0]) == pytest.approx(14.614642)
    high, low = split_sigmas(CTX, s, 2)
    assert torch.equal(high.values, v[:3]) and torch.equal(low.values, v[2:])
    high, low = split_sigmas(CTX, s, 9)  # past the end: all high, none low
    assert torch.equal(high.values, v) and low.values.numel() == 0
    high, low = split_sigmas_denoise(CTX, s, 0.5)  # the last round(4 * 0.5) steps low
    assert torch.equal(high.values, v[:-2]) and torch.equal(low.values, v[-3:])
    high, low = split_sigmas_denoise(CTX, Sigmas(v), 0.0)  # ComfyUI's sigmas[:-0]: empty high
    assert high.values.numel() == 0 and torch.equal(low.values, v[-1:])


def test_sample_walks_an_explicit_sigma_list():
    """sampling.sample(sigmas=...) walks exactly the given sigmas: with a denoiser blind to the timestep it is the
    schedule's own run on the same sigmas; from pure noise it starts at sqrt(1 + sigma_0**2) (ComfyUI's)."""
    from sdengine.diffusion import sampling
    from sdengine.diffusion.schedules import NoiseSchedule
    from sdengine.errors import UsageError

    ns = NoiseSchedule.from_config(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")  # fmt: skip

    def blind(x, sigma, **_):
        return x * 0.3

    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    grid = sampling.make_grid("dpmpp_2m", 5, ns, "karras")
    kw = dict(sampler="dpmpp_2m", steps=5, noise_schedule=ns, init_latent=init, start_step=0)
    want = sampling.sample(blind, noise, schedule="karras", **kw)
    got = sampling.sample(blind, noise, sigmas=grid.sigmas, **kw)
    assert torch.equal(got, want)
    first: list[torch.Tensor] = []
    sampling.sample(
        lambda x, sigma, **_: first.append(x.clone()) or x * 0.3, noise, sampler="euler", steps=5,
        noise_schedule=ns, sigmas=grid.sigmas,
    )  # fmt: skip
    assert torch.allclose(first[0], noise * math.sqrt(1 + float(grid.sigmas[0]) ** 2))
    for bad in (torch.tensor([3.0, 3.0, 0.0]), torch.tensor([2.0, float("nan"), 0.0])):
        with pytest.raises(UsageError, match="decreasing"):
            sampling.sample(blind, noise, sampler="euler", steps=bad.numel() - 1, noise_schedule=ns, sigmas=bad)
    with pytest.raises(UsageError, match="start above 0"):  # rising (unsampling) from 0: FlipSigmas avoids it
        sampling.sample(blind, noise, sampler="euler", steps=5, noise_schedule=ns, sigmas=grid.sigmas.flip(0))
    with pytest.raises(UsageError, match="timestep grid"):
        sampling.sample(blind, noise, sampler="ddim", steps=5, noise_schedule=ns, sigmas=grid.sigmas)


def test_sd_turbo_scheduler_takes_every_hundredth_timestep():
    from sdengine.diffusion.schedules import NoiseSchedule
    from sdengine.server.comfy.nodes import ModelHandle, sd_turbo_scheduler

    ns = NoiseSchedule.from_config(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")  # fmt: skip
    ctx = SimpleNamespace(max_steps=150, pipeline=lambda ref: SimpleNamespace(noise_schedule=ns))
    (s,) = sd_turbo_scheduler(ctx, ModelHandle("m"), 2, 1.0)
    assert s.values.tolist() == pytest.approx([float(ns.sigmas[999]), float(ns.sigmas[899]), 0.0])
    (s,) = sd_turbo_scheduler(ctx, ModelHandle("m"), 4, 0.5)  # from the sixth on: 499, 399, 299, 199
    assert s.values.tolist() == pytest.approx([float(ns.sigmas[t]) for t in (499, 399, 299, 199)] + [0.0])


def _gauss_x0(x, sigma, **_):
    """The exact x0 denoiser of data ~ N(0, 0.5**2): its probability-flow ODE keeps x / sqrt(0.25 + sigma**2)."""
    s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
    return x * 0.25 / (0.25 + s**2)


def _ns():
    from sdengine.diffusion.schedules import NoiseSchedule

    return NoiseSchedule.from_config(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                     beta_schedule="scaled_linear")  # fmt: skip


def test_flip_sigmas_node_as_comfyui():
    from sdengine.server.comfy.nodes import flip_sigmas

    (s,) = karras_scheduler(CTX, 4, 14.614642, 0.0291675, 7.0)
    (f,) = flip_sigmas(CTX, s)
    assert f.values[0].item() == pytest.approx(0.0001) and torch.equal(f.values[1:], s.values.flip(0)[1:])
    assert torch.equal(s.values[-1], torch.tensor(0.0))  # its input is left as it was
    (f,) = flip_sigmas(CTX, Sigmas(torch.tensor([3.0, 1.0])))  # no 0 first: only reversed
    assert f.values.tolist() == [1.0, 3.0]
    (f,) = flip_sigmas(CTX, Sigmas(torch.zeros(0)))
    assert f.values.numel() == 0
    # a whole BasicScheduler schedule keeps its plan (SamplerCustom walks the reverse of its grid); a window does not
    plan = SigmaPlan("m", "karras", 4, 1.0, 4, 0, 4)
    assert flip_sigmas(CTX, Sigmas(s.values, plan))[0].flipped == plan
    assert flip_sigmas(CTX, Sigmas(s.values[:3], replace(plan, hi=2)))[0].flipped is None
    assert flip_sigmas(CTX, Sigmas(s.values, replace(plan, denoise=0.5)))[0].flipped is None


def test_euler_walks_rising_sigmas_as_a_float64_hand_computation():
    """Unsampling (FlipSigmas): Euler's x += (x - D(x, sigma)) / sigma * (sigma' - sigma) upward, from the latent."""
    from sdengine.diffusion import sampling
    from sdengine.server.comfy.nodes import flip_sigmas

    (s,) = karras_scheduler(CTX, 6, 14.614642, 0.0291675, 7.0)
    (up,) = flip_sigmas(CTX, s)
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    got = sampling.sample(_gauss_x0, torch.zeros_like(init), sampler="euler", steps=6, noise_schedule=_ns(),
                          sigmas=up.values, init_latent=init, start_step=0)  # fmt: skip
    x, sig = init.double(), up.values.double().tolist()
    for a, b in zip(sig[:-1], sig[1:], strict=True):
        d = (x - x * 0.25 / (0.25 + a * a)) / a
        x = x + d * (b - a)
    want = x / math.sqrt(1 + sig[-1] ** 2)  # sample() answers the network's (VP) scaling
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)
    assert float(x.abs().max()) > 10 * float(init.abs().max())  # it did walk upward (towards noise), in VE


def test_rising_sigma_samplers_follow_the_flow_upward_and_the_others_are_refused():
    """Every sampler of RISING_SIGMA_SAMPLERS integrates the exact flow of Gaussian data upward (about as well as
    downward); the ones that draw noise or go wrong upward are refused by name, before any model call."""
    from sdengine.diffusion import sampling
    from sdengine.errors import UsageError

    (s,) = karras_scheduler(CTX, 40, 14.614642, 0.0291675, 7.0)
    up = s.values.flip(0).clone()
    up[0] = 1e-4
    init = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(3)) * 0.5
    exact = init * math.sqrt(0.25 + float(up[-1]) ** 2) / math.sqrt(0.25 + float(up[0]) ** 2)
    exact = exact / math.sqrt(1 + float(up[-1]) ** 2)
    for name in sampling.RISING_SIGMA_SAMPLERS:
        got = sampling.sample(_gauss_x0, torch.zeros_like(init), sampler=name, steps=40, noise_schedule=_ns(),
                              sigmas=up, init_latent=init, start_step=0)  # fmt: skip
        err = float((got - exact).abs().max() / exact.abs().max())
        assert err < 0.06, (name, err)
    gens = [torch.Generator().manual_seed(0)]
    for name, words in (("euler_a", "fresh noise"), ("dpmpp_2m_sde", "fresh noise"), ("heunpp2", "blow up"),
                        ("unipc", "do not converge"), ("ddim", "timestep grid")):  # fmt: skip

        def never(x, sigma, **_):
            raise AssertionError("the model ran")

        with pytest.raises(UsageError, match=f"{name}.*{words}"):
            sampling.sample(never, init, sampler=name, steps=40, noise_schedule=_ns(), sigmas=up, generators=gens)
    with pytest.raises(UsageError, match="churn"):
        sampling.sample(_gauss_x0, init, sampler="euler", steps=40, noise_schedule=_ns(), sigmas=up,
                        sampler_options={"s_churn": 1.0}, generators=gens)  # fmt: skip
    for bad, words in ((torch.tensor([0.0, 1.0, 2.0]), "start above 0"), (torch.tensor([1.0, 3.0, 2.0]), "rise")):
        with pytest.raises(UsageError, match=words):
            sampling.sample(_gauss_x0, init, sampler="euler", steps=2, noise_schedule=_ns(), sigmas=bad)


def test_unsample_then_resample_with_euler_gives_back_the_start():
    """FlipSigmas' round trip: Euler up the flipped schedule to sigma_max, then Euler down it again, on a linear
    denoiser, lands back on the start (both walks follow the same ODE; 30 steps keep their errors small)."""
    from sdengine.diffusion import sampling
    from sdengine.server.comfy.nodes import flip_sigmas

    (s,) = karras_scheduler(CTX, 100, 14.614642, 0.0291675, 7.0)
    (up,) = flip_sigmas(CTX, s)
    start = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.5
    zeros = torch.zeros_like(start)
    kw: dict = dict(sampler="euler", steps=100, noise_schedule=_ns(), start_step=0)
    noisy = sampling.sample(_gauss_x0, zeros, sigmas=up.values, init_latent=start, **kw)
    noisy = noisy * math.sqrt(1 + float(up.values[-1]) ** 2)  # back to VE, as latent_sampling hands it on
    back = sampling.sample(_gauss_x0, zeros, sigmas=s.values, init_latent=noisy, **kw)
    assert float(noisy.std()) > 10 * float(start.std())  # it was noise-scaled on the way
    assert float((back - start).abs().max()) < 0.05 * float(start.abs().max())


def comfy_model_sigmas(beta_start: float, beta_end: float, n: int = 1000) -> torch.Tensor:
    """ComfyUI's ModelSamplingDiscrete table for a scaled_linear model: betas, alphas_cumprod and sigmas in float64,
    stored as float32 (its ``sigmas`` buffer; sigma_min = sigmas[0], sigma_max = sigmas[-1])."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - ac) / ac) ** 0.5).float()


def comfy_calculate_sigmas(table: torch.Tensor, scheduler: str, n: int) -> list[float]:
    """A float64 recomputation of ComfyUI's calculate_sigmas (comfy/samplers.py; k-diffusion's get_sigmas_karras and
    get_sigmas_exponential between the model's sigma_min and sigma_max, normal_scheduler with and without sgm)."""
    lo, hi = float(table[0]), float(table[-1])
    ramp = [i / (n - 1) for i in range(n)] if n > 1 else [0.0]  # torch.linspace(0, 1, n)
    log_t = table.double().log()

    def sigma_at(t: float) -> float:  # ModelSamplingDiscrete.sigma: log-linear between the table's timesteps
        a, b = math.floor(t), math.ceil(t)
        return math.exp((1 - (t - a)) * float(log_t[a]) + (t - a) * float(log_t[b]))

    if scheduler == "karras":
        out = [(hi ** (1 / 7) + r * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7 for r in ramp]
    elif scheduler == "exponential":
        out = [math.exp(math.log(hi) + r * (math.log(lo) - math.log(hi))) for r in ramp]
    elif scheduler == "sgm_uniform":
        out = [sigma_at(999 - i * 999 / n) for i in range(n)]
    else:  # normal: linspace(999, 0, n), sigma_min above 0 so a 0 is appended
        out = [sigma_at(999 - i * 999 / (n - 1)) for i in range(n)]
    return [*out, 0.0]


@pytest.mark.parametrize("scheduler", ["karras", "exponential", "sgm_uniform", "normal"])
def test_ksampler_grids_are_comfyuis_lists_on_a_leading_model(scheduler):
    """Under ComfyUI's API every sampler walks ComfyUI's list of the scheduler's name, which BasicScheduler outputs:
    on a `leading` model (SD 1.5's config, the emoji model's) karras and exponential once walked diffusers' Euler-
    family grids, starting at 5.9 where ComfyUI's start at the model's sigma_max, 14.6. The Euler family's grid
    timesteps are each sigma's fractional one, as for a sigma list (what the network sees under sdengine's seed rule;
    under ComfyUI's it sees the nearest table timestep of every sigma, tests/test_comfy_model_call.py)."""
    from sdengine.diffusion import sampling
    from sdengine.diffusion.schedules import NoiseSchedule, sigma_to_t
    from sdengine.server.comfy.nodes import SCHEDULER_NAMES, basic_scheduler

    config = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
              "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "steps_offset": 1}  # fmt: skip
    ns = NoiseSchedule.from_config(**config)
    pipe = SimpleNamespace(noise_schedule=ns, scheduler_config=config, text_kind="sd1")
    ctx = SimpleNamespace(max_steps=150, pipeline=lambda ref: pipe)
    model = SimpleNamespace(ref="m")
    table = comfy_model_sigmas(0.00085, 0.012)
    for steps in (1, 6, 20):
        want = comfy_calculate_sigmas(table, scheduler, steps) if steps > 1 or scheduler != "normal" else None
        (listed,) = basic_scheduler(ctx, model, scheduler, steps, 1.0)
        for sampler in ("euler", "heun", "lms", "dpmpp_2m", "dpm2"):
            name, sched = sampling.resolve(sampler, SCHEDULER_NAMES[scheduler])
            grid = sampling.make_grid(name, steps, ns, sched, config, comfy_grid=True)
            if want is not None:
                # the engine's table is diffusers' (float32 cumprod; ComfyUI's is float64): sigma_min 1.3e-5 apart
                assert grid.sigmas.tolist() == pytest.approx(want, rel=3e-5, abs=1e-7), (scheduler, steps, sampler)
            assert torch.equal(grid.sigmas, listed.values), (scheduler, steps, sampler)
            if sampler in ("euler", "heun", "lms"):
                walked = sigma_to_t(grid.sigmas[:-1], ns.log_sigmas).float()  # as SamplerCustom walks a list
                assert torch.allclose(grid.timesteps, walked, atol=1e-3), (scheduler, steps, sampler)
    # the native API keeps diffusers' grid (its contract): Euler + karras on a leading config starts lower
    native = sampling.make_grid("euler", 6, ns, "karras", config)
    assert float(native.sigmas[0]) == pytest.approx(5.9064, abs=1e-3)
    assert float(sampling.make_grid("euler", 6, ns, "karras", config, comfy_grid=True).sigmas[0]) == pytest.approx(
        float(table[-1]), rel=1e-6
    )
    assert float(table[0]) == pytest.approx(0.0291671582, rel=1e-7)  # ComfyUI's sigma_min (its AYS table's last)
