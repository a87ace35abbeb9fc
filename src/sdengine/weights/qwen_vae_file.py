"""Qwen-Image VAE files -> :class:`~sdengine.models.qwen_vae.QwenImageVAE`.

Accepted:

* a diffusers folder: a ``QwenImagePipeline`` folder (its ``vae/``) or the ``vae/`` folder itself, with
  ``config.json`` (``_class_name`` ``AutoencoderKLQwenImage``) and ``diffusion_pytorch_model.safetensors`` (or
  ``.bin``, or shards with their index). The config gives ``latents_mean`` / ``latents_std``;
* a single ``.safetensors`` (or weights-only pickle) file in diffusers' names, or in the original Wan / Qwen-Image
  names (``encoder.conv1``, ``encoder.downsamples.*``, ``decoder.upsamples.*``, ``middle``, ``head``, ``conv1`` /
  ``conv2``: ComfyUI's ``qwen_image_vae.safetensors``), mapped onto diffusers' names. A file has no config: the
  architecture comes from the tensors' shapes and the latent statistics are Qwen-Image's (16 latent channels
  only; another width needs a folder with its config).

Every tensor must be floating-point and every name and shape the model's (one line naming the first missing,
unexpected or wrongly shaped tensor). The model runs in ``dtype`` (default: the file's own, float32 when it has
several or none).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_vae import QWEN_LATENTS_MEAN, QWEN_LATENTS_STD, QwenImageVAE, QwenVAEConfig

from .io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, StateDict, WeightsError, load_file, parse_dtype, save_safetensors
from .loading import check_keys, component_weight_files, parameters_on_meta

COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ----------------------------------------------------------------------------------------------------------
# The original (Wan / ComfyUI) names -> diffusers'

_RESIDUAL = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_TOP = {"conv1": "quant_conv", "conv2": "post_quant_conv"}
_PART = {"conv1": "conv_in", "head.0": "norm_out", "head.2": "conv_out"}
_MIDDLE = {"0": "mid_block.resnets.0", "1": "mid_block.attentions.0", "2": "mid_block.resnets.1"}


def is_original_layout(keys: Any) -> bool:
    """Whether a state dict's names are the original Wan / Qwen-Image VAE's (not diffusers')."""
    return any(str(k).startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.conv1.")) for k in keys)


def _block_rest(rest: str, where: str, key: str) -> str:
    """A residual block's or resampling layer's own part of a name, in diffusers' spelling."""
    for old, new in _RESIDUAL.items():
        if rest == old:
            return new
    if rest.startswith(("resample.", "time_conv.")):
        return rest
    raise WeightsError(f"{where}: unknown Qwen-Image VAE tensor {key!r}")


def _decoder_groups(sd: Mapping[str, Any]) -> dict[int, str]:
    """``decoder.upsamples.<i>`` -> ``decoder.up_blocks.<level>.resnets.<j>`` / ``.upsamplers.0``: the flat list
    holds each level's residual blocks followed by its resampling layer (none after the last level)."""
    kinds: dict[int, bool] = {}  # index -> is a resampling layer
    for k in sd:
        m = re.match(r"decoder\.upsamples\.(\d+)\.(.*)$", k)
        if m:
            i = int(m.group(1))
            kinds[i] = kinds.get(i, False) or m.group(2).startswith(("resample.", "time_conv."))
    out: dict[int, str] = {}
    level, j = 0, 0
    for i in sorted(kinds):
        if kinds[i]:
            out[i] = f"decoder.up_blocks.{level}.upsamplers.0"
            level, j = level + 1, 0
        else:
            out[i] = f"decoder.up_blocks.{level}.resnets.{j}"
            j += 1
    return out


def original_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> StateDict:
    """The original Wan / Qwen-Image VAE names -> diffusers' ``AutoencoderKLQwenImage`` names (any depth)."""
    groups = _decoder_groups(sd)
    out: StateDict = {}
    for k, v in sd.items():
        parts = k.split(".")
        new: str | None = None
        if len(parts) == 2 and parts[0] in _TOP:
            new = f"{_TOP[parts[0]]}.{parts[1]}"
        elif parts[0] in ("encoder", "decoder") and len(parts) >= 3:
            part, rest = parts[0], ".".join(parts[1:])
            for old, name in _PART.items():
                if rest.startswith(old + ".") and rest.count(".") == old.count(".") + 1:
                    new = f"{part}.{name}.{rest.rsplit('.', 1)[1]}"
            if rest.startswith("middle.") and len(parts) >= 4 and parts[2] in _MIDDLE:
                tail = ".".join(parts[3:])
                new = f"{part}.{_MIDDLE[parts[2]]}.{tail if parts[2] == '1' else _block_rest(tail, where, k)}"
            elif part == "encoder" and parts[1] == "downsamples" and len(parts) >= 4 and parts[2].isdigit():
                new = f"encoder.down_blocks.{parts[2]}.{_block_rest('.'.join(parts[3:]), where, k)}"
            elif part == "decoder" and parts[1] == "upsamples" and len(parts) >= 4 and parts[2].isdigit():
                new = f"{groups[int(parts[2])]}.{_block_rest('.'.join(parts[3:]), where, k)}"
        if new is None:
            raise WeightsError(f"{where}: unknown Qwen-Image VAE tensor {k!r}")
        if new in out:
            raise WeightsError(f"{where}: two tensors map onto {new}")
        out[new] = v
    return out


def diffusers_to_original(sd: Mapping[str, Any]) -> StateDict:
    """diffusers' names -> the original Wan / Qwen-Image VAE names (the inverse of :func:`original_to_diffusers`)."""
    residual = {v: k for k, v in _RESIDUAL.items()}
    middle = {v: k for k, v in _MIDDLE.items()}
    part = {v: k for k, v in _PART.items()}
    top = {v: k for k, v in _TOP.items()}
    # the decoder's flat index of each (level, resnet j) / (level, upsampler), in the blocks' order
    flat: dict[str, int] = {}
    names = sorted(
        {m.group(0) for k in sd if (m := re.match(r"decoder\.up_blocks\.\d+\.(resnets\.\d+|upsamplers\.0)", k))},
        key=lambda n: (int(n.split(".")[2]), n.split(".")[3] == "upsamplers", int(n.split(".")[-1])),
    )
    for i, n in enumerate(names):
        flat[n] = i

    def block(rest: str) -> str:
        return residual.get(rest, rest)

    out: StateDict = {}
    for k, v in sd.items():
        parts = k.split(".")
        if parts[0] in top:
            new = f"{top[parts[0]]}.{parts[1]}"
        elif len(parts) == 3 and parts[1] in part:
            new = f"{parts[0]}.{part[parts[1]]}.{parts[2]}"
        elif parts[1] == "mid_block":
            key = ".".join(parts[1:4])
            tail = ".".join(parts[4:])
            new = f"{parts[0]}.middle.{middle[key]}.{tail if 'attentions' in key else block(tail)}"
        elif parts[1] == "down_blocks":
            new = f"encoder.downsamples.{parts[2]}.{block('.'.join(parts[3:]))}"
        else:  # decoder.up_blocks.<level>.(resnets.<j>|upsamplers.0).<rest>
            head = ".".join(parts[:5])
            new = f"decoder.upsamples.{flat[head]}.{block('.'.join(parts[5:]))}"
        out[new] = v
    return out


# ----------------------------------------------------------------------------------------------------------
# The architecture from the shapes


def _shape(sd: Mapping[str, Any], key: str, ndim: int, where: str) -> tuple[int, ...]:
    t = sd.get(key)
    if not isinstance(t, torch.Tensor):
        raise WeightsError(f"{where}: not a Qwen-Image VAE (no {key})")
    if t.ndim != ndim:
        raise WeightsError(f"{where}: {key} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    return tuple(t.shape)


def config_from_shapes(sd: Mapping[str, Any], where: str = "<state dict>") -> QwenVAEConfig:
    """A :class:`QwenVAEConfig` read from a state dict in diffusers' names: widths from the encoder's
    convolutions, the levels and residual blocks per level from ``encoder.down_blocks``, the temporal flags from
    which resampling layers have a ``time_conv``. Latent statistics: Qwen-Image's (16 latent channels only)."""
    out_dim, in_ch = _shape(sd, "encoder.conv_in.weight", 5, where)[:2]
    z_dim = _shape(sd, "decoder.conv_in.weight", 5, where)[1]
    blocks: dict[int, str] = {}
    for k in sd:
        m = re.match(r"encoder\.down_blocks\.(\d+)\.(conv1|resample)\.", k)
        if m:
            blocks[int(m.group(1))] = m.group(2)
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise WeightsError(f"{where}: the encoder's down_blocks are missing or not numbered 0, 1, 2, ...")
    width = out_dim
    widths: list[int] = []
    temporal: list[bool] = []
    counts: list[int] = []
    n = 0
    for i in sorted(blocks):
        if blocks[i] == "conv1":
            n += 1
            width = _shape(sd, f"encoder.down_blocks.{i}.conv1.weight", 5, where)[0]
        else:
            widths.append(width)
            counts.append(n)
            temporal.append(f"encoder.down_blocks.{i}.time_conv.weight" in sd)
            n = 0
    if n == 0:
        raise WeightsError(f"{where}: the encoder's last level has no residual blocks")
    widths.append(width)
    counts.append(n)
    if len(set(counts)) != 1:
        raise WeightsError(f"{where}: the encoder's levels have {counts} residual blocks (expected equal counts)")
    if any(w % out_dim for w in widths):
        raise WeightsError(f"{where}: level widths {widths} are not multiples of the base width {out_dim}")
    if z_dim != len(QWEN_LATENTS_MEAN):
        raise WeightsError(
            f"{where}: {z_dim} latent channels; a single file has no latents_mean / latents_std and Qwen-Image's are "
            f"for {len(QWEN_LATENTS_MEAN)}: give a diffusers vae/ folder with its config.json"
        )
    try:
        return QwenVAEConfig(
            base_dim=out_dim,
            z_dim=z_dim,
            dim_mult=tuple(w // out_dim for w in widths),
            num_res_blocks=counts[0],
            temperal_downsample=tuple(temporal),
            input_channels=in_ch,
            latents_mean=QWEN_LATENTS_MEAN,
            latents_std=QWEN_LATENTS_STD,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------------------
# Loading and saving


def compute_dtype(sd: Mapping[str, Any], dtype: str | torch.dtype | None) -> torch.dtype:
    """``dtype`` when given (float32, float16 or bfloat16), else the weights' own when they all share one of
    those, else float32."""
    target = parse_dtype(dtype)
    if target is not None:
        if target not in COMPUTE_DTYPES:
            raise WeightsError(f"the Qwen-Image VAE runs in float32, float16 or bfloat16, not {target}")
        return target
    stored = {v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()}
    return stored.pop() if len(stored) == 1 and next(iter(stored)) in COMPUTE_DTYPES else torch.float32


def qwen_vae_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: QwenVAEConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> QwenImageVAE:
    """A :class:`QwenImageVAE` from a state dict in diffusers' or the original names; the architecture from the
    shapes unless ``config`` is given. Names and shapes are checked against the model (one line)."""
    ours = original_to_diffusers(sd, where) if is_original_layout(sd.keys()) else dict(sd)
    for k, v in ours.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            have = v.dtype if isinstance(v, torch.Tensor) else type(v).__name__
            raise WeightsError(f"{where}: {k} holds {have}, not floating-point weights")
    cfg = config if config is not None else config_from_shapes(ours, where)
    target = compute_dtype(ours, dtype)
    with parameters_on_meta():
        model = QwenImageVAE(cfg)
    check_keys(model.state_dict(), ours, name=f"{where}: Qwen-Image VAE")
    dev = torch.device(device)
    model.load_state_dict({k: v.to(device=dev, dtype=target) for k, v in ours.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _read_config(path: Path) -> QwenVAEConfig:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the config ({type(e).__name__})") from None
    try:
        return QwenVAEConfig.from_diffusers(raw)
    except (ConfigError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None


def load_qwen_vae(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> QwenImageVAE:
    """The Qwen-Image VAE of a diffusers folder (a pipeline folder's ``vae/`` or the ``vae/`` folder) or a single
    weights file (see the module docstring), on ``device`` in ``dtype`` (default: the file's own)."""
    p = Path(path)
    if p.is_dir():
        folder = next((f for f in (p / "vae", p) if (f / "config.json").is_file()), None)
        if folder is None:
            raise WeightsError(f"{p}: not a Qwen-Image VAE folder (no vae/config.json or config.json)")
        config = _read_config(folder / "config.json")
        sd: StateDict = {}
        target = parse_dtype(dtype)
        for f in component_weight_files(folder):
            part = load_file(f, target)[0]
            both = sd.keys() & part.keys()
            if both:
                raise WeightsError(f"{f}: tensor {sorted(both)[0]} is also in another shard")
            sd.update(part)
        model = qwen_vae_from_state(sd, str(folder), config=config, device=device, dtype=dtype)
    else:
        if not p.is_file():
            raise WeightsError(f"{p}: no such Qwen-Image VAE file or folder")
        if p.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
            raise WeightsError(f"{p}: expected a .safetensors file or a diffusers vae/ folder")
        model = qwen_vae_from_state(load_file(p, parse_dtype(dtype))[0], str(p), device=device, dtype=dtype)
    model.name = p.name
    return model


def save_qwen_vae(model: QwenImageVAE, folder: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers ``vae/`` folder (config.json and diffusion_pytorch_model.safetensors, the
    names diffusers' ``AutoencoderKLQwenImage`` loads); returns the folder."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n", encoding="utf-8")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_safetensors(sd, out / "diffusion_pytorch_model.safetensors", dtype=dtype)
    return out


__all__ = [
    "compute_dtype",
    "config_from_shapes",
    "diffusers_to_original",
    "is_original_layout",
    "load_qwen_vae",
    "original_to_diffusers",
    "qwen_vae_from_state",
    "save_qwen_vae",
]
