"""ComfyUI's gradient_estimation(_cfg_pp), exp_heun_2_x0(_sde), seeds_2, seeds_3 and sa_solver(_pece).

Whole runs against float64 recomputations of ComfyUI's loops (comfy/k_diffusion/sampling.py and sa_solver.py),
written in its own form (to_d, the half-logSNR lambda = -log sigma of a VE model, ei_h_phi_1 / ei_h_phi_2,
SA-Solver's integration-by-parts matrix and Vandermonde solve), fed the noise ComfyUI's default_noise_sampler
draws (one generator, the whole batch each draw, in ComfyUI's order); convergence orders on Gaussian data, whose
probability-flow ODE has a closed-form solution; bad options as one-line errors.
"""

import math

import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.diffusion.schedules import NoiseSchedule, percent_to_sigma

SIG = torch.tensor([8.0, 4.5, 2.2, 1.1, 0.5, 0.2, 0.0], dtype=torch.float64)
SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _smooth(x, sigma, **_):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return torch.tanh(x) * 0.8 / (1 + 0.1 * s) + 0.05 * s


def _start(b=2):
    return torch.randn(b, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 8


def _comfy_noise(seed, like):
    """ComfyUI's default_noise_sampler: one generator, ``randn(x.shape)`` each call (float32, as BatchNoise)."""
    g = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(like.shape, generator=g, dtype=torch.float32).to(like.dtype)


def _t(v):
    return torch.as_tensor(v, dtype=torch.float64)


# --------------------------------------------------------------------------------------------------
# gradient estimation
# --------------------------------------------------------------------------------------------------


def _ref_gradient_estimation(x, model, gamma, cfg_pp):
    old_d = None
    for i in range(len(SIG) - 1):
        denoised, uncond = model(x, SIG[i])
        d = (x - (uncond if cfg_pp else denoised)) / SIG[i]
        dt = SIG[i + 1] - SIG[i]
        if SIG[i + 1] == 0:
            x = denoised
        else:
            x = denoised + d * SIG[i + 1] if cfg_pp else x + d * dt
            if i >= 1:
                x = x + (gamma - 1) * (d - old_d) * dt
        old_d = d
    return x


@pytest.mark.parametrize("name,cfg_pp", [("gradient_estimation", False), ("gradient_estimation_cfg_pp", True)])
@pytest.mark.parametrize("gamma", [2.0, 2.7])
def test_gradient_estimation_matches_comfyui_in_float64(name, cfg_pp, gamma):
    x = _start(1)

    def guided(x, sigma, c=None):  # cond rows: _smooth; uncond rows: _smooth shifted
        out = _smooth(x, sigma)
        return out if c is None else out + c.to(x.dtype)

    den = CFGDenoiser(guided, 2.5, {"c": torch.full((1, 1, 1, 1), -0.3, dtype=torch.float64)})
    extra = {"c": torch.zeros(1, 1, 1, 1, dtype=torch.float64)}

    def model(xx, s):
        c, u = _smooth(xx, s), _smooth(xx, s) - 0.3
        return u + 2.5 * (c - u), u

    out = sampling.SAMPLERS[name].fn(den, x, SIG, extra_args=extra, ge_gamma=gamma)
    ref = _ref_gradient_estimation(x, model, gamma, cfg_pp)
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)  # the model reads sigma in float32
    plain = (
        S.sample_euler(den, x, SIG, extra_args=extra)
        if not cfg_pp
        else S.sample_euler_cfg_pp(den, x, SIG, extra_args=extra)
    )
    assert (plain - out).abs().max() > 1e-3  # the gradient estimate moves it off Euler


def test_gradient_estimation_at_gamma_1_is_euler_and_cfg_pp_without_guidance_is_plain():
    x = _start()
    torch.testing.assert_close(
        S.sample_gradient_estimation(_smooth, x, SIG, ge_gamma=1.0), S.sample_euler(_smooth, x, SIG)
    )
    torch.testing.assert_close(
        S.sample_gradient_estimation_cfg_pp(_smooth, x, SIG), S.sample_gradient_estimation(_smooth, x, SIG)
    )


