"""The web page at ``/`` in a real headless Chromium (Debian's ``chromium``, driven by Playwright; no browser
download), against a live ``sdengine serve`` app on 127.0.0.1 with the emoji model at 64x64.

Every test asserts on what the page shows: the image it displays has the pixels of the API's result for
the same request and seed, the parameters it prints are the job's, errors appear next to their field.
Set ``SDENGINE_WEBUI_SCREENSHOT=docs/results/webui.png`` to keep the screenshot the first test takes.
"""

from __future__ import annotations

import base64
import io
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from _live_server import live_server, server_config, wait_job
from _vaes import other_vae
from _webpage import WAIT_MS, chromium, open_page, tab
from sdengine.models.esrgan import UpscalerSpec, build_upscaler
from sdengine.weights.upscaler_file import save_upscaler

PROMPT = "smiling face with sunglasses"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webui")
    vaes = tmp / "vaes"  # one VAE for the page's VAE choice: the emoji model's with other weights
    vaes.mkdir()
    save_file(other_vae(1), vaes / "alt.safetensors")
    upscalers = tmp / "upscalers"  # one upscaler model for the hires fix's list
    upscalers.mkdir()
    torch.manual_seed(0)
    save_upscaler(build_upscaler(UpscalerSpec("compact", 4, 3, 3, 8, 1)).eval(), upscalers / "4x-Tiny.pth")
    with live_server(server_config(tmp, max_queue=4, vaes_dir=vaes, upscalers_dir=upscalers)) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture()
def page(browser, server):
    with tab(browser, server.url) as pg:
        yield pg


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_bytes(im: Image.Image, pnginfo: PngImagePlugin.PngInfo | None = None) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=pnginfo)
    return buf.getvalue()


def shown_image(pg, selector: str) -> np.ndarray:
    """The pixels of the image an <img> shows (its loaded source, fetched inside the page)."""
    b64 = pg.eval_on_selector(
        selector,
        """async (img) => {
        if (!img.complete || !img.naturalWidth) await new Promise((ok) => img.addEventListener('load', ok));
        const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ''; for (const b of buf) s += String.fromCharCode(b); return btoa(s); }""",
    )
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def api_image(client: httpx.Client, body: dict) -> tuple[np.ndarray, str]:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json()["id"], timeout=WAIT_MS / 1000)
    assert j["state"] == "done", j
    im = Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content)).convert("RGB")
    return np.asarray(im), j["infotexts"][0]


def upload(client: httpx.Client, data: bytes) -> str:
    r = client.post("/v1/uploads", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def shown_errors(pg) -> dict[str, str]:
    return pg.evaluate(
        "Object.fromEntries([...document.querySelectorAll('.err')].filter((e) => e.textContent)"
        ".map((e) => [e.id, e.textContent]))"
    )


def wait_result(pg) -> str:
    """Wait (bounded) until the job is finished; the parameters shown under the result image."""
    pg.wait_for_function(
        "/^(Done|Failed|Cancelled|Not started|Lost|Stopped)/.test(document.querySelector('#progress-text').textContent)"
    )
    state = pg.text_content("#progress-text")
    assert state.startswith("Done"), (state, shown_errors(pg))
    return pg.text_content("#results pre.parameters")


def test_txt2img_shows_the_apis_image_with_its_parameters_and_remembers_settings(page, client, server, tmp_path):
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "12")
    page.fill("#cfg_scale", "5")
    page.fill("#seed", "7")
    assert page.input_value("#width") == "64" and page.input_value("#height") == "64"  # the model's size
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")  # generates, as the Generate button does
    params = wait_result(page)
    assert params.startswith(PROMPT + "\n") and "Steps: 12" in params and "Seed: 7" in params
    assert "Size: 64x64" in params and "CFG scale: 5" in params and "Sampler: DPM++ 2M" in params
    shown = shown_image(page, "#results img")
    # The gallery lists the outputs folder, newest first, and reopens an item with its parameters. (The
    # screenshot is taken before the API's job below, which the Queue would show running.)
    page.wait_for_selector("#gallery button img[src^=blob]")
    assert re.match(r"1–\d+ of \d+", page.text_content("#gallery-page"))
    page.wait_for_function("document.querySelector('#queue-box').hidden")
    shot = Path(os.environ.get("SDENGINE_WEBUI_SCREENSHOT") or tmp_path / "webui.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    body = {
        "prompt": PROMPT,
        "steps": 12,
        "cfg_scale": 5,
        "seed": 7,
        "width": 64,
        "height": 64,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
    }
    expected, infotext = api_image(client, body)
    assert shown.shape == (64, 64, 3)
    np.testing.assert_array_equal(shown, expected)
    assert params == infotext
    # The result's actions: reuse its parameters, send it to inpaint (the image under the mask canvas), download.
    page.fill("#prompt", "something else")
    page.fill("#steps", "30")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#prompt") == PROMPT and page.input_value("#steps") == "12"
    page.click("#results button:text('Send to inpaint')")
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.input_value("#mode") == "inpaint"
    assert page.eval_on_selector("#mask-canvas", "c => [c.width, c.height]") == [64, 64]
    np.testing.assert_array_equal(shown_image(page, "#init-preview"), expected)
    assert page.get_attribute("#results a:text('Download')", "download").endswith(".png")
    # Text to image sends no init image, so its stage is hidden (it stayed on view); back to inpaint shows it again.
    page.select_option("#mode", "txt2img")
    assert page.is_hidden("#init-stage") and page.is_hidden("#mask-canvas")
    page.select_option("#mode", "inpaint")
    assert page.is_visible("#init-stage") and page.is_visible("#mask-canvas")
    page.select_option("#mode", "txt2img")
    assert page.is_hidden("#init-stage")
    # A gallery item reopens with its parameters.
    page.evaluate("document.querySelector('#results').replaceChildren()")
    page.click("#gallery button")
    page.wait_for_selector("#results pre.parameters")
    assert page.text_content("#results pre.parameters") == infotext
    # "Reuse the last seed" puts the result's seed back; the settings survive a reload (local storage).
    page.click("#seed-random")
    assert page.input_value("#seed") == "-1"
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "7"
    open_page(page, server.url)
    assert page.input_value("#prompt") == PROMPT and page.input_value("#steps") == "12"
    assert page.input_value("#cfg_scale") == "5"


def shows_the_api_image(page, client: httpx.Client, body: dict, params: str) -> None:
    """The page's result image and parameters are the native API's for ``body`` with the sampler, schedule,
    negative prompt and guidance the page holds (it remembers settings between tests)."""
    body = dict(body)
    for field in ("sampler", "schedule", "negative_prompt"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext


def page_without(browser, server, capability: str):
    """A fresh page whose GET /v1/models says no model has ``capability`` (the page must offer it disabled)."""
    ctx = browser.new_context()
    pg = ctx.new_page()

    def without(route):
        listing = route.fetch().json()
        for m in listing["data"]:
            m[capability] = False
        route.fulfill(json=listing)

    pg.route("**/v1/models", without)
    open_page(pg, server.url)
    return ctx, pg


def test_the_tiny_vae_decoder_choice(page, client, browser, server):
    """The emoji model ships a tiny VAE: "Tiny VAE (fast)" shows the API's vae_decode "tiny" image."""
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.select_option("#vae_decode", "tiny")
    page.click("#generate")
    params = wait_result(page)
    assert "Tiny VAE: vae_tiny" in params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64, "vae_decode": "tiny"}
    shows_the_api_image(page, client, body, params)
    page.select_option("#vae_decode", "full")
    page.click("#results button:text('Reuse parameters')")  # the infotext's "Tiny VAE" selects it again
    assert page.input_value("#vae_decode") == "tiny"

    # a model without a tiny VAE (the server's list says so): the choice is disabled and falls back to the VAE
    ctx, pg = page_without(browser, server, "tiny_vae")
    assert pg.eval_on_selector("#vae_decode option[value=tiny]", "o => o.disabled") is True
    assert "has none" in pg.text_content("#vae_decode option[value=tiny]") and pg.input_value("#vae_decode") == "full"
    ctx.close()


def test_the_vae_choice(page, client):
    """The VAE selector lists GET /v1/vaes; the chosen VAE decodes the job (the API's image with that ``vae``), the
    parameters name it as A1111 does, and "Reuse parameters" selects it again from the infotext."""
    assert page.eval_on_selector_all("#vae option", "os => os.map((o) => o.value)") == ["", "alt.safetensors"]
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.select_option("#vae", "alt.safetensors")
    page.click("#generate")
    params = wait_result(page)
    assert re.search(r"VAE hash: [0-9a-f]{10}, VAE: alt\.safetensors,", params), params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64, "vae": "alt.safetensors"}
    shows_the_api_image(page, client, body, params)
    same = {f: page.input_value(f"#{f}") for f in ("sampler", "schedule", "negative_prompt")}
    own, _ = api_image(client, {**body, **same, "cfg_scale": float(page.input_value("#cfg_scale")), "vae": None})
    assert not np.array_equal(shown_image(page, "#results img"), own)  # not the model's own VAE's image
    page.select_option("#vae", "")
    page.click("#results button:text('Reuse parameters')")  # the infotext's "VAE" selects it again
    assert page.input_value("#vae") == "alt.safetensors"
    page.select_option("#vae", "")


def test_pag_scale_and_the_hires_upscalers_of_the_server(page, client):
    """The PAG scale (next to the CFG scale) is sent with the job: the API's image with that ``pag_scale``, the
    parameters name it, "Reuse parameters" sets it again; layers that
    match none of the model's are said next to their box. The hires fix's upscalers are GET /v1/upscalers's (the
    server's upscaler models too)."""
    listed = [u["name"] for u in client.get("/v1/upscalers").json()["upscalers"]]
    assert listed[-1] == "4x-Tiny" and "Lanczos" in listed
    assert page.eval_on_selector_all("#hr-upscaler option", "os => os.map((o) => o.value)") == listed
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.fill("#pag_scale", "3")
    page.click("#generate")
    params = wait_result(page)
    assert "PAG scale: 3," in params and "PAG layers" not in params, params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64, "pag_scale": 3}
    shows_the_api_image(page, client, body, params)
    page.fill("#pag_scale", "0")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#pag_scale") == "3" and page.input_value("#pag_layers") == "mid"
    page.fill("#pag_layers", "nope")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-pag_layers').textContent !== ''")
    assert "PAG layer 'nope' matches no self-attention layer" in shown_errors(page)["err-pag_layers"]
    assert page.input_value("#pag_layers") == "nope"  # the input is kept
    page.fill("#pag_layers", "mid")
    page.fill("#pag_scale", "0")


