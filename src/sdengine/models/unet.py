"""One configurable U-Net: the pixel-space DDPM U-Net and Stable Diffusion's conditional U-Net.

Reading order: config, blocks (down, middle, up), the model, presets.

The network predicts noise (or v, or x0: the training target decides) from a noisy image ``x`` at timestep
``t`` (Ho et al. 2020), optionally conditioned on a class label (added to the timestep embedding) and on
text states (cross-attention, Rombach et al. 2022). Each resolution level has ``layers_per_block`` residual
blocks on the way down and one more on the way up; every down-side output is kept as a skip connection and
concatenated back on the way up. Attention at a level is either ``"self"`` (DDPM: spatial self-attention)
or ``"cross"`` (SD: a transformer with self- and cross-attention).

Parameter names are diffusers' (``UNet2DModel`` and ``UNet2DConditionModel``), so that their state dicts
load with ``load_state_dict(strict=True)``. Build big models without paying for random init with
``with torch.device("meta"): UNet(SD15)`` and then ``load_state_dict(sd, assign=True)``.

Speed notes (benchmarks/ddpm_train.py, FASHION_MNIST training on CPU): convolutions are about 75% of the
time. ``model.to(memory_format=torch.channels_last)`` with channels-last inputs gains a few percent here
(diffusers' UNet2DModel got slower with it); ``torch.autocast("cpu", torch.bfloat16)``
gave 1.6x on an AVX512-BF16 CPU; on a shared machine one torch thread beats two that wait for each other.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.attention import SpatialSelfAttention
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding
from sdengine.nn.fp8_storage import compute_dtype
from sdengine.nn.resnet import Downsample2D, ResnetBlock2D, TimeEmbeddingNorm, Upsample2D
from sdengine.nn.transformer import SpatialTransformer

AttentionKind = Literal["none", "self", "cross"]


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a U-Net. Per-level tuples are listed from the highest resolution down.

    ``attention[i]``: what follows each residual block at level i ("none", "self" or "cross"); the up
    path mirrors the down path. ``num_heads[i]``: attention heads at level i (the middle block uses the
    last one); the head size is channels / heads. Note that diffusers' SD configs call the number of heads
    ``attention_head_dim`` while its ``UNet2DModel`` means the head size by it: ``from_diffusers`` sorts it out.
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    attention: tuple[AttentionKind, ...] = ("cross", "cross", "cross", "none")
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    mid_block: bool = True
    mid_attention: AttentionKind = "cross"
    # cross-attention (Stable Diffusion)
    cross_attention_dim: int | None = 768
    use_linear_projection: bool = False
    # transformer blocks per attention: one number, or one per level (SDXL: 1, 2, 10); the middle block
    # uses the last level's
    transformer_layers_per_block: int | tuple[int, ...] = 1
    upcast_attention: bool = False
    # class conditioning, added to the timestep embedding: an embedding table of ``num_class_embeds``
    # labels, or (``projection_class_embeddings_input_dim``, diffusers' class_embed_type="projection") a
    # Linear-SiLU-Linear of a float vector per row, e.g. a pooled sentence embedding (Imagen's and
    # SDXL's "pooled text embedding added to the timestep embedding"). At most one of the two.
    num_class_embeds: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # SDXL's micro-conditioning (diffusers' addition_embed_type="text_time"): the vector that
    # ``projection_class_embeddings_input_dim`` describes is then pooled text + sinusoidal features of
    # addition_time_embed_dim per size/crop number (see sdengine.models.unet_sdxl), and its MLP is named
    # ``add_embedding`` (LDM: ``label_emb``) instead of ``class_embedding``.
    addition_time_embed_dim: int | None = None
    # details that real checkpoints vary
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    attn_norm_num_groups: int | None = None  # GroupNorm groups of a "self" middle attention (None: norm_num_groups)
    resnet_time_scale_shift: TimeEmbeddingNorm = "default"
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    time_embedding_dim: int | None = None  # None: 4 * block_out_channels[0]
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        check_config("unet", self)  # every number bounded before anything reads it
        n = len(self.block_out_channels)
        if len(self.attention) != n or len(self.num_heads) != n:
            raise ConfigError(
                f"attention ({len(self.attention)}) and num_heads ({len(self.num_heads)}) need one entry per level "
                f"of block_out_channels ({n})"
            )
        if self.num_class_embeds is not None and self.projection_class_embeddings_input_dim is not None:
            raise ConfigError("num_class_embeds and projection_class_embeddings_input_dim exclude each other")
        if self.addition_time_embed_dim is not None and self.projection_class_embeddings_input_dim is None:
            raise ConfigError("addition_time_embed_dim (text_time) needs projection_class_embeddings_input_dim")
        depth = self.transformer_layers_per_block
        if isinstance(depth, tuple) and len(depth) != n:
            raise ConfigError(f"transformer_layers_per_block needs one entry per level ({n}), got {len(depth)}")
        kinds = set(self.attention) | ({self.mid_attention} if self.mid_block else set())
        if not kinds <= {"none", "self", "cross"}:
            raise ConfigError(f"attention kinds must be 'none', 'self' or 'cross', got {sorted(kinds)}")
        if "cross" in kinds and self.cross_attention_dim is None:
            raise ConfigError("cross-attention levels need cross_attention_dim")
        for ch, kind, heads in zip(self.block_out_channels, self.attention, self.num_heads, strict=True):
            if ch % self.norm_num_groups:  # checked here so the error names the config, not a GroupNorm
                raise ConfigError(f"norm_num_groups={self.norm_num_groups} does not divide {ch} channels")
            if kind != "none" and (heads < 1 or ch % heads):
                raise ConfigError(f"{heads} heads do not divide {ch} channels")

    def depth_at(self, level: int) -> int:
        """Transformer blocks per attention at ``level`` (0 = highest resolution)."""
        d = self.transformer_layers_per_block
        return d[level] if isinstance(d, tuple) else d

    @property
    def text_time(self) -> bool:
        """SDXL-style added conditioning (an ``add_embedding`` of pooled text + size/crop features)."""
        return self.addition_time_embed_dim is not None

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def is_conditional(self) -> bool:
        """True for the cross-attention (text-conditioned) U-Net, diffusers' ``UNet2DConditionModel``."""
        return "cross" in self.attention or (self.mid_block and self.mid_attention == "cross")

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> UNetConfig:
        """Map a diffusers ``config.json`` (``UNet2DModel`` or ``UNet2DConditionModel``) to a UNetConfig.

        Options sdengine does not implement are refused, all named in one ValueError.
        """
        return _from_diffusers(cls, dict(config))

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` for this architecture (``_class_name`` says which model)."""
        return _to_diffusers(self)


# ----------------------------------------------------------------------------------------------------------
# Blocks


def _attention(
    kind: AttentionKind, channels: int, heads: int, cfg: UNetConfig, *, mid: bool = False, depth: int = 1
) -> nn.Module:
    if kind == "self":
        groups = (cfg.attn_norm_num_groups or cfg.norm_num_groups) if mid else cfg.norm_num_groups
        return SpatialSelfAttention(
            channels,
            heads,
            norm_groups=groups,
            eps=cfg.norm_eps,
            rescale_output_factor=cfg.mid_block_scale_factor if mid else 1.0,
        )
    return SpatialTransformer(
        channels,
        heads,
        cross_attention_dim=cfg.cross_attention_dim,
        num_layers=depth,
        norm_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
    )


def _resnet(in_ch: int, out_ch: int, cfg: UNetConfig, *, scale: float = 1.0) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_ch,
        out_ch,
        temb_channels=cfg.time_embed_dim,
        groups=cfg.norm_num_groups,
        eps=cfg.norm_eps,
        dropout=cfg.dropout,
        time_embedding_norm=cfg.resnet_time_scale_shift,
        output_scale_factor=scale,
    )


class DownBlock(nn.Module):
    """One resolution level on the way down: (resnet [+ attention]) x layers, then an optional downsample."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        attention: AttentionKind,
        heads: int,
        add_downsample: bool,
        cfg: UNetConfig,
        depth: int = 1,
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block
        self.resnets = nn.ModuleList(_resnet(in_ch if i == 0 else out_ch, out_ch, cfg) for i in range(n))
        self.attentions = None
        if attention != "none":
            self.attentions = nn.ModuleList(_attention(attention, out_ch, heads, cfg, depth=depth) for _ in range(n))
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=cfg.downsample_padding)])
        # Deep Shrink (sdengine.nn.deep_shrink.deep_shrink_applied sets it): None, or (j, resize, after_skip): this
        # block's j-th output (its layers' in order, then its downsample's) resized by ``resize`` after it is kept
        # as a skip (after_skip) or before
        self.shrink: tuple[int, Callable[[Tensor], Tensor], bool] | None = None
        # reference control's AdaIN (sdengine.nn.reference; set only inside reference_applied()): called as
        # reference_norm(i, x) on layer i's output, before it is kept as a skip
        self.reference_norm: Callable[[int, Tensor], Tensor] | None = None

    def forward(
        self, x: Tensor, temb: Tensor, context: Tensor | None, extra: Tensor | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """``extra``: a T2I-Adapter feature, added (skip included) after the last layer of an attention level,
        after the whole level (its downsample included) otherwise, as diffusers' U-Net adds it."""
        skips: list[Tensor] = []
        shrink = self.shrink
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)  # (B, out, H, W)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            if self.reference_norm is not None:
                x = self.reference_norm(i, x)
            if self.attentions is not None and extra is not None and i == len(self.resnets) - 1:
                x = _add_feature(x, extra)
            if shrink is not None and shrink[0] == i:
                x = _kept_shrunk(x, skips, shrink)
            else:
                skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, out, H/2, W/2)
            if shrink is not None and shrink[0] == len(self.resnets):
                x = _kept_shrunk(x, skips, shrink)
            else:
                skips.append(x)
        if extra is not None and self.attentions is None:
            x = _add_feature(x, extra)
            skips[-1] = x
        return x, skips


def _kept_shrunk(x: Tensor, skips: list[Tensor], shrink: tuple[int, Callable[[Tensor], Tensor], bool]) -> Tensor:
    """Deep Shrink at one output of a down block: ``x`` resized, kept as the skip before or after (``shrink[2]``)."""
    _, resize, after_skip = shrink
    if after_skip:
        skips.append(x)
        return resize(x)
    x = resize(x)
    skips.append(x)
    return x


def _add_feature(x: Tensor, feature: Tensor) -> Tensor:
    if feature.shape != x.shape:
        raise ValueError(
            f"T2I-Adapter feature of shape {tuple(feature.shape)} does not fit the U-Net's {tuple(x.shape)} "
            "(an adapter for another model family, or an image size the adapter cannot divide)"
        )
    return x + feature


class MidBlock(nn.Module):
    """The bottleneck: resnet, attention, resnet, at the lowest resolution."""

    def __init__(self, ch: int, *, attention: AttentionKind, heads: int, cfg: UNetConfig) -> None:
        super().__init__()
        scale = cfg.mid_block_scale_factor
        self.resnets = nn.ModuleList([_resnet(ch, ch, cfg, scale=scale), _resnet(ch, ch, cfg, scale=scale)])
        self.attentions = None
        if attention != "none":
            depth = cfg.depth_at(len(cfg.block_out_channels) - 1)
            self.attentions = nn.ModuleList([_attention(attention, ch, heads, cfg, mid=True, depth=depth)])
        # reference control's AdaIN (sdengine.nn.reference): reference_norm(-1, out) on the block's output
        self.reference_norm: Callable[[int, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor | None) -> Tensor:
        x = self.resnets[0](x, temb)
        if self.attentions is not None:
            x = self.attentions[0](x, context)
        x = self.resnets[1](x, temb)  # (B, C, H, W)
        return x if self.reference_norm is None else self.reference_norm(-1, x)


class UpBlock(nn.Module):
    """One resolution level on the way up: (concat skip -> resnet [+ attention]) x (layers + 1), upsample.

    ``skip_ch`` is the width of the skip that comes from one level deeper (the last one this block eats);
    ``prev_ch`` the width of the input coming from below.
    """

    def __init__(
        self,
        prev_ch: int,
        out_ch: int,
        skip_ch: int,
        *,
        attention: AttentionKind,
        heads: int,
        add_upsample: bool,
        cfg: UNetConfig,
        depth: int = 1,
    ) -> None:
        super().__init__()
        n = cfg.layers_per_block + 1
        resnets = []
        for i in range(n):
            res_in = prev_ch if i == 0 else out_ch
            res_skip = skip_ch if i == n - 1 else out_ch
            resnets.append(_resnet(res_in + res_skip, out_ch, cfg))
        self.resnets = nn.ModuleList(resnets)
        self.attentions = None
        if attention != "none":
            self.attentions = nn.ModuleList(_attention(attention, out_ch, heads, cfg, depth=depth) for _ in range(n))
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None
        # the hidden state's width at each skip concatenation, and what runs in place of the plain concatenation
        # there: None, or FreeU's (h, skip) -> (B, C + C_skip, H, W) (sdengine.nn.freeu.freeu_applied sets it)
        self.concat_widths = (prev_ch,) + (out_ch,) * (n - 1)
        self.freeu: Callable[[Tensor, Tensor], Tensor] | None = None
        # Deep Shrink (sdengine.nn.deep_shrink.deep_shrink_applied sets it): None, or (h, skip) -> h resized to the
        # skip's size where the two differ, before they are concatenated
        self.regrow: Callable[[Tensor, Tensor], Tensor] | None = None
        # reference control's AdaIN (sdengine.nn.reference; set only inside reference_applied()): called as
        # reference_norm(i, x) on layer i's output (the last layer's after the upsampler, as LDM's output blocks)
        self.reference_norm: Callable[[int, Tensor], Tensor] | None = None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor | None) -> Tensor:
        """Consumes its skips from the end of ``skips`` (the list is shortened in place)."""
        for i, resnet in enumerate(self.resnets):
            skip = skips.pop()
            if self.regrow is not None:
                x = self.regrow(x, skip)
            if self.freeu is None:
                x = torch.cat([x, skip], dim=1)  # (B, C + C_skip, H, W)
            else:
                x = self.freeu(x, skip)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            if self.reference_norm is not None and (self.upsamplers is None or i < len(self.resnets) - 1):
                x = self.reference_norm(i, x)
        if self.upsamplers is not None:
            # Match the next skip's size exactly, so odd sizes (e.g. 8*k+4 latents) still line up.
            target = tuple(skips[-1].shape[-2:])
            size = None if target == (2 * x.shape[-2], 2 * x.shape[-1]) else target
            x = self.upsamplers[0](x, size)
            if self.reference_norm is not None:
                x = self.reference_norm(len(self.resnets) - 1, x)
        return x


# ----------------------------------------------------------------------------------------------------------
# The model


def down_blocks(cfg: UNetConfig) -> nn.ModuleList:
    """The encoder half: one DownBlock per level, halving the size after every level but the last.
    The ControlNet builds its copy of the encoder with this same function."""
    chs = cfg.block_out_channels
    n = len(chs)
    return nn.ModuleList(
        DownBlock(
            chs[max(i - 1, 0)],
            chs[i],
            attention=cfg.attention[i],
            heads=cfg.num_heads[i],
            add_downsample=i < n - 1,
            cfg=cfg,
            depth=cfg.depth_at(i),
        )
        for i in range(n)
    )


def make_class_embedding(cfg: UNetConfig) -> nn.Module | None:
    """The class embedding a config asks for (``class_embedding`` in diffusers' names), or None."""
    if cfg.num_class_embeds is not None:
        return nn.Embedding(cfg.num_class_embeds, cfg.time_embed_dim)
    if cfg.projection_class_embeddings_input_dim is not None and not cfg.text_time:
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
    return None


def make_add_embedding(cfg: UNetConfig) -> nn.Module | None:
    """SDXL's ``add_embedding`` (of pooled text + size/crop features), or None."""
    if cfg.text_time and cfg.projection_class_embeddings_input_dim is not None:
        return TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)
    return None


def add_class_embedding(
    module: nn.Module | None, cfg: UNetConfig, emb: Tensor, class_labels: Tensor | None, what: str
) -> Tensor:
    """``emb`` (B, T) plus the class embedding of ``class_labels``: (B,) integer labels for a table,
    (B, projection_class_embeddings_input_dim) vectors for a projection."""
    if module is None:
        if class_labels is not None:
            raise ValueError(f"class_labels given to a {what} without class conditioning")
        return emb
    if class_labels is None:
        raise ValueError(f"this {what} is class-conditional: pass class_labels")
    labels = class_labels.to(emb.device)
    if cfg.projection_class_embeddings_input_dim is not None:
        d = cfg.projection_class_embeddings_input_dim
        if labels.ndim != 2 or labels.shape != (emb.shape[0], d):
            raise ValueError(
                f"class_labels of this {what} must be ({emb.shape[0]}, {d}) vectors, got {tuple(labels.shape)}"
            )
        return emb + module(labels.to(emb.dtype)).to(emb.dtype)
    return emb + module(labels.long()).to(emb.dtype)


def time_class_embedding(
    net: Any, cfg: UNetConfig, x: Tensor, t: Tensor | float | int, class_labels: Tensor | None, what: str
) -> Tensor:
    """The timestep (+ class) embedding (B, time_embed_dim) of a U-Net, or of a ControlNet (which computes it as
    its U-Net does, with its own copies of the layers): ``net``'s ``time_embedding`` of ``t`` (a scalar or a (B,)
    tensor, B the rows of ``x``), plus its ``add_embedding`` (text_time, SDXL) or ``class_embedding`` of
    ``class_labels`` (:func:`add_class_embedding`; ``what`` names ``net`` in its errors)."""
    B = x.shape[0]
    t = torch.as_tensor(t, device=x.device)
    if t.ndim == 0:
        t = t.expand(B)
    elif t.shape != (B,):
        raise ValueError(f"t must be a scalar or have shape ({B},), got {tuple(t.shape)}")
    feats = timestep_embedding(
        t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift
    )  # (B, C0) float32
    emb = net.time_embedding(feats.to(net.dtype))  # (B, T)
    module = net.add_embedding if cfg.text_time else net.class_embedding
    return add_class_embedding(module, cfg, emb, class_labels, what)


class UNet(nn.Module):
    """``unet(x, t, *, class_labels, encoder_hidden_states, <ControlNet residuals>) -> prediction``."""

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = cfg = config
        chs = cfg.block_out_channels
        n = len(chs)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim)
        self.class_embedding = make_class_embedding(cfg)
        add_embedding = make_add_embedding(cfg)
        if add_embedding is not None:  # registered only when present: diffusers' state dicts have no None slot
            self.add_embedding = add_embedding

        self.down_blocks = down_blocks(cfg)
        self.mid_block = None
        if cfg.mid_block:
            self.mid_block = MidBlock(chs[-1], attention=cfg.mid_attention, heads=cfg.num_heads[-1], cfg=cfg)
        # Up blocks go from the lowest resolution (level n-1) back to level 0.
        self.up_blocks = nn.ModuleList(
            UpBlock(
                chs[min(level + 1, n - 1)],
                chs[level],
                chs[max(level - 1, 0)],
                attention=cfg.attention[level],
                heads=cfg.num_heads[level],
                add_upsample=level > 0,
                cfg=cfg,
                depth=cfg.depth_at(level),
            )
            for level in reversed(range(n))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    @property
    def dtype(self) -> torch.dtype:
        return compute_dtype(self.conv_in)  # float8-stored weights compute in this dtype

    def embed(self, x: Tensor, t: Tensor | float | int, class_labels: Tensor | None = None) -> Tensor:
        """Timestep (+ class) embedding (B, time_embed_dim); ``t`` a scalar or a (B,) tensor.

        For a text_time (SDXL) U-Net ``class_labels`` is the (B, projection_class_embeddings_input_dim)
        vector of :func:`sdengine.models.unet_sdxl.text_time_vector` (sgm's "vector", LDM's ``label_emb``
        input)."""
        return time_class_embedding(self, self.config, x, t, class_labels, "U-Net")

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        *,
        class_labels: Tensor | None = None,
        encoder_hidden_states: Tensor | None = None,
        down_block_additional_residuals: Sequence[Tensor] | None = None,
        mid_block_additional_residual: Tensor | None = None,
        down_intrablock_additional_residuals: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """``down_intrablock_additional_residuals``: T2I-Adapter features, one per down block in order (see
        ``DownBlock.forward``), and one more, added after the middle block, where the adapter has it (SDXL)."""
        cfg = self.config
        if cfg.is_conditional and encoder_hidden_states is None:
            raise ValueError("this U-Net cross-attends to text: pass encoder_hidden_states (B, L, D)")
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        emb = self.embed(x, t, class_labels)  # (B, T)
        context = encoder_hidden_states  # (B, L, D) or None

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        features = list(down_intrablock_additional_residuals or ())
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context, features.pop(0) if features else None)
            skips.extend(block_skips)

        if down_block_additional_residuals is not None:  # ControlNet (Zhang et al. 2023): one per skip
            if len(down_block_additional_residuals) != len(skips):
                raise ValueError(
                    f"expected {len(skips)} down_block_additional_residuals, got {len(down_block_additional_residuals)}"
                )
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]

        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)
            if features and features[0].shape == h.shape:  # SDXL adapters: one after the middle block
                h = h + features.pop(0)
        if mid_block_additional_residual is not None:
            h = h + mid_block_additional_residual

        for block in self.up_blocks:
            h = block(h, skips, emb, context)

        h = F.silu(self.conv_norm_out(h))
        return self.conv_out(h)  # (B, out_channels, H, W)


# ----------------------------------------------------------------------------------------------------------
# diffusers config mapping (facts from diffusers 0.42: UNet2DModel / UNet2DConditionModel signatures)

_PIXEL_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
    "num_train_timesteps": None,
}
_CONDITIONAL_DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "only_cross_attention": False,
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Options that only change behaviour away from these values; anything else is refused by name.
_PIXEL_FIXED = {
    "time_embedding_type": ("positional",),
    "downsample_type": ("conv",),
    "upsample_type": ("conv",),
    "act_fn": ("silu", "swish"),
    "class_embed_type": (None,),
}
_CONDITIONAL_FIXED = {
    "act_fn": ("silu", "swish"),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "num_attention_heads": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None, "projection"),
    "addition_embed_type": (None, "text_time"),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0, 1),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}
_IGNORED = {
    "_class_name",
    "_diffusers_version",
    "_name_or_path",
    "_use_default_values",
    "num_train_timesteps",
    "addition_embed_type_num_heads",
}


def _uniform(name: str, value: Any, n: int, problems: list[str]) -> Any:
    """Collapse a per-level list to one value; sdengine keeps these the same at every level."""
    if isinstance(value, (list, tuple)):
        if len(set(map(str, value))) != 1 or len(value) != n:
            problems.append(f"{name}={list(value)} (per-level values are not supported)")
            return value[0]
        return value[0]
    return value


def _from_diffusers(cls: type[UNetConfig], config: dict[str, Any]) -> UNetConfig:
    check_config("unet", config)  # before any number is used: no allocation, loop or division on bad input
    name = config.get("_class_name")
    if name is None:
        conditional = "cross_attention_dim" in config or any(
            "CrossAttn" in b for b in config.get("down_block_types", ())
        )
    elif name in ("UNet2DModel", "UNet2DConditionModel"):
        conditional = name == "UNet2DConditionModel"
    else:
        raise ConfigError(f"not a U-Net config sdengine can build: _class_name={name!r}")
    defaults, fixed = (_CONDITIONAL_DEFAULTS, _CONDITIONAL_FIXED) if conditional else (_PIXEL_DEFAULTS, _PIXEL_FIXED)

    unknown = sorted(set(config) - set(defaults) - _IGNORED)
    if unknown:
        raise ConfigError(f"unknown U-Net config options: {', '.join(unknown)}")
    c = {**defaults, **config}
    problems = [f"{k}={c[k]!r}" for k, ok in fixed.items() if ok is not None and c[k] not in ok]

    chs = tuple(c["block_out_channels"])
    n = len(chs)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    down = [b[7:] if b.startswith("UNetRes") else b for b in down]
    up = [b[7:] if b.startswith("UNetRes") else b for b in up]
    attn_kind = "CrossAttn" if conditional else "Attn"
    level_kind: AttentionKind = "cross" if conditional else "self"
    down_kinds: dict[str, AttentionKind] = {"DownBlock2D": "none", f"{attn_kind}DownBlock2D": level_kind}
    up_kinds = {"UpBlock2D": "none", f"{attn_kind}UpBlock2D": "cross" if conditional else "self"}
    bad = [b for b in down if b not in down_kinds] + [b for b in up if b not in up_kinds]
    if bad:
        problems.append(f"block types {bad}")
    if len(down) != n or len(up) != n:
        raise ConfigError(f"{n} block_out_channels but {len(down)} down and {len(up)} up block types")
    attention = tuple(down_kinds.get(b, "none") for b in down)
    if tuple(up_kinds.get(b, "none") for b in reversed(up)) != attention:
        problems.append(f"up_block_types {up} that do not mirror down_block_types {down}")

    mid_type = c["mid_block_type"]
    if conditional:
        if mid_type not in ("UNetMidBlock2DCrossAttn", None):
            problems.append(f"mid_block_type={mid_type!r}")
        mid_attention: AttentionKind = "cross"
        if c["norm_num_groups"] is None:
            problems.append("norm_num_groups=None")
        only_cross = c["only_cross_attention"]
        if any(only_cross) if isinstance(only_cross, (list, tuple)) else only_cross:
            problems.append(f"only_cross_attention={only_cross!r}")
        heads_cfg = c["attention_head_dim"]  # diffusers' misnomer: the number of heads here
        heads = tuple(heads_cfg) if isinstance(heads_cfg, (list, tuple)) else (heads_cfg,) * n
        cross_dim = _uniform("cross_attention_dim", c["cross_attention_dim"], n, problems)
        layers = _uniform("layers_per_block", c["layers_per_block"], n, problems)
        t_layers = c["transformer_layers_per_block"]
        if isinstance(t_layers, (list, tuple)):  # one depth per level (SDXL); nested lists are not supported
            if len(t_layers) != n or not all(isinstance(d, int) for d in t_layers):
                problems.append(f"transformer_layers_per_block={t_layers!r}")
                t_layers = 1
            else:
                t_layers = tuple(t_layers) if len(set(t_layers)) > 1 else t_layers[0]
        attn_groups = None
    else:
        if mid_type not in ("UNetMidBlock2D", None):
            problems.append(f"mid_block_type={mid_type!r}")
        mid_attention = "self" if c["add_attention"] else "none"
        head_dim = c["attention_head_dim"]  # here it really is the head size; None: one head
        # Levels without attention get 1 (unused), so that configs compare equal after a round trip.
        used = [a != "none" for a in attention]
        used[-1] = used[-1] or (mid_type is not None and mid_attention != "none")
        heads = tuple(
            1 if head_dim is None or not u else max(ch // head_dim, 1) for ch, u in zip(chs, used, strict=True)
        )
        cross_dim, layers, t_layers = None, c["layers_per_block"], 1
        attn_groups = c["attn_norm_num_groups"]
        if mid_type and mid_attention == "self" and attn_groups is None and c["resnet_time_scale_shift"] != "default":
            problems.append("a middle attention without GroupNorm (resnet_time_scale_shift='scale_shift')")
    proj_dim = c.get("projection_class_embeddings_input_dim")
    text_time = conditional and c.get("addition_embed_type") == "text_time"
    if text_time and (c.get("class_embed_type") is not None or proj_dim is None or not c["addition_time_embed_dim"]):
        problems.append(
            "addition_embed_type='text_time' needs addition_time_embed_dim and projection_class_embeddings_input_dim "
            "and no class_embed_type"
        )
    elif not text_time and (c.get("class_embed_type") == "projection") != (proj_dim is not None):
        problems.append(
            f"class_embed_type={c.get('class_embed_type')!r} with projection_class_embeddings_input_dim={proj_dim!r}"
        )
    if c["resnet_time_scale_shift"] not in ("default", "scale_shift"):
        problems.append(f"resnet_time_scale_shift={c['resnet_time_scale_shift']!r}")
    if problems:
        raise ConfigError("U-Net config options not supported by sdengine: " + "; ".join(problems))

    sample_size = c["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return cls(
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        sample_size=sample_size if sample_size is not None else 64,
        block_out_channels=chs,
        layers_per_block=layers,
        attention=attention,
        num_heads=heads,
        mid_block=mid_type is not None,
        mid_attention=mid_attention,
        cross_attention_dim=cross_dim,
        use_linear_projection=bool(c.get("use_linear_projection", False)),
        transformer_layers_per_block=t_layers,
        upcast_attention=bool(c.get("upcast_attention", False)),
        num_class_embeds=c["num_class_embeds"],
        projection_class_embeddings_input_dim=proj_dim
        if c.get("class_embed_type") == "projection" or text_time
        else None,
        addition_time_embed_dim=c["addition_time_embed_dim"] if text_time else None,
        norm_num_groups=c["norm_num_groups"],
        norm_eps=c["norm_eps"],
        attn_norm_num_groups=attn_groups,
        resnet_time_scale_shift=c["resnet_time_scale_shift"],
        flip_sin_to_cos=c["flip_sin_to_cos"],
        freq_shift=c["freq_shift"],
        time_embedding_dim=c["time_embedding_dim"],
        downsample_padding=c["downsample_padding"],
        mid_block_scale_factor=float(c["mid_block_scale_factor"]),
        center_input_sample=c["center_input_sample"],
        dropout=c["dropout"],
    )


def _to_diffusers(cfg: UNetConfig) -> dict[str, Any]:
    n = len(cfg.block_out_channels)
    common: dict[str, Any] = {
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "center_input_sample": cfg.center_input_sample,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "block_out_channels": list(cfg.block_out_channels),
        "layers_per_block": cfg.layers_per_block,
        "downsample_padding": cfg.downsample_padding,
        "mid_block_scale_factor": cfg.mid_block_scale_factor,
        "dropout": cfg.dropout,
        "act_fn": "silu",
        "norm_num_groups": cfg.norm_num_groups,
        "norm_eps": cfg.norm_eps,
        "num_class_embeds": cfg.num_class_embeds,
        "resnet_time_scale_shift": cfg.resnet_time_scale_shift,
        "time_embedding_dim": cfg.time_embedding_dim,
    }
    if "self" in cfg.attention or (cfg.mid_block and cfg.mid_attention == "self"):
        if cfg.is_conditional:
            raise ValueError("diffusers has no U-Net mixing self-attention and cross-attention levels")
        levels = [i for i in range(n) if cfg.attention[i] == "self"]
        if cfg.mid_block and cfg.mid_attention == "self":
            levels.append(n - 1)
        sizes = {cfg.block_out_channels[i] // cfg.num_heads[i] for i in levels}
        one_head = all(cfg.num_heads[i] == 1 for i in levels)
        if len(sizes) != 1 and not one_head:
            raise ValueError(f"diffusers' UNet2DModel needs one head size at every level, got {sorted(sizes)}")
        head_dim = None if one_head else sizes.pop()
    else:
        head_dim = None
    if not cfg.is_conditional:
        if cfg.projection_class_embeddings_input_dim is not None:
            raise ValueError("diffusers' UNet2DModel has no projection class embedding")
        kind = {"none": "", "self": "Attn"}
        return {
            "_class_name": "UNet2DModel",
            **common,
            "down_block_types": [f"{kind[a]}DownBlock2D" for a in cfg.attention],
            "up_block_types": [f"{kind[a]}UpBlock2D" for a in reversed(cfg.attention)],
            "mid_block_type": "UNetMidBlock2D" if cfg.mid_block else None,
            "add_attention": cfg.mid_attention == "self",
            "attention_head_dim": head_dim,
            "attn_norm_num_groups": cfg.attn_norm_num_groups,
        }
    if cfg.mid_block and cfg.mid_attention != "cross":
        raise ValueError("diffusers' UNet2DConditionModel always cross-attends in its middle block")
    kind = {"none": "", "cross": "CrossAttn"}
    return {
        "_class_name": "UNet2DConditionModel",
        **common,
        "down_block_types": [f"{kind[a]}DownBlock2D" for a in cfg.attention],
        "up_block_types": [f"{kind[a]}UpBlock2D" for a in reversed(cfg.attention)],
        "mid_block_type": "UNetMidBlock2DCrossAttn" if cfg.mid_block else None,
        "attention_head_dim": list(cfg.num_heads),
        "cross_attention_dim": cfg.cross_attention_dim,
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "transformer_layers_per_block": (list(d) if isinstance(d := cfg.transformer_layers_per_block, tuple) else d),
        "class_embed_type": (
            "projection" if cfg.projection_class_embeddings_input_dim is not None and not cfg.text_time else None
        ),
        "projection_class_embeddings_input_dim": cfg.projection_class_embeddings_input_dim,
        "addition_embed_type": "text_time" if cfg.text_time else None,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
    }


# ----------------------------------------------------------------------------------------------------------
# Presets

# Class-conditional Fashion-MNIST DDPM: 32x32x1 (28x28 padded), 3.9M parameters, self-attention (4 heads of 32)
# at 8x8 and in the middle; 8 GroupNorm groups so the 32-wide first level is not normalised per channel.
# Labels 0..9 are the classes; label 10 is "no class", for classifier-free guidance (train with some labels
# replaced by 10, sample with guidance between label y and 10).
FASHION_MNIST = UNetConfig(
    in_channels=1,
    out_channels=1,
    sample_size=32,
    block_out_channels=(32, 64, 128),
    layers_per_block=2,
    attention=("none", "none", "self"),
    num_heads=(1, 1, 4),
    mid_attention="self",
    cross_attention_dim=None,
    num_class_embeds=11,
    norm_num_groups=8,
)

# Stable Diffusion 1.x (CompVis / runwayml v1-4, v1-5): 860M parameters.
SD15 = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=64,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    attention=("cross", "cross", "cross", "none"),
    num_heads=(8, 8, 8, 8),
    cross_attention_dim=768,
)
# The inpainting model takes [noisy latent (4), mask (1), masked-image latent (4)].
SD15_INPAINT = dataclasses.replace(SD15, in_channels=9)
# Stable Diffusion 2.x (768-v and 512-base use the same U-Net): OpenCLIP-H text states, 64-wide heads,
# linear projections in the transformers; upcast_attention as in stabilityai/stable-diffusion-2-1's config
# (attention in float32 under fp16, which overflows otherwise).
SD21 = dataclasses.replace(
    SD15,
    sample_size=96,
    num_heads=(5, 10, 20, 20),
    cross_attention_dim=1024,
    use_linear_projection=True,
    upcast_attention=True,
)

# Small configs for tests and quick experiments.
TINY_PIXEL = UNetConfig(
    in_channels=3,
    out_channels=3,
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention=("none", "self"),
    num_heads=(1, 4),
    mid_attention="self",
    cross_attention_dim=None,
    norm_num_groups=8,
)
TINY_SD = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    attention=("cross", "none"),
    num_heads=(2, 2),
    cross_attention_dim=32,
    norm_num_groups=8,
)
# SD1 topology at a fraction of the width: four levels, two layers each, every block type exercised.
MEDIUM_SD = dataclasses.replace(SD15, block_out_channels=(64, 128, 256, 256), cross_attention_dim=128, sample_size=32)

PRESETS: dict[str, UNetConfig] = {
    "fashion_mnist": FASHION_MNIST,
    "sd15": SD15,
    "sd15_inpaint": SD15_INPAINT,
    "sd21": SD21,
    "tiny_pixel": TINY_PIXEL,
    "tiny_sd": TINY_SD,
    "medium_sd": MEDIUM_SD,
}
