"""FLUX.1 Fill (inpainting / outpainting) and Depth / Canny (a control image) against diffusers' FluxFillPipeline,
FluxControlPipeline and FluxControlImg2ImgPipeline on tiny random folders saved by diffusers: the kind read off
the shapes, the images (fp32 CPU, mean absolute difference on 0..1 pixels), BFL's single transformer file, the
command line and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import diffusers_flux, make_flux_folder  # noqa: E402
from _pipeline_models import mask_picture, picture  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT = "a red apple on a table"
SEED = 3
W, H = 48, 32  # the tiny VAE is 2x: multiples of 4


@pytest.fixture(scope="module")
def fill(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-fill", kind="fill", seed=5)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder, cls_name="FluxFillPipeline")


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-depth", kind="control", seed=6)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_flux(folder, cls_name="FluxControlPipeline")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _theirs(ref, **kw) -> np.ndarray:
    args = dict(num_inference_steps=3, height=H, width=W, generator=torch.Generator().manual_seed(SEED))
    args.update(kw)
    return ref(PROMPT, output_type="np", **args).images


def _border_mask() -> Image.Image:
    """Outpainting's mask: the image extended by 8 pixels on the left and right, white there."""
    m = np.zeros((H, W), np.uint8)
    m[:, :8] = m[:, -8:] = 255
    return Image.fromarray(m, mode="L")


def test_kind_and_defaults(fill, control):
    pipe = fill[1]
    assert pipe.kind == "fill" and pipe.transformer.config.in_channels == 64 + 64 + 16 and pipe.latent_channels == 16
    assert pipe.family_defaults["distilled_cfg_scale"] == 30.0 and pipe.family_defaults["strength"] == 1.0
    assert control[1].kind == "control" and control[1].family_defaults["distilled_cfg_scale"] == 3.5
    assert "strength" not in control[1].family_defaults


@pytest.mark.parametrize(("mask", "strength"), [("centre", 1.0), ("centre", 0.6), ("border", 1.0)])
def test_fill_matches_diffusers(fill, mask, strength):
    """Inpainting (a white rectangle) and outpainting (white borders over a picture whose sides are to be
    extended); the distilled guidance 30 by default on both sides (FluxFillPipeline's)."""
    _, pipe, ref = fill
    init, m = picture(W, H), mask_picture(W, H) if mask == "centre" else _border_mask()
    ours = pipe(
        PROMPT, steps=3, seed=SEED, width=W, height=H, init_image=init, mask=m, strength=strength, progress=False
    )
    theirs = _theirs(ref, image=init, mask_image=m, strength=strength)
    assert _mad(ours.arrays, theirs) < TOL
    assert ours.parameters["Distilled CFG Scale"] == 30.0
    other = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, init_image=init, mask=m, strength=strength,
                 distilled_cfg_scale=3.5, progress=False)  # fmt: skip
    assert _mad(other.arrays, _theirs(ref, image=init, mask_image=m, strength=strength, guidance_scale=3.5)) < TOL


def test_fill_default_strength_is_one(fill):
    _, pipe, ref = fill
    init, m = picture(W, H), mask_picture(W, H)
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, init_image=init, mask=m, progress=False)
    assert ours.parameters["strength"] == 1.0
    assert _mad(ours.arrays, _theirs(ref, image=init, mask_image=m)) < TOL


def test_control_matches_diffusers(control):
    _, pipe, ref = control
    depth = picture(W, H, seed=2)
    ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, control_image=depth, progress=False)
    assert _mad(ours.arrays, _theirs(ref, control_image=depth, guidance_scale=3.5)) < TOL
    canny = picture(W, H, seed=4)
    other = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, control_image=canny, distilled_cfg_scale=30.0,
                 progress=False)  # fmt: skip
    assert _mad(other.arrays, _theirs(ref, control_image=canny, guidance_scale=30.0)) < TOL
    assert _mad(other.arrays, ours.arrays) > 10 * TOL  # the control map is an input that changes the image


def test_control_img2img_matches_diffusers(control):
    """An init image too: FluxControlImg2ImgPipeline's draws (control posterior, init posterior, noise)."""
    folder, pipe, _ = control
    ref = diffusers_flux(folder, cls_name="FluxControlImg2ImgPipeline")
    depth, init = picture(W, H, seed=2), picture(W, H, seed=1)
    ours = pipe(PROMPT, steps=4, seed=SEED, width=W, height=H, control_image=depth, init_image=init, strength=0.6,
                progress=False)  # fmt: skip
    theirs = _theirs(ref, control_image=depth, image=init, strength=0.6, guidance_scale=3.5, num_inference_steps=4)
    assert _mad(ours.arrays, theirs) < TOL


