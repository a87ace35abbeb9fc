"""``sdengine serve``'s safety rules: bind, key, Origin/Host, traversal, pixel and body limits, pickles."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest

from _live_server import free_port, live_server, server_config

SRC = str(Path(__file__).resolve().parent.parent / "src")
JOB = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 1}


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "sdengine.cli", "serve", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def test_non_loopback_bind_without_key_refuses_to_start(capsys):
    from sdengine.cli import main

    for host in ("0.0.0.0", "192.168.1.20", "::"):
        assert main(["serve", "--host", host, "--port", str(free_port())]) == 2
        assert f"refusing to listen on {host} without --api-key" in capsys.readouterr().err
    assert main(["serve", "--host", "0.0.0.0", "--api-key", "", "--port", str(free_port())]) == 2
    assert "must not be empty" in capsys.readouterr().err


def test_settings_that_would_refuse_every_request_refuse_to_start(capsys, tmp_path, monkeypatch):
    """--max-queue 0 (every job a 429), a body limit <= 0 (every body a 413), an impossible port (a traceback from
    the socket layer) and an outputs folder that cannot be made (every job failing at its save) are one line at
    start, exit 2, before any model is loaded."""
    import uvicorn

    from sdengine.cli import main

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "latin1.csv").write_bytes(b"name,prompt\nCaf\xe9,x\n")
    cases = {
        ("--styles-file", str(tmp_path / "missing.csv")): "--styles-file: styles file",
        ("--styles-file", str(tmp_path / "a_file")): "its first line must name the columns name,prompt",
        ("--styles-file", str(tmp_path / "latin1.csv")): "not UTF-8 text",
        ("--max-queue", "0"): "--max-queue must be >= 1",
        ("--max-queue", "-1"): "--max-queue must be >= 1",
        ("--max-body-mb", "-5"): "--max-body-mb must be a number > 0",
        ("--max-body-mb", "nan"): "--max-body-mb must be a number > 0",
        ("--max-image-pixels", "0"): "--max-image-pixels must be >= 1",
        ("--header-timeout", "0"): "--header-timeout must be a number of seconds > 0, got 0.0",
        ("--header-timeout", "inf"): "--header-timeout must be a number of seconds > 0, got inf",
        ("--body-timeout", "nan"): "--body-timeout must be a number of seconds > 0, got nan",
        ("--max-connections", "0"): "--max-connections must be >= 1, got 0",
        ("--model-affinity", "-1"): "--model-affinity must be a number of seconds >= 0",
        ("--max-queued-per-client", "-1"): "--max-queued-per-client must be >= 0",
        # at --max-queue or more the whole queue is full first: the per-client limit was taken without effect
        ("--max-queue", "4", "--max-queued-per-client", "4"): "--max-queued-per-client 4 has no effect with",
        ("--max-queued-per-client", "100"): "--max-queued-per-client 100 has no effect with --max-queue 64",
        ("--model-affinity", "nan"): "--model-affinity must be a number of seconds >= 0",
        ("--max-steps", "0"): "--max-steps must be in [1, 1000], got 0",
        ("--max-steps", "1001"): "--max-steps must be in [1, 1000], got 1001",
        ("--max-side", "7"): "--max-side must be in [8, 8192], got 7",
        ("--max-side", "9000"): "--max-side must be in [8, 8192], got 9000",
        ("--max-batch-size", "0"): "--max-batch-size must be in [1, 64], got 0",
        ("--max-batch-size", "65"): "--max-batch-size must be in [1, 64], got 65",
        ("--port", "99999"): "--port must be in [1, 65535]",
        ("--outputs-dir", str(tmp_path / "a_file")): "not a folder",
        ("--outputs-dir", str(tmp_path / "a_file" / "sub")): "cannot create it",
    }
    for args, message in cases.items():
        argv = ["serve", *args] if args[0] == "--port" else ["serve", "--port", str(free_port()), *args]
        assert main(argv) == 2, args
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (args, err)
    made = tmp_path / "new" / "outputs"
    assert main(["serve", "--port", "99999", "--outputs-dir", str(made)]) == 2  # the port is checked first
    assert not made.exists()


def test_a_key_no_client_could_send_refuses_to_start(capsys, monkeypatch):
    """A key with a trailing newline or \\r (a key file, an env file), a space or a non-ASCII letter started the
    server, and every request was a 401: a Bearer value is read stripped and headers are Latin-1."""
    import uvicorn

    from sdengine.cli import main

    def started(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    for key in ("s3cret\n", "s3cret\r", " s3cret", "two words", "clé"):
        monkeypatch.setenv("SDENGINE_API_KEY", key)
        assert main(["serve", "--port", str(free_port())]) == 2, repr(key)
        err = capsys.readouterr().err
        assert "must be printable ASCII without spaces" in err and len(err.strip().splitlines()) == 1, err
        assert main(["serve", "--api-key", key, "--port", str(free_port())]) == 2, repr(key)
        capsys.readouterr()


@pytest.mark.slow
def test_a_subprocess_refuses_too():
    r = serve("--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "refusing to listen on 0.0.0.0 without --api-key" in r.stderr


@pytest.mark.slow
def test_cli_serve_starts_on_loopback_and_answers(tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sdengine.cli",
            "serve",
            "--port",
            str(port),
            "--outputs-dir",
            str(tmp_path),
            "--log-level",
            "warning",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 90
        while True:
            assert p.poll() is None, p.stderr.read().decode() if p.stderr else ""
            try:
                h = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        assert h.json()["status"] == "ok" and h.json()["model"] == "emoji"
    finally:
        p.terminate()
        p.wait(30)


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("keyed")
    with live_server(
        server_config(tmp, api_key="s3cret", cors_origins=("http://app.example",), max_body_bytes=1 << 20)
    ) as s:
        yield s


def test_api_key_bearer_basic_and_health(keyed):
    u = keyed.url
    assert httpx.get(f"{u}/v1/models").status_code == 401
    r = httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(f"{u}/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(f"{u}/sdapi/v1/sd-models", auth=("anyone", "s3cret")).status_code == 200
    assert httpx.post(f"{u}/sdapi/v1/interrupt", auth=("anyone", "wrong")).status_code == 401
    assert httpx.get(f"{u}/healthz").status_code == 200


def test_refusals_carry_cors_headers_for_a_listed_origin(keyed):
    """A page of a --cors-origins origin can read why it was refused (wrong key, body too big), instead of the
    browser hiding the answer behind a CORS error; an unlisted origin still gets no CORS header."""
    listed = {"Origin": "http://app.example"}
    r = httpx.get(f"{keyed.url}/v1/models", headers={**listed, "Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers.get("access-control-allow-origin") == "http://app.example"
    big = b"x" * (keyed.services.config.max_body_bytes + 1)
    r = httpx.post(
        f"{keyed.url}/v1/uploads",
        content=big,
        headers={**listed, "Authorization": "Bearer s3cret", "content-type": "image/png"},
    )
    assert r.status_code == 413 and r.headers.get("access-control-allow-origin") == "http://app.example"
    r = httpx.get(f"{keyed.url}/v1/models", headers={"Origin": "http://evil.example"})
    assert r.status_code == 401 and "access-control-allow-origin" not in r.headers


def test_a_cors_origin_written_with_a_slash_still_gets_cors_headers(tmp_path):
    """--cors-origins http://app.example/ (as copied from the address bar): the Origin rule let the page in, but
    the CORS headers never matched the browser's slash-less Origin, so the browser hid every answer."""
    with live_server(server_config(tmp_path, cors_origins=("http://app.example/",))) as s:
        h = {"Origin": "http://app.example"}
        r = httpx.get(f"{s.url}/v1/loras", headers=h)
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == "http://app.example"
        r = httpx.options(f"{s.url}/v1/jobs", headers={**h, "Access-Control-Request-Method": "POST"})
        assert r.status_code == 200 and r.headers.get("access-control-allow-origin") == "http://app.example"


