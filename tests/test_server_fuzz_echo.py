"""Unknown paths: the 404 names no client-controlled text (no reflected markup)."""

from __future__ import annotations

import httpx
import pytest

from _live_server import live_server, server_config


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("echo"), devices=("cpu",))) as s:
        yield s


@pytest.mark.parametrize("path", ["/nonexistent<script>alert(1)</script>", "/sdapi/v1/%3Cimg%20src=x%3E", "/a\"b'c"])
def test_an_unknown_path_is_a_json_404_that_does_not_echo_it(server, path: str) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as client:
        r = client.get(path)
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/json")
    assert "<" not in r.text and "script" not in r.text and "img" not in r.text
    assert "\n" not in r.text.strip()


def test_the_default_connection_cap_is_512() -> None:
    from sdengine.cli import build_parser
    from sdengine.server.config import ServerConfig

    assert ServerConfig().max_connections == 512
    assert build_parser().parse_args(["serve"]).max_connections == 512


def test_a_client_over_the_connection_cap_gets_a_fast_503(tmp_path) -> None:
    import socket
    import time

    config = server_config(tmp_path, devices=("cpu",), max_connections=2)
    with live_server(config, as_served=True) as s:
        held = []
        for _ in range(2):  # two idle connections hold the whole cap
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=5)
            held.append(sock)
        time.sleep(0.2)
        start = time.monotonic()
        with httpx.Client(base_url=s.url, timeout=5) as client:
            r = client.get("/healthz")
        assert r.status_code == 503
        assert time.monotonic() - start < 2.0
        for sock in held:
            sock.close()
        time.sleep(0.3)
        with httpx.Client(base_url=s.url, timeout=5) as client:
            assert client.get("/healthz").status_code != 503
