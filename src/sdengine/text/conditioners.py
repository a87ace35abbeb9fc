"""What conditions the U-Net, in one shape for every text-encoder family.

A conditioner turns prompts into a :data:`Conditioning` dict (the idea of sgm's conditioner):

* ``"crossattn"``: ``(B, T, C)`` token states the U-Net attends to (``encoder_hidden_states``);
* ``"vector"``: ``(B, D)`` a pooled text vector the U-Net adds to its timestep embedding
  (``class_labels``), only for a U-Net that has such a projection (the emoji model);
* ``"concat"``: ``(B, C, h, w)`` channels appended to the latent (an inpainting U-Net's mask and masked
  image); not text, so the pipeline adds it (see ``sdengine.pipeline.latents``).

One adapter (``sdengine.pipeline.unet_adapter.UNetAdapter``) maps the dict onto the network's arguments,
and classifier-free guidance concatenates the cond and uncond dicts key by key. Which family a model has
is decided once, here (:func:`make_conditioner`); nothing downstream asks "CLIP or MiniLM".

The API a trainer uses: ``conditioner(captions) -> Conditioning`` (plain captions, one row each) and
``conditioner.empty(n)`` (the empty prompt, the unconditional rows of condition dropout). Generation uses
:meth:`TextConditioner.pair`, which also reads A1111 emphasis and pads cond and uncond to one length.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from sdengine.errors import GenerationError

log = logging.getLogger(__name__)

Conditioning = dict[str, Tensor]
Note = Callable[[str], None]


def _ignore(_: str) -> None:
    return None


# What a request's clip_skip means (GenerationRequest.clip_skip_rule): "sdengine", each conditioner's own
# numbering (check_clip_skip says its range), or "a1111", AUTOMATIC1111's ``CLIP_stop_at_last_layers``, which
# A1111 applies to SD 1.x's CLIP only (modules/sd_hijack_clip.py): its SD 2.x OpenCLIP encoder always reads the
# penultimate layer, its SDXL encoders their trained layers, and a MiniLM encoder has no CLIP layers.
# "a1111_sdxl_clip_l" is A1111 with its ``sdxl_clip_l_skip`` option on: SDXL's CLIP-L then reads
# ``hidden_states[-clip_skip]`` (raw; 1 is its last layer, not SDXL's trained penultimate one), bigG its own.
CLIP_SKIP_RULES = ("sdengine", "a1111", "a1111_sdxl_clip_l")


def effective_clip_skip(conditioner: Any, clip_skip: int, rule: str = "sdengine") -> Any:
    """The conditioner's own clip_skip for a request's ``clip_skip`` under ``rule`` (:data:`CLIP_SKIP_RULES`):
    an int, or for SDXL under "a1111_sdxl_clip_l" a (CLIP-L, bigG) pair."""
    if rule in ("a1111", "a1111_sdxl_clip_l"):
        return conditioner.a1111_clip_skip(clip_skip, sdxl_clip_l=rule == "a1111_sdxl_clip_l")
    return clip_skip


def a1111_clip_skip_note(conditioner: Any, clip_skip: int, rule: str = "a1111") -> str | None:
    """The note for an A1111 clip skip that this conditioner does not apply (None when it applies or is 1)."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip == 1:
        return None
    mapped = effective_clip_skip(conditioner, clip_skip, rule)
    if mapped == clip_skip or isinstance(mapped, tuple):  # applied (SDXL's CLIP-L: applied to that one)
        return None
    return (
        f"Clip skip {clip_skip} not applied: A1111 applies it to SD 1.x's CLIP text encoder only, not to "
        f"{getattr(conditioner, 'name', 'this model')}'s ({getattr(conditioner, 'encoder_name', 'its text encoder')})"
    )


def cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    """Rows of several conditionings stacked, key by key (every part must have the same keys)."""
    keys = set(parts[0])
    if any(set(p) != keys for p in parts):
        raise GenerationError("conditionings with different keys cannot be batched")
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


class TextConditioner(Protocol):
    kind: str  # "clip" or "minilm"

    def pair(
        self, prompt: str, negative: str, *, clip_skip: int = 1, note: Note = _ignore
    ) -> tuple[Conditioning, Conditioning]: ...

    def __call__(self, prompts: Sequence[str]) -> Conditioning: ...

    def empty(self, n: int = 1) -> Conditioning: ...

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note = _ignore) -> Conditioning: ...


