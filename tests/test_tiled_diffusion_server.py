"""The A1111 Tiled Diffusion extension's entry in ``alwayson_scripts`` on the A1111 routes (the real ``webuiapi``
client): its MultiDiffusion method gives the Python API's ``tiled_diffusion`` image (window = the latent tile,
stride = tile - overlap, view batch = tile batch size), "Overwrite image size" sets txt2img's size, what it cannot
do is a one-line 400 and what changes nothing is listed as ignored. The emoji model at 128x64 (a 16x8 latent)."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from _live_server import live_server, server_config, shared_loader

GEN = {"seed": 3, "steps": 3, "width": 128, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras", "cfg_scale": 7.0}
A1111_BODY = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 128, "height": 64, "cfg_scale": 7.0}
A1111_BODY |= {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}
NAME = "Tiled Diffusion"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("tiled_server"))) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def python_api(**kw: Any) -> tuple[np.ndarray, str]:
    r = shared_loader("emoji", "cpu")("a red apple", progress=False, **{**GEN, **kw})
    return np.asarray(r.images[0].convert("RGB")), r.infotexts[0]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def test_the_extensions_multidiffusion_gives_the_python_apis_image(server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    kw: dict[str, Any] = dict(prompt="a red apple", seed=3, steps=3, width=128, height=64, cfg_scale=7.0)
    # enabled, method, overwrite size, keep input size, image w, h, tile w, tile h, overlap, tile batch size
    args = [True, "MultiDiffusion", False, True, 1024, 1024, 8, 8, 4, 2]
    want, text = python_api(tiled_diffusion={"window": 8, "window_height": 8, "stride": 4, "view_batch": 2})
    r = api.txt2img(**kw, alwayson_scripts={NAME: {"args": args}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert r.info["infotexts"][0] == text and "Tiled Diffusion: MultiDiffusion" in text
    assert r.info["ignored"] == []
    plain = python_api()[0]
    assert not np.array_equal(want, plain)  # the views changed the picture
    # disabled: the plain image; the rest of the extension's list (its defaults) changes nothing
    r = api.txt2img(**kw, alwayson_scripts={NAME: {"args": [False, *args[1:]]}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), plain)
    # a non-square tile: one stride, the smaller tile less the overlap (said in a note); a moved ControlNet
    # tensor changes nothing (listed as ignored)
    full = [*args[:6], 12, 8, 4, 1, "None", 2.0, False, 10, 1, 1, 64, True, False, False, False]
    r = api.txt2img(**kw, alwayson_scripts={NAME: {"args": full}})
    want2 = python_api(tiled_diffusion={"window": 12, "window_height": 8, "stride": 4})[0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want2)
    assert r.info["ignored"] == ["alwayson_scripts.tiled diffusion.args[17] (control_tensor_cpu)"]


def test_overwrite_image_size_sets_txt2imgs_size(client) -> None:
    args = [True, "MultiDiffusion", True, True, 96, 64, 8, 8, 4, 1]
    body = {**A1111_BODY, "width": 64, "alwayson_scripts": {NAME: {"args": args}}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = decode(r.json()["images"][0])
    want = python_api(width=96, tiled_diffusion={"window": 8, "stride": 4})[0]
    np.testing.assert_array_equal(got, want)


def test_what_sdengine_does_not_run_is_a_one_line_400(client) -> None:
    base = [True, "MultiDiffusion", False, True, 1024, 1024, 8, 8, 4, 1]
    for args, said in (
        ([True, "Mixture of Diffusers", *base[2:]], "Mixture of Diffusers is not supported"),
        ([True, "Other", *base[2:]], "args[1] (method) must be 'MultiDiffusion'"),
        ([1, *base[1:]], "args[0] (enabled) must be true or false, got 1"),
        ([*base[:6], 8, 8, 8, 1], "args[8] (overlap) must be at least 0 and smaller than the tiles (8x8), got 8"),
        ([*base[:6], 8.5, 8, 4, 1], "args[6] (tile_width) must be a whole number, got 8.5"),
        ([*base[:9], 0], "tiled diffusion view_batch must be a whole number in [1, 64], got 0"),
        ([*base, "None", 2.0, True], "args[12] (noise_inverse): noise inversion is not supported"),
        ([*base, "None", 2.0, False, 10, 1, 1, 64, False, True], "region prompt control is not supported"),
    ):
        r = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "alwayson_scripts": {NAME: {"args": args}}})
        assert r.status_code == 400 and said in r.json()["detail"], (args, r.text)
        assert "\n" not in r.json()["detail"] and "tiled diffusion" in r.json()["detail"]
    r = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "alwayson_scripts": {NAME: [True]}})
    assert r.status_code == 400 and "must be an object {args: [enabled, method, ...]}" in r.json()["detail"]


def test_img2img_takes_it_and_refuses_the_extensions_upscaler(client) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (128, 64), (200, 40, 40)).save(buf, format="PNG")
    init = base64.b64encode(buf.getvalue()).decode()
    body = {**A1111_BODY, "init_images": [init], "denoising_strength": 0.6}
    args = [True, "MultiDiffusion", False, True, 1024, 1024, 8, 8, 4, 1]
    r = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {NAME: {"args": args}}})
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert "Tiled Diffusion: MultiDiffusion" in info and "keep_input_size" in info  # listed as ignored
    plain = client.post("/sdapi/v1/img2img", json=body)
    assert not np.array_equal(decode(r.json()["images"][0]), decode(plain.json()["images"][0]))
    r = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {NAME: {"args": [*args, "R-ESRGAN 4x+"]}}})
    assert r.status_code == 400 and "args[10] (upscaler_name): the extension's upscale" in r.json()["detail"], r.text


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_a_controlnet_unit_runs_with_it_as_in_the_python_api(server) -> None:
    """The extension runs sd-webui-controlnet's units per tile: so does sdengine (each view on its cut map)."""
    from sdengine.control import canny
    from sdengine.pipeline import ControlUnit
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    gradient = Image.linear_gradient("L").resize((128, 64)).convert("RGB")
    control = canny(gradient.rotate(30, fillcolor=(255, 255, 255)))
    unit = webuiapi.ControlNetUnit(image=control, module="none", model="emoji-controlnet-canny", weight=0.8)
    args = [True, "MultiDiffusion", False, True, 1024, 1024, 8, 8, 4, 2]
    kw: dict[str, Any] = dict(prompt="a red apple", seed=3, steps=3, width=128, height=64, cfg_scale=7.0)
    r = api.txt2img(**kw, controlnet_units=[unit], alwayson_scripts={NAME: {"args": args}})
    cu = ControlUnit(BUILTIN_CONTROLNETS["emoji-controlnet-canny"], control, 0.8, rule="a1111")
    tiled = {"window": 8, "window_height": 8, "stride": 4, "view_batch": 2}
    want = python_api(tiled_diffusion=tiled, controlnets=[cu], strength_rule="a1111")[0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert not np.array_equal(want, python_api(tiled_diffusion=tiled)[0])  # the unit acted
