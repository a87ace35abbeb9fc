"""Z-Image through ``sdengine serve``: a live server whose models folder holds a tiny random Z-Image folder
(tests/_z_image_models.py). GET /v1/models tells the family "z_image" and Turbo's defaults before the model loads; a
native job and A1111's txt2img give the Python pipeline's image (equal pixels: the same code on the same CPU); what
Z-Image refuses is a one-line 400 before any job."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _z_image_models import make_z_folder  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverz")
    models = root / "models"
    make_z_folder(models / "tiny-z")
    pipe = sdengine.load_pipeline(models / "tiny-z", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipe


def test_models_list_the_z_image_family_and_defaults(served):
    _, client, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-z"]["family"] == "z_image"
    assert data["tiny-z"]["defaults"] == {"steps": 9, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}


def test_what_z_image_refuses_is_a_one_line_400(served):
    """Before the model loads (its refusals without the model) and after."""
    _, client, _ = served
    base = {"model": "tiny-z", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    for extra, needle in (
        ({"distilled_cfg_scale": 4}, "distilled_cfg_scale"),
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "FreeU"),
        ({"pag_scale": 3.0}, "pag_scale"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message


def test_native_and_a1111_jobs_give_the_pipelines_image(served):
    import base64
    import io

    from PIL import Image

    _, client, pipe = served
    job = {"model": "tiny-z", "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H}
    got, _ = run_job(client, {**job, "seed": 5})
    want = pipe(PROMPT, "blurry", **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H, "seed": 7}
    body |= {"cfg_scale": 3, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-z"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want.convert("RGB")))
