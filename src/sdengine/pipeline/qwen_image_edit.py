"""Qwen-Image-Edit behind sdengine's pipeline: Qwen-Image (:mod:`sdengine.pipeline.qwen_image`) editing one input
image, given as ``reference_images=[image]`` (the name FLUX.1 Kontext's references use), as diffusers'
``QwenImageEditPipeline`` runs it:

* the input image's size: ``calculate_dimensions(1024 * 1024, w / h)`` (width ``sqrt(1024^2 w / h)`` and height
  ``width h / w``, each rounded to a multiple of 32; :func:`edit_dimensions`), the image Lanczos-resized to it
  (Pillow's, diffusers' ``VaeImageProcessor.resize``); the output takes that size unless the call gives one;
* the prompt (and the negative prompt) encoded *with the image* (:func:`sdengine.text.qwen_prompt.
  encode_prompt_qwen_edit`: the Qwen2.5-VL vision tower, the Edit chat template, the multimodal RoPE, the first 64
  states dropped; the image's tokens are part of the states), zero-padded to the image's token count +
  ``max_sequence_length`` (512) with their mask so that the prompt and negative rows batch together (the
  transformer attends to the real tokens only);
* the resized image VAE-encoded once per call (the posterior's mean, normalised by ``latents_mean`` /
  ``latents_std``), its 2x2 patches appended after the generated latent's tokens in every step with frame 1 in the
  RoPE (:class:`sdengine.models.qwen_image.QwenImageTransformer`'s ``reference``); only the generated tokens come
  out;
* true CFG with the norm-preserving combination, the schedule's ``mu`` from the generated image's token count, as
  Qwen-Image.

Qwen-Image-Edit-2509 (:class:`QwenImageEditPlusPipeline`, diffusers' ``QwenImageEditPlusPipeline``) takes 1 to
:data:`PLUS_MAX_IMAGES` input images, each fitted twice (~384^2 for the vision tower, ~1024^2 for the VAE), the
prompt after "Picture 1: <image>Picture 2: <image>..." and every image's latent appended with its own grid; the
output takes the last image's size. Qwen-Image-Edit-2511 is the same pipeline on a transformer with ``zero_cond_t``
(:mod:`sdengine.models.qwen_image`: the input images' tokens modulated at t = 0).

Refused in one line before any model runs: no reference image or more than one (2509: more than 3),
``reference_auto_resize`` false (FLUX.1 Kontext's option), an init image or mask (diffusers' Edit pipelines have
neither), the hires fix, and what Qwen-Image refuses. LoRAs apply to the transformer as on Qwen-Image (``loras=``,
``<lora:...>`` tags, taken out of the prompts before they are encoded).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.io.images import load_image
from sdengine.pipeline.core import Prepared
from sdengine.pipeline.qwen_image import MASK_KEY, QwenAdapter, QwenImagePipeline, qwen_refusals
from sdengine.pipeline.request import GenerationRequest
from sdengine.text.conditioners import Conditioning

EDIT_AREA = 1024 * 1024  # diffusers' calculate_dimensions(1024 * 1024, ratio)
CONDITION_AREA = 384 * 384  # QwenImageEditPlusPipeline's CONDITION_IMAGE_SIZE: what Qwen2.5-VL reads (2509)
PLUS_MAX_IMAGES = 3  # Qwen-Image-Edit-2509's model card: 1 to 3 input images (diffusers sets no limit)
# (texts, images) -> (states (B, L, D), mask (B, L)): the Edit prompt encoding with the input images
EditEncode = Callable[[list[str], list[Image.Image]], tuple[Tensor, Tensor]]
REFERENCE_REASON = "reference_images: reference images are FLUX.1 Kontext's; Qwen-Image takes none"


def edit_dimensions(width: int, height: int, area: int = EDIT_AREA) -> tuple[int, int]:
    """(width, height) of ``area`` pixels at the input's aspect ratio, multiples of 32 (diffusers'
    ``calculate_dimensions``)."""
    ratio = width / height
    w = math.sqrt(area * ratio)
    h = w / ratio
    return round(w / 32) * 32, round(h / 32) * 32


def edit_refusals(r: GenerationRequest, plus: bool = False) -> list[str]:
    """What a Qwen-Image-Edit call cannot run, one line each (Qwen-Image's, less its refusal of references);
    ``plus``: Qwen-Image-Edit-2509's (1 to :data:`PLUS_MAX_IMAGES` input images)."""
    kontext = "reference_images (FLUX.1 Kontext) and Qwen-Image ControlNets"  # Flux's words; Edit's own below
    reasons = [why for why in qwen_refusals(r) if why != REFERENCE_REASON and not why.startswith(kontext)]
    refs = r.reference_list()
    kind = "Qwen-Image-Edit-2509" if plus else "Qwen-Image-Edit"
    if r.init_image is not None or r.mask is not None:
        reasons.append(
            f"init_image / mask: {kind} takes its input images as reference_images (no img2img or inpainting)"
        )
    if plus and not 1 <= len(refs) <= PLUS_MAX_IMAGES:
        reasons.append(
            f"{kind} edits 1 to {PLUS_MAX_IMAGES} input images: give them as reference_images=[image, ...] "
            f"(got {len(refs)} images)"
        )
    elif not plus and len(refs) != 1:
        reasons.append(
            f"Qwen-Image-Edit edits one input image: give it as reference_images=[image] (got {len(refs)} images)"
        )
    if r.reference_auto_resize is not True:
        reasons.append(f"reference_auto_resize is FLUX.1 Kontext's; {kind} always fits its images to ~1024^2")
    if r.enable_hr:
        reasons.append(f"the hires fix is not supported for {kind}")
    if r.controlnets:
        reasons.append(f"ControlNets are not supported for {kind} (Qwen-Image's run on Qwen-Image models)")
    return list(dict.fromkeys(reasons))


class QwenEditAdapter(QwenAdapter):
    """:class:`QwenAdapter` with the call's reference latents (each (1, C, h, w)) given to every row."""

    def __init__(self, net: Any, dtype: torch.dtype, reference: list[Tensor]) -> None:
        super().__init__(net, dtype)
        self.reference = reference

    def __call__(
        self, x: Tensor, t: Tensor, *, crossattn: Tensor, text_mask: Tensor | None = None, **other: Any
    ) -> Tensor:
        extra = sorted(k for k, v in other.items() if v is not None)
        if extra:
            raise GenerationError(f"the Qwen-Image transformer takes no {', '.join(extra)}")
        mask = None if text_mask is None else text_mask.to(x.device)
        ref = [r.to(device=x.device, dtype=self.dtype).expand(x.shape[0], -1, -1, -1) for r in self.reference]
        text = crossattn.to(device=x.device, dtype=self.dtype)
        return self.net(x.to(self.dtype), t, text, mask, reference=ref).float()


class QwenImageEditPipeline(QwenImagePipeline):
    """Qwen-Image-Edit. Build it with :func:`sdengine.pipeline.load_pipeline` on a diffusers
    ``QwenImageEditPipeline`` folder (:mod:`sdengine.pipeline.qwen_image_loading`)."""

    edit_area = EDIT_AREA  # the input image's pixel count after fitting (diffusers' 1024^2; tests make it smaller)
    plus = False  # Qwen-Image-Edit-2509 (QwenImageEditPlusPipeline): QwenImageEditPlusPipeline below
    kind = "Qwen-Image-Edit"

    def __init__(
        self, *, edit_encode: EditEncode, vision_grid: Callable[[int, int], tuple[int, int]], **kwargs: Any
    ) -> None:
        """``edit_encode``: (texts, image) -> (states, mask) (:func:`encode_prompt_qwen_edit` over the loaded
        parts); ``vision_grid``: an image's (width, height) -> the vision tower's merged token grid (rows, columns),
        which sets how wide the texts are padded."""

        def text_only(texts: list[str]) -> tuple[Tensor, Tensor]:
            raise GenerationError("Qwen-Image-Edit encodes its prompts with the input image (reference_images)")

        super().__init__(text_encode=text_only, **kwargs)
        self.edit_encode = edit_encode
        self.vision_grid = vision_grid
        self.vision: Any = None  # the vision tower (the loader sets it)
        self._inner = False  # prepare() runs Qwen-Image's on the request without its image
        self._call_images: list[Image.Image] | None = None  # what the vision tower reads
        self._call_reference: list[Tensor] | None = None

    @property
    def variant(self) -> str:
        return "qwen_image_edit"

    def check_request(self, r: GenerationRequest) -> None:
        """Qwen-Image-Edit's refusals (:func:`edit_refusals`); inside :meth:`prepare`, on the request with its input
        image taken out, Qwen-Image's."""
        reasons = qwen_refusals(r) if self._inner else edit_refusals(r, self.plus)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a {self.kind} model")

    def _fit(self, image: Image.Image, i: int, area: int) -> Image.Image:
        """``image`` Lanczos-resized to ``area`` pixels at its aspect ratio (multiples of 32)."""
        w, h = edit_dimensions(image.width, image.height, area)
        if w < 32 or h < 32:
            raise GenerationError(
                f"reference image {i} ({image.width}x{image.height}): its aspect ratio is too extreme for {self.kind} "
                f"(fitted to {w}x{h})"
            )
        return image if image.size == (w, h) else image.resize((w, h), resample=Image.Resampling.LANCZOS)

    def _read(self, image: Image.Image, i: int) -> Image.Image:
        """What the vision tower reads of input image ``i``: Edit's the VAE's fitted image (2509 fits its own)."""
        return self._fit(image, i, self.edit_area)

    def prepare(self, request: GenerationRequest) -> Prepared:
        reasons = edit_refusals(request, self.plus)
        if reasons:
            raise GenerationError(f"{reasons[0]}; {self.name} is a {self.kind} model")
        request.validate_references()
        images = [
            load_image(ref, f"reference image {i}", mode="RGB", error=GenerationError)
            for i, ref in enumerate(request.reference_list())
        ]
        pairs = [(self._fit(image, i, self.edit_area), self._read(image, i)) for i, image in enumerate(images)]
        w, h = pairs[-1][0].size  # the output: the last image's fitted size (diffusers' image[-1])
        width = request.width if request.width is not None else w
        height = request.height if request.height is not None else h
        m = self.size_multiple
        if request.width is None:
            width = width // m * m
        if request.height is None:
            height = height // m * m
        self._inner = True
        try:
            p = super().prepare(request.replace(reference_images=None, width=width, height=height))
        finally:
            self._inner = False
        p.references = pairs  # (the VAE's image, the vision tower's) per input image
        return p

    def sample_latents(self, p: Prepared, init_latent: Tensor | None = None) -> Tensor:
        from sdengine.pipeline.flux_kontext import encode_references

        if not p.references:
            raise GenerationError(f"{self.name}: {self.kind} needs its input image (reference_images=[image])")
        self._call_images = [read for _, read in p.references]
        self._call_reference = encode_references(self, [fitted for fitted, _ in p.references], p.tiled)
        try:
            return super().sample_latents(p, init_latent)
        finally:
            self._call_images = None
            self._call_reference = None

    def network_adapter(self, net: Any) -> QwenAdapter:  # type: ignore[override]
        if self._call_reference is None:
            raise GenerationError(f"{self.name}: {self.kind} runs with its input image (reference_images=[image])")
        return QwenEditAdapter(net, self.dtype, self._call_reference)

    def graphed(self, name: str) -> Any:
        return None

    def conditioning_pair(
        self, prompt: str, negative: str, p: Prepared, note: Any
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) of the prompt and the negative prompt, each with the input image; at ``cfg_scale`` 1 the
        negative is not encoded."""
        if self._call_images is None:
            raise GenerationError(f"{self.name}: {self.kind} encodes its prompts with the input image")
        from sdengine.prompts import extract_lora_tags

        def plain(text: str) -> str:  # <lora:...> tags out (the core applies them), as QwenConditioner.text does
            rest, tags = extract_lora_tags(text)
            return rest.strip() if tags else text

        one = float(p.request.cfg_scale) == 1.0
        texts = [plain(prompt)] if one else [plain(prompt), plain(negative)]
        states, mask = self.edit_encode(texts, self._call_images)
        if states.ndim != 3 or states.shape[2] != self.conditioner.joint_attention_dim:  # type: ignore[attr-defined]
            raise GenerationError(
                f"{self.name}: the text encoder's states are {tuple(states.shape)}, the transformer takes "
                f"{self.conditioner.joint_attention_dim} wide ones: not this model's text encoder"  # type: ignore[attr-defined]
            )
        width = self._text_width(self._call_images)
        rows: list[Conditioning] = []
        for i, what in enumerate(("prompt", "negative prompt")[: len(texts)]):
            n = int(mask[i].bool().sum())
            if n > width:
                note(f"{self.kind} reads the first {width} states of the {what} with its images; the rest is cut off")
                n = width
            out = states.new_zeros(1, width, states.shape[2])
            out[0, :n] = states[i, :n]
            keep = torch.zeros(1, width, dtype=torch.bool, device=states.device)
            keep[0, :n] = True
            rows.append({"crossattn": out.to(self.dtype), MASK_KEY: keep})
        return (rows[0], rows[0]) if one else (rows[0], rows[1])

    def _text_width(self, images: list[Image.Image]) -> int:
        """The images' merged vision tokens + ``max_sequence_length`` (+ 16 per image for 2509's "Picture N: "):
        the fixed width every text of the call is padded to."""
        grids = [self.vision_grid(image.width, image.height) for image in images]
        extra = 16 * len(images) if self.plus else 0
        return sum(r * c for r, c in grids) + extra + int(self.conditioner.max_sequence_length)  # type: ignore[attr-defined]

    def network_activation_bytes(self, rows: int, h: int, w: int, bytes_per: int) -> int:
        refs = PLUS_MAX_IMAGES if self.plus else 1  # the references' tokens too (about the image's each)
        return (1 + refs) * super().network_activation_bytes(rows, h, w, bytes_per)

    def infotext_fields(self, request: GenerationRequest) -> dict[str, Any]:
        return {}


class QwenImageEditPlusPipeline(QwenImageEditPipeline):
    """Qwen-Image-Edit-2509 (diffusers' ``QwenImageEditPlusPipeline``): 1 to 3 input images
    (``reference_images=[image, ...]``), each fitted twice: to ~384^2 pixels (Lanczos, multiples of 32) for the
    vision tower and to ~1024^2 for the VAE; the prompt after "Picture 1: <image> Picture 2: <image> ..." in the
    Edit template; every image's latent appended after the generated tokens with its own grid (image n's RoPE frame
    n); the output takes the last image's ~1024^2 size unless the call gives one."""

    plus = True
    kind = "Qwen-Image-Edit-2509"
    condition_area = CONDITION_AREA  # what the vision tower reads (diffusers' 384^2; tests make it smaller)

    @property
    def variant(self) -> str:
        return "qwen_image_edit_plus"

    def _read(self, image: Image.Image, i: int) -> Image.Image:
        return self._fit(image, i, self.condition_area)


