"""SD3 and Flux through ``sdengine serve``: the native, A1111 and OpenAI protocols against a live server whose
models folder holds a tiny random SD3 folder and a tiny random FLUX.1 [dev] folder (the pipeline branches' makers,
tests/_sd3_models.py and tests/_flux_models.py), beside the built-in SD 1.x emoji model.

Each route's image is compared with the Python pipeline's for the same settings (equal pixels: the same code runs
on the same CPU), the family's own settings (SD3's shift and skip-layer guidance, Flux's distilled guidance) reach
the pipeline and its infotext, and a setting the job's model family does not take is a one-line 400."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, one_line_400, run_job, server_config, shared_loader  # noqa: E402
from _sd3_models import make_sd3_folder, write_single_file  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
W, H = 48, 32  # the tiny models' 2x VAEs: multiples of 4
STEPS = 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, client, sd3 pipeline, flux pipeline): one live server on a models folder with both."""
    root = tmp_path_factory.mktemp("serverdit")
    models = root / "models"
    make_sd3_folder(models / "tiny-sd3")
    write_single_file(models / "tiny-sd3", models / "tiny_sd3_file.safetensors")  # the family read from its header
    make_flux_folder(models / "tiny-flux", guidance=True)
    make_flux_folder(models / "idle-flux", guidance=True)  # never run: checked before any worker loads it
    sd3 = sdengine.load_pipeline(models / "tiny-sd3", device="cpu")
    flux = sdengine.load_pipeline(models / "tiny-flux", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, sd3, flux


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _b64_image(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


def test_models_are_listed_with_their_family_and_size(served):
    _, client, _, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    families = [data[k]["family"] for k in ("tiny-sd3", "tiny_sd3_file.safetensors", "tiny-flux", "emoji")]
    assert families == ["sd3", "sd3", "flux", "sd"]
    assert data["tiny-flux"]["defaults"] == {"steps": 28, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
    assert data["emoji"]["defaults"] == {}
    titles = {m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert {"tiny-sd3", "tiny-flux"} <= titles
    sizes = client.get("/v1/sizes").json()["models"]
    # the transformer's latent patches: the 2x VAE x 2 (16 for the real 8x VAEs), the models' own default sizes
    assert sizes["tiny-sd3"] == {"width": 32, "height": 32, "multiple": 4}
    assert sizes["tiny-flux"] == {"width": 32, "height": 32, "multiple": 4}
    r = client.post("/v1/jobs", json={"model": "tiny-flux", "prompt": PROMPT, "width": 50, "height": 32})
    one_line_400(r, "width 50 is not a multiple of 4")


def test_native_jobs_give_the_pipelines_images_and_switch_models(served):
    server, client, sd3, flux = served
    base = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": STEPS, "width": W, "height": H, "seed": 5}
    # SD3 with its shift and skip-layer guidance; the sampler and schedule left out: SD3's own (Euler, normal)
    slg = {"skip_guidance_layers": [0], "skip_layer_guidance_scale": 2.0, "skip_layer_guidance_stop": 0.9}
    got, job = run_job(client, {**base, "model": "tiny-sd3", "shift": 2.0, "sd3": slg})
    own = {**sd3.family_defaults, "steps": STEPS}  # what the CLI runs too (Python calls have SD's defaults)
    want = sd3(PROMPT, NEGATIVE, **own, seed=5, width=W, height=H, shift=2.0, sd3=slg, progress=False)
    np.testing.assert_array_equal(got, _pixels(want.images[0]))
    plain = sd3(PROMPT, NEGATIVE, **own, seed=5, width=W, height=H, progress=False)
    assert np.abs(got.astype(int) - _pixels(plain.images[0]).astype(int)).max() > 0  # the settings changed it
    params = job["images"][0]["infotext"]
    assert "Shift: 2" in params and "Skip layers: 0" in params, params
    # the same weights as a Stability single file (its CLIP encoders inside): served as the folder's model
    got, _ = run_job(client, {**base, "model": "tiny_sd3_file.safetensors", "sampler": "euler", "schedule": "normal"})
    single = sdengine.load_pipeline(server.services.catalog.resolve_model("tiny_sd3_file.safetensors"), device="cpu")
    want = single(PROMPT, NEGATIVE, steps=STEPS, seed=5, width=W, height=H, sampler="euler", cfg_scale=7.0,
                  progress=False)  # fmt: skip
    np.testing.assert_array_equal(got, _pixels(want.images[0]))
    # an SD 1.x job between, then Flux with its distilled guidance, cfg / sampler / schedule left out (Flux's)
    emoji, _ = run_job(client, {**base, "model": "emoji", "width": 64, "height": 64, "steps": 2})
    want_emoji = shared_loader("emoji", "cpu")(
        PROMPT, NEGATIVE, steps=2, seed=5, width=64, height=64, sampler="dpmpp_2m", schedule="karras", progress=False
    )
    np.testing.assert_array_equal(emoji, _pixels(want_emoji.images[0]))
    got, job = run_job(client, {**base, "negative_prompt": "", "model": "tiny-flux", "distilled_cfg_scale": 5.0})
    want = flux(PROMPT, steps=STEPS, seed=5, width=W, height=H, distilled_cfg_scale=5.0, progress=False)
    np.testing.assert_array_equal(got, _pixels(want.images[0]))
    assert "Distilled CFG Scale: 5" in job["images"][0]["infotext"]


def test_pag_on_sd3_through_the_native_and_a1111_routes(served):
    _, client, sd3, _ = served
    base = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 2, "width": W, "height": H, "seed": 4}
    own = {**sd3.family_defaults, "steps": 2}
    pag = {"pag_scale": 2.0, "pag_layers": "blocks.0", "sd3": {"pag_adaptive_scale": 0.001}}
    got, job = run_job(client, {**base, "model": "tiny-sd3", **pag})
    want = sd3(PROMPT, NEGATIVE, **own, seed=4, width=W, height=H, **pag, progress=False)
    np.testing.assert_array_equal(got, _pixels(want.images[0]))
    params = job["images"][0]["infotext"]
    assert "PAG scale: 2" in params and "PAG layers: blocks.0" in params and "PAG adaptive scale: 0.001" in params
    # A1111: Forge's PAG script (its scale; the layers sdengine's default, on SD3 diffusers' "blocks.1")
    script = {"perturbedattentionguidance integrated": {"args": [True, 2.0]}}
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 2, "width": W, "height": H, "seed": 4}
    body |= {"cfg_scale": 5, "sampler_name": "Euler", "alwayson_scripts": script}
    r = client.post("/sdapi/v1/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": "tiny-sd3"}})
    assert r.status_code == 200, r.text
    want = sd3(PROMPT, NEGATIVE, steps=2, seed=4, width=W, height=H, cfg_scale=5, sampler="euler", schedule="normal",
               pag_scale=2.0, progress=False)  # fmt: skip
    image = _b64_image(r.json()["images"][0])
    np.testing.assert_array_equal(_pixels(image), _pixels(want.images[0]))
    assert "PAG layers: blocks.1" in image.info["parameters"]


