"""The samplers and schedules diffusers does not have (A1111's / ComfyUI's): DPM++ 2S a, DPM++ 3M SDE, and the
sigma-table schedules simple, ddim_uniform, beta, kl_optimal, align_your_steps, uniform, polyexponential.

Each is checked against an independent float64 recomputation of its published formula made here (k-diffusion's
sampler update in its own exp/expm1 form, the schedules from a float64 training table with numpy, the Beta
quantiles with mpmath), plus the name resolution the CLI, the Python API and the servers share.
"""

import math

import mpmath
import numpy as np
import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule, beta_ppf
from sdengine.errors import UsageError

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading"}
MU, STD = 0.3, 0.5


def _table() -> np.ndarray:
    """The SD training sigmas, float64 from scratch (ComfyUI's ModelSamplingDiscrete builds them in float64)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    return np.sqrt((1 - ac) / ac)


def _grid(schedule, steps, sampler="euler"):
    ns = NoiseSchedule.from_config(**SD)
    return sampling.make_grid(sampler, steps, ns, schedule, SD)


def _close(a, b, rtol=2e-5):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("steps", [1, 4, 7, 20, 30])
def test_simple_takes_every_T_over_n_th_table_sigma_from_the_top(steps):
    table = _table()
    idx = [999 - int(i * 1000 / steps) for i in range(steps)]
    g = _grid("simple", steps)
    _close(g.sigmas, [*table[idx], 0.0])
    _close(g.timesteps, idx, rtol=1e-6)  # the network sees the table's own timesteps


@pytest.mark.parametrize("steps", [1, 7, 10, 20, 30])
def test_ddim_uniform_skips_T_over_n_from_timestep_1_like_comfyui(steps):
    table = _table()
    idx = list(range(1, 1000, max(1000 // steps, 1)))[::-1]
    g = _grid("ddim_uniform", steps)
    _close(g.sigmas, [*table[idx], 0.0])
    assert g.steps == len(idx)  # 31 at 30 steps, as ComfyUI (1000 // 30 = 33 does not divide 1000)


def _mp_beta_ppf(q, a, b):
    if q <= 0 or q >= 1:
        return float(q > 0)
    f = lambda x: mpmath.betainc(a, b, 0, x, regularized=True) - q  # noqa: E731
    return float(mpmath.findroot(f, (mpmath.mpf("1e-30"), 1 - mpmath.mpf("1e-30")), solver="anderson"))


@pytest.mark.parametrize("q", [0.0, 1e-9, 0.013, 0.25, 0.5, 0.77, 0.9999, 1.0])
def test_beta_quantile_matches_mpmath(q):
    assert beta_ppf(q, 0.6, 0.6) == pytest.approx(_mp_beta_ppf(q, 0.6, 0.6), abs=1e-12)
    assert beta_ppf(q, 2.0, 0.7) == pytest.approx(_mp_beta_ppf(q, 2.0, 0.7), abs=1e-12)


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_beta_schedule_is_comfyuis_beta_0_6_quantiles_of_the_timesteps(steps):
    table = _table()
    ts = [int(np.rint(_mp_beta_ppf(1 - i / steps, 0.6, 0.6) * 999)) for i in range(steps)]
    ts = [t for k, t in enumerate(ts) if k == 0 or t != ts[k - 1]]
    g = _grid("beta", steps)
    _close(g.sigmas, [*table[ts], 0.0])
    _close(g.timesteps, ts, rtol=1e-6)


@pytest.mark.parametrize("steps", [1, 2, 10, 16])
def test_kl_optimal_is_even_in_arctan_sigma(steps):
    table = _table()
    w = np.arange(steps) / max(steps - 1, 1)
    ref = np.tan(w * np.arctan(table[0]) + (1 - w) * np.arctan(table[-1]))
    _close(_grid("kl_optimal", steps).sigmas, [*ref, 0.0])


AYS_SD1 = [14.6146412293, 6.4745760956, 3.8636745985, 2.6946151520, 1.8841921177, 1.3943805092]
AYS_SD1 += [0.9642583904, 0.6523686016, 0.3977456272, 0.1515232662, 0.0291671582]
AYS_XL = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141]
AYS_XL += [0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582]


def _ays(levels, steps):
    """NVIDIA's how-to: log-linear interpolation of the 10-step levels onto steps + 1 points; ComfyUI ends at 0."""
    xs = np.linspace(0, 1, len(levels))
    ys = np.log(levels[::-1])
    out = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, ys))[::-1].copy()
    out[-1] = 0.0
    return out


