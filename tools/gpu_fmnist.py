"""Train the shipped Fashion-MNIST DDPM on a GPU and measure it, in one call (the device tool's budget
is minutes). Writes everything under $OUT (or --out): the model folder, grids, the loss curve and a
results.json that is rewritten after every measurement, so a timeout still returns what was done.

    PYTHONPATH=src SDENGINE_FASHION_MNIST=.devcarry/fashion-mnist python tools/gpu_fmnist.py --train-minutes 5

The same model is reproduced by the CLI command printed in results.json (``train_command``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
import traceback
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu"))
    p.add_argument("--train-minutes", type=float, default=5.0)
    p.add_argument("--deadline-minutes", type=float, default=9.0, help="stop measuring after this (whole script)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--n-eval", type=int, default=1000)
    p.add_argument("--skip-train", default=None, help="a model folder to evaluate instead of training")
    p.add_argument("--samplers", default="", help="comma list for the per-step table (default: all)")
    a = p.parse_args()
    t_start = time.perf_counter()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    results: dict = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "evals": [],
    }

    def dump() -> None:
        (out / "results.json").write_text(json.dumps(results, indent=1))

    def left() -> float:
        return a.deadline_minutes * 60 - (time.perf_counter() - t_start)

    from sdengine.ddpm import PixelDDPM
    from sdengine.evaluation import evaluate_ddpm, reference_features
    from sdengine.imageio import make_grid, save_image_atomic

    if a.skip_train:
        model = PixelDDPM.load(a.skip_train, device=dev)
    else:
        from sdengine.train.ddpm import DDPMSpec, train_ddpm
        from sdengine.train.loop import TrainConfig

        spec = DDPMSpec(data="fashion-mnist", class_conditional=True)
        cfg = TrainConfig(
            steps=a.steps, batch_size=a.batch_size, lr=a.lr, warmup_steps=500, ema_decay=0.9995,
            sample_every=0, checkpoint_every=0, log_every=200, seed=0, max_seconds=a.train_minutes * 60,
        )
        t = time.perf_counter()
        res, model = train_ddpm(spec, cfg, out / "run", device=dev, progress=True)
        train_s = time.perf_counter() - t
        results["train"] = {
            "steps": res.step, "batch_size": a.batch_size, "lr": a.lr, "seconds": train_s,
            "images_per_s": res.step * a.batch_size / train_s, "final_loss_mean_200": sum(res.losses[-200:]) / 200,
        }
        results["train_command"] = (
            f"sdengine train ddpm --class-conditional --steps {res.step} --batch-size {a.batch_size} "
            f"--lr {a.lr} --ema-decay 0.9995 --device cuda --out runs/fmnist"
        )
        model = PixelDDPM.load(out / "run" / "model", device=dev)
        shutil.copytree(out / "run" / "model", out / "model", dirs_exist_ok=True)
        shutil.copy(out / "run" / "loss.png", out / "loss.png")
        dump()
        print(json.dumps(results["train"]), flush=True)

    ref = reference_features(dev)
    labels = [c for c in range(10) for _ in range(10)]
    save_image_atomic(
        make_grid(model.generate(labels, sampler="ddim", steps=50, seed=0), 10, row_labels=model.class_names, scale=2),
        out / "grid_ddim50.png",
    )

    def ev(sampler: str, steps: int, cfg: float = 1.0, schedule: str = "normal", n: int | None = None) -> None:
        if left() < 5:
            return
        try:
            r = evaluate_ddpm(
                model, n=n or a.n_eval, sampler=sampler, steps=steps, schedule=schedule, guidance_scale=cfg,
                device=dev, ref_features=ref, batch_size=1000,
            )
            results["evals"].append(r)
            print(f"{sampler:>12} {schedule:>8} {steps:>4} steps cfg {cfg}: FD {r['fd']:.3f} acc {100 * r['accuracy']:.1f}%"
                  f" ({r['seconds']:.1f} s)", flush=True)
        except Exception as e:  # noqa: BLE001 - record and go on with the next measurement
            results["evals"].append({"sampler": sampler, "steps": steps, "cfg": cfg, "error": repr(e)[:300]})
            traceback.print_exc()
        dump()

    ev("ddpm", 1000)
    ev("ddim", 50)
    ev("ddim", 50, cfg=2.0)
    ev("ddpm", 1000, cfg=2.0)
    try:
        from sdengine.diffusion.sampling import SAMPLERS  # the name table

        names = [s for s in SAMPLERS if s not in ("ddpm",)]
    except Exception:  # noqa: BLE001
        names = ["ddim"]
    if a.samplers:
        names = a.samplers.split(",")
    for steps in (5, 10, 20, 50):
        for s in names:
            ev(s, steps)
    results["total_seconds"] = time.perf_counter() - t_start
    dump()


if __name__ == "__main__":
    main()
