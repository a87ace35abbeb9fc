"""Where sampling starts: noise, the init latent, and the inpainting inputs, drawn in diffusers' order.

* txt2img: latent = ``randn((1, C, h, w), generator)`` per row (scaled by the sampler's initial sigma).
* img2img (``StableDiffusionImg2ImgPipeline``): the init image is VAE-encoded and a posterior sample is drawn
  from the row's generator FIRST, then the noise.
* inpainting (``StableDiffusionInpaintPipeline``): the mask is binarised at 0.5 (white = repaint), the masked
  image is ``image * (mask < 0.5)``; generator order per row: [init posterior when strength < 1 or the U-Net
  has 4 channels], noise, masked-image posterior. A 9-channel U-Net gets ``[mask, masked-image latent]`` as
  the ``"concat"`` conditioning; a 4-channel one gets the known region blended back (:class:`InpaintBlend`).
  With strength 1 the start is pure noise, as there; under A1111's strength rule it is the init latent noised
  to the schedule's first sigma, as A1111 does.
* FLUX.1 Fill (``fill``, diffusers' ``FluxFillPipeline``): the inpainting draws (init posterior, noise,
  masked-image posterior), no blend; the ``"concat"`` is the scaled masked-image latent and the binarised mask
  folded into ``f x f`` channels per latent pixel (``f`` the VAE's factor; channel ``dy f + dx``).
* FLUX.1 Depth / Canny (``control``, diffusers' ``FluxControlPipeline``): the control image's posterior is drawn
  from the row's generator FIRST (before any other draw); its scaled latent is the ``"concat"``.
* FLUX.1 Kontext with an init image (``init_mode``, diffusers' ``FluxKontextInpaintPipeline``): the init latent is
  the posterior's mean (no draw), then the noise; with a mask the masked-image posterior is drawn after it (unused).
* FLUX.2 [klein] (``init_mode``, ``mask_rule="bilinear"``, ``encode_masked=False``; diffusers'
  ``Flux2KleinInpaintPipeline``): the init latent is the posterior's mean, then the noise, nothing after it; the
  mask is binarised at 0.5 at image size and shrunk bilinearly (its edge cells grey).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdengine import vae_utils
from sdengine.diffusion.philox import NoiseGenerator, PhiloxGenerator
from sdengine.diffusion.samplers import SamplerStep, row_noise
from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.io.images import image_tensor


def blur_mask(m: np.ndarray, blur: float, blur_y: float | None = None) -> np.ndarray:
    """A1111's mask blur: a Gaussian of sigma ``blur`` across (its ``mask_blur_x``), then one of ``blur_y`` down
    (its ``mask_blur_y``; None: ``blur``), each with kernel 2 * int(2.5 * sigma + 0.5) + 1 and each skipped at 0,
    as A1111 does them (an 8-bit ``m`` is rounded to 8 bits after each, as there)."""
    import cv2

    for sigma, axis in ((blur, 0), (blur if blur_y is None else blur_y, 1)):
        if sigma > 0:
            k = 2 * int(2.5 * sigma + 0.5) + 1
            m = cv2.GaussianBlur(m, (k, 1) if axis == 0 else (1, k), sigma)
    return m


def a1111_latent_mask(mask: np.ndarray, h: int, w: int, *, rounded: bool = True) -> Tensor:
    """A1111's latent mask (its ``latmask``; 1 = repaint) of a float mask in [0, 1] at image size: the 8-bit mask
    made RGB and shrunk to the latent's ``w`` x ``h`` by PIL's default ``Image.resize`` filter (bicubic for
    RGB), then ``np.around`` of its first channel / 255 (its ``mask_round``, on by default; ``rounded=False``:
    left grey, as under its soft inpainting); (1, 1, h, w)."""
    m8 = Image.fromarray(np.clip(np.rint(np.asarray(mask, np.float64) * 255), 0, 255).astype(np.uint8), "L")
    small = np.asarray(m8.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
    return torch.from_numpy((np.around(small) if rounded else small).astype(np.float32))[None, None]


def posterior_rows(post: Any, generators: Sequence[NoiseGenerator]) -> Tensor:
    """One sample per row from a batch-1 posterior, each from its row's generator (latent_dist.sample)."""
    rows = []
    for g in generators:
        if isinstance(g, PhiloxGenerator):
            # A1111 samples the posterior from another generator than the image's (torch's global one), so its NV
            # start noise is the row generator's first draw: a CPU generator of the row's seed samples it here
            g = torch.Generator("cpu").manual_seed(g.initial_seed())
        eps = torch.randn(post.mean.shape, generator=g, dtype=post.mean.dtype)
        rows.append(post.mean + post.std * eps.to(post.mean.device))
    return torch.cat(rows)


