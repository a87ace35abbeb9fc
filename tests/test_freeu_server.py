"""FreeU on the server: the native job's ``freeu`` / ``freeu_version`` / ``freeu_rule``, OpenAI's extension (the real
``openai`` client's ``extra_body``, and the edits form), Forge's FreeU script in A1111's ``alwayson_scripts`` (the
real ``webuiapi`` client) and the FreeU keys of an A1111 request's ``infotext``, the batching of FreeU jobs, and bad
values answered in each API's shape. The images equal the Python API's (``pipe(freeu=...)``) on the emoji model at
64x64."""

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

from _live_server import (
    Recorder,
    jobs_queued_behind_a_held_one,
    live_server,
    run_job,
    server_config,
    shared_loader,
    wait_job,
)

GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
BODY = {"prompt": "a red apple", **GEN}
SDXL_ROW = (1.3, 1.4, 0.9, 0.2)  # the authors' SDXL values (ComfyUI's FreeU_V2 defaults)
SD1_ROW = (1.5, 1.6, 0.9, 0.2)
ROW_TOL = 1e-4  # a batched row against the same job alone (float32 summation order; tests/test_server_batching.py)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("freeu_server"))) as s:
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


def test_a_native_jobs_freeu_gives_the_python_apis_image(client) -> None:
    """POST /v1/jobs with ``freeu`` is the Python API's image with those settings (version 2 and the width rule by
    default; version 1 and diffusers' rule when sent), the infotext the same; it differs from the plain image, and
    ``freeu`` null is the plain image whatever the version and rule say."""
    plain, _ = python_api()
    want, text = python_api(freeu=SDXL_ROW)
    assert not np.array_equal(plain, want)
    got, job = run_job(client, {**BODY, "freeu": list(SDXL_ROW)})
    np.testing.assert_array_equal(got, want)
    assert job["infotexts"][0] == text and 'FreeU: "1.3,1.4,0.9,0.2",' in text and "FreeU version" not in text
    want1, text1 = python_api(freeu=SD1_ROW, freeu_version=1, freeu_rule="diffusers")
    assert not np.array_equal(want1, want) and not np.array_equal(want1, plain)
    got, job = run_job(client, {**BODY, "freeu": list(SD1_ROW), "freeu_version": 1, "freeu_rule": "diffusers"})
    np.testing.assert_array_equal(got, want1)
    assert job["infotexts"][0] == text1 and 'FreeU: "1.5,1.6,0.9,0.2", FreeU version: 1, FreeU rule: diffusers' in text1
    got, job = run_job(client, {**BODY, "freeu": None, "freeu_version": 1, "freeu_rule": "diffusers"})  # off
    np.testing.assert_array_equal(got, plain)
    assert "FreeU" not in job["infotexts"][0]


def test_bad_native_freeu_values_are_422_naming_the_field(client) -> None:
    for bad, field in (
        ({"freeu": [1.3, 1.4, 0.9]}, "freeu"),
        ({"freeu": [1.3, 1.4, 0.9, 0.2, 1.0]}, "freeu"),
        ({"freeu": [11, 1, 1, 1]}, "freeu"),
        ({"freeu": [1, -0.5, 1, 1]}, "freeu"),
        ({"freeu": [1, 1, "x", 1]}, "freeu"),
        ({"freeu": [True, 1, 1, 1]}, "freeu"),
        ({"freeu": "1.3,1.4,0.9,0.2"}, "freeu"),
        ({"freeu": list(SDXL_ROW), "freeu_version": 3}, "freeu_version"),
        ({"freeu": list(SDXL_ROW), "freeu_version": True}, "freeu_version"),
        ({"freeu": list(SDXL_ROW), "freeu_rule": "middle"}, "freeu_rule"),
    ):
        r = client.post("/v1/jobs", json={**BODY, **bad})
        assert r.status_code == 422, (bad, r.text)
        assert {e["loc"][1] for e in r.json()["detail"]} == {field}, (bad, r.text)
    assert client.get("/v1/jobs").json()["queued"] == 0


def test_the_request_builder_refuses_bad_freeu_in_one_line() -> None:
    """What the routes hand the builder (A1111's, OpenAI's, the native one's) is checked there too: one line each."""
    from sdengine.server.errors import BadRequest
    from sdengine.server.requests import check_freeu

    assert check_freeu(None, 7, "nope") is None  # off: version and rule not read
    assert check_freeu([1, 1.5, 0, 10], 2.0, "diffusers") == ((1.0, 1.5, 0.0, 10.0), 2, "diffusers")
    for args, said in (
        (([1, 2, 3],), "freeu must be four numbers [b1, b2, s1, s2]"),
        (("1,2,3,4",), "freeu must be four numbers [b1, b2, s1, s2]"),
        (([1, 2, 3, 10.5],), "freeu s2 must be in [0, 10], got 10.5"),
        (([1, float("nan"), 3, 4],), "freeu b2 must be a number, got nan"),
        (([True, 1, 1, 1],), "freeu b1 must be a number, got True"),
        (([1, 1, 1, 1], True), "freeu_version must be 1 or 2, got True"),
        (([1, 1, 1, 1], 3), "freeu_version must be 1 or 2, got 3"),
        (([1, 1, 1, 1], 2, "Width"), "unknown freeu_rule 'Width'; use one of: width, diffusers"),
    ):
        with pytest.raises(BadRequest) as e:
            check_freeu(*args)
        assert said in str(e.value) and "\n" not in str(e.value), (args, str(e.value))


