"""Prediction targets, the loss, and the x0-denoiser wrapper."""

import pytest
import torch
from diffusers import DDPMScheduler

from sdengine.diffusion.denoisers import Denoiser, diffusion_loss, min_snr_weights, prediction_target
from sdengine.diffusion.schedules import NoiseSchedule, q_sample


def _sched():
    return NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_v_target_matches_diffusers_get_velocity():
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([5, 400, 990])
    ac = _sched().alphas_cumprod[t]
    v = prediction_target("v_prediction", x0, noise, ac)
    torch.testing.assert_close(v, ref.get_velocity(x0, noise, t))
    assert prediction_target("epsilon", x0, noise, ac) is noise
    assert prediction_target("sample", x0, noise, ac) is x0
    with pytest.raises(ValueError, match="valid: epsilon, v_prediction, sample"):
        prediction_target("x0", x0, noise, ac)


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample"])
def test_denoiser_recovers_x0_from_an_oracle_network(prediction):
    """A network that outputs the exact target must make the wrapper return exactly x0."""
    sched = _sched()
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([3, 100, 500, 999])
    ac = sched.alphas_cumprod[t]
    xt_vp = q_sample(x0, t, noise, sched.alphas_cumprod)
    target = prediction_target(prediction, x0, noise, ac)
    seen = {}

    def model(x, tt):
        seen["x"], seen["t"] = x, tt
        return target

    den = Denoiser(model, sched, prediction)
    sigma = sched.sigmas[t]
    x_ve = xt_vp / ac.sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(den(x_ve, sigma), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(seen["x"], xt_vp, atol=1e-5, rtol=1e-5)  # model sees the VP input
    torch.testing.assert_close(seen["t"], t.float(), atol=1e-3, rtol=0)


def test_denoiser_timestep_modes_and_pinned_table():
    sched = _sched()
    got = []
    den = Denoiser(lambda x, t: (got.append(t), x)[1], sched)
    sig = sched.t_to_sigma(torch.tensor([100.4]))
    den(torch.zeros(1, 1), sig)
    assert got[-1].item() == pytest.approx(100.4, abs=1e-3)
    Denoiser(den.model, sched, timestep_mode="rounded")(torch.zeros(1, 1), sig)
    assert got[-1].item() == 100.0
    pinned = den.with_timesteps(sig, torch.tensor([77.0]))
    pinned(torch.zeros(1, 1), sig)
    assert got[-1].item() == 77.0
    with pytest.raises(ValueError, match="timestep_mode"):
        Denoiser(den.model, sched, timestep_mode="floor")


def test_min_snr_loss_weighting():
    sched = _sched()
    t = torch.tensor([10, 500, 990])
    ac = sched.alphas_cumprod[t]
    snr = ac / (1 - ac)
    out, tgt = torch.zeros(3, 2, 2, 2), torch.ones(3, 2, 2, 2)
    out[1] = 0.5
    per = torch.tensor([1.0, 0.25, 1.0])
    assert diffusion_loss(out, tgt).item() == pytest.approx(per.mean().item())
    for pred, w in [
        ("epsilon", torch.clamp(snr, max=5.0) / snr),
        ("v_prediction", torch.clamp(snr, max=5.0) / (snr + 1)),
        ("sample", torch.clamp(snr, max=5.0)),
    ]:
        torch.testing.assert_close(min_snr_weights(ac, 5.0, pred), w)
        loss = diffusion_loss(out, tgt, alphas_cumprod_t=ac, prediction=pred, min_snr_gamma=5.0)
        assert loss.item() == pytest.approx((per * w).mean().item(), rel=1e-5)
    # the earliest timestep (high SNR) is down-weighted for epsilon
    assert min_snr_weights(ac, 5.0)[0] < 1 and min_snr_weights(ac, 5.0)[2] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="alphas_cumprod_t"):
        diffusion_loss(out, tgt, min_snr_gamma=5.0)
