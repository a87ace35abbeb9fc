"""Noto Color Emoji rendered at 64x64 with captions: the training data of the built-in `emoji` model.

Sources (all offline: Debian packages that the Makefile installs, and PyPI ``emoji`` of the ``train`` extra):

- glyphs: Debian ``fonts-noto-color-emoji`` (``NotoColorEmoji.ttf``, a CBDT bitmap font: only
  size 109 loads), drawn by Pillow with ``embedded_color=True``;
- groups and subgroups: ``emoji-test.txt`` from Debian ``unicode-data``;
- names: PyPI ``emoji`` (``EMOJI_DATA[char]["en"]``, e.g. ``":red_apple:"``).

Every fully-qualified emoji without a skin-tone modifier (U+1F3FB..U+1F3FF) is a candidate: those of
``emoji-test.txt`` first, then the newer ones that only the ``emoji`` package lists (they take the
group of the ``emoji-test.txt`` entry with the same first code point, e.g. "phoenix" 🐦‍🔥 from
"bird" 🐦). A candidate is kept only when it *renders* as one non-empty glyph: the font may lack it
(empty) or draw a ZWJ sequence as several glyphs side by side (too wide).

Rendering takes seconds; the result is cached as ``.npz`` keyed by a hash of the font, the test
file, the ``emoji`` version, the size and :data:`RENDER_VERSION`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import Dataset

from sdengine.errors import SdengineError
from sdengine.io.atomic import atomic_write

__all__ = [
    "CAPTION_TEMPLATES",
    "DEFAULT_EMOJI_TEST",
    "DEFAULT_FONT",
    "EmojiDataError",
    "EmojiDataset",
    "EmojiEntry",
    "EmojiTestLine",
    "canonical_caption",
    "clean_name",
    "collect_entries",
    "emoji_name",
    "has_skin_tone",
    "load_font",
    "make_caption",
    "parse_emoji_test",
    "render_emoji",
    "render_entries",
]

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
DEFAULT_EMOJI_TEST = Path("/usr/share/unicode/emoji/emoji-test.txt")
FONT_PACKAGE = "fonts-noto-color-emoji"
EMOJI_TEST_PACKAGE = "unicode-data"
PIP_PACKAGE = "emoji"
FONT_SIZE = 109  # the only size the CBDT bitmaps of Noto Color Emoji load at
RENDER_VERSION = 1  # bump when rendering or captioning changes: invalidates caches
SKIN_TONES = range(0x1F3FB, 0x1F400)
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
TAG_BLACK_FLAG = 0x1F3F4  # subdivision flags: U+1F3F4 followed by tag characters

CAPTION_TEMPLATES: tuple[str, ...] = (
    "{name}, {group}, {subgroup}",
    "{name}",
    "an emoji of {name}",
    "{name}, a {subgroup} emoji",
    "{name} emoji from {group}",
    "a picture of {name}, {subgroup}",
)


class EmojiDataError(SdengineError, RuntimeError):
    """A source of the emoji data set is missing or unreadable."""


@dataclass(frozen=True)
class EmojiTestLine:
    """One data line of ``emoji-test.txt`` with the group and subgroup it sits under."""

    codepoints: tuple[int, ...]
    status: str
    group: str
    subgroup: str
    comment_name: str

    @property
    def char(self) -> str:
        return "".join(chr(c) for c in self.codepoints)


@dataclass(frozen=True)
class EmojiEntry:
    """A candidate emoji: its string, caption name, group and subgroup."""

    char: str
    name: str
    group: str
    subgroup: str
    group_inferred: bool = False  # True for emoji newer than emoji-test.txt


def has_skin_tone(codepoints: Iterable[int]) -> bool:
    return any(c in SKIN_TONES for c in codepoints)


def parse_emoji_test(path: str | os.PathLike[str] = DEFAULT_EMOJI_TEST) -> list[EmojiTestLine]:
    """Every data line of ``emoji-test.txt`` (all statuses), in file order."""
    path = Path(path)
    if not path.is_file():
        raise EmojiDataError(
            f"emoji-test.txt not found at {path}: install it with `sudo apt-get install {EMOJI_TEST_PACKAGE}`"
        )
    group = subgroup = ""
    out: list[EmojiTestLine] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            body = line[1:].strip()
            if body.startswith("group:"):
                group = body[len("group:") :].strip()
                subgroup = ""
            elif body.startswith("subgroup:"):
                subgroup = body[len("subgroup:") :].strip()
            continue
        data, _, comment = line.partition("#")
        cps_text, sep, status = data.partition(";")
        if not sep:
            raise EmojiDataError(f"{path}:{lineno}: malformed line {raw!r}")
        try:
            cps = tuple(int(c, 16) for c in cps_text.split())
        except ValueError as exc:
            raise EmojiDataError(f"{path}:{lineno}: bad code point in {raw!r}") from exc
        # comment: "<emoji> E<version> <name>"
        parts = comment.strip().split(maxsplit=2)
        comment_name = parts[2] if len(parts) == 3 else ""
        out.append(EmojiTestLine(cps, status.strip(), group, subgroup, comment_name))
    return out


def _emoji_module() -> Any:
    try:
        import emoji
    except ImportError as exc:
        raise EmojiDataError(
            f"the PyPI package `emoji` is missing: install it with `pip install {PIP_PACKAGE}`"
        ) from exc
    return emoji


def clean_name(raw: str) -> str:
    """``":Japanese_“here”_button:"`` -> ``'japanese "here" button'``."""
    name = raw.strip(":").replace("_", " ")
    for curly, straight in (("\u2019", "'"), ("\u2018", "'"), ("\u201c", '"'), ("\u201d", '"')):
        name = name.replace(curly, straight)
    return " ".join(name.split()).lower()


def _is_flag(char: str, subgroup: str) -> bool:
    if subgroup in ("country-flag", "subdivision-flag"):
        return True
    cps = [ord(c) for c in char]
    return (len(cps) == 2 and all(c in REGIONAL_INDICATORS for c in cps)) or (
        len(cps) > 1 and cps[0] == TAG_BLACK_FLAG and 0xE0020 <= cps[1] <= 0xE007F
    )


def emoji_name(char: str, subgroup: str = "") -> str:
    """The caption name from PyPI ``emoji``; country and subdivision flags get "flag of "."""
    data = _emoji_module().EMOJI_DATA.get(char)
    if data is None:
        raise EmojiDataError(f"{char!r} is not in emoji.EMOJI_DATA")
    name = clean_name(data["en"])
    if _is_flag(char, subgroup) and not name.startswith("flag"):
        name = f"flag of {name}"
    return name


def collect_entries(
    emoji_test: str | os.PathLike[str] = DEFAULT_EMOJI_TEST, include_newer: bool = True
) -> list[EmojiEntry]:
    """Fully-qualified, skin-tone-free candidates (before the rendering check).

    ``include_newer`` adds the fully-qualified emoji that only PyPI ``emoji`` knows (newer Unicode
    than the installed ``emoji-test.txt``), grouped by their first code point when possible.
    """
    lines = parse_emoji_test(emoji_test)
    mod = _emoji_module()
    entries: list[EmojiEntry] = []
    seen: set[str] = set()
    by_first: dict[int, EmojiTestLine] = {}
    for ln in lines:
        by_first.setdefault(ln.codepoints[0], ln)
        if ln.status != "fully-qualified" or has_skin_tone(ln.codepoints):
            continue
        char = ln.char
        if char in seen:
            continue
        seen.add(char)
        name = emoji_name(char, ln.subgroup) if char in mod.EMOJI_DATA else clean_name(ln.comment_name)
        entries.append(EmojiEntry(char, name, ln.group, ln.subgroup))
    if include_newer:
        fq = mod.STATUS["fully_qualified"]
        for char, data in mod.EMOJI_DATA.items():
            cps = [ord(c) for c in char]
            if char in seen or data.get("status") != fq or has_skin_tone(cps):
                continue
            seen.add(char)
            ref = by_first.get(cps[0])
            group, subgroup = (ref.group, ref.subgroup) if ref else ("Other", "other")
            if _is_flag(char, ""):
                group, subgroup = "Flags", "country-flag"
            entries.append(EmojiEntry(char, emoji_name(char, subgroup), group, subgroup, True))
    return entries


def load_font(path: str | os.PathLike[str] = DEFAULT_FONT) -> ImageFont.FreeTypeFont:
    path = Path(path)
    if not path.is_file():
        raise EmojiDataError(
            f"Noto Color Emoji font not found at {path}: install it with `sudo apt-get install {FONT_PACKAGE}`"
        )
    try:
        return ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as exc:
        raise EmojiDataError(f"cannot load {path} at size {FONT_SIZE}: {exc}") from exc


def render_emoji(char: str, font: ImageFont.FreeTypeFont, size: int = 64, margin: float = 0.06) -> np.ndarray | None:
    """``(size, size, 3)`` uint8 RGB on white, or None when ``char`` does not draw as one glyph.

    The glyph is drawn on a transparent canvas four glyphs wide; its alpha bounding box decides:
    empty -> None; wider than 1.3 single-glyph advances (a sequence drawn as several glyphs) -> None.
    Otherwise the box is made square, widened by ``margin`` on each side, composited on white and
    resized with LANCZOS.
    """
    advance = font.getlength("\U0001f600")  # one glyph's advance (136 px at size 109)
    cell = int(round(advance))
    # Four cells wide and tall, drawn at (cell, cell): any accepted square crop stays inside.
    canvas = Image.new("RGBA", (4 * cell, 4 * cell), (255, 255, 255, 0))
    ImageDraw.Draw(canvas).text((cell, cell), char, font=font, embedded_color=True)
    bbox = canvas.getchannel("A").getbbox()
    if bbox is None:
        return None
    left, top, right, bottom = bbox
    if right - left > 1.3 * advance or bottom - top > 1.3 * advance:
        return None
    side = int(round(max(right - left, bottom - top) * (1 + 2 * margin)))
    x0 = int(round((left + right - side) / 2))
    y0 = int(round((top + bottom - side) / 2))
    white = Image.new("RGBA", canvas.size, (255, 255, 255, 255))
    crop = Image.alpha_composite(white, canvas).convert("RGB").crop((x0, y0, x0 + side, y0 + side))
    return np.asarray(crop.resize((size, size), Image.Resampling.LANCZOS), dtype=np.uint8)


def render_entries(
    entries: list[EmojiEntry], font: ImageFont.FreeTypeFont, size: int = 64
) -> tuple[list[EmojiEntry], np.ndarray]:
    """Render all ``entries``; keep those that draw as one glyph. Images ``(N, size, size, 3)``."""
    kept: list[EmojiEntry] = []
    images: list[np.ndarray] = []
    for entry in entries:
        img = render_emoji(entry.char, font, size)
        if img is not None:
            kept.append(entry)
            images.append(img)
    stack = np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)
    return kept, stack


def _words(label: str) -> str:
    return " ".join(label.replace("-", " ").split()).lower()


def canonical_caption(entry: EmojiEntry) -> str:
    """``"red apple, food & drink, food fruit"``: name, group, subgroup."""
    return make_caption(entry, template=0)


def make_caption(entry: EmojiEntry, generator: torch.Generator | None = None, template: int | None = None) -> str:
    """A caption from :data:`CAPTION_TEMPLATES`: ``template`` if given, else drawn with
    ``generator`` (an explicit ``torch.Generator``); with neither, the canonical one."""
    if template is None:
        template = 0 if generator is None else int(torch.randint(len(CAPTION_TEMPLATES), (1,), generator=generator))
    return CAPTION_TEMPLATES[template].format(
        name=entry.name, group=_words(entry.group), subgroup=_words(entry.subgroup)
    )


def _file_digest(path: Path, h: Any) -> None:
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def _cache_key(font_path: Path, test_path: Path, size: int, include_newer: bool) -> str:
    h = hashlib.sha256()
    _file_digest(font_path, h)
    _file_digest(test_path, h)
    version = getattr(_emoji_module(), "__version__", "?")
    h.update(f"{version}|{size}|{include_newer}|{RENDER_VERSION}".encode())
    return h.hexdigest()[:16]


def _default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sdengine"


class EmojiDataset(Dataset):
    """All emoji that render as one glyph, as ``(image, caption)`` pairs.

    ``images``: float tensor ``(N, 3, size, size)`` in [-1, 1]; ``captions``: the canonical caption
    of each (:func:`canonical_caption`); ``entries``: the :class:`EmojiEntry` of each. Use
    :meth:`random_caption` with an explicit generator for template augmentation.
    """

    def __init__(
        self,
        size: int = 64,
        cache_dir: str | os.PathLike[str] | None = None,
        font_path: str | os.PathLike[str] = DEFAULT_FONT,
        emoji_test: str | os.PathLike[str] = DEFAULT_EMOJI_TEST,
        include_newer: bool = True,
    ) -> None:
        font_path, emoji_test = Path(font_path), Path(emoji_test)
        font = load_font(font_path)  # checks the font first: clear apt error
        if not emoji_test.is_file():
            parse_emoji_test(emoji_test)  # raises the apt error
        cache = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
        key = _cache_key(font_path, emoji_test, size, include_newer)
        self.cache_path = cache / f"emoji-{key}.npz"
        self.size = size
        if self.cache_path.is_file():
            entries, pixels = self._load(self.cache_path)
        else:
            entries, pixels = render_entries(collect_entries(emoji_test, include_newer), font, size)
            self._save(self.cache_path, entries, pixels)
        self.entries: list[EmojiEntry] = entries
        self.pixels: np.ndarray = pixels  # (N, size, size, 3) uint8
        self.images: torch.Tensor = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
        self.captions: list[str] = [canonical_caption(e) for e in entries]

    @staticmethod
    def _save(path: Path, entries: list[EmojiEntry], pixels: np.ndarray) -> None:
        with atomic_write(path) as f:
            np.savez_compressed(
                f,
                pixels=pixels,
                chars=np.array([e.char for e in entries]),
                names=np.array([e.name for e in entries]),
                groups=np.array([e.group for e in entries]),
                subgroups=np.array([e.subgroup for e in entries]),
                inferred=np.array([e.group_inferred for e in entries], dtype=bool),
            )

    @staticmethod
    def _load(path: Path) -> tuple[list[EmojiEntry], np.ndarray]:
        with np.load(path, allow_pickle=False) as z:
            entries = [
                EmojiEntry(str(c), str(n), str(g), str(s), bool(i))
                for c, n, g, s, i in zip(
                    z["chars"], z["names"], z["groups"], z["subgroups"], z["inferred"], strict=True
                )
            ]
            return entries, z["pixels"].copy()

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.images[index], self.captions[index]

    def random_caption(self, index: int, generator: torch.Generator) -> str:
        return make_caption(self.entries[index], generator)
