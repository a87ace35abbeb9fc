"""k-diffusion's DPM-Solver samplers, A1111's "DPM fast" and "DPM adaptive" (Lu et al. 2022, DPM-Solver-1/2/3 in
the eps form, fixed or adaptive steps in t = -log sigma).

Each is checked against an independent float64 recomputation of k-diffusion's DPMSolver written here in its own
form (eps, t, exp/expm1, one whole-batch tensor), on Gaussian data with its exact denoiser, plus the seed contract
(a row alone equals the row in a batch) and the names the CLI, the Python API and the servers share.
"""

import math

import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.errors import UsageError

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "leading"}
MU, STD = 0.3, 0.5


def _den(x, sigma, **_):
    """Exact x0-denoiser of N(MU, STD^2) data; ``sigma`` one value or one per row."""
    s = torch.as_tensor(sigma).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


class _Ref:
    """k-diffusion's DPMSolver (eps form), float64, noise from the given per-step draws."""

    def __init__(self):
        self.calls = 0

    def eps(self, x, t):
        self.calls += 1
        sigma = math.exp(-t)
        return (x - _den(x, torch.tensor([sigma], dtype=torch.float64))) / sigma

    def step(self, x, t, tn, order, r1=0.5):
        h = tn - t
        e = self.eps(x, t)
        sig = lambda v: math.exp(-v)  # noqa: E731
        if order == 1:
            return x - sig(tn) * math.expm1(h) * e
        if order == 2:
            s1 = t + r1 * h
            e1 = self.eps(x - sig(s1) * math.expm1(r1 * h) * e, s1)
            return x - sig(tn) * math.expm1(h) * e - sig(tn) / (2 * r1) * math.expm1(h) * (e1 - e)
        s1, s2 = t + h / 3, t + 2 * h / 3
        e1 = self.eps(x - sig(s1) * math.expm1(h / 3) * e, s1)
        phi = math.expm1(2 * h / 3) / (2 * h / 3) - 1
        u2 = x - sig(s2) * math.expm1(2 * h / 3) * e - sig(s2) * 2 * phi * (e1 - e)
        e2 = self.eps(u2, s2)
        return x - sig(tn) * math.expm1(h) * e - sig(tn) / (2 / 3) * (math.expm1(h) / h - 1) * (e2 - e)


def _ancestral(t, tn, t_end, eta):
    s, sn = math.exp(-t), math.exp(-tn)
    up = min(sn, eta * math.sqrt(sn**2 * (s**2 - sn**2) / s**2))
    down = math.sqrt(sn**2 - up**2)
    tn_ = min(t_end, -math.log(down))
    return tn_, math.sqrt(sn**2 - math.exp(-tn_) ** 2)


def _ref_fast(x, sigma_min, sigma_max, nfe, noises, eta):
    ref, it = _Ref(), iter(noises)
    x = x.double()
    t0, t1 = -math.log(sigma_max), -math.log(sigma_min)
    m = math.floor(nfe / 3) + 1
    ts = [t0 + (t1 - t0) * k / m for k in range(m)] + [t1]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        tn_, su = _ancestral(ts[i], ts[i + 1], t1, eta) if eta else (ts[i + 1], 0.0)
        x = ref.step(x, ts[i], tn_, order)
        if eta:
            x = x + su * next(it)
    assert ref.calls == nfe
    return x


