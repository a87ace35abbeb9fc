"""Shared harness for the sampler parity tests: our sampling.sample vs the diffusers scheduler loop.

Both loops integrate the same fixed, tiny, deterministic "network" (a per-pixel MLP over channels that
also depends smoothly on the timestep), so any difference comes from the samplers. Step noise: both
sides get CPU generators seeded alike, one per row; diffusers' ``randn_tensor`` with a list of
generators draws (1, C, H, W) per row, exactly our per-row draw, so where both draw in the same order
the noise is identical. DPMSolverSDEScheduler draws from a torchsde BrownianTree instead (torchsde is
not installed here): the test replaces its ``noise_sampler`` by per-row draws from the same
generators, called in the same order as ours, and stubs the torchsde import.
"""

from __future__ import annotations

import sys
import types

import diffusers  # noqa: E402
import torch


def _load_dpmsolver_sde():
    """DPMSolverSDEScheduler's module imports torchsde; give it a throw-away stub if torchsde is absent
    (only its BrownianTree noise sampler uses it, and the tests replace that) and remove it again."""
    try:
        import torchsde  # noqa: F401

        stubbed = False
    except ImportError:
        stub = types.ModuleType("torchsde")
        stub.BrownianInterval = object
        sys.modules["torchsde"] = stub
        stubbed = True
    try:
        from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler
    finally:
        if stubbed:
            del sys.modules["torchsde"]
    return DPMSolverSDEScheduler


DPMSolverSDEScheduler = _load_dpmsolver_sde()


def _load_lms():
    """LMSDiscreteScheduler integrates its Lagrange polynomials with scipy.integrate.quad; scipy is not
    installed here, so its module gets an 8-point Gauss-Legendre rule instead, which is exact for the
    polynomials of degree <= 3 it integrates (so the oracle is unchanged)."""
    import numpy as np
    from diffusers.schedulers import scheduling_lms_discrete as lms_module

    if not hasattr(lms_module, "integrate"):
        nodes, weights = np.polynomial.legendre.leggauss(8)

        def quad(f, a, b, epsrel=None):
            a, b = float(a), float(b)
            xs = (b - a) / 2 * nodes + (a + b) / 2
            return (b - a) / 2 * sum(w * float(f(x)) for w, x in zip(weights, xs, strict=True)), 0.0

        lms_module.integrate = types.SimpleNamespace(quad=quad)
    return lms_module.LMSDiscreteScheduler


LMSDiscreteScheduler = _load_lms()

from sdengine.diffusion import sampling  # noqa: E402
from sdengine.diffusion.denoisers import Denoiser  # noqa: E402
from sdengine.diffusion.schedules import NoiseSchedule  # noqa: E402

SD_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
}
SHAPE = (2, 3, 4, 4)
SEED = 1234


class TinyNet:
    """A fixed random function of (x, t): channel-mixing MLP plus a smooth timestep embedding."""

    def __init__(self, channels: int = 3, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.randn(8, channels, generator=g) / channels**0.5
        self.w2 = torch.randn(channels, 8, generator=g) / 8**0.5
        self.freq = torch.rand(8, generator=g) * 0.02
        self.phase = torch.rand(8, generator=g) * 6.28

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        emb = torch.sin(t[:, None] * self.freq + self.phase)  # (B, 8)
        h = torch.einsum("oc,bchw->bohw", self.w1, x) + emb[:, :, None, None]
        return torch.einsum("co,bohw->bchw", self.w2, torch.tanh(h))


def gens(batch: int = SHAPE[0]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(SEED + i) for i in range(batch)]


def start_noise() -> torch.Tensor:
    return torch.cat([torch.randn((1, *SHAPE[1:]), generator=g) for g in gens()])


def ours(sampler, schedule, steps, config, prediction, net, noise, **options):
    ns = NoiseSchedule.from_config(**config)
    den = Denoiser(net, ns, prediction)
    return sampling.sample(
        den,
        noise,
        sampler=sampler,
        steps=steps,
        schedule=schedule,
        scheduler_config=config,
        generators=gens(noise.shape[0]),
        sampler_options=options or None,
    )


def theirs(sampler, schedule, steps, config, prediction, net, noise, eta=None):
    cls_name, kwargs = sampling.diffusers_equivalent(sampler, schedule, config)
    local = {"DPMSolverSDEScheduler": DPMSolverSDEScheduler, "LMSDiscreteScheduler": LMSDiscreteScheduler}
    cls = local.get(cls_name) or getattr(diffusers, cls_name)
    # from_config drops keys the class does not take, as when a pipeline swaps schedulers
    sched = cls.from_config({**kwargs, "prediction_type": prediction})
    sched.set_timesteps(steps)
    g = gens(noise.shape[0])
    step_kwargs = {}
    if cls_name == "DPMSolverSDEScheduler":

        def noise_sampler(_sigma, _sigma_next):
            return torch.cat([torch.randn((1, *noise.shape[1:]), generator=gi) for gi in g])

        sched.noise_sampler = noise_sampler
    elif cls_name in (
        "DDPMScheduler",
        "EulerAncestralDiscreteScheduler",
        "KDPM2AncestralDiscreteScheduler",
        "LCMScheduler",
    ) or (cls_name == "DPMSolverMultistepScheduler" and "sde" in kwargs["algorithm_type"]):
        step_kwargs["generator"] = g
    elif cls_name == "DDIMScheduler" and eta:
        step_kwargs.update(eta=eta, generator=g)
    x = noise * sched.init_noise_sigma
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = net(inp, t.expand(x.shape[0]))
        x = sched.step(out, t, x, **step_kwargs).prev_sample
    return x
