"""LoRA: low-rank weight updates (Hu et al. 2021), read from kohya/A1111 and diffusers/PEFT files and applied to
sdengine's U-Net and text encoder, several at once, each with its own weight.

A LoRA for a layer with weight W (out, in) stores a ``down`` matrix A (r, in) and an ``up`` matrix B (out, r); the
layer computes ``W x + m * s * B A x`` with the user's weight m and the file's scale s = alpha / r (kohya's
``.alpha``; PEFT's ``lora_alpha``; alpha = r, so s = 1, when a file has none). Convolutions (LoCon) use a down
convolution with the layer's own kernel, stride and padding and a 1x1 up convolution, which composes to one
convolution with kernel ``B @ A``.

Two ways to apply it, both reversible exactly:
- patched (default): a forward hook adds the low-rank term to the layer's output; the base weights are never
  touched, and changing a LoRA's weight between generations changes one number (no reload);
- fused (``handle.fuse()``): the layer's weight tensor is swapped for ``W + sum m s B A``; ``unfuse`` swaps the
  original tensor object back, so the base weights are restored bit for bit.

How a file's names find the model's layers (facts from kohya-ss/sd-scripts and diffusers'
``loaders/lora_conversion_utils.py``): kohya names a layer ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` in SDXL
files) plus the module's full name with dots turned into underscores, where the U-Net name is diffusers' for SD1/SD2
files and the original LDM one (``input_blocks_1_1_...``) in SDXL-style files. Rather than guess where the dots
were, sdengine builds that alias for every Linear/Conv2d of the model (both U-Net spellings, through the LDM table
in ``keymaps``) and looks names up exactly. PEFT/diffusers files use the dotted module name behind ``unet.`` or
``text_encoder.``, with ``lora_A`` / ``lora_B`` (older diffusers: ``lora.down`` / ``lora.up``,
``lora_linear_layer.*``, ``processor.to_q_lora.*``); their alpha is in the ``lora_adapter_metadata`` JSON.

Every file gets a :class:`LoRAReport` of matched and unmatched names. No match at all, a layer whose shape differs
from the model's, or names of another architecture (SDXL's second text encoder, DiT blocks) are errors naming the
mismatch; a partial match is logged as a warning and listed in the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from . import keymaps as km
from .io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsError, load_file

log = logging.getLogger(__name__)

LoRAFormat = Literal["kohya", "peft"]
Component = Literal["unet", "text_encoder"]
LORA_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
WEIGHT_WARN_LIMIT = 4.0  # |weight| above this is almost always a typo (A1111 users type 0.8, not 8)


class LoRAError(WeightsError):
    """A LoRA file that cannot be used with this model; the message says why, in one line."""


class LoRAWeightWarning(UserWarning):
    """A LoRA weight outside [-4, 4]."""


# -------------------------------------------------------------------------------------------- file names

# kohya/A1111: `<layer>.lora_down.weight`, `<layer>.lora_up.weight`, `<layer>.alpha`; layer names have no dots.
_KOHYA_RE = re.compile(
    r"^(?P<layer>lora_(?:unet|te\d?)_[A-Za-z0-9_]+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# PEFT / diffusers: `<module path>.lora_A[.<adapter>].weight`, older `lora.down.weight`, `lora_linear_layer.down...`
_PEFT_RE = re.compile(
    r"^(?P<layer>.+?)\.(?:(?P<ab>lora_A|lora_B)(?:\.(?!weight$)[^.]+)?\.weight"
    r"|(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight|(?P<alpha>alpha))$"
)
# diffusers' attention-processor files: `...attn1.processor.to_q_lora.down.weight`
_ATTN_PROC_RE = re.compile(r"^(?P<layer>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
# Adapters sdengine does not implement: named in the error instead of silently skipped.
_UNSUPPORTED = [
    (re.compile(r"\.dora_scale$|\.lora_magnitude_vector"), "DoRA (weight-decomposed LoRA)"),
    (re.compile(r"\.hada_(w|t)\d"), "LyCORIS LoHa"),
    (re.compile(r"\.lokr_(w|t)\d"), "LyCORIS LoKr"),
    (re.compile(r"\.lora_mid\.weight$"), "LyCORIS LoCon with a Tucker (lora_mid) core"),
    (re.compile(r"\.(diff|diff_b)$"), "full weight differences (diff)"),
]
# Names that give away another architecture.
_ARCH_HINTS = [
    (re.compile(r"^lora_te2_|^text_encoder_2\."), "SDXL (it carries a second text encoder, lora_te2_/text_encoder_2)"),
    (re.compile(r"label_emb|add_embedding"), "SDXL (it carries the added-conditioning embedding)"),
    (re.compile(r"^lora_transformer_|^transformer\.|^diffusion_model\.|double_blocks|single_blocks|joint_blocks"),
     "a diffusion transformer (SD3/Flux-style)"),
]
# Cross-attention width (attn2.to_k input) -> family: the one shape that tells SD1, SD2 and SDXL apart.
_CONTEXT_WIDTH = {768: "SD1.x", 1024: "SD2.x", 2048: "SDXL"}
_CROSS_KV_RE = re.compile(r"attn2[._]to_[kv]$")


@dataclass
class LoRALayerWeights:
    """One adapted layer as stored in a file (tensors as read: no copy)."""

    key: str  # the file's name for the layer (kohya layer name, or PEFT module path with its prefix)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float | None = None  # None: alpha = rank
    rslora: bool = False  # PEFT's rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        alpha = float(self.rank) if self.alpha is None else self.alpha
        return alpha / math.sqrt(self.rank) if self.rslora else alpha / self.rank


@dataclass
class LoRAFile:
    """A parsed LoRA file: its layers by the file's names, plus what could not be read as LoRA layers."""

    name: str
    format: LoRAFormat
    layers: dict[str, LoRALayerWeights]
    unknown: list[str] = field(default_factory=list)  # keys of no LoRA layout sdengine knows
    unsupported: dict[str, list[str]] = field(default_factory=dict)  # adapter kind -> keys
    metadata: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> LoRAFile:
        """Read a .safetensors (or weights-only .ckpt/.pt/.bin) LoRA file."""
        path = Path(path)
        sd, info = load_file(path)  # corrupt files raise CorruptFileError (one line) here
        meta = {k: v for k, v in info.items() if isinstance(v, str)}
        return cls.from_state_dict(sd, meta, name=path.stem, path=path)

    @classmethod
    def from_state_dict(
        cls,
        sd: Mapping[str, torch.Tensor],
        metadata: Mapping[str, str] | None = None,
        *,
        name: str = "lora",
        path: Path | None = None,
    ) -> LoRAFile:
        metadata = dict(metadata or {})
        where = str(path) if path is not None else name
        if not sd:
            raise LoRAError(f"{where}: holds no tensors, not a LoRA")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        unknown: list[str] = []
        unsupported: dict[str, list[str]] = {}
        kohya = peft = 0
        for key, t in sd.items():
            kind = next((label for rx, label in _UNSUPPORTED if rx.search(key)), None)
            if kind is not None:
                unsupported.setdefault(kind, []).append(key)
                continue
            m = _KOHYA_RE.match(key)
            if m:
                kohya += 1
                part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m["part"]]
                parts.setdefault(m["layer"], {})[part] = t
                continue
            m = _ATTN_PROC_RE.match(key)
            if m:
                peft += 1
                proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
                parts.setdefault(f"{m['layer']}.{proj}", {})[m["du"]] = t
                continue
            m = _PEFT_RE.match(key)
            if m and not key.startswith("lora_"):
                peft += 1
                part = {"lora_A": "down", "lora_B": "up"}.get(m["ab"] or "", m["du"] or "alpha")
                parts.setdefault(m["layer"], {})[part] = t
                continue
            unknown.append(key)
        fmt: LoRAFormat = "kohya" if kohya >= peft else "peft"
        peft_cfg = _peft_metadata(metadata)
        layers: dict[str, LoRALayerWeights] = {}
        for layer, p in parts.items():
            if "down" not in p or "up" not in p:
                unknown += [f"{layer} (has {'/'.join(sorted(p))} but no {'up' if 'down' in p else 'down'})"]
                continue
            down, up = p["down"], p["up"]
            for part_name, tensor in (("down", down), ("up", up)):
                if not tensor.is_floating_point():
                    raise LoRAError(f"{where}: {layer} {part_name} has dtype {tensor.dtype}, not floating point")
            bad = [n for n, tensor in (("down", down), ("up", up), ("alpha", p.get("alpha")))
                   if tensor is not None and not bool(torch.isfinite(tensor.float()).all())]
            if bad:
                raise LoRAError(f"{where}: refused: NaN or inf values in {layer} ({', '.join(bad)})")
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
                raise LoRAError(
                    f"{where}: {layer}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair"
                )
            alpha = float(p["alpha"].float().item()) if "alpha" in p else None
            rslora = False
            if alpha is None and peft_cfg:
                alpha, rslora = _peft_alpha(peft_cfg, layer)
            layers[layer] = LoRALayerWeights(layer, down, up, alpha, rslora)
        if not layers and not unsupported:
            shown = ", ".join(unknown[:3])
            raise LoRAError(f"{where}: no LoRA layers found (keys like {shown}); not a kohya or diffusers/PEFT LoRA")
        return cls(name, fmt, layers, unknown, unsupported, metadata, path)

    @property
    def ranks(self) -> list[int]:
        return sorted({w.rank for w in self.layers.values()})


