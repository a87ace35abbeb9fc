"""``sdengine train controlnet``: teach a ControlNet to steer a frozen Stable Diffusion model.

The recipe of the paper (Zhang et al. 2023, section 3.3) and of diffusers' ``train_controlnet.py``: the base
model (U-Net, VAE, text encoder) is locked; a ControlNet starts as a copy of the U-Net's encoder
(:meth:`ControlNet.from_unet`, zero convolutions at zero, so step 0 reproduces the base model exactly);
each step noises a training image's latent to a random timestep and regresses the U-Net's prediction,
with the ControlNet's residuals added, on the usual target (eps or v). Only the ControlNet learns.

Data: a folder of images, captioned kohya-style (``cat.png`` + ``cat.txt``; missing captions are empty
prompts). The control map of each image is made by a preprocessor (``condition``: canny, softedge, ...)
or read from ``condition_dir`` (the same relative paths), so one photo folder is enough for edge models.
Latents, text states and control maps are computed once up front (small sets; the base is frozen).
A fraction ``cond_dropout`` (formerly ``empty_prompt_p``) of captions is replaced by the empty prompt, which
teaches the ControlNet to work without text (guess mode) and with classifier-free guidance.

Mixed precision, EMA, gradient clipping, checkpoints and exact resume come from the shared loop
(``train.loop``). The result is written as a diffusers ControlNet folder (``OUT/controlnet``:
``config.json`` + ``diffusion_pytorch_model.safetensors``) that ``load_controlnet`` and diffusers read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from .. import distributed
from ..control import PREPROCESSORS, ControlNetError, load_control_image, preprocess, save_controlnet
from ..diffusion.loss import TIMESTEP_SAMPLINGS, DiffusionLoss, check_cond_dropout
from ..models.controlnet import ControlNet
from .checkpoint import ensure_new_run, locks_out_dir, model_identity
from .compat import renamed_fields
from .loop import TrainConfig, TrainResult, data_indices, train


@renamed_fields(empty_prompt_p="cond_dropout")
@dataclass
class ControlNetTrainSpec:
    """What to train, besides the optimisation settings in :class:`TrainConfig`."""

    model: str  # the base: a diffusers folder, a single file, or a built-in name
    data: str  # folder of training images (+ .txt captions)
    condition: str = "canny"  # preprocessor making the control map from each image
    condition_dir: str | None = None  # or: ready-made control maps with the same relative paths
    condition_options: dict[str, float] = field(default_factory=dict)
    resolution: int | None = None  # None: the base model's training size
    # Fraction of captions replaced by the empty prompt. The paper's 50%: with half the steps text-free, the
    # ControlNet must carry the structure itself; at 5% it learned to lean on the prompt and barely steered.
    cond_dropout: float = 0.5
    # Fraction of the kept (not dropped) captions swapped for another training image's caption while the target
    # stays this image: the ControlNet learns that the control map decides the structure when the prompt
    # disagrees (with captions that always match the control, a prompt of another subject overrides it).
    caption_mismatch: float = 0.0
    timestep_sampling: str = "uniform"  # or "cubic": biased to the noisy steps that lay out the image
    save_dtype: str | None = None  # dtype of the exported weights (fp16, bf16, fp32); None: as trained (fp32)
    controlnet_init: str | None = None  # continue from an existing ControlNet instead of from_unet
    sample_prompt: str | None = None  # prompt of the --sample-every images; None: the first training caption

    def __post_init__(self) -> None:
        if self.condition not in PREPROCESSORS:
            raise ControlNetError(f"unknown condition {self.condition!r}; valid: {', '.join(PREPROCESSORS)}")
        check_cond_dropout(self.cond_dropout)
        if not 0.0 <= float(self.caption_mismatch) <= 1.0:
            raise ControlNetError(f"caption_mismatch must be in [0, 1], got {self.caption_mismatch}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            valid = ", ".join(TIMESTEP_SAMPLINGS)
            raise ControlNetError(f"unknown timestep sampling {self.timestep_sampling!r}; valid: {valid}")


@dataclass
class PreparedData:
    latent_mean: Tensor  # (N, 4, h, w) scaled latents of the posterior mean
    latent_std: Tensor  # (N, 4, h, w)
    text: Tensor  # (N, L, D) text states of the captions
    empty_text: Tensor  # (1, L, D) of the empty prompt
    control: Tensor  # (N, 3, H, W) in [0, 1]
    paths: list[str]
    pooled: Tensor | None = None  # (N, D) pooled text vectors, for a U-Net that reads them (emoji)
    empty_pooled: Tensor | None = None  # (1, D)
    captions: list[str] = field(default_factory=list)


def _control_map(spec: ControlNetTrainSpec, path: Path, root: Path, size: int) -> Image.Image:
    from ..data.folders import resize_center_crop

    if spec.condition_dir is not None:
        rel = path.relative_to(root)
        cands = [Path(spec.condition_dir) / rel] + [
            (Path(spec.condition_dir) / rel).with_suffix(s) for s in (".png", ".jpg", ".jpeg", ".webp")
        ]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise ControlNetError(f"no control map for {path} under {spec.condition_dir} (expected {cands[0]})")
        img = load_control_image(found)
    else:
        img = load_control_image(path)
    img = resize_center_crop(img, size)  # the same crop as the training image
    opts = {k: v for k, v in spec.condition_options.items()}
    return preprocess(spec.condition, img, **opts) if spec.condition_dir is None else img


@torch.no_grad()
def prepare_data(spec: ControlNetTrainSpec, pipe: Any, device: torch.device) -> PreparedData:
    """Encode every image (VAE posterior), caption (the pipeline's conditioner) and control map once."""
    from ..data.folders import ImageFolder
    from ..prompts import pad_to_length

    resolution = spec.resolution
    assert resolution is not None, "train_controlnet fills in the model's size"
    ds = ImageFolder(spec.data, size=resolution, channels=3)
    means, stds, captions, controls = [], [], [], []
    vae = pipe.vae
    for i in range(len(ds)):
        item = ds[i]
        x = item["image"][None].to(device=device, dtype=next(vae.parameters()).dtype)  # (1, 3, S, S) in [-1, 1]
        post = vae.encode(x)
        means.append(vae.scale_latents(post.mean.float()).cpu())
        stds.append((post.std.float() * vae.config.scaling_factor).cpu())
        captions.append(item["caption"])
        cmap = _control_map(spec, Path(item["path"]), Path(spec.data), resolution)
        controls.append(torch.from_numpy(np.asarray(cmap, dtype=np.float32) / 255.0).permute(2, 0, 1))
    # One row per caption; long CLIP captions give more 77-token chunks and the conditioner pads every row to
    # the longest with the empty prompt's chunk. The empty prompt (condition dropout) is padded the same way.
    cond, uncond = pipe.conditioner(captions), pipe.conditioner.empty(1)
    texts = cond["crossattn"].float().cpu()
    empty = uncond["crossattn"].float().cpu()
    if empty.shape[1] < texts.shape[1]:
        empty = pad_to_length(empty, texts.shape[1], empty[:, :77])
    pooled = empty_pooled = None
    if "vector" in cond:  # a U-Net with a pooled-text projection (the emoji model)
        pooled, empty_pooled = cond["vector"].float().cpu(), uncond["vector"].float().cpu()
    return PreparedData(
        torch.cat(means),
        torch.cat(stds),
        texts,
        empty,
        torch.stack(controls),
        [str(p) for p in ds.paths],
        pooled,
        empty_pooled,
        captions,
    )


def caption_rows(idx: Tensor, dropped: Tensor, n: int, mismatch: float, generator: torch.Generator) -> Tensor:
    """The caption row of each example: its own (``idx``), or for a fraction ``mismatch`` of the rows that are
    not ``dropped`` another image's, drawn uniformly among the other ``n - 1`` (an offset of 1..n-1, so never the
    image itself). Always draws the same (B,) uniforms and (B,) offsets, whatever ``mismatch`` is."""
    b = idx.shape[0]
    swap = (torch.rand((b,), generator=generator, device=idx.device) < mismatch) & ~dropped
    other = (idx + torch.randint(1, max(n, 2), (b,), generator=generator, device=idx.device)) % n
    return torch.where(swap, other, idx)


@locks_out_dir
def train_controlnet(
    spec: ControlNetTrainSpec,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force_resume: bool = False,
) -> tuple[TrainResult, Path]:
    """Train; returns the loop's result and the exported diffusers ControlNet folder (``OUT/controlnet``).

    A folder that already holds a run is refused unless ``resume`` or ``overwrite`` (see ``ensure_new_run``)."""
    from ..pipeline import Pipeline, load_pipeline

    device = distributed.setup(device)  # under torchrun: this rank's device, the process group
    progress = progress and distributed.current_world().is_main
    out_dir = Path(out_dir)
    # Before loading models: a bad --resume, or a finished run that would be overwritten, fails at once.
    # what the run learns from: another model or condition of the same shape would train on without a word
    trained_on = {
        "model_id": ("--model", model_identity(spec.model)),
        "condition": ("--condition", spec.condition),
    }
    # what the run started from: on --resume the checkpoint's weights replace --init's, so another --init (or
    # none, or one for a run that started from the U-Net copy) would be taken without effect: refused
    init_id = model_identity(spec.controlnet_init) if spec.controlnet_init is not None else None
    ensure_new_run(
        out_dir,
        resume=resume,
        overwrite=overwrite,
        outputs=["controlnet", "samples"],
        same={"init": ("--init", init_id)},
        data=spec.data,
        trained_on=trained_on,
        force_resume=force_resume,
    )
    pipe = load_pipeline(spec.model, device=device, dtype="fp32")
    if not isinstance(pipe, Pipeline):
        raise ControlNetError(f"{spec.model}: a ControlNet needs a Stable Diffusion model (U-Net + VAE + text)")
    unet = pipe.unet.requires_grad_(False).eval()
    factor = pipe.vae_scale_factor
    # The model's own training size unless given, as train lora (512 on a 64-px model is 60x slower).
    resolution = spec.resolution if spec.resolution is not None else pipe.default_size
    spec = dataclasses.replace(spec, resolution=resolution)
    if resolution % factor:
        raise ControlNetError(f"resolution {resolution} must be a multiple of the VAE factor {factor}")
    data = prepare_data(spec, pipe, device)
    if progress:
        from .settings import settings_line

        print(
            settings_line(
                "controlnet",
                model=spec.model,
                resolution=resolution,
                images=len(data.paths),
                cfg=cfg,
                device=device,
                condition=spec.condition,
                init=spec.controlnet_init,
            ),
            flush=True,
        )

    torch.manual_seed(cfg.seed)  # the hint encoder's random initialisation
    if spec.controlnet_init is not None:
        from ..control import load_controlnet

        loaded = load_controlnet(spec.controlnet_init, base=unet.config)
        net = ControlNet(loaded.config)  # trainable fp32 parameters in ordinary memory (not the file's map)
        net.load_state_dict(loaded.state_dict())
    else:
        levels = max(1, int(round(np.log2(factor)))) + 1  # the hint encoder must downsample by the VAE factor
        widths = (16, 32, 96, 256)[-levels:] if levels <= 4 else (16,) * (levels - 4) + (16, 32, 96, 256)
        net = ControlNet.from_unet(unet, conditioning_embedding_out_channels=tuple(widths))
    net.requires_grad_(True)

    schedule = pipe.noise_schedule
    loss = DiffusionLoss(
        schedule.alphas_cumprod.to(device),
        pipe.prediction_type,
        cond_dropout=spec.cond_dropout,
        timestep_sampling=spec.timestep_sampling,
    )
    mean, std = data.latent_mean.to(device), data.latent_std.to(device)
    text, empty = data.text.to(device), data.empty_text.to(device)
    control = data.control.to(device)
    pooled = data.pooled.to(device) if data.pooled is not None else None
    empty_pooled = data.empty_pooled.to(device) if data.empty_pooled is not None else None
    n = mean.shape[0]
    if spec.caption_mismatch > 0 and len(set(data.captions)) < 2:
        raise ControlNetError("caption_mismatch needs at least two different captions in the training data")
    # Asked of the network itself: under torchrun the loss gets it wrapped in DistributedDataParallel.
    takes_class = getattr(net, "class_embedding", None) is not None

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        b = idx.shape[0]
        eps_latent = torch.randn(mean[idx].shape, generator=g, device=device)
        x0 = mean[idx] + std[idx] * eps_latent  # a fresh posterior sample each step, as diffusers does
        noise = loss.noise(x0, g)  # this trainer's draw order: noise, timesteps, dropout
        t = loss.timesteps(b, g)
        drop = loss.dropped(b, g)
        cap = caption_rows(idx, drop, n, spec.caption_mismatch, g)  # drawn after the others
        ctx = loss.drop(text[cap], empty, drop)
        x_t = loss.noisy(x0, t, noise)
        extra: dict[str, Tensor] = {}
        r = distributed.local_rows(b)  # this rank's rows; the draws above are made for the whole batch
        if pooled is not None and empty_pooled is not None:  # dropped with the caption
            extra["class_labels"] = loss.drop(pooled[cap], empty_pooled, drop)[r]
        net_extra = extra if takes_class else {}
        down, mid = m(x_t[r], t[r], control[idx[r]], encoder_hidden_states=ctx[r], **net_extra)
        out = unet(
            x_t[r],
            t[r],
            encoder_hidden_states=ctx[r],
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            **extra,
        )
        return loss(out, x0[r], noise[r], t[r])

    meta = {
        "kind": "controlnet",
        "base": str(spec.model),
        "model_id": model_identity(spec.model),
        "condition": spec.condition,
        "init": init_id,
        "controlnet_config": net.config.to_diffusers(),
        "images": len(data.paths),
        "cond_dropout": spec.cond_dropout,
        "caption_mismatch": spec.caption_mismatch,
        "timestep_sampling": spec.timestep_sampling,
    }
    sample_fn = None
    if cfg.sample_every > 0:
        from .samples import write_sample

        prompt = spec.sample_prompt if spec.sample_prompt is not None else (data.captions or [""])[0]
        hint = Image.fromarray((data.control[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))

        def sample_fn(_ema: nn.Module, step: int, _path: Path) -> None:
            # The trained module itself (the current weights) steers the ordinary pipeline call.
            write_sample(
                pipe,
                prompt,
                step,
                out_dir,
                seed=cfg.seed,
                size=resolution,
                modules=[net],
                training=f"ControlNet at step {step}",
                controlnets=[(net, hint, 1.0)],
            )

    result = train(
        net, loss_fn, cfg, out_dir, device=device, resume=resume, sample_fn=sample_fn, progress=progress, meta=meta
    )

    from .checkpoint import load_checkpoint

    state = load_checkpoint(result.checkpoint)
    export = ControlNet(net.config)
    export.load_state_dict(state["ema"]["model"])  # with ema_decay 0 (the default here) the raw weights
    folder = out_dir / "controlnet"
    if distributed.current_world().is_main:  # under torchrun rank 0 writes, the others wait
        folder = save_controlnet(export.eval(), folder, dtype=spec.save_dtype)
    distributed.barrier()
    return result, folder
