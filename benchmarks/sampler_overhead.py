"""Per-step cost of the samplers' own work: sdengine vs the diffusers scheduler loop, same run.

Both loops drive the same trivial network (x -> 0.1 x) on a small latent, so almost all the time is the
sampler bookkeeping: ours is the sampler function (sigma tensor, a lerp or two, noise), theirs is
``scale_model_input`` + ``step`` (index lookup, dtype casts, state). The model call itself is timed
alone and subtracted from both. Run: ``.venv/bin/python benchmarks/sampler_overhead.py``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

warnings.filterwarnings("ignore")

import diffusers  # noqa: E402

from sdengine.diffusion import sampling  # noqa: E402
from sdengine.diffusion.denoisers import Denoiser  # noqa: E402
from sdengine.diffusion.schedules import NoiseSchedule  # noqa: E402

CONFIG = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * 0.1


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--shape", type=int, nargs=4, default=[1, 4, 8, 8])
    args = ap.parse_args()
    torch.set_num_threads(1)
    ns = NoiseSchedule.from_config(**CONFIG)
    noise = torch.randn(*args.shape, generator=torch.Generator().manual_seed(0))
    n = args.steps
    t_model = best_of(lambda: [net(noise, torch.zeros(1)) for _ in range(n)], args.repeats) / n
    print(f"shape {tuple(args.shape)}, {n} steps, 1 thread; model call alone {t_model * 1e6:.1f} us")
    print(f"{'sampler':14s} {'ours us/step':>13s} {'diffusers us/step':>18s} {'ratio':>7s}")
    for name in ["euler", "euler_a", "heun", "ddim", "dpmpp_2m", "dpmpp_2m_sde", "unipc", "lms"]:
        calls = 2 if name == "heun" else 1
        den = Denoiser(net, ns, "epsilon")

        def run_ours(den=den, name=name) -> None:
            sampling.sample(
                den,
                noise,
                sampler=name,
                steps=n,
                scheduler_config=CONFIG,
                generators=[torch.Generator().manual_seed(0)],
            )

        cls_name, kwargs = sampling.diffusers_equivalent(name, "normal", CONFIG)
        if cls_name == "LMSDiscreteScheduler":
            import sys

            sys.path.insert(0, "tests")
            from _sampler_parity import LMSDiscreteScheduler as cls  # scipy-free quad (see there)
        else:
            cls = getattr(diffusers, cls_name)
        sched = cls.from_config(kwargs)
        stochastic = sampling.SAMPLERS[name].stochastic

        def run_theirs(sched=sched, stochastic=stochastic) -> None:
            sched.set_timesteps(n)
            g = torch.Generator().manual_seed(0)
            x = noise * sched.init_noise_sigma
            for t in sched.timesteps:
                inp = sched.scale_model_input(x, t)
                out = net(inp, t)
                x = sched.step(out, t, x, **({"generator": g} if stochastic else {})).prev_sample

        ours_s = best_of(run_ours, args.repeats) / n - calls * t_model
        theirs_s = best_of(run_theirs, args.repeats) / n - calls * t_model
        print(f"{name:14s} {ours_s * 1e6:13.1f} {theirs_s * 1e6:18.1f} {ours_s / theirs_s:7.2f}")


if __name__ == "__main__":
    main()
