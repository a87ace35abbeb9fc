"""A1111's Soft Inpainting script on sdengine's A1111 route, through the real ``webuiapi`` client: the image is the
Python API's soft inpainting (A1111's strength rule, the grey mask unthresholded and blurred) laid over the init
image by its composite mask, the infotext has A1111's keys and reads back, disabled it is plain inpainting, and
bad arguments (or the script where A1111 does not run it) are one-line 400s with no job queued."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from _live_server import live_server, run_job, server_config, shared_loader

SCRIPT = "Soft inpainting"  # as webuiapi users send it (A1111 matches the title case-insensitively)
SETTINGS = [1.5, 0.75, 3.0, 0.25, 0.75, 3.0]
KW = dict(prompt="a red apple", seed=3, steps=3, width=64, height=64, cfg_scale=7.0, denoising_strength=0.75,
          inpaint_full_res=False)  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("soft_inpainting_server"))) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def _init() -> Image.Image:
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    return Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 90, np.uint8)], -1)
    )


def _mask() -> Image.Image:
    """Black on the left 20 columns, a grey ramp (many levels, none thresholded by soft inpainting) to white."""
    row = np.clip((np.arange(64) - 20) / 28, 0, 1)
    return Image.fromarray(np.tile(np.round(row * 255).astype(np.uint8)[None], (64, 1)), "L")


def _b64(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _python_api(**kw: Any) -> Any:
    """The route's pipeline call: A1111's strength rule, the grey mask blurred by A1111's default 4."""
    pipe = shared_loader("emoji", "cpu")
    same = dict(mask_blur=4.0, strength=0.75, strength_rule="a1111", seed=3, steps=3, width=64, height=64)
    kw = {"sampler": "euler", "schedule": "uniform", **same, **kw}
    return pipe("a red apple", init_image=_init(), mask=_mask(), cfg_scale=7.0, progress=False, **kw)


def test_the_script_through_webuiapi_is_the_python_apis_soft_inpainting(server) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    scripts = {SCRIPT: {"args": [True, *SETTINGS]}}
    r = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1, alwayson_scripts=scripts, **KW)
    got = np.asarray(r.image.convert("RGB"))
    settings = dict(zip(("schedule_bias", "preservation_strength", "transition_contrast_boost", "mask_influence",
                         "difference_threshold", "difference_contrast"), SETTINGS, strict=True))  # fmt: skip
    raw = _python_api(soft_inpainting={**settings, "composite": False})
    mask = raw.composite_masks[0]
    want = np.asarray(Image.composite(raw.images[0], _init(), mask))
    np.testing.assert_array_equal(got, want)
    laid = np.asarray(_python_api(soft_inpainting=settings).images[0]).astype(int)  # the pipeline's own composite
    assert np.abs(laid - want.astype(int)).max() <= 1  # float against PIL's 8-bit composite
    m = np.asarray(mask)
    assert (m == 0).any() and (m == 255).any()
    assert np.array_equal(got[m == 0], np.asarray(_init())[m == 0])  # the init image's pixels where m is 0
    text = r.info["infotexts"][0]
    assert (
        "Soft inpainting enabled: True, Soft inpainting schedule bias: 1.5, Soft inpainting preservation strength: "
        "0.75, Soft inpainting transition contrast boost: 3, Soft inpainting mask influence: 0.25, Soft inpainting "
        "difference threshold: 0.75, Soft inpainting difference contrast: 3" in text
    ), text
    assert r.info["ignored"] == []
    # A1111's hard inpainting (the latent mask rounded, the blurred mask's doubled overlay) is another image
    hard = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1, **KW)
    assert (np.asarray(hard.image.convert("RGB")) != got).any(axis=-1).mean() > 0.2
    # disabled (the later arguments anything): exactly the plain inpainting, nothing listed as ignored
    off = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1,
                      alwayson_scripts={"soft inpainting": {"args": [False, 99]}}, **KW)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(off.image.convert("RGB")), np.asarray(hard.image.convert("RGB")))
    assert off.info["ignored"] == [] and "Soft inpainting" not in off.info["infotexts"][0]
    # mask_round false: what the script sets in A1111 too (the same image); without the script plain inpainting
    # with a grey latent mask (tests/test_a1111_mask_round.py), another image
    body = {**KW, "init_images": [_b64(_init())], "mask": _b64(_mask()), "inpainting_fill": 1, "mask_round": False,
            "sampler_name": "Euler"}  # fmt: skip
    with httpx.Client(base_url=server.url, timeout=300) as c:
        r2 = c.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": scripts})
        assert r2.status_code == 200, r2.text
        np.testing.assert_array_equal(_decode(r2.json()["images"][0]), got)
        r2 = c.post("/sdapi/v1/img2img", json=body)
        assert r2.status_code == 200, r2.text
        assert (_decode(r2.json()["images"][0]) != got).any(axis=-1).mean() > 0.2


