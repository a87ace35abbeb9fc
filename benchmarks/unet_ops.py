"""Count the tensor operations one U-Net call launches, sdengine against diffusers, on the same weights.

    python benchmarks/unet_ops.py [float32|bfloat16|float16]

A U-Net of SD 1.5's layout (4 levels, 2 ResNet blocks and a transformer per level, cross-attention) with tiny
widths: the number of operations depends on the layout, not on the widths. Every operation that reaches
PyTorch's dispatcher is counted (a ``TorchDispatchMode``), by name; the two engines' outputs are compared too.
On a GPU each operation is at least one kernel launch, so this is what an eager step costs in launches.
"""

from __future__ import annotations

import collections
import sys
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.counts[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    import diffusers

    from sdengine.models.unet import UNet, UNetConfig

    dtype = getattr(torch, sys.argv[1]) if len(sys.argv) > 1 else torch.float32
    cfg = dict(
        block_out_channels=(32, 64, 64, 64),
        cross_attention_dim=32,
        attention_head_dim=8,
        layers_per_block=2,
        norm_num_groups=16,
        sample_size=8,
    )
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(**cfg).eval().to(dtype)
    ours = UNet(UNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict())
    ours.to(dtype)
    x = torch.randn(2, 4, 16, 16, dtype=dtype)
    t = torch.full((2,), 500.0)
    ctx = torch.randn(2, 77, 32, dtype=dtype)
    with torch.inference_mode():
        with Count() as c_ours:
            a = ours(x, t, encoder_hidden_states=ctx)
        with Count() as c_ref:
            b = ref(x, t, encoder_hidden_states=ctx).sample
    print(f"{dtype}: outputs differ by {(a.float() - b.float()).abs().max().item():.3g} (max abs)")
    print(f"operations per call: sdengine {sum(c_ours.counts.values())}, diffusers {sum(c_ref.counts.values())}")
    print(f"{'operation':30} {'sdengine':>9} {'diffusers':>9}  (where they differ)")
    for k in sorted(set(c_ours.counts) | set(c_ref.counts), key=lambda k: -(c_ours.counts[k] + c_ref.counts[k])):
        if c_ours.counts[k] != c_ref.counts[k]:
            print(f"{k:30} {c_ours.counts[k]:>9} {c_ref.counts[k]:>9}")


if __name__ == "__main__":
    main()
