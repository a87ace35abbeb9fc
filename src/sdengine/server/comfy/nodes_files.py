"""ComfyUI's file nodes: SaveLatent and LoadLatent (``.latent`` files), SaveAnimatedWEBP and SaveAnimatedPNG.

Each follows the ComfyUI node of the same name (its inputs, defaults, category, file naming and history output:
ComfyUI's ``nodes.py`` and ``comfy_extras/nodes_images.py``), written here from that description:

* SaveLatent writes ``OUTPUT/<prefix>_NNNNN_.latent`` (the default prefix ``latents/ComfyUI``), a safetensors
  file holding ``latent_tensor`` (B, C, h, w) and the empty marker ``latent_format_version_0``, with the prompt
  and each ``extra_pnginfo`` entry (JSON) as its metadata, as ComfyUI; its history output is
  ``{"latents": [{filename, subfolder, type}]}``. It also passes the latent on (ComfyUI's newer SaveLatent has
  that output; older workflows simply do not link it).
* LoadLatent reads a ``.latent`` file of the input folder (or, annotated, ``name.latent [output]``); a file
  without ``latent_format_version_0`` (ComfyUI's first format) is multiplied by 1 / 0.18215, ComfyUI's rule.
  A file from outside is hostile: only safetensors is read (never a pickle), its header is checked before any
  tensor is read (size, key, dtype, rank, channels, batch and sides within the server's limits), the values must
  be finite; each failure is one line naming the file, never the server's folders.
* SaveAnimatedWEBP / SaveAnimatedPNG write the whole image batch as one animation (``PREFIX_NNNNN_.webp`` /
  ``.png``, each frame ``int(1000 / fps)`` ms, as ComfyUI); the history output is ``{"images": [...],
  "animated": [true]}`` (``animated`` only when a file has more than one frame, as ComfyUI's current savers).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdengine.server.comfy.nodes import (
    Input,
    NodeDef,
    NodeError,
    RunContext,
    first_free_counter,
    save_folder,
    split_annotation,
    tensor_to_pil,
    write_numbered,
)

LATENT_SUFFIX = ".latent"
LATENT_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"  # ComfyUI's marker of latents stored unscaled
OLD_FORMAT_SCALE = 0.18215  # ComfyUI's first .latent files hold latents times SD's VAE scale: LoadLatent divides
FACTOR_KEY = "sdengine_vae_factor"  # metadata SaveLatent adds: the latent's pixels per latent pixel
DEFAULT_FACTOR = 8  # a file without it (ComfyUI's): SD's VAE factor
FACTORS = (1, 2, 4, 8, 16)
MAX_LATENT_BYTES = 64 * 1024 * 1024  # of a .latent file LoadLatent reads (8 x 4 x 256 x 256 float32 is 8 MiB)
MAX_LATENT_CHANNELS = 16
LATENT_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
WEBP_METHODS = {"default": 4, "fastest": 0, "slowest": 6}  # ComfyUI's names of PIL's WebP effort (0-6)
ANY_SUFFIX = r"\.[A-Za-z0-9]+"  # ComfyUI's counter follows a prefix's files of any type


# ------------------------------------------------------------------------------------------------ latents


def latent_files(env: Any) -> list[str]:
    """The ``.latent`` files of the input folder (subfolders as ``sub/name``), what LoadLatent offers."""
    root = Path(env.folders.input)
    if not root.is_dir():
        return []
    base = root.resolve()
    return [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob(f"*{LATENT_SUFFIX}"))
        if p.is_file() and p.resolve().is_relative_to(base)
    ]


def _latent_path(folders: Any, name: str) -> Path:
    """The file a LoadLatent value names (resolved inside its folder); UnsafePathError / FileNotFoundError."""
    from sdengine.io.paths import resolve_inside

    plain, kind = split_annotation(name)
    return resolve_inside(folders.root(kind), plain, "latent")


def annotated_latent_exists(env: Any, value: str) -> bool:
    """Whether an annotated LoadLatent value ("x.latent [output]") names a ``.latent`` file of its folder."""
    from sdengine.io.paths import UnsafePathError

    if split_annotation(value)[0] == value:
        return False
    try:
        path = _latent_path(env.folders, value)
    except (UnsafePathError, OSError):
        return False
    return path.is_file() and path.suffix == LATENT_SUFFIX


def latent_file_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The content hash of the file LoadLatent names (ComfyUI's IS_CHANGED): a file replaced under the same name
    is read again ("" when it cannot be read: the node then fails with its own message)."""
    from sdengine.io.paths import UnsafePathError

    try:
        path = _latent_path(ctx.folders, str(inputs.get("latent", "")))
        if path.stat().st_size > MAX_LATENT_BYTES:
            return ""
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except (UnsafePathError, OSError):
        return ""