def _peft_metadata(metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """diffusers writes each component's PEFT LoraConfig as JSON keys `<component>.<field>`."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except json.JSONDecodeError:
        log.warning("ignoring unreadable lora_adapter_metadata")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, fld = key.partition(".")
        out.setdefault(comp, {})[fld] = value
    return out


def _peft_alpha(cfg: Mapping[str, Mapping[str, Any]], layer: str) -> tuple[float | None, bool]:
    comp, _, module = layer.partition(".")
    c = cfg.get(comp) or (next(iter(cfg.values())) if len(cfg) == 1 else None)
    if c is None:
        return None, False
    alpha = c.get("lora_alpha")
    # PEFT matches pattern keys against the end of the module name (alpha_pattern overrides lora_alpha).
    for pattern, value in (c.get("alpha_pattern") or {}).items():
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    return (None if alpha is None else float(alpha)), bool(c.get("use_rslora", False))


# ---------------------------------------------------------------------------------------- model aliases


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


def kohya_name(component: Component, module_name: str) -> str:
    """kohya's layer name: component prefix + the module's dotted name with underscores (what its trainer writes)."""
    prefix = "lora_unet_" if component == "unet" else "lora_te_"
    return prefix + module_name.replace(".", "_")


def _unet_ldm_names(unet: nn.Module) -> dict[str, str]:
    """diffusers module name -> LDM module name, for a U-Net that has the SD layout (else empty)."""
    cfg = getattr(unet, "config", None)
    attention = getattr(cfg, "attention", None)
    if cfg is None or attention is None or "self" in attention or not getattr(cfg, "mid_block", False):
        return {}
    has = tuple(a != "none" for a in attention)
    layout = km.UNetLayout(len(attention), cfg.layers_per_block, has, tuple(reversed(has)),
                           cfg.mid_attention != "none")
    prefixes = {diff: (ldm, kind) for ldm, diff, kind in km.unet_module_table(layout)}
    out: dict[str, str] = {}
    for name, _ in lora_targets(unet):
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

    def __init__(self, unet: nn.Module | None, text_encoder: Any) -> None:
        # A text encoder that is not a torch module (the emoji model's MiniLMTextEncoder wrapper) has no
        # layers a LoRA may adapt: remembered by name, so that a LoRA with text-encoder layers is refused.
        self.fixed_text_encoder: str | None = None
        if text_encoder is not None and not isinstance(text_encoder, nn.Module):
            self.fixed_text_encoder, text_encoder = type(text_encoder).__name__, None
        self.unet, self.text_encoder = unet, text_encoder
        self.aliases: dict[str, Target] = {}
        if unet is not None:
            ldm = _unet_ldm_names(unet)
            for name, m in lora_targets(unet):
                t = Target("unet", name, m)
                for alias in (kohya_name("unet", name), f"unet.{name}", name):
                    self.aliases.setdefault(alias, t)
                if name in ldm:
                    self.aliases.setdefault("lora_unet_" + ldm[name].replace(".", "_"), t)
        if text_encoder is not None:
            for name, m in lora_targets(text_encoder):
                t = Target("text_encoder", name, m)
                short = name.removeprefix(km.TEXT_MODEL)  # transformers >= 5 drops `text_model.`
                for alias in (kohya_name("text_encoder", name), "lora_te1_" + name.replace(".", "_"),
                              f"text_encoder.{name}", f"text_encoder.{short}", name):
                    self.aliases.setdefault(alias, t)

    def family(self) -> str:
        cfg = getattr(self.unet, "config", None)
        width = getattr(cfg, "cross_attention_dim", None)
        if width in (768, 1024):
            return _CONTEXT_WIDTH[width]
        return f"a custom model (cross-attention width {width})" if width else "this model"


def _lora_family(lf: LoRAFile) -> str | None:
    for key in list(lf.layers) + lf.unknown + [k for ks in lf.unsupported.values() for k in ks]:
        for rx, label in _ARCH_HINTS:
            if rx.search(key):
                return label
    for key, w in lf.layers.items():
        if _CROSS_KV_RE.search(key.removesuffix(".weight")):
            width = int(w.down.shape[1])
            return _CONTEXT_WIDTH.get(width, f"a model with cross-attention width {width}")
    return None


def _fit(w: LoRALayerWeights, module: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | str:
    """The pair reshaped for the module, or a description of why it does not fit.

    SD1 stores proj_in/proj_out as 1x1 convolutions and SD2 as Linear layers: a LoRA trained on one layout holds
    (r, in, 1, 1) or (r, in) for the same map, so spatial singleton dims are added or dropped as the module needs.
    """
    down, up = w.down, w.up
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


# --------------------------------------------------------------------------------------------- the layer


class LoRALayer(nn.Module):
    """The low-rank term of one layer: ``multiplier * scale * up(down(x))``, with the layer's conv geometry.

    Used for files (frozen tensors) and for training (``down``/``up`` trainable, ``up`` starting at zero so
    training starts from the base model exactly)."""

    def __init__(
        self,
        down: torch.Tensor,
        up: torch.Tensor,
        *,
        scale: float,
        multiplier: float = 1.0,
        conv: dict[str, tuple[int, int]] | None = None,
        trainable: bool = False,
    ) -> None:
        super().__init__()
        self.down = nn.Parameter(down, requires_grad=trainable)  # (r, in) or (r, in, kh, kw)
        self.up = nn.Parameter(up, requires_grad=trainable)  # (out, r) or (out, r, 1, 1)
        self.scale = float(scale)
        self.multiplier = float(multiplier)
        self.conv = conv  # stride/padding/dilation of the base convolution (None: Linear)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @staticmethod
    def geometry(module: nn.Module) -> dict[str, tuple[int, int]] | None:
        if isinstance(module, nn.Conv2d):
            if isinstance(module.padding, str):
                raise LoRAError(f"convolutions with padding={module.padding!r} are not supported")
            return {"stride": tuple(module.stride), "padding": tuple(module.padding),  # type: ignore[dict-item]
                    "dilation": tuple(module.dilation)}
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.multiplier * self.scale
        if m == 0.0:
            return None
        down, up = self.down, self.up
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.conv is None:
            h = F.linear(F.linear(x, down), up)  # (..., out)
        else:
            h = F.conv2d(F.conv2d(x, down, None, **self.conv), up)  # (B, out, H', W')
        return h * m

    def delta_weight(self) -> torch.Tensor:
        """``multiplier * scale * up @ down`` in float32, in the base weight's shape."""
        down, up = self.down.detach().float(), self.up.detach().float()
        if down.ndim == 2:
            d = up @ down  # (out, in)
        else:
            d = torch.einsum("or,rihw->oihw", up.flatten(1), down)  # 1x1 after kxk = one kxk conv
        return d * (self.multiplier * self.scale)


class _Patch:
    """The forward hook on one base layer: adds each LoRA's term to the output."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.layers: list[LoRALayer] = []
        self.enabled = True
        self.hook = module.register_forward_hook(self)
        self.original: torch.Tensor | None = None  # the base weight tensor while fused
        self.fused: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        x = args[0]
        for layer in self.layers:
            d = layer(x)
            if d is not None:
                output = output + d.to(output.dtype)
        return output

    def fuse(self) -> None:
        if self.original is not None:
            return
        w = self.module.weight
        delta = sum((layer.delta_weight() for layer in self.layers), torch.zeros((), dtype=torch.float32))
        self.original = w.data
        self.fused = (self.original.float() + delta.to(self.original.device)).to(self.original.dtype)
        w.data = self.fused
        self.enabled = False

    def unfuse(self) -> None:
        if self.original is None:
            return
        w = self.module.weight
        if w.data.data_ptr() != self.fused.data_ptr():  # type: ignore[union-attr]
            raise LoRAError("unfuse in the reverse order of fuse (another LoRA was fused on top of this one)")
        w.data = self.original  # the very tensor it had: restored bit for bit
        self.original = self.fused = None
        self.enabled = True

    def remove(self) -> None:
        self.unfuse()
        self.hook.remove()


# --------------------------------------------------------------------------------------------- reports


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

    @property
    def complete(self) -> bool:
        return not self.unmatched and not self.unsupported

    def summary(self) -> str:
        comps = sorted({m.split(":")[0] for m in self.matched})
        s = (f"LoRA {self.name} ({self.format}, rank {'/'.join(map(str, self.ranks)) or '?'}, weight {self.weight:g}): "
             f"{len(self.matched)} layers matched ({', '.join(comps)})")
        if self.unmatched:
            s += f", {len(self.unmatched)} unmatched: {_some(self.unmatched)}"
        for kind, keys in self.unsupported.items():
            s += f"; {len(keys)} keys of an unsupported kind ({kind}) skipped"
        return s


def _some(items: Sequence[str], n: int = 4) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------- matching


def match_lora(lf: LoRAFile, index: ModelIndex) -> tuple[dict[str, tuple[Target, torch.Tensor, torch.Tensor]],
                                                         list[str]]:
    """File layers -> (model layer, down, up) plus the unmatched names; errors for another architecture."""
    where = str(lf.path) if lf.path is not None else lf.name
    te_keys = sorted(k for k in lf.layers if k.startswith(("lora_te", "text_encoder.")))
    if te_keys and index.fixed_text_encoder is not None:
        raise LoRAError(
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
    family = _lora_family(lf)
    model = index.family()
    hint = f"; it looks like a LoRA for {family}, the model is {model}" if family and family != model else ""
    if wrong:
        raise LoRAError(f"{where}: shapes do not match this model: {_some(wrong, 2)}{hint}")
    if family and family != model and family in {label for _, label in _ARCH_HINTS}:
        raise LoRAError(f"{where}: a LoRA for {family}; the model is {model}")
    if not matched:
        if lf.unsupported and not lf.layers:
            raise LoRAError(f"{where}: {', '.join(lf.unsupported)} adapters are not supported")
        missing_te = index.text_encoder is None and any(k.startswith(("lora_te", "text_encoder.")) for k in lf.layers)
        why = hint or ("; it adapts the text encoder, and none was given" if missing_te else "")
        raise LoRAError(
            f"{where}: none of its {len(lf.layers)} layers match this model's layer names "
            f"(e.g. {_some(sorted(lf.layers), 2)}){why}"
        )
    return matched, unmatched + lf.unknown


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class AppliedLoRA:
    name: str
    weight: float
    layers: list[LoRALayer]
    report: LoRAReport


class LoRAHandle:
    """LoRAs applied to a model. ``set_weight`` changes one at the next forward (no reload); ``fuse`` folds them
    into the weights; ``remove`` (or leaving a ``with`` block) restores the model exactly."""

    def __init__(self) -> None:
        self.loras: list[AppliedLoRA] = []
        self._patches: dict[int, _Patch] = {}
        self.fused = False
        self.removed = False

    @property
    def reports(self) -> list[LoRAReport]:
        return [a.report for a in self.loras]

    @property
    def weights(self) -> list[float]:
        return [a.weight for a in self.loras]

    def _find(self, which: int | str) -> AppliedLoRA:
        if isinstance(which, int):
            return self.loras[which]
        hits = [a for a in self.loras if a.name == which]
        if not hits:
            raise KeyError(f"no LoRA named {which!r} here (have {', '.join(a.name for a in self.loras)})")
        return hits[0]

    def set_weight(self, which: int | str, weight: float) -> None:
        """Change one LoRA's weight (by position or name): takes effect at the next forward."""
        a = self._find(which)
        a.weight = a.report.weight = check_weight(weight, a.name)
        for layer in a.layers:
            layer.multiplier = a.weight
        if self.fused:  # recompute the fused weights from the originals: still exact on unfuse
            self.unfuse()
            self.fuse()

    def set_weights(self, weights: Sequence[float] | Mapping[str, float]) -> None:
        items = weights.items() if isinstance(weights, Mapping) else enumerate(weights)
        if not isinstance(weights, Mapping) and len(weights) != len(self.loras):
            raise ValueError(f"{len(weights)} weights for {len(self.loras)} LoRAs")
        for which, w in items:
            self.set_weight(which, w)

    def fuse(self) -> None:
        """Fold every LoRA into the base weights (faster forwards; the originals are kept for unfuse)."""
        if self.removed:
            raise LoRAError("this LoRA handle was removed")
        for p in self._patches.values():
            p.fuse()
        self.fused = True

    def unfuse(self) -> None:
        for p in reversed(list(self._patches.values())):
            p.unfuse()
        self.fused = False

    def remove(self) -> None:
        """Unfuse and unhook: the model is as it was before ``apply_loras``. Safe to call twice."""
        if self.removed:
            return
        for p in reversed(list(self._patches.values())):
            p.remove()
        self._patches.clear()
        self.fused = False
        self.removed = True

    def __enter__(self) -> LoRAHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self.removed else ("fused" if self.fused else "patched")
        return f"LoRAHandle({', '.join(f'{a.name}:{a.weight:g}' for a in self.loras)}; {state})"


def patch_layers(layers: Iterable[tuple[nn.Module, LoRALayer]], name: str = "lora") -> LoRAHandle:
    """Hook ready-made :class:`LoRALayer` objects (e.g. trainable ones) onto their base layers; the handle removes
    them. This is how training attaches its layers, so trained and loaded LoRAs run the very same code."""
    handle = LoRAHandle()
    applied: list[LoRALayer] = []
    for module, layer in layers:
        patch = handle._patches.get(id(module))
        if patch is None:
            patch = handle._patches[id(module)] = _Patch(module)
        patch.layers.append(layer)
        applied.append(layer)
    report = LoRAReport(name, None, "kohya", 1.0, [], [], ranks=sorted({la.rank for la in applied}))
    handle.loras.append(AppliedLoRA(name, 1.0, applied, report))
    return handle


def check_weight(weight: float, name: str = "LoRA") -> float:
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise LoRAError(f"{name}: weight {weight!r} is not a number") from None
    if not math.isfinite(w):
        raise LoRAError(f"{name}: weight {weight!r} is not finite")
    if abs(w) > WEIGHT_WARN_LIMIT:
        msg = f"{name}: weight {w:g} is outside [-{WEIGHT_WARN_LIMIT:g}, {WEIGHT_WARN_LIMIT:g}]; images may break down"
        log.warning(msg)
        warnings.warn(msg, LoRAWeightWarning, stacklevel=3)
    return w


# ------------------------------------------------------------------------------------ finding the files


def list_lora_dir(lora_dir: str | os.PathLike[str]) -> list[str]:
    """LoRA names in a folder (file stems, relative to it, any depth), as `<lora:NAME>` would use them."""
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*")
                  if p.is_file() and p.suffix.lower() in LORA_SUFFIXES)


