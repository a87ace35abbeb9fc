"""Qwen-Image's prompt encoding: prompts -> the text states and mask its transformer reads, as diffusers'
``QwenImagePipeline.encode_prompt`` (``_get_qwen_prompt_embeds``) makes them.

1. Each prompt is put into Qwen-Image's chat template (:data:`PROMPT_TEMPLATE`: a system turn asking for a detailed
   description of the image, the prompt as the user turn, the assistant turn opened) with ``str.format``.
2. The texts are tokenized together (:class:`~sdengine.text.qwen_tokenizer.QwenTokenizer`): each truncated to
   ``1024 + 34`` tokens (:data:`TOKENIZER_MAX_LENGTH` + :data:`TEMPLATE_DROP`; a longer prompt loses its end, the
   template's closing turn with it), padded to the longest row.
3. The language model (:class:`~sdengine.models.qwen_text.QwenTextEncoder`) runs over them, its last hidden state
   (after the final norm) kept: each prompt alone by default (no padding, so a prompt's states do not depend on the
   others in the call, and each is remembered by :mod:`sdengine.text.encode_cache`), or the padded batch with its
   mask as diffusers runs it (``together=True``); with right padding (Qwen2's default) they agree to float rounding.
4. Each row keeps its real tokens' states, minus the first :data:`TEMPLATE_DROP` (34: the system turn and the user
   turn's opening, as Qwen2's vocabulary tokenizes them). The rows are stacked left-aligned, zero-padded to the
   longest, with a mask of 1 over the kept states and 0 over the zeros; then both are cut to
   ``max_sequence_length`` states (the pipeline's default 512, at most 1024).

The states are in the encoder's dtype; states that overflowed (NaN or infinity over the prompt's tokens, as float16 can
give for Qwen2.5-VL, which is released and run in bfloat16) are a :class:`~sdengine.errors.NonFiniteError`, never
returned. Unlike diffusers, the mask is always returned: diffusers turns an all-ones
mask into ``None`` before the transformer sees it, which the transformer treats the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from sdengine.errors import NonFiniteError, UsageError
from sdengine.models.qwen_text import QwenTextEncoder
from sdengine.models.qwen_vision import MAX_PIXELS, MIN_PIXELS, QwenVisionTower
from sdengine.text.qwen_tokenizer import QwenTokenizer

PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
TEMPLATE_DROP = 34  # diffusers' prompt_template_encode_start_idx: the template's tokens before the prompt
TOKENIZER_MAX_LENGTH = 1024  # diffusers' tokenizer_max_length (the tokenizer's limit is this + TEMPLATE_DROP)
DEFAULT_MAX_SEQUENCE_LENGTH = 512  # QwenImagePipeline.__call__'s max_sequence_length
MAX_SEQUENCE_LENGTH_LIMIT = 1024  # QwenImagePipeline refuses more


EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_TEMPLATE_DROP = 64  # QwenImageEditPipeline's prompt_template_encode_start_idx
# Qwen-Image-Edit-2509 / 2511 (QwenImageEditPlusPipeline): the Edit template without the image in it; each input
# image goes before the prompt as PICTURE (numbered from 1); the same 64 tokens dropped
EDIT_PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}", 1)
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_PAD = "<|image_pad|>"


def _check_prompts(prompts: str | Sequence[str]) -> list[str]:
    texts = [prompts] if isinstance(prompts, str) else prompts
    if not isinstance(texts, Sequence) or isinstance(texts, bytes) or not texts:
        raise UsageError("Qwen-Image prompt encoding: give a prompt or a non-empty list of prompts")
    if not all(isinstance(t, str) for t in texts):
        bad = next(t for t in texts if not isinstance(t, str))
        raise UsageError(f"Qwen-Image prompt encoding: every prompt must be a string, got {type(bad).__name__}")
    return list(texts)


def _overflow(encoder: QwenTextEncoder) -> NonFiniteError:
    return NonFiniteError(
        f"Qwen-Image prompt encoding: the text encoder's states overflowed in {encoder.dtype} (NaN or infinity); "
        "run it in bfloat16 or float32 (Qwen2.5-VL's activations exceed float16's range)"
    )


def _alone(encoder: QwenTextEncoder, ids: list[int], drop: int, cache: bool) -> Tensor:
    """The (n - drop, hidden) kept states of one tokenized text run alone (no padding), remembered by
    :mod:`sdengine.text.encode_cache` when ``cache``."""
    from sdengine.text.encode_cache import cached_call

    def run() -> Tensor:
        states = encoder(torch.tensor([ids], dtype=torch.long, device=encoder.device))[0, drop:]
        if not bool(torch.isfinite(states).all()):
            raise _overflow(encoder)
        return states

    return cached_call(encoder, ("qwen_image_text", tuple(ids), drop), run) if cache else run()


@torch.no_grad()
def encode_prompt_qwen(
    encoder: QwenTextEncoder,
    tokenizer: QwenTokenizer,
    prompts: str | Sequence[str],
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
    template: str = PROMPT_TEMPLATE,
    drop: int = TEMPLATE_DROP,
    together: bool = False,
    cache: bool = True,
) -> tuple[Tensor, Tensor]:
    """(states, mask) of ``prompts`` (see the module docstring): states (B, L, hidden) in the encoder's dtype on its
    device, mask (B, L) int64 (1: a prompt state, 0: padding), ``L`` the longest row after the template's first
    ``drop`` tokens, at most ``max_sequence_length``. ``template`` (one ``{}`` where the prompt goes) and ``drop`` are
    Qwen-Image's unless a variant's pipeline (Qwen-Image-Edit) gives its own.

    ``together=False`` (the default) runs each prompt alone, without padding: a prompt's states then never depend on
    the other prompts of the call (docs/CONTRACTS.md, Python API: row i equals the same prompt made alone), and each
    is remembered by :mod:`sdengine.text.encode_cache` (``cache``). ``together=True`` runs the padded batch through
    the encoder as diffusers does; with the default right padding the two agree to float rounding."""
    texts = _check_prompts(prompts)
    if type(max_sequence_length) is not int or not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH_LIMIT:
        raise UsageError(
            f"Qwen-Image prompt encoding: max_sequence_length={max_sequence_length!r} must be an integer 1 to "
            f"{MAX_SEQUENCE_LENGTH_LIMIT}"
        )
    if not isinstance(template, str) or template.count("{}") != 1:
        raise UsageError("Qwen-Image prompt encoding: the template must hold exactly one {} for the prompt")
    if type(drop) is not int or drop < 0:
        raise UsageError(f"Qwen-Image prompt encoding: drop={drop!r} must be a count of tokens (0 or more)")
    formatted = [template.replace("{}", text, 1) for text in texts]
    ids, mask = tokenizer(formatted, max_length=TOKENIZER_MAX_LENGTH + drop)
    lengths = mask.sum(dim=1).tolist()
    short = [i for i, n in enumerate(lengths) if n <= drop]
    if short:
        raise UsageError(
            f"Qwen-Image prompt encoding: prompt {short[0]} gives {lengths[short[0]]} tokens with the template, not "
            f"more than the {drop} template tokens dropped; this tokenizer does not fit the template"
        )
    device = encoder.device
    if together:
        states = encoder(ids.to(device), mask.to(device))
        real = mask.to(device).bool()
        if not bool(torch.isfinite(states[real]).all()):
            raise _overflow(encoder)
        kept = [states[i][real[i]][drop:] for i in range(len(texts))]
    else:
        rows = [ids[i][mask[i].bool()].tolist() for i in range(len(texts))]
        kept = [_alone(encoder, row, drop, cache) for row in rows]
    width = min(max(k.shape[0] for k in kept), max_sequence_length)
    out = kept[0].new_zeros(len(texts), width, kept[0].shape[-1])
    out_mask = torch.zeros(len(texts), width, dtype=torch.long, device=device)
    for i, k in enumerate(kept):
        n = min(k.shape[0], width)
        out[i, :n] = k[:n]
        out_mask[i, :n] = 1
    return out, out_mask


@torch.no_grad()
def encode_prompt_qwen_edit(
    encoder: QwenTextEncoder,
    vision: QwenVisionTower,
    tokenizer: QwenTokenizer,
    prompts: str | Sequence[str],
    image: Image.Image | Sequence[Image.Image],
    *,
    image_token_id: int | None = None,
    min_pixels: int = MIN_PIXELS,
    max_pixels: int = MAX_PIXELS,
    plus: bool = False,
) -> tuple[Tensor, Tensor]:
    """(states, mask) of ``prompts`` about ``image`` as diffusers' ``QwenImageEditPipeline.encode_prompt`` makes
    them: the image through Qwen2-VL's processor and the vision tower (:mod:`sdengine.models.qwen_vision`), the
    prompt in the Edit template (:data:`EDIT_TEMPLATE`) with its ``<|image_pad|>`` repeated once per merged image
    token, the language model run with the image tokens in place of the pads and the multimodal RoPE
    (:func:`~sdengine.models.qwen_text.mrope_positions`), the first :data:`EDIT_TEMPLATE_DROP` (64) states dropped,
    the rows left-aligned and zero-padded with their mask. The states keep the image's tokens (they come after the
    dropped ones) and are not cut: diffusers' Edit pipeline does not truncate (its ``max_sequence_length`` is
    unused). Each prompt runs alone (no padding); the image is encoded once. ``image_token_id``: the tokenizer's
    ``<|image_pad|>`` id unless given (a text encoder config's); ``min_pixels`` / ``max_pixels``: the processor's
    area bounds (``processor/preprocessor_config.json``).

    ``plus``: Qwen-Image-Edit-2509's encoding (diffusers' ``QwenImageEditPlusPipeline``): ``image`` one image or a
    list, the prompt in :data:`EDIT_PLUS_TEMPLATE` after ``Picture 1: <|vision_start|><|image_pad|><|vision_end|>``,
    ``Picture 2: ...`` (one per image, each pad repeated by its image's token count), all images read by the vision
    tower together and each given its own multimodal positions. Without ``plus`` exactly one image."""
    from sdengine.models.qwen_text import mrope_positions
    from sdengine.models.qwen_vision import qwen_vision_pixels

    texts = _check_prompts(prompts)
    pad_id = tokenizer.token_id(IMAGE_PAD)
    if pad_id is None or tokenizer.token_id("<|vision_start|>") is None:
        raise UsageError(
            "Qwen-Image-Edit prompt encoding: the tokenizer has no <|image_pad|> / <|vision_start|> token (not "
            "Qwen2.5-VL's vocabulary)"
        )
    if image_token_id is not None and image_token_id != pad_id:
        raise UsageError(
            f"Qwen-Image-Edit prompt encoding: the text encoder's image_token_id is {image_token_id}, the tokenizer's "
            f"<|image_pad|> is {pad_id}: not this text encoder's tokenizer"
        )
    if vision.config.out_hidden_size != encoder.config.hidden_size:
        raise UsageError(
            f"Qwen-Image-Edit prompt encoding: the vision tower gives {vision.config.out_hidden_size}-wide tokens, the "
            f"language model is {encoder.config.hidden_size} wide: not the same Qwen2.5-VL"
        )
    images = [image] if isinstance(image, Image.Image) else list(image)
    if not images or (not plus and len(images) != 1):
        raise UsageError(
            f"Qwen-Image-Edit prompt encoding: {'one image or more' if plus else 'one image'}, got {len(images)}"
        )
    read = [qwen_vision_pixels(img, vision.config, min_pixels=min_pixels, max_pixels=max_pixels) for img in images]
    grids = [grid for _, grid in read]
    merge = vision.config.spatial_merge_size
    counts = [g[0] * (g[1] // merge) * (g[2] // merge) for g in grids]
    count = sum(counts)
    pixels = torch.cat([px for px, _ in read]) if len(read) > 1 else read[0][0]
    embeds = vision(pixels.to(device=vision.device, dtype=vision.dtype), grids)
    if not bool(torch.isfinite(embeds).all()):
        raise NonFiniteError(
            f"Qwen-Image-Edit prompt encoding: the vision tower's tokens overflowed in {vision.dtype} (NaN or "
            "infinity); run it in bfloat16 or float32"
        )
    if plus:
        pictures = "".join(PICTURE.format(i + 1).replace(IMAGE_PAD, IMAGE_PAD * n) for i, n in enumerate(counts))
        template = EDIT_PLUS_TEMPLATE.replace("{}", pictures + "{}", 1)
    else:
        template = EDIT_TEMPLATE.replace(IMAGE_PAD, IMAGE_PAD * count, 1)
    drop = EDIT_TEMPLATE_DROP
    kept = []
    for text in texts:
        formatted = template.replace("{}", text, 1)
        row = tokenizer.encode(formatted)
        if row.count(pad_id) != count:
            raise UsageError(
                "Qwen-Image-Edit prompt encoding: the prompt itself holds <|image_pad|> tokens; remove them"
            )
        if len(row) <= drop:
            raise UsageError(
                f"Qwen-Image-Edit prompt encoding: the prompt gives {len(row)} tokens with the template, not more "
                f"than the {drop} template tokens dropped; this tokenizer does not fit the template"
            )
        positions = mrope_positions(row, pad_id, grids, merge)[:, None]
        states = encoder(
            torch.tensor([row], dtype=torch.long, device=encoder.device),
            image_embeds=embeds,
            image_token_id=pad_id,
            position_ids=positions,
        )[0, drop:]
        if not bool(torch.isfinite(states).all()):
            raise _overflow(encoder)
        kept.append(states)
    width = max(k.shape[0] for k in kept)
    out = kept[0].new_zeros(len(texts), width, kept[0].shape[-1])
    out_mask = torch.zeros(len(texts), width, dtype=torch.long, device=out.device)
    for i, k in enumerate(kept):
        n = min(k.shape[0], width)
        out[i, :n] = k[:n]
        out_mask[i, :n] = 1
    return out, out_mask


__all__ = [
    "DEFAULT_MAX_SEQUENCE_LENGTH",
    "EDIT_TEMPLATE",
    "EDIT_PLUS_TEMPLATE",
    "EDIT_TEMPLATE_DROP",
    "PICTURE",
    "MAX_SEQUENCE_LENGTH_LIMIT",
    "PROMPT_TEMPLATE",
    "TEMPLATE_DROP",
    "TOKENIZER_MAX_LENGTH",
    "encode_prompt_qwen",
    "encode_prompt_qwen_edit",
]
