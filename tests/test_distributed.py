"""Several processes under torchrun (gloo on CPU, 127.0.0.1): `train ddpm` on 2 ranks computes what 1 process
computes with the same global batch, a 2-rank checkpoint resumes on 1 rank, and `generate --prompts` on 2 ranks
writes every image once, byte for byte what one process writes.

Tolerance of the training comparison: the 2-rank run averages two half-batch gradients where one process takes
the mean of the whole batch, so the floats differ in their last bits. The per-step losses agree to 1e-5
(relative); AdamW divides each gradient by its own running magnitude, so a coordinate whose gradient is ~0 may
move by up to one learning rate either way: the weights agree to ``lr`` in the max norm and to 1e-7 on average
(two more steps of the same run are over 1000x further away, checked below as the control).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.cli import main
from sdengine.distributed import DistributedError, World, env_world

ROOT = Path(__file__).resolve().parents[1]
LR = 2e-4


def torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``torchrun --nproc_per_node 2 -m sdengine ARGS`` on this machine only (gloo over the loopback)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    env.update({"GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:0", "--max-restarts", "0"]
    cmd += ["-m", "sdengine", "--threads", "1", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ------------------------------------------------------------------------------------------------ training


def ddpm_args(data: Path, out: Path, steps: int) -> list[str]:
    return [
        "train",
        "ddpm",
        "--data",
        str(data),
        "--size",
        "16",
        "--channels",
        "1",
        "--steps",
        str(steps),
        "--batch-size",
        "4",
        "--lr",
        str(LR),
        "--warmup",
        "1",
        "--checkpoint-every",
        "0",
        "--no-samples",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    data = root / "images"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):  # 6 images, batch 4: the second step wraps into the next epoch's permutation
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(data / f"{i}.png")
    torchrun(ddpm_args(data, root / "two", steps=2))
    for steps in (2, 4):
        assert main(ddpm_args(data, root / f"one{steps}", steps=steps)) == 0
    return {"data": data, "root": root, "two": root / "two", "one2": root / "one2", "one4": root / "one4"}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "checkpoint.pt", weights_only=True)["model"]


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    return float(diffs.max()), float(diffs.mean())


def test_two_ranks_equal_one_process_with_the_same_global_batch(runs: dict[str, Path]) -> None:
    two = torch.load(runs["two"] / "checkpoint.pt", weights_only=True)
    one = torch.load(runs["one2"] / "checkpoint.pt", weights_only=True)
    assert two["world_size"] == 2 and one["world_size"] == 1 and two["step"] == one["step"] == 2
    assert len(two["rng_cpu_ranks"]) == 2
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    biggest, mean = distance(two["model"], one["model"])
    assert biggest <= LR and mean < 1e-7, (biggest, mean)
    # Only rank 0 wrote: one model folder, no temporary files anywhere.
    assert (runs["two"] / "model" / "config.json").is_file()
    assert not [p for p in runs["two"].rglob("*.tmp")]
    # The control: two more steps of the same run are far away, so the bound above can fail.
    _, mean_other = distance(weights(runs["one4"]), one["model"])
    assert mean_other > 1000 * max(mean, 1e-10), (mean_other, mean)


def test_resume_a_two_rank_checkpoint_on_one_process(runs: dict[str, Path]) -> None:
    resumed = runs["root"] / "two-then-one"
    shutil.copytree(runs["two"], resumed)
    assert main([*ddpm_args(runs["data"], resumed, steps=4), "--resume"]) == 0
    state = torch.load(resumed / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and state["world_size"] == 1 and len(state["losses"]) == 4
    straight = torch.load(runs["one4"] / "checkpoint.pt", weights_only=True)
    np.testing.assert_allclose(state["losses"], straight["losses"], rtol=1e-5)
    biggest, mean = distance(state["model"], straight["model"])
    assert biggest <= 2 * LR and mean < 1e-7, (biggest, mean)


@pytest.mark.slow
def test_exact_resume_on_the_same_number_of_ranks(runs: dict[str, Path]) -> None:
    """2 ranks, 2 steps, resumed on 2 ranks to 4 steps == 2 ranks, 4 steps straight, bit for bit."""
    resumed = runs["root"] / "two-then-two"
    shutil.copytree(runs["two"], resumed)
    torchrun([*ddpm_args(runs["data"], resumed, steps=4), "--resume"])
    straight = runs["root"] / "two4"
    torchrun(ddpm_args(runs["data"], straight, steps=4))
    a = torch.load(resumed / "checkpoint.pt", weights_only=True)
    b = torch.load(straight / "checkpoint.pt", weights_only=True)
    assert a["losses"] == b["losses"] and a["step"] == b["step"] == 4
    for key in ("model", "optimizer", "ema", "rng_cpu_ranks"):
        assert identical(a[key], b[key]), key


def identical(x: object, y: object) -> bool:
    """Nested dicts/lists of tensors and numbers, equal bit for bit."""
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(identical(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return isinstance(y, list | tuple) and len(x) == len(y) and all(map(identical, x, y))
    return x == y


def test_batch_must_split_over_the_ranks() -> None:
    assert World(1, 2).rows(4) == slice(2, 4) and World(0, 1).rows(3) == slice(0, 3)
    with pytest.raises(DistributedError, match="does not split over 2"):
        World(0, 2).rows(3)
    assert list(World(1, 3).shard(7)) == [1, 4]


def test_env_world(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert env_world() is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert env_world() == World(1, 2, 1)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(DistributedError, match="inconsistent"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(DistributedError, match="not integers"):
        env_world()


def test_an_incomplete_torchrun_environment_says_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    """LOCAL_RANK alone (left by another launcher) said "not integers: RANK=None"; now it names what is missing."""
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(DistributedError, match=r"incomplete: LOCAL_RANK=0 is set but not RANK and WORLD_SIZE"):
        env_world()
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(DistributedError, match=r"is set but not WORLD_SIZE \("):
        env_world()


def test_more_ranks_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """`torchrun --nproc_per_node 4` on a machine with 2 GPUs: ranks 2 and 3 crashed in torch.cuda.set_device
    ("invalid device ordinal"); now each says so in one line before touching the device."""
    import torch

    from sdengine import distributed

    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)

    def set_device(device: object) -> None:
        raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(DistributedError, match=r"needs cuda:3, but 2 CUDA device\(s\) are visible"):
        distributed.setup("cuda")


def test_python_dash_m_sdengine_runs_the_cli() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, "-m", "sdengine", "train", "ddpm", "--help"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--no-samples" in proc.stdout, proc.stderr


# ------------------------------------------------------------------------------------------ prompt lists

LIST = [
    '{"prompt": "a red heart"}',
    "",
    '{"prompt": "a cat face", "seed": 7}',
    '{"prompt": "a green apple", "negative_prompt": "blurry", "cfg_scale": 3}',
    '{"prompt": "a star", "batch_size": 2}',
]
EXPECTED = ["00000-0.png", "00002-7.png", "00003-3.png", "00004-0-4.png", "00004-1-5.png"]


def generate_args(prompts: Path, out: Path) -> list[str]:
    return ["generate", "--prompts", str(prompts), "--out", str(out), "--steps", "2", "--device", "cpu"] + [
        "--no-progress"
    ]


def test_prompt_list_on_two_ranks_writes_each_image_once_and_equals_one_process(tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "list.jsonl"
    prompts.write_text("\n".join(LIST) + "\n")
    assert main(["--threads", "1", *generate_args(prompts, tmp_path / "one")]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == EXPECTED
    proc = torchrun(generate_args(prompts, tmp_path / "two"))
    printed = [Path(line.strip()).name for line in proc.stdout.splitlines() if line.strip().endswith(".png")]
    assert sorted(printed) == EXPECTED  # every image written by exactly one rank
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == EXPECTED  # and no temporary files
    for name in EXPECTED:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes(), name

    # Resumable: a second run writes nothing; a missing image is the only one made again, the same bytes.
    capsys.readouterr()
    assert main(["--threads", "1", *generate_args(prompts, tmp_path / "two")]) == 0
    assert "0 image(s) written, 4 line(s) already done" in capsys.readouterr().err
    (tmp_path / "two" / "00002-7.png").unlink()
    assert main(["--threads", "1", *generate_args(prompts, tmp_path / "two")]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == [str(tmp_path / "two" / "00002-7.png")]
    assert (tmp_path / "two" / "00002-7.png").read_bytes() == (tmp_path / "one" / "00002-7.png").read_bytes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"prompt": "ok"}\n{"prompt": "x", "steps": 0}\n', r"list.jsonl:2: steps must be a positive integer"),
        ('{"prompt": "ok"}\n\n{"prompt": "x",\n', r"list.jsonl:3: not valid JSON"),
        ('["a", "b"]\n', r"list.jsonl:1: a line must be a JSON object"),
        ('{"prompt": "x", "stpes": 3}\n', r"list.jsonl:1: unknown generation settings: stpes"),
        ('{"prompt": "x", "seed": -1}\n', r"list.jsonl:1: a seed in a prompt list must be >= 0"),
        ('{"prompt": "x", "seed": "-1"}\n', r"list.jsonl:1: seed must be an integer"),  # a string is no seed
        ('{"prompt": "x", "progress": false}\n', r"list.jsonl:1: progress cannot be set per line"),
        ("\n\n", r"no requests"),
        # found only when the line rendered (after lines 1 and 2 were written), with no FILE:LINE
        ('{"prompt": "ok"}\n{"prompt": "ok"}\n{"prompt": "(red:500) heart"}\n', r"list.jsonl:3: prompt weight"),
        ('{"prompt": "ok"}\n{"prompt": "x", "init_image": "/no/such.png"}\n', r"list.jsonl:2: init image not found"),
    ],
)
def test_a_bad_line_is_one_error_naming_it_before_any_work(tmp_path: Path, capsys, text: str, message: str) -> None:
    prompts = tmp_path / "list.jsonl"
    prompts.write_text(text)
    assert main(["--threads", "1", *generate_args(prompts, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "out").exists()


def test_a_line_only_the_model_refuses_names_its_line(tmp_path: Path, capsys) -> None:
    """A width that is no multiple of the model's factor is known once the model is loaded: the error still
    names FILE:LINE (the lines before it are written, as they would be if they were rendered one by one)."""
    prompts = tmp_path / "list.jsonl"
    prompts.write_text('{"prompt": "a heart"}\n{"prompt": "a cat", "width": 60}\n')
    assert main(["--threads", "1", *generate_args(prompts, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.search(r"list.jsonl:2: .*60", err[0]), err


def test_text_list_seeds_and_flag_clashes(tmp_path: Path, capsys) -> None:
    from sdengine.batch_render import parse_prompt_list

    prompts = tmp_path / "list.txt"
    prompts.write_text("a heart\n\n# a comment\na cat\n")
    items = parse_prompt_list(prompts, {"steps": 3}, base_seed=10)
    assert [(it.line, it.settings["prompt"], it.seeds, it.names) for it in items] == [
        (1, "a heart", (10,), ("00000-10.png",)),
        (4, "a cat", (13,), ("00003-13.png",)),
    ]
    assert main([*generate_args(prompts, tmp_path / "out"), "--grid"]) == 2
    assert "drop --grid" in capsys.readouterr().err
    assert main(["generate", "a cat", "--prompts", str(prompts), "--out", str(tmp_path / "o")]) == 2
    assert "drop PROMPT" in capsys.readouterr().err


def test_threads_are_split_between_the_torchrun_processes_of_a_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from sdengine import threads

    monkeypatch.delenv(threads.THREADS_ENV, raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert threads.choose_threads()[:2] == (2, "auto (torchrun)")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert threads.choose_threads()[0] == 1  # never fewer than one
    assert threads.choose_threads(3)[:2] == (3, "--threads")  # an explicit count still wins
