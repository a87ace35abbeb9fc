"""HyperTile with Deep Shrink (ComfyUI's rule: a layer's depth is matched by the tokens of its shrunk feature map
against the latent the model was called with) and with self-attention guidance (the map of the middle block's
untiled layer; a call that would tile that layer is refused). Each against a reference written here: a tiler of
ComfyUI's node's rule set by hand on every self-attention layer."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

import sdengine
from sdengine.errors import SdengineError
from sdengine.models.unet import UNet, UNetConfig
from sdengine.nn.deep_shrink import DeepShrink, deep_shrink_applied
from sdengine.nn.hypertile import HyperTile, HyperTileNet

PROMPT, NEGATIVE = "a red apple on a table", "blurry"

# level 0 (two attention layers; input blocks 1, 2, its downsample 3) and level 1 (no attention; 4, 5)
SMALL = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(16, 32),
    layers_per_block=2,
    attention=("cross", "none"),
    num_heads=(2, 2),
    cross_attention_dim=16,
    norm_num_groups=8,
)


class ComfyTiler:
    """ComfyUI's HyperTile node's rule, written out: a self-attention call of L tokens in a model called with a
    latent of (H, W) is tiled when ``(H / 2**d) * (W / 2**d) == L`` for some d <= max_depth (the first such d); the
    smallest tile side ``max(32, tile_size) // px`` (times ``2**d`` with scale_depth); each side's counts ``n // i``
    for its divisors i from min(smallest, n), the first ``swap`` of them, one drawn when several; the tiles cut on
    the layer's (h, w) grid, each attending within itself."""

    def __init__(self, tile: int, swap: int, max_depth: int, scale_depth: bool, px: int, seed: int) -> None:
        self.tile, self.swap, self.max_depth, self.scale_depth, self.px = tile, swap, max_depth, scale_depth, px
        self.rng = random.Random(seed)
        self.latent = (0, 0)
        self.calls: list[tuple[int, int, int, int]] = []  # (tokens, depth, nh, nw) of each tiled call

    def count(self, n: int, smallest: int) -> int:
        sides = [i for i in range(min(smallest, n), n + 1) if n % i == 0][: self.swap]
        counts = [n // i for i in sides]
        return counts[self.rng.randint(0, len(counts) - 1)] if len(counts) > 1 else counts[0]

    def __call__(self, x: torch.Tensor, attend: Any, grid: tuple[int, int] | None) -> torch.Tensor:
        B, L, C = x.shape
        lh, lw = self.latent
        depth = next((d for d in range(self.max_depth + 1) if (lh / 2**d) * (lw / 2**d) == L), None)
        if depth is None:
            return attend(x)  # type: ignore[no-any-return]
        assert grid is not None and grid[0] * grid[1] == L
        h, w = grid
        smallest = max(32, self.tile) // self.px * (2**depth if self.scale_depth else 1)
        nh, nw = self.count(h, smallest), self.count(w, smallest)
        self.calls.append((L, depth, nh, nw))
        th, tw = h // nh, w // nw
        tiles = x.reshape(B, nh, th, nw, tw, C).permute(0, 1, 3, 2, 4, 5).reshape(B * nh * nw, th * tw, C)
        out = attend(tiles)
        D = out.shape[-1]
        return out.reshape(B, nh, nw, th, tw, D).permute(0, 1, 3, 2, 4, 5).reshape(B, L, D)  # type: ignore[no-any-return]


def _self_attention(unet: Any) -> list[Any]:
    return [
        m
        for n, m in unet.named_modules()
        if n.endswith("attn1") and not getattr(m, "is_cross_attention", True) and ".attentions." in n
    ]


def _install(unet: Any, tiler: Any) -> None:
    for layer in _self_attention(unet):
        layer.hypertile = tiler


def small_unet() -> UNet:
    torch.manual_seed(0)
    unet = UNet(SMALL).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return unet


@pytest.mark.parametrize("max_depth", [0, 1])
def test_deep_shrink_with_hypertile_matches_the_shrunk_layers_depth_as_comfyui(max_depth):
    """Block 1 shrunk by 2 (after its skip): level 0's second attention layer runs on 16 x 16 tokens of a 32 x 32
    latent, ComfyUI's depth 1: tiled (2 x 2, depth 1's tile) when max_depth reaches 1, left whole at 0; the
    first layer and the up blocks' (32 x 32: depth 0) are tiled 8 x 8 either way."""
    unet = small_unet()
    g = torch.Generator().manual_seed(2)
    x, t, ctx = torch.randn(1, 4, 32, 32, generator=g), torch.tensor([700.0]), torch.randn(1, 5, 16, generator=g)
    settings = HyperTile(32, 1, max_depth, rule="comfyui", scale_depth=True)
    shrink = DeepShrink(1, 2.0)
    net = HyperTileNet(unet, unet, settings, seed=3, scale=8)
    with torch.no_grad(), deep_shrink_applied(unet, shrink):
        got = net(x, t, encoder_hidden_states=ctx)
        hand = ComfyTiler(32, 1, max_depth, True, 8, seed=3)
        hand.latent = (32, 32)
        _install(unet, hand)
        try:
            want = unet(x, t, encoder_hidden_states=ctx)
        finally:
            _install(unet, None)
        plain_tiles = net(x, t, encoder_hidden_states=ctx)  # the same draws again (swap 1: no draw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plain_tiles, got, rtol=0, atol=0)
    shrunk = [c for c in hand.calls if c[0] == 16 * 16]
    # 32 x 32: the down block's first layer, the up block's last two; 16 x 16: the down block's second layer and
    # the up block's first (it meets block 2's shrunk skip before block 1's full one)
    assert [c for c in hand.calls if c[0] == 32 * 32] == [(1024, 0, 8, 8)] * 3
    assert shrunk == ([(256, 1, 2, 2)] * 2 if max_depth == 1 else [])
    assert net.run.chosen[: len(hand.calls)] == [c[2:] for c in hand.calls]  # sdengine's own record


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")


def _run(pipe: Any, size: int = 64, **kw: Any) -> Any:
    args: dict[str, Any] = dict(steps=3, sampler="euler", cfg_scale=6.0, seed=5, width=size, height=size)
    return pipe(PROMPT, NEGATIVE, progress=False, **args, **kw)


@pytest.mark.parametrize("sag_rule", ["diffusers", "comfyui"])
def test_sag_with_hypertile_is_sag_over_the_tiled_network(pipe, sag_rule):
    """HyperTile (ComfyUI's rule, depth 0: the 32 x 32 level of a 64 px image at 2 px a cell, tiles 2 or 1 a side
    drawn) with SAG: the image of SAG alone on the U-Net whose self-attention the hand tiler cuts, the draws in the
    same order (each network call, SAG's degraded pass too); the middle block is whole, SAG's map its own."""
    sag = dict(sag_scale=0.75, sag_blur_sigma=1.0, sag_rule=sag_rule)
    got = _run(pipe, **sag, hypertile=(32, 2, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)
    hand = ComfyTiler(32, 2, 0, False, pipe.vae_scale_factor, seed=5)
    hand.latent = (32, 32)
    _install(pipe.unet, hand)
    try:
        want = _run(pipe, **sag)
    finally:
        _install(pipe.unet, None)
    np.testing.assert_allclose(got.arrays, want.arrays, atol=1e-5)
    drawn = {c[2:] for c in hand.calls}
    assert {c[:2] for c in hand.calls} == {(1024, 0)} and drawn <= {(1, 1), (2, 1), (1, 2), (2, 2)} and len(drawn) > 1
    assert len(hand.calls) == 3 * 2 * 3  # 3 steps, the batched pass and SAG's degraded one, 3 layers at 32 x 32
    alone = _run(pipe, **sag)
    assert float(np.abs(got.arrays - alone.arrays).mean()) > 1e-4  # HyperTile did change the image


def test_sag_refuses_a_hypertile_that_cuts_the_middle_block(pipe):
    """128 px: the middle block's 32 x 32 tokens are ComfyUI's depth 1, cut 2 x 2 by a 16-cell tile: SAG's map
    would be of tiles, a one-line error; without SAG, or with max_depth 0 (the middle block whole), it runs."""
    tiles = dict(hypertile=(32, 1, 1), hypertile_rule="comfyui", hypertile_scale_depth=False)
    with pytest.raises(SdengineError, match="HyperTile cuts the middle block's self-attention") as e:
        _run(pipe, 128, sag_scale=0.75, **tiles)
    assert "\n" not in str(e.value) and "(32x32 tokens) into 2x2 tiles" in str(e.value)
    assert all(layer.hypertile is None for layer in _self_attention(pipe.unet))  # restored after the error
    _run(pipe, 128, **tiles)
    _run(pipe, 128, sag_scale=0.75, **dict(tiles, hypertile=(32, 1, 0)))


# --------------------------------------------------------------------------------------- through ComfyUI's API


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    from _comfy_live import live_client
    from _live_server import server_config

    with live_client(server_config(tmp_path_factory.mktemp("hypertile_combos")), timeout=300) as (_, c):
        yield c


def _workflow(*patches: dict) -> dict:
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 256, "height": 256, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "combo"}},
    }  # fmt: skip
    model = ["1", 0]
    for i, patch in enumerate(patches):
        g[f"p{i}"] = {"inputs": {"model": model, **patch[1]}, "class_type": patch[0]}
        model = [f"p{i}", 0]
    g["6"]["inputs"]["model"] = model
    return g


