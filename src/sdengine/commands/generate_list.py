"""``sdengine generate --prompts FILE``: the command-line side of :mod:`sdengine.batch_render` (flags -> the
list's defaults, the device of this rank, the summary line)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UsageError


def check_list_flags(a: argparse.Namespace) -> None:
    """Flags that make one image (or one batch) do not combine with a list."""
    clash = [
        flag
        for flag, given in (
            ("PROMPT", a.prompt is not None),
            ("--from-png", a.from_png is not None),
            ("--outpaint", a.outpaint is not None),
            ("--grid", bool(a.grid)),
            ("--n-iter", getattr(a, "n_iter", None) is not None),
            ("--refiner", getattr(a, "refiner", None) is not None),  # an SDXL hand-off: one call at a time
            ("--refiner-switch-at", getattr(a, "refiner_switch_at", None) is not None),
            ("--hr-refiner-pass", getattr(a, "hr_refiner_pass", None) is not None),
            ("--hr-checkpoint", getattr(a, "hr_checkpoint", None) is not None),  # a second model: one call at a time
        )
        if given
    ]
    if clash:
        raise UsageError(f"--prompts renders every line of its file: drop {', '.join(clash)}")
    if str(a.out).lower().endswith(".png"):
        raise UsageError(f"--prompts writes one PNG per line into a folder: --out {a.out} names one file")


def run_list(a: argparse.Namespace, kwargs: dict[str, Any], model: str, chosen: Any = ()) -> int:
    """Parse and check the whole list, then render this process's share of it (see sdengine.batch_render).
    ``chosen``: the request fields the command's flags set (a model family's defaults leave them be)."""
    from ..batch_render import parse_prompt_list, print_summary, rank_device, render_prompt_list
    from ..distributed import env_world

    check_list_flags(a)
    defaults = dict(kwargs)
    seed = defaults.pop("seed", None)
    base = 0 if seed is None or seed == -1 else seed
    items = parse_prompt_list(a.prompts, defaults, base_seed=base, chosen=chosen)
    world = env_world()
    device = rank_device(a.device, world)

    def load() -> Any:
        from ..pipeline import load_pipeline

        return load_pipeline(
            model,
            device=device,
            dtype=a.dtype,
            vae=a.vae,
            prediction_type=a.prediction_type,
            config=a.config,
            embeddings_dir=a.embeddings_dir,
            tiny_vae=a.tiny_vae,
            clip_l=a.clip_l,  # SD3's and Flux's text encoders given apart
            clip_g=a.clip_g,
            t5=a.t5,
            weight_dtype=a.weight_dtype,
            qwen_text=a.qwen_text,  # a Qwen-Image file's text encoder and tokenizer
            qwen_tokenizer=a.qwen_tokenizer,
        )

    report = render_prompt_list(items, a.out, load, world=world, progress=not a.no_progress)
    print_summary(report, world)
    return 0
