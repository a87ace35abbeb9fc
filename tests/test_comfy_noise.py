"""ComfyUI's seed rule draws every sampler's noise as ComfyUI does on the CPU (docs/comfyui.md, Seeds).

The references are written here from ComfyUI's own code: comfy/sample.py ``prepare_noise`` (``torch.manual_seed(seed)``,
the batch drawn at once, or rows 0 .. max(batch_index) one after the other), comfy/k_diffusion/sampling.py
``default_noise_sampler`` (one ``torch.Generator`` seeded by KSampler's seed, ``extra_args["seed"]`` in
comfy/samplers.py, drawing ``randn(x.size())`` each call) and its Euler churn (``torch.randn_like``: torch's global
generator, where ``prepare_noise`` left it).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
SHAPE = (2, 4, 8, 8)  # 256 values a row: a multiple of torch's 16-value normal blocks, as a latent's rows are


def _den(x, sigma, **_):
    """A toy denoiser that depends on x and sigma (so every draw shows in the result)."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return torch.tanh(x / (1 + s)) * 0.8


def _ancestral(s, s_next, eta=1.0):  # k-diffusion's get_ancestral_step
    up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
    return (s_next**2 - up**2) ** 0.5, up


def _comfy_euler_ancestral(x, sigmas, seed):
    """ComfyUI's sample_euler_ancestral with its default_noise_sampler(x, seed)."""
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        denoised = _den(x, torch.full((x.shape[0],), s[i]))
        down, up = _ancestral(s[i], s[i + 1])
        if down == 0:
            x = denoised
        else:
            d = (x - denoised) / s[i]
            x = x + d * (down - s[i]) + torch.randn(x.size(), dtype=x.dtype, generator=gen) * up
    return x


def test_batch_noise_draws_as_comfyuis_euler_ancestral():
    """Euler a over a batch of 2 with ComfyUI's noise (sdengine.diffusion.samplers.BatchNoise): ComfyUI's loop
    recomputed here; the per-row generators seeded seed + i (what the rule once used) give another batch."""
    seed = 2**40 + 3  # ComfyUI seeds up to 2**64 - 1
    sigmas = torch.tensor([6.0, 2.5, 0.8, 0.0])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)) * 6.0
    ours = S.sample_euler_a(_den, x, sigmas, generators=S.BatchNoise.seeded(2, seed))
    ref = _comfy_euler_ancestral(x, sigmas, seed)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    rows = S.sample_euler_a(_den, x, sigmas, generators=[torch.Generator().manual_seed(seed + i) for i in range(2)])
    assert (rows - ref).abs().max() > 1e-2


# ComfyUI's samplers that draw per-step noise from default_noise_sampler (the SDE ones read a Brownian tree
# instead), as sdengine names them, and how many draws ComfyUI makes over a grid of n steps ending at 0: one a
# step that does not land on 0 (dpm_fast: one a step, eta 0 or not).
COMFY_STEP_NOISE = {
    "euler_ancestral": "euler_a",
    "euler_ancestral_cfg_pp": "euler_a_cfg_pp",
    "dpm_2_ancestral": "dpm2_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_a_cfg_pp",
    "res_multistep_ancestral": "res_multistep_a",
    "res_multistep_ancestral_cfg_pp": "res_multistep_a_cfg_pp",
    "er_sde": "er_sde",
    "ddpm": "ddpm",
    "lcm": "lcm",
}


