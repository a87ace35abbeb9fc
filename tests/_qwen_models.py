"""Random tiny Qwen-Image models saved in the real layouts, for parity tests of sdengine's Qwen-Image transformer
and pipeline against diffusers' ``QwenImageTransformer2DModel`` / ``QwenImagePipeline``.

The transformer is Qwen-Image's at a fraction of the width: two dual-stream blocks of two 32-wide heads (RoPE axes
8 + 12 + 12), 16 latent channels (64 numbers per 2x2 patch), a 48-wide text input.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

QWEN_TRANSFORMER = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=2,
    joint_attention_dim=48,
    axes_dims_rope=[8, 12, 12],
)
# Qwen-Image's scheduler config (scheduler/scheduler_config.json of Qwen/Qwen-Image)
QWEN_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights that are not the zero-initialised ones (adaLN-Zero gates, output projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def qwen_transformer(seed: int = 0, **overrides):
    """A tiny random diffusers ``QwenImageTransformer2DModel`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.QwenImageTransformer2DModel(**{**QWEN_TRANSFORMER, **overrides})
    return perturb(model, seed + 1).eval()


def save_qwen_transformer(dst: Path, seed: int = 0) -> Path:
    """The tiny transformer as a diffusers ``transformer/`` folder (config.json + safetensors)."""
    qwen_transformer(seed).save_pretrained(dst)
    return dst


# A Qwen2.5-VL text model at a fraction of the width: 48 wide (the transformer's joint_attention_dim here), two
# layers of 4 query heads over 2 key / value heads of 12 (the multimodal RoPE's sections 2 + 2 + 2 pairs), qkv biases
QWEN_TEXT = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    bos_token_id=0,
    eos_token_id=2,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 2]},
)
QWEN_VISION = dict(
    depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=48, fullatt_block_indexes=[0]
)
# AutoencoderKLQwenImage at a fraction of the width: two down levels (4x), so sizes are multiples of 8 here (4 x the
# 2x2 patches; 16 for the real 8x VAE); Qwen-Image's latents_mean / latents_std
QWEN_VAE = dict(base_dim=16, z_dim=16, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False])
LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the "
    "objects and background:",
    "system user assistant a red apple on a table, a cat sitting in the sun, blurry low quality, a photo of a dog",
]


def write_qwen_tokenizer(dst: Path) -> Path:
    """A small byte-level BPE tokenizer with Qwen2's special tokens, saved as transformers' ``Qwen2Tokenizer``
    folder (tokenizer.json, vocab.json, merges.txt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIAL
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    fast = Qwen2TokenizerFast(
        tokenizer_file=str(dst / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    fast.save_pretrained(dst)
    return dst


# 128-wide heads (every release's): a single file's config comes from its shapes, which assume them (ComfyUI's files)
WIDE_TEXT = dict(
    QWEN_TEXT,
    hidden_size=256,
    num_attention_heads=2,
    num_key_value_heads=1,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
)
WIDE_TRANSFORMER = dict(attention_head_dim=128, num_attention_heads=1, axes_dims_rope=[16, 56, 56], num_layers=1)


def qwen_text_encoder(seed: int = 0, vocab_size: int = 400, text: dict | None = None):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = text or QWEN_TEXT
    torch.manual_seed(seed)
    cfg = Qwen2_5_VLConfig(
        text_config={**text, "vocab_size": vocab_size},
        vision_config={**QWEN_VISION, "out_hidden_size": text["hidden_size"]},
        vocab_size=vocab_size,
        bos_token_id=0,
        eos_token_id=2,
    )
    return perturb(Qwen2_5_VLForConditionalGeneration(cfg), seed + 1, 0.02).eval()


def qwen_vae(seed: int = 0):
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLQwenImage(**QWEN_VAE, latents_mean=LATENTS_MEAN, latents_std=LATENTS_STD)
    return perturb(vae, seed + 1, 0.02).eval()


def make_qwen_folder(dst: Path, seed: int = 0, *, wide_heads: bool = False) -> Path:
    """A random tiny Qwen-Image pipeline saved by diffusers' ``QwenImagePipeline.save_pretrained``; ``wide_heads``:
    128-wide heads in the transformer and the text encoder (:data:`WIDE_TEXT`, :data:`WIDE_TRANSFORMER`), as the
    releases', so that single files written from it load with their configs read off the shapes."""
    import diffusers
    from transformers import Qwen2TokenizerFast

    write_qwen_tokenizer(dst / "tokenizer")
    tokenizer = Qwen2TokenizerFast.from_pretrained(dst / "tokenizer")
    pipe = diffusers.QwenImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER),
        vae=qwen_vae(seed + 10),
        text_encoder=qwen_text_encoder(seed + 20, len(tokenizer), WIDE_TEXT if wide_heads else QWEN_TEXT),
        tokenizer=tokenizer,
        transformer=qwen_transformer(
            seed + 30,
            **(WIDE_TRANSFORMER if wide_heads else {}),
            joint_attention_dim=(WIDE_TEXT if wide_heads else QWEN_TEXT)["hidden_size"],
        ),
    )
    pipe.save_pretrained(dst)
    return dst


def diffusers_qwen(folder: Path, *, img2img: bool = False):
    import diffusers

    cls = diffusers.QwenImageImg2ImgPipeline if img2img else diffusers.QwenImagePipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
