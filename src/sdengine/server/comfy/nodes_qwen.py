"""Qwen-Image on sdengine's ComfyUI route: what ComfyUI's own Qwen-Image graph (its ``qwen_image`` template) reads
and does, on sdengine's networks.

The graph: UNETLoader on the transformer file (ComfyUI's ``diffusion_models/qwen_image_*.safetensors``: diffusers'
``QwenImageTransformer2DModel`` names behind ``model.diffusion_model.`` or bare), CLIPLoader type ``qwen_image`` on
the Qwen2.5-VL 7B file (``text_encoders/qwen_2.5_vl_7b*.safetensors``; Qwen2's tokenizer folder beside it, as the
native routes find it: :func:`sdengine.pipeline.qwen_image_loading.tokenizer_beside`), VAELoader on
``qwen_image_vae.safetensors``, ModelSamplingAuraFlow (shift 3.1 in the template), EmptySD3LatentImage, CLIPTextEncode,
KSampler (euler / simple, cfg 2.5), VAEDecode; VAEEncode with denoise below 1 for img2img, SetLatentNoiseMask for
inpainting. The sampling itself is :func:`sdengine.server.comfy.nodes_sd3_flux.sample_flow`'s; this module holds
the Qwen-Image facts it reads, each ComfyUI's (read from its ``comfy/text_encoders/qwen_image.py``,
``comfy/ldm/qwen_image/model.py``, ``comfy/model_base.py``, ``comfy/supported_models.py`` and
``comfy/latent_formats.py``):

* **Text** (:class:`QwenComfyText`): the prompt in Qwen-Image's chat template (a text that starts with
  ``<|im_start|>`` or ``<|start_header_id|>`` is taken as it is, its own template), tokenized whole (ComfyUI's Qwen
  tokenizer reads no ``(word:1.2)`` weights: ``disable_weights``; its escape drops the backslash of ``\\(``,
  :func:`comfy_text`; an ``embedding:NAME`` after a space is refused), no padding, the language model's last hidden
  state (after the final norm) over every token; then the tokens up to the second ``<|im_start|>`` dropped, and the
  ``user`` and newline tokens after it when they follow (ComfyUI's ``template_end``; it compares Qwen2's ids 151644
  / 872 / 198, read here from the tokenizer's own vocabulary). On Qwen2's vocabulary that drops the same 34 tokens
  diffusers drops (its fixed ``prompt_template_encode_start_idx``), so the states are the pipeline's; the prompt is
  not cut at 512 states as diffusers' is.
* **Guidance**: ComfyUI's plain CFG ``u + s (c - u)``, not diffusers' norm-preserving true CFG (the pipeline's
  :func:`sdengine.pipeline.qwen_image.norm_preserving_cfg`): at cfg other than 1 the two differ (measured in
  docs/qwen-image.md). The positive and negative run at their own lengths (ComfyUI's ``c_crossattn`` is a
  ``CONDRegular``: texts of different lengths are not batched), here padded to one length with the padding masked
  out of the attention, which gives the same.
* **Schedule**: Qwen-Image's model sampling is ComfyUI's ModelSamplingFlux with shift 1.15 (its
  ``sampling_settings``, model type FLUX: ``mu`` 1.15 on a 10000-entry table) unless a node sets it;
  ModelSamplingAuraFlow sets ComfyUI's ModelSamplingDiscreteFlow with its shift (a 1000-entry table, multiplier 1:
  the timestep the transformer reads is the sigma, as sdengine's transformer reads ``1000 sigma / 1000``).
* **Latents** (ComfyUI's ``Wan21`` latent format): a LATENT holds the VAE's raw latents; the sampler works on
  ``(z - latents_mean) / latents_std`` per channel (Wan 2.1's 16 means and deviations, Qwen-Image's VAE config's
  too), an all-zero latent left as it is (ComfyUI's rule). VAEEncode gives the posterior's mean, as ComfyUI's.
* **Positions**: ComfyUI centres an odd grid of patches one further than diffusers (rows ``r - rows//2``); its
  transformer runs with that (``rope_centre="comfyui"``, :func:`sdengine.models.qwen_image.rope_tables`). A latent
  whose side is odd (an image side not a multiple of 16) is padded to the patches at each call as ComfyUI pads it
  (:class:`sdengine.server.comfy.nodes_sd3_flux.PatchPadded`).

* **Edit** (ComfyUI's ``qwen_image_edit`` template, :func:`text_encode_qwen_image_edit`): TextEncodeQwenImageEdit
  reads the image with the CLIP file's Qwen2.5-VL vision tower (``visual.*``) into the Edit template and sets the
  VAE-encoded image as the conditioning's reference latent; the transformer appends its patches with frame 1
  (ComfyUI's ``reference_latents``; ReferenceLatent sets the same), the text's RoPE start read off the generated
  latent alone (ComfyUI's ``txt_start``). TextEncodeQwenImageEditPlus (Edit-2509): up to three images, each read
  at ~384^2 pixels as ``Picture N`` and its ~1024^2 latent a reference (frames 1, 2, 3; with
  FluxKontextMultiReferenceLatentMethod "offset" / "uxo/uno": ComfyUI's box layout, :func:`reference_layout`).

What is not built is refused in one line: CheckpointLoaderSimple on a Qwen-Image model (a diffusers folder: its
parts are not files UNETLoader / CLIPLoader list), LoraLoader's strength_clip (Qwen-Image LoRAs adapt the
transformer only: LoraLoaderModelOnly and LoraLoader's model part run), FluxGuidance, a Qwen-Image
model with another family's CLIP (or the reverse), a FluxKontextMultiReferenceLatentMethod other than index /
offset / uxo, an Edit image with a CLIP file without the vision tower, CLIPSetLastLayer.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import ClipHandle, Input, ModelHandle, NodeDef, NodeError, RunContext

FAMILY = "qwen_image"
CLIP_TYPE = "qwen_image"
COMFY_SHIFT_MU = 1.15  # ComfyUI's QwenImage sampling_settings shift (ModelSamplingFlux: Flux's mu)
AURA_FLOW_SHIFT = 1.73  # ModelSamplingAuraFlow's default shift (the Qwen-Image template sets 3.1)
IM_START = "<|im_start|>"
OWN_TEMPLATE = (IM_START, "<|start_header_id|>")  # a text starting so is its own template (ComfyUI's rule)
TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
PATCH = 2


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


def template_end(ids: list[int], im_start: int | None, user: int | None, newline: int | None) -> int:
    """How many leading states ComfyUI's Qwen-Image text encoder drops (its ``template_end``): the index of the
    second ``<|im_start|>`` (or the only one; none: -1, the last state alone kept, as ComfyUI's slice), then 3 more
    when ``user`` and a newline follow it and there are states after them."""
    end, seen = -1, 0
    for i, t in enumerate(ids):
        if t == im_start and seen < 2:
            end, seen = i, seen + 1
    if len(ids) > end + 3 and ids[end + 1] == user and ids[end + 2] == newline:
        end += 3
    return end


def comfy_text(text: str, label: str = "Qwen-Image") -> str:
    """The text ComfyUI's tokenizer tokenizes (weights disabled): its escape and unescape of ``\\(`` / ``\\)``
    (the backslash dropped); a textual-inversion name after a space or newline (``embedding:NAME``, where ComfyUI
    splits the text and looks the name up) is refused in one line (``label``: the model family it names)."""
    if re.search(r"[ \n]embedding:", text):
        raise NodeError(
            f"CLIPTextEncode on {label}: 'embedding:' names a textual-inversion embedding, which {label} does not "
            "take here; write the text without it"
        )
    escaped = text.replace("\\)", "\0\1").replace("\\(", "\0\2")
    return escaped.replace("\0\1", ")").replace("\0\2", "(")


class QwenComfyText:
    """ComfyUI's Qwen-Image text encoder over sdengine's Qwen2.5-VL language model and Qwen2 tokenizer (the module
    docstring): ``encode(text)`` -> the kept states (1, L, hidden) in float32."""

    def __init__(self, encoder: Any, tokenizer: Any, name: str) -> None:
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.name = name
        self.dtype = encoder.dtype
        self.width = int(encoder.config.hidden_size)
        self.im_start = tokenizer.token_id(IM_START)
        if self.im_start is None:
            raise NodeError(f"{name}: its tokenizer has no {IM_START} token: not Qwen2's tokenizer")
        self.user = self._single("user")
        self.newline = self._single("\n")
        self.path: Path | None = None  # the CLIP file (its visual.* tensors: TextEncodeQwenImageEdit's image)
        self.vision: Any = None

    def _single(self, text: str) -> int | None:
        ids = self.tokenizer.encode(text)
        return ids[0] if len(ids) == 1 else None

    def ids(self, text: str) -> list[int]:
        """The token ids ComfyUI's tokenizer gives ``text``: in the template unless it starts with ``<|im_start|>`` or
        ``<|start_header_id|>``, as :func:`comfy_text` reads it."""
        full = text if text.startswith(OWN_TEMPLATE) else TEMPLATE.replace("{}", text, 1)
        return list(self.tokenizer.encode(comfy_text(full)))

    def encode(self, text: str) -> torch.Tensor:
        from sdengine.text.encode_cache import cached_call

        ids = self.ids(text)
        end = template_end(ids, self.im_start, self.user, self.newline)

        def run() -> torch.Tensor:
            with torch.inference_mode():
                states = self.encoder(torch.tensor([ids], dtype=torch.long, device=self.encoder.device))
            kept = states[:, end:] if end >= 0 else states[:, -1:]
            if not bool(torch.isfinite(kept).all()):
                raise NodeError(
                    f"{self.name}: the text encoder's states overflowed in {self.dtype} (NaN or infinity); Qwen2.5-VL "
                    "runs in bfloat16 or float32"
                )
            return kept.float()

        out: torch.Tensor = cached_call(self.encoder, ("qwen_image_comfy", tuple(ids), end), run)
        return out


def load_text(path: Path, dev: torch.device, dtype: torch.dtype) -> QwenComfyText:
    """CLIPLoader type qwen_image's encoder: the Qwen2.5-VL file (or folder) and Qwen2's tokenizer beside it."""
    from sdengine.pipeline.qwen_image_loading import tokenizer_beside
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    folder = tokenizer_beside(path)
    if folder is None:
        raise NodeError(
            f"CLIPLoader type qwen_image: no Qwen2 tokenizer beside {path.name} (sdengine ships none): put the "
            "tokenizer folder (Qwen-Image's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer) beside it "
            "as qwen25_tokenizer/"
        )
    tokenizer = load_qwen_tokenizer(folder)
    encoder = load_qwen_text_encoder(path, device=dev, dtype=dtype, family="qwen2.5-vl").eval().requires_grad_(False)
    text = QwenComfyText(encoder, tokenizer, path.name)
    text.path = path
    return text


def is_qwen_text_file(path: Path) -> bool:
    """A Qwen2.5-VL language model's weights (``layers.0.self_attn.q_proj`` and ``embed_tokens``), by its header."""
    from sdengine.weights.io import read_safetensors_header

    if path.is_dir():
        return False
    names, _, _ = read_safetensors_header(path)
    return any(n.endswith("layers.0.self_attn.q_proj.weight") for n in names) and any(
        n.endswith("embed_tokens.weight") for n in names
    )


def text_entry(clip: ClipHandle, text_side: QwenComfyText, text: str) -> Any:
    """CLIPTextEncode with CLIPLoader type qwen_image's CLIP: one entry, the kept states alone (no mask)."""
    from sdengine.latent_sampling import TextCondition

    check_clip(clip)
    return TextCondition({"crossattn": text_side.encode(str(text))})


def check_clip(clip: ClipHandle) -> None:
    """What a Qwen-Image CLIP does not take: CLIPSetLastLayer, LoraLoader's strength_clip (one line each)."""
    if clip.layer is not None:
        raise NodeError("CLIPSetLastLayer does not apply to Qwen-Image (it reads the language model's last state)")
    if clip.loras:  # diffusers' loader and sdengine's adapt the transformer only
        raise NodeError(
            "LoraLoader's strength_clip on Qwen-Image: its LoRAs adapt the transformer only; use "
            "LoraLoaderModelOnly (or strength_clip 0)"
        )


EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new image "
    "that meets the user's requirements while maintaining consistency with the original input where appropriate."
    "<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
IMAGE_PAD = "<|image_pad|>"
EDIT_AREA = 1024 * 1024  # TextEncodeQwenImageEdit's pixel count for the image (the vision tower's and the VAE's)
PLUS_VISION_AREA = 384 * 384  # TextEncodeQwenImageEditPlus's for the vision tower (its VAE's: EDIT_AREA)
EDIT_PLUS_TEMPLATE = EDIT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>{}", "{}", 1)
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
VISION_MIN_PIXELS, VISION_MAX_PIXELS = 3136, 12845056  # ComfyUI's process_qwen2vl_images bounds


def edit_size(width: int, height: int, area: int = EDIT_AREA) -> tuple[int, int]:
    """(width, height) TextEncodeQwenImageEdit scales an image to: ``area`` pixels at its aspect ratio, each side
    Python's ``round`` of the scaled side (no multiple of 8 or 32, unlike diffusers' ``calculate_dimensions``)."""
    s = math.sqrt(area / (width * height))
    return round(width * s), round(height * s)


def comfy_vision_pixels(image: torch.Tensor, config: Any) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(pixel rows, grid_thw) of one (H, W, 3) image in 0..1 as ComfyUI's ``process_qwen2vl_images`` makes them:
    the smart-resize size (multiples of 28 within 3136 .. 12845056 pixels), a bilinear resize of the float image
    (``align_corners`` false, no antialiasing; transformers' processor uses Pillow's bicubic on 8-bit pixels), OpenAI
    CLIP's mean and std, the 14 x 14 patches in merge-block order, each repeated over the 2 frames."""
    from sdengine.models.qwen_vision import patch_rows, smart_resize

    height, width = int(image.shape[0]), int(image.shape[1])
    factor = config.patch_size * config.spatial_merge_size
    h, w = smart_resize(height, width, factor, VISION_MIN_PIXELS, VISION_MAX_PIXELS)
    x = image.permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)[0]
    return patch_rows(x, config)


