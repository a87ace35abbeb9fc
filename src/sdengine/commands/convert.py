"""``sdengine convert SRC DST``: a diffusers folder <-> one LDM ``.safetensors`` file; SD3 / Flux folders <->
Stability's, BFL's and ComfyUI's files (:mod:`sdengine.pipeline.dit_convert`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..catalog import builtin_entries
from ..errors import SdengineError, UsageError

# What a conversion to a diffusers folder writes; the folder is replaced as a whole (sdengine.weights.convert).
WRITTEN_ENTRIES = frozenset(
    {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
    | {"transformer", "text_encoder_3", "tokenizer_3"}  # an SD3 / Flux folder (sdengine.pipeline.dit_convert)
)
DIT_FLAGS = ("clip_l", "clip_g", "t5", "no_t5", "transformer_only")


def check_folder_target(dst: str) -> None:
    """A DST that is an existing model folder is replaced whole: refuse one that also holds what a conversion
    does not write (a README, sample images, a safety_checker/ from the Hub), which would be lost with it."""
    path = Path(dst)
    if path.suffix.lower() == ".safetensors" or not path.is_dir() or not (path / "model_index.json").is_file():
        return  # a single file, a new folder, or one weights.convert itself refuses (not a model folder)
    extra = sorted(p.name for p in path.iterdir() if p.name not in WRITTEN_ENTRIES)
    if extra:
        shown = ", ".join(extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise UsageError(
            f"{dst}: converting replaces this model folder as a whole, and it also holds {shown}, which the "
            "conversion does not write: give a new folder, or move them out first"
        )


def _dit_flags(a: argparse.Namespace) -> list[str]:
    return [f"--{k.replace('_', '-')}" for k in DIT_FLAGS if getattr(a, k, None) not in (None, False)]


def convert_dit(a: argparse.Namespace, src: Path) -> Path | None:
    """SD3 / SD3.5 and FLUX.1 models go through :func:`sdengine.pipeline.dit_convert.convert_dit`; None for any
    other model (the SD path). The SD flags are refused for them, their flags for SD models, in one line."""
    from ..pipeline.dit_convert import convert_dit as run_dit
    from ..pipeline.dit_convert import family_of

    family = family_of(src)
    if family is None:
        flags = _dit_flags(a)
        if flags and src.exists():
            raise UsageError(f"{' '.join(flags)}: for SD3 / SD3.5 and FLUX.1 models only; {src} is not one")
        return None
    sd_only = [f for f, v in (("--prediction-type", a.prediction_type), ("--config", a.config)) if v is not None]
    if sd_only:
        name = "SD3" if family == "sd3" else "FLUX.1"
        raise UsageError(f"{' '.join(sd_only)}: for SD 1.x / 2.x and SDXL models; {src} is a {name} model")
    return run_dit(
        src,
        a.dst,
        dtype=a.dtype,
        vae=a.vae,
        clip_l=a.clip_l,
        clip_g=a.clip_g,
        t5=a.t5,
        with_t5=not a.no_t5,
        transformer_only=a.transformer_only,
    )


def run(a: argparse.Namespace) -> int:
    from ..weights import convert

    src = a.src
    builtin = None
    if not Path(src).exists():  # a built-in name: say why it cannot be converted rather than "no such file"
        builtin = next((e for e in builtin_entries() if e.kind == "models" and e.name == src), None)
    if builtin is not None:
        if builtin.detail.startswith("pixel DDPM"):
            raise UsageError(
                f"built-in model {src!r} is a pixel DDPM ({builtin.detail}), not a Stable Diffusion model: "
                "there is no LDM file or diffusers pipeline to convert it to"
            )
        src = builtin.path
    # A convert killed mid-write (kill -9, power cut) left a temporary file or folder beside DST; the
    # previous DST is intact (atomic rename). Remove such leftovers of dead processes now, and again if
    # this run fails (its own temporary is removed by the atomic writer).
    from ..io.atomic import remove_stale_temp_files

    check_folder_target(a.dst)  # before the (slow) load, nothing lost

    out_folder = Path(a.dst).parent
    remove_stale_temp_files(out_folder)
    t = time.perf_counter()
    try:
        dst = convert_dit(a, Path(src))
        if dst is None:
            dst = convert(src, a.dst, dtype=a.dtype, vae=a.vae, prediction_type=a.prediction_type, config=a.config)
    except BaseException as e:
        remove_stale_temp_files(out_folder)
        if not isinstance(e, SdengineError):
            raise
        if builtin is None:
            raise
        reason = str(e).removeprefix(f"{builtin.path}: ")
        raise UsageError(f"built-in model {a.src!r} ({builtin.detail}) cannot be converted: {reason}") from None
    print(f"converted {a.src} -> {dst} in {time.perf_counter() - t:.1f} s")
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint: diffusers folder <-> single .safetensors (SD 1.x/2.x, SDXL, SD3, Flux)",
        description="A DST ending in .safetensors gets one file (LDM / sgm layout; SD3: Stability's; Flux: "
        "ComfyUI's all-in-one checkpoint); any other DST a diffusers folder.",
    )
    p.add_argument("src", help="a diffusers folder, or a .safetensors/.ckpt single file")
    p.add_argument(
        "dst",
        help="the output file or folder (missing parent folders are made; an existing model folder is replaced "
        "whole, so one that also holds other files is refused)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights")
    p.add_argument("--vae", default=None, help="a VAE to use instead of SRC's (or when SRC has none)")
    p.add_argument("--clip-l", default=None, help="SD3 / Flux: the CLIP-L text encoder (file or folder)")
    p.add_argument("--clip-g", default=None, help="SD3: the OpenCLIP bigG text encoder (file or folder)")
    p.add_argument("--t5", default=None, help="SD3 / Flux: the T5-XXL text encoder (file or folder)")
    p.add_argument("--no-t5", action="store_true", help="SD3: write the model without its T5 encoder")
    p.add_argument(
        "--transformer-only",
        action="store_true",
        help="SD3 / Flux to a .safetensors: the diffusion model alone (BFL's flux1-*.safetensors layout; "
        "ComfyUI's SD3 diffusion-model file)",
    )
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None)
    p.add_argument(
        "--config", default=None, help="SRC's config: an LDM .yaml or a diffusers folder (default: SRC.yaml beside it)"
    )
    p.set_defaults(func=run)