SHRINK = ("PatchModelAddDownscale", {"block_number": 2, "downscale_factor": 2.0, "start_percent": 0.0,
                                     "end_percent": 1.0, "downscale_after_skip": True, "downscale_method": "bicubic",
                                     "upscale_method": "bicubic"})  # fmt: skip
TILES = ("HyperTile", {"tile_size": 32, "swap_size": 1, "max_depth": 2, "scale_depth": False})


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_comfyuis_hypertile_and_deep_shrink_nodes_tile_the_shrunk_level_by_its_tokens(client):
    """The emoji model at 256 px (64 x 64 latent, 4 px a cell: a smallest tile of 8 cells): block 2 (level 0's
    downsample) shrunk by 2 puts level 1's layers on 16 x 16 tokens, ComfyUI's depth 2, cut 2 x 2; the image equals
    the plain workflow's with the U-Net shrunk throughout and the hand tiler on every self-attention layer."""
    from _comfy_live import output_image, run_prompt
    from _live_server import shared_loader

    got = output_image(client, run_prompt(client, _workflow(SHRINK, TILES)), "8")
    tiles_only = output_image(client, run_prompt(client, _workflow(TILES)), "8")
    pipe = shared_loader("emoji", "cpu")  # the server's worker runs this same pipeline in this process
    hand = ComfyTiler(32, 1, 2, False, 4, seed=3)
    hand.latent = (64, 64)
    _install(pipe.unet, hand)
    try:
        with deep_shrink_applied(pipe.unet, DeepShrink(2, 2.0, 0.0, 1.0)):
            want = output_image(client, run_prompt(client, _workflow()), "8")
    finally:
        _install(pipe.unet, None)
    np.testing.assert_array_equal(got, want)
    assert (256, 2, 2, 2) in hand.calls  # the shrunk level tiled at depth 2
    assert not np.array_equal(got, tiles_only)
