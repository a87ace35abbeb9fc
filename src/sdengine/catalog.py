"""What a user can pick by name: the built-in models, ControlNets and LoRAs shipped in ``sdengine/assets``,
and the model, LoRA, ControlNet and embedding files in folders the user names.

Only the file system is read (no torch, no weights loaded), so listing is instant. A shipped folder is
classified by its config: ``model_index.json`` is a Stable Diffusion pipeline, a ``config.json`` whose
``_class_name`` is ``ControlNetModel`` is a ControlNet, ``"format": "sdengine-pixel-ddpm"`` is a pixel DDPM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdengine.errors import UsageError
from sdengine.io.paths import is_inside, walk_folders_once

ASSETS = Path(__file__).parent / "assets"
# Kinds whose loaders look names up at any depth of their folder (LoRAs, embeddings), so listed at any depth
RECURSIVE_KINDS = ("loras", "embeddings")
# A model's own VAE beside it (NAME.vae.safetensors), not a model
VAE_SUFFIXES = (".vae.safetensors", ".vae.ckpt", ".vae.pt")
KINDS = ("models", "loras", "controlnets", "embeddings")
# The subfolder of a model folder holding its tiny VAE (an AutoencoderTiny folder, sdengine.models.tiny_vae);
# load_pipeline loads it with the model; diffusers ignores it.
TINY_VAE_FOLDER = "vae_tiny"

# Weight files each kind can be given as (a folder is also accepted for models and ControlNets).
WEIGHT_SUFFIXES: dict[str, tuple[str, ...]] = {
    "models": (".safetensors", ".ckpt"),
    "loras": (".safetensors", ".pt", ".ckpt", ".pth", ".bin"),  # what <lora:NAME> finds (weights.lora_file)
    "controlnets": (".safetensors", ".pth", ".ckpt"),
    "embeddings": (".safetensors", ".pt", ".bin"),
}


@dataclass(frozen=True)
class Entry:
    """One item of a listing: its name (what the user types), its kind and where it is."""

    name: str
    kind: str  # models, loras, controlnets, embeddings
    source: str  # "built-in" or the folder it was found in
    path: str
    detail: str = ""  # what it is: "Stable Diffusion (diffusers folder)", "pixel DDPM", a file size, ...

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _classify_folder(folder: Path) -> tuple[str, str] | None:
    """(kind, detail) of a model folder, or None when it is not one sdengine reads."""
    if (folder / "model_index.json").is_file():
        index = _read_json(folder / "model_index.json")
        text = index.get("text_encoder", [None, None])
        encoder = text[1] if isinstance(text, list) and len(text) == 2 else None
        extras = ([f"text encoder {encoder}"] if encoder else []) + (
            ["tiny VAE"] if (folder / TINY_VAE_FOLDER / "config.json").is_file() else []  # sdengine.models.tiny_vae
        )
        return "models", f"Stable Diffusion (diffusers folder{''.join(', ' + x for x in extras)})"
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    if config.get("_class_name") == "ControlNetModel":
        return "controlnets", "ControlNet (diffusers folder)"
    if config.get("_class_name") == "T2IAdapter":  # goes wherever a ControlNet goes (sdengine.control.adapter_files)
        return "controlnets", "T2I-Adapter (diffusers folder)"
    if config.get("format") == "sdengine-pixel-ddpm":
        classes = config.get("class_names") or []
        return "models", "pixel DDPM" + (f" ({len(classes)} classes)" if classes else "")
    return None


def builtin_entries() -> list[Entry]:
    """Everything shipped in the package, by the name that selects it."""
    out: list[Entry] = []
    models = ASSETS / "models"
    if models.is_dir():
        for folder in sorted(p for p in models.iterdir() if p.is_dir()):
            found = _classify_folder(folder)
            if found is not None:
                out.append(Entry(folder.name, found[0], "built-in", str(folder), found[1]))
    loras = ASSETS / "loras"
    if loras.is_dir():
        for f in sorted(loras.glob("*.safetensors")):
            out.append(Entry(f.stem, "loras", "built-in", str(f), "LoRA (safetensors)"))
    return out


def builtin_names(kind: str) -> list[str]:
    """The names of the shipped entries of ``kind`` ("models", "loras", "controlnets", ...)."""
    return [e.name for e in builtin_entries() if e.kind == kind]


def builtin_path(kind: str, name: str) -> Path | None:
    """The shipped file or folder of ``kind`` called exactly ``name``, or None. Only the catalog's own names
    match, so a name from a prompt can select nothing outside the shipped assets."""
    return next((Path(e.path) for e in builtin_entries() if e.kind == kind and e.name == name), None)


def _size(path: Path) -> str:
    n = float(path.stat().st_size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # not reached


def folder_entries(kind: str, folder: str | Path) -> list[Entry]:
    """The files (and, for models and ControlNets, model folders) of ``kind`` in ``folder``: directly in it for
    models and ControlNets, at any depth for LoRAs and embeddings (where their loaders look names up).

    A missing folder is a :class:`UsageError` (a typo should not look like "nothing there")."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    root = Path(folder)
    if not root.is_dir():
        raise UsageError(f"{kind} folder {str(folder)!r} does not exist or is not a folder")
    out: list[Entry] = []
    if kind in RECURSIVE_KINDS:
        return _files_under(kind, root)
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        if kind == "models" and p.name.lower().endswith(VAE_SUFFIXES):
            continue  # the VAE beside a model (A1111 leaves these out of its checkpoint list too)
        if p.is_file() and p.suffix.lower() in WEIGHT_SUFFIXES[kind]:
            out.append(Entry(p.stem, kind, str(root), str(p), f"{p.suffix.lower()[1:]} file, {_size(p)}"))
        elif p.is_dir() and kind in ("models", "controlnets"):
            found = _classify_folder(p)
            if found is not None and found[0] == kind:
                out.append(Entry(p.name, kind, str(root), str(p), found[1]))
    return _unambiguous(out)


