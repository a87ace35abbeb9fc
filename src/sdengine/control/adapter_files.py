"""T2I-Adapter files, and the one reader of control models that tells a ControlNet from a T2I-Adapter.

Formats read, as users have them:

* a diffusers folder (``config.json`` with ``"_class_name": "T2IAdapter"`` + ``diffusion_pytorch_model.*``),
  ``TencentARC/t2i-adapter-*-sdxl-1.0`` and ``t2iadapter_*_sd15v2`` converted;
* a single file in diffusers' names (``adapter.conv_in.weight``, ``adapter.body.0.resnets.0.block1.weight``);
* an original TencentARC file (``t2iadapter_canny_sd15v2.pth``, ``t2iadapter_*_sd14v1.pth``, the light
  ``t2iadapter_color``-style files; ``.safetensors`` conversions; a ``.pth`` may wrap its weights in
  ``{"adapter": ...}``), the names ComfyUI's ``comfy/t2i_adapter/adapter.py`` reads: the full adapter's
  ``conv_in`` and ``body.{level * 2 + block}.{in_conv,block1,block2}``, the light one's
  ``body.{level}.{in_conv,out_conv}`` and ``body.{level}.body.{block}.{block1,block2}``.

A file carries no config, so the architecture is read from the shapes: the widths from the convs, the pixel
unshuffle from ``conv_in`` (a folded width of 256 or 768 = 1 or 3 channels x 16 x 16 is an SDXL adapter, as
ComfyUI decides; 64 or 192 = 8 x 8 an SD 1.x/2.x one). The original code's options that diffusers lacks are read
as ComfyUI reads them: a 3x3 ``block2`` is its ``ksize`` 3, and ``body.{k}.down_opt.op`` convolutions its
``use_conv`` (a learned stride-2 halving, sdengine's ``adapter.body.{level}.down_conv``). Skip convolutions
(``skep``, the original's ``sk=False``, which ComfyUI does not load either and which no released adapter has) are
refused by name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.catalog import builtin_names, builtin_path
from sdengine.errors import ControlNetError
from sdengine.models.config_checks import ConfigError
from sdengine.models.controlnet import ControlNet
from sdengine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig
from sdengine.models.unet import UNetConfig
from sdengine.names import did_you_mean
from sdengine.weights.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsError, load_file, parse_dtype

CONFIG_METADATA_KEY = "sdengine.t2i_adapter_config"  # diffusers config JSON in files we write


@dataclass
class LoadedAdapter:
    """A T2I-Adapter state dict in diffusers names, its config, and where it came from."""

    state_dict: dict[str, Tensor]
    config: T2IAdapterConfig
    source: Path
    layout: str  # "diffusers" or "original"


def is_adapter_state(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict holds a T2I-Adapter (diffusers' or the original names)."""
    return (
        "adapter.conv_in.weight" in sd
        or "adapter.body.0.in_conv.weight" in sd
        or ("conv_in.weight" in sd and "body.0.block1.weight" in sd)
        or ("body.0.in_conv.weight" in sd and "body.0.body.0.block1.weight" in sd)
    )


