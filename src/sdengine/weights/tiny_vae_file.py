"""Tiny VAE files (TAESD and its relatives): which layout a file is in, its architecture from its shapes, load.

The layouts users bring:

- the original TAESD files, one per half: ``taesd_decoder.safetensors`` / ``.pth`` (also ``taesdxl_*``,
  16-channel ones), keys the bare indices of an ``nn.Sequential`` (``1.weight``, ``3.conv.0.weight``,
  ...). The decoder's index 0 is its parameter-free clamp, so its first convolution is ``1.``; the encoder's is
  ``0.``. That is how the two halves are told apart. A decoder file's ``NAME_encoder`` sibling (same folder,
  same extension) is loaded with it when it exists, as A1111 and ComfyUI pair them;
- the same with a ``taesd_decoder.`` / ``taesd_encoder.`` prefix (ComfyUI's combined state dict);
- diffusers' ``AutoencoderTiny``: a folder with ``config.json`` (``"_class_name": "AutoencoderTiny"``) and
  ``diffusion_pytorch_model.safetensors``, keys ``decoder.layers.N...`` / ``encoder.layers.N...``; or such a
  file alone.

The architecture (latent and image channels, channels and blocks per level) is read off the shapes, so
16-channel variants and smaller distilled decoders (the emoji model's) load the same way; a folder's
config.json is checked against them. Every other key, a missing layer or a shape that does not fit is one
:class:`~sdengine.weights.io.WeightsError` line.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.tiny_vae import TinyAutoencoder, TinyVAEConfig

from .io import StateDict, WeightsError, load_file, parse_dtype, save_safetensors

WEIGHTS_STEM = "diffusion_pytorch_model"
# ComfyUI keeps the latent scale of SD3/Flux beside TAESD's weights; they describe its own latent convention,
# not the network: sdengine's tiny VAE takes the diffusion model's latents as they are.
IGNORED_KEYS = frozenset({"vae_scale", "vae_shift"})
_LAYER = re.compile(r"^(\d+)\.(.+)$")


def is_tiny_vae_state(keys: Any) -> bool:
    """Whether a state dict's keys look like a tiny VAE in any layout above (used to hint at the right flag)."""
    try:
        split_halves(dict.fromkeys(keys))
    except WeightsError:
        return False
    return True


def split_halves(sd: Mapping[str, Any], where: str = "<state dict>") -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoder layers, encoder layers), each keyed ``N.rest`` with diffusers' numbering; one may be empty."""
    dec: dict[str, Any] = {}
    enc: dict[str, Any] = {}
    bare: dict[str, Any] = {}
    unknown = []
    for k, v in sd.items():
        if k in IGNORED_KEYS:
            continue
        for prefix, out, shift in (
            ("decoder.layers.", dec, 0),
            ("encoder.layers.", enc, 0),
            ("taesd_decoder.", dec, 1),
            ("taesd_encoder.", enc, 0),
        ):
            if k.startswith(prefix):
                rest = k.removeprefix(prefix)
                m = _LAYER.match(rest)
                if m is None or int(m.group(1)) < shift:
                    unknown.append(k)
                else:
                    out[f"{int(m.group(1)) - shift}.{m.group(2)}"] = v
                break
        else:
            if _LAYER.match(k):
                bare[k] = v
            else:
                unknown.append(k)
    if unknown:
        raise WeightsError(f"{where}: not a tiny VAE (TAESD) layout; unexpected keys: {', '.join(sorted(unknown)[:4])}")
    if bare:
        if dec or enc:
            raise WeightsError(f"{where}: bare TAESD layer keys mixed with prefixed ones")
        if "0.weight" in bare:  # the encoder's first convolution; the decoder's index 0 is its clamp
            enc = bare
        elif "1.weight" in bare:
            dec = {f"{int(m.group(1)) - 1}.{m.group(2)}": v for k, v in bare.items() if (m := _LAYER.match(k))}
            if any(int(k.split(".", 1)[0]) < 0 for k in dec):
                raise WeightsError(f"{where}: not a TAESD decoder (a parameter at index 0, its clamp)")
        else:
            raise WeightsError(f"{where}: not a tiny VAE (TAESD) layout: no first convolution (0.weight or 1.weight)")
    if not dec and not enc:
        raise WeightsError(f"{where}: no tiny VAE weights")
    return dec, enc


