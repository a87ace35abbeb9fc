"""Random tiny Z-Image models saved in the real layouts, for parity tests of sdengine's Z-Image transformer and
pipeline against diffusers' ``ZImageTransformer2DModel`` / ``ZImagePipeline`` / ``ZImageImg2ImgPipeline``.

The transformer is Z-Image's at a fraction of the width: 64 wide (two 32-wide heads, RoPE axes 8 + 12 + 12), two
main layers and two refiner layers of each kind, 16 latent channels, a 48-wide caption input. The VAE is the tiny
FLUX.1-style one of ``_flux_models`` (16 channels, Flux's scaling and shift, 2x).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from _folder_cache import built_once

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

Z_TRANSFORMER = dict(
    all_patch_size=[2],
    all_f_patch_size=[1],
    in_channels=16,
    dim=64,
    n_layers=2,
    n_refiner_layers=2,
    n_heads=2,
    n_kv_heads=2,
    norm_eps=1e-5,
    qk_norm=True,
    cap_feat_dim=48,
    rope_theta=256.0,
    t_scale=1000.0,
    axes_dims=[8, 12, 12],
    axes_lens=[1536, 64, 64],
)
# Tongyi-MAI/Z-Image-Turbo's scheduler/scheduler_config.json
Z_SCHEDULER = dict(num_train_timesteps=1000, use_dynamic_shifting=False, shift=3.0)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights that are not the zero-initialised ones (pad tokens, ...)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def z_transformer(seed: int = 0, **overrides):
    """A tiny random diffusers ``ZImageTransformer2DModel`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.ZImageTransformer2DModel(**{**Z_TRANSFORMER, **overrides})
    return perturb(model, seed + 1).eval()


# A Qwen3 language model at a fraction of the width: 48 wide (the transformer's cap_feat_dim here), three layers of 4
# query heads over 2 key / value heads of 12, q/k norms (transformers' Qwen3ForCausalLM, as the release's
# text_encoder/)
QWEN3_TEXT = dict(
    hidden_size=48,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=12,
    max_position_embeddings=2048,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=False,
)
# Qwen3's chat template, cut to what a single user message with add_generation_prompt reads (the release's template
# writes the same text for it: the message, then the assistant turn, an empty think block when enable_thinking is
# false)
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def qwen3_text_encoder(seed: int, vocab_size: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(**QWEN3_TEXT, vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=0)
    return perturb(Qwen3ForCausalLM(cfg), seed + 1, 0.02).eval()


def write_qwen3_tokenizer(dst: Path) -> Path:
    """The tiny Qwen2 BPE tokenizer of ``_qwen_models`` with Qwen3's chat template."""
    from transformers import Qwen2TokenizerFast

    from _qwen_models import write_qwen_tokenizer

    write_qwen_tokenizer(dst)
    tok = Qwen2TokenizerFast.from_pretrained(dst)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.save_pretrained(dst)
    return dst


# 128-wide heads (the release's): a single file's config comes from its shapes, which assume them
WIDE_TRANSFORMER = dict(dim=128, n_heads=1, n_kv_heads=1, axes_dims=[32, 48, 48])


@built_once
def make_z_folder(dst: Path, seed: int = 0, *, wide_heads: bool = False) -> Path:
    """A random tiny Z-Image pipeline saved by diffusers' ``ZImagePipeline.save_pretrained``: the transformer above
    (``wide_heads``: :data:`WIDE_TRANSFORMER`'s), the tiny FLUX.1-style VAE, a tiny Qwen3, Qwen2's tokenizer with
    Qwen3's template, Turbo's scheduler."""
    import diffusers
    from transformers import Qwen2TokenizerFast

    from _flux_models import FLUX_VAE

    write_qwen3_tokenizer(dst / "tokenizer")
    tokenizer = Qwen2TokenizerFast.from_pretrained(dst / "tokenizer")
    torch.manual_seed(seed + 10)
    vae = perturb(diffusers.AutoencoderKL(**FLUX_VAE), seed + 11, 0.02).eval()
    pipe = diffusers.ZImagePipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**Z_SCHEDULER),
        vae=vae,
        text_encoder=qwen3_text_encoder(seed + 20, len(tokenizer)),
        tokenizer=tokenizer,
        transformer=z_transformer(seed + 30, **(WIDE_TRANSFORMER if wide_heads else {})),
    )
    pipe.save_pretrained(dst)
    return dst


def diffusers_z(folder: Path, *, img2img: bool = False):
    import diffusers

    cls = diffusers.ZImageImg2ImgPipeline if img2img else diffusers.ZImagePipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
