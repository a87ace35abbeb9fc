"""Textual-inversion embeddings (Gal et al. 2022): learned token vectors used by name in a prompt.

A file holds one embedding: ``n`` vectors as wide as the text encoder's token embeddings (768 for SD 1.x,
1024 for SD 2.x). The formats read (:func:`read_embedding`):

* AUTOMATIC1111's ``.pt``: a pickle with ``string_to_param`` (one entry, ``(n, D)``; a plain dict, or the
  ``nn.ParameterDict`` the original textual-inversion code saved), read with the weights-only unpickler of
  :mod:`sdengine.weights.io`, never an unrestricted one;
* AUTOMATIC1111's / kohya's ``.safetensors``: ``{"emb_params": (n, D)}``;
* diffusers' ``learned_embeds.safetensors`` / ``.bin``: ``{token: (D,) or (n, D)}``;
* SDXL (A1111, kohya): ``{"clip_l": (n, 768), "clip_g": (n, 1280)}``, one half per text encoder: an SDXL model
  keeps one library per encoder, each reading its ``part``.

An embeddings folder (:class:`EmbeddingLibrary`) follows A1111: every ``.pt``/``.bin``/``.safetensors``
file under it (sub-folders too, empty files skipped) is an embedding named by its file stem; a prompt
uses it by writing the name as a word. The match is on tokens, as in A1111: the name is tokenised like
the prompt and each run of the prompt's ids equal to the name's ids (longest name first) becomes the
embedding's ``n`` vectors, weighted like the text around it, counted towards the 75-token chunks and
never split across two of them. A file is read when a prompt first names it, so one broken or
foreign file in a folder only fails the prompts that use it, with a one-line :class:`EmbeddingError`
(A1111 instead leaves such a name as plain text, with a note in its console).

How the vectors reach the encoder: each loaded embedding gets ids past the vocabulary (the way diffusers
adds tokens); :meth:`sdengine.text.clip_tokenizer.CLIPTokenizer.with_embeddings` rewrites the name's ids
into them, and :meth:`sdengine.models.clip_text.CLIPTextModel.set_extra_tokens` looks them up. Every
caller of the tokenizer and the encoder (emphasis, chunks, BREAK, prompt editing, training captions)
sees embeddings without knowing about them.

The hash written to infotext (``TI hashes``) is A1111's: the first 12 hex digits of the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import SdengineError
from sdengine.io.paths import walk_folders_once
from sdengine.text.clip_tokenizer import CHUNK_LENGTH, CLIPTokenizer
from sdengine.weights.io import load_pickle_checkpoint, load_safetensors

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
MAX_VECTORS = CHUNK_LENGTH  # an embedding must fit in one 75-token chunk
KNOWN_WIDTHS = "SD 1.x: 768, SD 2.x: 1024"
MAX_MAGNITUDE = 1e4  # the bound LoRA files get too (sdengine.weights.lora_file)


class EmbeddingError(SdengineError, ValueError):
    """A textual-inversion embedding that cannot be used: no embedding in the file, several, a width that
    does not fit the model's text encoder, two files for one name."""


class EmbeddingsUnsupported(EmbeddingError):
    """An embeddings folder given for a model without a CLIP text encoder (MiniLM, a pixel DDPM)."""


