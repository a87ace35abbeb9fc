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