def _kinds(layers: Mapping[str, torch.Tensor], where: str) -> dict[int, str]:
    kinds: dict[int, str] = {}
    for k in layers:
        i, rest = k.split(".", 1)
        kind = "block" if rest.startswith(("conv.", "skip.")) else "conv" if rest in ("weight", "bias") else "?"
        if kind == "?" or kinds.setdefault(int(i), kind) != kind:
            raise WeightsError(f"{where}: unexpected tiny VAE key {k!r}")
    return kinds


def _conv(layers: Mapping[str, torch.Tensor], i: int, where: str) -> torch.Tensor:
    w = layers.get(f"{i}.weight")
    if not isinstance(w, torch.Tensor) or w.ndim != 4:
        raise WeightsError(f"{where}: layer {i} should be a convolution (a 4-d '{i}.weight')")
    return w


def decoder_shape(layers: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Latent/image channels and per-level channels and block counts of a decoder's layers."""
    kinds = _kinds(layers, where)
    w = _conv(layers, 0, where)
    latent, chans, blocks = int(w.shape[1]), [int(w.shape[0])], [0]
    i = 2  # 1 is the ReLU after the first convolution
    while True:
        kind = kinds.get(i)
        if kind == "block":
            blocks[-1] += 1
            i += 1
        elif kind is None and kinds.get(i + 1) == "conv" and f"{i + 1}.bias" not in layers:
            chans.append(int(_conv(layers, i + 1, where).shape[0]))  # upsample, then a bias-free conv
            blocks.append(0)
            i += 2
        elif kind == "conv" and f"{i}.bias" in layers:
            image = int(_conv(layers, i, where).shape[0])
            break
        else:
            raise WeightsError(f"{where}: the tiny VAE decoder's layers do not follow TAESD's order (at layer {i})")
    if max(kinds) != i:
        raise WeightsError(f"{where}: tiny VAE decoder layers after its last convolution ({max(kinds)})")
    return {"latent_channels": latent, "image_channels": image, "decoder_channels": chans, "decoder_blocks": blocks}


def encoder_shape(layers: Mapping[str, torch.Tensor], where: str) -> dict[str, Any]:
    """Image/latent channels and per-level channels and block counts of an encoder's layers."""
    kinds = _kinds(layers, where)
    w = _conv(layers, 0, where)
    image, chans, blocks = int(w.shape[1]), [int(w.shape[0])], [0]
    i = 1
    while True:
        kind = kinds.get(i)
        if kind == "block":
            blocks[-1] += 1
        elif kind == "conv" and f"{i}.bias" not in layers:  # a stride-2 convolution opens the next level
            chans.append(int(_conv(layers, i, where).shape[0]))
            blocks.append(0)
        elif kind == "conv":
            latent = int(_conv(layers, i, where).shape[0])
            break
        else:
            raise WeightsError(f"{where}: the tiny VAE encoder's layers do not follow TAESD's order (at layer {i})")
        i += 1
    if max(kinds) != i:
        raise WeightsError(f"{where}: tiny VAE encoder layers after its last convolution ({max(kinds)})")
    return {"latent_channels": latent, "image_channels": image, "encoder_channels": chans, "encoder_blocks": blocks}


def config_from_layers(dec: Mapping[str, torch.Tensor], enc: Mapping[str, torch.Tensor], where: str) -> TinyVAEConfig:
    fields: dict[str, Any] = {"has_decoder": bool(dec), "has_encoder": bool(enc)}
    for part in (decoder_shape(dec, where) if dec else {}, encoder_shape(enc, where) if enc else {}):
        for k, v in part.items():
            if k in fields and fields[k] != v:
                raise WeightsError(f"{where}: the tiny VAE's decoder and encoder disagree on {k} ({fields[k]} vs {v})")
            fields[k] = v
    if dec and enc and len(fields["decoder_channels"]) != len(fields["encoder_channels"]):
        raise WeightsError(f"{where}: the tiny VAE's decoder and encoder have different numbers of levels")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    try:
        return TinyVAEConfig(**fields)
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def _read(path: Path, dtype: str | torch.dtype | None) -> StateDict:
    return load_file(path, dtype)[0]


def encoder_beside(decoder_file: Path) -> Path | None:
    """``NAME_encoder.EXT`` beside ``NAME_decoder.EXT`` (TAESD's naming), if it exists."""
    stem = decoder_file.name.removesuffix(decoder_file.suffix)
    if not stem.endswith("_decoder"):
        return None
    cand = decoder_file.with_name(stem.removesuffix("_decoder") + "_encoder" + decoder_file.suffix)
    return cand if cand.is_file() else None


def _folder_state(folder: Path, dtype: str | torch.dtype | None) -> tuple[StateDict, dict[str, Any] | None]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: not a tiny VAE folder (no config.json; give the taesd_decoder file itself)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{cfg_path}: cannot read the config ({type(e).__name__})") from None
    if not isinstance(cfg, dict) or cfg.get("_class_name") != "AutoencoderTiny":
        got = cfg.get("_class_name") if isinstance(cfg, dict) else None
        raise WeightsError(
            f"{folder}: not a tiny VAE folder (config.json's _class_name is {got!r}, not 'AutoencoderTiny')"
        )
    files = [folder / f"{WEIGHTS_STEM}{ext}" for ext in (".safetensors", ".bin")]
    found = [f for f in files if f.is_file()]
    if not found:
        raise WeightsError(f"{folder}: no {WEIGHTS_STEM}.safetensors")
    return _read(found[0], dtype), cfg


def load_tiny_vae(
    path: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> TinyAutoencoder:
    """A tiny VAE from a TAESD file (its ``_encoder`` sibling too), a combined file or a diffusers folder, in
    ``dtype`` (default float32, whatever the file holds) on ``device``."""
    p = Path(path)
    folder_cfg: dict[str, Any] | None = None
    if p.is_dir():
        sd, folder_cfg = _folder_state(p, dtype)
    elif p.is_file():
        sd = _read(p, dtype)
    else:
        raise WeightsError(f"{p}: no such tiny VAE file or folder")
    dec, enc = split_halves(sd, str(p))
    if p.is_file() and dec and not enc and (sibling := encoder_beside(p)) is not None:
        enc = split_halves(_read(sibling, dtype), str(sibling))[1]
    cfg = config_from_layers(dec, enc, str(p))
    if folder_cfg is not None:
        try:
            stated = TinyVAEConfig.from_diffusers(folder_cfg)
        except (ConfigError, TypeError) as e:
            raise WeightsError(f"{p / 'config.json'}: {e}") from None
        for part, names in (
            (cfg.has_decoder, ("decoder_channels", "decoder_blocks")),
            (cfg.has_encoder, ("encoder_channels", "encoder_blocks")),
        ):
            for name in ("latent_channels", "image_channels", *names) if part else ():
                said, has = getattr(stated, name), getattr(cfg, name)
                if said != has:
                    raise WeightsError(f"{p}: config.json says {name}={said} but the weights have {has}")
    model = TinyAutoencoder(cfg)
    state = {f"decoder.layers.{k}": v for k, v in dec.items()} | {f"encoder.layers.{k}": v for k, v in enc.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        detail = str(e).strip().splitlines()
        raise WeightsError(f"{p}: the tiny VAE's weights do not fit ({detail[-1].strip() if detail else e})") from None
    model.name = p.name
    target = parse_dtype(dtype) or torch.float32
    return model.to(device=torch.device(device), dtype=target).eval().requires_grad_(False)


def tiny_vae_has_encoder(path: str | Path) -> bool:
    """Whether the tiny VAE at ``path`` (any layout :func:`load_tiny_vae` reads) has an encoder; False for what
    is not a readable tiny VAE. Remembered per file state (path, size, modification time): the files are small
    and a server asks on every model listing."""
    from sdengine.io.paths import file_state

    try:
        size, mtime = file_state(path)
    except OSError:
        return False
    return _has_encoder(str(path), size, mtime)


@functools.lru_cache(maxsize=64)
def _has_encoder(path: str, _size: int, _mtime_ns: int) -> bool:
    try:
        return load_tiny_vae(path).encoder is not None
    except (OSError, ValueError):  # WeightsError and ConfigError are ValueErrors
        return False


def save_tiny_vae(model: TinyAutoencoder, folder: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers ``AutoencoderTiny`` folder (config.json + safetensors); returns the folder.
    diffusers itself loads such a folder only with both halves."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / f"{WEIGHTS_STEM}.safetensors", dtype=dtype)
    (out / "config.json").write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n")
    return out


__all__ = [
    "config_from_layers",
    "decoder_shape",
    "encoder_beside",
    "encoder_shape",
    "is_tiny_vae_state",
    "load_tiny_vae",
    "save_tiny_vae",
    "split_halves",
    "tiny_vae_has_encoder",
]
