"""Chroma's conditioning: T5-XXL's states of the prompt and the mask of the tokens the transformer attends to.

Chroma (lodestones 2025) reads the prompt with T5-XXL alone (no CLIP, no pooled vector, no guidance input):

* ``"crossattn"`` (B, 512, 4096): T5's last hidden states of the prompt padded with ``<pad>`` to
  ``max_sequence_length`` (512, diffusers' ``ChromaPipeline`` default) and truncated with the end token kept. T5
  runs *with* its attention mask (the pieces and ``</s>``): the padding does not change the prompt's states;
* ``"text_mask"`` (B, 512) bool: the tokens the transformer attends to: the pieces, ``</s>`` and the first
  ``<pad>`` after it (Chroma's rule: "a single padding token remains unmasked", diffusers' ``ChromaPipeline``
  ``_get_t5_prompt_embeds``: position <= the number of unmasked tokens). A prompt that fills all 512 tokens has
  no padding and every token attended.

The mask is a boolean mask here. diffusers 0.42's ``ChromaPipeline`` hands the transformer the same 0/1 mask as
floats, which PyTorch's attention *adds* to the scores (+1 on the kept pairs) instead of masking (diffusers issue
#12116); sdengine masks, as Chroma was trained, and its parity tests give diffusers the boolean mask.

The negative prompt is a real one: Chroma runs classifier-free guidance (two passes per step) at ``cfg_scale`` > 1,
its default 5 (:mod:`sdengine.pipeline.chroma`). The prompt's A1111 syntax is taken out as for Flux's T5
(:func:`sdengine.text.sd3_conditioner.t5_text`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.text.conditioners import PerTextConditioner
from sdengine.text.sd3_conditioner import t5_text

Conditioning = dict[str, Tensor]
Note = Callable[[str], None]

T5_LENGTH = 512  # diffusers' ChromaPipeline max_sequence_length default
MASK_KEY = "text_mask"
KEPT_PADS = 1  # Chroma attends to this many pad tokens after the end token


def _ignore(_: str) -> None:
    return None


def chroma_text_mask(tokenizer_mask: Tensor) -> Tensor:
    """The transformer's text mask (bool) from T5's (1 over the pieces and ``</s>``): one pad token more."""
    lengths = (tokenizer_mask != 0).sum(dim=1, keepdim=True)
    positions = torch.arange(tokenizer_mask.shape[1], device=tokenizer_mask.device)[None, :]
    return positions < lengths + KEPT_PADS


class ChromaConditioner(PerTextConditioner):
    """Chroma's text side: T5-XXL (``t5(ids, mask) -> (B, L, d_model)``) and its tokenizer
    (``t5_tokenizer(texts, max_length) -> (ids, mask)``)."""

    kind = "chroma"
    no_clip_name = "Chroma (it has no CLIP)"
    encoder_name = "Chroma T5-XXL"

    def __init__(
        self,
        t5: Any,
        t5_tokenizer: Any,
        *,
        joint_attention_dim: int,
        max_sequence_length: int = T5_LENGTH,
        dtype: torch.dtype,
        device: torch.device,
        name: str = "model",
    ) -> None:
        self.t5 = t5
        self.t5_tokenizer = t5_tokenizer
        self.max_sequence_length = int(max_sequence_length)
        self.dtype = dtype
        self.device = device
        self.name = name
        width = int(getattr(t5.config, "d_model", joint_attention_dim))
        if width != int(joint_attention_dim):
            raise GenerationError(
                f"{name}: T5's states are {width} wide but the Chroma transformer takes {joint_attention_dim} "
                "(joint_attention_dim): not this model's T5"
            )

    def t5_states(self, text: str) -> tuple[Tensor, Tensor]:
        """T5's (1, L, d) states of ``text`` (float32, T5 run with its mask) and the transformer's (1, L) mask."""
        from sdengine.text.encode_cache import cached_call

        ids, mask = self.t5_tokenizer([text], self.max_sequence_length)
        param = next(iter(self.t5.parameters()))
        ids = torch.as_tensor(ids, dtype=torch.long).to(param.device)
        mask = torch.as_tensor(mask, dtype=torch.long).to(param.device)
        key = ("chroma_t5", tuple(ids[0].tolist()), int(mask.sum()))
        states = cached_call(self.t5, key, lambda: self.t5(ids, mask))
        return states.float(), chroma_text_mask(mask)

    def text(self, prompt: str, *, what: str = "prompt", note: Note = _ignore) -> Conditioning:
        """``{"crossattn", "text_mask"}`` of one prompt (states in the model's dtype)."""
        text, weighted = t5_text(prompt)
        if weighted:
            note(f"Chroma reads the {what} without its emphasis weights ((word:1.2) is read as 'word')")
        if len(self.t5_tokenizer.encode(text)) > self.max_sequence_length:
            note(f"T5 reads the first {self.max_sequence_length} tokens of the {what}; the rest is cut off")
        states, mask = self.t5_states(text)
        return {"crossattn": states.to(self.dtype), MASK_KEY: mask}


__all__ = ["KEPT_PADS", "MASK_KEY", "T5_LENGTH", "ChromaConditioner", "chroma_text_mask"]