def _ref_adaptive(x, sigma_min, sigma_max, seed, eta, order=3, rtol=0.05, atol=0.0078):
    """k-diffusion's dpm_solver_adaptive for one batch row (whose error is then its own)."""
    gen = torch.Generator().manual_seed(seed)
    x = x.double()
    t, t_end = -math.log(sigma_max), -math.log(sigma_min)
    b1, errs, h = 1.0 / (1.5 if eta else order), [], 0.05
    x_prev = x
    n = 0
    while t < t_end - 1e-5:
        tn = min(t_end, t + h)
        tn_, su = _ancestral(t, tn, t_end, eta) if eta else (tn, 0.0)
        ref = _Ref()
        if order == 2:
            low, high = ref.step(x, t, tn_, 1), ref.step(x, t, tn_, 2)
        else:
            low, high = ref.step(x, t, tn_, 2, r1=1 / 3), ref.step(x, t, tn_, 3)
        delta = torch.maximum(torch.tensor(atol, dtype=torch.float64), rtol * torch.maximum(low.abs(), x_prev.abs()))
        err = float(torch.linalg.norm((low - high) / delta) / x.numel() ** 0.5)
        inv = 1 / (err + 1e-8)
        if not errs:
            errs = [inv, inv, inv]
        errs[0] = inv
        factor = 1 + math.atan(errs[0] ** b1 - 1)  # I-control only (the default P = D = 0)
        if factor >= 0.81:
            errs[2], errs[1] = errs[1], errs[0]
            x_prev = low
            x = high
            if eta:
                x = x + su * torch.randn((1, *x.shape[1:]), generator=gen).double()
            t = tn
        h *= factor
        n += 1
    return x, n


def _grid(name, steps, schedule="uniform"):
    return sampling.make_grid(name, steps, NoiseSchedule.from_config(**SD), schedule, SD)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("steps", [2, 3, 7, 10])
def test_dpm_fast_matches_k_diffusion_in_float64(steps, eta):
    grid = _grid("dpm_fast", steps)
    hi, lo = float(grid.sigmas[0]), float(grid.sigmas[-2])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)) * hi
    seeds = (11, 12)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    out = S.sample_dpm_fast(_den, x, grid.sigmas, generators=gens, eta=eta)
    m = steps // 3 + 1  # the steps DPM fast takes, each one draw
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    draws = [torch.cat([torch.randn((1, 3, 4, 4), generator=g) for g in gens]).double() for _ in range(m)]
    expected = _ref_fast(x, lo, hi, steps, draws, eta)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)
    # it runs from the model's sigma_max down to its sigma_min (A1111's txt2img ends): x is near the data there
    assert (out - _den(x, torch.tensor([hi]))).abs().max() > 1e-2


def test_dpm_fast_eta_0_converges_to_the_exact_ode_solution():
    """DPM-Solver-3 steps on the probability-flow ODE of Gaussian data, whose solution at sigma_min is exact:
    MU + sqrt(STD^2 + lo^2) / sqrt(STD^2 + hi^2) (x - MU); more model calls, much closer (third order)."""
    x = torch.randn(1, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    errors = []
    for steps in (12, 30):
        grid = _grid("dpm_fast", steps)
        hi, lo = float(grid.sigmas[0]), float(grid.sigmas[-2])
        exact = MU + math.sqrt(STD**2 + lo**2) / math.sqrt(STD**2 + hi**2) * (x * hi - MU)
        out = S.sample_dpm_fast(_den, x * hi, grid.sigmas.double(), eta=0.0)  # no generators: it draws nothing
        errors.append((out - exact).abs().max().item())
    assert errors[1] < 1e-3 and errors[1] < errors[0] / 20


@pytest.mark.parametrize("eta,order", [(0.0, 3), (0.0, 2), (1.0, 3)])
def test_dpm_adaptive_matches_k_diffusion_in_float64(eta, order):
    grid = _grid("dpm_adaptive", 20)
    hi, lo = float(grid.sigmas[0]), float(grid.sigmas[-2])
    # float64: the error estimate is a small difference of large values, which float32 rounds enough to change
    # the step sizes (so would k-diffusion's in float32)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * hi
    calls = []
    out = S.sample_dpm_adaptive(
        _den,
        x,
        grid.sigmas.double(),
        generators=[torch.Generator().manual_seed(5)],
        eta=eta,
        order=order,
        callback=lambda i, *_: calls.append(i),
    )
    expected, attempts = _ref_adaptive(x, lo, hi, 5, eta, order)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    assert len(calls) == attempts and attempts > 5  # the same accepted and rejected attempts


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_a_row_is_the_same_alone_or_in_a_batch_and_seeds_repeat(name):
    ns = NoiseSchedule.from_config(**SD)
    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    noise[2] *= 3  # a row far from the others: adaptive steps of its own
    kw = dict(sampler=name, steps=6, schedule="uniform", scheduler_config=SD, noise_schedule=ns)
    both = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    again = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (1, 2, 3)], **kw)
    assert torch.equal(both, again)
    for r in range(3):
        alone = sampling.sample(_den, noise[r : r + 1], generators=[torch.Generator().manual_seed(r + 1)], **kw)
        torch.testing.assert_close(both[r : r + 1], alone, rtol=0, atol=1e-6)
    other = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(s) for s in (4, 5, 6)], **kw)
    assert (other - both).abs().max() > 1e-3  # A1111's eta 1: the per-step noise comes from the generators


