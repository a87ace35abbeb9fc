"""LoRA files: reading kohya/A1111 and diffusers/PEFT LoRA files, their alpha, and finding them by name.

A file stores, per adapted layer, a ``down`` matrix (r, in) or convolution (r, in, kh, kw), an ``up`` matrix
(out, r) or 1x1 convolution, and a scale s = alpha / r (kohya's ``.alpha`` tensor; PEFT's ``lora_alpha``, in the
``lora_adapter_metadata`` JSON that diffusers writes; alpha = r, so s = 1, when a file has none). Layer names are
kept as the file spells them: kohya ``lora_unet_`` / ``lora_te_`` (``lora_te1_`` in SDXL files) + the module name
with underscores; ComfyUI the dotted state-dict name (``diffusion_model.`` + the LDM U-Net name,
``text_encoders.clip_l.transformer.`` + the CLIP name) with kohya's part names; PEFT/diffusers the dotted
module name behind ``unet.`` / ``text_encoder.``, with ``lora_A`` / ``lora_B`` (older diffusers: ``lora.down`` /
``lora.up``, ``lora_linear_layer.*``, ``processor.to_q_lora.*``); XLabs' Flux files
``double_blocks.<i>.processor.qkv_lora1.down.weight`` (their names kept, routed by
:mod:`sdengine.weights.lora_dit_keys`).
Matching those names to a model's layers is :mod:`sdengine.weights.lora_keys`. LyCORIS layers (LoHa, LoKr,
(IA)^3, GLoRA, OFT/BOFT, LoCon with a Tucker core, full and norm-layer differences, ComfyUI's bias differences) and DoRA
magnitudes in the same files are taken out first by :mod:`sdengine.weights.lycoris_file` and kept in
:attr:`LoRAFile.lycoris`.

Names from outside the Python caller (``<lora:NAME:W>`` tags in a prompt, marked as
:class:`~sdengine.io.paths.ExternalName`) only ever select a file inside the LoRA folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..catalog import ambiguous_files, builtin_names, builtin_path
from ..io.paths import ExternalName, UnsafePathError, is_inside, resolve_inside
from ..names import did_you_mean
from ..nn.lora import LoRAError
from .io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsError, load_file
from .lycoris_file import LycorisLayerWeights, split_lycoris

log = logging.getLogger(__name__)

LoRAFormat = Literal["kohya", "peft"]
LORA_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES


class LoRAFileError(LoRAError, WeightsError):
    """A LoRA file that cannot be used with this model, or a LoRA name that finds no file; one line."""


class UnsafeLoRANameError(LoRAFileError, UnsafePathError):
    """A LoRA name that would select a file outside the LoRA folder."""


# -------------------------------------------------------------------------------------------- file names


# kohya/A1111: `<layer>.lora_down.weight`, `<layer>.lora_up.weight`, `<layer>.alpha`; layer names have no dots
# (OneTrainer's diffusion-transformer files: `lora_transformer_<diffusers module name with underscores>`; SimpleTuner's
# LyCORIS-library files, which ComfyUI reads for Qwen-Image: `lycoris_<the same>`; Z-Image's final layer and patch
# embedder keep the `-` of their `2-1`: `lora_unet_all_final_layer_2-1_linear`).
_KOHYA_RE = re.compile(
    r"^(?P<layer>(?:lora_(?:unet|te\d?|transformer)|lycoris)_[A-Za-z0-9_-]+)"
    r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# ComfyUI's own layout (what its LoraSave node writes, and what its loader reads for any model): the model's state
# dict name of the layer, `diffusion_model.<LDM U-Net name>` / `text_encoders.clip_l.transformer.<CLIP name>`, with
# kohya's part names.
_COMFY_RE = re.compile(
    r"^(?P<layer>(?:diffusion_model|text_encoders)\.[^:]+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$"
)
# PEFT / diffusers: `<module path>.lora_A[.<adapter>].weight`, older `lora.down.weight`, `lora_linear_layer.down...`
_PEFT_RE = re.compile(
    r"^(?P<layer>.+?)\.(?:(?P<ab>lora_A|lora_B)(?:\.(?!weight$)[^.]+)?\.weight"
    r"|(?:lora|lora_linear_layer)\.(?P<du>down|up)\.weight|(?P<alpha>alpha))$"
)
# diffusers' attention-processor files: `...attn1.processor.to_q_lora.down.weight`
_ATTN_PROC_RE = re.compile(r"^(?P<layer>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<du>down|up)\.weight$")
# XLabs' Flux LoRAs: `double_blocks.<i>.processor.qkv_lora1.down.weight` (the image stream's qkv; lora2: the text's;
# proj_lora1/2: the attention outputs), `single_blocks.<i>.processor.qkv_lora.down.weight`; no alpha (scale 1).
# The layer keeps that name; sdengine.weights.lora_dit_keys knows where it goes.
_XLABS_RE = re.compile(
    r"^(?P<layer>(?:diffusion_model\.)?(?:double|single)_blocks\.\d+\.processor\.(?:qkv|proj)_lora[12]?)"
    r"\.(?P<du>down|up)\.weight$"
)
# Adapters sdengine does not implement: named in the error instead of silently skipped. (LoHa, LoKr, (IA)^3,
# GLoRA, OFT/BOFT's oft_blocks, LoCon's Tucker core and DoRA are read by sdengine.weights.lycoris_file.)
_UNSUPPORTED = [
    # early LyCORIS dev versions stored the rotation itself, or its difference from I, or Q, under this one name
    # (A1111 reads it as the rotation, ComfyUI not at all): which one a file holds cannot be told
    (re.compile(r"\.oft_diag$"), "OFT of an early LyCORIS version (oft_diag)"),
    (re.compile(r"\.oft_[Rrs]\.|\.oft_[Rrs]$|\.boft_"), "PEFT OFT/BOFT (orthogonal finetuning)"),
]
# Names that give away another architecture.

# Trained LoRA values are of order 1 (alpha up to the rank, a few hundred at most). A file with |values| above this
# is broken or hostile: at weight 1 it would turn every image non-finite (black) without any warning.
MAGNITUDE_LIMIT = 1e4


@dataclass
class LoRALayerWeights:
    """One adapted layer as stored in a file (tensors as read: no copy)."""

    key: str  # the file's name for the layer (kohya layer name, or PEFT module path with its prefix)
    down: torch.Tensor  # (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # (out, r) or (out, r, 1, 1) (a DyLoRA file's (out, r) of a convolution is read as that)
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
    # LyCORIS layers (LoHa, LoKr, (IA)^3, LoCon-Tucker) and LoRA layers with a DoRA magnitude, by the file's names
    lycoris: dict[str, LycorisLayerWeights] = field(default_factory=dict)

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
            raise LoRAFileError(f"{where}: holds no tensors, not a LoRA")
        parts: dict[str, dict[str, torch.Tensor]] = {}
        unknown: list[str] = []
        unsupported: dict[str, list[str]] = {}
        kohya = peft = 0
        lyco = split_lycoris(sd, MAGNITUDE_LIMIT)
        if lyco.problems:
            raise LoRAFileError(f"{where}: {lyco.problems[0]}")
        unknown += lyco.incomplete
        kohya += len(lyco.layers)
        for key, t in sd.items():
            if key in lyco.consumed:
                continue
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
            m = _COMFY_RE.match(key)
            if m:
                kohya += 1
                part = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}[m["part"]]
                parts.setdefault(m["layer"], {})[part] = t
                continue
            m = _XLABS_RE.match(key)
            if m:
                peft += 1
                parts.setdefault(m["layer"], {})[m["du"]] = t
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
            if down.ndim == 4 and up.ndim == 2:
                # LyCORIS' DyLoRA writes a convolution's up as (out, r) (its rank blocks joined), the down as
                # (r, in, kh, kw): the up is a 1x1, as A1111 and ComfyUI read it
                up = up.reshape(*up.shape, 1, 1)
            for part_name, tensor in (("down", down), ("up", up)):
                if not tensor.is_floating_point():
                    raise LoRAFileError(f"{where}: {layer} {part_name} has dtype {tensor.dtype}, not floating point")
            bad = [
                n
                for n, tensor in (("down", down), ("up", up), ("alpha", p.get("alpha")))
                if tensor is not None and not bool(torch.isfinite(tensor.float()).all())
            ]
            if bad:
                raise LoRAFileError(f"{where}: refused: NaN or inf values in {layer} ({', '.join(bad)})")
            if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0]:
                raise LoRAFileError(
                    f"{where}: {layer}: down {tuple(down.shape)} and up {tuple(up.shape)} are not a LoRA pair"
                )
            if down.shape[0] == 0:  # the scale alpha / rank would divide by zero
                raise LoRAFileError(f"{where}: {layer} has rank 0 (down {tuple(down.shape)}), not a LoRA layer")
            if "alpha" in p and p["alpha"].numel() != 1:
                raise LoRAFileError(f"{where}: {layer} alpha has {p['alpha'].numel()} values, not one")
            for part_name, values in (("down", down), ("up", up), ("alpha", p.get("alpha"))):
                if values is not None and values.numel():
                    big = float(values.detach().float().abs().max())
                    if big > MAGNITUDE_LIMIT:
                        raise LoRAFileError(
                            f"{where}: {layer} {part_name} has |values| up to {big:.3g}, over {MAGNITUDE_LIMIT:.0e}; "
                            "refused (a broken or hostile file)"
                        )
            alpha = float(p["alpha"].float().item()) if "alpha" in p else None
            rslora = False
            if alpha is None and peft_cfg:
                alpha, rslora = _peft_alpha(peft_cfg, layer, where)
            layers[layer] = LoRALayerWeights(layer, down, up, alpha, rslora)
        lycoris = dict(lyco.layers)
        for layer, (magnitude, peft_magnitude) in lyco.magnitudes.items():  # DoRA on a plain LoRA layer
            lw = layers.pop(layer, None)
            if lw is None:
                unknown.append(f"{layer} (has a DoRA magnitude but no LoRA layer)")
                continue
            factors = {"lora_down": lw.down, "lora_up": lw.up}
            bias = lycoris.get(layer)
            if bias is not None and bias.algo == "bias":  # ComfyUI's diff_b next to the pair: one layer holds both
                factors["diff_b"] = bias.parts["diff_b"]
            lycoris[layer] = LycorisLayerWeights(
                layer, "lora", factors, lw.alpha, magnitude, peft_magnitude, scale_override=lw.scale
            )
        if not layers and not unsupported and not lycoris:
            shown = ", ".join(unknown[:3])
            raise LoRAFileError(
                f"{where}: no LoRA layers found (keys like {shown}); not a kohya, LyCORIS or diffusers/PEFT LoRA"
            )
        return cls(name, fmt, layers, unknown, unsupported, metadata, path, lycoris)

    @property
    def ranks(self) -> list[int]:
        ranks = {w.rank for w in self.layers.values()}
        ranks |= {r for w in self.lycoris.values() if (r := w.rank) is not None}
        return sorted(ranks)

    @property
    def algorithms(self) -> list[str]:
        """The kinds of layer in the file: "LoRA", "LoHa", "LoKr", "DoRA", "LoKr+DoRA", "(IA)^3", ..."""
        kinds = {"LoRA"} if self.layers else set()
        return sorted(kinds | {w.label for w in self.lycoris.values()})


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
    if not isinstance(flat, dict):  # JSON of another shape (found by the fuzz test: a list crashed here)
        log.warning("ignoring lora_adapter_metadata that is not a JSON object")
        return {}
    out: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        comp, _, fld = key.partition(".")
        out.setdefault(comp, {})[fld] = value
    return out


def _peft_alpha(cfg: Mapping[str, Mapping[str, Any]], layer: str, where: str) -> tuple[float | None, bool]:
    comp, _, module = layer.partition(".")
    c = cfg.get(comp) or (next(iter(cfg.values())) if len(cfg) == 1 else None)
    if c is None:
        return None, False
    alpha = c.get("lora_alpha")
    # PEFT matches pattern keys against the end of the module name (alpha_pattern overrides lora_alpha).
    patterns = c.get("alpha_pattern") or {}
    if not isinstance(patterns, dict):
        raise LoRAFileError(f"{where}: alpha_pattern in lora_adapter_metadata is not a JSON object")
    for pattern, value in patterns.items():
        # PEFT's patterns are module paths; anything else could be a regex that backtracks for minutes
        if not re.fullmatch(r"[\w.]+", pattern):
            raise LoRAFileError(f"{where}: alpha_pattern key {pattern[:40]!r} is not a module path")
        if re.fullmatch(rf"(.*\.)?{pattern}", module):
            alpha = value
            break
    if alpha is None:
        return None, bool(c.get("use_rslora", False))
    # JSON gives any type here (a string, true, 1e400 read as inf): only a finite, sane number is a PEFT alpha.
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not math.isfinite(alpha)
        or abs(alpha) > MAGNITUDE_LIMIT
    ):
        raise LoRAFileError(
            f"{where}: {layer}: lora_alpha {alpha!r} in lora_adapter_metadata is not a finite number "
            f"within [-{MAGNITUDE_LIMIT:.0e}, {MAGNITUDE_LIMIT:.0e}]"
        )
    return float(alpha), bool(c.get("use_rslora", False))


# ------------------------------------------------------------------------------------ finding the files


def list_lora_dir(lora_dir: str | os.PathLike[str]) -> list[str]:
    """LoRA names in a folder (file stems, relative to it, any depth), as `<lora:NAME>` would use them.

    Files that are symlinks to somewhere outside the folder are left out: a name could not select them."""
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    return sorted(p.relative_to(root).with_suffix("").as_posix() for p in _lora_files(root))


def _lora_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.suffix.lower() in LORA_SUFFIXES and p.is_file() and is_inside(root, p)]


def resolve_lora(name: str | os.PathLike[str], lora_dir: str | os.PathLike[str] | None = None) -> Path:
    """The file for a LoRA given by path or by name (looked up in ``lora_dir``, with or without suffix, at any
    depth, case-insensitively by stem).

    A name from outside the Python caller (an :class:`~sdengine.io.paths.ExternalName`, which is what
    ``<lora:NAME>`` tags give) is only ever looked up inside ``lora_dir``: ``..``, absolute names, percent-encoded
    escapes and symlinks that lead out of the folder are an :class:`UnsafeLoRANameError`. A plain ``str`` or
    ``Path`` given by the caller that names an existing file is used as it is.
    """
    external = isinstance(name, ExternalName)
    if not external and Path(name).is_file():
        return Path(name)
    # a LoRA shipped with sdengine, by its exact catalog name (plain names only: nothing outside the assets)
    shipped = builtin_path("loras", os.fspath(name))
    if lora_dir is None:
        if shipped is not None:
            return shipped
        guess = did_you_mean(Path(name).name, builtin_names("loras")) if len(Path(name).parts) == 1 else ""
        if external:
            raise LoRAFileError(f"LoRA {str(name)!r}: no LoRA folder was given to look the name up in{guess}")
        raise LoRAFileError(
            f"LoRA file {str(name)!r} does not exist (and no LoRA folder was given to look it up in){guess}"
        )
    root = Path(lora_dir)
    if not root.is_dir():
        raise LoRAFileError(f"LoRA folder {root} does not exist")
    text = os.fspath(name)
    real_root = Path(os.path.realpath(root))
    for suffix in ("", *LORA_SUFFIXES):
        try:
            target = resolve_inside(root, text, "LoRA", (suffix,))
        except UnsafePathError as e:
            raise UnsafeLoRANameError(str(e)) from None
        except FileNotFoundError:
            continue
        if target.is_file():
            if suffix and (same := ambiguous_files(root, text, LORA_SUFFIXES)):
                names = ", ".join(p.relative_to(root).as_posix() for p in same)
                raise LoRAFileError(f"LoRA {text!r} is ambiguous: {root} holds {names}; name the file")
            return root / target.relative_to(real_root)
    stem = Path(text).name.lower()
    hits = sorted(q for q in _lora_files(root) if stem in (q.stem.lower(), q.name.lower()))  # with its suffix too
    if len(hits) > 1:  # the same name at several depths: choosing one would be silent (as for shared names above)
        names = ", ".join(q.relative_to(root).as_posix() for q in hits)
        raise LoRAFileError(
            f"LoRA {text!r} is ambiguous: {root} holds {names}; name the file by its path in the folder "
            f"(e.g. {hits[0].relative_to(root).with_suffix('').as_posix()!r})"
        )
    if hits:
        return hits[0]
    if shipped is not None:  # the user's folder first, then the shipped ones
        return shipped
    have = list_lora_dir(root)
    # a name is matched by its path in the folder or its stem alone (as the look-up above): both are suggested
    spellings = {n: n for n in have}
    for n in (*[Path(n).name for n in have], *builtin_names("loras")):
        spellings.setdefault(n, next((h for h in have if Path(h).name == n), n))
    guess = did_you_mean(text, spellings)
    if guess:  # the closest names, not the whole folder (which may hold hundreds)
        raise LoRAFileError(f"LoRA {text!r} not found in {root}{guess} (it holds {len(have)})")
    listing = (", ".join(have[:20]) + (f", ... ({len(have)} in all)" if len(have) > 20 else "")) or "nothing"
    raise LoRAFileError(f"LoRA {text!r} not found in {root}; it holds: {listing}")


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


__all__ = [
    "LORA_SUFFIXES",
    "MAGNITUDE_LIMIT",
    "LoRAFile",
    "LoRAFileError",
    "LoRAFormat",
    "LoRALayerWeights",
    "UnsafeLoRANameError",
    "list_lora_dir",
    "load_lora",
    "resolve_lora",
]
