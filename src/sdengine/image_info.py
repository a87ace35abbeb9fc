"""The generation-parameters text stored in an image file, wherever A1111 (and sdengine) put it.

* PNG: the ``parameters`` text chunk, read chunk by chunk (:func:`png_text_chunks`): the pixels are never
  decoded, so a 20000x20000 PNG costs nothing and Pillow's decompression-bomb guard never trips.
* JPEG, WebP (and any format with EXIF): the EXIF ``UserComment`` tag (0x9286, in the Exif IFD), which
  A1111 writes with piexif as an 8-byte character-code prefix and the text: ``b"UNICODE\\0"`` then
  UTF-16 big-endian. The ``ASCII`` and ``JIS`` prefixes of the EXIF standard are read too, and UTF-16
  text written little-endian by other tools is recognised.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from pathlib import Path
from typing import IO

from PIL import Image

from sdengine.errors import SdengineError

EXIF_IFD = 0x8769  # the Exif sub-IFD that holds UserComment
USER_COMMENT = 0x9286
PARAMETERS_KEY = "parameters"  # the PNG text chunk (same as sdengine.metadata.PARAMETERS_KEY)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
# Far above any real infotext (A1111 prompts are a few KB), small enough that a crafted compressed chunk (a few KB
# can inflate to GBs) costs nothing: the same bound as sdengine.metadata.MAX_INFOTEXT_CHARS, in UTF-8 bytes.
MAX_TEXT_BYTES = 4 * 1_000_000

_UNICODE = b"UNICODE\x00"
_ASCII = b"ASCII\x00\x00\x00"
_JIS = b"JIS\x00\x00\x00\x00\x00"


class ImageInfoError(SdengineError, ValueError):
    """An image file whose metadata cannot be read."""


def encode_user_comment(text: str) -> bytes:
    """An EXIF UserComment value as A1111 writes it (piexif's ``UserComment.dump(text, "unicode")``)."""
    return _UNICODE + text.encode("utf-16-be")


def decode_user_comment(value: bytes | str) -> str:
    """The text of an EXIF UserComment value (a prefix names its character code)."""
    if isinstance(value, str):  # some readers hand it over already decoded
        return value
    prefix, body = value[:8], value[8:]
    if prefix == _UNICODE:
        # The standard leaves the byte order open; A1111 writes big-endian. ASCII-heavy text has its zero
        # bytes first in big-endian pairs and second in little-endian ones.
        zeros_first = body[0::2].count(0)
        zeros_second = body[1::2].count(0)
        encoding = "utf-16-le" if zeros_second > zeros_first else "utf-16-be"
        return body.decode(encoding, errors="replace").rstrip("\x00")
    if prefix == _ASCII:
        return body.decode("ascii", errors="replace").rstrip("\x00")
    if prefix == _JIS:
        return body.decode("shift_jis", errors="replace").rstrip("\x00")
    # Undefined code (all zero) or no prefix at all: A1111 falls back to UTF-8 for these.
    raw = body if prefix == b"\x00" * 8 else value
    return raw.decode("utf-8", errors="ignore").rstrip("\x00")


def _inflate(path: Path, data: bytes) -> bytes:
    d = zlib.decompressobj()
    try:
        out = d.decompress(data, MAX_TEXT_BYTES + 1)
    except zlib.error as e:
        raise ImageInfoError(f"cannot read image metadata from {path}: broken compressed text ({e})") from None
    if len(out) > MAX_TEXT_BYTES or d.unconsumed_tail:
        raise ImageInfoError(
            f"cannot read image metadata from {path}: compressed text is over the limit of {MAX_TEXT_BYTES:,} bytes"
        )
    return out


def _png_text(path: Path, kind: bytes, data: bytes) -> tuple[str, str | None]:
    """(keyword, text) of a tEXt / zTXt / iTXt chunk (text None when undecodable, as Pillow skips it)."""
    key, _, rest = data.partition(b"\0")
    keyword = key.decode("latin-1")
    if kind == b"tEXt":
        return keyword, rest.decode("latin-1")
    if kind == b"zTXt":
        return keyword, _inflate(path, rest[1:]).decode("latin-1")
    if len(rest) < 2:
        return keyword, None
    compressed, body = rest[0], rest[2:]
    _lang, _, body = body.partition(b"\0")
    _translated, _, body = body.partition(b"\0")
    raw = _inflate(path, body) if compressed else body
    try:
        return keyword, raw.decode("utf-8")
    except UnicodeDecodeError:
        return keyword, None


def _read_png_chunks(path: Path, f: IO[bytes]) -> tuple[dict[str, str], bytes | None]:
    size = os.fstat(f.fileno()).st_size
    found: dict[str, str] = {}
    exif: bytes | None = None
    while True:
        head = f.read(8)
        if len(head) < 8:
            raise ImageInfoError(f"cannot read image metadata from {path}: truncated PNG (no IEND chunk)")
        length, kind = struct.unpack(">I4s", head)
        if length > 2**31 - 1 or f.tell() + length + 4 > size:
            raise ImageInfoError(f"cannot read image metadata from {path}: broken PNG chunk {kind!r} ({length} bytes)")
        if kind == b"IEND":
            return found, exif
        if kind not in (*_PNG_TEXT_CHUNKS, b"eXIf"):
            f.seek(length + 4, os.SEEK_CUR)  # data and CRC
            continue
        data = f.read(length)
        (crc,) = struct.unpack(">I", f.read(4))
        if zlib.crc32(kind + data) & 0xFFFFFFFF != crc:
            raise ImageInfoError(f"cannot read image metadata from {path}: bad checksum in a {kind.decode()} chunk")
        if kind == b"eXIf":
            exif = data
            continue
        keyword, text = _png_text(path, kind, data)
        if text is not None:
            found[keyword] = text  # the last chunk of a keyword wins, as in Pillow


def _png_chunks(path: Path) -> tuple[dict[str, str], bytes | None] | None:
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return None
            return _read_png_chunks(path, f)
    except FileNotFoundError:
        raise ImageInfoError(f"{path}: no such file") from None
    except OSError as e:
        raise ImageInfoError(f"cannot read image metadata from {path}: {e}") from None


def png_text_chunks(path: str | Path) -> dict[str, str] | None:
    """Every text chunk (tEXt, zTXt, iTXt) of a PNG by keyword, read from the chunks alone: the pixels (IDAT) are
    skipped, never decoded, whatever the image's size. ``None`` when the file is not a PNG; an unreadable file or
    a broken chunk is an :class:`ImageInfoError` naming the file."""
    chunks = _png_chunks(Path(path))
    return None if chunks is None else chunks[0]


def _open_quietly(path: Path) -> Image.Image:
    """Pillow's ``Image.open`` without its decompression-bomb warning (only the header is read here; the pixels
    of a huge JPEG are never decoded); one past Pillow's hard limit is an :class:`ImageInfoError`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(path)
        except Image.DecompressionBombError as e:
            raise ImageInfoError(f"cannot read image metadata from {path}: image too large ({e})") from None


def read_image_parameters(path: str | Path) -> str | None:
    """The parameters text of an image (PNG text chunk, else EXIF UserComment), ``None`` when it has none.

    An unreadable or missing file is an :class:`ImageInfoError` naming it. No pixel is decoded."""
    path = Path(path)
    png = _png_chunks(path)
    if png is not None:
        texts, exif_bytes = png
        if PARAMETERS_KEY in texts:
            return texts[PARAMETERS_KEY]
        if exif_bytes is None:
            return None
        try:
            exif = Image.Exif()
            exif.load(exif_bytes)
            comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
        except (OSError, SyntaxError, ValueError, struct.error) as e:
            raise ImageInfoError(f"cannot read image metadata from {path}: broken eXIf chunk ({e})") from None
    else:
        try:
            with _open_quietly(path) as img:  # a JPEG's or WebP's EXIF (only the header is read)
                text = img.info.get(PARAMETERS_KEY)
                if text is not None:
                    return str(text)
                comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
        except ImageInfoError:
            raise
        except FileNotFoundError:
            raise ImageInfoError(f"{path}: no such file") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageInfoError(f"cannot read image metadata from {path}: {e}") from None
    if comment is None:
        return None
    text = decode_user_comment(comment)
    return text if text.strip() else None


def image_text_keys(path: str | Path) -> list[str]:
    """The names of the text entries an image carries (PNG tEXt/iTXt/zTXt keys, e.g. ComfyUI's ``prompt``
    and ``workflow``), for messages that say what a file has instead of parameters."""
    try:
        chunks = png_text_chunks(path)
        if chunks is not None:
            return list(chunks)
        with _open_quietly(Path(path)) as img:
            return [str(k) for k, v in img.info.items() if isinstance(v, str)]
    except (OSError, SyntaxError, ValueError):  # ImageInfoError is a ValueError
        return []


__all__ = [
    "EXIF_IFD",
    "MAX_TEXT_BYTES",
    "PNG_SIGNATURE",
    "USER_COMMENT",
    "ImageInfoError",
    "decode_user_comment",
    "encode_user_comment",
    "image_text_keys",
    "png_text_chunks",
    "read_image_parameters",
]
