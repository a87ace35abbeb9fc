"""ComfyUI's ``CLIPVisionLoader`` and ``CLIPVisionEncode`` (its ``nodes.py`` and ``comfy/clip_vision.py``, read for
facts): a CLIP vision encoder of ``--clip-vision-dir`` (:func:`sdengine.weights.clip_vision_file.load_clip_vision`)
and an IMAGE encoded by it into a ``CLIP_VISION_OUTPUT``, what IP-Adapter and unCLIP nodes take.

The image goes through ComfyUI's own preprocessing (:func:`comfy_clip_preprocess`), not transformers'
``CLIPImageProcessor`` (:func:`sdengine.models.clip_vision.clip_image_tensor`): ComfyUI resizes the float image
with torch's antialiased bicubic interpolation, where the processor resizes the 8-bit image with PIL's bicubic
filter, so the two differ by a few 8-bit levels at some pixels.

A SigLIP file (ComfyUI's ``sigclip_vision_patch14_384.safetensors``, FLUX.1 Redux's image encoder) loads too
(:func:`sdengine.weights.redux_file.load_siglip_vision`): its images are normalised with SigLIP's mean and std
(0.5) at its 384 side, and its output is ComfyUI's for SigLIP: ``last_hidden_state`` and ``image_embeds`` both the
post-LayerNorm'd tokens, ``penultimate_hidden_states`` the second-to-last layer's output.

Where sdengine differs: the encoder runs in float32 on the worker's device (ComfyUI: its text encoder dtype,
float16 on most GPUs); only CLIP and SigLIP vision towers load (ComfyUI's DINO encoders are refused by the
file reader, one line).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.models.clip_vision import CLIP_MEAN, CLIP_STD
from sdengine.server.comfy.nodes import Input, NodeDef, NodeError, RunContext

CROP_CHOICES = ("center", "none")
# CLIP vision encoders loaded by CLIPVisionLoader, kept for the next prompts: ViT-H is ~630M parameters (2.5 GB in
# float32), ViT-bigG ~1.8G, so two at most
CLIP_VISIONS_KEPT = 2
_LOADED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_LOADED_LOCK = threading.Lock()


@dataclass(frozen=True)
class ClipVisionHandle:
    """CLIPVisionLoader's CLIP_VISION: the encoder's file (or folder) of ``--clip-vision-dir``, the name it was
    listed by and the image side it takes."""

    path: str
    name: str
    image_size: int

    def __repr__(self) -> str:  # what an error's current_inputs shows: the listed name, not the server's path
        return f"CLIP_VISION({self.name})"


@dataclass(frozen=True)
class ClipVisionOutput:
    """CLIPVisionEncode's CLIP_VISION_OUTPUT: float32 tensors on the CPU, one row per image, under ComfyUI's names
    (``output["image_embeds"]`` works too, as on ComfyUI's ``Output``)."""

    image_embeds: torch.Tensor  # (B, P): the projected pooled output (the pooled output without a projection)
    last_hidden_state: torch.Tensor  # (B, 1 + N, C): the last layer's output, no final LayerNorm
    penultimate_hidden_states: torch.Tensor  # (B, 1 + N, C): the second-to-last layer's output (IP-Adapter Plus)
    image_sizes: tuple[tuple[int, ...], ...] = ()  # ComfyUI's: each row's preprocessed (C, H, W)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def __repr__(self) -> str:
        return f"CLIP_VISION_OUTPUT(batch {self.image_embeds.shape[0]}, embeds {self.image_embeds.shape[-1]})"


def comfy_clip_preprocess(
    image: torch.Tensor,
    size: int = 224,
    crop: bool = True,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """ComfyUI's ``clip_preprocess`` rule, in the image's dtype and on its device: an IMAGE ``(B, H, W, C)`` with
    values in [0, 1] (a fourth channel, alpha, is dropped) -> ``(B, 3, size, size)`` normalised pixel values.

    Unless the image already is ``size`` x ``size``: with ``crop``, both sides are scaled by ``size / min(H, W)``
    (each rounded with Python's ``round``) and the centre ``size`` x ``size`` is cut (offsets ``(side - size) // 2``);
    without, the image is resized to ``size`` x ``size`` (its aspect not kept). The resize is torch's bicubic
    interpolation with ``antialias=True`` (half-pixel centres). Then the values are rounded to 8-bit levels
    (``round(clip(255 x, 0, 255)) / 255``) and normalised by ``mean`` and ``std`` (OpenAI CLIP's unless given;
    SigLIP's are 0.5)."""
    if image.ndim != 4 or image.shape[-1] not in (3, 4):
        raise NodeError(f"image must be an IMAGE of shape (B, H, W, 3 or 4), got {tuple(image.shape)}")
    if not image.is_floating_point():
        raise NodeError(f"image must hold floating-point values in [0, 1], got {image.dtype}")
    x = image[..., :3].movedim(-1, 1)
    h, w = int(x.shape[2]), int(x.shape[3])
    if (h, w) != (size, size):
        if crop:
            scale = size / min(h, w)
            target = (round(scale * h), round(scale * w))
        else:
            target = (size, size)
        x = F.interpolate(x, size=target, mode="bicubic", antialias=True, align_corners=False)
        top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
        x = x[:, :, top : top + size, left : left + size]
    x = torch.clip(255.0 * x, 0, 255).round() / 255.0
    m = torch.tensor(mean, device=x.device, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, device=x.device, dtype=x.dtype).view(3, 1, 1)
    return (x - m) / s


def _clip_vision_names(env: Any) -> list[str]:
    """The encoders of ``--clip-vision-dir`` by their path in it (ComfyUI lists its ``models/clip_vision`` so)."""
    return [e.name for e in env.catalog.clip_visions()]


def clip_vision_model(ctx: RunContext, path: str, name: str) -> Any:
    """The encoder of ``path`` (CLIP, or SigLIP) in float32 on the worker's device, loaded once per file state
    (path, size, modification time) and device; a file that is neither is a one-line NodeError."""
    from sdengine.errors import SdengineError
    from sdengine.io.paths import file_state
    from sdengine.weights.clip_vision_file import load_clip_vision
    from sdengine.weights.redux_file import is_siglip_path, load_siglip_vision

    try:
        key = (path, str(ctx.device), *file_state(path))
    except OSError:
        raise NodeError(f"CLIP vision {name!r}: the file is gone") from None
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    model: Any
    try:
        if is_siglip_path(path):
            model = load_siglip_vision(path, device=ctx.device, dtype=torch.float32)
        else:
            model = load_clip_vision(path, device=ctx.device, dtype=torch.float32)
    except (OSError, SdengineError) as e:
        raise NodeError(
            f"clip vision file {name!r} is invalid and does not contain a valid vision model: {e}"
        ) from None
    with _LOADED_LOCK:
        _LOADED[key] = model
        while len(_LOADED) > CLIP_VISIONS_KEPT:
            _LOADED.popitem(last=False)
    return model


def forget_clip_visions() -> None:
    """Drop the kept encoders (ComfyUI's POST /free with unload_models)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def clip_vision_loader(ctx: RunContext, clip_name: str) -> tuple[Any]:
    """ComfyUI's CLIPVisionLoader: the file is read here (a bad one fails at this node), the encoder kept."""
    from sdengine.server.errors import BadRequest

    try:
        path = ctx.catalog.resolve_clip_vision(clip_name)
    except BadRequest as e:
        raise NodeError(str(e)) from None
    model = clip_vision_model(ctx, str(path), clip_name)
    return (ClipVisionHandle(str(path), clip_name, int(model.config.image_size)),)


def clip_vision_encode(ctx: RunContext, clip_vision: Any, image: torch.Tensor, crop: str = "center") -> tuple[Any]:
    """ComfyUI's CLIPVisionEncode: the images through :func:`comfy_clip_preprocess` at the encoder's image size
    (``crop`` "center": scaled to cover it, centre cut; "none": squashed to it), then the encoder."""
    if not isinstance(clip_vision, ClipVisionHandle):
        raise NodeError("clip_vision must come from CLIPVisionLoader")
    if crop not in CROP_CHOICES:
        raise NodeError(f"crop must be one of {', '.join(CROP_CHOICES)}, got {crop!r}")
    from sdengine.models.siglip_vision import SIGLIP_MEAN, SIGLIP_STD, SiglipVisionModel

    model = clip_vision_model(ctx, clip_vision.path, clip_vision.name)
    siglip = isinstance(model, SiglipVisionModel)
    stats = (SIGLIP_MEAN, SIGLIP_STD) if siglip else (CLIP_MEAN, CLIP_STD)
    pixels = comfy_clip_preprocess(image.to(ctx.device), clip_vision.image_size, crop == "center", *stats).float()
    if siglip:  # ComfyUI's SigLIP: no projection, its "pooled" output the post-LayerNorm'd tokens themselves
        with torch.inference_mode():
            last, penultimate = model.encode(pixels)
        return (
            ClipVisionOutput(
                image_embeds=last.float().cpu(),
                last_hidden_state=last.float().cpu(),
                penultimate_hidden_states=penultimate.float().cpu(),
                image_sizes=tuple(tuple(pixels.shape[1:]) for _ in range(pixels.shape[0])),
            ),
        )
    with torch.inference_mode():
        out = model(pixels)
    return (
        ClipVisionOutput(
            image_embeds=out.image_embeds.float().cpu(),
            last_hidden_state=out.last_hidden_state.float().cpu(),
            penultimate_hidden_states=out.penultimate_hidden_state.float().cpu(),
            image_sizes=tuple(tuple(pixels.shape[1:]) for _ in range(pixels.shape[0])),
        ),
    )


def clip_vision_file_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The executor's cache token of a CLIPVisionLoader: the file's state, so that a file replaced under the same
    name is read again and its encodings made again."""
    from sdengine.io.paths import file_state

    try:
        path = ctx.catalog.resolve_clip_vision(inputs.get("clip_name"))
        size, mtime = file_state(Path(path))
        return f"{size}:{mtime}"
    except Exception:  # noqa: BLE001 - a name that does not resolve fails when the node runs, with its own line
        return ""


CLIP_VISION_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "CLIPVisionLoader",
            "Load CLIP Vision",
            "loaders",
            (Input("clip_name", "COMBO", choices=_clip_vision_names),),
            ("CLIP_VISION",),
            clip_vision_loader,
            description="A CLIP vision encoder (IP-Adapter's image encoder) from --clip-vision-dir: a transformers "
            "CLIPVisionModelWithProjection file (.safetensors, .bin read weights-only) or image_encoder folder; or "
            "SigLIP's (FLUX.1 Redux's sigclip_vision_patch14_384.safetensors).",
            changed=clip_vision_file_token,
        ),
        NodeDef(
            "CLIPVisionEncode",
            "CLIP Vision Encode",
            "conditioning",
            (
                Input("clip_vision", "CLIP_VISION"),
                Input("image", "IMAGE"),
                Input("crop", "COMBO", "center", choices=CROP_CHOICES),
            ),
            ("CLIP_VISION_OUTPUT",),
            clip_vision_encode,
            description="The image through ComfyUI's CLIP preprocessing (antialiased bicubic resize of the float "
            "image; crop 'center' covers and cuts the centre, 'none' squashes) and the encoder, in float32.",
        ),
    )
}
