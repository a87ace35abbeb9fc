"""The real ``openai`` client (``base_url`` at a live ``sdengine serve``): generations and edits."""

from __future__ import annotations

import base64
import io
import json
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from _live_server import live_server, server_config, shared_loader

FAST = {"seed": 4, "steps": 3}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("openai")
    with live_server(server_config(tmp, api_key="sk-test-key")) as s:
        yield s


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test-key", max_retries=0, timeout=120)


def emoji():
    return shared_loader("emoji", "cpu")


def b64_image(s: str) -> Image.Image:
    im = Image.open(io.BytesIO(base64.b64decode(s)))
    im.load()
    return im


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def test_generate_n2_b64_and_url(client, server):
    r = client.images.generate(prompt="a red apple", n=2, size="64x64", response_format="b64_json", extra_body=FAST)
    ref = emoji()("a red apple", batch_size=2, width=64, height=64, progress=False, **FAST)
    assert len(r.data) == 2 and r.data[0].revised_prompt == "a red apple"
    for d, want in zip(r.data, ref.images, strict=True):
        np.testing.assert_array_equal(np.asarray(b64_image(d.b64_json).convert("RGB")), np.asarray(want))
    u = client.images.generate(prompt="a red apple", n=2, size="64x64", response_format="url", extra_body=FAST)
    assert len(u.data) == 2
    got = httpx.get(u.data[1].url, headers={"Authorization": "Bearer sk-test-key"})
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    np.testing.assert_array_equal(
        np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB")), np.asarray(ref.images[1])
    )
    j = client.images.generate(prompt="a red apple", size="64x64", output_format="jpeg", extra_body=FAST)
    assert b64_image(j.data[0].b64_json).format == "JPEG"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
    with pytest.raises(openai.BadRequestError):
        client.images.generate(prompt="x", size="big")
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 8\] on this server, got 10"):
        client.images.generate(prompt="x", n=10, size="64x64")  # the client's field, not the batch_size it becomes
    with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 8\] on this server, got 100"):
        client.images.generate(prompt="x", n=100, size="64x64")  # not the schema's own 64, which this server is not
    with pytest.raises(openai.BadRequestError, match="n: Input should be greater than or equal to 1") as e:
        client.images.generate(prompt="x", n=0, size="64x64")  # the schema's refusal: a 400 as OpenAI's, not 422
    assert (e.value.status_code, e.value.param) == (400, "n")
    assert r.quality == "auto" and j.quality == "auto"  # the answer's quality: the request's, auto when not sent


def test_edit_with_mask_and_with_a_list_of_images(client, server):
    """A mask (OpenAI's alpha 0), a one-item list (the client's image[]), the mask refusals."""
    init = Image.new("RGB", (64, 64), (250, 200, 40))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))  # transparent = edit
    r = client.images.edit(
        image=("init.png", png(init), "image/png"),
        mask=("mask.png", png(mask), "image/png"),
        prompt="a star",
        response_format="b64_json",
        extra_body=FAST,
    )
    white = Image.new("L", (64, 64), 0)
    white.paste(255, (16, 16, 48, 48))
    ref = emoji()("a star", init_image=init, mask=white, strength=1.0, width=64, height=64, progress=False, **FAST)
    got = np.asarray(b64_image(r.data[0].b64_json).convert("RGB"))
    np.testing.assert_array_equal(got, np.asarray(ref.images[0]))
    assert (got[:8, :8] != got[24:40, 24:40].mean((0, 1)).astype(np.uint8)).any()
    r2 = client.images.edit(  # a list of one image: the client sends it as image[]
        image=[("a.png", png(init), "image/png")],
        prompt="a star",
        quality="medium",
        response_format="b64_json",
        extra_body={**FAST, "strength": 0.5},
    )
    ref = emoji()("a star", init_image=init, strength=0.5, width=64, height=64, progress=False, **FAST)
    assert len(r2.data) == 1 and r2.quality == "medium" and r2.size == "64x64"
    np.testing.assert_array_equal(np.asarray(b64_image(r2.data[0].b64_json).convert("RGB")), np.asarray(ref.images[0]))
    opaque = Image.new("RGBA", (64, 64), (255, 255, 255, 255))  # white, the usual "edit here" of other tools
    opaque.paste((0, 0, 0, 255), (0, 0, 32, 64))
    with pytest.raises(openai.BadRequestError, match="mask has no fully transparent pixel, so nothing would be") as e:
        black_and_white = ("m.png", png(opaque), "image/png")
        client.images.edit(image=("i.png", png(init), "image/png"), mask=black_and_white, prompt="a", extra_body=FAST)
    assert e.value.param == "mask"  # it answered the image unchanged
    with pytest.raises(openai.BadRequestError, match=r"the mask \(32x32\) and the image \(64x64\) must be the same"):
        client.images.edit(
            image=("init.png", png(init), "image/png"),
            mask=("mask.png", png(mask.resize((32, 32))), "image/png"),
            prompt="a star",
            extra_body=FAST,
        )


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_models_list_and_variations(client):
    assert [m.id for m in client.models.list()] == ["emoji"]
    v = client.images.create_variation(
        image=("x.png", png(Image.new("RGB", (64, 64), "red")), "image/png"),
        n=1,
        response_format="b64_json",
        extra_body=FAST,
    )
    assert b64_image(v.data[0].b64_json).size == (64, 64)


