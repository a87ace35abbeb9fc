"""FP8 weight *storage* for a diffusion network (ComfyUI's UNETLoader ``weight_dtype``, Forge's float8 "Diffusion in
Low Bits"): the weights are held in float8 and cast to the compute dtype at each use.

Not the ``fp8`` fast-path option (:mod:`sdengine.nn.fp8`), which *multiplies* in e4m3 with per-row scales: here the
products run in the compute dtype (fp16, bf16 or fp32) exactly as before; only the stored weights are rounded, so a
12B Flux transformer's weights take about 12 GB instead of 24. The image equals, up to float noise, that of the same
model whose weights were rounded to float8 and back (:func:`rounded_copy_state`).

What is converted (:func:`to_storage`), following ComfyUI (``comfy/ops.py``: its ``manual_cast`` layers hold the
model's weight dtype and ``cast_bias_weight`` casts the weight to the input's dtype at every call): every
``nn.Linear`` and ``nn.Conv2d`` weight of the network, i.e. all the matrix products and convolutions (U-Net,
MMDiT, Flux transformer). The weight is a plain cast (``w.to(float8)``, round to nearest, no scale), as ComfyUI
stores it: values beyond the format's range become inf/NaN there, and are refused here (:class:`StorageError`).
Biases, norm scales and embedding tables stay in the compute dtype (ComfyUI builds them in the weight dtype too
where their constructors take it; they are well under 1% of the bytes and keeping them exact costs nothing).

Formats (:data:`WEIGHT_DTYPES`): ``fp8_e4m3fn`` (4 exponent bits, 3 mantissa bits, largest 448), ``fp8_e5m2``
(5 and 2, largest 57344) and ``fp8_e4m3fn_fast``, which in ComfyUI also multiplies in e4m3 (unscaled) on a device
with fp8 products and otherwise falls back to storage alone (its ``pick_operations`` chooses ``fp8_ops`` only when
``supports_fp8_compute``); sdengine runs it as storage alone everywhere (the scaled e4m3 products are the separate
``fp8`` fast-path option).

A converted layer keeps its class's behaviour (``isinstance(layer, nn.Linear)`` stays true, its hooks stay): its
class becomes :class:`StoredLinear` / :class:`StoredConv2d`, whose forward casts the weight (and bias) to the
input's dtype. ``.to(dtype)`` / ``.half()`` on the network move the weight between devices but keep it in float8
(the compute dtype follows the conversion). LoRAs run patched (their term added to the layer's output at run time,
over the stored weight); fusing a LoRA into a stored weight would round the merged weight to 8 bits, and is refused
by :mod:`sdengine.nn.lora`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError

# ComfyUI's UNETLoader choices, in its order; "default" keeps the weights in the compute dtype.
WEIGHT_DTYPES: tuple[str, ...] = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
STORAGE_DTYPES: dict[str, torch.dtype] = {
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e4m3fn_fast": torch.float8_e4m3fn,  # storage alone here (module docstring)
    "fp8_e5m2": torch.float8_e5m2,
}
FLOAT8 = frozenset(STORAGE_DTYPES.values())


class StorageError(UsageError):
    """A weight_dtype that cannot be used: an unknown name, a network that already multiplies in fp8, a weight
    beyond the format's range."""


def storage_dtype(name: str | None) -> torch.dtype | None:
    """A ``weight_dtype`` name (:data:`WEIGHT_DTYPES`; None means ``"default"``) -> its float8 dtype, None for
    ``"default"``; an unknown name is a :class:`StorageError` naming the closest ones."""
    if name is None:
        return None
    key = str(name).strip().lower()
    if key == "default":
        return None
    if key in STORAGE_DTYPES:
        return STORAGE_DTYPES[key]
    from sdengine.names import did_you_mean

    guess = did_you_mean(str(name), list(WEIGHT_DTYPES))
    raise StorageError(f"unknown weight dtype {name!r}{guess}; valid: {', '.join(WEIGHT_DTYPES)}")


