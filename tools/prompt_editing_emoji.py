"""Prompt editing on the built-in emoji model: does ``[A:B:when]`` give a picture that differs from ``A`` alone and
from ``B`` alone? For each pair of shipped-emoji captions and seed, generate ``A``, ``B``, ``[A:B:when]`` and
``[A|B]``, and print the mean absolute pixel difference (0..1 pixels) of the edited pictures to each plain one
and the emoji recogniser's top-5 for every picture.

    python tools/prompt_editing_emoji.py --pairs "cat face/dog face" "red apple/banana" --seeds 1 2 3
"""

from __future__ import annotations

import argparse

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", nargs="+", default=["cat face/dog face", "red apple/banana", "sun/snowflake"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--when", default="0.5")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m")
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from sdengine.data.emoji import EmojiDataset, canonical_caption
    from sdengine.metrics.emoji_recogniser import load_emoji_recogniser
    from sdengine.pipeline import load_pipeline

    entries = {e.name: e for e in EmojiDataset().entries}
    pipe = load_pipeline("emoji", device=a.device)
    recogniser = load_emoji_recogniser(device=a.device)

    def top5(arrays: np.ndarray) -> list[list[str]]:
        x = torch.from_numpy(np.ascontiguousarray(arrays, dtype=np.float32)).permute(0, 3, 1, 2) * 2 - 1
        with torch.inference_mode():
            logits = recogniser(x.to(a.device)).float().cpu()
        return [[recogniser.classes[i] for i in row] for row in logits.topk(5, dim=1).indices.tolist()]

    total = {"edit-A": [], "edit-B": [], "alt-A": [], "alt-B": [], "A-B": []}
    for pair in a.pairs:
        name_a, name_b = pair.split("/")
        ea, eb = entries[name_a], entries[name_b]
        cap_a, cap_b = canonical_caption(ea), canonical_caption(eb)
        prompts = [cap_a, cap_b, f"[{cap_a}:{cap_b}:{a.when}]", f"[{cap_a}|{cap_b}]"]
        print(f"\n{ea.char} {cap_a!r} / {eb.char} {cap_b!r}")
        for seed in a.seeds:
            res = pipe(prompts, steps=a.steps, sampler=a.sampler, cfg_scale=a.cfg, seed=[seed] * 4, progress=False)
            arr = res.arrays.astype(np.float64)
            d = {
                "edit-A": np.abs(arr[2] - arr[0]).mean(),
                "edit-B": np.abs(arr[2] - arr[1]).mean(),
                "alt-A": np.abs(arr[3] - arr[0]).mean(),
                "alt-B": np.abs(arr[3] - arr[1]).mean(),
                "A-B": np.abs(arr[0] - arr[1]).mean(),
            }
            for k, v in d.items():
                total[k].append(v)
            tops = top5(res.arrays)
            print(f"  seed {seed}: " + "  ".join(f"{k} {v:.4f}" for k, v in d.items()), flush=True)
            for label, t in zip(("A", "B", f"[A:B:{a.when}]", "[A|B]"), tops, strict=True):
                print(f"    top-5 {label:>10}: {' '.join(t)}", flush=True)
    print("\nmean over pairs and seeds: " + "  ".join(f"{k} {np.mean(v):.4f}" for k, v in total.items()))


if __name__ == "__main__":
    main()