def save_latent(ctx: RunContext, samples: dict[str, Any], filename_prefix: str) -> dict[str, Any]:
    from safetensors.torch import save as safetensors_bytes

    z = samples.get("samples")
    if z is None:
        raise NodeError(
            "SaveLatent: the latent is still empty (EmptyLatentImage's zeros take their channels from the model "
            "that samples them): sample or encode it first"
        )
    folder, sub, stem = save_folder(ctx, filename_prefix, "output", 0, 0, LATENT_SUFFIX)
    metadata = {"prompt": json.dumps(ctx.prompt) if ctx.prompt else ""}
    for k, v in ctx.extra_pnginfo.items():
        metadata[str(k)] = json.dumps(v)
    factor = int(samples["size"][1]) // max(1, int(z.shape[2]))
    if factor in FACTORS:
        metadata[FACTOR_KEY] = str(factor)
    data = safetensors_bytes(
        {LATENT_KEY: z.detach().cpu().contiguous(), VERSION_KEY: torch.tensor([])}, metadata=metadata
    )
    with ctx.save_lock:
        counter = first_free_counter(folder, stem, ANY_SUFFIX)
        name, _ = write_numbered(folder, stem, counter, LATENT_SUFFIX, lambda f: f.write(data))
    return {"ui": {"latents": [{"filename": name, "subfolder": sub, "type": "output"}]}, "result": (samples,)}


def check_latent_file(path: Path, name: str, max_batch: int, max_side: int) -> tuple[list[int], dict[str, str], bool]:
    """The checked header of a .latent file (``name``: what messages call it): the latent's shape, the metadata and
    whether it has the version marker; NodeError (one line) for a file LoadLatent would refuse. Nothing is read
    past the header."""
    from sdengine.weights.io import WeightsError, read_safetensors_header

    try:
        size = path.stat().st_size
        if size > MAX_LATENT_BYTES:
            raise NodeError(f"latent {name!r} is {size} bytes, over the {MAX_LATENT_BYTES} a .latent file may have")
        header, metadata, _ = read_safetensors_header(path)
    except WeightsError as e:
        reason = str(e).removeprefix(f"{path}: ").replace(str(path), repr(name))
        raise NodeError(f"latent {name!r} is not a safetensors file ({reason})") from None
    except OSError as e:  # unreadable (permissions, a folder): its reason, not the server's path
        raise NodeError(f"latent {name!r} cannot be read ({e.strerror or type(e).__name__})") from None
    entry = header.get(LATENT_KEY)
    if entry is None:
        keys = ", ".join(repr(k) for k in list(header)[:4]) or "nothing"
        raise NodeError(f"latent {name!r} has no {LATENT_KEY!r} tensor (it holds {keys}): not a ComfyUI .latent file")
    dtype, shape = entry["dtype"], [int(s) for s in entry["shape"]]
    if dtype not in LATENT_DTYPES:
        raise NodeError(f"latent {name!r}: {LATENT_KEY} is {dtype}, not a float tensor (F32, F16, BF16 or F64)")
    if len(shape) != 4:
        raise NodeError(f"latent {name!r}: {LATENT_KEY} has shape {shape}, not (batch, channels, height, width)")
    b, c, h, w = shape
    if not 1 <= c <= MAX_LATENT_CHANNELS:
        raise NodeError(f"latent {name!r} has {c} channels: a latent has 1 to {MAX_LATENT_CHANNELS}")
    if b < 1 or h < 1 or w < 1:
        raise NodeError(f"latent {name!r} is empty (shape {shape})")
    if b > max_batch:
        raise NodeError(f"latent {name!r} holds {b} latents, over the server's batch limit of {max_batch}")
    factor = _factor(metadata)
    if max(h, w) * factor > max_side:
        raise NodeError(
            f"latent {name!r} is {w}x{h} ({w * factor}x{h * factor} pixels), over the server's limit of "
            f"{max_side} pixels a side"
        )
    return shape, metadata, VERSION_KEY in header


