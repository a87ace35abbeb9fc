"""Property tests of prompt editing (A1111's ``[from:to:when]``, ``[to:when]``, ``[from::when]``, ``[a|b]``) read the
way the pipeline reads a prompt: LoRA tags out (:func:`extract_lora_tags`), the schedule
(:func:`prompt_schedule`, :func:`text_at_step`), then the emphasis parser (:func:`parse_prompt_attention`) on
each step's text.

* Grammar-built prompts (every editing form, emphasis, nesting, numbers of every kind, BREAK, escapes, unicode)
  whose leaves are unique marker words: at every sampler step the text is the one A1111's rules give, written
  out here from the generated tree (one branch per bracket group, options cycling, a group switches once and
  never back).
* Any text from bracket-heavy pieces: a schedule or a named error (:class:`PromptEditingError`,
  :class:`PromptError`) in one line, within a time bound; every text made of the prompt's own characters in
  order; ends ascending and ending at the step count.
* 100 KB prompts within a bound (linear-ish time).

tests/test_prompt_editing.py holds the hand-written A1111 examples and a first property test of the parser.
Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES, 100 by default); `make fuzz` runs more.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument

import sdengine
from sdengine.errors import SdengineError
from sdengine.pipeline.prompt_editing import row_schedules
from sdengine.prompts import PromptError, extract_lora_tags, parse_prompt_attention
from sdengine.text.schedule import (
    MAX_NESTING,
    PromptEditingError,
    parse_prompt_editing,
    prompt_schedule,
    text_at_step,
    when_step,
)

EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SECONDS = 3.0  # per input, on a loaded 2-core machine
LONG_SECONDS = 20.0  # a 100 KB prompt, schedule and emphasis of every step's text


def _event(text: str) -> None:
    try:
        event(text)  # counted by --hypothesis-show-statistics (make fuzz)
    except InvalidArgument:
        pass  # called outside a hypothesis test (the parametrized cases)


def _named(fn):
    """fn()'s result, or the named prompt error it raised (one line); anything else fails the test."""
    try:
        out = fn()
    except SdengineError as e:
        assert isinstance(e, PromptEditingError | PromptError), f"{type(e).__name__}: {e}"
        assert "\n" not in str(e), str(e)
        out = e
    _event(f"outcome: {type(out).__name__}")
    return out


def read_like_the_pipeline(prompt: str, steps: int, hires_steps: int | None = None):
    """The schedule the pipeline uses and every step text's emphasis pieces (or the named error)."""
    plain, _ = extract_lora_tags(prompt)
    schedule = prompt_schedule(plain, steps, hires_steps=hires_steps)
    pieces = {text: parse_prompt_attention(text) for _, text in schedule}
    return plain, schedule, pieces


def _is_subsequence(small: str, big: str) -> bool:
    it = iter(big)
    return all(c in it for c in small)


def _check_schedule(plain: str, schedule: list[tuple[int, str]], total: int) -> None:
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == total and ends[0] >= 1  # switching steps ascend
    for _, text in schedule:
        assert len(text) <= len(plain) and _is_subsequence(text, plain)  # only the prompt's pieces, in order


# ------------------------------------------------------------------------------------------ grammar-built prompts


@dataclass
class Leaf:
    text: str


@dataclass
class Emph:
    opener: str  # "(" or "["
    body: list
    weight: str | None  # "(body:weight)"


@dataclass
class Sched:
    before: list | None  # None: the two-part form [after:when]
    after: list
    when: str


@dataclass
class Alt:
    options: list[list]


def render(seq: list) -> str:
    out = []
    for node in seq:
        if isinstance(node, Leaf):
            out.append(node.text)
        elif isinstance(node, Emph):
            close = ")" if node.opener == "(" else "]"
            weight = f":{node.weight}" if node.weight is not None else ""
            out.append(f"{node.opener}{render(node.body)}{weight}{close}")
        elif isinstance(node, Sched):
            head = "" if node.before is None else render(node.before) + ":"
            out.append(f"[{head}{render(node.after)}:{node.when}]")
        else:
            out.append("[" + "|".join(render(o) for o in node.options) + "]")
    return "".join(out)


