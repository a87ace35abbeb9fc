"""Loading Qwen-Image: a diffusers ``QwenImagePipeline`` folder -> ``QwenImagePipeline``
(:mod:`sdengine.pipeline.qwen_image`).

Accepted (:func:`load_qwen_image_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`): a folder whose
``model_index.json`` names ``QwenImagePipeline`` (or ``QwenImageImg2ImgPipeline`` / ``QwenImageInpaintPipeline``,
the same parts): ``transformer/`` (``QwenImageTransformer2DModel``, :mod:`sdengine.weights.qwen_image_file`),
``vae/`` (``AutoencoderKLQwenImage``), ``text_encoder/`` (transformers' ``Qwen2_5_VLForConditionalGeneration``, its
language model only), ``tokenizer/`` (Qwen2's), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``). Qwen-Image's
other pipelines (Edit, Edit Plus, Layered, ControlNet) are refused in one line: their transformers or inputs differ.

Also accepted: ComfyUI's release, three files. The diffusion-model file (``diffusion_models/qwen_image_*.safetensors``,
diffusers' ``QwenImageTransformer2DModel`` names, with or without ComfyUI's ``model.diffusion_model.`` prefix; told
by ``img_in``, ``txt_in`` and ``txt_norm``, :func:`is_qwen_image_file`) is the model; its parts are given apart:
``text_encoder`` (``--qwen-text``; ``text_encoders/qwen_2.5_vl_7b*.safetensors``, or a transformers / Qwen-Image
folder), ``vae`` (``--vae``; ``vae/qwen_image_vae.safetensors`` or a folder) and ``tokenizer``
(``--qwen-tokenizer``; Qwen2's tokenizer folder: Qwen-Image's ``tokenizer/``, ComfyUI's
``comfy/text_encoders/qwen25_tokenizer/`` or Qwen2.5-VL's own folder). sdengine ships no Qwen2 vocabulary, so the
tokenizer is looked for beside the text encoder (the folder given as ``text_encoder``, its pipeline folder's
``tokenizer/``, or a ``qwen25_tokenizer/`` / ``tokenizer/`` folder beside its file) and refused in one line when
none is found. The scheduler is Qwen/Qwen-Image's ``scheduler_config.json`` (:data:`QWEN_SCHEDULER`). A part that is
missing is one line naming the flag that gives it, before the transformer is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline.qwen_image import QwenImagePipeline

ACCEPTED = ("QwenImagePipeline", "QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline")
# the command line's names of a single file's parts given apart, and what each is (the missing-part line names them)
FLAGS = {"text_encoder": "--qwen-text", "vae": "--vae", "tokenizer": "--qwen-tokenizer"}
PARTS = {
    "text_encoder": ("Qwen2.5-VL text encoder", "ComfyUI's text_encoders/qwen_2.5_vl_7b.safetensors"),
    "vae": ("VAE", "ComfyUI's vae/qwen_image_vae.safetensors"),
    "tokenizer": (
        "Qwen2 tokenizer (sdengine ships none)",
        "Qwen-Image's tokenizer/ folder or ComfyUI's comfy/text_encoders/qwen25_tokenizer",
    ),
}
PREFIX = "model.diffusion_model."  # ComfyUI's diffusion-model prefix (its files may carry it)
# the tensors that tell a Qwen-Image transformer (diffusers' names): its image and text inputs and the text RMSNorm
MARKERS = ("img_in.weight", "txt_in.weight", "txt_norm.weight")
TOKENIZER_FOLDERS = ("qwen25_tokenizer", "tokenizer")  # looked for beside a text encoder file
# scheduler/scheduler_config.json of Qwen/Qwen-Image (a single file has none)
QWEN_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` when it is one of Qwen-Image's pipelines, else None."""
    from sdengine.weights.loading import pipeline_index_class

    return pipeline_index_class(path, "QwenImage")


def is_qwen_image_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names one of Qwen-Image's pipelines."""
    return pipeline_class(path) is not None


