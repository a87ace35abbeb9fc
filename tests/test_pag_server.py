"""Perturbed-attention guidance on the server: the native job's ``pag_scale`` / ``pag_layers``, OpenAI's extension
(the real ``openai`` client's ``extra_body``), Forge's PAG script in A1111's ``alwayson_scripts``, the batching of
PAG jobs, and bad values answered in each API's shape. The images equal the Python API's (``pipe(pag_scale=...)``)
on the emoji model at 64x64."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from _live_server import (
    Recorder,
    jobs_queued_behind_a_held_one,
    live_server,
    run_job,
    server_config,
    shared_loader,
)

GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
BODY = {"prompt": "a red apple", **GEN}
ROW_TOL = 1e-4  # a batched row against the same job alone (float32 summation order; tests/test_server_batching.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("pag_server"))) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def python_api(**kw: Any) -> tuple[np.ndarray, str]:
    r = shared_loader("emoji", "cpu")("a red apple", progress=False, **{**GEN, **kw})
    return np.asarray(r.images[0].convert("RGB")), r.infotexts[0]


def test_a_native_jobs_pag_gives_the_python_apis_image(client) -> None:
    """POST /v1/jobs with ``pag_scale`` is the Python API's image with that scale (and layers), named in the
    infotext; it differs from the job without PAG, and a scale of 0 is the plain image."""
    plain, _ = python_api()
    want, text = python_api(pag_scale=3.0)
    assert not np.array_equal(plain, want)
    got, job = run_job(client, {**BODY, "pag_scale": 3.0})
    np.testing.assert_array_equal(got, want)
    assert job["infotexts"][0] == text and "PAG scale: 3," in text and "PAG layers" not in text
    got, job = run_job(client, {**BODY, "pag_scale": 0, "pag_layers": "up"})  # off: the layers do nothing
    np.testing.assert_array_equal(got, plain)
    assert "PAG" not in job["infotexts"][0]
    want, text = python_api(pag_scale=2.0, pag_layers="mid,up")
    got, job = run_job(client, {**BODY, "pag_scale": 2.0, "pag_layers": ["mid", "up"]})
    np.testing.assert_array_equal(got, want)
    assert job["infotexts"][0] == text and 'PAG scale: 2, PAG layers: "mid,up",' in text


def test_openai_images_take_pag_in_extra_body(server) -> None:
    """OpenAI's generations route takes ``pag_scale`` / ``pag_layers`` as sdengine extensions (extra_body): the
    Python API's image; bad values are OpenAI's 400 with ``param`` the field."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "pag_scale": 3.0}
    r = client.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body=extra)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    np.testing.assert_array_equal(got, python_api(pag_scale=3.0)[0])
    for field, value, said in (
        ("pag_scale", 101, "pag_scale must be in [0, 100], got 101"),
        ("pag_scale", -1, "pag_scale must be in [0, 100], got -1"),
        ("pag_layers", "mid,(", "pag_layers: '(' is not a regular expression"),
        ("pag_layers", "nope", "PAG layer 'nope' matches no self-attention layer"),  # the model is loaded by now
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(
                model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, field: value}
            )
        assert e.value.body["param"] == field and said in e.value.body["message"], e.value.body


def test_bad_native_pag_values_are_one_line_4xx(client) -> None:
    run_job(client, {**BODY, "steps": 1})  # the model loaded: layers that match none are a 400 up front
    cases_400 = {
        "": "pag_layers holds an empty layer name",
        "mid,,up": "pag_layers holds an empty layer name",
        "up_blocks.[": "pag_layers: 'up_blocks.[' is not a regular expression",
        ",".join(["mid"] * 33): "pag_layers holds 33 patterns, over the limit of 32",
        "nope": "pag_layers: PAG layer 'nope' matches no self-attention layer of the U-Net",
    }
    for layers, said in cases_400.items():
        r = client.post("/v1/jobs", json={**BODY, "pag_scale": 3.0, "pag_layers": layers})
        assert r.status_code == 400 and said in r.json()["detail"], (layers, r.text)
        assert "\n" not in r.json()["detail"]
    for bad in ({"pag_scale": -0.5}, {"pag_scale": 100.5}, {"pag_scale": "x"}, {"pag_layers": 3}):
        r = client.post("/v1/jobs", json={**BODY, **bad})
        assert r.status_code == 422 and ("pag_scale" in r.text or "pag_layers" in r.text), (bad, r.text)
    assert client.get("/v1/jobs").json()["queued"] == 0


