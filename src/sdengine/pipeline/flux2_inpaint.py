"""FLUX.2 [klein] img2img and inpainting, as diffusers' ``Flux2KleinInpaintPipeline`` runs them.

The start, the steps and the blend are the core pipeline's (:class:`sdengine.pipeline.core.Pipeline`) through the
hooks FLUX.1 uses (:class:`sdengine.pipeline.flux.FluxPipeline`: ``img2img_first_step``, ``noised_latent``); what
this module adds is FLUX.2's own facts:

* the output size: a call that gives no width / height takes the init image's, by diffusers' rule
  (:func:`init_size`): an image over 1024 x 1024 pixels of area resized (Lanczos) to about that area, each side
  ``int(side * sqrt(1024^2 / area))``, then the sides floored to multiples of 16 (the image resized to them, Lanczos:
  the core's "just resize"). A call that gives a size has its init image fitted to it in its ``resize_mode``;
* the init latent: the VAE posterior's mean (``sample_mode="argmax"``: no random draw), patchified and normalised
  by the VAE's batch-norm statistics (:meth:`sdengine.models.flux2_vae.Flux2VAE.scale_latents`); then each row's
  noise, the row generator's first draw, nothing after it (:func:`start_options`);
* strength: the first step ``int(n - min(n strength, n))`` of the ``n``-step grid whose shift ``mu`` is the full
  ``n`` steps' (diffusers' ``get_timesteps`` after ``retrieve_timesteps``); the start ``s noise + (1 - s) init``;
* the init image is also a reference: its latent's tokens join every step at time id 10 (diffusers passes
  ``image_latents`` as the first condition image), the call's reference images (``reference_images``,
  diffusers' ``image_reference``) after it at 20, 30, ... (:func:`call_references`). A step holds twice the image's
  tokens, plus the references' (:func:`token_refusal`);
* the mask (white = repaint): read as grey, resized to the output (Lanczos), binarised at 0.5 and shrunk bilinearly
  to the latent grid (diffusers' ``mask_processor`` with ``do_binarize`` and ``prepare_mask_latents``), so the
  cells on its edge are grey; a blurred mask (``mask_blur`` > 0, sdengine's and A1111's option; diffusers has none)
  is kept grey and shrunk the same way. After every step the known region is put back on the init's noising path
  at the next sigma, ``m x + (1 - m) (s' noise + (1 - s') init)``, and after the last with the clean init latent
  (:class:`sdengine.pipeline.latents.InpaintBlend`);
* img2img (an init image without a mask) is that pipeline with an all-white mask: no blend.

FLUX.2 [dev] runs the same img2img and inpainting (diffusers has no [dev] pipeline for them: it is klein's algorithm
with [dev]'s guidance input at every step, the embedded guidance beside the text as in its text-to-image).
``init_latent_resize`` (A1111's latent upscale: the init latent is the output's size, as its reference is) is
refused in one line by :func:`init_refusals`.
"""

from __future__ import annotations

import math
from typing import Any

from PIL import Image

from sdengine.errors import GenerationError
from sdengine.io.images import load_image
from sdengine.pipeline.flux2_references import MAX_AREA
from sdengine.pipeline.request import GenerationRequest

INIT_T = 10  # the init image's reference time id (diffusers' _prepare_image_ids: the first condition image)


def init_size(width: int, height: int, multiple: int) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """((the area-resized size) or None, (the output size)) of a ``width`` x ``height`` init image by diffusers'
    rule (module docstring); one line for an image smaller than ``multiple`` a side."""
    resized = None
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        resized = (int(width * scale), int(height * scale))
        width, height = resized
    w, h = width - width % multiple, height - height % multiple
    if w < multiple or h < multiple:
        raise GenerationError(
            f"init image {width}x{height} is smaller than {multiple}x{multiple} pixels (FLUX.2's size multiple)"
        )
    return resized, (w, h)


def init_refusals(r: GenerationRequest) -> list[str]:
    """What FLUX.2 ([klein] and [dev]) does not run with an init image, one line each; needs no model."""
    if r.init_image is None:
        return []
    reasons = []
    if r.init_latent_resize:
        reasons.append(
            "init_latent_resize: A1111's latent upscale is not supported for FLUX.2: its init image is also a "
            "reference at the output size (give resize_mode instead)"
        )
    return reasons


def prepare_init(r: GenerationRequest, multiple: int, notes: list[str]) -> GenerationRequest:
    """``r`` with the size its init image gives where the call gives none (:func:`init_size`; the one it gives kept),
    and an init image over the area limit resized to it first (as diffusers resizes it twice), with a note."""
    if r.init_image is None or (r.width is not None and r.height is not None):
        return r
    image = load_image(r.one_init_image(), "init image", mode="RGB", error=GenerationError)
    resized, (w, h) = init_size(image.width, image.height, multiple)
    if resized is not None:
        notes.append(f"init image {image.width}x{image.height} resized to {resized[0]}x{resized[1]} (1024x1024 area)")
        image = image.resize(resized, Image.Resampling.LANCZOS)
    return r.replace(init_image=image, width=r.width or w, height=r.height or h)


def start_options(p: Any) -> dict[str, Any]:
    """:func:`sdengine.pipeline.latents.start_latents`' options of a FLUX.2 call with an init image (module
    docstring); {} for any other call."""
    if p.init is None:
        return {}
    return {"init_mode": True, "mask_rule": "bilinear", "encode_masked": False}


def call_references(p: Any) -> list[Image.Image]:
    """The images whose latents join every step of a call: its init image (fitted to the output) first, then its
    reference images."""
    return ([p.init] if p.init is not None else []) + list(p.references or [])


def token_refusal(
    width: int, height: int, reference_sizes: list[tuple[int, int]], multiple: int, max_side: int, name: str
) -> str | None:
    """Why a ``width`` x ``height`` call with an init image (whose tokens join the image's as a reference) and
    references of these sizes is too much work, or None (the cap is :func:`sdengine.pipeline.flux.token_refusal`'s:
    a ``max_side`` x ``max_side`` image's tokens)."""
    own = (width // multiple) * (height // multiple)
    refs = sum((w // multiple) * (h // multiple) for w, h in reference_sizes)
    cap = (max_side // multiple) ** 2
    if 2 * own + refs <= cap:
        return None
    more = f" and {len(reference_sizes)} reference image(s) ({refs})" if reference_sizes else ""
    return (
        f"the init image's tokens join each step as a reference: {width}x{height} ({own} tokens) with its init image "
        f"({own}){more} is {2 * own + refs} tokens, over {name}'s limit of {cap} (a {max_side}x{max_side} image's); "
        "use a smaller size or fewer references"
    )


__all__ = [
    "INIT_T",
    "call_references",
    "init_refusals",
    "init_size",
    "prepare_init",
    "start_options",
    "token_refusal",
]
