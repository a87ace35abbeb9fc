"""Chroma transformer files: diffusers folders and lodestones' single files -> :class:`ChromaTransformer`.

Accepted (:func:`load_chroma_transformer`):

- a diffusers folder (``Chroma1-HD/``, with ``transformer/``) or its ``transformer/`` folder: ``config.json``
  (``ChromaTransformer2DModel``) and ``diffusion_pytorch_model.safetensors`` or its shards;
- a single file in BFL's names plus Chroma's modulation network (``chroma-unlocked-v*.safetensors``,
  ``Chroma1-HD.safetensors``): ``distilled_guidance_layer.{in_proj, layers.{i}.in_layer, layers.{i}.out_layer,
  norms.{i}.scale, out_proj}``, ``img_in``, ``txt_in``, ``double_blocks.{i}.*`` and ``single_blocks.{i}.*``
  without their ``*_mod.lin`` / ``modulation.lin``, ``final_layer.linear`` (no ``final_layer.adaLN_modulation``),
  with or without ComfyUI's ``model.diffusion_model.`` prefix (the names diffusers' single-file converter reads);
- a single file already in diffusers' names.

Float8 files are upcast as :mod:`sdengine.weights.flux_file` reads Flux's; ComfyUI's *scaled* float8 files
(a ``scaled_fp8`` marker) are refused.

Without a config the architecture comes from the shapes as Flux's does (:mod:`sdengine.weights.flux_file`), and
the approximator's from ``distilled_guidance_layer``: its input width (``approximator_num_channels``, 64) and
hidden width (5120) from ``in_proj``, its depth from the ``layers.N`` indices.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.chroma import ChromaConfig, ChromaTransformer

from .detect import FLUX_PREFIX, is_chroma_state_dict
from .flux_file import (
    DOUBLE_BLOCK,
    DOUBLE_RENAMES,
    OURS_DOUBLE_BLOCK,
    OURS_SINGLE_BLOCK,
    SINGLE_BLOCK,
    TakeOnce,
    block_count,
    blocks_to_bfl,
    blocks_to_diffusers,
    build_from_state,
    check_config_fits,
    flux_like_shapes,
    load_transformer,
    make_config,
    tensor_shape,
)
from .io import StateDict, WeightsError

SCALED_FP8 = "scaled_fp8"  # ComfyUI's scaled float8 marker
_GUIDE = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.")

_TOP = {  # only renamed (weight and bias each)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}
_GUIDE_RENAMES = {"in_layer": "linear_1", "out_layer": "linear_2"}  # an approximator layer's (weight and bias each)
_SINGLE_RENAMES = {"linear2": "proj_out"}  # a single block's output (no modulation.lin)


def _count(pattern: re.Pattern[str], keys: Iterable[str], what: str, where: str) -> int:
    return block_count(pattern, keys, what, where, model="Chroma", unit="")


def bfl_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> StateDict:
    """Chroma's single-file names (prefix stripped) -> diffusers' ``ChromaTransformer2DModel`` names; every tensor
    used once (a missing or a left-over one: one line)."""
    t = TakeOnce(sd, where, "Chroma", "Chroma")
    if SCALED_FP8 in t.src:
        raise WeightsError(
            f"{where}: ComfyUI's scaled float8 Chroma files are not supported; use a bf16 or plain fp8 file"
        )
    img_in = t.take("img_in.weight")
    hidden = int(img_in.shape[0])
    t.out["x_embedder.weight"] = img_in
    keys = list(t.src)
    doubles = _count(DOUBLE_BLOCK, keys, "double-stream block", where)
    singles = _count(SINGLE_BLOCK, keys, "single-stream block", where)
    guides = _count(_GUIDE, keys, "distilled_guidance_layer layer", where)
    for bfl, ours in _TOP.items():
        for p in ("weight", "bias"):
            if bfl == "img_in" and p == "weight":
                continue
            t.out[f"{ours}.{p}"] = t.take(f"{bfl}.{p}")
    for i in range(guides):
        a = f"distilled_guidance_layer.layers.{i}."
        for bfl, ours in _GUIDE_RENAMES.items():
            for p in ("weight", "bias"):
                t.out[f"{a}{ours}.{p}"] = t.take(f"{a}{bfl}.{p}")
        t.out[f"distilled_guidance_layer.norms.{i}.weight"] = t.take(f"distilled_guidance_layer.norms.{i}.scale")
    blocks_to_diffusers(t, hidden, doubles, singles, DOUBLE_RENAMES, _SINGLE_RENAMES)
    t.left_over()
    return t.out


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`bfl_to_diffusers` (diffusers' names -> a Chroma single file's)."""
    src = dict(sd)
    out: StateDict = {}
    for bfl, ours in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = src.pop(f"{ours}.{p}")
    for i in range(_count(_GUIDE, list(src), "distilled_guidance_layer layer", "<state dict>")):
        a = f"distilled_guidance_layer.layers.{i}."
        for bfl, ours in _GUIDE_RENAMES.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = src.pop(f"{a}{ours}.{p}")
        out[f"distilled_guidance_layer.norms.{i}.scale"] = src.pop(f"distilled_guidance_layer.norms.{i}.weight")
    doubles = _count(OURS_DOUBLE_BLOCK, list(src), "double-stream block", "<state dict>")
    singles = _count(OURS_SINGLE_BLOCK, list(src), "single-stream block", "<state dict>")
    blocks_to_bfl(src, out, doubles, singles, DOUBLE_RENAMES, _SINGLE_RENAMES)
    if src:
        raise WeightsError(f"unexpected tensors in a Chroma state dict: {', '.join(sorted(src)[:4])}")
    return out


