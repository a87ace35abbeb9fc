"""The T5 tokenizer: prompts -> T5 token ids and attention mask, from a ``tokenizer.json`` (HF ``tokenizers``).

T5 tokenizes with a SentencePiece Unigram model (Kudo 2018, "Subword Regularization"): text is normalised, each
word gets a leading ``▁`` (Metaspace), and the most probable split into vocabulary pieces is taken. The rule here
is transformers' ``T5TokenizerFast`` with ``padding="max_length", truncation=True`` (what diffusers' SD3 and Flux
pipelines call, with ``max_sequence_length`` 256 and 512):

- the text's pieces, then ``</s>`` (end of sequence);
- a text longer than ``max_length`` keeps its first ``max_length - 1`` pieces and still ends in ``</s>``;
- shorter ones are padded with ``<pad>`` (id 0 in T5's vocabulary) to exactly ``max_length``;
- the attention mask is 1 over the pieces and ``</s>``, 0 over the padding.

A ``tokenizer.json``'s own padding and truncation settings are ignored, and so is its post-processor: ``</s>`` is
appended here (transformers sets that template on every T5 tokenizer too).

:func:`load_t5_tokenizer` with no path gives the shipped T5 v1.1 vocabulary
(``sdengine/assets/t5/tokenizer.json.gz``, 32,100 pieces, Apache-2.0, see the LICENSE beside it): the vocabulary of
SD3's ``tokenizer_3/``, Flux's ``tokenizer_2/`` and ComfyUI's ``t5xxl`` files.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer

from sdengine.errors import UsageError

EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SD3_MAX_LENGTH = 256  # diffusers' StableDiffusion3Pipeline max_sequence_length
FLUX_MAX_LENGTH = 512  # diffusers' FluxPipeline max_sequence_length (FLUX.1-dev; schnell uses 256)
MAX_LENGTH_LIMIT = 4096  # T5 has no position table; this only bounds a request's attention size
TOKENIZER_FILE = "tokenizer.json"


def shipped_tokenizer_path() -> Path:
    """The shipped T5 v1.1 ``tokenizer.json.gz``."""
    return Path(str(resources.files("sdengine") / "assets" / "t5" / "tokenizer.json.gz"))


@lru_cache(maxsize=8)
def _backend_of(text: str) -> Tokenizer:
    """The tokenizers ``Tokenizer`` of a ``tokenizer.json`` text, without padding or truncation; built once per
    process for the same text (every Flux, SD3 and Chroma folder ships T5 v1.1's, 0.12 s to build). Nothing
    changes it afterwards, so the tokenizers of those folders share it."""
    backend = Tokenizer.from_str(text)
    backend.no_padding()
    backend.no_truncation()
    return backend


class T5TokenizerError(UsageError):
    """A tokenizer file that cannot be read as a T5 tokenizer, or a bad tokenizer call."""


class T5Tokenizer:
    """T5's tokenizer from a ``tokenizer.json`` (or its gzip). ``tokenizer(texts, max_length)`` -> (ids, mask)."""

    def __init__(self, tokenizer_json: str | Path) -> None:
        path = Path(tokenizer_json)
        try:
            data = path.read_bytes()
            if data[:2] == b"\x1f\x8b":  # gzip magic: the shipped file is compressed
                data = gzip.decompress(data)
            self._backend = _backend_of(data.decode("utf-8"))
        except (OSError, EOFError, UnicodeDecodeError, gzip.BadGzipFile) as e:
            raise T5TokenizerError(f"{path}: cannot read the tokenizer ({type(e).__name__}: {e})") from None
        except Exception as e:  # tokenizers raises plain Exception on a malformed tokenizer.json
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise T5TokenizerError(f"{path}: not a tokenizers tokenizer.json ({first[:120]})") from None
        self.path = path
        self.eos_token_id = self._special_id(EOS_TOKEN)
        self.pad_token_id = self._special_id(PAD_TOKEN)

    def _special_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:  # not a T5 vocabulary: fail here, not with a wrong batch later
            raise T5TokenizerError(f"{self.path}: no {token} token in this tokenizer (not a T5 vocabulary)")
        return int(token_id)

    @property
    def vocab_size(self) -> int:
        return int(self._backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> list[int]:
        """The ids of ``text``'s pieces then ``</s>``, untruncated."""
        return [*self._backend.encode(text, add_special_tokens=False).ids, self.eos_token_id]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of ids, the special tokens (``</s>``, ``<pad>``) left out."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return str(self._backend.decode([int(i) for i in values], skip_special_tokens=True))

    def __call__(
        self, texts: str | Sequence[str], max_length: int = SD3_MAX_LENGTH
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask), both (len(texts), max_length) int64: each text's pieces truncated to ``max_length - 1``,
        then ``</s>``, then ``<pad>`` up to ``max_length``; mask 1 over pieces and ``</s>``."""
        if isinstance(texts, str):
            texts = [texts]
        if not all(isinstance(t, str) for t in texts):
            raise T5TokenizerError("T5 tokenizer: every prompt must be a string")
        if type(max_length) is not int or not 1 <= max_length <= MAX_LENGTH_LIMIT:
            raise T5TokenizerError(
                f"T5 tokenizer: max_length={max_length!r} must be an integer 1 to {MAX_LENGTH_LIMIT}"
            )
        ids = torch.full((len(texts), max_length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, enc in enumerate(self._backend.encode_batch(list(texts), add_special_tokens=False)):
            pieces = [*enc.ids[: max_length - 1], self.eos_token_id]
            ids[row, : len(pieces)] = torch.tensor(pieces, dtype=torch.long)
            mask[row, : len(pieces)] = 1
        return ids, mask


def load_t5_tokenizer(path: str | Path | None = None) -> T5Tokenizer:
    """A T5 tokenizer: ``None`` gives the shipped T5 v1.1 vocabulary; a path is a ``tokenizer.json`` (or
    ``.json.gz``) or a folder holding one (diffusers' ``tokenizer_3/`` of SD3, ``tokenizer_2/`` of Flux)."""
    if path is None:
        return T5Tokenizer(shipped_tokenizer_path())
    p = Path(path)
    if p.is_dir():
        found = p / TOKENIZER_FILE
        if not found.is_file():
            if (p / "spiece.model").is_file():
                raise T5TokenizerError(
                    f"{p}: has spiece.model but no {TOKENIZER_FILE}; sdengine reads tokenizer.json only "
                    "(pass no tokenizer to use the shipped T5 v1.1 vocabulary, which is the same)"
                )
            raise T5TokenizerError(
                f"{p}: no {TOKENIZER_FILE} in this folder (pass no tokenizer for the shipped T5 one)"
            )
        return T5Tokenizer(found)
    if not p.is_file():
        raise T5TokenizerError(f"{p}: no such tokenizer file or folder")
    return T5Tokenizer(p)


__all__ = [
    "EOS_TOKEN",
    "FLUX_MAX_LENGTH",
    "MAX_LENGTH_LIMIT",
    "PAD_TOKEN",
    "SD3_MAX_LENGTH",
    "T5Tokenizer",
    "T5TokenizerError",
    "load_t5_tokenizer",
    "shipped_tokenizer_path",
]
