"""The ``sdengine`` command line. User mistakes end as one line on stderr and a non-zero exit code."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

from .errors import SdengineError, UsageError
from .fastpath import OPTIONS as FAST_PATH_OPTIONS

EXIT_USER_ERROR = 2


class UserError(UsageError):
    """A mistake in the command's input: shown as one line, no traceback."""


_LEAF_PROG = "_sdengine_parser_prog"  # which (sub)parser parsed the command line, for its errors


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser with its mistakes (an unknown flag, a bad choice, a missing argument) on one line,
    ``sdengine: error: ...`` and exit code 2, as every other mistake of the command line, naming the ``--help``
    to read instead of printing the whole usage before it (``generate``'s is some thirty lines). Subcommands'
    parsers are of this class too (argparse makes them of their parent's)."""

    def error(self, message: str, prog: str | None = None) -> NoReturn:
        text = " ".join(message.split())
        self.exit(EXIT_USER_ERROR, f"sdengine: error: {text} (see '{prog or self.prog} --help')\n")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # every subcommand's --help shows its options' defaults (not None/False; not where the help names one)
        from .commands.help_format import DefaultsHelpFormatter

        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def _check_value(self, action: argparse.Action, value: object) -> None:
        """A value that is none of the choices (a subcommand, ``list``'s topic, ``--prediction``) names the
        closest choice instead of listing them all, where one is close (``'sampelrs'; did you mean
        'samplers'?``)."""
        choices = action.choices
        if choices is not None and isinstance(value, str) and value not in choices:
            from .names import did_you_mean

            guess = did_you_mean(value, [str(c) for c in choices])
            if guess:
                raise argparse.ArgumentError(action, f"invalid choice: {value!r}{guess}")
        super()._check_value(action, value)  # type: ignore[misc]

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        # The innermost parser (the subcommand's) finishes first and names itself; its namespace is copied into
        # its parents', which keep that name.
        ns, extras = super().parse_known_args(args, namespace)
        if not hasattr(ns, _LEAF_PROG):
            setattr(ns, _LEAF_PROG, self.prog)
        return ns, extras

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def]
        """As argparse's, but an unknown flag names the subcommand's ``--help`` (argparse reports it from the
        root parser, whose help does not list the subcommand's flags)."""
        ns, extras = self.parse_known_args(args, namespace)
        prog = vars(ns).pop(_LEAF_PROG, None)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}", prog)
        return ns


def _device(name: str) -> str:
    from .devices import resolve_device

    return str(resolve_device(name))


# ---------------------------------------------------------------------------------------------- train
def cmd_train_ddpm(a: argparse.Namespace) -> int:
    from .commands.common import device, train_config
    from .train.ddpm import DDPMSpec, train_ddpm

    spec = DDPMSpec(
        data=a.data,
        class_conditional=a.class_conditional,
        image_size=a.size,
        channels=a.channels,
        prediction=a.prediction,
        beta_schedule=a.beta_schedule,
        min_snr_gamma=a.min_snr_gamma,
    )
    cfg = train_config(a, sample_every=a.sample_every)
    _, model = train_ddpm(
        spec,
        cfg,
        a.out,
        device=device(a),
        resume=a.resume,
        overwrite=a.overwrite,
        samples=not a.no_samples,
        force_resume=a.force_resume,
    )
    from .distributed import current_world

    if current_world().is_main:
        print(f"model written to {Path(a.out) / 'model'}")
    return 0


# --------------------------------------------------------------------------------------------- sample
def _check_cfg(cfg: float) -> None:
    """The guidance bound `generate` keeps (GenerationRequest's), for the pixel DDPM's commands."""
    from .pipeline.request import MAX_CFG_SCALE

    if not (math.isfinite(cfg) and 0 <= cfg <= MAX_CFG_SCALE):
        raise UsageError(f"--cfg must be a number in [0, {MAX_CFG_SCALE:g}], got {cfg}")


# The largest side each grid format can hold (WebP's format stores 14 bits; JPEG's 16).
_MAX_SIDE = {".webp": 16383, ".jpg": 65500, ".jpeg": 65500}


