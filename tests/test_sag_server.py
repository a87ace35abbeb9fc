"""Self-attention guidance's rule on the server and Forge's SAG script: the native job's and OpenAI's ``sag_rule``,
Forge's "SelfAttentionGuidance Integrated" script in A1111's ``alwayson_scripts`` (the real ``webuiapi`` client;
ComfyUI's rule, which Forge's script is) and the SAG keys of an A1111 request's ``infotext``, and bad values answered
in each API's shape. The images equal the Python API's (``pipe(sag_scale=..., sag_rule=...)``) on the emoji model
at 64x64; cfg 1 is where the two rules give other images there (the conditional rows' map and x0, or the
unconditional ones): at another scale, with no guidance rescale, they agree on an epsilon model."""

from __future__ import annotations

import base64
import io
import json
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from _live_server import live_server, server_config, shared_loader, wait_job

GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
BODY = {"prompt": "a red apple", **GEN}
A1111_BODY = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
A1111_BODY |= {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}
EARLY, LATER = "SelfAttentionGuidance Integrated", "SelfAttentionGuidance Integrated (SD 1.x, SD 2.x, SDXL)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("sag_server"))) as s:
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


def test_a_native_jobs_sag_rule_gives_the_python_apis_image(client) -> None:
    comfy = dict(sag_scale=1.5, sag_blur_sigma=2.0, cfg_scale=1.0)
    want, text = python_api(**comfy, sag_rule="comfyui")
    assert not np.array_equal(want, python_api(**comfy)[0])  # the rule changes this image
    r = client.post("/v1/jobs", json={**BODY, **comfy, "sag_rule": "comfyui"})
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json()["id"], timeout=300)
    assert j["state"] == "done", j
    png = Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content))
    np.testing.assert_array_equal(np.asarray(png.convert("RGB")), want)
    assert j["infotexts"][0] == text and "SAG rule: comfyui" in text
    r = client.post("/v1/jobs", json={**BODY, "sag_scale": 1.0, "sag_rule": "forge"})
    assert r.status_code == 422 and {e["loc"][1] for e in r.json()["detail"]} == {"sag_rule"}, r.text


def test_openai_images_take_the_sag_rule_in_extra_body(server) -> None:
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "sag_scale": 2.0, "cfg_scale": 1.0}
    r = api.images.generate(
        model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, "sag_rule": "comfyui"}
    )
    want = python_api(sag_scale=2.0, cfg_scale=1.0, sag_rule="comfyui")[0]
    np.testing.assert_array_equal(decode(r.data[0].b64_json), want)
    assert not np.array_equal(want, python_api(sag_scale=2.0, cfg_scale=1.0)[0])  # cfg 1: which rows differ
    with pytest.raises(openai.BadRequestError) as e:
        api.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, "sag_rule": "x"})
    body = e.value.body
    assert body["param"] == "sag_rule" and "unknown sag_rule 'x'; use one of: diffusers, comfyui" in body["message"]


