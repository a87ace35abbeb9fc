"""Random tiny Qwen-Image-Edit pipelines saved in the real layout by diffusers' ``QwenImageEditPipeline``
(``processor/``: transformers' ``Qwen2VLProcessor``; ``text_encoder/``: a ``Qwen2_5_VLForConditionalGeneration``
with its vision tower), for parity tests of sdengine's Edit path.

The tokenizer is :mod:`tests._qwen_models`' small byte-level BPE with Qwen2.5-VL's vision markers added
(``<|vision_start|>``, ``<|image_pad|>``, ``<|vision_end|>``) and the Edit template's words in its corpus; the text
encoder's ``image_token_id`` / ``vision_start_token_id`` are the tokenizer's ids. The oracle's text encoder is run
with the multimodal RoPE (:func:`with_mrope`): diffusers 0.42 does not pass ``mm_token_type_ids``, without which
transformers 5 falls back to sequential positions (see docs/qwen-image.md, Edit).
"""

from __future__ import annotations

from pathlib import Path

import torch

from _qwen_models import (
    CORPUS,
    QWEN_SCHEDULER,
    QWEN_TEXT,
    QWEN_VISION,
    SPECIAL,
    perturb,
    qwen_transformer,
    qwen_vae,
)

VISION_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
EDIT_CORPUS = [
    *CORPUS,
    "Describe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's "
    "requirements while maintaining consistency with the original input where appropriate.",
    "make the apple green, turn the cat into a dog, add a hat",
]
# window attention reaches more than one window on small images: 56-pixel windows (2x2 merged blocks)
EDIT_VISION = dict(QWEN_VISION, depth=2, fullatt_block_indexes=[1], window_size=56)


def write_edit_tokenizer(dst: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL + VISION_TOKENS
    )
    tok.train_from_iterator(EDIT_CORPUS * 4, trainer=trainer)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    fast = Qwen2TokenizerFast(
        tokenizer_file=str(dst / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.save_pretrained(dst)
    return dst


def qwen_vl_encoder(tokenizer, seed: int = 0, text: dict | None = None, vision: dict | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = text or QWEN_TEXT
    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS}
    cfg = Qwen2_5_VLConfig(
        text_config={**text, "vocab_size": len(tokenizer)},
        vision_config={**(vision or EDIT_VISION), "out_hidden_size": text["hidden_size"]},
        vocab_size=len(tokenizer),
        bos_token_id=0,
        eos_token_id=2,
        image_token_id=ids["<|image_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        video_token_id=ids["<|image_pad|>"] + 1000,
    )
    return perturb(Qwen2_5_VLForConditionalGeneration(cfg), seed + 1, 0.02).eval()


# Qwen2.5-VL-7B-Instruct's published processor area bounds (taken as Qwen-Image-Edit's processor/; not checked offline)
RELEASE_PIXELS = dict(min_pixels=3136, max_pixels=12845056)


def qwen_vl_processor(tokenizer, image_processor=None):
    """transformers' ``Qwen2VLProcessor`` over the tokenizer and the Pillow image processor, without a video
    processor (transformers' needs torchvision, which is not installed: its class check is skipped for it)."""
    from transformers import ProcessorMixin, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    check = ProcessorMixin.check_argument_for_proper_class

    def lenient(self, name, arg):
        return None if name == "video_processor" and arg is None else check(self, name, arg)

    ProcessorMixin.check_argument_for_proper_class = lenient
    try:
        image_processor = image_processor or Qwen2VLImageProcessorPil(**RELEASE_PIXELS)
        return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
    finally:
        ProcessorMixin.check_argument_for_proper_class = check


MODEL_INDEX = {
    "_class_name": "QwenImageEditPipeline",
    "_diffusers_version": "0.35.0.dev0",
    "processor": ["transformers", "Qwen2VLProcessor"],
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}


def make_qwen_edit_folder(dst: Path, seed: int = 0, plus: bool = False) -> Path:
    """A random tiny Qwen-Image-Edit pipeline in Qwen/Qwen-Image-Edit's layout: each part saved by its library,
    ``processor/`` as the tokenizer's files plus the image processor's ``preprocessor_config.json``; ``plus``:
    Qwen-Image-Edit-2509's (the same parts, ``QwenImageEditPlusPipeline`` in ``model_index.json``)."""
    import json

    import diffusers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    write_edit_tokenizer(dst / "tokenizer")
    tokenizer = Qwen2TokenizerFast.from_pretrained(dst / "tokenizer")
    tokenizer.save_pretrained(dst / "processor")
    Qwen2VLImageProcessorPil(**RELEASE_PIXELS).save_pretrained(dst / "processor")
    diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER).save_pretrained(dst / "scheduler")
    qwen_vae(seed + 10).save_pretrained(dst / "vae")
    qwen_vl_encoder(tokenizer, seed + 20).save_pretrained(dst / "text_encoder")
    qwen_transformer(seed + 30, joint_attention_dim=QWEN_TEXT["hidden_size"]).save_pretrained(dst / "transformer")
    index = {**MODEL_INDEX, "_class_name": "QwenImageEditPlusPipeline"} if plus else MODEL_INDEX
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def with_mrope(text_encoder) -> None:
    """Make the oracle's text encoder compute Qwen2.5-VL's multimodal RoPE: pass ``mm_token_type_ids`` (1 on the
    image's tokens), which diffusers' ``QwenImageEditPipeline`` leaves out."""
    forward = text_encoder.forward
    image_id = text_encoder.config.image_token_id

    def patched(*args, input_ids=None, **kw):
        if input_ids is not None and kw.get("pixel_values") is not None and "mm_token_type_ids" not in kw:
            kw["mm_token_type_ids"] = (input_ids == image_id).int()
        return forward(*args, input_ids=input_ids, **kw)

    text_encoder.forward = patched


def diffusers_qwen_edit(folder: Path, *, mrope: bool = True, plus: bool = False):
    import diffusers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    processor = qwen_vl_processor(
        Qwen2TokenizerFast.from_pretrained(folder / "processor"),
        Qwen2VLImageProcessorPil.from_pretrained(folder / "processor"),
    )
    cls = diffusers.QwenImageEditPlusPipeline if plus else diffusers.QwenImageEditPipeline
    pipe = cls.from_pretrained(folder, processor=processor, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if mrope:
        with_mrope(pipe.text_encoder)
    return pipe
