"""ComfyUI's guidance and model-sampling nodes (RescaleCFG, ModelSamplingDiscrete, PerturbedAttentionGuidance).

Through the ComfyUI route (a live server, graphs posted to /prompt) under the ``sdengine`` seed rule each graph gives
the pixels of the direct pipeline call with the equivalent settings (guidance_rescale, a prediction-type override and
zero_terminal_snr, pag_scale). Under ComfyUI's own rule the numbers are ComfyUI's: the references below are written
from its code (comfy_extras/nodes_model_advanced.py ``RescaleCFG``: the std matching on the v-prediction computed
from x0; comfy_extras/nodes_pag.py: ``cfg_result + (cond_pred - pag) * scale``, a post-CFG function, so after the
rescale).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from _comfy_live import live_client, patched_graph, prompt_image, run_prompt
from _live_server import server_config, shared_loader
from sdengine.diffusion.denoisers import vp_scalings
from sdengine.diffusion.guidance import CFGDenoiser
from sdengine.pipeline import load_pipeline
from sdengine.server.comfy.nodes import NODES

STEPS, SEED = 4, 11
SDENGINE_RULE = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("comfy_guidance"), max_queue=8)) as (_, c):
        yield c


def graph(*patches: tuple[str, dict[str, Any]], cfg: float = 5.0) -> dict:
    """txt2img on the emoji model with model patches chained between the loader and the KSampler."""
    return patched_graph(*patches, cfg=cfg, seed=SEED, steps=STEPS, prefix="guidance")


def direct(pipe: Any = None, **kw: Any) -> np.ndarray:
    """The pipeline's image of the same settings (the server's loaded emoji model unless another is given)."""
    pipe = pipe or shared_loader("emoji", "cpu")
    args: dict[str, Any] = dict(steps=STEPS, sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0, seed=SEED)
    args.update(kw)
    res = pipe("a red apple", "blurry", width=64, height=64, progress=False, **args)
    return np.asarray(res.images[0].convert("RGB"))


def test_the_nodes_are_listed_with_comfyuis_inputs(client):
    info = client.get("/object_info").json()
    rescale = info["RescaleCFG"]["input"]["required"]["multiplier"]
    assert rescale[0] == "FLOAT" and (rescale[1]["default"], rescale[1]["min"], rescale[1]["max"]) == (0.7, 0, 1)
    sampling = info["ModelSamplingDiscrete"]["input"]["required"]
    assert set(sampling["sampling"][0]) >= {"eps", "v_prediction", "x0", "lcm"} and sampling["zsnr"][0] == "BOOLEAN"
    pag = info["PerturbedAttentionGuidance"]["input"]["required"]["scale"]
    assert (pag[1]["default"], pag[1]["min"], pag[1]["max"]) == (3.0, 0, 100)
    assert {n: info[n]["output"] for n in ("RescaleCFG", "ModelSamplingDiscrete", "PerturbedAttentionGuidance")} == {
        "RescaleCFG": ["MODEL"], "ModelSamplingDiscrete": ["MODEL"], "PerturbedAttentionGuidance": ["MODEL"],
    }  # fmt: skip


def test_rescale_cfg_equals_the_pipelines_guidance_rescale(client):
    plain = prompt_image(client, graph(), **SDENGINE_RULE)
    a = prompt_image(client, graph(("RescaleCFG", {"multiplier": 0.7})), **SDENGINE_RULE)
    assert np.array_equal(a, direct(guidance_rescale=0.7))
    assert np.abs(a.astype(int) - plain).mean() > 0.5  # the rescale changed the image
    # ComfyUI's rule: another rescale (on the v-prediction), a valid image all the same
    b = prompt_image(client, graph(("RescaleCFG", {"multiplier": 0.7})))
    assert b.std() > 5 and not np.array_equal(b, prompt_image(client, graph()))


def test_model_sampling_discrete_equals_the_pipelines_prediction_and_zero_snr(client):
    # eps without zsnr is the emoji model as it is (an epsilon model)
    same = prompt_image(client, graph(("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False})), **SDENGINE_RULE)
    assert np.array_equal(same, direct())
    zsnr = graph(("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": True}))
    assert np.array_equal(prompt_image(client, zsnr, **SDENGINE_RULE), direct(zero_terminal_snr=True))
    v = load_pipeline("emoji", device="cpu", prediction_type="v_prediction")
    vz = graph(("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True}))
    got = prompt_image(client, vz, **SDENGINE_RULE)
    assert np.array_equal(got, direct(v, zero_terminal_snr=True))
    assert not np.array_equal(got, same)
    x0 = load_pipeline("emoji", device="cpu", prediction_type="sample")
    g = graph(("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}))
    assert np.array_equal(prompt_image(client, g, **SDENGINE_RULE), direct(x0))
    # the last ModelSamplingDiscrete counts, as in ComfyUI (each replaces the model's sampling object)
    twice = graph(
        ("ModelSamplingDiscrete", {"sampling": "x0", "zsnr": False}),
        ("ModelSamplingDiscrete", {"sampling": "eps", "zsnr": False}),
    )
    assert np.array_equal(prompt_image(client, twice, **SDENGINE_RULE), same)


def test_model_sampling_discrete_zsnr_reaches_the_schedulers():
    """BasicScheduler on a zsnr model starts at the rescaled schedule's sigma_max (about 4518.8, A1111's and
    ComfyUI's value), as ComfyUI's reads its sigmas from the patched model_sampling; the model is as before after."""
    from types import SimpleNamespace

    from sdengine.server.comfy.nodes import ModelHandle, basic_scheduler, model_sampling_discrete

    pipe = shared_loader("emoji", "cpu")
    ctx: Any = SimpleNamespace(pipeline=lambda ref: pipe, max_steps=100)
    model = ModelHandle("emoji")
    (zmodel,) = model_sampling_discrete(ctx, model, "eps", True)
    (plain,) = basic_scheduler(ctx, model, "normal", 3, 1.0)
    (zsnr,) = basic_scheduler(ctx, zmodel, "normal", 3, 1.0)
    assert float(zsnr.values[0]) == pytest.approx(4518.8, rel=1e-3)
    assert float(plain.values[0]) < 100 and pipe.noise_schedule is pipe.base_schedule


def test_lcm_sampling_is_a_node_error(client):
    h = run_prompt(client, graph(("ModelSamplingDiscrete", {"sampling": "lcm", "zsnr": False})))
    assert h["status"]["status_str"] == "error"
    text = str(h["status"]["messages"])
    assert "ModelSamplingDiscrete" in text and "LCM" in text


def test_perturbed_attention_guidance_equals_the_pipelines_pag(client):
    plain = prompt_image(client, graph(), **SDENGINE_RULE)
    a = prompt_image(client, graph(("PerturbedAttentionGuidance", {"scale": 3.0})), **SDENGINE_RULE)
    assert np.array_equal(a, direct(pag_scale=3.0))
    assert np.abs(a.astype(int) - plain).mean() > 0.5
    # two nodes add up, as ComfyUI's post-CFG functions do
    two = graph(("PerturbedAttentionGuidance", {"scale": 1.0}), ("PerturbedAttentionGuidance", {"scale": 2.0}))
    assert np.array_equal(prompt_image(client, two, **SDENGINE_RULE), a)
    # with RescaleCFG and cfg 1 (PAG alone) too
    both = graph(("RescaleCFG", {"multiplier": 0.5}), ("PerturbedAttentionGuidance", {"scale": 3.0}), cfg=1.0)
    assert np.array_equal(prompt_image(client, both, **SDENGINE_RULE), direct(pag_scale=3.0, cfg_scale=1.0))


def test_guidance_nodes_refuse_area_conditioning(client):
    g = graph(("PerturbedAttentionGuidance", {"scale": 3.0}))
    g["20"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["6", 0], "width": 64, "height": 64,
                                                                "x": 0, "y": 0, "strength": 0.5}}  # fmt: skip
    g["3"]["inputs"]["positive"] = ["20", 0]
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "error" and "no area, mask or strength" in str(h["status"]["messages"])


# ----------------------------------------------------------------------------------- ComfyUI's numbers (its rule)


def comfy_rescale_cfg(x0_c, x0_u, x, sigma: float, scale: float, multiplier: float) -> torch.Tensor:
    """ComfyUI's RescaleCFG as its sampler_cfg_function sees it: cond = x - x0_c, uncond = x - x0_u, the result
    subtracted from x; the rescale on v = (x / (sigma^2 + 1) - x0) * sqrt(sigma^2 + 1) / sigma."""
    cond, uncond, x_orig = x - x0_c, x - x0_u, x
    xs = x_orig / (sigma * sigma + 1.0)
    v_c = ((xs - (x_orig - cond)) * (sigma**2 + 1.0) ** 0.5) / sigma
    v_u = ((xs - (x_orig - uncond)) * (sigma**2 + 1.0) ** 0.5) / sigma
    v_cfg = v_u + scale * (v_c - v_u)
    ro_pos = torch.std(v_c, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(v_cfg, dim=(1, 2, 3), keepdim=True)
    v_final = multiplier * v_cfg * (ro_pos / ro_cfg) + (1.0 - multiplier) * v_cfg
    out = x_orig - (xs - v_final * sigma / (sigma * sigma + 1.0) ** 0.5)
    return x - out


class _Fake:
    """An inner denoiser whose x0 depends on its rows' conditioning and on whether the rows are perturbed."""

    prediction = "epsilon"
    schedule = None
    perturbed = 0

    def __call__(self, x, sigma, *, c):
        out = x * 0.3 + c[:, :1, None, None] * torch.linspace(-1, 1, x.shape[-1])
        if self.perturbed:
            out[-self.perturbed :] = out[-self.perturbed :] * 0.5 + 0.1
        return out