@pytest.mark.parametrize("comfy_name", sorted(COMFY_STEP_NOISE))
def test_each_comfyui_noise_sampler_reads_comfyuis_draws_in_order(comfy_name):
    """Every sampler ComfyUI runs with default_noise_sampler: as many draws as ComfyUI makes (one per step not
    landing on 0), each the whole batch's next ``randn(x.shape)`` from one generator seeded by the seed: the run
    equals the same sampler fed exactly those draws."""
    from sdengine.server.comfy.nodes import SAMPLER_NAMES

    name = SAMPLER_NAMES[comfy_name]
    assert name == COMFY_STEP_NOISE[comfy_name]
    ns = NoiseSchedule.from_config(**SD)
    steps, seed = 4, 77
    kw = dict(sampler=name, steps=steps, schedule="uniform", scheduler_config=SD, noise_schedule=ns)
    if name == "lcm":
        kw["schedule"] = "normal"
    sched = kw["schedule"]
    count = sampling.noise_draws(sampler=name, steps=steps, noise_schedule=ns, schedule=sched, scheduler_config=SD)
    assert count == steps - 1, count  # ComfyUI: a draw where sigma_next > 0
    gen = torch.Generator().manual_seed(seed)
    bank = S.NoiseBank(torch.stack([torch.randn(SHAPE, generator=gen) for _ in range(count)]), SHAPE[0])
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    ours = sampling.sample(_den, noise, generators=S.BatchNoise.seeded(SHAPE[0], seed), **kw)
    ref = sampling.sample(_den, noise, generators=bank, **kw)
    assert bank.used == count
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_heunpp2_draws_a_churn_number_every_step_as_comfyui():
    """ComfyUI's heunpp2 draws ``randn_like(x)`` each step, churn on or not: with the churn on at the last step
    only (s_tmax), the noise it adds there is the global generator's third draw."""
    sigmas = torch.tensor([5.0, 2.0, 0.7, 0.0])
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 5
    opts = dict(s_churn=1.0, s_tmin=0.0, s_tmax=1.0)  # on at sigma 0.7 only
    churn = torch.Generator().manual_seed(11)
    ours = S.sample_heunpp2(_den, x, sigmas, generators=S.BatchNoise.seeded(2, 0, churn), **opts)
    g = torch.Generator().manual_seed(11)
    draws = [torch.randn(SHAPE, generator=g) for _ in range(3)]
    bank = S.NoiseBank(torch.stack(draws[2:]), 2)  # what sdengine's own rule draws: where the churn is on only
    ref = S.sample_heunpp2(_den, x, sigmas, generators=bank, **opts)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


# ------------------------------------------------------------------------------ through sample_latents (KSampler)


@pytest.fixture(scope="module")
def emoji():
    from _live_server import shared_loader
    from sdengine.latent_sampling import encode_text

    pipe = shared_loader("emoji", "cpu")
    return pipe, encode_text(pipe, "a star"), encode_text(pipe, "")


def _prepare_noise(shape, seed, noise_inds=None):
    """ComfyUI's comfy/sample.py prepare_noise; returns the noise and the global generator after it."""
    gen = torch.Generator().manual_seed(seed)
    if noise_inds is None:
        return torch.randn(shape, generator=gen), gen
    unique, inverse = np.unique(noise_inds, return_inverse=True)
    rows = []
    for i in range(unique[-1] + 1):
        row = torch.randn([1, *shape[1:]], generator=gen)
        if i in unique:
            rows.append(row)
    return torch.cat([rows[i] for i in inverse]), gen


def _first_step(emoji, sampler, seed, batch_index=None, **kw):
    """KSamplerAdvanced's first of 2 steps with leftover noise: (x after the step, the step's x0, the sigmas)."""
    from sdengine.latent_sampling import sample_latents

    pipe, pos, neg = emoji
    seen = []
    with torch.inference_mode():
        out = sample_latents(
            pipe, [pos], [neg], torch.zeros(SHAPE), seed=seed, steps=2, cfg=3.0, sampler=sampler, schedule="uniform",
            end_at_step=1, leftover_noise=True, batch_index=batch_index, callback=lambda r: seen.append(r.denoised),
            **kw,
        )  # fmt: skip
    sigmas = sampling.make_grid(sampler, 2, pipe.noise_schedule, "uniform", pipe.scheduler_config).sigmas.tolist()
    return out, seen[0].cpu(), sigmas


