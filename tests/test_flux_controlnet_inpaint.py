"""Flux ControlNets with an init image against diffusers' FluxControlNetImg2ImgPipeline (img2img) and
FluxControlNetInpaintPipeline (a mask: the known region put back after every step) on the tiny random Flux [dev]
model and a random FluxControlNetModel saved by diffusers: images on 0..1 pixels within TOL (mean absolute
difference), the strength's step count, the control window over the steps that run, a Union mode, two units, a
batch of two seeds, the CLI and the native job (with a unit's ``union_mode``), and the refusals.

The oracle encodes the control image to its posterior's mean here, as sdengine does (diffusers draws a sample of
it first from the generator the init latent's sample and the noise then come from): the pipeline module's
``retrieve_latents`` takes the mode on its first call (the control image) and draws as it does on the later
ones (the init image, then the masked image)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _pipeline_models import mask_picture, picture  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
SEED = 3
PROMPT = "a red apple on a table"
W, H = 48, 32  # the tiny VAE is 2x: multiples of 4


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    value = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    print(f"mean abs difference {value:.2e}")
    return value


def _noise_picture(w: int, h: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _flux_controlnet(folder: Path, dst: Path, seed: int, **extra) -> Path:
    from diffusers import FluxControlNetModel

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "out_channels"}
    cfg.update(num_layers=1, num_single_layers=1, **extra)
    cn = FluxControlNetModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():
            p.copy_(p + torch.randn(p.shape, generator=g) * 0.05)
    cn.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    root = tmp_path_factory.mktemp("fluxcn")
    folder = make_flux_folder(root / "tiny-flux-dev", guidance=True)
    cn = _flux_controlnet(folder, root / "flux-cn", 31)
    union = _flux_controlnet(folder, root / "flux-union", 32, num_mode=4)
    return folder, sdengine.load_pipeline(folder, device="cpu"), cn, union


@pytest.fixture()
def control_mean(monkeypatch):
    """The oracle's control image encoded to its posterior's mean (the first retrieve_latents call of a call)."""
    from diffusers.pipelines.flux import pipeline_flux_controlnet_image_to_image as i2i
    from diffusers.pipelines.flux import pipeline_flux_controlnet_inpainting as inp

    calls = {"n": 0, "controls": 1}  # "controls": how many control images the call encodes first
    for module in (i2i, inp):
        original = module.retrieve_latents

        def patched(output, generator=None, sample_mode="sample", _original=original):
            calls["n"] += 1
            return _original(output, generator, "argmax" if calls["n"] <= calls["controls"] else sample_mode)

        monkeypatch.setattr(module, "retrieve_latents", patched)
    return calls


def _oracle(folder: Path, nets: list[Path], inpaint: bool):
    import diffusers

    models = [diffusers.FluxControlNetModel.from_pretrained(n) for n in nets]
    cn = models[0] if len(models) == 1 else diffusers.FluxMultiControlNetModel(models)
    cls = diffusers.FluxControlNetInpaintPipeline if inpaint else diffusers.FluxControlNetImg2ImgPipeline
    pipe = cls.from_pretrained(folder, controlnet=cn, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, control_mean, **kw) -> np.ndarray:
    control_mean["n"] = 0
    control_mean["controls"] = len(kw["control_image"]) if isinstance(kw["control_image"], list) else 1
    args = dict(num_inference_steps=5, height=H, width=W, guidance_scale=3.5, output_type="np")
    args.update(kw)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(SEED), **args).images


def _ours(pipe, **kw):
    return pipe(PROMPT, **{"steps": 5, "seed": SEED, "width": W, "height": H, "progress": False, **kw})


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_img2img_matches_diffusers(flux, control_mean, strength):
    folder, pipe, cn, _ = flux
    init, hint = picture(W, H), _noise_picture(W, H, 5)
    unit = ControlUnit(str(cn), hint, scale=0.9, start=0.0, end=0.5)
    ours = _ours(pipe, init_image=init, strength=strength, controlnets=[unit])
    theirs = _theirs(
        _oracle(folder, [cn], False),
        control_mean,
        image=init,
        control_image=hint,
        strength=strength,
        controlnet_conditioning_scale=0.9,
        control_guidance_start=0.0,
        control_guidance_end=0.5,
    )
    assert _mad(ours.arrays, theirs) < TOL
    plain = _ours(pipe, init_image=init, strength=strength)
    assert _mad(ours.arrays, plain.arrays) > 100 * TOL  # the ControlNet acted


@pytest.mark.parametrize("strength", [0.6, 1.0])
def test_inpainting_matches_diffusers(flux, control_mean, strength):
    folder, pipe, cn, _ = flux
    init, mask, hint = picture(W, H), mask_picture(W, H), _noise_picture(W, H, 6)
    unit = ControlUnit(str(cn), hint, scale=1.1, start=0.2, end=1.0)
    ours = _ours(pipe, init_image=init, mask=mask, strength=strength, controlnets=[unit])
    theirs = _theirs(
        _oracle(folder, [cn], True),
        control_mean,
        image=init,
        mask_image=mask,
        control_image=hint,
        strength=strength,
        controlnet_conditioning_scale=1.1,
        control_guidance_start=0.2,
        control_guidance_end=1.0,
    )
    assert _mad(ours.arrays, theirs) < TOL
    plain = _ours(pipe, init_image=init, mask=mask, strength=strength)
    assert _mad(ours.arrays, plain.arrays) > 100 * TOL


def test_union_inpainting_with_resized_inputs_matches_diffusers(flux, control_mean):
    """A Union ControlNet's mode; an init image, a grey RGB mask and a control image each of another size than the
    output (resized as diffusers' image and mask processors resize them: Lanczos; the mask cut at 0.5)."""
    from PIL import Image

    folder, pipe, _, union = flux
    init, hint = picture(60, 44, 1), _noise_picture(40, 28, 7)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (36, 1))
    mask = Image.fromarray(np.stack([ramp, ramp[:, ::-1], ramp], -1).round().astype(np.uint8))
    unit = ControlUnit(str(union), hint, scale=0.8, union_mode="depth")
    ours = _ours(pipe, init_image=init, mask=mask, strength=0.8, controlnets=[unit])
    theirs = _theirs(
        _oracle(folder, [union], True),
        control_mean,
        image=init,
        mask_image=mask,
        control_image=hint,
        control_mode=2,
        strength=0.8,
        controlnet_conditioning_scale=0.8,
    )
    assert _mad(ours.arrays, theirs) < TOL