@pytest.mark.parametrize("steps", [4, 10, 11, 25])
def test_align_your_steps_interpolates_the_papers_levels_in_log_sigma(steps):
    _close(_grid("align_your_steps", steps).sigmas, _ays(AYS_SD1, steps))
    _close(_grid("align_your_steps_sdxl", steps).sigmas, _ays(AYS_XL, steps))


def test_align_your_steps_at_10_steps_is_the_table_itself():
    _close(_grid("Align Your Steps", 10).sigmas[:-1], AYS_SD1[:-1])


def test_uniform_and_polyexponential_are_a1111s():
    table = _table()
    lt = np.log(table)
    t = np.linspace(999, 0, 9)
    lo, hi = np.floor(t).astype(int), np.ceil(t).astype(int)
    uniform = np.exp((1 - (t - lo)) * lt[lo] + (t - lo) * lt[hi])  # k-diffusion's DiscreteSchedule.get_sigmas
    _close(_grid("Uniform", 9).sigmas, [*uniform, 0.0])
    ramp = np.linspace(1, 0, 9)
    poly = np.exp(ramp * (lt[-1] - lt[0]) + lt[0])
    _close(_grid("polyexponential", 9).sigmas, [*poly, 0.0])


# ------------------------------------------------------------------------------------------ names


@pytest.mark.parametrize(
    "sampler,schedule,expected",
    [
        ("DPM++ 2S a", "Karras", ("dpmpp_2s_a", "karras")),
        ("DPM++ 2S a Karras", None, ("dpmpp_2s_a", "karras")),
        ("DPM++ 3M SDE", "Exponential", ("dpmpp_3m_sde", "exponential")),
        ("DPM++ 3M SDE Karras", None, ("dpmpp_3m_sde", "karras")),
        ("DPM++ 2M SDE Heun", "Exponential", ("dpmpp_2m_sde_heun", "exponential")),
        ("Restart", None, ("restart", "normal")),
        ("k_restart", "Karras", ("restart", "karras")),
        ("k_dpmpp_2s_a", "simple", ("dpmpp_2s_a", "simple")),
        ("k_dpmpp_3m_sde", "Beta", ("dpmpp_3m_sde", "beta")),
        ("Euler", "Simple", ("euler", "simple")),
        ("Euler", "DDIM", ("euler", "ddim_uniform")),  # A1111's "DDIM" schedule type
        ("Euler", "ddim_uniform", ("euler", "ddim_uniform")),  # ComfyUI's name
        ("Euler", "KL Optimal", ("euler", "kl_optimal")),
        ("Euler", "Align Your Steps", ("euler", "align_your_steps")),
        ("Euler", "sgmuniform", ("euler", "sgm_uniform")),  # A1111's alias
        ("DPM++ 2M", "Polyexponential", ("dpmpp_2m", "polyexponential")),
    ],
)
def test_a1111_and_comfyui_names_resolve(sampler, schedule, expected):
    assert sampling.resolve(sampler, schedule) == expected


def test_align_your_steps_takes_the_sdxl_table_on_an_sdxl_model():
    assert sampling.resolve("Euler", "Align Your Steps", sdxl=True) == ("euler", "align_your_steps_sdxl")
    assert sampling.resolve("Euler", "Align Your Steps", sdxl=False) == ("euler", "align_your_steps")


def test_infotext_writes_the_a1111_names():
    from sdengine.metadata import format_parameters, parse_parameters, to_generate_kwargs

    text = format_parameters({"prompt": "p", "steps": 9, "sampler": "dpmpp_2s_a", "schedule": "align_your_steps"})
    assert "Sampler: DPM++ 2S a, Schedule type: Align Your Steps," in text
    kw = to_generate_kwargs(parse_parameters(text))
    assert (kw["sampler"], kw["schedule"]) == ("dpmpp_2s_a", "align_your_steps")
    text = format_parameters({"prompt": "p", "steps": 9, "sampler": "DPM++ 3M SDE", "schedule": "ddim_uniform"})
    assert "Sampler: DPM++ 3M SDE, Schedule type: DDIM," in text


