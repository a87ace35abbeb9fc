"""FLUX.2 [klein]'s prompt encoding: prompts -> the text states its transformer reads, as diffusers'
``Flux2KleinPipeline.encode_prompt`` (``_get_qwen3_prompt_embeds``) makes them.

1. Each prompt is put into Qwen3's chat template as one user turn, the assistant turn opened with thinking off
   (:data:`PROMPT_TEMPLATE`: ``apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
   enable_thinking=False)``; the prompt is inserted as it is).
2. It is tokenized (:class:`~sdengine.text.qwen_tokenizer.QwenTokenizer`), cut to ``max_sequence_length`` tokens (512
   by default; a longer prompt loses its end, the template's closing turn with it) and padded to exactly that length
   with the tokenizer's pad token on its padding side, as ``padding="max_length", truncation=True``.
3. Qwen3 (:class:`~sdengine.models.qwen_text.QwenTextEncoder`) runs over the padded row with its mask; the hidden
   states of layers 9, 18 and 27 (:data:`HIDDEN_LAYERS`, transformers' ``output_hidden_states`` indices: block
   outputs, no final norm) are put side by side per token: (L, 3 x hidden), 7680 wide for Qwen3-4B (klein 4B),
   12288 for Qwen3-8B (klein 9B). Every position is kept, the padding's too (the transformer attends to all of them;
   the encoder gives padding positions transformers' numbers).

Each prompt runs alone (every row is padded to the same length anyway, so this equals diffusers' batch) and is
remembered by :mod:`sdengine.text.encode_cache`. States that overflowed (NaN or infinity) are a
:class:`~sdengine.errors.NonFiniteError`, never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sdengine.errors import NonFiniteError, UsageError
from sdengine.models.qwen_text import QwenTextEncoder
from sdengine.text.qwen_tokenizer import QwenTokenizer

PROMPT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
HIDDEN_LAYERS = (9, 18, 27)  # diffusers' text_encoder_out_layers default
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's max_sequence_length default
MAX_SEQUENCE_LENGTH_LIMIT = 4096


def _texts(prompts: str | Sequence[str]) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or isinstance(texts, bytes) or not texts:
        raise UsageError("FLUX.2 prompt encoding: give a prompt or a non-empty list of prompts")
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise UsageError(f"FLUX.2 prompt encoding: every prompt must be a string, got {type(bad).__name__}")
    return list(texts)


def template_tokens(tokenizer: QwenTokenizer, prompt: str, max_sequence_length: int) -> tuple[Tensor, Tensor]:
    """(ids, mask) of one prompt in the template, both (1, max_sequence_length) int64 (module docstring, step 2)."""
    ids, mask = tokenizer([PROMPT_TEMPLATE.replace("{}", prompt, 1)], max_length=max_sequence_length)
    n = ids.shape[1]
    if n < max_sequence_length:
        pad = torch.full((1, max_sequence_length - n), tokenizer.pad_token_id, dtype=torch.long)
        zeros = torch.zeros(1, max_sequence_length - n, dtype=torch.long)
        left = tokenizer.padding_side == "left"
        ids = torch.cat([pad, ids] if left else [ids, pad], dim=1)
        mask = torch.cat([zeros, mask] if left else [mask, zeros], dim=1)
    return ids, mask


@torch.no_grad()
def encode_prompt_flux2(
    encoder: QwenTextEncoder,
    tokenizer: QwenTokenizer,
    prompts: str | Sequence[str],
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    hidden_layers: Sequence[int] = HIDDEN_LAYERS,
    cache: bool = True,
) -> Tensor:
    """The states of ``prompts`` (module docstring): (B, max_sequence_length, len(hidden_layers) x hidden) in the
    encoder's dtype on its device."""
    texts = _texts(prompts)
    if type(max_sequence_length) is not int or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise UsageError(
            f"FLUX.2 prompt encoding: max_sequence_length={max_sequence_length!r} must be an integer 1 to "
            f"{MAX_SEQUENCE_LENGTH_LIMIT}"
        )
    layers = tuple(hidden_layers)
    rows = []
    for text in texts:
        ids, mask = template_tokens(tokenizer, text, max_sequence_length)

        def run(ids: Tensor = ids, mask: Tensor = mask) -> Tensor:
            states = encoder(ids.to(encoder.device), mask.to(encoder.device), hidden_layers=list(layers))
            out = torch.stack(states, dim=1)  # (1, layers, L, hidden)
            out = out.permute(0, 2, 1, 3).reshape(1, max_sequence_length, -1)  # per token: the layers side by side
            if not bool(torch.isfinite(out).all()):
                raise NonFiniteError(
                    f"FLUX.2 prompt encoding: Qwen3's states overflowed in {encoder.dtype} (NaN or infinity); run it "
                    "in bfloat16 or float32"
                )
            return out

        if cache:
            from sdengine.text.encode_cache import cached_call

            key = ("flux2_text", tuple(ids[0].tolist()), tuple(mask[0].tolist()), layers)
            rows.append(cached_call(encoder, key, run))
        else:
            rows.append(run())
    return torch.cat(rows)


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "HIDDEN_LAYERS",
    "MAX_SEQUENCE_LENGTH_LIMIT",
    "PROMPT_TEMPLATE",
    "encode_prompt_flux2",
    "template_tokens",
]
