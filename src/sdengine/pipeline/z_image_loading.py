"""Loading Z-Image: a diffusers ``ZImagePipeline`` folder -> ``ZImagePipeline`` (:mod:`sdengine.pipeline.z_image`).

Accepted (:func:`load_z_image_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`): a folder whose
``model_index.json`` names ``ZImagePipeline`` (Tongyi-MAI/Z-Image-Turbo, Tongyi-MAI/Z-Image),
``ZImageImg2ImgPipeline`` or ``ZImageInpaintPipeline`` (the same parts): ``transformer/`` (``ZImageTransformer2DModel``,
:mod:`sdengine.weights.z_image_file`), ``vae/`` (FLUX.1's ``AutoencoderKL``), ``text_encoder/`` (Qwen3,
:mod:`sdengine.weights.qwen_text_file`; a Qwen2.5-VL one is refused in one line), ``tokenizer/`` (Qwen2's BPE),
``scheduler/`` (``FlowMatchEulerDiscreteScheduler``). ``vae`` (``--vae``) takes another FLUX.1 VAE (a diffusers
folder or BFL's ``ae.safetensors``). Z-Image's other pipelines (ControlNet, Omni) are refused in one line.

Also accepted: ComfyUI's release, three files. The diffusion-model file
(``diffusion_models/z_image_turbo_bf16.safetensors``: the original names, or diffusers', with or without ComfyUI's
``model.diffusion_model.`` prefix; told by its pad tokens and first layer's modulation, :func:`is_z_image_file`) is
the model, its parts given apart: ``text_encoder`` (``--qwen-text``; ``text_encoders/qwen_3_4b.safetensors`` or a
transformers Qwen3 folder), ``vae`` (``--vae``; ``vae/ae.safetensors``) and ``tokenizer`` (``--qwen-tokenizer``;
Qwen2's BPE tokenizer folder, as for Qwen-Image: looked for beside the text encoder when not given,
:func:`sdengine.pipeline.qwen_image_loading.tokenizer_beside`). The scheduler is Z-Image-Turbo's
(:data:`TURBO_SCHEDULER`). A missing part is one line naming its flag, before the transformer is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError, UsageError
from sdengine.pipeline.z_image import MAX_SEQUENCE_LENGTH, ZImagePipeline

ACCEPTED = ("ZImagePipeline", "ZImageImg2ImgPipeline", "ZImageInpaintPipeline")
# Tongyi-MAI/Z-Image-Turbo's scheduler/scheduler_config.json (a single file has none)
TURBO_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "use_dynamic_shifting": False,
    "shift": 3.0,
}
FLAGS = {"text_encoder": "--qwen-text", "vae": "--vae", "tokenizer": "--qwen-tokenizer"}
KEYWORDS = {"text_encoder": "qwen_text", "vae": "vae", "tokenizer": "qwen_tokenizer"}  # load_pipeline's names
PARTS = {
    "text_encoder": ("Qwen3 text encoder", "ComfyUI's text_encoders/qwen_3_4b.safetensors"),
    "vae": ("VAE", "FLUX.1's vae/ae.safetensors"),
    "tokenizer": ("Qwen2 tokenizer (sdengine ships none)", "Z-Image's tokenizer/ folder or ComfyUI's qwen25_tokenizer"),
}


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of a folder's ``model_index.json`` when it is one of Z-Image's pipelines, else None."""
    from sdengine.weights.loading import pipeline_index_class

    return pipeline_index_class(path, "ZImage")


def is_z_image_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names one of Z-Image's pipelines."""
    return pipeline_class(path) is not None


