"""Flags every ``sdengine train ...`` command shares, and the :class:`TrainConfig` they make."""

from __future__ import annotations

import argparse
from typing import Any


def add_train_args(
    p: argparse.ArgumentParser,
    *,
    out: str,
    steps: int,
    batch_size: int,
    lr: float,
    warmup: int,
    ema_decay: float,
    checkpoint_every: int,
    ema_help: str | None = None,
) -> None:
    """The optimisation, checkpoint and device flags (defaults differ per trainer)."""
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=warmup, help="linear learning-rate warm-up steps")
    p.add_argument("--grad-clip", type=float, default=1.0)
    # None until train_config: a trainer can tell a --ema-decay given from its default (lora's is refused
    # without --ema, where it would change nothing)
    p.add_argument(
        "--ema-decay",
        type=float,
        default=None,
        help=f"{ema_help} (default: {ema_decay:g})" if ema_help else f"default: {ema_decay:g}",
    )
    p.set_defaults(ema_decay_default=ema_decay)
    p.add_argument("--mixed-precision", choices=["auto", "no", "bf16"], default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=checkpoint_every)
    p.add_argument("--out", default=out)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="OUT already holds a run: delete its checkpoint and outputs and start again",
    )
    p.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this long")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")


def add_force_resume(p: argparse.ArgumentParser, what: str = "--model") -> None:
    """``--force-resume`` of the trainers whose checkpoint records what they were trained on."""
    p.add_argument(
        "--force-resume",
        action="store_true",
        help=f"with --resume: continue although the checkpoint was trained with another {what} (say the model "
        "file was moved); without it that is refused",
    )


def add_sample_args(p: argparse.ArgumentParser, *, control: bool = False) -> None:
    """``--sample-every`` / ``--sample-prompt`` of the LoRA and ControlNet trainers."""
    what = " with the first training image's control map" if control else ""
    p.add_argument(
        "--sample-every",
        type=int,
        default=0,
        metavar="N",
        help=f"every N steps (and at the end) write OUT/samples/step-NNNNNN.png{what}, made with the current "
        "weights, with its PNG parameters (0: none)",
    )
    p.add_argument("--sample-prompt", default=None, help="prompt of the samples (default: the first training caption)")


def check_sample_args(a: argparse.Namespace) -> None:
    """``--sample-prompt`` is the prompt of ``--sample-every``'s samples: alone it would change nothing."""
    if a.sample_prompt is not None and not a.sample_every:
        from sdengine.errors import UsageError

        raise UsageError("--sample-prompt is the prompt of --sample-every N's samples: give --sample-every too")


def train_config(a: argparse.Namespace, **fixed: Any) -> Any:
    """A TrainConfig from the flags of :func:`add_train_args`; ``fixed`` sets the rest (e.g. sample_every)."""
    from ..train.loop import TrainConfig

    return TrainConfig(
        steps=a.steps,
        batch_size=a.batch_size,
        lr=a.lr,
        warmup_steps=a.warmup,
        grad_clip=a.grad_clip,
        ema_decay=a.ema_decay_default if a.ema_decay is None else a.ema_decay,
        mixed_precision=a.mixed_precision,
        seed=a.seed,
        checkpoint_every=a.checkpoint_every,
        max_seconds=None if a.max_minutes is None else 60 * a.max_minutes,
        **fixed,
    )


def check_json_target(path: str | None) -> None:
    """A ``--json`` file checked (and its folder made) before a long run, so that its results are not lost at the
    end: a one-line UsageError for a folder, or a place no file can be written."""
    if path is None:
        return
    from pathlib import Path

    from sdengine.errors import UsageError

    if Path(path).is_dir():
        raise UsageError(f"--json {path} is a folder; give a file name")
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--json {path}: cannot write there ({e.strerror or e})") from None


def device(a: argparse.Namespace) -> str:
    from ..devices import resolve_device

    return str(resolve_device(a.device))
