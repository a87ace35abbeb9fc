"""FLUX.1 Depth / Canny from a photo: ``control_preprocessor`` "canny" makes the map (OpenCV's Canny edges of the
image fitted to the output size) before the model takes it. A job given a photo and the preprocessor equals the
job given the canny image made by hand, in the pipeline, the CLI (``--control-preprocessor``, ``--from-png``) and a
native job; "depth" (a network sdengine does not have) and other names are one line before any model runs."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest

pytest.importorskip("diffusers")

from PIL import Image, ImageDraw  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.control.preprocess import canny  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.io.resize import resize_image  # noqa: E402

PROMPT = "a house by a lake"
W, H = 48, 32  # the tiny VAE is 2x: multiples of 4 (Flux's 2x2 patches)


def photo(width: int, height: int) -> Image.Image:
    """A picture with hard edges (a box and a disc on a gradient), so that its Canny map has lines."""
    y, x = np.mgrid[0:height, 0:width]
    a = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 90)], -1)
    img = Image.fromarray(a.astype(np.uint8))
    d = ImageDraw.Draw(img)
    d.rectangle([width // 6, height // 5, width // 2, height * 3 // 4], fill=(240, 240, 20))
    d.ellipse([width * 3 // 5, height // 6, width * 9 // 10, height * 2 // 3], fill=(10, 30, 200))
    return img


@pytest.fixture(scope="module")
def control(tmp_path_factory):
    folder = make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-canny", kind="control", seed=6)
    return folder, sdengine.load_pipeline(folder, device="cpu")


def _run(pipe, **kw):
    return pipe(PROMPT, steps=2, seed=3, width=W, height=H, progress=False, **kw)


def test_canny_preprocessed_job_equals_the_hand_made_canny_image(control):
    pipe = control[1]
    same = photo(W, H)
    edges = canny(same)
    assert 0 < (np.asarray(edges) > 0).mean() < 0.5  # a real edge map, not blank nor the photo
    ours = _run(pipe, control_image=same, control_preprocessor="canny")
    np.testing.assert_array_equal(ours.arrays, _run(pipe, control_image=edges).arrays)
    assert np.abs(ours.arrays - _run(pipe, control_image=same).arrays).mean() > 1e-3  # the map changed the image
    assert ours.parameters["Control preprocessor"] == "canny"
    # a photo of another size: fitted to the output size (the resize mode), then its edges (one per output pixel)
    big = photo(96, 80)
    fitted = canny(resize_image(big, W, H, "crop and resize"))
    got = _run(pipe, control_image=big, control_preprocessor="canny", resize_mode=1)
    np.testing.assert_array_equal(got.arrays, _run(pipe, control_image=fitted, resize_mode=1).arrays)


def test_preprocessor_refusals_are_one_line_before_any_model(control):
    pipe = control[1]
    with pytest.raises(GenerationError, match=r"control_preprocessor 'depth' needs a network .*MiDaS") as e:
        _run(pipe, control_image=photo(W, H), control_preprocessor="depth")
    assert "\n" not in str(e.value) and "'none'" in str(e.value)
    with pytest.raises(GenerationError, match=r"unknown control_preprocessor 'cany' .*did you mean 'canny'"):
        _run(pipe, control_image=photo(W, H), control_preprocessor="cany")
    with pytest.raises(GenerationError, match=r"needs control_image .*\(or a photo with control_preprocessor canny\)"):
        _run(pipe, control_preprocessor="canny")  # the model's own refusal comes first
    with pytest.raises(GenerationError, match=r"control_preprocessor must be a name"):
        _run(pipe, control_image=photo(W, H), control_preprocessor=None)
    # checked without a model: GenerationRequest.validate
    req = sdengine.GenerationRequest(prompt="x", control_image=photo(W, H), control_preprocessor="depth")
    with pytest.raises(GenerationError, match="MiDaS"):
        req.validate()
    with pytest.raises(GenerationError, match=r"control_preprocessor 'canny' makes .* from control_image"):
        sdengine.GenerationRequest(prompt="x", control_preprocessor="canny").validate()


def test_cli_control_preprocessor_and_from_png(control, tmp_path):
    folder, pipe = control
    src = tmp_path / "photo.png"
    photo(W, H).save(src)
    size = ["--width", str(W), "--height", str(H), "--steps", "2", "--seed", "3", "--no-progress"]
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(folder), PROMPT, "--control-image", str(src), *size]
    assert main([*args, "--control-preprocessor", "canny", "--out", str(out)]) == 0
    want = _run(pipe, control_image=canny(photo(W, H)))
    np.testing.assert_array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    from sdengine.metadata import read_png_parameters

    assert "Control preprocessor: canny" in read_png_parameters(out)
    again = tmp_path / "again.png"  # the infotext's "Control preprocessor" is read back
    png = ["generate", "--from-png", str(out), "--model", str(folder), "--control-image", str(src), "--no-progress"]
    assert main([*png, "--out", str(again)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(out)))
    assert main([*args, "--control-preprocessor", "depth", "--out", str(tmp_path / "x.png")]) != 0


@pytest.fixture(scope="module")
def served(control, tmp_path_factory):
    """(server url, httpx client): a live server whose models folder holds the tiny Depth / Canny folder."""
    pytest.importorskip("fastapi")
    import shutil

    import httpx

    from _live_server import live_server, server_config

    root = tmp_path_factory.mktemp("canny-server")
    shutil.copytree(control[0], root / "models" / "tiny-flux-canny")
    with live_server(server_config(root, models_dir=root / "models")) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server.url, client


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_native_job_control_preprocessor(control, served):
    from _live_server import run_job

    pipe, (_, client) = control[1], served
    body = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 3, "cfg_scale": 1.0, "sampler": "euler",
            "schedule": "normal", "model": "tiny-flux-canny", "control_preprocessor": "canny"}  # fmt: skip
    body["control_image"] = base64.b64encode(_png(photo(W, H))).decode()
    want = _run(pipe, control_image=canny(photo(W, H)))
    pixels, _ = run_job(client, body)
    np.testing.assert_array_equal(pixels, np.asarray(want.images[0]))
    r = client.post("/v1/jobs", json={**body, "control_preprocessor": "depth"})
    assert r.status_code == 400, r.text
    message = r.json()["detail"]
    assert "control_preprocessor 'depth' needs a network" in message and "\n" not in message, message


def test_openai_edit_with_control_image(control, served):
    """``control_image: true`` (extra_body) on ``/v1/images/edits`` (the real ``openai`` client): the one image is
    the control map (size "auto": its size floored to 16), or a photo with ``control_preprocessor`` "canny"; the
    pipeline's image; what does not combine is a 400 naming its field."""
    openai = pytest.importorskip("openai")
    pipe, (url, _) = control[1], served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=300)
    edges, shot = canny(photo(W, H)), photo(W, H)
    extra = {"control_image": True, "seed": 3, "steps": 2}
    kw = {"model": "tiny-flux-canny", "prompt": PROMPT}
    r = client.images.edit(image=("c.png", _png(edges), "image/png"), extra_body=extra, **kw)
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
    want = _run(pipe, control_image=edges)
    assert got.size == (W, H)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.images[0]))
    canny_extra = {**extra, "control_preprocessor": "canny"}
    r = client.images.edit(image=("p.png", _png(shot), "image/png"), extra_body=canny_extra, **kw)
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want.images[0]))  # the photo's canny = the map
    stream = client.images.edit(image=("c.png", _png(edges), "image/png"), stream=True, extra_body=extra, **kw)
    events = list(stream)
    assert events[-1].type == "image_edit.completed", [e.type for e in events]
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(events[-1].b64_json))).convert("RGB")),
        np.asarray(want.images[0]),
    )
    refused = [
        (dict(mask=("m.png", _png(Image.new("RGBA", (W, H))), "image/png")), "mask", "takes no mask"),
        (dict(extra_body={**extra, "strength": 0.5}), "strength", "strength is img2img's"),
        (dict(extra_body={"control_preprocessor": "canny"}), "control_preprocessor", "with control_image: true"),
        (dict(extra_body={**extra, "reference_images": True}), "control_image", "cannot run together"),
    ]
    for change, param, needle in refused:
        args = {**kw, "image": ("c.png", _png(edges), "image/png"), "extra_body": extra, **change}
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(**args)
        assert e.value.body["param"] == param and needle in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # GenerationRequest.validate's, before any job
        depth_extra = {**extra, "control_preprocessor": "depth"}
        client.images.edit(image=("p.png", _png(shot), "image/png"), extra_body=depth_extra, **kw)
    assert "control_preprocessor 'depth' needs a network" in e.value.body["message"], e.value.body
    with pytest.raises(openai.BadRequestError) as e:  # the precheck's: the built-in SD model takes no control map
        client.images.edit(image=("c.png", _png(edges), "image/png"), extra_body=extra, model="emoji", prompt=PROMPT)
    assert (
        "control_image is the control map of FLUX.1 Depth / Canny; emoji is not a Flux model" in e.value.body["message"]
    )