def test_family_settings_on_another_family_are_one_line_400s(served):
    _, client, _, _ = served
    base = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    r = client.post("/v1/jobs", json={**base, "model": "emoji", "width": 64, "height": 64, "distilled_cfg_scale": 4})
    one_line_400(r, "distilled_cfg_scale applies to FLUX.1 [dev] models only; emoji is not a Flux model")
    r = client.post("/v1/jobs", json={**base, "model": "tiny-sd3", "distilled_cfg_scale": 4})
    one_line_400(r, "tiny-sd3 is not a Flux model")
    r = client.post("/v1/jobs", json={**base, "model": "tiny-flux", "shift": 2})
    one_line_400(r, "shift applies to SD3 models only; Flux shifts its schedule by the image size")
    r = client.post("/v1/jobs", json={**base, "model": "emoji", "sd3": {"skip_guidance_layers": [1]}})
    one_line_400(r, "sd3 settings apply to SD3 models only; emoji is not one")
    # U-Net settings the families refuse: the pipelines' own reasons, before any job is queued
    r = client.post(
        "/v1/jobs", json={**base, "model": "tiny-sd3", "pag_scale": 3, "sd3": {"skip_guidance_layers": [0]}}
    )
    one_line_400(r, "pag_scale (perturbed-attention guidance) and skip-layer guidance together are not supported")
    r = client.post("/v1/jobs", json={**base, "model": "tiny-flux", "freeu": [1.1, 1.2, 0.9, 0.2]})
    one_line_400(r, "freeu: FreeU changes the U-Net's up blocks; tiny-flux is a Flux model")
    # skip-layer settings: their keys, and (the model loaded by the test above) a block the MMDiT does not have
    r = client.post("/v1/jobs", json={**base, "model": "tiny-sd3", "sd3": {"skip_layers": [1]}})
    one_line_400(r, "unknown sd3 settings: skip_layers; valid: skip_guidance_layers")
    r = client.post("/v1/jobs", json={**base, "model": "tiny-sd3", "sd3": {"skip_guidance_layers": [9]}})
    one_line_400(r, "sd3 skip_guidance_layers 9 is not a joint block of this MMDiT")
    r = client.post("/v1/jobs", json={**base, "model": "tiny-sd3", "pag_scale": 3, "pag_layers": "mid_block"})
    one_line_400(r, "pag_layers: tiny-sd3 (SD3): PAG layer 'mid_block' matches no joint-attention layer of the MMDiT")
    # the schema's ranges: 422
    assert client.post("/v1/jobs", json={**base, "model": "tiny-flux", "distilled_cfg_scale": -1}).status_code == 422
    assert client.post("/v1/jobs", json={**base, "model": "tiny-sd3", "shift": 0}).status_code == 422