def test_two_units_img2img_match_diffusers_multi_controlnet(flux, control_mean):
    folder, pipe, cn, union = flux
    init, a, b = picture(W, H, 2), _noise_picture(W, H, 8), _noise_picture(W, H, 9)
    units = [
        ControlUnit(str(cn), a, scale=0.7, start=0.0, end=0.6),
        ControlUnit(str(union), b, scale=0.5, start=0.3, end=1.0, union_mode="tile"),
    ]
    ours = _ours(pipe, init_image=init, strength=0.7, controlnets=units)  # 4 of the 5 steps run
    theirs = _theirs(
        _oracle(folder, [cn, union], False),
        control_mean,
        image=init,
        control_image=[a, b],
        control_mode=[None, 1],
        strength=0.7,
        controlnet_conditioning_scale=[0.7, 0.5],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[0.6, 1.0],
    )
    assert _mad(ours.arrays, theirs) < TOL


def _b64(image) -> str:
    import base64
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_cli_init_image_mask_and_control_equal_the_pipeline(flux, tmp_path):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    folder, pipe, _, union = flux
    paths = {name: tmp_path / f"{name}.png" for name in ("init", "mask", "hint")}
    picture(W, H, 3).save(paths["init"])
    mask_picture(W, H).save(paths["mask"])
    _noise_picture(W, H, 10).save(paths["hint"])
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--steps", "4", "--width", str(W)]
    args += ["--height", str(H), "--no-progress", "--out", str(out), "--init-image", str(paths["init"])]
    args += ["--mask", str(paths["mask"]), "--strength", "0.75"]
    args += ["--control", f"none:{paths['hint']}:0.9:0:0.8", "--controlnet", str(union), "--control-union-mode", "blur"]
    assert main(args) == 0
    made = next(out.glob("*.png"))
    fields = parse_parameters(Image.open(made).info["parameters"])
    assert "Union Mode: blur" in fields["ControlNet 0"] and float(fields["Denoising strength"]) == 0.75
    unit = ControlUnit(str(union), Image.open(paths["hint"]).convert("RGB"), scale=0.9, end=0.8, union_mode="blur")
    direct = pipe(
        PROMPT,
        steps=4,
        seed=5,
        width=W,
        height=H,
        init_image=Image.open(paths["init"]).convert("RGB"),
        mask=Image.open(paths["mask"]),
        strength=0.75,
        controlnets=[unit],
        progress=False,
    )
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))


