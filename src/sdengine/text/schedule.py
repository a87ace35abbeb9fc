"""Prompt editing and alternation: AUTOMATIC1111's ``[from:to:when]`` and ``[a|b]``, as a parse tree and a schedule.

A prompt is parsed once into a tree of :class:`Text`, :class:`Emphasis`, :class:`Scheduled` and
:class:`Alternate` nodes; :func:`schedule_from_tree` turns the tree into A1111's schedule, a list of
``(end_at_step, text)`` pairs, and :func:`text_at_step` picks the text a sampler step uses. The texts are
plain prompts again (emphasis, ``BREAK`` and the rest are read later by :mod:`sdengine.prompts`).

The grammar is A1111's (``modules/prompt_parser.py``, reimplemented as a recursive-descent parser)::

    start      := (prompt | one of "[ ] ( ) :" as literal text)*
    prompt     := (emphasized | scheduled | alternate | plain)*
    emphasized := "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"      (kept as text)
    scheduled  := "[" [prompt ":"] prompt ":" WS? NUMBER WS? "]"
    alternate  := "[" prompt ("|" prompt)+ "]"
    plain      := ( any character but \\ [ ] ( ) : |   or   \\ followed by any character but a newline )+

* ``[from:to:when]`` uses ``from`` up to and including step ``when`` and ``to`` after it; ``[to:when]`` is
  ``[:to:when]``; ``[from::when]`` removes ``from`` after step ``when``.
* ``when`` with a decimal point is a fraction of the steps (``0.5``, ``.25``, ``1.0``), without one a step
  number (``3``); the result is ``min(steps, int(value))`` (truncated toward zero), A1111's current rule.
  A value below 1 never switches (``to`` from the first step).
* ``[a|b|c]`` cycles through its options, one per step; an empty option is the empty text.
* Nesting works everywhere a prompt may stand; emphasis brackets stay in the text.
* Brackets that do not form one of these (``a [b``, ``c)``, ``[x:y:z]``) are literal text at the top level, as
  in A1111; the emphasis parser then reads them as it always does. :attr:`PromptTree.diagnostics` says where a
  ``[`` that looks like editing (it holds ``:`` or ``|``) could not be read, so the caller can tell the user.
* A ``|`` outside ``[...]`` or a ``\\`` at the end of a line makes A1111's parser fail, and A1111 then uses the
  whole prompt as plain text (no editing anywhere in it): :func:`parse_prompt_editing` raises
  :class:`PromptEditingError` (``fatal`` False) pointing at the column; :func:`prompt_schedule` does what
  A1111 does and reports it through ``on_literal``.
* Nesting deeper than :data:`MAX_NESTING` raises a fatal :class:`PromptEditingError` (the emphasis parser refuses
  such prompts as well).

Steps (A1111's ``reconstruct_cond_batch``): the schedule's steps are 1-based ends; sampler step ``i``
(0-based) uses the first entry whose end is ``>= i``. So ``[a:b:3]`` of 10 steps uses ``a`` at steps 0..3 and
``b`` at 4..9, and ``[a|b]`` uses ``a, a, b, a, b, ...`` (step 0 and step 1 both read entry 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sdengine.errors import SdengineError

MAX_NESTING = 100  # the emphasis parser's bracket limit (sdengine.prompts.MAX_BRACKET_DEPTH)


class PromptEditingError(SdengineError, ValueError):
    """A prompt whose editing syntax cannot be read; ``column`` is 1-based. ``fatal`` False: A1111 would use
    the whole prompt as plain text (what :func:`prompt_schedule` does); True: sdengine refuses it."""

    def __init__(self, message: str, column: int, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.column = column
        self.fatal = fatal


@dataclass(frozen=True)
class Text:
    text: str


@dataclass(frozen=True)
class Emphasis:
    """``(body)``, ``(body:weight)`` or ``[body]``: kept as text (the emphasis parser reads it later)."""

    opener: str
    body: tuple[Node, ...]
    closer: str


@dataclass(frozen=True)
class Scheduled:
    """``[before:after:when]``; ``before`` is None for the two-part form ``[after:when]``."""

    before: tuple[Node, ...] | None
    after: tuple[Node, ...]
    when: str  # the number as written: a "." makes it a fraction of the steps
    column: int


@dataclass(frozen=True)
class Alternate:
    options: tuple[tuple[Node, ...], ...]
    column: int


Node = Text | Emphasis | Scheduled | Alternate


@dataclass(frozen=True)
class PromptTree:
    nodes: tuple[Node, ...]
    diagnostics: tuple[str, ...] = field(default=())  # unreadable "[...]" that look like editing, read as text

    @property
    def edits(self) -> bool:
        """Whether the prompt has any ``[from:to:when]`` or ``[a|b]``."""
        return any(isinstance(n, Scheduled | Alternate) for n in walk(self.nodes))


def walk(nodes: tuple[Node, ...]) -> Iterator[Node]:
    """Every node of ``nodes``, depth first, including both branches of each edit."""
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, Emphasis):
            stack.extend(reversed(node.body))
        elif isinstance(node, Scheduled):
            stack.extend(reversed(node.after))
            stack.extend(reversed(node.before or ()))
        elif isinstance(node, Alternate):
            for option in reversed(node.options):
                stack.extend(reversed(option))


# ------------------------------------------------------------------------------------------------ the parser

_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")  # "." does not match a newline, as in A1111's grammar
# ":" [WS] NUMBER [WS] "]" after the colon; NUMBER is lark's SIGNED_NUMBER (sign, digits, ".", exponent)
_EDIT_LIKE = re.compile(r"\[[^\[\]]*[:|]")  # a "[" followed by ":" or "|" before any other bracket
_WHEN = re.compile(r"\s*([+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?)\s*\]")


class _Fail(Exception):
    """A bracket group that is not one of the grammar's forms (its opener is then literal text)."""

    def __init__(self, column: int, reason: str) -> None:
        self.column = column
        self.reason = reason


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.n = len(text)
        # A group's parse depends only on where it starts, so each is parsed once: without this a run of
        # unclosed "[" would be re-read from every one of them.
        self.memo: dict[int, tuple[Node, int] | _Fail] = {}

    def top(self) -> PromptTree:
        text, n = self.text, self.n
        out: list[Node] = []
        notes: list[str] = []
        pos = 0
        while pos < n:
            c = text[pos]
            if c in "[(":
                got = self.group(pos, 0)
                if isinstance(got, _Fail):
                    if c == "[" and _looks_like_editing(text, pos, got.column - 1):
                        notes.append(f"'[' at column {pos + 1} is not prompt editing ({got.reason}); read as text")
                    out.append(Text(c))
                    pos += 1
                else:
                    out.append(got[0])
                    pos = got[1]
            elif c in "]):":
                out.append(Text(c))
                pos += 1
            elif c == "|":
                raise PromptEditingError(
                    f"'|' at column {pos + 1} is outside any [a|b] alternation: "
                    "A1111 reads such a prompt as plain text",
                    pos + 1,
                )
            else:
                m = _PLAIN.match(text, pos)
                if m is None:  # a backslash at the end or before a newline
                    raise PromptEditingError(
                        f"'\\' at column {pos + 1} escapes nothing: A1111 reads such a prompt as plain text", pos + 1
                    )
                out.append(Text(m.group(0)))
                pos = m.end()
        return PromptTree(_merge(out), tuple(notes))

    def group(self, pos: int, depth: int) -> tuple[Node, int] | _Fail:
        got = self.memo.get(pos)
        if got is None:
            if depth >= MAX_NESTING:
                raise PromptEditingError(
                    f"brackets nested more than {MAX_NESTING} deep (at column {pos + 1})", pos + 1, fatal=True
                )
            try:
                got = self.square(pos, depth) if self.text[pos] == "[" else self.round(pos, depth)
            except _Fail as e:
                got = e
            self.memo[pos] = got
        return got

    def seq(self, pos: int, depth: int) -> tuple[tuple[Node, ...], int]:
        """A ``prompt`` inside a group: up to the first ``] ) : |`` at this level or the end."""
        text, n = self.text, self.n
        out: list[Node] = []
        while pos < n:
            c = text[pos]
            if c in "[(":
                got = self.group(pos, depth + 1)
                if isinstance(got, _Fail):  # inside a group, brackets must form the grammar's forms
                    raise _Fail(got.column, got.reason)
                out.append(got[0])
                pos = got[1]
            elif c in "]):|":
                break
            else:
                m = _PLAIN.match(text, pos)
                if m is None:
                    raise _Fail(pos + 1, f"'\\' at column {pos + 1} escapes nothing")
                out.append(Text(m.group(0)))
                pos = m.end()
        return _merge(out), pos

    def expect_end(self, opener: int, pos: int, closer: str) -> _Fail:
        if pos >= self.n:
            return _Fail(pos + 1, f"no '{closer}' for the '{self.text[opener]}' at column {opener + 1}")
        return _Fail(pos + 1, f"unexpected '{self.text[pos]}' at column {pos + 1}")

    def round(self, pos: int, depth: int) -> tuple[Node, int]:
        body, q = self.seq(pos + 1, depth)
        if q < self.n and self.text[q] == ")":
            return Emphasis("(", body, ")"), q + 1
        if q < self.n and self.text[q] == ":":
            weight, q2 = self.seq(q + 1, depth)
            if q2 < self.n and self.text[q2] == ")":
                return Emphasis("(", _merge([*body, Text(":"), *weight]), ")"), q2 + 1
            raise self.expect_end(pos, q2, ")")
        raise self.expect_end(pos, q, ")")

    def square(self, pos: int, depth: int) -> tuple[Node, int]:
        text, n = self.text, self.n
        first, q = self.seq(pos + 1, depth)
        c = text[q] if q < n else ""
        if c == "]":
            return Emphasis("[", first, "]"), q + 1
        if c == "|":
            options = [first]
            while q < n and text[q] == "|":
                option, q = self.seq(q + 1, depth)
                options.append(option)
            if q < n and text[q] == "]":
                return Alternate(tuple(options), pos + 1), q + 1
            raise self.expect_end(pos, q, "]")
        if c == ":":
            m = _WHEN.match(text, q + 1)
            if m is not None:  # [to:when]
                return Scheduled(None, first, m.group(1), pos + 1), m.end()
            second, q2 = self.seq(q + 1, depth)
            if q2 < n and text[q2] == ":":
                m = _WHEN.match(text, q2 + 1)
                if m is not None:  # [from:to:when]
                    return Scheduled(first, second, m.group(1), pos + 1), m.end()
                raise _Fail(q2 + 2, f"the step after the ':' at column {q2 + 1} is not a number followed by ']'")
            raise self.expect_end(pos, q2, "]")
        raise self.expect_end(pos, q, "]")