# --------------------------------------------------------------------------------------------------
# SEEDS-2 / exponential Heun, SEEDS-3
# --------------------------------------------------------------------------------------------------


def _phi1(h):
    return torch.expm1(h)


def _phi2(h):
    return (torch.expm1(h) - h) / h


def _ref_seeds_2(x, eta, s_noise, r, solver_type, noise):
    inject = eta > 0 and s_noise > 0
    for i in range(len(SIG) - 1):
        denoised = _smooth(x, SIG[i])
        if SIG[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = -SIG[i].log(), -SIG[i + 1].log()
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1 = torch.lerp(lam_s, lam_t, r)
        sigma_1 = (-lam_1).exp()
        alpha_1, alpha_t = sigma_1 * lam_1.exp(), SIG[i + 1] * lam_t.exp()
        x_2 = sigma_1 / SIG[i] * (-r * h * eta).exp() * x - alpha_1 * _phi1(-r * h_eta) * denoised
        if inject:
            sde = (-2 * r * h * eta).expm1().neg().sqrt() * noise()
            x_2 = x_2 + sde * sigma_1 * s_noise
        denoised_2 = _smooth(x_2, sigma_1)
        if solver_type == "phi_1":
            mixed = torch.lerp(denoised, denoised_2, 1 / (2 * r))
            x = SIG[i + 1] / SIG[i] * (-h * eta).exp() * x - alpha_t * _phi1(-h_eta) * mixed
        else:
            b2 = _phi2(-h_eta) / r
            b1 = _phi1(-h_eta) - b2
            x = SIG[i + 1] / SIG[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b2 * denoised_2)
        if inject:
            seg = _t((r - 1) * h * eta)
            sde = sde * seg.exp() + seg.mul(2).expm1().neg().clamp(min=0).sqrt() * noise()
            x = x + sde * SIG[i + 1] * s_noise
    return x


@pytest.mark.parametrize(
    "name,options,eta,s_noise,r,solver_type",
    [
        ("seeds_2", {}, 1.0, 1.0, 0.5, "phi_1"),
        ("seeds_2", {"solver_type": "phi_2", "r": 0.3, "eta": 0.6, "s_noise": 0.8}, 0.6, 0.8, 0.3, "phi_2"),
        ("seeds_2", {"eta": 0.0}, 0.0, 1.0, 0.5, "phi_1"),
        ("exp_heun_2_x0", {}, 0.0, 0.0, 1.0, "phi_2"),
        ("exp_heun_2_x0", {"solver_type": "phi_1"}, 0.0, 0.0, 1.0, "phi_1"),
        ("exp_heun_2_x0_sde", {}, 1.0, 1.0, 1.0, "phi_2"),
        ("exp_heun_2_x0_sde", {"eta": 0.5, "s_noise": 1.3}, 0.5, 1.3, 1.0, "phi_2"),
    ],
)
def test_seeds_2_family_matches_comfyui_in_float64(name, options, eta, s_noise, r, solver_type):
    x = _start()
    out = sampling.SAMPLERS[name].fn(_smooth, x, SIG, generators=S.BatchNoise.seeded(2, 9), **options)
    ref = _ref_seeds_2(x, eta, s_noise, r, solver_type, _comfy_noise(9, x))
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)  # the model reads sigma in float32