def test_native_job_init_image_mask_and_control(flux, tmp_path):
    from _comfy_live import live_client
    from _live_server import run_job, server_config

    folder, pipe, cn, _ = flux
    init, mask, hint = picture(W, H, 4), mask_picture(W, H), _noise_picture(W, H, 11)
    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=cn.parent)
    body = {"model": folder.name, "prompt": PROMPT, "seed": SEED, "steps": 4, "width": W, "height": H}
    body.update(sampler="euler", schedule="normal", init_image=_b64(init), mask=_b64(mask), strength=0.7)
    body["controlnets"] = [{"model": cn.name, "image": _b64(hint), "weight": 0.8, "end": 0.7}]
    with live_client(config, timeout=120) as (_, client):
        got, _ = run_job(client, body, timeout=120)
    unit = ControlUnit(str(cn), hint, scale=0.8, end=0.7)
    want = _ours(pipe, steps=4, init_image=init, mask=mask, strength=0.7, controlnets=[unit])
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_window_on_no_step_that_runs_is_noted_and_no_step_is_refused(flux):
    """The unit's window is counted over the steps the strength leaves (2 of 4 at strength 0.5): a window
    holding none of them leaves the plain img2img image with a note; a strength leaving no step is refused in one
    line before any model runs."""
    from sdengine.errors import GenerationError

    _, pipe, cn, _ = flux
    init, hint = picture(W, H, 5), _noise_picture(W, H, 12)
    late = ControlUnit(str(cn), hint, start=0.9, end=1.0)
    out = _ours(pipe, steps=4, init_image=init, strength=0.5, controlnets=[late])
    plain = _ours(pipe, steps=4, init_image=init, strength=0.5)
    assert np.array_equal(out.arrays, plain.arrays)
    assert any("hold no step of the 2 that run" in n for n in out.notes), out.notes
    with pytest.raises(GenerationError, match=r"^strength 0.01 with 4 steps runs no step") as e:
        _ours(pipe, steps=4, init_image=init, strength=0.01, controlnets=[ControlUnit(str(cn), hint)])
    assert "\n" not in str(e.value)


def test_native_job_union_mode(flux, tmp_path, tiny_sd1_folder):
    """A native unit's union_mode reaches a Flux Union ControlNet (the image equals the Python call's); on a
    reference unit it is refused with a 400 before anything is queued."""
    from _comfy_live import live_client
    from _live_server import run_job, server_config

    folder, pipe, _, union = flux
    hint = _noise_picture(W, H, 13)
    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=union.parent)
    body = {"model": folder.name, "prompt": PROMPT, "seed": SEED, "steps": 2, "width": W, "height": H}
    body.update(sampler="euler", schedule="normal")
    unit = {"model": union.name, "image": _b64(hint), "weight": 0.9, "union_mode": "tile"}
    with live_client(config, timeout=120) as (_, client):
        got, job = run_job(client, {**body, "controlnets": [unit]}, timeout=120)
        r = client.post("/v1/jobs", json={**body, "controlnets": [{**unit, "model": "reference_only"}]})
        why = "union_mode / inpaint_image are Flux / Z-Image ControlNets'; reference_only takes none"
        assert r.status_code == 400 and why in r.json()["detail"], r.text
    want = _ours(pipe, steps=2, controlnets=[ControlUnit(str(union), hint, scale=0.9, union_mode="tile")])
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    with pytest.raises(SdengineError, match="union_mode is a Flux Union ControlNet's; U-Net ControlNets take none"):
        sdengine.load_pipeline(tiny_sd1_folder, device="cpu")(
            PROMPT, steps=1, width=32, height=32, controlnets=[ControlUnit(str(union), hint, union_mode=1)]
        )


def test_batch_rows_inpainting_match_diffusers_generators(flux, control_mean):
    """Two prompts and seeds: each row's init sample and noise from its own seed's generator, one control latent
    for both rows (diffusers' list of generators; given one init image it draws the first row's sample only and
    repeats it, so the oracle takes the init image once per row)."""
    folder, pipe, cn, _ = flux
    init, mask, hint = picture(W, H, 6), mask_picture(W, H), _noise_picture(W, H, 14)
    prompts = [PROMPT, "a dog on a sofa"]
    unit = ControlUnit(str(cn), hint, scale=0.9)
    ours = pipe(
        prompts, seed=[SEED, 7], steps=4, width=W, height=H, init_image=init, mask=mask, strength=0.75,
        controlnets=[unit], progress=False,
    )  # fmt: skip
    control_mean["n"] = 0
    theirs = _oracle(folder, [cn], True)(
        prompts,
        image=[init, init],
        mask_image=mask,
        control_image=hint,
        strength=0.75,
        controlnet_conditioning_scale=0.9,
        num_inference_steps=4,
        guidance_scale=3.5,
        height=H,
        width=W,
        generator=[torch.Generator().manual_seed(s) for s in (SEED, 7)],
        output_type="np",
    ).images
    assert _mad(ours.arrays[0], theirs[0]) < TOL
    assert _mad(ours.arrays[1], theirs[1]) < TOL
