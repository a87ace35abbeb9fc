"""The web page with SD3 and Flux models in a real headless Chromium (helpers from test_webui.py): a live server
whose models folder holds a tiny random FLUX.1 [dev] folder and a tiny random SD3 folder (tests/_flux_models.py,
tests/_sd3_models.py) beside the built-in emoji model. Selecting a Flux model shows its distilled guidance and
hides the U-Net sections; the image the page shows is the native API's for the same body; SD3's shift and
skip-layer guidance are sent, and a refused value is said at its own input. FLUX.1 Kontext's reference images and
Depth / Canny's control image have inputs shown for Flux models of that kind only (a tiny Depth folder too)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from _flux2_dev_models import make_dev_folder
from _flux2_models import make_klein_folder
from _flux_models import make_flux_folder
from _live_server import live_server, server_config
from _sd3_models import make_sd3_folder
from _webpage import chromium, tab
from _z_image_models import make_z_folder
from test_webui import (
    api_image,
    shown_errors,
    shown_image,
    upload,
    wait_result,
)

U_NET_ONLY = ("#unet-patches", "#controlnet-section", "#ip-adapter-section", "#embeddings-section")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webui-dit")
    make_flux_folder(tmp / "models" / "tiny-flux", guidance=True)
    make_sd3_folder(tmp / "models" / "tiny-sd3")
    make_flux_folder(tmp / "models" / "tiny-depth", kind="control", seed=6)
    make_z_folder(tmp / "models" / "tiny-z")
    make_klein_folder(tmp / "models" / "tiny-klein", distilled=True)
    make_dev_folder(tmp / "models" / "tiny-flux2-dev")
    with live_server(server_config(tmp, models_dir=tmp / "models")) as s:
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


def test_a_flux_model_shows_its_distilled_guidance_and_gives_the_apis_image(page, client):
    assert page.is_hidden("#distilled_cfg_scale") and page.is_visible("#unet-patches")  # the emoji model: SD
    sd_choices = [page.input_value(sel) for sel in ("#sampler", "#schedule", "#cfg_scale")]
    page.select_option("#model", "tiny-flux")
    assert page.is_visible("#distilled_cfg_scale") and page.is_hidden("#shift")
    for sel in U_NET_ONLY:
        assert page.is_hidden(sel), sel
    # the model's defaults (GET /v1/models): Euler at CFG 1 on the flow's own grid
    assert (page.input_value("#sampler"), page.input_value("#schedule")) == ("euler", "normal")
    assert page.input_value("#cfg_scale") == "1"
    page.fill("#prompt", "a red apple")
    page.fill("#negative_prompt", "")
    page.fill("#steps", "3")
    page.fill("#seed", "4")
    page.fill("#width", "48")
    page.fill("#height", "32")
    page.fill("#distilled_cfg_scale", "4.5")
    page.click("#generate")
    params = wait_result(page)
    assert "Distilled CFG Scale: 4.5" in params, params
    body = {"model": "tiny-flux", "prompt": "a red apple", "steps": 3, "seed": 4, "width": 48, "height": 32}
    body |= {"distilled_cfg_scale": 4.5, "sampler": "euler", "schedule": "normal", "cfg_scale": 1.0}
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    plain, _ = api_image(client, {**body, "distilled_cfg_scale": None})
    assert not np.array_equal(expected, plain)  # the distilled guidance changed the image
    # "Reuse parameters" sets it again; back on the emoji model the SD choices return and the sections show again
    page.fill("#distilled_cfg_scale", "")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#distilled_cfg_scale") == "4.5"
    page.select_option("#model", "emoji")
    assert page.is_visible("#unet-patches") and page.is_hidden("#distilled_cfg_scale")
    assert [page.input_value(sel) for sel in ("#sampler", "#schedule", "#cfg_scale")] == sd_choices


def test_sd3_shift_and_skip_layer_guidance_are_sent_and_refusals_marked(page, client):
    page.select_option("#model", "tiny-sd3")
    assert page.is_visible("#shift") and page.is_visible("#slg_layers") and page.is_hidden("#distilled_cfg_scale")
    # SD3's defaults (GET /v1/models): Euler on the flow's own grid at CFG 7
    assert [page.input_value(sel) for sel in ("#sampler", "#schedule", "#cfg_scale")] == ["euler", "normal", "7"]
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "3")
    page.fill("#seed", "2")
    page.fill("#width", "32")
    page.fill("#height", "32")
    page.fill("#shift", "2")
    page.fill("#slg_layers", "1")
    page.fill("#slg_stop", "1")
    page.click("#generate")
    params = wait_result(page)
    assert "Shift: 2" in params and "Skip layers: 1" in params, params
    body = {"model": "tiny-sd3", "prompt": "a red apple", "steps": 3, "seed": 2, "width": 32, "height": 32, "shift": 2}
    body |= {"sd3": {"skip_guidance_layers": [1], "skip_layer_guidance_stop": 1.0}}
    for field in ("sampler", "schedule", "negative_prompt"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    # "Reuse parameters" sets the shift and the skip-layer settings again
    page.fill("#shift", "")
    page.fill("#slg_layers", "")
    page.fill("#slg_stop", "0.2")
    page.click("#results button:text('Reuse parameters')")
    assert [page.input_value(sel) for sel in ("#shift", "#slg_layers", "#slg_stop")] == ["2", "1", "1"]
    # a block the MMDiT does not have: the server's line, at the blocks' input, the input kept
    page.fill("#slg_layers", "1, 7")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-slg_layers').textContent !== ''")
    assert "sd3 skip_guidance_layers 7 is not a joint block of this MMDiT" in shown_errors(page)["err-slg_layers"]
    assert page.input_value("#slg_layers") == "1, 7"
    page.fill("#slg_layers", "one")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-slg_layers').textContent.includes('whole numbers')")
    page.fill("#slg_layers", "")
    page.fill("#shift", "")


def test_kontext_and_control_inputs_show_for_flux_only_and_a_reference_job_runs(page, client, tmp_path):
    """The reference-image input shows for a plain Flux model ([dev] / Kontext), the control-image input for a
    Depth / Canny one (GET /v1/models' ``kind``), neither for SD or SD3; a job with a reference image gives the
    native API's image for the same body."""
    from _pipeline_models import picture

    refs, control = "#reference-files", "#control-image-file"
    assert page.is_hidden(refs) and page.is_hidden(control)  # the emoji model: SD
    for model, shown in [("tiny-flux", refs), ("tiny-depth", control), ("tiny-sd3", None), ("emoji", None)]:
        page.select_option("#model", model)
        for sel in (refs, control):
            assert page.is_visible(sel) == (sel == shown), (model, sel)
    page.select_option("#model", "tiny-flux")
    path = tmp_path / "ref.png"
    picture(42, 26, seed=1).save(path)
    page.set_input_files(refs, str(path))
    page.uncheck("#reference-resize")  # Kontext's ~1024^2 resolutions would take minutes on a CPU
    for sel, value in [("#prompt", "make it green"), ("#negative_prompt", ""), ("#steps", "2"), ("#seed", "4"),
                       ("#width", "48"), ("#height", "32"), ("#distilled_cfg_scale", "")]:  # fmt: skip
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    assert "Reference images: 1" in params and "Reference resize: off" in params, params
    body = {"model": "tiny-flux", "prompt": "make it green", "steps": 2, "seed": 4, "width": 48, "height": 32}
    body |= {"sampler": "euler", "schedule": "normal", "cfg_scale": 1.0, "reference_auto_resize": False}
    body["reference_images"] = [upload(client, path.read_bytes())]
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext


def test_a_depth_canny_model_takes_a_photo_with_the_canny_preprocessor(page, client, tmp_path):
    """The control input's preprocessor choice: "canny" sends ``control_preprocessor``, and the page's image is
    the native API's for the same body (the map made from the photo, tests/test_flux_control_preprocess.py)."""
    from _pipeline_models import picture

    page.select_option("#model", "tiny-depth")
    assert page.is_visible("#control-preprocessor") and page.input_value("#control-preprocessor") == "none"
    path = tmp_path / "photo.png"
    picture(48, 32, seed=3).save(path)
    page.set_input_files("#control-image-file", str(path))
    page.select_option("#control-preprocessor", "canny")
    for sel, value in [("#prompt", "a house"), ("#negative_prompt", ""), ("#steps", "2"), ("#seed", "4"),
                       ("#width", "48"), ("#height", "32"), ("#distilled_cfg_scale", "")]:  # fmt: skip
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    assert "Control preprocessor: canny" in params, params
    body = {"model": "tiny-depth", "prompt": "a house", "steps": 2, "seed": 4, "width": 48, "height": 32}
    body |= {"sampler": "euler", "schedule": "normal", "cfg_scale": 1.0, "control_preprocessor": "canny"}
    body["control_image"] = upload(client, path.read_bytes())
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext


def test_sd3_shows_pag_and_sends_it(page, client):
    # PAG (U-Nets and SD3's MMDiT): shown for SD3 with the MMDiT's default layers, the U-Net sections hidden
    assert page.is_visible("#pag_scale") and page.input_value("#pag_layers") == "mid"  # the emoji model's
    page.select_option("#model", "tiny-sd3")
    assert page.is_visible("#pag_scale") and page.is_visible("#pag_layers") and page.is_hidden("#sag_scale")
    for sel in U_NET_ONLY:
        assert page.is_hidden(sel), sel
    assert page.input_value("#pag_layers") == "blocks.1"
    for sel, value in (("#prompt", "a red apple"), ("#steps", "3"), ("#seed", "2"), ("#width", "32"),
                       ("#height", "32"), ("#pag_scale", "3")):  # fmt: skip
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    assert "PAG scale: 3" in params, params
    body = {"model": "tiny-sd3", "prompt": "a red apple", "steps": 3, "seed": 2, "width": 32, "height": 32}
    body |= {"pag_scale": 3.0, "pag_layers": "blocks.1"}
    for field in ("sampler", "schedule", "negative_prompt"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    plain, _ = api_image(client, {k: v for k, v in body.items() if not k.startswith("pag")})
    assert not np.array_equal(expected, plain)  # PAG changed the image
    # a layer the MMDiT does not have: the server's line at the layers' input
    page.fill("#pag_layers", "mid_block")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-pag_layers').textContent !== ''")
    assert "matches no" in shown_errors(page)["err-pag_layers"], shown_errors(page)
    # Flux takes no PAG: hidden; back on the emoji model the U-Net's default layers
    page.fill("#pag_layers", "blocks.1")
    page.select_option("#model", "tiny-flux")
    assert page.is_hidden("#pag_scale")
    page.select_option("#model", "emoji")
    assert page.is_visible("#pag_scale") and page.input_value("#pag_layers") == "mid"
    page.fill("#pag_scale", "0")


def test_a_z_image_model_takes_its_defaults_hides_the_u_net_sections_and_gives_the_apis_image(page, client):
    defaults = {m["id"]: m for m in client.get("/v1/models").json()["data"]}["tiny-z"]
    assert defaults["family"] == "z_image"
    page.select_option("#model", "tiny-z")
    for sel in U_NET_ONLY:
        assert page.is_hidden(sel), sel
    assert page.is_hidden("#distilled_cfg_scale") and page.is_hidden("#shift")
    # Z-Image-Turbo's defaults (GET /v1/models), not the SD choices the page had: no CFG
    assert page.input_value("#cfg_scale") == "1"
    chosen = {"sampler": page.input_value("#sampler"), "schedule": page.input_value("#schedule")}
    page.fill("#prompt", "a red apple")
    page.fill("#negative_prompt", "")
    for sel, value in (("#steps", "2"), ("#seed", "5"), ("#width", "32"), ("#height", "32")):
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    body = {"model": "tiny-z", "prompt": "a red apple", "steps": 2, "seed": 5, "width": 32, "height": 32}
    expected, infotext = api_image(client, body | chosen | {"cfg_scale": 1.0})
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext


def test_flux2_models_take_their_defaults_references_and_guidance_and_give_the_apis_images(page, client, tmp_path):
    """FLUX.2 [klein] (distilled): its defaults (4 steps, no CFG), no distilled guidance, the reference-image input
    (klein edit; no Kontext resize box) and the U-Net sections hidden; a job with a reference gives the native
    API's image. FLUX.2 [dev]: the distilled-guidance input shown and sent."""
    from _pipeline_models import picture

    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert (data["tiny-klein"]["family"], data["tiny-klein"]["kind"]) == ("flux2", "klein")
    assert (data["tiny-flux2-dev"]["family"], data["tiny-flux2-dev"]["kind"]) == ("flux2", "dev")
    page.select_option("#model", "tiny-klein")
    for sel in U_NET_ONLY:
        assert page.is_hidden(sel), sel
    assert page.is_hidden("#distilled_cfg_scale") and page.is_hidden("#shift")
    assert page.is_visible("#reference-files") and page.is_hidden("#reference-resize")
    assert page.input_value("#cfg_scale") == "1" and page.input_value("#sampler") == "euler"
    path = tmp_path / "ref.png"
    picture(72, 64, seed=2).save(path)  # FLUX.2 takes references of 64 pixels a side or more
    page.set_input_files("#reference-files", str(path))
    for sel, value in [("#prompt", "make it green"), ("#negative_prompt", ""), ("#steps", "2"), ("#seed", "6"),
                       ("#width", "32"), ("#height", "32")]:  # fmt: skip
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    body = {"model": "tiny-klein", "prompt": "make it green", "steps": 2, "seed": 6, "width": 32, "height": 32}
    body |= {"sampler": "euler", "schedule": page.input_value("#schedule"), "cfg_scale": 1.0}
    body["reference_images"] = [upload(client, path.read_bytes())]
    expected, infotext = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext
    without, _ = api_image(client, {k: v for k, v in body.items() if k != "reference_images"})
    assert np.abs(expected.astype(int) - without.astype(int)).mean() > 1  # the reference was sent and used

    page.select_option("#model", "tiny-flux2-dev")
    assert page.is_visible("#distilled_cfg_scale") and page.is_visible("#reference-files")
    page.set_input_files("#reference-files", [])
    for sel, value in [("#prompt", "a red apple"), ("#steps", "2"), ("#seed", "7"), ("#width", "32"),
                       ("#height", "32"), ("#distilled_cfg_scale", "2.5")]:  # fmt: skip
        page.fill(sel, value)
    page.click("#generate")
    params = wait_result(page)
    body = {"model": "tiny-flux2-dev", "prompt": "a red apple", "steps": 2, "seed": 7, "width": 32, "height": 32}
    body |= {"sampler": "euler", "schedule": page.input_value("#schedule"), "cfg_scale": 1.0}
    expected, infotext = api_image(client, body | {"distilled_cfg_scale": 2.5})
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == infotext and "Distilled CFG Scale: 2.5" in params, params
