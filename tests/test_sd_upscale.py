"""A1111's SD upscale script (sdengine.sd_upscale): the grid against a float64 re-derivation of A1111's
``split_grid`` / ``combine_grid``, the seeds, the tiles against img2img of each crop, the A1111 route, the CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from sdengine.errors import GenerationError
from sdengine.sd_upscale import (
    combine_grid,
    lanczos_upscale,
    parse_sd_upscale,
    plan_grid,
    sd_upscale,
    split_grid,
    tile_seeds,
)


def _picture(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _ref_positions(w: int, h: int, tw: int, th: int, ov: int) -> list[tuple[int, list[int]]]:
    """A1111's split_grid positions, re-derived in float64."""
    cols = math.ceil((w - ov) / (tw - ov))
    rows = math.ceil((h - ov) / (th - ov))
    dx = np.float64(w - tw) / (cols - 1) if cols > 1 else 0.0
    dy = np.float64(h - th) / (rows - 1) if rows > 1 else 0.0
    out = []
    for r in range(rows):
        y = int(np.floor(r * dy))
        y = h - th if y + th >= h else y
        xs = []
        for c in range(cols):
            x = int(np.floor(c * dx))
            xs.append(w - tw if x + tw >= w else x)
        out.append((y, xs))
    return out


def _ref_crop(a: np.ndarray, x: int, y: int, tw: int, th: int) -> np.ndarray:
    out = np.zeros((th, tw, 3), np.float64)
    h, w = a.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + tw, w), min(y + th, h)
    out[y0 - y : y1 - y, x0 - x : x1 - x] = a[y0:y1, x0:x1]
    return out


def _blend(dst: np.ndarray, src: np.ndarray, m: np.ndarray) -> np.ndarray:
    return np.floor((dst * (255.0 - m) + src * m) / 255.0 + 0.5)


def _put(canvas: np.ndarray, piece: np.ndarray, x: int, y: int, m: np.ndarray | None = None) -> None:
    """Paste ``piece`` at (x, y) clipped to ``canvas`` (with mask ``m`` of piece's size: the blend)."""
    h, w = canvas.shape[:2]
    ph, pw = piece.shape[:2]
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + pw, w), min(y + ph, h)
    if x1 <= x0 or y1 <= y0:
        return
    src = piece[y0 - y : y1 - y, x0 - x : x1 - x]
    if m is None:
        canvas[y0:y1, x0:x1] = src
    else:
        canvas[y0:y1, x0:x1] = _blend(canvas[y0:y1, x0:x1], src, m[y0 - y : y1 - y, x0 - x : x1 - x, None])


def _ref_combine(tiles: list[np.ndarray], pos, w: int, h: int, tw: int, th: int, ov: int) -> np.ndarray:
    """A1111's combine_grid in float64: ramp floor(i * 255 / overlap), blend round((a (255-m) + b m) / 255)."""
    ramp = np.floor(np.arange(ov, dtype=np.float64) * 255.0 / ov) if ov else np.zeros(0)
    out = np.zeros((h, w, 3))
    k = 0
    for y, xs in pos:
        row = np.zeros((th, w, 3))
        for x in xs:
            t = tiles[k]
            k += 1
            if x == 0:
                _put(row, t, 0, 0)
                continue
            _put(row, t[:, :ov], x, 0, np.broadcast_to(ramp[None, :], (th, ov)))
            _put(row, t[:, ov:], x + ov, 0)
        if y == 0:
            _put(out, row, 0, 0)
            continue
        _put(out, row[:ov], 0, y, np.broadcast_to(ramp[:, None], (ov, w)))
        _put(out, row[ov:], 0, y + ov)
    return out


CASES = [
    (64, 64, 32, 32, 8),
    (100, 70, 32, 24, 8),
    (96, 64, 48, 32, 16),
    (40, 40, 64, 64, 16),  # the image smaller than a tile: A1111 crops with black and x goes negative
    (57, 33, 20, 20, 0),  # no overlap: plain pastes
    (130, 90, 40, 40, 37),
]


