"""Chroma's transformer: FLUX.1 [schnell]'s blocks, every modulation made by one small network.

Chroma (lodestones 2025; Chroma1-Base, Chroma1-HD) is a rework of FLUX.1 [schnell] (:mod:`sdengine.models.flux`):
the double- and single-stream blocks, RoPE, the 2x2 patches and the T5 text path are Flux's, with three changes:

* no per-block modulation linears and no conditioning vector: one "distilled guidance layer" (an MLP of
  ``approximator_layers`` residual Linear-SiLU-Linear layers with RMS norms, ``approximator_hidden_dim`` wide)
  computes every shift, scale and gate of every block at once. Its input is one row per modulation vector: the
  timestep's sinusoidal features (``approximator_num_channels / 4`` numbers), a guidance scale's (always 0: Chroma
  takes no guidance) and the index of the vector itself as sinusoidal features (``approximator_num_channels / 2``
  numbers of ``1000 x index``). The output, (B, 3 S + 12 D + 2, hidden) for S single and D double blocks, is cut
  as: 3 per single block (shift, scale, gate), then 6 per double block for the image stream, then 6 per double
  block for the text stream, then 2 for the final norm (shift, scale: in that order, unlike Flux's);
* no CLIP pooled vector, no guidance embedding: the prompt is T5-XXL's states alone;
* the text tokens are masked in attention: T5's padding is not attended to, except the first pad token (the
  pipeline's rule, :mod:`sdengine.pipeline.chroma`); image tokens are always attended to. The mask here is over
  keys (B, S + N) for every query: the image tokens' outputs are those of diffusers' pairwise mask (a masked
  query row only changes the masked text tokens' own states, which nothing reads).

The parameter names are diffusers' ``ChromaTransformer2DModel``; Chroma's single files (BFL names plus
``distilled_guidance_layer.*``) are renamed by :mod:`sdengine.weights.chroma_file`.

``forward(hidden_states, timestep, encoder_hidden_states, text_mask)`` takes the unpacked latent (B, 16, H, W) and
``timestep`` on the 0..1000 scale, as :class:`sdengine.models.flux.FluxTransformer` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.flux import (
    DoubleStreamBlock,
    FluxLikeConfig,
    FluxLikeTransformer,
    SingleStreamBlock,
    modulate,
    pack_latents,
    unpack_latents,
)
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding

PATCH = 2
INDEX_SCALE = 1000.0  # the modulation index enters its sinusoid multiplied by this


@dataclass(frozen=True)
class ChromaConfig(FluxLikeConfig):
    """Architecture of a Chroma transformer; the names of diffusers' ``ChromaTransformer2DModel`` config.

    As :class:`sdengine.models.flux.FluxConfig` without ``pooled_projection_dim`` and ``guidance_embeds``, plus the
    approximator's: ``approximator_num_channels`` (its input width: 4 x the timestep's sinusoid width),
    ``approximator_hidden_dim`` (5120 in Chroma1) and ``approximator_layers`` (5)."""

    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    approximator_num_channels: int = 64
    approximator_hidden_dim: int = 5120
    approximator_layers: int = 5

    LABEL: ClassVar[str] = "Chroma transformer"
    DIFFUSERS_CLASS: ClassVar[str] = "ChromaTransformer2DModel"

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "axes_dims_rope" or (f.name == "out_channels" and v is None):
                continue
            if type(v) is not int or v < (0 if f.name in ("num_layers", "num_single_layers") else 1):
                raise ConfigError(f"Chroma transformer config: {f.name}={v!r} must be a positive integer")
            if v > 1_000_000:
                raise ConfigError(f"Chroma transformer config: {f.name}={v} is out of range")
        if isinstance(self.axes_dims_rope, tuple) and not all(type(d) is int for d in self.axes_dims_rope):
            raise ConfigError(f"Chroma transformer config: axes_dims_rope={self.axes_dims_rope!r} is not a list")
        if isinstance(self.axes_dims_rope, tuple) and any(d < 0 for d in self.axes_dims_rope):
            raise ConfigError(
                f"Chroma transformer config: axes_dims_rope={list(self.axes_dims_rope)} must be three even numbers"
            )
        self.check_layout()
        if self.approximator_num_channels % 4:
            raise ConfigError(
                f"Chroma transformer config: approximator_num_channels={self.approximator_num_channels} is not a "
                "multiple of 4 (timestep, guidance and index sinusoids)"
            )

    @property
    def modulations(self) -> int:
        """How many vectors the approximator makes: 3 per single block, 12 per double block, 2 for the end."""
        return 3 * self.num_single_layers + 12 * self.num_layers + 2


CHROMA1 = ChromaConfig()  # Chroma1-Base / Chroma1-HD (8.9B: FLUX.1 [schnell]'s 19 + 38 blocks)


# ----------------------------------------------------------------------------------------------------------
# The approximator


class Approximator(nn.Module):
    """diffusers' ``ChromaApproximator`` (Chroma's ``distilled_guidance_layer``): in_proj, ``n`` residual
    RMSNorm -> Linear-SiLU-Linear layers, out_proj."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, n: int) -> None:
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden)
        self.layers = nn.ModuleList([TimestepEmbedding(hidden, hidden) for _ in range(n)])
        self.norms = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(n)])
        self.out_proj = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