def test_a1111_txt2img_and_img2img_on_flux_and_sd3(served):
    _, client, sd3, flux = served
    # Forge's request for Flux: distilled_cfg_scale, cfg_scale 1, Euler with the "Automatic" scheduler (the flow grid)
    body = {
        "prompt": PROMPT,
        "steps": STEPS,
        "width": W,
        "height": H,
        "seed": 7,
        "cfg_scale": 1,
        "sampler_name": "Euler",
    }
    flux_body = {**body, "override_settings": {"sd_model_checkpoint": "tiny-flux"}, "distilled_cfg_scale": 4.5}
    r = client.post("/sdapi/v1/txt2img", json=flux_body)
    assert r.status_code == 200, r.text
    image = _b64_image(r.json()["images"][0])
    want = flux(PROMPT, steps=STEPS, seed=7, width=W, height=H, distilled_cfg_scale=4.5, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(image), _pixels(want))
    assert "Distilled CFG Scale: 4.5" in image.info["parameters"]
    # img2img of that picture: diffusers' step count (int(steps x strength)), as the pipeline's img2img
    init = r.json()["images"][0]
    r = client.post("/sdapi/v1/img2img", json={**flux_body, "init_images": [init], "denoising_strength": 0.7})
    assert r.status_code == 200, r.text
    want = flux(
        PROMPT, steps=STEPS, seed=7, width=W, height=H, distilled_cfg_scale=4.5, init_image=image.convert("RGB"),
        strength=0.7, progress=False,
    ).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(_b64_image(r.json()["images"][0])), _pixels(want))
    assert "A1111's step rule is not implemented for SD3 / Flux models" in r.json()["info"]
    # SD3 with sdengine's shift and sd3 fields (A1111 and Forge have none for them)
    slg = {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 1.0}
    sd3_body = {**body, "cfg_scale": 5, "override_settings": {"sd_model_checkpoint": "tiny-sd3"}}
    r = client.post("/sdapi/v1/txt2img", json={**sd3_body, "shift": 1.5, "sd3": slg})
    assert r.status_code == 200, r.text
    image = _b64_image(r.json()["images"][0])
    want = sd3(
        PROMPT, steps=STEPS, seed=7, width=W, height=H, cfg_scale=5, sampler="euler", schedule="normal", shift=1.5,
        sd3=slg, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(_pixels(image), _pixels(want.images[0]))
    assert "Shift: 1.5" in image.info["parameters"] and "Skip layers: 1" in image.info["parameters"]
    # img2img on SD3: diffusers' step count, as the pipeline's img2img
    r2 = client.post(
        "/sdapi/v1/img2img",
        json={**sd3_body, "shift": 1.5, "init_images": [r.json()["images"][0]], "denoising_strength": 0.6},
    )
    assert r2.status_code == 200, r2.text
    want2 = sd3(
        PROMPT, steps=STEPS, seed=7, width=W, height=H, cfg_scale=5, sampler="euler", schedule="normal", shift=1.5,
        init_image=image.convert("RGB"), strength=0.6, progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(_pixels(_b64_image(r2.json()["images"][0])), _pixels(want2.images[0]))
    # the image's infotext (A1111's "infotext" field) runs it again: its Shift and skip-layer fields
    r = client.post("/sdapi/v1/txt2img", json={"infotext": image.info["parameters"], **sd3_body})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_pixels(_b64_image(r.json()["images"][0])), _pixels(want.images[0]))
    # Forge sends distilled_cfg_scale 3.5 (its default) for every model: ignored (and listed) off Flux; else a 400
    r = client.post("/sdapi/v1/txt2img", json={**sd3_body, "distilled_cfg_scale": 3.5})
    assert r.status_code == 200, r.text
    assert "distilled_cfg_scale" in str(r.json()["info"])
    r = client.post("/sdapi/v1/txt2img", json={**sd3_body, "distilled_cfg_scale": 2.0})
    one_line_400(r, "distilled_cfg_scale applies to FLUX.1 [dev] models only; tiny-sd3 is not a Flux model")
    r = client.post("/sdapi/v1/txt2img", json={**flux_body, "shift": 2.0})
    one_line_400(r, "shift applies to SD3 models only")
    # the model chosen by the options (A1111's model switch) instead of override_settings: the same Flux image
    assert client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-flux"}).status_code == 200
    try:
        r = client.post("/sdapi/v1/txt2img", json={**body, "distilled_cfg_scale": 4.5})
        assert r.status_code == 200, r.text
        want = flux(PROMPT, steps=STEPS, seed=7, width=W, height=H, distilled_cfg_scale=4.5, progress=False).images[0]
        np.testing.assert_array_equal(_pixels(_b64_image(r.json()["images"][0])), _pixels(want))
    finally:
        client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "emoji"})


