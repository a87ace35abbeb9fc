"""Differential Diffusion (Levin & Fried 2023; ComfyUI's DifferentialDiffusion node): a grey inpainting mask whose
levels say how much each pixel may change. The node on the U-Net and flow routes against a reference loop written
here from ComfyUI's rule (threshold per model call in its timestep space, KSamplerX0Inpaint's blends), the special
masks (binary, all 0, all 1), the Python API / infotext option and its parity with the node, and the refusals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sdengine.errors import SdengineError
from sdengine.latent_sampling import (
    FlowModel,
    TextCondition,
    encode_text,
    sample_flow_latents,
    sample_latents,
)
from sdengine.pipeline import GenerationError, load_pipeline
from sdengine.server.comfy.nodes import (
    ModelHandle,
    NodeError,
    RunContext,
    VaeHandle,
    image_to_tensor,
    ksampler,
    set_latent_noise_mask,
    tensor_to_pil,
    vae_decode,
    vae_encode,
)
from sdengine.server.comfy.nodes_patches import differential_diffusion
from sdengine.server.comfy.registry import NODES

SEED = 5


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.fixture(scope="module")
def texts(sd1):
    return [encode_text(sd1, "a star")], [encode_text(sd1, "")]


def _latent() -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


def _grey_mask() -> torch.Tensor:
    """(1, 64, 64): a ramp from 0 to 1 across, a square of 1 and a band of 0, so that the latent's cells (8 x 8
    pixels each) take many grey levels and both ends."""
    m = torch.linspace(0.0, 1.0, 64)[None, None, :].expand(1, 64, 64).clone()
    m[:, 8:24, 40:56] = 1.0
    m[:, 48:, :] = 0.0
    return m


def _block_mask() -> torch.Tensor:
    m = torch.zeros(1, 64, 64)
    m[:, 16:48, 8:40] = 1.0  # on the latent's 8 x 8 cells: the same mask bilinear or nearest
    return m


def _ctx(pipe, rule: str = "comfyui") -> RunContext:
    return RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None, seed_rule=rule)


def _node(pipe, texts, latent, mask, *, differential: float | None, scheduler: str, denoise: float = 0.8, steps=5):
    pos, neg = texts
    handle = ModelHandle("tiny")
    if differential is not None:
        (handle,) = differential_diffusion(_ctx(pipe), handle, differential)
    lat = {"samples": latent, "size": (1, 16, 16), "posterior": None, "noise_mask": None}
    if mask is not None:
        (lat,) = set_latent_noise_mask(_ctx(pipe), lat, mask)
    with torch.inference_mode():
        (out,) = ksampler(_ctx(pipe), model=handle, seed=SEED, steps=steps, cfg=3.0, sampler_name="euler",
                          scheduler=scheduler, positive=pos, negative=neg, latent_image=lat,
                          denoise=denoise)  # fmt: skip
    return out["samples"]


def _comfy_timestep(log_sigmas: torch.Tensor, sigma: float) -> int:
    """ComfyUI's ModelSamplingDiscrete.timestep: the nearest table entry in log sigma."""
    return int((math.log(sigma) - log_sigmas).abs().argmin())


def _comfy_sigmas(pipe, scheduler: str, total: int) -> list[float]:
    """ComfyUI's simple and karras lists on the model's table."""
    table = pipe.noise_schedule.sigmas.float()
    if scheduler == "simple":
        ss = len(table) / total
        return [float(table[-(1 + int(x * ss))]) for x in range(total)] + [0.0]
    lo, hi, rho = float(table[0]), float(table[-1]), 7.0
    ramp = torch.linspace(0, 1, total, dtype=torch.float64)
    sig = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    return [float(s) for s in sig.float()] + [0.0]


