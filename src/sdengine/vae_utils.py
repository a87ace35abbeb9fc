"""The VAE around the sampler: images <-> latents safely, in tiles when large, and a cheap latent preview.

* :func:`encode` / :func:`decode` take and give the *diffusion model's* latents (scaled by the VAE's
  ``scaling_factor``) and images in ``[-1, 1]``; they tile automatically above a size, or when asked.
* fp16 safety: SD's VAE can overflow in float16 (NaN/inf in the decoded image, Stable Diffusion's "black
  images"). :func:`decode` checks the result and decodes again in float32 with a warning; the caller keeps
  the returned flag so that later images go straight to float32 (A1111's automatic "--no-half-vae").
* Tiling: the latent is cut into overlapping tiles, each tile is decoded on its own and the overlaps are
  blended with linear ramps. GroupNorm statistics are per tile, so the result is not bit-equal to an
  untiled decode; the tests state the measured difference (see tests/test_pipeline_vae.py).
* :func:`latent_preview`: a fixed linear map from the latent channels to RGB (the "cheap approximation" of
  A1111's live preview), no network call, so it can run after every step. Each latent space has its own map
  (:class:`LatentRGBMap`: SD's 4 channels, SD3's, Flux's and Qwen-Image's 16, FLUX.2's 128 in 2x2 patches); the
  pipeline names its family's (``Pipeline.latent_rgb_map``). A latent with no known map shows the mean of its
  channels in grey.
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sdengine.models.vae import AutoencoderKL, DiagonalGaussian

log = logging.getLogger(__name__)

# Tiles in latent units: 64 latents = 512 pixels for SD, the size the VAE was trained on; 16 of overlap.
TILE_LATENT = 64
OVERLAP_LATENT = 16
# Tile automatically when an image has more latent positions than this (SD: above 1024x1024 pixels).
AUTO_TILE_LATENT_AREA = 128 * 128


@dataclass(frozen=True)
class LatentRGBMap:
    """A fixed linear map from one latent space's channels to RGB, ``rgb = latent @ factors + bias`` per
    position, roughly in [-1, 1]: a least-squares fit of the VAE's decode, averaged over each 8x8 patch (the
    "cheap approximation" previews). ``factors`` has one (R, G, B) row per latent channel; the maps apply to the
    diffusion model's latents (scaled, and shifted where the VAE has a ``shift_factor``), the ones the sampler
    sees."""

    name: str
    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # The diffusion latent holds the factors' channels in patch x patch patches (FLUX.2: the VAE's 32 channels in
    # 2x2 patches, 128): channel ``patch**2 * c + patch * dy + dx`` is channel ``c``'s pixel (dy, dx) of each patch.
    # The preview takes the patches apart first, so it is ``patch`` times the latent's size.
    patch: int = 1

    @property
    def channels(self) -> int:
        """The diffusion latent's channel count this map reads (the factors' rows times ``patch**2``)."""
        return len(self.factors) * self.patch**2


# SD 1.x/2.x (4 channels): A1111's approximation (modules/sd_samplers_common.py), no bias.
SD_LATENT_RGB = LatentRGBMap(
    "sd",
    (
        (0.298, 0.207, 0.208),
        (0.187, 0.286, 0.173),
        (-0.158, 0.189, 0.264),
        (-0.184, -0.271, -0.473),
    ),
)

# SD3 / SD3.5 (16 channels) and FLUX.1 (16 channels, another VAE): ComfyUI's latent_rgb_factors and
# latent_rgb_factors_bias of its SD3 and Flux latent formats (comfy/latent_formats.py, classes SD3 and Flux),
# which its Latent2RGB previewer applies to the sampler's x0 estimate, in the model's (scaled and shifted) space.
SD3_LATENT_RGB = LatentRGBMap(
    "sd3",
    (
        (-0.0922, -0.0175, 0.0749),
        (0.0311, 0.0633, 0.0954),
        (0.1994, 0.0927, 0.0458),
        (0.0856, 0.0339, 0.0902),
        (0.0587, 0.0272, -0.0496),
        (-0.0006, 0.1104, 0.0309),
        (0.0978, 0.0306, 0.0427),
        (-0.0042, 0.1038, 0.1358),
        (-0.0194, 0.0020, 0.0669),
        (-0.0488, 0.0130, -0.0268),
        (0.0922, 0.0988, 0.0951),
        (-0.0278, 0.0524, -0.0542),
        (0.0332, 0.0456, 0.0895),
        (-0.0069, -0.0030, -0.0810),
        (-0.0596, -0.0465, -0.0293),
        (-0.1448, -0.1463, -0.1189),
    ),
    (0.2394, 0.2135, 0.1925),
)
FLUX_LATENT_RGB = LatentRGBMap(
    "flux",
    (
        (-0.0346, 0.0244, 0.0681),
        (0.0034, 0.0210, 0.0687),
        (0.0275, -0.0668, -0.0433),
        (-0.0174, 0.0160, 0.0617),
        (0.0859, 0.0721, 0.0329),
        (0.0004, 0.0383, 0.0115),
        (0.0405, 0.0861, 0.0915),
        (-0.0236, -0.0185, -0.0259),
        (-0.0245, 0.0250, 0.1180),
        (0.1008, 0.0755, -0.0421),
        (-0.0515, 0.0201, 0.0011),
        (0.0428, -0.0012, -0.0036),
        (0.0817, 0.0765, 0.0749),
        (-0.1264, -0.0522, -0.1103),
        (-0.0280, -0.0881, -0.0499),
        (-0.1262, -0.0982, -0.0778),
    ),
    (-0.0329, -0.0718, -0.0851),
)
# Qwen-Image (16 channels, Wan 2.1's latent space: its VAE is a fine-tune of Wan 2.1's with the same latents_mean /
# latents_std): ComfyUI's Wan21 latent format's latent_rgb_factors and latent_rgb_factors_bias, in the model's
# (standardised) space like the others.
QWEN_IMAGE_LATENT_RGB = LatentRGBMap(
    "qwen_image",
    (
        (-0.1299, -0.1692, 0.2932),
        (0.0671, 0.0406, 0.0442),
        (0.3568, 0.2548, 0.1747),
        (0.0372, 0.2344, 0.1420),
        (0.0313, 0.0189, -0.0328),
        (0.0296, -0.0956, -0.0665),
        (-0.3477, -0.4059, -0.2925),
        (0.0166, 0.1902, 0.1975),
        (-0.0412, 0.0267, -0.1364),
        (-0.1293, 0.0740, 0.1636),
        (0.0680, 0.3019, 0.1128),
        (0.0032, 0.0581, 0.0639),
        (-0.1251, 0.0927, 0.1699),
        (0.0060, -0.0633, 0.0005),
        (0.3477, 0.2275, 0.2950),
        (0.1984, 0.0913, 0.1861),
    ),
    (-0.1835, -0.0868, -0.3360),
)
# FLUX.2 (klein and dev: the 32-channel FLUX.2 VAE): ComfyUI's Flux2 latent format's latent_rgb_factors (one row per
# VAE channel) and latent_rgb_factors_bias. ComfyUI's FLUX.2 latent is sdengine's diffusion latent, (B, 128, h, w):
# the VAE's latent in 2x2 patches, each of the 128 channels normalised by the VAE's batch-norm statistics (its
# process_in / process_out are the identity), and its previewer first lays the 128 channels out as 32 at twice the
# size (channel 4c + 2dy + dx -> channel c, pixel (2i + dy, 2j + dx)), then applies the factors: the normalised
# values, not the raw VAE latent.
FLUX2_LATENT_RGB = LatentRGBMap(
    "flux2",
    (
        (0.0058, 0.0113, 0.0073),
        (0.0495, 0.0443, 0.0836),
        (-0.0099, 0.0096, 0.0644),
        (0.2144, 0.3009, 0.3652),
        (0.0166, -0.0039, -0.0054),
        (0.0157, 0.0103, -0.0160),
        (-0.0398, 0.0902, -0.0235),
        (-0.0052, 0.0095, 0.0109),
        (-0.3527, -0.2712, -0.1666),
        (-0.0301, -0.0356, -0.0180),
        (-0.0107, 0.0078, 0.0013),
        (0.0746, 0.0090, -0.0941),
        (0.0156, 0.0169, 0.0070),
        (-0.0034, -0.0040, -0.0114),
        (0.0032, 0.0181, 0.0080),
        (-0.0939, -0.0008, 0.0186),
        (0.0018, 0.0043, 0.0104),
        (0.0284, 0.0056, -0.0127),
        (-0.0024, -0.0022, -0.0030),
        (0.1207, -0.0026, 0.0065),
        (0.0128, 0.0101, 0.0142),
        (0.0137, -0.0072, -0.0007),
        (0.0095, 0.0092, -0.0059),
        (0.0000, -0.0077, -0.0049),
        (-0.0465, -0.0204, -0.0312),
        (0.0095, 0.0012, -0.0066),
        (0.0290, -0.0034, 0.0025),
        (0.0220, 0.0169, -0.0048),
        (-0.0332, -0.0457, -0.0468),
        (-0.0085, 0.0389, 0.0609),
        (-0.0076, 0.0003, -0.0043),
        (-0.0111, -0.0460, -0.0614),
    ),
    (-0.0329, -0.0718, -0.0851),
    patch=2,
)
LATENT_RGB_MAPS = {
    m.name: m for m in (SD_LATENT_RGB, SD3_LATENT_RGB, FLUX_LATENT_RGB, QWEN_IMAGE_LATENT_RGB, FLUX2_LATENT_RGB)
}


def downscale_factor(vae: AutoencoderKL) -> int:
    return vae.config.downscale_factor


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering ``size`` with tiles of ``tile`` overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)  # the last tile ends at the border
    return starts


def blend_ramp(n: int, overlap: int, lead: bool, trail: bool, device: torch.device) -> Tensor:
    """1-D blend weights over a tile of length ``n``: linear ramps over ``overlap`` where a neighbour is."""
    w = torch.ones(n, device=device)
    if overlap > 0:
        r = (torch.arange(overlap, device=device, dtype=torch.float32) + 0.5) / overlap
        if lead:
            w[:overlap] = torch.minimum(w[:overlap], r)
        if trail:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w


def _tiled(fn, x: Tensor, scale: float, tile: int, overlap: int, out_channels: int) -> Tensor:
    """Apply ``fn`` (a map that resizes by ``scale``) over overlapping tiles of ``x`` and blend the results."""
    _, _, h, w = x.shape
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    out: Tensor | None = None
    weight: Tensor | None = None
    for y in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = fn(x[:, :, y : y + th, x0 : x0 + tw]).float()  # (B, C', th*s, tw*s)
            if out is None:
                out = torch.zeros(x.shape[0], out_channels, round(h * scale), round(w * scale), device=piece.device)
                weight = torch.zeros(1, 1, out.shape[2], out.shape[3], device=piece.device)
            oh, ow = piece.shape[2], piece.shape[3]
            ov = round(overlap * scale)
            wy = blend_ramp(oh, ov, y > 0, y + th < h, piece.device)
            wx = blend_ramp(ow, ov, x0 > 0, x0 + tw < w, piece.device)
            wt = (wy[:, None] * wx[None, :])[None, None]
            oy, ox = round(y * scale), round(x0 * scale)
            out[:, :, oy : oy + oh, ox : ox + ow] += piece * wt
            weight[:, :, oy : oy + oh, ox : ox + ow] += wt  # type: ignore[index]
    assert out is not None and weight is not None
    return out / weight


def _should_tile(latent_h: int, latent_w: int, tiled: bool | None, tile: int) -> bool:
    if tiled is not None:
        return tiled and (latent_h > tile or latent_w > tile)
    return latent_h * latent_w > AUTO_TILE_LATENT_AREA


def encode_moments(
    vae: AutoencoderKL,
    images: Tensor,
    *,
    tiled: bool | None = None,
    tile: int = TILE_LATENT,
    overlap: int = OVERLAP_LATENT,
) -> DiagonalGaussian:
    """The posterior q(z | x) for images in [-1, 1] (B, 3, H, W), in the VAE's own (unscaled) latents.
    Tiled: mean and log-variance blended over image tiles of ``tile`` latents overlapping by ``overlap``."""
    f = downscale_factor(vae)
    dtype = next(vae.parameters()).dtype
    x = images.to(dtype)
    if not _should_tile(x.shape[2] // f, x.shape[3] // f, tiled, tile):
        return vae.encode(x)

    def moments(tile: Tensor) -> Tensor:
        post = vae.encode(tile)
        return torch.cat([post.mean, post.logvar], dim=1)

    c = 2 * vae.config.latent_channels
    m = _tiled(moments, x, 1 / f, tile * f, overlap * f, c)
    return DiagonalGaussian(m.to(dtype))


class PointPosterior:
    """A latent with no spread, in a posterior's shape (``mean``, ``std`` of zeros, ``mode``): what the tiny VAE's
    encoder gives. Rows drawn from it (``pipeline.latents.posterior_rows``) still take their noise draw, so each
    row's generator advances as with the full VAE and the same seed gives the same sampling noise."""

    def __init__(self, mean: Tensor) -> None:
        self.mean = mean
        self.std = torch.zeros_like(mean)

    def mode(self) -> Tensor:
        return self.mean


