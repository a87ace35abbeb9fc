"""One training run per output folder at a time: a second run on the same --out (another process, another
thread) is refused with one line naming the folder and the run that holds it, and changes nothing; the lock of
a run that was killed is taken over."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from sdengine.cli import main
from sdengine.errors import SdengineError
from sdengine.train.checkpoint import CHECKPOINT_NAME, LOCK_NAME, CheckpointError, RunLockedError, run_lock
from sdengine.train.controlnet import train_controlnet
from sdengine.train.ddpm import train_ddpm
from sdengine.train.embedding import train_embedding
from sdengine.train.emoji import train_emoji
from sdengine.train.loop import TrainConfig, train
from sdengine.train.lora import train_lora
from sdengine.train.tiny_vae import train_tiny_vae

SRC = str(Path(__file__).resolve().parents[1] / "src")
HOLDER = (
    "import sys\n"
    "from sdengine.train.checkpoint import run_lock\n"
    "with run_lock(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.read()\n"
)


def _cfg() -> TrainConfig:
    return TrainConfig(steps=3, batch_size=2, lr=1e-2, warmup_steps=0, sample_every=0, checkpoint_every=0)


def _loss(m: nn.Module, step: int, g: torch.Generator) -> torch.Tensor:
    x = torch.randn(2, 3, generator=g)
    return (m(x) - x).pow(2).mean()


def _train(out: Path):
    torch.manual_seed(0)
    return train(nn.Linear(3, 3), _loss, _cfg(), out, progress=False)


# Another run as the kernel sees it, without importing torch (fast): the lock file flock-ed, its line written
LIGHT_HOLDER = (
    "import fcntl, json, os, sys\n"
    "os.makedirs(sys.argv[1], exist_ok=True)\n"
    f"fd = os.open(os.path.join(sys.argv[1], {LOCK_NAME!r}), os.O_RDWR | os.O_CREAT)\n"
    "fcntl.flock(fd, fcntl.LOCK_EX)\n"
    "line = {'pid': os.getpid(), 'host': 'h', 'started': 's', 'command': 'sdengine train lora --out x'}\n"
    "os.write(fd, (json.dumps(line) + '\\n').encode())\n"
    "print('locked', flush=True)\n"
    "sys.stdin.read()\n"
)


def _holder(out: Path, script: str = LIGHT_HOLDER) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(
        [sys.executable, "-c", script, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert p.stdout is not None
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_process_on_the_same_folder_is_refused_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    p = _holder(out)
    try:
        with pytest.raises(RunLockedError) as e:
            _train(out)
        msg = str(e.value)
        assert "\n" not in msg and str(out) in msg and f"pid {p.pid} on h" in msg and "another --out" in msg
        assert "sdengine train lora --out x" in msg and not (out / CHECKPOINT_NAME).exists()
    finally:
        p.communicate("", timeout=30)
    assert _train(out).step == 3  # its process ended: free again (its file taken over)


@pytest.mark.slow
def test_a_second_sdengine_process_is_refused_and_the_first_releases(tmp_path):
    out = tmp_path / "run"
    p = _holder(out, HOLDER)  # run_lock itself in another process
    try:
        with pytest.raises(RunLockedError, match=f"pid {p.pid} on "):
            _train(out)
    finally:
        p.communicate("", timeout=30)
    assert p.returncode == 0 and not (out / LOCK_NAME).exists()  # released, file removed
    assert _train(out).step == 3


def test_the_lock_of_a_killed_run_is_taken_over_with_a_note(tmp_path, capsys):
    out = tmp_path / "run"
    p = _holder(out)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert (out / LOCK_NAME).exists()  # left behind, but no longer locked
    assert _train(out).step == 3
    err = capsys.readouterr().err
    assert "taking over the lock" in err and f"pid {p.pid} on h" in err
    assert not (out / LOCK_NAME).exists()


@contextlib.contextmanager
def _held_by_a_thread(out: Path) -> Iterator[None]:
    inside, leave = threading.Event(), threading.Event()

    def hold() -> None:
        with run_lock(out):
            inside.set()
            leave.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert inside.wait(30)
        yield
    finally:
        leave.set()
        t.join(30)


def test_another_thread_of_this_process_is_refused(tmp_path):
    out = tmp_path / "run"
    with _held_by_a_thread(out), pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        _train(out)
    assert _train(out).step == 3


def test_the_same_thread_may_take_it_again(tmp_path):
    out = tmp_path / "run"
    with run_lock(out):
        assert (out / LOCK_NAME).exists()
        assert _train(out).step == 3  # a trainer holds it and calls the shared loop on the same folder
        assert (out / LOCK_NAME).exists()  # still held by the outer one
    assert not (out / LOCK_NAME).exists()


def test_a_refused_resume_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "a" / "run"
    with pytest.raises(CheckpointError):
        train(nn.Linear(3, 3), _loss, _cfg(), out, progress=False, resume=True)
    assert not (tmp_path / "a").exists()


def test_an_out_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(Exception, match="not a folder"):
        _train(f)
    assert f.read_text() == "keep"


TRAINERS = {
    "lora": lambda out: train_lora(None, None, out),  # type: ignore[arg-type]
    "embedding": lambda out: train_embedding(None, None, out),  # type: ignore[arg-type]
    "controlnet": lambda out: train_controlnet(None, None, out),  # type: ignore[arg-type]
    "ddpm": lambda out: train_ddpm(None, None, out),  # type: ignore[arg-type]
    "tiny-vae": lambda out: train_tiny_vae(None, None, out),  # type: ignore[arg-type]
    "emoji": lambda out: train_emoji(out),
    "loop": lambda out: train(nn.Linear(3, 3), _loss, _cfg(), out, progress=False),
}


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_every_trainer_takes_the_lock_first(tmp_path, kind):
    out = tmp_path / "run"
    with _held_by_a_thread(out), pytest.raises(RunLockedError, match="in use by another training run"):
        TRAINERS[kind](out)  # refused before it reads its (here missing) settings


@pytest.mark.parametrize(
    "argv",
    [
        ["lora", "--model", "m", "--data", "d"],
        ["embedding", "--model", "m", "--data", "d", "--name", "w", "--resume"],
        ["controlnet", "--model", "m", "--data", "d", "--overwrite"],
        ["ddpm", "--steps", "2"],
        ["tiny-vae", "--model", "m"],
        ["emoji", "--vae-steps", "1"],
    ],
)
def test_the_cli_prints_one_line(tmp_path, capsys, argv):
    out = tmp_path / "run"
    with _held_by_a_thread(out):
        assert main(["train", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{out} is in use by another training run (pid {os.getpid()}" in err


@pytest.mark.parametrize("kind", sorted(TRAINERS))
def test_an_empty_out_is_refused(tmp_path, monkeypatch, kind):
    """Path("") is the current folder: an unset variable (--out "$OUT") once trained into it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SdengineError, match="--out is empty"):
        TRAINERS[kind]("")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_unwinds_a_run_so_its_lock_is_released(tmp_path):
    """Python's default SIGTERM (``timeout``, a scheduler, ``kill``) ended the process at once, skipping every
    ``finally``: a run's lock file stayed behind. The CLI turns SIGTERM into ``Terminated``: the run unwinds."""
    import time

    from sdengine.cli import Terminated, stop_on_sigterm

    out = tmp_path / "run"
    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with pytest.raises(Terminated), run_lock(out):
            assert (out / LOCK_NAME).exists()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here, at once
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not (out / LOCK_NAME).exists() and not out.exists()  # released; the folder it made removed


@pytest.mark.slow
def test_sdengine_ends_with_143_on_sigterm_and_leaves_no_lock(tmp_path):
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "sdengine", "train", "ddpm", "--data", "fashion-mnist", "--steps", "100000"]
    p = subprocess.Popen([*cmd, "--out", str(out)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (out / LOCK_NAME).exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert (out / LOCK_NAME).exists(), "the run never took its lock"
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 143 and "terminated" in err, err
    assert not (out / LOCK_NAME).exists()