def test_freeu_is_sent_with_the_job_and_reused(page, client):
    """FreeU's factors, version and rule (next to the PAG boxes) are sent with the job: the API's image with that
    ``freeu``, the parameters name it, "Reuse parameters" sets them again; factors that are not four numbers are
    said at their box before anything is sent, and one the server refuses (over 10) there too, the input kept."""
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.fill("#freeu", "1.5, 1.6, 0.9, 0.2")
    page.select_option("#freeu_version", "1")
    page.select_option("#freeu_rule", "diffusers")
    page.click("#generate")
    params = wait_result(page)
    assert 'FreeU: "1.5,1.6,0.9,0.2", FreeU version: 1, FreeU rule: diffusers,' in params, params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64}
    body |= {"freeu": [1.5, 1.6, 0.9, 0.2], "freeu_version": 1, "freeu_rule": "diffusers"}
    shows_the_api_image(page, client, body, params)
    plain, _ = api_image(client, {**body, "freeu": None, "cfg_scale": float(page.input_value("#cfg_scale"))})
    assert not np.array_equal(shown_image(page, "#results img"), plain)  # FreeU changed the image
    page.fill("#freeu", "")
    page.select_option("#freeu_version", "2")
    page.select_option("#freeu_rule", "width")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#freeu") == "1.5, 1.6, 0.9, 0.2"
    assert (page.input_value("#freeu_version"), page.input_value("#freeu_rule")) == ("1", "diffusers")
    for typed, said in (
        ("1.5, 1.6, 0.9", "FreeU: enter four numbers b1, b2, s1, s2"),
        ("1.5, x, 0.9, 0.2", "FreeU: enter four numbers b1, b2, s1, s2"),
        ("1.5, 1.6, 0.9, 20", "freeu.3: Input should be less than or equal to 10"),  # the server's 422
    ):
        page.fill("#freeu", typed)
        page.click("#generate")
        page.wait_for_function("document.querySelector('#err-freeu').textContent !== ''")
        assert said in shown_errors(page)["err-freeu"], shown_errors(page)
        assert page.input_value("#freeu") == typed  # the input is kept
    # Forge's FreeU keys (its version 2 by width), a step window this page cannot run named; an image without
    # FreeU turns it off
    kept = {k: page.input_value(f"#{k}") for k in ("sampler", "schedule", "cfg_scale", "negative_prompt")}
    forge = (
        "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, freeu_enabled: True, "
        "freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0.25, freeu_end: 1.0"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", forge)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "forge.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert page.input_value("#freeu") == "1.3, 1.4, 0.9, 0.2"
    assert (page.input_value("#freeu_version"), page.input_value("#freeu_rule")) == ("2", "width")
    assert "FreeU's freeu_start 0.25 (this page runs every step)" in page.text_content("#err-general")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert page.input_value("#freeu") == ""
    page.select_option("#sampler", kept["sampler"])  # as the later tests found the page
    page.select_option("#schedule", kept["schedule"])
    page.fill("#cfg_scale", kept["cfg_scale"])
    page.fill("#negative_prompt", kept["negative_prompt"])
    page.select_option("#freeu_version", "2")
    page.select_option("#freeu_rule", "width")


def test_sag_is_sent_with_the_job_saved_and_reused(page, client):
    """SAG's scale, blur sigma and rule (next to the PAG and FreeU boxes) are sent with the job: the API's image with
    those settings, the parameters name them, they survive a reload, "Reuse parameters" sets them again; a blur the
    server refuses (0) is said at its box, the input kept; Forge's SAG keys in a dropped PNG set ComfyUI's rule (a
    mask threshold this page cannot run named), an image without SAG turns it off."""
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.fill("#sag_scale", "1.5")
    page.fill("#sag_blur_sigma", "3")
    page.select_option("#sag_rule", "comfyui")
    page.reload()  # saved with the page's settings
    page.wait_for_selector("body[data-ready=true]")
    assert (page.input_value("#sag_scale"), page.input_value("#sag_blur_sigma")) == ("1.5", "3")
    assert page.input_value("#sag_rule") == "comfyui"
    page.click("#generate")
    params = wait_result(page)
    assert "SAG scale: 1.5, SAG blur sigma: 3, SAG rule: comfyui," in params, params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64}
    body |= {"sag_scale": 1.5, "sag_blur_sigma": 3.0, "sag_rule": "comfyui"}
    shows_the_api_image(page, client, body, params)
    plain, _ = api_image(client, {**body, "sag_scale": 0, "cfg_scale": float(page.input_value("#cfg_scale"))})
    assert not np.array_equal(shown_image(page, "#results img"), plain)  # SAG changed the image
    page.fill("#sag_scale", "0")
    page.fill("#sag_blur_sigma", "1")
    page.select_option("#sag_rule", "diffusers")
    page.click("#results button:text('Reuse parameters')")
    assert (page.input_value("#sag_scale"), page.input_value("#sag_blur_sigma")) == ("1.5", "3")
    assert page.input_value("#sag_rule") == "comfyui"
    page.fill("#sag_blur_sigma", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-sag_blur_sigma').textContent !== ''")
    assert "sag_blur_sigma: Input should be greater than 0" in shown_errors(page)["err-sag_blur_sigma"]
    assert page.input_value("#sag_blur_sigma") == "0"  # the input is kept
    kept = {k: page.input_value(f"#{k}") for k in ("sampler", "schedule", "cfg_scale", "negative_prompt")}
    forge = (
        "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, sag_enabled: True, "
        "sag_scale: 0.75, sag_blur_sigma: 2.5, sag_threshold: 1.5"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", forge)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "forge.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert (page.input_value("#sag_scale"), page.input_value("#sag_blur_sigma")) == ("0.75", "2.5")
    assert page.input_value("#sag_rule") == "comfyui"
    assert "SAG's sag_threshold 1.5 (this page's mask threshold is 1)" in page.text_content("#err-general")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert (page.input_value("#sag_scale"), page.input_value("#sag_rule")) == ("0", "diffusers")
    assert page.input_value("#sag_blur_sigma") == "1"
    page.select_option("#sampler", kept["sampler"])  # as the later tests found the page
    page.select_option("#schedule", kept["schedule"])
    page.fill("#cfg_scale", kept["cfg_scale"])
    page.fill("#negative_prompt", kept["negative_prompt"])


def result_png(page) -> bytes:
    """The bytes of the PNG the result <img> shows (its infotext chunk too)."""
    b64 = page.eval_on_selector(
        "#results img",
        """async (img) => { const buf = new Uint8Array(await (await fetch(img.src)).arrayBuffer());
        let s = ''; for (const b of buf) s += String.fromCharCode(b); return btoa(s); }""",
    )
    return base64.b64decode(b64)


def test_deep_shrink_is_sent_with_the_job_saved_and_reused(page, client):
    """Deep Shrink's switch, block, factor, start and end (after the FreeU boxes; after_skip and the methods under
    More options) are sent with the job as its ``deep_shrink``: the API's image, the parameters name it (Forge's
    kohya_hrfix_* keys), they survive a reload, "Reuse parameters" and the result's PNG dropped set them again; a
    factor the server refuses (20) is said at its box, the input kept; an image without it turns it off."""
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")  # the advanced settings
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.select_option("#deep_shrink", "on")
    page.fill("#deep_shrink_block", "2")
    page.fill("#deep_shrink_end", "0.5")
    page.select_option("#deep_shrink_upscale", "bislerp")
    page.reload()  # saved with the page's settings
    page.wait_for_selector("body[data-ready=true]")
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")
    assert (page.input_value("#deep_shrink"), page.input_value("#deep_shrink_block")) == ("on", "2")
    assert (page.input_value("#deep_shrink_end"), page.input_value("#deep_shrink_upscale")) == ("0.5", "bislerp")
    page.click("#generate")
    params = wait_result(page)
    assert "kohya_hrfix_enabled: True, kohya_hrfix_block_number: 2," in params, params
    assert "kohya_hrfix_upscale_method: bislerp" in params, params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64}
    body["deep_shrink"] = {"block": 2, "factor": 2.0, "start": 0.0, "end": 0.5, "upscale_method": "bislerp"}
    shows_the_api_image(page, client, body, params)
    plain, _ = api_image(client, {**body, "deep_shrink": None, "cfg_scale": float(page.input_value("#cfg_scale"))})
    assert not np.array_equal(shown_image(page, "#results img"), plain)  # Deep Shrink changed the image
    defaults = {"#deep_shrink": "", "#deep_shrink_block": "3", "#deep_shrink_end": "0.35"}

    def reset() -> None:
        for sel, value in defaults.items():
            page.select_option(sel, value) if sel == "#deep_shrink" else page.fill(sel, value)
        page.select_option("#deep_shrink_upscale", "bicubic")

    reset()
    page.click("#results button:text('Reuse parameters')")
    assert (page.input_value("#deep_shrink"), page.input_value("#deep_shrink_block")) == ("on", "2")
    assert (page.input_value("#deep_shrink_end"), page.input_value("#deep_shrink_upscale")) == ("0.5", "bislerp")
    reset()
    drop_file(page, result_png(page), "result.png")  # the image's own PNG
    page.wait_for_function("document.querySelector('#deep_shrink').value === 'on'")
    assert (page.input_value("#deep_shrink_block"), page.input_value("#deep_shrink_factor")) == ("2", "2")
    assert (page.input_value("#deep_shrink_end"), page.input_value("#deep_shrink_upscale")) == ("0.5", "bislerp")
    assert page.input_value("#deep_shrink_after_skip") == "true"
    page.fill("#deep_shrink_factor", "20")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-deep_shrink_factor').textContent !== ''")
    said = shown_errors(page)["err-deep_shrink_factor"]
    assert "Deep Shrink factor: Input should be less than or equal to 9" in said, shown_errors(page)
    assert page.input_value("#deep_shrink_factor") == "20"  # the input is kept
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert (page.input_value("#deep_shrink"), page.input_value("#deep_shrink_factor")) == ("", "2")


def test_hypertile_is_sent_with_the_job_saved_and_reused(page, client):
    """HyperTile's switch (off, on, the hires fix's second pass only), tile size, swap size, depth and rule (scale
    depth under More options) are sent with the job: the API's image, the parameters name it (A1111's Hypertile
    U-Net keys), "Reuse parameters" and the result's PNG dropped set them again; a swap size the server refuses
    (200) is said at its box, the input kept; A1111's second-pass-only key sets that choice, its VAE tiling ticked."""
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")  # the advanced settings
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.select_option("#hypertile", "on")
    page.fill("#hypertile_tile", "32")
    page.fill("#hypertile_swap", "1")
    page.fill("#hypertile_depth", "0")
    page.select_option("#hypertile_rule", "comfyui")
    page.select_option("#hypertile_scale_depth", "false")
    page.click("#generate")
    params = wait_result(page)
    assert "Hypertile U-Net: True," in params and "Hypertile rule: comfyui" in params, params
    assert "Hypertile U-Net max tile size: 32" in params and "Hypertile scale depth: False" in params, params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64}
    body |= {"hypertile": [32, 1, 0], "hypertile_rule": "comfyui", "hypertile_scale_depth": False}
    shows_the_api_image(page, client, body, params)
    plain, _ = api_image(client, {**body, "hypertile": None, "cfg_scale": float(page.input_value("#cfg_scale"))})
    assert not np.array_equal(shown_image(page, "#results img"), plain)  # HyperTile changed the image
    ids = ("#hypertile", "#hypertile_tile", "#hypertile_swap", "#hypertile_depth", "#hypertile_rule")
    ids += ("#hypertile_scale_depth",)
    want = ("on", "32", "1", "0", "comfyui", "false")

    def reset() -> None:
        for sel, value in zip(ids, ("", "256", "3", "3", "a1111", "true"), strict=True):
            page.select_option(sel, value) if page.eval_on_selector(sel, "e => e.tagName") == "SELECT" else page.fill(
                sel, value
            )

    reset()
    page.click("#results button:text('Reuse parameters')")
    assert tuple(page.input_value(sel) for sel in ids) == want
    reset()
    drop_file(page, result_png(page), "result.png")  # the image's own PNG
    page.wait_for_function("document.querySelector('#hypertile').value === 'on'")
    assert tuple(page.input_value(sel) for sel in ids) == want
    page.select_option("#hypertile", "hires")  # the hires fix's second pass only: sent as such
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    assert sent.value.post_data_json["hypertile_hires_only"] is True
    assert sent.value.post_data_json["hypertile"] == [32, 1, 0]
    assert "Hypertile" not in wait_result(page)  # no hires fix: nothing tiled, nothing named
    page.select_option("#hypertile", "on")
    page.fill("#hypertile_swap", "200")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-hypertile_swap').textContent !== ''")
    said = shown_errors(page)["err-hypertile_swap"]
    assert "hypertile swap_size must be a whole number in [0, 128], got 200" in said, shown_errors(page)
    assert page.input_value("#hypertile_swap") == "200"  # the input is kept
    a1111 = (
        "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, Hypertile U-Net second pass: True, "
        "Hypertile U-Net max depth: 2, Hypertile VAE: True"
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "a1111.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert tuple(page.input_value(sel) for sel in ids) == ("hires", "256", "3", "2", "a1111", "true")
    assert page.is_checked("#hypertile_vae")  # its VAE tiling too (tests/test_webui_more.py)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert page.input_value("#hypertile") == ""


def test_the_tiny_vae_encoder_choice_in_img2img(page, client, browser, server, tmp_path):
    """The emoji model's tiny VAE has an encoder: in img2img "Encoder: Tiny VAE (fast)" gives the API's
    vae_encode "tiny" image; the choice is hidden in txt2img and disabled for a model whose tiny VAE has none."""
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    init_path = tmp_path / "init.png"
    init.save(init_path)
    page.eval_on_selector("#img2img-section", "d => { d.open = true; }")
    page.select_option("#mode", "txt2img")
    assert page.locator("#vae_encode").is_hidden()
    page.set_input_files("#init-file", str(init_path))
    page.select_option("#mode", "img2img")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.fill("#strength", "0.6")
    page.select_option("#vae_decode", "full")
    page.select_option("#vae_encode", "tiny")
    page.click("#generate")
    params = wait_result(page)
    assert "Tiny VAE encode: vae_tiny" in params and "Denoising strength: 0.6" in params
    body = {"prompt": "a red apple", "steps": 4, "seed": 3, "width": 64, "height": 64, "strength": 0.6}
    body.update({"init_image": upload(client, png_bytes(init)), "vae_encode": "tiny"})
    shows_the_api_image(page, client, body, params)
    page.select_option("#vae_encode", "full")
    page.click("#results button:text('Reuse parameters')")  # the infotext's "Tiny VAE encode" selects it again
    assert page.input_value("#vae_encode") == "tiny"
    page.select_option("#mode", "txt2img")

    ctx, pg = page_without(browser, server, "tiny_vae_encoder")
    assert pg.eval_on_selector("#vae_encode option[value=tiny]", "o => o.disabled") is True
    assert pg.eval_on_selector("#vae_decode option[value=tiny]", "o => o.disabled") is False
    assert "no encoder" in pg.text_content("#vae_encode option[value=tiny]")
    ctx.close()


def test_errors_are_shown_next_to_their_field_and_the_input_is_kept(page):
    # the inputs' maximum is the server's limit (the page said 1000 steps and 64 images whatever the server took)
    maxima = [page.get_attribute(f"#{i}", "max") for i in ("steps", "hr-steps", "width", "height", "batch_size")]
    assert maxima == ["150", "150", "2048", "2048", "8"]
    page.fill("#prompt", "a green apple")
    page.fill("#width", "60")
    page.press("#width", "Tab")
    assert page.input_value("#width") == "64"  # snapped to the model's multiple of 8
    page.fill("#width", "4096")  # a multiple of 8, but over the server's limit
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-width').textContent.length > 0")
    message = page.text_content("#err-width")
    assert "width" in message and "2048" in message and "Traceback" not in message
    assert page.get_attribute("#width", "aria-invalid") == "true"
    assert page.input_value("#prompt") == "a green apple" and page.input_value("#width") == "4096"
    assert page.is_enabled("#generate")
    # A field the browser cannot read as a number is named before anything is sent.
    page.fill("#width", "64")
    page.fill("#steps", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-steps').textContent.length > 0")
    assert "Steps" in page.text_content("#err-steps") and page.text_content("#err-width") == ""
    # A LoRA the server does not have, named by a prompt tag: shown at the LoRA list.
    page.fill("#steps", "3")
    page.fill("#prompt", "a green apple <lora:no-such-lora:0.5>")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-loras').textContent.length > 0")
    assert "unknown LoRA 'no-such-lora'" in page.text_content("#err-loras")
    assert page.is_visible("#err-loras")  # its section was opened


def test_cancel_stops_a_long_job_and_the_page_says_so(page, client):
    page.fill("#prompt", "a cat face")
    page.fill("#steps", "150")
    page.click("#generate")
    # The progress bar shows step/steps and the ETA, and a preview arrives from the event stream.
    page.wait_for_function(
        r"/^Step ([2-9]|\d\d+) \/ 150 · ETA [\d.]+ s$/.test("
        "document.querySelector('#progress-text').textContent)"
    )
    page.wait_for_selector("#live-preview[src^='data:image/png']", state="visible")
    assert int(page.get_attribute("#progress", "max")) == 150
    # The Queue's line of this job follows the bar's step (it lagged by up to its 5 s refresh).
    page.wait_for_selector("#queue li.mine", timeout=20_000)
    bar, line = page.evaluate(
        "[document.querySelector('#progress-text').textContent, document.querySelector('#queue li.mine').textContent]"
    )
    assert re.match(r"Step (\d+) /", bar).group(1) == re.match(r"running, step (\d+) /", line).group(1), (bar, line)
    t0 = time.monotonic()
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Cancelled')")
    took = time.monotonic() - t0
    text = page.text_content("#progress-text")
    step = int(re.search(r"after step (\d+) of 150", text).group(1))
    assert 2 <= step < 150, text
    job = client.get("/v1/jobs").json()["jobs"][0]
    assert job["state"] == "cancelled" and job["step"] == step
    assert took < 2 * (job["finished"] - job["started"]) / step + 10.0  # within about one step
    assert page.is_enabled("#generate") and not page.is_enabled("#cancel")


def test_inpainting_with_a_mask_painted_by_mouse(page, client, tmp_path):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    init_path = tmp_path / "init.png"
    init.save(init_path)
    # Keep what the page uploads (its fetch bodies), to check the painted mask and to replay the request.
    page.evaluate("""() => { window.uploaded = []; const f = window.fetch;
        window.fetch = (url, opts) => { if (String(url).endsWith('/v1/uploads')) window.uploaded.push(opts.body);
                                        return f(url, opts); }; }""")
    page.click("#img2img-section summary")
    page.set_input_files("#init-file", str(init_path))
    page.select_option("#mode", "inpaint")
    page.wait_for_selector("#mask-canvas", state="visible")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "4")
    page.fill("#seed", "5")
    page.fill("#strength", "0.8")
    page.fill("#mask_blur", "0")
    page.eval_on_selector("#brush", "el => { el.value = '30'; }")  # a range input: set, not typed
    page.locator("#mask-canvas").scroll_into_view_if_needed()
    box = page.locator("#mask-canvas").bounding_box()
    y = box["y"] + box["height"] / 2  # one horizontal stroke across the middle
    page.mouse.move(box["x"] + box["width"] * 0.2, y)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(box["x"] + box["width"] * (0.2 + 0.06 * k), y)
    page.mouse.up()
    page.click("#generate")
    params = wait_result(page)
    assert "Denoising strength: 0.8" in params and "Seed: 5" in params
    uploads = [
        base64.b64decode(b)
        for b in page.evaluate("""() => Promise.all(window.uploaded.map(async (b) => {
        const buf = new Uint8Array(await b.arrayBuffer()); let s = '';
        for (const x of buf) s += String.fromCharCode(x); return btoa(s); }))""")
    ]
    assert len(uploads) == 2  # the init image, then the painted mask
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(uploads[0])).convert("RGB")), np.asarray(init))
    mask = np.asarray(Image.open(io.BytesIO(uploads[1])).convert("L"))
    assert mask.shape == (64, 64)
    assert mask[32, 20:44].min() > 200 and mask[:20].max() == 0 and mask[44:].max() == 0  # painted: the stroke only
    assert mask[32, :8].max() == 0 and mask[32, 58:].max() == 0
    body = {
        "prompt": "a red apple",
        "steps": 4,
        "seed": 5,
        "width": 64,
        "height": 64,
        "cfg_scale": 7,
        "strength": 0.8,
        "mask_blur": 0,
        "init_image": upload(client, uploads[0]),
        "mask": upload(client, uploads[1]),
    }
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    # Invert and clear act on the painted mask.
    page.click("#mask-invert")
    painted = page.eval_on_selector(
        "#mask-canvas",
        """c => { const d = c.getContext('2d')
        .getImageData(0, 0, c.width, c.height).data; let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 127;
        return n; }""",
    )
    assert painted > 64 * 64 - 64 * 12
    page.click("#mask-clear")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-mask').textContent.length > 0")


