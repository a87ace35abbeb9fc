"""ComfyUI's samplers that A1111 and diffusers lack: CFG++ (euler_cfg_pp, euler_a_cfg_pp, dpmpp_2m_cfg_pp,
dpmpp_2s_a_cfg_pp, res_multistep_cfg_pp), RES multistep, ER-SDE, DEIS; and UniPC's bh1 variant (ComfyUI's uni_pc).

CFG++ is checked in closed form: an inner model whose x0 is a known constant per conditioning makes every step a
formula of those constants; without guidance (one x0) each CFG++ sampler is its plain counterpart. DEIS's weights
integrate polynomials in its time exactly and agree with ComfyUI's Riemann sum; UniPC bh1 equals diffusers'
UniPCMultistepScheduler(solver_type="bh1"). Convergence on Gaussian data: tests/test_samplers_gaussian.py.
"""

import math

import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.schedules import NoiseSchedule

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

COND, UNCOND = 0.8, -0.4  # the inner model's x0 for conditional / unconditional rows


class ConstX0:
    """An x0-denoiser answering its conditioning value ``c`` wherever it is asked; counts its rows."""

    def __init__(self):
        self.rows = 0

    def __call__(self, x, sigma, c):
        self.rows += x.shape[0]
        return c.to(x.dtype).expand_as(x).clone()


def _guided(scale):
    inner = ConstX0()
    return CFGDenoiser(inner, scale, {"c": torch.full((1, 1, 1, 1), UNCOND)}), inner


def _extra(b=1):
    return {"c": torch.full((b, 1, 1, 1), COND)}


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_euler_cfg_pp_step_in_closed_form(scale):
    """x' = x0_guided + sigma' (x - x0_uncond) / sigma; at scale 1 the unconditional pass still runs (its x0 is
    the renoise direction), the step to 0 lands on the guided x0."""
    den, inner = _guided(scale)
    x = torch.full((1, 1, 2, 2), 3.0)
    g = UNCOND + scale * (COND - UNCOND)
    out = S.sample_euler_cfg_pp(den, x, torch.tensor([2.0, 0.5]), extra_args=_extra())
    torch.testing.assert_close(out, torch.full_like(x, g + 0.5 * (3.0 - UNCOND) / 2.0))
    assert inner.rows == 2  # cond and uncond rows, also at scale 1
    plain = S.sample_euler(den, x, torch.tensor([2.0, 0.5]), extra_args=_extra())
    assert (plain - out).abs().max() > 0.1  # plain Euler renoises along the guided x0
    end = S.sample_euler_cfg_pp(den, x, torch.tensor([2.0, 0.0]), extra_args=_extra())
    torch.testing.assert_close(end, torch.full_like(x, g))


def test_dpmpp_2m_cfg_pp_in_closed_form():
    den, _ = _guided(2.0)
    g = UNCOND + 2.0 * (COND - UNCOND)
    sig = [4.0, 2.0, 0.5, 0.0]
    x0 = 1.5
    out = S.sample_dpmpp_2m_cfg_pp(den, torch.full((1, 1, 2, 2), x0), torch.tensor(sig), extra_args=_extra())
    x1 = g + (sig[1] / sig[0]) * (x0 - UNCOND)
    ratio = sig[2] / sig[1]
    r = math.log(sig[0] / sig[1]) / math.log(sig[1] / sig[2])
    x2 = g + ratio * (x1 - UNCOND) + (1 - ratio) / (2 * r) * (g - UNCOND)
    seen = []
    S.sample_dpmpp_2m_cfg_pp(
        den,
        torch.full((1, 1, 2, 2), x0),
        torch.tensor(sig),
        extra_args=_extra(),
        callback=lambda i, s, x, d: seen.append(x),
    )
    torch.testing.assert_close(seen[1], torch.full((1, 1, 2, 2), x2))
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), g))


