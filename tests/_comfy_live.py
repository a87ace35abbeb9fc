"""Driving a live server's ComfyUI API from a test: a client on a live server, a graph posted to ``/prompt`` and
waited for in ``/history``, and the images of its outputs read back through ``/view``. Every wait is bounded."""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
from PIL import Image

from _live_server import LiveServer, live_server
from sdengine.server.config import ServerConfig


@contextmanager
def live_client(
    config: ServerConfig, *, timeout: float = 120.0, **kw: Any
) -> Iterator[tuple[LiveServer, httpx.Client]]:
    """A live server (``live_server(config, **kw)``) and an httpx client on it."""
    with live_server(config, **kw) as s, httpx.Client(base_url=s.url, timeout=timeout) as c:
        yield s, c


def run_prompt(client: httpx.Client, prompt: dict, *, timeout: float = 300.0, **extra: Any) -> dict:
    """POST ``{"prompt": prompt, **extra}`` to /prompt (asserting it is taken) and return its /history entry once
    the prompt is done (successful or not)."""
    r = client.post("/prompt", json={"prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = client.get(f"/history/{pid}").json()
        if pid in h:
            return h[pid]
        time.sleep(0.05)
    raise TimeoutError(pid)


def view_image(client: httpx.Client, item: dict, *, mode: str | None = None) -> np.ndarray:
    """The pixels of an output image (``{"filename", "subfolder", "type"}``) read through /view, converted to
    ``mode`` when given."""
    params = {"filename": item["filename"], "subfolder": item["subfolder"], "type": item["type"]}
    v = client.get("/view", params=params)
    assert v.status_code == 200, v.text
    im = Image.open(io.BytesIO(v.content))
    return np.asarray(im.convert(mode) if mode is not None else im)


def output_image(client: httpx.Client, h: dict, node: str | None = None, *, mode: str | None = None) -> np.ndarray:
    """The first image of a successful prompt's output of ``node`` (by default its one output with images)."""
    assert h["status"]["status_str"] == "success", h["status"]
    if node is None:
        (out,) = [o for o in h["outputs"].values() if "images" in o]
    else:
        out = h["outputs"][node]
    return view_image(client, out["images"][0], mode=mode)


def prompt_image(client: httpx.Client, prompt: dict, *, mode: str | None = "RGB", **extra: Any) -> np.ndarray:
    """Runs ``prompt`` (``extra``: more keys of the /prompt body) and returns the first image of its one output
    with images, as RGB."""
    return output_image(client, run_prompt(client, prompt, **extra), mode=mode)
