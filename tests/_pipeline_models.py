"""Random Stable Diffusion pipelines saved as diffusers folders, for end-to-end tests of sdengine's pipeline
against diffusers' own pipelines (the oracle) on the same weights.

``make_sd_folder(dst, size="tiny"|"medium", kind="sd1"|"sd2"|"inpaint"|"inpaint4"|"ip2p")`` writes a folder with a
random U-Net, VAE and CLIP text encoder (sdengine's TINY/MEDIUM presets in diffusers' classes), sdengine's
shipped CLIP vocabulary as the tokenizer (so both sides tokenise alike), and the scheduler config SD 1.5
(PNDM) or SD 2.1 (DDIM, v-prediction) ships. ``diffusers_pipeline(folder, kind)`` loads the oracle.
ControlNet and LoRA tests can build their base model here too.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import torch

from sdengine.models.clip_text import CLIPTextConfig
from sdengine.models.unet import MEDIUM_SD, TINY_SD
from sdengine.models.vae import MEDIUM, TINY

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

SD1_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    skip_prk_steps=True,
    clip_sample=False,
    timestep_spacing="leading",
    num_train_timesteps=1000,
)
SD2_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    prediction_type="v_prediction",
    timestep_spacing="leading",
    num_train_timesteps=1000,
)


def configs(size: str, kind: str):
    """(UNetConfig, VAEConfig, CLIPTextConfig) of sdengine presets for a test model."""
    if size == "tiny":
        unet, vae = TINY_SD, TINY
        text = CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
    elif size == "medium":
        unet, vae = MEDIUM_SD, MEDIUM
        text = CLIPTextConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    else:
        raise ValueError(size)
    if kind == "sd2":
        text = dataclasses.replace(text, hidden_act="gelu")
        unet = dataclasses.replace(unet, use_linear_projection=True, upcast_attention=True)
    if kind == "inpaint":
        unet = dataclasses.replace(unet, in_channels=9)
    if kind == "ip2p":  # instruct-pix2pix: the noisy latent + the image's latent
        unet = dataclasses.replace(unet, in_channels=8)
    unet = dataclasses.replace(unet, cross_attention_dim=text.hidden_size)
    return unet, vae, text


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Default init plus noise, so that unit/zero-initialised layers (norms, biases) matter too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return module


def make_sd_folder(dst: Path, *, size: str = "tiny", kind: str = "sd1", seed: int = 0) -> Path:
    """Write a random SD pipeline as a diffusers folder at ``dst`` (kind: sd1, sd2 (v-prediction), inpaint
    (9-channel U-Net), inpaint4 (an SD1 model saved as an inpainting pipeline), ip2p (an 8-channel instruct-pix2pix
    U-Net))."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig as HFConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdengine.weights.loading import write_clip_tokenizer

    ucfg, vcfg, tcfg = configs(size, "sd1" if kind == "inpaint4" else kind)
    torch.manual_seed(seed)
    d = ucfg.to_diffusers()
    d.pop("_class_name")
    unet = _perturb(UNet2DConditionModel(**d), seed + 1)
    d = vcfg.to_diffusers()
    d.pop("_class_name")
    vae = _perturb(AutoencoderKL(**d), seed + 2)
    text_encoder = _perturb(CLIPTextModel(HFConfig(**tcfg.to_transformers())).eval(), seed + 3)
    write_clip_tokenizer(dst / "tokenizer", pad="!" if kind == "sd2" else None)
    tokenizer = CLIPTokenizer.from_pretrained(dst / "tokenizer")
    if kind == "sd2":
        scheduler = DDIMScheduler(**SD2_SCHEDULER)
    else:
        scheduler = PNDMScheduler(**{k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"})
    cls = _pipeline_class(kind)
    pipe = cls(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(dst)
    return dst


def _pipeline_class(kind: str, img2img: bool = False):
    import diffusers

    if kind in ("inpaint", "inpaint4"):
        return diffusers.StableDiffusionInpaintPipeline
    if kind == "ip2p":
        return diffusers.StableDiffusionInstructPix2PixPipeline
    return diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline


def diffusers_pipeline(folder: Path, kind: str = "sd1", *, img2img: bool = False):
    """diffusers' pipeline for ``folder``, fp32 on the CPU, progress bar off."""
    pipe = _pipeline_class(kind, img2img).from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_scheduler(folder: Path, sampler: str, schedule: str = "normal"):
    """The diffusers scheduler that sdengine's table names for ``sampler``, from the folder's own scheduler
    config (not from a pipeline's current scheduler, whose config carries another class's defaults)."""
    import json

    import diffusers

    from sdengine.diffusion import sampling

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    cls_name, kwargs = sampling.diffusers_equivalent(sampler, schedule, config)
    local = {}
    if cls_name in ("LMSDiscreteScheduler", "DPMSolverSDEScheduler"):
        from _sampler_parity import DPMSolverSDEScheduler, LMSDiscreteScheduler

        local = {"LMSDiscreteScheduler": LMSDiscreteScheduler, "DPMSolverSDEScheduler": DPMSolverSDEScheduler}
    cls = local.get(cls_name) or getattr(diffusers, cls_name)
    return cls.from_config(kwargs)


def picture(width: int, height: int, seed: int = 0):
    """A smooth colourful RGB test picture (PIL) of the given size."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 0.5 + 0.5 * np.sin(x / max(width, 1) * 2 * math.pi + seed)
    g = 0.5 + 0.5 * np.cos(y / max(height, 1) * 3 * math.pi)
    b = ((x + y) / (width + height)).astype(np.float32)
    a = (np.stack([r, g, b], -1) * 255).round().astype(np.uint8)
    return Image.fromarray(a)


def mask_picture(width: int, height: int):
    """White (repaint) rectangle in the middle of a black (keep) mask, grayscale PIL."""
    import numpy as np
    from PIL import Image

    m = np.zeros((height, width), np.uint8)
    m[height // 4 : 3 * height // 4, width // 3 : 5 * width // 6] = 255
    return Image.fromarray(m, mode="L")
