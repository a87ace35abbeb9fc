"""``sdengine train ddpm``: a pixel-space DDPM trained from scratch (Ho et al. 2020).

Each step draws a batch x0, a timestep t ~ U{0..T-1} per image and noise eps, forms
x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the closed-form forward process), and regresses the
U-Net's output on the prediction target (eps, v or x0) through the shared ``DiffusionLoss``. With
class conditioning, ``cond_dropout`` (10%; formerly ``label_dropout``) of labels are
replaced by a "no class" index so the same network also learns the unconditional model that
classifier-free guidance needs (Ho & Salimans 2022).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdengine.errors import UsageError

from .. import distributed
from ..ddpm import PixelDDPM, config_to_dict
from ..diffusion.loss import DiffusionLoss
from ..diffusion.schedules import NoiseSchedule
from ..imageio import make_grid, save_image_atomic
from ..models.unet import UNet, UNetConfig
from .checkpoint import ensure_new_run, locks_out_dir, model_identity
from .compat import renamed_fields
from .loop import TrainConfig, TrainResult, data_indices, train


@renamed_fields(label_dropout="cond_dropout")
@dataclass
class DDPMSpec:
    """What to train, besides the optimisation settings in :class:`TrainConfig`."""

    data: str = "fashion-mnist"  # or a folder of images
    class_conditional: bool = False
    image_size: int = 32
    channels: int = 1
    prediction: str = "epsilon"
    beta_schedule: str = "linear"
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    min_snr_gamma: float | None = None
    cond_dropout: float = 0.1  # fraction of labels replaced by the null class (class-conditional only)
    unet: UNetConfig | None = None  # default: the FASHION_MNIST preset, adapted to channels/classes


def load_training_data(spec: DDPMSpec) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None, int]:
    """Images in [-1, 1] as one tensor, labels (or None), class names, and the crop to undo padding."""
    if spec.data == "fashion-mnist":
        from ..data.fashion_mnist import FashionMNIST

        ds = FashionMNIST("train")
        if spec.image_size != 32 or spec.channels != 1:
            raise UsageError("fashion-mnist is 1-channel 32x32 (28x28 padded): use --size 32 --channels 1")
        return ds.images, ds.labels, ds.class_names, 2
    if spec.class_conditional:
        raise UsageError("--class-conditional needs labelled data (fashion-mnist); a folder has no classes")
    from ..data.folders import ImageFolder

    folder = ImageFolder(spec.data, size=spec.image_size, channels=spec.channels)  # type: ignore[arg-type]
    images = folder.stack()  # (N, C, H, W) in [-1, 1]
    return images, None, None, 0


def default_unet_config(spec: DDPMSpec, num_classes: int) -> UNetConfig:
    from ..models.unet import FASHION_MNIST

    base = spec.unet or FASHION_MNIST
    return dataclasses.replace(
        base,
        in_channels=spec.channels,
        out_channels=spec.channels,
        sample_size=spec.image_size,
        num_class_embeds=(num_classes + 1) if spec.class_conditional else None,
    )


@locks_out_dir
def train_ddpm(
    spec: DDPMSpec,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    data: tuple[torch.Tensor, torch.Tensor | None, list[str] | None, int] | None = None,
    samples: bool = True,
    force_resume: bool = False,
) -> tuple[TrainResult, PixelDDPM]:
    """Train and export the EMA model to ``out_dir/model`` (a folder ``PixelDDPM.load`` reads).

    ``samples=False``: no sample grids (``cfg.sample_every`` and the last step only plot the loss).
    Under torchrun every rank calls this; ``cfg.batch_size`` is the global batch and rank 0 writes the files."""
    device = distributed.setup(device)
    # Before the (slow) data loading: a bad --resume, or a finished run that would be overwritten, fails at once.
    # (the sample grids are the run's outputs too: --overwrite once left the old run's beside the new one)
    grids = sorted(p.name for p in Path(out_dir).glob("samples_*.png")) if Path(out_dir).is_dir() else []
    # what the weights mean: a conv U-Net has the same shapes at another --size, prediction or schedule, so a
    # --resume with another would train on without a word (``image_size`` and ``prediction_type`` are recorded
    # by every release's checkpoints; the data and the schedule since they are checked)
    trained_on = {
        "image_size": ("--size", spec.image_size),
        "prediction_type": ("--prediction", spec.prediction),
        "beta_schedule": ("--beta-schedule", spec.beta_schedule),
        "data_id": ("--data", model_identity(spec.data)),
    }
    ensure_new_run(
        out_dir,
        resume=resume,
        overwrite=overwrite,
        outputs=["model", *grids],
        data=spec.data,
        trained_on=trained_on,
        force_resume=force_resume,
    )
    images, labels, class_names, crop = data if data is not None else load_training_data(spec)
    if spec.class_conditional and labels is None:
        raise ValueError("class-conditional training needs labels")
    num_classes = len(class_names) if (spec.class_conditional and class_names) else 0
    ucfg = default_unet_config(spec, num_classes)
    torch.manual_seed(cfg.seed)  # the initial weights
    model = UNet(ucfg)
    schedule_config: dict[str, Any] = {
        "num_train_timesteps": spec.num_train_timesteps,
        "beta_schedule": spec.beta_schedule,
        "beta_start": spec.beta_start,
        "beta_end": spec.beta_end,
        "prediction_type": spec.prediction,
        "timestep_spacing": "leading",
        "steps_offset": 0,
    }
    schedule = NoiseSchedule.from_config(**schedule_config)
    loss = DiffusionLoss(
        schedule.alphas_cumprod.to(device), spec.prediction, spec.min_snr_gamma, cond_dropout=spec.cond_dropout
    )
    images = images.to(device)
    labels_d = labels.to(device) if labels is not None else None
    n = images.shape[0]
    null_class = num_classes if spec.class_conditional else None

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> torch.Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(device)
        x0 = images[idx]  # (B, C, H, W)
        b = x0.shape[0]
        t, noise, x_t = loss.draw(x0, g)
        cond: dict[str, torch.Tensor] = {}
        if labels_d is not None and null_class is not None:
            y = labels_d[idx]
            cond["class_labels"] = loss.drop(y, torch.tensor(null_class, device=device), loss.dropped(b, g))
        # The whole batch is drawn on every rank (same draws as one process); each computes its rows.
        r = distributed.local_rows(b)
        out = m(x_t[r], t[r], **{k: v[r] for k, v in cond.items()})
        return loss(out, x0[r], noise[r], t[r])

    def wrap(m: nn.Module) -> PixelDDPM:
        return PixelDDPM(
            unet=m,  # type: ignore[arg-type]
            schedule_config=schedule_config,
            prediction=spec.prediction,
            image_size=spec.image_size,
            channels=spec.channels,
            class_names=class_names if spec.class_conditional else None,
            crop=crop,
        )

    def sample_fn(ema_model: nn.Module, step: int, path: Path) -> None:
        was_training = ema_model.training
        ema_model.eval()
        pm = wrap(ema_model)
        if pm.num_classes:
            per = 8
            labs = [c for c in range(pm.num_classes) for _ in range(per)]
            imgs = pm.generate(labs, sampler="dpmpp_2m", steps=20, seed=0)
            grid = make_grid(imgs, per, row_labels=pm.class_names, scale=2)
        else:
            imgs = pm.generate(None, n=64, sampler="dpmpp_2m", steps=20, seed=0)
            grid = make_grid(imgs, 8, scale=2)
        save_image_atomic(grid, path)
        save_image_atomic(grid, path.with_name("samples_latest.png"))
        ema_model.train(was_training)

    meta = wrap(model).meta()
    meta["spec"] = {k: v for k, v in dataclasses.asdict(spec).items() if k != "unet"}
    meta["unet"] = config_to_dict(ucfg)
    meta["beta_schedule"], meta["data_id"] = spec.beta_schedule, model_identity(spec.data)
    result = train(
        model,
        loss_fn,
        cfg,
        out_dir,
        device=device,
        resume=resume,
        sample_fn=sample_fn if samples else None,
        progress=progress,
        meta=meta,
    )
    # Export the EMA weights as a model folder.
    from .checkpoint import load_checkpoint

    state = load_checkpoint(result.checkpoint)
    export = UNet(ucfg)
    export.load_state_dict(state["ema"]["model"])
    export.eval().requires_grad_(False)
    pm = wrap(export)
    if distributed.current_world().is_main:
        pm.save(Path(out_dir) / "model")
    distributed.barrier()
    return result, pm
