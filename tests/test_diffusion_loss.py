"""DiffusionLoss, the one training loss of every trainer: with the same generator it gives exactly what the
trainers computed by hand before it existed (timesteps, then noise, q_sample, the target by prediction type,
MSE, min-SNR-gamma weights), draws only from the generator it is given, and refuses bad settings."""

from __future__ import annotations

import pytest
import torch

from sdengine.diffusion.loss import DiffusionLoss
from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.errors import SdengineError
from sdengine.train.controlnet import ControlNetTrainSpec
from sdengine.train.ddpm import DDPMSpec
from sdengine.train.emoji import EmojiTrainSpec

ACP = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod


def old_formula(out, x0, g, prediction: str, gamma: float | None):
    """The trainers' code before DiffusionLoss, written out from the papers' formulas: t ~ U{0..T-1}, then eps;
    x_t = sqrt(abar) x0 + sqrt(1 - abar) eps; target eps / v = sqrt(abar) eps - sqrt(1 - abar) x0 / x0;
    per-example MSE times min(SNR, gamma) / SNR (eps), / (SNR + 1) (v), or min(SNR, gamma) (x0)."""
    b = x0.shape[0]
    t = torch.randint(0, ACP.shape[0], (b,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    a = ACP[t].view(b, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = {"epsilon": eps, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0, "sample": x0}[prediction]
    per = ((out.double() - target.double()) ** 2).mean(dim=(1, 2, 3))
    if gamma is None:
        return t, eps, x_t, per.mean()
    snr = (ACP[t] / (1 - ACP[t])).double()
    w = torch.clamp(snr, max=gamma)
    w = {"epsilon": w / snr, "v_prediction": w / (snr + 1), "sample": w}[prediction]
    return t, eps, x_t, (per * w).mean()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("gamma", [None, 5.0, 0.5])
def test_equals_the_old_hand_computation(prediction, gamma):
    x0 = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    loss = DiffusionLoss(ACP, prediction, gamma)
    t, noise, x_t = loss.draw(x0, torch.Generator().manual_seed(7))
    t_ref, eps_ref, x_t_ref, ref = old_formula(out, x0, torch.Generator().manual_seed(7), prediction, gamma)
    assert torch.equal(t, t_ref) and torch.equal(noise, eps_ref)  # same draws, same order, same generator
    torch.testing.assert_close(x_t, x_t_ref, rtol=0, atol=1e-6)
    got = loss(out, x0, noise, t)
    assert got.dtype == torch.float32 and got.ndim == 0
    assert abs(got.item() - ref.item()) <= 1e-6 * max(1.0, abs(ref.item())), (got.item(), ref.item())


def test_min_snr_changes_the_loss_and_prediction_types_differ():
    """The cases above are not all the same number: the weighting and the target matter."""
    x0 = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    out = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    values = set()
    for prediction in ("epsilon", "v_prediction", "sample"):
        for gamma in (None, 1.0):
            loss = DiffusionLoss(ACP, prediction, gamma)
            t, noise, _ = loss.draw(x0, torch.Generator().manual_seed(3))
            values.add(round(loss(out, x0, noise, t).item(), 6))
    assert len(values) == 6


def test_draws_come_only_from_the_given_generator():
    loss = DiffusionLoss(ACP, cond_dropout=0.5)
    x0 = torch.zeros(8, 4, 4, 4)
    torch.manual_seed(0)
    a = loss.draw(x0, torch.Generator().manual_seed(5)), loss.dropped(8, torch.Generator().manual_seed(6))
    torch.manual_seed(123)  # the global generator does not matter
    b = loss.draw(x0, torch.Generator().manual_seed(5)), loss.dropped(8, torch.Generator().manual_seed(6))
    assert all(torch.equal(u, v) for u, v in zip(a[0], b[0], strict=True)) and torch.equal(a[1], b[1])
    assert 0 < int(a[1].sum()) < 8


def test_cond_dropout_rate_and_drop():
    g = torch.Generator().manual_seed(0)
    assert not DiffusionLoss(ACP, cond_dropout=0.0).dropped(1000, g).any()
    assert DiffusionLoss(ACP, cond_dropout=1.0).dropped(1000, g).all()
    rate = DiffusionLoss(ACP, cond_dropout=0.1).dropped(20000, g).float().mean().item()
    assert abs(rate - 0.1) < 0.01
    cond = torch.arange(24.0).view(3, 2, 4)
    null = torch.full((1, 2, 4), -1.0)
    got = DiffusionLoss.drop(cond, null, torch.tensor([False, True, False]))
    assert torch.equal(got[0], cond[0]) and torch.equal(got[2], cond[2]) and (got[1] == -1).all()
    labels = torch.tensor([3, 1, 2])
    assert DiffusionLoss.drop(labels, torch.tensor(10), torch.tensor([True, False, True])).tolist() == [10, 1, 10]


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(prediction="x0"), "unknown prediction type 'x0'"),
        (dict(min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
        (dict(cond_dropout=1.5), r"cond_dropout must be in \[0, 1\]"),
        (dict(cond_dropout=-0.1), r"cond_dropout must be in \[0, 1\]"),
        (dict(timestep_sampling="logit"), "unknown timestep sampling 'logit'; valid: uniform, cubic"),
    ],
)
def test_bad_settings_are_one_line_errors(kw, match):
    with pytest.raises(SdengineError, match=match):
        DiffusionLoss(ACP, **kw)
    with pytest.raises(SdengineError, match=r"alphas_cumprod must be a \(T,\) tensor"):
        DiffusionLoss(ACP.view(1, -1))


def test_one_name_for_condition_dropout_with_the_old_names_kept():
    """Every trainer's spec calls it cond_dropout, with today's defaults; the old keywords still work."""
    assert DDPMSpec().cond_dropout == 0.1 and EmojiTrainSpec().cond_dropout == 0.1
    assert ControlNetTrainSpec(model="m", data="d").cond_dropout == 0.5
    assert DDPMSpec(label_dropout=0.3).cond_dropout == 0.3
    assert EmojiTrainSpec(caption_dropout=0.2).cond_dropout == 0.2
    spec = ControlNetTrainSpec(model="m", data="d", empty_prompt_p=0.0)
    assert spec.cond_dropout == 0.0 and spec.empty_prompt_p == 0.0
    with pytest.raises(SdengineError, match="give cond_dropout or its old name label_dropout, not both"):
        DDPMSpec(label_dropout=0.3, cond_dropout=0.2)
    with pytest.raises(SdengineError, match=r"cond_dropout must be in \[0, 1\]"):
        ControlNetTrainSpec(model="m", data="d", empty_prompt_p=2.0)


def test_cubic_timesteps_favour_the_noisy_end_and_uniform_is_unchanged():
    """cubic: t = floor((1 - u^3) T), so P(t >= k) = (1 - k/T)^(1/3): P(t >= T/2) = 0.794, P(t < T/4) =
    0.091; every value a valid index. uniform draws exactly torch.randint's values (the trainers' old stream)."""
    big_t = ACP.shape[0]
    t = DiffusionLoss(ACP, timestep_sampling="cubic").timesteps(40000, torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and int(t.min()) >= 0 and int(t.max()) == big_t - 1
    assert abs((t >= big_t // 2).float().mean().item() - 0.5 ** (1 / 3)) < 0.01
    assert abs((t < big_t // 4).float().mean().item() - (1 - 0.75 ** (1 / 3))) < 0.01
    u = DiffusionLoss(ACP).timesteps(64, torch.Generator().manual_seed(3))
    assert torch.equal(u, torch.randint(0, big_t, (64,), generator=torch.Generator().manual_seed(3)))
