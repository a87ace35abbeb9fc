"""The defaults of ``sdengine eval emoji`` as plain values, so that ``--help`` shows them without importing torch
(:mod:`sdengine.eval.emoji` uses the same ones)."""

from __future__ import annotations

DEFAULT_CFG = 5.0
DEFAULT_CFG_SWEEP = (1.0, 3.0, 5.0, 7.5)

__all__ = ["DEFAULT_CFG", "DEFAULT_CFG_SWEEP"]