def _unshuffle(folded: int) -> tuple[int, int]:
    """(image channels, pixel-unshuffle factor) of a first conv that reads ``folded`` channels."""
    for ch in (3, 1):
        if folded % ch == 0:
            f = math.isqrt(folded // ch)
            if f * f * ch == folded:
                return ch, f
    raise ValueError(f"its first convolution reads {folded} channels, not 1 or 3 image channels x f x f")


def _indices(sd: Mapping[str, Tensor], pattern: str) -> list[int]:
    pat = re.compile(pattern)
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def config_from_weights(sd: Mapping[str, Tensor], *, base: UNetConfig | None = None) -> T2IAdapterConfig:
    """A T2IAdapterConfig from the shapes of a state dict in diffusers' names."""
    levels = _indices(sd, r"^adapter\.body\.(\d+)\.")
    if not levels or levels != list(range(len(levels))):
        raise ValueError("no adapter.body levels")
    blocks = _indices(sd, r"^adapter\.body\.0\.resnets\.(\d+)\.")
    if not blocks:
        raise ValueError("no residual blocks in adapter.body.0")
    if "adapter.conv_in.weight" in sd:  # full adapters
        conv_in = sd["adapter.conv_in.weight"]
        ch, f = _unshuffle(int(conv_in.shape[1]))
        widths = tuple(int(sd[f"adapter.body.{i}.resnets.0.block1.weight"].shape[0]) for i in levels)
        if f in (8, 16):
            xl = f == 16  # ComfyUI: 256 / 768 folded channels
        else:  # tiny test models: the base model says
            xl = bool(base is not None and base.text_time)
        kind = "full_adapter_xl" if xl else "full_adapter"
        k = (
            int(sd["adapter.body.0.resnets.0.block2.weight"].shape[-1])
            if "adapter.body.0.resnets.0.block2.weight" in sd
            else 1
        )
        conv = any(re.match(r"^adapter\.body\.\d+\.down_conv\.weight$", key) for key in sd)
        return T2IAdapterConfig(ch, widths, len(blocks), f, kind, kernel_size=k, conv_downsample=conv)
    ch, f = _unshuffle(int(sd["adapter.body.0.in_conv.weight"].shape[1]))
    widths = tuple(int(sd[f"adapter.body.{i}.out_conv.weight"].shape[0]) for i in levels)
    if len(widths) < 2 or widths[-1] != widths[-2]:
        raise ValueError(f"a light adapter's last level repeats the width before it, got {widths}")
    return T2IAdapterConfig(ch, widths[:-1], len(blocks), f, "light_adapter")


def original_to_diffusers(sd: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Original TencentARC names -> diffusers' (renamed, names not understood)."""
    out: dict[str, Tensor] = {}
    unknown: list[str] = []
    light = "conv_in.weight" not in sd
    full_pat = re.compile(r"^body\.(\d+)\.(in_conv|block1|block2|down_opt\.op)\.(weight|bias)$")
    light_pat = re.compile(r"^body\.(\d+)\.(?:(in_conv|out_conv)|body\.(\d+)\.(block1|block2))\.(weight|bias)$")
    for k, v in sd.items():
        if k.startswith("conv_in.") and not light:
            out[f"adapter.{k}"] = v
        elif not light and (m := full_pat.match(k)):
            k_, part, what = int(m.group(1)), m.group(2), m.group(3)
            level, block = divmod(k_, 2)  # ComfyUI: two blocks per level in every full adapter file
            if part in ("in_conv", "down_opt.op"):  # a level's first block only
                if block != 0:
                    unknown.append(k)
                    continue
                out[f"adapter.body.{level}.{'in_conv' if part == 'in_conv' else 'down_conv'}.{what}"] = v
            else:
                out[f"adapter.body.{level}.resnets.{block}.{part}.{what}"] = v
        elif light and (m := light_pat.match(k)):
            lv, end, blk, part_, what_ = m.groups()
            if end is not None:
                out[f"adapter.body.{lv}.{end}.{what_}"] = v
            else:
                out[f"adapter.body.{lv}.resnets.{blk}.{part_}.{what_}"] = v
        else:
            unknown.append(k)
    return out, unknown


def adapter_from_state(
    sd: Mapping[str, Tensor], info: Mapping[str, Any], path: Path, base: UNetConfig | None
) -> LoadedAdapter:
    """A LoadedAdapter from a single file's tensors (either naming)."""
    layout = "diffusers"
    if not any(k.startswith("adapter.") for k in sd):
        bad = sorted(k for k in sd if re.match(r"^body\.\d+\.skep\.", k))
        if bad:
            raise ControlNetError(
                f"{path}: a T2I-Adapter with skip convolutions ({bad[0]}, ...; the original code's sk=False): "
                "a layout diffusers' T2IAdapter has no place for, and sdengine does not read"
            )
        sd, unknown = original_to_diffusers(sd)
        if unknown:
            raise ControlNetError(
                f"{path}: unexpected T2I-Adapter keys: {', '.join(unknown[:5])} ({len(unknown)} in all)"
            )
        layout = "original"
    try:
        if CONFIG_METADATA_KEY in info:
            cfg = T2IAdapterConfig.from_diffusers(json.loads(info[CONFIG_METADATA_KEY]))
        else:
            cfg = config_from_weights(sd, base=base)
    except (KeyError, ValueError, ConfigError) as e:
        raise ControlNetError(f"{path}: cannot read the T2I-Adapter's architecture ({e})") from None
    return LoadedAdapter(dict(sd), cfg, path, layout)


def _weights_in(folder: Path) -> Path:
    from sdengine.control.files import WEIGHT_NAMES

    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ControlNetError(f"{folder}: no T2I-Adapter weights (expected {WEIGHT_NAMES[0]})")


def _folder_class(folder: Path) -> str | None:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        raw = json.loads(cfg.read_text())
    except (OSError, ValueError) as e:
        raise ControlNetError(f"{cfg}: not a readable config ({e})") from None
    return raw.get("_class_name") if isinstance(raw, dict) else None


def read_control(path: str | Path, *, base: UNetConfig | None = None, base_unet: torch.nn.Module | None = None) -> Any:
    """A control model from disk, without building it: a :class:`LoadedAdapter` for a T2I-Adapter, else what
    :func:`sdengine.control.files.read_controlnet` reads (a LoadedControlNet; a Control-LoRA file made into the
    ControlNet it describes on ``base_unet``, see :mod:`sdengine.control.control_lora`). The format is told by
    the folder's config class or the file's names, as ComfyUI's ControlNetLoader tells them."""
    from sdengine.control import control_lora, files

    if isinstance(path, str) and not Path(path).exists():
        path = builtin_path("controlnets", path) or path
    path = Path(path)
    if path.is_dir():
        folder = path if (path / "config.json").is_file() else path / "adapter"
        if _folder_class(folder) == "T2IAdapter":
            raw = json.loads((folder / "config.json").read_text())
            try:
                cfg = T2IAdapterConfig.from_diffusers(raw)
            except ConfigError as e:
                raise ControlNetError(f"{folder}: {e}") from None
            sd, _ = load_file(_weights_in(folder))
            return LoadedAdapter(dict(sd), cfg, folder, "diffusers")
        return files.read_controlnet(path, base=base)
    if not path.exists():
        guess = did_you_mean(path, builtin_names("controlnets")) if len(path.parts) == 1 else ""
        raise ControlNetError(f"ControlNet not found: {path}{guess}")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ControlNetError(f"{path}: expected a ControlNet or T2I-Adapter folder or a .safetensors/.pth file")
    sd, info = load_file(path)
    if is_adapter_state(sd):
        return adapter_from_state(sd, info, path, base)
    if control_lora.is_control_lora(sd):
        weights = control_lora.base_weights_of(base_unet) if base_unet is not None else None
        return control_lora.controlnet_from_control_lora(sd, path, base, weights)
    return files.controlnet_from_state(sd, info, path, base)


def check_adapter_compatible(cfg: T2IAdapterConfig, base: UNetConfig, *, name: str = "T2I-Adapter") -> None:
    """Raise ControlNetError where the adapter's features cannot go into the base U-Net's encoder."""
    xl = cfg.adapter_type == "full_adapter_xl"
    if base.text_time and not xl:
        raise ControlNetError(f"{name} is an SD 1.x/2.x adapter but the model is SDXL")
    if xl and not base.text_time:
        raise ControlNetError(f"{name} is an SDXL adapter but the model is not SDXL")
    n = len(base.block_out_channels)
    widths = cfg.feature_channels[:n]
    if widths != tuple(base.block_out_channels[: len(widths)]):
        raise ControlNetError(
            f"{name} does not fit this model's U-Net: feature widths {widths} vs the U-Net's levels "
            f"{tuple(base.block_out_channels)}"
        )


def load_t2i_adapter(
    path: str | Path,
    *,
    base: UNetConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> T2IAdapter:
    """A T2I-Adapter from a diffusers folder, a diffusers-named file or an original TencentARC file."""
    loaded = read_control(path, base=base)
    if not isinstance(loaded, LoadedAdapter):
        raise ControlNetError(f"{path}: a ControlNet, not a T2I-Adapter")
    return _build(loaded, path, base, device, dtype)


def _build(
    loaded: LoadedAdapter,
    path: str | Path,
    base: UNetConfig | None,
    device: str | torch.device | None,
    dtype: str | torch.dtype | None,
) -> T2IAdapter:
    from sdengine.weights.loading import build_on_meta

    if base is not None:
        check_adapter_compatible(loaded.config, base, name=f"T2I-Adapter {Path(path).name}")
    cfg = loaded.config
    try:
        net = build_on_meta(
            lambda: T2IAdapter(cfg), loaded.state_dict, name=f"T2I-Adapter {path}", dtype=parse_dtype(dtype)
        )
    except WeightsError as e:
        raise ControlNetError(str(e)) from None
    assert isinstance(net, T2IAdapter)
    return net.to(device) if device is not None else net


def load_control_model(
    path: str | Path,
    *,
    base: UNetConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    base_unet: torch.nn.Module | None = None,
) -> ControlNet | T2IAdapter:
    """A ControlNet or a T2I-Adapter, whichever ``path`` holds (``load_controlnet`` / ``load_t2i_adapter``).
    ``base_unet``: the U-Net it will be used with, which a Control-LoRA file needs (its weights are the
    ControlNet's, but for the file's changes)."""
    from sdengine.control.files import load_controlnet

    loaded = read_control(path, base=base, base_unet=base_unet)
    if isinstance(loaded, LoadedAdapter):
        return _build(loaded, path, base, device, dtype)
    return load_controlnet(path, base=base, device=device, dtype=dtype, read=loaded)


def save_t2i_adapter(
    net: T2IAdapter, dst: str | Path, *, layout: str = "diffusers", dtype: str | torch.dtype | None = None
) -> Path:
    """Write a diffusers folder (``layout="diffusers"``) or an original-named ``.safetensors`` file
    (``"original"``, the config kept in its metadata)."""
    from sdengine.weights.io import convert_dtype, save_safetensors

    sd = convert_dtype({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, dtype)
    cfg_json = json.dumps(net.config.to_diffusers())
    dst = Path(dst)
    if layout == "diffusers":
        dst.mkdir(parents=True, exist_ok=True)
        (dst / "config.json").write_text(cfg_json)
        save_safetensors(sd, dst / "diffusion_pytorch_model.safetensors")
        return dst
    if layout != "original":
        raise ControlNetError(f"unknown T2I-Adapter layout {layout!r}; use diffusers or original")
    save_safetensors(diffusers_to_original(sd), dst, metadata={CONFIG_METADATA_KEY: cfg_json})
    return dst


def diffusers_to_original(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """diffusers' names -> the original TencentARC names (full adapters: two blocks per level)."""
    out: dict[str, Tensor] = {}
    light = "adapter.conv_in.weight" not in sd
    for k, v in sd.items():
        name = k.removeprefix("adapter.")
        m = re.match(r"^body\.(\d+)\.resnets\.(\d+)\.(.*)$", name)
        if m and light:
            name = f"body.{m.group(1)}.body.{m.group(2)}.{m.group(3)}"
        elif m:
            name = f"body.{int(m.group(1)) * 2 + int(m.group(2))}.{m.group(3)}"
        elif not light and (m := re.match(r"^body\.(\d+)\.in_conv\.(.*)$", name)):
            name = f"body.{int(m.group(1)) * 2}.in_conv.{m.group(2)}"
        elif not light and (m := re.match(r"^body\.(\d+)\.down_conv\.(.*)$", name)):
            name = f"body.{int(m.group(1)) * 2}.down_opt.op.{m.group(2)}"
        out[name] = v
    return out


__all__ = [
    "CONFIG_METADATA_KEY",
    "LoadedAdapter",
    "adapter_from_state",
    "check_adapter_compatible",
    "config_from_weights",
    "diffusers_to_original",
    "is_adapter_state",
    "load_control_model",
    "load_t2i_adapter",
    "original_to_diffusers",
    "read_control",
    "save_t2i_adapter",
]
