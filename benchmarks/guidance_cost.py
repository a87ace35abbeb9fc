"""What a guidance option costs per image on the built-in ``emoji`` model, on this CPU.

    PYTHONPATH=src python benchmarks/guidance_cost.py [--threads 2] [--repeats 3] [--steps 25]

Times one 64x64 image (DPM++ 2M, CFG 7.5, a negative prompt) plain and with each of self-attention guidance
(``sag_scale`` 0.75: one more U-Net pass of the unconditional row per step, and the middle block's attention map),
perturbed-attention guidance (``pag_scale`` 3: one more row in the batched call), FreeU (the authors' SD 1.x
factors) and HyperTile (ComfyUI's rule, 32-pixel tiles: several tiles at this size), the runs interleaved option by
option; prints each option's median seconds and its ratio to plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import sdengine

OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "sag": {"sag_scale": 0.75},
    "pag": {"pag_scale": 3.0},
    "freeu": {"freeu": (1.5, 1.6, 0.9, 0.2)},
    "hypertile": {"hypertile": (32, 1, 0), "hypertile_rule": "comfyui", "hypertile_scale_depth": False},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=25)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = sdengine.load_pipeline("emoji")
    kw = dict(prompt="a red apple", negative_prompt="blurry", steps=args.steps, sampler="dpmpp_2m", cfg_scale=7.5,
              seed=1, width=64, height=64, progress=False)  # fmt: skip
    pipe(**kw)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in OPTIONS}
    for _ in range(args.repeats):
        for name, extra in OPTIONS.items():
            t = time.perf_counter()
            pipe(**kw, **extra)
            times[name].append(time.perf_counter() - t)
    plain = statistics.median(times["plain"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:10s} {m:7.3f} s  {m / plain:5.2f}x  (runs: {', '.join(f'{t:.3f}' for t in ts)})")


if __name__ == "__main__":
    main()
