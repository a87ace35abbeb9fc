"""A1111's inpainting mask steps as oracles for the tests, written from its formulas (modules/processing.py's
``create_binary_mask``, ``StableDiffusionProcessingImg2Img.init``, ``apply_overlay``; modules/masking.py's
``fill``) and sd-webui-controlnet's ``prepare_mask`` with PIL, numpy and OpenCV, not from sdengine's code."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps


def create_binary_mask(image: Image.Image, round: bool = True) -> Image.Image:  # noqa: A002 (A1111's name)
    """Only an RGBA mask whose alpha is not all 255 is read by its alpha (thresholded above 128 when rounding);
    every other mask is converted to L and left grey."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda x: 255 if x > 128 else 0) if round else alpha
    return image.convert("L")


def mask_blur(mask: Image.Image, x: float, y: float) -> Image.Image:
    """``mask_blur_x`` across then ``mask_blur_y`` down, each skipped at 0, kernel ``2 * int(2.5 * s + 0.5) + 1``,
    on the 8-bit array (so 8 bits after each)."""
    a = np.array(mask)
    if x > 0:
        k = 2 * int(2.5 * x + 0.5) + 1
        a = cv2.GaussianBlur(a, (k, 1), x)
    if y > 0:
        k = 2 * int(2.5 * y + 0.5) + 1
        a = cv2.GaussianBlur(a, (1, k), y)
    return Image.fromarray(a)


def doubled(mask: Image.Image) -> Image.Image:
    """The whole picture's ``mask_for_overlay``: the blurred, fitted mask times 2, clipped, 8 bits."""
    a = np.clip(np.array(mask).astype(np.float32) * 2, 0, 255).astype(np.uint8)
    return Image.fromarray(a)


def overlay(generated: Image.Image, init: Image.Image, mask_for_overlay: Image.Image) -> Image.Image:
    """``overlay_images`` (the init image premultiplied with alpha = 255 - mask_for_overlay) alpha-composited over
    the generated image (``apply_overlay`` without a crop)."""
    masked = Image.new("RGBa", init.size)
    masked.paste(init.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert("L")))
    out = generated.convert("RGBA")
    out.alpha_composite(masked.convert("RGBA"))
    return out.convert("RGB")


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """masking.fill: the unmasked image (premultiplied, alpha = 255 - mask) blurred ever less and laid on."""
    out = Image.new("RGBA", image.size)
    masked = Image.new("RGBa", image.size)
    masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    masked = masked.convert("RGBa")
    for radius, repeats in ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)):
        blurred = masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            out.alpha_composite(blurred)
    return out.convert("RGB")


def latent_mask(mask: Image.Image, w: int, h: int, round: bool = True) -> np.ndarray:  # noqa: A002
    """``latmask``: the mask made RGB, resized to the latent's size by PIL's default filter, first channel / 255,
    ``np.around`` when rounding."""
    small = np.array(mask.convert("RGB").resize((w, h)), dtype=np.float32)[..., 0] / 255
    return np.around(small) if round else small


def prepare_mask(mask: Image.Image, invert: bool, x: float, y: float) -> Image.Image:
    """sd-webui-controlnet's ``prepare_mask`` of A1111's ``image_mask`` (the mask as sent): L, inverted with
    ``inpainting_mask_invert``, then A1111's blurs."""
    m = mask.convert("L")
    if invert:
        m = ImageOps.invert(m)
    return mask_blur(m, x, y)
