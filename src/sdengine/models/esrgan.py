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

:func:`upscale_tensor` runs either on an image of any size in tiles: tiles of ``tile`` input pixels overlapping
by ``overlap``; each output pixel is taken from the tile whose cut (the middle of the overlap) it lies on, so a
network whose receptive field reaches less than ``overlap / 2`` pixels gives exactly the untiled result and the
memory a call needs is bounded by one tile's. :func:`upscale_image` is A1111's ``Upscaler.upscale`` around it
(the model applied until the image is at least the asked size, at most 3 times, then a Lanczos resize).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

# A1111's defaults for its ESRGAN upscalers (ESRGAN_tile, ESRGAN_tile_overlap), in input pixels
DEFAULT_TILE = 192
DEFAULT_OVERLAP = 8


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


def _starts(size: int, tile: int, step: int, multiple: int) -> list[int]:
    """Tile starts along one side: 0, step, 2*step, ... and the last at ``size - tile`` (all multiples of
    ``multiple``)."""
    if size <= tile:
        return [0]
    out = list(range(0, size - tile, step))
    last = (size - tile) // multiple * multiple
    if out[-1] != last:
        out.append(last)
    return out


def _cuts(starts: list[int], tile: int, size: int) -> list[tuple[int, int]]:
    """The part of the side each tile gives: from the middle of its overlap with the previous tile to the middle
    of its overlap with the next one."""
    bounds = [0] + [(starts[i + 1] + min(starts[i] + tile, size)) // 2 for i in range(len(starts) - 1)] + [size]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


@torch.no_grad()
def upscale_tensor(model: nn.Module, x: Tensor, *, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP) -> Tensor:
    """(N, C, H, W) in [0, 1] -> (N, C_out, H * scale, W * scale), the network run in tiles of ``tile`` input
    pixels overlapping by ``overlap`` (``tile`` 0: the whole image at once); values are not clamped."""
    spec = spec_of(model)
    s, u = spec.scale, spec.unshuffle
    n, _, h, w = x.shape
    # pixel_unshuffle needs sides that divide: pad at the right and bottom by reflection, cut after
    ph, pw = (-h) % u, (-w) % u
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
    hp, wp = x.shape[2], x.shape[3]
    param = next(model.parameters())
    if tile <= 0 or (hp <= tile and wp <= tile):
        out = model(x.to(param.device, param.dtype)).float().cpu()
        return out[:, :, : h * s, : w * s]
    tile = max(tile // u * u, u)
    overlap = min(max(overlap, 0), tile - u)
    step = max((tile - overlap) // u * u, u)
    out = torch.zeros(n, spec.out_channels, hp * s, wp * s)
    ys, xs = _starts(hp, tile, step, u), _starts(wp, tile, step, u)
    for y0, (ya, yb) in zip(ys, _cuts(ys, tile, hp), strict=True):
        for x0, (xa, xb) in zip(xs, _cuts(xs, tile, wp), strict=True):
            piece = x[:, :, y0 : y0 + tile, x0 : x0 + tile].to(param.device, param.dtype)
            y = model(piece).float().cpu()
            out[:, :, ya * s : yb * s, xa * s : xb * s] = y[
                :, :, (ya - y0) * s : (yb - y0) * s, (xa - x0) * s : (xb - x0) * s
            ]
    return out[:, :, : h * s, : w * s]


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
    "DEFAULT_OVERLAP",
    "DEFAULT_TILE",
    "RRDB",
    "RRDBNet",
    "ResidualDenseBlock",
    "SRVGGNetCompact",
    "UpscalerSpec",
    "build_upscaler",
    "spec_of",
    "upscale_image",
    "upscale_once",
    "upscale_tensor",
]
