"""Fused query/key/value projections (``fused_qkv``) against the three separate products, on this CPU.

    PYTHONPATH=src python benchmarks/fused_qkv.py --threads 2 [--presets tiny,medium] [--repeats 15] [--layers]
    PYTHONPATH=src python benchmarks/fused_qkv.py --threads 1 --cpu-time ... [--geglu]

``--cpu-time`` (with ``--threads 1``, where torch computes on the calling thread) times with the thread's CPU
clock instead of the wall clock: on a machine shared with other busy processes the wall clock counts the time
the thread waited for a core, the CPU clock only what it computed.

Per U-Net preset (random weights, sdengine's ``TINY_SD`` / ``MEDIUM_SD`` / ``SD15`` configs): one CFG call
(batch 2 at the preset's latent size, 77 text tokens) with fusion off and on, interleaved call by call, medians
and the largest output difference. ``--layers``: the projections alone at SD 1.5's shapes at 512x512 (CFG batch
2): a self-attention's q, k, v as three products against one, a cross-attention's k, v of the 77 text tokens as
two against one; and GEGLU's gate step (``a * gelu(gate)``) against the same with the product written into
gelu's output (one allocation less). ``--geglu``: each preset's U-Net call with that gate in place (as sdengine
runs it) and out of place.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sdengine.models.unet import MEDIUM_SD, SD15, TINY_SD, UNet
from sdengine.nn.attention import enable_fused_qkv

CLOCK: Callable[[], float] = time.perf_counter

PRESETS = {"tiny": (TINY_SD, 8), "medium": (MEDIUM_SD, 16), "sd15": (SD15, 32)}  # config, latent side


def interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function, the functions called in turn ``repeats`` times (after one warm-up each);
    also the best time of each, under ``NAME_best`` (steadier than the median on a shared machine)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = CLOCK()
            fn()
            times[k].append(CLOCK() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {f"{k}_best": min(v) for k, v in times.items()}


def unet_call(preset: str, repeats: int) -> None:
    cfg, side = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    with torch.no_grad():
        for p in unet.parameters():  # default init leaves zero outputs in places: make every layer matter
            p.add_(torch.randn_like(p) * 0.02)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, int(cfg.cross_attention_dim or 768), generator=g)
    outs: dict[str, torch.Tensor] = {}

    with torch.inference_mode():
        # the stack is built once and kept: switch only the flag between calls (off would drop it)
        enable_fused_qkv(unet, True)
        unet(x, t, encoder_hidden_states=ctx)

        def plain() -> object:
            for m in unet.modules():
                if hasattr(m, "fused_projections"):
                    m.fused_projections = False
            outs["plain"] = unet(x, t, encoder_hidden_states=ctx)
            return outs["plain"]

        def fused() -> object:
            for m in unet.modules():
                if hasattr(m, "fused_projections"):
                    m.fused_projections = True
            outs["fused"] = unet(x, t, encoder_hidden_states=ctx)
            return outs["fused"]

        med = interleaved({"plain": plain, "fused": fused}, repeats)
    diff = (outs["plain"] - outs["fused"]).abs().max().item()
    print(
        f"{preset:>6} U-Net CFG call (2 x {side}x{side} latents): separate {med['plain'] * 1e3:8.2f} ms, "
        f"fused {med['fused'] * 1e3:8.2f} ms, {med['plain'] / med['fused']:.3f}x (medians; best "
        f"{med['plain_best'] * 1e3:.2f} / {med['fused_best'] * 1e3:.2f} ms, "
        f"{med['plain_best'] / med['fused_best']:.3f}x), "
        f"max |diff| {diff:.1e}"
    )


def geglu_unet(preset: str, repeats: int) -> None:
    """The U-Net call with GEGLU's gate in place (sdengine's) against the out-of-place ``a * gelu(gate)``."""
    from sdengine.nn import transformer

    cfg, side = PRESETS[preset]
    torch.manual_seed(0)
    unet = UNet(cfg).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g)
    t = torch.tensor([500.0, 500.0])
    ctx = torch.randn(2, 77, int(cfg.cross_attention_dim or 768), generator=g)
    in_place = transformer.GEGLU.forward

    def out_of_place(self: transformer.GEGLU, h: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(h).chunk(2, dim=-1)
        return a * F.gelu(gate)

    outs: dict[str, torch.Tensor] = {}

    def call(name: str, forward: Callable[..., torch.Tensor]) -> Callable[[], object]:
        def run() -> object:
            transformer.GEGLU.forward = forward  # type: ignore[method-assign]
            outs[name] = unet(x, t, encoder_hidden_states=ctx)
            return outs[name]

        return run

    try:
        with torch.inference_mode():
            med = interleaved({"out": call("out", out_of_place), "in": call("in", in_place)}, repeats)
    finally:
        transformer.GEGLU.forward = in_place  # type: ignore[method-assign]
    same = torch.equal(outs["out"], outs["in"])
    print(
        f"{preset:>6} U-Net CFG call, GEGLU gate: out of place {med['out'] * 1e3:8.2f} ms, in place "
        f"{med['in'] * 1e3:8.2f} ms, {med['out'] / med['in']:.3f}x (medians); equal: {same}"
    )


def layers(repeats: int) -> None:
    g = torch.Generator().manual_seed(0)
    print("SD 1.5 at 512x512, CFG batch 2          separate ms   fused ms   speed-up")
    for tokens, dim in ((4096, 320), (1024, 640), (256, 1280), (64, 1280)):
        x = torch.randn(2, tokens, dim, generator=g)
        ws = [torch.randn(dim, dim, generator=g) * 0.02 for _ in range(3)]
        stack = torch.cat(ws)
        with torch.inference_mode():
            med = interleaved(
                {
                    "sep": lambda x=x, ws=ws: [F.linear(x, w) for w in ws],
                    "fused": lambda x=x, stack=stack: F.linear(x, stack).chunk(3, dim=-1),
                },
                repeats,
            )
        print(
            f"self q,k,v {tokens:>5} tokens x {dim:>4}        {med['sep'] * 1e3:9.3f}  {med['fused'] * 1e3:9.3f}"
            f"   {med['sep'] / med['fused']:.2f}x"
        )
    for dim in (320, 640, 1280):
        c = torch.randn(2, 77, 768, generator=g)
        ws = [torch.randn(dim, 768, generator=g) * 0.02 for _ in range(2)]
        stack = torch.cat(ws)
        with torch.inference_mode():
            med = interleaved(
                {
                    "sep": lambda c=c, ws=ws: [F.linear(c, w) for w in ws],
                    "fused": lambda c=c, stack=stack: F.linear(c, stack).chunk(2, dim=-1),
                },
                repeats,
            )
        print(
            f"cross k,v 77 tokens x 768 -> {dim:>4}       {med['sep'] * 1e3:9.3f}  {med['fused'] * 1e3:9.3f}"
            f"   {med['sep'] / med['fused']:.2f}x"
        )
    for tokens, dim in ((4096, 1280), (1024, 2560), (256, 5120)):
        h = torch.randn(2, tokens, 2 * dim, generator=g)

        def plain_gate(h: torch.Tensor = h) -> torch.Tensor:
            a, gate = h.chunk(2, dim=-1)
            return a * F.gelu(gate)

        def inplace_gate(h: torch.Tensor = h) -> torch.Tensor:
            a, gate = h.chunk(2, dim=-1)
            return F.gelu(gate).mul_(a)

        with torch.inference_mode():
            assert torch.equal(plain_gate(), inplace_gate())
            med = interleaved({"sep": plain_gate, "fused": inplace_gate}, repeats)
        print(
            f"GEGLU gate {tokens:>5} tokens x {dim:>4} (in place) {med['sep'] * 1e3:9.3f}  {med['fused'] * 1e3:9.3f}"
            f"   {med['sep'] / med['fused']:.2f}x"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--presets", default="tiny,medium", help="comma list of tiny, medium, sd15")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--layers", action="store_true", help="also the products alone at SD 1.5's shapes")
    ap.add_argument("--geglu", action="store_true", help="also each preset's U-Net with GEGLU's gate in/out of place")
    ap.add_argument("--cpu-time", action="store_true", help="time with the thread's CPU clock (needs --threads 1)")
    args = ap.parse_args()
    global CLOCK
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time measures the calling thread only: use it with --threads 1")
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    clock = "thread CPU time" if args.cpu_time else "wall clock"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {clock}")
    for preset in [p.strip() for p in args.presets.split(",") if p.strip()]:
        unet_call(preset, args.repeats)
        if args.geglu:
            geglu_unet(preset, args.repeats)
    if args.layers:
        layers(args.repeats)


if __name__ == "__main__":
    main()
