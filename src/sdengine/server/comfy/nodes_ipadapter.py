"""The IP-Adapter nodes of the ComfyUI_IPAdapter_plus custom-node pack (cubiq; its ``IPAdapterPlus.py``,
``CrossAttentionPatch.py`` and ``utils.py`` read for facts): ``IPAdapterModelLoader`` (a file of
``--ip-adapters-dir``, the pack's ``ipadapter`` folder), ``IPAdapterUnifiedLoader`` (a preset's encoder and adapter
found by the pack's file-name rules), ``IPAdapterAdvanced`` and ``IPAdapter``.

An apply node encodes its images itself, as the pack does (``encode_image_masked``: ComfyUI's ``clip_preprocess``
with the centre crop, :func:`sdengine.server.comfy.nodes_clip_vision.clip_vision_encode`), and adds one
:class:`sdengine.pipeline.ip_adapter.IPAdapterUnit` to the MODEL (several nodes chained: one unit each, as the
pack's attention patches add up); the samplers run them (:func:`sdengine.latent_sampling.sample_latents`). The
pack's rules kept:

* what the unconditional rows see: the plain adapter zeros (or the encoding of ``image_negative``), Plus / full face
  the penultimate hidden states of a black picture (or of ``image_negative``), repeated or cut to the image count;
* several images: ``concat`` puts their tokens side by side, ``add`` / ``subtract`` / ``average`` / ``norm average``
  combine the encodings first (the unconditional rows then take the first negative);
* ``weight_type``: a factor per cross-attention layer by its block and ComfyUI ``transformer_index``
  (:func:`layer_scales`); "style transfer precise" and "composition precise" (which swap the conditional and
  unconditional tokens in some layers) are not offered;
* ``embeds_scaling``: "V only" scales the image attention's output, "K+V" its keys and values, the "w/ C penalty"
  variants further by the layer's width over 1280, "K+mean(V)" the keys and the values' mean;
* ``start_at`` / ``end_at``: the sigma window on the model's schedule (``percent_to_sigma``), judged at every call.

Not here: ``attn_mask`` (refused), the FaceID / community unified loaders, FaceID and InsightFace; the simple
``IPAdapter`` node takes the unified loader's pipeline (an ``IPAdapterModelLoader``'s IPADAPTER is refused there, as
in the pack).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext
from sdengine.server.comfy.nodes_clip_vision import ClipVisionHandle, clip_vision_encode, clip_vision_model

# The pack's weight types with a per-layer rule sdengine runs (its WEIGHT_TYPES less the two "precise" ones)
WEIGHT_TYPES = (
    "linear",
    "ease in",
    "ease out",
    "ease in-out",
    "reverse in-out",
    "weak input",
    "weak output",
    "weak middle",
    "strong middle",
    "style transfer",
    "composition",
    "strong style transfer",
    "style and composition",
)
COMBINE_EMBEDS = ("concat", "add", "subtract", "average", "norm average")
EMBEDS_SCALING = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
SIMPLE_WEIGHT_TYPES = ("standard", "prompt is more important", "style transfer")
# the pack's layer sets by ComfyUI transformer_index (SD 1.x: 16 transformers; SDXL: 11)
_STYLE = {True: (6,), False: (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
_STRONG_STYLE = {True: (0, 1, 2, 4, 5, 6, 7, 8, 9, 10), False: (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)}
IPADAPTERS_KEPT = 3
_LOADED: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
_LOADED_LOCK = threading.Lock()


@dataclass(frozen=True)
class IPAdapterHandle:
    """IPAdapterModelLoader's IPADAPTER: the file of ``--ip-adapters-dir`` and the name it was listed by."""

    path: str
    name: str

    def __repr__(self) -> str:
        return f"IPADAPTER({self.name})"


@dataclass(frozen=True)
class UnifiedPipeline:
    """IPAdapterUnifiedLoader's IPADAPTER: the pack's pipeline of a CLIP vision encoder and an adapter picked by a
    preset (what the simple IPAdapter node takes)."""

    clip_vision: ClipVisionHandle
    ipadapter: IPAdapterHandle

    def __repr__(self) -> str:
        return f"IPADAPTER({self.ipadapter.name}, {self.clip_vision.name})"


