"""Zero-terminal-SNR schedules (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed").

Two rules: a scheduler config's ``rescale_betas_zero_snr`` (diffusers': the betas rescaled, alphas_cumprod[-1] = 0,
the VE samplers start from 2**-24, sigma_max 4096), and A1111's "Noise schedule for sampling: Zero Terminal SNR"
(its ``sd_noise_schedule``: the model's float32 alphas_cumprod rescaled, the last one set to 4.8973451890853435e-08,
sigma_max about 4518.8), once refused by sdengine's A1111 routes and absent from the Python API."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

import sdengine
from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule, a1111_timestep_grid, a1111_zero_terminal_snr
from sdengine.errors import GenerationError
from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs
from sdengine.pipeline.core import zero_snr_call

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
A1111_LAST = 4.8973451890853435e-08  # modules/sd_models.py rescale_zero_terminal_snr_abar


def kdiffusion_uniform(table: torch.Tensor, n: int) -> torch.Tensor:
    """k-diffusion's DiscreteSchedule.get_sigmas(n) (A1111's Euler "Automatic"): t = linspace(T - 1, 0, n), the
    sigma of each by linear interpolation of the log-sigma table, then a 0."""
    log = table.log()
    t = torch.linspace(len(table) - 1, 0, n)
    lo, w = t.floor().long(), t.frac()
    hi = (lo + 1).clamp(max=len(table) - 1)
    return torch.cat([((1 - w) * log[lo] + w * log[hi]).exp(), torch.zeros(1)])


def test_a1111_rule_is_diffusers_rescale_with_a1111s_terminal_value():
    base = NoiseSchedule.from_config(**SD)
    z = a1111_zero_terminal_snr(base)
    ref = DDPMScheduler(**SD, rescale_betas_zero_snr=True).alphas_cumprod
    # the same shift and scale as diffusers' (on alphas_cumprod rather than on the betas) ...
    torch.testing.assert_close(z.alphas_cumprod[:-1], ref[:-1], atol=1e-6, rtol=0)
    assert float(ref[-1]) == pytest.approx(0.0, abs=1e-12)
    # ... but A1111's last value, so every sampler (its DDIM / PLMS too) has a finite sigma_max
    assert float(z.alphas_cumprod[-1]) == float(torch.tensor(A1111_LAST, dtype=torch.float32))
    want_max = float(((1 - torch.tensor(A1111_LAST)) / torch.tensor(A1111_LAST)) ** 0.5)
    assert float(z.sigmas[-1]) == pytest.approx(want_max, rel=1e-6) and 4518 < want_max < 4519
    assert float(z.sigmas[0]) == pytest.approx(float(base.sigmas[0]), rel=1e-6)  # the first one kept
    assert z.num_train_timesteps == 1000 and bool(torch.isfinite(z.sigmas).all())
    # applied to a zero-terminal-SNR schedule (diffusers' rule) it only sets that last value
    again = a1111_zero_terminal_snr(NoiseSchedule.from_config(**SD, rescale_betas_zero_snr=True))
    torch.testing.assert_close(again.alphas_cumprod, z.alphas_cumprod, atol=1e-6, rtol=0)


def test_a1111_grids_on_the_rescaled_schedule():
    """A1111's Euler (k-diffusion's uniform grid) starts at the terminal sigma; its DDIM grid at timestep 999's."""
    z = a1111_zero_terminal_snr(NoiseSchedule.from_config(**SD))
    grid = sampling.make_grid("euler", 8, z, "uniform")
    torch.testing.assert_close(grid.sigmas, kdiffusion_uniform(z.sigmas, 8), rtol=1e-5, atol=1e-6)
    assert float(grid.sigmas[0]) == pytest.approx(float(z.sigmas[-1]), rel=1e-6)
    ddim = a1111_timestep_grid(10, z)
    assert float(ddim.sigmas[0]) == pytest.approx(float(z.sigmas[int(ddim.timesteps[0])]), rel=1e-6)


@pytest.fixture(scope="module")
def sd2(tiny_sd2_folder):
    return sdengine.load_pipeline(tiny_sd2_folder, device="cpu")