def test_comfyui_ksampler_offers_the_new_names():
    from sdengine.server.comfy.nodes import SAMPLER_NAMES, SCHEDULER_NAMES

    for comfy, ours in {**SAMPLER_NAMES, **{f"s:{k}": v for k, v in SCHEDULER_NAMES.items()}}.items():
        if comfy.startswith("s:"):
            assert sampling.resolve("euler", ours)[1] == ours
        else:
            assert ours in sampling.SAMPLERS
    assert SAMPLER_NAMES["dpmpp_2s_ancestral"] == "dpmpp_2s_a" and SAMPLER_NAMES["dpmpp_3m_sde_gpu"] == "dpmpp_3m_sde"
    assert SAMPLER_NAMES["dpmpp_2m_sde_heun"] == "dpmpp_2m_sde_heun" and SAMPLER_NAMES["ipndm"] == "ipndm"
    assert {"simple", "ddim_uniform", "beta", "kl_optimal"} <= set(SCHEDULER_NAMES)


def test_an_unknown_schedule_suggests_the_closest_in_one_line():
    with pytest.raises(UsageError, match="unknown schedule 'Beta2'; did you mean 'beta' .*list schedules") as info:
        sampling.resolve("euler", "Beta2")
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------------ samplers


def _den(x, sigma, **_):
    """Exact x0-denoiser of N(MU, STD^2) data."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


def _noises(seeds, shape, k):
    """k per-step draws, each row from its own generator in step order (docs/CONTRACTS.md, Seeds)."""
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return [torch.cat([torch.randn((1, *shape), generator=g) for g in gens]).double() for _ in range(k)]


def _ref_2s_a(x, sigmas, noises, eta=1.0):
    """k-diffusion's sample_dpmpp_2s_ancestral in its own form (t = -log sigma, exp/expm1), float64."""
    x, it = x.double(), iter(noises)
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        den = _den(x, torch.tensor([s]))
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5)
        down = (s_next**2 - up**2) ** 0.5
        if down == 0:
            x = x + (x - den) / s * (down - s)
        else:
            t, t_next = -math.log(s), -math.log(down)
            h = t_next - t
            mid = t + h / 2
            x_2 = (math.exp(-mid) / math.exp(-t)) * x - math.expm1(-h / 2) * den
            den_2 = _den(x_2, torch.tensor([math.exp(-mid)]))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * den_2
        if s_next > 0:
            x = x + next(it) * up
    return x


def _ref_3m_sde(x, sigmas, noises, eta=1.0):
    """k-diffusion's sample_dpmpp_3m_sde in its own form, float64."""
    x, it = x.double(), iter(noises)
    d1 = d2 = None
    h = h1 = h2 = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        den = _den(x, torch.tensor([s]))
        if s_next == 0:
            x = den
        else:
            h = -math.log(s_next) + math.log(s)
            he = h * (eta + 1)
            x = math.exp(-he) * x - math.expm1(-he) * den
            phi2 = math.expm1(-he) / he + 1
            if h2 is not None:
                r0, r1 = h1 / h, h2 / h
                a = (den - d1) / r0
                b = (d1 - d2) / r1
                x = x + phi2 * (a + (a - b) * r0 / (r0 + r1)) - (phi2 / he - 0.5) * ((a - b) / (r0 + r1))
            elif h1 is not None:
                x = x + phi2 * (den - d1) / (h1 / h)
            if eta:
                x = x + next(it) * s_next * math.sqrt(-math.expm1(-2 * h * eta))
        d1, d2 = den, d1
        h1, h2 = h, h1
    return x


def _ref_2m_sde_heun(x, sigmas, noises, eta=1.0):
    """k-diffusion's sample_dpmpp_2m_sde with solver_type="heun", in its own form, float64."""
    x, it = x.double(), iter(noises)
    old = None
    h_last = None
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        den = _den(x, torch.tensor([s]))
        if s_next == 0:
            x = den
        else:
            h = -math.log(s_next) + math.log(s)
            eta_h = eta * h
            x = s_next / s * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * den
            if old is not None:
                r = h_last / h
                x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (den - old)
            if eta:
                x = x + next(it) * s_next * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = den
    return x


@pytest.mark.parametrize("schedule", ["karras", "simple", "align_your_steps"])
@pytest.mark.parametrize(
    ("name", "ref"),
    [("dpmpp_2s_a", _ref_2s_a), ("dpmpp_3m_sde", _ref_3m_sde), ("dpmpp_2m_sde_heun", _ref_2m_sde_heun)],
)
def test_new_samplers_match_the_float64_reference(name, ref, schedule):
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid(name, 8, ns, schedule, SD)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * float(grid.sigmas[0])
    seeds = (11, 12)
    out = S.SAMPLERS[name](_den, x, grid.sigmas, generators=[torch.Generator().manual_seed(s) for s in seeds])
    expected = ref(x, grid.sigmas.double(), _noises(seeds, (3, 4, 4), 8))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert (out - _den(x, grid.sigmas[:1].expand(2))).abs().max() > 1e-2  # it moved


