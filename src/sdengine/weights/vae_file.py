"""A separate VAE (A1111's `--vae`): whether it fits the model, and its name and hashed file for the infotext.

A1111 reads VAE files of three kinds: `NAME.vae.pt` / `NAME.vae.ckpt` (a pickle holding `state_dict`), and
`NAME.vae.safetensors` or plain `.safetensors`, all in the LDM layout (`encoder.down.N.block.M...`, sometimes
behind a `first_stage_model.` prefix). diffusers users bring an `AutoencoderKL` folder instead. The reading is
`sdengine.weights.loading.load_vae` (pickles through the weights-only loader); this module holds what is
decided about the VAE once it is read:

- it must give the latents the U-Net works on: its `latent_channels` equal the U-Net's `out_channels`
  (an SD3/Flux 16-channel VAE on an SD1 model is refused, never decoded into noise);
- A1111's default ("Automatic") uses `NAME.vae.safetensors` / `.vae.pt` / `.vae.ckpt` beside a checkpoint
  `NAME.safetensors` when no VAE is chosen; `vae_beside` finds it;
- A1111 records it as `VAE: <file name>` and `VAE hash: <first 10 hex digits of the file's SHA-256>`
  (the same digest as "Model hash"); for a diffusers folder the hashed file is its weights file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .io import WeightsError

VAE_WEIGHT_STEMS = ("diffusion_pytorch_model",)


class VAEMismatchError(WeightsError):
    """A VAE that does not fit the model it is given to (another latent-channel count)."""


def check_vae_fits(vae_config: Mapping[str, Any], unet_config: Mapping[str, Any], vae: str | Path) -> None:
    """One-line error when the VAE's latents are not the U-Net's (latent channels differ)."""
    latent = vae_config.get("latent_channels")
    wanted = unet_config.get("out_channels")
    if latent is not None and wanted is not None and int(latent) != int(wanted):
        raise VAEMismatchError(
            f"{vae}: this VAE makes {int(latent)}-channel latents but the model's U-Net works on {int(wanted)} "
            "(a VAE of another model family, e.g. SD3/Flux); use a VAE made for this model"
        )


VAE_BESIDE_SUFFIXES = (".vae.safetensors", ".vae.pt", ".vae.ckpt")


def vae_beside(checkpoint: str | Path) -> Path | None:
    """A1111's "Automatic" VAE: `NAME.vae.safetensors` / `.vae.pt` / `.vae.ckpt` beside `NAME.safetensors`."""
    p = Path(checkpoint)
    if not p.is_file():
        return None
    for suffix in VAE_BESIDE_SUFFIXES:
        cand = p.with_name(p.name.removesuffix(p.suffix) + suffix)
        if cand.is_file():
            return cand
    return None


def vae_display_name(vae: str | Path) -> str:
    """The name A1111 writes as `VAE`: the file's name with its extension; a folder's own name (the model
    folder's, when given its `vae/` subfolder)."""
    p = Path(vae)
    if p.is_dir() and p.name == "vae" and p.parent.name:
        return p.parent.name
    return p.name


def vae_weights_file(vae: str | Path) -> Path | None:
    """The file whose SHA-256 is the `VAE hash`: the file itself, or a diffusers folder's VAE weights."""
    p = Path(vae)
    if p.is_file():
        return p
    if not p.is_dir():
        return None
    folder = p / "vae" if (p / "vae" / "config.json").is_file() else p
    for stem in VAE_WEIGHT_STEMS:
        for suffix in (".safetensors", ".bin", ".fp16.safetensors"):
            f = folder / f"{stem}{suffix}"
            if f.is_file():
                return f
    return None


__all__ = ["VAEMismatchError", "check_vae_fits", "vae_beside", "vae_display_name", "vae_weights_file"]