def test_dpmpp_2s_a_cfg_pp_in_closed_form():
    """eta 0: the uncond solution to sigma' (both calls answer the uncond constant B), plus the guidance vector."""
    den, inner = _guided(2.0)
    g = UNCOND + 2.0 * (COND - UNCOND)
    out = S.sample_dpmpp_2s_a_cfg_pp(
        den, torch.full((1, 1, 2, 2), 2.5), torch.tensor([3.0, 1.0]), extra_args=_extra(), eta=0.0
    )
    expected = UNCOND + (2.5 - UNCOND) * (1.0 / 3.0) + (g - UNCOND)
    torch.testing.assert_close(out, torch.full((1, 1, 2, 2), expected))
    assert inner.rows == 4  # two guided calls (start, midpoint)


PAIRS = [
    ("euler_cfg_pp", "euler", {}),
    ("euler_a_cfg_pp", "euler_a", {}),
    ("dpmpp_2m_cfg_pp", "dpmpp_2m", {}),
    ("dpmpp_2s_a_cfg_pp", "dpmpp_2s_a", {}),
    ("res_multistep_cfg_pp", "res_multistep", {}),
    ("res_multistep_a_cfg_pp", "res_multistep_a", {}),
]


@pytest.mark.parametrize("cfg_pp,plain,opts", PAIRS)
def test_cfg_pp_without_guidance_is_the_plain_sampler(cfg_pp, plain, opts):
    """Where the unconditional x0 is the guided one (a denoiser without guidance; CFG whose two halves agree) CFG++
    is its plain counterpart, noise draws included."""

    def den(x, sigma, **_):
        s = torch.as_tensor(sigma).reshape(-1, 1, 1, 1)
        return 0.3 + 0.25 / (0.25 + s**2) * (x - 0.3)

    sig = torch.tensor([6.0, 3.0, 1.5, 0.7, 0.2, 0.0])
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 6

    def run(name, d, extra=None):
        gens = [torch.Generator().manual_seed(7 + r) for r in range(2)]
        return sampling.SAMPLERS[name].fn(d, x, sig, generators=gens, extra_args=extra, **opts)

    a, b = run(cfg_pp, den), run(plain, den)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    agree = CFGDenoiser(lambda x, s, c: den(x, s), 5.0, {"c": torch.zeros(1, 1, 1, 1)})
    torch.testing.assert_close(run(cfg_pp, agree, _extra(2)), b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_pp,plain,opts", PAIRS)
def test_cfg_pp_differs_from_plain_under_guidance(cfg_pp, plain, opts):
    den, _ = _guided(1.5)
    sig = torch.tensor([6.0, 3.0, 1.5, 0.0])
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0))

    def first_step(name):
        seen = []
        g = [torch.Generator().manual_seed(1)]
        out = sampling.SAMPLERS[name].fn(
            den, x, sig, generators=g, extra_args=_extra(), callback=lambda i, s, xx, d: seen.append(xx), **opts
        )
        assert torch.isfinite(out).all()
        return seen[0]

    assert (first_step(cfg_pp) - first_step(plain)).abs().max() > 1e-2


def test_res_multistep_second_step_in_closed_form():
    """Constant x0 D: the exponential integrator is exact, x' = D + (sigma'/sigma)(x - D) every step (b1 + b2 =
    phi_1 makes the weights sum right), while the history term is used (step 2 on)."""
    d = 0.7
    sig = [5.0, 2.0, 0.8, 0.3]
    out = S.sample_res_multistep(lambda x, s: torch.full_like(x, d), torch.full((1, 1, 1, 1), 4.0), torch.tensor(sig))
    torch.testing.assert_close(out, torch.full((1, 1, 1, 1), d + (0.3 / 5.0) * (4.0 - d)))


def test_er_sde_first_stage_and_noise_in_closed_form():
    """One step of ER-SDE from sigma to sigma': r = f(sigma') / f(sigma), x' = r x + (1 - r) x0 + noise of size
    sqrt(sigma'^2 - r^2 sigma^2), f(v) = v (e^(v^0.3) + 10)."""

    def f(v):
        return v * (math.exp(v**0.3) + 10)

    s0, s1 = 3.0, 1.2
    r = f(s1) / f(s0)
    x = torch.full((1, 1, 2, 2), 2.0)
    g = torch.Generator().manual_seed(4)
    z = torch.randn((1, 1, 2, 2), generator=torch.Generator().manual_seed(4))
    out = S.sample_er_sde(lambda x, s: torch.full_like(x, 0.5), x, torch.tensor([s0, s1]), generators=[g])
    torch.testing.assert_close(out, r * x + (1 - r) * 0.5 + z * math.sqrt(s1**2 - r**2 * s0**2))
    with pytest.raises(S.UsageError, match="max_stage"):
        S.sample_er_sde(lambda x, s: x, x, torch.tensor([s0, s1]), generators=[g], max_stage=4)