KEY = {"Authorization": "Bearer sk-test-key"}


def newest_job(server) -> dict:
    return httpx.get(f"{server.url}/v1/jobs", headers=KEY, timeout=30).json()["jobs"][0]


def test_streamed_generation_sends_partial_images_then_the_image(client, server):
    """OpenAI's streaming: partial images along the way (here the emoji model's tiny VAE previews), then the
    completed event with the same image as the plain request; every event carries the request's quality."""
    body = {"seed": 9, "steps": 6}
    stream = client.images.generate(
        model="gpt-image-1",
        prompt="a red apple",
        size="64x64",
        stream=True,
        partial_images=2,
        quality="low",
        extra_body=body,
    )
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [e.quality for e in events] == ["low"] * 3
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    partials = [np.asarray(b64_image(e.b64_json).convert("RGB")).astype(float) for e in events[:2]]
    assert all(p.shape == (64, 64, 3) and e.size == "64x64" for p, e in zip(partials, events, strict=False))
    done = events[-1]
    assert done.output_format == "png" and done.usage.total_tokens == 0
    final = np.asarray(b64_image(done.b64_json).convert("RGB"))
    want = emoji()("a red apple", width=64, height=64, progress=False, **body)
    np.testing.assert_array_equal(final, np.asarray(want.images[0]))
    # the later partial image is closer to the result than the earlier one (the sampler converges)
    err = [np.abs(p - final).mean() for p in partials]
    assert err[1] < err[0], err
    # refusals: several images, a URL, partial images without streaming; a job failure arrives as an error event
    for kw in ({"n": 2, "stream": True}, {"response_format": "url", "stream": True}, {"partial_images": 1}):
        with pytest.raises(openai.BadRequestError):
            client.images.generate(prompt="x", size="64x64", extra_body=body, **kw)
    # a size off the model's multiple (8): the plain request's 400 before the stream starts, and no job queued
    before = newest_job(server)["id"]
    with pytest.raises(openai.BadRequestError, match="width 60 is not a multiple of 8") as e:
        client.images.generate(prompt="x", size="60x60", stream=True, extra_body={"steps": 2})
    assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", "size")
    assert newest_job(server)["id"] == before
    with pytest.raises(openai.BadRequestError, match="width 1024 is over emoji's limit: each side may be at most 512"):
        client.images.generate(prompt="x", size="1024x1024", stream=True, extra_body={"steps": 2})  # was an error event
    assert newest_job(server)["id"] == before
    # a job that fails once the stream has started (here: cancelled mid-run) ends it with one error event
    late = client.images.generate(prompt="x", size="64x64", stream=True, extra_body={"steps": 150, "seed": 1})
    job = newest_job(server)
    assert job["id"] != before and job["state"] in ("queued", "running"), job
    httpx.delete(f"{server.url}/v1/jobs/{job['id']}", headers=KEY, timeout=30).raise_for_status()
    with pytest.raises(openai.APIError, match="cancelled"):
        list(late)
    assert newest_job(server)["state"] == "cancelled"


def test_a_streaming_client_that_goes_away_cancels_its_job(server):
    import time

    headers = {"Authorization": "Bearer sk-test-key"}
    body = {"prompt": "a long one", "size": "64x64", "stream": True, "steps": 150, "seed": 1}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as c:
        with c.stream("POST", "/v1/images/generations", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        deadline = time.monotonic() + 60
        while True:  # the newest job is the stream's; the server notices at its next step
            job = c.get("/v1/jobs").json()["jobs"][0]
            if job["state"] == "cancelled" or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert job["state"] == "cancelled" and job["step"] < 150, job


def test_a_plain_request_whose_client_goes_away_cancels_its_jobs(server):
    """Not streamed: nobody reads the images of a client that went away, so its job is cancelled (it ran on)."""
    import time

    body = {"prompt": "a long one", "size": "64x64", "n": 2, "steps": 150, "seed": 1}
    with httpx.Client(base_url=server.url, headers=KEY) as c:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
            c.post("/v1/images/generations", json=body, timeout=1.0)
        deadline = time.monotonic() + 30
        while True:  # the newest job is the request's; the server looks every 0.5 s, the job stops at its next step
            job = c.get("/v1/jobs", timeout=30).json()["jobs"][0]
            if job["state"] in ("cancelled", "done", "failed") or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert job["state"] == "cancelled" and job["step"] < 150, job


def jpeg_or_webp(im: Image.Image, fmt: str, quality: int) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, quality=quality)
    return buf.getvalue()


