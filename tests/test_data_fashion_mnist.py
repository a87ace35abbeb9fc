"""Fashion-MNIST IDX reader and dataset: synthetic IDX files in a tmp dir, no real data needed."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from sdengine.data.fashion_mnist import (
    APT_PACKAGE,
    CLASS_NAMES,
    DEFAULT_ROOT,
    FashionMNIST,
    IDXError,
    load_fashion_mnist,
    read_idx,
    to_model_range,
)


def write_idx(path: Path, arr: np.ndarray, code: int = 0x08, compress: bool = True) -> None:
    """Reference writer, independent of the reader: header by struct, payload big-endian."""
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    dt = {0x08: ">u1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    data = header + arr.astype(dt).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


def make_fake_dataset(root: Path, n_train: int = 7, n_test: int = 5, seed: int = 0) -> dict[str, tuple]:
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, img_name, lbl_name in [
        ("train", n_train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        ("test", n_test, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]:
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        lbls = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        write_idx(root / img_name, imgs)
        write_idx(root / lbl_name, lbls)
        out[split] = (imgs, lbls)
    return out


def test_read_idx_round_trip_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    cases = [
        (rng.integers(0, 256, (3, 4, 5)).astype(np.uint8), 0x08),
        (rng.integers(-30000, 30000, (6,)).astype(np.int16), 0x0B),
        (rng.integers(-(2**31), 2**31 - 1, (2, 3)).astype(np.int32), 0x0C),
        (rng.normal(size=(4, 2)).astype(np.float32), 0x0D),
        (rng.normal(size=(5,)), 0x0E),
    ]
    for k, (arr, code) in enumerate(cases):
        for compress in (True, False):
            p = tmp_path / f"a{k}.idx{'.gz' if compress else ''}"
            write_idx(p, arr, code, compress)
            got = read_idx(p)
            assert got.shape == arr.shape and got.dtype.isnative
            np.testing.assert_array_equal(got, arr)


def test_load_split_round_trip(tmp_path: Path) -> None:
    ref = make_fake_dataset(tmp_path)
    for split in ("train", "test"):
        imgs, lbls = load_fashion_mnist(split, root=tmp_path)
        assert imgs.dtype == np.uint8 and imgs.shape == ref[split][0].shape
        assert lbls.dtype == np.int64 and lbls.shape == ref[split][1].shape
        np.testing.assert_array_equal(imgs, ref[split][0])
        np.testing.assert_array_equal(lbls, ref[split][1])
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path)  # type: ignore[arg-type]


def test_env_var_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = make_fake_dataset(tmp_path)
    monkeypatch.setenv("SDENGINE_FASHION_MNIST", str(tmp_path))
    np.testing.assert_array_equal(load_fashion_mnist("test")[0], ref["test"][0])


def test_bad_magic_and_ndim_and_size(tmp_path: Path) -> None:
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(IDXError, match="magic") as e:
        read_idx(p)
    assert "bad.gz" in str(e.value)

    p2 = tmp_path / "unknown_type.idx"
    p2.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"a")
    with pytest.raises(IDXError, match="magic"):
        read_idx(p2)

    p3 = tmp_path / "vec.idx"
    write_idx(p3, np.zeros(4, np.uint8), compress=False)
    with pytest.raises(IDXError, match="3-d"):
        read_idx(p3, expect_ndim=3)

    # payload longer than the header says
    p4 = tmp_path / "long.idx"
    p4.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc")
    with pytest.raises(IDXError, match="payload"):
        read_idx(p4)

    p5 = tmp_path / "tiny.idx"
    p5.write_bytes(b"\x00\x00")
    with pytest.raises(IDXError, match="too short"):
        read_idx(p5)

    p6 = tmp_path / "hdr.idx"
    p6.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 2))
    with pytest.raises(IDXError, match="truncated IDX header"):
        read_idx(p6)


def test_truncated_gzip_names_file(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    p = tmp_path / "train-images-idx3-ubyte.gz"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # cut mid-stream: gzip raises EOFError
    with pytest.raises(IDXError) as e:
        load_fashion_mnist("train", root=tmp_path)
    assert "train-images-idx3-ubyte.gz" in str(e.value)

    p.write_bytes(b"this is not gzip at all")
    with pytest.raises(IDXError, match="train-images-idx3-ubyte.gz"):
        load_fashion_mnist("train", root=tmp_path)


def test_short_payload_names_file(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    p = tmp_path / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(p.read_bytes())
    p.write_bytes(gzip.compress(raw[:-10]))  # valid gzip, 10 bytes short
    with pytest.raises(IDXError, match="t10k-images-idx3-ubyte.gz.*payload"):
        load_fashion_mnist("test", root=tmp_path)


def test_count_mismatch_and_wrong_image_size(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4, np.uint8))
    with pytest.raises(IDXError, match="5 images but 4 labels"):
        load_fashion_mnist("test", root=tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((4, 27, 28), np.uint8))
    with pytest.raises(IDXError, match="28x28"):
        load_fashion_mnist("test", root=tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    make_fake_dataset(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(IDXError, match="label 10"):
        load_fashion_mnist("test", root=tmp_path)


def test_missing_dataset_names_apt_package_and_path(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as e:
        load_fashion_mnist("train", root=missing)
    msg = str(e.value)
    assert f"apt-get install {APT_PACKAGE}" in msg
    assert APT_PACKAGE == "dataset-fashion-mnist"
    assert str(missing / "train-images-idx3-ubyte.gz") in msg
    assert "\n" not in msg


def test_dataset_range_padding_labels(tmp_path: Path) -> None:
    ref = make_fake_dataset(tmp_path)
    ds = FashionMNIST("train", root=tmp_path)
    imgs, lbls = ref["train"]
    assert len(ds) == len(imgs)
    x, y = ds[3]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and int(y) == int(lbls[3])
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    # 2 px border of background (-1) on every side
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (ds.images[:, 0][:, border] == -1.0).all()
    # interior is the image mapped linearly: 0 -> -1, 255 -> 1
    expect = torch.from_numpy(imgs[3]).float() / 127.5 - 1.0
    torch.testing.assert_close(x[0, 2:30, 2:30], expect, rtol=0, atol=1e-6)
    assert ds.class_names == CLASS_NAMES and len(CLASS_NAMES) == 10
    assert len(FashionMNIST("test", root=tmp_path, limit=2)) == 2


def test_to_model_range_endpoints() -> None:
    x = to_model_range(np.array([[[0, 255]]], np.uint8), pad=0)
    assert x.tolist() == [[[[-1.0, 1.0]]]]
    with pytest.raises(ValueError, match="uint8"):
        to_model_range(np.zeros((1, 28, 28), np.float32))


@pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_test_split_shape_and_balance() -> None:
    imgs, lbls = load_fashion_mnist("test")
    assert imgs.shape == (10000, 28, 28) and lbls.shape == (10000,)
    assert np.bincount(lbls, minlength=10).tolist() == [1000] * 10
    assert lbls[:5].tolist() == [9, 2, 1, 1, 6]  # well-known first test labels
