"""Random tiny FLUX.2 [dev] folders (diffusers' ``Flux2Pipeline`` layout) for parity tests of sdengine's FLUX.2 [dev]
against diffusers' ``Flux2Pipeline``: the FLUX.2 transformer of :mod:`_flux2_models` with ``guidance_embeds``, the
FLUX.2 VAE, transformers' ``Mistral3ForConditionalGeneration`` at a fraction of the width (30 language-model layers:
[dev] reads layers 10, 20 and 30; a one-layer Pixtral vision tower, saved as the release has one) and a
``PixtralProcessor`` over a small byte-level BPE with Mistral's special tokens and the end of Mistral Small 3's chat
template (a system prompt, user turns whose content is a list of text blocks)."""

from __future__ import annotations

from pathlib import Path

import torch

from _flux2_models import FLUX2_SCHEDULER, flux2_transformer, flux2_vae, perturb

MISTRAL_TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=30,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rms_norm_eps=1e-5,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000_000.0},
    sliding_window=None,
    tie_word_embeddings=False,
)
PIXTRAL_VISION = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=8,
    image_size=64,
    patch_size=16,
)
# Mistral's control tokens, in the release's order (ids 0..): <unk>, <s>, </s>, [INST], [/INST], ..., <pad> (11),
# [IMG] (10), [SYSTEM_PROMPT] (17), [/SYSTEM_PROMPT] (18)
SPECIAL = [
    "<unk>",
    "<s>",
    "</s>",
    "[INST]",
    "[/INST]",
    "[AVAILABLE_TOOLS]",
    "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]",
    "[TOOL_CALLS]",
    "[IMG]",
    "<pad>",
    "[IMG_BREAK]",
    "[IMG_END]",
    "[PREFIX]",
    "[MIDDLE]",
    "[SUFFIX]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
]
CORPUS = [
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object attribution and actions without speculation.",
    "a red apple on a wooden table, photo, soft light",
    "make it green; a cat holding a sign that says hello world",
    "The quick brown fox jumps over the lazy dog 0123456789 !?.,;:'\"()[]{}",
]
# the end of Mistral Small 3.1's chat template: BOS, the system prompt, then each user turn's text blocks in [INST]
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- if messages[0]['content'] is string %}"
    "{%- set system_message = messages[0]['content'] %}{%- else %}"
    "{%- set system_message = messages[0]['content'][0]['text'] %}{%- endif %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set system_message = '' %}"
    "{%- set loop_messages = messages %}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system_message + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in loop_messages %}{%- if message['role'] == 'user' %}{%- if message['content'] is string %}"
    "{{- '[INST]' + message['content'] + '[/INST]' }}{%- else %}{{- '[INST]' }}"
    "{%- for block in message['content'] %}{%- if block['type'] == 'text' %}{{- block['text'] }}"
    "{%- elif block['type'] in ['image', 'image_url'] %}{{- '[IMG]' }}{%- endif %}{%- endfor %}"
    "{{- '[/INST]' }}{%- endif %}{%- endif %}{%- endfor %}"
)


def write_mistral_processor(dst: Path, *, padding_side: str = "left"):
    """A small byte-level BPE with Mistral's special tokens saved as the release's ``tokenizer/`` (a
    ``PixtralProcessor`` folder: the tokenizer's files, ``chat_template.jinja``, ``processor_config.json``,
    ``preprocessor_config.json``). transformers' ``PixtralProcessor`` needs torchvision, which is not installed
    here: the tokenizer is returned (and diffusers' pipeline is given it); for text-only chats the processor's
    ``apply_chat_template`` renders the same template and tokenizes the text without special tokens, as the
    tokenizer's does."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side=padding_side,
    )
    fast.chat_template = MISTRAL_CHAT_TEMPLATE
    fast.save_pretrained(dst)
    (dst / "processor_config.json").write_text(
        json.dumps(
            {
                "image_break_token": "[IMG_BREAK]",
                "image_end_token": "[IMG_END]",
                "image_token": "[IMG]",
                "patch_size": 16,
                "processor_class": "PixtralProcessor",
                "spatial_merge_size": 2,
            }
        )
    )
    (dst / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "PixtralImageProcessor",
                "patch_size": 14,
                "size": {"longest_edge": 1540},
                "processor_class": "PixtralProcessor",
            }
        )
    )
    return fast


def mistral3_text_encoder(vocab_size: int, seed: int = 0, text: dict | None = None):
    """A tiny random transformers ``Mistral3ForConditionalGeneration`` (fp32, eval); ``text``: changes to
    :data:`MISTRAL_TEXT`."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Mistral3Config(
        text_config={**MISTRAL_TEXT, **(text or {}), "vocab_size": vocab_size, "model_type": "mistral"},
        vision_config={**PIXTRAL_VISION, "model_type": "pixtral"},
        image_token_index=10,
        spatial_merge_size=1,
    )
    return perturb(Mistral3ForConditionalGeneration(cfg), seed + 1, 0.05).eval()