def _ref_seeds_3(x, eta, s_noise, r_1, r_2, noise):
    inject = eta > 0 and s_noise > 0
    for i in range(len(SIG) - 1):
        denoised = _smooth(x, SIG[i])
        if SIG[i + 1] == 0:
            x = denoised
            continue
        lam_s, lam_t = -SIG[i].log(), -SIG[i + 1].log()
        h = lam_t - lam_s
        h_eta = h * (eta + 1)
        lam_1, lam_2 = torch.lerp(lam_s, lam_t, r_1), torch.lerp(lam_s, lam_t, r_2)
        sigma_1, sigma_2 = (-lam_1).exp(), (-lam_2).exp()
        alpha_1, alpha_2, alpha_t = sigma_1 * lam_1.exp(), sigma_2 * lam_2.exp(), SIG[i + 1] * lam_t.exp()
        x_2 = sigma_1 / SIG[i] * (-r_1 * h * eta).exp() * x - alpha_1 * _phi1(-r_1 * h_eta) * denoised
        if inject:
            sde = (-2 * r_1 * h * eta).expm1().neg().sqrt() * noise()
            x_2 = x_2 + sde * sigma_1 * s_noise
        denoised_2 = _smooth(x_2, sigma_1)
        a3_2 = r_2 / r_1 * _phi2(-r_2 * h_eta)
        a3_1 = _phi1(-r_2 * h_eta) - a3_2
        x_3 = sigma_2 / SIG[i] * (-r_2 * h * eta).exp() * x - alpha_2 * (a3_1 * denoised + a3_2 * denoised_2)
        if inject:
            seg = (r_1 - r_2) * h * eta
            sde = sde * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise()
            x_3 = x_3 + sde * sigma_2 * s_noise
        denoised_3 = _smooth(x_3, sigma_2)
        b3 = _phi2(-h_eta) / r_2
        b1 = _phi1(-h_eta) - b3
        x = SIG[i + 1] / SIG[i] * (-h * eta).exp() * x - alpha_t * (b1 * denoised + b3 * denoised_3)
        if inject:
            seg = (r_2 - 1) * h * eta
            sde = sde * seg.exp() + seg.mul(2).expm1().neg().sqrt() * noise()
            x = x + sde * SIG[i + 1] * s_noise
    return x


@pytest.mark.parametrize(
    "options,eta,s_noise,r_1,r_2",
    [
        ({}, 1.0, 1.0, 1 / 3, 2 / 3),
        ({"eta": 0.4, "r_1": 0.25, "r_2": 0.9}, 0.4, 1.0, 0.25, 0.9),
        ({"s_noise": 0.0}, 1.0, 0.0, 1 / 3, 2 / 3),
    ],
)
def test_seeds_3_matches_comfyui_in_float64(options, eta, s_noise, r_1, r_2):
    x = _start()
    out = S.sample_seeds_3(_smooth, x, SIG, generators=S.BatchNoise.seeded(2, 9), **options)
    ref = _ref_seeds_3(x, eta, s_noise, r_1, r_2, _comfy_noise(9, x))
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-7)


# --------------------------------------------------------------------------------------------------
# SA-Solver
# --------------------------------------------------------------------------------------------------


def _ref_exponential_coeffs(s, t, order, tau):
    """ComfyUI's compute_exponential_coeffs: the recursion of integration by parts as a lower-triangular matrix."""
    k = 1 + tau**2
    h = t - s
    p = torch.arange(order, dtype=torch.float64)
    terms = t**p - s**p * (-k * h).exp()
    depth = p.unsqueeze(1) - p.unsqueeze(0)
    log_fact = (p + 1).lgamma()
    mat = log_fact.unsqueeze(1) - log_fact.unsqueeze(0)
    if tau > 0:
        mat = mat - depth * math.log(k)
    signs = torch.where(depth % 2 == 0, 1.0, -1.0).to(torch.float64)
    return (mat.exp() * signs).tril() @ terms


def _ref_b(sigma_next, lams, lam_s, lam_t, tau, simple, corrector):
    k = 1 + tau**2
    h = lam_t - lam_s
    alpha_t = sigma_next * lam_t.exp()
    if simple and lams.shape[0] == 2:
        if corrector:
            b_1 = alpha_t * (0.5 * k * h)
            b_2 = alpha_t * (-h * k).expm1().neg() - b_1
        else:
            b_2 = alpha_t * (0.5 * k * h**2) / (lams[-2] - lam_s)
            b_1 = alpha_t * (-h * k).expm1().neg() - b_2
        return torch.stack([b_2, b_1])
    n = lams.shape[0]
    coeffs = _ref_exponential_coeffs(lam_s, lam_t, n, tau)
    vander_t = torch.vander(lams, n, increasing=True).T
    return alpha_t * torch.linalg.solve(vander_t, coeffs)