@pytest.mark.parametrize(
    "sampler,schedule,expected",
    [
        ("DPM fast", None, ("dpm_fast", "normal")),
        ("DPM adaptive", "Uniform", ("dpm_adaptive", "uniform")),
        ("k_dpm_fast", None, ("dpm_fast", "normal")),
        ("k_dpm_ad", "Karras", ("dpm_adaptive", "karras")),
        ("dpm_fast", "kl_optimal", ("dpm_fast", "kl_optimal")),
    ],
)
def test_names_resolve(sampler, schedule, expected):
    assert sampling.resolve(sampler, schedule) == expected


def test_infotext_writes_a1111s_names_and_reads_them_back():
    from sdengine.metadata import format_parameters, parse_parameters, to_generate_kwargs

    text = format_parameters({"prompt": "p", "steps": 9, "sampler": "dpm_adaptive", "schedule": "uniform"})
    assert "Sampler: DPM adaptive, Schedule type: Uniform," in text
    kw = to_generate_kwargs(parse_parameters(text))
    assert (kw["sampler"], kw["schedule"]) == ("dpm_adaptive", "uniform")
    kw = to_generate_kwargs(parse_parameters("p\nSteps: 9, Sampler: DPM fast, Seed: 1"))
    assert kw["sampler"] == "dpm_fast"


def test_bad_settings_are_one_line_errors():
    grid = _grid("dpm_fast", 1)  # one sigma and 0: nothing to integrate between
    x = torch.zeros(1, 1, 2, 2)
    with pytest.raises(UsageError, match="two distinct non-zero sigmas"):
        S.sample_dpm_fast(_den, x, grid.sigmas, generators=[torch.Generator()])
    grid = _grid("dpm_adaptive", 5)
    with pytest.raises(UsageError, match="order must be 2 or 3"):
        S.sample_dpm_adaptive(_den, x, grid.sigmas, generators=[torch.Generator()], order=4)
    with pytest.raises(UsageError, match="did not reach sigma .* in 3 attempts") as info:
        S.sample_dpm_adaptive(_den, x + 1, grid.sigmas, generators=[torch.Generator()], max_attempts=3)
    assert "\n" not in str(info.value)
    with pytest.raises(UsageError, match="cannot read a noise bank"):
        S.sample_dpm_adaptive(_den, x, grid.sigmas, generators=S.NoiseBank(torch.zeros(4, 1, 1, 2, 2), 1))


# ------------------------------------------------------------------------------------------ through the pipeline


@pytest.fixture(scope="module")
def emoji_pipe(tiny_emoji_folder):
    from sdengine.text.bert_tokenizer import find_minilm_files

    try:
        find_minilm_files()
    except FileNotFoundError:
        pytest.skip("all-MiniLM-L6-v2 not installed")
    from sdengine.pipeline import load_pipeline

    return load_pipeline(tiny_emoji_folder, device="cpu")


