"""Pixel-space DDPM models (Ho et al. 2020): the class-conditional Fashion-MNIST model and any other
model trained by ``sdengine train ddpm``.

A model folder holds ``config.json`` (U-Net config, noise schedule, prediction type, class names,
image geometry) and ``unet.safetensors`` (the EMA weights). The built-in name ``fashion-mnist``
resolves to the folder shipped inside the package.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from .diffusion.denoisers import Denoiser
from .diffusion.guidance import CFGDenoiser
from .diffusion.samplers import row_noise
from .diffusion.schedules import NoiseSchedule
from .errors import UsageError
from .io.atomic import write_bytes_atomic, write_text_atomic
from .io.checkpoint import load_checkpoint
from .models.unet import UNet, UNetConfig
from .names import did_you_mean

ASSETS = Path(__file__).parent / "assets"
BUILTIN_DDPM = {"fashion-mnist": ASSETS / "models" / "fashion-mnist"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "unet.safetensors"


def config_to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return json.loads(json.dumps(d))  # tuples -> lists, a plain JSON tree


def unet_config_from_dict(d: dict[str, Any]) -> UNetConfig:
    fields = {f.name: f for f in dataclasses.fields(UNetConfig)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UsageError(f"unknown U-Net config keys: {', '.join(unknown)}")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return UNetConfig(**values)


def resolve_ddpm_path(name_or_path: str | Path) -> Path:
    """A built-in name, a model folder, or a training run folder / checkpoint."""
    key = str(name_or_path)
    if key in BUILTIN_DDPM:
        path = BUILTIN_DDPM[key]
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"the built-in model '{key}' is missing from the installation ({path})")
        return path
    path = Path(name_or_path)
    if not path.exists():
        names = ", ".join(sorted(BUILTIN_DDPM))
        guess = did_you_mean(key, list(BUILTIN_DDPM)) if len(path.parts) == 1 else ""
        raise FileNotFoundError(f"no model at '{path}'{guess} (built-in names: {names})")
    return path


@dataclass
class PixelDDPM:
    """A pixel-space diffusion model with everything needed to sample from it."""

    unet: UNet
    schedule_config: dict[str, Any]
    prediction: str
    image_size: int
    channels: int
    class_names: list[str] | None = None
    crop: int = 0  # pixels of padding to remove from each side after sampling (28x28 in 32x32)

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names else 0

    @property
    def null_class(self) -> int | None:
        """Index of the learned "no class" embedding used for classifier-free guidance, if trained."""
        n = self.unet.config.num_class_embeds
        return self.num_classes if n is not None and n > self.num_classes else None

    @property
    def schedule(self) -> NoiseSchedule:
        return NoiseSchedule.from_config(**self.schedule_config)

    def meta(self) -> dict[str, Any]:
        return {
            "format": "sdengine-pixel-ddpm",
            "unet": config_to_dict(self.unet.config),
            "scheduler": dict(self.schedule_config),
            "prediction_type": self.prediction,
            "image_size": self.image_size,
            "channels": self.channels,
            "class_names": self.class_names,
            "crop": self.crop,
        }

    def save(self, folder: str | Path, dtype: torch.dtype = torch.float16) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().to("cpu", dtype).contiguous() for k, v in self.unet.state_dict().items()}
        write_bytes_atomic(folder / WEIGHTS_NAME, save_safetensors_bytes(sd, metadata={"format": "pt"}))
        write_text_atomic(folder / CONFIG_NAME, json.dumps(self.meta(), indent=2) + "\n")
        return folder

    @classmethod
    def from_meta(cls, meta: dict[str, Any], unet: UNet) -> PixelDDPM:
        return cls(
            unet=unet,
            schedule_config=dict(meta["scheduler"]),
            prediction=meta["prediction_type"],
            image_size=int(meta["image_size"]),
            channels=int(meta["channels"]),
            class_names=meta.get("class_names"),
            crop=int(meta.get("crop", 0)),
        )

    @classmethod
    def load(cls, name_or_path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> PixelDDPM:
        """Load a model folder, a built-in name, or a training checkpoint (its EMA weights)."""
        path = resolve_ddpm_path(name_or_path)
        if path.is_dir() and (path / CONFIG_NAME).is_file():
            meta = json.loads((path / CONFIG_NAME).read_text())
            if meta.get("format") != "sdengine-pixel-ddpm":
                part = meta.get("_class_name") if isinstance(meta, dict) else None
                if isinstance(part, str):  # one part of a diffusers model (a ControlNet, a VAE, a U-Net), not one
                    use = (
                        " (a ControlNet: give it with --controlnet and a --control image)"
                        if "ControlNet" in part
                        else ": give the model's folder, the one with model_index.json"
                    )
                    raise UsageError(f"{path} is a diffusers {part} folder, not a model{use}")
                raise UsageError(f"{path} is not a pixel DDPM model folder")
            unet = UNet(unet_config_from_dict(meta["unet"]))
            sd = load_file(str(path / WEIGHTS_NAME))
            unet.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        else:
            state = load_checkpoint(path)
            meta = state.get("meta") or {}
            if meta.get("format") != "sdengine-pixel-ddpm":
                raise UsageError(f"{path} is not a pixel DDPM training checkpoint")
            unet = UNet(unet_config_from_dict(meta["unet"]))
            unet.load_state_dict(state["ema"]["model"] if use_ema else state["model"], strict=True)
        unet.eval().requires_grad_(False).to(device)
        return cls.from_meta(meta, unet)

    def denoiser(self, guidance_scale: float = 1.0) -> Denoiser | CFGDenoiser:
        """``denoise(x, sigma, class_labels=...) -> x0``, with classifier-free guidance over classes."""
        base = Denoiser(self.unet, self.schedule, self.prediction)
        null = self.null_class
        if guidance_scale == 1.0 or null is None:
            return base
        device = next(self.unet.parameters()).device
        return CFGDenoiser(base, guidance_scale, {"class_labels": torch.tensor([null], device=device)})

    @torch.no_grad()
    def generate(
        self,
        labels: Sequence[int] | None,
        *,
        n: int | None = None,
        sampler: str = "ddim",
        steps: int = 50,
        schedule: str = "normal",
        seed: int = 0,
        seeds: Sequence[int] | None = None,
        guidance_scale: float = 1.0,
        eta: float | None = None,
        callback: Callable[..., Any] | None = None,
        batch_size: int = 256,
    ) -> torch.Tensor:
        """Images ``(N, C, H, W)`` in ``[0, 1]``; sample ``i`` draws its noise from seed ``seed + i`` (or
        ``seeds[i]``), with the same per-row draw as the Stable Diffusion pipeline (samplers.row_noise)."""
        from .diffusion.sampling import sample

        if labels is not None:
            labels = list(labels)
            bad = [c for c in labels if not 0 <= c < self.num_classes]
            if bad:
                raise UsageError(f"class labels must be in 0..{self.num_classes - 1}, got {bad[:5]}")
            n = len(labels)
        if seeds is not None:
            seeds = [int(v) for v in seeds]
            if n is not None and n != len(seeds):
                raise UsageError(f"{n} images but {len(seeds)} seeds")
            n = len(seeds)
        if n is None or n < 1:
            raise UsageError("give class labels or a positive number of images")
        row_seeds = seeds if seeds is not None else [seed + i for i in range(n)]
        device = next(self.unet.parameters()).device
        den = self.denoiser(guidance_scale)
        shape = (1, self.channels, self.image_size, self.image_size)
        out = []
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            gens = [torch.Generator("cpu").manual_seed(s) for s in row_seeds[lo:hi]]
            noise = row_noise(gens, shape[1:]).to(device)
            extra: dict[str, Any] = {}
            if labels is not None:
                extra["class_labels"] = torch.tensor(labels[lo:hi], device=device)
            x0 = sample(
                den,
                noise,
                sampler=sampler,
                steps=steps,
                schedule=schedule,
                scheduler_config=self.schedule_config,
                generators=gens,
                callback=callback,
                extra_args=extra,
                sampler_options={"eta": eta} if eta is not None else None,
            )
            out.append(x0.float().cpu())
        x = torch.cat(out)
        if self.crop:
            c = self.crop
            x = x[..., c:-c, c:-c]
        return ((x + 1) / 2).clamp(0, 1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