def test_ddim_runs_it_as_the_python_api(server) -> None:
    """A1111's DDIM (a timestep sampler: the blend before each model call, at the call's timestep) with the script:
    the Python API's soft inpainting with sampler "ddim" laid over the init image, bit for bit (it was a 400);
    not the plain inpainting, not Euler's soft inpainting."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM")
    scripts = {SCRIPT: {"args": [True, *SETTINGS]}}
    kw = {**KW, "steps": 4}
    r = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1, alwayson_scripts=scripts, **kw)
    got = np.asarray(r.image.convert("RGB"))
    settings = dict(zip(("schedule_bias", "preservation_strength", "transition_contrast_boost", "mask_influence",
                         "difference_threshold", "difference_contrast"), SETTINGS, strict=True))  # fmt: skip
    # webuiapi sends eta 1 (the route's "Eta DDIM: 1")
    raw = _python_api(soft_inpainting={**settings, "composite": False}, sampler="ddim", schedule="normal",
                      sampler_options={"eta": 1.0},
                      steps=4)  # fmt: skip
    want = np.asarray(Image.composite(raw.images[0], _init(), raw.composite_masks[0]))
    np.testing.assert_array_equal(got, want)
    assert (
        "Sampler: DDIM" in r.info["infotexts"][0]
        and "Eta DDIM: 1" in r.info["infotexts"][0]
        and "Soft inpainting enabled: True" in r.info["infotexts"][0]
    )
    assert r.info["ignored"] == []
    hard = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1, **kw)
    assert (np.asarray(hard.image.convert("RGB")) != got).any(axis=-1).mean() > 0.2
    euler = _python_api(soft_inpainting={**settings, "composite": False}, steps=4)
    assert not np.array_equal(np.asarray(euler.images[0]), np.asarray(raw.images[0]))


def test_short_args_keep_the_defaults_and_the_infotext_reads_back(server, client) -> None:
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    r = api.img2img(images=[_init()], mask_image=_mask(), inpainting_fill=1,
                    alwayson_scripts={"SOFT INPAINTING": {"args": [True]}}, **KW)  # fmt: skip
    raw = _python_api(soft_inpainting={"composite": False})
    want = np.asarray(Image.composite(raw.images[0], _init(), raw.composite_masks[0]))
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    text = r.info["infotexts"][0]
    assert "Soft inpainting schedule bias: 1, Soft inpainting preservation strength: 0.5" in text
    # the image's infotext as a request's: the same image, without the script sent
    body = {"init_images": [_b64(_init())], "mask": _b64(_mask()), "inpainting_fill": 1, "infotext": text}
    again = client.post("/sdapi/v1/img2img", json=body)
    assert again.status_code == 200, again.text
    np.testing.assert_array_equal(_decode(again.json()["images"][0]), want)
    assert json.loads(again.json()["info"])["infotexts"][0] == text


def test_bad_arguments_are_one_line_400s_and_queue_nothing(client) -> None:
    body = {**KW, "init_images": [_b64(_init())], "mask": _b64(_mask()), "sampler_name": "Euler"}
    jobs = len(client.get("/v1/jobs").json()["jobs"])
    for entry, said in (
        ({"args": [True, 9.0]}, "alwayson_scripts.soft inpainting.args[1] (schedule bias) must be a number in [0, 8]"),
        ({"args": [True, 1, 0.5, 0.5]}, "args[3] (transition contrast boost) must be a number in [1, 32], got 0.5"),
        ({"args": [True, 1, 0.5, 4, 1.5]}, "args[4] (mask influence) must be a number in [0, 1], got 1.5"),
        ({"args": [True, 1, 0.5, 4, 0, "0.5"]}, "args[5] (difference threshold) must be a number in [0, 8], got '0.5'"),
        ({"args": [True, 1, 0.5, 4, 0, 0.5, -1]}, "args[6] (difference contrast) must be a number in [0, 8], got -1"),
        ({"args": ["yes"]}, "args[0] (enabled) must be true or false, got 'yes'"),
        ({"args": [True, 1, 0.5, 4, 0, 0.5, 2, 7]}, "must be an object {args: [enabled, schedule_bias"),
        ([True], "must be an object {args: [enabled, schedule_bias"),
    ):
        r = client.post("/sdapi/v1/img2img", json={**body, "alwayson_scripts": {"Soft Inpainting": entry}})
        assert r.status_code == 400 and said in r.json()["detail"], (entry, r.text)
        assert "\n" not in r.json()["detail"]
    on = {"soft inpainting": {"args": [True]}}
    r = client.post("/sdapi/v1/img2img", json={**body, "mask": None, "alwayson_scripts": on})
    assert r.status_code == 400 and "soft inpainting needs a mask" in r.json()["detail"], r.text
    r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "alwayson_scripts": on})
    assert r.status_code == 400 and "an img2img inpainting script (txt2img has none)" in r.json()["detail"], r.text
    assert len(client.get("/v1/jobs").json()["jobs"]) == jobs
    assert "soft inpainting" in client.get("/sdapi/v1/scripts").json()["img2img"]  # A1111 lists it for img2img
    assert "soft inpainting" not in client.get("/sdapi/v1/scripts").json()["txt2img"]


def test_only_masked_lays_the_box_back_over_the_init_image(server) -> None:
    """ "Only masked" (A1111's inpaint_full_res, webuiapi's default): the box around the mask is generated at the
    output's size and laid back by the composite mask fitted into the box; outside the box the init image stays."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    mask = np.zeros((64, 64), np.uint8)
    mask[36:56, 30:50] = np.linspace(128, 255, 20, dtype=np.uint8)[None, :]
    kw = {**KW, "inpaint_full_res": True, "mask_blur": 2}
    scripts = {SCRIPT: {"args": [True]}}
    soft = api.img2img(images=[_init()], mask_image=Image.fromarray(mask, "L"), inpainting_fill=1,
                       alwayson_scripts=scripts, **kw)  # fmt: skip
    hard = api.img2img(images=[_init()], mask_image=Image.fromarray(mask, "L"), inpainting_fill=1, **kw)
    got, init = np.asarray(soft.image.convert("RGB")), np.asarray(_init())
    assert soft.image.size == (64, 64)
    box = np.zeros((64, 64), bool)
    box[28:64, 22:58] = True  # the blurred mask's box with room to spare
    assert np.array_equal(got[~box], init[~box])
    assert (got[box] != init[box]).any() and (got != np.asarray(hard.image.convert("RGB"))).any()


