"""The LoRA runtime: a low-rank term hooked onto a model's Linear/Conv2d layers, stacked, fused and removed.

A LoRA for a layer with weight W (out, in) holds a ``down`` matrix A (r, in) and an ``up`` matrix B (out, r); the
layer then computes ``W x + m * s * B A x`` with the user's weight m and the file's scale s (alpha / r).
Convolutions (LoCon) use a down convolution with the layer's own kernel, stride and padding and a 1x1 up
convolution, which composes to one convolution with kernel ``B @ A``.

Two ways to apply it, both reversible exactly:
- patched (default): a forward hook adds the low-rank term to the layer's output; the base weights are never
  touched, and changing a LoRA's weight between generations changes one number (no reload);
- fused (``handle.fuse()``): the layer's weight tensor is swapped for ``W + sum m s B A``; ``unfuse`` swaps the
  original tensor object back, so the base weights are restored bit for bit.

This module knows nothing of files or key names (that is ``sdengine.weights.lora_file`` / ``lora_keys``); training
attaches its trainable layers through :func:`patch_layers`, so trained and loaded LoRAs run the very same code.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sdengine.errors import SdengineError

log = logging.getLogger(__name__)

WEIGHT_WARN_LIMIT = 4.0  # |weight| above this is almost always a typo (A1111 users type 0.8, not 8)
# |weight| above this is an error: no LoRA means anything at 100x, and 1e30 turns every image black (non-finite).
WEIGHT_LIMIT = 100.0


class LoRAError(SdengineError, ValueError):
    """A LoRA that cannot be used (bad file, no matching layer, bad weight, wrong unfuse order); one line."""


class LoRAWeightWarning(UserWarning):
    """A LoRA weight outside [-4, 4]."""


# --------------------------------------------------------------------------------------------- the layer


class LayerUpdate(nn.Module):
    """What a patch adds to one base layer: a term added to its output (``forward``, None when it adds nothing)
    and the same change as a weight delta (``delta_weight``, float32, for fusing), scaled by ``multiplier``.
    :class:`LoRALayer` is one; the LyCORIS algorithms (:mod:`sdengine.nn.lycoris`) are others."""

    multiplier: float

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def delta_bias(self) -> torch.Tensor | None:
        """The change of the layer's bias (float32), for fusing; None: the bias stays (every LoRA)."""
        return None

    def clear_cache(self) -> None:
        """Drop what the layer keeps between forwards (a rebuilt LyCORIS update); nothing for a LoRA."""


