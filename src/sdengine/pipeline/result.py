"""What a generation call gives back and what its step callback sees."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch import Tensor

from sdengine import vae_utils
from sdengine.errors import GenerationError, SdengineError


class Cancelled(SdengineError):
    """Raised when the step callback returns False. ``step`` steps of ``steps`` had run; ``preview`` is the
    cheap RGB preview (uint8 (B, h, w, 3)) of the last x0 estimate."""

    def __init__(self, step: int, steps: int, preview: np.ndarray | None = None) -> None:
        super().__init__(f"generation cancelled after step {step} of {steps}")
        self.step = step
        self.steps = steps
        self.preview = preview


@dataclass
class StepInfo:
    """What the step callback sees after each sampler step. For a look at the current estimate, call
    ``info.preview_images()`` (PIL images, one per batch row); ``info.preview_array()`` gives the same pixels as
    a uint8 array."""

    step: int  # 1-based count of finished steps in this run
    steps: int  # steps this run takes (fewer than asked for with img2img)
    sigma: float  # the noise level the step started from
    latents: Tensor  # (B, C, h, w) the sample after the step (the sampler's VE scaling)
    denoised: Tensor  # (B, C, h, w) the step's estimate of the final latent
    tiny_vae: Any = field(default=None, repr=False)  # the pipeline's tiny VAE, if it has one
    # the model family's latent -> RGB map (vae_utils.LatentRGBMap: SD's, SD3's, Flux's); None: by channel count
    rgb_map: Any = field(default=None, repr=False)

    def preview_array(self, method: str = "latent") -> np.ndarray:
        """A uint8 NumPy array of shape (B, h, w, 3), not an image: ``"latent"``, a cheap RGB approximation
        of ``denoised`` (no VAE call) at latent size, by the model family's map (``rgb_map``; a latent space with
        none shows its channel mean in grey); ``"tiny"``, the pipeline's tiny VAE's decode of it at full
        size (a one-line error without one). Use ``preview_images()`` for PIL images."""
        if method == "latent":
            return vae_utils.latent_preview(self.denoised, self.rgb_map)
        if method != "tiny":
            raise GenerationError(f"preview method must be 'latent' or 'tiny', got {method!r}")
        if self.tiny_vae is None:
            raise GenerationError("no tiny VAE loaded for a 'tiny' preview: load_pipeline(tiny_vae=...)")
        return vae_utils.tiny_vae_rgb(self.tiny_vae)(self.denoised).cpu().numpy()

    def preview(self) -> np.ndarray:
        """The same uint8 (B, h, w, 3) array as ``preview_array()`` (kept for old callers; the new name says
        what it returns). Use ``preview_images()`` for PIL images."""
        return self.preview_array()

    def preview_images(self, method: str = "latent") -> list[Image.Image]:
        """The documented way to see the current estimate: one RGB PIL image per batch row; ``method`` as
        :meth:`preview_array` (``"latent"``: a cheap approximation at latent size; ``"tiny"``: the tiny VAE's)."""
        return [Image.fromarray(a) for a in self.preview_array(method)]


StepCallback = Callable[[StepInfo], "bool | None"]


@dataclass
class GenerationResult:
    images: list[Image.Image]
    arrays: np.ndarray  # float32 (N, H, W, 3) in [0, 1], before 8-bit quantisation
    parameters: dict[str, Any]  # the settings of the call (prompt and seed = the first image's)
    seeds: list[int]
    infotexts: list[str]  # A1111 "parameters" text of each image (its own prompt and seed)
    notes: list[str] = field(default_factory=list)  # warnings given during the call (resized mask, ...)
    rows: list[dict[str, Any]] = field(default_factory=list)  # per image: prompt, negative_prompt, seed
    # soft inpainting's composite mask of each image ("L" PIL images, 255 = the generated pixel; what the images
    # were laid over the init image by, or, with its ``composite`` off, what a caller lays them by); None without
    composite_masks: list[Image.Image] | None = None

    def image_parameters(self, i: int) -> dict[str, Any]:
        row = self.rows[i] if self.rows else {"seed": self.seeds[i]}
        return {**self.parameters, **row}

    def save(self, folder: str | Path) -> list[Path]:
        """Write every image to ``folder`` (made if missing) as ``NNNNN-SEED.png``, numbered on after the files
        already there, each with its A1111 ``parameters`` text (its own prompt and seed), as ``sdengine
        generate`` writes them: ``sdengine generate --from-png`` and A1111's PNG Info read them back. (A plain
        ``result.images[i].save(...)`` writes the pixels without the parameters.) Returns the paths written."""
        from sdengine.metadata import save_png

        out = Path(folder)
        used = [
            int(m.group(1))
            for p in (out.glob("*.png") if out.is_dir() else [])
            if (m := re.match(r"^(\d{5})-", p.name))
        ]
        start = max(used, default=-1) + 1
        return [
            save_png(image, out / f"{start + i:05d}-{seed}.png", text)
            for i, (image, seed, text) in enumerate(zip(self.images, self.seeds, self.infotexts, strict=True))
        ]


__all__ = ["Cancelled", "GenerationResult", "StepCallback", "StepInfo"]
