"""The one line a trainer prints before its first step: every setting that decides the run's cost and result,
defaults included, so a user sees at once what runs (a 512-px run on a 64-px model is seconds per step)."""

from __future__ import annotations

from typing import Any


def _value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, tuple | list):
        return ",".join(_value(x) for x in v)
    return str(v)


def settings_line(kind: str, *, model: str, resolution: int, images: int, cfg: Any, device: Any, **extra: Any) -> str:
    """``train KIND: model M, resolution R, N images, steps S, batch B, lr L, ...`` (``extra`` after the
    shared settings of :class:`sdengine.train.loop.TrainConfig`, None values left out)."""
    items: dict[str, Any] = {
        "model": model,
        "resolution": resolution,
        "images": images,
        "steps": cfg.steps,
        "batch": cfg.batch_size,
        "lr": cfg.lr,
        "warmup": cfg.warmup_steps,
        "ema": cfg.ema_decay,
        "mixed precision": cfg.mixed_precision,
        "seed": cfg.seed,
        "device": device,
    }
    items.update({k.replace("_", " "): v for k, v in extra.items()})
    return f"train {kind}: " + ", ".join(f"{k} {_value(v)}" for k, v in items.items() if v is not None)


__all__ = ["settings_line"]
