"""LoRA key matching: which of a model's layers each name in a LoRA file adapts, and the report of what matched.

How a file's names find the model's layers (facts from kohya-ss/sd-scripts and diffusers'
``loaders/lora_conversion_utils.py``): kohya names a layer ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` in SDXL
files) plus the module's full name with dots turned into underscores, where the U-Net name is diffusers' for SD1/SD2
files and the original LDM one (``input_blocks_1_1_...``) in SDXL-style files. Rather than guess where the dots
were, sdengine builds that alias for every Linear/Conv2d of the model (both U-Net spellings, through the LDM table
in ``keymaps``) and looks names up exactly. PEFT/diffusers files use the dotted module name behind ``unet.`` or
``text_encoder.``. For the diffusion transformers (SD3's MMDiT, Flux's, Chroma's, Qwen-Image's),
:mod:`sdengine.weights.lora_dit_keys` has rewritten the file's names onto the model's modules
(``transformer.<module>``) before they are matched here.

Every file gets a :class:`LoRAReport` of matched and unmatched names. No match at all, a layer whose shape differs
from the model's, or names of another architecture (SDXL's second text encoder, DiT blocks) are errors naming the
mismatch; a partial match is logged as a warning and listed in the report, but on FLUX.2 and Z-Image (whose LoRAs adapt
the transformer alone) it is an error too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..models.t5_text import T5Encoder
from ..nn.lycoris import NORM_TYPES
from . import keymaps as km
from .lora_dit_keys import (
    CHROMA_FAMILY,
    DIT_PREFIX,
    FLUX2_FAMILY,
    FLUX2_LAYERS,
    FLUX_FAMILY,
    QWEN_FAMILY,
    QWEN_LAYERS,
    SD3_FAMILY,
    Z_IMAGE_FAMILY,
    Z_IMAGE_LAYERS,
    dit_family,
    flux1_layers,
    flux_only_layers,
    not_qwen_layers,
)
from .lora_file import LoRAFile, LoRAFileError, LoRAFormat, LoRALayerWeights
from .lycoris_file import LycorisLayerWeights

Component = Literal["unet", "text_encoder", "text_encoder_2"]

_COMFY_TE = "text_encoders."  # ComfyUI's prefix of text-encoder layer names

# Names that give away a diffusion transformer, most specific first (checked before the SD hints below).
_DIT_HINTS = [
    (re.compile(r"distilled_guidance_layer"), CHROMA_FAMILY),  # Chroma's approximator: no other model has it
    (QWEN_LAYERS, QWEN_FAMILY),  # a block's img_mod / txt_mod / img_mlp / txt_mlp (Flux's are in double_blocks)
    (Z_IMAGE_LAYERS, Z_IMAGE_FAMILY),  # layers / noise_refiner / context_refiner .N.attention / feed_forward
    (FLUX2_LAYERS, FLUX2_FAMILY),  # FLUX.2's shared modulations, SwiGLU linear_in / linear_out, to_qkv_mlp_proj
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), FLUX_FAMILY),
    (re.compile(r"joint_blocks|context_block|x_block"), SD3_FAMILY),
    (
        # ComfyUI names SD U-Net layers diffusion_model.<LDM name> too: only other names there are a transformer's
        re.compile(
            r"^lora_transformer_|^transformer\.|^diffusion_model\.(?!(?:input_blocks|middle_block|output_blocks|"
            r"time_embed|out)\.)"
        ),
        "a diffusion transformer (SD3/Flux-style)",
    ),
]
# Names that give away another architecture.
_ARCH_HINTS = [
    *_DIT_HINTS,
    (
        re.compile(r"^lora_te2_|^text_encoder_2\.|^text_encoders\.clip_g\."),
        "SDXL (it carries a second text encoder, lora_te2_/text_encoder_2)",
    ),
    (re.compile(r"label_emb|add_embedding"), "SDXL (it carries the added-conditioning embedding)"),
]
_DIT_GENERIC = _DIT_HINTS[-1][1]
# Cross-attention width (attn2.to_k input) -> family: the one shape that tells SD1, SD2 and SDXL apart.
_CONTEXT_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_CROSS_KV_RE = re.compile(r"attn2[._]to_[kv]$")


@dataclass(frozen=True)
class Target:
    component: Component
    name: str  # module name inside the component, e.g. down_blocks.0.attentions.0.proj_in
    module: nn.Module


def lora_targets(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Layers a LoRA can adapt: every Linear and Conv2d."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d):
            yield name, m


def adapter_targets(module: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """Layers a file may change: every Linear and Conv2d (LoRA and LyCORIS layers), and every GroupNorm/LayerNorm
    with a weight (differences of its weight and bias: ComfyUI's 1-d ``diff``/``diff_b``, LyCORIS' ``w_norm``)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear | nn.Conv2d) or (
            isinstance(m, NORM_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)
        ):
            yield name, m