@dataclass
class StartLatents:
    noise: Tensor  # (B, C, h, w) unit noise, row i from generator i
    init_latent: Tensor | None  # (B, C, h, w) the scaled init latent (img2img / 4-channel inpainting)
    from_init: bool  # whether sampling starts from init_latent (False: pure noise)
    blend_mask: Tensor | None  # (1, 1, h, w) for 4-channel inpainting: 1 = repaint ((B, 1, h, w): a mask per row)
    concat: Tensor | None  # (B, 5, h, w) mask + masked-image latent for a 9-channel U-Net; FLUX.1 Fill / Control's
    # (1, 1, h, w) A1111's latent mask (rounded, 1 = repaint) of an inpainting call, for any U-Net (A1111Blend);
    # (B, 1, h, w) with a mask per row (cat_start_latents)
    rounded_mask: Tensor | None = None


def start_latents(
    vae: Any,
    *,
    generators: Sequence[NoiseGenerator],
    latent_channels: int,
    width: int,
    height: int,
    scale_factor: int,
    init: Image.Image | None,
    mask: np.ndarray | None,
    mask_blur: float,
    strength: float,
    nine_channels: bool,
    tiled: bool | None,
    device: torch.device,
    tiny: Any = None,
    pure_noise_at_full_strength: bool = True,
    fill: bool = False,
    control: Image.Image | None = None,
    init_mode: bool = False,
    latent_mask: np.ndarray | None = None,
    mask_round: bool = True,
    mask_rule: str = "nearest",
    encode_masked: bool = True,
) -> StartLatents:
    """Every random draw of the rows, in diffusers' order (see the module docstring). ``tiny``: a tiny VAE whose
    encoder makes the images' latents instead of the VAE's (``vae_encode="tiny"``; no posterior spread, the same
    draws from each generator). ``pure_noise_at_full_strength``: inpainting at strength 1 starts from pure noise
    (diffusers'); False: from the init latent noised, as A1111 does at any strength (A1111's masked content is
    the pipeline's, on the init latent this returns). ``fill``: a FLUX.1 Fill model's concat (see the module
    docstring; needs ``init`` and ``mask``); ``control``: a FLUX.1 Depth / Canny model's control image (the
    output's size); ``init_mode``: the init latent is the posterior's mean, no draw (FLUX.1 Kontext's
    ``FluxKontextInpaintPipeline``: each row's noise is its generator's first draw). ``latent_mask``: A1111's
    separate latent mask (a float array in [0, 1] at any size) that ``rounded_mask`` is made from in place of
    ``mask``; ``mask_round`` False (A1111's ``mask_round`` off): ``rounded_mask`` left grey, and a 9-channel
    model's mask input and masked image made from the grey mask (``image * (1 - mask)``, the mask shrunk nearest
    to the latent) rather than the mask made binary, as A1111's ``inpainting_image_conditioning``. ``mask_rule``:
    how the mask becomes the blend's latent mask: ``"nearest"`` (diffusers' SD / FLUX.1 inpainting: the binarised
    mask shrunk by nearest; a blurred mask, ``mask_blur`` > 0, kept grey and area-averaged) or ``"bilinear"``
    (FLUX.2 [klein]'s ``prepare_mask_latents``: the binarised mask, or a blurred one kept grey, shrunk bilinearly).
    ``encode_masked``: False draws no masked-image posterior (a 4-channel model, which reads none, in a pipeline
    that draws nothing after the noise)."""

    def moments(img: Tensor) -> Any:
        if tiny is not None:
            return vae_utils.tiny_encode_moments(tiny, vae, img)
        return vae_utils.encode_moments(vae, img, tiled=tiled)

    b = len(generators)
    h, w = height // scale_factor, width // scale_factor
    init_latent = blend = concat = None
    mask_full = None
    control_latent = None
    if control is not None:  # FluxControlPipeline: the control image's posterior before any other draw
        post = moments(image_tensor(control).to(device))
        control_latent = vae.scale_latents(posterior_rows(post, generators).float())
    if init is not None:
        img = image_tensor(init).to(device)
        if mask is not None or nine_channels:
            # A 9-channel model without a mask repaints everything (A1111's img2img on inpaint models).
            m = mask if mask is not None else np.ones((height, width), np.float32)
            mask_full = torch.from_numpy(m)[None, None].to(device)
        if mask_full is None or strength < 1.0 or not nine_channels or not pure_noise_at_full_strength:
            post = moments(img)
            z = post.mean.expand(b, -1, -1, -1) if init_mode else posterior_rows(post, generators)
            init_latent = vae.scale_latents(z.float())
            if tuple(init_latent.shape[-2:]) != (
                h,
                w,
            ):  # an init of another size (GenerationRequest.init_latent_resize)
                # A1111's "Just resize (latent upscale)": the latent of the image at its own size, resized bilinearly
                init_latent = F.interpolate(init_latent, size=(h, w), mode="bilinear")
    noise = row_noise(generators, (latent_channels, h, w)).to(device)

    if mask_full is not None:
        assert init is not None
        # diffusers binarises the mask at 0.5 and shrinks it with nearest; a blurred mask (mask_blur > 0,
        # A1111's soft edge) is kept soft and area-averaged instead, so that the blend fades.
        binary = (mask_full >= 0.5).float()
        channel = (
            F.interpolate(mask_full, size=(h, w), mode="area") if mask_blur > 0 else F.interpolate(binary, size=(h, w))
        )
        if mask_rule == "bilinear":  # FLUX.2 [klein]: binarised (a blurred mask kept grey), shrunk bilinearly
            channel = F.interpolate(mask_full if mask_blur > 0 else binary, size=(h, w), mode="bilinear")
        if mask_round:
            masked = image_tensor(init).to(device) * (binary < 0.5)
        else:  # A1111's conditioning with mask_round off: the grey mask (nearest) and the image weighted by it
            channel = F.interpolate(mask_full, size=(h, w))
            masked = image_tensor(init).to(device) * (1 - mask_full)
        masked_latent = None
        if encode_masked or fill or nine_channels:
            post = moments(masked)
            masked_latent = posterior_rows(post, generators)  # drawn even for 4 channels (diffusers' order)
        if masked_latent is None:
            blend = channel
        elif fill:  # FluxFillPipeline: [masked-image latent, the mask folded f x f into channels]
            masked_latent = vae.scale_latents(masked_latent.float())
            folded = F.pixel_unshuffle(binary, scale_factor).expand(b, -1, -1, -1)
            concat = torch.cat([masked_latent, folded.to(masked_latent.dtype)], dim=1)
        elif nine_channels:
            masked_latent = vae.scale_latents(masked_latent.float())
            concat = torch.cat([channel.expand(b, -1, -1, -1), masked_latent], dim=1)
        else:
            blend = channel
    elif nine_channels:
        # txt2img on an inpainting model: everything masked, a grey (zero) masked image (A1111's way); the
        # posterior mode, so that no random number is drawn beyond the initial noise.
        grey = torch.zeros(1, 3, height, width, device=device)
        z = moments(grey).mode()
        masked_latent = vae.scale_latents(z.float())
        concat = torch.cat([torch.ones(1, 1, h, w, device=device), masked_latent], dim=1).expand(b, -1, -1, -1)
    if control_latent is not None:
        concat = control_latent if concat is None else torch.cat([control_latent, concat], dim=1)
    rounded = None
    if mask is not None and mask_full is not None and not fill:  # A1111 rounds its latent mask (its mask_round default)
        source = mask if latent_mask is None else latent_mask  # A1111's latent_mask: the latent mask's own source
        rounded = a1111_latent_mask(source, h, w, rounded=mask_round).to(device)
    # Inpainting at strength 1 starts from pure noise (diffusers' is_strength_max); img2img does not, nor A1111.
    full = mask_full is not None and strength >= 1.0 and pure_noise_at_full_strength
    from_init = init_latent is not None and not full
    return StartLatents(noise, init_latent, from_init, blend, concat, rounded)


