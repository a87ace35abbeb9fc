"""A1111's and ComfyUI's "discard next-to-last sigma": A1111 makes DPM2's, DPM2 a's and DPM++ 3M SDE's grid for one
step more and drops its next-to-last sigma (its ``always_discard_next_to_last_sigma`` option does so for every
sampler), ComfyUI's KSampler does so for dpm_2, dpm_2_ancestral, uni_pc, uni_pc_bh2. sdengine once walked the plain
grid: another image than theirs for the same seed."""

from __future__ import annotations

import math

import pytest
import torch

from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule, a1111_timestep_grid

SD15 = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def kdiffusion_karras(n: int, lo: float, hi: float, rho: float = 7.0) -> torch.Tensor:
    """k-diffusion's get_sigmas_karras as A1111 calls it (float32 ramp, then a 0 appended)."""
    ramp = torch.linspace(0, 1, n)
    a, b = lo ** (1 / rho), hi ** (1 / rho)
    return torch.cat([(b + ramp * (a - b)) ** rho, torch.zeros(1)])


def kdiffusion_exponential(n: int, lo: float, hi: float) -> torch.Tensor:
    return torch.cat([torch.linspace(math.log(hi), math.log(lo), n).exp(), torch.zeros(1)])


@pytest.mark.parametrize(
    "a1111, make",
    [("DPM2", kdiffusion_karras), ("DPM2 a", kdiffusion_karras), ("DPM++ 3M SDE", kdiffusion_exponential)],
)
def test_a1111_sigmas_without_the_next_to_last_one(a1111, make):
    """A1111's get_sigmas for these samplers' "Automatic" schedule at 10 steps: the 11-step list of the model's
    sigma_min / sigma_max with its next-to-last sigma dropped (``torch.cat([sigmas[:-2], sigmas[-1:]])``)."""
    ns = NoiseSchedule.from_config(**SD15)
    lo, hi = float(ns.sigmas[0]), float(ns.sigmas[-1])
    name, sched = sampling.resolve(a1111, "Automatic")
    assert name in sampling.A1111_DISCARD_SAMPLERS
    full = make(11, lo, hi)
    want = torch.cat([full[:-2], full[-1:]])
    grid = sampling.make_grid(name, 10, ns, sched, None, discard_penultimate=True)
    assert grid.steps == 10 and grid.sigmas.shape == (11,)
    assert torch.allclose(grid.sigmas, want, rtol=2e-6, atol=1e-6), (grid.sigmas, want)
    plain = sampling.make_grid(name, 10, ns, sched, None)
    assert torch.allclose(plain.sigmas, make(10, lo, hi), rtol=2e-6, atol=1e-6)
    # sigma_min itself is dropped: the last step goes to 0 from the point above it
    assert float(grid.sigmas[-2]) > float(plain.sigmas[-2]) == pytest.approx(lo, rel=1e-5)
    # the timesteps of the points kept are the 11-step grid's
    eleven = sampling.make_grid(name, 11, ns, sched, None)
    assert torch.equal(grid.timesteps, eleven.timesteps[:-1])


def test_a1111_ddim_grid_gets_a_step_more_and_drops_nothing():
    """A1111's CompVisSampler.get_timesteps (DDIM, PLMS): the option adds a step to its timestep grid, no drop."""
    ns = NoiseSchedule.from_config(**SD15)
    for name in ("ddim", "plms"):
        got = sampling.make_grid(name, 5, ns, "normal", None, a1111_grid=True, discard_penultimate=True)
        want = a1111_timestep_grid(6, ns)
        assert torch.equal(got.sigmas, want.sigmas) and torch.equal(got.timesteps, want.timesteps)


def test_discard_needs_two_steps():
    ns = NoiseSchedule.from_config(**SD15)
    grid = sampling.make_grid("euler", 1, ns, "karras", None, discard_penultimate=True)
    assert grid.steps == 1 and float(grid.sigmas[-1]) == 0.0
    assert float(grid.sigmas[0]) == pytest.approx(float(ns.sigmas[-1]), rel=1e-6)


def test_infotext_discard_field_is_checked():
    """A1111's "Discard penultimate sigma" is read back (True or False, any case); another value is one line."""
    from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs

    base = "a star\nSteps: 3, Sampler: Euler, CFG scale: 3, Seed: 5, Size: 64x64, Discard penultimate sigma: {}"
    assert to_generate_kwargs(parse_parameters(base.format("True")))["discard_penultimate_sigma"] is True
    assert to_generate_kwargs(parse_parameters(base.format("false")))["discard_penultimate_sigma"] is False
    with pytest.raises(MetadataError, match="Discard penultimate sigma: 'maybe' is not True or False") as info:
        to_generate_kwargs(parse_parameters(base.format("maybe")))
    assert "\n" not in str(info.value)
