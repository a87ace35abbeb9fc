"""Random tiny SDXL pipelines (base and refiner) saved as diffusers folders by diffusers itself, for
parity tests of sdengine's SDXL support against ``StableDiffusionXLPipeline`` / ``...Img2ImgPipeline``.

The architecture is SDXL's at a fraction of the width: a U-Net with no attention at the first level,
per-level transformer depth, linear projections and the text_time added conditioning; CLIP-L-shaped and
bigG-shaped (with projection) text encoders; the VAE with SDXL's scaling factor; SDXL's Euler scheduler
config. sdengine's shipped CLIP vocabulary is the tokenizer (tokenizer_2 pads with "!", as SDXL's does).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from _folder_cache import built_once
from sdengine.models.clip_text import TINY_SDXL_G, CLIPTextConfig
from sdengine.models.unet_sdxl import TINY_SDXL, TINY_SDXL_REFINER
from sdengine.models.vae import TINY

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

SDXL_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
    prediction_type="epsilon",
    num_train_timesteps=1000,
)
TINY_SDXL_L = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
SDXL_VAE = dataclasses.replace(TINY, scaling_factor=0.13025)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def _diffusers_model(cls, cfg, seed: int):
    d = cfg.to_diffusers()
    d.pop("_class_name")
    return _perturb(cls(**d), seed)


def _text_encoder_2(seed: int):
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModelWithProjection

    d = TINY_SDXL_G.to_transformers()
    d["architectures"] = ["CLIPTextModelWithProjection"]
    return _perturb(CLIPTextModelWithProjection(HFConfig(**d)).eval(), seed)


@built_once  # a second call with the same arguments copies the first one's folder
def make_sdxl_folder(
    dst: Path, *, refiner: bool = False, inpaint: bool = False, ip2p: bool = False, seed: int = 0
) -> Path:
    """Write a random tiny SDXL base (or refiner, or 9-channel inpainting, or 8-channel instruct-pix2pix) pipeline
    as a diffusers folder."""
    import diffusers
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdengine.weights.loading import write_clip_tokenizer

    torch.manual_seed(seed)
    ucfg = TINY_SDXL_REFINER if refiner else TINY_SDXL
    if inpaint:
        ucfg = dataclasses.replace(ucfg, in_channels=9)
    if ip2p:
        ucfg = dataclasses.replace(ucfg, in_channels=8)
    unet = _diffusers_model(diffusers.UNet2DConditionModel, ucfg, seed + 1)
    vae = _diffusers_model(diffusers.AutoencoderKL, SDXL_VAE, seed + 2)
    text_encoder_2 = _text_encoder_2(seed + 4)
    write_clip_tokenizer(dst / "tokenizer_2", pad="!")
    tokenizer_2 = CLIPTokenizer.from_pretrained(dst / "tokenizer_2")
    scheduler = diffusers.EulerDiscreteScheduler(**SDXL_SCHEDULER)
    if refiner:
        pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=text_encoder_2,
            tokenizer=None,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            requires_aesthetics_score=True,
            force_zeros_for_empty_prompt=False,
        )
    else:
        text_encoder = _perturb(CLIPTextModel(HFConfig(**TINY_SDXL_L.to_transformers())).eval(), seed + 3)
        write_clip_tokenizer(dst / "tokenizer")
        tokenizer = CLIPTokenizer.from_pretrained(dst / "tokenizer")
        cls = diffusers.StableDiffusionXLInpaintPipeline if inpaint else diffusers.StableDiffusionXLPipeline
        if ip2p:
            cls = diffusers.StableDiffusionXLInstructPix2PixPipeline
        pipe = cls(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            unet=unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,
        )
    pipe.save_pretrained(dst)
    return dst


def diffusers_sdxl(folder: Path, *, img2img: bool = False, inpaint: bool = False, ip2p: bool = False):
    """diffusers' SDXL pipeline for ``folder`` (fp32, CPU, no progress bar)."""
    import diffusers

    cls = diffusers.StableDiffusionXLImg2ImgPipeline if img2img else diffusers.StableDiffusionXLPipeline
    if inpaint:
        cls = diffusers.StableDiffusionXLInpaintPipeline
    if ip2p:
        cls = diffusers.StableDiffusionXLInstructPix2PixPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
