"""SDXL's settings on the native route, the web page and the OpenAI route, on a live server with tiny random SDXL
base and refiner folders (and a tiny SD 1.x one): the native job's ``refiner`` hand-off gives the Python call's
pixels (``SDXLPipeline.generate_with_refiner``), the page's SDXL section (shown for SDXL models only) sends the
job's ``sdxl`` and ``refiner`` fields and shows the native API's image, and OpenAI's ``extra_body`` takes ``sdxl``
as the native job does."""

from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
from PIL import Image

import sdengine
from _live_server import live_server, server_config, wait_job
from _sdxl_models import make_sdxl_folder

SIZE, SEED = 32, 3
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
KW = dict(steps=5, cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, sampler="euler", schedule="normal")
XL = {"prompt_2": "a green pear", "original_size": [64, 48], "crops_coords_top_left": [4, 8], "target_size": [32, 32]}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_sd1_folder):
    """The server's models folder (tiny-sdxl, tiny-sdxl-refiner, tiny-sd) and the Python pipelines of the two SDXL
    models, loaded as the server's worker loads them."""
    root = tmp_path_factory.mktemp("sdxl_ui")
    folder = root / "models"
    base = make_sdxl_folder(folder / "tiny-sdxl")
    refiner = make_sdxl_folder(folder / "tiny-sdxl-refiner", refiner=True, seed=5)
    shutil.copytree(tiny_sd1_folder, folder / "tiny-sd")
    pipes = sdengine.load_pipeline(base, device="cpu"), sdengine.load_pipeline(refiner, device="cpu")
    return root, folder, pipes


@pytest.fixture(scope="module")
def server(models):
    root, folder, _ = models
    with live_server(server_config(root / "server", models_dir=folder, model="tiny-sdxl")) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def native(client: httpx.Client, **body) -> tuple[np.ndarray, dict]:
    r = client.post(
        "/v1/jobs", json={"model": "tiny-sdxl", "prompt": PROMPT, "negative_prompt": NEGATIVE, **KW, **body}
    )
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["state"] == "done", job
    image = Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB")
    return np.asarray(image, np.float64), job


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0].convert("RGB"), np.float64)


def test_native_job_hands_off_to_the_refiner_as_the_python_call(models, client):
    """``refiner`` / ``refiner_switch_at`` / ``refiner_switch_rule`` on POST /v1/jobs (there was no native field:
    only the A1111 routes ran the hand-off): the image is generate_with_refiner's with the same settings (max abs
    0), diffusers' switch rule by default, A1111's when asked, with the sdxl settings too; the infotext names the
    refiner; a switch at 1 runs the model alone and says so."""
    _, _, (b_pipe, r_pipe) = models
    want = pixels(b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, progress=False, **KW))
    alone = pixels(b_pipe(PROMPT, NEGATIVE, progress=False, **KW))
    got, job = native(client, refiner="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert np.abs(got - want).max() == 0.0
    assert np.abs(got - alone).mean() > 1.0
    assert "Refiner: tiny-sdxl-refiner" in job["infotexts"][0] and "Refiner switch at: 0.7" in job["infotexts"][0]
    # A1111's switch rule, with SDXL's micro-conditioning and second prompt (on the base and the refiner)
    want = b_pipe.generate_with_refiner(
        r_pipe, PROMPT, NEGATIVE, switch_at=0.5, switch_rule="a1111", sdxl=XL, progress=False, **KW
    )
    got, job = native(client, refiner="tiny-sdxl-refiner", refiner_switch_at=0.5, refiner_switch_rule="a1111", sdxl=XL)
    assert np.abs(got - pixels(want)).max() == 0.0
    assert "Refiner switch rule: a1111" in job["infotexts"][0]
    # 1: no step reaches the refiner (A1111 runs none then): the model alone, said in the notes
    got, job = native(client, refiner="tiny-sdxl-refiner", refiner_switch_at=1)
    assert np.abs(got - alone).max() == 0.0
    assert any("no step reaches the refiner" in n for n in job["notes"]), job["notes"]
    assert "Refiner" not in job["infotexts"][0]


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (dict(refiner="nope"), 400, "unknown model 'nope'"),
        (dict(refiner="tiny-sdxl"), 400, "refiner: 'tiny-sdxl' is the job's own model"),
        (dict(refiner="tiny-sd"), 400, "refiner: 'tiny-sd' is not an SDXL model"),
        (dict(model="tiny-sd", refiner="tiny-sdxl-refiner"), 400, "a refiner needs an SDXL base model; 'tiny-sd'"),
        (dict(refiner="tiny-sdxl-refiner", sampler="ddim"), 400, "refiner: "),
        (dict(refiner="tiny-sdxl-refiner", vae_decode="tiny"), 400, "tiny"),
        (dict(refiner="tiny-sdxl-refiner", loras=[{"name": "emoji-fruit"}]), 400, "takes no ControlNet or LoRA"),
        (dict(refiner="tiny-sdxl-refiner", refiner_switch_at=1.5), 422, "refiner_switch_at"),
        (dict(refiner="tiny-sdxl-refiner", refiner_switch_rule="comfyui"), 422, "refiner_switch_rule"),
        (dict(refiner="tiny-sdxl-refiner", refiner_hires_pass="third pass"), 422, "refiner_hires_pass"),
    ],
)
def test_native_refiner_refusals_are_one_line_before_any_job(client, body, status, says):
    r = client.post("/v1/jobs", json={"model": "tiny-sdxl", "prompt": PROMPT, **KW, **body})
    assert r.status_code == status and says.lower() in r.text.lower(), r.text
    assert client.get("/v1/jobs").json()["queued"] == 0


