"""ComfyUI's FLUX.2 img2img and inpainting written out from ComfyUI's rules, on diffusers' FLUX.2 transformer and VAE
(``Flux2Transformer2DModel``, ``AutoencoderKLFlux2``, ``Flux2KleinPipeline``'s latent helpers): the reference the
graph route's img2img / inpainting graphs are held against (tests/test_comfy_flux2.py, tests/test_comfy_flux2_dev.py).

The rules, each ComfyUI's (its ``comfy_extras/nodes_flux.py`` Flux2Scheduler,
``comfy_extras/nodes_custom_sampler.py`` SplitSigmasDenoise, KSampler's ``denoise`` in ``comfy/samplers.py``,
``comfy/model_sampling.py`` ModelSamplingFlux / CONST, ``comfy/samplers.py`` KSAMPLER / KSamplerX0Inpaint,
``comfy/sampler_helpers.py`` prepare_mask, ``comfy/sample.py`` prepare_noise), not the pipeline's (diffusers'
``strength`` picks a start step on the ``n``-step grid and passes the init image as a reference too; ComfyUI's
VAEEncode -> sampler adds no reference):

* the sigmas: Flux2Scheduler's ``shift(linspace(1, 0, n + 1))`` with ``mu`` the empirical fit of ``round(w h / 256)``
  tokens and ``n``, its last ``round(n denoise) + 1`` (SplitSigmasDenoise's low half); or KSampler's: the model's
  ``simple`` list (ModelSamplingFlux's 10000-entry table ``shift(t)``, ``t = k / 10000``, ``mu`` 2.02, every
  ``10000 / N``-th entry from the top, then 0) of ``N = int(steps / denoise)`` steps, its last ``steps + 1``;
* the init latent: the VAE posterior's mean of ``2 x pixels - 1``, in 2x2 patches, normalised by the batch-norm
  statistics (ComfyUI's Flux2 latent format is the identity on it);
* the noise: ``torch.randn(latent shape, generator=torch.manual_seed(seed))``; the start ``s0 noise + (1 - s0) latent``
  (CONST's noise scaling);
* each step (Euler): the model's input is ``x`` with the known region (mask 0) replaced by ``s noise + (1 - s) latent``,
  its denoised ``input - s v`` with the known region replaced by the latent, then ``x + (x - denoised) / s (s' - s)``;
  the mask is the noise mask resized bilinearly to the latent's sides (no rounding: a grey edge stays grey);
* the image: the latent un-normalised, out of its patches, decoded, ``(x + 1) / 2`` clamped to 0..1.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def flux2_scheduler_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """Flux2Scheduler's list for ``steps`` steps of a ``width`` x ``height`` image (float32)."""
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    mu = compute_empirical_mu(round(width * height / 256), steps)
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1))


def split_sigmas_denoise(sigmas: torch.Tensor, denoise: float) -> torch.Tensor:
    """SplitSigmasDenoise's second output: the last ``round(n denoise)`` steps of an ``n``-step list."""
    n = round((sigmas.shape[0] - 1) * denoise)
    return sigmas[-(n + 1) :]


def ksampler_simple_sigmas(steps: int, denoise: float, mu: float = 2.02) -> torch.Tensor:
    """KSampler's sigmas on a FLUX.2 model (ModelSamplingFlux ``mu``; ``simple``) at ``denoise``."""
    total = steps if denoise >= 1 else int(steps / denoise)
    t = torch.arange(1, 10001, dtype=torch.float32) / 10000
    table = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    stride = table.shape[0] / total
    listed = [float(table[-(1 + int(k * stride))]) for k in range(total)] + [0.0]
    return torch.tensor(listed, dtype=torch.float32)[-(steps + 1) :]


class ComfyFlux2Reference:
    """diffusers' transformer and VAE of a FLUX.2 folder, run by ComfyUI's rules (module docstring)."""

    def __init__(self, folder: Path) -> None:
        import diffusers

        self.vae = diffusers.AutoencoderKLFlux2.from_pretrained(folder / "vae").eval()
        self.net = diffusers.Flux2Transformer2DModel.from_pretrained(folder / "transformer").eval()
        self.helpers = diffusers.Flux2KleinPipeline

    def _bn(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn, eps = self.vae.bn, self.vae.config.batch_norm_eps
        return bn.running_mean.view(1, -1, 1, 1), torch.sqrt(bn.running_var.view(1, -1, 1, 1) + eps)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """(H, W, 3) in 0..1 -> the normalised 2x2-patch latent (1, 128, H/16', W/16')."""
        x = pixels.permute(2, 0, 1)[None].float() * 2 - 1
        z = self.vae.encode(x).latent_dist.mode()
        mean, std = self._bn()
        return (self.helpers._patchify_latents(z) - mean) / std

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        mean, std = self._bn()
        z = self.helpers._unpatchify_latents(latent * std + mean)
        return ((self.vae.decode(z).sample + 1) / 2).clamp(0, 1)[0].permute(1, 2, 0)

    @torch.no_grad()
    def velocity(self, x: torch.Tensor, sigma: float, states: torch.Tensor, guidance: float | None) -> torch.Tensor:
        b, _, h, w = x.shape
        ids = self.helpers._prepare_latent_ids(x)
        out = self.net(
            hidden_states=self.helpers._pack_latents(x),
            timestep=torch.full((b,), sigma, dtype=torch.float32),
            guidance=None if guidance is None else torch.full((b,), guidance, dtype=torch.float32),
            encoder_hidden_states=states.expand(b, -1, -1),
            txt_ids=self.helpers._prepare_text_ids(states.expand(b, -1, -1)),
            img_ids=ids,
            return_dict=False,
        )[0]
        return self.helpers._unpack_latents_with_ids(out, ids, h, w)

    @torch.no_grad()
    def sample(
        self,
        pixels: torch.Tensor,
        states: torch.Tensor,
        sigmas: torch.Tensor,
        seed: int,
        *,
        mask: torch.Tensor | None = None,
        guidance: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the image (H, W, 3) in 0..1, the latent mask or None) of ``pixels`` sampled along ``sigmas`` with the
        text ``states`` (1, 512, D), ``mask`` (H, W; 1 = repaint) and [dev]'s ``guidance``."""
        latent = self.encode(pixels)
        noise = torch.randn(latent.shape, generator=torch.manual_seed(seed))
        m = None
        if mask is not None:
            m = F.interpolate(mask.reshape(1, 1, *mask.shape[-2:]).float(), size=latent.shape[-2:], mode="bilinear")
        s = [float(v) for v in sigmas]
        x = s[0] * noise + (1 - s[0]) * latent
        for i in range(len(s) - 1):
            x_in = x if m is None else x * m + (s[i] * noise + (1 - s[i]) * latent) * (1 - m)
            denoised = x_in - self.velocity(x_in, s[i], states, guidance) * s[i]
            if m is not None:
                denoised = denoised * m + latent * (1 - m)
            x = x + (x - denoised) / s[i] * (s[i + 1] - s[i])
        return self.decode(x), m
