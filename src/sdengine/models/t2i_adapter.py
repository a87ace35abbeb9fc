"""T2I-Adapter (Mou et al. 2023, "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for
Text-to-Image Diffusion Models").

Reading order: config, the blocks, the model.

An adapter is a small convolutional network that turns a control image (edges, depth, a sketch) into one
feature map per U-Net encoder level. It does not see the latent, the timestep or the text, so its features are
the same at every step; the U-Net adds them to its encoder as it goes down (``down_intrablock_additional_residuals``
in :class:`sdengine.models.unet.UNet`): at the last layer of each attention level, after each level without
attention (after its downsample), and, for SDXL adapters, after the middle block.

The image is first folded into channels by a pixel unshuffle (8 x 8 pixels per position for SD 1.x/2.x, 16 x 16
for SDXL), so the first feature map is already at latent size (SD) or half of it (SDXL); the blocks then halve
the size where the U-Net does. Three kinds, as diffusers' ``T2IAdapter`` ``adapter_type``:

* ``full_adapter`` (SD 1.x/2.x): ``conv_in``, then per level an optional 2x2 average pool, a 1x1 ``in_conv`` where
  the width changes, and ``num_res_blocks`` residual blocks (3x3 conv, ReLU, 1x1 conv, plus the input);
* ``full_adapter_xl`` (SDXL): the same blocks, the first two levels at one size, the third halved;
* ``light_adapter``: per level a 1x1 ``in_conv`` to a quarter of the width, residual blocks of two 3x3 convs,
  a 1x1 ``out_conv``; one more level than ``channels`` lists (the last repeats its width, halved again).

Two options of the original code (TencentARC's ``Adapter(ksize, use_conv)``, which ComfyUI reads) that diffusers
lacks, for full adapters: ``kernel_size`` 3 makes the ``in_conv`` and each block's second conv 3x3 (diffusers' and
the released files' are 1x1), and ``conv_downsample`` halves with a learned 3x3 stride-2 convolution
(``down_conv``, padding 1) instead of the average pool.

Parameter names are diffusers' ``T2IAdapter`` (``adapter.conv_in``, ``adapter.body.{i}.resnets.{j}.block1``,
...), so its ``diffusion_pytorch_model.safetensors`` loads with ``load_state_dict(strict=True)``; original
TencentARC files (``body.{k}.block1``, ...) are renamed by :mod:`sdengine.control.adapter_files`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.models.config_checks import ConfigError

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")


@dataclass(frozen=True)
class T2IAdapterConfig:
    """diffusers' ``T2IAdapter`` config. ``in_channels``: channels of the control image (1 for the sketch and
    canny adapters, 3 otherwise); ``channels``: the width of each level; ``downscale_factor``: the pixel
    unshuffle (8 for SD, 16 for SDXL)."""

    in_channels: int = 3
    channels: tuple[int, ...] = (320, 640, 1280, 1280)
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"
    kernel_size: int = 1  # the full adapter's in_conv and block2 (the original code's ksize: 1 or 3)
    conv_downsample: bool = False  # halve with a 3x3 stride-2 conv (the original's use_conv), not an average pool

    def __post_init__(self) -> None:
        if self.kernel_size not in (1, 3):
            raise ConfigError(f"kernel_size must be 1 or 3, got {self.kernel_size}")
        if self.adapter_type == "light_adapter" and (self.kernel_size != 1 or self.conv_downsample):
            raise ConfigError("a light_adapter has no kernel_size or conv_downsample option")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ConfigError(f"adapter_type must be one of {', '.join(ADAPTER_TYPES)}, got {self.adapter_type!r}")
        if self.in_channels < 1 or self.num_res_blocks < 1 or self.downscale_factor < 1:
            raise ConfigError("in_channels, num_res_blocks and downscale_factor must be positive")
        if not self.channels or any(c < 1 for c in self.channels):
            raise ConfigError(f"channels must be positive widths, got {self.channels}")
        if self.adapter_type == "full_adapter_xl" and len(self.channels) != 4:
            raise ConfigError("a full_adapter_xl has four levels (channels of length 4)")
        if self.adapter_type == "light_adapter" and any(c % 4 for c in self.channels):
            raise ConfigError(f"a light_adapter's widths must be multiples of 4, got {self.channels}")

    @property
    def feature_channels(self) -> tuple[int, ...]:
        """The width of each feature map it returns."""
        if self.adapter_type == "light_adapter":
            return (*self.channels, self.channels[-1])
        return self.channels

    @property
    def downsamples(self) -> tuple[bool, ...]:
        """Whether each level halves the size before its blocks."""
        n = len(self.feature_channels)
        if self.adapter_type == "full_adapter_xl":
            return (False, False, True, False)
        return tuple(i > 0 for i in range(n))

    @property
    def total_downscale_factor(self) -> int:
        """How much smaller the last feature map is than the control image."""
        return self.downscale_factor * 2 ** sum(self.downsamples)

    @classmethod
    def from_diffusers(cls, raw: dict[str, Any]) -> T2IAdapterConfig:
        try:
            return cls(
                in_channels=int(raw.get("in_channels", 3)),
                channels=tuple(int(c) for c in raw.get("channels", (320, 640, 1280, 1280))),
                num_res_blocks=int(raw.get("num_res_blocks", 2)),
                downscale_factor=int(raw.get("downscale_factor", 8)),
                adapter_type=str(raw.get("adapter_type", "full_adapter")),
                kernel_size=int(raw.get("kernel_size", 1)),
                conv_downsample=bool(raw.get("conv_downsample", False)),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"not a T2IAdapter config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        """diffusers' config; the original code's options, where set, as sdengine's own keys (diffusers has none)."""
        out: dict[str, Any] = {
            "_class_name": "T2IAdapter",
            "in_channels": self.in_channels,
            "channels": list(self.channels),
            "num_res_blocks": self.num_res_blocks,
            "downscale_factor": self.downscale_factor,
            "adapter_type": self.adapter_type,
        }
        if self.kernel_size != 1:
            out["kernel_size"] = self.kernel_size
        if self.conv_downsample:
            out["conv_downsample"] = True
        return out