@pytest.mark.parametrize("sampler", ["DPM adaptive", "DPM fast"])
def test_pipeline_batch_rows_equal_single_runs(emoji_pipe, sampler):
    """Through the U-Net and classifier-free guidance a batch row is its image made alone, though DPM adaptive's
    rows take different steps. The step-size control feeds the batched matmuls' rounding back into the step
    sizes, so the bound depends on the CPU's BLAS kernels: 1.3e-4 on an AMD EPYC, under 1e-4 on the Intel machines
    before; 5e-4 here, not the 1e-5 of the fixed-step samplers (a wrong row would be off by far more)."""
    import numpy as np

    kw: dict = dict(sampler=sampler, steps=4, cfg_scale=5.0, progress=False)
    both = emoji_pipe("a red apple", seed=20, batch_size=2, **kw)
    for seed in (20, 21):
        one = emoji_pipe("a red apple", seed=seed, **kw)
        np.testing.assert_allclose(both.arrays[seed - 20], one.arrays[0], atol=5e-4)
    assert f"Sampler: {sampler}," in both.infotexts[0]


def test_adaptive_rows_are_blended_at_their_own_sigma_and_done_rows_stay():
    """Inpainting's blend (in place, before each call) with rows at different sigmas: each row blended at its own,
    a row that is done is left alone; so each row is exactly its run alone."""
    from sdengine.pipeline.latents import InpaintBlend

    ns = NoiseSchedule.from_config(**SD)

    class Net:
        takes_step = True
        schedule = ns
        prediction = "epsilon"

        def __call__(self, x, sigma, step=None, **_):
            s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1).to(x.dtype)
            return torch.tanh(x / (1 + s**2) ** 0.5 * 1.3) * 0.8

    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    noise[1] *= 2  # its own, longer, sequence of steps
    init = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(8))
    mask = torch.zeros(2, 1, 4, 4)
    mask[..., 2:] = 1
    mask[..., 1] = 0.5

    def run(rows):
        den = InpaintBlend(Net(), init[rows], noise[rows], mask[rows])
        sigmas = []
        out = sampling.sample(
            den,
            noise[rows],
            sampler="dpm_adaptive",
            steps=4,
            schedule="uniform",
            scheduler_config=SD,
            generators=[torch.Generator().manual_seed(r) for r in rows],
            callback=lambda i, sigma, *_: sigmas.append(sigma),
        )
        return out, sigmas

    both, _ = run([0, 1])
    alone = [run([r]) for r in (0, 1)]
    assert len(alone[0][1]) != len(alone[1][1])  # the rows do take different steps
    for r in (0, 1):
        torch.testing.assert_close(both[r : r + 1], alone[r][0], rtol=0, atol=1e-6)


def test_comfyui_ksampler_runs_them_deterministically():
    from sdengine.server.comfy.nodes import SAMPLER_NAMES, SAMPLER_OPTIONS

    assert SAMPLER_NAMES["dpm_fast"] == "dpm_fast" and SAMPLER_NAMES["dpm_adaptive"] == "dpm_adaptive"
    assert SAMPLER_OPTIONS["dpm_fast"] == {"eta": 0.0} == SAMPLER_OPTIONS["dpm_adaptive"]  # k-diffusion's default
    ns = NoiseSchedule.from_config(**SD)
    noise = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(7))
    kw = dict(sampler="dpm_fast", steps=6, schedule="normal", scheduler_config=SD, noise_schedule=ns)
    a = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(1)], sampler_options={"eta": 0.0}, **kw)
    b = sampling.sample(_den, noise, generators=[torch.Generator().manual_seed(2)], sampler_options={"eta": 0.0}, **kw)
    assert torch.equal(a, b)  # eta 0 draws nothing


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
def test_comfyui_sampling_cannot_stop_them_at_an_end_step(sampler):
    """KSamplerAdvanced's end_at_step stops a run at a step of the grid; these take their own steps: refused in
    one line (the run once went on to sigma_min, a silently different latent)."""
    from _live_server import shared_loader
    from sdengine.latent_sampling import LatentSamplingError, encode_text, sample_latents

    pipe = shared_loader("emoji", "cpu")
    latent = torch.zeros(1, 4, 8, 8)
    args = (pipe, [encode_text(pipe, "a star")], [encode_text(pipe, "")], latent)
    kw = dict(seed=1, steps=6, cfg=3.0, sampler=sampler, schedule="normal", sampler_options={"eta": 0.0})
    with pytest.raises(LatentSamplingError, match=f"{sampler} cannot stop at end_at_step 3 of 6") as info:
        sample_latents(*args, end_at_step=3, **kw)
    assert "\n" not in str(info.value)
    with torch.inference_mode():
        assert torch.isfinite(sample_latents(*args, **kw)).all()  # the whole run is fine


