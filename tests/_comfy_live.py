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


def patched_graph(
    *patches: tuple[str, dict[str, Any]], cfg: float = 5.0, seed: int = 11, steps: int = 4, prefix: str = "patched"
) -> dict:
    """txt2img on the emoji model (64 x 64, DPM++ 2M Karras) with model patches (``(class_type, inputs)``) chained
    between the loader and the KSampler (node "3")."""
    g: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["8", 0]}},
    }
    model = ["4", 0]
    for n, (kind, inputs) in enumerate(patches):
        g[f"1{n}"] = {"class_type": kind, "inputs": {"model": model, **inputs}}
        model = [f"1{n}", 0]
    g["3"] = {
        "class_type": "KSampler",
        "inputs": {
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        },
    }  # fmt: skip
    return g