def _reference(pipe, texts, latent, mask, scheduler: str, steps=5, denoise=0.8) -> torch.Tensor:
    """ComfyUI's KSampler (euler) with DifferentialDiffusion, written from its rule: at each model call the mask is
    (grey >= (t(sigma) - t_to) / (t_from - t_to)); the model reads x * m + (latent + noise * sigma) * (1 - m), its
    x0 becomes x0 * m + latent * (1 - m); Euler's step on the sampler's own x. The network's x0 comes from a
    one-step euler run to 0 without added noise (x + (x - x0) / s * (0 - s))."""
    pos, neg = texts
    total = int(steps / denoise)
    sigmas = _comfy_sigmas(pipe, scheduler, total)[-(steps + 1) :]
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    soft = F.interpolate(mask.reshape(-1, 1, 64, 64), size=latent.shape[-2:], mode="bilinear")
    log_sigmas = pipe.noise_schedule.sigmas.float().log()
    t_from = _comfy_timestep(log_sigmas, sigmas[0])
    t_to = _comfy_timestep(log_sigmas, max(float(pipe.noise_schedule.sigmas[0]), sigmas[-1]))

    def x0(x: torch.Tensor, s: float) -> torch.Tensor:
        with torch.inference_mode():
            return sample_latents(pipe, pos, neg, x, seed=0, steps=1, cfg=3.0, sigmas=torch.tensor([s, 0.0]),
                                  add_noise=False)  # fmt: skip

    x = latent + noise * sigmas[0]
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        threshold = torch.tensor(_comfy_timestep(log_sigmas, s) - t_to) / torch.tensor(t_from - t_to)
        m = (soft >= threshold).float()
        den = x0(x * m + (latent + noise * s) * (1 - m), s) * m + latent * (1 - m)
        x = x + (x - den) / s * (s_next - s)
    return x


@pytest.mark.parametrize("scheduler", ["simple", "karras"])
def test_a_grey_mask_follows_comfyuis_rule_step_by_step(sd1, texts, scheduler):
    """simple: the last call's threshold is above 0; karras ends at sigma_min, timestep 0, where the threshold is 0
    and the whole latent takes the last step (as in ComfyUI)."""
    latent, mask = _latent(), _grey_mask()
    got = _node(sd1, texts, latent, mask, differential=1.0, scheduler=scheduler)
    want = _reference(sd1, texts, latent, mask, scheduler)
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    plain = _node(sd1, texts, latent, mask, differential=None, scheduler=scheduler)
    assert (got - plain).abs().max() > 1e-2  # the grey levels count


def test_a_binary_mask_is_plain_inpainting(sd1, texts):
    """On a 0 / 1 mask the rule repaints the 1s from the start and keeps the 0s while the threshold is above 0:
    exactly SetLatentNoiseMask's inpainting (simple's last threshold, 6 steps of which 5 run, is 166 / 833)."""
    latent, mask = _latent(), _block_mask()
    got = _node(sd1, texts, latent, mask, differential=1.0, scheduler="simple")
    assert torch.equal(got, _node(sd1, texts, latent, mask, differential=None, scheduler="simple"))
    # ComfyUI's normal list ends at sigma_min: its last step repaints the 0s too, a little
    dd = _node(sd1, texts, latent, mask, differential=1.0, scheduler="normal")
    plain = _node(sd1, texts, latent, mask, differential=None, scheduler="normal")
    keep = F.interpolate(mask[None], size=(8, 8)) < 0.5
    assert torch.equal(plain[keep.expand_as(plain)], latent[keep.expand_as(latent)])
    assert 0 < (dd - plain).abs().max() < 0.5


def test_grey_level_0_keeps_the_init_latent_and_1_repaints_fully(sd1, texts):
    latent = _latent()
    zeros, ones = torch.zeros(1, 64, 64), torch.ones(1, 64, 64)
    assert torch.equal(_node(sd1, texts, latent, zeros, differential=1.0, scheduler="simple"), latent)
    full = _node(sd1, texts, latent, ones, differential=1.0, scheduler="simple")
    assert torch.equal(full, _node(sd1, texts, latent, None, differential=None, scheduler="simple"))
    # without a noise mask the node changes nothing (ComfyUI calls its function on a mask only)
    assert torch.equal(_node(sd1, texts, latent, None, differential=1.0, scheduler="simple"), full)


def test_strength_blends_the_binary_mask_with_the_grey_one(sd1, texts):
    """strength 0.5: each call's mask is 0.5 * binary + 0.5 * grey; strength 0 is 1's (ComfyUI's
    ``if strength and strength < 1``)."""
    from sdengine.pipeline.latents import DifferentialMask

    soft = torch.tensor([0.0, 0.25, 0.5, 1.0])
    rule = DifferentialMask.over(soft, sd1.noise_schedule, 5.0, 0.0, 0.5)
    s = float(sd1.noise_schedule.sigmas[600])  # timestep 600 of a run from t(5.0)
    t_from = _comfy_timestep(sd1.noise_schedule.sigmas.float().log(), 5.0)
    threshold = 600 / t_from
    want = 0.5 * (soft >= threshold).float() + 0.5 * soft
    assert torch.allclose(rule.at(s), want)
    latent, mask = _latent(), _grey_mask()
    one = _node(sd1, texts, latent, mask, differential=1.0, scheduler="simple")
    assert torch.equal(_node(sd1, texts, latent, mask, differential=0.0, scheduler="simple"), one)
    half = _node(sd1, texts, latent, mask, differential=0.5, scheduler="simple")
    assert (half - one).abs().max() > 1e-3


