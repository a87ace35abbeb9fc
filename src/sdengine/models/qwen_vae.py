"""Qwen-Image's VAE (diffusers' ``AutoencoderKLQwenImage``, fine-tuned from Wan 2.1's video VAE), run on single images.

Reading order: config, the layers, encoder, decoder, the model.

The network is a causal 3D-convolution VAE built for video: every convolution is a ``Conv3d`` whose time axis is
padded on the past side only (two zero frames in front of the first frame for a 3-tap kernel), RMS norms over the
channels, and resampling layers with an extra temporal convolution (``time_conv``). Qwen-Image uses it for one
frame at a time, and for a single frame the causal network collapses to a 2D one, exactly:

* a causal ``Conv3d`` over one frame sees that frame only through its kernel's *last* time tap (the other taps
  see the zero padding), so it is ``conv2d(x, weight[:, :, -1])`` with the same spatial padding;
* the resampling layers' ``time_conv`` never runs on the first frame of a clip (the encoder's ``downsample3d``
  stores the frame for the next chunk, the decoder's ``upsample3d`` marks its cache "Rep"), so for an image it
  is not used at all. Its weights are kept (the file's layout loads strictly and saves back unchanged);
* the attention blocks already run per frame.

So this module keeps diffusers' parameter names and shapes (5D convolution weights included) and runs 4D
tensors: images (B, 3, H, W) in [-1, 1] <-> latents (B, z_dim, H/8, W/8). Video (more than one frame) is not
supported. ``encode`` gives the posterior (:class:`~sdengine.models.vae.DiagonalGaussian`, the same class as the
SD VAE's, so ``sample(generators)`` draws as diffusers' ``latent_dist.sample``), ``decode`` gives images clamped to
[-1, 1] as diffusers' ``_decode`` does. The diffusion model's latents are ``(z - latents_mean) / latents_std``
(diffusers' Qwen-Image pipelines: ``(z - mean) * (1 / std)`` to encode, ``z / (1 / std) + mean`` to decode, in that
order): :meth:`QwenImageVAE.scale_latents` / :meth:`QwenImageVAE.unscale_latents`, the two methods the pipeline's
VAE helpers (``sdengine.vae_utils``) call on every VAE.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.models.vae import DiagonalGaussian

# ----------------------------------------------------------------------------------------------------------
# Config

# Qwen-Image's per-channel latent statistics (the released vae/config.json's, also diffusers' defaults).
QWEN_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
QWEN_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

CLASS_NAME = "AutoencoderKLQwenImage"
# A bound of our own on the few numbers config_checks does not know by these names.
MAX_DIM_MULT = 64


class QwenVAEError(UsageError):
    """An input the Qwen-Image VAE cannot take (wrong rank, channels or size)."""


@dataclass(frozen=True)
class QwenVAEConfig:
    """diffusers' ``AutoencoderKLQwenImage`` config (its names; per-level tuples from the highest resolution down).

    The defaults are Qwen-Image's released VAE: 96 base channels x (1, 2, 4, 4), 16 latent channels, 8x
    downscaling. The properties give the names the pipeline reads from any VAE's config (``latent_channels``,
    ``downscale_factor``, ``scaling_factor``, ...)."""

    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # diffusers' spelling
    dropout: float = 0.0
    input_channels: int = 3
    latents_mean: tuple[float, ...] = field(default=QWEN_LATENTS_MEAN)
    latents_std: tuple[float, ...] = field(default=QWEN_LATENTS_STD)

    def __post_init__(self) -> None:
        for name in ("base_dim", "z_dim", "num_res_blocks", "input_channels"):
            if type(getattr(self, name)) is not int:
                raise ConfigError(f"Qwen-Image VAE config: {name}={getattr(self, name)!r} is not an integer")
        if not isinstance(self.dim_mult, tuple) or not self.dim_mult:
            raise ConfigError(f"Qwen-Image VAE config: dim_mult={self.dim_mult!r} is not a list of integers")
        if any(type(m) is not int or not 1 <= m <= MAX_DIM_MULT for m in self.dim_mult):
            raise ConfigError(
                f"Qwen-Image VAE config: dim_mult={list(self.dim_mult)} must be integers 1 to {MAX_DIM_MULT}"
            )
        # the shared bounds (channels, levels, blocks, dropout, total size), under the SD VAE's names
        check_config("vae", self.bounds_view())
        if not isinstance(self.temperal_downsample, tuple) or any(
            not isinstance(t, bool) for t in self.temperal_downsample
        ):
            raise ConfigError(
                f"Qwen-Image VAE config: temperal_downsample={_show(self.temperal_downsample)} must be booleans"
            )
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            # diffusers' downscale factor is 2 ** len(temperal_downsample) while the network downsamples
            # len(dim_mult) - 1 times: a config where they differ would give latents of the wrong size
            raise ConfigError(
                f"Qwen-Image VAE config: temperal_downsample has {len(self.temperal_downsample)} entries, "
                f"expected one per downsampling ({len(self.dim_mult) - 1} for {len(self.dim_mult)} levels)"
            )
        if self.attn_scales != ():
            # diffusers' encoder cannot run these either (its attention blocks in down_blocks are called with
            # the causal cache's arguments); Qwen-Image's is []
            raise ConfigError(
                f"Qwen-Image VAE config: attn_scales={_show(self.attn_scales)} is not supported (only [], Qwen-Image's)"
            )
        for key in ("latents_mean", "latents_std"):
            values = getattr(self, key)
            ok = isinstance(values, tuple) and len(values) == self.z_dim
            ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if not ok or (key == "latents_std" and min(values) <= 0):
                raise ConfigError(
                    f"Qwen-Image VAE config: {key} must be {self.z_dim} finite numbers"
                    + (" above 0" if key == "latents_std" else "")
                    + f" (one per latent channel), got {_show(values)}"
                )

    def bounds_view(self) -> dict[str, Any]:
        """The config under the SD VAE's names, for :func:`~sdengine.models.config_checks.check_config`."""
        return {
            "in_channels": self.input_channels,
            "out_channels": self.input_channels,
            "latent_channels": self.z_dim,
            "block_out_channels": list(self.block_out_channels),
            "layers_per_block": self.num_res_blocks,
            "dropout": self.dropout,
        }

    # the names the pipeline and sdengine.vae_utils read from any VAE's config
    @property
    def latent_channels(self) -> int:
        return self.z_dim

    @property
    def in_channels(self) -> int:
        return self.input_channels

    @property
    def out_channels(self) -> int:
        return self.input_channels

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Each level's width (``base_dim * dim_mult``); the decode memory estimate reads it."""
        return tuple(self.base_dim * m for m in self.dim_mult)

    @property
    def downscale_factor(self) -> int:
        """Pixels per latent along each side (diffusers' ``2 ** len(temperal_downsample)``: 8 for Qwen-Image)."""
        return 2 ** len(self.temperal_downsample)

    @property
    def scaling_factor(self) -> float:
        """1: the scaling is all in ``latents_mean`` / ``latents_std``."""
        return 1.0

    @property
    def shift_factor(self) -> float | None:
        return None

    @property
    def sample_size(self) -> int:
        """The default image side in pixels: diffusers' ``QwenImagePipeline.default_sample_size`` (128 latents)
        times the downscale factor (1024 for Qwen-Image)."""
        return 128 * self.downscale_factor

    @property
    def force_upcast(self) -> bool:
        return False

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> QwenVAEConfig:
        """Map a diffusers ``AutoencoderKLQwenImage`` ``config.json``; other classes and unknown options are
        refused by name."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a Qwen-Image VAE config must be a mapping, got {type(config).__name__}")
        c = dict(config)
        name = c.pop("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"not a Qwen-Image VAE config: _class_name={name!r} (expected {CLASS_NAME!r})")
        for k in ("_diffusers_version", "_name_or_path", "_use_default_values"):
            c.pop(k, None)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ConfigError("Qwen-Image VAE config options not supported by sdengine: " + ", ".join(unknown))
        for k in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            if k in c:
                if not isinstance(c[k], list | tuple):
                    raise ConfigError(f"Qwen-Image VAE config: {k}={_show(c[k])} is not a list")
                c[k] = tuple(c[k])
        return cls(**c)

    def to_diffusers(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------------------------------------
# Layers (diffusers' parameter names and shapes; 4D activations, one frame)


class CausalConv3d(nn.Conv3d):
    """A causal ``Conv3d`` run on one frame: only the kernel's last time tap sees the frame (the others see the
    causal zero padding), so it is a 2D convolution with ``weight[:, :, -1]`` and the spatial padding."""

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W)
        pad = self.padding
        assert isinstance(pad, tuple)
        return F.conv2d(x, self.weight[:, :, -1], self.bias, stride=self.stride[1:], padding=pad[1:])


class RMSNorm(nn.Module):
    """diffusers' ``QwenImageRMS_norm`` without bias: L2-normalised over the channels (in float32 for half
    inputs) times sqrt(channels) times ``gamma``. ``gamma`` keeps its file shape: (C, 1, 1, 1) in the residual
    blocks (``images=False``), (C, 1, 1) in the attention blocks."""

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        half = x.dtype in (torch.float16, torch.bfloat16)
        normed = F.normalize(x.float() if half else x, dim=1).to(x.dtype)
        return normed * self.scale * self.gamma.reshape(1, -1, 1, 1)


class Resample(nn.Module):
    """2x up- (nearest-exact, then a 3x3 convolution halving the channels) or downsampling (zero pad right/bottom,
    stride-2 3x3 convolution). ``time_conv`` (the ``...3d`` modes) is loaded but never runs on a single frame."""

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.resample: nn.Module
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Identity(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode.startswith("upsample"):
            x = F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").type_as(x)
        return self.resample(x)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)))
        x = self.conv2(self.dropout(F.silu(self.norm2(x))))
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over one frame's positions (1x1 convolutions for q/k/v and the output)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        qkv = self.to_qkv(self.norm(x)).reshape(b, 1, c * 3, h * w).permute(0, 1, 3, 2)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)  # (B, 1, HW, C) each
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.squeeze(1).permute(0, 2, 1).reshape(b, c, h, w)
        return self.proj(out) + x


class MidBlock(nn.Module):
    def __init__(self, dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim, dropout), ResidualBlock(dim, dim, dropout)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x))
        return x


# ----------------------------------------------------------------------------------------------------------
# Encoder and decoder


class Encoder(nn.Module):
    """conv_in -> per level: residual blocks, a downsampling (not after the last level) -> middle block -> norm,
    SiLU, conv_out to the posterior's 2 * z_dim moments."""

    def __init__(self, cfg: QwenVAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.input_channels, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for j in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim if j == 0 else out_dim, out_dim, cfg.dropout))
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(out_dim, cfg.dropout)
        self.norm_out = RMSNorm(out_dim)
        self.conv_out = CausalConv3d(out_dim, cfg.z_dim * 2, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for layer in self.down_blocks:
            x = layer(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class UpBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, dropout: float, upsample: str | None) -> None:
        super().__init__()
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(d, out_dim, dropout) for d in dims])
        self.upsamplers = nn.ModuleList([Resample(out_dim, upsample)]) if upsample is not None else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Module):
    """conv_in -> middle block -> per level (deepest first): residual blocks, an upsampling halving the channels
    (not after the last level) -> norm, SiLU, conv_out to RGB."""

    def __init__(self, cfg: QwenVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.base_dim * u for u in (mult[-1], *mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0], cfg.dropout)
        blocks = []
        out_dim = dims[0]
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim = in_dim // 2  # the previous level's upsampling halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, cfg.dropout, mode))
        self.up_blocks = nn.ModuleList(blocks)
        self.norm_out = RMSNorm(out_dim)
        self.conv_out = CausalConv3d(out_dim, cfg.input_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


# ----------------------------------------------------------------------------------------------------------
# The model


class QwenImageVAE(nn.Module):
    """``encode(images) -> DiagonalGaussian`` over raw latents, ``decode(z) -> images`` in [-1, 1]; 4D tensors
    (B, C, H, W), one frame each. ``scale_latents`` / ``unscale_latents``: raw latents <-> the diffusion model's."""

    def __init__(self, config: QwenVAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.name = ""  # the file or folder it came from (set by the loader)
        self.encoder = Encoder(cfg)
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)

    def _check(self, x: Tensor, channels: int, what: str, multiple: int) -> None:
        if x.ndim != 4:
            frames = f" (a video of {x.shape[2]} frames?)" if x.ndim == 5 else ""
            raise QwenVAEError(
                f"the Qwen-Image VAE takes {what} as (batch, {channels}, height, width), got shape "
                f"{tuple(x.shape)}{frames}; it runs single images only"
            )
        if x.shape[1] != channels:
            raise QwenVAEError(f"the Qwen-Image VAE takes {what} with {channels} channels, got {x.shape[1]}")
        if x.shape[2] % multiple or x.shape[3] % multiple or x.shape[2] == 0 or x.shape[3] == 0:
            raise QwenVAEError(
                f"the Qwen-Image VAE takes {what} whose height and width are positive multiples of {multiple}, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    def encode(self, x: Tensor) -> DiagonalGaussian:
        """Images in [-1, 1] (B, 3, H, W), H and W multiples of the downscale factor -> the posterior over raw
        latents (B, z_dim, H/f, W/f)."""
        self._check(x, self.config.input_channels, "images", self.config.downscale_factor)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Raw latents (B, z_dim, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        self._check(z, self.config.z_dim, "latents", 1)
        return self.decoder(self.post_quant_conv(z)).clamp(-1.0, 1.0)

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``latents_mean`` and ``1 / latents_std`` (diffusers computes the reciprocal in float32 first) as
        (1, C, 1, 1) tensors in ``z``'s dtype and device."""
        c = self.config
        shape = (1, c.z_dim, *([1] * (z.ndim - 2)))
        mean = torch.tensor(c.latents_mean, dtype=torch.float32).reshape(shape).to(z.device, z.dtype)
        inv_std = (1.0 / torch.tensor(c.latents_std, dtype=torch.float32)).reshape(shape).to(z.device, z.dtype)
        return mean, inv_std

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> the diffusion model's: ``(z - latents_mean) * (1 / latents_std)``."""
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> raw VAE latents, ready for ``decode``: ``z / (1 / latents_std) + mean``."""
        mean, inv_std = self._latent_stats(z)
        return z / inv_std + mean

    def forward(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Reconstruction: decode(mode or sample of encode(x))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())


__all__ = [
    "CLASS_NAME",
    "QWEN_LATENTS_MEAN",
    "QWEN_LATENTS_STD",
    "QwenImageVAE",
    "QwenVAEConfig",
    "QwenVAEError",
]
