"""The SIGMAS nodes of the ComfyUI runner, as values (no model run)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from sdengine.server.comfy.nodes import (
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
    for bad in (grid.sigmas.flip(0), torch.tensor([3.0, 3.0, 0.0]), torch.tensor([2.0, float("nan"), 0.0])):
        with pytest.raises(UsageError, match="decreasing"):
            sampling.sample(blind, noise, sampler="euler", steps=bad.numel() - 1, noise_schedule=ns, sigmas=bad)
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