def test_ksampler_euler_ancestral_batch_is_comfyuis(emoji):
    """KSampler's euler_ancestral over a batch of 2 under ComfyUI's seed rule: start noise and step noise as ComfyUI
    draws them (the second image once drew its step noise from a generator seeded seed + 1)."""
    seed = 123
    out, den0, (s0, s1, _) = _first_step(emoji, "euler_a", seed)
    noise, _ = _prepare_noise(SHAPE, seed)
    x = noise * math.sqrt(1 + s0**2)  # ComfyUI's noise_scaling at max_denoise
    down, up = _ancestral(s0, s1)
    step_gen = torch.Generator().manual_seed(seed)
    ref = x + (x - den0) / s0 * (down - s0) + torch.randn(SHAPE, generator=step_gen) * up
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_ksampler_euler_churn_goes_on_from_the_start_noises_generator(emoji):
    """Euler's churn (s_churn) draws ``randn_like``: torch's global generator, which prepare_noise seeded and drew
    the start noise from, also with a batch_index (rows 0 .. 2 drawn, rows 2 and 0 taken). The window (step 1 of
    2) is a run of its own, as ComfyUI's KSamplerAdvanced hands its sampler the window's sigmas: gamma is s_churn
    over the window's one step (it was once over the grid's 2)."""
    seed, churn = 9, 0.3
    out, den0, (s0, s1, _) = _first_step(emoji, "euler", seed, [2, 0], sampler_options={"s_churn": churn})
    noise, gen = _prepare_noise(SHAPE, seed, [2, 0])
    gamma = min(churn / 1, 2**0.5 - 1)
    hat = s0 * (gamma + 1)
    x = noise * math.sqrt(1 + s0**2) + torch.randn(SHAPE, generator=gen) * (hat**2 - s0**2) ** 0.5
    ref = x + (x - den0) / hat * (s1 - hat)
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-4, atol=1e-4)


def test_make_noise_with_a_batch_index_is_comfyuis_prepare_noise():
    from sdengine.latent_sampling import make_noise

    for inds in ([3, 1], [0, 0, 2], [1]):
        shape = (len(inds), 4, 3, 5)  # 60 values a row: not a whole number of normal blocks
        torch.testing.assert_close(make_noise(shape, 41, "comfyui", inds), _prepare_noise(shape, 41, inds)[0])
    torch.testing.assert_close(make_noise((3, 4, 3, 5), 41, "comfyui"), _prepare_noise((3, 4, 3, 5), 41)[0])


def _one_step(emoji, latent, schedule="uniform", **kw):
    """The first of 3 euler steps with leftover noise on ``latent``: (x after it, the step's x0)."""
    from sdengine.latent_sampling import sample_latents

    pipe, pos, neg = emoji
    seen = []
    with torch.inference_mode():
        out = sample_latents(
            pipe, [pos], [neg], latent, seed=4, steps=3, cfg=3.0, sampler="euler", schedule=schedule,
            end_at_step=1, leftover_noise=True, callback=lambda r: seen.append(r.denoised), **kw,
        )  # fmt: skip
    return out.cpu(), seen[0].cpu()


def test_a_latent_sampled_from_the_models_sigma_max_starts_as_comfyuis(emoji):
    """ComfyUI's noise_scaling at max denoise (the run starting at the model's sigma_max): latent + noise *
    sqrt(1 + sigma**2), a VAE-encoded latent too (it once started at latent + noise * sigma)."""
    pipe = emoji[0]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    out, den0 = _one_step(emoji, latent)
    s = sampling.make_grid("euler", 3, pipe.noise_schedule, "uniform", pipe.scheduler_config).sigmas.tolist()
    assert math.isclose(s[0], float(pipe.noise_schedule.sigma_max), rel_tol=1e-5)
    x = latent + _prepare_noise((1, 4, 8, 8), 4)[0] * math.sqrt(1 + s[0] ** 2)
    torch.testing.assert_close(out, x + (x - den0) / s[0] * (s[1] - s[0]), rtol=1e-4, atol=1e-4)


