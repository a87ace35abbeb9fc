"""The comparison engine of ``sdengine bench --compare diffusers``: diffusers' StableDiffusionPipeline.

diffusers is a development extra, used as a test oracle and as the peer in benchmarks; sdengine itself never
needs it. It lives outside the package: :func:`sdengine.bench.diffusers_engine` loads it by path, so the package never
imports diffusers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline  # noqa: F401  (fails early, with ImportError, when not installed)

for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def scheduler_for(folder: Path, sampler: str) -> Any:
    """The diffusers scheduler sdengine's sampler table names for ``sampler``, from the folder's own config."""
    import diffusers

    from sdengine.diffusion import sampling

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text())
    cls_name, kwargs = sampling.diffusers_equivalent(sampler, "normal", config)
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"diffusers has no {cls_name} for sampler {sampler!r}")
    return cls.from_config(kwargs)


def engine(folder: Path, spec: Any, prompt: str, negative: str) -> Callable[[], np.ndarray]:
    """A function that generates ``spec``'s images with diffusers, fp32 on ``spec.device``, eager: (N, H, W, 3) in 0..1.

    Timed calls make PIL images, as sdengine's call does; the arrays are read back from them only for the
    first call (the warm-up), whose float output is used for the agreement check.
    """
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(spec.device)
    pipe.scheduler = scheduler_for(folder, spec.sampler)
    calls = 0

    def run() -> np.ndarray:
        nonlocal calls
        calls += 1
        gens = [torch.Generator("cpu").manual_seed(s) for s in spec.seeds]
        out = pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=spec.steps,
            guidance_scale=spec.cfg,
            width=spec.size,
            height=spec.size,
            num_images_per_prompt=spec.batch,
            generator=gens,
            output_type="np" if calls == 1 else "pil",
        )
        if calls == 1:
            return np.asarray(out.images, dtype=np.float32)
        return np.stack([np.asarray(im, dtype=np.float32) / 255 for im in out.images])

    return run


class Parts:
    """diffusers' StableDiffusionPipeline cut into the pieces its ``__call__`` runs, for ``sdengine bench --scaling``:
    the text encoder, one U-Net call on the CFG batch, the VAE decode of the batch (fp32 on ``device``, eager).

    Each piece is called as the pipeline calls it: ``encode_prompt`` with classifier-free guidance, the U-Net
    with ``encoder_hidden_states`` and ``return_dict=False``, the VAE on the whole batch at once after dividing
    by its scaling factor, then diffusers' denormalisation to 0..1. All under ``torch.no_grad()`` (the
    pipeline's own decorator).
    """

    def __init__(self, folder: Path, device: str) -> None:
        self.pipe = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.device = torch.device(device)
        self.pipe.to(self.device)

    def text(self, prompt: str, negative: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) token states, each (1, 77, D)."""
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, True, negative)
        return uncond, cond

    def step(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 4, h, w) diffusion latents -> (B, 3, H, W) images in 0..1."""
        vae = self.pipe.vae
        with torch.no_grad():
            image = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1)


class GpuEngine:
    """diffusers' StableDiffusionPipeline in half precision on a GPU, for ``sdengine bench --device cuda``
    (sdengine.bench_gpu): whole generations, one U-Net CFG step, one VAE decode, peak allocated memory; and
    :meth:`compile` as diffusers' documentation recommends (channels_last, ``torch.compile`` of the U-Net with
    ``mode="reduce-overhead", fullgraph=True``). On the CPU (the tests) it runs in float32."""

    def __init__(self, folder: Path, device: str, sampler: str, size: int) -> None:
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.pipe = StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, requires_safety_checker=False, dtype=self.dtype
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.pipe.to(self.device)
        self.pipe.scheduler = scheduler_for(folder, sampler)
        self.size = size

    def compile(self) -> None:
        self.pipe.unet.to(memory_format=torch.channels_last)
        self.pipe.vae.to(memory_format=torch.channels_last)
        self.pipe.unet = torch.compile(self.pipe.unet, mode="reduce-overhead", fullgraph=True)

    def generate(
        self, prompt: str, negative: str, cfg: dict[str, Any], batch: int, output_type: str, latents: Any = None
    ) -> Any:
        """``latents``: the start noise to use instead of diffusers' own draw from the seeds' generators."""
        gens = [torch.Generator("cpu").manual_seed(cfg["seed"] + i) for i in range(batch)]
        return self.pipe(
            prompt,
            negative_prompt=negative,
            num_inference_steps=cfg["steps"],
            guidance_scale=cfg["cfg"],
            width=cfg["size"],
            height=cfg["size"],
            num_images_per_prompt=batch,
            generator=gens,
            output_type=output_type,
            latents=latents,
        ).images

    def measure(
        self, prompt: str, negative: str, cfg: dict[str, Any], repeats: int, *, batch8: bool = False
    ) -> dict[str, Any]:
        import statistics
        import time

        from sdengine.bench_gpu import timed as timed_on

        def timed(fn: Callable[[], Any], n: int) -> list[float]:
            return timed_on(fn, self.device, n)

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        image = np.asarray(self.generate(prompt, negative, cfg, 1, "np"), dtype=np.float32)
        warm = time.perf_counter() - t0
        times = timed(lambda: self.generate(prompt, negative, cfg, 1, "pil"), repeats)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else None
        side = cfg["size"] // self.pipe.vae_scale_factor
        g = torch.Generator("cpu").manual_seed(0)
        x = torch.randn(2, 4, side, side, generator=g).to(self.device, self.dtype)
        z = torch.randn(1, 4, side, side, generator=g).to(self.device, self.dtype)
        with torch.no_grad():
            cond, uncond = self.pipe.encode_prompt(prompt, self.device, 1, True, negative)
        ctx = torch.cat([uncond, cond])
        t = torch.full((2,), 500.0, device=self.device)

        def step() -> Any:
            with torch.no_grad():
                return self.pipe.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]

        def decode() -> Any:
            with torch.no_grad():
                return self.pipe.vae.decode(z / self.pipe.vae.config.scaling_factor, return_dict=False)[0]

        def text() -> Any:  # the prompt and the negative, as every generation encodes them
            with torch.no_grad():
                return self.pipe.encode_prompt(prompt, self.device, 1, True, negative)

        for _ in range(3):
            step()
        decode()
        text()
        latent = self.generate(prompt, negative, cfg, 1, "latent")
        with torch.no_grad():
            decoded = self.pipe.vae.decode(latent / self.pipe.vae.config.scaling_factor, return_dict=False)[0]
        out: dict[str, Any] = {
            "warmup_s": warm,
            "image_s": statistics.median(times),
            "image_all_s": times,
            "unet_step_ms": statistics.median(timed(step, 20)) * 1000,
            "vae_decode_ms": statistics.median(timed(decode, 5)) * 1000,
            "text_encode_ms": statistics.median(timed(text, 10)) * 1000,
            "peak_allocated_mb": peak,
            "vae_output_finite": bool(torch.isfinite(decoded).all()),
            "_image": image,
            "_latent": latent.float().cpu().numpy(),
        }
        if batch8:
            self.generate(prompt, negative, cfg, 8, "pil")
            t8 = statistics.median(timed(lambda: self.generate(prompt, negative, cfg, 8, "pil"), max(2, repeats // 2)))
            out.update({"batch8_s": t8, "batch8_images_per_s": 8 / t8})
        return out


class Decoders:
    """diffusers' two decoders of the diffusion model's latents, for ``sdengine bench --decoders``
    (sdengine.bench_decode): the folder's ``AutoencoderKL`` (its ``vae/``) and an ``AutoencoderTiny`` folder, fp32
    on the CPU, eager, each called as diffusers' pipelines call it: ``vae.decode(latents / scaling_factor)``
    (plus the shift, for a VAE that has one) and ``tiny.decode(latents)``. The caller holds the grad mode."""

    def __init__(self, folder: Path, tiny_folder: Path) -> None:
        from diffusers import AutoencoderKL, AutoencoderTiny

        self.vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", local_files_only=True, dtype=torch.float32
        ).eval()
        self.tiny = AutoencoderTiny.from_pretrained(tiny_folder, local_files_only=True, dtype=torch.float32).eval()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) diffusion latents -> (B, 3, H, W) images in [-1, 1]."""
        z = latents / self.vae.config.scaling_factor
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        return self.vae.decode(z).sample

    def decode_tiny(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) diffusion latents -> (B, 3, H, W) images in [-1, 1]."""
        return self.tiny.decode(latents).sample

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> the posterior mean as the diffusion model sees it (scaled)."""
        z = self.vae.encode(images).latent_dist.mean
        shift = getattr(self.vae.config, "shift_factor", None)
        if shift:
            z = z - shift
        return z * self.vae.config.scaling_factor

    def encode_tiny(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [-1, 1] -> the diffusion model's latents."""
        return self.tiny.encode(images).latents
