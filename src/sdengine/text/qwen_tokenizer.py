"""Qwen2's tokenizer (Qwen-Image's ``tokenizer/``): prompts -> token ids and attention mask, with HF ``tokenizers``.

Qwen2 tokenizes with byte-level BPE (GPT-2's scheme): the text is NFC-normalised, split by Qwen2's regex (English
contractions, letter runs with at most one leading non-letter, single digits, punctuation runs, newlines, spaces),
each piece's UTF-8 bytes mapped to printable characters, then merged by ``merges.txt``'s ranked pairs into pieces of
``vocab.json``. The chat markers (``<|im_start|>``, ``<|im_end|>``, ``<|endoftext|>``, ...) are added tokens: matched
in the raw text before anything else, one id each. No token is added at the start or end (no BOS / EOS).

The batch rule is transformers' ``Qwen2Tokenizer`` called with ``padding=True, truncation=True, max_length=N``
(what diffusers' ``QwenImagePipeline`` calls): each text keeps its first ``N`` tokens, and every row is padded to
the longest row with the pad token (``<|endoftext|>`` unless ``tokenizer_config.json`` names another) on the side
``tokenizer_config.json``'s ``padding_side`` says (right by default); the mask is 1 over tokens, 0 over padding.

A folder is read as transformers reads it: ``tokenizer.json`` when present (its own padding and truncation settings
ignored); otherwise ``vocab.json`` + ``merges.txt`` with the added tokens of ``tokenizer_config.json``'s
``added_tokens_decoder`` (and ``added_tokens.json``), each of which must get the id the file gives it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from sdengine.errors import UsageError

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
ADDED_TOKENS_FILE = "added_tokens.json"
PAD_TOKEN = "<|endoftext|>"  # Qwen2Tokenizer's default pad token
MAX_LENGTH_LIMIT = 131072  # Qwen2.5-VL's longest context; this only bounds a call
# Qwen2's pre-tokenizer split (transformers' Qwen2Tokenizer PRETOKENIZE_REGEX)
SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


class QwenTokenizerError(UsageError):
    """A tokenizer folder that cannot be read as Qwen2's tokenizer, or a bad tokenizer call."""


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise QwenTokenizerError(f"{path}: cannot read the {what} ({type(e).__name__})") from None


def _token_text(value: Any) -> str | None:
    """A token named in tokenizer_config.json: a string or an AddedToken-like object with ``content``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _byte_level_bpe(folder: Path) -> Tokenizer:
    """Qwen2's BPE pipeline from ``vocab.json`` + ``merges.txt`` (see the module docstring)."""
    vocab_path, merges_path = folder / VOCAB_FILE, folder / MERGES_FILE
    vocab = _read_json(vocab_path, "vocabulary")
    if not isinstance(vocab, dict) or not all(isinstance(k, str) and type(v) is int for k, v in vocab.items()):
        raise QwenTokenizerError(f"{vocab_path}: not a vocabulary (an object of piece -> integer id)")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise QwenTokenizerError(f"{merges_path}: cannot read the merges ({type(e).__name__})") from None
    merges: list[tuple[str, str]] = []
    for number, line in enumerate(lines, 1):
        if (number == 1 and line.startswith("#version")) or not line.strip():
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise QwenTokenizerError(f"{merges_path}:{number}: a merge must be two pieces separated by one space")
        merges.append((parts[0], parts[1]))
    try:
        backend = Tokenizer(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix=""))
    except Exception as e:  # tokenizers raises plain Exception on merges naming pieces outside the vocabulary
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise QwenTokenizerError(f"{folder}: vocab.json and merges.txt do not fit ({first[:120]})") from None
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_declared_tokens(backend: Tokenizer, folder: Path, config: dict[str, Any]) -> None:
    """The added tokens of ``tokenizer_config.json`` (``added_tokens_decoder``) and ``added_tokens.json``, added in
    id order; each must get the id its file gives (a vocabulary they do not follow is refused)."""
    declared: dict[int, dict[str, Any]] = {}
    table = config.get("added_tokens_decoder") or {}
    if not isinstance(table, dict):
        raise QwenTokenizerError(f"{folder / CONFIG_FILE}: added_tokens_decoder is not an object")
    for key, entry in table.items():
        content = _token_text(entry)
        if not str(key).isdigit() or content is None:
            raise QwenTokenizerError(f"{folder / CONFIG_FILE}: added token {str(key)[:40]!r} has no id or content")
        declared[int(key)] = entry if isinstance(entry, dict) else {"content": content}
    if (folder / ADDED_TOKENS_FILE).is_file():
        extra = _read_json(folder / ADDED_TOKENS_FILE, "added tokens")
        if not isinstance(extra, dict) or not all(isinstance(k, str) and type(v) is int for k, v in extra.items()):
            raise QwenTokenizerError(f"{folder / ADDED_TOKENS_FILE}: not an object of token -> integer id")
        for content, token_id in extra.items():
            declared.setdefault(token_id, {"content": content, "special": True})
    for token_id in sorted(declared):
        entry = declared[token_id]
        content = str(entry["content"])
        existing = backend.token_to_id(content)
        token = AddedToken(
            content,
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not entry.get("special", True))),
            special=bool(entry.get("special", True)),
        )
        if token.special:
            backend.add_special_tokens([token])
        else:
            backend.add_tokens([token])
        got = backend.token_to_id(content) if existing is None else existing
        if got != token_id:
            raise QwenTokenizerError(
                f"{folder}: added token {content!r} is id {token_id} in the config but {got} in this vocabulary; "
                "the files do not belong together"
            )


