"""Prompts: A1111's attention syntax, ``<lora:...>`` tags, and long-prompt text conditioning.

Data flows one way: ``prompt`` -> :func:`extract_lora_tags` (tags out) -> :func:`parse_prompt_attention`
(weighted text pieces) -> tokens per piece -> :func:`sdengine.text.chunk_tokens` (75-token chunks, BREAK,
comma backtracking) -> the CLIP text encoder, one chunk at a time -> A1111's emphasis ("Original") ->
chunks concatenated along the sequence: ``(1, 77 * k, D)``.

The rules are those of AUTOMATIC1111's stable-diffusion-webui (``modules/prompt_parser.py``,
``modules/sd_hijack_clip.py``, ``modules/sd_emphasis.py``, ``extensions-builtin/Lora``), reimplemented:

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)``
  multiplies it by 1.3; brackets nest and multiply. ``\\(`` ``\\)`` ``\\[`` ``\\]`` ``\\\\`` are literal
  characters. A bracket that is never closed applies from where it opened to the end of the prompt; a
  closing bracket with no opener is literal text. ``BREAK`` (a whole word, upper case) ends the
  current 75-token chunk.
* A1111 tokenises each weighted piece on its own (so a weight boundary is also a BPE boundary), which
  is done here too.
* Emphasis: each token's hidden state is multiplied by its weight, then the chunk's states are
  rescaled so that their mean equals the mean before weighting. A1111 does this per chunk (it encodes
  chunk ``i`` of every prompt of a batch in one call), so the "whole tensor" of the rule is one
  ``(1, 77, D)`` chunk here as there.
* cond/uncond of different lengths: the shorter is padded with the encoding of the empty prompt, as
  A1111's "pad prompt/negative prompt" option does.

Differences from A1111, on purpose:

* A weight that is not a number, e.g. ``(a:1.2.3)``, makes A1111 fail with Python's ``float`` error;
  here it is a ``ValueError`` that names the piece.
* Extra-network tags other than ``<lora:...>``/``<lyco:...>`` (``<hypernet:...>``, ...) are stripped by
  A1111 (with a warning when unknown); sdengine does not have them, so they are an error rather than
  silently ignored.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.errors import SdengineError
from sdengine.io.paths import ExternalName
from sdengine.nn.lora import LoRAWeight, lora_weight
from sdengine.text.clip_tokenizer import CLIPTokenizer, TokenChunk, chunk_tokens


class PromptError(SdengineError, ValueError):
    """A prompt sdengine cannot read: a bad weight, an unsupported tag, brackets nested too deep."""


# Each piece's weight is multiplied once per bracket around it (in A1111's order, for bit-exact weights),
# so the work is pieces x depth: "(a" * 10000 took 14 s. Real prompts nest a few levels; 1.1 ** 100 is
# already a weight of 13,780.
MAX_BRACKET_DEPTH = 100
# A written weight "(word:W)" must be finite with |W| <= MAX_PROMPT_WEIGHT (A1111's useful range is about
# 0-2; 1e39 overflowed float32 to inf and gave a black image), and the product of the nested weights of a
# piece at most MAX_COMBINED_WEIGHT (100 nested "(" are 1.1**100 = 13780, which stays allowed).
MAX_PROMPT_WEIGHT = 100.0
MAX_COMBINED_WEIGHT = 1e5

ROUND_MULTIPLIER = 1.1  # A1111: "(text)" and "((text))" = 1.1 and 1.21
SQUARE_MULTIPLIER = 1 / 1.1  # A1111: "[text]"
BREAK_PIECE: tuple[str, float] = ("BREAK", -1.0)  # how A1111's parser marks BREAK in its output

# A1111's tokens of the attention syntax, in priority order: escapes, a lone backslash, openers, a
# weight-and-close ":1.3)", closers, a run of plain text, a stray colon.
_RE_ATTENTION = re.compile(
    r"""
    \\\(|\\\)|\\\[|\\]|\\\\|\\|
    \(|\[|
    :\s*([+-]?[.\d]+)\s*\)|
    \)|]|
    [^\\()\[\]:]+|
    :
    """,
    re.X,
)
# Leading whitespace is taken only from where its run starts (the leftmost match starts there anyway, or at
# "BREAK" itself after a previous match took the run): otherwise every space of a long run is tried as a
# start, quadratic time (100 KB of spaces: minutes).
_RE_BREAK = re.compile(r"(?:(?<!\s)\s+)?\bBREAK\b\s*", re.S)

# A1111's extra-network tag: <kind:arg1:arg2...>
_RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_LORA_KINDS = ("lora", "lyco")  # A1111's built-in Lora extension answers to both


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's ``parse_prompt_attention``: ``text`` -> ``[(piece, weight), ...]``.

    Neighbouring pieces of equal weight are merged; an empty prompt gives ``[("", 1.0)]``; ``BREAK``
    appears as its own piece ``("BREAK", -1.0)``.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list[list] = []  # [piece, weight] pairs, mutable while brackets close
    round_open: list[int] = []  # index in `res` where each open "(" started
    square_open: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        # Same order of float multiplications as A1111, so weights match it bit for bit.
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in _RE_ATTENTION.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])  # escape; a lone backslash becomes "" (A1111 drops it)
        elif tok in ("(", "["):
            if len(round_open) + len(square_open) >= MAX_BRACKET_DEPTH:
                raise PromptError(
                    f"prompt brackets nested more than {MAX_BRACKET_DEPTH} deep (at character {m.start()})"
                )
            (round_open if tok == "(" else square_open).append(len(res))
        elif weight is not None and round_open:
            try:
                value = float(weight)
            except ValueError:
                raise PromptError(f"prompt weight {weight!r} in {tok!r} is not a number") from None
            if not math.isfinite(value) or abs(value) > MAX_PROMPT_WEIGHT:
                raise PromptError(
                    f"prompt weight {weight!r} in {tok!r} is outside [-{MAX_PROMPT_WEIGHT:g}, {MAX_PROMPT_WEIGHT:g}]"
                )
            multiply_range(round_open.pop(), value)
        elif tok == ")" and round_open:
            multiply_range(round_open.pop(), ROUND_MULTIPLIER)
        elif tok == "]" and square_open:
            multiply_range(square_open.pop(), SQUARE_MULTIPLIER)
        else:
            # Plain text (including an unmatched closer or ":1.3)" with no opener): split at BREAK.
            for i, part in enumerate(_RE_BREAK.split(tok)):
                if i > 0:
                    res.append(list(BREAK_PIECE))
                res.append([part, 1.0])

    # Unclosed brackets act as if closed at the end of the prompt.
    for pos in round_open:
        multiply_range(pos, ROUND_MULTIPLIER)
    for pos in square_open:
        multiply_range(pos, SQUARE_MULTIPLIER)

    if not res:
        res = [["", 1.0]]
    for piece, w in res:
        if abs(w) > MAX_COMBINED_WEIGHT:
            raise PromptError(
                f"prompt piece {piece[:40]!r} has a combined weight of {w:g} (nested weights multiply), over "
                f"the limit of {MAX_COMBINED_WEIGHT:g}"
            )

    merged: list[list] = [res[0]]
    for piece, w in res[1:]:
        if merged[-1][1] == w:
            merged[-1][0] += piece
        else:
            merged.append([piece, w])
    return [(str(p), float(w)) for p, w in merged]


def _is_break(piece: tuple[str, float]) -> bool:
    # A1111's test in tokenize_line; a "(BREAK:-1)" in a prompt is therefore a BREAK there too.
    return piece[0] == "BREAK" and piece[1] == -1


def extract_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float | LoRAWeight]]]:
    """Remove ``<lora:NAME>`` / ``<lora:NAME:WEIGHT>`` tags: ``(prompt without them, [(NAME, WEIGHT)])``.

    Follows A1111's extra-network syntax (``<\\w+:args>``, args split at ``:``, an arg with ``=`` is named):
    WEIGHT defaults to 1.0; ``<lora:NAME:TE:UNET>`` or the named ``te=`` / ``unet=`` give the text-encoder and
    U-Net multipliers (UNET defaults to TE; a named one wins over the positional one, as in A1111). Equal
    multipliers are one float weight; different ones a :class:`~sdengine.nn.lora.LoRAWeight`. A1111's ``dyn``
    (DyLoRA rank selection, 4th positional or ``dyn=``), an unknown or repeated name, or a multiplier that is
    not a number is a ``ValueError``. ``<lyco:...>`` is A1111's alias of ``lora``.
    Other tags (``<hypernet:...>``) are a ``ValueError``: sdengine cannot apply them and does not
    drop them silently. Tags are replaced by nothing, as in A1111 (surrounding spaces and commas
    stay). The list keeps the order and repetitions of the prompt. Names are
    :class:`~sdengine.io.paths.ExternalName`: a LoRA folder lookup never lets them out of the folder.
    """
    loras: list[tuple[str, float | LoRAWeight]] = []

    def number(tag: str, what: str, text: str) -> float:
        try:
            return float(text)
        except ValueError:
            raise PromptError(f"LoRA tag {tag!r}: {what} {text.strip()!r} is not a number") from None

    def found(m: re.Match[str]) -> str:
        kind, args, tag = m.group(1), m.group(2), m.group(0)
        if kind.lower() not in _LORA_KINDS:
            raise PromptError(f"unsupported extra network tag {tag!r}: only <lora:NAME:WEIGHT> is supported")
        items = args.split(":")
        name = items[0].strip()
        if not name:
            raise PromptError(f"LoRA tag {tag!r} has no name")
        positional: list[str] = []
        named: dict[str, str] = {}
        for item in items[1:]:
            key, eq, value = item.partition("=")
            if not eq:
                positional.append(item)
                continue
            key = key.strip()
            if key == "dyn":
                raise PromptError(f"LoRA tag {tag!r}: dyn= (DyLoRA rank selection) is not supported")
            if key not in ("te", "unet"):
                raise PromptError(f"LoRA tag {tag!r}: unknown multiplier {key!r}= (expected te= or unet=)")
            if key in named:
                raise PromptError(f"LoRA tag {tag!r}: {key}= is given twice")
            named[key] = value
        if len(positional) > 3:
            raise PromptError(f"LoRA tag {tag!r}: expected <lora:NAME[:TE[:UNET]]>")
        if len(positional) == 3:
            raise PromptError(f"LoRA tag {tag!r}: a DyLoRA dim (4th value, A1111's dyn) is not supported")
        te = number(tag, "weight", positional[0]) if positional else 1.0
        te = number(tag, "te", named["te"]) if "te" in named else te
        unet = number(tag, "weight", positional[1]) if len(positional) > 1 else te
        unet = number(tag, "unet", named["unet"]) if "unet" in named else unet
        # Marked as coming from outside: it may only select a file inside the LoRA folder, never a path.
        loras.append((ExternalName(name), lora_weight(te, unet)))
        return ""

    # A tag ends with ">": nothing after the last one can match, and scanning that tail from every "<" is
    # what made "<lora:" * 10000 quadratic. Same result, linear time.
    end = prompt.rfind(">") + 1
    return _RE_EXTRA_NETWORK.sub(found, prompt[:end]) + prompt[end:], loras


def prompt_chunks(tokenizer: CLIPTokenizer, prompt: str, *, pad_token_id: int) -> list[TokenChunk]:
    """The 77-position chunks of ``prompt`` (ids and per-token weights), as A1111's ``tokenize_line``.

    LoRA tags are removed first (see :func:`extract_lora_tags`), as A1111 does before tokenising.
    """
    text, _ = extract_lora_tags(prompt)
    parsed = parse_prompt_attention(text)
    token_lists = tokenizer.encode_batch([piece for piece, _ in parsed])
    pieces: list[tuple[Sequence[int], float] | None] = [
        None if _is_break(p) else (ids, p[1]) for p, ids in zip(parsed, token_lists, strict=True)
    ]
    # token_groups: an embedding's vectors (sdengine.text.embeddings) stay in one chunk, as in A1111.
    groups = getattr(tokenizer, "token_groups", None)
    return chunk_tokens(pieces, pad_token_id=pad_token_id, comma_token_id=tokenizer.comma_token_id, groups=groups)


def apply_emphasis(states: Tensor, weights: Tensor) -> Tensor:
    """A1111's "Original" emphasis on ``states`` (B, T, D) with ``weights`` (B, T).

    Each token's state is scaled by its weight, then the whole of ``states`` is rescaled so that its
    mean equals the mean before weighting (A1111: "restoring original mean is likely not correct, but
    it seems to work well to prevent artifacts"). The means are taken in float32 so that fp16 runs
    do not lose the ratio to rounding.
    """
    original_mean = states.float().mean()
    weighted = states * weights.to(states.dtype).unsqueeze(-1)
    new_mean = weighted.float().mean()
    return weighted * (original_mean / new_mean).to(states.dtype)


def extra_tokens_key(text_encoder: Any, chunks: Sequence[TokenChunk]) -> str | None:
    """What the textual-inversion vectors that ``chunks`` use are, as a cache key: a digest of the rows of
    the encoder's extra tokens (``set_extra_tokens``) that the ids past its vocabulary read, None when no id
    does. By content, not identity: an embedding trained in place or a folder loaded anew changes the key."""
    extra = getattr(text_encoder, "extra_token_vectors", None)
    if extra is None:
        return None
    vocab = int(text_encoder.config.vocab_size)
    rows = sorted({i - vocab for c in chunks for i in c.ids if i >= vocab})
    if not rows:
        return None
    used = extra.detach()[[r for r in rows if r < extra.shape[0]]].float().cpu().contiguous()
    return hashlib.sha256(repr(rows).encode() + used.numpy().tobytes()).hexdigest()


def encode_chunks(text_encoder: nn.Module, chunks: Sequence[TokenChunk], *, clip_skip: int = 1) -> Tensor:
    """Encode ``chunks`` independently (each its own 77-token CLIP context), apply emphasis per chunk,
    and concatenate: ``(1, 77 * len(chunks), D)``."""
    from sdengine.cuda_graphs import through
    from sdengine.text.encode_cache import cached_call

    param = next(iter(text_encoder.parameters()))
    ids = torch.tensor([c.ids for c in chunks], dtype=torch.long, device=param.device)  # (k, 77)
    key = ("clip", tuple(tuple(c.ids) for c in chunks), clip_skip, extra_tokens_key(text_encoder, chunks))
    # through(): the encoder's CUDA graphs when the pipeline recorded them (Pipeline.enable_cuda_graphs)
    states = cached_call(text_encoder, key, lambda: through(text_encoder)(ids, clip_skip=clip_skip).last_hidden_state)
    out = []
    for i, chunk in enumerate(chunks):
        z = states[i : i + 1]  # (1, 77, D)
        if any(w != 1.0 for w in chunk.weights):
            # Skipped for all-1 weights so that plain prompts are bit-identical to the encoder output.
            w = torch.tensor([chunk.weights], dtype=torch.float32, device=z.device)
            z = apply_emphasis(z, w)
        out.append(z)
    return torch.cat(out, dim=1)  # (1, 77 * k, D)


def encode_prompt(
    text_encoder: nn.Module,
    tokenizer: CLIPTokenizer,
    prompt: str,
    *,
    clip_skip: int = 1,
    pad_token_id: int,
) -> Tensor:
    """Text conditioning of ``prompt`` as A1111 computes it: ``(1, 77 * k, D)``, k >= 1 chunks.

    ``clip_skip`` in A1111's numbering (1 = last layer). ``pad_token_id``: ``SD1_PAD_TOKEN_ID`` for
    SD 1.x, ``SD2_PAD_TOKEN_ID`` for SD 2.x. Never truncates: a long prompt gives more chunks. LoRA
    tags in ``prompt`` are ignored here (they are removed before tokenising); get them with
    :func:`extract_lora_tags`. For a plain prompt of at most 75 tokens the result equals diffusers'
    ``StableDiffusionPipeline.encode_prompt`` (with its ``clip_skip = ours - 1``).
    """
    return encode_chunks(text_encoder, prompt_chunks(tokenizer, prompt, pad_token_id=pad_token_id), clip_skip=clip_skip)


def encode_prompt_minilm(encoder: Any, prompt: str, length: int) -> tuple[Tensor, int, bool]:
    """Text conditioning for a model whose text encoder is all-MiniLM-L6-v2 (the built-in ``emoji``):
    ``(context (1, length, D), tokens, had_break)``.

    ``encoder`` is a :class:`sdengine.models.bert_text.MiniLMTextEncoder`; the model was trained on
    ``encoder.context([caption], length)`` (one fixed-length context, no chunks), so:

    * a plain prompt (no weights) gives exactly ``encoder.context([prompt], length)``;
    * A1111 emphasis (``(word)``, ``[word]``, ``(word:1.3)``, escapes) is parsed as for CLIP, each
      weighted piece is tokenised on its own (as A1111 does, so a weight boundary is also a word-piece
      boundary), the token states are multiplied by their weights and the mean of the whole context
      is restored (:func:`apply_emphasis`, A1111's "Original" rule on its one chunk);
    * a prompt longer than ``length`` tokens is truncated (``[SEP]`` kept); ``tokens`` is its full
      length with ``[CLS]``/``[SEP]``, so the caller can say so;
    * ``BREAK`` cannot start a new chunk in a single context: it is read as a space (``had_break``).

    LoRA tags are removed first, as for CLIP.
    """
    text, _ = extract_lora_tags(prompt)
    parsed = parse_prompt_attention(text)
    had_break = any(_is_break(p) for p in parsed)
    parsed = [(" ", 1.0) if _is_break(p) else p for p in parsed]
    tok = encoder.tokenizer
    if all(w == 1.0 for _, w in parsed):
        plain = "".join(piece for piece, _ in parsed)
        return encoder.context([plain], length), len(tok.encode(plain)), had_break
    ids: list[int] = []
    weights: list[float] = []
    for piece, w in parsed:
        piece_ids = tok.encode(piece, add_special_tokens=False)
        ids += piece_ids
        weights += [w] * len(piece_ids)
    tokens = len(ids) + 2
    keep = length - 2
    row = [tok.cls_token_id, *ids[:keep], tok.sep_token_id]
    z = encoder.context_of_ids(row, length)
    row_weights = torch.ones((1, length), dtype=torch.float32, device=z.device)
    row_weights[0, 1 : len(row) - 1] = torch.tensor(weights[:keep], dtype=torch.float32)
    if bool((row_weights != 1.0).any()):
        z = apply_emphasis(z, row_weights)
    return z, tokens, had_break


def pooled_prompt_minilm(encoder: Any, prompt: str) -> Tensor:
    """The sentence vector ``(1, D)`` of a prompt for a MiniLM model whose U-Net adds a pooled text
    embedding to its timestep embedding (the built-in ``emoji``): ``encoder.sentence_vectors`` of the
    prompt's plain text, which is what training used for each caption. LoRA tags are removed, A1111
    emphasis markup is removed and its weights are not applied (they act on the token states of
    :func:`encode_prompt_minilm`), ``BREAK`` is read as a space."""
    text, _ = extract_lora_tags(prompt)
    parsed = parse_prompt_attention(text)
    plain = "".join(" " if _is_break(p) else p[0] for p in parsed)
    return encoder.sentence_vectors([plain])


def pad_to_length(cond: Tensor, length: int, empty: Tensor) -> Tensor:
    """Append copies of ``empty`` (1, 77, D) to ``cond`` (B, 77 * k, D) until it is ``length`` long."""
    missing = length - cond.shape[1]
    if missing < 0 or missing % empty.shape[1]:
        raise ValueError(f"cannot pad a sequence of {cond.shape[1]} to {length} with chunks of {empty.shape[1]}")
    repeats = missing // empty.shape[1]
    if repeats == 0:
        return cond
    return torch.cat([cond, empty.expand(cond.shape[0], -1, -1).repeat(1, repeats, 1)], dim=1)


def encode_prompt_pair(
    text_encoder: nn.Module,
    tokenizer: CLIPTokenizer,
    prompt: str,
    negative: str,
    *,
    clip_skip: int = 1,
    pad_token_id: int,
) -> tuple[Tensor, Tensor]:
    """``(cond, uncond)``, each ``(1, 77 * k, D)`` with the same k: the shorter one is padded with
    the encoding of the empty prompt, as A1111's "pad prompt/negative prompt" does, so that both go
    through the U-Net in one batch."""
    cond = encode_prompt(text_encoder, tokenizer, prompt, clip_skip=clip_skip, pad_token_id=pad_token_id)
    uncond = encode_prompt(text_encoder, tokenizer, negative, clip_skip=clip_skip, pad_token_id=pad_token_id)
    if cond.shape[1] != uncond.shape[1]:
        empty = encode_prompt(text_encoder, tokenizer, "", clip_skip=clip_skip, pad_token_id=pad_token_id)
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = pad_to_length(cond, length, empty), pad_to_length(uncond, length, empty)
    return cond, uncond


# ---------------------------------------------------------------------------------------------------
# Prompt styles (A1111's styles.csv, ``modules/styles.py``)
# ---------------------------------------------------------------------------------------------------

MAX_STYLES_BYTES = 4 * 1024 * 1024  # a styles file is text people write; a bigger one is a wrong path


@dataclass(frozen=True)
class PromptStyle:
    """One row of an A1111 styles file: a name, the text merged into the prompt and into the negative prompt."""

    name: str
    prompt: str
    negative_prompt: str


def read_styles(path: str | Path) -> dict[str, PromptStyle]:
    """The styles of an A1111 styles CSV (``name,prompt,negative_prompt``; A1111's older ``name,text`` too), read
    as A1111's ``load_from_csv`` reads it: UTF-8 with or without a BOM, spaces after the commas skipped, rows
    without a name or whose name starts with ``#`` left out, a later row of the same name replacing an earlier
    one. A file that cannot be read as such is a one-line :class:`PromptError` (A1111 logs it and has no
    styles)."""
    import csv

    path = Path(path)
    try:
        if path.stat().st_size > MAX_STYLES_BYTES:
            raise PromptError(f"styles file {path}: over {MAX_STYLES_BYTES // (1024 * 1024)} MB, not a styles file")
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise PromptError(f"styles file {path}: not UTF-8 text") from None
    except OSError as e:
        raise PromptError(f"styles file {path}: {e.strerror or e}") from None
    reader = csv.DictReader(io.StringIO(text, newline=""), skipinitialspace=True)
    fields = reader.fieldnames or []
    if "name" not in fields or not ("prompt" in fields or "text" in fields):
        raise PromptError(
            f"styles file {path}: its first line must name the columns name,prompt,negative_prompt (A1111's), "
            f"got {','.join(fields) or 'nothing'}"
        )
    styles: dict[str, PromptStyle] = {}
    try:
        for row in reader:
            name = row.get("name")
            if not name or name.startswith("#"):
                continue
            prompt = row["prompt"] if "prompt" in row else row.get("text")
            styles[name] = PromptStyle(name, prompt or "", row.get("negative_prompt") or "")
    except csv.Error as e:
        raise PromptError(f"styles file {path}, line {reader.line_num}: {e}") from None
    return styles


def merge_style(style_text: str, prompt: str) -> str:
    """A1111's ``merge_prompts``: a style text with ``{prompt}`` has the prompt put in its place; any other is
    appended after ", " (an empty prompt or style text adds no comma)."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


def apply_styles(prompt: str, negative_prompt: str, styles: Sequence[PromptStyle]) -> tuple[str, str]:
    """(prompt, negative prompt) with ``styles`` merged in, in their order (A1111's ``apply_styles_to_prompt``
    and ``apply_negative_styles_to_prompt``)."""
    for style in styles:
        prompt = merge_style(style.prompt, prompt)
        negative_prompt = merge_style(style.negative_prompt, negative_prompt)
    return prompt, negative_prompt


__all__ = [
    "BREAK_PIECE",
    "PromptStyle",
    "apply_styles",
    "merge_style",
    "read_styles",
    "MAX_COMBINED_WEIGHT",
    "MAX_PROMPT_WEIGHT",
    "apply_emphasis",
    "encode_chunks",
    "encode_prompt",
    "encode_prompt_minilm",
    "encode_prompt_pair",
    "extra_tokens_key",
    "extract_lora_tags",
    "pad_to_length",
    "parse_prompt_attention",
    "prompt_chunks",
]
