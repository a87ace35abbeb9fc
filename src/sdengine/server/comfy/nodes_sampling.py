"""ComfyUI's custom-sampling nodes beyond the core ones of ``nodes.py``: more schedulers (PolyexponentialScheduler,
VPScheduler, LaplaceScheduler), the guiders over three conditionings (DualCFGGuider, PerpNegGuider), AddNoise, and
the sampler nodes with options for samplers the engine has (SamplerER_SDE, SamplerSASolver, SamplerSEEDS2,
SamplerEulerCFGpp), and SamplerLCMUpscale, whose loop (:func:`lcm_upscale_loop`) SamplerCustom runs here, one
denoising of the model per step. Inputs, defaults and ranges are ComfyUI's (comfy_extras/nodes_custom_sampler.py,
nodes_perpneg.py, nodes_advanced_samplers.py); the values they pass are ``nodes.py``'s (SIGMAS, SAMPLER, NOISE,
GUIDER, LATENT)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from sdengine.server.comfy.nodes import (
    Guider,
    Input,
    ModelHandle,
    NodeDef,
    NodeError,
    NoiseSource,
    SamplerChoice,
    Sigmas,
    latent_samples,
)

STEPS_MAX = 10000  # ComfyUI's max of the schedulers' steps (the server's --max-steps may be lower)
SIGMA_MAX, SIGMA_MIN = 14.614642, 0.0291675  # ComfyUI's defaults: SD 1.x's sigma range


def _steps(ctx: Any, steps: int) -> int:
    n = int(steps)
    if n > ctx.max_steps:
        raise NodeError(f"steps {n} is over the server's limit of {ctx.max_steps}")
    return n


def _sigmas(values: torch.Tensor, node: str, zero: bool = True) -> tuple[Any]:
    """A SIGMAS value of float64 ``values`` (float32, as ComfyUI's), a last 0 appended where ``zero``; a non-finite
    sigma (an overflow of the settings) is refused here with the node named."""
    if not bool(torch.isfinite(values).all()):
        shown = [round(v, 4) for v in values.tolist()[:4]]
        raise NodeError(f"{node}: these settings make sigmas that are not finite numbers ({shown} ...)")
    out = values.to(torch.float32)
    if zero:
        out = torch.cat([out, torch.zeros(1)])
    return (Sigmas(out.reshape(-1).clone()),)


def _positive_range(node: str, sigma_max: float, sigma_min: float) -> None:
    if float(sigma_min) <= 0.0 or float(sigma_max) <= 0.0:
        raise NodeError(f"{node}: sigma_min and sigma_max must be above 0 (the schedule is spaced in log sigma)")


def polyexponential_scheduler(ctx: Any, steps: int, sigma_max: float, sigma_min: float, rho: float) -> tuple[Any]:
    """ComfyUI's PolyexponentialScheduler (k-diffusion's get_sigmas_polyexponential): log sigma from sigma_max to
    sigma_min along ``ramp ** rho``, ramp 1 -> 0 over ``steps`` points, then 0."""
    from sdengine.diffusion.schedules import polyexponential_sigmas

    n = _steps(ctx, steps)
    _positive_range("PolyexponentialScheduler", sigma_max, sigma_min)
    values = polyexponential_sigmas(n, float(sigma_min), float(sigma_max), float(rho))
    return _sigmas(values, "PolyexponentialScheduler")


def vp_scheduler(ctx: Any, steps: int, beta_d: float, beta_min: float, eps_s: float) -> tuple[Any]:
    """ComfyUI's VPScheduler (k-diffusion's get_sigmas_vp): ``sqrt(e^(beta_d t^2 / 2 + beta_min t) - 1)`` at ``steps``
    times t from 1 down to eps_s, then 0."""
    from sdengine.diffusion.schedules import vp_sigmas

    values = vp_sigmas(_steps(ctx, steps), float(beta_d), float(beta_min), float(eps_s))
    return _sigmas(values, "VPScheduler")


def laplace_scheduler(ctx: Any, steps: int, sigma_max: float, sigma_min: float, mu: float, beta: float) -> tuple[Any]:
    """ComfyUI's LaplaceScheduler (its get_sigmas_laplace): ``steps`` sigmas of the Laplace inverse CDF in log sigma,
    clamped to [sigma_min, sigma_max], and no 0 after them (ComfyUI appends none: a sampler walking them ends at
    the last, leaving that much noise)."""
    from sdengine.diffusion.schedules import laplace_sigmas

    n = _steps(ctx, steps)
    values = laplace_sigmas(n, float(sigma_min), float(sigma_max), float(mu), float(beta))
    return _sigmas(values, "LaplaceScheduler", zero=False)


# ------------------------------------------------------------------------------------------ sigma tools


def set_first_sigma(ctx: Any, sigmas: Sigmas, sigma: float) -> tuple[Any]:
    """ComfyUI's SetFirstSigma: the sigmas with the first one replaced by ``sigma`` (a plain list then: SamplerCustom
    walks it as given)."""
    if sigmas.values.shape[0] == 0:
        raise NodeError("SetFirstSigma: the sigmas are empty, there is no first sigma to set")
    values = sigmas.values.clone()
    values[0] = float(sigma)
    return (Sigmas(values),)


SPACINGS = ("linear", "cosine", "sine")


def extend_intermediate_sigmas(
    ctx: Any, sigmas: Sigmas, steps: int, start_at_sigma: float, end_at_sigma: float, spacing: str
) -> tuple[Any]:
    """ComfyUI's ExtendIntermediateSigmas: after each sigma s with end_at_sigma <= s <= start_at_sigma (a negative
    start: no upper bound) ``steps - 1`` sigmas between it and the next, at ``s + f(k / steps) (s' - s)`` for k = 1 ..
    steps - 1, f the spacing (linear: x, cosine: sin(x pi / 2), sine: 1 - cos(x pi / 2)); the last sigma kept."""
    v = sigmas.values.to(torch.float64)
    if v.shape[0] == 0:
        return (Sigmas(sigmas.values.clone()),)
    start = math.inf if float(start_at_sigma) < 0 else float(start_at_sigma)
    x = torch.linspace(0, 1, int(steps) + 1, dtype=torch.float64)[1:-1]
    ramp = {"linear": x, "cosine": torch.sin(x * math.pi / 2), "sine": 1 - torch.cos(x * math.pi / 2)}[spacing]
    out: list[torch.Tensor] = []
    for i in range(v.shape[0] - 1):
        out.append(v[i : i + 1])
        if float(end_at_sigma) <= float(v[i]) <= start:
            out.append(v[i] + ramp * (v[i + 1] - v[i]))
    out.append(v[-1:])
    values = torch.cat(out)
    if values.shape[0] - 1 > ctx.max_steps:
        raise NodeError(f"ExtendIntermediateSigmas makes {values.shape[0] - 1} steps, over the server's limit of "
                        f"{ctx.max_steps}")  # fmt: skip
    return (Sigmas(values.to(torch.float32)),)


def sampling_percent_to_sigma(
    ctx: Any, model: ModelHandle, sampling_percent: float, return_actual_sigma: bool
) -> tuple[Any]:
    """ComfyUI's SamplingPercentToSigma: the model's sigma at that percent of its schedule (percent_to_sigma: 0 is
    999999999.9, 1 is 0, the values ControlNet and conditioning windows compare with); ``return_actual_sigma``: 0 and
    1 give the model's sigma_max and sigma_min instead."""
    from sdengine.diffusion.schedules import percent_to_sigma
    from sdengine.pipeline.core import zero_snr_schedule

    pipe = ctx.pipeline(model.ref)
    p = float(sampling_percent)
    with zero_snr_schedule(bool(model.zsnr), pipe):
        ns = pipe.noise_schedule
        value = percent_to_sigma(ns.log_sigmas, p)
        if return_actual_sigma and p == 0.0:
            value = float(ns.sigma_max)
        elif return_actual_sigma and p == 1.0:
            value = float(ns.sigma_min)
    return (value,)


NUMBER = re.compile(r"[-+]?\d*\.*\d+")  # ComfyUI's ManualSigmas: each run of digits (a sign, dots inside) a number


def manual_sigmas(ctx: Any, sigmas: str) -> tuple[Any]:
    """ComfyUI's ManualSigmas: the numbers of the text, in order, as SIGMAS (no number: empty sigmas)."""
    values = []
    for token in NUMBER.findall(str(sigmas)):
        try:
            values.append(float(token))
        except ValueError:
            raise NodeError(f"ManualSigmas: {token!r} is not a number") from None
    if len(values) - 1 > ctx.max_steps:
        raise NodeError(f"ManualSigmas: {len(values) - 1} steps are over the server's limit of {ctx.max_steps}")
    return (Sigmas(torch.tensor(values, dtype=torch.float32).reshape(-1)),)


# ------------------------------------------------------------------------------------------------ guiders


def dual_cfg_guider(
    ctx: Any,
    model: ModelHandle,
    cond1: list[Any],
    cond2: list[Any],
    negative: list[Any],
    cfg_conds: float,
    cfg_cond2_negative: float,
    style: str = "regular",
) -> tuple[Any]:
    """ComfyUI's DualCFGGuider (:class:`sdengine.diffusion.guidance.DualCFG`)."""
    from sdengine.diffusion.guidance import DualCFG, GuidanceRuleError

    try:
        rule = DualCFG(float(cfg_conds), float(cfg_cond2_negative), style)
    except GuidanceRuleError as e:
        raise NodeError(str(e)) from None
    return (Guider(model, cond1, negative, float(cfg_conds), rule=rule, third=cond2),)


def perp_neg_guider(
    ctx: Any,
    model: ModelHandle,
    positive: list[Any],
    negative: list[Any],
    empty_conditioning: list[Any],
    cfg: float,
    neg_scale: float,
) -> tuple[Any]:
    """ComfyUI's PerpNegGuider (:class:`sdengine.diffusion.guidance.PerpNeg`)."""
    from sdengine.diffusion.guidance import GuidanceRuleError, PerpNeg

    try:
        rule = PerpNeg(float(cfg), float(neg_scale))
    except GuidanceRuleError as e:
        raise NodeError(str(e)) from None
    return (Guider(model, positive, negative, float(cfg), rule=rule, third=empty_conditioning),)


def perp_neg_patch(ctx: Any, model: ModelHandle, empty_conditioning: list[Any], neg_scale: float) -> tuple[Any]:
    """ComfyUI's deprecated PerpNeg node: the model's CFG replaced by Perp-Neg against ``empty_conditioning`` (the
    sampler's cfg and negative), wherever it samples (KSampler, SamplerCustom, CFGGuider)."""
    from sdengine.diffusion.guidance import GuidanceRuleError, PerpNeg

    try:
        PerpNeg(1.0, float(neg_scale), patch=True)
    except GuidanceRuleError as e:
        raise NodeError(str(e)) from None
    return (replace(model, perp_neg=(tuple(empty_conditioning), float(neg_scale))),)


# ---------------------------------------------------------------------------------------------- AddNoise


def add_noise(
    ctx: Any, model: ModelHandle, noise: NoiseSource, sigmas: Sigmas, latent_image: dict[str, Any]
) -> tuple[Any]:
    """ComfyUI's AddNoise: the latent plus the NOISE's noise (RandomNoise's draw, ComfyUI's prepare_noise with the
    latent's batch_index; DisableNoise's zeros) times ``|sigmas[0] - sigmas[-1]|`` (one sigma: that sigma; none: the
    latent as it came), non-finite values made 0. The latent's VAE posterior is dropped (the samples are noisy now);
    its noise mask and batch_index stay."""
    from sdengine.latent_sampling import make_noise

    values = sigmas.values
    if values.shape[0] == 0:
        return (dict(latent_image),)
    pipe = ctx.pipeline(model.ref)
    samples = latent_samples(latent_image, pipe).float()
    scale = abs(float(values[0]) - float(values[-1])) if values.shape[0] > 1 else float(values[0])
    if noise.enabled:
        batch_index = latent_image.get("batch_index") if ctx.seed_rule == "comfyui" else None
        drawn = make_noise(tuple(samples.shape), int(noise.seed), ctx.seed_rule, batch_index)
    else:
        drawn = torch.zeros(samples.shape)
    noisy = torch.nan_to_num(samples.cpu() + drawn * scale, nan=0.0, posinf=0.0, neginf=0.0)
    b, _, h, w = noisy.shape
    f = pipe.vae_scale_factor
    return ({**latent_image, "samples": noisy, "size": (b, h * f, w * f), "posterior": None},)


# ---------------------------------------------------------------------------------------- sampler nodes


ER_SDE_SOLVER_TYPES = ("ER-SDE", "Reverse-time SDE", "ODE")


def sampler_er_sde(ctx: Any, solver_type: str, max_stage: int, eta: float, s_noise: float) -> tuple[Any]:
    """ComfyUI's SamplerER_SDE: er_sde with ER-SDE's noise scale function ("ER-SDE"; eta unused), or the
    reverse-time SDE's ``x^(eta + 1)`` ("Reverse-time SDE"); "ODE", and the reverse-time SDE at eta 0, run eta 0 and
    s_noise 0."""
    eta, s_noise = float(eta), float(s_noise)
    if solver_type == "ODE" or (solver_type == "Reverse-time SDE" and eta == 0):
        eta, s_noise = 0.0, 0.0
    options: dict[str, Any] = {"s_noise": s_noise, "max_stage": int(max_stage)}
    if solver_type != "ER-SDE":
        options["reverse_time_eta"] = eta
    return (SamplerChoice("er_sde", tuple(options.items())),)


def sampler_sa_solver(
    ctx: Any,
    model: ModelHandle,
    eta: float,
    sde_start_percent: float,
    sde_end_percent: float,
    s_noise: float,
    predictor_order: int,
    corrector_order: int,
    use_pece: bool,
    simple_order_2: bool,
) -> tuple[Any]:
    """ComfyUI's SamplerSASolver: sa_solver (sa_solver_pece with use_pece) stochastic (tau = eta) between the model's
    sigmas at sde_end_percent and sde_start_percent of its schedule (ComfyUI's percent_to_sigma), else
    deterministic."""
    from sdengine.diffusion.schedules import percent_to_sigma

    # the model's schedule as a ModelSamplingDiscrete zsnr leaves it (the other schedulers read it so, too)
    from sdengine.pipeline.core import zero_snr_schedule

    pipe = ctx.pipeline(model.ref)
    with zero_snr_schedule(bool(model.zsnr), pipe):
        log_sigmas = pipe.noise_schedule.log_sigmas
        start = percent_to_sigma(log_sigmas, float(sde_start_percent))
        end = percent_to_sigma(log_sigmas, float(sde_end_percent))
    options = {
        "eta": float(eta),
        "sde_start_sigma": start,
        "sde_end_sigma": end,
        "s_noise": float(s_noise),
        "predictor_order": int(predictor_order),
        "corrector_order": int(corrector_order),
        "simple_order_2": bool(simple_order_2),
    }
    return (SamplerChoice("sa_solver_pece" if use_pece else "sa_solver", tuple(options.items())),)


def sampler_seeds_2(ctx: Any, solver_type: str, eta: float, s_noise: float, r: float) -> tuple[Any]:
    """ComfyUI's SamplerSEEDS2: seeds_2 with its settings (phi_2, r 1, eta 0 is exp_heun_2_x0; eta 1 its SDE)."""
    if not 0.0 < float(r) <= 1.0:
        raise NodeError(f"SamplerSEEDS2: r must be in (0, 1], got {r}")
    options = {"eta": float(eta), "s_noise": float(s_noise), "r": float(r), "solver_type": str(solver_type)}
    return (SamplerChoice("seeds_2", tuple(options.items())),)


def sampler_euler_cfg_pp(ctx: Any, version: str) -> tuple[Any]:
    """ComfyUI's SamplerEulerCFGpp: "regular" is KSampler's euler_cfg_pp; its "alternative" (another Euler CFG++
    step, sample_euler_pp) is not in sdengine's samplers and is refused."""
    if version != "regular":
        raise NodeError(
            "SamplerEulerCFGpp: sdengine runs only the 'regular' version (euler_cfg_pp); 'alternative' is not offered"
        )
    return (SamplerChoice("euler_cfg_pp"),)


# ------------------------------------------------------------------------------------------- SamplerLCMUpscale

LCM_UPSCALE = "lcm_upscale"  # the SAMPLER's name: SamplerCustom runs it here (lcm_upscale_loop), not the engine
LCM_UPSCALE_METHODS = ("bislerp", "nearest-exact", "bilinear", "area", "bicubic")


def sampler_lcm_upscale(ctx: Any, scale_ratio: float, scale_steps: int, upscale_method: str) -> tuple[Any]:
    """ComfyUI's SamplerLCMUpscale (comfy_extras/nodes_advanced_samplers.py): LCM steps that upscale the latent by
    ``scale_ratio`` over the first ``scale_steps`` steps (-1: about half of them)."""
    if upscale_method not in LCM_UPSCALE_METHODS:
        raise NodeError(f"SamplerLCMUpscale: upscale_method must be one of {', '.join(LCM_UPSCALE_METHODS)}")
    ratio, steps = float(scale_ratio), int(scale_steps)
    if not (math.isfinite(ratio) and ratio > 0.0):
        raise NodeError(f"SamplerLCMUpscale: scale_ratio must be above 0, got {scale_ratio}")
    if steps < -1:
        raise NodeError(f"SamplerLCMUpscale: scale_steps must be -1 (about half the steps) or more, got {steps}")
    options = (("total_upscale", ratio), ("upscale_steps", steps), ("upscale_method", str(upscale_method)))
    return (SamplerChoice(LCM_UPSCALE, options),)


def lcm_upscales(n_sigmas: int, total_upscale: float, upscale_steps: int) -> list[float]:
    """The scale after each of the first steps (ComfyUI's ``np.linspace(1, total_upscale, k)[1:]``, k = n // 2 + 1
    (at least 2) for ``upscale_steps`` -1, else ``upscale_steps`` + 1 but at most n + 1; n: the sigmas' count)."""
    import numpy as np

    if upscale_steps < 0:
        k = max(n_sigmas // 2 + 1, 2)
    else:
        k = min(upscale_steps + 1, n_sigmas + 1)
    return [float(v) for v in np.linspace(1.0, float(total_upscale), k)[1:]]


def lcm_upscale_loop(
    denoise: Callable[[torch.Tensor, int], torch.Tensor],
    x: torch.Tensor,
    sigmas: list[float],
    total_upscale: float,
    upscale_steps: int,
    upscale_method: str,
    noise: Callable[[tuple[int, ...], int], torch.Tensor],
) -> torch.Tensor:
    """ComfyUI's ``sample_lcm_upscale``: at each step i, ``x = denoise(x, i)`` (the model's x0 at sigmas[i]), then
    resized to round(W * s_i) x round(H * s_i) of the start's size while there is a scale s_i
    (:func:`lcm_upscales`), then ``sigmas[i + 1] * noise(shape, i)`` added unless that sigma is 0. ``x`` in the
    model's units (x0 + sigma * eps); computed in ``x``'s dtype."""
    from sdengine.nn.resize import resize_nchw

    upscales = lcm_upscales(len(sigmas), total_upscale, upscale_steps)
    h0, w0 = int(x.shape[-2]), int(x.shape[-1])
    for i in range(len(sigmas) - 1):
        x = denoise(x, i)
        if i < len(upscales):
            x = resize_nchw(x, round(w0 * upscales[i]), round(h0 * upscales[i]), upscale_method)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise(tuple(x.shape), i).to(x)
    return x


# ------------------------------------------------------------------------------------------------ the table


def _int(name: str, default: int, lo: int, hi: int, limit: str | None = None) -> Input:
    return Input(name, "INT", default, lo, hi, 1, limit=limit)


def _float(name: str, default: float, lo: float, hi: float, step: float = 0.01, exact: bool = True) -> Input:
    """A FLOAT input; ``exact``: ComfyUI's round=False (the value is taken as sent, not rounded to the step)."""
    return Input(name, "FLOAT", default, lo, hi, step, round=False if exact else None)


def _cfg(name: str) -> Input:
    return _float(name, 8.0, 0.0, 100.0, 0.1, exact=False)  # ComfyUI's cfg inputs: round 0.01


SCHEDULERS = "sampling/custom_sampling/schedulers"
GUIDERS = "sampling/custom_sampling/guiders"
SAMPLERS = "sampling/custom_sampling/samplers"
SIGMAS_CATEGORY = "sampling/custom_sampling/sigmas"

NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "PolyexponentialScheduler",
            "PolyexponentialScheduler",
            SCHEDULERS,
            (
                _int("steps", 20, 1, STEPS_MAX, limit="steps"),
                _float("sigma_max", SIGMA_MAX, 0.0, 5000.0),
                _float("sigma_min", SIGMA_MIN, 0.0, 5000.0),
                _float("rho", 1.0, 0.0, 100.0),
            ),
            ("SIGMAS",),
            polyexponential_scheduler,
            description="Sigmas falling from sigma_max to sigma_min, polynomial (rho) in log sigma, then 0.",
        ),
        NodeDef(
            "LaplaceScheduler",
            "LaplaceScheduler",
            SCHEDULERS,
            (
                _int("steps", 20, 1, STEPS_MAX, limit="steps"),
                _float("sigma_max", SIGMA_MAX, 0.0, 5000.0),
                _float("sigma_min", SIGMA_MIN, 0.0, 5000.0),
                _float("mu", 0.0, -10.0, 10.0, 0.1),
                _float("beta", 0.5, 0.0, 10.0, 0.1),
            ),
            ("SIGMAS",),
            laplace_scheduler,
            description="Laplace-distributed log sigmas clamped to [sigma_min, sigma_max]; as ComfyUI's, no 0 "
            "follows them (a sampler ends at the last sigma, with that much noise left).",
        ),
        NodeDef(
            "VPScheduler",
            "VPScheduler",
            SCHEDULERS,
            (
                _int("steps", 20, 1, STEPS_MAX, limit="steps"),
                _float("beta_d", 19.9, 0.0, 5000.0),
                _float("beta_min", 0.1, 0.0, 5000.0),
                _float("eps_s", 0.001, 0.0, 1.0, 0.0001),
            ),
            ("SIGMAS",),
            vp_scheduler,
            description="The continuous VP-SDE's sigmas, then 0 (settings that overflow fail at the node).",
        ),
        NodeDef(
            "SetFirstSigma",
            "SetFirstSigma",
            SIGMAS_CATEGORY,
            (Input("sigmas", "SIGMAS"), _float("sigma", 136.0, 0.0, 20000.0, 0.001)),
            ("SIGMAS",),
            set_first_sigma,
        ),
        NodeDef(
            "ExtendIntermediateSigmas",
            "ExtendIntermediateSigmas",
            SIGMAS_CATEGORY,
            (
                Input("sigmas", "SIGMAS"),
                _int("steps", 2, 1, 100),
                _float("start_at_sigma", -1.0, -1.0, 20000.0),
                _float("end_at_sigma", 12.0, 0.0, 20000.0),
                Input("spacing", "COMBO", "linear", choices=SPACINGS),
            ),
            ("SIGMAS",),
            extend_intermediate_sigmas,
            description="steps - 1 more sigmas after each sigma between end_at_sigma and start_at_sigma (-1: no "
            "upper bound), spaced linearly, by a sine (cosine) or by one minus a cosine (sine).",
        ),
        NodeDef(
            "SamplingPercentToSigma",
            "SamplingPercentToSigma",
            SIGMAS_CATEGORY,
            (
                Input("model", "MODEL"),
                Input("sampling_percent", "FLOAT", 0.0, 0.0, 1.0, 0.0001),
                Input(
                    "return_actual_sigma",
                    "BOOLEAN",
                    False,
                    tooltip="Return the actual sigma value instead of the value used for interval checks.\nThis only "
                    "affects results at 0.0 and 1.0.",
                ),  # fmt: skip
            ),
            ("FLOAT",),
            sampling_percent_to_sigma,
            output_names=("sigma_value",),
        ),
        NodeDef(
            "ManualSigmas",
            "ManualSigmas",
            "_for_testing/custom_sampling",
            (Input("sigmas", "STRING", "1, 0.5"),),
            ("SIGMAS",),
            manual_sigmas,
            description="The numbers of the text as sigmas, in order.",
        ),
        NodeDef(
            "DualCFGGuider",
            "DualCFGGuider",
            GUIDERS,
            (
                Input("model", "MODEL"),
                Input("cond1", "CONDITIONING"),
                Input("cond2", "CONDITIONING"),
                Input("negative", "CONDITIONING"),
                _cfg("cfg_conds"),
                _cfg("cfg_cond2_negative"),
                Input("style", "COMBO", "regular", choices=("regular", "nested")),
            ),
            ("GUIDER",),
            dual_cfg_guider,
            description="CFG over two conditionings: regular neg + cfg_cond2_negative (cond2 - neg) + cfg_conds "
            "(cond1 - cond2); nested neg + cfg_cond2_negative (cond2 + cfg_conds (cond1 - cond2) - neg). Not with "
            "RescaleCFG or PerturbedAttentionGuidance on the model.",
        ),
        NodeDef(
            "PerpNegGuider",
            "PerpNegGuider",
            "_for_testing",
            (
                Input("model", "MODEL"),
                Input("positive", "CONDITIONING"),
                Input("negative", "CONDITIONING"),
                Input("empty_conditioning", "CONDITIONING"),
                _cfg("cfg"),
                _float("neg_scale", 1.0, 0.0, 100.0, exact=False),
            ),
            ("GUIDER",),
            perp_neg_guider,
            description="Perp-Neg: the negative takes away only its part perpendicular to the positive (both "
            "relative to the empty conditioning). Not with RescaleCFG or PerturbedAttentionGuidance on the model.",
        ),
        NodeDef(
            "PerpNeg",
            "Perp-Neg (DEPRECATED by PerpNegGuider)",
            "_for_testing",
            (
                Input("model", "MODEL"),
                Input("empty_conditioning", "CONDITIONING"),
                _float("neg_scale", 1.0, 0.0, 100.0, exact=False),
            ),
            ("MODEL",),
            perp_neg_patch,
            description="The model's CFG replaced by Perp-Neg against the empty conditioning (the sampler's cfg "
            "and negative); not with RescaleCFG, PerturbedAttentionGuidance or another guider rule.",
        ),
        NodeDef(
            "AddNoise",
            "AddNoise",
            "_for_testing/custom_sampling/noise",
            (
                Input("model", "MODEL"),
                Input("noise", "NOISE"),
                Input("sigmas", "SIGMAS"),
                Input("latent_image", "LATENT"),
            ),
            ("LATENT",),
            add_noise,
            description="The latent plus the noise times |first sigma - last sigma| (one sigma: itself).",
        ),
        NodeDef(
            "SamplerER_SDE",
            "SamplerER_SDE",
            SAMPLERS,
            (
                Input("solver_type", "COMBO", "ER-SDE", choices=ER_SDE_SOLVER_TYPES),
                _int("max_stage", 3, 1, 3),
                Input(
                    "eta",
                    "FLOAT",
                    1.0,
                    0.0,
                    100.0,
                    0.01,
                    round=False,
                    tooltip="Stochastic strength of reverse-time SDE.\nWhen eta=0, it reduces to deterministic ODE. "
                    "This setting doesn't apply to ER-SDE solver type.",
                ),  # fmt: skip
                _float("s_noise", 1.0, 0.0, 100.0),
            ),
            ("SAMPLER",),
            sampler_er_sde,
        ),
        NodeDef(
            "SamplerSASolver",
            "SamplerSASolver",
            SAMPLERS,
            (
                Input("model", "MODEL"),
                _float("eta", 1.0, 0.0, 10.0),
                Input("sde_start_percent", "FLOAT", 0.2, 0.0, 1.0, 0.001),
                Input("sde_end_percent", "FLOAT", 0.8, 0.0, 1.0, 0.001),
                _float("s_noise", 1.0, 0.0, 100.0),
                _int("predictor_order", 3, 1, 6),
                _int("corrector_order", 4, 0, 6),
                Input("use_pece", "BOOLEAN", False),
                Input("simple_order_2", "BOOLEAN", False),
            ),
            ("SAMPLER",),
            sampler_sa_solver,
        ),
        NodeDef(
            "SamplerSEEDS2",
            "SamplerSEEDS2",
            SAMPLERS,
            (
                Input("solver_type", "COMBO", "phi_1", choices=("phi_1", "phi_2")),
                Input("eta", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False, tooltip="Stochastic strength"),
                Input("s_noise", "FLOAT", 1.0, 0.0, 100.0, 0.01, round=False, tooltip="SDE noise multiplier"),
                Input(
                    "r",
                    "FLOAT",
                    0.5,
                    0.01,
                    1.0,
                    0.01,
                    round=False,
                    tooltip="Relative step size for the intermediate stage (c2 node)",
                ),  # fmt: skip
            ),
            ("SAMPLER",),
            sampler_seeds_2,
            description="seeds_2 with its settings; solver_type phi_2, r 1, eta 0 is exp_heun_2_x0 (eta 1, s_noise 1: "
            "exp_heun_2_x0_sde).",
        ),
        NodeDef(
            "SamplerLCMUpscale",
            "SamplerLCMUpscale",
            SAMPLERS,
            (
                Input("scale_ratio", "FLOAT", 1.0, 0.1, 20.0, 0.01),
                _int("scale_steps", -1, -1, 1000),
                Input("upscale_method", "COMBO", LCM_UPSCALE_METHODS[0], choices=LCM_UPSCALE_METHODS),
            ),
            ("SAMPLER",),
            sampler_lcm_upscale,
            description="LCM steps (x0 at each sigma, then that sigma's noise) that upscale the latent to scale_ratio "
            "over scale_steps steps (-1: about half); for SamplerCustom; its step noise is sdengine's draws.",
        ),
        NodeDef(
            "SamplerEulerCFGpp",
            "SamplerEulerCFG++",
            "_for_testing",
            (Input("version", "COMBO", "regular", choices=("regular", "alternative")),),
            ("SAMPLER",),
            sampler_euler_cfg_pp,
            description="euler_cfg_pp ('regular'; 'alternative' is refused: sdengine has not that sampler).",
        ),
    )
}
