"""Did-you-mean suggestions for a name that is not known (a sampler, a schedule, a control type, a model, a LoRA,
a subcommand's choice): the one-line error names the closest known spellings instead of listing every name.

A name is compared with every spelling that is accepted for it (sdengine's, A1111's, ComfyUI's), ignoring case,
spaces, underscores and hyphens ("eular a" is close to "euler_a"); the suggestion is the spelling to type, with
another well-known spelling of it in parentheses where one is given ("'euler_a' ('Euler a')")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

from .errors import UsageError

CUTOFF = 0.6  # difflib's ratio a spelling needs to be suggested (difflib's own default)


def fold(name: str) -> str:
    """``name`` without case, spaces, underscores and hyphens: the form two spellings are compared in."""
    return "".join(ch for ch in name.casefold() if not ch.isspace() and ch not in "_-")


def close_matches(
    value: object, spellings: Mapping[str, str] | Iterable[str], *, n: int = 1, cutoff: float = CUTOFF
) -> list[str]:
    """The (at most ``n``) names closest to ``value``, best first: ``spellings`` maps each accepted spelling to the
    name to suggest for it (an iterable: each spelling is its own name). Empty when nothing is close."""
    table = spellings if isinstance(spellings, Mapping) else {s: s for s in spellings}
    by_fold: dict[str, str] = {}
    for spelling, name in table.items():
        by_fold.setdefault(fold(str(spelling)), name)
    key = fold(str(value))
    out: list[str] = []
    if key in by_fold:  # the same letters in another case or spacing: that one, whatever the ratios say
        out.append(by_fold[key])
    for hit in difflib.get_close_matches(key, list(by_fold), n=len(by_fold), cutoff=cutoff):
        if by_fold[hit] not in out:
            out.append(by_fold[hit])
    return out[:n]


def did_you_mean(
    value: object,
    spellings: Mapping[str, str] | Iterable[str],
    *,
    labels: Mapping[str, str] | None = None,
    n: int = 1,
) -> str:
    """``"; did you mean 'euler_a' ('Euler a')?"`` (``labels``: another name to show beside a suggestion), or ``""``
    when no spelling is close."""
    hits = close_matches(value, spellings, n=n)
    if not hits:
        return ""
    shown = []
    for hit in hits:
        label = (labels or {}).get(hit)
        shown.append(f"{hit!r} ({label!r})" if label and label != hit else repr(hit))
    return f"; did you mean {' or '.join(shown)}?"


def unknown_name_message(
    kind: str,
    value: object,
    spellings: Mapping[str, str] | Iterable[str],
    *,
    labels: Mapping[str, str] | None = None,
    hint: str | None = None,
) -> str:
    """``"unknown sampler 'eular a'; did you mean 'euler_a' ('Euler a')? (HINT)"``: one line, the hint (where all
    the names are listed) in parentheses after the suggestion."""
    text = f"unknown {kind} {value!r}{did_you_mean(value, spellings, labels=labels)}"
    return f"{text} ({hint})" if hint else text


class UnknownNameError(UsageError):
    """A name that is none of the known ones; its message suggests the closest (see :func:`unknown_name_message`).
    ``suggestions``: the names suggested, best first (empty when none is close)."""

    def __init__(self, message: str, suggestions: list[str] | None = None) -> None:
        super().__init__(message)
        self.suggestions = list(suggestions or [])


def unknown_name(
    kind: str,
    value: object,
    spellings: Mapping[str, str] | Iterable[str],
    *,
    labels: Mapping[str, str] | None = None,
    hint: str | None = None,
) -> UnknownNameError:
    """The :class:`UnknownNameError` (to raise) of :func:`unknown_name_message`."""
    return UnknownNameError(
        unknown_name_message(kind, value, spellings, labels=labels, hint=hint), close_matches(value, spellings)
    )


__all__ = ["UnknownNameError", "close_matches", "did_you_mean", "fold", "unknown_name", "unknown_name_message"]
