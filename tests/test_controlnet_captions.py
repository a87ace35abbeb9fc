"""ControlNet training's caption choice: condition dropout, and caption mismatching (a fraction of the kept
captions swapped for another training image's, the target staying the image), drawn from the step generator
in a fixed order so that a run without mismatching draws what it always did."""

from __future__ import annotations

import pytest
import torch

from sdengine.errors import SdengineError
from sdengine.train.controlnet import ControlNetTrainSpec, caption_rows


def _draw(mismatch: float, dropped: torch.Tensor, n: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(dropped.shape[0]) % n
    rows = caption_rows(idx, dropped, n, mismatch, g)
    return idx, rows, g.initial_seed(), torch.rand(1, generator=g).item()


def test_no_mismatch_keeps_every_caption_and_draws_the_same_stream():
    dropped = torch.zeros(200, dtype=torch.bool)
    idx, rows, _, after0 = _draw(0.0, dropped)
    assert torch.equal(rows, idx)
    _, rows1, _, after1 = _draw(1.0, dropped)
    assert after0 == after1  # the generator advanced by the same draws whatever the setting
    assert not torch.equal(rows1, idx)


def test_full_mismatch_never_picks_the_image_itself_and_spares_dropped_rows():
    dropped = torch.arange(400) % 4 == 0
    idx, rows, _, _ = _draw(1.0, dropped, n=5)
    assert torch.equal(rows[dropped], idx[dropped])  # a dropped caption is the empty prompt anyway
    kept = ~dropped
    assert (rows[kept] != idx[kept]).all()
    assert int(rows.min()) >= 0 and int(rows.max()) <= 4
    assert set(rows[kept].tolist()) == {0, 1, 2, 3, 4}  # every other image can be drawn


def test_mismatch_rate():
    dropped = torch.zeros(20000, dtype=torch.bool)
    idx, rows, _, _ = _draw(0.3, dropped, n=50, seed=1)
    assert abs((rows != idx).float().mean().item() - 0.3) < 0.015


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(caption_mismatch=1.5), r"caption_mismatch must be in \[0, 1\]"),
        (dict(caption_mismatch=-0.1), r"caption_mismatch must be in \[0, 1\]"),
        (dict(timestep_sampling="late"), "unknown timestep sampling 'late'; valid: uniform, cubic"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(SdengineError, match=match):
        ControlNetTrainSpec(model="m", data="d", **kw)


def test_cli_refuses_a_bad_mismatch_share_in_one_line(tmp_path, capsys):
    from sdengine.cli import main

    args = ["train", "controlnet", "--model", "emoji", "--data", str(tmp_path), "--caption-mismatch", "2"]
    assert main([*args, "--out", str(tmp_path / "run")]) != 0
    err = capsys.readouterr().err.strip()
    assert "caption_mismatch must be in [0, 1], got 2.0" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()
