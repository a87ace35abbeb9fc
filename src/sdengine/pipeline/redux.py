"""FLUX.1 Redux units of a generation (``GenerationRequest.redux``): an image's SigLIP tokens through the Redux
image encoder, appended to the prompt's T5 tokens.

Each unit: the Redux image encoder (a loaded :class:`~sdengine.models.redux.ReduxImageEncoder`, BFL's
``flux1-redux-dev.safetensors``, diffusers' ``image_embedder/`` or a whole ``FluxPriorReduxPipeline`` folder,
whose ``image_encoder/`` is then the SigLIP encoder), the SigLIP encoder (a loaded
:class:`~sdengine.models.siglip_vision.SiglipVisionModel` or its file / folder), the image and a strength.

The tokens of a call (:func:`redux_tokens`): each unit's image preprocessed as transformers' ``SiglipImageProcessor``
(squashed to 384 x 384, bicubic; :func:`sdengine.models.siglip_vision.siglip_image_tensor`), SigLIP's
``last_hidden_state``, the Redux encoder, times the strength (ComfyUI's StyleModelApply "multiply": the image's
tokens only, the prompt's untouched), the units' tokens side by side in their order. A unit may carry the SigLIP
tokens itself (``siglip_tokens``: what ComfyUI's CLIPVisionEncode gives, its own preprocessing).

One unit at strength 1 is diffusers' ``FluxPriorReduxPipeline`` (with the text encoders) whose ``prompt_embeds``
are handed to ``FluxPipeline``: ``cat([T5(prompt), redux(siglip(image))], dim=1)``, CLIP-L's pooled output as it
is. diffusers' several images and ``prompt_embeds_scale`` are other rules (a sum over the images, the prompt's tokens
scaled too), not followed: several units here are ComfyUI's chain of StyleModelApply nodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.io.images import load_image
from sdengine.models.redux import ReduxImageEncoder
from sdengine.models.siglip_vision import SiglipVisionModel, siglip_image_tensor

MAX_REDUX_UNITS = 8  # each adds 729 tokens to every step of the transformer
MAX_STRENGTH = 10.0


@dataclass(frozen=True)
class ReduxUnit:
    """One Redux image. ``redux``: the image encoder or its file / folder; ``image``: a picture (PIL, uint8 array
    or file path); ``siglip``: the SigLIP encoder or its file / folder (None: the ``image_encoder/`` beside a
    ``FluxPriorReduxPipeline`` folder given as ``redux``); ``strength``: the factor on the image's tokens (0 to 10);
    ``siglip_tokens``: SigLIP's ``last_hidden_state`` (N, C) or (1, N, C) in place of ``image`` / ``siglip``."""

    redux: ReduxImageEncoder | str | Path
    image: Any = None
    siglip: SiglipVisionModel | str | Path | None = None
    strength: float = 1.0
    siglip_tokens: Tensor | None = None

    def check(self) -> None:
        """One line for a unit that cannot run (needs no model)."""
        if not isinstance(self.redux, ReduxImageEncoder | str | Path):
            raise GenerationError(
                "a Redux unit needs a loaded ReduxImageEncoder (sdengine.weights.redux_file.load_redux) or its file / "
                f"folder, got {type(self.redux).__name__}"
            )
        s = self.strength
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 0 <= s <= MAX_STRENGTH:
            raise GenerationError(f"redux strength must be a number from 0 to {MAX_STRENGTH:g}, got {s!r}")
        if (self.image is None) == (self.siglip_tokens is None):
            raise GenerationError("a Redux unit takes an image or siglip_tokens (exactly one of them)")
        if self.siglip_tokens is not None:
            t = self.siglip_tokens
            if not isinstance(t, Tensor) or not (t.ndim == 2 or (t.ndim == 3 and t.shape[0] == 1)):
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise GenerationError(f"redux siglip_tokens must be a tensor (N, C) or (1, N, C), got {shape}")
        elif self.siglip is not None and not isinstance(self.siglip, SiglipVisionModel | str | Path):
            raise GenerationError(
                f"redux siglip must be a SiglipVisionModel or its file, got {type(self.siglip).__name__}"
            )
        elif self.siglip is None and not (
            isinstance(self.redux, str | Path) and (Path(self.redux) / "image_encoder").is_dir()
        ):
            raise GenerationError(
                "a Redux unit's image needs the SigLIP encoder: give siglip= (sigclip_vision_patch14_384.safetensors "
                "or an image_encoder/ folder), or redux= a FluxPriorReduxPipeline folder"
            )