def test_3m_sde_with_eta_0_is_deterministic_and_third_order_accurate():
    """With eta 0 the probability-flow ODE of Gaussian data has the exact end point MU + STD / sqrt(STD^2 +
    sigma_max^2) (x - MU): DPM++ 3M gets much closer to it than DPM++ 2M on the same grid, and draws nothing."""
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid("dpmpp_3m_sde", 12, ns, "karras", SD)
    s0 = float(grid.sigmas[0])
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * s0
    exact = MU + STD / math.sqrt(STD**2 + s0**2) * (x - MU)
    ours = S.sample_dpmpp_3m_sde(_den, x, grid.sigmas.double(), eta=0.0)  # no generators: must draw no noise
    torch.testing.assert_close(ours, _ref_3m_sde(x, grid.sigmas.double(), [], eta=0.0), rtol=0, atol=1e-10)
    err_3m = (ours - exact).abs().max().item()
    err_2m = (S.sample_dpmpp_2m(_den, x, grid.sigmas.double()) - exact).abs().max().item()
    assert err_3m < err_2m / 3


@pytest.mark.parametrize("name", ["dpmpp_2s_a", "dpmpp_3m_sde", "dpmpp_2m_sde_heun", "restart"])
def test_a_row_is_the_same_alone_or_in_a_batch_and_seeds_repeat(name):
    ns = NoiseSchedule.from_config(**SD)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    kw = dict(
        sampler=name, steps=22 if name == "restart" else 5, schedule="beta", scheduler_config=SD, noise_schedule=ns
    )
    both = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    again = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    alone = sampling.sample(_den, noise[1:2], generators=[torch.Generator().manual_seed(2)], **kw)
    assert torch.equal(both, again)
    torch.testing.assert_close(both[1:2], alone, rtol=0, atol=1e-6)
    other = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (4, 5, 6)], **kw)
    assert (other - both).abs().max() > 1e-3  # the per-step noise does come from the generators


@pytest.mark.parametrize("schedule", ["ddim_uniform", "beta", "kl_optimal", "align_your_steps"])
def test_img2img_on_a_sigma_table_schedule_runs_its_last_steps(schedule):
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid("euler", 30, ns, schedule, SD)
    seen = []
    init = torch.zeros(1, 1, 4, 4)
    sampling.sample(
        _den,
        torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)),
        sampler="euler",
        steps=30,
        schedule=schedule,
        scheduler_config=SD,
        noise_schedule=ns,
        init_latent=init,
        strength=0.5,
        callback=lambda i, sigma, x, d: seen.append(sigma),
    )
    assert len(seen) == grid.steps // 2 and seen[-1] == pytest.approx(float(grid.sigmas[-2]))


@pytest.mark.parametrize("seed_rule", ["comfyui", "sdengine"])
def test_comfyui_denoise_on_a_longer_ddim_uniform_list_runs_its_last_steps(seed_rule):
    """ComfyUI's KSampler at denoise d takes the last steps + 1 sigmas of the int(steps / d)-step list; ddim_uniform
    at 14 steps is a list of 15 (1000 // 14 does not divide 1000), so 7 steps at 0.5 run its last 7, reported as
    7 of 7 (the run once went one step further than it reported)."""
    from _live_server import shared_loader
    from sdengine.latent_sampling import encode_text, sample_latents

    pipe = shared_loader("emoji", "cpu")
    reports = []
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        out = sample_latents(
            pipe,
            [encode_text(pipe, "a star")],
            [encode_text(pipe, "")],
            latent,
            seed=1,
            steps=7,
            cfg=3.0,
            sampler="euler",
            schedule="ddim_uniform",
            denoise=0.5,
            seed_rule=seed_rule,
            callback=lambda r: reports.append((r.step, r.steps)),
        )
    ns = pipe.noise_schedule
    n = sampling.make_grid("euler", 7 if seed_rule == "sdengine" else 14, ns, "ddim_uniform", pipe.scheduler_config)
    runs = n.steps // 2 if seed_rule == "sdengine" else 7  # 8 // 2 of the 8-step list, or ComfyUI's last 7
    assert reports == [(i + 1, runs) for i in range(runs)]
    assert torch.isfinite(out).all()