def test_openai_generations_on_flux_and_sd3_with_extra_body(served):
    _, client, sd3, flux = served
    body = {"model": "tiny-flux", "prompt": PROMPT, "size": f"{W}x{H}", "seed": 11, "steps": STEPS}
    r = client.post("/v1/images/generations", json={**body, "distilled_cfg_scale": 2.5})
    assert r.status_code == 200, r.text
    got = _b64_image(r.json()["data"][0]["b64_json"])
    want = flux(PROMPT, steps=STEPS, seed=11, width=W, height=H, distilled_cfg_scale=2.5, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(got), _pixels(want))
    # an edit (a form): the fields as text, Flux's defaults under them, img2img at OpenAI's strength 0.75
    buf = io.BytesIO()
    got.save(buf, format="PNG")
    form = {"model": "tiny-flux", "prompt": "a green apple", "size": f"{W}x{H}", "seed": "2", "steps": str(STEPS)}
    r = client.post(
        "/v1/images/edits", data={**form, "distilled_cfg_scale": "6"}, files={"image": ("a.png", buf.getvalue())}
    )
    assert r.status_code == 200, r.text
    want = flux(
        "a green apple", steps=STEPS, seed=2, width=W, height=H, distilled_cfg_scale=6.0, init_image=got.convert("RGB"),
        strength=0.75, progress=False,
    ).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(_b64_image(r.json()["data"][0]["b64_json"])), _pixels(want))
    r = client.post("/v1/images/edits", data={**form, "shift": "x"}, files={"image": ("a.png", buf.getvalue())})
    assert r.status_code == 400 and r.json()["error"]["param"] == "shift", r.text
    # SD3: its shift and skip-layer guidance, SD3's defaults (Euler, normal, cfg 7) under what is sent
    slg = {"skip_guidance_layers": [1]}
    r = client.post("/v1/images/generations", json={**body, "model": "tiny-sd3", "shift": 4.0, "sd3": slg})
    assert r.status_code == 200, r.text
    want = sd3(PROMPT, **{**sd3.family_defaults, "steps": STEPS}, seed=11, width=W, height=H, shift=4.0, sd3=slg,
               progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(_b64_image(r.json()["data"][0]["b64_json"])), _pixels(want))
    r = client.post("/v1/images/generations", json={**body, "model": "emoji", "size": "64x64", "shift": 2.0})
    assert r.status_code == 400 and "shift applies to SD3 models only; emoji is not one" in r.text, r.text
    r = client.post("/v1/images/generations", json={**body, "sd3": "[1"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sd3", r.text


def test_flux_defaults_fill_what_a_native_job_leaves_out(served):
    """A Flux job that names only the prompt, size, steps and seed runs Flux's cfg 1, Euler and normal grid (SD's
    schema defaults, cfg 7.5 with DPM++ 2M Karras, are not Flux's)."""
    _, client, _, flux = served
    got, job = run_job(client, {"model": "tiny-flux", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 3})
    want = flux(PROMPT, steps=2, seed=3, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(got, _pixels(want))
    assert "Sampler: Euler" in job["images"][0]["infotext"]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("shift", "2"),
        ("shift", True),
        ("shift", 1e9),
        ("sd3", "x"),
        ("sd3", [1]),
        ("sd3", {"skip_guidance_layers": "1"}),
    ]
    + [("sd3", {"skip_layer_guidance_start": 0.5, "skip_layer_guidance_stop": 0.1}), ("distilled_cfg_scale", True)]
    + [("distilled_cfg_scale", "a"), ("distilled_cfg_scale", 1e9)],
)
def test_bad_family_values_are_one_line_4xx_on_every_protocol(served, field, value):
    """A malformed family setting is refused in one line on every protocol, never a 500 or a job."""
    _, client, _, _ = served
    model = "tiny-flux" if field == "distilled_cfg_scale" else "tiny-sd3"
    base = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, field: value}
    answers = [
        client.post("/v1/jobs", json={**base, "model": model}),
        client.post("/sdapi/v1/txt2img", json={**base, "override_settings": {"sd_model_checkpoint": model}}),
        client.post("/v1/images/generations", json={**base, "model": model, "size": f"{W}x{H}"}),
    ]
    for r in answers:
        assert r.status_code in (400, 422), (r.request.url, r.status_code, r.text)
        body = r.json()
        message = body["error"]["message"] if "error" in body else body["detail"]
        assert isinstance(message, str) and "\n" not in message and message, (r.request.url, body)