def load_qwen_edit_pipeline(
    path: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: Any = None,
    name: str | None = None,
    lora_dir: Any = None,
    plus: bool = False,
) -> QwenImageEditPipeline:
    """A diffusers ``QwenImageEditPipeline`` folder -> :class:`QwenImageEditPipeline` (``plus``: a
    ``QwenImageEditPlusPipeline`` one -> :class:`QwenImageEditPlusPipeline`): ``transformer/``, ``vae/``
    (or ``vae``, another Qwen-Image VAE), ``text_encoder/`` (Qwen2.5-VL's language model *and* its vision tower),
    the tokenizer of ``processor/`` (``tokenizer/`` when ``processor/`` has none) and ``processor/``'s
    ``preprocessor_config.json`` (the vision input's area bounds), ``scheduler/``."""
    from pathlib import Path

    from sdengine.models.qwen_vision import smart_resize
    from sdengine.pipeline.qwen_image_loading import has_tokenizer, load_vae_side
    from sdengine.text.qwen_prompt import encode_prompt_qwen_edit
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.encoder_files import read_json
    from sdengine.weights.io import WeightsError
    from sdengine.weights.qwen_image_file import load_qwen_image_transformer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder
    from sdengine.weights.qwen_vision_file import load_qwen_vision_tower, processor_limits

    folder = Path(path)
    try:
        scheduler = read_json(folder / "scheduler" / "scheduler_config.json", "scheduler config", WeightsError)
        te_config = read_json(folder / "text_encoder" / "config.json", "text encoder config", WeightsError)
    except WeightsError as e:
        raise GenerationError(str(e)) from None
    processor = folder / "processor"
    tok_folder = processor if has_tokenizer(processor) else folder / "tokenizer"
    try:
        tokenizer = load_qwen_tokenizer(tok_folder)
        transformer = load_qwen_image_transformer(folder, device=device, dtype=dtype)
        encoder = load_qwen_text_encoder(folder / "text_encoder", device=device, dtype=dtype, family="qwen2.5-vl")
        vision = load_qwen_vision_tower(folder / "text_encoder", device=device, dtype=dtype)
        lo, hi = processor_limits(processor, vision.config)
        vae_model = load_vae_side(Path(vae) if vae is not None else folder, dtype, device)
    except (WeightsError, UsageError) as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    image_token_id = te_config.get("image_token_id")
    if image_token_id is not None and type(image_token_id) is not int:
        raise GenerationError(f"{folder / 'text_encoder' / 'config.json'}: image_token_id={image_token_id!r}")

    def edit_encode(texts: list[str], images: list[Image.Image]) -> tuple[Tensor, Tensor]:
        states, mask = encode_prompt_qwen_edit(
            encoder,
            vision,
            tokenizer,
            texts,
            images,
            image_token_id=image_token_id,
            min_pixels=lo,
            max_pixels=hi,
            plus=plus,
        )
        return states.float(), mask

    unit = vision.config.patch_size * vision.config.spatial_merge_size

    def vision_grid(width: int, height: int) -> tuple[int, int]:
        h, w = smart_resize(height, width, unit, lo, hi)
        return h // unit, w // unit

    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(
        edit_encode=edit_encode,
        vision_grid=vision_grid,
        transformer=transformer,
        text_encoder=encoder,
        vae=vae_model,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name or folder.name,
        source=folder,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )
    pipe.vision = vision
    return pipe


__all__ = [
    "CONDITION_AREA",
    "EDIT_AREA",
    "PLUS_MAX_IMAGES",
    "QwenEditAdapter",
    "QwenImageEditPipeline",
    "QwenImageEditPlusPipeline",
    "edit_dimensions",
    "edit_refusals",
    "load_qwen_edit_pipeline",
]