def _check_grid_size(n: int, cols: int, image_size: int, out: Path, seed: int) -> None:
    """``sample``'s grid (``n`` tiles of ``image_size`` at scale 2, 2 px apart) must be an image the usual readers
    open: at most Pillow's ``MAX_IMAGE_PIXELS`` (about 89 megapixels; past it Pillow, and so ``pnginfo``, warns of
    a decompression bomb, past twice it refuses), and no side past the format's limit. Checked before sampling,
    so a huge ``--n`` is one line at once, not hours of sampling and then a failed write."""
    from PIL import Image

    if n < 1:
        raise UsageError(f"--n must be a positive number of samples, got {n}")
    tile = 2 * image_size + 2
    ncols = cols or max(1, int(round(n**0.5)))
    width, height = ncols * tile + 2, -(-n // ncols) * tile + 2
    limit = int(Image.MAX_IMAGE_PIXELS or 0) or 2**31 - 1
    side = _MAX_SIDE.get(out.suffix.lower(), 2**31 - 1)
    if width * height > limit or max(width, height) > side:
        k = (min(math.isqrt(limit), side) - 2) // tile  # the side, in samples, of the largest square grid
        raise UsageError(
            f"--n {n}{f' --cols {cols}' if cols else ''} makes a {width}x{height} grid of {image_size}x{image_size} "
            f"samples, past what image readers open ({limit / 1e6:.0f} megapixels"
            f"{f', sides up to {side}' if side < 2**31 - 1 else ''}): at most {k * k} samples ({k}x{k}) in one "
            f"grid; for the next ones run again with --seed {seed + k * k} (sample i has seed --seed + i)"
        )


def cmd_sample(a: argparse.Namespace) -> int:
    from .ddpm import PixelDDPM
    from .io.images import make_grid, save_image_atomic
    from .pipeline.finite import require_finite

    # the checks `generate` makes, before the model loads (each was once a traceback or a black PNG)
    cfg = 1.0 if a.cfg is None else a.cfg
    _check_cfg(cfg)
    if a.eta is not None and not (math.isfinite(a.eta) and a.eta >= 0):
        # once a NaN grid blamed on --cfg (nan, inf) or, negative, noise of the wrong sign and exit 0
        raise UsageError(f"--eta must be a number >= 0 (0 = deterministic, 1 = DDPM-like), got {a.eta}")
    if a.cols and not 1 <= a.cols <= a.n:
        raise UsageError(f"--cols must be in [1, --n = {a.n}], got {a.cols}")
    out = Path(a.out)
    if out.is_dir() or out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise UsageError(f"--out {a.out}: give an image file name ending in .png, .jpg or .webp (the grid)")
    m = PixelDDPM.load(a.checkpoint, device=_device(a.device))
    if not m.num_classes:  # once ignored without a word (generate refuses what a model cannot use, too)
        given = [flag for flag, v in (("--label", a.label), ("--cfg", a.cfg)) if v is not None]
        if given:
            raise UsageError(
                f"{a.checkpoint} is an unconditional model (no classes): {' and '.join(given)} would change nothing"
            )
    _check_grid_size(
        a.n, a.cols, m.image_size - 2 * m.crop, out, a.seed
    )  # the samples are cropped (28 of 32)  # before sampling: --n 100000 once ran for hours
    t = time.perf_counter()
    if m.num_classes:
        if a.label is not None:
            labels = [a.label] * a.n
        else:
            labels = [i % m.num_classes for i in range(a.n)]
            labels.sort()
        imgs = m.generate(
            labels, sampler=a.sampler, steps=a.steps, seed=a.seed, guidance_scale=cfg, eta=a.eta, schedule=a.schedule
        )
    else:
        imgs = m.generate(None, n=a.n, sampler=a.sampler, steps=a.steps, seed=a.seed, eta=a.eta, schedule=a.schedule)
    require_finite(imgs, "sampled image")  # NonFiniteError, one line, no PNG (never a black grid)
    ncols = a.cols or max(1, int(round(a.n**0.5)))
    save_image_atomic(make_grid(imgs, ncols, scale=2), a.out)
    print(f"{a.n} samples ({a.sampler}, {a.steps} steps) in {time.perf_counter() - t:.1f} s -> {a.out}")
    return 0


# ----------------------------------------------------------------------------------------------- eval
def cmd_eval_ddpm(a: argparse.Namespace) -> int:
    from .evaluation import evaluate_ddpm

    _check_cfg(a.cfg)  # as `sample` (once NaN features, a traceback)

    res = evaluate_ddpm(
        a.checkpoint,
        n=a.n,
        sampler=a.sampler,
        steps=a.steps,
        seed=a.seed,
        guidance_scale=a.cfg,
        device=_device(a.device),
        schedule=a.schedule,
    )
    print(
        f"{a.checkpoint}: {res['sampler']} {res['steps']} steps, n={res['n']}: "
        f"FD-FMNIST {res['fd']:.3f}  class accuracy {100 * res['accuracy']:.1f}%  ({res['seconds']:.1f} s)"
    )
    return 0


# ----------------------------------------------------------------------------------------------- demo
def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(
        a.out, device=a.device, steps=a.steps, sampler=a.sampler, cfg=a.cfg, seed=a.seed, progress=not a.no_progress
    )
    return 0


# ----------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from .commands.common import add_force_resume, add_train_args

    p = OneLineParser(prog="sdengine", description="Diffusion image generation from scratch.")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: free CPUs, see sdengine.threads)")
    p.add_argument(
        "--fast-path",
        dest="global_fast_path",
        default=None,
        help="speed-ups for every model this command loads: 'default', 'none' or names from "
        f"{','.join(FAST_PATH_OPTIONS)} (docs/performance.md; default: $SDENGINE_FAST_PATH, else 'default')",
    )
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="emoji text-to-image, img2img, ControlNet and LoRA pictures (built-in model)")
    d.add_argument("--out", default="outputs", help="output folder (default outputs)")
    d.add_argument("--sampler", default="dpmpp_2m")
    d.add_argument("--steps", type=int, default=20)
    d.add_argument(
        "--cfg", type=float, default=None, help="guidance scale (default 5 for emoji, 2 for the Fashion-MNIST fallback)"
    )
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="auto")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a model")
    tsub = t.add_subparsers(dest="what", required=True)
    td = tsub.add_parser("ddpm", help="a pixel-space DDPM (Fashion-MNIST or a folder of images)")
    td.add_argument("--data", default="fashion-mnist", help="fashion-mnist, or a folder of images")
    td.add_argument("--class-conditional", action="store_true")
    add_train_args(
        td, out="runs/ddpm", steps=20_000, batch_size=128, lr=2e-4, warmup=500, ema_decay=0.999, checkpoint_every=1000
    )
    td.add_argument("--prediction", choices=["epsilon", "v_prediction", "sample"], default="epsilon")
    td.add_argument("--beta-schedule", choices=["linear", "scaled_linear", "squaredcos_cap_v2"], default="linear")
    td.add_argument("--min-snr-gamma", type=float, default=None)
    td.add_argument("--size", type=int, default=32)
    td.add_argument("--channels", type=int, choices=[1, 3], default=1)
    td.add_argument("--sample-every", type=int, default=2000)
    td.add_argument("--no-samples", action="store_true", help="write no sample grids (the loss plot only)")
    add_force_resume(td, "--size, --prediction, --beta-schedule or --data")
    td.set_defaults(func=cmd_train_ddpm)

    s = sub.add_parser("sample", help="sample a grid from a pixel DDPM (checkpoint, model folder or built-in)")
    s.add_argument("checkpoint")
    s.add_argument("--sampler", default="ddim")
    s.add_argument("--schedule", default="normal")
    s.add_argument("--steps", type=int, default=50)
    s.add_argument("--n", type=int, default=64)
    s.add_argument("--cols", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="class index for every sample")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance over classes (default 1: none)")
    s.add_argument("--eta", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="outputs/grid.png")
    s.add_argument("--device", default="auto")
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("eval", help="measure a model")
    esub = e.add_subparsers(dest="what", required=True)
    ed = esub.add_parser("ddpm", help="FD-FMNIST and class accuracy of a Fashion-MNIST DDPM")
    ed.add_argument("checkpoint")
    ed.add_argument("--n", type=int, default=1000)
    ed.add_argument("--sampler", default="ddim")
    ed.add_argument("--schedule", default="normal")
    ed.add_argument("--steps", type=int, default=50)
    ed.add_argument("--cfg", type=float, default=1.0)
    ed.add_argument("--seed", type=int, default=0)
    ed.add_argument("--device", default="auto")
    ed.set_defaults(func=cmd_eval_ddpm)

    _register_command_modules(sub, tsub, esub)
    return p


