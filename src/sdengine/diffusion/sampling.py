"""The one place that turns "a sampler name, a schedule and a step count" into samples.

``SAMPLERS`` is the single table: our name, the A1111 name it answers to, the sampler function, which
diffusers spacing rule its `normal` schedule follows, which schedules it accepts, and the diffusers
scheduler class + config that gives the same numbers (the parity tests build that scheduler from
:func:`diffusers_equivalent`). ``A1111_NAMES`` maps A1111's combined names ("DPM++ 2M Karras",
"Euler a") to (sampler, schedule).

``sample(denoiser, noise, *, sampler, steps, ...)`` is the entry point the pipeline and the CLI use:

* ``denoiser``: ``denoiser(x, sigma, **extra_args) -> x0`` (denoisers.Denoiser or a wrapper of one).
  Its ``.schedule`` (a NoiseSchedule) is used unless ``noise_schedule`` is given; if it has
  ``with_timesteps`` the network is handed exactly the timesteps the diffusers scheduler would pass.
* ``noise``: (B, C, H, W) standard normal, row i drawn first from ``generators[i]`` (docs/CONTRACTS.md, Seeds).
* ``scheduler_config``: the model's diffusers scheduler config (any class); the keys that the sampler's
  diffusers class would take from it (timestep_spacing, steps_offset, set_alpha_to_one, betas, ...)
  override that class's defaults, as ``SomeScheduler.from_config(model_config)`` does.
* img2img: ``init_latent`` (B, C, H, W) and ``strength`` in (0, 1]: runs the last ``int(steps *
  strength)`` steps from ``init_latent + sigma_start * noise``, the steps diffusers runs.
* Returns the final latent in the network's (VP) scaling: x0 when the last sigma is 0 (every sampler
  except DDIM/PLMS with ``set_alpha_to_one=False``, which end at alphas_cumprod[0] as diffusers does).
* ``callback(step, sigma, x, denoised)``; returning False raises samplers.SamplingInterrupted.
* Flow-matching models (SD3, Flux): a ``.schedule`` (or ``noise_schedule``) that is a
  :class:`sdengine.diffusion.flow.FlowSchedule` runs :func:`_sample_flow` instead: the flow grid, the flow start
  (``noise``, or ``flow_noise_scaling`` of the init), the samplers that are right on flow models in the view that
  makes them so, the rest refused; it returns the flow-scaled latent (docs/flow-matching.md).

All input errors are a one-line ``ValueError`` raised before any model call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sdengine.diffusion import samplers as S
from sdengine.diffusion.brownian import BrownianSpec
from sdengine.diffusion.edm import EDMSchedule, edm_grid, edm_sampler_check
from sdengine.diffusion.flow import (
    FIRST_SIGMA_PERCENT,
    FLOW_SCHEDULES,
    FlowSchedule,
    VEView,
    flow_grid,
    flow_img2img_start,
    flow_noise_scaling,
    flow_sampler_view,
    ve_sigma,
)
from sdengine.diffusion.schedules import (
    A1111_GRID_SAMPLERS,
    SCHEDULES,
    SIGMA_TABLE_SCHEDULES,
    NoiseSchedule,
    SamplingGrid,
    a1111_timestep_grid,
    config_get,
    img2img_start,
    percent_to_sigma,
    sampling_grid,
    sigma_to_t,
)
from sdengine.errors import UsageError
from sdengine.names import UnknownNameError, unknown_name

ALL_SCHEDULES = SCHEDULES  # normal, karras, exponential, sgm_uniform and the sigma-table ones (schedules.py)


@dataclass(frozen=True)
class SamplerSpec:
    """One row of the sampler table."""

    name: str
    a1111: str
    fn: Callable[..., Tensor]
    rule: str  # which diffusers spacing rule `normal` follows (schedules.SPACING_RULES)
    diffusers_class: str
    diffusers_kwargs: Mapping[str, Any] = field(default_factory=dict)
    # diffusers class defaults that differ from the rule's defaults and that the grid reads
    class_defaults: Mapping[str, Any] = field(default_factory=dict)
    schedules: tuple[str, ...] = ALL_SCHEDULES
    stochastic: bool = False  # draws noise each step: needs generators
    vp_init: bool = False  # diffusers' init_noise_sigma is 1 in VP (else the Euler-family rule)
    round_karras_timesteps: bool = False
    parity_schedules: tuple[str, ...] = ("normal", "karras", "exponential")  # what diffusers offers
    in_a1111: bool = True  # listed by the A1111 API (GET /sdapi/v1/samplers); ComfyUI's own ones are not


# Samplers that step on diffusers' timestep grid itself (no sigma grid to stop and resume on), and Restart, which
# walks a grid of its own: a run cannot end at a step and hand its still noisy latent on (``end_step``; the SDXL
# base -> refiner hand-off).
TIMESTEP_SAMPLERS = ("ddim", "plms", "lcm", "ddpm", "restart")
SAMPLERS: dict[str, SamplerSpec] = {
    spec.name: spec
    for spec in (
        SamplerSpec(
            "ddpm",
            "DDPM",
            S.sample_ddpm,
            "discrete",
            "DDPMScheduler",
            class_defaults={"clip_sample": True},
            stochastic=True,
            vp_init=True,
            parity_schedules=("normal",),
        ),
        SamplerSpec(
            "ddim",
            "DDIM",
            S.sample_ddim,
            "discrete",
            "DDIMScheduler",
            {"clip_sample": False},
            class_defaults={"set_alpha_to_one": True},
            vp_init=True,
            parity_schedules=("normal",),
        ),
        SamplerSpec("euler", "Euler", S.sample_euler, "k", "EulerDiscreteScheduler"),
        SamplerSpec(
            "euler_a",
            "Euler a",
            S.sample_euler_a,
            "k",
            "EulerAncestralDiscreteScheduler",
            stochastic=True,
            parity_schedules=("normal",),
        ),
        SamplerSpec("heun", "Heun", S.sample_heun, "k", "HeunDiscreteScheduler"),
        SamplerSpec("dpm2", "DPM2", S.sample_dpm2, "k", "KDPM2DiscreteScheduler", round_karras_timesteps=True),
        SamplerSpec(
            "dpm2_a",
            "DPM2 a",
            S.sample_dpm2_a,
            "k",
            "KDPM2AncestralDiscreteScheduler",
            stochastic=True,
            round_karras_timesteps=True,
        ),
        SamplerSpec("lms", "LMS", S.sample_lms, "k", "LMSDiscreteScheduler"),
        SamplerSpec(
            "dpmpp_2m",
            "DPM++ 2M",
            S.sample_dpmpp_2m,
            "multistep",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
            vp_init=True,
            round_karras_timesteps=True,
        ),
        SamplerSpec(
            "dpmpp_2m_sde",
            "DPM++ 2M SDE",
            S.sample_dpmpp_2m_sde,
            "multistep",
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "final_sigmas_type": "zero"},
            stochastic=True,
            vp_init=True,
            round_karras_timesteps=True,
        ),
        SamplerSpec(
            "dpmpp_2m_sde_heun",
            "DPM++ 2M SDE Heun",
            S.sample_dpmpp_2m_sde_heun,
            "multistep",  # the grid of DPM++ 2M SDE (diffusers has no Heun form of it)
            "",
            stochastic=True,
            vp_init=True,
            round_karras_timesteps=True,
            parity_schedules=(),
        ),
        SamplerSpec("dpmpp_sde", "DPM++ SDE", S.sample_dpmpp_sde, "k", "DPMSolverSDEScheduler", stochastic=True),
        SamplerSpec(
            "dpmpp_2s_a",
            "DPM++ 2S a",
            S.sample_dpmpp_2s_a,
            "k",
            "",  # diffusers has no ancestral DPM-Solver++(2S)
            stochastic=True,
            parity_schedules=(),
        ),
        SamplerSpec(
            "dpmpp_3m_sde",
            "DPM++ 3M SDE",
            S.sample_dpmpp_3m_sde,
            "k",
            "",  # diffusers' 3rd-order DPM-Solver++ SDE is another discretisation
            stochastic=True,
            parity_schedules=(),
        ),
        SamplerSpec(
            "unipc",
            "UniPC",
            S.sample_unipc,
            "multistep",
            "UniPCMultistepScheduler",
            {"solver_order": 2, "solver_type": "bh2", "predict_x0": True, "final_sigmas_type": "zero"},
            vp_init=True,
            round_karras_timesteps=True,
        ),
        SamplerSpec(
            "lcm",
            "LCM",
            S.sample_lcm,
            "lcm",
            "LCMScheduler",
            {"clip_sample": False},
            # its own grid, or any list of sigmas (ComfyUI's lcm + simple, beta, ...); not diffusers' Karras or
            # exponential spacings (LCMScheduler has none)
            schedules=("normal", "sgm_uniform", *SIGMA_TABLE_SCHEDULES),
            stochastic=True,
            vp_init=True,
            parity_schedules=("normal",),
        ),
        SamplerSpec(
            "ipndm", "iPNDM", S.sample_ipndm, "k", "", parity_schedules=(), in_a1111=False
        ),  # ComfyUI's; not in A1111
        SamplerSpec("ipndm_v", "iPNDM_v", S.sample_ipndm_v, "k", "", parity_schedules=(), in_a1111=False),  # ComfyUI's
        SamplerSpec("heunpp2", "HeunPP2", S.sample_heunpp2, "k", "", parity_schedules=(), in_a1111=False),  # ComfyUI's
        # ComfyUI's, which A1111 does not have (its sampler list leaves them out); diffusers has none of them (its
        # DEISMultistepScheduler is the rho-space form, not ComfyUI's tAB)
        *(
            SamplerSpec(name, label, fn, "k", "", stochastic=stochastic, parity_schedules=(), in_a1111=False)
            for name, label, fn, stochastic in (
                ("euler_cfg_pp", "Euler CFG++", S.sample_euler_cfg_pp, False),
                ("euler_a_cfg_pp", "Euler a CFG++", S.sample_euler_a_cfg_pp, True),
                ("dpmpp_2m_cfg_pp", "DPM++ 2M CFG++", S.sample_dpmpp_2m_cfg_pp, False),
                ("dpmpp_2s_a_cfg_pp", "DPM++ 2S a CFG++", S.sample_dpmpp_2s_a_cfg_pp, True),
                ("res_multistep", "RES Multistep", S.sample_res_multistep, False),
                ("res_multistep_a", "RES Multistep a", S.sample_res_multistep_a, True),
                ("res_multistep_cfg_pp", "RES Multistep CFG++", S.sample_res_multistep_cfg_pp, False),
                ("res_multistep_a_cfg_pp", "RES Multistep a CFG++", S.sample_res_multistep_a_cfg_pp, True),
                ("er_sde", "ER SDE", S.sample_er_sde, True),
                ("deis", "DEIS", S.sample_deis, False),
                ("gradient_estimation", "Gradient Estimation", S.sample_gradient_estimation, False),
                ("gradient_estimation_cfg_pp", "Gradient Estimation CFG++", S.sample_gradient_estimation_cfg_pp, False),
                ("exp_heun_2_x0", "Exp Heun 2 x0", S.sample_exp_heun_2_x0, False),
                ("exp_heun_2_x0_sde", "Exp Heun 2 x0 SDE", S.sample_exp_heun_2_x0_sde, True),
                ("seeds_2", "SEEDS 2", S.sample_seeds_2, True),
                ("seeds_3", "SEEDS 3", S.sample_seeds_3, True),
                ("sa_solver", "SA-Solver", S.sample_sa_solver, True),
                ("sa_solver_pece", "SA-Solver PECE", S.sample_sa_solver_pece, True),
            )
        ),
        # k-diffusion's DPM-Solver samplers: they read only the grid's ends (and, DPM fast, its step count)
        SamplerSpec("dpm_fast", "DPM fast", S.sample_dpm_fast, "k", "", stochastic=True, parity_schedules=()),
        SamplerSpec(
            "dpm_adaptive", "DPM adaptive", S.sample_dpm_adaptive, "k", "", stochastic=True, parity_schedules=()
        ),
        SamplerSpec(
            "restart",
            "Restart",
            S.sample_restart,
            "k",
            "",  # diffusers has no Restart sampler
            stochastic=True,
            parity_schedules=(),
        ),
        SamplerSpec(
            "plms",
            "PLMS",
            S.sample_plms,
            "discrete",
            "PNDMScheduler",
            {"skip_prk_steps": True},
            class_defaults={"set_alpha_to_one": False},
            schedules=("normal",),
            vp_init=True,
            parity_schedules=("normal",),
        ),
    )
}

# The CFG++ samplers: they read the unconditional x0 of every call (samplers.GuidanceParts), so guidance runs its
# unconditional pass, with the negative prompt, at CFG scale 1 too (as ComfyUI's).
CFG_PP_SAMPLERS = tuple(name for name in SAMPLERS if name.endswith("_cfg_pp"))

SCHEDULE_A1111: dict[str, str] = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "kl_optimal": "KL Optimal",
    "align_your_steps": "Align Your Steps",
    # A1111 has one "Align Your Steps" and picks the table by the model (SDXL's on SDXL, SD 1.5's elsewhere): the
    # SDXL table chosen on another model is sdengine's own, and needs its own label to be read back as itself
    # (infotext_schedule writes A1111's label for it on an SDXL model)
    "align_your_steps_sdxl": "Align Your Steps SDXL",
    "uniform": "Uniform",
    "polyexponential": "Polyexponential",
    "linear_quadratic": "Linear Quadratic",  # ComfyUI's; A1111 has none
}
# Other spellings of the schedules, read in any case: ComfyUI's names where they differ from ours, A1111's alias.
SCHEDULE_ALIASES: dict[str, str] = {
    "ddim": "ddim_uniform",
    "sgmuniform": "sgm_uniform",
    "ays": "align_your_steps",
    "ays_sdxl": "align_your_steps_sdxl",
}
# The schedules A1111's combined sampler names carry ("DPM++ 2M Karras"); the newer ones only go by "Schedule type".
COMBINED_SCHEDULES = ("karras", "exponential", "sgm_uniform")

# A1111's combined names ("DPM++ 2M Karras"), its separate "Schedule type" names, and ours.
A1111_NAMES: dict[str, tuple[str, str | None]] = {}
for _spec in SAMPLERS.values():
    A1111_NAMES[_spec.a1111] = (_spec.name, None)
    for _sched in _spec.schedules:
        if _sched in COMBINED_SCHEDULES:
            A1111_NAMES[f"{_spec.a1111} {SCHEDULE_A1111[_sched]}"] = (_spec.name, _sched)
del _spec, _sched

# A1111's k-diffusion aliases of its samplers (``k_dpmpp_2m``, ``k_euler_a``, ...), still sent by older clients
# and scripts; read in any case.
K_ALIASES = {
    "k_dpmpp_2m": "dpmpp_2m",
    "k_dpmpp_sde": "dpmpp_sde",
    "k_dpmpp_2m_sde": "dpmpp_2m_sde",
    "k_euler_a": "euler_a",
    "k_euler_ancestral": "euler_a",
    "k_euler": "euler",
    "k_lms": "lms",
    "k_heun": "heun",
    "k_dpm_2": "dpm2",
    "k_dpm_2_a": "dpm2_a",
    "k_lcm": "lcm",
    "k_dpmpp_2s_a": "dpmpp_2s_a",
    "k_dpmpp_3m_sde": "dpmpp_3m_sde",
    "k_dpmpp_2m_sde_heun": "dpmpp_2m_sde_heun",
    "k_restart": "restart",
    "k_dpm_fast": "dpm_fast",
    "k_dpm_ad": "dpm_adaptive",
}
# SA-Solver's stochastic window (ComfyUI's default: sde_start_percent 0.2, sde_end_percent 0.8 of the schedule, read
# with its percent_to_sigma): sample() hands the sigmas of these percents to the samplers unless they are given.
SA_SOLVERS = ("sa_solver", "sa_solver_pece")
SA_SOLVER_SDE_PERCENTS = (0.2, 0.8)
# Samplers whose calls depend on the model's answers (step-size control): no recorded loop replays them.
ADAPTIVE_SAMPLERS = ("dpm_adaptive",)


# A1111's "Automatic" schedule (1.10, sd_samplers_kdiffusion.get_sigmas): the sampler's own default where its
# table names one, else the model's own sigmas spaced evenly in timestep from T - 1 to 0 (k-diffusion's
# get_sigmas: our "uniform"). Samplers not listed (DDIM, PLMS, UniPC, LCM, DDPM, iPNDM) keep their own grid ("normal").
A1111_AUTOMATIC: dict[str, str] = {
    **dict.fromkeys(("dpmpp_2m", "dpmpp_sde", "dpmpp_2s_a", "dpm2", "dpm2_a", "restart"), "karras"),
    **dict.fromkeys(("dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"), "exponential"),
    **dict.fromkeys(("euler", "euler_a", "lms", "heun", "dpm_fast", "dpm_adaptive"), "uniform"),
}

# The samplers whose step noise A1111 and ComfyUI draw from a Brownian tree (k-diffusion's BrownianTreeNoiseSampler;
# A1111 1.10's "brownian_noise" samplers, ComfyUI's dpmpp_sde / dpmpp_2m_sde(_heun) / dpmpp_3m_sde): sample(brownian=).
BROWNIAN_SAMPLERS = ("dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde")

# The samplers that walk a rising sigma list (ComfyUI's FlipSigmas: "unsampling" a latent back towards noise, to be
# sampled again) as written: deterministic steps of the probability-flow ODE in sigma, which integrate upward as well
# as downward (held against the exact flow of Gaussian data, tests/test_comfy_sigmas.py). Not the samplers that draw
# noise (ancestral, SDE, churn: the size of their fresh noise assumes a falling sigma; k-diffusion's
# get_ancestral_step takes the root of a negative there), nor those whose steps go wrong upward (below).
RISING_SIGMA_SAMPLERS = (
    "euler", "heun", "dpm2", "lms", "dpmpp_2m", "ipndm", "ipndm_v", "deis", "euler_cfg_pp", "dpmpp_2m_cfg_pp",
    "res_multistep", "res_multistep_cfg_pp",
)  # fmt: skip
_NOT_RISING = {
    "heunpp2": "its weights divide by the first sigma, so its steps blow up when that is the smallest",
    "unipc": "its multistep corrections do not converge when sigma rises",
    "dpm_fast": "it integrates from the first sigma down to the last",
    "dpm_adaptive": "it integrates from the first sigma down to the last",
}


def rising_sigmas_problem(sampler: str, options: Mapping[str, Any] | None = None) -> str | None:
    """Why sdengine's ``sampler`` (with its ``options``) cannot walk rising sigmas, or None when it can
    (:data:`RISING_SIGMA_SAMPLERS`)."""
    if sampler in RISING_SIGMA_SAMPLERS:
        if float((options or {}).get("s_churn", 0.0)) > 0:
            return "its churn (s_churn) adds fresh noise, whose size assumes falling sigmas"
        return None
    if sampler in TIMESTEP_SAMPLERS:
        return "it walks its own timestep grid"
    if sampler in _NOT_RISING:
        return _NOT_RISING[sampler]
    return "it adds fresh noise each step, whose size assumes falling sigmas"


def sigma_list_problem(sigmas: Tensor) -> str | None:
    """What is wrong with an explicit sigma list (ComfyUI's SIGMAS) as a run's grid, or None: it must be finite and
    either decrease to a last sigma at or above 0, or rise (unsampling) from a first sigma above 0. Whether the
    sampler can walk a rising one is :func:`rising_sigmas_problem`'s question."""
    v = sigmas.detach().to("cpu", torch.float64).reshape(-1)
    wrong = "sigmas must be finite, decreasing and end at or above 0, or rise from above 0 (unsampling)"
    if not bool(torch.isfinite(v).all()):
        return wrong
    if v.shape[0] < 2 or bool((v[1:] < v[:-1]).all()):
        return None if float(v[-1]) >= 0 else wrong
    if bool((v[1:] > v[:-1]).all()):
        if float(v[0]) <= 0:
            return "rising sigmas (unsampling) must start above 0 (FlipSigmas makes a first 0 into 0.0001)"
        return None
    return wrong


def sigmas_rise(sigmas: Tensor) -> bool:
    """Whether an explicit sigma list rises (unsampling; see :func:`sigma_list_problem`)."""
    return sigmas.numel() > 1 and float(sigmas.reshape(-1)[1]) > float(sigmas.reshape(-1)[0])


# The samplers A1111 runs with ``discard_next_to_last_sigma`` (1.10's sd_samplers_kdiffusion.samplers_k_diffusion:
# DPM2, DPM2 a, DPM++ 3M SDE): their grid is made for one step more and its next-to-last sigma dropped
# (:func:`make_grid`); its ``always_discard_next_to_last_sigma`` option does so for every sampler.
A1111_DISCARD_SAMPLERS = ("dpm2", "dpm2_a", "dpmpp_3m_sde")

AUTO_SCHEDULE = "auto"  # no schedule chosen: the one the sampler names, else karras where it fits, else its own

# ComfyUI's sampler names where they differ from ours (server/comfy/nodes.SAMPLER_NAMES runs them; a test keeps
# the two agreeing): not accepted here, only suggested ("euler_ancestral" -> did you mean 'euler_a'?).
COMFY_SAMPLER_SPELLINGS: dict[str, str] = {
    "euler_ancestral": "euler_a",
    "euler_ancestral_cfg_pp": "euler_a_cfg_pp",
    "dpm_2": "dpm2",
    "dpm_2_ancestral": "dpm2_a",
    "dpmpp_2s_ancestral": "dpmpp_2s_a",
    "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_a_cfg_pp",
    "dpmpp_sde_gpu": "dpmpp_sde",
    "dpmpp_2m_sde_gpu": "dpmpp_2m_sde",
    "dpmpp_2m_sde_heun_gpu": "dpmpp_2m_sde_heun",
    "dpmpp_3m_sde_gpu": "dpmpp_3m_sde",
    "res_multistep_ancestral": "res_multistep_a",
    "res_multistep_ancestral_cfg_pp": "res_multistep_a_cfg_pp",
    "uni_pc": "unipc",
    "uni_pc_bh2": "unipc",
}
SAMPLERS_HINT = "`sdengine list samplers` lists all"
SCHEDULES_HINT = "`sdengine list schedules` lists all"


def sampler_spellings() -> dict[str, str]:
    """Every spelling of a sampler that is accepted or suggested -> the name to suggest for it: ours, A1111's
    ("Euler a" -> euler_a; a combined "DPM++ 2M Karras" as itself, which names the schedule too), its k-diffusion
    aliases and ComfyUI's names."""
    out = {name: name for name in SAMPLERS}
    for a1111, (name, implied) in A1111_NAMES.items():
        out.setdefault(a1111, a1111 if implied else name)
    for alias, name in (*K_ALIASES.items(), *COMFY_SAMPLER_SPELLINGS.items()):
        if name in SAMPLERS:
            out.setdefault(alias, name)
    return out


def schedule_spellings() -> dict[str, str]:
    """Every spelling of a schedule :func:`resolve` takes -> the name to suggest for it."""
    out = {name: name for name in SCHEDULES}
    out.update({label: name for name, label in SCHEDULE_A1111.items() if name in SCHEDULES})
    out.update({alias: name for alias, name in SCHEDULE_ALIASES.items()})
    out.update({"Automatic": "Automatic", AUTO_SCHEDULE: AUTO_SCHEDULE})
    return out


def unknown_sampler(sampler: object, *, hint: str | None = SAMPLERS_HINT) -> UnknownNameError:
    """The one-line error of a sampler name none of the accepted spellings: the closest ones suggested, with
    their A1111 name ("unknown sampler 'eular a'; did you mean 'euler_a' ('Euler a')? (...)")."""
    labels = {name: spec.a1111 for name, spec in SAMPLERS.items()}
    return unknown_name("sampler", sampler, sampler_spellings(), labels=labels, hint=hint)


def unknown_schedule(schedule: object, *, hint: str | None = SCHEDULES_HINT) -> UnknownNameError:
    """As :func:`unknown_sampler`, for a schedule (A1111's "Schedule type")."""
    return unknown_name("schedule", schedule, schedule_spellings(), labels=SCHEDULE_A1111, hint=hint)


def resolve(sampler: str, schedule: str | None = None, *, sdxl: bool = False) -> tuple[str, str]:
    """(our sampler name, our schedule name) from ours or A1111's ("DPM++ 2M Karras", "Euler a",
    schedule "Karras" / "Automatic"); raises a one-line ValueError listing valid names.

    ``schedule`` None is the model's own spacing ("normal", diffusers') unless the sampler's name implies one;
    A1111's "Automatic" is what A1111 runs (:data:`A1111_AUTOMATIC`: "uniform" for Euler, karras for DPM++ 2M,
    ...); ``"auto"`` (what a user who chose none gets) is the implied one, else karras where the
    sampler takes it, else the sampler's first. An explicit schedule that contradicts the name is refused.
    ``sdxl``: the model is an SDXL one, whose Align Your Steps table is the SDXL one (as A1111 picks it)."""
    name, implied = sampler, None
    if isinstance(sampler, str) and sampler.strip().lower() in K_ALIASES:
        name = K_ALIASES[sampler.strip().lower()]
    elif sampler not in SAMPLERS:
        if sampler in A1111_NAMES:
            name, implied = A1111_NAMES[sampler]
        else:
            raise unknown_sampler(sampler)
    spec = SAMPLERS[name]
    sched = schedule
    if isinstance(sched, str) and sched.strip().lower() == AUTO_SCHEDULE:
        sched = implied or ("karras" if "karras" in spec.schedules else spec.schedules[0])
    elif sched is not None and sched not in SCHEDULES:
        by_a1111 = {v.lower(): k for k, v in reversed(SCHEDULE_A1111.items())}  # the first of a shared label
        key = sched.strip().lower()
        if key == "automatic":  # A1111's: what A1111 runs (a combined name's own schedule first)
            sched = None if implied else A1111_AUTOMATIC.get(name)
        elif key in by_a1111:
            sched = by_a1111[key]
        elif key in SCHEDULES:
            sched = key
        elif key in SCHEDULE_ALIASES:
            sched = SCHEDULE_ALIASES[key]
        else:
            raise unknown_schedule(schedule)
    if implied is not None and sched not in (None, implied):
        raise UsageError(
            f"sampler {sampler!r} already names schedule {implied!r}, got schedule {schedule!r}: give sampler "
            f"{spec.a1111!r} (or {name!r}) with that schedule, or no schedule"
        )
    sched = implied or sched or "normal"
    if sdxl and sched == "align_your_steps":
        sched = "align_your_steps_sdxl"
    if sched not in spec.schedules:
        raise UsageError(f"sampler {name!r} cannot use schedule {sched!r}; it supports: {', '.join(spec.schedules)}")
    return name, sched


def infotext_schedule(schedule: str, *, sdxl: bool) -> str:
    """The schedule name an image's infotext records for ``schedule`` (a resolved one) on a model that is
    SDXL or not: on SDXL, A1111's "Align Your Steps" is the SDXL table (:func:`resolve` reads it back so), so the
    SDXL table is written with A1111's label there; elsewhere every schedule keeps its own label."""
    if sdxl and schedule == "align_your_steps_sdxl":
        return "align_your_steps"
    return schedule


def effective_config(sampler: str, scheduler_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The model's scheduler config as the sampler's diffusers class would see it after from_config."""
    spec = SAMPLERS[sampler]
    cfg = dict(spec.class_defaults)
    cfg.update({k: v for k, v in (scheduler_config or {}).items() if not k.startswith("_") and v is not None})
    if sampler == "ddpm":
        cfg["set_alpha_to_one"] = True  # DDPM's last step always ends at alphas_cumprod = 1
    return cfg


def diffusers_equivalent(
    sampler: str, schedule: str = "normal", scheduler_config: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """(diffusers scheduler class name, config kwargs) that give the same trajectory as ours, for the
    parity tests and for users who compare. Raises ValueError where diffusers has no such option."""
    name, sched = resolve(sampler, schedule)
    spec = SAMPLERS[name]
    if not spec.diffusers_class:
        raise UsageError(f"diffusers has no {spec.a1111} sampler ({name})")
    if sched not in spec.parity_schedules:
        raise UsageError(f"diffusers' {spec.diffusers_class} has no {sched!r} schedule")
    cfg = effective_config(name, scheduler_config)
    keep = (
        "num_train_timesteps",
        "beta_start",
        "beta_end",
        "beta_schedule",
        "trained_betas",
        "prediction_type",
        "timestep_spacing",
        "steps_offset",
        "rescale_betas_zero_snr",
        "set_alpha_to_one",
        "clip_sample",
        "clip_sample_range",
        "original_inference_steps",
        "timestep_scaling",
    )
    kwargs = {k: cfg[k] for k in keep if k in cfg}
    kwargs.update(spec.diffusers_kwargs)
    if sched == "karras":
        kwargs["use_karras_sigmas"] = True
    elif sched == "exponential":
        kwargs["use_exponential_sigmas"] = True
    return spec.diffusers_class, kwargs


def make_grid(
    sampler: str,
    steps: int,
    noise_schedule: NoiseSchedule | EDMSchedule,
    schedule: str = "normal",
    scheduler_config: Mapping[str, Any] | None = None,
    strength: float = 1.0,
    *,
    a1111_grid: bool = False,
    discard_penultimate: bool = False,
    comfy_grid: bool = False,
) -> SamplingGrid:
    """The sigma/timestep grid ``sampler`` walks for ``steps`` steps of ``schedule``; ``a1111_grid``: DDIM and
    PLMS walk A1111's own grid instead, whatever the schedule (as A1111, :func:`a1111_timestep_grid`).
    ``comfy_grid``: every schedule is ComfyUI's list of that name (karras and exponential between the model's
    sigma_min and sigma_max, as ComfyUI's ``calculate_sigmas``, not diffusers' grids; the others are ComfyUI's
    already), the network at each sigma's fractional timestep (``sampling_grid``'s ``comfy``).

    ``discard_penultimate``: A1111's and ComfyUI's "discard next-to-last sigma" (A1111's DPM2, DPM2 a and DPM++ 3M
    SDE, or any sampler with its ``always_discard_next_to_last_sigma``; ComfyUI's KSampler with dpm_2,
    dpm_2_ancestral, uni_pc, uni_pc_bh2): the grid is made for ``steps + 1`` steps and its next-to-last sigma
    dropped, so it still has ``steps`` steps, the last one longer. On A1111's own DDIM / PLMS grid the option
    makes that grid for ``steps + 1`` steps and drops nothing (its ``CompVisSampler.get_timesteps``)."""
    name, sched = resolve(sampler, schedule)
    spec = SAMPLERS[name]
    extra = 1 if discard_penultimate else 0
    if isinstance(noise_schedule, EDMSchedule):  # an EDM model's grid (sdengine.diffusion.edm)
        edm_sampler_check(name)
        grid = edm_grid(noise_schedule, steps + extra, sched, comfy=comfy_grid)
        return drop_penultimate(grid) if extra else grid
    if a1111_grid and name in A1111_GRID_SAMPLERS:
        return a1111_timestep_grid(steps + extra, noise_schedule)
    grid = sampling_grid(
        sched,
        steps + extra,
        noise_schedule,
        rule=spec.rule,
        config=effective_config(name, scheduler_config),
        round_karras_timesteps=spec.round_karras_timesteps and _rounds_karras(name, scheduler_config),
        strength=strength if spec.rule == "lcm" else 1.0,
        comfy=comfy_grid,
    )
    if name == "ddpm":
        # DDPM steps to the next timestep of its list and from the last one to alphas_cumprod = 1.
        sigmas = grid.sigmas.clone()
        sigmas[-1] = 0.0
        grid = SamplingGrid(sigmas=sigmas, timesteps=grid.timesteps, targets=None)
    if extra:
        grid = drop_penultimate(grid)
    return grid


def drop_penultimate(grid: SamplingGrid) -> SamplingGrid:
    """``grid`` without its next-to-last sigma (``torch.cat([sigmas[:-2], sigmas[-1:]])``, as A1111 and ComfyUI
    discard it) and that point's timestep; a DDIM / PNDM target list likewise keeps its last target."""
    if grid.steps < 2:
        raise UsageError("discarding the next-to-last sigma needs a grid of 2 steps or more")
    sigmas = torch.cat([grid.sigmas[:-2], grid.sigmas[-1:]])
    targets = None if grid.targets is None else torch.cat([grid.targets[:-2], grid.targets[-1:]])
    return SamplingGrid(sigmas=sigmas, timesteps=grid.timesteps[:-1].clone(), targets=targets)


