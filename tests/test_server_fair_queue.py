"""Every client's share of the queue: round robin between clients, ``--max-queued-per-client`` (429 + Retry-After),
and the client seen through a trusted proxy's X-Forwarded-For. No model is loaded: the worker is held in its loader.
"""

from __future__ import annotations

import threading
from typing import Any

import httpx
import pytest

from _live_server import live_server, server_config

JOB = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}


def queued(manager: Any, owner: str | None, model: str = "m") -> Any:
    from sdengine.server.jobs import Job
    from sdengine.server.requests import Generation

    job = Job(Generation(model, model, {"steps": 1, "batch_size": 1, "prompt": "x", "init_image": None}), owner=owner)
    manager.submit(job)
    return job


def manager(tmp_path: Any, **kw: Any) -> Any:
    from sdengine.server.jobs import JobManager

    kw.setdefault("max_queue", 64)
    return JobManager(loader=None, devices=["cpu"], outputs_dir=tmp_path, affinity_s=0, **kw)  # type: ignore[arg-type]


def test_round_robin_between_clients(tmp_path) -> None:
    """One client's ten queued jobs made a second client's one job wait behind all of them: now every client's
    k-th job runs before any client's (k+1)-th, a running job counting as its client's first turn."""
    m = manager(tmp_path)
    a = [queued(m, "A") for _ in range(4)]
    b1 = queued(m, "B")
    assert m.position(b1) == 1  # after A's first job, not after all four
    c1 = queued(m, "C")
    b2 = queued(m, "B")
    assert m.queued() == [a[0], b1, c1, a[1], b2, a[2], a[3]]
    assert [m.take(0)[0] for _ in range(2)] == [a[0], b1]
    # A's and B's jobs run; a new client's job goes ahead of their queued ones
    d1 = queued(m, "D")
    assert m.queued() == [c1, d1, a[1], b2, a[2], a[3]]
    # a job that has waited the bound is not overtaken any more: a stream of new clients cannot starve it
    m.queued()[-1].created -= 61  # A's last job
    e1 = queued(m, "E")
    assert m.queued()[-1] is e1
    # one client alone: FIFO as before
    solo = manager(tmp_path)
    jobs = [queued(solo, "A") for _ in range(3)]
    assert solo.queued() == jobs
    fifo = manager(tmp_path, fair=False)
    order = [queued(fifo, o) for o in "AAB"]
    assert fifo.queued() == order


def test_max_queued_per_client_is_429_for_that_client_only(tmp_path) -> None:
    from sdengine.server.errors import QueueFull

    m = manager(tmp_path, max_queued_per_client=2)
    queued(m, "A")
    queued(m, "A")
    with pytest.raises(QueueFull, match=r"already has 2 jobs waiting.*--max-queued-per-client 2") as e:
        queued(m, "A")
    assert e.value.status == 429 and e.value.retry_after >= 1
    queued(m, "B")  # another client still gets its share
    m.take(0)  # A's first job starts: A has one job waiting, so it may queue one more
    queued(m, "A")
    assert len(m.queued()) == 3


@pytest.fixture
def held_server(tmp_path):
    """A live server whose worker is held in its (failing) model load until the test lets it go."""
    gate = threading.Event()

    def loader(ref: str, device: str) -> Any:
        gate.wait(30)
        raise OSError("the test's loader loads nothing")

    cfg = server_config(tmp_path, max_queue=8, max_queued_per_client=2, devices=("cpu",))
    with live_server(cfg, loader=loader) as s:
        try:
            yield s
        finally:
            gate.set()


def test_a_client_over_its_share_gets_429_while_others_are_served(held_server) -> None:
    """Clients are told apart by address (here as a trusted local proxy forwards it in X-Forwarded-For)."""
    url = held_server.url
    with httpx.Client(base_url=url, timeout=30) as c:
        first = c.post("/v1/jobs", json=JOB, headers={"x-forwarded-for": "10.0.0.1"})
        assert first.status_code == 202
        manager = held_server.services.manager
        for _ in range(200):  # bounded: the worker takes the first job (and holds in its load)
            if manager.running():
                break
            threading.Event().wait(0.01)
        a = [c.post("/v1/jobs", json=JOB, headers={"x-forwarded-for": "10.0.0.1"}) for _ in range(3)]
        assert [r.status_code for r in a] == [202, 202, 429]
        assert int(a[2].headers["retry-after"]) >= 1
        assert "already has 2 jobs waiting" in a[2].json()["detail"]
        assert a[2].json()["error"]["type"] == "ClientQueueFull"
        b = c.post("/v1/jobs", json=JOB, headers={"x-forwarded-for": "10.0.0.2"})
        assert b.status_code == 202 and b.json()["position"] == 0  # ahead of A's second turn
        ids = [r.json()["id"] for r in a[:2]]
        as_a = {"x-forwarded-for": "10.0.0.1"}  # a client's jobs are its own (another one's GET is a 404)
        assert [c.get(f"/v1/jobs/{i}", headers=as_a).json()["position"] for i in ids] == [1, 2]
        # cancelling one of A's queued jobs gives A its room back
        assert c.delete(f"/v1/jobs/{ids[0]}", headers=as_a).json()["state"] == "cancelled"
        assert c.post("/v1/jobs", json=JOB, headers={"x-forwarded-for": "10.0.0.1"}).status_code == 202