class PerTextConditioner:
    """The conditioner methods of a model with one text encoder and no CLIP (Chroma's T5, Qwen-Image's Qwen2.5-VL),
    given its ``text(prompt, what=, note=)`` (one text's conditioning, batch 1) and ``no_clip_name`` (how a
    clip_skip refusal names the model): each row encoded alone, so a row never depends on the others."""

    no_clip_name = "this model (no CLIP)"

    def text(self, prompt: str, *, what: str = "prompt", note: Note = _ignore) -> Conditioning:
        raise NotImplementedError

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int:
        return 1

    def check_clip_skip(self, clip_skip: Any) -> None:
        if clip_skip != 1 or isinstance(clip_skip, bool):
            raise GenerationError(f"clip_skip {clip_skip!r} does not apply to {self.no_clip_name}: leave it at 1")

    def pair(
        self, prompt: str, negative: str, *, clip_skip: Any = 1, note: Note = _ignore
    ) -> tuple[Conditioning, Conditioning]:
        self.check_clip_skip(clip_skip)
        return self.text(prompt, note=note), self.text(negative, what="negative prompt", note=note)

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note | None = None) -> Conditioning:
        self.check_clip_skip(clip_skip)
        return self.text(text, what=what, note=note or _ignore)

    def __call__(self, prompts: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
        rows = [self.text(p) for p in prompts]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def empty(self, n: int = 1) -> Conditioning:
        one = self([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


class CLIPConditioner:
    """SD 1.x / 2.x: CLIP token states, A1111 emphasis, 75-token chunks, clip skip (sdengine.prompts)."""

    kind = "clip"

    def __init__(
        self, text_encoder: Any, tokenizer: Any, *, pad_token_id: int, dtype: torch.dtype, name: str = "model"
    ) -> None:
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.pad_token_id = pad_token_id
        self.dtype = dtype
        self.name = name

    @property
    def openclip(self) -> bool:
        """An OpenCLIP encoder (SD 2.x: exact GELU), not OpenAI's CLIP (SD 1.x: quick GELU)."""
        return getattr(self.text_encoder.config, "hidden_act", "quick_gelu") == "gelu"

    @property
    def encoder_name(self) -> str:
        return "SD 2.x OpenCLIP" if self.openclip else "CLIP"

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int:
        """A1111's clip skip in this conditioner's numbering: the same for SD 1.x's CLIP; SD 2.x's OpenCLIP
        ignores it in A1111 (``FrozenOpenCLIPEmbedderWithCustomWords`` reads its fixed penultimate layer,
        which is this encoder's last). ``sdxl_clip_l`` (A1111's ``sdxl_clip_l_skip``) changes neither."""
        return 1 if self.openclip else clip_skip

    def check_clip_skip(self, clip_skip: Any) -> None:
        n_layers = self.text_encoder.config.num_hidden_layers
        if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 1 <= clip_skip <= n_layers:
            raise GenerationError(f"clip_skip must be an integer in 1..{n_layers}, got {clip_skip!r}")

    def pair(
        self, prompt: str, negative: str, *, clip_skip: int = 1, note: Note = _ignore
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond), each ``{"crossattn": (1, 77 * k, D)}`` with the same k."""
        from sdengine.prompts import encode_prompt_pair

        self.check_clip_skip(clip_skip)
        cond, uncond = encode_prompt_pair(
            self.text_encoder, self.tokenizer, prompt, negative, clip_skip=clip_skip, pad_token_id=self.pad_token_id
        )
        return {"crossattn": cond.to(self.dtype)}, {"crossattn": uncond.to(self.dtype)}

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note = _ignore) -> Conditioning:
        """One text, one row, not padded: ``{"crossattn": (1, 77 * k, D)}`` (prompt editing encodes each of a
        schedule's texts with it)."""
        from sdengine.prompts import encode_prompt

        self.check_clip_skip(clip_skip)
        z = encode_prompt(self.text_encoder, self.tokenizer, text, clip_skip=clip_skip, pad_token_id=self.pad_token_id)
        return {"crossattn": z.to(self.dtype)}

    def __call__(self, prompts: Sequence[str], *, clip_skip: int = 1) -> Conditioning:
        """One row per prompt; prompts of more than one chunk are padded with the empty prompt's chunk to
        the longest (as A1111 pads a batch)."""
        from sdengine.prompts import encode_prompt, pad_to_length

        self.check_clip_skip(clip_skip)
        rows = [
            encode_prompt(self.text_encoder, self.tokenizer, p, clip_skip=clip_skip, pad_token_id=self.pad_token_id)
            for p in prompts
        ]
        length = max(r.shape[1] for r in rows)
        if any(r.shape[1] != length for r in rows):
            empty = self.empty(1, clip_skip=clip_skip)["crossattn"]
            rows = [pad_to_length(r, length, empty) for r in rows]
        return {"crossattn": torch.cat(rows).to(self.dtype)}

    def empty(self, n: int = 1, *, clip_skip: int = 1) -> Conditioning:
        from sdengine.prompts import encode_prompt

        z = encode_prompt(self.text_encoder, self.tokenizer, "", clip_skip=clip_skip, pad_token_id=self.pad_token_id)
        return {"crossattn": z.to(self.dtype).expand(n, -1, -1)}


class MiniLMConditioner:
    """all-MiniLM-L6-v2 (the built-in emoji model): one fixed ``context_length``-token context (what the
    model was trained on, see :func:`sdengine.prompts.encode_prompt_minilm`), and with ``pooled`` the
    sentence vector as ``"vector"``. clip_skip must be 1: MiniLM has no CLIP layers to skip."""

    kind = "minilm"

    def __init__(
        self,
        encoder: Any,
        context_length: int,
        *,
        pooled: bool,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.encoder = encoder
        self.context_length = int(context_length)
        self.pooled = pooled
        self.dtype = dtype
        self.device = device
        self.name = name

    encoder_name = "MiniLM"

    def a1111_clip_skip(self, clip_skip: int, *, sdxl_clip_l: bool = False) -> int:
        """A1111's clip skip does not apply to MiniLM (A1111 applies it only where there are CLIP layers)."""
        return 1

    def check_clip_skip(self, clip_skip: Any) -> None:
        if clip_skip != 1 or isinstance(clip_skip, bool):
            raise GenerationError(
                f"clip_skip {clip_skip!r} does not apply to {self.name}: its text encoder is MiniLM, not CLIP (use 1)"
            )

    def context(self, text: str, what: str = "prompt", note: Note = _ignore) -> Tensor:
        """(1, context_length, D) of one prompt, with emphasis; truncation and BREAK reported to ``note``."""
        from sdengine.prompts import encode_prompt_minilm

        length = self.context_length
        try:
            z, tokens, had_break = self._cached(
                ("minilm-context", text, length), lambda: encode_prompt_minilm(self.encoder, text, length)
            )
        except ValueError as e:
            raise GenerationError(f"{what}: {e}") from None
        if tokens > length:
            note(
                f"the {what} is {tokens} tokens long; {self.name} reads only the first {length} "
                f"(with [CLS] and [SEP]), the rest was ignored"
            )
        if had_break:
            note(f"BREAK in the {what} was read as a space: {self.name} has one {length}-token context")
        unknown_words = getattr(self.encoder.tokenizer, "unknown_words", None)
        unknown = unknown_words(text) if unknown_words is not None else []
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            note(
                f"the {what} has words {self.name}'s text encoder (MiniLM) cannot spell, each read as the "
                f"unknown token [UNK]: {shown}"
            )
        return z.to(self.dtype)

    def vectors(self, texts: Sequence[str]) -> Tensor:
        """(N, D) pooled sentence vectors (see :func:`sdengine.prompts.pooled_prompt_minilm`)."""
        from sdengine.prompts import pooled_prompt_minilm

        rows = [
            self._cached(("minilm-pooled", t), functools.partial(pooled_prompt_minilm, self.encoder, t)) for t in texts
        ]
        return torch.cat(rows).to(self.device, self.dtype)

    def _cached(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """``compute()`` through the text-encoder cache (sdengine.text.encode_cache) of MiniLM's network."""
        from sdengine.text.encode_cache import cached_call

        model = getattr(self.encoder, "model", None)
        return cached_call(model, key, compute) if isinstance(model, torch.nn.Module) else compute()

    def pair(
        self, prompt: str, negative: str, *, clip_skip: int = 1, note: Note = _ignore
    ) -> tuple[Conditioning, Conditioning]:
        self.check_clip_skip(clip_skip)
        cond = {"crossattn": self.context(prompt, "prompt", note)}
        uncond = {"crossattn": self.context(negative, "negative prompt", note)}
        if self.pooled:
            vecs = self.vectors([prompt, negative])
            cond["vector"], uncond["vector"] = vecs[:1], vecs[1:]
        return cond, uncond

    def encode(self, text: str, *, what: str = "prompt", clip_skip: int = 1, note: Note = _ignore) -> Conditioning:
        """One text, one row: ``{"crossattn": (1, context_length, D)[, "vector": (1, D)]}``."""
        self.check_clip_skip(clip_skip)
        out = {"crossattn": self.context(text, what, note)}
        if self.pooled:
            out["vector"] = self.vectors([text])
        return out

    def __call__(self, prompts: Sequence[str]) -> Conditioning:
        out = {"crossattn": torch.cat([self.context(p) for p in prompts])}
        if self.pooled:
            out["vector"] = self.vectors(prompts)
        return out

    def empty(self, n: int = 1) -> Conditioning:
        one = self([""])
        return {k: v.expand(n, *v.shape[1:]) for k, v in one.items()}


def make_conditioner(
    text_encoder: Any,
    tokenizer: Any,
    *,
    unet_config: Any,
    context_length: int | None,
    pad_token_id: int,
    dtype: torch.dtype,
    device: torch.device,
    name: str,
) -> TextConditioner:
    """The conditioner of a model: MiniLM when the folder gives a fixed ``context_length`` (the emoji
    format), else CLIP. A U-Net with a pooled-text projection needs MiniLM's sentence vector."""
    pooled = getattr(unet_config, "projection_class_embeddings_input_dim", None) is not None
    if context_length is not None:
        return MiniLMConditioner(text_encoder, context_length, pooled=pooled, dtype=dtype, device=device, name=name)
    if pooled:
        raise GenerationError(f"{name}: a pooled text embedding is only supported with a MiniLM text encoder")
    return CLIPConditioner(text_encoder, tokenizer, pad_token_id=pad_token_id, dtype=dtype, name=name)


__all__ = [
    "CLIP_SKIP_RULES",
    "CLIPConditioner",
    "Conditioning",
    "MiniLMConditioner",
    "TextConditioner",
    "a1111_clip_skip_note",
    "cat_conditioning",
    "effective_clip_skip",
    "make_conditioner",
]
