"""Winograd F(4x4,3x3) against the direct convolution, layer by layer at SD 1.5's shapes, and on the whole U-Net.

    PYTHONPATH=src python benchmarks/winograd_layers.py --threads 2 [--unet /tmp/models/random-sd15]

Per layer: the best of ``--repeats`` calls of ``F.conv2d`` (oneDNN) and of ``winograd_conv3x3`` (the filter
transform done once beforehand, as the cached layer does), and both errors against the float64 convolution.
With ``--unet FOLDER`` (a diffusers folder, e.g. the one ``sdengine bench --random sd15 --workdir DIR`` keeps):
one U-Net CFG step (batch 2, 64x64 latents) with the layers converted and not, interleaved, medians.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.nn import functional as F

from sdengine.nn.winograd import enable_winograd, transform_filter, winograd_conv3x3, worth_it

# (batch, C_in, C_out, side): the U-Net's levels at 512x512 (CFG batch 2) and the VAE decoder's big layers
SHAPES = [
    (2, 320, 320, 64),
    (2, 640, 320, 64),
    (2, 640, 640, 32),
    (2, 1280, 640, 32),
    (2, 1280, 1280, 16),
    (2, 2560, 1280, 8),
    (1, 512, 512, 64),
    (1, 512, 512, 128),
    (1, 512, 256, 256),
    (1, 256, 256, 256),
]


def best(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def layers(repeats: int) -> None:
    head = f"{'N':>2} {'C_in':>5} {'C_out':>5} {'side':>4}"
    print(f"{head}  direct ms  winograd ms  speed-up  err W / err direct  converted")
    for n, c, k, side in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, side, side, generator=g)
        w = torch.randn(k, c, 3, 3, generator=g) * 0.02
        b = torch.randn(k, generator=g)
        with torch.inference_mode():
            u = transform_filter(w)
            ref = F.conv2d(x.double(), w.double(), b.double(), padding=1)
            e_w = (winograd_conv3x3(x, u, b).double() - ref).abs().max().item()
            e_d = (F.conv2d(x, w, b, padding=1).double() - ref).abs().max().item()
            td = best(lambda: F.conv2d(x, w, b, padding=1), repeats)  # noqa: B023
            tw = best(lambda: winograd_conv3x3(x, u, b), repeats)  # noqa: B023
        conv = torch.nn.Conv2d(c, k, 3, padding=1)
        print(
            f"{n:>2} {c:>5} {k:>5} {side:>4}  {td * 1e3:9.1f}  {tw * 1e3:11.1f}  {td / tw:7.2f}x  "
            f"{e_w:.1e} / {e_d:.1e}      {'yes' if worth_it(conv) else 'no'}",
            flush=True,
        )


def unet_step(folder: str, repeats: int) -> None:
    import sdengine
    from sdengine.nn import winograd

    unets = {
        name: sdengine.load_pipeline(folder, device="cpu", dtype="fp32", fast_path="none").unet
        for name in ("direct", "winograd")
    }
    n = enable_winograd(unets["winograd"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 64, 64, generator=g)
    ctx = torch.randn(2, 77, unets["direct"].config.cross_attention_dim, generator=g)
    t = torch.tensor([500.0, 500.0])
    times: dict[str, list[float]] = {"direct": [], "winograd": []}
    outs = {}
    with torch.inference_mode():
        for r in range(repeats + 1):
            for name, unet in unets.items():
                t0 = time.perf_counter()
                out = unet(x, t, encoder_hidden_states=ctx)
                dt = time.perf_counter() - t0
                if r == 0:  # warm-up (and the cached filter transforms)
                    outs[name] = out
                    print(f"  {name}: warm-up {dt:.2f} s", flush=True)
                    continue
                times[name].append(dt)
                print(f"  {name}: {dt:.2f} s", flush=True)
    d, w = statistics.median(times["direct"]), statistics.median(times["winograd"])
    diff = (outs["winograd"] - outs["direct"]).abs()
    cached = winograd.BUDGET.used() / 2**20
    print(
        f"U-Net CFG step, 64x64 latents, {n} layers converted, {cached:.0f} MiB of transforms cached "
        f"(budget {winograd.BUDGET.limit() / 2**20:.0f} MiB): direct {d:.2f} s, winograd {w:.2f} s "
        f"(medians of {repeats}), {d / w:.2f}x; output max |diff| {diff.max().item():.1e}, "
        f"mean {diff.mean().item():.1e} (output mean |value| {outs['direct'].abs().mean().item():.2f})"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--unet", default=None, help="a diffusers folder: also time one U-Net step")
    ap.add_argument("--no-layers", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} thread(s)")
    if not a.no_layers:
        layers(a.repeats)
    if a.unet:
        unet_step(a.unet, a.repeats)


if __name__ == "__main__":
    main()