def test_the_node_is_listed_and_checks_its_strength(sd1):
    node = NODES["DifferentialDiffusion"]
    assert node.outputs == ("MODEL",) and [i.name for i in node.inputs] == ["model", "strength"]
    with pytest.raises(NodeError, match="strength must be in"):
        differential_diffusion(_ctx(sd1), ModelHandle("tiny"), 1.5)


def test_flow_models_follow_the_rule_in_their_sigma():
    """SD3 / Flux (ComfyUI's ModelSamplingDiscreteFlow: timestep = sigma * multiplier): the same rule on a stand-in
    network v(x, t), against the loop written from it."""
    from sdengine.diffusion.flow import FlowSchedule

    def net(x: torch.Tensor, t: torch.Tensor, **cond: torch.Tensor) -> torch.Tensor:
        return 0.5 * x - 0.2 + 0.0004 * t.reshape(-1, 1, 1, 1) * x.flip(-1)

    schedule = FlowSchedule.sd3(3.0)
    model = FlowModel(net, schedule, 4, torch.device("cpu"), "stand-in")
    pos, neg = [TextCondition({"crossattn": torch.zeros(1, 2, 8)})], [TextCondition({"crossattn": torch.ones(1, 2, 8)})]
    latent, mask = _latent(), _grey_mask()
    sigmas = torch.tensor([0.9, 0.7, 0.5, 0.3, 0.1, 0.0])
    with torch.inference_mode():
        got = sample_flow_latents(
            model, pos, neg, latent, sigmas, seed=SEED, cfg=1.0, noise_mask=mask, differential=1.0
        )
        plain = sample_flow_latents(model, pos, neg, latent, sigmas, seed=SEED, cfg=1.0, noise_mask=mask)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(SEED))
    soft = F.interpolate(mask.reshape(-1, 1, 64, 64), size=(8, 8), mode="bilinear")
    sigma_min = torch.tensor(3.0 * 0.001 / (1 + 2.0 * 0.001))  # the table's first: shift u / (1 + (shift - 1) u)
    s_list = sigmas.tolist()
    x = s_list[0] * noise + (1 - s_list[0]) * latent
    for s, s_next in zip(s_list[:-1], s_list[1:], strict=True):
        threshold = (torch.tensor(s) * 1000 - sigma_min * 1000) / (torch.tensor(s_list[0]) * 1000 - sigma_min * 1000)
        m = (soft >= threshold).float()
        xin = x * m + (s * noise + (1 - s) * latent) * (1 - m)
        den = (xin - s * net(xin, torch.tensor([s * 1000.0]))) * m + latent * (1 - m)
        x = x + (x - den) / s * (s_next - s)
    assert torch.allclose(got, x, atol=1e-5), (got - x).abs().max()
    assert (got - plain).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------- the Python API


