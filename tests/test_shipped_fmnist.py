"""The shipped class-conditional Fashion-MNIST DDPM: loads by its built-in name and draws the asked-for
classes (judged by the shipped classifier)."""

from __future__ import annotations

import pytest
import torch

from sdengine.cli import main
from sdengine.ddpm import PixelDDPM
from sdengine.metrics.classifier import predict


def test_builtin_model_draws_the_requested_classes():
    m = PixelDDPM.load("fashion-mnist")
    assert m.num_classes == 10 and m.null_class == 10 and m.crop == 2
    labels = [c for c in range(10) for _ in range(3)]
    imgs = m.generate(labels, sampler="dpmpp_2m", steps=10, seed=0, guidance_scale=2.0)
    assert imgs.shape == (30, 1, 28, 28)
    acc = (predict(imgs * 2 - 1) == torch.tensor(labels)).float().mean().item()
    assert acc >= 0.8, acc  # 97.7% at 20 steps on 1000 samples (README); 10 steps, 30 samples here


def test_builtin_weights_are_small_fp16():
    from sdengine.ddpm import BUILTIN_DDPM

    f = BUILTIN_DDPM["fashion-mnist"] / "unet.safetensors"
    assert f.stat().st_size < 10_000_000
    from safetensors import safe_open

    with safe_open(str(f), "pt") as sf:
        assert {sf.get_slice(k).get_dtype() for k in sf.keys()} == {"F16"}


def test_sample_cli_writes_grid(tmp_path, capsys):
    out = tmp_path / "g.png"
    rc = main(
        [
            "sample",
            "fashion-mnist",
            "--sampler",
            "ddim",
            "--steps",
            "3",
            "--n",
            "4",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0 and out.is_file()
    assert "4 samples" in capsys.readouterr().out


def test_generate_cli_with_the_builtin_ddpm_and_from_png(tmp_path, capsys):
    """`sdengine generate` takes a class name as the prompt of the pixel model, and the PNG it writes
    carries A1111 parameters from which --from-png makes the same bytes again."""
    a, b = tmp_path / "a", tmp_path / "b"
    argv = ["generate", "Sneaker", "--model", "fashion-mnist", "--steps", "6", "--cfg", "2", "--seed", "3"]
    assert main([*argv, "--out", str(a), "--no-progress"]) == 0
    (first,) = sorted(a.glob("*.png"))
    assert main(["generate", "--from-png", str(first), "--out", str(b), "--no-progress"]) == 0
    (again,) = sorted(b.glob("*.png"))
    assert first.read_bytes() == again.read_bytes()
    assert main(["generate", "Spaceship", "--model", "fashion-mnist", "--out", str(a), "--no-progress"]) == 2
    assert "unknown class" in capsys.readouterr().err


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_eval_cli_prints_fd_and_accuracy(capsys):
    rc = main(
        [
            "eval",
            "ddpm",
            "fashion-mnist",
            "--n",
            "20",
            "--sampler",
            "dpmpp_2m",
            "--schedule",
            "karras",
            "--steps",
            "8",
            "--cfg",
            "2",
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "FD-FMNIST" in out and "class accuracy" in out
    acc = float(out.split("class accuracy")[1].split("%")[0])
    assert acc >= 70.0, out  # 20 samples at 8 steps with guidance 2: the shipped model is far above chance
