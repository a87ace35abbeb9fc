"""Fashion-MNIST from the Debian package `dataset-fashion-mnist` (IDX files, gzip).

The IDX format (LeCun's MNIST page): a 4-byte magic ``0x00 0x00 <dtype code> <ndim>``, then
``ndim`` big-endian uint32 sizes, then the data in big-endian C order. Fashion-MNIST uses it
unchanged (Xiao et al. 2017, arXiv:1708.07747): images are ``(N, 28, 28)`` uint8, 0 = background,
labels are ``(N,)`` uint8 in ``0..9``.

Reading is numpy only (no torchvision, no downloads: this machine is offline).
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from sdengine.errors import SdengineError

__all__ = [
    "APT_PACKAGE",
    "CLASS_NAMES",
    "DEFAULT_ROOT",
    "FashionMNIST",
    "IDXError",
    "load_fashion_mnist",
    "read_idx",
    "resolve_root",
    "to_model_range",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
# Overrides the default location without code changes (e.g. a copy on a faster disk).
ROOT_ENV_VAR = "SDENGINE_FASHION_MNIST"

CLASS_NAMES: list[str] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]

Split = Literal["train", "test"]

_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class IDXError(SdengineError, ValueError):
    """A file that is not a well-formed IDX file (bad magic, wrong size, truncated gzip...)."""


def _read_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as e:  # gzip raises BadGzipFile (OSError) / EOFError on truncation
        raise IDXError(f"{path}: cannot read ({type(e).__name__}: {e}); is the file corrupt?") from e


def read_idx(path: str | os.PathLike[str], expect_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (plain or ``.gz``) into a native-endian numpy array.

    Raises :class:`IDXError` naming the file when the header or the payload size is wrong.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise IDXError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise IDXError(f"{path}: bad IDX magic {raw[:4].hex()} (expected 0000<type><ndim>)")
    if ndim == 0:
        raise IDXError(f"{path}: IDX header says 0 dimensions")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXError(f"{path}: expected a {expect_ndim}-d IDX file, header says {ndim}-d")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise IDXError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header_len})")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    got = len(raw) - header_len
    if got != expected:
        raise IDXError(f"{path}: payload is {got} bytes but header shape {shape} x {dtype.itemsize} B needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    # Native byte order and a writable copy, so torch.from_numpy works without warnings.
    return data.astype(dtype.newbyteorder("="), copy=True)


def resolve_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The dataset folder: ``root``, else ``$SDENGINE_FASHION_MNIST``, else the Debian path."""
    if root is not None:
        return Path(root)
    env = os.environ.get(ROOT_ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def load_fashion_mnist(
    split: Split = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Load a split as ``(images uint8 (N, 28, 28), labels int64 (N,))``.

    A missing file raises ``FileNotFoundError`` naming the path and the apt package to install.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    base = resolve_root(root)
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = base / img_name, base / lbl_name
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST not found: {p} is missing "
                f"(install it with `apt-get install {APT_PACKAGE}`, or pass root= / set ${ROOT_ENV_VAR})"
            )
    images = read_idx(img_path, expect_ndim=3)
    labels = read_idx(lbl_path, expect_ndim=1)
    if images.dtype != np.uint8 or labels.dtype != np.uint8:
        raise IDXError(f"{base}: expected uint8 IDX files, got {images.dtype} / {labels.dtype}")
    if images.shape[1:] != (28, 28):
        raise IDXError(f"{img_path}: expected 28x28 images, got {images.shape[1:]}")
    if images.shape[0] != labels.shape[0]:
        raise IDXError(f"{base}: {images.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise IDXError(f"{lbl_path}: label {int(labels.max())} out of range 0..{len(CLASS_NAMES) - 1}")
    return images, labels.astype(np.int64)


def to_model_range(images: np.ndarray | torch.Tensor, pad: int = 2) -> torch.Tensor:
    """uint8 ``(N, 28, 28)`` -> float32 ``(N, 1, 28 + 2 pad, 28 + 2 pad)`` in ``[-1, 1]``.

    Padding uses the background value -1 (pixel 0): 32x32 lets a UNet halve the size 3 times.
    """
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 3:
        raise ValueError(f"expected uint8 (N, H, W) images, got {x.dtype} {tuple(x.shape)}")
    x = x.unsqueeze(1).to(torch.float32).div_(127.5).sub_(1.0)  # (N, 1, 28, 28)
    if pad:
        x = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)  # (N, 1, 32, 32)
    return x


class FashionMNIST(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fashion-MNIST as float32 ``(1, 32, 32)`` tensors in ``[-1, 1]`` with int64 labels.

    The whole split is converted once into one tensor (60k x 32 x 32 x 4 B = 246 MB for train), so
    ``__getitem__`` is an index, and training loops may skip the DataLoader and index
    ``self.images[idx]`` with a batch of indices directly.
    """

    def __init__(
        self,
        split: Split = "train",
        root: str | os.PathLike[str] | None = None,
        pad: int = 2,
        limit: int | None = None,
    ) -> None:
        images, labels = load_fashion_mnist(split, root)
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.split = split
        self.images: torch.Tensor = to_model_range(images, pad=pad)  # (N, 1, 32, 32)
        self.labels: torch.Tensor = torch.from_numpy(labels)  # (N,)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    @property
    def class_names(self) -> list[str]:
        return list(CLASS_NAMES)