def kohya_name(component: Component, module_name: str) -> str:
    """kohya's layer name: component prefix + the module's dotted name with underscores (what its trainer writes)."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + module_name.replace(".", "_")


def unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module name -> LDM module name, for a U-Net that has the SD layout (else empty)."""
    cfg = getattr(unet, "config", None)
    attention = getattr(cfg, "attention", None)
    if cfg is None or attention is None or "self" in attention or not getattr(cfg, "mid_block", False):
        return {}
    has = tuple(a != "none" for a in attention)
    layout = km.UNetLayout(len(attention), cfg.layers_per_block, has, tuple(reversed(has)), cfg.mid_attention != "none")
    rows = km.unet_module_table(layout)
    if getattr(cfg, "addition_time_embed_dim", None) is not None:  # SDXL: add_embedding is LDM's label_emb
        from .sdxl_files import ADD_EMBEDDING_ROWS

        rows = rows + ADD_EMBEDDING_ROWS
    prefixes = {diff: (ldm, kind) for ldm, diff, kind in rows}
    out: dict[str, str] = {}
    for name, _ in adapter_targets(unet):
        parts = name.split(".")
        for n in range(len(parts), 0, -1):  # longest prefix wins
            hit = prefixes.get(".".join(parts[:n]))
            if hit is None:
                continue
            ldm, kind = hit
            rest = ".".join(parts[n:])
            table = km.SUFFIX_TABLES[kind]
            if table is None:
                out[name] = f"{ldm}.{rest}" if rest else ldm
            else:
                rev = {v: k for k, v in table.items()}
                if rest in rev:
                    out[name] = f"{ldm}.{rev[rest]}"
            break
    return out


