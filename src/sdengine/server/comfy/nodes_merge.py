"""ComfyUI's model-merging nodes (``comfy_extras/nodes_model_merging.py``): ModelMergeSimple, ModelMergeAdd,
ModelMergeSubtract, CLIPMergeSimple, CLIPMergeAdd, CLIPMergeSubtract, and CheckpointSave.

ComfyUI merges by patching: ``model1.clone().add_patches(model2's weights, strength_patch, strength_model)``, and
a patched weight is computed, for every key of model1 that model2 has, as::

    W = W1 * strength_model + strength_patch * W2        (W2 with model2's own patches: its LoRAs, its merges)

with (strength_patch, strength_model) = (1 - ratio, ratio) for ModelMergeSimple (so ``ratio`` weighs **model1**:
ratio 1 gives model1, 0 gives model2), (1, 1) for ModelMergeAdd (model1 + model2) and (-multiplier, multiplier) for
ModelMergeSubtract ((model1 - model2) * multiplier). The CLIP nodes do the same on the text encoders, skipping
``.position_ids`` and ``.logit_scale``. Patches apply in the order the nodes were chained, LoRAs (LoraLoader)
included: a LoRA loaded before a merge node is scaled by it, one loaded after is not.

Here the same: a merge node returns a handle (:class:`~sdengine.server.comfy.nodes.ModelHandle` /
``ClipHandle``) whose ``merges`` name the steps (:class:`WeightPatch`, and :class:`LoraStep` for LoRAs loaded
before a merge); the cached pipeline is never changed. While a sampler (or a text encoding) runs, the patched
weights are computed from the pipelines' own (in float32, then the network's dtype) and put on the network's
parameters for that call only, then the originals are put back (the very tensors, bit for bit), as a fused LoRA is.

Where ComfyUI only warns: a key whose shapes differ (an inpainting model1's 9-channel ``conv_in`` against a
4-channel one) keeps model1's weight as it is (ComfyUI's "SHAPE MISMATCH ... WEIGHT NOT MERGED"; it has scaled the
weight by ``strength_model`` first, which this does not copy); two networks with different parameter names (SD 1.x
against SDXL) are a node error, not a model of half-merged layers.

CheckpointSave writes ``output/<filename_prefix>_NNNNN_.safetensors`` (ComfyUI's counter after the highest file of
the prefix; default prefix ``checkpoints/ComfyUI``) in the single-file layout ``sdengine convert`` writes, with the
merged, LoRA-patched weights, the prompt and the workflow (``extra_pnginfo``) as metadata, and the ``v_pred`` marker
for a v-prediction model; a prefix that leaves the output folder is refused, as SaveImage refuses it.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from sdengine.server.comfy.nodes import (
    ClipHandle,
    Input,
    ModelHandle,
    NodeDef,
    NodeError,
    RunContext,
    TinyVaeHandle,
    VaeFileHandle,
    VaeHandle,
)

log = logging.getLogger(__name__)

CLIP_SKIP_SUFFIXES = (".position_ids", ".logit_scale")  # ComfyUI's CLIP merge nodes leave these alone
MAX_COUNTER_TRIES = 10000


@dataclass(frozen=True)
class WeightPatch:
    """One merge node's patch: each weight W of the patched model becomes ``W * strength_model + strength_patch *
    W_other`` (``other``'s weights with all of its own patches)."""

    other: Any  # ModelHandle or ClipHandle
    strength_patch: float
    strength_model: float
    # ModelMergeBlocks / ModelMergeSD1 / ModelMergeSDXL: (LDM key prefix, ratio) in the node's input order; a U-Net
    # weight takes the ratio of the longest prefix its LDM name starts with, else the first one's, and is merged as
    # ``W1 * ratio + (1 - ratio) * W2`` (the strengths above are then unused)
    blocks: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class LoraStep:
    """LoRAs a LoraLoader put on a model before a merge node: fused at that point of the chain, so that the
    merge after them scales them (ComfyUI's order of patches)."""

    loras: tuple[tuple[str, float], ...]


Part = str  # "unet" or "clip"


def _modules(pipe: Any, part: Part) -> dict[str, torch.nn.Module]:
    """The networks a part names: the U-Net, or the text encoders (SDXL's two, the refiner's one)."""
    if part == "unet":
        return {"unet": pipe.unet}
    out = {}
    for name in ("text_encoder", "text_encoder_2"):
        m = getattr(pipe, name, None)
        if isinstance(m, torch.nn.Module):
            out[name] = m
    if not out:
        raise NodeError(
            f"{getattr(pipe, 'name', 'this model')}: its text encoder is not a CLIP network (MiniLM): it cannot be "
            "merged or saved"
        )
    return out


def _params(pipe: Any, part: Part) -> dict[str, torch.nn.Parameter]:
    return {f"{m}.{n}": p for m, mod in _modules(pipe, part).items() for n, p in mod.named_parameters()}


def _check_patchable(pipe: Any, part: Part) -> None:
    if part == "unet":
        from sdengine.nn.fp8 import has_fp8

        if has_fp8(pipe.unet):
            raise NodeError(
                "merging needs the U-Net's own weights, and this one multiplies in FP8 (the fp8 fast path replaced "
                "them): serve the model without fp8 to merge it"
            )
        from sdengine.nn.fp8_storage import has_storage

        if has_storage(pipe.unet):  # a merged weight stored back would be rounded to 8 bits
            raise NodeError(
                "merging needs the U-Net's full-precision weights, and this one holds them in fp8 (serve "
                "--weight-dtype): serve the model without --weight-dtype to merge it"
            )


def _handle_loras(handle: Any) -> tuple[tuple[str, float], ...]:
    return tuple(getattr(handle, "loras", ()))


def _fused_with_loras(
    pipe: Any, part: Part, weights: dict[str, torch.Tensor], loras: tuple[tuple[str, float], ...]
) -> dict[str, torch.Tensor]:
    """``weights`` with ``loras`` fused in (computed on those weights, as ComfyUI patches them in order)."""
    from sdengine.errors import SdengineError
    from sdengine.weights.lora import apply_loras

    params = _params(pipe, part)
    with _swapped(params, weights):
        try:
            if part == "unet":
                handle = apply_loras(pipe.unet, None, list(loras), part="unet", fuse=True)
            else:
                mods = _modules(pipe, part)
                handle = apply_loras(
                    None,
                    mods.get("text_encoder"),
                    list(loras),
                    text_encoder_2=mods.get("text_encoder_2"),
                    part="text_encoders",
                    fuse=True,
                )
        except (OSError, SdengineError) as e:
            raise NodeError(f"LoRA: {e}") from None
        try:
            out = {n: p.data for n, p in params.items()}
        finally:
            handle.remove()
    return out


@contextmanager
def _swapped(params: Mapping[str, torch.nn.Parameter], weights: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """``weights`` on the parameters while the block runs; the original tensors back afterwards (bit for bit)."""
    old: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    try:
        for name, t in weights.items():
            p = params[name]
            if p.data is t:
                continue
            old.append((p, p.data))
            p.data = t
        yield
    finally:
        for p, data in reversed(old):
            p.data = data


def _wider_input(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """An inpainting (9) or instruct-pix2pix (8) model1's input convolution against a 4-channel model2's: the one
    mismatch ComfyUI's merges meet by design (its "WEIGHT NOT MERGED" case)."""
    return len(a) == len(b) == 4 and a[:1] + a[2:] == b[:1] + b[2:] and a[1] in (8, 9) and b[1] == 4


def _check_same_network(
    mine: Mapping[str, tuple[int, ...]], theirs: Mapping[str, tuple[int, ...]], names: str
) -> list[str]:
    """NodeError unless two networks' parameters (name -> shape) are the same but for a wider input convolution of
    the first (:func:`_wider_input`); returns those parameters' names (they keep the first model's weights)."""
    if set(mine) != set(theirs):
        only = sorted(set(mine) - set(theirs)) or sorted(set(theirs) - set(mine))
        raise NodeError(
            f"{names} are different networks ({len(set(mine) ^ set(theirs))} parameters are in one only, e.g. "
            f"{only[0]}): they cannot be merged"
        )
    kept = []
    for name, a in mine.items():
        b = theirs[name]
        if a != b:
            if not _wider_input(a, b):
                raise NodeError(
                    f"{names} are different networks ({name} is {a} in the first, {b} in the second): they cannot be "
                    "merged"
                )
            kept.append(name)
    return kept


def unet_ldm_names(names: list[str]) -> dict[str, str]:
    """ComfyUI's (LDM) name of each sdengine U-Net parameter (``names``: the U-Net's own, e.g.
    ``down_blocks.0.resnets.0.conv1.weight`` -> ``input_blocks.1.0.in_layers.2.weight``); NodeError for a U-Net
    with parameters that have none (a layout the LDM tables do not know)."""
    from sdengine.errors import SdengineError
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import unet_layout_from_diffusers
    from sdengine.weights.sdxl_files import unet_table

    try:
        layout = unet_layout_from_diffusers(dict.fromkeys(names))  # type: ignore[arg-type]  # (reads the names)
    except SdengineError as e:
        raise NodeError(f"the U-Net's block layout cannot be read: {e}") from None
    by_name: Any = {n: n for n in names}  # renamed as tensors would be: the values say which parameter it was
    renamed, unknown = km.rename_keys(by_name, unet_table(layout), to_diffusers=False)
    if unknown:
        raise NodeError(
            f"{len(unknown)} U-Net parameters have no LDM (ComfyUI) name, e.g. {unknown[0]}: the U-Net cannot be "
            "merged by blocks or saved in ComfyUI's layout"
        )
    return {str(orig): ldm for ldm, orig in renamed.items()}


def block_ratio(ldm_key: str, blocks: tuple[tuple[str, float], ...]) -> float:
    """ComfyUI's ModelMergeBlocks rule: the ratio of the longest prefix ``ldm_key`` starts with (the first such one
    on a tie), else the first input's (``input`` of ModelMergeBlocks: time_embed.* and label_emb.* take it)."""
    ratio, longest = blocks[0][1], 0
    for prefix, r in blocks:
        if ldm_key.startswith(prefix) and len(prefix) > longest:
            ratio, longest = r, len(prefix)
    return ratio


def _strengths(current: Mapping[str, torch.Tensor], step: WeightPatch) -> dict[str, tuple[float, float]]:
    """(strength_patch, strength_model) of each weight: the step's own, or by block (``step.blocks``)."""
    if not step.blocks:
        return dict.fromkeys(current, (step.strength_patch, step.strength_model))
    ldm = unet_ldm_names([n.removeprefix("unet.") for n in current])
    out = {}
    for name in current:
        r = block_ratio(ldm[name.removeprefix("unet.")], step.blocks)
        out[name] = (1.0 - r, r)
    return out


def _patch(
    current: dict[str, torch.Tensor], other: Mapping[str, torch.Tensor], step: WeightPatch, part: Part, names: str
) -> dict[str, torch.Tensor]:
    """ComfyUI's "diff" patch of a merge node on every key both models have."""
    shapes = {n: tuple(t.shape) for n, t in current.items()}
    kept = set(_check_same_network(shapes, {n: tuple(t.shape) for n, t in other.items()}, names))
    strengths = _strengths(current, step)
    out = dict(current)
    for name, w in current.items():
        if part == "clip" and name.endswith(CLIP_SKIP_SUFFIXES):
            continue
        if name in kept:
            log.warning("merge: %s is %s in model1 and %s in model2: not merged (as ComfyUI)", name, shapes[name],
                        tuple(other[name].shape))  # fmt: skip
            continue
        strength_patch, strength_model = strengths[name]
        merged = w.float() * strength_model + strength_patch * other[name].to(w.device).float()
        out[name] = merged.to(w.dtype)
    return out


def effective_weights(ctx: RunContext, handle: Any, part: Part, *, with_loras: bool = False) -> dict[str, torch.Tensor]:
    """The weights of ``handle``'s networks (``part``: "unet" or "clip") after its merge steps (and its own LoRAs,
    fused, with ``with_loras``: how another merge node sees it), by parameter name. Each pipeline's own tensors are
    read, never changed."""
    pipe = ctx.pipeline(handle.ref)
    _check_patchable(pipe, part)
    current = {n: p.data for n, p in _params(pipe, part).items()}
    for step in handle.merges:
        if isinstance(step, LoraStep):
            current = _fused_with_loras(pipe, part, current, step.loras)
            continue
        other = effective_weights(ctx, step.other, part, with_loras=True)
        current = _patch(current, other, step, part, "model1 and model2" if part == "unet" else "clip1 and clip2")
    if with_loras and _handle_loras(handle):
        current = _fused_with_loras(pipe, part, current, _handle_loras(handle))
    if any(isinstance(step, WeightPatch) for step in handle.merges):
        ctx.pipeline(handle.ref)  # the worker keeps one model: this one again for what runs next (not the other)
    return current


# The last computed merge of each part on each device, kept for the next prompt with the same handle: a worker runs
# one prompt at a time and a server's workflow repeats, so that the other model is not loaded again on every run.
# ComfyUI's /free drops them (forget_merges).
_LAST: dict[tuple[str, str], Any] = {}
_LAST_LOCK = threading.Lock()


def forget_merges() -> None:
    """Drop the kept merged weights (the server's /free, with the node cache)."""
    with _LAST_LOCK:
        _LAST.clear()


def _recipe_refs(handle: Any) -> list[str]:
    refs = [handle.ref]
    for step in getattr(handle, "merges", ()):
        if isinstance(step, WeightPatch):
            refs += _recipe_refs(step.other)
    return refs


def _state_of(refs: list[str]) -> tuple[Any, ...]:
    from sdengine.io.paths import file_state

    out: list[tuple[str, tuple[int, int] | None]] = []
    for r in refs:
        try:
            out.append((r, file_state(r)))
        except OSError:
            out.append((r, None))
    return tuple(out)


def _merged_for(ctx: RunContext, pipe: Any, handle: Any, part: Part) -> dict[str, torch.Tensor]:
    key = (handle, getattr(pipe, "dtype", None), _state_of(_recipe_refs(handle)))
    slot = (part, str(ctx.device))
    with _LAST_LOCK:
        hit = _LAST.get(slot)
        if hit is not None and hit[0] == key:
            return dict(hit[1])
    weights = effective_weights(ctx, replace(handle, loras=()), part)
    own = {n: p.data for n, p in _params(pipe, part).items()}
    changed = {n: t for n, t in weights.items() if t is not own.get(n)}
    with _LAST_LOCK:
        _LAST[slot] = (key, changed)
    return dict(changed)


@contextmanager
def merges_applied(ctx: RunContext, pipe: Any, handle: Any, part: Part) -> Iterator[None]:
    """``handle``'s merged weights on ``pipe``'s networks while the block runs (nothing without merges); the
    handle's own LoRAs are the caller's to apply on top, as for a model without merges."""
    if not getattr(handle, "merges", ()):
        yield
        return
    weights = _merged_for(ctx, pipe, handle, part)
    with _swapped(_params(pipe, part), weights):
        yield


# ----------------------------------------------------------------------------------------------- nodes


def _merged(
    ctx: RunContext,
    handle: Any,
    other: Any,
    strength_patch: float,
    strength_model: float,
    part: Part,
    blocks: tuple[tuple[str, float], ...] = (),
) -> tuple[Any]:
    """``handle`` with one more patch; its LoRAs so far become a step before it (ComfyUI's order). The two
    networks are compared here (names and shapes, nothing computed), so that a merge of different kinds of model
    fails at its node."""
    names = "model1 and model2" if part == "unet" else "clip1 and clip2"
    p1 = {n: tuple(p.shape) for n, p in _params(ctx.pipeline(handle.ref), part).items()}
    p2 = {n: tuple(p.shape) for n, p in _params(ctx.pipeline(other.ref), part).items()}
    _check_same_network(p1, p2, names)
    if blocks:
        unet_ldm_names([n.removeprefix("unet.") for n in p1])  # a U-Net with LDM names (else a node error here)
    steps = tuple(handle.merges)
    if handle.loras:
        steps += (LoraStep(tuple(handle.loras)),)
    patch = WeightPatch(other, float(strength_patch), float(strength_model), blocks)
    return (replace(handle, loras=(), merges=(*steps, patch)),)


def model_merge_simple(ctx: RunContext, model1: ModelHandle, model2: ModelHandle, ratio: float) -> tuple[Any]:
    return _merged(ctx, model1, model2, 1.0 - float(ratio), float(ratio), "unet")


def model_merge_add(ctx: RunContext, model1: ModelHandle, model2: ModelHandle) -> tuple[Any]:
    return _merged(ctx, model1, model2, 1.0, 1.0, "unet")


def model_merge_subtract(ctx: RunContext, model1: ModelHandle, model2: ModelHandle, multiplier: float) -> tuple[Any]:
    return _merged(ctx, model1, model2, -float(multiplier), float(multiplier), "unet")


def _ratios(node: str, names: tuple[str, ...], values: dict[str, float]) -> tuple[tuple[str, float], ...]:
    """The block ratios of a ModelMergeBlocks-style node in its inputs' order (the first is the default)."""
    extra = sorted(set(values) - set(names))
    if extra:
        raise NodeError(f"{node}: no input {extra[0]!r}")
    out = []
    for n in names:
        r = float(values.get(n, 1.0))
        if not 0.0 <= r <= 1.0:
            raise NodeError(f"{node}: {n} must be between 0 and 1, got {r:g}")
        out.append((n, r))
    return tuple(out)


BLOCK_INPUTS = ("input", "middle", "out")  # ModelMergeBlocks' ratios: "out" also prefixes output_blocks.* and out.*
SD1_BLOCK_INPUTS = (
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}." for i in range(12)),
    *(f"middle_block.{i}." for i in range(3)),
    *(f"output_blocks.{i}." for i in range(12)),
    "out.",
)
SDXL_BLOCK_INPUTS = (  # (ComfyUI's names of SDXL's blocks have no final dot)
    "time_embed.",
    "label_emb.",
    *(f"input_blocks.{i}" for i in range(9)),
    *(f"middle_block.{i}" for i in range(3)),
    *(f"output_blocks.{i}" for i in range(9)),
    "out.",
)


def model_merge_blocks(ctx: RunContext, model1: ModelHandle, model2: ModelHandle, **ratios: float) -> tuple[Any]:
    return _merged(ctx, model1, model2, 0.0, 1.0, "unet", _ratios("ModelMergeBlocks", BLOCK_INPUTS, ratios))


def model_merge_sd1(ctx: RunContext, model1: ModelHandle, model2: ModelHandle, **ratios: float) -> tuple[Any]:
    return _merged(ctx, model1, model2, 0.0, 1.0, "unet", _ratios("ModelMergeSD1", SD1_BLOCK_INPUTS, ratios))


def model_merge_sdxl(ctx: RunContext, model1: ModelHandle, model2: ModelHandle, **ratios: float) -> tuple[Any]:
    return _merged(ctx, model1, model2, 0.0, 1.0, "unet", _ratios("ModelMergeSDXL", SDXL_BLOCK_INPUTS, ratios))


def clip_merge_simple(ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle, ratio: float) -> tuple[Any]:
    return _merged(ctx, clip1, clip2, 1.0 - float(ratio), float(ratio), "clip")


def clip_merge_add(ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle) -> tuple[Any]:
    return _merged(ctx, clip1, clip2, 1.0, 1.0, "clip")


def clip_merge_subtract(ctx: RunContext, clip1: ClipHandle, clip2: ClipHandle, multiplier: float) -> tuple[Any]:
    return _merged(ctx, clip1, clip2, -float(multiplier), float(multiplier), "clip")


# ------------------------------------------------------------------------------------------ CheckpointSave


def _prefix_variables(prefix: str) -> str:
    """ComfyUI's variables of a save prefix: %width% / %height% (0 for a checkpoint, as ComfyUI passes no image)
    and the local time's %year% %month% %day% %hour% %minute% %second%."""
    if "%" not in prefix:
        return prefix
    now = time.localtime()
    values = {
        "width": "0",
        "height": "0",
        "year": str(now.tm_year),
        "month": f"{now.tm_mon:02d}",
        "day": f"{now.tm_mday:02d}",
        "hour": f"{now.tm_hour:02d}",
        "minute": f"{now.tm_min:02d}",
        "second": f"{now.tm_sec:02d}",
    }
    for k, v in values.items():
        prefix = prefix.replace(f"%{k}%", v)
    return prefix


def _output_target(ctx: RunContext, filename_prefix: str) -> tuple[Path, str]:
    """(folder inside the output folder, file stem) of a save prefix; NodeError for one that leaves it."""
    from sdengine.io.paths import NAME_MAX, UnsafePathError, check_name, is_inside

    prefix = _prefix_variables(filename_prefix.strip() or "ComfyUI")
    sub, _, stem = prefix.replace("\\", "/").rpartition("/")
    root = ctx.folders.root("output")
    try:
        if sub:
            check_name(sub, "filename_prefix")
        check_name(stem, "filename_prefix")
    except (UnsafePathError, ValueError) as e:
        raise NodeError(str(e)) from None
    folder = root / sub
    ctx.folders.make_root("output")
    if not is_inside(root, folder) or stem.startswith("."):
        raise NodeError(f"filename_prefix {prefix!r} leaves the output folder")
    if len(f"{stem}_00000_.safetensors".encode()) > NAME_MAX:
        raise NodeError(f"filename_prefix {stem[:40]!r}... is too long: its file names would be over {NAME_MAX} bytes")
    return folder, stem


def _vae_module(ctx: RunContext, vae: Any, node: str = "CheckpointSave") -> torch.nn.Module:
    if isinstance(vae, TinyVaeHandle):
        raise NodeError(f"{node} needs a full VAE; taesd (the tiny VAE) cannot be saved")
    if isinstance(vae, VaeFileHandle):
        from sdengine.weights.loading import build_vae

        try:
            return build_vae(vae.path, scaling_factor=0.18215)
        except (OSError, ValueError) as e:
            raise NodeError(f"VAE {Path(vae.path).name}: {e}") from None
    if isinstance(vae, VaeHandle):
        return ctx.pipeline(vae.ref).vae
    raise NodeError(f"vae: expected a VAE, got {type(vae).__name__}")


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in module.state_dict().items()}


def checkpoint_save(
    ctx: RunContext, model: ModelHandle, clip: ClipHandle, vae: Any, filename_prefix: str
) -> dict[str, Any]:
    from sdengine.errors import SdengineError
    from sdengine.weights.loading import CONFIG_METADATA_KEY, components_to_ldm, load_checkpoint
    from sdengine.weights.sdxl_files import sdxl_components_to_ldm

    folder, stem = _output_target(ctx, filename_prefix)
    pipe = ctx.pipeline(model.ref)
    try:
        ckpt = load_checkpoint(pipe.source)  # the configs of the model's files (weights memory-mapped, not read)
    except (OSError, SdengineError) as e:
        raise NodeError(f"model {Path(str(pipe.source)).name}: {e}") from None
    if ckpt.text_encoder_type != "clip":
        raise NodeError(f"{pipe.name}: its text encoder is MiniLM (by reference, no weights): it cannot be saved")
    states: dict[str, dict[str, torch.Tensor]] = {}
    # the U-Net: merged, with the model's LoRAs fused in
    weights = effective_weights(ctx, model, "unet", with_loras=True)
    pipe = ctx.pipeline(model.ref)
    with _swapped(_params(pipe, "unet"), weights):
        states["unet"] = _cpu_state(pipe.unet)
    clip_pipe = ctx.pipeline(clip.ref)
    weights = effective_weights(ctx, clip, "clip", with_loras=True)
    clip_pipe = ctx.pipeline(clip.ref)
    with _swapped(_params(clip_pipe, "clip"), weights):
        for name, mod in _modules(clip_pipe, "clip").items():
            states[name] = _cpu_state(mod)
    states["vae"] = _cpu_state(_vae_module(ctx, vae))
    for comp, sd in states.items():  # the parts must be this model's networks (a CLIP of another model is not)
        want = ckpt.state_dicts.get(comp)
        if want is None or set(want) != set(sd) or any(tuple(want[k].shape) != tuple(sd[k].shape) for k in sd):
            raise NodeError(
                f"CheckpointSave: the {comp.replace('_', ' ')} given is not a network of {pipe.name}'s kind"
            )
    if set(ckpt.state_dicts) - set(states):
        missing = sorted(set(ckpt.state_dicts) - set(states))
        raise NodeError(f"CheckpointSave: no {', '.join(missing)} given for {pipe.name}")
    ckpt.state_dicts = states
    if model.prediction is not None:  # ModelSamplingDiscrete: the file says what the model now predicts
        ckpt.prediction_type = model.prediction
        ckpt.configs["scheduler"] = {**ckpt.configs["scheduler"], "prediction_type": model.prediction}
    if model.zsnr:
        ckpt.configs["scheduler"] = {**ckpt.configs["scheduler"], "rescale_betas_zero_snr": True}
    try:
        sdxl = ckpt.family in ("sdxl", "sdxl_refiner")
        if sdxl:
            scheduler = {**ckpt.configs["scheduler"], "prediction_type": ckpt.prediction_type}
            flat = sdxl_components_to_ldm(ckpt.state_dicts, {**ckpt.configs, "scheduler": scheduler})
        else:
            flat = components_to_ldm(ckpt)
    except SdengineError as e:
        raise NodeError(f"CheckpointSave: {e}") from None
    cfgs = {
        k: v for k, v in ckpt.configs.items() if k in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
    }
    meta = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(cfgs, sort_keys=True),
        "sdengine.prediction_type": ckpt.prediction_type,
        "modelspec.predict_key": "v" if ckpt.prediction_type == "v_prediction" else "epsilon",
        "prompt": json.dumps(ctx.prompt) if ctx.prompt else "",
    }
    for k, v in ctx.extra_pnginfo.items():
        meta[str(k)] = json.dumps(v)
    target = _write_numbered(ctx, folder, stem, flat, meta)
    log.info("CheckpointSave: %s", target)
    return {"ui": {}, "result": ()}


