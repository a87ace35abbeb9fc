"""LoRA: low-rank weight updates (Hu et al. 2021), read from kohya/A1111 and diffusers/PEFT files and applied to
sdengine's U-Net and text encoder, several at once, each with its own weight.

The work is split by job: :mod:`sdengine.weights.lora_file` reads files (formats, alpha) and finds them by name,
:mod:`sdengine.weights.lora_keys` matches a file's names to the model's layers and reports what matched, and
:mod:`sdengine.nn.lora` is the runtime layer (the patched Linear/Conv, stacking, fuse/unfuse, the handle that
removes it). This module joins them in :func:`apply_loras` and exports the public names of all three.

SD3's MMDiT and Flux's, Chroma's and Qwen-Image's transformers take the same path too:
:mod:`sdengine.weights.lora_dit_keys` first rewrites a file's names (BFL's, Stability's, kohya's, diffusers') onto
the model's modules, splitting fused projections.

LyCORIS files (LoHa, LoKr, (IA)^3, GLoRA, OFT, BOFT, LoCon with a Tucker core, DoRA, full and norm-layer
differences) take the same path: the file reader hands their layers to :mod:`sdengine.weights.lycoris_file`, the
matcher checks them against the model, and :func:`lycoris_layer` builds the
:class:`~sdengine.nn.lycoris.LycorisLayer` (or, for differences of 1-d parameters, the
:class:`~sdengine.nn.lycoris.DiffLayer`) that the same handle patches and fuses.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
from torch import nn

from ..errors import UsageError
from ..nn.fp8 import has_fp8
from ..nn.fp8_storage import compute_dtype
from ..nn.lora import (
    WEIGHT_LIMIT,
    WEIGHT_WARN_LIMIT,
    AppliedLoRA,
    LayerUpdate,
    LoRAError,
    LoRAHandle,
    LoRALayer,
    LoRAWeight,
    LoRAWeightWarning,
    check_summed_weights,
    check_weight,
    lora_weight,
    part_weights,
    patch_layers,
    weight_text,
)
from ..nn.lycoris import DiffLayer, LycorisLayer, lycoris_scale
from .lora_dit_keys import split_dit_layers
from .lora_file import (
    LORA_SUFFIXES,
    LoRAFile,
    LoRAFileError,
    LoRAFormat,
    LoRALayerWeights,
    UnsafeLoRANameError,
    list_lora_dir,
    load_lora,
    resolve_lora,
)
from .lora_keys import (
    Component,
    LoRAReport,
    ModelIndex,
    Target,
    check_dit_family,
    kohya_name,
    lora_targets,
    match_lora,
    unet_ldm_names,
)
from .lycoris_file import LycorisLayerWeights

log = logging.getLogger(__name__)

LoRASpec = tuple["str | os.PathLike[str] | LoRAFile", "float | LoRAWeight"]


def lora_entry(item: object) -> tuple[str | os.PathLike[str] | LoRAFile, float | LoRAWeight]:
    """One entry of a ``loras`` list as ``(source, weight)``: a path, name or :class:`LoRAFile` alone (weight 1), or
    a ``(source, weight)`` pair (tuple or list). The weight is a number, or a :class:`LoRAWeight` (separate
    text-encoder and U-Net multipliers, A1111's ``<lora:NAME:TE:UNET>``). Anything else is a one-line
    :class:`UsageError`, not an ``IndexError`` deep inside; a weight that is not a number is a :class:`LoRAError`."""
    if isinstance(item, str | os.PathLike | LoRAFile):
        return item, 1.0
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[0], str | os.PathLike | LoRAFile):
        src, weight = item
        try:  # bounds are checked once the file's name is known (check_weight in apply_loras)
            if isinstance(weight, LoRAWeight):
                return src, lora_weight(weight.te, weight.unet)
            return src, float(weight)
        except (TypeError, ValueError):
            raise LoRAError(f"{getattr(src, 'name', None) or src}: weight {weight!r} is not a number") from None
    shown = repr(item)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    raise UsageError(f"loras: each entry is a path or name, or a (path_or_name, weight) pair; got {shown}")


def apply_loras(
    unet: nn.Module | None,
    text_encoder: Any,
    loras: Sequence[LoRASpec] | Sequence[str | os.PathLike[str] | LoRAFile],
    lora_dir: str | os.PathLike[str] | None = None,
    *,
    fuse: bool = False,
    text_encoder_2: nn.Module | None = None,
    part: Literal["unet", "text_encoders"] | None = None,
) -> LoRAHandle:
    """Apply LoRAs to ``unet`` / ``text_encoder`` (either may be None) without touching their weights.

    A ``text_encoder`` that is not an ``nn.Module`` (MiniLM, held by the emoji pipeline) cannot be adapted: a LoRA
    with text-encoder layers is then a :class:`LoRAError` rather than half applied.

    ``loras``: ``(path_or_name_or_LoRAFile, weight)`` pairs (a bare path means weight 1); names are looked up in
    ``lora_dir``. ``text_encoder_2``: SDXL's second text encoder (kohya ``lora_te2_``, ``text_encoder_2.``).
    Returns a :class:`LoRAHandle`: ``.reports`` says what matched, ``.set_weight(i, w)`` changes a
    weight for the next forward, ``.fuse()``/``.unfuse()``, and ``.remove()`` restores the model exactly. Every
    file is checked before any layer is patched, so an error leaves the model untouched.

    ``part``: apply only the U-Net layers (``"unet"``) or only the text-encoder layers (``"text_encoders"``) of
    each file, as ComfyUI's LoraLoader does with ``strength_model`` / ``strength_clip``: the other part's layers
    are left out rather than reported unmatched, and a file with no layers of that part adds nothing.
    A :class:`LoRAWeight` weight applies its ``te`` multiplier to the text-encoder layers and its ``unet``
    multiplier to the U-Net layers: the file is then applied as two entries of the handle (its text-encoder part,
    then its U-Net part), exactly as two ``part=`` calls would.
    """
    if has_fp8(unet):
        raise LoRAError(
            "LoRAs need the U-Net's own weights, and this one multiplies in FP8 (the fp8 fast path replaced them): "
            "load the model without fp8 to use LoRAs"
        )
    index = ModelIndex(unet, text_encoder, text_encoder_2)
    prepared: list[Prepared] = []
    named: dict[str, tuple[str, list[tuple[float, float]]]] = {}  # file -> (name, its (te, unet) weights)
    for item in loras:
        src, weight = lora_entry(item)
        if isinstance(src, LoRAFile):
            lf = src
        else:
            lf = load_lora(resolve_lora(src, lora_dir))
        te_w, unet_w = part_weights(weight)
        te_w = check_weight(te_w, lf.name)
        unet_w = te_w if unet_w == te_w else check_weight(unet_w, lf.name)
        file_key = str(lf.path.resolve()) if lf.path is not None else f"{lf.name}#{id(lf)}"
        mentions = named.setdefault(file_key, (lf.name, []))[1]
        mentions.append((te_w, unet_w))
        parts: list[tuple[Literal["unet", "text_encoders"] | None, float]]
        if part is not None:
            parts = [(part, te_w if part == "text_encoders" else unet_w)]
        elif te_w != unet_w:  # A1111's separate text-encoder / U-Net multipliers
            parts = [("text_encoders", te_w), ("unet", unet_w)]
        else:
            parts = [(None, te_w)]
        for which, w in parts:
            piece = lf if which is None else lora_part(lf, which)
            if index.dit is not None and unet is not None:  # SD3 / Flux: the file's names onto the modules
                check_dit_family(piece, index)
                piece = split_dit_layers(piece, unet)
            if which is not None and not piece.layers and not piece.lycoris and not piece.unsupported:
                log.info("LoRA %s has no %s layers: nothing to apply there", lf.name, which)
                continue
            matched, unmatched, lycoris = match_lora(piece, index)
            prepared.append(Prepared(piece, w, matched, unmatched, lycoris, file_key, len(mentions) - 1, which))

    check_summed_weights(named.values())  # before anything is patched
    handle = LoRAHandle()
    handle.notes = duplicate_notes(named.values())
    for note in handle.notes:
        log.warning(note)
    try:
        _attach_all(handle, prepared)
    except BaseException:  # a layer that cannot be patched: leave the model as it was
        handle.remove()
        raise
    if fuse:
        try:
            handle.fuse()
        except BaseException:  # fp8-stored weights refuse fusing: the model is left as it was
            handle.remove()
            raise
    return handle


def duplicate_notes(files: Iterable[tuple[str, Sequence[tuple[float, float]]]]) -> list[str]:
    """One line for each file named more than once (``<lora:a:0.5> <lora:a:1>``): sdengine applies it once per
    mention, so the effects add up (weights 0.5 + 1 act as 1.5), as two ComfyUI LoraLoader nodes of one file do.
    A1111 differs: its load_networks reuses one network object per name, so the file is applied once per mention
    at the last mention's multiplier (1 + 1 there). ``files``: (name, [(te weight, unet weight), ...])."""
    notes = []
    for name, weights in files:
        if len(weights) < 2:
            continue
        shown = ", ".join(weight_text(lora_weight(te, unet)) for te, unet in weights)
        total = lora_weight(sum(te for te, _ in weights), sum(unet for _, unet in weights))
        last_te, last_unet = weights[-1]
        a1111 = lora_weight(last_te * len(weights), last_unet * len(weights))
        notes.append(
            f"LoRA {name} is named {len(weights)} times (weights {shown}): their effects add up, as weight "
            f"{weight_text(total)} (A1111 would apply it at {weight_text(a1111)}: each mention at the last weight)"
        )
    return notes


def is_text_encoder_key(key: str) -> bool:
    """Whether a LoRA file's layer name (kohya, PEFT/diffusers or ComfyUI spelling) is of a text encoder."""
    # lora_te_/te1_/te2_, text_encoder(_2)., ComfyUI's text_encoders., a bare CLIP module name (text_model.)
    return key.startswith(("lora_te", "text_encoder", "text_model."))


def lora_part(lf: LoRAFile, part: Literal["unet", "text_encoders"]) -> LoRAFile:
    """``lf`` with only its U-Net or only its text-encoder layers (and unreadable keys of that part)."""
    want_te = part == "text_encoders"

    def keep(key: str) -> bool:
        return is_text_encoder_key(key) == want_te

    return dataclasses.replace(
        lf,
        layers={k: v for k, v in lf.layers.items() if keep(k)},
        lycoris={k: v for k, v in lf.lycoris.items() if keep(k)},
        unknown=[k for k in lf.unknown if keep(k)],
    )


@dataclasses.dataclass
class Prepared:
    """One file (or one part of it) checked and matched, ready to attach: its mention and part are what
    :meth:`LoRAHandle.set_weight` sums a file named twice by."""

    lf: LoRAFile
    weight: float
    matched: dict[str, Any]
    unmatched: list[str]
    lycoris: dict[str, Any]
    source: str
    mention: int
    part: Literal["unet", "text_encoders"] | None


def _attach_all(handle: LoRAHandle, prepared: Sequence[Prepared]) -> None:
    for item in prepared:
        lf, w, matched, unmatched, lycoris = item.lf, item.weight, item.matched, item.unmatched, item.lycoris
        layers: list[tuple[nn.Module, LayerUpdate]] = []
        for key, (target, down, up) in matched.items():
            base = target.module.weight
            dt = compute_dtype(target.module)  # an fp8-stored layer's LoRA runs in its compute dtype
            layer = LoRALayer(
                down.to(device=base.device, dtype=dt),
                up.to(device=base.device, dtype=dt),
                scale=lf.layers[key].scale,
                multiplier=w,
                conv=LoRALayer.geometry(target.module),
            )
            layers.append((target.module, layer))
        for target, lw in lycoris.values():
            layers.append((target.module, lycoris_layer(lw, target.module, w)))
        report = LoRAReport(
            name=lf.name,
            path=str(lf.path) if lf.path is not None else None,
            format=lf.format,
            weight=w,
            matched=sorted(  # a set: a LoRA pair and its bias difference (diff_b) are one layer
                {f"{t.component}:{t.name}" for t, _, _ in matched.values()}
                | {f"{t.component}:{t.name}" for t, _ in lycoris.values()}
            ),
            unmatched=unmatched,
            unsupported=lf.unsupported,
            ranks=lf.ranks,
            algorithms=lf.algorithms,
        )
        if report.complete:
            log.info(report.summary())
        else:
            log.warning(report.summary())
        handle.attach(lf.name, w, layers, report, source=item.source, mention=item.mention, part=item.part)


def lycoris_layer(lw: LycorisLayerWeights, module: nn.Module, multiplier: float) -> LycorisLayer | DiffLayer:
    """The runtime layer for one LyCORIS (or DoRA) layer of a file on ``module`` (tensors moved to its device and
    dtype; the math runs in float32 from them). A norm layer's differences and a bias difference alone are a
    :class:`~sdengine.nn.lycoris.DiffLayer`."""
    base = module.weight
    assert isinstance(base, torch.Tensor)
    if lw.algo in ("norm", "bias"):
        # kept in float32: a difference added to a float16 weight is rounded once, when it is added
        w, b = lw.parts.get("diff"), lw.parts.get("diff_b")
        return DiffLayer(
            module,
            None if w is None else w.to(device=base.device, dtype=torch.float32),
            None if b is None else b.to(device=base.device, dtype=torch.float32),
            multiplier=multiplier,
        )
    parts = {
        k: (v.to(device=base.device, dtype=compute_dtype(module)) if v.is_floating_point() else v.to(base.device))
        for k, v in lw.parts.items()
    }
    magnitude, on_output = None, True
    if lw.magnitude is not None:
        axis = lw.magnitude_axis(int(base.shape[0]), int(base.shape[1]))
        on_output = axis is not False
        magnitude = lw.magnitude.to(device=base.device, dtype=torch.float32)
    if lw.algo in ("oft", "boft") and lw.alpha is not None and math.isfinite(lw.alpha) and lw.alpha > 0:
        # alpha is OFT's constraint, relative to the layer's outputs (LyCORIS, kohya, A1111: alpha * out);
        # kept in float32 (a float16 copy would move the bound)
        parts["constraint"] = torch.tensor([lw.alpha * int(base.shape[0])], dtype=torch.float32, device=base.device)
    scale = lw.scale
    if lw.algo == "glora":  # which of its two layouts (hence its rank) can depend on the layer's shape
        scale = lycoris_scale(lw.algo, lw.parts, lw.alpha, tuple(base.shape))
    return LycorisLayer(
        lw.algo,
        parts,
        module,
        scale=scale,
        multiplier=multiplier,
        magnitude=magnitude,
        magnitude_on_output=on_output,
        conv=LoRALayer.geometry(module),
        rows=lw.rows,
    )


__all__ = [
    "LORA_SUFFIXES",
    "WEIGHT_LIMIT",
    "WEIGHT_WARN_LIMIT",
    "AppliedLoRA",
    "Component",
    "LoRAError",
    "LoRAFile",
    "LoRAFileError",
    "LoRAFormat",
    "LoRAHandle",
    "LoRALayer",
    "LoRALayerWeights",
    "LoRAReport",
    "LoRASpec",
    "LoRAWeight",
    "LoRAWeightWarning",
    "LycorisLayer",
    "LycorisLayerWeights",
    "ModelIndex",
    "Target",
    "UnsafeLoRANameError",
    "apply_loras",
    "check_weight",
    "check_summed_weights",
    "duplicate_notes",
    "kohya_name",
    "lora_entry",
    "list_lora_dir",
    "load_lora",
    "is_text_encoder_key",
    "lycoris_layer",
    "lora_part",
    "lora_targets",
    "lora_weight",
    "part_weights",
    "match_lora",
    "patch_layers",
    "resolve_lora",
    "unet_ldm_names",
]