def test_a1111_txt2img_control_preprocessor_and_its_infotext(control, served):
    """The A1111 route takes sdengine's top-level ``control_image`` + ``control_preprocessor`` (A1111 has no such
    field): the photo's canny job equals the pipeline given the map; its infotext's "Control preprocessor" is read
    back by ``infotext`` (the same pixels again); a non-string or an unknown name is a one-line 400."""
    pipe, (_, client) = control[1], served
    model = {"sd_model_checkpoint": "tiny-flux-canny"}
    body = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 3, "cfg_scale": 1.0,
            "sampler_name": "Euler", "scheduler": "Normal", "override_settings": model,
            "control_image": base64.b64encode(_png(photo(W, H))).decode(), "control_preprocessor": "canny"}  # fmt: skip
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    want = _run(pipe, control_image=canny(photo(W, H)))
    np.testing.assert_array_equal(got, np.asarray(want.images[0]))
    infotext = r.json()["info"]
    assert "Control preprocessor: canny" in infotext, infotext
    import json

    again = {k: v for k, v in body.items() if k not in ("control_preprocessor", "prompt", "seed", "steps")}
    again["infotext"] = json.loads(infotext)["infotexts"][0]
    r2 = client.post("/sdapi/v1/txt2img", json=again)
    assert r2.status_code == 200, r2.text
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(base64.b64decode(r2.json()["images"][0]))).convert("RGB")), got
    )
    for bad, needle in ((7, "control_preprocessor must be a name"), ("depth", "needs a network")):
        r = client.post("/sdapi/v1/txt2img", json={**body, "control_preprocessor": bad})
        assert r.status_code == 400 and needle in r.json()["detail"] and "\n" not in r.json()["detail"], r.text