def a1111_when(when: str, steps: int) -> int:
    """A1111's rule, written out: a "." makes a fraction of the steps, else a step number; int() truncates."""
    value = float(when.strip())
    if "." in when:
        value *= steps
    if math.isinf(value):
        return steps if value > 0 else -1
    return min(steps, int(value))


def expected_text(seq: list, step: int, steps: int) -> str:
    """The text of ``seq`` at 1-based step ``step`` by A1111's rules."""
    out = []
    for node in seq:
        if isinstance(node, Leaf):
            out.append(node.text)
        elif isinstance(node, Emph):
            close = ")" if node.opener == "(" else "]"
            weight = f":{node.weight}" if node.weight is not None else ""
            out.append(f"{node.opener}{expected_text(node.body, step, steps)}{weight}{close}")
        elif isinstance(node, Sched):
            branch = (node.before or []) if step <= a1111_when(node.when, steps) else node.after
            out.append(expected_text(branch, step, steps))
        else:
            out.append(expected_text(node.options[(step - 1) % len(node.options)], step, steps))
    return "".join(out)


def markers(seq: list) -> set[str]:
    """The marker words ``seq`` writes at every step (its leaves and emphasis bodies, not its edits' branches)."""
    found: set[str] = set()
    for node in seq:
        if isinstance(node, Leaf):
            found |= {w for w in node.text.split() if w.startswith("w") and w.endswith("x")}
        elif isinstance(node, Emph):
            found |= markers(node.body)
    return found


WHENS = st.one_of(
    st.integers(-3, 40).map(str),
    st.sampled_from(["0.5", ".25", "1.0", "0.0", "0.99", "2.", "1e999", "-1e999", "1.0e999", "2e0", "0.25e1"]),
    st.sampled_from(["99999999999999999999999", "+3", "-0", " 3 ", "3 ", "1e-400", "-0.5", "1E2"]),
    st.floats(-2, 2, allow_nan=False).map(lambda f: f"{f:.3f}"),
)
WEIGHTS = st.one_of(st.sampled_from(["1.1", "0.5", "-1", "0", "1e3", "nan", "inf", "1e999", "2"]), st.just(None))
# Filler that is plain text to both parsers (no digits: "[a:3]" would turn a leaf into a step number).
FILLER = st.sampled_from(["", " ", ", ", " BREAK ", "é", "猫", "🙂", "\\(", "\\[", "\\:", "\\|", "\\]", "a b", "\t"])


@st.composite
def trees(draw, depth: int = 0) -> list:
    seq: list = []
    for _ in range(draw(st.integers(0 if depth else 1, 3))):
        kinds = ["leaf"] if depth >= 4 else ["leaf", "leaf", "emph", "sched", "alt"]
        kind = draw(st.sampled_from(kinds))
        if kind == "leaf":
            # unique marker words: their presence at a step says which branch the step took
            seq.append(Leaf(f" {draw(FILLER)} w{draw(st.integers(0, 10**6))}x {draw(FILLER)} "))
        elif kind == "emph":
            seq.append(Emph(draw(st.sampled_from("([")), draw(trees(depth + 1)), None))
            if seq[-1].opener == "(":
                seq[-1].weight = draw(WEIGHTS)
        elif kind == "sched":
            before = draw(st.one_of(st.none(), trees(depth + 1)))
            seq.append(Sched(before, draw(trees(depth + 1)), draw(WHENS)))
        else:
            seq.append(Alt(draw(st.lists(trees(depth + 1), min_size=2, max_size=4))))
    return _unique_markers(seq)


