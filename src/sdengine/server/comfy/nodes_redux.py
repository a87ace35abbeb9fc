"""ComfyUI's ``StyleModelLoader`` and ``StyleModelApply`` (its ``nodes.py`` and ``comfy/sd.py`` /
``comfy/ldm/flux/redux.py``, read for facts) for FLUX.1 Redux: a Redux image encoder of ``--models-dir``'s
``style_models/`` (BFL's ``flux1-redux-dev.safetensors``, :func:`sdengine.weights.redux_file.load_redux`) and its
tokens appended to every entry of a Flux conditioning.

StyleModelApply: the CLIP_VISION_OUTPUT's ``last_hidden_state`` (CLIPVisionEncode of a SigLIP encoder) through the
Redux encoder, its rows' tokens joined into one row (B images: B x 729 tokens), times ``strength`` with
``strength_type`` "multiply", appended after each entry's T5 tokens. "attn_bias" (ComfyUI: ``log(strength)`` added
to the attention logits of the Redux tokens, through an attention mask) runs at strength 1 only, where it is the
plain append; another strength is refused in one line (sdengine's Flux transformer takes no attention mask).

The same tokens through the Python pipeline: :class:`sdengine.pipeline.redux.ReduxUnit` with the SigLIP tokens.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdengine.server.comfy.nodes import Input, NodeDef, NodeError, RunContext

STRENGTH_TYPES = ("multiply", "attn_bias")
STYLE_MODELS_KEPT = 2  # a Redux encoder is ~64M parameters
_LOADED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_LOADED_LOCK = threading.Lock()


@dataclass(frozen=True)
class StyleModelHandle:
    """StyleModelLoader's STYLE_MODEL: the Redux file of ``style_models/`` and the name it was listed by."""

    path: str
    name: str

    def __repr__(self) -> str:
        return f"STYLE_MODEL({self.name})"


def _style_model_names(env: Any) -> list[str]:
    listed = getattr(env.catalog, "style_models", None)
    return [e.name for e in listed()] if listed is not None else []


def redux_encoder(ctx: RunContext, path: str, name: str) -> Any:
    """The Redux encoder of ``path`` in float32 on the worker's device, kept per file state; one NodeError line for
    a file that is not one."""
    from sdengine.errors import SdengineError
    from sdengine.io.paths import file_state
    from sdengine.weights.redux_file import load_redux

    try:
        key = (path, str(ctx.device), *file_state(path))
    except OSError:
        raise NodeError(f"style model {name!r}: the file is gone") from None
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    try:
        model = load_redux(path, device=ctx.device, dtype=torch.float32)
    except (OSError, SdengineError) as e:
        raise NodeError(f"style model {name!r}: {e}") from None
    with _LOADED_LOCK:
        _LOADED[key] = model
        while len(_LOADED) > STYLE_MODELS_KEPT:
            _LOADED.popitem(last=False)
    return model


def forget_style_models() -> None:
    with _LOADED_LOCK:
        _LOADED.clear()


def style_model_loader(ctx: RunContext, style_model_name: str) -> tuple[Any]:
    """ComfyUI's StyleModelLoader: the file is read here (a bad one fails at this node)."""
    from sdengine.server.errors import BadRequest

    try:
        path = ctx.catalog.resolve_style_model(style_model_name)
    except BadRequest as e:
        raise NodeError(str(e)) from None
    redux_encoder(ctx, str(path), style_model_name)
    return (StyleModelHandle(str(path), style_model_name),)


def style_model_apply(
    ctx: RunContext,
    conditioning: list[Any],
    style_model: Any,
    clip_vision_output: Any,
    strength: float = 1.0,
    strength_type: str = "multiply",
) -> tuple[Any]:
    """ComfyUI's StyleModelApply (see the module docstring)."""
    if not isinstance(style_model, StyleModelHandle):
        raise NodeError("style_model must come from StyleModelLoader")
    if strength_type not in STRENGTH_TYPES:
        raise NodeError(f"strength_type must be one of {', '.join(STRENGTH_TYPES)}, got {strength_type!r}")
    if strength_type == "attn_bias" and float(strength) != 1.0:
        raise NodeError(
            "StyleModelApply: strength_type attn_bias with a strength other than 1 needs an attention mask on the "
            "Flux transformer, which sdengine does not have; use multiply"
        )
    states = getattr(clip_vision_output, "last_hidden_state", None)
    if not isinstance(states, torch.Tensor) or states.ndim != 3:
        raise NodeError("clip_vision_output must come from CLIPVisionEncode")
    model = redux_encoder(ctx, style_model.path, style_model.name)
    if int(states.shape[-1]) != model.config.redux_dim:
        raise NodeError(
            f"StyleModelApply: the image tokens are {states.shape[-1]}-wide, {style_model.name} takes "
            f"{model.config.redux_dim} (encode the image with the SigLIP encoder, sigclip_vision_patch14_384)"
        )
    w = model.redux_up.weight
    with torch.inference_mode():
        tokens = model(states.to(device=w.device, dtype=w.dtype)).flatten(0, 1).unsqueeze(0)  # (1, B x N, T5 width)
    if strength_type == "multiply":
        tokens = tokens * float(strength)
    tokens = tokens.cpu()
    out = []
    for entry in conditioning:
        text = entry.cond.get("crossattn")
        if not isinstance(text, torch.Tensor) or text.ndim != 3:
            raise NodeError("StyleModelApply: this conditioning has no token states (crossattn)")
        if int(text.shape[-1]) != int(tokens.shape[-1]):
            raise NodeError(
                f"StyleModelApply: {style_model.name} makes {tokens.shape[-1]}-wide tokens, the conditioning's are "
                f"{text.shape[-1]} wide (a FLUX.1 text encoder's T5 is needed)"
            )
        extra = tokens.to(dtype=text.dtype).expand(text.shape[0], -1, -1)
        out.append(replace(entry, cond={**entry.cond, "crossattn": torch.cat([text, extra], dim=1)}))
    return (out,)


def style_model_file_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The executor's cache token of a StyleModelLoader: the file's state."""
    from sdengine.io.paths import file_state

    try:
        size, mtime = file_state(Path(ctx.catalog.resolve_style_model(inputs.get("style_model_name"))))
        return f"{size}:{mtime}"
    except Exception:  # noqa: BLE001 - a name that does not resolve fails when the node runs, with its own line
        return ""


REDUX_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "StyleModelLoader",
            "Load Style Model",
            "loaders",
            (Input("style_model_name", "COMBO", choices=_style_model_names),),
            ("STYLE_MODEL",),
            style_model_loader,
            description="A FLUX.1 Redux image encoder (flux1-redux-dev.safetensors) from --models-dir's style_models/.",
            changed=style_model_file_token,
        ),
        NodeDef(
            "StyleModelApply",
            "Apply Style Model",
            "conditioning/style_model",
            (
                Input("conditioning", "CONDITIONING"),
                Input("style_model", "STYLE_MODEL"),
                Input("clip_vision_output", "CLIP_VISION_OUTPUT"),
                Input("strength", "FLOAT", 1.0, 0.0, 10.0, 0.001),
                Input("strength_type", "COMBO", "multiply", choices=STRENGTH_TYPES),
            ),
            ("CONDITIONING",),
            style_model_apply,
            description="FLUX.1 Redux: the SigLIP image tokens through the style model, times strength (multiply), "
            "appended to the conditioning's T5 tokens; attn_bias at strength 1 only.",
        ),
    )
}
