"""Which device and dtype to run on: one rule for the CLI, the pipeline and the trainers."""

from __future__ import annotations

import torch

from sdengine.errors import GenerationError, SdengineError


class DeviceError(SdengineError, ValueError):
    """A device that was asked for is not there."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto``: cuda, then mps, then cpu. A named device that is not there is an error."""
    if isinstance(device, torch.device):
        return device
    name = device.lower()
    mps = getattr(torch.backends, "mps", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} was asked for, but no CUDA device is available")
    if name == "mps" and (mps is None or not mps.is_available()):
        raise DeviceError("device 'mps' was asked for, but MPS is not available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {device!r}; use auto, cpu, cuda or mps") from None


class DtypeError(GenerationError):
    """A dtype name sdengine does not know (a GenerationError: load_pipeline and generate report it)."""


# THE table of dtype names a user may give (CLI --dtype, load_pipeline(dtype=...), trainers).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None: float16 on CUDA and MPS (what their kernels are fast at), float32 on the CPU."""
    if dtype is None:
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise DtypeError(f"unknown dtype {dtype!r}; use fp32, fp16 or bf16") from None


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX-512-BF16 or AMX-BF16, read from ``cpuinfo`` on
    Linux); elsewhere False (bf16 then runs emulated)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False
