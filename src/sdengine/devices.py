"""Which device and dtype to run on: one rule for the CLI, the pipeline and the trainers."""

from __future__ import annotations

import torch

from sdengine.errors import SdengineError


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
