"""ComfyUI's custom-sampling nodes of ``nodes_sampling.py``: the schedulers against a float64 re-derivation of the
published formulas (k-diffusion's get_sigmas_polyexponential / get_sigmas_vp, ComfyUI's get_sigmas_laplace), the
guider rules (DualCFGGuider, PerpNegGuider) against a hand computation on fake x0 predictions, AddNoise against
ComfyUI's prepare_noise drawn here, and the nodes end to end through the HTTP API: each guider in a
SamplerCustomAdvanced graph gives the image of the CFGGuider its settings reduce to, and each sampler node with
options gives the image of the KSamplerSelect sampler it stands for."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from _comfy_live import live_client, prompt_image, run_prompt
from _live_server import server_config
from sdengine.diffusion.guidance import DualCFG, GuidanceRuleError, PerpNeg
from sdengine.server.comfy.nodes import NodeError, NoiseSource, Sigmas
from sdengine.server.comfy.nodes_sampling import (
    SIGMA_MAX,
    SIGMA_MIN,
    add_noise,
    extend_intermediate_sigmas,
    laplace_scheduler,
    manual_sigmas,
    polyexponential_scheduler,
    sampler_euler_cfg_pp,
    sampling_percent_to_sigma,
    set_first_sigma,
    vp_scheduler,
)
from sdengine.server.comfy.registry import NODES

CTX = SimpleNamespace(max_steps=150)


# ---------------------------------------------------------------------------------------------- schedulers


def _ramp(n: int, a: float, b: float) -> list[float]:
    """n points from a to b, evenly spaced (torch.linspace's values; one point: a)."""
    return [a] if n == 1 else [a + (b - a) * i / (n - 1) for i in range(n)]


def poly_reference(n: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    # k-diffusion: ramp = linspace(1, 0, n) ** rho; sigma = exp(ramp (log max - log min) + log min); then 0
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return [math.exp(r**rho * (hi - lo) + lo) for r in _ramp(n, 1.0, 0.0)] + [0.0]


def vp_reference(n: int, beta_d: float, beta_min: float, eps_s: float) -> list[float]:
    # k-diffusion: t = linspace(1, eps_s, n); sigma = sqrt(expm1(beta_d t^2 / 2 + beta_min t)); then 0
    return [math.sqrt(math.expm1(beta_d * t * t / 2 + beta_min * t)) for t in _ramp(n, 1.0, eps_s)] + [0.0]


def laplace_reference(n: int, sigma_min: float, sigma_max: float, mu: float, beta: float) -> list[float]:
    # ComfyUI: x = linspace(0, 1, n); lmb = mu - beta sign(0.5 - x) log(1 - 2 |0.5 - x| + 1e-5); clamp(exp(lmb))
    out = []
    for x in _ramp(n, 0.0, 1.0):
        sign = (0.5 - x > 0) - (0.5 - x < 0)
        lam = mu - beta * sign * math.log(1 - 2 * abs(0.5 - x) + 1e-5)
        out.append(min(max(math.exp(lam), sigma_min), sigma_max))
    return out  # no 0 appended


POLY_CASES = [(20, SIGMA_MAX, SIGMA_MIN, 1.0), (7, SIGMA_MAX, SIGMA_MIN, 2.5), (1, 10.0, 0.1, 1.0)]
POLY_CASES += [(3, 80.0, 0.002, 0.5)]
VP_CASES = [(20, 19.9, 0.1, 0.001), (5, 12.0, 0.5, 0.01), (1, 19.9, 0.1, 0.001), (4, 0.0, 0.0, 0.5)]


@pytest.mark.parametrize("args", POLY_CASES)
def test_polyexponential_scheduler_follows_k_diffusion(args):
    n, hi, lo, rho = args
    (s,) = polyexponential_scheduler(CTX, n, hi, lo, rho)
    assert s.values.dtype == torch.float32 and s.values.shape == (n + 1,)
    assert s.values.tolist() == pytest.approx(poly_reference(n, lo, hi, rho), rel=2e-6, abs=0)
    assert float(s.values[0]) == pytest.approx(hi, rel=1e-6) and float(s.values[-1]) == 0.0


@pytest.mark.parametrize("args", VP_CASES)
def test_vp_scheduler_follows_k_diffusion(args):
    (s,) = vp_scheduler(CTX, *args)
    want = vp_reference(*args)
    assert s.values.shape == (args[0] + 1,) and float(s.values[-1]) == 0.0
    assert s.values.tolist() == pytest.approx(want, rel=2e-6, abs=1e-12)
    if args[1] == 19.9:  # the defaults' first sigma: sqrt(e^(19.9 / 2 + 0.1) - 1), about 152.2
        assert float(s.values[0]) == pytest.approx(math.sqrt(math.exp(10.05) - 1), rel=1e-6)


@pytest.mark.parametrize(
    "args",
    [(20, 14.614642, 0.0291675, 0.0, 0.5), (9, 14.614642, 0.0291675, 1.0, 1.5), (1, 10.0, 0.5, 0.0, 0.5),
     (6, 3.0, 0.3, -0.5, 0.0), (5, 0.2, 5.0, 0.0, 0.5)],
)  # fmt: skip
def test_laplace_scheduler_follows_comfyui_without_a_last_zero(args):
    n, hi, lo, mu, beta = args
    (s,) = laplace_scheduler(CTX, n, hi, lo, mu, beta)
    assert s.values.shape == (n,)  # ComfyUI's get_sigmas_laplace appends no 0
    assert s.values.tolist() == pytest.approx(laplace_reference(n, lo, hi, mu, beta), rel=2e-6, abs=0)
    if (mu, beta) == (0.0, 0.5) and lo < hi and n > 1:
        assert float(s.values[0]) == pytest.approx(hi) and float(s.values[-1]) == pytest.approx(lo)


def test_scheduler_nodes_refuse_what_makes_no_schedule():
    with pytest.raises(NodeError, match="above 0"):
        polyexponential_scheduler(CTX, 5, 14.6, 0.0, 1.0)  # log(0): ComfyUI raises a math domain error
    with pytest.raises(NodeError, match="not finite"):
        vp_scheduler(CTX, 5, 5000.0, 0.1, 0.001)  # e^2500 overflows
    for node, args in ((polyexponential_scheduler, (14.6, 0.03, 1.0)), (vp_scheduler, (19.9, 0.1, 0.001)),
                       (laplace_scheduler, (14.6, 0.03, 0.0, 0.5))):  # fmt: skip
        with pytest.raises(NodeError, match="over the server's limit of 150"):
            node(CTX, 151, *args)


def test_the_nodes_are_listed_with_comfyuis_inputs():
    from sdengine.server.comfy.nodes_sampling import NODES as SAMPLING

    assert set(SAMPLING) <= set(NODES)
    lap = {i.name: i for i in NODES["LaplaceScheduler"].inputs}
    assert (lap["mu"].default, lap["mu"].min, lap["mu"].max, lap["mu"].step) == (0.0, -10.0, 10.0, 0.1)
    assert (lap["beta"].default, lap["sigma_max"].default, lap["sigma_min"].default) == (0.5, 14.614642, 0.0291675)
    vp = {i.name: i for i in NODES["VPScheduler"].inputs}
    assert (vp["beta_d"].default, vp["beta_min"].default, vp["eps_s"].default, vp["eps_s"].step) == (
        19.9, 0.1, 0.001, 0.0001
    )  # fmt: skip
    assert [i.name for i in NODES["DualCFGGuider"].inputs] == [
        "model", "cond1", "cond2", "negative", "cfg_conds", "cfg_cond2_negative", "style"
    ]  # fmt: skip
    assert NODES["DualCFGGuider"].input("style").choices == ("regular", "nested")
    assert [i.name for i in NODES["PerpNegGuider"].inputs] == [
        "model", "positive", "negative", "empty_conditioning", "cfg", "neg_scale"
    ]  # fmt: skip
    assert NODES["SamplerER_SDE"].input("solver_type").choices == ("ER-SDE", "Reverse-time SDE", "ODE")
    assert NODES["SamplerSEEDS2"].input("r").min == 0.01


# ------------------------------------------------------------------------------------------------ sigma tools


def test_set_first_sigma_and_manual_sigmas():
    from sdengine.server.comfy.nodes import SigmaPlan

    plan = SigmaPlan("m", "karras", 2, 1.0, 2, 0, 2)
    (s,) = set_first_sigma(CTX, Sigmas(torch.tensor([14.6, 5.0, 0.0]), plan), 3.0)
    assert s.values.tolist() == [3.0, 5.0, 0.0] and s.plan is None  # a plain list now: walked as given
    with pytest.raises(NodeError, match="empty"):
        set_first_sigma(CTX, Sigmas(torch.zeros(0)), 3.0)
    for text, want in (("1, 0.5", [1.0, 0.5]), ("14.6 7\n.5,0", [14.6, 7.0, 0.5, 0.0]), ("-1;+2", [-1.0, 2.0]),
                       ("none", [])):  # fmt: skip
        (m,) = manual_sigmas(CTX, text)
        assert m.values.tolist() == pytest.approx(want) and m.values.dtype == torch.float32, text
    with pytest.raises(NodeError, match="not a number"):
        manual_sigmas(CTX, "3, 1..5, 0")  # ComfyUI's float("1..5") fails
    with pytest.raises(NodeError, match="limit of 150"):
        manual_sigmas(CTX, " ".join(["1"] * 152))
    with pytest.raises(NodeError, match="400 steps, over the server's limit of 150"):
        extend_intermediate_sigmas(CTX, Sigmas(torch.tensor([10.0, 6.0, 2.0, 1.0, 0.0])), 100, -1.0, 0.0, "linear")


def extend_reference(sigmas: list[float], steps: int, start: float, end: float, spacing: str) -> list[float]:
    f = {"linear": lambda x: x, "cosine": lambda x: math.sin(x * math.pi / 2),
         "sine": lambda x: 1 - math.cos(x * math.pi / 2)}[spacing]  # fmt: skip
    top = math.inf if start < 0 else start
    out = []
    for s, s_next in zip(sigmas, sigmas[1:], strict=False):
        out.append(s)
        if end <= s <= top:
            out += [s + f(k / steps) * (s_next - s) for k in range(1, steps)]
    return out + sigmas[-1:]


@pytest.mark.parametrize("spacing", ["linear", "cosine", "sine"])
@pytest.mark.parametrize("steps,start,end", [(3, -1.0, 1.5), (2, 7.0, 0.0), (1, -1.0, 0.0), (4, -1.0, 20.0)])
def test_extend_intermediate_sigmas_as_comfyui(spacing, steps, start, end):
    v = [10.0, 6.0, 2.0, 1.0, 0.0]
    (s,) = extend_intermediate_sigmas(CTX, Sigmas(torch.tensor(v)), steps, start, end, spacing)
    assert s.values.tolist() == pytest.approx(extend_reference(v, steps, start, end, spacing), rel=1e-6, abs=1e-7)


def test_sampling_percent_to_sigma_reads_the_models_schedule():
    from sdengine.diffusion.schedules import NoiseSchedule

    ns = NoiseSchedule.from_config(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                   beta_schedule="scaled_linear")  # fmt: skip
    ctx = SimpleNamespace(pipeline=lambda ref: SimpleNamespace(noise_schedule=ns))
    model = SimpleNamespace(ref="m", zsnr=False)
    # the scaled-linear table in float64: betas = linspace(sqrt(b0), sqrt(b1), 1000)^2, sigma = sqrt((1 - a) / a)
    betas = np.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000) ** 2
    acp = np.cumprod(1 - betas)
    log_s = np.log(np.sqrt((1 - acp) / acp))
    for p in (0.2, 0.5, 0.8, 0.0345):
        t = (1 - p) * 999
        lo, w = math.floor(t), t - math.floor(t)
        want = math.exp((1 - w) * log_s[lo] + w * log_s[min(lo + 1, 999)])
        assert sampling_percent_to_sigma(ctx, model, p, False)[0] == pytest.approx(want, rel=2e-5), p
    assert sampling_percent_to_sigma(ctx, model, 0.0, False) == (999999999.9,)
    assert sampling_percent_to_sigma(ctx, model, 1.0, False) == (0.0,)
    assert sampling_percent_to_sigma(ctx, model, 0.0, True)[0] == pytest.approx(math.exp(log_s[-1]), rel=2e-5)
    assert sampling_percent_to_sigma(ctx, model, 1.0, True)[0] == pytest.approx(math.exp(log_s[0]), rel=2e-5)


# ----------------------------------------------------------------------------------------------- guider rules


def _fake_x0s(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 3, 3, generator=g, dtype=torch.float64) for _ in range(3)]


