"""More captions for the emoji data set from Unicode's own character names and aliases.

The data set names an emoji by its CLDR short name ("shushing face"); Unicode's formal character name often
says what the picture shows in other words ("face with finger covering closed lips", "face with stuck-out
tongue and tightly-closed eyes"), and the names list (Debian ``unicode-data``: ``NamesList.txt``) gives
informal aliases for some ("typhoon, hurricane", "trashcan"). Those are the wordings a person uses when they
describe an emoji instead of naming it, which is what the paraphrase check asks for.

:func:`name_captions` composes :data:`NAME_CAPTION_COUNT` captions per emoji, deterministically, with fallbacks
(CLDR keywords, then the caption templates) for emoji that have no formal name of their own (sequences: flags,
keycaps, ZWJ sequences, skin tones), so the trainer's caption table stays rectangular.
"""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from .emoji import CAPTION_TEMPLATES, EmojiEntry, clean_name, make_caption
from .emoji_cldr import Annotation, annotation_key

__all__ = ["DEFAULT_NAMES_LIST", "NAME_CAPTION_COUNT", "formal_name", "name_captions", "parse_names_list"]

DEFAULT_NAMES_LIST = Path("/usr/share/unicode/NamesList.txt")
NAME_CAPTION_COUNT = 2  # captions per emoji from Unicode's names
MAX_ALIAS_CHARS = 40  # longer aliases are explanations ("b-mode stereo compression broadcasting service ...")


def parse_names_list(path: str | os.PathLike[str] = DEFAULT_NAMES_LIST) -> dict[int, tuple[str, ...]]:
    """``{code point: informal aliases}`` from a Unicode ``NamesList.txt`` (its ``\\t= alias`` lines), lower case,
    ASCII only, at most :data:`MAX_ALIAS_CHARS` characters; ``{}`` when the file is missing."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[int, list[str]] = {}
    current: int | None = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split("\t", 1)[0]
            if head and all(c in "0123456789ABCDEF" for c in head):
                current = int(head, 16)
            elif line.startswith("\t= ") and current is not None:
                for alias in line[3:].split(","):
                    alias = clean_name(alias)
                    if alias and alias.isascii() and len(alias) <= MAX_ALIAS_CHARS and "(" not in alias:
                        out.setdefault(current, []).append(alias)
    return {cp: tuple(dict.fromkeys(v)) for cp, v in out.items()}


def formal_name(char: str) -> str | None:
    """Unicode's character name of a one-code-point emoji (U+FE0F ignored), lower case; None for sequences and
    for code points this Python's Unicode database does not name."""
    cps = annotation_key(char)
    if len(cps) != 1:
        return None
    name = unicodedata.name(cps, "")
    return clean_name(name) if name else None


def name_captions(
    entry: EmojiEntry,
    aliases: dict[int, tuple[str, ...]],
    annotations: dict[str, Annotation],
    count: int = NAME_CAPTION_COUNT,
) -> list[str]:
    """``count`` captions of ``entry`` (a pure function of its arguments):

    0. Unicode's formal name when it differs from the emoji's name, else ``"{name}, {keyword}"`` with the
       middle one of its CLDR keywords;
    1. ``"{alias}, {name}"`` with the names list's first alias, else ``"{keyword} and {keyword}, {name}"``;

    an entry without a formal name, alias or keywords falls back to the caption templates (from the last one
    backwards, which the other sources use least).
    """
    name = entry.name
    cps = annotation_key(entry.char)
    ann = annotations.get(cps)
    kws = [k for k in (ann.keywords if ann else ()) if k != name]
    formal = formal_name(entry.char)
    alias_list = [a for a in aliases.get(ord(cps), ()) if a != name] if len(cps) == 1 else []

    def fallback(i: int) -> str:
        return make_caption(entry, template=len(CAPTION_TEMPLATES) - 1 - i % len(CAPTION_TEMPLATES))

    if formal and formal != name:
        first = formal
    elif kws:
        first = f"{name}, {kws[len(kws) // 2]}"
    else:
        first = fallback(0)
    if alias_list:
        second = f"{alias_list[0]}, {name}"
    elif len(kws) >= 2:
        second = f"{kws[0]} and {kws[1]}, {name}"
    else:
        second = fallback(1)
    captions = [first, second]
    return [captions[i % len(captions)] for i in range(count)]