def check_units(units: Any) -> list[ReduxUnit]:
    """The request's ``redux`` value as a list of checked units (one line for anything else)."""
    if units is None:
        return []
    if not isinstance(units, list | tuple):
        raise GenerationError(f"redux must be a list of ReduxUnit, got {type(units).__name__}")
    if len(units) > MAX_REDUX_UNITS:
        raise GenerationError(f"redux takes at most {MAX_REDUX_UNITS} units, got {len(units)}")
    for u in units:
        if not isinstance(u, ReduxUnit):
            raise GenerationError(f"redux takes ReduxUnit values, got {type(u).__name__}")
        u.check()
    return list(units)


def _encoder(unit: ReduxUnit, device: torch.device) -> ReduxImageEncoder:
    from sdengine.weights.redux_file import load_redux

    if isinstance(unit.redux, ReduxImageEncoder):
        return unit.redux
    p = Path(unit.redux)
    if (p / "image_embedder").is_dir():  # a FluxPriorReduxPipeline folder
        p = p / "image_embedder"
    return load_redux(p, device=device)


def _siglip(unit: ReduxUnit, device: torch.device) -> SiglipVisionModel:
    from sdengine.weights.redux_file import load_siglip_vision

    if isinstance(unit.siglip, SiglipVisionModel):
        return unit.siglip
    p = Path(unit.siglip) if unit.siglip is not None else Path(unit.redux) / "image_encoder"  # type: ignore[arg-type]
    return load_siglip_vision(p, device=device)