def cat_start_latents(parts: Sequence[StartLatents]) -> StartLatents:
    """The start of a batch whose rows were made in parts (an init image and mask per row: one :func:`start_latents`
    call per run of rows sharing an image, with those rows' generators): their tensors stacked along the rows, a
    part's one mask repeated over its rows. The rows share the call's settings, so each part has the same fields set
    (and the same ``from_init``)."""

    def cat(ts: list[Tensor | None]) -> Tensor | None:  # a part's one mask for all its rows: one per row
        if ts[0] is None:
            return None
        rows = [t.expand(s.noise.shape[0], *t.shape[1:]) for t, s in zip(ts, parts, strict=True) if t is not None]
        return torch.cat(rows)

    return StartLatents(
        torch.cat([s.noise for s in parts]),
        cat([s.init_latent for s in parts]),
        parts[0].from_init,
        cat([s.blend_mask for s in parts]),
        cat([s.concat for s in parts]),
        cat([s.rounded_mask for s in parts]),
    )


def image_latent(vae: Any, image: Image.Image, *, tiled: bool | None, device: torch.device, tiny: Any = None) -> Tensor:
    """InstructPix2Pix's image conditioning (diffusers' ``prepare_image_latents``, A1111's
    ``edit_image_conditioning``): the VAE posterior's mode of the image, NOT scaled by the VAE's scaling factor,
    (1, C, h, w); no random number is drawn. ``tiny``: a tiny VAE's encoder in place of the VAE's."""
    img = image_tensor(image).to(device)
    post = (
        vae_utils.tiny_encode_moments(tiny, vae, img)
        if tiny is not None
        else vae_utils.encode_moments(vae, img, tiled=tiled)
    )
    return post.mode().float()


