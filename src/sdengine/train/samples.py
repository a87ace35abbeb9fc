"""Sample images written during LoRA and ControlNet training (``--sample-every N``).

Each sample is made with the weights as they are at that step through the ordinary pipeline call, so it shows
what a user would get from ``sdengine generate`` with the finished file, and is saved as
``OUT/samples/step-NNNNNN.png`` with its A1111 ``parameters`` text. Sampling draws from its own seeded
generator inside the pipeline and restores the global RNG state afterwards, so a run with samples follows the same
random stream as one without (exact resume stays exact)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

SAMPLES_DIR = "samples"


def sample_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / SAMPLES_DIR / f"step-{step:06d}.png"


def write_sample(
    pipe: Any,
    prompt: str,
    step: int,
    out_dir: str | Path,
    *,
    seed: int,
    size: int,
    modules: Sequence[torch.nn.Module] = (),
    training: str | None = None,
    **call: Any,
) -> Path:
    """Generate one image with ``pipe(prompt, seed=seed, ...)`` and save it with its parameters at
    :func:`sample_path`. ``modules`` are switched to eval mode for the call and back after; ``call`` is passed on
    (e.g. ``controlnets``). ``training``: what the image was made with besides the pipeline (the LoRA or ControlNet
    being trained, at this step), written as the infotext's ``Training`` field: ``--from-png`` then says that it
    does not reproduce it instead of silently making another image."""
    from ..metadata import quote, save_png

    device = next(pipe.unet.parameters()).device
    was = [m.training for m in modules]
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in modules:
                m.eval()
            result = pipe(prompt, seed=seed, width=size, height=size, progress=False, **call)
    finally:
        for m, w in zip(modules, was, strict=True):
            m.train(w)
    path = sample_path(out_dir, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = result.infotexts[0] + (f", Training: {quote(training)}" if training else "")
    return save_png(result.images[0], path, text)


__all__ = ["SAMPLES_DIR", "sample_path", "write_sample"]