def _ref_restart(x, sigmas, seeds, s_noise=1.0):
    """A1111's restart_sampler (sd_samplers_extra.py) recomputed: its restart list, its Karras grids, its Heun
    steps and its re-noising, float64 (the Karras grids in float32 as k-diffusion makes them)."""

    def karras(n, lo, hi):
        ramp = torch.linspace(0, 1, n)
        return torch.cat([(hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7, torch.zeros(1)])

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    steps = len(sigmas) - 1
    restart = {}
    if steps >= 20:
        rs, rt = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras(steps - rs * rt, float(sigmas[-2]), float(sigmas[0]))
        restart = {int(torch.argmin((sigmas - 0.1).abs())): (rs + 1, rt, 2.0)}
    todo = []
    for i in range(len(sigmas) - 1):
        todo.append((float(sigmas[i]), float(sigmas[i + 1])))
        if i + 1 in restart:
            n, times, top = restart[i + 1]
            hi_idx = int(torch.argmin((sigmas - top).abs()))
            if hi_idx < i + 1:
                again = karras(n, float(sigmas[i + 1]), float(sigmas[hi_idx]))[:-1].tolist()
                todo += list(zip(again[:-1], again[1:], strict=True)) * times
    x, last, calls = x.double(), None, 0
    for old, new in todo:
        if last is not None and last < old:
            z = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens]).double()
            x = x + z * s_noise * (old**2 - last**2) ** 0.5
        d = (x - _den(x, torch.tensor([old]))) / old
        calls += 1
        if new == 0:
            x = x + d * (new - old)
        else:
            x2 = x + d * (new - old)
            d2 = (x2 - _den(x2, torch.tensor([new]))) / new
            calls += 1
            x = x + (d + d2) / 2 * (new - old)
        last = new
    return x, len(todo), calls


@pytest.mark.parametrize("steps,schedule", [(8, "karras"), (20, "normal"), (24, "simple"), (40, "karras")])
def test_restart_matches_a1111s_restart_sampler(steps, schedule):
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid("restart", steps, ns, schedule, SD)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * float(grid.sigmas[0])
    calls, seen = [], []

    def den(z, sigma, **kw):
        calls.append(float(sigma[0]))
        return _den(z, sigma)

    out = S.sample_restart(
        den,
        x,
        grid.sigmas,
        generators=[torch.Generator().manual_seed(s) for s in (3, 4)],
        callback=lambda i, sigma, z, d: seen.append(i),
    )
    expected, n_steps, n_calls = _ref_restart(x, grid.sigmas.double(), (3, 4))
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    assert seen == list(range(steps)) == list(range(n_steps)) and len(calls) == n_calls
    assert (sampling.noise_draws(sampler="restart", steps=steps, noise_schedule=ns, schedule=schedule) > 0) == (
        steps >= 20
    )


def test_restart_cannot_hand_on_at_a_step():
    ns = NoiseSchedule.from_config(**SD)
    with pytest.raises(UsageError, match="end_step"):
        sampling.sample(
            _den,
            torch.zeros(1, 1, 2, 2),
            sampler="restart",
            steps=24,
            noise_schedule=ns,
            generators=[torch.Generator()],
            end_step=10,
        )


def _ref_ipndm(x, sigmas, max_order=4):
    """ComfyUI's sample_ipndm (from zju-pi/diff-sampler) in its own form, float64."""
    x_next, buf = x.double(), []
    for i in range(len(sigmas) - 1):
        t_cur, t_next, x_cur = float(sigmas[i]), float(sigmas[i + 1]), x_next
        den = _den(x_cur, torch.tensor([t_cur]))
        d_cur = (x_cur - den) / t_cur
        order = min(max_order, i + 1)
        if t_next == 0:
            x_next = den
        elif order == 1:
            x_next = x_cur + (t_next - t_cur) * d_cur
        elif order == 2:
            x_next = x_cur + (t_next - t_cur) * (3 * d_cur - buf[-1]) / 2
        elif order == 3:
            x_next = x_cur + (t_next - t_cur) * (23 * d_cur - 16 * buf[-1] + 5 * buf[-2]) / 12
        else:
            x_next = x_cur + (t_next - t_cur) * (55 * d_cur - 59 * buf[-1] + 37 * buf[-2] - 9 * buf[-3]) / 24
        if len(buf) == max_order - 1:
            buf = [*buf[1:], d_cur] if max_order > 1 else buf
        else:
            buf.append(d_cur)
    return x_next


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
@pytest.mark.parametrize("schedule", ["karras", "kl_optimal"])
def test_ipndm_matches_comfyuis(max_order, schedule):
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid("ipndm", 9, ns, schedule, SD)
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * float(grid.sigmas[0])
    out = S.sample_ipndm(_den, x, grid.sigmas, max_order=max_order)
    torch.testing.assert_close(out.double(), _ref_ipndm(x, grid.sigmas.double(), max_order), rtol=1e-4, atol=1e-4)


