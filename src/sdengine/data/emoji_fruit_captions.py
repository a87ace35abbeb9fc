"""Extra training wordings for the LoRA subgroup (``food-fruit``), written for training only.

The LoRA ``emoji-fruit`` learns the 20 fruit the base model never saw. Trained on one caption per image it
learned the caption, not the fruit: other wordings (the evaluation's :data:`FRUIT_PARAPHRASES`) missed. These
wordings give each fruit several ways of being asked for. They were written without the evaluation
paraphrases in view of their wording and share no four-word run with them (a test holds that); what they may
share is the facts (a banana is yellow), which is what a paraphrase has to be understood by.
"""

from __future__ import annotations

FRUIT_TRAIN_CAPTIONS: dict[str, tuple[str, ...]] = {
    "grapes": ("a cluster of grapes", "purple grapes on a vine stem", "round violet berries in a bunch"),
    "melon": ("a pale green melon", "a honeydew melon", "a round melon with a netted rind"),
    "watermelon": ("a slice of watermelon", "a wedge of watermelon with a green rind", "juicy summer melon slice"),
    "tangerine": ("a tangerine", "an orange mandarin with a leaf", "a little orange fruit with a green leaf"),
    "lemon": ("a lemon", "a bright yellow lemon fruit", "an oval yellow fruit for lemonade"),
    "banana": ("a banana", "a ripe yellow banana", "a long yellow fruit you peel"),
    "pineapple": ("a pineapple", "a golden pineapple with green leaves on top", "an ananas fruit"),
    "mango": ("a mango", "a ripe orange and red mango", "a sweet tropical stone fruit"),
    "red apple": ("a red apple", "an apple with red skin and a stalk", "a ripe red fruit from an apple tree"),
    "green apple": ("a green apple", "an apple with green skin", "a granny smith apple"),
    "pear": ("a pear", "a green pear with a stalk", "a fruit that is wide at the bottom and narrow at the top"),
    "peach": ("a peach", "a soft orange peach with a leaf", "a pink and orange fuzzy peach"),
    "cherries": ("cherries", "a pair of dark red cherries", "little red round fruit on green stalks"),
    "strawberry": ("a strawberry", "a ripe red strawberry with green leaves", "a sweet red berry shaped like a heart"),
    "blueberries": ("blueberries", "a handful of small blue berries", "dark blue round berries"),
    "kiwi fruit": ("a kiwi", "a halved kiwi fruit", "a green slice of kiwi with tiny black seeds"),
    "tomato": ("a tomato", "a red tomato with a green top", "a round red salad fruit"),
    "olive": ("an olive", "a green olive on a twig", "a small olive with a leaf"),
    "coconut": ("a coconut", "a halved coconut", "a split brown coconut shell"),
    "lime": ("a lime", "a green lime", "a small sour green citrus fruit"),
}

__all__ = ["FRUIT_TRAIN_CAPTIONS"]