# IPAdapterUnifiedLoader's presets and the pack's file-name rules (utils.py get_clipvision_file / get_ipadapter_file):
# (preset, encoder pattern, SD 1.x adapter pattern(s), SDXL adapter pattern or the reason there is none)
_VIT_H = r"(ViT.H.14.*s32B.b79K|ipadapter.*sd15|sd1.?5.*model)\.(bin|safetensors)"
_VIT_G = r"(ViT.bigG.14.*39B.b160k|ipadapter.*sdxl|sdxl.*model)\.(bin|safetensors)"
PRESETS: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "LIGHT - SD1.5 only (low strength)": (
        _VIT_H,
        (r"sd15.light.v11\.(safetensors|bin)$", r"sd15.light\.(safetensors|bin)$"),
        None,
    ),
    "STANDARD (medium strength)": (
        _VIT_H,
        (r"ip.adapter.sd15\.(safetensors|bin)$",),
        r"ip.adapter.sdxl.vit.h\.(safetensors|bin)$",
    ),
    "VIT-G (medium strength)": (_VIT_G, (r"sd15.vit.g\.(safetensors|bin)$",), r"ip.adapter.sdxl\.(safetensors|bin)$"),
    "PLUS (high strength)": (
        _VIT_H,
        (r"ip.adapter.plus.sd15\.(safetensors|bin)$",),
        r"plus.sdxl.vit.h\.(safetensors|bin)$",
    ),
    "PLUS FACE (portraits)": (
        _VIT_H,
        (r"plus.face.sd15\.(safetensors|bin)$",),
        r"plus.face.sdxl.vit.h\.(safetensors|bin)$",
    ),
    "FULL FACE - SD1.5 only (portraits stronger)": (_VIT_H, (r"full.face.sd15\.(safetensors|bin)$",), None),
}


def _first_match(names: list[str], pattern: str) -> str | None:
    return next((n for n in names if re.search(pattern, n, re.IGNORECASE)), None)


def _names(env: Any) -> list[str]:
    return [e.name for e in env.catalog.ip_adapters()]


def ipadapter_model(ctx: RunContext, handle: IPAdapterHandle, device: Any = "cpu", dtype: Any = None) -> Any:
    """The adapter of ``handle``'s file on ``device`` in ``dtype`` (float32 by default), loaded once per file state
    and place; a file that is not an IP-Adapter sdengine reads is a one-line NodeError."""
    from sdengine.errors import SdengineError
    from sdengine.io.paths import file_state
    from sdengine.weights.ip_adapter_file import load_ip_adapter

    dtype = torch.float32 if dtype is None else dtype
    try:
        key = (handle.path, str(device), str(dtype), *file_state(handle.path))
    except OSError:
        raise NodeError(f"IPAdapter {handle.name!r}: the file is gone") from None
    with _LOADED_LOCK:
        if key in _LOADED:
            _LOADED.move_to_end(key)
            return _LOADED[key]
    try:
        adapter = load_ip_adapter(handle.path, device=device, dtype=dtype)
    except (OSError, SdengineError) as e:
        raise NodeError(f"IPAdapter file {handle.name!r}: {e}") from None
    adapter.name = Path(handle.name).name
    with _LOADED_LOCK:
        _LOADED[key] = adapter
        while len(_LOADED) > IPADAPTERS_KEPT:
            _LOADED.popitem(last=False)
    return adapter


def forget_ipadapters() -> None:
    """Drop the kept adapters (ComfyUI's POST /free with unload_models)."""
    with _LOADED_LOCK:
        _LOADED.clear()


def ipadapter_model_loader(ctx: RunContext, ipadapter_file: str) -> tuple[Any]:
    """The pack's IPAdapterModelLoader: the file is read here (a bad one fails at this node), the adapter kept."""
    from sdengine.server.errors import BadRequest

    try:
        path = ctx.catalog.resolve_ip_adapter(ipadapter_file)
    except BadRequest as e:
        raise NodeError(str(e)) from None
    handle = IPAdapterHandle(str(path), ipadapter_file)
    ipadapter_model(ctx, handle)
    return (handle,)


