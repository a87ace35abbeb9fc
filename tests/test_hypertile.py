"""HyperTile (tfernd; A1111's built-in Hypertile, ComfyUI's HyperTile node): one tile is plain attention exactly,
several tiles equal a per-tile attention re-derived here in float64 from the published formula, the tile counts of
a few image sizes under A1111's and ComfyUI's rules (worked out by hand from their code), the layers by depth, the
seeded draws, the request's, the CLI's and the infotext's handling, the hires fix's second pass and the recorded
loop's plan key.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from _cpu_graphs import CPUBackend
from sdengine.cli import main
from sdengine.errors import SdengineError
from sdengine.metadata import parse_parameters, to_generate_kwargs
from sdengine.models.unet import TINY_SD, UNet
from sdengine.models.unet_sdxl import TINY_SDXL
from sdengine.nn import hypertile as ht
from sdengine.nn.attention import Attention
from sdengine.pipeline import GenerationError
from sdengine.pipeline.request import GenerationRequest

PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
# ComfyUI's rule at 64x64 pixels (the tiny VAE downscales 2x: a 32x32 latent): a smallest tile of max(32, 32) // 2 =
# 16 tokens, so the first level's 32 tokens a side can be cut in 2 (or, with a swap size of 2 or more, left whole)
COMFY = dict(hypertile=(32, 1, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")


def _run(pipe: Any, **kw: Any) -> Any:
    args: dict[str, Any] = dict(steps=2, sampler="euler", cfg_scale=7.5, seed=5, width=64, height=64, progress=False)
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, **args)


def _layer(dim: int = 32, heads: int = 2) -> Attention:
    torch.manual_seed(0)
    layer = Attention(dim, heads, dim // heads, bias=True).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer.eval()


def _attention_f64(x: np.ndarray, layer: Attention) -> np.ndarray:
    """softmax(q k^T / sqrt(d)) v per head then the output projection, in float64 numpy, of one token set."""

    def lin(m: Any, a: np.ndarray) -> np.ndarray:
        w = m.weight.detach().numpy()
        b = m.bias.detach().numpy() if m.bias is not None else 0.0
        return a @ w.T + b

    q, k, v = lin(layer.to_q, x), lin(layer.to_k, x), lin(layer.to_v, x)
    heads = layer.heads
    d = q.shape[-1] // heads
    out = np.empty_like(q)
    for h in range(heads):
        s = slice(h * d, (h + 1) * d)
        scores = q[:, s] @ k[:, s].T / math.sqrt(d)
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        out[:, s] = (scores / scores.sum(axis=1, keepdims=True)) @ v[:, s]
    return lin(layer.to_out[0], out)


def test_one_tile_is_plain_attention_exactly():
    """A grid too small for the smallest tile (A1111: at least 128 px = 16 tokens) runs as one tile: the very same
    numbers as the layer without HyperTile, and the generator still advanced once per side (A1111's)."""
    layer = _layer().float()
    x = torch.randn(2, 8 * 8, 32)
    plain = layer(x)
    run = ht.HyperTileRun(ht.HyperTile(256, 3, 3), seed=1)
    run.latent = (8, 8)
    layer.hypertile = ht.LayerTiles(run, level=0, depth=0)
    tiled = layer(x)
    assert torch.equal(tiled, plain)
    assert run.chosen == [(1, 1)]
    assert run.rng.getstate() != random.Random(1).getstate()  # two draws made, as A1111's randint(0, 0)


@pytest.mark.parametrize("grid,tiles", [((8, 12), (2, 3)), ((6, 4), (3, 1)), ((4, 10), (1, 5))])
def test_several_tiles_equal_attention_within_each_tile(grid, tiles):
    """Each tile's queries, keys and values attend within the tile, the result in the tokens' places: against
    the float64 formula per tile, its tokens gathered by row and column here."""
    H, W = grid
    nh, nw = tiles
    layer = _layer()
    x = torch.randn(2, H * W, 32, dtype=torch.float64)
    layer.hypertile = lambda t, attend, grid: ht.tiled_attention(t, H, W, nh, nw, attend)
    got = layer(x).detach().numpy()
    want = np.empty_like(got)
    th, tw = H // nh, W // nw
    for b in range(x.shape[0]):
        for i in range(nh):
            for j in range(nw):
                idx = [r * W + c for r in range(i * th, (i + 1) * th) for c in range(j * tw, (j + 1) * tw)]
                want[b, idx] = _attention_f64(x[b, idx].numpy(), layer)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    layer.hypertile = None
    whole = np.stack([_attention_f64(x[b].numpy(), layer) for b in range(2)])
    assert not np.allclose(got, whole, atol=1e-6)  # tiled is not the whole-grid attention


# (width px, height px, depth, side in tokens at that depth) -> candidate tile counts, worked out by hand from
# A1111's hypertile.py with its defaults (max tile 256, swap 3): tile = min(largest power of two dividing both
# sides, 256), smallest side = max(128, tile) // 8 * 2**depth, the side's divisors from there up, first 3
@pytest.mark.parametrize(
    "size,depth,side,counts",
    [
        ((512, 512), 0, 64, [2, 1]),  # 256 -> 32 tokens: 32, 64
        ((512, 512), 1, 32, [1]),  # 64 tokens > 32: the side itself
        ((1024, 1024), 0, 128, [4, 2, 1]),  # 32, 64, 128
        ((768, 512), 0, 96, [3, 2, 1]),  # gcd 256: 32, 48, 96
        ((640, 640), 0, 80, [5, 4, 2]),  # gcd 640 -> 128 px -> 16 tokens: 16, 20, 40 (80 is the 4th)
        ((520, 520), 0, 65, [1]),  # gcd 520 -> 8 px, raised to 128 -> 16 tokens: 65 only
        ((1536, 1024), 1, 96, [1]),  # 64 tokens at depth 1: 96 only
    ],
)
def test_a1111_tile_counts(size, depth, side, counts):
    s = ht.HyperTile(256, 3, 3)
    assert ht.tile_counts(side, ht.smallest_tile(s, depth, *size), s.swap_size) == counts


@pytest.mark.parametrize(
    "tile,swap,scale,depth,side,counts",
    [
        (256, 2, False, 0, 128, [4, 2]),  # ComfyUI's defaults: 32 tokens, 2 candidates
        (256, 2, False, 1, 64, [2, 1]),  # no depth scaling: 32 tokens at depth 1 too
        (256, 2, True, 1, 64, [1]),  # scaled: 64 tokens
        (16, 3, False, 0, 12, [3, 2, 1]),  # max(32, 16) // 8 = 4 tokens: 4, 6, 12
        (1, 0, False, 0, 8, [2]),  # swap 0 acts as 1
    ],
)
def test_comfyui_tile_counts(tile, swap, scale, depth, side, counts):
    s = ht.HyperTile(tile, swap, 10, rule="comfyui", scale_depth=scale)
    assert ht.tile_counts(side, ht.smallest_tile(s, depth, 9999, 9999), s.swap_size) == counts


def test_the_draws_are_a_generator_seeded_with_the_seed():
    """Rows then columns, one randint each, from random.Random(seed) (A1111's RNG_INSTANCE.seed(first seed))."""
    s = ht.HyperTile(256, 3, 3)
    run = ht.HyperTileRun(s, seed=1234)
    run.latent = (128, 96)
    picks = [run.choose(128, 96, 0) for _ in range(20)]
    rng = random.Random(1234)
    rows, cols = [4, 2, 1], [3, 2, 1]  # 1024 x 768 px: gcd 256 -> 32 tokens
    assert picks == [(rows[rng.randint(0, 2)], cols[rng.randint(0, 2)]) for _ in range(20)]
    assert len(set(picks)) > 1
    again = ht.HyperTileRun(s, seed=1234)
    again.latent = (128, 96)
    assert [again.choose(128, 96, 0) for _ in range(20)] == picks


def _names(unet: Any, settings: ht.HyperTile) -> dict[str, int]:
    ids = {id(m): n for n, m in unet.named_modules()}
    return {ids[id(m)]: depth for m, _, depth in ht.hypertile_layers(unet, settings)}


def test_the_layers_by_depth():
    """SD: the resolution level (the middle block the deepest); SDXL under A1111's table: the first attention
    level's first transformer block 0, its others 1, the middle block 2; ComfyUI: the resolution level."""
    sd = UNet(TINY_SD)
    assert _names(sd, ht.HyperTile(256, 3, 3)) == {
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1": 0,
        "mid_block.attentions.0.transformer_blocks.0.attn1": 1,
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1": 0,
        "up_blocks.1.attentions.1.transformer_blocks.0.attn1": 0,
    }
    assert set(_names(sd, ht.HyperTile(256, 3, 0)).values()) == {0}
    xl = UNet(TINY_SDXL)
    depths = _names(xl, ht.HyperTile(256, 3, 3))
    assert len(depths) == 12
    for name, depth in depths.items():
        want = 2 if name.startswith("mid_block") else (0 if name.endswith("transformer_blocks.0.attn1") else 1)
        assert depth == want, name
    comfy = _names(xl, ht.HyperTile(256, 2, 10, rule="comfyui"))
    assert set(comfy.values()) == {1}  # every self-attention of this U-Net is at its second level
    with pytest.raises(SdengineError, match="HyperTile tiles no layer of this U-Net"):
        ht.check_hypertile(xl, ht.HyperTile(256, 2, 0, rule="comfyui"))


def test_no_tiling_leaves_the_image_bit_identical(pipe):
    """At 64x64 px A1111's rule has no tile below the whole grid (max(128, 64) // 2 = 64 tokens > 32): the image is
    the plain one to the bit."""
    np.testing.assert_array_equal(_run(pipe, hypertile=(256, 3, 3)).arrays, _run(pipe).arrays)


def test_tiles_change_the_image_and_the_seed_reproduces_it(pipe):
    plain = _run(pipe).arrays
    tiled = _run(pipe, **COMFY).arrays
    assert not np.array_equal(tiled, plain)
    drawn = dict(COMFY, hypertile=(32, 2, 0))  # 2 or 1 tiles a side, drawn at each call
    a, b = _run(pipe, **drawn).arrays, _run(pipe, **drawn).arrays
    np.testing.assert_array_equal(a, b)


def test_the_hires_second_pass_switch(pipe, monkeypatch):
    """hypertile_hires_only: only the second pass's calls tile (A1111's hypertile_enable_unet_secondpass); the
    infotext says so (A1111's "Hypertile U-Net second pass: True") and reads back."""
    seen: list[tuple[int, int]] = []
    choose = ht.HyperTileRun.choose

    def spy(self: Any, h: int, w: int, depth: int) -> tuple[int, int]:
        seen.append(self.latent)
        return choose(self, h, w, depth)

    monkeypatch.setattr(ht.HyperTileRun, "choose", spy)
    hires = dict(enable_hr=True, hr_scale=2.0, width=32, height=32, strength=0.6)
    both = _run(pipe, **COMFY, **hires)
    assert set(seen) == {(16, 16), (32, 32)}
    seen.clear()
    second = _run(pipe, **COMFY, hypertile_hires_only=True, **hires)
    assert set(seen) == {(32, 32)}
    text = second.infotexts[0]
    assert "Hypertile U-Net second pass: True" in text and "Hypertile U-Net: True" not in text, text
    assert "Hypertile U-Net: True" in both.infotexts[0]
    kwargs = to_generate_kwargs(parse_parameters(text), hires=True)
    assert kwargs["hypertile"] == (32, 1, 0) and kwargs["hypertile_hires_only"] is True
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, second.arrays)
    # without a hires fix the switch tiles nothing and writes nothing (A1111's before_hr never runs)
    seen.clear()
    plain = _run(pipe, **COMFY, hypertile_hires_only=True)
    assert seen == [] and "Hypertile" not in plain.infotexts[0]


def test_the_infotext_writes_a1111s_fields_and_reads_back(pipe):
    res = _run(pipe, **dict(COMFY, hypertile=(32, 2, 0)))
    text = res.infotexts[0]
    for field in (
        "Hypertile U-Net: True",
        "Hypertile U-Net max tile size: 32",
        "Hypertile U-Net swap size: 2",
        "Hypertile U-Net max depth: 0",
        "Hypertile rule: comfyui",
        "Hypertile scale depth: False",
    ):
        assert field in text, text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile"] == (32, 2, 0) and kwargs["hypertile_rule"] == "comfyui"
    assert kwargs["hypertile_scale_depth"] is False and kwargs["hypertile_hires_only"] is False
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, res.arrays)
    # A1111's defaults are not written (its option() gives None for a default value) and read back as them
    text = _run(pipe, hypertile=(256, 3, 3)).infotexts[0]
    assert "Hypertile U-Net: True" in text and "max tile size" not in text and "Hypertile rule" not in text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile"] == (256, 3, 3) and kwargs["hypertile_rule"] == "a1111"
    assert "Hypertile" not in _run(pipe).infotexts[0]


def test_an_a1111_infotext_is_read(caplog):
    text = (
        "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Hypertile U-Net: True, "
        "Hypertile U-Net max depth: 1, Hypertile U-Net swap size: 2, Hypertile VAE: True"
    )
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile"] == (256, 2, 1) and kwargs["hypertile_hires_only"] is False
    assert (
        kwargs["hypertile_vae"] == (128, 3, 3) and "Hypertile VAE" not in caplog.text
    )  # run: tests/test_hypertile_vae.py
    with pytest.raises(SdengineError, match="Hypertile U-Net: 'yes' is not True or False"):
        to_generate_kwargs(parse_parameters(text.replace("U-Net: True", "U-Net: yes")))


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"hypertile": (256, 3)}, "hypertile must be three whole numbers"),
        ({"hypertile": "256,3,3"}, "hypertile must be three whole numbers"),
        ({"hypertile": (4096, 3, 3)}, r"hypertile tile_size must be a whole number in \[0, 2048\]"),
        ({"hypertile": (256, -1, 3)}, r"hypertile swap_size must be a whole number in \[0, 128\]"),
        ({"hypertile": (256, 3, 2.5)}, r"hypertile max_depth must be a whole number in \[0, 10\]"),
        ({"hypertile": (256, True, 3)}, "hypertile swap_size must be a whole number"),
        ({"hypertile_rule": "forge"}, "unknown hypertile_rule 'forge'"),
        ({"hypertile_hires_only": 1}, "hypertile_hires_only must be true or false"),
    ],
)
def test_bad_hypertile_settings_are_one_line_errors(kw, why):
    with pytest.raises(GenerationError, match=why) as e:
        GenerationRequest(prompt="x", **kw).validate()
    assert "\n" not in str(e.value)


