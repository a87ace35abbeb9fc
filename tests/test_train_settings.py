"""Trainers: the resolution defaults to the model's size, the settings are printed before the first step, and
``--help`` shows the defaults."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main


def _captioned_folder(root: Path, n: int = 2, size: int = 40) -> Path:
    """Images larger than the tiny model's 32 px, so the training size is visibly the model's, not the files'."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"picture {i}")
    return root


@pytest.mark.parametrize("kind", ["controlnet", "lora"])
def test_resolution_is_the_models_and_settings_are_printed(kind, tmp_path, tiny_sd1_folder, capsys) -> None:
    data = _captioned_folder(tmp_path / "data")
    rc = main(
        [
            "train",
            kind,
            "--model",
            str(tiny_sd1_folder),
            "--data",
            str(data),
            "--steps",
            "1",
            "--batch-size",
            "1",
            "--out",
            str(tmp_path / "run"),
            "--device",
            "cpu",
            "--checkpoint-every",
            "0",
        ]
    )
    assert rc == 0
    first = capsys.readouterr().out.splitlines()[0]
    # the tiny model's training size is 32 (train controlnet used 512 whatever the model)
    assert first.startswith(f"train {kind}: model {tiny_sd1_folder}, resolution 32, images 2, steps 1, batch 1, ")
    assert ("condition canny" if kind == "controlnet" else "rank 8") in first and "lr " in first


def test_trainer_help_shows_defaults(capsys) -> None:
    expected = {
        "controlnet": [
            "(the ControlNet paper's 0.5) (default: 0.5)",
            "--steps STEPS default: 5000",
            "--lr LR default: 1e-05",
        ],
        "lora": ["--steps STEPS default: 1000", "--lr LR default: 0.0001", "--rank RANK default: 8"],
    }
    for kind, wanted in expected.items():
        with pytest.raises(SystemExit):
            main(["train", kind, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for e in [
            *wanted,
            "--resolution RESOLUTION training size in pixels (default: the model's)",
            "--warmup WARMUP linear learning-rate warm-up steps (default: ",
            "--seed SEED default: 0",
        ]:
            assert e in text, (kind, e)
        assert "default: None" not in text
