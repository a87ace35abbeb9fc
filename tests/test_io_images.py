"""sdengine.io.images: one image loader (16-bit, EXIF, alpha, arrays, tensors, named errors), one rounding rule,
atomic saves."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.errors import GenerationError, SdengineError
from sdengine.io.images import ImageError, load_image, save_image_atomic, to_pil, to_uint8


def test_sixteen_bit_grayscale_png_is_scaled_by_its_bit_depth(tmp_path):
    a = np.full((4, 5), 32768, np.uint16)  # mid grey in 16 bits
    a[0, 0] = 65535
    path = tmp_path / "g16.png"
    Image.fromarray(a).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I")  # PIL reads it as a 16/32-bit integer image
    img = load_image(path, mode="L")
    g = np.asarray(img)
    assert g.shape == (4, 5) and g[1, 1] == 128 and g[0, 0] == 255  # not clipped to white
    assert np.asarray(load_image(a)).max() == 255 and np.asarray(load_image(a))[1, 1] == 128  # uint16 arrays too


def test_exif_orientation_is_applied(tmp_path):
    a = np.zeros((2, 3, 3), np.uint8)
    a[0, 0] = 255  # top-left red
    img = Image.fromarray(a)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "phone.jpg"
    img.save(path, exif=exif, quality=100)
    out = load_image(path)
    assert out.size == (2, 3)  # width and height swapped


def test_alpha_is_composited_or_dropped(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[0, 0, 3] = 255  # one opaque pixel, the rest transparent
    on_black = np.asarray(load_image(rgba, mode="RGB", background=(0, 0, 0)))
    assert on_black[0, 0].tolist() == [200] * 3 and on_black[1, 1].tolist() == [0] * 3
    dropped = np.asarray(load_image(rgba, mode="RGB"))
    assert dropped[1, 1].tolist() == [200] * 3


def test_arrays_and_tensors_and_the_rounding_rule():
    assert to_uint8(np.array([0.0, 0.5 / 255, 1.5 / 255, 1.0, 2.0, -1.0])).tolist() == [0, 0, 2, 255, 255, 0]
    t = torch.rand(2, 3, 4, 5)
    assert to_uint8(t).shape == (2, 4, 5, 3)
    assert np.array_equal(np.asarray(to_pil(t)[1]), to_uint8(t)[1])
    img = load_image(torch.full((3, 4, 5), 0.5))
    assert img.size == (5, 4) and np.asarray(img)[0, 0].tolist() == [128] * 3


def test_errors_are_named_and_of_the_callers_class(tmp_path):
    with pytest.raises(ImageError, match=r"init image not found: .*nope\.png"):
        load_image(tmp_path / "nope.png", "init image")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(GenerationError, match=r"cannot read the mask .*bad\.png"):
        load_image(bad, "mask", error=GenerationError)
    with pytest.raises(SdengineError, match=r"shape \(2, 2, 7\)"):
        load_image(np.zeros((2, 2, 7), np.uint8))
    with pytest.raises(ImageError, match="batch of 2"):
        load_image(torch.zeros(2, 3, 4, 4))


def test_save_image_atomic_leaves_no_temporary_file(tmp_path):
    path = save_image_atomic(Image.new("RGB", (3, 3), "red"), tmp_path / "sub" / "out.png")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["out.png"]
    with Image.open(path) as im:
        assert im.getpixel((1, 1)) == (255, 0, 0)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_image_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = save_image_atomic(Image.new("RGB", (2, 2), "blue"), tmp_path / "out.jpg", quality=90)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    with Image.open(path) as im:
        assert im.format == "JPEG"  # the format follows the final name, not the temporary one
