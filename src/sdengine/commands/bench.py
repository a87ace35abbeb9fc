"""``sdengine bench``: generation time and peak memory, against diffusers on the same weights (see sdengine.bench)."""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .common import check_json_target

# The generation each engine times (not --decoders, which times no generation)
GENERATION_DEFAULTS: dict[str, Any] = {"steps": 25, "sampler": "dpmpp_2m", "cfg": 7.5}


def run(a: argparse.Namespace) -> int:
    from ..bench import BenchError, GenSpec, check_peer_loads, folder_default_size, make_random_folder, run_bench
    from ..catalog import builtin_path
    from ..fastpath import parse_options

    if (a.model is None) == (a.random is None):
        raise BenchError("give exactly one of --model FOLDER or --random {tiny,medium,sd15}")
    decoders = _decoders_mode(a)  # checked before any model is written
    if a.workdir is not None and a.model is not None and not decoders:
        raise BenchError(
            "--workdir keeps --random's model folder (and --decoders' tiny VAE): with --model it is unused"
        )
    scaling = _scaling_points(a)
    if a.dtype != "fp32":
        import torch

        from ..devices import resolve_dtype

        resolve_dtype(a.dtype, torch.device("cpu"))  # an unknown name: one line
        for flag, bad in (
            ("--device cuda", str(a.device).startswith("cuda")),
            ("--scaling", scaling is not None),
            ("--options", a.options is not None),
        ):
            if bad:
                raise BenchError(f"--dtype is for the CPU comparison; {flag} measures in its own precision")
    if a.phases is not None:
        from ..bench_gpu import parse_phases

        if not str(a.device).startswith("cuda"):
            raise BenchError("--phases applies to --device cuda only")
        parse_phases(a.phases)
    if not str(a.device).startswith("cuda"):  # the GPU comparison's flags, never ignored silently
        for flag, given in (("--out", a.out is not None), ("--budget-s", a.budget_s is not None)):
            if given:
                raise BenchError(f"{flag} applies to --device cuda only")
        if a.no_compile:
            raise BenchError("--no-compile applies to --device cuda only")
    if not 0 <= a.seed <= 2**64 - 1:  # -1 would draw a random seed for sdengine and seed diffusers with -1
        raise BenchError(f"--seed must be in [0, 2**64 - 1] (both engines draw from it), got {a.seed}")
    check_json_target(a.json)  # before the (long) run, not after it
    # bench's own --fast-path, else the global one (sdengine --fast-path / $SDENGINE_FAST_PATH), as every command
    chosen = a.fast_path or os.environ.get("SDENGINE_FAST_PATH", "")
    options = parse_options(chosen) if chosen.strip().lower() not in ("", "default", "none") else ()
    measure = parse_options(a.options) if a.options else ()
    with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as tmp:
        if a.model is not None:
            folder, name = Path(a.model), Path(a.model).name
            if not folder.exists() and (shipped := builtin_path("models", a.model)) is not None:
                folder = shipped  # a built-in name (`--model emoji`), as generate takes it
            if not (folder / "model_index.json").is_file():
                raise BenchError(f"{folder}: not a diffusers folder (no model_index.json)")
            if a.compare != "none" and not decoders:  # --decoders compares the VAEs alone
                check_peer_loads(folder)
        else:
            # On a GPU the weights are stored in fp16, as SD checkpoints ship (the load is part of the start-up time)
            half = str(a.device).startswith("cuda")
            leaf = f"random-{a.random}" + ("-fp16" if half else "")
            where = Path(a.workdir) / leaf if a.workdir else Path(tmp) / leaf
            folder = make_random_folder(where, a.random, dtype="fp16" if half else None)
            name = f"random {a.random} (SD1 architecture)"
        if decoders:
            return _run_decoders(a, folder, name, Path(a.workdir) if a.workdir else Path(tmp))
        if scaling is not None:
            return _run_scaling(a, folder, name, *scaling)
        if str(a.device).startswith("cuda"):
            return _run_gpu(a, folder, name)
        size = a.size
        if size is None:
            from ..bench import preset_configs

            if a.random is None:
                size = folder_default_size(folder)
            else:
                unet, vae, _ = preset_configs(a.random)
                size = unet.sample_size * vae.downscale_factor
        spec = GenSpec(
            size=size,
            steps=a.steps,
            batch=a.batch,
            sampler=a.sampler,
            cfg=a.cfg,
            seed=a.seed,
            device=a.device,
            dtype=a.dtype,
        )
        report = run_bench(
            folder,
            spec,
            model=name,
            compare=None if a.compare == "none" else a.compare,
            repeats=a.repeats,
            options=options,
            measure_options_of=measure,
            memory=not a.no_memory,
            load_test=a.under_load,
            threads=getattr(a, "threads", None),
        )
    print(report.table())
    print(f"sdengine fast path: {','.join(options) or 'none'}")
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({**report.to_json(), "fast_path": list(options)}, indent=2) + "\n")
        print(f"written {out}")
    return 0


