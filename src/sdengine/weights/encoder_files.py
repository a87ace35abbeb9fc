"""What the text-encoder file loaders share (:mod:`sdengine.weights.t5_file`, :mod:`sdengine.weights.qwen_text_file`):
a transformers folder's weight files (one file, or the shards a ``model.safetensors.index.json`` names), the tensors
of several files looked up by name and read one at a time, and ComfyUI's "scaled fp8" files (each Linear's weight
stored in fp8 with a ``.scale_weight`` beside it: weight x scale is the real weight).

Every function takes the loader's own error class, so a bad file is that loader's one-line error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError

from .io import SAFETENSORS_SUFFIXES, SafetensorsReader, WeightsError, load_file, parse_dtype

FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a transformers folder's one weights file
SHARD_INDEX = "model.safetensors.index.json"
SCALED_FP8_MARKER = "scaled_fp8"  # ComfyUI's "scaled fp8" files: weight / scale stored, one scale per Linear
SCALE_SUFFIXES = (".scale_weight", ".scale_input")

Error = type[WeightsError]


def read_json(path: Path, what: str, error: Error) -> dict[str, Any]:
    """A JSON object from ``path``, or a one-line ``error``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise error(f"{path}: cannot read the {what} ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise error(f"{path}: the {what} is not a JSON object")
    return data


class TensorSource:
    """The tensors of one or more files by name, read one at a time (safetensors) or from a loaded pickle; a name
    in two files is refused."""

    def __init__(self, error: Error) -> None:
        self.error = error
        self.readers: list[SafetensorsReader] = []
        self.where: dict[str, tuple[str, Callable[[str], torch.Tensor], tuple[int, ...]]] = {}

    def add_file(self, path: Path) -> None:
        if path.suffix.lower() in SAFETENSORS_SUFFIXES:
            reader = SafetensorsReader(path)
            self.readers.append(reader)
            for n in reader.names:
                self._add(path, n, reader.read, reader.shape(n))
        else:
            sd = load_file(path)[0]
            for n, t in sd.items():
                self._add(path, n, sd.__getitem__, tuple(t.shape))

    def _add(self, path: Path, name: str, read: Callable[[str], torch.Tensor], shape: tuple[int, ...]) -> None:
        if name in self.where:
            raise self.error(f"{path}: tensor {name} is also in {self.where[name][0]}")
        self.where[name] = (str(path), read, shape)

    def read(self, name: str) -> torch.Tensor:
        return self.where[name][1](name)

    def close(self) -> None:
        for r in self.readers:
            r.close()


def shard_files(folder: Path, index_path: Path, error: Error) -> list[Path]:
    """The shard files a ``model.safetensors.index.json`` names (each a plain file name in ``folder``)."""
    index = read_json(index_path, "shard index", error)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise error(f"{index_path}: no weight_map")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise error(f"{index_path}: shard {str(name)[:80]!r} is not a file name in this folder")
        if not (folder / name).is_file():
            raise error(f"{index_path}: shard {name} is missing")
        files.append(folder / name)
    return files


def folder_weight_files(folder: Path, error: Error) -> list[Path]:
    """A transformers folder's weight files: its shards, else its one weights file; none is a one-line ``error``."""
    if (folder / SHARD_INDEX).is_file():
        return shard_files(folder, folder / SHARD_INDEX, error)
    files = [folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()][:1]
    if not files:
        raise error(f"{folder}: no {SHARD_INDEX} or {' or '.join(FOLDER_WEIGHTS)}")
    return files


def compute_dtype(dtype: str | torch.dtype | None, what: str, error: Error) -> torch.dtype:
    """The dtype an encoder is loaded in (default float32, whatever the file holds): fp32, fp16 or bf16."""
    target = parse_dtype(dtype) or torch.float32
    if target not in (torch.float32, torch.float16, torch.bfloat16):
        raise error(f"{what}: dtype {target} is not a compute dtype (fp32, fp16 or bf16)")
    return target


@contextmanager
def encoder_tensors(
    path: Path, what: str, folder_of: Callable[[Path], Path], config_of: Callable[[dict[str, Any]], Any], error: Error
) -> Iterator[tuple[TensorSource, Any, str]]:
    """(the tensors, the config or None, where) of an encoder file or folder, the files closed on leaving: a folder
    (``folder_of`` finds the one holding ``config.json``; ``config_of`` reads it) with its weights or shards, or one
    file (no config: the loader reads it from the shapes)."""
    source = TensorSource(error)
    config = None
    try:
        if path.is_dir():
            folder = folder_of(path)
            cfg_path = folder / "config.json"
            try:
                config = config_of(read_json(cfg_path, "config", error))
            except (ConfigError, TypeError) as e:
                raise error(f"{cfg_path}: {e}") from None
            files, where = folder_weight_files(folder, error), str(folder)
        elif path.is_file():
            files, where = [path], str(path)
        else:
            raise error(f"{path}: no such {what} file or folder")
        for f in files:
            source.add_file(f)
        yield source, config, where
    finally:
        source.close()


def split_scales(
    names: Mapping[str, str], scaled: bool, where: str, error: Error
) -> tuple[dict[str, str], dict[str, str]]:
    """(weights, scales) of a file's chosen names (model name -> file name): the ``.scale_weight`` tensors by the
    layer they scale (its name without ``.weight``), the ``.scale_input`` ones dropped (they scale activations, for
    fp8 products sdengine does not make). A scale in a file without the scaled_fp8 marker is refused."""
    scales = {k[: -len(".scale_weight")]: v for k, v in names.items() if k.endswith(".scale_weight")}
    weights = {k: v for k, v in names.items() if not k.endswith(SCALE_SUFFIXES)}
    if len(weights) < len(names) and not scaled:
        odd = next(k for k in names if k.endswith(SCALE_SUFFIXES))
        raise error(f"{where}: {odd} without the scaled_fp8 marker; refusing to guess what it scales")
    return weights, scales


def check_scales_used(scales: Mapping[str, str], weights: Mapping[str, str], where: str, error: Error) -> None:
    """Every scale must scale a weight the model takes."""
    unused = sorted(set(scales) - {k[: -len(".weight")] for k in weights})
    if unused:
        raise error(f"{where}: {unused[0]}.scale_weight scales no weight of the encoder")


def scaled_weight(
    source: TensorSource, t: torch.Tensor, key: str, scales: Mapping[str, str], where: str, error: Error
) -> torch.Tensor:
    """``t`` (the model's tensor ``key``) times its scale when the file has one (float32), else ``t``."""
    scale = scales.get(key[: -len(".weight")])
    if scale is None:
        return t
    s = checked_scale(source.read(scale), scale, t, where, error)
    return t.float() * (s.reshape(()) if s.numel() == 1 else s.reshape(t.shape[0], *([1] * (t.ndim - 1))))


def checked_scale(s: torch.Tensor, name: str, weight: torch.Tensor, where: str, error: Error) -> torch.Tensor:
    """A quantized weight's scale (``name``) as float32, checked: floating-point, one number or one per row of a
    weight of at least one dimension, every one finite and not negative (a NaN or negative scale would make a
    layer of NaN or flipped signs without a word; 0 is kept: a quantizer gives it to a layer of zeros); else one
    line."""
    if not s.is_floating_point():
        raise error(f"{where}: {name} holds {s.dtype}, not a floating-point scale")
    rows = weight.shape[0] if weight.ndim else None
    if s.numel() != 1 and (rows is None or tuple(s.shape) not in ((rows,), (rows, 1))):
        raise error(f"{where}: {name} is {tuple(s.shape)}, not one scale or one per row of {tuple(weight.shape)}")
    s = s.float()
    if not bool((torch.isfinite(s) & (s >= 0)).all()):
        bad = s.reshape(-1)[~(torch.isfinite(s) & (s >= 0)).reshape(-1)][0]
        raise error(f"{where}: {name} holds {float(bad)}: a scale must be finite and not negative")
    return s


__all__ = [
    "FOLDER_WEIGHTS",
    "SCALED_FP8_MARKER",
    "SCALE_SUFFIXES",
    "SHARD_INDEX",
    "TensorSource",
    "check_scales_used",
    "checked_scale",
    "compute_dtype",
    "encoder_tensors",
    "folder_weight_files",
    "read_json",
    "scaled_weight",
    "shard_files",
    "split_scales",
]
