"""The emoji recogniser: shapes, resizing, augmentation, I/O, a short training run and the shipped weights."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from sdengine.data import emoji as E
from sdengine.metrics.emoji_recogniser import (
    CONFIG_NAME,
    DEFAULT_WEIGHTS_DIR,
    WEIGHTS_NAME,
    EmojiRecogniser,
    RecogniserConfig,
    augment,
    load_emoji_recogniser,
    recogniser_features,
    recogniser_logits,
    save_emoji_recogniser,
    topk_accuracy,
    train_emoji_recogniser,
)

TINY = RecogniserConfig(channels=(8, 16, 16, 32), num_classes=16)
needs_real = pytest.mark.skipif(
    not (E.DEFAULT_FONT.is_file() and E.DEFAULT_EMOJI_TEST.is_file()), reason="Noto Color Emoji / unicode-data missing"
)
needs_weights = pytest.mark.skipif(not (DEFAULT_WEIGHTS_DIR / WEIGHTS_NAME).is_file(), reason="weights not shipped")


@pytest.fixture(scope="module")
def renders() -> E.EmojiDataset:
    pytest.importorskip("emoji")
    if not (E.DEFAULT_FONT.is_file() and E.DEFAULT_EMOJI_TEST.is_file()):
        pytest.skip("Noto Color Emoji / unicode-data missing")
    return E.EmojiDataset()


@pytest.fixture(scope="module")
def shipped() -> EmojiRecogniser:
    if not (DEFAULT_WEIGHTS_DIR / WEIGHTS_NAME).is_file():
        pytest.skip("weights not shipped")
    return load_emoji_recogniser()


def _toy_set(n: int = 16) -> SimpleNamespace:
    """``n`` white 64x64 images, each with a differently coloured and placed square."""
    gen = torch.Generator().manual_seed(0)
    images = torch.ones(n, 3, 64, 64)
    for i in range(n):
        y, x = 8 + (i % 4) * 10, 8 + (i // 4) * 10
        images[i, :, y : y + 18, x : x + 18] = torch.rand(3, 1, 1, generator=gen) * 2 - 1
    return SimpleNamespace(images=images, entries=[SimpleNamespace(char=chr(0x1F600 + i)) for i in range(n)])


def test_shapes_and_resize() -> None:
    torch.manual_seed(0)
    m = EmojiRecogniser(TINY).eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert m(x).shape == (2, 16)
    assert m.features(x).shape == (2, TINY.feature_dim) == (2, 32)
    assert m.prepare(x) is x  # 64x64 passes unchanged
    for size in (32, 48, 128):
        y = torch.rand(3, 3, size, size) * 2 - 1
        assert m.prepare(y).shape == (3, 3, 64, 64)
        assert m(y).shape == (3, 16)
    big = torch.rand(2, 3, 100, 100) * 2 - 1
    down = torch.nn.functional.interpolate(big, size=(64, 64), mode="bilinear", antialias=True)
    torch.testing.assert_close(m(big), m(down))
    with pytest.raises(ValueError, match="B, 3, H, W"):
        m(torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="float"):
        m(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))


def test_augment_reproducible_range_and_white_fill() -> None:
    x = _toy_set().images
    a = augment(x, torch.Generator().manual_seed(3))
    b = augment(x, torch.Generator().manual_seed(3))
    c = augment(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= -1 and a.max() <= 1
    # Corners are background before and after (white fill, up to colour jitter and noise).
    assert a[:, :, :2, :2].mean() > 0.5


def test_topk_accuracy() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    targets = torch.tensor([2, 1, 0])
    assert topk_accuracy(logits, targets, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, targets, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, targets, 5) == 1.0


def test_class_index_save_load_round_trip(tmp_path) -> None:
    chars = [chr(0x1F600 + i) for i in range(16)]
    m = EmojiRecogniser(TINY, classes=chars).eval()
    for i, c in enumerate(chars):
        assert m.class_index(c) == i
    with pytest.raises(KeyError, match="not a class"):
        m.class_index("a")
    save_emoji_recogniser(m, tmp_path, {"train": {"steps": 0}})
    back = load_emoji_recogniser(path=tmp_path)
    assert back.classes == chars and back.config == TINY and not back.training
    assert json.loads((tmp_path / CONFIG_NAME).read_text(encoding="utf-8"))["train"] == {"steps": 0}
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    torch.testing.assert_close(back(x), m(x), atol=0.05, rtol=0.05)  # fp16 storage
    with pytest.raises(ValueError, match="classes"):
        EmojiRecogniser(TINY, classes=chars[:3])


def test_missing_weights_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="emoji recogniser weights not found"):
        load_emoji_recogniser(path=tmp_path)


def test_short_training_lowers_the_loss() -> None:
    data = _toy_set()
    history: list[float] = []
    m = train_emoji_recogniser(
        data, steps=20, batch_size=16, lr=5e-3, seed=0, progress=None, config=TINY, history=history
    )
    assert len(history) == 20 and not m.training
    assert sum(history[-5:]) / 5 < sum(history[:5]) / 5 - 0.3, history
    assert m.classes == [e.char for e in data.entries]


@needs_real
@needs_weights
def test_shipped_weights_small_fp16_documented(shipped: EmojiRecogniser, renders: E.EmojiDataset) -> None:
    w = DEFAULT_WEIGHTS_DIR / WEIGHTS_NAME
    assert w.stat().st_size < 6_500_000
    with safe_open(str(w), "pt") as sf:
        assert {sf.get_slice(k).get_dtype() for k in sf.keys()} <= {"F16", "I64"}
    meta = json.loads((DEFAULT_WEIGHTS_DIR / CONFIG_NAME).read_text(encoding="utf-8"))
    assert meta["train"]["command"].startswith("python -m sdengine.metrics.emoji_recogniser train")
    assert meta["accuracy"]["clean_top1"] >= 0.98
    assert shipped.classes == [e.char for e in renders.entries]
    for i in (0, 500, len(renders) - 1):
        assert shipped.class_index(renders.entries[i].char) == i
    assert not shipped.training and not any(p.requires_grad for p in shipped.parameters())


@needs_real
@needs_weights
def test_shipped_recognises_clean_and_augmented_renders(shipped: EmojiRecogniser, renders: E.EmojiDataset) -> None:
    idx = torch.arange(0, len(renders), len(renders) // 300)[:300]
    x, targets = renders.images[idx], idx
    clean = recogniser_logits(x, shipped)
    assert topk_accuracy(clean, targets, 1) >= 0.98
    aug = augment(x, torch.Generator().manual_seed(2024))
    assert topk_accuracy(recogniser_logits(aug, shipped), targets, 1) >= 0.80
    small = torch.nn.functional.interpolate(x[:50], size=(32, 32), mode="bilinear", antialias=True)
    assert topk_accuracy(recogniser_logits(small, shipped), targets[:50], 1) >= 0.8  # resized inside
    feats = recogniser_features(x[:10], shipped)
    assert feats.shape == (10, shipped.config.feature_dim) and torch.isfinite(feats).all()
