"""Hostile JSON bodies posted to every generation route of a live server on 127.0.0.1: each answer is a 2xx or a
4xx with a one-line JSON error, never a 500 or a hang, and the server still answers afterwards.

Bounded in `make test` (SDENGINE_FUZZ_EXAMPLES, default 25 bodies per route); `make fuzz` runs many more."""

from __future__ import annotations

import json
import os
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _live_server import live_server, server_config

EXAMPLES = int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)

ROUTES = (
    "/sdapi/v1/txt2img",
    "/sdapi/v1/img2img",
    "/sdapi/v1/extra-single-image",
    "/sdapi/v1/png-info",
    "/v1/images/generations",
    "/prompt",
    "/v1/jobs",
)
FIELDS = (
    "prompt",
    "width",
    "height",
    "steps",
    "n",
    "size",
    "image",
    "init_images",
    "seed",
    "batch_size",
    "cfg_scale",
    "denoising_strength",
    "sampler_name",
    "mask",
    "response_format",
    "model",
    "client_id",
)
HOSTILE = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([1e308, -1e308, 0.5, -1.0]),
    st.text(max_size=40),
    st.sampled_from(["data:image/png;base64,!!!", "iVBORw0KGgo=", "x" * 100_000, "-512x-512", "1e9x1e9"]),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)
BODY = st.one_of(
    st.dictionaries(st.sampled_from(FIELDS), HOSTILE, max_size=6),
    st.dictionaries(st.text(max_size=8), HOSTILE, max_size=4),
    st.recursive(st.integers(), lambda c: st.lists(c, max_size=2), max_leaves=40),
)


def refuse(ref: str, device: str) -> Any:
    raise FileNotFoundError(2, "No such file or directory", f"{ref}.safetensors")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("fuzz"), devices=("cpu",)), loader=refuse) as s:
        yield s


def _check(client: httpx.Client, route: str, body: Any) -> None:
    raw = json.dumps(body, allow_nan=False)
    r = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500, (route, raw[:300], r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "\n" not in r.text.strip(), r.text[:300]
        json.loads(r.text)


@pytest.mark.parametrize("route", ROUTES)
def test_hostile_bodies_are_answered_without_a_500_or_a_hang(server, route: str) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as client:

        @FUZZ
        @given(body=BODY)
        def run(body: Any) -> None:
            _check(client, route, body)

        run()
        for body in ({"prompt": "x", "width": -64, "height": -64}, {"prompt": "x", "steps": 10**30}, [[[[[[[[1]]]]]]]]):
            _check(client, route, body)
        assert client.get("/healthz").status_code == 200


RAW = (
    '{"prompt": "x", "width": NaN, "steps": Infinity}',
    '{"prompt": "x", "cfg_scale": 1e400, "seed": -1e400}',
    "[" * 5000 + "]" * 5000,
    '{"prompt": "x", "init_images": ["not base64 at all"], "image": "%%%"}',
    '{"prompt": "x", "unknown_field_' + "z" * 1000 + '": 1}',
    "not json",
    "",
)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("raw", RAW)
def test_raw_hostile_json_is_no_500(server, route: str, raw: str) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as client:
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code < 500, (route, raw[:100], r.status_code, r.text[:300])
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize("route", ["/v1/images/edits", "/v1/images/variations"])
@pytest.mark.parametrize(
    "form",
    [{"prompt": "x", "n": "-3"}, {"prompt": "x", "size": "99999999x99999999"}, {"n": "NaN"}, {"prompt": "x" * 70000}],
)
def test_openai_multipart_routes_refuse_bad_images_and_fields_without_a_500(server, route: str, form: dict) -> None:
    with httpx.Client(base_url=server.url, timeout=20) as client:
        files = {"image": ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")}
        r = client.post(route, data=form, files=files)
        assert 400 <= r.status_code < 500, (route, form, r.status_code, r.text[:300])
        assert "\n" not in r.text.strip()
