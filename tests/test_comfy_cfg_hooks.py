"""ComfyUI's pre- and post-CFG model patches: APG, TCFG, CFGZeroStar, Mahiro, Epsilon Scaling.

Each sampled latent equals an Euler loop written here from ComfyUI's functions (comfy_extras/nodes_apg.py,
nodes_tcfg.py, nodes_cfg.py, nodes_mahiro.py, nodes_eps.py, and its sampling function: the pre-CFG functions on the
conditional and unconditional x0 (zeros for the skipped unconditional pass at cfg 1), the CFG, then the post-CFG
functions), calling the same network per step on the same sigmas and noise: on a flow stand-in network through
``sample_flow_latents``, and on a tiny SD 1.x U-Net through a ComfyUI graph (KSampler after the patch nodes).
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import sdengine
from sdengine.diffusion.cfg_hooks import CFGHook
from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule
from sdengine.errors import SdengineError
from sdengine.latent_sampling import (
    FlowModel,
    LatentSamplingError,
    TextCondition,
    make_noise,
    sample_flow_latents,
)
from test_flow_text_lengths import SIGMAS, JointNet, _text

# ------------------------------------------------------------------------------ ComfyUI's functions, written here


def ref_apg(eta: float, threshold: float, momentum: float):
    state: dict[str, Any] = {"avg": 0, "prev": None}

    def pre(x, sigma, c, u, scale):
        if state["prev"] is not None and sigma > state["prev"]:
            state["avg"] = 0
        state["prev"] = sigma
        g = c - u
        if momentum > 0:
            state["avg"] = g if not torch.is_tensor(state["avg"]) else momentum * state["avg"] + g
            g = state["avg"]
        if threshold > 0:
            n = g.norm(p=2, dim=[-1, -2, -3], keepdim=True)
            g = g * torch.minimum(torch.ones_like(n), threshold / n)
        v1 = F.normalize(c, dim=[-1, -2, -3])
        par = (g * v1).sum(dim=[-1, -2, -3], keepdim=True) * v1
        return (u + (g - par) + eta * par) + (c - u) / scale, u

    return pre


def ref_tcfg(x, sigma, c, u, scale, has_uncond=True):
    if not has_uncond:
        return c, u
    b = c.shape[0]
    uf, cf = (x - u).reshape(b, 1, -1), (x - c).reshape(b, 1, -1)
    vh = torch.linalg.svd(torch.cat((uf, cf), dim=1), full_matrices=False)[2]
    v1 = vh[:, 0:1, :]
    return c, x - ((uf @ v1.transpose(-2, -1)) * v1).reshape_as(u)


def ref_zero_star(x, sigma, out, c, u, scale):
    p, n = (x - c).reshape(x.shape[0], -1), (x - u).reshape(x.shape[0], -1)
    st = ((p * n).sum(1, keepdim=True) / ((n**2).sum(1, keepdim=True) + 1e-8)).reshape(-1, 1, 1, 1)
    return out + u * (st - 1.0) + scale * u * (1.0 - st)


def ref_mahiro(x, sigma, out, c, u, scale):
    leap, u_leap = c * scale, u * scale
    merge = (leap + out) / 2
    sim = F.cosine_similarity(u_leap.abs().sqrt() * u_leap.sign(), merge.abs().sqrt() * merge.sign()).mean()
    s = 2 * (sim + 1)
    return (s * out + (4 - s) * leap) / 4


def ref_tonemap(latent, multiplier):
    mag = torch.linalg.vector_norm(latent, dim=(1)) + 0.0000000001
    mag = mag[:, None]
    norm = latent / mag
    mean, std = torch.mean(mag, dim=(1, 2, 3), keepdim=True), torch.std(mag, dim=(1, 2, 3), keepdim=True)
    top = (std * 5 + mean) * multiplier
    mag = mag * (1.0 / top)
    return norm * (mag / (mag + 1.0) * top)


def ref_sharpen(latent, radius, sigma, alpha):
    lum = (torch.linalg.vector_norm(latent, dim=(1)) + 1e-6)[:, None]
    norm, c, k = latent / lum, latent.shape[1], radius * 2 + 1
    xs, ys = torch.meshgrid(torch.linspace(-1, 1, k), torch.linspace(-1, 1, k), indexing="ij")
    g = torch.exp(-(xs * xs + ys * ys) / (2.0 * sigma * sigma))
    kernel = g / g.sum() * (alpha * -10)
    kernel[k // 2, k // 2] = kernel[k // 2, k // 2] - kernel.sum() + 1.0
    padded = F.pad(norm, (radius,) * 4, "reflect")
    out = F.conv2d(padded, kernel.repeat(c, 1, 1).unsqueeze(1), padding=k // 2, groups=c)
    return lum * out[:, :, radius:-radius, radius:-radius]


def ref_latent_op_cfg(op):
    return lambda x, sigma, c, u, scale: (op(c - u) + u, u)


def ref_tsr(k: float, tsr_sigma: float, flow: bool):
    """ComfyUI's TemporalScoreRescaling (comfy_extras/nodes_eps.py), sigma_to_half_log_snr of a CONST (flow) model or
    another."""

    def fn(x, sigma, out, c, u, scale):
        sig = torch.tensor([sigma], dtype=torch.float32)[0]
        if k == 1 or sig.item() == 0:
            return out
        hls = sig.logit().neg() if flow else sig.log().neg()
        snr = (2 * hls).exp()
        if snr.item() == 0:
            return out
        var = tsr_sigma**2
        r = torch.where(torch.isposinf(snr), k, (snr * var + 1) / (snr * var / k + 1))
        return torch.lerp(x / (sig * hls.exp()), out, r)

    return fn


def ref_eps(factor: float):
    return lambda x, sigma, out, c, u, scale: x - (x - out) / factor


def reference_step(x, sigma, x0_c, x0_u, scale, pres, posts):
    """ComfyUI's sampling function from the two x0 (x0_u None: the pass skipped at cfg 1)."""
    has = x0_u is not None
    u = x0_u if has else torch.zeros_like(x0_c)
    c = x0_c
    for fn in pres:
        c, u = fn(x, sigma, c, u, scale) if fn is not ref_tcfg else ref_tcfg(x, sigma, c, u, scale, has)
    out = u + (c - u) * scale
    for fn in posts:
        out = fn(x, sigma, out, c, u, scale)
    return out


