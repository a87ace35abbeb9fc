"""What the network is handed, and where a sampler ends, on the ComfyUI routes (docs/comfyui.md).

The references are written here from ComfyUI's own code: comfy/model_sampling.py ``ModelSamplingDiscrete.timestep``
(``argmin |log sigma - log_sigmas|`` over its float32 table, built in float64: the timestep every ComfyUI sampler
hands its model, for epsilon and v-prediction models alike) and comfy/extra_samplers/uni_pc.py ``sample_unipc`` (a
last sigma of 0 replaced by 0.001, the result ``x / marginal_alpha(0.001)``: the VE sample at 0.001).
"""

from __future__ import annotations

import math

import pytest
import torch

from sdengine.diffusion import samplers as S
from sdengine.diffusion import sampling
from sdengine.diffusion.denoisers import Denoiser
from sdengine.diffusion.schedules import NoiseSchedule, karras_sigmas
from sdengine.errors import UsageError

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def comfy_log_sigmas(beta_start: float = 0.00085, beta_end: float = 0.012, n: int = 1000) -> torch.Tensor:
    """ComfyUI's ``log_sigmas`` buffer of a scaled_linear model: the table in float64, its log stored as float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, dim=0)
    return (((1 - ac) / ac) ** 0.5).log().float()


def comfy_timestep(sigma: float) -> int:
    """ComfyUI's ModelSamplingDiscrete.timestep of one float32 sigma."""
    log_sigma = torch.tensor([sigma], dtype=torch.float32).log()
    return int((log_sigma - comfy_log_sigmas()[:, None]).abs().argmin(dim=0)[0])


def _recording():
    seen: list[torch.Tensor] = []

    def model(x, t, **_):
        seen.append(t.detach().cpu().clone())
        return torch.zeros_like(x)

    return model, seen


def test_the_nearest_timestep_mode_is_comfyuis_rule_on_and_off_the_grid():
    """Denoiser(timestep_mode="nearest") hands the network ComfyUI's timestep of every sigma: on a pinned grid too (a
    diffusers scheduler's fractional timesteps are not ComfyUI's) and per row; the default mode keeps the fractional
    log-sigma interpolation (k-diffusion's sigma_to_t, 837.12 where ComfyUI gives 837)."""
    ns = NoiseSchedule.from_config(**SD)
    sigmas = karras_sigmas(6, float(ns.sigma_min), float(ns.sigma_max)).float()
    fractional = ns.sigma_to_t(sigmas)
    assert (fractional - fractional.round()).abs().max() > 0.1  # off the table: the two rules differ here
    want = [comfy_timestep(float(s)) for s in sigmas]
    s837 = float(ns.t_to_sigma(torch.tensor(837.12)))
    model, seen = _recording()
    nearest = Denoiser(model, ns, timestep_mode="nearest")
    pinned = nearest.with_timesteps(sigmas, fractional.float())
    x = torch.zeros(2, 1)
    for s in sigmas.tolist():
        pinned(x, s)  # one sigma for the batch: the scalar path
    assert [float(t[0]) for t in seen] == [float(w) for w in want]
    seen.clear()
    nearest(x, torch.tensor([sigmas[1], s837]))  # a sigma per row
    assert seen[0].tolist() == [float(want[1]), 837.0] == [float(want[1]), float(comfy_timestep(s837))]
    seen.clear()
    Denoiser(model, ns)(x, s837)
    assert float(seen[0][0]) == pytest.approx(837.12, abs=1e-3)
    with pytest.raises(UsageError, match="nearest"):
        Denoiser(model, ns, timestep_mode="closest")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def emoji():
    from _live_server import shared_loader
    from sdengine.latent_sampling import encode_text

    pipe = shared_loader("emoji", "cpu")
    return pipe, encode_text(pipe, "a star"), encode_text(pipe, "")