def test_openai_generations_take_sdxl_as_the_native_job(models, client):
    """OpenAI's route refused ``sdxl`` (an unknown parameter): SDXL's second prompt and micro-conditioning could not
    be sent there. Now ``extra_body`` ``sdxl`` is the native job's object (a JSON string in the edits form): the
    same image as the native job's; a bad one is a 400 with ``param`` ``sdxl``, in one line."""
    _, _, (b_pipe, _) = models
    want = pixels(b_pipe(PROMPT, NEGATIVE, sdxl=XL, progress=False, **KW))
    extra = dict(seed=SEED, steps=5, cfg_scale=5.0, sampler="euler", schedule="normal", negative_prompt=NEGATIVE)
    body = dict(model="tiny-sdxl", prompt=PROMPT, size=f"{SIZE}x{SIZE}", **extra)
    r = client.post("/v1/images/generations", json={**body, "sdxl": XL})
    assert r.status_code == 200, r.text
    got = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB")
    assert np.abs(np.asarray(got, np.float64) - want).max() == 0.0
    native_image, _ = native(client, sdxl=XL)
    assert np.abs(native_image - want).max() == 0.0
    for bad, says in (
        ({"crops": [1, 2]}, "unknown sdxl settings: crops"),
        ({"original_size": [64]}, "sdxl original_size must be two integers"),
        ([1, 2], "sdxl must be an object"),
        ("{not json", "(not JSON)"),
    ):
        r = client.post("/v1/images/generations", json={**body, "sdxl": bad})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "sdxl" and says in error["message"] and "\n" not in error["message"], error
    # the edits form: one JSON string
    init = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).save(init, format="PNG")
    form = {k: str(v) for k, v in {**body, "sdxl": '{"target_size": [16]}'}.items()}
    r = client.post("/v1/images/edits", data=form, files={"image": ("a.png", init.getvalue(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["param"] == "sdxl", r.text


@pytest.fixture(scope="module")
def browser():
    from pathlib import Path

    from playwright.sync_api import sync_playwright

    from test_webui import CHROMIUM, CHROMIUM_ARGS

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} missing: install Debian's chromium package (make sysdeps)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    from test_webui import WAIT_MS, open_page

    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(WAIT_MS)
    open_page(pg, server.url)
    yield pg
    context.close()
    assert not errors, errors  # no uncaught JavaScript error on the page


SDXL_INPUTS = ("#sdxl_prompt_2", "#sdxl_original_size", "#sdxl_crop", "#sdxl_target_size", "#refiner")


def sent_body(page) -> dict:
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    return sent.value.post_data_json


def test_web_page_sdxl_section_sends_the_settings_and_shows_the_apis_image(models, page, client):
    """The page had no SDXL settings: an SDXL model (GET /v1/models' family) shows its section (second prompt,
    micro-conditioning, aesthetic scores, refiner and switch), sent as the native job's ``sdxl`` and ``refiner``
    fields; the image shown is the native API's and the Python call's for the same settings; "Reuse parameters"
    fills the section again; a bad size is said at its input, the server's refusal of the refiner at the refiner's;
    an SD 1.x model (and the emoji model) hides the section and sends none of it."""
    from test_webui import UNLABELLED, shown_errors, shown_image, wait_result

    _, _, (b_pipe, r_pipe) = models
    assert page.input_value("#model") == "tiny-sdxl"
    for sel in SDXL_INPUTS:
        assert page.is_visible(sel), sel
    assert page.evaluate(UNLABELLED) == []  # every control of the section has its label
    options = page.eval_on_selector("#refiner", "(s) => [...s.options].map((o) => o.value)")
    assert options == ["", "tiny-sdxl", "tiny-sdxl-refiner"]  # the server's SDXL models, not tiny-sd nor emoji
    for sel, value in (("#prompt", PROMPT), ("#negative_prompt", NEGATIVE), ("#steps", "5"), ("#seed", str(SEED))):
        page.fill(sel, value)
    page.fill("#cfg_scale", "5")
    page.fill("#width", str(SIZE))
    page.fill("#height", str(SIZE))
    page.select_option("#sampler", "euler")
    page.select_option("#schedule", "normal")
    page.fill("#sdxl_prompt_2", "a green pear")
    page.fill("#sdxl_original_size", "48x64")  # WIDTHxHEIGHT: [64, 48] as [height, width]
    page.fill("#sdxl_crop", "4, 8")
    page.fill("#sdxl_target_size", "32x32")
    page.select_option("#refiner", "tiny-sdxl-refiner")
    page.fill("#refiner_switch_at", "0.7")
    body = sent_body(page)
    assert body["sdxl"] == XL and body["refiner"] == "tiny-sdxl-refiner" and body["refiner_switch_at"] == 0.7, body
    assert "refiner_switch_rule" not in body  # diffusers' rule, the default
    params = wait_result(page)
    assert "Refiner: tiny-sdxl-refiner" in params and "Refiner switch at: 0.7" in params, params
    shown = shown_image(page, "#results img").astype(np.float64)
    api, infotext = native(client, sdxl=XL, refiner="tiny-sdxl-refiner", refiner_switch_at=0.7)
    assert np.abs(shown - api).max() == 0.0 and params == infotext["infotexts"][0]
    want = b_pipe.generate_with_refiner(r_pipe, PROMPT, NEGATIVE, switch_at=0.7, sdxl=XL, progress=False, **KW)
    assert np.abs(shown - pixels(want)).max() == 0.0
    # "Reuse parameters" fills the section from the image's SDXL options and Refiner fields
    for sel in ("#sdxl_prompt_2", "#sdxl_original_size", "#sdxl_crop", "#sdxl_target_size"):
        page.fill(sel, "")
    page.select_option("#refiner", "")
    page.fill("#refiner_switch_at", "0.8")
    page.click("#results button:text('Reuse parameters')")
    got = [page.input_value(sel) for sel in (*SDXL_INPUTS, "#refiner_switch_at")]
    assert got == ["a green pear", "48x64", "4, 8", "32x32", "tiny-sdxl-refiner", "0.7"], got
    # a size that is not WIDTHxHEIGHT: said at its input, nothing sent; the job's own model as refiner: the 400 there
    page.fill("#sdxl_original_size", "64")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-sdxl_original_size').textContent !== ''")
    assert "WIDTHxHEIGHT" in shown_errors(page)["err-sdxl_original_size"]
    page.fill("#sdxl_original_size", "48x64")
    page.select_option("#refiner", "tiny-sdxl")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-refiner').textContent !== ''")
    assert "is the job's own model" in shown_errors(page)["err-refiner"], shown_errors(page)
    # an SD 1.x model: the section hidden and none of it sent
    for model in ("tiny-sd", "emoji"):
        page.select_option("#model", model)
        for sel in SDXL_INPUTS:
            assert page.is_hidden(sel), (model, sel)
    page.select_option("#model", "tiny-sd")
    page.fill("#width", str(SIZE))
    page.fill("#height", str(SIZE))
    body = sent_body(page)
    assert not {"sdxl", "refiner", "refiner_switch_at", "refiner_switch_rule"} & set(body), body
    wait_result(page)
