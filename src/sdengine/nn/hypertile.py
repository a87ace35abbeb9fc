"""HyperTile (tfernd, https://github.com/tfernd/HyperTile): the U-Net's self-attention runs within tiles of the
feature map, each tile its own attention, so a large image's self-attention costs ``nh * nw`` times less.

A self-attention layer over an ``H x W`` grid of tokens is cut into ``nh`` rows and ``nw`` columns of tiles of
``H / nh x W / nw`` tokens; the queries, keys and values of one tile attend to each other only, then the tiles go back
to their places. Cross-attention (the prompt) is never tiled.

How many tiles (AUTOMATIC1111's built-in Hypertile, rule ``"a1111"``, and ComfyUI's ``HyperTile`` node, ``"comfyui"``,
read for facts): a layer of depth ``d`` has a smallest tile side ``m`` in tokens,

- ``"a1111"``: ``t = min(T, tile_size)`` where ``T`` is the largest power of two dividing both the image's width and
  height in pixels (the latent's times the VAE's downscale, 8), then ``m = max(128, t) // 8 * 2**d`` (``2**d`` only
  with ``scale_depth``, which A1111 always has);
- ``"comfyui"``: ``m = max(32, tile_size) // 8``, times ``2**d`` with ``scale_depth`` (the node's default is off).

For a side of ``n`` tokens, the candidates are the side's divisors ``i`` from ``min(m, n)`` up, smallest first, the
first ``swap_size`` of them (0 counts as 1), each giving ``n // i`` tiles along that side; one is drawn uniformly with
a ``random.Random`` seeded with the run's first seed at the start of each pass (A1111 seeds its generator with the
first seed before the first pass and again before the hires fix's second pass). Every call of a tiled layer draws the
rows' count, then the columns'; under ``"a1111"`` a draw is made even where there is one candidate (A1111 does), under
``"comfyui"`` only where there are several.

Which layers, by depth (``max_depth`` and shallower are tiled):

- ``"a1111"``: SD 1.x / 2.x, the self-attention layers of resolution level ``d`` (the middle block is the deepest);
  SDXL (a U-Net with the text-time vector), A1111's table: the first attention level's first transformer block is
  depth 0, its other blocks and every deeper level's blocks depth 1, the middle block depth 2;
- ``"comfyui"``: every self-attention layer whose token count is ``(H / 2**d) * (W / 2**d)`` of the latent's
  ``H x W`` for a ``d`` of 0 to ``max_depth`` (the first such ``d`` is its depth; a level that halves an odd side
  is left alone). Without Deep Shrink that is the layers of resolution level ``d``; under Deep Shrink
  (:mod:`sdengine.nn.deep_shrink`) a layer is matched by the tokens of its shrunk feature map against the latent
  the model was called with, as ComfyUI's node reads ``original_shape``: a level-1 layer shrunk by 2 has the tokens
  of depth 2, tiled (with depth 2's tile size) only when ``max_depth`` reaches 2, and a level-0 layer after a shrunk
  block 1 or 2 is no longer depth 0. (The check that some layer is tiled still counts the layers by level.)

Where sdengine differs from both tools (docs/CONTRACTS.md): the tiles are rectangles of the layer's true ``H x W``
grid. Both tools recover the grid from the token count and the aspect ratio as ``round(sqrt(L * W / H))`` "rows" of
``round(sqrt(L * H / W))``, which for a non-square image is the grid transposed, so their tiles there are not
rectangles of the image; for square images the tiles are the same. ComfyUI's node tiles only the queries (its
attention then reads the untiled keys and values in contiguous chunks of the token sequence); sdengine tiles the
queries, keys and values together, as A1111 and the HyperTile paper do.

With self-attention guidance (:mod:`sdengine.diffusion.sag`), whose map is the middle block's first self-attention
layer's over the whole grid: where that layer is not cut (one tile: the usual case, the middle block being the
deepest), SAG reads the map of the attention the layer ran and the other layers are tiled as without SAG. A call
that would cut it while SAG reads its map is a one-line error: the layer would run tile-local attention whose map is
not the whole-grid one SAG's mask is made of (ComfyUI's node there hands SAG the tiles' score matrices, a map of
another size that its blur map reshapes or fails on), so neither reading is a true SAG.

:func:`hypertile_applied` installs it on a :class:`sdengine.models.unet.UNet` for a block of code;
:class:`HyperTileNet` wraps a network call in it (the latent's size is read from each call's input).

HyperTile on the VAE (A1111's Hypertile VAE: ``hypertile_enable_vae``, its ``hypertile.py`` read for facts): the one
layer tiled is the VAE decoder's middle-block self-attention (A1111's ``decoder.mid_block.attentions.0`` /
``decoder.mid.attn_1``, depth 0: every ``max_depth`` tiles it; the encoder's is never tiled, so an encode is as
without it). The whole block (its group norm, attention, output projection and residual) runs on each tile of the
``(B, C, H, W)`` map as its own batch row, as A1111 wraps the block's forward: the group norm's statistics are each
tile's own. Tile counts: the ``"a1111"`` rule at depth 0 (``max(128, min(T, tile_size)) // 8`` latent cells, ``T``
the decoded image's largest power-of-two divisor), a draw of the rows' count then the columns' at each decode (made
even with one candidate), from a generator seeded with the first seed (:func:`vae_hypertile_applied`). A1111 has
one generator for the U-Net and the VAE: where the U-Net is tiled too, the pipeline hands the VAE's generator to the
U-Net's pass (reseeded with the first seed at the pass's start, as A1111 reseeds before each tiled pass), so the
decode draws after the U-Net's draws as there.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from sdengine.errors import UsageError

HYPERTILE_RULES = ("a1111", "comfyui")
MAX_TILE_SIZE = 2048  # pixels (ComfyUI's node range; A1111's slider stops at 512)
MAX_SWAP_SIZE = 128  # ComfyUI's node range (A1111's slider: 64)
MAX_DEPTH = 10  # ComfyUI's node range (A1111's slider: 3; deeper than a U-Net has tiles all of its levels)
LATENT_FACTOR = 8  # pixels per latent cell of SD's VAE (the tile sizes' unit; a model's own VAE gives the image's)

_SELF_ATTENTION = re.compile(
    r"^(?:(?P<kind>down_blocks|up_blocks)\.(?P<block>\d+)|mid_block)\.attentions\.\d+"
    r"\.transformer_blocks\.(?P<tb>\d+)\.attn1$"
)


def _whole(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise UsageError(f"HyperTile {name} must be a whole number in [{lo}, {hi}], got {v!r}")
    return int(v)


@dataclass(frozen=True)
class HyperTile:
    """The HyperTile settings of a call: ``tile_size`` in pixels (A1111's "max tile size", ComfyUI's "tile_size"),
    ``swap_size`` (how many tile counts to draw from), ``max_depth`` (the deepest layers tiled), ``rule`` "a1111" or
    "comfyui" (module docstring), ``scale_depth`` (the smallest tile doubles with each depth)."""

    tile_size: int = 256
    swap_size: int = 3
    max_depth: int = 3
    rule: str = "a1111"
    scale_depth: bool = True

    def __post_init__(self) -> None:
        _whole("tile_size", self.tile_size, 0, MAX_TILE_SIZE)
        _whole("swap_size", self.swap_size, 0, MAX_SWAP_SIZE)
        _whole("max_depth", self.max_depth, 0, MAX_DEPTH)
        if self.rule not in HYPERTILE_RULES:
            raise UsageError(f"unknown HyperTile rule {self.rule!r}; use one of: {', '.join(HYPERTILE_RULES)}")
        if not isinstance(self.scale_depth, bool):
            raise UsageError(f"HyperTile scale_depth must be true or false, got {self.scale_depth!r}")

    @property
    def key(self) -> tuple[int, int, int, str, bool]:
        """(tile_size, swap_size, max_depth, rule, scale_depth): ``HyperTile(*key)`` makes them again."""
        return (self.tile_size, self.swap_size, self.max_depth, self.rule, self.scale_depth)


def largest_power_of_two_tile(width: int, height: int) -> int:
    """The largest power of two dividing both ``width`` and ``height`` (A1111's cap on the tile size, in pixels)."""
    g = math.gcd(int(width), int(height))
    if g == 0:
        return 1
    return g & -g


def smallest_tile(settings: HyperTile, depth: int, width: int, height: int, scale: int = LATENT_FACTOR) -> int:
    """The smallest tile side in tokens at ``depth`` for an image of ``width x height`` pixels, ``scale`` pixels
    per latent cell (both tools divide by SD's 8; a model with another VAE downscale gets its own)."""
    if settings.rule == "a1111":
        t = min(largest_power_of_two_tile(width, height), settings.tile_size)
        side = max(128, t) // scale
    else:
        side = max(32, settings.tile_size) // scale
    return side * (2**depth if settings.scale_depth else 1)


def tile_counts(n: int, smallest: int, swap_size: int) -> list[int]:
    """The tile counts a side of ``n`` tokens may be cut into: ``n // i`` for its divisors ``i`` from
    ``min(smallest, n)`` up, smallest ``i`` (most tiles) first, the first ``max(1, swap_size)`` of them."""
    lo = max(1, min(int(smallest), n))
    sides = [i for i in range(lo, n + 1) if n % i == 0]
    return [n // i for i in sides[: max(1, int(swap_size))]]


def draw_count(counts: list[int], rng: random.Random, *, always: bool) -> int:
    """One of ``counts`` drawn uniformly by ``rng`` (``rng.randint``); with one candidate, a draw is still made
    when ``always`` (A1111's generator advances either way)."""
    if len(counts) > 1 or always:
        return counts[rng.randint(0, len(counts) - 1)]
    return counts[0]


def tiled_attention(x: Tensor, height: int, width: int, nh: int, nw: int, attend: Callable[[Tensor], Tensor]) -> Tensor:
    """``attend`` (B', L', C) -> (B', L', C') run on each of the ``nh x nw`` tiles of the row-major ``height x width``
    token grid of ``x`` (B, height * width, C) as its own batch row; the result back in ``x``'s token order."""
    B, L, C = x.shape
    if nh * nw == 1:
        return attend(x)
    th, tw = height // nh, width // nw
    t = x.reshape(B, nh, th, nw, tw, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, th * tw, C)
    out = attend(t)
    D = out.shape[-1]
    out = out.reshape(B, nh, nw, th, tw, D).permute(0, 1, 3, 2, 4, 5).reshape(B, L, D)
    return out


class HyperTileRun:
    """One pass's state: the settings, the generator (seeded with the run's first seed) and the latent's size of
    the current call; ``scale``: pixels per latent cell (the VAE's downscale; the image's size is the latent's
    times it)."""

    def __init__(
        self, settings: HyperTile, seed: int, scale: int = LATENT_FACTOR, rng: random.Random | None = None
    ) -> None:
        self.settings = settings
        self.scale = int(scale)
        # ``rng``: a generator shared with another run (A1111's one generator for the U-Net and the VAE), seeded
        # here; else its own
        self.rng = rng if rng is not None else random.Random()
        self.rng.seed(int(seed))
        self.latent: tuple[int, int] = (0, 0)
        self.chosen: list[tuple[int, int]] = []  # (nh, nw) of each tiled call, in order (for tests and notes)

    def grid(self, level: int) -> tuple[int, int]:
        """The token grid at resolution ``level`` (each downsampling halves a side, rounding up)."""
        h, w = self.latent
        for _ in range(level):
            h, w = (h + 1) // 2, (w + 1) // 2
        return h, w

    def choose(self, height: int, width: int, depth: int) -> tuple[int, int]:
        s = self.settings
        lh, lw = self.latent
        m = smallest_tile(s, depth, lw * self.scale, lh * self.scale, self.scale)
        always = s.rule == "a1111"
        nh = draw_count(tile_counts(height, m, s.swap_size), self.rng, always=always)
        nw = draw_count(tile_counts(width, m, s.swap_size), self.rng, always=always)
        self.chosen.append((nh, nw))
        return nh, nw


class LayerTiles:
    """What a tiled self-attention layer calls in place of its attention (``Attention.hypertile``)."""

    def __init__(self, run: HyperTileRun, level: int, depth: int, layer: Any = None) -> None:
        self.run, self.level, self.depth = run, level, depth
        self.layer = layer  # the attention layer it tiles (its SAG probe is read: see __call__)

    def __call__(self, x: Tensor, attend: Callable[[Tensor], Tensor], grid: tuple[int, int] | None = None) -> Tensor:
        """``grid``: the (H, W) of the layer's feature map as its transformer saw it (a hidden state Deep Shrink
        resized is tiled at its own size, as A1111 reads it from the token count); else the level's size."""
        run = self.run
        h, w = grid if grid is not None and grid[0] * grid[1] == x.shape[1] else run.grid(self.level)
        if h * w != x.shape[1]:  # not this layer's grid (a model of another shape): as it is
            return attend(x)
        depth = self.depth
        if run.settings.rule == "comfyui":
            found = comfyui_depth(run.latent, int(x.shape[1]), run.settings.max_depth)
            if found is None:  # ComfyUI matches the depth by this exact product of the called latent's sides
                return attend(x)
            depth = found
        nh, nw = run.choose(h, w, depth)
        if nh * nw > 1 and getattr(self.layer, "map_probe", None) is not None:
            raise UsageError(
                f"HyperTile cuts the middle block's self-attention ({h}x{w} tokens) into {nh}x{nw} tiles, whose "
                "map self-attention guidance reads: lower HyperTile's max_depth or raise its tile size, or drop SAG"
            )
        return tiled_attention(x, h, w, nh, nw, attend)


def tiled_map(x: Tensor, nh: int, nw: int, block: Callable[[Tensor], Tensor]) -> Tensor:
    """``block`` (B', C, h, w) -> (B', C', h, w) run on each of the ``nh x nw`` tiles of the map ``x`` (B, C, H, W)
    as its own batch row (rows ordered batch, tile row, tile column); the result put back together (B, C', H, W)."""
    if nh * nw == 1:
        return block(x)
    B, C, H, W = x.shape
    th, tw = H // nh, W // nw
    t = x.reshape(B, C, nh, th, nw, tw).permute(0, 2, 4, 1, 3, 5).reshape(B * nh * nw, C, th, tw)
    out = block(t)
    D = out.shape[1]
    return out.reshape(B, nh, nw, D, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(B, D, H, W)


def vae_hypertile_layer(vae: Any) -> Any:
    """The layer HyperTile tiles in ``vae``: its decoder's middle-block self-attention (a one-line error for a VAE
    without one: a tiny VAE, or a VAE built without the middle block's attention)."""
    attentions = getattr(getattr(getattr(vae, "decoder", None), "mid_block", None), "attentions", None)
    if not attentions or not hasattr(attentions[0], "spatial_tiles"):
        raise UsageError(
            f"HyperTile VAE tiles the VAE decoder's middle-block self-attention, which this {type(vae).__name__} "
            "does not have: turn hypertile_vae off"
        )
    return attentions[0]


class VaeTiles:
    """What the VAE decoder's middle-block attention calls in place of itself (``spatial_tiles``): the tile counts of
    each call drawn by ``run`` (depth 0, ``run.latent`` the decoded latent's size), the block run per tile."""

    def __init__(self, run: HyperTileRun) -> None:
        self.run = run

    def __call__(self, x: Tensor, block: Callable[[Tensor], Tensor]) -> Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        if self.run.latent == (0, 0):  # called outside a decode that set it: the map is at the latent's size
            self.run.latent = (h, w)
        nh, nw = self.run.choose(h, w, 0)
        return tiled_map(x, nh, nw, block)


@contextmanager
def vae_hypertile_applied(vae: Any, run: HyperTileRun | None, latent: tuple[int, int] | None = None) -> Iterator[None]:
    """``vae``'s decoder's middle-block attention runs HyperTile with ``run`` inside the block (``None``: as it is);
    ``latent``: the (h, w) of the whole latent being decoded (its image's size picks the tile size, also when a tiled
    decode calls the decoder on parts of it). As before after it, whatever happens."""
    if run is None:
        yield
        return
    layer = vae_hypertile_layer(vae)
    before, latent_before = layer.spatial_tiles, run.latent
    if latent is not None:
        run.latent = (int(latent[0]), int(latent[1]))
    try:
        layer.spatial_tiles = VaeTiles(run)
        yield
    finally:
        layer.spatial_tiles = before
        run.latent = latent_before


def comfyui_depth(latent: tuple[int, int], tokens: int, max_depth: int) -> int | None:
    """ComfyUI's node's depth of a self-attention call of ``tokens`` tokens in a model called with a latent of
    ``latent`` (H, W): the first ``d`` in 0 .. ``max_depth`` with ``(H / 2**d) * (W / 2**d) == tokens`` (None:
    not tiled)."""
    lh, lw = latent
    for d in range(max_depth + 1):
        if (lh / 2**d) * (lw / 2**d) == tokens:
            return d
    return None


def hypertile_layers(unet: Any, settings: HyperTile) -> list[tuple[Any, int, int]]:
    """The self-attention layers of ``unet`` HyperTile tiles under ``settings``: (layer, resolution level, depth),
    those of depth ``max_depth`` and shallower (module docstring)."""
    n = len(unet.down_blocks)
    xl = bool(getattr(getattr(unet, "config", None), "text_time", False)) and settings.rule == "a1111"
    found: list[tuple[Any, int, int]] = []
    for name, module in unet.named_modules():
        m = _SELF_ATTENTION.match(name)
        if m is None or getattr(module, "is_cross_attention", True):
            continue
        kind, tb = m.group("kind"), int(m.group("tb"))
        if kind == "down_blocks":
            level = int(m.group("block"))
        elif kind == "up_blocks":
            level = n - 1 - int(m.group("block"))
        else:
            level = n - 1
        found.append((module, level, tb if kind is not None else -1))
    if not xl:
        return [(mod, level, level) for mod, level, _ in found if level <= settings.max_depth]
    first = min((level for _, level, tb in found if tb >= 0), default=0)
    out = []
    for mod, level, tb in found:
        depth = 2 if tb < 0 else (0 if level == first and tb == 0 else 1)
        if depth <= settings.max_depth:
            out.append((mod, level, depth))
    return out


def check_hypertile(unet: Any, settings: HyperTile) -> None:
    """Raise (one line) when ``unet`` has no self-attention layer HyperTile could tile."""
    if not hasattr(unet, "down_blocks"):
        raise UsageError(f"HyperTile needs a U-Net, not a {type(unet).__name__}")
    if not hypertile_layers(unet, settings):
        raise UsageError(
            f"HyperTile tiles no layer of this U-Net: it has no self-attention layer of depth {settings.max_depth} "
            "or shallower (raise max_depth)"
        )


@contextmanager
def hypertile_applied(unet: Any, run: HyperTileRun | None) -> Iterator[None]:
    """``unet``'s self-attention layers run HyperTile with ``run`` inside the block (``None``: as they are);
    as before after it, whatever happens."""
    if run is None:
        yield
        return
    layers = hypertile_layers(unet, run.settings)
    if run.settings.rule == "comfyui":  # every self-attention layer: each call's tokens decide (comfyui_depth)
        layers = hypertile_layers(unet, HyperTile(run.settings.tile_size, 0, MAX_DEPTH, "comfyui"))
    before = [layer.hypertile for layer, _, _ in layers]
    try:
        for layer, level, depth in layers:
            layer.hypertile = LayerTiles(run, level, depth, layer)
        yield
    finally:
        for (layer, _, _), old in zip(layers, before, strict=True):
            layer.hypertile = old
            layer.hypertile_grid = None


class HyperTileNet:
    """``net`` (the U-Net, or what calls it: a controlled U-Net) called with HyperTile on ``unet`` for each call;
    one generator for all calls (seeded with ``seed``; ``rng``: that generator, shared with the VAE's HyperTile as
    A1111's), the latent's size read from each call's input (``scale`` pixels per latent cell)."""

    def __init__(
        self,
        net: Callable[..., Tensor],
        unet: Any,
        settings: HyperTile,
        seed: int,
        scale: int = LATENT_FACTOR,
        rng: random.Random | None = None,
    ) -> None:
        check_hypertile(unet, settings)
        self.net, self.unet = net, unet
        self.run = HyperTileRun(settings, seed, scale, rng)
        # what UNetAdapter asks of the network it calls
        self.takes_step = bool(getattr(net, "takes_step", False))
        self.takes_row_kinds = bool(getattr(net, "takes_row_kinds", False))

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        x: Any = args[0] if args else kwargs.get("x", kwargs.get("sample"))
        self.run.latent = (int(x.shape[-2]), int(x.shape[-1]))
        with hypertile_applied(self.unet, self.run):
            return self.net(*args, **kwargs)


__all__ = [
    "HYPERTILE_RULES",
    "MAX_DEPTH",
    "MAX_SWAP_SIZE",
    "MAX_TILE_SIZE",
    "HyperTile",
    "HyperTileNet",
    "HyperTileRun",
    "LayerTiles",
    "check_hypertile",
    "comfyui_depth",
    "draw_count",
    "hypertile_applied",
    "hypertile_layers",
    "largest_power_of_two_tile",
    "smallest_tile",
    "tile_counts",
    "tiled_attention",
    "tiled_map",
    "vae_hypertile_applied",
    "vae_hypertile_layer",
    "VaeTiles",
]
