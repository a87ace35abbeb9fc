"""Flux transformer files: which layout, the architecture from the shapes, BFL's names <-> diffusers', load.

Accepted (:func:`load_flux_transformer`):

- a diffusers folder (``FLUX.1-dev/``, with ``transformer/``) or its ``transformer/`` folder: ``config.json`` and
  ``diffusion_pytorch_model.safetensors``, or the shards an ``diffusion_pytorch_model.safetensors.index.json``
  names (the released folders have three); the config is checked against the shapes;
- Black Forest Labs' single files (``flux1-dev.safetensors``, ``flux1-schnell.safetensors``): names
  ``double_blocks.{i}.img_attn.qkv``, ``single_blocks.{i}.linear1``, ``img_in``, ``txt_in``, ``time_in``,
  ``vector_in``, ``guidance_in`` (dev), ``final_layer.*``; with or without ComfyUI's ``model.diffusion_model.``
  prefix (where it is there, only the prefixed tensors are read: ComfyUI's all-in-one checkpoints carry the VAE
  and text encoders beside them);
- a single file already in diffusers' names (``transformer_blocks.*``, ``x_embedder.*``).

Float8 weights (``float8_e4m3fn``/``e5m2``, e.g. ``flux1-dev-fp8.safetensors``) are upcast to the compute dtype as
they are read, one tensor at a time. ComfyUI's "scaled" float8 files (a ``scaled_fp8`` marker, a ``scale_weight``
beside each float8 weight) are multiplied out: weight = stored x scale_weight.

BFL's layout differs from diffusers' in three ways the conversion undoes:

* fused projections: ``img_attn.qkv`` / ``txt_attn.qkv`` hold q, k and v stacked (3 x hidden rows), a single
  block's ``linear1`` holds q, k, v and the MLP's first layer (3 x hidden + 4 x hidden rows);
* names: ``img_mod.lin`` -> ``norm1.linear``, ``img_mlp.0/2`` -> ``ff.net.0.proj``/``ff.net.2``,
  ``norm.query_norm.scale`` -> ``norm_q.weight``, ``linear2`` -> ``proj_out``, ...;
* the final layer's modulation: BFL's ``final_layer.adaLN_modulation.1`` outputs (shift, scale), diffusers'
  ``norm_out.linear`` (scale, shift): the two halves of its rows swap.

Without a config, the architecture comes from the shapes: the hidden width and ``in_channels`` from ``img_in``
(``out_channels`` from ``final_layer.linear``; more in than out: FLUX.1 Fill's 384 or Depth / Canny's 128,
:mod:`sdengine.pipeline.flux_fill`),
the head width from the query norm's scale (heads = hidden / head width: 24 x 128 in FLUX.1), the text width from
``txt_in``, the pooled width from ``vector_in``, the block counts from the indices (0..N-1 without gaps), dev
from ``guidance_in``. The RoPE split of a head is not in the shapes: (16, 56, 56) for a 128-wide head (FLUX.1's),
else ``axes_dims_rope=`` must say it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.flux import FluxConfig, FluxTransformer

from .detect import FLUX_PREFIX, is_flux_state_dict
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    SafetensorsReader,
    StateDict,
    WeightsError,
    load_file,
    parse_dtype,
)
from .loading import check_keys, component_weight_files, parameters_on_meta

log = logging.getLogger(__name__)

FLUX1_AXES = (16, 56, 56)  # FLUX.1's RoPE split of its 128-wide heads
FLUX1_HEAD = 128
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's scaled float8 files: a marker tensor and ``*.scale_weight`` per layer

# The block names and the tables shared with Chroma's files (sdengine.weights.chroma_file: Flux's blocks without
# their modulation linears)
DOUBLE_BLOCK = re.compile(r"^double_blocks\.(\d+)\.")
SINGLE_BLOCK = re.compile(r"^single_blocks\.(\d+)\.")
OURS_DOUBLE_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.")
OURS_SINGLE_BLOCK = re.compile(r"^single_transformer_blocks\.(\d+)\.")

# BFL name -> diffusers name, for the tensors that are only renamed (weight and bias each)
_TOP = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
DOUBLE_RENAMES = {  # a double-stream block's attention outputs and MLPs (weight and bias each)
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_RENAMES = {"img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear", **DOUBLE_RENAMES}
DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
DOUBLE_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "txt_attn.qkv": ("attn.add_q_proj",
              "attn.add_k_proj", "attn.add_v_proj")}  # fmt: skip
_SINGLE_RENAMES = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
SINGLE_FUSED = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")  # linear1's row blocks, in order
_FINAL_MOD = ("final_layer.adaLN_modulation.1", "norm_out.linear")


def block_count(
    pattern: re.Pattern[str], keys: Iterable[str], what: str, where: str, model: str = "Flux", unit: str = "blocks "
) -> int:
    """How many blocks ``pattern`` numbers (0..N-1); a gap is one line naming the missing block."""
    found = sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})
    if found != list(range(len(found))):
        gap = next(i for i in range(len(found) + 1) if i not in found)
        raise WeightsError(f"{where}: {model} {what} {gap} is missing (has {unit}up to {found[-1]})")
    return len(found)


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """The two halves of a tensor's rows swapped: BFL's (shift, scale) final modulation <-> diffusers' (scale,
    shift). Its own inverse."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def strip_prefix(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """The transformer's tensors of a file: those under ComfyUI's ``model.diffusion_model.`` (prefix removed, any
    other tensors -- a bundled VAE or text encoder -- left out) or, without that prefix, all of them."""
    if not any(k.startswith(FLUX_PREFIX) for k in sd):
        return dict(sd)
    others = [k for k in sd if not k.startswith(FLUX_PREFIX)]
    if others:
        log.info("%s: reading model.diffusion_model.* only (%d other tensors left out)", where, len(others))
    return {k[len(FLUX_PREFIX) :]: v for k, v in sd.items() if k.startswith(FLUX_PREFIX)}


class TakeOnce:
    """A state dict's tensors, each taken once by name into ``out`` (a missing one, one that is not a tensor or one
    split into the wrong number of rows: one line naming it); what is left in ``src`` was not used."""

    def __init__(self, sd: Mapping[str, Any], where: str, model: str, missing: str) -> None:
        self.src = dict(sd)
        self.out: StateDict = {}
        self.where, self.model, self.missing = where, model, missing

    def take(self, name: str) -> torch.Tensor:
        t = self.src.pop(name, None)
        if t is None:
            raise WeightsError(
                f"{self.where}: missing {self.model} tensor {name} (the file is incomplete or not {self.missing})"
            )
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{self.where}: {name} is not a tensor")
        return t

    def split(self, name: str, sizes: list[int], targets: Iterable[str]) -> None:
        t = self.take(name)
        if t.ndim < 1 or t.shape[0] != sum(sizes):
            raise WeightsError(
                f"{self.where}: {name} has {t.shape[0] if t.ndim else 0} rows, expected {sum(sizes)} "
                f"({' + '.join(map(str, sizes))})"
            )
        for part, target in zip(t.split(sizes, dim=0), targets, strict=True):
            self.out[target] = part

    def left_over(self) -> None:
        """One line naming the tensors nothing took."""
        if self.src:
            shown = ", ".join(sorted(self.src)[:4])
            raise WeightsError(f"{self.where}: unexpected tensors beside the {self.model} transformer: {shown}")


def blocks_to_diffusers(
    t: TakeOnce,
    hidden: int,
    doubles: int,
    singles: int,
    double_renames: Mapping[str, str],
    single_renames: Mapping[str, str],
) -> None:
    """The double- and single-stream blocks of a BFL-named state dict (Flux's, Chroma's: ``double_renames`` /
    ``single_renames`` say which linears a block has besides the shared tables) -> diffusers' names, fused
    projections split by ``hidden``-row blocks."""
    for i in range(doubles):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in double_renames.items():
            for p in ("weight", "bias"):
                t.out[f"{b}{ours}.{p}"] = t.take(f"{a}{bfl}.{p}")
        for bfl, ours in DOUBLE_NORMS.items():
            t.out[b + ours] = t.take(a + bfl)
        for bfl, targets in DOUBLE_QKV.items():
            for p in ("weight", "bias"):
                t.split(f"{a}{bfl}.{p}", [hidden] * 3, [f"{b}{x}.{p}" for x in targets])
    for i in range(singles):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, ours in single_renames.items():
            for p in ("weight", "bias"):
                t.out[f"{b}{ours}.{p}"] = t.take(f"{a}{bfl}.{p}")
        for bfl, ours in SINGLE_NORMS.items():
            t.out[b + ours] = t.take(a + bfl)
        fused = t.src.get(f"{a}linear1.weight")
        rows = int(fused.shape[0]) if isinstance(fused, torch.Tensor) and fused.ndim == 2 else 0
        sizes = [hidden, hidden, hidden, rows - 3 * hidden if rows > 3 * hidden else 4 * hidden]
        for p in ("weight", "bias"):
            t.split(f"{a}linear1.{p}", sizes, [f"{b}{x}.{p}" for x in SINGLE_FUSED])


def blocks_to_bfl(
    src: dict[str, torch.Tensor],
    out: StateDict,
    doubles: int,
    singles: int,
    double_renames: Mapping[str, str],
    single_renames: Mapping[str, str],
) -> None:
    """The inverse of :func:`blocks_to_diffusers`: the blocks' tensors popped from ``src`` (diffusers' names) into
    ``out`` in BFL's, projections fused again."""
    for i in range(doubles):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in double_renames.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = src.pop(f"{b}{ours}.{p}")
        for bfl, ours in DOUBLE_NORMS.items():
            out[a + bfl] = src.pop(b + ours)
        for bfl, targets in DOUBLE_QKV.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = torch.cat([src.pop(f"{b}{x}.{p}") for x in targets])
    for i in range(singles):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, ours in single_renames.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = src.pop(f"{b}{ours}.{p}")
        for bfl, ours in SINGLE_NORMS.items():
            out[a + bfl] = src.pop(b + ours)
        for p in ("weight", "bias"):
            out[f"{a}linear1.{p}"] = torch.cat([src.pop(f"{b}{x}.{p}") for x in SINGLE_FUSED])


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor], where: str = "<state dict>") -> StateDict:
    """BFL's names (prefix already stripped) -> diffusers' ``FluxTransformer2DModel`` names (sdengine's): fused
    projections split, the final modulation's halves swapped. Every tensor is used once: a missing one or one
    left over is a one-line :class:`WeightsError`."""
    t = TakeOnce(sd, where, "Flux", "a Flux model")
    img_in = t.take("img_in.weight")
    hidden = int(img_in.shape[0])
    t.out["x_embedder.weight"] = img_in
    keys = list(t.src)
    doubles = block_count(DOUBLE_BLOCK, keys, "double-stream block", where)
    singles = block_count(SINGLE_BLOCK, keys, "single-stream block", where)
    for bfl, ours in _TOP.items():
        if bfl.startswith("guidance_in.") and not any(k.startswith("guidance_in.") for k in t.src):
            continue  # schnell
        for p in ("weight", "bias"):
            if bfl == "img_in" and p == "weight":
                continue
            t.out[f"{ours}.{p}"] = t.take(f"{bfl}.{p}")
    for p in ("weight", "bias"):
        t.out[f"{_FINAL_MOD[1]}.{p}"] = swap_halves(t.take(f"{_FINAL_MOD[0]}.{p}"))
    blocks_to_diffusers(t, hidden, doubles, singles, _DOUBLE_RENAMES, _SINGLE_RENAMES)
    t.left_over()
    return t.out


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`bfl_to_diffusers`: diffusers' (sdengine's) names -> BFL's, projections fused
    again, the final modulation's halves swapped back (what ``flux1-*.safetensors`` hold)."""
    src = dict(sd)
    out: StateDict = {}
    top = {ours: bfl for bfl, ours in _TOP.items()}
    for ours, bfl in top.items():
        for p in ("weight", "bias"):
            if f"{ours}.{p}" in src:
                out[f"{bfl}.{p}"] = src.pop(f"{ours}.{p}")
    for p in ("weight", "bias"):
        out[f"{_FINAL_MOD[0]}.{p}"] = swap_halves(src.pop(f"{_FINAL_MOD[1]}.{p}"))
    doubles = block_count(OURS_DOUBLE_BLOCK, list(src), "double-stream block", "<state dict>")
    singles = block_count(OURS_SINGLE_BLOCK, list(src), "single-stream block", "<state dict>")
    blocks_to_bfl(src, out, doubles, singles, _DOUBLE_RENAMES, _SINGLE_RENAMES)
    if src:
        raise WeightsError(f"unexpected tensors in a Flux state dict: {', '.join(sorted(src)[:4])}")
    return out


