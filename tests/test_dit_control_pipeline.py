"""SD3 and Flux ControlNets end to end against diffusers' StableDiffusion3ControlNetPipeline and
FluxControlNetPipeline on tiny random components (the SD3 / Flux makers of the pipeline tests, a random ControlNet
saved by diffusers): images on 0..1 pixels within TOL (mean absolute difference), the step window, the scale,
several units, Flux Union's control mode, single files, infotext and the refusals.

The oracle's VAE encodes the control image to its posterior's mean here, as sdengine does (diffusers draws a
sample, which for Flux also takes draws from the generator the initial noise comes from)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import diffusers_flux, make_flux_folder  # noqa: E402
from _sd3_models import SIZE, diffusers_sd3, make_sd3_folder  # noqa: E402
from sdengine.control.dit_files import read_dit_controlnet  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels
SEED = 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
FW, FH = 48, 32  # Flux's tiny VAE is 2x: multiples of 4


@pytest.fixture(autouse=True)
def _posterior_mean(monkeypatch):
    from diffusers.models.autoencoders import vae as dvae

    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _randomise(model: torch.nn.Module, seed: int, scale: float) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * scale)
    return model


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    value = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    print(f"mean abs difference {value:.2e}")
    return value


def _picture(w: int, h: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _sd3_controlnet(folder: Path, dst: Path, seed: int, **extra) -> Path:
    from diffusers import SD3ControlNetModel

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update({"num_layers": 2, **extra})
    cn = SD3ControlNetModel(**cfg).eval()
    _randomise(cn, seed, 0.05)
    cn.save_pretrained(dst)
    return dst


def _flux_controlnet(folder: Path, dst: Path, seed: int, **extra) -> Path:
    from diffusers import FluxControlNetModel

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "out_channels"}
    cfg.update(num_layers=1, num_single_layers=1, **extra)
    cn = FluxControlNetModel(**cfg).eval()
    _randomise(cn, seed, 0.05)
    cn.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3c")
    folder = make_sd3_folder(root / "tiny-sd3")
    cn = _sd3_controlnet(folder, root / "sd3-cn", 11)
    cn2 = _sd3_controlnet(folder, root / "sd3-cn2", 12)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_sd3(folder), cn, cn2


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxc")
    folder = make_flux_folder(root / "tiny-flux-dev", guidance=True)
    cn = _flux_controlnet(folder, root / "flux-cn", 21)
    union = _flux_controlnet(folder, root / "flux-union", 22, num_mode=4)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder), cn, union


def _sd3_ref(ref, nets):
    from diffusers import SD3ControlNetModel, SD3MultiControlNetModel, StableDiffusion3ControlNetPipeline

    models = [SD3ControlNetModel.from_pretrained(n) for n in nets]
    cn = models[0] if len(models) == 1 else SD3MultiControlNetModel(models)
    pipe = StableDiffusion3ControlNetPipeline(**ref.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux_ref(ref, nets):
    from diffusers import FluxControlNetModel, FluxControlNetPipeline, FluxMultiControlNetModel

    models = [FluxControlNetModel.from_pretrained(n) for n in nets]
    cn = models[0] if len(models) == 1 else FluxMultiControlNetModel(models)
    pipe = FluxControlNetPipeline(**ref.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sd3_controlnet_matches_diffusers(sd3):
    folder, pipe, ref, cn, _ = sd3
    image = _picture(SIZE, SIZE)
    unit = ControlUnit(str(cn), image, scale=0.8, start=0.0, end=0.75)
    ours = pipe(
        PROMPT,
        NEGATIVE,
        steps=4,
        sampler="euler",
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        controlnets=[unit],
        progress=False,
    )
    theirs = _sd3_ref(ref, [cn])(
        PROMPT,
        negative_prompt=NEGATIVE,
        control_image=image,
        controlnet_conditioning_scale=0.8,
        control_guidance_start=0.0,
        control_guidance_end=0.75,
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images
    assert _mad(ours.arrays, theirs) <= TOL
    plain = pipe(
        PROMPT, NEGATIVE, steps=4, sampler="euler", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, progress=False
    )
    assert _mad(ours.arrays, plain.arrays) > 100 * TOL  # the ControlNet changes the image
    assert "ControlNet 0" in ours.parameters and "Weight: 0.8" in ours.parameters["ControlNet 0"]


def test_two_sd3_units_sum_as_diffusers_multi_controlnet(sd3):
    folder, pipe, ref, cn, cn2 = sd3
    a, b = _picture(SIZE, SIZE, 1), _picture(SIZE, SIZE, 2)
    units = [ControlUnit(str(cn), a, scale=0.7), ControlUnit(str(cn2), b, scale=1.2, start=0.25, end=1.0)]
    ours = pipe(
        PROMPT,
        NEGATIVE,
        steps=4,
        sampler="euler",
        cfg_scale=5.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        controlnets=units,
        progress=False,
    )
    theirs = _sd3_ref(ref, [cn, cn2])(
        PROMPT,
        negative_prompt=NEGATIVE,
        control_image=[a, b],
        controlnet_conditioning_scale=[0.7, 1.2],
        control_guidance_start=[0.0, 0.25],
        control_guidance_end=[1.0, 1.0],
        num_inference_steps=4,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images
    assert _mad(ours.arrays, theirs) <= TOL


def test_sd35_style_controlnet_without_text_matches_diffusers(sd3, tmp_path):
    folder, pipe, ref, _, _ = sd3
    cn = _sd3_controlnet(
        folder,
        tmp_path / "sd35-cn",
        13,
        joint_attention_dim=None,
        pos_embed_type=None,
        use_pos_embed=False,
        force_zeros_for_pooled_projection=False,
    )
    image = _picture(SIZE, SIZE, 4)
    ours = pipe(
        PROMPT,
        NEGATIVE,
        steps=3,
        sampler="euler",
        cfg_scale=4.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        controlnets=[ControlUnit(str(cn), image, scale=1.0)],
        progress=False,
    )
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

    ctl = SD3ControlNetModel.from_pretrained(cn)
    theirs_pipe = StableDiffusion3ControlNetPipeline(**ref.components, controlnet=ctl)
    theirs_pipe.set_progress_bar_config(disable=True)
    theirs = theirs_pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        control_image=image,
        num_inference_steps=3,
        guidance_scale=4.0,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
    ).images
    assert _mad(ours.arrays, theirs) <= TOL


def test_flux_controlnet_matches_diffusers(flux):
    folder, pipe, ref, cn, _ = flux
    image = _picture(FW, FH, 5)
    unit = ControlUnit(str(cn), image, scale=0.9, start=0.0, end=0.5)
    ours = pipe(PROMPT, steps=4, seed=SEED, width=FW, height=FH, controlnets=[unit], progress=False)
    theirs = _flux_ref(ref, [cn])(
        PROMPT,
        control_image=image,
        controlnet_conditioning_scale=0.9,
        control_guidance_start=0.0,
        control_guidance_end=0.5,
        num_inference_steps=4,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=FW,
        height=FH,
    ).images
    assert _mad(ours.arrays, theirs) <= TOL
    plain = pipe(PROMPT, steps=4, seed=SEED, width=FW, height=FH, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 100 * TOL


def test_flux_union_control_mode_matches_diffusers(flux):
    folder, pipe, ref, cn, union = flux
    image = _picture(FW, FH, 6)
    got = {}
    for mode in ("depth", 1):
        unit = ControlUnit(str(union), image, scale=1.0, union_mode=mode)
        got[mode] = pipe(PROMPT, steps=3, seed=SEED, width=FW, height=FH, controlnets=[unit], progress=False)
    theirs = _flux_ref(ref, [union])(
        PROMPT,
        control_image=image,
        control_mode=2,
        num_inference_steps=3,
        guidance_scale=3.5,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=FW,
        height=FH,
    ).images
    assert _mad(got["depth"].arrays, theirs) <= TOL
    assert _mad(got["depth"].arrays, got[1].arrays) > 1e-5  # the mode is an input (measured 1.8e-4 here)
    assert "Union Mode: depth" in got["depth"].parameters["ControlNet 0"]


def test_single_safetensors_file_loads_as_the_folder(flux, tmp_path):
    from safetensors.torch import load_file

    folder, pipe, ref, cn, union = flux
    file = tmp_path / "flux-union.safetensors"
    save_safetensors(load_file(union / "diffusion_pytorch_model.safetensors"), file)
    image = _picture(FW, FH, 7)
    args = dict(steps=2, seed=SEED, width=FW, height=FH, progress=False)
    a = pipe(PROMPT, controlnets=[ControlUnit(str(union), image, union_mode="tile")], **args)
    b = pipe(PROMPT, controlnets=[ControlUnit(str(file), image, union_mode="tile")], **args)
    assert np.array_equal(a.arrays, b.arrays)


def test_refusals_are_one_line(sd3, flux, tmp_path, tiny_sd1_folder):
    _, sd3_pipe, _, sd3_cn, _ = sd3
    _, flux_pipe, _, flux_cn, union = flux
    img = _picture(SIZE, SIZE)
    fimg = _picture(FW, FH)
    fargs = dict(steps=2, seed=SEED, width=FW, height=FH, progress=False)
    sargs = dict(steps=2, seed=SEED, width=SIZE, height=SIZE, progress=False)
    cases = [
        (
            lambda: sd3_pipe(PROMPT, controlnets=[ControlUnit(str(flux_cn), img)], **sargs),
            "is a Flux ControlNet; this model is SD3",
        ),
        (
            lambda: flux_pipe(PROMPT, controlnets=[ControlUnit(str(sd3_cn), fimg)], **fargs),
            "is a SD3 ControlNet; this model is Flux",
        ),
        (lambda: flux_pipe(PROMPT, controlnets=[ControlUnit(str(union), fimg)], **fargs), "give its union_mode"),
        (
            lambda: flux_pipe(PROMPT, controlnets=[ControlUnit(str(flux_cn), fimg, union_mode=1)], **fargs),
            "not a Union ControlNet",
        ),
        (
            lambda: flux_pipe(PROMPT, controlnets=[ControlUnit(str(union), fimg, union_mode="sketch")], **fargs),
            "unknown union_mode",
        ),
        (
            lambda: sd3_pipe(PROMPT, controlnets=[ControlUnit(str(sd3_cn), img, mode="prompt")], **sargs),
            "control mode 'prompt' is sd-webui-controlnet's soft weighting",
        ),
        (
            lambda: sd3_pipe(PROMPT, controlnets=[ControlUnit(str(sd3_cn), img, hires_mode="controlnet")], **sargs),
            "hires control mode 'controlnet' is sd-webui-controlnet's soft weighting",
        ),
        (lambda: sd3_pipe(PROMPT, controlnets=[ControlUnit("reference_only", img)], **sargs), "reference control"),
    ]
    for run, message in cases:
        with pytest.raises(SdengineError, match=message) as e:
            run()
        assert "\n" not in str(e.value)
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    net = read_dit_controlnet(sd3_cn)
    with pytest.raises(SdengineError, match="is an SD3 ControlNet; this model is a U-Net"):
        sd1("x", controlnets=[ControlUnit(net, _picture(64, 64))], steps=1, width=64, height=64, progress=False)
    with pytest.raises(SdengineError, match="holds a SD3ControlNetModel, not a ControlNetModel"):
        sd1("x", controlnets=[ControlUnit(str(sd3_cn), _picture(64, 64))], steps=1, width=64, height=64, progress=False)
    bad = tmp_path / "unet_cn.safetensors"
    save_safetensors({"controlnet_down_blocks.0.weight": torch.zeros(4, 4, 1, 1)}, bad)
    with pytest.raises(SdengineError, match="is a U-Net ControlNet"):
        sd3_pipe(PROMPT, controlnets=[ControlUnit(str(bad), img)], **sargs)


def test_cli_control_on_flux_union_equals_the_pipeline_and_writes_the_unit(flux, tmp_path):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    folder, pipe, _, _, union = flux
    hint = tmp_path / "hint.png"
    _picture(FW, FH, 8).save(hint)
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--steps", "2", "--width", str(FW)]
    args += ["--height", str(FH), "--no-progress", "--out", str(out)]
    control = ["--control", f"none:{hint}:0.9", "--controlnet", str(union), "--control-union-mode", "canny"]
    assert main([*args, *control]) == 0
    made = next(out.glob("*.png"))
    fields = parse_parameters(Image.open(made).info["parameters"])
    assert "Union Mode: canny" in fields["ControlNet 0"] and "Weight: 0.9" in fields["ControlNet 0"]
    unit = ControlUnit(str(union), Image.open(hint).convert("RGB"), scale=0.9, union_mode="canny")
    direct = pipe(PROMPT, steps=2, seed=5, width=FW, height=FH, controlnets=[unit], progress=False)
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    assert main([*args, "--control-union-mode", "canny"]) != 0  # without --control: refused
    again = tmp_path / "again"  # --from-png reads the unit back, its Union Mode too
    redo = ["generate", "--from-png", str(made), "--model", str(folder), "--control", f"none:{hint}"]
    assert main([*redo, "--controlnet", str(union), "--out", str(again), "--no-progress"]) == 0
    remade = next(again.glob("*.png"))
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(remade)))


def test_sd3_single_file_reads_its_config_from_the_shapes(sd3, tmp_path):
    from safetensors.torch import load_file

    from sdengine.control.dit_files import sd3_config_from_weights

    folder, pipe, _, cn, _ = sd3
    qk = _sd3_controlnet(folder, tmp_path / "qk-cn", 14, qk_norm="rms_norm", dual_attention_layers=[1])
    sd = load_file(qk / "diffusion_pytorch_model.safetensors")
    file = tmp_path / "qk-cn.safetensors"
    save_safetensors(sd, file)
    cfg = sd3_config_from_weights(sd)
    want = json.loads((qk / "config.json").read_text())
    for key in ("num_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim", "pos_embed_max_size"):
        assert getattr(cfg, key) == want[key], key
    assert cfg.qk_norm == "rms_norm" and cfg.dual_attention_layers == (1,)
    image = _picture(SIZE, SIZE, 9)
    args = dict(steps=2, sampler="euler", cfg_scale=3.0, seed=SEED, width=SIZE, height=SIZE, progress=False)
    a = pipe(PROMPT, NEGATIVE, controlnets=[ControlUnit(str(qk), image)], **args)
    b = pipe(PROMPT, NEGATIVE, controlnets=[ControlUnit(str(file), image)], **args)
    assert np.array_equal(a.arrays, b.arrays)


def test_units_of_different_depths_are_refused(sd3, tmp_path):
    folder, pipe, _, cn, _ = sd3
    deep = _sd3_controlnet(folder, tmp_path / "deep-cn", 15, num_layers=3)
    image = _picture(SIZE, SIZE)
    units = [ControlUnit(str(cn), image), ControlUnit(str(deep), image)]
    with pytest.raises(SdengineError, match="give 2 and 3 residuals"):
        pipe(PROMPT, controlnets=units, steps=1, seed=SEED, width=SIZE, height=SIZE, progress=False)