def _ref_sa_solver(x, noise, window, eta=1.0, s_noise=1.0, p_order=3, c_order=4, pece=False, simple=False, sig=SIG):
    lams = -sig.log()
    n = len(sig) - 1

    def tau_func(sigma):
        return eta if eta > 0 and window[0] >= float(sigma) >= window[1] else 0.0

    x_pred, h, tau, extra = x, 0.0, 0.0, 0.0
    preds = []
    to_end = float(sig[-1]) == 0
    for i in range(n):
        denoised = _smooth(x_pred, sig[i])
        preds = (preds + [denoised])[-max(p_order, c_order) :]
        p_used = min(p_order, len(preds))
        c_used = 0 if i == 0 or (sig[i + 1] == 0 and not pece) else min(c_order, len(preds))
        if to_end:
            p_used = min(p_used, len(sig) - 2 - i)
            c_used = min(c_used, len(sig) - 1 - i)
        if c_used == 0:
            x = x_pred
        else:
            b = _ref_b(sig[i], lams[i - c_used + 1 : i + 1], lams[i - 1], lams[i], tau, simple, True)
            x = sig[i] / sig[i - 1] * (-(tau**2) * h).exp() * x + sum(
                w * e for w, e in zip(b, preds[-c_used:], strict=True)
            )
            if tau > 0 and s_noise > 0:
                x = x + extra
            if pece:
                denoised = _smooth(x, sig[i])
                preds[-1] = denoised
        if sig[i + 1] == 0:
            x_pred = denoised
        else:
            tau = tau_func(sig[i + 1])
            b = _ref_b(sig[i + 1], lams[i - p_used + 1 : i + 1], lams[i], lams[i + 1], tau, simple, False)
            h = lams[i + 1] - lams[i]
            x_pred = sig[i + 1] / sig[i] * (-(tau**2) * h).exp() * x + sum(
                w * e for w, e in zip(b, preds[-p_used:], strict=True)
            )
            if tau > 0 and s_noise > 0:
                extra = noise() * sig[i + 1] * (-2 * tau**2 * h).expm1().neg().sqrt() * s_noise
                x_pred = x_pred + extra
    return x_pred


@pytest.mark.parametrize(
    "name,options",
    [
        ("sa_solver", {}),
        ("sa_solver_pece", {}),
        ("sa_solver", {"predictor_order": 2, "corrector_order": 2, "simple_order_2": True}),
        ("sa_solver", {"predictor_order": 1, "corrector_order": 0, "s_noise": 0.7}),
        ("sa_solver", {"predictor_order": 6, "corrector_order": 6, "eta": 0.5}),
        ("sa_solver_pece", {"eta": 0.0}),
    ],
)
def test_sa_solver_matches_comfyui_in_float64(name, options):
    x = _start()
    window = (5.0, 0.3)  # stochastic at the steps to 4.5, 2.2, 1.1 and 0.5; not to 0.2
    out = sampling.SAMPLERS[name].fn(
        _smooth, x, SIG, generators=S.BatchNoise.seeded(2, 9), sde_start_sigma=window[0], sde_end_sigma=window[1],
        **options,
    )  # fmt: skip
    keys = {"eta": "eta", "s_noise": "s_noise", "predictor_order": "p_order", "corrector_order": "c_order"}
    kw = {keys[k]: v for k, v in options.items() if k in keys}
    ref = _ref_sa_solver(
        x, _comfy_noise(9, x), window, pece=name == "sa_solver_pece", simple=bool(options.get("simple_order_2")), **kw
    )
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)  # float64 both; the model reads sigma in float32


def test_sa_solver_on_a_grid_that_stops_above_zero():
    """Without a last sigma of 0 the orders are not lowered towards the end, and the last step adds noise."""
    sig = SIG[:-1]
    x = _start()
    out = S.sample_sa_solver(_smooth, x, sig, generators=S.BatchNoise.seeded(2, 4), sde_start_sigma=9.0)
    ref = _ref_sa_solver(x, _comfy_noise(4, x), (9.0, 0.0), sig=sig)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_sa_solver_weights_are_the_lagrange_integrals():
    """Each weight is the weighted integral of its Lagrange polynomial: a polynomial of degree < order in lambda
    is integrated exactly (checked against a fine trapezoid sum), for tau 0 and 1."""
    lams = [-1.2, -0.7, 0.1, 0.6]
    lam_s, lam_t = 0.6, 1.4
    for tau in (0.0, 1.0):
        k = 1 + tau**2
        b = S.sa_solver_weights(lams, lam_s, lam_t, tau)
        u = torch.linspace(lam_s, lam_t, 200001, dtype=torch.float64)
        weight = k * torch.exp(k * (u - lam_t))
        for poly in (lambda v: v**0, lambda v: 2 * v - 1, lambda v: v**3 - v):
            exact = torch.trapezoid(weight * poly(u), u)
            assert abs(sum(w * float(poly(lv)) for w, lv in zip(b, lams, strict=True)) - float(exact)) < 1e-8


