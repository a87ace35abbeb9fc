"""Faults, not bad inputs: kill -9 during an export, out of memory, a full disk. Each fails the one piece of
work it hit, leaves the last complete file as it was (no truncated file under a final name), and the next
piece of work runs normally (CLI, Python API and the server's job queue)."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

import sdengine
from sdengine.cli import main
from sdengine.diffusion import sampling
from sdengine.io.atomic import remove_stale_temp_files
from sdengine.weights import load_safetensors, save_safetensors

SRC = Path(sdengine.__file__).resolve().parents[1]
FAST = {"steps": 2, "width": 32, "height": 32, "progress": False, "seed": 4}
LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"


def _digest(path: Path) -> str:
    if path.is_dir():
        return hashlib.sha256(
            b"".join(
                p.relative_to(path).as_posix().encode() + p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            )  # fmt: skip
        ).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


# -- kill -9 in the middle of an export ---------------------------------------------------------------

# Runs CODE in a child whose first fsync (the moment a temporary file holds all its bytes, before the
# rename) writes MARKER and then hangs, so that the parent can kill -9 it exactly mid-export.
_HANG_AT_FSYNC = """
import os, sys, time
marker = sys.argv[1]
real = os.fsync
def hang(fd):
    real(fd)
    open(marker, "w").write("in the middle")
    time.sleep(600)