def test_controlnet_preview_and_run(page, client, tmp_path):
    from sdengine.control import preprocess

    src = Image.new("RGB", (64, 64), "white")
    src.paste((0, 0, 0), (20, 20, 44, 44))
    path = tmp_path / "control.png"
    src.save(path)
    page.click("#controlnet-section summary")
    page.set_input_files("#cn-file", str(path))
    assert page.is_checked("#cn-enabled")
    page.select_option("#cn-model", "emoji-controlnet-canny")
    page.select_option("#cn-pre", "canny")
    page.click("#cn-preview-button")
    page.wait_for_selector("#cn-preview[src^=blob]", state="visible")
    edges = np.asarray(preprocess("canny", src, low=100, high=200).convert("RGB"))
    np.testing.assert_array_equal(shown_image(page, "#cn-preview"), edges)
    page.fill("#prompt", "a smiling face")
    page.fill("#steps", "3")
    page.fill("#seed", "3")
    page.fill("#cn-weight", "0.8")
    page.click("#generate")
    params = wait_result(page)
    assert "ControlNet 0: " in params and "emoji-controlnet-canny" in params
    body = {
        "prompt": "a smiling face",
        "steps": 3,
        "seed": 3,
        "width": 64,
        "height": 64,
        "cfg_scale": 7,
        "controlnets": [
            {
                "model": "emoji-controlnet-canny",
                "image": upload(client, path.read_bytes()),
                "preprocessor": "canny",
                "low": 100,
                "high": 200,
                "weight": 0.8,
            }
        ],
    }
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext


def drop_file(pg, data: bytes, name: str, target: str = "#results") -> None:
    pg.eval_on_selector(
        target,
        """(el, [b64, name]) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], name, { type: 'image/png' }));
        el.dispatchEvent(new DragEvent('drop', { dataTransfer: dt, bubbles: true, cancelable: true })); }""",
        [base64.b64encode(data).decode(), name],
    )


def test_dropping_a_png_fills_the_form(page):
    from sdengine.metadata import format_parameters

    # Made by sdengine: a tEXt chunk.
    text = format_parameters(
        {
            "prompt": "a yellow star",
            "negative_prompt": "blurry",
            "steps": 17,
            "sampler": "euler_a",
            "schedule": "karras",
            "cfg_scale": 5.5,
            "seed": 1234,
            "width": 64,
            "height": 48,
        }
    )
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "star.png")
    page.wait_for_function("document.querySelector('#prompt').value === 'a yellow star'")
    got = {
        k: page.input_value(f"#{k}")
        for k in (
            "negative_prompt",
            "steps",
            "sampler",
            "schedule",
            "cfg_scale",
            "seed",
            "width",
            "height",
            "clip_skip",
        )
    }
    assert got == {
        "negative_prompt": "blurry",
        "steps": "17",
        "sampler": "euler_a",
        "schedule": "karras",
        "cfg_scale": "5.5",
        "seed": "1234",
        "width": "64",
        "height": "48",
        "clip_skip": "1",
    }
    assert (page.input_value("#strength_rule"), page.input_value("#clip_skip_rule")) == ("diffusers", "sdengine")
    # As AUTOMATIC1111 writes it for a non-Latin-1 prompt: a compressed iTXt chunk, a combined sampler name.
    a1111 = (
        '🍎 apple, <lora:emoji-fruit:0.7>\nsecond line\nNegative prompt: ugly, "bad"\n'
        "Steps: 9, Sampler: DPM++ 2M Karras, CFG scale: 4, Seed: 99, Size: 64x64, "
        "Model hash: abcdef1234, Model: emoji, Denoising strength: 0.35, Clip skip: 2, Version: v1.10.1"
    )
    info = PngImagePlugin.PngInfo()
    info.add_itxt("parameters", a1111, zip=True)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "a1111.png", target="#h-settings")
    page.wait_for_function("document.querySelector('#seed').value === '99'")
    assert page.input_value("#prompt") == "🍎 apple, <lora:emoji-fruit:0.7>\nsecond line"
    assert page.input_value("#negative_prompt") == 'ugly, "bad"'
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("dpmpp_2m", "karras")
    assert page.input_value("#steps") == "9" and page.input_value("#strength") == "0.35"
    assert page.input_value("#clip_skip") == "2"
    # an A1111 image has A1111's meanings (as --from-png reads it): its step count and its Clip skip, which
    # applies to SD 1.x's CLIP only (the emoji model's MiniLM once failed the job)
    assert (page.input_value("#strength_rule"), page.input_value("#clip_skip_rule")) == ("a1111", "a1111")
    # every setting found: nothing said to be missing (a set value was once reported as not on this server)
    assert page.text_content("#err-general") == ""
    # A PNG without parameters is named, and the form is left as it was.
    drop_file(page, png_bytes(Image.new("RGB", (8, 8))), "plain.png")
    page.wait_for_function("document.querySelector('#err-general').textContent.includes('plain.png')")
    assert page.input_value("#seed") == "99"
    # An older A1111 infotext: a plain sampler name and no schedule type is the model's own spacing.
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 5, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "old.png")
    page.wait_for_function("document.querySelector('#seed').value === '5'")
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("euler", "normal")
    assert page.input_value("#negative_prompt") == "" and page.input_value("#clip_skip") == "1"


@pytest.mark.parametrize(
    "a1111,expected",
    [
        ("DPM++ 2S a, Schedule type: Align Your Steps", ("dpmpp_2s_a", "align_your_steps")),
        ("DPM++ 3M SDE, Schedule type: KL Optimal", ("dpmpp_3m_sde", "kl_optimal")),
        ("Restart, Schedule type: DDIM", ("restart", "ddim_uniform")),
    ],
)
def test_dropping_a_png_of_a1111s_newer_samplers_and_schedule_types_fills_them_in(page, a1111, expected):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a cat face\nSteps: 20, Sampler: {a1111}, CFG scale: 7, Seed: 6, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "new.png")
    page.wait_for_function("document.querySelector('#seed').value === '6'")
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == expected
    assert page.locator("#schedule option[value='beta']").text_content() == "Beta"


UNLABELLED = """() => [...document.querySelectorAll(
            'input, select, textarea, button, progress, canvas, img')].filter((el) => {
        if (el.tagName === 'IMG') return !el.hasAttribute('alt');
        if (el.getAttribute('aria-label') || el.getAttribute('aria-labelledby')) return false;
        if (el.labels && el.labels.length && [...el.labels].some((l) => l.textContent.trim())) return false;
        if (el.tagName === 'BUTTON' && el.textContent.trim()) return false;
        return true; }).map((el) => el.outerHTML.slice(0, 80))"""


def test_every_control_has_a_label_and_the_page_fits_a_phone(page, browser, server):
    unlabelled = page.evaluate(UNLABELLED)
    assert unlabelled == []
    assert page.locator("#lora-list input").count() >= 2  # the LoRA rows were checked too
    page.evaluate("document.body.append(document.createElement('input'))")  # the check sees a bare input
    assert page.evaluate(UNLABELLED) == ["<input>"]
    for scheme in ("light", "dark"):
        ctx = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme=scheme)
        pg = ctx.new_page()
        open_page(pg, server.url)
        assert pg.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
        top = pg.evaluate("(id) => document.getElementById(id).getBoundingClientRect().top", "output")
        assert top < pg.evaluate("document.getElementById('h-settings').getBoundingClientRect().top")  # result first
        bg = pg.evaluate("getComputedStyle(document.body).backgroundColor")
        assert bg == ("rgb(246, 247, 249)" if scheme == "light" else "rgb(18, 20, 24)")
        ctx.close()