def _quad(fn, a, b, n=4000):
    """Simpson's rule (independent of the sampler's Gauss-Legendre)."""
    h = (b - a) / n
    total = fn(a) + fn(b) + sum((4 if k % 2 else 2) * fn(a + k * h) for k in range(1, n))
    return total * h / 3


def test_deis_weights_integrate_polynomials_in_its_time_exactly():
    sig = [14.6, 6.0, 2.5, 1.0, 0.4, 0.1, 0.0]
    coeffs = S.deis_coefficients(sig, 3)
    assert coeffs[0] == [] and coeffs[-1] == [] and [len(c) for c in coeffs[1:-1]] == [2, 3, 3, 3]
    ts = [S.deis_time(s) for s in sig[:-1]]
    for i in range(1, 5):
        order = len(coeffs[i])
        for deg in range(order):  # eps(sigma) = tau(sigma)^deg, interpolated exactly from `order` points
            exact = _quad(lambda v, deg=deg: S.deis_time(v) ** deg, sig[i], sig[i + 1])
            got = sum(c * ts[i - j] ** deg for j, c in enumerate(coeffs[i]))
            assert got == pytest.approx(exact, rel=1e-6, abs=1e-9)


def test_deis_weights_match_comfyui_riemann_sum():
    """ComfyUI's get_deis_coeff_list ('tab'): sum over 10000 points of t in [t_i, t_i+1] of the integrand
    d sigma / d t (its -0.5 dlog(alpha)/dt / sqrt(alpha (1 - alpha))) times the Lagrange polynomial, times dt."""
    sig = [14.6, 6.0, 2.5, 1.0, 0.4]
    b_d = 2 * (math.log(0.002**2 + 1) / 1e-3 - math.log(80.0**2 + 1)) / (1e-3 - 1)
    b_min = math.log(80.0**2 + 1) - 0.5 * b_d
    ts = torch.tensor(
        [(math.sqrt(b_min**2 + 2 * b_d * math.log(s**2 + 1)) - b_min) / b_d for s in sig], dtype=torch.float64
    )
    coeffs = S.deis_coefficients(sig, 3)
    for i in range(1, 4):
        order = min(3, i + 1)
        taus = torch.linspace(float(ts[i]), float(ts[i + 1]), 10000, dtype=torch.float64)
        dtau = (ts[i + 1] - ts[i]) / 10000
        log_alpha_d = -(b_d * taus + b_min)
        alpha = torch.exp(-(0.5 * b_d * taus**2 + b_min * taus))
        integrand = -0.5 * log_alpha_d / torch.sqrt(alpha * (1 - alpha))
        prev = [ts[i - k] for k in range(order)]
        for j in range(order):
            poly = torch.ones_like(taus)
            for k in range(order):
                if k != j:
                    poly = poly * (taus - prev[k]) / (prev[j] - prev[k])
            ref = float((integrand * poly).sum() * dtau)
            assert coeffs[i][j] == pytest.approx(ref, rel=2e-3)


def test_deis_order_1_is_euler_and_bad_order_is_refused():
    def den(x, sigma, **_):
        return 0.5 * x

    sig = torch.tensor([5.0, 2.0, 1.0, 0.0])
    x = torch.ones(1, 1, 2, 2)
    torch.testing.assert_close(S.sample_deis(den, x, sig, max_order=1), S.sample_euler(den, x, sig))
    assert (S.sample_deis(den, x, sig) - S.sample_euler(den, x, sig)).abs().max() > 1e-3
    with pytest.raises(S.UsageError, match="max_order"):
        S.sample_deis(den, x, sig, max_order=5)


