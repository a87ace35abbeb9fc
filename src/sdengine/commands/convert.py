"""``sdengine convert SRC DST``: a diffusers folder <-> one LDM ``.safetensors`` file."""

from __future__ import annotations

import argparse
import time


def run(a: argparse.Namespace) -> int:
    from ..weights import convert

    t = time.perf_counter()
    dst = convert(a.src, a.dst, dtype=a.dtype, vae=a.vae, prediction_type=a.prediction_type, config=a.config)
    print(f"converted {a.src} -> {dst} in {time.perf_counter() - t:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint: diffusers folder <-> single LDM .safetensors",
        description="A DST ending in .safetensors gets one LDM-layout file; any other DST a diffusers folder.",
    )
    p.add_argument("src", help="a diffusers folder, or a .safetensors/.ckpt single file")
    p.add_argument("dst")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights")
    p.add_argument("--vae", default=None, help="a VAE to use when SRC has none")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None)
    p.add_argument("--config", default=None, help="a diffusers folder whose configs describe SRC")
    p.set_defaults(func=run)
