"""Random tiny SD3 pipelines saved by diffusers itself (a diffusers folder) and rewritten in Stability's single-file
layout, for parity tests of sdengine's SD3 support against ``StableDiffusion3Pipeline`` and its img2img / inpaint
siblings.

The architecture is SD3's at a fraction of the width: an ``SD3Transformer2DModel`` (optionally with SD3.5's
MMDiT-X blocks and RMS-normed q/k), a 16-channel VAE without quant convs and with SD3's scaling and shift factors,
CLIP-L-like and bigG-like ``CLIPTextModelWithProjection`` encoders (64-wide heads, as the real ones: a single file's
configs are read off the shapes), a T5 encoder, SD3's ``FlowMatchEulerDiscreteScheduler`` (shift 3.0). sdengine's
shipped CLIP vocabulary is the CLIP tokenizer (tokenizer_2 pads with "!", as SD3's does) and its shipped T5 v1.1
vocabulary the T5 tokenizer (what a single file without tokenizers is read with).
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

import torch

from _folder_cache import built_once

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

SIZE = 32  # pixels: the 2x VAE gives 16x16 latents, 8x8 patches of 2
JOINT = 160  # T5's width = the MMDiT's joint width; CLIP-L 64 + bigG 64 = 128, zero-padded to it
SD3_VAE = dict(
    block_out_channels=(32, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,  # what a single file's VAE is read with (no weight shows the group count)
    sample_size=SIZE,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


@built_once  # a second call with the same arguments copies the first one's folder
def make_sd3_folder(dst: Path, *, seed: int = 0, sd35: bool = False, t5: bool = True) -> Path:
    """Write a random tiny SD3 (``sd35``: with SD3.5 Medium's MMDiT-X block and q/k norms) pipeline as a
    diffusers folder; ``t5`` False: no text_encoder_3 (model_index says null)."""
    import diffusers
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPTokenizer,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    from sdengine.text.t5_tokenizer import shipped_tokenizer_path
    from sdengine.weights.loading import write_clip_tokenizer

    torch.manual_seed(seed)
    extra = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if sd35 else {}
    transformer = _perturb(
        diffusers.SD3Transformer2DModel(
            sample_size=SIZE // 2,
            patch_size=2,
            in_channels=16,
            num_layers=2,  # Stability's layout has one head per block: a single file's config is read so
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=JOINT,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            out_channels=16,
            pos_embed_max_size=16,
            **extra,
        ),
        seed + 1,
        0.05,
    )
    vae = _perturb(diffusers.AutoencoderKL(**SD3_VAE), seed + 2)
    clip_l = CLIPTextConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=1, projection_dim=32
    )
    clip_g = CLIPTextConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=1,
        projection_dim=32,
        hidden_act="gelu",
    )
    te = _perturb(CLIPTextModelWithProjection(clip_l).eval(), seed + 3)
    te2 = _perturb(CLIPTextModelWithProjection(clip_g).eval(), seed + 4)
    write_clip_tokenizer(dst / "tokenizer")
    write_clip_tokenizer(dst / "tokenizer_2", pad="!")
    te3 = tok3 = None
    if t5:
        tj = dst / "_t5" / "tokenizer.json"  # sdengine's shipped T5 v1.1 vocabulary, SD3's tokenizer_3
        tj.parent.mkdir(parents=True, exist_ok=True)
        tj.write_bytes(gzip.decompress(shipped_tokenizer_path().read_bytes()))
        tok3 = T5TokenizerFast(tokenizer_file=str(tj), eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
        cfg = T5Config(
            vocab_size=32128,  # T5 v1.1's embedding rows (the vocabulary's 32100 pieces, padded)
            d_model=JOINT,
            d_kv=16,
            d_ff=96,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            use_cache=False,
        )
        te3 = _perturb(T5EncoderModel(cfg).eval(), seed + 5, 0.05)
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=te,
        tokenizer=CLIPTokenizer.from_pretrained(dst / "tokenizer"),
        text_encoder_2=te2,
        tokenizer_2=CLIPTokenizer.from_pretrained(dst / "tokenizer_2"),
        text_encoder_3=te3,
        tokenizer_3=tok3,
    )
    pipe.save_pretrained(dst)
    shutil.rmtree(dst / "_t5", ignore_errors=True)
    return dst


def write_single_file(folder: Path, dst: Path, *, clips: bool = True, t5: bool = True) -> Path:
    """The folder's weights in Stability's single-file layout: the MMDiT under ``model.diffusion_model.``
    (sdengine's writer of Stability's names), the VAE under ``first_stage_model.`` (LDM names), and with ``clips``
    / ``t5`` the text encoders under ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.`` (transformers' names)."""
    from safetensors.torch import load_file, save_file

    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers
    from sdengine.weights.mmdit_file import load_mmdit, sdengine_to_stability

    out: dict[str, torch.Tensor] = {}
    mmdit = load_mmdit(folder, dtype=torch.float32)
    for k, v in sdengine_to_stability(mmdit.state_dict(), mmdit.config).items():
        out["model.diffusion_model." + k] = v.contiguous()
    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    ldm, unknown = km.vae_diffusers_to_ldm(vae, vae_layout_from_diffusers(vae))
    assert not unknown, unknown
    out.update({"first_stage_model." + k: v.contiguous() for k, v in ldm.items()})
    if clips:
        for sub, name in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            for k, v in load_file(folder / sub / "model.safetensors").items():
                key = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
                out[f"text_encoders.{name}.transformer.{key}"] = v.contiguous()
    if t5 and (folder / "text_encoder_3").is_dir():
        for k, v in load_file(folder / "text_encoder_3" / "model.safetensors").items():
            out["text_encoders.t5xxl.transformer." + k] = v.contiguous()
    save_file(out, str(dst))
    return dst


def diffusers_sd3(folder: Path, kind: str = "txt2img", *, t5: bool = True):
    """diffusers' SD3 pipeline ("txt2img", "img2img", "inpaint") for ``folder`` (fp32, CPU, no progress bar);
    ``t5`` False: loaded without its T5 (text_encoder_3=None)."""
    import diffusers

    cls = {
        "txt2img": diffusers.StableDiffusion3Pipeline,
        "img2img": diffusers.StableDiffusion3Img2ImgPipeline,
        "inpaint": diffusers.StableDiffusion3InpaintPipeline,
    }[kind]
    extra = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = cls.from_pretrained(folder, local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe
