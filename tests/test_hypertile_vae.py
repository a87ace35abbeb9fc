"""HyperTile on the VAE (A1111's Hypertile VAE: ``hypertile_enable_vae``): the VAE decoder's middle-block attention
block (group norm, attention, projection, residual) run per tile equals that block computed here by hand on each
tile in float64 and put back; the tile counts are A1111's rule at depth 0 drawn by a generator seeded with the first
seed; the encoder is never tiled; off (and one tile) leaves the decode bit-identical; the request's, the infotext's,
the CLI's and A1111's routes' handling (options round trip); bad values are one-line errors."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import math
import random
import threading
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import sdengine
from _live_server import live_server, server_config, shared_loader
from sdengine import vae_utils
from sdengine.cli import main
from sdengine.errors import SdengineError
from sdengine.metadata import parse_parameters, to_generate_kwargs
from sdengine.models.vae import AutoencoderKL, VAEConfig
from sdengine.nn import hypertile as ht
from sdengine.pipeline import GenerationError
from sdengine.pipeline.request import GenerationRequest

# a 4-level VAE (downscale 8, as SD's) small enough for float64 on a CPU
SMALL = VAEConfig(block_out_channels=(8, 8, 8, 16), layers_per_block=1, norm_num_groups=4, sample_size=64)


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    torch.manual_seed(0)
    model = AutoencoderKL(SMALL).double().eval()
    with torch.no_grad():  # weights large enough that the attention is not nearly uniform
        attn = model.decoder.mid_block.attentions[0]
        for lin in (attn.to_q, attn.to_k, attn.to_v):
            torch.nn.init.normal_(lin.weight, std=0.6)
    return model


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu", dtype="fp32", fast_path="none")


def _block_by_hand(attn: Any, tile: torch.Tensor) -> torch.Tensor:
    """The middle block's attention on one (1, C, h, w) tile: group norm over the tile, single-head softmax(q k^T /
    sqrt(C)) v, the output projection, the residual, written out from the weights."""
    gn = attn.group_norm
    h = F.group_norm(tile, gn.num_groups, gn.weight, gn.bias, gn.eps)
    C = tile.shape[1]
    t = h.flatten(2)[0].T  # (hw, C)
    q = t @ attn.to_q.weight.T + attn.to_q.bias
    k = t @ attn.to_k.weight.T + attn.to_k.bias
    v = t @ attn.to_v.weight.T + attn.to_v.bias
    o = torch.softmax(q @ k.T / math.sqrt(C), dim=-1) @ v
    o = o @ attn.to_out[0].weight.T + attn.to_out[0].bias
    return tile + o.T.reshape(tile.shape)


def _decode_by_hand(vae: AutoencoderKL, z: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """The decoder run layer by layer, its middle attention block run per tile of an nh x nw grid by hand."""
    d = vae.decoder
    h = d.mid_block.resnets[0](d.conv_in(vae.post_quant_conv(z)))
    H, W = h.shape[-2:]
    th, tw = H // nh, W // nw
    out = torch.empty_like(h)
    attn = d.mid_block.attentions[0]
    for i in range(nh):
        for j in range(nw):
            rows, cols = slice(i * th, (i + 1) * th), slice(j * tw, (j + 1) * tw)
            out[:, :, rows, cols] = _block_by_hand(attn, h[:, :, rows, cols])
    h = d.mid_block.resnets[1](out)
    for block in d.up_blocks:
        h = block(h)
    return d.conv_out(F.silu(d.conv_norm_out(h)))


def _latent(h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, 4, h, w, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_tiled_decode_equals_the_block_run_per_tile_by_hand(vae):
    """A 48x32 latent (a 384x256 image: tile min(128, 128) -> 16 cells) with swap size 1: 3 x 2 tiles; the result
    is the hand-built per-tile block's, and not the untiled decode."""
    z = _latent(48, 32)
    run = ht.HyperTileRun(ht.HyperTile(128, 1, 3), seed=5)
    with torch.no_grad():
        with ht.vae_hypertile_applied(vae, run, (48, 32)):
            got = vae.decode(z)
        want = _decode_by_hand(vae, z, 3, 2)
        plain = vae.decode(z)
    assert run.chosen == [(3, 2)]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert (got - plain).abs().max() > 1e-3  # the tiles are another attention (and group norm)
    torch.testing.assert_close(plain, _decode_by_hand(vae, z, 1, 1), rtol=1e-10, atol=1e-10)
    assert vae.decoder.mid_block.attentions[0].spatial_tiles is None  # taken off after the block