def resolve_lora(name: str | os.PathLike[str], lora_dir: str | os.PathLike[str] | None = None) -> Path:
    """A path, or a `<lora:NAME>` name looked up in ``lora_dir`` (with or without suffix, at any depth)."""
    p = Path(name)
    if p.is_file():
        return p
    if lora_dir is not None:
        root = Path(lora_dir)
        if not root.is_dir():
            raise LoRAError(f"LoRA folder {root} does not exist")
        for cand in [root / p, *(root / f"{p}{s}" for s in LORA_SUFFIXES)]:
            if cand.is_file():
                return cand
        stem = p.name.lower()
        hits = sorted(q for q in root.rglob("*") if q.is_file() and q.suffix.lower() in LORA_SUFFIXES
                      and q.stem.lower() == stem)
        if hits:
            return hits[0]
        have = list_lora_dir(root)
        listing = (", ".join(have[:20]) + (f", ... ({len(have)} in all)" if len(have) > 20 else "")) or "nothing"
        raise LoRAError(f"LoRA {str(name)!r} not found in {root}; it holds: {listing}")
    raise LoRAError(f"LoRA file {str(name)!r} does not exist (and no LoRA folder was given to look it up in)")


_CACHE: OrderedDict[tuple[str, int, int], LoRAFile] = OrderedDict()
_CACHE_SIZE = 8


