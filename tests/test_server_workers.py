"""`sdengine serve --device D1,D2,...`: one worker per device in one process, all taking jobs from ONE queue.

On CPU the test gives the server two workers on "cpu" (each loads its own emoji pipeline) and holds every
pipeline call on a gate: two jobs are then running at the same time, one per worker, while a third waits in the
shared queue; when the gate opens every job finishes, each image is written once under its own name, and an image
equals the same request made alone (the worker a job lands on does not change its result).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import numpy as np
from PIL import Image

from _live_server import live_server, server_config, wait_job

BODY = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64, "cfg_scale": 5.0}


class GatedPipelines:
    """A loader: a fresh emoji pipeline per worker, every call held while ``gate`` is clear, calls in flight
    counted, and the thread (worker) of every call recorded."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most_in_flight = 0
        self.threads: list[int] = []
        self.loaded: list[Any] = []

    def __call__(self, ref: str, device: str) -> Any:
        from sdengine.pipeline import load_pipeline

        pipe = load_pipeline(ref, device=device)
        self.loaded.append(pipe)
        outer = self

        class Gated:
            def __getattr__(self, name: str) -> Any:
                return getattr(pipe, name)

            def __call__(self, **kw: Any) -> Any:
                with outer.lock:
                    outer.in_flight += 1
                    outer.most_in_flight = max(outer.most_in_flight, outer.in_flight)
                    outer.threads.append(threading.get_ident())
                try:
                    assert outer.gate.wait(120), "the test never opened the gate"
                    return pipe(**kw)
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

        return Gated()


def test_two_workers_share_one_queue(tmp_path) -> None:
    loader = GatedPipelines()
    config = server_config(tmp_path, devices=("cpu", "cpu"), max_batch_jobs=1, max_queue=8)
    with live_server(config, loader=loader) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        ids = []
        for seed in (1, 2, 3):
            r = c.post("/v1/jobs", json={**BODY, "seed": seed})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        deadline = time.monotonic() + 120
        while loader.most_in_flight < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loader.most_in_flight == 2  # two jobs running at once, one on each worker
        assert c.get(f"/v1/jobs/{ids[2]}").json()["state"] == "queued"  # the third waits in the shared queue
        loader.gate.set()
        done = [wait_job(c, i) for i in ids]
    assert [d["state"] for d in done] == ["done"] * 3, done
    assert len(set(loader.threads[:2])) == 2 and len(loader.loaded) == 2  # two workers, a pipeline each
    names = sorted(im["name"] for d in done for im in d["images"])
    files = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert names == files and len(files) == 3, (names, files)  # each image once, its own name, no temp files
    assert sorted(f.split("-")[1] for f in files) == ["1.png", "2.png", "3.png"]
    # The image equals the same request made alone, whichever worker ran it.
    alone = loader.loaded[0](**{**BODY, "seed": 2, "progress": False})
    served = next((tmp_path / "outputs").glob("*-2.png"))
    assert np.array_equal(np.asarray(Image.open(served).convert("RGB")), np.asarray(alone.images[0]))


def test_building_on_meta_in_one_thread_leaves_other_threads_alone() -> None:
    """Two workers load models at the same time: the meta-device build of one must not put another thread's
    parameters on meta, and the patched method is restored when both are done (it was left patched before)."""
    import torch

    from sdengine.weights.loading import parameters_on_meta

    original = torch.nn.Module.register_parameter
    inside, release = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def builder() -> None:
        with parameters_on_meta():
            seen["meta thread, first"] = torch.nn.Linear(2, 2).weight.device.type
            inside.set()
            assert release.wait(30)
            seen["meta thread, second"] = torch.nn.Linear(2, 2).weight.device.type

    def overlapping() -> None:
        with parameters_on_meta():
            seen["overlapping meta thread"] = torch.nn.Linear(2, 2).weight.device.type

    t = threading.Thread(target=builder)
    t.start()
    assert inside.wait(30)
    seen["plain thread"] = torch.nn.Linear(2, 2).weight.device.type  # while the other thread is inside
    u = threading.Thread(target=overlapping)
    u.start()
    u.join(30)
    release.set()
    t.join(30)
    assert seen == {
        "meta thread, first": "meta",
        "plain thread": "cpu",
        "overlapping meta thread": "meta",
        "meta thread, second": "meta",
    }
    assert torch.nn.Module.register_parameter is original
    assert torch.nn.Linear(2, 2).weight.device.type == "cpu"