class ModelIndex:
    """Every name a LoRA file may use for each adaptable layer of (unet, text_encoder)."""

    def __init__(self, unet: nn.Module | None, text_encoder: Any, text_encoder_2: nn.Module | None = None) -> None:
        # A text encoder that is not a torch module (the emoji model's MiniLMTextEncoder wrapper) has no
        # layers a LoRA may adapt: remembered by name, so that a LoRA with text-encoder layers is refused.
        self.fixed_text_encoder: str | None = None
        if text_encoder is not None and not isinstance(text_encoder, nn.Module):
            self.fixed_text_encoder, text_encoder = type(text_encoder).__name__, None
        self.unet, self.text_encoder = unet, text_encoder
        self.aliases: dict[str, Target] = {}
        self.dit = dit_family(unet)  # SD3's MMDiT or Flux's transformer: the file's names go through lora_dit_keys
        if unet is not None and self.dit is not None:
            for name, m in adapter_targets(unet):  # split_dit_layers rewrote every name it knows to these
                self.aliases[DIT_PREFIX + name] = Target("unet", name, m)
        elif unet is not None:
            ldm = unet_ldm_names(unet)
            for name, m in adapter_targets(unet):
                t = Target("unet", name, m)
                # kohya's OFT trainer names its layers oft_unet_... (A1111 reads that prefix too)
                for alias in (kohya_name("unet", name), "oft_unet_" + name.replace(".", "_"), f"unet.{name}", name):
                    self.aliases.setdefault(alias, t)
                if name in ldm:
                    self.aliases.setdefault("lora_unet_" + ldm[name].replace(".", "_"), t)
                    self.aliases.setdefault("oft_unet_" + ldm[name].replace(".", "_"), t)
                    self.aliases.setdefault("diffusion_model." + ldm[name], t)  # ComfyUI
        if text_encoder_2 is not None and text_encoder_2 is text_encoder:
            text_encoder_2 = None  # Chroma: its one T5 is the pipeline's text_encoder and text_encoder_2
        if isinstance(text_encoder, T5Encoder):  # Chroma's only encoder: diffusers' text_encoder., kohya's, ComfyUI's
            for name, m in adapter_targets(text_encoder):
                t = Target("text_encoder", name, m)
                flat = name.replace(".", "_")
                for alias in (
                    f"text_encoder.{name}",
                    "lora_te_" + flat,
                    "lora_te3_" + flat,
                    f"{_COMFY_TE}t5xxl.transformer.{name}",
                    name,
                ):
                    self.aliases.setdefault(alias, t)
        elif text_encoder is not None:
            for name, m in adapter_targets(text_encoder):
                t = Target("text_encoder", name, m)
                short = name.removeprefix(km.TEXT_MODEL)  # transformers >= 5 drops `text_model.`
                for alias in (
                    kohya_name("text_encoder", name),
                    "lora_te1_" + name.replace(".", "_"),
                    # kohya names made from transformers >= 5 modules (LyCORIS writes them): no `text_model_`
                    "lora_te_" + short.replace(".", "_"),
                    "lora_te1_" + short.replace(".", "_"),
                    f"text_encoder.{name}",
                    f"text_encoder.{short}",
                    # ComfyUI: its CLIP-L (SD1, SDXL's first) or OpenCLIP-H (SD2) state-dict names
                    f"{_COMFY_TE}clip_l.transformer.{km.TEXT_MODEL}{short}",
                    f"{_COMFY_TE}clip_h.transformer.{km.TEXT_MODEL}{short}",
                    name,
                ):
                    self.aliases.setdefault(alias, t)
        self.text_encoder_2 = text_encoder_2
        # SDXL's second encoder (kohya lora_te2_, PEFT/diffusers text_encoder_2.), or Flux's T5 (diffusers'
        # text_encoder_2 too)
        if text_encoder_2 is not None:
            for name, m in adapter_targets(text_encoder_2):
                t = Target("text_encoder_2", name, m)
                short = name.removeprefix(km.TEXT_MODEL)
                for alias in (
                    "lora_te2_" + name.replace(".", "_"),
                    "lora_te2_" + short.replace(".", "_"),
                    f"text_encoder_2.{name}",
                    f"text_encoder_2.{short}",
                    f"{_COMFY_TE}clip_g.transformer.{km.TEXT_MODEL}{short}",  # ComfyUI
                ):
                    self.aliases.setdefault(alias, t)
                if isinstance(text_encoder_2, T5Encoder):  # Flux's second encoder: kohya's lora_te3_, ComfyUI's
                    for alias in ("lora_te3_" + name.replace(".", "_"), f"{_COMFY_TE}t5xxl.transformer.{name}"):
                        self.aliases.setdefault(alias, t)

    def family(self) -> str:
        if self.dit is not None:
            return self.dit
        if self.text_encoder_2 is not None:
            return "SDXL"
        cfg = getattr(self.unet, "config", None)
        if getattr(cfg, "addition_time_embed_dim", None):  # SDXL's micro-conditioning: an SDXL U-Net given alone
            return "SDXL"
        width = getattr(cfg, "cross_attention_dim", None)
        if width in (768, 1024):
            return _CONTEXT_WIDTH[width]
        return f"a custom model (cross-attention width {width})" if width else "this model"