def ipadapter_file_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The executor's cache token of an IPAdapterModelLoader: its file's state."""
    from sdengine.io.paths import file_state

    try:
        size, mtime = file_state(Path(ctx.catalog.resolve_ip_adapter(inputs.get("ipadapter_file"))))
        return f"{size}:{mtime}"
    except Exception:  # noqa: BLE001 - a name that does not resolve fails when the node runs, with its own line
        return ""


def layer_scales(
    weight_type: str, weight: float, places: list[tuple[str, int]], sdxl: bool, widths: list[int], scaling: str
) -> tuple[float, ...] | None:
    """The pack's weight of each cross-attention layer (``places``: its block kind and ComfyUI transformer index,
    :func:`sdengine.nn.ip_adapter.transformer_places`), None where every layer takes ``weight`` ("linear" without a
    C penalty). The ease rules run over ``L`` = 11 (SDXL) or 16 transformers: "ease in" ``0.05 + 0.95 (1 - t/L)``,
    "ease out" ``0.05 + 0.95 t/L``, "ease in-out" ``0.05 + 0.95 (1 - |t - L/2| / (L/2))``, "reverse in-out"
    ``0.05 + 0.95 |t - L/2| / (L/2)``; "weak input/middle/output" 0.2 on those blocks, "strong middle" 0.2 on the
    input and output blocks; the style / composition types the weight on their transformers only (composition
    SD 1.x: 0.25 on transformer 4; "style and composition" with the composition weight 1). The "w/ C penalty"
    scalings multiply each layer by its width over 1280."""
    n = 11 if sdxl else 16
    w = float(weight)
    out: list[float] = []
    for kind, t in places:
        if weight_type == "linear":
            v = w
        elif weight_type == "ease in":
            v = w * (0.05 + 0.95 * (1 - t / n))
        elif weight_type == "ease out":
            v = w * (0.05 + 0.95 * (t / n))
        elif weight_type == "ease in-out":
            v = w * (0.05 + 0.95 * (1 - abs(t - n / 2) / (n / 2)))
        elif weight_type == "reverse in-out":
            v = w * (0.05 + 0.95 * (abs(t - n / 2) / (n / 2)))
        elif weight_type in ("weak input", "weak middle", "weak output"):
            v = w * 0.2 if kind == weight_type.split()[1] else w
        elif weight_type == "strong middle":
            v = w * 0.2 if kind in ("input", "output") else w
        else:
            table: dict[int, float]
            if weight_type == "style transfer":
                table = dict.fromkeys(_STYLE[sdxl], w)
            elif weight_type == "composition":
                table = {3: w} if sdxl else {4: w * 0.25, 5: w}
            elif weight_type == "strong style transfer":
                table = dict.fromkeys(_STRONG_STYLE[sdxl], w)
            elif weight_type == "style and composition":  # the Advanced node's weight_composition: 1.0
                table = {3: 1.0, 6: w} if sdxl else {**dict.fromkeys(_STYLE[False], w), 4: 0.25, 5: 1.0}
            else:
                raise NodeError(f"weight_type {weight_type!r} is not supported; use one of {', '.join(WEIGHT_TYPES)}")
            v = table.get(t, 0.0)
        out.append(v)
    if scaling.endswith("w/ C penalty"):
        out = [v * c / 1280.0 for v, c in zip(out, widths, strict=True)]
    elif weight_type == "linear":
        return None
    return tuple(out)


def _to_size(t: torch.Tensor, n: int) -> torch.Tensor:
    """The pack's tensor_to_size: ``t``'s rows repeated (its last one) or cut to ``n``."""
    if t.shape[0] < n:
        return torch.cat([t, t[-1:].expand(n - t.shape[0], *t.shape[1:])])
    return t[:n]


def _combine(x: torch.Tensor, how: str) -> torch.Tensor:
    """The pack's combine_embeds of several images' encodings (dim 0) into one (kept as a row of 1)."""
    if how == "add":
        return x.sum(dim=0, keepdim=True)
    if how == "subtract":
        return (x[0] - x[1:].mean(dim=0)).unsqueeze(0)
    if how == "average":
        return x.mean(dim=0, keepdim=True)
    return (x / torch.norm(x, dim=0, keepdim=True)).mean(dim=0, keepdim=True)  # "norm average"


def ipadapter_advanced(
    ctx: RunContext,
    model: ModelHandle,
    ipadapter: Any,
    image: torch.Tensor,
    weight: float = 1.0,
    weight_type: str = "linear",
    combine_embeds: str = "concat",
    start_at: float = 0.0,
    end_at: float = 1.0,
    embeds_scaling: str = "V only",
    image_negative: torch.Tensor | None = None,
    attn_mask: Any = None,
    clip_vision: Any = None,
) -> tuple[Any]:
    """The pack's IPAdapterAdvanced: the model with one more IP-Adapter unit (module docstring)."""
    from sdengine.errors import SdengineError
    from sdengine.nn.ip_adapter import check_fits, transformer_places
    from sdengine.pipeline.ip_adapter import IPAdapterUnit, check_encoder

    if not isinstance(model, ModelHandle):
        raise NodeError("model must come from a checkpoint loader")
    if isinstance(ipadapter, UnifiedPipeline):  # the pack: the pipeline's encoder unless one is connected
        clip_vision = ipadapter.clip_vision if clip_vision is None else clip_vision
        ipadapter = ipadapter.ipadapter
    if not isinstance(ipadapter, IPAdapterHandle):
        raise NodeError("ipadapter must come from IPAdapterModelLoader or IPAdapterUnifiedLoader")
    if clip_vision is None:
        raise NodeError(
            "Missing CLIPVision model: connect a CLIPVisionLoader to clip_vision (sdengine has no "
            "IPAdapterUnifiedLoader)"
        )
    if not isinstance(clip_vision, ClipVisionHandle):
        raise NodeError("clip_vision must come from CLIPVisionLoader")
    if attn_mask is not None:
        raise NodeError("attn_mask is not supported by sdengine's IPAdapter nodes: leave it unconnected")
    for what, value, allowed in (
        ("weight_type", weight_type, WEIGHT_TYPES),
        ("combine_embeds", combine_embeds, COMBINE_EMBEDS),
        ("embeds_scaling", embeds_scaling, EMBEDS_SCALING),
    ):
        if value not in allowed:
            raise NodeError(f"{what} {value!r} is not supported; use one of: {', '.join(allowed)}")
    pipe = ctx.pipeline(model.ref)
    unet = pipe.unet
    adapter = ipadapter_model(ctx, ipadapter, getattr(pipe, "device", "cpu"), getattr(pipe, "dtype", None))
    encoder = clip_vision_model(ctx, clip_vision.path, clip_vision.name)
    try:
        check_encoder(encoder, adapter)
    except SdengineError as e:
        raise NodeError(str(e)) from None
    plus = adapter.reads_hidden_states
    key = "penultimate_hidden_states" if plus else "image_embeds"
    embeds = clip_vision_encode(ctx, clip_vision, image, "center")[0][key]
    n = int(embeds.shape[0])
    if image_negative is not None:
        negative = clip_vision_encode(ctx, clip_vision, image_negative, "center")[0][key]
    elif plus:  # the pack: a black picture of the encoder's size
        size = clip_vision.image_size
        negative = clip_vision_encode(ctx, clip_vision, torch.zeros(1, size, size, 3), "center")[0][key]
    else:
        negative = torch.zeros_like(embeds)
    negative = _to_size(negative, n)
    if combine_embeds != "concat" and n > 1:
        embeds, negative = _combine(embeds, combine_embeds), negative[:1]
    sdxl = int(adapter.to_k_ip[0].weight.shape[1]) == 2048  # the pack's rule: the text width of its projections
    widths = [int(k.weight.shape[0]) for k in adapter.to_k_ip]
    try:
        check_fits(unet, IPAdapterUnit(adapter, embeds.unsqueeze(0)).layers())
        scales = layer_scales(weight_type, float(weight), transformer_places(unet), sdxl, widths, embeds_scaling)
        scaling = {"V only": "output", "K+V": "kv", "K+V w/ C penalty": "kv"}.get(embeds_scaling, "k_mean_v")
        unit = IPAdapterUnit(
            adapter,
            embeds.unsqueeze(0),  # one row of the images: every row of the batch takes them (tokens side by side)
            float(weight),
            negative.unsqueeze(0),
            start=float(start_at),
            end=float(end_at),
            layer_scales=scales,
            scaling=scaling,
        )
        unit.check()
    except SdengineError as e:
        raise NodeError(str(e)) from None
    return (replace(model, ip_adapters=(*model.ip_adapters, unit)),)