@pytest.mark.parametrize(("w", "h", "tw", "th", "ov"), CASES)
def test_grid_matches_a1111_formulas(w, h, tw, th, ov):
    grid = plan_grid(w, h, tw, th, ov)
    pos = _ref_positions(w, h, tw, th, ov)
    assert [(y, list(xs)) for y, xs in grid.rows] == pos
    img = _picture(w, h, seed=w + h)
    a = np.asarray(img).astype(np.float64)
    g2, tiles = split_grid(img, tw, th, ov)
    assert g2 == grid
    for t, (x, y, _, _) in zip(tiles, grid.boxes, strict=True):
        np.testing.assert_array_equal(np.asarray(t), _ref_crop(a, x, y, tw, th))
    # split then combine of unmodified tiles gives the image back exactly (as A1111's does)
    back = combine_grid(grid, tiles)
    np.testing.assert_array_equal(
        np.asarray(back), _ref_combine([_ref_crop(a, x, y, tw, th) for x, y, _, _ in grid.boxes], pos, w, h, tw, th, ov)
    )
    np.testing.assert_array_equal(np.asarray(back), np.asarray(img))
    # changed tiles: the blend is the formula's, pixel for pixel
    changed = [_picture(tw, th, seed=100 + k) for k in range(grid.count)]
    want = _ref_combine([np.asarray(t).astype(np.float64) for t in changed], pos, w, h, tw, th, ov)
    np.testing.assert_array_equal(np.asarray(combine_grid(grid, changed)), want)


