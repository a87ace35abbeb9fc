"""Property test over the native and A1111 routes: no input, however malformed, gets a 500.

The server's queue holds no job (``max_queue=0``), so every request that passes validation is answered 429
without generating: the test exercises parsing, validation, name resolution and image decoding, fast."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _live_server import live_server, server_config

NATIVE = [
    "model",
    "prompt",
    "negative_prompt",
    "steps",
    "sampler",
    "schedule",
    "cfg_scale",
    "seed",
    "width",
    "height",
    "batch_size",
    "init_image",
    "strength",
    "mask",
    "mask_blur",
    "controlnets",
    "loras",
    "clip_skip",
]
A1111 = [
    "prompt",
    "negative_prompt",
    "seed",
    "sampler_name",
    "sampler_index",
    "scheduler",
    "batch_size",
    "n_iter",
    "steps",
    "cfg_scale",
    "width",
    "height",
    "eta",
    "denoising_strength",
    "override_settings",
    "send_images",
    "save_images",
    "alwayson_scripts",
    "init_images",
    "mask",
    "mask_blur",
    "inpainting_mask_invert",
    "inpainting_fill",
    "resize_mode",
    "force_task_id",
    "enable_hr",
    "restore_faces",
]
TINY_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d4948445200000001000000010806000000"
        "1f15c4890000000d49444154789c6360000002000001e221bc330000000049454e44ae426082"
    )
).decode()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 600),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        [
            "",
            "emoji",
            "../x",
            "/etc/passwd",
            "DPM++ 2M Karras",
            "euler",
            "Karras",
            "automatic",
            "emoji-controlnet-canny",
            "emoji-fruit",
            "canny",
            TINY_PNG,
            "data:image/png;base64," + TINY_PNG,
            "http://example.com/a.png",
            "0" * 32,
            "%2e%2e%2f",
            "<lora:emoji-fruit:0.5> cat",
            "a \ud800 b",  # a lone surrogate: valid JSON (an escape), not encodable text
            "\udfff",
        ]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=12), inner, max_size=3)),
    max_leaves=8,
)
unit = st.fixed_dictionaries(
    {},
    optional={
        k: values
        for k in (
            "model",
            "image",
            "weight",
            "start",
            "end",
            "preprocessor",
            "low",
            "high",
            "enabled",
            "module",
            "guidance_start",
            "guidance_end",
            "control_mode",
            "resize_mode",
            "threshold_a",
            "pixel_perfect",
        )
    },
)


def bodies(fields: list[str]) -> st.SearchStrategy:
    special = {
        "controlnets": st.lists(unit, max_size=2),
        "loras": st.lists(st.fixed_dictionaries({"name": values}, optional={"weight": values}), max_size=2),
        "alwayson_scripts": st.fixed_dictionaries(
            {"controlnet": st.fixed_dictionaries({"args": st.one_of(st.lists(unit, max_size=2), values)})}
        ),
    }
    return st.one_of(
        st.fixed_dictionaries({}, optional={f: special.get(f, values) for f in fields}),
        values,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(server_config(tmp_path_factory.mktemp("prop"), max_queue=0)) as s:
        yield s


ROUTES = [
    ("/v1/jobs", NATIVE),
    ("/sdapi/v1/txt2img", A1111),
    ("/sdapi/v1/img2img", A1111),
    ("/sdapi/v1/options", ["sd_model_checkpoint", "CLIP_stop_at_last_layers", "x"]),
    ("/sdapi/v1/png-info", ["image"]),
    ("/sdapi/v1/interrupt", ["id_task"]),
    ("/sdapi/v1/skip", ["id_task"]),
    ("/internal/progress", ["id_task", "id_live_preview", "live_preview"]),
    ("/v1/images/generations", ["prompt", "n", "size", "response_format", "output_format", "model", "seed"]),
]


@pytest.mark.parametrize("path,fields", ROUTES, ids=[r[0] for r in ROUTES])
def test_no_500_for_any_json_body(server, path, fields):
    client = httpx.Client(base_url=server.url, timeout=30)

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(bodies(fields))
    def check(body):
        r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
        assert r.status_code < 500, (body, r.status_code, r.text[:300])

    with client:
        check()


def test_no_500_for_any_path_or_raw_upload(server):
    client = httpx.Client(base_url=server.url, timeout=30)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.text(max_size=40), st.binary(max_size=200))
    def check(name, data):
        from urllib.parse import quote

        for path in (
            f"/v1/jobs/{quote(name, safe='')}",
            f"/v1/images/{quote(name, safe='')}",
            f"/v1/jobs/{quote(name, safe='')}/events",
        ):
            r = client.get(path)
            assert r.status_code < 500, (path, r.status_code)
        r = client.post("/v1/uploads", content=data, headers={"content-type": "image/png"})
        assert r.status_code < 500, (data[:20], r.status_code, r.text[:200])
        r = client.post("/v1/uploads", files={"file": ("x.png", data, "image/png")})
        assert r.status_code < 500

    with client:
        check()


@pytest.fixture(scope="module")
def running_server(tmp_path_factory):
    with live_server(server_config(tmp_path_factory.mktemp("prop-run"))) as s:
        yield s


def test_generated_requests_that_run_get_an_image_or_a_400(running_server):
    """Small requests that reach the worker: every sampler/schedule pairing, sizes, guidance; never a 500."""
    from sdengine.diffusion import sampling

    names = sorted(sampling.A1111_NAMES) + sorted(sampling.SAMPLERS)
    client = httpx.Client(base_url=running_server.url, timeout=120)

    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(
        st.fixed_dictionaries(
            {
                "prompt": st.text(max_size=20),
                "steps": st.integers(1, 2),
                "width": st.sampled_from([8, 16, 20]),
                "height": st.sampled_from([8, 16]),
                "sampler_name": st.sampled_from(names),
                "scheduler": st.sampled_from(
                    ["automatic", "Karras", "normal", "exponential", "sgm_uniform", "Uniform"]
                ),
                "cfg_scale": st.floats(0, 30),
                "seed": st.integers(-1, 2**32),
                "batch_size": st.integers(1, 2),
            }
        )
    )
    def check(body):
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code in (200, 400), (body, r.status_code, r.text[:300])
        if r.status_code == 200:
            assert len(r.json()["images"]) == body["batch_size"]

    with client:
        check()


def test_a_lone_surrogate_is_a_one_line_4xx_and_the_connection_lives(server):
    """A JSON ``\\ud800`` escape once made FastAPI's own 422 handler fail to encode its answer: a 500 and a reset
    connection. Now a 4xx whose ``error.message`` names the field (what the openai client shows), on one connection
    that still serves the next request."""
    with httpx.Client(base_url=server.url, timeout=30) as client:
        body = '{"prompt": "a \\ud800 b", "steps": "x"}'
        for path in ("/v1/jobs", "/v1/images/generations", "/sdapi/v1/txt2img", "/v1/controlnets/preprocess"):
            r = client.post(path, content=body, headers={"content-type": "application/json"})
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text[:300])
            assert "\n" not in r.json()["error"]["message"], r.text
        r = client.post("/v1/images/generations", json={"prompt": "a", "n": 0, "size": "64x64"})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("n: "), r.text  # as OpenAI answers it
        assert r.json()["error"]["param"] == "n" and r.json()["detail"][0]["loc"] == ["body", "n"]
        assert client.get("/healthz").status_code == 200
