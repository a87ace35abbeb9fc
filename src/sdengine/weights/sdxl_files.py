"""SDXL single files (Stability's sgm layout) <-> sdengine's (diffusers/transformers) names and configs.

Facts of the layout (sgm's ``DiffusionEngine`` state dict, as the released SDXL files carry it):

- ``model.diffusion_model.*``: the U-Net in LDM names (the same module tables as SD 1.x/2.x, from the block
  layout), plus ``label_emb.0.0`` / ``label_emb.0.2``: the MLP of the added-conditioning vector, diffusers'
  ``add_embedding.linear_1`` / ``linear_2``;
- ``first_stage_model.*``: the VAE, as in SD (scaling factor 0.13025 instead of 0.18215);
- base: ``conditioner.embedders.0.transformer.*`` CLIP ViT-L in transformers' names, and
  ``conditioner.embedders.1.model.*`` OpenCLIP ViT-bigG in OpenCLIP's (fused ``in_proj``; ``text_projection``
  a (width, projection) matrix used as ``x @ P``, i.e. the transpose of transformers' Linear weight;
  ``logit_scale`` unused); all of bigG's blocks are kept (SDXL reads the penultimate layer's states and the
  last layer's pooled output);
- refiner: only ``conditioner.embedders.0.model.*`` (bigG).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import torch

from ..diffusion.schedules import SD_BETAS
from . import keymaps as km
from .detect import clip_config_from_weights, unet_config_from_ldm, vae_config_from_ldm
from .io import WeightsError

StateDict = dict[str, torch.Tensor]
SDXLFamily = Literal["sdxl", "sdxl_refiner"]

CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."
REFINER_BIGG_PREFIX = "conditioner.embedders.0.model."
ADD_EMBEDDING_ROWS: km.ModuleTable = [
    ("label_emb.0.0", "add_embedding.linear_1", "plain"),
    ("label_emb.0.2", "add_embedding.linear_2", "plain"),
]
SDXL_VAE_SCALING_FACTOR = 0.13025  # sgm's scale_factor for SDXL's VAE
# SDXL's own scheduler (EulerDiscreteScheduler; the betas of SD).
SDXL_SCHEDULER: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    **SD_BETAS,
    "trained_betas": None,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
# Empty marker tensors of v-prediction SDXL fine-tunes (NoobAI-XL V-Pred and others), read by ComfyUI and A1111:
# `v_pred` = v-prediction, `ztsnr` = zero terminal SNR (rescaled betas); written back when converting such a model.
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"
_UNUSED = re.compile(r"(^conditioner\.embedders\.\d\.model\.(logit_scale|attn_mask)$)|(\.position_ids$)")


def is_sdxl_ldm(sd: Mapping[str, torch.Tensor]) -> bool:
    """An sgm-layout SDXL checkpoint (its text encoders live under ``conditioner.embedders.``)."""
    return any(k.startswith("conditioner.embedders.") for k in sd)


def unet_table(layout: km.UNetLayout) -> km.ModuleTable:
    return km.unet_module_table(layout) + ADD_EMBEDDING_ROWS


def transformer_depths(unet: Mapping[str, torch.Tensor], layout: km.UNetLayout) -> int | list[int]:
    """diffusers' transformer_layers_per_block of LDM U-Net (or ControlNet) weights: transformer blocks per
    level, the last level carrying the middle block's (diffusers builds the middle block with the last
    entry); one number when all attention levels agree."""
    keys = list(unet)
    lpb = layout.layers_per_block

    def count(prefix: str) -> int:
        return len(
            {int(m.group(1)) for k in keys if (m := re.match(rf"^{re.escape(prefix)}\.transformer_blocks\.(\d+)\.", k))}
        )

    per_level = [
        count(f"input_blocks.{1 + lv * (lpb + 1)}.1") if layout.down_attention[lv] else 0
        for lv in range(layout.num_levels)
    ]
    mid = count("middle_block.1") if layout.mid_attention else 0
    if not layout.down_attention[-1]:
        per_level[-1] = mid
    used = {d for d in per_level if d}
    if len(used) <= 1:
        return used.pop() if used else 1
    return [d or 1 for d in per_level]


def sdxl_unet_config_from_ldm(unet: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """diffusers' UNet2DConditionModel config for SDXL LDM U-Net weights (prefix removed)."""
    label = unet.get("label_emb.0.0.weight")
    if label is None or label.ndim != 2:
        raise WeightsError("an SDXL checkpoint without label_emb.0.0.weight (the added-conditioning MLP)")
    cfg = unet_config_from_ldm(unet, family="custom", sample_size=128)
    layout = km.UNetLayout.from_config(cfg)
    cfg.update(
        transformer_layers_per_block=transformer_depths(unet, layout),
        addition_embed_type="text_time",
        addition_time_embed_dim=256,  # SDXL's: 256 features per size/crop/score number
        projection_class_embeddings_input_dim=int(label.shape[1]),
    )
    return cfg


