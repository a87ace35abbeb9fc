"""The web page's IP-Adapter section in a real headless Chromium (helpers from test_webui.py) against a live server
with tiny IP-Adapter and CLIP vision folders (tests/test_ip_adapter_server.py's) and the emoji model at 64x64: the
image it shows is the native API's for the same unit; its errors are shown in the section; its settings are
remembered; a server without IP-Adapter files gets a note and a disabled section."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from _live_server import live_server, server_config
from _webpage import chromium, tab
from test_webui import (
    UNLABELLED,
    WAIT_MS,
    api_image,
    open_page,
    shown_image,
    upload,
    wait_result,
)

pytest.importorskip("transformers")
from test_ip_adapter_server import make_folders, picture  # noqa: E402


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory):
    return make_folders(tmp_path_factory.mktemp("webui_ip"))


@pytest.fixture(scope="module")
def server(folders):
    config = server_config(folders["tmp"], ip_adapters_dir=folders["ipa"], clip_vision_dir=folders["clip"])
    with live_server(config) as s:
        yield s


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


@pytest.fixture()
def page(browser, server):
    with tab(browser, server.url) as pg:
        yield pg


def test_the_ip_adapter_section_runs_the_apis_unit(page, server, folders, tmp_path) -> None:
    image = tmp_path / "prompt.png"
    picture().save(image)
    options = page.eval_on_selector_all("#ipa-model option", "(os) => os.map((o) => o.value)")
    assert options == ["big.safetensors", "junk.safetensors", "odd.safetensors", "plain.safetensors", "sub/plus.bin"]
    clips = page.eval_on_selector_all("#ipa-clip option", "(os) => os.map((o) => o.value)")
    assert clips == ["", "big.safetensors", "small"] and not page.is_visible("#ipa-none")
    assert page.evaluate(UNLABELLED) == []  # every control of the section has its label
    page.click("#ip-adapter-section summary")
    page.set_input_files("#ipa-file", str(image))
    assert page.is_checked("#ipa-enabled") and page.is_visible("#ipa-source")
    page.select_option("#ipa-model", "sub/plus.bin")
    page.select_option("#ipa-rule", "comfyui")
    page.fill("#ipa-scale", "1.2")
    page.fill("#ipa-end", "0.8")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "3")
    page.fill("#seed", "3")
    page.click("#generate")
    params = wait_result(page)
    with httpx.Client(base_url=server.url, timeout=120) as client:
        unit = {
            "model": "sub/plus.bin",
            "image": upload(client, image.read_bytes()),
            "scale": 1.2,
            "start": 0,
            "end": 0.8,
        }
        body = {"prompt": "a red apple", "steps": 3, "seed": 3, "width": 64, "height": 64, "cfg_scale": 7}
        expected, infotext = api_image(client, {**body, "ip_adapters": [{**unit, "negative_rule": "comfyui"}]})
        plain, _ = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    assert np.abs(expected.astype(int) - plain.astype(int)).max() > 8
    # remembered (the picture is not): the adapter, the rule, the scale
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    assert page.input_value("#ipa-model") == "sub/plus.bin" and page.input_value("#ipa-scale") == "1.2"
    assert page.input_value("#ipa-rule") == "comfyui" and page.is_checked("#ipa-enabled")
    assert page.input_value("#ipa-end") == "0.8"
    # an adapter no encoder fits: the server's line, in the section
    page.click("#ip-adapter-section summary")
    page.set_input_files("#ipa-file", str(image))
    page.select_option("#ipa-model", "odd.safetensors")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-ip_adapter').textContent.length > 0")
    assert "width 32, and no encoder in --clip-vision-dir gives it" in page.text_content("#err-ip_adapter")
    # no picture: said before anything is sent
    page.reload()
    page.wait_for_selector("body[data-ready=true]")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-ip_adapter').textContent.length > 0")
    assert "pick or drop an image prompt" in page.text_content("#err-ip_adapter")


def test_a_server_without_ip_adapters_disables_the_section(browser, tmp_path) -> None:
    with live_server(server_config(tmp_path)) as s:
        ctx = browser.new_context()
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        open_page(pg, s.url)
        pg.click("#ip-adapter-section summary")
        assert pg.is_visible("#ipa-none") and "--ip-adapters-dir" in pg.text_content("#ipa-none")
        assert pg.is_disabled("#ipa-enabled") and pg.is_disabled("#ipa-model")
        ctx.close()
