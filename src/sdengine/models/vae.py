"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), diffusers' ``AutoencoderKL``.

Reading order: config, the posterior distribution, encoder, decoder, the model, presets.

An image (B, 3, H, W) in [-1, 1] is encoded to a diagonal Gaussian over latents (B, 4, H/8, W/8); the
diffusion model works on ``scaling_factor * latent`` so that latents have roughly unit variance, and the
decoder maps latents back to pixels. Parameter names are diffusers', so its state dicts load strictly.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.attention import SpatialSelfAttention
from sdengine.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D

# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL; per-level tuples from the highest resolution down."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # SD's VAE overflows in fp16 at large sizes: pipelines should decode it in float32 when this is set.
    force_upcast: bool = True
    # Per-channel latent statistics (Playground v2.5's VAE config): the diffusion model's latents are
    # ``(z - latents_mean) * scaling_factor / latents_std`` (diffusers' SDXL pipelines' rule); None: not used.
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_config("vae", self)  # every number bounded before anything reads it
        stats = {"latents_mean": self.latents_mean, "latents_std": self.latents_std}
        if (self.latents_mean is None) != (self.latents_std is None):
            given = "latents_mean" if self.latents_mean is not None else "latents_std"
            raise ConfigError(f"VAE config: {given} without its partner (both or neither)")
        for key, values in stats.items():
            if values is None:
                continue
            ok = isinstance(values, tuple) and len(values) == self.latent_channels
            ok = ok and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if not ok or (key == "latents_std" and min(values) <= 0):
                raise ConfigError(
                    f"VAE config: {key} must be {self.latent_channels} finite numbers"
                    + (" above 0" if key == "latents_std" else "")
                    + f", got {values!r}"
                )
        if any(ch % self.norm_num_groups for ch in self.block_out_channels):
            raise ConfigError(
                f"VAE config: norm_num_groups={self.norm_num_groups} does not divide every level's "
                f"channels {list(self.block_out_channels)}"
            )

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> VAEConfig:
        """Map a diffusers ``AutoencoderKL`` ``config.json``; refuses options it does not implement, by name."""
        check_config("vae", config)  # before any number is used
        c = dict(config)
        name = c.pop("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            hint = ": a tiny VAE (TAESD), give it as --tiny-vae / tiny_vae=" if name == "AutoencoderTiny" else ""
            raise ConfigError(f"not an AutoencoderKL config: _class_name={name!r}{hint}")
        for k in ("_diffusers_version", "_name_or_path", "_use_default_values"):
            c.pop(k, None)
        problems = []
        n = len(c.get("block_out_channels", (64,)))
        down = c.pop("down_block_types", ("DownEncoderBlock2D",) * n)
        up = c.pop("up_block_types", ("UpDecoderBlock2D",) * n)
        if any(b != "DownEncoderBlock2D" for b in down) or any(b != "UpDecoderBlock2D" for b in up):
            problems.append(f"block types {list(down)} / {list(up)}")
        if len(down) != n or len(up) != n:
            problems.append(f"{len(down)} down / {len(up)} up block types for {n} levels")
        if c.pop("act_fn", "silu") not in ("silu", "swish"):
            problems.append(f"act_fn={config['act_fn']!r}")
        for k in ("latents_mean", "latents_std"):
            value = c.pop(k, None)
            if value is not None:
                if not isinstance(value, list | tuple):
                    problems.append(f"{k}={value!r} (not a list of numbers)")
                else:
                    c[k] = tuple(value)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(c) - known)
        if unknown:
            problems.append("unknown options " + ", ".join(unknown))
        if problems:
            raise ConfigError("VAE config options not supported by sdengine: " + "; ".join(problems))
        # Fill in diffusers' own defaults (they differ from SD's) for keys the file leaves out.
        defaults = {"block_out_channels": (64,), "layers_per_block": 1, "sample_size": 32}
        c = {**defaults, **c}
        c["block_out_channels"] = tuple(c["block_out_channels"])
        if isinstance(c["sample_size"], (list, tuple)):
            c["sample_size"] = c["sample_size"][0]
        return cls(**c)

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        for k in ("latents_mean", "latents_std"):
            if d[k] is None:
                del d[k]
            else:
                d[k] = list(d[k])
        return {
            "_class_name": "AutoencoderKL",
            **d,
            "act_fn": "silu",
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n,
        }


# ----------------------------------------------------------------------------------------------------------
# The posterior q(z | x)