def test_dual_cfg_rule_is_comfyuis_by_hand():
    pos, neg, mid = _fake_x0s(0)
    a, b, c = (t.numpy() for t in (pos, neg, mid))
    got, uncond = DualCFG(3.0, 5.5, "regular").combine([pos, neg, mid])
    # regular: cfg_function(middle, negative, cfg2) + (positive - middle) cfg1
    want = b + (c - b) * 5.5 + (a - c) * 3.0
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-12)
    assert torch.equal(uncond, neg)  # the negative is the uncond of the CFG step ComfyUI runs
    got, uncond = DualCFG(3.0, 5.5, "nested").combine([pos, neg, mid])
    text = c + (a - c) * 3.0  # nested: cfg_function(positive, middle, cfg1), then negative + cfg2 (that - negative)
    np.testing.assert_allclose(got.numpy(), b + 5.5 * (text - b), rtol=1e-12)
    assert torch.equal(uncond, mid)
    # ComfyUI's cfg1 optimisation (regular only): cfg_cond2_negative 1 leaves the negative out, and cfg_conds 1 then
    # cond2 as well; the left-out passes are zeros (its calc_cond_batch's answer for a None conditioning)
    assert DualCFG(3.0, 1.0).active() == (True, False, True)
    assert DualCFG(1.0, 1.0).active() == (True, False, False)
    assert DualCFG(1.0, 1.0, "nested").active() == (True, True, True)
    assert DualCFG(1.0, 1.0).active(every=True) == (True, True, True)  # a CFG++ sampler's run
    zero = torch.zeros_like(pos)
    assert torch.equal(DualCFG(1.0, 1.0).combine([pos, zero, zero])[0], pos)
    with pytest.raises(GuidanceRuleError, match="style"):
        DualCFG(1.0, 1.0, "sideways")
    with pytest.raises(GuidanceRuleError, match="at least 0"):
        DualCFG(-1.0, 1.0)