class _Spy(torch.nn.Module):
    """The U-Net, recording each call's timesteps."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.seen: list[list[float]] = []

    def forward(self, x, t, **kw):
        self.seen.append(torch.as_tensor(t).reshape(-1).tolist())
        return self.net(x, t, **kw)


@pytest.mark.parametrize("seed_rule", ["comfyui", "sdengine"])
def test_ksampler_hands_the_network_comfyuis_timesteps(emoji, monkeypatch, seed_rule):
    """KSampler dpm_2 + karras under ComfyUI's rule: at every sigma of the list and at each midpoint the network gets
    ComfyUI's nearest table timestep (it once got k-diffusion's fractional one, 837.12 for ComfyUI's 837); under
    sdengine's seed rule the native API's fractional ones."""
    from sdengine.latent_sampling import sample_latents

    pipe, pos, neg = emoji
    spy = _Spy(pipe.unet)
    monkeypatch.setattr(pipe, "unet", spy)
    with torch.inference_mode():
        sample_latents(pipe, [pos], [neg], torch.zeros(1, 4, 8, 8), seed=5, steps=3, cfg=3.0, sampler="dpm2",
                       schedule="karras", seed_rule=seed_rule)  # fmt: skip
    s = sampling.make_grid("dpm2", 3, pipe.noise_schedule, "karras", pipe.scheduler_config, comfy_grid=True).sigmas
    s = s.tolist()
    called = []  # k-diffusion's sample_dpm_2: sigma_i, then the log-midpoint to sigma_i+1; an Euler step to 0
    for i in range(3):
        called.append(s[i])
        if s[i + 1] > 0:
            mid = torch.tensor(s[i]).log().lerp(torch.tensor(s[i + 1]).log(), 0.5).exp()
            called.append(float(mid))
    assert len(spy.seen) == len(called)
    for ts in spy.seen:
        assert len(set(ts)) == 1  # one timestep for the CFG batch
    got = [ts[0] for ts in spy.seen]
    comfy = [float(comfy_timestep(c)) for c in called]
    if seed_rule == "comfyui":
        assert got == comfy
    else:  # the native API's: DPM2's diffusers class rounds Karras grid timesteps, its midpoints are fractional
        assert any(abs(t - round(t)) > 0.01 for t in got) and got != comfy


# ------------------------------------------------------------------------------------------------ UniPC's end


def test_unipc_zero_sigma_walks_a_last_zero_as_comfyuis_uni_pc():
    """With a denoiser that answers a constant x0 c, ComfyUI's UniPC reduces to first-order steps (every difference
    of model values is 0): x -> c + (x - c) * s_next / s each step, so its result telescopes to c + (x_start - c) *
    0.001 / s_0, the VE sample at 0.001 (ComfyUI divides by marginal_alpha(0.001)). sdengine's default ends at c."""
    c = torch.linspace(-1, 1, 16).reshape(1, 1, 4, 4)
    x = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0)) * 10
    sigmas = torch.tensor([10.0, 4.0, 1.5, 0.5, 0.0])
    den = lambda x, sigma, **_: c.expand_as(x).clone()  # noqa: E731
    f32_001 = float(torch.tensor(0.001, dtype=torch.float32))  # ComfyUI's 0.001 sits in the float32 sigma tensor
    for variant in ("bh1", "bh2"):
        ours = S.sample_unipc(den, x, sigmas, order=3, variant=variant, zero_sigma=0.001)
        torch.testing.assert_close(ours, c + (x - c) * (f32_001 / 10.0), rtol=1e-5, atol=1e-6)
        assert torch.equal(S.sample_unipc(den, x, sigmas, order=3, variant=variant), c)  # sdengine's own end: x0
    # a list that ends above 0 is walked as it is
    upper = torch.tensor([10.0, 4.0, 1.5])
    torch.testing.assert_close(S.sample_unipc(den, x, upper, zero_sigma=0.001), c + (x - c) * 0.15)
    for bad, why in ((-1.0, "finite"), (math.nan, "finite"), (0.5, "below")):
        with pytest.raises(UsageError, match=why):
            S.sample_unipc(den, x, sigmas, zero_sigma=bad)


