"""FLUX.2 [klein]'s reference images (diffusers' ``Flux2KleinPipeline(image=...)``, "klein edit"): how each is
checked, fitted and encoded. The transformer takes their latents as extra tokens
(:class:`sdengine.models.flux2.Flux2Transformer`, ids at t = 10, 20, ...).

diffusers' rules, in order, per image: at least 64 pixels a side and an aspect ratio of at most 8
(``Flux2ImageProcessor.check_image_input``; refused here in one line); an image over 1024 x 1024 pixels of area
resized (Lanczos) to about that area, each side ``int(side * sqrt(1024^2 / area))``; the sides floored to multiples
of the model's 16 (here the pipeline's ``size_multiple``) by a centred crop (``Flux2ImageProcessor._resize_and_crop``:
no resampling). The latent is the VAE posterior's mean (``sample_mode="argmax"``: no random draw, so the seeds'
noise is the same with or without references), patchified and normalised as the output's
(:func:`sdengine.pipeline.flux_kontext.encode_references` over the FLUX.2 VAE's ``scale_latents``).
A call that gives no width / height takes the first reference's fitted ones.
"""

from __future__ import annotations

import math

from PIL import Image

from sdengine.errors import GenerationError
from sdengine.io.images import load_image
from sdengine.pipeline.request import GenerationRequest

MAX_AREA = 1024 * 1024  # diffusers' target area for a larger reference
MIN_SIDE = 64  # Flux2ImageProcessor.check_image_input's min_side_length
MAX_ASPECT = 8  # and its max_aspect_ratio


def fitted_size(width: int, height: int, multiple: int, k: int = 0) -> tuple[tuple[int, int] | None, tuple[int, int]]:
    """((the resized size) or None when the image is not resized, (the cropped size)) of a ``width`` x ``height``
    reference image (module docstring); one line for an image diffusers refuses or one left with no pixels."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise GenerationError(
            f"reference image {k} is {width}x{height}: FLUX.2 takes references of at least {MIN_SIDE} pixels a side"
        )
    if max(width / height, height / width) > MAX_ASPECT:
        raise GenerationError(
            f"reference image {k} is {width}x{height}: FLUX.2 takes aspect ratios up to {MAX_ASPECT}:1"
        )
    resized = None
    if width * height > MAX_AREA:
        scale = math.sqrt(MAX_AREA / (width * height))
        resized = (int(width * scale), int(height * scale))
        width, height = resized
    return resized, (width - width % multiple, height - height % multiple)


def fit(image: Image.Image, multiple: int, k: int = 0) -> Image.Image:
    """One reference image fitted by diffusers' rules (module docstring)."""
    resized, (w, h) = fitted_size(image.width, image.height, multiple, k)
    if resized is not None:
        image = image.resize(resized, Image.Resampling.LANCZOS)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return image.crop((left, top, left + w, top + h)) if (w, h) != image.size else image


def prepare_references(r: GenerationRequest, multiple: int, notes: list[str]) -> list[Image.Image]:
    """The reference images of ``r`` read (RGB) and fitted; a note for each one whose size changed."""
    out = []
    for k, source in enumerate(r.reference_list()):
        image = load_image(source, f"reference image {k}", mode="RGB", error=GenerationError)
        fitted = fit(image, multiple, k)
        if fitted.size != image.size:
            notes.append(f"reference image {k} {image.width}x{image.height} fitted to {fitted.width}x{fitted.height}")
        out.append(fitted)
    return out


def reference_sizes(r: GenerationRequest, multiple: int) -> list[tuple[int, int]]:
    """The (width, height) each reference image of ``r`` is encoded at (reads the images' headers and sizes)."""
    out = []
    for k, source in enumerate(r.reference_list()):
        image = load_image(source, f"reference image {k}", mode="RGB", error=GenerationError)
        out.append(fitted_size(image.width, image.height, multiple, k)[1])
    return out


__all__ = ["MAX_AREA", "MAX_ASPECT", "MIN_SIDE", "fit", "fitted_size", "prepare_references", "reference_sizes"]