class LatentBlend:
    """What the inpainting blends share: a denoiser wrapper (around ``inner``, whose ``schedule`` and
    ``prediction`` it answers) that keeps the known region (``mask == 0``, ``keep`` = 1 - mask) from the init
    latent ``init``. It passes the sampler's ``step`` on to an ``inner`` that takes one, stays itself around the
    ``off_grid`` and ``with_timesteps`` variants of ``inner``, and :meth:`finish` is the final blend with the clean
    init latent. Subclasses say in ``__call__`` when and how the blend happens."""

    takes_step = True

    def __init__(self, inner: Any, init: Tensor, mask: Tensor) -> None:
        self.inner = inner
        self.init = init
        self.mask = mask
        self.keep = 1.0 - mask  # 1 where the init image stays

    @property
    def schedule(self) -> NoiseSchedule:
        return self.inner.schedule

    @property
    def prediction(self) -> str:
        return self.inner.prediction

    @property
    def takes_guidance_parts(self) -> bool:  # handed on (CFG++ reads the unconditional x0)
        return bool(getattr(self.inner, "takes_guidance_parts", False))

    def around(self, inner: Any) -> Self:
        """This blend (its settings and tensors) around another ``inner``."""
        out = copy.copy(self)
        out.inner = inner
        return out

    @property
    def off_grid(self) -> Self:
        return self.around(getattr(self.inner, "off_grid", self.inner))

    def with_timesteps(self, sigmas: Tensor, timesteps: Tensor) -> Self:
        inner = self.inner.with_timesteps(sigmas, timesteps) if hasattr(self.inner, "with_timesteps") else self.inner
        return self.around(inner)

    def denoise(self, x: Tensor, sigma: Tensor | float, step: SamplerStep, cond: dict[str, Any]) -> Tensor:
        """``inner``'s answer, given the sampler's ``step`` when it takes one."""
        if getattr(self.inner, "takes_step", False):
            cond["step"] = step
        return self.inner(x, sigma, **cond)

    def finish(self, x: Tensor) -> Tensor:
        """The final blend: the known region from the clean init latent."""
        return self.keep * self.init + self.mask * x