@pytest.mark.parametrize("seed", [0, 1, 2, 7, 123])
def test_the_draws_are_a1111s_from_a_generator_seeded_with_the_first_seed(vae, seed):
    """Swap size 3 on a 48x32 latent: rows from [3, 2, 1] (the divisors 16, 24, 48 of 48), then columns from [2, 1];
    A1111's random_divisor: randint over the candidates, rows then columns, per decode; two decodes in turn."""
    rng = random.Random(seed)
    expected = []
    for _ in range(2):
        nh = [3, 2, 1][rng.randint(0, 2)]
        expected.append((nh, [2, 1][rng.randint(0, 1)]))
    z = _latent(48, 32)
    run = ht.HyperTileRun(ht.HyperTile(128, 3, 3), seed=seed)
    outs = []
    with torch.no_grad():
        for _ in range(2):
            with ht.vae_hypertile_applied(vae, run, (48, 32)):
                outs.append(vae.decode(z))
        for got, (nh, nw) in zip(outs, expected, strict=True):
            torch.testing.assert_close(got, _decode_by_hand(vae, z, nh, nw), rtol=1e-10, atol=1e-10)
    assert run.chosen == expected


@pytest.mark.parametrize(
    "size,tile,swap,counts",
    [
        ((256, 256), 128, 3, [(2, 1), (2, 1)]),  # 32 cells a side, smallest 16 cells: 2 or 1
        ((512, 512), 128, 3, [(4, 2, 1), (4, 2, 1)]),  # 64 cells: 16, 32, 64
        ((512, 512), 256, 3, [(2, 1), (2, 1)]),  # tile 256 -> 32 cells
        ((512, 512), 0, 3, [(4, 2, 1), (4, 2, 1)]),  # tile 0: at least 128 px (A1111's max(128, ...))
        ((256, 384), 512, 2, [(3, 2), (2, 1)]),  # 256 wide, 384 tall: gcd 128 -> 16 cells
        ((512, 512), 128, 1, [(4,), (4,)]),
    ],
)
def test_a1111s_tile_counts_at_depth_0(size, tile, swap, counts):
    """No 2**depth factor for the VAE (its one layer is depth 0), whatever max_depth says."""
    w, h = size
    for depth_setting in (0, 3):
        s = ht.HyperTile(tile, swap, depth_setting)
        m = ht.smallest_tile(s, 0, w, h)
        got = [tuple(ht.tile_counts(h // 8, m, swap)), tuple(ht.tile_counts(w // 8, m, swap))]
        assert got == counts


def test_the_encoder_is_never_tiled(vae):
    x = torch.randn(1, 3, 384, 256, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    run = ht.HyperTileRun(ht.HyperTile(128, 1, 3), seed=5)
    with torch.no_grad():
        plain = vae.encode(x).mean
        with ht.vae_hypertile_applied(vae, run, (48, 32)):
            tiled = vae.encode(x).mean
    assert torch.equal(plain, tiled) and run.chosen == []


def test_tiled_map_puts_the_tiles_back_in_place():
    x = torch.arange(2 * 3 * 6 * 4, dtype=torch.float32).reshape(2, 3, 6, 4)
    seen = []

    def block(t: torch.Tensor) -> torch.Tensor:
        seen.append(t.shape)
        return t * 2

    assert torch.equal(ht.tiled_map(x, 3, 2, block), x * 2) and seen == [(12, 3, 2, 2)]
    # each tile a batch row: the first tile of the first image is its top-left 2x2 corner
    tiles = []
    ht.tiled_map(x, 3, 2, lambda t: tiles.append(t) or t)
    assert torch.equal(tiles[0][0], x[0, :, :2, :2]) and torch.equal(tiles[0][1], x[0, :, :2, 2:])


def test_off_and_one_tile_leave_the_decode_bit_identical(pipe):
    """The pipeline's decode without hypertile_vae is vae_utils.decode row by row as before; with it at a size that
    gives one tile (64x64 px on the tiny model) the pixels are the same bits; at 256x256 (a 128x128 latent: the
    smallest tile 64 cells) they differ and the first seed reproduces them."""
    x = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(4))
    off = pipe.prepare(GenerationRequest(prompt="x", width=64, height=64, seed=3))
    before = torch.cat(
        [vae_utils.to_unit(vae_utils.decode(pipe.vae, x[i : i + 1], tiled=off.tiled, warn=False)[0]) for i in (0, 1)]
    )
    assert torch.equal(pipe.decode_latents(off, x), before)
    one = pipe.prepare(GenerationRequest(prompt="x", width=64, height=64, seed=3, hypertile_vae=(128, 3, 3)))
    assert torch.equal(pipe.decode_latents(one, x), before) and one.vae_tiles.chosen == [(1, 1), (1, 1)]
    big = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(4))
    runs = [pipe.prepare(GenerationRequest(prompt="x", width=256, height=256, seed=s, hypertile_vae=(128, 1, 0)))
            for s in (3, 3)]  # fmt: skip
    a, b = (pipe.decode_latents(p, big) for p in runs)
    assert torch.equal(a, b) and runs[0].vae_tiles.chosen == [(2, 2)]
    plain = pipe.decode_latents(pipe.prepare(GenerationRequest(prompt="x", width=256, height=256)), big)
    assert not torch.equal(a, plain)
    # the hires fix's passes are copies of one Prepared: they draw from the one generator in turn, as A1111's
    assert dataclasses.replace(runs[0], hires=None).vae_tiles is runs[0].vae_tiles


def _spy_draws(monkeypatch: Any) -> list[tuple[str, int, Any, tuple[int, ...], int]]:
    """Every draw of a HyperTile run: (whose: "vae" for the VAE's 128-pixel settings, else "unet"; the generator's
    id; its state before the draw; the candidates; the count drawn)."""
    log: list[tuple[str, int, Any, tuple[int, ...], int]] = []
    choose, real = ht.HyperTileRun.choose, ht.draw_count
    whose = ["unet"]

    def spy_choose(self: Any, h: int, w: int, depth: int) -> tuple[int, int]:
        whose[0] = "vae" if self.settings.tile_size == 128 else "unet"
        return choose(self, h, w, depth)

    def spy_draw(counts: list[int], rng: random.Random, *, always: bool) -> int:
        state = rng.getstate()
        out = real(counts, rng, always=always)
        log.append((whose[0], id(rng), state, tuple(counts), out))
        return out

    monkeypatch.setattr(ht.HyperTileRun, "choose", spy_choose)
    monkeypatch.setattr(ht, "draw_count", spy_draw)
    return log


def test_the_unet_and_the_vae_share_a1111s_one_generator(pipe, monkeypatch):
    """A1111's one generator: seeded with the first seed, the U-Net's draws of the pass, then the decode's (one per
    image); with the hires fix's second pass tiled alone, the first-pass decode (a pixel upscaler) draws first, the
    generator is reseeded before the second pass (its before_hr), then the U-Net's draws and the final decode's. The
    draws here replayed on a fresh random.Random give the same generator state before every draw."""
    log = _spy_draws(monkeypatch)
    args: dict[str, Any] = dict(steps=2, sampler="euler", seed=9, width=64, height=64, progress=False, batch_size=2)
    pipe("a red apple", hypertile=(256, 3, 3), hypertile_vae=(128, 3, 3), **args)
    whose = [w for w, *_ in log]
    n_unet = whose.count("unet")
    assert n_unet > 0 and whose == ["unet"] * n_unet + ["vae"] * 4  # two images, rows then columns each
    assert len({rng for _, rng, *_ in log}) == 1  # one generator
    replay = random.Random(9)
    for _, _, state, counts, out in log:
        assert replay.getstate() == state
        assert counts[replay.randint(0, len(counts) - 1)] == out  # A1111's random_divisor
    log.clear()
    # one image (sdengine runs a pixel upscaler's second pass row by row, each row's U-Net from its own seed)
    hires = dict(enable_hr=True, hr_scale=1.5, hr_upscaler="Lanczos", strength=0.6, batch_size=1)
    args.pop("batch_size")
    pipe("a red apple", hypertile=(256, 3, 3), hypertile_hires_only=True, hypertile_vae=(128, 3, 3), **args, **hires)
    whose = [w for w, *_ in log]
    n_unet = whose.count("unet")
    assert n_unet > 0 and whose == ["vae"] * 2 + ["unet"] * n_unet + ["vae"] * 2
    replay = random.Random(9)
    for k, (_, _, state, counts, out) in enumerate(log):
        if k == 2:
            replay.seed(9)  # A1111's before_hr: set_hypertile_seed(p.all_seeds[0]), a U-Net switch being on
        assert replay.getstate() == state
        assert counts[replay.randint(0, len(counts) - 1)] == out  # A1111's random_divisor
    # the U-Net untiled: no reseed before the second pass (A1111 reseeds only with a U-Net switch on)
    log.clear()
    pipe("a red apple", hypertile_vae=(128, 3, 3), **args, **{**hires, "batch_size": 2})
    assert [w for w, *_ in log] == ["vae"] * 8
    replay = random.Random(9)
    for _, _, state, counts, out in log:
        assert replay.getstate() == state
        assert counts[replay.randint(0, len(counts) - 1)] == out  # A1111's random_divisor


def test_the_infotext_writes_a1111s_fields_and_reads_back(pipe):
    args: dict[str, Any] = dict(steps=1, sampler="euler", seed=5, width=64, height=64, progress=False)
    res = pipe("a red apple", hypertile_vae=(256, 2, 1), **args)
    text = res.infotexts[0]
    assert "Hypertile VAE: True" in text and "Hypertile U-Net" not in text, text
    for field in ("Hypertile VAE max depth: 1", "Hypertile VAE max tile size: 256", "Hypertile VAE swap size: 2"):
        assert field in text, text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile_vae"] == (256, 2, 1) and "hypertile" not in kwargs
    np.testing.assert_array_equal(pipe(**{**kwargs, "progress": False}).arrays, res.arrays)
    # A1111's defaults (128, 3, 3) are not written and are read back as them; with the U-Net's too
    text = pipe("a red apple", hypertile_vae=(128, 3, 3), hypertile=(256, 3, 3), **args).infotexts[0]
    assert "Hypertile U-Net: True, Hypertile VAE: True" in text and "Hypertile VAE max" not in text, text
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile_vae"] == (128, 3, 3) and kwargs["hypertile"] == (256, 3, 3)
    assert "Hypertile" not in pipe("a red apple", **args).infotexts[0]


def test_an_a1111_infotext_is_read(caplog):
    text = (
        "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, Hypertile VAE: True, "
        "Hypertile VAE max tile size: 256, Hypertile VAE swap size: 1"
    )
    kwargs = to_generate_kwargs(parse_parameters(text))
    assert kwargs["hypertile_vae"] == (256, 1, 3) and "Hypertile" not in caplog.text  # nothing left unreproduced
    assert "hypertile_vae" not in to_generate_kwargs(parse_parameters(text.replace("VAE: True", "VAE: False")))
    with pytest.raises(SdengineError, match="Hypertile VAE: 'yes' is not True or False") as e:
        to_generate_kwargs(parse_parameters(text.replace("VAE: True", "VAE: yes")))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "kw,why",
    [
        ({"hypertile_vae": (128, 3)}, r"hypertile_vae must be three whole numbers .* e\.g\. \(128, 3, 3\)"),
        ({"hypertile_vae": "128,3,3"}, "hypertile_vae must be three whole numbers"),
        ({"hypertile_vae": (4096, 3, 3)}, r"hypertile_vae tile_size must be a whole number in \[0, 2048\]"),
        ({"hypertile_vae": (128, -1, 3)}, r"hypertile_vae swap_size must be a whole number in \[0, 128\]"),
        ({"hypertile_vae": (128, 3, 11)}, r"hypertile_vae max_depth must be a whole number in \[0, 10\]"),
        ({"hypertile_vae": (128, 3, 3), "vae_decode": "tiny"}, "vae_decode='tiny' runs none"),
    ],
)
def test_bad_requests_are_one_line_errors(kw, why):
    with pytest.raises(GenerationError, match=why) as e:
        GenerationRequest(prompt="x", **kw).validate()
    assert "\n" not in str(e.value)


def test_a_vae_without_a_middle_attention_is_a_one_line_error():
    emoji = shared_loader("emoji", "cpu")  # its VAE is built without the middle block's attention
    with pytest.raises(GenerationError, match="middle-block self-attention, which this AutoencoderKL") as e:
        emoji("a red apple", steps=1, hypertile_vae=(128, 3, 3), progress=False)
    assert "\n" not in str(e.value)


def test_the_cli_runs_it_and_reads_it_back_from_png(pipe, tiny_sd1_folder, tmp_path):
    out = tmp_path / "h.png"
    common = ["--model", str(tiny_sd1_folder), "--steps", "1", "--width", "64", "--height", "64", "--seed", "7"]
    common += ["--sampler", "euler", "--no-progress", "--dtype", "fp32"]
    assert main(["generate", "a red apple", *common, "--hypertile-vae", "96,2", "--out", str(out)]) == 0
    text = Image.open(out).info["parameters"]
    assert "Hypertile VAE: True" in text and "Hypertile VAE max tile size: 96" in text, text
    assert to_generate_kwargs(parse_parameters(text))["hypertile_vae"] == (96, 2, 3)
    again = tmp_path / "again.png"
    back = ["generate", "--from-png", str(out), "--model", str(tiny_sd1_folder), "--no-progress", "--dtype", "fp32"]
    assert main([*back, "--out", str(again)]) == 0
    assert "Hypertile VAE: True" in Image.open(again).info["parameters"]
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    off = tmp_path / "off.png"
    assert main([*back, "--hypertile-vae", "off", "--out", str(off)]) == 0
    assert "Hypertile VAE" not in Image.open(off).info["parameters"]


@pytest.mark.parametrize(
    "args,why",
    [
        (["--hypertile-vae", "128,x"], "--hypertile-vae takes TILE[,SWAP[,DEPTH]] whole numbers (e.g. 128,3,3)"),
        (["--hypertile-vae", "1,2,3,4"], "--hypertile-vae takes TILE[,SWAP[,DEPTH]]"),
        (["--hypertile-vae", "128,3,11"], "hypertile_vae max_depth must be a whole number in"),
    ],
)
def test_bad_cli_flags_are_one_line_errors(tmp_path, capsys, args, why):
    rc = main(["generate", "x", "--model", str(tmp_path / "none"), *args, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and why in err, err


# -- A1111's routes --------------------------------------------------------------------------------------------

BODY = {"prompt": "a red apple", "seed": 3, "steps": 1, "width": 64, "height": 64, "cfg_scale": 7.0}
BODY |= {"sampler_name": "Euler", "scheduler": "Automatic"}


class Recorder:
    """The tiny SD 1.x pipeline (a VAE with a middle attention), recording each call's keywords."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        with self.lock:
            self.calls.append(kw)
        return self.pipe(**kw)


@pytest.fixture(scope="module")
def served(pipe, tmp_path_factory):
    rec = Recorder(pipe)
    config = server_config(tmp_path_factory.mktemp("hypertile_vae_server"))
    with live_server(config, loader=lambda ref, device: rec) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        yield rec, c


def _txt2img(c: httpx.Client, **extra: Any) -> tuple[np.ndarray, dict[str, Any]]:
    r = c.post("/sdapi/v1/txt2img", json={**BODY, **extra})
    assert r.status_code == 200, r.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    return image, json.loads(r.json()["info"])


def test_a1111_options_round_trip(served, pipe):
    """override_settings' hypertile_enable_vae and its *_vae options become the job's hypertile_vae (the Python
    API's image and infotext); the infotext's keys set them again; POST /sdapi/v1/options sets them for later
    requests, a request's own switch winning."""
    rec, c = served
    over = {"hypertile_enable_vae": True, "hypertile_swap_size_vae": 2, "hypertile_max_tile_vae": 256.0}
    image, info = _txt2img(c, override_settings=over)
    assert rec.calls[-1].get("hypertile_vae") == (256, 2, 3) and rec.calls[-1].get("hypertile") is None
    assert info["ignored"] == []
    text = info["infotexts"][0]
    assert "Hypertile VAE: True" in text and "Hypertile VAE swap size: 2" in text, text
    assert "Hypertile VAE max tile size: 256" in text and "Hypertile VAE max depth" not in text, text
    # the infotext read back on the route: the same options, the same image
    again, info2 = _txt2img(c, infotext=text)
    assert rec.calls[-1].get("hypertile_vae") == (256, 2, 3)
    np.testing.assert_array_equal(again, image)
    assert info2["infotexts"][0] == text
    got = c.get("/sdapi/v1/options").json()
    assert got["hypertile_enable_vae"] is False and got["hypertile_max_tile_vae"] == 128
    assert got["hypertile_swap_size_vae"] == 3 and got["hypertile_max_depth_vae"] == 3
    r = c.post("/sdapi/v1/options", json={"hypertile_enable_vae": True, "hypertile_max_depth_vae": 0})
    assert r.status_code == 200 and set(r.json()["applied"]) == {"hypertile_enable_vae", "hypertile_max_depth_vae"}
    try:
        assert c.get("/sdapi/v1/options").json()["hypertile_enable_vae"] is True
        _txt2img(c)
        assert rec.calls[-1].get("hypertile_vae") == (128, 3, 0)
        _txt2img(c, override_settings={"hypertile_enable_vae": False})
        assert rec.calls[-1].get("hypertile_vae") is None
    finally:
        c.post("/sdapi/v1/options", json={"hypertile_enable_vae": False, "hypertile_max_depth_vae": 3})
    _txt2img(c, override_settings={"hypertile_max_tile_vae": 64})  # the settings without the switch: off
    assert rec.calls[-1].get("hypertile_vae") is None


@pytest.mark.parametrize(
    "option,value,said",
    [
        ("hypertile_enable_vae", 1, "hypertile_enable_vae must be true or false, got 1"),
        ("hypertile_max_tile_vae", 4096, "hypertile_max_tile_vae must be a whole number in [0, 2048], got 4096"),
        ("hypertile_swap_size_vae", 2.5, "hypertile_swap_size_vae must be a whole number in [0, 128]"),
        ("hypertile_max_depth_vae", -1, "hypertile_max_depth_vae must be a whole number in [0, 10]"),
    ],
)
def test_bad_a1111_options_are_one_line_400s(served, option, value, said):
    _, c = served
    for r in (
        c.post("/sdapi/v1/txt2img", json={**BODY, "override_settings": {option: value}}),
        c.post("/sdapi/v1/options", json={option: value}),
    ):
        assert r.status_code == 400 and said in r.json()["detail"], r.text
        assert "\n" not in r.json()["detail"]
    assert c.get("/sdapi/v1/options").json()[option] in (False, 128, 3)  # nothing was set


def test_a_native_job_takes_it(served):
    from _live_server import wait_job

    rec, c = served
    body = {"prompt": "a red apple", "seed": 3, "steps": 1, "width": 64, "height": 64, "sampler": "euler"}
    r = c.post("/v1/jobs", json={**body, "hypertile_vae": [128, 2, 3]})
    assert r.status_code == 202, r.text
    j = wait_job(c, r.json()["id"], timeout=300)
    assert j["state"] == "done" and "Hypertile VAE: True" in j["infotexts"][0], j
    assert rec.calls[-1].get("hypertile_vae") == (128, 2, 3)
    r = c.post("/v1/jobs", json={**body, "hypertile_vae": [128, 3]})
    assert r.status_code == 422 and "hypertile_vae" in r.text
    r = c.post("/v1/jobs", json={**body, "hypertile_vae": [128, 200, 3]})
    assert r.status_code == 400 and "hypertile_vae swap_size must be a whole number in [0, 128], got 200" in r.text