def test_unipc_refuses_unknown_variant():
    with pytest.raises(S.UsageError, match="variant"):
        S.sample_unipc(lambda x, s: x, torch.ones(1, 1, 1, 1), torch.tensor([1.0, 0.0]), variant="bh3")


def test_comfyui_names_and_a1111_list():
    """ComfyUI's KSampler offers them by its names; uni_pc is the bh1 variant, both UniPCs of order 3 and ending at
    sigma 0.001; A1111 has
    none of them, so its sampler list leaves them out."""
    from sdengine.server.comfy.nodes import SAMPLER_NAMES, SAMPLER_OPTIONS

    for comfy, ours in {
        "euler_cfg_pp": "euler_cfg_pp",
        "euler_ancestral_cfg_pp": "euler_a_cfg_pp",
        "dpmpp_2m_cfg_pp": "dpmpp_2m_cfg_pp",
        "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_a_cfg_pp",
        "deis": "deis",
        "res_multistep": "res_multistep",
        "res_multistep_ancestral": "res_multistep_a",
        "res_multistep_cfg_pp": "res_multistep_cfg_pp",
        "res_multistep_ancestral_cfg_pp": "res_multistep_a_cfg_pp",
        "er_sde": "er_sde",
    }.items():
        assert SAMPLER_NAMES[comfy] == ours and ours in sampling.SAMPLERS
        assert not sampling.SAMPLERS[ours].in_a1111
    # both walk a last sigma 0 as 0.001, as ComfyUI's sample_unipc
    assert SAMPLER_OPTIONS["uni_pc"] == {"variant": "bh1", "order": 3, "zero_sigma": 0.001}
    assert SAMPLER_OPTIONS["uni_pc_bh2"] == {"variant": "bh2", "order": 3, "zero_sigma": 0.001}
    for name in SAMPLER_NAMES.values():
        assert set(SAMPLER_OPTIONS.get(name, {})) <= set(sampling.sampler_option_names(name))


@pytest.mark.parametrize("before", [False, True])
def test_cfg_pp_through_the_inpainting_blends(before):
    """The pipeline's wrappers hand the hook on: A1111's blend treats the unconditional x0 as the guided one, so
    where the mask keeps the init everything (x0 and the renoise direction) is the init's; InpaintBlend acts on x
    only and hands the hook on unchanged."""
    from sdengine.pipeline.latents import A1111Blend, InpaintBlend

    den, inner = _guided(2.0)
    init = torch.full((1, 1, 2, 2), 0.25)
    keep_all = A1111Blend(den, init, torch.zeros(1, 1, 2, 2), before=before)
    assert keep_all.takes_guidance_parts and InpaintBlend(den, init, init, init).takes_guidance_parts
    x = torch.full((1, 1, 2, 2), 3.0)
    out = S.sample_euler_cfg_pp(keep_all, x, torch.tensor([2.0, 0.5]), extra_args=_extra())
    if before:  # x0 of the blended input, moved by the sample's own offset: uncond and guided alike
        blended = 0.25 * math.sqrt(1 + 4.0)
        g, u = UNCOND + 2.0 * (COND - UNCOND) + (3.0 - blended), UNCOND + (3.0 - blended)
    else:
        g = u = 0.25
    torch.testing.assert_close(out, torch.full_like(x, g + 0.25 * (3.0 - u)))
    repaint = A1111Blend(den, init, torch.ones(1, 1, 2, 2), before=before)
    plain = S.sample_euler_cfg_pp(den, x, torch.tensor([2.0, 0.5]), extra_args=_extra())
    torch.testing.assert_close(S.sample_euler_cfg_pp(repaint, x, torch.tensor([2.0, 0.5]), extra_args=_extra()), plain)