def test_perp_neg_rule_is_comfyuis_by_hand():
    pos, neg, empty = _fake_x0s(1)
    got, uncond = PerpNeg(7.0, 0.8).combine([pos, neg, empty])
    p = (pos - empty).numpy().ravel()
    n = (neg - empty).numpy().ravel()
    dot = sum(float(u) * float(v) for u, v in zip(n, p, strict=True))  # over the whole batch, as ComfyUI's .sum()
    norm2 = sum(float(v) * float(v) for v in p)
    perp = n - dot / norm2 * p
    want = empty.numpy().ravel() + 7.0 * (p - perp * 0.8)
    np.testing.assert_allclose(got.numpy().ravel(), want, rtol=1e-10)
    assert torch.equal(uncond, neg)
    # the negative's part along the positive does not act: a negative on the positive's line changes nothing
    along, _ = PerpNeg(7.0, 0.8).combine([pos, empty + 0.3 * (pos - empty), empty])
    np.testing.assert_allclose(along.numpy(), (empty + 7.0 * (pos - empty)).numpy(), rtol=1e-10)
    assert PerpNeg(7.0, 0.0).active() == (True, False, True)
    assert PerpNeg(1.0, 0.0).active() == (True, False, False)
    assert PerpNeg(1.0, 0.5).active() == (True, True, True)
    # the older PerpNeg model patch: ComfyUI's sampling_function drops the negative at cfg 1, never the empty one
    assert PerpNeg(1.0, 0.0, patch=True).active() == (True, False, True)
    assert PerpNeg(7.0, 0.0, patch=True).active() == (True, True, True)
    assert PerpNeg(1.0, 0.0, patch=True).active(every=True) == (True, True, True)
    with pytest.raises(GuidanceRuleError, match="neg_scale"):
        PerpNeg(1.0, float("nan"))


