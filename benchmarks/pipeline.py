"""End-to-end generation time, sdengine's Pipeline vs diffusers' StableDiffusionPipeline, same run, same weights.

Both load the same random MEDIUM-size SD1 diffusers folder (tests/_pipeline_models.py: sdengine's MEDIUM_SD
U-Net, MEDIUM VAE and a 4-layer CLIP text encoder in diffusers/transformers classes), fp32 on the CPU, and
generate the same image: same prompt, negative prompt, seed, steps, guidance, size and sampler (the diffusers
scheduler sdengine's table names). A call is timed whole: text encoding, sampling, VAE decode, conversion to
numpy/PIL. Runs are interleaved (ours, theirs, ours, ...) after one warm-up each, so that load from the other
processes on a shared machine hits both alike; the best and the median of the repeats are printed, and the
images are checked to agree (mean absolute difference on 0..1 pixels).

Run: ``.venv/bin/python benchmarks/pipeline.py [--steps 20 --size 128 --sampler dpmpp_2m --repeats 3]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler, make_sd_folder  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse, detailed, sharp focus"
NEGATIVE = "blurry, low quality"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a diffusers folder (default: build the random medium SD1 one)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (medium VAE: 4x, so 32x32 latents)")
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="sdengine's dtype (diffusers stays fp32; bf16 is NOT a like-for-like comparison)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else make_sd_folder(Path(tmp) / "medium-sd1", size="medium")
        ours = sdengine.load_pipeline(folder, device="cpu", dtype=args.dtype)
        theirs = diffusers_pipeline(folder)
        theirs.scheduler = diffusers_scheduler(folder, args.sampler)

        def run_ours() -> np.ndarray:
            return ours(PROMPT, NEGATIVE, steps=args.steps, sampler=args.sampler, schedule="normal",
                        cfg_scale=args.cfg, seed=0, width=args.size, height=args.size, progress=False).arrays

        def run_theirs(output_type: str = "pil") -> np.ndarray:
            # PIL images in the timed runs: sdengine's call makes them too
            out = theirs(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=args.steps, guidance_scale=args.cfg,
                         width=args.size, height=args.size, generator=torch.Generator("cpu").manual_seed(0),
                         output_type=output_type)
            return out.images

        a, b = run_ours(), run_theirs("np")  # warm-up (allocator, kernels, lazy imports) and the agreement check
        times: dict[str, list[float]] = {"sdengine": [], "diffusers": []}
        for _ in range(args.repeats):
            for name, fn in (("sdengine", run_ours), ("diffusers", run_theirs)):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    print(f"medium SD1 (random weights), {args.size}x{args.size}, {args.steps} steps {args.sampler}, cfg {args.cfg}, "
          f"CPU, sdengine {args.dtype} / diffusers fp32, {args.threads} thread(s), {args.repeats} interleaved repeats")
    for name, ts in times.items():
        print(f"  {name:10s} best {min(ts):7.3f} s   median {statistics.median(ts):7.3f} s")
    print(f"  ratio sdengine / diffusers: best {min(times['sdengine']) / min(times['diffusers']):.2f}x, "
          f"median {statistics.median(times['sdengine']) / statistics.median(times['diffusers']):.2f}x")
    print(f"  images agree: mean |difference| {float(np.abs(a - b).mean()):.2e} (0..1 pixels, before quantisation)")


if __name__ == "__main__":
    main()