def _picture() -> Image.Image:
    a = np.zeros((32, 32, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 32, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(255, 0, 32, dtype=np.uint8)[:, None]
    a[8:20, 10:26, 2] = 200
    return Image.fromarray(a)


def _grey_mask_image() -> Image.Image:
    a = np.tile(np.linspace(0, 255, 32).round().astype(np.uint8)[None, :], (32, 1))
    a[24:, :] = 0
    a[4:12, 20:28] = 255
    return Image.fromarray(a, "L")


def test_the_python_api_equals_the_comfyui_node_under_sdengines_seed_rule(sd1):
    """The pipeline's differential_diffusion and the node (VAEEncode -> SetLatentNoiseMask -> KSampler, the
    server's sdengine seed rule, as for plain inpainting) give the same image; the infotext names the option."""
    kw = dict(steps=4, seed=SEED, cfg_scale=5.0, sampler="dpmpp_2m", schedule="karras", progress=False)
    res = sd1("a red apple", "", init_image=_picture(), mask=_grey_mask_image(), strength=0.8,
              differential_diffusion=1.0, **kw)  # fmt: skip
    ctx = _ctx(sd1, "sdengine")
    (lat,) = vae_encode(ctx, image_to_tensor(_picture()), VaeHandle("tiny"))
    mask = torch.from_numpy(np.asarray(_grey_mask_image(), dtype=np.float32) / 255.0)[None]
    (lat,) = set_latent_noise_mask(ctx, lat, mask)
    (handle,) = differential_diffusion(ctx, ModelHandle("tiny"), 1.0)
    pos, neg = [encode_text(sd1, "a red apple")], [encode_text(sd1, "")]
    with torch.inference_mode():
        (out,) = ksampler(ctx, model=handle, seed=SEED, steps=4, cfg=5.0, sampler_name="dpmpp_2m", scheduler="karras",
                          positive=pos, negative=neg, latent_image=lat, denoise=0.8)  # fmt: skip
        (images,) = vae_decode(ctx, out, VaeHandle("tiny"))
    assert np.array_equal(np.asarray(tensor_to_pil(images)[0]), np.asarray(res.images[0]))
    assert "Differential diffusion: 1" in res.infotexts[0]
    plain = sd1("a red apple", "", init_image=_picture(), mask=_grey_mask_image(), strength=0.8, **kw)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(res.images[0]))
    assert "Differential diffusion" not in plain.infotexts[0]


def test_the_infotext_reads_back_and_bad_values_are_refused(sd1):
    from sdengine.metadata import MetadataError, parse_parameters, to_generate_kwargs

    text = "a red apple\nSteps: 4, Sampler: Euler, CFG scale: 5, Seed: 5, Size: 32x32, Differential diffusion: 0.5"
    assert to_generate_kwargs(parse_parameters(text))["differential_diffusion"] == 0.5
    with pytest.raises(MetadataError, match="Differential diffusion"):
        to_generate_kwargs(parse_parameters(text.replace("0.5", "2")))
    picture, mask = _picture(), _grey_mask_image()
    with pytest.raises(GenerationError, match="needs a mask"):
        sd1("x", init_image=picture, differential_diffusion=1.0, steps=2, progress=False)
    with pytest.raises(GenerationError, match=r"differential_diffusion must be a number in \[0, 1\]"):
        sd1("x", init_image=picture, mask=mask, differential_diffusion=1.5, steps=2, progress=False)
    with pytest.raises(GenerationError, match="strength_rule 'a1111'"):
        sd1("x", init_image=picture, mask=mask, differential_diffusion=1.0, strength_rule="a1111", steps=2,
            progress=False)  # fmt: skip


def test_a_nine_channel_inpainting_model_is_refused(tiny_inpaint_folder):
    pipe = load_pipeline(tiny_inpaint_folder, device="cpu")
    with pytest.raises(SdengineError, match="9-channel"):
        pipe("x", init_image=_picture(), mask=_grey_mask_image(), differential_diffusion=1.0, steps=2, progress=False)


def test_the_cli_flag_and_from_png_reproduce_the_image(tiny_sd1_folder, tmp_path, capsys):
    from sdengine.cli import main

    init, mask, png, again = (tmp_path / n for n in ("init.png", "mask.png", "a.png", "b.png"))
    _picture().save(init)
    _grey_mask_image().save(mask)
    common = ["--model", str(tiny_sd1_folder), "--init-image", str(init), "--mask", str(mask), "--no-progress"]
    args = ["a cat", "--steps", "4", "--sampler", "euler", "--seed", "3", "--strength", "0.7", *common]
    assert main(["generate", *args, "--differential-diffusion", "--out", str(png)]) == 0
    assert "Differential diffusion: 1" in Image.open(png).info["parameters"]
    capsys.readouterr()
    assert main(["generate", "--from-png", str(png), *common, "--out", str(again)]) == 0
    assert "not reproduced" not in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(again)))
    # the flag without a mask: one line, nothing written
    rc = main(["generate", "a cat", "--model", str(tiny_sd1_folder), "--differential-diffusion", "0.5", "--out",
               str(tmp_path / "c.png"), "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "--differential-diffusion" in err and "--mask" in err, err
    assert not (tmp_path / "c.png").exists()


def test_the_native_job_field_is_bounded():
    pydantic = pytest.importorskip("pydantic")
    from sdengine.server.schemas import JobRequest

    assert JobRequest.model_validate({"prompt": "x", "differential_diffusion": 0.5}).differential_diffusion == 0.5
    for bad in (2.0, -0.1, float("nan")):
        with pytest.raises(pydantic.ValidationError, match="differential_diffusion"):
            JobRequest.model_validate({"prompt": "x", "differential_diffusion": bad})


def test_a_native_job_runs_it_as_the_python_api(tmp_path):
    """POST /v1/jobs with an uploaded init image and grey mask and differential_diffusion: the Python API's image,
    the infotext field; a job without a mask is a 400 naming the setting."""
    import httpx

    from _live_server import live_server, run_job, server_config, shared_loader

    def png(im: Image.Image) -> bytes:
        import io

        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    init = _picture().resize((64, 64))
    mask = _grey_mask_image().resize((64, 64))
    with live_server(server_config(tmp_path, max_queue=4)) as server, httpx.Client(base_url=server.url) as c:
        ids = [c.post("/v1/uploads", content=png(im), headers={"content-type": "image/png"}).json()["id"]
               for im in (init, mask)]  # fmt: skip
        body = {"prompt": "a red apple", "steps": 3, "width": 64, "height": 64, "seed": 7, "strength": 0.8,
                "init_image": ids[0], "mask": ids[1], "differential_diffusion": 1.0}  # fmt: skip
        pixels, job = run_job(c, body)
        assert "Differential diffusion: 1" in job["infotexts"][0]
        r = c.post("/v1/jobs", json={**body, "mask": None})
        assert r.status_code == 400 and "differential_diffusion needs a mask" in r.text, r.text
    ref = shared_loader("emoji", "cpu")(progress=False, **{**body, "init_image": init, "mask": mask})
    np.testing.assert_array_equal(pixels, np.asarray(ref.images[0]))


def test_a_comfyui_prompt_with_the_node_validates_and_runs(sd1, tmp_path):
    """The node in a prompt: without `strength` (older ComfyUI's node) it validates and runs at strength 1, the
    KSampler after it differs from the plain one on a grey mask; a strength over 1 is a validation error."""
    import threading

    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import Executor, PromptInvalid, validate
    from sdengine.server.comfy.nodes import Outputs

    catalog = Catalog(None, None, None)  # the built-in names; the worker's pipeline is the tiny SD 1.x
    folders = Outputs(tmp_path / "out", tmp_path / "in", tmp_path / "temp")
    env = type("Env", (), {"catalog": catalog, "folders": folders, "limits": {}})()

    def sampler(model: list) -> dict:
        return {"class_type": "KSampler", "inputs": {
            "model": model, "seed": SEED, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["7", 0], "denoise": 1.0}}  # fmt: skip

    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "DifferentialDiffusion", "inputs": {"model": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a star", "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "SolidMask", "inputs": {"value": 0.6, "width": 32, "height": 32}},
        "7": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["6", 0]}},
        "8": sampler(["2", 0]),
        "9": sampler(["1", 0]),
    }
    for k, s in (("11", "8"), ("12", "9")):
        g[f"d{k}"] = {"class_type": "VAEDecode", "inputs": {"samples": [s, 0], "vae": ["1", 2]}}
        g[k] = {"class_type": "PreviewImage", "inputs": {"images": [f"d{k}", 0]}}
    try:
        graph, outputs, errors = validate(g, env)
    except PromptInvalid as e:
        raise AssertionError(e.body) from None
    assert sorted(outputs) == ["11", "12"] and not errors, errors
    ctx = RunContext(pipeline=lambda ref: sd1, catalog=catalog, folders=folders, device="cpu",
                     save_lock=threading.Lock())  # fmt: skip
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    dd, plain = (ex.cache[n].outputs[0]["samples"] for n in ("8", "9"))
    assert (dd - plain).abs().max() > 1e-2
    bad = {**g, "2": {**g["2"], "inputs": {"model": ["1", 0], "strength": 1.5}}}
    _, outputs, errors = validate(bad, env)  # the other output still runs, as ComfyUI
    assert outputs == ["12"] and errors["2"]["errors"][0]["type"] == "value_bigger_than_max", errors


