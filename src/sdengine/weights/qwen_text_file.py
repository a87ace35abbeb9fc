"""Qwen2.5-VL text encoder files (Qwen-Image's ``text_encoder/``) and Qwen3 ones (Z-Image's, FLUX.2 [klein]'s) ->
:class:`~sdengine.models.qwen_text.QwenTextEncoder`.

Accepted:

- a transformers folder (``config.json`` with ``model_type`` ``qwen2_5_vl`` or ``qwen3``, weights in
  ``model.safetensors``, a sharded ``model.safetensors.index.json`` + its shards, or ``pytorch_model.bin`` read
  weights-only); a diffusers pipeline folder (``model_index.json``) is taken to its ``text_encoder/``;
- a single ``.safetensors`` file holding the language model (the config then comes from the shapes, see below).

Key layouts (one per file; the prefix is taken off, the rest are ``Qwen2_5_VLTextModel``'s names):

- ``model.language_model.*`` -- transformers 5's ``Qwen2_5_VLForConditionalGeneration`` (and 4.52+);
- ``model.*`` -- older ``Qwen2_5_VLForConditionalGeneration`` files, Qwen-Image's own ``text_encoder`` among them,
  and every Qwen3 file (``Qwen3ForCausalLM``; ComfyUI's ``qwen_3_4b.safetensors``);
- no prefix (``embed_tokens.weight``, ``layers.N.*``, ``norm.weight``) -- a language model saved alone.

The vision tower (``visual.*``, ``model.visual.*``) and the language-model head (``lm_head.*``) are skipped without
being read: the image pipelines use neither. ComfyUI's "scaled fp8" files (a ``scaled_fp8`` marker
tensor, one ``<layer>.scale_weight`` per Linear, stored weights ``weight / scale``) are read as
``float(weight) * scale_weight``; their ``scale_input`` tensors serve only an fp8 matmul and are ignored. ComfyUI's
newer mixed-precision files (``<layer>.comfy_quant``, a JSON naming the format, with ``<layer>.weight_scale`` and
``<layer>.input_scale``) are read the same way where the format is float8; another format is one line. Any other
key, a missing one, a shape that does not fit or a config that disagrees with the weights is one
:class:`QwenTextFileError` line. Weights of any floating dtype (float8 included) are cast to the compute dtype.

Without a config the architecture comes from the shapes: vocabulary and width from ``embed_tokens.weight``, layer
count from the ``layers.N`` indices, MLP width from ``gate_proj``. A file with ``self_attn.q_norm`` weights is Qwen3:
its head width is that norm's length, its projections unbiased unless the file has biases. Otherwise head counts are
not in the shapes, so the head width is taken as 128 (every Qwen2.5-VL release: 3B, 7B, 32B, 72B; Mistral Small 3's);
the heads are the projections' rows / head width. A file with q / k / v biases is Qwen2.5-VL (``rms_norm_eps`` 1e-6 and
``rope_theta`` 1e6, Qwen3-4B's values too; ``mrope_section`` [16, 24, 24]); one with neither biases nor q / k norms is
Mistral Small 3 (FLUX.2 [dev]'s text encoder, ComfyUI's ``text_encoders/mistral_3_small_flux2_bf16.safetensors``:
``model.*`` names, ``rms_norm_eps`` 1e-5 and ``rope_theta`` 1e9, Mistral-Small-3.1/3.2-24B's). ComfyUI's Mistral
files also hold the tokenizer's ``tekken.json`` as a byte tensor (``tekken_model``): skipped here (the FLUX.2 [dev]
loader reads it, :func:`sdengine.pipeline.flux2_loading.read_tekken`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_text import QwenTextConfig, QwenTextEncoder
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

PIPELINE_COMPONENT = "text_encoder"  # Qwen-Image's text encoder folder in a diffusers pipeline folder
# tried in this order; see the module docstring
PREFIXES = ("model.language_model.", "language_model.model.", "model.", "")
SKIPPED_PREFIXES = (
    "visual.",
    "model.visual.",
    "lm_head.",
    "vision_tower.",  # Mistral3ForConditionalGeneration's (FLUX.2 [dev]'s) vision tower and projector
    "model.vision_tower.",
    "multi_modal_projector.",
    "model.multi_modal_projector.",
    "language_model.lm_head.",
)
SKIPPED_NAMES = ("tekken_model",)  # ComfyUI's Mistral files: the tokenizer's tekken.json as a uint8 tensor
HEAD_DIM = 128  # every Qwen2.5-VL release's head width; a single file without config.json assumes it
DEFAULT_EPS = 1e-6
DEFAULT_THETA = 1_000_000.0
MISTRAL_EPS = 1e-5  # Mistral-Small-3.1/3.2-24B's (FLUX.2 [dev]'s text encoder); a single file without config.json
MISTRAL_THETA = 1_000_000_000.0
_LAYER = re.compile(r"^layers\.(\d+)\.")


class QwenTextFileError(WeightsError):
    """A file or folder that is not a Qwen2.5-VL / Qwen3 text encoder sdengine can load, or one whose tensors do not
    fit."""


def select_text_names(names: list[str], where: str) -> dict[str, str]:
    """{model name: file name} of a file's language-model tensors, its layout found from the names (see the module
    docstring); vision-tower and LM-head tensors are left out."""
    kept = [n for n in names if not n.startswith(SKIPPED_PREFIXES) and n not in SKIPPED_NAMES]
    for prefix in PREFIXES:
        chosen = {n[len(prefix) :]: n for n in kept if n.startswith(prefix)}
        if "embed_tokens.weight" in chosen or any(_LAYER.match(k) for k in chosen):
            break
    else:
        if any(n.startswith(("text_model.", "encoder.block.", "shared.")) for n in names):
            raise QwenTextFileError(f"{where}: a CLIP or T5 text encoder, not a Qwen language model")
        shown = ", ".join(sorted(names)[:4]) or "no tensors"
        raise QwenTextFileError(
            f"{where}: not a Qwen2.5-VL / Qwen3 language model (no model.language_model.*, model.layers.N.* or "
            f"layers.N.* keys; it has {shown})"
        )
    unknown = sorted(n for n in kept if not n.startswith(prefix))
    if unknown:
        raise QwenTextFileError(f"{where}: unexpected keys beside the language model: {', '.join(unknown[:4])}")
    return chosen


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str, ndim: int, where: str) -> tuple[int, ...]:
    shape = shapes.get(key)
    if shape is None:
        raise QwenTextFileError(f"{where}: Qwen text encoder without {key}")
    if len(shape) != ndim:
        raise QwenTextFileError(f"{where}: {key} should be {ndim}-d, it is {shape}")
    return shape


def config_from_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    where: str = "<state dict>",
    *,
    head_dim: int = HEAD_DIM,
    rms_norm_eps: float | None = None,
    rope_theta: float | None = None,
) -> QwenTextConfig:
    """The language model's architecture from its tensors' shapes ({model name: shape}); the head width, norm
    epsilon and RoPE base are not in the shapes and come from the arguments (None: the family's, see the module
    docstring)."""
    vocab, width = _shape(shapes, "embed_tokens.weight", 2, where)
    layers = sorted({int(m.group(1)) for k in shapes if (m := _LAYER.match(k))})
    if not layers:
        raise QwenTextFileError(f"{where}: Qwen text encoder without layers (layers.N)")
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise QwenTextFileError(f"{where}: Qwen text encoder layer {gap} is missing (has layers up to {layers[-1]})")
    q_rows, _ = _shape(shapes, "layers.0.self_attn.q_proj.weight", 2, where)
    k_rows, _ = _shape(shapes, "layers.0.self_attn.k_proj.weight", 2, where)
    inter, _ = _shape(shapes, "layers.0.mlp.gate_proj.weight", 2, where)
    qwen3 = "layers.0.self_attn.q_norm.weight" in shapes
    if qwen3:
        (head_dim,) = _shape(shapes, "layers.0.self_attn.q_norm.weight", 1, where)
    has_bias = "layers.0.self_attn.q_proj.bias" in shapes
    mistral = not qwen3 and not has_bias  # Qwen2.5-VL always has the biases; Mistral never
    if rms_norm_eps is None:
        rms_norm_eps = MISTRAL_EPS if mistral else DEFAULT_EPS
    if rope_theta is None:
        rope_theta = MISTRAL_THETA if mistral else DEFAULT_THETA
    biased = not qwen3 or has_bias
    if head_dim <= 0 or q_rows % head_dim or k_rows % head_dim:
        raise QwenTextFileError(
            f"{where}: query / key widths {q_rows} / {k_rows} are not multiples of the head width {head_dim}; give "
            "the folder with its config.json"
        )
    try:
        return QwenTextConfig(
            vocab_size=vocab,
            hidden_size=width,
            intermediate_size=inter,
            num_hidden_layers=len(layers),
            num_attention_heads=q_rows // head_dim,
            num_key_value_heads=k_rows // head_dim,
            rms_norm_eps=rms_norm_eps,
            rope_theta=rope_theta,
            mrope_section=(head_dim // 2, 0, 0)
            if qwen3 or mistral
            else (head_dim // 8, 3 * head_dim // 16, head_dim // 2 - head_dim // 8 - 3 * head_dim // 16),
            attention_bias=biased and not mistral,
            o_proj_bias=qwen3 and biased,
            qk_norm=qwen3,
            head_dim_override=head_dim if qwen3 or mistral else None,
        )
    except ConfigError as e:
        raise QwenTextFileError(f"{where}: {e}") from None


def qwen_text_folder(p: Path) -> Path:
    """The folder holding the text encoder's config: ``p`` itself, or a pipeline folder's ``text_encoder/``."""
    if (p / "config.json").is_file():
        return p
    if (p / "model_index.json").is_file():
        if (p / PIPELINE_COMPONENT / "config.json").is_file():
            return p / PIPELINE_COMPONENT
        raise QwenTextFileError(f"{p}: a diffusers pipeline folder without {PIPELINE_COMPONENT}/config.json")
    raise QwenTextFileError(f"{p}: not a Qwen text encoder folder (no config.json; give the weights file itself)")


FAMILIES = {"qwen2.5-vl": "Qwen2.5-VL", "qwen3": "Qwen3", "mistral": "Mistral Small 3"}
FAMILY_USERS = {"qwen2.5-vl": "Qwen-Image's", "qwen3": "Z-Image's or FLUX.2 [klein]'s", "mistral": "FLUX.2 [dev]'s"}


def family_of(config: QwenTextConfig) -> str:
    """``"qwen3"`` (per-head q/k norms), ``"qwen2.5-vl"`` (biased q/k/v) or ``"mistral"`` (neither): the keys of
    :data:`FAMILIES`."""
    if config.qk_norm:
        return "qwen3"
    return "qwen2.5-vl" if config.attention_bias else "mistral"


def load_qwen_text_encoder(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    family: str | None = None,
) -> QwenTextEncoder:
    """Qwen2.5-VL's or Qwen3's language model from a file or folder (see the module docstring) in ``dtype`` (default
    float32, whatever the file holds; the pipelines run it in bfloat16) on ``device``. ``family`` (a key of
    :data:`FAMILIES`): the one the caller's model needs; the other is refused in one line before any weight is
    read (a Qwen3 file given to Qwen-Image would otherwise fail deep inside the transformer, or not at all where the
    widths happen to agree)."""
    p = Path(path)
    if family is not None and family not in FAMILIES:
        raise QwenTextFileError(f"Qwen text encoder family {family!r} is not one of {', '.join(FAMILIES)}")
    target = compute_dtype(dtype, "Qwen text encoder", QwenTextFileError)
    opened = encoder_tensors(
        p, "Qwen text encoder", qwen_text_folder, QwenTextConfig.from_transformers, QwenTextFileError
    )
    with opened as (source, config, where):
        model = _build(source, where, config, target, torch.device(device), family)
    model.name = p.name
    return model


def _build(
    source: TensorSource,
    where: str,
    config: QwenTextConfig | None,
    target: torch.dtype,
    device: torch.device,
    family: str | None,
) -> QwenTextEncoder:
    every = list(source.where)
    scaled = any(n == SCALED_FP8_MARKER or n.endswith("." + SCALED_FP8_MARKER) for n in every)
    chosen = select_text_names(
        [n for n in every if n != SCALED_FP8_MARKER and not n.endswith("." + SCALED_FP8_MARKER)], where
    )
    if any(k.endswith(COMFY_QUANT) for k in chosen):
        chosen = comfy_quant_names(source, chosen, where)
        scaled = True
    names, scales = split_scales(chosen, scaled, where, QwenTextFileError)
    check_scales_used(scales, names, where, QwenTextFileError)
    shapes = {k: source.where[v][2] for k, v in names.items()}
    if config is None:
        config = config_from_shapes(shapes, where)
    kind = family_of(config)
    if family is not None and kind != family:
        raise QwenTextFileError(
            f"{where}: a {FAMILIES[kind]} text encoder ({FAMILY_USERS[kind]}), but this model needs "
            f"{FAMILIES[family]} ({FAMILY_USERS[family]})"
        )
    with torch.device("meta"), skip_meta_init():
        model = QwenTextEncoder(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = sorted(set(names) - set(expected))
    if extra:
        found = sorted({int(m.group(1)) for k in extra if (m := _LAYER.match(k))})
        if found:
            raise QwenTextFileError(
                f"{where}: the weights have layer {found[0]} but the config says num_hidden_layers="
                f"{config.num_hidden_layers}"
            )
        raise QwenTextFileError(f"{where}: unexpected Qwen text encoder keys: {', '.join(extra[:4])}")
    missing = [k for k in expected if k not in names]
    if missing:
        raise QwenTextFileError(f"{where}: Qwen text encoder without {missing[0]} (truncated or another architecture)")
    state = {}
    for k, shape in expected.items():
        if shapes[k] != shape:
            raise QwenTextFileError(f"{where}: {k} is {shapes[k]}, but the config ({_describe(config)}) needs {shape}")
        t = source.read(names[k])
        if not t.is_floating_point():
            raise QwenTextFileError(f"{where}: {k} holds {t.dtype}, not floating-point weights")
        t = scaled_weight(source, t, k, scales, where, QwenTextFileError)
        state[k] = t.to(device=device, dtype=target)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)


COMFY_QUANT = ".comfy_quant"  # ComfyUI's mixed-precision files: one JSON (uint8 tensor) per quantized Linear
COMFY_FLOAT8 = ("float8_e4m3fn", "float8_e5m2")  # the formats read: float8 weights with one scale each


def comfy_quant_names(source: TensorSource, chosen: Mapping[str, str], where: str) -> dict[str, str]:
    """ComfyUI's mixed-precision layout (``<layer>.comfy_quant`` JSON naming the format, ``<layer>.weight_scale``,
    ``<layer>.input_scale``) as the scaled-fp8 one :func:`split_scales` reads (``.scale_weight`` / ``.scale_input``);
    a format other than float8 (``nvfp4``, ``int8_tensorwise``, ...) is one line."""
    import json

    out: dict[str, str] = {}
    for k, v in chosen.items():
        if k.endswith(COMFY_QUANT):
            raw = source.read(v)
            try:
                spec = json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8"))
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise QwenTextFileError(f"{where}: {v} is not ComfyUI's quantization JSON") from None
            fmt = spec.get("format") if isinstance(spec, dict) else None
            if fmt not in COMFY_FLOAT8:
                raise QwenTextFileError(
                    f"{where}: {v} says format {fmt!r}: ComfyUI's quantized weights are read in float8 only "
                    f"({', '.join(COMFY_FLOAT8)})"
                )
            layer = k[: -len(COMFY_QUANT)]
            if layer + ".weight_scale" not in chosen or layer + ".weight" not in chosen:
                raise QwenTextFileError(f"{where}: {v} marks {layer} quantized, but it has no weight and weight_scale")
            continue
        for old, new in ((".weight_scale", ".scale_weight"), (".input_scale", ".scale_input")):
            if k.endswith(old):
                k = k[: -len(old)] + new
        out[k] = v
    return out


def _describe(config: QwenTextConfig) -> str:
    shown = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    return ", ".join(f"{f.name}={getattr(config, f.name)}" for f in dataclasses.fields(config) if f.name in shown)


__all__ = [
    "FAMILIES",
    "FAMILY_USERS",
    "HEAD_DIM",
    "PIPELINE_COMPONENT",
    "QwenTextFileError",
    "config_from_shapes",
    "family_of",
    "load_qwen_text_encoder",
    "qwen_text_folder",
    "select_text_names",
]
