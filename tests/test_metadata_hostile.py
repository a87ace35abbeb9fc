"""Infotext parsing of hostile sizes: linear time, a size limit with a clear message, and the exact result of
A1111's field regex (the reference ``re.findall``) on any text."""

from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sdengine.metadata import MAX_INFOTEXT_CHARS, MetadataError, parse_fields, parse_parameters

# A1111's field regex, as its parse_generation_parameters uses it: the reference for parse_fields.
A1111_FIELD_RE = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "300"))
FIELDS = "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512"


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


@pytest.mark.parametrize(
    "last",
    [
        "a" * 200_000,  # one word: the regex rescans it from every start
        "ab cd-ef/gh " * 17_000,
        "k: " + '"' + "\\a" * 100_000,  # an unterminated quoted value
        'k: "x, ' * 30_000,  # quoted values that each run to the end
        "," * 200_000,
        " " * 100_000 + "x",
    ],
)
def test_200kb_last_line_parses_in_linear_time(last):
    text = "a prompt\n" + last
    parsed, seconds = _timed(parse_parameters, text)
    assert seconds < 2.0, f"{seconds:.1f} s"
    assert isinstance(parsed["Prompt"], str)


def test_40kb_prompt_parses_fast_and_keeps_its_fields():
    prompt = "a very (detailed:1.2) red apple on a wooden table, " * 800  # 40 KB
    text = f"{prompt}\nNegative prompt: blurry\n{FIELDS}"
    parsed, seconds = _timed(parse_parameters, text)
    assert seconds < 2.0, f"{seconds:.1f} s"
    assert parsed["Prompt"] == prompt.strip() and parsed["Negative prompt"] == "blurry"
    assert parsed["Steps"] == "20" and parsed["Size"] == "512x512"
    plain = prompt.replace(":", " ")  # no "key:" in it, so no field line: the whole text is the prompt
    single, seconds = _timed(parse_parameters, plain)
    assert seconds < 2.0 and single["Prompt"] == plain.strip()


def test_oversized_infotext_is_refused_with_a_clear_message():
    with pytest.raises(MetadataError, match=r"infotext.*characters.*limit") as e:
        parse_parameters("x" * (MAX_INFOTEXT_CHARS + 1))
    assert "\n" not in str(e.value)
    assert parse_parameters("x" * 1000)["Prompt"] == "x" * 1000  # well under the limit: read as before


@pytest.mark.parametrize("text", ["", "   ", "\n\n", "Negative prompt:", "a:b:c:d", '"', 'k: "', "k: \\"])
def test_degenerate_texts(text):
    parsed = parse_parameters(text)
    assert set(parsed) >= {"Prompt", "Negative prompt"}


def test_non_string_is_a_named_error():
    with pytest.raises(MetadataError, match="text"):
        parse_parameters(b"Steps: 20")  # type: ignore[arg-type]


_ALPHABET = st.sampled_from(list('ab Z_9-/:,"\\ \t\x0b\x1c\u00e9\u3000\u0660') + ["Steps", ": ", ", ", '\\"'])
# Field-shaped pieces, so that most lines hold keys, quoted values and escapes next to each other.
_PIECES = st.sampled_from(["Seed: 1", ", ", 'Model: "', '"', "a, b", ": ", '\\"', "\\", "k-1/x:", " "])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_ALPHABET | _PIECES, max_size=40).map("".join))
@example('Steps: 1, Model: "my, model: v2", Version: x')
@example('a: "\\", b: "x\\"", c: "y", d: "z')
def test_parse_fields_equals_a1111_regex(line):
    assert parse_fields(line) == A1111_FIELD_RE.findall(line)


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=300))
def test_parse_parameters_never_crashes(text):
    parsed = parse_parameters(text)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in parsed.items())