os.fsync = hang
"""


def _kill_mid_write(tmp_path: Path, code: str) -> None:
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, "-c", _HANG_AT_FSYNC + code, str(marker)],
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 240  # start-up on a loaded machine; bounded either way
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), (proc.poll(), proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "")
    finally:
        proc.kill()  # SIGKILL: no handler, no clean-up runs
        proc.wait(60)


@pytest.mark.parametrize("target", ["one.safetensors", "folder"])
def test_kill_9_during_convert_keeps_the_last_file_and_the_next_run_tidies_up(tiny_sd1_folder, tmp_path, target):
    dst = tmp_path / "out" / target
    assert main(["convert", str(tiny_sd1_folder), str(dst)]) == 0
    before = _digest(dst)
    _kill_mid_write(
        tmp_path,
        f"from sdengine.cli import main; main(['convert', {str(tiny_sd1_folder)!r}, {str(dst)!r}, '--dtype', 'fp16'])",
    )
    assert _digest(dst) == before  # the last complete export, byte for byte
    assert _temp_files(dst.parent)  # the killed writer's leftover (nothing could remove it)
    assert main(["convert", str(tiny_sd1_folder), str(dst), "--dtype", "fp16"]) == 0
    assert _temp_files(dst.parent) == []  # the next run removed it
    one = dst if target.endswith(".safetensors") else dst / "unet" / "diffusion_pytorch_model.safetensors"
    assert {t.dtype for t in load_safetensors(one).values()} == {torch.float16}


def test_kill_9_during_a_lora_export_keeps_the_last_file(tmp_path):
    """A LoRA export is one save_safetensors; the training run's next start removes the leftover
    (remove_stale_temp_files, as the training loop calls it)."""
    out = tmp_path / "run"
    old = {f"{LAYER}.lora_down.weight": torch.ones(2, 32), f"{LAYER}.lora_up.weight": torch.ones(32, 2)}
    save_safetensors(old, out / "lora.safetensors")
    _kill_mid_write(
        tmp_path,
        "import torch; from sdengine.weights import save_safetensors\n"
        f"save_safetensors({{'{LAYER}.lora_down.weight': torch.zeros(2, 32)}}, {str(out / 'lora.safetensors')!r})",
    )
    got = load_safetensors(out / "lora.safetensors")
    assert got.keys() == old.keys() and all(torch.equal(got[k], old[k]) for k in old)
    left = _temp_files(out)
    assert len(left) == 1 and remove_stale_temp_files(out, recursive=True) == left and _temp_files(out) == []


def test_kill_9_during_a_checkpoint_write_resumes_bit_exactly(tmp_path):
    """Killed while the step-10 checkpoint is half written: the step-5 one loads, the leftover is removed
    when the run resumes, and the resumed run equals one that was never interrupted."""
    from sdengine.train.loop import train
    from test_train_loop import cfg, fresh, loss_fn

    out = tmp_path / "run"
    tests = Path(__file__).resolve().parent
    _kill_mid_write(
        tmp_path,
        # hang only at the second checkpoint's fsync (the first one completes normally)
        "seen = []\n"
        "def pick(fd):\n"
        "    if 'checkpoint' in os.readlink(f'/proc/self/fd/{fd}'):\n"
        "        seen.append(fd)\n"
        "    return hang(fd) if len(seen) == 2 else real(fd)\n"
        "os.fsync = pick\n"
        f"sys.path.insert(0, {str(tests)!r})\n"
        "from test_train_loop import cfg, fresh, loss_fn\n"
        "from sdengine.train.loop import train\n"
        f"train(fresh(), loss_fn, cfg(steps=20, checkpoint_every=5), {str(out)!r}, progress=False)\n",
    )
    from sdengine.train.checkpoint import load_checkpoint

    assert load_checkpoint(out / "checkpoint.pt")["step"] == 5
    assert len(_temp_files(out)) == 1
    resumed = train(fresh(), loss_fn, cfg(steps=20, checkpoint_every=5), out, progress=False, resume=True)
    whole = train(fresh(), loss_fn, cfg(steps=20, checkpoint_every=5), tmp_path / "whole", progress=False)
    assert resumed.losses == whole.losses and _temp_files(out) == []


# -- out of memory ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_api_out_of_memory_fails_one_call_and_the_next_is_unharmed(pipe, tmp_path, error):
    reference = pipe("red heart", **FAST).arrays
    lora = tmp_path / "styl.safetensors"
    save_safetensors({f"{LAYER}.lora_down.weight": torch.ones(2, 32), f"{LAYER}.lora_up.weight": torch.ones(32, 2)},
                     lora)  # fmt: skip

    def oom(module, inputs, output):
        raise error("simulated: tried to allocate 20.00 GiB")

    h = pipe.unet.conv_out.register_forward_hook(oom)
    try:
        with pytest.raises(error):
            pipe("red heart", loras=[(lora, 1.0)], **FAST)
    finally:
        h.remove()
    # the LoRA of the failed call was removed again, nothing else changed: the same image as before
    np.testing.assert_array_equal(pipe("red heart", **FAST).arrays, reference)


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_cli_out_of_memory_is_one_line_and_writes_nothing(tiny_sd1_folder, tmp_path, monkeypatch, capsys, error):
    def oom(*a, **k):
        raise error("simulated")

    monkeypatch.setattr(sampling, "sample", oom)
    out = tmp_path / "o"
    args = ["generate", "x", "--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32",
            "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sdengine: error: out of memory: use a smaller size or batch (or --device cpu)"]
    assert not out.exists() or not list(out.iterdir())
    monkeypatch.undo()
    assert main(args) == 0 and len(list(out.glob("*.png"))) == 1


def test_server_out_of_memory_and_a_full_disk_fail_one_job_each_and_the_next_runs(tmp_path, monkeypatch):
    from _live_server import live_server, server_config, shared_loader, wait_job

    real = shared_loader("emoji", "cpu")
    faults = [torch.OutOfMemoryError("simulated"), MemoryError("simulated")]

    class Flaky:
        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, **kw):
            if faults:
                raise faults.pop(0)
            return real(**kw)

    body = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "seed": 1}
    outputs = tmp_path / "outputs"
    with live_server(server_config(tmp_path), loader=lambda ref, device: Flaky()) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:

            def run() -> dict:
                r = c.post("/v1/jobs", json=body)
                assert r.status_code == 202, r.text
                return wait_job(c, r.json()["id"], timeout=240)

            for _ in range(2):
                j = run()
                assert j["state"] == "failed" and "out of memory" in j["error"], j
            real_save = Image.Image.save

            def full_disk(self, fp, *a, **k):
                fp.write(b"\x89PNG\r\n\x1a\n half")
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr(Image.Image, "save", full_disk)
            j = run()
            assert j["state"] == "failed" and j["error"].startswith("could not save the image: "), j
            assert "No space left on device" in j["error"], j
            assert not outputs.exists() or not list(outputs.iterdir())  # no PNG, no temporary file
            monkeypatch.setattr(Image.Image, "save", real_save)
            j = run()
            assert j["state"] == "done", j
            assert [p.suffix for p in outputs.iterdir()] == [".png"]


# -- a full disk while saving an image ----------------------------------------------------------------


def test_cli_full_disk_keeps_the_old_image_and_leaves_no_partial_file(tiny_sd1_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "keep.png"
    args = ["generate", "x", "--model", str(tiny_sd1_folder), "--steps", "2", "--width", "32", "--height", "32",
            "--seed", "1", "--no-progress", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    before = out.read_bytes()
    written = []

    def full_disk(self, fp, *a, **k):
        fp.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)  # part of the image made it to the disk
        written.append(1)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert main([*args[:-1], str(out), "--seed", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert written and len(err) == 1 and "No space left on device" in err[0]
    assert out.read_bytes() == before  # the previous image, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.png"]  # no temporary file, no partial file
    new = tmp_path / "new"
    assert main([*args[:-1], str(new)]) == 2
    assert not new.exists() or not list(new.iterdir())
