"""Starting a training run in a folder that already holds one: refused unless --resume or --overwrite."""

from __future__ import annotations

import pytest
import torch

from sdengine.errors import SdengineError
from sdengine.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    RunExistsError,
    ensure_new_run,
    save_checkpoint,
)


def _run(tmp_path, *, step=10, outputs=("lora.safetensors",), meta=None):
    out = tmp_path / "run"
    save_checkpoint(out / CHECKPOINT_NAME, {"step": step, "w": torch.ones(2), **({"meta": meta} if meta else {})})
    for name in outputs:
        (out / name).write_bytes(b"exported")
    return out


@pytest.mark.parametrize("outputs,marker", [((), CHECKPOINT_NAME), (("lora.safetensors",), "lora.safetensors")])
def test_a_second_run_without_resume_is_refused_and_changes_nothing(tmp_path, outputs, marker):
    out = _run(tmp_path, outputs=outputs)
    if marker != CHECKPOINT_NAME:
        (out / CHECKPOINT_NAME).unlink()  # an exported result alone is a run too
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(RunExistsError, match=r"--resume.*--overwrite") as e:
        ensure_new_run(out, resume=False, overwrite=False, outputs=["lora.safetensors"])
    assert "\n" not in str(e.value) and marker in str(e.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_the_refusal_names_the_step_reached(tmp_path):
    out = _run(tmp_path, step=10)
    with pytest.raises(RunExistsError, match="step 10"):
        ensure_new_run(out, resume=False, overwrite=False)


def test_overwrite_removes_the_old_run_only(tmp_path):
    out = _run(tmp_path)
    (out / "notes.txt").write_text("mine")
    (out / f".{CHECKPOINT_NAME}.123.tmp").write_bytes(b"half")
    removed = ensure_new_run(out, resume=False, overwrite=True, outputs=["lora.safetensors", "controlnet"])
    assert sorted(p.name for p in removed) == sorted(
        [CHECKPOINT_NAME, "lora.safetensors", f".{CHECKPOINT_NAME}.123.tmp"]
    )
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_removes_an_exported_folder(tmp_path):
    out = _run(tmp_path, outputs=())
    (out / "controlnet").mkdir()
    (out / "controlnet" / "config.json").write_text("{}")
    ensure_new_run(out, resume=False, overwrite=True, outputs=["controlnet"])
    assert not (out / "controlnet").exists() and not (out / CHECKPOINT_NAME).exists()


@pytest.mark.parametrize("state", ["missing", "empty", "other-files"])
def test_a_fresh_folder_is_fine(tmp_path, state):
    out = tmp_path / "run"
    if state != "missing":
        out.mkdir()
    if state == "other-files":
        (out / "readme.txt").write_text("x")
    assert ensure_new_run(out, resume=False, overwrite=False, outputs=["lora.safetensors"]) == []


def test_resume_checks_the_checkpoint(tmp_path):
    out = _run(tmp_path)
    assert ensure_new_run(out, resume=True, overwrite=False) == []
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        ensure_new_run(tmp_path / "nothing", resume=True, overwrite=False)


def test_resume_and_overwrite_exclude_each_other(tmp_path):
    with pytest.raises(SdengineError, match="--resume.*--overwrite"):
        ensure_new_run(_run(tmp_path), resume=True, overwrite=True)


def test_out_path_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(SdengineError, match="not a folder"):
        ensure_new_run(f, resume=False, overwrite=False)


def test_output_names_cannot_escape(tmp_path):
    out = _run(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    with pytest.raises(SdengineError):
        ensure_new_run(out, resume=False, overwrite=True, outputs=["../victim.txt"])
    assert victim.read_text() == "keep"


def test_resume_checks_the_settings_the_run_must_share(tmp_path):
    out = _run(tmp_path, meta={"name": "zqx", "vectors": 2})
    assert ensure_new_run(out, resume=True, overwrite=False, same={"name": ("--name", "zqx")}) == []
    with pytest.raises(CheckpointError, match="trained with --name zqx, not other: resume with --name zqx") as e:
        ensure_new_run(out, resume=True, overwrite=False, same={"name": ("--name", "other")})
    assert "\n" not in str(e.value)
    # a checkpoint of an older release, without the setting, is not checked
    old = _run(tmp_path / "old")
    assert ensure_new_run(old, resume=True, overwrite=False, same={"name": ("--name", "other")}) == []


def test_resume_refuses_another_start_given_or_left_out(tmp_path):
    """A setting that is the run's start (ControlNet's --init): resuming with another one, without it when the run
    had one, or with one when it had none is refused in one line saying what the run started from."""
    started = _run(tmp_path / "a", meta={"init": "/nets/a"})
    assert ensure_new_run(started, resume=True, overwrite=False, same={"init": ("--init", "/nets/a")}) == []
    cases = [
        (started, "/nets/b", "trained with --init /nets/a, not /nets/b: resume with --init /nets/a"),
        (started, None, "trained with --init /nets/a, not without it: resume with --init /nets/a"),
        (_run(tmp_path / "b", meta={"init": None}), "/nets/b", "trained without --init, not /nets/b: resume without"),
    ]
    for out, given, message in cases:
        with pytest.raises(CheckpointError, match=message) as e:
            ensure_new_run(out, resume=True, overwrite=False, same={"init": ("--init", given)})
        assert "\n" not in str(e.value) and "None" not in str(e.value)


@pytest.mark.parametrize("where", [".", "runs/a"])
def test_an_out_inside_the_data_folder_is_refused(tmp_path, where):
    data = tmp_path / "imgs"
    data.mkdir()
    out = data / where
    with pytest.raises(SdengineError, match="is inside --data .*would be read as training images") as e:
        ensure_new_run(out, resume=False, overwrite=False, data=data)
    assert "\n" not in str(e.value)
    assert ensure_new_run(tmp_path / "run", resume=False, overwrite=False, data=data) == []  # beside it: fine
    assert ensure_new_run(tmp_path / "x", resume=False, overwrite=False, data="fashion-mnist") == []  # not a folder


@pytest.mark.parametrize(
    "argv",
    [
        ["lora", "--model", "m"],
        ["embedding", "--model", "m", "--name", "w"],
        ["controlnet", "--model", "m"],
        ["ddpm"],
        ["tiny-vae", "--model", "m"],
    ],
)
def test_every_trainer_refuses_an_out_inside_its_data(tmp_path, capsys, argv):
    """The second run (--resume, --overwrite) once trained on the first run's loss.png and sample images too."""
    from sdengine.cli import main

    data = tmp_path / "imgs"
    data.mkdir()
    assert main(["train", *argv, "--data", str(data), "--out", str(data / "run"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "is inside --data" in err, err
    assert list(data.iterdir()) == []  # nothing written there