# ------------------------------------------------------------------------------ ModelSave / CLIPSave / VAESave


def _prompt_metadata(ctx: RunContext) -> dict[str, str]:
    """ComfyUI's metadata of a saved file: the prompt and the workflow (extra_pnginfo), as JSON."""
    meta = {"prompt": json.dumps(ctx.prompt) if ctx.prompt else ""}
    for k, v in ctx.extra_pnginfo.items():
        meta[str(k)] = json.dumps(v)
    return meta


def model_save(ctx: RunContext, model: ModelHandle, filename_prefix: str) -> dict[str, Any]:
    """ComfyUI's ModelSave: the U-Net alone (merges and LoRAs baked in) under ``model.diffusion_model.`` with its
    LDM names, the ``v_pred`` (and ``ztsnr``) marker of a v-prediction model, ``modelspec.predict_key``."""
    from sdengine.weights.sdxl_files import prediction_markers

    folder, stem = _output_target(ctx, filename_prefix)
    weights = effective_weights(ctx, model, "unet", with_loras=True)
    pipe = ctx.pipeline(model.ref)
    with _swapped(_params(pipe, "unet"), weights):
        state = _cpu_state(pipe.unet)
    ldm = unet_ldm_names(list(state))
    flat = {"model.diffusion_model." + ldm[k]: v for k, v in state.items()}
    prediction = model.prediction or str(getattr(pipe, "prediction_type", "epsilon"))
    zsnr = model.zsnr or bool((getattr(pipe, "scheduler_config", None) or {}).get("rescale_betas_zero_snr"))
    flat.update(prediction_markers({"prediction_type": prediction, "rescale_betas_zero_snr": zsnr}))
    meta = {"format": "pt", "modelspec.predict_key": "v" if prediction == "v_prediction" else "epsilon"}
    if getattr(pipe.unet.config, "addition_time_embed_dim", None) is not None:  # SDXL: ComfyUI's modelspec
        refiner = not isinstance(getattr(pipe, "text_encoder", None), torch.nn.Module)
        meta["modelspec.architecture"] = f"stable-diffusion-xl-v1-{'refiner' if refiner else 'base'}"
        meta["modelspec.sai_model_spec"] = "1.0.0"
        meta["modelspec.implementation"] = "sgm"
    meta.update(_prompt_metadata(ctx))
    target = _write_numbered(ctx, folder, stem, flat, meta)
    log.info("ModelSave: %s", target)
    return {"ui": {}, "result": ()}