# ------------------------------------------------------------------------------------------------ AddNoise


def test_add_noise_is_comfyuis_prepare_noise_times_the_sigma_span():
    pipe = SimpleNamespace(vae_scale_factor=8, latent_channels=4, name="fake")
    ctx = SimpleNamespace(pipeline=lambda ref: pipe, seed_rule="comfyui")
    model = SimpleNamespace(ref="m")
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(3))
    latent = {"samples": z, "size": (2, 24, 40), "posterior": ("mean", "std"), "noise_mask": None}
    sig = Sigmas(torch.tensor([9.0, 2.0, 0.5]))
    (out,) = add_noise(ctx, model, NoiseSource(77), sig, latent)
    drawn = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(77))  # torch.manual_seed(seed); randn
    torch.testing.assert_close(out["samples"], z + drawn * 8.5, rtol=0, atol=1e-6)
    assert out["posterior"] is None and out["size"] == (2, 24, 40)
    (one,) = add_noise(ctx, model, NoiseSource(77), Sigmas(torch.tensor([3.0])), latent)  # one sigma: that one
    torch.testing.assert_close(one["samples"], z + drawn * 3.0, rtol=0, atol=1e-6)
    # a batch_index (LatentFromBatch): rows 0 .. 2 drawn one after the other (ComfyUI's loop), each row its own
    (cut,) = add_noise(ctx, model, NoiseSource(77), sig, {**latent, "batch_index": [2, 0]})
    gen = torch.Generator().manual_seed(77)
    rows = torch.cat([torch.randn(1, 4, 3, 5, generator=gen) for _ in range(3)])
    torch.testing.assert_close(cut["samples"], z + rows[[2, 0]] * 8.5, rtol=0, atol=1e-6)
    (off,) = add_noise(ctx, model, NoiseSource(0, enabled=False), sig, latent)  # DisableNoise
    assert torch.equal(off["samples"], z)
    (same,) = add_noise(ctx, model, NoiseSource(77), Sigmas(torch.zeros(0)), latent)  # no sigma: as it came
    assert same["samples"] is z and same["posterior"] == ("mean", "std")
    bad = z.clone()
    bad[0, 0, 0, 0] = float("nan")
    (clean,) = add_noise(ctx, model, NoiseSource(77), sig, {**latent, "samples": bad})
    assert float(clean["samples"][0, 0, 0, 0]) == 0.0  # ComfyUI's nan_to_num


