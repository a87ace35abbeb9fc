"""A1111's DDIM and PLMS walk their own grid (modules/sd_samplers_timesteps.py, sd_samplers_timesteps_impl.py):
timesteps ``range(0, 1000, 1000 // steps) + 1``, ending at t = 1 (20 steps: 19 model calls), and img2img noises the
init to ``timesteps[t_enc]`` but starts at ``timesteps[t_enc - 1]``. Checked against a float64 re-implementation of
A1111's loops over a toy noise predictor."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sdengine.diffusion import sampling
from sdengine.diffusion.schedules import NoiseSchedule, a1111_timestep_start, img2img_start

NS = NoiseSchedule.from_config(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
ALPHAS = NS.alphas_cumprod.to(torch.float64)


def eps_model(x_vp: torch.Tensor, t: float) -> torch.Tensor:
    """A deterministic, nonlinear noise prediction of the VP sample at integer timestep t (float64)."""
    return torch.tanh(0.7 * x_vp + t / 1000.0) * 0.8 + 0.05 * math.sin(t / 37.0)


class ToyDenoiser:
    """sdengine's x0-denoiser over :func:`eps_model`: the grid's integer timestep of each sigma."""

    schedule = NS
    prediction = "epsilon"

    def __init__(self, table: dict[float, float] | None = None, calls: list[float] | None = None) -> None:
        self.table = table or {}
        self.calls: list[float] = [] if calls is None else calls

    def with_timesteps(self, sigmas: torch.Tensor, timesteps: torch.Tensor) -> ToyDenoiser:
        return ToyDenoiser({float(s): float(t) for s, t in zip(sigmas, timesteps, strict=True)}, self.calls)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **_: object) -> torch.Tensor:
        s = float(sigma[0])
        t = self.table[s]
        self.calls.append(t)
        x64 = x.to(torch.float64)
        e = eps_model(x64 / math.sqrt(1 + s * s), t)
        return (x64 - s * e).to(x.dtype)


def a1111_timesteps(steps: int) -> list[int]:
    return [min(max(t + 1, 0), 999) for t in range(0, 1000, 1000 // steps)]


def a1111_loop(kind: str, x: torch.Tensor, timesteps: list[int]) -> tuple[torch.Tensor, list[int]]:
    """A1111's ddim (eta 0) / plms loop over ``timesteps`` (ascending), float64; (final x, model timesteps)."""
    a = ALPHAS[timesteps]
    a_prev = ALPHAS[[0, *timesteps[:-1]]]
    seen: list[int] = []
    old: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: int) -> torch.Tensor:
        seen.append(t)
        return eps_model(x, t)

    def step(x: torch.Tensor, e: torch.Tensor, index: int) -> torch.Tensor:
        pred_x0 = (x - (1 - a[index]).sqrt() * e) / a[index].sqrt()
        return a_prev[index].sqrt() * pred_x0 + (1 - a_prev[index]).sqrt() * e

    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e = model(x, timesteps[index])
        if kind == "ddim":
            x = step(x, e, index)
            continue
        if not old:
            x_prev = step(x, e, index)
            e_prime = (e + model(x_prev, timesteps[max(index - 1, 0)])) / 2
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x = step(x, e_prime, index)
        old = [*old, e][-3:]
    return x, seen


@pytest.mark.parametrize("kind", ["ddim", "plms"])
@pytest.mark.parametrize("steps", [20, 7, 30])
def test_txt2img_walks_a1111s_grid(kind, steps):
    noise = torch.randn((1, 4, 4, 4), generator=torch.Generator().manual_seed(steps), dtype=torch.float64)
    want, seen = a1111_loop(kind, noise, a1111_timesteps(steps))
    den = ToyDenoiser()
    got = sampling.sample(den, noise.float(), sampler=kind, steps=steps, noise_schedule=NS, a1111_grid=True)
    assert den.calls == seen  # 20 steps: 19 calls (PLMS one more), from 951 down to 51, ending at t = 1
    if steps == 20:
        assert seen[0] == 951 and seen[-1] == 51 and len(seen) == (19 if kind == "ddim" else 20)
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=2e-5)
    plain = sampling.sample(ToyDenoiser(), noise.float(), sampler=kind, steps=steps, noise_schedule=NS)
    assert float((plain.double() - want).abs().max()) > 1e-2  # diffusers' grid is another


@pytest.mark.parametrize("kind", ["ddim", "plms"])
@pytest.mark.parametrize(("steps", "strength"), [(20, 0.75), (20, 0.5), (7, 0.6), (30, 0.3)])
def test_img2img_noises_one_point_higher_than_it_starts_as_a1111(kind, steps, strength):
    g = torch.Generator().manual_seed(3)
    init = torch.randn((1, 4, 4, 4), generator=g, dtype=torch.float64)
    noise = torch.randn((1, 4, 4, 4), generator=g, dtype=torch.float64)
    ts = a1111_timesteps(steps)
    t_enc = int(min(strength, 0.999) * steps)
    xi = init * ALPHAS[ts[t_enc]].sqrt() + noise * (1 - ALPHAS[ts[t_enc]]).sqrt()
    want, seen = a1111_loop(kind, xi, ts[:t_enc])
    grid = sampling.make_grid(kind, steps, NS, a1111_grid=True)
    # what the pipeline does: A1111's t_enc counted on the steps asked, then placed on A1111's grid
    first, noise_from = a1111_timestep_start(grid.steps, steps - img2img_start(steps, strength, "a1111", kind))
    den = ToyDenoiser()
    got = sampling.sample(
        den,
        noise.float(),
        sampler=kind,
        steps=steps,
        noise_schedule=NS,
        init_latent=init.float(),
        start_step=first,
        noise_from=noise_from,
        a1111_grid=True,
    )
    assert den.calls == seen and len([t for t in seen if t != ts[0]]) >= 1
    np.testing.assert_allclose(got.double().numpy(), want.numpy(), rtol=0, atol=2e-5)
