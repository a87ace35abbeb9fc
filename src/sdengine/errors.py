"""The errors sdengine raises on purpose.

Every error the package raises for a bad input, a bad file or a stopped job derives from
:class:`SdengineError`. The CLI prints these (and ``OSError``) as one line; anything else is a bug and
keeps its traceback. Most classes also derive from ``ValueError`` so that ``except ValueError`` code
written against earlier releases keeps working.
"""

from __future__ import annotations


class SdengineError(Exception):
    """Base of every error sdengine raises on purpose (a user mistake, a bad file, a refused request)."""


class UsageError(SdengineError, ValueError):
    """A value the caller gave is not usable (wrong type, out of range, unknown name)."""


class GenerationError(UsageError):
    """A generation request that cannot run (bad size, strength, image, prompt, ...): one clear line."""


class ControlNetError(UsageError):
    """A user-facing ControlNet problem (bad file, wrong base model, bad settings); one clear line."""


class NonFiniteError(GenerationError):
    """A generation whose values went NaN or infinite (an extreme cfg, prompt or LoRA weight, a broken
    model): refused with one line instead of writing a black or noisy image."""
