"""FLUX.2 [klein] and ``sdengine serve``: not served yet. A klein folder in the models folder is listed without a
family (GET /v1/models' null: not told), and a job naming it fails with the one line that says so, instead of
running as a Stable Diffusion model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

import httpx  # noqa: E402

from _live_server import live_server, server_config, wait_job  # noqa: E402
from sdengine.server.app import default_loader  # noqa: E402


def test_klein_folders_are_refused_by_the_server(tmp_path):
    models = tmp_path / "models"
    folder = models / "tiny-klein"  # refused from its model_index.json: no weights are needed
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "Flux2KleinPipeline", "is_distilled": True}))
    with live_server(server_config(tmp_path, models_dir=models), loader=default_loader(None)) as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert data["tiny-klein"]["family"] is None
            r = client.post("/v1/jobs", json={"model": "tiny-klein", "prompt": "a red apple", "steps": 2})
            if r.status_code == 202:
                j = wait_job(client, r.json()["id"], timeout=120)
                assert j["state"] == "failed", j
                message = str(j.get("error"))
            else:
                assert r.status_code == 400, r.text
                message = r.text
            assert "FLUX.2 models are not served yet" in message and "\n" not in message
