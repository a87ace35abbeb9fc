"""ComfyUI's image-editing conditioning: InstructPixToPixConditioning (instruct-pix2pix models, 8-channel U-Nets;
FLUX.1 Depth / Canny) and InpaintModelConditioning (FLUX.1 Fill; a noise mask on any model).

As ComfyUI's node: the pixels cut (centred) to the VAE's factor and encoded, the latent (the VAE posterior's mode, not
scaled: ComfyUI's ``vae.encode``, which its instruct-pix2pix model concatenates as it is) set on every positive and
negative entry as the image the U-Net's extra channels read (the conditioning's ``concat``), and an all-zero LATENT
of the image's size to sample from. The samplers run it (:func:`sdengine.latent_sampling.sample_latents`): each CFG
half reads its own entry's image, zeros where an entry carries none (ComfyUI's ``IP2P.concat_cond``). See
docs/instruct-pix2pix.md.

On a 16-channel VAE (Flux's) the latent is the raw one VAEEncode gives (the posterior's mode, as ComfyUI's), and a
FLUX.1 Depth / Canny transformer reads it, scaled in, beside the noisy latent (ComfyUI's ``Flux.concat_cond``;
:func:`sdengine.server.comfy.nodes_sd3_flux.flux_concat`). InpaintModelConditioning, as ComfyUI's node: the mask
fitted (bilinear) to the pixels, both cut (centred) to a multiple of 8, the masked image (the pixels where the
rounded mask is 1 set to grey 0.5) encoded as ``concat_latent_image`` and the mask as ``concat_mask`` on every
entry, and the LATENT the whole image's encoding with the mask as its noise mask (``noise_mask`` true: ComfyUI's
KSamplerX0Inpaint keeps the unmasked latent). A FLUX.1 Fill transformer reads the masked image and the mask
folded 8 x 8 per latent pixel (the VAE's factor); other models leave both out, as ComfyUI's do, and inpaint by the
noise mask alone (a 9-channel SD inpainting U-Net is refused when it samples).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.server.comfy.nodes import (
    Input,
    NodeDef,
    NodeError,
    RunContext,
    TinyVaeHandle,
    VaeFileHandle,
    VaeHandle,
    vae_encode,
)
from sdengine.server.comfy.nodes_sd3_flux import raw_latent


def instruct_pix_to_pix_conditioning(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    pixels: torch.Tensor,
) -> tuple[Any, Any, Any]:
    (encoded,) = vae_encode(ctx, pixels, vae)
    posterior = encoded.get("posterior")
    if posterior is None and raw_latent(encoded.get("samples")):  # Flux's VAE: the raw latent (its mode)
        image = encoded["samples"].float()
        out = [[replace(c, cond={**c.cond, "concat": image}) for c in entries] for entries in (positive, negative)]
        return out[0], out[1], {**encoded, "samples": torch.zeros_like(image)}
    if posterior is None:  # (every encoder here gives one; a guard, not a path)
        raise NodeError("InstructPixToPixConditioning: the VAE gave no latent to condition on")
    image = posterior[0].float()
    if encoded.get("posterior_scaled"):  # the tiny VAE's latent is in the diffusion model's units: back to the VAE's
        if not isinstance(vae, VaeHandle):
            raise NodeError("InstructPixToPixConditioning: use the checkpoint's VAE or a VAE file, not taesd")
        image = ctx.pipeline(vae.ref).vae.unscale_latents(image).float()
    out = [[replace(c, cond={**c.cond, "concat": image}) for c in entries] for entries in (positive, negative)]
    latent = {**encoded, "samples": torch.zeros_like(encoded["samples"]), "posterior": None}
    latent.pop("posterior_scaled", None)
    return out[0], out[1], latent


INPAINT_FACTOR = 8  # ComfyUI's InpaintModelConditioning cuts the pixels to a multiple of 8


def inpaint_model_conditioning(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    pixels: torch.Tensor,
    mask: torch.Tensor,
    noise_mask: bool = True,
) -> tuple[Any, Any, Any]:
    """ComfyUI's InpaintModelConditioning (see the module docstring)."""
    if pixels.ndim != 4 or pixels.shape[-1] < 3:
        raise NodeError(f"InpaintModelConditioning: pixels must be an image (B, H, W, C), got {tuple(pixels.shape)}")
    if mask.ndim not in (2, 3, 4):
        raise NodeError(f"InpaintModelConditioning: mask must be (H, W) or (B, H, W), got {tuple(mask.shape)}")
    _, h, w, _ = pixels.shape
    f = INPAINT_FACTOR
    if h < f or w < f:
        raise NodeError(f"InpaintModelConditioning: an image of {w}x{h} is smaller than {f} pixels a side")
    m = F.interpolate(mask.float().reshape(-1, 1, mask.shape[-2], mask.shape[-1]), size=(h, w), mode="bilinear")
    if m.shape[0] not in (1, pixels.shape[0]):
        raise NodeError(
            f"InpaintModelConditioning: a batch of {m.shape[0]} masks for {pixels.shape[0]} images; give one mask "
            "or one per image"
        )
    h8, w8 = h // f * f, w // f * f
    y, x = (h % f) // 2, (w % f) // 2
    cut = pixels[:, y : y + h8, x : x + w8, :3].float()
    m = m[:, :, y : y + h8, x : x + w8]
    keep = (1.0 - m.round())[:, 0, :, :, None]
    masked = (cut - 0.5) * keep + 0.5
    (concat,) = vae_encode(ctx, masked, vae)
    (latent,) = vae_encode(ctx, pixels, vae)
    image = concat["samples"].float()
    values = {"concat_latent_image": image, "concat_mask": m}
    out = [[replace(c, cond={**c.cond, **values}) for c in entries] for entries in (positive, negative)]
    if noise_mask:
        latent = {**latent, "noise_mask": m}
    return out[0], out[1], latent