def approximator_input(t: Tensor, channels: int, count: int, dtype: torch.dtype) -> Tensor:
    """The approximator's input (B, count, channels) for timesteps ``t`` (B,) on the 0..1000 scale: per row
    [sinusoid(t) (channels/4), sinusoid(0) (channels/4), sinusoid(1000 i) (channels/2)] for modulation i.

    As diffusers' model rounds it: t/1000 cast to the model's dtype, times 1000 in it; the features in that dtype."""
    quarter = channels // 4
    B = t.shape[0]
    tt = (t.float() / 1000).to(dtype) * 1000
    time = timestep_embedding(tt, quarter).to(dtype)  # (B, c/4)
    guidance = timestep_embedding(torch.zeros(B, device=t.device), quarter).to(dtype)
    index = torch.arange(count, device=t.device, dtype=torch.float32) * INDEX_SCALE
    mod = timestep_embedding(index, 2 * quarter).to(dtype)  # (count, c/2)
    head = torch.cat([time, guidance], dim=1)[:, None, :].expand(B, count, 2 * quarter)
    return torch.cat([head, mod[None].expand(B, count, 2 * quarter)], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Blocks


def _rows(mods: Tensor) -> tuple[Tensor, ...]:
    """(B, n, dim) modulation vectors -> n tensors (B, 1, dim)."""
    return tuple(m.unsqueeze(1) for m in mods.unbind(1))


class ChromaDoubleBlock(DoubleStreamBlock):
    """Flux's double-stream block without its modulation linears (diffusers' ``ChromaTransformerBlock``)."""

    def __init__(self, dim: int, heads: int, head_dim: int) -> None:
        super().__init__(dim, heads, head_dim, modulation=False)

    def forward(  # type: ignore[override]
        self, x: Tensor, context: Tensor, img_mod: Tensor, txt_mod: Tensor, rope: tuple[Tensor, Tensor], mask: Any
    ) -> tuple[Tensor, Tensor]:
        return self.modulated(x, context, _rows(img_mod), _rows(txt_mod), rope, mask)


class ChromaSingleBlock(SingleStreamBlock):
    """Flux's single-stream block without its modulation linear (diffusers' ``ChromaSingleTransformerBlock``)."""

    def __init__(self, dim: int, heads: int, head_dim: int, mlp_ratio: int = 4) -> None:
        super().__init__(dim, heads, head_dim, mlp_ratio, modulation=False)

    def forward(self, x: Tensor, mod: Tensor, rope: tuple[Tensor, Tensor], mask: Any) -> Tensor:  # type: ignore[override]
        return self.modulated(x, _rows(mod), rope, mask)


# ----------------------------------------------------------------------------------------------------------
# The model


class ChromaTransformer(FluxLikeTransformer):
    """Chroma's transformer (module docstring); diffusers' ``ChromaTransformer2DModel`` parameter names."""

    LABEL = "Chroma transformer"

    def __init__(self, config: ChromaConfig = CHROMA1) -> None:
        super().__init__(config)
        self.config: ChromaConfig = config
        dim = config.hidden_size
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        self.distilled_guidance_layer = Approximator(
            config.approximator_num_channels, dim, config.approximator_hidden_dim, config.approximator_layers
        )
        self.context_embedder = nn.Linear(config.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(config.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(
            [ChromaDoubleBlock(dim, heads, head_dim) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nn.ModuleList(
            [ChromaSingleBlock(dim, heads, head_dim) for _ in range(config.num_single_layers)]
        )
        self.proj_out = nn.Linear(dim, config.out_channels or config.in_channels)

    def modulations(self, timestep: Tensor) -> Tensor:
        """Every block's modulation vectors (B, 3 S + 12 D + 2, hidden) at ``timestep`` (B,) on 0..1000."""
        cfg = self.config
        x = approximator_input(timestep, cfg.approximator_num_channels, cfg.modulations, self.dtype)
        return self.distilled_guidance_layer(x)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        encoder_hidden_states: Tensor,
        text_mask: Tensor | None = None,
        skip_layers: Sequence[int] = (),
        skip_single_layers: Sequence[int] = (),
    ) -> Tensor:
        """The velocity for the latent (B, C, H, W) at ``timestep`` (a number or (B,), 0..1000 scale), given T5's
        states (B, L, 4096) and ``text_mask`` (B, L) (True / 1: attended; None: every text token) -> (B, C, H, W).
        ``skip_layers`` / ``skip_single_layers``: blocks left out, as the Flux transformer's."""
        skip, skip_single = self.skip_sets(skip_layers, skip_single_layers)
        B, H, W = self.check_latent(hidden_states, encoder_hidden_states)
        if text_mask is not None and tuple(text_mask.shape) != (B, encoder_hidden_states.shape[1]):
            raise UsageError(
                f"Chroma transformer: text_mask must be (B={B}, L={encoder_hidden_states.shape[1]}), "
                f"got {tuple(text_mask.shape)}"
            )
        device, dtype = hidden_states.device, self.dtype
        t = self.batch_vector(timestep, B, "timestep", device)
        mods = self.modulations(t)  # (B, M, dim)
        x = self.x_embedder(pack_latents(hidden_states.to(dtype)))
        context = self.context_embedder(encoder_hidden_states.to(dtype))
        L, N = context.shape[1], x.shape[1]
        rope = self.rope_tables(L, H // PATCH, W // PATCH, device)
        mask = None
        if text_mask is not None:
            keep = text_mask.to(device=device) != 0
            if not bool(keep.all()):
                mask = torch.cat([keep, torch.ones(B, N, dtype=torch.bool, device=device)], dim=1)
        S, D = len(self.single_transformer_blocks), len(self.transformer_blocks)
        img0, txt0 = 3 * S, 3 * S + 6 * D
        for i, block in enumerate(self.transformer_blocks):
            if i in skip:
                continue
            img_mod = mods[:, img0 + 6 * i : img0 + 6 * i + 6]
            txt_mod = mods[:, txt0 + 6 * i : txt0 + 6 * i + 6]
            x, context = block(x, context, img_mod, txt_mod, rope, mask)
        seq = torch.cat([context, x], dim=1)
        for i, single in enumerate(self.single_transformer_blocks):
            if i in skip_single:
                continue
            seq = single(seq, mods[:, 3 * i : 3 * i + 3], rope, mask)
        x = seq[:, L:]
        shift, scale = _rows(mods[:, -2:])
        x = self.proj_out(modulate(x, shift, scale))
        return unpack_latents(x, H, W)


def is_chroma_config(config: Any) -> bool:
    """Whether a parsed ``transformer/config.json`` names ``ChromaTransformer2DModel``."""
    return isinstance(config, Mapping) and config.get("_class_name") == "ChromaTransformer2DModel"


__all__ = [
    "CHROMA1",
    "Approximator",
    "ChromaConfig",
    "ChromaTransformer",
    "approximator_input",
    "is_chroma_config",
]
