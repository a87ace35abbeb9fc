"""FLUX.1 Kontext's reference images count in the size limit: each reference's tokens join the image's at every
step, and a step may hold at most the tokens of the largest image the model makes (its max_side squared, one token
per size-multiple cell). An oversized request is one line, from the pipeline and from the server's precheck
before any job is queued (the model not loaded yet: the folder's configs)."""

from __future__ import annotations

import base64
import io

import pytest

pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline.flux import token_refusal  # noqa: E402

W, H = 48, 32


def test_token_rule_counts_every_reference():
    # Flux.1: 16 px a token, max_side 8192 -> at most 512^2 = 262144 tokens a step
    assert token_refusal(1024, 1024, [], 16, 8192, "flux") is None
    assert token_refusal(1024, 1024, [(1024, 1024)] * 4, 16, 8192, "flux") is None  # 5 x 4096 tokens
    assert token_refusal(8192, 8176, [(16, 8192)], 16, 8192, "flux") is None  # 261632 + 512: exactly 262144
    why = token_refusal(8192, 8176, [(16, 8208)], 16, 8192, "flux")
    assert why == (
        "1 reference image adds 513 tokens to each step of the 8192x8176 image's 261632: 262145 in all, over flux's "
        "limit of 262144 (a 8192x8192 image's); use smaller or fewer references (reference_auto_resize puts each at "
        "about 1024x1024) or a smaller size"
    )
    assert "2 reference images add" in token_refusal(8192, 8192, [(16, 16)] * 2, 16, 8192, "flux")


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-kontext", guidance=True, seed=2)
    return folder, sdengine.load_pipeline(folder, device="cpu")


def test_pipeline_refuses_references_over_the_limit_before_any_model(kontext, monkeypatch):
    _, pipe = kontext
    assert pipe.max_side() == 256 and pipe.size_multiple == 4  # the tiny model: 32 px x 8; at most 64^2 tokens

    def no_work(*a, **k):
        raise AssertionError("a model ran")

    monkeypatch.setattr(pipe.vae, "encode", no_work)
    monkeypatch.setattr(pipe.transformer, "forward", no_work)
    big = picture(260, 260)  # 65 x 65 = 4225 tokens on its own, each side over 256 too
    with pytest.raises(GenerationError) as e:
        pipe("x", steps=1, width=W, height=H, reference_images=big, reference_auto_resize=False, progress=False)
    assert "adds 4225 tokens to each step of the 48x32 image's 96: 4321 in all" in str(e.value)
    assert "limit of 4096 (a 256x256 image's)" in str(e.value) and "\n" not in str(e.value)
    # the output at the reference's size (none given): 4096 + 4096
    with pytest.raises(GenerationError, match=r"adds 4096 tokens to each step of the 256x256 image's 4096: 8192"):
        pipe("x", steps=1, reference_images=picture(256, 256), reference_auto_resize=False, progress=False)
    # two references that fit alone but not together with the image
    with pytest.raises(GenerationError, match=r"2 reference images add 4100 tokens .* image's 96: 4196 in all"):
        pipe("x", steps=1, width=W, height=H, reference_images=[picture(200, 164)] * 2, reference_auto_resize=False,
             progress=False)  # fmt: skip


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_server_precheck_counts_reference_tokens(kontext, tmp_path):
    pytest.importorskip("fastapi")
    import shutil

    import httpx

    from _live_server import live_server, server_config

    models = tmp_path / "models"
    shutil.copytree(kontext[0], models / "tiny-kontext")
    body = {"prompt": "x", "steps": 1, "width": W, "height": H, "model": "tiny-kontext", "cfg_scale": 1.0,
            "sampler": "euler", "schedule": "normal", "reference_auto_resize": False}  # fmt: skip
    with live_server(server_config(tmp_path, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            r = client.post("/v1/jobs", json={**body, "reference_images": [_b64(picture(260, 260))]})
            alone = client.post(
                "/v1/jobs", json={**body, "width": None, "height": None, "reference_images": [_b64(picture(256, 256))]}
            )
            jobs = client.get("/v1/jobs").json()
    assert r.status_code == 400, r.text
    message = r.json()["detail"]
    assert (
        "adds 4225 tokens to each step of the 48x32 image's 96: 4321 in all, over tiny-kontext's limit of 4096"
        in (message)
        and "\n" not in message
    ), message
    assert alone.status_code == 400 and "the 256x256 image's 4096: 8192 in all" in alone.json()["detail"], alone.text
    assert jobs["jobs"] == [] and jobs["queued"] == 0, jobs  # nothing was queued
