"""Training throughput of sdengine's pixel U-Net against diffusers' UNet2DModel (same architecture).

One training step = forward + MSE loss + backward + AdamW step, on the FASHION_MNIST preset
(32x32x1, class-conditional) by default. The two models get identical weights and inputs and run
interleaved (ours, theirs, ours, ...) after a warm-up, so that load from other processes on the machine
hits both alike; the medians of per-step times are reported.

    .venv/bin/python benchmarks/ddpm_train.py [--batch 64] [--rounds 5] [--steps 3] [--threads N] [--channels-last]

On a machine shared with other jobs, ``--threads 1`` gives far steadier (and often faster) wall times than
several OpenMP threads that keep waiting for each other.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sdengine.models.unet import FASHION_MNIST, UNet


def make_step(model: torch.nn.Module, *, diffusers_api: bool, lr: float = 1e-4):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        out = model(x, t, class_labels=y).sample if diffusers_api else model(x, t, class_labels=y)
        loss = torch.nn.functional.mse_loss(out, target)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds after warm-up")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per model per round")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--channels-last", action="store_true", help="both models and the input in NHWC layout")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import UNet2DModel  # benchmark-only oracle

    cfg = FASHION_MNIST
    dcfg = cfg.to_diffusers()
    dcfg.pop("_class_name")
    torch.manual_seed(0)
    theirs = UNet2DModel(**dcfg).train()
    ours = UNet(cfg).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    n_params = sum(p.numel() for p in ours.parameters())
    if args.channels_last:
        ours.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)

    g = torch.Generator().manual_seed(0)
    B, C, S = args.batch, cfg.in_channels, cfg.sample_size
    x = torch.randn(B, C, S, S, generator=g)
    target = torch.randn(B, C, S, S, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    y = torch.randint(0, 10, (B,), generator=g)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    steps = {"sdengine": make_step(ours, diffusers_api=False), "diffusers": make_step(theirs, diffusers_api=True)}
    for _ in range(args.warmup):
        for step in steps.values():
            step(x, t, y, target)
    # Wall time is what a user waits; CPU time (all threads of this process) is steadier when other
    # processes share the machine, so both are reported.
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                t0, c0 = time.perf_counter(), time.process_time()
                step(x, t, y, target)
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)

    print(
        f"FASHION_MNIST U-Net, {n_params / 1e6:.2f}M params, batch {B}x{C}x{S}x{S}, class-conditional, "
        f"fwd+bwd+AdamW, torch {torch.__version__}, {torch.get_num_threads()} threads"
        + (", channels_last" if args.channels_last else "")
    )
    med, med_cpu = {}, {}
    for name, ts in times.items():
        med[name], med_cpu[name] = statistics.median(ts), statistics.median(cpu[name])
        print(
            f"  {name:9s}: wall median {med[name] * 1e3:8.1f} ms/step = {B / med[name]:6.1f} images/s "
            f"(min {min(ts) * 1e3:.0f}, max {max(ts) * 1e3:.0f} ms, {len(ts)} steps); "
            f"CPU median {med_cpu[name] * 1e3:8.1f} ms/step = {B / med_cpu[name]:6.1f} images/CPU-s"
        )
    print(
        f"  speed ratio sdengine/diffusers: wall {med['diffusers'] / med['sdengine']:.3f}, "
        f"CPU {med_cpu['diffusers'] / med_cpu['sdengine']:.3f}  (>1: sdengine faster)"
    )


if __name__ == "__main__":
    main()
