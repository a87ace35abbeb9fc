"""CLIP vision encoder files (the image encoder of IP-Adapter): which layout, the architecture, load.

Accepted:

- a transformers ``CLIPVisionModelWithProjection`` state dict in one file: keys ``vision_model.*`` and
  ``visual_projection.weight`` (ComfyUI's ``clip_vision_h.safetensors`` / ``clip_vision_g.safetensors``,
  diffusers' ``image_encoder/model.safetensors``). A full CLIP model's file (``text_model.*``,
  ``text_projection.weight``, ``logit_scale`` besides) loads too: the text half is ignored. The constant
  ``vision_model.embeddings.position_ids`` buffer is ignored. transformers 5 writes a ``CLIPVisionModel``
  (no projection) without the ``vision_model.`` prefix: such keys get it. ``.safetensors`` or a weights-only pickle
  (``.bin``/``.pt``/``.pth``, read by :func:`sdengine.weights.io.load_file`);
- a diffusers/transformers folder (``image_encoder/``): ``config.json`` + ``model.safetensors`` (or
  ``pytorch_model.bin``); the config's numbers are checked against the tensors' shapes.

Without a config, the architecture comes from the shapes: width from ``class_embedding``, patch size from the
patch convolution, image size from the number of position embeddings (``(image / patch)^2 + 1``), layer count
from the ``encoder.layers.N`` indices (0..N-1 without gaps), MLP width from ``fc1``, projection width from
``visual_projection`` (none without it). Two numbers are not in the shapes:

- heads: 16 for the widths of ViT-L (1024), ViT-H (1280) and ViT-bigG (1664), 12 for ViT-B (768), otherwise
  ``width / 64`` (a 64-wide head, the ViT default); a width that is not a multiple of 64 needs ``num_heads=``;
- activation: "quick_gelu" for width 1024 (OpenAI's ViT-L/14, trained with it), "gelu" (exact) for every other
  width (OpenCLIP's ViT-H/14 and ViT-bigG/14). ``hidden_act=`` overrides it.

Every other layout or a tensor that does not fit is one :class:`~sdengine.weights.io.WeightsError` line.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.clip_vision import CLIPVisionConfig, CLIPVisionModel, hf_key
from sdengine.models.config_checks import ConfigError
from sdengine.nn.meta_init import skip_meta_init

from .io import StateDict, WeightsError, load_file, parse_dtype

VISION = "vision_model."
PROJECTION = "visual_projection.weight"
# the other half of a full CLIP file, and transformers' constant buffer: read past, never loaded
IGNORED_PREFIXES = ("text_model.", "text_projection.")
IGNORED_KEYS = frozenset({"logit_scale", "vision_model.embeddings.position_ids"})
# heads of the CLIP ViT widths (OpenAI ViT-B/L, OpenCLIP ViT-H/bigG); other widths: width / 64
KNOWN_HEADS = {768: 12, 1024: 16, 1280: 16, 1664: 16}
QUICK_GELU_WIDTHS = frozenset({1024})  # OpenAI's ViT-L/14; OpenCLIP's towers use exact gelu
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.")


def split_vision_state(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """The vision tower's tensors of a CLIP state dict (``vision_model.*`` and ``visual_projection.weight``),
    the text half and constant buffers dropped; one-line errors for other layouts."""
    vision: dict[str, Any] = {}
    unknown = []
    text = "embeddings.token_embedding.weight" in sd  # transformers 5's CLIPTextModel: no text_model. prefix
    if "embeddings.patch_embedding.weight" in sd and not any(k.startswith(VISION) for k in sd):
        # transformers 5 writes a CLIPVisionModel (no projection) without the vision_model. prefix
        sd = {k if k == PROJECTION or k in IGNORED_KEYS else VISION + k: v for k, v in sd.items()}
    for k, v in sd.items():
        if k in IGNORED_KEYS:
            continue
        if k.startswith(IGNORED_PREFIXES):
            text = True
        elif k.startswith(VISION) or k == PROJECTION:
            vision[k] = v
        else:
            unknown.append(k)
    if not vision:
        if text:
            raise WeightsError(f"{where}: a CLIP text encoder, not a CLIP vision encoder (no vision_model.* keys)")
        if any(k.startswith("visual.") for k in unknown):
            raise WeightsError(
                f"{where}: an OpenCLIP checkpoint (visual.*); sdengine reads the transformers layout "
                "(vision_model.*), as ComfyUI's clip_vision_*.safetensors and diffusers' image_encoder/ use"
            )
        shown = ", ".join(sorted(unknown)[:4]) or "none"
        raise WeightsError(f"{where}: not a CLIP vision encoder (no vision_model.* keys; it has {shown})")
    if unknown:
        raise WeightsError(f"{where}: unexpected keys beside the CLIP vision encoder: {', '.join(sorted(unknown)[:4])}")
    return vision


def _tensor(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> torch.Tensor:
    t = sd.get(key)
    if t is None:
        raise WeightsError(f"{where}: CLIP vision encoder without {key}")
    if not isinstance(t, torch.Tensor) or t.ndim != ndim:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise WeightsError(f"{where}: {key} should be {ndim}-d, it is {shape}")
    return t


def config_from_shapes(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    num_heads: int | None = None,
    hidden_act: str | None = None,
    layer_norm_eps: float = 1e-5,
) -> CLIPVisionConfig:
    """The architecture of a vision state dict (keys as :func:`split_vision_state` returns them)."""
    width = int(_tensor(sd, "vision_model.embeddings.class_embedding", 1, where).shape[0])
    conv = _tensor(sd, "vision_model.embeddings.patch_embedding.weight", 4, where)
    if tuple(conv.shape[:2]) != (width, 3) or conv.shape[2] != conv.shape[3]:
        raise WeightsError(
            f"{where}: the patch convolution is {tuple(conv.shape)}, expected ({width}, 3, p, p) for width {width}"
        )
    patch = int(conv.shape[2])
    pos = _tensor(sd, "vision_model.embeddings.position_embedding.weight", 2, where)
    grid = round((int(pos.shape[0]) - 1) ** 0.5)
    if pos.shape[1] != width or pos.shape[0] < 2 or grid * grid + 1 != pos.shape[0]:
        raise WeightsError(
            f"{where}: position embeddings {tuple(pos.shape)} are not (g*g + 1, {width}) for a square grid of patches"
        )
    layers = sorted({int(m.group(1)) for k in sd if (m := _LAYER.match(k))})
    if not layers:
        raise WeightsError(f"{where}: CLIP vision encoder without transformer layers (vision_model.encoder.layers.N)")
    if layers != list(range(len(layers))):
        gap = next(i for i in range(len(layers) + 1) if i not in layers)
        raise WeightsError(f"{where}: CLIP vision encoder layer {gap} is missing (has layers up to {layers[-1]})")
    fc1 = _tensor(sd, "vision_model.encoder.layers.0.mlp.fc1.weight", 2, where)
    proj = sd.get(PROJECTION)
    if proj is not None and (not isinstance(proj, torch.Tensor) or proj.ndim != 2):
        raise WeightsError(f"{where}: {PROJECTION} should be 2-d")
    if num_heads is None:
        num_heads = KNOWN_HEADS.get(width) or (width // 64 if width % 64 == 0 else None)
        if num_heads is None:
            raise WeightsError(
                f"{where}: cannot tell the head count of a {width}-wide CLIP vision encoder from its shapes "
                "(give num_heads, or use a folder with config.json)"
            )
    act = hidden_act or ("quick_gelu" if width in QUICK_GELU_WIDTHS else "gelu")
    try:
        return CLIPVisionConfig(
            hidden_size=width,
            intermediate_size=int(fc1.shape[0]),
            num_layers=len(layers),
            num_heads=num_heads,
            patch_size=patch,
            image_size=grid * patch,
            projection_dim=int(proj.shape[0]) if proj is not None else None,
            layer_norm_eps=layer_norm_eps,
            hidden_act=act,  # type: ignore[arg-type]  # checked by the config
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def _read_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the config ({type(e).__name__})") from None
    if not isinstance(cfg, dict):
        raise WeightsError(f"{path}: the config is not a JSON object")
    kind = cfg.get("model_type")
    if kind not in (None, "clip_vision_model", "clip"):
        raise WeightsError(f"{path}: not a CLIP vision config (model_type {kind!r})")
    return cfg


def _check_fits(model: CLIPVisionModel, sd: Mapping[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """The state dict under the model's names, each tensor's shape checked: one line for the first problem."""
    state = {name: v for k, v in sd.items() if (name := hf_key(k)) is not None}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k not in state:
            raise WeightsError(f"{where}: CLIP vision encoder without {k} (truncated or another architecture)")
        got = state[k]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != shape:
            have = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise WeightsError(f"{where}: {k} is {have}, expected {shape}")
        if not got.is_floating_point():
            raise WeightsError(f"{where}: {k} holds {got.dtype}, not floating-point weights")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise WeightsError(f"{where}: unexpected CLIP vision keys: {', '.join(extra[:4])}")
    return state


def clip_vision_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: CLIPVisionConfig | None = None,
    num_heads: int | None = None,
    hidden_act: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> CLIPVisionModel:
    """A :class:`CLIPVisionModel` from a CLIP state dict (any layout :func:`split_vision_state` accepts); the
    config from the shapes unless given (a given one must fit the shapes)."""
    vision = split_vision_state(sd, where)
    cfg = config or config_from_shapes(vision, where, num_heads=num_heads, hidden_act=hidden_act)
    with torch.device("meta"), skip_meta_init():
        model = CLIPVisionModel(cfg)
    state = _check_fits(model, vision, where)
    target = parse_dtype(dtype) or torch.float32
    dev = torch.device(device)
    model.load_state_dict({k: v.to(device=dev, dtype=target) for k, v in state.items()}, strict=True, assign=True)
    model.name = Path(where).name
    return model.eval().requires_grad_(False)


def load_clip_vision(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    num_heads: int | None = None,
    hidden_act: str | None = None,
) -> CLIPVisionModel:
    """A CLIP vision encoder from a file or a folder (see the module's docstring), in ``dtype`` (default
    float32, whatever the file holds) on ``device``. ``num_heads`` / ``hidden_act`` override what a file
    without config.json implies (a folder's config.json says them)."""
    p = Path(path)
    config: CLIPVisionConfig | None = None
    if p.is_dir():
        cfg_path = p / "config.json"
        if not cfg_path.is_file():
            raise WeightsError(f"{p}: not a CLIP vision encoder folder (no config.json; give the weights file itself)")
        raw = _read_config(cfg_path)
        found = [p / n for n in FOLDER_WEIGHTS if (p / n).is_file()]
        if not found:
            raise WeightsError(f"{p}: no {' or '.join(FOLDER_WEIGHTS)}")
        try:
            config = CLIPVisionConfig.from_transformers(raw)
        except (ConfigError, TypeError) as e:
            raise WeightsError(f"{cfg_path}: {e}") from None
        sd: StateDict = load_file(found[0])[0]
        where = str(found[0])
        shapes = config_from_shapes(
            split_vision_state(sd, where),
            where,
            num_heads=config.num_heads,
            hidden_act=config.hidden_act,
            layer_norm_eps=config.layer_norm_eps,
        )
        if shapes.projection_dim is None and config.projection_dim is not None:
            config = dataclasses.replace(config, projection_dim=None)  # a CLIPVisionModel's folder
        if shapes != config:
            diff = next(
                f.name for f in dataclasses.fields(shapes) if getattr(shapes, f.name) != getattr(config, f.name)
            )
            raise WeightsError(
                f"{p}: config.json says {diff}={getattr(config, diff)} but the weights have {getattr(shapes, diff)}"
            )
    elif p.is_file():
        sd = load_file(p)[0]
        where = str(p)
    else:
        raise WeightsError(f"{p}: no such CLIP vision file or folder")
    model = clip_vision_from_state(
        sd, where, config=config, num_heads=num_heads, hidden_act=hidden_act, device=device, dtype=dtype
    )
    model.name = p.name
    return model


__all__ = [
    "KNOWN_HEADS",
    "QUICK_GELU_WIDTHS",
    "clip_vision_from_state",
    "config_from_shapes",
    "load_clip_vision",
    "split_vision_state",
]
