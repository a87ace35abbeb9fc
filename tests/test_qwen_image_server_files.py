"""``sdengine serve`` on ComfyUI's Qwen-Image files: ``diffusion_models/qwen_image_*.safetensors`` served with the
Qwen2.5-VL text encoder of ``text_encoders/`` (its tokenizer folder beside it, ``qwen25_tokenizer/``) and the
Qwen-Image VAE of ``--vaes-dir``, as Flux's files are (server.dit_parts): listed with family ``qwen_image``, a native
job's image equal to ``load_pipeline(file, qwen_text=, vae=)``'s; a missing part or tokenizer is a one-line 400."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, one_line_400, run_job, server_config  # noqa: E402
from _qwen_models import make_qwen_folder  # noqa: E402
from test_qwen_image_files import write_comfy_files  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 24
MODEL = "diffusion_models/qwen_image_tiny.safetensors"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_qwen_files")
    folder = make_qwen_folder(root / "qwen-folder", wide_heads=True)
    files = write_comfy_files(folder, root / "models")
    (root / "vaes").mkdir()
    files["vae"] = files["vae"].rename(root / "vaes" / files["vae"].name)
    pipe = sdengine.load_pipeline(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"])
    config = server_config(root, models_dir=root / "models", vaes_dir=root / "vaes")
    with live_server(config, loader=None) as server:  # the server's own loader: it fills the parts
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield client, pipe, files


def test_listed_with_its_family_and_defaults(served):
    client, _, _ = served
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[MODEL]["family"] == "qwen_image"
    assert listed[MODEL]["defaults"] == {"steps": 50, "cfg_scale": 4.0, "sampler": "euler", "schedule": "normal"}


def test_native_job_equals_load_pipeline_with_the_parts(served):
    client, pipe, _ = served
    body = {"model": MODEL, "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "seed": 5, "width": W,
            "height": H}  # fmt: skip
    got, job = run_job(client, body)
    want = pipe(PROMPT, "blurry", **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    assert job["model"] == MODEL


def test_a_missing_part_or_tokenizer_is_a_one_line_400(served):
    client, _, files = served
    body = {"model": MODEL, "prompt": PROMPT, "steps": 1, "width": W, "height": H}
    moved = files["vae"].with_name("away.bin")
    files["vae"].rename(moved)
    try:
        one_line_400(client.post("/v1/jobs", json=body), "Qwen-Image VAE", "--vaes-dir")
    finally:
        moved.rename(files["vae"])
    away = files["tokenizer"].parent.parent / "tokenizer_away"
    shutil.move(files["tokenizer"], away)
    try:
        one_line_400(client.post("/v1/jobs", json=body), "Qwen2's tokenizer", "qwen25_tokenizer")
    finally:
        shutil.move(away, files["tokenizer"])
