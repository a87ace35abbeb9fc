"""Z-Image transformer files: diffusers ``transformer/`` folders (sharded too) and single ``.safetensors`` files in
the original (Tongyi-MAI / ComfyUI, ``z_image_turbo_bf16.safetensors``) or diffusers' names, with or without
ComfyUI's ``model.diffusion_model.`` prefix.

The model keeps diffusers' ``ZImageTransformer2DModel`` names (:mod:`sdengine.models.z_image`). The original layout
differs in a few names, which :func:`original_to_diffusers` renames (the facts of diffusers'
``convert_z_image_transformer_checkpoint_to_diffusers``):

* ``x_embedder.*`` -> ``all_x_embedder.2-1.*``, ``final_layer.*`` -> ``all_final_layer.2-1.*``;
* a block's ``attention.qkv.weight`` (q, k and v stacked, 3 x dim rows) -> ``attention.to_q/k/v.weight``;
  ``attention.out`` -> ``attention.to_out.0``; ``attention.q_norm`` / ``k_norm`` -> ``norm_q`` / ``norm_k``;
* an unused ``norm_final.weight`` is dropped.

A single file's config comes from its shapes: the width and the latent channels from the patch embedder, the
caption width from ``cap_embedder.1``, the head width from the q norm, the layer counts from the indices. What the
shapes do not say is the release's (:data:`sdengine.models.z_image.Z_IMAGE_TURBO`: RoPE axes 32 + 48 + 48 for
128-wide heads, positions under 1536 / 512 / 512, theta 256, ``t_scale`` 1000, eps 1e-5); other head widths are
refused. Reading, dtype choice and the meta-device build are Flux's
(:func:`sdengine.weights.flux_file.load_transformer`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.z_image import PATCH_KEY, Z_IMAGE_TURBO, ZImageConfig, ZImageTransformer

from .flux_file import build_from_state, load_transformer
from .io import WeightsError

PREFIX = "model.diffusion_model."  # ComfyUI's diffusion-model prefix
# the tensors that tell a Z-Image transformer (either layout): the pad tokens and a main layer's modulation (a
# Linear without SiLU: index 0, where Lumina 2's NextDiT has index 1)
MARKERS = ("x_pad_token", "cap_pad_token", "layers.0.adaLN_modulation.0.weight")
_LAYER = re.compile(r"^layers\.(\d+)\.")
_NOISE = re.compile(r"^noise_refiner\.(\d+)\.")
_CONTEXT = re.compile(r"^context_refiner\.(\d+)\.")
_RENAMES = (
    (".attention.out.", ".attention.to_out.0."),
    (".attention.q_norm.", ".attention.norm_q."),
    (".attention.k_norm.", ".attention.norm_k."),
)


def is_z_image_state_dict(keys: Iterable[str]) -> bool:
    """Whether these tensor names hold a Z-Image transformer (either layout, ComfyUI's prefix or not): the weights,
    not a LoRA for them."""
    names = set(keys)
    if any(".lora_" in n or n.startswith("lora_") or ".lora_down." in n for n in names):
        return False
    return all(m in names for m in MARKERS) or all(PREFIX + m in names for m in MARKERS)


def original_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """A Z-Image state dict in either layout (ComfyUI's prefix removed: only the prefixed tensors are kept where it is
    there) -> diffusers' names (module docstring)."""
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX) :]: v for k, v in sd.items() if k.startswith(PREFIX)}
    out: dict[str, Any] = {}
    for k, v in sd.items():
        if k == "norm_final.weight":
            continue
        if k.startswith("x_embedder."):
            k = f"all_x_embedder.{PATCH_KEY}." + k[len("x_embedder.") :]
        elif k.startswith("final_layer."):
            k = f"all_final_layer.{PATCH_KEY}." + k[len("final_layer.") :]
        for old, new in _RENAMES:
            k = k.replace(old, new)
        if k.endswith(".attention.qkv.weight"):
            if not isinstance(v, torch.Tensor) or v.ndim != 2 or v.shape[0] % 3:
                raise WeightsError(f"{where}: {k} is not a (3 x dim, dim) matrix of q, k and v")
            base = k[: -len("qkv.weight")]
            for name, part in zip(("to_q", "to_k", "to_v"), v.chunk(3, dim=0), strict=True):
                out[f"{base}{name}.weight"] = part
            continue
        if k in out:
            raise WeightsError(f"{where}: {k} is in the file twice (in both layouts)")
        out[k] = v
    return out