def _factor(metadata: dict[str, str]) -> int:
    """The latent's VAE factor SaveLatent recorded, else ComfyUI's SD factor 8."""
    raw = metadata.get(FACTOR_KEY, "")
    return int(raw) if raw.isdigit() and int(raw) in FACTORS else DEFAULT_FACTOR


def load_latent(ctx: RunContext, latent: str) -> tuple[Any]:
    from sdengine.io.paths import UnsafePathError
    from sdengine.weights.io import WeightsError, load_safetensors

    try:
        path = _latent_path(ctx.folders, latent)
    except UnsafePathError as e:
        raise NodeError(str(e)) from None
    except FileNotFoundError:
        kind = split_annotation(latent)[1]
        raise NodeError(f"latent {latent!r} is not in the {kind} folder") from None
    if path.suffix != LATENT_SUFFIX or not path.is_file():
        raise NodeError(f"latent {latent!r}: only .latent files are read")
    shape, metadata, versioned = check_latent_file(path, latent, ctx.max_batch, ctx.max_side)
    try:
        raw = load_safetensors(path)[LATENT_KEY]  # a map of the file: nothing is read until it is copied below
    except (WeightsError, KeyError, OSError):
        raw = None
    if raw is None or list(raw.shape) != shape or not raw.is_floating_point():  # replaced since it was checked
        raise NodeError(f"latent {latent!r} changed while it was read")
    z = raw.to(torch.float32, copy=True)  # a copy (the map goes); in float32, as ComfyUI's .float()
    if not versioned:
        z = z * (1.0 / OLD_FORMAT_SCALE)
    if not bool(torch.isfinite(z).all()):
        raise NodeError(f"latent {latent!r} holds NaN or infinite values")
    f = _factor(metadata)
    b, _, h, w = z.shape
    return ({"samples": z, "size": (b, h * f, w * f), "posterior": None, "noise_mask": None},)


# --------------------------------------------------------------------------------------------- animations


def _save_animation(
    ctx: RunContext,
    images: torch.Tensor,
    prefix: str,
    suffix: str,
    per_file: int,
    encode: Callable[[list[Image.Image], Any], None],
) -> dict[str, Any]:
    """The batch as animations of ``per_file`` frames (0: all in one file) named ``PREFIX_NNNNN_suffix``;
    ``encode(frames, f)`` writes one."""
    if images.shape[0] < 1:
        raise NodeError("the image batch is empty: nothing to animate")
    folder, sub, stem = save_folder(ctx, prefix, "output", images.shape[2], images.shape[1], suffix)
    frames = tensor_to_pil(images)
    step = per_file if per_file > 0 else len(frames)
    results = []
    with ctx.save_lock:
        counter = first_free_counter(folder, stem, ANY_SUFFIX)
        for i in range(0, len(frames), step):
            part = frames[i : i + step]
            try:
                name, counter = write_numbered(folder, stem, counter, suffix, partial(encode, part))
            except (OSError, ValueError) as e:  # PIL's own limits (a WebP side over 16383, ...)
                raise NodeError(f"the {suffix[1:].upper()} animation could not be written: {_one_line(e)}") from None
            results.append({"filename": name, "subfolder": sub, "type": "output"})
    ui: dict[str, Any] = {"images": results}
    if step > 1 and len(frames) > 1:
        ui["animated"] = [True]
    return {"ui": ui, "result": ()}


def _one_line(e: BaseException) -> str:
    return re.sub(r"\s+", " ", str(e)).strip()[:200] or type(e).__name__


def _duration(fps: float) -> int:
    return int(1000.0 / float(fps))  # ComfyUI's: whole milliseconds a frame


