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

from sdengine.errors import GenerationError
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


PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)  # diffusers' QwenImagePipeline prompt_template_encode
TEMPLATE_DROP = 34  # the template's first tokens, dropped from the states (its prompt_template_encode_start_idx)
MAX_TOKENS = 1024 + TEMPLATE_DROP  # the tokenizer's truncation length there


def load_text_side(path: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    """(the text encoder module, texts -> (states, mask)) of a folder's ``text_encoder/`` and ``tokenizer/``: each
    text in Qwen-Image's chat template, tokenized (``tokenizer.json``), run through the language model, its first
    :data:`TEMPLATE_DROP` states dropped (diffusers' ``_get_qwen_prompt_embeds``); the texts one at a time, so no
    padding."""
    from tokenizers import Tokenizer

    from sdengine.weights.qwen_text_file import load_qwen_text_encoder

    tok_file = path / "tokenizer" / "tokenizer.json"
    if not tok_file.is_file():
        raise GenerationError(f"{tok_file}: missing (sdengine reads Qwen2's tokenizer from its tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(tok_file))
    except Exception as e:  # the tokenizers library's own error types
        raise GenerationError(f"{tok_file}: cannot read it ({str(e).splitlines()[0][:200]})") from None
    encoder = load_qwen_text_encoder(path / "text_encoder", device=device, dtype=dtype)

    def encode(texts: list[str]) -> tuple[Tensor, Tensor]:
        rows = []
        for text in texts:
            ids = tokenizer.encode(PROMPT_TEMPLATE.format(text), add_special_tokens=False).ids[:MAX_TOKENS]
            if len(ids) <= TEMPLATE_DROP:
                raise GenerationError(f"the prompt template gives {len(ids)} tokens: not Qwen-Image's tokenizer")
            with torch.no_grad():
                states = encoder(torch.tensor([ids], device=encoder.device))
            rows.append(states[0, TEMPLATE_DROP:].float())
        n = max(r.shape[0] for r in rows)
        out = torch.zeros(len(rows), n, rows[0].shape[1], device=rows[0].device)
        mask = torch.zeros(len(rows), n, dtype=torch.long, device=rows[0].device)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, 1
        return out, mask

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