def _shape(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> tuple[int, ...]:
    return tensor_shape(sd, key, ndim, where, model="Chroma")


def config_from_shapes(
    sd: Mapping[str, Any], where: str = "<state dict>", *, axes_dims_rope: tuple[int, ...] | None = None
) -> ChromaConfig:
    """The architecture of a Chroma state dict in diffusers' names (module docstring)."""
    hint = "use a diffusers folder with config.json"
    shared = flux_like_shapes(sd, where, axes_dims_rope, model="Chroma", released="Chroma's", hint=hint)
    approx_hidden, approx_in = _shape(sd, "distilled_guidance_layer.in_proj.weight", 2, where)
    layers = _count(_GUIDE, list(sd), "distilled_guidance_layer layer", where)
    config: ChromaConfig = make_config(
        ChromaConfig,
        where,
        **shared,
        approximator_num_channels=approx_in,
        approximator_hidden_dim=approx_hidden,
        approximator_layers=layers,
    )
    return config


def _to_ours(sd: Mapping[str, Any], where: str) -> StateDict:
    if any(k.startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in sd):
        if not is_chroma_state_dict(sd):
            raise WeightsError(f"{where}: a FLUX.1 transformer (no distilled_guidance_layer.*), not Chroma")
        return bfl_to_diffusers(sd, where)
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in sd):
        if "distilled_guidance_layer.in_proj.weight" not in sd:
            raise WeightsError(f"{where}: a Flux transformer in diffusers' names (no distilled_guidance_layer.*)")
        return dict(sd)
    shown = ", ".join(sorted(sd)[:4]) or "none"
    raise WeightsError(f"{where}: not a Chroma transformer (it has {shown})")


def chroma_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: ChromaConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> ChromaTransformer:
    """A :class:`ChromaTransformer` from a state dict in any accepted layout (prefix already stripped); the config
    from the shapes unless given (a given one must fit them)."""
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    ours = _to_ours(sd, where)
    shapes = config_from_shapes(ours, where, axes_dims_rope=config.axes_dims_rope if config is not None else None)
    check_config_fits(config, shapes, where)
    name = f"{where}: Chroma transformer"
    model: ChromaTransformer = build_from_state(ChromaTransformer, config or shapes, ours, name, device, dtype, stored)
    return model


def load_chroma_transformer(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> ChromaTransformer:
    """A Chroma transformer from a diffusers folder (pipeline or ``transformer/``) or a single file (module
    docstring), on ``device`` in ``dtype`` (default: the file's; bfloat16 for float8 weights)."""
    model: ChromaTransformer = load_transformer(
        path,
        what="Chroma",
        from_diffusers=ChromaConfig.from_diffusers,
        from_state=chroma_from_state,
        device=device,
        dtype=dtype,
    )
    return model


__all__ = [
    "FLUX_PREFIX",
    "bfl_to_diffusers",
    "chroma_from_state",
    "config_from_shapes",
    "diffusers_to_bfl",
    "load_chroma_transformer",
]