@pytest.mark.parametrize("which", ["fill", "control"])
def test_bfl_transformer_file_matches_diffusers(fill, control, tmp_path, which):
    """BFL's flux1-fill-dev / flux1-depth-dev layout: the kind from img_in's width, the rest as FLUX.1 [dev]."""
    from test_flux_pipeline import _single_files

    folder, _, ref = fill if which == "fill" else control
    _single_files(folder, tmp_path)
    parts = {k: tmp_path / f"{n}.safetensors" for k, n in (("vae", "ae"), ("clip_l", "clip_l"), ("t5", "t5xxl"))}
    pipe = sdengine.load_pipeline(tmp_path / "flux1.safetensors", device="cpu", **parts)
    assert pipe.kind == which and pipe.variant == "dev"
    if which == "fill":
        init, m = picture(W, H), mask_picture(W, H)
        ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, init_image=init, mask=m, progress=False)
        theirs = _theirs(ref, image=init, mask_image=m)
    else:
        depth = picture(W, H, seed=2)
        ours = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, control_image=depth, progress=False)
        theirs = _theirs(ref, control_image=depth, guidance_scale=3.5)
    assert _mad(ours.arrays, theirs) < TOL


# -- refusals ----------------------------------------------------------------------------------------------------


def _run(pipe, **kw):
    return pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, progress=False, **kw)


def test_fill_refusals(fill):
    pipe, init, m = fill[1], picture(W, H), mask_picture(W, H)
    with pytest.raises(GenerationError, match=r"FLUX.1 Fill repaints the white of a mask .* give init_image and mask"):
        _run(pipe)
    with pytest.raises(GenerationError, match=r"FLUX.1 Fill repaints the white of a mask"):
        _run(pipe, init_image=init)
    with pytest.raises(GenerationError, match=r"control_image: FLUX.1 Fill takes a mask and an init image"):
        _run(pipe, init_image=init, mask=m, control_image=init)
    with pytest.raises(GenerationError, match=r"masked_content 'latent noise': FLUX.1 Fill fills the masked region"):
        _run(pipe, init_image=init, mask=m, masked_content="latent noise")
    with pytest.raises(GenerationError, match=r"the hires fix is not supported on a FLUX.1 Fill model"):
        _run(pipe, init_image=init, mask=m, enable_hr=True)
    with pytest.raises(GenerationError, match=r"controlnets: Flux ControlNets are not supported on a FLUX.1 Fill"):
        _run(pipe, init_image=init, mask=m, controlnets=[("x.safetensors", init, 1.0)])


def test_control_refusals(control, tiny_sd1_folder):
    pipe, depth = control[1], picture(W, H, seed=2)
    with pytest.raises(GenerationError, match=r"FLUX.1 Depth / Canny needs control_image \(--control-image IMAGE\)"):
        _run(pipe)
    with pytest.raises(GenerationError, match=r"a mask \(inpainting\) is not supported on a FLUX.1 Depth / Canny"):
        _run(pipe, control_image=depth, init_image=depth, mask=mask_picture(W, H))
    with pytest.raises(GenerationError, match=r"control image not found: nowhere.png"):
        _run(pipe, control_image="nowhere.png")
    with pytest.raises(GenerationError, match=r"reference_images \(FLUX.1 Kontext\) and a control_image .* cannot run"):
        _run(pipe, control_image=depth, reference_images=[depth])
    sd = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(GenerationError, match=r"control_image is the control map of a FLUX.1 Depth / Canny model"):
        sd("a cat", steps=1, width=64, height=64, control_image=depth, progress=False)


def test_plain_flux_refuses_a_control_image(tmp_path):
    folder = make_flux_folder(tmp_path / "tiny-flux-schnell", guidance=False, seed=1)
    pipe = sdengine.load_pipeline(folder, device="cpu")
    assert pipe.kind == "plain"
    with pytest.raises(GenerationError, match=r"control_image is the control map of FLUX.1 Depth / Canny .* \[dev\]"):
        _run(pipe, control_image=picture(W, H))


def test_odd_widths_are_refused_at_load(tmp_path):
    from sdengine.pipeline.flux_fill import flux_kind

    assert (flux_kind(64, 64, 8, "m"), flux_kind(128, 64, 8, "m"), flux_kind(384, 64, 8, "m")) == (
        "plain",
        "control",
        "fill",
    )
    with pytest.raises(
        GenerationError, match=r"m: the Flux transformer takes 200 numbers per image token and gives 64"
    ):
        flux_kind(200, 64, 8, "m")