# (hooks, the reference's pre and post functions)
CASES: dict[str, Any] = {
    "cfg_zero_star": lambda: ([CFGHook("cfg_zero_star")], [], [ref_zero_star]),
    "apg": lambda: ([CFGHook("apg", (0.5, 2.0, 0.3))], [ref_apg(0.5, 2.0, 0.3)], []),
    "apg_no_norm": lambda: ([CFGHook("apg", (-0.5, 0.0, 0.0))], [ref_apg(-0.5, 0.0, 0.0)], []),
    "tcfg": lambda: ([CFGHook("tcfg")], [ref_tcfg], []),
    "mahiro": lambda: ([CFGHook("mahiro")], [], [ref_mahiro]),
    "epsilon_scaling": lambda: ([CFGHook("epsilon_scaling", (1.2,))], [], [ref_eps(1.2)]),
    "tsr": lambda: ([CFGHook("tsr", (0.8, 0.5))], [], [ref_tsr(0.8, 0.5, flow=True)]),
    # stacked in the order applied: the posts in their order, the pres before the CFG whatever their place
    "stacked": lambda: (
        [
            CFGHook("cfg_zero_star"),
            CFGHook("tcfg"),
            CFGHook("epsilon_scaling", (1.1,)),
            CFGHook("apg", (0.7, 3.0, 0.5)),
            CFGHook("mahiro"),
        ],
        [ref_tcfg, ref_apg(0.7, 3.0, 0.5)],
        [ref_zero_star, ref_eps(1.1), ref_mahiro],
    ),  # fmt: skip
}

# ---------------------------------------------------------------------------------------------- flow stand-in


def _flow_sample(net: JointNet, cfg: float, hooks: list[CFGHook], **kw: Any) -> torch.Tensor:
    model = FlowModel(net, FlowSchedule.sd3(3.0), 4, torch.device("cpu"), "stand-in")  # type: ignore[arg-type]
    c, u = _text(5, 1), _text(5, 2)
    with torch.inference_mode():
        return sample_flow_latents(model, [TextCondition({"crossattn": c})], [TextCondition({"crossattn": u})],
                                   torch.zeros(2, 4, 4, 4), SIGMAS, seed=3, cfg=cfg, cfg_hooks=hooks, **kw)  # fmt: skip


def _flow_reference(net: JointNet, cfg: float, pres: list, posts: list) -> torch.Tensor:
    den = FlowDenoiser(net, FlowSchedule.sd3(3.0))
    c, u = _text(5, 1), _text(5, 2)
    x = make_noise((2, 4, 4, 4), 3, "comfyui")
    with torch.inference_mode():
        for i in range(SIGMAS.shape[0] - 1):
            s, nxt = float(SIGMAS[i]), float(SIGMAS[i + 1])
            x0_c = den(x, s, crossattn=c.expand(2, -1, -1))
            x0_u = None if cfg == 1.0 else den(x, s, crossattn=u.expand(2, -1, -1))
            x0 = reference_step(x, s, x0_c, x0_u, cfg, pres, posts)
            x = x + (nxt - s) * (x - x0) / s
    return x


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cfg", [4.0, 1.0])
def test_flow_hooks_equal_comfyuis_functions(case, cfg):
    hooks, pres, posts = CASES[case]()
    got = _flow_sample(JointNet(), cfg, hooks)
    want = _flow_reference(JointNet(), cfg, pres, posts)
    assert (got - want).abs().max().item() < 1e-5
    plain = _flow_sample(JointNet(), cfg, [])
    changes = (got - plain).abs().max().item()
    if cfg == 1.0 and case in ("cfg_zero_star", "tcfg", "mahiro"):  # nothing to do without the unconditional pass
        assert changes < 1e-5
    else:
        assert changes > 1e-3, changes


