"""The settings of a call as A1111 writes them (``parameters`` text), and the model/LoRA hashes in it."""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sdengine.diffusion.sampling import resolve, sampler_option_names
from sdengine.io.atomic import write_text_atomic
from sdengine.metadata import A1111_SAMPLER_FIELDS, eta_field
from sdengine.nn.lora import exact_number
from sdengine.pipeline.control import ControlUnit


def format_infotext(params: Mapping[str, Any]) -> str:
    """A1111 ``parameters`` text of a result's parameters (see sdengine.metadata)."""
    from sdengine.metadata import format_parameters

    return format_parameters({k: v for k, v in params.items() if v is not None})


def hash_cache_file() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sdengine" / "model_hashes.json"


def cached_hash(f: Any, compute: Callable[[Any], str]) -> str:
    """``compute(f)``, remembered in ~/.cache/sdengine/model_hashes.json by path, size and mtime (of each file,
    when ``f`` is a list of files): hashing a multi-GB checkpoint takes seconds, and A1111 caches it the same
    way."""
    files = [f] if isinstance(f, Path) else list(f)
    key = "+".join(f"{x.resolve()}|{st.st_size}|{st.st_mtime_ns}" for x, st in ((x, x.stat()) for x in files))
    cache = hash_cache_file()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    h = compute(f)
    try:
        write_text_atomic(cache, json.dumps({**(known if isinstance(known, dict) else {}), key: h}))
    except OSError:
        pass  # a read-only home only costs the next run a re-hash
    return h


def hashed_files(source: Path | None, component: str) -> list[Path]:
    """The files whose bytes make a "Model hash" (``component="unet"``) or "VAE hash" (``"vae"``): a single
    file itself; for a diffusers folder, the files the loader reads for that component (its ``unet/`` or
    ``vae/`` subfolder, or the folder itself for a VAE folder): one weights file, or every shard of a sharded
    one in order. [] when there is none."""
    if source is None:
        return []
    if source.is_file():
        return [source]
    if not source.is_dir():
        return []
    from sdengine.weights.io import WeightsError
    from sdengine.weights.loading import component_weight_files

    folder = source / component
    if component == "vae" and not (folder / "config.json").is_file():
        folder = source  # a VAE folder given itself
    if not folder.is_dir():
        return []
    try:
        return component_weight_files(folder)
    except WeightsError:
        return []


def files_hash_cached(files: Sequence[Path]) -> str | None:
    """A1111's 10-hex-digit hash of ``files`` (see :func:`sdengine.metadata.files_hash`), cached."""
    from sdengine.metadata import files_hash, model_hash

    if not files:
        return None
    if len(files) == 1:
        return cached_hash(files[0], model_hash)
    return cached_hash(list(files), files_hash)


def weights_file(source: Path | None) -> Path | None:
    """The file whose hash is the model's: the file itself, or a folder's U-Net weights."""
    if source is None:
        return None
    if source.is_dir():
        candidates = sorted((source / "unet").glob("diffusion_pytorch_model*.safetensors")) + sorted(
            (source / "unet").glob("diffusion_pytorch_model*.bin")
        )
        return candidates[0] if candidates else None
    return source if source.is_file() else None


def lora_hashes(loras: Sequence[tuple[Any, Any]], lora_dir: str | Path | None) -> dict[str, str]:
    from sdengine.metadata import lora_hash
    from sdengine.weights.lora import resolve_lora

    out: dict[str, str] = {}
    for src, _ in loras:
        if isinstance(src, str | Path):
            try:
                path = resolve_lora(src, lora_dir)
            except Exception:  # noqa: BLE001 - the LoRA itself loaded; a hash is descriptive only
                continue
            out[Path(path).stem] = lora_hash(path)
    return out


def _file_name_and_hash(source: Any) -> tuple[str, str | None]:
    """The name an infotext gives a file or folder (its stem, a folder's name) and its hash (:func:`model_hash` of
    the file, of a folder's one weights file; None when there is no such file)."""
    path = Path(source)
    if path.is_dir():
        weights = [p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file()]
        return path.name, files_hash_cached(weights[:1])
    return path.stem, files_hash_cached([path]) if path.is_file() else None


