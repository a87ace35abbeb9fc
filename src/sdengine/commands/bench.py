"""``sdengine bench``: generation time and peak memory, against diffusers on the same weights (see sdengine.bench)."""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def run(a: argparse.Namespace) -> int:
    from ..bench import BenchError, GenSpec, make_random_folder, run_bench
    from ..fastpath import parse_options

    if (a.model is None) == (a.random is None):
        raise BenchError("give exactly one of --model FOLDER or --random {tiny,medium,sd15}")
    options = parse_options(a.fast_path) if a.fast_path else ()
    measure = parse_options(a.options) if a.options else ()
    with tempfile.TemporaryDirectory(prefix="sdengine-bench-") as tmp:
        if a.model is not None:
            folder, name = Path(a.model), Path(a.model).name
            if not (folder / "model_index.json").is_file():
                raise BenchError(f"{folder}: not a diffusers folder (no model_index.json)")
        else:
            where = Path(a.workdir) / f"random-{a.random}" if a.workdir else Path(tmp) / f"random-{a.random}"
            folder, name = make_random_folder(where, a.random), f"random {a.random} (SD1 architecture)"
        size = a.size
        if size is None:
            from ..bench import preset_configs

            if a.random is None:
                raise BenchError("--size is needed with --model")
            unet, vae, _ = preset_configs(a.random)
            size = unet.sample_size * vae.downscale_factor
        spec = GenSpec(
            size=size, steps=a.steps, batch=a.batch, sampler=a.sampler, cfg=a.cfg, seed=a.seed, device=a.device
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
    if a.json:
        out = Path(a.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        print(f"written {out}")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "bench",
        help="time a generation (and its peak memory) against diffusers on the same weights",
        description="Times whole generations (text, sampling, VAE decode), warm-up apart, repeats interleaved "
        "between the engines, and checks that their images agree. See docs/performance.md.",
    )
    p.add_argument("--model", default=None, help="a diffusers folder")
    p.add_argument(
        "--random",
        choices=["tiny", "medium", "sd15"],
        default=None,
        help="random weights of this architecture (sd15: Stable Diffusion 1.5's real sizes)",
    )
    p.add_argument("--workdir", default=None, help="keep (and reuse) the random model's folder under here")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's own)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--cfg", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="torch device for both engines (peak RSS is host memory)")
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
    p.add_argument("--json", default=None, help="write the results here")
    p.set_defaults(func=run)
