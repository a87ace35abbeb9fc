"""User mistakes with a pixel DDPM or a schedule are a ``UsageError``: the CLI prints them as one line."""

from __future__ import annotations

import json

import pytest

from sdengine.cli import main
from sdengine.diffusion.schedules import make_betas
from sdengine.errors import UsageError


def test_a_folder_that_is_not_a_pixel_ddpm_is_one_line(tmp_path, capsys):
    folder = tmp_path / "not-ddpm"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"format": "something-else"}))
    rc = main(["sample", str(folder), "--n", "1", "--out", str(tmp_path / "grid.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("sdengine: error:") and err.count("\n") == 1
    assert "is not a pixel DDPM model folder" in err and str(folder) in err
    assert not (tmp_path / "grid.png").exists()


def test_schedule_mistakes_are_usage_errors():
    with pytest.raises(UsageError, match="unknown beta schedule 'cubic'"):
        make_betas("cubic", 10)
    with pytest.raises(UsageError, match="num_train_timesteps must be >= 1"):
        make_betas("linear", 0)


@pytest.mark.parametrize(
    "n,extra,out,message",
    [
        ("100000", [], "grid.png", "--n 100000 makes a 18330x18388 grid of 28x28 samples"),
        (
            "30000",
            ["--cols", "1"],
            "grid.png",
            "at most 26569 samples (163x163) in one grid; for the next ones run again with --seed 26569",
        ),
        (
            "600",
            ["--cols", "300"],
            "grid.webp",
            "a 17402x118 grid of 28x28 samples, past what image readers open (89 megapixels, sides up to 16383)",
        ),
    ],
)
def test_a_sample_grid_too_large_to_open_is_refused_before_sampling(
    tmp_path, capsys, monkeypatch, n, extra, out, message
):
    """`sample --n 100000` sampled for hours, then wrote a 436-megapixel grid Pillow (and pnginfo) refuse to open
    (or failed writing a WebP past 16383 px): now one line at once, nothing sampled or written."""
    from sdengine.ddpm import PixelDDPM

    def refuse(*args, **kwargs):
        raise AssertionError("sampled before the grid's size was checked")

    monkeypatch.setattr(PixelDDPM, "generate", refuse)
    rc = main(["sample", "fashion-mnist", "--n", n, *extra, "--out", str(tmp_path / out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "part,words",
    [
        (
            "ControlNetModel",
            "is a diffusers ControlNetModel folder, not a model (a ControlNet: give it with --controlnet",
        ),
        ("AutoencoderKL", "is a diffusers AutoencoderKL folder, not a model: give the model's folder"),
    ],
)
def test_a_model_part_given_as_the_model_is_named(tmp_path, capsys, part, words):
    """`generate --model emoji-controlnet-canny` (a folder `sdengine list controlnets` prints) said the folder
    "is not a pixel DDPM model folder", a kind of model the user never asked for."""
    folder = tmp_path / "part"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": part}))
    rc = main(["generate", "x", "--model", str(folder), "--steps", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"{folder} {words}" in err, err