def test_ipndm_refuses_an_order_it_has_no_weights_for():
    with pytest.raises(UsageError, match="max_order must be 1 to 4, got 5"):
        S.sample_ipndm(_den, torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 0.0]), max_order=5)


@pytest.mark.parametrize("schedule", ["simple", "beta", "align_your_steps"])
def test_lcm_walks_a_sigma_list_with_its_consistency_boundary(schedule):
    """ComfyUI's KSampler lcm + simple / beta / ... (once refused): LCM's jump to x0 and re-noise along the list,
    its boundary condition taken at each sigma's own timestep (diffusers' LCMScheduler formula)."""
    ns = NoiseSchedule.from_config(**SD)
    grid = sampling.make_grid("lcm", 4, ns, schedule, SD)
    noise = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    gens = [torch.Generator().manual_seed(9)]
    kw = dict(sampler="lcm", steps=4, schedule=schedule, scheduler_config=SD, noise_schedule=ns)
    out = sampling.sample(_den, noise, generators=gens, **kw)
    x = (noise * math.sqrt(float(grid.sigmas[0]) ** 2 + 1)).double()  # diffusers' VP start: the noise itself
    draws = iter(_noises((9,), (1, 4, 4), 3))
    for i in range(4):
        s, t = float(grid.sigmas[i]), float(grid.timesteps[i]) * 10.0
        c_skip, c_out = 0.25 / (t**2 + 0.25), t / math.sqrt(t**2 + 0.25)
        x = c_out * _den(x, torch.tensor([s])) + c_skip * x / math.sqrt(1 + s**2)
        if i < 3:
            x = x + next(draws) * float(grid.sigmas[i + 1])
    torch.testing.assert_close(out.double(), x, rtol=1e-4, atol=1e-4)
    assert sampling.resolve("lcm", "auto") == ("lcm", "normal")  # no schedule chosen: still LCM's own grid


def test_diffusers_equivalent_says_diffusers_has_none():
    with pytest.raises(UsageError, match=r"diffusers has no DPM\+\+ 3M SDE sampler \(dpmpp_3m_sde\)"):
        sampling.diffusers_equivalent("DPM++ 3M SDE", "karras")


def test_the_sdxl_align_your_steps_table_chosen_on_another_model_is_read_back_as_itself():
    """On an SD 1.x model the two Align Your Steps tables make two images: each infotext names its own, so
    reusing it (--from-png) walks the same table again (A1111's one label is the model's own table)."""
    from sdengine.metadata import format_parameters, parse_parameters, to_generate_kwargs

    labels = {}
    for schedule in ("align_your_steps", "align_your_steps_sdxl"):
        written = sampling.infotext_schedule(schedule, sdxl=False)
        text = format_parameters({"prompt": "p", "steps": 9, "sampler": "euler", "schedule": written})
        labels[schedule] = parse_parameters(text)["Schedule type"]
        assert to_generate_kwargs(parse_parameters(text))["schedule"] == schedule
    assert labels == {"align_your_steps": "Align Your Steps", "align_your_steps_sdxl": "Align Your Steps SDXL"}


def test_the_sdxl_align_your_steps_table_is_written_with_a1111s_label_on_an_sdxl_model():
    written = sampling.infotext_schedule("align_your_steps_sdxl", sdxl=True)
    assert sampling.SCHEDULE_A1111[written] == "Align Your Steps"
    assert sampling.resolve("Euler", sampling.SCHEDULE_A1111[written], sdxl=True)[1] == "align_your_steps_sdxl"


def test_every_schedule_has_its_own_infotext_label():
    labels = [sampling.SCHEDULE_A1111[s] for s in sampling.SCHEDULES]
    assert len(set(labels)) == len(labels)
    for schedule in sampling.SCHEDULES:
        assert sampling.resolve("euler", sampling.SCHEDULE_A1111[schedule])[1] == schedule
