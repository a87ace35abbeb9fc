"""Samplers against diffusers' schedulers: single steps, whole trajectories (parity), and bad inputs.

The parity harness (tests/_sampler_parity.py) explains how both loops get the same network and the
same step noise. Fast subset here: every sampler on an SD-1.x config (leading spacing, steps_offset 1,
set_alpha_to_one False), epsilon and v_prediction, with each schedule diffusers offers for it, at 6
steps on (2, 3, 4, 4). The spacing x prediction matrix is in test_samplers_slow.py (@slow).
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from _sampler_parity import SD_CONFIG, TinyNet, gens, ours, start_noise, theirs
from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.schedules import NoiseSchedule, img2img_start

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

TOL = 1e-4  # max abs, fp32; observed <= 5e-5 on outputs of magnitude up to ~85 (see the report)

CASES = [(name, sched) for name, spec in sampling.SAMPLERS.items() for sched in spec.parity_schedules]


@pytest.mark.parametrize("sampler,schedule", CASES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_trajectory_matches_diffusers(sampler, schedule, prediction):
    net, noise = TinyNet(), start_noise()
    a = ours(sampler, schedule, 6, SD_CONFIG, prediction, net, noise)
    b = theirs(sampler, schedule, 6, SD_CONFIG, prediction, net, noise)
    assert (a - b).abs().max().item() < TOL


def test_ddim_with_eta_matches_diffusers():
    net, noise = TinyNet(), start_noise()
    a = ours("ddim", "normal", 6, SD_CONFIG, "epsilon", net, noise, eta=0.7)
    b = theirs("ddim", "normal", 6, SD_CONFIG, "epsilon", net, noise, eta=0.7)
    assert (a - b).abs().max().item() < TOL
    c = ours("ddim", "normal", 6, SD_CONFIG, "epsilon", net, noise)
    assert (a - c).abs().max().item() > 1e-2  # eta really adds noise


# --------------------------------------------------------------------------------------------------
# Single steps: one DDPM and one DDIM step from the same model output and noise
# --------------------------------------------------------------------------------------------------


def _one_step_setup(prediction):
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    g = torch.Generator().manual_seed(5)
    x_vp = torch.randn(2, 3, 4, 4, generator=g)
    out = torch.randn(2, 3, 4, 4, generator=g)
    return ns, x_vp, out


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_one_ddpm_step_matches_diffusers(prediction):
    ns, x_vp, out = _one_step_setup(prediction)
    ref = DDPMScheduler.from_config({**SD_CONFIG, "prediction_type": prediction})
    ref.set_timesteps(10)
    t, t_prev = int(ref.timesteps[2]), int(ref.timesteps[3])
    expected = ref.step(out, t, x_vp, generator=gens()).prev_sample
    den = Denoiser(lambda x, tt: out, ns, prediction)
    s, s_prev = float(ns.sigmas[t]), float(ns.sigmas[t_prev])
    got = S.sample_ddpm(den, x_vp * (1 + s**2) ** 0.5, torch.tensor([s, s_prev]), generators=gens())
    torch.testing.assert_close(got / (1 + s_prev**2) ** 0.5, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_one_ddim_step_matches_diffusers(eta, prediction):
    ns, x_vp, out = _one_step_setup(prediction)
    ref = DDIMScheduler.from_config({**SD_CONFIG, "prediction_type": prediction})
    ref.set_timesteps(10)
    t = int(ref.timesteps[4])
    # diffusers draws (1, C, H, W) per row from a list of generators, exactly as we do
    expected = ref.step(out, t, x_vp, eta=eta, generator=gens()).prev_sample
    den = Denoiser(lambda x, tt: out, ns, prediction)
    s, s_prev = float(ns.sigmas[t]), float(ns.sigmas[t - 100])
    got = S.sample_ddim(den, x_vp * (1 + s**2) ** 0.5, torch.tensor([s, s_prev]), eta=eta, generators=gens())
    torch.testing.assert_close(got / (1 + s_prev**2) ** 0.5, expected, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# Seeds, callbacks, img2img
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde", "ddpm", "lcm", "dpm2_a"])
def test_a_row_does_not_depend_on_its_batch(sampler):
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    den = Denoiser(TinyNet(), ns)
    noise = start_noise()
    both = sampling.sample(den, noise, sampler=sampler, steps=4, scheduler_config=SD_CONFIG, generators=gens())
    second = sampling.sample(
        den,
        noise[1:],
        sampler=sampler,
        steps=4,
        scheduler_config=SD_CONFIG,
        generators=[torch.Generator().manual_seed(1234 + 1)],
    )
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-5)


def test_callback_sees_every_step_and_can_stop():
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    den = Denoiser(TinyNet(), ns)
    seen = []
    sampling.sample(
        den,
        start_noise(),
        sampler="heun",
        steps=5,
        scheduler_config=SD_CONFIG,
        callback=lambda i, s, x, d: seen.append((i, s)),
    )
    assert [i for i, _ in seen] == [0, 1, 2, 3, 4]
    assert all(a[1] > b[1] for a, b in zip(seen, seen[1:], strict=False))
    with pytest.raises(S.SamplingInterrupted) as info:
        sampling.sample(
            den, start_noise(), sampler="euler", steps=5, scheduler_config=SD_CONFIG, callback=lambda i, s, x, d: i < 2
        )
    assert info.value.step == 2 and info.value.denoised.shape == (2, 3, 4, 4)


def test_img2img_runs_the_steps_diffusers_runs():
    assert img2img_start(10, 0.75) == 3 and img2img_start(10, 1.0) == 0 and img2img_start(4, 0.3) == 3
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    calls = []
    den = Denoiser(lambda x, t: (calls.append(float(t[0])), x * 0)[1], ns)
    init = torch.zeros(2, 3, 4, 4)
    sampling.sample(
        den, start_noise(), sampler="euler", steps=10, scheduler_config=SD_CONFIG, init_latent=init, strength=0.75
    )
    ref = DDIMScheduler.from_config(SD_CONFIG)
    ref.set_timesteps(10)
    assert calls == [float(t) for t in ref.timesteps[3:]]  # 7 steps from t=601


# --------------------------------------------------------------------------------------------------
# Names and validation
# --------------------------------------------------------------------------------------------------


def test_a1111_k_aliases_and_the_auto_schedule_in_any_case():
    """``k_euler_a`` (A1111's k-diffusion aliases, in older scripts) and ``--schedule AUTO`` were refused."""
    from sdengine.errors import UsageError

    assert sampling.resolve("k_euler_a") == ("euler_a", "normal")
    assert sampling.resolve("K_DPMPP_2M", "karras") == ("dpmpp_2m", "karras")
    assert sampling.resolve("dpmpp_2m", "AUTO") == sampling.resolve("dpmpp_2m", "auto") == ("dpmpp_2m", "karras")
    with pytest.raises(UsageError, match="unknown sampler 'k_nope'"):
        sampling.resolve("k_nope")


def test_name_table_resolves_a1111_names():
    assert sampling.resolve("DPM++ 2M Karras") == ("dpmpp_2m", "karras")
    assert sampling.resolve("Euler a") == ("euler_a", "normal")
    assert sampling.resolve("DPM++ 2M", "Karras") == ("dpmpp_2m", "karras")
    assert sampling.resolve("euler", "Automatic") == ("euler", "uniform")  # A1111's: k-diffusion's get_sigmas
    assert sampling.resolve("lcm", "sgm_uniform") == ("lcm", "sgm_uniform")
    assert sampling.diffusers_equivalent("plms")[0] == "PNDMScheduler"
    assert sampling.diffusers_equivalent("dpmpp_2m_sde")[1]["algorithm_type"] == "sde-dpmsolver++"


def test_default_schedule_fits_the_sampler_and_an_explicit_one_wins_or_is_refused():
    from sdengine.pipeline import GenerationRequest

    default = GenerationRequest.defaults()["schedule"]
    # no schedule chosen: karras where the sampler takes it, else the sampler's own; an A1111 name's own
    assert sampling.resolve("dpmpp_2m", default) == ("dpmpp_2m", "karras")
    assert sampling.resolve("lcm", default) == ("lcm", "normal")
    assert sampling.resolve("plms", default) == ("plms", "normal")
    assert sampling.resolve("DPM++ 2M Karras", default) == ("dpmpp_2m", "karras")
    GenerationRequest(sampler="lcm").validate()  # was: "cannot use schedule 'karras'" though none was chosen
    # an explicit choice is used, or refused with the reason
    assert sampling.resolve("lcm", "sgm_uniform") == ("lcm", "sgm_uniform")
    with pytest.raises(ValueError, match="sampler 'DPM\\+\\+ 2M Karras' already names schedule 'karras'"):
        sampling.resolve("DPM++ 2M Karras", "normal")
    with pytest.raises(ValueError, match="cannot use schedule 'karras'"):
        sampling.resolve("lcm", "karras")


def _call(**kw):
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    args = dict(sampler="euler", steps=4, scheduler_config=SD_CONFIG, generators=gens())
    args.update(kw)
    calls = []
    den = Denoiser(lambda x, t: (calls.append(1), x)[1], ns)
    noise = args.pop("noise", start_noise())
    try:
        sampling.sample(den, noise, **args)
    finally:
        assert not calls, "validation must happen before any model call"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"sampler": "euler_b"}, "unknown sampler 'euler_b'; did you mean 'euler'"),
        ({"schedule": "cosine"}, r"unknown schedule 'cosine' \(`sdengine list schedules` lists all\)"),
        ({"steps": 0}, "steps must be an integer between 1 and 1000"),
        ({"steps": 1001}, "steps must be an integer between 1 and 1000"),
        ({"strength": 0.0, "init_latent": torch.zeros(2, 3, 4, 4)}, r"strength must be in \(0, 1\]"),
        ({"strength": 1.5, "init_latent": torch.zeros(2, 3, 4, 4)}, r"strength must be in \(0, 1\]"),
        ({"sampler": "lcm", "schedule": "karras"}, "sampler 'lcm' cannot use schedule 'karras'"),
        ({"sampler": "plms", "schedule": "exponential"}, "sampler 'plms' cannot use schedule 'exponential'"),
        ({"sampler": "DPM++ 2M Karras", "schedule": "exponential"}, "already names schedule 'karras'"),
        ({"sampler": "euler_a", "generators": None}, "draws noise each step"),
        ({"generators": [torch.Generator()]}, "one generator per batch row"),
        ({"init_latent": torch.zeros(1, 3, 4, 4)}, "init_latent shape"),
        ({"scheduler_config": {**SD_CONFIG, "timestep_spacing": "uniform"}}, "unknown timestep_spacing"),
    ],
)
def test_bad_input_is_a_one_line_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        _call(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name",  # not DPM adaptive: its draws depend on the steps it accepts (no recorded loop replays it)
    [n for n, spec in sampling.SAMPLERS.items() if spec.stochastic and n not in sampling.ADAPTIVE_SAMPLERS]
    + ["ddim", "heun"],
)
@pytest.mark.parametrize("img2img", [False, True])
def test_noise_drawn_beforehand_gives_the_same_sample_and_uses_the_generators_alike(name, img2img):
    """A NoiseBank holding sampling.noise_draws(...) draws, made in order by row_noise from the rows' generators,
    stands in for the generators exactly (what a sampling loop recorded as a CUDA graph reads); DDIM with an eta,
    Heun with churn."""
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    options = {"eta": 0.7} if name == "ddim" else {"s_churn": 3.0, "s_tmin": 0.5} if name == "heun" else None
    steps = 40 if name == "restart" else 7  # Restart draws noise only from 20 steps (its restarts)
    common = dict(
        sampler=name, steps=steps, noise_schedule=ns, scheduler_config=SD_CONFIG, sampler_options=options, strength=0.6
    )
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    init = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)) if img2img else None

    def den(z, sigma, **_):
        return z * 0.3 + 0.1

    live = [torch.Generator().manual_seed(s) for s in (1, 2)]
    expected = sampling.sample(den, x, generators=live, init_latent=init, **common)
    k = sampling.noise_draws(img2img=img2img, **common)
    before = [torch.Generator().manual_seed(s) for s in (1, 2)]
    bank = S.NoiseBank(torch.stack([S.row_noise(before, (3, 4, 4)) for _ in range(k)]), 2) if k else None
    got = sampling.sample(den, x, generators=bank, init_latent=init, **common)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert k > 0 and bank is not None and bank.used == k
    for a, b in zip(live, before, strict=True):  # the same number of draws from each row's generator
        assert torch.equal(a.get_state(), b.get_state())