def tensor_shape(sd: Mapping[str, Any], key: str, ndim: int, where: str, model: str = "Flux") -> tuple[int, ...]:
    """The shape of ``sd[key]``, an ``ndim``-d tensor (missing or another rank: one line)."""
    t = sd.get(key)
    if t is None:
        missing = "a Flux model" if model == "Flux" else model
        raise WeightsError(f"{where}: missing {model} tensor {key} (the file is incomplete or not {missing})")
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        have = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise WeightsError(f"{where}: {key} should be {ndim}-d, it is {have}")
    return tuple(int(s) for s in t.shape)


def flux_like_shapes(
    sd: Mapping[str, Any],
    where: str,
    axes_dims_rope: tuple[int, ...] | None,
    *,
    model: str = "Flux",
    released: str = "FLUX.1's",
    hint: str = "give axes_dims_rope, or use a diffusers folder with config.json",
) -> dict[str, Any]:
    """The config fields Flux's and Chroma's transformers share, read off a state dict in diffusers' names (the
    module docstring): widths, block counts, the head (from the first block's query norm) and the RoPE split
    (``axes_dims_rope``, or FLUX.1's for a 128-wide head; another width without it is one line ending in ``hint``)."""
    hidden, in_channels = tensor_shape(sd, "x_embedder.weight", 2, where, model)
    out_channels = tensor_shape(sd, "proj_out.weight", 2, where, model)[0]
    joint = tensor_shape(sd, "context_embedder.weight", 2, where, model)[1]
    doubles = block_count(OURS_DOUBLE_BLOCK, list(sd), "double-stream block", where, model)
    singles = block_count(OURS_SINGLE_BLOCK, list(sd), "single-stream block", where, model)
    if doubles:
        head = tensor_shape(sd, "transformer_blocks.0.attn.norm_q.weight", 1, where, model)[0]
    elif singles:
        head = tensor_shape(sd, "single_transformer_blocks.0.attn.norm_q.weight", 1, where, model)[0]
    else:
        raise WeightsError(f"{where}: a {model} transformer without blocks (no double_blocks.N or single_blocks.N)")
    if head < 1 or hidden % head:
        raise WeightsError(f"{where}: a {head}-wide attention head does not divide the {hidden}-wide tokens")
    if axes_dims_rope is None:
        if head != FLUX1_HEAD:
            raise WeightsError(
                f"{where}: cannot tell the RoPE split of a {head}-wide head from the shapes ({released} heads are "
                f"{FLUX1_HEAD} wide); {hint}"
            )
        axes_dims_rope = FLUX1_AXES
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "num_layers": doubles,
        "num_single_layers": singles,
        "attention_head_dim": head,
        "num_attention_heads": hidden // head,
        "joint_attention_dim": joint,
        "axes_dims_rope": tuple(axes_dims_rope),
    }


