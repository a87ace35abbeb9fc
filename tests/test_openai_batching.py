"""Request batching of the OpenAI routes: ``/v1/images/generations`` and ``/v1/images/edits`` jobs that differ only
in prompt, seed and ``n`` (and, for edits, in the image and mask, of one size) run as ONE pipeline call, each
request's images equal to the same request on a server that never batches (``--max-batch 1``).

Against live servers on 127.0.0.1 (the emoji model, 64x64) through the real ``openai`` client, whose loader hands
out a recording wrapper of the shared pipeline (tests/_live_server.py's Recorder): it records each call, so the test
sees which requests shared one, and holds a first native job on a gate while the requests queue behind it.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from typing import Any

import httpx
import numpy as np
import openai
from PIL import Image

from _live_server import Recorder, live_server, server_config

# the bar of the native and A1111 batches (tests/test_server_batching.py, test_a1111_batching.py); measured here at most
# 9.9e-6 (generations, 3 rows) and 2.7e-5 (edits with masks, 2 rows) on the emoji model's [0, 1] arrays
ROW_TOL = 1e-4
BLOCKER = {"prompt": "a hold", "steps": 1, "width": 64, "height": 64, "seed": 0}  # native, steps differ: alone
FAST = {"steps": 3}


def png(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def ramp(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3)))


def hole(x0: int, y0: int, x1: int, y1: int) -> Image.Image:
    """An OpenAI mask: opaque, fully transparent (edit here) over the box."""
    m = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    m.paste((0, 0, 0, 0), (x0, y0, x1, y1))
    return m


def send(c: openai.OpenAI, kind: str, kw: dict[str, Any]) -> Any:
    if kind == "generate":
        return c.images.generate(**kw)
    return c.images.edit(**kw)


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-x", max_retries=0, timeout=300)


def queued_behind_a_blocker(tmp, rec: Recorder, requests: list[tuple[str, dict[str, Any]]]) -> list[Any]:
    """The requests sent while a native job holds the worker, each queued before the next is sent; the answers."""
    out: list[Any] = [None] * len(requests)
    with live_server(server_config(tmp, max_queue=32), loader=lambda ref, device: rec) as s:
        manager = s.services.manager
        rec.gate.clear()
        assert httpx.post(f"{s.url}/v1/jobs", json=BLOCKER, timeout=60).status_code == 202
        deadline = time.monotonic() + 60
        while not rec.calls:  # the blocker is in the pipeline
            assert time.monotonic() < deadline
            time.sleep(0.02)

        def run(k: int, kind: str, kw: dict[str, Any]) -> None:
            try:
                out[k] = send(client(s.url), kind, kw)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                out[k] = e

        threads = []
        for k, (kind, kw) in enumerate(requests):
            t = threading.Thread(target=run, args=(k, kind, kw), daemon=True)
            t.start()
            threads.append(t)
            while manager.queued_count() < k + 1 and out[k] is None:
                assert time.monotonic() < deadline + 60
                time.sleep(0.02)
        rec.gate.set()
        for t in threads:
            t.join(300)
            assert not t.is_alive()
    return out


def alone(tmp, requests: list[tuple[str, dict[str, Any]]]) -> tuple[Recorder, list[Any]]:
    rec = Recorder()
    with live_server(server_config(tmp, max_queue=32, max_batch_jobs=1), loader=lambda ref, device: rec) as s:
        c = client(s.url)
        return rec, [send(c, kind, kw) for kind, kw in requests]


def images(answer: Any) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(d.b64_json))).convert("RGB")) for d in answer.data]


def check(requests: list[tuple[str, dict[str, Any]]], tmp_path) -> tuple[Recorder, Recorder]:
    rec = Recorder()
    got = queued_behind_a_blocker(tmp_path / "b", rec, requests)
    assert not [g for g in got if isinstance(g, Exception)], got
    single_rec, single = alone(tmp_path / "a", requests)
    assert len(rec.calls) == 2, [k["prompt"] for k in rec.calls]  # the blocker, then ONE call of every request
    assert len(single_rec.calls) == len(requests)
    batch, row = rec.results[1].arrays, 0
    for (_, kw), g, s, res in zip(requests, got, single, single_rec.results, strict=True):
        n = kw.get("n", 1)
        assert float(np.abs(batch[row : row + n] - res.arrays).max()) <= ROW_TOL
        a, b = images(g), images(s)
        assert len(a) == len(b) == n
        for x, y in zip(a, b, strict=True):
            assert int(np.abs(x.astype(int) - y.astype(int)).max()) <= 1
        row += n
    return rec, single_rec


def test_openai_generations_share_a_call_and_each_equals_its_request_alone(tmp_path):
    common = {"size": "64x64", "response_format": "b64_json"}
    requests = [
        ("generate", {**common, "prompt": "a red apple", "extra_body": {**FAST, "seed": 11}}),
        ("generate", {**common, "prompt": "a blue car", "n": 2, "extra_body": {**FAST, "seed": 20}}),
    ]
    rec, _ = check(requests, tmp_path)
    assert rec.calls[1]["prompt"] == ["a red apple", "a blue car", "a blue car"]
    assert rec.calls[1]["seed"] == [11, 20, 21]


def test_openai_edits_of_one_size_share_a_call_and_each_equals_its_request_alone(tmp_path):
    common = {"response_format": "b64_json"}
    red = Image.new("RGB", (64, 64), "red")
    requests = [
        (
            "edit",
            {
                **common,
                "image": ("a.png", png(ramp()), "image/png"),
                "mask": ("m.png", png(hole(16, 16, 48, 48)), "image/png"),
                "prompt": "a star",
                "extra_body": {**FAST, "seed": 5},
            },
        ),
        (
            "edit",
            {
                **common,
                "image": ("b.png", png(red), "image/png"),
                "mask": ("m.png", png(hole(0, 0, 32, 64)), "image/png"),
                "prompt": "a moon",
                "extra_body": {**FAST, "seed": 6},
            },
        ),
    ]
    rec, _ = check(requests, tmp_path)
    call = rec.calls[1]
    assert call["prompt"] == ["a star", "a moon"] and call["seed"] == [5, 6]
    assert [im.size for im in call["init_image"]] == [(64, 64)] * 2 and len(call["mask"]) == 2