EDIT_NODES: dict[str, NodeDef] = {
    "InstructPixToPixConditioning": NodeDef(
        "InstructPixToPixConditioning",
        "InstructPixToPixConditioning",
        "conditioning/instructpix2pix",
        (
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("vae", "VAE"),
            Input("pixels", "IMAGE"),
        ),
        ("CONDITIONING", "CONDITIONING", "LATENT"),
        instruct_pix_to_pix_conditioning,
        output_names=("positive", "negative", "latent"),
        description="instruct-pix2pix as ComfyUI's node: the image's VAE latent (unscaled) set on the positive and "
        "the negative as the image an 8-channel U-Net reads beside the noisy latent, and an empty latent of its size. "
        "Plain CFG then guides with the image in both halves (an image guidance of 1); not with area or mask "
        "conditioning or a guider over three conditionings. On FLUX.1 Depth / Canny (a Flux VAE's raw latent): the "
        "control image the transformer reads beside the noisy latent.",
    ),
    "InpaintModelConditioning": NodeDef(
        "InpaintModelConditioning",
        "InpaintModelConditioning",
        "conditioning/inpaint",
        (
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("vae", "VAE"),
            Input("pixels", "IMAGE"),
            Input("mask", "MASK"),
            Input("noise_mask", "BOOLEAN", True),
        ),
        ("CONDITIONING", "CONDITIONING", "LATENT"),
        inpaint_model_conditioning,
        output_names=("positive", "negative", "latent"),
        description="Inpainting as ComfyUI's node: the pixels with the (rounded) mask greyed out encoded and set "
        "with the mask on the positive and the negative, the whole image's latent out (noise_mask: with the mask "
        "as its noise mask, the unmasked latent kept). FLUX.1 Fill reads the masked image and the mask beside the "
        "noisy latent; other models inpaint by the noise mask alone (a 9-channel SD inpainting U-Net: refused).",
    ),
}