def _register_command_modules(
    sub: argparse._SubParsersAction, train: argparse._SubParsersAction, evaluate: argparse._SubParsersAction
) -> None:
    """Each module's ``register(sub, train)``, and ``register_eval(evaluate)`` where it has one."""
    import importlib

    from .commands import COMMAND_MODULES

    for name in COMMAND_MODULES:
        mod = importlib.import_module(f".commands.{name}", __package__)
        if hasattr(mod, "register"):
            mod.register(sub, train)
        if hasattr(mod, "register_eval"):
            mod.register_eval(evaluate)


class Terminated(Exception):
    """Raised in the main thread when the process gets SIGTERM (``timeout``, a scheduler, ``kill``): the command
    unwinds like an error, so its cleanup runs (a training run's ``--out`` lock is released, temporary files are
    removed); ``main`` then returns 143, as a process ended by SIGTERM."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated("terminated")


def stop_on_sigterm() -> None:
    """Turn SIGTERM into :class:`Terminated` in the main thread (Python's default ends the process at once,
    skipping every ``finally``). ``sdengine serve`` keeps uvicorn's own handling."""
    signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> int:
    from .threads import prepare_environment

    args = build_parser().parse_args(argv)  # imports no torch (tested)
    # before torch is imported: OpenMP reads its wait policy once; a server's load changes while it runs
    prepare_environment(long_running=args.command == "serve")
    debug = os.environ.get("SDENGINE_DEBUG") == "1"
    # The library both logs a large LoRA weight (the CLI's "sdengine: WARNING" line) and raises a
    # LoRAWeightWarning for Python callers; on the command line the log line is the one to show.
    warnings.filterwarnings("ignore", message=r".*weight .* is outside \[-4, 4\]; images may break down")
    previous = None
    if args.command != "serve" and threading.current_thread() is threading.main_thread():
        previous = signal.getsignal(signal.SIGTERM)
        stop_on_sigterm()
    try:
        return _run(args, debug)
    finally:
        if previous is not None:  # main() called from Python (tests, scripts): their handler comes back
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, debug: bool) -> int:
    from .threads import configure_threads

    try:
        # Listing files and reading a PNG's text need no torch (about a second to import): the thread setting is
        # only checked for them; every other command gives torch its threads.
        files_only = args.command == "pnginfo" or (
            args.command == "list" and getattr(args, "what", None) in ("models", "loras", "controlnets", "embeddings")
        )
        if files_only:
            from .threads import choose_threads

            choose_threads(getattr(args, "threads", None))
        else:
            configure_threads(getattr(args, "threads", None))
        if getattr(args, "global_fast_path", None) is not None:
            from .fastpath import ENV, parse_options

            spec = args.global_fast_path.strip()
            if spec.lower() not in ("default", "none"):
                parse_options(spec)  # a bad name fails here, before any model is loaded
            os.environ[ENV] = spec
        rc = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught (below), not at the interpreter's exit
        return rc
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated", file=sys.stderr)
        return 143
    except BrokenPipeError:  # the reader went away (`sdengine list samplers | head -1`): not a mistake, no line
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # so that the interpreter's own flush at exit stays quiet too
        return 141  # as a process ended by SIGPIPE
    except (SdengineError, OSError) as e:  # a user mistake, a bad file, a refused run; anything else is a bug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"sdengine: error: {msg}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (MemoryError, RuntimeError) as e:
        # Out of memory (MemoryError on the CPU, torch.OutOfMemoryError, a RuntimeError, on a GPU) is a
        # limit of this machine, not a bug: one line. Any other RuntimeError keeps its traceback.
        if debug or not (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"):
            raise
        print("sdengine: error: out of memory: use a smaller size or batch (or --device cpu)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
