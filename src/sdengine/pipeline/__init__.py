"""ONE generation pipeline: text-to-image, img2img and inpainting are an initial latent, a strength and a mask.

``load_pipeline(name_or_path)`` reads a diffusers folder or a single SD 1.x/2.x file (or a built-in name) and
returns a :class:`Pipeline` (or a :class:`PixelPipeline` for a pixel DDPM); calling it with a
:class:`GenerationRequest` (or its fields as keywords) returns a :class:`GenerationResult` (``.images``,
``.arrays``, ``.parameters``, one A1111 infotext per image in ``.infotexts``).

Modules: :mod:`.request` (the request and its checks), :mod:`.core` (the batched pipeline), :mod:`.latents`
(start latents, inpaint blending), :mod:`.unet_adapter` (conditioning dict -> U-Net arguments),
:mod:`.control` (the controlled U-Net), :mod:`.loading`, :mod:`.pixel`, :mod:`.infotext`, :mod:`.result`.
What the pipeline does matches diffusers (tests/test_pipeline*.py); see :mod:`.latents` for the order of
random draws.
"""

from sdengine.devices import resolve_device, resolve_dtype
from sdengine.errors import GenerationError
from sdengine.io.images import ImageInput, load_image
from sdengine.pipeline.control import ControlUnit
from sdengine.pipeline.core import Pipeline
from sdengine.pipeline.infotext import format_infotext
from sdengine.pipeline.latents import InpaintBlend
from sdengine.pipeline.loading import ASSETS, BUILTIN_PIXEL, BUILTIN_SD, MINILM_PIP_PINNED, load_pipeline
from sdengine.pipeline.pixel import PixelPipeline
from sdengine.pipeline.request import GenerationRequest, LoRAInput
from sdengine.pipeline.result import Cancelled, GenerationResult, StepCallback, StepInfo

__all__ = [
    "ASSETS",
    "BUILTIN_PIXEL",
    "BUILTIN_SD",
    "MINILM_PIP_PINNED",
    "Cancelled",
    "ControlUnit",
    "GenerationError",
    "GenerationRequest",
    "GenerationResult",
    "ImageInput",
    "InpaintBlend",
    "LoRAInput",
    "Pipeline",
    "PixelPipeline",
    "StepCallback",
    "StepInfo",
    "format_infotext",
    "load_image",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
]
