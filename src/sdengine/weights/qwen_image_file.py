"""Qwen-Image transformer files: diffusers ``transformer/`` folders (sharded too) and single ``.safetensors`` files
in diffusers' names (ComfyUI's ``qwen_image_*.safetensors`` diffusion-model files, with or without its
``model.diffusion_model.`` prefix); the config from the shapes for a single file, ``zero_cond_t``
(Qwen-Image-Edit-2511's) from ComfyUI's ``__index_timestep_zero__`` marker tensor when the file has it.

The names are diffusers' ``QwenImageTransformer2DModel``'s, which
:class:`sdengine.models.qwen_image.QwenImageTransformer` keeps, so nothing is renamed. Reading, dtype choice and
the meta-device build are Flux's (:func:`sdengine.weights.flux_file.load_transformer`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer

from .flux_file import build_from_state, check_config_fits, load_transformer
from .io import WeightsError

_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
QWEN_AXES = (16, 56, 56)  # the RoPE split of Qwen-Image's 128-wide heads
# ComfyUI's empty tensor in Qwen-Image-Edit-2511's single files: the model's zero_cond_t (no weight of its own)
ZERO_COND_MARKER = "__index_timestep_zero__"


def _shape(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> tuple[int, ...]:
    v = sd.get(key)
    if not isinstance(v, torch.Tensor) or v.ndim != ndim:
        raise WeightsError(f"{where}: not a Qwen-Image transformer ({key} missing or of the wrong shape)")
    return tuple(v.shape)


def config_from_shapes(
    sd: Mapping[str, Any], where: str = "<state dict>", *, axes_dims_rope: tuple[int, ...] | None = None
) -> QwenImageConfig:
    """The architecture a Qwen-Image state dict (diffusers' names) describes: widths from ``img_in``, ``txt_in``,
    ``proj_out`` and the q norm (the head width), the block count from the names. The RoPE split is Qwen-Image's
    16 + 56 + 56 for 128-wide heads; other head widths need ``axes_dims_rope``."""
    hidden, in_channels = _shape(sd, "img_in.weight", 2, where)
    _, text_dim = _shape(sd, "txt_in.weight", 2, where)
    out, _ = _shape(sd, "proj_out.weight", 2, where)
    (head_dim,) = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", 1, where)
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if blocks != set(range(len(blocks))) or hidden % head_dim or out % 4:
        raise WeightsError(f"{where}: not a Qwen-Image transformer (its blocks or widths do not fit)")
    axes = axes_dims_rope or (QWEN_AXES if head_dim == 128 else None)
    if axes is None:
        raise WeightsError(
            f"{where}: {head_dim}-wide heads: pass axes_dims_rope (Qwen-Image's split is for 128-wide heads)"
        )
    return QwenImageConfig(
        in_channels=in_channels,
        out_channels=out // 4,
        num_layers=len(blocks),
        attention_head_dim=head_dim,
        num_attention_heads=hidden // head_dim,
        joint_attention_dim=text_dim,
        axes_dims_rope=tuple(axes),
    )


def qwen_image_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: QwenImageConfig | None = None,
    axes_dims_rope: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> QwenImageTransformer:
    """A :class:`QwenImageTransformer` from a state dict in diffusers' names; the config from the shapes unless
    given (a given one must fit them: one line naming the first difference)."""
    marked = ZERO_COND_MARKER in sd
    if marked:
        sd = {k: v for k, v in sd.items() if k != ZERO_COND_MARKER}
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    axes = axes_dims_rope or (config.axes_dims_rope if config is not None else None)
    shapes = config_from_shapes(sd, where, axes_dims_rope=axes)
    if config is not None:  # the shapes cannot tell zero_cond_t (Edit-2511's): a given config's
        if marked and not config.zero_cond_t:
            raise WeightsError(
                f"{where}: the weights carry ComfyUI's {ZERO_COND_MARKER} (Qwen-Image-Edit-2511) but the config "
                "says zero_cond_t=false"
            )
        shapes = dataclasses.replace(shapes, zero_cond_t=config.zero_cond_t)
    elif marked:
        shapes = dataclasses.replace(shapes, zero_cond_t=True)
    check_config_fits(config, shapes, where)
    return build_from_state(
        QwenImageTransformer, config or shapes, sd, f"{where}: Qwen-Image transformer", device, dtype, stored
    )


def load_qwen_image_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    axes_dims_rope: tuple[int, ...] | None = None,
) -> QwenImageTransformer:
    """A Qwen-Image transformer from a diffusers folder (pipeline or ``transformer/``) or a single file, on
    ``device`` in ``dtype`` (default: the file's; bfloat16 for float8 weights)."""
    model: QwenImageTransformer = load_transformer(
        path,
        what="Qwen-Image",
        from_diffusers=QwenImageConfig.from_diffusers,
        from_state=qwen_image_from_state,
        device=device,
        dtype=dtype,
        axes_dims_rope=axes_dims_rope,
    )
    return model


__all__ = [
    "QWEN_AXES",
    "ZERO_COND_MARKER",
    "config_from_shapes",
    "load_qwen_image_transformer",
    "qwen_image_from_state",
]
