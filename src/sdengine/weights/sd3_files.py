"""Stable Diffusion 3 / 3.5 models on disk: what is where, and the parts other than the MMDiT and T5.

Two layouts:

- a diffusers folder (``model_index.json`` with ``_class_name`` ``StableDiffusion3Pipeline``, or its img2img /
  inpaint siblings): ``transformer/`` (the MMDiT, :mod:`sdengine.weights.mmdit_file`), ``vae/`` (a 16-channel
  ``AutoencoderKL`` with ``shift_factor`` and no quant convs), ``text_encoder/`` and ``text_encoder_2/`` (CLIP-L
  and OpenCLIP bigG, both ``CLIPTextModelWithProjection``), ``text_encoder_3/`` (T5-XXL,
  :mod:`sdengine.weights.t5_file`; absent or null in ``model_index.json`` when the model runs without it),
  ``tokenizer/``, ``tokenizer_2/``, ``tokenizer_3/`` and ``scheduler/scheduler_config.json``
  (``FlowMatchEulerDiscreteScheduler`` with its ``shift``);
- Stability's single files (``sd3_medium_incl_clips_t5xxlfp8.safetensors``, ``sd3.5_large.safetensors``, ...):
  ``model.diffusion_model.*`` (the MMDiT), ``first_stage_model.*`` (the VAE in the LDM layout), and optionally
  ``text_encoders.clip_l.transformer.*``, ``text_encoders.clip_g.transformer.*`` (transformers' names) and
  ``text_encoders.t5xxl.transformer.*``. Such a file carries no configs: the VAE's come from its shapes with SD3's
  scaling and shift factors (1.5305, 0.0609), the CLIP encoders' from theirs (64-wide heads; CLIP-L quick GELU,
  bigG exact GELU), the flow shift is SD3's 3.0.

Text encoders missing from a single file (``sd3_medium.safetensors`` has none) come from separate files:
ComfyUI's ``clip_l.safetensors`` / ``clip_g.safetensors`` (transformers' ``CLIPTextModelWithProjection`` names,
with or without the ``text_encoders.clip_X.transformer.`` prefix) and a T5 file (``t5xxl_fp16.safetensors``, any
layout :func:`sdengine.weights.t5_file.load_t5_encoder` reads), or a diffusers ``text_encoder*/`` folder.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError

from . import keymaps as km
from .detect import clip_config_from_weights, is_sd3_state_dict, vae_config_from_ldm, vae_layout_from_ldm
from .io import SAFETENSORS_SUFFIXES, StateDict, WeightsError, load_file, read_safetensors_header

SD3_PIPELINE_CLASSES = (
    "StableDiffusion3Pipeline",
    "StableDiffusion3Img2ImgPipeline",
    "StableDiffusion3InpaintPipeline",
)
SD3_VAE_SCALING_FACTOR = 1.5305  # Stability's SD3 / SD3.5 VAE (diffusers' vae/config.json)
SD3_VAE_SHIFT_FACTOR = 0.0609
SD3_SHIFT = 3.0  # the flow shift of every SD3 / SD3.5 release (scheduler_config.json "shift")
CLIP_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer."}
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "first_stage_model."
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SD3_SHIFT}


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the {what} ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: the {what} is not a JSON object")
    return obj


def is_sd3_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names an SD3 pipeline class."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return False
    return name in SD3_PIPELINE_CLASSES


def is_sd3_file(path: Path) -> bool:
    """A ``.safetensors`` file whose header names SD3's MMDiT (read without loading any tensor)."""
    if not path.is_file() or not path.name.lower().endswith(SAFETENSORS_SUFFIXES):
        return False
    try:
        entries, _, _ = read_safetensors_header(path)
    except (WeightsError, OSError, ValueError, RecursionError):  # not readable: the usual loader says why
        return False
    return is_sd3_state_dict(entries)


def is_sd3(path: str | Path) -> bool:
    """An SD3 / SD3.5 diffusers folder or single file."""
    p = Path(path)
    return is_sd3_folder(p) if p.is_dir() else is_sd3_file(p)


def folder_component(folder: Path, name: str) -> Path | None:
    """``folder/name`` when ``model_index.json`` lists that component (not null), None when it does not; listed
    but missing is a WeightsError (never a model silently run without it)."""
    index = _read_json(folder / "model_index.json", "model_index.json")
    entry = index.get(name)
    listed = isinstance(entry, list | tuple) and len(entry) == 2 and entry[0] is not None and entry[1] is not None
    sub = folder / name
    if listed and not sub.is_dir():
        raise WeightsError(f"{folder}: model_index.json lists {name} but the folder has no {name}/")
    return sub if listed else None


def scheduler_config(source: Path) -> dict[str, Any]:
    """The flow scheduler config of a folder (``scheduler/scheduler_config.json``), SD3's for a single file."""
    if source.is_dir():
        f = source / "scheduler" / "scheduler_config.json"
        if f.is_file():
            cfg = _read_json(f, "scheduler config")
            name = cfg.get("_class_name", "FlowMatchEulerDiscreteScheduler")
            if name != "FlowMatchEulerDiscreteScheduler":
                raise WeightsError(f"{f}: an SD3 model's scheduler is FlowMatchEulerDiscreteScheduler, not {name}")
            return cfg
    return dict(SD3_SCHEDULER)


# ------------------------------------------------------------------------------------------------ VAE


