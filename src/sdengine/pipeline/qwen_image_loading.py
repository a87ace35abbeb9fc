"""Loading Qwen-Image: a diffusers ``QwenImagePipeline`` folder -> ``QwenImagePipeline``
(:mod:`sdengine.pipeline.qwen_image`).

Accepted (:func:`load_qwen_image_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`): a folder whose
``model_index.json`` names ``QwenImagePipeline`` (or ``QwenImageImg2ImgPipeline`` / ``QwenImageInpaintPipeline``,
the same parts): ``transformer/`` (``QwenImageTransformer2DModel``, :mod:`sdengine.weights.qwen_image_file`),
``vae/`` (``AutoencoderKLQwenImage``), ``text_encoder/`` (transformers' ``Qwen2_5_VLForConditionalGeneration``, its
language model only), ``tokenizer/`` (Qwen2's), ``scheduler/`` (``FlowMatchEulerDiscreteScheduler``). Qwen-Image's
other pipelines (Edit, Edit Plus, Layered, ControlNet) are refused in one line: their transformers or inputs differ.
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


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` when it is one of Qwen-Image's pipelines, else None."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith("QwenImage") and name.endswith("Pipeline") else None


def is_qwen_image_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names one of Qwen-Image's pipelines."""
    return pipeline_class(path) is not None


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


def load_text_side(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(the text encoder module, texts -> (states, mask)) of a folder's ``text_encoder/`` and ``tokenizer/``: Qwen2's
    tokenizer (:mod:`sdengine.text.qwen_tokenizer`), the language model (:mod:`sdengine.weights.qwen_text_file`) and
    Qwen-Image's prompt encoding (:func:`sdengine.text.qwen_prompt.encode_prompt_qwen`: the chat template, its
    first 34 states dropped)."""
    from sdengine.text.qwen_prompt import MAX_SEQUENCE_LENGTH_LIMIT, encode_prompt_qwen
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    try:
        tokenizer = load_qwen_tokenizer(path / "tokenizer")
    except UsageError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    encoder = load_qwen_text_encoder(path / "text_encoder", device=device, dtype=dtype)

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        states, mask = encode_prompt_qwen(encoder, tokenizer, texts, max_sequence_length=MAX_SEQUENCE_LENGTH_LIMIT)
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
    name: str | None = None,
    lora_dir: Any = None,
) -> QwenImagePipeline:
    """A Qwen-Image folder (module docstring) -> :class:`QwenImagePipeline` on ``device`` in ``dtype``; ``vae``
    (``--vae``): another Qwen-Image VAE (a diffusers folder or a single file, ComfyUI's ``qwen_image_vae``) in place
    of the folder's."""
    from sdengine.weights.io import WeightsError
    from sdengine.weights.qwen_image_file import load_qwen_image_transformer

    kind = pipeline_class(path)
    if kind not in ACCEPTED:
        raise GenerationError(
            f"{path.name}: {kind} is not supported (sdengine runs Qwen-Image's text-to-image, img2img and inpainting "
            "folders: QwenImagePipeline)"
        )
    name = name or path.name
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    try:
        transformer = load_qwen_image_transformer(path, device=device, dtype=dtype)
        text_encoder, encode = load_text_side(path, dtype, device)
        if vae is not None and not Path(vae).exists():
            raise GenerationError(f"--vae {vae}: no such file or folder")
        vae_model = load_vae_side(Path(vae) if vae is not None else path, dtype, device)
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return QwenImagePipeline(
        transformer=transformer,
        text_encode=encode,
        text_encoder=text_encoder,
        vae=vae_model,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


__all__ = ["ACCEPTED", "is_qwen_image_folder", "load_qwen_image_pipeline", "pipeline_class"]
