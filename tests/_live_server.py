"""A live ``sdengine serve`` app on 127.0.0.1 (a free port) in a background thread, for the server tests.

Models are loaded once per test process (``shared_loader``) and shared by the servers the tests start, so a
test pays for a server's start (milliseconds), not for a model load. Every wait here is bounded.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from sdengine.server.app import create_app, make_server
from sdengine.server.config import ServerConfig

_PIPES: dict[tuple[str, str], Any] = {}
_PIPES_LOCK = threading.Lock()


def shared_loader(ref: str, device: str) -> Any:
    """load_pipeline, cached per (model, device) for the whole test process."""
    from sdengine.pipeline import load_pipeline

    with _PIPES_LOCK:
        key = (ref, device)
        if key not in _PIPES:
            _PIPES[key] = load_pipeline(ref, device=device)
        return _PIPES[key]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveServer:
    def __init__(self, app: Any, port: int) -> None:
        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.services = app.state.services


@contextmanager
def live_server(
    config: ServerConfig, *, loader: Any = shared_loader, start_timeout: float = 60.0, as_served: bool = False
) -> Iterator[LiveServer]:
    """``as_served``: the uvicorn server ``sdengine serve`` runs (make_server: its protocol with the header
    deadline, its connection limit, its shutdown); else a plain uvicorn server."""
    port = free_port()
    config = replace(config, host="127.0.0.1", port=port)
    app = create_app(config, loader=loader, preload=False)
    if as_served:
        server = make_server(app, host="127.0.0.1", port=port, grace=1.0, log_level="warning", access_log=False)
    else:
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="on")
        )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(app, port)
    finally:
        server.should_exit = True
        thread.join(60)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    """Poll GET /v1/jobs/{id} until it is finished (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        j = client.get(f"/v1/jobs/{job_id}").json()
        if j["state"] in ("done", "failed", "cancelled"):
            return j
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout} s")


def server_config(tmp: Path, **kw: Any) -> ServerConfig:
    return ServerConfig(outputs_dir=tmp / "outputs", **kw)
