"""``sdengine convert SRC DST``: a diffusers folder <-> one LDM ``.safetensors`` file."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..catalog import builtin_entries
from ..errors import SdengineError, UsageError

# What a conversion to a diffusers folder writes; the folder is replaced as a whole (sdengine.weights.convert).
WRITTEN_ENTRIES = frozenset(
    {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"}
)


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


def refuse_dit(src: Path) -> None:
    """SD3 / SD3.5 and FLUX.1 models are not converted yet: say so (not "missing the unet/ subfolder")."""
    from ..pipeline.flux_loading import is_flux_file, is_flux_folder
    from ..weights.sd3_files import is_sd3

    if not src.exists():
        return
    family = (
        "SD3" if is_sd3(src) else "FLUX.1" if (is_flux_folder(src) if src.is_dir() else is_flux_file(src)) else None
    )
    if family is not None:
        raise UsageError(
            f"{src}: a {family} model; sdengine convert handles SD 1.x / 2.x and SDXL only (SD3 and Flux folders and "
            "single files load as they are: sdengine generate --model, docs/sd3.md, docs/flux.md)"
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
    refuse_dit(Path(src))

    out_folder = Path(a.dst).parent
    remove_stale_temp_files(out_folder)
    t = time.perf_counter()
    try:
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
        help="convert a checkpoint: diffusers folder <-> single LDM .safetensors",
        description="A DST ending in .safetensors gets one LDM-layout file; any other DST a diffusers folder.",
    )
    p.add_argument("src", help="a diffusers folder, or a .safetensors/.ckpt single file")
    p.add_argument(
        "dst",
        help="the output file or folder (missing parent folders are made; an existing model folder is replaced "
        "whole, so one that also holds other files is refused)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="cast the weights")
    p.add_argument("--vae", default=None, help="a VAE to use instead of SRC's (or when SRC has none)")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction", "sample"], default=None)
    p.add_argument(
        "--config", default=None, help="SRC's config: an LDM .yaml or a diffusers folder (default: SRC.yaml beside it)"
    )
    p.set_defaults(func=run)
