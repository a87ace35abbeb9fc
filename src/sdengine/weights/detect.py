"""Which network is this? Read the architecture off tensor shapes (ComfyUI-style) and synthesise diffusers configs.

Single-file LDM checkpoints carry no config. What the shapes tell us:
- UNet: conv_in's input channels (4 normal, 8 instruct-pix2pix, 9 inpainting), the cross-attention context width
  (768: SD1 with OpenAI CLIP ViT-L, 1024: SD2 with OpenCLIP ViT-H), the number of levels/blocks, where attention sits,
  and whether SpatialTransformer projections are 1x1 convs (SD1) or Linear (SD2).
- What shapes cannot tell: attention heads (SD1 uses 8 heads, SD2 64-channel heads) and whether SD2 predicts
  epsilon (512 "base") or v (768): the caller may pass `prediction_type`; we default like diffusers.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..diffusion.schedules import SD_BETAS
from .io import WeightsError
from .keymaps import UNetLayout, VAELayout

log = logging.getLogger(__name__)

Family = Literal["sd1", "sd2", "custom"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# global_step of SD 2.0/2.1 "base" (512, epsilon) checkpoints, the one hint such files carry (as in diffusers).
_SD2_BASE_GLOBAL_STEP = 875000
SD_VAE_SCALING_FACTOR = 0.18215  # LDM's scale_factor for the SD1/SD2 VAE


class UnsupportedModelError(WeightsError):
    """The file holds a network sdengine does not implement (SD3, Flux, an upscaler, ...) or a part of one."""


# SD3's MMDiT in Stability's layout: joint_blocks.N.{x_block,context_block}.* with the prefix of a whole
# checkpoint (model.diffusion_model.) or without it (ComfyUI's "diffusion model only" files).
_SD3_STABILITY = re.compile(r"^(?:model\.diffusion_model\.)?joint_blocks\.\d+\.(?:x_block|context_block)\.")
# ... and in diffusers' names (SD3Transformer2DModel): these keys together (Flux's transformer has the
# joint attention too, but no position table).
_SD3_DIFFUSERS = ("pos_embed.pos_embed", "context_embedder.weight", "transformer_blocks.0.attn.add_q_proj.weight")


def is_sd3_state_dict(keys: Iterable[str]) -> bool:
    """Whether a state dict's keys hold SD3's (or SD3.5's) MMDiT: Stability's ``joint_blocks.*`` (with or
    without ``model.diffusion_model.``) or diffusers' ``SD3Transformer2DModel`` names. Other parts of the
    file (text encoders, VAE) do not matter; a LoRA's names (``lora_*``, ``.lora_A.``) are not weights."""
    seen: set[str] = set()
    for k in keys:
        if ".lora_" in k or k.startswith("lora_"):
            return False
        if _SD3_STABILITY.match(k):
            return True
        if k in _SD3_DIFFUSERS:
            seen.add(k)
    return len(seen) == len(_SD3_DIFFUSERS)


# The first tensors of a Flux transformer in BFL's layout (flux1-dev/-schnell.safetensors; ComfyUI adds the prefix)
_FLUX_MARKERS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
FLUX_PREFIX = "model.diffusion_model."


def is_flux_state_dict(keys: Iterable[str]) -> bool:
    """Whether these tensor names are a Flux transformer's in Black Forest Labs' layout (``double_blocks.*``,
    ``single_blocks.*``), with or without ComfyUI's ``model.diffusion_model.`` prefix: the weights themselves,
    not a LoRA for them (whose names end in ``lora_A.weight``, ``lora_down.weight``, ...)."""
    markers = set(_FLUX_MARKERS) | {FLUX_PREFIX + m for m in _FLUX_MARKERS}
    return any(k in markers for k in keys)


CHROMA_MARKER = "distilled_guidance_layer.in_proj.weight"  # Chroma's modulation network (no per-block linears)


def is_chroma_state_dict(keys: Iterable[str]) -> bool:
    """Whether these tensor names are a Chroma transformer's (lodestones' FLUX.1 [schnell] derivative): its one
    modulation network ``distilled_guidance_layer.*``, in BFL's single-file names (with or without ComfyUI's
    ``model.diffusion_model.`` prefix) or diffusers' ``ChromaTransformer2DModel`` names."""
    return any(k in (CHROMA_MARKER, FLUX_PREFIX + CHROMA_MARKER) for k in keys)


def model_family(keys: Iterable[str]) -> Literal["sd3", "flux", "chroma"] | None:
    """The diffusion-transformer family a state dict holds, by its keys: ``"sd3"`` for SD3/SD3.5's MMDiT,
    ``"flux"`` for FLUX.1's transformer in BFL's layout, ``"chroma"`` for Chroma's (Flux-derived, with
    ``distilled_guidance_layer.*``; BFL's or diffusers' names); None for anything else (the U-Net files go through
    :func:`check_supported` and :func:`detect_ldm`)."""
    names = list(keys)
    if is_sd3_state_dict(names):
        return "sd3"
    if is_chroma_state_dict(names):
        return "chroma"
    return "flux" if is_flux_state_dict(names) else None


def _ints(pattern: str, keys: list[str]) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in keys if (m := rx.match(k))}