@pytest.mark.parametrize(
    "sampler,schedule,expected",
    [
        ("Euler", "Automatic", ("euler", "uniform")),  # k-diffusion's get_sigmas: 999 ... 0
        ("Euler a", "automatic", ("euler_a", "uniform")),
        ("DPM fast", "Automatic", ("dpm_fast", "uniform")),
        ("DPM++ 2M", "Automatic", ("dpmpp_2m", "karras")),  # A1111 1.10's sampler table names its default
        ("DPM++ 2M SDE", "Automatic", ("dpmpp_2m_sde", "exponential")),
        ("DPM++ 2M SDE Karras", "Automatic", ("dpmpp_2m_sde", "karras")),  # a combined name's own first
        ("Restart", "Automatic", ("restart", "karras")),
        ("DDIM", "Automatic", ("ddim", "normal")),  # a timestep sampler: its own grid
        ("Euler", None, ("euler", "normal")),  # the native default stays diffusers' spacing
    ],
)
def test_a1111_automatic_is_the_schedule_a1111_runs(sampler, schedule, expected):
    assert sampling.resolve(sampler, schedule) == expected


def test_uniform_is_k_diffusions_get_sigmas_from_timestep_999_to_0():
    """The grid A1111's Automatic gives Euler: T - 1 ... 0 evenly, sigmas interpolated in log sigma, then 0 (the
    native "normal" of SD 1.5's leading config starts at timestep 901 instead)."""
    grid = sampling.make_grid("Euler", 10, NoiseSchedule.from_config(**SD), "Automatic", SD)
    table = NoiseSchedule.from_config(**SD).sigmas.double()
    assert float(grid.sigmas[0]) == pytest.approx(float(table[-1]), rel=1e-6)
    assert float(grid.sigmas[-2]) == pytest.approx(float(table[0]), rel=1e-6) and float(grid.sigmas[-1]) == 0
    torch.testing.assert_close(
        grid.timesteps.double(), torch.linspace(999, 0, 10, dtype=torch.float64), atol=1e-3, rtol=0
    )
    normal = sampling.make_grid("Euler", 10, NoiseSchedule.from_config(**SD), None, SD)
    assert abs(float(normal.timesteps[0]) - 900) < 1e-3  # leading, steps_offset 0 (901 with SD 1.5's offset 1)


@pytest.mark.parametrize("steps", [1, 5, 20])
def test_comfyuis_normal_scheduler_is_its_timestep_linspace(steps):
    """ComfyUI's KSampler "normal": timesteps linspace(999, 0, steps) (model_sampling.timestep of sigma_max and
    sigma_min), each one's sigma interpolated in log sigma between its neighbouring table entries, then 0; it once
    ran diffusers' spacing (900 ... 0 here, 901 ... 1 with SD 1.5's offset)."""
    import numpy as np

    from sdengine.server.comfy.nodes import SCHEDULER_NAMES

    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    log_sigmas = np.log(np.sqrt((1 - np.cumprod(1 - betas)) / np.cumprod(1 - betas)))
    want = []
    for t in np.linspace(999, 0, steps):
        lo, hi = int(np.floor(t)), int(np.ceil(t))
        w = t - lo
        want.append(math.exp((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]))
    grid = sampling.make_grid("euler", steps, NoiseSchedule.from_config(**SD), SCHEDULER_NAMES["normal"], SD)
    np.testing.assert_allclose(grid.sigmas.double().numpy(), [*want, 0.0], rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 25])
