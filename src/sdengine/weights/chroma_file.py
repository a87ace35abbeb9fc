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
from sdengine.models.config_checks import ConfigError

from .detect import FLUX_PREFIX, is_chroma_state_dict
from .flux_file import (
    DOUBLE_BLOCK,
    DOUBLE_NORMS,
    DOUBLE_QKV,
    DOUBLE_RENAMES,
    FLUX1_AXES,
    OURS_DOUBLE_BLOCK,
    OURS_SINGLE_BLOCK,
    SINGLE_BLOCK,
    SINGLE_FUSED,
    SINGLE_NORMS,
    block_count,
    build_from_state,
    check_config_fits,
    load_transformer,
)
from .io import StateDict, WeightsError

FLUX1_HEAD = 128
SCALED_FP8 = "scaled_fp8"  # ComfyUI's scaled float8 marker
_GUIDE = re.compile(r"^distilled_guidance_layer\.layers\.(\d+)\.")

_TOP = {  # only renamed (weight and bias each)
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "final_layer.linear": "proj_out",
    "distilled_guidance_layer.in_proj": "distilled_guidance_layer.in_proj",
    "distilled_guidance_layer.out_proj": "distilled_guidance_layer.out_proj",
}


def _count(pattern: re.Pattern[str], keys: Iterable[str], what: str, where: str) -> int:
    return block_count(pattern, keys, what, where, model="Chroma", unit="")


def bfl_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> StateDict:
    """Chroma's single-file names (prefix stripped) -> diffusers' ``ChromaTransformer2DModel`` names; every tensor
    used once (a missing or a left-over one: one line)."""
    src = dict(sd)
    out: StateDict = {}

    def take(name: str) -> torch.Tensor:
        t = src.pop(name, None)
        if t is None:
            raise WeightsError(f"{where}: missing Chroma tensor {name} (the file is incomplete or not Chroma)")
        if not isinstance(t, torch.Tensor):
            raise WeightsError(f"{where}: {name} is not a tensor")
        return t

    def split(name: str, sizes: list[int], targets: Iterable[str]) -> None:
        t = take(name)
        if t.ndim < 1 or t.shape[0] != sum(sizes):
            raise WeightsError(f"{where}: {name} has {t.shape[0] if t.ndim else 0} rows, expected {sum(sizes)}")
        for part, target in zip(t.split(sizes, dim=0), targets, strict=True):
            out[target] = part

    if SCALED_FP8 in src:
        raise WeightsError(
            f"{where}: ComfyUI's scaled float8 Chroma files are not supported; use a bf16 or plain fp8 file"
        )
    img_in = take("img_in.weight")
    hidden = int(img_in.shape[0])
    out["x_embedder.weight"] = img_in
    keys = list(src)
    doubles = _count(DOUBLE_BLOCK, keys, "double-stream block", where)
    singles = _count(SINGLE_BLOCK, keys, "single-stream block", where)
    guides = _count(_GUIDE, keys, "distilled_guidance_layer layer", where)
    for bfl, ours in _TOP.items():
        for p in ("weight", "bias"):
            if bfl == "img_in" and p == "weight":
                continue
            out[f"{ours}.{p}"] = take(f"{bfl}.{p}")
    for i in range(guides):
        a, b = f"distilled_guidance_layer.layers.{i}.", f"distilled_guidance_layer.layers.{i}."
        for bfl, ours in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                out[f"{b}{ours}.{p}"] = take(f"{a}{bfl}.{p}")
        out[f"distilled_guidance_layer.norms.{i}.weight"] = take(f"distilled_guidance_layer.norms.{i}.scale")
    for i in range(doubles):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in DOUBLE_RENAMES.items():
            for p in ("weight", "bias"):
                out[f"{b}{ours}.{p}"] = take(f"{a}{bfl}.{p}")
        for bfl, ours in DOUBLE_NORMS.items():
            out[b + ours] = take(a + bfl)
        for bfl, targets in DOUBLE_QKV.items():
            for p in ("weight", "bias"):
                split(f"{a}{bfl}.{p}", [hidden] * 3, [f"{b}{t}.{p}" for t in targets])
    for i in range(singles):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}proj_out.{p}"] = take(f"{a}linear2.{p}")
        for bfl, ours in SINGLE_NORMS.items():
            out[b + ours] = take(a + bfl)
        fused = src.get(f"{a}linear1.weight")
        rows = int(fused.shape[0]) if isinstance(fused, torch.Tensor) and fused.ndim == 2 else 0
        sizes = [hidden, hidden, hidden, rows - 3 * hidden if rows > 3 * hidden else 4 * hidden]
        for p in ("weight", "bias"):
            split(f"{a}linear1.{p}", sizes, [f"{b}{t}.{p}" for t in SINGLE_FUSED])
    if src:
        shown = ", ".join(sorted(src)[:4])
        raise WeightsError(f"{where}: unexpected tensors beside the Chroma transformer: {shown}")
    return out


