"""The LoRA's extra training wordings: one set per held-out fruit, and none borrowed from the evaluation."""

from __future__ import annotations

import re

from sdengine.data.emoji import EmojiDataset
from sdengine.data.emoji_fruit_captions import FRUIT_TRAIN_CAPTIONS
from sdengine.data.emoji_paraphrases import FRUIT_PARAPHRASES
from sdengine.train.emoji import HELD_OUT_SUBGROUP, held_out_wordings, write_caption_folders


def _grams(text: str, n: int = 4) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z]+", text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def test_training_wordings_cover_the_held_out_fruit_and_share_no_four_words_with_the_evaluation(tmp_path):
    ds = EmojiDataset()
    fruit = [e for e in ds.entries if e.subgroup == HELD_OUT_SUBGROUP]
    assert len(fruit) == 20 and sorted(e.name for e in fruit) == sorted(FRUIT_TRAIN_CAPTIONS)
    evaluation = [p for p, _ in FRUIT_PARAPHRASES]
    for e in fruit:
        words = held_out_wordings(e)
        assert len(words) == len(set(words)) >= 8 and words[0] == f"{e.name}, food & drink, food fruit"
        for w in words:
            assert w not in evaluation
            for p in evaluation:
                assert not (_grams(w) & _grams(p)), (w, p)
    # the folders: the held-out part gets every wording, one per line, the dataset's caption first
    counts = write_caption_folders(ds, tmp_path)
    assert counts == {"base": len(ds.entries) - 20, HELD_OUT_SUBGROUP: 20}
    banana = next(p for p in (tmp_path / HELD_OUT_SUBGROUP).glob("*.txt") if "banana," in p.read_text())
    lines = banana.read_text().splitlines()
    assert lines[0] == "banana, food & drink, food fruit" and "a ripe yellow banana" in lines
    base_txt = next((tmp_path / "base").glob("*.txt")).read_text()
    assert base_txt.count("\n") == 1  # one caption per base image (what the base model and ControlNet use)
