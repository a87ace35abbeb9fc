"""FLUX.1 Kontext: image editing with reference images on the Flux pipeline.

Black Forest Labs' FLUX.1 Kontext [dev] (2025; Labs et al., "FLUX.1 Kontext: Flow Matching for In-Context Image
Generation and Editing in Latent Space") has FLUX.1 [dev]'s shapes. What makes it edit: each reference image is
VAE-encoded (the posterior's mean, shifted and scaled as any Flux latent), packed into 2x2 patches, and its
tokens are appended to the image's, with position ids whose first coordinate is 1 (the image's are 0); the
network's output for them is dropped (:func:`sdengine.models.flux.reference_ids`, the transformer's
``reference_latents``). These are diffusers' ``FluxKontextPipeline``'s facts (``image=``) and ComfyUI's
(``ReferenceLatent`` on the conditioning; several chained references laid out by its "offset" method).

What this module settles, before any model runs (:func:`prepare_references`):

* each reference image (``GenerationRequest.reference_images``) is read as RGB, its sides floored to the size
  multiple (16 for Flux.1), and with ``reference_auto_resize`` (the default, diffusers' ``_auto_resize``) put at
  the Kontext training resolution whose aspect ratio is nearest (:data:`PREFERRED_KONTEXT_RESOLUTIONS`; the
  aspect ratio of the floored sides, as diffusers reads it), Lanczos-resized (PIL's, diffusers' resize);
* the output size, where the call gives neither width nor height: the first reference's (BFL's and ComfyUI's
  workflows edit at the reference's size; diffusers' pipeline makes ``max_area`` 1024^2 at the aspect ratio of
  its ``width`` / ``height``, 1024x1024 when not given: pass them to match it);
* what does not combine with references, one line each (:func:`reference_refusals`).

The latents are made at the call (:func:`encode_references`), once, with the pipeline's VAE (its full encoder).

With an init image (docs/flux.md, "Kontext inpainting and img2img"): diffusers' ``FluxKontextInpaintPipeline``.
The output takes the init image's size fitted as a reference (:func:`output_size`); the init latent is the VAE
posterior's mean, so the noise is each row's first draw (:func:`start_options`); a mask keeps its known region as
Flux inpainting does; no mask is that pipeline with an all-white mask (Kontext img2img). diffusers'
``image_reference=None`` is the init image given as the reference too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sdengine import vae_utils
from sdengine.errors import GenerationError
from sdengine.io.images import load_image
from sdengine.pipeline.request import GenerationRequest

# diffusers' PREFERRED_KONTEXT_RESOLUTIONS, ComfyUI's PREFERED_KONTEXT_RESOLUTIONS: (width, height), about 1 MP each
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def preferred_resolution(width: int, height: int) -> tuple[int, int]:
    """The Kontext resolution (width, height) whose aspect ratio is nearest ``width / height`` (the first of a tie,
    as diffusers' and ComfyUI's ``min`` over (distance, width, height) picks)."""
    ratio = width / height
    _, w, h = min((abs(ratio - pw / ph), pw, ph) for pw, ph in PREFERRED_KONTEXT_RESOLUTIONS)
    return w, h


def kontext_size(width: int, height: int, multiple: int, auto_resize: bool) -> tuple[int, int]:
    """The size a ``width`` x ``height`` reference image is encoded at (diffusers' FluxKontextPipeline): its sides
    floored to ``multiple``, then (``auto_resize``) the preferred resolution of that aspect ratio, floored again."""
    w, h = width - width % multiple, height - height % multiple
    if w < multiple or h < multiple:
        raise GenerationError(
            f"reference image {width}x{height} is smaller than {multiple}x{multiple} pixels (the model's size multiple)"
        )
    if auto_resize:
        w, h = preferred_resolution(w, h)
    return w - w % multiple, h - h % multiple


def reference_refusals(r: GenerationRequest) -> list[str]:
    """What does not combine with reference images on Flux, each as its one-line reason (empty: none or none
    given). Needs no model."""
    if not r.reference_list():
        return []
    reasons = []
    if r.init_latent_resize:
        reasons.append(
            "reference_images (FLUX.1 Kontext) and init_latent_resize cannot run together: the init image is fitted "
            "to the output size"
        )
    if r.controlnets:
        reasons.append("reference_images (FLUX.1 Kontext) and Flux ControlNets cannot run together")
    if r.enable_hr:
        reasons.append("reference_images (FLUX.1 Kontext) and the hires fix cannot run together")
    if r.control_image is not None:
        reasons.append(
            "reference_images (FLUX.1 Kontext) and a control_image (FLUX.1 Depth / Canny) cannot run together"
        )
    return reasons


def reference_sizes(r: GenerationRequest, multiple: int) -> list[tuple[int, int]]:
    """The (width, height) each reference image of ``r`` is encoded at (reads the images, resizes none)."""
    out = []
    for k, source in enumerate(r.reference_list()):
        image = load_image(source, f"reference image {k}", mode="RGB", error=GenerationError)
        out.append(kontext_size(image.width, image.height, multiple, bool(r.reference_auto_resize)))
    return out


def _fitted(r: GenerationRequest, multiple: int, notes: list[str]) -> list[Image.Image]:
    out = []
    for k, source in enumerate(r.reference_list()):
        image = load_image(source, f"reference image {k}", mode="RGB", error=GenerationError)
        w, h = kontext_size(image.width, image.height, multiple, bool(r.reference_auto_resize))
        if (w, h) != image.size:
            how = "the nearest Kontext resolution" if r.reference_auto_resize else "sides floored to multiples"
            notes.append(f"reference image {k} {image.width}x{image.height} resized to {w}x{h} ({how})")
            image = image.resize((w, h), Image.Resampling.LANCZOS)
        out.append(image)
    return out


def prepare_references(r: GenerationRequest, multiple: int, notes: list[str]) -> list[Image.Image]:
    """The reference images of ``r`` read and fitted (:func:`kontext_size`), a note for each one resized."""
    return _fitted(r, multiple, notes)


def output_size(r: GenerationRequest, multiple: int, references: list[Image.Image]) -> tuple[int, int]:
    """The size of a Kontext call that gives neither width nor height: its init image's, fitted as a reference is
    (:func:`kontext_size`; diffusers' ``FluxKontextInpaintPipeline`` edits at it), else the first reference's."""
    if r.init_image is None:
        return references[0].size
    init = load_image(r.one_init_image(), "init image", mode="RGB", error=GenerationError)
    return kontext_size(init.width, init.height, multiple, bool(r.reference_auto_resize))


def start_options(p: Any) -> dict[str, Any]:
    """:func:`sdengine.pipeline.latents.start_latents`' options of a Kontext call with an init image: the init
    latent is the VAE posterior's mean, as diffusers' ``FluxKontextInpaintPipeline`` encodes it (no draw before the
    noise). {} for any other call."""
    return {"init_mode": True} if p.references and p.init is not None else {}


def reference_tokens(sizes: list[tuple[int, int]], vae_factor: int, patch: int = 2) -> int:
    """How many tokens references of these pixel sizes add to every row."""
    cell = vae_factor * patch
    return sum((w // cell) * (h // cell) for w, h in sizes)


def encode_references(pipe: Any, images: list[Image.Image], tiled: bool | None) -> list[Tensor]:
    """Each reference image's latent (1, C, h, w): the VAE posterior's mean, shifted and scaled (diffusers'
    ``_encode_vae_image`` with ``sample_mode="argmax"``; no random draw), in float32."""
    out = []
    with torch.inference_mode():
        for image in images:
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
            post = vae_utils.encode_moments(pipe.vae, pixels.to(pipe.device) * 2.0 - 1.0, tiled=tiled)
            out.append(pipe.vae.scale_latents(post.mean.float()).float())
    return out


def infotext_fields(r: GenerationRequest, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """ "Reference images" (how many; sdengine's field: A1111 and Forge have none), "Reference image size" (each
    one's (width, height) in ``sizes``, as encoded) and "Reference resize: off" when the auto-resize was off."""
    if not sizes:
        return {}
    out: dict[str, Any] = {
        "Reference images": len(sizes),
        "Reference image size": ", ".join(f"{w}x{h}" for w, h in sizes),
    }
    if not r.reference_auto_resize:
        out["Reference resize"] = "off"
    return out


__all__ = [
    "PREFERRED_KONTEXT_RESOLUTIONS",
    "encode_references",
    "infotext_fields",
    "kontext_size",
    "output_size",
    "preferred_resolution",
    "prepare_references",
    "reference_refusals",
    "reference_sizes",
    "reference_tokens",
    "start_options",
]
