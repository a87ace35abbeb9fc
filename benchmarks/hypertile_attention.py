"""One self-attention layer of SD 1.5's first level at a 128x128 latent (a 1024x1024 image: 16,384 tokens, 320
channels, 8 heads) with and without HyperTile's tiles.

    PYTHONPATH=src python benchmarks/hypertile_attention.py --threads 2 [--batch 1] [--repeats 2]

Each row: the best of ``--repeats`` calls of ``Attention.forward`` (fp32, CPU) with the grid cut into ``nh x nw``
tiles (1 x 1 is plain attention), and the largest difference from the plain output (the tiles' attention is another
function, so it differs; shown only to say how much). A1111's defaults draw from 4x4, 2x2 and 1x1 tiles a side at this
size (tile 256 px -> 32 cells; 128 / 32, 64, 128), ComfyUI's defaults (256, swap 2) from 4 and 2.
"""

from __future__ import annotations

import argparse
import time

import torch

from sdengine.nn.attention import Attention
from sdengine.nn.hypertile import tiled_attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--side", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    layer = Attention(320, 8, 40).eval()
    side = a.side
    x = torch.randn(a.batch, side * side, 320)
    plain = None
    print(f"latent {side}x{side} ({side * side} tokens), batch {a.batch}, {a.threads} threads, fp32")
    for n in (1, 2, 4, 8):
        layer.hypertile = None
        if n > 1:
            layer.hypertile = lambda t, attend, grid, n=n: tiled_attention(t, side, side, n, n, attend)
        best = float("inf")
        with torch.inference_mode():
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                out = layer(x)
                best = min(best, time.perf_counter() - t0)
        if plain is None:
            plain = out
        diff = float((out - plain).abs().max())
        print(f"  {n}x{n} tiles of {side // n}x{side // n}: {best:.3f} s  (max |diff| from plain {diff:.3g})")


if __name__ == "__main__":
    main()
