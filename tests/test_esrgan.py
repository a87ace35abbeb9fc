"""Model upscalers (ESRGAN's RRDBNet, Real-ESRGAN's x2/x1 folding and SRVGGNetCompact): files in both key
layouts, the architecture from the shapes, a float64 reference written here from the published layer order,
tiling, and a one-line error for every bad file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdengine.errors import SdengineError
from sdengine.models.esrgan import (
    UpscalerSpec,
    build_upscaler,
    upscale_image,
    upscale_once,
    upscale_tensor,
    upscale_tensor_comfyui,
)
from sdengine.weights.io import save_safetensors
from sdengine.weights.upscaler_file import (
    UpscalerFileError,
    load_upscaler,
    resolve_upscaler,
    save_upscaler,
    upscaler_files,
)

# ------------------------------------------------------------------------------- the reference (float64)


def _conv(sd: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, sd[f"{name}.weight"].double(), sd[f"{name}.bias"].double(), padding=1)


def _lrelu(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, x, 0.2 * x)


def reference_old_esrgan(sd: dict[str, torch.Tensor], x: torch.Tensor, blocks: int, n_up: int) -> torch.Tensor:
    """The original ESRGAN's sequential model, read from its ``model.N`` tensors: conv, ShortcutBlock(RRDB * nb,
    conv), (Upsample nearest x2, conv, LeakyReLU) * n_up, conv, LeakyReLU, conv."""
    x = x.double()
    fea = _conv(sd, "model.0", x)
    h = fea
    for b in range(blocks):
        block_in = h
        for r in (1, 2, 3):
            rdb_in = h
            feats = [rdb_in]
            for c in (1, 2, 3, 4):
                feats.append(_lrelu(_conv(sd, f"model.1.sub.{b}.RDB{r}.conv{c}.0", torch.cat(feats, 1))))
            h = rdb_in + 0.2 * _conv(sd, f"model.1.sub.{b}.RDB{r}.conv5.0", torch.cat(feats, 1))
        h = block_in + 0.2 * h
    h = fea + _conv(sd, f"model.1.sub.{blocks}", h)
    for k in range(n_up):
        h = h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
        h = _lrelu(_conv(sd, f"model.{3 + 3 * k}", h))
    h = _lrelu(_conv(sd, f"model.{3 * n_up + 2}", h))
    return _conv(sd, f"model.{3 * n_up + 4}", h)


def reference_unshuffle(x: torch.Tensor, r: int) -> torch.Tensor:
    """pixel_unshuffle written out: channel c*r*r + i*r + j holds x[c, i::r, j::r]."""
    n, c, h, w = x.shape
    return torch.cat([x[:, ch : ch + 1, i::r, j::r] for ch in range(c) for i in range(r) for j in range(r)], 1)


def reference_compact(sd: dict[str, torch.Tensor], x: torch.Tensor, n_conv: int, scale: int) -> torch.Tensor:
    """SRVGGNetCompact: conv, PReLU, (conv, PReLU) * n, conv, pixel_shuffle, + nearest-upscaled input."""
    x = x.double()
    h = x
    for i in range(n_conv + 1):
        h = _conv(sd, f"body.{2 * i}", h)
        a = sd[f"body.{2 * i + 1}.weight"].double().view(1, -1, 1, 1)
        h = torch.where(h >= 0, h, a * h)
    h = _conv(sd, f"body.{2 * n_conv + 2}", h)
    n, c, hh, ww = h.shape
    out = h.view(n, c // (scale * scale), scale, scale, hh, ww).permute(0, 1, 4, 2, 5, 3)
    out = out.reshape(n, c // (scale * scale), hh * scale, ww * scale)
    return out + x.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)


def _randomised(spec: UpscalerSpec, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_upscaler(spec)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 4:  # about variance-preserving, so that values stay near 1 through the network
                p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5))
            else:  # biases, PReLU slopes
                p.copy_(torch.randn_like(p) * 0.1 + 0.1)
    return model.eval()


X4 = UpscalerSpec("esrgan", 4, 3, 3, 8, 1, grow=4)
COMPACT = UpscalerSpec("compact", 4, 3, 3, 8, 2)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_old_layout_matches_the_float64_reference(tmp_path: Path, suffix: str) -> None:
    for spec in (X4, UpscalerSpec("esrgan", 2, 3, 3, 8, 2, grow=4, upsamples=1)):
        path = tmp_path / f"old{spec.scale}{suffix}"
        save_upscaler(_randomised(spec), path, layout="old")
        model = load_upscaler(path)
        assert model.spec == spec  # scale, blocks, widths from the shapes
        from sdengine.weights.upscaler_file import read_upscaler_weights

        sd = read_upscaler_weights(path)
        assert any(k.startswith("model.1.sub.0.RDB1") for k in sd)
        x = torch.rand(1, 3, 13, 11, generator=torch.Generator().manual_seed(1))
        got = upscale_tensor(model, x, tile=0)
        want = reference_old_esrgan(sd, x, spec.blocks, spec.upsamples)
        assert got.shape == (1, 3, 13 * spec.scale, 11 * spec.scale)
        assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4), (got.double() - want).abs().max()


def test_old_and_new_layouts_give_the_same_image(tmp_path: Path) -> None:
    model = _randomised(X4)
    save_upscaler(model, tmp_path / "new.safetensors")
    save_upscaler(model, tmp_path / "old.pth", layout="old")
    new, old = load_upscaler(tmp_path / "new.safetensors"), load_upscaler(tmp_path / "old.pth")
    x = torch.rand(1, 3, 10, 12)
    assert torch.equal(upscale_tensor(new, x, tile=0), upscale_tensor(old, x, tile=0))


@pytest.mark.parametrize("wrapper", ["params_ema", "params"])
def test_real_esrgan_x2_folding_and_wrapper(tmp_path: Path, wrapper: str) -> None:
    spec = UpscalerSpec("esrgan", 2, 3, 3, 8, 1, grow=4, unshuffle=2)
    model = _randomised(spec, seed=3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert sd["conv_first.weight"].shape[1] == 12
    torch.save({wrapper: sd, "other": sd if wrapper == "params" else {}}, tmp_path / "x2.pth")
    loaded = load_upscaler(tmp_path / "x2.pth")
    assert loaded.spec == spec
    x = torch.rand(1, 3, 14, 10)
    # the same RRDB network in the old layout run on the folded image, by the reference: folding then x4
    inner = UpscalerSpec("esrgan", 4, 12, 3, 8, 1, grow=4)
    from sdengine.weights.upscaler_file import new_to_old

    old = new_to_old(sd, inner)
    want = reference_old_esrgan(old, reference_unshuffle(x.double(), 2), 1, 2)
    got = upscale_tensor(loaded, x, tile=0)
    assert got.shape == (1, 3, 28, 20)
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    odd = upscale_tensor(loaded, torch.rand(1, 3, 15, 9), tile=0)  # padded to even sides, cut after
    assert odd.shape == (1, 3, 30, 18)


def test_compact_matches_the_float64_reference(tmp_path: Path) -> None:
    model = _randomised(COMPACT, seed=5)
    save_upscaler(model, tmp_path / "compact.pth")
    torch.save({"params": model.state_dict()}, tmp_path / "compact.pth")
    loaded = load_upscaler(tmp_path / "compact.pth")
    assert loaded.spec == COMPACT
    x = torch.rand(1, 3, 9, 7)
    want = reference_compact(model.state_dict(), x, 2, 4)
    got = upscale_tensor(loaded, x, tile=0)
    assert got.shape == (1, 3, 36, 28)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)


class _TileProbe(torch.nn.Module):
    """A stand-in upscaler that shows how tiles are cut and combined: nearest x2 of its input plus the first
    value of the tile it was given (a per-tile constant, so a blend weight or a tile start off by one changes
    the result)."""

    def __init__(self) -> None:
        super().__init__()
        self.spec = UpscalerSpec("compact", 2, 3, 3, 1, 0)
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest") + x[:, :1, :1, :1]


def _a1111_reference(x: torch.Tensor, tile: int, overlap: int, s: int = 2) -> torch.Tensor:
    """A1111's upscale_with_model on the probe in float64, written from split_grid / combine_grid: tile starts
    int(i * (size - tile) / (n - 1)) (clamped to size - tile), n = ceil((size - overlap) / (tile - overlap)); the
    image padded with black before it where shorter than a tile; each row of tiles pasted left to right, a later
    tile over its first overlap * s output pixels with mask uint8(i * 255 / (overlap * s)) / 255, then the rows top
    to bottom the same way."""
    x = x.double()
    _, _, h, w = x.shape
    hp, wp = max(h, tile), max(w, tile)
    xp = torch.zeros(1, 3, hp, wp, dtype=torch.float64)
    xp[:, :, hp - h :, wp - w :] = x

    def starts(size: int) -> list[int]:
        n = -(-(size - overlap) // (tile - overlap))
        dx = (size - tile) / (n - 1) if n > 1 else 0
        return [min(int(i * dx), size - tile) if int(i * dx) + tile < size else size - tile for i in range(n)]

    o = overlap * s
    mask = [float(int(i * 255 / o)) / 255 for i in range(o)]
    out = torch.zeros(1, 3, hp * s, wp * s, dtype=torch.float64)
    for r, y0 in enumerate(starts(hp)):
        row = torch.zeros(1, 3, tile * s, wp * s, dtype=torch.float64)
        for c, x0 in enumerate(starts(wp)):
            t = xp[:, :, y0 : y0 + tile, x0 : x0 + tile]
            up = t.repeat_interleave(s, 2).repeat_interleave(s, 3) + t[0, 0, 0, 0]
            for j in range(tile * s):
                col = x0 * s + j
                m = 1.0 if c == 0 or j >= o else mask[j]
                row[:, :, :, col] = up[:, :, :, j] * m + row[:, :, :, col] * (1 - m)
        for i in range(tile * s):
            line = y0 * s + i
            m = 1.0 if r == 0 or i >= o else mask[i]
            out[:, :, line, :] = row[:, :, i, :] * m + out[:, :, line, :] * (1 - m)
    return out[:, :, (hp - h) * s :, (wp - w) * s :]


def _comfyui_reference(x: torch.Tensor, tile: int, overlap: int, s: int = 2) -> torch.Tensor:
    """ComfyUI's tiled_scale on the probe in float64, written from its loop: a side longer than the tile cut at
    range(0, size - overlap, tile - overlap), each piece up to tile long; each upscaled piece weighted by a mask
    multiplied, at the t-th pixel from either end of each side, by (t + 1) / (overlap * s); the weighted pieces
    summed and divided by the summed masks. An image within one tile goes through whole."""
    x = x.double()
    _, _, h, w = x.shape
    if h <= tile and w <= tile:
        return x.repeat_interleave(s, 2).repeat_interleave(s, 3) + x[0, 0, 0, 0]
    out = torch.zeros(1, 3, h * s, w * s, dtype=torch.float64)
    div = torch.zeros_like(out)
    f = overlap * s
    ys = range(0, h - overlap, tile - overlap) if h > tile else [0]
    xs = range(0, w - overlap, tile - overlap) if w > tile else [0]
    for y0 in ys:
        for x0 in xs:
            t = x[:, :, y0 : y0 + tile, x0 : x0 + tile]
            up = t.repeat_interleave(s, 2).repeat_interleave(s, 3) + t[0, 0, 0, 0]
            mask = torch.ones_like(up)
            for d in (2, 3):
                n = mask.shape[d]
                if f >= n:
                    continue
                for k in range(f):
                    mask.narrow(d, k, 1).mul_((k + 1) / f)
                    mask.narrow(d, n - 1 - k, 1).mul_((k + 1) / f)
            out[:, :, y0 * s : y0 * s + up.shape[2], x0 * s : x0 * s + up.shape[3]] += up * mask
            div[:, :, y0 * s : y0 * s + up.shape[2], x0 * s : x0 * s + up.shape[3]] += mask
    return out / div


@pytest.mark.parametrize("size", [(70, 53), (40, 17), (24, 24), (101, 30)])
def test_tiles_are_cut_and_blended_as_a1111s_upscale_with_model(size: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *size)
    probe = _TileProbe()
    got = upscale_tensor(probe, x, tile=24, overlap=6)
    want = _a1111_reference(x, 24, 6)
    assert got.shape == want.shape == (1, 3, size[0] * 2, size[1] * 2)
    assert (got.double() - want).abs().max() < 1e-5
    if min(size) > 24:  # the per-tile constants make tiling visible: a different overlap gives another image
        assert (upscale_tensor(probe, x, tile=24, overlap=2).double() - want).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(70, 53), (40, 17), (24, 24), (101, 30)])
def test_comfyui_tiles_are_cut_and_feathered_as_tiled_scale(size: tuple[int, int]) -> None:
    x = torch.rand(1, 3, *size)
    probe = _TileProbe()
    got = upscale_tensor_comfyui(probe, x, tile=24, overlap=6)
    want = _comfyui_reference(x, 24, 6)
    assert got.shape == want.shape == (1, 3, size[0] * 2, size[1] * 2)
    assert (got.double() - want).abs().max() < 1e-5
    if max(size) > 24:
        assert (upscale_tensor_comfyui(probe, x, tile=24, overlap=2).double() - want).abs().max() > 1e-3


@pytest.mark.parametrize("spec", [COMPACT, X4], ids=["compact", "rrdb"])
def test_tiled_real_networks_stay_close_to_the_whole_image_and_blend_their_seams(spec: UpscalerSpec) -> None:
    """A real network in tiles (both rules): the untiled image up to what the network sees past a tile's edge
    (a tile put in the wrong place or weighted wrongly would be far off)."""
    model = _randomised(spec, seed=7)
    x = torch.rand(1, 3, 70, 53)
    whole = upscale_tensor(model, x, tile=0)
    for tiled in (upscale_tensor(model, x, tile=32, overlap=8), upscale_tensor_comfyui(model, x, tile=32, overlap=8)):
        assert tiled.shape == whole.shape == (1, 3, 280, 212)
        err = (tiled - whole).abs()
        assert err.mean() < 0.01 and err.max() < 0.5


def test_upscale_image_reaches_the_size_a1111_asks() -> None:
    model = _randomised(COMPACT)
    image = Image.new("RGB", (20, 12), (120, 30, 200))
    assert upscale_once(model, image).size == (80, 48)
    assert upscale_image(model, image, 2.0).size == (40, 24)  # one pass, then Lanczos down
    assert upscale_image(model, image, 10.0).size == (200, 120)  # two passes (x16), then Lanczos down
    grey = upscale_once(model, Image.new("L", (5, 5), 7))
    assert grey.size == (20, 20) and grey.mode == "RGB"


# --------------------------------------------------------------------------------------- bad files


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    good = _randomised(X4)
    save_upscaler(good, tmp_path / "good.safetensors")
    data = (tmp_path / "good.safetensors").read_bytes()
    out["truncated"] = tmp_path / "truncated.safetensors"
    out["truncated"].write_bytes(data[: len(data) // 2])
    torch.save(good.state_dict(), tmp_path / "good.pth")
    pth = (tmp_path / "good.pth").read_bytes()
    out["truncated_pth"] = tmp_path / "truncated.pth"
    out["truncated_pth"].write_bytes(pth[: len(pth) // 3])
    with open(out.setdefault("pickle", tmp_path / "evil.pth"), "wb") as f:
        pickle.dump({"conv_first.weight": Evil()}, f)
    save_safetensors({"foo.weight": torch.zeros(3, 3)}, out.setdefault("wrong_keys", tmp_path / "vae.safetensors"))
    sd = dict(good.state_dict())
    del sd["conv_body.weight"]
    save_safetensors(sd, out.setdefault("missing", tmp_path / "missing.safetensors"))
    sd = dict(good.state_dict())
    sd["conv_hr.weight"] = torch.zeros(8, 8, 1, 1)
    save_safetensors(sd, out.setdefault("shape", tmp_path / "shape.safetensors"))
    compact = dict(_randomised(COMPACT).state_dict())
    compact["body.5.weight"] = torch.zeros(9)  # the last conv's outputs (48) no more a square of 3
    compact["body.6.weight"] = torch.zeros(47, 8, 3, 3)
    save_safetensors(compact, out.setdefault("compact_scale", tmp_path / "compact_bad.safetensors"))
    out["empty"] = tmp_path / "empty.pth"
    out["empty"].write_bytes(b"")
    out["text"] = tmp_path / "notes.pth"
    out["text"].write_text("not a model")
    return out


def test_every_bad_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for what, path in _bad_files(tmp_path).items():
        with pytest.raises(SdengineError) as e:
            load_upscaler(path)
        text = str(e.value)
        assert "\n" not in text and str(path.name) in text, (what, text)
    assert "pwned" not in capsys.readouterr().out  # the pickle's code never ran


def test_folder_names(tmp_path: Path) -> None:
    model = _randomised(COMPACT)
    save_upscaler(model, tmp_path / "4x-Tiny.pth")
    save_upscaler(model, tmp_path / "RealESRGAN_x4plus.safetensors")
    (tmp_path / "readme.txt").write_text("x")
    assert list(upscaler_files(tmp_path)) == ["4x-Tiny", "RealESRGAN_x4plus"]
    assert resolve_upscaler("4x-Tiny", tmp_path)[0] == "4x-Tiny"
    assert resolve_upscaler("4x-Tiny.pth", tmp_path)[0] == "4x-Tiny"
    assert resolve_upscaler("R-ESRGAN 4x+", tmp_path) == ("R-ESRGAN 4x+", tmp_path / "RealESRGAN_x4plus.safetensors")
    for bad in ("nope", "../4x-Tiny", "/etc/passwd", "readme.txt"):
        with pytest.raises(UpscalerFileError) as e:
            resolve_upscaler(bad, tmp_path)
        assert "\n" not in str(e.value)
    with pytest.raises(UpscalerFileError, match="no upscalers folder"):
        resolve_upscaler("4x-Tiny", None)
    save_upscaler(model, tmp_path / "4x-Tiny.safetensors")
    with pytest.raises(UpscalerFileError, match="ambiguous"):
        resolve_upscaler("4x-Tiny", tmp_path)


# ------------------------------------------------------------------------------ the hires fix and the CLI

BASE = {
    "prompt": "a red apple",
    "negative_prompt": "blurry",
    "steps": 3,
    "sampler": "euler",
    "schedule": "normal",
    "cfg_scale": 6.0,
    "seed": 11,
    "progress": False,
}


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.fixture(scope="module")
def upscalers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("upscalers")
    save_upscaler(_randomised(COMPACT, seed=2), folder / "4x-Tiny.pth")
    save_upscaler(_randomised(X4, seed=4), folder / "RealESRGAN_x4plus.safetensors", layout="old")
    return folder


def test_hires_with_a_model_upscaler_is_img2img_of_the_model_upscaled_image(pipe, upscalers):
    import numpy as np

    from sdengine.metadata import parse_parameters, to_generate_kwargs

    s = pipe.default_size
    hr = {"enable_hr": True, "hr_scale": 2, "strength": 0.5, "upscalers_dir": upscalers}
    out = pipe(**BASE, **hr, hr_upscaler="4x-Tiny.pth")
    assert out.images[0].size == (2 * s, 2 * s)
    # A1111's resize_image with an upscaler: the model (x4, once: it covers 2x), then Lanczos down to the size
    first = pipe(**BASE).images[0]
    model = load_upscaler(upscalers / "4x-Tiny.pth")
    big = upscale_once(model, first).resize((2 * s, 2 * s), Image.Resampling.LANCZOS)
    want = pipe(**BASE, init_image=big, strength=0.5, width=2 * s, height=2 * s)
    np.testing.assert_allclose(out.arrays[0], want.arrays[0], atol=1e-6, rtol=0)
    lanczos = pipe(**BASE, **hr, hr_upscaler="Lanczos")
    assert not np.allclose(out.arrays[0], lanczos.arrays[0], atol=1e-3)  # the model ran
    # the infotext names it as A1111 does (the file's name without its suffix), and reads back
    fields = parse_parameters(out.infotexts[0])
    assert fields["Hires upscaler"] == "4x-Tiny"
    kwargs = to_generate_kwargs(fields, hires=True)
    assert kwargs["hr_upscaler"] == "4x-Tiny"
    again = pipe(**{**kwargs, "progress": False, "upscalers_dir": upscalers})
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(out.images[0]))
    # A1111's name of its Real-ESRGAN download, an old-layout ESRGAN file
    esr = pipe(**BASE, **hr, hr_upscaler="R-ESRGAN 4x+")
    assert "Hires upscaler: R-ESRGAN 4x+," in esr.infotexts[0]  # as A1111 writes it
    again = pipe(**BASE, **hr, hr_upscaler="RealESRGAN_x4plus")  # the same file by its own name
    np.testing.assert_array_equal(np.asarray(again.images[0]), np.asarray(esr.images[0]))
    assert "Hires upscaler: RealESRGAN_x4plus," in again.infotexts[0]


def test_hires_model_upscaler_errors_are_one_line(pipe, upscalers, tmp_path):
    from sdengine.errors import GenerationError

    for extra, message in (
        ({"hr_upscaler": "4x-Tiny"}, "needs upscalers_dir"),
        ({"hr_upscaler": "4x-Nope", "upscalers_dir": upscalers}, "unknown upscaler '4x-Nope'"),
        ({"hr_upscaler": "../4x-Tiny", "upscalers_dir": upscalers}, "'..' is not allowed"),
        ({"hr_upscaler": "4x-Tiny", "upscalers_dir": tmp_path / "missing"}, "does not exist"),
    ):
        with pytest.raises(GenerationError, match=message) as e:
            pipe(**BASE, enable_hr=True, **extra)
        assert "\n" not in str(e.value)
    bad = tmp_path / "bad"
    bad.mkdir()
    save_safetensors({"foo.weight": torch.zeros(2)}, bad / "4x-Broken.safetensors")
    with pytest.raises(SdengineError, match="not an ESRGAN") as e:
        pipe(**BASE, enable_hr=True, hr_upscaler="4x-Broken", upscalers_dir=bad)
    assert "\n" not in str(e.value)


def test_metadata_keeps_model_upscaler_names_and_refuses_other_kinds() -> None:
    from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs

    base = "a cat\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 3, Size: 32x32, Denoising strength: 0.5, "
    kw = to_generate_kwargs(parse_parameters(base + "Hires upscale: 2, Hires upscaler: 4x-UltraSharp"), hires=True)
    assert kw["hr_upscaler"] == "4x-UltraSharp"
    with pytest.raises(MetadataError, match="SwinIR 4x") as e:
        to_generate_kwargs(parse_parameters(base + "Hires upscale: 2, Hires upscaler: SwinIR 4x"), hires=True)
    assert "\n" not in str(e.value)


def test_cli_hires_with_upscalers_dir(tiny_sd1_folder, upscalers, tmp_path, capsys):
    from sdengine.cli import main

    out = tmp_path / "o"
    common = ["--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32", "--no-progress"]
    args = ["generate", "a red apple", *common, "--hr-upscaler", "4x-Tiny", "--hr-scale", "2", "--strength", "0.5"]
    assert main([*args, "--upscalers-dir", str(upscalers), "--out", str(out)]) == 0
    png = next(out.glob("*.png"))
    assert Image.open(png).size == (64, 64)
    assert "Hires upscaler: 4x-Tiny" in Image.open(png).text["parameters"]
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "o2")]) == 2  # no folder: one line naming the flag
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--upscalers-dir" in err, err