def save_animated_webp(
    ctx: RunContext,
    images: torch.Tensor,
    filename_prefix: str,
    fps: float,
    lossless: bool,
    quality: int,
    method: str,
    num_frames: int = 0,
) -> dict[str, Any]:
    exif = Image.Exif()
    if ctx.prompt:  # as ComfyUI: the prompt in EXIF Model (0x0110), extra_pnginfo entries from Make (0x010F) down
        exif[0x0110] = f"prompt:{json.dumps(ctx.prompt)}"
    for tag, (k, v) in zip(range(0x010F, 0, -1), ctx.extra_pnginfo.items(), strict=False):
        exif[tag] = f"{k}:{json.dumps(v)}"

    def encode(frames: list[Image.Image], f: Any) -> None:
        frames[0].save(
            f,
            format="WEBP",
            save_all=True,
            append_images=frames[1:],
            duration=_duration(fps),
            exif=exif,
            lossless=bool(lossless),
            quality=int(quality),
            method=WEBP_METHODS[method],
        )

    return _save_animation(ctx, images, filename_prefix, ".webp", int(num_frames), encode)


def save_animated_png(
    ctx: RunContext, images: torch.Tensor, filename_prefix: str, fps: float, compress_level: int
) -> dict[str, Any]:
    info = PngInfo()
    # as ComfyUI: each entry a private "comf" chunk after the image data, key NUL JSON (latin-1)
    entries = ([("prompt", ctx.prompt)] if ctx.prompt else []) + list(ctx.extra_pnginfo.items())
    for k, v in entries:
        info.add(b"comf", str(k).encode("latin-1", "replace") + b"\0" + json.dumps(v).encode("latin-1"), True)

    def encode(frames: list[Image.Image], f: Any) -> None:
        buf = io.BytesIO()  # PIL's APNG writer seeks back: written whole, then copied
        frames[0].save(
            buf,
            format="PNG",
            save_all=True,
            append_images=frames[1:],
            duration=_duration(fps),
            pnginfo=info,
            compress_level=int(compress_level),
        )
        f.write(buf.getvalue())

    return _save_animation(ctx, images, filename_prefix, ".png", 0, encode)


# ------------------------------------------------------------------------------------------------ the table

FILE_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "SaveLatent",
            "SaveLatent",
            "_for_testing",
            (Input("samples", "LATENT"), Input("filename_prefix", "STRING", "latents/ComfyUI")),
            ("LATENT",),
            save_latent,
            output_names=("samples",),
            output_node=True,
            description="A .latent file (safetensors: latent_tensor, latent_format_version_0, the prompt as "
            "metadata) in the output folder; history output `latents`. The latent passes on.",
        ),
        NodeDef(
            "LoadLatent",
            "LoadLatent",
            "_for_testing",
            (Input("latent", "COMBO", choices=latent_files, also_valid=annotated_latent_exists),),
            ("LATENT",),
            load_latent,
            description="A .latent file of the input folder (or `name.latent [output]`); a file without "
            "latent_format_version_0 is multiplied by 1/0.18215 (ComfyUI's old format). Checked before it is read.",
            changed=latent_file_token,
        ),
        NodeDef(
            "SaveAnimatedWEBP",
            "SaveAnimatedWEBP",
            "image/animation",
            (
                Input("images", "IMAGE"),
                Input("filename_prefix", "STRING", "ComfyUI"),
                Input("fps", "FLOAT", 6.0, 0.01, 1000.0, 0.01),
                Input("lossless", "BOOLEAN", True),
                Input("quality", "INT", 80, 0, 100, 1),
                Input("method", "COMBO", choices=tuple(WEBP_METHODS)),
                Input(
                    "num_frames",
                    "INT",
                    0,
                    0,
                    8192,
                    1,
                    optional=True,
                    tooltip="Frames per file, 0: all in one (ComfyUI's function has it; its node does not list it)",
                ),
            ),
            (),
            save_animated_webp,
            output_node=True,
            description="The batch as one animated WebP (int(1000 / fps) ms a frame), the prompt in its EXIF.",
        ),
        NodeDef(
            "SaveAnimatedPNG",
            "SaveAnimatedPNG",
            "image/animation",
            (
                Input("images", "IMAGE"),
                Input("filename_prefix", "STRING", "ComfyUI"),
                Input("fps", "FLOAT", 6.0, 0.01, 1000.0, 0.01),
                Input("compress_level", "INT", 4, 0, 9, 1),
            ),
            (),
            save_animated_png,
            output_node=True,
            description="The batch as one animated PNG (APNG, int(1000 / fps) ms a frame), the prompt in `comf` "
            "chunks.",
        ),
    )
}