# ----------------------------------------------------------------------------------------------------------
# Blocks


class _Residual(nn.Module):
    """``x + block2(relu(block1(x)))``; block1 is 3x3, block2 1x1 (full) or 3x3 (light)."""

    def __init__(self, ch: int, k2: int) -> None:
        super().__init__()
        self.block1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.block2 = nn.Conv2d(ch, ch, k2, padding=k2 // 2)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.block2(F.relu(self.block1(x)))


def _halve(x: Tensor) -> Tensor:
    """2x2 average pool; an odd edge averages the pixels it has (ceil mode)."""
    return F.avg_pool2d(x, 2, 2, ceil_mode=True)


class FullBlock(nn.Module):
    """[halve] -> [in_conv where the width changes] -> residual blocks; ``k`` the in_conv's and the blocks' second
    kernel (1; the original code's ksize 3), ``conv_down`` a 3x3 stride-2 conv (``down_conv``) as the halving."""

    def __init__(self, in_ch: int, out_ch: int, n: int, *, down: bool, k: int = 1, conv_down: bool = False) -> None:
        super().__init__()
        self.down = down
        self.down_conv = nn.Conv2d(in_ch, in_ch, 3, stride=2, padding=1) if down and conv_down else None
        self.in_conv = nn.Conv2d(in_ch, out_ch, k, padding=k // 2) if in_ch != out_ch else None
        self.resnets = nn.Sequential(*(_Residual(out_ch, k) for _ in range(n)))

    def forward(self, x: Tensor) -> Tensor:
        if self.down_conv is not None:
            x = self.down_conv(x)
        elif self.down:
            x = _halve(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return self.resnets(x)


class LightBlock(nn.Module):
    """[halve] -> 1x1 in_conv to a quarter of the width -> residual blocks -> 1x1 out_conv."""

    def __init__(self, in_ch: int, out_ch: int, n: int, *, down: bool) -> None:
        super().__init__()
        mid = out_ch // 4
        self.down = down
        self.in_conv = nn.Conv2d(in_ch, mid, 1)
        self.resnets = nn.Sequential(*(_Residual(mid, 3) for _ in range(n)))
        self.out_conv = nn.Conv2d(mid, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.down:
            x = _halve(x)
        return self.out_conv(self.resnets(self.in_conv(x)))


class _Body(nn.Module):
    def __init__(self, cfg: T2IAdapterConfig) -> None:
        super().__init__()
        self.factor = cfg.downscale_factor
        folded = cfg.in_channels * cfg.downscale_factor**2
        widths, downs, n = cfg.feature_channels, cfg.downsamples, cfg.num_res_blocks
        self.conv_in: nn.Conv2d | None = None
        if cfg.adapter_type == "light_adapter":
            ins = (folded, *widths[:-1])
            self.body = nn.ModuleList(LightBlock(ins[i], widths[i], n, down=downs[i]) for i in range(len(widths)))
        else:
            self.conv_in = nn.Conv2d(folded, widths[0], 3, padding=1)
            ins = (widths[0], *widths[:-1])
            k, conv = cfg.kernel_size, cfg.conv_downsample
            self.body = nn.ModuleList(
                FullBlock(ins[i], widths[i], n, down=downs[i], k=k, conv_down=conv) for i in range(len(widths))
            )

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.pixel_unshuffle(x, self.factor)  # (B, C*f*f, H/f, W/f)
        if self.conv_in is not None:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


# ----------------------------------------------------------------------------------------------------------
# The model


class T2IAdapter(nn.Module):
    """``adapter(image) -> [feature per level]``; ``image`` (B, in_channels, H, W) in [0, 1], H and W multiples
    of ``config.downscale_factor``."""

    def __init__(self, config: T2IAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.adapter = _Body(config)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(self, image: Tensor) -> list[Tensor]:
        f = self.config.downscale_factor
        if image.ndim != 4 or image.shape[1] != self.config.in_channels:
            raise ValueError(f"T2I-Adapter takes (B, {self.config.in_channels}, H, W) images, got {tuple(image.shape)}")
        if image.shape[-2] % f or image.shape[-1] % f:
            raise ValueError(
                f"T2I-Adapter needs a control image whose sides are multiples of {f}, got "
                f"{image.shape[-1]}x{image.shape[-2]}"
            )
        return self.adapter(image)


__all__ = ["ADAPTER_TYPES", "FullBlock", "LightBlock", "T2IAdapter", "T2IAdapterConfig"]