def test_a_noise_bank_too_small_or_of_another_batch_is_refused_in_one_line():
    from sdengine.errors import UsageError

    ns = NoiseSchedule.from_config(**SD_CONFIG)
    x = torch.zeros(2, 1, 2, 2)
    k = sampling.noise_draws(sampler="euler_a", steps=4, noise_schedule=ns)
    assert k == 3  # the last step lands on sigma 0 and draws nothing
    short = S.NoiseBank(torch.zeros(k - 1, 2, 1, 2, 2), 2)
    with pytest.raises(UsageError, match="asked for noise draw 3 of a bank of 2"):
        sampling.sample(lambda z, s, **_: z * 0, x, sampler="euler_a", steps=4, noise_schedule=ns, generators=short)
    with pytest.raises(UsageError, match=r"noise bank of shape \(3, 1, 1, 2, 2\) for a batch of 2"):
        S.NoiseBank(torch.zeros(3, 1, 1, 2, 2), 2)


# --------------------------------------------------------------------------------------------------
# Churn and s_noise (k-diffusion's options, A1111's s_churn / s_tmin / s_tmax / s_noise)
# --------------------------------------------------------------------------------------------------


def _toy_denoiser(z, sigma, **_):
    return z * 0.3 + 0.1 * sigma.view(-1, 1, 1, 1) / (1 + sigma.view(-1, 1, 1, 1))


