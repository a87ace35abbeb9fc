"""20 concurrent clients over loopback (native and A1111 routes): each gets its own image or a 429, none lost
or mixed up, and memory stays bounded."""

from __future__ import annotations

import json
import threading
import time

import httpx
import psutil
import pytest

from _live_server import live_server, server_config

CLIENTS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with live_server(server_config(tmp_path_factory.mktemp("load"), max_queue=6)) as s:
        yield s


def test_twenty_concurrent_clients_each_get_their_image_or_429(server):
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    results: dict[int, tuple[str, object]] = {}
    start = threading.Barrier(CLIENTS)

    def body(i: int) -> dict:
        return {"prompt": f"item number {i}", "seed": 1000 + i, "steps": 2, "width": 64, "height": 64}

    def native(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=180) as c:
            start.wait(30)
            r = c.post("/v1/jobs", json=body(i))
            if r.status_code == 429:
                results[i] = ("429", r.headers.get("retry-after"))
                return
            assert r.status_code == 202, r.text
            final = None
            with c.stream("GET", f"/v1/jobs/{r.json()['id']}/events") as ev:  # no polling: the events end it
                for line in ev.iter_lines():
                    if line.startswith("data: "):
                        final = json.loads(line[6:])
                        if final["state"] in ("done", "failed", "cancelled"):
                            break
            assert final is not None
            results[i] = (final["state"], final.get("infotexts"))

    def a1111(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=180) as c:
            start.wait(30)
            b = body(i)
            r = c.post("/sdapi/v1/txt2img", json={**b, "sampler_name": "DPM++ 2M", "scheduler": "Karras"})
            if r.status_code == 429:
                results[i] = ("429", r.headers.get("retry-after"))
                return
            assert r.status_code == 200, r.text
            info = json.loads(r.json()["info"])
            results[i] = ("done" if len(r.json()["images"]) == 1 else "no image", info["infotexts"])

    threads = [threading.Thread(target=native if i % 2 else a1111, args=(i,)) for i in range(CLIENTS)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    assert not any(t.is_alive() for t in threads) and time.monotonic() - t0 < 200
    assert sorted(results) == list(range(CLIENTS))  # every client got an answer
    done = [i for i, (s, _) in results.items() if s == "done"]
    refused = [i for i, (s, _) in results.items() if s == "429"]
    assert len(done) + len(refused) == CLIENTS, results
    assert len(done) >= 7 and refused  # the queue (6) and the worker took some, the rest were told to retry
    for i in refused:
        assert int(results[i][1]) >= 1  # Retry-After
    for i in done:
        texts = results[i][1]
        assert len(texts) == 1 and texts[0].startswith(f"item number {i}\n") and f"Seed: {1000 + i}," in texts[0]
    assert server.services.manager.queued_count() == 0
    assert proc.memory_info().rss - rss0 < 400 * 2**20