def test_flow_hooks_refuse_cfg_norm_and_skip_layer_guidance():
    from sdengine.latent_sampling import SkipLayerGuidance

    with pytest.raises(LatentSamplingError, match="CFGNorm or SkipLayerGuidanceSD3"):
        _flow_sample(JointNet(), 4.0, [CFGHook("mahiro")], cfg_norm=1.0)
    with pytest.raises(LatentSamplingError, match="CFGNorm or SkipLayerGuidanceSD3"):
        _flow_sample(JointNet(), 4.0, [CFGHook("mahiro")], skip_layer_guidance=SkipLayerGuidance((1,), 3.0))
    with pytest.raises(SdengineError, match="unknown CFG hook"):
        CFGHook("nope")


# ------------------------------------------------------------------------------------------- U-Net graphs

STEPS, SEED = 4, 5


def _run(root: Path, prompt: dict[str, Any], pipes: dict[str, Any]) -> dict[str, Any]:
    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import Executor, validate
    from sdengine.server.comfy.nodes import Outputs, RunContext

    catalog = Catalog(root / "models", None, None)
    folders = Outputs(root / "out", root / "in", root / "temp")

    class Env:
        def __init__(self) -> None:
            self.catalog, self.folders, self.limits = catalog, folders, {}

    graph, _, errors = validate(prompt, Env())
    assert not errors, errors
    ctx = RunContext(pipeline=lambda ref: pipes[ref], catalog=catalog, folders=folders, seed_rule="comfyui",
                     device="cpu", save_lock=threading.Lock())  # fmt: skip
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    return {nid: entry.outputs for nid, entry in ex.cache.items()}


@pytest.fixture(scope="module")
def sd1(tmp_path_factory, tiny_sd1_folder):
    root = tmp_path_factory.mktemp("cfg_hooks")
    shutil.copytree(tiny_sd1_folder, root / "models" / "sd1")
    pipe = sdengine.load_pipeline(root / "models" / "sd1", device="cpu")
    return root, {str((root / "models" / "sd1").resolve()): pipe}, pipe


def unet_graph(patches: list[tuple[str, dict[str, Any]]], cfg: float, **extra: Any) -> dict[str, Any]:
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "6": {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}},
    }
    model = ["1", 0]
    for n, (kind, inputs) in enumerate(patches):
        g[f"2{n}"] = {"class_type": kind, "inputs": {"model": model, **inputs}}
        model = [f"2{n}", 0]
    g["3"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": SEED, "steps": STEPS, "cfg": cfg, "sampler_name": "euler", "scheduler": "karras",
        "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "denoise": 1.0}}  # fmt: skip
    g["8"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}}
    g["9"] = {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}
    g.update(extra)
    return g


def _unet_reference(
    pipe: Any, outs: dict[str, Any], cfg: float, pres: list, posts: list, cfg_fn: Any = None
) -> torch.Tensor:
    """Euler over the karras sigmas (BasicScheduler's) on ComfyUI's noise (scaled by sqrt(1 + sigma_max^2): a full
    denoise), the U-Net's x0 (epsilon, ComfyUI's nearest timestep) per half, ComfyUI's sampling function."""
    from sdengine.diffusion.denoisers import Denoiser
    from sdengine.pipeline.unet_adapter import UNetAdapter

    den = Denoiser(UNetAdapter(pipe.unet, pipe.dtype), pipe.noise_schedule, "epsilon", timestep_mode="nearest")
    (pos,), (neg,) = outs["4"][0], outs["5"][0]
    from types import SimpleNamespace

    from sdengine.server.comfy.nodes import basic_scheduler

    ctx: Any = SimpleNamespace(pipeline=lambda ref: pipe, max_steps=100)
    sigmas = basic_scheduler(ctx, outs["1"][0], "karras", STEPS, 1.0)[0].values.float()  # KSampler's sigmas
    x = make_noise(tuple(outs["3"][0]["samples"].shape), SEED, "comfyui") * (1.0 + float(sigmas[0]) ** 2) ** 0.5
    with torch.inference_mode():
        for i in range(sigmas.shape[0] - 1):
            s, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x0_c = den(x, s, **{k: v for k, v in pos.cond.items()})
            x0_u = None if cfg == 1.0 else den(x, s, **{k: v for k, v in neg.cond.items()})
            if cfg_fn is not None:
                x0 = reference_cfg_fn_step(x, s, x0_c, x0_u, cfg, cfg_fn)
            else:
                x0 = reference_step(x, s, x0_c, x0_u, cfg, pres, posts)
            x = x + (nxt - s) * (x - x0) / s
    return x


