"""``sdengine list models|samplers|schedules|loras|controlnets|embeddings|clip-vision|ip-adapters``: what can be
picked by name.

Models, LoRAs and ControlNets: the built-in ones (shipped in the package), then the files in ``--models-dir``,
``--loras-dir``, ``--controlnets-dir``. Samplers and schedules come from the sampler table
(:mod:`sdengine.diffusion.sampling`), with the names A1111 uses for them. CLIP vision encoders and IP-Adapters: the
files of ``--clip-vision-dir`` / ``--ip-adapters-dir`` by the names the server lists them by, with what their
tensors' shapes say (read from a safetensors header, no weights loaded): an encoder's width, layers and projection,
an adapter's kind and the CLIP width it reads. ``--json`` prints a JSON list.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import UsageError

WHAT = ("models", "samplers", "schedules", "loras", "controlnets", "embeddings", "clip-vision", "ip-adapters")
# the folder flag of each listed kind, and what its files are called in a message
FOLDER_KINDS = {
    "models": "models",
    "loras": "LoRAs",
    "controlnets": "ControlNets",
    "embeddings": "embeddings",
    "clip-vision": "CLIP vision encoders",
    "ip-adapters": "IP-Adapters",
}
ADAPTER_KINDS = {"plain": "IP-Adapter", "plus": "IP-Adapter Plus", "full": "IP-Adapter full face"}
EMBEDDINGS_NOTE = (
    "use them with `generate --embeddings-dir FOLDER` (or `serve --embeddings-dir`): a file's name in a prompt is "
    "its vectors (docs/embeddings.md)"
)


def sampler_rows() -> list[dict[str, Any]]:
    """One row per sampler: our name, A1111's, the schedules it takes and the combined A1111 names
    ("DPM++ 2M Karras") that select it with a schedule."""
    from ..diffusion.sampling import A1111_NAMES, SAMPLERS

    rows = []
    for name, spec in SAMPLERS.items():
        combined = [k for k, (s, sched) in A1111_NAMES.items() if s == name and sched is not None]
        rows.append(
            {
                "name": name,
                "a1111": spec.a1111,
                "schedules": list(spec.schedules),
                "stochastic": spec.stochastic,
                "a1111_with_schedule": combined,
            }
        )
    return rows


def schedule_rows() -> list[dict[str, Any]]:
    from ..diffusion.sampling import ALL_SCHEDULES, SCHEDULE_A1111

    return [{"name": s, "a1111": SCHEDULE_A1111.get(s, s)} for s in ALL_SCHEDULES]


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """``text`` on one line of a table: control and format characters (a newline, a tab, an escape sequence, a
    right-to-left override in a file name) written as backslash escapes, as ``ls -b`` shows them; everything
    else, non-ASCII letters included, as it is. ``--json`` keeps the names exact."""
    import unicodedata

    if text.isprintable():
        return text
    return "".join(
        _ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
        if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp", "Cs")
        else c
        for c in text
    )


def display_width(text: str) -> int:
    """The columns ``text`` takes on a terminal: 2 for a wide or full-width character (CJK, most emoji), 0 for a
    combining mark or a variation selector, 1 for the rest (``str.ljust`` counts characters, so a name with
    an emoji once shifted every column after it)."""
    import unicodedata

    width = 0
    for c in text:
        if unicodedata.combining(c) or unicodedata.category(c) in ("Mn", "Me") or c == "\u200b":
            continue
        width += 2 if unicodedata.east_asian_width(c) in ("W", "F") else 1
    return width


def ip_rows(what: str, folder: str | None) -> list[dict[str, Any]]:
    """The CLIP vision encoders (``what`` "clip-vision") or IP-Adapters ("ip-adapters") of ``folder``, named as the
    server lists them (their path in the folder), in the other kinds' shape (name, kind, source, path, detail) with
    what the tensors' shapes say: an encoder's ``width``, ``layers`` and ``projection`` (None: none), an adapter's
    ``adapter_kind`` (plain, plus, full) and ``reads_width`` (the CLIP width it reads: the image embedding for
    plain, the hidden states for the others). A file that cannot be read keeps its row, with its one-line
    ``error`` (None for the others). A missing folder is a UsageError."""
    from pathlib import Path

    from ..errors import SdengineError
    from ..server.catalog import Catalog
    from ..server.ip_adapters import adapter_file_kind, encoder_file_info

    if folder is None:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{FOLDER_KINDS[what]} folder {folder!r} does not exist or is not a folder")
    if what == "clip-vision":
        entries = Catalog(None, None, None, clip_vision_dir=root).clip_visions()
    else:
        entries = Catalog(None, None, None, ip_adapters_dir=root).ip_adapters()
    rows = []
    for e in entries:
        path = Path(e.ref)
        row: dict[str, Any] = {"name": e.name, "kind": what, "source": str(root), "path": str(path)}
        keys = ("width", "layers", "projection") if what == "clip-vision" else ("adapter_kind", "reads_width")
        row.update(dict.fromkeys(keys), error=None)
        form = "folder" if path.is_dir() else f"{path.suffix.lower()[1:]} file"
        try:
            if what == "clip-vision":
                info = encoder_file_info(path)
                row.update(info)
                proj = f"projection {info['projection']}" if info["projection"] else "no projection"
                row["detail"] = f"CLIP vision, width {info['width']}, {info['layers']} layers, {proj}, {form}"
            else:
                kind, width = adapter_file_kind(path)
                reads = "image embedding" if kind == "plain" else "hidden states"
                row.update(adapter_kind=kind, reads_width=width)
                row["detail"] = f"{ADAPTER_KINDS[kind]}, reads CLIP {reads} of width {width}, {form}"
        except (SdengineError, OSError) as err:
            row["error"] = str(err).splitlines()[0] if str(err) else type(err).__name__
            row["detail"] = f"unreadable: {row['error']}"
        rows.append(row)
    return rows


def _table(rows: list[list[str]]) -> str:
    rows = [[printable(c) for c in r] for r in rows]
    widths = [max(display_width(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c + " " * (w - display_width(c)) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def run(a: argparse.Namespace) -> int:
    from ..catalog import list_entries

    what = a.what
    for kind, words in FOLDER_KINDS.items():
        flag = f"--{kind}-dir"  # a folder of another kind was once ignored without a word
        if kind != what and getattr(a, f"{kind.replace('-', '_')}_dir", None) is not None:
            raise UsageError(
                f"{flag} is where {words} are: it changes nothing in 'list {what}' (did you mean "
                f"'sdengine list {kind} {flag} DIR'?)"
            )
    note = ""
    if what == "samplers":
        rows = sampler_rows()
        text_rows = [["NAME", "A1111 NAME", "SCHEDULES", "NOISE"]] + [
            [r["name"], r["a1111"], ", ".join(r["schedules"]), "stochastic" if r["stochastic"] else "deterministic"]
            for r in rows
        ]
        note = (
            "--sampler takes either name; A1111's combined names (e.g. 'DPM++ 2M Karras', 'Euler a') "
            "select a sampler with its schedule"
        )
    elif what == "schedules":
        rows = schedule_rows()
        text_rows = [["NAME", "A1111 NAME"]] + [[r["name"], r["a1111"]] for r in rows]
        note = "normal = the model's own timestep spacing ('Automatic' in A1111)"
    elif what in ("clip-vision", "ip-adapters"):
        flag = f"--{what}-dir"
        rows = ip_rows(what, getattr(a, f"{what.replace('-', '_')}_dir"))
        text_rows = [["NAME", "SOURCE", "WHAT", "PATH"]] + [
            [r["name"], r["source"], r["detail"], r["path"]] for r in rows
        ]
        if not rows:
            note = f"no {FOLDER_KINDS[what]} found" + (
                "" if getattr(a, f"{what.replace('-', '_')}_dir") else f" (give {flag} FOLDER)"
            )
        elif any(r["error"] for r in rows):
            note = f"{sum(bool(r['error']) for r in rows)} file(s) could not be read (WHAT says why)"
    else:
        folder = {
            "models": a.models_dir,
            "loras": a.loras_dir,
            "controlnets": a.controlnets_dir,
            "embeddings": a.embeddings_dir,
        }[what]
        entries = list_entries(what, folder)
        rows = [e.as_dict() for e in entries]
        text_rows = [["NAME", "SOURCE", "WHAT", "PATH"]] + [[e.name, e.source, e.detail, e.path] for e in entries]
        if what == "embeddings":
            note = EMBEDDINGS_NOTE if entries else f"no embeddings (give --embeddings-dir FOLDER); {EMBEDDINGS_NOTE}"
        elif not entries:
            note = f"no {what} found"
    if a.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        if len(text_rows) > 1:
            print(_table(text_rows))
    if note and not (a.json and what in ("samplers", "schedules")):
        print(note, file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    p = sub.add_parser(
        "list",
        help="list models, samplers, schedules, LoRAs, ControlNets, embeddings, CLIP vision encoders or IP-Adapters",
        description="List what can be picked by name: built-in models, ControlNets and LoRAs (shipped with "
        "sdengine), the files in the folders given, and the samplers and schedules with their A1111 names.",
    )
    p.add_argument("what", choices=WHAT, help="what to list")
    p.add_argument("--models-dir", default=None, metavar="DIR", help="also list the models in DIR")
    p.add_argument("--loras-dir", default=None, metavar="DIR", help="also list the LoRAs in DIR")
    p.add_argument("--controlnets-dir", default=None, metavar="DIR", help="also list the ControlNets in DIR")
    p.add_argument("--embeddings-dir", default=None, metavar="DIR", help="list the embedding files in DIR")
    p.add_argument("--clip-vision-dir", default=None, metavar="DIR", help="list the CLIP vision encoders in DIR")
    p.add_argument("--ip-adapters-dir", default=None, metavar="DIR", help="list the IP-Adapter files in DIR")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(func=run)
