"""Count the tensor operations a generation's sampling loop runs outside the U-Net, per sampler.

    python benchmarks/loop_ops.py [SAMPLER ...]      (default: dpmpp_2m euler euler_a dpmpp_2m_sde)

With the ``cuda_graphs`` fast path these run between two U-Net replays, each its own kernel launch (classifier-
free guidance's concatenations and combination, the denoiser's scalings, the sampler's update, the casts around
the network); with ``cuda_graph_loop`` they are inside the one recorded loop (sdengine.pipeline.loop_graph). The
shipped ``emoji`` model, 25 steps, batch 1, the loop exactly as the loop graph records it
(``Pipeline.run_loop_plan``). Operations on tensors of 64 values or fewer are left out: on a GPU run those are
the CPU's own bookkeeping (the per-step sigma tensors), not kernels. The step graphs' own copies (the step's
inputs into the graph's buffers, its output out: about 4 a step) come on top.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdengine
from sdengine.pipeline.loop_graph import LoopPlan


class Count(TorchDispatchMode):
    """Operations with a tensor of more than 64 values among their inputs or outputs, while ``active()``."""

    def __init__(self, active: Any) -> None:
        super().__init__()
        self.active = active
        self.n = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.active() and not str(func).startswith(("aten.detach", "aten._local_scalar_dense")):
            tensors = [a for a in args if isinstance(a, torch.Tensor)] + (
                [out] if isinstance(out, torch.Tensor) else []
            )
            if any(t.numel() > 64 for t in tensors):
                self.n += 1
        return out


def main(samplers: list[str]) -> None:
    pipe = sdengine.load_pipeline("emoji", fast_path="none")
    depth = [0]
    forward = pipe.unet.forward

    def counted_forward(*args: Any, **kwargs: Any) -> Any:  # marks the U-Net's own operations
        depth[0] += 1
        try:
            return forward(*args, **kwargs)
        finally:
            depth[0] -= 1

    pipe.unet.forward = counted_forward
    cond, uncond = pipe.conditioner.pair("a cat", "ugly")
    for sampler in samplers:
        plan = LoopPlan.of(
            sampler=sampler,
            steps=25,
            schedule="karras",
            scheduler_config=pipe.scheduler_config,
            cfg_scale=7.5,
            rescale=0.0,
            sampler_options=None,
            strength=1.0,
            start_step=None,
            dtype=pipe.dtype,
        )
        k = pipe.noise_draws(plan)
        draws = torch.randn(k, 1, 4, 8, 8) if k else None
        with torch.inference_mode(), Count(lambda: depth[0] == 0) as count:
            pipe.run_loop_plan(plan, torch.randn(1, 4, 8, 8), None, cond, uncond, draws)
        per_step = f"{count.n / 25:.1f} a step"
        print(f"{sampler}: {count.n} operations outside the U-Net in 25 steps ({per_step}), {k} noise draws")


if __name__ == "__main__":
    main(sys.argv[1:] or ["dpmpp_2m", "euler", "euler_a", "dpmpp_2m_sde"])
