"""The diffusion-transformer families on a CUDA GPU in half precision, against the same tiny folder in fp32 on the
CPU: SD3, FLUX.1, Chroma and Qwen-Image (each built and parity-tested on the CPU by its own test file), plus FLUX.1
with fp8-stored weights. None of them has run on a GPU yet (docs/gpu.md); this is what the next device session runs
with the other ``cuda`` tests (``tools/gpu_check.sh``).

Skipped without CUDA. ``SDENGINE_SMOKE_DEVICE=cpu`` runs the same checks on the CPU (bf16 there), which is how this
file itself was checked on a machine without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _chroma_models import make_chroma_folder  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _qwen_models import make_qwen_folder  # noqa: E402
from _sd3_models import make_sd3_folder  # noqa: E402

DEVICE = os.environ.get("SDENGINE_SMOKE_DEVICE", "cuda")
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device (SDENGINE_SMOKE_DEVICE=cpu)"
    ),
]

MAKERS: dict[str, Callable[[Path], Path]] = {
    "sd3": lambda dst: make_sd3_folder(dst),
    "flux": lambda dst: make_flux_folder(dst),
    "chroma": lambda dst: make_chroma_folder(dst),
    "qwen_image": lambda dst: make_qwen_folder(dst),
}
# mean abs on 0..1 pixels against fp32 on the CPU; tiny random weights amplify rounding more than real ones do
BARS = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
SETTINGS = dict(steps=3, seed=5, width=32, height=32, progress=False)
PROMPT = "a red apple on a wooden table"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dit_families")
    return {family: make(root / family) for family, make in MAKERS.items()}


@pytest.fixture(scope="module")
def references(folders) -> dict[str, np.ndarray]:
    """Each family's image in fp32 on the CPU."""
    out = {}
    for family, folder in folders.items():
        pipe = sdengine.load_pipeline(folder, device="cpu", dtype="float32")
        out[family] = pipe(PROMPT, **SETTINGS).arrays
    return out


def _half_dtypes() -> list[torch.dtype]:
    if DEVICE == "cpu":
        return [torch.bfloat16]  # the CPU's half products are too slow and partly missing for fp16
    return [torch.float16, torch.bfloat16]


@pytest.mark.parametrize("family", list(MAKERS))
def test_half_precision_images_stay_near_fp32(folders, references, family):
    """On the device in each half dtype, and in the family's own default dtype there (fp16 for all but
    Qwen-Image, whose Qwen2.5-VL overflows fp16: bf16): finite, and within the bar of the CPU's fp32 image."""
    want = references[family]
    for dtype in _half_dtypes():
        if family == "qwen_image" and dtype == torch.float16:
            continue  # Qwen-Image runs in bf16 on GPUs (docs/qwen-image.md); fp16 may rightly be refused
        pipe = sdengine.load_pipeline(folders[family], device=DEVICE, dtype=dtype)
        got = pipe(PROMPT, **SETTINGS).arrays
        assert np.isfinite(got).all(), (family, dtype)
        assert got.std() > 1e-3, (family, dtype)  # an image, not a flat fill
        gap = float(np.abs(got - want).mean())
        print(f"{family} {dtype} on {DEVICE}: {gap:.2e} mean abs from fp32")
        assert gap < BARS[dtype], f"{family} {dtype}: {gap:.4f} mean abs from fp32"
    pipe = sdengine.load_pipeline(folders[family], device=DEVICE)  # the family's default dtype on the device
    got = pipe(PROMPT, **SETTINGS).arrays
    assert np.isfinite(got).all()
    assert float(np.abs(got - want).mean()) < max(BARS.values())


def test_flux_with_fp8_stored_weights(folders, references):
    """FLUX.1 with its transformer's weights stored in e4m3 (``weight_dtype``) computes in the half dtype: near the
    fp32 image (the weights rounded to fp8 move it more than the half products do)."""
    dtype = _half_dtypes()[-1]
    pipe = sdengine.load_pipeline(folders["flux"], device=DEVICE, dtype=dtype, weight_dtype="fp8_e4m3fn")
    got = pipe(PROMPT, **SETTINGS).arrays
    assert np.isfinite(got).all()
    assert float(np.abs(got - references["flux"]).mean()) < 0.1