def test_ksampler_uni_pc_ends_at_sigma_0001_as_comfyui(emoji):
    """KSampler uni_pc and uni_pc_bh2 (discarding the next-to-last sigma) end as ComfyUI's sample_unipc: one
    first-order step from the last sigma above 0 to 0.001, so the latent is not the last x0 estimate but lies 0.001 /
    sigma of the way from it to the sample before that step (it once was that x0 estimate itself). SamplerCustom's
    denoised_output is that x0 estimate, as ComfyUI's."""
    from sdengine.server.comfy.nodes import (
        ModelHandle,
        RunContext,
        SamplerChoice,
        Sigmas,
        basic_scheduler,
        ksampler,
        sampler_custom,
    )

    pipe, pos, neg = emoji
    seen: list[torch.Tensor] = []
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None,
                     progress=lambda step, steps, den: seen.append(den.float().cpu()) or True)  # fmt: skip
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    model = ModelHandle("emoji")
    for name in ("uni_pc", "uni_pc_bh2"):
        seen.clear()
        with torch.inference_mode():
            (out,) = ksampler(ctx, model=model, seed=3, steps=4, cfg=3.0, sampler_name=name, scheduler="karras",
                              positive=[pos], negative=[neg], latent_image=latent)  # fmt: skip
        assert float((out["samples"] - seen[-1]).abs().max()) > 1e-4, name  # not the last x0 estimate
        # SamplerCustom on BasicScheduler's list is that list with its last 0 made 0.001, walked as it is
        (sigmas,) = basic_scheduler(ctx, model, "karras", 4, 1.0)
        to_0001 = Sigmas(torch.cat([sigmas.values[:-1], torch.tensor([0.001])]))
        seen.clear()
        with torch.inference_mode():
            out, denoised = sampler_custom(ctx, model, True, 3, 3.0, [pos], [neg], SamplerChoice(name), sigmas, latent)
            last = seen[-1]
            there, _ = sampler_custom(ctx, model, True, 3, 3.0, [pos], [neg], SamplerChoice(name), to_0001, latent)
        assert torch.equal(denoised["samples"], last), name  # ComfyUI's denoised_output: the last x0 estimate
        assert float((out["samples"] - denoised["samples"]).abs().max()) > 1e-4, name
        torch.testing.assert_close(out["samples"], there["samples"], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ a ControlNet on an area


def _hint() -> torch.Tensor:
    """A (1, 3, 64, 64) hint in [0, 1]: a bright square off the centre, a stripe elsewhere."""
    img = torch.zeros(1, 3, 64, 64)
    img[:, :, 8:30, 36:60] = 1.0
    img[:, :, 44:48, :] = 0.7
    return img


def _controlled(emoji, area=None, neg_too=True):
    from sdengine.latent_sampling import ControlHint, sample_latents
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    pipe, pos, neg = emoji
    hint = ControlHint(str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"]), _hint(), 1.0)
    pos = type(pos)(pos.cond, (hint,), area=area)
    neg = type(neg)(neg.cond, (hint,) if neg_too else ())
    with torch.inference_mode():
        return sample_latents(pipe, [pos], [neg], torch.zeros(1, 4, 16, 16), seed=8, steps=3, cfg=4.0,
                              sampler="euler", schedule="karras").cpu()  # fmt: skip


@pytest.mark.slow  # the emoji model and its ControlNet, three runs
def test_a_controlnet_on_an_area_sees_its_crop_and_the_whole_hint_fitted_to_it(emoji, monkeypatch):
    """ComfyUI's get_control on an area (ConditioningSetArea + ControlNetApply): the ControlNet is handed the area's
    crop of the latent and the whole hint fitted to the area's size (common_upscale(..., "nearest-exact", "center"):
    cut to the area's aspect around the centre, then resized nearest-exact), on the rows of the entry that carries
    it; it was refused. An area over the whole latent is the ControlNet without an area."""
    from sdengine.models.controlnet import ControlNet
    from sdengine.pipeline.control import HINT_NEAREST_CENTRE, control_image_tensor

    plain = _controlled(emoji)
    whole = _controlled(emoji, area=("pixels", 64, 64, 0, 0))
    torch.testing.assert_close(whole, plain, rtol=0, atol=1e-3)  # other batches: float rounding
    seen: list[tuple[tuple[int, ...], torch.Tensor]] = []
    forward = ControlNet.forward

    def spy(self, x, t, cond_image, **kw):
        seen.append((tuple(x.shape), cond_image.detach().float().cpu().clone()))
        return forward(self, x, t, cond_image, **kw)

    monkeypatch.setattr(ControlNet, "forward", spy)
    part = _controlled(emoji, area=("pixels", 32, 48, 16, 8), neg_too=False)  # 8 x 12 latent pixels (f = 4)
    assert not torch.allclose(part, plain, atol=1e-3)
    # ComfyUI's fit under its seed rule (sample_latents' default): 64 x 42.7 around the centre, nearest-exact
    want = control_image_tensor(_hint(), 48, 32, HINT_NEAREST_CENTRE)
    assert seen and all(shape[2:] == (8, 12) for shape, _ in seen)  # the area's crop, never the whole latent
    assert all(shape[0] == 1 for shape, _ in seen)  # the positive's row only (the negative carries none)
    for _, img in seen:
        torch.testing.assert_close(img, want.expand_as(img), rtol=0, atol=1e-6)
    assert not torch.allclose(want, _hint()[:, :, 16:48, 8:56], atol=0.1)  # fitted, not the area's cut of the hint


def test_a_t2i_adapter_on_an_area_fails_in_one_line(emoji):
    """A T2I-Adapter's features must fit the U-Net's encoder at the latent's size: on an area's crop it is refused,
    one line naming the area nodes, before any model call."""
    from sdengine.latent_sampling import ControlHint, LatentSamplingError, sample_latents
    from sdengine.models.t2i_adapter import T2IAdapter, T2IAdapterConfig

    pipe, pos, neg = emoji
    adapter = T2IAdapter(T2IAdapterConfig(3, (64, 128, 256), 2, 4, "full_adapter")).eval()  # fits the emoji U-Net
    hint = ControlHint(adapter, _hint(), 1.0)
    area = type(pos)(pos.cond, (hint,), area=("pixels", 32, 32, 0, 0))
    with pytest.raises(LatentSamplingError, match="T2I-Adapter cannot act on a conditioning area") as e:
        sample_latents(pipe, [area], [neg], torch.zeros(1, 4, 16, 16), seed=1, steps=2, cfg=4.0)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ LCM


def test_ksampler_lcm_takes_the_models_x0_as_comfyuis_sample_lcm(emoji, monkeypatch):
    """ComfyUI's sample_lcm: x = the model's x0, then + sigma_next * fresh noise (its default_noise_sampler, seeded by
    the seed), without LCM's consistency boundary (ComfyUI applies c_skip / c_out only under a ModelSamplingDiscrete
    "lcm" node). With a network that predicts no noise (x0 = x) that is the start noise plus each step's draw; with
    the boundary at the last grid timestep, 0, the result was the VP-scaled input instead of x0."""
    from sdengine.server.comfy.nodes import ModelHandle, RunContext, ksampler

    pipe, pos, neg = emoji
    monkeypatch.setattr(pipe, "unet", lambda x, t, **_: torch.zeros_like(x))
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)
    with torch.inference_mode():
        (out,) = ksampler(ctx, model=ModelHandle("emoji"), seed=6, steps=4, cfg=3.0, sampler_name="lcm",
                          scheduler="normal", positive=[pos], negative=[neg],
                          latent_image={"samples": torch.zeros(1, 4, 8, 8)})  # fmt: skip
    s = sampling.make_grid("euler", 4, pipe.noise_schedule, "uniform", pipe.scheduler_config, comfy_grid=True).sigmas
    s = s.tolist()
    x = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(6)) * math.sqrt(1 + s[0] ** 2)
    steps = torch.Generator().manual_seed(6)
    for i in range(4):
        if s[i + 1] > 0:
            x = x + s[i + 1] * torch.randn((1, 4, 8, 8), generator=steps)
    torch.testing.assert_close(out["samples"], x, rtol=1e-5, atol=1e-5)