def test_foreign_origin_and_null_refused_on_state_changing_routes(keyed):
    h = {"Authorization": "Bearer s3cret"}
    with httpx.Client(base_url=keyed.url, headers=h) as c:
        for origin in ("http://evil.example", "null", f"http://localhost:{keyed.port}.evil.example"):
            for method, path in (
                ("POST", "/v1/jobs"),
                ("POST", "/sdapi/v1/txt2img"),
                ("POST", "/sdapi/v1/options"),
                ("POST", "/v1/uploads"),
                ("DELETE", "/v1/jobs/x"),
                ("POST", "/v1/images/generations"),
            ):
                r = c.request(method, path, json={}, headers={"Origin": origin})
                assert r.status_code == 403, (origin, path, r.status_code)
        # The server's own origin and the --cors-origins one pass the Origin rule (then fail validation or 404).
        assert c.post("/sdapi/v1/options", json={}, headers={"Origin": keyed.url}).status_code == 200
        r = c.post("/sdapi/v1/options", json={}, headers={"Origin": "http://app.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
        assert (
            c.get("/v1/models", headers={"Origin": "http://evil.example"}).headers.get("access-control-allow-origin")
            is None
        )


@pytest.fixture(scope="module")
def open_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("open")
    (tmp / "models").mkdir()
    (tmp / "models" / "evil.ckpt").write_bytes(b"\x80\x04not really a pickle")
    (tmp / "loras").mkdir()
    (tmp / "secret.safetensors").write_bytes(b"{}")
    (tmp / "loras" / "out.safetensors").symlink_to(tmp / "secret.safetensors")
    (tmp / "outputs").mkdir()
    (tmp / "secret.png").write_bytes(b"\x89PNG secret")
    (tmp / "outputs" / "link.png").symlink_to(tmp / "secret.png")
    cfg = server_config(tmp, models_dir=tmp / "models", loras_dir=tmp / "loras", max_body_bytes=1 << 20, max_queue=0)
    with live_server(cfg) as s:
        yield s


def test_dns_rebinding_host_refused(open_server):
    r = httpx.get(f"{open_server.url}/v1/models", headers={"Host": f"evil.example:{open_server.port}"})
    assert r.status_code == 403 and "Host" in r.json()["detail"]


@pytest.mark.parametrize(
    "name",
    [
        "../secret.png",
        "..%2Fsecret.png",
        "%2e%2e%2fsecret.png",
        "..%252fsecret.png",
        "%2Fetc%2Fpasswd",
        "link.png",
        "..\\secret.png",
    ],
)
def test_image_names_cannot_leave_the_outputs_folder(open_server, name):
    r = httpx.get(f"{open_server.url}/v1/images/{name}")
    assert r.status_code in (400, 404) and b"PNG secret" not in r.content


@pytest.mark.parametrize(
    "field,value",
    [
        ("model", "../models/evil"),
        ("model", "/etc/passwd"),
        ("model", "%2e%2e/secret"),
        ("model", "evil.ckpt"),
        ("loras", [{"name": "../secret"}]),
        ("loras", [{"name": "/tmp/x"}]),
        ("loras", [{"name": "out"}]),
        ("loras", [{"name": "..%2fsecret"}]),
        ("prompt", "a cat <lora:../secret:1>"),
        ("prompt", "<lora:/etc/x:1>"),
        ("controlnets", [{"model": "../../x", "image": "iVBORw0KGgo="}]),
    ],
)
def test_traversal_and_pickle_names_refused(open_server, field, value):
    r = httpx.post(f"{open_server.url}/v1/jobs", json={**JOB, field: value})
    assert r.status_code == 400, r.text
    if value == "evil.ckpt":
        assert "pickle" in r.json()["detail"]


def test_pickle_checkpoint_refused_by_a1111_options(open_server):
    r = httpx.post(f"{open_server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "evil.ckpt"})
    assert r.status_code == 400 and "pickle" in r.json()["detail"]


def huge_png(w: int, h: int) -> bytes:
    """A PNG whose header says w x h (the pixel data is a few rows: it must be refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1) * 4))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_before_decoding(open_server):
    data = huge_png(20000, 20000)
    t0 = time.monotonic()
    r = httpx.post(f"{open_server.url}/v1/uploads", files={"file": ("bomb.png", data, "image/png")})
    assert r.status_code == 413 and "before decoding" in r.json()["detail"], r.text
    assert "400000000 pixels" in r.json()["detail"] or "20000x20000" in r.json()["detail"]
    r = httpx.post(f"{open_server.url}/v1/uploads", files={"file": ("big.png", huge_png(5000, 4000), "image/png")})
    assert r.status_code == 413 and "5000x4000" in r.json()["detail"] and "before decoding" in r.json()["detail"]
    assert time.monotonic() - t0 < 5
    import base64

    r = httpx.post(f"{open_server.url}/v1/jobs", json={**JOB, "init_image": base64.b64encode(data).decode()})
    assert r.status_code == 413


def test_oversize_body_413(open_server):
    big = b"x" * (2 << 20)
    r = httpx.post(f"{open_server.url}/v1/uploads", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 413

    def chunks():
        for _ in range(4):
            yield b"y" * (512 << 10)

    r = httpx.post(f"{open_server.url}/v1/uploads", content=chunks(), headers={"content-type": "image/png"})
    assert r.status_code == 413


def test_full_queue_is_429_with_retry_after(open_server):
    r = httpx.post(f"{open_server.url}/v1/jobs", json=JOB)
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1


def test_job_limit_flags_reach_the_server_and_its_openapi_document(monkeypatch, tmp_path):
    """--max-steps, --max-side and --max-batch-size (ServerConfig had the limits, serve had no flags): the server
    refuses above them and /openapi.json states them (JobRequest, the hires fields, OpenAI's n)."""
    from fastapi.testclient import TestClient

    import sdengine.server.app as server_app
    from sdengine.cli import main

    built: list[Any] = []

    class NotServed:
        def run(self) -> None:
            pass

    monkeypatch.setattr(server_app, "make_server", lambda app, **kw: built.append(app) or NotServed())
    argv = ["serve", "--port", str(free_port()), "--outputs-dir", str(tmp_path)]
    limits = ["--max-steps", "30", "--max-side", "256", "--max-batch-size", "2", "--max-queued-per-client", "3"]
    assert main([*argv, *limits, "--queue-order", "fifo"]) == 0
    manager = built[0].state.services.manager
    assert manager.max_queued_per_client == 3 and manager.fair is False
    client = TestClient(built[0], base_url="http://127.0.0.1")  # no lifespan: nothing is loaded or run
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    job = schemas["JobRequest"]["properties"]
    assert job["steps"]["maximum"] == 30 and job["batch_size"]["maximum"] == 2
    assert [o.get("maximum") for o in job["width"]["anyOf"]] == [256, None]
    assert schemas["HiresSpec"]["properties"]["hr_second_pass_steps"]["maximum"] == 30
    assert [o.get("maximum") for o in schemas["GenerationsRequest"]["properties"]["n"]["anyOf"]] == [2, None]
    body = {"prompt": "x", "steps": 31, "width": 64, "height": 64}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 400 and "steps" in r.text
    assert client.post("/v1/jobs", json={**body, "steps": 4, "width": 264}).status_code == 400
    assert client.post("/v1/jobs", json={**body, "steps": 4, "batch_size": 3}).status_code == 400
    r = client.post("/v1/images/generations", json={"prompt": "x", "n": 3})
    assert r.status_code == 400 and "n must be in [1, 2]" in r.text