def _clip_name(role: str, module: torch.nn.Module, sdxl: bool) -> str:
    """ComfyUI's name of a text encoder (its CLIPSave file suffix): SDXL's clip_l and clip_g, SD 1.x's clip_l
    (OpenAI CLIP, quick_gelu), SD 2.x's OpenCLIP ViT-H clip_h (exact gelu)."""
    if sdxl:
        return "clip_g" if role == "text_encoder_2" else "clip_l"
    return "clip_h" if getattr(getattr(module, "config", None), "hidden_act", None) == "gelu" else "clip_l"


def clip_save(ctx: RunContext, clip: ClipHandle, filename_prefix: str) -> dict[str, Any]:
    """ComfyUI's CLIPSave: one file per text encoder, ``<prefix>_<clip_l|clip_g|clip_h>_NNNNN_.safetensors``, in
    transformers' CLIPTextModel names (``text_model.*``, SDXL's clip_g with ``text_projection.weight``), merges
    and LoRAs baked in."""
    pipe = ctx.pipeline(clip.ref)
    _modules(pipe, "clip")  # a CLIP model (MiniLM: a node error)
    weights = effective_weights(ctx, clip, "clip", with_loras=True)
    pipe = ctx.pipeline(clip.ref)
    mods = _modules(pipe, "clip")
    states: dict[str, dict[str, torch.Tensor]] = {}
    with _swapped(_params(pipe, "clip"), weights):
        for role, mod in mods.items():
            states[role] = {k: v for k, v in _cpu_state(mod).items() if not k.endswith(CLIP_SKIP_SUFFIXES)}
    sdxl = "text_encoder_2" in mods
    meta = {"format": "pt", **_prompt_metadata(ctx)}
    written = []
    for role, state in states.items():
        name = _clip_name(role, mods[role], sdxl)
        folder, stem = _output_target(ctx, f"{filename_prefix.strip() or 'ComfyUI'}_{name}")
        written.append(_write_numbered(ctx, folder, stem, state, meta))
    log.info("CLIPSave: %s", ", ".join(map(str, written)))
    return {"ui": {}, "result": ()}