def test_bad_engine_settings_are_one_line_errors():
    with pytest.raises(SdengineError, match="HyperTile rule"):
        ht.HyperTile(rule="x")
    with pytest.raises(SdengineError, match="HyperTile scale_depth must be true or false"):
        ht.HyperTile(scale_depth=1)  # type: ignore[arg-type]
    assert ht.HyperTile(*ht.HyperTile(64, 2, 1, "comfyui", False).key) == ht.HyperTile(64, 2, 1, "comfyui", False)


def test_the_cli_runs_hypertile_and_reads_it_back_from_png(pipe, tiny_sd1_folder, tmp_path):
    out = tmp_path / "h.png"
    common = ["--model", str(tiny_sd1_folder), "--steps", "2", "--width", "64", "--height", "64", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress", "--dtype", "fp32"]
    flags = ["--hypertile", "32,1,0", "--hypertile-rule", "comfyui", "--no-hypertile-scale-depth"]
    assert main(["generate", PROMPT, *common, *flags, "--out", str(out)]) == 0
    want = pipe(PROMPT, steps=2, width=64, height=64, seed=7, sampler="euler", progress=False, **COMFY)
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    again = tmp_path / "again.png"
    assert (
        main(
            ["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--no-progress", "--dtype", "fp32"]
            + ["--out", str(again)]
        )
        == 0
    )
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))