def test_with_an_api_key_the_page_asks_once_and_sends_it(browser, tmp_path):
    with live_server(server_config(tmp_path, api_key="s3cret-key")) as s:
        assert httpx.get(s.url + "/").status_code == 200  # the page itself is public...
        assert httpx.get(s.url + "/static/app.js").status_code == 200
        assert httpx.get(s.url + "/v1/models").status_code == 401  # ...the API is not
        assert httpx.post(s.url + "/static/app.js").status_code == 401
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.goto(s.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        pg.fill("#key-input", "wrong")
        pg.click("#key-ok")
        pg.wait_for_function("document.querySelector('#err-key').textContent.includes('refused')")
        pg.fill("#key-input", "s3cret-key")
        pg.click("#key-ok")
        pg.wait_for_selector("body[data-ready=true]")
        assert pg.input_value("#model") == "emoji"
        pg.fill("#prompt", "a red apple")
        pg.fill("#steps", "2")
        pg.click("#generate")
        assert "Steps: 2" in wait_result(pg)  # the event stream and the image came with the key
        pg.reload()  # asked once: the key is remembered
        pg.wait_for_selector("body[data-ready=true]")
        assert not pg.is_visible("#key-dialog")
        ctx.close()


def test_a_full_queue_is_said_in_words_and_the_input_kept(browser, tmp_path):
    with live_server(server_config(tmp_path, max_queue=0)) as s:  # every job is refused with a 429
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        open_page(pg, s.url)
        pg.fill("#prompt", "a cat face")
        pg.click("#generate")
        pg.wait_for_function("document.querySelector('#err-general').textContent.length > 0")
        assert pg.text_content("#err-general").startswith("The server's queue is full; try again in ")
        assert pg.input_value("#prompt") == "a cat face" and pg.is_enabled("#generate")
        ctx.close()


def test_a_clients_full_share_of_the_queue_is_said_as_such(browser, tmp_path):
    """--max-queued-per-client: the page's own client has its share waiting (others would still be served), so the
    page says that, not that the server's queue is full."""
    import threading

    gate = threading.Event()

    def held(ref: str, device: str) -> Any:  # the worker holds its first job in the load: later ones stay queued
        gate.wait(60)
        raise OSError("the test's loader loads nothing")

    cfg = server_config(tmp_path, max_queued_per_client=1)
    with live_server(cfg, loader=held) as s, httpx.Client(base_url=s.url, timeout=30) as c:
        try:  # the gate opens before the server stops (it waits for its worker)
            body = {"prompt": "x", "steps": 2, "width": 64, "height": 64}
            assert c.post("/v1/jobs", json=body).status_code == 202
            deadline = time.monotonic() + 30
            while not s.services.manager.running() and time.monotonic() < deadline:
                time.sleep(0.02)
            assert c.post("/v1/jobs", json=body).status_code == 202  # this client's one waiting job
            ctx = browser.new_context()
            pg = ctx.new_page()
            pg.set_default_timeout(WAIT_MS)
            open_page(pg, s.url)
            pg.fill("#prompt", "a cat face")
            pg.click("#generate")
            pg.wait_for_function("document.querySelector('#err-general').textContent.length > 0")
            text = pg.text_content("#err-general")
            assert text.startswith("You already have as many jobs waiting as this server lets one client queue")
            assert pg.input_value("#prompt") == "a cat face" and pg.is_enabled("#generate")
            ctx.close()
        finally:
            gate.set()


def test_escape_on_the_key_dialog_leaves_a_working_page(browser, tmp_path):
    """Escape closed the key dialog and left every request waiting on it: no pickers, Generate stuck at
    "Sending…". Now the page says a key is needed and the "API key" button brings the dialog back."""
    with live_server(server_config(tmp_path, api_key="s3cret-key")) as s:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.goto(s.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        pg.keyboard.press("Escape")
        pg.wait_for_function("document.querySelector('#err-general').textContent.includes('needs an API key')")
        assert pg.is_visible("#key-button")
        pg.click("#key-button")
        pg.wait_for_selector("#key-dialog[open]")
        pg.fill("#key-input", "s3cret-key")
        pg.click("#key-ok")
        pg.wait_for_selector("body[data-ready=true]")
        assert pg.input_value("#model") == "emoji" and pg.text_content("#err-general") == ""
        ctx.close()


def test_reusing_parameters_does_not_apply_a_lora_twice(page, client):
    """The infotext's prompt carries <lora:NAME:W>; with the LoRA's box still ticked the reused request had
    the LoRA twice (twice the weight). Now reusing unticks the boxes: the same request, the same image."""
    page.fill("#prompt", "an apple")
    page.fill("#steps", "3")
    page.fill("#seed", "11")
    page.click("#lora-section summary")
    page.check("#lora-use-0")
    page.fill("#lora-weight-0", "0.8")
    page.click("#generate")
    first = wait_result(page)
    assert "<lora:emoji-fruit:0.8>" in first
    page.click("text=Reuse parameters")
    assert not page.is_checked("#lora-use-0")
    page.click("#generate")
    again = wait_result(page)
    assert again == first and again.count("<lora:") == 1, again


def test_cancel_while_sending_and_a_reload_mid_job(page, client, server):
    """Cancel pressed before the job had an id once did nothing; a reload mid-job once lost the job (the page
    said idle while the server ran it). Now the cancel is applied as soon as the id comes, and a reloaded page
    follows its job again."""
    # The POST is held back, so the cancel comes while the job is being sent.
    page.route("**/v1/jobs", lambda route: (time.sleep(1.5), route.continue_()))
    page.fill("#prompt", "a cat face")
    page.fill("#steps", "150")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#progress-text').textContent === 'Sending…'")
    assert page.is_enabled("#cancel")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Cancelled')")
    page.unroute("**/v1/jobs")
    assert client.get("/v1/jobs").json()["jobs"][0]["state"] == "cancelled"
    # A reload while the job runs: the page finds it again and shows its end.
    page.click("#generate")
    page.wait_for_function(r"/^Step \d+ \/ 150/.test(document.querySelector('#progress-text').textContent)")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.wait_for_function(r"/^Step \d+ \/ 150/.test(document.querySelector('#progress-text').textContent)")
    assert page.is_enabled("#cancel") and not page.is_enabled("#generate")
    page.click("#cancel")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Cancelled')")
    assert page.is_enabled("#generate")


def test_bad_controlnet_thresholds_and_a_bad_init_file_are_shown_at_their_fields(page, tmp_path):
    control = tmp_path / "control.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(control)
    page.click("#controlnet-section summary")
    page.set_input_files("#cn-file", str(control))
    page.fill("#cn-low", "")  # once sent as null and silently replaced by the default
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-controlnet').textContent.length > 0")
    assert "Canny low threshold: enter a number" in page.text_content("#err-controlnet")
    assert page.get_attribute("#cn-low", "aria-invalid") == "true"
    page.fill("#cn-low", "0.1")
    page.uncheck("#cn-enabled")
    # An init image that is no image: said at the init image, not as a nameless "upload: ..." at the top
    bad = tmp_path / "notimage.png"
    bad.write_bytes(b"hello")
    page.click("#img2img-section summary")
    page.set_input_files("#init-file", str(bad))
    page.wait_for_function("document.querySelector('#err-init_image').textContent.length > 0")
    assert "not an image" in page.text_content("#err-init_image") and not page.is_visible("#init-stage")


def test_a_page_opened_while_the_server_is_away_loads_when_it_answers(browser, server):
    """A page opened while the server was down (or restarting) once stayed without its model and sampler lists
    after the server came back, and Generate sent an empty sampler ("unknown sampler ''"). Now it says that it
    is not connected, asks again every 2 s, and works once the server answers."""
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(WAIT_MS)
    away = {"on": True}
    posted: list[str] = []
    pg.on("request", lambda r: posted.append(r.url) if r.method == "POST" else None)
    pg.route("**/v1/**", lambda route: route.abort() if away["on"] else route.continue_())
    pg.goto(server.url + "/")
    pg.wait_for_function("document.querySelector('#err-general').textContent.includes('trying again')", timeout=10_000)
    assert "cannot reach the server" in pg.text_content("#err-general")
    pg.fill("#prompt", "a red apple")
    pg.click("#generate")
    assert "not connected" in pg.text_content("#err-general") and posted == []  # nothing sent
    away["on"] = False
    pg.wait_for_selector("body[data-ready=true]", timeout=10_000)
    assert pg.input_value("#model") == "emoji" and pg.input_value("#sampler") == "dpmpp_2m"
    assert pg.text_content("#err-general") == "" and pg.input_value("#prompt") == "a red apple"
    ctx.close()


def test_an_event_stream_error_is_not_a_lost_job(page):
    """A 5xx on the job's event stream (a proxy's 502/504) once made the page say "Lost the connection" and drop
    a job the server was running; an image that could not be fetched after the job was done was said the same.
    Now the page asks for the job instead and shows its result, and a done job whose image is missing says so."""
    page.route("**/v1/jobs/*/events", lambda route: route.fulfill(status=502, body="Bad Gateway"))
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "5")
    page.click("#generate")
    assert "Seed: 5" in wait_result(page)
    page.unroute("**/v1/jobs/*/events")
    page.route("**/v1/images/**", lambda route: route.fulfill(status=404, json={"detail": "no such image"}))
    page.click("#generate")
    page.wait_for_function("/^(Done|Lost|Stopped)/.test(document.querySelector('#progress-text').textContent)")
    assert page.text_content("#progress-text") == "Done, but its images could not be shown"
    assert page.text_content("#err-general") == "no such image" and page.is_enabled("#generate")
    page.unroute("**/v1/images/**")


def long_jobs(client: httpx.Client, batch_size: int = 1) -> tuple[str, str]:
    """Two long jobs by the API: the first running (waited for, bounded), the second queued behind it (a different
    step count, so that the server does not batch them together). ``batch_size`` makes the first one longer still
    (150 steps of one 64 px image take about 2 s on an idle machine)."""
    body = {"prompt": "a cat face", "steps": 150, "width": 64, "height": 64, "batch_size": batch_size}
    first = client.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{first}").json()["state"] == "queued" and time.monotonic() < deadline:
        time.sleep(0.05)
    second = client.post("/v1/jobs", json={"prompt": "a cat face", "steps": 149, "width": 64, "height": 64}).json()
    return first, second["id"]


def test_a_queued_jobs_place_follows_the_queue(page, client):
    """The event stream says nothing while a job waits, so the page kept saying "1 job(s) before this one"
    after the job ahead of it left the queue. Now it asks for its place while queued."""
    running, ahead = long_jobs(client)
    try:
        page.fill("#prompt", "a red apple")
        page.fill("#steps", "2")
        page.click("#generate")
        page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Queued: 1 job')")
        client.delete(f"/v1/jobs/{ahead}")
        page.wait_for_function(
            "document.querySelector('#progress-text').textContent === 'Queued: next'", timeout=10_000
        )
    finally:
        client.delete(f"/v1/jobs/{ahead}")
        client.delete(f"/v1/jobs/{running}")
    assert "Steps: 2" in wait_result(page)


def test_a_refused_controlnet_or_lora_weight_marks_its_own_input(page, tmp_path):
    """A 422 on a list item was named "controlnets.0.weight" / "loras.0.weight" at the section with no input
    marked invalid; now it is named by the input's label and that input is marked."""
    control = tmp_path / "control.png"
    Image.new("RGB", (64, 64), "white").save(control)
    page.fill("#prompt", "a red apple")
    page.click("#controlnet-section summary")
    page.set_input_files("#cn-file", str(control))
    page.fill("#cn-weight", "5")  # over the server's 2
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-controlnet').textContent.length > 0")
    assert page.text_content("#err-controlnet").startswith("ControlNet weight: ")
    assert "2" in page.text_content("#err-controlnet")
    assert page.get_attribute("#cn-weight", "aria-invalid") == "true" and page.input_value("#cn-weight") == "5"
    page.uncheck("#cn-enabled")
    page.click("#lora-section summary")
    page.check("#lora-use-0")
    page.fill("#lora-weight-0", "100")  # over the server's 10
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-loras').textContent.length > 0")
    assert page.text_content("#err-loras").startswith("LoRA emoji-fruit weight: ")
    assert page.get_attribute("#lora-weight-0", "aria-invalid") == "true"
    assert page.get_attribute("#cn-weight", "aria-invalid") is None  # the earlier mark was cleared


def test_the_keyboard_focus_is_visible_on_an_invalid_field(page):
    """The red outline of a field marked invalid replaced the browser's focus ring: tabbing onto it showed no
    focus. Now the focused invalid field has the accent ring."""
    page.fill("#steps", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-steps').textContent.length > 0")
    outline = "(el) => { const s = getComputedStyle(el); return [s.outlineStyle, s.outlineWidth, s.outlineColor]; }"
    page.focus("#cfg_scale")
    unfocused = page.eval_on_selector("#steps", outline)
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("document.activeElement.id") == "steps"
    focused = page.eval_on_selector("#steps", outline)
    assert focused != unfocused and focused[0] != "none" and focused[1] == "2px", (focused, unfocused)


def test_the_gallery_goes_back_when_images_were_removed(browser, tmp_path):
    """On the gallery's second page, after images were removed from the outputs folder, Refresh showed an
    empty page "13–3 of 3" with Newer enabled; now it shows the last page there is."""
    with live_server(server_config(tmp_path)) as s:
        outputs = tmp_path / "outputs"
        outputs.mkdir(exist_ok=True)
        for i in range(14):
            (outputs / f"{i:05d}.png").write_bytes(png_bytes(Image.new("RGB", (8, 8), (i * 15, 0, 0))))
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        open_page(pg, s.url)
        pg.wait_for_function("document.querySelector('#gallery-page').textContent === '1–12 of 14'")
        pg.click("#gallery-next")
        pg.wait_for_function("document.querySelector('#gallery-page').textContent === '13–14 of 14'")
        for p in sorted(outputs.glob("*.png"))[3:]:
            p.unlink()
        pg.click("#gallery-refresh")
        pg.wait_for_function("document.querySelector('#gallery-page').textContent !== '13–14 of 14'")
        assert pg.text_content("#gallery-page") == "1–3 of 3"
        assert pg.locator("#gallery button").count() == 3 and not pg.is_enabled("#gallery-prev")
        ctx.close()


def test_the_hires_fix(page, client):
    """The hires fix (the native API's ``hires``): the page's image is the API's for the same settings, its
    upscalers are sdengine's and the server's models, reusing the parameters ticks it again with its settings,
    and it is refused in img2img (the server runs it for text to image only)."""
    from sdengine.pipeline.hires import UPSCALERS

    options = page.eval_on_selector("#hr-upscaler", "s => [...s.options].map((o) => o.value)")
    assert options == [*UPSCALERS, "4x-Tiny"]  # sdengine's, then the server's upscaler model
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#hires-section summary")
    page.check("#hr-enabled")
    page.fill("#hr-scale", "1.5")
    page.select_option("#hr-upscaler", "Lanczos")
    page.fill("#hr-steps", "2")
    page.fill("#hr-strength", "0.5")
    page.click("#generate")
    params = wait_result(page)
    assert "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Lanczos" in params
    assert "Denoising strength: 0.5" in params
    body = {"prompt": "a red apple", "steps": 2, "seed": 3, "width": 64, "height": 64, "strength": 0.5}
    body["hires"] = {"hr_scale": 1.5, "hr_upscaler": "Lanczos", "hr_second_pass_steps": 2}
    shows_the_api_image(page, client, body, params)
    assert page.eval_on_selector("#results img", "img => [img.naturalWidth, img.naturalHeight]") == [96, 96]
    page.uncheck("#hr-enabled")
    page.fill("#hr-scale", "2")
    page.fill("#hr-steps", "0")
    page.click("#results button:text('Reuse parameters')")
    assert page.is_checked("#hr-enabled") and page.input_value("#hr-upscaler") == "Lanczos"
    assert (page.input_value("#hr-scale"), page.input_value("#hr-steps"), page.input_value("#hr-strength")) == (
        "1.5",
        "2",
        "0.5",
    )
    # A scale the server refuses is named at its input; img2img with the hires fix is refused before sending.
    page.fill("#hr-scale", "100")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-hires').textContent.length > 0", timeout=20_000)
    assert page.text_content("#err-hires").startswith("Hires upscale by: ")
    assert page.get_attribute("#hr-scale", "aria-invalid") == "true"
    page.fill("#hr-scale", "1.5")
    page.click("#img2img-section summary")
    page.select_option("#mode", "img2img")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-hires').textContent.length > 0", timeout=20_000)
    assert "for text to image" in page.text_content("#err-hires")
    page.select_option("#mode", "txt2img")


def test_what_is_typed_survives_a_reload_before_the_field_is_left(page, server):
    """Settings were saved on "change" only, which a text field fires when it loses focus: a prompt typed and
    the tab reloaded right away was lost. Now they are saved as they are typed."""
    page.click("#prompt")
    page.keyboard.type("typed then reloaded")
    page.click("#steps")
    page.keyboard.press("Control+A")
    page.keyboard.type("33")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#prompt") == "typed then reloaded" and page.input_value("#steps") == "33"


MASK_ALPHA = """c => { const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    const a = []; for (let i = 3; i < d.length; i += 4) a.push(d[i]); return a.join(','); }"""


def test_the_inpainting_mask_undo(page, tmp_path):
    """Undo (and Ctrl+Z outside text fields) steps back over mask strokes, inverts and clears."""
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (90, 120, 200)).save(init)
    page.click("#img2img-section summary")
    page.set_input_files("#init-file", str(init))
    page.select_option("#mode", "inpaint")
    page.wait_for_selector("#mask-canvas", state="visible")
    box = page.locator("#mask-canvas").bounding_box()

    def stroke(x0: float, y0: float, x1: float, y1: float) -> None:
        page.mouse.move(box["x"] + x0 * box["width"], box["y"] + y0 * box["height"])
        page.mouse.down()
        page.mouse.move(box["x"] + x1 * box["width"], box["y"] + y1 * box["height"], steps=4)
        page.mouse.up()

    empty = page.eval_on_selector("#mask-canvas", MASK_ALPHA)
    stroke(0.2, 0.5, 0.8, 0.5)
    one = page.eval_on_selector("#mask-canvas", MASK_ALPHA)
    stroke(0.5, 0.1, 0.5, 0.9)
    two = page.eval_on_selector("#mask-canvas", MASK_ALPHA)
    assert len({empty, one, two}) == 3
    page.click("#mask-undo")
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == one
    page.click("#mask-clear")
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == empty
    page.keyboard.press("Control+z")  # the focus is on the Clear button, not in a text field
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == one
    page.click("#mask-invert")
    page.click("#mask-undo")
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == one
    page.click("#mask-undo")
    page.click("#mask-undo")  # nothing left to undo: stays empty
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == empty
    page.fill("#prompt", "a red apple")
    page.click("#generate")  # an undone mask is no mask
    page.wait_for_function("document.querySelector('#err-mask').textContent.length > 0", timeout=20_000)
    stroke(0.2, 0.5, 0.8, 0.5)
    again = page.eval_on_selector("#mask-canvas", MASK_ALPHA)
    assert again != empty
    page.focus("#prompt")
    page.keyboard.press("Control+z")  # in the prompt, Ctrl+Z is the text's own undo, not the mask's
    assert page.eval_on_selector("#mask-canvas", MASK_ALPHA) == again
    page.select_option("#mode", "txt2img")


def test_the_queue_lists_the_servers_jobs_and_cancels_one(page, client, server):
    """The Queue lists the server's unfinished jobs (any client's), running first, and cancels the one picked."""
    assert page.is_hidden("#queue-box")
    running, waiting = long_jobs(client)
    try:
        open_page(page, server.url)
        page.wait_for_selector("#queue-box", state="visible")
        rows = page.locator("#queue li")
        assert rows.count() == 2
        assert rows.nth(0).text_content().startswith("running, step ") and "queued, next" in rows.nth(1).text_content()
        page.click(f"#queue button[aria-label='Cancel the queued job {waiting}']")
        page.wait_for_function("document.querySelectorAll('#queue li').length === 1")
        assert client.get(f"/v1/jobs/{waiting}").json()["state"] == "cancelled"
        assert client.get(f"/v1/jobs/{running}").json()["state"] == "running"
        page.click(f"#queue button[aria-label='Cancel the running job {running}']")
        page.wait_for_selector("#queue-box", state="hidden")
        assert client.get(f"/v1/jobs/{running}").json()["state"] == "cancelled"
    finally:
        client.delete(f"/v1/jobs/{waiting}")
        client.delete(f"/v1/jobs/{running}")


def test_reuse_seed_takes_the_seed_of_the_image_shown(page, client):
    """♻ kept the last job's seed after a gallery image with another seed was opened; it now takes the seed of
    the image shown, and is disabled while none is."""
    assert not page.is_enabled("#seed-reuse")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "21")
    page.click("#generate")
    wait_result(page)
    api_image(client, {"prompt": "a pear", "steps": 2, "seed": 22, "width": 64, "height": 64})  # newest in the gallery
    page.click("#gallery-refresh")
    page.wait_for_function("document.querySelector('#gallery button')?.title.includes('Seed: 22')")
    page.click("#gallery button")
    page.wait_for_function("document.querySelector('#results pre').textContent.includes('Seed: 22')")
    page.fill("#seed", "-1")
    page.click("#seed-reuse")
    assert page.input_value("#seed") == "22"


