"""Infotext parsing of hostile sizes: linear time, a size limit with a clear message, and the exact result of
A1111's field regex (the reference ``re.findall``) on any text."""

from __future__ import annotations

import os
import re
import struct
import time
import zlib

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdengine.metadata import MAX_INFOTEXT_CHARS, MetadataError, parse_fields, parse_parameters, read_png_parameters

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


# ------------------------------------------------------------------------------------------- PNG files


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, *chunks: bytes) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + b"".join(chunks)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + _chunk(b"IEND", b"")
    )


def test_huge_png_metadata_is_read_without_decoding_pixels(tmp_path):
    p = tmp_path / "huge.png"
    p.write_bytes(_png(20000, 20000, _chunk(b"tEXt", b"parameters\0a cat\nSteps: 5, Seed: 1, Size: 64x64")))
    text, seconds = _timed(read_png_parameters, p)
    assert text == "a cat\nSteps: 5, Seed: 1, Size: 64x64" and seconds < 2.0


@pytest.mark.parametrize(
    "chunk,expect",
    [
        (_chunk(b"zTXt", b"parameters\0\0" + zlib.compress("a dog, Steps: 3".encode("latin-1"))), "a dog, Steps: 3"),
        (_chunk(b"iTXt", b"parameters\0\0\0\0\0" + "un chien \u00e9\U0001f600".encode()), "un chien \u00e9\U0001f600"),
        (_chunk(b"iTXt", b"parameters\0\1\0en\0\0" + zlib.compress("z\u00e9".encode())), "z\u00e9"),
        (
            _chunk(b"tEXt", b"Comment\0other")
            + _chunk(b"tEXt", b"parameters\0first")
            + _chunk(b"tEXt", b"parameters\0last"),
            "last",
        ),
    ],
    ids=["ztxt", "itxt", "itxt-compressed", "several"],
)
def test_png_text_chunks_of_every_kind(tmp_path, chunk, expect):
    p = tmp_path / "t.png"
    p.write_bytes(_png(2, 2, chunk))
    assert read_png_parameters(p) == expect
    with Image.open(p) as im:  # the reference reader agrees
        assert im.info.get("parameters") == expect


def test_png_compressed_text_bomb_is_refused(tmp_path):
    p = tmp_path / "bomb.png"
    p.write_bytes(_png(2, 2, _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"a" * (50 * 1024 * 1024)))))
    with pytest.raises(MetadataError, match=r"bomb\.png.*limit"):
        read_png_parameters(p)


@pytest.mark.parametrize(
    "blob",
    [
        b"\x89PNG\r\n\x1a\n",  # signature only
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 2**31 + 5) + b"tEXt",  # absurd chunk length
        b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"parameters\0abc")[:-2],  # truncated
        b"\x89PNG\r\n\x1a\n" + _chunk(b"tEXt", b"parameters\0abc")[:-4] + b"\0\0\0\0",  # bad CRC
    ],
    ids=["signature-only", "absurd-length", "truncated", "bad-crc"],
)
def test_broken_png_files_are_named_errors(tmp_path, blob):
    p = tmp_path / "broken.png"
    p.write_bytes(blob)
    with pytest.raises(MetadataError, match=r"broken\.png") as e:
        read_png_parameters(p)
    assert "\n" not in str(e.value)


def test_huge_non_png_image_is_a_named_error(tmp_path):
    p = tmp_path / "huge.bmp"
    # a BMP header claiming 30000 x 30000 pixels: over Pillow's decompression-bomb limit
    info = struct.pack("<IiiHHIIiiII", 40, 30000, 30000, 1, 24, 0, 0, 2835, 2835, 0, 0)
    p.write_bytes(b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + info)
    with pytest.raises(MetadataError, match=r"huge\.bmp.*too large") as e:
        read_png_parameters(p)
    assert "\n" not in str(e.value)


_VALID_PNG = _png(
    3,
    2,
    _chunk(b"tEXt", b"parameters\0a cat\nSteps: 5, Seed: 1"),
    _chunk(b"zTXt", b"parameters\0\0" + zlib.compress(b"x, Steps: 1")),
    _chunk(b"iTXt", b"parameters\0\1\0\0\0" + zlib.compress("\u00e9".encode())),
)


@st.composite
def _mutated_png(draw) -> bytes:
    blob = bytearray(_VALID_PNG)
    for _ in range(draw(st.integers(0, 5))):
        at = draw(st.integers(0, len(blob) - 1))
        blob[at : at + 1] = draw(st.binary(max_size=3))
    cut = draw(st.one_of(st.none(), st.integers(0, len(blob))))
    return bytes(blob[:cut] if cut is not None else blob)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_mutated_png())
def test_mutated_png_files_give_text_or_a_named_error(tmp_path, blob):
    p = tmp_path / "m.png"
    p.write_bytes(blob)
    t0 = time.perf_counter()
    try:
        out = read_png_parameters(p)
    except MetadataError as e:
        assert "\n" not in str(e)
    else:
        assert out is None or isinstance(out, str)
    assert time.perf_counter() - t0 < 2.0
