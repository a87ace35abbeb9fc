"""Checkpoint merging: AUTOMATIC1111's Checkpoint Merger on single files, key by key, streaming.

Methods (A1111's names in brackets; ``M`` the multiplier):

- ``weighted_sum`` ("Weighted sum"): ``A * (1 - M) + B * M``; M = 0 gives A, M = 1 gives B;
- ``add_difference`` ("Add difference"): ``A + (B - C) * M``;
- ``no_interpolation`` ("No interpolation"): A alone, for the other options (fp16, a baked-in VAE, discarded
  weights, a pickle checkpoint rewritten as .safetensors).

A1111's rules (``modules/extras.py``, ``run_modelmerger``), as sdengine keeps them (docs/CONTRACTS.md):

- only keys whose name holds ``model`` are merged (every network weight of an SD file: ``model.diffusion_model.``,
  ``first_stage_model.``, ``cond_stage_model.``, ``conditioner.embedders.N.transformer.text_model.``...); the
  others (the DDPM schedule buffers, the ``v_pred`` marker) are A's; ``*.position_ids`` are never merged (A's);
- a key of A that B lacks keeps A's tensor; a key of B that A lacks is not written (the result is A's network);
  under ``add_difference`` a key of B that C lacks counts as no difference (A's tensor);
- shapes: A with 9 (inpainting) or 8 (instruct-pix2pix) input channels and B with 4, all else equal, is merged on
  its first 4 input channels, the others stay A's, and the result is an inpainting (instruct-pix2pix) model; the
  other way round is refused ("A must be the inpainting model"); any other mismatch is refused with the key named
  (A1111 stops with a tensor error there);
- ``bake_vae``: the VAE file's weights replace A's ``first_stage_model.*`` after merging;
- ``discard``: a regular expression; matching keys are left out of the result (``re.search``, as A1111);
  ``--discard-ema`` is ``^model_ema\\.``;
- ``fp16``: float32 tensors are written as float16 (A1111's ``to_half``; other dtypes keep theirs);
- metadata ``sd_merge_recipe`` / ``sd_merge_models`` as A1111 writes them (its ``"type"`` is ``"sdengine"``).

sdengine's own rules on top: integer and bool tensors are never merged (A's); the result is computed in float32
(float64 when an input is) and rounded once to its dtype, the promotion of the inputs' dtypes (A1111's
arithmetic); the two (three) files must be the same architecture (SD 1.x / SD 2.x / SDXL / refiner, read from the
text encoder and the cross-attention width), and each must be a model (not a LoRA, a VAE, a ControlNet); the
output is a .safetensors file, never a pickle.

Memory: safetensors inputs are read one tensor at a time (:class:`SafetensorsReader`) and the output is written one
tensor at a time (:func:`write_safetensors_streaming`), so a merge holds a few tensors, not the models; a pickle
input is memory-mapped where its format allows (the zip format), which the loader cannot avoid.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdengine.metadata import legacy_hash

from . import keymaps as km
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    SafetensorsReader,
    WeightsError,
    load_pickle_checkpoint,
    unwrap_state_dict,
    write_safetensors_streaming,
)

log = logging.getLogger(__name__)

MergeMethod = Literal["weighted_sum", "add_difference", "no_interpolation"]
# sdengine's method names -> A1111's ("interp_method" of its recipe)
METHODS: dict[str, str] = {
    "weighted_sum": "Weighted sum",
    "add_difference": "Add difference",
    "no_interpolation": "No interpolation",
}
EMA_PATTERN = r"^model_ema\."  # what --discard-ema drops: the EMA copy of a training checkpoint
# A1111's checkpoint_dict_skip_on_merge (the CLIP position ids), for any text encoder
SKIP_SUFFIXES = (".position_ids",)
# input channels of conv_in that A1111 merges on their first 4: inpainting (9) and instruct-pix2pix (8)
WIDER_INPUTS = {9: "inpainting", 8: "instruct-pix2pix"}
RECIPE_KEY, MODELS_KEY = "sd_merge_recipe", "sd_merge_models"
# sdengine's own metadata describing the network (written by convert): the result is A's network, so A's is kept
OWN_METADATA = ("sdengine.configs", "sdengine.prediction_type")


class MergeError(WeightsError):
    """Checkpoints that cannot be merged as asked (one line, naming the file or the key)."""


# ------------------------------------------------------------------------------------------------ sources


class _Source:
    """A model file's tensors by name: dtype and shape without reading data, ``read`` one at a time."""

    def __init__(self, path: Path, role: str) -> None:
        self.path = path
        self.role = role
        self._reader: SafetensorsReader | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.metadata: dict[str, str] = {}
        if path.is_dir():
            raise MergeError(
                f"{role} {path}: a folder; merging reads single files (.safetensors, .ckpt): write it as one with "
                f"`sdengine convert {path} {path.name}.safetensors` first"
            )
        if not path.is_file():
            raise MergeError(f"{role} {path}: no such file")
        suffix = path.suffix.lower()
        if suffix in SAFETENSORS_SUFFIXES:
            self._reader = SafetensorsReader(path)
            self.metadata = dict(self._reader.metadata)
        elif suffix in PICKLE_SUFFIXES:
            self._tensors = unwrap_state_dict(load_pickle_checkpoint(path), path)
        else:
            raise MergeError(f"{role} {path}: unsupported file type {suffix!r} (use .safetensors or .ckpt)")

    @property
    def names(self) -> list[str]:
        return self._reader.names if self._reader is not None else list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._reader if self._reader is not None else name in self._tensors

    def dtype(self, name: str) -> torch.dtype:
        return self._reader.dtype(name) if self._reader is not None else self._tensors[name].dtype

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader.shape(name) if self._reader is not None else tuple(self._tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self._reader.read(name) if self._reader is not None else self._tensors[name]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._tensors = {}


_TO_K = re.compile(r"^model\.diffusion_model\..*\.attn2\.to_k\.weight$")


def architecture(src: _Source) -> str:
    """What network a file holds, as a label two files must share to be merged ("SD 1.x", "SDXL", ...); a
    MergeError naming what the file is when it is no Stable Diffusion checkpoint."""
    names = src.names
    where = f"{src.role} {src.path}"
    if not any(n.startswith(km.UNET_PREFIX) for n in names):
        if any(n.startswith(("lora_unet_", "lora_te")) or ".lora_down." in n or ".lora_A." in n for n in names):
            what = "a LoRA (lora_* keys)"
        elif any(n.startswith("control_model.") for n in names):
            what = "a ControlNet (control_model.* keys)"
        elif any(n.startswith(("encoder.down.", "first_stage_model.encoder.", "encoder.down_blocks.")) for n in names):
            what = "a VAE (encoder/decoder keys only)"
        elif any(n.startswith(("down_blocks.", "conv_in.")) for n in names):
            what = "a diffusers U-Net file (down_blocks.*), not a whole checkpoint"
        else:
            tops = sorted({n.split(".")[0] for n in names})[:6]
            what = f"no model.diffusion_model.* weights (top-level names: {tops})"
        raise MergeError(f"{where}: not a Stable Diffusion checkpoint: {what}")
    if any(n.startswith("conditioner.embedders.1.model.") for n in names):
        return "SDXL"
    if any(n.startswith("conditioner.embedders.0.model.") for n in names):
        return "SDXL refiner"
    label = "model.diffusion_model.label_emb.0.0.weight"
    if label in src and len(src.shape(label)) == 2 and src.shape(label)[1] == 2816:
        return "SDXL"
    to_k = next((n for n in names if _TO_K.match(n)), None)
    width = src.shape(to_k)[1] if to_k is not None and len(src.shape(to_k)) == 2 else 0
    if any(n.startswith(km.CLIP_PREFIX) for n in names):
        family = "SD 1.x"  # OpenAI CLIP in transformers' names
    elif any(n.startswith(km.OPENCLIP_PREFIX) for n in names):
        family = "SD 2.x"  # OpenCLIP ViT-H in OpenCLIP's names
    else:
        family = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "SDXL refiner"}.get(width, "SD-like")
    standard = {"SD 1.x": 768, "SD 2.x": 1024, "SDXL": 2048, "SDXL refiner": 1280}.get(family)
    return family if width == standard else f"{family} layout (text width {width})"


