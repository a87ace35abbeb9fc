"""A tiny distilled autoencoder for the diffusion model's latents (TAESD's architecture, diffusers'
``AutoencoderTiny``): a few ReLU residual blocks of 64 channels per level, no attention, no normalisation.

Reading order: config, the block, decoder, encoder, the model.

It works on the latents the diffusion model samples (already ``scaling_factor``-scaled; TAESD was trained on
them), so no scaling or shift is applied around it. The decoder is much cheaper than SD's VAE decoder (a 512x512
image on 2 CPU cores: 1.3 s vs 16 s, ``sdengine bench --decoders``) and draws a close, slightly softer picture:
what live previews need, and a fast final decode where that is good enough. Outputs are in [-1, 1] like the full
VAE's, inputs of ``encode`` too.

Parameter names are diffusers' (``decoder.layers.N...``); :func:`sdengine.weights.tiny_vae_file.load_tiny_vae`
also reads the original TAESD files (``taesd_decoder.safetensors`` / ``.pth``: the bare ``nn.Sequential``
indices, one file per half).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError

# Bounds on a config read from outside (TAESD uses 64 channels, 4 levels, at most 3 blocks per level).
MAX_CHANNELS = 1024
MAX_LEVELS = 6
MAX_BLOCKS = 16
MAX_LATENT_CHANNELS = 64


@dataclass(frozen=True)
class TinyVAEConfig:
    """Per-level channel and block counts. The decoder's levels go from the latents up (one 2x nearest
    upsampling between levels), the encoder's from the image down (one stride-2 convolution between levels),
    so both have ``2 ** (levels - 1)`` as their scale factor. Every level of a half has the same width (TAESD:
    64), as diffusers' ``AutoencoderTiny`` builds it."""

    latent_channels: int = 4
    image_channels: int = 3
    decoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    encoder_channels: tuple[int, ...] = (64, 64, 64, 64)
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    has_encoder: bool = True
    has_decoder: bool = True

    def __post_init__(self) -> None:
        def ints(name: str, values: Any, lo: int, hi: int) -> None:
            if not values or len(values) > MAX_LEVELS:
                raise ConfigError(f"tiny VAE config: {name} must list 1 to {MAX_LEVELS} levels, got {values!r}")
            for v in values:
                if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                    raise ConfigError(f"tiny VAE config: {name} values must be integers in [{lo}, {hi}], got {v!r}")

        for name, value, hi in (
            ("latent_channels", self.latent_channels, MAX_LATENT_CHANNELS),
            ("image_channels", self.image_channels, 4),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= hi:
                raise ConfigError(f"tiny VAE config: {name} must be an integer in [1, {hi}], got {value!r}")
        ints("decoder_channels", self.decoder_channels, 1, MAX_CHANNELS)
        ints("decoder_blocks", self.decoder_blocks, 0, MAX_BLOCKS)
        ints("encoder_channels", self.encoder_channels, 1, MAX_CHANNELS)
        ints("encoder_blocks", self.encoder_blocks, 0, MAX_BLOCKS)
        if len(self.decoder_channels) != len(self.decoder_blocks):
            raise ConfigError("tiny VAE config: decoder_channels and decoder_blocks must have one entry per level")
        if len(self.encoder_channels) != len(self.encoder_blocks):
            raise ConfigError("tiny VAE config: encoder_channels and encoder_blocks must have one entry per level")
        for name, chans in (("decoder_channels", self.decoder_channels), ("encoder_channels", self.encoder_channels)):
            if len(set(chans)) != 1:  # TAESD's are 64 throughout; diffusers' layers only fit equal widths
                raise ConfigError(f"tiny VAE config: every level of {name} must have the same width, got {list(chans)}")
        if self.has_encoder and self.has_decoder and len(self.encoder_channels) != len(self.decoder_channels):
            raise ConfigError("tiny VAE config: the encoder and the decoder must have the same number of levels")
        if not (self.has_encoder or self.has_decoder):
            raise ConfigError("tiny VAE config: it needs an encoder, a decoder or both")

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (the decoder's when it has one)."""
        levels = len(self.decoder_channels) if self.has_decoder else len(self.encoder_channels)
        return 2 ** (levels - 1)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any]) -> TinyVAEConfig:
        """diffusers' ``AutoencoderTiny`` config.json. Refuses what this module does not build (another
        activation or upsampling, a latent scale other than TAESD's own)."""
        if cfg.get("act_fn", "relu") != "relu":
            raise ConfigError(f"tiny VAE config: act_fn {cfg.get('act_fn')!r} is not supported (only 'relu')")
        if cfg.get("upsample_fn", "nearest") != "nearest":
            raise ConfigError(
                f"tiny VAE config: upsample_fn {cfg.get('upsample_fn')!r} is not supported (only 'nearest')"
            )
        if cfg.get("upsampling_scaling_factor", 2) != 2:
            raise ConfigError("tiny VAE config: upsampling_scaling_factor must be 2")
        if cfg.get("scaling_factor", 1.0) != 1.0 or cfg.get("shift_factor", 0.0) not in (0.0, None):
            raise ConfigError(
                "tiny VAE config: scaling_factor/shift_factor other than 1/0 are not supported (TAESD decodes the "
                "diffusion model's latents as they are)"
            )

        def tup(key: str, default: tuple[int, ...]) -> tuple[int, ...]:
            v = cfg.get(key, default)
            if not isinstance(v, list | tuple):
                raise ConfigError(f"tiny VAE config: {key} must be a list, got {v!r}")
            return tuple(v)

        return cls(
            latent_channels=cfg.get("latent_channels", 4),
            image_channels=cfg.get("out_channels", 3),
            decoder_channels=tup("decoder_block_out_channels", cls.decoder_channels),
            decoder_blocks=tup("num_decoder_blocks", cls.decoder_blocks),
            encoder_channels=tup("encoder_block_out_channels", cls.encoder_channels),
            encoder_blocks=tup("num_encoder_blocks", cls.encoder_blocks),
        )

    def to_diffusers(self) -> dict[str, Any]:
        """The config.json diffusers' ``AutoencoderTiny`` reads (a folder it loads needs both halves)."""
        return {
            "_class_name": "AutoencoderTiny",
            "in_channels": self.image_channels,
            "out_channels": self.image_channels,
            "latent_channels": self.latent_channels,
            "encoder_block_out_channels": list(self.encoder_channels),
            "decoder_block_out_channels": list(self.decoder_channels),
            "num_encoder_blocks": list(self.encoder_blocks),
            "num_decoder_blocks": list(self.decoder_blocks),
            "act_fn": "relu",
            "upsample_fn": "nearest",
            "upsampling_scaling_factor": 2,
            "latent_magnitude": 3,
            "latent_shift": 0.5,
            "scaling_factor": 1.0,
            "shift_factor": 0.0,
            "force_upcast": False,
        }


