"""FLUX.2's VAE (diffusers' ``AutoencoderKLFlux2``): the KL autoencoder of :mod:`sdengine.models.vae` with 32 latent
channels, plus the batch-norm statistics the FLUX.2 pipelines normalise the transformer's latents with.

Reading order: config, the model.

The network is the same as SD's / FLUX.1's ``AutoencoderKL`` (the same encoder, decoder, quant convolutions and
parameter names; diffusers builds it from the same ``Encoder`` / ``Decoder``), so this module reuses
:class:`sdengine.models.vae.Encoder` / :class:`~sdengine.models.vae.Decoder`. What is new:

* ``decoder_block_out_channels``: the decoder may have other widths than the encoder (diffusers' option; None:
  the encoder's);
* ``bn``: a ``BatchNorm2d`` over ``4 x latent_channels`` channels without affine weights, of which only the running
  mean and variance are used (the module is always in eval mode). diffusers' ``Flux2KleinPipeline`` turns the VAE's
  latent (B, 32, H/8, W/8) into 2x2 patches (B, 128, H/16, W/16) (channel ``4c + 2 dy + dx`` is channel ``c``'s
  pixel ``(dy, dx)`` of each patch) and normalises each of the 128 channels by those statistics,
  ``(z - running_mean) / sqrt(running_var + batch_norm_eps)``, before the transformer; the transformer's output is
  un-normalised and un-patchified before ``decode``.

That patchified, normalised latent (B, 128, H/16, W/16) is the diffusion model's latent here:
:meth:`Flux2VAE.scale_latents` maps a raw latent (B, 32, H/8, W/8) to it, :meth:`Flux2VAE.unscale_latents` back
(the two methods the pipeline's VAE helpers, ``sdengine.vae_utils``, call on every VAE). ``config.latent_channels``
and ``config.downscale_factor`` stay the raw latent's (32, 8), which tiled encode / decode work in;
:attr:`Flux2VAEConfig.diffusion_channels` / :attr:`Flux2VAEConfig.diffusion_factor` are the diffusion latent's
(128, 16). ``decode`` does not clamp (as diffusers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError, check_config, check_scalar_ints
from sdengine.models.vae import Decoder, DiagonalGaussian, Encoder, VAEConfig

CLASS_NAME = "AutoencoderKLFlux2"
PATCH = 2  # the pipeline's 2x2 patches of the VAE latent


@dataclass(frozen=True)
class Flux2VAEConfig:
    """diffusers' ``AutoencoderKLFlux2`` config (its names; per-level tuples from the highest resolution down). The
    defaults are diffusers' (FLUX.2's released VAE: 128 x (1, 2, 4, 4), 32 latent channels)."""

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    decoder_block_out_channels: tuple[int, ...] | None = None
    layers_per_block: int = 2
    latent_channels: int = 32
    norm_num_groups: int = 32
    sample_size: int = 1024
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    batch_norm_eps: float = 1e-4
    batch_norm_momentum: float = 0.1
    patch_size: tuple[int, int] = (PATCH, PATCH)

    def __post_init__(self) -> None:
        for name in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        check_scalar_ints("FLUX.2 VAE config", self)
        if tuple(self.patch_size) != (PATCH, PATCH):
            raise ConfigError(f"FLUX.2 VAE config: patch_size={list(self.patch_size)} is not supported (only [2, 2])")
        for name in ("batch_norm_eps", "batch_norm_momentum"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or not 0 < v < 1:
                raise ConfigError(f"FLUX.2 VAE config: {name}={v!r} must be a number in (0, 1)")
        for name in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
            if type(getattr(self, name)) is not bool:
                raise ConfigError(f"FLUX.2 VAE config: {name}={getattr(self, name)!r} is not true/false")
        dec = self.decoder_block_out_channels
        if dec is not None and (not isinstance(dec, tuple) or len(dec) != len(self.block_out_channels)):
            raise ConfigError(
                f"FLUX.2 VAE config: decoder_block_out_channels={dec!r} must be a list of "
                f"{len(self.block_out_channels)} widths (one per level, as block_out_channels)"
            )
        self.encoder_config()  # the shared VAE's bounds and group checks, one line each
        self.decoder_config()

    def _vae(self, widths: tuple[int, ...]) -> VAEConfig:
        check_config("vae", {"block_out_channels": widths})
        return VAEConfig(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            latent_channels=self.latent_channels,
            block_out_channels=widths,
            layers_per_block=self.layers_per_block,
            norm_num_groups=self.norm_num_groups,
            sample_size=self.sample_size,
            scaling_factor=1.0,
            use_quant_conv=self.use_quant_conv,
            use_post_quant_conv=self.use_post_quant_conv,
            mid_block_add_attention=self.mid_block_add_attention,
            force_upcast=False,
        )

    def encoder_config(self) -> VAEConfig:
        """The encoder's architecture as the SD VAE's config."""
        return self._vae(tuple(self.block_out_channels))

    def decoder_config(self) -> VAEConfig:
        """The decoder's (``decoder_block_out_channels`` where given)."""
        return self._vae(tuple(self.decoder_block_out_channels or self.block_out_channels))

    # the names the pipeline and sdengine.vae_utils read from any VAE's config (the raw latent's)
    @property
    def downscale_factor(self) -> int:
        """Pixels per raw-latent pixel along each side (8 for FLUX.2)."""
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def diffusion_channels(self) -> int:
        """Channels of the diffusion model's latent: 4 x ``latent_channels`` (the 2x2 patches; 128)."""
        return PATCH * PATCH * self.latent_channels

    @property
    def diffusion_factor(self) -> int:
        """Pixels per diffusion-latent pixel along each side: 2 x ``downscale_factor`` (16)."""
        return PATCH * self.downscale_factor

    @property
    def scaling_factor(self) -> float:
        """1: the scaling is all in the batch-norm statistics."""
        return 1.0

    @property
    def shift_factor(self) -> float | None:
        return None

    @property
    def force_upcast(self) -> bool:
        return False

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> Flux2VAEConfig:
        """Map a diffusers ``AutoencoderKLFlux2`` ``config.json``; other classes, block types other than the plain
        ones, and unknown options are refused by name (one line)."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a FLUX.2 VAE config must be a mapping, got {type(config).__name__}")
        c = {k: v for k, v in config.items() if not str(k).startswith("_")}
        name = config.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ConfigError(f"not a FLUX.2 VAE config: _class_name={name!r} (expected {CLASS_NAME!r})")
        widths = c.get("block_out_channels") or cls.block_out_channels
        if not isinstance(widths, list | tuple):
            raise ConfigError(f"FLUX.2 VAE config: block_out_channels={widths!r} is not a list")
        n = len(widths)
        down = c.pop("down_block_types", ["DownEncoderBlock2D"] * n)
        up = c.pop("up_block_types", ["UpDecoderBlock2D"] * n)
        if not isinstance(down, list | tuple) or not isinstance(up, list | tuple):
            raise ConfigError("FLUX.2 VAE config: down_block_types / up_block_types must be lists")
        if any(b != "DownEncoderBlock2D" for b in down) or any(b != "UpDecoderBlock2D" for b in up):
            raise ConfigError(f"FLUX.2 VAE config: block types {list(down)} / {list(up)} are not supported")
        if len(down) != n or len(up) != n:
            raise ConfigError(f"FLUX.2 VAE config: {len(down)} down / {len(up)} up block types for {n} levels")
        act = c.pop("act_fn", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"FLUX.2 VAE config: act_fn={act!r} is not supported (only silu)")
        c.pop("force_upcast", None)  # a hint to pipelines only; this VAE decodes in the pipeline's dtype
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(c) - known)
        if unknown:
            raise ConfigError("FLUX.2 VAE config options not supported by sdengine: " + ", ".join(unknown))
        for k in ("block_out_channels", "decoder_block_out_channels", "patch_size"):
            if k in c and c[k] is not None:
                if not isinstance(c[k], list | tuple):
                    raise ConfigError(f"FLUX.2 VAE config: {k}={c[k]!r} is not a list")
                c[k] = tuple(c[k])
        if isinstance(c.get("sample_size"), list | tuple) and c["sample_size"]:  # (an empty one: refused below)
            c["sample_size"] = c["sample_size"][0]
        check_config("vae", {k: v for k, v in c.items() if k != "decoder_block_out_channels"})
        try:
            return cls(**c)
        except TypeError as e:
            raise ConfigError(f"FLUX.2 VAE config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        n = len(self.block_out_channels)
        d: dict[str, Any] = {"_class_name": CLASS_NAME}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        d["down_block_types"] = ["DownEncoderBlock2D"] * n
        d["up_block_types"] = ["UpDecoderBlock2D"] * n
        d["act_fn"] = "silu"
        return d


def patchify(z: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): channel ``4c + 2 dy + dx`` holds channel ``c``'s pixel (dy, dx) of each 2x2
    patch (diffusers' ``Flux2KleinPipeline._patchify_latents``)."""
    B, C, H, W = z.shape
    return z.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(B, C * 4, H // 2, W // 2)


def unpatchify(z: Tensor) -> Tensor:
    """The inverse of :func:`patchify`: (B, 4C, h, w) -> (B, C, 2h, 2w)."""
    B, C4, h, w = z.shape
    return z.reshape(B, C4 // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(B, C4 // 4, 2 * h, 2 * w)


class Flux2VAE(nn.Module):
    """``encode(x) -> DiagonalGaussian`` over raw latents (B, 32, H/8, W/8), ``decode(z) -> image``; the diffusion
    latent is :meth:`scale_latents`' (module docstring). diffusers' ``AutoencoderKLFlux2`` parameter names."""

    def __init__(self, config: Flux2VAEConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or Flux2VAEConfig()
        self.name = ""  # the file it came from (set by the loader)
        self.encoder = Encoder(cfg.encoder_config())
        self.decoder = Decoder(cfg.decoder_config())
        z = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(z, z, 1) if cfg.use_post_quant_conv else None
        self.bn = nn.BatchNorm2d(
            cfg.diffusion_channels, eps=cfg.batch_norm_eps, momentum=cfg.batch_norm_momentum, affine=False
        )

    def train(self, mode: bool = True) -> Flux2VAE:
        """The batch norm never updates its statistics (they are the released ones): it stays in eval mode."""
        super().train(mode)
        self.bn.eval()
        return self

    def encode(self, x: Tensor) -> DiagonalGaussian:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def _stats(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The batch norm's mean and ``sqrt(var + eps)`` as (1, 128, 1, 1) in ``z``'s dtype and device (computed in
        the buffers' dtype first, as diffusers)."""
        bn = self.bn
        assert bn.running_mean is not None and bn.running_var is not None
        mean = bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.config.batch_norm_eps)
        return mean.to(z.device, z.dtype), std.to(z.device, z.dtype)

    def scale_latents(self, z: Tensor) -> Tensor:
        """Raw latents (B, 32, H/8, W/8) -> the diffusion model's (B, 128, H/16, W/16): 2x2 patches, normalised."""
        p = patchify(z)
        mean, std = self._stats(p)
        return (p - mean) / std

    def unscale_latents(self, z: Tensor) -> Tensor:
        """The diffusion model's latents (B, 128, h, w) -> raw latents (B, 32, 2h, 2w), ready for ``decode``."""
        mean, std = self._stats(z)
        return unpatchify(z * std + mean)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction: decode(mode of encode(x))."""
        return self.decode(self.encode(x).mode())


__all__ = ["CLASS_NAME", "Flux2VAE", "Flux2VAEConfig", "patchify", "unpatchify"]
