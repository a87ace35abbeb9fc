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
import tarfile
import tempfile
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
    run_dir = Path(tempfile.mkdtemp(prefix="fmnist_run_"))
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
    from sdengine.imageio import make_grid, save_image_atomic

    if a.skip_train:
        model = PixelDDPM.load(a.skip_train, device=dev)
    else:
        from sdengine.train.ddpm import DDPMSpec, train_ddpm
        from sdengine.train.loop import TrainConfig

        spec = DDPMSpec(data="fashion-mnist", class_conditional=True)
        cfg = TrainConfig(
            steps=a.steps,
            batch_size=a.batch_size,
            lr=a.lr,
            warmup_steps=500,
            ema_decay=0.9995,
            sample_every=0,
            checkpoint_every=0,
            log_every=200,
            seed=0,
            max_seconds=a.train_minutes * 60,
        )
        t = time.perf_counter()
        res, model = train_ddpm(spec, cfg, run_dir, device=dev, progress=False)
        train_s = time.perf_counter() - t
        results["train"] = {
            "steps": res.step,
            "batch_size": a.batch_size,
            "lr": a.lr,
            "seconds_total": train_s,
            "seconds_steps": res.seconds,
            "images_per_s": res.step * a.batch_size / max(res.seconds, 1e-9),
            "final_loss_mean_200": sum(res.losses[-200:]) / len(res.losses[-200:]),
        }
        results["train_command"] = (
            f"sdengine train ddpm --class-conditional --steps {res.step} --batch-size {a.batch_size} "
            f"--lr {a.lr} --ema-decay 0.9995 --device cuda --out runs/fmnist"
        )
        model = PixelDDPM.load(run_dir / "model", device=dev)
        # $OUT returns at most 8 files: the model folder and pictures travel as one archive, written
        # now so that a later timeout still returns the model.
        with tarfile.open(out / "bundle.tar", "w") as tar:
            for f in ["model/config.json", "model/unet.safetensors", "loss.png", "samples_latest.png"]:
                tar.add(run_dir / f, arcname=f)
        dump()
        print(json.dumps(results["train"]), flush=True)

    # Sample sets are saved as uint8 arrays and scored with the shipped classifier afterwards
    # (tools/score_fmnist.py), so the GPU run does not depend on the classifier being final.
    import numpy as np

    if dev == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    labels = [c for c in range(10) for _ in range(10)]
    save_image_atomic(
        make_grid(model.generate(labels, sampler="ddim", steps=50, seed=0), 10, row_labels=model.class_names, scale=2),
        out / "grid_ddim50.png",
    )
    with tarfile.open(out / "bundle.tar", "a") as tar:
        tar.add(out / "grid_ddim50.png", arcname="grid_ddim50.png")
    (out / "grid_ddim50.png").unlink()
    n = a.n_eval
    eval_labels = [i % 10 for i in range(n)]

    def gen(sampler: str, steps: int, cfg: float = 1.0) -> np.ndarray | None:
        if left() < 5:
            return None
        t = time.perf_counter()
        try:
            imgs = model.generate(
                eval_labels, sampler=sampler, steps=steps, seed=0, guidance_scale=cfg, batch_size=1000
            )
        except Exception as e:  # noqa: BLE001 - record and go on with the next measurement
            results["evals"].append({"sampler": sampler, "steps": steps, "cfg": cfg, "error": repr(e)[:300]})
            traceback.print_exc()
            return None
        sec = time.perf_counter() - t
        results["evals"].append({"sampler": sampler, "steps": steps, "cfg": cfg, "n": n, "seconds": sec})
        print(f"{sampler:>12} {steps:>4} steps cfg {cfg}: {sec:.1f} s", flush=True)
        dump()
        return (imgs[:, 0].mul(255).add(0.5).floor().clamp(0, 255).to(torch.uint8)).numpy()

    main_sets: dict[str, np.ndarray] = {"labels": np.array(eval_labels, dtype=np.int64)}
    for sampler, steps, cfg in [
        ("ddpm", 1000, 1.0),
        ("ddim", 50, 1.0),
        ("ddim", 50, 2.0),
        ("ddim", 50, 3.0),
        ("ddpm", 1000, 2.0),
        ("dpmpp_2m", 20, 1.0),
        ("dpmpp_2m", 20, 2.0),
    ]:
        arr = gen(sampler, steps, cfg)
        if arr is not None:
            main_sets[f"{sampler}_{steps}_cfg{cfg:g}"] = arr
            np.savez_compressed(out / "main.npz", **main_sets)
    try:
        from sdengine.diffusion.sampling import SAMPLERS  # the name table

        names = list(SAMPLERS)
    except Exception:  # noqa: BLE001
        names = ["ddim"]
    if a.samplers:
        names = a.samplers.split(",")
    for steps in (5, 10, 20, 50):
        table: dict[str, np.ndarray] = {"labels": np.array(eval_labels, dtype=np.int64)}
        for s in names:
            arr = gen(s, steps)
            if arr is not None:
                table[s] = arr
        np.savez_compressed(out / f"table_{steps}.npz", **table)
    results["total_seconds"] = time.perf_counter() - t_start
    dump()


if __name__ == "__main__":
    main()