def test_a_noise_mask_at_max_denoise_is_blended_before_the_first_call_as_comfyui(emoji):
    """ComfyUI's KSamplerX0Inpaint blends the known region to latent + noise * sigma before every model call: at max
    denoise the first call's too, where the start (noise * sqrt(1 + sigma**2)) differs. The network then reads what
    an unmasked run reads from a latent shifted by the difference in the known region."""
    pipe = emoji[0]
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1  # repaint the right half
    _, den_masked = _one_step(emoji, latent, noise_mask=mask)
    s0 = sampling.make_grid("euler", 3, pipe.noise_schedule, "uniform", pipe.scheduler_config).sigmas[0].item()
    keep = (torch.nn.functional.interpolate(mask, size=(8, 8)) < 0.5).float()
    noise = _prepare_noise((1, 4, 8, 8), 4)[0]
    shifted = latent - noise * (math.sqrt(1 + s0**2) - s0) * keep
    _, den_plain = _one_step(emoji, shifted)
    torch.testing.assert_close(den_masked, den_plain, rtol=0, atol=5e-4)  # the two inputs differ by rounding


def test_an_empty_latent_on_comfyuis_ddim_uniform_list_starts_at_noise_times_its_first_sigma(emoji):
    """ComfyUI's ddim_uniform list starts below sigma_max: not its max denoise, so even an empty latent starts at
    noise * sigma (it once started at sqrt(1 + sigma**2), the grid's own rule)."""
    pipe = emoji[0]
    out, den0 = _one_step(emoji, torch.zeros(1, 4, 8, 8), schedule="ddim_uniform")
    s = sampling.make_grid("euler", 3, pipe.noise_schedule, "ddim_uniform", pipe.scheduler_config).sigmas.tolist()
    assert s[0] < float(pipe.noise_schedule.sigma_max) * 0.99
    x = _prepare_noise((1, 4, 8, 8), 4)[0] * s[0]
    torch.testing.assert_close(out, x + (x - den0) / s[0] * (s[1] - s[0]), rtol=1e-4, atol=1e-4)


def test_comfyuis_ddim_inpaints_with_its_random_noise_from_seed_plus_one(emoji):
    """ComfyUI's ddim is Euler with inpaint_options "random": the known region is blended to latent + noise' *
    sigma, noise' drawn from torch.manual_seed(seed + 1) (it once followed the start noise, Euler's image)."""
    from sdengine.latent_sampling import sample_latents

    pipe, pos, neg = emoji
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.5
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., :, 32:] = 1
    seen = {}
    for sampler, m, lat in (("ddim", mask, latent), ("ddim", None, None)):
        if lat is None:  # the unmasked run whose network input is the masked run's: the known region shifted
            s0 = sampling.make_grid("euler", 3, pipe.noise_schedule, "uniform", pipe.scheduler_config).sigmas[0].item()
            keep = (torch.nn.functional.interpolate(mask, size=(8, 8)) < 0.5).float()
            noise, rnd = _prepare_noise((1, 4, 8, 8), 4)[0], _prepare_noise((1, 4, 8, 8), 5)[0]
            lat = latent + (rnd * s0 - noise * math.sqrt(1 + s0**2)) * keep
        got = []
        with torch.inference_mode():
            sample_latents(
                pipe, [pos], [neg], lat, seed=4, steps=3, cfg=3.0, sampler=sampler, schedule="uniform",
                noise_mask=m, end_at_step=1, leftover_noise=True, callback=lambda r, got=got: got.append(r.denoised),
            )  # fmt: skip
        seen[m is None] = got[0].cpu()
    torch.testing.assert_close(seen[False], seen[True], rtol=0, atol=5e-4)
