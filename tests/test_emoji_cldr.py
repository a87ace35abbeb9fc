"""CLDR's emoji annotations as extra captions: parsing, composition, and no leak into the evaluation."""

from __future__ import annotations

import re

import pytest

from sdengine.data.emoji import CAPTION_TEMPLATES, EmojiDataError, EmojiEntry, make_caption
from sdengine.data.emoji_cldr import (
    CLDR_CAPTION_COUNT,
    DEFAULT_ANNOTATIONS,
    Annotation,
    annotation_key,
    cldr_captions,
    load_annotations,
    parse_annotations,
)

# The layout of CLDR's annotations/en.xml (keywords, then the short name as type="tts"); CLDR writes code points
# without U+FE0F, so the red heart is "\u2764" here and "\u2764\ufe0f" in the data set.
EN_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<!DOCTYPE ldml SYSTEM "../../common/dtd/ldml.dtd">
<ldml>
  <identity><language type="en"/></identity>
  <annotations>
    <annotation cp="\U0001f600">face | grin | grinning face</annotation>
    <annotation cp="\U0001f600" type="tts">grinning face</annotation>
    <annotation cp="\u2764">emotion | heart | love | red heart | valentine</annotation>
    <annotation cp="\u2764" type="tts">red heart</annotation>
    <annotation cp="\U0001f355">cheese | pizza | slice | \u201ctasty\u201d</annotation>
    <annotation cp="\U0001f355" type="tts">Pizza</annotation>
  </annotations>
</ldml>
"""

DERIVED_XML = """<?xml version="1.0" encoding="UTF-8" ?>
<ldml><annotations>
    <annotation cp="\U0001f1eb\U0001f1f7">flag</annotation>
    <annotation cp="\U0001f1eb\U0001f1f7" type="tts">flag: France</annotation>
    <annotation cp="\U0001f600">should | lose</annotation>
    <annotation cp="\U0001f600" type="tts">not this one</annotation>
