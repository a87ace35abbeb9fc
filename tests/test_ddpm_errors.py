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