def make_config(cls: Callable[..., Any], where: str, **fields: Any) -> Any:
    """``cls(**fields)``; a config error is a :class:`WeightsError` naming ``where``."""
    try:
        return cls(**fields)
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def config_from_shapes(
    sd: Mapping[str, Any], where: str = "<state dict>", *, axes_dims_rope: tuple[int, ...] | None = None
) -> FluxConfig:
    """The architecture of a Flux state dict in diffusers' names (see the module docstring for what is read
    where). ``axes_dims_rope``: the RoPE split of a head, needed when the head is not FLUX.1's 128 numbers."""
    shared = flux_like_shapes(sd, where, axes_dims_rope)
    in_channels, out_channels = shared["in_channels"], shared["out_channels"]
    if in_channels < out_channels:
        raise WeightsError(
            f"{where}: the image tokens have {in_channels} numbers in and {out_channels} out: not a Flux transformer "
            "(FLUX.1 takes as many as it gives, Fill, Depth and Canny more)"
        )
    pooled = tensor_shape(sd, "time_text_embed.text_embedder.linear_1.weight", 2, where)[1]
    if shared["num_single_layers"]:
        hidden = shared["num_attention_heads"] * shared["attention_head_dim"]
        mlp = tensor_shape(sd, "single_transformer_blocks.0.proj_mlp.weight", 2, where)[0]
        if mlp != 4 * hidden:
            raise WeightsError(f"{where}: the single blocks' MLP is {mlp} wide, Flux's is 4 x {hidden} = {4 * hidden}")
    guidance = "time_text_embed.guidance_embedder.linear_1.weight" in sd
    config: FluxConfig = make_config(
        FluxConfig, where, **shared, pooled_projection_dim=pooled, guidance_embeds=guidance
    )
    return config


