"""Parameter-name tables between the original LDM single-file layout and sdengine's (diffusers/transformers) layout.

The mapping is data, in the spirit of stable-diffusion.cpp: a list of module-prefix pairs generated from the
network's block layout, a few per-module suffix tables (a ResNet block calls its first norm `in_layers.0` in
LDM and `norm1` in diffusers), and one regex per repeated text-encoder layer. The same tables drive both
directions, so LDM -> diffusers -> LDM is the identity by construction (and tested).

Facts (not code) come from the original CompVis/Stability repositories and diffusers' single-file loader:
- UNet: `input_blocks.0.0` is conv_in; then per resolution level `layers_per_block` (ResBlock[, SpatialTransformer])
  entries and, except at the lowest resolution, one Downsample entry (`.0.op`); `middle_block` is
  Res/Attn/Res; `output_blocks` mirror with `layers_per_block + 1` entries per level, the Upsample being the
  last sub-module of a level's last entry (`.1.conv`, or `.2.conv` after an attention). SpatialTransformer
  inner names (norm, proj_in, transformer_blocks.N.attn1.to_q, ..., proj_out) are the same in both layouts;
  proj_in/proj_out are 1x1 convs in SD1 and Linear in SD2 in *both* layouts, so no reshape is needed.
- VAE: LDM numbers decoder levels from the lowest resolution up (`decoder.up.{n-1-i}` is diffusers'
  `up_blocks.{i}`); its mid attention's q/k/v/proj_out are 1x1 convs where diffusers has Linear layers.
- SD1 text encoder: `cond_stage_model.transformer.` + transformers' own names.
- SD2 text encoder: OpenCLIP ViT-H names with a fused `in_proj_weight` (q;k;v stacked on dim 0). SD2 reads the
  penultimate layer, so its last residual block is stored but never used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."
OPENCLIP_PREFIX = "cond_stage_model.model."

# ------------------------------------------------------------------------------------------ suffix tables
# LDM sub-module name -> diffusers sub-module name, inside one mapped module.

UNET_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
VAE_ATTENTION = {
    "norm": "group_norm",
    "q": "to_q",
    "k": "to_k",
    "v": "to_v",
    "proj_out": "to_out.0",
}
SUFFIX_TABLES: dict[str, dict[str, str] | None] = {
    "plain": None,  # everything below the prefix keeps its name
    "unet_resnet": UNET_RESNET,
    "vae_resnet": VAE_RESNET,
    "vae_attention": VAE_ATTENTION,
}

# OpenCLIP text tower (relative to cond_stage_model.model.) -> transformers CLIPTextModel.
OPENCLIP_TOP = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight",
    "ln_final.bias": "final_layer_norm.bias",
}
OPENCLIP_BLOCK = {
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
    "attn.out_proj": "self_attn.out_proj",
}
_OPENCLIP_BLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$")
_OPENCLIP_FUSED_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$")
_HF_LAYER_RE = re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# ------------------------------------------------------------------------------------ known-unused keys
# Keys real checkpoints carry that mean nothing to inference (docs/CONTRACTS.md, Model files): the DDPM
# schedule buffers of the training wrapper (and sgm's denoiser sigmas), the EMA copy, transformers'
# position_ids buffer, and OpenCLIP parts CLIPTextModel lacks.
KNOWN_UNUSED = [
    re.compile(r"^(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_\w+|log_one_minus_\w+|posterior_\w+)$"),
    re.compile(r"^(logvar|lvlb_weights)$"),
    # sgm's DiscreteDenoiser buffers (the same schedule again, as sigmas): SDXL files saved from sgm or A1111
    re.compile(r"^denoiser\.(sigmas|log_sigmas)$"),
    re.compile(r"^model_ema\."),
    re.compile(r"(^|\.)position_ids$"),
    re.compile(r"^cond_stage_model\.model\.(text_projection|logit_scale|attn_mask)$"),
    # training-only parts of standalone VAE checkpoints (LPIPS + discriminator)
    re.compile(r"^(first_stage_model\.)?loss\."),
]


def is_known_unused(key: str) -> bool:
    return any(p.search(key) for p in KNOWN_UNUSED)


# ------------------------------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet key tables depend on: how many levels, blocks per level, and where attention sits."""

    num_levels: int
    layers_per_block: int
    down_attention: tuple[bool, ...]  # per level, highest resolution first
    up_attention: tuple[bool, ...]  # per diffusers up block (lowest resolution first)
    mid_attention: bool = True

    @classmethod
    def from_config(cls, config: Mapping) -> UNetLayout:
        down = tuple(str(t).startswith("CrossAttn") for t in config["down_block_types"])
        up = tuple(str(t).startswith("CrossAttn") for t in config["up_block_types"])
        mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
        return cls(len(down), int(config["layers_per_block"]), down, up, mid)