def _unambiguous(entries: list[Entry]) -> list[Entry]:
    """Files that share a name (``dup.safetensors`` and ``dup.ckpt``, or a file and a folder ``dup``) are listed
    by their file name with its suffix, the name that selects exactly that one; a bare shared name is refused
    by the loaders (see :func:`ambiguous_files`), never resolved to one of them silently."""
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name.lower()] = counts.get(e.name.lower(), 0) + 1
    out = []
    for e in entries:
        p = Path(e.path)
        if counts[e.name.lower()] > 1 and p.is_file():
            name = e.name + p.suffix  # keeps a LoRA's sub-folder path
            e = Entry(name, e.kind, e.source, e.path, e.detail)
        out.append(e)
    return out


def ambiguous_files(folder: str | Path, name: str, suffixes: tuple[str, ...]) -> list[Path]:
    """The files ``folder/name+suffix`` for each of ``suffixes`` that exist, when more than one does (a bare name
    that would select one of them silently); [] otherwise. Loaders refuse such a name with the list."""
    if Path(name).suffix.lower() in suffixes:
        return []
    found = [Path(folder) / (name + s) for s in suffixes]
    found = [p for p in found if p.is_file()]
    return found if len(found) > 1 else []


def _files_under(kind: str, root: Path) -> list[Entry]:
    """The LoRA or embedding files at any depth under ``root``, named as the loaders look them up: a LoRA by its
    path under the folder without the suffix (``<lora:style/ink:1>``; sdengine.weights.lora_file), an embedding
    by its file stem (sdengine.text.embeddings). Linked folders are followed, each real folder once, as the
    embedding loader does; a LoRA that links out of the folder is left out, as its loader refuses it; empty
    embedding files are skipped, as A1111 and the loader do."""
    out: list[Entry] = []
    for dirpath, dirs, names in walk_folders_once(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for fname in sorted(names):
            p = Path(dirpath) / fname
            if fname.startswith(".") or p.suffix.lower() not in WEIGHT_SUFFIXES[kind]:
                continue
            try:
                if not p.is_file() or (kind == "embeddings" and p.stat().st_size == 0):
                    continue
            except OSError:
                continue
            if kind == "loras":
                if not is_inside(root, p):
                    continue
                name = p.relative_to(root).with_suffix("").as_posix()
            else:
                name = p.stem
            out.append(Entry(name, kind, str(root), str(p), f"{p.suffix.lower()[1:]} file, {_size(p)}"))
    out = sorted(out, key=lambda e: (e.name.lower(), e.path))
    return _unambiguous(out) if kind == "loras" else out  # an embedding's name is its stem (two files: an error)


def list_entries(kind: str, folder: str | Path | None = None) -> list[Entry]:
    """Built-in items of ``kind`` first, then those in ``folder`` (when given)."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)}")
    entries = [e for e in builtin_entries() if e.kind == kind]
    if folder is not None:
        entries += folder_entries(kind, folder)
    return entries


__all__ = [
    "ASSETS",
    "KINDS",
    "WEIGHT_SUFFIXES",
    "Entry",
    "ambiguous_files",
    "builtin_entries",
    "builtin_path",
    "folder_entries",
    "list_entries",
]