UNET_NODES: dict[str, Any] = {
    "cfg_zero_star": ([("CFGZeroStar", {})], [], [ref_zero_star]),
    "apg": ([("APG", {"eta": 0.5, "norm_threshold": 5.0, "momentum": 0.5})], ["apg"], []),
    "tcfg": ([("TCFG", {})], [ref_tcfg], []),
    "mahiro": ([("Mahiro", {})], [], [ref_mahiro]),
    "epsilon_scaling": ([("Epsilon Scaling", {"scaling_factor": 1.005})], [], [ref_eps(1.005)]),
    "tsr": ([("TemporalScoreRescaling", {"tsr_k": 0.9, "tsr_sigma": 2.0})], [], [ref_tsr(0.9, 2.0, flow=False)]),
    "stacked": (
        [
            ("CFGZeroStar", {}),
            ("TCFG", {}),
            ("APG", {"eta": 0.0, "norm_threshold": 2.0, "momentum": 0.0}),
            ("Epsilon Scaling", {"scaling_factor": 1.2}),
        ],
        [ref_tcfg, "apg0"],
        [ref_zero_star, ref_eps(1.2)],
    ),  # fmt: skip
}


OPS = {
    "30": {"class_type": "LatentOperationTonemapReinhard", "inputs": {"multiplier": 0.8}},
    "31": {"class_type": "LatentOperationSharpen", "inputs": {"sharpen_radius": 2, "sigma": 1.5, "alpha": 0.4}},
}
UNET_NODES["latent_op_cfg"] = (
    [("LatentApplyOperationCFG", {"operation": ["30", 0]}), ("LatentApplyOperationCFG", {"operation": ["31", 0]})],
    [ref_latent_op_cfg(lambda z: ref_tonemap(z, 0.8)), ref_latent_op_cfg(lambda z: ref_sharpen(z, 2, 1.5, 0.4))],
    [],
)


@pytest.mark.parametrize("case", sorted(UNET_NODES))
def test_unet_graph_nodes_equal_comfyuis_functions(sd1, case):
    root, pipes, pipe = sd1
    patches, pres, posts = UNET_NODES[case]
    pres = [ref_apg(0.5, 5.0, 0.5) if p == "apg" else ref_apg(0.0, 2.0, 0.0) if p == "apg0" else p for p in pres]
    outs = _run(root, unet_graph(patches, 6.0, **OPS), pipes)
    got = outs["3"][0]["samples"].float()
    want = _unet_reference(pipe, outs, 6.0, pres, posts)
    assert rel(got, want) < 1e-5
    plain_outs = _run(root, unet_graph([], 6.0), pipes)
    plain = plain_outs["3"][0]["samples"].float()
    # the harness is ComfyUI's plain CFG where no patch is applied
    assert rel(plain, _unet_reference(pipe, plain_outs, 6.0, [], [])) < 1e-5
    assert (got - plain).abs().max().item() > 1e-3


def test_unet_apg_at_cfg_1_sees_a_zero_uncond(sd1):
    """At cfg 1 ComfyUI skips the unconditional pass and its pre-CFG functions see zeros for it: APG then moves."""
    root, pipes, pipe = sd1
    outs = _run(root, unet_graph([("APG", {"eta": 1.0, "norm_threshold": 5.0, "momentum": 0.0})], 1.0), pipes)
    want = _unet_reference(pipe, outs, 1.0, [ref_apg(1.0, 5.0, 0.0)], [])
    assert rel(outs["3"][0]["samples"].float(), want) < 1e-5


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest gap relative to the reference's largest value (the U-Net's latents run to about 30 here; the
    batched halves and the reference's separate calls differ in float32's last bits)."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _node_error(root: Path, prompt: dict, pipes: dict) -> str:
    from sdengine.server.comfy.graph import NodeFailed

    with pytest.raises(NodeFailed) as info:
        _run(root, prompt, pipes)
    message = str(info.value.error if hasattr(info.value, "error") else info.value)
    assert "\n" not in message
    return message