def _reference_churn(second_order, x, sigmas, gens, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. 2022 Algorithm 2 as k-diffusion's sample_euler / sample_heun / sample_dpm_2 write it."""
    n = len(sigmas) - 1
    for i in range(n):
        s, nxt = float(sigmas[i]), float(sigmas[i + 1])
        gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = s * (gamma + 1)
        if gamma > 0:
            eps = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in gens]) * s_noise
            x = x + eps * (s_hat**2 - s**2) ** 0.5
        d = (x - _toy_denoiser(x, torch.full((x.shape[0],), s_hat))) / s_hat
        if nxt == 0 or second_order is None:
            x = x + d * (nxt - s_hat)
        elif second_order == "heun":
            x2 = x + d * (nxt - s_hat)
            d2 = (x2 - _toy_denoiser(x2, torch.full((x.shape[0],), nxt))) / nxt
            x = x + (d + d2) / 2 * (nxt - s_hat)
        else:  # dpm2
            mid = math.exp((math.log(s_hat) + math.log(nxt)) / 2)
            x2 = x + d * (mid - s_hat)
            d2 = (x2 - _toy_denoiser(x2, torch.full((x.shape[0],), mid))) / mid
            x = x + d2 * (nxt - s_hat)
    return x


@pytest.mark.parametrize("name,order", [("euler", None), ("heun", "heun"), ("dpm2", "dpm2")])
def test_churn_is_karras_algorithm_2_as_k_diffusion_runs_it(name, order):
    fn = sampling.SAMPLERS[name].fn
    assert {"s_churn", "s_tmin", "s_tmax", "s_noise"} <= set(sampling.sampler_option_names(name))
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.3, 0.0])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 14.6
    plain = fn(_toy_denoiser, x, sigmas)
    assert torch.equal(fn(_toy_denoiser, x, sigmas, s_churn=0.0, s_noise=0.5), plain)  # no churn: the ODE step
    opts = dict(s_churn=1.5, s_tmin=0.5, s_tmax=10.0, s_noise=0.9)
    got = fn(_toy_denoiser, x, sigmas, generators=[torch.Generator().manual_seed(s) for s in (1, 2)], **opts)
    want = _reference_churn(order, x, sigmas, [torch.Generator().manual_seed(s) for s in (1, 2)], **opts)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)
    # noise is drawn only at the sigmas inside [s_tmin, s_tmax]: 6.0, 2.5, 0.9 here
    bank = S.NoiseBank(None, 2)
    fn(_toy_denoiser, x, sigmas, generators=bank, **opts)
    assert bank.used == 3


