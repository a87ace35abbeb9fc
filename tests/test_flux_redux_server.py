"""FLUX.1 Redux on the server: the native job's ``redux`` (its image uploaded through /v1/uploads, or base64; the
Redux file a name of GET /v1/style_models, --models-dir's style_models/ as ComfyUI's StyleModelLoader finds it;
the SigLIP encoder a name of GET /v1/clip_vision, or the one SigLIP of --clip-vision-dir) and OpenAI's
``extra_body`` (the real ``openai`` client), each image equal to the Python call's pixels; true CFG too; the
one-line 400s."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")
safetensors_torch = pytest.importorskip("safetensors.torch")

import httpx  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.pipeline.redux import ReduxUnit  # noqa: E402
from test_siglip_redux import _randomize, hf_siglip  # noqa: E402

PROMPT = "a red apple"
W, H = 32, 32
STEPS = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, httpx client, the Flux pipeline, the Redux file, the SigLIP file): one live server."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    root = tmp_path_factory.mktemp("reduxserver")
    models = root / "models"
    make_flux_folder(models / "tiny-flux", guidance=True, seed=4)
    (models / "style_models").mkdir()
    (root / "clip_vision").mkdir()
    siglip = hf_siglip(seed=7, hidden=64, heads=1, image=32)
    sd = {("vision_model." + k if not k.startswith("vision_model.") else k): v.contiguous()
          for k, v in siglip.state_dict().items()}  # fmt: skip
    siglip_file = root / "clip_vision" / "sigclip_tiny.safetensors"
    safetensors_torch.save_file(sd, str(siglip_file))
    torch.manual_seed(1)
    embedder = ReduxImageEncoder(redux_dim=64, txt_in_features=32).eval()
    _randomize(embedder, 12)
    redux_file = models / "style_models" / "flux1-redux-tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in embedder.state_dict().items()}, str(redux_file))
    pipe = sdengine.load_pipeline(models / "tiny-flux", device="cpu")
    config = server_config(root, models_dir=models, clip_vision_dir=root / "clip_vision")
    with live_server(config) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server.url, client, pipe, redux_file, siglip_file


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _one_line_400(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    message = body["detail"] if "detail" in body else body["error"]["message"]
    assert needle in message and "\n" not in message, message


def _python(pipe, redux_file, siglip_file, image, strength=1.0, **kw) -> np.ndarray:
    unit = ReduxUnit(str(redux_file), image, str(siglip_file), strength)
    args = dict(steps=STEPS, seed=5, width=W, height=H, progress=False)
    return np.asarray(pipe(PROMPT, redux=[unit], **{**args, **kw}).images[0].convert("RGB"))


def test_native_job_with_redux_equals_the_python_call(served):
    _, client, pipe, redux_file, siglip_file = served
    assert client.get("/v1/style_models").json() == {"style_models": [{"name": "flux1-redux-tiny.safetensors"}]}
    image = picture(40, 24, seed=3)
    up = client.post("/v1/uploads", files={"file": ("r.png", _png(image), "image/png")})
    assert up.status_code in (200, 201), up.text
    upload = up.json()["id"]
    body = {"model": "tiny-flux", "prompt": PROMPT, "steps": STEPS, "seed": 5, "width": W, "height": H}
    unit = {"model": "flux1-redux-tiny.safetensors", "image": upload, "strength": 0.7}  # siglip: the one there is
    got, job = run_job(client, {**body, "redux": [unit]})
    want = _python(pipe, redux_file, siglip_file, image, 0.7)
    np.testing.assert_array_equal(got, want)
    # true CFG, the SigLIP named, the image as base64: the Python call's pixels too
    unit = {"model": "flux1-redux-tiny.safetensors", "image": base64.b64encode(_png(image)).decode(),
            "siglip": "sigclip_tiny.safetensors"}  # fmt: skip
    got, _ = run_job(client, {**body, "redux": [unit], "cfg_scale": 2.0, "negative_prompt": "dull"})
    want = _python(pipe, redux_file, siglip_file, image, cfg_scale=2.0, negative_prompt="dull")
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "unit, needle",
    [
        ({"model": "nope.safetensors", "image": "x"}, "nope.safetensors"),
        ({"model": "flux1-redux-tiny.safetensors", "image": "x", "strength": 11}, "strength"),
        ({"model": "flux1-redux-tiny.safetensors", "image": "x", "weight": 1}, "weight"),
        ({"model": "flux1-redux-tiny.safetensors", "image": "no-such-upload", "siglip": "nope"}, "nope"),
    ],
)
def test_native_refusals(served, unit, needle):
    _, client, _, _, _ = served
    body = {"model": "tiny-flux", "prompt": PROMPT, "steps": 1, "width": W, "height": H, "redux": [unit]}
    r = client.post("/v1/jobs", json=body)
    if r.status_code == 422:  # the schema's own check (pydantic): one message naming the field
        assert needle in r.text
        return
    _one_line_400(r, needle)


def test_redux_on_a_model_that_is_not_flux_is_refused(served):
    _, client, _, _, _ = served
    image = base64.b64encode(_png(picture(20, 20))).decode()
    unit = {"model": "flux1-redux-tiny.safetensors", "image": image}
    r = client.post("/v1/jobs", json={"model": "emoji", "prompt": PROMPT, "steps": 1, "redux": [unit]})
    _one_line_400(r, "redux (FLUX.1 Redux image prompts) applies to FLUX.1 models")


def test_openai_extra_body_redux_equals_the_python_call(served):
    url, _, pipe, redux_file, siglip_file = served
    image = picture(40, 24, seed=3)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    unit = {"model": "flux1-redux-tiny.safetensors", "image": base64.b64encode(_png(image)).decode()}
    r = client.images.generate(
        model="tiny-flux",
        prompt=PROMPT,
        size=f"{W}x{H}",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": STEPS, "redux": [unit]},
    )
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    np.testing.assert_array_equal(got, _python(pipe, redux_file, siglip_file, image))


def test_a1111_txt2img_top_level_redux_equals_the_python_call(served):
    """A1111's txt2img with sdengine's top-level ``redux`` (the native job's units, images base64)."""
    _, client, pipe, redux_file, siglip_file = served
    image = picture(40, 24, seed=3)
    unit = {"model": "flux1-redux-tiny.safetensors", "image": base64.b64encode(_png(image)).decode(), "strength": 1.5}
    body = {"prompt": PROMPT, "steps": STEPS, "seed": 5, "width": W, "height": H, "cfg_scale": 1,
            "sampler_name": "Euler", "scheduler": "Simple", "override_settings": {"sd_model_checkpoint": "tiny-flux"},
            "redux": [unit]}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    want = _python(pipe, redux_file, siglip_file, image, 1.5, sampler="euler", schedule="simple")
    np.testing.assert_array_equal(got, want)
    assert "Redux 0: " in r.json()["info"]
    r = client.post("/sdapi/v1/txt2img", json={**body, "redux": [{"image": "x"}]})
    _one_line_400(r, "redux[0].model must be a non-empty string")


def test_web_page_hides_the_siglip_choice_with_one_siglip_file(served):
    """One SigLIP file on the server: the page's Redux section has no SigLIP choice (the server takes its one) and
    the unit is sent without ``siglip``; the image shown is the native API's for the same body (max abs 0)."""
    pytest.importorskip("playwright")
    from _webpage import chromium, tab
    from test_webui import shown_image, wait_result

    url, client, _, _, _ = served
    with chromium() as browser, tab(browser, url) as page:
        page.select_option("#model", "tiny-flux")
        assert page.is_visible("#redux-file") and page.is_visible("#redux-strength")
        assert page.is_hidden("#redux-siglip")
        for sel, value in (("#prompt", PROMPT), ("#steps", str(STEPS)), ("#seed", "5"), ("#width", str(W)),
                           ("#height", str(H))):  # fmt: skip
            page.fill(sel, value)
        page.set_input_files("#redux-file", files=[{"name": "r.png", "mimeType": "image/png",
                                                    "buffer": _png(picture(40, 24, seed=3))}])  # fmt: skip
        with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
            page.click("#generate")
        body = sent.value.post_data_json
        assert {k: v for k, v in body["redux"][0].items() if k != "image"} == {
            "model": "flux1-redux-tiny.safetensors",
            "strength": 1,
        }, body
        wait_result(page)
        shown = shown_image(page, "#results img")
    got, _ = run_job(client, body)
    np.testing.assert_array_equal(shown, got)
