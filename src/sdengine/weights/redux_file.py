"""FLUX.1 Redux files: the SigLIP vision encoder and the Redux image encoder.

SigLIP (:func:`load_siglip_vision`, :func:`siglip_from_state`):

- a transformers ``SiglipVisionModel`` state dict in one file (``vision_model.*``): ComfyUI's
  ``sigclip_vision_patch14_384.safetensors`` and diffusers' ``image_encoder/model.safetensors`` of
  ``FLUX.1-Redux-dev``; a full ``SiglipModel`` file (``text_model.*``, ``logit_scale``, ``logit_bias`` besides) too.
  The attention-pooling head (``vision_model.head.*``) and the ``position_ids`` buffer are read past;
- a transformers folder (``image_encoder/``): ``config.json`` (``siglip_vision_model``) + ``model.safetensors``.

Without a config the architecture comes from the shapes: width from the patch convolution, patch and image size
from it and the position embeddings (``(image / patch)^2``, no class token), the layers from the indices, the MLP
width from ``fc1``; heads: 16 for so400m's width 1152, otherwise ``width / 64``. A CLIP tower (a class embedding)
is refused with one line.

Redux (:func:`load_redux`): BFL's ``flux1-redux-dev.safetensors`` (``redux_up.*``, ``redux_down.*``; ComfyUI's
StyleModelLoader reads the same file) or diffusers' ``image_embedder/`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``, the same four names). The widths come from the shapes.

Every other layout or a tensor that does not fit is one :class:`~sdengine.weights.io.WeightsError` line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.redux import ReduxConfig, ReduxImageEncoder
from sdengine.models.siglip_vision import SiglipVisionConfig, SiglipVisionModel
from sdengine.nn.meta_init import skip_meta_init

from .io import StateDict, WeightsError, load_file, parse_dtype

VISION = "vision_model."
IGNORED_PREFIXES = ("text_model.", "vision_model.head.")
IGNORED_KEYS = frozenset({"logit_scale", "logit_bias", "vision_model.embeddings.position_ids"})
KNOWN_HEADS = {1152: 16}
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
REDUX_KEYS = ("redux_up.weight", "redux_up.bias", "redux_down.weight", "redux_down.bias")
REDUX_FOLDER_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def is_siglip_state(sd: Mapping[str, Any]) -> bool:
    """A SigLIP vision tower's state dict (transformers' names, with or without ``vision_model.``): the patch
    convolution and post LayerNorm without CLIP's class embedding."""
    prefix = VISION if any(k.startswith(VISION) for k in sd) else ""
    return (
        f"{prefix}embeddings.patch_embedding.weight" in sd
        and f"{prefix}post_layernorm.weight" in sd
        and f"{prefix}embeddings.class_embedding" not in sd
    )


def is_siglip_path(path: str | Path) -> bool:
    """Whether a vision-encoder file or folder holds SigLIP (its config's ``model_type``, else the tensor names of
    a ``.safetensors`` header); False for anything it cannot tell (the CLIP reader then says what is wrong)."""
    from .io import read_safetensors_header

    p = Path(path)
    try:
        if p.is_dir():
            cfg = json.loads((p / "config.json").read_text())
            return isinstance(cfg, dict) and cfg.get("model_type") in ("siglip_vision_model", "siglip")
        if p.suffix.lower() == ".safetensors":
            header = read_safetensors_header(p)[0]
            return is_siglip_state(dict.fromkeys(header))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError, WeightsError):
        return False
    return False


def _vision_state(sd: Mapping[str, Any], where: str) -> dict[str, Any]:
    if "embeddings.patch_embedding.weight" in sd and not any(k.startswith(VISION) for k in sd):
        sd = {VISION + k: v for k, v in sd.items()}  # transformers 5 writes a SiglipVisionModel without the prefix
    if any(k.startswith("redux_") for k in sd):
        raise WeightsError(f"{where}: a FLUX.1 Redux (style model) file, not a SigLIP vision encoder")
    if "vision_model.embeddings.class_embedding" in sd:
        raise WeightsError(f"{where}: a CLIP vision encoder (class embedding), not SigLIP; Redux needs SigLIP")
    vision = {}
    unknown = []
    for k, v in sd.items():
        if k in IGNORED_KEYS or k.startswith(IGNORED_PREFIXES):
            continue
        if k.startswith(VISION):
            vision[k[len(VISION) :]] = v
        else:
            unknown.append(k)
    if not vision:
        shown = ", ".join(sorted(unknown)[:4]) or "none"
        raise WeightsError(f"{where}: not a SigLIP vision encoder (no vision_model.* keys; it has {shown})")
    if unknown:
        raise WeightsError(
            f"{where}: unexpected keys beside the SigLIP vision encoder: {', '.join(sorted(unknown)[:4])}"
        )
    return vision