def test_linear_quadratic_is_comfyuis(steps):
    """ComfyUI's linear_quadratic (Mochi's): 1 - (linear to 0.025 over steps // 2, then a quadratic to 1), times
    the model's sigma_max; recomputed here from the Mochi formula in its own form."""
    sigma_max = float(NoiseSchedule.from_config(**SD).sigmas[-1])
    if steps == 1:
        want = [1.0, 0.0]
    else:
        lin = steps // 2
        k = (lin - 0.025 * steps) / (lin * (steps - lin) ** 2)
        m = 0.025 / lin - 2 * (lin - 0.025 * steps) / (steps - lin) ** 2
        sched = [i * 0.025 / lin for i in range(lin)] + [k * i * i + m * i + k * lin * lin for i in range(lin, steps)]
        want = [1.0 - v for v in [*sched, 1.0]]
    grid = sampling.make_grid("euler", steps, NoiseSchedule.from_config(**SD), "linear_quadratic", SD)
    torch.testing.assert_close(
        grid.sigmas.double(), torch.tensor(want, dtype=torch.float64) * sigma_max, rtol=2e-6, atol=1e-6
    )
    assert sampling.resolve("Euler", "Linear Quadratic") == ("euler", "linear_quadratic")
    from sdengine.server.comfy.nodes import SCHEDULER_NAMES

    assert SCHEDULER_NAMES["linear_quadratic"] == "linear_quadratic"


# ------------------------------------------------------------------------------------------ ComfyUI's heunpp2, ipndm_v


def _ref_heunpp2(x, s):
    """ComfyUI's sample_heunpp2 (no churn) in its own form, float64."""
    x = x.double()
    to_d = lambda z, sig: (z - _den(z, torch.tensor([sig], dtype=torch.float64))) / sig  # noqa: E731
    for i in range(len(s) - 1):
        d = to_d(x, s[i])
        dt = s[i + 1] - s[i]
        if s[i + 1] == s[-1]:
            x = x + d * dt
        elif s[i + 2] == s[-1]:
            x_2 = x + d * dt
            w2 = s[i + 1] / (2 * s[0])
            x = x + (d * (1 - w2) + to_d(x_2, s[i + 1]) * w2) * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, s[i + 1])
            x_3 = x_2 + d_2 * (s[i + 2] - s[i + 1])
            d_3 = to_d(x_3, s[i + 2])
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            x = x + ((1 - w2 - w3) * d + w2 * d_2 + w3 * d_3) * dt
    return x