def ipadapter_unified_loader(
    ctx: RunContext, model: ModelHandle, preset: str, ipadapter: Any = None
) -> tuple[Any, Any]:
    """The pack's IPAdapterUnifiedLoader: the CLIP vision encoder and the adapter of ``preset`` found by the pack's
    file-name rules in ``--clip-vision-dir`` and ``--ip-adapters-dir`` (the first listed name that matches; the
    adapter's rule by the model's family), both read here; the model passes through. ``ipadapter`` (an earlier
    unified loader's pipeline, which the pack reuses loaded models from) changes nothing here: sdengine keeps
    loaded models per worker anyway."""
    if not isinstance(model, ModelHandle):
        raise NodeError("model must come from a checkpoint loader")
    if ipadapter is not None and not isinstance(ipadapter, UnifiedPipeline | IPAdapterHandle):
        raise NodeError("ipadapter must come from an IPAdapter loader")
    if preset not in PRESETS:
        raise NodeError(f"preset {preset!r} is not offered; use one of: {', '.join(PRESETS)}")
    cv_rule, sd15_rules, sdxl_rule = PRESETS[preset]
    cv_name = _first_match([e.name for e in ctx.catalog.clip_visions()], cv_rule)
    if cv_name is None:
        raise NodeError(f"ClipVision model not found: no file of --clip-vision-dir matches {preset!r}'s {cv_rule!r}")
    sdxl = getattr(getattr(ctx.pipeline(model.ref), "conditioner", None), "kind", None) == "sdxl"
    if sdxl and sdxl_rule is None:
        raise NodeError(f"the {preset.split(' ')[0].lower()} preset's model is not supported for SDXL")
    names = [e.name for e in ctx.catalog.ip_adapters()]
    rules = (sdxl_rule,) if sdxl and sdxl_rule is not None else sd15_rules
    ipa_name = next((n for n in (_first_match(names, r) for r in rules) if n is not None), None)
    if ipa_name is None:
        raise NodeError(f"IPAdapter model not found: no file of --ip-adapters-dir matches {preset!r}'s {rules[0]!r}")
    from sdengine.server.comfy.nodes_clip_vision import clip_vision_loader

    (cv,) = clip_vision_loader(ctx, cv_name)
    (handle,) = ipadapter_model_loader(ctx, ipa_name)
    return (model, UnifiedPipeline(cv, handle))