def _run_gpu(a: argparse.Namespace, folder: Path, name: str) -> int:
    """``--device cuda``: the GPU comparison of sdengine.bench_gpu, JSON written to ``--out``."""
    from ..bench import BenchError
    from ..bench_gpu import FILE_NAME, run_gpu_bench, table

    for flag, value in (("--options", a.options), ("--fast-path", a.fast_path), ("--under-load", a.under_load or None)):
        if value is not None:
            raise BenchError(f"{flag} does not apply to --device cuda (it times a fixed set of engines)")
    # what the CPU comparison reads and the GPU one does not (they were once taken without a word)
    for flag, given, why in (
        (f"--batch {a.batch}", a.batch != 1, "it times batch 1, and batch 8 for the images per second"),
        ("--no-memory", a.no_memory, "it reads the peak GPU memory from torch: no peak-RSS child process runs"),
        ("--json", a.json is not None, "its JSON is bench_gpu.json in --out"),
    ):
        if given:
            raise BenchError(f"{flag} does not apply to --device cuda ({why})")
    if a.budget_s is not None and not a.budget_s > 0:
        raise BenchError(f"--budget-s must be positive, got {a.budget_s}")
    data = run_gpu_bench(
        folder,
        model=name,
        out_dir=Path(a.out or "bench-gpu"),
        size=a.size or 512,
        steps=a.steps,
        sampler=a.sampler,
        cfg_scale=a.cfg,
        seed=a.seed,
        repeats=a.repeats,
        device=a.device,
        compare=a.compare != "none",
        compile=not a.no_compile,
        aot=not a.no_compile,
        budget_s=a.budget_s or 480.0,
        only=a.phases,
    )
    print(table(data))
    print(f"written {Path(a.out or 'bench-gpu') / FILE_NAME}")
    return 0


def _decoders_mode(a: argparse.Namespace) -> bool:
    """Whether ``--decoders`` was given; the flags of the other modes are refused with it (one line each)."""
    from ..bench import BenchError

    if not getattr(a, "decoders", False):
        if getattr(a, "tiny_vae", None) is not None:
            raise BenchError("--tiny-vae is an option of --decoders")
        if getattr(a, "encoders", False):
            raise BenchError("--encoders is an option of --decoders")
        return False
    for flag, bad in (
        ("--scaling", a.scaling),
        (f"--device {a.device}", not str(a.device).startswith("cpu")),
        (f"--dtype {a.dtype}", a.dtype != "fp32"),
        ("--options", a.options is not None),
        ("--fast-path", a.fast_path is not None),
        ("--under-load", a.under_load),
        ("--phases", a.phases is not None),
        # a generation's settings: no generation runs (they were once ignored without a word)
        (f"--steps {a.steps}", a.steps != GENERATION_DEFAULTS["steps"]),
        (f"--sampler {a.sampler}", a.sampler != GENERATION_DEFAULTS["sampler"]),
        (f"--cfg {a.cfg:g}", a.cfg != GENERATION_DEFAULTS["cfg"]),
        ("--no-memory", a.no_memory),  # no peak-RSS child processes run for the decoders
    ):
        if bad:
            raise BenchError(f"{flag} does not apply to --decoders (it times the VAE decoders on the CPU in fp32)")
    return True


def _run_decoders(a: argparse.Namespace, folder: Path, name: str, workdir: Path) -> int:
    from ..bench_decode import run_decoders, write_json

    report = run_decoders(
        folder,
        model=name,
        workdir=workdir,
        size=a.size,
        batch=a.batch,
        repeats=a.repeats,
        seed=a.seed,
        tiny_vae=a.tiny_vae,
        compare=None if a.compare == "none" else a.compare,
        random_model=a.random is not None,
        encoders=a.encoders,
    )
    print(report.table())
    if a.json:
        print(f"written {write_json(report, a.json)}")
    return 0


def _scaling_points(a: argparse.Namespace) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """(sizes, batches) of ``--scaling``, or None without it; flags of the other modes are refused with it."""
    from ..bench import BenchError
    from ..bench_scaling import DEFAULT_BATCHES, DEFAULT_SIZES, parse_batches, parse_sizes

    if not getattr(a, "scaling", False):
        for flag, value in (("--sizes", a.sizes), ("--batches", a.batches), ("--max-seconds", a.max_seconds)):
            if value is not None:
                raise BenchError(f"{flag} is an option of --scaling")
        if a.max_memory is not None:
            raise BenchError("--max-memory is an option of --scaling")
        return None
    for flag, value in (("--size", a.size), ("--options", a.options), ("--under-load", a.under_load or None)):
        if value is not None:
            raise BenchError(f"{flag} does not apply to --scaling (it times parts at --sizes and --batches)")
    if a.batch != 1:
        raise BenchError("--batch does not apply to --scaling: use --batches")
    if a.cfg != GENERATION_DEFAULTS["cfg"]:  # once taken without a word
        raise BenchError(
            f"--cfg {a.cfg:g} does not apply to --scaling (it times one U-Net call on the CFG batch, which takes "
            "as long whatever the scale)"
        )
    if a.max_seconds is not None and not a.max_seconds > 0:
        raise BenchError(f"--max-seconds must be positive, got {a.max_seconds}")
    if a.max_memory is not None and not a.max_memory > 0:
        raise BenchError(f"--max-memory must be positive (GiB), got {a.max_memory}")
    from ..diffusion.sampling import resolve

    resolve(a.sampler, "normal")  # an unknown sampler is refused before any model is written
    sizes = parse_sizes(a.sizes) if a.sizes is not None else DEFAULT_SIZES
    batches = parse_batches(a.batches) if a.batches is not None else DEFAULT_BATCHES
    return sizes, batches


