"""``sdengine generate`` flags for what the Python API has: ``--zero-terminal-snr`` (A1111's "Noise Schedule: Zero
Terminal SNR") and perturbed-attention guidance (``--pag-scale``, ``--pag-layers``), written to the PNG and read
back by ``--from-png`` pixel for pixel."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from sdengine.cli import main  # noqa: E402


def _generate(*args: str) -> int:
    return main(["generate", *args, "--no-progress"])


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def _run(model: Path, out: Path, *flags: str) -> str:
    common = ["a red apple", "--model", str(model), "--steps", "3", "--sampler", "euler", "--seed", "4"]
    assert _generate(*common, *flags, "--out", str(out)) == 0
    return Image.open(out).info["parameters"]


def test_zero_terminal_snr_flag_writes_the_a1111_field_and_reads_back(tiny_sd1_folder, tmp_path):
    model = tiny_sd1_folder
    text = _run(model, tmp_path / "z.png", "--zero-terminal-snr", "--prediction-type", "v_prediction")
    assert "Noise Schedule: Zero Terminal SNR" in text and "Prediction type: v_prediction" in text
    pipe = sdengine.load_pipeline(model, device="cpu", prediction_type="v_prediction")
    direct = pipe("a red apple", steps=3, sampler="euler", seed=4, zero_terminal_snr=True, progress=False)
    np.testing.assert_array_equal(_pixels(tmp_path / "z.png"), np.asarray(direct.images[0]))
    assert (
        _generate("--from-png", str(tmp_path / "z.png"), "--model", str(model), "--out", str(tmp_path / "a.png")) == 0
    )
    np.testing.assert_array_equal(_pixels(tmp_path / "a.png"), _pixels(tmp_path / "z.png"))
    # the flag's "no" form overrides the PNG's field
    off = ["--from-png", str(tmp_path / "z.png"), "--model", str(model), "--no-zero-terminal-snr"]
    assert _generate(*off, "--out", str(tmp_path / "b.png")) == 0
    assert "Noise Schedule" not in Image.open(tmp_path / "b.png").info["parameters"]
    assert not np.array_equal(_pixels(tmp_path / "b.png"), _pixels(tmp_path / "z.png"))


def test_pag_flags_write_the_infotext_and_read_back(tiny_sd1_folder, tmp_path):
    model = tiny_sd1_folder
    text = _run(model, tmp_path / "p.png", "--pag-scale", "2.5", "--pag-layers", "mid,up_blocks.1")
    assert 'PAG scale: 2.5, PAG layers: "mid,up_blocks.1"' in text
    plain = _run(model, tmp_path / "q.png")
    assert "PAG" not in plain and not np.array_equal(_pixels(tmp_path / "p.png"), _pixels(tmp_path / "q.png"))
    assert (
        _generate("--from-png", str(tmp_path / "p.png"), "--model", str(model), "--out", str(tmp_path / "r.png")) == 0
    )
    np.testing.assert_array_equal(_pixels(tmp_path / "r.png"), _pixels(tmp_path / "p.png"))
    assert 'PAG layers: "mid,up_blocks.1"' in Image.open(tmp_path / "r.png").info["parameters"]


@pytest.mark.parametrize(
    "flags,why",
    [
        (["--pag-layers", "mid"], "--pag-layers has no effect without a --pag-scale above 0"),
        (["--pag-scale", "-1"], "pag_scale must be a number in [0, 100]"),
        (["--pag-scale", "2", "--pag-layers", "nosuch"], "PAG layer 'nosuch' matches no self-attention layer"),
    ],
)
def test_bad_pag_flags_are_one_line_errors(tiny_sd1_folder, tmp_path, capsys, flags, why):
    args = ["x", "--model", str(tiny_sd1_folder), "--steps", "2", *flags, "--out", str(tmp_path / "o.png")]
    assert _generate(*args) == 2
    err = capsys.readouterr().err.strip()
    assert why in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.png").exists()