def is_qwen_image_state_dict(keys: Any) -> bool:
    """Whether these tensor names hold a Qwen-Image transformer (diffusers' names, with or without ComfyUI's
    ``model.diffusion_model.`` prefix): the weights, not a LoRA for them."""
    names = set(keys)
    if any(".lora_" in n or n.startswith("lora_") or ".lora_down." in n for n in names):
        return False
    return all(m in names for m in MARKERS) or all(PREFIX + m in names for m in MARKERS)


def is_qwen_image_file(path: Path) -> bool:
    """A single ``.safetensors`` file holding a Qwen-Image transformer (ComfyUI's ``qwen_image_*.safetensors``; its
    header alone is read: a pickle checkpoint is never read whole to ask)."""
    from sdengine.pipeline.flux_loading import file_holds
    from sdengine.weights.io import SAFETENSORS_SUFFIXES

    return path.suffix.lower() in SAFETENSORS_SUFFIXES and file_holds(path, is_qwen_image_state_dict)


def has_tokenizer(folder: Path) -> bool:
    """Whether ``folder`` holds a Qwen2 tokenizer's files (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``)."""
    return folder.is_dir() and (
        (folder / "tokenizer.json").is_file()
        or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
    )


def tokenizer_beside(text_encoder: Path) -> Path | None:
    """The Qwen2 tokenizer that comes with a text encoder: the folder itself (Qwen2.5-VL's transformers folder holds
    one), a pipeline folder's ``tokenizer/``, the ``tokenizer/`` beside a ``text_encoder/`` folder, or a
    ``qwen25_tokenizer/`` / ``tokenizer/`` folder beside a file; None when there is none."""
    if text_encoder.is_dir():
        for f in (text_encoder, text_encoder / "tokenizer", text_encoder.parent / "tokenizer"):
            if has_tokenizer(f):
                return f
        return None
    return next((text_encoder.parent / n for n in TOKENIZER_FOLDERS if has_tokenizer(text_encoder.parent / n)), None)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GenerationError(f"{path}: missing (a Qwen-Image folder has it)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GenerationError(f"{path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: not a JSON object")
    return data


def load_text_side(
    path: Path, dtype: torch.dtype, device: torch.device, *, tokenizer: Path | None = None
) -> tuple[Any, Any]:
    """(the text encoder module, texts -> (states, mask)) of a folder's ``text_encoder/`` and ``tokenizer/`` (or a
    text encoder file or folder ``path`` with the ``tokenizer`` folder given): Qwen2's
    tokenizer (:mod:`sdengine.text.qwen_tokenizer`), the language model (:mod:`sdengine.weights.qwen_text_file`) and
    Qwen-Image's prompt encoding (:func:`sdengine.text.qwen_prompt.encode_prompt_qwen`: the chat template, its
    first 34 states dropped)."""
    from sdengine.text.qwen_prompt import MAX_SEQUENCE_LENGTH_LIMIT, encode_prompt_qwen
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    try:
        tok = load_qwen_tokenizer(tokenizer if tokenizer is not None else path / "tokenizer")
    except UsageError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    encoder = load_qwen_text_encoder(
        path if tokenizer is not None else path / "text_encoder", device=device, dtype=dtype, family="qwen2.5-vl"
    )

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        states, mask = encode_prompt_qwen(encoder, tok, texts, max_sequence_length=MAX_SEQUENCE_LENGTH_LIMIT)
        return states.float(), mask

    return encoder, encode


def load_vae_side(path: Path, dtype: torch.dtype, device: torch.device) -> Any:
    """A Qwen-Image VAE (a folder, or its ``vae/``, or a single file:
    :func:`sdengine.weights.qwen_vae_file.load_qwen_vae`) as :class:`sdengine.models.qwen_vae.QwenImageVAE` (single
    images; its own ``scale_latents`` / ``unscale_latents``)."""
    from sdengine.weights.qwen_vae_file import load_qwen_vae

    return load_qwen_vae(path, device=device, dtype=dtype).eval().requires_grad_(False)


def load_qwen_image_pipeline(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
) -> QwenImagePipeline:
    """A Qwen-Image folder or diffusion-model file (module docstring) -> :class:`QwenImagePipeline` on ``device`` in
    ``dtype``; ``vae`` (``--vae``), ``text_encoder`` (``--qwen-text``) and ``tokenizer`` (``--qwen-tokenizer``):
    a file's parts, or replacements for a folder's (a Qwen-Image VAE: a diffusers folder or a single file,
    ComfyUI's ``qwen_image_vae``)."""
    from sdengine.weights.io import WeightsError
    from sdengine.weights.qwen_image_file import load_qwen_image_transformer

    given = {"text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise GenerationError(f"{FLAGS[key]} {value}: no such file or folder")
    single = not path.is_dir()
    if single:
        if not is_qwen_image_file(path):
            raise GenerationError(f"{path.name}: not a Qwen-Image diffusion-model file (no img_in, txt_in, txt_norm)")
        scheduler: dict[str, Any] = dict(QWEN_SCHEDULER)
        name = name or path.name.removesuffix(path.suffix) or path.name
    else:
        kind = pipeline_class(path)
        if kind in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline"):  # Edit (2509: Plus): its own pipeline
            from sdengine.pipeline.qwen_image_edit import load_qwen_edit_pipeline

            for key in ("text_encoder", "tokenizer"):
                if given[key] is not None:
                    raise GenerationError(
                        f"{FLAGS[key]} is not supported for a Qwen-Image-Edit folder (it uses its own)"
                    )
            plus = kind == "QwenImageEditPlusPipeline"
            return load_qwen_edit_pipeline(
                path, device=device, dtype=dtype, vae=vae, name=name, lora_dir=lora_dir, plus=plus
            )
        if kind not in ACCEPTED:
            raise GenerationError(
                f"{path.name}: {kind} is not supported (sdengine runs Qwen-Image's text-to-image, img2img, "
                "inpainting and Edit folders: QwenImagePipeline, QwenImageEditPipeline, QwenImageEditPlusPipeline)"
            )
        name = name or path.name
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    # the text encoder and its tokenizer: given apart, else the folder's; a file's missing part: one line, first
    te_path = Path(text_encoder) if text_encoder is not None else (None if single else path)
    tok_path = Path(tokenizer) if tokenizer is not None else None
    if te_path is not None and tok_path is None and (single or text_encoder is not None):
        tok_path = tokenizer_beside(te_path)
        if tok_path is None and not single and (path / "tokenizer").is_dir():
            tok_path = path / "tokenizer"  # a folder's own tokenizer for its replaced text encoder
    if not single and text_encoder is None and tok_path is None:
        tok_path = path / "tokenizer"
    for key, missing in (
        ("text_encoder", te_path is None),
        ("vae", single and vae is None),
        ("tokenizer", tok_path is None),
    ):
        if missing:
            what, example = PARTS[key]
            raise GenerationError(
                f"{path.name} holds no {what}: give it with {FLAGS[key]} ({key}= in Python; e.g. {example})"
            )
    assert te_path is not None and tok_path is not None
    if te_path.is_dir() and (te_path / "model_index.json").is_file():
        te_path = te_path / "text_encoder"
    try:
        transformer = load_qwen_image_transformer(path, device=device, dtype=dtype)
        encoder, encode = load_text_side(te_path, dtype, device, tokenizer=tok_path)
        vae_model = load_vae_side(Path(vae) if vae is not None else path, dtype, device)
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return QwenImagePipeline(
        transformer=transformer,
        text_encode=encode,
        text_encoder=encoder,
        vae=vae_model,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


__all__ = [
    "ACCEPTED",
    "FLAGS",
    "PARTS",
    "QWEN_SCHEDULER",
    "is_qwen_image_file",
    "is_qwen_image_folder",
    "is_qwen_image_state_dict",
    "load_qwen_image_pipeline",
    "pipeline_class",
    "tokenizer_beside",
]
