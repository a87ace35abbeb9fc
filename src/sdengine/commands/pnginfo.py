"""``sdengine pnginfo FILE``: the generation parameters an image carries (A1111's "PNG Info" tab).

Reads the PNG ``parameters`` text chunk, or the EXIF UserComment of a JPEG/WebP as A1111 writes it, of any
image made by sdengine, A1111 or a tool that writes the same format. Prints the text as stored; ``--json``
prints ``{"file", "parameters", "fields"}`` with the fields parsed as A1111 parses them.
"""

from __future__ import annotations

import argparse
import json


def run(a: argparse.Namespace) -> int:
    from ..image_info import ImageInfoError, image_text_keys, read_image_parameters

    text = read_image_parameters(a.file)
    if text is None:
        keys = image_text_keys(a.file)
        if "sdengine-xyz" in keys:
            raise ImageInfoError(
                f"{a.file} is an sdengine X/Y/Z grid: its cells (the NNNNN-SEED.png files written "
                "with it) carry the parameters"
            )
        has = f"; it has other text: {', '.join(keys)}" if keys else ""
        raise ImageInfoError(
            f"{a.file} carries no generation parameters (no PNG 'parameters' text, no EXIF UserComment): it was "
            f"not written by sdengine or A1111, or its metadata was stripped{has}"
        )
    if a.json:
        from ..metadata import parse_parameters  # torch comes with it (sampler table): only for --json

        print(
            json.dumps(
                {"file": str(a.file), "parameters": text, "fields": parse_parameters(text)},
                indent=2,
                ensure_ascii=False,
            )
        )
    else:
        print(text)
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "pnginfo",
        help="print the generation parameters of an sdengine/A1111 image (PNG, JPEG, WebP)",
        description="Print the A1111 'parameters' text of an image: the PNG text chunk, or the EXIF UserComment "
        "of a JPEG/WebP. 'sdengine generate --from-png FILE.png' makes a PNG's image again.",
    )
    p.add_argument("file", help="the image")
    p.add_argument("--json", action="store_true", help="print JSON with the text and its parsed fields")
    p.set_defaults(func=run)
