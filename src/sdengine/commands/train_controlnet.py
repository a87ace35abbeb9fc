"""``sdengine train controlnet --model M --data DIR --condition canny``: a ControlNet for a frozen SD model."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .common import add_force_resume, add_sample_args, add_train_args
from .help_format import DefaultsHelpFormatter


def _options(pairs: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise UsageError(f"--condition-option {pair!r}: expected NAME=NUMBER, e.g. low=50")
    return out


def run(a: argparse.Namespace) -> int:
    from ..control import PREPROCESSORS, option_names
    from ..train.controlnet import ControlNetTrainSpec, train_controlnet
    from .common import check_sample_args, device, train_config

    check_sample_args(a)
    opts = _options(a.condition_option or [])
    if opts and a.condition_dir is not None:  # the maps are read as they are: no preprocessor runs
        raise UsageError(
            "--condition-option sets the preprocessor, which does not run with --condition-dir (its control maps "
            "are used as they are): drop one"
        )
    if a.condition in PREPROCESSORS:
        unknown = sorted(set(opts) - option_names(a.condition))
        if unknown:
            valid = ", ".join(sorted(option_names(a.condition))) or "none"
            raise UsageError(f"--condition-option {', '.join(unknown)}: not options of {a.condition!r} ({valid})")
    spec = ControlNetTrainSpec(
        model=a.model,
        data=a.data,
        condition=a.condition,
        condition_dir=a.condition_dir,
        condition_options=opts,
        resolution=a.resolution,
        cond_dropout=a.cond_dropout,
        caption_mismatch=a.caption_mismatch,
        timestep_sampling=a.timesteps,
        save_dtype=a.save_dtype,
        controlnet_init=a.init,
        sample_prompt=a.sample_prompt,
    )
    cfg = train_config(a, sample_every=a.sample_every)
    result, folder = train_controlnet(
        spec, cfg, a.out, device=device(a), resume=a.resume, overwrite=a.overwrite, force_resume=a.force_resume
    )
    first, last = result.losses[:10], result.losses[-10:]
    if first and last:
        print(f"loss {sum(first) / len(first):.4f} (first 10 steps) -> {sum(last) / len(last):.4f} (last 10)")
    print(f"ControlNet written to {folder} (diffusers layout); use it with --control TYPE:IMAGE --controlnet {folder}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    if train is None:
        return
    p = train.add_parser(
        "controlnet",
        formatter_class=DefaultsHelpFormatter,
        help="train a ControlNet for a frozen Stable Diffusion model",
        description="The base model stays frozen; the ControlNet starts as a copy of its U-Net encoder "
        "(zero convolutions at zero) and learns to follow control maps made from the training images.",
    )
    p.add_argument("--model", required=True, help="base model: diffusers folder, single file or built-in name")
    p.add_argument("--data", required=True, help="folder of training images (+ NAME.txt captions)")
    p.add_argument("--condition", default="canny", help="preprocessor for the control maps (canny, softedge, ...)")
    p.add_argument("--condition-dir", default=None, help="ready-made control maps (same relative paths)")
    p.add_argument(
        "--condition-option",
        action="append",
        metavar="NAME=VALUE",
        help="preprocessor option, e.g. low=50 (repeatable)",
    )
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's)")
    p.add_argument(
        "--cond-dropout",
        "--empty-prompt-p",
        dest="cond_dropout",
        type=float,
        default=0.5,
        help="fraction of captions replaced by the empty prompt (the ControlNet paper's 0.5)",
    )
    p.add_argument(
        "--caption-mismatch",
        type=float,
        default=0.0,
        help="fraction of the kept captions swapped for another image's caption (the control then decides the "
        "structure against a disagreeing prompt)",
    )
    p.add_argument(
        "--timesteps",
        choices=["uniform", "cubic"],
        default="uniform",
        help="timestep sampling: uniform, or cubic (biased to the noisy steps that lay out the image)",
    )
    p.add_argument(
        "--save-dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="dtype of the exported ControlNet weights",
    )
    p.add_argument("--init", default=None, help="continue from this ControlNet instead of the U-Net copy")
    add_sample_args(p, control=True)
    add_train_args(
        p,
        out="runs/controlnet",
        steps=5000,
        batch_size=4,
        lr=1e-5,
        warmup=100,
        ema_decay=0.0,
        checkpoint_every=500,
        ema_help="0: export the trained weights themselves",
    )
    add_force_resume(p, "--model or --condition")
    p.set_defaults(func=run)
