"""The web page's newer native job settings in a real headless Chromium (helpers and fixtures from test_webui.py):
tiled diffusion (MultiDiffusion) and HyperTile on the VAE under "More options", and "Reuse parameters" filling the
IP-Adapter section (a live server with tiny IP-Adapter folders, tests/test_ip_adapter_server.py's). The images the
page shows are the native API's for the same body; refused values are said at their own input."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

import test_webui
from _live_server import live_server, server_config
from test_webui import (
    WAIT_MS,
    api_image,
    drop_file,
    open_page,
    png_bytes,
    result_png,
    shown_errors,
    shown_image,
    shows_the_api_image,
    upload,
    wait_result,
)

# test_webui's fixtures: its server (the emoji model at 64x64), browser, page and client
browser, client, page, server = test_webui.browser, test_webui.client, test_webui.page, test_webui.server

TILED = ("#tiled_diffusion_window", "#tiled_diffusion_window_height", "#tiled_diffusion_stride")
TILED += ("#tiled_diffusion_batch",)


def tiled_state(page) -> tuple:
    return (page.is_checked("#tiled_diffusion"), page.is_checked("#tiled_diffusion_circular")) + tuple(
        page.input_value(sel) for sel in TILED
    )


def reset_tiled(page) -> None:
    page.set_checked("#tiled_diffusion", False)
    page.set_checked("#tiled_diffusion_circular", False)
    for sel, value in zip(TILED, ("64", "", "8", "1"), strict=True):
        page.fill(sel, value)


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_tiled_diffusion_is_sent_saved_reused_and_its_errors_marked(page, client):
    """The tiled diffusion box, window, stride, circular and view batch under More options are sent as the job's
    ``tiled_diffusion``: the API's image for the same body (not the plain one), the parameters name it; they survive
    a reload; "Reuse parameters" and the result's PNG dropped set them again, an image without it turns it off;
    a stride over the window (400) and a window over 1024 (422) are said at their inputs, the input kept."""
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "2")
    page.fill("#seed", "3")
    page.fill("#width", "96")  # a 12 x 8 latent: windows of 8 cells, 4 apart, wrapping round
    page.check("#tiled_diffusion")
    page.fill("#tiled_diffusion_window", "8")
    page.fill("#tiled_diffusion_stride", "4")
    page.check("#tiled_diffusion_circular")
    page.fill("#tiled_diffusion_batch", "2")
    page.reload()  # saved with the page's settings
    page.wait_for_selector("body[data-ready=true]")
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")
    want = (True, True, "8", "", "4", "2")
    assert tiled_state(page) == want
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    tiled = {"window": 8, "stride": 4, "circular": True, "view_batch": 2}
    assert sent.value.post_data_json["tiled_diffusion"] == tiled
    params = wait_result(page)
    assert "Tiled Diffusion: MultiDiffusion, Tiled Diffusion window: 8x8, Tiled Diffusion stride: 4" in params, params
    assert "Tiled Diffusion circular: True, Tiled Diffusion batch: 2" in params, params
    body = {"prompt": "a red apple", "steps": 2, "seed": 3, "width": 96, "height": 64, "tiled_diffusion": tiled}
    shows_the_api_image(page, client, body, params)
    plain, _ = api_image(client, {**body, "tiled_diffusion": None, "cfg_scale": float(page.input_value("#cfg_scale"))})
    assert not np.array_equal(shown_image(page, "#results img"), plain)  # MultiDiffusion changed the image
    reset_tiled(page)
    page.click("#results button:text('Reuse parameters')")
    assert tiled_state(page) == want
    reset_tiled(page)
    drop_file(page, result_png(page), "result.png")  # the image's own PNG
    page.wait_for_function("document.querySelector('#tiled_diffusion').checked")
    assert tiled_state(page) == want
    # a window other than square: its height box; the batch left out is 1
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        "a cat face\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 96x64, Tiled Diffusion: MultiDiffusion, "
        "Tiled Diffusion window: 10x6, Tiled Diffusion stride: 3",
    )
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "tall.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert tiled_state(page) == (True, False, "10", "6", "3", "1")
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    assert sent.value.post_data_json["tiled_diffusion"] == {
        "window": 10,
        "window_height": 6,
        "stride": 3,
        "circular": False,
        "view_batch": 1,
    }
    assert "Tiled Diffusion window: 10x6" in wait_result(page)
    # refused: a stride over the window (the server's 400) and a window over 1024 (its 422), each at its input
    page.fill("#tiled_diffusion_stride", "16")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-tiled_diffusion_stride').textContent !== ''")
    said = shown_errors(page)["err-tiled_diffusion_stride"]
    assert "tiled diffusion stride 16 is larger than the window (10x6 cells)" in said, shown_errors(page)
    assert page.get_attribute("#tiled_diffusion_stride", "aria-invalid") == "true"
    assert page.input_value("#tiled_diffusion_stride") == "16"  # the input is kept
    page.fill("#tiled_diffusion_stride", "3")
    page.fill("#tiled_diffusion_window", "2000")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-tiled_diffusion_window').textContent !== ''")
    said = shown_errors(page)["err-tiled_diffusion_window"]
    assert "Tiled diffusion window: Input should be less than or equal to 1024" in said, shown_errors(page)
    assert page.get_attribute("#tiled_diffusion_window", "aria-invalid") == "true"
    # the A1111 extension's one-field dictionary (its own tile layout): named, not set
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        'a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 13, Size: 64x64, Tiled Diffusion: {"Method": '
        '"MultiDiffusion", "Tile tile width": 96, "Tile tile height": 96, "Tile Overlap": 48, "Tile batch size": 4}',
    )
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "extension.png")
    page.wait_for_function("document.querySelector('#seed').value === '13'")
    assert "Tiled Diffusion (the A1111 extension's settings" in page.text_content("#err-general")
    assert not page.is_checked("#tiled_diffusion")
    # an image made without it turns it off
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert tiled_state(page) == (False, False, "64", "", "8", "1")


def test_hypertile_vae_is_sent_refused_at_its_box_and_reused(page, client):
    """The HyperTile VAE box and its tile size, swap size and depth are sent as ``hypertile_vae``; the emoji model's
    VAE has no middle-block attention, so the server refuses it and the page says so at the box (the box kept
    ticked); a tile size over 2048 (422) is said at its own input; A1111's "Hypertile VAE" fields of a dropped PNG
    tick it with their settings (defaults where left out), an image without them unticks it."""
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "3")
    page.fill("#seed", "3")
    page.check("#hypertile_vae")
    page.fill("#hypertile_vae_tile", "192")
    page.reload()  # saved with the page's settings
    page.wait_for_selector("body[data-ready=true]")
    page.eval_on_selector("#more-section", "(d) => { d.open = true; }")
    assert page.is_checked("#hypertile_vae") and page.input_value("#hypertile_vae_tile") == "192"
    with page.expect_request(lambda rq: rq.url.endswith("/v1/jobs") and rq.method == "POST") as sent:
        page.click("#generate")
    assert sent.value.post_data_json["hypertile_vae"] == [192, 3, 3]
    page.wait_for_function("document.querySelector('#err-hypertile_vae').textContent !== ''")
    said = shown_errors(page)["err-hypertile_vae"]
    assert "HyperTile VAE tiles the VAE decoder's middle-block self-attention" in said, shown_errors(page)
    assert "turn hypertile_vae off" in said and "err-general" not in shown_errors(page), shown_errors(page)
    assert page.get_attribute("#hypertile_vae", "aria-invalid") == "true" and page.is_checked("#hypertile_vae")
    # the same body on the native API: the same line (the page adds nothing of its own)
    r = client.post("/v1/jobs", json={"prompt": "a red apple", "steps": 3, "hypertile_vae": [192, 3, 3]})
    assert r.status_code == 400 and r.json()["detail"].removeprefix("hypertile_vae: ") in said, r.text
    page.fill("#hypertile_vae_tile", "3000")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-hypertile_vae_tile').textContent !== ''")
    said = shown_errors(page)["err-hypertile_vae_tile"]
    assert "HyperTile VAE tile size: Input should be less than or equal to 2048" in said, shown_errors(page)
    a1111 = (
        "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, Hypertile VAE: True, "
        "Hypertile VAE max tile size: 256, Hypertile VAE swap size: 2"
    )
    page.set_checked("#hypertile_vae", False)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111)
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "a1111.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    assert page.is_checked("#hypertile_vae")
    vae = tuple(page.input_value(s) for s in ("#hypertile_vae_tile", "#hypertile_vae_swap", "#hypertile_vae_depth"))
    assert vae == ("256", "2", "3")
    assert page.text_content("#err-general") == ""  # nothing said missing: the page runs it now
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert not page.is_checked("#hypertile_vae") and page.input_value("#hypertile_vae_tile") == "128"


# ------------------------------------------------------------------- the IP-Adapter section, reused


@pytest.fixture(scope="module")
def ipa_server(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("transformers")
    from test_ip_adapter_server import make_folders

    folders = make_folders(tmp_path_factory.mktemp("webui_more_ip"))
    config = server_config(folders["tmp"], ip_adapters_dir=folders["ipa"], clip_vision_dir=folders["clip"])
    with live_server(config) as s:
        yield s


@pytest.fixture()
def ipa_page(browser, ipa_server):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(WAIT_MS)
    open_page(pg, ipa_server.url)
    yield pg
    context.close()
    assert not errors, errors


IPA = ("#ipa-model", "#ipa-clip", "#ipa-scale", "#ipa-start", "#ipa-end", "#ipa-rule")


def test_reuse_parameters_fills_the_ip_adapter_section(ipa_page, ipa_server, tmp_path):
    """A job with the IP-Adapter section's unit: "Reuse parameters" on its result sets the adapter, encoder, scale,
    window and negative rule back from its "IP-Adapter 0" field (the picture, not in the infotext, stays the one
    picked), and generating again gives the same image; an adapter this server lacks and a second unit are said,
    an image without one unticks the section."""
    from test_ip_adapter_server import picture

    page = ipa_page
    image = tmp_path / "prompt.png"
    picture().save(image)
    page.click("#ip-adapter-section summary")
    page.set_input_files("#ipa-file", str(image))
    page.select_option("#ipa-model", "sub/plus.bin")
    page.select_option("#ipa-clip", "small")
    page.select_option("#ipa-rule", "comfyui")
    page.fill("#ipa-scale", "1.2")
    page.fill("#ipa-start", "0.1")
    page.fill("#ipa-end", "0.8")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "3")
    page.fill("#seed", "3")
    page.click("#generate")
    params = wait_result(page)
    assert 'IP-Adapter 0: "Model: plus [' in params and "Start: 0.1, End: 0.8" in params, params
    first = shown_image(page, "#results img")
    with httpx.Client(base_url=ipa_server.url, timeout=120) as c:
        unit = {"model": "sub/plus.bin", "image": upload(c, image.read_bytes()), "scale": 1.2, "start": 0.1}
        unit |= {"end": 0.8, "clip_vision": "small", "negative_rule": "comfyui"}
        body = {"prompt": "a red apple", "steps": 3, "seed": 3, "width": 64, "height": 64, "cfg_scale": 7}
        expected, infotext = api_image(c, {**body, "ip_adapters": [unit]})
    np.testing.assert_array_equal(first, expected)
    assert params == infotext
    want = ("sub/plus.bin", "small", "1.2", "0.1", "0.8", "comfyui")
    assert tuple(page.input_value(s) for s in IPA) == want
    for sel, value in zip(IPA, ("plain.safetensors", "", "1", "0", "1", "diffusers"), strict=True):
        page.select_option(sel, value) if sel in ("#ipa-model", "#ipa-clip", "#ipa-rule") else page.fill(sel, value)
    page.set_checked("#ipa-enabled", False)
    page.click("#results button:text('Reuse parameters')")
    assert tuple(page.input_value(s) for s in IPA) == want and page.is_checked("#ipa-enabled")
    page.click("#generate")  # the same unit again (the picture picked is kept): the same image
    assert wait_result(page) == params
    np.testing.assert_array_equal(shown_image(page, "#results img"), first)
    # what this server cannot set is said; the rest is set
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        'a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 11, Size: 64x64, IP-Adapter 0: "Model: gone '
        '[0123456789], Weight: 0.6, CLIP vision: big [abcdef0123], Negative rule: diffusers, Images: 1", '
        'IP-Adapter 1: "Model: plain [0123456789], Weight: 0.5"',
    )
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "other.png")
    page.wait_for_function("document.querySelector('#seed').value === '11'")
    said = page.text_content("#err-general")
    assert "IP-Adapter gone" in said and "IP-Adapter 1 (this page runs one IP-Adapter)" in said, said
    assert page.input_value("#ipa-model") == "sub/plus.bin"  # kept: the infotext's is not on this server
    assert tuple(page.input_value(s) for s in IPA[1:]) == ("big.safetensors", "0.6", "0", "1", "diffusers")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a cat face\nSteps: 5, Sampler: Euler, CFG scale: 7, Seed: 12, Size: 64x64")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), info), "plain.png")
    page.wait_for_function("document.querySelector('#seed').value === '12'")
    assert not page.is_checked("#ipa-enabled")
