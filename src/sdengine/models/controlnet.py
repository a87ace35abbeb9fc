"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

Reading order: config, the hint encoder, the model.

A ControlNet is a trainable copy of a U-Net's encoder (``conv_in``, time embedding, down blocks and
middle block) that also sees a control image (edges, depth, a pose drawing). A small convolutional hint
encoder brings that image down to the latent resolution and adds it to the copy's first feature map.
Every feature map the copy produces where the U-Net keeps a skip connection, and the middle block's
output, goes through a zero-initialised 1x1 convolution; the results are added to the U-Net's skips and
middle output (``down_block_additional_residuals`` / ``mid_block_additional_residual``). The zero
convolutions are why training starts from "no effect": the locked U-Net's output is unchanged until
they learn something (paper, section 3.1).

Parameter names are diffusers' ``ControlNetModel`` (``controlnet_cond_embedding``,
``controlnet_down_blocks``, ``controlnet_mid_block``), so its ``diffusion_pytorch_model.safetensors``
loads with ``load_state_dict(strict=True)``; original ``control_model.*`` files are renamed by
``sdengine.weights.controlnet_keys``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError, check_config
from sdengine.models.unet import (
    SD15,
    SD21,
    MidBlock,
    UNet,
    UNetConfig,
    down_blocks,
    make_add_embedding,
    make_class_embedding,
    time_class_embedding,
)
from sdengine.nn.embeddings import TimestepEmbedding