def _lora_family(lf: LoRAFile, dit: bool = False) -> str | None:
    """The family a file's names give away (None: no hint). ``dit``: the model is a diffusion transformer, whose
    own second text encoder (SD3's CLIP-G as lora_te2_ / text_encoder_2.) is no hint of SDXL."""
    names = list(lf.layers) + list(lf.lycoris) + lf.unknown + [k for ks in lf.unsupported.values() for k in ks]
    for rx, label in _DIT_HINTS:  # a transformer's names first: its text-encoder names could read as SDXL's
        if any(rx.search(key) for key in names):
            return label
    for key in names:
        for rx, label in _ARCH_HINTS[len(_DIT_HINTS) :]:
            if dit and rx.pattern.startswith("^lora_te2_"):  # SD3's CLIP-G: what an SD3 model has
                continue
            if rx.search(key):
                return label
    for key, w in lf.layers.items():
        if _CROSS_KV_RE.search(key.removesuffix(".weight")):
            width = int(w.down.shape[1])
            return _CONTEXT_WIDTH.get(width, f"a model with cross-attention width {width}")
    for key, lw in lf.lycoris.items():
        shape = lw.shape()
        if _CROSS_KV_RE.search(key) and not isinstance(shape, str) and shape[1] > 0:
            return _CONTEXT_WIDTH.get(shape[1], f"a model with cross-attention width {shape[1]}")
    return None


