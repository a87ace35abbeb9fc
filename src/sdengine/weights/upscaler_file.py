"""Upscaler model files (ESRGAN, Real-ESRGAN): their key layouts, the architecture read from the shapes, a
folder of them, and loading.

Files: ``.safetensors``, or ``.pth`` / ``.pt`` read only by ``torch.load(weights_only=True)``
(:func:`sdengine.weights.io.load_file`: a pickle naming anything but tensors is refused). Real-ESRGAN's
releases wrap the weights in ``params_ema`` (or ``params``); that wrapper is taken off.

Layouts (:mod:`sdengine.models.esrgan` names the layers as the "new" one):

* new (Real-ESRGAN / basicsr ``RRDBNet``): ``conv_first``, ``body.N.rdb1.conv1``, ``conv_body``, ``conv_up1``,
  ``conv_up2``, ``conv_hr``, ``conv_last``;
* old (the original ESRGAN repository, most community models such as ``4x-UltraSharp``): ``model.0``
  (conv_first), ``model.1.sub.N.RDB1.conv1.0`` (the blocks), ``model.1.sub.<blocks>`` (conv_body), then one
  ``model.<3 + 3k>`` per x2 up-step, ``model.<3n + 2>`` (conv_hr) and ``model.<3n + 4>`` (conv_last);
* compact (Real-ESRGAN's ``SRVGGNetCompact``): ``body.0`` .. ``body.<2n + 2>``, convolutions at the even
  indices, PReLU weights at the odd ones.

Scale, block count, feature and growth width and the in/out channels come from the shapes; any other file is a
one-line :class:`UpscalerFileError`.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from sdengine.io.paths import UnsafePathError, file_state, is_inside, resolve_inside
from sdengine.models.esrgan import UpscalerSpec, build_upscaler, spec_of
from sdengine.weights.io import WeightsError, load_file, load_pickle_checkpoint

UPSCALER_SUFFIXES = (".safetensors", ".pth", ".pt")

# A1111's built-in Real-ESRGAN upscaler names -> the file (stem) each downloads (modules/realesrgan_model.py)
A1111_REALESRGAN_NAMES = {
    "R-ESRGAN General 4xV3": "realesr-general-x4v3",
    "R-ESRGAN General WDN 4xV3": "realesr-general-wdn-x4v3",
    "R-ESRGAN AnimeVideo": "realesr-animevideov3",
    "R-ESRGAN 4x+": "RealESRGAN_x4plus",
    "R-ESRGAN 4x+ Anime6B": "RealESRGAN_x4plus_anime_6B",
    "R-ESRGAN 2x+": "RealESRGAN_x2plus",
}


class UpscalerFileError(WeightsError):
    """A file that is not an upscaler sdengine can run, or a name not in the upscalers folder: one line."""


_OLD_BLOCK = re.compile(r"^model\.1\.sub\.(\d+)\.RDB([123])\.conv([1-5])\.0\.(weight|bias)$")
_OLD_TOP = re.compile(r"^model\.(\d+)\.(weight|bias)$")
_OLD_BODY_CONV = re.compile(r"^model\.1\.sub\.(\d+)\.(weight|bias)$")
_NEW_BLOCK = re.compile(r"^body\.(\d+)\.rdb([123])\.conv([1-5])\.(weight|bias)$")
_NEW_UP = re.compile(r"^conv_up(\d+)\.(weight|bias)$")
_COMPACT = re.compile(r"^body\.(\d+)\.(weight|bias)$")


def _unwrap(obj: Mapping[str, object], path: Path) -> dict[str, Tensor]:
    for key in ("params_ema", "params", "state_dict", "model"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return dict(inner)  # type: ignore[arg-type]
    tensors = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not tensors:
        raise UpscalerFileError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:8]})")
    return tensors


def read_upscaler_weights(path: str | Path) -> dict[str, Tensor]:
    """The flat tensors of an upscaler file (the ``params_ema`` / ``params`` wrapper taken off)."""
    path = Path(path)
    if not path.is_file():
        raise UpscalerFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        sd, _ = load_file(path)
        return dict(sd)
    if suffix in (".pth", ".pt"):
        return _unwrap(load_pickle_checkpoint(path), path)
    raise UpscalerFileError(f"{path}: an upscaler is a {', '.join(UPSCALER_SUFFIXES)} file, not {suffix!r}")


def old_to_new(sd: Mapping[str, Tensor], path: Path | str = "<upscaler>") -> dict[str, Tensor]:
    """The old ESRGAN layout (``model.0``, ``model.1.sub.N.RDB1.conv1.0``, ...) renamed to the new one."""
    blocks = {int(m.group(1)) for k in sd if (m := _OLD_BLOCK.match(k))}
    nb = max(blocks) + 1 if blocks else 0
    tops = sorted({int(m.group(1)) for k in sd if (m := _OLD_TOP.match(k))})
    if not tops or tops[0] != 0 or max(tops) < 4 or (max(tops) - 4) % 3:
        raise UpscalerFileError(f"{path}: old ESRGAN layout with top-level layers {tops}, which no ESRGAN has")
    n_up = (max(tops) - 4) // 3
    names = {0: "conv_first", 3 * n_up + 2: "conv_hr", 3 * n_up + 4: "conv_last"}
    names.update({3 + 3 * k: f"conv_up{k + 1}" for k in range(n_up)})
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if m := _OLD_BLOCK.match(k):
            out[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = v
        elif (m := _OLD_BODY_CONV.match(k)) and int(m.group(1)) == nb:
            out[f"conv_body.{m.group(2)}"] = v
        elif (m := _OLD_TOP.match(k)) and int(m.group(1)) in names:
            out[f"{names[int(m.group(1))]}.{m.group(2)}"] = v
        else:
            raise UpscalerFileError(f"{path}: unexpected tensor {k!r} in an old-layout ESRGAN file")
    return out


def _shape(sd: Mapping[str, Tensor], key: str, path: Path | str, ndim: int = 4) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise UpscalerFileError(f"{path}: ESRGAN file without {key!r}")
    if t.ndim != ndim:
        raise UpscalerFileError(f"{path}: {key!r} has shape {tuple(t.shape)}, not a {ndim}-d tensor")
    return tuple(t.shape)


def _esrgan_spec(sd: Mapping[str, Tensor], path: Path | str) -> UpscalerSpec:
    nf, in_total = _shape(sd, "conv_first.weight", path)[:2]
    out_nc = _shape(sd, "conv_last.weight", path)[0]
    grow = _shape(sd, "body.0.rdb1.conv1.weight", path)[0] if "body.0.rdb1.conv1.weight" in sd else 32
    blocks = len({int(m.group(1)) for k in sd if (m := _NEW_BLOCK.match(k))})
    n_up = len({int(m.group(1)) for k in sd if (m := _NEW_UP.match(k))})
    unshuffle = 1
    in_nc = in_total
    for u in (2, 4):  # Real-ESRGAN's x2 / x1: the image folded by pixel_unshuffle before conv_first
        if in_total == out_nc * u * u and n_up == 2:
            unshuffle, in_nc = u, out_nc
    scale_f = 2**n_up / unshuffle
    if scale_f < 1 or not scale_f.is_integer():
        raise UpscalerFileError(f"{path}: ESRGAN file with {n_up} up-steps and input folding {unshuffle}: no scale")
    return UpscalerSpec("esrgan", int(scale_f), in_nc, out_nc, nf, blocks, grow, n_up, unshuffle)


def _compact_spec(sd: Mapping[str, Tensor], path: Path | str) -> UpscalerSpec:
    idx = sorted({int(m.group(1)) for k in sd if (m := _COMPACT.match(k))})
    last = idx[-1]
    if last % 2 or last < 4 or idx != list(range(last + 1)):
        raise UpscalerFileError(f"{path}: compact (SRVGGNetCompact) file with layers body.{idx}, not 0..2n+2")
    for i in range(1, last, 2):
        if f"body.{i}.bias" in sd or sd[f"body.{i}.weight"].ndim != 1:
            raise UpscalerFileError(f"{path}: body.{i} is not a PReLU (sdengine runs compact models with PReLU)")
    nf, in_nc = _shape(sd, "body.0.weight", path)[:2]
    last_out = _shape(sd, f"body.{last}.weight", path)[0]
    scale = math.isqrt(last_out // in_nc) if last_out % in_nc == 0 else 0
    if scale < 1 or scale * scale * in_nc != last_out:
        raise UpscalerFileError(f"{path}: compact file whose last layer's {last_out} outputs are no scale of {in_nc}")
    return UpscalerSpec("compact", scale, in_nc, in_nc, nf, last // 2 - 1)


def detect_upscaler(
    sd: Mapping[str, Tensor], path: Path | str = "<upscaler>"
) -> tuple[UpscalerSpec, dict[str, Tensor]]:
    """(architecture, tensors in the new layout) of an upscaler's tensors; a one-line UpscalerFileError for
    anything else."""
    keys = list(sd)
    if any(k.startswith("model.1.sub.") for k in keys) and "model.0.weight" in sd:
        sd = old_to_new(sd, path)
        return _esrgan_spec(sd, path), dict(sd)
    if "conv_first.weight" in sd:
        return _esrgan_spec(sd, path), dict(sd)
    if keys and all(_COMPACT.match(k) for k in keys):
        return _compact_spec(sd, path), dict(sd)
    sample = ", ".join(sorted(keys)[:4])
    raise UpscalerFileError(
        f"{path}: not an ESRGAN / Real-ESRGAN upscaler (sdengine runs RRDBNet and SRVGGNetCompact files; keys: "
        f"{sample or 'none'})"
    )


def build_from_weights(sd: Mapping[str, Tensor], path: Path | str = "<upscaler>") -> nn.Module:
    """The network of an upscaler's tensors, the tensors loaded (fp32, eval mode); one line when they do not fit."""
    spec, new = detect_upscaler(sd, path)
    model = build_upscaler(spec)
    own = model.state_dict()
    missing = sorted(set(own) - set(new))
    extra = sorted(set(new) - set(own))
    if missing or extra:
        what = f"missing {missing[:3]}" if missing else f"unexpected {extra[:3]}"
        raise UpscalerFileError(f"{path}: {spec.describe()} file with {what}")
    for k, t in own.items():
        if tuple(new[k].shape) != tuple(t.shape):
            raise UpscalerFileError(
                f"{path}: {k} has shape {tuple(new[k].shape)}, {spec.describe()} needs {tuple(t.shape)}"
            )
        if not new[k].is_floating_point():
            raise UpscalerFileError(f"{path}: {k} is {new[k].dtype}, not a float tensor")
    model.load_state_dict({k: v.float() for k, v in new.items()})
    return model.eval().requires_grad_(False)


