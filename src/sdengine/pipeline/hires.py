"""The hires fix (AUTOMATIC1111's ``enable_hr``): a txt2img pass at the request's size, an upscale, and an
img2img pass at the larger size.

1. First pass: the request as txt2img at ``width`` x ``height`` (row ``i`` from the generator of seed ``i``).
2. Upscale to ``hr_scale`` times that size, or to ``hr_resize_x`` x ``hr_resize_y`` (A1111's rule: one side
   given keeps the aspect ratio; both given cover that box keeping the aspect ratio, then the centre is cut to
   it). Sizes are rounded down to the model's size multiple.

   * ``hr_upscaler`` "Latent" and its variants: the first pass's latent is interpolated
     (``torch.nn.functional.interpolate``; bilinear, bicubic, nearest, nearest-exact, with or without
     antialias), as A1111's ``latent_upscale_modes``.
   * "None" / "Lanczos": the first pass's image is decoded, rounded to 8 bits (the pixels the first pass
     would have saved), resized with Lanczos, cut to the box, and encoded again.
   * the name of an upscaler model (ESRGAN, Real-ESRGAN; :mod:`sdengine.models.esrgan`) in the request's
     ``upscalers_dir``: as "Lanczos", but the image first goes through the model (in tiles, as A1111's
     ``Upscaler.upscale``: until it covers the size, at most 3 times), then Lanczos makes the exact size.
3. Second pass: img2img of the upscaled start at ``strength`` (A1111's ``denoising_strength``) for
   ``hr_second_pass_steps`` steps (0 = ``steps``), with ``hr_sampler`` / ``hr_schedule`` (None = the first
   pass's),
   ``hr_prompt`` / ``hr_negative_prompt`` ("" = the first pass's). How the strength counts the steps is the
   request's ``strength_rule`` (:func:`sdengine.diffusion.schedules.hires_steps`): "diffusers", ``int(N *
   strength)`` of N steps; "a1111", A1111's all N steps, the last N of a schedule of ``int(N / min(strength,
   0.999))`` steps.

The seed rule of the second pass (A1111's: the noise is drawn again from the same seed): row ``i`` gets a NEW
``torch.Generator("cpu").manual_seed(seed_i)``, exactly as an img2img call of that seed would, so the second
pass IS an img2img call:

* pixel upscalers: identical to ``pipe(init_image=upscaled_image, seed=seed_i, strength=..., steps=...)``
  at the larger size (the posterior sample of the encoded image first, then the noise);
* latent upscalers: there is no image to encode, so the generator draws only the noise, which the sampler
  adds to the upscaled latent at the start sigma of ``strength``.

A variation seed (``subseed``) mixes into the second pass's noise as into the first's. Differences from
A1111: the pixel path cuts the resize box from the image before encoding (A1111 cuts the encoded latent), so
that it stays an img2img of an image; "None" resizes with Lanczos like "Lanczos" (A1111's "None" upscaler
also ends in its Lanczos resize); A1111's other upscalers (SwinIR, LDSR, ScuNET, ...) are refused by name.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import hires_steps
from sdengine.errors import GenerationError
from sdengine.io.images import to_uint8
from sdengine.pipeline.request import GenerationRequest
from sdengine.pipeline.result import StepCallback, StepInfo

# A1111's shared.latent_upscale_modes: name -> (torch interpolation mode, antialias)
LATENT_UPSCALERS: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
PIXEL_UPSCALERS = ("None", "Lanczos")  # decode, Lanczos resize, encode
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)


def upscaler_name(name: Any, upscalers_dir: str | Path | None = None) -> str:
    """The canonical spelling of an upscaler name (case and outer spaces ignored), or the listed name of an
    upscaler model in ``upscalers_dir``; a one-line GenerationError listing the valid names otherwise."""
    return resolve_hires_upscaler(name, upscalers_dir)[0]


def resolve_hires_upscaler(name: Any, upscalers_dir: str | Path | None = None) -> tuple[str, Path | None]:
    """(canonical name, model file or None) of an ``hr_upscaler``: a built-in one (the latent modes, "None",
    "Lanczos"), or an upscaler model in ``upscalers_dir`` (:func:`sdengine.weights.upscaler_file.resolve_upscaler`);
    a one-line GenerationError otherwise."""
    if isinstance(name, str):
        by_lower = {u.lower(): u for u in UPSCALERS}
        found = by_lower.get(name.strip().lower())
        if found is not None:
            return found, None
        if upscalers_dir is not None and name.strip():
            from sdengine.weights.upscaler_file import UpscalerFileError, resolve_upscaler

            try:
                return resolve_upscaler(name, upscalers_dir)
            except UpscalerFileError as e:
                raise GenerationError(f"hires upscaler: {e} (or one of {', '.join(UPSCALERS)})") from None
    where = (
        "" if upscalers_dir is not None else " (an upscaler model such as ESRGAN needs upscalers_dir, --upscalers-dir)"
    )
    raise GenerationError(f"unknown hires upscaler {name!r}; sdengine has: {', '.join(UPSCALERS)}{where}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def validate_hires(r: GenerationRequest) -> None:
    """The model-independent checks of the hires settings (called by ``GenerationRequest.validate``)."""
    scale = r.hr_scale
    if isinstance(scale, bool) or not isinstance(scale, int | float | np.number) or not math.isfinite(scale):
        raise GenerationError(f"hr_scale must be a number, got {scale!r}")
    if scale <= 0:
        raise GenerationError(f"hr_scale must be > 0, got {scale!r}")
    for name in ("hr_resize_x", "hr_resize_y", "hr_second_pass_steps"):
        v = getattr(r, name)
        if not _is_int(v) or v < 0:
            raise GenerationError(f"{name} must be an integer >= 0, got {v!r}")
    if r.upscalers_dir is not None and not Path(r.upscalers_dir).is_dir():
        what = "is not a folder" if Path(r.upscalers_dir).exists() else "does not exist"
        raise GenerationError(f"upscalers folder {r.upscalers_dir} {what}")
    upscaler_name(r.hr_upscaler, r.upscalers_dir)
    for name in ("hr_prompt", "hr_negative_prompt"):
        if not isinstance(getattr(r, name), str):
            raise GenerationError(f"{name} must be a string")
    if r.hr_sampler is not None or r.hr_schedule is not None:
        if not isinstance(r.hr_sampler, str | None) or not isinstance(r.hr_schedule, str | None):
            raise GenerationError(f"hr_sampler and hr_schedule must be names, got {r.hr_sampler!r}, {r.hr_schedule!r}")
        try:
            hires_sampler(r)
        except ValueError as e:  # named by what it is about: an unknown schedule is hr_schedule's
            which = "hr_schedule" if str(e).startswith("unknown schedule") else "hr_sampler"
            raise GenerationError(f"{which}: {e}") from None
    if r.init_image is not None or r.mask is not None:
        raise GenerationError("the hires fix is a txt2img option: give no init_image or mask with enable_hr")
    steps = int(r.hr_second_pass_steps) or int(r.steps)
    if float(r.strength) <= 0.0:  # the a1111 rule's img2img runs one step at 0, its hires pass none
        raise GenerationError(f"hires strength must be in (0, 1], got {r.strength!r}")
    try:
        sampler: str | None = hires_sampler(r)[0]
    except ValueError:  # the request's own sampler: refused where it is checked
        sampler = None
    total, start = hires_steps(steps, float(r.strength), r.strength_rule, sampler)
    if start >= total:
        raise GenerationError(
            f"hires strength {r.strength} with {steps} second-pass steps runs no step: raise "
            "hr_second_pass_steps or strength"
        )


def hires_sampler(r: GenerationRequest, *, sdxl: bool = False) -> tuple[str, str]:
    """The second pass's (sampler, schedule) (``sdxl``: on an SDXL model, as :func:`sampling.resolve`):
    ``hr_sampler`` (or ``sampler``) with ``hr_schedule`` (or the
    request's ``schedule`` rule)."""
    schedule = r.schedule if r.hr_schedule is None else r.hr_schedule
    return sampling.resolve(r.hr_sampler or r.sampler, schedule, sdxl=sdxl)


@dataclass(frozen=True)
class HiresPlan:
    """What the second pass does, settled from a request and a model."""

    upscaler: str
    scaled_width: int  # the upscale's size, before the centre cut
    scaled_height: int
    width: int  # the final image
    height: int
    steps: int  # the second pass's schedule (sdengine.diffusion.schedules.hires_steps)
    sampler: str
    schedule: str
    start: int = 0  # the index of its first step run
    model: str | None = None  # the upscaler model's file (an ``hr_upscaler`` of ``upscalers_dir``)

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_UPSCALERS


def _scaled_size(r: GenerationRequest, width: int, height: int) -> tuple[int, int, int, int]:
    """A1111's ``calculate_target_resolution``: (upscaled w, h, box w, h)."""
    rx, ry = int(r.hr_resize_x), int(r.hr_resize_y)
    if rx == 0 and ry == 0:
        w, h = int(width * float(r.hr_scale)), int(height * float(r.hr_scale))
        return w, h, w, h
    if ry == 0:
        w, h = rx, rx * height // width
        return w, h, w, h
    if rx == 0:
        w, h = ry * width // height, ry
        return w, h, w, h
    if width / height < rx / ry:
        return rx, rx * height // width, rx, ry
    return ry * width // height, ry, rx, ry


def hires_size(r: GenerationRequest, width: int, height: int, multiple: int) -> tuple[int, int]:
    """The size the hires fix's second pass makes from a ``width`` x ``height`` first pass (A1111's target
    resolution, rounded down to the model's size ``multiple``), as :func:`plan_hires` plans it; no model needed."""
    sw, sh, _, _ = _scaled_size(r, width, height)
    return sw // multiple * multiple, sh // multiple * multiple


def check_hires_size(r: GenerationRequest, width: int, height: int, multiple: int) -> None:
    """A one-line GenerationError when the hires fix's size from a ``width`` x ``height`` first pass is below the
    model's size ``multiple`` (as :func:`plan_hires` refuses it); no model needed."""
    _, _, bw, bh = (v // multiple * multiple for v in _scaled_size(r, width, height))
    if min(bw, bh) < multiple:
        raise GenerationError(
            f"the hires size {bw}x{bh} (from {width}x{height}) is below the model's size step {multiple}: raise "
            "hr_scale or hr_resize_x/hr_resize_y"
        )


def plan_hires(pipe: Any, r: GenerationRequest, width: int, height: int, sampler: str, schedule: str) -> HiresPlan:
    """The hires plan of a request on ``pipe`` (its size multiple and step limit), or a one-line
    GenerationError."""
    validate_hires(r)
    m = int(pipe.size_multiple)
    check_hires_size(r, width, height, m)
    sw, sh, bw, bh = (v // m * m for v in _scaled_size(r, width, height))
    if r.hr_sampler or r.hr_schedule is not None:
        sampler, schedule = hires_sampler(r, sdxl=getattr(pipe, "text_kind", "") == "sdxl")
    total, start = check_hires_steps(r, sampler, int(pipe.noise_schedule.num_train_timesteps))
    name, model = resolve_hires_upscaler(r.hr_upscaler, r.upscalers_dir)
    return HiresPlan(name, sw, sh, bw, bh, total, sampler, schedule, start, None if model is None else str(model))


def check_hires_steps(r: GenerationRequest, sampler: str, limit: int) -> tuple[int, int]:
    """The second pass's (schedule steps, first step) with the second pass's ``sampler`` (a resolved name), or a
    one-line GenerationError where the schedule is over the model's ``limit`` training timesteps (A1111's rule
    makes one of steps / strength steps); no model needed, so the server refuses it before queueing a job."""
    steps = int(r.hr_second_pass_steps) or int(r.steps)
    if steps > limit:
        raise GenerationError(f"hr_second_pass_steps must be at most {limit}, got {steps}")
    total, start = hires_steps(steps, float(r.strength), r.strength_rule, sampler)
    if total > limit:  # the a1111 rule's schedule of steps / strength steps
        raise GenerationError(
            f"hires strength {r.strength} with {steps} second-pass steps needs a schedule of {total} steps "
            f"(A1111's rule: steps / strength), over the model's {limit}: raise strength or lower the steps"
        )
    return total, start


def _lora_tags(text: str) -> list[tuple[str, Any]]:
    from sdengine.prompts import extract_lora_tags

    return extract_lora_tags(text)[1]


def hires_prompts(p: Any) -> tuple[list[str], list[str]]:
    """The second pass's (prompts, negative prompts) per row: ``hr_prompt`` / ``hr_negative_prompt``, or the
    row's own where empty (A1111's rule)."""
    r = p.request
    prompts = [r.hr_prompt or t for t in p.prompts]
    negatives = [r.hr_negative_prompt or t for t in p.negatives]
    if r.hr_prompt and _lora_tags(r.hr_prompt) != _lora_tags(p.prompts[0]):
        raise GenerationError(
            "hr_prompt must name the same <lora:...> tags as the prompt (the LoRAs are applied once per call)"
        )
    return prompts, negatives


def upscale_latents(latents: Tensor, plan: HiresPlan, factor: int) -> Tensor:
    """The first pass's latents interpolated to the plan's size (A1111's latent upscale), then the centre cut."""
    mode, antialias = LATENT_UPSCALERS[plan.upscaler]
    size = (plan.scaled_height // factor, plan.scaled_width // factor)
    x = F.interpolate(latents.float(), size=size, mode=mode, antialias=antialias)
    cut_y = (plan.scaled_height - plan.height) // factor
    cut_x = (plan.scaled_width - plan.width) // factor
    return x[:, :, cut_y // 2 : cut_y // 2 + plan.height // factor, cut_x // 2 : cut_x // 2 + plan.width // factor]


def upscale_image(image: Image.Image, plan: HiresPlan, factor: int, device: Any = "cpu") -> Image.Image:
    """A first-pass image resized with Lanczos to the plan's size, then the centre cut (in whole latent cells,
    as A1111 cuts). With an upscaler model (``plan.model``, run on ``device``), A1111's ``resize_image``: the
    model upscales by what covers the size (when that is over 1), then Lanczos resizes to it."""
    size = (plan.scaled_width, plan.scaled_height)
    if plan.model is not None:
        from sdengine.models.esrgan import upscale_image as model_upscale
        from sdengine.weights.upscaler_file import load_upscaler

        scale = max(size[0] / image.width, size[1] / image.height)
        if scale > 1.0:
            image = model_upscale(load_upscaler(plan.model, device), image, scale)
    big = image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
    left = (plan.scaled_width - plan.width) // factor // 2 * factor
    top = (plan.scaled_height - plan.height) // factor // 2 * factor
    return big.crop((left, top, left + plan.width, top + plan.height))


def _shifted(callback: StepCallback | None, before: int, total: int) -> StepCallback | None:
    """The request's callback seeing one count of steps over both passes."""
    if callback is None:
        return None

    def shifted(info: StepInfo) -> bool | None:
        return callback(
            StepInfo(before + info.step, total, info.sigma, info.latents, info.denoised, info.tiny_vae, info.rgb_map)
        )

    return shifted


def _rows_of_units(r: GenerationRequest, i: int, n: int) -> Any:
    """The ControlNet units of row ``i`` alone (a per-row list or batch of control images is cut), in the second
    pass's mode (a unit's ``hires_mode``)."""
    if r.controlnets is None:
        return None
    out = []
    for u in r.control_units():
        image = u.image
        if isinstance(image, list | tuple) and len(image) == n:
            image = [image[i]]
        elif isinstance(image, Tensor) and image.ndim == 4 and image.shape[0] == n and n > 1:
            image = image[i : i + 1]
        out.append(dataclasses.replace(u, image=image, mode=u.hires_mode or u.mode))
    return out


def generate_hires(pipe: Any, p: Any, hr_model: Any = None) -> Tensor:
    """(N, 3, H, W) images in [0, 1]: the first pass, the upscale and the second pass of a prepared request
    whose ``hires`` plan is set (see the module docstring). ``hr_model``: the second pass's model (A1111's
    ``hr_checkpoint_name``), None for ``pipe``; the first pass's pixels are ``pipe``'s VAE's, the final ones
    ``hr_model``'s."""
    plan: HiresPlan = p.hires
    r: GenerationRequest = p.request
    first_run = int(r.steps)  # txt2img runs every step
    second_run = plan.steps - plan.start
    total = first_run + second_run
    hires_prompts(p)  # its errors before any model runs

    first = first_pass(p, callback=_shifted(r.callback, 0, total))
    latents = pipe.sample_latents(first)
    second = hr_model if hr_model is not None else pipe
    return second_pass(second, p, latents, callback=_shifted(r.callback, first_run, total), decoder=pipe)


def first_pass(p: Any, callback: StepCallback | None = None) -> Any:
    """The first pass of a prepared hires request: the same request as plain txt2img (its ``Prepared``)."""
    return dataclasses.replace(p, request=p.request.replace(callback=callback), hires=None)


def second_prepared(p: Any, callback: StepCallback | None = None) -> Any:
    """The second pass of a prepared hires request ``p`` as a ``Prepared`` of its own (no init yet): the larger
    size, the second pass's sampler, schedule, steps (its first step ``start_step``) and prompts."""
    plan: HiresPlan = p.hires
    hr_prompts, hr_negatives = hires_prompts(p)
    r = p.request
    if any(u.hires_mode is not None for u in r.control_units()):  # a unit's mode in the second pass
        r = r.replace(controlnets=[dataclasses.replace(u, mode=u.hires_mode or u.mode) for u in r.control_units()])
    if any(u.reference is not None and u.mode != "controlnet" for u in r.control_units()):
        # the extension's reference units run with style fidelity 0 in the second pass (but "ControlNet is more
        # important": 1, which the unit's mode gives)
        r = r.replace(
            controlnets=[
                dataclasses.replace(u, style_fidelity=0.0) if u.reference is not None and u.mode != "controlnet" else u
                for u in r.control_units()
            ]
        )
    return dataclasses.replace(
        p,
        start_step=plan.start,
        # HyperTile for the second pass only (A1111's hypertile_enable_unet_secondpass): on from here
        request=r.replace(steps=plan.steps, callback=callback, hypertile_hires_only=False),
        width=plan.width,
        height=plan.height,
        sampler=plan.sampler,
        schedule=plan.schedule,
        prompts=hr_prompts,
        negatives=hr_negatives,
        init=None,
        mask=None,
        hires=None,
    )


def upscaled_pictures(decoder: Any, p: Any, latents: Tensor) -> list[Image.Image]:
    """The pixel upscalers' start of each row: the first pass's ``latents`` decoded by ``decoder`` (the model
    whose VAE ends the first pass), rounded to 8 bits, resized and cut to the plan's size."""
    factor = int(decoder.vae_scale_factor)
    pictures = [Image.fromarray(a) for a in to_uint8(decoder.decode_latents(first_pass(p), latents))]
    device = getattr(decoder, "device", "cpu")  # an upscaler model runs in fp32 where the model runs
    return [upscale_image(picture, p.hires, factor, device) for picture in pictures]


def second_pass(
    pipe: Any, p: Any, latents: Tensor, callback: StepCallback | None = None, decoder: Any = None
) -> Tensor:
    """(N, 3, H, W) images in [0, 1]: the upscale and the img2img pass of a prepared hires request ``p`` from
    its first pass's ``latents`` (``pipe.sample_latents(first_pass(p))``), run on ``pipe``; ``decoder``: the
    model whose VAE decodes the first pass for a pixel upscaler (None: ``pipe``)."""
    plan: HiresPlan = p.hires
    r: GenerationRequest = p.request
    factor = int(pipe.vae_scale_factor)
    second = second_prepared(p, callback)
    if plan.latent:
        start = upscale_latents(latents, plan, factor)
        return pipe.decode_latents(second, pipe.sample_latents(second, init_latent=start))

    # Pixel upscale: each row is an img2img of its own upscaled picture, run alone (the pipeline's init image
    # is one per call).
    pictures = upscaled_pictures(decoder if decoder is not None else pipe, p, latents)
    n = len(p.seeds)
    out = []
    for i, picture in enumerate(pictures):
        row = dataclasses.replace(
            second,
            request=second.request.replace(controlnets=_rows_of_units(r, i, n)),
            prompts=[second.prompts[i]],
            negatives=[second.negatives[i]],
            seeds=[p.seeds[i]],
            subseeds=None if p.subseeds is None else [p.subseeds[i]],
            init=picture,
        )
        out.append(pipe.decode_latents(row, pipe.sample_latents(row)))
    return torch.cat(out)


def infotext_fields(p: Any, i: int, *, sdxl: bool = False) -> dict[str, Any]:
    """Row ``i``'s hires fields as A1111 writes them (``Denoising strength`` through our ``strength`` key);
    ``sdxl``: the model is an SDXL one (:func:`sdengine.diffusion.sampling.infotext_schedule`)."""
    plan: HiresPlan = p.hires
    r: GenerationRequest = p.request
    out: dict[str, Any] = {"strength": float(r.strength)}
    if plan.sampler != p.sampler:
        out["Hires sampler"] = sampling.SAMPLERS[plan.sampler].a1111
    if plan.schedule != p.schedule:
        out["Hires schedule type"] = sampling.SCHEDULE_A1111[sampling.infotext_schedule(plan.schedule, sdxl=sdxl)]
    prompts, negatives = hires_prompts(p)
    if prompts[i] != p.prompts[i]:
        out["Hires prompt"] = prompts[i]
    if negatives[i] != p.negatives[i]:
        out["Hires negative prompt"] = negatives[i]
    if int(r.hr_resize_x) == 0 and int(r.hr_resize_y) == 0:
        out["Hires upscale"] = float(r.hr_scale)
    else:
        out["Hires resize"] = f"{int(r.hr_resize_x)}x{int(r.hr_resize_y)}"
    if int(r.hr_second_pass_steps):
        out["Hires steps"] = int(r.hr_second_pass_steps)
    out["Hires upscaler"] = plan.upscaler
    return out


__all__ = [
    "LATENT_UPSCALERS",
    "PIXEL_UPSCALERS",
    "UPSCALERS",
    "HiresPlan",
    "first_pass",
    "generate_hires",
    "hires_prompts",
    "hires_sampler",
    "infotext_fields",
    "plan_hires",
    "resolve_hires_upscaler",
    "second_pass",
    "second_prepared",
    "upscale_image",
    "upscale_latents",
    "upscaled_pictures",
    "upscaler_name",
    "validate_hires",
]