def test_the_keyboard_focus_follows_generate_and_cancel(page):
    """Generate and Cancel disable each other: the focus on the one being disabled fell back to the page's start.
    Now it moves to the other, so Enter, Enter generates and cancels, and the focus is back on Generate."""
    page.fill("#prompt", "a cat face")
    page.fill("#steps", "150")
    page.focus("#generate")
    page.keyboard.press("Enter")
    page.wait_for_function("document.activeElement.id === 'cancel'", timeout=10_000)
    page.wait_for_function(r"/^Step \d+/.test(document.querySelector('#progress-text').textContent)")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelector('#progress-text').textContent.startsWith('Cancelled')")
    assert page.evaluate("document.activeElement.id") == "generate"


def test_opening_a_gallery_image_that_is_gone_says_so(page, client):
    """A gallery image removed after the list was read: the click once threw an uncaught error and showed
    nothing; now the server's answer is shown (and the page fixture checks there is no uncaught error)."""
    api_image(client, {"prompt": "a pear", "steps": 2, "seed": 1, "width": 64, "height": 64})
    page.click("#gallery-refresh")
    page.wait_for_selector("#gallery button img[src^=blob]")
    page.route("**/v1/images/**", lambda route: route.fulfill(status=404, json={"detail": "image not found"}))
    page.click("#gallery button")
    page.wait_for_function("document.querySelector('#err-general').textContent.length > 0", timeout=10_000)
    assert page.text_content("#err-general") == "image not found"
    page.unroute("**/v1/images/**")


