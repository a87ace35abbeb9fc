"""ComfyUI's nodes for Stable Diffusion 3 / 3.5 and FLUX.1: their loaders, text encoders, latents and schedules.

SD3 (Esser et al. 2024) and Flux are rectified-flow models (docs/flow-matching.md): a transformer predicts the
velocity ``v = noise - x0`` on the straight path ``x_s = (1 - s) x0 + s noise``. ComfyUI runs them through the same
nodes as the U-Nets, and so does sdengine:

* MODEL: CheckpointLoaderSimple on an SD3 single file or a Flux all-in-one checkpoint (the pipeline the server
  loads), or UNETLoader ("Load Diffusion Model") on a transformer file alone (``--models-dir``'s
  ``diffusion_models/`` or ``unet/``), loaded here and kept for the next prompts. ModelSamplingSD3 / ModelSamplingFlux
  set the schedule: ComfyUI's ModelSamplingDiscreteFlow (SD3: shift 3 by default, a 1000-entry table) and
  ModelSamplingFlux (FLUX.1 [dev]: ``mu`` 1.15 by default, or the node's size rule; a 10000-entry table);
  FLUX.1 [schnell] is unshifted (ComfyUI's FLOW model type).
* CLIP: the checkpoint's, or DualCLIPLoader (type ``sd3``: CLIP-L + bigG; ``flux``: CLIP-L + T5-XXL) /
  TripleCLIPLoader (CLIP-L, bigG, T5-XXL) on ``--models-dir``'s ``text_encoders/`` or ``clip/``; encoded by the
  pipelines' own conditioners (:class:`sdengine.text.sd3_conditioner.SD3Conditioner`,
  :class:`sdengine.text.flux_conditioner.FluxConditioner`), so CLIPTextEncode gives what the Python pipeline
  gives. CLIPTextEncodeSD3 and CLIPTextEncodeFlux give each encoder its own text; FluxGuidance sets FLUX.1 [dev]'s
  distilled guidance (3.5 where none is set, as ComfyUI).
* LATENT: a 16-channel latent holds the VAE's raw latents, as ComfyUI's (its ``process_in`` / ``process_out``,
  ``(z - shift) * scale``, run inside the sampler: SD3 1.5305 / 0.0609, Flux 0.3611 / 0.1159; an all-zero latent
  is not shifted). EmptySD3LatentImage makes zeros of 16 x (height / 8) x (width / 8); VAEDecode / VAEEncode with
  a 16-channel VAE (the checkpoint's, or VAELoader's ``ae.safetensors`` / SD3's VAE) read and write raw latents.
* Sampling: KSampler, KSamplerAdvanced, SamplerCustom and SamplerCustomAdvanced (with BasicScheduler, KSamplerSelect,
  RandomNoise, CFGGuider / BasicGuider) walk ComfyUI's sigma lists on the flow table
  (:func:`sdengine.latent_sampling.flow_sigmas`) with :func:`sdengine.latent_sampling.sample_flow_latents`; a
  latent's noise mask (SetLatentNoiseMask) inpaints as ComfyUI's KSamplerX0Inpaint.

* ControlNets: ControlNetLoader on an SD3 / Flux / Qwen-Image ControlNet (a diffusers folder or one
  ``.safetensors`` in diffusers' names, :mod:`sdengine.control.dit_files`), ControlNetApplyAdvanced with its ``vae``
  (or ComfyUI's deprecated ControlNetApplySD3), SetUnionControlNetType for a Flux Union ControlNet and
  ControlNetInpaintingAliMamaApply for an SD3 / Qwen-Image inpainting ControlNet (its MASK prepared as the pipeline
  does; Qwen-Image's by ComfyUI's rules, :mod:`sdengine.server.comfy.qwen_control`): the
  sampler runs the transformer with the ControlNets' residuals as the Python pipeline does
  (:mod:`sdengine.pipeline.dit_control`: the hint encoded by the given VAE, its posterior's mean scaled in), each
  unit acting at the model calls whose sigma lies in its start/end window (ComfyUI's percent_to_sigma rule, judged
  at every call).

* FLUX.1 Kontext: ReferenceLatent puts a LATENT's raw samples on the conditioning (chained: several); the sampler
  hands them, scaled in, to the Flux transformer, whose tokens after the image's they become
  (:mod:`sdengine.pipeline.flux_kontext`); FluxKontextImageScale fits a picture to the nearest Kontext resolution.

LoraLoader's LoRAs apply to SD3's MMDiT and CLIP encoders, to Flux's transformer, CLIP-L and T5, and to Chroma's
transformer and T5 as the pipelines apply them. What does not apply to these models is refused with one line: the
U-Net's model patches (FreeU, PAG, SAG, RescaleCFG, Deep Shrink, HyperTile, IP-Adapter, merges,
ModelSamplingDiscrete), U-Net ControlNets and T2I-Adapters, regional conditioning, the guiders over three
conditionings, the samplers that are not right on flow models (ddim, lcm, ddpm, dpm_fast, ...). UNETLoader's
weight_dtype (fp8 storage) is honoured: :mod:`sdengine.nn.fp8_storage`.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import (
    DIFFUSION_MODEL_REF,
    DISCARD_PENULTIMATE_SAMPLERS,
    SAMPLER_NAMES,
    SAMPLER_OPTIONS,
    TEXT_ENCODERS_REF,
    ClipHandle,
    Input,
    ModelHandle,
    NodeDef,
    NodeError,
    RunContext,
)

FLOW_FAMILIES = ("sd3", "flux")
# ComfyUI's latent formats (comfy/latent_formats.py SD3 and Flux): model latents = (raw - shift) * scale
LATENT_FORMATS: dict[str, tuple[float, float]] = {
    "sd3": (1.5305, 0.0609),
    "flux": (0.3611, 0.1159),
    "chroma": (0.3611, 0.1159),  # ComfyUI's Chroma: Flux's latent format
    "z_image": (0.3611, 0.1159),  # ComfyUI's ZImage (Lumina2): Flux's latent format
}
FLOW_CHANNELS = 16
FLUX2_CHANNELS = 128  # FLUX.2's latent (nodes_flux2): the VAE's 32 channels in 2x2 patches
LATENT_FACTOR = 8  # EmptySD3LatentImage's: width // 8 x height // 8, whatever the VAE
SD3_SHIFT = 3.0  # ComfyUI's SD3 / SD3.5 sampling settings (ModelSamplingDiscreteFlow)
FLUX_DEV_MU = 1.15  # ComfyUI's FLUX.1 [dev] sampling settings (ModelSamplingFlux's shift, Flux's mu)
FLUX_GUIDANCE = 3.5  # ComfyUI's Flux: the distilled guidance where a conditioning sets none
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
CLIP_TYPES = ("sd3", "flux")
CLIP_LOADER_TYPES = (
    "chroma",
    "qwen_image",
    "lumina2",  # Qwen3-4B: ComfyUI's Z-Image text encoder (its templates' type)
    "flux2",  # Qwen3 / Mistral Small 3: FLUX.2 [klein]'s / [dev]'s text encoder (nodes_flux2)
)  # CLIPLoader's types run here (ComfyUI's list is longer: the others are refused)
MAX_FLOAT = 100.0
SIDE_MAX = 16384


def preview_map(family: str) -> Any:
    """The live previews' latent -> RGB map of a family's sampling latent: ComfyUI's latent format's factors, which
    its previewer applies in the space ComfyUI samples (``_raw_in``'s), the space of sdengine's pipelines too."""
    from sdengine import vae_utils

    if family == "sd3":
        return vae_utils.SD3_LATENT_RGB
    if family == "qwen_image":  # ComfyUI's Wan21 format
        return vae_utils.QWEN_IMAGE_LATENT_RGB
    if family == "flux2":  # ComfyUI's Flux2 format (32 rows, the 128 channels laid out as 32 at twice the size)
        return vae_utils.FLUX2_LATENT_RGB
    return vae_utils.FLUX_LATENT_RGB  # Flux, Chroma and Z-Image: ComfyUI's Flux format


def nodes_flux2_factor(family: str) -> int:
    """Pixels per latent pixel of a family's LATENT (EmptyFlux2LatentImage's 16 for FLUX.2, else 8)."""
    return 16 if family == "flux2" else LATENT_FACTOR


def _family_of_pipe(pipe: Any) -> str | None:
    kind = getattr(pipe, "text_kind", None)
    return kind if kind in FLOW_FAMILIES else None


def _device_dtype(ctx: RunContext) -> tuple[torch.device, torch.dtype]:
    """Where the parts loaded here run: the worker's device; float32 on the CPU, bfloat16 on a GPU (the transformers'
    and T5's working precision)."""
    dev = torch.device(ctx.device)
    return dev, (torch.float32 if dev.type == "cpu" else torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Parts loaded apart from a pipeline (UNETLoader, the CLIP loaders), kept for the next prompts
# ---------------------------------------------------------------------------------------------------

_PARTS: dict[tuple[str, str], tuple[tuple[Any, ...], Any]] = {}  # (kind, device) -> (key, the loaded part)
_PARTS_LOCK = threading.Lock()


def _cached(kind: str, device: str, key: tuple[Any, ...], load: Callable[[], Any]) -> Any:
    """``load()`` once per ``key`` (its files and dtype) and file state; one part of each ``kind`` (a transformer, a
    set of text encoders) is kept per device, the one before freed before the next loads (each may be many GB)."""
    from sdengine.io.paths import file_state

    # a file replaced under the same name is loaded again: its state (size, time) is part of the key
    files = [p for p in key if isinstance(p, str) and Path(p).is_absolute() and Path(p).exists()]
    full = (*key, *(s for p in files for s in file_state(p)))
    slot = (kind, device)
    with _PARTS_LOCK:
        held = _PARTS.get(slot)
        if held is not None and held[0] == full:
            return held[1]
        _PARTS.pop(slot, None)
    value = load()
    with _PARTS_LOCK:
        _PARTS[slot] = (full, value)
    return value


def forget_parts() -> None:
    """Drop the transformers and text encoders kept here (what a test does between graphs)."""
    with _PARTS_LOCK:
        _PARTS.clear()


def _load_transformer(
    path: Path, dev: torch.device, dtype: torch.dtype, stored: torch.dtype | None = None
) -> tuple[str, Any]:
    """(family, network) of a diffusion-model file: a Flux transformer (BFL's / ComfyUI's names) or SD3's MMDiT;
    ``stored``: its weights held in that float8 dtype (UNETLoader's weight_dtype, :mod:`sdengine.nn.fp8_storage`)."""
    from sdengine.nn.fp8_storage import to_storage
    from sdengine.pipeline.chroma_loading import is_chroma_file
    from sdengine.pipeline.flux2_loading import is_flux2_file
    from sdengine.pipeline.flux_loading import is_flux_file
    from sdengine.pipeline.z_image_loading import is_z_image_file
    from sdengine.weights.sd3_files import is_sd3_file

    if is_flux2_file(path):  # FLUX.2 [klein] (BFL's / ComfyUI's names): before FLUX.1's, whose names it shares
        from sdengine.server.comfy import nodes_flux2

        flux2 = nodes_flux2.load_transformer(path, dev, dtype)
        if stored is not None:
            to_storage(flux2, stored)
        return "flux2", flux2
    if is_z_image_file(path):  # ComfyUI's z_image_*.safetensors: the original names (or diffusers'), prefix or not
        from sdengine.server.comfy.nodes_z_image import load_transformer

        z_image = load_transformer(path, dev, dtype)
        if stored is not None:
            to_storage(z_image, stored)
        return "z_image", z_image
    if is_chroma_file(path):  # before Flux's: a Chroma file has Flux's block names too
        from sdengine.weights.chroma_file import load_chroma_transformer

        chroma = load_chroma_transformer(path, device=dev, dtype=dtype).eval().requires_grad_(False)
        if stored is not None:
            to_storage(chroma, stored)
        return "chroma", chroma
    if is_flux_file(path):
        from sdengine.weights.flux_file import load_flux_transformer

        net = load_flux_transformer(path, device=dev, dtype=dtype).eval().requires_grad_(False)
        if stored is not None:
            to_storage(net, stored)
        return "flux", net
    if is_sd3_file(path):
        from sdengine.weights.mmdit_file import load_mmdit

        mmdit = load_mmdit(path, device=dev, dtype=dtype)
        if stored is not None:
            to_storage(mmdit, stored)
        return "sd3", mmdit
    from sdengine.pipeline.qwen_image_loading import is_qwen_image_file

    if is_qwen_image_file(path):  # ComfyUI's qwen_image_*.safetensors: diffusers' names, its prefix or not
        from sdengine.weights.qwen_image_file import load_qwen_image_transformer

        qwen = load_qwen_image_transformer(path, device=dev, dtype=dtype).eval().requires_grad_(False)
        if stored is not None:
            to_storage(qwen, stored)
        return "qwen_image", qwen
    raise NodeError(
        f"{path.name} is neither a Flux / Chroma transformer (double_blocks.*), SD3's MMDiT (joint_blocks.*), a "
        "Qwen-Image transformer (img_in, txt_in, txt_norm) nor a Z-Image one (cap_pad_token, layers.*): UNETLoader "
        "loads those here (an SD 1.x/SDXL U-Net loads with CheckpointLoaderSimple)"
    )


def _transformer(ctx: RunContext, model: ModelHandle) -> tuple[str, Any]:
    from sdengine.nn.fp8_storage import storage_dtype

    dev, dtype = _device_dtype(ctx)
    path = Path(model.diffusion_model)
    try:
        stored = storage_dtype(model.weight_dtype)  # fp8_e4m3fn_fast: storage alone, ComfyUI's own fallback
        return _cached(
            "transformer",
            str(dev),
            (str(path), str(dtype), str(stored)),
            lambda: _load_transformer(path, dev, dtype, stored),
        )
    except NodeError:
        raise
    except (OSError, SdengineError) as e:
        raise NodeError(f"{path.name}: {str(e).splitlines()[0]}") from None


def _is_t5_file(path: Path) -> bool:
    from sdengine.weights.io import read_safetensors_header

    names, _, _ = read_safetensors_header(path)
    return any(".block.0.layer.0." in n or n.endswith("shared.weight") for n in names)


def _clip_width(path: Path) -> int | None:
    """The hidden width of a CLIP text encoder file (768 CLIP-L, 1280 bigG), from its token embedding's shape."""
    from sdengine.weights.io import read_safetensors_header

    names, _, _ = read_safetensors_header(path)
    for n, info in names.items():
        if n.endswith("embeddings.token_embedding.weight"):
            shape = info.get("shape") if isinstance(info, dict) else None
            return int(shape[1]) if shape else None
    return None


def _roles(paths: list[Path], clip_type: str, node: str) -> tuple[tuple[str, str], ...]:
    """Which of ``paths`` is CLIP-L, bigG and T5-XXL: T5 by its names, the CLIP files in the order given (CLIP-L
    first) unless their widths (768 / 1280) say otherwise, as ComfyUI tells them apart by their contents."""
    t5 = [p for p in paths if _is_t5_file(p)]
    clips = [p for p in paths if p not in t5]
    if len(t5) > 1:
        raise NodeError(f"{node}: {', '.join(p.name for p in t5)} are all T5 encoders; give one")
    if len(clips) == 2 and _clip_width(clips[0]) == 1280 and _clip_width(clips[1]) == 768:
        clips.reverse()
    roles: list[tuple[str, str]] = []
    if clip_type == "flux":
        if len(clips) != 1 or len(t5) != 1:
            raise NodeError(f"{node} type flux takes CLIP-L and T5-XXL (clip_l.safetensors, t5xxl_*.safetensors)")
        return (("clip_l", str(clips[0])), ("t5xxl", str(t5[0])))
    if len(clips) != 2:
        raise NodeError(
            f"{node} type sd3 needs CLIP-L and OpenCLIP bigG (clip_l.safetensors, clip_g.safetensors), T5-XXL "
            f"optional; got {len(clips)} CLIP file(s)"
        )
    roles += [("clip_l", str(clips[0])), ("clip_g", str(clips[1]))]
    if t5:
        roles.append(("t5xxl", str(t5[0])))
    return tuple(roles)


def _build_conditioner(clip: ClipHandle, dev: torch.device, dtype: torch.dtype) -> Any:
    from sdengine.pipeline.loading import clip_pad_token_id, clip_tokenizer
    from sdengine.text.t5_tokenizer import load_t5_tokenizer
    from sdengine.weights.t5_file import load_t5_encoder

    files = dict(clip.encoders)
    if clip.clip_type == "qwen_image":
        from sdengine.server.comfy.nodes_qwen import load_text

        return load_text(Path(files["qwen"]), dev, dtype)
    if clip.clip_type == "z_image":
        from sdengine.server.comfy import nodes_z_image

        return nodes_z_image.load_text(Path(files["qwen3"]), dev, dtype)
    if clip.clip_type == "flux2":
        from sdengine.server.comfy import nodes_flux2

        return nodes_flux2.load_clip_text(files, dev, dtype)
    t5 = load_t5_encoder(Path(files["t5xxl"]), device=dev, dtype=dtype) if "t5xxl" in files else None
    if clip.clip_type == "chroma":
        from sdengine.text.chroma_conditioner import ChromaConditioner

        assert t5 is not None
        width = int(t5.config.d_model)
        return ChromaConditioner(
            t5,
            load_t5_tokenizer(None),
            joint_attention_dim=width,
            dtype=dtype,
            device=dev,
            name=Path(files["t5xxl"]).name,
        )
    tok_l = clip_tokenizer(None)
    if clip.clip_type == "flux":
        from sdengine.pipeline.flux_loading import load_clip_l
        from sdengine.text.flux_conditioner import FluxConditioner

        clip_l = load_clip_l(Path(files["clip_l"]), dtype, dev)
        assert t5 is not None
        return FluxConditioner(
            clip_l,
            tok_l,
            t5,
            load_t5_tokenizer(None),
            pad_token_id=clip_pad_token_id(None, tok_l.vocab, "sd1"),
            joint_attention_dim=int(t5.config.d_model),
            pooled_projection_dim=int(clip_l.config.hidden_size),
            guidance=False,  # set by FluxGuidance / CLIPTextEncodeFlux, or at sampling (the model's rule)
            dtype=dtype,
            device=dev,
            name=Path(files["clip_l"]).name,
        )
    from sdengine.text.sd3_conditioner import SD3Conditioner
    from sdengine.weights.sd3_files import load_clip_encoder

    enc_l: Any = load_clip_encoder(files["clip_l"], "clip_l", device=dev, dtype=dtype)
    enc_g: Any = load_clip_encoder(files["clip_g"], "clip_g", device=dev, dtype=dtype)
    tok_g = clip_tokenizer(None)
    # the joint width: T5's; without T5 SD3's (T5-XXL's 4096), fitted to the model's when it samples
    joint = int(t5.config.d_model) if t5 is not None else 4096
    return SD3Conditioner(
        enc_l,
        enc_g,
        tok_l,
        tok_g,
        t5,
        load_t5_tokenizer(None) if t5 is not None else None,
        pad_token_id=clip_pad_token_id(None, tok_l.vocab, "sd1"),
        pad_token_id_2=clip_pad_token_id(None, tok_g.vocab, "sd2"),
        joint_attention_dim=joint,
        pooled_projection_dim=int(enc_l.config.projection_dim) + int(enc_g.config.projection_dim),
        dtype=dtype,
        device=dev,
        name=Path(files["clip_l"]).name,
    )


def clip_conditioner(ctx: RunContext, clip: ClipHandle) -> tuple[str, Any]:
    """(family, conditioner) of a CLIP from the CLIP loaders or a checkpoint (TextEncodeQwenImageEdit's)."""
    return _conditioner(ctx, clip)


def _conditioner(ctx: RunContext, clip: ClipHandle, want: str | None = None) -> tuple[str, Any]:
    """(family, conditioner) of a CLIP from the CLIP loaders or of an SD3 / Flux checkpoint; a node error for
    another model's CLIP, or (``want``: "sd3", "flux") another family's."""
    family: str | None
    if clip.merges:
        raise NodeError("CLIP merges on SD3 / Flux text encoders are not supported here")
    if clip.encoders:
        dev, dtype = _device_dtype(ctx)
        key = (clip.clip_type, *(p for _, p in clip.encoders), str(dtype))
        try:
            family, cond = (
                clip.clip_type,
                _cached("encoders", str(dev), key, lambda: _build_conditioner(clip, dev, dtype)),
            )
        except (OSError, SdengineError) as e:
            raise NodeError(f"text encoders: {str(e).splitlines()[0]}") from None
        name = f"the {clip.clip_type} text encoders'"
    else:
        pipe = ctx.pipeline(clip.ref)
        family, cond = _family_of_pipe(pipe), pipe.conditioner
        name = f"{getattr(pipe, 'name', clip.ref)}'s"
    if want is not None and family != want:
        node, parts = ("CLIPTextEncodeSD3", "SD3's CLIP-L, bigG and T5") if want == "sd3" else (
            "CLIPTextEncodeFlux", "Flux's CLIP-L and T5-XXL")  # fmt: skip
        label = "SD3's" if want == "sd3" else "Flux's"
        raise NodeError(f"{node} encodes with {parts}; {name} CLIP is not {label}")
    if family is None:
        raise NodeError(f"{name} CLIP is not an SD3 or Flux model's")
    return family, cond


def is_flow_clip(ctx: RunContext, clip: ClipHandle) -> bool:
    """Whether ``clip`` is an SD3 / Flux model's (CLIPTextEncode then encodes here)."""
    if clip.encoders:
        return True
    return _family_of_pipe(ctx.pipeline(clip.ref)) is not None


# ---------------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------------


def _diffusion_models(env: Any) -> list[str]:
    listed = getattr(env.catalog, "diffusion_models", None)
    return [e.name for e in listed()] if listed is not None else []


def _text_encoders(env: Any) -> list[str]:
    listed = getattr(env.catalog, "text_encoders", None)
    return [e.name for e in listed()] if listed is not None else []


def unet_loader(ctx: RunContext, unet_name: str, weight_dtype: str) -> tuple[Any]:
    """ComfyUI's UNETLoader ("Load Diffusion Model") on a Flux or SD3 transformer file, loaded now (a broken file
    fails here)."""
    path = ctx.catalog.resolve_diffusion_model(unet_name)
    handle = ModelHandle(DIFFUSION_MODEL_REF + str(path), diffusion_model=str(path), weight_dtype=str(weight_dtype))
    _transformer(ctx, handle)
    return (handle,)


def _clip_loader(ctx: RunContext, names: list[str], clip_type: str, node: str) -> tuple[Any]:
    if clip_type not in CLIP_TYPES:
        raise NodeError(f"{node}: type {clip_type!r} is not supported here; use one of {', '.join(CLIP_TYPES)}")
    paths = [ctx.catalog.resolve_text_encoder(n) for n in names]
    try:
        roles = _roles(paths, clip_type, node)
    except (OSError, SdengineError) as e:
        if isinstance(e, NodeError):
            raise
        raise NodeError(f"{node}: {str(e).splitlines()[0]}") from None
    handle = ClipHandle(TEXT_ENCODERS_REF + ",".join(p for _, p in roles), encoders=roles, clip_type=clip_type)
    _conditioner(ctx, handle)  # load now: a broken file fails at this node
    return (handle,)


def clip_loader(ctx: RunContext, clip_name: str, type: str = "chroma", device: str = "default") -> tuple[Any]:
    """ComfyUI's CLIPLoader with type ``chroma``: T5-XXL alone, encoded as ComfyUI's Chroma text encoder (the
    prompt's pieces and ``</s>``, no padding; see :func:`encode_flow`); type ``qwen_image``: Qwen2.5-VL's language
    model with Qwen2's tokenizer beside its file, encoded as ComfyUI's Qwen-Image text encoder
    (:mod:`sdengine.server.comfy.nodes_qwen`)."""
    if type not in CLIP_LOADER_TYPES:
        raise NodeError(
            f"CLIPLoader: type {type!r} is not supported here; use {', '.join(CLIP_LOADER_TYPES)} (SD3 / Flux: "
            "DualCLIPLoader or TripleCLIPLoader; SD 1.x / SDXL: the checkpoint's CLIP)"
        )
    path = ctx.catalog.resolve_text_encoder(clip_name)
    if type == "flux2":
        from sdengine.server.comfy import nodes_flux2

        handle = nodes_flux2.clip_handle(path)
        try:
            _conditioner(ctx, handle)  # load now: a broken file or a missing tokenizer fails at this node
        except NodeError as e:
            raise NodeError(f"CLIPLoader type flux2: {str(e).removeprefix('text encoders: ')}") from None
        return (handle,)
    if type in ("lumina2", "qwen_image"):
        z_image = _z_image_clip(ctx, path, type)
        if z_image is not None:
            return (z_image,)
    if type == "qwen_image":
        from sdengine.server.comfy.nodes_qwen import is_qwen_text_file

        try:
            qwen = is_qwen_text_file(path)
        except (OSError, SdengineError) as e:
            raise NodeError(f"CLIPLoader: {str(e).splitlines()[0]}") from None
        if not qwen:
            raise NodeError(
                f"CLIPLoader type qwen_image takes Qwen2.5-VL's text encoder (qwen_2.5_vl_7b*.safetensors); "
                f"{path.name} is not one"
            )
        handle = ClipHandle(TEXT_ENCODERS_REF + str(path), encoders=(("qwen", str(path)),), clip_type="qwen_image")
        _conditioner(ctx, handle)  # load now: a broken file or a missing tokenizer fails at this node
        return (handle,)
    try:
        t5 = _is_t5_file(path)
    except (OSError, SdengineError) as e:
        raise NodeError(f"CLIPLoader: {str(e).splitlines()[0]}") from None
    if not t5:
        raise NodeError(f"CLIPLoader type chroma takes a T5-XXL encoder (t5xxl_*.safetensors); {path.name} is not one")
    handle = ClipHandle(TEXT_ENCODERS_REF + str(path), encoders=(("t5xxl", str(path)),), clip_type="chroma")
    _conditioner(ctx, handle)  # load now: a broken file fails at this node
    return (handle,)


def _z_image_clip(ctx: RunContext, path: Path, clip_type: str) -> ClipHandle | None:
    """CLIPLoader on Qwen3-4B: ComfyUI's Z-Image text encoder under any type but flux / flux2 (its templates say
    lumina2; qwen_image too); None for type qwen_image on another file. Under lumina2 Lumina 2's Gemma is refused, and
    any other file in one line by the Qwen3 loader (a Qwen2.5-VL one: its family)."""
    from sdengine.server.comfy import nodes_z_image

    try:
        qwen3 = nodes_z_image.is_qwen3_file(path)
        gemma = clip_type == "lumina2" and not qwen3 and nodes_z_image.is_gemma_file(path)
    except (OSError, SdengineError) as e:
        raise NodeError(f"CLIPLoader: {str(e).splitlines()[0]}") from None
    if clip_type == "lumina2" and not qwen3 and not path.is_dir():
        from sdengine.server.comfy.nodes_qwen import is_qwen_text_file

        if is_qwen_text_file(path):  # Qwen's names without Qwen3's q/k norms: Qwen2.5-VL (Qwen-Image's)
            raise NodeError(
                f"CLIPLoader type lumina2: {path.name} is Qwen2.5-VL (Qwen-Image's text encoder, type qwen_image); "
                "Z-Image reads Qwen3-4B (qwen_3_4b.safetensors)"
            )
    if gemma:
        raise NodeError(
            f"CLIPLoader type lumina2: {path.name} is Gemma 2 (Lumina Image 2.0's text encoder), which is not "
            "supported here; type lumina2 takes Z-Image's Qwen3-4B (qwen_3_4b.safetensors)"
        )
    if not qwen3 and clip_type != "lumina2":
        return None
    handle = ClipHandle(TEXT_ENCODERS_REF + str(path), encoders=(("qwen3", str(path)),), clip_type="z_image")
    try:
        _conditioner(ctx, handle)  # load now: a broken file, another model or a missing tokenizer fails here
    except NodeError as e:
        raise NodeError(f"CLIPLoader type {clip_type}: {str(e).removeprefix('text encoders: ')}") from None
    return handle


def dual_clip_loader(ctx: RunContext, clip_name1: str, clip_name2: str, type: str, device: str = "default") -> Any:
    """ComfyUI's DualCLIPLoader: type ``sd3`` (CLIP-L + bigG, T5's tokens zeros) or ``flux`` (CLIP-L + T5-XXL)."""
    return _clip_loader(ctx, [clip_name1, clip_name2], type, "DualCLIPLoader")


def triple_clip_loader(ctx: RunContext, clip_name1: str, clip_name2: str, clip_name3: str) -> tuple[Any]:
    """ComfyUI's TripleCLIPLoader: SD3's CLIP-L, bigG and T5-XXL."""
    return _clip_loader(ctx, [clip_name1, clip_name2, clip_name3], "sd3", "TripleCLIPLoader")


# ---------------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------------


def _sd3_clip_skip(clip: ClipHandle, cond: Any) -> int:
    """CLIPSetLastLayer on SD3's CLIP encoders: ComfyUI's default reads the penultimate layer (SD3's clip_skip 1);
    -1 the last one, raw (clip_skip 0), ..."""
    if clip.layer is None:
        return 1
    skip = -int(clip.layer) - 1
    try:
        cond.check_clip_skip(skip)
    except SdengineError as e:
        raise NodeError(f"stop_at_clip_layer {clip.layer}: {e}") from None
    return skip


def _sd3_entry(states: torch.Tensor, pooled: torch.Tensor, dtype: torch.dtype) -> Any:
    from sdengine.latent_sampling import TextCondition

    return TextCondition(
        {"crossattn": states.to(dtype), "vector": pooled.to(dtype)}, pooled_width=int(pooled.shape[-1])
    )


def encode_flow(ctx: RunContext, clip: ClipHandle, text: str) -> Any:
    """CLIPTextEncode with an SD3 / Flux CLIP: one conditioning entry, as the pipeline's conditioner encodes a
    prompt (SD3: CLIP-L + bigG states zero-padded, T5's 256 tokens, the two pooled outputs; Flux: T5's states and
    CLIP-L's pooled output)."""
    family, cond = _conditioner(ctx, clip)
    if family == "qwen_image":
        from sdengine.server.comfy.nodes_qwen import text_entry

        return text_entry(clip, cond, str(text))
    if family == "z_image":
        from sdengine.server.comfy import nodes_z_image

        return nodes_z_image.text_entry(clip, cond, str(text))
    if family == "flux2":
        from sdengine.server.comfy import nodes_flux2

        return nodes_flux2.text_entry(clip, cond, str(text))
    with _encoder_loras(clip, cond, family):
        if family == "chroma":
            return _chroma_entry(clip, cond, str(text))
        if family == "sd3":
            states, pooled = cond.text(str(text), _sd3_clip_skip(clip, cond))
            return _sd3_entry(states, pooled, cond.dtype)
        if clip.layer is not None:
            raise NodeError("CLIPSetLastLayer does not apply to Flux (it reads CLIP-L's pooled output)")
        from sdengine.latent_sampling import TextCondition

        out = cond.text(str(text))
        return TextCondition(out, pooled_width=int(out["vector"].shape[-1]))


def _chroma_entry(clip: ClipHandle, cond: Any, text: str) -> Any:
    """ComfyUI's Chroma text encoding (its PixArt T5 encoder and tokenizer, ``comfy/text_encoders/pixart_t5.py``):
    T5's states of the prompt's pieces and ``</s>`` alone, no padding and no mask, every token attended. diffusers'
    ChromaPipeline (and sdengine's) pads to 512 and lets the transformer attend to the first ``<pad>`` as well
    (:data:`sdengine.text.chroma_conditioner.KEPT_PADS`): the one difference. T5 runs with its mask there, so the
    prompt's states are the same; a prompt over 512 tokens is cut at 512 here (ComfyUI takes it whole)."""
    from sdengine.latent_sampling import TextCondition

    if clip.layer is not None:
        raise NodeError("CLIPSetLastLayer does not apply to Chroma (it has no CLIP; T5's last layer is read)")
    min_padding, min_length = clip.t5_options or (0, 0)
    with torch.inference_mode():
        ids, tokens = cond.t5_tokenizer([text], cond.max_sequence_length)
        n = int(torch.as_tensor(tokens)[0].sum())
        total = max(n + int(min_padding), int(min_length))
        if total <= n:
            states, _ = cond.t5_states(text)
            return TextCondition({"crossattn": states[:, :n].to(cond.dtype)})
        if total > cond.max_sequence_length:
            raise NodeError(
                f"T5TokenizerOptions: {total} tokens (the prompt's {n} with min_padding {min_padding} / min_length "
                f"{min_length}) are over the {cond.max_sequence_length} T5 takes here"
            )
        # ComfyUI's tokenizer: the pads after </s> (min_padding, then up to min_length), and T5 run over them with
        # no mask (its PixArt T5 encoder masks nothing), the transformer attending to every token
        param = next(cond.t5.parameters())
        ids_t = torch.as_tensor(ids, dtype=torch.long)[:, :total].to(param.device)
        states = cond.t5(ids_t, torch.ones_like(ids_t)).float()
    return TextCondition({"crossattn": states.to(cond.dtype)})


def t5_tokenizer_options(ctx: RunContext, clip: ClipHandle, min_padding: int, min_length: int) -> tuple[Any]:
    """ComfyUI's T5TokenizerOptions (experimental there): at least ``min_padding`` ``<pad>`` tokens after ``</s>``,
    and pads up to ``min_length`` tokens; read by Chroma's T5 (CLIPLoader type chroma) here."""
    if not clip.encoders or clip.clip_type != "chroma":
        raise NodeError(
            "T5TokenizerOptions applies to Chroma's T5 (CLIPLoader type chroma) here; SD3's and Flux's T5 take "
            "their pipelines' fixed padding"
        )
    if int(min_padding) < 0 or int(min_length) < 0:
        raise NodeError("T5TokenizerOptions: min_padding and min_length must be 0 or more")
    return (replace(clip, t5_options=(int(min_padding), int(min_length))),)


def clip_text_encode_sd3(
    ctx: RunContext, clip: ClipHandle, clip_l: str, clip_g: str, t5xxl: str, empty_padding: str
) -> tuple[Any]:
    """ComfyUI's CLIPTextEncodeSD3: ``clip_l`` to CLIP-L, ``clip_g`` to bigG, ``t5xxl`` to T5 (the CLIP sides
    padded to one chunk count with the empty prompt's chunks). ``empty_padding`` "none" leaves an empty text's
    encoder out in ComfyUI, which sdengine's SD3 conditioning does not do: an empty text there is refused."""
    _, cond = _conditioner(ctx, clip, "sd3")
    texts = {"clip_l": str(clip_l), "clip_g": str(clip_g), "t5xxl": str(t5xxl)}
    if empty_padding == "none" and any(not v.strip() for v in texts.values()):
        empty = ", ".join(k for k, v in texts.items() if not v.strip())
        raise NodeError(
            f"CLIPTextEncodeSD3: {empty} is empty with empty_padding 'none' (ComfyUI then leaves that encoder out, "
            "which is not supported here): give it a text or use empty_padding"
        )
    skip = _sd3_clip_skip(clip, cond)
    with _encoder_loras(clip, cond, "sd3"):
        zl, pl = cond.clip_text(texts["clip_l"], skip)
        zg, pg = cond.clip_text(texts["clip_g"], skip)
        chunks = max(zl.shape[1], zg.shape[1]) // 77
        if zl.shape[1] != zg.shape[1]:
            zl, pl = cond.clip_text(texts["clip_l"], skip, chunks)
            zg, pg = cond.clip_text(texts["clip_g"], skip, chunks)
        wl = int(cond.text_encoder.config.hidden_size)
        pw = int(cond.text_encoder.config.projection_dim)
        clip_states = torch.cat([zl[..., :wl], zg[..., wl:]], dim=-1)
        pooled = torch.cat([pl[..., :pw], pg[..., pw:]], dim=-1)
        t5 = cond.t5_states(texts["t5xxl"]).to(clip_states.device)
        states = torch.cat([clip_states, t5], dim=1)
    return ([_sd3_entry(states, pooled, cond.dtype)],)


def clip_text_encode_flux(ctx: RunContext, clip: ClipHandle, clip_l: str, t5xxl: str, guidance: float) -> tuple[Any]:
    """ComfyUI's CLIPTextEncodeFlux: CLIP-L's pooled output of ``clip_l``, T5's states of ``t5xxl`` and the
    distilled guidance."""
    from sdengine.latent_sampling import TextCondition

    _, cond = _conditioner(ctx, clip, "flux")
    with _encoder_loras(clip, cond, "flux"):
        vector = cond.text(str(clip_l))["vector"]
        states = cond.text(str(t5xxl))["crossattn"]
    out = {"crossattn": states, "vector": vector, "guidance": torch.tensor([float(guidance)])}
    return ([TextCondition(out, pooled_width=int(vector.shape[-1]))],)


def guidance_disabled(g: Any) -> bool:
    """FluxDisableGuidance's mark on an entry's ``guidance`` (ComfyUI's None: the guidance embedding left out)."""
    return isinstance(g, torch.Tensor) and g.numel() > 0 and bool(torch.isnan(g).all())


def flux_disable_guidance(ctx: RunContext, conditioning: list[Any]) -> tuple[Any]:
    """ComfyUI's FluxDisableGuidance: the entries' guidance set to None, so that FLUX.1 [dev]'s transformer adds no
    guidance embedding (here a NaN, which :class:`sdengine.models.flux.TimeTextEmbedding` reads as that, row by
    row); the models without distilled guidance ignore it, as there."""
    g = torch.tensor([float("nan")], dtype=torch.float32)
    return ([replace(c, cond={**c.cond, "guidance": g}) for c in conditioning],)


def flux_guidance(ctx: RunContext, conditioning: list[Any], guidance: float) -> tuple[Any]:
    """ComfyUI's FluxGuidance: FLUX.1 [dev]'s distilled guidance scale on every entry."""
    g = torch.tensor([float(guidance)], dtype=torch.float32)
    return ([replace(c, cond={**c.cond, "guidance": g}) for c in conditioning],)


def reference_latent(ctx: RunContext, conditioning: list[Any], latent: dict[str, Any] | None = None) -> tuple[Any]:
    """ComfyUI's ReferenceLatent: ``latent``'s samples (raw VAE latents) appended to every entry's reference latents
    (chained nodes give several); no latent: the conditioning as it is. FLUX.1 Kontext reads them (the sampler puts
    their tokens after the image's, sdengine.pipeline.flux_kontext); another model refuses them at sampling."""
    if latent is None:
        return (conditioning,)
    z = latent.get("samples")
    if z is None or z.ndim != 4 or z.shape[1] not in (FLOW_CHANNELS, FLUX2_CHANNELS):
        shape = "none" if z is None else tuple(z.shape)
        raise NodeError(
            f"ReferenceLatent: the latent must be a 16-channel VAE latent (VAEEncode of a Flux VAE) or a FLUX.2 one "
            f"(128 channels), got {shape}"
        )
    return ([replace(c, references=(*c.references, z)) for c in conditioning],)


KONTEXT_METHODS = ("offset", "index", "uxo/uno")  # FluxKontextMultiReferenceLatentMethod's choices


def flux_kontext_reference_method(ctx: RunContext, conditioning: list[Any], reference_latents_method: str) -> Any:
    """ComfyUI's FluxKontextMultiReferenceLatentMethod (experimental): how the sampler lays several reference
    latents out (sdengine.models.flux.reference_ids; "uxo/uno" is "uxo")."""
    if reference_latents_method not in KONTEXT_METHODS:
        raise NodeError(
            f"FluxKontextMultiReferenceLatentMethod: unknown method {reference_latents_method!r}; use one of "
            f"{', '.join(KONTEXT_METHODS)}"
        )
    method = "uxo" if "uxo" in reference_latents_method else reference_latents_method
    return ([replace(c, reference_method=method) for c in conditioning],)


def flux_kontext_image_scale(ctx: RunContext, image: torch.Tensor) -> tuple[Any]:
    """ComfyUI's FluxKontextImageScale: the image at the Kontext resolution whose aspect ratio is nearest its own
    (sdengine.pipeline.flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS), cut to that aspect ratio about its centre, then
    PIL's Lanczos (ComfyUI's common_upscale "lanczos", "center")."""
    from sdengine.pipeline.flux_kontext import preferred_resolution
    from sdengine.server.comfy.nodes import image_scale

    if image.ndim != 4 or image.shape[1] < 1 or image.shape[2] < 1:
        raise NodeError(f"FluxKontextImageScale: the image must be (B, H, W, C), got {tuple(image.shape)}")
    width, height = preferred_resolution(int(image.shape[2]), int(image.shape[1]))
    return image_scale(ctx, image, "lanczos", width, height, "center")


def sampling_references(
    family: str, positive: list[Any], negative: list[Any], cfg: float, name: str
) -> tuple[list[torch.Tensor], str]:
    """The reference latents (raw) the run appends and their layout method: the positive's; the negative's must be
    the same where it runs (cfg not 1), as sdengine runs one set of reference tokens for both."""
    pos = [r for c in positive for r in getattr(c, "references", ())]
    neg = [r for c in negative for r in getattr(c, "references", ())]
    methods = {str(getattr(c, "reference_method", None) or "offset") for c in positive}
    method = methods.pop() if len(methods) == 1 else "offset"
    if methods:
        raise NodeError("FluxKontextMultiReferenceLatentMethod: the positive conditioning's entries differ in method")
    if not pos and not neg:
        return [], method
    if family not in ("flux", "qwen_image", "flux2"):  # FLUX.1 Kontext's, Qwen-Image Edit's, klein edit's
        label = {"sd3": "an SD3", "chroma": "a Chroma", "z_image": "a Z-Image"}.get(family, f"a {family}")
        raise NodeError(
            f"ReferenceLatent is FLUX.1 Kontext's; {name} is {label} model (Qwen-Image and FLUX.2 models take them too)"
        )
    runs_negative = float(cfg) != 1.0
    same = len(pos) == len(neg) and all(a is b or torch.equal(a, b) for a, b in zip(pos, neg, strict=True))
    same = same and {str(getattr(c, "reference_method", None) or "offset") for c in negative} <= {method}
    if runs_negative and not same:
        raise NodeError(
            "ReferenceLatent: the negative conditioning's reference latents differ from the positive's; sdengine "
            "runs one set for both at cfg other than 1: give the negative the same ones (ConditioningZeroOut of the "
            "positive keeps them)"
        )
    return pos, method


# ---------------------------------------------------------------------------------------------------
# Latents and the schedule
# ---------------------------------------------------------------------------------------------------


def empty_sd3_latent(ctx: RunContext, width: int, height: int, batch_size: int) -> tuple[Any]:
    """ComfyUI's EmptySD3LatentImage: zeros of 16 x (height / 8) x (width / 8) (SD3's and Flux's VAE)."""
    ctx.check_size(int(width), int(height), int(batch_size))
    b, h, w = int(batch_size), int(height), int(width)
    z = torch.zeros(b, FLOW_CHANNELS, h // LATENT_FACTOR, w // LATENT_FACTOR)
    return ({"samples": z, "size": (b, h, w), "posterior": None, "noise_mask": None},)


def model_sampling_sd3(ctx: RunContext, model: ModelHandle, shift: float) -> tuple[Any]:
    """ComfyUI's ModelSamplingSD3: SD3's flow schedule with this shift (ModelSamplingDiscreteFlow)."""
    return (replace(model, flow_sampling=("sd3", float(shift))),)


def model_sampling_flux(
    ctx: RunContext, model: ModelHandle, max_shift: float, base_shift: float, width: int, height: int
) -> tuple[Any]:
    """ComfyUI's ModelSamplingFlux: Flux's dynamic shift for a ``width`` x ``height`` image, ``mu`` linear in its
    token count (``width * height / 256``): ``base_shift`` at 256 tokens, ``max_shift`` at 4096."""
    tokens = int(width) * int(height) / (LATENT_FACTOR * LATENT_FACTOR * 2 * 2)
    slope = (float(max_shift) - float(base_shift)) / (4096 - 256)
    mu = tokens * slope + (float(base_shift) - slope * 256)
    return (replace(model, flow_sampling=("flux", mu)),)


def skip_layer_guidance_sd3(
    ctx: RunContext, model: ModelHandle, layers: str, scale: float, start_percent: float, end_percent: float
) -> tuple[Any]:
    """ComfyUI's SkipLayerGuidanceSD3: between ``start_percent`` and ``end_percent`` of the schedule, the guided x0
    plus ``scale * (x0_cond - x0_cond with the joint blocks `layers` left out)`` (the block numbers read from the
    text, as ComfyUI: every run of digits)."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", str(layers)))
    if not numbers or float(scale) == 0.0:  # ComfyUI: the model as it was
        return (model,)
    return (replace(model, skip_layer_guidance=(numbers, float(scale), float(start_percent), float(end_percent))),)


def skip_layer_guidance_dit(
    ctx: RunContext,
    model: ModelHandle,
    double_layers: str,
    single_layers: str,
    scale: float,
    start_percent: float,
    end_percent: float,
    rescaling_scale: float,
) -> tuple[Any]:
    """ComfyUI's SkipLayerGuidanceDiT: SkipLayerGuidanceSD3's term with the double (joint) blocks ``double_layers``
    and the single blocks ``single_layers`` left out, then the result times
    ``rescaling_scale * std(x0_cond) / std(result) + (1 - rescaling_scale)``. Single blocks exist on Flux and Chroma
    (SD3's MMDiT has none, so they leave nothing out there, as in ComfyUI); a block the model lacks is a node error
    when it samples."""
    for name, v in (("scale", scale), ("rescaling_scale", rescaling_scale)):
        if not math.isfinite(float(v)):
            raise NodeError(f"SkipLayerGuidanceDiT: {name} must be a finite number, got {v!r}")
    double = tuple(int(n) for n in re.findall(r"\d+", str(double_layers)))
    single = tuple(int(n) for n in re.findall(r"\d+", str(single_layers)))
    if (not double and not single) or float(scale) == 0.0:  # ComfyUI: the model as it was (its term needs scale > 0)
        return (model,)
    slg = (double, float(scale), float(start_percent), float(end_percent), float(rescaling_scale), single)
    return (replace(model, skip_layer_guidance=slg),)


def _schedule(family: str, guidance_embeds: bool, model: ModelHandle) -> Any:
    """The flow schedule ComfyUI samples this model on (see the module docstring)."""
    from sdengine.diffusion.flow import FlowSchedule

    if family == "qwen_image":
        from sdengine.server.comfy import nodes_qwen

        return nodes_qwen.schedule(model)
    if family == "z_image":
        from sdengine.server.comfy import nodes_z_image

        return nodes_z_image.schedule(model)
    if family == "flux2":
        from sdengine.server.comfy import nodes_flux2

        return nodes_flux2.schedule(model)
    if model.flow_sampling:
        from sdengine.server.comfy.nodes_qwen import refuse_aura_flow

        refuse_aura_flow(family, model)
        kind, value = model.flow_sampling
        if kind != family and not (kind == "flux" and family == "chroma"):
            node = "ModelSamplingSD3" if kind == "sd3" else "ModelSamplingFlux"
            raise NodeError(f"{node} is for {kind.upper()} models; this is a {family.upper()} model")
        return FlowSchedule.sd3(value) if kind == "sd3" else FlowSchedule.flux(mu=value)
    if family == "sd3":
        return FlowSchedule.sd3(SD3_SHIFT)
    if family == "chroma":  # ComfyUI's Chroma: ModelSamplingFlux's default shift (mu 1.15)
        return FlowSchedule.flux(mu=FLUX_DEV_MU)
    return FlowSchedule.flux(mu=FLUX_DEV_MU) if guidance_embeds else FlowSchedule(shift=1.0)


def _flow_parts(ctx: RunContext, model: ModelHandle) -> tuple[str, Any, bool, Any]:
    """(family, the latent-sampling FlowModel, whether it takes the distilled guidance, the widths of its token
    states and pooled vector) of a flow MODEL."""
    from sdengine.latent_sampling import FlowModel
    from sdengine.pipeline.flux import FluxAdapter
    from sdengine.pipeline.sd3 import MMDiTAdapter

    if model.diffusion_model:
        family, net = _transformer(ctx, model)
        dev, dtype = _device_dtype(ctx)
        adapter: Any = FluxAdapter(net, dtype) if family == "flux" else MMDiTAdapter(net, dtype)
        if family == "chroma":
            from sdengine.pipeline.chroma import ChromaAdapter

            adapter = ChromaAdapter(net, dtype)
        if family == "qwen_image":
            from sdengine.server.comfy.nodes_qwen import ComfyQwenAdapter

            adapter = ComfyQwenAdapter(net, dtype)
        if family == "z_image":  # ComfyUI's NextDiT: t = 1 - sigma, its output negated (diffusers' call, the same)
            from sdengine.pipeline.z_image import ZImageAdapter

            adapter = ZImageAdapter(net, dtype)
        if family == "flux2":
            from sdengine.pipeline.flux2 import Flux2Adapter

            adapter = Flux2Adapter(net, dtype)
        name = Path(model.diffusion_model).name
    else:
        pipe = ctx.pipeline(model.ref)
        family = _family_of_pipe(pipe) or ""
        net, dev, name, dtype = pipe.unet, pipe.device, pipe.name, pipe.dtype
        adapter = pipe.network_adapter(net)
    guidance = bool(getattr(net.config, "guidance_embeds", False))
    if family == "z_image":  # the caption states' width
        widths = (int(net.config.cap_feat_dim), 0)
    elif family == "flux2":  # Qwen3's stacked states, no pooled vector
        widths = (int(net.config.joint_attention_dim), 0)
    else:
        widths = (int(net.config.joint_attention_dim), int(getattr(net.config, "pooled_projection_dim", 0)))
    skipping = None
    if family == "sd3":  # the MMDiT with blocks left out (SkipLayerGuidanceSD3), through the same adapter

        def skipping(layers: tuple[int, ...], single: tuple[int, ...]) -> Any:
            # SD3's MMDiT has no single blocks: those named leave nothing out (as ComfyUI)
            return MMDiTAdapter(partial(net, skip_layers=layers), dtype) if layers else None

    elif family in ("flux", "chroma"):  # the double / single blocks left out (SkipLayerGuidanceDiT), same adapter

        def skipping(layers: tuple[int, ...], single: tuple[int, ...]) -> Any:
            from sdengine.errors import UsageError

            try:
                net.skip_sets(layers, single)
            except UsageError as e:
                raise NodeError(f"skip-layer guidance: {e}") from None
            skipped = partial(net, skip_layers=layers, skip_single_layers=single)
            if family == "chroma":
                from sdengine.pipeline.chroma import ChromaAdapter

                return ChromaAdapter(skipped, dtype)
            other = FluxAdapter(skipped, dtype, adapter.references)  # FLUX.1 Kontext's references too
            other.reference_method = adapter.reference_method
            return other

    c = int(net.config.in_channels) if family == "flux2" else FLOW_CHANNELS
    flow = FlowModel(adapter, _schedule(family, guidance and family != "flux2", model), c, dev, name, skipping)
    return family, flow, guidance, widths


def _image_input(ctx: RunContext, model: ModelHandle, family: str) -> tuple[str, int]:
    """(kind, fold) of a flow MODEL: "plain", or FLUX.1 Depth / Canny's "control" (the image latent beside the noisy
    one) and Fill's "fill" (the mask too, folded ``fold`` x ``fold`` per latent pixel: 8 for Flux.1's VAE), read off
    the numbers per image token the transformer takes and gives (:func:`sdengine.pipeline.flux_fill.flux_kind`)."""
    net = _transformer(ctx, model)[1] if model.diffusion_model else ctx.pipeline(model.ref).unet
    if family != "flux":
        return "plain", 0
    c_in = int(net.config.in_channels)
    c_out = int(getattr(net.config, "out_channels", None) or c_in)
    if c_in == c_out:
        return "plain", 0
    if c_in == 2 * c_out:
        return "control", 0
    fold = round(math.sqrt(max(c_in - 2 * c_out, 0) / 4))
    if fold < 1 or c_in != 2 * c_out + 4 * fold * fold:
        raise NodeError(
            f"the Flux transformer takes {c_in} numbers per image token and gives {c_out}: neither FLUX.1 "
            f"[dev]/[schnell], Depth/Canny ({2 * c_out}) nor Fill ({2 * c_out} + 4 x a square mask fold)"
        )
    return "fill", fold


CONCAT_KEYS = ("concat", "concat_latent_image", "concat_mask")  # what the editing nodes set on a conditioning


def _fit_batch(x: torch.Tensor, b: int, what: str) -> torch.Tensor:
    if x.shape[0] == b:
        return x
    if x.shape[0] == 1:
        return x.expand(b, *x.shape[1:])
    raise NodeError(f"{what}: a batch of {x.shape[0]} for a latent batch of {b}; give one (or one per row)")


def _bilinear_centred(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``x`` (B, C, H, W) cut about its centre to the aspect of ``w`` x ``h`` and resized bilinearly to it (ComfyUI's
    ``common_upscale(..., "bilinear", "center")``)."""
    h0, w0 = int(x.shape[2]), int(x.shape[3])
    if w0 / h0 > w / h:
        cut = round((w0 - w0 * (w / h) / (w0 / h0)) / 2)
        x = x[:, :, :, cut : w0 - cut]
    elif w0 / h0 < w / h:
        cut = round((h0 - h0 * (w0 / h0) / (w / h)) / 2)
        x = x[:, :, cut : h0 - cut, :]
    return F.interpolate(x, size=(h, w), mode="bilinear")


def flux_concat(
    cond: dict[str, Any], kind: str, fold: int, shape: tuple[int, ...], noise_mask: torch.Tensor | None
) -> torch.Tensor:
    """What a FLUX.1 Depth / Canny (``control``) or Fill (``fill``) transformer reads beside the noisy latent of
    ``shape`` (B, 16, h, w) for one conditioning entry, as ComfyUI's ``Flux.concat_cond``: the entry's image latent
    (InpaintModelConditioning's ``concat_latent_image`` or InstructPixToPixConditioning's ``concat``, a raw VAE
    latent; zeros where it has none) resized (bilinear, centred) to the latent and scaled in (``(z - shift) *
    scale``, zeros too); for Fill then the mask (``concat_mask``, else the latent's noise mask, else all ones), its
    channels averaged, resized (bilinear) to ``fold`` x the latent's sides and folded ``fold`` x ``fold`` into
    channels per latent pixel (channel ``fold * dy + dx``)."""
    b, _, h, w = (int(v) for v in shape)
    image = cond.get("concat_latent_image")
    if image is None:
        image = cond.get("concat")
    if image is None:
        image = torch.zeros(b, FLOW_CHANNELS, h, w)
    image = image.float()
    if image.ndim != 4 or image.shape[1] != FLOW_CHANNELS:
        raise NodeError(
            f"the image latent on the conditioning is {tuple(image.shape)}: FLUX.1 Fill / Depth / Canny read a "
            "16-channel one (encode the image with the Flux VAE)"
        )
    if tuple(image.shape[-2:]) != (h, w):
        image = _bilinear_centred(image, h, w)
    scale, shift = LATENT_FORMATS["flux"]
    image = (_fit_batch(image.cpu(), b, "the image latent") - shift) * scale
    if kind == "control":
        return image
    mask = cond.get("concat_mask", noise_mask)
    if mask is None:
        mask = torch.ones(b, 1, h, w)
    m = mask.float().cpu()
    m = m[None, None] if m.ndim == 2 else m[:, None] if m.ndim == 3 else m
    m = m.mean(dim=1, keepdim=True)
    if tuple(m.shape[-2:]) != (h * fold, w * fold):
        m = _bilinear_centred(m, h * fold, w * fold)
    m = F.pixel_unshuffle(m, fold)
    return torch.cat([image, _fit_batch(m, b, "the mask")], dim=1)


def _with_concat(
    entries: list[Any], kind: str, fold: int, shape: tuple[int, ...], noise_mask: torch.Tensor | None
) -> list[Any]:
    """The entries with what the model reads beside the noisy latent (``concat``, :func:`flux_concat`) on a FLUX.1
    Fill / Depth / Canny model; the editing nodes' images left out on other models, as ComfyUI's leave them."""
    out = []
    for e in entries:
        cond = {k: v for k, v in e.cond.items() if k not in CONCAT_KEYS}
        if kind != "plain":
            cond["concat"] = flux_concat(e.cond, kind, fold, shape, noise_mask)
        out.append(replace(e, cond=cond))
    return out


def is_flow_model(ctx: RunContext, model: ModelHandle) -> bool:
    """Whether ``model`` is SD3's or Flux's (the samplers then run here)."""
    return bool(getattr(model, "diffusion_model", "")) or _family_of_pipe(ctx.pipeline(model.ref)) is not None


def flow_basic_scheduler(ctx: RunContext, model: ModelHandle, scheduler: str, steps: int, denoise: float) -> Any:
    """BasicScheduler on a flow model: KSampler's sigmas (:func:`sdengine.latent_sampling.flow_sigmas`)."""
    from sdengine.latent_sampling import LatentSamplingError, flow_sigmas
    from sdengine.server.comfy.nodes import SigmaPlan, Sigmas

    _, flow, _, _ = _flow_parts(ctx, model)
    try:
        values = flow_sigmas(flow.schedule, int(steps), _flow_scheduler(scheduler), denoise=float(denoise))
    except LatentSamplingError as e:
        raise NodeError(str(e)) from None
    assert values is not None
    n = int(values.shape[0]) - 1
    return (Sigmas(values, SigmaPlan(model.ref, scheduler, int(steps), float(denoise), n, 0, n)),)


def _flow_scheduler(name: str) -> str:
    """ComfyUI's scheduler name -> the flow grid's (its `normal` is ComfyUI's own on flow models)."""
    from sdengine.diffusion.flow import FLOW_SCHEDULES

    if name not in FLOW_SCHEDULES:
        raise NodeError(
            f"scheduler {name!r} is not supported on flow models (SD3, Flux); use {', '.join(FLOW_SCHEDULES)}"
        )
    return name


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------

# ModelHandle fields that patch a U-Net, and what ComfyUI calls them: refused on flow models
_UNET_PATCHES = (
    ("loras", "LoRAs (LoraLoader)"),
    ("prediction", "ModelSamplingDiscrete"),
    ("zsnr", "ModelSamplingDiscrete's zsnr"),
    ("cfg_rescale", "RescaleCFG"),
    ("pag_scale", "PerturbedAttentionGuidance"),
    ("freeu", "FreeU"),
    ("merges", "model merging"),
    ("perp_neg", "PerpNeg"),
    ("sag", "SelfAttentionGuidance"),
    ("deep_shrink", "PatchModelAddDownscale (Deep Shrink)"),
    ("hypertile", "HyperTile"),
    ("ip_adapters", "IP-Adapter"),
)


def _check_patches(model: ModelHandle, family: str) -> None:
    """The U-Net patches a flow MODEL carries are refused; LoRAs apply to SD3's MMDiT and Flux's and Chroma's
    transformers (every format the pipelines take, :mod:`sdengine.weights.lora_dit_keys`)."""
    on = [label for field, label in _UNET_PATCHES[1:] if getattr(model, field, None)]
    if on:
        label = FAMILY_LABELS.get(family, "Flux")
        raise NodeError(f"{', '.join(on)} patch(es) a U-Net; not supported on {label} models here")


@contextmanager
def _transformer_loras(ctx: RunContext, model: ModelHandle, family: str) -> Iterator[None]:
    """LoraLoader's LoRAs on SD3's MMDiT or Flux's / Chroma's transformer for this call
    (:func:`sdengine.weights.lora.apply_loras`, their transformer part), removed after it."""
    if not model.loras:
        yield
        return
    from sdengine.weights.lora import apply_loras

    net = _transformer(ctx, model)[1] if model.diffusion_model else ctx.pipeline(model.ref).unet
    try:
        handle = apply_loras(net, None, list(model.loras), part="unet")
    except (OSError, SdengineError) as e:
        raise NodeError(f"LoRA: {str(e).splitlines()[0]}") from None
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _encoder_loras(clip: ClipHandle, cond: Any, family: str) -> Iterator[None]:
    """LoraLoader's LoRAs on the text encoders while encoding (their text-encoder part): SD3's CLIP-L and bigG,
    Flux's CLIP-L and T5 (kohya's ``lora_te3_`` / ComfyUI's ``t5xxl`` layers, as the Flux pipeline applies them),
    Chroma's T5 (its only encoder: ``lora_te3_`` / ``lora_te_`` / ``t5xxl``, as the Chroma pipeline applies them)."""
    if not clip.loras:
        with torch.inference_mode():
            yield
        return
    from sdengine.weights.lora import apply_loras

    first, second = (cond.t5, None) if family == "chroma" else (
        cond.text_encoder, cond.text_encoder_2 if family == "sd3" else cond.t5)  # fmt: skip
    try:
        handle = apply_loras(None, first, list(clip.loras), text_encoder_2=second, part="text_encoders")
    except (OSError, SdengineError) as e:
        raise NodeError(f"LoRA: {str(e).splitlines()[0]}") from None
    try:
        with torch.inference_mode():
            yield
    finally:
        handle.remove()


def _raw_in(z: torch.Tensor, family: str) -> torch.Tensor:
    """ComfyUI's process_in: raw VAE latents -> the model's; an all-zero latent is left as it is (as ComfyUI)."""
    if family == "qwen_image":  # ComfyUI's Wan21 latent format: per-channel mean and deviation
        from sdengine.server.comfy.nodes_qwen import raw_in

        return raw_in(z)
    if family == "flux2":  # ComfyUI's Flux2 latent format: the identity (its VAE gives the normalised patches)
        return z
    scale, shift = LATENT_FORMATS[family]
    return (z - shift) * scale if bool(torch.count_nonzero(z)) else z


def _raw_out(z: torch.Tensor, family: str) -> torch.Tensor:
    if family == "qwen_image":
        from sdengine.server.comfy.nodes_qwen import raw_out

        return raw_out(z)
    if family == "flux2":
        return z
    scale, shift = LATENT_FORMATS[family]
    return z / scale + shift


def _fit_conditioning(entries: list[Any], family: str, guidance: bool, widths: tuple[int, int]) -> list[Any]:
    """The entries as this model reads them: SD3's token states fitted to its joint width (zero columns added, or
    cut where they are zeros: a T5-less CLIP's padding); Flux [dev]'s guidance 3.5 where none is set, [schnell]'s
    left out (it has no guidance input)."""
    out = []
    for e in entries:
        cond = dict(e.cond)
        x = cond.get("crossattn")
        if x is None or x.ndim != 3:
            raise NodeError("this conditioning has no token states (crossattn): encode it with the model's CLIP")
        joint, pooled = widths
        if family == "qwen_image":
            from sdengine.server.comfy.nodes_qwen import fit_conditioning

            out += fit_conditioning([e], joint)
            continue
        if family == "z_image":
            from sdengine.server.comfy import nodes_z_image

            out += nodes_z_image.fit_conditioning([e], joint)
            continue
        if family == "flux2":
            from sdengine.server.comfy import nodes_flux2

            out += nodes_flux2.fit_conditioning([e], joint, guidance)
            continue
        if family == "chroma":  # T5's states alone (ComfyUI's Chroma: no pooled vector, the guidance input 0)
            if int(x.shape[-1]) != joint or "vector" in cond:
                raise NodeError("this conditioning is not this Chroma model's (encode it with CLIPLoader type chroma)")
            g = cond.pop("guidance", None)
            if g is not None and not guidance_disabled(g) and bool(torch.any(g != 0)):
                raise NodeError(
                    "FluxGuidance on a Chroma model: sdengine's Chroma runs its guidance input at 0 (ComfyUI's "
                    "default); leave FluxGuidance out"
                )
            out.append(replace(e, cond=cond))
            continue
        if family == "sd3" and guidance_disabled(cond.get("guidance")):  # FluxDisableGuidance: SD3 reads none
            cond.pop("guidance")
        vector = cond.get("vector")
        label = "SD3" if family == "sd3" else "Flux"
        if vector is None or int(vector.shape[-1]) != pooled or (family == "sd3" and "guidance" in cond):
            raise NodeError(f"this conditioning is not this {label} model's (encode it with its CLIP)")
        if family == "sd3":
            width = int(x.shape[-1])
            if width < joint:
                cond["crossattn"] = F.pad(x, (0, joint - width))
            elif width > joint:
                if bool(torch.count_nonzero(x[..., joint:])):
                    raise NodeError(f"the conditioning's token states are {width} wide, the MMDiT's are {joint}")
                cond["crossattn"] = x[..., :joint]
        else:
            if int(x.shape[-1]) != joint:
                raise NodeError(f"this conditioning is not this {label} model's (encode it with its CLIP)")
            if guidance and "guidance" not in cond:
                cond["guidance"] = torch.tensor([FLUX_GUIDANCE])
            elif not guidance:  # (FluxDisableGuidance's NaN: the transformer's rows without the guidance embedding)
                cond.pop("guidance", None)
        out.append(replace(e, cond=cond))
    return out


PATCHED_FAMILIES = ("sd3", "flux", "chroma", "qwen_image", "z_image")  # 2 x 2 patches over the sampled latent


def pad_to_patches(x: torch.Tensor, patch: int = 2) -> torch.Tensor:
    """``x`` (..., h, w) with its bottom rows and right columns padded circularly to a multiple of ``patch`` (ComfyUI's
    ``comfy/ldm/common_dit.py`` ``pad_to_patch_size``, its default mode: the first rows / columns repeated)."""
    ph, pw = -int(x.shape[-2]) % patch, -int(x.shape[-1]) % patch
    return F.pad(x, (0, pw, 0, ph), mode="circular") if ph or pw else x


class PatchPadded:
    """A flow network (``(x, t, **conditioning) -> v``) on a latent whose side is not a multiple of the 2 x 2
    patches, run as ComfyUI's DiTs run it (SD3's MMDiT ``PatchEmbed``, Flux / Chroma / Qwen-Image's
    ``process_img``, Lumina2 / Z-Image's ``forward``): ``x`` and any latent-sized input beside it (FLUX.1 Fill /
    Depth's ``concat``, which ComfyUI joins to ``x`` before the pad) padded circularly at the bottom and right
    (:func:`pad_to_patches`), the model called on that grid (its positions those of the padded grid), the output
    cut back to ``x``'s size. The sampler, its noise and masks stay at the latent's own size."""

    def __init__(self, network: Callable[..., torch.Tensor], patch: int = 2) -> None:
        self.network = network
        self.patch = patch

    def __getattr__(self, name: str) -> Any:  # what the samplers ask of the network (takes_step, references, ...)
        return getattr(self.__dict__["network"], name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        h, w = int(x.shape[-2]), int(x.shape[-1])
        fitted = {
            k: pad_to_patches(v, self.patch)
            if isinstance(v, torch.Tensor) and v.ndim == 4 and tuple(v.shape[-2:]) == (h, w)
            else v
            for k, v in cond.items()
        }
        return self.network(pad_to_patches(x, self.patch), t, **fitted)[..., :h, :w]


def odd_sides(flow: Any, family: str, z: torch.Tensor, controls: list[Any], model: ModelHandle) -> Any:
    """``flow`` as ComfyUI runs it on ``z``: a latent side that is not a multiple of the 2 x 2 patches padded
    circularly at every model call and the output cut back (:class:`PatchPadded`); FLUX.2's transformer reads the
    latent one token a latent pixel (ComfyUI's patch size 1: nothing to pad). An SD3 / Flux / Qwen-Image ControlNet's
    hint latent is padded likewise (:func:`pad_control_latents`, in :func:`_controlled_flow`); Z-Image's Fun
    ControlNet patch is handed the padded latent, its image encoded at that size (:func:`patch_grid`)."""
    h, w = int(z.shape[-2]), int(z.shape[-1])
    if family not in PATCHED_FAMILIES or not (h % 2 or w % 2):
        return flow
    skipping = flow.skipping

    def padded_skipping(layers: tuple[int, ...], single: tuple[int, ...]) -> Any:
        assert skipping is not None
        net = skipping(layers, single)
        return None if net is None else PatchPadded(net)

    return replace(flow, network=PatchPadded(flow.network), skipping=None if skipping is None else padded_skipping)


def patch_grid(family: str, h: int, w: int) -> tuple[int, int]:
    """The latent size a ``family`` transformer runs a ``h`` x ``w`` latent at: each side up to the 2 x 2 patches
    (:func:`pad_to_patches`), as it is for FLUX.2 (patch size 1). ZImageFunControlnet's patch reads this padded
    latent in ComfyUI (Lumina2's ``_forward`` hands the patches the padded ``x``), so its image is scaled to it x 8."""
    if family not in PATCHED_FAMILIES:
        return h, w
    return h + h % 2, w + w % 2


def pad_control_latents(units: list[Any]) -> list[Any]:
    """Prepared SD3 / Flux / Qwen-Image ControlNet units whose control latent (the hint encoded at the sampled
    latent's size, ComfyUI's ``get_control``: the hint scaled to the latent's size x 8) is padded circularly at the
    bottom / right to the 2 x 2 patches, as ComfyUI's ControlNets pad it in their forward (Flux's and Qwen-Image's
    ``pad_to_patch_size`` / ``process_img``, SD3's ``pos_embed_input`` PatchEmbed) beside the padded latent."""
    return [replace(u, latent=pad_to_patches(u.latent)) for u in units]


def sample_flow(
    ctx: RunContext,
    model: ModelHandle,
    seed: int,
    steps: int,
    cfg: float,
    sampler_name: str,
    scheduler: str,
    positive: list[Any],
    negative: list[Any],
    latent_image: dict[str, Any],
    denoise: float = 1.0,
    last_denoised: list[torch.Tensor] | None = None,
    options: tuple[tuple[str, float], ...] = (),
    discard_penultimate: bool | None = None,
    guidance_rule: Any = None,
    third: list[Any] | None = None,
    add_noise: bool = True,
    start_at_step: int = 0,
    end_at_step: int | None = None,
    leftover_noise: bool = False,
    sigmas: torch.Tensor | None = None,
) -> tuple[Any]:
    """KSampler / KSamplerAdvanced / SamplerCustom on an SD3 or Flux model (see the module docstring)."""
    from sdengine.latent_sampling import LatentSamplingError, SkipLayerGuidance, flow_sigmas, sample_flow_latents
    from sdengine.pipeline.finite import require_finite

    if guidance_rule is not None:
        raise NodeError(f"{guidance_rule!r} is not supported on SD3 / Flux models here: use CFGGuider or BasicGuider")
    if steps > ctx.max_steps:
        raise NodeError(f"steps {steps} is over the server's limit of {ctx.max_steps}")
    if float(denoise) <= 0.0:
        return (dict(latent_image),)
    family, flow, guidance, widths = _flow_parts(ctx, model)
    _check_patches(model, family)
    controls = [c for e in (*positive, *negative) for c in e.controls]
    stripped = [[replace(e, controls=()) for e in entries] for entries in (positive, negative)]
    references, method = sampling_references(family, stripped[0], stripped[1], cfg, flow.name)
    if references and controls:
        raise NodeError("ReferenceLatent (FLUX.1 Kontext) and a ControlNet together are not supported: drop one")
    if references:  # FLUX.1 Kontext: the references' tokens at every call, as the model's latents
        network: Any = flow.network  # a FluxAdapter made for this run
        network.references = [_raw_in(r.float(), family).to(flow.device) for r in references]
        network.reference_method = method
        if family == "qwen_image":  # ComfyUI's Qwen-Image lays several out by "index" unless a node sets another
            explicit = [str(c.reference_method) for c in stripped[0] if getattr(c, "reference_method", None)]
            network.reference_method = "uxo" if explicit and "uxo" in explicit[0] else (explicit or ["index"])[0]
    z = latent_image.get("samples")
    factor = nodes_flux2_factor(family)
    if z is None:  # EmptyLatentImage's size: ComfyUI's 8 x 8 pixels a latent pixel
        b, h, w = latent_image["size"]
        z = torch.zeros(b, flow.channels, h // factor, w // factor)
    if family == "flux2":
        from sdengine.server.comfy import nodes_flux2

        nodes_flux2.check_latent(z, flow.channels, flow.name)
    elif z.shape[1] != FLOW_CHANNELS:
        raise NodeError(f"the latent has {z.shape[1]} channels, {flow.name}'s have {FLOW_CHANNELS}")
    if model.z_image_controls:  # ZImageFunControlnet's patches, their control latents at the padded latent's size
        if family != "z_image":
            raise NodeError("ZImageFunControlnet's patch is on a model that is not Z-Image")
        from sdengine.server.comfy.nodes_z_image_control import controlled_flow

        flow = controlled_flow(ctx, model, flow, *patch_grid(family, int(z.shape[-2]), int(z.shape[-1])))
    for k, ref in enumerate(references):  # one reference for every row, or one per row
        if ref.shape[0] not in (1, z.shape[0]):
            raise NodeError(
                f"ReferenceLatent {k}: a batch of {ref.shape[0]} reference latents for a latent batch of {z.shape[0]}; "
                "give one reference image (or one per row)"
            )
    discard = sampler_name in DISCARD_PENULTIMATE_SAMPLERS if discard_penultimate is None else discard_penultimate
    kind, fold = _image_input(ctx, model, family)
    positive = _with_concat(positive, kind, fold, tuple(z.shape), latent_image.get("noise_mask"))
    negative = _with_concat(negative, kind, fold, tuple(z.shape), latent_image.get("noise_mask"))
    try:
        if sigmas is None:
            sigmas = flow_sigmas(
                flow.schedule,
                int(steps),
                _flow_scheduler(scheduler),
                denoise=float(denoise),
                start_at_step=int(start_at_step),
                end_at_step=end_at_step,
                leftover_noise=leftover_noise,
                discard_penultimate_sigma=discard,
            )
        if sigmas is None:  # the window holds no step: the latent as it came, as ComfyUI
            return (dict(latent_image),)
        if controls:  # SD3 / Flux ControlNets: the transformer with them
            flow, positive, negative = _controlled_flow(
                ctx, model, family, flow, positive, negative, cfg, latent_image, sigmas, third
            )
        flow = odd_sides(flow, family, z, controls, model)  # the whole call (ControlNets too) padded to the patches

        def report(r: Any) -> bool:
            if last_denoised is not None:
                last_denoised[:] = [_raw_out(r.denoised.float(), family)]
            if ctx.progress is None:
                return True
            return ctx.progress(r.step, r.steps, r.denoised, rgb_map=preview_map(family))

        fitted = (
            _fit_conditioning(positive, family, guidance, widths),
            _fit_conditioning(negative, family, guidance, widths),
        )
        if family in ("chroma", "qwen_image", "z_image"):
            # ComfyUI's CONDRegular: texts of different lengths run apart; these transformers take a text mask, so
            # here both padded to one length, the padding masked out (the other families' texts of different
            # lengths run in calls of their own: sample_flow_latents)
            from sdengine.server.comfy.nodes_qwen import own_lengths

            fitted = own_lengths(*fitted)
        with _transformer_loras(ctx, model, family):
            out = sample_flow_latents(
                flow,
                fitted[0],
                fitted[1],
                _raw_in(z.float(), family),
                sigmas,
                seed=int(seed),
                cfg=float(cfg),
                sampler=SAMPLER_NAMES[sampler_name],
                seed_rule=ctx.seed_rule,
                add_noise=add_noise,
                callback=report,
                batch_index=latent_image.get("batch_index"),
                sampler_options={**SAMPLER_OPTIONS.get(sampler_name, {}), **dict(options)} or None,
                skip_layer_guidance=SkipLayerGuidance(*model.skip_layer_guidance)
                if model.skip_layer_guidance
                else None,
                noise_mask=latent_image.get("noise_mask"),
                differential=getattr(model, "differential", None),
                cfg_norm=model.cfg_norm,
                cfg_hooks=model.cfg_hooks,
            )
    except LatentSamplingError as e:
        raise NodeError(str(e)) from None
    require_finite(out, f"sampled latent ({sampler_name}, {scheduler}, {steps} steps)")
    raw = _raw_out(out, family).cpu()
    b, _, h, w = raw.shape
    return (
        {
            "samples": raw,
            "size": (b, h * factor, w * factor),
            "posterior": None,
            "noise_mask": latent_image.get("noise_mask"),
            **({"batch_index": latent_image["batch_index"]} if "batch_index" in latent_image else {}),
        },
    )


# ---------------------------------------------------------------------------------------------------
# SD3 / Flux ControlNets (ControlNetApplyAdvanced with its vae, SetUnionControlNetType)
# ---------------------------------------------------------------------------------------------------

# ComfyUI's SetUnionControlNetType types (its comfy/cldm/control_types.py UNION_CONTROLNET_TYPES): the number is
# what the Union ControlNet's mode embedding reads (ComfyUI hands it on as it is)
UNION_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "hed/pidi/scribble/ted": 2,
    "canny/lineart/anime_lineart/mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7,
}


def set_union_controlnet_type(ctx: RunContext, control_net: Any, type: str) -> tuple[Any]:
    """SetUnionControlNetType: the CONTROL_NET with ComfyUI's type number ("auto": none set)."""
    from sdengine.server.comfy.nodes import UnionControlNet

    path = control_net.path if isinstance(control_net, UnionControlNet) else control_net
    if type != "auto" and type not in UNION_TYPES:
        raise NodeError(f"SetUnionControlNetType: unknown type {type!r}; use auto or {', '.join(UNION_TYPES)}")
    return (UnionControlNet(path, UNION_TYPES.get(type)),)


def controlnet_apply_sd3(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    control_net: Any,
    vae: Any,
    image: torch.Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
) -> tuple[Any, ...]:
    """ComfyUI's deprecated ControlNetApplySD3 ("Apply Controlnet with VAE"): ControlNetApplyAdvanced with its vae."""
    from sdengine.server.comfy.nodes import controlnet_apply_advanced

    return controlnet_apply_advanced(
        ctx, positive, negative, control_net, image, strength, start_percent, end_percent, vae
    )


def controlnet_inpainting_alimama_apply(
    ctx: RunContext,
    positive: list[Any],
    negative: list[Any],
    control_net: Any,
    vae: Any,
    image: torch.Tensor,
    mask: torch.Tensor,
    strength: float,
    start_percent: float,
    end_percent: float,
) -> tuple[Any, ...]:
    """ComfyUI's ControlNetInpaintingAliMamaApply: an SD3 / Qwen-Image inpainting ControlNet's hint (the picture)
    with its MASK (1 = repaint) on both conditionings. The picture and mask are prepared as the Python pipeline
    (diffusers) prepares them, not as ComfyUI does (see comfyui.md)."""
    from sdengine.server.comfy.nodes import controlnet_apply_advanced

    if strength == 0:  # no hint added (ControlNetApplyAdvanced's shortcut)
        return positive, negative
    m = torch.as_tensor(mask).float()
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.ndim != 2:
        raise NodeError(
            f"ControlNetInpaintingAliMamaApply: one mask (H, W) serves every row, got a mask of shape {tuple(m.shape)}"
        )
    pos, neg = controlnet_apply_advanced(
        ctx, positive, negative, control_net, image, strength, start_percent, end_percent, vae
    )

    def masked(entries: list[Any]) -> list[Any]:  # the hint just added (the last) takes the mask
        return [replace(c, controls=(*c.controls[:-1], replace(c.controls[-1], mask=m))) for c in entries]

    return masked(pos), masked(neg)


def _sigma_windowed(controlled: Any, windows: list[tuple[float, float]], sigmas: torch.Tensor) -> Any:
    """The ControlledDiT with each unit on at the model calls whose sigma lies in its ``(low, high)`` window
    (ComfyUI's ControlBase: off where sigma > percent_to_sigma(start) or sigma < percent_to_sigma(end)), judged
    at every call (a second-order sampler's midpoints on their own sigma)."""
    from sdengine.pipeline.dit_control import ControlledDiT

    class SigmaWindowed(ControlledDiT):
        def __init__(self) -> None:
            super().__init__(controlled.base, controlled.units, controlled.family)
            self.sigma: float | None = None

        def __call__(self, x: torch.Tensor, t: torch.Tensor, *, step: Any = None, **kw: Any) -> torch.Tensor:
            s = getattr(step, "sigma", None)
            self.sigma = None if s is None else float(s)
            return super().__call__(x, t, step=step, **kw)

        def active(self, step: int) -> list[bool]:
            s = self.sigma if self.sigma is not None else float(sigmas[min(step, len(sigmas) - 1)])
            return [low <= s <= high for low, high in windows]

    return SigmaWindowed()


def _hint_vae(ctx: RunContext, vae: Any, name: str) -> Any:
    """The AutoencoderKL of ControlNetApplyAdvanced's vae input."""
    from sdengine.server.comfy.nodes import TinyVaeHandle, vae_module

    if vae is None:
        raise NodeError(
            f"ControlNet {name} is an SD3 / Flux / Qwen-Image ControlNet: it needs a VAE to encode its image; "
            "connect the vae input of ControlNetApplyAdvanced (as ComfyUI asks)"
        )
    if isinstance(vae, TinyVaeHandle):
        raise NodeError(f"ControlNet {name}: the tiny VAE (taesd) cannot encode its image; give the model's VAE")
    return vae_module(ctx, vae)


FAMILY_LABELS = {
    "sd3": "SD3",
    "flux": "Flux",
    "chroma": "Chroma",
    "qwen_image": "Qwen-Image",
    "z_image": "Z-Image",
    "flux2": "FLUX.2",
}  # in messages


def _load_dit_controlnet(ctx: RunContext, path: str, family: str) -> Any:
    """The SD3 / Flux ControlNet at ``path`` (kept for the next prompts); a U-Net one is refused in one line."""
    from sdengine.control.dit_files import read_dit_controlnet

    name = Path(path).name
    label = {"sd3": "an SD3", "qwen_image": "a Qwen-Image"}.get(family, "a Flux")
    try:
        return _cached("controlnet", str(ctx.device), (str(Path(path).resolve()),), lambda: read_dit_controlnet(path))
    except (OSError, SdengineError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NodeError(f"ControlNet {name} on {label} model: {first}") from None


def _controlled_flow(
    ctx: RunContext,
    model: ModelHandle,
    family: str,
    flow: Any,
    positive: list[Any],
    negative: list[Any],
    cfg: float,
    latent_image: dict[str, Any],
    sigmas: torch.Tensor,
    third: list[Any] | None,
) -> tuple[Any, list[Any], list[Any]]:
    """(the FlowModel whose network runs the conditionings' SD3 / Flux / Qwen-Image ControlNets, the conditionings
    without them).

    As the Python pipeline (sdengine.pipeline.dit_control) every CFG row runs the ControlNet with its own text, so
    a hint must be on both conditionings (ControlNetApplyAdvanced puts it there); at cfg 1 the positive's alone
    act (no negative pass, as ComfyUI's shortcut). Qwen-Image's run by ComfyUI's rules
    (:mod:`sdengine.server.comfy.qwen_control`: every CFG row, ComfyUI's block rule and centring)."""
    from sdengine.latent_sampling import same_hint
    from sdengine.models.dit_controlnet import FluxControlNet
    from sdengine.pipeline.control import HINT_NEAREST_CENTRE, ControlUnit
    from sdengine.pipeline.dit_control import ControlledDiT, build_controlled_dit
    from sdengine.pipeline.flux import FluxAdapter
    from sdengine.pipeline.sd3 import MMDiTAdapter

    label = {"sd3": "SD3", "flux": "Flux", "qwen_image": "Qwen-Image"}.get(family)
    if label is None:
        raise NodeError(
            f"ControlNets on {FAMILY_LABELS.get(family, family)} models are not supported on the ComfyUI route here"
        )
    if len(positive) != 1 or len(negative) != 1:
        raise NodeError(f"ControlNets on {label} run with one plain positive and one negative conditioning here")
    if third:
        raise NodeError(f"ControlNets on {label} are not supported with a guider of three conditionings")
    if model.skip_layer_guidance:
        raise NodeError("SkipLayerGuidanceSD3 and a ControlNet together are not supported here: drop one")
    kind, _ = _image_input(ctx, model, family)
    if kind != "plain":
        raise NodeError(
            "a ControlNet on FLUX.1 Fill / Depth / Canny (a transformer with an image input) is not supported"
        )
    hints = list(positive[0].controls)
    if float(cfg) != 1.0:
        others = list(negative[0].controls)
        alike = len(hints) == len(others) and all(same_hint(a, b) for a, b in zip(hints, others, strict=True))
        if not alike:
            raise NodeError(
                f"on {label} a ControlNet acts on every CFG row: apply it to both positive and negative "
                "(ControlNetApplyAdvanced), or sample at cfg 1"
            )
    positive = [replace(e, controls=()) for e in positive]
    negative = [replace(e, controls=()) for e in negative]
    if not hints:  # on the negative alone at cfg 1: no pass reads it
        return flow, positive, negative
    if model.diffusion_model:
        net = _transformer(ctx, model)[1]
        dtype = _device_dtype(ctx)[1]
        make: Callable[[Any], Any] = (lambda n: FluxAdapter(n, dtype)) if family == "flux" else (
            lambda n: MMDiTAdapter(n, dtype))  # fmt: skip
    elif family == "qwen_image":  # a Qwen-Image model comes from UNETLoader alone here
        raise NodeError("ControlNets on Qwen-Image take the model of UNETLoader")
    else:
        pipe = ctx.pipeline(model.ref)
        net, dtype, make = pipe.unet, pipe.dtype, pipe.network_adapter
    z = latent_image.get("samples")
    if z is not None:
        h, w = int(z.shape[-2]), int(z.shape[-1])
    else:
        h, w = (int(v) // LATENT_FACTOR for v in latent_image["size"][1:])
    run_sigmas = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    fit = HINT_NEAREST_CENTRE if ctx.seed_rule == "comfyui" else "crop and resize"
    scale, shift = LATENT_FORMATS.get(family, (1.0, 0.0))  # Qwen-Image's: Wan 2.1's per-channel normalisation
    units: list[Any] = []
    windows: list[tuple[float, float]] = []
    for hint in hints:
        path = str(hint.model)
        name = Path(path).name
        cn = _load_dit_controlnet(ctx, path, family)
        if cn.family != family:
            raise NodeError(f"ControlNet {name} is a {FAMILY_LABELS.get(cn.family, cn.family)} ControlNet; this "
                            f"model is {label}")  # fmt: skip
        if family == "qwen_image" and hint.union_type is not None:
            raise NodeError(
                f"ControlNet {name}: Qwen-Image ControlNets take no type (InstantX's Union reads the kind off the "
                "image): leave SetUnionControlNetType out"
            )
        union = isinstance(cn, FluxControlNet) and cn.controlnet_mode_embedder is not None
        if union and hint.union_type is None:
            raise NodeError(
                f"ControlNet {name} is a Union ControlNet: set its type with SetUnionControlNetType (not auto)"
            )
        if not union and hint.union_type is not None:
            raise NodeError(f"ControlNet {name} is not a Union ControlNet: leave SetUnionControlNetType out")
        vae = _hint_vae(ctx, hint.vae, name)
        factor = int(vae.config.downscale_factor)

        def encode(images: torch.Tensor, vae: Any = vae) -> torch.Tensor:
            from sdengine.vae_utils import encode_moments

            p = next(vae.parameters())
            mean = encode_moments(vae, images.to(device=p.device, dtype=p.dtype) * 2.0 - 1.0).mean
            return _qwen_hint_latent(mean) if family == "qwen_image" else mean

        unit = ControlUnit(cn, hint.image, float(hint.strength), union_mode=hint.union_type, mask=hint.mask)
        try:
            built = build_controlled_dit(
                net, [unit], family=family, encode=encode, vae_factors=(scale, shift), width=w * factor,
                height=h * factor, grid=run_sigmas[:-1], device=flow.device, dtype=dtype, resize_mode=fit,
            )  # fmt: skip
        except SdengineError as e:
            first = re.sub(r"^ControlNet \d+: ", "", str(e).splitlines()[0])
            first = re.sub(r"^ControlNet \d+ ", "it ", first)  # the pipeline's unit number: this node's ControlNet
            if hint.mask is None and "inpainting ControlNet: give the unit its mask" in first:
                first = (f"{'an' if family == 'sd3' else 'a'} {label} inpainting ControlNet: apply it with "
                         "ControlNetInpaintingAliMamaApply (its mask)")  # fmt: skip
            raise NodeError(f"ControlNet {name}: {first}") from None
        units.extend(pad_control_latents(built.units) if h % 2 or w % 2 else built.units)
        sched = flow.schedule
        windows.append((sched.percent_to_sigma(float(hint.end)), sched.percent_to_sigma(float(hint.start))))
    if family == "qwen_image":
        from sdengine.server.comfy.qwen_control import ComfyControlledQwen, ComfyQwenControlAdapter

        qwen = ComfyControlledQwen(net, units, windows, run_sigmas)
        return replace(flow, network=ComfyQwenControlAdapter(qwen, dtype), skipping=None), positive, negative
    controlled = _sigma_windowed(ControlledDiT(net, units, family), windows, run_sigmas)
    return replace(flow, network=make(controlled), skipping=None), positive, negative


# The helpers other node families (nodes_z_image_control.py) share, by public name.
cached_part = _cached
device_dtype = _device_dtype
hint_vae = _hint_vae
transformer_of = _transformer


def _qwen_hint_latent(mean: torch.Tensor) -> torch.Tensor:
    """A Qwen-Image ControlNet's hint latent: the VAE's mean in ComfyUI's Wan21 format, ``(z - mean) / std``."""
    from sdengine.server.comfy.nodes_qwen import raw_in

    return raw_in(mean.float())


def raw_latent(z: torch.Tensor | None) -> bool:
    """Whether a LATENT's samples are a 16-channel model's raw VAE latents (decoded and encoded as they are)."""
    return z is not None and z.ndim == 4 and z.shape[1] == FLOW_CHANNELS


# ---------------------------------------------------------------------------------------------------
# The node list
# ---------------------------------------------------------------------------------------------------

SD3_FLUX_NODES: dict[str, NodeDef] = {
    "UNETLoader": NodeDef(
        "UNETLoader",
        "Load Diffusion Model",
        "advanced/loaders",
        (
            Input("unet_name", "COMBO", choices=_diffusion_models),
            Input("weight_dtype", "COMBO", "default", choices=WEIGHT_DTYPES),
        ),
        ("MODEL",),
        unet_loader,
        description="A Flux, Chroma, SD3, Qwen-Image, Z-Image or FLUX.2 ([klein] / [dev]) transformer file alone from "
        "--models-dir's diffusion_models/ or unet/ (BFL's, ComfyUI's or Stability's names; Qwen-Image's in diffusers' "
        "names, ComfyUI's prefix or not). "
        "weight_dtype fp8_e4m3fn / fp8_e5m2 hold its Linear and Conv2d weights in float8, cast to the compute dtype "
        "at each use (half the memory of 16-bit weights; biases and norms stay); fp8_e4m3fn_fast runs as that storage"
        " alone, ComfyUI's own fallback on a device without fp8 products; LoRAs apply at run time over the stored "
        "weights (docs/fp8-storage.md).",
    ),
    "CLIPLoader": NodeDef(
        "CLIPLoader",
        "Load CLIP",
        "advanced/loaders",
        (
            Input("clip_name", "COMBO", choices=_text_encoders),
            Input("type", "COMBO", "chroma", choices=CLIP_LOADER_TYPES),
            Input("device", "COMBO", "default", choices=("default", "cpu"), optional=True),
        ),
        ("CLIP",),
        clip_loader,
        description="One text encoder from --models-dir's text_encoders/ or clip/: type chroma, T5-XXL for Chroma "
        "(ComfyUI's encoding: the prompt's tokens and </s>, no padding); type qwen_image, Qwen2.5-VL's language "
        "model for Qwen-Image with Qwen2's tokenizer folder beside the file (qwen25_tokenizer/; ComfyUI's encoding: "
        "the chat template, the tokens up to <|im_start|>user dropped, no padding); type lumina2, Qwen3-4B for Z-Image "
        "(qwen_3_4b.safetensors, the tokenizer folder likewise; ComfyUI's encoding: Qwen3's chat template, the "
        "next-to-last layer's states of every token, no padding; a Qwen3 file under qwen_image too, as ComfyUI); type "
        "flux2, Qwen3 for FLUX.2 [klein] (the tokenizer folder likewise; ComfyUI's encoding: Qwen3's chat template "
        "with thinking off, padded to at least 512 tokens, layers 9, 18 and 27 side by side), or Mistral Small 3 for "
        "FLUX.2 [dev] (ComfyUI's mistral_3_small_flux2_*.safetensors with its tekken_model tokenizer inside; "
        "ComfyUI's encoding: <s> and BFL's system prompt, no padding, layers 10, 20 and 30 side by side). ComfyUI's "
        "other types are not supported.",
    ),
    "T5TokenizerOptions": NodeDef(
        "T5TokenizerOptions",
        "T5TokenizerOptions",
        "_for_testing/conditioning",
        (
            Input("clip", "CLIP"),
            Input("min_padding", "INT", 0, 0, 10000),
            Input("min_length", "INT", 0, 0, 10000),
        ),
        ("CLIP",),
        t5_tokenizer_options,
        description="Chroma's T5 (CLIPLoader type chroma) as ComfyUI's tokenizer options: min_padding <pad> tokens "
        "after </s>, then pads up to min_length; T5 reads them unmasked and the transformer attends to them "
        "(ComfyUI's rule; diffusers masks T5's padding). Other CLIPs: a node error.",
    ),
    "DualCLIPLoader": NodeDef(
        "DualCLIPLoader",
        "DualCLIPLoader",
        "advanced/loaders",
        (
            Input("clip_name1", "COMBO", choices=_text_encoders),
            Input("clip_name2", "COMBO", choices=_text_encoders),
            Input("type", "COMBO", "sd3", choices=CLIP_TYPES),
            Input("device", "COMBO", "default", choices=("default", "cpu"), optional=True),
        ),
        ("CLIP",),
        dual_clip_loader,
        description="Two text encoders from --models-dir's text_encoders/ or clip/: type sd3, CLIP-L + bigG (T5's "
        "tokens zeros); type flux, CLIP-L + T5-XXL. T5 is told by its weights, the CLIP files by their widths.",
    ),
    "TripleCLIPLoader": NodeDef(
        "TripleCLIPLoader",
        "TripleCLIPLoader",
        "advanced/loaders",
        (
            Input("clip_name1", "COMBO", choices=_text_encoders),
            Input("clip_name2", "COMBO", choices=_text_encoders),
            Input("clip_name3", "COMBO", choices=_text_encoders),
        ),
        ("CLIP",),
        triple_clip_loader,
        description="SD3's three text encoders (CLIP-L, OpenCLIP bigG, T5-XXL) from --models-dir's text_encoders/ "
        "or clip/.",
    ),
    "CLIPTextEncodeSD3": NodeDef(
        "CLIPTextEncodeSD3",
        "CLIPTextEncodeSD3",
        "advanced/conditioning",
        (
            Input("clip", "CLIP"),
            Input("clip_l", "STRING", "", multiline=True),
            Input("clip_g", "STRING", "", multiline=True),
            Input("t5xxl", "STRING", "", multiline=True),
            Input("empty_padding", "COMBO", "none", choices=("none", "empty_padding")),
        ),
        ("CONDITIONING",),
        clip_text_encode_sd3,
        description="SD3's three encoders each with its own text; empty_padding 'none' with an empty text: a node "
        "error (ComfyUI leaves that encoder out). Another model's CLIP: a node error.",
    ),
    "CLIPTextEncodeFlux": NodeDef(
        "CLIPTextEncodeFlux",
        "CLIPTextEncodeFlux",
        "advanced/conditioning/flux",
        (
            Input("clip", "CLIP"),
            Input("clip_l", "STRING", "", multiline=True),
            Input("t5xxl", "STRING", "", multiline=True),
            Input("guidance", "FLOAT", 3.5, 0.0, MAX_FLOAT, 0.1),
        ),
        ("CONDITIONING",),
        clip_text_encode_flux,
        description="Flux's CLIP-L pooled output of clip_l, T5's states of t5xxl, and FLUX.1 [dev]'s distilled "
        "guidance.",
    ),
    "FluxDisableGuidance": NodeDef(
        "FluxDisableGuidance",
        "FluxDisableGuidance",
        "advanced/conditioning/flux",
        (Input("conditioning", "CONDITIONING"),),
        ("CONDITIONING",),
        flux_disable_guidance,
        description="FLUX.1 [dev]'s guidance embedding left out altogether (ComfyUI's guidance None); models without "
        "distilled guidance ignore it; on FLUX.2 [dev]: a node error when it samples.",
    ),
    "FluxGuidance": NodeDef(
        "FluxGuidance",
        "FluxGuidance",
        "advanced/conditioning/flux",
        (Input("conditioning", "CONDITIONING"), Input("guidance", "FLOAT", 3.5, 0.0, MAX_FLOAT, 0.1)),
        ("CONDITIONING",),
        flux_guidance,
        description="FLUX.1 [dev]'s / FLUX.2 [dev]'s distilled guidance scale on the conditioning (3.5 where none "
        "is set; FLUX.1 [schnell] and FLUX.2 [klein] have none and ignore it).",
    ),
    "ReferenceLatent": NodeDef(
        "ReferenceLatent",
        "ReferenceLatent",
        "advanced/conditioning/edit_models",
        (Input("conditioning", "CONDITIONING"), Input("latent", "LATENT", optional=True)),
        ("CONDITIONING",),
        reference_latent,
        description="Sets the guiding latent for an edit model (FLUX.1 Kontext, Qwen-Image Edit, FLUX.2 edit: "
        "its 128-channel VAEEncode latent): chain several for several reference images. Other models refuse it at "
        "sampling.",
    ),
    "FluxKontextMultiReferenceLatentMethod": NodeDef(
        "FluxKontextMultiReferenceLatentMethod",
        "FluxKontextMultiReferenceLatentMethod",
        "advanced/conditioning/flux",
        (
            Input("conditioning", "CONDITIONING"),
            Input("reference_latents_method", "COMBO", "offset", choices=KONTEXT_METHODS),
        ),
        ("CONDITIONING",),
        flux_kontext_reference_method,
        description="How FLUX.1 Kontext lays several reference latents out: offset (beside each other, id 1), index "
        "(ids 1, 2, ...) or uxo/uno (shifted past the image). Experimental in ComfyUI.",
    ),
    "FluxKontextImageScale": NodeDef(
        "FluxKontextImageScale",
        "FluxKontextImageScale",
        "advanced/conditioning/flux",
        (Input("image", "IMAGE"),),
        ("IMAGE",),
        flux_kontext_image_scale,
        description="Resizes the image to the FLUX.1 Kontext resolution nearest its aspect ratio (centre cut, "
        "Lanczos).",
    ),
    "EmptySD3LatentImage": NodeDef(
        "EmptySD3LatentImage",
        "EmptySD3LatentImage",
        "latent/sd3",
        (
            Input("width", "INT", 1024, 16, SIDE_MAX, 16, limit="side"),
            Input("height", "INT", 1024, 16, SIDE_MAX, 16, limit="side"),
            Input("batch_size", "INT", 1, 1, 4096, limit="batch"),
        ),
        ("LATENT",),
        empty_sd3_latent,
        description="Zeros of 16 x height/8 x width/8: SD3's, Flux's and Qwen-Image's empty latent.",
    ),
    "ModelSamplingSD3": NodeDef(
        "ModelSamplingSD3",
        "ModelSamplingSD3",
        "advanced/model",
        (Input("model", "MODEL"), Input("shift", "FLOAT", 3.0, 0.0, MAX_FLOAT, 0.01)),
        ("MODEL",),
        model_sampling_sd3,
        description="SD3's flow schedule with this shift (its table of 1000, ComfyUI's ModelSamplingDiscreteFlow); "
        "on a Flux model: a node error when it samples.",
    ),
    "SkipLayerGuidanceSD3": NodeDef(
        "SkipLayerGuidanceSD3",
        "SkipLayerGuidanceSD3",
        "advanced/guidance",
        (
            Input("model", "MODEL"),
            Input("layers", "STRING", "7, 8, 9"),
            Input("scale", "FLOAT", 3.0, 0.0, 10.0, 0.1),
            Input("start_percent", "FLOAT", 0.01, 0.0, 1.0, 0.001),
            Input("end_percent", "FLOAT", 0.15, 0.0, 1.0, 0.001),
        ),
        ("MODEL",),
        skip_layer_guidance_sd3,
        description="Skip-layer guidance on SD3's MMDiT as ComfyUI's: where the sigma lies between start_percent and "
        "end_percent of the schedule, scale x (x0_cond - x0_cond with the joint blocks in layers left out) added after "
        "CFG; on Flux and Chroma the double blocks in layers left out (ComfyUI's rule).",
    ),
    "SkipLayerGuidanceDiT": NodeDef(
        "SkipLayerGuidanceDiT",
        "SkipLayerGuidanceDiT",
        "advanced/guidance",
        (
            Input("model", "MODEL"),
            Input("double_layers", "STRING", "7, 8, 9"),
            Input("single_layers", "STRING", "7, 8, 9"),
            Input("scale", "FLOAT", 3.0, 0.0, 10.0, 0.1),
            Input("start_percent", "FLOAT", 0.01, 0.0, 1.0, 0.001),
            Input("end_percent", "FLOAT", 0.15, 0.0, 1.0, 0.001),
            Input("rescaling_scale", "FLOAT", 0.0, 0.0, 10.0, 0.01),
        ),
        ("MODEL",),
        skip_layer_guidance_dit,
        description="Skip-layer guidance as ComfyUI's generic DiT node, on SD3's MMDiT: SkipLayerGuidanceSD3's term "
        "with the double_layers joint blocks left out (SD3 has no single blocks: single_layers leave nothing out), "
        "then rescaled towards the conditional x0's std by rescaling_scale; on Flux and Chroma the double_layers "
        "double-stream and single_layers single-stream blocks left out; a block the model lacks, or a U-Net: a node "
        "error.",
    ),
    "ModelSamplingFlux": NodeDef(
        "ModelSamplingFlux",
        "ModelSamplingFlux",
        "advanced/model",
        (
            Input("model", "MODEL"),
            Input("max_shift", "FLOAT", 1.15, 0.0, MAX_FLOAT, 0.01),
            Input("base_shift", "FLOAT", 0.5, 0.0, MAX_FLOAT, 0.01),
            Input("width", "INT", 1024, 16, SIDE_MAX, 8),
            Input("height", "INT", 1024, 16, SIDE_MAX, 8),
        ),
        ("MODEL",),
        model_sampling_flux,
        description="Flux's resolution-dependent shift: mu linear in width x height / 256 tokens, base_shift at "
        "256 and max_shift at 4096 (a table of 10000); on an SD3 model: a node error when it samples.",
    ),
    "SetUnionControlNetType": NodeDef(
        "SetUnionControlNetType",
        "SetUnionControlNetType",
        "conditioning/controlnet",
        (Input("control_net", "CONTROL_NET"), Input("type", "COMBO", "auto", choices=("auto", *UNION_TYPES))),
        ("CONTROL_NET",),
        set_union_controlnet_type,
        description="A Union ControlNet's control type: ComfyUI's type number goes to the mode embedding as it is "
        "(a Flux Union ControlNet of InstantX / Shakker-Labs reads it in its own order: canny 0, tile 1, depth 2, "
        "blur 3, pose 4, gray 5, lq 6). A Union ControlNet needs one (auto: a node error when it samples); U-Net "
        "Union ControlNets (ControlNet++) are not supported; InstantX's Qwen-Image Union reads the kind off the "
        "image and takes no type (a node error).",
    ),
    "ControlNetInpaintingAliMamaApply": NodeDef(
        "ControlNetInpaintingAliMamaApply",
        "Apply ControlNet (Inpainting AliMama)",
        "conditioning/controlnet",
        (
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("control_net", "CONTROL_NET"),
            Input("vae", "VAE"),
            Input("image", "IMAGE"),
            Input("mask", "MASK"),
            Input("strength", "FLOAT", 1.0, 0.0, 10.0, 0.01),
            Input("start_percent", "FLOAT", 0.0, 0.0, 1.0, 0.001),
            Input("end_percent", "FLOAT", 1.0, 0.0, 1.0, 0.001),
        ),
        ("CONDITIONING", "CONDITIONING"),
        controlnet_inpainting_alimama_apply,
        output_names=("positive", "negative"),
        description="An SD3 inpainting ControlNet (Alimama's, extra_conditioning_channels 1) on an SD3 model, or "
        "InstantX's Qwen-Image inpainting ControlNet (extra_condition_channels 4) on a Qwen-Image model, with the "
        "picture to inpaint and its MASK (1 = repaint). Prepared as the Python pipeline (diffusers' "
        "StableDiffusion3ControlNetInpaintingPipeline, QwenImageControlNetInpaintPipeline) prepares it, not as "
        "ComfyUI does: the mask resized as the picture and cut at 0.5 (ComfyUI: bilinear, rounded), the masked "
        "pixels black (as ComfyUI), the mask taken to the latent's size by nearest and inverted (1 = keep) as its "
        "extra channel, the hint's latent shifted and scaled as diffusers does (Qwen-Image: normalised as ComfyUI's "
        "Wan21 format, the same). One mask for every row; a mask on another ControlNet, an inpainting "
        "ControlNet through ControlNetApplyAdvanced, or this node on a U-Net model: a node error.",
    ),
    "ControlNetApplySD3": NodeDef(
        "ControlNetApplySD3",
        "Apply Controlnet with VAE",
        "conditioning/controlnet",
        (
            Input("positive", "CONDITIONING"),
            Input("negative", "CONDITIONING"),
            Input("control_net", "CONTROL_NET"),
            Input("vae", "VAE"),
            Input("image", "IMAGE"),
            Input("strength", "FLOAT", 1.0, 0.0, 10.0, 0.01),
            Input("start_percent", "FLOAT", 0.0, 0.0, 1.0, 0.001),
            Input("end_percent", "FLOAT", 1.0, 0.0, 1.0, 0.001),
        ),
        ("CONDITIONING", "CONDITIONING"),
        controlnet_apply_sd3,
        output_names=("positive", "negative"),
        description="ComfyUI's deprecated SD3 node: ControlNetApplyAdvanced with its vae input.",
    ),
}