def _rounds_karras(sampler: str, scheduler_config: Mapping[str, Any] | None) -> bool:
    # DPM-Solver++ keeps fractional (then int-truncated) Karras timesteps for squaredcos_cap_v2 only.
    if sampler in ("dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun"):
        return config_get(scheduler_config, "beta_schedule", "linear") != "squaredcos_cap_v2"
    return True


def init_noise_scale(sampler: str, grid: SamplingGrid, scheduler_config: Mapping[str, Any] | None) -> float:
    """VE standard deviation of the starting sample, as the diffusers scheduler's init_noise_sigma."""
    spec = SAMPLERS[sampler]
    s0 = float(grid.sigmas.max())
    if spec.vp_init:
        return math.sqrt(1 + float(grid.sigmas[0]) ** 2)  # x_VP = noise
    default = "leading" if spec.rule in ("discrete", "lcm") else "linspace"
    spacing = config_get(effective_config(sampler, scheduler_config), "timestep_spacing", default)
    return s0 if spacing in ("linspace", "trailing") else math.sqrt(s0**2 + 1)


def sampler_option_names(name: str) -> list[str]:
    """The keyword options ``sampler_options`` may set for sampler ``name`` (its function's own keywords,
    without the ones :func:`sample` always passes)."""
    import inspect

    fn = SAMPLERS[name].fn
    # steps_after: sample's own (end_step); flow: set by sample() on flow models
    fixed = {"generators", "callback", "extra_args", "steps_after", "flow"}
    params = list(inspect.signature(fn).parameters.values())[3:]  # after (denoiser, x, sigmas)
    return [p.name for p in params if p.name not in fixed and p.kind is inspect.Parameter.KEYWORD_ONLY]