def test_live_previews_use_each_familys_latent_colours(served):
    """The server's latent previews (no tiny VAE) colour SD3's and Flux's 16-channel latents with their own maps
    (ComfyUI's factors), not the grey channel mean a 16-channel latent got before."""
    from sdengine import vae_utils

    server, _, sd3, flux = served
    manager = server.services.manager
    z = torch.randn(1, 16, 6, 5, generator=torch.Generator().manual_seed(0))
    grey = vae_utils.latent_rgb(z)
    for pipe, own in ((sd3, vae_utils.SD3_LATENT_RGB), (flux, vae_utils.FLUX_LATENT_RGB)):
        got = manager.preview_rgb(pipe)(z)
        assert torch.equal(got, vae_utils.latent_rgb(z, own))
        assert not torch.equal(got, grey)
        assert not torch.equal(got[..., 0], got[..., 1])  # colour, not grey


def test_flux_refusals_come_before_the_model_is_loaded(served):
    """A U-Net setting on a Flux model no worker holds yet is the same one-line 400 as on a loaded one (the pipeline
    module's refusals, without the model), not a queued job that fails later."""
    server, client, _, _ = served
    base = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1, "model": "idle-flux"}
    for body, want in (
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "freeu: FreeU changes the U-Net's up blocks; idle-flux is a Flux model"),
        ({"pag_scale": 3}, "pag_scale: perturbed-attention guidance (pag_scale) reads U-Net attention layers"),
        ({"tiling": True}, "tiling: tiling (seamless images) is not supported for Flux yet"),
    ):
        one_line_400(client.post("/v1/jobs", json={**base, **body}), want)
    assert all(getattr(w.pipe, "name", None) != "idle-flux" for w in server.services.manager.workers)
