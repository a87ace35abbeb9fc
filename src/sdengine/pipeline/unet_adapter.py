"""THE map from a conditioning dict (sdengine.text.conditioners) onto a U-Net's arguments.

``UNetAdapter(net, dtype)(x, t, crossattn=..., vector=..., concat=...)``: ``concat`` channels are appended to
the latent, ``crossattn`` becomes ``encoder_hidden_states`` and ``vector`` ``class_labels``; the network runs
in ``dtype`` and the result comes back as float32 (what the samplers compute in). A controlled U-Net
(sdengine.pipeline.control) also gets the sampler's ``step`` and CFG's ``row_kinds``; an IP-Adapter's
(sdengine.nn.ip_adapter.IPAdapterNet) the conditioning's ``ip_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError

CONDITIONING_KEYS = ("crossattn", "vector", "concat")


class UNetAdapter:
    def __init__(self, net: Callable[..., Tensor], dtype: torch.dtype) -> None:
        self.net = net
        self.dtype = dtype
        self.takes_step = bool(getattr(net, "takes_step", False))
        self.takes_row_kinds = bool(getattr(net, "takes_row_kinds", False))
        self.takes_ip_tokens = bool(getattr(net, "takes_ip_tokens", False))

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        crossattn: Tensor,
        vector: Tensor | None = None,
        concat: Tensor | None = None,
        step: Any = None,
        row_kinds: Sequence[str] | None = None,
        ip_tokens: Tensor | None = None,
    ) -> Tensor:
        x = x.to(self.dtype)
        if concat is not None:
            x = torch.cat([x, concat.to(self.dtype)], dim=1)
        kw: dict[str, Any] = {"encoder_hidden_states": crossattn.to(self.dtype)}
        if vector is not None:
            kw["class_labels"] = vector.to(self.dtype)
        if self.takes_step:
            kw["step"] = step
        if self.takes_row_kinds:
            kw["row_kinds"] = row_kinds
        if ip_tokens is not None:  # IP-Adapter's image tokens (sdengine.nn.ip_adapter.IPAdapterNet takes them)
            if not self.takes_ip_tokens:
                raise GenerationError("the conditioning has IP-Adapter image tokens and the network takes none")
            kw["ip_tokens"] = ip_tokens.to(self.dtype)
        return self.net(x, t, **kw).float()


__all__ = ["CONDITIONING_KEYS", "UNetAdapter"]