def load_sd3_vae(source: Path, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The model's own VAE: a folder's ``vae/`` or a single file's ``first_stage_model.*`` (LDM layout, SD3's
    scaling and shift factors)."""
    from sdengine.models.vae import AutoencoderKL, VAEConfig

    from .loading import build_on_meta, load_component_folder

    if source.is_dir():
        sub = source / "vae"
        if not (sub / "config.json").is_file():
            raise WeightsError(f"{source}: missing vae/config.json")
        sd, cfg = load_component_folder(sub, "vae")
    else:
        whole = load_file(source)[0]
        sd = {k.removeprefix(VAE_PREFIX): v for k, v in whole.items() if k.startswith(VAE_PREFIX)}
        if not sd:
            raise WeightsError(f"{source}: no VAE in this SD3 file (no {VAE_PREFIX}* weights)")
        cfg = vae_config_from_ldm(sd, sample_size=1024)
        cfg.update(scaling_factor=SD3_VAE_SCALING_FACTOR, shift_factor=SD3_VAE_SHIFT_FACTOR)
        renamed, unknown = km.vae_ldm_to_diffusers(sd, vae_layout_from_ldm(sd))
        if unknown:
            raise WeightsError(f"{source}: unexpected VAE keys: {', '.join(unknown[:4])}")
        sd = renamed
    try:
        vcfg = VAEConfig.from_diffusers(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{source}: not a usable VAE config ({e})") from None
    if vcfg.latent_channels != 16:
        raise WeightsError(f"{source}: the VAE makes {vcfg.latent_channels}-channel latents; SD3's makes 16")
    return build_on_meta(lambda: AutoencoderKL(vcfg), sd, name="VAE", dtype=dtype).to(device)


# ------------------------------------------------------------------------------------------ CLIP encoders


def clip_part(sd: Mapping[str, torch.Tensor], which: str) -> StateDict:
    """A CLIPTextModelWithProjection's tensors in sdengine's names (``text_model.*``, ``text_projection.weight``)
    out of a state dict: under Stability's prefix for ``which`` ("clip_l" / "clip_g"), or as they are (a separate
    encoder file, a ``text_encoder*/`` folder; transformers 5 writes the tower without ``text_model.``)."""
    from sdengine.models.clip_text import add_projection_prefix

    prefix = CLIP_PREFIXES[which]
    part = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)} or dict(sd)
    return {k: v for k, v in add_projection_prefix(part).items() if not km.is_known_unused(k)}


def has_clip(sd_keys: Any, which: str) -> bool:
    return any(str(k).startswith(CLIP_PREFIXES[which]) for k in sd_keys)


def clip_config(part: Mapping[str, torch.Tensor], which: str, where: str) -> dict[str, Any]:
    """A single file's CLIP config from its shapes (64-wide heads; CLIP-L quick GELU, bigG exact GELU)."""
    cfg = clip_config_from_weights(part, family="sd1")
    cfg["hidden_act"] = "gelu" if which == "clip_g" else "quick_gelu"
    cfg["projection_dim"] = int(part["text_projection.weight"].shape[0])
    cfg["architectures"] = ["CLIPTextModelWithProjection"]
    return cfg


def build_clip(
    part: Mapping[str, torch.Tensor], config: Mapping[str, Any], *, where: str, device: torch.device, dtype: torch.dtype
) -> torch.nn.Module:
    """A CLIPTextModelWithProjection from its tensors (sdengine's names) and transformers config."""
    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModelWithProjection

    from .loading import build_on_meta

    if "text_projection.weight" not in part:
        raise WeightsError(
            f"{where}: no text_projection.weight: SD3's CLIP encoders are CLIPTextModelWithProjection (give the "
            "encoder with its projection, e.g. ComfyUI's clip_l.safetensors / clip_g.safetensors)"
        )
    try:
        tcfg = CLIPTextConfig.from_transformers(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{where}: not a usable CLIP text config ({e})") from None
    return build_on_meta(lambda: CLIPTextModelWithProjection(tcfg), part, name=where, dtype=dtype).to(device)


def load_clip_encoder(path: str | Path, which: str, *, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """SD3's CLIP-L (``which`` "clip_l") or bigG ("clip_g") from a diffusers ``text_encoder*/`` folder, a separate
    file (ComfyUI's ``clip_l.safetensors``) or an SD3 single file that holds it."""
    from .loading import load_component_folder

    p = Path(path)
    where = f"{p.name} ({which})"
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise WeightsError(f"{p}: not a text encoder folder (no config.json)")
        sd, cfg = load_component_folder(p, "clip_text")
        return build_clip(clip_part(sd, which), cfg, where=where, device=device, dtype=dtype)
    if not p.is_file():
        raise WeightsError(f"{p}: no such {which} text encoder file or folder")
    sd = load_file(p)[0]
    other = "clip_g" if which == "clip_l" else "clip_l"
    if has_clip(sd, other) and not has_clip(sd, which):
        raise WeightsError(f"{p}: holds SD3's {other}, not its {which}")
    part = clip_part(sd, which)
    if "text_model.embeddings.token_embedding.weight" not in part or "text_projection.weight" not in part:
        raise WeightsError(
            f"{p}: not a CLIP text encoder with a projection (text_model.* and text_projection.weight), as SD3's "
            f"{which} is"
        )
    return build_clip(part, clip_config(part, which, str(p)), where=where, device=device, dtype=dtype)


def clip_width_of(encoder: Any) -> int:
    return int(encoder.config.hidden_size)


__all__ = [
    "CLIP_PREFIXES",
    "SD3_PIPELINE_CLASSES",
    "SD3_SHIFT",
    "SD3_VAE_SCALING_FACTOR",
    "SD3_VAE_SHIFT_FACTOR",
    "T5_PREFIX",
    "build_clip",
    "clip_config",
    "clip_part",
    "folder_component",
    "has_clip",
    "is_sd3",
    "is_sd3_file",
    "is_sd3_folder",
    "load_clip_encoder",
    "load_sd3_vae",
    "scheduler_config",
]