def test_euler_cfg_pp_node_refuses_the_alternative_version():
    (choice,) = sampler_euler_cfg_pp(CTX, "regular")
    assert choice.name == "euler_cfg_pp"
    with pytest.raises(NodeError, match="alternative"):
        sampler_euler_cfg_pp(CTX, "alternative")


# ------------------------------------------------------------------------------------------ through the API

SEED, STEPS = 5, 4


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("comfy_sampling"), max_queue=8)) as (_, c):
        yield c


def custom_graph(guider: dict, sampler: dict | None = None, sigmas: dict | None = None, **texts: str) -> dict:
    """A SamplerCustomAdvanced graph on the emoji model: prompts "p", "n", "m", "e" encoded, then ``guider``
    (its inputs may link ["p", 0] ...), ``sampler`` (default KSamplerSelect euler) and ``sigmas`` (default
    BasicScheduler karras)."""
    words = {"p": "a red apple", "n": "blurry", "m": "a green pear", "e": "", **texts}
    g: dict = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "guider": guider,
        "sampler": sampler or {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": sigmas
        or {
            "class_type": "BasicScheduler",
            "inputs": {"model": ["ckpt", 0], "scheduler": "karras", "steps": STEPS, "denoise": 1.0},
        },  # fmt: skip
        "run": {
            "class_type": "SamplerCustomAdvanced",
            "inputs": {
                "noise": ["noise", 0],
                "guider": ["guider", 0],
                "sampler": ["sampler", 0],
                "sigmas": ["sigmas", 0],
                "latent_image": ["lat", 0],
            },
        },  # fmt: skip
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["run", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"filename_prefix": "sampling", "images": ["dec", 0]}},
    }
    for k, text in words.items():
        g[k] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}}
    return g