def test_typing_while_the_server_is_away_keeps_the_saved_choices(page, server):
    """Typing in a page still waiting for the server saved its empty pickers over the saved sampler and
    schedule, and the saved prompt then replaced the typed one; now nothing is saved before the lists are
    loaded, and what was typed is kept."""
    page.fill("#prompt", "a saved prompt")
    page.select_option("#sampler", "euler")
    page.select_option("#schedule", "exponential")
    away = {"on": True}
    page.route("**/v1/**", lambda route: route.abort() if away["on"] else route.continue_())
    page.reload()
    trying = "document.querySelector('#err-general').textContent.includes('trying again')"
    page.wait_for_function(trying, timeout=10_000)
    page.click("#prompt")
    page.keyboard.type("an apple")
    page.click("#steps")  # the prompt's change event too
    away["on"] = False
    page.wait_for_selector("body[data-ready=true]", timeout=10_000)
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("euler", "exponential")
    assert page.input_value("#prompt") == "an apple"  # what was typed is not replaced by the saved prompt


def test_generate_after_escaping_the_key_dialog_asks_for_the_key_again(browser, tmp_path):
    """Generate on a page whose key dialog was closed with Escape (so without its lists) asks for the key again,
    and the page then loads."""
    with live_server(server_config(tmp_path, api_key="s3cret-key")) as s:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.goto(s.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        pg.keyboard.press("Escape")
        pg.wait_for_function("document.querySelector('#err-general').textContent.includes('needs an API key')")
        pg.fill("#prompt", "a red apple")
        pg.click("#generate")
        pg.wait_for_selector("#key-dialog[open]", timeout=10_000)
        pg.fill("#key-input", "s3cret-key")
        pg.click("#key-ok")
        pg.wait_for_selector("body[data-ready=true]")
        assert pg.input_value("#model") == "emoji" and pg.text_content("#err-general") == ""
        assert pg.input_value("#prompt") == "a red apple"
        ctx.close()


def test_a_load_request_answered_after_escape_does_not_reopen_the_key_dialog(browser, tmp_path):
    """A page-load request whose 401 came after Escape once opened the key dialog again, over the page the user
    had just uncovered (CI's Generate click then waited 180 s on the dialog). Now it fails with the same message,
    and the next click (Generate) asks for the key."""
    with live_server(server_config(tmp_path, api_key="s3cret-key")) as s:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        held = []

        def hold(route):
            held.append(route)

        pg.route("**/v1/upscalers", hold)
        pg.goto(s.url + "/")
        pg.wait_for_selector("#key-dialog[open]")
        pg.keyboard.press("Escape")
        pg.wait_for_function("document.querySelector('#err-general').textContent.includes('needs an API key')")
        assert len(held) == 1
        with pg.expect_response("**/v1/upscalers") as answer:
            held[0].continue_()
        assert answer.value.status == 401
        pg.evaluate("() => new Promise((done) => setTimeout(done, 200))")  # the page's handling of the 401 runs
        assert not pg.is_visible("#key-dialog")
        pg.unroute("**/v1/upscalers")
        pg.fill("#prompt", "a red apple")
        pg.click("#generate")
        pg.wait_for_selector("#key-dialog[open]")
        ctx.close()


def test_tiling_seed_resize_and_the_strength_rule(page, client, tmp_path):
    """More options: "Tiling", "Resize seed from" and the strength rule are sent as the native API's ``tiling``,
    ``seed_resize_from`` and ``strength_rule`` (the page's image is the API's), remembered across a reload, read
    back by "Reuse parameters", and a half-given or refused size is marked at its own input."""
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.click("#more-section summary")
    page.check("#tiling")
    page.fill("#seed_resize_w", "48")
    page.fill("#seed_resize_h", "80")
    page.click("#generate")
    params = wait_result(page)
    assert "Seed resize from: 48x80" in params and "Tiling: True" in params
    body = {"prompt": "a red apple", "steps": 2, "seed": 3, "width": 64, "height": 64}
    body.update(tiling=True, seed_resize_from=[48, 80])
    shows_the_api_image(page, client, body, params)
    page.uncheck("#tiling")
    page.fill("#seed_resize_w", "")
    page.fill("#seed_resize_h", "")
    page.click("#results button:text('Reuse parameters')")
    assert page.is_checked("#tiling")
    assert (page.input_value("#seed_resize_w"), page.input_value("#seed_resize_h")) == ("48", "80")

    # img2img with A1111's strength rule: 0.6 of 2 steps is int(1.2) = 1 step by diffusers' rule, A1111's
    # int(0.6 * 2) + 1 = 2
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    init.save(tmp_path / "init.png")
    page.uncheck("#tiling")
    page.fill("#seed_resize_w", "")
    page.fill("#seed_resize_h", "")
    page.select_option("#strength_rule", "a1111")
    page.eval_on_selector("#img2img-section", "d => { d.open = true; }")
    page.set_input_files("#init-file", str(tmp_path / "init.png"))
    page.select_option("#mode", "img2img")
    page.fill("#strength", "0.6")
    page.select_option("#vae_encode", "full")
    page.click("#generate")
    params = wait_result(page)
    assert "Strength rule: a1111" in params and "Tiling" not in params and "Seed resize" not in params
    body = {"prompt": "a red apple", "steps": 2, "seed": 3, "width": 64, "height": 64, "strength": 0.6}
    body.update(init_image=upload(client, png_bytes(init)), strength_rule="a1111")
    shows_the_api_image(page, client, body, params)
    page.select_option("#strength_rule", "diffusers")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#strength_rule") == "a1111"
    page.select_option("#mode", "txt2img")

    # remembered: a reload keeps them
    page.check("#tiling")
    page.fill("#seed_resize_w", "40")
    page.fill("#seed_resize_h", "56")
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.is_checked("#tiling") and page.input_value("#strength_rule") == "a1111"
    assert (page.input_value("#seed_resize_w"), page.input_value("#seed_resize_h")) == ("40", "56")

    # a width without a height is refused before sending, at the empty one; a refused size at its own input
    page.click("#more-section summary")
    page.fill("#seed_resize_h", "")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-seed_resize_h').textContent.length > 0", timeout=20_000)
    assert "both" in page.text_content("#err-seed_resize_h")
    assert page.get_attribute("#seed_resize_h", "aria-invalid") == "true"
    assert page.get_attribute("#seed_resize_w", "aria-invalid") is None
    page.fill("#seed_resize_h", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-seed_resize_h').textContent.length > 0", timeout=20_000)
    assert page.get_attribute("#seed_resize_h", "aria-invalid") == "true", shown_errors(page)
    assert page.text_content("#err-general") == "" and page.input_value("#seed_resize_h") == "0"
    page.fill("#seed_resize_h", "2.5")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-seed_resize_h').textContent.includes('whole')", timeout=20_000)
    page.uncheck("#tiling")
    page.fill("#seed_resize_w", "")
    page.fill("#seed_resize_h", "")
    page.select_option("#strength_rule", "diffusers")


def test_dropping_a_png_sets_tiling_seed_resize_and_the_strength_rule(page):
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a tiled floor\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, Denoising strength: 0.5, "
        "Seed resize from: 96x32, Tiling: True, Strength rule: a1111",
    )
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "tiles.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert page.is_checked("#tiling") and page.input_value("#strength_rule") == "a1111"
    assert (page.input_value("#seed_resize_w"), page.input_value("#seed_resize_h")) == ("96", "32")
    # an image made without them turns them off
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a plain floor\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert not page.is_checked("#tiling") and page.input_value("#strength_rule") == "diffusers"
    assert (page.input_value("#seed_resize_w"), page.input_value("#seed_resize_h")) == ("", "")


def image_with_exif_comment(fmt: str, comment: bytes) -> bytes:
    """A JPEG or WebP with an EXIF UserComment, where AUTOMATIC1111 writes an image's parameters."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = comment  # the Exif IFD's UserComment
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format=fmt, exif=exif.tobytes())
    return buf.getvalue()


def test_dropping_a_jpeg_or_webp_fills_the_form_from_its_exif(page):
    """A dropped JPEG or WebP was said to have no parameters (only PNG text chunks were read): A1111 writes them
    into the EXIF UserComment (piexif's "UNICODE" prefix, UTF-16 big-endian); other tools write little-endian."""
    text = (
        "a red 🍎 apple\nNegative prompt: blurry\nSteps: 13, Sampler: DPM++ 2M Karras, CFG scale: 4.5, Seed: 4321, "
        "Size: 64x64, Clip skip: 2"
    )
    jpeg = image_with_exif_comment("JPEG", b"UNICODE\0" + text.encode("utf-16-be"))
    drop_file(page, jpeg, "a1111.jpg", target="#h-settings")
    page.wait_for_function("document.querySelector('#seed').value === '4321'", timeout=20_000)
    assert page.input_value("#prompt") == "a red 🍎 apple" and page.input_value("#negative_prompt") == "blurry"
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("dpmpp_2m", "karras")
    assert (page.input_value("#steps"), page.input_value("#cfg_scale"), page.input_value("#clip_skip")) == (
        "13",
        "4.5",
        "2",
    )
    webp = image_with_exif_comment("WEBP", b"UNICODE\0" + text.replace("4321", "77").encode("utf-16-le"))
    drop_file(page, webp, "other.webp")
    page.wait_for_function("document.querySelector('#seed').value === '77'")
    assert page.input_value("#prompt") == "a red 🍎 apple" and page.input_value("#steps") == "13"
    # A JPEG without parameters, and a file that is no image, are named; the form is left as it was.
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    drop_file(page, buf.getvalue(), "photo.jpg")
    page.wait_for_function("document.querySelector('#err-general').textContent.includes('photo.jpg')")
    assert "no generation parameters" in page.text_content("#err-general")
    drop_file(page, b"hello", "notes.txt")
    page.wait_for_function("document.querySelector('#err-general').textContent.includes('notes.txt')")
    assert "not a PNG, JPEG or WebP" in page.text_content("#err-general") and page.input_value("#seed") == "77"


def test_delete_removes_a_generated_image_from_the_gallery(page, server):
    """A generated image could not be removed from the page. *Delete* (asked first) removes an image the server
    wrote from its outputs folder and from the gallery; a file someone else put there has no *Delete*."""
    from sdengine.metadata import save_png

    out = server.services.config.outputs_dir
    name = server.services.manager.save(Image.new("RGB", (64, 64), (0, 90, 0)), 31337, "a leaf\nSteps: 2, Seed: 31337")
    page.click("#gallery-refresh")
    page.wait_for_function("document.querySelector('#gallery button')?.title.includes('Seed: 31337')", timeout=20_000)
    total = int(page.text_content("#gallery-page").split(" of ")[1])
    page.click("#gallery button")
    page.wait_for_selector("#results button:text('Delete')", timeout=20_000)
    page.once("dialog", lambda d: d.dismiss())  # asked first: "no" keeps it
    page.click("#results button:text('Delete')")
    assert (out / name).is_file() and page.locator("#results figure").count() == 1
    page.once("dialog", lambda d: d.accept())
    page.click("#results button:text('Delete')")
    page.wait_for_function(f"document.querySelector('#server-status').textContent === 'Deleted {name}'", timeout=20_000)
    assert not (out / name).exists() and page.locator("#results figure").count() == 0
    left = f" of {total - 1}" if total > 1 else "no images yet"
    page.wait_for_function(f"document.querySelector('#gallery-page').textContent.endsWith('{left}')", timeout=20_000)
    assert not page.evaluate("[...document.querySelectorAll('#gallery button')].some((b) => b.title.includes('31337'))")
    # Not the server's: no Delete button (and the server would refuse it).
    save_png(Image.new("RGB", (8, 8)), out / "holiday.png", "a photo\nSteps: 1, Seed: 4242")
    try:
        page.click("#gallery-refresh")
        page.wait_for_function(
            "document.querySelector('#gallery button')?.title.includes('Seed: 4242')", timeout=20_000
        )
        page.click("#gallery button")
        page.wait_for_function(
            "document.querySelector('#results pre')?.textContent.includes('Seed: 4242')", timeout=20_000
        )
        assert page.locator("#results button:text('Delete')").count() == 0
        assert page.locator("#results button:text('Reuse parameters')").count() == 1
    finally:
        (out / "holiday.png").unlink()


def test_embeddings_are_listed_and_a_click_puts_one_in_the_prompt(page, browser, tmp_path):
    """The page had no list of the server's textual-inversion embeddings. It lists A1111's GET /sdapi/v1/embeddings
    (the loaded ones; unreadable files named as skipped); a click adds the name to the prompt last typed in (the
    negative prompt too, as A1111 does) and a second click takes it out; a server without a folder says so."""
    import torch
    from safetensors.torch import save_file

    page.click("#embeddings-section summary", timeout=20_000)
    page.wait_for_function(
        "document.querySelector('#embedding-list').textContent.includes('No embeddings')", timeout=20_000
    )
    folder = tmp_path / "embeddings"
    (folder / "neg").mkdir(parents=True)
    save_file({"emb_params": torch.zeros(2, 768)}, str(folder / "shiny-style.safetensors"))
    save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "neg" / "bad_hands.safetensors"))
    (folder / "broken.pt").write_bytes(b"not a tensor file")
    with live_server(server_config(tmp_path, embeddings_dir=folder)) as s:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(20_000)
        open_page(pg, s.url)
        pg.click("#embeddings-section summary")
        pg.wait_for_selector("#embedding-list button")
        names = pg.eval_on_selector_all("#embedding-list button", "bs => bs.map((b) => [b.textContent, b.title])")
        assert names == [["bad_hands", "1 vector(s) of width 768"], ["shiny-style", "2 vector(s) of width 768"]]
        assert "broken" in pg.text_content("#embeddings-skipped")
        pg.fill("#prompt", "a cat,")
        pg.click("#embedding-list button:text('shiny-style')")
        assert pg.input_value("#prompt") == "a cat, shiny-style"
        assert pg.get_attribute("#embedding-list button:text('shiny-style')", "aria-pressed") == "true"
        pg.fill("#negative_prompt", "blurry")  # typed in last: the negative prompt gets the next one
        pg.click("#embedding-list button:text('bad_hands')")
        assert pg.input_value("#negative_prompt") == "blurry bad_hands"
        assert pg.input_value("#prompt") == "a cat, shiny-style"
        pg.click("#embedding-list button:text('bad_hands')")  # again: taken out
        assert pg.input_value("#negative_prompt") == "blurry"
        pg.focus("#prompt")
        pg.fill("#prompt", "(shiny-style:1.2), a dog")  # a weighted one is found and taken out too
        pg.click("#embedding-list button:text('shiny-style')")
        assert pg.input_value("#prompt") == "a dog"
        assert pg.get_attribute("#embedding-list button:text('shiny-style')", "aria-pressed") == "false"
        pg.fill("#prompt", "a cat, shiny-style, a hat")
        pg.click("#embedding-list button:text('shiny-style')")
        assert pg.input_value("#prompt") == "a cat, a hat"
        pg.fill("#prompt", "shiny-styles")  # another word that starts with the name: not it
        pg.click("#embedding-list button:text('shiny-style')")
        assert pg.input_value("#prompt") == "shiny-styles shiny-style"
        # The folder is read again on Refresh.
        save_file({"emb_params": torch.zeros(1, 768)}, str(folder / "newer.safetensors"))
        pg.click("#embeddings-refresh")
        pg.wait_for_selector("#embedding-list button:text('newer')")
        ctx.close()


