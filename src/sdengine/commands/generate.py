"""``sdengine generate PROMPT``: text-to-image, img2img and inpainting from the command line
(docs/CONTRACTS.md, Command line).

Every image is written as a PNG carrying its A1111 ``parameters`` text (docs/CONTRACTS.md, PNG infotext)
under ``--out``, named ``NNNNN-SEED.png`` like A1111's outputs. ``--from-png FILE`` reads such a text and
generates the same image again (same model, same device); flags given next to it override what the PNG says.

The model defaults to the built-in ``emoji`` (MiniLM text encoder, 64x64); width and height are left to the
pipeline's ``default_size`` (the model's training size) unless given, so no size is forced here.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ControlNetError, GenerationError, UsageError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from ..pipeline.control import ControlUnit

# GenerationRequest's defaults as --help shows them; a literal copy because importing the pipeline imports torch
# and --help must not (tests/test_generate_cli.py checks that the two agree).
HELP_DEFAULTS: dict[str, Any] = {"steps": 25, "sampler": "dpmpp_2m", "cfg_scale": 7.5, "strength": 0.75}


def _slg_arg(value: str | None) -> dict[str, Any] | None:
    """``--slg LAYERS[:SCALE[:START:STOP]]`` -> the request's ``sd3`` settings (a one-line UsageError else)."""
    if value is None:
        return None
    parts = value.split(":")
    try:
        if len(parts) not in (1, 2, 4):
            raise ValueError
        layers = [int(x) for x in parts[0].split(",")]
        numbers = [float(x) for x in parts[1:]]
    except ValueError:
        raise UsageError(
            f"--slg {value!r}: expected LAYERS[:SCALE[:START:STOP]], e.g. 7,8,9 or 7,8,9:2.8 or 7,8,9:2.8:0.01:0.2"
        ) from None
    keys = ("skip_layer_guidance_scale", "skip_layer_guidance_start", "skip_layer_guidance_stop")
    return {"skip_guidance_layers": layers, **dict(zip(keys, numbers, strict=False))}


SOFT_NAMES = (
    "schedule_bias",
    "preservation_strength",
    "transition_contrast_boost",
    "mask_influence",
    "difference_threshold",
    "difference_contrast",
)


def _soft_inpainting_arg(value: str | None) -> dict[str, float] | None:
    """``--soft-inpainting [SETTINGS]`` -> the request's ``soft_inpainting``: {} (A1111's defaults) without
    SETTINGS; up to six numbers in A1111's order, or NAME=VALUE pairs, comma-separated (a one-line UsageError
    else; the ranges are the request's check)."""
    if value is None:
        return None
    parts = [x.strip() for x in value.split(",") if x.strip()]
    out: dict[str, float] = {}
    try:
        for k, part in enumerate(parts):
            name, eq, number = part.partition("=")
            if not eq:
                name, number = SOFT_NAMES[k] if k < len(SOFT_NAMES) else "", part
            if name not in SOFT_NAMES or name in out:
                raise ValueError
            out[name] = float(number)
    except ValueError:
        raise UsageError(
            f"--soft-inpainting {value!r}: expected up to six numbers in A1111's order ({', '.join(SOFT_NAMES)}) or "
            "NAME=VALUE pairs, comma-separated, e.g. 1,0.5,4 or mask_influence=0.3"
        ) from None
    return out


def request_defaults() -> dict[str, Any]:
    """The defaults a generate run starts from: GenerationRequest's, with seed -1 (random)."""
    from ..pipeline.request import GenerationRequest

    defaults = GenerationRequest.defaults()
    out = {
        k: defaults[k]
        for k in ("negative_prompt", "steps", "sampler", "schedule", "cfg_scale", "batch_size", "strength", "clip_skip")
    }
    out["seed"] = -1
    return out


_NUMBER = re.compile(r"^-?\d+(\.\d*)?$")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what --prediction-type (and "Prediction type") take


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def parse_control_spec_full(text: str) -> tuple[str, ControlUnit]:
    """``--control TYPE:IMAGE[:WEIGHT[:START:END]]`` -> (preprocessor type, ControlUnit without a model).
    Trailing numbers are options, everything between the type and them is the image path (so
    ``C:\\x.png`` and names with colons still work)."""
    from ..control import PREPROCESSORS, unknown_type_message
    from ..metadata import REFERENCE_MODULES
    from ..pipeline.control import check_unit_settings

    kind, sep, rest = text.partition(":")
    kind = kind.strip().lower()
    if not sep or not rest:
        raise ControlNetError(f"--control {text!r}: expected TYPE:IMAGE[:WEIGHT[:START:END]], e.g. canny:edges.png:0.8")
    if kind not in PREPROCESSORS and kind not in REFERENCE_MODULES:  # reference_*: a unit without a model
        raise ControlNetError(unknown_type_message(kind))
    parts = rest.split(":")
    numbers: list[float] = []
    while len(parts) > 1 and len(numbers) < 3 and (v := _number(parts[-1])) is not None:
        numbers.insert(0, v)
        parts.pop()
    image = ":".join(parts)
    if not image:
        raise ControlNetError(f"--control {text!r}: no image given")
    if len(numbers) == 2:  # WEIGHT:START without END is ambiguous: refuse.
        raise ControlNetError(f"--control {text!r}: give WEIGHT, or WEIGHT:START:END")
    weight = numbers[0] if numbers else 1.0
    start, end = (numbers[1], numbers[2]) if len(numbers) == 3 else (0.0, 1.0)
    check_unit_settings(weight, start, end, name=f"--control {text}")
    from ..pipeline.control import ControlUnit

    return kind, ControlUnit(None, image, weight, start, end)


def parse_control_spec(text: str) -> tuple[str, str, float]:
    """``TYPE:IMAGE[:WEIGHT]`` -> (type, image path, weight); unknown types list the valid ones, a weight
    outside [0, 2] is warned about."""
    kind, unit = parse_control_spec_full(text)
    return kind, unit.image, unit.scale