# ------------------------------------------------------------------------------------------------ helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_value(text: str | None) -> Any:
    """A metadata value as A1111 reads it: JSON when it parses as an object, else the string."""
    if text is None:
        return None
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text
    return text


def _mergeable(name: str) -> bool:
    return "model" in name and not name.endswith(SKIP_SUFFIXES)


def _half(dtype: torch.dtype, fp16: bool) -> torch.dtype:
    return torch.float16 if fp16 and dtype == torch.float32 else dtype


def _name_some(keys: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


# --------------------------------------------------------------------------------------------------- plan


@dataclass
class MergeReport:
    """What a merge wrote: counts per rule, the architecture and the recipe (see :func:`merge_checkpoints`)."""

    path: Path
    method: str
    multiplier: float
    architecture: str
    tensors: int = 0  # written
    merged: int = 0  # computed from A and B (and C)
    kept_from_a: list[str] = field(default_factory=list)  # mergeable keys of A that B lacks
    not_in_a: list[str] = field(default_factory=list)  # keys of B that A lacks (not written)
    no_difference: list[str] = field(default_factory=list)  # add_difference: keys of B that C lacks
    baked_vae: int = 0
    discarded: int = 0
    inpainting: bool = False
    instruct_pix2pix: bool = False
    config: Path | None = None  # the .yaml copied beside the result
    metadata: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        parts = [f"{self.tensors} tensors ({self.merged} merged"]
        if self.kept_from_a:
            parts.append(f"{len(self.kept_from_a)} of A's kept: not in B")
        if self.no_difference:
            parts.append(f"{len(self.no_difference)} of A's kept: not in C")
        if self.not_in_a:
            parts.append(f"{len(self.not_in_a)} of B's left out: not in A")
        if self.baked_vae:
            parts.append(f"{self.baked_vae} from the baked-in VAE")
        if self.discarded:
            parts.append(f"{self.discarded} discarded")
        kind = " inpainting" if self.inpainting else " instruct-pix2pix" if self.instruct_pix2pix else ""
        return f"{self.architecture}{kind}, " + ", ".join(parts) + ")"


@dataclass
class _Entry:
    action: Literal["copy", "merge", "channels", "vae"]
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_bake_vae(path: Path) -> dict[str, torch.Tensor]:
    """A VAE file's weights in the LDM layout, ``first_stage_model.``-prefixed (any layout load_vae reads)."""
    from .detect import vae_layout_from_diffusers
    from .loading import load_vae

    if not path.exists():
        raise MergeError(f"bake-in VAE {path}: no such file")
    try:
        sd, _ = load_vae(path)
    except WeightsError as e:
        raise MergeError(f"bake-in VAE: {e}") from None
    ldm, bad = km.vae_diffusers_to_ldm(sd, vae_layout_from_diffusers(sd))
    if bad:
        raise MergeError(f"bake-in VAE {path}: keys with no LDM name: {_name_some(bad)}")
    return {km.VAE_PREFIX + k: v for k, v in ldm.items()}


def merge_checkpoints(
    a: str | Path,
    b: str | Path | None = None,
    c: str | Path | None = None,
    *,
    out: str | Path,
    method: str = "weighted_sum",
    multiplier: float = 0.3,
    fp16: bool = False,
    bake_vae: str | Path | None = None,
    discard: str | None = None,
    discard_ema: bool = False,
    overwrite: bool = False,
) -> MergeReport:
    """Merge checkpoint files A, B (and C) into ``out`` (.safetensors) under A1111's rules (see the module).

    ``method``: weighted_sum (A*(1-M) + B*M), add_difference (A + (B-C)*M) or no_interpolation (A alone);
    ``multiplier``: M (any finite number; A1111's slider is 0..1, its default 0.3); ``fp16``: float32 tensors
    written as float16; ``bake_vae``: a VAE file whose weights replace A's VAE; ``discard``: a regular expression
    of keys to leave out; ``discard_ema``: leave out ``model_ema.*``. Every check (files, architectures, shapes,
    the VAE) runs before anything is written; the file appears whole or not at all."""
    if method not in METHODS:
        from sdengine.names import did_you_mean

        guess = did_you_mean(method, list(METHODS))
        raise MergeError(f"unknown merge method {method!r}{guess or '; use one of ' + ', '.join(METHODS)}")
    if isinstance(multiplier, bool) or not isinstance(multiplier, int | float) or not math.isfinite(multiplier):
        raise MergeError(f"the multiplier must be a finite number, got {multiplier!r}")
    m = float(multiplier)
    needs_b, needs_c = method != "no_interpolation", method == "add_difference"
    if needs_b and b is None:
        raise MergeError(f"{method} needs a second model B")
    if needs_c and c is None:
        raise MergeError("add_difference needs a third model C: the result is A + (B - C) * M")
    if not needs_b and b is not None:
        raise MergeError("no_interpolation uses model A only: drop B (and C)")
    if not needs_c and c is not None:
        raise MergeError(f"{method} uses models A and B only: C is for add_difference")
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise MergeError(f"{out}: the merged model is written as .safetensors only (never a pickle)")
    inputs = [Path(p) for p in (a, b, c, bake_vae) if p is not None]
    if out.exists() and any(p.exists() and p.resolve() == out.resolve() for p in inputs):
        raise MergeError(f"{out}: the output would replace one of the inputs; give another file name")
    if out.is_dir():
        raise MergeError(f"{out}: is a folder; give a .safetensors file name")
    if out.exists() and not overwrite:
        raise MergeError(f"{out}: exists; give another name or overwrite=True (--overwrite)")
    patterns = [p for p in (discard, EMA_PATTERN if discard_ema else None) if p]
    try:
        discard_rx = re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    except re.error as e:
        raise MergeError(f"discard pattern {discard!r} is not a regular expression: {e}") from None

    sources: list[_Source] = []
    try:
        src_a = _Source(Path(a), "A")
        sources.append(src_a)
        src_b = _Source(Path(b), "B") if needs_b and b is not None else None
        if src_b is not None:
            sources.append(src_b)
        src_c = _Source(Path(c), "C") if needs_c and c is not None else None
        if src_c is not None:
            sources.append(src_c)
        arch = architecture(src_a)
        for other in sources[1:]:
            arch_o = architecture(other)
            if arch_o != arch:
                raise MergeError(
                    f"A ({src_a.path.name}) is {arch} and {other.role} ({other.path.name}) is {arch_o}: "
                    "different architectures cannot be merged"
                )
        vae = _read_bake_vae(Path(bake_vae)) if bake_vae is not None else {}
        report = MergeReport(out, method, m, arch)
        plan = _plan(src_a, src_b, src_c, vae, fp16, report)
        if discard_rx is not None:
            dropped = [k for k in plan if discard_rx.search(k)]
            for k in dropped:
                del plan[k]
            report.discarded = len(dropped)
        if not plan:
            raise MergeError("every key was discarded: nothing to write")
        report.metadata = _metadata(
            src_a, src_b, src_c, report, fp16=fp16, bake_vae=bake_vae, discard="|".join(patterns)
        )
        config = _config_source(src_a, src_b, src_c, out)

        def produce(name: str) -> torch.Tensor:
            return _compute(name, plan[name], src_a, src_b, src_c, vae, m, method)

        layout = {k: (e.dtype, e.shape) for k, e in plan.items()}
        out.parent.mkdir(parents=True, exist_ok=True)
        write_safetensors_streaming(layout, produce, out, metadata=report.metadata)
        report.tensors = len(plan)
        if config is not None:
            report.config = out.with_suffix(config.suffix)
            shutil.copyfile(config, report.config)
        return report
    finally:
        for s in sources:
            s.close()


def _plan(
    a: _Source,
    b: _Source | None,
    c: _Source | None,
    vae: Mapping[str, torch.Tensor],
    fp16: bool,
    report: MergeReport,
) -> dict[str, _Entry]:
    """Each output key's rule, dtype and shape, from the headers alone; MergeError on what cannot merge."""
    plan: dict[str, _Entry] = {}
    a_vae = [k for k in a.names if k.startswith(km.VAE_PREFIX)]
    if vae:
        if a_vae:
            missing = sorted(set(a_vae) - set(vae))
            extra = sorted(set(vae) - set(a_vae))
            if missing or extra:
                what = f"lacks {_name_some(missing)}" if missing else f"has keys A's VAE lacks: {_name_some(extra)}"
                raise MergeError(f"bake-in VAE does not fit A's VAE: it {what}")
        for k, t in vae.items():
            if k in a and a.shape(k) != tuple(t.shape):
                raise MergeError(
                    f"bake-in VAE does not fit A's VAE: {k} is {tuple(t.shape)} in the VAE, {a.shape(k)} in A"
                )
    for k in a.names:
        dt, shape = a.dtype(k), a.shape(k)
        if k in vae:
            plan[k] = _Entry("vae", _half(vae[k].dtype, fp16), tuple(vae[k].shape))
            report.baked_vae += 1
            continue
        plan[k] = _Entry("copy", _half(dt, fp16), shape)
        if b is None or not _mergeable(k) or not dt.is_floating_point:
            continue
        if k not in b:
            report.kept_from_a.append(k)
            continue
        if not b.dtype(k).is_floating_point:
            continue
        dtypes = [dt, b.dtype(k)]
        other = b.shape(k)
        if c is not None:
            if k not in c or not c.dtype(k).is_floating_point:
                report.no_difference.append(k)
                continue
            if c.shape(k) != other:
                raise MergeError(
                    f"B and C differ at {k}: {other} in B, {c.shape(k)} in C (add_difference subtracts C from B "
                    "key by key; give a C of B's network)"
                )
            dtypes.append(c.dtype(k))
        out_dt = dtypes[0]
        for d in dtypes[1:]:
            out_dt = torch.promote_types(out_dt, d)
        if shape == other:
            plan[k] = _Entry("merge", _half(out_dt, fp16), shape)
        elif len(shape) == len(other) == 4 and shape[:1] + shape[2:] == other[:1] + other[2:]:
            if shape[1] == 4 and other[1] in WIDER_INPUTS:
                kind = WIDER_INPUTS[other[1]]
                raise MergeError(
                    f"when merging an {kind} model with a normal one, A must be the {kind} model ({k}: "
                    f"{other[1]} input channels in B, 4 in A)"
                )
            if shape[1] not in WIDER_INPUTS or other[1] != 4:
                raise MergeError(f"cannot merge {k}: {shape} in A, {other} in B")
            plan[k] = _Entry("channels", _half(out_dt, fp16), shape)
            setattr(report, "inpainting" if shape[1] == 9 else "instruct_pix2pix", True)
        else:
            raise MergeError(f"cannot merge {k}: {shape} in A, {other} in B (not the same network)")
        report.merged += 1
    for k, t in vae.items():  # A without a VAE of its own gets the baked one whole
        if k not in plan:
            plan[k] = _Entry("vae", _half(t.dtype, fp16), tuple(t.shape))
            report.baked_vae += 1
    if b is not None:
        report.not_in_a = [k for k in b.names if k not in a]
    return plan


def _compute(
    name: str,
    entry: _Entry,
    a: _Source,
    b: _Source | None,
    c: _Source | None,
    vae: Mapping[str, torch.Tensor],
    m: float,
    method: str,
) -> torch.Tensor:
    if entry.action == "vae":
        return vae[name]
    ta = a.read(name)
    if entry.action == "copy":
        return ta
    assert b is not None
    tb = b.read(name)
    tc = c.read(name) if c is not None else None
    wide = any(t.dtype == torch.float64 for t in (ta, tb, tc) if t is not None)
    work = torch.float64 if wide else torch.float32

    def combine(x: torch.Tensor) -> torch.Tensor:
        y = tb.to(work)
        if method == "add_difference":
            assert tc is not None
            return x + m * (y - tc.to(work))  # A1111: theta0 + alpha * (theta1 - theta2)
        return (1 - m) * x + m * y  # A1111: (1 - alpha) * theta0 + alpha * theta1

    if entry.action == "channels":  # A's first 4 input channels merged, the mask/image ones kept
        result = ta.to(work).clone()
        result[:, :4] = combine(result[:, :4])
        return result
    return combine(ta.to(work))


def _metadata(
    a: _Source,
    b: _Source | None,
    c: _Source | None,
    report: MergeReport,
    *,
    fp16: bool,
    bake_vae: str | Path | None,
    discard: str,
) -> dict[str, str]:
    """A1111's merge metadata (``sd_merge_recipe``, ``sd_merge_models``) and A's sdengine network configs."""
    meta = {"format": "pt"}
    for key in OWN_METADATA:
        if key in a.metadata:
            meta[key] = a.metadata[key]
    hashes = {s.role: _sha256(s.path) for s in (a, b, c) if s is not None}
    recipe = {
        "type": "sdengine",
        "primary_model_hash": hashes["A"],
        "secondary_model_hash": hashes.get("B"),
        "tertiary_model_hash": hashes.get("C"),
        "interp_method": METHODS[report.method],
        "multiplier": report.multiplier,
        "save_as_half": fp16,
        "custom_name": report.path.stem,
        "config_source": 0,  # A1111's "A, B or C": the .yaml beside the first input that has one
        "bake_in_vae": Path(bake_vae).name if bake_vae is not None else "None",
        "discard_weights": discard,
        "is_inpainting": report.inpainting,
        "is_instruct_pix2pix": report.instruct_pix2pix,
    }
    models: dict[str, Any] = {}
    for s in (a, b, c):
        if s is None:
            continue
        models[hashes[s.role]] = {
            "name": s.path.name,
            "legacy_hash": legacy_hash(s.path),
            "sd_merge_recipe": _json_value(s.metadata.get(RECIPE_KEY)),
        }
        earlier = _json_value(s.metadata.get(MODELS_KEY))
        if isinstance(earlier, dict):
            models.update(earlier)
    meta[RECIPE_KEY] = json.dumps(recipe)
    meta[MODELS_KEY] = json.dumps(models)
    return meta


def _config_source(a: _Source, b: _Source | None, c: _Source | None, out: Path) -> Path | None:
    """A1111's config_source "A, B or C": the LDM .yaml beside the first input that has one, to be copied beside
    the result (which the loader then reads, as A1111 does). Without one, a .yaml already beside ``out`` would be
    read as the merged model's config: refused."""
    from .ldm_config import YAML_SUFFIXES, config_beside

    for s in (a, b, c):
        if s is not None and (cfg := config_beside(s.path)) is not None:
            return cfg
    stale = [out.with_suffix(sfx) for sfx in YAML_SUFFIXES if out.with_suffix(sfx).is_file()]
    if stale:
        raise MergeError(
            f"{stale[0]}: a config beside the output, which would be read as the merged model's (no input has "
            "one): remove it or give another output name"
        )
    return None


def merge_summary_line(report: MergeReport) -> str:
    return f"merged -> {report.path}: {report.summary()}"


def describe_method(method: str, multiplier: float) -> str:
    """The formula a method computes, with M written out (for messages)."""
    m = f"{multiplier:g}"
    return {
        "weighted_sum": f"A * (1 - {m}) + B * {m}",
        "add_difference": f"A + (B - C) * {m}",
        "no_interpolation": "A",
    }[method]


__all__ = [
    "EMA_PATTERN",
    "METHODS",
    "MergeError",
    "MergeReport",
    "describe_method",
    "legacy_hash",
    "merge_checkpoints",
    "merge_summary_line",
]
