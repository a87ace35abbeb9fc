"""FLUX.1 Kontext reference images and FLUX.1 Depth / Canny's control image on the server's other protocols: the
kind of a Flux model in ``GET /v1/models``, OpenAI's ``/v1/images/edits`` with ``reference_images: true`` (the
real ``openai`` client), and A1111's txt2img / img2img top-level ``reference_images`` and ``control_image``.

One live server on a models folder with a tiny random FLUX.1 [dev] folder (Kontext has [dev]'s shapes), a tiny
Depth / Canny folder and the built-in SD 1.x emoji model; each image is compared with the Python pipeline's for the
same settings (equal pixels: the same code on the same CPU), and what does not combine is a one-line 400."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, server_config  # noqa: E402
from _pipeline_models import picture  # noqa: E402

PROMPT = "make the apple green"
W, H = 48, 32  # the tiny models' 2x VAEs: multiples of 4
STEPS = 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server url, httpx client, Kontext pipeline, Depth pipeline): one live server for the module."""
    root = tmp_path_factory.mktemp("kontextweb")
    models = root / "models"
    make_flux_folder(models / "tiny-kontext", guidance=True, seed=2)
    make_flux_folder(models / "tiny-depth", kind="control", seed=6)
    kontext = sdengine.load_pipeline(models / "tiny-kontext", device="cpu")
    depth = sdengine.load_pipeline(models / "tiny-depth", device="cpu")
    with live_server(server_config(root, models_dir=models)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server.url, client, kontext, depth


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _one_line_400(r: httpx.Response, needle: str) -> None:
    assert r.status_code == 400, r.text
    body = r.json()
    message = body["detail"] if "detail" in body else body["error"]["message"]
    assert needle in message and "\n" not in message, message


def test_models_tell_a_flux_models_kind(served):
    _, client, _, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert (data["tiny-kontext"]["family"], data["tiny-kontext"]["kind"]) == ("flux", "plain")
    assert (data["tiny-depth"]["family"], data["tiny-depth"]["kind"]) == ("flux", "control")
    assert data["emoji"]["kind"] is None  # not a Flux model
    assert client.get("/v1/models/tiny-depth").json()["kind"] == "control"


def test_openai_edit_with_reference_images_is_kontext(served):
    """``reference_images: true`` (extra_body): the edit's images are the references (one, then two as
    ``image[]``), the pipeline's image; without it an edit stays img2img; what only img2img reads is refused."""
    url, _, kontext, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    a, b = picture(42, 26, seed=1), picture(24, 40, seed=4)
    extra = {"reference_images": True, "reference_auto_resize": False, "seed": 5, "steps": STEPS}
    r = client.images.edit(model="tiny-kontext", image=("a.png", _png(a), "image/png"), prompt=PROMPT, extra_body=extra)
    want = kontext(PROMPT, steps=STEPS, seed=5, reference_images=a, reference_auto_resize=False, progress=False)
    got = _image(r.data[0].b64_json)
    assert got.size == (40, 24) and r.size == "40x24"  # size "auto": the reference's 42 x 26, floored
    np.testing.assert_array_equal(_pixels(got), _pixels(want.images[0]))
    stream = client.images.edit(model="tiny-kontext", image=("a.png", _png(a), "image/png"), prompt=PROMPT,
                                stream=True, partial_images=1, extra_body=extra)  # fmt: skip
    events = list(stream)
    assert events[-1].type == "image_edit.completed", [e.type for e in events]
    np.testing.assert_array_equal(_pixels(_image(events[-1].b64_json)), _pixels(got))
    two = [("a.png", _png(a), "image/png"), ("b.png", _png(b), "image/png")]
    r = client.images.edit(model="tiny-kontext", image=two, prompt=PROMPT, size=f"{W}x{H}", extra_body=extra)
    want = kontext(PROMPT, steps=STEPS, seed=5, width=W, height=H, reference_images=[a, b],
                   reference_auto_resize=False, progress=False)  # fmt: skip
    got = _image(r.data[0].b64_json)
    np.testing.assert_array_equal(_pixels(got), _pixels(want.images[0]))  # (OpenAI's images carry no infotext)
    # without the switch an edit stays img2img (OpenAI's strength 0.75), Kontext's model too
    plain = picture(W, H, seed=3)
    r = client.images.edit(model="tiny-kontext", image=("p.png", _png(plain), "image/png"), prompt=PROMPT,
                           extra_body={"seed": 5, "steps": STEPS})  # fmt: skip
    want = kontext(PROMPT, steps=STEPS, seed=5, width=W, height=H, init_image=plain, strength=0.75, progress=False)
    np.testing.assert_array_equal(_pixels(_image(r.data[0].b64_json)), _pixels(want.images[0]))
    refused = [
        (dict(mask=("m.png", _png(Image.new("RGBA", a.size)), "image/png")), "mask", "take no mask"),
        (dict(extra_body={**extra, "strength": 0.5}), "strength", "strength is img2img's"),
        (dict(image=[("a.png", _png(a), "image/png")] * 5), "image", "at most 4 reference images, got 5"),
        (dict(extra_body={"reference_auto_resize": False}), "reference_auto_resize", "with reference_images: true"),
        (dict(image=two, extra_body={"steps": STEPS}), "image", "send reference_images: true"),
    ]
    for change, param, needle in refused:
        kw = {"model": "tiny-kontext", "image": ("a.png", _png(a), "image/png"), "prompt": PROMPT, "extra_body": extra}
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(**{**kw, **change})
        assert e.value.body["param"] == param and needle in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # the precheck's: the model takes no references
        client.images.edit(model="emoji", image=("a.png", _png(a), "image/png"), prompt=PROMPT, extra_body=extra)
    assert "reference_images are FLUX.1 Kontext's; emoji is not a Flux model" in e.value.body["message"]


def test_a1111_takes_reference_images_and_control_image(served):
    """A1111 txt2img with sdengine's top-level ``reference_images`` (Kontext) and ``control_image`` (Depth /
    Canny): the pipeline's images and their infotext; a wrong type or model is a one-line 400."""
    _, client, kontext, depth = served
    ref, control = picture(42, 26, seed=1), picture(W, H, seed=2)
    body = {"prompt": PROMPT, "steps": STEPS, "width": W, "height": H, "seed": 7, "cfg_scale": 1,
            "sampler_name": "Euler"}  # fmt: skip
    kontext_body = {**body, "override_settings": {"sd_model_checkpoint": "tiny-kontext"}}
    # reference_auto_resize false: Kontext's resolutions (~1024^2) would take minutes on a CPU
    refs = {"reference_images": [_b64(ref)], "reference_auto_resize": False}
    r = client.post("/sdapi/v1/txt2img", json={**kontext_body, **refs})
    assert r.status_code == 200, r.text
    got = _image(r.json()["images"][0])
    edited = kontext(PROMPT, steps=STEPS, seed=7, width=W, height=H, reference_images=ref,
                     reference_auto_resize=False, progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(got), _pixels(edited))
    assert "Reference images: 1" in got.info["parameters"] and "Reference resize: off" in got.info["parameters"]
    depth_body = {**body, "override_settings": {"sd_model_checkpoint": "tiny-depth"}}
    r = client.post("/sdapi/v1/txt2img", json={**depth_body, "control_image": _b64(control)})
    assert r.status_code == 200, r.text
    want = depth(PROMPT, steps=STEPS, seed=7, width=W, height=H, control_image=control, progress=False).images[0]
    np.testing.assert_array_equal(_pixels(_image(r.json()["images"][0])), _pixels(want))
    for change, needle in [
        ({**kontext_body, "reference_images": _b64(ref)}, "reference_images must be a list of base64 images"),
        ({**kontext_body, "control_image": [_b64(ref)]}, "control_image must be one base64 image"),
        ({**kontext_body, "reference_images": [_b64(ref)], "reference_auto_resize": "no"}, "true or false"),
        ({**body, "reference_images": [_b64(ref)], "width": 64, "height": 64}, "emoji is not a Flux model"),
        ({**body, "control_image": _b64(control), "width": 64, "height": 64}, "Canny; emoji is not a Flux model"),
        ({**kontext_body, "control_image": _b64(control)}, "control_image is the control map of FLUX.1 Depth"),
        ({**depth_body}, "FLUX.1 Depth / Canny needs control_image"),
    ]:
        _one_line_400(client.post("/sdapi/v1/txt2img", json=change), needle)
    # the Forge FluxKontext extension's alwayson script (forge2_flux_kontext): its "no change" sizing, the same image
    script = {"Forge FluxKontext": {"args": [True, _b64(ref), None, "no change", False]}}
    r = client.post("/sdapi/v1/txt2img", json={**kontext_body, "alwayson_scripts": script})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(_pixels(_image(r.json()["images"][0])), _pixels(edited))
    off = {"Forge FluxKontext": {"args": [False, _b64(ref), None, "no change", False]}}
    r = client.post("/sdapi/v1/txt2img", json={**kontext_body, "alwayson_scripts": off})
    assert r.status_code == 200 and "alwayson_scripts.forge fluxkontext" in r.json()["info"], r.text
    for args, needle in [
        ([True, _b64(ref), None, "to output", False], "'to output' is not supported"),
        ([True, _b64(ref), None, "no change", True], "reduce to half width and height) is not supported"),
        ([True, 5, None, "no change", False], "(image1) must be a base64 image or null"),
    ]:
        scripts = {"Forge FluxKontext": {"args": args}}
        _one_line_400(client.post("/sdapi/v1/txt2img", json={**kontext_body, "alwayson_scripts": scripts}), needle)
    r = client.post("/sdapi/v1/txt2img", json={**kontext_body, **refs, "alwayson_scripts": script})
    _one_line_400(r, "reference_images given twice")
    # img2img takes them too: Kontext img2img (the init image's VAE mean, the reference's tokens)
    r = client.post("/sdapi/v1/img2img", json={**kontext_body, "init_images": [_b64(control)], **refs})
    assert r.status_code == 200, r.text
    want = kontext(PROMPT, steps=STEPS, seed=7, width=W, height=H, init_image=control, reference_images=ref,
                   reference_auto_resize=False, strength=0.75, progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(_pixels(_image(r.json()["images"][0])), _pixels(want))
    # and a mask: Kontext inpainting inside it ("original" masked content, no blur), the init image outside it
    # (A1111's overlay)
    m = np.zeros((H, W), np.uint8)
    m[8:24, 12:36] = 255
    mask = Image.fromarray(m, "L")
    inpaint = {"mask": _b64(mask), "inpainting_fill": 1, "mask_blur": 0, "denoising_strength": 0.6}
    r = client.post("/sdapi/v1/img2img", json={**kontext_body, "init_images": [_b64(control)], **refs, **inpaint})
    assert r.status_code == 200, r.text
    want = kontext(PROMPT, steps=STEPS, seed=7, width=W, height=H, init_image=control, mask=mask, strength=0.6,
                   reference_images=ref, reference_auto_resize=False, progress=False).images[0]  # fmt: skip
    got, inside = _pixels(_image(r.json()["images"][0])), m > 127
    np.testing.assert_array_equal(got[inside], _pixels(want)[inside])
    np.testing.assert_array_equal(got[~inside], _pixels(control)[~inside])