def vae_save(ctx: RunContext, vae: Any, filename_prefix: str) -> dict[str, Any]:
    """ComfyUI's VAESave: the VAE's weights in the LDM layout, without ``first_stage_model.`` (what VAELoader
    reads)."""
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers

    state = _cpu_state(_vae_module(ctx, vae, "VAESave"))  # (taesd refused before any folder is made)
    folder, stem = _output_target(ctx, filename_prefix)
    flat, bad = km.vae_diffusers_to_ldm(state, vae_layout_from_diffusers(state))
    if bad:
        raise NodeError(f"VAESave: {len(bad)} VAE weights have no LDM name, e.g. {bad[0]}")
    target = _write_numbered(ctx, folder, stem, flat, _prompt_metadata(ctx))
    log.info("VAESave: %s", target)
    return {"ui": {}, "result": ()}


def _write_numbered(
    ctx: RunContext, folder: Path, stem: str, tensors: dict[str, torch.Tensor], meta: dict[str, str]
) -> Path:
    """``tensors`` written as ``folder/<stem>_NNNNN_.safetensors``, NNNNN one past the highest of the stem there
    (ComfyUI's counter); returns the file."""
    from sdengine.weights.io import save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(re.escape(stem) + r"_(\d+)_\.safetensors")
    lock = ctx.save_lock if ctx.save_lock is not None else threading.Lock()
    with lock:
        used = [int(m.group(1)) for p in folder.iterdir() if (m := pattern.fullmatch(p.name))]
        counter = max(used, default=0) + 1
        for _ in range(MAX_COUNTER_TRIES):
            target = folder / f"{stem}_{counter:05d}_.safetensors"
            if not target.exists():
                break
            counter += 1
        else:
            raise NodeError(f"no free file name for {stem!r} in {MAX_COUNTER_TRIES} numbers after the highest")
        save_safetensors(tensors, target, metadata=meta)
    return target