class LoRALayer(LayerUpdate):
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
        conv: dict[str, tuple[int, ...]] | None = None,
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
    def geometry(module: nn.Module) -> dict[str, tuple[int, ...]] | None:
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            if isinstance(padding, str):
                raise LoRAError(f"convolutions with padding={padding!r} are not supported")
            return {
                "stride": tuple(int(v) for v in module.stride),
                "padding": tuple(int(v) for v in padding),
                "dilation": tuple(int(v) for v in module.dilation),
            }
        return None

    def forward(self, x: torch.Tensor, padded: bool = False) -> torch.Tensor | None:
        """The LoRA term of the base layer's input ``x``; ``padded``: ``x`` is padded already (a circularly
        padding convolution, A1111's tiling), so the convolution adds none."""
        m = self.multiplier * self.scale
        if m == 0.0:
            return None
        down, up = self.down, self.up
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.conv is None:
            h = F.linear(F.linear(x, down), up)  # (..., out)
        else:
            c = self.conv
            pad = (0, 0) if padded else c["padding"]
            h = F.conv2d(F.conv2d(x, down, None, c["stride"], pad, c["dilation"]), up)  # (B, out, H', W')
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
        self.layers: list[LayerUpdate] = []
        self.enabled = True
        self.hook = module.register_forward_hook(self)
        self.original: torch.Tensor | None = None  # the base weight tensor while fused
        self.fused: torch.Tensor | None = None
        self.original_bias: torch.Tensor | None = None  # the base bias tensor while fused (a full diff's diff_b)

    @property
    def passes_through(self) -> bool:
        """True while the hook returns the layer's output unchanged (fused: the LoRA is in the weight), so a caller
        that computes the layer another way (sdengine.nn.attention's fused projections) may skip the call."""
        return not self.enabled

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return output
        x = args[0]
        padded = isinstance(module, nn.Conv2d) and module.padding_mode != "zeros"
        if padded:  # circular padding (A1111's tiling): the LoRA term wraps around as the base layer does
            assert isinstance(module, nn.Conv2d)
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        for layer in self.layers:
            d = layer(x, padded=True) if padded else layer(x)
            if d is not None:
                output = output + d.to(output.dtype)
        return output

    def fuse(self) -> None:
        if self.original is not None:
            return
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        delta = sum((layer.delta_weight() for layer in self.layers), torch.zeros((), dtype=torch.float32))
        for layer in self.layers:  # the hook is off while fused: its kept updates would only hold memory
            layer.clear_cache()
        self.original = w.data
        self.fused = (self.original.float() + delta.to(self.original.device)).to(self.original.dtype)
        w.data = self.fused
        bias_deltas = [d for layer in self.layers if (d := layer.delta_bias()) is not None]
        b = getattr(self.module, "bias", None)
        if bias_deltas and isinstance(b, torch.Tensor):
            self.original_bias = b.data
            total = sum(bias_deltas, torch.zeros((), dtype=torch.float32)).to(b.device)
            b.data = (b.data.float() + total).to(b.dtype)
        self.enabled = False

    def unfuse(self) -> None:
        if self.original is None:
            return
        w = self.module.weight
        assert isinstance(w, torch.Tensor) and self.fused is not None
        if w.data.data_ptr() != self.fused.data_ptr():
            raise LoRAError("unfuse in the reverse order of fuse (another LoRA was fused on top of this one)")
        w.data = self.original  # the very tensor it had: restored bit for bit
        if self.original_bias is not None:
            b = self.module.bias
            assert isinstance(b, torch.Tensor)
            b.data = self.original_bias
        self.original = self.fused = self.original_bias = None
        self.enabled = True

    def remove(self) -> None:
        self.unfuse()
        self.hook.remove()
        for layer in self.layers:
            layer.clear_cache()


# ---------------------------------------------------------------------------------------------- handles


@dataclass
class AppliedLoRA:
    """One LoRA in a handle: its layers and, for a file, the report of what it matched (any object with a
    ``weight`` attribute, kept in step with the weight)."""

    name: str
    weight: float
    layers: list[LayerUpdate]
    report: Any = None
    # the file it came from (its resolved path, or another key unique to it: None for layers not from a file),
    # which of its mentions in the call (0, 1, ...) and which part of it ("unet", "text_encoders", None: both):
    # a file named twice acts at the sum of its mentions' weights, held to the bounds of one weight
    source: str | None = None
    mention: int = 0
    part: str | None = None


