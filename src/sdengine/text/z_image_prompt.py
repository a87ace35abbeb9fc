"""Z-Image's prompt encoding: prompts -> the caption states its transformer reads, as diffusers'
``ZImagePipeline.encode_prompt`` (``_encode_prompt``) makes them.

1. Each prompt goes into Qwen3's chat template as one user message with the assistant turn opened and thinking on
   (``apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)``), which for one message is
   :data:`CHAT_TEMPLATE`: ``<|im_start|>user\\n{prompt}<|im_end|>\\n<|im_start|>assistant\\n``.
2. The text is tokenized (:class:`~sdengine.text.qwen_tokenizer.QwenTokenizer`, Qwen2's BPE) and cut to
   ``max_length`` tokens (diffusers pads to and truncates at ``max_sequence_length``, 512: the template counts).
3. Qwen3 (:class:`~sdengine.models.qwen_text.QwenTextEncoder`) runs over it and the second-to-last entry of
   transformers' ``hidden_states`` is kept (the output of the next-to-last block, before the final norm:
   ``hidden_layers=[-2]``), the real tokens' rows only (diffusers drops the padding's with the mask).

diffusers runs the prompts of a call as one batch padded to 512 on the right; with a causal encoder the real
tokens' states do not see the padding, so each prompt here runs alone without it (the same numbers to float
rounding, and each text remembered by :mod:`sdengine.text.encode_cache`). The rows come back left-aligned,
zero-padded to the longest, with their mask. States that overflowed (NaN or infinity) are a
:class:`~sdengine.errors.NonFiniteError`, never returned.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from sdengine.errors import NonFiniteError, UsageError
from sdengine.models.qwen_text import QwenTextEncoder
from sdengine.text.qwen_tokenizer import MAX_LENGTH_LIMIT, QwenTokenizer

CHAT_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's, enable_thinking=True
MAX_SEQUENCE_LENGTH = 512  # ZImagePipeline's max_sequence_length default (its tokenizer's max_length)
HIDDEN_LAYER = -2  # transformers' hidden_states[-2]


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or isinstance(texts, bytes) or not texts:
        raise UsageError("Z-Image prompt encoding: give a prompt or a non-empty list of prompts")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise UsageError(f"Z-Image prompt encoding: every prompt must be a string, got {type(bad).__name__}")
    return list(texts)


def _alone(encoder: QwenTextEncoder, ids: list[int], cache: bool) -> Tensor:
    """The (n, hidden) ``hidden_states[-2]`` of one tokenized text run alone (no padding)."""
    from sdengine.text.encode_cache import cached_call

    def run() -> Tensor:
        (states,) = encoder(torch.tensor([ids], dtype=torch.long, device=encoder.device), hidden_layers=[HIDDEN_LAYER])
        if not bool(torch.isfinite(states).all()):
            raise NonFiniteError(
                f"Z-Image prompt encoding: the text encoder's states overflowed in {encoder.dtype} (NaN or infinity); "
                "run it in bfloat16 or float32"
            )
        return states[0]

    return cached_call(encoder, ("z_image_text", tuple(ids)), run) if cache else run()


@torch.no_grad()
def encode_prompt_z_image(
    encoder: QwenTextEncoder,
    tokenizer: QwenTokenizer,
    prompts: str | Sequence[str],
    *,
    max_length: int = MAX_SEQUENCE_LENGTH,
    cache: bool = True,
) -> tuple[Tensor, Tensor]:
    """(states, mask) of ``prompts`` (see the module docstring): states (B, L, hidden) in the encoder's dtype on its
    device, mask (B, L) int64 (1: a token's state, 0: padding), each text's first ``max_length`` tokens (template
    included)."""
    texts = _check_prompts(prompts)
    if type(max_length) is not int or not 1 <= max_length <= MAX_LENGTH_LIMIT:
        raise UsageError(
            f"Z-Image prompt encoding: max_length={max_length!r} must be an integer 1 to {MAX_LENGTH_LIMIT}"
        )
    formatted = [CHAT_TEMPLATE.replace("{}", text, 1) for text in texts]
    ids, mask = tokenizer(formatted, max_length=max_length)
    rows = [ids[i][mask[i].bool()].tolist() for i in range(len(texts))]
    if any(not r for r in rows):
        raise UsageError("Z-Image prompt encoding: a prompt gave no tokens with the chat template")
    kept = [_alone(encoder, row, cache) for row in rows]
    width = max(k.shape[0] for k in kept)
    out = kept[0].new_zeros(len(texts), width, kept[0].shape[-1])
    out_mask = torch.zeros(len(texts), width, dtype=torch.long, device=encoder.device)
    for i, k in enumerate(kept):
        out[i, : k.shape[0]] = k
        out_mask[i, : k.shape[0]] = 1
    return out, out_mask


__all__ = ["CHAT_TEMPLATE", "HIDDEN_LAYER", "MAX_SEQUENCE_LENGTH", "encode_prompt_z_image"]