def test_openai_images_take_freeu_in_extra_body(server) -> None:
    """OpenAI's generations take ``freeu`` (a list, or "b1,b2,s1,s2"), ``freeu_version``, ``freeu_rule`` as sdengine
    extensions (extra_body): the Python API's image; the edits form takes them as strings; bad values are OpenAI's 400
    with ``param`` the field."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "freeu": list(SDXL_ROW)}
    r = client.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body=extra)
    np.testing.assert_array_equal(decode(r.data[0].b64_json), python_api(freeu=SDXL_ROW)[0])
    extra1 = {**extra, "freeu": "1.5,1.6,0.9,0.2", "freeu_version": 1, "freeu_rule": "diffusers"}
    r = client.images.generate(model="emoji", prompt="a red apple", size="64x64", extra_body=extra1)
    want1 = python_api(freeu=SD1_ROW, freeu_version=1, freeu_rule="diffusers")[0]
    np.testing.assert_array_equal(decode(r.data[0].b64_json), want1)
    for field, value, said in (
        ("freeu", [1.3, 1.4, 0.9], "freeu must be four numbers"),
        ("freeu", [1.3, 1.4, 0.9, 20], "freeu s2 must be in [0, 10], got 20"),
        ("freeu", [True, 1.4, 0.9, 0.2], "freeu b1 must be a number, got True"),
        ("freeu", {"b1": 1.3}, "freeu must be four numbers"),
        ("freeu", "1.3,1.4,x,0.2", "freeu must be four numbers b1,b2,s1,s2"),
        ("freeu_version", 3, "freeu_version must be 1 or 2, got 3"),
        ("freeu_version", True, "freeu_version must be 1 or 2, got True"),
        ("freeu_rule", "middle", "unknown freeu_rule 'middle'"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(
                model="emoji", prompt="a red apple", size="64x64", extra_body={**extra, field: value}
            )
        assert e.value.body["param"] == field and said in e.value.body["message"], e.value.body
        assert "\n" not in e.value.body["message"]
    # the edits form: freeu one comma-separated string, the version a number in text
    init = Image.new("RGB", (64, 64), (250, 200, 40))
    buf = io.BytesIO()
    init.save(buf, format="PNG")
    form = {"prompt": "a red apple", "model": "emoji", "size": "64x64", "seed": "3", "steps": "3"}
    form |= {"sampler": "dpmpp_2m", "schedule": "karras", "strength": "0.6"}
    files = {"image": ("i.png", buf.getvalue(), "image/png")}

    def edit(**fields: str) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/images/edits", data={**form, **fields}, files=files, timeout=300)

    r = edit(freeu="1.5, 1.6, 0.9, 0.2", freeu_version="1")
    assert r.status_code == 200, r.text
    want = python_api(init_image=init, strength=0.6, freeu=SD1_ROW, freeu_version=1)[0]
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    assert not np.array_equal(want, python_api(init_image=init, strength=0.6)[0])
    for fields, param in (
        ({"freeu": "1,2,3"}, "freeu"),
        ({"freeu": "1,2,3,4", "freeu_version": "two"}, "freeu_version"),
    ):
        r = edit(**fields)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (fields, r.text)


A1111_BODY = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
A1111_BODY |= {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}


def test_forges_freeu_script_in_a1111s_alwayson_scripts(server) -> None:
    """Forge's built-in FreeU script through the real ``webuiapi`` client: "FreeU Integrated" ({args: [enabled, b1,
    b2, s1, s2]}) and later Forge's "FreeU Integrated (SD 1.x, SD 2.x, SDXL)" (with start and end 0, 1) give the
    Python API's version-2 width-rule image; a shorter list keeps Forge's defaults (1.01, 1.02, 0.99, 0.95); disabled
    it is the plain image; other scripts stay listed as ignored."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    kw = dict(prompt="a red apple", seed=3, steps=3, width=64, height=64, cfg_scale=7.0)
    want, text = python_api(freeu=SDXL_ROW, cfg_scale=7.0)
    r = api.txt2img(**kw, alwayson_scripts={"FreeU Integrated": {"args": [True, *SDXL_ROW]}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert r.info["infotexts"][0] == text and r.info["ignored"] == []
    later = {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, *SDXL_ROW, 0.0, 1.0]}}
    np.testing.assert_array_equal(np.asarray(api.txt2img(**kw, alwayson_scripts=later).image.convert("RGB")), want)
    r = api.txt2img(**kw, alwayson_scripts={"freeu integrated": {"args": [True]}})  # Forge's defaults
    np.testing.assert_array_equal(
        np.asarray(r.image.convert("RGB")), python_api(freeu=(1.01, 1.02, 0.99, 0.95), cfg_scale=7.0)[0]
    )
    r = api.txt2img(**kw, alwayson_scripts={"FreeU Integrated": {"args": [False, *SDXL_ROW]}, "Other": {"args": []}})
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), python_api(cfg_scale=7.0)[0])
    assert r.info["ignored"] == ["alwayson_scripts.other"] and "FreeU" not in r.info["infotexts"][0]


