"""The shared training loop: exact resume, atomic checkpoints, NaN handling, warm-up, EMA."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sdengine.errors import UsageError
from sdengine.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from sdengine.train.loop import EMA, TrainConfig, TrainingDiverged, data_indices, lr_at, train


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.SiLU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


DATA = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))


def loss_fn(m: nn.Module, step: int, g: torch.Generator) -> torch.Tensor:
    idx = data_indices(step, 8, DATA.shape[0], seed=0)
    x = DATA[idx]
    noise = torch.randn(x.shape, generator=g)
    return ((m(x + 0.1 * noise) - x) ** 2).mean()


def cfg(**kw: object) -> TrainConfig:
    base = dict(
        steps=20,
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        ema_decay=0.9,
        sample_every=0,
        checkpoint_every=0,
        log_every=5,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def fresh() -> Tiny:
    torch.manual_seed(0)
    return Tiny()


def test_loss_falls(tmp_path):
    r = train(fresh(), loss_fn, cfg(steps=200), tmp_path, progress=False)
    assert sum(r.losses[-20:]) / 20 < 0.5 * sum(r.losses[:20]) / 20


def test_resume_is_bit_exact(tmp_path):
    a = train(fresh(), loss_fn, cfg(steps=20), tmp_path / "a", progress=False)
    train(fresh(), loss_fn, cfg(steps=10), tmp_path / "b", progress=False)
    b = train(fresh(), loss_fn, cfg(steps=20), tmp_path / "b", progress=False, resume=True)
    assert a.losses == b.losses  # exact float equality, step by step
    sa, sb = load_checkpoint(a.checkpoint), load_checkpoint(b.checkpoint)
    for k, v in sa["model"].items():
        assert torch.equal(v, sb["model"][k]), k
    for k, v in sa["ema"]["model"].items():
        assert torch.equal(v, sb["ema"]["model"][k]), k
    assert sa["step"] == sb["step"] == 20


def test_resume_missing_checkpoint_is_clear_and_creates_nothing(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="no checkpoint to resume from"):
        train(fresh(), loss_fn, cfg(), out, progress=False, resume=True)
    assert not out.exists()


def test_resume_corrupt_checkpoint_leaves_it_untouched(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    bad = out / "checkpoint.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    before = bad.read_bytes()
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(fresh(), loss_fn, cfg(), out, progress=False, resume=True)
    assert bad.read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_checkpoint_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "x": torch.ones(2)})

    def boom(obj, f, *a, **k):
        f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "x": torch.zeros(2)})
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary left behind


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def nan_after_12(m: nn.Module, step: int, g: torch.Generator) -> torch.Tensor:
        loss = loss_fn(m, step, g)
        return loss * float("nan") if step >= 12 else loss

    with pytest.raises(TrainingDiverged, match="loss became nan at step 12"):
        train(fresh(), nan_after_12, cfg(checkpoint_every=5), tmp_path, progress=False)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 10
    assert all(math.isfinite(v) for v in state["losses"])
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_seed_mismatch_on_resume(tmp_path):
    train(fresh(), loss_fn, cfg(steps=5), tmp_path, progress=False)
    with pytest.raises(CheckpointError, match="seed"):
        train(fresh(), loss_fn, cfg(steps=10, seed=8), tmp_path, progress=False, resume=True)


def test_warmup_and_ema():
    c = cfg(lr=1.0, warmup_steps=4)
    assert [lr_at(s, c) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    m = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, decay=0.5)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m)  # warm-up decay min(0.5, 2/11) = 2/11
    assert ema.model.weight.item() == pytest.approx(1 - 2 / 11)


def test_data_indices_cover_each_epoch_once():
    n, b = 10, 4
    idx = torch.cat([data_indices(s, b, n, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:].tolist()) == list(range(10))
    assert torch.equal(data_indices(3, b, n, seed=1), data_indices(3, b, n, seed=1))
    assert not torch.equal(idx[:10], idx[10:])  # a new permutation each epoch


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"warmup_steps": -1}, "warm-up steps must be >= 0"),
        ({"grad_clip": -0.5}, "gradient clipping must be a finite number >= 0"),
        ({"grad_clip": float("nan")}, "gradient clipping must be a finite number >= 0"),
        ({"weight_decay": -0.1}, "weight decay must be a finite number >= 0"),
        ({"checkpoint_every": -1}, "checkpoint interval must be >= 0"),
        ({"sample_every": -1}, "sample interval must be >= 0"),
        ({"mixed_precision": "fp16"}, "mixed precision must be auto, no or bf16"),
    ],
)
def test_settings_out_of_range_are_refused(bad, message):
    """Once taken silently (a negative clip or interval ran as 0, 'fp16' as fp32)."""
    with pytest.raises(UsageError, match=message):
        cfg(**bad)
    assert cfg(**{k: 0 if k != "mixed_precision" else "no" for k in bad}).steps == 20  # the bound itself is fine


def test_resume_past_the_asked_steps_says_so(tmp_path, capsys):
    train(fresh(), loss_fn, cfg(steps=6), tmp_path, progress=False)
    r = train(fresh(), loss_fn, cfg(steps=3), tmp_path, resume=True, progress=True)
    assert r.step == 6  # the run's weights stay those of step 6: not a 3-step run
    assert "is at step 6, at or past --steps 3: nothing to train" in capsys.readouterr().out