def _to_ours(sd: Mapping[str, Any], where: str) -> StateDict:
    """Any accepted layout's tensors -> diffusers' names."""
    sd = _unscale_fp8(strip_prefix(sd, where), where)
    if any(k.startswith("distilled_guidance_layer.") for k in sd):
        raise WeightsError(
            f"{where}: a Chroma model (Flux-derived, one modulation network for all blocks: "
            "distilled_guidance_layer.*), not FLUX.1; not supported"
        )
    if is_flux_state_dict(sd) or any(k.startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in sd):
        return bfl_to_diffusers(sd, where)
    if any(k.startswith(("transformer_blocks.", "single_transformer_blocks.", "x_embedder.")) for k in sd):
        return dict(sd)
    if any(k.startswith("joint_blocks.") for k in sd):
        raise WeightsError(f"{where}: an SD3 transformer (joint_blocks.*), not a Flux one")
    shown = ", ".join(sorted(sd)[:4]) or "none"
    raise WeightsError(f"{where}: not a Flux transformer (no double_blocks.* or transformer_blocks.*; it has {shown})")


def _unscale_fp8(sd: dict[str, Any], where: str) -> dict[str, Any]:
    """ComfyUI's scaled float8: each ``X.weight`` times its ``X.scale_weight`` (the file stores weight / scale in
    float8); the marker and the activation scales (``scale_input``, for float8 matmuls) are dropped."""
    if SCALED_FP8_MARKER not in sd:
        return sd
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k == SCALED_FP8_MARKER or k.endswith(".scale_input"):
            continue
        if k.endswith(".scale_weight"):
            weight = k[: -len("scale_weight")] + "weight"
            if weight not in sd:
                raise WeightsError(f"{where}: {k} scales a weight that is not there ({weight})")
            continue
        scale = sd.get(k[: -len("weight")] + "scale_weight") if k.endswith(".weight") else None
        if scale is not None:
            if not isinstance(scale, torch.Tensor) or scale.numel() not in (1, v.shape[0]):
                raise WeightsError(f"{where}: {k[: -len('weight')]}scale_weight is not one number or one per row")
            s = scale.float().reshape(-1, *([1] * (v.ndim - 1))) if scale.numel() > 1 else scale.float()
            v = (v.float() * s).to(v.dtype if v.dtype not in FLOAT8 else torch.float32)
        out[k] = v
    return out