def test_pipeline_runs_a1111s_zero_terminal_snr_and_writes_it(sd2):
    sigmas: list[float] = []
    kw = dict(steps=2, sampler="euler", schedule="uniform", seed=4, width=32, height=32, progress=False)
    plain = sd2("a cat", **kw)
    z = sd2("a cat", **kw, zero_terminal_snr=True, callback=lambda info: sigmas.append(info.sigma))
    want = a1111_zero_terminal_snr(sd2.base_schedule)
    assert sigmas[0] == pytest.approx(float(want.sigmas[-1]), rel=1e-6) and sigmas[0] > 4500
    assert "Noise Schedule: Zero Terminal SNR" in z.infotexts[0]
    assert "Noise Schedule" not in plain.infotexts[0]
    assert not np.array_equal(z.arrays, plain.arrays)
    assert sd2.noise_schedule is sd2.base_schedule  # only for that call
    # the infotext reads back to the same call
    back = to_generate_kwargs(parse_parameters(z.infotexts[0]))
    assert back["zero_terminal_snr"] is True
    np.testing.assert_array_equal(sd2(**{**back, "progress": False}).arrays, z.arrays)


def test_a_recorded_loop_is_not_shared_across_schedules(sd2):
    """A recorded sampling loop bakes in its grid: the Zero Terminal SNR run's plan is another plan."""
    request = sdengine.GenerationRequest(prompt="a", steps=3, sampler="euler", width=32, height=32)
    p = sd2.prepare(request)
    plain = sd2.loop_plan(p, False, 0)
    with zero_snr_call(request.replace(zero_terminal_snr=True), sd2):
        assert sd2.noise_schedule is not sd2.base_schedule
        rescaled = sd2.loop_plan(p, False, 0)
    assert rescaled.zero_snr and plain.key != rescaled.key
    assert sd2.noise_schedule is sd2.base_schedule


def test_bad_zero_terminal_snr_values_are_one_line():
    with pytest.raises(GenerationError, match="zero_terminal_snr must be true or false, got 'yes'"):
        sdengine.GenerationRequest(prompt="a", zero_terminal_snr="yes").validate()
    text = "a star\nSteps: 3, Sampler: Euler, CFG scale: 3, Seed: 5, Size: 64x64, Noise Schedule: {}"
    assert to_generate_kwargs(parse_parameters(text.format("Default")))["zero_terminal_snr"] is False
    with pytest.raises(MetadataError, match="Noise Schedule: 'Flat' is not one of 'Default', 'Zero Terminal SNR'"):
        to_generate_kwargs(parse_parameters(text.format("Flat")))


@pytest.mark.slow  # two tiny generations on each side
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "ddim"])
def test_a_zero_snr_scheduler_config_matches_diffusers(tiny_sd2_folder, tmp_path, sampler):
    """A v-prediction model whose scheduler config has rescale_betas_zero_snr (and trailing spacing, as the paper
    asks) walks diffusers' schedule: the image of diffusers' pipeline with that scheduler."""
    from _pipeline_models import diffusers_pipeline, diffusers_scheduler

    folder = tmp_path / "tiny-zsnr"
    shutil.copytree(tiny_sd2_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}))
    pipe = sdengine.load_pipeline(folder, device="cpu")
    assert pipe.noise_schedule.rescale_betas_zero_snr and float(pipe.noise_schedule.alphas_cumprod[-1]) == 0.0
    sigmas: list[float] = []
    ours = pipe(
        "a cat", steps=6, sampler=sampler, schedule="normal", seed=2, width=32, height=32, progress=False,
        callback=lambda info: sigmas.append(info.sigma),
    ).arrays  # fmt: skip
    assert sigmas[0] == pytest.approx(4096.0, rel=1e-4)  # timestep 999 first (trailing), at diffusers' 2**-24
    ref = diffusers_pipeline(folder, "sd2")
    ref.scheduler = diffusers_scheduler(folder, sampler)
    assert ref.scheduler.config.rescale_betas_zero_snr
    theirs = ref(
        "a cat", num_inference_steps=6, guidance_scale=7.5, width=32, height=32, output_type="np",
        generator=torch.Generator("cpu").manual_seed(2),
    ).images  # fmt: skip
    assert float(np.abs(ours.astype(np.float64) - theirs).mean()) < 1e-3
