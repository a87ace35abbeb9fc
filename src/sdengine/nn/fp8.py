"""FP8 matrix products for the linear layers of a network's transformer blocks (the ``fp8`` fast-path option).

Hopper and Ada GPUs multiply 8-bit floats (e4m3: 4 exponent bits, 3 mantissa bits, largest value 448) at twice
their 16-bit rate. A linear layer ``y = x W^T + b`` can use that when both operands are scaled into e4m3's range:

* the weight once, per output row: ``W = s_w * W8`` with ``s_w = max |W[row]| / 448`` (a column of N scales);
* the activation at every call, per token (row of ``x``): ``x = s_x * x8``, ``s_x = max |x[row]| / 448``;
* then ``y = s_x * (x8 W8^T) * s_w^T + b``: one ``torch._scaled_mm`` call multiplies the 8-bit operands,
  accumulates in fp32 and applies both scales in its epilogue.

Per-row scales keep one large row (or token) from crushing the others' precision. Each product is then accurate
to about 4% of its mean magnitude (three mantissa bits), so whether the images stay good is a measurement, not a
given: docs/gpu.md has it for the shipped ``emoji`` model. Only the transformer blocks' layers are converted (the
attention projections and the feed-forward, where the matrix products of a step are), except the
cross-attention's key and value projections, which read the 77 text tokens (a product too small to gain).

:class:`FP8Linear` *replaces* an ``nn.Linear`` (its fp16/fp32 weight is dropped, so the network also gets smaller);
there is no second copy that could go stale. A LoRA needs the layers' weights, so :func:`has_fp8` lets the LoRA
loader refuse an FP8 network with one line instead of adapting only the layers that are left.

``torch._scaled_mm`` runs on CUDA devices of compute capability 8.9 and up and (slowly, for checking) on the CPU.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
# Linear layers inside a transformer block, except the cross-attention's key/value projections (text tokens).
_BLOCK_RE = re.compile(r"(^|\.)transformer_blocks\.\d+\.")
_CROSS_KV_RE = re.compile(r"attn2\.to_[kv]$")


def _scale_rows(t: Tensor) -> Tensor:
    """(M, K) -> (M, 1) float32 scales that put each row's largest magnitude at e4m3's largest value."""
    return (t.detach().abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """(M, K) -> (e4m3 values (M, K), float32 scales (M, 1)) with ``t ~= values * scales`` row by row."""
    scale = _scale_rows(t)
    q = (t.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


def supported(device: str | torch.device) -> bool:
    """Whether ``device`` multiplies e4m3 operands: a CUDA device of compute capability 8.9+, or the CPU."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return True
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_capability(dev) >= (8, 9)
    return False


class FP8Linear(nn.Module):
    """An ``nn.Linear`` whose product runs in e4m3 (module docstring): the weight stored quantized per output row
    (``weight_fp8`` (N, K), ``weight_scale`` (1, N) float32), the bias kept in the layer's dtype."""

    weight_fp8: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        w8, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale.t().contiguous())  # (1, N): the layout _scaled_mm takes
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.compute_dtype = linear.weight.dtype

    def _apply(self, fn: Any, recurse: bool = True) -> FP8Linear:
        # .half()/.float()/.to(dtype) convert every floating buffer, and e4m3 counts as one: the quantized weight
        # and its scales may move to another device but keep their dtypes (the bias follows the conversion).
        w8, scale = self.weight_fp8, self.weight_scale
        super()._apply(fn, recurse)
        self.weight_fp8 = w8.to(self.weight_fp8.device)
        self.weight_scale = scale.to(self.weight_scale.device)
        return self

    def dequantized_weight(self) -> Tensor:
        """The weight the product uses, (N, K) in float32 (what a test compares with the original)."""
        return self.weight_fp8.float() * self.weight_scale.t()

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        x8, sx = quantize_rows(x2)
        # CUDA's row-scaled e4m3 product writes bfloat16; the CPU's writes float32 (checked against it in tests).
        out_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
        y = torch._scaled_mm(x8, self.weight_fp8.t(), scale_a=sx, scale_b=self.weight_scale, out_dtype=out_dtype)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, e4m3"


def selected(name: str, module: nn.Module) -> bool:
    """Whether the layer ``name`` is one :func:`to_fp8` converts (module docstring); e4m3 products also need
    both widths to be multiples of 16."""
    return (
        isinstance(module, nn.Linear)
        and _BLOCK_RE.search(name) is not None
        and _CROSS_KV_RE.search(name) is None
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def to_fp8(model: nn.Module) -> int:
    """Replace the selected linear layers of ``model`` (:func:`selected`) by :class:`FP8Linear`; returns how many."""
    chosen = [(name, m) for name, m in model.named_modules() if selected(name, m)]
    for name, m in chosen:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        assert isinstance(m, nn.Linear)
        setattr(parent, child, FP8Linear(m))
    return len(chosen)


def has_fp8(model: nn.Module | None) -> bool:
    """Whether ``model`` has layers :func:`to_fp8` converted."""
    return model is not None and any(isinstance(m, FP8Linear) for m in model.modules())


__all__ = ["E4M3_MAX", "FP8Linear", "has_fp8", "quantize_rows", "selected", "supported", "to_fp8"]