@pytest.mark.parametrize(
    "args,why",
    [
        (["--hypertile", "256,x"], "--hypertile takes TILE[,SWAP[,DEPTH]]"),
        (["--hypertile", "1,2,3,4"], "--hypertile takes TILE[,SWAP[,DEPTH]]"),
        (["--hypertile", "256,3,11"], "hypertile max_depth must be a whole number in"),
        (["--hypertile-rule", "comfyui"], "--hypertile-rule has no effect without --hypertile"),
    ],
)
def test_bad_hypertile_flags_are_one_line_errors(tmp_path, capsys, args, why):
    rc = main(["generate", "x", "--model", str(tmp_path / "none"), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err, err


def test_the_recorded_loop_keys_hypertile_and_its_seed(tiny_sd1_folder):
    """Two HyperTile settings (or seeds, whose draws differ) never share a recorded loop (the stand-in recorder
    replays the first plan of a key)."""
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")
    args: dict[str, Any] = dict(steps=2, width=64, height=64, progress=False)

    def plain(**kw: Any) -> np.ndarray:
        graphs, pipe.cuda_graphs = pipe.cuda_graphs, None
        try:
            return pipe("a red cube", "blurry", **args, **kw).arrays
        finally:
            pipe.cuda_graphs = graphs

    pipe.enable_loop_graph(backend=CPUBackend(), device_type="cpu", record_after=0)
    loop = pipe.cuda_graphs["loop"]
    settings = [
        {"seed": 3},
        {"seed": 3, **COMFY},
        {"seed": 3, **dict(COMFY, hypertile=(32, 2, 0))},
        {"seed": 4, **dict(COMFY, hypertile=(32, 2, 0))},
    ]
    images = []
    for n, kw in enumerate(settings, start=1):
        images.append(pipe("a red cube", "blurry", **args, **kw).arrays)
        assert loop.recordings == n
        np.testing.assert_array_equal(images[-1], plain(**kw))
    assert not np.array_equal(images[0], images[1])


def test_sdxl_and_its_hand_off_run_hypertile(tmp_path_factory):
    """A tiny SDXL (its self-attention at the second level only; 2x VAE): ComfyUI's rule at 128x128 px cuts that
    level's 32x32 grid in 2x2 (swap 1: no draw to differ). With the base model as its own refiner the hand-off is
    the plain run (each model's denoiser tiles alike), and HyperTile changed the image."""
    from _sdxl_models import make_sdxl_folder

    pipe = sdengine.load_pipeline(make_sdxl_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"), device="cpu")
    kw: dict[str, Any] = dict(steps=4, sampler="euler", cfg_scale=5.0, seed=3, width=128, height=128, progress=False)
    tiles = dict(hypertile=(32, 1, 1), hypertile_rule="comfyui", hypertile_scale_depth=False)
    plain = pipe(PROMPT, NEGATIVE, **kw)
    tiled = pipe(PROMPT, NEGATIVE, **kw, **tiles)
    assert float(np.abs(tiled.arrays - plain.arrays).mean()) > 1e-4
    handed = pipe.generate_with_refiner(pipe, PROMPT, NEGATIVE, switch_at=0.5, **kw, **tiles)
    np.testing.assert_allclose(handed.arrays, tiled.arrays, atol=1e-6)
    assert "Hypertile U-Net: True" in handed.infotexts[0]
    with pytest.raises(SdengineError, match="HyperTile tiles no layer of this U-Net"):
        pipe(PROMPT, NEGATIVE, **kw, **dict(tiles, hypertile=(32, 1, 0)))


def test_the_transformer_tells_the_layer_its_grid():
    """A feature map whose size the latent does not give (Deep Shrink's shrunk hidden state): the transformer tells
    its self-attention layer the true (H, W) and the tiles are cut on it; against the same layer tiled by hand."""
    from sdengine.nn.transformer import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(32, 2, cross_attention_dim=None).eval()
    x = torch.randn(1, 32, 6, 10)
    run = ht.HyperTileRun(ht.HyperTile(32, 1, 0, rule="a1111"), seed=0, scale=2)
    run.latent = (64, 64)  # its level-0 grid would be 64x64: not this map's
    attn1 = block.transformer_blocks[0].attn1
    with torch.no_grad():
        plain = block(x)
        attn1.hypertile = ht.LayerTiles(run, level=0, depth=0)
        got = block(x)
        # A1111's rule: 64x64 latent at 2 px a cell = 128 px -> max(128, 32) // 2 = 64 cells > 6, 10: one tile a side
        assert run.chosen == [(1, 1)] and torch.equal(got, plain)
        run.settings = ht.HyperTile(32, 1, 0, rule="comfyui", scale_depth=False)  # 16 cells > 6, 10 too
        run.latent = (6, 10)  # ComfyUI's level check holds; sides of 6 and 10 at min(16, n): one tile
        block(x)
        assert run.chosen[-1] == (1, 1)
        run.settings = ht.HyperTile(0, 1, 0, rule="comfyui", scale_depth=False)
        run.scale = 8  # max(32, 0) // 8 = 4 cells: 6 -> divisors 6 (1 tile); 10 -> 5 (2 tiles)
        got = block(x)
        assert run.chosen[-1] == (1, 2)
        attn1.hypertile = lambda t, attend, grid: ht.tiled_attention(t, 6, 10, 1, 2, attend)
        want = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, plain)
