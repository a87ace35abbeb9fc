"""T5 encoder files (SD3's ``text_encoder_3``, Flux's ``text_encoder_2``, ComfyUI's ``t5xxl_*``): layout,
architecture from the shapes, load.

Accepted:

- a transformers folder: ``config.json`` (``model_type`` t5 or mt5) and ``model.safetensors``, a sharded
  ``model.safetensors.index.json`` with its shards, or ``pytorch_model.bin`` (weights-only pickle). The config's
  numbers are checked against the tensors' shapes. A diffusers pipeline folder (``model_index.json``) is searched
  for its T5 component: ``text_encoder_3/`` (SD3) or ``text_encoder_2/`` (Flux);
- one ``.safetensors`` (or weights-only ``.bin``/``.pt``/``.pth``) with transformers' ``T5EncoderModel`` names
  (``shared.weight``, ``encoder.block.N....``), as ComfyUI's ``t5xxl_fp16.safetensors`` and
  ``t5xxl_fp8_e4m3fn.safetensors``: a full ``T5ForConditionalGeneration`` file too (its ``decoder.*`` and
  ``lm_head.weight`` are ignored). Float8 weights are upcast to the compute dtype. ComfyUI's "scaled fp8" files
  (a ``scaled_fp8`` marker tensor, one ``<layer>.scale_weight`` per Linear) store ``weight / scale``: the weight
  read is ``float(weight) * scale_weight`` (ComfyUI's dequantisation); their ``scale_input`` tensors only serve an
  fp8 matmul and are ignored;
- an SD3 / SD3.5 single file whose T5 is inside it (``text_encoders.t5xxl.transformer.*``); the rest of the file
  is not read.

Without a config the architecture comes from the shapes: vocabulary and width from ``shared.weight``, layer count
from the ``encoder.block.N`` indices (0..N-1 without gaps), heads from block 0's ``relative_attention_bias`` (buckets
x heads), ``d_kv`` from the query rows / heads, ``d_ff`` and the feed-forward kind from ``wi_0`` (gated-gelu) or
``wi`` (relu). ``relative_attention_max_distance`` (128) and ``layer_norm_epsilon`` (1e-6) are not in the shapes:
every T5 release uses those values.

Every other layout or a tensor that does not fit is one :class:`T5FileError` line saying what was found.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.t5_text import EMBED_ALIAS, T5Config, T5Encoder
from sdengine.nn.meta_init import skip_meta_init

from .encoder_files import (
    SCALED_FP8_MARKER,
    TensorSource,
    check_scales_used,
    compute_dtype,
    encoder_tensors,
    read_json,
    scaled_weight,
    split_scales,
)
from .io import WeightsError

SD3_PREFIX = "text_encoders.t5xxl.transformer."  # Stability's SD3 single files
PIPELINE_COMPONENTS = ("text_encoder_3", "text_encoder_2")  # SD3's T5, Flux's T5
IGNORED_PREFIXES = ("decoder.", "lm_head.")  # a full T5ForConditionalGeneration file's decoder half
_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.")
MAX_DISTANCE = 128  # relative_attention_max_distance of every T5 release; not in the shapes
EPSILON = 1e-6  # layer_norm_epsilon of every T5 release; not in the shapes


class T5FileError(WeightsError):
    """A file or folder that is not a T5 encoder sdengine can load, or one whose tensors do not fit."""


def _is_t5_name(name: str) -> bool:
    return name in ("shared.weight", EMBED_ALIAS) or name.startswith("encoder.")


def select_t5_names(names: list[str], where: str) -> tuple[dict[str, str], bool]:
    """{model name: file name} of a file's T5 encoder tensors (after any SD3 prefix), and whether it is a
    scaled-fp8 file; one-line errors for a file without a T5 encoder."""
    sd3 = [n for n in names if n.startswith(SD3_PREFIX)]
    scaled = SCALED_FP8_MARKER in names or (SD3_PREFIX + SCALED_FP8_MARKER) in names
    if sd3:
        chosen = {n[len(SD3_PREFIX) :]: n for n in sd3 if n[len(SD3_PREFIX) :] != SCALED_FP8_MARKER}
    else:
        if any(n.startswith("text_encoders.") or n.startswith("model.diffusion_model.") for n in names):
            found = sorted({".".join(n.split(".")[:2]) for n in names if n.startswith("text_encoders.")})
            raise T5FileError(
                f"{where}: a single checkpoint without T5 weights (no {SD3_PREFIX}*; it has "
                f"{', '.join(found) or 'no text encoders'}); give a separate T5 file such as t5xxl_fp16.safetensors"
            )
        chosen = {n: n for n in names if _is_t5_name(n)}
    if not any(_BLOCK.match(k) for k in chosen):
        if any(n.startswith("text_model.") or n.startswith("transformer.text_model.") for n in names):
            raise T5FileError(f"{where}: a CLIP text encoder (text_model.*), not a T5 encoder")
        shown = ", ".join(sorted(names)[:4]) or "no tensors"
        raise T5FileError(f"{where}: not a T5 encoder (no encoder.block.N.* keys; it has {shown})")
    unknown = [
        n
        for n in (names if not sd3 else [])
        if not _is_t5_name(n) and not n.startswith(IGNORED_PREFIXES) and n != SCALED_FP8_MARKER
    ]
    if unknown:
        raise T5FileError(f"{where}: unexpected keys beside the T5 encoder: {', '.join(sorted(unknown)[:4])}")
    return chosen, scaled


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, where: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise T5FileError(f"{where}: T5 encoder without {key}")
    if len(shape) != ndim:
        raise T5FileError(f"{where}: {key} should be {ndim}-d, it is {shape}")
    return shape


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    where: str = "<state dict>",
    *,
    relative_attention_max_distance: int = MAX_DISTANCE,
    layer_norm_epsilon: float = EPSILON,
) -> T5Config:
    """The architecture of a T5 encoder from its tensors' shapes ({model name: shape}, see the module docstring)."""
    embed_key = "shared.weight" if "shared.weight" in shapes else EMBED_ALIAS
    vocab, width = _shape(shapes, embed_key, 2, where)
    blocks = sorted({int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))})
    if not blocks:
        raise T5FileError(f"{where}: T5 encoder without blocks (encoder.block.N)")
    if blocks != list(range(len(blocks))):
        gap = next(i for i in range(len(blocks) + 1) if i not in blocks)
        raise T5FileError(f"{where}: T5 encoder block {gap} is missing (has blocks up to {blocks[-1]})")
    att = "encoder.block.0.layer.0.SelfAttention."
    buckets, heads = _shape(shapes, att + "relative_attention_bias.weight", 2, where)
    if any(f"encoder.block.{i}.layer.0.SelfAttention.relative_attention_bias.weight" in shapes for i in blocks[1:]):
        raise T5FileError(f"{where}: a relative position table in every block (UMT5), not a T5 encoder")
    inner, _ = _shape(shapes, att + "q.weight", 2, where)
    if heads < 1 or inner % heads:
        raise T5FileError(f"{where}: query width {inner} is not a multiple of the {heads} heads")
    ff = "encoder.block.0.layer.1.DenseReluDense."
    gated = ff + "wi_0.weight" in shapes
    d_ff, _ = _shape(shapes, ff + ("wi_0.weight" if gated else "wi.weight"), 2, where)
    try:
        return T5Config(
            vocab_size=vocab,
            d_model=width,
            d_kv=inner // heads,
            d_ff=d_ff,
            num_layers=len(blocks),
            num_heads=heads,
            relative_attention_num_buckets=buckets,
            relative_attention_max_distance=relative_attention_max_distance,
            feed_forward_proj="gated-gelu" if gated else "relu",
            layer_norm_epsilon=layer_norm_epsilon,
        )
    except ConfigError as e:
        raise T5FileError(f"{where}: {e}") from None


