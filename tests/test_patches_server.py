"""Deep Shrink and HyperTile on OpenAI's image routes: the sdengine extensions ``deep_shrink`` and ``hypertile``
(with ``hypertile_hires_only``, ``hypertile_rule``, ``hypertile_scale_depth``) sent with the real ``openai`` client's
``extra_body``, and as the edits form's text fields; bad values are OpenAI's 400 with ``param`` the field. The images
equal the Python API's (``pipe(deep_shrink=...)``, ``pipe(hypertile=...)``) on the emoji model at 64x64."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from _live_server import live_server, server_config, shared_loader

GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
EXTRA = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras"}
# ComfyUI's HyperTile rule at 64x64: the emoji model's latent in 2x2 tiles (tests/test_hypertile_server.py)
TILES = {"hypertile": [32, 1, 0], "hypertile_rule": "comfyui", "hypertile_scale_depth": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("patches_server"))) as s:
        yield s


@pytest.fixture()
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)


def python_api(**kw: Any) -> tuple[np.ndarray, str]:
    r = shared_loader("emoji", "cpu")("a red apple", progress=False, **{**GEN, **kw})
    return np.asarray(r.images[0].convert("RGB")), r.infotexts[0]


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generate(api: openai.OpenAI, **extra: Any) -> np.ndarray:
    r = api.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body={**EXTRA, **extra})
    return decode(r.data[0].b64_json)


def refused(api: openai.OpenAI, **extra: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as e:
        generate(api, **extra)
    body: dict[str, Any] = e.value.body  # type: ignore[assignment]
    assert "\n" not in body["message"], body
    return body


INIT = Image.new("RGB", (64, 64), (250, 200, 40))


def edit(server, **fields: str) -> httpx.Response:
    buf = io.BytesIO()
    INIT.save(buf, format="PNG")
    form = {"prompt": "a red apple", "model": "emoji", "size": "64x64", "seed": "3", "steps": "3"}
    form |= {"sampler": "dpmpp_2m", "schedule": "karras", "strength": "0.6"}
    files = {"image": ("i.png", buf.getvalue(), "image/png")}
    return httpx.post(f"{server.url}/v1/images/edits", data={**form, **fields}, files=files, timeout=300)


def test_openai_images_take_deep_shrink(server, api) -> None:
    """``deep_shrink`` as the native job's object (the defaults for settings left out), a JSON object or
    "block,factor[,start,end]" in a string: the Python API's image; the edits form takes the string."""
    want, text = python_api(deep_shrink={"block": 2, "factor": 2.0, "start": 0.0, "end": 0.5})
    assert not np.array_equal(want, python_api()[0])  # Deep Shrink changes this image
    assert "kohya_hrfix_block_number: 2" in text
    np.testing.assert_array_equal(generate(api, deep_shrink={"block": 2, "end": 0.5}), want)
    np.testing.assert_array_equal(generate(api, deep_shrink="2, 2, 0, 0.5"), want)
    bislerp = python_api(deep_shrink={"block": 2, "end": 0.5, "upscale_method": "bislerp", "after_skip": False})[0]
    got = generate(api, deep_shrink='{"block": 2, "end": 0.5, "upscale_method": "bislerp", "after_skip": false}')
    np.testing.assert_array_equal(got, bislerp)
    r = edit(server, deep_shrink="2,2,0,1")  # img2img starts at a lower noise: the whole run
    assert r.status_code == 200, r.text
    want = python_api(init_image=INIT, strength=0.6, deep_shrink={"block": 2, "end": 1.0})[0]
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    assert not np.array_equal(want, python_api(init_image=INIT, strength=0.6)[0])
    # variations (an empty prompt, strength 0.75) read the same form field
    buf = io.BytesIO()
    INIT.save(buf, format="PNG")
    form = {"model": "emoji", "size": "64x64", "response_format": "b64_json", "deep_shrink": "2,2,0,1", **EXTRA}
    r = httpx.post(
        f"{server.url}/v1/images/variations",
        data={k: str(v) for k, v in form.items()},
        files={"image": ("i.png", buf.getvalue(), "image/png")},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    pipe = shared_loader("emoji", "cpu")
    kw = {**GEN, "init_image": INIT, "strength": 0.75, "progress": False}
    want = np.asarray(pipe("", **kw, deep_shrink={"block": 2, "end": 1.0}).images[0].convert("RGB"))
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    assert not np.array_equal(want, np.asarray(pipe("", **kw).images[0].convert("RGB")))
    r = edit(server, deep_shrink="")  # an empty field: off
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), python_api(init_image=INIT, strength=0.6)[0])