def test_an_init_image_in_another_format_is_sent_as_png_and_a_bad_control_image_is_named(page, client, tmp_path):
    """A BMP or GIF init image (A1111 takes them) was shown, painted on, and only refused by the server when
    Generate was pressed; the page now sends its pixels as a PNG: the result is the API's for the same pixels.
    A file that is no image, dropped on the ControlNet field, showed a broken picture and was refused only later;
    it is now named at once, and a good image clears the message."""
    rng = np.random.default_rng(5)
    pixels = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    bmp = io.BytesIO()
    pixels.save(bmp, format="BMP")
    page.fill("#prompt", PROMPT)
    page.fill("#steps", "3")
    page.fill("#seed", "9")
    page.fill("#batch_size", "1")
    page.click("#img2img-section summary", timeout=20_000)
    page.select_option("#mode", "img2img")
    drop_file(page, bmp.getvalue(), "pixels.bmp", target="#init-drop")
    page.wait_for_selector("#init-stage", state="visible", timeout=20_000)
    page.fill("#strength", "0.5")
    page.click("#generate")
    params = wait_result(page)
    assert "Denoising strength: 0.5" in params
    body = {"prompt": PROMPT, "steps": 3, "seed": 9, "width": 64, "height": 64, "strength": 0.5}
    body["init_image"] = upload(client, png_bytes(pixels))
    body["vae_encode"] = page.input_value("#vae_encode")
    shows_the_api_image(page, client, body, params)
    page.select_option("#mode", "txt2img")
    page.click("#controlnet-section summary")
    drop_file(page, b"hello", "notes.png", target="#cn-drop")
    page.wait_for_function(
        "document.querySelector('#err-controlnet').textContent.includes('notes.png')", timeout=20_000
    )
    assert not page.is_visible("#cn-source")
    drop_file(page, png_bytes(pixels), "good.png", target="#cn-drop")
    page.wait_for_selector("#cn-source", state="visible", timeout=20_000)
    assert page.text_content("#err-controlnet") == ""
    page.uncheck("#cn-enabled")


def test_a_zero_img2img_strength_is_named_at_strength(page):
    """The server's "strength must be > 0 for img2img" was shown under the init image (its "img2img" matched
    first), with the init image's field marked; it is the Strength input's."""
    page.click("#img2img-section summary", timeout=20_000)
    page.select_option("#mode", "img2img")
    drop_file(page, png_bytes(Image.new("RGB", (64, 64), (9, 99, 199))), "init.png", target="#init-drop")
    page.wait_for_selector("#init-stage", state="visible", timeout=20_000)
    page.fill("#strength", "0")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-strength').textContent.includes('> 0')", timeout=20_000)
    assert page.get_attribute("#strength", "aria-invalid") == "true" and page.text_content("#err-init_image") == ""
    assert page.input_value("#strength") == "0"  # kept as typed
    page.fill("#strength", "0.75")
    page.select_option("#mode", "txt2img")


def test_another_clients_finished_job_leaves_the_queue_within_a_second_or_so(page, client, server):
    """The Queue was read with the header's 5 s refresh, so an API client's job that had ended was still listed as
    running for up to 5 s. While it lists jobs it is read every second."""
    running, waiting = long_jobs(client, batch_size=8)  # it must outlast the waits below on an idle machine
    try:
        page.wait_for_function("document.querySelectorAll('#queue li').length === 2", timeout=10_000)
        with page.expect_request(lambda r: r.url.endswith("/v1/jobs") and r.method == "GET", timeout=8_000):
            pass  # just after a read of the list: the next one was 5 s away
        client.delete(f"/v1/jobs/{waiting}")
        client.delete(f"/v1/jobs/{running}")
        assert client.get(f"/v1/jobs/{running}").json()["state"] == "cancelled"
        t0 = time.monotonic()
        page.wait_for_selector("#queue-box", state="hidden", timeout=4_000)
        assert time.monotonic() - t0 < 3.0
    finally:
        client.delete(f"/v1/jobs/{waiting}")
        client.delete(f"/v1/jobs/{running}")
