"""Loading Chroma: a diffusers ``ChromaPipeline`` folder, or a Chroma single file -> :class:`ChromaPipeline`.

Accepted (:func:`load_chroma_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`):

* a diffusers folder whose ``model_index.json`` names ``ChromaPipeline`` (or ``ChromaImg2ImgPipeline``):
  ``transformer/`` (``ChromaTransformer2DModel``), ``vae/``, ``text_encoder/`` (T5EncoderModel, T5-XXL),
  ``tokenizer/`` (its ``tokenizer.json``), ``scheduler/``;
* a Chroma single file (:mod:`sdengine.weights.chroma_file`: BFL's names plus ``distilled_guidance_layer.*``, with
  or without ComfyUI's prefix) with ``vae`` (``--vae``: Flux.1's ``ae.safetensors``, or the file's own ``vae.*`` /
  ``first_stage_model.*``) and ``t5`` (``--t5``: ComfyUI's ``t5xxl_fp16.safetensors``, or the file's own
  ``text_encoders.t5xxl.transformer.*``).

A single file has no scheduler or tokenizer: the scheduler config is FLUX.1 [dev]'s (shift 3, dynamic shifting
from 0.5 at 256 image tokens to 1.15 at 4096: what Chroma1-HD's diffusers folder ships) and the tokenizer the
shipped T5 v1.1 vocabulary. A missing part is one line naming the flag that gives it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdengine.errors import GenerationError
from sdengine.pipeline.chroma import ChromaPipeline
from sdengine.pipeline.flux_loading import (
    COMFY_T5,
    DEV_SCHEDULER,
    VAE_PREFIXES,
    check_given,
    file_holds,
    is_pipeline_folder,
    refuse_missing,
    tensor_names,
    vae_t5_and_scheduler,
)

CHROMA_SCHEDULER: dict[str, Any] = dict(DEV_SCHEDULER)


def is_chroma_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names a Chroma pipeline."""
    return is_pipeline_folder(path, "Chroma")


def is_chroma_file(path: Path) -> bool:
    """A single weights file holding a Chroma transformer (``distilled_guidance_layer.*``)."""
    from sdengine.weights.detect import is_chroma_state_dict

    return file_holds(path, is_chroma_state_dict)


def load_chroma_pipeline(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    t5: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
) -> ChromaPipeline:
    """A Chroma folder or file (module docstring) -> :class:`ChromaPipeline` on ``device`` in ``dtype``."""
    from sdengine.weights.chroma_file import load_chroma_transformer
    from sdengine.weights.io import SAFETENSORS_SUFFIXES, WeightsError

    name = name or path.name.removesuffix(path.suffix) or path.name
    given = {"vae": vae, "t5": t5}
    check_given(given)
    try:
        names = [] if path.is_dir() else tensor_names(path)
        if not path.is_dir():
            held_vae = any(n.startswith(VAE_PREFIXES) for n in names) and path.suffix.lower() in SAFETENSORS_SUFFIXES
            refuse_missing(path, given, {"vae": held_vae, "t5": any(n.startswith(COMFY_T5) for n in names)})
        transformer = load_chroma_transformer(path, device=device, dtype=dtype)
        vae_model, t5_model, tokenizer, scheduler = vae_t5_and_scheduler(
            path, names, vae, t5, t5_folder="text_encoder", t5_tokenizer="tokenizer", scheduler=CHROMA_SCHEDULER,
            dtype=dtype, device=device,
        )  # fmt: skip
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return ChromaPipeline(
        transformer=transformer,
        vae=vae_model,
        text_encoder=t5_model,
        tokenizer=tokenizer,
        scheduler_config=scheduler,
        device=device,
        dtype=dtype,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,
    )


__all__ = ["CHROMA_SCHEDULER", "is_chroma_file", "is_chroma_folder", "load_chroma_pipeline"]
