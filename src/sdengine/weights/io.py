"""Reading and writing weight files without running code and without copying tensors twice.

- `.safetensors` is parsed here (8-byte header length, JSON header, raw bytes) and its tensors are views into
  one private memory map of the file: nothing is read until a tensor is touched, and `load_state_dict(...,
  assign=True)` can adopt those views as parameters with no copy at all.
- `.ckpt` / `.pt` / `.pth` / `.bin` go only through `torch.load(weights_only=True)`, which refuses any pickle
  that names a global outside torch's allow-list. We refuse with `UnsafeCheckpointError` rather than retry
  with more permissions: a checkpoint that needs arbitrary globals can run arbitrary code.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import pickle
import re
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from sdengine.devices import DTYPES  # the one table of dtype names a user may give
from sdengine.errors import SdengineError
from sdengine.io.atomic import atomic_write

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype names <-> torch dtypes (the format's own spelling).
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_ST = {v: k for k, v in _ST_DTYPES.items()}

# A header bigger than this is not a real safetensors file (the format caps it at 100 MB).
_MAX_HEADER = 100 * 1024 * 1024


class WeightsError(SdengineError, ValueError):
    """A weight file or state dict that sdengine cannot use; the message is meant for the user as is."""


class CorruptFileError(WeightsError):
    """A truncated or malformed weight file."""


class UnsafeCheckpointError(WeightsError):
    """A pickle checkpoint that needs more than plain tensors/containers to load (it could run code)."""


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """'fp16' / 'bf16' / 'fp32' (or a torch dtype, or None) -> torch dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise WeightsError(f"unknown dtype {dtype!r}; use one of fp32, fp16, bf16") from None


# --------------------------------------------------------------------------------------------- safetensors


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise CorruptFileError(f"duplicate name {dup!r}")
    return dict(pairs)


def _plain_int(x: object) -> bool:
    return type(x) is int  # JSON true/false are bools, and bool is an int subclass: refuse those


def _check_entry(path: Path, name: str, entry: object) -> tuple[torch.dtype, list[int], int, int]:
    """(dtype, shape, begin, end) of one header entry, or CorruptFileError: nothing is trusted or coerced."""
    if not isinstance(entry, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors entry for {name!r}: not a JSON object")
    dtype_name = entry.get("dtype")
    dtype = _ST_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise CorruptFileError(f"{path}: safetensors entry {name!r} has an unknown dtype {entry.get('dtype')!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_plain_int(s) and s >= 0 for s in shape):
        raise CorruptFileError(
            f"{path}: safetensors entry {name!r} has a bad shape {str(shape)[:80]} (non-negative integers expected)"
        )
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_plain_int(o) for o in offsets)):
        raise CorruptFileError(
            f"{path}: safetensors entry {name!r} has bad data_offsets {str(offsets)[:80]} (two integers expected)"
        )
    begin, end = offsets
    if begin < 0 or end < begin:
        raise CorruptFileError(f"{path}: safetensors entry {name!r} has bad data_offsets [{begin}, {end}]")
    nbytes = math.prod(shape) * dtype.itemsize
    if end - begin != nbytes:
        raise CorruptFileError(
            f"{path}: corrupt safetensors entry {name!r}: shape {str(shape)[:80]} {entry['dtype']} needs {nbytes} "
            f"bytes, offsets give {end - begin}"
        )
    return dtype, shape, begin, end


def not_weights(path: str | os.PathLike[str]) -> str | None:
    """What a file that failed to read as weights really is, when its first bytes say so: a Git LFS pointer, a
    web page (a download that saved an error or login page), or a checkpoint in the other format (a PyTorch zip
    or pickle named .safetensors, a safetensors file named .ckpt). None when they say nothing."""
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    text = head.lstrip().lower()
    if text.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights: fetch the file itself (git lfs pull, or download it again)"
    if text.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "a web page (HTML), not weights: the download saved an error or login page; download it again"
    if text.startswith(b"{") and b'"error"' in text:
        return "a JSON error message, not weights: the download failed; download it again"
    safetensors = Path(path).suffix.lower() in SAFETENSORS_SUFFIXES
    if safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):
        return "a PyTorch checkpoint (pickle), not safetensors: name it .ckpt (read weights-only) or convert it"
    if not safetensors and head.startswith(b"PK\x03\x04") and not _is_zip(Path(path)):
        return "a truncated or damaged PyTorch checkpoint (its zip archive is incomplete: an interrupted download?)"
    if not safetensors and _looks_like_safetensors(head, Path(path)):
        return "a safetensors file named like a pickle checkpoint: give it its .safetensors name"
    return None


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except (zipfile.BadZipFile, OSError, ValueError, struct.error):
        return False