@pytest.mark.parametrize("name", ["dpm2_a", "dpmpp_sde", "dpmpp_2m_sde"])
def test_s_noise_scales_the_fresh_noise_of_the_ancestral_and_sde_samplers(name):
    assert "s_noise" in sampling.sampler_option_names(name)
    fn = sampling.SAMPLERS[name].fn
    sigmas = torch.tensor([14.6, 6.0, 2.5, 0.9, 0.0])
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(3)) * 14.6

    def run(seed=7, **options):
        return fn(_toy_denoiser, x, sigmas, generators=[torch.Generator().manual_seed(seed)], **options)

    assert torch.equal(run(s_noise=1.0), run())
    assert not torch.allclose(run(s_noise=0.5), run(), atol=1e-3)
    # s_noise 0: no fresh noise reaches the sample, whatever the seed
    assert torch.equal(run(seed=1, s_noise=0.0), run(seed=2, s_noise=0.0))
    assert not torch.allclose(run(seed=1), run(seed=2), atol=1e-3)


# --------------------------------------------------------------------------------------------------
# UniPC's bh1 variant (ComfyUI's uni_pc)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("schedule", ["normal", "karras"])
def test_unipc_bh1_matches_diffusers(order, schedule):
    """diffusers' UniPCMultistepScheduler(solver_type="bh1") step by step; its last step to sigma 0 divides by
    h = inf (B(h) = -h): NaN there, so the steps before it are compared (ours lands on x0)."""

    net, noise = TinyNet(), start_noise()
    ns = NoiseSchedule.from_config(**SD_CONFIG)
    seen = []
    out = sampling.sample(
        Denoiser(net, ns), noise, sampler="unipc", steps=6, schedule=schedule, scheduler_config=SD_CONFIG,
        sampler_options={"variant": "bh1", "order": order}, callback=lambda i, s, x, d: seen.append(x),
    )  # fmt: skip
    assert torch.isfinite(out).all()
    grid = sampling.make_grid("unipc", 6, ns, schedule, SD_CONFIG)
    cls, kw = sampling.diffusers_equivalent("unipc", schedule, SD_CONFIG)
    ref = getattr(__import__("diffusers"), cls).from_config({**kw, "solver_type": "bh1", "solver_order": order})
    ref.set_timesteps(6)
    x = noise * ref.init_noise_sigma
    bh2 = []
    sampling.sample(
        Denoiser(net, ns), noise, sampler="unipc", steps=6, schedule=schedule, scheduler_config=SD_CONFIG,
        sampler_options={"order": order}, callback=lambda i, s, xx, d: bh2.append(xx),
    )  # fmt: skip
    for k, t in enumerate(ref.timesteps[:-1]):
        x = ref.step(net(ref.scale_model_input(x, t), t.expand(x.shape[0])), t, x).prev_sample
        ve = float(grid.sigmas[k + 1])
        assert (seen[k] / math.sqrt(1 + ve**2) - x).abs().max().item() < 1e-4
    assert (seen[3] - bh2[3]).abs().max() > 1e-3  # the variants differ
