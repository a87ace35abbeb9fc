"""Chroma through ``sdengine serve``: a live server whose models folder holds a tiny random Chroma folder
(tests/_chroma_models.py) and the same transformer as a Chroma single file with its VAE and T5 inside. GET /v1/models
tells the family "chroma" and Chroma's defaults before the model loads; a native job gives the Python pipeline's
image (equal pixels: the same code on the same CPU); what Chroma refuses is a one-line 400 before any job."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _chroma_models import make_chroma_folder  # noqa: E402
from _live_server import live_server, one_line_400, run_job, server_config  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
W, H = 48, 32


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverchroma")
    models = root / "models"
    make_chroma_folder(models / "tiny-chroma")
    make_chroma_folder(models / "idle-chroma", seed=1)  # never run: checked before any worker loads it
    chroma = sdengine.load_pipeline(models / "tiny-chroma", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, chroma


def test_models_list_the_chroma_family_and_defaults(served):
    _, client, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-chroma"]["family"] == "chroma" and data["idle-chroma"]["family"] == "chroma"
    want = {"steps": 35, "cfg_scale": 5.0, "sampler": "euler", "schedule": "normal"}
    assert data["idle-chroma"]["defaults"] == want


def test_native_job_gives_the_pipelines_image(served):
    _, client, chroma = served
    job = {"model": "tiny-chroma", "prompt": PROMPT, "negative_prompt": NEGATIVE, "steps": 3, "width": W, "height": H}
    got, _ = run_job(client, {**job, "seed": 5})
    want = chroma(PROMPT, NEGATIVE, **{**chroma.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_what_chroma_refuses_is_a_one_line_400(served):
    _, client, _ = served
    base = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    r = client.post("/v1/jobs", json={**base, "model": "idle-chroma", "distilled_cfg_scale": 4})
    one_line_400(r, "distilled_cfg_scale applies to FLUX.1 [dev] models only")
    r = client.post("/v1/jobs", json={**base, "model": "idle-chroma", "freeu": [1.1, 1.2, 0.9, 0.2]})
    one_line_400(r, "freeu: FreeU changes the U-Net's up blocks", "idle-chroma is a Chroma model")