def _merge(nodes: list[Node]) -> tuple[Node, ...]:
    out: list[Node] = []
    for node in nodes:
        last = out[-1] if out else None
        if isinstance(node, Text) and isinstance(last, Text):
            out[-1] = Text(last.text + node.text)
        else:
            out.append(node)
    return tuple(out)


def _looks_like_editing(text: str, start: int, stop: int) -> bool:
    span = text[start : max(stop, start + 1)]
    return ":" in span or "|" in span


def parse_prompt_editing(text: str) -> PromptTree:
    """The parse tree of ``text``; raises :class:`PromptEditingError` where A1111's parser fails (see the
    module docstring)."""
    if not isinstance(text, str):
        raise PromptEditingError(f"a prompt must be a string, got {type(text).__name__}", 1, fatal=True)
    return _Parser(text).top()


# ---------------------------------------------------------------------------------------------- the schedule


def when_step(when: str, steps: int, *, hires_steps: int | None = None) -> int:
    """A1111's step for a ``when`` as written: ``min(steps, int(value))`` with ``value`` the number times the
    steps when it has a ``.`` (a fraction) and the number itself otherwise. With ``hires_steps`` (the second
    pass of hires fix) fractions count from 1.0 and step numbers from ``steps`` on, over ``hires_steps``."""
    total = steps if hires_steps is None else hires_steps
    value = float(when)
    if "." in when:
        value = (value - (0.0 if hires_steps is None else 1.0)) * total
    else:
        value -= 0 if hires_steps is None else steps
    if not math.isfinite(value):  # "1e999": A1111 fails on int(inf); here it is past the last step
        return total if value > 0 else -1
    return min(total, int(value))