def ip_adapter_infotext(unit: Any) -> str:
    """The ``IP-Adapter N`` value of a request's :class:`sdengine.pipeline.ip_adapter.IPAdapterUnit` (as given, before
    its files are loaded: :func:`sdengine.metadata.format_ip_adapter`). A file names itself and its hash; a loaded
    adapter or encoder its file name only (no hash: ``--from-png`` then needs the file named again)."""
    from sdengine.metadata import format_ip_adapter
    from sdengine.models.clip_vision import CLIPVisionModel

    if isinstance(unit.adapter, str | Path):
        model, digest = _file_name_and_hash(unit.adapter)
    else:
        model, digest = Path(unit.name).stem, None
    encoder = encoder_hash = rule = count = None
    if unit.images is not None:  # pictures through a CLIP vision encoder (else the caller's outputs: not recorded)
        if isinstance(unit.clip_vision, CLIPVisionModel):
            encoder = Path(unit.clip_vision.name or "CLIP vision").stem
        elif unit.clip_vision is not None:
            encoder, encoder_hash = _file_name_and_hash(unit.clip_vision)
        rule = unit.negative_rule
        count = len(unit.images) if isinstance(unit.images, list | tuple) else 1
    return format_ip_adapter(
        model,
        model_hash=digest,
        weight=float(unit.scale),
        clip_vision=encoder,
        clip_vision_hash=encoder_hash,
        negative_rule=rule,
        images=count,
        start=float(unit.start),
        end=float(unit.end),
        scaling=unit.scaling,
        layer_scales=unit.layer_scales,
    )


# the defaults of the sampler options A1111 writes under its own names (metadata.A1111_SAMPLER_FIELDS)
SAMPLER_OPTION_DEFAULTS = {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}


def init_resize_mode(request: Any) -> Any:
    """The resize mode an infotext records for a request's init image: A1111's latent upscale
    (``init_latent_resize``) by its name, else the request's ``resize_mode``."""
    from sdengine.io.resize import LATENT_UPSCALE

    return LATENT_UPSCALE if getattr(request, "init_latent_resize", False) else request.resize_mode