def unified_files_token(ctx: RunContext, inputs: dict[str, Any]) -> str:
    """The executor's cache token of an IPAdapterUnifiedLoader: the two folders' listings (a file added or replaced
    may change what a preset picks)."""
    from sdengine.io.paths import file_state

    try:
        parts = []
        for entries, resolve in (
            (ctx.catalog.clip_visions(), ctx.catalog.resolve_clip_vision),
            (ctx.catalog.ip_adapters(), ctx.catalog.resolve_ip_adapter),
        ):
            for e in entries:
                size, mtime = file_state(Path(resolve(e.name)))
                parts.append(f"{e.name}:{size}:{mtime}")
        return "|".join(parts)
    except Exception:  # noqa: BLE001 - the node says what is wrong when it runs
        return ""


def ipadapter_simple(
    ctx: RunContext,
    model: ModelHandle,
    ipadapter: Any,
    image: torch.Tensor,
    weight: float = 1.0,
    start_at: float = 0.0,
    end_at: float = 1.0,
    weight_type: str = "standard",
    attn_mask: Any = None,
) -> tuple[Any]:
    """The pack's IPAdapter node: IPAdapterAdvanced with the unified loader's pipeline (its CLIP vision encoder and
    adapter), its weight types mapped as the pack maps them ("standard": linear, "prompt is more important": ease
    out, "style transfer"), the images concatenated, "V only". An IPAdapterModelLoader's IPADAPTER (no encoder in it)
    is refused, as the pack refuses it."""
    if weight_type not in SIMPLE_WEIGHT_TYPES:
        raise NodeError(f"weight_type {weight_type!r}: use one of {', '.join(SIMPLE_WEIGHT_TYPES)}")
    if not isinstance(ipadapter, UnifiedPipeline):
        raise NodeError(
            "CLIPVision model not present in the pipeline: IPAdapter takes IPAdapterUnifiedLoader's pipeline; with "
            "IPAdapterModelLoader use IPAdapterAdvanced and a CLIPVisionLoader on its clip_vision input"
        )
    mapped = {"standard": "linear", "prompt is more important": "ease out"}.get(weight_type, "style transfer")
    return ipadapter_advanced(
        ctx, model, ipadapter.ipadapter, image, weight, mapped, "concat", start_at, end_at, "V only",
        attn_mask=attn_mask, clip_vision=ipadapter.clip_vision,
    )  # fmt: skip


