"""Model upscalers of the ESRGAN family, and running them on large images in tiles.

* :class:`RRDBNet`: ESRGAN's network (Wang et al. 2018) as Real-ESRGAN's ``RRDBNet`` names its layers:
  ``conv_first`` -> ``body`` (``num_block`` residual-in-residual dense blocks, each three dense blocks ``rdb1..3``
  of five 3x3 convolutions ``conv1..5`` with ``grow`` channels between them) -> ``conv_body``, added to the
  features before the body -> ``conv_up1..N`` (each after a nearest x2 interpolation) -> ``conv_hr`` ->
  ``conv_last``. LeakyReLU(0.2) follows conv1..4 of a dense block, each ``conv_up`` and ``conv_hr``. A dense
  block returns ``x + 0.2 * conv5``, a residual-in-residual block ``x + 0.2 * rdb3(rdb2(rdb1(x)))``.
  Real-ESRGAN's x2 and x1 models first fold the image with ``pixel_unshuffle`` (2 and 4): ``conv_first`` then
  takes 4 or 16 times the image's channels, and the two x2 up-steps make x2 and x1.
* :class:`SRVGGNetCompact`: Real-ESRGAN's compact network (``realesr-general-x4v3``, ``realesr-animevideov3``):
  ``body.0`` conv (in -> feat), PReLU, then ``num_conv`` times conv (feat -> feat) + PReLU, then a conv to
  ``out * scale**2`` channels, ``pixel_shuffle(scale)``, plus the input upscaled by nearest neighbour.

:func:`upscale_tensor` runs either on an image of any size in tiles as A1111's ``upscale_with_model`` does
(tiles of ``tile`` input pixels spread as ``images.split_grid`` spreads them, combined as ``images.combine_grid``:
a later tile blended into the earlier over the overlap with a linear ramp); :func:`upscale_tensor_comfyui` as
ComfyUI's ``tiled_scale`` does for ImageUpscaleWithModel (tiles every ``tile - overlap`` pixels, each weighted by
a mask feathered over the overlap at its edges, the weighted sum divided by the summed weights). Either way the
memory a call needs is bounded by one tile's, and the seams are blended, not cut. :func:`upscale_image` is A1111's
``Upscaler.upscale`` around it (the model applied until the image is at least the asked size, at most 3 times,
then a Lanczos resize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

# A1111's defaults for its ESRGAN upscalers (ESRGAN_tile, ESRGAN_tile_overlap), in input pixels
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8
# ComfyUI's ImageUpscaleWithModel: its first tile size and its overlap (the tile halves on running out of memory)
COMFYUI_TILE = 512
COMFYUI_OVERLAP = 32


@dataclass(frozen=True)
class UpscalerSpec:
    """The architecture of an upscaler file, read from its tensors' shapes."""

    arch: str  # "esrgan" (RRDBNet) or "compact" (SRVGGNetCompact)
    scale: int  # output size / input size
    in_channels: int
    out_channels: int
    features: int  # num_feat
    blocks: int  # RRDB blocks (esrgan) or middle convolutions (compact)
    grow: int = 32  # the dense blocks' growth channels (esrgan)
    upsamples: int = 2  # nearest x2 + conv steps (esrgan)
    unshuffle: int = 1  # the pixel_unshuffle factor before conv_first (esrgan x2: 2, x1: 4)

    def describe(self) -> str:
        if self.arch == "esrgan":
            return f"ESRGAN (RRDBNet) x{self.scale}, {self.blocks} blocks, {self.features} features"
        return (
            f"Real-ESRGAN compact (SRVGGNetCompact) x{self.scale}, {self.blocks} convolutions, {self.features} features"
        )


