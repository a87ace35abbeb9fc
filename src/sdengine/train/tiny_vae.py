"""``sdengine train tiny-vae``: distil a tiny autoencoder (TAESD's architecture) from a model's full VAE.

The tiny decoder learns to draw what the full decoder draws from the same latents; it never sees the model's
training objective. Each step takes a batch of images in [-1, 1], their latents under the full VAE's encoder
(the posterior's mode, or a fresh posterior sample with ``latents="sample"``), scaled by the VAE's
``scaling_factor`` as the diffusion model sees them (``z``), and:

- decoder: ``L1 + MSE`` between ``tiny.decode(z)`` and the full VAE's ``decode(z)`` clamped to [-1, 1] (its
  picture, not the training image: the tiny decoder should be a stand-in for the full one, artefacts and all);
  ``image_weight`` (default 0) adds the same loss against the training image itself;
- encoder (``encoder=True``, the default; diffusers loads an ``AutoencoderTiny`` folder only with both halves):
  ``MSE`` between ``tiny.encode(image)`` and the full encoder's scaled posterior mean, times ``encoder_weight``.

``keep_decoder`` (a tiny VAE file or folder) adds an encoder to a tiny VAE that has only a decoder: that decoder
is copied, frozen and written out unchanged, and only the encoder is trained (its loss alone; no decode runs).

With the mode (the default) the full VAE's decodes are computed once, before the first step, for every training
image and its mirror image; a step is then the tiny network's forward and backward pass alone. (The emoji VAE's
posterior standard deviation is under 1% of its latents' spread, so sampling changes the targets by little and
costs a full decode per step.)

Data: a folder of images (``data``, resized and centre-cropped to the model's size), or the emoji renders
(:class:`~sdengine.data.emoji.EmojiDataset`) for a model in the emoji model's format. A fixed part of the images
(``eval_images``, 256 by default, at most a fifth; chosen by a fixed seed whatever ``--seed`` is, so runs compare)
is held out: the final evaluation reports the PSNR of the tiny decoder against the full decoder on them.

The architecture is TAESD's (ReLU residual blocks, no attention, no normalisation) with one level per factor
2 of the VAE's downscaling (8x: 4 levels, TAESD itself; 4x: 3; 2x: 2), decoder blocks ``(3, ..., 3, 1)``,
encoder blocks ``(1, 3, ..., 3)``, the same width ``channels`` at every level (as diffusers builds it). By
default TAESD's 64, capped at the full VAE's narrowest (full-resolution) width, so that the tiny decoder is
cheaper than the full one: for SD's VAE that is TAESD exactly; the emoji VAE has 32 channels at full resolution
(its decoder is small already), and a 64-wide tiny decoder measured as slow as it on the CPU (a 32-wide one
about 4.5x faster).

Optimisation (AdamW, linear warm-up then a constant rate, EMA, gradient clipping, checkpoints, exact resume,
``max_seconds``) is the shared loop's (:mod:`sdengine.train.loop`); the exported weights are the EMA's. The result
is a diffusers ``AutoencoderTiny`` folder (``OUT/config.json`` + ``OUT/diffusion_pytorch_model.safetensors``, fp16
by default) that :func:`~sdengine.weights.tiny_vae_file.load_tiny_vae` and ``load_pipeline(..., tiny_vae=OUT)``
read (copied to a model folder's ``vae_tiny/`` it is loaded with the model), with ``OUT/train_summary.json`` (the
evaluation) and ``OUT/compare.png`` (held-out images: the image, the full VAE's decode, the tiny one's).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from sdengine.errors import SdengineError

from .. import distributed
from ..models.tiny_vae import TinyAutoencoder, TinyVAEConfig, taesd_config
from ..models.vae import AutoencoderKL, VAEConfig
from .checkpoint import ensure_new_run, load_checkpoint, locks_out_dir, model_identity
from .loop import TrainConfig, TrainResult, data_indices, train

LatentMode = Literal["mode", "sample"]
LATENT_MODES: tuple[str, ...] = ("mode", "sample")
SAVE_DTYPES: tuple[str, ...] = ("fp16", "bf16", "fp32")
TAESD_WIDTH = 64  # TAESD's channels at every level
SPLIT_SEED = 0  # the held-out images do not depend on --seed: runs with different seeds are evaluated alike
EMOJI_DATA = "emoji"
SUMMARY_NAME = "train_summary.json"
COMPARE_NAME = "compare.png"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
OUTPUTS: tuple[str, ...] = ("config.json", WEIGHTS_NAME, SUMMARY_NAME, COMPARE_NAME)


class TinyVAETrainingError(SdengineError, ValueError):
    """A user mistake in the tiny VAE trainer's inputs (one line on stderr)."""


