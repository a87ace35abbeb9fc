"""The defaults of ``sdengine train emoji`` (those that reproduce the shipped model), as plain values: the CLI
shows them in ``--help`` without importing torch, and :class:`sdengine.train.emoji.EmojiRecipe` uses them."""

from __future__ import annotations

SEED = 0
MIXED_PRECISION = "bf16"  # bf16 autocast: what the shipped run used on the CPU (1.5-2x faster there)
VAE_STEPS = 1100
UNET_STEPS = 6850
UNET_BATCH = 48
UNET_LR = 3e-4
# The shipped U-Net learnt from the token states alone for this many steps, then got the pooled sentence vector.
UNET_POOLED_FROM = 2500
# The caption axis: "templates" (the six caption templates: the shipped model) or "cldr" (those and captions
# composed from CLDR's emoji annotations).
CAPTIONS = "templates"

__all__ = [
    "CAPTIONS",
    "MIXED_PRECISION",
    "SEED",
    "UNET_BATCH",
    "UNET_LR",
    "UNET_POOLED_FROM",
    "UNET_STEPS",
    "VAE_STEPS",
]