def control_units_from_cli(
    controls: Sequence[str],
    controlnets: Sequence[str],
    recorded: Sequence[Any] | None = None,
    *,
    thresholds: Sequence[Sequence[float]] = (),
    processor_res: Sequence[int] = (),
    target: tuple[int, int] | None = None,
    fit: str | None = None,
    **preprocess_options: float,
) -> list[ControlUnit]:
    """Pair repeated ``--control`` and ``--controlnet`` flags in order -> ControlUnits, each image read
    (named if unreadable) and preprocessed by its type. ``recorded``: a PNG's ControlNets
    (:class:`sdengine.metadata.RecordedControlNet`, one per flag): where a flag's type is the recorded
    preprocessor, it runs with the recorded options (canny's thresholds) on the image scaled to the recorded
    ``Processor Res``, as the image was made; a unit recorded with the extension's Pixel Perfect has its
    resolution worked out from its image's size, ``target`` (the output's width, height) and its resize mode
    (the recorded one, else ``fit``). ``thresholds``: the ``--control-threshold-a`` / ``-b`` values, one per
    control (or one for all; -1: the preprocessor's default), over the recorded ones. ``processor_res``: the
    ``--control-res`` values, one per control or one for all: the short side a preprocessed image is scaled to
    before its preprocessor (A1111's "Preprocessor Resolution"), over the recorded one; -1: the recorded one, else
    the image as it is."""
    from ..control import option_names, preprocess
    from ..control.preprocess import load_control_image, option_defaults, pixel_perfect_resolution, processor_resize
    from ..metadata import CONTROLNET_SCALED, CONTROLNET_THRESHOLDS, REFERENCE_MODULES

    # reference_only / reference_adain / reference_adain+attn take no model: the others pair with --controlnet
    modelled = [t for t in controls if t.partition(":")[0].strip().lower() not in REFERENCE_MODULES]
    if len(modelled) != len(controlnets):
        raise ControlNetError(
            f"{len(modelled)} --control but {len(controlnets)} --controlnet: give one "
            "--controlnet MODEL per --control TYPE:IMAGE (reference_* controls take none)"
        )
    paths = iter(controlnets)
    out = []
    for k, text in enumerate(controls):
        kind, unit = parse_control_spec_full(text)
        if kind in REFERENCE_MODULES:
            out.append(_reference_from_cli(text, kind, unit, k, len(controls), thresholds, processor_res))
            continue
        path = next(paths)
        options = {n: v for n, v in preprocess_options.items() if n in option_names(kind)}
        image, res = unit.image, None
        r = recorded[k] if recorded is not None else None
        if r is not None and r.preprocessor == kind:
            options = {**options, **{n: v for n, v in r.options.items() if n in option_names(kind)}}
            if r.pixel_perfect and kind in CONTROLNET_SCALED and target is not None:
                image = load_control_image(image)
                w, h = target
                fill = (r.resize_mode or fit or "crop and resize") == "resize and fill"
                res = pixel_perfect_resolution(image.size, w // 8 * 8, h // 8 * 8, fill)
            elif r.pixel_perfect and kind in CONTROLNET_SCALED:
                log.warning("%s: Pixel Perfect without the output's size: its Processor Res is used", text)
            if res is None and r.processor_res is not None and kind in CONTROLNET_SCALED:
                res = r.processor_res
        given = (processor_res[k] if len(processor_res) > 1 else processor_res[0]) if processor_res else -1
        if given != -1 and kind in CONTROLNET_SCALED:
            res = given  # over the recorded one (and over Pixel Perfect's)
        elif given != -1 and (len(processor_res) > 1 or len(controls) == 1):
            raise UsageError(
                f"--control-res {given}: preprocessor {kind!r} takes the image as it is, at no resolution "
                "(give -1 for it)"
            )
        if res is not None:
            image = processor_resize(load_control_image(image), res)
        for slider, values in zip(("a", "b"), thresholds, strict=False):
            if not values:
                continue
            value = values[k] if len(values) > 1 else values[0]
            names = CONTROLNET_THRESHOLDS.get(kind, ())
            if value == -1:  # the extension's "default"
                continue
            if len(names) <= "ab".index(slider):
                if len(values) > 1 or len(controls) == 1:
                    raise UsageError(
                        f"--control-threshold-{slider} {value:g}: preprocessor {kind!r} has no threshold "
                        f"{slider.upper()} (give -1 for it)"
                    )
                continue
            options[names["ab".index(slider)]] = value
        out.append(
            dataclasses.replace(
                unit,
                model=path,
                image=preprocess(kind, image, **options),
                module=kind,
                module_options={**option_defaults(kind), **options},
                processor_res=res,
            )
        )
    return out


def union_modes(a: Any, kwargs: dict[str, Any]) -> None:
    """``--control-union-mode MODE`` (repeatable): a Flux Union ControlNet's control kind, one per ``--control`` in
    order (``none`` for a unit whose ControlNet is not a Union one), set on the request's units."""
    modes = getattr(a, "control_union_mode", None) or []
    if not modes:
        return
    units = list(kwargs.get("controlnets") or [])
    if not units:
        raise UsageError("--control-union-mode is a Flux Union ControlNet's setting: it needs --control/--controlnet")
    if len(modes) != len(units):
        raise UsageError(f"{len(modes)} --control-union-mode for {len(units)} --control: give one per --control")
    kwargs["controlnets"] = [
        dataclasses.replace(u, union_mode=None if m.strip().lower() == "none" else m.strip().lower())
        for u, m in zip(units, modes, strict=True)
    ]


def control_masks(a: Any, kwargs: dict[str, Any]) -> None:
    """``--control-mask IMAGE`` (repeatable): an SD3 / Qwen-Image inpainting ControlNet's mask (white = repaint), one
    per ``--control`` in order (``none`` for a unit that takes no mask), set on the request's units; the unit's
    ``--control`` image is the picture to inpaint."""
    masks = getattr(a, "control_mask", None) or []
    if getattr(a, "control_inpaint_image", None) and not masks:
        raise UsageError("--control-inpaint-image (a Z-Image inpainting ControlNet's picture) needs --control-mask")
    if not masks:
        return
    units = list(kwargs.get("controlnets") or [])
    if not units:
        raise UsageError("--control-mask is an SD3 inpainting ControlNet's mask: it needs --control/--controlnet")
    if len(masks) != len(units):
        raise UsageError(f"{len(masks)} --control-mask for {len(units)} --control: give one per --control")
    kwargs["controlnets"] = [
        dataclasses.replace(u, mask=None if m.strip().lower() == "none" else m)
        for u, m in zip(units, masks, strict=True)
    ]
    pictures = getattr(a, "control_inpaint_image", None) or []
    if pictures:  # Z-Image's inpainting ControlNets: the picture to inpaint (the --control image stays the map)
        if len(pictures) != len(units):
            raise UsageError(
                f"{len(pictures)} --control-inpaint-image for {len(units)} --control: give one per --control"
            )
        kwargs["controlnets"] = [
            dataclasses.replace(u, inpaint_image=None if m.strip().lower() == "none" else m)
            for u, m in zip(kwargs["controlnets"], pictures, strict=True)
        ]


def _reference_from_cli(
    text: str,
    kind: str,
    unit: ControlUnit,
    k: int,
    n: int,
    thresholds: Sequence[Sequence[float]],
    processor_res: Sequence[int],
) -> ControlUnit:
    """A ``--control reference_*:IMAGE[:WEIGHT[:START:END]]``: a reference unit (no model, the image as it is), its
    style fidelity the ``--control-threshold-a`` value (-1 or none: 0.5, the extension's default)."""
    res = (processor_res[k] if len(processor_res) > 1 else processor_res[0]) if processor_res else -1
    if res != -1 and (len(processor_res) > 1 or n == 1):
        raise UsageError(f"--control-res {res}: {kind} takes the image as it is, at no resolution (give -1 for it)")
    fidelity = None
    a_values = thresholds[0] if thresholds else []
    if a_values:
        value = a_values[k] if len(a_values) > 1 else a_values[0]
        if value != -1 and (len(a_values) > 1 or n == 1 or 0.0 <= value <= 1.0):
            fidelity = value
    b_values = thresholds[1] if len(thresholds) > 1 else []
    if b_values and (b_values[k] if len(b_values) > 1 else b_values[0]) != -1 and (len(b_values) > 1 or n == 1):
        raise UsageError(f"--control-threshold-b: {kind} has no threshold B (give -1 for it)")
    return dataclasses.replace(unit, model=kind, image=str(unit.image), style_fidelity=fidelity)


def control_thresholds(a: argparse.Namespace) -> list[list[float]]:
    """``--control-threshold-a`` / ``-b`` -> their values (A's, B's), each list one per ``--control`` or one
    for all; a count that is neither, a value that is not finite, or the flags without ``--control`` are a
    UsageError."""
    n = len(a.control or [])
    out = []
    for slider in ("a", "b"):
        values = list(getattr(a, f"control_threshold_{slider}", None) or [])
        flag = f"--control-threshold-{slider}"
        if values and not n:
            raise UsageError(f"{flag} sets a --control preprocessor's threshold: give --control TYPE:IMAGE")
        if len(values) not in (0, 1, n):
            raise UsageError(f"{len(values)} {flag} for {n} --control: give one for all, or one per --control")
        bad = [v for v in values if not math.isfinite(v)]
        if bad:
            raise UsageError(f"{flag} {bad[0]}: give a finite number (-1: the preprocessor's default)")
        out.append(values)
    return out


def control_resolutions(a: argparse.Namespace) -> list[int]:
    """``--control-res`` -> its values, one per ``--control`` or one for all, each in A1111's "Preprocessor
    Resolution" range or -1 (the recorded one, else the image as it is); another count, a value out of range or the
    flag without ``--control`` is a UsageError."""
    from ..metadata import CONTROLNET_PROCESSOR_RES_RANGE

    n = len(a.control or [])
    values = list(getattr(a, "control_res", None) or [])
    if values and not n:
        raise UsageError("--control-res is the resolution of a --control preprocessor: give --control TYPE:IMAGE")
    if len(values) not in (0, 1, n):
        raise UsageError(f"{len(values)} --control-res for {n} --control: give one for all, or one per --control")
    lo, hi = CONTROLNET_PROCESSOR_RES_RANGE
    for v in values:
        if v != -1 and not lo <= v <= hi:
            raise UsageError(f"--control-res {v}: give a short side in pixels in [{lo}, {hi}], or -1 (the default)")
    return values


def lora_arg(text: str) -> tuple[str, Any]:
    """``FILE[:WEIGHT]`` or ``FILE:TE:UNET``; a trailing ``:number`` is the weight (so ``C:\\x.safetensors`` still
    works), two trailing numbers the text-encoder and U-Net weights (A1111's ``<lora:NAME:TE:UNET>``).

    Any float spelling is a weight (``1e30``, ``inf``), never part of the file name: the LoRA code then refuses an
    absurd weight by name instead of saying that a file ``F:1e30`` does not exist."""
    from sdengine.nn.lora import lora_weight

    if Path(text).is_file():
        return text, 1.0
    numbers: list[float] = []
    head = text
    while len(numbers) < 2:
        rest, sep, tail = head.rpartition(":")
        if not (sep and rest):
            break
        try:
            numbers.insert(0, float(tail))
        except ValueError:
            break
        head = rest
        if Path(head).is_file():
            break
    if not numbers:
        return text, 1.0
    return head, lora_weight(*numbers)


_NUMBERED = re.compile(r"^(?:grid-|xyz-)?(\d{5,})[-.]")  # NNNNN-SEED.png, grid-NNNNN.png, xyz-NNNNN.png


def next_index(out: Path) -> int:
    """The first free ``NNNNN`` of a folder: past every image's, batch grid's and X/Y/Z grid's number, so that no
    name of a new run (``NNNNN-SEED.png``, ``grid-NNNNN.png``, ``xyz-NNNNN.png``) is one that exists."""
    used = [int(m.group(1)) for p in out.glob("*.png") if (m := _NUMBERED.match(p.name))]
    return max(used, default=-1) + 1


_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def output_target(out: str, batch_size: int, n_iter: int = 1) -> tuple[Path, bool]:
    """(path, is_file) for ``--out``, checked before any work: a path ending in ``.png`` is the one image's
    file (so ``--out ghost.png`` does not make a folder of that name), anything else a folder, as is a path
    ending in ``/`` (``--out shots.png/``). Refused: another image suffix (only PNG carries the parameters), a
    file name for a batch, a path under (or at, for a folder) an existing file, and a place this process cannot
    create a file in (a read-only file system): all before the model loads, so no render is thrown away."""
    path = Path(out)
    if not out.strip():
        raise UsageError("--out is empty: give a folder (or a .png file for one image)")
    suffix = path.suffix.lower()
    is_file = suffix in _IMAGE_SUFFIXES and not path.is_dir() and not out.endswith(("/", os.sep))
    if is_file and suffix != ".png":
        raise UsageError(f"--out {out}: sdengine writes PNG files (they carry the parameters); name it .png")
    if is_file and batch_size * n_iter != 1:
        flags = f"--batch {batch_size}" + (f" x --n-iter {n_iter}" if n_iter != 1 else "")
        raise UsageError(f"--out {out} names one file but {flags} makes {batch_size * n_iter} images: give a folder")
    if not is_file and path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: {path} is a file, not a folder")
    nearest = path if path.is_dir() else None
    for parent in path.parents:
        if nearest is None and parent.exists():
            if not parent.is_dir():
                raise UsageError(f"--out {out}: {parent} is a file, not a folder")
            nearest = parent
    if nearest is not None:
        try:  # a file here, nameless and gone at once: the folders under it are made as the images are written
            with tempfile.TemporaryFile(dir=nearest):
                pass
        except OSError as e:
            raise UsageError(f"--out {out}: cannot write in {nearest} ({e.strerror or e})") from None
    return path, is_file


def _refuse_overwriting_an_input(out: Path, a: argparse.Namespace) -> None:
    """``--out`` naming a file this run reads (``--init-image photo.png --out photo.png``) would replace the
    picture it starts from; refused, as ffmpeg refuses an output that is its input."""
    if not out.is_file():
        return
    inputs = [("--init-image", a.init_image), ("--mask", a.mask), ("--from-png", a.from_png)]
    inputs.append(("--control-image", getattr(a, "control_image", None)))
    inputs.append(("--latent-mask", getattr(a, "latent_mask", None)))
    for text in a.control or []:  # TYPE:IMAGE[:WEIGHT[:START:END]], the image as parse_control_spec_full finds it
        parts = text.partition(":")[2].split(":")
        while len(parts) > 1 and _number(parts[-1]) is not None:
            parts.pop()
        inputs.append(("--control", ":".join(parts)))
    inputs += [("--reference-image", x) for x in getattr(a, "reference_image", None) or []]
    inputs += [("--redux-image", x) for x in getattr(a, "redux_image", None) or []]
    for text in getattr(a, "ip_image", None) or []:  # IMAGE[+IMAGE...]
        inputs += [("--ip-image", text)] + [("--ip-image", part) for part in text.split("+")]
    for flag, given in inputs:
        try:
            same = bool(given) and os.path.samefile(out, given)
        except OSError:
            same = False
        if same:
            raise UsageError(
                f"--out {out} is the {flag} image this run reads: writing would replace it; give another --out"
            )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (so redirections after set-up are followed)."""

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # noqa: ANN001
        pass


def _setup_logging() -> None:
    """Warnings of the pipeline (a resized mask, a float32 VAE fallback) as 'sdengine: WARNING: ...' lines."""
    logger = logging.getLogger("sdengine")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("sdengine: %(levelname)s: %(message)s"))
        logger.addHandler(h)
        if logger.level == logging.NOTSET or logger.level > logging.WARNING:
            logger.setLevel(logging.WARNING)


def _freeu_arg(text: str) -> tuple[float, ...] | None:
    """--freeu's value: B1,B2,S1,S2, a preset name (sd1, sd2, sdxl), or off."""
    from ..nn.freeu import FREEU_PRESETS

    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    if t in FREEU_PRESETS:
        return FREEU_PRESETS[t]
    parts = [x.strip() for x in text.split(",")]
    try:
        if len(parts) != 4:
            raise ValueError
        return tuple(float(x) for x in parts)
    except ValueError:
        raise UsageError(
            f"--freeu takes four numbers B1,B2,S1,S2 (e.g. 1.3,1.4,0.9,0.2), {', '.join(FREEU_PRESETS)} or off; "
            f"got {text!r}"
        ) from None


def _deep_shrink_arg(text: str) -> dict[str, Any] | None:
    """--deep-shrink's value: BLOCK,FACTOR[,START,END] (START and END in percent of the sampling, 0 to 1), or off."""
    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    parts = [x.strip() for x in text.split(",")]
    try:
        if len(parts) not in (2, 4):
            raise ValueError
        block = float(parts[0])
        if not block.is_integer():
            raise ValueError
        out: dict[str, Any] = {"block": int(block), "factor": float(parts[1])}
        if len(parts) == 4:
            out.update(start=float(parts[2]), end=float(parts[3]))
        return out
    except ValueError:
        raise UsageError(
            f"--deep-shrink takes BLOCK,FACTOR or BLOCK,FACTOR,START,END (e.g. 3,2 or 3,2,0,0.35) or off; got {text!r}"
        ) from None


def _apply_deep_shrink_flags(a: argparse.Namespace, kwargs: dict[str, Any]) -> None:
    """--deep-shrink and its --deep-shrink-skip / --deep-shrink-method onto ``kwargs`` (a --from-png image's Deep
    Shrink included)."""
    if a.deep_shrink is not None:  # "off" turns a --from-png image's Deep Shrink off
        kwargs["deep_shrink"] = _deep_shrink_arg(a.deep_shrink)
    extra: dict[str, Any] = {}
    if a.deep_shrink_skip is not None:
        extra["after_skip"] = a.deep_shrink_skip == "after"
    if a.deep_shrink_method is not None:
        methods = [x.strip() for x in a.deep_shrink_method.split(",")]
        if len(methods) not in (1, 2):
            raise UsageError(f"--deep-shrink-method takes METHOD or DOWN,UP; got {a.deep_shrink_method!r}")
        extra.update(downscale_method=methods[0], upscale_method=methods[-1])
    if extra:
        if kwargs.get("deep_shrink") is None:
            flag = "--deep-shrink-skip" if a.deep_shrink_skip is not None else "--deep-shrink-method"
            raise UsageError(f"{flag} has no effect without --deep-shrink: drop it, or add --deep-shrink BLOCK,FACTOR")
        from ..nn.deep_shrink import FIELDS, DeepShrink

        base = dict(zip(FIELDS, DeepShrink.coerce(kwargs["deep_shrink"]).key, strict=True))
        kwargs["deep_shrink"] = {**base, **extra}


def _tiled_diffusion_arg(text: str) -> dict[str, Any] | None:
    """--tiled-diffusion's value: WINDOW[xHEIGHT],STRIDE[,circular][,batch=N] in latent cells, on (diffusers'
    64,8), or off."""
    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    if t == "on":
        return {"window": 64, "stride": 8}
    parts = [x.strip() for x in t.split(",")]
    try:
        if len(parts) < 2:
            raise ValueError
        sides = parts[0].split("x")
        if len(sides) > 2:
            raise ValueError
        out: dict[str, Any] = {"window": int(sides[0]), "stride": int(parts[1])}
        if len(sides) == 2:
            out["window_height"] = int(sides[1])
        for extra in parts[2:]:
            if extra == "circular" and "circular" not in out:
                out["circular"] = True
            elif extra.startswith("batch=") and "view_batch" not in out:
                out["view_batch"] = int(extra[len("batch=") :])
            else:
                raise ValueError
        return out
    except ValueError:
        raise UsageError(
            "--tiled-diffusion takes WINDOW[xHEIGHT],STRIDE[,circular][,batch=N] in latent cells (e.g. 64,8 or "
            f"96x64,48,batch=4), on (64,8) or off; got {text!r}"
        ) from None


def _hypertile_arg(text: str, flag: str = "--hypertile", tile: int = 256) -> tuple[int, int, int] | None:
    """--hypertile's value: TILE[,SWAP[,DEPTH]] (A1111's defaults 256, 3, 3 for those left out), on, or off
    (``flag`` and ``tile``: --hypertile-vae's, whose A1111 defaults are 128, 3, 3)."""
    t = text.strip().lower()
    if t in ("off", "none"):
        return None
    defaults = [tile, 3, 3]
    if t == "on":
        return (tile, 3, 3)
    parts = [x.strip() for x in text.split(",")]
    try:
        if not 1 <= len(parts) <= 3:
            raise ValueError
        values = [int(x) for x in parts] + defaults[len(parts) :]
    except ValueError:
        raise UsageError(
            f"{flag} takes TILE[,SWAP[,DEPTH]] whole numbers (e.g. {tile},3,3), on or off; got {text!r}"
        ) from None
    return (values[0], values[1], values[2])


def _from_png(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    from ..image_info import read_image_parameters
    from ..metadata import (
        MetadataError,
        hires_fix_fields,
        parse_parameters,
        to_generate_kwargs,
    )

    # a PNG's text chunk, or the EXIF UserComment of a JPEG/WebP A1111 saved (what `sdengine pnginfo` reads)
    text = read_image_parameters(path)
    if text is None:
        from ..image_info import image_text_keys

        if "sdengine-xyz" in image_text_keys(path):  # as `sdengine pnginfo` says it
            raise MetadataError(
                f"{path} is an sdengine X/Y/Z grid, not one generation: give --from-png one of its cells (the "
                "NNNNN-SEED.png files written with it)"
            )
        raise MetadataError(
            f"{path} has no 'parameters' text (nor an EXIF UserComment): it was not written by sdengine or A1111"
        )
    if not text.strip():  # an empty text would regenerate nothing of the original: a random image
        raise MetadataError(f"{path} has an empty 'parameters' text: there is nothing to regenerate from")
    parsed = parse_parameters(text)
    try:
        # a hires image's "Denoising strength" is its second pass's, not an img2img's
        kwargs = to_generate_kwargs(parsed, hires=True, refiner=True, hr_checkpoint=True, hr_refiner=True)
    except MetadataError as e:
        if hires_fix_fields(parsed):
            raise GenerationError(f"{path}: {e}") from None
        raise
    _control_resize_from_png(kwargs, parsed, path)
    return kwargs, parsed


def _control_resize_from_png(kwargs: dict[str, Any], parsed: dict[str, str], path: str) -> None:
    """A1111's ControlNet extension records how each unit fitted its control image ("Resize Mode: Crop and
    Resize", its default) where sdengine records one "Resize mode": a PNG without sdengine's field takes the
    units' one (a txt2img's, whose only fitted images are the control images); units that differ, or an
    img2img's init image (A1111 does not record its fit), cannot be made so and are warned of."""
    from ..metadata import recorded_controlnets

    modes = {r.resize_mode for r in recorded_controlnets(parsed) if r.resize_mode is not None}
    if "Resize mode" in parsed or not modes:
        return
    if len(modes) > 1:
        log.warning(
            "%s: its ControlNets fitted their control images differently (%s), which one sdengine run cannot "
            "do: the image may differ (give --resize-mode)",
            path,
            ", ".join(sorted(modes)),
        )
        return
    (mode,) = modes
    if "strength" in kwargs and not kwargs.get("enable_hr") and mode != "just resize":
        log.warning(
            "%s: its ControlNets used %r and its init image A1111's unrecorded fit; sdengine fits both one way: "
            "the image may differ (give --resize-mode)",
            path,
            mode,
        )
        return
    kwargs["resize_mode"] = mode


def _model_from_png(parsed: dict[str, str]) -> str | None:
    from ..pipeline import BUILTIN_PIXEL, BUILTIN_SD

    name = parsed.get("Model")
    if name and (name in BUILTIN_SD or name in BUILTIN_PIXEL or Path(name).exists()):
        return name
    return None


def _refiner_from_png(a: argparse.Namespace, parsed: dict[str, str]) -> None:
    """An SDXL image made with a refiner hand-off (A1111's "Refiner: NAME [hash]", "Refiner switch at: F"):
    the refiner is --refiner, else the recorded name where it is a path here (as "Model"); the switch is
    --refiner-switch-at, else the recorded one (none recorded: 0, A1111's None); the switch rule the recorded
    one (sdengine.metadata.refiner_switch: A1111's in an A1111 infotext). Without the refiner the image would
    be another one."""
    from ..metadata import MetadataError, refiner_switch

    recorded = parsed.get("Refiner")
    if not recorded:
        return
    try:
        switch = refiner_switch(parsed)
    except MetadataError as e:
        raise GenerationError(f"{a.from_png}: {e}") from None
    assert switch is not None
    a.refiner_switch_rule = switch[1]
    if a.refiner is None:
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", recorded)
        if not name or not Path(name).exists():
            raise GenerationError(
                f"{a.from_png} was made with the refiner {recorded!r}, which is not a path here: give --refiner"
            )
        a.refiner = name
    if a.refiner_switch_at is None:
        a.refiner_switch_at = switch[0]


def _hires_models_from_png(a: argparse.Namespace, parsed: dict[str, str]) -> None:
    """A hires image whose second pass ran on another model (A1111's "Hires checkpoint: NAME [hash]") or whose
    refiner handed off in another pass than the second ("Hires refiner: first pass"): --hr-checkpoint, else the
    recorded name where it is a path here (as "Model"); --hr-refiner-pass, else the recorded pass."""
    recorded = parsed.get("Hires checkpoint")
    if recorded and recorded != "Use same checkpoint" and a.hr_checkpoint is None:
        name = re.sub(r"\s*\[[0-9a-fA-F]+\]$", "", recorded)
        if not name or not Path(name).exists():
            raise GenerationError(
                f"{a.from_png} ran its hires pass on {recorded!r}, which is not a path here: give --hr-checkpoint"
            )
        a.hr_checkpoint = name
    if a.hr_refiner_pass is None and parsed.get("Hires refiner") and parsed.get("Refiner"):
        a.hr_refiner_pass = hr_refiner_pass(parsed["Hires refiner"], f"{a.from_png}: Hires refiner")


def hr_refiner_pass(value: str, what: str = "--hr-refiner-pass") -> str:
    """A1111's ``hires_fix_refiner_pass`` from ``first``/``second``/``both`` or its own ``first pass``, ...; another
    value is a UsageError naming them."""
    from ..pipeline.sdxl import HIRES_REFINER_PASSES

    v = " ".join(value.strip().lower().split())
    v = v if v.endswith(" pass") or v.endswith(" passes") else v + (" passes" if v == "both" else " pass")
    if v not in HIRES_REFINER_PASSES:
        raise UsageError(f"{what} must be one of first, second, both (A1111's 'first pass', ...), got {value!r}")
    return v


def _vae_from_png(parsed: dict[str, str], given: str | None, png: str) -> str | None:
    """The VAE to use for --from-png: --vae when given; else the file the infotext's "VAE" names when it is a
    path here (as "Model"); else the model's own, with a warning that the image may differ."""
    name = parsed.get("VAE")
    if given is not None or not name:
        return given
    if Path(name).is_file() or Path(name).is_dir():
        return name
    logging.getLogger(__name__).warning(
        "%s was made with the VAE %r, which is not a path here: decoding with the model's own VAE "
        "(give --vae to use it)",
        png,
        name,
    )
    return None


def _spec_has_numbers(text: str) -> bool:
    """Whether a ``--control TYPE:IMAGE[:WEIGHT...]`` spec gives its own weight (else the PNG's is used)."""
    _, _, rest = text.partition(":")
    parts = rest.split(":")
    return len(parts) > 1 and _number(parts[-1]) is not None


def _recorded_controlnet_path(name: str, digest: str | None, controlnets_dir: str | None, png: str) -> str:
    """The ControlNet a PNG names: a built-in name, else ``NAME`` (folder) or ``NAME.safetensors`` in
    ``--controlnets-dir``; where the PNG records a hash, the file found must have it."""
    from ..catalog import builtin_path
    from ..metadata import legacy_hash, model_hash

    path = builtin_path("controlnets", name)
    if path is None and controlnets_dir is not None:
        folder = Path(controlnets_dir)
        # only a plain name is looked up, so a crafted PNG cannot point outside the folder
        if Path(name).name == name and name not in ("", ".", ".."):
            path = next((p for p in (folder / name, folder / f"{name}.safetensors") if p.exists()), None)
    if path is None:
        where = (
            f"built-in or in --controlnets-dir {controlnets_dir}"
            if controlnets_dir
            else "built-in (give --controlnets-dir FOLDER or --controlnet MODEL)"
        )
        raise ControlNetError(f"{png} was made with ControlNet {name!r}, which is not {where}")
    if digest is not None:
        # a file is hashed itself, a diffusers folder by its weights file (as A1111 hashes the file it loads)
        files = [path] if path.is_file() else sorted(path.glob("**/diffusion_pytorch_model*.safetensors"))
        weights = files[0] if files else None
        found = model_hash(weights) if weights is not None else ""
        # sd-webui-controlnet writes A1111's old 8-digit hash (64 KiB at 1 MiB), sdengine the file's SHA-256
        old = legacy_hash(weights) if weights is not None and len(digest) == 8 else ""
        n = min(len(digest), len(found))
        if digest.lower() != old and (not n or found[:n] != digest[:n].lower()):
            raise ControlNetError(
                f"{png} was made with ControlNet {name!r} [{digest}], but {path} has hash "
                f"[{found[: len(digest)] or 'unknown'}]{f' (A1111 old hash [{old}])' if old else ''}: give the same "
                "ControlNet with --controlnet"
            )
    return str(path)


def _controlnets_from_png(
    a: argparse.Namespace, parsed: dict[str, str], kwargs: dict[str, Any] | None = None
) -> list[ControlUnit]:
    """A ControlNet PNG is made again only with its control images (``--control``, one per recorded ControlNet,
    in order); the models are the ones it names, unless ``--controlnet`` gives others. Weight, start and end
    are the recorded ones unless the ``--control`` spec gives them."""
    from ..metadata import recorded_controlnets
    from .generate_ip import refuse_a1111_ip_adapter

    recorded = recorded_controlnets(parsed)
    refuse_a1111_ip_adapter(recorded, a.from_png)
    if not recorded:
        if not (a.control or a.controlnet):
            return []
        return control_units_from_cli(
            a.control or [],
            a.controlnet or [],
            thresholds=control_thresholds(a),
            processor_res=control_resolutions(a),
        )
    names = ", ".join(r.name for r in recorded)
    if not a.control:
        raise ControlNetError(
            f"{a.from_png} was made with ControlNet {names}: give its control image with "
            "--control TYPE:IMAGE (one per ControlNet, in order)"
        )
    if len(a.control) != len(recorded):
        raise ControlNetError(
            f"{a.from_png} records {len(recorded)} ControlNet(s) ({names}) but {len(a.control)} --control were given"
        )
    models = a.controlnet or [
        _recorded_controlnet_path(r.name, r.hash, a.controlnets_dir, a.from_png) for r in recorded
    ]
    kw = kwargs or {}
    width, height = kw.get("width"), kw.get("height")
    units = control_units_from_cli(
        a.control,
        models,
        recorded,
        thresholds=control_thresholds(a),
        processor_res=control_resolutions(a),
        target=(int(width), int(height)) if width is not None and height is not None else None,
        fit=kw.get("resize_mode"),
    )
    return [
        dataclasses.replace(
            u if _spec_has_numbers(text) else dataclasses.replace(u, scale=r.weight, start=r.start, end=r.end),
            rule=r.rule,
            mode=r.mode,
            hires_mode=r.hires_mode,
            union_mode=r.union_mode,
        )
        for u, r, text in zip(units, recorded, a.control, strict=True)
    ]


def names_loras(*prompts: str | None) -> bool:
    """Whether a prompt has a ``<lora:...>`` (or ``<lyco:...>``) tag; a malformed one counts (its error comes later)."""
    from ..prompts import extract_lora_tags

    for text in prompts:
        if not text:
            continue
        try:
            if extract_lora_tags(text)[1]:
                return True
        except ValueError:
            return True
    return False


def _a1111_grid_sampler(sampler: Any) -> bool:
    """Whether ``sampler`` (ours or A1111's name) is DDIM or PLMS, whose grid A1111's strength rule changes."""
    from ..diffusion.sampling import resolve
    from ..diffusion.schedules import A1111_GRID_SAMPLERS

    try:
        return isinstance(sampler, str) and resolve(sampler)[0] in A1111_GRID_SAMPLERS
    except ValueError:  # an unknown name: refused where it is used
        return False


def _refuse_flags_without_effect(
    a: argparse.Namespace, hires: bool, variation: bool = False, cfg: float | None = None
) -> None:
    """A flag that would change nothing in this run is a one-line UsageError, before the model loads, as
    ``--mask`` without ``--init-image`` is: ``--strength`` on a text-to-image run without the hires fix was
    once dropped without a word (A1111's API does that; a command line should say it)."""
    img2img = a.init_image is not None or a.outpaint is not None
    second_pass = "--init-image (img2img) or the hires fix (--hires)"
    needs = [
        ("--strength", a.strength, img2img or hires, second_pass),
        # (and DDIM / PLMS, which walk A1111's own grid under its rule, txt2img too)
        (
            "--strength-rule",
            a.strength_rule,
            img2img or hires or _a1111_grid_sampler(a.sampler),
            "--init-image (img2img), the hires fix (--hires) or --sampler ddim / plms",
        ),
        ("--vae-encode", a.vae_encode, img2img or hires, second_pass),
        ("--mask", a.mask, a.init_image is not None, "--init-image (the image to inpaint)"),
        ("--no-reference-resize", a.reference_auto_resize, bool(a.reference_image), "--reference-image"),
        ("--redux-model", a.redux_model, bool(a.redux_image or a.from_png), "--redux-image (or --from-png)"),
        ("--redux-siglip", a.redux_siglip, bool(a.redux_image or a.from_png), "--redux-image (or --from-png)"),
        ("--redux-strength", a.redux_strength, bool(a.redux_image or a.from_png), "--redux-image (or --from-png)"),
        ("--image-cfg-scale", a.image_cfg_scale, a.init_image is not None, "--init-image (the image to edit)"),
        ("--mask-blur", a.mask_blur, a.mask is not None or a.outpaint is not None, "--mask or --outpaint"),
        ("--differential-diffusion", a.differential_diffusion, a.mask is not None, "--mask (a grey inpainting mask)"),
        ("--soft-inpainting", a.soft_inpainting, a.mask is not None, "--mask (a grey inpainting mask)"),
        ("--no-mask-round", getattr(a, "mask_round", None), a.mask is not None, "--mask (A1111's latent mask)"),
        ("--latent-mask", getattr(a, "latent_mask", None), a.mask is not None, "--mask (inpainting)"),
        ("--resize-mode", a.resize_mode, img2img or bool(a.control), "--init-image or --control"),
        ("--refiner-switch-at", a.refiner_switch_at, a.refiner is not None, "--refiner"),
        ("--hr-checkpoint", a.hr_checkpoint, hires, "the hires fix (--hires)"),
        ("--hr-refiner-pass", a.hr_refiner_pass, hires and a.refiner is not None, "the hires fix and --refiner"),
        # a variation seed mixes in nothing at strength 0 (A1111 ignores it there); -1 asks for a random one
        ("--subseed", a.subseed, variation, "a --subseed-strength above 0"),
        # ``cfg``: the run's scale (--cfg, or --from-png's); at 1 the guided prediction is the conditional one
        (
            "--guidance-rescale",
            a.guidance_rescale,
            cfg is None or float(cfg) != 1.0,
            "a --cfg other than 1 (at 1 there is no guidance to rescale)",
        ),
    ]
    for flag, value, used, what in needs:
        if value is not None and not used:
            raise UsageError(f"{flag} has no effect without {what}: drop it, or add what it applies to")
    # (a folder that is not there is its own error, later)
    unused = not a.lora and not a.from_png and not names_loras(a.prompt, a.hr_prompt)
    if a.lora_dir is not None and unused and Path(a.lora_dir).is_dir():
        raise UsageError(
            "--lora-dir is where <lora:NAME> tags and --lora names are looked up: this prompt has no such tag and "
            "no --lora is given, so it would change nothing"
        )
    if a.tiny_vae is not None and a.vae_decode == "full" and a.vae_encode != "tiny":  # once loaded and unused
        raise UsageError(
            "--tiny-vae has no effect with --vae-decode full (and without --vae-encode tiny): drop one of them"
        )


def run(a: argparse.Namespace) -> int:
    from ..metadata import save_png
    from ..pipeline import load_pipeline
    from ..pipeline.request import GenerationRequest, batch_count_seeds

    _setup_logging()
    if a.hr_refiner_pass is not None:  # a bad pass is one line before anything loads
        a.hr_refiner_pass = hr_refiner_pass(a.hr_refiner_pass)
    kwargs: dict[str, Any] = request_defaults()
    chosen: set[str] = set()  # the settings given (flags, --from-png): a model family's defaults leave them be
    model = a.model
    vae = a.vae
    prediction_type = a.prediction_type
    if a.from_png:
        png_kwargs, parsed = _from_png(a.from_png)
        kwargs.update(png_kwargs)
        chosen |= set(png_kwargs)
        if prediction_type is None and parsed.get("Prediction type"):  # an override the image was made with
            prediction_type = parsed["Prediction type"]
            if prediction_type not in PREDICTION_TYPES:
                raise GenerationError(
                    f"{a.from_png}: Prediction type {prediction_type!r} is not one of {', '.join(PREDICTION_TYPES)}"
                )
        vae = _vae_from_png(parsed, a.vae, a.from_png)
        _refiner_from_png(a, parsed)
        _hires_models_from_png(a, parsed)
        if model is None:
            model = _model_from_png(parsed)
            if model is None and parsed.get("Model"):
                raise GenerationError(
                    f"{a.from_png} was made with model {parsed['Model']!r}, which is not a built-in name or a path "
                    "here: give --model"
                )
        if "strength" in png_kwargs and a.init_image is None and not png_kwargs.get("enable_hr"):
            raise GenerationError(
                f"{a.from_png} is an img2img/inpainting image (Denoising strength {png_kwargs['strength']}): give "
                "the same --init-image (and --mask" + (" or --outpaint)" if "Mask blur" in parsed else ")")
            )
        if "Reference images" in parsed and not a.reference_image:  # FLUX.1 Kontext's
            raise GenerationError(
                f"{a.from_png} was made with {parsed['Reference images']} reference image(s) (FLUX.1 Kontext): give "
                "the same --reference-image"
            )
        # A1111 records the blur of inpainting only (outpainting, whose mask --outpaint makes, is inpainting too)
        if "Mask blur" in parsed and a.mask is None and not getattr(a, "outpaint", None):
            raise GenerationError(
                f"{a.from_png} is an inpainting image (Mask blur {parsed['Mask blur']}): give the same --init-image "
                "and --mask (or --outpaint)"
            )
        if parsed.get("TI hashes"):  # without the same embeddings the names would be read as plain words
            from ..text.embeddings import check_recorded_embeddings

            check_recorded_embeddings(parsed["TI hashes"], a.embeddings_dir, str(a.from_png))
    elif a.prompt is None and a.prompts is None:
        raise UsageError("give a PROMPT (or --from-png FILE, or --prompts FILE)")
    model = model or "emoji"

    explicit = {
        "prompt": a.prompt,
        "negative_prompt": a.negative,
        "steps": a.steps,
        "sampler": a.sampler,
        "schedule": a.schedule,
        "cfg_scale": a.cfg,
        "seed": a.seed,
        "width": a.width,
        "height": a.height,
        "batch_size": a.batch,
        "strength": a.strength,
        "clip_skip": a.clip_skip,
        "guidance_rescale": a.guidance_rescale,
        "image_cfg_scale": a.image_cfg_scale,
        "distilled_cfg_scale": a.guidance,
        "mask_blur": a.mask_blur,
        "differential_diffusion": a.differential_diffusion,
        "soft_inpainting": _soft_inpainting_arg(a.soft_inpainting),
        "resize_mode": a.resize_mode,
        "subseed": a.subseed,
        "subseed_strength": a.subseed_strength,
        "noise_source": a.noise_source,
        "strength_rule": a.strength_rule,
        "zero_terminal_snr": a.zero_terminal_snr,
        "pag_scale": a.pag_scale,
        "pag_layers": a.pag_layers,
        "sag_scale": a.sag_scale,
        "sag_blur_sigma": a.sag_blur_sigma,
        "sag_rule": a.sag_rule,
        "shift": a.shift,
        "sd3": _slg_arg(a.slg),
    }
    kwargs.update({k: v for k, v in explicit.items() if v is not None})
    chosen |= {k for k, v in explicit.items() if v is not None}
    if a.pag_layers is not None and not kwargs.get("pag_scale"):
        raise UsageError("--pag-layers has no effect without a --pag-scale above 0: drop it, or add --pag-scale")
    if a.pag_adaptive_scale is not None:  # SD3's: a key of the sd3 settings, beside --slg's (or a PNG's)
        if not kwargs.get("pag_scale"):
            raise UsageError(
                "--pag-adaptive-scale has no effect without a --pag-scale above 0: drop it, or add --pag-scale"
            )
        kwargs["sd3"] = {**(kwargs.get("sd3") or {}), "pag_adaptive_scale": a.pag_adaptive_scale}
        chosen.add("sd3")
    if a.sag_blur_sigma is not None and not kwargs.get("sag_scale"):
        raise UsageError(
            "--sag-blur-sigma has no effect without a --sag-scale other than 0: drop it, or add --sag-scale"
        )
    if a.sag_rule is not None and not kwargs.get("sag_scale"):
        raise UsageError("--sag-rule has no effect without a --sag-scale other than 0: drop it, or add --sag-scale")
    if a.freeu is not None:  # "off" turns a --from-png image's FreeU off
        kwargs["freeu"] = _freeu_arg(a.freeu)
    _apply_deep_shrink_flags(a, kwargs)
    if a.hypertile is not None:  # "off" turns a --from-png image's HyperTile off
        kwargs["hypertile"] = _hypertile_arg(a.hypertile)
    if a.tiled_diffusion is not None:  # MultiDiffusion; "off" turns a --from-png image's off
        kwargs["tiled_diffusion"] = _tiled_diffusion_arg(a.tiled_diffusion)
    if a.hypertile_vae is not None:  # the VAE's (A1111's Hypertile VAE); "off" turns a --from-png image's off
        kwargs["hypertile_vae"] = _hypertile_arg(a.hypertile_vae, "--hypertile-vae", 128)
    for flag, key, value in (
        ("--hypertile-hires-only", "hypertile_hires_only", a.hypertile_hires_only),
        ("--hypertile-rule", "hypertile_rule", a.hypertile_rule),
        ("--hypertile-scale-depth", "hypertile_scale_depth", a.hypertile_scale_depth),
    ):
        if value is not None:
            if kwargs.get("hypertile") is None:
                raise UsageError(f"{flag} has no effect without --hypertile: drop it, or add --hypertile 256,3,3")
            kwargs[key] = value
    for flag, key, value in (
        ("--freeu-version", "freeu_version", a.freeu_version),
        ("--freeu-rule", "freeu_rule", a.freeu_rule),
    ):
        if value is not None:
            if kwargs.get("freeu") is None:
                raise UsageError(f"{flag} has no effect without --freeu: drop it, or add --freeu B1,B2,S1,S2")
            kwargs[key] = value
    if a.sampler is not None and kwargs.get("sampler_options"):  # a --from-png's options are its own sampler's
        # (A1111's UniPC defaults, its Eta, ...): another --sampler keeps only the ones it takes
        from ..diffusion.sampling import resolve, sampler_option_names

        try:
            takes = set(sampler_option_names(resolve(a.sampler, kwargs.get("schedule"))[0]))
        except ValueError:
            takes = None  # the run names the bad sampler
        if takes is not None:
            kept = {k: v for k, v in kwargs["sampler_options"].items() if k in takes}
            kwargs["sampler_options"] = kept or None
    if a.clip_skip is not None:  # --clip-skip has sdengine's meaning (an A1111 image's Clip skip has A1111's)
        kwargs["clip_skip_rule"] = "sdengine"
    hires = {
        "hr_scale": a.hr_scale,
        "hr_upscaler": a.hr_upscaler,
        "hr_second_pass_steps": a.hr_steps,
        "hr_resize_x": a.hr_resize_x,
        "hr_resize_y": a.hr_resize_y,
        "hr_sampler": a.hr_sampler,
        "hr_prompt": a.hr_prompt,
        "hr_negative_prompt": a.hr_negative,
    }
    hires = {k: v for k, v in hires.items() if v is not None}
    if a.hires or hires:  # any --hr-* flag asks for the hires fix
        kwargs.update(hires, enable_hr=True)
    if a.init_image is not None:
        kwargs["init_image"] = a.init_image
    elif not kwargs.get("enable_hr") and a.prompts is None:  # a list's lines may give init images
        kwargs.pop("strength", None)
    if a.mask is not None:
        kwargs["mask"] = a.mask
    if getattr(a, "mask_round", None) is not None:  # A1111's mask_round off
        kwargs["mask_round"] = a.mask_round
    if getattr(a, "latent_mask", None) is not None:  # A1111's latent_mask
        kwargs["latent_mask"] = a.latent_mask
    if a.reference_image:  # FLUX.1 Kontext's reference images
        kwargs["reference_images"] = list(a.reference_image)
    if a.reference_auto_resize is not None:
        kwargs["reference_auto_resize"] = a.reference_auto_resize
    # FLUX.1 Redux: each image a unit of the same encoder, SigLIP encoder and strength; a PNG's made again
    from . import generate_redux

    redux_units = generate_redux.units_from_png(a, parsed) if a.from_png else generate_redux.units_from_cli(a)
    if redux_units:
        kwargs["redux"] = redux_units
    if getattr(a, "control_image", None) is not None:  # FLUX.1 Depth / Canny's control map
        kwargs["control_image"] = a.control_image
    if getattr(a, "control_preprocessor", None) is not None:  # its map made from a photo (canny)
        kwargs["control_preprocessor"] = a.control_preprocessor
    if a.lora:
        kwargs["loras"] = [lora_arg(x) for x in a.lora]
    if a.lora_dir:
        kwargs["lora_dir"] = a.lora_dir
    if a.upscalers_dir:
        kwargs["upscalers_dir"] = a.upscalers_dir
    if a.vae_tiling is not None:
        kwargs["vae_tiling"] = a.vae_tiling
    if a.tiling is not None:
        kwargs["tiling"] = a.tiling
    if a.seed_resize_from is not None:
        m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", a.seed_resize_from)
        if m is None:
            raise UsageError(f"--seed-resize-from {a.seed_resize_from!r}: give WIDTHxHEIGHT in pixels, e.g. 512x768")
        kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"] = int(m.group(1)), int(m.group(2))
    if a.vae_decode is not None:
        kwargs["vae_decode"] = a.vae_decode
    elif a.tiny_vae is not None:
        kwargs["vae_decode"] = "tiny"  # as stable-diffusion.cpp's --taesd: given, it decodes
    if a.vae_encode is not None:
        kwargs["vae_encode"] = a.vae_encode
    sdxl = {"prompt_2": a.prompt_2, "negative_prompt_2": a.negative_2}  # SDXL's second text encoder
    if any(v is not None for v in sdxl.values()):  # over a --from-png's SDXL options, each on its own
        kwargs["sdxl"] = {**(kwargs.get("sdxl") or {}), **{k: v for k, v in sdxl.items() if v is not None}}
    control_thresholds(a)  # the flags checked whatever the run (without --control they would do nothing)
    control_resolutions(a)
    if a.from_png:
        units = _controlnets_from_png(a, parsed, kwargs)
        if units:
            kwargs["controlnets"] = units
            if parsed.get("ControlNet guess mode", "").strip().lower() == "true":  # sdengine's field
                kwargs["guess_mode"] = True
    elif a.control or a.controlnet:
        kwargs["controlnets"] = control_units_from_cli(
            a.control or [],
            a.controlnet or [],
            thresholds=control_thresholds(a),
            processor_res=control_resolutions(a),
        )
    union_modes(a, kwargs)
    control_masks(a, kwargs)
    from . import generate_ip

    if a.from_png is None and (a.ip_adapters_dir is not None or a.clip_vision_dir is not None):
        flag = "--ip-adapters-dir" if a.ip_adapters_dir is not None else "--clip-vision-dir"
        raise UsageError(
            f"{flag} is where --from-png looks up the file a PNG names: it has no effect without --from-png "
            "(--ip-adapter and --clip-vision take a path)"
        )
    ip_units = generate_ip.units_from_png(a, parsed) if a.from_png else generate_ip.units_from_cli(a)
    if ip_units:
        kwargs["ip_adapters"] = ip_units
    if a.no_progress:
        kwargs["progress"] = False
    if a.controlnets_dir is not None and a.from_png is None:  # --controlnet takes a path or a built-in name
        raise UsageError(
            "--controlnets-dir is where --from-png looks up the ControlNet a PNG names: it has no effect without "
            "--from-png (--controlnet takes a file or folder path, or a built-in name)"
        )
    if a.prompts is None:  # a list's lines may give what the flag needs (an init image): checked per line there
        _refuse_flags_without_effect(
            a, bool(kwargs.get("enable_hr")), bool(kwargs.get("subseed_strength")), kwargs.get("cfg_scale")
        )
    if a.prompts is not None:  # a list of requests: sdengine.batch_render
        from .generate_list import run_list

        return run_list(a, kwargs, model, chosen)

    sides = None
    if a.outpaint is not None:
        from ..outpaint import parse_sides

        sides = parse_sides(a.outpaint)
        other = [f for f, v in (("--refiner", a.refiner), ("--hr-checkpoint", a.hr_checkpoint)) if v is not None]
        if other:  # the outpaint runs the model alone (they were dropped without a word)
            raise UsageError(f"--outpaint runs --model alone: drop {', '.join(other)}")
        if a.init_image is None or a.mask is not None or a.width is not None or a.height is not None:
            raise UsageError(
                "--outpaint extends --init-image (the size follows from it): give --init-image, "
                "and no --mask, --width or --height"
            )
        if a.strength is None:
            kwargs["strength"] = 1.0  # the new area starts from the stretched edges: repaint it fully
    sd_up = None
    if getattr(a, "sd_upscale", None) is not None:  # A1111's SD upscale script (sdengine.sd_upscale)
        from ..sd_upscale import parse_sd_upscale

        sd_up = parse_sd_upscale(a.sd_upscale)
        other = [
            f
            for f, v in (("--refiner", a.refiner), ("--hr-checkpoint", a.hr_checkpoint), ("--outpaint", a.outpaint))
            if v is not None
        ]
        if other or a.init_image is None or a.mask is not None:
            raise UsageError(
                "--sd-upscale upscales --init-image in tiles of --width x --height: give --init-image, and no --mask"
                + (f"; drop {', '.join(other)}" if other else "")
            )
        if a.width is not None and a.height is not None and sd_up[1] >= min(a.width, a.height):
            from ..sd_upscale import plan_grid

            plan_grid(a.width, a.height, a.width, a.height, sd_up[1])  # its one line, before the model loads
    elif getattr(a, "upscaler", None) is not None:
        raise UsageError("--upscaler names --sd-upscale's upscaler: give --sd-upscale SCALE[,OVERLAP] too")
    n_iter = 1 if a.n_iter is None else a.n_iter
    if n_iter < 1:
        raise UsageError(f"--n-iter must be a positive number of batches, got {n_iter}")
    batch = int(kwargs.get("batch_size", 1))
    # SD upscale makes one image per --n-iter (its batch size groups the tiles' seeds)
    out, out_is_file = output_target(a.out, 1 if sd_up is not None else batch, n_iter)
    if a.grid and out_is_file:
        raise UsageError(f"--grid writes the batch and its grid into a folder: --out {a.out} names one file")
    if out_is_file:
        _refuse_overwriting_an_input(out, a)
    if n_iter > 1:
        # A1111's batch count: the batches continue one run's seeds, batch k starting at seed + k * batch, or,
        # with variation seeds on (every image keeps the seed), at subseed + k * batch; a random seed (or
        # variation seed) is drawn once, here.
        import secrets

        if kwargs.get("seed") in (None, -1):
            kwargs["seed"] = secrets.randbelow(2**32)
        if kwargs.get("subseed_strength") and kwargs.get("subseed") in (None, -1):
            kwargs["subseed"] = secrets.randbelow(2**32)
    iterations = [dict(kwargs) for _ in range(n_iter)]
    for k, kw in enumerate(iterations[1:], start=1):
        seed, subseed = batch_count_seeds(
            kwargs["seed"], kwargs.get("subseed"), kwargs.get("subseed_strength") or 0.0, batch, k
        )
        kw["seed"] = seed
        if subseed is not None:
            kw["subseed"] = subseed
    if sides is None:
        # Every check that needs no model, before the (slow) load: a bad seed, cfg or prompt weight fails now
        # (the last batch's seeds too).
        GenerationRequest(**iterations[0]).precheck()
        if n_iter > 1:
            GenerationRequest(**iterations[-1]).precheck()
    t0 = time.perf_counter()
    pipe = load_pipeline(
        model,
        device=a.device,
        dtype=a.dtype,
        vae=vae,
        prediction_type=prediction_type,
        config=a.config,
        embeddings_dir=a.embeddings_dir,
        tiny_vae=a.tiny_vae,
        clip_l=a.clip_l,
        clip_g=a.clip_g,
        t5=a.t5,
        weight_dtype=a.weight_dtype,
        qwen_text=a.qwen_text,
        qwen_tokenizer=a.qwen_tokenizer,
    )
    t1 = time.perf_counter()
    # SD3: Euler on its flow grid, cfg 7, 28 steps (diffusers'); Flux: Euler, cfg 1, 28 ([dev]) or 4 ([schnell]) steps
    family = getattr(pipe, "family_defaults", None)
    if family:
        for kw in iterations:
            if "sampler" not in chosen and "schedule" not in chosen:
                kw.update(sampler=family["sampler"], schedule=family["schedule"])
            kw.update({key: family[key] for key in ("cfg_scale", "steps") if key not in chosen})
            if "strength" in family and "strength" not in chosen and kw.get("init_image") is not None:
                kw["strength"] = family["strength"]  # FLUX.1 Fill's 1 (FluxFillPipeline's default)
    refiner: Any = None
    sdxl_base: Any = None
    if a.refiner is not None and sides is None:  # SDXL base -> refiner hand-off
        from ..pipeline.sdxl import SDXLPipeline

        refiner = load_pipeline(a.refiner, device=a.device, dtype=a.dtype, vae=a.vae, weight_dtype=a.weight_dtype)
        if not isinstance(pipe, SDXLPipeline) or not isinstance(refiner, SDXLPipeline):
            raise UsageError("--refiner hands an SDXL base model's run to an SDXL refiner: both must be SDXL")
        sdxl_base = pipe
    hr_model: Any = None
    if a.hr_checkpoint is not None and sides is None:  # the hires fix's second pass on another model (A1111's)
        hr_model = load_pipeline(
            a.hr_checkpoint, device=a.device, dtype=a.dtype, vae=a.vae, weight_dtype=a.weight_dtype
        )

    def make(kw: dict[str, Any]) -> Any:
        prompt = kw.pop("prompt", "")
        if sd_up is not None:
            from ..sd_upscale import sd_upscale

            size = int(getattr(pipe, "default_size", 512))
            return sd_upscale(
                pipe,
                kw.pop("init_image"),
                prompt,
                width=kw.pop("width", None) or size,
                height=kw.pop("height", None) or size,
                scale=sd_up[0],
                overlap=sd_up[1],
                upscaler=a.upscaler or "Lanczos",
                upscalers_dir=kw.pop("upscalers_dir", None),
                batch_size=int(kw.pop("batch_size", 1)),
                n_iter=n_iter,
                **kw,
            )
        if sides is not None:
            from ..outpaint import outpaint

            image = kw.pop("init_image")
            for key in ("width", "height", "mask"):  # the canvas decides them (a --from-png may carry a size)
                kw.pop(key, None)
            return outpaint(pipe, prompt, image, *sides, **kw)
        if sdxl_base is not None:
            switch_at = 0.8 if a.refiner_switch_at is None else a.refiner_switch_at
            hires_pass = hr_refiner_pass(a.hr_refiner_pass or "second pass")
            rule = getattr(a, "refiner_switch_rule", "diffusers")  # --from-png's recorded rule
            return sdxl_base.generate_with_refiner(
                refiner, prompt, switch_at=switch_at, switch_rule=rule, hires_pass=hires_pass, hr_model=hr_model, **kw
            )
        if hr_model is None:  # the plain call: every pipeline (DDPM ones too) takes it
            return pipe(GenerationRequest(prompt=prompt, **kw))
        return pipe(GenerationRequest(prompt=prompt, **kw), hr_model=hr_model)

    index = next_index(out) if out.is_dir() else 0
    images: list[Any] = []
    first: Any = None
    for kw in iterations[:1] if sd_up is not None else iterations:  # SD upscale: its n_iter upscales in one call
        result = make(kw)
        if first is None:
            first = result
        # each batch is written as soon as it exists: an interrupted --n-iter run keeps what it made
        for image, text, seed in zip(result.images, result.infotexts, result.seeds, strict=True):
            path = save_png(image, out if out_is_file else out / f"{index + len(images):05d}-{seed}.png", text)
            images.append(image)
            print(path, flush=True)
    t2 = time.perf_counter()
    if a.grid:
        from ..grids import batch_grid

        # numbered like the run's first image, so grid and images of one run share a number; the grid holds
        # every batch's images and carries the first image's parameters (as A1111's grid does).
        grid_path = save_png(batch_grid(images), out / f"grid-{index:05d}.png", first.infotexts[0])
        print(grid_path)
    print(
        f"{len(images)} image(s) in {t2 - t1:.1f} s (model loaded in {t1 - t0:.1f} s), seed {first.seeds[0]}",
        file=sys.stderr,
    )
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "generate",
        help="text-to-image, img2img and inpainting; PNGs with A1111 parameters",
        description="Generate images with a Stable Diffusion model (diffusers folder, .safetensors/.ckpt file or "
        "a built-in name). Each PNG carries its parameters in A1111's format; --from-png makes it again.",
    )
    p.add_argument(
        "prompt", nargs="?", default=None, help="the prompt (A1111 syntax: (word:1.2), [word], BREAK, <lora:NAME:W>)"
    )
    p.add_argument("--model", default=None, help="model folder, file or built-in name (default: emoji)")
    p.add_argument("--negative", default=None, help="negative prompt")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"sampling steps (default {HELP_DEFAULTS['steps']}; SD3 and FLUX.1 [dev]: 28, [schnell]: 4)",
    )
    p.add_argument(
        "--sampler",
        default=None,
        help=f"sampler, ours or A1111's name (default {HELP_DEFAULTS['sampler']}; SD3, Flux: euler on the normal "
        "flow schedule)",
    )
    p.add_argument(
        "--schedule",
        default=None,
        help="normal, karras, exponential, sgm_uniform, simple, ddim_uniform, beta, kl_optimal, align_your_steps, "
        "align_your_steps_sdxl, uniform, polyexponential, linear_quadratic, or A1111's names "
        "(default auto: the one the sampler's name says, else karras where the sampler takes it, "
        "else the sampler's own)",
    )
    p.add_argument(
        "--cfg",
        type=float,
        default=None,
        help=f"classifier-free guidance scale in [0, 100] (default {HELP_DEFAULTS['cfg_scale']:g}; SD3: 7; Flux: 1, "
        "see --guidance)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="seed of the first image, 0 to 2**64 - 1 (torch keeps its low 32 bits: seeds equal modulo 2**32 draw "
        "the same noise, but the SDE samplers' Brownian trees under A1111's rules take the whole seed); "
        "-1 = random (default)",
    )
    p.add_argument(
        "--subseed",
        type=int,
        default=None,
        metavar="N",
        help="variation seed (A1111's): every image keeps --seed's noise and image i mixes in N+i's; -1 = random",
    )
    p.add_argument(
        "--subseed-strength",
        type=float,
        default=None,
        metavar="S",
        help="how far towards the variation seed's image, in [0, 1] (default 0: none)",
    )
    p.add_argument(
        "--noise-source",
        choices=("cpu", "nv"),
        default=None,
        help="where the noise comes from (A1111's randn_source): cpu (default) torch's CPU generator, A1111's CPU; "
        "nv NVIDIA's numbers (torch.randn on CUDA) on any device, A1111's NV and its default GPU on NVIDIA cards",
    )
    p.add_argument(
        "--width",
        type=int,
        default=None,
        help="default: the model's training size (emoji 64, SD 1.x 512, SD 2.x-v 768); at most 8x that, 8192",
    )
    p.add_argument("--height", type=int, default=None)
    p.add_argument(
        "--batch",
        "--batch-size",
        dest="batch",
        type=int,
        default=None,
        help="images made together, seeds SEED, SEED+1, ... (default 1; A1111's batch size)",
    )
    p.add_argument(
        "--n-iter",
        "--batch-count",
        dest="n_iter",
        type=int,
        default=None,
        metavar="N",
        help="batches made one after another, seeds continuing (A1111's batch count; default 1): "
        "N x --batch images in the memory of one batch",
    )
    p.add_argument("--init-image", default=None, help="img2img / inpainting source image")
    p.add_argument(
        "--reference-image",
        action="append",
        default=None,
        metavar="FILE",
        help="FLUX.1 Kontext: a reference image to edit or take from (repeat for several, up to 4); put at the "
        "Kontext resolution of its aspect ratio unless --no-reference-resize; the output takes the first one's "
        "size unless --width/--height. Qwen-Image-Edit: the one image to edit (fitted to about 1024x1024 at its "
        "aspect ratio, which the output takes unless --width/--height)",
    )
    p.add_argument(
        "--redux-image",
        action="append",
        default=None,
        metavar="FILE",
        help="FLUX.1 Redux: an image whose SigLIP tokens join the prompt's (repeat for several); needs --redux-model",
    )
    p.add_argument(
        "--redux-model",
        default=None,
        metavar="PATH",
        help="FLUX.1 Redux's image encoder: flux1-redux-dev.safetensors (with --redux-siglip) or a FLUX.1-Redux-dev "
        "diffusers folder (its image_encoder/ is the SigLIP encoder)",
    )
    p.add_argument(
        "--redux-siglip",
        default=None,
        metavar="PATH",
        help="the SigLIP encoder of --redux-image: sigclip_vision_patch14_384.safetensors or a transformers folder",
    )
    p.add_argument(
        "--redux-strength",
        type=float,
        default=None,
        metavar="S",
        help="the factor on the Redux image tokens, 0 to 10 (default 1; ComfyUI's StyleModelApply multiply)",
    )
    p.add_argument(
        "--no-reference-resize",
        dest="reference_auto_resize",
        action="store_const",
        const=False,
        default=None,
        help="keep each --reference-image at its own size (sides floored to multiples of 16), not a Kontext resolution",
    )
    p.add_argument(
        "--strength",
        type=float,
        default=None,
        help=f"img2img (and hires second-pass) denoising strength in (0, 1] ({HELP_DEFAULTS['strength']:g})",
    )
    p.add_argument(
        "--strength-rule",
        choices=("diffusers", "a1111", "a1111_fix_steps"),
        default=None,
        help="how --strength counts img2img steps: diffusers' int(steps * strength) (default) or A1111's "
        "int(min(strength, 0.999) * steps) + 1 (the hires pass: the last --hr-steps of a longer schedule; DDIM and "
        "PLMS: A1111's own grid, txt2img too); "
        "a1111_fix_steps: A1111's img2img_fix_steps, img2img runs --steps steps of a longer schedule too",
    )
    p.add_argument(
        "--hires",
        action="store_true",
        help="A1111's hires fix: txt2img at --width x --height, upscale, then an img2img pass at --strength "
        "(any --hr-* flag turns it on; default scale 2, upscaler Latent)",
    )
    p.add_argument("--hr-scale", type=float, default=None, metavar="X", help="hires upscale factor (default 2)")
    p.add_argument(
        "--hr-upscaler",
        default=None,
        metavar="NAME",
        help="Latent (default), 'Latent (antialiased)', 'Latent (bicubic)', 'Latent (bicubic antialiased)', "
        "'Latent (nearest)', 'Latent (nearest-exact)', None / Lanczos (pixel Lanczos resize, then encode), or an "
        "upscaler model (ESRGAN, Real-ESRGAN) of --upscalers-dir",
    )
    p.add_argument("--hr-steps", type=int, default=None, metavar="N", help="second-pass steps (default 0 = --steps)")
    p.add_argument(
        "--hr-resize-x",
        type=int,
        default=None,
        metavar="W",
        help="hires width instead of --hr-scale (one side keeps the aspect ratio; both: cover, then cut the centre)",
    )
    p.add_argument(
        "--hr-checkpoint",
        default=None,
        metavar="MODEL",
        help="the hires fix's second pass on this model (A1111's hr_checkpoint_name; default: --model, or "
        "--from-png's)",
    )
    p.add_argument("--hr-resize-y", type=int, default=None, metavar="H", help="hires height instead of --hr-scale")
    p.add_argument("--hr-sampler", default=None, metavar="NAME", help="second-pass sampler (default: --sampler)")
    p.add_argument("--hr-prompt", default=None, metavar="TEXT", help="second-pass prompt (default: the prompt)")
    p.add_argument(
        "--hr-negative", default=None, metavar="TEXT", help="second-pass negative prompt (default: --negative)"
    )
    p.add_argument("--mask", default=None, help="inpainting mask, white = repaint")
    p.add_argument("--mask-blur", type=float, default=None, help="mask blur in pixels, 0 to 256 (default 0)")
    p.add_argument(
        "--differential-diffusion",
        type=float,
        nargs="?",
        const=1.0,
        default=None,
        metavar="STRENGTH",
        help="soft inpainting (Differential Diffusion, ComfyUI's node): the --mask's grey levels say how much each "
        "pixel may change (black kept, white repainted, grey in between); STRENGTH in [0, 1], default 1, 0 = off",
    )
    p.add_argument(
        "--soft-inpainting",
        nargs="?",
        const="",
        default=None,
        metavar="SETTINGS",
        help="A1111's Soft Inpainting with the grey --mask: the blend of each step's latents by a sigma-dependent "
        "mask and the result laid over the init image where it changed little; SETTINGS up to six numbers in "
        "A1111's order (schedule bias, preservation strength, transition contrast boost, mask influence, difference "
        "threshold, difference contrast) or NAME=VALUE pairs, default A1111's 1,0.5,4,0,0.5,2",
    )
    p.add_argument(
        "--no-mask-round",
        dest="mask_round",
        action="store_const",
        const=False,
        default=None,
        help="A1111's mask_round off (with --mask and --strength-rule a1111): the latent mask the steps blend by, and "
        "an inpainting model's mask input, stay grey instead of rounded to 0 / 1",
    )
    p.add_argument(
        "--latent-mask",
        default=None,
        metavar="FILE",
        help="A1111's latent_mask (with --mask and --strength-rule a1111): a separate mask (white = repaint, any size, "
        "not blurred or fitted) that the latent mask is shrunk from in place of --mask's",
    )
    p.add_argument(
        "--resize-mode",
        default=None,
        metavar="MODE",
        help="how an init or control image of another size is fitted: 'just resize' (default, "
        "stretches), 'crop and resize' (fills, cuts the overhang), 'resize and fill' (fits, repeats the "
        "edges); or A1111's 0, 1, 2",
    )
    p.add_argument(
        "--outpaint",
        default=None,
        metavar="L,R,T,B",
        help="extend --init-image by these pixels left, right, top, bottom (one number: all sides) "
        "and fill the new area; the new size must be a multiple of 8",
    )
    p.add_argument(
        "--sd-upscale",
        default=None,
        metavar="SCALE[,OVERLAP]",
        help="A1111's SD upscale script: --init-image upscaled by SCALE (--upscaler), cut into tiles of --width x "
        "--height overlapping by OVERLAP pixels (default 64), each tile img2img'd, blended back (docs/sd-upscale.md)",
    )
    p.add_argument(
        "--upscaler",
        default=None,
        metavar="NAME",
        help="--sd-upscale's upscaler: Lanczos (default), None (no upscale: the image tiled as it is), or an "
        "upscaler model of --upscalers-dir",
    )
    p.add_argument(
        "--control",
        action="append",
        default=None,
        metavar="TYPE:IMAGE[:WEIGHT[:START:END]]",
        help="a ControlNet input (repeatable; pairs with --controlnet in order); TYPE reference_only, "
        "reference_adain or reference_adain+attn: a reference image, no --controlnet (docs/controlnet.md)",
    )
    p.add_argument("--controlnet", action="append", default=None, metavar="MODEL", help="a ControlNet model")
    p.add_argument(
        "--control-image",
        default=None,
        metavar="IMAGE",
        help="a FLUX.1 Depth / Canny model's control map (a depth map or canny edges, used as given; docs/flux.md)",
    )
    p.add_argument(
        "--control-preprocessor",
        default=None,
        metavar="NAME",
        help="what makes the FLUX.1 Depth / Canny map from --control-image: none (the image is the map; default) or "
        "canny (Canny edges of a photo, thresholds 100 / 200); depth needs a network sdengine does not have",
    )
    p.add_argument(
        "--control-union-mode",
        action="append",
        default=None,
        metavar="MODE",
        help="a Flux Union ControlNet's control kind (canny, tile, depth, blur, pose, gray, lq or a number), one "
        "per --control in order; none for a unit that is not a Union (docs/controlnet.md)",
    )
    p.add_argument(
        "--control-mask",
        action="append",
        default=None,
        metavar="IMAGE",
        help="an SD3 / Qwen-Image inpainting ControlNet's mask (white = repaint; its --control image is the picture "
        "to inpaint), one per --control in order; none for a unit that takes no mask (docs/controlnet.md)",
    )
    p.add_argument(
        "--control-inpaint-image",
        action="append",
        default=None,
        metavar="IMAGE",
        help="a Z-Image inpainting ControlNet's picture to inpaint (with --control-mask; its --control image stays "
        "the control map), one per --control in order; none for the others (docs/z-image.md)",
    )
    for slider, what in (
        ("a", "canny's low threshold, threshold's and scribble's threshold, softedge's blur"),
        ("b", "canny's high threshold"),
    ):
        p.add_argument(
            f"--control-threshold-{slider}",
            action="append",
            type=float,
            default=None,
            metavar="VALUE",
            help=f"the preprocessor's threshold {slider.upper()} (A1111's slider: {what}); one for all --control, "
            "or one per --control in order; -1: the default",
        )
    p.add_argument(
        "--control-res",
        action="append",
        type=int,
        default=None,
        metavar="N",
        help="the short side in pixels (64 to 2048) a --control image is scaled to before its preprocessor "
        "(A1111's 'Preprocessor Resolution'; canny, scribble, threshold, softedge); one for all --control, or one "
        "per --control in order; -1 or none: the image as it is (a --from-png's recorded one)",
    )
    p.add_argument(
        "--controlnets-dir",
        default=None,
        metavar="FOLDER",
        help="where --from-png looks up the ControlNet a PNG names (built-in names need none)",
    )
    from . import generate_ip

    generate_ip.register(p)
    p.add_argument(
        "--lora",
        action="append",
        default=None,
        metavar="FILE[:WEIGHT[:UNET_WEIGHT]]",
        help="a LoRA (repeatable); two weights: the text encoder's, the U-Net's",
    )
    p.add_argument("--lora-dir", default=None, help="where <lora:NAME> tags are looked up")
    p.add_argument(
        "--upscalers-dir",
        default=None,
        metavar="DIR",
        help="folder of upscaler models (ESRGAN, Real-ESRGAN .pth / .safetensors) --hr-upscaler may name",
    )
    p.add_argument(
        "--embeddings-dir",
        default=None,
        metavar="FOLDER",
        help="textual-inversion embeddings (.pt, .bin, .safetensors), used by file name in the prompts",
    )
    p.add_argument(
        "--clip-skip",
        type=int,
        default=None,
        help="clip skip in sdengine's numbering (1 = the last layer; SDXL: both encoders, 1 = their own "
        "penultimate layer, 0 = the last); CLIP models only (emoji's MiniLM takes 1). A --from-png A1111 "
        "image's Clip skip is A1111's instead (SD 1.x only)",
    )
    p.add_argument("--guidance-rescale", type=float, default=None, help="CFG rescale phi in [0, 1]")
    p.add_argument(
        "--guidance",
        type=float,
        default=None,
        metavar="G",
        help="FLUX.1 [dev] and FLUX.2 [dev]: the distilled guidance scale, an input of the model (default 3.5; 4 for "
        "FLUX.2 [dev]; Forge's 'Distilled CFG Scale', its infotext name); Flux runs at --cfg 1 by default (one pass "
        "per step, no negative prompt)",
    )
    p.add_argument(
        "--image-cfg-scale",
        type=float,
        default=None,
        help="an instruct-pix2pix model's image guidance (needs --init-image): uncond + cfg (cond - image_cond) + "
        "this (image_cond - uncond); default 1.5 (diffusers'), 1 under --strength-rule a1111. Infotext 'Image CFG "
        "scale' (A1111's)",
    )
    p.add_argument(
        "--pag-scale",
        type=float,
        default=None,
        help="perturbed-attention guidance scale (Ahn et al. 2024; 0 = off, about 3 is usual): one more U-Net pass "
        "per step with the identity attention map in --pag-layers",
    )
    p.add_argument(
        "--pag-layers",
        default=None,
        metavar="LAYERS",
        help="the self-attention layers PAG perturbs: comma-separated patterns searched in the U-Net's layer names, "
        "as diffusers' pag_applied_layers (default 'mid', the middle block; e.g. 'mid,up_blocks.1'); on SD3 the "
        "MMDiT's joint-attention layers (default 'blocks.1', diffusers'; e.g. '13')",
    )
    p.add_argument(
        "--pag-adaptive-scale",
        type=float,
        default=None,
        metavar="A",
        help="SD3: PAG's scale falls with the step, max(0, pag_scale - A (1000 - t)) at timestep t (diffusers' "
        "pag_adaptive_scale, in [0, 1]; default 0: the same scale at every step); the sd3 setting pag_adaptive_scale",
    )
    p.add_argument(
        "--sag-scale",
        type=float,
        default=None,
        help="self-attention guidance scale (Hong et al. 2023; 0 = off, diffusers' example 0.75, in [-10, 10]): one "
        "more U-Net pass per step on the x0 estimate blurred where the middle block's self-attention looks most",
    )
    p.add_argument(
        "--sag-blur-sigma",
        type=float,
        default=None,
        metavar="SIGMA",
        help="the standard deviation of SAG's 9x9 Gaussian blur, in (0, 10] (default 1, diffusers'; ComfyUI's node "
        "uses 2)",
    )
    p.add_argument(
        "--sag-rule",
        choices=("diffusers", "comfyui"),
        default=None,
        help="where SAG's term goes: 'diffusers' (default; its pipeline: in the network's output space, before "
        "--guidance-rescale) or 'comfyui' (ComfyUI's node and Forge's script: the unconditional rows even at cfg 1, "
        "the term in x0 after the rescale, skipped on a latent of a side 4 or less)",
    )
    p.add_argument(
        "--freeu",
        default=None,
        metavar="B1,B2,S1,S2",
        help="FreeU (Si et al. 2023): backbone factors B1, B2 and skip factors S1, S2 (each in [0, 10]) on the "
        "decoder's skip concatenations, or a preset: sd1 (1.5,1.6,0.9,0.2), sd2 (1.4,1.6,0.9,0.2), sdxl "
        "(1.3,1.4,0.9,0.2); off turns a --from-png image's off",
    )
    p.add_argument(
        "--freeu-version",
        type=int,
        choices=(1, 2),
        default=None,
        help="FreeU's backbone scaling: 2 (default; ComfyUI's FreeU_V2, Forge's: scaled by the hidden state's "
        "normalised mean) or 1 (ComfyUI's FreeU, diffusers' enable_freeu: the factor as it is)",
    )
    p.add_argument(
        "--freeu-rule",
        choices=("width", "diffusers"),
        default=None,
        help="which concatenations FreeU changes: width (default; 4x / 2x the first level's channels: the authors', "
        "ComfyUI's, Forge's) or diffusers (its first and second up block, as enable_freeu)",
    )
    p.add_argument(
        "--deep-shrink",
        default=None,
        metavar="BLOCK,FACTOR[,START,END]",
        help="Deep Shrink (kohya-ss's high-resolution fix; ComfyUI's PatchModelAddDownscale, Forge's Kohya HRFix): "
        "the U-Net's hidden state after input block BLOCK (ComfyUI's numbering: 3 is the first downsample) divided "
        "by FACTOR in [0.1, 9] while the sampling is between START and END (fractions of it; default 0,0.35); off "
        "turns a --from-png image's off",
    )
    p.add_argument(
        "--deep-shrink-skip",
        choices=("after", "before"),
        default=None,
        help="Deep Shrink resizes the block's output after it is kept for its skip connection (default) or before",
    )
    p.add_argument(
        "--deep-shrink-method",
        default=None,
        metavar="METHOD[,UP]",
        help="Deep Shrink's resize methods, down then up (one name: both): bicubic (default), nearest-exact, "
        "bilinear, area, bislerp",
    )
    p.add_argument(
        "--hypertile",
        default=None,
        metavar="TILE[,SWAP[,DEPTH]]",
        help="HyperTile (A1111's Hypertile U-Net, ComfyUI's HyperTile): the U-Net's self-attention within tiles; "
        "TILE the tile size in pixels (A1111's max tile size, 0-2048), SWAP how many tile counts to draw from "
        "(0-128), DEPTH the deepest layers tiled (0-10); left out: A1111's 256, 3, 3; on = 256,3,3; off turns a "
        "--from-png image's off",
    )
    p.add_argument(
        "--tiled-diffusion",
        default=None,
        metavar="WINDOW[xHEIGHT],STRIDE[,circular][,batch=N]",
        help="MultiDiffusion (docs/multidiffusion.md): the latent denoised as overlapping windows whose predictions "
        "are averaged at every step; WINDOW (and HEIGHT) and STRIDE in latent cells (8 pixels for SD), circular "
        "wraps the views around the left and right edges (a 360-degree panorama), batch=N views per U-Net call; "
        "on = 64,8 (diffusers' panorama pipeline); off turns a --from-png image's off",
    )
    p.add_argument(
        "--hypertile-vae",
        default=None,
        metavar="TILE[,SWAP[,DEPTH]]",
        help="HyperTile on the VAE (A1111's Hypertile VAE): the VAE decoder's middle-block attention within tiles; "
        "TILE, SWAP, DEPTH as --hypertile's (A1111's rule; its one layer is depth 0); left out: A1111's 128, 3, 3; "
        "on = 128,3,3; off turns a --from-png image's off",
    )
    p.add_argument(
        "--hypertile-hires-only",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="HyperTile on the hires fix's second pass only (A1111's hypertile_enable_unet_secondpass)",
    )
    p.add_argument(
        "--hypertile-rule",
        choices=("a1111", "comfyui"),
        default=None,
        help="how HyperTile picks tiles and depths: a1111 (default; the tile capped by the image's power-of-two "
        "divisor, at least 128 px) or comfyui (its HyperTile node: at least 32 px, depth by resolution)",
    )
    p.add_argument(
        "--hypertile-scale-depth",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="HyperTile's smallest tile doubles with each depth (default on, as A1111; ComfyUI's node: off)",
    )
    p.add_argument(
        "--zero-terminal-snr",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="A1111's 'Noise schedule for sampling: Zero Terminal SNR': the model's schedule rescaled to zero "
        "terminal SNR for this run (for models trained so, usually v-prediction: see --prediction-type); written to "
        "the PNG as 'Noise Schedule: Zero Terminal SNR' and read back by --from-png",
    )
    p.add_argument(
        "--vae",
        default=None,
        help="another VAE: an A1111 .vae.pt/.vae.safetensors, a .safetensors, or a diffusers VAE folder",
    )
    p.add_argument(
        "--config",
        default=None,
        help="a single file's config: an LDM .yaml or a diffusers folder (default: MODEL.yaml beside the file)",
    )
    p.add_argument(
        "--clip-l",
        default=None,
        metavar="FILE",
        help="SD3, Flux: the CLIP-L text encoder (ComfyUI's clip_l.safetensors or a text_encoder/ folder), for a "
        "model file without it or in place of its own",
    )
    p.add_argument(
        "--clip-g",
        default=None,
        metavar="FILE",
        help="SD3: the OpenCLIP bigG text encoder (ComfyUI's clip_g.safetensors or a text_encoder_2/ folder)",
    )
    p.add_argument(
        "--t5",
        default=None,
        metavar="FILE",
        help="SD3, Flux: the T5-XXL text encoder (t5xxl_fp16.safetensors, a text_encoder_3/ or text_encoder_2/ "
        "folder); without one an SD3 model that has none runs with zeros in T5's place (Flux needs it)",
    )
    p.add_argument(
        "--qwen-text",
        default=None,
        metavar="FILE",
        help="Qwen-Image: the Qwen2.5-VL text encoder (ComfyUI's qwen_2.5_vl_7b.safetensors, or a folder), for a "
        "diffusion-model file (qwen_image_*.safetensors; its VAE: --vae) or in place of a folder's; Z-Image, FLUX.2 "
        "[klein]: Qwen3 (qwen_3_4b.safetensors); FLUX.2 [dev]: Mistral Small 3 "
        "(mistral_3_small_flux2_bf16.safetensors)",
    )
    p.add_argument(
        "--qwen-tokenizer",
        default=None,
        metavar="DIR",
        help="Qwen-Image: Qwen2's tokenizer folder (Qwen-Image's tokenizer/, ComfyUI's "
        "comfy/text_encoders/qwen25_tokenizer); default: one beside --qwen-text (sdengine ships no Qwen2 vocabulary); "
        "FLUX.2 [dev]: Mistral's (FLUX.2-dev's tokenizer/; default: the one ComfyUI's Mistral file carries)",
    )
    p.add_argument(
        "--weight-dtype",
        default="default",
        choices=("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"),  # nn/fp8_storage.WEIGHT_DTYPES (no torch)
        help="the diffusion network's Linear/Conv2d weights held in fp8 and cast to --dtype at each use, as "
        "ComfyUI's UNETLoader weight_dtype (about half the memory of fp16/bf16 weights; _fast runs as storage "
        "alone here), see docs/fp8-storage.md",
    )
    p.add_argument(
        "--shift",
        type=float,
        default=None,
        metavar="F",
        help="SD3: the flow schedule's time shift (default: the model's, 3.0); written to the PNG as 'Shift'",
    )
    p.add_argument(
        "--slg",
        default=None,
        metavar="LAYERS[:SCALE[:START:STOP]]",
        help="SD3.5: skip-layer guidance on these joint blocks (e.g. 7,8,9, Stability's for SD3.5 Medium), scale "
        "(default 2.8), from START to STOP as fractions of the steps (default 0.01:0.2); diffusers' "
        "skip_guidance_layers; written to the PNG and read back by --from-png",
    )
    p.add_argument("--prompt-2", default=None, help="SDXL: the prompt of the second text encoder (default: the prompt)")
    p.add_argument("--negative-2", default=None, help="SDXL: the second encoder's negative prompt")
    p.add_argument("--refiner", default=None, metavar="MODEL", help="SDXL: a refiner that takes over the last steps")
    p.add_argument(
        "--refiner-switch-at",
        type=float,
        default=None,
        metavar="F",
        help="SDXL: fraction of the steps the base model runs before the refiner (default 0.8, or --from-png's)",
    )
    p.add_argument(
        "--hr-refiner-pass",
        default=None,
        metavar="PASS",
        help="SDXL with --hires and --refiner: the pass that hands off, first, second (default) or both (A1111's "
        "hires_fix_refiner_pass), or --from-png's",
    )
    p.add_argument(
        "--tiny-vae",
        "--taesd",
        default=None,
        metavar="FILE",
        help="decode with a tiny VAE: a TAESD taesd_decoder .safetensors/.pth or an AutoencoderTiny folder "
        "(~10x cheaper than the VAE, a little softer)",
    )
    p.add_argument(
        "--vae-decode",
        choices=["full", "tiny"],
        default=None,
        help="full = the model's VAE; tiny = its tiny VAE (the model folder's vae_tiny/ or --tiny-vae); "
        "default: tiny when --tiny-vae is given, else full",
    )
    p.add_argument(
        "--vae-encode",
        choices=["full", "tiny"],
        default=None,
        help="how --init-image (and the hires fix's pixel upscale) becomes latents: full = the VAE's encoder "
        "(default); tiny = the tiny VAE's encoder (it needs one: taesd_encoder beside taesd_decoder)",
    )
    p.add_argument(
        "--tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="seamless tiling image (A1111's Tiling: the U-Net's and the VAE's convolutions pad circularly)",
    )
    p.add_argument(
        "--seed-resize-from",
        default=None,
        metavar="WxH",
        help="A1111's 'Resize seed from width/height': draw the seed's noise at WxH pixels and paste it centred "
        "into this size's noise, so a seed keeps its composition at another size (0x0: off)",
    )
    p.add_argument(
        "--vae-tiling",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="decode/encode the VAE in tiles (default: automatic for large images)",
    )
    p.add_argument("--prediction-type", choices=list(PREDICTION_TYPES), default=None)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="default fp16 on cuda/mps, fp32 on cpu"
    )
    p.add_argument(
        "--out",
        default="outputs",
        help="output folder, or the file for one image when it ends in .png (default outputs)",
    )
    p.add_argument(
        "--from-png",
        default=None,
        metavar="FILE",
        help="regenerate the image whose parameters FILE carries (flags given here override them)",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="also write the batch as one picture grid-NNNNN.png "
        "(ceil(sqrt(n)) columns) carrying the first image's parameters",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="render a list: FILE.txt (one prompt per line) or FILE.jsonl (one request per line); image of line L "
        "is OUT/(L-1)-SEED.png with seed --seed (default 0) + L-1 unless the line sets one; existing files are "
        "skipped; under torchrun the lines are shared out over the ranks",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
