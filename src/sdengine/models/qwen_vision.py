"""Qwen2.5-VL's vision tower (transformers' ``Qwen2_5_VisionTransformerPretrainedModel``) and its image processor
(transformers' ``Qwen2VLImageProcessor``): what Qwen-Image-Edit's text encoder reads the input image with.

The processor (:func:`qwen_vision_pixels`):

- **Smart resize** (:func:`smart_resize`): height and width rounded to multiples of 28 (the 14-pixel patch x the
  2x2 merge), the area then kept within ``[min_pixels, max_pixels]`` (56*56 to 28*28*1280 by default, the
  processor's ``size``) by scaling both sides (floor when shrinking, ceil when growing), the aspect ratio kept
  within a factor of 200. The image (RGB, 8 bits) is resized with Pillow's bicubic filter, then scaled to 0..1 and
  normalised with OpenAI CLIP's mean and std.
- **Patchify**: the (3, H, W) image cut into 14x14 patches in *merge-block order* (every 2x2 block of patches
  together, blocks row-major), each patch repeated ``temporal_patch_size`` (2) times along time as a still image
  is, flattened channel-major: (grid_h * grid_w, 3 * 2 * 14 * 14) rows, with ``grid_thw = (1, H/14, W/14)``.

The tower (:class:`QwenVisionTower`):

- **Patch embedding**: a bias-free Conv3d with kernel = stride = (2, 14, 14) over each row: a Linear of the
  flattened patch.
- **2-D rotary positions**: each patch's (row, column) in the grid (in the same merge-block order); a head of
  width d rotates its first d/4 pairs by the row and the next d/4 by the column, frequencies
  ``theta^(-2i/(d/2))`` (``theta`` 10000), the halves paired as transformers' ``rotate_half``; angles and the
  rotation in float32.
- **Blocks**: pre-RMSNorm (eps 1e-6) residual blocks of non-causal attention (fused biased ``qkv``, ``proj``) and a
  biased SwiGLU MLP. The blocks listed in ``fullatt_block_indexes`` attend over the whole image; the others attend
  within *windows*: the merged grid (2x2 patch blocks) cut into squares of ``window_size / 14 / 2`` blocks (112
  pixels: 4x4 blocks) from the top-left, the last row and column of windows smaller. The tokens are reordered
  window by window before the blocks (and the rotary angles with them) and put back after the merger.
- **Patch merger**: RMSNorm (eps 1e-6) of each patch, every 2x2 block's four patches concatenated, then
  ``Linear -> GELU (exact) -> Linear`` to ``out_hidden_size`` (the language model's width): one token per block.

Parameter names are transformers' (``patch_embed.proj.weight``, ``blocks.N.norm1.weight``,
``blocks.N.attn.qkv.weight``, ``blocks.N.mlp.gate_proj.weight``, ``merger.ln_q.weight``, ``merger.mlp.0.weight``,
...), as a ``Qwen2_5_VLForConditionalGeneration`` file holds them behind ``visual.`` or ``model.visual.``
(:mod:`sdengine.weights.qwen_vision_file`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.clip_vision import CLIP_MEAN, CLIP_STD
from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_text import QwenRMSNorm
from sdengine.sdpa_backends import attention

MIN_PIXELS = 56 * 56  # Qwen2VLImageProcessor's size["shortest_edge"]
MAX_PIXELS = 28 * 28 * 1280  # and size["longest_edge"]
MAX_ASPECT = 200  # smart_resize refuses a longer side over 200 x the shorter
INT_LIMITS: dict[str, tuple[int, int]] = {
    "depth": (1, 128),
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 65536),
    "num_heads": (1, 256),
    "in_channels": (1, 16),
    "patch_size": (1, 64),
    "spatial_merge_size": (1, 8),
    "temporal_patch_size": (1, 8),
    "window_size": (1, 4096),
    "out_hidden_size": (1, 16384),
}


@dataclass(frozen=True)
class QwenVisionConfig:
    """transformers' ``Qwen2_5_VLVisionConfig`` numbers; defaults are Qwen2.5-VL-7B's (Qwen-Image-Edit's)."""

    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        for name, (lo, hi) in INT_LIMITS.items():
            value = getattr(self, name)
            if type(value) is not int:
                raise ConfigError(f"Qwen vision config: {name}={value!r} is not an integer")
            if not lo <= value <= hi:
                raise ConfigError(f"Qwen vision config: {name}={value} is out of range ({lo} to {hi})")
        if self.hidden_size % self.num_heads or (self.hidden_size // self.num_heads) % 4:
            raise ConfigError(
                f"Qwen vision config: hidden_size={self.hidden_size} / num_heads={self.num_heads} must be a head "
                "width that is a multiple of 4 (its 2-D rotary halves rotate pairs)"
            )
        idx = self.fullatt_block_indexes
        if not isinstance(idx, tuple) or any(type(i) is not int or not 0 <= i < self.depth for i in idx):
            raise ConfigError(
                f"Qwen vision config: fullatt_block_indexes={list(idx) if isinstance(idx, tuple) else idx!r} must "
                f"be block numbers 0 to {self.depth - 1}"
            )
        theta = self.rope_theta
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not 1.0 <= theta <= 1e12:
            raise ConfigError(f"Qwen vision config: rope_theta={theta!r} must be a number 1 to 1e12")
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ConfigError(
                f"Qwen vision config: window_size={self.window_size} is not a multiple of patch_size x "
                f"spatial_merge_size ({self.patch_size * self.spatial_merge_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> QwenVisionConfig:
        """From a ``Qwen2_5_VLConfig`` dict's ``vision_config`` (or the vision config itself)."""
        vision = config.get("vision_config", config)
        if not isinstance(vision, dict):
            raise ConfigError("Qwen vision config: vision_config is not an object")
        act = vision.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"Qwen vision config: hidden_act {act!r} is not supported (silu)")
        rope = vision.get("rope_parameters") or {}
        if not isinstance(rope, dict):
            raise ConfigError("Qwen vision config: rope_parameters is not an object")
        kind = rope.get("rope_type", "axial")
        if kind not in ("axial", "default"):
            raise ConfigError(f"Qwen vision config: rope_type {kind!r} is not supported (axial)")
        idx = vision.get("fullatt_block_indexes", [7, 15, 23, 31])
        if not isinstance(idx, list | tuple):
            raise ConfigError(f"Qwen vision config: fullatt_block_indexes={idx!r} is not a list")
        fields: tuple[str, ...] = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels")
        fields += ("patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size")
        base = cls.__dataclass_fields__
        values = {f: vision.get(f, base[f].default) for f in fields}
        if "in_chans" in vision and "in_channels" not in vision:
            values["in_channels"] = vision["in_chans"]
        return cls(**values, fullatt_block_indexes=tuple(idx), rope_theta=rope.get("rope_theta", 10000.0))


# ----------------------------------------------------------------------------------------------------------
# The processor


def smart_resize(
    height: int, width: int, factor: int = 28, min_pixels: int = MIN_PIXELS, max_pixels: int = MAX_PIXELS
) -> tuple[int, int]:
    """(height, width) multiples of ``factor`` near the given size with the area in ``[min_pixels, max_pixels]``
    (see the module docstring); an aspect ratio over 200 is a UsageError."""
    if height < 1 or width < 1:
        raise UsageError(f"Qwen vision input: the image is {width}x{height}; it needs at least one pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise UsageError(
            f"Qwen vision input: the image is {width}x{height}; its aspect ratio must be under {MAX_ASPECT}"
        )
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_vision_pixels(
    image: Image.Image,
    config: QwenVisionConfig | None = None,
    *,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
) -> tuple[Tensor, tuple[int, int, int]]:
    """(pixel rows (grid_h * grid_w, patch_dim) float32, grid_thw (1, grid_h, grid_w)) of one image, as
    ``Qwen2VLImageProcessor`` makes them (module docstring)."""
    cfg = config or QwenVisionConfig()
    if not isinstance(image, Image.Image):
        raise UsageError(f"Qwen vision input: expected a PIL image, got {type(image).__name__}")
    if cfg.in_channels != 3:
        raise UsageError(f"Qwen vision input: the tower takes {cfg.in_channels} channels; images give 3 (RGB)")
    rgb = image.convert("RGB")
    p, m = cfg.patch_size, cfg.spatial_merge_size
    h, w = smart_resize(rgb.height, rgb.width, p * m, min_pixels, max_pixels)
    if (w, h) != rgb.size:
        rgb = rgb.resize((w, h), resample=Image.Resampling.BICUBIC)
    arr = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) * np.float32(1 / 255)
    return patch_rows(torch.from_numpy(np.ascontiguousarray(arr)), cfg)


def patch_rows(x: Tensor, cfg: QwenVisionConfig) -> tuple[Tensor, tuple[int, int, int]]:
    """(pixel rows, grid_thw) of one (3, h, w) float image in 0..1 already at its smart-resized size: OpenAI
    CLIP's mean and std, then the ``patch_size`` patches in merge-block order, each repeated over the
    ``temporal_patch_size`` frames (a still image's rows)."""
    p, m, t = cfg.patch_size, cfg.spatial_merge_size, cfg.temporal_patch_size
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).reshape(3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).reshape(3, 1, 1)
    x = (x - mean) / std
    gh, gw = int(x.shape[1]) // p, int(x.shape[2]) // p
    blocks = x.reshape(3, gh // m, m, p, gw // m, m, p).permute(1, 4, 2, 5, 0, 3, 6)
    blocks = blocks[:, :, :, :, :, None].expand(*blocks.shape[:5], t, p, p)
    return blocks.reshape(gh * gw, 3 * t * p * p).contiguous(), (1, gh, gw)


# ----------------------------------------------------------------------------------------------------------
# The tower


def window_order(grid: tuple[int, int, int], cfg: QwenVisionConfig) -> tuple[Tensor, list[int]]:
    """(the merged blocks' order window by window (N_blocks,), the window lengths in patches) of one grid."""
    t, gh, gw = grid
    m = cfg.spatial_merge_size
    win = cfg.window_size // m // cfg.patch_size
    bh, bw = gh // m, gw // m
    order: list[Tensor] = []
    lengths: list[int] = []
    index = torch.arange(t * bh * bw).reshape(t, bh, bw)
    for f in range(t):
        for r in range(0, bh, win):
            for c in range(0, bw, win):
                cell = index[f, r : r + win, c : c + win].reshape(-1)
                order.append(cell)
                lengths.append(cell.numel() * m * m)
    return torch.cat(order), lengths


def patch_positions(grid: tuple[int, int, int], merge: int) -> Tensor:
    """(t * h * w, 2) (row, column) of each patch in merge-block order."""
    t, gh, gw = grid
    rows = torch.arange(gh)[:, None].expand(gh, gw)
    cols = torch.arange(gw)[None, :].expand(gh, gw)
    shape = (gh // merge, merge, gw // merge, merge)
    r = rows.reshape(shape).transpose(1, 2).reshape(-1)
    c = cols.reshape(shape).transpose(1, 2).reshape(-1)
    return torch.stack([r, c], dim=-1).repeat(t, 1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (L, heads, d) rotated in float32 by (L, d) angles, cast back."""
    dtype = x.dtype
    h = x.float()
    half = h.shape[-1] // 2
    rotated = torch.cat((-h[..., half:], h[..., :half]), dim=-1)
    return (h * cos[:, None] + rotated * sin[:, None]).to(dtype)


class QwenVisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, lengths: list[int]) -> Tensor:
        """x (L, hidden); attention within consecutive segments of ``lengths`` tokens."""
        L = x.shape[0]
        q, k, v = self.qkv(x).reshape(L, 3, self.heads, -1).unbind(1)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        q, k, v = (y.transpose(0, 1)[None] for y in (q, k, v))  # (1, heads, L, d)
        outs = []
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            outs.append(attention(q[:, :, sl], k[:, :, sl], v[:, :, sl]))
            start += n
        out = torch.cat(outs, dim=2)[0].transpose(0, 1).reshape(L, -1)
        return self.proj(out)


class QwenVisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class QwenVisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = QwenRMSNorm(cfg.hidden_size, 1e-6)
        self.norm2 = QwenRMSNorm(cfg.hidden_size, 1e-6)
        self.attn = QwenVisionAttention(cfg)
        self.mlp = QwenVisionMLP(cfg)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, lengths: list[int]) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class QwenPatchEmbed(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, rows: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(rows.to(w.dtype), w.reshape(w.shape[0], -1))


class QwenPatchMerger(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = QwenRMSNorm(cfg.hidden_size, 1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width, cfg.out_hidden_size)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.width))


class QwenVisionTower(nn.Module):
    """Pixel rows (N, patch_dim) of images with grids ``grid_thw`` -> (N / merge^2, out_hidden_size) image tokens
    in the language model's width, the images' tokens one after another (module docstring)."""

    def __init__(self, config: QwenVisionConfig) -> None:
        super().__init__()
        self.config = config
        self.patch_embed = QwenPatchEmbed(config)
        self.blocks = nn.ModuleList([QwenVisionBlock(config) for _ in range(config.depth)])
        self.merger = QwenPatchMerger(config)
        self.name = ""

    @property
    def dtype(self) -> torch.dtype:
        return self.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embed.proj.weight.device

    def rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos / sin (N, head_dim) float32 of (N, 2) (row, column) positions."""
        spatial = self.config.head_dim // 2
        inv = 1.0 / (self.config.rope_theta ** (torch.arange(0, spatial, 2, dtype=torch.float32) / spatial))
        angles = positions.float()[..., None] * inv  # (N, 2, d/4)
        angles = torch.cat([angles[:, 0], angles[:, 1]], dim=-1)
        angles = torch.cat([angles, angles], dim=-1).to(self.device)
        return angles.cos(), angles.sin()

    def forward(self, pixel_values: Tensor, grid_thw: list[tuple[int, int, int]]) -> Tensor:
        cfg = self.config
        m, unit = cfg.spatial_merge_size, cfg.spatial_merge_size**2
        if not grid_thw or any(len(g) != 3 for g in grid_thw):
            raise UsageError(f"Qwen vision tower: grid_thw {grid_thw} must be (t, h, w) grids")
        grids = [(int(g[0]), int(g[1]), int(g[2])) for g in grid_thw]
        if any(min(g) < 1 or g[1] % m or g[2] % m for g in grids):
            raise UsageError(
                f"Qwen vision tower: grid_thw {grid_thw} must be (t, h, w) grids with h and w multiples of {m}"
            )
        total = sum(t * h * w for t, h, w in grids)
        if pixel_values.ndim != 2 or tuple(pixel_values.shape) != (total, cfg.patch_dim):
            raise UsageError(
                f"Qwen vision tower: pixel_values must be ({total}, {cfg.patch_dim}) for grids {grids}, got "
                f"{tuple(pixel_values.shape)}"
            )
        orders, windows, full, offset = [], [], [], 0
        for g in grids:
            order, lengths = window_order(g, cfg)
            orders.append(order + offset)
            windows += lengths
            full += [g[1] * g[2]] * g[0]
            offset += order.numel()
        order = torch.cat(orders).to(self.device)
        positions = torch.cat([patch_positions(g, m) for g in grids])
        x = self.patch_embed(pixel_values.to(self.device))
        x = x.reshape(-1, unit, x.shape[-1])[order].reshape(total, -1)
        cos, sin = self.rope(positions)
        cos = cos.reshape(-1, unit, cos.shape[-1])[order].reshape(total, -1)
        sin = sin.reshape(-1, unit, sin.shape[-1])[order].reshape(total, -1)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, full if i in cfg.fullatt_block_indexes else windows)
        out = self.merger(x)
        return out[torch.argsort(order)]


__all__ = [
    "MAX_PIXELS",
    "MIN_PIXELS",
    "QwenVisionConfig",
    "QwenVisionTower",
    "patch_positions",
    "patch_rows",
    "qwen_vision_pixels",
    "smart_resize",
    "window_order",
]