def test_forges_pag_script_in_a1111s_alwayson_scripts(client) -> None:
    """Forge's built-in "PerturbedAttentionGuidance Integrated" script ({args: [enabled, scale]}) on A1111's
    txt2img: the Python API's pag_scale image (PAG on the middle block); disabled it is the plain image; another
    shape is a one-line 400; other scripts stay listed as ignored."""
    body = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
    body |= {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}

    def txt2img(scripts: dict) -> tuple[np.ndarray, dict]:
        r = client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts})
        assert r.status_code == 200, r.text
        image = Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))
        return np.asarray(image.convert("RGB")), json.loads(r.json()["info"])

    got, info = txt2img({"PerturbedAttentionGuidance Integrated": {"args": [True, 3.0]}})
    want, text = python_api(pag_scale=3.0, cfg_scale=7.0)
    np.testing.assert_array_equal(got, want)
    assert info["infotexts"][0] == text and info["ignored"] == []
    # later Forge's five arguments: at attenuation 0 over every step the same image
    np.testing.assert_array_equal(
        txt2img({"perturbedattentionguidance integrated": {"args": [True, 3, 0, 0, 1]}})[0], want
    )
    got, info = txt2img({"PerturbedAttentionGuidance Integrated": {"args": [False, 3.0]}, "Other": {"args": []}})
    np.testing.assert_array_equal(got, python_api(cfg_scale=7.0)[0])
    assert info["ignored"] == ["alwayson_scripts.other"]
    for args, said in (
        ([True], "must be an object {args: [enabled, scale]}"),
        ([True, 3.0, 50.0, 0.0, 1.0], "attenuation 50, start_step 0, end_step 1 are not supported"),
        ([True, 3.0, 0.0, 0.15, 1.0], "start_step 0.15"),
        ([1, 3.0], "args[0] (enabled) must be true or false, got 1"),
        ([True, "3"], "args[1] (scale) must be a number, got '3'"),
        ([True, 500.0], "args[1] (scale) must be in [0, 100], got 500.0"),
    ):
        r = client.post(
            "/sdapi/v1/txt2img",
            json={**body, "alwayson_scripts": {"PerturbedAttentionGuidance Integrated": {"args": args}}},
        )
        assert r.status_code == 400 and said in r.text and "\n" not in r.json()["detail"], (args, r.text)


@pytest.mark.slow  # ~11 s: five jobs behind a held one, on a server of its own
def test_jobs_of_other_pag_settings_never_share_a_batch(tmp_path) -> None:
    """Queued jobs batch only with equal PAG settings (the layers compare equal as a string or a list); a batched
    PAG row is the same job alone."""
    rec = Recorder()
    jobs = [
        {**BODY, "prompt": "a red apple", "pag_scale": 3.0},
        {**BODY, "prompt": "a blue car"},  # no PAG
        {**BODY, "prompt": "a green tree", "seed": 8, "pag_scale": 3.0, "pag_layers": ["mid"]},  # batches with 0
        {**BODY, "prompt": "a yellow star", "pag_scale": 2.0},
        {**BODY, "prompt": "a cat", "pag_scale": 3.0, "pag_layers": "mid,up"},
    ]
    done = jobs_queued_behind_a_held_one(tmp_path, rec, {**BODY, "steps": 1}, jobs)
    assert [d["state"] for d in done] == ["done"] * 5, done
    calls = [(k["prompt"], k.get("pag_scale"), tuple(k.get("pag_layers") or ())) for k in rec.calls[1:]]
    assert calls == [
        (["a red apple", "a green tree"], 3.0, ("mid",)),
        ("a blue car", None, ()),
        ("a yellow star", 2.0, ("mid",)),
        ("a cat", 3.0, ("mid", "up")),
    ], calls
    alone = rec.pipe("a green tree", progress=False, **{**GEN, "seed": 8}, pag_scale=3.0)
    assert float(np.abs(rec.results[1].arrays[1] - alone.arrays[0]).max()) <= ROW_TOL
    assert done[2]["infotexts"] == alone.infotexts