@pytest.mark.slow  # the shipped emoji model, four short runs
def test_cfg_pp_with_combined_conditionings_in_the_comfyui_path():
    """ComfyUI's ConditioningCombine averages guided predictions; the CFG++ hook goes through it: two copies of
    one positive give the image of that positive alone (a mean without the unconditional x0 would fall back to
    the guided one: plain Euler, another image)."""
    from _live_server import shared_loader
    from sdengine.latent_sampling import encode_text, sample_latents

    pipe = shared_loader("emoji", "cpu")
    pos, neg = encode_text(pipe, "a star"), encode_text(pipe, "")
    kw = dict(seed=1, steps=3, cfg=2.0, schedule="normal")
    with torch.inference_mode():
        one = sample_latents(pipe, [pos], [neg], torch.zeros(1, 4, 8, 8), sampler="euler_cfg_pp", **kw)
        two = sample_latents(pipe, [pos, pos], [neg], torch.zeros(1, 4, 8, 8), sampler="euler_cfg_pp", **kw)
        plain = sample_latents(pipe, [pos], [neg], torch.zeros(1, 4, 8, 8), sampler="euler", **kw)
    torch.testing.assert_close(two, one, atol=1e-5, rtol=1e-5)
    assert (one - plain).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------
# Whole runs against float64 recomputations of ComfyUI's loops (comfy/k_diffusion/sampling.py), written in its
# own form (to_d, t = -log sigma, phi functions, the noise scaler's 200-point sums)
# --------------------------------------------------------------------------------------------------


def _smooth(x, sigma, **_):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * 0.8 / (1 + 0.1 * s) + 0.05 * s


SIG = torch.tensor([8.0, 4.5, 2.2, 1.1, 0.5, 0.2, 0.0], dtype=torch.float64)


def _draws(seed, like):
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn((1, *like.shape[1:]), generator=g, dtype=torch.float32).to(like.dtype)


def _ref_res_multistep(x, eta, cfg_pp, model, noise):
    old_sigma_down = old_denoised = None
    for i in range(len(SIG) - 1):
        denoised, uncond = model(x, SIG[i])
        if not eta:
            sigma_down, sigma_up = SIG[i + 1], 0.0
        else:
            sigma_up = min(SIG[i + 1], eta * (SIG[i + 1] ** 2 * (SIG[i] ** 2 - SIG[i + 1] ** 2) / SIG[i] ** 2) ** 0.5)
            sigma_down = (SIG[i + 1] ** 2 - sigma_up**2) ** 0.5
        if sigma_down == 0 or old_denoised is None:
            if cfg_pp:
                x = denoised + (x - uncond) / SIG[i] * sigma_down
            else:
                x = x + (x - denoised) / SIG[i] * (sigma_down - SIG[i])
        else:
            t, t_old, t_next, t_prev = (-torch.log(v) for v in (SIG[i], old_sigma_down, sigma_down, SIG[i - 1]))
            h = t_next - t
            c2 = (t_prev - t_old) / h
            phi1 = torch.expm1(-h) / -h
            phi2 = (phi1 - 1.0) / -h
            b1, b2 = phi1 - phi2 / c2, phi2 / c2
            if cfg_pp:
                x = x + (denoised - uncond)
                x = torch.exp(-h) * x + h * (b1 * uncond + b2 * old_denoised)
            else:
                x = torch.exp(-h) * x + h * (b1 * denoised + b2 * old_denoised)
        if SIG[i + 1] > 0 and sigma_up > 0:
            x = x + noise() * sigma_up
        old_denoised = uncond if cfg_pp else denoised
        old_sigma_down = sigma_down
    return x


@pytest.mark.parametrize("name,eta,cfg_pp", [
    ("res_multistep", 0.0, False), ("res_multistep_a", 1.0, False),
    ("res_multistep_cfg_pp", 0.0, True), ("res_multistep_a_cfg_pp", 1.0, True),
])  # fmt: skip
def test_res_multistep_matches_comfyui_in_float64(name, eta, cfg_pp):
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 8

    def guided(x, sigma, c=None):  # cond rows: _smooth; uncond rows: _smooth shifted
        out = _smooth(x, sigma)
        return out if c is None else out + c.to(x.dtype)

    den = CFGDenoiser(guided, 2.5, {"c": torch.full((1, 1, 1, 1), -0.3, dtype=torch.float64)})
    extra = {"c": torch.zeros(1, 1, 1, 1, dtype=torch.float64)}

    def model(xx, s):
        c, u = _smooth(xx, s), _smooth(xx, s) - 0.3
        return u + 2.5 * (c - u), u

    out = sampling.SAMPLERS[name].fn(den, x, SIG, generators=[torch.Generator().manual_seed(9)], extra_args=extra)
    ref = _ref_res_multistep(x, eta, cfg_pp, model, _draws(9, x))
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)  # the model reads sigma in float32


