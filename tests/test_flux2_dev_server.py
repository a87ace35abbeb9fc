"""FLUX.2 [dev] through ``sdengine serve``: a live server whose models folder holds a tiny random [dev] folder
(tests/_flux2_dev_models.py). GET /v1/models tells the family "flux2" and [dev]'s defaults before the model loads; a
native job with its guidance (``distilled_cfg_scale``) and A1111's txt2img through the real ``webuiapi`` client (its
cfg 7 listed as ignored) give the Python pipeline's image (equal pixels); CFG is a one-line 400 before any job."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
webuiapi = pytest.importorskip("webuiapi")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _flux2_dev_models import make_dev_folder  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48  # the tiny VAE's 4x, 2x2 patches: multiples of 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverdev")
    models = root / "models"
    make_dev_folder(models / "tiny-dev", seed=3)
    pipe = sdengine.load_pipeline(models / "tiny-dev", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipe


def test_models_list_flux2_dev_and_its_defaults(served):
    _, client, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-dev"]["family"] == "flux2"
    assert data["tiny-dev"]["defaults"] == {"steps": 50, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}


def test_cfg_is_a_one_line_400(served):
    _, client, _ = served
    base = {"model": "tiny-dev", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    for extra, needle in (
        ({"cfg_scale": 3}, "FLUX.2 [dev] is guidance-distilled and runs without CFG"),
        ({"hires": {"hr_scale": 2}}, "the hires fix is not supported for FLUX.2"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (extra, r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message


def test_native_job_with_its_guidance_gives_the_pipelines_image(served):
    _, client, pipe = served
    job = {"model": "tiny-dev", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 5}
    got, _ = run_job(client, {**job, "distilled_cfg_scale": 2.5})
    want = pipe(PROMPT, steps=2, seed=5, width=W, height=H, distilled_cfg_scale=2.5, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    default = pipe(PROMPT, steps=2, seed=5, width=W, height=H, progress=False)  # guidance 4
    assert np.abs(got.astype(int) - np.asarray(default.images[0].convert("RGB")).astype(int)).mean() > 0.5


def test_a1111_txt2img_through_webuiapi_ignores_its_cfg(served):
    """webuiapi sends A1111's cfg_scale 7: on [dev] (no CFG) it is listed as ignored; the image is the pipeline's
    with its default guidance 4."""
    server, _, pipe = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    r = api.txt2img(
        prompt=PROMPT, steps=2, width=W, height=H, seed=7, override_settings={"sd_model_checkpoint": "tiny-dev"}
    )
    assert "cfg_scale" in r.info.get("ignored", []), r.info
    want = pipe(PROMPT, steps=2, seed=7, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.convert("RGB")))


def test_native_inpainting_job_and_a1111_img2img_run_dev(served):
    """[dev] img2img and inpainting served (klein's algorithm with [dev]'s guidance: tests/test_flux2_dev_inpaint.py):
    a native job with ``init_image``, ``mask``, ``strength`` and ``distilled_cfg_scale`` gives the Python call's
    image, without the mask img2img's; A1111's img2img through ``webuiapi`` (its cfg 7 ignored) the Python img2img
    call's image, and with a mask the Python inpainting call's inside it and the init image outside it."""
    from _pipeline_models import picture
    from test_flux2_server import _b64png, _box_mask, _rgb

    server, client, pipe = served
    init, (mask, inside) = picture(W, H, seed=3), _box_mask()
    job = {"model": "tiny-dev", "prompt": PROMPT, "steps": 2, "seed": 4, "width": W, "height": H}
    job |= {"init_image": _b64png(init), "strength": 0.6, "distilled_cfg_scale": 2.5}
    call = {"steps": 2, "seed": 4, "width": W, "height": H, "init_image": init, "strength": 0.6, "progress": False}
    got, _ = run_job(client, {**job, "mask": _b64png(mask)})
    np.testing.assert_array_equal(got, _rgb(pipe(PROMPT, mask=mask, distilled_cfg_scale=2.5, **call).images[0]))
    got2, _ = run_job(client, job)
    np.testing.assert_array_equal(got2, _rgb(pipe(PROMPT, distilled_cfg_scale=2.5, **call).images[0]))
    assert np.abs(got.astype(int) - got2.astype(int)).mean() > 1  # the mask acts
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    common = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 7, "image_cfg_scale": None}
    common |= {"override_settings": {"sd_model_checkpoint": "tiny-dev"}}
    call = {**call, "seed": 7}
    r = api.img2img(images=[init], denoising_strength=0.6, **common)
    assert "cfg_scale" in r.info.get("ignored", []), r.info
    np.testing.assert_array_equal(_rgb(r.image), _rgb(pipe(PROMPT, **call).images[0]))
    inpaint = {"mask_image": mask, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    r = api.img2img(images=[init], denoising_strength=0.6, **inpaint, **common)
    want = _rgb(pipe(PROMPT, mask=mask, **call).images[0])
    got = _rgb(r.image)
    np.testing.assert_array_equal(got[inside], want[inside])
    np.testing.assert_array_equal(got[~inside], _rgb(init)[~inside])