ChannelOrder = Literal["rgb", "bgr"]

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net encoder it copies (``unet``; only its down/middle parts are built) plus the hint encoder.

    ``conditioning_embedding_out_channels``: widths of the hint encoder's levels; each level after the
    first halves the resolution, so 4 levels turn a 512x512 image into 64x64 features (the factor 8 of
    the SD VAE). ``global_pool_conditions``: the "shuffle" ControlNets average their residuals over
    space (and imply guess mode in diffusers).
    """

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False
    channel_order: ChannelOrder = "rgb"

    def __post_init__(self) -> None:
        check_config("controlnet", self)  # its own numbers; the U-Net config checked itself
        if not self.unet.is_conditional:
            raise ConfigError("a ControlNet copies a text-conditioned (cross-attention) U-Net")
        if self.channel_order not in ("rgb", "bgr"):
            raise ConfigError(f"channel_order must be 'rgb' or 'bgr', got {self.channel_order!r}")
        if len(self.conditioning_embedding_out_channels) < 1:
            raise ConfigError("conditioning_embedding_out_channels needs at least one level")

    @property
    def downscale(self) -> int:
        """How much smaller the hint encoder's output is than the control image."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ControlNetConfig:
        """A diffusers ``ControlNetModel`` ``config.json`` -> ControlNetConfig (unsupported options named)."""
        return _from_diffusers(dict(config))

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``ControlNetModel`` ``config.json`` for this architecture."""
        return _to_diffusers(self)

    @classmethod
    def from_unet(
        cls,
        unet: UNetConfig,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
    ) -> ControlNetConfig:
        # The ControlNet always takes the 4-channel latent, even next to a 9-channel inpainting U-Net
        # (diffusers feeds it the latent before the mask and masked image are concatenated).
        # sample_size and dropout are not ControlNet options (diffusers' ControlNetModel has neither).
        base = dataclasses.replace(
            unet,
            in_channels=min(unet.in_channels, 4),
            out_channels=4,
            dropout=0.0,
            sample_size=UNetConfig.sample_size,
        )
        return cls(
            base,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=tuple(conditioning_embedding_out_channels),
        )


# ----------------------------------------------------------------------------------------------------------
# Hint encoder


class ControlNetConditioningEmbedding(nn.Module):
    """Control image (B, 3, H, W) in [0, 1] -> features (B, C0, H/8, W/8) added to the copy's conv_in.

    conv_in, then per level a same-size conv and a stride-2 conv, each followed by SiLU, then a
    zero-initialised conv_out (the paper's E(.), section 3.2).
    """

    def __init__(self, out_channels: int, in_channels: int = 3, channels: tuple[int, ...] = (16, 32, 96, 256)):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            blocks.append(nn.Conv2d(c_in, c_in, 3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, 3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = _zero(nn.Conv2d(channels[-1], out_channels, 3, padding=1))

    def forward(self, cond: Tensor) -> Tensor:
        h = F.silu(self.conv_in(cond))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)  # (B, C0, H/8, W/8)


def _zero(module: nn.Conv2d) -> nn.Conv2d:
    nn.init.zeros_(module.weight)
    if module.bias is not None:
        nn.init.zeros_(module.bias)
    return module


# ----------------------------------------------------------------------------------------------------------
# The model


class ControlNet(nn.Module):
    """``controlnet(x, t, cond_image, *, encoder_hidden_states, scale) -> (down residuals, mid residual)``."""

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        ucfg = config.unet
        chs = ucfg.block_out_channels
        n = len(chs)
        self.conv_in = nn.Conv2d(ucfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], ucfg.time_embed_dim)
        self.class_embedding = make_class_embedding(ucfg)
        add_embedding = make_add_embedding(ucfg)  # SDXL's added conditioning, as in the U-Net
        if add_embedding is not None:
            self.add_embedding = add_embedding
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(
            chs[0], config.conditioning_channels, config.conditioning_embedding_out_channels
        )
        self.down_blocks = down_blocks(ucfg)  # the U-Net's encoder, same names, same shapes
        # One zero conv per U-Net skip connection: conv_in's output, each resnet(+attention) output and
        # each downsampler output, in the order the U-Net stacks them.
        zero_convs = [_zero(nn.Conv2d(chs[0], chs[0], 1))]
        for i, ch in enumerate(chs):
            zero_convs += [_zero(nn.Conv2d(ch, ch, 1)) for _ in range(ucfg.layers_per_block)]
            if i < n - 1:
                zero_convs.append(_zero(nn.Conv2d(ch, ch, 1)))
        self.controlnet_down_blocks = nn.ModuleList(zero_convs)
        self.mid_block = None
        if ucfg.mid_block:
            self.mid_block = MidBlock(chs[-1], attention=ucfg.mid_attention, heads=ucfg.num_heads[-1], cfg=ucfg)
        self.controlnet_mid_block = _zero(nn.Conv2d(chs[-1], chs[-1], 1))

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def num_residuals(self) -> int:
        return len(self.controlnet_down_blocks)

    @classmethod
    def from_unet(
        cls,
        unet: UNet,
        *,
        conditioning_channels: int = 3,
        conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256),
        load_weights: bool = True,
    ) -> ControlNet:
        """A ControlNet whose encoder starts as a copy of ``unet``'s (diffusers' ``from_unet``); the hint
        encoder is randomly initialised except its zero conv_out, and every zero conv is zero."""
        cfg = ControlNetConfig.from_unet(
            unet.config,
            conditioning_channels=conditioning_channels,
            conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        )
        net = cls(cfg).to(device=unet.conv_in.weight.device, dtype=unet.dtype)
        if load_weights:
            if unet.config.in_channels != cfg.unet.in_channels:
                # Inpainting U-Net: keep the weights of the 4 latent channels only.
                keep = cfg.unet.in_channels
                net.conv_in.load_state_dict({"weight": unet.conv_in.weight[:, :keep], "bias": unet.conv_in.bias})
            else:
                net.conv_in.load_state_dict(unet.conv_in.state_dict())
            net.time_embedding.load_state_dict(unet.time_embedding.state_dict())
            if net.class_embedding is not None and unet.class_embedding is not None:
                net.class_embedding.load_state_dict(unet.class_embedding.state_dict())
            if hasattr(net, "add_embedding") and hasattr(unet, "add_embedding"):
                net.add_embedding.load_state_dict(unet.add_embedding.state_dict())
            net.down_blocks.load_state_dict(unet.down_blocks.state_dict())
            if net.mid_block is not None and unet.mid_block is not None:
                net.mid_block.load_state_dict(unet.mid_block.state_dict())
        return net

    def embed(self, x: Tensor, t: Tensor | float | int, class_labels: Tensor | None = None) -> Tensor:
        """Timestep (+ class) embedding (B, time_embed_dim), as the U-Net computes it."""
        return time_class_embedding(self, self.config.unet, x, t, class_labels, "ControlNet")

    def forward(
        self,
        x: Tensor,
        t: Tensor | float | int,
        cond_image: Tensor,
        *,
        encoder_hidden_states: Tensor,
        scale: float = 1.0,
        guess_mode: bool = False,
        class_labels: Tensor | None = None,
    ) -> tuple[list[Tensor], Tensor]:
        """Residuals for the U-Net's skips (a list, highest resolution first) and middle block.

        ``cond_image``: (B, C, 8h, 8w) in [0, 1] for an (B, 4, h, w) latent ``x``. ``scale`` multiplies
        every residual; in guess mode they are also scaled by 0.1 ... 1.0 (logarithmically) from the
        highest resolution to the middle block, as the original implementation's "soft" control.
        """
        cfg = self.config
        if cfg.channel_order == "bgr":
            cond_image = cond_image.flip(1)
        emb = self.embed(x, t, class_labels)
        context = encoder_hidden_states

        h = self.conv_in(x) + self.controlnet_cond_embedding(cond_image.to(self.dtype))  # (B, C0, h, w)
        skips = [h]
        for block in self.down_blocks:
            h, block_skips = block(h, emb, context)
            skips.extend(block_skips)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, context)

        down = [conv(s) for conv, s in zip(self.controlnet_down_blocks, skips, strict=True)]
        mid = self.controlnet_mid_block(h)

        if guess_mode and not cfg.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=x.device) * scale  # 0.1 .. 1.0
            down = [d * s for d, s in zip(down, scales, strict=False)]
            mid = mid * scales[-1]
        else:
            down = [d * scale for d in down]
            mid = mid * scale
        if cfg.global_pool_conditions:
            down = [d.mean(dim=(2, 3), keepdim=True) for d in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


# ----------------------------------------------------------------------------------------------------------
# diffusers config mapping (facts from diffusers 0.42 ControlNetModel.__init__)

_CONTROLNET_ONLY = {
    "conditioning_channels": 3,
    "controlnet_conditioning_channel_order": "rgb",
    "conditioning_embedding_out_channels": (16, 32, 96, 256),
    "global_pool_conditions": False,
}
_CONTROLNET_KEYS = {
    "in_channels",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "only_cross_attention",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "transformer_layers_per_block",
    "encoder_hid_dim",
    "encoder_hid_dim_type",
    "attention_head_dim",
    "num_attention_heads",
    "use_linear_projection",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "num_class_embeds",
    "upcast_attention",
    "resnet_time_scale_shift",
    "projection_class_embeddings_input_dim",
    "addition_embed_type_num_heads",
    *_CONTROLNET_ONLY,
}
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "sample_size"}
# ControlNetModel's own defaults where they differ from UNet2DConditionModel's (none today, kept explicit).
_UNET_DEFAULTS_FOR_CONTROLNET: dict[str, Any] = {"mid_block_type": "UNetMidBlock2DCrossAttn"}


def _from_diffusers(config: dict[str, Any]) -> ControlNetConfig:
    check_config("controlnet", config)  # before any number is used
    name = config.get("_class_name")
    if name not in (None, "ControlNetModel"):
        raise ConfigError(f"not a ControlNet config sdengine can build: _class_name={name!r}")
    unknown = sorted(set(config) - _CONTROLNET_KEYS - _IGNORED)
    if unknown:
        raise ConfigError(f"unknown ControlNet config options: {', '.join(unknown)}")
    own = {k: config.pop(k, v) for k, v in _CONTROLNET_ONLY.items()}
    unet_cfg = {k: v for k, v in config.items() if k not in _IGNORED}
    unet_cfg = {**_UNET_DEFAULTS_FOR_CONTROLNET, **unet_cfg}
    down = list(unet_cfg.get("down_block_types", UNetConfig().to_diffusers()["down_block_types"]))
    # The U-Net mapping wants an up path; a ControlNet has none, so give it the mirror of the down path.
    unet_cfg["down_block_types"] = down
    unet_cfg["up_block_types"] = [b.replace("Down", "Up") for b in reversed(down)]
    unet_cfg["_class_name"] = "UNet2DConditionModel"
    try:
        ucfg = UNetConfig.from_diffusers(unet_cfg)
    except ValueError as e:
        raise ConfigError(str(e).replace("U-Net config", "ControlNet config")) from None
    emb = own["conditioning_embedding_out_channels"]
    if emb is None:
        raise ConfigError(
            "ControlNet config options not supported by sdengine: conditioning_embedding_out_channels=None"
        )
    order = own["controlnet_conditioning_channel_order"]
    if order not in ("rgb", "bgr"):
        raise ConfigError(f"ControlNet config options not supported by sdengine: channel order {order!r}")
    return ControlNetConfig(
        unet=ucfg,
        conditioning_channels=int(own["conditioning_channels"]),
        conditioning_embedding_out_channels=tuple(int(c) for c in emb),
        global_pool_conditions=bool(own["global_pool_conditions"]),
        channel_order=order,
    )


def _to_diffusers(cfg: ControlNetConfig) -> dict[str, Any]:
    u = cfg.unet.to_diffusers()
    out = {k: v for k, v in u.items() if k in _CONTROLNET_KEYS}
    out["_class_name"] = "ControlNetModel"
    out["conditioning_channels"] = cfg.conditioning_channels
    out["controlnet_conditioning_channel_order"] = cfg.channel_order
    out["conditioning_embedding_out_channels"] = list(cfg.conditioning_embedding_out_channels)
    out["global_pool_conditions"] = cfg.global_pool_conditions
    return out


# ----------------------------------------------------------------------------------------------------------
# Presets: the ControlNets of the SD 1.5 and SD 2.1 families (lllyasviel/control_v11*, thibaud/controlnet-sd21).

SD15_CONTROLNET = ControlNetConfig.from_unet(SD15)
SD21_CONTROLNET = ControlNetConfig.from_unet(SD21)