def test_bad_inputs_are_one_line_errors(sd1):
    from sdengine.server.comfy.graph import validate

    root, pipes, _ = sd1
    # PAG / SAG after a post-CFG hook: ComfyUI would run them after it, sdengine before
    g = unet_graph([("CFGZeroStar", {}), ("PerturbedAttentionGuidance", {"scale": 3.0})], 6.0)
    assert "apply PerturbedAttentionGuidance before them" in _node_error(root, g, pipes)
    # after a CFG function (RenormCFG) or a pre-CFG hook the order does not matter: it runs
    ok = [("RenormCFG", {"cfg_trunc": 100.0, "renorm_cfg": 1.0}), ("APG", {"eta": 1.0, "norm_threshold": 5.0,
          "momentum": 0.0}), ("PerturbedAttentionGuidance", {"scale": 1.0})]  # fmt: skip
    assert _run(root, unet_graph(ok, 6.0), pipes)["3"][0]["samples"].isfinite().all()
    g = unet_graph([("Mahiro", {}), ("SelfAttentionGuidance", {"scale": 0.5, "blur_sigma": 2.0})], 6.0)
    assert "apply SelfAttentionGuidance before them" in _node_error(root, g, pipes)
    # an area conditioning
    g = unet_graph([("TCFG", {})], 6.0)
    g["10"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["4", 0], "width": 64, "height": 64,
                                                               "x": 0, "y": 0, "strength": 0.5}}  # fmt: skip
    g["3"]["inputs"]["positive"] = ["10", 0]
    assert "one whole-latent positive and negative" in _node_error(root, g, pipes)
    # out of ComfyUI's ranges: refused at validation, naming the input
    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import PromptInvalid

    class Env:
        catalog, folders, limits = Catalog(root / "models", None, None), None, {}

    for node, inputs, name in (
        ("Epsilon Scaling", {"scaling_factor": 2.0}, "scaling_factor"),
        ("APG", {"eta": 1.0, "norm_threshold": -1.0, "momentum": 0.0}, "norm_threshold"),
        ("APG", {"eta": 1.0, "norm_threshold": 1.0, "momentum": 1.5}, "momentum"),
    ):
        with pytest.raises(PromptInvalid) as info:
            validate(unet_graph([(node, inputs)], 6.0), Env())
        assert name in str(info.value.body)


# ------------------------------------------------------------------------------------------- SD3 graphs (a DiT)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    pytest.importorskip("diffusers")
    from test_comfy_sd3_flux import save_sd3_files

    root = tmp_path_factory.mktemp("cfg_hooks_sd3")
    return root, sdengine.load_pipeline(save_sd3_files(root), device="cpu")


def _sd3_run(sd3: Any, model_patches: list[tuple[str, dict[str, Any]]]) -> torch.Tensor:
    """The SD3 checkpoint's graph (euler, simple, cfg 4) with the patches chained before KSampler: its LATENT."""
    from test_comfy_sd3_flux import _run as sd3_run
    from test_comfy_sd3_flux import sd3_graph

    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    model = ["1", 0]
    patches = {}
    for n, (kind, inputs) in enumerate(model_patches):
        patches[f"2{n}"] = {"class_type": kind, "inputs": {"model": model, **inputs}}
        model = [f"2{n}", 0]
    g = {**sd3_graph(ckpt, model, ["1", 1], ["1", 2]), **patches}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    return sd3_run(root, g, {ref: pipe})["6"][0]["samples"].float()


def _sd3_reference(sd3: Any, pres: list, posts: list, slg: tuple | None = None, cfg_fn: Any = None) -> torch.Tensor:
    """Euler on SD3's simple sigmas (shift 3), ComfyUI's noise and sampling function, its LATENT's scaling;
    ``slg`` (layers, scale, start, end, rescaling): SkipLayerGuidanceDiT's post-CFG function."""
    from functools import partial

    from sdengine.diffusion.flow import flow_grid
    from sdengine.pipeline.sd3 import MMDiTAdapter
    from test_comfy_sd3_flux import NEGATIVE, PROMPT, STEPS

    root, pipe = sd3
    schedule = FlowSchedule.sd3(3.0)
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    plain = FlowDenoiser(pipe.network_adapter(pipe.unet), schedule)
    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    x = make_noise((1, 16, 8, 8), 5, "comfyui")
    with torch.inference_mode():
        for i in range(sigmas.shape[0] - 1):
            s, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x0_c, x0_u = plain(x, s, **cond), plain(x, s, **uncond)
            if cfg_fn is not None:
                x0 = reference_cfg_fn_step(x, s, x0_c, x0_u, 4.0, cfg_fn)
            else:
                x0 = reference_step(x, s, x0_c, x0_u, 4.0, pres, posts)
            if slg is not None:
                layers, scale, start, end, r = slg
                if schedule.percent_to_sigma(end) <= s <= schedule.percent_to_sigma(start):
                    net = MMDiTAdapter(partial(pipe.unet, skip_layers=layers), pipe.dtype)
                    x0 = x0 + (x0_c - FlowDenoiser(net, schedule)(x, s, **cond)) * scale
                    if r != 0:
                        x0 = x0 * (r * x0_c.std() / x0.std() + (1 - r))
            x = x + (nxt - s) * (x - x0) / s
    return x / 1.5305 + 0.0609  # ComfyUI's SD3 latent format (process_out)