def test_output_compression_is_the_jpeg_and_webp_quality(client):
    """OpenAI's ``output_compression`` (0-100, default 100) sets the JPEG/WebP quality; it is never dropped."""
    ref = emoji()("a red apple", width=64, height=64, progress=False, **FAST).images[0]
    low = client.images.generate(
        prompt="a red apple", size="64x64", output_format="jpeg", output_compression=10, extra_body=FAST
    )
    assert base64.b64decode(low.data[0].b64_json) == jpeg_or_webp(ref, "JPEG", 10)
    default = client.images.generate(prompt="a red apple", size="64x64", output_format="jpeg", extra_body=FAST)
    assert base64.b64decode(default.data[0].b64_json) == jpeg_or_webp(ref, "JPEG", 100)
    assert default.output_format == "jpeg" and default.background == "opaque" and default.usage.total_tokens == 0
    init = Image.new("RGB", (64, 64), (250, 200, 40))
    edited = client.images.edit(
        image=("init.png", png(init), "image/png"),
        prompt="a star",
        output_format="webp",
        output_compression=20,
        extra_body=FAST,
    )
    want = emoji()("a star", init_image=init, strength=0.75, width=64, height=64, progress=False, **FAST).images[0]
    assert base64.b64decode(edited.data[0].b64_json) == jpeg_or_webp(want, "WEBP", 20)


def test_values_the_server_cannot_honour_are_refused(client):
    """Never another image than asked for: a transparent background, a URL to a JPEG (the saved file is a PNG),
    compression of a PNG, unknown quality/moderation/style values, an edit without a prompt or over 32000
    characters. Each refusal is in OpenAI's error shape: ``invalid_request_error``, ``param`` the field."""
    init = ("init.png", png(Image.new("RGB", (64, 64), "red")), "image/png")
    cases = [
        ("background 'transparent' is not supported", {"background": "transparent"}),
        ("response_format url serves the saved PNG", {"output_format": "jpeg", "response_format": "url"}),
        ("output_compression 50 is for output_format jpeg or webp", {"output_compression": 50}),
        ("quality must be one of auto, low", {"quality": "ultra"}),
        ("moderation must be one of auto, low, got 'none'", {"moderation": "none"}),
        ("style must be one of vivid, natural, got 'oil'", {"style": "oil"}),
    ]
    for message, kw in cases:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.images.generate(prompt="x", size="64x64", extra_body={**FAST, **kw})
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", list(kw)[-1])
        with pytest.raises(openai.BadRequestError, match=message if "style" not in kw else "unknown parameter") as e:
            client.images.edit(image=init, prompt="x", extra_body={**FAST, **kw})  # edits take no style at all
        assert (e.value.type, e.value.param) == ("invalid_request_error", list(kw)[-1])
    with pytest.raises(openai.BadRequestError, match="prompt is required") as e:
        client.images.edit(image=init, prompt=" ", extra_body=FAST)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="prompt is required") as e:
        client.images.generate(prompt="", size="64x64", extra_body=FAST)
    assert e.value.param == "prompt"
    with pytest.raises(openai.BadRequestError, match="prompt may be at most 32000 characters, got 32001"):
        client.images.edit(image=init, prompt="x" * 32001, extra_body=FAST)
    refused = [({"size": "0x64"}, "size"), ({"size": "60x60"}, "size"), ({"model": "nope"}, "model")]
    refused.append(({"size": "1024x1024"}, "size"))  # over 8x the model's training size
    for body, param in [*refused, ({"sampler": "nope"}, "sampler")]:
        with pytest.raises(openai.BadRequestError) as e:  # the pipeline's refusals too; a width is the size's
            client.images.generate(prompt="x", extra_body={**FAST, **body})
        assert (e.value.type, e.value.param) == ("invalid_request_error", param), e.value.body
    r = client.images.generate(
        model="chatgpt-image-latest", prompt="x", size="64x64", background="opaque", quality="low", extra_body=FAST
    )
    assert b64_image(r.data[0].b64_json).mode == "RGB"  # OpenAI's names and values that change nothing here


