"""The real ``openai`` client (``base_url`` at a live ``sdengine serve``): generations and edits."""

from __future__ import annotations

import base64
import io

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
    with pytest.raises(openai.UnprocessableEntityError, match="n: Input should be greater than or equal to 1"):
        client.images.generate(prompt="x", n=0, size="64x64")  # the schema's refusal, in the client's message


def test_edit_with_mask_and_with_a_list_of_images(client):
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
    other = Image.new("RGB", (64, 64), (30, 60, 200))
    r2 = client.images.edit(
        image=[("a.png", png(init), "image/png"), ("b.png", png(other), "image/png")],
        prompt="a star",
        response_format="b64_json",
        extra_body={**FAST, "strength": 0.5},
    )
    assert len(r2.data) == 2
    refs = [
        emoji()("a star", init_image=im, strength=0.5, width=64, height=64, progress=False, **FAST)
        for im in (init, other)
    ]
    for d, want in zip(r2.data, refs, strict=True):
        np.testing.assert_array_equal(np.asarray(b64_image(d.b64_json).convert("RGB")), np.asarray(want.images[0]))
    with pytest.raises(openai.BadRequestError, match=r"the mask \(32x32\) and image 0 \(64x64\) must be the same size"):
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
        ("output_compression is for output_format jpeg or webp", {"output_compression": 50}),
        ("quality must be one of auto, low", {"quality": "ultra"}),
        ("moderation must be one of auto, low, got 'none'", {"moderation": "none"}),
        ("style must be one of vivid, natural, got 'oil'", {"style": "oil"}),
    ]
    for message, kw in cases:
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.images.generate(prompt="x", size="64x64", extra_body={**FAST, **kw})
        assert (e.value.status_code, e.value.type, e.value.param) == (400, "invalid_request_error", list(kw)[-1])
        with pytest.raises(openai.BadRequestError, match=message) as e:
            client.images.edit(image=init, prompt="x", extra_body={**FAST, **kw})
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
    with pytest.raises(openai.BadRequestError, match="stream takes one image to edit, got 2"):
        client.images.edit(image=[image, image], prompt="a star", stream=True, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="partial_images needs stream: true"):
        client.images.edit(image=image, prompt="a star", partial_images=1, extra_body=body)
    with pytest.raises(openai.BadRequestError, match="height 60 is not a multiple of 8") as e:
        client.images.edit(image=image, prompt="a star", size="64x60", stream=True, extra_body=body)
    assert (e.value.status_code, e.value.param) == (400, "size")  # before the stream starts
