"""FLUX.2 files: a diffusers pipeline folder's ``transformer/`` (``Flux2Transformer2DModel``, sharded too) and
``vae/`` (``AutoencoderKLFlux2``) folders.

The names are diffusers', which :class:`sdengine.models.flux2.Flux2Transformer` and
:class:`sdengine.models.flux2_vae.Flux2VAE` keep, so nothing is renamed; the config is the folder's
``config.json``, checked against the weights (one line naming the first missing, unexpected or misshapen tensor).
Reading, dtype choice and the meta-device build are Flux's (:func:`sdengine.weights.flux_file.load_transformer`).
Single files (BFL's ``flux-2-klein-*.safetensors``, ComfyUI's) are not read yet: refused in one line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.flux2 import Flux2Config, Flux2Transformer
from sdengine.models.flux2_vae import Flux2VAE, Flux2VAEConfig

from .flux_file import build_from_state, compute_dtype, load_transformer, read_shards, stored_dtype
from .io import WeightsError, parse_dtype
from .loading import check_keys, component_weight_files, parameters_on_meta


def flux2_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: Flux2Config | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Flux2Transformer:
    """A :class:`Flux2Transformer` of ``config`` from a state dict in diffusers' names (strict: one line naming the
    first difference). A single file (no config) is refused."""
    if config is None:
        raise WeightsError(
            f"{where}: FLUX.2 single files are not supported yet; use a diffusers folder (transformer/config.json)"
        )
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    return build_from_state(Flux2Transformer, config, sd, f"{where}: FLUX.2 transformer", device, dtype, stored)


def load_flux2_transformer(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Flux2Transformer:
    """The FLUX.2 transformer of a diffusers folder (a pipeline folder or its ``transformer/``) on ``device`` in
    ``dtype`` (default: the files')."""
    if not Path(path).is_dir():
        raise WeightsError(
            f"{Path(path).name}: FLUX.2 single files are not supported yet; give a diffusers folder (model_index.json "
            "with transformer/, vae/, text_encoder/, tokenizer/)"
        )
    model: Flux2Transformer = load_transformer(
        path,
        what="FLUX.2",
        from_diffusers=Flux2Config.from_diffusers,
        from_state=flux2_from_state,
        device=device,
        dtype=dtype,
    )
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the config ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return raw


def load_flux2_vae(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Flux2VAE:
    """The FLUX.2 VAE of a diffusers folder (a pipeline folder's ``vae/`` or the ``vae/`` folder itself) on
    ``device`` in ``dtype`` (default: the files'); the batch norm's statistics come with it."""
    p = Path(path)
    if not p.is_dir():
        raise WeightsError(f"{p.name}: FLUX.2 VAE single files are not supported yet; give a diffusers vae/ folder")
    folder = next((f for f in (p / "vae", p) if (f / "config.json").is_file()), None)
    if folder is None:
        raise WeightsError(f"{p}: not a FLUX.2 VAE folder (no vae/config.json or config.json)")
    try:
        config = Flux2VAEConfig.from_diffusers(_read_json(folder / "config.json"))
    except ConfigError as e:
        raise WeightsError(f"{folder / 'config.json'}: {e}") from None
    files = component_weight_files(folder)
    target = compute_dtype(stored_dtype(files[0]), parse_dtype(dtype))
    sd = read_shards(files, target)
    with parameters_on_meta():
        model = Flux2VAE(config)
    check_keys(model.state_dict(), sd, name=f"{folder}: FLUX.2 VAE")
    dev = torch.device(device)
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{folder}: {k} is not a tensor")
    model.load_state_dict(
        {k: v.to(device=dev, dtype=target) if v.is_floating_point() else v.to(dev) for k, v in sd.items()},
        strict=True,
        assign=True,
    )
    model.name = p.name
    return model.eval().requires_grad_(False)


__all__ = ["flux2_from_state", "load_flux2_transformer", "load_flux2_vae"]