def _unique_markers(seq: list) -> list:
    counter = [0]

    def renumber(nodes: list) -> None:
        for node in nodes:
            if isinstance(node, Leaf):
                words = node.text.split(" ")
                for i, w in enumerate(words):
                    if w.startswith("w") and w.endswith("x") and w[1:-1].isdigit():
                        counter[0] += 1
                        words[i] = f"w{counter[0]}x"
                node.text = " ".join(words)
            elif isinstance(node, Emph):
                renumber(node.body)
            elif isinstance(node, Sched):
                renumber(node.before or [])
                renumber(node.after)
            else:
                for option in node.options:
                    renumber(option)

    renumber(seq)
    return seq


def _found(text: str, words: set[str]) -> set[str]:
    return {
        w for w in text.replace("(", " ").replace(")", " ").replace("[", " ").replace("]", " ").split() if w in words
    }


@FUZZ
@given(tree=trees(), steps=st.integers(1, 40))
@example(tree=[Sched([Leaf("w1x")], [Leaf("w2x")], "1e999")], steps=5)
@example(tree=[Alt([[Leaf("w1x")], [], [Sched(None, [Leaf("w2x")], "0.5")]])], steps=7)
def test_grammar_prompts_follow_a1111_rules_at_every_step(tree, steps):
    prompt = render(tree)
    t0 = time.perf_counter()
    schedule = prompt_schedule(prompt, steps)
    _check_schedule(prompt, schedule, steps)
    for i in range(steps):
        assert text_at_step(schedule, i) == expected_text(tree, max(i, 1), steps), (prompt, i)
    # per top-level group: exactly one branch at every step; an edit switches once and never back
    texts = [text_at_step(schedule, i) for i in range(steps)]
    for node in tree:
        if isinstance(node, Sched) and markers(node.before or []) and markers(node.after):
            used_before = [bool(_found(t, markers(node.before or []))) for t in texts]
            used_after = [bool(_found(t, markers(node.after))) for t in texts]
            assert all(b != a for b, a in zip(used_before, used_after, strict=True)), prompt
            k = used_after.index(True) if True in used_after else steps
            assert used_after == [False] * k + [True] * (steps - k), prompt  # monotone
        elif isinstance(node, Alt) and all(markers(o) for o in node.options):
            for t in texts:
                assert sum(bool(_found(t, markers(o))) for o in node.options) == 1, (prompt, t)
    # the emphasis parser reads every step's text, or refuses a weight by name
    for text in set(texts):
        _named(lambda text=text: parse_prompt_attention(text))
    assert time.perf_counter() - t0 < SECONDS


# ------------------------------------------------------------------------------------------ any text

_NUMBERS = st.sampled_from(
    ["3", "0.5", ".5", "1e999", "-2", "nan", "inf", "-inf", "99999999999999999999999", "1e-400", "0", "1.", "+1", "1e"]
)
_PIECES = st.sampled_from(
    list("[]()[]:|\\ ,\n") + ["::", "BREAK", "AND", "<lora:a:0.5>", "<lora:", ">", "<lora:b>", "<lyco:c:1>"]
    + ["\\[", "\\]", "\\(", "\\:", "\\|", "é", "🙂", "\u200b", "\x00", "cat", "a", "(a:1.2)", "[a:b:2]", "[a|b]"]
)  # fmt: skip
any_prompts = st.one_of(
    st.lists(st.one_of(_PIECES, _NUMBERS), max_size=80).map("".join),
    st.text(max_size=120),
)


@FUZZ
@given(prompt=any_prompts, steps=st.integers(1, 60), hires=st.one_of(st.none(), st.integers(1, 30)))
@example(prompt="[a:b:1e999]", steps=10, hires=None)
@example(prompt="[a:b:nan]", steps=10, hires=None)
@example(prompt="[" * (MAX_NESTING + 1), steps=3, hires=None)
@example(prompt="[a|b] <lora:x:1> | c", steps=4, hires=2)
def test_any_prompt_gives_a_schedule_or_a_named_error(prompt, steps, hires):
    t0 = time.perf_counter()
    out = _named(lambda: read_like_the_pipeline(prompt, steps, hires))
    if not isinstance(out, SdengineError):
        plain, schedule, pieces = out
        total = steps if hires is None else hires
        _check_schedule(plain, schedule, total)
        assert set(pieces) == {t for _, t in schedule}
        if "[" not in plain:
            assert schedule == [(total, plain)]  # no bracket: no editing
    assert time.perf_counter() - t0 < SECONDS