def redux_tokens(units: list[ReduxUnit], width: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """The call's Redux tokens (1, N, ``width``) in ``dtype``: every unit's, strength applied, side by side; None
    without units. ``width``: the transformer's T5 width (``joint_attention_dim``)."""
    if not units:
        return None
    out = []
    for k, unit in enumerate(units):
        encoder = _encoder(unit, device)
        if encoder.config.txt_in_features != width:
            raise GenerationError(
                f"redux unit {k}: {encoder.name or 'the Redux encoder'} makes {encoder.config.txt_in_features}-wide "
                f"tokens, the Flux transformer reads {width}-wide T5 tokens"
            )
        enc_dev = encoder.redux_up.weight.device
        with torch.inference_mode():
            if unit.siglip_tokens is not None:
                states = unit.siglip_tokens.reshape(1, *unit.siglip_tokens.shape[-2:]).to(enc_dev)
            else:
                siglip = _siglip(unit, device)
                image = load_image(unit.image, f"redux image {k}")
                pixels = siglip_image_tensor(image, siglip.config.image_size)
                w = siglip.vision_model.embeddings.patch_embedding.weight
                states = siglip(pixels.to(device=w.device, dtype=w.dtype)).to(enc_dev)
            if states.shape[-1] != encoder.config.redux_dim:
                raise GenerationError(
                    f"redux unit {k}: the image tokens are {states.shape[-1]}-wide, the Redux encoder takes "
                    f"{encoder.config.redux_dim} (SigLIP so400m's 1152)"
                )
            tokens = encoder(states) * float(unit.strength)
        out.append(tokens.to(device=device, dtype=dtype))
    return torch.cat(out, dim=1)


def image_hash(image: Any, what: str = "redux image") -> str:
    """The first 10 hex digits of the SHA-256 of an image's RGB pixels and size (what the infotext's ``Redux N``
    names it by: the same picture in another file format or under another name has the same hash)."""
    import hashlib

    import numpy as np

    im = load_image(image, what).convert("RGB")
    digest = hashlib.sha256(f"{im.width}x{im.height}:".encode())
    digest.update(np.ascontiguousarray(np.asarray(im, dtype=np.uint8)).tobytes())
    return digest.hexdigest()[:10]


def image_name(image: Any) -> str:
    """The file name an image was read from (a path's, a PIL image's ``filename``), else "image"."""
    if isinstance(image, str | Path):
        return Path(image).name
    name = getattr(image, "filename", "")
    return Path(name).name if isinstance(name, str) and name else "image"


REDUX_WEIGHTS = (
    "image_embedder/diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
)


def weights_named(source: Any, weights: tuple[str, ...]) -> tuple[str, str | None]:
    """(name, hash) of a model as the infotext names it: a file's stem and :func:`model_hash`; a folder's name and
    the hash of its weights file; a loaded model its file's stem (no hash)."""
    from sdengine.pipeline.infotext import files_hash_cached

    if not isinstance(source, str | Path):
        return Path(getattr(source, "name", "") or type(source).__name__).stem, None
    path = Path(source)
    if path.is_dir():
        found = [path / w for w in weights if (path / w).is_file()]
        return path.name, files_hash_cached(found[:1]) if found else None
    return path.stem, files_hash_cached([path]) if path.is_file() else None


def unit_infotext(unit: ReduxUnit) -> str:
    """The ``Redux N`` value of a unit (:func:`sdengine.metadata.format_redux`)."""
    from sdengine.metadata import format_redux

    model, model_digest = weights_named(unit.redux, REDUX_WEIGHTS)
    siglip = siglip_digest = None
    if unit.siglip is not None and unit.image is not None:
        siglip, siglip_digest = weights_named(unit.siglip, ("model.safetensors",))
    image = None if unit.image is None else image_name(unit.image)
    return format_redux(
        image=image,
        image_hash=None if unit.image is None else image_hash(unit.image),
        strength=float(unit.strength),
        model=model,
        model_hash=model_digest,
        siglip=siglip,
        siglip_hash=siglip_digest,
    )


def infotext_fields(units: Any) -> dict[str, str]:
    """``Redux 0``, ``Redux 1`` ... of a request's units."""
    return {f"Redux {k}": unit_infotext(u) for k, u in enumerate(check_units(units))}


def padded_pair(cond: dict[str, Tensor], uncond: dict[str, Tensor], tokens: Tensor) -> tuple[dict, dict]:
    """(cond, uncond) of a row under true CFG with the call's Redux ``tokens`` (1, N, C) appended to the
    conditional text: both texts zero-padded to the longer, each with ``text_len`` (its own token count, one per
    row, on the CPU) so that the network runs the two apart (:func:`sdengine.diffusion.text_groups.run_text_groups`)."""
    text, neg = cond["crossattn"], uncond["crossattn"]
    text = torch.cat([text, tokens.to(device=text.device, dtype=text.dtype).expand(text.shape[0], -1, -1)], dim=1)
    m = max(text.shape[1], neg.shape[1])

    def pad(t: Tensor) -> Tensor:
        return torch.nn.functional.pad(t, (0, 0, 0, m - t.shape[1]))

    def lengths(t: Tensor) -> Tensor:
        return torch.full((t.shape[0],), t.shape[1], dtype=torch.long)

    return (
        {**cond, "crossattn": pad(text), "text_len": lengths(text)},
        {**uncond, "crossattn": pad(neg), "text_len": lengths(neg)},
    )


__all__ = [
    "MAX_REDUX_UNITS",
    "MAX_STRENGTH",
    "REDUX_WEIGHTS",
    "ReduxUnit",
    "check_units",
    "image_hash",
    "image_name",
    "infotext_fields",
    "padded_pair",
    "redux_tokens",
    "unit_infotext",
    "weights_named",
]