def cfg_guider(pos: str, neg: str, cfg: float) -> dict:
    return {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": [pos, 0], "negative": [neg, 0],
                                                  "cfg": cfg}}  # fmt: skip


def dual(cond1: str, cond2: str, neg: str, cfg_conds: float, cfg_cond2_negative: float, style: str) -> dict:
    return {"class_type": "DualCFGGuider", "inputs": {
        "model": ["ckpt", 0], "cond1": [cond1, 0], "cond2": [cond2, 0], "negative": [neg, 0], "cfg_conds": cfg_conds,
        "cfg_cond2_negative": cfg_cond2_negative, "style": style}}  # fmt: skip


def perp(pos: str, neg: str, empty: str, cfg: float, neg_scale: float) -> dict:
    return {"class_type": "PerpNegGuider", "inputs": {"model": ["ckpt", 0], "positive": [pos, 0],
            "negative": [neg, 0], "empty_conditioning": [empty, 0], "cfg": cfg, "neg_scale": neg_scale}}  # fmt: skip


def image(client: httpx.Client, graph: dict) -> np.ndarray:
    return prompt_image(client, graph).astype(np.int16)


def test_dual_cfg_and_perp_neg_guiders_end_to_end(client):
    """Each guider where its rule reduces to CFG gives CFGGuider's image (the roles of its conditionings told apart:
    regular with cfg_cond2_negative 1 is CFG of cond1 against cond2; nested with cfg_conds 1 is CFG of cond1 against
    the negative; Perp-Neg with neg_scale 0, or a negative equal to the empty prompt, is CFG against the empty
    conditioning), on a PolyexponentialScheduler's and a VPScheduler's sigmas; and the full rules differ from it."""
    made: dict[str, np.ndarray] = {}

    def image(client: httpx.Client, graph: dict) -> np.ndarray:  # a graph compared twice is run once
        key = json.dumps(graph, sort_keys=True)
        if key not in made:
            made[key] = prompt_image(client, graph).astype(np.int16)
        return made[key]

    poly = {"class_type": "PolyexponentialScheduler", "inputs": {"steps": STEPS, "sigma_max": 14.614642,
            "sigma_min": 0.0291675, "rho": 1.5}}  # fmt: skip
    vp = {"class_type": "VPScheduler", "inputs": {"steps": STEPS, "beta_d": 12.0, "beta_min": 0.1, "eps_s": 0.01}}
    # the passes run as CFGGuider batches them (the positive with the other one) are bit-equal; Perp-Neg with all
    # three passes runs the empty one in a batch of its own: within a level of 255
    cases = [
        (dual("p", "m", "n", 4.0, 1.0, "regular"), cfg_guider("p", "m", 4.0), poly, 0),
        (dual("p", "m", "n", 1.0, 6.0, "nested"), cfg_guider("p", "n", 6.0), poly, 0),
        (perp("p", "n", "e", 5.0, 0.0), cfg_guider("p", "e", 5.0), vp, 0),
        (perp("p", "e", "e", 5.0, 1.5), cfg_guider("p", "e", 5.0), vp, 1),
    ]
    for guider, same, sigmas, tol in cases:
        got, want = image(client, custom_graph(guider, sigmas=sigmas)), image(client, custom_graph(same, sigmas=sigmas))
        assert np.abs(got - want).max() <= tol, (guider["class_type"], guider["inputs"])
    # a CFG++ sampler runs every pass and takes nested DualCFG's cond2 as the unconditional x0 (ComfyUI's post-CFG
    # hook sees the uncond of the cfg_function it runs): at cfg_cond2_negative 1 it is CFG++ of cond1 against cond2
    cfgpp = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_cfg_pp"}}
    got = image(client, custom_graph(dual("p", "m", "n", 4.0, 1.0, "nested"), sampler=cfgpp))
    assert np.abs(got - image(client, custom_graph(cfg_guider("p", "m", 4.0), sampler=cfgpp))).max() <= 1
    assert np.abs(got - image(client, custom_graph(cfg_guider("p", "n", 4.0), sampler=cfgpp))).mean() > 0.5
    full = image(client, custom_graph(dual("p", "m", "n", 4.0, 6.0, "regular"), sigmas=poly))
    nested = image(client, custom_graph(dual("p", "m", "n", 4.0, 6.0, "nested"), sigmas=poly))
    assert np.abs(full - nested).mean() > 1.0
    perp_full = image(client, custom_graph(perp("p", "n", "e", 5.0, 1.5), sigmas=vp))
    assert np.abs(perp_full - image(client, custom_graph(cfg_guider("p", "e", 5.0), sigmas=vp))).mean() > 0.5


