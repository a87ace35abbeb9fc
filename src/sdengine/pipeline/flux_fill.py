"""FLUX.1 Fill, Depth and Canny: Flux transformers that take an image's latent beside the noisy one.

Black Forest Labs' FLUX.1 Tools (November 2024) are FLUX.1 [dev]-shaped transformers whose image tokens carry
more numbers in than out (``img_in`` is wider than ``final_layer``):

* **Fill** (inpainting and outpainting; diffusers' ``FluxFillPipeline``): 384 = 64 noise + 64 masked-image latent
  + 256 mask numbers per 2x2 patch. The masked image is the init image with the repainted part zeroed (``image *
  (mask < 0.5)``, the mask binarised at 0.5, white = repaint), VAE-encoded (a posterior sample) and scaled; the
  mask is folded 8x8 into 64 channels per latent pixel (channel ``8 dy + dx``), so 256 per patch. No blend: the
  model repaints the white region itself. The draws of a row's generator: init posterior, noise, masked-image
  posterior (:func:`sdengine.pipeline.latents.start_latents` with ``fill``). Strength 1 by default (pure noise;
  below 1 the img2img start ``int(n - n strength)``, as FluxFillPipeline's), the distilled guidance 30
  (FluxFillPipeline's ``guidance_scale`` default and the FLUX.1-Fill-dev card's).
* **Depth / Canny** (structural control; diffusers' ``FluxControlPipeline``): 128 = 64 noise + 64 control latent.
  The request's ``control_image`` (a depth map or canny edges, as given; ``--control-image``) is fitted to the
  output size, VAE-encoded (a posterior sample drawn from the row's generator before anything else) and scaled.
  ``control_preprocessor`` "canny" makes the map from a photo first (OpenCV's Canny edges, thresholds 100 / 200,
  of the image fitted to the output size: :func:`sdengine.control.preprocess.canny`); "none" (the default) takes
  the image as the map; a depth estimator is a network sdengine does not have, refused in one line.
  With an init image it is ``FluxControlImg2ImgPipeline`` (control posterior, init posterior, noise). The
  distilled guidance stays 3.5 (FluxControlPipeline's default: the weights do not say Canny from Depth; the
  model cards use 30 for Canny and 10 for Depth, ``distilled_cfg_scale`` / ``--guidance``).

Which kind a model is comes from its shapes (:func:`flux_kind`); a request that does not fit it is one line
(:func:`request_refusal`) before any model runs.
"""

from __future__ import annotations

from typing import Any

from sdengine.errors import GenerationError

PLAIN, FILL, CONTROL = "plain", "fill", "control"
FILL_GUIDANCE = 30.0  # diffusers' FluxFillPipeline guidance_scale default (the FLUX.1-Fill-dev card's 30)
FILL_STRENGTH = 1.0  # FluxFillPipeline's strength default: the masked region from pure noise
# request.control_preprocessor's values: the image is the map, or its Canny edges (sdengine.control.preprocess)
CONTROL_PREPROCESSORS = ("none", "canny")


def control_preprocessor_refusal(name: Any, image: Any) -> str | None:
    """Why ``control_preprocessor`` ``name`` cannot run (one line), or None. Needs no model: a depth estimator
    names the network it would need (:data:`sdengine.control.preprocess.NEEDS_A_MODEL`)."""
    from sdengine.control.preprocess import NEEDS_A_MODEL
    from sdengine.names import did_you_mean

    valid = ", ".join(CONTROL_PREPROCESSORS)
    if not isinstance(name, str):
        return f"control_preprocessor must be a name ({valid}), got {name!r}"
    if name in NEEDS_A_MODEL:
        return (
            f"control_preprocessor {name!r} needs a network sdengine does not have ({NEEDS_A_MODEL[name]}): make "
            f"the map with another tool and give it as control_image with control_preprocessor 'none' (here: {valid})"
        )
    if name not in CONTROL_PREPROCESSORS:
        return f"unknown control_preprocessor {name!r} (use one of: {valid}){did_you_mean(name, CONTROL_PREPROCESSORS)}"
    if name != "none" and image is None:
        return (
            f"control_preprocessor {name!r} makes FLUX.1 Depth / Canny's map from control_image (--control-image "
            "PHOTO): give one"
        )
    return None