def test_blend_is_a_ramp_between_two_tiles():
    grid = plan_grid(56, 32, 32, 32, 8)  # two columns: x 0 and 24, overlap 8
    assert grid.rows == ((0, (0, 24)),)
    black, white = Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32), (255, 255, 255))
    out = np.asarray(combine_grid(grid, [black, white]))[0, :, 0]
    assert list(out[24:32]) == [i * 255 // 8 for i in range(8)] and out[:24].max() == 0 and out[32:].min() == 255


def test_seeds_are_a1111s():
    # batch size 1: one seed per tile; upscale n starts at seed + n
    assert [s for s, _ in tile_seeds(4, 1, 10)] == [10, 11, 12, 13]
    assert [s for s, _ in tile_seeds(4, 1, 10, iteration=1)] == [11, 12, 13, 14]
    # batch size 2: batch i starts at seed + i (A1111's p.seed = processed.seed + 1), its rows + j
    assert [s for s, _ in tile_seeds(5, 2, 10)] == [10, 11, 11, 12, 12]
    # variation seeds: every row keeps the batch's seed, the variation seed is subseed + j
    assert tile_seeds(3, 2, 10, subseed=7, variation=True) == [(10, 7), (10, 8), (11, 7)]


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(GenerationError, match="overlap 32 must be smaller than the tile size 32x48"):
        plan_grid(100, 100, 32, 48, 32)
    with pytest.raises(GenerationError, match="must be larger than the tile overlap"):
        plan_grid(8, 100, 32, 32, 16)
    with pytest.raises(GenerationError, match="scale factor must be a number > 0"):
        sd_upscale(lambda *a, **k: None, _picture(16, 16), width=16, height=16, overlap=8, scale=0)
    with pytest.raises(GenerationError, match="each side must be 8 to 8192"):
        sd_upscale(lambda *a, **k: None, _picture(16, 16), width=16, height=16, overlap=8, scale=1000)
    with pytest.raises(GenerationError, match="unknown upscaler 'ESRGAN_4x'"):
        sd_upscale(lambda *a, **k: None, _picture(16, 16), width=16, height=16, overlap=8, upscaler="ESRGAN_4x")
    with pytest.raises(GenerationError, match="mask cannot be used"):
        sd_upscale(lambda *a, **k: None, _picture(16, 16), width=16, height=16, overlap=8, mask=_picture(16, 16))
    with pytest.raises(GenerationError, match="expected SCALE"):
        parse_sd_upscale("two")
    assert parse_sd_upscale("2.5") == (2.5, 64) and parse_sd_upscale("2,16") == (2.0, 16)


def test_lanczos_upscale_is_a1111s_target():
    img = _picture(30, 21)
    assert lanczos_upscale(img, 2).size == (56, 40)  # 60 and 42 rounded down to multiples of 8
    assert lanczos_upscale(img, 1.5).size == (40, 24)


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(str(tiny_sd1_folder), device="cpu")


KW = {"steps": 2, "sampler": "euler", "strength": 0.5, "progress": False}


def _pure_regions(grid):
    """Each tile's box of pixels that no other tile's paste or blend changes: (tile index, x0, x1, y0, y1)."""
    out = []
    k = 0
    for r, (y, xs) in enumerate(grid.rows):
        y0 = 0 if r == 0 else y + grid.overlap
        y1 = grid.rows[r + 1][0] + 1 if r + 1 < len(grid.rows) else grid.image_h
        for c, x in enumerate(xs):
            x0 = 0 if c == 0 else x + grid.overlap
            x1 = xs[c + 1] + 1 if c + 1 < len(xs) else grid.image_w
            out.append((k, x0, x1, y0, y1))
            k += 1
    return out


def test_tiles_are_img2img_of_each_crop_with_a1111s_seeds(tiny_pipe):
    img = _picture(32, 32, seed=3)
    res = sd_upscale(tiny_pipe, img, "a wall", width=32, height=32, scale=2, overlap=8, seed=5, batch_size=2, **KW)
    big = np.asarray(res.images[0])
    assert big.shape == (64, 64, 3) and res.seeds == [5]
    assert res.grid.rows == ((0, (0, 16, 32)), (16, (0, 16, 32)), (32, (0, 16, 32)))
    assert res.tile_seeds == [[5, 6, 6, 7, 7, 8, 8, 9, 9]]
    _, crops = split_grid(lanczos_upscale(img, 2), 32, 32, 8)
    outs = []
    for k, crop in enumerate(crops):
        one = tiny_pipe("a wall", init_image=crop, width=32, height=32, seed=res.tile_seeds[0][k], **KW)
        outs.append(one.images[0])
        if k == 0:
            head, version = one.infotexts[0].rsplit(", Version: ", 1)
            extra = ", SD upscale overlap: 8, SD upscale upscaler: Lanczos"
            assert res.infotexts[0] == f"{head}{extra}, Version: {version}"
    for k, x0, x1, y0, y1 in _pure_regions(res.grid):
        x, y = res.grid.boxes[k][:2]
        np.testing.assert_array_equal(big[y0:y1, x0:x1], np.asarray(outs[k])[y0 - y : y1 - y, x0 - x : x1 - x])
    np.testing.assert_array_equal(big, np.asarray(combine_grid(res.grid, outs)))  # and the blends too


def test_progress_counts_every_tile_of_every_upscale(tiny_pipe):
    seen = []
    res = sd_upscale(
        tiny_pipe,
        _picture(16, 16),
        "x",
        width=16,
        height=16,
        scale=1.5,
        overlap=8,
        n_iter=2,
        seed=1,
        callback=lambda info: seen.append((info.step, info.steps)) or True,
        **KW,
    )
    assert res.grid.count == 4 and res.images[0].size == (24, 24)
    per = seen[0][1] // 8  # steps of one tile run
    assert seen == [(k, 8 * per) for k in range(1, 8 * per + 1)]


def test_n_iter_makes_one_upscale_each_from_seed_plus_n(tiny_pipe):
    img = _picture(16, 16, seed=4)
    res = sd_upscale(
        tiny_pipe, img, "x", width=16, height=16, scale=2, overlap=0, seed=9, n_iter=2, upscaler="none", **KW
    )
    # "None" keeps the image's size: one tile
    assert [im.size for im in res.images] == [(16, 16), (16, 16)] and res.seeds == [9, 10]
    assert res.upscaler == "None" and "SD upscale upscaler: None" in res.infotexts[1]
    one = tiny_pipe("x", init_image=img, width=16, height=16, seed=10, **KW)
    np.testing.assert_array_equal(np.asarray(res.images[1]), np.asarray(one.images[0]))


# -- the A1111 route (the real webuiapi client, a live server with the emoji model) -------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from _live_server import live_server, server_config
    from sdengine.models.esrgan import UpscalerSpec, build_upscaler
    from sdengine.weights.upscaler_file import save_upscaler

    tmp = tmp_path_factory.mktemp("sd_upscale")
    folder = tmp / "upscalers"
    folder.mkdir()
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    model = build_upscaler(UpscalerSpec("compact", 4, 3, 3, 8, 1))
    save_upscaler(model.eval(), folder / "4x-Tiny.pth")
    with live_server(server_config(tmp, upscalers_dir=folder)) as s:
        s.folder = folder  # type: ignore[attr-defined]
        yield s


@pytest.fixture()
def api(server):
    import webuiapi

    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", scheduler="Automatic")


A1111_KW = {"steps": 2, "cfg_scale": 7.0, "denoising_strength": 0.5, "width": 64, "height": 64}
PY_KW = {
    "steps": 2,
    "cfg_scale": 7.0,
    "strength": 0.5,
    "sampler": "euler",
    "schedule": "uniform",  # A1111's "Automatic" for Euler
    "strength_rule": "a1111",
    "progress": False,
}


def test_a1111_route_equals_the_python_call(api, server):
    from _live_server import shared_loader

    init = _picture(48, 48, seed=7)
    assert "sd upscale" in api.get_scripts()["img2img"]
    r = api.img2img(
        images=[init],
        prompt="a red apple",
        seed=4,
        batch_size=2,
        n_iter=2,
        script_name="SD upscale",
        script_args=[None, 16, 1, 2],  # info, overlap, upscaler_index (1: Lanczos), scale_factor
        **A1111_KW,
    )
    assert [im.size for im in r.images] == [(96, 96), (96, 96)]
    pipe = shared_loader("emoji", "cpu")
    want = sd_upscale(
        pipe, init, "a red apple", width=64, height=64, scale=2, overlap=16, seed=4, batch_size=2, n_iter=2, **PY_KW
    )
    assert want.tile_seeds == [[4, 5, 5, 6], [5, 6, 6, 7]]
    for got, made in zip(r.images, want.images, strict=True):
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(made))
    info = r.info["infotexts"][0]
    assert "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in info and "Size: 64x64" in info
    assert "Seed: 4," in info