def test_the_perp_neg_model_patch_guides_as_the_guider(client):
    """ComfyUI's deprecated PerpNeg node replaces the model's CFG by Perp-Neg: CFGGuider on the patched model is
    PerpNegGuider with the same settings (cfg not 1: every pass runs either way)."""

    def patched(empty: str, neg_scale: float) -> dict:
        g = custom_graph({**cfg_guider("p", "n", 5.0)})
        g["pn"] = {"class_type": "PerpNeg", "inputs": {"model": ["ckpt", 0], "empty_conditioning": [empty, 0],
                                                       "neg_scale": neg_scale}}  # fmt: skip
        g["guider"]["inputs"]["model"] = ["pn", 0]
        return g

    got = image(client, patched("e", 1.5))
    assert np.abs(got - image(client, custom_graph(perp("p", "n", "e", 5.0, 1.5)))).max() <= 1
    assert np.abs(got - image(client, custom_graph(cfg_guider("p", "n", 5.0)))).mean() > 0.5
    g = patched("e", 1.5)
    g["guider"] = perp("p", "n", "e", 5.0, 1.5)
    g["guider"]["inputs"]["model"] = ["pn", 0]  # a guider rule on a patched model: refused at the sampler
    h = run_prompt(client, g)
    err = next(d for kind, d in h["status"]["messages"] if kind == "execution_error")
    assert err["node_id"] == "run" and "PerpNeg patch" in err["exception_message"], err


