"""FLUX.1 Redux on the web page, in Debian's Chromium driven by Playwright, on a live server with a tiny random Flux
folder, a Redux file in style_models/ and two SigLIP files in the CLIP vision folder: the page's Redux section
(shown for FLUX.1 models only) uploads its image through /v1/uploads and sends the native job's ``redux``; the
image shown is the native API's for the same body (max abs 0); the server's refusal is said under the section;
"Reuse parameters" fills the strength, model and SigLIP from the image's ``Redux 0`` field."""

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
pytest.importorskip("playwright")
safetensors_torch = pytest.importorskip("safetensors.torch")

import httpx  # noqa: E402
import torch  # noqa: E402

from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from _webpage import chromium, tab  # noqa: E402
from test_siglip_redux import _randomize, hf_siglip  # noqa: E402

REDUX = "flux1-redux-tiny.safetensors"
SIGLIPS = ("sigclip_a.safetensors", "sigclip_b.safetensors")
REDUX_INPUTS = ("#redux-file", "#redux-model", "#redux-strength", "#redux-siglip")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A live server: tiny-flux (and the emoji model), one Redux file, two SigLIP files (the same weights)."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    root = tmp_path_factory.mktemp("reduxpage")
    models = root / "models"
    make_flux_folder(models / "tiny-flux", guidance=True, seed=4)
    (models / "style_models").mkdir()
    (root / "clip_vision").mkdir()
    siglip = hf_siglip(seed=7, hidden=64, heads=1, image=32)
    sd = {("vision_model." + k if not k.startswith("vision_model.") else k): v.contiguous()
          for k, v in siglip.state_dict().items()}  # fmt: skip
    safetensors_torch.save_file(sd, str(root / "clip_vision" / SIGLIPS[0]))
    shutil.copy(root / "clip_vision" / SIGLIPS[0], root / "clip_vision" / SIGLIPS[1])
    torch.manual_seed(1)
    embedder = ReduxImageEncoder(redux_dim=64, txt_in_features=32).eval()
    _randomize(embedder, 12)
    sd = {k: v.contiguous() for k, v in embedder.state_dict().items()}
    safetensors_torch.save_file(sd, str(models / "style_models" / REDUX))
    config = server_config(root, models_dir=models, clip_vision_dir=root / "clip_vision", model="tiny-flux")
    with live_server(config) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture()
def page(browser, server):
    with tab(browser, server.url) as pg:
        yield pg


def _png() -> bytes:
    buf = io.BytesIO()
    picture(40, 24, seed=3).save(buf, format="PNG")
    return buf.getvalue()


def sent_body(page) -> dict:
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    return sent.value.post_data_json


def test_web_page_redux_section_sends_the_unit_and_shows_the_apis_image(page, client):
    """The page had no Redux input: a FLUX.1 model shows the Redux section (image, model of GET /v1/style_models,
    strength, SigLIP of GET /v1/clip_vision as there are two), sent as the native job's ``redux`` with the image
    uploaded; the shown image is the native API's for the same body (max abs 0) and not the image without Redux;
    the server's refusal (two SigLIP files, none chosen) is said under the section; "Reuse parameters" fills the
    strength, model and SigLIP; the emoji model hides the section and sends none of it."""
    from test_webui import UNLABELLED, shown_errors, shown_image, wait_result

    page.select_option("#model", "tiny-flux")
    for sel in REDUX_INPUTS:
        assert page.is_visible(sel), sel
    assert page.evaluate(UNLABELLED) == []  # every control of the section has its label
    options = page.eval_on_selector("#redux-model", "(s) => [...s.options].map((o) => o.value)")
    assert options == [REDUX]
    options = page.eval_on_selector("#redux-siglip", "(s) => [...s.options].map((o) => o.value)")
    assert options == ["", *SIGLIPS]
    for sel, value in (("#prompt", "a red apple"), ("#steps", "2"), ("#seed", "5"), ("#width", "32"),
                       ("#height", "32")):  # fmt: skip
        page.fill(sel, value)
    page.set_input_files("#redux-file", files=[{"name": "style.png", "mimeType": "image/png", "buffer": _png()}])
    page.fill("#redux-strength", "0.7")
    # two SigLIP files and none chosen: the server's 400, said under the Redux section
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-redux').textContent !== ''")
    assert "several SigLIP encoders" in shown_errors(page)["err-redux"], shown_errors(page)
    page.select_option("#redux-siglip", SIGLIPS[0])
    body = sent_body(page)
    unit = dict(body["redux"][0])
    assert len(body["redux"]) == 1 and isinstance(unit.pop("image"), str), body["redux"]
    assert unit == {"model": REDUX, "strength": 0.7, "siglip": SIGLIPS[0]}, unit
    params = wait_result(page)
    assert "Redux 0: " in params and "Strength: 0.7" in params, params
    shown = shown_image(page, "#results img").astype(np.float64)
    api, job = run_job(client, body)  # the same body (its upload id too) on the native API
    assert np.abs(shown - api.astype(np.float64)).max() == 0.0
    assert params == job["infotexts"][0]
    without, _ = run_job(client, {k: v for k, v in body.items() if k != "redux"})
    assert np.abs(shown - without.astype(np.float64)).mean() > 0.5  # Redux changed the image
    # "Reuse parameters": the unit's strength, model and SigLIP again
    page.fill("#redux-strength", "1")
    page.select_option("#redux-siglip", "")
    page.click("#results button:text('Reuse parameters')")
    got = [page.input_value(sel) for sel in REDUX_INPUTS[1:]]
    assert got == [REDUX, "0.7", SIGLIPS[0]], got
    # the emoji model: the section hidden and none of it sent
    page.select_option("#model", "emoji")
    for sel in REDUX_INPUTS:
        assert page.is_hidden(sel), sel
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.set_input_files("#redux-file", files=[{"name": "style.png", "mimeType": "image/png", "buffer": _png()}])
    body = sent_body(page)
    assert "redux" not in body, body
    wait_result(page)
