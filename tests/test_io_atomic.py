"""Atomic writes: concurrent writers of one target never collide, an error mid-write leaves neither a partial
file nor a temporary file, the mode follows the umask, and killed writers' leftovers are tidied up."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading

import pytest

from sdengine.errors import SdengineError
from sdengine.io.atomic import (
    atomic_dir,
    atomic_write,
    file_mode,
    remove_stale_temp_files,
    write_bytes_atomic,
    write_text_atomic,
)


def _listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_concurrent_writers_of_one_target_never_collide(tmp_path):
    """Eight threads write the same file 15 times each, in several slow chunks, while a reader checks that
    the file is always one writer's whole content. With a fixed temporary name the writers would share one
    file (interleaved or truncated content, or a rename of a file another writer already renamed)."""
    target = tmp_path / "out.bin"
    size = 64 * 1024
    errors: list[BaseException] = []
    seen: set[int] = set()
    stop = threading.Event()

    def writer(k: int) -> None:
        try:
            for _ in range(15):
                with atomic_write(target) as f:
                    for _ in range(4):
                        f.write(bytes([k]) * (size // 4))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def reader() -> None:
        while not stop.is_set():
            try:
                data = target.read_bytes()
            except FileNotFoundError:
                continue
            if len(data) != size or data.count(data[:1]) != size:
                errors.append(AssertionError(f"saw a partial or mixed file ({len(data)} bytes)"))
                return
            seen.add(data[0])

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(1, 9)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    watch.join(timeout=30)
    assert not errors, errors[:3]
    data = target.read_bytes()
    assert len(data) == size and data.count(data[:1]) == size and data[0] in range(1, 9)
    assert seen  # the reader did see complete files
    assert _listing(tmp_path) == ["out.bin"]  # no temporary file left behind


@pytest.mark.parametrize("exc", [RuntimeError("disk on fire"), KeyboardInterrupt()])
def test_error_mid_write_leaves_no_partial_file_and_no_temp_file(tmp_path, exc):
    new = tmp_path / "new.bin"
    with pytest.raises(type(exc)):
        with atomic_write(new) as f:
            f.write(b"half of it")
            raise exc
    assert _listing(tmp_path) == []
    old = write_bytes_atomic(tmp_path / "old.txt", b"previous")
    with pytest.raises(type(exc)):
        with atomic_write(old, "w", encoding="utf-8") as f:
            f.write("replacement, cut short")
            raise exc
    assert old.read_bytes() == b"previous" and _listing(tmp_path) == ["old.txt"]


def test_error_in_the_serializer_leaves_the_previous_file(tmp_path):
    """What checkpoints do: torch.save into the stream; an object it cannot pickle stops it midway."""
    import torch

    path = tmp_path / "checkpoint.pt"
    with atomic_write(path) as f:
        torch.save({"step": 1}, f)
    with pytest.raises(Exception):  # noqa: B017 - pickling errors differ between Python versions
        with atomic_write(path) as f:
            torch.save({"step": 2, "bad": lambda: None}, f)
    assert torch.load(path, weights_only=True) == {"step": 1} and _listing(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        a = write_text_atomic(tmp_path / "a.txt", "x")
        b = write_bytes_atomic(tmp_path / "b.bin", b"x")  # replacing: the mode is the umask's, not the old file's
        b = write_bytes_atomic(b, b"y")
        with atomic_dir(tmp_path / "folder") as d:
            (d / "f").write_text("x")
        plain = tmp_path / "plain.txt"
        plain.write_text("x")
    finally:
        os.umask(old)
    want = stat.S_IMODE(plain.stat().st_mode)
    assert want == 0o666 & ~umask
    assert stat.S_IMODE(a.stat().st_mode) == want and stat.S_IMODE(b.stat().st_mode) == want
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o777 & ~umask


def test_text_mode_and_bad_mode():
    with pytest.raises(SdengineError, match="mode must be 'wb' or 'w'"):
        with atomic_write("unused", "a"):
            pass


def test_atomic_dir_replaces_a_folder_whole_or_not_at_all(tmp_path):
    dst = tmp_path / "model"
    with atomic_dir(dst) as d:
        (d / "a.txt").write_text("one")
    assert _listing(dst) == ["a.txt"]
    with pytest.raises(RuntimeError):
        with atomic_dir(dst) as d:
            (d / "b.txt").write_text("two")
            raise RuntimeError("stop")
    assert _listing(dst) == ["a.txt"] and _listing(tmp_path) == ["model"]
    with atomic_dir(dst) as d:
        (d / "b.txt").write_text("two")
    assert _listing(dst) == ["b.txt"] and _listing(tmp_path) == ["model"]


def test_stale_temp_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    (tmp_path / "sub").mkdir()
    stale = [
        tmp_path / f".checkpoint.pt.{dead_pid}.abc12_xy.tmp",
        tmp_path / f".checkpoint.pt.{dead_pid}.tmp",  # the scheme of earlier releases
        tmp_path / "sub" / f".loss.png.{dead_pid}.q9w8e7r6.tmp",
    ]
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.zzzzzzzz.tmp"
    others = [tmp_path / "notes.tmp", tmp_path / ".hidden.tmp", tmp_path / "checkpoint.pt"]
    for p in [*stale, live, *others]:
        p.write_bytes(b"x")
    stale_dir = tmp_path / f".model.{dead_pid}.k3j4h5g6.tmp"
    (stale_dir / "unet").mkdir(parents=True)
    removed = remove_stale_temp_files(tmp_path, recursive=True)
    assert sorted(removed) == sorted([*stale, stale_dir])
    assert all(p.exists() for p in [live, *others]) and not any(p.exists() for p in [*stale, stale_dir])
    assert remove_stale_temp_files(tmp_path / "missing") == []


def test_a_training_run_tidies_its_folder_on_start(tmp_path):
    """The training loop removes a killed run's leftovers when it starts (or resumes)."""
    import torch

    from sdengine.train.loop import TrainConfig, train

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    left = tmp_path / f".checkpoint.pt.{int(dead.stdout)}.abcdefgh.tmp"
    tmp_path.mkdir(exist_ok=True)
    left.write_bytes(b"half a checkpoint")
    model = torch.nn.Linear(2, 1)
    cfg = TrainConfig(steps=1, batch_size=1, warmup_steps=0, sample_every=0, checkpoint_every=0, seed=0)
    train(model, lambda m, step, g: m(torch.ones(1, 2)).pow(2).mean(), cfg, tmp_path, progress=False)
    assert not left.exists() and (tmp_path / "checkpoint.pt").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