def embedding_hash(path: str | os.PathLike[str]) -> str:
    """A1111's short hash of an embedding file: the first 12 hex digits of its SHA-256."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def _read_any(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return load_safetensors(path)
    if suffix in (".pt", ".bin"):
        # The original textual-inversion code (Gal et al.) pickled its vectors in an nn.ParameterDict: a plain
        # container (its state is a dict of Parameters), allowed here and nowhere else.
        return load_pickle_checkpoint(path, allow=[torch.nn.ParameterDict])
    raise EmbeddingError(f"{path}: not an embedding file (use {', '.join(EMBEDDING_SUFFIXES)})")


SDXL_PARTS = ("clip_l", "clip_g")  # an SDXL embedding's vectors for its first (CLIP-L) and second (bigG) encoder


def embedding_vectors(obj: Mapping[str, Any], where: str = "<embedding>", part: str | None = None) -> Tensor:
    """The ``(n, D)`` float32 vectors of a loaded embedding file (see the module notes for the formats).
    ``part``: for an SDXL model, which encoder's vectors of an SDXL file (``clip_l`` or ``clip_g``)."""
    sdxl = all(isinstance(obj.get(k), Tensor) for k in SDXL_PARTS)
    if part is not None:
        if part not in SDXL_PARTS:
            raise ValueError(f"part must be one of {SDXL_PARTS}, got {part!r}")
        if not sdxl:
            raise EmbeddingError(
                f"{where}: not an SDXL embedding (no clip_l and clip_g tensors); an SD 1.x/2.x embedding does not "
                "fit SDXL's text encoders"
            )
        counts = {k: int(obj[k].shape[0]) if obj[k].ndim == 2 else 1 for k in SDXL_PARTS}
        if counts["clip_l"] != counts["clip_g"]:
            raise EmbeddingError(
                f"{where}: clip_l has {counts['clip_l']} vectors but clip_g {counts['clip_g']}; they must match"
            )
        return embedding_vectors({part: obj[part]}, where)
    if "clip_l" in obj and "clip_g" in obj:
        raise EmbeddingError(
            f"{where}: an SDXL embedding (clip_l and clip_g); it does not fit an SD 1.x/2.x text encoder"
        )
    if "string_to_param" in obj:
        params = obj["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict keeps its entries there
        if not isinstance(params, Mapping):
            raise EmbeddingError(f"{where}: 'string_to_param' is a {type(params).__name__}, not a mapping")
        found = [(str(k), v) for k, v in params.items() if isinstance(v, Tensor)]
        what = "'string_to_param' entries"
    else:
        found = [(str(k), v) for k, v in obj.items() if isinstance(v, Tensor)]
        what = "tensors"
    # counted before the names meet in a dict: the keys 0 and "0" are two tensors, not one
    tensors = dict(found)
    if not found:
        raise EmbeddingError(
            f"{where}: holds no embedding (expected A1111's string_to_param or emb_params, or diffusers' "
            f"{{token: tensor}}; top-level keys: {sorted(map(str, obj))[:8]})"
        )
    if len(found) > 1:
        raise EmbeddingError(
            # repr: a key is any text (a newline in one would break the one-line message)
            f"{where}: holds {len(found)} {what} ({', '.join(sorted(repr(k) for k, _ in found)[:4])}); "
            "an embedding file has one"
        )
    (key, vec), *_ = tensors.items()
    if vec.ndim == 1:
        vec = vec.unsqueeze(0)  # diffusers writes one vector as (D,)
    if vec.ndim != 2 or vec.shape[0] == 0 or vec.shape[1] == 0:
        raise EmbeddingError(f"{where}: {key!r} has shape {tuple(vec.shape)}, expected (vectors, width)")
    if not vec.is_floating_point():
        raise EmbeddingError(f"{where}: {key!r} holds {vec.dtype} numbers, not floating-point vectors")
    if vec.shape[0] > MAX_VECTORS:
        raise EmbeddingError(f"{where}: {vec.shape[0]} vectors; at most {MAX_VECTORS} fit in a prompt chunk")
    vec = vec.detach().to(device="cpu", dtype=torch.float32).clone()
    if not bool(torch.isfinite(vec).all()):
        raise EmbeddingError(f"{where}: {key!r} contains NaN or infinite values")
    if float(vec.abs().max()) > MAX_MAGNITUDE:
        # Token vectors are of order 0.01..1; 1e30 would saturate every attention softmax (a black image).
        raise EmbeddingError(f"{where}: {key!r} has values of {float(vec.abs().max()):.3g}, over {MAX_MAGNITUDE:g}")
    return vec


def read_embedding(path: str | os.PathLike[str], width: int | None = None, part: str | None = None) -> Tensor:
    """The ``(n, D)`` float32 vectors of an embedding file; with ``width``, refused unless ``D == width``;
    ``part`` (``clip_l``/``clip_g``): one encoder's vectors of an SDXL embedding."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: no such embedding file")
    vec = embedding_vectors(_read_any(path), str(path), part)
    if width is not None and vec.shape[1] != width:
        raise EmbeddingError(
            f"{path.name}: the embedding is {vec.shape[1]} wide but the text encoder is {width} wide "
            f"({KNOWN_WIDTHS}): it was made for another model"
        )
    return vec


def save_embedding(path: str | os.PathLike[str], vectors: Tensor) -> Path:
    """Write ``vectors`` (n, D) as ``{"emb_params": vectors}`` safetensors, the file A1111, diffusers'
    ``load_textual_inversion`` and sdengine all read."""
    from sdengine.weights.io import save_safetensors

    path = Path(path)
    save_safetensors({"emb_params": vectors.detach().float().cpu().contiguous()}, path)
    return path


def list_embedding_files(directory: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Embedding name (file stem) -> its files under ``directory`` (sub-folders too; empty files skipped, as
    A1111 does). A name with two files is an error only when a prompt uses it."""
    files: dict[str, list[Path]] = {}
    for root, dirs, names in walk_folders_once(directory):  # linked folders followed (as A1111 does), each once
        dirs.sort()
        for fname in sorted(names):
            f = Path(root) / fname
            if f.suffix.lower() not in EMBEDDING_SUFFIXES:
                continue
            try:
                if f.stat().st_size == 0:
                    continue
            except OSError:
                continue
            files.setdefault(f.stem, []).append(f)
    return dict(sorted(files.items(), key=lambda kv: kv[0].lower()))


def folder_summary(directory: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """A1111's ``GET /sdapi/v1/embeddings`` answer for a folder: ``{"loaded": {name: {"step", "sd_checkpoint",
    "sd_checkpoint_name", "shape", "vectors"}}, "skipped": {...}}``. Without a model at hand, "skipped" holds the
    files that cannot be read as an embedding at all (A1111 also skips those of another width)."""
    loaded: dict[str, Any] = {}
    skipped: dict[str, Any] = {}
    for name, paths in list_embedding_files(directory).items():
        info: dict[str, Any] = {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
        try:
            if len(paths) > 1:
                raise EmbeddingError("two files")
            obj = _read_any(paths[0])
            if all(isinstance(obj.get(k), Tensor) for k in SDXL_PARTS):
                # A1111's numbers for an SDXL file: both widths added, clip_g's vector count
                halves = [embedding_vectors(obj, str(paths[0]), part) for part in SDXL_PARTS]
                shape, vectors = sum(int(h.shape[1]) for h in halves), int(halves[1].shape[0])
            else:
                vec = embedding_vectors(obj, str(paths[0]))
                shape, vectors = int(vec.shape[1]), int(vec.shape[0])
        except SdengineError:
            skipped[name] = {**info, "shape": None, "vectors": 0}
            continue
        loaded[name] = {**info, "shape": shape, "vectors": vectors}
    return {"loaded": loaded, "skipped": skipped}


def check_recorded_embeddings(recorded: str, directory: str | os.PathLike[str] | None, source: str) -> None:
    """An infotext's ``TI hashes`` against a folder: every embedding it names must be there with the same hash
    (else the names would be read as plain words, or as other vectors, and the image would differ silently)."""
    from sdengine.metadata import parse_lora_hashes

    wanted = parse_lora_hashes(recorded)
    if directory is None:
        raise EmbeddingError(
            f"{source} was made with textual-inversion embeddings ({', '.join(wanted)}): give --embeddings-dir"
        )
    files = list_embedding_files(directory)
    for name, h in wanted.items():
        paths = files.get(name)
        if not paths:
            raise EmbeddingError(f"{source} uses the embedding {name!r}, which is not in {directory}")
        if len(paths) == 1 and h and embedding_hash(paths[0]) != h:
            raise EmbeddingError(
                f"{source} uses the embedding {name!r} with hash {h}; {paths[0]} has {embedding_hash(paths[0])}"
            )


def find_words(ids: list[int], lookup: Mapping[int, list[tuple[list[int], str]]]) -> Iterator[tuple[int, int, str]]:
    """(start, length, name) of each word of ``lookup`` (first id -> [(ids, name)], longest first) in ``ids``,
    left to right, as A1111's ``find_embedding_at_position`` scans a prompt."""
    i = 0
    while i < len(ids):
        for name_ids, name in lookup.get(ids[i], ()):
            if ids[i : i + len(name_ids)] == name_ids:
                yield i, len(name_ids), name
                i += len(name_ids)
                break
        else:
            i += 1


@dataclass(frozen=True)
class Embedding:
    """One loaded embedding: its name, file, vectors and the ids its vectors have in the encoder."""

    name: str
    path: Path
    vectors: Tensor  # (n, D) float32
    first_id: int  # ids first_id .. first_id + n - 1 stand for the vectors
    hash: str  # A1111's short hash (embedding_hash)

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.first_id + self.vectors.shape[0]))


class EmbeddingLibrary:
    """An embeddings folder bound to one model's tokenizer and CLIP text encoder (see the module notes).

    ``tokenizer`` is the model's plain tokenizer (names are tokenised with it); give the model
    ``tokenizer.with_embeddings(library)``. The folder is listed again when its modification time changes
    (a file added or removed), as A1111 does; a file that changed is read again when next used.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        tokenizer: CLIPTokenizer,
        text_encoder: Any,
        model_name: str,
        part: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.part = part  # SDXL: the encoder's vectors of each file, "clip_l" or "clip_g" (embedding_vectors)
        if not self.directory.is_dir():
            raise EmbeddingError(f"embeddings folder {self.directory} does not exist or is not a folder")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.model_name = model_name
        self.width = int(text_encoder.config.hidden_size)
        # The encoder reads id i >= its vocabulary size as extra vector i - vocab_size (CLIPTextModel.set_extra_tokens).
        self.base_id = int(text_encoder.config.vocab_size)
        self._lock = threading.RLock()
        self._mtime: int | None = None
        self._files: dict[str, list[Path]] = {}
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        self._clashes: dict[str, list[str]] = {}
        self._loaded: dict[tuple[str, int, int], Embedding] = {}  # (path, size, mtime) -> embedding
        self._by_id: dict[int, Embedding] = {}
        self._table: list[Tensor] = []
        # ComfyUI's spelling, "embedding:NAME" (optionally NAME.pt ...): the prefix and suffix tokens go too.
        self._comfy_prefix = tokenizer.encode("embedding:")
        self._comfy_paths: dict[str, list[int]] = {}  # name -> ids of "embedding:sub/" (a file in a subfolder)
        self._comfy_suffixes = sorted((tokenizer.encode(s) for s in EMBEDDING_SUFFIXES), key=len, reverse=True)
        self.refresh()

    # -- the folder ---------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """List the folder again if it changed since the last listing."""
        with self._lock:
            try:
                mtime = self.directory.stat().st_mtime_ns
            except OSError as e:
                raise EmbeddingError(f"embeddings folder {self.directory}: {e.strerror or e}") from None
            if mtime == self._mtime:
                return
            files = list_embedding_files(self.directory)
            by_ids: dict[tuple[int, ...], list[str]] = {}
            for name in files:
                ids = tuple(self.tokenizer.encode(name))
                if ids:
                    by_ids.setdefault(ids, []).append(name)
            lookup: dict[int, list[tuple[list[int], str]]] = {}
            clashes: dict[str, list[str]] = {}
            for ids, names in by_ids.items():
                lookup.setdefault(ids[0], []).append((list(ids), names[0]))
                if len(names) > 1:  # "EasyNegative" and "easynegative": one word to the tokenizer
                    clashes[names[0]] = names
            for entries in lookup.values():
                entries.sort(key=lambda e: len(e[0]), reverse=True)  # the longest name wins, as in A1111
            # ComfyUI's "embedding:sub/name" for a file in a subfolder (its /embeddings lists it so): those ids too
            paths = {}
            for name, found in files.items():
                parent = found[0].parent.relative_to(self.directory).as_posix()
                if len(found) == 1 and parent != ".":
                    paths[name] = self.tokenizer.encode(f"embedding:{parent}/")
            self._files, self._lookup, self._clashes, self._mtime = files, lookup, clashes, mtime
            self._comfy_paths = paths

    @property
    def names(self) -> list[str]:
        """The embedding names the folder offers (file stems), sorted."""
        self.refresh()
        return sorted(self._files, key=str.lower)

    # -- loading --------------------------------------------------------------------------------------------

    def load(self, name: str) -> Embedding:
        """The embedding called ``name``, read (and checked against the text encoder's width) on first use."""
        with self._lock:
            if name in self._clashes:
                raise EmbeddingError(
                    f"the embeddings {', '.join(map(repr, self._clashes[name]))} in {self.directory} are one word to "
                    "the tokenizer (names are read in lower case): rename one"
                )
            paths = self._files.get(name)
            if not paths:
                raise EmbeddingError(f"no embedding named {name!r} in {self.directory}")
            if len(paths) > 1:
                listed = ", ".join(str(p.relative_to(self.directory)) for p in paths)
                raise EmbeddingError(f"two files for the embedding {name!r} in {self.directory}: {listed}; rename one")
            path = paths[0]
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key in self._loaded:
                return self._loaded[key]
            vectors = read_embedding(path, width=self.width, part=self.part)
            first = self.base_id + sum(t.shape[0] for t in self._table)
            emb = Embedding(name, path, vectors, first, embedding_hash(path))
            self._table.append(vectors)
            self._loaded[key] = emb
            for i in emb.ids:
                self._by_id[i] = emb
            param = next(iter(self.text_encoder.parameters()))
            self.text_encoder.set_extra_tokens(torch.cat(self._table).to(param.device))
            return emb

    # -- what the tokenizer asks (sdengine.text.clip_tokenizer.TokenRewriter) -----------------------------------

    def _matches(self, ids: list[int]) -> Iterable[tuple[int, int, str]]:
        return find_words(ids, self._lookup)

    def rewrite(self, ids: list[int]) -> list[int]:
        """``ids`` with each embedding name replaced by its vectors' ids."""
        self.refresh()
        with self._lock:
            out: list[int] = []
            pos = 0
            prefix = self._comfy_prefix
            for start, length, name in self._matches(ids):
                end = start + length
                path = self._comfy_paths.get(name, prefix)
                if path is not prefix and not (start - len(path) >= pos and ids[start - len(path) : start] == path):
                    path = prefix
                if start - len(path) >= pos and ids[start - len(path) : start] == path:
                    start -= len(path)
                    end += next((len(s) for s in self._comfy_suffixes if ids[end : end + len(s)] == s), 0)
                out += ids[pos:start]
                out += self.load(name).ids
                pos = end
            return out + ids[pos:]

    @property
    def groups(self) -> dict[int, int]:
        """First id -> number of vectors of every loaded embedding (runs kept in one chunk)."""
        with self._lock:
            return {e.first_id: e.vectors.shape[0] for e in self._loaded.values()}

    def describe(self, token_id: int) -> str | None:
        """The name of the embedding whose first vector ``token_id`` is (None for its other vectors)."""
        emb = self._by_id.get(token_id)
        return emb.name if emb is not None and emb.first_id == token_id else None

    # -- infotext -------------------------------------------------------------------------------------------

    def used(self, *texts: str) -> dict[str, str]:
        """``{name: hash}`` of the embeddings the texts name, in order of first use (A1111's ``TI hashes``)."""
        from sdengine.prompts import extract_lora_tags

        self.refresh()
        out: dict[str, str] = {}
        for text in texts:
            ids = self.tokenizer.encode(extract_lora_tags(text)[0])  # <lora:NAME> is not a use of NAME
            for _, _, name in self._matches(ids):
                if name not in out:
                    out[name] = self.load(name).hash
        return out


class FixedWords:
    """A rewriter for given words and ids (no folder): ``{word: ids}``, matched on tokens like a folder's
    names. The textual-inversion trainer uses it to put its trainable vectors in the word's place."""

    def __init__(self, words: Mapping[str, list[int]], tokenizer: CLIPTokenizer) -> None:
        self.words = {name: list(ids) for name, ids in words.items()}
        self._lookup: dict[int, list[tuple[list[int], str]]] = {}
        for name in self.words:
            name_ids = tokenizer.encode(name)
            if not name_ids:
                raise EmbeddingError(f"the word {name!r} has no tokens")
            self._lookup.setdefault(name_ids[0], []).append((name_ids, name))
        for entries in self._lookup.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def rewrite(self, ids: list[int]) -> list[int]:
        out: list[int] = []
        pos = 0
        for start, length, name in find_words(ids, self._lookup):
            out += ids[pos:start] + self.words[name]
            pos = start + length
        return out + ids[pos:]

    @property
    def groups(self) -> dict[int, int]:
        return {ids[0]: len(ids) for ids in self.words.values() if ids}

    def describe(self, token_id: int) -> str | None:
        return next((name for name, ids in self.words.items() if ids and ids[0] == token_id), None)


__all__ = [
    "EMBEDDING_SUFFIXES",
    "FixedWords",
    "check_recorded_embeddings",
    "find_words",
    "folder_summary",
    "list_embedding_files",
    "MAX_VECTORS",
    "SDXL_PARTS",
    "Embedding",
    "EmbeddingError",
    "EmbeddingLibrary",
    "EmbeddingsUnsupported",
    "embedding_hash",
    "embedding_vectors",
    "read_embedding",
    "save_embedding",
]