# -- the command line --------------------------------------------------------------------------------------------


def test_cli_fill_and_control(fill, control, tmp_path):
    from sdengine.metadata import parse_parameters, read_png_parameters

    init, m, depth = tmp_path / "init.png", tmp_path / "mask.png", tmp_path / "depth.png"
    picture(W, H).save(init)
    mask_picture(W, H).save(m)
    picture(W, H, seed=2).save(depth)
    size = ["--width", str(W), "--height", str(H), "--steps", "3", "--seed", str(SEED), "--no-progress"]
    out = tmp_path / "fill.png"
    args = ["generate", "--model", str(fill[0]), PROMPT, "--init-image", str(init), "--mask", str(m), *size]
    assert main([*args, "--out", str(out)]) == 0
    parsed = parse_parameters(read_png_parameters(out))
    assert float(parsed["Distilled CFG Scale"]) == 30.0 and float(parsed["Denoising strength"]) == 1.0
    theirs = _theirs(fill[2], image=Image.open(init), mask_image=Image.open(m))[0]
    assert _mad(np.asarray(Image.open(out), dtype=np.float32) / 255, theirs) < 1.0 / 255
    again = tmp_path / "fill2.png"
    png = ["generate", "--from-png", str(out), "--model", str(fill[0]), "--init-image", str(init), "--mask", str(m)]
    assert main([*png, "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))

    out = tmp_path / "depth-out.png"
    args = ["generate", "--model", str(control[0]), PROMPT, "--control-image", str(depth), *size]
    assert main([*args, "--out", str(out)]) == 0
    theirs = _theirs(control[2], control_image=Image.open(depth), guidance_scale=3.5)[0]
    assert _mad(np.asarray(Image.open(out), dtype=np.float32) / 255, theirs) < 1.0 / 255
    again = tmp_path / "depth2.png"
    png = ["generate", "--from-png", str(out), "--model", str(control[0]), "--control-image", str(depth)]
    assert main([*png, "--out", str(again), "--no-progress"]) == 0
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert main(["generate", "--model", str(control[0]), PROMPT, *size, "--out", str(tmp_path / "x.png")]) != 0


def test_comfyui_route_runs_a_fill_model_without_an_image_as_comfyui(fill, tmp_path):
    """UNETLoader on flux1-fill-dev in a text-only graph (no InpaintModelConditioning): it runs as ComfyUI's
    Flux.concat_cond does, on a zero image latent (scaled in) and an all-ones mask (tests/test_comfy_flux_fill.py
    holds the Fill workflows against the pipeline)."""

    from test_comfy_sd3_flux import _run, flux_graph, save_comfy_files

    folder = fill[0]
    save_comfy_files(folder, tmp_path)
    out = _run(tmp_path, flux_graph())
    image = out["10"][0]
    assert image.shape == (1, 16, 16, 3) and bool(torch.isfinite(image).all()) and float(image.std()) > 0.01


def test_a1111_img2img_with_a_mask_on_a_fill_model(tmp_path):
    """A1111's inpainting route on a FLUX.1 Fill model: the pipeline's image inside the mask ("original" masked
    content, no blur), the init image outside (A1111's overlay); FluxFillPipeline's guidance 30 where none is sent."""
    pytest.importorskip("fastapi")
    import base64
    import io

    import httpx

    from _live_server import live_server, server_config

    models = tmp_path / "models"
    folder = make_flux_folder(models / "tiny-flux-fill", kind="fill", seed=5)
    pipe = sdengine.load_pipeline(folder, device="cpu")
    init, m = picture(W, H), mask_picture(W, H)

    def b64(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    body = {
        "prompt": PROMPT, "steps": 3, "width": W, "height": H, "seed": SEED, "cfg_scale": 1, "sampler_name": "Euler",
        "override_settings": {"sd_model_checkpoint": "tiny-flux-fill"}, "init_images": [b64(init)], "mask": b64(m),
        "inpainting_fill": 1, "mask_blur": 0, "denoising_strength": 1.0,
    }  # fmt: skip
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    want = pipe(PROMPT, steps=3, seed=SEED, width=W, height=H, init_image=init, mask=m, progress=False)
    inside = np.asarray(m) > 127
    assert np.array_equal(got[inside], np.asarray(want.images[0].convert("RGB"))[inside])
    assert np.array_equal(got[~inside], np.asarray(init)[~inside])
    assert "Distilled CFG Scale: 30" in r.json()["info"]


def test_native_job_takes_a_control_image(control, tmp_path):
    """POST /v1/jobs with ``control_image`` (base64, as init_image) on a FLUX.1 Depth / Canny folder: the
    pipeline's image."""
    pytest.importorskip("fastapi")
    import base64
    import io
    import shutil

    import httpx

    from _live_server import live_server, run_job, server_config

    folder, pipe, _ = control
    models = tmp_path / "models"
    shutil.copytree(folder, models / "tiny-flux-depth")
    depth = picture(W, H, seed=2)
    buf = io.BytesIO()
    depth.save(buf, format="PNG")
    want = pipe(PROMPT, steps=3, seed=5, width=W, height=H, control_image=depth, progress=False)
    body = {"prompt": PROMPT, "steps": 3, "width": W, "height": H, "seed": 5, "cfg_scale": 1.0, "sampler": "euler",
            "schedule": "normal", "model": "tiny-flux-depth"}  # fmt: skip
    body["control_image"] = base64.b64encode(buf.getvalue()).decode()
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            pixels, _ = run_job(client, body)
            r = client.post("/v1/jobs", json={k: v for k, v in body.items() if k != "control_image"})
    np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
    assert r.status_code == 400, r.text  # the loaded model's check, before the job is queued
    message = r.json()["detail"]
    assert "FLUX.1 Depth / Canny needs control_image" in message and "\n" not in message, message


@pytest.mark.parametrize("which", ["fill", "control"])
def test_batch_rows_equal_their_seeds_alone(fill, control, which):
    """Two seeds in one call: each row's image latent is drawn from its own generator, as that seed alone."""
    pipe = fill[1] if which == "fill" else control[1]
    kw = (
        {"init_image": picture(W, H), "mask": mask_picture(W, H)}
        if which == "fill"
        else {"control_image": picture(W, H, seed=2)}
    )
    both = pipe([PROMPT, PROMPT], seed=[SEED, 7], steps=2, width=W, height=H, progress=False, **kw).arrays
    for row, seed in enumerate((SEED, 7)):
        alone = pipe(PROMPT, seed=seed, steps=2, width=W, height=H, progress=False, **kw).arrays
        np.testing.assert_allclose(both[row : row + 1], alone, atol=1e-5, rtol=0)
    assert _mad(both[:1], both[1:]) > 10 * TOL


def test_outpaint_and_true_cfg_run_on_fill(fill):
    """sdengine's outpainting (``--outpaint``: the canvas padded, a mask white over the new area) is a Fill call
    with the canvas and mask (equal to that call inside the mask, the original outside); true CFG (cfg_scale > 1
    with a negative prompt) reads the image latent in both halves."""
    from sdengine.outpaint import outpaint, plan_outpaint

    pipe = fill[1]
    small = picture(32, 32)
    out = outpaint(pipe, PROMPT, small, left=8, right=8, steps=2, seed=SEED, progress=False)
    assert out.images[0].size == (48, 32)
    plan = plan_outpaint(small, 8, 8, 0, 0, overlap=8, multiple=pipe.size_multiple)
    direct = pipe(PROMPT, init_image=plan.canvas, mask=plan.mask, width=48, height=32, strength=1.0, mask_blur=4,
                  steps=2, seed=SEED, progress=False)  # fmt: skip
    inside = np.asarray(plan.mask) != 0
    np.testing.assert_array_equal(out.arrays[0][inside], direct.arrays[0][inside])
    assert np.array_equal(np.asarray(out.images[0])[:, 8:40][~inside[:, 8:40]], np.asarray(small)[~inside[:, 8:40]])
    init, m = picture(W, H), mask_picture(W, H)
    args = dict(init_image=init, mask=m, steps=2, seed=SEED, width=W, height=H, progress=False)
    guided = pipe(PROMPT, "blurry", cfg_scale=2.0, **args).arrays
    assert np.isfinite(guided).all() and _mad(guided, pipe(PROMPT, **args).arrays) > 10 * TOL


def test_chroma_refuses_a_control_image(tmp_path):
    """Chroma (a FluxPipeline with its own checks): a control image is the core's one-line refusal, never ignored."""
    from _chroma_models import make_chroma_folder

    pipe = sdengine.load_pipeline(make_chroma_folder(tmp_path / "tiny-chroma"), device="cpu")
    assert pipe.kind == "plain" and not pipe.takes_control_image
    with pytest.raises(GenerationError, match=r"control_image is the control map of a FLUX.1 Depth / Canny model"):
        _run(pipe, control_image=picture(W, H))