def _looks_like_safetensors(head: bytes, path: Path) -> bool:
    if len(head) < 10:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    try:
        size = path.stat().st_size
    except OSError:
        return False
    return 2 <= n <= _MAX_HEADER and 8 + n <= size and head[8:9] == b"{"


def read_safetensors_header(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str], int]:
    """Return (tensor entries, __metadata__, offset of the data section); validates the layout.

    A file is accepted only if the safetensors library would accept it too: a JSON object of entries with
    a known dtype, a shape of non-negative integers whose byte count equals its offsets' span, and spans
    that tile the data section exactly (no overlap, no hole, nothing past the end or after the last
    tensor), with `__metadata__` a map of strings. Nothing is allocated from a claimed size before it has
    been checked against the file's real size.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CorruptFileError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            if (what := not_weights(path)) is not None:
                raise CorruptFileError(f"{path}: {what}")
            raise CorruptFileError(
                f"{path}: corrupt or truncated safetensors file (header claims {n} bytes, file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except CorruptFileError as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptFileError(f"{path}: corrupt safetensors header ({e})") from None
    except RecursionError:
        raise CorruptFileError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptFileError(f"{path}: corrupt safetensors header (__metadata__ must map names to strings)")
    data_start = 8 + n
    data_len = size - data_start
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        _, _, begin, end = _check_entry(path, name, entry)
        if end > data_len:
            raise CorruptFileError(
                f"{path}: truncated safetensors file: tensor {name!r} ends at byte {data_start + end}, "
                f"file has {size} bytes"
            )
        spans.append((begin, end, name))
    # The spans must tile [0, data_len): an overlap lets two tensors alias the same bytes, a hole or a tail
    # hides data nobody reads (the library refuses both, as polyglot-file defences).
    pos, prev = 0, None
    for begin, end, name in sorted(spans):
        if begin < pos:
            raise CorruptFileError(f"{path}: corrupt safetensors file: tensors {prev!r} and {name!r} overlap")
        if begin > pos:
            raise CorruptFileError(
                f"{path}: corrupt safetensors file: a hole of {begin - pos} bytes before tensor {name!r}"
            )
        pos, prev = end, name
    if pos != data_len:
        raise CorruptFileError(f"{path}: corrupt safetensors file: {data_len - pos} bytes after the last tensor")
    return header, dict(metadata), data_start


def load_safetensors(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> StateDict:
    """Map a .safetensors file and return its tensors as zero-copy views (copy-on-write, file untouched).
    ``dtype``: floating tensors stored in another dtype are read one at a time and converted (see
    :func:`load_file`)."""
    return _load_safetensors(Path(path), device, parse_dtype(dtype))[0]


def _load_safetensors(
    path: Path, device: str | torch.device, convert: torch.dtype | None = None
) -> tuple[StateDict, dict[str, str]]:
    header, metadata, data_start = read_safetensors_header(path)  # parsed and validated once
    size = path.stat().st_size
    if size == 0 or not header:
        return {}, metadata
    # shared=False maps the file MAP_PRIVATE: pages are read lazily, writes to a tensor never reach the file.
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    raw = torch.empty(0, dtype=torch.uint8)
    raw.set_(storage, 0, (size,))  # type: ignore[call-overload]
    out: StateDict = {}
    reader: io.BufferedReader | None = None  # opened on the first tensor to convert
    try:
        for name, entry in header.items():
            dtype = _ST_DTYPES[entry["dtype"]]
            shape = [int(s) for s in entry["shape"]]
            begin, end = (data_start + int(o) for o in entry["data_offsets"])
            if convert is not None and dtype.is_floating_point and dtype != convert:
                # Read with ordinary I/O, not through the map: a page of the map stays in the process's resident
                # memory once touched, so converting through it would hold the whole file AND its conversion.
                reader = reader or open(path, "rb")  # noqa: SIM115 - closed below, after the last tensor
                buf = torch.empty(end - begin, dtype=torch.uint8)
                reader.seek(begin)
                if reader.readinto(buf.numpy()) != end - begin:  # type: ignore[arg-type]
                    raise CorruptFileError(f"{path}: truncated tensor data ({name})")
                t = buf.view(dtype).reshape(shape).to(convert)
                out[name] = t if torch.device(device).type == "cpu" else t.to(device)
                continue
            chunk = raw[begin:end]
            if begin % dtype.itemsize:
                # Files written by other tools may not align tensors; a view needs alignment, so copy this one.
                chunk = chunk.clone()
            t = chunk.view(dtype).reshape(shape) if dtype != torch.bool else chunk.view(torch.bool).reshape(shape)
            out[name] = t if torch.device(device).type == "cpu" else t.to(device)
    finally:
        if reader is not None:
            reader.close()
    return out, metadata


def safetensors_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The `__metadata__` string map of a .safetensors file."""
    return read_safetensors_header(path)[1]


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
    dtype: str | torch.dtype | None = None,
) -> None:
    """Write a .safetensors file, streaming one tensor at a time (never the whole file in memory).

    `dtype` converts floating-point tensors (fp32/fp16/bf16); integer/bool tensors keep theirs. Tensors are
    written in (itemsize desc, name) order so that every tensor is aligned to its element size.
    """
    target = parse_dtype(dtype)

    def out_dtype(t: torch.Tensor) -> torch.dtype:
        return target if (target is not None and t.is_floating_point()) else t.dtype

    layout = {name: (out_dtype(t), tuple(t.shape)) for name, t in tensors.items()}
    write_safetensors_streaming(layout, lambda name: tensors[name], path, metadata=metadata)


