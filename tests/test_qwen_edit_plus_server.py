"""Qwen-Image-Edit and Edit-2509 (Plus) through ``sdengine serve``'s other protocols: OpenAI's
``/v1/images/edits`` (the real ``openai`` client: the uploaded image, or several ``image[]`` for 2509, are the
edit's input images, no flag needed since an Edit model has no img2img), the native job and A1111's txt2img with
2509's several images; a mask, too many images, and A1111's img2img (an init image) are one-line 400s.

One live server on a models folder with a tiny random Edit folder and a tiny 2509 folder
(tests/_qwen_edit_models.py); each image equals the Python pipeline's for the same settings. The input images are
fitted to 64 x 64 (VAE) / 48 x 48 (vision) pixels instead of 1024^2 / 384^2 on both (the server runs in this
process), for CPU speed."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _qwen_edit_models import make_qwen_edit_folder  # noqa: E402
from sdengine.pipeline.qwen_image_edit import QwenImageEditPipeline, QwenImageEditPlusPipeline  # noqa: E402

PROMPT = "make the apple green"
STEPS = 2


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, httpx client, Edit pipeline, 2509 pipeline)."""
    root = tmp_path_factory.mktemp("serverqwenplus")
    models = root / "models"
    make_qwen_edit_folder(models / "tiny-qwen-edit")
    make_qwen_edit_folder(models / "tiny-qwen-edit-plus", seed=3, plus=True)
    areas = QwenImageEditPipeline.edit_area, QwenImageEditPlusPipeline.condition_area
    QwenImageEditPipeline.edit_area, QwenImageEditPlusPipeline.condition_area = 64 * 64, 48 * 48
    try:
        edit = sdengine.load_pipeline(models / "tiny-qwen-edit", device="cpu")
        plus = sdengine.load_pipeline(models / "tiny-qwen-edit-plus", device="cpu")
        with live_server(server_config(root, models_dir=models)) as server:
            with httpx.Client(base_url=server.url, timeout=300) as client:
                yield server.url, client, edit, plus
    finally:
        QwenImageEditPipeline.edit_area, QwenImageEditPlusPipeline.condition_area = areas


def _want(pipe, images, **kw):
    settings = {**pipe.family_defaults, "steps": STEPS, "seed": 5, **kw}
    return pipe(PROMPT, reference_images=images, progress=False, **settings).images[0]


def test_openai_edit_on_edit_models_edits_the_images(served):
    url, _, edit, plus = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    a, b = _image(120, 40), _image(60, 100, seed=1)
    extra = {"seed": 5, "steps": STEPS}
    r = client.images.edit(model="tiny-qwen-edit", image=("a.png", _png(a), "image/png"), prompt=PROMPT,
                           extra_body=extra)  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert got.size == (96, 32) and r.size == "96x32"  # size auto: the input's fitted size
    np.testing.assert_array_equal(_pixels(got), _pixels(_want(edit, [a])))
    two = [("a.png", _png(a), "image/png"), ("b.png", _png(b), "image/png")]
    r = client.images.edit(model="tiny-qwen-edit-plus", image=two, prompt=PROMPT, extra_body=extra)
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert got.size == (64, 96)  # the last image's fitted size
    np.testing.assert_array_equal(_pixels(got), _pixels(_want(plus, [a, b])))
    mask = ("m.png", _png(Image.new("RGBA", a.size)), "image/png")
    for model, change, param, needle in [
        ("tiny-qwen-edit", {"mask": mask}, "mask", "mask is not supported by Qwen-Image-Edit"),
        ("tiny-qwen-edit-plus", {"mask": mask}, "mask", "mask is not supported by Qwen-Image-Edit-2509"),
        ("tiny-qwen-edit", {"image": two}, "image", "Qwen-Image-Edit takes one image, got 2"),
        ("tiny-qwen-edit-plus", {"image": two * 2}, "image", "takes 1 to 3 images, got 4"),
        ("tiny-qwen-edit", {"extra_body": {**extra, "strength": 0.5}}, "strength", "strength is img2img's"),
    ]:
        kw = {"model": model, "image": ("a.png", _png(a), "image/png"), "prompt": PROMPT, "extra_body": extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(**{**kw, **change})
        assert e.value.body["param"] == param and needle in e.value.body["message"], e.value.body
        assert "\n" not in e.value.body["message"]


def test_native_job_and_a1111_txt2img_take_several_images(served):
    _, client, _, plus = served
    a, b = _image(120, 40), _image(60, 100, seed=1)
    job = {"model": "tiny-qwen-edit-plus", "prompt": PROMPT, "steps": STEPS, "seed": 5}
    got, _ = run_job(client, {**job, "reference_images": [_b64(a), _b64(b)]})
    np.testing.assert_array_equal(got, _pixels(_want(plus, [a, b])))
    r = client.post("/v1/jobs", json={**job, "reference_images": [_b64(a)] * 4})  # before any job or load
    assert r.status_code == 400 and "1 to 3 input images" in r.json()["detail"], r.text
    # A1111's width / height (512 when not sent) are the output's size, as with Kontext
    body = {"prompt": PROMPT, "steps": STEPS, "seed": 5, "cfg_scale": 4, "sampler_name": "Euler", "width": 48,
            "height": 64,
            "scheduler": "normal", "override_settings": {"sd_model_checkpoint": "tiny-qwen-edit-plus"}}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json={**body, "reference_images": [_b64(a), _b64(b)]})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
    want = _want(plus, [a, b], cfg_scale=4.0, sampler="euler", schedule="normal", width=48, height=64)
    np.testing.assert_array_equal(_pixels(got), _pixels(want))


def test_a1111_img2img_on_an_edit_model_is_a_one_line_400(served):
    _, client, _, _ = served
    body = {"prompt": PROMPT, "steps": STEPS, "init_images": [_b64(_image(64, 64))],
            "override_settings": {"sd_model_checkpoint": "tiny-qwen-edit"}}  # fmt: skip
    r = client.post("/sdapi/v1/img2img", json=body)
    assert r.status_code == 400, r.text
    message = r.json()["detail"]
    assert "init_image / mask" in message and "reference_images" in message and "\n" not in message, message
