"""Random tiny Flux.1 pipelines (dev: with the guidance embedding; schnell: without) saved as diffusers folders
by diffusers itself, for parity tests of sdengine's Flux pipeline against ``FluxPipeline`` /
``FluxImg2ImgPipeline``, and the same weights as BFL / ComfyUI single files.

The architecture is Flux.1's at a fraction of the width: a transformer with one double-stream and two
single-stream blocks of one 128-wide head (Flux.1's head and RoPE axes 16 + 56 + 56), 16 latent channels (64
numbers per 2x2 patch); a 16-channel VAE without quant convs, with Flux's scaling and shift factors and 32 groups
per norm (two levels: 2x, so sizes are multiples of 4 here, 16 for the real 8x VAE). Every width is one a file's
shapes tell (as for the real models), so the single-file routes load the same weights. A CLIP-L-shaped text
encoder (64-wide heads, as CLIP's; sdengine's shipped CLIP vocabulary); a T5 v1.1-shaped
encoder (gated GELU, T5's relative-attention distance 128) on T5 v1.1's vocabulary (sdengine's shipped one);
Flux's ``FlowMatchEulerDiscreteScheduler`` configs (dev: dynamic shifting; schnell: none).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from _folder_cache import built_once

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

FLUX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
    block_out_channels=[32, 32],
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
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
    attention_head_dim=128,
    num_attention_heads=1,
    joint_attention_dim=32,
    pooled_projection_dim=64,
    axes_dims_rope=[16, 56, 56],
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


def perturbed(module: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Random weights that are not the zero-initialised ones (adaLN-Zero gates, output projections)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def write_t5_tokenizer(dst: Path) -> Path:
    """sdengine's shipped T5 v1.1 vocabulary (Flux's ``tokenizer_2``) as a transformers ``T5TokenizerFast`` folder
    (``tokenizer.json``): the single-file routes, which carry no tokenizer, use the same one."""
    import gzip

    from transformers import T5TokenizerFast

    from sdengine.text.t5_tokenizer import shipped_tokenizer_path

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes(gzip.decompress(shipped_tokenizer_path().read_bytes()))
    fast = T5TokenizerFast(tokenizer_file=str(dst / "tokenizer.json"), eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(dst)
    return dst


# FLUX.1 Fill's and Depth / Canny's transformers take more numbers per image token than they give: Fill 64 noise
# + 64 masked-image latent + the mask folded f x f per latent pixel (f = the VAE's factor, 2 here, 8 in Flux.1:
# 4 x 4 = 16 here, 256 there), Depth / Canny 64 noise + 64 control latent
FILL_IN_CHANNELS = 64 + 64 + 4 * 2 * 2
CONTROL_IN_CHANNELS = 64 + 64


def flux_components(*, guidance: bool, seed: int = 0, in_channels: int = 64) -> dict:
    """The tiny random diffusers / transformers components of a Flux pipeline (no tokenizers, no scheduler);
    ``in_channels`` above 64: a Fill or Depth / Canny transformer (64 out)."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    shape = {**FLUX_TRANSFORMER, "in_channels": in_channels, "out_channels": 64}
    transformer = perturbed(diffusers.FluxTransformer2DModel(**shape, guidance_embeds=guidance), seed + 1).eval()
    vae = perturbed(diffusers.AutoencoderKL(**FLUX_VAE), seed + 2, 0.02).eval()
    clip = perturbed(CLIPTextModel(CLIPTextConfig(**CLIP_L)), seed + 3, 0.02).eval()
    t5 = perturbed(T5EncoderModel(T5Config(vocab_size=32128, **T5)), seed + 4, 0.02).eval()  # T5 v1.1's table
    return {"transformer": transformer, "vae": vae, "text_encoder": clip, "text_encoder_2": t5}


@built_once  # a second call with the same arguments copies the first one's folder
def make_flux_folder(dst: Path, *, guidance: bool = True, seed: int = 0, kind: str = "plain") -> Path:
    """Write a random tiny FLUX.1 [dev] (``guidance``) or [schnell] pipeline as a diffusers folder; ``kind``
    "fill" or "control": a FLUX.1 Fill (``FluxFillPipeline``) or Depth / Canny (``FluxControlPipeline``) one."""
    import diffusers
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdengine.weights.loading import write_clip_tokenizer

    in_channels = {"plain": 64, "fill": FILL_IN_CHANNELS, "control": CONTROL_IN_CHANNELS}[kind]
    parts = flux_components(guidance=guidance, seed=seed, in_channels=in_channels)
    write_clip_tokenizer(dst / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(dst / "tokenizer")
    write_t5_tokenizer(dst / "tokenizer_2")
    tokenizer_2 = T5TokenizerFast.from_pretrained(dst / "tokenizer_2")
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**(DEV_SCHEDULER if guidance else SCHNELL_SCHEDULER))
    cls = {
        "plain": diffusers.FluxPipeline,
        "fill": diffusers.FluxFillPipeline,
        "control": diffusers.FluxControlPipeline,
    }
    pipe = cls[kind](scheduler=scheduler, tokenizer=tokenizer, tokenizer_2=tokenizer_2, **parts)
    pipe.save_pretrained(dst)
    return dst


def diffusers_flux(folder: Path, *, img2img: bool = False, cls_name: str | None = None):
    """diffusers' Flux pipeline for ``folder`` (fp32, CPU, no progress bar); ``cls_name``: another of diffusers'
    Flux-family pipelines (``FluxFillPipeline``, ``FluxControlPipeline``, ``FluxControlImg2ImgPipeline``,
    ``ChromaPipeline``, ...)."""
    import diffusers

    cls = (
        getattr(diffusers, cls_name)
        if cls_name
        else diffusers.FluxImg2ImgPipeline
        if img2img
        else diffusers.FluxPipeline
    )
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