def stored_dtype(path: Path) -> torch.dtype | None:
    """The dtype most of a safetensors file's floating tensors have, float8 if any has it (None for other
    files)."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    with SafetensorsReader(path) as r:
        counts: dict[torch.dtype, int] = {}
        for name in r.names:
            dt = r.dtype(name)
            if dt.is_floating_point:
                counts[dt] = counts.get(dt, 0) + 1
    float8 = [d for d in counts if d in FLOAT8]  # a float8 file keeps its biases, norms and scales wider
    return float8[0] if float8 else max(counts, key=lambda d: counts[d]) if counts else None


def compute_dtype(stored: torch.dtype | None, dtype: str | torch.dtype | None) -> torch.dtype:
    """The dtype the model runs in: ``dtype`` when given (float8 is storage, not a compute dtype), else the
    file's own, bfloat16 for a float8 file (FLUX.1's training dtype), float32 when nothing says."""
    target = parse_dtype(dtype)
    if target in FLOAT8:
        raise WeightsError("float8 is a storage dtype: run the Flux transformer in bf16, fp16 or fp32")
    if target is not None:
        return target
    if stored in FLOAT8:
        return torch.bfloat16
    return stored if stored in (torch.float32, torch.float16, torch.bfloat16) else torch.float32


def _keeps_its_dtype(name: str) -> bool:
    # scaled float8's scales stay float32 until they have multiplied their weight (rounding them first costs digits)
    return name.endswith((".scale_weight", ".scale_input"))


def read_transformer_tensors(path: Path, dtype: torch.dtype) -> StateDict:
    """The transformer's tensors of one weights file (ComfyUI's prefix removed, anything beside it left unread),
    floating ones in ``dtype``. A safetensors file's tensors already in ``dtype`` stay zero-copy views of its
    memory map; the others are read one at a time with ordinary I/O and converted (float8 -> bf16: the converted
    weights' memory, not the file's as well), so a bundled VAE or T5 encoder is never read."""
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return strip_prefix(load_file(path, dtype)[0], str(path))
    views = load_file(path)[0]  # views of the map: nothing is read yet
    prefixed = any(k.startswith(FLUX_PREFIX) for k in views)
    chosen = strip_prefix(views, str(path))
    with SafetensorsReader(path) as reader:
        for k, v in chosen.items():
            if v.is_floating_point() and v.dtype != dtype and not _keeps_its_dtype(k):
                chosen[k] = reader.read(FLUX_PREFIX + k if prefixed else k).to(dtype)
    return chosen


def read_shards(files: list[Path], dtype: torch.dtype) -> StateDict:
    """The transformer tensors of a model's weight files (shards), in ``dtype``; a tensor in two shards is one line."""
    sd: StateDict = {}
    for f in files:
        part = read_transformer_tensors(f, dtype)
        both = sd.keys() & part.keys()
        if both:
            raise WeightsError(f"{f}: tensor {sorted(both)[0]} is also in another shard")
        sd.update(part)
    return sd