class _Stored:
    """What both stored layer kinds share: the compute dtype kept beside the float8 weight, and ``_apply`` that keeps
    the weight float8 when the module is converted to another dtype."""

    weight: Tensor
    compute_dtype: torch.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        stored = self.weight.dtype
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device))
        out = super()._apply(fn, recurse)  # type: ignore[misc]
        self.compute_dtype = probe.dtype
        if self.weight.dtype != stored:  # .to(dtype) converted it: float8 -> fp16/bf16/fp32 -> float8 is exact
            self.weight.data = self.weight.data.to(stored)
        return out

    def _cast(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        b: Tensor | None = getattr(self, "bias", None)
        return self.weight.to(x.dtype), None if b is None else b.to(x.dtype)


class StoredLinear(_Stored, nn.Linear):
    """An ``nn.Linear`` whose weight is held in float8: ``F.linear(x, w.to(x.dtype), b.to(x.dtype))``."""

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._cast(input)
        return F.linear(input, w, b)


class StoredConv2d(_Stored, nn.Conv2d):
    """An ``nn.Conv2d`` whose weight is held in float8, cast to the input's dtype at each call."""

    def forward(self, input: Tensor) -> Tensor:
        w, b = self._cast(input)
        return self._conv_forward(input, w, b)


_KINDS: dict[type[nn.Module], type[nn.Module]] = {nn.Linear: StoredLinear, nn.Conv2d: StoredConv2d}


def selected(module: nn.Module) -> bool:
    """Whether :func:`to_storage` converts ``module``: a plain ``nn.Linear`` / ``nn.Conv2d`` (not a subclass that
    computes its own way, e.g. the Winograd convolution) with a floating weight not already float8."""
    w = getattr(module, "weight", None)
    return type(module) in _KINDS and isinstance(w, Tensor) and w.is_floating_point() and w.dtype not in FLOAT8


def to_storage(model: nn.Module, dtype: torch.dtype | str) -> int:
    """Hold the weights of ``model``'s Linear and Conv2d layers in ``dtype`` (a float8 dtype or a
    :data:`WEIGHT_DTYPES` name), in place, layer by layer (each full-precision weight is freed as it is replaced);
    returns how many layers. Every weight is checked first: one beyond the format's range is refused and nothing is
    converted."""
    if isinstance(dtype, str):
        resolved = storage_dtype(dtype)
        if resolved is None:
            return 0
        dtype = resolved
    if dtype not in FLOAT8:
        raise StorageError(f"fp8 weight storage takes float8_e4m3fn or float8_e5m2, not {dtype}")
    from sdengine.nn.fp8 import has_fp8

    if has_fp8(model):
        raise StorageError(
            "this network already multiplies in fp8 (the fp8 fast path): fp8 weight storage and the fp8 fast path "
            "are two ways to hold 8-bit weights; pick one"
        )
    chosen = [(name, m) for name, m in model.named_modules() if selected(m)]
    limit = torch.finfo(dtype).max
    for name, m in chosen:
        with torch.no_grad():
            big = m.weight.detach().abs().amax() if m.weight.numel() else torch.zeros(())
        if not torch.isfinite(big) or float(big) > limit:
            raise StorageError(
                f"{name}.weight reaches {float(big):g}, beyond {dtype}'s largest value {limit:g}: it cannot be stored "
                "in this format (try fp8_e5m2, or default)"
            )
    for _, m in chosen:
        compute = m.weight.dtype
        with torch.no_grad():
            m.weight = nn.Parameter(m.weight.detach().to(dtype), requires_grad=False)
        m.__class__ = _KINDS[type(m)]
        setattr(m, "compute_dtype", compute)  # noqa: B010 (an attribute of the new class)
    return len(chosen)


def is_stored(module: nn.Module) -> bool:
    return isinstance(module, _Stored)


def has_storage(model: nn.Module | None) -> bool:
    """Whether ``model`` has layers :func:`to_storage` converted."""
    return model is not None and any(isinstance(m, _Stored) for m in model.modules())


def storage_of(model: nn.Module | None) -> torch.dtype | None:
    """The float8 dtype ``model``'s converted layers hold (the first one's), None when none is converted."""
    if model is None:
        return None
    for m in model.modules():
        if isinstance(m, _Stored):
            return m.weight.dtype
    return None


def compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype ``layer`` computes in: a stored layer's compute dtype, else its weight's dtype (what a network's
    ``dtype`` reads, so that inputs are not cast to float8)."""
    if isinstance(layer, _Stored):
        return layer.compute_dtype
    w = layer.weight
    assert isinstance(w, Tensor)
    return w.dtype


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s parameters and buffers (what storage shrinks)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def rounded_copy_state(state: Mapping[str, Tensor], model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """``state`` (``model``'s state dict) with the weights :func:`to_storage` would convert rounded to ``dtype``
    and back to their own dtype: the full-precision model whose images storage gives (for tests and checks)."""
    names = {f"{n}.weight" for n, m in model.named_modules() if selected(m)}
    return {k: (v.to(dtype).to(v.dtype) if k in names else v) for k, v in state.items()}


__all__ = [
    "STORAGE_DTYPES",
    "WEIGHT_DTYPES",
    "StorageError",
    "StoredConv2d",
    "StoredLinear",
    "compute_dtype",
    "has_storage",
    "is_stored",
    "parameter_bytes",
    "rounded_copy_state",
    "storage_dtype",
    "to_storage",
]