@dataclass(frozen=True)
class VAELayout:
    num_levels: int
    layers_per_block: int

    @classmethod
    def from_config(cls, config: Mapping) -> VAELayout:
        return cls(len(config["block_out_channels"]), int(config["layers_per_block"]))


ModuleTable = list[tuple[str, str, str]]  # (ldm prefix, diffusers prefix, suffix-table kind)


def unet_module_table(layout: UNetLayout) -> ModuleTable:
    """LDM module prefixes <-> diffusers module prefixes for a UNet of this layout."""
    lpb = layout.layers_per_block
    table: ModuleTable = [
        ("time_embed.0", "time_embedding.linear_1", "plain"),
        ("time_embed.2", "time_embedding.linear_2", "plain"),
        ("input_blocks.0.0", "conv_in", "plain"),
        ("out.0", "conv_norm_out", "plain"),
        ("out.2", "conv_out", "plain"),
    ]
    i = 1
    for level in range(layout.num_levels):
        for j in range(lpb):
            table.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}", "unet_resnet"))
            if layout.down_attention[level]:
                table.append((f"input_blocks.{i}.1", f"down_blocks.{level}.attentions.{j}", "plain"))
            i += 1
        if level != layout.num_levels - 1:
            table.append((f"input_blocks.{i}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
            i += 1
    table.append(("middle_block.0", "mid_block.resnets.0", "unet_resnet"))
    if layout.mid_attention:
        table.append(("middle_block.1", "mid_block.attentions.0", "plain"))
        table.append(("middle_block.2", "mid_block.resnets.1", "unet_resnet"))
    else:
        table.append(("middle_block.1", "mid_block.resnets.1", "unet_resnet"))
    i = 0
    for level in range(layout.num_levels):
        attn = layout.up_attention[level]
        for j in range(lpb + 1):
            table.append((f"output_blocks.{i}.0", f"up_blocks.{level}.resnets.{j}", "unet_resnet"))
            if attn:
                table.append((f"output_blocks.{i}.1", f"up_blocks.{level}.attentions.{j}", "plain"))
            if j == lpb and level != layout.num_levels - 1:
                up_idx = 2 if attn else 1
                table.append((f"output_blocks.{i}.{up_idx}.conv", f"up_blocks.{level}.upsamplers.0.conv", "plain"))
            i += 1
    return table


def vae_module_table(layout: VAELayout) -> ModuleTable:
    n, lpb = layout.num_levels, layout.layers_per_block
    table: ModuleTable = [
        ("encoder.conv_in", "encoder.conv_in", "plain"),
        ("encoder.conv_out", "encoder.conv_out", "plain"),
        ("encoder.norm_out", "encoder.conv_norm_out", "plain"),
        ("decoder.conv_in", "decoder.conv_in", "plain"),
        ("decoder.conv_out", "decoder.conv_out", "plain"),
        ("decoder.norm_out", "decoder.conv_norm_out", "plain"),
        ("quant_conv", "quant_conv", "plain"),
        ("post_quant_conv", "post_quant_conv", "plain"),
    ]
    for part in ("encoder", "decoder"):
        table += [
            (f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", "vae_resnet"),
            (f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", "vae_resnet"),
            (f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0", "vae_attention"),
        ]
    for i in range(n):
        for j in range(lpb):
            table.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", "vae_resnet"))
        if i != n - 1:
            table.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", "plain"))
    for i in range(n):
        ldm = n - 1 - i  # LDM counts decoder levels from the lowest resolution
        for j in range(lpb + 1):
            table.append((f"decoder.up.{ldm}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", "vae_resnet"))
        if i != n - 1:
            table.append((f"decoder.up.{ldm}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", "plain"))
    return table


# ----------------------------------------------------------------------------------------- rename engine

Reshape = Callable[[str, torch.Tensor], torch.Tensor]


def _vae_attn_to_linear(key: str, t: torch.Tensor) -> torch.Tensor:
    # LDM's mid attention q/k/v/proj_out are 1x1 convs (C, C, 1, 1); diffusers uses Linear (C, C).
    if ".mid_block.attentions." in key and key.endswith(".weight") and t.ndim > 2 and t.shape[2:].numel() == 1:
        return t.reshape(t.shape[0], t.shape[1])  # (another shape is left as it is: the shape check names it)
    return t


def _vae_linear_to_attn(key: str, t: torch.Tensor) -> torch.Tensor:
    if ".mid.attn_1." in key and key.endswith(".weight") and t.ndim == 2 and not key.endswith("norm.weight"):
        return t.reshape(*t.shape, 1, 1)
    return t


def rename_keys(
    sd: Mapping[str, torch.Tensor], table: ModuleTable, *, to_diffusers: bool, reshape: Reshape | None = None
) -> tuple[StateDict, list[str]]:
    """Rename keys through a module table; returns (renamed, keys that matched no entry)."""
    src_i, dst_i = (0, 1) if to_diffusers else (1, 0)
    prefixes = {row[src_i]: (row[dst_i], row[2]) for row in table}
    out: StateDict = {}
    unknown: list[str] = []
    for key, t in sd.items():
        parts = key.split(".")
        new = None
        for n in range(min(len(parts) - 1, 6), 0, -1):  # longest prefix wins
            hit = prefixes.get(".".join(parts[:n]))
            if hit is None:
                continue
            dst_prefix, kind = hit
            rest = ".".join(parts[n:])
            suffixes = SUFFIX_TABLES[kind]
            if suffixes is None:
                new = f"{dst_prefix}.{rest}"
            else:
                module, _, param = rest.rpartition(".")
                lookup = suffixes if to_diffusers else {v: k for k, v in suffixes.items()}
                if module in lookup:
                    new = f"{dst_prefix}.{lookup[module]}.{param}"
            break
        if new is None:
            unknown.append(key)
            continue
        out[new] = reshape(new, t) if reshape else t
    return out, unknown


def unet_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> tuple[StateDict, list[str]]:
    """UNet keys without the `model.diffusion_model.` prefix -> diffusers names (+ unmatched keys)."""
    return rename_keys(sd, unet_module_table(layout), to_diffusers=True)


def unet_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], layout: UNetLayout) -> tuple[StateDict, list[str]]:
    return rename_keys(sd, unet_module_table(layout), to_diffusers=False)


def vae_ldm_to_diffusers(sd: Mapping[str, torch.Tensor], layout: VAELayout) -> tuple[StateDict, list[str]]:
    """VAE keys without the `first_stage_model.` prefix -> diffusers AutoencoderKL names (+ unmatched)."""
    return rename_keys(sd, vae_module_table(layout), to_diffusers=True, reshape=_vae_attn_to_linear)


def vae_diffusers_to_ldm(sd: Mapping[str, torch.Tensor], layout: VAELayout) -> tuple[StateDict, list[str]]:
    return rename_keys(sd, vae_module_table(layout), to_diffusers=False, reshape=_vae_linear_to_attn)


# --------------------------------------------------------------------------------------- text encoders


TEXT_MODEL = "text_model."


def normalize_clip_keys(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Canonical text-encoder names are transformers 4.x's `text_model.*` (every SD 1.x/2.x `text_encoder/`
    folder, and sdengine's CLIPTextModel). transformers >= 5 writes them without `text_model.`, and very old
    SD1 checkpoints lack it too: add it where missing."""
    return {k if k.startswith(TEXT_MODEL) else TEXT_MODEL + k: v for k, v in sd.items()}


def clip_ldm_to_diffusers(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    """SD1 text encoder keys without `cond_stage_model.transformer.` -> CLIPTextModel names (the LDM file
    nests transformers' own module, so this is the identity apart from old files lacking `text_model.`)."""
    return normalize_clip_keys(sd), []


def clip_diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> tuple[StateDict, list[str]]:
    return normalize_clip_keys(sd), []


def openclip_ldm_to_diffusers(
    sd: Mapping[str, torch.Tensor], *, num_layers: int | None = None
) -> tuple[StateDict, list[str]]:
    """OpenCLIP text tower (keys without `cond_stage_model.model.`) -> CLIPTextModel names.

    `num_layers`: how many residual blocks the text encoder uses; blocks from there on are dropped (SD2 stores
    24 and reads the penultimate layer's output, so its diffusers config has 23). Dropped keys are returned
    with the unmatched ones only if they are not such trailing blocks.
    """
    out: StateDict = {}
    unknown: list[str] = []
    for key, t in sd.items():
        if key in OPENCLIP_TOP:
            out[TEXT_MODEL + OPENCLIP_TOP[key]] = t
            continue
        m = _OPENCLIP_FUSED_RE.match(key)
        if m:
            layer, kind = int(m.group(1)), m.group(2)
            if num_layers is not None and layer >= num_layers:
                continue
            q, k, v = t.chunk(3, dim=0)  # views: fused (3D, ...) = [q; k; v]
            for name, part in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                out[f"{TEXT_MODEL}encoder.layers.{layer}.self_attn.{name}.{kind}"] = part
            continue
        m = _OPENCLIP_BLOCK_RE.match(key)
        if m and m.group(2) in OPENCLIP_BLOCK:
            layer = int(m.group(1))
            if num_layers is not None and layer >= num_layers:
                continue
            out[f"{TEXT_MODEL}encoder.layers.{layer}.{OPENCLIP_BLOCK[m.group(2)]}.{m.group(3)}"] = t
            continue
        unknown.append(key)
    return out, unknown


def openclip_diffusers_to_ldm(
    sd: Mapping[str, torch.Tensor], *, pad_unused_last_block: bool = True
) -> tuple[StateDict, list[str]]:
    """CLIPTextModel names -> OpenCLIP text-tower names (q/k/v fused back into in_proj).

    With `pad_unused_last_block`, a zero-filled extra residual block is appended: SD2 files always carry one
    more block than the text encoder uses (it reads the penultimate layer), and tools that load the original
    OpenCLIP architecture (A1111, ComfyUI, our own loader) expect that layout.
    """
    sd = {k.removeprefix(TEXT_MODEL): v for k, v in sd.items()}
    top_rev = {v: k for k, v in OPENCLIP_TOP.items()}
    block_rev = {v: k for k, v in OPENCLIP_BLOCK.items()}
    out: StateDict = {}
    unknown: list[str] = []
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        if key in top_rev:
            out[top_rev[key]] = t
            continue
        m = _HF_LAYER_RE.match(key)
        if m:
            layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault((layer, kind), {})[module[-6]] = t
                continue
            if module in block_rev:
                out[f"transformer.resblocks.{layer}.{block_rev[module]}.{kind}"] = t
                continue
        unknown.append(TEXT_MODEL + key)
    for (layer, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            unknown += [f"{TEXT_MODEL}encoder.layers.{layer}.self_attn.{p}_proj.{kind}" for p in parts]
            continue
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    if pad_unused_last_block and qkv:
        last = max(layer for layer, _ in qkv)
        pad = last + 1
        for key in [k for k in out if k.startswith(f"transformer.resblocks.{last}.")]:
            rest = key.removeprefix(f"transformer.resblocks.{last}.")
            out[f"transformer.resblocks.{pad}.{rest}"] = torch.zeros_like(out[key])
    return out, unknown


# ------------------------------------------------------------------------------------- whole checkpoints

COMPONENT_PREFIXES = {
    "unet": UNET_PREFIX,
    "vae": VAE_PREFIX,
    "clip": CLIP_PREFIX,  # SD1 text encoder (transformers names)
    "openclip": OPENCLIP_PREFIX,  # SD2 text encoder (OpenCLIP names)
}


def split_ldm(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, StateDict], list[str], list[str]]:
    """Split a flat LDM checkpoint by component prefix -> ({part: keys without prefix}, unused, unknown).

    Parts are `unet`, `vae`, `clip`, `openclip` (empty when absent); known-unused keys are set aside first."""
    parts: dict[str, StateDict] = {name: {} for name in COMPONENT_PREFIXES}
    unused: list[str] = []
    unknown: list[str] = []
    for key, t in sd.items():
        if is_known_unused(key):
            unused.append(key)
            continue
        for name, prefix in COMPONENT_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = t
                break
        else:
            unknown.append(key)
    return parts, unused, unknown
