"""A live ``sdengine serve`` app on 127.0.0.1 (a free port) in a background thread, for the server tests.

Models are loaded once per test process (``shared_loader``) and shared by the servers the tests start, so a
test pays for a server's start (milliseconds), not for a model load. Every wait here is bounded.
"""

from __future__ import annotations

import io
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


def run_job(client: httpx.Client, body: dict[str, Any], timeout: float = 300.0) -> tuple[Any, dict[str, Any]]:
    """POST /v1/jobs (asserting it is queued), wait for the job (asserting it is done) and return the RGB pixels of
    its first image with the job."""
    import numpy as np
    from PIL import Image

    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    j = wait_job(client, r.json()["id"], timeout=timeout)
    assert j["state"] == "done", j
    png = Image.open(io.BytesIO(client.get(j["images"][0]["url"]).content))
    return np.asarray(png.convert("RGB")), j


class Recorder:
    """The shared emoji pipeline, recording each call's keywords (and result) and holding calls while
    ``gate`` is clear."""

    def __init__(self) -> None:
        self.pipe = shared_loader("emoji", "cpu")
        self.calls: list[dict[str, Any]] = []
        self.results: list[Any] = []
        self.gate = threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        self.calls.append(kw)
        assert self.gate.wait(120), "the test never opened the gate"
        result = self.pipe(**kw)
        self.results.append(result)
        return result


def jobs_queued_behind_a_held_one(
    tmp: Path, rec: Recorder, held: dict[str, Any], jobs: list[dict[str, Any]], timeout: float = 300.0
) -> list[dict[str, Any]]:
    """On a live server of ``rec`` (max_queue 16), ``jobs`` queued while the ``held`` job waits in the pipeline
    (so they are in the queue together, to batch as the server may); the held job is asserted done and the jobs'
    finished records are returned (the held call is ``rec.calls[0]``)."""
    config = server_config(tmp, max_queue=16)
    with live_server(config, loader=lambda ref, device: rec) as s, httpx.Client(base_url=s.url, timeout=timeout) as c:
        rec.gate.clear()
        first = c.post("/v1/jobs", json=held).json()["id"]
        ids = [c.post("/v1/jobs", json=b).json()["id"] for b in jobs]
        rec.gate.set()
        assert wait_job(c, first, timeout=timeout)["state"] == "done"
        return [wait_job(c, i, timeout=timeout) for i in ids]


def one_line_400(r: httpx.Response, *needles: str) -> str:
    """A 400 answer whose detail is one line holding every one of ``needles``; the detail."""
    assert r.status_code == 400, (r.status_code, r.text)
    message = r.json()["detail"]
    assert isinstance(message, str) and "\n" not in message, message
    for n in needles:
        assert n in message, message
    return message
