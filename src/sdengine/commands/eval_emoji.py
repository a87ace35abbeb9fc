"""``sdengine eval emoji``: prompt adherence, Frechet distance, guidance sweep, ControlNet and LoRA checks of the
emoji model, scored by the emoji recogniser (see :mod:`sdengine.eval.emoji`)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import UsageError
from .common import check_json_target


def _positive(what: str, v: int | None, minimum: int = 1) -> None:
    if v is not None and v < minimum:
        raise UsageError(f"--{what} must be at least {minimum}, got {v}")


_SWEEP_KEYS = ("scale", "end", "cfg", "start", "early", "guess")


def _sweep_point(text: str):
    """``"SCALE:END[:CFG][:guess]"`` or ``"scale=3,start=0.75,early=0.4,..."`` of ``--control-sweep`` -> a checked
    ControlSetting."""
    from ..eval.emoji import ControlSetting, control_setting

    if "=" in text:
        fields: dict[str, float | bool] = {}
        for part in text.split(","):
            key, _, value = part.partition("=")
            if key not in _SWEEP_KEYS or key in fields:
                raise UsageError(f"--control-sweep {text!r}: keys are {', '.join(_SWEEP_KEYS)} (each once)")
            if key == "guess":
                if value not in ("0", "1"):
                    raise UsageError(f"--control-sweep {text!r}: guess=0 or guess=1")
                fields[key] = value == "1"
                continue
            try:
                fields[key] = float(value)
            except ValueError:
                raise UsageError(f"--control-sweep {text!r}: {key} must be a number") from None
        st = ControlSetting(
            scale=float(fields.get("scale", 1.0)),
            end=float(fields.get("end", 1.0)),
            cfg=float(fields["cfg"]) if "cfg" in fields else None,
            guess_mode=bool(fields.get("guess", False)),
            start=float(fields.get("start", 0.0)),
            early=float(fields.get("early", 0.0)),
        )
    else:
        parts = text.split(":")
        guess = len(parts) >= 3 and parts[-1] == "guess"
        nums = parts[:-1] if guess else parts
        try:
            values = [float(v) for v in nums]
        except ValueError:
            values = []
        if not 2 <= len(values) <= 3:
            raise UsageError(
                f"--control-sweep takes SCALE:END[:CFG][:guess] such as 0.5:1, 1:0.7 or 1:1:3:guess, or "
                f"key=value pairs such as scale=3,start=0.75,early=0.4; got {text!r}"
            )
        st = ControlSetting(values[0], values[1], values[2] if len(values) == 3 else None, guess)
    try:
        return control_setting(st)
    except UsageError:
        raise UsageError(
            f"--control-sweep {text!r}: SCALE must be >= 0, END in (0, 1], start in [0, END), early >= 0 "
            "(and start > 0 with it) and CFG >= 0"
        ) from None


def _load_recogniser(device: str, path: str | None):
    from ..metrics.emoji_recogniser import load_emoji_recogniser

    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"recogniser not found: {path}")
    return load_emoji_recogniser(device=device, path=path)


def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def run(a: argparse.Namespace) -> int:
    from ..devices import resolve_device
    from ..eval.emoji import evaluate_emoji, format_report
    from ..eval.emoji_defaults import DEFAULT_CFG_SWEEP
    from ..pipeline import load_pipeline

    _positive("n", a.n, 2)
    _positive("paraphrase-n", a.paraphrase_n)
    _positive("steps", a.steps)
    _positive("sweep-n", a.sweep_n)
    _positive("batch-size", a.batch_size)
    _positive("control-n", a.control_n)
    if not math.isfinite(a.cfg) or a.cfg < 0:
        raise UsageError(f"--cfg must be a number >= 0, got {a.cfg}")
    for what, p in (("--controlnet", a.controlnet), ("--lora", a.lora)):
        if p is not None and not Path(p).exists():
            raise FileNotFoundError(f"{what}: not found: {p}")
    check_json_target(a.json)

    sweep = [_sweep_point(text) for text in a.control_sweep]
    if sweep and a.controlnet is None:
        raise UsageError("--control-sweep needs --controlnet")
    # settings of a part that does not run: once ignored without a word
    for flag, given, needs in (
        ("--cfg-sweep", a.cfg_sweep is not None and a.no_sweep, "the guidance sweep, which --no-sweep skips"),
        ("--sweep-n", a.sweep_n is not None and a.no_sweep, "the guidance sweep, which --no-sweep skips"),
        ("--control-n", a.control_n is not None and a.controlnet is None, "the ControlNet check: give --controlnet"),
        ("--lora-weight", a.lora_weight is not None and a.lora is None, "the LoRA check: give --lora"),
    ):
        if given:
            raise UsageError(f"{flag} is a setting of {needs}")

    device = str(resolve_device(a.device))
    pipe = load_pipeline(a.model, device=device, dtype=a.dtype)
    recogniser = _load_recogniser(device, a.recogniser)
    res = evaluate_emoji(
        pipe,
        recogniser,
        n=a.n,
        cfg=a.cfg,
        steps=a.steps,
        sampler=a.sampler,
        seed=a.seed,
        batch_size=a.batch_size,
        cfg_sweep=None if a.no_sweep else tuple(a.cfg_sweep or DEFAULT_CFG_SWEEP),
        sweep_n=200 if a.sweep_n is None else a.sweep_n,
        paraphrase_n=a.paraphrase_n,
        controlnet=a.controlnet,
        control_n=64 if a.control_n is None else a.control_n,
        control_sweep=sweep,
        lora=a.lora,
        lora_weight=1.0 if a.lora_weight is None else a.lora_weight,
        progress=not a.quiet,
    )
    print(format_report(res))
    if a.json is not None:
        from ..io.atomic import write_text_atomic

        out = write_text_atomic(Path(a.json), json.dumps(_jsonable(res), indent=2, ensure_ascii=False) + "\n")
        print(f"results written to {out}")
    return 0


def register_eval(evaluate: argparse._SubParsersAction) -> None:
    from ..eval.emoji_defaults import DEFAULT_CFG, DEFAULT_CFG_SWEEP  # torch-free: --help stays fast

    p = evaluate.add_parser(
        "emoji",
        help="prompt adherence, FD, guidance sweep (and ControlNet / LoRA) of the emoji model",
        description="Generates images from the canonical captions and hand-written paraphrases and scores them "
        "with the emoji recogniser: top-1/top-5, Frechet distance in recogniser features against the renders, "
        "top-1/top-5 over guidance scales; with --controlnet the edge F1 with and without it, with --lora the "
        "held-out subgroup without and with it. Prints a markdown table.",
    )
    p.add_argument("--model", default="emoji", help="built-in name, diffusers folder or file (default: emoji)")
    p.add_argument("--n", type=int, default=None, help="caption images: an evenly spaced subset (default: all)")
    p.add_argument("--paraphrase-n", type=int, default=None, help="paraphrases: an evenly spaced subset")
    p.add_argument("--cfg", type=float, default=DEFAULT_CFG, help=f"guidance scale (default {DEFAULT_CFG:g})")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--cfg-sweep",
        type=float,
        nargs="+",
        default=None,
        metavar="CFG",
        help=f"guidance scales of the sweep (default {' '.join(f'{c:g}' for c in DEFAULT_CFG_SWEEP)})",
    )
    p.add_argument("--sweep-n", type=int, default=None, help="captions per guidance scale in the sweep (default 200)")
    p.add_argument("--no-sweep", action="store_true", help="skip the guidance sweep")
    p.add_argument("--controlnet", default=None, metavar="PATH", help="a canny ControlNet to measure edge F1")
    p.add_argument("--control-n", type=int, default=None, help="renders used for the ControlNet check (default 64)")
    p.add_argument(
        "--control-sweep",
        nargs="+",
        default=[],
        metavar="SCALE:END[:CFG][:guess]",
        help="also make the mismatched-prompt images with the ControlNet at conditioning scale SCALE for the first "
        "END of the steps, at guidance CFG (default --cfg), in guess mode with ':guess' (the ControlNet on the "
        "conditional rows only) (e.g. 0.5:1 1:0.7 1:1:3:guess) and score them the same way; or key=value pairs "
        "(scale, end, cfg, start, early, guess=0|1): scale=3,start=0.75,early=0.4 is scale 3 from 75%% of the "
        "steps and 0.4 before",
    )
    p.add_argument("--lora", default=None, metavar="PATH", help="a LoRA for the held-out subgroup")
    p.add_argument("--lora-weight", type=float, default=None, help="the LoRA's weight (default 1)")
    p.add_argument("--recogniser", default=None, metavar="PATH", help="recogniser weights (default: the shipped)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the results as JSON")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="the model's dtype (default: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