def write_safetensors_streaming(
    layout: Mapping[str, tuple[torch.dtype, Sequence[int]]],
    produce: Callable[[str], torch.Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a .safetensors file whose tensors are made one at a time: ``layout`` gives each name's dtype and
    shape (the header is written first), ``produce(name)`` the tensor, called once per name in the file's order
    and converted to the layout's dtype; only that one tensor is held while it is written. A tensor whose shape
    is not its layout's is a WeightsError (the file is not written: a temporary file is renamed at the end)."""
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    for name, (dt, _) in layout.items():
        if dt not in _TORCH_TO_ST:
            raise WeightsError(f"cannot write tensor {name!r}: dtype {dt} has no safetensors code")
    order = sorted(layout, key=lambda k: (-layout[k][0].itemsize, k))
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name in order:
        dt, shape = layout[name]
        nbytes = math.prod(int(s) for s in shape) * dt.itemsize
        header[name] = {
            "dtype": _TORCH_TO_ST[dt],
            "shape": [int(s) for s in shape],
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)  # pad so the data section starts 8-aligned
    # A temporary file unique to this write, removed on any error: concurrent writers never collide and a
    # failed write leaves neither a half file under the real name nor a temporary file.
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in order:
            dt, shape = layout[name]
            t = produce(name).detach()
            if tuple(t.shape) != tuple(int(s) for s in shape):
                raise WeightsError(f"cannot write tensor {name!r}: shape {tuple(t.shape)}, expected {tuple(shape)}")
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.to(dt).contiguous()
            if t.numel():
                # numpy has no bfloat16/float8: write the same bytes through an integer view of equal width.
                b = t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t.to(torch.uint8).reshape(-1)
                f.write(memoryview(b.numpy()))  # type: ignore[arg-type]


class SafetensorsReader:
    """One tensor at a time from a .safetensors file, read with ordinary file I/O (not through a memory map,
    whose touched pages would stay resident): ``names``, ``dtype(name)``, ``shape(name)`` come from the validated
    header without reading any data; ``read(name)`` returns a new tensor holding only that tensor's bytes.
    ``metadata``: the file's ``__metadata__``. Use as a context manager (or call ``close``)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        header, self.metadata, self._data_start = read_safetensors_header(self.path)
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, entry in header.items():
            begin, end = (int(o) for o in entry["data_offsets"])
            self._entries[name] = (_ST_DTYPES[entry["dtype"]], tuple(int(s) for s in entry["shape"]), begin, end)
        self._file: io.BufferedReader | None = None

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def read(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        if self._file is None:
            self._file = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        buf = torch.empty(end - begin, dtype=torch.uint8)
        if end > begin:
            self._file.seek(self._data_start + begin)
            if self._file.readinto(buf.numpy()) != end - begin:  # type: ignore[arg-type]
                raise CorruptFileError(f"{self.path}: truncated tensor data ({name})")
        return buf.view(dtype).reshape(shape) if dtype != torch.bool else buf.view(torch.bool).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ pickles


# PyTorch-Lightning checkpoints (e.g. the original SD 1.x .ckpt files) pickle callback objects next to the
# weights. Stand-ins with no behaviour let weights_only=True read them without importing lightning.
class _InertObject:
    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


_LIGHTNING_STANDINS = [
    (type("ModelCheckpoint", (_InertObject,), {}), "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]


def _numpy_globals() -> list[Any]:
    """The numpy globals a checkpoint may name: numpy scalars (a `global_step` saved as numpy.int64), dtypes and
    plain arrays, as A1111's safe unpickler allows. They only rebuild values from bytes and never call anything
    the file chooses. Object/void dtypes (which would hold arbitrary Python objects) stay refused. Both module
    spellings are accepted: numpy 2 pickles `numpy._core.multiarray`, numpy 1 `numpy.core.multiarray`."""
    try:
        import numpy as np
        from numpy._core import multiarray
    except ImportError:  # numpy is a dependency; without it such a file is refused as before
        return []
    out: list[Any] = [np.ndarray, np.dtype]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        out += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    # A dtype is rebuilt as numpy.dtype(...) then given its state: the unpickler lets only these classes take it.
    kinds = "?bhilqBHILQefdgFDGSUMm"  # bool, ints, uints, floats, complex, bytes, str, datetime, timedelta
    out += sorted({type(np.dtype(k)) for k in kinds}, key=lambda t: t.__name__)
    return out


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_OPCODE_RE = re.compile(r"Unsupported operand (\d+)")
_BUILD_RE = re.compile(r"Can only build .*but got <class '([\w.]+)'>")


def _refuse(path: Path, err: Exception) -> UnsafeCheckpointError:
    # torch's own text advises retrying with the restriction switched off: never pass that on. Only the
    # global's name or the opcode is taken from it.
    text = str(err)
    glob, opcode, build = _GLOBAL_RE.search(text), _OPCODE_RE.search(text), _BUILD_RE.search(text)
    if glob:
        what = f"it needs the global {glob.group(1)!r}, which a weights-only load does not allow"
    elif build:  # e.g. a numpy object array, whose items could be anything
        what = f"it needs to build a {build.group(1)}, which a weights-only load does not allow"
    elif opcode and (proto := _pickle_protocol(path)) is not None and proto > 2:
        what = (
            f"it was written with pickle protocol {proto} (torch.save(..., pickle_protocol={proto})), which the "
            "weights-only reader cannot check (it reads protocol 2, torch.save's default); re-save it with the "
            "default protocol"
        )
    elif opcode:
        what = f"pickle opcode {int(opcode.group(1))} is not allowed in a weights-only load (not a plain tensor file)"
    else:
        what = "the weights-only unpickler refused it"
    return UnsafeCheckpointError(
        f"{path}: refusing to load this pickle checkpoint: {what}. A checkpoint that needs more than tensors "
        "could run code when loaded; convert it with a tool you trust to .safetensors."
    )


def _pickle_protocol(path: Path) -> int | None:
    """The protocol of a checkpoint's pickle (its PROTO opcode: b"\\x80" and the number), for the zip format
    its data.pkl; None when it does not start with one."""
    try:
        if _is_zip(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with z.open(name) as f:
                    head = f.read(2)
        else:
            with open(path, "rb") as f:
                head = f.read(2)
    except (OSError, zipfile.BadZipFile, ValueError, struct.error, EOFError, RuntimeError):
        return None
    return head[1] if len(head) == 2 and head[0] == 0x80 else None


def _first_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return lines[0][:200] if lines else type(err).__name__


def load_pickle_checkpoint(path: str | os.PathLike[str], *, allow: Sequence[Any] = ()) -> dict[str, Any]:
    """torch.load(weights_only=True), memory-mapped where the file format allows it. ``allow``: more classes the
    unpickler may build (plain containers only, e.g. ``nn.ParameterDict`` of old embedding files)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise CorruptFileError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        mmap_ok = zipfile.is_zipfile(path)  # mmap needs the zip (torch>=1.6) format
    except (zipfile.BadZipFile, OSError, ValueError, struct.error):
        # A crafted zip64 record (e.g. "spans several disks") raises here; torch's own reader then says why.
        mmap_ok = False
    try:
        allowed = [*_LIGHTNING_STANDINS, *_numpy_globals(), *allow]
        with torch.serialization.safe_globals(allowed), warnings.catch_warnings():  # type: ignore[arg-type]
            warnings.simplefilter("ignore", UserWarning)  # torch's note on pickle protocols: not for users
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap_ok)
    except pickle.UnpicklingError as e:
        if (what := not_weights(path)) is not None:  # not a pickle at all: say what it is, not "unsafe"
            raise CorruptFileError(f"{path}: {what}") from None
        raise _refuse(path, e) from None
    except (
        RuntimeError,
        EOFError,
        zipfile.BadZipFile,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        AssertionError,
        struct.error,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        # A crafted or broken file can trip any of these inside torch's reader (even an assert in its legacy
        # format reader); none of them is a bug here.
        if (what := not_weights(path)) is not None:
            raise CorruptFileError(f"{path}: {what}") from None
        raise CorruptFileError(f"{path}: cannot read checkpoint ({_first_line(e)})") from None
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: checkpoint holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def unwrap_state_dict(obj: Mapping[str, Any], path: str | os.PathLike[str] = "<checkpoint>") -> StateDict:
    """Lightning/LDM `.ckpt` files nest the weights under 'state_dict' (some tools under 'model'/'module'; the
    T2I-Adapter ``.pth`` files of some releases under 'adapter')."""
    for key in ("state_dict", "model", "module", "adapter"):
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
            return dict(inner)
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: no tensors found (top-level keys: {sorted(obj)[:8]})")
    return tensors


def load_file(path: str | os.PathLike[str], dtype: str | torch.dtype | None = None) -> tuple[StateDict, dict[str, Any]]:
    """Load any supported weight file -> (flat state dict, extra info).

    ``dtype``: floating tensors in another dtype are converted as they are read, one at a time (a safetensors
    file: the others stay zero-copy views of its map), so loading needs the converted weights' memory, not the
    file's plus theirs; None keeps the file's dtypes.

    Extra info holds the safetensors `__metadata__` or, for pickles, the scalar top-level fields such as
    `global_step` (used as a hint for SD2's prediction type).
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _load_safetensors(path, "cpu", parse_dtype(dtype))
    if suffix in PICKLE_SUFFIXES:
        obj = load_pickle_checkpoint(path)
        # A numpy scalar (a training script's global_step as numpy.int64) counts as the Python number it holds.
        plain = {
            k: (v.item() if type(v).__module__ == "numpy" and hasattr(v, "item") and v.ndim == 0 else v)
            for k, v in obj.items()
        }
        info = {k: v for k, v in plain.items() if isinstance(v, int | float | str)}
        return convert_dtype(unwrap_state_dict(obj, path), dtype), info
    raise WeightsError(f"{path}: unsupported weight file type {suffix!r} (use .safetensors, .ckpt, .pt, .bin)")


def convert_dtype(sd: Mapping[str, torch.Tensor], dtype: str | torch.dtype | None) -> StateDict:
    """Cast floating tensors to `dtype` (None: unchanged); integer buffers keep their type."""
    target = parse_dtype(dtype)
    if target is None:
        return dict(sd)
    return {k: (v.to(target) if v.is_floating_point() else v) for k, v in sd.items()}


def total_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