# ----------------------------------------------------------------------------------------------- table


def _ratio(name: str, default: float, lo: float, hi: float) -> Input:
    return Input(name, "FLOAT", default, lo, hi, 0.01)


NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "ModelMergeSimple",
            "ModelMergeSimple",
            "advanced/model_merging",
            (Input("model1", "MODEL"), Input("model2", "MODEL"), _ratio("ratio", 1.0, 0.0, 1.0)),
            ("MODEL",),
            model_merge_simple,
            description="As ComfyUI: model1 * ratio + model2 * (1 - ratio) on every U-Net weight (ratio weighs "
            "model1: 1 gives model1); applied while a sampler runs, the loaded model unchanged.",
        ),
        NodeDef(
            "ModelMergeSubtract",
            "ModelMergeSubtract",
            "advanced/model_merging",
            (Input("model1", "MODEL"), Input("model2", "MODEL"), _ratio("multiplier", 1.0, -10.0, 10.0)),
            ("MODEL",),
            model_merge_subtract,
            description="As ComfyUI: (model1 - model2) * multiplier on every U-Net weight.",
        ),
        NodeDef(
            "ModelMergeAdd",
            "ModelMergeAdd",
            "advanced/model_merging",
            (Input("model1", "MODEL"), Input("model2", "MODEL")),
            ("MODEL",),
            model_merge_add,
            description="As ComfyUI: model1 + model2 on every U-Net weight (with ModelMergeSubtract: A + (B - C)).",
        ),
        NodeDef(
            "CLIPMergeSimple",
            "CLIPMergeSimple",
            "advanced/model_merging",
            (Input("clip1", "CLIP"), Input("clip2", "CLIP"), _ratio("ratio", 1.0, 0.0, 1.0)),
            ("CLIP",),
            clip_merge_simple,
            description="As ComfyUI: clip1 * ratio + clip2 * (1 - ratio) on the text encoders' weights.",
        ),
        NodeDef(
            "CLIPMergeSubtract",
            "CLIPMergeSubtract",
            "advanced/model_merging",
            (Input("clip1", "CLIP"), Input("clip2", "CLIP"), _ratio("multiplier", 1.0, -10.0, 10.0)),
            ("CLIP",),
            clip_merge_subtract,
            description="As ComfyUI: (clip1 - clip2) * multiplier on the text encoders' weights.",
        ),
        NodeDef(
            "CLIPMergeAdd",
            "CLIPMergeAdd",
            "advanced/model_merging",
            (Input("clip1", "CLIP"), Input("clip2", "CLIP")),
            ("CLIP",),
            clip_merge_add,
            description="As ComfyUI: clip1 + clip2 on the text encoders' weights.",
        ),
        NodeDef(
            "CheckpointSave",
            "Save Checkpoint",
            "advanced/model_merging",
            (
                Input("model", "MODEL"),
                Input("clip", "CLIP"),
                Input("vae", "VAE"),
                Input("filename_prefix", "STRING", "checkpoints/ComfyUI"),
            ),
            (),
            checkpoint_save,
            output_node=True,
            description="output/PREFIX_NNNNN_.safetensors in the single-file layout, merges and LoRAs baked in, "
            "the prompt as metadata; a prefix outside the output folder is refused.",
        ),
        NodeDef(
            "ModelMergeBlocks",
            "ModelMergeBlocks",
            "advanced/model_merging",
            (Input("model1", "MODEL"), Input("model2", "MODEL"), *(_ratio(n, 1.0, 0.0, 1.0) for n in BLOCK_INPUTS)),
            ("MODEL",),
            model_merge_blocks,
            description="As ComfyUI: model1 * ratio + model2 * (1 - ratio) by U-Net block (LDM names): input for "
            "input_blocks.*, middle for middle_block.*, out for output_blocks.* and out.*, input's for the rest.",
        ),
        NodeDef(
            "ModelMergeSD1",
            "ModelMergeSD1",
            "advanced/model_merging/model_specific",
            (Input("model1", "MODEL"), Input("model2", "MODEL"), *(_ratio(n, 1.0, 0.0, 1.0) for n in SD1_BLOCK_INPUTS)),
            ("MODEL",),
            model_merge_sd1,
            description="As ComfyUI: ModelMergeBlocks with one ratio per SD 1.x / 2.x block (model1's share; the "
            "longest prefix wins, time_embed.'s for any other weight).",
        ),
        NodeDef(
            "ModelMergeSD2",
            "ModelMergeSD2",
            "advanced/model_merging/model_specific",
            (Input("model1", "MODEL"), Input("model2", "MODEL"), *(_ratio(n, 1.0, 0.0, 1.0) for n in SD1_BLOCK_INPUTS)),
            ("MODEL",),
            model_merge_sd1,
            description="As ComfyUI: ModelMergeSD1 (SD 2.x has the same blocks).",
        ),
        NodeDef(
            "ModelMergeSDXL",
            "ModelMergeSDXL",
            "advanced/model_merging/model_specific",
            (
                Input("model1", "MODEL"),
                Input("model2", "MODEL"),
                *(_ratio(n, 1.0, 0.0, 1.0) for n in SDXL_BLOCK_INPUTS),
            ),
            ("MODEL",),
            model_merge_sdxl,
            description="As ComfyUI: ModelMergeBlocks with one ratio per SDXL block (model1's share).",
        ),
        NodeDef(
            "ModelSave",
            "ModelSave",
            "advanced/model_merging",
            (Input("model", "MODEL"), Input("filename_prefix", "STRING", "diffusion_models/ComfyUI")),
            (),
            model_save,
            output_node=True,
            description="output/PREFIX_NNNNN_.safetensors: the U-Net alone as model.diffusion_model.* (LDM names), "
            "merges and LoRAs baked in, the v_pred marker of a v-prediction model.",
        ),
        NodeDef(
            "CLIPSave",
            "CLIPSave",
            "advanced/model_merging",
            (Input("clip", "CLIP"), Input("filename_prefix", "STRING", "clip/ComfyUI")),
            (),
            clip_save,
            output_node=True,
            description="output/PREFIX_clip_l_NNNNN_.safetensors (and _clip_g for SDXL, _clip_h for SD 2.x): each "
            "text encoder in transformers' text_model.* names, merges and LoRAs baked in.",
        ),
        NodeDef(
            "VAESave",
            "VAESave",
            "advanced/model_merging",
            (Input("vae", "VAE"), Input("filename_prefix", "STRING", "vae/ComfyUI_vae")),
            (),
            vae_save,
            output_node=True,
            description="output/PREFIX_NNNNN_.safetensors: the VAE in the LDM layout without first_stage_model. "
            "(what VAELoader reads); taesd is refused.",
        ),
    )
}
