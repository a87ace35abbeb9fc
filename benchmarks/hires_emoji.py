"""Does the emoji model still draw the asked emoji after the hires fix (64 -> 128)?

The recogniser's top-1 / top-5 on ``--n`` canonical captions (the same evenly spaced base-model emoji and the
same seeds, ``seed + j``, as ``sdengine eval-emoji``'s caption section), for the plain 64x64 images and for
the hires fix with each ``--upscaler``. The recogniser reads 64x64: hires images are scaled down (bilinear,
antialiased, as the evaluation does for any other size) before it sees them.

    PYTHONPATH=src python benchmarks/hires_emoji.py --n 100 --steps 10 --run Latent:0.5 --run Lanczos:0.3
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from sdengine.data.emoji import EmojiDataset
from sdengine.eval.emoji import DEFAULT_CFG, evenly_spaced, topk_hits
from sdengine.metrics.emoji_recogniser import load_emoji_recogniser
from sdengine.pipeline import GenerationRequest, load_pipeline
from sdengine.pipeline.hires import first_pass, second_pass
from sdengine.train.emoji import HELD_OUT_SUBGROUP

RECOGNISER_SIZE = 64


def recogniser_input(arrays: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32)).permute(0, 3, 1, 2) * 2.0 - 1.0
    if tuple(x.shape[-2:]) != (RECOGNISER_SIZE, RECOGNISER_SIZE):
        x = F.interpolate(x, size=(RECOGNISER_SIZE, RECOGNISER_SIZE), mode="bilinear", antialias=True)
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hr-steps", type=int, default=0)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument(
        "--run",
        action="append",
        default=None,
        metavar="UPSCALER:STRENGTH",
        help="a hires run (repeatable; default Latent:0.5 and Lanczos:0.3)",
    )
    ap.add_argument("--cfg", type=float, default=DEFAULT_CFG)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: on a shared CPU more threads only wait)"
    )
    ap.add_argument("--save", default=None, help="write the first 16 images of each run as PNG grids here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    pipe = load_pipeline("emoji", device=a.device)
    recogniser = load_emoji_recogniser(device=a.device)
    ds = EmojiDataset()
    base = [j for j, e in enumerate(ds.entries) if e.subgroup != HELD_OUT_SUBGROUP]
    chosen = [base[i] for i in evenly_spaced(len(base), a.n)]
    prompts = [ds.captions[j] for j in chosen]
    seeds = [a.seed + j for j in chosen]
    targets = torch.tensor([recogniser.class_index(ds.entries[j].char) for j in chosen])

    runs = [(up, float(st)) for up, _, st in (r.rpartition(":") for r in a.run or ["Latent:0.5", "Lanczos:0.3"])]
    names = ["plain 64x64", *(f"hires x{a.scale:g} {up} strength {st:g}" for up, st in runs)]
    hits: dict[str, list[tuple[bool, bool]]] = {k: [] for k in names}
    saved: dict[str, list[np.ndarray]] = {k: [] for k in names}
    t0 = time.perf_counter()
    # Batch by batch, every run on the same captions: the first pass is shared (it IS the plain image), each
    # upscaler runs its own second pass from it; the running shares are printed after every batch.
    for s in range(0, len(prompts), a.batch):
        request = GenerationRequest(
            prompt=prompts[s : s + a.batch],
            seed=seeds[s : s + a.batch],
            steps=a.steps,
            sampler=a.sampler,
            cfg_scale=a.cfg,
            progress=False,
            enable_hr=True,
            hr_scale=a.scale,
            hr_second_pass_steps=a.hr_steps,
        )
        with torch.inference_mode():
            first = first_pass(pipe.prepare(request))
            latents = pipe.sample_latents(first)
            images = [pipe.decode_latents(first, latents)]
            for up, st in runs:
                hr = pipe.prepare(request.replace(hr_upscaler=up, strength=st))
                images.append(second_pass(pipe, hr, latents))
        tb = targets[s : s + a.batch]
        for name, im in zip(names, images, strict=True):
            arr = im.permute(0, 2, 3, 1).float().cpu().numpy()
            with torch.inference_mode():
                logits = recogniser(recogniser_input(arr).to(a.device)).float().cpu()
            hits[name] += list(zip(topk_hits(logits, tb, 1).tolist(), topk_hits(logits, tb, 5).tolist(), strict=True))
            if len(saved[name]) < 16:
                saved[name] += list(arr[: 16 - len(saved[name])])
        for name in names:
            h = hits[name]
            row = {
                "run": name,
                "n": len(h),
                "top1": sum(x for x, _ in h) / len(h),
                "top5": sum(y for _, y in h) / len(h),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row), flush=True)
    if a.save:
        from pathlib import Path

        from PIL import Image

        from sdengine.grids import batch_grid
        from sdengine.io.images import to_uint8

        Path(a.save).mkdir(parents=True, exist_ok=True)
        for name in names:
            grid = batch_grid([Image.fromarray(x) for x in to_uint8(np.stack(saved[name]))])
            grid.save(Path(a.save) / f"{name.replace(' ', '_')}.png")
    print(json.dumps({"args": vars(a)}))


if __name__ == "__main__":
    main()
