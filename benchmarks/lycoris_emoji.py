"""What an OFT/BOFT file costs per image on the built-in ``emoji`` model, beside a plain LoRA.

The OFT (and BOFT) file is made here, on the very layers of the shipped ``emoji-fruit`` LoRA (attention,
feed-forward and convolutions: 145 layers): seeded random ``oft_blocks`` of 4-row blocks, LyCORIS' constraint
(alpha 1e-3) and no rescale, written under the same kohya names. Each configuration generates one 64x64 image of
``--steps`` DPM++ 2M steps; the configurations are interleaved, medians of ``--repeats``.

    PYTHONPATH=src .venv/bin/python benchmarks/lycoris_emoji.py --threads 1 --steps 12 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import sdengine
from sdengine.catalog import builtin_path
from sdengine.weights import load_file, save_safetensors

BLOCK = 4


def orthogonal_file(folder: Path, algo: str) -> Path:
    """An OFT (``oft_blocks`` (n, 4, 4)) or BOFT (2 stages, (2, n, 4, 4)) file on emoji-fruit's layers."""
    lora = builtin_path("loras", "emoji-fruit")
    assert lora is not None
    sd, _ = load_file(lora)
    g = torch.Generator().manual_seed(0)
    out: dict[str, torch.Tensor] = {}
    for key, up in sorted(sd.items()):
        if not key.endswith(".lora_up.weight"):
            continue
        layer, rows = key.removesuffix(".lora_up.weight"), int(up.shape[0])
        shape = (rows // BLOCK, BLOCK, BLOCK) if algo == "oft" else (2, rows // BLOCK, BLOCK, BLOCK)
        out[f"{layer}.oft_blocks"] = torch.randn(shape, generator=g) * 0.05
        out[f"{layer}.alpha"] = torch.tensor(1e-3)
    path = folder / f"emoji-{algo}.safetensors"
    save_safetensors(out, path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    pipe = sdengine.load_pipeline("emoji", device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        oft, boft = orthogonal_file(Path(tmp), "oft"), orthogonal_file(Path(tmp), "boft")
        runs: dict[str, list[tuple[str, float]]] = {
            "no LoRA": [],
            "LoRA emoji-fruit, weight 1": [("emoji-fruit", 1.0)],
            "OFT, weight 0": [(str(oft), 0.0)],
            "OFT, weight 1": [(str(oft), 1.0)],
            "BOFT (2 stages), weight 1": [(str(boft), 1.0)],
        }
        call = {"steps": args.steps, "seed": 1, "width": 64, "height": 64, "progress": False}

        def generate(loras: list[tuple[str, float]]) -> float:
            t = time.perf_counter()
            pipe("grinning face", "", loras=loras, **call)
            return time.perf_counter() - t

        for loras in runs.values():  # warm-up (allocator, oneDNN, the file cache)
            generate(loras)
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for name, loras in runs.items():
                times[name].append(generate(loras))
    for name, ts in times.items():
        shown = ", ".join(f"{t:.2f}" for t in ts)
        print(f"{name:28s} median {statistics.median(ts):6.2f} s  ({shown})")


if __name__ == "__main__":
    main()
