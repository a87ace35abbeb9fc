"""Image-folder dataset: formats, resize + centre crop, channels, captions, errors, flips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.data.folders import (
    ImageFolder,
    ImageFolderError,
    list_images,
    load_image,
    resize_center_crop,
)


def _save(path: Path, arr: np.ndarray, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def _striped(h: int, w: int) -> np.ndarray:
    """RGB image: left half red, right half blue, so crops and flips are visible in the values."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2 :, 2] = 255
    return a


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _save(root / "a.png", _striped(40, 80))
    _save(root / "sub" / "b.JPG", np.full((50, 30, 3), 200, np.uint8), fmt="JPEG")
    _save(root / "sub" / "deeper" / "c.webp", np.full((16, 16, 3), 10, np.uint8), fmt="WEBP")
    _save(root / "d.bmp", np.full((20, 20, 3), 0, np.uint8))
    (root / "notes.md").write_text("not an image")
    (root / "a.txt").write_text("  a red and blue flag \n", encoding="utf-8")
    return root


def test_lists_recursively_sorted_case_insensitive(folder: Path) -> None:
    names = [p.relative_to(folder).as_posix() for p in list_images(folder)]
    assert names == ["a.png", "d.bmp", "sub/b.JPG", "sub/deeper/c.webp"]


def test_rgb_shapes_range_and_captions(folder: Path) -> None:
    ds = ImageFolder(folder, size=16)
    assert len(ds) == 4
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
    assert ds[0]["caption"] == "a red and blue flag"
    assert ds[1]["caption"] == ""  # no .txt -> default caption
    assert ds[0]["path"].endswith("a.png")
    # a BMP of zeros is exactly -1; values map 0 -> -1, 255 -> 1
    assert (ds[1]["image"] == -1.0).all()


def test_grayscale(folder: Path) -> None:
    ds = ImageFolder(folder, size=8, channels=1)
    x = ds[2]["image"]  # b.JPG, uniform 200 (JPEG: allow a small error)
    assert x.shape == (1, 8, 8)
    assert torch.allclose(x, torch.full_like(x, 200 / 127.5 - 1), atol=0.03)
    with pytest.raises(ValueError, match="channels"):
        ImageFolder(folder, size=8, channels=2)  # type: ignore[arg-type]


def test_resize_shorter_side_then_center_crop() -> None:
    # 40x80 (h x w) -> shorter side 20 -> 20x40 -> centre crop 20x20 keeps columns 10..29,
    # i.e. 10 red columns then 10 blue ones.
    img = resize_center_crop(Image.fromarray(_striped(40, 80)), 20)
    assert img.size == (20, 20)
    a = np.asarray(img).astype(int)
    assert (a[:, :9, 0] > 240).all() and (a[:, :9, 2] < 15).all()
    assert (a[:, 11:, 2] > 240).all() and (a[:, 11:, 0] < 15).all()
    # portrait: 30 wide x 60 tall -> crop keeps the middle rows
    tall = np.zeros((60, 30), np.uint8)
    tall[15:45] = 255
    b = np.asarray(resize_center_crop(Image.fromarray(tall), 30))
    assert b.shape == (30, 30) and (b == 255).all()
    # upscaling small images also works
    assert resize_center_crop(Image.new("RGB", (5, 10)), 12).size == (12, 12)


def test_load_image_no_resize_and_alpha_background(tmp_path: Path) -> None:
    rgba = np.zeros((4, 6, 4), np.uint8)  # fully transparent black
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel
    _save(tmp_path / "t.png", rgba)
    x = load_image(tmp_path / "t.png")
    assert x.shape == (3, 4, 6)
    assert x[:, 0, 0].tolist() == [1.0, -1.0, -1.0]
    assert (x[:, 1:, :] == 1.0).all()  # transparent -> white background, not black
    g = load_image(tmp_path / "t.png", channels=1, background=(0, 0, 0))
    assert g.shape == (1, 4, 6) and (g[:, 1:, :] == -1.0).all()