def check_dit_family(lf: LoRAFile, index: ModelIndex) -> None:
    """A file whose names are the other diffusion transformer's (Flux's ``double_blocks`` on SD3, SD3's
    ``joint_blocks`` on Flux, Qwen-Image's ``transformer_blocks.N.img_mod`` on either) is a :class:`LoRAFileError`
    naming both, before its layers are split by the rows of a model they were not made for. On Qwen-Image, a file
    naming a layer only Flux.1 / SD3 have in diffusers' names (``norm1.linear``, ``ff.net``, ...) or any
    text-encoder layer is refused too (diffusers' Qwen-Image loader adapts the transformer alone)."""
    family = _lora_family(lf, dit=True)
    where = str(lf.path) if lf.path is not None else lf.name
    if index.dit == FLUX2_FAMILY:  # its BFL block names are FLUX.1's: a FLUX.1 file is told by FLUX.1's own layers
        names = list(lf.layers) + list(lf.lycoris) + [k for ks in lf.unsupported.values() for k in ks]
        if family in (SD3_FAMILY, CHROMA_FAMILY, QWEN_FAMILY, Z_IMAGE_FAMILY):
            raise LoRAFileError(f"{where}: a LoRA for {family}; the model is {FLUX2_FAMILY}")
        flux = sorted(flux1_layers(names))
        if flux:
            raise LoRAFileError(
                f"{where}: a LoRA for {FLUX_FAMILY}: it adapts {flux[0]}"
                f"{f' (and {len(flux) - 1} more)' if len(flux) > 1 else ''}, a layer FLUX.2 does not have; the model "
                f"is {FLUX2_FAMILY}"
            )
        te = sorted(k for k in names if k.startswith(("lora_te", "text_encoder")))
        if te:
            raise LoRAFileError(
                f"{where}: adapts a text encoder ({len(te)} layers, e.g. {te[0]}): LoRAs for {FLUX2_FAMILY} adapt its "
                "transformer only (as diffusers' Flux2KleinPipeline.load_lora_weights); use one without text-encoder "
                "layers"
            )
        return
    if index.dit == Z_IMAGE_FAMILY:
        if family in (FLUX_FAMILY, SD3_FAMILY, CHROMA_FAMILY, QWEN_FAMILY, FLUX2_FAMILY):
            raise LoRAFileError(f"{where}: a LoRA for {family}; the model is {Z_IMAGE_FAMILY}")
        names = list(lf.layers) + list(lf.lycoris) + [k for ks in lf.unsupported.values() for k in ks]
        te = sorted(k for k in names if k.startswith(("lora_te", "text_encoder")))
        if te:
            raise LoRAFileError(
                f"{where}: adapts a text encoder ({len(te)} layers, e.g. {te[0]}): LoRAs for {Z_IMAGE_FAMILY} adapt "
                "its transformer only (as diffusers' ZImagePipeline.load_lora_weights); use one without text-encoder "
                "layers"
            )
        return
    if index.dit == QWEN_FAMILY:
        names = list(lf.layers) + list(lf.lycoris) + [k for ks in lf.unsupported.values() for k in ks]
        other = sorted(not_qwen_layers(names))
        if family in (FLUX_FAMILY, SD3_FAMILY, CHROMA_FAMILY, Z_IMAGE_FAMILY, FLUX2_FAMILY):
            raise LoRAFileError(f"{where}: a LoRA for {family}; the model is {QWEN_FAMILY}")
        if other:
            raise LoRAFileError(
                f"{where}: a LoRA for Flux.1 or SD3: it adapts {other[0]}"
                f"{f' (and {len(other) - 1} more)' if len(other) > 1 else ''}, a layer Qwen-Image does not have; "
                f"the model is {QWEN_FAMILY}"
            )
        te = sorted(k for k in names if k.startswith(("lora_te", "text_encoder")))
        if te:
            raise LoRAFileError(
                f"{where}: adapts a text encoder ({len(te)} layers, e.g. {te[0]}): LoRAs for {QWEN_FAMILY} adapt its "
                "transformer only (as diffusers' QwenImagePipeline.load_lora_weights); use one without text-encoder "
                "layers"
            )
        return
    if index.dit == CHROMA_FAMILY:  # Chroma's blocks are Flux's: their names are Flux's too
        if family == FLUX_FAMILY or family == CHROMA_FAMILY:
            names = list(lf.layers) + list(lf.lycoris) + [k for ks in lf.unsupported.values() for k in ks]
            flux = flux_only_layers(names)
            if flux:
                raise LoRAFileError(
                    f"{where}: a LoRA for {FLUX_FAMILY}: it adapts {flux[0]}"
                    f"{f' (and {len(flux) - 1} more)' if len(flux) > 1 else ''}, a layer Chroma does not have "
                    "(Chroma's modulation comes from its distilled_guidance_layer); the model is Chroma"
                )
            return
        family = family if family in (SD3_FAMILY, QWEN_FAMILY, Z_IMAGE_FAMILY, FLUX2_FAMILY) else None
    if (
        index.dit is not None
        and family in (FLUX_FAMILY, SD3_FAMILY, CHROMA_FAMILY, QWEN_FAMILY, Z_IMAGE_FAMILY, FLUX2_FAMILY)
        and family != index.dit
    ):
        raise LoRAFileError(f"{where}: a LoRA for {family}; the model is {index.dit}")


def _fit_lycoris(w: LycorisLayerWeights, module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d) and module.groups != 1:
        return "a grouped convolution"
    if "diff_b" in w.parts and getattr(module, "bias", None) is None:
        return "a bias difference (diff_b) for a layer without a bias"
    weight = module.weight
    assert isinstance(weight, torch.Tensor)
    return w.fit(tuple(weight.shape))