def taesd_config(
    downscale_factor: int, latent_channels: int = 4, *, channels: int = 64, image_channels: int = 3
) -> TinyVAEConfig:
    """TAESD's architecture for latents of ``downscale_factor`` pixels a side: one level per 2x and one more,
    ``channels`` wide, decoder blocks (3, ..., 3, 1) and encoder blocks (1, 3, ..., 3) (TAESD's at 8x)."""
    levels = downscale_factor.bit_length()
    if downscale_factor < 1 or downscale_factor != 1 << (levels - 1):
        raise ConfigError(f"a downscale factor of {downscale_factor} is not a power of 2: no tiny VAE fits it")
    return TinyVAEConfig(
        latent_channels=latent_channels,
        image_channels=image_channels,
        decoder_channels=(channels,) * levels,
        decoder_blocks=(3,) * (levels - 1) + (1,),
        encoder_channels=(channels,) * levels,
        encoder_blocks=(1,) + (3,) * (levels - 1),
    )


# ----------------------------------------------------------------------------------------------------------
# Layers


def conv3(c_in: int, c_out: int, *, bias: bool = True, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class TinyBlock(nn.Module):
    """``relu(conv(relu(conv(relu(conv(x))))) + x)``: three 3x3 convolutions and a residual connection (a
    1x1 convolution when the channel count changes)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv3(c_in, c_out), nn.ReLU(), conv3(c_out, c_out), nn.ReLU(), conv3(c_out, c_out))
        self.skip: nn.Module = nn.Conv2d(c_in, c_out, 1, bias=False) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x) + self.skip(x))


class Upsample2x(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest")


class TinyDecoder(nn.Module):
    """Latents -> image in [0, 1]: a soft clamp of the latents to (-3, 3) (``3 tanh(z / 3)``), a 3x3 conv and
    ReLU, then per level its blocks, and between levels a 2x upsampling and a bias-free 3x3 conv; the last
    conv gives the image's channels."""

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        chans, blocks = cfg.decoder_channels, cfg.decoder_blocks
        layers: list[nn.Module] = [conv3(cfg.latent_channels, chans[0]), nn.ReLU()]
        for i, (c, n) in enumerate(zip(chans, blocks, strict=True)):
            layers += [TinyBlock(c, c) for _ in range(n)]
            if i + 1 < len(chans):
                layers += [Upsample2x(), conv3(c, chans[i + 1], bias=False)]
            else:
                layers.append(conv3(c, cfg.image_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(torch.tanh(z / 3) * 3)


class TinyEncoder(nn.Module):
    """Image in [0, 1] -> latents: a 3x3 conv, per level a stride-2 bias-free 3x3 conv (not on the first)
    and its blocks, and a last 3x3 conv to the latent channels."""

    def __init__(self, cfg: TinyVAEConfig) -> None:
        super().__init__()
        chans, blocks = cfg.encoder_channels, cfg.encoder_blocks
        layers: list[nn.Module] = []
        for i, (c, n) in enumerate(zip(chans, blocks, strict=True)):
            if i == 0:
                layers.append(conv3(cfg.image_channels, c))
            else:
                layers.append(conv3(chans[i - 1], c, bias=False, stride=2))
            layers += [TinyBlock(c, c) for _ in range(n)]
        layers.append(conv3(chans[-1], cfg.latent_channels))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


# ----------------------------------------------------------------------------------------------------------
# The model


class MissingHalfError(ConfigError):
    """The tiny VAE was loaded without the half a call needs (TAESD ships decoder and encoder as two files)."""


class TinyAutoencoder(nn.Module):
    """``decode(latents) -> image in [-1, 1]`` and ``encode(image in [-1, 1]) -> latents``, both in the
    diffusion model's latent space. Either half may be absent (a decoder-only file is what previews need)."""

    def __init__(self, config: TinyVAEConfig) -> None:
        super().__init__()
        self.config = config
        self.decoder = TinyDecoder(config) if config.has_decoder else None
        self.encoder = TinyEncoder(config) if config.has_encoder else None
        self.name = "tiny VAE"  # what errors and the infotext call it (the loader sets the file's name)

    def decode(self, latents: Tensor) -> Tensor:
        if self.decoder is None:
            raise MissingHalfError(f"{self.name} has no decoder (load its taesd_decoder file)")
        from sdengine.cuda_graphs import through

        # through(): the decoder's CUDA graphs when a pipeline recorded them (Pipeline.enable_cuda_graphs)
        return through(self.decoder)(latents) * 2 - 1

    def encode(self, images: Tensor) -> Tensor:
        if self.encoder is None:
            raise MissingHalfError(f"{self.name} has no encoder (load its taesd_encoder file too)")
        return self.encoder((images + 1) / 2)

    def forward(self, images: Tensor) -> Tensor:
        """Reconstruction: decode(encode(images))."""
        return self.decode(self.encode(images))


__all__ = [
    "MissingHalfError",
    "TinyAutoencoder",
    "TinyBlock",
    "TinyDecoder",
    "TinyEncoder",
    "TinyVAEConfig",
    "taesd_config",
]
