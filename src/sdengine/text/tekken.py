"""Mistral's "tekken" tokenizer file (``tekken.json``; ComfyUI's Mistral Small 3 text encoder files carry it inside,
as the uint8 tensor ``tekken_model``) -> a :class:`~sdengine.text.qwen_tokenizer.QwenTokenizer` over the same
byte-level BPE, as transformers' ``convert_tekken_tokenizer`` (and ComfyUI's loader) build it:

- ``config.pattern``: the regex that splits the text before BPE (tiktoken's way); the pieces are then bytes, written
  in GPT-2's byte-to-character map as every byte-level BPE in ``tokenizers``;
- ``special_tokens``: the control tokens (``<unk>``, ``<s>``, ``</s>``, ``[INST]``, ..., ``<pad>`` = 11,
  ``[SYSTEM_PROMPT]`` = 17) at their ranks; the ranks up to ``config.default_num_special_tokens`` (1000) that name
  none are ``<SPECIAL_N>``. Each is matched in the text as one token;
- ``vocab``: the ordinary tokens in rank order (``token_bytes`` base64), cut to ``config.default_vocab_size`` minus
  the special count; token ``rank`` gets id ``rank + special count``. The merges are not stored: each token of two or
  more bytes is merged from every split into two tokens both in the vocabulary, in the token's rank order (a piece
  that is a whole token is taken whole, tiktoken's rule).

Padding is on the left with ``<pad>``, as ComfyUI's and diffusers' FLUX.2 [dev] tokenizers pad. A file that is not
such JSON, or whose numbers do not fit, is one :class:`TekkenError` line.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from sdengine.errors import UsageError
from sdengine.text.qwen_tokenizer import QwenTokenizer

PAD = "<pad>"
MAX_TOKENS = 1_000_000
MAX_SPECIAL = 100_000  # Mistral's tekken files have 1000 (each is an added token: 999,000 took 11 s to add)


class TekkenError(UsageError):
    """A ``tekken.json`` sdengine cannot read."""


def _byte_chars() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the printable Latin-1 ones are themselves, the others
    256 + n in order), which ``tokenizers``' ByteLevel pre-tokenizer uses."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _fail(name: str, why: str) -> TekkenError:
    return TekkenError(f"{name}: not a Mistral tekken tokenizer ({why})")


def _int(value: Any, name: str, what: str, low: int = 0) -> int:
    if type(value) is not int or not low <= value <= MAX_TOKENS:
        raise _fail(name, f"{what} is {value!r}")
    return value


def tekken_tokenizer(data: bytes, *, name: str = "tekken.json") -> QwenTokenizer:
    """The tokenizer of a ``tekken.json`` file's bytes (module docstring); ``name`` names it in errors."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(name, f"not JSON: {type(e).__name__}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("config"), dict):
        raise _fail(name, "no config object")
    config, vocab_list, special_list = raw["config"], raw.get("vocab"), raw.get("special_tokens")
    pattern = config.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise _fail(name, "no config.pattern")
    if not isinstance(vocab_list, list) or not isinstance(special_list, list):
        raise _fail(name, "no vocab / special_tokens lists")
    n_special = config.get("default_num_special_tokens", len(special_list))
    if type(n_special) is not int or not 0 <= n_special <= MAX_SPECIAL:
        raise _fail(name, f"default_num_special_tokens is {n_special!r}, not 0 to {MAX_SPECIAL}")
    specials = [f"<SPECIAL_{i}>" for i in range(n_special)]
    given: dict[str, int] = {}
    for entry in special_list:
        if not isinstance(entry, dict) or not isinstance(entry.get("token_str"), str) or not entry["token_str"]:
            raise _fail(name, "a special token without token_str")
        rank = _int(entry.get("rank"), name, "a special token's rank")
        if rank >= n_special:
            raise _fail(name, f"special token rank {rank} past default_num_special_tokens={n_special}")
        if rank in given.values() or entry["token_str"] in given:
            raise _fail(name, f"special token {entry['token_str']!r} (rank {rank}) is given twice")
        given[entry["token_str"]] = rank
        specials[rank] = entry["token_str"]
    if len(set(specials)) < len(specials):
        twice = next(t for i, t in enumerate(specials) if t in specials[:i])
        raise _fail(name, f"special token {twice!r} is at two ranks")
    size = config.get("default_vocab_size")
    inner = vocab_list if size is None else vocab_list[: _int(size, name, "default_vocab_size", n_special) - n_special]
    chars = _byte_chars()
    ranks: dict[bytes, int] = {}
    for rank, entry in enumerate(inner):
        if not isinstance(entry, dict) or entry.get("rank", rank) != rank:
            raise _fail(name, f"vocab entry {rank} is not rank {rank}")
        try:
            piece = base64.b64decode(entry.get("token_bytes", ""), validate=True)
        except (binascii.Error, ValueError, TypeError):
            raise _fail(name, f"vocab entry {rank}: token_bytes is not base64") from None
        if not piece or piece in ranks:
            raise _fail(name, f"vocab entry {rank}: an empty or repeated token")
        ranks[piece] = rank

    lost = next((b for b in range(256) if bytes([b]) not in ranks), None)
    if lost is not None:  # (text holding that byte would be dropped without a word)
        raise _fail(name, f"its {len(ranks)} vocab tokens lack the byte {lost:#04x}; a tekken vocab holds all 256")

    def text(piece: bytes) -> str:
        return "".join(chars[b] for b in piece)

    vocab = {text(p): r + n_special for p, r in ranks.items()}
    for rank, s in enumerate(specials):
        if s in vocab:
            raise _fail(name, f"special token {s!r} is also an ordinary token")
        vocab[s] = rank
    merges: list[tuple[int, int, int, str, str]] = []  # (merged rank, left rank, right rank, left, right)
    for piece, rank in ranks.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], text(left), text(right)))
    merges.sort()
    try:
        backend = Tokenizer(BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], fuse_unk=False))
    except Exception as e:  # tokenizers raises plain Exception on a vocabulary it cannot take
        raise _fail(name, (str(e).splitlines() or [type(e).__name__])[0][:120]) from None
    backend.model.ignore_merges = True  # a piece that is a whole token is that token (tiktoken's rule)
    try:
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
    except Exception as e:  # an invalid regex
        raise _fail(name, f"config.pattern does not compile: {(str(e).splitlines() or [''])[0][:80]}") from None
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True) for s in specials])
    if PAD not in specials:
        raise _fail(name, f"no {PAD} special token")
    return QwenTokenizer(backend, pad_token=PAD, padding_side="left", name=name)


__all__ = ["PAD", "TekkenError", "tekken_tokenizer"]
