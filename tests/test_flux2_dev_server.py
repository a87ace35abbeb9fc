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