</annotations></ldml>
"""

GRIN = EmojiEntry("\U0001f600", "grinning face", "Smileys & Emotion", "face-smiling")
HEART = EmojiEntry("\u2764\ufe0f", "red heart", "Smileys & Emotion", "heart")
PIZZA = EmojiEntry("\U0001f355", "pizza", "Food & Drink", "food-prepared")
FRANCE = EmojiEntry("\U0001f1eb\U0001f1f7", "flag of france", "Flags", "country-flag")
ROBOT = EmojiEntry("\U0001f916", "robot", "Smileys & Emotion", "face-costume")  # not in the fixture


@pytest.fixture
def annotations(tmp_path):
    (tmp_path / "en.xml").write_text(EN_XML, encoding="utf-8")
    (tmp_path / "derived.xml").write_text(DERIVED_XML, encoding="utf-8")
    return load_annotations(tmp_path / "en.xml", tmp_path / "derived.xml")


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_parse_keys_without_fe0f_and_cleans_the_text(tmp_path, annotations):
    (tmp_path / "en.xml").write_text(EN_XML, encoding="utf-8")
    main = parse_annotations(tmp_path / "en.xml")
    assert set(main) == {"\U0001f600", "\u2764", "\U0001f355"}
    assert main["\U0001f600"] == Annotation("grinning face", ("face", "grin", "grinning face"))
    assert main["\U0001f355"] == Annotation("pizza", ("cheese", "pizza", "slice", '"tasty"'))  # lower, straight
    # the data set's "\u2764\ufe0f" finds CLDR's "\u2764", and the other way round
    assert annotation_key(HEART.char) == "\u2764" == annotation_key("\u2764")
    assert annotations[annotation_key(HEART.char)].name == "red heart"
    # the derived file adds sequences; the main file wins where both annotate an emoji
    assert annotations[annotation_key(FRANCE.char)] == Annotation("flag: france", ("flag",))
    assert annotations["\U0001f600"].name == "grinning face"


def test_missing_or_broken_file_is_one_line_naming_the_package(tmp_path):
    with pytest.raises(EmojiDataError, match="sudo apt-get install unicode-cldr-core") as e:
        parse_annotations(tmp_path / "nope.xml")
    assert "\n" not in str(e.value) and "nope.xml" in str(e.value)
    with pytest.raises(EmojiDataError, match="sudo apt-get install unicode-cldr-core"):
        load_annotations(tmp_path / "nope.xml", None)
    (tmp_path / "bad.xml").write_text("<ldml><annotations><annotation cp='x'>", encoding="utf-8")
    with pytest.raises(EmojiDataError, match="not a readable CLDR annotations file"):
        parse_annotations(tmp_path / "bad.xml")
    # a missing derived file is fine (the sequences then fall back to the templates)
    (tmp_path / "en.xml").write_text(EN_XML, encoding="utf-8")
    assert FRANCE.char not in load_annotations(tmp_path / "en.xml", tmp_path / "missing-derived.xml")


def test_captions_are_k_deterministic_and_use_keywords_beyond_the_name(annotations):
    grin = cldr_captions(GRIN, annotations)
    assert grin == [
        "grinning face, grin",
        "an emoji of grinning face, face, grin",
        "face, grin, grinning face",
        "grinning face (grinning)",  # the alias of PyPI emoji
    ]
    heart = cldr_captions(HEART, annotations)
    assert len(heart) == CLDR_CAPTION_COUNT and len(set(heart)) == CLDR_CAPTION_COUNT
    assert heart[1] == "an emoji of red heart, emotion, heart"
    assert heart[2] == "love, valentine, emotion, heart"  # three or more keywords: a list on its own
    # a pure function: the same again, and the same whatever else the annotations hold
    assert cldr_captions(HEART, annotations) == heart
    assert cldr_captions(HEART, {"\u2764": annotations["\u2764"]}) == heart
    # the keyword equal to the short name is not repeated as a keyword
    assert all(c.count("red heart") <= 1 for c in heart) and "red heart" not in heart[2]
    flag = cldr_captions(FRANCE, annotations)
    assert flag[0] == "flag: france" and all("france" in c for c in flag)  # "flag" alone fits 260 flags
    assert cldr_captions(PIZZA, annotations, count=6)[4:] == cldr_captions(PIZZA, annotations)[:2]


def test_emoji_without_annotation_falls_back_to_the_templates(annotations):
    assert ROBOT.char not in annotations
    assert cldr_captions(ROBOT, annotations) == [make_caption(ROBOT, template=t) for t in range(CLDR_CAPTION_COUNT)]
    assert cldr_captions(GRIN, {}) == [make_caption(GRIN, template=t) for t in range(CLDR_CAPTION_COUNT)]
    assert CLDR_CAPTION_COUNT <= len(CAPTION_TEMPLATES)


def test_real_cldr_captions_do_not_leak_the_evaluation_paraphrases():
    if not DEFAULT_ANNOTATIONS.is_file():
        pytest.skip(f"{DEFAULT_ANNOTATIONS} is absent: install the Debian package unicode-cldr-core")
    from sdengine.data.emoji import EmojiDataset
    from sdengine.data.emoji_paraphrases import FRUIT_PARAPHRASES, PARAPHRASES

    ds = EmojiDataset()
    ann = load_annotations()
    annotated = [e for e in ds.entries if annotation_key(e.char) in ann]
    assert len(annotated) > 0.9 * len(ds.entries)  # nearly every emoji gets CLDR captions
    evaluation = [p for p, _ in PARAPHRASES + FRUIT_PARAPHRASES]
    eval_grams = set().union(*(_grams(p) for p in evaluation))
    n = 0
    for e in ds.entries:  # the held-out fruit too: no CLDR caption of any emoji comes near the evaluation
        for c in cldr_captions(e, ann):
            n += 1
            assert c not in evaluation
            assert not (_grams(c) & eval_grams), c
    assert n == CLDR_CAPTION_COUNT * len(ds.entries)