def text_at(nodes: tuple[Node, ...], step: int, whens: Callable[[str], int]) -> str:
    """The text of ``nodes`` at 1-based schedule step ``step`` (A1111's ``at_step``)."""
    parts: list[str] = []

    def emit(seq: tuple[Node, ...]) -> None:
        for node in seq:
            if isinstance(node, Text):
                parts.append(node.text)
            elif isinstance(node, Emphasis):
                parts.append(node.opener)
                emit(node.body)
                parts.append(node.closer)
            elif isinstance(node, Scheduled):
                if step <= whens(node.when):
                    emit(node.before or ())
                else:
                    emit(node.after)
            else:
                emit(node.options[(step - 1) % len(node.options)])

    emit(nodes)
    return "".join(parts)


def schedule_from_tree(tree: PromptTree, steps: int, *, hires_steps: int | None = None) -> list[tuple[int, str]]:
    """A1111's ``[(end_at_step, text), ...]`` for ``steps`` sampling steps (ends ascending, the last is the
    total)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise PromptEditingError(f"steps must be a positive integer, got {steps!r}", 1, fatal=True)
    total = steps if hires_steps is None else hires_steps

    def whens(w: str) -> int:
        return when_step(w, steps, hires_steps=hires_steps)

    ends = {total}
    for node in walk(tree.nodes):
        if isinstance(node, Scheduled):
            w = whens(node.when)
            if w >= 1:
                ends.add(w)
        elif isinstance(node, Alternate):
            ends.update(range(1, total + 1))
    return [(end, text_at(tree.nodes, end, whens)) for end in sorted(ends)]


def prompt_schedule(
    text: str,
    steps: int,
    *,
    hires_steps: int | None = None,
    on_literal: Callable[[str], None] | None = None,
) -> list[tuple[int, str]]:
    """A1111's schedule of ``text``. Where A1111 reads the prompt as plain text (a non-fatal
    :class:`PromptEditingError`) so does this, telling ``on_literal`` why when the prompt has a ``[`` that looks
    like editing; the tree's diagnostics go there too."""
    try:
        tree = parse_prompt_editing(text)
    except PromptEditingError as e:
        if e.fatal:
            raise
        if on_literal is not None and _EDIT_LIKE.search(text):  # "cat | dog" alone is plain text, nothing to say
            on_literal(str(e))
        return [(steps if hires_steps is None else hires_steps, text)]
    if on_literal is not None:
        for d in tree.diagnostics:
            on_literal(d)
    return schedule_from_tree(tree, steps, hires_steps=hires_steps)


def text_at_step(schedule: list[tuple[int, str]], index: int) -> str:
    """The text sampler step ``index`` (0-based) uses: the first entry whose end is ``>= index`` (A1111's
    ``reconstruct_cond_batch``); past the last end, the last entry (A1111 would go back to the first)."""
    for end, text in schedule:
        if index <= end:
            return text
    return schedule[-1][1]


__all__ = [
    "MAX_NESTING",
    "Alternate",
    "Emphasis",
    "Node",
    "PromptEditingError",
    "PromptTree",
    "Scheduled",
    "Text",
    "parse_prompt_editing",
    "prompt_schedule",
    "schedule_from_tree",
    "text_at",
    "text_at_step",
    "walk",
    "when_step",
]