def test_forges_freeu_script_on_a1111s_img2img(server) -> None:
    """img2img takes the script too: the Python API's img2img (A1111's strength rule) with that FreeU."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    x = np.linspace(0, 255, 64, dtype=np.uint8)
    init = Image.fromarray(
        np.stack([np.tile(x, (64, 1)), np.tile(x[:, None], (1, 64)), np.full((64, 64), 128, np.uint8)], -1)
    )
    kw = dict(prompt="a red apple", seed=3, steps=3, width=64, height=64, cfg_scale=7.0, denoising_strength=0.5)
    scripts = {"FreeU Integrated": {"args": [True, *SD1_ROW]}}
    got = np.asarray(api.img2img(images=[init], **kw, alwayson_scripts=scripts).image.convert("RGB"))
    same = dict(init_image=init, strength=0.5, strength_rule="a1111", cfg_scale=7.0)
    want = python_api(**same, freeu=SD1_ROW)[0]
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, python_api(**same)[0])


def test_bad_forge_freeu_script_arguments_are_one_line_400s(client) -> None:
    name = "FreeU Integrated (SD 1.x, SD 2.x, SDXL)"
    for entry, said in (
        ({"args": [True, 1, 1, 1, 1, 0, 1, 5]}, "must be an object {args: [enabled, b1, b2, s1, s2]}"),
        ({"args": "on"}, "must be an object {args: [enabled, b1, b2, s1, s2]}"),
        ([True, 1.3], "must be an object {args: [enabled, b1, b2, s1, s2]}"),
        ({"args": [1, *SDXL_ROW]}, "args[0] (enabled) must be true or false, got 1"),
        ({"args": [True, "1.3", 1.4, 0.9, 0.2]}, "args[1] (b1) must be a number, got '1.3'"),
        ({"args": [True, 1.3, 1.4, 0.9, 12]}, "args[4] (s2) must be in [0, 10], got 12"),
        ({"args": [True, *SDXL_ROW, 0.2, 1.0]}, "start_step 0.2, end_step 1 are not supported (use 0, 1)"),
        ({"args": [True, *SDXL_ROW, 0.0, 0.5]}, "start_step 0, end_step 0.5 are not supported"),
    ):
        r = client.post("/sdapi/v1/txt2img", json={**A1111_BODY, "alwayson_scripts": {name: entry}})
        assert r.status_code == 400 and said in r.json()["detail"], (entry, r.text)
        assert "\n" not in r.json()["detail"] and name.lower() in r.json()["detail"]


def test_an_a1111_infotext_with_freeu_keys_sets_the_script(client) -> None:
    """Later Forge reads its FreeU script's arguments from a request's ``infotext`` (freeu_enabled, freeu_b1 ...
    freeu_end), under what ``alwayson_scripts`` sends; sdengine's own "FreeU" key (with its version and rule) is read
    so too: an image's parameters make it again."""
    want, text = python_api(freeu=SDXL_ROW, cfg_scale=7.0)

    def txt2img(**extra: Any) -> httpx.Response:
        return client.post("/sdapi/v1/txt2img", json={**A1111_BODY, **extra})

    def image(r: httpx.Response) -> np.ndarray:
        assert r.status_code == 200, r.text
        return decode(r.json()["images"][0])

    forge = (
        "a red apple\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 64x64, "
        "RNG: CPU, freeu_enabled: True, freeu_b1: 1.3, freeu_b2: 1.4, freeu_s1: 0.9, freeu_s2: 0.2, freeu_start: 0.0, "
        "freeu_end: 1.0"
    )
    np.testing.assert_array_equal(image(txt2img(infotext=forge)), want)
    # the script's own arguments come first: off, or other factors (the later ones still the infotext's)
    off = {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [False]}}
    np.testing.assert_array_equal(image(txt2img(infotext=forge, alwayson_scripts=off)), python_api(cfg_scale=7.0)[0])
    b1 = {"FreeU Integrated (SD 1.x, SD 2.x, SDXL)": {"args": [True, 1.5]}}
    np.testing.assert_array_equal(
        image(txt2img(infotext=forge, alwayson_scripts=b1)), python_api(freeu=(1.5, 1.4, 0.9, 0.2), cfg_scale=7.0)[0]
    )
    # sdengine's own parameters, version 1 and diffusers' rule: the same image again
    want1, text1 = python_api(freeu=SD1_ROW, freeu_version=1, freeu_rule="diffusers", cfg_scale=7.0)
    r = client.post("/sdapi/v1/txt2img", json={"infotext": text1})  # every field the infotext's
    np.testing.assert_array_equal(image(r), want1)
    assert json.loads(r.json()["info"])["infotexts"][0] == text1
    r = txt2img(infotext=forge.replace("freeu_start: 0.0", "freeu_start: 0.3"))
    assert r.status_code == 400 and "infotext: sdengine runs FreeU over every step; start_step 0.3" in r.text
    r = txt2img(infotext=forge.replace("freeu_b2: 1.4", "freeu_b2: 14"))
    assert r.status_code == 400 and "infotext: freeu_b2 must be in [0, 10], got 14" in r.text, r.text