def test_sd3_graph_hooks_equal_comfyuis_functions(sd3):
    """CFGZeroStar then APG on SD3's MMDiT (a flow model: x0 = x - sigma v), as ComfyUI's functions."""
    apg = {"eta": 0.3, "norm_threshold": 4.0, "momentum": 0.2}
    got = _sd3_run(sd3, [("CFGZeroStar", {}), ("APG", apg)])
    want = _sd3_reference(sd3, [ref_apg(0.3, 4.0, 0.2)], [ref_zero_star])
    assert rel(got, want) < 1e-5
    assert (got - _sd3_run(sd3, [])).abs().max().item() > 1e-3


@pytest.mark.parametrize("rescaling", [0.0, 0.7])
def test_skip_layer_guidance_dit_on_sd3_equals_comfyuis_function(sd3, rescaling):
    slg = {"double_layers": "[1]", "single_layers": "7, 8, 9", "scale": 2.5, "start_percent": 0.2,
           "end_percent": 0.7, "rescaling_scale": rescaling}  # fmt: skip
    got = _sd3_run(sd3, [("SkipLayerGuidanceDiT", slg)])
    want = _sd3_reference(sd3, [], [], slg=((1,), 2.5, 0.2, 0.7, rescaling))
    assert rel(got, want) < 1e-5
    assert (got - _sd3_run(sd3, [])).abs().max().item() > 1e-3
    if rescaling:
        assert (got - _sd3_run(sd3, [("SkipLayerGuidanceDiT", {**slg, "rescaling_scale": 0.0})])).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- FluxDisableGuidance


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    pytest.importorskip("diffusers")
    from _flux_models import make_flux_folder
    from test_comfy_sd3_flux import save_comfy_files

    root = tmp_path_factory.mktemp("cfg_hooks_flux")
    folder = make_flux_folder(root / "flux-folder", guidance=True)
    save_comfy_files(folder, root)
    return root, sdengine.load_pipeline(folder, device="cpu")


def test_flux_disable_guidance_leaves_the_guidance_embedding_out(flux, monkeypatch):
    """FluxDisableGuidance (ComfyUI: guidance None) on FLUX.1 [dev]: the transformer runs without its guidance
    embedding; an Euler loop over the same sigmas calling it with that embedding made zero gives the same
    LATENT."""
    from sdengine.diffusion.flow import flow_grid
    from sdengine.pipeline.flux import FluxAdapter
    from test_comfy_sd3_flux import PROMPT, STEPS, flux_graph
    from test_comfy_sd3_flux import _run as flux_run

    root, pipe = flux
    g = flux_graph()
    g["4"] = {"class_type": "FluxDisableGuidance", "inputs": {"conditioning": ["3", 0]}}
    out = flux_run(root, g)
    got = out["8"][0]["samples"].float()
    schedule = FlowSchedule.flux(mu=float(out["6"][0].flow_sampling[1]))
    cond = dict(pipe.conditioner.with_guidance(pipe.conditioner.text(PROMPT), 3.5))
    den = FlowDenoiser(FluxAdapter(pipe.unet, pipe.dtype), schedule)
    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    x = make_noise((1, 16, 8, 8), 5, "comfyui")
    embedder = pipe.unet.time_text_embed.guidance_embedder
    with monkeypatch.context() as mp, torch.inference_mode():
        mp.setattr(embedder, "forward", lambda h: torch.zeros_like(embedder.__class__.forward(embedder, h)))
        for i in range(sigmas.shape[0] - 1):
            s, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x = x + (nxt - s) * (x - den(x, s, **cond)) / s
    assert rel(got, x / 0.3611 + 0.1159) < 1e-5  # ComfyUI's Flux latent format (process_out)
    plain = flux_run(root, flux_graph())["8"][0]["samples"].float()
    assert (got - plain).abs().max().item() > 1e-3  # the guidance embedding mattered
    # FluxGuidance after it sets a guidance again (ComfyUI's conditioning values: the last one set counts)
    g["12"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["4", 0], "guidance": 3.5}}
    g["8"]["inputs"]["positive"] = ["12", 0]
    assert torch.equal(flux_run(root, g)["8"][0]["samples"].float(), plain)


# ------------------------------------------------------------------------------------------- RenormCFG


def ref_renorm(trunc: float, renorm: float):
    """ComfyUI's RenormCFG cfg function (comfy_extras/nodes_lumina2.py), in x0 terms."""

    def fn(x, sigma, c, u, scale):
        if not sigma < trunc:
            return c
        half = u + scale * (c - u)
        if renorm > 0.0:
            cap = torch.linalg.vector_norm(c, dim=tuple(range(1, c.ndim)), keepdim=True) * renorm
            n = torch.linalg.vector_norm(half, dim=tuple(range(1, half.ndim)), keepdim=True)
            if n >= cap:
                half = half * (cap / n)
        return half

    return fn