class LoRAHandle:
    """LoRAs applied to a model. ``set_weight`` changes one at the next forward (no reload); ``fuse`` folds them
    into the weights; ``remove`` (or leaving a ``with`` block) restores the model exactly."""

    def __init__(self) -> None:
        self.loras: list[AppliedLoRA] = []
        self._patches: dict[int, _Patch] = {}
        self.fused = False
        self.removed = False
        self.notes: list[str] = []  # what the caller should tell the user (a LoRA named twice), one line each

    @property
    def reports(self) -> list[Any]:
        return [a.report for a in self.loras if a.report is not None]

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
        """Change one LoRA's weight (by position or name): takes effect at the next forward. Checked as loading
        checks it: a weight outside [-100, 100], or one that takes the sum of the weights of a file named more
        than once outside it, is a :class:`LoRAError` and nothing changes."""
        self.set_weights({which: weight})

    def set_weights(self, weights: Sequence[float] | Mapping[int | str, float] | Mapping[str, float]) -> None:
        """Change several weights at once (a list: one per LoRA, in order; a mapping: by position or name). All are
        checked first, the summed weights of a file named twice on the new values: one refused, none changes."""
        if not isinstance(weights, Mapping) and len(weights) != len(self.loras):
            raise LoRAError(f"{len(weights)} weights for {len(self.loras)} LoRAs")
        items: Iterable[tuple[int | str, float]] = (
            weights.items() if isinstance(weights, Mapping) else enumerate(weights)
        )
        new: dict[int, float] = {}  # id(entry) -> its new weight
        entries: dict[int, AppliedLoRA] = {}
        for which, w in items:
            a = self._find(which)
            new[id(a)] = check_weight(w, a.name)
            entries[id(a)] = a
        check_summed_weights(self._mentions(new).values())
        for key, a in entries.items():
            a.weight = new[key]
            if a.report is not None:
                a.report.weight = a.weight
            for layer in a.layers:
                layer.multiplier = a.weight
        if self.fused:  # recompute the fused weights from the originals: still exact on unfuse
            self.unfuse()
            self.fuse()

    def _mentions(self, new: Mapping[int, float]) -> dict[str, tuple[str, list[tuple[float, float]]]]:
        """Per file: its name and each mention's (text-encoder, U-Net) weight, with the weights in ``new`` (by
        ``id`` of the entry) in place of the current ones; a part the file has no layers of takes the other's."""
        mentions: dict[str, tuple[str, dict[int, dict[str | None, float]]]] = {}
        for a in self.loras:
            if a.source is None:
                continue
            parts = mentions.setdefault(a.source, (a.name, {}))[1].setdefault(a.mention, {})
            parts[a.part] = new.get(id(a), a.weight)
        out: dict[str, tuple[str, list[tuple[float, float]]]] = {}
        for source, (name, by_mention) in mentions.items():
            pairs = []
            for parts in by_mention.values():
                both = parts.get(None)
                te = both if both is not None else parts.get("text_encoders")
                unet = both if both is not None else parts.get("unet")
                te = unet if te is None else te
                unet = te if unet is None else unet
                assert te is not None and unet is not None  # every mention has at least one entry
                pairs.append((te, unet))
            out[source] = (name, pairs)
        return out

    def attach(
        self,
        name: str,
        weight: float,
        layers: Iterable[tuple[nn.Module, LayerUpdate]],
        report: Any = None,
        *,
        source: str | None = None,
        mention: int = 0,
        part: str | None = None,
    ) -> AppliedLoRA:
        """Hook ``layers`` (base module, LoRA layer) under one LoRA ``name``; several LoRAs on one module stack.
        ``source``, ``mention``, ``part``: see :class:`AppliedLoRA` (what :meth:`set_weight` checks sums by)."""
        if self.removed:
            raise LoRAError("this LoRA handle was removed")
        if self.fused:  # the new layers would be left out of the fused weights
            raise LoRAError("unfuse before attaching more LoRAs")
        applied: list[LayerUpdate] = []
        for module, layer in layers:
            patch = self._patches.get(id(module))
            if patch is None:
                patch = self._patches[id(module)] = _Patch(module)
            patch.layers.append(layer)
            applied.append(layer)
        entry = AppliedLoRA(name, weight, applied, report, source, mention, part)
        self.loras.append(entry)
        return entry

    def fuse(self) -> None:
        """Fold every LoRA into the base weights (faster forwards; the originals are kept for unfuse)."""
        if self.removed:
            raise LoRAError("this LoRA handle was removed")
        float8 = (torch.float8_e4m3fn, torch.float8_e5m2)
        if any(
            getattr(p.module, "weight", None) is not None and p.module.weight.dtype in float8
            for p in self._patches.values()
        ):
            # sdengine.nn.fp8_storage: the merged weight would be rounded to 8 bits; patched, the LoRA's term is
            # added to the stored layer's output at full precision
            raise LoRAError(
                "LoRAs on fp8-stored weights (weight_dtype fp8_*) run patched, not fused: fusing would round the "
                "merged weights to 8 bits"
            )
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
    handle.attach(name, 1.0, layers)
    return handle


