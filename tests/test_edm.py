"""SDXL models trained with EDM noise conditioning (sdengine.diffusion.edm): Playground v2.5-like (EDM "epsilon", the
VAE's latents_mean / latents_std), CosXL-like (EDM v-prediction) and CosXL Edit-like (the same on an 8-channel
instruct-pix2pix U-Net) tiny random models, against diffusers' StableDiffusionXLPipeline /
StableDiffusionXLInstructPix2PixPipeline(is_cosxl_edit=True) with EDMEulerScheduler and
EDMDPMSolverMultistepScheduler (the oracle); single files with ComfyUI's markers both ways (docs/edm.md).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _ip2p import comfy_and_pipeline_latents, mad  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.diffusion.edm import COSXL_SCHEDULER, PLAYGROUND_SCHEDULER, EDMDenoiser, EDMSchedule, edm_grid  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels
SIZE, STEPS, SEED = 32, 6, 4
PROMPT, NEGATIVE = "a red fox in the snow", "blurry"
# Playground v2.5's VAE statistics (its vae/config.json) and scaling factor
PLAYGROUND_MEAN = [-1.6574, 1.886, -1.383, 2.5155]
PLAYGROUND_STD = [8.4927, 5.9022, 6.5498, 5.2299]


def _edm_folder(dst: Path, kind: str) -> Path:
    """A tiny SDXL folder made EDM: "playground" (eps, EDMDPMSolverMultistepScheduler, VAE stats), "cosxl" (v,
    EDMEulerScheduler), "cosxl_edit" (the same, 8-channel instruct-pix2pix U-Net)."""
    folder = make_sdxl_folder(dst, ip2p=kind == "cosxl_edit", seed=11)
    sched = dict(PLAYGROUND_SCHEDULER if kind == "playground" else COSXL_SCHEDULER)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched), encoding="utf-8")
    if kind == "playground":
        vae_cfg = folder / "vae" / "config.json"
        cfg = json.loads(vae_cfg.read_text(encoding="utf-8"))
        cfg.update(latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD, scaling_factor=0.5)
        vae_cfg.write_text(json.dumps(cfg), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("edm")
    out = {}
    for kind in ("playground", "cosxl", "cosxl_edit"):
        folder = _edm_folder(root / kind, kind)
        out[kind] = (folder, sdengine.load_pipeline(folder, device="cpu", fast_path="none"))
    return out


def _scheduler(folder: Path, cls_name: str, sigma_schedule: str) -> Any:
    import diffusers

    cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    cfg.pop("_class_name")
    if cls_name == "EDMEulerScheduler":
        cfg = {k: v for k, v in cfg.items() if k not in ("solver_order",)}
    cfg["sigma_schedule"] = sigma_schedule
    return getattr(diffusers, cls_name)(**cfg)


def _theirs(
    folder: Path, cls_name: str, sigma_schedule: str, ip2p: bool = False, image: Any = None, cosxl_edit: bool = True
) -> np.ndarray:
    ref = diffusers_sdxl(folder, ip2p=ip2p)
    ref.scheduler = _scheduler(folder, cls_name, sigma_schedule)
    kw: dict[str, Any] = {}
    if ip2p:
        ref.is_cosxl_edit = cosxl_edit
        kw = dict(image=image, image_guidance_scale=1.5)
    out = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        height=SIZE,
        width=SIZE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        **kw,
    )
    return out.images[0]


def _settings(sampler: str, schedule: str, **kw: Any) -> dict[str, Any]:
    """A request's keywords besides the prompts: the tests' steps, CFG, seed and size unless ``kw`` says."""
    args = dict(steps=STEPS, sampler=sampler, schedule=schedule, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE)
    return {**args, "progress": False, **kw}


def _ours(pipe: Any, sampler: str, schedule: str, **kw: Any) -> np.ndarray:
    img = pipe(PROMPT, NEGATIVE, **_settings(sampler, schedule, **kw)).images[0]
    return np.asarray(img, dtype=np.float64) / 255.0


def _ours_float(pipe: Any, sampler: str, schedule: str, **kw: Any) -> np.ndarray:
    from sdengine.pipeline.request import GenerationRequest

    p = pipe.prepare(GenerationRequest(PROMPT, NEGATIVE, **_settings(sampler, schedule, **kw)))
    x = pipe.sample_latents(p)
    return pipe.decode_latents(p, x)[0].permute(1, 2, 0).double().numpy()


@pytest.mark.parametrize(
    ("kind", "cls_name", "sampler", "schedule", "sigma_schedule"),
    [
        ("playground", "EDMDPMSolverMultistepScheduler", "dpmpp_2m", "normal", "karras"),
        ("playground", "EDMEulerScheduler", "euler", "karras", "karras"),
        ("playground", "EDMEulerScheduler", "euler", "exponential", "exponential"),
        ("cosxl", "EDMEulerScheduler", "euler", "normal", "karras"),
        ("cosxl", "EDMEulerScheduler", "euler", "exponential", "exponential"),
        ("cosxl", "EDMDPMSolverMultistepScheduler", "dpmpp_2m", "karras", "karras"),
    ],
)
def test_edm_txt2img_matches_diffusers(models, kind, cls_name, sampler, schedule, sigma_schedule):
    folder, pipe = models[kind]
    if cls_name != pipe.scheduler_config["_class_name"]:  # the same model with the other EDM scheduler's config
        other = folder.parent / f"{folder.name}-{cls_name}"
        if not other.exists():
            shutil.copytree(folder, other)
            cfg = json.loads((folder / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
            cfg["_class_name"] = cls_name
            (other / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg), encoding="utf-8")
        folder, pipe = other, sdengine.load_pipeline(other, device="cpu", fast_path="none")
    theirs = _theirs(folder, cls_name, sigma_schedule)
    ours = _ours_float(pipe, sampler, schedule)
    assert mad(ours, theirs) < TOL


def test_cosxl_edit_matches_diffusers_is_cosxl_edit(models):
    folder, pipe = models["cosxl_edit"]
    image = picture(SIZE, SIZE)
    theirs = _theirs(folder, "EDMEulerScheduler", "karras", ip2p=True, image=image)
    ours = _ours_float(pipe, "euler", "normal", init_image=image, image_cfg_scale=1.5)
    assert mad(ours, theirs) < TOL
    # the image latent's scaling is what makes it CosXL Edit (seen: 5e-2 apart without it)
    unscaled = _theirs(folder, "EDMEulerScheduler", "karras", ip2p=True, image=image, cosxl_edit=False)
    assert mad(ours, unscaled) > 100 * TOL


def _foreign_file(folder: Path, dst: Path) -> Path:
    """The folder as a single file whose metadata says nothing of EDM (as ComfyUI or Stability would ship it): no
    scheduler config, a VAE config without latent statistics; only the markers say what it is. (The tiny networks'
    configs stay in the metadata: their widths cannot be read off the shapes as SDXL's own.)"""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from sdengine.weights import convert

    ours = convert(folder, dst.with_name(dst.stem + "-sdengine.safetensors"))
    with safe_open(str(ours), "pt") as f:
        meta = dict(f.metadata())
    cfgs = json.loads(meta["sdengine.configs"])
    cfgs.pop("scheduler")
    for key in ("latents_mean", "latents_std"):
        cfgs["vae"].pop(key, None)
    cfgs["vae"]["scaling_factor"] = 0.13025
    save_file(load_file(ours), dst, metadata={"format": "pt", "sdengine.configs": json.dumps(cfgs)})
    return dst


@pytest.mark.parametrize("kind", ["playground", "cosxl"])
def test_single_files_carry_the_edm_markers_both_ways(models, tmp_path, kind):
    from safetensors.torch import load_file

    from sdengine.weights import convert

    folder, _ = models[kind]
    sd = load_file(_foreign_file(folder, tmp_path / f"{kind}.safetensors"))
    assert "v_pred" not in sd
    if kind == "cosxl":
        assert float(sd["edm_vpred.sigma_max"]) == 120.0 and float(sd["edm_vpred.sigma_min"]) == pytest.approx(0.002)
        assert "edm_mean" not in sd
    else:
        assert sd["edm_mean"].reshape(-1).tolist() == pytest.approx(PLAYGROUND_MEAN)
        assert sd["edm_std"].reshape(-1).tolist() == pytest.approx(PLAYGROUND_STD)
        assert "edm_vpred.sigma_max" not in sd
    # the markers alone make it the EDM model it was: the same images as diffusers' run of the folder
    pipe = sdengine.load_pipeline(tmp_path / f"{kind}.safetensors", device="cpu", fast_path="none")
    sched = pipe.noise_schedule
    assert isinstance(sched, EDMSchedule)
    if kind == "cosxl":
        assert (sched.prediction, sched.sigma_max, sched.sigma_data) == ("v_prediction", 120.0, 1.0)
    else:
        assert (sched.prediction, sched.sigma_max, sched.sigma_data) == ("epsilon", 80.0, 0.5)
        assert list(pipe.vae.config.latents_mean) == pytest.approx(PLAYGROUND_MEAN)
    cls_name = "EDMEulerScheduler" if kind == "cosxl" else "EDMDPMSolverMultistepScheduler"
    sampler = "euler" if kind == "cosxl" else "dpmpp_2m"
    assert mad(_ours_float(pipe, sampler, "normal"), _theirs(folder, cls_name, "karras")) < TOL
    # back to a folder: the EDM scheduler config and the VAE's statistics; and to a single file again: the markers
    back = convert(tmp_path / f"{kind}.safetensors", tmp_path / f"{kind}-folder")
    cfg = json.loads((back / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    assert cfg["_class_name"] == cls_name and cfg["prediction_type"] == pipe.scheduler_config["prediction_type"]
    vae_cfg = json.loads((back / "vae" / "config.json").read_text(encoding="utf-8"))
    assert ("latents_mean" in vae_cfg) == (kind == "playground")
    again = load_file(convert(back, tmp_path / f"{kind}-again.safetensors"))
    assert {k for k in again if k.startswith("edm")} == {k for k in sd if k.startswith("edm")}


def test_edm_refusals_are_one_line(models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder, pipe = models["cosxl"]
    for sampler in ("ddim", "plms", "lcm", "ddpm"):
        with pytest.raises(SdengineError, match=f"sampler '{sampler}' cannot run on an EDM model") as err:
            _ours(pipe, sampler, "normal")
        assert "\n" not in str(err.value)
    with pytest.raises(SdengineError, match="EDM models cannot use schedule 'ddim_uniform'"):
        _ours(pipe, "euler", "ddim_uniform")
    with pytest.raises(SdengineError, match="zero_terminal_snr rescales a VP schedule"):
        _ours(pipe, "euler", "normal", zero_terminal_snr=True)
    with pytest.raises(SdengineError, match="shift applies to flow models"):
        _ours(pipe, "euler", "normal", shift=3.0)
    # a marker that cannot be read, and a half of Playground's pair
    sd = load_file(_foreign_file(folder, tmp_path / "cosxl.safetensors"))
    for bad, match in (
        ({"edm_vpred.sigma_max": torch.tensor([1.0, 2.0])}, "edm_vpred.sigma_max must be one finite number"),
        ({"edm_vpred.sigma_max": torch.tensor(0.001)}, "edm_vpred.sigma_min 0.002.* is not below"),
    ):
        save_file({**sd, **bad}, tmp_path / "bad.safetensors")
        with pytest.raises(SdengineError, match=match) as err:
            sdengine.load_pipeline(tmp_path / "bad.safetensors", device="cpu")
        assert "\n" not in str(err.value)
    half = {k: v for k, v in sd.items() if not k.startswith("edm_vpred")}
    save_file({**half, "edm_mean": torch.zeros(1, 4, 1, 1)}, tmp_path / "half.safetensors")
    with pytest.raises(SdengineError, match="EDM marker edm_mean without its partner"):
        sdengine.load_pipeline(tmp_path / "half.safetensors", device="cpu")


def test_edm_scheduler_options_sdengine_does_not_follow_are_refused():
    from sdengine.errors import UsageError

    for key, value in (("final_sigmas_type", "sigma_min"), ("algorithm_type", "sde-dpmsolver++"), ("solver_order", 3)):
        with pytest.raises(UsageError, match=f"EDM scheduler option {key}="):
            EDMSchedule.from_config({**PLAYGROUND_SCHEDULER, key: value})
    with pytest.raises(UsageError, match="EDM models predict"):
        EDMSchedule.from_config({**PLAYGROUND_SCHEDULER, "prediction_type": "sample"})
    # an EDM model the single file's markers cannot describe is not written as one
    from sdengine.weights.io import WeightsError
    from sdengine.weights.sdxl_files import edm_markers

    playground_vae = {"latents_mean": PLAYGROUND_MEAN, "latents_std": PLAYGROUND_STD, "scaling_factor": 0.5}
    assert set(edm_markers(PLAYGROUND_SCHEDULER, playground_vae)) == {"edm_mean", "edm_std"}
    for sched, vae in (
        (PLAYGROUND_SCHEDULER, {"scaling_factor": 0.5}),  # no latent statistics
        ({**PLAYGROUND_SCHEDULER, "sigma_max": 120.0}, playground_vae),  # not Playground's sampling
        ({**COSXL_SCHEDULER, "sigma_data": 0.5}, None),  # edm_vpred.* carry sigma_data 1 only
    ):
        with pytest.raises(WeightsError) as err:
            edm_markers(sched, vae)
        assert "\n" not in str(err.value)


def test_edm_denoiser_is_exact_on_gaussian_data():
    """With data N(0, sigma_data^2 I) the ideal x0 is ``sigma_data^2 / (sigma^2 + sigma_data^2) x``: c_skip x, so
    the ideal network answers 0 (F) whatever the prediction; a network answering the true v / F target at a known
    x0 gives that x0 back for both predictions."""
    sched = EDMSchedule(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    x0, n = torch.randn(2, 4, 8, 8) * 0.5, torch.randn(2, 4, 8, 8)
    for prediction in ("epsilon", "v_prediction"):
        s = EDMSchedule(sigma_data=0.5, prediction=prediction)
        for sigma in (0.01, 1.0, 30.0):
            x = x0 + sigma * n
            c_skip, c_out, _ = s.scalings(torch.tensor(sigma))
            target = (x0 - c_skip * x) / c_out  # the F (or -F) that makes x0

            def net(xin, t, _target=target, _sigma=sigma):
                assert torch.allclose(t, torch.full_like(t, 0.25 * np.log(_sigma)), atol=1e-6)
                return _target

            assert torch.allclose(EDMDenoiser(net, s)(x, sigma), x0, atol=1e-5)
    grid = edm_grid(sched, 10, "karras")
    assert float(grid.sigmas[0]) == pytest.approx(80.0) and float(grid.sigmas[-2]) == pytest.approx(0.002)
    assert float(grid.sigmas[-1]) == 0.0
    assert torch.allclose(grid.timesteps, 0.25 * grid.sigmas[:-1].log())
    # ComfyUI's normal_scheduler on a continuous EDM model is log-linear between the table's ends: its exponential
    comfy_normal = edm_grid(sched, 10, "normal", comfy=True).sigmas
    assert torch.allclose(comfy_normal, edm_grid(sched, 10, "exponential", comfy=True).sigmas, rtol=1e-5)
    assert torch.allclose(comfy_normal, edm_grid(sched, 10, "exponential").sigmas, rtol=1e-5)
    assert float(sched.sigmas[0]) == pytest.approx(0.002) and float(sched.sigmas[-1]) == pytest.approx(80.0)


def test_comfyuis_nodes_sample_the_cosxl_edit_model_as_the_pipeline(models):
    """ComfyUI's InstructPixToPixConditioning + KSampler path (sdengine.latent_sampling) on an EDM model: EDM's
    preconditioning and the image latent scaled as ComfyUI's CosXL rule; the same latents as the pipeline (two-way
    guidance: image_cfg_scale 1)."""
    _, pipe = models["cosxl_edit"]
    z, ours, _ = comfy_and_pipeline_latents(
        pipe, picture(SIZE, SIZE), cfg=5.0, schedule="karras", prompt=PROMPT, negative=NEGATIVE, seed=SEED,
        steps=STEPS, size=SIZE,
    )  # fmt: skip
    assert float((z - ours).abs().max()) < 1e-4
    assert float(ours.abs().mean()) > 0.1  # a real latent, not zeros


@pytest.mark.parametrize(
    ("kind", "cls_name", "sampler"),
    [("playground", "EDMDPMSolverMultistepScheduler", "dpmpp_2m"), ("cosxl", "EDMEulerScheduler", "euler")],
)
def test_edm_img2img_matches_diffusers(models, kind, cls_name, sampler):
    """img2img: the init encoded into the model's latents (Playground's statistics too), noised as ``latent +
    sigma noise`` at the start step; diffusers' StableDiffusionXLImg2ImgPipeline as the oracle (seen: 5e-7)."""
    folder, pipe = models[kind]
    image = picture(SIZE, SIZE)
    ref = diffusers_sdxl(folder, img2img=True)
    ref.scheduler = _scheduler(folder, cls_name, "karras")
    theirs = ref(
        PROMPT,
        negative_prompt=NEGATIVE,
        image=image,
        strength=0.6,
        num_inference_steps=STEPS,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
    ).images[0]
    ours = _ours_float(pipe, sampler, "normal", init_image=image, strength=0.6)
    assert mad(ours, theirs) < TOL


def test_playground_vae_given_apart_keeps_the_models_latent_statistics(models, tmp_path, caplog):
    """The latent format is the model's (ComfyUI's rule): Playground's own VAE given apart as a file (no config),
    at load time (folder and single file) and per call (``set_vae``), keeps its latents_mean / latents_std and
    scaling 0.5, so the image is the model's; a VAE folder with none (SDXL's scaling) or other statistics takes
    the model's too (the other ones logged)."""
    folder, pipe = models["playground"]
    vae_file = tmp_path / "playground_vae.safetensors"  # diffusers' key names, no config beside it
    shutil.copy(folder / "vae" / "diffusion_pytorch_model.safetensors", vae_file)
    own = _ours_float(pipe, "dpmpp_2m", "normal")
    single = tmp_path / "playground.safetensors"
    _foreign_file(folder, single)
    for source in (folder, single):
        apart = sdengine.load_pipeline(source, device="cpu", fast_path="none", vae=vae_file)
        assert apart.vae_source == vae_file
        assert list(apart.vae.config.latents_mean) == pytest.approx(PLAYGROUND_MEAN)
        assert list(apart.vae.config.latents_std) == pytest.approx(PLAYGROUND_STD)
        assert apart.vae.config.scaling_factor == 0.5
        np.testing.assert_allclose(_ours_float(apart, "dpmpp_2m", "normal"), own, atol=1e-5, rtol=0)
    try:
        pipe.set_vae(vae_file)  # per call (the server's job vae)
        assert pipe.vae is not models["playground"][1].__dict__["_base_vae"][0]
        np.testing.assert_allclose(_ours_float(pipe, "dpmpp_2m", "normal"), own, atol=1e-5, rtol=0)
    finally:
        pipe.set_vae(None)
    # VAE folders: none (an SDXL VAE's config, scaling 0.13025) or other statistics -> the model's format
    for name, change in (("plain", {"scaling_factor": 0.13025}), ("other", {"latents_mean": [0.0] * 4})):
        vae_dir = tmp_path / f"vae-{name}"
        shutil.copytree(folder / "vae", vae_dir)
        cfg = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
        if name == "plain":
            cfg.pop("latents_mean")
            cfg.pop("latents_std")
        cfg.update(change)
        (vae_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
        caplog.clear()
        with caplog.at_level("WARNING", logger="sdengine.weights.loading"):
            apart = sdengine.load_pipeline(folder, device="cpu", fast_path="none", vae=vae_dir)
        assert apart.vae.config.scaling_factor == 0.5
        assert list(apart.vae.config.latents_mean) == pytest.approx(PLAYGROUND_MEAN)
        assert ("differ from the model's" in caplog.text) == (name == "other"), caplog.text
        np.testing.assert_allclose(_ours_float(apart, "dpmpp_2m", "normal"), own, atol=1e-5, rtol=0)
    # a model without statistics (CosXL) does not take a VAE folder's: its latents are plain scaled
    cos_folder, cos = models["cosxl"]
    vae_dir = tmp_path / "vae-with-stats"
    shutil.copytree(cos_folder / "vae", vae_dir)
    cfg = json.loads((vae_dir / "config.json").read_text(encoding="utf-8"))
    cfg.update(latents_mean=PLAYGROUND_MEAN, latents_std=PLAYGROUND_STD)
    (vae_dir / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    apart = sdengine.load_pipeline(cos_folder, device="cpu", fast_path="none", vae=vae_dir)
    assert apart.vae.config.latents_mean is None
    np.testing.assert_allclose(_ours_float(apart, "euler", "normal"), _ours_float(cos, "euler", "normal"), atol=1e-5)


def test_comfyuis_model_sampling_continuous_edm_restating_the_model_passes_it(models):
    """ComfyUI's ModelSamplingContinuousEDM on real EDM pipelines: CosXL's own reading (v_prediction, ComfyUI's
    defaults 0.002..120) and Playground's (edm_playground_v2.5, 0.002..80) pass the model through; another reading
    of them is a one-line node error (nodes_tools.py)."""
    from sdengine.server.comfy.nodes import ModelHandle, NodeError, RunContext
    from sdengine.server.comfy.nodes_tools import model_sampling_continuous_edm

    m = ModelHandle(ref="edm")
    for kind, sampling, hi in (("cosxl", "v_prediction", 120.0), ("cosxl_edit", "v_prediction", 120.0),
                               ("playground", "edm_playground_v2.5", 80.0)):  # fmt: skip
        pipe = models[kind][1]
        ctx = RunContext(pipeline=lambda ref, pipe=pipe: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
        assert model_sampling_continuous_edm(ctx, m, sampling, hi, 0.002) == (m,)
        wrong = "edm" if kind == "playground" else "edm_playground_v2.5"
        with pytest.raises(NodeError) as e:
            model_sampling_continuous_edm(ctx, m, wrong, hi, 0.002)
        assert "\n" not in str(e.value) and "which is not supported here" in str(e.value)