@dataclass
class TinyVAETrainSpec:
    """What to distil, besides the optimisation settings in :class:`~sdengine.train.loop.TrainConfig`."""

    model: str  # the model whose VAE is distilled: a diffusers folder, a single file or a built-in name
    data: str | None = None  # a folder of images; None or "emoji": the emoji renders (emoji-format models only)
    resolution: int | None = None  # None: the model's training size
    channels: int | None = None  # the width of every level; None: see the module docstring
    encoder: bool = True  # distil the encoder too
    latents: LatentMode = "mode"
    image_weight: float = 0.0  # weight of the loss against the training image itself
    encoder_weight: float = 1.0
    flip: bool = True  # train on the mirror images too
    eval_images: int = 256  # held out for the evaluation (at most a fifth of the images)
    save_dtype: str = "fp16"
    keep_decoder: str | None = None  # a tiny VAE whose decoder is kept as it is: only an encoder is trained

    def __post_init__(self) -> None:
        if self.channels is not None and (
            not isinstance(self.channels, int) or isinstance(self.channels, bool) or not 1 <= self.channels <= 1024
        ):
            raise TinyVAETrainingError(f"channels must be an integer in [1, 1024], got {self.channels!r}")
        if self.latents not in LATENT_MODES:
            raise TinyVAETrainingError(f"latents must be one of {', '.join(LATENT_MODES)}, got {self.latents!r}")
        for name in ("image_weight", "encoder_weight"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise TinyVAETrainingError(f"{name.replace('_', ' ')} must be a number >= 0, got {v!r}")
        if self.resolution is not None and self.resolution < 1:
            raise TinyVAETrainingError(f"resolution must be >= 1 pixel, got {self.resolution}")
        if self.eval_images < 1:  # the run is judged on them (0 once crashed inside torch.cat)
            raise TinyVAETrainingError(f"eval images must be >= 1, got {self.eval_images}")
        if self.save_dtype not in SAVE_DTYPES:
            raise TinyVAETrainingError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")
        if self.keep_decoder is not None and not self.encoder:
            raise TinyVAETrainingError("keep decoder trains an encoder: it cannot be combined with no encoder")


# ---------------------------------------------------------------------------------------------- architecture


def tiny_config_for(vae: VAEConfig, channels: int | None = None, *, encoder: bool = True) -> TinyVAEConfig:
    """TAESD's layout with as many levels as ``vae``'s downscaling needs (see the module docstring)."""
    width = min(TAESD_WIDTH, min(vae.block_out_channels)) if channels is None else channels
    cfg = taesd_config(vae.downscale_factor, vae.latent_channels, channels=width, image_channels=vae.out_channels)
    return dataclasses.replace(cfg, has_encoder=encoder)


class Distill(nn.Module):
    """The trained module: ``forward(z, images) -> (tiny.decode(z), tiny.encode(images) or None)``, so that the
    shared loop's DistributedDataParallel wrapper sees both halves called through ``forward``."""

    def __init__(self, tiny: TinyAutoencoder, *, train_decoder: bool = True) -> None:
        super().__init__()
        self.tiny = tiny
        self.train_decoder = train_decoder  # False: the decoder is kept frozen and not run (keep_decoder)

    def forward(self, z: Tensor, images: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        decoded = self.tiny.decode(z) if self.train_decoder else None
        encoded = self.tiny.encode(images) if images is not None and self.tiny.encoder is not None else None
        return decoded, encoded


# ---------------------------------------------------------------------------------------------- data


def load_images(spec: TinyVAETrainSpec, pipe: Any, resolution: int) -> tuple[Tensor, str]:
    """The training and evaluation images ``(N, 3, S, S)`` in [-1, 1], and what they are (for the summary)."""
    if spec.data is not None and (spec.data != EMOJI_DATA or Path(spec.data).is_dir()):
        from ..data.folders import ImageFolder

        folder = ImageFolder(spec.data, size=resolution, channels=3)
        check_memory(len(folder.paths), resolution, flip=spec.flip, device=pipe.device)
        return folder.stack(), str(spec.data)
    if spec.data is None and getattr(pipe, "text_kind", None) != "minilm":
        raise TinyVAETrainingError(
            f"{spec.model}: give --data FOLDER (images to distil on); the emoji renders are the default only for "
            "the emoji model's format"
        )
    from ..data.emoji import EmojiDataset

    return EmojiDataset(size=resolution).images, EMOJI_DATA


def data_bytes(n_images: int, resolution: int, *, flip: bool) -> int:
    """Memory the images and the full decoder's targets take: the stacked fp32 images, then every training row
    (each image, and its mirror image with ``flip``) as fp16 image and fp16 target (the latents are 64x smaller)."""
    pixels = 3 * resolution * resolution
    return n_images * pixels * 4 + n_images * (2 if flip else 1) * pixels * 2 * 2


def check_memory(n_images: int, resolution: int, *, flip: bool, device: torch.device) -> None:
    """Refuse, before reading the images, a data set whose precomputed targets would not fit in memory."""
    from ..vae_utils import available_memory

    need, free = data_bytes(n_images, resolution, flip=flip), available_memory(torch.device("cpu"))
    if device.type == "cuda":
        free = min(x for x in (free, available_memory(device)) if x is not None) if free is not None else None
    if free is not None and need > 0.8 * free:
        raise TinyVAETrainingError(
            f"{n_images} images at {resolution}x{resolution} need about {need / 2**30:.1f} GiB for the full decoder's "
            f"targets, more than the {free / 2**30:.1f} GiB free: use fewer images or a smaller --resolution"
        )


def split_indices(n: int, eval_images: int) -> tuple[Tensor, Tensor]:
    """(training, held-out) indices: ``min(eval_images, n // 5)`` images held out, drawn with a fixed seed."""
    held = min(eval_images, n // 5)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    return perm[held:].sort().values, perm[:held].sort().values


@dataclass
class DistillData:
    """Images and what the full VAE makes of them (stored in fp16 to halve the memory of large sets)."""

    images: Tensor  # (N, 3, S, S) in [-1, 1]
    mean: Tensor  # (N, C, h, w) scaled posterior mean (float32)
    std: Tensor  # (N, C, h, w) scaled posterior std (float32)
    target: Tensor  # (N, 3, S, S) the full decoder's image of the mean, clamped to [-1, 1]


@torch.no_grad()
def prepare_data(
    vae: AutoencoderKL,
    images: Tensor,
    *,
    flip: bool,
    device: torch.device,
    batch: int = 64,
    desc: str = "",
    targets: bool = True,
) -> DistillData:
    """Encode every image (and its mirror image with ``flip``) and decode its posterior mean with the full VAE
    (``targets=False``: no decode, ``target`` empty; an encoder trained alone never reads it)."""
    rows = torch.cat([images, images.flip(-1)]) if flip else images
    dtype = next(vae.parameters()).dtype
    out: dict[str, list[Tensor]] = {"images": [], "mean": [], "std": [], "target": []}
    starts = range(0, rows.shape[0], batch)
    bar = None
    if desc and distributed.current_world().is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=rows.shape[0], desc=desc, unit="img", dynamic_ncols=True)
    for i in starts:
        x = rows[i : i + batch].to(device=device, dtype=dtype)
        post = vae.encode(x)
        out["images"].append(x.half())
        out["mean"].append(vae.scale_latents(post.mean).float())
        out["std"].append((post.std * vae.config.scaling_factor).float())
        if targets:
            out["target"].append(vae.decode(post.mean).float().clamp(-1, 1).half())
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if not targets:
        out["target"] = [torch.empty(0, dtype=torch.float16)]
    return DistillData(**{k: torch.cat(v) for k, v in out.items()})


# ---------------------------------------------------------------------------------------------- evaluation


def psnr_8bit(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR (dB) of two batches in [-1, 1], on pixels quantised to 8 bits (as the images are saved)."""
    qa = ((a.float().clamp(-1, 1) + 1) * 127.5).round()
    qb = ((b.float().clamp(-1, 1) + 1) * 127.5).round()
    mse = (qa - qb).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-3)
    return 10 * torch.log10(255.0**2 / mse)


@torch.no_grad()
def evaluate(tiny: TinyAutoencoder, data: DistillData, vae: AutoencoderKL | None = None, batch: int = 64) -> dict:
    """Mean PSNRs on ``data`` (held-out images): the tiny decoder against the full decoder (the number that
    matters), the full VAE and the tiny decoder against the images themselves, and with an encoder (and ``vae``)
    the tiny encoder's latent MSE (and its share of the latents' variance) and the PSNR of the full decoder's
    image of the tiny encoder's latents against that of the full encoder's."""
    n = data.images.shape[0]
    if n == 0:
        return {}
    device = next(tiny.parameters()).device
    sums: dict[str, float] = {}

    def add(key: str, values: Tensor) -> None:
        sums[key] = sums.get(key, 0.0) + float(values.double().sum())

    was_training = tiny.training
    tiny.eval()
    for i in range(0, n, batch):
        x = data.images[i : i + batch].to(device).float()
        z = data.mean[i : i + batch].to(device)
        full = data.target[i : i + batch].to(device).float()
        dec = tiny.decode(z).float()
        add("psnr_tiny_vs_full_db", psnr_8bit(dec, full))
        add("psnr_full_vs_image_db", psnr_8bit(full, x))
        add("psnr_tiny_vs_image_db", psnr_8bit(dec, x))
        if tiny.encoder is not None:
            zt = tiny.encode(x).float()
            add("encoder_latent_mse", (zt - z).pow(2).mean(dim=(1, 2, 3)))
            if vae is not None:
                vdtype = next(vae.parameters()).dtype
                redecoded = vae.decode(vae.unscale_latents(zt).to(vdtype)).float()
                add("psnr_tiny_encoder_db", psnr_8bit(redecoded, full))
    tiny.train(was_training)
    result = {k: v / n for k, v in sums.items()}
    if "encoder_latent_mse" in result:
        result["encoder_latent_mse_relative"] = result["encoder_latent_mse"] / float(data.mean.float().var())
    return result


def write_comparison(tiny: TinyAutoencoder, data: DistillData, path: Path, count: int = 8) -> Path:
    """A grid of ``count`` held-out images: the image, the full VAE's decode, the tiny decoder's."""
    from ..io.images import make_grid, save_image_atomic

    k = min(count, data.images.shape[0])
    device = next(tiny.parameters()).device
    with torch.no_grad():
        dec = tiny.decode(data.mean[:k].to(device)).float().cpu()
    rows = torch.cat([data.images[:k].float(), data.target[:k].float(), dec]).clamp(-1, 1).add(1).div(2)
    size = rows.shape[-1]
    grid = make_grid(rows, k, row_labels=["image", "full VAE", "tiny VAE"], scale=max(1, 128 // size))
    return save_image_atomic(grid, path)


# ---------------------------------------------------------------------------------------------- training


def _kept_decoder(source: str, cfg: TinyVAEConfig) -> tuple[TinyAutoencoder, TinyVAEConfig]:
    """The tiny VAE of ``source`` (its decoder to keep) and the config to train: ``cfg``'s encoder beside that
    decoder. One line when it has no decoder or does not fit the model's latents."""
    from ..weights.io import WeightsError
    from ..weights.tiny_vae_file import load_tiny_vae

    try:
        kept = load_tiny_vae(source)
    except (OSError, WeightsError) as e:
        raise TinyVAETrainingError(f"keep decoder: {e}") from None
    k = kept.config
    if kept.decoder is None:
        raise TinyVAETrainingError(f"keep decoder: {source} has no decoder")
    if k.latent_channels != cfg.latent_channels or k.downscale_factor != cfg.downscale_factor:
        raise TinyVAETrainingError(
            f"keep decoder: {source} decodes {k.latent_channels}-channel latents at {k.downscale_factor}x, the model's "
            f"are {cfg.latent_channels}-channel at {cfg.downscale_factor}x"
        )
    out = dataclasses.replace(
        cfg, decoder_channels=k.decoder_channels, decoder_blocks=k.decoder_blocks, has_decoder=True, has_encoder=True
    )
    return kept.float().eval(), out


@dataclass
class TinyVAETrainOutput:
    result: TrainResult
    model: TinyAutoencoder  # the exported weights (rounded through the saved dtype: what the file holds)
    folder: Path
    summary: dict[str, Any] = field(default_factory=dict)


@locks_out_dir
def train_tiny_vae(
    spec: TinyVAETrainSpec,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: str | torch.device = "cpu",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    force_resume: bool = False,
) -> TinyVAETrainOutput:
    """Distil; write the tiny VAE folder, the summary and the comparison grid to ``out_dir``.

    A folder that already holds a run is refused unless ``resume`` or ``overwrite`` (see ``ensure_new_run``)."""
    from ..pipeline import Pipeline, load_pipeline

    device = distributed.setup(device)
    world = distributed.current_world()
    progress = progress and world.is_main
    out_dir = Path(out_dir)
    kept_id = model_identity(spec.keep_decoder) if spec.keep_decoder is not None else None
    ensure_new_run(
        out_dir,
        resume=resume,
        overwrite=overwrite,
        outputs=OUTPUTS,
        # the decoder a --keep-decoder run started beside (exported as it is): a resumed run with another, or none,
        # would export a decoder its encoder was not trained with, or drop the one it trained
        same={"keep_decoder": ("--keep-decoder", kept_id)},
        data=spec.data,
        trained_on={"model_id": ("--model", model_identity(spec.model))},
        force_resume=force_resume,
    )
    pipe = load_pipeline(spec.model, device=device, dtype="fp32")
    if not isinstance(pipe, Pipeline) or not isinstance(getattr(pipe, "vae", None), AutoencoderKL):
        raise TinyVAETrainingError(f"{spec.model}: a tiny VAE needs a latent diffusion model with a VAE")
    vae: AutoencoderKL = pipe.vae.eval().requires_grad_(False)
    factor = vae.config.downscale_factor
    resolution = spec.resolution if spec.resolution is not None else pipe.default_size
    if resolution % factor:
        raise TinyVAETrainingError(f"resolution {resolution} must be a multiple of the VAE's factor {factor}")
    tiny_cfg = tiny_config_for(vae.config, spec.channels, encoder=spec.encoder)
    kept = None
    if spec.keep_decoder is not None:
        kept, tiny_cfg = _kept_decoder(spec.keep_decoder, tiny_cfg)

    images, data_name = load_images(spec, pipe, resolution)
    train_idx, eval_idx = split_indices(images.shape[0], spec.eval_images)
    if train_idx.numel() == 0:
        raise TinyVAETrainingError("no training images")
    if eval_idx.numel() == 0:
        raise TinyVAETrainingError(
            f"{images.shape[0]} images: too few to hold a fifth out for the evaluation (give 5 or more)"
        )
    if progress:
        from .settings import settings_line

        print(
            settings_line(
                "tiny-vae",
                model=spec.model,
                resolution=resolution,
                images=int(train_idx.numel()),
                cfg=cfg,
                device=device,
                held_out=int(eval_idx.numel()),
                channels=tiny_cfg.decoder_channels[0],
                encoder=spec.encoder,
                latents=spec.latents,
                flip=spec.flip,
            ),
            flush=True,
        )
    desc = "full VAE" if progress else ""
    # With a kept decoder nothing is decoded while training: the full decoder's targets are not made
    data = prepare_data(vae, images[train_idx], flip=spec.flip, device=device, desc=desc, targets=kept is None)
    held = prepare_data(vae, images[eval_idx], flip=False, device=device)
    n = data.images.shape[0]

    torch.manual_seed(cfg.seed)  # the tiny network's random initialisation
    net = Distill(TinyAutoencoder(tiny_cfg), train_decoder=kept is None)
    if kept is not None:
        assert net.tiny.decoder is not None and kept.decoder is not None
        net.tiny.decoder.load_state_dict(kept.decoder.state_dict())
        net.tiny.decoder.requires_grad_(False)
    use_images = spec.encoder or spec.image_weight > 0

    def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> Tensor:
        idx = data_indices(step, cfg.batch_size, n, cfg.seed).to(data.mean.device)
        r = distributed.local_rows(idx.shape[0])  # this rank's rows; the draws are made for the whole batch
        z = data.mean[idx]
        if spec.latents == "sample" and kept is None:
            eps = torch.randn(z.shape, generator=g, device=g.device, dtype=z.dtype).to(z.device)
            z = z + data.std[idx] * eps
        x = data.images[idx[r]].float() if use_images else None
        decoded, encoded = m(z[r], x if spec.encoder else None)
        if decoded is None:  # keep_decoder: the encoder's loss alone (no full decode, no target)
            assert encoded is not None
            return spec.encoder_weight * (encoded.float() - data.mean[idx[r]]).pow(2).mean()
        if spec.latents == "sample":
            with torch.no_grad():
                target = vae.decode(vae.unscale_latents(z[r])).float().clamp(-1, 1)
        else:
            target = data.target[idx[r]].float()
        err = decoded.float() - target
        loss = err.abs().mean() + err.pow(2).mean()
        if spec.image_weight > 0 and x is not None:
            err_img = decoded.float() - x
            loss = loss + spec.image_weight * (err_img.abs().mean() + err_img.pow(2).mean())
        if encoded is not None:
            loss = loss + spec.encoder_weight * (encoded.float() - data.mean[idx[r]]).pow(2).mean()
        return loss

    history: list[dict[str, float]] = []

    def sample_fn(ema: nn.Module, step: int, _path: Path) -> None:
        if held.images.shape[0] == 0:
            return
        assert isinstance(ema, Distill)
        if kept is not None:  # the decoder does not change: follow the encoder
            ev = evaluate(ema.tiny, held, vae)
            history.append({"step": step, "psnr_tiny_encoder_db": round(ev["psnr_tiny_encoder_db"], 3)})
            if progress:
                from tqdm.auto import tqdm

                tqdm.write(
                    f"step {step}: held-out PSNR of the full decoder's image of the tiny encoder's latents (EMA) "
                    f"against its own round trip {ev['psnr_tiny_encoder_db']:.2f} dB"
                )
            return
        psnr = evaluate(ema.tiny, held)["psnr_tiny_vs_full_db"]
        history.append({"step": step, "psnr_tiny_vs_full_db": round(psnr, 3)})
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: held-out PSNR of the tiny decoder (EMA) against the full one {psnr:.2f} dB")

    meta = {
        "kind": "tiny_vae",
        "model": str(spec.model),
        "model_id": model_identity(spec.model),
        "tiny_vae_config": tiny_cfg.to_diffusers(),
        "keep_decoder": kept_id,
        "spec": asdict(spec),
    }
    result = train(
        net,
        loss_fn,
        cfg,
        out_dir,
        device=device,
        resume=resume,
        sample_fn=sample_fn,
        progress=progress,
        meta=meta,
    )

    export = Distill(TinyAutoencoder(tiny_cfg))
    export.load_state_dict(load_checkpoint(result.checkpoint)["ema"]["model"])
    if kept is not None:  # exactly the kept weights (an average of a constant can move it by a rounding step)
        assert export.tiny.decoder is not None and kept.decoder is not None
        export.tiny.decoder.load_state_dict(kept.decoder.state_dict())
    model = export.tiny.to(device).eval().requires_grad_(False)
    from ..weights.io import parse_dtype
    from ..weights.tiny_vae_file import save_tiny_vae

    save_dtype = parse_dtype(spec.save_dtype) or torch.float32
    with torch.no_grad():  # what the file holds: evaluate and return exactly that
        for p in model.parameters():
            p.copy_(p.to(save_dtype).float())
    model.name = out_dir.name or "tiny VAE"
    summary: dict[str, Any] = {}
    if world.is_main:
        save_tiny_vae(model, out_dir, dtype=spec.save_dtype)
        losses = result.losses
        tail = losses[-100:]
        summary = {
            "model": str(spec.model),
            "data": data_name,
            "resolution": resolution,
            "train_images": int(train_idx.numel()),
            "train_rows": n,
            "held_out_images": int(eval_idx.numel()),
            "steps": result.step,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "seed": cfg.seed,
            "train_seconds": round(result.seconds, 1),
            "final_loss": round(sum(tail) / len(tail), 6) if tail else None,
            "first_loss": round(sum(losses[:10]) / len(losses[:10]), 6) if losses else None,
            "latents": spec.latents,
            "image_weight": spec.image_weight,
            "encoder_weight": spec.encoder_weight if spec.encoder else None,
            "flip": spec.flip,
            "save_dtype": spec.save_dtype,
            "channels": tiny_cfg.decoder_channels[0],
            "decoder_blocks": list(tiny_cfg.decoder_blocks),
            "encoder": spec.encoder,
            "keep_decoder": spec.keep_decoder,
            "decoder_parameters": sum(p.numel() for p in model.decoder.parameters()) if model.decoder else 0,
            "encoder_parameters": sum(p.numel() for p in model.encoder.parameters()) if model.encoder else 0,
            "evaluation": {k: round(v, 6) for k, v in evaluate(model, held, vae).items()},
            "evaluation_history": history,
        }
        from ..io.atomic import write_text_atomic

        write_text_atomic(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
        if held.images.shape[0]:
            write_comparison(model, held, out_dir / COMPARE_NAME)
    distributed.barrier()
    return TinyVAETrainOutput(result, model, out_dir, summary)


__all__ = [
    "Distill",
    "DistillData",
    "TinyVAETrainOutput",
    "TinyVAETrainSpec",
    "TinyVAETrainingError",
    "evaluate",
    "load_images",
    "prepare_data",
    "psnr_8bit",
    "split_indices",
    "tiny_config_for",
    "train_tiny_vae",
    "write_comparison",
]
