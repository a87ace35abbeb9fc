"""Resize modes for init and control images (A1111's just resize / crop and resize / resize and fill), and the
notes a non-native size or a fitted init image leave."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.errors import GenerationError, SdengineError
from sdengine.io.resize import RESIZE_MODES, fit_geometry, resize_image, resize_mode_name, resize_tensor


def _bands(w: int, h: int) -> Image.Image:
    """A w x h picture: left half red, right half blue, a green top band and a white bottom band (h/10 each)."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2] = (255, 0, 0)
    a[:, w // 2 :] = (0, 0, 255)
    a[: h // 10] = (0, 255, 0)
    a[-(h // 10) :] = (255, 255, 255)
    return Image.fromarray(a)


def _near(pixels: np.ndarray, color: tuple[int, int, int], tol: int = 8) -> bool:
    """Lanczos rings a few levels next to a sharp edge; the colour itself must be kept."""
    return bool(np.abs(pixels.astype(int) - np.array(color)).max() <= tol)


def test_mode_names():
    assert [resize_mode_name(i) for i in range(3)] == list(RESIZE_MODES)
    assert resize_mode_name("crop") == "crop and resize" and resize_mode_name("Resize-And-Fill") == "resize and fill"
    assert resize_mode_name("1") == "crop and resize"
    with pytest.raises(GenerationError, match="unknown resize mode 'zoom'") as e:
        resize_mode_name("zoom")
    assert isinstance(e.value, SdengineError)
    with pytest.raises(GenerationError):
        resize_mode_name(3)


def test_geometry_of_each_mode():
    # 300x200 onto 64x64
    assert fit_geometry(300, 200, 64, 64, "just resize") == (64, 64, 0, 0)
    assert fit_geometry(300, 200, 64, 64, "crop and resize") == (96, 64, -16, 0)
    assert fit_geometry(300, 200, 64, 64, "resize and fill") == (64, 43, 0, 10)
    # a tall image onto a wide canvas
    assert fit_geometry(20, 40, 80, 40, "crop and resize") == (80, 160, 0, -60)
    assert fit_geometry(20, 40, 80, 40, "resize and fill") == (20, 40, 30, 0)


def test_just_resize_stretches():
    out = np.asarray(resize_image(_bands(300, 200), 64, 64, "just resize"))
    assert out.shape == (64, 64, 3)
    assert _near(out[32, :26], (255, 0, 0)) and _near(out[32, 38:], (0, 0, 255))
    assert _near(out[0, 10], (0, 255, 0), 40) and _near(out[-1, 10], (255, 255, 255), 40)  # bands kept


def test_crop_and_resize_cuts_the_sides_keeps_the_rows():
    # 300x200 -> 96x64, the 16 px on each side cut: the middle split stays in the middle, top and bottom rows kept
    out = np.asarray(resize_image(_bands(300, 200), 64, 64, "crop and resize"))
    assert out.shape == (64, 64, 3)
    assert _near(out[32, :26], (255, 0, 0)) and _near(out[32, 38:], (0, 0, 255))
    assert _near(out[0, 10], (0, 255, 0), 40) and _near(out[-1, 10], (255, 255, 255), 40)
    # a wide picture with a marker column at its left edge: the marker is cut away
    a = np.full((20, 60, 3), 128, np.uint8)
    a[:, :10] = (0, 255, 0)
    out = np.asarray(resize_image(Image.fromarray(a), 20, 20, "crop and resize"))
    assert out.shape == (20, 20, 3) and np.abs(out.astype(int) - 128).max() <= 2


def test_resize_and_fill_repeats_the_edges():
    # 300x200 -> 64x43 at y=10: rows 0..9 repeat its green top row, rows 53..63 its white bottom row
    out = np.asarray(resize_image(_bands(300, 200), 64, 64, "resize and fill"))
    assert out.shape == (64, 64, 3)
    assert (out[:10] == out[10:11]).all() and _near(out[5, 10], (0, 255, 0), 40)
    assert (out[53:] == out[52:53]).all() and _near(out[60, 10], (255, 255, 255), 40)
    assert _near(out[32, :26], (255, 0, 0)) and _near(out[32, 38:], (0, 0, 255))


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_tensor_and_image_agree_on_geometry(mode):
    img = _bands(60, 30)
    t = torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1)[None]
    a = np.asarray(resize_image(img, 32, 32, mode), np.float32) / 255
    b = resize_tensor(t, 32, 32, mode)[0].permute(1, 2, 0).numpy()
    assert b.shape == (32, 32, 3)
    assert np.abs(a - b).mean() < 0.05  # Lanczos vs bilinear differ a little at the edges, not in place


def test_pipeline_notes_non_native_size_and_fitted_init(tiny_sd1_folder, caplog):
    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(str(tiny_sd1_folder), device="cpu")
    native = pipe.default_size
    big = native * 2
    res = pipe("x", steps=1, seed=1, width=big, height=big, progress=False)
    assert any(f"{big}x{big} is not the model's training size {native}x{native}" in n for n in res.notes)
    assert not any("training size" in n for n in pipe("x", steps=1, seed=1, progress=False).notes)
    init = _bands(3 * native, 2 * native)
    for mode in RESIZE_MODES:
        res = pipe("x", steps=2, seed=1, init_image=init, strength=0.5, resize_mode=mode, progress=False)
        assert f"init image {3 * native}x{2 * native} fitted to {native}x{native} ({mode})" in res.notes
    a = pipe("x", steps=2, seed=1, init_image=init, strength=0.5, resize_mode="crop", progress=False).arrays
    b = pipe("x", steps=2, seed=1, init_image=init, strength=0.5, progress=False).arrays
    assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max() > 0  # the mode reaches the image
    with pytest.raises(GenerationError, match="unknown resize mode"):
        pipe("x", steps=2, init_image=init, resize_mode="zoom", progress=False)


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_control_images_take_the_mode(mode):
    from sdengine.pipeline.control import control_image_tensor

    img = _bands(60, 30)
    t = control_image_tensor(img, 32, 32, mode)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(t, np.asarray(resize_image(img, 32, 32, mode), np.float32) / 255, atol=1e-6)
