"""Tests for sdengine.data.emoji: parser, names, rendering, captions, errors, dataset cache."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ImageFont

from sdengine.data import emoji as E

SNIPPET = """\
# emoji-test.txt
# Format: code points; status # emoji name

# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                      ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                  ; fully-qualified     # ☺️ E0.6 smiling face
263A                                       ; unqualified         # ☺ E0.6 smiling face

# subgroup: face-affection
1F970                                      ; fully-qualified     # 🥰 E11.0 smiling face with hearts

# group: People & Body

# subgroup: hand-fingers-open
1F44B                                      ; fully-qualified     # 👋 E0.6 waving hand
1F44B 1F3FB                                ; fully-qualified     # 👋🏻 E1.0 waving hand: light skin tone
1F44B 1F3FF                                ; fully-qualified     # 👋🏿 E1.0 waving hand: dark skin tone

# group: Component

# subgroup: skin-tone
1F3FB                                      ; component           # 🏻 E1.0 light skin tone

# group: Food & Drink

# subgroup: food-fruit
1F34E                                      ; fully-qualified     # 🍎 E0.6 red apple

# group: Flags

# subgroup: country-flag
1F1EF 1F1F5                                ; fully-qualified     # 🇯🇵 E0.6 flag: Japan

#EOF
"""

REAL_FONT_AND_DATA = E.DEFAULT_FONT.is_file() and E.DEFAULT_EMOJI_TEST.is_file()
needs_real = pytest.mark.skipif(not REAL_FONT_AND_DATA, reason="Noto Color Emoji / unicode-data missing")
pytest.importorskip("emoji")


@pytest.fixture
def snippet(tmp_path: Path) -> Path:
    path = tmp_path / "emoji-test.txt"
    path.write_text(SNIPPET, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def font() -> ImageFont.FreeTypeFont:
    if not REAL_FONT_AND_DATA:
        pytest.skip("Noto Color Emoji / unicode-data missing")
    return E.load_font()


def test_parser_groups_subgroups_statuses(snippet: Path) -> None:
    lines = E.parse_emoji_test(snippet)
    assert len(lines) == 10
    first = lines[0]
    assert first.char == "\U0001f600"
    assert (first.status, first.group, first.subgroup) == ("fully-qualified", "Smileys & Emotion", "face-smiling")
    assert first.comment_name == "grinning face"
    by_name = {(ln.comment_name, ln.status): ln for ln in lines}
    assert by_name[("smiling face with hearts", "fully-qualified")].subgroup == "face-affection"
    assert by_name[("light skin tone", "component")].group == "Component"
    assert by_name[("flag: Japan", "fully-qualified")].subgroup == "country-flag"


def test_collect_entries_skips_skin_tones_components_unqualified(snippet: Path) -> None:
    entries = E.collect_entries(snippet, include_newer=False)
    chars = [e.char for e in entries]
    assert chars == ["\U0001f600", "\u263a\ufe0f", "\U0001f970", "\U0001f44b", "\U0001f34e", "\U0001f1ef\U0001f1f5"]
    assert not any(E.has_skin_tone(ord(c) for c in ch) for ch in chars)
    names = {e.char: e for e in entries}
    assert names["\U0001f34e"].name == "red apple"
    assert names["\U0001f34e"].group == "Food & Drink"
    assert names["\U0001f44b"].subgroup == "hand-fingers-open"
    assert names["\U0001f1ef\U0001f1f5"].name == "flag of japan"
    assert not any(e.group_inferred for e in entries)


def test_collect_entries_newer_ones_inherit_group(snippet: Path) -> None:
    entries = E.collect_entries(snippet, include_newer=True)
    assert len(entries) > 1000
    inferred = [e for e in entries if e.group_inferred]
    assert inferred and all(e.group for e in inferred)
    assert not any(E.has_skin_tone(ord(c) for c in e.char) for e in entries)
    assert len({e.char for e in entries}) == len(entries)


def test_clean_name_normalises() -> None:
    assert E.clean_name(":twelve_o\u2019clock:") == "twelve o'clock"
    assert E.clean_name(":Japanese_\u201chere\u201d_button:") == 'japanese "here" button'
    assert E.emoji_name("\U0001f1ef\U0001f1f5") == "flag of japan"
    assert E.emoji_name("\U0001f3c1") == "chequered flag"  # not "flag of chequered flag"


def test_captions_contain_name_group_and_are_seeded() -> None:
    entry = E.EmojiEntry("\U0001f34e", "red apple", "Food & Drink", "food-fruit")
    assert E.canonical_caption(entry) == "red apple, food & drink, food fruit"
    for t in range(len(E.CAPTION_TEMPLATES)):
        assert "red apple" in E.make_caption(entry, template=t)
    a = [E.make_caption(entry, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert a[0] == a[1]
    g = torch.Generator().manual_seed(0)
    assert len({E.make_caption(entry, g) for _ in range(60)}) == len(E.CAPTION_TEMPLATES)


@needs_real
def test_render_real_emoji(font: ImageFont.FreeTypeFont) -> None:
    chars = ["\U0001f600", "\U0001f34e", "\U0001f1ef\U0001f1f5", "\U0001f44b"]
    imgs = [E.render_emoji(c, font) for c in chars]
    for img in imgs:
        assert img is not None and img.shape == (64, 64, 3) and img.dtype == np.uint8
        corners = img[[0, 0, -1, -1], [0, -1, 0, -1]]
        assert (corners >= 250).all()  # white background
        assert (img < 200).any(axis=-1).mean() > 0.1  # a real glyph, not blank
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert np.abs(imgs[i].astype(int) - imgs[j].astype(int)).mean() > 10
    apple = imgs[1].reshape(-1, 3).astype(int)
    assert ((apple[:, 0] > 180) & (apple[:, 1] < 80)).mean() > 0.1  # red apple is red


@needs_real
def test_render_rejects_empty_and_multi_glyph(font: ImageFont.FreeTypeFont) -> None:
    assert E.render_emoji(" ", font) is None
    assert E.render_emoji("\U0001f600\U0001f34e", font) is None  # two glyphs side by side


def test_missing_font_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(E.EmojiDataError, match="apt-get install fonts-noto-color-emoji"):
        E.load_font(tmp_path / "nope.ttf")
    with pytest.raises(E.EmojiDataError, match="apt-get install fonts-noto-color-emoji"):
        E.EmojiDataset(cache_dir=tmp_path, font_path=tmp_path / "nope.ttf")


def test_missing_emoji_test_names_debian_package(tmp_path: Path) -> None:
    with pytest.raises(E.EmojiDataError, match="apt-get install unicode-data"):
        E.parse_emoji_test(tmp_path / "emoji-test.txt")


def test_missing_emoji_package_names_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "emoji", None)  # makes `import emoji` raise ImportError
    with pytest.raises(E.EmojiDataError, match="pip install emoji"):
        E.emoji_name("\U0001f600")


@needs_real
def test_dataset_small_snippet_and_cache(snippet: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    ds = E.EmojiDataset(cache_dir=cache, emoji_test=snippet, include_newer=False)
    assert len(ds) == 6
    assert ds.cache_path.is_file() and ds.cache_path.name.startswith("emoji-")
    img, cap = ds[4]
    assert img.shape == (3, 64, 64) and img.dtype == torch.float32
    assert -1.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert cap == "red apple, food & drink, food fruit"
    assert "flag of japan" in ds.captions[5]
    again = E.EmojiDataset(cache_dir=cache, emoji_test=snippet, include_newer=False)
    assert again.captions == ds.captions and torch.equal(again.images, ds.images)
    assert again.entries == ds.entries
    g = torch.Generator().manual_seed(1)
    assert "red apple" in ds.random_caption(4, g)


@pytest.mark.slow
@needs_real
def test_full_set_renders(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    ds = E.EmojiDataset(cache_dir=tmp_path)
    elapsed = time.perf_counter() - t0
    print(f"emoji: {len(ds)} rendered in {elapsed:.1f}s")
    assert 1850 <= len(ds) <= 1950
    assert ds.images.shape == (len(ds), 3, 64, 64)
    assert len(set(ds.captions)) == len(ds)
    assert any(c.startswith("flag of japan") for c in ds.captions)
    assert not any("\u2019" in c or "\u201c" in c for c in ds.captions)
    assert len({e.group for e in ds.entries}) >= 9
