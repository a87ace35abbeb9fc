"""``sdengine pnginfo``: the parameters of images written by A1111 (PNG text chunk, JPEG/WebP EXIF UserComment)
and by sdengine; an image without them is one clear line."""

from __future__ import annotations

import json
import struct
import warnings
import zlib

import pytest
from PIL import Image, PngImagePlugin

from sdengine.cli import main
from sdengine.image_info import (
    EXIF_IFD,
    USER_COMMENT,
    decode_user_comment,
    encode_user_comment,
    read_image_parameters,
)

# What A1111 1.10 writes for a txt2img image with LoRAs and a hires pass: a two-line prompt, the negative
# prompt line, then one line of fields; values with ", " or ": " are JSON strings.
A1111_TEXT = (
    "masterpiece, a cat <lora:a:0.8>, (sitting:1.2)\n"
    'on a "red" chair\n'
    "Negative prompt: blurry, lowres\n"
    "Steps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 123, Size: 512x512, Model hash: 6ce0161689, "
    "Model: v1-5-pruned-emaonly, Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, "
    'Lora hashes: "a: 1234abcd5678, b: 9876fedc5432", ADetailer prompt: "face: smile, eyes", '
    "Version: v1.10.1"
)


def _a1111_png(path, text: str) -> None:
    """A PNG as A1111 saves it: Pillow's PngInfo with the text under 'parameters'."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, pnginfo=info)


def _pnginfo(*args: str) -> int:
    return main(["pnginfo", *args])


def test_a1111_png_text_is_printed_as_stored(tmp_path, capsys):
    f = tmp_path / "00001-123.png"
    _a1111_png(f, A1111_TEXT)
    assert _pnginfo(str(f)) == 0
    assert capsys.readouterr().out == A1111_TEXT + "\n"


def test_a1111_png_json_fields(tmp_path, capsys):
    f = tmp_path / "a.png"
    _a1111_png(f, A1111_TEXT)
    assert _pnginfo(str(f), "--json") == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["file"] == str(f)
    assert doc["parameters"] == A1111_TEXT
    fields = doc["fields"]
    assert fields["Prompt"] == 'masterpiece, a cat <lora:a:0.8>, (sitting:1.2)\non a "red" chair'
    assert fields["Negative prompt"] == "blurry, lowres"
    assert fields["Steps"] == "20"
    assert fields["Sampler"] == "DPM++ 2M Karras"
    assert fields["CFG scale"] == "7"
    assert fields["Seed"] == "123"
    assert fields["Size"] == "512x512"
    assert fields["Model"] == "v1-5-pruned-emaonly"
    # quoted values keep their commas and colons
    assert fields["Lora hashes"] == "a: 1234abcd5678, b: 9876fedc5432"
    assert fields["ADetailer prompt"] == "face: smile, eyes"
    assert fields["Hires upscale"] == "2"
    assert fields["Version"] == "v1.10.1"
    assert list(fields)[-1] == "Version"


def test_non_latin1_prompt_in_itxt(tmp_path, capsys):
    text = "🍎 pomme rouge, café\nSteps: 4, Sampler: Euler a, CFG scale: 5, Seed: 7, Size: 64x64"
    f = tmp_path / "u.png"
    _a1111_png(f, text)
    # Pillow (like A1111) stores non-Latin-1 text as an iTXt chunk
    assert b"iTXt" in f.read_bytes()
    assert _pnginfo(str(f)) == 0
    assert capsys.readouterr().out == text + "\n"


def test_sdengine_png_round_trip(tmp_path, capsys):
    from sdengine.metadata import format_parameters, save_png

    text = format_parameters(
        {
            "prompt": "a, b: c",
            "negative_prompt": "x",
            "steps": 3,
            "sampler": "euler_a",
            "cfg_scale": 5.0,
            "seed": 9,
            "width": 64,
            "height": 64,
            "model": "emoji",
        }
    )
    f = save_png(Image.new("RGB", (4, 4)), tmp_path / "s.png", text)
    assert _pnginfo(str(f), "--json") == 0
    fields = json.loads(capsys.readouterr().out)["fields"]
    assert fields["Prompt"] == "a, b: c"
    assert fields["Sampler"] == "Euler a"
    assert fields["Model"] == "emoji"


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP"])
def test_exif_user_comment_as_a1111_writes_it(tmp_path, capsys, fmt):
    f = tmp_path / f"a.{fmt.lower()}"
    exif = Image.Exif()
    # piexif.helper.UserComment.dump(text, encoding="unicode"): the 8-byte code, then UTF-16 big-endian
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = b"UNICODE\x00" + A1111_TEXT.encode("utf-16-be")
    Image.new("RGB", (16, 16), (0, 90, 200)).save(f, format=fmt, exif=exif.tobytes())
    assert read_image_parameters(f) == A1111_TEXT
    assert _pnginfo(str(f)) == 0
    assert capsys.readouterr().out == A1111_TEXT + "\n"


def test_user_comment_codes():
    text = "a cat, café\nSteps: 20"
    assert encode_user_comment(text) == b"UNICODE\x00" + text.encode("utf-16-be")
    assert decode_user_comment(encode_user_comment(text)) == text
    assert decode_user_comment(b"UNICODE\x00" + text.encode("utf-16-le")) == text  # other tools' byte order
    assert decode_user_comment(b"ASCII\x00\x00\x00Steps: 5") == "Steps: 5"
    assert decode_user_comment(b"\x00" * 8 + "naïve".encode()) == "naïve"


def _bare_png(path) -> None:
    """A valid PNG written by hand with no text chunk at all."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\x80\x80\x80" * 2 for _ in range(2))
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_image_without_parameters_is_one_line(tmp_path, capsys):
    f = tmp_path / "plain.png"
    _bare_png(f)
    assert Image.open(f).size == (2, 2)
    assert _pnginfo(str(f)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "carries no generation parameters" in err and "plain.png" in err
    comfy = tmp_path / "comfy.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", '{"3": {"class_type": "KSampler"}}')
    info.add_text("workflow", "{}")
    Image.new("RGB", (4, 4)).save(comfy, pnginfo=info)
    assert _pnginfo(str(comfy)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carries no generation parameters" in err and "other text: prompt, workflow" in err
    jpg = tmp_path / "plain.jpg"
    Image.new("RGB", (8, 8)).save(jpg)
    assert _pnginfo(str(jpg), "--json") == 2
    assert "carries no generation parameters" in capsys.readouterr().err


@pytest.mark.parametrize("content", [None, b"not an image at all"])
def test_missing_or_broken_file_is_one_line(tmp_path, capsys, content):
    f = tmp_path / "x.png"
    if content is not None:
        f.write_bytes(content)
    assert _pnginfo(str(f)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdengine: error:") and err.count("\n") == 1 and "x.png" in err


def test_plain_pnginfo_needs_no_torch(tmp_path):
    """Printing the text reads the file only (no sampler table, no torch): the command answers at once."""
    import subprocess
    import sys
    from pathlib import Path

    f = tmp_path / "a.png"
    _a1111_png(f, A1111_TEXT)
    code = (
        "import argparse, sys\nfrom sdengine.commands import pnginfo\np = argparse.ArgumentParser()\n"
        "pnginfo.register(p.add_subparsers())\n"
        f"a = p.parse_args(['pnginfo', {str(f)!r}])\nassert a.func(a) == 0\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == A1111_TEXT + "\n"


def _huge_png(path, width: int, height: int, text: str | None) -> None:
    """A valid 1-bit PNG of width x height black pixels written by hand (no pixel array in memory), its
    ``parameters`` chunk, when given, after the image data (where some tools put it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + one bit per pixel
    z = zlib.compressobj(1)
    data = z.compress(row * height) + z.flush()
    tail = chunk(b"tEXt", b"parameters\x00" + text.encode("latin-1")) if text is not None else b""
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", data)
        + tail
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("side", [10_000, 14_000])  # past Pillow's bomb warning (89 MP), past its hard limit
def test_a_huge_png_is_read_without_decoding_it(tmp_path, capsys, side):
    """A very large PNG (an upscaled A1111 image): its parameters are printed and nothing else (it once printed
    Pillow's DecompressionBombWarning over two lines, or, past 179 megapixels, a DecompressionBombError traceback;
    and without parameters it decoded every pixel to find out)."""
    f = tmp_path / "big.png"
    _huge_png(f, side, side, A1111_TEXT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning, which the command line would print
        assert _pnginfo(str(f)) == 0
    captured = capsys.readouterr()
    assert captured.out == A1111_TEXT + "\n" and captured.err == ""
    plain = tmp_path / "plain.png"
    _huge_png(plain, side, side, None)
    assert _pnginfo(str(plain)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "carries no generation parameters" in err


def test_png_exif_user_comment_and_a_huge_jpeg(tmp_path, capsys):
    """A PNG whose parameters are an EXIF UserComment (an eXIf chunk) is read from that chunk; a JPEG past Pillow's
    size limit is one line naming it, not a traceback."""
    exif = Image.Exif()
    exif.get_ifd(EXIF_IFD)[USER_COMMENT] = encode_user_comment(A1111_TEXT)
    png = tmp_path / "exif.png"
    Image.new("RGB", (8, 8)).save(png, exif=exif.tobytes())
    assert read_image_parameters(png) == A1111_TEXT
    jpg = tmp_path / "big.jpg"
    # a baseline JPEG header claiming 14000 x 14000 (SOI, SOF0, then nothing): Pillow checks the size when opening
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 14000, 14000, 1) + b"\x01\x11\x00"
    jpg.write_bytes(b"\xff\xd8" + sof + b"\xff\xd9")
    assert _pnginfo(str(jpg)) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdengine: error:") and err.count("\n") == 1 and "too large" in err and "big.jpg" in err