class InpaintBlend(LatentBlend):
    """Keeps the known region (``mask == 0``) on the init image's noising path, as diffusers' inpaint pipeline
    does for 4-channel U-Nets: after every sampler step it sets ``x = (1 - m) * (init + sigma * noise) +
    m * x``. Here that happens where the next step reads ``x``: in place, on the sampler's own tensor, before
    each denoiser call except the run's first (diffusers does not blend the starting sample), which the
    sampler loop marks (``step.first``); ``first=True`` blends before that call too (ComfyUI's KSamplerX0Inpaint
    blends before every call, which matters where its start is not ``init + sigma * noise``: its max denoise).
    The final blend with the clean init latent is the pipeline's."""

    def __init__(
        self, inner: Any, init: Tensor, noise: Tensor, mask: Tensor, *, first: bool = False, noising: Any = None
    ) -> None:
        super().__init__(inner, init, mask)
        self.noise = noise
        self.first = first
        # (init, noise, sigma) -> the init on the model's noising path at sigma: VE's ``init + sigma noise`` by
        # default; a flow model's ``(1 - s) init + s noise`` (sdengine.diffusion.flow.flow_noise_scaling)
        self.noising = noising

    def __call__(self, x: Tensor, sigma: Tensor | float, *, step: SamplerStep, **cond: Any) -> Tensor:
        if self.first or not step.first:
            flat = torch.as_tensor(sigma).reshape(-1)
            s: float | Tensor = float(flat[0])
            if flat.shape[0] > 1 and not bool((flat == flat[0]).all()):  # rows at their own sigmas (DPM adaptive)
                s = flat.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            known = self.init + self.noise * s if self.noising is None else self.noising(self.init, self.noise, s)
            x.mul_(self.mask).add_(known * self.keep)
        return self.denoise(x, sigma, step, cond)


def comfy_timestep(schedule: Any, sigma: float) -> Tensor:
    """ComfyUI's ``model_sampling.timestep(sigma)``, float32: a discrete table's nearest timestep (an index, as its
    ModelSamplingDiscrete), a flow model's ``multiplier * sigma``, an EDM model's ``0.25 ln sigma``."""
    s = torch.as_tensor(float(sigma), dtype=torch.float32)
    if isinstance(schedule, NoiseSchedule):
        log_sigmas = schedule.log_sigmas.to(torch.float32)
        return (s.log() - log_sigmas).abs().argmin().to(torch.float32)
    return torch.as_tensor(schedule.sigma_to_t(s), dtype=torch.float32)


def differential_latent_mask(mask: Tensor, h: int, w: int) -> Tensor:
    """A grey mask ((H, W), (B, H, W) or (B, 1, H, W); 1 = repaint) at the latent's ``h`` x ``w``, kept grey:
    resized bilinearly as ComfyUI's prepare_mask resizes a noise mask; (B, 1, h, w) float32."""
    m = mask.float()
    m = m.reshape(-1, 1, m.shape[-2], m.shape[-1])
    return F.interpolate(m, size=(int(h), int(w)), mode="bilinear")


@dataclass(frozen=True, eq=False)
class DifferentialMask:
    """Differential Diffusion's rule (Levin & Fried 2023; ComfyUI's DifferentialDiffusion node): at a model call at
    ``sigma`` the region being denoised is where the grey mask ``soft`` (1 = repaint) is at or above the threshold
    ``(t(sigma) - t_to) / (t_from - t_to)`` (``t``: :func:`comfy_timestep`; ``t_from`` the run's first sigma's,
    ``t_to`` the larger of its last sigma's and the table's sigma_min's), which falls from 1 to 0 over the run: a
    pixel of grey level g changes during about the last g of the steps. ``strength`` below 1 (above 0) blends that
    binary mask with the grey one, ``strength * binary + (1 - strength) * soft`` (the node's ``strength``; 0 is
    taken as 1, as there)."""

    soft: Tensor
    t_from: Tensor
    t_to: Tensor
    schedule: Any
    strength: float = 1.0

    @classmethod
    def over(cls, soft: Tensor, schedule: Any, sigma_first: float, sigma_last: float, strength: float = 1.0) -> Self:
        """The rule over a run from ``sigma_first`` to ``sigma_last`` (0 where the run ends clean)."""
        last = max(float(schedule.sigma_min), float(sigma_last))
        return cls(soft, comfy_timestep(schedule, sigma_first), comfy_timestep(schedule, last), schedule, strength)

    def threshold(self, sigma: float) -> Tensor:
        """The grey level from which the mask repaints at ``sigma`` (NaN where the run's ends share a timestep:
        nothing repaints then, as in ComfyUI)."""
        span = self.t_from - self.t_to
        if float(span) == 0.0:
            return torch.tensor(float("nan"))
        return (comfy_timestep(self.schedule, sigma) - self.t_to) / span

    def at(self, sigma: float) -> Tensor:
        """The mask (1 = repaint) of a model call at ``sigma``."""
        binary = (self.soft >= self.threshold(sigma).to(self.soft.device)).to(self.soft.dtype)
        s = float(self.strength)
        if s and s < 1.0:
            return s * binary + (1.0 - s) * self.soft
        return binary