def diffusers_to_bfl(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """The inverse of :func:`bfl_to_diffusers` (diffusers' names -> a Chroma single file's)."""
    src = dict(sd)
    out: StateDict = {}
    for bfl, ours in _TOP.items():
        for p in ("weight", "bias"):
            out[f"{bfl}.{p}"] = src.pop(f"{ours}.{p}")
    for i in range(_count(_GUIDE, list(src), "distilled_guidance_layer layer", "<state dict>")):
        a = f"distilled_guidance_layer.layers.{i}."
        for bfl, ours in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = src.pop(f"{a}{ours}.{p}")
        out[f"distilled_guidance_layer.norms.{i}.scale"] = src.pop(f"distilled_guidance_layer.norms.{i}.weight")
    for i in range(_count(OURS_DOUBLE_BLOCK, list(src), "double-stream block", "<state dict>")):
        a, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, ours in DOUBLE_RENAMES.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = src.pop(f"{b}{ours}.{p}")
        for bfl, ours in DOUBLE_NORMS.items():
            out[a + bfl] = src.pop(b + ours)
        for bfl, targets in DOUBLE_QKV.items():
            for p in ("weight", "bias"):
                out[f"{a}{bfl}.{p}"] = torch.cat([src.pop(f"{b}{t}.{p}") for t in targets])
    for i in range(_count(OURS_SINGLE_BLOCK, list(src), "single-stream block", "<state dict>")):
        a, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{a}linear2.{p}"] = src.pop(f"{b}proj_out.{p}")
        for bfl, ours in SINGLE_NORMS.items():
            out[a + bfl] = src.pop(b + ours)
        for p in ("weight", "bias"):
            out[f"{a}linear1.{p}"] = torch.cat([src.pop(f"{b}{t}.{p}") for t in SINGLE_FUSED])
    if src:
        raise WeightsError(f"unexpected tensors in a Chroma state dict: {', '.join(sorted(src)[:4])}")
    return out


def _shape(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        have = tuple(t.shape) if isinstance(t, torch.Tensor) else "missing" if t is None else type(t).__name__
        raise WeightsError(f"{where}: Chroma tensor {key} should be {ndim}-d, it is {have}")
    return tuple(int(s) for s in t.shape)


def config_from_shapes(
    sd: Mapping[str, Any], where: str = "<state dict>", *, axes_dims_rope: tuple[int, ...] | None = None
) -> ChromaConfig:
    """The architecture of a Chroma state dict in diffusers' names (module docstring)."""
    hidden, in_channels = _shape(sd, "x_embedder.weight", 2, where)
    out_channels = _shape(sd, "proj_out.weight", 2, where)[0]
    joint = _shape(sd, "context_embedder.weight", 2, where)[1]
    approx_hidden, approx_in = _shape(sd, "distilled_guidance_layer.in_proj.weight", 2, where)
    layers = _count(_GUIDE, list(sd), "distilled_guidance_layer layer", where)
    doubles = _count(OURS_DOUBLE_BLOCK, list(sd), "double-stream block", where)
    singles = _count(OURS_SINGLE_BLOCK, list(sd), "single-stream block", where)
    if doubles:
        head = _shape(sd, "transformer_blocks.0.attn.norm_q.weight", 1, where)[0]
    elif singles:
        head = _shape(sd, "single_transformer_blocks.0.attn.norm_q.weight", 1, where)[0]
    else:
        raise WeightsError(f"{where}: a Chroma transformer without blocks (no double_blocks.N or single_blocks.N)")
    if head < 1 or hidden % head:
        raise WeightsError(f"{where}: a {head}-wide attention head does not divide the {hidden}-wide tokens")
    if axes_dims_rope is None:
        if head != FLUX1_HEAD:
            raise WeightsError(
                f"{where}: cannot tell the RoPE split of a {head}-wide head from the shapes (Chroma's heads are "
                f"{FLUX1_HEAD} wide); use a diffusers folder with config.json"
            )
        axes_dims_rope = FLUX1_AXES
    try:
        return ChromaConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            num_layers=doubles,
            num_single_layers=singles,
            attention_head_dim=head,
            num_attention_heads=hidden // head,
            joint_attention_dim=joint,
            axes_dims_rope=tuple(axes_dims_rope),
            approximator_num_channels=approx_in,
            approximator_hidden_dim=approx_hidden,
            approximator_layers=layers,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


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