def _openclip_to_projection_model(sd: Mapping[str, torch.Tensor], where: str) -> StateDict:
    proj = sd.get("text_projection")
    if proj is None or proj.ndim != 2:
        raise WeightsError(f"{where}: the OpenCLIP text encoder has no text_projection matrix")
    rest = {k: v for k, v in sd.items() if k != "text_projection"}
    out, bad = km.openclip_ldm_to_diffusers(rest, num_layers=None)
    if bad:
        raise WeightsError(f"{where}: unexpected OpenCLIP text-encoder keys: {', '.join(bad[:5])}")
    out["text_projection.weight"] = proj.t()  # x @ P == Linear with weight P^T
    return out


def sdxl_ldm_to_components(
    sd: Mapping[str, torch.Tensor],
    *,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    where: str = "<checkpoint>",
) -> tuple[dict[str, StateDict], dict[str, dict[str, Any]], SDXLFamily, list[str]]:
    """A flat SDXL sgm state dict -> ({unet, vae?, text_encoder?, text_encoder_2} in our names, diffusers-style
    configs (synthesised from the shapes unless ``configs`` gives them), family, skipped keys)."""
    refiner = not any(k.startswith(BIGG_PREFIX) for k in sd) and any(k.startswith(REFINER_BIGG_PREFIX) for k in sd)
    bigg_prefix = REFINER_BIGG_PREFIX if refiner else BIGG_PREFIX
    parts: dict[str, StateDict] = {"unet": {}, "vae": {}, "te1": {}, "te2": {}}
    prefixes = {"unet": km.UNET_PREFIX, "vae": km.VAE_PREFIX, "te1": CLIP_L_PREFIX, "te2": bigg_prefix}
    skipped: list[str] = []
    unknown: list[str] = []
    for key, t in sd.items():
        if km.is_known_unused(key) or _UNUSED.search(key) or key in (V_PRED_KEY, ZTSNR_KEY):
            skipped.append(key)
            continue
        for name, prefix in prefixes.items():
            if key.startswith(prefix) and not (refiner and name == "te1"):
                parts[name][key[len(prefix) :]] = t
                break
        else:
            unknown.append(key)
    if any(k.startswith("edm_vpred.") for k in unknown):  # ComfyUI's marker of an EDM v-prediction model
        raise WeightsError(
            f"{where}: an EDM v-prediction SDXL model (edm_vpred.* keys, as Stability's CosXL / CosXL Edit): "
            "sdengine has no EDM v-prediction schedule"
        )
    if unknown:
        raise WeightsError(f"{where}: unexpected keys (not SDXL sgm names): {', '.join(unknown[:5])}")
    if not parts["te2"]:
        raise WeightsError(f"{where}: an SDXL checkpoint without its OpenCLIP bigG text encoder ({bigg_prefix}*)")
    cfgs: dict[str, dict[str, Any]] = {k: dict(v) for k, v in (configs or {}).items()}
    out: dict[str, StateDict] = {}
    if "unet" not in cfgs:
        cfgs["unet"] = sdxl_unet_config_from_ldm(parts["unet"])
    unet, bad = km.rename_keys(parts["unet"], unet_table(km.UNetLayout.from_config(cfgs["unet"])), to_diffusers=True)
    if bad:
        raise WeightsError(f"{where}: unexpected UNet keys: {', '.join(km.UNET_PREFIX + k for k in bad[:5])}")
    out["unet"] = unet
    if parts["vae"]:
        vae, bad = km.vae_ldm_to_diffusers(parts["vae"], km.VAELayout.from_config(vae_config_from_ldm(parts["vae"])))
        if bad:
            raise WeightsError(f"{where}: unexpected VAE keys: {', '.join(km.VAE_PREFIX + k for k in bad[:5])}")
        out["vae"] = vae
        if "vae" not in cfgs:
            cfgs["vae"] = {
                **vae_config_from_ldm(parts["vae"], sample_size=1024),
                "scaling_factor": SDXL_VAE_SCALING_FACTOR,
            }
    if parts["te1"]:
        out["text_encoder"] = km.normalize_clip_keys(parts["te1"])
        cfgs.setdefault("text_encoder", clip_config_from_weights(out["text_encoder"], family="sd1"))
    out["text_encoder_2"] = _openclip_to_projection_model(parts["te2"], where)
    if "text_encoder_2" not in cfgs:
        te2 = clip_config_from_weights(out["text_encoder_2"], family="sd2")
        te2.update(
            architectures=["CLIPTextModelWithProjection"],
            projection_dim=int(out["text_encoder_2"]["text_projection.weight"].shape[0]),
        )
        cfgs["text_encoder_2"] = te2
    if "scheduler" not in cfgs:
        cfgs["scheduler"] = dict(SDXL_SCHEDULER)
        if V_PRED_KEY in sd:  # as ComfyUI reads the markers: ztsnr only with v_pred
            cfgs["scheduler"]["prediction_type"] = "v_prediction"
            if ZTSNR_KEY in sd:
                cfgs["scheduler"]["rescale_betas_zero_snr"] = True
    family: SDXLFamily = "sdxl" if "text_encoder" in out else "sdxl_refiner"
    return out, cfgs, family, skipped