def sample(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    *,
    sampler: str,
    steps: int,
    schedule: str = "normal",
    scheduler_config: Mapping[str, Any] | None = None,
    generators: S.Generators | None = None,
    callback: S.Callback | None = None,
    extra_args: dict[str, Any] | None = None,
    init_latent: Tensor | None = None,
    strength: float = 1.0,
    start_step: int | None = None,
    noise_schedule: NoiseSchedule | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    end_step: int | None = None,
    sigmas: Tensor | None = None,
    a1111_grid: bool = False,
    noise_from: int | None = None,
    discard_penultimate: bool = False,
    brownian: BrownianSpec | None = None,
    noise_scale: float | None = None,
    comfy_grid: bool = False,
    end_as_run: bool = False,
    end_at_zero: bool = False,
) -> Tensor:
    """Run ``sampler`` for ``steps`` steps from unit ``noise`` (txt2img) or from ``init_latent`` noised to
    ``strength`` (img2img); returns the final latent (x0). See the module docstring.

    ``end_step`` k stops after the grid's step k - 1 and returns the still noisy latent at ``grid.sigmas[k]``
    (in the network's VP scaling, like every return): the first half of a hand-off to another model (SDXL
    base -> refiner, diffusers' ``denoising_end``), which continues with ``start_step=k``. By default the part run
    is a part of the grid (UniPC keeps its full order to its end, as diffusers' scheduler); ``end_as_run``: it is a
    run of its own on the sub-schedule (UniPC lowers its order at its end, as at the end of any run: ComfyUI's
    KSamplerAdvanced, a fresh sampler on each window); ``end_at_zero``: the sub-schedule's last sigma is taken as 0
    (ComfyUI's ``force_full_denoise``, KSamplerAdvanced without leftover noise): the sampler's last step goes to 0
    and the result is its x0.

    ``sigmas``: an explicit decreasing sigma list (ComfyUI's SIGMAS) walked instead of ``schedule``'s grid, the
    network seeing each sigma's fractional timestep; ``steps`` must be its length - 1. A rising list (from above 0:
    unsampling, ComfyUI's FlipSigmas) is walked upward by the samplers of :data:`RISING_SIGMA_SAMPLERS`. Without
    ``init_latent`` the start is ``noise * sqrt(1 + sigmas[0]**2)`` (ComfyUI's start from pure noise), with it
    ``init_latent + noise * sigmas[0]``. Not for the timestep samplers (DDIM, PLMS, LCM, DDPM, restart).

    ``a1111_grid``: DDIM / PLMS on A1111's grid (:func:`make_grid`), PLMS combining the noise estimates as A1111
    does. ``noise_from``: the grid index img2img noises the init to when it is not ``start_step`` (A1111's DDIM /
    PLMS noise one point higher than they start, :func:`a1111_timestep_start`); that VP sample is read at
    ``start_step``. ``discard_penultimate``: the grid without its next-to-last sigma (:func:`make_grid`).
    ``comfy_grid``: the schedule is ComfyUI's list of its name (:func:`make_grid`).
    ``brownian``: an SDE sampler (:data:`BROWNIAN_SAMPLERS`) draws its step noise from the Brownian trees of these
    seeds and this sigma range instead of ``generators`` (A1111's and ComfyUI's noise,
    :mod:`sdengine.diffusion.brownian`); the other samplers draw from ``generators`` as ever. ``noise_scale``: the
    VE scale of ``noise`` in the start, ``init_latent + noise * noise_scale`` (or ``noise * noise_scale`` from pure
    noise), in place of the rule's (ComfyUI's ``sqrt(1 + sigma**2)`` at its max denoise, latent or not)."""
    name, sched = resolve(sampler, schedule)
    spec = SAMPLERS[name]
    ns = noise_schedule if noise_schedule is not None else getattr(denoiser, "schedule", None)
    if not isinstance(ns, NoiseSchedule | FlowSchedule | EDMSchedule):
        raise UsageError(
            "sample() needs noise_schedule= or a denoiser with a .schedule NoiseSchedule, FlowSchedule or EDMSchedule"
        )
    if not isinstance(steps, int) or not 1 <= steps <= ns.num_train_timesteps:
        raise UsageError(f"steps must be an integer between 1 and {ns.num_train_timesteps}, got {steps!r}")
    if not 0.0 < float(strength) <= 1.0:
        raise UsageError(f"strength must be in (0, 1], got {strength}")
    if noise.ndim < 2:
        raise UsageError(f"noise must be batched (B, ...), got shape {tuple(noise.shape)}")
    if init_latent is not None and init_latent.shape != noise.shape:
        raise UsageError(f"init_latent shape {tuple(init_latent.shape)} != noise shape {tuple(noise.shape)}")
    if spec.stochastic and generators is None:
        raise UsageError(f"sampler {name!r} draws noise each step: pass one torch.Generator per batch row")
    if generators is not None and len(generators) != noise.shape[0]:
        raise UsageError(f"need one generator per batch row: {noise.shape[0]} rows, {len(generators)} generators")
    options = dict(sampler_options or {})
    unknown = sorted(set(options) - set(sampler_option_names(name)))
    if unknown:  # else a TypeError from deep inside the sampler
        known = ", ".join(sampler_option_names(name)) or "none"
        raise UsageError(f"sampler {name!r} has no option {', '.join(map(str, unknown))}; its options: {known}")

    if isinstance(ns, FlowSchedule):
        return _sample_flow(
            denoiser,
            noise,
            name,
            sched,
            steps,
            ns,
            generators=generators,
            callback=callback,
            extra_args=extra_args,
            init_latent=init_latent,
            strength=strength,
            start_step=start_step,
            options=options,
            end_step=end_step,
            sigmas=sigmas,
            discard_penultimate=discard_penultimate,
            comfy_grid=comfy_grid,
            end_as_run=end_as_run,
            end_at_zero=end_at_zero,
            vp_only={
                "a1111_grid": a1111_grid,
                "noise_from": noise_from is not None,
                "brownian": brownian is not None,
                "noise_scale": noise_scale is not None,
            },
        )

    if isinstance(ns, EDMSchedule):
        edm_sampler_check(name)
        given_vp = [k for k, on in (("a1111_grid", a1111_grid), ("noise_from", noise_from is not None)) if on]
        if given_vp or end_step is not None or end_as_run or end_at_zero:
            refused = ", ".join(given_vp) or "end_step"
            raise UsageError(f"{refused} is not supported on EDM models")
        if sigmas is None:
            sigmas = make_grid(
                name, steps, ns, sched, discard_penultimate=discard_penultimate, comfy_grid=comfy_grid
            ).sigmas
        elif int(sigmas.reshape(-1).shape[0]) == steps + 1 and sigmas_rise(sigmas.detach().cpu().reshape(-1)):
            raise UsageError("EDM models cannot walk rising sigmas")

    explicit = sigmas is not None
    if sigmas is not None:
        given = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        if name in TIMESTEP_SAMPLERS:
            raise UsageError(f"sampler {name!r} walks its own timestep grid; it cannot run a given sigma list")
        if given.shape[0] != steps + 1:
            raise UsageError(f"{given.shape[0]} sigmas make {given.shape[0] - 1} steps, not {steps}")
        problem = sigma_list_problem(given)
        if problem is not None:
            raise UsageError(problem)
        why = rising_sigmas_problem(name, options) if sigmas_rise(given) else None
        if why is not None:
            raise UsageError(f"sampler {name!r} cannot walk rising sigmas (unsampling): {why}")
        grid = SamplingGrid(sigmas=given, timesteps=sigma_to_t(given[:-1], ns.log_sigmas).to(torch.float32))
    else:
        grid = make_grid(
            name,
            steps,
            ns,
            sched,
            scheduler_config,
            strength if init_latent is not None else 1.0,
            a1111_grid=a1111_grid,
            discard_penultimate=discard_penultimate,
            comfy_grid=comfy_grid,
        )
    a1111_grid = a1111_grid and name in A1111_GRID_SAMPLERS and not explicit
    if start_step is None:
        # grid.steps, not steps: a sigma-table schedule may have more or fewer points (ComfyUI's ddim_uniform, beta)
        start_step = img2img_start(grid.steps, strength) if init_latent is not None else 0
    if not 0 <= start_step < grid.steps:
        raise UsageError(f"start_step must be in [0, {grid.steps}), got {start_step}")

    stop = grid.steps
    if end_step is not None:
        if name in TIMESTEP_SAMPLERS or not start_step < end_step <= grid.steps:
            raise UsageError(
                f"end_step must be in ({start_step}, {grid.steps}] and the sampler a sigma-grid one, "
                f"got {end_step} with {name}"
            )
        stop = end_step

    if hasattr(denoiser, "with_timesteps"):
        denoiser = denoiser.with_timesteps(grid.sigmas[:-1], grid.timesteps)

    sigmas = grid.sigmas[start_step : stop + 1]
    if end_at_zero and stop < grid.steps:
        sigmas = torch.cat([sigmas[:-1], sigmas.new_zeros(1)])
    if noise_scale is not None:
        if noise_from is not None:
            raise UsageError("noise_scale and noise_from cannot both be given")
        x = noise * noise_scale if init_latent is None else init_latent + noise * noise_scale
    elif init_latent is None and start_step == 0:
        scale = math.sqrt(1 + float(sigmas[0]) ** 2) if explicit else None
        x = noise * (init_noise_scale(name, grid, scheduler_config) if scale is None else scale)
    else:
        base = init_latent if init_latent is not None else torch.zeros_like(noise)
        at = start_step if noise_from is None else noise_from
        if not 0 <= at <= start_step:
            raise UsageError(f"noise_from must be in [0, {start_step}], got {noise_from}")
        s_noise, s_start = float(grid.sigmas[at]), float(sigmas[0])
        x = base + noise * s_noise
        if at != start_step:  # the VP sample at that level, read at the start's
            x = x * math.sqrt((1 + s_start**2) / (1 + s_noise**2))
    if grid.targets is not None and spec.fn in (S.sample_ddim, S.sample_plms):
        options.setdefault("targets", grid.targets[start_step:])
    if name == "plms" and a1111_grid:
        options.setdefault("prediction", "epsilon")  # A1111 combines the noise estimates (a v model's too)
    elif name == "plms":
        options.setdefault("prediction", getattr(denoiser, "prediction", "epsilon"))
        if grid.steps > 1 and start_step == 0:
            # PNDM redoes its first step from t_1 + T // N (== t_0 only for leading spacing)
            t_src = min(int(grid.timesteps[1]) + ns.num_train_timesteps // steps, ns.num_train_timesteps - 1)
            options.setdefault("corrector_from", float(ns.sigmas[t_src]))
    if name == "unipc" and stop < grid.steps and not end_as_run:  # the grid goes on: its order is the grid's
        options["steps_after"] = grid.steps - stop
    if name in SA_SOLVERS:
        # ComfyUI's default stochastic interval: sigma between percent_to_sigma(0.8) and percent_to_sigma(0.2)
        options.setdefault("sde_start_sigma", percent_to_sigma(ns.log_sigmas, SA_SOLVER_SDE_PERCENTS[0]))
        options.setdefault("sde_end_sigma", percent_to_sigma(ns.log_sigmas, SA_SOLVER_SDE_PERCENTS[1]))
    if name == "lcm":
        options.setdefault("timesteps", grid.timesteps[start_step:])
        options.setdefault("timestep_scaling", float(config_get(scheduler_config, "timestep_scaling", 10.0)))
    if name == "ddpm" and bool(config_get(effective_config(name, scheduler_config), "clip_sample", False)):
        range_ = float(config_get(scheduler_config, "clip_sample_range", 1.0))
        options.setdefault("clip_denoised", range_)
    if brownian is not None and name in BROWNIAN_SAMPLERS:
        generators = brownian.noise(tuple(noise.shape))
    x = spec.fn(
        denoiser,
        x,
        sigmas,  # on the CPU: the samplers read them as Python floats (no device copy, so a CUDA graph can record)
        generators=generators,
        callback=callback,
        extra_args=extra_args,
        **options,
    )
    # Back to the network's (VP) scaling of the level we stopped at: identity when it is 0.
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


def _sample_flow(
    denoiser: Callable[..., Tensor],
    noise: Tensor,
    name: str,
    sched: str,
    steps: int,
    ns: FlowSchedule,
    *,
    generators: S.Generators | None,
    callback: S.Callback | None,
    extra_args: dict[str, Any] | None,
    init_latent: Tensor | None,
    strength: float,
    start_step: int | None,
    options: dict[str, Any],
    end_step: int | None,
    sigmas: Tensor | None,
    discard_penultimate: bool,
    comfy_grid: bool,
    end_as_run: bool,
    end_at_zero: bool,
    vp_only: Mapping[str, bool],
) -> Tensor:
    """:func:`sample` on a flow model (sdengine.diffusion.flow): the flow grid and start, and the sampler run in
    the view that makes it right there (:data:`sdengine.diffusion.flow.FLOW_SAMPLERS`). Returns the flow-scaled
    latent at the last sigma (x0 when it is 0)."""
    view = flow_sampler_view(name)
    given_vp = [key for key, on in vp_only.items() if on]
    if given_vp:
        raise UsageError(f"{', '.join(given_vp)} is a setting of VP models' sampling; flow models have none")
    if sched not in FLOW_SCHEDULES:
        raise UsageError(f"flow models cannot use schedule {sched!r}; they take: {', '.join(FLOW_SCHEDULES)}")
    if float(options.get("s_churn", 0.0)) > 0:
        raise UsageError(f"s_churn adds VE noise; {name!r} runs on flow models without it")

    if sigmas is not None:
        given = sigmas.detach().to("cpu", torch.float32).reshape(-1)
        if given.shape[0] != steps + 1:
            raise UsageError(f"{given.shape[0]} sigmas make {given.shape[0] - 1} steps, not {steps}")
        if sigma_list_problem(given) is not None or sigmas_rise(given) or float(given.max()) > 1.0:
            raise UsageError("a flow model's sigmas must be finite, decreasing, at most 1 and end at or above 0")
        grid = SamplingGrid(sigmas=given, timesteps=given[:-1] * ns.multiplier)
    else:
        grid = flow_grid(ns, steps + (1 if discard_penultimate else 0), sched, comfy=comfy_grid)
        if discard_penultimate:
            grid = drop_penultimate(grid)
    if start_step is None:
        start_step = flow_img2img_start(grid.steps, strength) if init_latent is not None else 0
    if not 0 <= start_step < grid.steps:
        raise UsageError(f"start_step must be in [0, {grid.steps}), got {start_step}")
    stop = grid.steps
    if end_step is not None:
        if not start_step < end_step <= grid.steps:
            raise UsageError(f"end_step must be in ({start_step}, {grid.steps}], got {end_step}")
        stop = end_step
    run = grid.sigmas[start_step : stop + 1]
    if end_at_zero and stop < grid.steps:
        run = torch.cat([run[:-1], run.new_zeros(1)])
    if init_latent is None and start_step == 0:
        x = noise.clone()  # txt2img starts from pure noise (s = 1), as diffusers' flow pipelines
    else:
        base = init_latent if init_latent is not None else torch.zeros_like(noise)
        x = flow_noise_scaling(float(run[0]), noise, base)
    if name == "unipc" and stop < grid.steps and not end_as_run:
        options["steps_after"] = grid.steps - stop
    fn = SAMPLERS[name].fn
    if view != "ve":
        if view == "rf":
            options["flow"] = True
        return fn(denoiser, x, run, generators=generators, callback=callback, extra_args=extra_args, **options)

    # The VE view: x_ve = x / (1 - s), sigma_ve = s / (1 - s); a first s of 1 (sigma_ve infinite) is started at
    # ComfyUI's offset instead.
    flow_s = [float(v) for v in run]
    if flow_s[0] >= 1.0:
        flow_s[0] = float(torch.tensor(ns.percent_to_sigma(FIRST_SIGMA_PERCENT), dtype=torch.float32))
    ve = torch.tensor([ve_sigma(v) for v in flow_s], dtype=torch.float32)
    view_den = VEView(denoiser, torch.tensor(flow_s, dtype=torch.float32))

    def flow_callback(i: int, _sigma: float, x_ve: Tensor, denoised: Tensor) -> bool | None:
        assert callback is not None
        return callback(i, flow_s[i], x_ve * (1.0 - flow_s[i + 1]), denoised)

    try:
        out = fn(
            view_den,
            x / (1.0 - flow_s[0]),
            ve,
            generators=generators,
            callback=None if callback is None else flow_callback,
            extra_args=extra_args,
            **options,
        )
    except S.SamplingInterrupted as stopped:
        raise S.SamplingInterrupted(
            stopped.step, stopped.x * (1.0 - flow_s[stopped.step + 1]), stopped.denoised
        ) from None
    return out * (1.0 - flow_s[-1])


def noise_draws(
    *,
    sampler: str,
    steps: int,
    noise_schedule: NoiseSchedule,
    schedule: str = "normal",
    scheduler_config: Mapping[str, Any] | None = None,
    img2img: bool = False,
    strength: float = 1.0,
    start_step: int | None = None,
    sampler_options: Mapping[str, Any] | None = None,
    a1111_grid: bool = False,
    discard_penultimate: bool = False,
) -> int:
    """How many per-step noise draws :func:`sample` makes with these settings (0 for a deterministic sampler):
    what a :class:`sdengine.diffusion.samplers.NoiseBank` must hold. Found by running the sampler on one
    1x1 value with a denoiser that answers zeros, counting: which steps draw depends on the sigmas only."""
    bank = S.NoiseBank(None, 1)
    one = torch.zeros(1, 1, 1, 1)
    sample(
        lambda x, sigma, **_: torch.zeros_like(x),
        one,
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        scheduler_config=scheduler_config,
        generators=bank,
        init_latent=one if img2img else None,
        strength=strength,
        start_step=start_step,
        noise_schedule=noise_schedule,
        sampler_options=sampler_options,
        a1111_grid=a1111_grid,
        discard_penultimate=discard_penultimate,
    )
    return bank.used
