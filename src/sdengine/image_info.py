"""The generation-parameters text stored in an image file, wherever A1111 (and sdengine) put it.

* PNG: the ``parameters`` text chunk (:func:`sdengine.metadata.read_png_parameters`).
* JPEG, WebP (and any format with EXIF): the EXIF ``UserComment`` tag (0x9286, in the Exif IFD), which
  A1111 writes with piexif as an 8-byte character-code prefix and the text: ``b"UNICODE\\0"`` then
  UTF-16 big-endian. The ``ASCII`` and ``JIS`` prefixes of the EXIF standard are read too, and UTF-16
  text written little-endian by other tools is recognised.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from sdengine.errors import SdengineError

EXIF_IFD = 0x8769  # the Exif sub-IFD that holds UserComment
USER_COMMENT = 0x9286
PARAMETERS_KEY = "parameters"  # the PNG text chunk (same as sdengine.metadata.PARAMETERS_KEY)

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


def read_image_parameters(path: str | Path) -> str | None:
    """The parameters text of an image (PNG text chunk, else EXIF UserComment), ``None`` when it has none.

    An unreadable or missing file is an :class:`ImageInfoError` naming it."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            if img.format == "PNG":
                img.load()  # PNG text chunks after the image data are only read with the pixels
            text = img.info.get(PARAMETERS_KEY)
            if text is not None:
                return str(text)
            comment = img.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
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
        with Image.open(path) as img:
            if img.format == "PNG":
                img.load()
            return [str(k) for k, v in img.info.items() if isinstance(v, str)]
    except (OSError, SyntaxError, ValueError):
        return []


__all__ = [
    "EXIF_IFD",
    "USER_COMMENT",
    "ImageInfoError",
    "decode_user_comment",
    "encode_user_comment",
    "image_text_keys",
    "read_image_parameters",
]
