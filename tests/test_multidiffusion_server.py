"""MultiDiffusion on the native server: POST /v1/jobs with ``tiled_diffusion`` (an object of the settings, the
defaults for the ones left out) is the Python API's image with its infotext; bad values are 422s or one-line 400s
before anything is queued."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from _comfy_live import live_client
from _live_server import server_config, shared_loader, wait_job


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("multidiffusion")), timeout=300) as (_, c):
        yield c


def test_a_native_job_takes_tiled_diffusion(client):
    body = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 96, "height": 64, "sampler": "euler"}
    r = client.post("/v1/jobs", json={**body, "tiled_diffusion": {"window": 12, "stride": 6, "view_batch": 2}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["state"] == "done", job
    got = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB"))
    pipe = shared_loader("emoji", "cpu")
    args = dict(seed=3, steps=3, width=96, height=64, sampler="euler", progress=False)
    want = pipe("a red apple", tiled_diffusion=(12, 6, False, 2), **args)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    plain = pipe("a red apple", **args)
    assert not np.array_equal(got, np.asarray(plain.images[0].convert("RGB")))
    assert job["infotexts"][0] == want.infotexts[0] and "Tiled Diffusion window: 12x12" in want.infotexts[0]
    for bad in ({"window": 0}, {"window": "16"}, {"overlap": 8}, {"method": "mixture"}, {"circular": 1}):
        r = client.post("/v1/jobs", json={**body, "tiled_diffusion": bad})
        assert r.status_code == 422 and "tiled_diffusion" in r.text, (bad, r.text)
    r = client.post("/v1/jobs", json={**body, "tiled_diffusion": {"window": 8, "stride": 16}})
    assert r.status_code == 400 and "\n" not in r.json()["detail"], r.text
    assert "tiled diffusion stride 16 is larger than the window (8x8 cells)" in r.json()["detail"]
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), (200, 30, 30)).save(buf, format="PNG")
    unit = {
        "model": "emoji-controlnet-canny",
        "image": base64.b64encode(buf.getvalue()).decode(),
        "preprocessor": "none",
    }
    # a ControlNet runs with it (each view on its cut map: tests/test_multidiffusion.py) and changes the image
    tiled = {**body, "tiled_diffusion": {"window": 12, "stride": 6, "view_batch": 2}}
    r = client.post("/v1/jobs", json={**tiled, "controlnets": [unit]})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["state"] == "done", job
    controlled = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB"))
    assert controlled.shape == got.shape and not np.array_equal(controlled, got)
    ref = {**unit, "model": "reference_only"}
    r = client.post("/v1/jobs", json={**tiled, "controlnets": [ref]})
    assert r.status_code == 400 and "cannot run with reference control units" in r.json()["detail"], r.text
    assert client.get("/v1/jobs").json()["queued"] == 0