def is_z_image_file(path: Path) -> bool:
    """A single ``.safetensors`` file holding a Z-Image transformer (its header alone is read)."""
    from sdengine.pipeline.flux_loading import file_holds
    from sdengine.weights.io import SAFETENSORS_SUFFIXES
    from sdengine.weights.z_image_file import is_z_image_state_dict

    return path.is_file() and path.suffix.lower() in SAFETENSORS_SUFFIXES and file_holds(path, is_z_image_state_dict)


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
    text_encoder: str | Path | None = None,
    tokenizer: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
) -> ZImagePipeline:
    """A Z-Image folder or diffusion-model file (module docstring) -> :class:`ZImagePipeline` on ``device`` in
    ``dtype``; ``vae`` (``--vae``): another FLUX.1 VAE for a folder, a file's VAE; ``text_encoder`` (``--qwen-text``)
    and ``tokenizer`` (``--qwen-tokenizer``): a file's Qwen3 and Qwen2 tokenizer (a folder uses its own)."""
    from sdengine.pipeline.flux_loading import load_flux_vae
    from sdengine.pipeline.qwen_image_loading import tokenizer_beside
    from sdengine.weights.io import WeightsError
    from sdengine.weights.z_image_file import load_z_image_transformer

    given = {"text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise GenerationError(f"{FLAGS[key]} {value}: no such file or folder")
    if path.is_dir():
        kind = pipeline_class(path)
        if kind not in ACCEPTED:
            raise GenerationError(
                f"{path.name}: {kind} is not supported (sdengine runs Z-Image's text-to-image, img2img and inpainting "
                "folders: "
                f"{', '.join(ACCEPTED)})"
            )
        for key in ("text_encoder", "tokenizer"):
            if given[key] is not None:
                raise GenerationError(f"{FLAGS[key]} is not supported for a Z-Image folder (it uses its own)")
        scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
        for part in ("transformer", "text_encoder", "tokenizer"):
            if not (path / part).is_dir():
                raise GenerationError(f"{path.name}: no {part}/ folder (a Z-Image folder has one)")
        if vae is None and not (path / "vae").is_dir():
            raise GenerationError(
                f"{path.name}: no vae/ folder (a Z-Image folder has one; or give FLUX.1's with --vae)"
            )
        te_path, tok_path, vae_path = path / "text_encoder", path / "tokenizer", Path(vae or path / "vae")
        name = name or path.name
    else:
        if not is_z_image_file(path):
            raise GenerationError(f"{path.name}: not a Z-Image diffusion-model file (no x_pad_token, cap_pad_token)")
        scheduler = dict(TURBO_SCHEDULER)
        te = Path(text_encoder) if text_encoder is not None else None
        tok = Path(tokenizer) if tokenizer is not None else (tokenizer_beside(te) if te is not None else None)
        for key, missing in (("text_encoder", te is None), ("vae", vae is None), ("tokenizer", tok is None)):
            if missing:
                what, example = PARTS[key]
                raise GenerationError(
                    f"{path.name} holds no {what}: give it with {FLAGS[key]} ({KEYWORDS[key]}= in Python; e.g. "
                    f"{example})"
                )
        assert te is not None and tok is not None and vae is not None
        if te.is_dir() and (te / "model_index.json").is_file():
            te = te / "text_encoder"
        te_path, tok_path, vae_path = te, tok, Path(vae)
        name = name or path.name.removesuffix(path.suffix) or path.name
    try:
        transformer = load_z_image_transformer(path, device=device, dtype=dtype)
        encoder, encode = load_text_side(te_path, tok_path, dtype, device)
        width, wanted = int(encoder.config.hidden_size), int(transformer.config.cap_feat_dim)
        if width != wanted:
            raise GenerationError(
                f"{te_path.name}: a {width}-wide text encoder, but the Z-Image transformer reads {wanted}-wide states "
                "(cap_feat_dim): not this model's text encoder (Z-Image's is Qwen3-4B)"
            )
        vae_model = load_flux_vae(vae_path, dtype, device)
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
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


__all__ = [
    "ACCEPTED",
    "FLAGS",
    "KEYWORDS",
    "PARTS",
    "TURBO_SCHEDULER",
    "is_z_image_file",
    "is_z_image_folder",
    "load_z_image_pipeline",
    "pipeline_class",
]