_APPLY_COMMON = (
    Input("start_at", "FLOAT", 0.0, 0.0, 1.0, 0.001),
    Input("end_at", "FLOAT", 1.0, 0.0, 1.0, 0.001),
)

IPADAPTER_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "IPAdapterModelLoader",
            "IPAdapter Model Loader",
            "ipadapter/loaders",
            (Input("ipadapter_file", "COMBO", choices=_names),),
            ("IPADAPTER",),
            ipadapter_model_loader,
            description="An IP-Adapter file of --ip-adapters-dir (plain, Plus, full face; SD 1.x / SDXL), "
            "ComfyUI_IPAdapter_plus's loader.",
            changed=ipadapter_file_token,
        ),
        NodeDef(
            "IPAdapterUnifiedLoader",
            "IPAdapter Unified Loader",
            "ipadapter",
            (
                Input("model", "MODEL"),
                Input("preset", "COMBO", next(iter(PRESETS)), choices=tuple(PRESETS)),
                Input("ipadapter", "IPADAPTER", optional=True),
            ),
            ("MODEL", "IPADAPTER"),
            ipadapter_unified_loader,
            output_names=("model", "ipadapter"),
            description="ComfyUI_IPAdapter_plus's unified loader: the CLIP vision encoder and the IP-Adapter of the "
            "preset, found by the pack's file-name rules in --clip-vision-dir and --ip-adapters-dir "
            "(CLIP-ViT-H-14-laion2B-s32B-b79K, ip-adapter_sd15, ip-adapter-plus_sd15, ...).",
            changed=unified_files_token,
        ),
        NodeDef(
            "IPAdapterAdvanced",
            "IPAdapter Advanced",
            "ipadapter",
            (
                Input("model", "MODEL"),
                Input("ipadapter", "IPADAPTER"),
                Input("image", "IMAGE"),
                Input("weight", "FLOAT", 1.0, -1.0, 5.0, 0.05),
                Input("weight_type", "COMBO", "linear", choices=WEIGHT_TYPES),
                Input("combine_embeds", "COMBO", "concat", choices=COMBINE_EMBEDS),
                *_APPLY_COMMON,
                Input("embeds_scaling", "COMBO", "V only", choices=EMBEDS_SCALING),
                Input("image_negative", "IMAGE", optional=True),
                Input("attn_mask", "MASK", optional=True),
                Input("clip_vision", "CLIP_VISION", optional=True),
            ),
            ("MODEL",),
            ipadapter_advanced,
            description="ComfyUI_IPAdapter_plus's IPAdapterAdvanced: the images encoded by clip_vision (required "
            "in sdengine) into an IP-Adapter on the model's cross-attention, with the pack's weight types (not the "
            "'precise' ones), combine_embeds, embeds_scaling and start_at / end_at sigma window; attn_mask is "
            "refused. Chained nodes add up.",
        ),
        NodeDef(
            "IPAdapter",
            "IPAdapter",
            "ipadapter",
            (
                Input("model", "MODEL"),
                Input("ipadapter", "IPADAPTER"),
                Input("image", "IMAGE"),
                Input("weight", "FLOAT", 1.0, -1.0, 3.0, 0.05),
                *_APPLY_COMMON,
                Input("weight_type", "COMBO", "standard", choices=SIMPLE_WEIGHT_TYPES),
                Input("attn_mask", "MASK", optional=True),
            ),
            ("MODEL",),
            ipadapter_simple,
            description="ComfyUI_IPAdapter_plus's simple IPAdapter node: IPAdapterUnifiedLoader's pipeline on the "
            "model; weight_type 'standard' is linear, 'prompt is more important' ease out.",
        ),
    )
}

__all__ = [
    "COMBINE_EMBEDS",
    "EMBEDS_SCALING",
    "IPADAPTER_NODES",
    "WEIGHT_TYPES",
    "PRESETS",
    "IPAdapterHandle",
    "UnifiedPipeline",
    "forget_ipadapters",
    "ipadapter_advanced",
    "ipadapter_model",
    "ipadapter_model_loader",
    "ipadapter_simple",
    "ipadapter_unified_loader",
    "layer_scales",
]