def test_an_sd3_pipeline_takes_it_in_the_flows_sigma(tmp_path):
    """SD3 (a flow model: ComfyUI's timestep sigma * 1000) on the pipeline's own loop: a binary mask gives its plain
    inpainting (to float rounding: plain inpainting does not blend before the first call), a grey one another image,
    and the black band the init image's pixels as plain inpainting keeps them."""
    pytest.importorskip("diffusers")  # the tiny folder is written by diffusers' classes
    from _sd3_models import make_sd3_folder

    pipe = load_pipeline(make_sd3_folder(tmp_path / "tiny-sd3"), device="cpu")
    kw = dict(steps=4, seed=3, width=32, height=32, progress=False, init_image=_picture(), strength=0.8)
    block = np.zeros((32, 32), np.uint8)
    block[8:24, 8:24] = 255
    plain = pipe("x", mask=Image.fromarray(block, "L"), **kw)
    dd = pipe("x", mask=Image.fromarray(block, "L"), differential_diffusion=1.0, **kw)
    assert np.abs(plain.arrays - dd.arrays).max() < 1e-4
    grey = pipe("x", mask=_grey_mask_image(), differential_diffusion=1.0, **kw)
    assert np.abs(grey.arrays - plain.arrays).max() > 1e-2
    assert "Differential diffusion: 1" in grey.infotexts[0] and "Shift: 3" in grey.infotexts[0]