def test_streamed_edit_sends_image_edit_events(client):
    """``images.edit(stream=True)`` reads OpenAI's ``image_edit.*`` events (it read nothing from a JSON answer)."""
    body = {"seed": 9, "steps": 6}
    init = Image.new("RGB", (64, 64), (250, 200, 40))
    image = ("init.png", png(init), "image/png")
    events = list(
        client.images.edit(image=image, prompt="a star", stream=True, partial_images=1, quality="high", extra_body=body)
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert [e.quality for e in events] == ["high", "high"]  # the request's, as OpenAI's events carry it
    assert events[0].partial_image_index == 0 and events[1].size == "64x64"
    want = emoji()("a star", init_image=init, strength=0.75, width=64, height=64, progress=False, **body).images[0]
    np.testing.assert_array_equal(np.asarray(b64_image(events[1].b64_json).convert("RGB")), np.asarray(want))
    with pytest.raises(openai.BadRequestError, match="send one image, got 2"):
        client.images.edit(image=[image, image], prompt="a star", stream=True, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="partial_images needs stream: true"):
        client.images.edit(image=image, prompt="a star", partial_images=1, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="height 60 is not a multiple of 8") as e:
        client.images.edit(image=image, prompt="a star", size="64x60", stream=True, extra_body=body)
    assert (e.value.status_code, e.value.param) == (400, "size")  # before the stream starts


def test_several_images_to_edit_are_refused_not_edited_one_by_one(client, server):
    """OpenAI's GPT image models take several images as references combined into one new picture (the mask is
    the first image's): ``n`` images in all. img2img cannot combine them, and editing each alone answered n images
    per input, the mask on every one: now a 400 naming ``image``, before any job is queued."""
    a = ("a.png", png(Image.new("RGB", (64, 64), (250, 200, 40))), "image/png")
    b = ("b.png", png(Image.new("RGB", (64, 64), (30, 60, 200))), "image/png")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    before = newest_job(server)["id"]
    for kw in ({}, {"mask": ("m.png", png(mask), "image/png")}, {"n": 2}):
        with pytest.raises(openai.BadRequestError, match="send one image, got 2: this server edits one image") as e:
            client.images.edit(image=[a, b], prompt="a basket with all of these", extra_body=FAST, **kw)
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", "image")
    with pytest.raises(openai.BadRequestError, match="send one image, got 2: a variation starts from one image"):
        client.post(
            "/images/variations",
            cast_to=object,
            body={"steps": "3"},
            files=[("image", a), ("image", b)],
            options={"headers": {"Content-Type": "multipart/form-data"}},
        )
    assert newest_job(server)["id"] == before


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_unknown_and_unsupported_fields_are_refused(client, server):
    """A field a route does not read was dropped: a misspelt ``seed`` drew another image, a ``markup`` drawing was
    ignored. Now each is a 400 naming it (OpenAI refuses an unknown parameter too); OpenAI's fields that change
    nothing here (``safety_identifier``, ``complexity``, ``input_fidelity``) are taken, their values checked."""
    init = ("init.png", png(Image.new("RGB", (64, 64), "red")), "image/png")
    before = newest_job(server)["id"]
    calls = {
        "generations": lambda **kw: client.images.generate(prompt="x", size="64x64", **kw),
        "edits": lambda **kw: client.images.edit(image=init, prompt="x", **kw),
        "variations": lambda **kw: client.images.create_variation(image=init, **kw),
    }
    for route, call in calls.items():
        with pytest.raises(openai.BadRequestError, match=f"unknown parameter 'sede': /v1/images/{route} takes") as e:
            call(extra_body={**FAST, "sede": 4})
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", "sede")
        with pytest.raises(openai.BadRequestError, match="frame_count is for output_format gif") as e:
            call(extra_body={**FAST, "frame_count": 4})
        assert e.value.param == "frame_count"
    with pytest.raises(openai.BadRequestError, match="markup .* is not supported: send a mask instead") as e:
        client.images.edit(image=init, prompt="x", markup=init, extra_body=FAST)
    assert e.value.param == "markup"
    with pytest.raises(openai.BadRequestError, match="unknown parameter 'strength'"):  # img2img's, not txt2img's
        client.images.generate(prompt="x", size="64x64", extra_body={**FAST, "strength": 0.5})
    with pytest.raises(openai.BadRequestError, match="unknown parameter 'input_fidelity'"):  # OpenAI's edits' only
        client.images.generate(prompt="x", size="64x64", extra_body={**FAST, "input_fidelity": "low"})
    with pytest.raises(openai.BadRequestError, match="input_fidelity must be one of high, low, got 'max'") as e:
        client.images.edit(image=init, prompt="x", extra_body={**FAST, "input_fidelity": "max"})
    assert e.value.param == "input_fidelity"
    with pytest.raises(openai.BadRequestError, match="complexity must be one of low, medium, high") as e:
        client.images.generate(prompt="x", size="64x64", extra_body={**FAST, "complexity": "extreme"})
    assert e.value.param == "complexity"
    assert newest_job(server)["id"] == before  # all refused up front
    ref = np.asarray(emoji()("x", width=64, height=64, progress=False, **FAST).images[0])
    r = client.images.generate(
        prompt="x", size="64x64", safety_identifier="u-1", extra_body={**FAST, "complexity": "high"}, user="u"
    )
    np.testing.assert_array_equal(np.asarray(b64_image(r.data[0].b64_json).convert("RGB")), ref)
    e2 = client.images.edit(image=init, prompt="x", input_fidelity="high", safety_identifier="u-1", extra_body=FAST)
    assert len(e2.data) == 1


def test_models_retrieve(client):
    """``client.models.retrieve``: a listed model, an OpenAI name (the server's current model, as the image routes
    take it); an unknown name is OpenAI's 404 (``NotFoundError``, ``param`` model)."""
    m = client.models.retrieve("emoji")
    assert (m.id, m.object, m.owned_by) == ("emoji", "model", "sdengine")
    assert client.models.retrieve("gpt-image-1").id == "gpt-image-1"
    with pytest.raises(openai.NotFoundError, match="model 'nope' does not exist here") as e:
        client.models.retrieve("nope")
    assert (e.value.type, e.value.param, e.value.code) == ("invalid_request_error", "model", "model_not_found")
    spec = httpx.get(f"{client.base_url}".removesuffix("/v1/") + "/openapi.json").json()
    assert "404" in spec["paths"]["/v1/models/{model_id}"]["get"]["responses"]


def resolve(spec: dict, node: dict) -> dict:
    while "$ref" in node:
        node = spec["components"]["schemas"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def problems(spec: dict, schema: dict, value, where: str = "") -> list[str]:
    """What in ``value`` the document's JSON schema refuses (the keywords it uses: types, enums, bounds, required
    and unknown keys, oneOf/anyOf)."""
    schema = resolve(spec, schema)
    for key in ("oneOf", "anyOf"):
        if key in schema:
            matches = [o for o in schema[key] if not problems(spec, o, value, where)]
            ok = len(matches) == 1 if key == "oneOf" else bool(matches)
            if not ok:
                return [f"{where}: {value!r} matches {len(matches)} of {key}"]
    kinds = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "object": dict, "array": list}
    kind = schema.get("type")
    if kind == "null":
        return [] if value is None else [f"{where}: not null"]
    if kind in kinds and (not isinstance(value, kinds[kind]) or (kind != "boolean" and isinstance(value, bool))):
        return [f"{where}: {value!r} is not {kind}"]
    out = []
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{where}: {value!r} not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"] or "maximum" in schema and value > schema["maximum"]:
        out.append(f"{where}: {value!r} out of bounds")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        out += [f"{where}: {k} missing" for k in schema.get("required", []) if k not in value]
        if schema.get("additionalProperties") is False:
            out += [f"{where}: {k} not documented" for k in value if k not in props]
        for k, v in value.items():
            if k in props:
                out += problems(spec, props[k], v, f"{where}.{k}")
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            out += problems(spec, schema["items"], v, f"{where}[{i}]")
    return out


# a documented value for every field the OpenAI routes read (a field the document adds needs one here)
DOC_VALUES = {
    "prompt": "a star",
    "model": "emoji",  # the server's own: a gpt-image name refuses response_format and style, as OpenAI's does
    "n": 1,
    "size": "64x64",
    "response_format": "b64_json",
    "output_format": "webp",
    "output_compression": 60,
    "quality": "low",
    "moderation": "low",
    "style": "natural",
    "background": "opaque",
    "user": "u",
    "safety_identifier": "u-1",
    "complexity": "low",
    "input_fidelity": "low",
    "stream": False,
    "partial_images": 0,
    "seed": 4,
    "steps": 3,
    "negative_prompt": "blurry",
    "cfg_scale": 6.5,
    "sampler": "Euler a",
    "schedule": "karras",
    "vae": "None",  # the model file's own VAE: valid on a server without --vaes-dir
    "ip_adapters": [],  # no unit: valid on a server without --ip-adapters-dir (a form sends "[]")
    "redux": [],  # no unit: FLUX.1 Redux (tests/test_flux_redux_server.py runs units)
    "strength": 0.8,
    "sag_scale": 0.5,  # self-attention guidance (the job runs it)
    "sag_blur_sigma": 2.0,
    "sag_rule": "comfyui",
    "pag_scale": 1.5,  # perturbed-attention guidance on the middle block (the job runs it)
    "pag_layers": "mid",
    "freeu": "1.3,1.4,0.9,0.2",  # FreeU (a form's string; JSON takes it too)
    "freeu_version": 2,
    "freeu_rule": "width",
    "deep_shrink": "2,2,0,0.5",  # Deep Shrink (a form's string; JSON takes it too, and its object)
    "hypertile": "32,1,0",  # HyperTile (a form's string; JSON takes it too, and its list)
    "hypertile_hires_only": False,
    "hypertile_rule": "comfyui",
    "hypertile_scale_depth": False,
    # off (a form's empty field): emoji's VAE has no middle attention to tile (tests/test_openai_tiled_extensions.py)
    "hypertile_vae": "",
    "tiled_diffusion": '{"window": 8, "stride": 4}',  # MultiDiffusion (a form's JSON string; JSON takes the object)
}


def sse(text: str) -> list[tuple[str | None, dict]]:
    """(event name, data) of each Server-Sent Event."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        name = next((ln[len("event: ") :] for ln in lines if ln.startswith("event: ")), None)
        data = "".join(ln[len("data: ") :] for ln in lines if ln.startswith("data: "))
        out.append((name, json.loads(data)))
    return out


def test_openapi_document_matches_the_openai_routes(server):
    """/openapi.json says how the OpenAI routes behave: the JSON body of generations and the multipart forms of
    edits and variations list exactly the fields each reads (a request with every one is answered; another field
    is refused), their values (each enum value is taken, one outside it or past a bound is refused with that
    ``param``), the JSON answer's schema, the ``text/event-stream`` answer of ``stream: true`` (every event sent,
    the failure event too, is one of the documented ones) and the refusals (400 in the documented Error shape)."""
    c = httpx.Client(base_url=server.url, headers=KEY, timeout=60)
    spec = c.get("/openapi.json").json()
    ops = {r: spec["paths"][f"/v1/images/{r}"]["post"] for r in ("generations", "edits", "variations")}
    media = {"generations": "application/json", "edits": "multipart/form-data", "variations": "multipart/form-data"}
    bodies = {r: resolve(spec, op["requestBody"]["content"][media[r]]["schema"]) for r, op in ops.items()}
    init = png(Image.new("RGB", (64, 64), (250, 200, 40)))
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (16, 16, 48, 48))
    files = {"image": ("i.png", init, "image/png"), "mask": ("m.png", png(mask), "image/png")}

    def post(route: str, fields: dict, images: dict | None = None, **kw) -> httpx.Response:
        if route == "generations":
            return c.post("/v1/images/generations", json=fields, **kw)
        form = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
        return c.post(f"/v1/images/{route}", data=form, files=images or {"image": files["image"]}, **kw)

    def refused(r: httpx.Response, param: str, route: str) -> None:
        assert r.status_code == 400 and str(r.status_code) in ops[route]["responses"], (route, param, r.text)
        assert not problems(spec, ops[route]["responses"]["400"]["content"]["application/json"]["schema"], r.json())
        assert r.json()["error"]["param"] == param, (route, r.text)

    for route, body in bodies.items():
        props = body["properties"]
        assert body["additionalProperties"] is False and "422" not in ops[route]["responses"]
        # the SD3 / Flux models' own fields are refused on the emoji model (test_server_dit.py sends them)
        # modules: test_server_dit_files.py; the edit's Kontext switch: test_flux_kontext_server.py
        family_only = ("distilled_cfg_scale", "shift", "sd3", "modules", "reference_images", "reference_auto_resize")
        family_only += ("control_image", "control_preprocessor")  # Depth / Canny: test_flux_control_preprocess.py
        family_only += ("sdxl",)  # SDXL's settings: test_sdxl_server_ui.py
        sent = {k: DOC_VALUES[k] for k in props if k not in ("image", "image[]", "mask", *family_only)}
        with_files = {**sent, **{k: "(the file)" for k in ("image", "mask") if k in props}}
        assert not problems(spec, body, with_files), problems(spec, body, with_files)  # documented values
        r = post(route, sent, {k: files[k] for k in ("image", "mask") if k in props})
        assert r.status_code == 200, (route, r.text)
        answer = ops[route]["responses"]["200"]["content"]["application/json"]["schema"]
        assert not problems(spec, answer, r.json()), problems(spec, answer, r.json())
        refused(post(route, {**sent, "undocumented": "1"}), "undocumented", route)
        for name, prop in props.items():  # out of each documented enum or bound: refused, naming the field
            for option in [prop, *prop.get("anyOf", [])]:
                bad = "nonsense" if "enum" in option else option.get("maximum", 0) + 1 if "maximum" in option else None
                if bad is not None and name != "model":
                    refused(post(route, {**sent, name: bad}), name, route)
    # each documented enum value passes every field check: the request is refused only at the size, which is
    # checked last (60 is off the model's multiple of 8), so no job runs
    for route, body in bodies.items():
        for name, prop in body["properties"].items():
            for value in next((o["enum"] for o in [prop, *prop.get("anyOf", [])] if "enum" in o), []):
                r = post(route, {"prompt": "x", "size": "60x60", name: value})
                assert r.status_code == 400 and r.json()["error"]["param"] == "size", (route, name, value, r.text)
    r = c.post("/v1/images/edits", data={"prompt": "x", "steps": "2"}, files={"image[]": files["image"]})
    assert r.status_code == 200 and "image[]" in bodies["edits"]["properties"], r.text  # the client's list of one
    # stream: true answers the documented media type, each event one of the documented ones, named by its type
    for route in ("generations", "edits"):
        content = ops[route]["responses"]["200"]["content"]
        r = post(route, {"prompt": "a star", "stream": True, "partial_images": 1, "seed": 9, "steps": 4})
        assert r.status_code == 200 and r.headers["content-type"].split(";")[0] in content, r.text
        events = sse(r.text)
        kind = "image_generation" if route == "generations" else "image_edit"
        assert [name for name, _ in events] == [f"{kind}.partial_image", f"{kind}.completed"]
        for name, data in events:
            assert data["type"] == name and not problems(spec, content["text/event-stream"]["schema"], data)
    with c.stream("POST", "/v1/images/generations", json={"prompt": "x", "stream": True, "steps": 150}) as r:
        deadline = time.monotonic() + 30
        while newest_job(server)["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.05)
        c.delete(f"/v1/jobs/{newest_job(server)['id']}").raise_for_status()
        events = sse(r.read().decode())
    assert [(name, data["type"]) for name, data in events] == [(None, "error")], events
    schema = ops["generations"]["responses"]["200"]["content"]["text/event-stream"]["schema"]
    assert not problems(spec, schema, events[0][1]), events


def test_a_body_that_is_not_json_is_a_400_about_no_field(server):
    """A broken JSON body said ``0: JSON decode error`` with ``param`` "0" (the character position read as a field
    name); now one line saying what is wrong, no ``param``, a 400 as OpenAI's."""
    headers = {**KEY, "content-type": "application/json"}
    r = httpx.post(f"{server.url}/v1/images/generations", content=b'{"prompt": "a",', headers=headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == "the body is not valid JSON (it breaks at character 15)", r.text
    assert r.json()["error"]["param"] is None


def test_openai_refuses_what_openai_refuses(client):
    """What OpenAI's API refuses is refused here too (400, OpenAI's error shape, ``param`` the field), never taken
    as an extension: ``output_format`` ``jpg`` or ``PNG`` (exactly png, jpeg, webp), and with a GPT image model
    the fields of its retired DALL-E models (``response_format``, ``style``, ``quality`` standard/hd); edits take
    no ``style`` and no ``quality`` ``hd``. What OpenAI takes is taken: ``output_compression`` 100 with png, and
    the same fields with another model name."""
    init = ("init.png", png(Image.new("RGB", (64, 64), "red")), "image/png")
    generations = [
        ({"output_format": "jpg"}, "output_format"),
        ({"output_format": "PNG"}, "output_format"),
        ({"model": "gpt-image-1", "response_format": "b64_json"}, "response_format"),
        ({"model": "gpt-image-2", "response_format": "url"}, "response_format"),
        ({"model": "chatgpt-image-latest", "style": "vivid"}, "style"),
        ({"model": "gpt-image-1.5", "quality": "hd"}, "quality"),
    ]
    for body, param in generations:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(prompt="x", size="64x64", extra_body={**FAST, **body})
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", param), body
    edits = [({"output_format": "jpg"}, "output_format"), ({"style": "vivid"}, "style"), ({"quality": "hd"}, "quality")]
    edits.append(({"model": "gpt-image-1", "response_format": "b64_json"}, "response_format"))
    for body, param in edits:
        with pytest.raises(openai.BadRequestError) as e:
            client.images.edit(image=init, prompt="x", size="64x64", extra_body={**FAST, **body})
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", param), body
    r = client.images.generate(
        prompt="x", size="64x64", output_compression=100, style="vivid", quality="hd", extra_body=FAST
    )
    assert b64_image(r.data[0].b64_json).format == "PNG"  # png at 100 (lossless anyway) and DALL-E's fields
    r = client.images.generate(model="gpt-image-1", prompt="x", size="64x64", quality="low", extra_body=FAST)
    assert b64_image(r.data[0].b64_json).format == "PNG"


def test_n_is_at_most_openais_ten(tmp_path):
    """OpenAI takes ``n`` 1 to 10: a server whose --max-batch-size is larger still refuses 11 (param ``n``),
    and documents that maximum."""
    with live_server(server_config(tmp_path, max_batch=16)) as s:
        c = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match=r"n must be in \[1, 10\] \(OpenAI's limit\), got 11") as e:
            c.images.generate(prompt="x", n=11, size="64x64", extra_body=FAST)
        assert (e.value.status_code, e.value.param) == (400, "n")
        spec = httpx.get(f"{s.url}/openapi.json", timeout=30).json()
        assert spec["components"]["schemas"]["EditsRequest"]["properties"]["n"]["maximum"] == 10


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")
def test_the_fields_openai_refuses_are_refused_in_its_shape(client, server):
    """What OpenAI's API (the ``openai`` client's typed parameters) refuses was taken: ``quality`` ``xhigh``/``max``
    with a GPT image model other than gpt-image-2.5-sunburst/-flare, ``user: null`` (a string in OpenAI's API,
    where every other field may be null), and the GPT image fields on the retired variations endpoint, which took
    image, model, n, response_format, size and user only. Each is now a 400 in OpenAI's shape naming the field;
    what OpenAI takes still answers, and variations answer a URL by default, as OpenAI's did."""
    init = ("init.png", png(Image.new("RGB", (64, 64), "red")), "image/png")
    jobs = httpx.get(f"{server.url}/v1/jobs", headers=KEY, timeout=30).json()["jobs"]
    for model in ("gpt-image-1", "gpt-image-2", "chatgpt-image-latest", "gpt-image-2.6-flare"):
        for quality in ("xhigh", "max"):
            with pytest.raises(openai.BadRequestError, match=f"quality '{quality}' is not taken with model") as e:
                client.images.generate(prompt="x", size="64x64", model=model, quality=quality, extra_body=FAST)
            assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", "quality")
        with pytest.raises(openai.BadRequestError, match="quality 'max' is not taken with model") as e:
            client.images.edit(image=init, prompt="x", model=model, quality="max", extra_body=FAST)
        assert e.value.param == "quality"
    with pytest.raises(openai.BadRequestError, match="user must be a string, got null") as e:
        client.images.generate(prompt="x", size="64x64", user=None, extra_body=FAST)  # type: ignore[arg-type]
    assert (e.value.type, e.value.param) == ("invalid_request_error", "user")
    for name, value in (("output_format", "png"), ("quality", "high"), ("style", "vivid"), ("background", "auto")):
        with pytest.raises(openai.BadRequestError, match=f"unknown parameter '{name}': /v1/images/variations") as e:
            client.images.create_variation(image=init, extra_body={**FAST, name: value})
        assert (e.value.type, e.value.param) == ("invalid_request_error", name)
    with pytest.raises(openai.BadRequestError, match="unknown parameter 'safety_identifier'"):
        client.images.create_variation(image=init, extra_body={**FAST, "safety_identifier": "u-1"})
    assert httpx.get(f"{server.url}/v1/jobs", headers=KEY, timeout=30).json()["jobs"] == jobs  # refused up front
    # what OpenAI takes is answered: xhigh with the models that take it (snapshot too) or this server's model,
    # null for an optional field, a variation with OpenAI's fields (a URL when no response_format is sent)
    for model in ("gpt-image-2.5-flare", "gpt-image-2.5-sunburst-2026-09-08", "emoji", None):
        kw = {} if model is None else {"model": model}
        r = client.images.generate(prompt="x", size="64x64", quality="max", style=None, extra_body=FAST, **kw)
        assert r.quality == "max" and len(r.data) == 1 and r.data[0].b64_json
    v = client.images.create_variation(image=init, n=1, size="64x64", user="u-1", model="dall-e-2", extra_body=FAST)
    assert v.data[0].b64_json is None and v.data[0].url
    got = httpx.get(v.data[0].url, headers=KEY, timeout=30)
    assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (64, 64)
