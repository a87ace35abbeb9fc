"""``sdengine train lora --model M --data DIR``: a kohya-format LoRA trained on captioned images (see train/lora.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError
from .common import add_force_resume, add_sample_args, add_train_args
from .help_format import DefaultsHelpFormatter


def run(a: argparse.Namespace) -> int:
    from ..train.lora import LoRASpec, train_lora
    from .common import check_sample_args, device, train_config

    check_sample_args(a)
    if a.ema_decay is not None and not a.ema:  # once ignored without a word: the file held the last weights
        raise UsageError("--ema-decay is the decay of --ema's average: give --ema too (or drop --ema-decay)")
    spec = LoRASpec(
        model=a.model,
        data=a.data,
        rank=a.rank,
        alpha=a.alpha,
        conv_rank=a.conv_rank,
        conv_alpha=a.conv_alpha,
        targets=tuple(dict.fromkeys(a.target or ["attention"])),
        train_text_encoder=a.train_text_encoder,
        resolution=a.resolution,
        gradient_checkpointing=a.gradient_checkpointing,
        min_snr_gamma=a.min_snr_gamma,
        output_name=a.name or Path(a.out).name or "lora",
        save_dtype=a.save_dtype,
        use_ema=a.ema,
        sample_prompt=a.sample_prompt,
    )
    cfg = train_config(a, sample_every=a.sample_every)
    _, path = train_lora(
        spec, cfg, a.out, device=device(a), resume=a.resume, overwrite=a.overwrite, force_resume=a.force_resume
    )
    print(f"LoRA written to {path}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    if train is None:
        return
    p = train.add_parser(
        "lora",
        formatter_class=DefaultsHelpFormatter,
        help="train a LoRA for an SD model on a folder of captioned images",
        description="Images with a .txt caption beside each (kohya convention). Writes OUT/NAME.safetensors in "
        "kohya format with ss_* metadata; A1111, ComfyUI, diffusers and 'sdengine generate --lora' load it.",
    )
    p.add_argument("--model", required=True, help="a diffusers folder, an SD .safetensors/.ckpt file, or built-in name")
    p.add_argument("--data", required=True, help="folder of images with .txt captions")
    p.add_argument("--name", default=None, help="file name of the LoRA (default: the output folder's name)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="scale = alpha / rank (default alpha = rank)")
    p.add_argument(
        "--target",
        action="append",
        choices=["attention", "proj", "ff", "conv"],
        help="layers to adapt; repeat for several (default: attention)",
    )
    p.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convolutions with --target conv")
    p.add_argument("--conv-alpha", type=float, default=None)
    p.add_argument("--train-text-encoder", action="store_true", help="also adapt the text encoder's attention")
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="less memory, about 30%% slower")
    p.add_argument("--min-snr-gamma", type=float, default=None)
    p.add_argument("--ema", action="store_true", help="write the EMA of the weights instead of the last ones")
    p.add_argument("--save-dtype", choices=["fp32", "fp16", "bf16"], default="fp16")
    add_sample_args(p)
    add_train_args(
        p,
        out="runs/lora",
        steps=1000,
        batch_size=1,
        lr=1e-4,
        warmup=0,
        ema_decay=0.999,
        checkpoint_every=500,
        ema_help="used with --ema",
    )
    add_force_resume(p)
    p.set_defaults(func=run)