def _vision(text_side: QwenComfyText) -> Any:
    """The CLIP file's Qwen2.5-VL vision tower (its ``visual.*`` tensors), loaded once beside the language model."""
    if text_side.vision is None:
        from sdengine.weights.io import WeightsError
        from sdengine.weights.qwen_vision_file import load_qwen_vision_tower

        if text_side.path is None:
            raise NodeError("TextEncodeQwenImageEdit: this CLIP has no file to read Qwen2.5-VL's vision tower from")
        try:
            text_side.vision = load_qwen_vision_tower(
                text_side.path, device=text_side.encoder.device, dtype=text_side.dtype
            )
        except WeightsError as e:
            raise NodeError(
                f"TextEncodeQwenImageEdit with an image: {str(e).splitlines()[0]} (ComfyUI's qwen_2.5_vl_7b file "
                "holds it as visual.*)"
            ) from None
        out = text_side.vision.config.out_hidden_size
        if out != text_side.width:
            raise NodeError(
                f"TextEncodeQwenImageEdit: {text_side.name}'s vision tower gives {out}"
                f"-wide tokens, its language model is {text_side.width} wide: not one Qwen2.5-VL"
            )
    return text_side.vision


def encode_with_image(text_side: QwenComfyText, prompt: str, image: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Qwen-Image text encoding of ``prompt`` with one (H, W, 3) image in the Edit template (a text that
    starts with its own template is taken as it is): :func:`encode_with_images`."""
    full = prompt if prompt.startswith(OWN_TEMPLATE) else EDIT_TEMPLATE.replace("{}", prompt, 1)
    return encode_with_images(text_side, full, [image], "TextEncodeQwenImageEdit")


def encode_with_images(text_side: QwenComfyText, full: str, images: list[torch.Tensor], node: str) -> torch.Tensor:
    """The text ``full`` (already in its template) with (H, W, 3) ``images``: the first ``len(images)``
    ``<|image_pad|>`` tokens replaced by each image's merged vision tokens in order, the language model run with the
    multimodal RoPE (each image its own positions, the text after it continuing from its end), the states from
    ComfyUI's ``template_end`` (counted on the tokens before the images are expanded) on -> (1, L, hidden) float32.
    No pad in the text: the text alone."""
    from sdengine.models.qwen_text import mrope_positions

    pad = text_side.tokenizer.token_id(IMAGE_PAD)
    if pad is None:
        raise NodeError(f"{node}: {text_side.name}'s tokenizer has no {IMAGE_PAD} token")
    ids = list(text_side.tokenizer.encode(comfy_text(full)))
    end = template_end(ids, text_side.im_start, text_side.user, text_side.newline)
    # ComfyUI puts image n into the n-th <|image_pad|>; a pad past the images would stay a token, which the
    # encoder's image path would read as an image: refused
    if ids.count(pad) > len(images):
        raise NodeError(f"{node}: the prompt holds <|image_pad|> tokens of its own; remove them")
    images = images[: ids.count(pad)]
    row, grids, rows = list(ids), [], []
    embeds = None
    if images:
        vision = _vision(text_side)
        merge = vision.config.spatial_merge_size
        row = []
        it = iter(images)
        for t in ids:
            if t != pad:
                row.append(t)
                continue
            pixels, grid = comfy_vision_pixels(next(it), vision.config)
            rows.append(pixels)
            grids.append(grid)
            row += [pad] * (grid[0] * (grid[1] // merge) * (grid[2] // merge))
        with torch.inference_mode():
            embeds = vision(torch.cat(rows).to(device=vision.device, dtype=vision.dtype), grids)
    with torch.inference_mode():
        dev = text_side.encoder.device
        tokens = torch.tensor([row], dtype=torch.long, device=dev)
        if embeds is None:
            states = text_side.encoder(tokens)
        else:
            positions = mrope_positions(row, pad, grids, vision.config.spatial_merge_size)[:, None]
            states = text_side.encoder(tokens, image_embeds=embeds, image_token_id=pad, position_ids=positions.to(dev))
    kept = states[:, end:] if end >= 0 else states[:, -1:]
    if not bool(torch.isfinite(kept).all()):
        raise NodeError(
            f"{text_side.name}: the text encoder's states overflowed in {text_side.dtype} (NaN or infinity); "
            "Qwen2.5-VL runs in bfloat16 or float32"
        )
    return kept.float()


def text_encode_qwen_image_edit(ctx: RunContext, clip: Any, prompt: str, vae: Any = None, image: Any = None) -> Any:
    """ComfyUI's TextEncodeQwenImageEdit (its ``comfy_extras/nodes_qwen.py``): the image scaled to ~1024 x 1024
    pixels (:func:`edit_size`, ComfyUI's "area" resize), read by Qwen2.5-VL's vision tower into the prompt's
    Edit template (:func:`encode_with_image`) and, with ``vae``, VAE-encoded as the conditioning's reference
    latent (the transformer appends its tokens, frame 1). No image: the prompt alone in Qwen-Image's template, as
    CLIPTextEncode."""
    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes_sd3_flux import clip_conditioner

    if clip.clip_type != CLIP_TYPE:
        raise NodeError("TextEncodeQwenImageEdit takes CLIPLoader type qwen_image's CLIP (Qwen2.5-VL)")
    family, text_side = clip_conditioner(ctx, clip)
    if family != FAMILY or not isinstance(text_side, QwenComfyText):
        raise NodeError("TextEncodeQwenImageEdit takes CLIPLoader type qwen_image's CLIP (Qwen2.5-VL)")
    check_clip(clip)
    if image is None:
        return ([text_entry(clip, text_side, str(prompt))],)
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError("TextEncodeQwenImageEdit: image must be an IMAGE (B, H, W, C) with 3 or 4 channels")
    if image.shape[0] != 1:
        raise NodeError(
            f"TextEncodeQwenImageEdit: a batch of {image.shape[0]} images; Qwen-Image Edit here reads one (give one "
            "image)"
        )
    h0, w0 = int(image.shape[1]), int(image.shape[2])
    w, h = edit_size(w0, h0, EDIT_AREA)  # the module's value at call time
    if w < 1 or h < 1:
        raise NodeError(
            f"TextEncodeQwenImageEdit: a {w0}x{h0} image scales to {w}x{h}; its aspect ratio is too extreme"
        )
    x = image[..., :3].float().movedim(-1, 1)
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="area")
    scaled = x.movedim(1, -1)
    try:
        states = encode_with_image(text_side, str(prompt), scaled[0])
    except SdengineError as e:
        raise NodeError(f"TextEncodeQwenImageEdit: {str(e).splitlines()[0]}") from None
    out = TextCondition({"crossattn": states})
    if vae is not None:
        from sdengine.server.comfy.nodes import vae_encode

        (latent,) = vae_encode(ctx, scaled, vae)
        out = replace(out, references=(*out.references, latent["samples"]))
    return ([out],)


def _scaled(image: Any, area: int, step: int, node: str) -> torch.Tensor:
    """(1, h, w, 3) of an IMAGE scaled to ~``area`` pixels, each side rounded to a multiple of ``step`` (ComfyUI's
    "area" resize); a batch of several is one line."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] < 3:
        raise NodeError(f"{node}: image must be an IMAGE (B, H, W, C) with 3 or 4 channels")
    if image.shape[0] != 1:
        raise NodeError(f"{node}: a batch of {image.shape[0]} images; Qwen-Image Edit here reads one (give one image)")
    h0, w0 = int(image.shape[1]), int(image.shape[2])
    s = math.sqrt(area / (w0 * h0))
    w, h = round(w0 * s / step) * step, round(h0 * s / step) * step
    if w < 1 or h < 1:
        raise NodeError(f"{node}: a {w0}x{h0} image scales to {w}x{h}; its aspect ratio is too extreme")
    x = image[..., :3].float().movedim(-1, 1)
    if (h, w) != (h0, w0):
        x = F.interpolate(x, size=(h, w), mode="area")
    return x.movedim(1, -1)


def text_encode_qwen_image_edit_plus(
    ctx: RunContext, clip: Any, prompt: str, vae: Any = None, image1: Any = None, image2: Any = None,
    image3: Any = None,
) -> Any:  # fmt: skip
    """ComfyUI's TextEncodeQwenImageEditPlus (Qwen-Image-Edit-2509): each given image scaled to ~384 x 384 pixels
    for the vision tower and, with ``vae``, to ~1024 x 1024 (sides multiples of 8) for its reference latent (all in
    order: frames 1, 2, 3); ``Picture N: <|vision_start|><|image_pad|><|vision_end|>`` (N the input's slot) before
    the prompt, in the Edit template without its built-in image."""
    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes_sd3_flux import clip_conditioner

    node = "TextEncodeQwenImageEditPlus"
    if clip.clip_type != CLIP_TYPE:
        raise NodeError(f"{node} takes CLIPLoader type qwen_image's CLIP (Qwen2.5-VL)")
    family, text_side = clip_conditioner(ctx, clip)
    if family != FAMILY or not isinstance(text_side, QwenComfyText):
        raise NodeError(f"{node} takes CLIPLoader type qwen_image's CLIP (Qwen2.5-VL)")
    check_clip(clip)
    vl, refs, pictures = [], [], ""
    for i, image in enumerate((image1, image2, image3)):
        if image is None:
            continue
        vl.append(_scaled(image, PLUS_VISION_AREA, 1, node)[0])
        if vae is not None:
            from sdengine.server.comfy.nodes import vae_encode

            (latent,) = vae_encode(ctx, _scaled(image, EDIT_AREA, 8, node), vae)
            refs.append(latent["samples"])
        pictures += PICTURE.format(i + 1)
    text = pictures + str(prompt)
    full = text if text.startswith(OWN_TEMPLATE) else EDIT_PLUS_TEMPLATE.replace("{}", text, 1)
    try:
        states = encode_with_images(text_side, full, vl, node)
    except SdengineError as e:
        raise NodeError(f"{node}: {str(e).splitlines()[0]}") from None
    return ([TextCondition({"crossattn": states}, references=tuple(refs))],)


REFERENCE_METHODS = ("index", "offset", "uxo")  # ComfyUI's FluxKontextMultiReferenceLatentMethod ("uxo/uno": "uxo")


def references_for(references: list[torch.Tensor], method: str = "index") -> list[torch.Tensor]:
    """The reference latents (model-space, (B, 16, h, w)) a Qwen-Image transformer appends in order, odd sides
    padded circularly to the 2 x 2 patches (ComfyUI's ``pad_to_patch_size``); where they go:
    :func:`reference_layout`."""
    if method not in REFERENCE_METHODS:
        raise NodeError(
            f"FluxKontextMultiReferenceLatentMethod {method!r} on a Qwen-Image model is not supported here: use "
            f"one of {', '.join(REFERENCE_METHODS)}"
        )
    out = []
    for ref in references:
        ph, pw = int(ref.shape[-2]) % PATCH, int(ref.shape[-1]) % PATCH
        out.append(F.pad(ref, (0, pw, 0, ph), mode="circular") if ph or pw else ref)
    return out


def reference_layout(shapes: list[tuple[int, int]], method: str = "index") -> tuple[tuple[int, int, int], ...]:
    """Each reference latent's (frame, rows down, columns right) in 2 x 2 patches, from its latent size (h, w)
    unpadded, as ComfyUI's Qwen-Image transformer lays several out (``comfy/ldm/qwen_image/model.py``): "index"
    (Qwen-Image's default) frames 1, 2, 3 ... unshifted; any other method ("offset", "uxo": this model has no
    "uxo" rule of its own) frame 1, each moved past the box of the ones before along its shorter side (right of
    the box where the box would grow taller than wide, else below), shifts in latent pixels turned to patches as
    ``(shift + 1) // 2``."""
    out, box_h, box_w = [], 0, 0
    for k, (h, w) in enumerate(shapes):
        if method == "index":
            out.append((k + 1, 0, 0))
            continue
        dy = dx = 0
        if h + box_h > w + box_w:
            dx = box_w
        else:
            dy = box_h
        box_h, box_w = max(box_h, h + dy), max(box_w, w + dx)
        out.append((1, (dy + PATCH // 2) // PATCH, (dx + PATCH // 2) // PATCH))
    return tuple(out)


# ---------------------------------------------------------------------------------------------------
# The model: schedule, latents, conditioning
# ---------------------------------------------------------------------------------------------------


def model_sampling_aura_flow(ctx: RunContext, model: ModelHandle, shift: float) -> tuple[Any]:
    """ComfyUI's ModelSamplingAuraFlow: ModelSamplingDiscreteFlow with this shift and multiplier 1 (Qwen-Image's
    template: 3.1); on another model a node error when it samples."""
    return (replace(model, flow_sampling=("auraflow", float(shift))),)


def cfg_norm(ctx: RunContext, model: ModelHandle, strength: float) -> tuple[Any]:
    """ComfyUI's CFGNorm (experimental; Qwen-Image-Edit's template puts it before KSampler): after the CFG, the
    guided x0 scaled at each latent pixel to at most the conditional x0's norm over the channels, times
    ``strength`` (:class:`sdengine.latent_sampling._CFGNormed`); flow models only (a U-Net: a node error)."""
    return (replace(model, cfg_norm=float(strength)),)


def schedule(model: ModelHandle) -> Any:
    """The flow schedule ComfyUI samples a Qwen-Image model on: ModelSamplingAuraFlow's shift on the 1000-entry
    table, ModelSamplingFlux's ``mu``, else the model's own (ModelSamplingFlux, shift 1.15)."""
    from sdengine.diffusion.flow import FlowSchedule

    if model.flow_sampling:
        kind, value = model.flow_sampling
        if kind == "auraflow":
            return FlowSchedule.sd3(float(value))
        if kind == "flux":
            return FlowSchedule.flux(mu=float(value))
        raise NodeError(
            "ModelSamplingSD3 is for SD3 models (its timesteps are 1000 x sigma); on Qwen-Image use "
            "ModelSamplingAuraFlow"
        )
    return FlowSchedule.flux(mu=COMFY_SHIFT_MU)


def refuse_aura_flow(family: str, model: ModelHandle) -> None:
    """ModelSamplingAuraFlow (multiplier 1: the timestep is the sigma) on a model that is not Qwen-Image or Z-Image:
    one line."""
    if model.flow_sampling and model.flow_sampling[0] == "auraflow" and family not in (FAMILY, "z_image"):
        label = {"sd3": "an SD3", "flux": "a Flux", "chroma": "a Chroma"}.get(family, f"a {family}")
        node = "ModelSamplingSD3" if family == "sd3" else "ModelSamplingFlux"
        raise NodeError(
            f"ModelSamplingAuraFlow is for Qwen-Image models here (and Z-Image: their timesteps are the sigma); this "
            f"is {label} model: use {node}"
        )


def refuse_checkpoint(name: str) -> None:
    """CheckpointLoaderSimple on a Qwen-Image model (a folder, or a file served with its parts): one line saying
    how ComfyUI's Qwen-Image graph loads it."""
    raise NodeError(
        f"CheckpointLoaderSimple: {name} is a Qwen-Image model; on the ComfyUI route load its parts as ComfyUI's "
        "Qwen-Image template does: UNETLoader (diffusion_models/qwen_image_*.safetensors), CLIPLoader type "
        "qwen_image and VAELoader"
    )


def _stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from sdengine.models.qwen_vae import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD

    if z.ndim != 4 or z.shape[1] != len(QWEN_LATENTS_MEAN):
        raise NodeError(f"a Qwen-Image latent is (B, 16, h, w), got {tuple(z.shape)}")
    mean = torch.tensor(QWEN_LATENTS_MEAN, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
    std = torch.tensor(QWEN_LATENTS_STD, dtype=z.dtype, device=z.device).reshape(1, -1, 1, 1)
    return mean, std


def raw_in(z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Wan21 process_in: raw VAE latents -> the model's, ``(z - mean) / std``; an all-zero latent as it
    is."""
    if not bool(torch.count_nonzero(z)):
        return z
    mean, std = _stats(z)
    return (z - mean) / std


def raw_out(z: torch.Tensor) -> torch.Tensor:
    """ComfyUI's Wan21 process_out: ``z * std + mean``."""
    mean, std = _stats(z)
    return z * std + mean


def fit_conditioning(entries: list[Any], joint: int) -> list[Any]:
    """The entries as a Qwen-Image transformer reads them: text states ``joint`` wide, no pooled vector; FluxGuidance
    (which ComfyUI's Qwen-Image ignores) refused."""
    out = []
    for e in entries:
        cond = dict(e.cond)
        x = cond.get("crossattn")
        if x is None or x.ndim != 3:
            raise NodeError("this conditioning has no token states (crossattn): encode it with the model's CLIP")
        if int(x.shape[-1]) != joint or "vector" in cond:
            raise NodeError(
                f"this conditioning is not this Qwen-Image model's (its states are {int(x.shape[-1])} wide, the "
                f"transformer's {joint}): encode it with CLIPLoader type qwen_image's CLIP"
            )
        from sdengine.server.comfy.nodes_sd3_flux import guidance_disabled

        g = cond.pop("guidance", None)
        if g is not None and not guidance_disabled(g):  # FluxDisableGuidance's mark: nothing to leave out
            raise NodeError("FluxGuidance does not apply to Qwen-Image (it has no distilled guidance): leave it out")
        out.append(replace(e, cond=cond))
    return out


def own_lengths(positive: list[Any], negative: list[Any]) -> tuple[list[Any], list[Any]]:
    """The positive and negative texts at their own lengths, as ComfyUI runs texts of different lengths (apart):
    both padded with zeros to the longer and the padding masked out of the attention (``text_mask``)."""
    if len(positive) != 1 or len(negative) != 1:
        return positive, negative
    a, b = positive[0].cond["crossattn"], negative[0].cond["crossattn"]
    if a.shape[1] == b.shape[1]:
        return positive, negative
    n = max(int(a.shape[1]), int(b.shape[1]))
    out = []
    for e, x in ((positive[0], a), (negative[0], b)):
        mask = (torch.arange(n) < int(x.shape[1]))[None].expand(x.shape[0], -1)
        out.append([replace(e, cond={**e.cond, "crossattn": F.pad(x, (0, 0, 0, n - int(x.shape[1]))),
                                     "text_mask": mask})])  # fmt: skip
    return out[0], out[1]


class ComfyQwenAdapter:
    """The conditioning dict -> sdengine's Qwen-Image transformer, positions centred as ComfyUI's (odd grids);
    runs in ``dtype``, the velocity back in float32."""

    takes_step = takes_row_kinds = False

    def __init__(self, net: Any, dtype: torch.dtype) -> None:
        self.net = net
        self.dtype = dtype
        self.references: list[torch.Tensor] = []  # the sampler's model-space reference latents (ReferenceLatent)
        self.reference_method = "index"  # ComfyUI's Qwen default; one reference is laid out the same by every method

    def __call__(
        self, x: torch.Tensor, t: torch.Tensor, *, crossattn: torch.Tensor, text_mask: Any = None, **other: Any
    ) -> torch.Tensor:
        extra = sorted(k for k, v in other.items() if v is not None)
        if extra:
            raise NodeError(f"the Qwen-Image transformer takes no {', '.join(extra)}")
        mask = None if text_mask is None else text_mask.to(x.device)
        states = crossattn.to(device=x.device, dtype=self.dtype)
        given = list(self.references or [])
        refs = [
            r.to(device=x.device, dtype=self.dtype).expand(x.shape[0], -1, -1, -1)
            for r in references_for(given, self.reference_method)
        ]
        layout = reference_layout([(int(r.shape[-2]), int(r.shape[-1])) for r in given], self.reference_method)
        return self.net(
            x.to(self.dtype), t, states, mask, rope_centre="comfyui", reference=refs or None,
            reference_layout=layout or None,
        ).float()  # fmt: skip


QWEN_NODES: dict[str, NodeDef] = {
    "CFGNorm": NodeDef(
        "CFGNorm",
        "CFGNorm",
        "advanced/guidance",
        (Input("model", "MODEL"), Input("strength", "FLOAT", 1.0, 0.0, 100.0, 0.01)),
        ("MODEL",),
        cfg_norm,
        description="After the CFG, the guided prediction scaled at each latent pixel to at most the conditional "
        "one's norm over the channels, times strength (ComfyUI's experimental node, in its Qwen-Image-Edit "
        "template); flow models only.",
    ),
    "ModelSamplingAuraFlow": NodeDef(
        "ModelSamplingAuraFlow",
        "ModelSamplingAuraFlow",
        "advanced/model",
        (Input("model", "MODEL"), Input("shift", "FLOAT", AURA_FLOW_SHIFT, 0.0, 100.0, 0.01)),
        ("MODEL",),
        model_sampling_aura_flow,
        description="ComfyUI's discrete flow schedule with this shift (a table of 1000, multiplier 1) for a "
        "Qwen-Image model (its template: 3.1) or a Z-Image one (its template: 3); on another model a node error when "
        "it samples.",
    ),
    "TextEncodeQwenImageEdit": NodeDef(
        "TextEncodeQwenImageEdit",
        "TextEncodeQwenImageEdit",
        "advanced/conditioning",
        (
            Input("clip", "CLIP"),
            Input("prompt", "STRING", "", multiline=True),
            Input("vae", "VAE", optional=True),
            Input("image", "IMAGE", optional=True),
        ),
        ("CONDITIONING",),
        text_encode_qwen_image_edit,
        description="Qwen-Image Edit's prompt with its input image: the image scaled to ~1024^2 pixels ('area'), "
        "read by Qwen2.5-VL's vision tower (the CLIP file's visual.* tensors) into the Edit template and, with a VAE, "
        "VAE-encoded as the reference latent the transformer reads beside the generated one (ComfyUI's rules).",
    ),
    "TextEncodeQwenImageEditPlus": NodeDef(
        "TextEncodeQwenImageEditPlus",
        "TextEncodeQwenImageEditPlus",
        "advanced/conditioning",
        (
            Input("clip", "CLIP"),
            Input("prompt", "STRING", "", multiline=True),
            Input("vae", "VAE", optional=True),
            Input("image1", "IMAGE", optional=True),
            Input("image2", "IMAGE", optional=True),
            Input("image3", "IMAGE", optional=True),
        ),
        ("CONDITIONING",),
        text_encode_qwen_image_edit_plus,
        description="Qwen-Image-Edit 2509's prompt with up to three images: each read by Qwen2.5-VL's vision tower at "
        "~384^2 pixels as 'Picture N' and, with a VAE, VAE-encoded at ~1024^2 as a reference latent (ComfyUI's rules).",
    ),
}


__all__ = [
    "CLIP_TYPE",
    "COMFY_SHIFT_MU",
    "EDIT_AREA",
    "EDIT_TEMPLATE",
    "FAMILY",
    "QWEN_NODES",
    "ComfyQwenAdapter",
    "QwenComfyText",
    "cfg_norm",
    "comfy_text",
    "comfy_vision_pixels",
    "edit_size",
    "encode_with_image",
    "encode_with_images",
    "fit_conditioning",
    "is_qwen_text_file",
    "load_text",
    "model_sampling_aura_flow",
    "own_lengths",
    "raw_in",
    "raw_out",
    "refuse_aura_flow",
    "REFERENCE_METHODS",
    "reference_layout",
    "references_for",
    "refuse_checkpoint",
    "schedule",
    "template_end",
    "check_clip",
    "text_encode_qwen_image_edit",
    "text_encode_qwen_image_edit_plus",
    "text_entry",
]