def test_sampling_hands_sa_solver_comfyuis_stochastic_window():
    """sample() gives sa_solver ComfyUI's default window, sigma between percent_to_sigma(0.8) and (0.2) of the
    model's schedule: one draw at each step whose next sigma lies in it (and none on the step to 0)."""
    ns = NoiseSchedule.from_config(**SD)
    hi, lo = percent_to_sigma(ns.log_sigmas, 0.2), percent_to_sigma(ns.log_sigmas, 0.8)
    assert 0.1 < lo < 1 < hi < 14  # the model's sigmas at timesteps 799.2 and 199.8
    for steps in (5, 12):
        grid = sampling.make_grid("sa_solver", steps, ns, "karras", SD)
        expected = sum(1 for v in grid.sigmas[1:].tolist() if v > 0 and lo <= v <= hi)
        for name in ("sa_solver", "sa_solver_pece"):
            count = sampling.noise_draws(
                sampler=name, steps=steps, noise_schedule=ns, schedule="karras", scheduler_config=SD
            )
            assert count == expected and 0 < count < steps - 1
        # stochastic everywhere when the window is given wide open
        wide = {"sde_start_sigma": 1e9, "sde_end_sigma": 0.0}
        assert (
            sampling.noise_draws(
                sampler="sa_solver",
                steps=steps,
                noise_schedule=ns,
                schedule="karras",
                scheduler_config=SD,
                sampler_options=wide,
            )
            == steps - 1
        )


# --------------------------------------------------------------------------------------------------
# Convergence on Gaussian data: the probability-flow ODE of N(mu, s^2) data moves x - mu by
# sqrt(s^2 + sigma'^2) / sqrt(s^2 + sigma^2); halving the step size divides the error by 2^order
# --------------------------------------------------------------------------------------------------

MU, STD = 0.3, 0.5


def _gauss(x, sigma, **_):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return MU + STD**2 / (STD**2 + s**2) * (x - MU)


def _exponential_grid(n, hi=10.0, lo=0.1):
    return torch.linspace(math.log(hi), math.log(lo), n + 1, dtype=torch.float64).exp()


@pytest.mark.parametrize(
    "name,options,order",
    [
        ("exp_heun_2_x0", {}, 2),
        ("exp_heun_2_x0", {"solver_type": "phi_1"}, 2),
        ("seeds_2", {"eta": 0.0}, 2),
        ("seeds_2", {"eta": 0.0, "solver_type": "phi_2", "r": 0.7}, 2),
        ("seeds_3", {"eta": 0.0}, 3),
        ("sa_solver", {"eta": 0.0}, 3.5),  # predictor of order 3, corrector of order 4
        ("sa_solver_pece", {"eta": 0.0}, 3.5),
        ("sa_solver", {"eta": 0.0, "predictor_order": 2, "corrector_order": 0}, 2),
        ("gradient_estimation", {}, 0.85),  # Euler with an extrapolated direction: first order
    ],
)
def test_convergence_order_on_gaussian_data(name, options, order):
    x = torch.linspace(-3, 3, 16, dtype=torch.float64).reshape(1, 1, 4, 4) * 10
    exact = MU + (x - MU) * math.sqrt(STD**2 + 0.1**2) / math.sqrt(STD**2 + 10.0**2)
    errors = []
    for n in (16, 32, 64):
        out = sampling.SAMPLERS[name].fn(_gauss, x, _exponential_grid(n), **options)
        errors.append(float((out - exact).abs().max()))
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert rates[-1] > order - 0.15, (errors, rates)
    if order < 3:
        assert rates[-1] < order + 0.5, (errors, rates)  # not more accurate than its order says: the test can tell