def exact_number(x: float) -> str:
    """A multiplier as text that reads back as the same float: whole numbers without ".0" (``1``), others with
    Python's shortest exact repr (``0.1234567``, where ``:g`` wrote ``0.123457``)."""
    x = float(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else repr(x)


@dataclass(frozen=True)
class LoRAWeight:
    """Separate multipliers for a LoRA's text-encoder and U-Net layers (A1111's ``<lora:NAME:TE:UNET>``, ComfyUI's
    ``strength_clip`` / ``strength_model``). A plain float weight means the same multiplier for both."""

    te: float
    unet: float

    def __str__(self) -> str:  # as A1111's tag writes it: <lora:NAME:TE:UNET>, each exactly (read back the same)
        return f"{exact_number(self.te)}:{exact_number(self.unet)}"


def lora_weight(te: float, unet: float | None = None) -> float | LoRAWeight:
    """A weight from a text-encoder and a U-Net multiplier (``unet`` defaults to ``te``, as in A1111): a float
    when they are equal, else a :class:`LoRAWeight`, so that one weight reads, compares and prints as before."""
    te = float(te)
    unet = te if unet is None else float(unet)
    return te if te == unet else LoRAWeight(te, unet)


def part_weights(weight: float | LoRAWeight) -> tuple[float, float]:
    """``(text-encoder multiplier, U-Net multiplier)`` of a weight (a float is both)."""
    if isinstance(weight, LoRAWeight):
        return weight.te, weight.unet
    return weight, weight


def check_weight(weight: float, name: str = "LoRA") -> float:
    """``weight`` as a finite float within [-100, 100] (else LoRAError); a LoRAWeightWarning outside [-4, 4]."""
    try:
        w = float(weight)
    except (TypeError, ValueError):
        raise LoRAError(f"{name}: weight {weight!r} is not a number") from None
    if not math.isfinite(w):
        raise LoRAError(f"{name}: weight {weight!r} is not finite")
    if abs(w) > WEIGHT_LIMIT:
        raise LoRAError(f"{name}: weight {w:g} is outside [-{WEIGHT_LIMIT:g}, {WEIGHT_LIMIT:g}]")
    if abs(w) > WEIGHT_WARN_LIMIT:
        msg = f"{name}: weight {w:g} is outside [-{WEIGHT_WARN_LIMIT:g}, {WEIGHT_WARN_LIMIT:g}]; images may break down"
        log.warning(msg)
        warnings.warn(msg, LoRAWeightWarning, stacklevel=3)
    return w


def weight_text(w: float | LoRAWeight) -> str:
    """A weight as messages show it: ``0.5``, or ``0.5:1`` for separate text-encoder / U-Net multipliers."""
    return format(w, "g") if isinstance(w, float) else str(w)


def check_summed_weights(files: Iterable[tuple[str, Sequence[tuple[float, float]]]]) -> None:
    """A file named more than once acts at the sum of its weights (see
    :func:`sdengine.weights.lora.duplicate_notes`): that sum is held to the bounds of one weight (an error outside
    [-100, 100], a warning outside [-4, 4]), as if it had been written once (``<lora:a:60> <lora:a:60>`` is weight
    120, refused like ``<lora:a:120>``; once each mention alone passed). Loading and
    :meth:`LoRAHandle.set_weight` check it alike. ``files``: (name, [(te weight, unet weight), ...])."""
    for name, weights in files:
        if len(weights) < 2:
            continue
        shown = ", ".join(weight_text(lora_weight(te, unet)) for te, unet in weights)
        label = f"LoRA {name} (named {len(weights)} times, weights {shown}: they add up)"
        for total in dict.fromkeys((sum(te for te, _ in weights), sum(unet for _, unet in weights))):
            check_weight(total, label)


__all__ = [
    "WEIGHT_LIMIT",
    "WEIGHT_WARN_LIMIT",
    "AppliedLoRA",
    "LayerUpdate",
    "LoRAError",
    "exact_number",
    "LoRAHandle",
    "LoRALayer",
    "LoRAWeight",
    "LoRAWeightWarning",
    "check_summed_weights",
    "check_weight",
    "lora_weight",
    "part_weights",
    "patch_layers",
    "weight_text",
]