# ------------------------------------------------------------------------------------------ refuse early


def check_supported(sd: Mapping[str, torch.Tensor]) -> None:
    """Raise UnsupportedModelError naming what the file looks like when it is not an SD1/SD2 checkpoint."""
    keys = list(sd)
    label = sd.get("model.diffusion_model.label_emb.0.0.weight")
    if label is not None and label.ndim == 2 and label.shape[1] == 2816:
        # SDXL files with their text encoders (conditioner.embedders.*) go through weights.sdxl_files.
        raise UnsupportedModelError(
            "found 2816-wide label_emb: looks like SDXL, but without its text encoders (conditioner.embedders.*); "
            "give the whole SDXL checkpoint"
        )
    if any(k.startswith("conditioner.embedders.") for k in keys):
        raise UnsupportedModelError("found conditioner.embedders.*: looks like SDXL; load it with load_checkpoint")
    if is_sd3_state_dict(keys):
        raise UnsupportedModelError(
            "found SD3's MMDiT (joint_blocks.*): an SD3 model, not an SD 1.x/2.x checkpoint "
            "(sdengine.weights.mmdit_file loads its transformer)"
        )
    if is_flux_state_dict(keys):
        raise UnsupportedModelError(
            "found double_blocks.*: looks like Flux (FLUX.1's transformer), not an SD checkpoint; "
            "sdengine.weights.flux_file.load_flux_transformer loads it"
        )
    if any("double_blocks." in k for k in keys[:2000]):
        raise UnsupportedModelError("found double_blocks.*: looks like Flux, not supported")
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        raise UnsupportedModelError("found lora_* keys: this is a LoRA, load it with loras=[(path, weight)]")
    if any(k.startswith("control_model.") for k in keys):
        raise UnsupportedModelError("found control_model.*: this is a ControlNet, load it with controlnets=")
    if "model.diffusion_model.label_emb.weight" in sd:
        raise UnsupportedModelError(
            "found label_emb.weight (noise-level classes): looks like the SD x4 upscaler, not supported"
        )
    conv_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if conv_in is None and any(k.startswith("model.diffusion_model.input_blocks.") for k in keys):
        raise WeightsError(
            "missing key model.diffusion_model.input_blocks.0.0.weight: the U-Net is incomplete (a damaged file?)"
        )
    if conv_in is None:
        if any(k.startswith(("down_blocks.", "conv_in.")) for k in keys):
            raise WeightsError(
                "found diffusers UNet names (down_blocks.*) in a single file: load the diffusers folder instead"
            )
        if any(k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates") for k in keys):
            raise UnsupportedModelError(
                "holds only the EMA copy of the U-Net (model_ema.*, no model.diffusion_model.*): a training "
                "checkpoint with its weights pruned away; use the model file exported from it (e.g. an -emaonly file)"
            )
        prefixes = sorted({k.split(".")[0] for k in keys})[:8]
        raise UnsupportedModelError(
            f"no model.diffusion_model.* UNet weights found (top-level names: {prefixes}): "
            "not a Stable Diffusion 1.x/2.x checkpoint"
        )
    if conv_in.shape[1] not in (4, 8, 9):
        kind = {7: "the SD x4 upscaler"}.get(int(conv_in.shape[1]), "an unknown model")
        raise UnsupportedModelError(
            f"found a UNet with {conv_in.shape[1]} input channels: looks like {kind}, not supported "
            "(SD takes 4, instruct-pix2pix 8, inpainting 9)"
        )


# ----------------------------------------------------------------------------------------------- UNet


def _need(unet: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    """A U-Net tensor the architecture is read from; its absence is a one-line error naming it."""
    t = unet.get(key)
    if t is None:
        raise WeightsError(f"missing key model.diffusion_model.{key}: the U-Net is incomplete (a damaged file?)")
    return t


def _has_attention(unet: Mapping[str, torch.Tensor], block: str) -> bool:
    """Whether the LDM block (``input_blocks.N``, ``output_blocks.N``, ``middle_block``) holds a transformer at
    index 1: any of its parameters, so that one missing tensor reads as missing, not as no attention."""
    prefixes = tuple(f"{block}.1.{part}." for part in ("norm", "proj_in", "transformer_blocks", "proj_out"))
    return any(k.startswith(prefixes) for k in unet)


def _context_key(unet: Mapping[str, torch.Tensor], first_attn: str) -> torch.Tensor | None:
    """The first cross-attention key projection (its width is the text context's), or None without attention."""
    to_k = unet.get(f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")
    if to_k is not None:
        return to_k
    if not any(k.startswith(f"{first_attn}.transformer_blocks.") for k in unet):
        return None
    return _need(unet, f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")


def _layout_fault(inputs: set[int], downs: list[int]) -> str:
    """What is wrong with input blocks that make no layout: the missing block named when exactly one layout
    (levels of equal depth, a downsampler between levels) fits what is there, else what was counted."""
    top = max(inputs, default=0)
    fits = []
    for n in (top, top + 1):  # the last block may be the one that is gone
        for levels in range(1, n + 2):
            lpb, rem = divmod(n - (levels - 1), levels)
            if rem or lpb < 1:
                continue
            want_downs = {(lv + 1) * (lpb + 1) for lv in range(levels - 1)}
            gone = [i for i in range(1, n + 1) if i not in inputs]
            if set(downs) <= want_downs and gone and all(i in gone for i in want_downs - set(downs)):
                fits.append((gone, want_downs))
    if len(fits) == 1:
        gone, want_downs = fits[0]
        names = [
            f"model.diffusion_model.input_blocks.{i}.0.op.weight/.bias"
            if i in want_downs
            else f"model.diffusion_model.input_blocks.{i}.* (a residual block)"
            for i in gone
        ]
        return f"missing {', '.join(names)}: the U-Net is incomplete (a damaged file?)"
    n_in = len(inputs - {0})
    return (
        f"cannot read the UNet layout: {n_in} input blocks with {len(downs)} downsamplers do not make equal "
        "levels (a missing or extra input_blocks.N tensor?)"
    )


def unet_layout_from_ldm(unet: Mapping[str, torch.Tensor]) -> UNetLayout:
    """Read the block layout from LDM UNet keys (without `model.diffusion_model.`)."""
    keys = list(unet)
    inputs = _ints(r"^input_blocks\.(\d+)\.", keys)
    # A downsampler is placed by either of its tensors, so that a missing one is named, not read as no downsampler.
    downs = sorted(_ints(r"^input_blocks\.(\d+)\.0\.op\.", keys))
    num_levels = len(downs) + 1
    n_in = max(inputs, default=0)  # blocks 1..n_in after conv_in (block 0)
    lpb, rem = divmod(n_in - len(downs), num_levels)
    if rem or lpb < 1 or any(i not in inputs for i in range(1, n_in + 1)):
        raise WeightsError(_layout_fault(inputs, downs))
    for d in downs:
        _need(unet, f"input_blocks.{d}.0.op.weight")
        _need(unet, f"input_blocks.{d}.0.op.bias")
    down_attn = tuple(_has_attention(unet, f"input_blocks.{1 + lv * (lpb + 1)}") for lv in range(num_levels))
    up_attn = tuple(_has_attention(unet, f"output_blocks.{lv * (lpb + 1)}") for lv in range(num_levels))
    mid_attn = _has_attention(unet, "middle_block")
    return UNetLayout(num_levels, lpb, down_attn, up_attn, mid_attn)


def unet_layout_from_diffusers(unet: Mapping[str, torch.Tensor]) -> UNetLayout:
    keys = list(unet)
    levels = _ints(r"^down_blocks\.(\d+)\.", keys)
    num_levels = len(levels)
    lpb = len(_ints(r"^down_blocks\.0\.resnets\.(\d+)\.", keys))
    down = tuple(any(k.startswith(f"down_blocks.{i}.attentions.") for k in keys) for i in range(num_levels))
    up = tuple(any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys) for i in range(num_levels))
    mid = any(k.startswith("mid_block.attentions.") for k in keys)
    return UNetLayout(num_levels, lpb, down, up, mid)


def unet_config_from_ldm(
    unet: Mapping[str, torch.Tensor], *, family: Family, sample_size: int, upcast_attention: bool = False
) -> dict[str, Any]:
    """A diffusers UNet2DConditionModel config for these LDM UNet weights."""
    layout = unet_layout_from_ldm(unet)
    lpb = layout.layers_per_block
    conv_in = _need(unet, "input_blocks.0.0.weight")
    channels = [
        int(_need(unet, f"input_blocks.{1 + lv * (lpb + 1)}.0.out_layers.3.weight").shape[0])
        for lv in range(layout.num_levels)
    ]
    first_attn = next(
        (f"input_blocks.{1 + lv * (lpb + 1)}.1" for lv in range(layout.num_levels) if layout.down_attention[lv]),
        "middle_block.1",
    )
    depth = len(_ints(rf"^{re.escape(first_attn)}\.transformer_blocks\.(\d+)\.", list(unet))) or 1
    to_k = _context_key(unet, first_attn)
    context_dim = int(to_k.shape[1]) if to_k is not None else None
    proj_in = unet.get(f"{first_attn}.proj_in.weight")
    linear_proj = proj_in is not None and proj_in.ndim == 2
    # SD1 configs fix the number of heads (8); SD2 fixes the head width (64 channels). diffusers calls both
    # "attention_head_dim" and, for SD2, stores the per-level head counts.
    head_width_64 = family == "sd2" or (family == "custom" and linear_proj and all(c % 64 == 0 for c in channels))
    heads: int | list[int] = [c // 64 for c in channels] if head_width_64 else 8
    return {
        "_class_name": "UNet2DConditionModel",
        "sample_size": sample_size,
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(_need(unet, "out.2.weight").shape[0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in layout.down_attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in layout.up_attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if layout.mid_attention else None,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "cross_attention_dim": context_dim,
        "attention_head_dim": heads,
        "use_linear_projection": linear_proj,
        "transformer_layers_per_block": depth,
        "upcast_attention": upcast_attention,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "center_input_sample": False,
        "downsample_padding": 1,
        "mid_block_scale_factor": 1,
    }


# ------------------------------------------------------------------------------------------------ VAE


def _need_vae(vae: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    t = vae.get(key)
    if t is None:
        raise WeightsError(f"missing VAE key {key} (first_stage_model.{key} in a checkpoint): the VAE is incomplete")
    return t


def vae_layout_from_ldm(vae: Mapping[str, torch.Tensor]) -> VAELayout:
    keys = list(vae)
    levels = _ints(r"^encoder\.down\.(\d+)\.", keys)
    lpb = len(_ints(r"^encoder\.down\.0\.block\.(\d+)\.", keys))
    if not levels or not lpb:
        raise WeightsError("cannot read the VAE layout: no encoder.down.N.block.M weights")
    return VAELayout(len(levels), lpb)


def vae_layout_from_diffusers(vae: Mapping[str, torch.Tensor]) -> VAELayout:
    keys = list(vae)
    levels = _ints(r"^encoder\.down_blocks\.(\d+)\.", keys)
    lpb = len(_ints(r"^encoder\.down_blocks\.0\.resnets\.(\d+)\.", keys))
    return VAELayout(len(levels), lpb)


def vae_config_from_ldm(vae: Mapping[str, torch.Tensor], *, sample_size: int = 512) -> dict[str, Any]:
    layout = vae_layout_from_ldm(vae)
    channels = [
        int(_need_vae(vae, f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in range(layout.num_levels)
    ]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": int(_need_vae(vae, "encoder.conv_in.weight").shape[1]),
        "out_channels": int(_need_vae(vae, "decoder.conv_out.weight").shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * layout.num_levels,
        "up_block_types": ["UpDecoderBlock2D"] * layout.num_levels,
        "block_out_channels": channels,
        "layers_per_block": layout.layers_per_block,
        "latent_channels": int(_need_vae(vae, "decoder.conv_in.weight").shape[1]),
        "norm_num_groups": 32,
        # what the weights show (SD's VAEs have all three; a small VAE may have none)
        "mid_block_add_attention": any(k.startswith(("encoder.mid.attn_1.", "decoder.mid.attn_1.")) for k in vae),
        "use_quant_conv": any(k.startswith("quant_conv.") for k in vae),
        "use_post_quant_conv": any(k.startswith("post_quant_conv.") for k in vae),
        "act_fn": "silu",
        "sample_size": sample_size,
        "scaling_factor": SD_VAE_SCALING_FACTOR,
    }


# --------------------------------------------------------------------------------------- text encoders


def clip_config_from_weights(te: Mapping[str, torch.Tensor], *, family: Family) -> dict[str, Any]:
    """transformers CLIPTextConfig (as a dict) for CLIPTextModel-named weights."""

    def need(key: str) -> torch.Tensor:
        t = te.get(key)
        if t is None:
            raise WeightsError(f"missing text-encoder key {key}: the text encoder is incomplete (a damaged file?)")
        return t

    tok = need("text_model.embeddings.token_embedding.weight")
    hidden = int(tok.shape[1])
    layers = len(_ints(r"^text_model\.encoder\.layers\.(\d+)\.", list(te)))
    openclip = family == "sd2"
    return {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": int(tok.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(need("text_model.encoder.layers.0.mlp.fc1.weight").shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),  # CLIP text towers use 64-wide heads
        "max_position_embeddings": int(need("text_model.embeddings.position_embedding.weight").shape[0]),
        "hidden_act": "gelu" if openclip else "quick_gelu",  # OpenCLIP ViT-H uses exact GELU
        "layer_norm_eps": 1e-5,
        "projection_dim": 512 if openclip else 768,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
        "attention_dropout": 0.0,
        "dropout": 0.0,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    }


def openclip_num_blocks(te: Mapping[str, torch.Tensor]) -> int:
    return len(_ints(r"^transformer\.resblocks\.(\d+)\.", list(te)))


# ------------------------------------------------------------------------------------------ scheduler


def scheduler_config(family: Family, prediction_type: str) -> dict[str, Any]:
    """The scheduler config diffusers folders of that family ship (SD1: PNDM, SD2: DDIM), same betas."""
    return {
        "_class_name": "DDIMScheduler" if family == "sd2" else "PNDMScheduler",
        "num_train_timesteps": 1000,
        **SD_BETAS,
        "trained_betas": None,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "timestep_spacing": "leading",
    }


def read_prediction_type(folder: str | Path) -> str:
    """prediction_type of a diffusers folder, from scheduler/scheduler_config.json (default epsilon)."""
    path = Path(folder) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return "epsilon"
    return str(json.loads(path.read_text()).get("prediction_type", "epsilon"))


# --------------------------------------------------------------------------------------- whole file


@dataclass
class Detected:
    """What a single-file checkpoint holds, and diffusers-style configs for its parts."""

    family: Family
    inpainting: bool
    text_encoder_kind: Literal["clip", "openclip"] | None
    prediction_type: str
    unet_config: dict[str, Any]
    vae_config: dict[str, Any] | None
    text_encoder_config: dict[str, Any] | None
    scheduler_config: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def instruct_pix2pix(self) -> bool:
        """An 8-channel U-Net: the noisy latent + an image's latent (docs/instruct-pix2pix.md)."""
        return int(self.unet_config.get("in_channels", 4)) == 8

    @property
    def description(self) -> str:
        name = {"sd1": "SD 1.x", "sd2": "SD 2.x", "custom": "custom SD-like"}[self.family]
        kind = " inpainting" if self.inpainting else " instruct-pix2pix" if self.instruct_pix2pix else ""
        return f"{name}{kind} ({self.prediction_type})"


def detect_ldm(
    unet: Mapping[str, torch.Tensor],
    vae: Mapping[str, torch.Tensor] | None,
    text_encoder: Mapping[str, torch.Tensor] | None,
    text_encoder_kind: Literal["clip", "openclip"] | None,
    *,
    prediction_type: str | None = None,
    info: Mapping[str, Any] | None = None,
) -> Detected:
    """Detect the architecture from LDM UNet/VAE weights (LDM names, prefixes removed) and the text encoder
    (already in CLIPTextModel names). `info` holds file-level hints (a .ckpt's global_step)."""
    conv_in = _need(unet, "input_blocks.0.0.weight")
    inpainting = int(conv_in.shape[1]) == 9
    layout = unet_layout_from_ldm(unet)
    first_attn = next(
        (
            f"input_blocks.{1 + lv * (layout.layers_per_block + 1)}.1"
            for lv in range(layout.num_levels)
            if layout.down_attention[lv]
        ),
        "middle_block.1",
    )
    to_k = _context_key(unet, first_attn)
    context = int(to_k.shape[1]) if to_k is not None else 0
    family: Family = {768: "sd1", 1024: "sd2"}.get(context, "custom")  # type: ignore[assignment]
    notes: list[str] = []
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise WeightsError(f"unknown prediction_type {prediction_type!r}; use one of {', '.join(PREDICTION_TYPES)}")
    if prediction_type is None:
        if family == "sd2" and not inpainting:
            step = (info or {}).get("global_step")
            if step == _SD2_BASE_GLOBAL_STEP:
                prediction_type = "epsilon"
                notes.append("global_step 875000: SD 2.x base (epsilon)")
            else:
                # SD2 single files do not say; like diffusers, assume the 768 v-prediction model.
                prediction_type = "v_prediction"
                notes.append(
                    "SD 2.x file does not state its prediction type: assuming v_prediction "
                    "(768 model); pass prediction_type='epsilon' for 512 'base' models"
                )
                log.info(notes[-1])
        else:
            prediction_type = "epsilon"
    v768 = family == "sd2" and prediction_type == "v_prediction"
    sample = 96 if v768 else 64
    te_family: Family = "sd2" if text_encoder_kind == "openclip" else "sd1"
    return Detected(
        family=family,
        inpainting=inpainting,
        text_encoder_kind=text_encoder_kind if text_encoder else None,
        prediction_type=prediction_type,
        unet_config=unet_config_from_ldm(unet, family=family, sample_size=sample, upcast_attention=v768),
        vae_config=vae_config_from_ldm(vae, sample_size=sample * 8) if vae else None,
        text_encoder_config=clip_config_from_weights(text_encoder, family=te_family) if text_encoder else None,
        scheduler_config=scheduler_config(family, prediction_type),
        notes=notes,
    )