def sdxl_components_to_ldm(state_dicts: Mapping[str, StateDict], configs: Mapping[str, Mapping[str, Any]]) -> StateDict:
    """Our names -> one flat SDXL sgm state dict (what A1111, ComfyUI and diffusers' from_single_file read)."""
    out: StateDict = {}
    unet_sd = state_dicts["unet"]
    layout = km.UNetLayout.from_config(configs["unet"])
    unet, bad = km.rename_keys(unet_sd, unet_table(layout), to_diffusers=False)
    if bad:
        raise WeightsError(f"U-Net keys with no LDM name: {', '.join(bad[:5])}")
    out.update({km.UNET_PREFIX + k: v for k, v in unet.items()})
    from .detect import vae_layout_from_diffusers

    vae_sd = state_dicts["vae"]
    vae, bad = km.vae_diffusers_to_ldm(vae_sd, vae_layout_from_diffusers(vae_sd))
    if bad:
        raise WeightsError(f"VAE keys with no LDM name: {', '.join(bad[:5])}")
    out.update({km.VAE_PREFIX + k: v for k, v in vae.items()})
    refiner = "text_encoder" not in state_dicts
    if not refiner:
        out.update({CLIP_L_PREFIX + k: v for k, v in km.normalize_clip_keys(state_dicts["text_encoder"]).items()})
    te2 = dict(state_dicts["text_encoder_2"])
    proj = te2.pop("text_projection.weight")
    big, bad = km.openclip_diffusers_to_ldm(te2, pad_unused_last_block=False)
    if bad:
        raise WeightsError(f"text_encoder_2 keys with no OpenCLIP name: {', '.join(bad[:5])}")
    big["text_projection"] = proj.t().contiguous()
    prefix = REFINER_BIGG_PREFIX if refiner else BIGG_PREFIX
    out.update({prefix + k: v for k, v in big.items()})
    out.update(prediction_markers(configs.get("scheduler") or {}))
    return out


def prediction_markers(scheduler_config: Mapping[str, Any]) -> StateDict:
    """The empty marker tensors a single file carries for other tools to read its prediction type (see
    V_PRED_KEY): ``v_pred`` for a v-prediction model of any family, as ComfyUI writes them, and ``ztsnr`` beside
    it for zero terminal SNR; nothing for an epsilon model."""
    if scheduler_config.get("prediction_type") != "v_prediction":
        return {}
    out = {V_PRED_KEY: torch.tensor([])}
    if scheduler_config.get("rescale_betas_zero_snr"):
        out[ZTSNR_KEY] = torch.tensor([])
    return out


__all__ = [
    "BIGG_PREFIX",
    "CLIP_L_PREFIX",
    "REFINER_BIGG_PREFIX",
    "SDXL_SCHEDULER",
    "SDXL_VAE_SCALING_FACTOR",
    "V_PRED_KEY",
    "ZTSNR_KEY",
    "is_sdxl_ldm",
    "prediction_markers",
    "sdxl_components_to_ldm",
    "sdxl_ldm_to_components",
    "sdxl_unet_config_from_ldm",
    "transformer_depths",
    "unet_table",
]
