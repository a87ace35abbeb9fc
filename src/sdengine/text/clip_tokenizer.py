"""CLIP's byte-level BPE tokenizer (Radford et al. 2021), with the vocabulary shipped in the package.

The vocabulary (``sdengine/assets/clip/vocab.json.gz``, ``merges.txt.gz``; MIT, see the LICENSE
there) is OpenAI CLIP's, rebuilt reproducibly by ``tools/make_clip_vocab.py``. The tokenizer runs on
the ``tokenizers`` library and follows, step for step, what transformers' ``CLIPTokenizer`` (in
transformers 5 the only CLIP tokenizer; ``CLIPTokenizerFast`` is an alias of it) builds from a
``vocab.json``/``merges.txt`` pair, which is what a diffusers SD 1.x/2.x folder ships:

1. normalise: Unicode NFC, every run of whitespace -> one space, lowercase;
2. split with CLIP's regex (``'s 't 're 've 'm 'll 'd``, letter runs, single digits, runs of other
   non-space characters; whitespace is dropped), then GPT-2 byte-to-unicode mapping;
3. BPE with the end-of-word suffix ``</w>`` on the last symbol of each piece.

Clean-up: OpenAI CLIP and open_clip also run ``ftfy.fix_text`` and ``html.unescape`` (twice) first,
so that e.g. ``&amp;`` -> ``&``, curly quotes -> straight quotes and full-width letters -> ASCII.
transformers' tokenizer does neither, and sdengine matches transformers: diffusers pipelines (and
A1111 for SD 1.x) feed SD exactly these ids, and it keeps ftfy out of the dependencies. The two
agree on every text that ftfy/HTML unescaping leave unchanged.

Padding: SD 1.x pads with the end token (49407); SD 2.x (OpenCLIP) pads with 0, i.e. ``!``. Both
use 77 positions: ``<|startoftext|>``, at most 75 tokens, ``<|endoftext|>``, padding.
"""

from __future__ import annotations

import copy
import gzip
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN_ID = 49406
EOS_TOKEN_ID = 49407
SD1_PAD_TOKEN_ID = EOS_TOKEN_ID  # SD 1.x (transformers CLIP ViT-L/14 tokenizer): pad with end token
SD2_PAD_TOKEN_ID = 0  # SD 2.x (OpenCLIP): pad with 0 ("!")
CONTEXT_LENGTH = 77
CHUNK_LENGTH = CONTEXT_LENGTH - 2  # A1111: 75 prompt tokens per chunk, plus BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`

# OpenAI CLIP's pre-tokenizer pattern; the special tokens come first so that they are kept whole.
CLIP_SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _asset(name: str) -> Path:
    return Path(str(resources.files("sdengine") / "assets" / "clip" / name))


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":  # gzip magic: the package ships the files compressed
        data = gzip.decompress(data)
    return data.decode("utf-8")


def read_vocab(path: str | Path | None = None) -> dict[str, int]:
    """The token -> id table (49408 entries), from ``vocab.json`` or ``vocab.json.gz``."""
    return json.loads(_read_text(Path(path) if path is not None else _asset("vocab.json.gz")))


