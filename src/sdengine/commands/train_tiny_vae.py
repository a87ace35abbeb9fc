"""``sdengine train tiny-vae --model M --out DIR``: a tiny autoencoder (TAESD's architecture) distilled from a
model's full VAE, for live previews and fast decodes (see train/tiny_vae.py)."""

from __future__ import annotations

import argparse

from .common import add_force_resume, add_train_args
from .help_format import DefaultsHelpFormatter


def run(a: argparse.Namespace) -> int:
    from ..train.tiny_vae import TinyVAETrainingError, TinyVAETrainSpec, train_tiny_vae
    from .common import device, train_config

    _refuse_flags_without_effect(a)
    spec = TinyVAETrainSpec(
        model=a.model,
        data=a.data,
        resolution=a.resolution,
        channels=a.channels,
        encoder=a.encoder,
        latents=a.latents,
        image_weight=a.image_weight,
        encoder_weight=1.0 if a.encoder_weight is None else a.encoder_weight,
        flip=a.flip,
        eval_images=a.eval_images,
        save_dtype=a.save_dtype,
        keep_decoder=a.keep_decoder,
    )
    try:
        cfg = train_config(a, sample_every=a.eval_every)
    except ValueError as e:  # TrainConfig's own checks (steps, batch size, lr) are plain ValueErrors
        raise TinyVAETrainingError(str(e)) from None
    out = train_tiny_vae(
        spec, cfg, a.out, device=device(a), resume=a.resume, overwrite=a.overwrite, force_resume=a.force_resume
    )
    from ..distributed import current_world

    if not current_world().is_main:
        return 0
    s = out.summary
    ev = s.get("evaluation", {})
    if s.get("first_loss") is not None:
        print(f"loss {s['first_loss']:.4f} (first 10 steps) -> {s['final_loss']:.4f} (last 100)")
    if "psnr_tiny_vs_full_db" in ev:
        print(
            f"held-out PSNR ({s['held_out_images']} images): tiny decoder vs the full decoder "
            f"{ev['psnr_tiny_vs_full_db']:.2f} dB; vs the images {ev['psnr_tiny_vs_image_db']:.2f} dB "
            f"(the full VAE's own: {ev['psnr_full_vs_image_db']:.2f} dB)"
        )
    if "psnr_tiny_encoder_db" in ev:
        print(
            f"tiny encoder: latent MSE {ev['encoder_latent_mse']:.4f} ({100 * ev['encoder_latent_mse_relative']:.1f}% "
            f"of the latents' variance); decoded by the full VAE, {ev['psnr_tiny_encoder_db']:.2f} dB against its "
            "own round trip"
        )
    print(
        f"tiny VAE written to {out.folder} (diffusers AutoencoderTiny); use it with --tiny-vae {out.folder}, or copy "
        "config.json and the .safetensors to the model folder's vae_tiny/"
    )
    return 0


def _refuse_flags_without_effect(a: argparse.Namespace) -> None:
    """Loss settings of a part that is not trained would change nothing: one line, before the model loads."""
    from ..errors import UsageError

    if a.encoder_weight is not None and not a.encoder:
        raise UsageError("--encoder-weight has no effect with --no-encoder (no encoder is trained)")
    if a.keep_decoder is not None:
        kept = "the decoder of --keep-decoder is kept as it is and nothing is decoded while training"
        if a.latents != "mode":
            raise UsageError(f"--latents {a.latents} has no effect with --keep-decoder: {kept}")
        if a.image_weight:
            raise UsageError(f"--image-weight has no effect with --keep-decoder: {kept}")


def register(sub: argparse._SubParsersAction, train: argparse._SubParsersAction | None = None) -> None:
    if train is None:
        return
    p = train.add_parser(
        "tiny-vae",
        formatter_class=DefaultsHelpFormatter,
        help="distil a tiny VAE (TAESD's architecture) from a model's VAE, for previews and fast decodes",
        description="The tiny decoder learns to draw what the model's full VAE decoder draws from the same latents "
        "(L1 + MSE on pixels), the tiny encoder to give its latents (MSE). Writes OUT/config.json and "
        "OUT/diffusion_pytorch_model.safetensors (a diffusers AutoencoderTiny folder), OUT/train_summary.json "
        "(PSNR against the full decoder on held-out images) and OUT/compare.png.",
    )
    p.add_argument("--model", required=True, help="a diffusers folder, an SD .safetensors/.ckpt file, or built-in name")
    p.add_argument(
        "--data",
        default=None,
        help="folder of images (resized and centre-cropped); default for the emoji model: the emoji renders",
    )
    p.add_argument("--resolution", type=int, default=None, help="training size in pixels (default: the model's)")
    p.add_argument(
        "--channels",
        type=int,
        default=None,
        help="width of every level (TAESD: 64); default: 64, capped at the full VAE's full-resolution width",
    )
    p.add_argument(
        "--encoder",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="distil the encoder too (diffusers loads an AutoencoderTiny only with both halves)",
    )
    p.add_argument(
        "--latents",
        choices=["mode", "sample"],
        default="mode",
        help="the full encoder's posterior mode (full decodes computed once) or a fresh sample each step "
        "(a full decode per step)",
    )
    p.add_argument("--image-weight", type=float, default=0.0, help="weight of the loss against the images themselves")
    p.add_argument("--encoder-weight", type=float, default=None, help="weight of the encoder's latent MSE (default: 1)")
    p.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True, help="train on the mirror images too")
    p.add_argument("--eval-images", type=int, default=256, help="images held out (at most a fifth of them)")
    p.add_argument(
        "--eval-every",
        type=int,
        default=1000,
        metavar="N",
        help="every N steps print the held-out PSNR of the EMA weights (0: only at the end)",
    )
    p.add_argument("--save-dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    p.add_argument(
        "--keep-decoder",
        default=None,
        metavar="TINY_VAE",
        help="a decoder-only tiny VAE (file or folder) to complete: its decoder is kept unchanged and only an "
        "encoder is trained beside it",
    )
    add_train_args(
        p,
        out="runs/tiny-vae",
        steps=20_000,
        batch_size=16,
        lr=2e-3,
        warmup=200,
        ema_decay=0.999,
        checkpoint_every=1000,
        ema_help="the exported weights are the EMA's (0: the last ones)",
    )
    add_force_resume(p)
    p.set_defaults(func=run)