def tiny_encode_moments(tiny: Any, vae: AutoencoderKL, images: Tensor) -> PointPosterior:
    """The tiny VAE's latent of images in [-1, 1] (B, 3, H, W), unscaled like :func:`encode_moments`' mean (so
    callers treat both alike), in the VAE's dtype. ``tiny`` must have an encoder."""
    dtype = next(vae.parameters()).dtype
    z = tiny.encode(images.to(next(tiny.parameters()).dtype)).float()  # the diffusion model's (scaled) latents
    return PointPosterior(vae.unscale_latents(z).to(dtype))


def encode(
    vae: AutoencoderKL,
    images: Tensor,
    generators: Sequence[torch.Generator] | None,
    *,
    tiled: bool | None = None,
) -> Tensor:
    """Images in [-1, 1] -> the diffusion model's latents, one posterior sample per row drawn from
    ``generators[row]`` (diffusers' ``latent_dist.sample(generator)``); the mode when no generators."""
    post = encode_moments(vae, images, tiled=tiled)  # default tiles
    z = post.sample(list(generators)) if generators is not None else post.mode()
    return vae.scale_latents(z.float())


def _decode_raw(
    vae: AutoencoderKL,
    latents: Tensor,
    tiled: bool | None,
    tile: int,
    overlap: int,
    decoder: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    dtype = next(vae.parameters()).dtype
    z = vae.unscale_latents(latents.float()).to(dtype)
    if not _should_tile(z.shape[2], z.shape[3], tiled, tile):
        return (decoder or vae.decode)(z).float()
    f = downscale_factor(vae)
    return _tiled(vae.decode, z, f, tile, overlap, vae.config.out_channels)


def decode(
    vae: AutoencoderKL,
    latents: Tensor,
    *,
    tiled: bool | None = None,
    upcast: bool = False,
    warn: bool = True,
    tile: int = TILE_LATENT,
    overlap: int = OVERLAP_LATENT,
    decoder: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, bool]:
    """The diffusion model's latents (B, C, h, w) -> float32 images in [-1, 1]-ish (B, 3, H, W).

    ``decoder`` replaces ``vae.decode`` for an untiled decode in the VAE's own dtype (the pipeline's CUDA graph
    of it, sdengine.cuda_graphs); the float32 redo of a half decode always calls the VAE itself.

    Returns ``(images, upcast_needed)``: when a half-precision VAE gives NaN/inf, the decode is redone in
    float32 (with a RuntimeWarning unless ``warn`` is False) and the flag is True; pass ``upcast=True``
    afterwards to skip the half try.
    """
    dtype = next(vae.parameters()).dtype
    half = dtype in (torch.float16, torch.bfloat16)
    if half and not upcast:
        img = _decode_raw(vae, latents, tiled, tile, overlap, decoder)
        if bool(torch.isfinite(img).all()):
            return img, False
        if warn:
            warnings.warn(
                f"the VAE decode in {str(dtype).removeprefix('torch.')} gave NaN/inf values; decoding again in float32",
                RuntimeWarning,
                stacklevel=2,
            )
    if not half:
        return _decode_raw(vae, latents, tiled, tile, overlap, decoder), False
    # Upcast in place and back: fp16 -> fp32 -> fp16 is exact, and no second copy of the weights is kept.
    vae.float()
    try:
        img = _decode_raw(vae, latents, tiled, tile, overlap)
    finally:
        vae.to(dtype)
    return img, True


def to_unit(images: Tensor) -> Tensor:
    """VAE output in [-1, 1] -> [0, 1], clamped (diffusers' ``denormalize``)."""
    return (images / 2 + 0.5).clamp(0, 1)


@functools.lru_cache(maxsize=16)
def _map_tensors(rgb_map: LatentRGBMap, device: torch.device) -> tuple[Tensor, Tensor]:
    """A map's (C, 3) factors and (3,) bias on ``device``, made once (no host copy on a GPU preview's path)."""
    return torch.tensor(rgb_map.factors, device=device), torch.tensor(rgb_map.bias, device=device)


def latent_rgb(latents: Tensor, rgb_map: LatentRGBMap | None = None) -> Tensor:
    """(B, C, h, w) latents -> uint8 (B, h, w, 3) RGB at latent resolution, computed where the latents are.

    ``rgb_map``: the latent space's map (the pipeline's ``latent_rgb_map``; a patched map's picture is ``patch``
    times the latent's size: FLUX.2's, H/8 x W/8 pixels of its H/16 x W/16 latent). Without one, or when its channel
    count is not the latents' (never an error: a preview must not stop a generation), 4-channel latents use SD's
    map and any other count shows the mean of its channels in grey."""
    z = latents.detach().float()
    if rgb_map is None or rgb_map.channels != z.shape[1]:
        rgb_map = SD_LATENT_RGB if z.shape[1] == SD_LATENT_RGB.channels else None
    if rgb_map is not None:
        factors, bias = _map_tensors(rgb_map, z.device)
        p = rgb_map.patch
        if p > 1:  # (B, C p^2, h, w) -> (B, C, h p, w p): channel p^2 c + p dy + dx is pixel (p i + dy, p j + dx)
            b, _, h, w = z.shape
            z = z.reshape(b, -1, p, p, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, -1, h * p, w * p)
        rgb = torch.einsum("bchw,cr->bhwr", z, factors) + bias
    else:
        rgb = z.mean(dim=1)[..., None].expand(*z.shape[:1], *z.shape[2:], 3)
    return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


def latent_rgb_for(rgb_map: LatentRGBMap | None) -> Callable[[Tensor], Tensor]:
    """:func:`latent_rgb` with ``rgb_map`` fixed: a ``to_rgb`` for :class:`LatentPreviewer`."""

    def to_rgb(latents: Tensor) -> Tensor:
        return latent_rgb(latents, rgb_map)

    return to_rgb


def tiny_vae_rgb(tiny: Any) -> Callable[[Tensor], Tensor]:
    """latents -> uint8 (B, H, W, 3) full-size RGB by a tiny VAE's decoder (sdengine.models.tiny_vae), computed
    where the latents are: a preview close to the final image for about a tenth of the VAE's cost."""

    def to_rgb(latents: Tensor) -> Tensor:
        dtype = next(tiny.parameters()).dtype
        with torch.inference_mode():
            img = tiny.decode(latents.detach().to(dtype)).float()
        rgb = to_unit(torch.nan_to_num(img)).permute(0, 2, 3, 1)
        return rgb.mul(255).round().to(torch.uint8)

    return to_rgb


def latent_preview(latents: Tensor, rgb_map: LatentRGBMap | None = None) -> np.ndarray:
    """(B, C, h, w) latents -> uint8 (B, h, w, 3) RGB at latent resolution, without the VAE (:func:`latent_rgb`
    with ``rgb_map``, computed on the CPU). Meant for progress previews, not for output; waits for the device. A
    sampling loop that must not wait uses :class:`LatentPreviewer`."""
    return latent_rgb(latents.detach().float().cpu(), rgb_map).numpy()


class LatentPreviewer:
    """Previews that never make a sampling loop on a GPU wait.

    ``submit(latents, tag)`` queues the RGB map on the device and its copy into pinned host memory behind the
    step's own work, and returns at once; ``take()`` hands back ``(tag, frame)`` of the newest submission whose
    copy has finished (None while none has; an older unfinished one is dropped when a newer is submitted),
    ``take(wait=True)`` waits for the newest (the last step's preview). The frame shown is then at most one preview
    behind the sampler. On the CPU the map is computed at once, so ``take()`` after ``submit`` always has it.
    """

    def __init__(self, to_rgb: Callable[[Tensor], Tensor] | None = None) -> None:
        # latents -> uint8 (B, h, w, 3) on their device: latent_rgb, or tiny_vae_rgb(a tiny VAE)
        self.to_rgb = to_rgb or latent_rgb
        self._pending: tuple[Any, Tensor, Any] | None = None  # (CUDA event, pinned host tensor, tag)
        self._done: tuple[Any, np.ndarray] | None = None

    def _harvest(self, wait: bool) -> None:
        if self._pending is None:
            return
        event, host, tag = self._pending
        if wait:
            event.synchronize()
        if wait or event.query():
            self._done, self._pending = (tag, host.numpy()), None

    def submit(self, latents: Tensor, tag: Any = None) -> None:
        self._harvest(wait=False)
        rgb = self.to_rgb(latents)
        if rgb.device.type != "cuda":
            self._done, self._pending = (tag, rgb.cpu().numpy()), None
            return
        host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
        host.copy_(rgb, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(rgb.device))  # the copy's stream: rgb's GPU, maybe not the current one
        self._pending = (event, host, tag)

    def take(self, *, wait: bool = False) -> tuple[Any, np.ndarray] | None:
        self._harvest(wait)
        out, self._done = self._done, None
        return out


# ---------------------------------------------------------------------------------------------------
# Memory estimate (refuse before allocating)
# ---------------------------------------------------------------------------------------------------


def vae_decode_bytes(vae: AutoencoderKL, height: int, width: int, *, tiled: bool, bytes_per: int) -> int:
    """Rough peak activation memory of decoding one image: the widest full-size feature maps of the
    decoder (an up-sampled map of the previous level's width, its conv output, a norm temporary)."""
    chans = list(reversed(vae.config.block_out_channels))  # decoder order: deepest level first
    f = vae.config.downscale_factor
    if tiled:
        height, width = min(height, TILE_LATENT * f), min(width, TILE_LATENT * f)
    peak = 0
    for i, c in enumerate(chans):
        scale = 2 ** (len(chans) - 1 - i)  # level i runs at H / scale
        area = (height // scale) * (width // scale)
        prev = chans[i - 1] if i > 0 else c
        peak = max(peak, area * (2 * max(c, prev) + c))
    return peak * bytes_per


def available_memory(device: torch.device) -> int | None:
    """Bytes that can still be allocated on ``device`` (None when it cannot be told)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None
