"""Which fused attention kernel PyTorch's ``scaled_dot_product_attention`` uses on a CUDA device.

PyTorch has several kernels behind one call (FlashAttention-2, memory-efficient attention, cuDNN's fused
attention, and the plain math path) and picks the first in a fixed priority order that supports the inputs.
The fastest one depends on the GPU, the dtype and the shape: SD 1.5's largest self-attention at 512x512 is
4,096 tokens with 8 heads of dim 40 (a head dim that is not a power of two). :func:`time_backends` times each
kernel on that shape, :func:`use_backend` puts one of them first in PyTorch's order for the whole process (the
others stay on, for inputs the chosen kernel does not take), and :func:`current_backend` says which is first.
Process-global: it changes a setting of torch, not of a model.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.errors import UsageError

BACKENDS = ("flash", "efficient", "cudnn", "math")

_chosen = "default"
_active: Any = None  # the entered sdpa_kernel(..., set_priority=True) context of the current choice


def _kinds() -> dict[str, Any]:
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": getattr(SDPBackend, "CUDNN_ATTENTION", None),
        "math": SDPBackend.MATH,
    }


def use_backend(name: str) -> None:
    """Put ``name`` first in PyTorch's order of attention kernels for the whole process; every kernel stays on,
    so inputs the chosen one does not take (the VAE's one head of 512) still find one. ``"default"`` restores
    PyTorch's own order (flash, efficient, math, cudnn: with the math path on, cuDNN's kernel is otherwise never
    reached)."""
    global _chosen, _active
    if name != "default" and name not in BACKENDS:
        raise UsageError(f"unknown attention backend {name!r}; valid: default, {', '.join(BACKENDS)}")
    if _active is not None:
        _active.__exit__(None, None, None)
        _active = None
    _chosen = "default"
    if name == "default":
        return
    from torch.nn.attention import sdpa_kernel

    kinds = _kinds()
    if kinds[name] is None:
        raise UsageError(f"attention backend {name!r} is not in torch {torch.__version__}")
    order = [kinds[name]] + [kinds[b] for b in BACKENDS if b != name and kinds[b] is not None]
    context = sdpa_kernel(order, set_priority=True)
    context.__enter__()
    _active, _chosen = context, name


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` on (B, heads, L, d) inputs, the call every sdengine network makes.
    ``scale`` multiplies the scores (None: 1/sqrt(d); T5 passes 1.0).

    A masked call on a CUDA device never runs cuDNN's fused kernel: in the torch releases this was measured with
    (2.11) it gives silently wrong results for some masks (a float32 mask described to cuDNN in the inputs'
    dtype, pytorch/pytorch#191612; NaN rows for lengths of 64 mod 128, #196678), and newer cuDNN versions put
    it first on Hopper. Unmasked calls (every attention of the U-Net and of SD's CLIP) keep the process's choice.
    """
    if mask is not None and q.device.type == "cuda":
        from torch.nn.attention import sdpa_kernel

        kinds = _kinds()
        safe = [kinds[b] for b in ("flash", "efficient", "math") if kinds[b] is not None]
        with sdpa_kernel(safe):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def current_backend() -> str:
    """The kernel :func:`use_backend` put first ("default": PyTorch's own order)."""
    return _chosen


def time_backends(
    device: str | torch.device,
    dtype: torch.dtype = torch.float16,
    *,
    batch: int = 2,
    heads: int = 8,
    tokens: int = 4096,
    head_dim: int = 40,
    repeats: int = 20,
) -> dict[str, float | None]:
    """Milliseconds per attention call of each backend on (batch, heads, tokens, head_dim) inputs; None for a
    backend that refuses them. Leaves the process's choice as it found it."""
    from torch.nn.attention import sdpa_kernel

    kinds = _kinds()
    dev = torch.device(device)
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=dev, dtype=dtype, generator=g) for _ in range(3))
    out: dict[str, float | None] = {}
    for name in BACKENDS:
        kind = kinds[name]
        if kind is None:
            out[name] = None
            continue
        try:
            with sdpa_kernel(kind), torch.no_grad():
                for _ in range(3):
                    F.scaled_dot_product_attention(q, k, v)
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    F.scaled_dot_product_attention(q, k, v)
                _sync(dev)
            out[name] = (time.perf_counter() - t0) / repeats * 1000
        except RuntimeError:
            out[name] = None
    return out


def fastest(times: dict[str, float | None]) -> str:
    """The backend with the lowest time (``time_backends``'s result); "default" when none ran."""
    ran = {k: v for k, v in times.items() if v is not None}
    return min(ran, key=lambda k: ran[k]) if ran else "default"


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


__all__ = ["BACKENDS", "attention", "current_backend", "fastest", "time_backends", "use_backend"]
