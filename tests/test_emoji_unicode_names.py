"""Unicode's character names and the names list's aliases as extra emoji captions: parsing, composition, the
caption table's "names" mode, and no leak into the evaluation paraphrases."""

from __future__ import annotations

import re

import pytest

from sdengine.data.emoji import CAPTION_TEMPLATES, EmojiEntry, make_caption
from sdengine.data.emoji_cldr import Annotation
from sdengine.data.emoji_unicode_names import (
    DEFAULT_NAMES_LIST,
    NAME_CAPTION_COUNT,
    formal_name,
    name_captions,
    parse_names_list,
)

NAMES_LIST = """@@@\tThe Unicode Standard 15.1
@@\t1F300\tMiscellaneous Symbols and Pictographs\t1F5FF
@\t\tWeather, landscape, and sky symbols
1F300\tCYCLONE
\t= typhoon, hurricane
\t= b-mode stereo compression broadcasting service (ARIB STD B24)
\t* a note, not an alias
1F301\tFOGGY
1F5D1\tWASTEBASKET
\t= trashcan
\t= Königin
"""

SHUSH = EmojiEntry("\U0001f92b", "shushing face", "Smileys & Emotion", "face-hand")
CYCLONE = EmojiEntry("\U0001f300", "cyclone", "Travel & Places", "sky & weather")
BASKET = EmojiEntry("\U0001f5d1\ufe0f", "wastebasket", "Objects", "office")
FRANCE = EmojiEntry("\U0001f1eb\U0001f1f7", "flag of france", "Flags", "country-flag")


@pytest.fixture
def aliases(tmp_path):
    path = tmp_path / "NamesList.txt"
    path.write_text(NAMES_LIST, encoding="utf-8")
    return parse_names_list(path)


def test_names_list_aliases_are_short_ascii_and_lower_case(aliases, tmp_path):
    assert aliases == {0x1F300: ("typhoon", "hurricane"), 0x1F5D1: ("trashcan",)}
    assert parse_names_list(tmp_path / "absent.txt") == {}


def test_formal_name_of_one_code_point_only():
    assert formal_name(SHUSH.char) == "face with finger covering closed lips"
    assert formal_name(BASKET.char) == "wastebasket"  # U+FE0F is ignored
    assert formal_name(FRANCE.char) is None  # a sequence has no name of its own


def test_captions_prefer_the_formal_name_and_the_alias(aliases):
    ann = {"\U0001f92b": Annotation("shushing face", ("quiet", "shush", "shushing face"))}
    assert name_captions(SHUSH, aliases, ann) == [
        "face with finger covering closed lips",
        "quiet and shush, shushing face",
    ]
    # same formal name as the data set's: a keyword instead; an alias of the names list second
    ann = {"\U0001f300": Annotation("cyclone", ("dizzy", "hurricane", "twister", "typhoon"))}
    assert name_captions(CYCLONE, aliases, ann) == ["cyclone, twister", "typhoon, cyclone"]
    assert name_captions(CYCLONE, aliases, ann, count=3)[2] == "cyclone, twister"


def test_no_name_alias_or_keyword_falls_back_to_the_templates():
    last = len(CAPTION_TEMPLATES) - 1
    assert name_captions(FRANCE, {}, {}) == [make_caption(FRANCE, template=last - i) for i in range(NAME_CAPTION_COUNT)]


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_names_caption_table_adds_rows_never_captions_the_held_out_fruit_and_does_not_leak():
    if not DEFAULT_NAMES_LIST.is_file():
        pytest.skip(f"{DEFAULT_NAMES_LIST} is absent: install the Debian package unicode-data")
    from sdengine.data.emoji import EmojiDataset
    from sdengine.data.emoji_cldr import DEFAULT_ANNOTATIONS
    from sdengine.data.emoji_paraphrases import FRUIT_PARAPHRASES, PARAPHRASES
    from sdengine.train.emoji import HELD_OUT_SUBGROUP, caption_table

    if not DEFAULT_ANNOTATIONS.is_file():
        pytest.skip(f"{DEFAULT_ANNOTATIONS} is absent: install the Debian package unicode-cldr-core")
    ds = EmojiDataset()
    cldr = caption_table(ds, "cldr")
    table = caption_table(ds, "names")
    assert len(table) == len(cldr) + NAME_CAPTION_COUNT and table[: len(cldr)] == cldr
    evaluation = [p for p, _ in PARAPHRASES + FRUIT_PARAPHRASES]
    eval_grams = set().union(*(_grams(p) for p in evaluation))
    formal = 0
    for i, e in enumerate(ds.entries):
        extra = [row[i] for row in table[len(cldr) :]]
        if e.subgroup == HELD_OUT_SUBGROUP:  # the templates only, never a new wording of a held-out fruit
            assert set(extra) <= {make_caption(e, template=t) for t in range(len(CAPTION_TEMPLATES))}
        for c in extra:
            assert c not in evaluation
            assert not (_grams(c) & eval_grams), c
        formal += extra[0] == formal_name(e.char) and extra[0] != e.name
    assert formal > 300  # a formal name that says it in other words, for hundreds of emoji