def load_lora(path: str | os.PathLike[str]) -> LoRAFile:
    """`LoRAFile.load` with a small cache keyed by (path, mtime, size): a LoRA used for every generation is parsed
    once (its tensors are memory-mapped, so the cache costs address space, not RAM)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_mtime_ns, st.st_size)
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    lf = LoRAFile.load(p)
    _CACHE[key] = lf
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return lf


LoRASpec = tuple["str | os.PathLike[str] | LoRAFile", float]


def apply_loras(
    unet: nn.Module | None,
    text_encoder: Any,
    loras: Sequence[LoRASpec] | Sequence[str | os.PathLike[str] | LoRAFile],
    lora_dir: str | os.PathLike[str] | None = None,
    *,
    fuse: bool = False,
) -> LoRAHandle:
    """Apply LoRAs to ``unet`` / ``text_encoder`` (either may be None) without touching their weights.

    A ``text_encoder`` that is not an ``nn.Module`` (MiniLM, held by the emoji pipeline) cannot be adapted: a LoRA
    with text-encoder layers is then a :class:`LoRAError` rather than half applied.

    ``loras``: ``(path_or_name_or_LoRAFile, weight)`` pairs (a bare path means weight 1); names are looked up in
    ``lora_dir``. Returns a :class:`LoRAHandle`: ``.reports`` says what matched, ``.set_weight(i, w)`` changes a
    weight for the next forward, ``.fuse()``/``.unfuse()``, and ``.remove()`` restores the model exactly. Every
    file is checked before any layer is patched, so an error leaves the model untouched.
    """
    index = ModelIndex(unet, text_encoder)
    prepared: list[tuple[LoRAFile, float, dict[str, tuple[Target, torch.Tensor, torch.Tensor]], list[str]]] = []
    for item in loras:
        src, weight = (item if isinstance(item, tuple) else (item, 1.0))
        if isinstance(src, LoRAFile):
            lf = src
        else:
            lf = load_lora(resolve_lora(src, lora_dir))
        w = check_weight(weight, lf.name)
        matched, unmatched = match_lora(lf, index)
        prepared.append((lf, w, matched, unmatched))

    handle = LoRAHandle()
    for lf, w, matched, unmatched in prepared:
        layers: list[LoRALayer] = []
        for key, (target, down, up) in matched.items():
            base = target.module.weight
            layer = LoRALayer(
                down.to(device=base.device, dtype=base.dtype),
                up.to(device=base.device, dtype=base.dtype),
                scale=lf.layers[key].scale,
                multiplier=w,
                conv=LoRALayer.geometry(target.module),
            )
            patch = handle._patches.get(id(target.module))
            if patch is None:
                patch = handle._patches[id(target.module)] = _Patch(target.module)
            patch.layers.append(layer)
            layers.append(layer)
        report = LoRAReport(
            name=lf.name,
            path=str(lf.path) if lf.path is not None else None,
            format=lf.format,
            weight=w,
            matched=sorted(f"{t.component}:{t.name}" for t, _, _ in matched.values()),
            unmatched=unmatched,
            unsupported=lf.unsupported,
            ranks=lf.ranks,
        )
        if report.complete:
            log.info(report.summary())
        else:
            log.warning(report.summary())
        handle.loras.append(AppliedLoRA(lf.name, w, layers, report))
    if fuse:
        handle.fuse()
    return handle


__all__ = [
    "AppliedLoRA",
    "LoRAError",
    "LoRAFile",
    "LoRAHandle",
    "LoRALayer",
    "LoRALayerWeights",
    "LoRAReport",
    "LoRAWeightWarning",
    "ModelIndex",
    "apply_loras",
    "check_weight",
    "kohya_name",
    "list_lora_dir",
    "load_lora",
    "lora_targets",
    "match_lora",
    "patch_layers",
    "resolve_lora",
]