def test_a_native_job_runs_it_as_the_python_api(client) -> None:
    """POST /v1/jobs with ``soft_inpainting``: the Python API's image (laid over the init image by the pipeline),
    the infotext's keys; without a mask, or with a setting out of range, a one-line 400 and no job."""
    ids = [client.post("/v1/uploads", content=base64.b64decode(_b64(im)), headers={"content-type": "image/png"})
           .json()["id"] for im in (_init(), _mask())]  # fmt: skip
    body = {"prompt": "a red apple", "steps": 3, "width": 64, "height": 64, "seed": 7, "strength": 0.8,
            "init_image": ids[0], "mask": ids[1], "soft_inpainting": {"mask_influence": 0.5}}  # fmt: skip
    got, job = run_job(client, body)
    assert "Soft inpainting mask influence: 0.5" in job["infotexts"][0], job
    ref = shared_loader("emoji", "cpu")(progress=False, **{**body, "init_image": _init(), "mask": _mask()})
    np.testing.assert_array_equal(got, np.asarray(ref.images[0]))
    jobs = len(client.get("/v1/jobs").json()["jobs"])
    bad_bodies = (
        ({"mask": None}, "soft_inpainting needs a mask"),
        ({"soft_inpainting": {"schedule_bias": 10}}, "schedule_bias must be a number in [0, 8]"),
    )
    for bad, said in bad_bodies:
        r = client.post("/v1/jobs", json={**body, **bad})
        assert r.status_code == 400 and said in r.text and "\\n" not in r.text, r.text
    assert len(client.get("/v1/jobs").json()["jobs"]) == jobs