def reference_cfg_fn_step(x, sigma, x0_c, x0_u, scale, fn):
    return fn(x, sigma, x0_c, x0_u if x0_u is not None else torch.zeros_like(x0_c), scale)


@pytest.mark.parametrize(("trunc", "renorm"), [(100.0, 1.0), (0.6, 0.5), (100.0, 0.0)])
def test_renorm_cfg_on_sd3_equals_comfyuis_function(sd3, trunc, renorm):
    got = _sd3_run(sd3, [("RenormCFG", {"cfg_trunc": trunc, "renorm_cfg": renorm})])
    fn = ref_renorm(trunc, renorm)
    want = _sd3_reference(sd3, [], [], cfg_fn=fn)
    assert rel(got, want) < 1e-5
    plain = _sd3_run(sd3, [])
    if renorm == 0.0 and trunc == 100.0:  # plain CFG
        assert rel(got, plain) < 1e-5
    else:
        assert (got - plain).abs().max().item() > 1e-3


def test_renorm_cfg_and_rescale_cfg_the_last_counts(sd1):
    root, pipes, pipe = sd1
    renorm = ("RenormCFG", {"cfg_trunc": 100.0, "renorm_cfg": 0.5})
    both = _run(root, unet_graph([("RescaleCFG", {"multiplier": 0.7}), renorm], 6.0), pipes)
    want = _unet_reference(pipe, both, 6.0, [], [], cfg_fn=ref_renorm(100.0, 0.5))
    assert rel(both["3"][0]["samples"].float(), want) < 1e-5
    back = unet_graph(
        [("RenormCFG", {"cfg_trunc": 100.0, "renorm_cfg": 0.5}), ("RescaleCFG", {"multiplier": 0.7})], 6.0
    )
    alone = unet_graph([("RescaleCFG", {"multiplier": 0.7})], 6.0)
    assert torch.equal(_run(root, back, pipes)["3"][0]["samples"], _run(root, alone, pipes)["3"][0]["samples"])
    # a batch of two: ComfyUI's comparison fails; here one line
    g = unet_graph([("RenormCFG", {"cfg_trunc": 100.0, "renorm_cfg": 0.5})], 6.0)
    g["6"]["inputs"]["batch_size"] = 2
    assert "batch of one latent" in _node_error(root, g, pipes)


def without_blocks(net: Any, double: tuple[int, ...], single: tuple[int, ...]) -> Any:
    """A copy of a Flux / Chroma transformer whose blocks ``double`` / ``single`` hand their tokens on unchanged (as
    ComfyUI's ``dit`` block patch that returns its input), written apart from the transformer's own skipping."""
    import copy

    net = copy.deepcopy(net)
    for i in double:
        net.transformer_blocks[i].forward = lambda x, context, *a: (x, context)
    for i in single:
        net.single_transformer_blocks[i].forward = lambda seq, *a: seq
    return net


def test_flux_transformer_leaves_blocks_out(flux):
    """The Flux transformer's skip_layers / skip_single_layers: its default is the plain path bit for bit, a block
    left out is a block handing its tokens on, a block it lacks is one line naming its counts."""
    from sdengine.errors import UsageError

    _, pipe = flux
    net = pipe.unet
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g),
            torch.randn(1, 64, generator=g))  # fmt: skip
    with torch.inference_mode():
        plain = net(*args, guidance=3.5)
        assert torch.equal(net(*args, guidance=3.5, skip_layers=(), skip_single_layers=()), plain)
        for double, single in (((0,), ()), ((), (1,)), ((0,), (0, 1))):
            got = net(*args, guidance=3.5, skip_layers=double, skip_single_layers=single)
            want = without_blocks(net, double, single)(*args, guidance=3.5)
            assert torch.equal(got, want) and (got - plain).abs().max() > 1e-3
    for kw in ({"skip_layers": (1,)}, {"skip_single_layers": (2,)}, {"skip_layers": (-1,)}):
        with pytest.raises(UsageError, match=r"\(1 double blocks 0-0, 2 single blocks 0-1\)$"):
            net(*args, guidance=3.5, **kw)