_CACHE: OrderedDict[tuple[str, int, int, str], nn.Module] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_CACHE_SIZE = 2


def load_upscaler(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The upscaler network of a file (fp32 on ``device``, eval mode; ``model.spec`` its
    :class:`~sdengine.models.esrgan.UpscalerSpec`). The last two loaded are kept (keyed by path, size,
    modification time and device)."""
    path = Path(path)
    try:
        size, mtime = file_state(path)
    except OSError:
        raise UpscalerFileError(f"{path}: no such file") from None
    key = (str(path.resolve()), size, mtime, str(torch.device(device)))
    with _CACHE_LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    model = build_from_weights(read_upscaler_weights(path), path).to(device)
    with _CACHE_LOCK:
        _CACHE[key] = model
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return model


def save_upscaler(model: nn.Module, path: str | Path, *, layout: str = "new") -> None:
    """Write a network's weights as ``.safetensors`` or ``.pth`` (a plain dict of tensors) in the ``new`` or
    ``old`` (ESRGAN ``model.N``) layout."""
    from sdengine.weights.io import save_safetensors

    path = Path(path)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if layout == "old":
        sd = new_to_old(sd, spec_of(model))
    elif layout != "new":
        raise UpscalerFileError(f"layout must be 'new' or 'old', got {layout!r}")
    if path.suffix.lower() == ".safetensors":
        save_safetensors(sd, path)
    else:
        torch.save(sd, path)


def new_to_old(sd: Mapping[str, Tensor], spec: UpscalerSpec) -> dict[str, Tensor]:
    """The inverse of :func:`old_to_new` (an RRDBNet without input folding)."""
    if spec.arch != "esrgan" or spec.unshuffle != 1:
        raise UpscalerFileError(f"the old ESRGAN layout has no {spec.describe()} with input folding")
    n = spec.upsamples
    names = {"conv_first": 0, "conv_hr": 3 * n + 2, "conv_last": 3 * n + 4}
    names.update({f"conv_up{k + 1}": 3 + 3 * k for k in range(n)})
    out: dict[str, Tensor] = {}
    for k, v in sd.items():
        if m := _NEW_BLOCK.match(k):
            out[f"model.1.sub.{m.group(1)}.RDB{m.group(2)}.conv{m.group(3)}.0.{m.group(4)}"] = v
        elif k.startswith("conv_body."):
            out[f"model.1.sub.{spec.blocks}.{k.rsplit('.', 1)[1]}"] = v
        else:
            layer, kind = k.rsplit(".", 1)
            out[f"model.{names[layer]}.{kind}"] = v
    return out


# ------------------------------------------------------------------------------------------ the folder


def upscaler_files(folder: str | Path | None) -> dict[str, Path]:
    """The upscaler files of a folder (not its sub-folders) by name (the file name without its suffix, as A1111
    and the infotext name them); links out of the folder are left out."""
    out: dict[str, Path] = {}
    if folder is None or not Path(folder).is_dir():
        return out
    for p in sorted(Path(folder).iterdir()):
        if p.name.startswith(".") or not p.is_file() or p.suffix.lower() not in UPSCALER_SUFFIXES:
            continue
        if is_inside(folder, p):
            out.setdefault(p.stem, p.resolve())
    return out


def resolve_upscaler(name: str, folder: str | Path | None) -> tuple[str, Path]:
    """(name, file) of an upscaler name in ``folder``: the file's name with or without its suffix (the name: without
    it, as A1111 lists the file), or A1111's name of a Real-ESRGAN model ("R-ESRGAN 4x+" -> ``RealESRGAN_x4plus``;
    the name stays A1111's, as its infotexts write it); a one-line UpscalerFileError when it is not there (or
    names a path outside the folder)."""
    if folder is None:
        raise UpscalerFileError(f"upscaler {name!r}: no upscalers folder given (--upscalers-dir)")
    name = name.strip()
    stem = A1111_REALESRGAN_NAMES.get(name, name)
    try:
        for suffixes in (("",), UPSCALER_SUFFIXES):
            try:
                p = resolve_inside(folder, stem, "upscaler", suffixes=suffixes)
            except FileNotFoundError:
                continue
            if p.is_file() and p.suffix.lower() in UPSCALER_SUFFIXES:
                same = [s for s in UPSCALER_SUFFIXES if (p.parent / (p.stem + s)).is_file()]
                if suffixes != ("",) and len(same) > 1:
                    raise UpscalerFileError(
                        f"upscaler {name!r} is ambiguous: {', '.join(p.stem + s for s in same)}; name the file"
                    )
                return (name if stem != name else p.stem), p
    except UnsafePathError as e:
        raise UpscalerFileError(str(e)) from None
    have = ", ".join(upscaler_files(folder)) or "none"
    raise UpscalerFileError(f"unknown upscaler {name!r}; the upscalers folder has: {have}")


__all__ = [
    "A1111_REALESRGAN_NAMES",
    "UPSCALER_SUFFIXES",
    "UpscalerFileError",
    "build_from_weights",
    "detect_upscaler",
    "load_upscaler",
    "new_to_old",
    "old_to_new",
    "read_upscaler_weights",
    "resolve_upscaler",
    "save_upscaler",
    "upscaler_files",
]
