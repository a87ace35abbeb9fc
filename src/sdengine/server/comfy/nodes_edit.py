"""ComfyUI's image-editing conditioning: InstructPixToPixConditioning (instruct-pix2pix models, 8-channel U-Nets).

As ComfyUI's node: the pixels cut (centred) to the VAE's factor and encoded, the latent (the VAE posterior's mode, not
scaled: ComfyUI's ``vae.encode``, which its instruct-pix2pix model concatenates as it is) set on every positive and
negative entry as the image the U-Net's extra channels read (the conditioning's ``concat``), and an all-zero LATENT
of the image's size to sample from. The samplers run it (:func:`sdengine.latent_sampling.sample_latents`): each CFG
half reads its own entry's image, zeros where an entry carries none (ComfyUI's ``IP2P.concat_cond``). See
docs/instruct-pix2pix.md.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

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


def instruct_pix_to_pix_conditioning(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    vae: VaeHandle | VaeFileHandle | TinyVaeHandle,
    pixels: torch.Tensor,
) -> tuple[Any, Any, Any]:
    (encoded,) = vae_encode(ctx, pixels, vae)
    posterior = encoded.get("posterior")
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
        "conditioning or a guider over three conditionings.",
    ),
}
