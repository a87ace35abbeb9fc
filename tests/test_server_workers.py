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


def queued_job(manager: Any, model: str) -> Any:
    from sdengine.server.jobs import Job
    from sdengine.server.requests import Generation

    job = Job(Generation(model, model, {"steps": 1, "batch_size": 1, "prompt": "x", "init_image": None}))
    manager.submit(job)
    return job


def test_a_free_worker_prefers_a_job_for_its_loaded_model_within_the_bound(tmp_path) -> None:
    """Queued jobs alternating between models made every worker switch models at every job (FIFO): a free worker
    now takes the oldest job for the model it has loaded, unless a job it would skip has waited the bound
    (FIFO then), and never overtakes a ComfyUI prompt; a worker with no model, or a bound of 0, is FIFO."""
    from sdengine.server.jobs import JobManager

    m = JobManager(loader=None, devices=["cpu", "cpu"], outputs_dir=tmp_path, max_queue=16, affinity_s=60)  # type: ignore[arg-type]
    a1, b1, a2, b2, a3 = (queued_job(m, x) for x in "ababa")
    assert m.take(0, model="a") == [a1]
    assert m.take(0, model="a") == [a2]  # FIFO gave b1: a switch to b and back
    assert m.take(0, model="b") == [b1]  # the other worker keeps its b
    assert m.take(0, model=None) == [b2]  # a worker with nothing loaded: the oldest
    b3, a4 = queued_job(m, "b"), queued_job(m, "a")
    b3.created -= 61  # b3 has waited past the bound: no job overtakes it any more
    assert m.take(0, model="a") == [a3]
    assert m.take(0, model="a") == [b3]
    comfy, a5 = queued_job(m, "b"), queued_job(m, "a")
    comfy.run_on = lambda worker: None  # a ComfyUI prompt: it may need any model
    assert m.take(0, model="a") == [a4]
    assert m.take(0, model="a") == [comfy]
    assert m.take(0, model="a") == [a5]
    fifo = JobManager(loader=None, devices=["cpu"], outputs_dir=tmp_path, max_queue=16, affinity_s=0)  # type: ignore[arg-type]
    first, _ = queued_job(fifo, "b"), queued_job(fifo, "a")
    assert fifo.take(0, model="a") == [first]


def test_one_worker_runs_queued_jobs_of_its_model_first_and_switches_once(tmp_path) -> None:
    """A live server, one worker, jobs for two models queued alternately behind a running one: the worker runs
    the jobs of its loaded model first and loads the other model once (FIFO: four switches)."""
    (tmp_path / "models" / "other").mkdir(parents=True)
    (tmp_path / "models" / "other" / "model_index.json").write_text("{}")
    for affinity, want in ((60.0, ["emoji"] * 3 + ["other"] * 2), (0.0, ["emoji", "other"] * 2 + ["emoji"])):
        loader = GatedPipelines()
        loads: list[str] = []

        def load(ref: str, device: str, loader: GatedPipelines = loader, loads: list[str] = loads) -> Any:
            loads.append(ref)
            pipe = loader("emoji", device)  # the other model is the emoji model too, under another name
            return pipe

        config = server_config(
            tmp_path / str(affinity),
            max_batch_jobs=1,
            max_queue=8,
            models_dir=tmp_path / "models",
            model_affinity_s=affinity,
        )
        with live_server(config, loader=load) as s, httpx.Client(base_url=s.url, timeout=120) as c:
            ids = [c.post("/v1/jobs", json={**BODY, "seed": 1}).json()["id"]]
            deadline = time.monotonic() + 60
            while loader.in_flight < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            for model in ("other", "emoji", "other", "emoji"):
                r = c.post("/v1/jobs", json={**BODY, "model": model})
                assert r.status_code == 202, r.text
                ids.append(r.json()["id"])
            loader.gate.set()
            done = sorted((wait_job(c, i) for i in ids), key=lambda d: d["started"])
        assert [d["state"] for d in done] == ["done"] * 5
        ran = [d["model"] for d in done]
        assert ran == want, (affinity, ran)
        assert [ref.rsplit("/", 1)[-1] for ref in loads] == [
            r for i, r in enumerate(want) if i == 0 or want[i - 1] != r
        ]


def test_queue_lookups_never_compare_the_requests_contents(tmp_path) -> None:
    """Jobs compared as dataclasses: finding a queued job's position (every event stream of every queued job does
    it whenever a job leaves the queue) or cancelling it compared it with each job ahead field by field, down to
    their decoded init images when the requests were otherwise equal (1.8 s for one lookup among 20 identical
    2048x2048 img2img jobs). A job is equal only to itself."""
    from sdengine.server.jobs import Job, JobManager
    from sdengine.server.requests import Generation

    class NotToCompare:
        def __eq__(self, other: object) -> bool:
            raise AssertionError("a request's image was compared")

        __hash__ = object.__hash__

    m = JobManager(loader=None, devices=["cpu"], outputs_dir=tmp_path, max_queue=8)  # type: ignore[arg-type]
    kwargs = {"steps": 1, "batch_size": 1, "prompt": "x", "seed": 1}
    jobs = [Job(Generation("emoji", "emoji", {**kwargs, "init_image": NotToCompare()})) for _ in range(3)]
    for j in jobs:
        m.submit(j)
    assert [m.position(j) for j in jobs] == [0, 1, 2]
    m.cancel(jobs[1])
    assert jobs[1].state == "cancelled" and [m.position(j) for j in jobs] == [0, None, 1]
    assert m.take(0, model="emoji") == [jobs[0]]


def test_a_worker_holds_only_the_second_models_a_job_runs() -> None:
    """A hires model (A1111's hr_checkpoint_name) is loaded beside the job's model as the refiner is, and kept for
    the next job that names it; a kept refiner or hires model the job does not name is freed before another
    load (the device holds at most the models one job runs), and a model named as both is one copy."""
    from types import SimpleNamespace

    from sdengine.server.jobs import Worker

    loads: list[str] = []

    def loader(model: str, device: str) -> Any:
        loads.append(model)
        return SimpleNamespace(name=model)

    w = Worker(SimpleNamespace(loader=loader), "cpu")  # type: ignore[arg-type]
    ref = w.refiner("R")
    assert w.hires_model("H", keep={"R"}).name == "H" and w.refiner_pipe is ref  # a job with both
    assert w.hires_model("H", keep={None}) is w.hr_pipe and loads == ["R", "H"]  # kept: no load
    w.hires_model("H2", keep={None})  # another hires model, no refiner in this job: the refiner is freed too
    assert (w.refiner_model, w.hr_model, loads) == (None, "H2", ["R", "H", "H2"])
    assert w.refiner("H2", keep={None}).name == "H2" and loads == ["R", "H", "H2"]  # one copy in both roles
    assert w.hr_model is None and w.hires_model("H2", keep={"H2"}) is w.refiner_pipe
    w.refiner("R", keep={None})
    assert (w.refiner_model, w.hr_model, loads[-1]) == ("R", None, "R")
