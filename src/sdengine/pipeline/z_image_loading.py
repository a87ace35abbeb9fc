"""Loading Z-Image: a diffusers ``ZImagePipeline`` folder -> ``ZImagePipeline`` (:mod:`sdengine.pipeline.z_image`).

Accepted (:func:`load_z_image_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`): a folder whose
``model_index.json`` names ``ZImagePipeline`` (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image) or
``ZImageImg2ImgPipeline`` (the same parts): ``transformer/`` (``ZImageTransformer2DModel``,
:mod:`sdengine.weights.z_image_file`), ``vae/`` (FLUX.1's ``AutoencoderKL``), ``text_encoder/`` (Qwen3,
:mod:`sdengine.weights.qwen_text_file`; a Qwen2.5-VL one is refused in one line), ``tokenizer/`` (Qwen2's BPE),
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``). ``vae`` (``--vae``) takes another FLUX.1 VAE (a diffusers
folder or BFL's ``ae.safetensors``). Z-Image's other pipelines (ControlNet, inpainting, Omni) are refused in one
line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline.z_image import MAX_SEQUENCE_LENGTH, ZImagePipeline

ACCEPTED = ("ZImagePipeline", "ZImageImg2ImgPipeline")


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` when it is one of Z-Image's pipelines, else None."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith("ZImage") and name.endswith("Pipeline") else None


def is_z_image_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names one of Z-Image's pipelines."""
    return pipeline_class(path) is not None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GenerationError(f"{path}: missing (a Z-Image folder has it)") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise GenerationError(f"{path}: cannot read it ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise GenerationError(f"{path}: not a JSON object")
    return data


def load_text_side(text_encoder: Path, tokenizer: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(the Qwen3 text encoder, texts -> (states, mask)): Qwen2's tokenizer (:mod:`sdengine.text.qwen_tokenizer`),
    Qwen3 (:mod:`sdengine.weights.qwen_text_file`, family ``qwen3``) and Z-Image's prompt encoding
    (:func:`sdengine.text.z_image_prompt.encode_prompt_z_image`). The texts are read one token past
    ``max_sequence_length`` so that the conditioner can say when one is cut (the encoder is causal: the first 512
    states are those of the cut text)."""
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer
    from sdengine.text.z_image_prompt import encode_prompt_z_image
    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    try:
        tok = load_qwen_tokenizer(tokenizer)
    except UsageError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    encoder = load_qwen_text_encoder(text_encoder, device=device, dtype=dtype, family="qwen3")

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        states, mask = encode_prompt_z_image(encoder, tok, texts, max_length=MAX_SEQUENCE_LENGTH + 1)
        return states.float(), mask

    return encoder, encode


def load_z_image_pipeline(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
) -> ZImagePipeline:
    """A Z-Image folder (module docstring) -> :class:`ZImagePipeline` on ``device`` in ``dtype``; ``vae``: another
    FLUX.1 VAE (``--vae``)."""
    from sdengine.pipeline.flux_loading import load_flux_vae
    from sdengine.weights.io import WeightsError
    from sdengine.weights.z_image_file import load_z_image_transformer

    if vae is not None and not Path(vae).exists():
        raise GenerationError(f"--vae {vae}: no such file or folder")
    kind = pipeline_class(path)
    if kind not in ACCEPTED:
        raise GenerationError(
            f"{path.name}: {kind} is not supported (sdengine runs Z-Image's text-to-image and img2img folders: "
            f"{', '.join(ACCEPTED)})"
        )
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    for part in ("transformer", "text_encoder", "tokenizer"):
        if not (path / part).is_dir():
            raise GenerationError(f"{path.name}: no {part}/ folder (a Z-Image folder has one)")
    if vae is None and not (path / "vae").is_dir():
        raise GenerationError(f"{path.name}: no vae/ folder (a Z-Image folder has one; or give FLUX.1's with --vae)")
    try:
        transformer = load_z_image_transformer(path, device=device, dtype=dtype)
        encoder, encode = load_text_side(path / "text_encoder", path / "tokenizer", dtype, device)
        vae_model = load_flux_vae(Path(vae) if vae is not None else path / "vae", dtype, device)
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return ZImagePipeline(
        transformer=transformer,
        text_encode=encode,
        text_encoder=encoder,
        vae=vae_model,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name or path.name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


__all__ = ["ACCEPTED", "is_z_image_folder", "load_z_image_pipeline", "pipeline_class"]