def read_merges(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The BPE merge list in rank order, from ``merges.txt`` or ``merges.txt.gz`` (header skipped)."""
    return _parse_merges(_read_text(Path(path) if path is not None else _asset("merges.txt.gz")))


def _parse_merges(text: str) -> list[tuple[str, str]]:
    merges = []
    for line in text.split("\n"):
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    return merges


def _build_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> Tokenizer:
    model = BPE(
        vocab=vocab,
        merges=merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=EOS_TOKEN,  # CLIP has no unknown token; byte-level BPE never needs one
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # invert=True: the regex matches the pieces to keep; what it skips (spaces) is dropped.
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            # use_regex stays at its default (True) as in transformers; after CLIP's split it only
            # changes a special-token string that was not matched verbatim (e.g. "<|ENDOFTEXT|>").
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # Verbatim special-token strings in a prompt become their ids, as in transformers and CLIP;
    # normalized=False: they are matched before lowercasing, i.e. case-sensitively.
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False, lstrip=False, rstrip=False) for t in (BOS_TOKEN, EOS_TOKEN)]
    )
    return tok


class TokenRewriter(Protocol):
    """What a tokenizer consults after BPE (textual-inversion embeddings, sdengine.text.embeddings): it
    replaces runs of ids by others and names the runs that must stay together in one chunk."""

    def rewrite(self, ids: list[int]) -> list[int]: ...

    @property
    def groups(self) -> dict[int, int]: ...

    def describe(self, token_id: int) -> str | None: ...


@dataclass
class TokenChunk:
    """One 77-position chunk of a prompt: ids with BOS/EOS/padding, and one weight per position."""

    ids: list[int]
    weights: list[float] = field(default_factory=list)


class CLIPTokenizer:
    """CLIP BPE tokenizer; equals transformers' ``CLIPTokenizer`` on the same vocab.json/merges.txt."""

    bos_token_id: int = BOS_TOKEN_ID
    eos_token_id: int = EOS_TOKEN_ID

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
        if vocab.get(BOS_TOKEN) != BOS_TOKEN_ID or vocab.get(EOS_TOKEN) != EOS_TOKEN_ID:
            raise ValueError(f"vocabulary must map {BOS_TOKEN}->{BOS_TOKEN_ID} and {EOS_TOKEN}->{EOS_TOKEN_ID}")
        self.vocab = vocab
        self._backend = _build_backend(vocab, merges)
        self.comma_token_id: int = vocab[",</w>"]  # 267; A1111 breaks long prompts after commas
        self.embeddings: TokenRewriter | None = None

    def with_embeddings(self, embeddings: TokenRewriter | None) -> CLIPTokenizer:
        """A copy (sharing the vocabulary) whose ids pass through ``embeddings.rewrite``: the words of
        textual-inversion embeddings become their vectors' ids. The packaged tokenizer is shared by every
        pipeline, so it is never changed itself."""
        out = copy.copy(self)
        out.embeddings = embeddings
        return out

    @property
    def token_groups(self) -> dict[int, int]:
        """First id -> length of each run of ids that must not be split across 75-token chunks."""
        return self.embeddings.groups if self.embeddings is not None else {}

    @classmethod
    def load(cls, vocab_path: str | Path | None = None, merges_path: str | Path | None = None) -> CLIPTokenizer:
        """The tokenizer on the package's vocabulary, or on given ``vocab.json``/``merges.txt`` files."""
        if vocab_path is None and merges_path is None:
            return _load_packaged()
        vocab = _read_text(Path(vocab_path) if vocab_path is not None else _asset("vocab.json.gz"))
        merges = _read_text(Path(merges_path) if merges_path is not None else _asset("merges.txt.gz"))
        return _load_texts(vocab, merges) if cls is CLIPTokenizer else cls(json.loads(vocab), _parse_merges(merges))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without BOS/EOS and without truncation."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        return self.embeddings.rewrite(ids) if self.embeddings is not None else ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]
        return [self.embeddings.rewrite(ids) for ids in out] if self.embeddings is not None else out

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if self.embeddings is None or all(i < self.vocab_size for i in ids):
            return self._decode_vocab(ids, skip_special_tokens)
        # An embedding's ids are not in the vocabulary: its first id reads as its name, the rest as nothing.
        parts: list[str] = []
        run: list[int] = []
        for i in ids:
            if i < self.vocab_size:
                run.append(i)
                continue
            if run:
                parts.append(self._decode_vocab(run, skip_special_tokens))
                run = []
            parts.append(self.embeddings.describe(i) or "")
        if run:
            parts.append(self._decode_vocab(run, skip_special_tokens))
        return " ".join(p for p in parts if p)

    def _decode_vocab(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        text = self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return text.replace("</w>", " ").strip()

    def __call__(
        self, texts: str | Sequence[str], pad_token_id: int, max_length: int = CONTEXT_LENGTH
    ) -> torch.LongTensor:
        """(B, max_length) ids: BOS, the first ``max_length - 2`` tokens, EOS, then ``pad_token_id``.

        Longer texts are truncated, as diffusers and open_clip do; use :meth:`chunk` (A1111's
        rule) where a prompt must not lose its tail.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length < 2:
            raise ValueError("max_length must leave room for BOS and EOS")
        out = torch.full((len(texts), max_length), pad_token_id, dtype=torch.long)
        for row, ids in enumerate(self.encode_batch(texts)):
            seq = [self.bos_token_id, *ids[: max_length - 2], self.eos_token_id]
            out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        return out  # type: ignore[return-value]

    def chunk(self, text: str, pad_token_id: int, comma_backtrack: int = COMMA_BACKTRACK) -> torch.LongTensor:
        """(N, 77) ids of ``text`` in A1111's 75-token chunks (see :func:`chunk_tokens`)."""
        chunks = chunk_tokens(
            [(self.encode(text), 1.0)],
            pad_token_id=pad_token_id,
            comma_token_id=self.comma_token_id,
            comma_backtrack=comma_backtrack,
            groups=self.token_groups,
        )
        return torch.tensor([c.ids for c in chunks], dtype=torch.long)  # type: ignore[return-value]


@lru_cache(maxsize=1)
def _load_packaged() -> CLIPTokenizer:
    return CLIPTokenizer(read_vocab(), read_merges())


@lru_cache(maxsize=8)
def _load_texts(vocab: str, merges: str) -> CLIPTokenizer:
    """The tokenizer of these ``vocab.json`` and ``merges.txt`` texts, built once per process for the same texts
    (nearly every model folder ships CLIP's own files; building the BPE tables takes a quarter of a second). A
    tokenizer is never changed (:meth:`CLIPTokenizer.with_embeddings` copies), so the folders share it."""
    return CLIPTokenizer(json.loads(vocab), _parse_merges(merges))


def chunk_tokens(
    pieces: Iterable[tuple[Sequence[int], float] | None],
    *,
    pad_token_id: int,
    comma_token_id: int = 267,
    comma_backtrack: int = COMMA_BACKTRACK,
    chunk_length: int = CHUNK_LENGTH,
    bos_token_id: int = BOS_TOKEN_ID,
    eos_token_id: int = EOS_TOKEN_ID,
    groups: dict[int, int] | None = None,
) -> list[TokenChunk]:
    """Split weighted token runs into A1111-style chunks of ``chunk_length + 2`` positions.

    ``pieces`` is the parsed prompt: ``(token_ids, weight)`` runs in order, and ``None`` where the
    prompt says ``BREAK`` (the current chunk ends there, even if it is empty). The rule is A1111's
    ``tokenize_line``: a chunk takes up to ``chunk_length`` tokens; when it is full and the next
    token is not a comma, and a comma lies within the last ``comma_backtrack`` tokens, the tokens
    after that comma move on to the next chunk (0 turns this off). Each chunk is
    ``[BOS] + tokens + [EOS] + [pad] * ...``; BOS, EOS and padding have weight 1.0. An empty
    prompt gives one chunk. SD 2's padding (0) follows A1111's rule: everything after the first EOS.

    ``groups`` maps the first id of a run that must stay whole (a textual-inversion embedding's vectors)
    to the run's length: a run that does not fit in the current chunk starts the next one (A1111's rule).
    """
    chunks: list[TokenChunk] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # index in `ids` of the latest comma of the current chunk

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        n_pad = chunk_length - len(ids)
        chunks.append(
            TokenChunk(
                ids=[bos_token_id, *ids, eos_token_id, *([pad_token_id] * n_pad)],
                weights=[1.0, *weights, 1.0, *([1.0] * n_pad)],
            )
        )
        ids, weights, last_comma = [], [], -1

    for piece in pieces:
        if piece is None:  # BREAK
            close_chunk()
            continue
        tokens, weight = piece
        for token in tokens:
            if token == comma_token_id:
                last_comma = len(ids)
            elif (
                comma_backtrack > 0
                and len(ids) == chunk_length
                and last_comma != -1
                and len(ids) - last_comma <= comma_backtrack
            ):
                # Full chunk with a comma close behind: end the chunk at that comma, so that a
                # phrase is not cut in two.
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                ids, weights = ids[:cut], weights[:cut]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == chunk_length:
                close_chunk()
            run = groups.get(token, 0) if groups else 0
            if run and ids and len(ids) + run > chunk_length:
                close_chunk()
            ids.append(token)
            weights.append(float(weight))
    if ids or not chunks:
        close_chunk()
    return chunks
