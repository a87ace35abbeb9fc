"""The diffusion networks' weight bytes in bf16 and with fp8 weight storage (``weight_dtype fp8_*``,
sdengine/nn/fp8_storage.py), from the real architectures built on the meta device (shapes only, no memory):

    python tools/fp8_storage_sizes.py
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def sizes(net: nn.Module) -> tuple[float, float, float]:
    """(GB in bf16, GB with the selected weights in fp8, the fraction of parameters stored in fp8)."""
    from sdengine.nn.fp8_storage import selected

    total = sum(p.numel() for p in net.parameters())
    stored = sum(w.numel() for m in net.modules() if selected(m) and isinstance(w := m.weight, torch.Tensor))
    return total * 2 / 1e9, ((total - stored) * 2 + stored) / 1e9, stored / total


def main() -> None:
    from sdengine.models.flux import FLUX_DEV, FluxTransformer
    from sdengine.models.mmdit import SD3_MEDIUM, SD35_LARGE, MMDiT
    from sdengine.models.unet import SD15, UNet
    from sdengine.models.unet_sdxl import SDXL_BASE

    nets: list[tuple[str, Callable[[], nn.Module]]] = [
        ("FLUX.1 [dev]", lambda: FluxTransformer(FLUX_DEV)),
        ("SD3.5 Large", lambda: MMDiT(SD35_LARGE)),
        ("SD3 Medium", lambda: MMDiT(SD3_MEDIUM)),
        ("SDXL", lambda: UNet(SDXL_BASE)),
        ("SD 1.5", lambda: UNet(SD15)),
    ]
    print("| network | bf16 | fp8 storage | parameters in fp8 |")
    print("|---|---|---|---|")
    for name, build in nets:
        with torch.device("meta"):
            net = build()
        bf16, fp8, frac = sizes(net)
        print(f"| {name} | {bf16:.2f} GB | {fp8:.2f} GB | {100 * frac:.2f}% |")


if __name__ == "__main__":
    main()