def flux_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: FluxConfig | None = None,
    axes_dims_rope: tuple[int, ...] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> FluxTransformer:
    """A :class:`FluxTransformer` from a state dict in any accepted layout; the config from the shapes unless
    given (a given one must fit them: one line naming the first difference)."""
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    ours = _to_ours(sd, where)
    shapes = config_from_shapes(
        ours, where, axes_dims_rope=axes_dims_rope or (config.axes_dims_rope if config is not None else None)
    )
    check_config_fits(config, shapes, where)
    return build_from_state(
        FluxTransformer, config or shapes, ours, f"{where}: Flux transformer", device, dtype, stored
    )


def check_config_fits(config: Any, shapes: Any, where: str) -> None:
    """A given config (a dataclass) must equal the one read from the weights' shapes (``out_channels`` None =
    ``in_channels``): one line naming the first field that differs."""
    if config is None:
        return
    given = dataclasses.replace(config, out_channels=config.out_channels or config.in_channels)
    diff = next((f.name for f in dataclasses.fields(shapes) if getattr(shapes, f.name) != getattr(given, f.name)), None)
    if diff is not None:
        raise WeightsError(
            f"{where}: the config says {diff}={getattr(given, diff)}, the weights {getattr(shapes, diff)}"
        )


def build_from_state(
    cls: Any,
    cfg: Any,
    ours: Mapping[str, Any],
    name: str,
    device: str | torch.device,
    dtype: str | torch.dtype | None,
    stored: torch.dtype | None,
) -> Any:
    """``cls(cfg)`` built on the meta device and given ``ours`` (sdengine's names; every tensor floating-point, the
    names and shapes checked against the model's, one line naming the first mismatch) on ``device`` in the compute
    dtype (:func:`compute_dtype` of ``stored`` and ``dtype``), in eval mode without gradients."""
    target = compute_dtype(stored, dtype)
    where = name.rsplit(": ", 1)[0]
    for k, v in ours.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            have = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
            raise WeightsError(f"{where}: {k} holds {have}, not floating-point weights")
    with parameters_on_meta():
        model = cls(cfg)
    check_keys(model.state_dict(), ours, name=name)
    dev = torch.device(device)
    model.load_state_dict({k: v.to(device=dev, dtype=target) for k, v in ours.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_transformer(
    path: str | Path,
    *,
    what: str,
    from_diffusers: Callable[[dict[str, Any]], Any],
    from_state: Callable[..., Any],
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    **file_kw: Any,
) -> Any:
    """A diffusion transformer (``what``: "Flux", "Chroma") from a diffusers folder (pipeline or ``transformer/``:
    ``from_diffusers`` reads its config.json) or a single file, built by ``from_state(sd, where, config=, device=,
    dtype=, **file_kw)`` (``file_kw``: for a single file only) on ``device`` in ``dtype`` (default: the file's;
    bfloat16 for float8 weights)."""
    p = Path(path)
    if p.is_dir():
        folder = next((f for f in (p / "transformer", p) if (f / "config.json").is_file()), None)
        if folder is None:
            raise WeightsError(f"{p}: not a {what} transformer folder (no transformer/config.json or config.json)")
        cfg_path = folder / "config.json"
        try:
            raw = json.loads(cfg_path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
            raise WeightsError(f"{cfg_path}: cannot read the config ({type(e).__name__})") from None
        try:
            config = from_diffusers(raw)
        except ConfigError as e:
            raise WeightsError(f"{cfg_path}: {e}") from None
        files = component_weight_files(folder)
        target = compute_dtype(stored_dtype(files[0]), dtype)
        model = from_state(read_shards(files, target), str(folder), config=config, device=device, dtype=target)
    else:
        if not p.is_file():
            raise WeightsError(f"{p}: no such {what} transformer file or folder")
        if p.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise WeightsError(f"{p}: expected a .safetensors file or a diffusers folder")
        target = compute_dtype(stored_dtype(p), dtype)
        model = from_state(read_shards([p], target), str(p), device=device, dtype=target, **file_kw)
    model.name = p.name
    return model


def load_flux_transformer(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    axes_dims_rope: tuple[int, ...] | None = None,
) -> FluxTransformer:
    """A Flux transformer from a diffusers folder (pipeline or ``transformer/``) or a single file (see the
    module docstring), on ``device`` in ``dtype`` (default: the file's dtype; bfloat16 for float8 weights).
    ``axes_dims_rope`` is needed only for a single file whose heads are not 128 wide."""
    model: FluxTransformer = load_transformer(
        path,
        what="Flux",
        from_diffusers=FluxConfig.from_diffusers,
        from_state=flux_from_state,
        device=device,
        dtype=dtype,
        axes_dims_rope=axes_dims_rope,
    )
    return model


__all__ = [
    "DOUBLE_BLOCK",
    "DOUBLE_NORMS",
    "DOUBLE_QKV",
    "DOUBLE_RENAMES",
    "OURS_DOUBLE_BLOCK",
    "OURS_SINGLE_BLOCK",
    "SINGLE_BLOCK",
    "SINGLE_FUSED",
    "SINGLE_NORMS",
    "TakeOnce",
    "block_count",
    "blocks_to_bfl",
    "blocks_to_diffusers",
    "FLUX1_AXES",
    "flux_like_shapes",
    "make_config",
    "tensor_shape",
    "bfl_to_diffusers",
    "build_from_state",
    "check_config_fits",
    "compute_dtype",
    "config_from_shapes",
    "diffusers_to_bfl",
    "flux_from_state",
    "is_flux_state_dict",
    "load_flux_transformer",
    "load_transformer",
    "read_shards",
    "read_transformer_tensors",
    "stored_dtype",
    "strip_prefix",
    "swap_halves",
]