def test_forges_sag_script_in_a1111s_alwayson_scripts(server) -> None:
    """Forge's SAG script through the real ``webuiapi`` client: early Forge's [enabled, scale, blur_sigma] and later
    Forge's [..., threshold 1] give the Python API's image under ComfyUI's rule; a shorter list keeps Forge's defaults
    (scale 0.5, blur sigma 2); disabled it is the plain image; the entry is not listed as ignored."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    kw: dict[str, Any] = dict(prompt="a red apple", seed=3, steps=3, width=64, height=64, cfg_scale=7.0)
    want, text = python_api(sag_scale=1.5, sag_blur_sigma=3.0, sag_rule="comfyui", cfg_scale=7.0)
    r = api.txt2img(**kw, alwayson_scripts={EARLY: {"args": [True, 1.5, 3.0]}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert r.info["infotexts"][0] == text and "SAG rule: comfyui" in text and r.info["ignored"] == []
    r = api.txt2img(**kw, alwayson_scripts={LATER: {"args": [True, 1.5, 3.0, 1.0]}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    r = api.txt2img(**kw, alwayson_scripts={EARLY.lower(): {"args": [True]}})  # Forge's defaults
    defaults = python_api(sag_scale=0.5, sag_blur_sigma=2.0, sag_rule="comfyui", cfg_scale=7.0)[0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), defaults)
    plain = python_api(cfg_scale=7.0)[0]
    assert not np.array_equal(defaults, plain)
    r = api.txt2img(**kw, alwayson_scripts={EARLY: {"args": [False, 1.5, 3.0]}, "Other": {"args": []}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), plain)
    assert r.info["ignored"] == ["alwayson_scripts.other"] and "SAG" not in r.info["infotexts"][0]
    # cfg 1: later Forge skips SAG there (the plain image); early Forge runs it on the unconditional rows
    kw1 = {**kw, "cfg_scale": 1.0}
    r = api.txt2img(**kw1, alwayson_scripts={LATER: {"args": [True, 1.5, 3.0, 1.0]}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), python_api(cfg_scale=1.0)[0])
    r = api.txt2img(**kw1, alwayson_scripts={EARLY: {"args": [True, 1.5, 3.0]}})
    want1 = python_api(sag_scale=1.5, sag_blur_sigma=3.0, sag_rule="comfyui", cfg_scale=1.0)[0]
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want1)


def test_bad_forge_sag_script_arguments_are_one_line_400s(client) -> None:
    for name, entry, said in (
        (LATER, {"args": [True, 0.5, 2.0, 1.0, 5]}, "must be an object {args: [enabled, scale, blur_sigma]}"),
        (LATER, {"args": "on"}, "must be an object {args: [enabled, scale, blur_sigma]}"),
        (EARLY, [True, 0.5], "must be an object {args: [enabled, scale, blur_sigma]}"),
        (EARLY, {"args": [1, 0.5, 2.0]}, "args[0] (enabled) must be true or false, got 1"),
        (EARLY, {"args": [True, "0.5", 2.0]}, "args[1] (scale) must be a number, got '0.5'"),
        (EARLY, {"args": [True, 12, 2.0]}, "args[1] (scale) must be in [-10, 10], got 12"),
        (EARLY, {"args": [True, 0.5, 0]}, "args[2] (blur_sigma) must be in (0, 10], got 0"),
        (EARLY, {"args": [True, 0.5, None]}, "args[2] (blur_sigma) must be a number, got None"),
        (LATER, {"args": [True, 0.5, 2.0, 1.5]}, "args[3] (threshold): sdengine's SAG mask threshold is 1"),
    ):
        r = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "alwayson_scripts": {name: entry}})
        assert r.status_code == 400 and said in r.json()["detail"], (entry, r.text)
        assert "\n" not in r.json()["detail"] and name.lower() in r.json()["detail"]
    hires = {**A1111_BODY, "enable_hr": True, "hr_scale": 1.5, "alwayson_scripts": {LATER: {"args": [True]}}}
    r = client.post("/sdapi/v1/txt2img", json=hires)
    assert r.status_code == 400 and "skips the hires fix's second pass" in r.json()["detail"], r.text


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_an_a1111_infotext_with_sag_keys_sets_the_script(client) -> None:
    """Forge's SAG keys in a request's ``infotext`` (sag_enabled, sag_scale, sag_blur_sigma, sag_threshold) set the
    script's arguments under what ``alwayson_scripts`` sends; sdengine's own keys (with their rule) make the image
    again."""
    want, _ = python_api(sag_scale=1.5, sag_blur_sigma=3.0, sag_rule="comfyui", cfg_scale=7.0)

    def txt2img(**extra: Any) -> httpx.Response:
        return client.post("/sdapi/v1/txt2img", json={**A1111_BODY, **extra})

    def image(r: httpx.Response) -> np.ndarray:
        assert r.status_code == 200, r.text
        return decode(r.json()["images"][0])

    forge = (
        "a red apple\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 64x64, "
        "RNG: CPU, sag_enabled: True, sag_scale: 1.5, sag_blur_sigma: 3.0, sag_threshold: 1.0"
    )
    np.testing.assert_array_equal(image(txt2img(infotext=forge)), want)
    off = {LATER: {"args": [False]}}
    np.testing.assert_array_equal(image(txt2img(infotext=forge, alwayson_scripts=off)), python_api(cfg_scale=7.0)[0])
    scale = {EARLY: {"args": [True, 0.5]}}  # the blur sigma still the infotext's
    np.testing.assert_array_equal(
        image(txt2img(infotext=forge, alwayson_scripts=scale)),
        python_api(sag_scale=0.5, sag_blur_sigma=3.0, sag_rule="comfyui", cfg_scale=7.0)[0],
    )
    # sdengine's own parameters under diffusers' rule (no "SAG rule" written): the same image again
    own, text = python_api(sag_scale=1.5, sag_blur_sigma=3.0, cfg_scale=7.0)
    assert "SAG rule" not in text
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text})
    np.testing.assert_array_equal(image(r), own)
    assert json.loads(r.json()["info"])["infotexts"][0] == text
    hires = {"enable_hr": True, "hr_scale": 1.5}  # later Forge's keys (its threshold): its script skipped that pass
    r = txt2img(infotext=forge, **hires)
    assert r.status_code == 400 and "infotext: Forge's later SAG script skips the hires fix's second pass" in r.text
    assert txt2img(infotext=forge, **hires, alwayson_scripts={EARLY: {"args": [True]}}).status_code == 200
    r = txt2img(infotext=forge.replace("sag_threshold: 1.0", "sag_threshold: 2"))
    assert r.status_code == 400 and "infotext: sag_threshold: sdengine's SAG mask threshold is 1" in r.text, r.text


def test_the_request_builder_refuses_a_bad_sag_rule_in_one_line() -> None:
    from sdengine.server.a1111 import forge_sag
    from sdengine.server.errors import BadRequest

    assert forge_sag({}, 7.0, False) == {}  # no script, no infotext: off
    got = forge_sag({LATER.lower(): {"args": [True, -1.0, 0.5, 1]}}, 7, False)
    assert got == {"sag_scale": -1.0, "sag_blur_sigma": 0.5, "sag_rule": "comfyui"}
    with pytest.raises(BadRequest) as e:
        forge_sag({EARLY.lower(): {"args": [True, True, 2.0]}}, 7.0, False)
    assert "args[1] (scale) must be a number, got True" in str(e.value) and "\n" not in str(e.value)


def test_jobs_of_other_sag_rules_never_share_a_batch() -> None:
    """The rule is one per pipeline call: jobs batch only with equal SAG settings (scale, blur sigma and rule)."""
    from sdengine.server.jobs import Job, batch_key
    from sdengine.server.requests import Generation

    def key(**sag: Any) -> Any:
        kw = {"prompt": "a", "negative_prompt": "", "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras"}
        kw |= {"cfg_scale": 5.0, "seed": 1, "width": 64, "height": 64, "batch_size": 1, **sag}
        return batch_key(Job(Generation(model="emoji", model_name="emoji", kwargs=kw, n_iter=1)))

    comfy = key(sag_scale=0.5, sag_blur_sigma=2.0, sag_rule="comfyui")
    assert comfy is not None and comfy == key(sag_scale=0.5, sag_blur_sigma=2.0, sag_rule="comfyui")
    assert comfy != key(sag_scale=0.5, sag_blur_sigma=2.0) and comfy != key()


def test_an_image_too_small_for_the_blur_is_a_400_before_it_is_queued(client) -> None:
    """Diffusers' rule needs a latent of at least 5 x 5 for SAG's 9 x 9 blur: once a worker holds the model, a job
    below that is a 400 up front with the pipeline's own line (it once failed only when it ran); ComfyUI's rule skips
    SAG there, so that job is taken."""
    r = client.post("/v1/jobs", json=BODY)  # the worker loads the model (its latent factor)
    assert r.status_code == 202 and wait_job(client, r.json()["id"], timeout=300)["state"] == "done"
    queued = client.get("/healthz").json()["queued"]
    small = {**BODY, "width": 16, "height": 16, "sag_scale": 1.0}  # emoji: 4 image pixels a latent pixel -> 4 x 4
    r = client.post("/v1/jobs", json=small)
    assert r.status_code == 400, r.text
    assert r.json()["detail"].startswith("self-attention guidance blurs the latent with a 9 x 9 kernel and needs at")
    assert "got 16 x 16" in r.json()["detail"] and client.get("/healthz").json()["queued"] == queued
    r = client.post("/v1/jobs", json={**small, "sag_rule": "comfyui"})
    assert r.status_code == 202 and wait_job(client, r.json()["id"], timeout=300)["state"] == "done"