def test_a1111_route_with_a_model_upscaler_and_errors(api, server):
    import httpx
    import webuiapi

    from _live_server import shared_loader

    init = _picture(24, 24, seed=8)
    r = api.img2img(
        images=[init], prompt="x", seed=2, script_name="sd UPSCALE", script_args=["", 0, "4x-tiny", 3], **A1111_KW
    )
    pipe = shared_loader("emoji", "cpu")
    want = sd_upscale(
        pipe,
        init,
        "x",
        width=64,
        height=64,
        scale=3,
        overlap=0,
        upscaler="4x-Tiny",
        upscalers_dir=server.folder,
        seed=2,
        **PY_KW,
    )
    assert r.image.size == (72, 72) and "SD upscale upscaler: 4x-Tiny" in r.info["infotexts"][0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.images[0]))
    body = {"init_images": [webuiapi.raw_b64_img(init)], "prompt": "x", "script_name": "SD upscale", **A1111_KW}
    for args, msg in (
        ([None, 64, 1, 2], "overlap 64 must be smaller than the tile size 64x64"),
        ([None, 8, 9, 2], "upscaler_index"),
        ([None, 8, "ESRGAN_4x", 2], "not one of /sdapi/v1/upscalers"),
        ([None, 8, 1, 0], "scale_factor"),
        ([None, -1, 1, 2], "overlap"),
        ([None, 8, 1, 200], "over this server's limit of 16777216 pixels"),  # 4800 x 4800
    ):
        resp = httpx.post(f"{api.baseurl}/img2img", json={**body, "script_args": args}, timeout=60)
        assert resp.status_code == 400 and msg in resp.text and "\\n" not in resp.json()["detail"], resp.text
    resp = httpx.post(f"{api.baseurl}/txt2img", json={"prompt": "x", "script_name": "SD upscale"}, timeout=60)
    assert resp.status_code == 400 and "not found" in resp.text


def test_cli_sd_upscale_equals_the_python_call(tiny_sd1_folder, tiny_pipe, tmp_path, capsys):
    from sdengine.cli import main

    init = tmp_path / "init.png"
    _picture(24, 24, seed=5).save(init)
    out = tmp_path / "o"
    args = ["generate", "a wall", "--model", str(tiny_sd1_folder), "--steps", "2", "--seed", "3", "--sampler", "euler"]
    args += ["--init-image", str(init), "--strength", "0.5", "--width", "32", "--height", "32", "--no-progress"]
    assert main([*args, "--sd-upscale", "2,8", "--n-iter", "2", "--out", str(out)]) == 0
    made = sorted(out.glob("*.png"))
    assert [p.name for p in made] == ["00000-3.png", "00001-4.png"]
    want = sd_upscale(tiny_pipe, init, "a wall", width=32, height=32, scale=2, overlap=8, seed=3, n_iter=2, **KW)
    for path, image in zip(made, want.images, strict=True):
        got = Image.open(path)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(image))
        assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in got.text["parameters"]
    capsys.readouterr()
    assert main([*args, "--upscaler", "None", "--out", str(tmp_path / "x")]) == 2
    assert "--upscaler names --sd-upscale's upscaler" in capsys.readouterr().err
    assert main([*args, "--sd-upscale", "2,32", "--out", str(tmp_path / "x")]) == 2
    assert "overlap 32 must be smaller than the tile size 32x32" in capsys.readouterr().err
