"""What a ComfyUI graph hands ``sdengine.latent_sampling.sample_flow_latents`` (captured), and the latent a plain loop
gets from it by calling the model once per text: Euler on the same sigmas, the positive and the negative each at its
own length in a call of its own, CFG as ComfyUI's. For the tests of texts of different lengths on flow graphs."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import sdengine.latent_sampling as ls
from sdengine.diffusion.flow import FlowDenoiser


def capture_flow_runs(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every sample_flow_latents call of the graphs run after this: its arguments and its result."""
    runs: list[dict[str, Any]] = []
    real = ls.sample_flow_latents

    def spy(*args: Any, **kw: Any) -> torch.Tensor:
        out = real(*args, **kw)
        runs.append({"args": args, "kw": kw, "out": out})
        return out

    monkeypatch.setattr(ls, "sample_flow_latents", spy)
    return runs


def per_text_euler(run: dict[str, Any]) -> torch.Tensor:
    """The captured run redone with the model called once per text (Euler, ComfyUI's seed rule, a full denoise)."""
    model, positive, negative, latent, sigmas = run["args"]
    kw = run["kw"]
    assert kw["sampler"] == "euler" and kw["seed_rule"] == "comfyui" and kw.get("noise_mask") is None
    den = FlowDenoiser(model.network, model.schedule)
    dev = model.device
    pos = {k: v.to(dev) for k, v in positive[0].cond.items()}
    neg = {k: v.to(dev) for k, v in negative[0].cond.items()}
    cfg = float(kw["cfg"])
    s = sigmas.detach().float().cpu().reshape(-1)
    latent = latent.float().to(dev)
    x = ls.make_noise(latent.shape, int(kw["seed"]), "comfyui").to(dev) * float(s[0]) + (1 - float(s[0])) * latent
    with torch.inference_mode():
        for i in range(s.shape[0] - 1):
            x0_c = den(x, float(s[i]), **pos)
            x0_u = den(x, float(s[i]), **neg)
            x0 = x0_u + cfg * (x0_c - x0_u)
            x = x + (float(s[i + 1]) - float(s[i])) * (x - x0) / float(s[i])
    return x.float()
