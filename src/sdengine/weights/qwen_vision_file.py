"""Qwen2.5-VL's vision tower from a text-encoder file or folder (Qwen-Image-Edit's ``text_encoder/``) ->
:class:`~sdengine.models.qwen_vision.QwenVisionTower`.

The tensors are the ``Qwen2_5_VLForConditionalGeneration`` file's vision ones: behind ``model.visual.``
(transformers 5 and 4.52+) or ``visual.`` (older files, Qwen-Image-Edit's own and ComfyUI's
``qwen_2.5_vl_7b*.safetensors``); everything else (the language model, the LM head) is left unread. A folder's
``config.json`` gives the architecture (its ``vision_config``); a single file's comes from the shapes: width,
depth, MLP width, patch and output width are in them, the rest (16 heads, full attention at blocks 7, 15, 23 and
31 (those a shallower tower has, as ComfyUI's fixed list reads them), 112-pixel windows, 2x2 merge, temporal patch
2) is every Qwen2.5-VL release's vision tower. ComfyUI's scaled fp8 files are read as
:mod:`sdengine.weights.qwen_text_file` reads them. A file without the tower, a missing or unexpected tensor or a
shape that does not fit is one :class:`QwenVisionFileError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_vision import QwenVisionConfig, QwenVisionTower
from sdengine.nn.meta_init import skip_meta_init

from .encoder_files import (
    SCALED_FP8_MARKER,
    TensorSource,
    check_scales_used,
    compute_dtype,
    encoder_tensors,
    scaled_weight,
    split_scales,
)
from .io import WeightsError
from .qwen_text_file import qwen_text_folder

PREFIXES = ("model.visual.", "visual.")
RELEASE_HEADS = 16  # every Qwen2.5-VL release's vision tower: 1280 wide, 16 heads of 80
RELEASE_FULL_ATTENTION = (7, 15, 23, 31)  # its full-attention blocks; a shallower tower keeps those it has (ComfyUI)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class QwenVisionFileError(WeightsError):
    """A file or folder without a Qwen2.5-VL vision tower sdengine can load, or one whose tensors do not fit."""


def select_vision_names(names: list[str], where: str) -> dict[str, str]:
    """{tower name: file name} of the vision tensors (``model.visual.*`` or ``visual.*``)."""
    for prefix in PREFIXES:
        chosen = {n[len(prefix) :]: n for n in names if n.startswith(prefix)}
        if chosen:
            return chosen
    raise QwenVisionFileError(
        f"{where}: no Qwen2.5-VL vision tower (no model.visual.* or visual.* tensors): Qwen-Image-Edit reads the input "
        "image with it; give the full Qwen2.5-VL text encoder"
    )


def config_from_shapes(shapes: dict[str, tuple[int, ...]], where: str) -> QwenVisionConfig:
    def shape(key: str, ndim: int) -> tuple[int, ...]:
        s = shapes.get(key)
        if s is None or len(s) != ndim:
            raise QwenVisionFileError(f"{where}: Qwen vision tower without a {ndim}-d {key}")
        return s

    hidden, chans, temporal, patch, _ = shape("patch_embed.proj.weight", 5)
    depth = len({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    inter = shape("blocks.0.mlp.gate_proj.weight", 2)[0]
    out = shape("merger.mlp.2.weight", 2)[0]
    try:
        return QwenVisionConfig(
            depth=depth,
            hidden_size=hidden,
            intermediate_size=inter,
            num_heads=RELEASE_HEADS,
            in_channels=chans,
            patch_size=patch,
            temporal_patch_size=temporal,
            out_hidden_size=out,
            fullatt_block_indexes=tuple(i for i in RELEASE_FULL_ATTENTION if i < depth),
        )
    except ConfigError as e:
        raise QwenVisionFileError(f"{where}: {e} (a single file's vision config is read from its shapes)") from None


def processor_limits(folder: Path, config: QwenVisionConfig) -> tuple[int, int]:
    """(min_pixels, max_pixels) of a ``processor/`` folder's ``preprocessor_config.json`` (transformers'
    ``Qwen2VLImageProcessor``: ``size``'s ``shortest_edge`` / ``longest_edge``, overridden by ``min_pixels`` /
    ``max_pixels`` as transformers reads them); the processor's defaults when the folder has none. A config whose
    patch sizes, normalisation or resampling differ from what sdengine runs is one line."""
    import json

    from sdengine.models.clip_vision import CLIP_MEAN, CLIP_STD
    from sdengine.models.qwen_vision import MAX_PIXELS, MIN_PIXELS

    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return MIN_PIXELS, MAX_PIXELS
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QwenVisionFileError(f"{path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise QwenVisionFileError(f"{path}: not a JSON object")
    got_size = data.get("size")
    size: dict[str, Any] = got_size if isinstance(got_size, dict) else {}
    lo = data.get("min_pixels", size.get("shortest_edge", MIN_PIXELS))
    hi = data.get("max_pixels", size.get("longest_edge", MAX_PIXELS))
    if type(lo) is not int or type(hi) is not int or not 1 <= lo <= hi <= 1 << 28:
        raise QwenVisionFileError(f"{path}: min_pixels={lo!r} / max_pixels={hi!r} must be 1 <= min <= max pixels")
    checks: dict[str, Any] = {
        "patch_size": config.patch_size,
        "merge_size": config.spatial_merge_size,
        "temporal_patch_size": config.temporal_patch_size,
        "resample": 3,
        "do_resize": True,
        "do_rescale": True,
        "do_normalize": True,
    }
    for key, want in checks.items():
        if key in data and data[key] != want:
            raise QwenVisionFileError(f"{path}: {key}={data[key]!r}; sdengine runs Qwen2.5-VL's {want!r}")
    for key, stats in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
        got = data.get(key, list(stats))
        if (
            not isinstance(got, list)
            or len(got) != 3
            or any(abs(float(a) - b) > 1e-6 for a, b in zip(got, stats, strict=True))
        ):
            raise QwenVisionFileError(f"{path}: {key}={got!r} is not OpenAI CLIP's (Qwen2.5-VL's)")
    factor = data.get("rescale_factor", 1 / 255)
    if not isinstance(factor, int | float) or abs(float(factor) - 1 / 255) > 1e-9:
        raise QwenVisionFileError(f"{path}: rescale_factor={factor!r} is not 1/255")
    return lo, hi


def load_qwen_vision_tower(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> QwenVisionTower:
    """The vision tower of a Qwen2.5-VL text-encoder file or folder (a pipeline folder: its ``text_encoder/``) in
    ``dtype`` (default float32) on ``device``."""
    p = Path(path)
    target = compute_dtype(dtype, "Qwen vision tower", QwenVisionFileError)
    opened = encoder_tensors(
        p, "Qwen text encoder", qwen_text_folder, QwenVisionConfig.from_transformers, QwenVisionFileError
    )
    with opened as (source, config, where):
        model = _build(source, where, config, target, torch.device(device))
    model.name = p.name
    return model


def _build(
    source: TensorSource, where: str, config: QwenVisionConfig | None, target: torch.dtype, device: torch.device
) -> QwenVisionTower:
    every = [n for n in source.where if n != SCALED_FP8_MARKER and not n.endswith("." + SCALED_FP8_MARKER)]
    scaled = len(every) < len(source.where)
    names, scales = split_scales(select_vision_names(every, where), scaled, where, QwenVisionFileError)
    check_scales_used(scales, names, where, QwenVisionFileError)
    shapes = {k: tuple(source.where[v][2]) for k, v in names.items()}
    if config is None:
        config = config_from_shapes(shapes, where)
    with torch.device("meta"), skip_meta_init():
        model = QwenVisionTower(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(set(names) - set(expected))
    if extra:
        raise QwenVisionFileError(f"{where}: unexpected Qwen vision tower keys: {', '.join(extra[:4])}")
    missing = [k for k in expected if k not in names]
    if missing:
        raise QwenVisionFileError(
            f"{where}: Qwen vision tower without {missing[0]} (truncated or another architecture)"
        )
    state = {}
    for k, want in expected.items():
        if shapes[k] != want:
            raise QwenVisionFileError(f"{where}: vision tensor {k} is {shapes[k]}, the config needs {want}")
        t = source.read(names[k])
        if not t.is_floating_point():
            raise QwenVisionFileError(f"{where}: vision tensor {k} holds {t.dtype}, not floating-point weights")
        state[k] = scaled_weight(source, t, k, scales, where, QwenVisionFileError).to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


__all__ = [
    "QwenVisionFileError",
    "config_from_shapes",
    "load_qwen_vision_tower",
    "processor_limits",
    "select_vision_names",
]