def _fit(w: LoRALayerWeights, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The pair reshaped for the module, or a description of why it does not fit.

    SD1 stores proj_in/proj_out as 1x1 convolutions and SD2 as Linear layers: a LoRA trained on one layout holds
    (r, in, 1, 1) or (r, in) for the same map, so spatial singleton dims are added or dropped as the module needs.
    """
    down, up = w.down, w.up
    if not isinstance(module, nn.Linear | nn.Conv2d):  # a norm layer: only differences (diff, w_norm) change it
        return f"a LoRA pair on a {type(module).__name__} (norm layers take weight differences only)"
    if isinstance(module, nn.Linear):
        if down.ndim == 4 and down.shape[2:] == (1, 1) and up.shape[2:] == (1, 1):
            down, up = down.flatten(1), up.flatten(1)
        if down.ndim != 2:
            return f"a {tuple(down.shape[2:])} convolution LoRA on a Linear layer"
        want_in, want_out = module.in_features, module.out_features
    else:
        assert isinstance(module, nn.Conv2d)
        if module.groups != 1:
            return "a grouped convolution"
        if down.ndim == 2:
            down, up = down[:, :, None, None], up[:, :, None, None]
        if tuple(down.shape[2:]) != tuple(module.kernel_size) or tuple(up.shape[2:]) != (1, 1):
            return f"kernel {tuple(down.shape[2:])}/{tuple(up.shape[2:])}, layer has {tuple(module.kernel_size)}"
        want_in, want_out = module.in_channels, module.out_channels
    if down.shape[1] != want_in or up.shape[0] != want_out:
        return f"LoRA maps {down.shape[1]} -> {up.shape[0]}, layer {want_in} -> {want_out}"
    return down, up


@dataclass
class LoRAReport:
    """What one file did to the model."""

    name: str
    path: str | None
    format: LoRAFormat
    weight: float
    matched: list[str]  # "unet:<module>" / "text_encoder:<module>"
    unmatched: list[str]  # the file's layer names (and unknown keys) that found no layer
    unsupported: dict[str, list[str]] = field(default_factory=dict)
    ranks: list[int] = field(default_factory=list)
    algorithms: list[str] = field(default_factory=list)  # "LoRA", "LoHa", "LoKr", "DoRA", ... (empty: LoRA)

    @property
    def complete(self) -> bool:
        return not self.unmatched and not self.unsupported

    def summary(self) -> str:
        comps = sorted({m.split(":")[0] for m in self.matched})
        kinds = "/".join(a for a in self.algorithms if a != "LoRA") or "LoRA"
        kinds = kinds if kinds == "LoRA" or "LoRA" not in self.algorithms else f"LoRA+{kinds}"
        ranks = "/".join(map(str, self.ranks)) or "?"
        s = (
            f"{kinds} {self.name} ({self.format}, rank {ranks}, weight {self.weight:g}): "
            f"{len(self.matched)} layers matched ({', '.join(comps)})"
        )
        if self.unmatched:
            s += f", {len(self.unmatched)} unmatched: {_some(self.unmatched)}"
        for kind, keys in self.unsupported.items():
            s += f"; {len(keys)} keys of an unsupported kind ({kind}) skipped"
        return s


def _some(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------- matching

# families whose LoRAs adapt the transformer alone (text-encoder layers refused by check_dit_family): every layer of
# such a file must find its module, so a name that matches none (another size's block, a LyCORIS ``lycoris_`` name of
# another model) refuses the file instead of applying the rest of it
_WHOLE_FAMILIES = frozenset({FLUX2_FAMILY, Z_IMAGE_FAMILY})


def match_lora(
    lf: LoRAFile, index: ModelIndex
) -> tuple[
    dict[str, tuple[Target, torch.Tensor, torch.Tensor]], list[str], dict[str, tuple[Target, LycorisLayerWeights]]
]:
    """File layers -> (model layer, down, up), the unmatched names, and LyCORIS layers -> (model layer, weights);
    errors for another architecture or a layer whose shape differs."""
    where = str(lf.path) if lf.path is not None else lf.name
    if lf.unsupported and (lf.layers or lf.lycoris):  # part of the file cannot be applied: never half of it
        kinds = "; ".join(f"{len(keys)} keys of {kind} (e.g. {keys[0]})" for kind, keys in lf.unsupported.items())
        raise LoRAFileError(
            f"{where}: holds adapters sdengine does not apply: {kinds}; refused rather than half applied"
        )
    te_keys = sorted(k for k in [*lf.layers, *lf.lycoris] if k.startswith(("lora_te", "text_encoder")))
    if te_keys and index.fixed_text_encoder is not None:
        raise LoRAFileError(
            f"{where}: adapts a text encoder ({len(te_keys)} layers, e.g. {te_keys[0]}), but this model's text "
            f"encoder ({index.fixed_text_encoder}) cannot be adapted by a LoRA: use one trained on the U-Net only"
        )
    matched: dict[str, tuple[Target, torch.Tensor, torch.Tensor]] = {}
    unmatched: list[str] = []
    wrong: list[str] = []
    for key, w in lf.layers.items():
        target = index.aliases.get(key)
        if target is None:
            unmatched.append(key)
            continue
        fit = _fit(w, target.module)
        if isinstance(fit, str):
            wrong.append(f"{target.component}.{target.name} ({fit})")
            continue
        matched[key] = (target, *fit)
    lycoris: dict[str, tuple[Target, LycorisLayerWeights]] = {}
    for key, lw in lf.lycoris.items():
        target = index.aliases.get(key)
        if target is None:
            if key not in lf.layers:  # a LoRA pair's bias difference: the pair's name is listed already
                unmatched.append(key)
            continue
        why = _fit_lycoris(lw, target.module)
        if why is not None:
            wrong.append(f"{target.component}.{target.name} ({why})")
            continue
        lycoris[key] = (target, lw)
    family = _lora_family(lf, dit=index.dit is not None)
    model = index.family()
    if family is not None and model == "SDXL" and family.startswith("SDXL"):
        family = model  # the SDXL hints (a second text encoder, label_emb) are what an SDXL model has
    if family == _DIT_GENERIC and index.dit is not None:
        family = model  # diffusers' transformer names: the shapes tell SD3 from Flux
    if family == FLUX_FAMILY and index.dit == CHROMA_FAMILY:
        family = model  # Chroma's blocks carry Flux's names (check_dit_family refused Flux's own layers)
    if family == FLUX_FAMILY and index.dit == FLUX2_FAMILY:
        family = model  # FLUX.2's BFL names are FLUX.1's (a q/k norm's diff): check_dit_family told FLUX.1's own
    hint = f"; it looks like a LoRA for {family}, the model is {model}" if family and family != model else ""
    if wrong:
        raise LoRAFileError(f"{where}: shapes do not match this model: {_some(wrong, 2)}{hint}")
    if family and family != model and family in {label for _, label in _ARCH_HINTS}:
        raise LoRAFileError(f"{where}: a LoRA for {family}; the model is {model}")
    if not matched and not lycoris:
        if lf.unsupported and not lf.layers and not lf.lycoris:
            raise LoRAFileError(f"{where}: {', '.join(lf.unsupported)} adapters are not supported")
        names = sorted([*lf.layers, *lf.lycoris])
        missing_te = index.text_encoder is None and any(k.startswith(("lora_te", "text_encoder")) for k in names)
        why = hint or ("; it adapts the text encoder, and none was given" if missing_te else "")
        raise LoRAFileError(
            f"{where}: none of its {len(names)} layers match this model's layer names (e.g. {_some(names, 2)}){why}"
        )
    left = unmatched + lf.unknown
    if left and index.dit in _WHOLE_FAMILIES:
        raise LoRAFileError(
            f"{where}: {len(left)} of its layers match no layer of this {index.dit} transformer "
            f"(e.g. {_some(left, 2)}): a LoRA for another size or layout; refused rather than half applied"
        )
    return matched, left, lycoris


__all__ = [
    "Component",
    "LoRAReport",
    "ModelIndex",
    "Target",
    "adapter_targets",
    "check_dit_family",
    "kohya_name",
    "lora_targets",
    "match_lora",
    "unet_ldm_names",
]