def test_an_event_stream_whose_client_left_stops_watching_within_the_poll() -> None:
    """A stream waiting in silence (a queued job, a slow step) learnt that its client left only at its next
    keep-alive (15 s), the worker encoding previews for nobody meanwhile: it now asks every ``poll_s``, whatever
    the ASGI server does about disconnects; a stream whose client stays still gets its keep-alives."""
    import asyncio

    from sdengine.server.jobs import Job
    from sdengine.server.requests import Generation

    async def main() -> None:
        job = Job(Generation("m", "m", {"steps": 4, "batch_size": 1, "prompt": "x"}))
        gone = False

        async def is_disconnected() -> bool:
            return gone

        updates = job.updates(is_disconnected, keepalive_s=60.0)
        assert await anext(updates) is True and job.watched
        stay = job.updates(is_disconnected, keepalive_s=0.2, poll_s=0.05)
        assert await anext(stay) is True
        assert await asyncio.wait_for(anext(stay), 2.0) is False  # a keep-alive, no change
        await stay.aclose()
        pending = asyncio.ensure_future(anext(updates))
        await asyncio.sleep(0.1)
        assert not pending.done() and job.watched  # still there: waiting
        gone = True
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(pending, 2.0)  # within the poll (0.5 s), not the keep-alive (60 s)
        assert not job.watched

    asyncio.run(main())


def test_an_a1111_skip_of_a_queued_job_leaves_it_alone(held_server) -> None:
    """``/sdapi/v1/skip`` with the ``id_task`` of a job still queued set its skip flag, so its first batch was
    skipped at its first step once it ran (no image); A1111 clears a skip when a job begins: nothing is skipped."""
    manager = held_server.services.manager
    with httpx.Client(base_url=held_server.url, timeout=30) as c:
        c.post("/v1/jobs", json=JOB, headers={"x-forwarded-for": "10.0.0.9"})
        for _ in range(200):  # bounded: another client's job holds the worker
            if manager.running():
                break
            threading.Event().wait(0.01)
        body = {"prompt": "a star", "steps": 2, "width": 64, "height": 64, "force_task_id": "task-1"}
        waiting = threading.Thread(
            target=lambda: httpx.post(f"{held_server.url}/sdapi/v1/txt2img", json=body, timeout=5)
        )
        waiting.start()
        for _ in range(300):
            if manager.by_task_id("task-1") is not None:
                break
            threading.Event().wait(0.01)
        job = manager.by_task_id("task-1")
        assert job is not None and job.state == "queued"
        r = c.post("/sdapi/v1/skip", json={"id_task": "task-1"})
        assert r.status_code == 200 and r.json()["skipped"] == []
        assert not job.skip.is_set()
        assert c.post("/sdapi/v1/interrupt", json={"id_task": "task-1"}).json()["interrupted"] == ["task-1"]
        assert job.state == "cancelled"  # interrupting a queued job does take it out of the queue
        waiting.join(10)


def test_a_finished_state_is_never_seen_before_its_error(tmp_path) -> None:
    """A route that polls a job reads its error as soon as it sees a finished state; the manager once set the
    state first, so that an A1111 answer under load said only "failed" instead of the job's one line."""
    from sdengine.server.jobs import FAILED, FINISHED, Job

    seen: list[tuple[str, str | None, float | None]] = []

    class Watched(Job):
        def __setattr__(self, name: str, value: Any) -> None:
            if name == "state" and value in FINISHED:
                seen.append((value, self.error, self.finished))
            super().__setattr__(name, value)

    m = manager(tmp_path)
    job = Watched(queued(m, "A").generation, owner="A")
    m.finish(job, FAILED, "a VAE of 8 latent channels does not fit this model's 4")
    assert seen == [(FAILED, "a VAE of 8 latent channels does not fit this model's 4", job.finished)]