class ResidualDenseBlock(nn.Module):
    def __init__(self, features: int, grow: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, grow, 3, 1, 1)
        self.conv2 = nn.Conv2d(features + grow, grow, 3, 1, 1)
        self.conv3 = nn.Conv2d(features + 2 * grow, grow, 3, 1, 1)
        self.conv4 = nn.Conv2d(features + 3 * grow, grow, 3, 1, 1)
        self.conv5 = nn.Conv2d(features + 4 * grow, features, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    def __init__(self, features: int, grow: int) -> None:
        super().__init__()
        self.rdb1 = ResidualDenseBlock(features, grow)
        self.rdb2 = ResidualDenseBlock(features, grow)
        self.rdb3 = ResidualDenseBlock(features, grow)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.2 * self.rdb3(self.rdb2(self.rdb1(x)))


class RRDBNet(nn.Module):
    """ESRGAN / Real-ESRGAN's RRDBNet (see the module docstring); ``spec.arch`` is "esrgan"."""

    def __init__(self, spec: UpscalerSpec) -> None:
        super().__init__()
        self.spec = spec
        u = spec.unshuffle
        self.conv_first = nn.Conv2d(spec.in_channels * u * u, spec.features, 3, 1, 1)
        self.body = nn.Sequential(*(RRDB(spec.features, spec.grow) for _ in range(spec.blocks)))
        self.conv_body = nn.Conv2d(spec.features, spec.features, 3, 1, 1)
        for i in range(spec.upsamples):
            self.add_module(f"conv_up{i + 1}", nn.Conv2d(spec.features, spec.features, 3, 1, 1))
        self.conv_hr = nn.Conv2d(spec.features, spec.features, 3, 1, 1)
        self.conv_last = nn.Conv2d(spec.features, spec.out_channels, 3, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.spec.unshuffle > 1:
            x = F.pixel_unshuffle(x, self.spec.unshuffle)
        feat = self.conv_first(x)
        feat = feat + self.conv_body(self.body(feat))
        for i in range(self.spec.upsamples):
            conv = getattr(self, f"conv_up{i + 1}")
            feat = F.leaky_relu(conv(F.interpolate(feat, scale_factor=2, mode="nearest")), 0.2)
        return self.conv_last(F.leaky_relu(self.conv_hr(feat), 0.2))


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network (see the module docstring); ``spec.arch`` is "compact"."""

    def __init__(self, spec: UpscalerSpec) -> None:
        super().__init__()
        self.spec = spec
        layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, spec.features, 3, 1, 1), nn.PReLU(spec.features)]
        for _ in range(spec.blocks):
            layers += [nn.Conv2d(spec.features, spec.features, 3, 1, 1), nn.PReLU(spec.features)]
        layers.append(nn.Conv2d(spec.features, spec.out_channels * spec.scale * spec.scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = F.pixel_shuffle(self.body(x), self.spec.scale)
        base = F.interpolate(x, scale_factor=self.spec.scale, mode="nearest")
        if base.shape[1] != out.shape[1]:  # a model whose output channels are not its input's
            return out
        return out + base


def spec_of(model: nn.Module) -> UpscalerSpec:
    """The :class:`UpscalerSpec` of a network :func:`build_upscaler` made."""
    spec = getattr(model, "spec", None)
    if not isinstance(spec, UpscalerSpec):
        raise TypeError(f"{type(model).__name__} is not an upscaler network")
    return spec


def build_upscaler(spec: UpscalerSpec) -> nn.Module:
    """The network of ``spec`` with fresh weights."""
    return RRDBNet(spec) if spec.arch == "esrgan" else SRVGGNetCompact(spec)


def _run(model: nn.Module, piece: Tensor, param: Tensor) -> Tensor:
    """``piece`` through the network on its device, back as float32 on the CPU. A side that the network's
    ``pixel_unshuffle`` does not divide is padded at the end by reflection (replication where it is too short
    to reflect) and the output cut back."""
    s, u = spec_of(model).scale, spec_of(model).unshuffle
    h, w = piece.shape[2], piece.shape[3]
    ph, pw = (-h) % u, (-w) % u
    if ph or pw:
        piece = F.pad(piece, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    out = model(piece.to(param.device, param.dtype)).float().cpu()
    return out[:, :, : h * s, : w * s]


def a1111_tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where A1111's ``images.split_grid`` starts its tiles along a side of ``size`` >= ``tile`` pixels:
    ``n = ceil((size - overlap) / (tile - overlap))`` tiles spread evenly (``int(i * (size - tile) / (n - 1))``),
    the last one ending at the side's end."""
    n = max(1, math.ceil((size - overlap) / (tile - overlap)))
    dx = (size - tile) / (n - 1) if n > 1 else 0.0
    starts = []
    for i in range(n):
        start = int(i * dx)
        starts.append(size - tile if start + tile >= size else start)
    return starts


def a1111_ramp(overlap: int) -> Tensor:
    """The weight of a later tile over the first ``overlap`` output pixels of its overlap: A1111's 8-bit mask
    ``floor(i * 255 / overlap) / 255`` (a linear ramp from 0 towards 1; the earlier tile has the rest)."""
    return torch.tensor([i * 255 // overlap for i in range(overlap)], dtype=torch.float32) / 255.0


def _paste(dest: Tensor, piece: Tensor, start: int, first: bool, ramp: Tensor, dim: int) -> None:
    """Paste ``piece`` into ``dest`` at ``start`` along ``dim`` (2: rows, 3: columns) as A1111's ``combine_grid``
    does: the first tile whole; a later one blended over its first ``len(ramp)`` pixels, whole after them."""
    n = piece.shape[dim]
    if first or len(ramp) == 0:
        dest.narrow(dim, start, n).copy_(piece)
        return
    o = min(len(ramp), n)
    shape = [1, 1, 1, 1]
    shape[dim] = o
    m = ramp[:o].view(shape)
    head = dest.narrow(dim, start, o)
    head.copy_(piece.narrow(dim, 0, o) * m + head * (1 - m))
    if n > o:
        dest.narrow(dim, start + o, n - o).copy_(piece.narrow(dim, o, n - o))


@torch.no_grad()
def upscale_tensor(model: nn.Module, x: Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C_out, H * scale, W * scale), the network run in tiles as A1111's
    ``upscale_with_model`` (``tile`` 0: the whole image at once); values are not clamped.

    A1111's rule: tiles of ``tile`` x ``tile`` input pixels where ``images.split_grid`` puts them
    (:func:`a1111_tile_starts`); a side shorter than the tile is padded with black before it (A1111 crops the
    tile past the image's start); the upscaled tiles are combined as ``images.combine_grid``: each row of tiles
    left to right, a tile blended into the one before over ``overlap * scale`` output pixels with the ramp of
    :func:`a1111_ramp`, then the rows top to bottom the same way."""
    spec = spec_of(model)
    s = spec.scale
    param = next(model.parameters())
    n, _, h, w = x.shape
    if tile <= 0:
        return _run(model, x, param)
    overlap = min(max(overlap, 0), tile - 1)
    hp, wp = max(h, tile), max(w, tile)
    if (hp, wp) != (h, w):
        x = F.pad(x, (wp - w, 0, hp - h, 0))  # black before the image, as A1111's crop past its start
    ramp = a1111_ramp(overlap * s)
    out = torch.zeros(n, spec.out_channels, hp * s, wp * s)
    xs = a1111_tile_starts(wp, tile, overlap)
    for i, y0 in enumerate(a1111_tile_starts(hp, tile, overlap)):
        row = torch.zeros(n, spec.out_channels, tile * s, wp * s)
        for j, x0 in enumerate(xs):
            y = _run(model, x[:, :, y0 : y0 + tile, x0 : x0 + tile], param)
            _paste(row, y, x0 * s, j == 0, ramp, 3)
        _paste(out, row, y0 * s, i == 0, ramp, 2)
    return out[:, :, (hp - h) * s :, (wp - w) * s :]


def comfyui_tile_starts(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Where ComfyUI's ``tiled_scale`` cuts a side: (start, length) every ``tile - overlap`` pixels below
    ``size - overlap``, each ``tile`` long or up to the side's end (the last one may be short); one piece when the
    side fits a tile."""
    if size <= tile:
        return [(0, size)]
    return [(p, min(tile, size - p)) for p in range(0, size - overlap, tile - overlap)]


def comfyui_feather(length: int, feather: int) -> Tensor:
    """ComfyUI's tile mask along one side of an upscaled tile of ``length`` pixels: 1, times ``(t + 1) /
    feather`` at the ``t``-th pixel from each end (both factors where the ends meet); all 1 when ``feather`` is
    not below ``length``."""
    m = torch.ones(length)
    if 0 < feather < length:
        ramp = torch.arange(1, feather + 1, dtype=torch.float32) / feather
        m[:feather] *= ramp
        m[length - feather :] *= ramp.flip(0)
    return m


@torch.no_grad()
def upscale_tensor_comfyui(
    model: nn.Module, x: Tensor, *, tile: int = COMFYUI_TILE, overlap: int = COMFYUI_OVERLAP
) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C_out, H * scale, W * scale) as ComfyUI's ``comfy.utils.tiled_scale``
    (ImageUpscaleWithModel's tiling); values are not clamped. An image that fits one tile goes through whole;
    else tiles of ``tile`` input pixels every ``tile - overlap`` (:func:`comfyui_tile_starts`), each upscaled
    tile weighted by the product of its rows' and columns' :func:`comfyui_feather` masks (``overlap * scale``
    pixels), the weighted tiles summed and divided by the summed weights."""
    spec = spec_of(model)
    s = spec.scale
    param = next(model.parameters())
    n, _, h, w = x.shape
    if tile <= 0 or (h <= tile and w <= tile):
        return _run(model, x, param)
    overlap = min(max(overlap, 0), tile - 1)
    out = torch.zeros(n, spec.out_channels, h * s, w * s)
    weight = torch.zeros(1, 1, h * s, w * s)
    for y0, th in comfyui_tile_starts(h, tile, overlap):
        for x0, tw in comfyui_tile_starts(w, tile, overlap):
            y = _run(model, x[:, :, y0 : y0 + th, x0 : x0 + tw], param)
            m = comfyui_feather(th * s, overlap * s)[:, None] * comfyui_feather(tw * s, overlap * s)[None, :]
            out[:, :, y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += y * m
            weight[:, :, y0 * s : (y0 + th) * s, x0 * s : (x0 + tw) * s] += m
    return out / weight


def upscale_once(
    model: nn.Module, image: Image.Image, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP
) -> Image.Image:
    """An RGB image through the network once (``scale`` times its size), rounded to 8 bits."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0)
    spec = spec_of(model)
    if spec.in_channels == 1:
        x = x.mean(1, keepdim=True)
    y = upscale_tensor(model, x, tile=tile, overlap=overlap).clamp(0, 1)[0]
    if y.shape[0] == 1:
        y = y.expand(3, -1, -1)
    pixels = (y[:3].permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(pixels)


def upscale_image(
    model: nn.Module,
    image: Image.Image,
    scale: float,
    *,
    tile: int = DEFAULT_TILE,
    overlap: int = DEFAULT_OVERLAP,
) -> Image.Image:
    """A1111's ``Upscaler.upscale`` with a model: the target is each side times ``scale`` rounded down to a
    multiple of 8; the network runs (at most 3 times) until the image covers it, then a Lanczos resize makes it
    exactly that size."""
    dest = (int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8))
    for _ in range(3):
        if image.width >= dest[0] and image.height >= dest[1] and scale != 1:
            break
        before = image.size
        image = upscale_once(model, image, tile=tile, overlap=overlap)
        if image.size == before:
            break
    if image.size != dest:
        image = image.resize(dest, Image.Resampling.LANCZOS)
    return image


__all__ = [
    "COMFYUI_OVERLAP",
    "COMFYUI_TILE",
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "RRDB",
    "RRDBNet",
    "ResidualDenseBlock",
    "SRVGGNetCompact",
    "UpscalerSpec",
    "a1111_ramp",
    "a1111_tile_starts",
    "build_upscaler",
    "comfyui_feather",
    "comfyui_tile_starts",
    "spec_of",
    "upscale_image",
    "upscale_once",
    "upscale_tensor",
    "upscale_tensor_comfyui",
]