class QwenTokenizer:
    """Qwen2's tokenizer from a folder (see the module docstring). ``tokenizer(texts, max_length)`` -> (ids, mask)."""

    def __init__(self, backend: Tokenizer, *, pad_token: str = PAD_TOKEN, padding_side: str = "right", name: str = ""):
        if padding_side not in ("right", "left"):
            raise QwenTokenizerError(f"Qwen tokenizer: padding_side {padding_side!r} is not 'right' or 'left'")
        pad_id = backend.token_to_id(pad_token)
        if pad_id is None:
            raise QwenTokenizerError(f"{name or 'Qwen tokenizer'}: no pad token {pad_token!r} in this vocabulary")
        backend.no_padding()
        backend.no_truncation()
        self._backend = backend
        self.pad_token_id = int(pad_id)
        self.padding_side = padding_side
        self.name = name

    @classmethod
    def from_folder(cls, path: str | Path) -> QwenTokenizer:
        """A Qwen2 tokenizer folder (``tokenizer/`` of a Qwen-Image pipeline folder, or that pipeline folder)."""
        folder = Path(path)
        if (folder / "model_index.json").is_file() and (folder / "tokenizer").is_dir():
            folder = folder / "tokenizer"
        if not folder.is_dir():
            raise QwenTokenizerError(f"{folder}: no such tokenizer folder")
        config: dict[str, Any] = {}
        if (folder / CONFIG_FILE).is_file():
            data = _read_json(folder / CONFIG_FILE, "tokenizer config")
            if not isinstance(data, dict):
                raise QwenTokenizerError(f"{folder / CONFIG_FILE}: the tokenizer config is not a JSON object")
            config = data
        if (folder / TOKENIZER_FILE).is_file():
            try:
                backend = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            except Exception as e:  # tokenizers raises plain Exception on a malformed tokenizer.json
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise QwenTokenizerError(f"{folder / TOKENIZER_FILE}: not a tokenizer.json ({first[:120]})") from None
        elif (folder / VOCAB_FILE).is_file() and (folder / MERGES_FILE).is_file():
            backend = _byte_level_bpe(folder)
            _add_declared_tokens(backend, folder, config)
        else:
            raise QwenTokenizerError(f"{folder}: no {TOKENIZER_FILE}, nor {VOCAB_FILE} with {MERGES_FILE}")
        pad = _token_text(config.get("pad_token")) or PAD_TOKEN
        side = config.get("padding_side", "right")
        return cls(backend, pad_token=pad, padding_side=side, name=str(folder))

    @property
    def vocab_size(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def token_id(self, token: str) -> int | None:
        """The id of one piece or added token (``"<|im_start|>"``), or None."""
        got = self._backend.token_to_id(token)
        return None if got is None else int(got)

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``, untruncated, nothing added."""
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int] | torch.Tensor, *, skip_special_tokens: bool = False) -> str:
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return str(self._backend.decode([int(i) for i in values], skip_special_tokens=skip_special_tokens))

    def __call__(self, texts: str | Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (len(texts), longest row) int64: each text's first ``max_length`` tokens, padded with
        the pad token on ``padding_side`` to the longest row; mask 1 over tokens, 0 over padding."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not texts:
            raise QwenTokenizerError("Qwen tokenizer: give at least one prompt")
        if not all(isinstance(t, str) for t in texts):
            raise QwenTokenizerError("Qwen tokenizer: every prompt must be a string")
        if type(max_length) is not int or not 1 <= max_length <= MAX_LENGTH_LIMIT:
            raise QwenTokenizerError(
                f"Qwen tokenizer: max_length={max_length!r} must be an integer 1 to {MAX_LENGTH_LIMIT}"
            )
        rows = [enc.ids[:max_length] for enc in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row)
            if n == 0:
                continue
            where = slice(0, n) if self.padding_side == "right" else slice(ids.shape[1] - n, ids.shape[1])
            ids[i, where] = torch.tensor(row, dtype=torch.long)
            mask[i, where] = 1
        return ids, mask


def load_qwen_tokenizer(path: str | Path) -> QwenTokenizer:
    """:meth:`QwenTokenizer.from_folder`."""
    return QwenTokenizer.from_folder(path)


__all__ = [
    "MAX_LENGTH_LIMIT",
    "PAD_TOKEN",
    "SPLIT_REGEX",
    "QwenTokenizer",
    "QwenTokenizerError",
    "load_qwen_tokenizer",
]