def _ref_ipndm_v(x, t, max_order=4):
    """ComfyUI's sample_ipndm_v in its own form (its coefficient expressions), float64."""
    x, buf = x.double(), []
    for i in range(len(t) - 1):
        d = (x - _den(x, torch.tensor([t[i]], dtype=torch.float64))) / t[i]
        order = min(max_order, i + 1)
        hn = t[i + 1] - t[i]
        if t[i + 1] == 0:
            x = _den(x, torch.tensor([t[i]], dtype=torch.float64))
        elif order == 1:
            x = x + hn * d
        elif order == 2:
            h1 = t[i] - t[i - 1]
            x = x + hn * ((2 + hn / h1) / 2 * d - (hn / h1) / 2 * buf[-1])
        elif order == 3:
            h1, h2 = t[i] - t[i - 1], t[i - 1] - t[i - 2]
            tmp = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
            c1 = (2 + hn / h1) / 2 + tmp
            c2 = -(hn / h1) / 2 - (1 + h1 / h2) * tmp
            x = x + hn * (c1 * d + c2 * buf[-1] + tmp * h1 / h2 * buf[-2])
        else:
            h1, h2, h3 = t[i] - t[i - 1], t[i - 1] - t[i - 2], t[i - 2] - t[i - 3]
            t1 = (1 - hn / (3 * (hn + h1)) * (hn * (hn + h1)) / (h1 * (h1 + h2))) / 2
            t2 = (
                ((1 - hn / (3 * (hn + h1))) / 2 + (1 - hn / (2 * (hn + h1))) * hn / (6 * (hn + h1 + h2)))
                * (hn * (hn + h1) * (hn + h1 + h2))
                / (h1 * (h1 + h2) * (h1 + h2 + h3))
            )
            r = h1 * (h1 + h2) / (h2 * (h2 + h3))
            c1 = (2 + hn / h1) / 2 + t1 + t2
            c2 = -(hn / h1) / 2 - (1 + h1 / h2) * t1 - (1 + h1 / h2 + r) * t2
            c3 = t1 * h1 / h2 + (h1 / h2 + r * (1 + h2 / h3)) * t2
            c4 = -t2 * r * h1 / h2
            x = x + hn * (c1 * d + c2 * buf[-1] + c3 * buf[-2] + c4 * buf[-3])
        buf = (buf + [d])[-(max_order - 1) :] if max_order > 1 else []
    return x


@pytest.mark.parametrize("schedule", ["karras", "uniform", "beta"])
@pytest.mark.parametrize(("name", "ref"), [("heunpp2", _ref_heunpp2), ("ipndm_v", _ref_ipndm_v)])
def test_heunpp2_and_ipndm_v_match_comfyui_in_float64(name, ref, schedule):
    grid = _grid(name, 9, schedule)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * float(grid.sigmas[0])
    out = S.SAMPLERS[name](_den, x, grid.sigmas.double())
    expected = ref(x, [float(v) for v in grid.sigmas.double()])
    torch.testing.assert_close(out, expected, rtol=1e-9, atol=1e-9)
    assert (out - S.sample_euler(_den, x, grid.sigmas.double())).abs().max() > 1e-3  # not Euler's steps
    assert sampling.resolve({"heunpp2": "HeunPP2", "ipndm_v": "iPNDM_v"}[name]) == (name, "normal")


def test_ipndm_v_on_an_even_grid():
    """On equal sigma steps the variable-step weights of orders 2 and 3 are the fixed Adams-Bashforth ones; ComfyUI's
    order-4 expression is not (57/24, not 55/24, first): taken as ComfyUI has it."""
    assert S.ipndm_v_weights([-2.0, -2.0]) == pytest.approx([3 / 2, -1 / 2])
    assert S.ipndm_v_weights([-2.0, -2.0, -2.0]) == pytest.approx([23 / 12, -16 / 12, 5 / 12])
    assert S.ipndm_v_weights([-1.0, -1.0, -1.0, -1.0]) == pytest.approx([57 / 24, -65 / 24, 43 / 24, -11 / 24])
    from sdengine.server.comfy.nodes import SAMPLER_NAMES

    assert SAMPLER_NAMES["heunpp2"] == "heunpp2" and SAMPLER_NAMES["ipndm_v"] == "ipndm_v"


def test_dpm_adaptive_progress_never_passes_the_step_count():
    """DPM adaptive makes more attempts than the grid has steps; its callback once reported the attempt, so a
    progress of (step + 1) / steps ran past 100 %. Now the step is the grid step reached in t: never past the
    last, never going back, the last one at the end."""
    grid = _grid("dpm_adaptive", 6)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3)) * float(grid.sigmas[0])
    steps = []
    S.sample_dpm_adaptive(
        _den, x, grid.sigmas, generators=[torch.Generator()] * 2, eta=0.0, callback=lambda i, *_: steps.append(i)
    )
    assert len(steps) > 6  # more attempts than steps
    assert all(0 <= i <= 5 for i in steps) and steps == sorted(steps) and steps[-1] == 5
    assert len(set(steps)) > 2  # it moves along