def call_parameters(
    *,
    prompt: str,
    negative_prompt: str,
    steps: int,
    sampler: str,
    schedule: str,
    cfg_scale: float,
    seed: int,
    width: int,
    height: int,
    model: str,
    model_hash: str | None,
    vae: str | None = None,
    vae_hash: str | None = None,
    strength: float | None,
    clip_skip: int,
    guidance_rescale: float,
    loras: Sequence[tuple[Any, Any]],
    n_tag_loras: int,
    lora_dir: str | Path | None,
    controlnets: Sequence[ControlUnit],
    mask_blur: float | None,
    resize_mode: Any = None,
    sampler_options: Mapping[str, Any] | None = None,
    prediction_override: str | None = None,
    strength_rule: str = "diffusers",
    sdxl: Any = None,
    clip_skip_rule: str = "sdengine",
    guess_mode: bool = False,
    ip_adapters: Sequence[Any] = (),
) -> dict[str, Any]:
    """The parameters dict of one image (sdengine.metadata writes it as A1111 text). LoRAs passed as
    arguments are written as <lora:NAME:W> tags, as A1111 keeps them, so that the infotext alone says which
    ones were used (regenerate with the same lora_dir); separate text-encoder / U-Net weights (a LoRAWeight) as
    A1111's <lora:NAME:TE:UNET>."""
    tags = "".join(
        f" <lora:{Path(src).stem}:{exact_number(w) if isinstance(w, int | float) else w}>"  # LoRAWeight: TE:UNET
        for src, w in loras[: len(loras) - n_tag_loras]
        if isinstance(src, str | Path)
    )
    params: dict[str, Any] = {
        # a prompt whose tags were taken out ("an apple <lora:x:1>" -> "an apple ") does not grow a space per reuse
        "prompt": prompt.rstrip() + tags if tags else prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "sampler": sampler,
        "schedule": schedule,
        "cfg_scale": cfg_scale,
        "seed": seed,
        "width": width,
        "height": height,
        "model": model,
        "model_hash": model_hash,
        "strength": strength,
        "clip_skip": clip_skip,
    }
    if vae is not None:  # a separate VAE, as A1111 names it (its own VAE is not named)
        params["vae_hash"] = vae_hash
        params["vae"] = vae
    hashes = lora_hashes(loras, lora_dir) if loras else {}
    if hashes:
        params["lora_hashes"] = hashes
    if guidance_rescale:
        params["CFG Rescale phi"] = guidance_rescale  # the name A1111's CFG-rescale extension writes
    if mask_blur:
        params["Mask blur"] = mask_blur
    for k, unit in enumerate(controlnets):
        params[f"ControlNet {k}"] = unit.infotext()
    if guess_mode and controlnets:  # sdengine's field: diffusers' guess mode (the extension has none)
        params["ControlNet guess mode"] = True
    for k, ip_unit in enumerate(ip_adapters):  # sdengine's field (docs/ip-adapter.md, Command line)
        params[f"IP-Adapter {k}"] = ip_adapter_infotext(ip_unit)
    if any(unit.rule != "diffusers" for unit in controlnets):  # sdengine's field, read back by --from-png:
        # A1111's ControlNet extension counts start/end its own way (pipeline.control.step_keep), one per unit
        params["ControlNet step rule"] = ",".join(unit.rule for unit in controlnets)
    # sdengine's fields for what changes the image and A1111 does not write (read back by --from-png)
    if resize_mode is not None:
        from sdengine.io.resize import LATENT_UPSCALE, RESIZE_MODES, resize_mode_name

        mode = LATENT_UPSCALE if resize_mode == LATENT_UPSCALE else resize_mode_name(resize_mode)
        if mode != RESIZE_MODES[0]:
            params["Resize mode"] = mode
    if strength_rule != "diffusers":  # sdengine's field: how the strength counted the steps (A1111's rule)
        params["Strength rule"] = strength_rule
    # sdengine's field: the Clip skip is A1111's (applied to SD 1.x's CLIP only; with its sdxl_clip_l_skip on, to
    # SDXL's CLIP-L too, even at 1); without it an sdengine image's is its own
    if (clip_skip_rule == "a1111" and clip_skip != 1) or clip_skip_rule == "a1111_sdxl_clip_l":
        params["Clip skip rule"] = clip_skip_rule
    options = dict(sampler_options or {})
    for key, field_name in A1111_SAMPLER_FIELDS.items():  # A1111's own fields for k-diffusion's churn/noise
        if key in options:
            value = options.pop(key)
            if value != SAMPLER_OPTION_DEFAULTS[key]:  # as A1111: written only when not the default
                params[field_name] = value
    name = resolve(sampler, schedule)[0] if sampler else None
    if "eta" in options and name is not None and "eta" in sampler_option_names(name):
        # A1111's "Eta" (its k-diffusion samplers that take one) or "Eta DDIM", written where not its default
        eta_name, eta_default = eta_field(name)
        eta = options.pop("eta")
        if eta != eta_default:
            params[eta_name] = eta
    if name == "unipc":  # A1111's fields, both written: an infotext without them means A1111's defaults (bh1, 3)
        from sdengine.diffusion.samplers import sample_unipc

        params["UniPC variant"] = options.pop("variant", inspect.signature(sample_unipc).parameters["variant"].default)
        params["UniPC order"] = options.pop("order", inspect.signature(sample_unipc).parameters["order"].default)
    if options:
        params["Sampler options"] = json.dumps(options, sort_keys=True)
    if prediction_override is not None:
        params["Prediction type"] = prediction_override
    if sdxl is not None:  # SDXL's prompt_2 and size numbers (A1111 has no fields for them)
        from sdengine.text.sdxl_conditioner import SDXLOptions

        changed = SDXLOptions.coerce(sdxl).changed()
        if changed:
            params["SDXL options"] = json.dumps(changed, sort_keys=True)
    return params


__all__ = [
    "cached_hash",
    "call_parameters",
    "files_hash_cached",
    "format_infotext",
    "hash_cache_file",
    "hashed_files",
    "ip_adapter_infotext",
    "lora_hashes",
    "weights_file",
]
