"""Score the sample sets that tools/gpu_fmnist.py generated with the shipped Fashion-MNIST classifier:
FD-FMNIST against the 10,000 test images and class accuracy, for the main settings and for every sampler
at 5/10/20/50 steps. Writes docs/results/fmnist_scores.json, a Markdown table and a plot.

    python tools/score_fmnist.py /work/.device/3 --out docs/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path, help="where main.npz and table_*.npz are")
    p.add_argument("--out", type=Path, default=Path("docs/results"))
    a = p.parse_args()
    torch.set_num_threads(2)
    from sdengine.data.fashion_mnist import load_fashion_mnist, to_model_range
    from sdengine.metrics.classifier import features, load_classifier, predict
    from sdengine.metrics.frechet import frechet_distance_features

    clf = load_classifier()
    test, _ = load_fashion_mnist("test")
    ref = features(to_model_range(test), clf)

    def score(arr: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        x = to_model_range(arr)  # uint8 (N, 28, 28) -> (N, 1, 32, 32) in [-1, 1]
        fd = frechet_distance_features(features(x, clf), ref)
        acc = (predict(x, clf).numpy() == labels).mean()
        return {"fd": round(float(fd), 4), "accuracy": round(float(acc), 4)}

    out: dict = {"main": {}, "table": {}}
    main_sets = np.load(a.folder / "main.npz")
    labels = main_sets["labels"]
    for k in main_sets.files:
        if k != "labels":
            out["main"][k] = score(main_sets[k], labels)
            print(k, out["main"][k], flush=True)
    # A reference point: real training images through the same metric.
    train, train_labels = load_fashion_mnist("train")
    out["main"]["real_train_1000"] = score(train[:1000], train_labels[:1000])
    for steps in (5, 10, 20, 50):
        f = a.folder / f"table_{steps}.npz"
        if not f.exists():
            continue
        t = np.load(f)
        for k in t.files:
            if k != "labels":
                out["table"].setdefault(k, {})[steps] = score(t[k], t["labels"])
        print(steps, {k: v[steps] for k, v in out["table"].items() if steps in v}, flush=True)
    results = json.loads((a.folder / "results.json").read_text())
    out["train"] = results.get("train")
    out["train_command"] = results.get("train_command")
    out["device"] = results.get("device")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "fmnist_scores.json").write_text(json.dumps(out, indent=1) + "\n")

    # Markdown table and plot for the README.
    ref_fd = out["main"].get("ddpm_1000_cfg1", {}).get("fd")
    lines = ["| sampler | 5 steps | 10 steps | 20 steps | 50 steps |", "|---|---|---|---|---|"]
    for name, row in out["table"].items():
        cells = [f"{row[s]['fd']:.3f} / {100 * row[s]['accuracy']:.1f}%" if s in row else "-" for s in (5, 10, 20, 50)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (a.out / "fmnist_sampler_table.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    styles = ["-", "--", ":"]
    for i, (name, row) in enumerate(out["table"].items()):
        xs = sorted(row)
        kw = {"marker": "o", "ms": 3, "label": name, "ls": styles[(i // 10) % 3], "color": f"C{i % 10}"}
        axes[0].plot(xs, [row[s]["fd"] for s in xs], **kw)
        axes[1].plot(xs, [100 * row[s]["accuracy"] for s in xs], **kw)
    if ref_fd is not None:
        axes[0].axhline(ref_fd, color="k", ls="--", lw=1, label="ddpm 1000 steps")
        axes[1].axhline(100 * out["main"]["ddpm_1000_cfg1"]["accuracy"], color="k", ls="--", lw=1)
    axes[0].set(xscale="log", yscale="log", xlabel="steps", ylabel="FD-FMNIST (lower is better)")
    axes[1].set(xscale="log", xlabel="steps", ylabel="class accuracy % (cfg 1)")
    for ax in axes:
        ax.set_xticks([5, 10, 20, 50], labels=["5", "10", "20", "50"])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Fashion-MNIST DDPM: quality per step, 1000 class-conditional samples per point")
    fig.tight_layout()
    fig.savefig(a.out / "fmnist_samplers.png")
    print("wrote", a.out)


if __name__ == "__main__":
    main()