def _run_scaling(
    a: argparse.Namespace, folder: Path, name: str, sizes: tuple[int, ...], batches: tuple[int, ...]
) -> int:
    from ..bench_scaling import GIB, run_scaling, write_json
    from ..fastpath import parse_options

    report = run_scaling(
        folder,
        model=name,
        sizes=sizes,
        batches=batches,
        steps=a.steps,
        sampler=a.sampler,
        repeats=a.repeats,
        compare=None if a.compare == "none" else a.compare,
        device=a.device,
        options=parse_options(a.fast_path) if a.fast_path else (),
        memory=not a.no_memory,
        max_seconds=a.max_seconds,
        memory_budget=None if a.max_memory is None else int(a.max_memory * GIB),
        seed=a.seed,
    )
    print(report.table())
    if a.json:
        print(f"written {write_json(report, a.json)}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "bench",
        help="time a generation (and its peak memory) against diffusers on the same weights",
        description="Times whole generations (text, sampling, VAE decode), warm-up apart, repeats interleaved "
        "between the engines, and checks that their images agree. See docs/performance.md.",
    )
    p.add_argument("--model", default=None, help="a diffusers folder, or a built-in model name (emoji)")
    p.add_argument(
        "--random",
        choices=["tiny", "medium", "sd15"],
        default=None,
        help="random weights of this architecture (sd15: Stable Diffusion 1.5's real sizes)",
    )
    p.add_argument("--workdir", default=None, help="keep (and reuse) the random model's folder under here")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    p.add_argument("--steps", type=int, default=GENERATION_DEFAULTS["steps"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sampler", default=GENERATION_DEFAULTS["sampler"])
    p.add_argument("--cfg", type=float, default=GENERATION_DEFAULTS["cfg"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for both engines (peak RSS is host memory)")
    p.add_argument(
        "--dtype",
        default="fp32",
        help="sdengine's dtype on the CPU (fp32, bf16, fp16); diffusers runs fp32 eager either way",
    )
    p.add_argument("--compare", choices=["diffusers", "none"], default="diffusers")
    p.add_argument("--repeats", type=int, default=3, help="timed calls per engine after the warm-up")
    # default=SUPPRESS: `sdengine --threads N bench` (the global option) is not overwritten by this one
    p.add_argument("--threads", type=int, default=argparse.SUPPRESS, help="CPU threads (as the global option)")
    p.add_argument(
        "--fast-path",
        default=None,
        help="sdengine options for the comparison, comma-separated "
        "(channels_last, compile); default: sdengine.fastpath.DEFAULT_OPTIONS",
    )
    p.add_argument("--options", default=None, help="fast-path options to time one by one against fp32 eager")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-RSS child processes")
    p.add_argument("--under-load", action="store_true", help="also time it idle and beside one busy process")
    p.add_argument(
        "--scaling",
        action="store_true",
        help="time one U-Net CFG step, one VAE decode and the text encoder at each --sizes x --batches point, "
        "compose the generation time for --steps, and measure each point's peak RSS",
    )
    p.add_argument(
        "--decoders",
        action="store_true",
        help="time the latents-to-pixels decode alone: the VAE and the tiny VAE (TAESD), each against diffusers",
    )
    p.add_argument(
        "--encoders",
        action="store_true",
        help="--decoders: time the encoders too (images to latents: the VAE's and the tiny VAE's, each against "
        "diffusers)",
    )
    p.add_argument(
        "--tiny-vae",
        default=None,
        metavar="FILE",
        help="--decoders: the tiny VAE (a TAESD file or AutoencoderTiny folder; default: random TAESD weights)",
    )
    p.add_argument("--sizes", default=None, help="--scaling: image sides, comma-separated (default 256,512)")
    p.add_argument("--batches", default=None, help="--scaling: batch sizes, comma-separated (default 1)")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="--scaling: once a point's step takes longer, skip the points at least as large in size and batch",
    )
    p.add_argument(
        "--max-memory",
        type=float,
        default=None,
        help="--scaling: GiB a point may need (default: 90%% of the memory available before each point)",
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument(
        "--out", default=None, help="--device cuda: the folder bench_gpu.json is written to (default bench-gpu)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="--device cuda: seconds the whole run may take (default 480); phases that would not fit are skipped",
    )
    p.add_argument(
        "--phases",
        default=None,
        help="--device cuda: only these phases, comma-separated (bench_gpu.PHASES; info always runs)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="--device cuda: leave out the compiled engines (torch.compile and ahead of time)",
    )
    p.set_defaults(func=run)