def _tensor(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise WeightsError(f"{where}: SigLIP vision encoder without vision_model.{key}")
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise WeightsError(f"{where}: vision_model.{key} should be {ndim}-d, it is {shape}")
    return t


def siglip_config_from_shapes(
    vision: Mapping[str, Any], where: str, *, num_heads: int | None = None, layer_norm_eps: float = 1e-6
) -> SiglipVisionConfig:
    """The architecture of a SigLIP vision state dict (keys without ``vision_model.``)."""
    conv = _tensor(vision, "embeddings.patch_embedding.weight", 4, where)
    width, patch = int(conv.shape[0]), int(conv.shape[2])
    if conv.shape[1] != 3 or conv.shape[2] != conv.shape[3]:
        raise WeightsError(f"{where}: the patch convolution is {tuple(conv.shape)}, expected (C, 3, p, p)")
    pos = _tensor(vision, "embeddings.position_embedding.weight", 2, where)
    grid = round(int(pos.shape[0]) ** 0.5)
    if pos.shape[1] != width or grid < 1 or grid * grid != pos.shape[0]:
        raise WeightsError(f"{where}: position embeddings {tuple(pos.shape)} are not (g*g, {width}) for a square grid")
    layers = sorted({int(m.group(1)) for k in vision if (m := _LAYER.match(VISION + k))})
    if not layers:
        raise WeightsError(f"{where}: SigLIP vision encoder without layers (vision_model.encoder.layers.N)")
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise WeightsError(f"{where}: SigLIP vision encoder layer {gap} is missing (has layers up to {layers[-1]})")
    fc1 = _tensor(vision, "encoder.layers.0.mlp.fc1.weight", 2, where)
    heads = num_heads or KNOWN_HEADS.get(width) or (width // 64 if width % 64 == 0 else None)
    if heads is None:
        raise WeightsError(
            f"{where}: cannot tell the head count of a {width}-wide SigLIP encoder from its shapes (give num_heads)"
        )
    try:
        return SiglipVisionConfig(
            hidden_size=width,
            intermediate_size=int(fc1.shape[0]),
            num_layers=len(layers),
            num_heads=heads,
            patch_size=patch,
            image_size=grid * patch,
            layer_norm_eps=layer_norm_eps,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def _fits(model: torch.nn.Module, state: Mapping[str, Any], where: str, what: str) -> dict[str, torch.Tensor]:
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        got = state.get(k)
        if got is None:
            raise WeightsError(f"{where}: {what} without {k} (truncated or another architecture)")
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
            have = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise WeightsError(f"{where}: {k} is {have}, expected {shape}")
        if not got.is_floating_point():
            raise WeightsError(f"{where}: {k} holds {got.dtype}, not floating-point weights")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise WeightsError(f"{where}: unexpected {what} keys: {', '.join(extra[:4])}")
    return dict(state)


def _build(model: Any, state: dict[str, torch.Tensor], device: Any, dtype: Any, where: str) -> Any:
    target = parse_dtype(dtype) or torch.float32
    dev = torch.device(device)
    model.load_state_dict({k: v.to(device=dev, dtype=target) for k, v in state.items()}, strict=True, assign=True)
    model.name = Path(where).name
    return model.eval().requires_grad_(False)


def siglip_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: SiglipVisionConfig | None = None,
    num_heads: int | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> SiglipVisionModel:
    """A :class:`SiglipVisionModel` from a SigLIP state dict; the config from the shapes (``num_heads`` where the
    width does not tell it) unless given."""
    vision = _vision_state(sd, where)
    cfg = config or siglip_config_from_shapes(vision, where, num_heads=num_heads)
    with torch.device("meta"), skip_meta_init():
        model = SiglipVisionModel(cfg)
    state = _fits(model, {VISION + k: v for k, v in vision.items()}, where, "SigLIP vision encoder")
    return _build(model, state, device, dtype, where)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: the config is not a JSON object")
    return cfg


def load_siglip_vision(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    num_heads: int | None = None,
) -> SiglipVisionModel:
    """A SigLIP vision encoder from a file or a transformers folder (see the module docstring); ``num_heads``
    for a file whose width does not tell it (a folder's config.json says it)."""
    p = Path(path)
    config = None
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise WeightsError(f"{p}: not a SigLIP vision encoder folder (no config.json)")
        raw = _read_json(cfg_path)
        kind = raw.get("model_type")
        if kind not in (None, "siglip_vision_model", "siglip"):
            raise WeightsError(f"{cfg_path}: not a SigLIP vision config (model_type {kind!r}); Redux needs SigLIP")
        try:
            config = SiglipVisionConfig.from_transformers(raw)
        except (ConfigError, TypeError) as e:
            raise WeightsError(f"{cfg_path}: {e}") from None
        found = [p / n for n in FOLDER_WEIGHTS if (p / n).is_file()]
        if not found:
            raise WeightsError(f"{p}: no {' or '.join(FOLDER_WEIGHTS)}")
        sd: StateDict = load_file(found[0])[0]
        where = str(found[0])
        shapes = siglip_config_from_shapes(
            _vision_state(sd, where), where, num_heads=config.num_heads, layer_norm_eps=config.layer_norm_eps
        )
        if shapes != config:
            raise WeightsError(f"{p}: config.json does not describe the weights ({config} vs the shapes' {shapes})")
    elif p.is_file():
        sd = load_file(p)[0]
        where = str(p)
    else:
        raise WeightsError(f"{p}: no such SigLIP vision file or folder")
    return siglip_from_state(sd, where, config=config, num_heads=num_heads, device=device, dtype=dtype)


def redux_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> ReduxImageEncoder:
    """A :class:`ReduxImageEncoder` from BFL's / diffusers' four tensors; the widths from ``redux_up.weight``."""
    up = sd.get("redux_up.weight")
    if not isinstance(up, torch.Tensor):
        if any(k.startswith(VISION) for k in sd) or "embeddings.patch_embedding.weight" in sd:
            raise WeightsError(f"{where}: a vision encoder, not a FLUX.1 Redux file (no redux_up.weight)")
        shown = ", ".join(sorted(sd)[:4]) or "none"
        raise WeightsError(f"{where}: not a FLUX.1 Redux file (no redux_up.weight; it has {shown})")
    if up.ndim != 2 or up.shape[0] % 3:
        raise WeightsError(f"{where}: redux_up.weight is {tuple(up.shape)}, expected (3 x T5 width, SigLIP width)")
    try:
        cfg = ReduxConfig(redux_dim=int(up.shape[1]), txt_in_features=int(up.shape[0]) // 3)
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None
    with torch.device("meta"), skip_meta_init():
        model = ReduxImageEncoder(cfg)
    state = _fits(model, dict(sd), where, "Redux image encoder")
    return _build(model, state, device, dtype, where)


def load_redux(
    path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> ReduxImageEncoder:
    """FLUX.1 Redux's image encoder from BFL's file or diffusers' ``image_embedder/`` folder."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in REDUX_FOLDER_WEIGHTS if (p / n).is_file()]
        if not found:
            raise WeightsError(f"{p}: not a Redux image_embedder folder (no {' or '.join(REDUX_FOLDER_WEIGHTS)})")
        cfg_path = p / "config.json"
        if cfg_path.is_file():
            raw = _read_json(cfg_path)
            name = raw.get("_class_name")
            if name not in (None, "ReduxImageEncoder"):
                raise WeightsError(f"{cfg_path}: a {name}, not diffusers' ReduxImageEncoder")
        p = found[0]
    elif not p.is_file():
        raise WeightsError(f"{p}: no such Redux file or folder")
    return redux_from_state(load_file(p)[0], str(p), device=device, dtype=dtype)


__all__ = [
    "is_siglip_path",
    "is_siglip_state",
    "load_redux",
    "load_siglip_vision",
    "redux_from_state",
    "siglip_config_from_shapes",
    "siglip_from_state",
]