# --------------------------------------------------------------------------------------------------
# Names and bad options
# --------------------------------------------------------------------------------------------------


NEW = {
    "gradient_estimation": "gradient_estimation",
    "gradient_estimation_cfg_pp": "gradient_estimation_cfg_pp",
    "exp_heun_2_x0": "exp_heun_2_x0",
    "exp_heun_2_x0_sde": "exp_heun_2_x0_sde",
    "seeds_2": "seeds_2",
    "seeds_3": "seeds_3",
    "sa_solver": "sa_solver",
    "sa_solver_pece": "sa_solver_pece",
}


def test_comfyui_names_and_the_a1111_list():
    """KSampler offers them by ComfyUI's names (in ComfyUI's order); A1111 has none of them; the CFG++ one runs its
    unconditional pass at scale 1 too."""
    from sdengine.server.comfy.nodes import SAMPLER_NAMES

    for comfy, ours in NEW.items():
        assert SAMPLER_NAMES[comfy] == ours and not sampling.SAMPLERS[ours].in_a1111
    order = list(SAMPLER_NAMES)
    assert order.index("heunpp2") + 1 == order.index("exp_heun_2_x0") == order.index("exp_heun_2_x0_sde") - 1
    assert (
        order.index("gradient_estimation")
        < order.index("er_sde")
        < order.index("seeds_2")
        < order.index("sa_solver_pece")
    )
    assert "gradient_estimation_cfg_pp" in sampling.CFG_PP_SAMPLERS
    for name in ("exp_heun_2_x0_sde", "seeds_2", "seeds_3", "sa_solver", "sa_solver_pece"):
        assert sampling.SAMPLERS[name].stochastic
    assert not sampling.SAMPLERS["exp_heun_2_x0"].stochastic


@pytest.mark.parametrize(
    "sampler,options,match",
    [
        ("sa_solver", {"predictor_order": 0}, "sa_solver predictor_order must be 1 .. 6"),
        ("sa_solver", {"predictor_order": 7}, "sa_solver predictor_order must be 1 .. 6"),
        ("sa_solver_pece", {"corrector_order": -1}, "sa_solver_pece corrector_order must be 0 .. 6"),
        ("sa_solver", {"corrector_order": 2.5}, "sa_solver corrector_order must be 0 .. 6"),
        ("sa_solver", {"eta": -0.5}, "sa_solver eta must be a number of at least 0"),
        ("sa_solver", {"sde_end_sigma": float("nan")}, "sa_solver sde_end_sigma must be a sigma of at least 0"),
        ("seeds_2", {"solver_type": "phi_3"}, "seeds_2 solver_type must be one of phi_1, phi_2"),
        ("seeds_2", {"r": 0.0}, r"seeds_2 r must be in \(0, 1\]"),
        ("exp_heun_2_x0_sde", {"s_noise": -1.0}, "exp_heun_2_x0_sde s_noise must be a number of at least 0"),
        ("seeds_3", {"r_1": 0.7, "r_2": 0.5}, "seeds_3 r_1 must be below r_2"),
        ("seeds_3", {"r_2": 1.5}, r"seeds_3 r_2 must be in \(0, 1\]"),
        ("gradient_estimation", {"ge_gamma": float("inf")}, "gradient_estimation ge_gamma must be a finite number"),
        ("exp_heun_2_x0", {"eta": 1.0}, "has no option eta"),
    ],
)
def test_bad_options_are_one_line_errors(sampler, options, match):
    ns = NoiseSchedule.from_config(**SD)
    calls = []

    def den(x, s, **_):
        calls.append(1)
        return x * 0

    with pytest.raises(S.UsageError, match=match) as info:
        sampling.sample(
            den, torch.zeros(1, 1, 2, 2), sampler=sampler, steps=3, noise_schedule=ns,
            generators=[torch.Generator()], sampler_options=options,
        )  # fmt: skip
    assert "\n" not in str(info.value) and not calls  # before any model call
