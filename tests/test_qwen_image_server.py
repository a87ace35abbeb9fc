"""Qwen-Image through ``sdengine serve``: a live server whose models folder holds a tiny random Qwen-Image folder
(tests/_qwen_models.py). GET /v1/models tells the family "qwen_image" and its defaults before the model loads; a
native job gives the Python pipeline's image (equal pixels: the same code on the same CPU); what Qwen-Image refuses
is a one-line 400 before any job."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _qwen_models import make_qwen_folder  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 24


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverqwen")
    models = root / "models"
    make_qwen_folder(models / "tiny-qwen")
    pipe = sdengine.load_pipeline(models / "tiny-qwen", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipe


def test_models_list_the_qwen_family_and_defaults(served):
    _, client, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-qwen"]["family"] == "qwen_image"
    assert data["tiny-qwen"]["defaults"] == {"steps": 50, "cfg_scale": 4.0, "sampler": "euler", "schedule": "normal"}


def test_native_job_gives_the_pipelines_image(served):
    _, client, pipe = served
    job = {"model": "tiny-qwen", "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H}
    got, _ = run_job(client, {**job, "seed": 5})
    want = pipe(PROMPT, "blurry", **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_what_qwen_refuses_is_a_one_line_400(served):
    _, client, _ = served
    base = {"model": "tiny-qwen", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    for extra, needle in (
        ({"distilled_cfg_scale": 4}, "distilled_cfg_scale"),
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "FreeU"),
        ({"pag_scale": 3.0}, "pag_scale"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message


def _b64_image(data: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_a1111_txt2img_and_img2img_give_the_pipelines_images(served):
    _, client, pipe = served
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H, "seed": 7}
    body |= {"cfg_scale": 3, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-qwen"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = _b64_image(r.json()["images"][0])
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want.convert("RGB")))
    # img2img of that picture: diffusers' step count (int(steps x strength)), as the pipeline's img2img
    r = client.post(
        "/sdapi/v1/img2img", json={**body, "init_images": [r.json()["images"][0]], "denoising_strength": 0.7}
    )
    assert r.status_code == 200, r.text
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, init_image=image.convert("RGB"),
                strength=0.7, progress=False).images[0]  # fmt: skip
    got = _b64_image(r.json()["images"][0])
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))
