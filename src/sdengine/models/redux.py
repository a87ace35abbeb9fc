"""FLUX.1 Redux's image encoder (Black Forest Labs 2024, ``flux1-redux-dev``): SigLIP's image tokens projected
into T5's space, to be appended to the prompt's T5 tokens as more text tokens.

Two biased linears with SiLU between them: ``redux_down(silu(redux_up(x)))``, ``redux_up`` from SigLIP's width
(1152) to three times T5's (3 x 4096), ``redux_down`` back to T5's width. Parameter names are BFL's and diffusers'
(``ReduxImageEncoder``): ``redux_up.weight``, ``redux_up.bias``, ``redux_down.weight``, ``redux_down.bias``. Files
are read by :mod:`sdengine.weights.redux_file`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError


@dataclass(frozen=True)
class ReduxConfig:
    redux_dim: int = 1152  # SigLIP so400m's width
    txt_in_features: int = 4096  # T5-XXL's width (the Flux transformer's joint_attention_dim)

    def __post_init__(self) -> None:
        for name in ("redux_dim", "txt_in_features"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 16384:
                raise ConfigError(f"Redux config: {name}={v!r} must be an integer from 1 to 16384")


class ReduxImageEncoder(nn.Module):
    """SigLIP tokens (B, N, redux_dim) -> T5-space tokens (B, N, txt_in_features)."""

    def __init__(self, config: ReduxConfig = ReduxConfig()) -> None:
        super().__init__()
        self.config = config
        self.redux_up = nn.Linear(config.redux_dim, config.txt_in_features * 3)
        self.redux_down = nn.Linear(config.txt_in_features * 3, config.txt_in_features)
        self.name = ""  # the file it came from (set by the loader)

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 3 or x.shape[-1] != self.config.redux_dim:
            raise UsageError(
                f"Redux image encoder takes image tokens (B, N, {self.config.redux_dim}), got {tuple(x.shape)}"
            )
        w = self.redux_up.weight
        return self.redux_down(F.silu(self.redux_up(x.to(dtype=w.dtype))))


__all__ = ["ReduxConfig", "ReduxImageEncoder"]
