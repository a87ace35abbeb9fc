"""Random tiny Flux.1 pipelines (dev: with the guidance embedding; schnell: without) saved as diffusers folders
by diffusers itself, for parity tests of sdengine's Flux pipeline against ``FluxPipeline`` /
``FluxImg2ImgPipeline``, and the same weights as BFL / ComfyUI single files.

The architecture is Flux.1's at a fraction of the width: a transformer with one double-stream and two
single-stream blocks (heads of 16 numbers, RoPE axes 4 + 6 + 6), 16 latent channels (64 numbers per 2x2
patch); a 16-channel VAE without quant convs and with Flux's scaling and shift factors (two levels: 2x, so sizes
are multiples of 4 here, 16 for the real 8x VAE); a CLIP-L-shaped text encoder (64-wide heads, as
CLIP's, so that its architecture reads off a file's shapes; sdengine's shipped CLIP vocabulary); a T5 v1.1-shaped
encoder (gated GELU, T5's relative-attention distance 128) on a tiny Unigram vocabulary built with ``tokenizers``;
Flux's ``FlowMatchEulerDiscreteScheduler`` configs (dev: dynamic shifting; schnell: none).
"""

from __future__ import annotations

import logging
import string
from pathlib import Path

import torch

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[16, 32],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
)
FLUX_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    num_layers=1,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    axes_dims_rope=[4, 6, 6],
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=1,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
T5 = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
    use_cache=False,
)
# Flux.1's scheduler configs (scheduler/scheduler_config.json of FLUX.1-dev and FLUX.1-schnell)
DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
SCHNELL_SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
WORDS = "a red apple on table blurry dark cat dog photo of the in with and".split()


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights that are not the zero-initialised ones (adaLN-Zero gates, output projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def write_t5_tokenizer(dst: Path) -> Path:
    """A tiny T5-style Unigram tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, Metaspace, ``</s>`` appended)
    as a transformers ``T5TokenizerFast`` folder (``tokenizer.json``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    for i, w in enumerate(WORDS):
        pieces.setdefault("▁" + w, -1.0 - 0.01 * i)
    for c in string.ascii_lowercase + string.digits + ",.!?()[]:":
        pieces.setdefault(c, -5.0)
    for c in string.ascii_lowercase:
        pieces.setdefault("▁" + c, -6.0)
    tok = Tokenizer(models.Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    dst.mkdir(parents=True, exist_ok=True)
    tok.save(str(dst / "tokenizer.json"))
    fast = T5TokenizerFast(
        tokenizer_file=str(dst / "tokenizer.json"), eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )
    fast.save_pretrained(dst)
    return dst


def flux_components(*, guidance: bool, seed: int = 0) -> dict:
    """The tiny random diffusers / transformers components of a Flux pipeline (no tokenizers, no scheduler)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = _perturb(
        diffusers.FluxTransformer2DModel(**FLUX_TRANSFORMER, guidance_embeds=guidance), seed + 1
    ).eval()
    vae = _perturb(diffusers.AutoencoderKL(**FLUX_VAE), seed + 2, 0.02).eval()
    clip = _perturb(CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed + 3, 0.02).eval()
    vocab = len(WORDS) + 80  # more than the tiny tokenizer's pieces
    t5 = _perturb(T5EncoderModel(T5Config(vocab_size=vocab, **T5)), seed + 4, 0.02).eval()
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


def make_flux_folder(dst: Path, *, guidance: bool = True, seed: int = 0) -> Path:
    """Write a random tiny FLUX.1 [dev] (``guidance``) or [schnell] pipeline as a diffusers folder."""
    import diffusers
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdengine.weights.loading import write_clip_tokenizer

    parts = flux_components(guidance=guidance, seed=seed)
    write_clip_tokenizer(dst / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(dst / "tokenizer")
    write_t5_tokenizer(dst / "tokenizer_2")
    tokenizer_2 = T5TokenizerFast.from_pretrained(dst / "tokenizer_2")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    pipe = diffusers.FluxPipeline(scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2, **parts)
    pipe.save_pretrained(dst)
    return dst


def diffusers_flux(folder: Path, *, img2img: bool = False):
    """diffusers' Flux pipeline for ``folder`` (fp32, CPU, no progress bar)."""
    import diffusers

    cls = diffusers.FluxImg2ImgPipeline if img2img else diffusers.FluxPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