def _flux_reference(flux: Any, mu: float, slg: tuple) -> torch.Tensor:
    """Euler on Flux's simple sigmas at cfg 1 (FluxGuidance 3.5), ComfyUI's noise, SkipLayerGuidanceDiT's post-CFG
    function written out (``slg``: double, single, scale, start, end, rescaling), its LATENT's scaling."""
    from sdengine.diffusion.flow import flow_grid
    from sdengine.pipeline.flux import FluxAdapter
    from test_comfy_sd3_flux import PROMPT, STEPS

    _, pipe = flux
    double, single, scale, start, end, r = slg
    schedule = FlowSchedule.flux(mu=mu)
    cond = dict(pipe.conditioner.with_guidance(pipe.conditioner.text(PROMPT), 3.5))
    den = FlowDenoiser(FluxAdapter(pipe.unet, pipe.dtype), schedule)
    skipped = FlowDenoiser(FluxAdapter(without_blocks(pipe.unet, double, single), pipe.dtype), schedule)
    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    x = make_noise((1, 16, 8, 8), 5, "comfyui")
    inside = 0
    with torch.inference_mode():
        for i in range(sigmas.shape[0] - 1):
            s, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x0_c = den(x, s, **cond)
            x0 = x0_c  # cfg 1: the conditional x0 alone
            if schedule.percent_to_sigma(end) <= s <= schedule.percent_to_sigma(start):
                inside += 1
                x0 = x0 + (x0_c - skipped(x, s, **cond)) * scale
                if r != 0:
                    x0 = x0 * (r * x0_c.std() / x0.std() + (1 - r))
            x = x + (nxt - s) * (x - x0) / s
    assert 0 < inside < sigmas.shape[0] - 1  # the window holds some steps, not all
    return x / 0.3611 + 0.1159  # ComfyUI's Flux latent format (process_out)


@pytest.mark.parametrize("rescaling", [0.0, 0.7])
def test_skip_layer_guidance_dit_on_flux_equals_comfyuis_function(flux, rescaling):
    """SkipLayerGuidanceDiT on FLUX.1 [dev]: the double and single blocks named left out of the extra conditional
    pass, its term and rescaling as ComfyUI's post-CFG function; SkipLayerGuidanceSD3 leaves double blocks out."""
    from test_comfy_sd3_flux import _run as flux_run
    from test_comfy_sd3_flux import flux_graph

    root, _ = flux
    plain = flux_run(root, flux_graph())["8"][0]["samples"].float()
    slg = {"double_layers": "0", "single_layers": "[1]", "scale": 2.5, "start_percent": 0.2, "end_percent": 0.7,
           "rescaling_scale": rescaling}  # fmt: skip
    g = flux_graph()
    g["12"] = {"class_type": "SkipLayerGuidanceDiT", "inputs": {"model": ["6", 0], **slg}}
    g["8"]["inputs"]["model"] = ["12", 0]
    out = flux_run(root, g)
    got = out["8"][0]["samples"].float()
    mu = float(out["6"][0].flow_sampling[1])
    assert rel(got, _flux_reference(flux, mu, ((0,), (1,), 2.5, 0.2, 0.7, rescaling))) < 1e-5
    assert (got - plain).abs().max().item() > 1e-3
    g["12"]["inputs"] = {"model": ["6", 0], **slg, "double_layers": ""}  # single blocks alone
    alone = flux_run(root, g)["8"][0]["samples"].float()
    assert rel(alone, _flux_reference(flux, mu, ((), (1,), 2.5, 0.2, 0.7, rescaling))) < 1e-5
    if not rescaling:
        g["12"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["6", 0], "layers": "0", "scale": 2.5,
                   "start_percent": 0.2, "end_percent": 0.7}}  # fmt: skip
        sd3 = flux_run(root, g)["8"][0]["samples"].float()
        assert rel(sd3, _flux_reference(flux, mu, ((0,), (), 2.5, 0.2, 0.7, 0.0))) < 1e-5


def test_skip_layer_guidance_dit_refusals(sd1, flux):
    """SkipLayerGuidanceDiT on a U-Net, and on Flux with a block the transformer lacks: one line naming its
    block counts."""
    from sdengine.server.comfy.graph import NodeFailed
    from test_comfy_sd3_flux import _run as flux_run
    from test_comfy_sd3_flux import flux_graph

    root, pipes, _ = sd1
    slg = {"double_layers": "1", "single_layers": "", "scale": 3.0, "start_percent": 0.01, "end_percent": 0.15,
           "rescaling_scale": 0.0}  # fmt: skip
    assert "this model is a U-Net" in _node_error(root, unet_graph([("SkipLayerGuidanceDiT", slg)], 6.0), pipes)
    froot, _ = flux
    g = flux_graph()
    g["12"] = {"class_type": "SkipLayerGuidanceDiT", "inputs": {"model": ["6", 0], **slg}}
    g["8"]["inputs"]["model"] = ["12", 0]
    for double, single in (("1", ""), ("", "0, 2")):
        g["12"]["inputs"] |= {"double_layers": double, "single_layers": single}
        with pytest.raises(NodeFailed) as info:
            flux_run(froot, g)
        msg = str(info.value)
        assert "(1 double blocks 0-0, 2 single blocks 0-1)" in msg and "\n" not in msg, msg