def _shape(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> tuple[int, ...]:
    v = sd.get(key)
    if not isinstance(v, torch.Tensor) or v.ndim != ndim:
        raise WeightsError(f"{where}: not a Z-Image transformer ({key} missing or of the wrong shape)")
    return tuple(v.shape)


def _count(sd: Mapping[str, Any], pattern: re.Pattern[str]) -> int | None:
    found = {int(m.group(1)) for k in sd if (m := pattern.match(k))}
    return len(found) if found == set(range(len(found))) else None


def config_from_shapes(sd: Mapping[str, Any], where: str = "<state dict>") -> ZImageConfig:
    """The architecture a Z-Image state dict (diffusers' names) describes; what the shapes cannot tell is the
    release's (module docstring)."""
    dim, patch = _shape(sd, f"all_x_embedder.{PATCH_KEY}.weight", 2, where)
    _, cap = _shape(sd, "cap_embedder.1.weight", 2, where)
    qk_norm = "layers.0.attention.norm_q.weight" in sd
    head = _shape(sd, "layers.0.attention.norm_q.weight", 1, where)[0] if qk_norm else 0
    layers, noise, context = (_count(sd, p) for p in (_LAYER, _NOISE, _CONTEXT))
    if not layers or noise is None or noise != context or patch % 4:
        raise WeightsError(f"{where}: not a Z-Image transformer (its layers or widths do not fit)")
    if head != 128:
        raise WeightsError(
            f"{where}: {'no q/k norms' if not qk_norm else f'{head}-wide heads'}: a single file's config is read "
            "for Z-Image's 128-wide heads with q/k norms only (use a diffusers folder with its config.json)"
        )
    if dim % head:
        raise WeightsError(f"{where}: not a Z-Image transformer (width {dim} is not a multiple of the head's {head})")
    try:
        return dataclasses.replace(
            Z_IMAGE_TURBO,
            in_channels=patch // 4,
            dim=dim,
            n_layers=layers,
            n_refiner_layers=noise,
            n_heads=dim // head,
            n_kv_heads=dim // head,
            cap_feat_dim=cap,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def z_image_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: ZImageConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> ZImageTransformer:
    """A :class:`ZImageTransformer` from a state dict in either layout; the config from the shapes unless given (a
    given one's widths and counts must fit them: one line naming the first difference)."""
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    ours = original_to_diffusers(sd, where)
    if config is None:
        config = config_from_shapes(ours, where)
    else:
        dim, patch = _shape(ours, f"all_x_embedder.{PATCH_KEY}.weight", 2, where)
        _, cap = _shape(ours, "cap_embedder.1.weight", 2, where)
        for name, have in (("dim", dim), ("in_channels", patch // 4), ("cap_feat_dim", cap)):
            if getattr(config, name) != have:
                raise WeightsError(f"{where}: the config says {name}={getattr(config, name)}, the weights {have}")
    return build_from_state(ZImageTransformer, config, ours, f"{where}: Z-Image transformer", device, dtype, stored)


def load_z_image_transformer(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> ZImageTransformer:
    """A Z-Image transformer from a diffusers folder (pipeline or ``transformer/``) or a single file, on ``device``
    in ``dtype`` (default: the file's; bfloat16 for float8 weights)."""
    model: ZImageTransformer = load_transformer(
        path,
        what="Z-Image",
        from_diffusers=ZImageConfig.from_diffusers,
        from_state=z_image_from_state,
        device=device,
        dtype=dtype,
    )
    return model


__all__ = [
    "MARKERS",
    "PREFIX",
    "config_from_shapes",
    "is_z_image_state_dict",
    "load_z_image_transformer",
    "original_to_diffusers",
    "z_image_from_state",
]