def t5_folder(p: Path) -> Path:
    """The folder holding a T5 config: ``p`` itself, or a pipeline folder's T5 component."""
    if (p / "config.json").is_file():
        return p
    if (p / "model_index.json").is_file():
        for sub in PIPELINE_COMPONENTS:
            cfg = p / sub / "config.json"
            if cfg.is_file() and read_json(cfg, "config", T5FileError).get("model_type") in ("t5", "mt5"):
                return p / sub
        raise T5FileError(
            f"{p}: a diffusers pipeline folder without a T5 text encoder ({' or '.join(PIPELINE_COMPONENTS)})"
        )
    raise T5FileError(f"{p}: not a T5 encoder folder (no config.json; give the weights file itself)")


def load_t5_encoder(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> T5Encoder:
    """A T5 encoder from a file or folder (see the module docstring) in ``dtype`` (default float32, whatever the file
    holds) on ``device``; in float16 the feed-forward output weights stay float32 (:meth:`T5Encoder.set_dtype`)."""
    p = Path(path)
    target = compute_dtype(dtype, "T5 encoder", T5FileError)
    opened = encoder_tensors(p, "T5 encoder", t5_folder, T5Config.from_transformers, T5FileError)
    with opened as (source, config, where):
        model = _build(source, where, config, target, torch.device(device))
    model.name = p.name
    return model


def _build(
    source: TensorSource, where: str, config: T5Config | None, target: torch.dtype, device: torch.device
) -> T5Encoder:
    names, scaled = select_t5_names(list(source.where), where)
    weights, scales = split_scales(names, scaled, where, T5FileError)
    if EMBED_ALIAS in weights and "shared.weight" in weights:
        del weights[EMBED_ALIAS]  # the same table twice (transformers ties them)
    elif EMBED_ALIAS in weights:
        weights["shared.weight"] = weights.pop(EMBED_ALIAS)
    shapes = {k: source.where[v][2] for k, v in weights.items()}
    found = config_from_shapes(
        shapes,
        where,
        relative_attention_max_distance=config.relative_attention_max_distance if config else MAX_DISTANCE,
        layer_norm_epsilon=config.layer_norm_epsilon if config else EPSILON,
    )
    if config is not None and found != config:
        diff = next(f.name for f in dataclasses.fields(found) if getattr(found, f.name) != getattr(config, f.name))
        raise T5FileError(
            f"{where}: config.json says {diff}={getattr(config, diff)} but the weights have {getattr(found, diff)}"
        )
    with torch.device("meta"), skip_meta_init():
        model = T5Encoder(found)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in weights]
    if missing:
        raise T5FileError(f"{where}: T5 encoder without {missing[0]} (truncated or another architecture)")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise T5FileError(f"{where}: unexpected T5 encoder keys: {', '.join(extra[:4])}")
    check_scales_used(scales, weights, where, T5FileError)
    state = {}
    for k, shape in expected.items():
        t = source.read(weights[k])
        if tuple(t.shape) != shape:
            raise T5FileError(f"{where}: {k} is {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise T5FileError(f"{where}: {k} holds {t.dtype}, not floating-point weights")
        keep = torch.float32 if target == torch.float16 and k.endswith("DenseReluDense.wo.weight") else target
        t = scaled_weight(source, t, k, scales, where, T5FileError)
        state[k] = t.to(device=device, dtype=keep)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


__all__ = [
    "PIPELINE_COMPONENTS",
    "SD3_PREFIX",
    "T5FileError",
    "config_from_shapes",
    "load_t5_encoder",
    "select_t5_names",
    "t5_folder",
]
