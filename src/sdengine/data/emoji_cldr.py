"""Extra captions for the emoji data set from Unicode CLDR's English emoji annotations.

CLDR (Debian ``unicode-cldr-core``) gives every emoji a short name (the text-to-speech name) and a few
keywords, e.g. 😂 -> ``"face with tears of joy"`` and ``face | joy | laugh | tears | tears of joy``;
``annotationsDerived/en.xml`` adds the sequences (flags, keycaps, ZWJ sequences). The base model's captions
(:data:`sdengine.data.emoji.CAPTION_TEMPLATES`) only ever say an emoji's name, group and subgroup; the keywords
are other words people use for it. :func:`cldr_captions` composes a fixed number (:data:`CLDR_CAPTION_COUNT`)
of captions per emoji from them, deterministically (a pure function of the entry and the annotations), so
that every emoji has the same number of captions and the trainer's caption tensor stays rectangular.

CLDR writes its code points without U+FE0F (variation selector 16); the data set may write an emoji with or
without it, so both sides are matched with it removed (:func:`annotation_key`).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, NamedTuple

from .emoji import CAPTION_TEMPLATES, EmojiDataError, EmojiEntry, clean_name, make_caption

__all__ = [
    "CLDR_CAPTION_COUNT",
    "CLDR_PACKAGE",
    "DEFAULT_ANNOTATIONS",
    "DEFAULT_DERIVED_ANNOTATIONS",
    "Annotation",
    "annotation_key",
    "cldr_captions",
    "emoji_alias",
    "load_annotations",
    "parse_annotations",
]

CLDR_PACKAGE = "unicode-cldr-core"
DEFAULT_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")
DEFAULT_DERIVED_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotationsDerived/en.xml")
CLDR_CAPTION_COUNT = 4  # captions per emoji from CLDR (the fallback gives as many from the templates)
MAX_KEYWORDS = 6  # the keyword-list caption stays well inside the text encoder's 32 tokens
VS16 = "\ufe0f"


class Annotation(NamedTuple):
    """One emoji's CLDR annotation: the short name and the keywords (file order, lower case)."""

    name: str
    keywords: tuple[str, ...]


def annotation_key(char: str) -> str:
    """``char`` without U+FE0F: how CLDR writes it (and how :func:`parse_annotations` keys it)."""
    return char.replace(VS16, "")


def parse_annotations(path: str | os.PathLike[str] = DEFAULT_ANNOTATIONS) -> dict[str, Annotation]:
    """``{char without U+FE0F: Annotation}`` of one CLDR annotations file; an entry with keywords but no short
    name (or the reverse) gets the one it has and an empty other part."""
    path = Path(path)
    if not path.is_file():
        raise EmojiDataError(
            f"CLDR emoji annotations not found at {path}: install them with `sudo apt-get install {CLDR_PACKAGE}`"
        )
    try:
        root = ET.parse(path).getroot()  # expat reads no external DTD or entity: nothing is fetched
    except ET.ParseError as exc:
        raise EmojiDataError(f"{path}: not a readable CLDR annotations file ({exc})") from exc
    names: dict[str, str] = {}
    keywords: dict[str, tuple[str, ...]] = {}
    for el in root.iter("annotation"):
        cp, text = el.get("cp"), (el.text or "").strip()
        if not cp or not text:
            continue
        key = annotation_key(cp)
        if el.get("type") == "tts":
            names[key] = clean_name(text)  # straight quotes, single spaces, lower case
        else:
            kws: list[str] = []
            for k in text.split("|"):
                k = clean_name(k)
                if k and k not in kws:
                    kws.append(k)
            keywords[key] = tuple(kws)
    return {k: Annotation(names.get(k, ""), keywords.get(k, ())) for k in sorted(set(names) | set(keywords))}


def load_annotations(
    path: str | os.PathLike[str] = DEFAULT_ANNOTATIONS,
    derived: str | os.PathLike[str] | None = DEFAULT_DERIVED_ANNOTATIONS,
) -> dict[str, Annotation]:
    """The annotations of ``path`` (required) and of ``derived`` (sequences: flags, keycaps, ZWJ; read when the
    file exists); ``path`` wins where both annotate the same emoji."""
    out = parse_annotations(path)
    if derived is not None and Path(derived).is_file():
        out = {**parse_annotations(derived), **out}
    return out


def emoji_alias(char: str, *exclude: str) -> str | None:
    """The first alias of PyPI ``emoji`` (``EMOJI_DATA[char]["alias"]``, e.g. ``":joy:"`` -> ``"joy"``) that is
    none of ``exclude``; None without one (or without the package)."""
    try:
        import emoji
    except ImportError:
        return None
    data: dict[str, Any] = emoji.EMOJI_DATA.get(char) or emoji.EMOJI_DATA.get(char + VS16) or {}
    for raw in data.get("alias", ()):
        alias = clean_name(raw)
        if alias and alias not in exclude:
            return alias
    return None


def cldr_captions(entry: EmojiEntry, annotations: dict[str, Annotation], count: int = CLDR_CAPTION_COUNT) -> list[str]:
    """``count`` captions of ``entry`` from its CLDR annotation (a pure function of both, no randomness):

    0. the CLDR short name (with its last keyword when the short name is the caption name already);
    1. ``"an emoji of {short name}, {keyword}, {keyword}"``;
    2. the keywords as a list (up to :data:`MAX_KEYWORDS`, starting after the two of caption 1), with the short
       name when there are fewer than three;
    3. ``"{short name} ({alias})"`` with the ``emoji`` package's alias, else ``"{short name} emoji, {keyword}"``.

    Keywords equal to the short name are left out. Without an annotation: the first ``count`` caption templates
    (cycled), so every emoji gets ``count`` captions.
    """
    ann = annotations.get(annotation_key(entry.char))
    if ann is None or not (ann.name or ann.keywords):
        return [make_caption(entry, template=i % len(CAPTION_TEMPLATES)) for i in range(count)]
    name = ann.name or entry.name
    kws = [k for k in ann.keywords if k != name]
    alias = emoji_alias(entry.char, name, entry.name)
    first = f"{name}, {kws[-1]}" if name == entry.name and kws else name
    second = ", ".join([f"an emoji of {name}", *kws[:2]])
    rest = (kws[2:] + kws[:2])[:MAX_KEYWORDS]
    # a keyword list names the emoji only with three or more keywords ("flag" alone fits 260 flags)
    third = ", ".join(rest if len(rest) >= 3 else [*rest, name])
    fourth = f"{name} ({alias})" if alias else ", ".join([f"{name} emoji", *kws[:1]])
    captions = [first, second, third, fourth]
    return [captions[i % len(captions)] for i in range(count)]