def test_sampler_nodes_with_options_run_the_samplers_they_stand_for(client):
    base = custom_graph(cfg_guider("p", "n", 5.0))

    def with_sampler(sampler: dict) -> np.ndarray:
        return image(client, {**base, "sampler": sampler})

    def select(name: str) -> np.ndarray:
        return with_sampler({"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}})

    seeds = {"solver_type": "phi_1", "eta": 1.0, "s_noise": 1.0, "r": 0.5}
    assert np.array_equal(with_sampler({"class_type": "SamplerSEEDS2", "inputs": seeds}), select("seeds_2"))
    heun = {"solver_type": "phi_2", "eta": 0.0, "s_noise": 1.0, "r": 1.0}  # ComfyUI's description: exp_heun_2_x0
    assert np.array_equal(with_sampler({"class_type": "SamplerSEEDS2", "inputs": heun}), select("exp_heun_2_x0"))
    er = {"solver_type": "ER-SDE", "max_stage": 3, "eta": 1.0, "s_noise": 1.0}
    assert np.array_equal(with_sampler({"class_type": "SamplerER_SDE", "inputs": er}), select("er_sde"))
    # the ODE's first stage is Euler's step (x' = x0 + (sigma' / sigma) (x - x0))
    ode = {"solver_type": "ODE", "max_stage": 1, "eta": 1.0, "s_noise": 1.0}
    assert np.array_equal(with_sampler({"class_type": "SamplerER_SDE", "inputs": ode}), select("euler"))
    sde = with_sampler({"class_type": "SamplerER_SDE", "inputs": {**er, "solver_type": "Reverse-time SDE"}})
    assert np.abs(sde - select("er_sde")).mean() > 0.5  # another noise scale function
    sa = {"model": ["ckpt", 0], "eta": 1.0, "sde_start_percent": 0.2, "sde_end_percent": 0.8, "s_noise": 1.0,
          "predictor_order": 3, "corrector_order": 4, "use_pece": False, "simple_order_2": False}  # fmt: skip
    assert np.array_equal(with_sampler({"class_type": "SamplerSASolver", "inputs": sa}), select("sa_solver"))
    pece = {**sa, "use_pece": True}
    assert np.array_equal(with_sampler({"class_type": "SamplerSASolver", "inputs": pece}), select("sa_solver_pece"))
    cfgpp = {"class_type": "SamplerEulerCFGpp", "inputs": {"version": "regular"}}
    assert np.array_equal(with_sampler(cfgpp), select("euler_cfg_pp"))


def test_a_sigma_from_sampling_percent_to_sigma_feeds_set_first_sigma(client):
    """SamplingPercentToSigma's FLOAT output linked into SetFirstSigma: the model's actual sigma_max as the first
    sigma of BasicScheduler's karras list (which starts there) samples as the list itself; ManualSigmas' text list of
    the same sigmas likewise."""
    base = custom_graph(cfg_guider("p", "n", 5.0))
    want = image(client, base)
    g = {
        **base,
        "pct": {
            "class_type": "SamplingPercentToSigma",
            "inputs": {"model": ["ckpt", 0], "sampling_percent": 0.0, "return_actual_sigma": True},
        },  # fmt: skip
        "first": {"class_type": "SetFirstSigma", "inputs": {"sigmas": ["sigmas", 0], "sigma": ["pct", 0]}},
    }
    g["run"] = {**g["run"], "inputs": {**g["run"]["inputs"], "sigmas": ["first", 0]}}
    assert np.abs(image(client, g) - want).max() <= 1
    from sdengine.diffusion.schedules import NoiseSchedule, karras_sigmas
    from sdengine.pipeline import BUILTIN_SD

    config = json.loads((BUILTIN_SD["emoji"] / "scheduler" / "scheduler_config.json").read_text())
    ns = NoiseSchedule.from_config(**config)
    text = ", ".join(repr(float(v)) for v in karras_sigmas(STEPS, ns.sigma_min, ns.sigma_max).float()) + ", 0"
    manual = {**base, "sigmas": {"class_type": "ManualSigmas", "inputs": {"sigmas": text}}}
    assert np.abs(image(client, manual) - want).max() <= 1


def test_guider_and_sampler_node_errors_name_the_node(client):

    rescaled = custom_graph(dual("p", "m", "n", 4.0, 6.0, "regular"))
    rescaled["rcfg"] = {"class_type": "RescaleCFG", "inputs": {"model": ["ckpt", 0], "multiplier": 0.7}}
    rescaled["guider"]["inputs"]["model"] = ["rcfg", 0]
    alt = {**custom_graph(cfg_guider("p", "n", 5.0)),
           "sampler": {"class_type": "SamplerEulerCFGpp", "inputs": {"version": "alternative"}}}  # fmt: skip
    for graph, node, words in ((rescaled, "run", "RescaleCFG"), (alt, "sampler", "alternative")):
        h = run_prompt(client, graph)
        assert h["status"]["status_str"] == "error"
        err = next(d for kind, d in h["status"]["messages"] if kind == "execution_error")
        assert err["node_id"] == node and words in err["exception_message"], err
    r = client.post("/prompt", json={"prompt": custom_graph(dual("p", "m", "n", 4.0, 6.0, "sideways"))})
    assert r.status_code == 400 and "guider" in r.json()["node_errors"], r.text