class DifferentialBlend(LatentBlend):
    """Inpainting with a grey mask by Differential Diffusion, as ComfyUI's KSamplerX0Inpaint runs it with the
    DifferentialDiffusion node's mask function: at every model call (the first too) the mask ``m`` is the rule's
    (:class:`DifferentialMask`) at that call's sigma, the network reads ``x * m + known * (1 - m)`` (``known``: the
    init latent on its noising path, ``init + sigma * noise`` or ``noising``'s) while the sampler keeps its own
    ``x``, and the call's x0 is ``x0 * m + init * (1 - m)``; the final blend (:meth:`finish`) takes the known region
    of the last call's mask from the clean init latent. With a mask of only 0 and 1 this is the plain inpainting of
    :class:`InpaintBlend` wherever the last call's threshold is above 0."""

    def __init__(self, inner: Any, init: Tensor, noise: Tensor, rule: DifferentialMask, *, noising: Any = None) -> None:
        super().__init__(inner, init, rule.soft)
        self.noise = noise
        self.rule = rule
        self.noising = noising
        self._last: list[Tensor] = []  # the last call's mask, shared by the copies ``around`` makes

    def __call__(self, x: Tensor, sigma: Tensor | float, *, step: SamplerStep, **cond: Any) -> Tensor:
        flat = torch.as_tensor(sigma).reshape(-1)
        s: float | Tensor = float(flat[0])
        if flat.shape[0] > 1 and not bool((flat == flat[0]).all()):  # rows at their own sigmas (DPM adaptive)
            s = flat.to(device=x.device, dtype=x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
        m = self.rule.at(float(flat[0])).to(device=x.device, dtype=x.dtype)  # ComfyUI reads the first row's sigma
        keep = 1.0 - m
        known = self.init + self.noise * s if self.noising is None else self.noising(self.init, self.noise, s)
        out = self.denoise(x * m + known * keep, sigma, step, cond)
        self._last[:] = [m]
        return out * m + self.init * keep

    def finish(self, x: Tensor) -> Tensor:
        m = self._last[0] if self._last else self.mask
        return (1.0 - m) * self.init + m * x


class A1111Blend(LatentBlend):
    """A1111's inpainting blend (its ``CFGDenoiser.apply_blend``, ``mask`` = its ``nmask``, 1 = repaint, the rounded
    latent mask; ``init`` its init latent), for any U-Net, 9-channel ones too:

    * ``before=False`` (its k-diffusion samplers): each call's x0 prediction is blended with the clean init latent,
      ``denoised * mask + init * (1 - mask)``;
    * ``before=True`` (its timestep samplers, DDIM, PLMS, UniPC: ``mask_before_denoising``): the network reads
      ``x * mask + init * (1 - mask)`` (in VP scaling: the clean init latent, no noise) while the sampler keeps
      its own x; the returned x0 is the one whose noise the sampler then finds for its own x (what A1111's
      timestep samplers do with the network's eps).

    The final blend (:meth:`finish`) is A1111's ``samples * nmask + init_latent * mask``."""

    def __init__(self, inner: Any, init: Tensor, mask: Tensor, *, before: bool) -> None:
        super().__init__(inner, init, mask)
        self.before = before

    def __call__(self, x: Tensor, sigma: Tensor | float, *, step: SamplerStep, **cond: Any) -> Tensor:
        parts = cond.get("guidance_parts")  # the unconditional x0 (CFG++) is blended as the guided one
        if not self.before:
            out = self.denoise(x, sigma, step, cond) * self.mask + self.init * self.keep
            if parts is not None and parts.uncond is not None:
                parts.uncond = parts.uncond * self.mask + self.init * self.keep
            return out
        s = float(torch.as_tensor(sigma).reshape(-1)[0])
        blended = x * self.mask + self.init * self.keep * math.sqrt(1.0 + s * s)  # VE of the VP blend
        out = self.denoise(blended, sigma, step, cond) + (x - blended)
        if parts is not None and parts.uncond is not None:
            parts.uncond = parts.uncond + (x - blended)
        return out


__all__ = [
    "A1111Blend",
    "DifferentialBlend",
    "DifferentialMask",
    "InpaintBlend",
    "LatentBlend",
    "StartLatents",
    "blur_mask",
    "cat_start_latents",
    "comfy_timestep",
    "differential_latent_mask",
    "posterior_rows",
    "start_latents",
]