def test_empty_folder_error_names_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ImageFolderError, match=str(empty)):
        ImageFolder(empty, size=8)
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(tmp_path / "nope", size=8)


def test_corrupt_image_error_names_file(folder: Path) -> None:
    bad = folder / "sub" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageFolderError, match="broken.png"):
        ImageFolder(folder, size=8)  # up-front verify()
    ds = ImageFolder(folder, size=8, verify=False)  # lazily: the decode error names it too
    i = [p.name for p in ds.paths].index("broken.png")
    with pytest.raises(ImageFolderError, match="broken.png"):
        ds[i]


def test_truncated_image_error_names_file(tmp_path: Path) -> None:
    p = tmp_path / "cut.jpg"
    _save(p, np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt="JPEG")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(ImageFolderError, match="cut.jpg"):
        ImageFolder(tmp_path, size=8, verify=False)[0]


def test_require_captions(folder: Path) -> None:
    with pytest.raises(ImageFolderError, match=r"3 image\(s\).*no \.txt caption.*d\.bmp"):
        ImageFolder(folder, size=8, require_captions=True)
    for p in list_images(folder):
        p.with_suffix(".txt").write_text(f"caption of {p.stem}")
    ds = ImageFolder(folder, size=8, require_captions=True)
    assert ds[3]["caption"] == "caption of c"
    # one wording per line; blank lines skipped; an empty file is one empty caption
    first = list_images(folder)[0]
    first.with_suffix(".txt").write_text("\n  one way \n\nanother way\n")
    list_images(folder)[1].with_suffix(".txt").write_text("\n")
    ds = ImageFolder(folder, size=8, require_captions=True)
    assert ds.caption_sets[0] == ["one way", "another way"] and ds.captions[0] == "one way"
    assert ds.caption_sets[1] == [""] and ds[0]["caption"] == "one way"


def test_flip_uses_explicit_generator(folder: Path) -> None:
    with pytest.raises(ValueError, match="Generator"):
        ImageFolder(folder, size=16, flip_p=0.5)
    always = ImageFolder(folder, size=16, flip_p=1.0, generator=torch.Generator().manual_seed(0))
    plain = ImageFolder(folder, size=16)
    torch.testing.assert_close(always[0]["image"], plain[0]["image"].flip(-1))

    def draws(seed: int) -> list[bool]:
        ds = ImageFolder(folder, size=16, flip_p=0.5, generator=torch.Generator().manual_seed(seed), cache=True)
        ref = plain[0]["image"]
        return [not torch.equal(ds[0]["image"], ref) for _ in range(40)]

    a, b = draws(1), draws(1)
    assert a == b  # same seed, same flips
    assert 5 < sum(a) < 35  # both outcomes occur
    assert draws(2) != a


def test_stack_all(folder: Path) -> None:
    ds = ImageFolder(folder, size=8, channels=1, flip_p=1.0, generator=torch.Generator().manual_seed(0))
    x = ds.stack()
    assert x.shape == (4, 1, 8, 8)
    torch.testing.assert_close(x[2], ImageFolder(folder, size=8, channels=1)[2]["image"])  # not flipped


def test_a_caption_that_is_not_utf8_is_one_line_naming_it(folder: Path) -> None:
    (folder / "d.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))  # an editor's legacy encoding
    with pytest.raises(ImageFolderError, match=r"caption .*d\.txt is not UTF-8 text \(byte 0xe9 at offset 3\)") as e:
        ImageFolder(folder, size=8)
    assert "\n" not in str(e.value)


def test_a_byte_order_mark_is_not_part_of_the_caption(folder: Path) -> None:
    (folder / "d.txt").write_bytes("\ufeffbom caption\r\nsecond wording\r\n".encode())  # Windows Notepad
    ds = ImageFolder(folder, size=8)
    i = [p.name for p in ds.paths].index("d.bmp")
    assert ds.caption_sets[i] == ["bom caption", "second wording"]