@pytest.mark.parametrize(
    "value,said",
    [
        ({"block": 0}, "deep_shrink: deep shrink block must be an input block number in [1, 32]"),
        ({"block": True}, "deep_shrink: deep shrink block must be an input block number in [1, 32]"),
        ({"block": "3"}, "deep_shrink: deep shrink block must be an input block number in [1, 32]"),
        ({"factor": 10}, "deep_shrink: deep shrink factor must be a number in [0.1, 9], got 10"),
        ({"end": 1.5}, "deep_shrink: deep shrink end must be a number in [0, 1], got 1.5"),
        ({"upscale_method": "lanczos"}, "unknown deep shrink upscale_method 'lanczos'"),
        ({"scale": 2}, "deep_shrink: unknown deep shrink setting 'scale'"),
        ([3, 2.0], "deep_shrink must be an object {block, factor, start, end"),
        (3, "deep_shrink must be an object {block, factor, start, end"),
        ("3,x", "deep_shrink must be an object {block, factor, start, end"),
        ("3,2,0", "deep_shrink must be an object {block, factor, start, end"),
        ("{block: 3}", "(not JSON)"),
        ({"block": 9}, "deep_shrink: deep shrink block 9 is not an input block of this U-Net: it has blocks 1 to 5"),
    ],
)
def test_a_bad_deep_shrink_is_a_400_with_its_param(api, value, said) -> None:
    body = refused(api, deep_shrink=value)
    assert body["param"] == "deep_shrink" and said in body["message"], body


def test_openai_images_take_hypertile(server, api) -> None:
    """``hypertile`` [tile, swap, depth] (or "tile,swap,depth"), ``hypertile_rule``, ``hypertile_scale_depth``: the
    Python API's image and infotext; ``hypertile_hires_only`` without a hires fix tiles nothing (the plain image); the
    edits form takes text fields."""
    want, text = python_api(hypertile=(32, 1, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)
    plain = python_api()[0]
    assert not np.array_equal(want, plain) and "Hypertile rule: comfyui" in text
    np.testing.assert_array_equal(generate(api, **TILES), want)
    np.testing.assert_array_equal(generate(api, **{**TILES, "hypertile": "32, 1, 0"}), want)
    np.testing.assert_array_equal(generate(api, **TILES, hypertile_hires_only=True), plain)
    r = edit(server, hypertile="32,1,0", hypertile_rule="comfyui", hypertile_scale_depth="false")
    assert r.status_code == 200, r.text
    kw = dict(init_image=INIT, strength=0.6)
    want = python_api(**kw, hypertile=(32, 1, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)[0]
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    assert not np.array_equal(want, python_api(**kw)[0])
    r = edit(server, hypertile="32,1,0", hypertile_rule="comfyui", hypertile_scale_depth="maybe")
    assert r.status_code == 400 and r.json()["error"]["param"] == "hypertile_scale_depth", r.text
    r = edit(server, hypertile="32,1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "hypertile", r.text


@pytest.mark.parametrize(
    "extra,param,said",
    [
        ({"hypertile": [256, True, 3]}, "hypertile", "hypertile must be three whole numbers"),
        ({"hypertile": [256, 3]}, "hypertile", "hypertile must be three whole numbers"),
        ({"hypertile": [256.0, 3, 3]}, "hypertile", "hypertile must be three whole numbers"),
        ({"hypertile": "256,x,3"}, "hypertile", "hypertile must be three whole numbers"),
        ({"hypertile": {"tile": 256}}, "hypertile", "hypertile must be three whole numbers"),
        ({"hypertile": [256, 200, 3]}, "hypertile", "hypertile swap_size must be a whole number in [0, 128], got 200"),
        ({"hypertile": [256, 3, 11]}, "hypertile", "hypertile max_depth must be a whole number in [0, 10], got 11"),
        ({"hypertile": [4096, 3, 3]}, "hypertile", "hypertile tile_size must be a whole number in [0, 2048]"),
        ({"hypertile": [256, 3, 3], "hypertile_rule": "forge"}, "hypertile_rule", "unknown hypertile_rule 'forge'"),
        ({"hypertile": [256, 3, 3], "hypertile_hires_only": "yes"}, "hypertile_hires_only", "must be true or false"),
        ({"hypertile": [256, 3, 3], "hypertile_scale_depth": 0}, "hypertile_scale_depth", "must be true or false"),
    ],
)
def test_a_bad_hypertile_is_a_400_with_its_param(api, extra, param, said) -> None:
    body = refused(api, **extra)
    assert body["param"] == param and said in body["message"], body


def test_the_openapi_document_lists_the_extensions(server) -> None:
    """The OpenAI routes' documented bodies name the new fields (an undocumented field would be refused as
    unknown), with the native job's Deep Shrink ranges."""
    doc = httpx.get(f"{server.url}/openapi.json", timeout=60).json()
    text = str(doc)
    for name in ("deep_shrink", "hypertile", "hypertile_hires_only", "hypertile_rule", "hypertile_scale_depth"):
        assert f"'{name}'" in text
    from sdengine.server.openai_images import deep_shrink_schema

    props = deep_shrink_schema()
    assert (props["block"]["minimum"], props["block"]["maximum"]) == (1, 32)
    assert (props["factor"]["minimum"], props["factor"]["maximum"]) == (0.1, 9)
    assert props["upscale_method"]["enum"] == ["bicubic", "nearest-exact", "bilinear", "area", "bislerp"]