def _perturb(fake: _Fake):
    from contextlib import contextmanager

    @contextmanager
    def perturb(n: int):
        fake.perturbed = n
        try:
            yield
        finally:
            fake.perturbed = 0

    return perturb


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_comfyuis_rule_rescales_on_v_and_adds_pag_after(prediction):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8, 8) * 3
    c, u = torch.randn(2, 3), torch.randn(1, 3)
    fake = _Fake()
    fake.prediction = prediction
    sigma, scale, mult, pag = 2.5, 6.0, 0.7, 2.0
    x0_c, x0_u = fake(x, sigma, c=c), fake(x, sigma, c=u.expand(2, -1))
    want = comfy_rescale_cfg(x0_c, x0_u, x, sigma, scale, mult)
    got = CFGDenoiser(fake, scale, {"c": u}, mult, rule="comfyui")(x, sigma, c=c)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    diffusers_rule = CFGDenoiser(fake, scale, {"c": u}, mult)(x, sigma, c=c)
    if prediction == "v_prediction":  # the two rules agree where the network predicts v
        torch.testing.assert_close(diffusers_rule, want, rtol=1e-5, atol=1e-5)
    else:  # diffusers matches the stds of eps: other numbers
        assert (diffusers_rule - want).abs().max() > 1e-3
    # PAG: ComfyUI's post-CFG term after the rescale; diffusers' before it
    x0_p = x0_c * 0.5 + 0.1
    guided = CFGDenoiser(fake, scale, {"c": u}, mult, rule="comfyui", pag_scale=pag, perturb=_perturb(fake))
    torch.testing.assert_close(guided(x, sigma, c=c), want + pag * (x0_c - x0_p), rtol=1e-5, atol=1e-5)
    d = CFGDenoiser(fake, scale, {"c": u}, mult, pag_scale=pag, perturb=_perturb(fake))(x, sigma, c=c)
    g = x0_u + scale * (x0_c - x0_u) + pag * (x0_c - x0_p)
    c_skip, c_out, _ = vp_scalings(torch.tensor(sigma), prediction)
    f_c, f_g = (x0_c - c_skip * x) / c_out, (g - c_skip * x) / c_out
    ratio = f_c.std(dim=(1, 2, 3), keepdim=True) / f_g.std(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(d, c_skip * x + c_out * (mult * f_g * ratio + (1 - mult) * f_g), rtol=1e-5, atol=1e-5)


def test_the_nodes_exist_in_the_table():
    assert {"RescaleCFG", "ModelSamplingDiscrete", "PerturbedAttentionGuidance"} <= set(NODES)


def test_freeu_nodes_equal_the_pipelines_freeu(client):
    plain = prompt_image(client, graph(), **SDENGINE_RULE)
    v1 = prompt_image(client, graph(("FreeU", {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2})), **SDENGINE_RULE)
    assert np.array_equal(v1, direct(freeu=(1.5, 1.6, 0.9, 0.2), freeu_version=1))
    assert np.abs(v1.astype(int) - plain).mean() > 0.1
    v2 = prompt_image(client, graph(("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2})), **SDENGINE_RULE)
    assert np.array_equal(v2, direct(freeu=(1.3, 1.4, 0.9, 0.2), freeu_version=2))
    # the last FreeU node of a chain counts (ComfyUI's output block patch replaces the one before)
    strong = ("FreeU", {"b1": 2.0, "b2": 2.0, "s1": 0.5, "s2": 0.5})
    chain = graph(strong, ("FreeU_V2", {"b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}))
    assert np.array_equal(prompt_image(client, chain, **SDENGINE_RULE), v2)
    info = client.get("/object_info").json()
    b1 = info["FreeU_V2"]["input"]["required"]["b1"]
    assert b1[0] == "FLOAT" and (b1[1]["default"], b1[1]["min"], b1[1]["max"]) == (1.3, 0, 10)
    # after the FreeU graph the plain graph is plain again (the U-Net's up blocks restored)
    assert np.array_equal(prompt_image(client, graph(), **SDENGINE_RULE), plain)