@FUZZ
@given(when=st.one_of(WHENS, st.floats(allow_nan=False).map(repr)), steps=st.integers(1, 200))
def test_when_step_is_a1111s_rule_and_bounded(when, steps):
    if not parse_prompt_editing(f"[a:b:{when}]").edits:
        return  # not a number to the grammar ("inf", "1e+20" is): the group is text
    got = when_step(when.strip(), steps)
    assert got <= steps and got == a1111_when(when, steps)  # below 1 (any negative too): never switches


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    pytest.importorskip("diffusers")  # the tiny folder is written with diffusers' classes
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@FUZZ
@given(prompt=any_prompts | trees().map(render), negative=any_prompts | trees().map(render), steps=st.integers(1, 12))
@example(prompt="[a|b] (c:1.2) BREAK [d:e:2] <lora:x:1>", negative="[x::1]", steps=4)
def test_any_prompt_through_the_pipelines_row_schedules(sd1, prompt, negative, steps):
    """The encoder side: every step text of a row encoded to one length, finite; or a named error."""
    notes: list[str] = []
    t0 = time.perf_counter()
    out = _named(lambda: row_schedules(sd1.conditioner, [prompt], [negative], steps, note=notes.append))
    assert all("\n" not in n for n in notes)
    if isinstance(out, list):
        (row,) = out
        assert {int(c["crossattn"].shape[1]) for c in row.encoded.values()} == {row.length}
        assert all(bool(torch.isfinite(c["crossattn"]).all()) for c in row.encoded.values())
        for i in range(steps):
            p, n = row.texts_at(i)
            assert p in row.encoded and n in row.encoded
    elif out is None:  # no editing anywhere: the plain path, which encodes the texts as they are
        _named(lambda: sd1.encode_prompt(prompt, negative))
    assert time.perf_counter() - t0 < 4 * SECONDS


# ------------------------------------------------------------------------------------------ 100 KB prompts

SIZE = 100_000
LONG = {
    "open-square": "[",
    "open-edit": "[a:",
    "alternations": "[a|b]",
    "edits": "[cat:dog:0.5] ",
    "nested-edits": "[a:[b:c:3]:2]",
    "pipes": "[a|b|",
    "colons": ":",
    "escapes": "\\[",
    "emphasis-and-edits": "(a [b:c:1] ",
    "lora-tags": "<lora:x:1> [a|b] ",
    "breaks": "BREAK [x::2] ",
    "unicode": "猫[🙂|é]",
    # found by test_random_100kb_prompts_...: BREAK's regex tried every space of a run as a start (180 s)
    "spaces": " ",
    "whitespace": " \t\n",
}


def _long_check(prompt: str) -> None:
    t0 = time.perf_counter()
    out = _named(lambda: read_like_the_pipeline(prompt, 20))
    took = time.perf_counter() - t0
    assert took < LONG_SECONDS, f"{took:.1f} s for {len(prompt)} characters"
    if not isinstance(out, SdengineError):
        _check_schedule(out[0], out[1], 20)


@pytest.mark.parametrize("unit", list(LONG.values()), ids=list(LONG))
def test_100kb_prompts_within_a_bound(unit):
    _long_check((unit * (SIZE // len(unit) + 1))[:SIZE])


@settings(FUZZ, max_examples=max(3, EXAMPLES // 50))
@given(seed=st.integers(0, 2**32 - 1), unit=st.lists(st.one_of(_PIECES, _NUMBERS), min_size=1, max_size=12))
def test_random_100kb_prompts_within_a_bound(seed, unit):
    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    unit = list(unit)
    while size < SIZE:  # the unit's pieces shuffled again and again: structure that repeats, not just one pattern
        rng.shuffle(unit)
        parts.extend(unit)
        size += sum(map(len, unit))
    _long_check("".join(parts)[:SIZE])
