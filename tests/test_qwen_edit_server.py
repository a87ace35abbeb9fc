"""Qwen-Image-Edit through ``sdengine serve``: a live server whose models folder holds a tiny random
Qwen-Image-Edit folder (tests/_qwen_edit_models.py). The input image is the native job's ``reference_images`` (the
name FLUX.1 Kontext's references use); the job gives the Python pipeline's image (equal pixels); no input image, two
of them or an init image is a one-line 400 before any job. Both run with the input fitted to 64 x 64 pixels instead
of 1024 x 1024 (``QwenImageEditPipeline.edit_area``, the server runs in this process), which the CPU makes slow."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _qwen_edit_models import make_qwen_edit_folder  # noqa: E402
from sdengine.pipeline.qwen_image_edit import QwenImageEditPipeline  # noqa: E402

PROMPT = "make the apple green"


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverqwenedit")
    models = root / "models"
    make_qwen_edit_folder(models / "tiny-qwen-edit")
    area = QwenImageEditPipeline.edit_area
    QwenImageEditPipeline.edit_area = 64 * 64
    try:
        pipe = sdengine.load_pipeline(models / "tiny-qwen-edit", device="cpu")
        with live_server(server_config(root, models_dir=models)) as server:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                yield server, client, pipe
    finally:
        QwenImageEditPipeline.edit_area = area


def test_native_job_edits_its_reference_image(served):
    _, client, pipe = served
    img = _image(120, 40)
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-qwen-edit"]["family"] == "qwen_image"
    job = {"model": "tiny-qwen-edit", "prompt": PROMPT, "negative_prompt": "blurry", "steps": 2, "seed": 5}
    got, _ = run_job(client, {**job, "reference_images": [_b64(img)]})
    want = pipe(
        PROMPT, "blurry", **{**pipe.family_defaults, "steps": 2}, seed=5, reference_images=[img], progress=False
    )
    assert got.shape == (32, 96, 3)  # the input's aspect ratio at the (test's) edit area, multiples of 32
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_what_qwen_edit_refuses_is_a_one_line_400(served):
    _, client, _ = served
    base = {"model": "tiny-qwen-edit", "prompt": PROMPT, "steps": 2, "seed": 1}
    one = [_b64(_image(40, 40))]
    for extra, needle in (
        ({}, "reference_images=[image]"),
        ({"reference_images": one * 2}, "got 2 images"),
        ({"reference_images": one, "init_image": one[0]}, "init_image"),
        ({"reference_images": one, "distilled_cfg_scale": 4}, "distilled_cfg_scale"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (extra.keys(), r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message
