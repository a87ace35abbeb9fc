"""The shipped Fashion-MNIST classifier, its feature API, FD_fmnist and the training entry point."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sdengine.data.fashion_mnist import DEFAULT_ROOT, FashionMNIST
from sdengine.metrics.classifier import (
    CONFIG_NAME,
    DEFAULT_WEIGHTS_DIR,
    WEIGHTS_NAME,
    FashionClassifier,
    augment,
    features,
    load_classifier,
    predict,
    prepare_images,
    train_classifier,
)
from sdengine.metrics.frechet import class_accuracy, fd_fmnist, frechet_distance_features

needs_data = pytest.mark.skipif(not DEFAULT_ROOT.is_dir(), reason="dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def test_head() -> FashionMNIST:
    return FashionMNIST("test", limit=2000)


def test_shipped_weights_small_and_documented() -> None:
    w = DEFAULT_WEIGHTS_DIR / WEIGHTS_NAME
    assert w.is_file(), f"shipped classifier weights missing: {w}"
    assert w.stat().st_size < 1_000_000
    meta = json.loads((DEFAULT_WEIGHTS_DIR / CONFIG_NAME).read_text())
    assert meta["test_accuracy"] >= 0.92
    assert meta["train"]["command"].startswith("python -m sdengine.metrics.classifier")
    model = load_classifier()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert load_classifier() is model  # cached


@needs_data
def test_shipped_classifier_accuracy(test_head: FashionMNIST) -> None:
    pred = predict(test_head.images)
    acc = (pred == test_head.labels).float().mean().item()
    assert acc >= 0.90, acc
    x, y = test_head.images[:200], test_head.labels[:200]
    assert class_accuracy(x, y) == pytest.approx((pred[:200] == y).float().mean().item())
    # wrong labels are caught: a class-conditional check must be able to fail
    assert class_accuracy(x, (y + 1) % 10) < 0.1


@needs_data
def test_features_shape_determinism_and_28px(test_head: FashionMNIST) -> None:
    x = test_head.images[:64]
    f = features(x)
    assert f.shape == (64, 128) and f.dtype == torch.float32 and (f >= 0).all()
    torch.testing.assert_close(features(x, batch_size=7), f, rtol=1e-5, atol=1e-5)
    # 28x28 input is padded with background, giving the same features
    torch.testing.assert_close(features(x[:, :, 2:30, 2:30]), f, rtol=1e-5, atol=1e-5)


@needs_data
def test_fd_fmnist_orders_real_vs_noise(test_head: FashionMNIST) -> None:
    a, b = test_head.images[:300], test_head.images[300:600]
    fa, fb = features(a), features(b)
    real_real = frechet_distance_features(fa, fb)
    assert real_real >= 0
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(200, 1, 32, 32, generator=g) * 2 - 1
    assert fd_fmnist(a, noise) > 10 * real_real
    # only trousers vs everything: a mode-collapsed "generator" scores worse than real data
    trousers = test_head.images[test_head.labels == 1][:150]  # 128-d covariance needs N > 128
    assert frechet_distance_features(fa, features(trousers)) > 3 * real_real


def test_prepare_images_checks() -> None:
    with pytest.raises(ValueError, match="uint8"):
        prepare_images(torch.zeros(2, 1, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        prepare_images(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\(N, 1, 32, 32\)"):
        prepare_images(torch.zeros(2, 1, 30, 30))
    assert prepare_images(torch.zeros(2, 32, 32)).shape == (2, 1, 32, 32)


def test_augment_shifts_and_flips_keep_content() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.full((64, 1, 32, 32), -1.0)
    x[:, :, 10:20, 8:14] = 1.0  # a 10x6 block, away from the borders
    y = augment(x, g)
    assert y.shape == x.shape
    assert ((y == 1.0).sum(dim=(1, 2, 3)) == 60).all()  # shifted/flipped, never cropped
    assert set(y.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(y, x)
    torch.testing.assert_close(augment(x, torch.Generator().manual_seed(0)), y)


def test_model_size_under_1mb_fp16() -> None:
    n = sum(p.numel() for p in FashionClassifier().parameters())
    assert n * 2 < 1_000_000


def _write_fake_fmnist(root: Path, n_train: int = 64, n_test: int = 16) -> None:
    import gzip
    import struct

    rng = np.random.default_rng(0)
    for n, img, lbl in [
        (n_train, "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        (n_test, "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
    ]:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, (n,), dtype=np.uint8)
        for name, arr in ((img, images), (lbl, labels)):
            hdr = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
            with gzip.open(root / name, "wb") as f:
                f.write(hdr + arr.tobytes())


def test_train_classifier_smoke_writes_loadable_weights(tmp_path: Path) -> None:
    _write_fake_fmnist(tmp_path)
    out = tmp_path / "clf"
    logs: list[str] = []
    res = train_classifier(out, epochs=1, seed=0, batch_size=32, root=tmp_path, threads=None, log=logs.append)
    assert len(logs) == 1 and 0.0 <= res["test_accuracy"] <= 1.0
    meta = json.loads((out / CONFIG_NAME).read_text())
    assert meta["train"]["epochs"] == 1 and meta["train"]["train_images"] == 64
    model = load_classifier(out)
    x = FashionMNIST("test", root=tmp_path).images
    assert predict(x, model).shape == (16,)
    assert features(x, model).shape == (16, 128)