def test_jobs_of_other_freeu_settings_never_share_a_batch(tmp_path) -> None:
    """Queued jobs batch only with equal FreeU settings (factors, version and rule); a batched FreeU row is the same
    job alone."""
    rec = Recorder()
    jobs = [
        {**BODY, "prompt": "a red apple", "freeu": list(SDXL_ROW)},
        {**BODY, "prompt": "a blue car"},  # no FreeU
        {**BODY, "prompt": "a green tree", "seed": 8, "freeu": list(SDXL_ROW), "freeu_version": 2},  # with 0
        {**BODY, "prompt": "a yellow star", "freeu": list(SDXL_ROW), "freeu_version": 1},
        {**BODY, "prompt": "a cat", "freeu": list(SDXL_ROW), "freeu_rule": "diffusers"},
    ]
    done = jobs_queued_behind_a_held_one(tmp_path, rec, {**BODY, "steps": 1}, jobs)
    assert [d["state"] for d in done] == ["done"] * 5, done
    calls = [(k["prompt"], k.get("freeu"), k.get("freeu_version"), k.get("freeu_rule")) for k in rec.calls[1:]]
    assert calls == [
        (["a red apple", "a green tree"], SDXL_ROW, 2, "width"),
        ("a blue car", None, None, None),
        ("a yellow star", SDXL_ROW, 1, "width"),
        ("a cat", SDXL_ROW, 2, "diffusers"),
    ], calls
    alone = rec.pipe("a green tree", progress=False, **{**GEN, "seed": 8}, freeu=SDXL_ROW)
    assert float(np.abs(rec.results[1].arrays[1] - alone.arrays[0]).max()) <= ROW_TOL
    assert done[2]["infotexts"] == alone.infotexts


class OtherWidths(Recorder):
    """The emoji pipeline whose U-Net the server's checks see with a first level 96 channels wide: no hidden state
    of its up blocks is 4x or 2x that, so FreeU's width rule would change nothing there."""

    @property
    def unet(self) -> Any:
        import dataclasses
        from types import SimpleNamespace

        real = self.pipe.unet
        return SimpleNamespace(
            up_blocks=real.up_blocks, config=dataclasses.replace(real.config, block_out_channels=(96, 192, 384))
        )


def test_freeu_that_would_change_no_block_of_the_loaded_model_is_a_400(tmp_path) -> None:
    """With the model loaded, FreeU whose rule picks none of its U-Net's up blocks is refused before it is queued,
    in one line naming the widths; diffusers' rule (by block) is taken."""
    with (
        live_server(server_config(tmp_path), loader=lambda ref, device: OtherWidths()) as s,
        httpx.Client(base_url=s.url, timeout=300) as c,
    ):
        run_job(c, {**BODY, "steps": 1})  # the model loaded: the check runs before the job is queued
        r = c.post("/v1/jobs", json={**BODY, "freeu": list(SDXL_ROW)})
        assert r.status_code == 400, r.text
        said = r.json()["detail"]
        assert said.startswith("freeu: FreeU changes no up block of this U-Net") and "384 or 192" in said, said
        assert "\n" not in said and c.get("/v1/jobs").json()["queued"] == 0
        r = c.post("/v1/jobs", json={**BODY, "steps": 1, "freeu": list(SDXL_ROW), "freeu_rule": "diffusers"})
        assert r.status_code == 202, r.text
        assert wait_job(c, r.json()["id"], timeout=300)["state"] == "done"
