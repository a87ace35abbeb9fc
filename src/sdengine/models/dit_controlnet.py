"""ControlNets for the diffusion transformers: SD3 / SD3.5's MMDiT and Flux.1.

The idea is ControlNet's (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of the first part of the network sees the control image as well, and what it
computes is added to the locked network through zero-initialised layers, so training starts from "no effect".
On a transformer there is no encoder / decoder: the copy is a few transformer blocks, and its output after
block ``j`` goes through a zero-initialised Linear (``controlnet_blocks.j``) and is added to the image tokens
of the base transformer after some of its blocks (InstantX's SD3 and Flux ControlNets, Stability's SD3.5 ones,
Shakker-Labs' Flux Union; the layout of diffusers' ``SD3ControlNetModel`` / ``FluxControlNetModel``, whose
parameter names these modules keep, so a diffusers ControlNet folder loads with a strict ``load_state_dict``).

How the control image gets in: the pipeline encodes it with the base model's VAE (scaled as the denoised latent
is; see :mod:`sdengine.pipeline.dit_control`), and a zero-initialised projection of that latent
(``pos_embed_input``: a patch convolution for SD3; ``controlnet_x_embedder``: a Linear on Flux's packed 2x2
patches) is added to the copy's image tokens right after its own patch embedding.

Which base block gets which residual: with ``n`` base blocks and ``m`` residuals,

* SD3: base block ``i`` (all but the last, whose context stream is "pre only") gets residual
  ``int(i / (n / m))`` added to its image output (also when skip-layer guidance leaves the block out);
* Flux: double-stream block ``i`` gets ``controlnet_block_samples[i // ceil(n / m)]``, single-stream block
  ``i`` gets ``controlnet_single_block_samples[i // ceil(n_single / m_single)]`` on its image tokens.

The hooks are the ``block_controlnet_hidden_states`` argument of :meth:`sdengine.models.mmdit.MMDiT.forward`
and the ``controlnet_block_samples`` / ``controlnet_single_block_samples`` arguments of
:meth:`sdengine.models.flux.FluxTransformer.forward`.

Flux's *Union* ControlNets (``num_mode`` set) take one more input, the kind of control image (canny, tile,
depth, ...): an embedding of that number (``controlnet_mode_embedder``) is put in front of the text tokens
(with position id 0, like the text), so the copy knows what it is looking at.

SD3.5's own ControlNets (Stability, 8B) differ from InstantX's: no text stream (``joint_attention_dim`` None;
their blocks are plain DiT blocks over the image tokens), a pooled text vector of zeros when
``force_zeros_for_pooled_projection``, and no patch embedding of their own (``use_pos_embed`` false): they
borrow the base transformer's (:meth:`SD3ControlNet.share_patch_embed`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.models.flux import (
    PATCH,
    DoubleStreamBlock,
    FluxConfig,
    SingleStreamBlock,
    TimeTextEmbedding,
    pack_latents,
)
from sdengine.models.mmdit import (
    MLP,
    JointAttention,
    JointBlock,
    MMDiTConfig,
    Modulation,
    PatchEmbed,
    TimeTextEmbed,
    layer_norm,
    modulate,
)

# ----------------------------------------------------------------------------------------------------------
# SD3


def config_values(cls: Any, config: Any, class_name: str, what: str) -> dict[str, Any]:
    """A diffusers ControlNet ``config.json`` checked for ``cls`` (a config dataclass): a mapping of ``class_name``
    with no option sdengine does not implement; its known fields (a one-line ConfigError otherwise)."""
    if not isinstance(config, Mapping):
        raise ConfigError(f"{what} ControlNet config: must be a mapping, got {type(config).__name__}")
    name = config.get("_class_name", class_name)
    if name != class_name:
        raise ConfigError(f"{what} ControlNet config: _class_name is {name!r}, not {class_name!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in config if not str(k).startswith("_") and k not in known)
    if unknown:
        raise ConfigError(f"{what} ControlNet config: options sdengine does not implement: {', '.join(unknown)}")
    return {k: v for k, v in config.items() if k in known}


@dataclass(frozen=True)
class SD3ControlNetConfig:
    """Architecture of an SD3 ControlNet; diffusers' ``SD3ControlNetModel`` config names and defaults.

    The fields shared with :class:`MMDiTConfig` mean what they mean there (``num_layers``: the copy's blocks).
    ``extra_conditioning_channels``: channels of the control latent beyond the latent's (0 for the released ones);
    ``joint_attention_dim`` None: no text stream (SD3.5's ControlNets); ``pos_embed_type`` None: the copy's patch
    embedding adds no positions; ``use_pos_embed`` false: it has none and borrows the base model's;
    ``force_zeros_for_pooled_projection``: the copy reads a pooled text vector of zeros (InstantX's and SD3.5's)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int | None = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    extra_conditioning_channels: int = 0
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None
    pos_embed_type: str | None = "sincos"
    use_pos_embed: bool = True
    force_zeros_for_pooled_projection: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.dual_attention_layers, list):
            object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.pos_embed_type not in (None, "sincos"):
            raise ConfigError(f"SD3 ControlNet config: pos_embed_type={self.pos_embed_type!r} (None or 'sincos')")
        for name in ("use_pos_embed", "force_zeros_for_pooled_projection"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"SD3 ControlNet config: {name}={getattr(self, name)!r} is not true/false")
        if type(self.extra_conditioning_channels) is not int or not 0 <= self.extra_conditioning_channels <= 64:
            raise ConfigError(
                f"SD3 ControlNet config: extra_conditioning_channels={self.extra_conditioning_channels!r} "
                "is not a small count"
            )
        self.base()  # the shared fields' own checks

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def base(self) -> MMDiTConfig:
        """The MMDiT config of the copy's blocks (a text width of 1 stands in where there is no text stream)."""
        names = {f.name for f in dataclasses.fields(MMDiTConfig)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in names}
        if values["joint_attention_dim"] is None:  # no text stream: its widths are not used
            values["joint_attention_dim"] = 1
            values["caption_projection_dim"] = self.inner_dim
        if values["pos_embed_max_size"] is None:
            if self.use_pos_embed and self.pos_embed_type == "sincos":
                raise ConfigError("SD3 ControlNet config: sin-cos positions need pos_embed_max_size")
            values["pos_embed_max_size"] = max(self.sample_size // self.patch_size, 1)  # not used: no table
        values["dual_attention_layers"] = tuple(values["dual_attention_layers"])
        return MMDiTConfig(**values)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> SD3ControlNetConfig:
        """A diffusers ``config.json`` of an ``SD3ControlNetModel``; unknown keys are refused in one line."""
        values = config_values(cls, config, "SD3ControlNetModel", "SD3")
        if values.get("dual_attention_layers") is None:
            values.pop("dual_attention_layers", None)
        if values.get("out_channels", 0) is None:
            values["out_channels"] = values.get("in_channels", cls.in_channels)
        check_config("mmdit", {k: v for k, v in values.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"SD3 ControlNet config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "SD3ControlNetModel"}
        out.update(dataclasses.asdict(self))
        out["dual_attention_layers"] = list(self.dual_attention_layers)
        return out


class PlainPatchEmbed(nn.Module):
    """p x p patches -> tokens by a strided convolution (``proj``), no positions (diffusers' ``PatchEmbed`` with
    ``pos_embed_type=None``): the control latent's input projection and SD3.5 ControlNets' patch embedding."""

    def __init__(self, in_channels: int, dim: int, patch: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, h*w, D), row-major


class ImageBlock(nn.Module):
    """A DiT block over the image tokens alone (diffusers' ``SD3SingleTransformerBlock``; SD3.5's ControlNets):
    adaLN-Zero with six vectors, self-attention, the 4x GELU(tanh) MLP."""

    def __init__(self, cfg: MMDiTConfig) -> None:
        super().__init__()
        d = cfg.inner_dim
        self.norm1 = Modulation(d, 6)
        self.attn = JointAttention(
            d, cfg.num_attention_heads, cfg.attention_head_dim, context=False, context_out=False, qk_norm=False
        )
        self.ff = MLP(d)

    def forward(self, x: Tensor, silu_c: Tensor) -> Tensor:
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(silu_c)
        x = x + gate * self.attn(modulate(layer_norm(x), shift, scale))[0]
        return x + gate_mlp * self.ff(modulate(layer_norm(x), shift_mlp, scale_mlp))


class SD3ControlNet(nn.Module):
    """An SD3 / SD3.5 ControlNet: ``forward(latent, control_latent, timestep, context, pooled)`` -> the residuals
    for :meth:`sdengine.models.mmdit.MMDiT.forward`'s ``block_controlnet_hidden_states`` (one per copied block)."""

    family = "sd3"

    def __init__(self, config: SD3ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.name = ""  # the file it came from (set by the loader)
        base = config.base()
        d, p = config.inner_dim, config.patch_size
        self.pos_embed: nn.Module | None = None
        if config.use_pos_embed:
            self.pos_embed = (
                PatchEmbed(base) if config.pos_embed_type == "sincos" else PlainPatchEmbed(config.in_channels, d, p)
            )
        self._shared: list[nn.Module] = []  # the base model's patch embedding where use_pos_embed is false
        self.time_text_embed = TimeTextEmbed(d, config.pooled_projection_dim)
        self.context_embedder: nn.Linear | None = None
        blocks: list[nn.Module]
        if config.joint_attention_dim is not None:
            self.context_embedder = nn.Linear(config.joint_attention_dim, config.caption_projection_dim)
            blocks = [
                JointBlock(base, pre_only=False, dual=i in config.dual_attention_layers)
                for i in range(config.num_layers)
            ]
        else:
            blocks = [ImageBlock(base) for _ in range(config.num_layers)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(config.num_layers))
        self.pos_embed_input = PlainPatchEmbed(config.in_channels + config.extra_conditioning_channels, d, p)

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed_input.proj.weight.dtype

    def share_patch_embed(self, transformer: nn.Module) -> None:
        """Use ``transformer``'s patch embedding (SD3.5's ControlNets have none of their own, ``use_pos_embed``
        false; diffusers' pipeline copies the base model's in). Not a submodule: not in this state dict."""
        if self.config.use_pos_embed:
            return
        embed = getattr(transformer, "pos_embed", None)
        if not isinstance(embed, PatchEmbed):
            raise UsageError("this SD3 ControlNet borrows the base MMDiT's patch embedding: attach it to an MMDiT")
        self._shared = [embed]

    def forward(
        self,
        hidden_states: Tensor,
        controlnet_cond: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor | None,
        pooled_projections: Tensor,
        conditioning_scale: float = 1.0,
    ) -> list[Tensor]:
        """Latents (B, C, H, W), the control latent (B, C + extra, H, W), ``timestep`` (B,) on 0..1000, text states
        (B, L, joint_attention_dim) (None without a text stream), pooled text (B, pooled) -> ``num_layers``
        residuals (B, h*w, D), each times ``conditioning_scale``."""
        cfg = self.config
        dtype = self.dtype
        embed = self.pos_embed if self.pos_embed is not None else (self._shared[0] if self._shared else None)
        if embed is None:
            raise UsageError("this SD3 ControlNet has no patch embedding: share_patch_embed(the base MMDiT) first")
        want = cfg.in_channels + cfg.extra_conditioning_channels
        if controlnet_cond.ndim != 4 or controlnet_cond.shape[1] != want:
            raise UsageError(
                f"SD3 ControlNet: control latent (B, {want}, H, W) expected, got {tuple(controlnet_cond.shape)}"
            )
        x = embed(hidden_states.to(dtype)).to(dtype)
        t = torch.as_tensor(timestep, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        c = self.time_text_embed(t, pooled_projections.to(dtype))
        silu_c = F.silu(c)
        x = x + self.pos_embed_input(controlnet_cond.to(dtype))
        outs: list[Tensor] = []
        if self.context_embedder is not None:
            if encoder_hidden_states is None:
                raise UsageError("SD3 ControlNet: this ControlNet reads the text states (encoder_hidden_states)")
            context = self.context_embedder(encoder_hidden_states.to(dtype))
            for block in self.transformer_blocks:
                x, context = block(x, context, silu_c)
                outs.append(x)
        else:
            for block in self.transformer_blocks:
                x = block(x, silu_c)
                outs.append(x)
        return [proj(h) * conditioning_scale for h, proj in zip(outs, self.controlnet_blocks, strict=True)]


# ----------------------------------------------------------------------------------------------------------
# Flux


@dataclass(frozen=True)
class FluxControlNetConfig:
    """Architecture of a Flux ControlNet; diffusers' ``FluxControlNetModel`` config names and defaults.
    ``num_layers`` / ``num_single_layers``: the copy's double- and single-stream blocks (InstantX's: 5 and 10);
    ``num_mode``: a Union ControlNet's number of control kinds (None: not a Union);
    ``conditioning_embedding_channels``: a pixel-space hint encoder (not supported; None in the released ones)."""

    patch_size: int = 1
    in_channels: int = 64
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    num_mode: int | None = None
    conditioning_embedding_channels: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if self.num_mode is not None and (type(self.num_mode) is not int or not 1 <= self.num_mode <= 1024):
            raise ConfigError(f"Flux ControlNet config: num_mode={self.num_mode!r} is not a count of control modes")
        if self.conditioning_embedding_channels is not None:
            raise ConfigError(
                "Flux ControlNet config: conditioning_embedding_channels (a pixel-space hint encoder) is not "
                "supported; sdengine reads ControlNets that take the VAE-encoded control image"
            )
        self.base()

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def base(self) -> FluxConfig:
        names = {f.name for f in dataclasses.fields(FluxConfig)}
        return FluxConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> FluxControlNetConfig:
        """A diffusers ``config.json`` of a ``FluxControlNetModel``; unknown keys are refused in one line."""
        values = config_values(cls, config, "FluxControlNetModel", "Flux")
        check_config("flux", {k: v for k, v in values.items() if v is not None})
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"Flux ControlNet config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "FluxControlNetModel"}
        out.update(dataclasses.asdict(self))
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


class FluxControlNet(nn.Module):
    """A Flux ControlNet (InstantX, Shakker-Labs Union): ``forward(latent, control_latent, timestep, text, pooled,
    guidance, mode)`` -> (double-block residuals, single-block residuals) for
    :meth:`sdengine.models.flux.FluxTransformer.forward`."""

    family = "flux"

    def __init__(self, config: FluxControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.name = ""  # the file it came from (set by the loader)
        base = config.base()
        dim, heads, hd = base.hidden_size, base.num_attention_heads, base.attention_head_dim
        self.time_text_embed = TimeTextEmbedding(dim, base.pooled_projection_dim, base.guidance_embeds)
        self.context_embedder = nn.Linear(base.joint_attention_dim, dim)
        self.x_embedder = nn.Linear(base.in_channels, dim)
        self.transformer_blocks = nn.ModuleList(DoubleStreamBlock(dim, heads, hd) for _ in range(config.num_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleStreamBlock(dim, heads, hd) for _ in range(config.num_single_layers)
        )
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_layers))
        self.controlnet_single_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_single_layers))
        self.controlnet_mode_embedder = nn.Embedding(config.num_mode, dim) if config.num_mode is not None else None
        self.controlnet_x_embedder = nn.Linear(base.in_channels, dim)
        self._rope: Any = None  # a FluxTransformer's cached tables are not shared: this one keeps its own

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.weight.dtype

    @property
    def union(self) -> bool:
        return self.controlnet_mode_embedder is not None

    def forward(
        self,
        hidden_states: Tensor,
        controlnet_cond: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        guidance: Tensor | None = None,
        controlnet_mode: Tensor | None = None,
        conditioning_scale: float = 1.0,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """Latents (B, C, H, W) and the control latent of the same shape (both unpacked), ``timestep`` (B,) on
        0..1000, T5 states (B, L, 4096), pooled CLIP (B, 768), the guidance scale (B,) for a guidance-embedding
        ControlNet, the control mode (B,) integer ids for a Union one -> the residuals of the double and single
        blocks (B, N, dim), each times ``conditioning_scale``."""
        from sdengine.models.flux import image_ids, rope_angles

        cfg = self.config
        dtype = self.dtype
        if controlnet_cond.shape != hidden_states.shape:
            raise UsageError(
                f"Flux ControlNet: control latent {tuple(controlnet_cond.shape)} is not the latent's shape "
                f"{tuple(hidden_states.shape)}"
            )
        B, _, H, W = hidden_states.shape
        if H % PATCH or W % PATCH:
            raise UsageError(f"Flux ControlNet: latent sides must be even, got {H}x{W}")
        x = self.x_embedder(pack_latents(hidden_states.to(dtype)))
        x = x + self.controlnet_x_embedder(pack_latents(controlnet_cond.to(dtype)))
        t = torch.as_tensor(timestep, device=x.device).float()
        t = t.expand(B) if t.ndim == 0 else t
        g = None
        if cfg.guidance_embeds:
            if guidance is None:
                raise UsageError("Flux ControlNet: this ControlNet takes the guidance scale (guidance)")
            g = torch.as_tensor(guidance, device=x.device).float()
            g = g.expand(B) if g.ndim == 0 else g
        vec = self.time_text_embed(t, g, pooled_projections.to(dtype))
        context = self.context_embedder(encoder_hidden_states.to(dtype))
        if self.controlnet_mode_embedder is not None:
            if controlnet_mode is None:
                raise UsageError("Flux ControlNet: a Union ControlNet needs its control mode (controlnet_mode)")
            mode = torch.as_tensor(controlnet_mode, device=x.device).long().reshape(-1)
            mode = mode.expand(B) if mode.numel() == 1 else mode
            n = self.controlnet_mode_embedder.num_embeddings
            if mode.shape != (B,) or bool(((mode < 0) | (mode >= n)).any()):
                raise UsageError(f"Flux ControlNet: control mode must be one id in 0..{n - 1} per row")
            context = torch.cat([self.controlnet_mode_embedder(mode)[:, None], context], dim=1)
        L = context.shape[1]
        key = (L, H // PATCH, W // PATCH, x.device)
        if self._rope is None or self._rope[0] != key:
            ids = torch.cat([torch.zeros(L, 3), image_ids(H // PATCH, W // PATCH)])
            self._rope = (key, rope_angles(ids.to(x.device), cfg.axes_dims_rope))
        rope = self._rope[1]
        doubles: list[Tensor] = []
        for block in self.transformer_blocks:
            x, context = block(x, context, vec, rope)
            doubles.append(x)
        seq = torch.cat([context, x], dim=1)
        singles: list[Tensor] = []
        for block in self.single_transformer_blocks:
            seq = block(seq, vec, rope)
            singles.append(seq[:, L:])
        d = [proj(h) * conditioning_scale for h, proj in zip(doubles, self.controlnet_blocks, strict=True)]
        s = [proj(h) * conditioning_scale for h, proj in zip(singles, self.controlnet_single_blocks, strict=True)]
        return d, s


def residual_index(block: int, blocks: int, residuals: int, *, rule: str) -> int:
    """Which of ``residuals`` residuals base block ``block`` of ``blocks`` takes: SD3's ``int(i / (n / m))``
    (``rule="sd3"``) or Flux's ``i // ceil(n / m)`` (``rule="flux"``)."""
    if rule == "sd3":
        return int(block / (blocks / residuals))
    return block // math.ceil(blocks / residuals)


__all__ = [
    "FluxControlNet",
    "FluxControlNetConfig",
    "ImageBlock",
    "PlainPatchEmbed",
    "SD3ControlNet",
    "SD3ControlNetConfig",
    "residual_index",
]