def make_dev_folder(
    dst: Path,
    seed: int = 0,
    *,
    padding_side: str = "left",
    transformer: dict | None = None,
    text: dict | None = None,
    vae: dict | None = None,
) -> Path:
    """A random tiny FLUX.2 [dev] pipeline saved by diffusers' ``Flux2Pipeline.save_pretrained``, its index naming
    ``PixtralProcessor`` for the tokenizer as the release's does; ``text`` / ``vae``: changes to :data:`MISTRAL_TEXT` /
    the tiny VAE."""
    import json

    import diffusers

    processor = write_mistral_processor(dst / "tokenizer", padding_side=padding_side)
    pipe = diffusers.Flux2Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=flux2_vae(seed + 10, **(vae or {})),
        text_encoder=mistral3_text_encoder(len(processor), seed + 20, text),
        tokenizer=processor,
        transformer=flux2_transformer(
            seed + 30,
            joint_attention_dim=3 * {**MISTRAL_TEXT, **(text or {})}["hidden_size"],
            guidance_embeds=True,
            **(transformer or {}),
        ),
    )
    pipe.save_pretrained(dst)
    index = json.loads((dst / "model_index.json").read_text())
    index["tokenizer"] = ["transformers", "PixtralProcessor"]  # the release's (see write_mistral_processor)
    (dst / "model_index.json").write_text(json.dumps(index, indent=2))
    return dst


def diffusers_dev_folder(folder: Path):
    """diffusers' whole ``Flux2Pipeline`` loaded from a saved folder."""
    import diffusers
    from transformers import Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

    pipe = diffusers.Flux2Pipeline(  # from its parts: the index's PixtralProcessor needs torchvision (see above)
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(folder / "vae"),
        text_encoder=Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder").eval(),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer"),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# GPT-2's pre-tokenizer regex (what the tiny BPE's ByteLevel pre-tokenizer splits by), as a tekken.json pattern
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def tekken_json(tokenizer_dir: Path) -> bytes:
    """The tiny tokenizer (:func:`write_mistral_processor`) as Mistral's ``tekken.json`` (what ComfyUI's Mistral files
    carry as ``tekken_model``): its control tokens as ``special_tokens`` at their ids, every other token by rank (id
    minus the special count) as base64 bytes, GPT-2's split pattern."""
    import base64
    import json

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"]
    to_byte = {c: b for b, c in bytes_to_unicode().items()}
    n = len(SPECIAL)
    assert [vocab[s] for s in SPECIAL] == list(range(n))
    pieces = sorted((i, p) for p, i in vocab.items() if i >= n)
    assert [i for i, _ in pieces] == list(range(n, n + len(pieces)))
    tekken = {
        "config": {
            "pattern": GPT2_PATTERN,
            "num_vocab_tokens": len(pieces),
            "default_vocab_size": n + len(pieces),
            "default_num_special_tokens": n,
            "version": "v7",
        },
        "vocab": [
            {"rank": i - n, "token_bytes": base64.b64encode(bytes(to_byte[c] for c in p)).decode(), "token_str": None}
            for i, p in pieces
        ],
        "special_tokens": [{"rank": i, "token_str": s, "is_control": True} for i, s in enumerate(SPECIAL)],
    }
    return json.dumps(tekken).encode()