class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element; ``sample`` draws like diffusers so seeds give equal latents."""

    def __init__(self, moments: Tensor) -> None:
        # moments: (B, 2*C, h, w) = [mean, logvar] along channels
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)  # keeps exp() finite for untrained or extreme inputs
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | Sequence[torch.Generator] | None = None) -> Tensor:
        """mean + std * eps. A list of generators draws sample i from generator i (shape (1, C, h, w) each).

        The noise is drawn on the generator's device (CPU generators give the same latents on any device)
        in the posterior's dtype, as diffusers' ``randn_tensor`` does.
        """
        shape, dtype, device = self.mean.shape, self.mean.dtype, self.mean.device
        if isinstance(generator, Sequence) and len(generator) == 1:
            generator = generator[0]
        if isinstance(generator, Sequence):
            if len(generator) != shape[0]:
                raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
            eps = torch.cat(
                [torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
            )
        else:
            gen_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype)
        return self.mean + self.std * eps.to(device)

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements: (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar, dim=(1, 2, 3))


# ----------------------------------------------------------------------------------------------------------
# Blocks


class MidBlock(nn.Module):
    """resnet -> single-head self-attention -> resnet at the lowest resolution (no timestep input)."""

    def __init__(self, ch: int, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_channels=None, groups=g, eps=1e-6) for _ in range(2)])
        self.attentions = None
        if cfg.mid_block_add_attention:
            self.attentions = nn.ModuleList([SpatialSelfAttention(ch, 1, norm_groups=g, eps=1e-6)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """resnets at one resolution, then a stride-2 conv (padded right/bottom, as the LDM VAE was trained)."""

    def __init__(self, in_ch: int, out_ch: int, *, add_downsample: bool, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=g, eps=1e-6)
            for i in range(cfg.layers_per_block)
        )
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=0)]) if add_downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C, H/2, W/2)
        return x


class DecoderBlock(nn.Module):
    """layers_per_block + 1 resnets at one resolution, then nearest 2x upsampling and a conv."""

    def __init__(self, in_ch: int, out_ch: int, *, add_upsample: bool, cfg: VAEConfig) -> None:
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb_channels=None, groups=g, eps=1e-6)
            for i in range(cfg.layers_per_block + 1)
        )
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if add_upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)  # (B, C, 2H, 2W)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = cfg.block_out_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(chs[max(i - 1, 0)], chs[i], add_downsample=i < len(chs) - 1, cfg=cfg) for i in range(len(chs))
        )
        self.mid_block = MidBlock(chs[-1], cfg)
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for block in self.down_blocks:
            h = block(h)
        h = self.mid_block(h)  # (B, C_last, H/f, W/f)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2*latent, H/f, W/f)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        chs = cfg.block_out_channels
        rev = list(reversed(chs))
        self.conv_in = nn.Conv2d(cfg.latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock(rev[0], cfg)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rev[max(i - 1, 0)], rev[i], add_upsample=i < len(chs) - 1, cfg=cfg) for i in range(len(chs))
        )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for block in self.up_blocks:
            h = block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out, h*f, w*f)


# ----------------------------------------------------------------------------------------------------------
# The model


class AutoencoderKL(nn.Module):
    """``encode(x) -> DiagonalGaussian`` over raw latents, ``decode(z) -> image``.

    Latents here are unscaled, as in diffusers; the diffusion model sees ``(z - shift) * scaling_factor``,
    which ``scale_latents`` / ``unscale_latents`` compute.
    """

    def __init__(self, config: VAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        z2 = 2 * cfg.latent_channels
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None
        z = cfg.latent_channels
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw VAE latents -> the diffusion model's latent space."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = self._latent_stats(z)
            return (z - mean) * c.scaling_factor / std
        return (z - (c.shift_factor or 0.0)) * c.scaling_factor

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents -> raw VAE latents, ready for ``decode``."""
        c = self.config
        if c.latents_mean is not None and c.latents_std is not None:
            mean, std = self._latent_stats(z)
            return z * std / c.scaling_factor + mean
        return z / c.scaling_factor + (c.shift_factor or 0.0)

    def _latent_stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The config's latents_mean / latents_std as (1, C, 1, 1) tensors in ``z``'s dtype and device."""
        c = self.config
        shape = (1, len(c.latents_mean or ()), *([1] * (z.ndim - 2)))
        mean = torch.tensor(c.latents_mean, dtype=torch.float32).reshape(shape).to(z.device, z.dtype)
        std = torch.tensor(c.latents_std, dtype=torch.float32).reshape(shape).to(z.device, z.dtype)
        return mean, std

    def forward(self, x: Tensor, generator: torch.Generator | None = None, sample: bool = False) -> Tensor:
        """Reconstruction: decode(mode or sample of encode(x))."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample else posterior.mode())


# ----------------------------------------------------------------------------------------------------------
# Presets

# The VAE of Stable Diffusion 1.x and 2.x (84M parameters, 8x downscaling, 4 latent channels).
SD = VAEConfig()
# Small ones for tests and quick experiments (4x and 2x downscaling).
MEDIUM = VAEConfig(block_out_channels=(32, 64, 128), layers_per_block=2, norm_num_groups=16, sample_size=64)
TINY = VAEConfig(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=32)

PRESETS: dict[str, VAEConfig] = {"sd": SD, "medium": MEDIUM, "tiny": TINY}
