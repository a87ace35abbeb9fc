"""Oversized work is refused up front, and Ctrl-C stops a generation: absurd sizes get one line before any
step runs (each side at most 8x the training size and 8192 px, besides the memory estimate), a huge attention
runs in query chunks (Python handles SIGINT only between kernel calls), and SIGINT mid-generation exits 130."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sdengine
import sdengine.nn.attention as attention
import sdengine.vae_utils as vu
from sdengine.cli import main
from sdengine.errors import GenerationError
from sdengine.pipeline.core import MAX_SIDE, MAX_SIZE_FACTOR
from sdengine.pipeline.request import GenerationRequest

SRC = Path(sdengine.__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.mark.parametrize("size", [(4096, 4096), (100000, 64), (64, 100000), (512, 32)])
def test_absurd_sizes_are_refused_before_any_step(pipe, monkeypatch, size):
    # plenty of memory: the work rule, not the memory estimate, must answer
    monkeypatch.setattr(vu, "available_memory", lambda device: 2**50)
    called = []
    monkeypatch.setattr(pipe.unet, "forward", lambda *a, **k: called.append(1))
    w, h = size
    t = time.perf_counter()
    with pytest.raises(GenerationError, match=rf"{w}x{h} is too large for .*: each side may be at most 256 px"):
        pipe("x", width=w, height=h, steps=1, progress=False)
    assert not called and time.perf_counter() - t < 10


def test_the_largest_allowed_size_passes_the_checks(pipe):
    assert pipe.max_side() == min(MAX_SIDE, MAX_SIZE_FACTOR * pipe.default_size) == 256
    p = pipe.prepare(GenerationRequest(prompt="x", width=256, height=256, steps=1))
    assert (p.width, p.height) == (256, 256)


def test_cli_refuses_4096_on_the_emoji_model(tmp_path, capsys):
    out = tmp_path / "o"
    rc = main(["generate", "x", "--width", "4096", "--height", "4096", "--steps", "1", "--no-progress",
               "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "is too large for emoji: each side may be at most 512 px" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("mask_kind", [None, "per-query", "broadcast"])
def test_chunked_attention_equals_one_call(monkeypatch, mask_kind):
    g = torch.Generator().manual_seed(0)
    B, L, heads, d = 2, 300, 4, 8
    q, k, v = (torch.randn(B, L, heads * d, generator=g) for _ in range(3))
    mask = None
    if mask_kind == "per-query":
        mask = torch.randn(B, 1, L, L, generator=g)
    elif mask_kind == "broadcast":
        mask = torch.randn(B, 1, 1, L, generator=g)
    whole = attention.scaled_dot_product_attention(q, k, v, heads, mask=mask)
    calls = []
    real = F.scaled_dot_product_attention

    def counting(*a, **kw):
        calls.append(a[0].shape[2])
        return real(*a, **kw)

    monkeypatch.setattr(attention, "CHUNK_SCORES", heads * L * 64)  # 64 query rows per call
    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    chunked = attention.scaled_dot_product_attention(q, k, v, heads, mask=mask)
    assert calls == [64, 64, 64, 64, 44]
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-6)


def test_sigint_mid_generation_exits_130_with_one_line(tiny_sd1_folder, tmp_path):
    """A real Ctrl-C (SIGINT to the process) while sampling: exit 130, "interrupted", no PNG, in bounded time.
    The attention is made to run in small chunks, as a huge size would, to show a chunk boundary is enough."""
    out = tmp_path / "o"
    script = (
        # A shell starts a background job (`make test &`) with SIGINT ignored, and the child would inherit that:
        # Python's own Ctrl-C handler is put back first, as in a foreground terminal.
        "import signal; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "import sys; import sdengine.nn.attention as a; a.CHUNK_SCORES = 2**20\n"
        "from sdengine.cli import main\n"
        f"sys.exit(main(['generate', 'x', '--model', {str(tiny_sd1_folder)!r}, '--steps', '1000', '--width', '256',"
        f" '--height', '256', '--seed', '1', '--sampler', 'euler', '--out', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, env=env)
    assert proc.stderr is not None
    seen = b""
    deadline = time.monotonic() + 240  # start-up under load; bounded either way
    try:
        while b"sampling" not in seen and time.monotonic() < deadline and proc.poll() is None:
            seen += os.read(proc.stderr.fileno(), 4096)
        assert b"sampling" in seen, seen[-500:]
        time.sleep(1.0)  # well inside the sampling loop
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[1]
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = (seen + rest).decode().replace("\r", "\n").strip().splitlines()
    assert proc.returncode == 130 and lines[-1].strip().endswith("interrupted"), lines[-3:]
    assert "Traceback" not in "\n".join(lines)
    assert took < 30, took  # seconds on a loaded 2-core machine; well under 5 on an idle one
    assert not list(out.glob("*.png")) if out.exists() else True


def test_memory_estimate_counts_the_attention_scores(pipe, monkeypatch):
    """A kernel may materialise the scores of one attention chunk (CHUNK_SCORES per row, in float32): the
    estimate holds them, so a machine without that much memory is told so before any step."""
    need = pipe.estimate_memory(256, 256, 1, cfg=True, tiled=False)
    assert need >= 2 * attention.CHUNK_SCORES * 4  # two rows (CFG) of a full chunk
    monkeypatch.setattr(vu, "available_memory", lambda device: int(need * 0.9))
    with pytest.raises(GenerationError, match="256x256 x 1 needs about"):
        pipe("x", width=256, height=256, steps=1, progress=False, vae_tiling=False)