def test_dpmpp_2m_cfg_pp_matches_comfyui_in_float64():
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 8
    den = CFGDenoiser(lambda x, s, c: _smooth(x, s) + c, 1.7, {"c": torch.full((1, 1, 1, 1), 0.2, dtype=torch.float64)})
    out = S.sample_dpmpp_2m_cfg_pp(den, x, SIG, extra_args={"c": torch.zeros(1, 1, 1, 1, dtype=torch.float64)})
    old_uncond = None
    ref = x
    for i in range(len(SIG) - 1):
        c, u = _smooth(ref, SIG[i]), _smooth(ref, SIG[i]) + 0.2
        denoised = u + 1.7 * (c - u)
        t, t_next = -torch.log(SIG[i]), -torch.log(SIG[i + 1])
        h = t_next - t
        if old_uncond is None or SIG[i + 1] == 0:
            mix = -torch.exp(-h) * u
        else:
            r = (t - -torch.log(SIG[i - 1])) / h
            mix = -torch.exp(-h) * u - torch.expm1(-h) * (1 / (2 * r)) * (denoised - old_uncond)
        ref = denoised + mix + torch.exp(-h) * ref
        old_uncond = u
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)  # the model reads sigma in float32


def test_er_sde_matches_comfyui_in_float64():
    x = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 8
    out = S.sample_er_sde(_smooth, x, SIG, generators=[torch.Generator().manual_seed(9)])
    noise = _draws(9, x)

    def scaler(v):
        return v * ((v**0.3).exp() + 10.0)

    points = torch.arange(0, 200.0, dtype=torch.float64)
    lam = SIG  # VE: er_lambda = sigma, alpha = 1
    old = old_d = None
    ref = x
    for i in range(len(SIG) - 1):
        denoised = _smooth(ref, SIG[i])
        stage = min(3, i + 1)
        if SIG[i + 1] == 0:
            ref = denoised
        else:
            r = scaler(lam[i + 1]) / scaler(lam[i])
            ref = r * ref + (1 - r) * denoised
            if stage >= 2:
                dt = lam[i + 1] - lam[i]
                step = -dt / 200
                pos = lam[i + 1] + points * step
                scaled = scaler(pos)
                s = torch.sum(1 / scaled) * step
                d = (denoised - old) / (lam[i] - lam[i - 1])
                ref = ref + (dt + s * scaler(lam[i + 1])) * d
                if stage >= 3:
                    s_u = torch.sum((pos - lam[i]) / scaled) * step
                    u = (d - old_d) / ((lam[i] - lam[i - 2]) / 2)
                    ref = ref + ((dt**2) / 2 + s_u * scaler(lam[i + 1])) * u
                old_d = d
            ref = ref + noise() * (lam[i + 1] ** 2 - lam[i] ** 2 * r**2).sqrt()
        old = denoised
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)  # the model reads sigma in float32


@pytest.mark.parametrize(
    "sampler,options,match",
    [
        ("deis", {"max_order": 3.5}, "deis max_order must be 1 .. 4"),
        ("deis", {"max_order": 0}, "deis max_order must be 1 .. 4"),
        ("er_sde", {"max_stage": 4}, "er_sde max_stage must be 1, 2 or 3"),
        ("unipc", {"order": True}, "unipc order must be 1, 2 or 3"),
        ("unipc", {"variant": "bh3"}, "unipc variant must be one of bh1, bh2"),
        ("euler_cfg_pp", {"eta": 1.0}, "has no option eta"),
    ],
)
def test_bad_options_are_one_line_errors(sampler, options, match):
    ns = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    with pytest.raises(S.UsageError, match=match) as info:
        sampling.sample(
            lambda x, s: x * 0, torch.zeros(1, 1, 2, 2), sampler=sampler, steps=3, noise_schedule=ns,
            generators=[torch.Generator()], sampler_options=options,
        )  # fmt: skip
    assert "\n" not in str(info.value)