def flux_kind(in_channels: int, out_channels: int, vae_factor: int, where: str) -> str:
    """The kind of a Flux transformer from the numbers per image token it takes and gives: ``"plain"`` ([dev] /
    [schnell]: as many in as out), ``"control"`` (Depth / Canny: twice), ``"fill"`` (twice plus the mask folded
    ``vae_factor`` x ``vae_factor`` per latent pixel, 4 pixels per patch: 384 for Flux.1's 64 and 8x VAE)."""
    if in_channels == out_channels:
        return PLAIN
    if in_channels == 2 * out_channels:
        return CONTROL
    if in_channels == 2 * out_channels + 4 * vae_factor * vae_factor:
        return FILL
    raise GenerationError(
        f"{where}: the Flux transformer takes {in_channels} numbers per image token and gives {out_channels}: "
        f"neither FLUX.1 [dev]/[schnell] ({out_channels}), Depth/Canny ({2 * out_channels}) nor Fill "
        f"({2 * out_channels + 4 * vae_factor * vae_factor} with this {vae_factor}x VAE)"
    )


def request_refusal(kind: str, r: Any) -> str | None:
    """Why a request does not fit a model of ``kind`` (one line), or None. Needs no loaded model."""
    control = getattr(r, "control_image", None)
    if kind == PLAIN:
        if control is not None:
            return (
                "control_image is the control map of FLUX.1 Depth / Canny (a 128-channel transformer); this is a "
                "FLUX.1 [dev]/[schnell] model (a Flux ControlNet takes its map in controlnets / --control)"
            )
        return None
    what = "FLUX.1 Fill" if kind == FILL else "FLUX.1 Depth / Canny"
    if r.controlnets:
        return f"controlnets: Flux ControlNets are not supported on a {what} model"
    if r.enable_hr:
        return f"the hires fix is not supported on a {what} model (its image latent has the first pass's size)"
    if kind == FILL:
        if control is not None:
            return "control_image: FLUX.1 Fill takes a mask and an init image, not a control map"
        if r.init_image is None or r.mask is None:
            return (
                "FLUX.1 Fill repaints the white of a mask over an init image: give init_image and mask (--init-image "
                "IMAGE --mask MASK; outpainting: --outpaint, or a mask white where the image is extended)"
            )
        if r.masked_content != "original":
            return (
                f"masked_content {r.masked_content!r}: FLUX.1 Fill fills the masked region itself (from the masked "
                "image); leave it 'original'"
            )
        if not r.mask_round or r.latent_mask is not None:
            return (
                "mask_round false / latent_mask: FLUX.1 Fill takes the mask made binary in its input and blends no "
                "latent mask; leave them out"
            )
        return None
    if control is None:
        return (
            "FLUX.1 Depth / Canny needs control_image (--control-image IMAGE): the depth map or canny edges the "
            "image follows (or a photo with control_preprocessor canny)"
        )
    if r.mask is not None:
        return "a mask (inpainting) is not supported on a FLUX.1 Depth / Canny model"
    return None


def family_defaults(kind: str) -> dict[str, Any]:
    """What a Fill model's calls take where the caller chose none (FluxFillPipeline's defaults)."""
    if kind == FILL:
        return {"strength": FILL_STRENGTH, "distilled_cfg_scale": FILL_GUIDANCE}
    return {}


def start_options(kind: str, p: Any) -> dict[str, Any]:
    """The :func:`sdengine.pipeline.latents.start_latents` arguments of a call on a model of ``kind``: the Fill
    concat, or the control image fitted to the output size (the init image's resize mode)."""
    if kind == FILL:
        return {"fill": True}
    if kind == CONTROL:
        from sdengine.io.images import load_image
        from sdengine.io.resize import resize_image, resize_mode_name

        image = load_image(p.request.control_image, "control image", mode="RGB", error=GenerationError)
        if image.size != (p.width, p.height):
            image = resize_image(image, p.width, p.height, resize_mode_name(p.request.resize_mode))
        if p.request.control_preprocessor == "canny":  # edges of the fitted photo: one map pixel per output pixel
            from sdengine.control.preprocess import canny

            image = canny(image)
        return {"control": image}
    return {}


__all__ = [
    "CONTROL",
    "CONTROL_PREPROCESSORS",
    "FILL",
    "FILL_GUIDANCE",
    "FILL_STRENGTH",
    "PLAIN",
    "control_preprocessor_refusal",
    "family_defaults",
    "flux_kind",
    "request_refusal",
    "start_options",
]
