"""Random tiny FLUX.2 [klein] parts saved in diffusers' layouts, for parity tests of sdengine's FLUX.2 VAE, transformer
and pipeline against diffusers' ``AutoencoderKLFlux2`` / ``Flux2Transformer2DModel`` / ``Flux2KleinPipeline``.

The VAE is FLUX.2's at a fraction of the width: two levels (4x; sizes are then multiples of 8 here, 4 x the 2x2
patches; 16 for the real 8x VAE), 4 latent channels (16 numbers per 2x2 patch), a wider decoder than encoder
(``decoder_block_out_channels``), random batch-norm statistics. The transformer: one double and two single blocks of
two 16-wide heads, RoPE axes 4 + 4 + 4 + 4, 24-wide text states.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

FLUX2_VAE = dict(
    down_block_types=["DownEncoderBlock2D"] * 3,
    up_block_types=["UpDecoderBlock2D"] * 3,
    block_out_channels=[8, 16, 16],
    decoder_block_out_channels=[8, 16, 32],
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=64,
)
FLUX2_TRANSFORMER = dict(
    in_channels=16,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=24,
    timestep_guidance_channels=32,
    axes_dims_rope=[4, 4, 4, 4],
    guidance_embeds=False,
)
# FLUX.2 [klein]'s scheduler config (scheduler/scheduler_config.json of black-forest-labs/FLUX.2-klein-4B)
FLUX2_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    shift_terminal=None,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)


def perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def flux2_vae(seed: int = 0, **overrides):
    """A tiny random diffusers ``AutoencoderKLFlux2`` (fp32, eval) with random batch-norm statistics."""
    import diffusers

    torch.manual_seed(seed)
    vae = perturb(diffusers.AutoencoderKLFlux2(**{**FLUX2_VAE, **overrides}), seed + 1, 0.02).eval()
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        vae.bn.running_mean.copy_(torch.randn(vae.bn.running_mean.shape, generator=g) * 0.5)
        vae.bn.running_var.copy_(torch.rand(vae.bn.running_var.shape, generator=g) * 2 + 0.25)
    return vae


def flux2_transformer(seed: int = 0, **overrides):
    """A tiny random diffusers ``Flux2Transformer2DModel`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.Flux2Transformer2DModel(**{**FLUX2_TRANSFORMER, **overrides})
    return perturb(model, seed + 1, 0.1).eval()


def save_parts(dst: Path, seed: int = 0, **transformer: object) -> Path:
    """The tiny transformer, VAE and scheduler as a diffusers folder's ``transformer/``, ``vae/`` and ``scheduler/``."""
    import diffusers

    flux2_transformer(seed + 30, **transformer).save_pretrained(dst / "transformer")
    flux2_vae(seed + 10).save_pretrained(dst / "vae")
    diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER).save_pretrained(dst / "scheduler")
    return dst


def diffusers_klein(folder: Path, *, distilled: bool = False):
    """diffusers' ``Flux2KleinPipeline`` over a folder's saved parts (no text encoder: prompt embeddings given)."""
    import diffusers

    pipe = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer"),
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# Qwen3 at a fraction of the width: 27 layers (FLUX.2 [klein] reads layers 9, 18 and 27) of 16, two 8-wide query heads
# over one key / value head; three stacked layers make the transformer's 48-wide text input
QWEN3_TEXT = dict(
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=27,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=8,
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    tie_word_embeddings=False,
)
# the end of Qwen3's chat template (a user turn, the assistant turn opened, thinking off): enough for one user message
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + "
    "'\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is "
    "defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


def qwen3_text_encoder(vocab_size: int, seed: int = 0):
    """A tiny random transformers ``Qwen3ForCausalLM`` (fp32, eval)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, **QWEN3_TEXT)).eval()
    return perturb(model, seed + 1, 0.05)


# the release's facts a single file's config takes (128-wide heads, RoPE 32 x 4; 32 GroupNorm groups in the VAE), at
# the smallest size: one head, VAE widths of 32
FILE_TRANSFORMER = dict(attention_head_dim=128, num_attention_heads=1, axes_dims_rope=[32, 32, 32, 32])
FILE_VAE = dict(block_out_channels=[32, 32, 32], decoder_block_out_channels=[32, 32, 64], norm_num_groups=32)


def make_klein_folder(
    dst: Path,
    seed: int = 0,
    *,
    distilled: bool = False,
    transformer: dict | None = None,
    vae: dict | None = None,
) -> Path:
    """A random tiny FLUX.2 [klein] pipeline saved by diffusers' ``Flux2KleinPipeline.save_pretrained``: the parts
    above (``transformer`` / ``vae``: config overrides), a Qwen3 text encoder and Qwen2's tokenizer
    (``_qwen_models``' tiny BPE) with Qwen3's chat template."""
    import diffusers
    from transformers import Qwen2TokenizerFast

    from _qwen_models import write_qwen_tokenizer

    write_qwen_tokenizer(dst / "tokenizer")
    tokenizer = Qwen2TokenizerFast.from_pretrained(dst / "tokenizer")
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    pipe = diffusers.Flux2KleinPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
        vae=flux2_vae(seed + 10, **(vae or {})),
        text_encoder=qwen3_text_encoder(len(tokenizer), seed + 20),
        tokenizer=tokenizer,
        transformer=flux2_transformer(
            seed + 30, joint_attention_dim=3 * QWEN3_TEXT["hidden_size"], **(transformer or {})
        ),
        is_distilled=distilled,
    )
    pipe.save_pretrained(dst)
    return dst


def diffusers_klein_folder(folder: Path):
    """diffusers' whole ``Flux2KleinPipeline`` loaded from a saved folder (text encoder included)."""
    import diffusers

    pipe = diffusers.Flux2KleinPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_klein_inpaint(folder: Path, *, distilled: bool = False):
    """diffusers' ``Flux2KleinInpaintPipeline`` over a folder's saved parts (no text encoder: prompt embeddings
    given)."""
    import diffusers

    pipe = diffusers.Flux2KleinInpaintPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        vae=diffusers.AutoencoderKLFlux2.from_pretrained(folder / "vae"),
        text_encoder=None,
        tokenizer=None,
        transformer=diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer"),
        is_distilled=distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
