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

FLUX.2 [dev] (diffusers' ``Flux2Pipeline.encode_prompt``, ``_get_mistral_3_small_prompt_embeds``) differs in three
facts: the chat template is Mistral Small 3's with BFL's system message and no generation prompt
(:data:`DEV_PROMPT_TEMPLATE`: ``<s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{prompt}[/INST]``, what the release's
template renders for a system message and one user turn of one text block); the text encoder is Mistral Small 3's
language model (:class:`~sdengine.models.qwen_text.QwenTextEncoder` with Mistral's config); its stacked layers are 10,
20 and 30 (:data:`DEV_HIDDEN_LAYERS`; 3 x 5120 = 15360 wide). ``[IMG]`` (Pixtral's image token) is taken out of a
prompt first, as diffusers' ``format_input`` takes it out. Mistral's tokenizer pads on the left: the padding positions
before a row's tokens are read too (the encoder gives them transformers' numbers).

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
# FLUX.2 [dev]: BFL's system message (diffusers' flux2 system_messages.SYSTEM_MESSAGE; its line break kept)
DEV_SYSTEM_MESSAGE = (
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation."
)
DEV_PROMPT_TEMPLATE = "<s>[SYSTEM_PROMPT]" + DEV_SYSTEM_MESSAGE + "[/SYSTEM_PROMPT][INST]{}[/INST]"
DEV_HIDDEN_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers default
IMAGE_TOKEN = "[IMG]"  # Pixtral's; diffusers' format_input removes it from prompts
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


def template_tokens(
    tokenizer: QwenTokenizer, prompt: str, max_sequence_length: int, template: str = PROMPT_TEMPLATE
) -> tuple[Tensor, Tensor]:
    """(ids, mask) of one prompt in the template, both (1, max_sequence_length) int64 (module docstring, step 2)."""
    ids, mask = tokenizer([template.replace("{}", prompt, 1)], max_length=max_sequence_length)
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
    template: str = PROMPT_TEMPLATE,
) -> Tensor:
    """The states of ``prompts`` (module docstring): (B, max_sequence_length, len(hidden_layers) x hidden) in the
    encoder's dtype on its device. ``template``: the chat template with ``{}`` for the prompt (klein's Qwen3 one by
    default; :data:`DEV_PROMPT_TEMPLATE` with :data:`DEV_HIDDEN_LAYERS` for FLUX.2 [dev])."""
    texts = _texts(prompts)
    if type(max_sequence_length) is not int or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise UsageError(
            f"FLUX.2 prompt encoding: max_sequence_length={max_sequence_length!r} must be an integer 1 to "
            f"{MAX_SEQUENCE_LENGTH_LIMIT}"
        )
    layers = tuple(hidden_layers)
    rows = []
    for text in texts:
        ids, mask = template_tokens(tokenizer, text, max_sequence_length, template)

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

            key = ("flux2_text", tuple(ids[0].tolist()), tuple(mask[0].tolist()), layers)  # the template is in ids
            rows.append(cached_call(encoder, key, run))
        else:
            rows.append(run())
    return torch.cat(rows)


def dev_prompt(prompt: str) -> str:
    """A FLUX.2 [dev] prompt as its template takes it: ``[IMG]`` taken out (diffusers' ``format_input``)."""
    return prompt.replace(IMAGE_TOKEN, "")


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "DEV_HIDDEN_LAYERS",
    "DEV_PROMPT_TEMPLATE",
    "DEV_SYSTEM_MESSAGE",
    "HIDDEN_LAYERS",
    "IMAGE_TOKEN",
    "MAX_SEQUENCE_LENGTH_LIMIT",
    "PROMPT_TEMPLATE",
    "dev_prompt",
    "encode_prompt_flux2",
    "template_tokens",
]
