"""Who may see and act on a job: its own client (its key's user when the server has several keys, else its address)
and the admin key; for anyone else another client's job is unknown (404 with the same one line as a job that does
not exist), on every protocol: the native routes and event stream, A1111's interrupt / skip / progress (through
``webuiapi``), ComfyUI's /queue, /interrupt, /history and websocket (through ``websocket-client``).

No model is loaded: the worker is held in its loader, so the first job stays running and the others queued.
"""

from __future__ import annotations

import io
import json
import threading
import time
from typing import Any

import httpx
import pytest
import websocket  # websocket-client, as ComfyUI's example client
import webuiapi
from PIL import Image

from _live_server import live_server, server_config

JOB = {"prompt": "a red apple", "steps": 2, "width": 64, "height": 64}
KEYS = {"api_key": "alice-key", "more_api_keys": ("bob-key",), "admin_key": "root-key"}
GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
    "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
    "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "an apple", "clip": ["4", 1]}},
    "3": {
        "class_type": "KSampler",
        "inputs": {
            "seed": 1,
            "steps": 2,
            "cfg": 5.0,
            "sampler_name": "euler",
            "scheduler": "normal",
            "denoise": 1.0,
            "model": ["4", 0],
            "positive": ["6", 0],
            "negative": ["6", 0],
            "latent_image": ["5", 0],
        },
    },
    "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
    "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "own", "images": ["8", 0]}},
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture()
def held(tmp_path):
    gate = threading.Event()

    def loader(ref: str, device: str) -> Any:
        gate.wait(30)
        raise OSError("the test's loader loads nothing")

    cfg = server_config(tmp_path, max_queue=8, devices=("cpu",), **KEYS)
    with live_server(cfg, loader=loader) as s:
        s.gate = gate  # type: ignore[attr-defined]
        try:
            yield s
        finally:
            gate.set()


def clients(url: str) -> tuple[httpx.Client, httpx.Client, httpx.Client]:
    return tuple(
        httpx.Client(base_url=url, timeout=30, headers=bearer(k)) for k in ("alice-key", "bob-key", "root-key")
    )  # type: ignore[return-value]


def test_another_clients_job_is_unknown_to_every_native_route(held) -> None:
    manager = held.services.manager
    alice, bob, admin = clients(held.url)
    with alice, bob, admin:
        running = alice.post("/v1/jobs", json=JOB).json()["id"]
        until(lambda: manager.running(), "the first job to start")
        queued = alice.post("/v1/jobs", json=JOB).json()["id"]
        unknown = bob.get("/v1/jobs/0123456789abcdef")
        assert unknown.status_code == 404
        for jid in (running, queued):
            for method, path in (
                ("GET", f"/v1/jobs/{jid}"),
                ("DELETE", f"/v1/jobs/{jid}"),
                ("GET", f"/v1/jobs/{jid}/events"),
                ("GET", f"/v1/jobs/{jid}/preview"),
            ):
                r = bob.request(method, path)
                # as a job that does not exist: the same status and line (the id is not confirmed)
                assert r.status_code == 404, (method, path, r.text)
                assert r.json()["detail"] == unknown.json()["detail"].replace("0123456789abcdef", jid)
                assert "\n" not in r.json()["detail"]
        assert manager.get(queued).state == "queued" and not manager.get(running).cancel.is_set()
        assert bob.get("/v1/jobs").json()["jobs"] == []
        assert {j["id"] for j in alice.get("/v1/jobs").json()["jobs"]} == {running, queued}
        assert alice.get(f"/v1/jobs/{queued}").json()["state"] == "queued"
        # the admin sees and cancels every client's jobs
        assert {j["id"] for j in admin.get("/v1/jobs").json()["jobs"]} == {running, queued}
        assert admin.delete(f"/v1/jobs/{queued}").json()["state"] == "cancelled"
        assert alice.get(f"/v1/jobs/{queued}").json()["state"] == "cancelled"


def test_a1111_interrupt_skip_and_progress_touch_only_the_callers_jobs(held) -> None:
    manager = held.services.manager
    body = {**JOB, "force_task_id": "alice-task"}
    waiting = threading.Thread(
        target=lambda: httpx.post(f"{held.url}/sdapi/v1/txt2img", json=body, headers=bearer("alice-key"), timeout=40)
    )
    waiting.start()
    until(lambda: manager.by_task_id("alice-task") is not None and manager.running(), "alice's job to run")
    job = manager.by_task_id("alice-task")
    bob = webuiapi.WebUIApi(host="127.0.0.1", port=held.port)
    bob.set_auth("bob", "bob-key")
    bob.interrupt()
    bob.skip()
    assert not job.cancel.is_set() and not job.skip.is_set()
    progress = bob.get_progress()
    assert progress["current_task"] is None and progress["state"]["job"] == ""
    with httpx.Client(base_url=held.url, timeout=30, headers=bearer("bob-key")) as b:
        assert b.post("/sdapi/v1/interrupt", json={"id_task": "alice-task"}).json() == {"interrupted": []}
        assert b.post("/internal/progress", json={"id_task": "alice-task"}).json()["textinfo"] == "unknown task"
    assert not job.cancel.is_set()
    alice = webuiapi.WebUIApi(host="127.0.0.1", port=held.port)
    alice.set_auth("alice", "alice-key")
    assert alice.get_progress()["current_task"] == "alice-task"
    alice.interrupt()
    assert job.cancel.is_set()
    held.gate.set()
    waiting.join(30)


def test_comfyui_queue_interrupt_and_history_are_the_callers_own(held) -> None:
    manager = held.services.manager
    alice, bob, admin = clients(held.url)
    with alice, bob, admin:
        running = alice.post("/prompt", json={"prompt": GRAPH}).json()["prompt_id"]
        until(lambda: manager.running(), "alice's prompt to run")
        pending = alice.post("/prompt", json={"prompt": GRAPH}).json()["prompt_id"]
        assert bob.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        mine = alice.get("/queue").json()
        assert [i[1] for i in mine["queue_running"]] == [running] and [i[1] for i in mine["queue_pending"]] == [pending]
        assert [i[1] for i in admin.get("/api/queue").json()["queue_pending"]] == [pending]
        bob.post("/queue", json={"delete": [pending]})
        bob.post("/queue", json={"clear": True})
        bob.post("/interrupt", content=b"")  # a global interrupt: the caller's running prompts only
        bob.post("/interrupt", json={"prompt_id": running})
        assert manager.get(pending).state == "queued" and not manager.get(running).cancel.is_set()
        alice.post("/queue", json={"delete": [pending]})
        assert manager.get(pending).state == "cancelled"
        held.gate.set()  # the running prompt fails (the loader loads nothing): a history entry of alice's
        until(lambda: running in alice.get("/history").json(), "alice's history entry")
        assert bob.get("/history").json() == {} and bob.get(f"/history/{running}").json() == {}
        bob.post("/history", json={"clear": True})
        bob.post("/history", json={"delete": [running]})
        assert list(alice.get(f"/api/history/{running}").json()) == [running]
        assert list(admin.get("/history").json()) == [running]
        admin.post("/history", json={"delete": [running]})
        assert alice.get("/history").json() == {}


def test_comfyui_websocket_events_reach_only_their_clients_sockets(held) -> None:
    """A socket cannot take another client's clientId (it would get that client's events and cut it off), and a
    prompt's events go only to its own client's sockets (and the admin's), also a broadcast without a client id."""
    from sdengine.server.comfy.routes import state

    url = f"ws://127.0.0.1:{held.port}/ws"
    alice_ws = websocket.create_connection(f"{url}?clientId=sock-a&token=alice-key", timeout=10)
    others = []
    try:
        assert json.loads(alice_ws.recv())["type"] == "status"
        with pytest.raises(websocket.WebSocketException):
            websocket.create_connection(f"{url}?clientId=sock-a&token=bob-key", timeout=10)
        bob_ws = websocket.create_connection(f"{url}?clientId=sock-b&token=bob-key", timeout=10)
        admin_ws = websocket.create_connection(f"{url}?token=root-key", timeout=10)
        others = [bob_ws, admin_ws]
        for ws in others:
            assert json.loads(ws.recv())["type"] == "status"
        with httpx.Client(base_url=held.url, timeout=30, headers=bearer("alice-key")) as alice:
            pid = alice.post("/prompt", json={"prompt": GRAPH, "client_id": "sock-a"}).json()["prompt_id"]
        job = held.services.manager.get(pid)
        until(lambda: job.state == "running", "alice's prompt to run")
        st = state(held.app)
        st.send("progress", {"value": 1, "max": 2, "prompt_id": pid}, None, job)  # as a prompt without a client id
        st.send("status", {"probe": True}, None)  # a queue status: every socket's

        def types(ws: Any) -> list[str]:
            got = []
            ws.settimeout(0.2)
            try:
                while True:
                    got.append(json.loads(ws.recv())["type"])
            except websocket.WebSocketTimeoutException:
                return got

        assert "progress" in types(alice_ws) and "progress" in types(admin_ws)
        bobs = types(bob_ws)
        assert "status" in bobs and "progress" not in bobs, bobs
    finally:
        for ws in [alice_ws, *others]:
            ws.close()


def test_one_key_or_none_keeps_the_address_as_the_client(tmp_path) -> None:
    """With one shared key (or none) a client is its address, as the fair queue counts it: two addresses (as a
    trusted local proxy forwards them) do not see each other's jobs; one address sees all of its own."""
    gate = threading.Event()

    def loader(ref: str, device: str) -> Any:
        gate.wait(30)
        raise OSError("nothing")

    with live_server(server_config(tmp_path, api_key="shared", devices=("cpu",)), loader=loader) as s:
        try:
            with httpx.Client(base_url=s.url, timeout=30, headers=bearer("shared")) as c:
                a = {"x-forwarded-for": "10.0.0.1"}
                jid = c.post("/v1/jobs", json=JOB, headers=a).json()["id"]
                assert c.get(f"/v1/jobs/{jid}", headers=a).status_code == 200
                assert c.get(f"/v1/jobs/{jid}", headers={"x-forwarded-for": "10.0.0.2"}).status_code == 404
        finally:
            gate.set()


def test_serve_refuses_a_key_given_twice(capsys, monkeypatch) -> None:
    import uvicorn

    from sdengine.cli import main

    def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server started")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    for args in (["--api-key", "k1", "--api-key", "k1"], ["--api-key", "k1", "--admin-key", "k1"]):
        assert main(["serve", *args, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert "must be different" in err and len(err.strip().splitlines()) == 1, err
    assert main(["serve", "--api-key", "k1", "--admin-key", "bad key", "--port", "1"]) == 2
    assert "--admin-key must be printable ASCII" in capsys.readouterr().err


def test_another_clients_upload_is_unknown_to_it(tmp_path) -> None:
    """Uploads were shared by every client that had a key (only their 32-hex ids kept them apart): an upload is
    now its client's, as a job is, and another client's id is answered as an id the server never had, on the
    native and A1111 routes; the admin may use any."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    app = create_app(server_config(tmp_path, devices=("cpu",), **KEYS), loader=lambda ref, device: None, preload=False)
    c = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: no worker runs, jobs stay queued
    if True:
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(buf, format="PNG")
        png = buf.getvalue()
        own = c.post("/v1/uploads", content=png, headers={"Content-Type": "image/png", **bearer("alice-key")})
        assert own.status_code == 201, own.text
        uid, unknown = own.json()["id"], "0" * 32

        def native(key: str, upload: str) -> httpx.Response:
            body = {**JOB, "init_image": upload, "strength": 0.5}
            return c.post("/v1/jobs", json=body, headers=bearer(key))

        def a1111(key: str, upload: str) -> httpx.Response:
            body = {**JOB, "init_images": [upload]}
            return c.post("/sdapi/v1/img2img", json=body, headers=bearer(key))

        for send in (native, a1111):
            theirs, never = send("bob-key", uid), send("bob-key", unknown)
            assert theirs.status_code == never.status_code == 400, (theirs.text, never.text)
            assert theirs.json()["detail"] == never.json()["detail"].replace(unknown, uid)
        assert native("alice-key", uid).status_code == 202
        assert native("root-key", uid).status_code == 202


def test_a_prompt_id_in_use_is_refused_with_one_answer_whoever_has_it(tmp_path) -> None:
    """ComfyUI queues a prompt_id it already has (the later run overwrites the history entry); here a client may
    reuse its own prompt_ids so, but never another client's: a ComfyUI prompt_id or history entry of another
    client, or any job id of the other APIs, is refused with one answer (400 "taken"), the same whoever has it
    (another client's job gave another line once, which told which ids were another client's). The admin may not
    overwrite a client's entry either; the other client's jobs and entries are untouched."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app
    from sdengine.server.comfy.routes import state

    app = create_app(server_config(tmp_path, devices=("cpu",), **KEYS), loader=lambda ref, device: None, preload=False)
    c = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: no worker runs, jobs stay queued
    alice, bob, root = bearer("alice-key"), bearer("bob-key"), bearer("root-key")
    theirs = c.post("/v1/jobs", json=JOB, headers=alice).json()["id"]
    own = c.post("/v1/jobs", json=JOB, headers=bob).json()["id"]
    for _ in range(2):  # alice's prompt_id "mine", queued twice
        r = c.post("/prompt", json={"prompt": GRAPH, "prompt_id": "mine"}, headers=alice)
        assert r.status_code == 200 and r.json()["prompt_id"] == "mine", r.text
    assert [e[1] for e in c.get("/queue", headers=alice).json()["queue_pending"]] == ["mine", "mine"]
    st = state(app)
    owner = next(j.owner for j in app.state.services.manager.jobs() if j.id == theirs)
    with st.lock:  # a finished prompt of alice's in the history
        st.history["done"], st.owners["done"] = {"prompt": [0, "done", {}, {}, []], "outputs": {}}, owner
    answers = {}
    for pid in ("mine", "done", theirs, own):
        r = c.post("/prompt", json={"prompt": GRAPH, "prompt_id": pid}, headers=bob)
        assert r.status_code == 400, r.text
        answers[pid] = r.json()["detail"].replace(pid, "ID")
    assert len(set(answers.values())) == 1 and "taken" in answers[own], answers
    for pid in ("mine", "done"):
        assert c.post("/prompt", json={"prompt": GRAPH, "prompt_id": pid}, headers=root).status_code == 400
    assert c.get("/queue", headers=bob).json()["queue_pending"] == []
    r = c.post("/prompt", json={"prompt": GRAPH, "prompt_id": "done"}, headers=alice)  # her history entry's id
    assert r.status_code == 200, r.text
    pending = [e[1] for e in c.get("/queue", headers=alice).json()["queue_pending"]]
    assert pending == ["mine", "mine", "done"] and "done" in c.get("/history", headers=alice).json()
    c.post("/queue", json={"delete": ["mine"]}, headers=alice)  # every queued prompt of that id
    assert [e[1] for e in c.get("/queue", headers=alice).json()["queue_pending"]] == ["done"]
    assert c.get(f"/v1/jobs/{theirs}", headers=alice).json()["state"] == "queued"


def test_a_prompt_id_queued_by_two_requests_at_once_queues_both(tmp_path, monkeypatch) -> None:
    """Two requests of one client with the same new prompt_id at once: both judge the id free, the job table takes
    the first under it; the second, told "taken" by the table, is judged again and queued under an id of its own
    (ComfyUI queues both), not answered 400."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    app = create_app(server_config(tmp_path, devices=("cpu",), **KEYS), loader=lambda ref, device: None, preload=False)
    c = TestClient(app, base_url="http://127.0.0.1")
    manager = app.state.services.manager
    assert c.post("/prompt", json={"prompt": GRAPH, "prompt_id": "race"}, headers=bearer("bob-key")).status_code == 200
    real, blind = manager.has_id, [True]

    def has_id(job_id: str) -> bool:  # the other request's check ran before the first job was in the table
        if blind and job_id == "race":
            blind.clear()
            return False
        return real(job_id)

    monkeypatch.setattr(manager, "has_id", has_id)
    r = c.post("/prompt", json={"prompt": GRAPH, "prompt_id": "race"}, headers=bearer("bob-key"))
    assert r.status_code == 200 and r.json()["prompt_id"] == "race", r.text
    ids = [j.id for j in manager.jobs() if getattr(j, "prompt_id", None) == "race"]
    assert len(ids) == 2 and ids[0] == "race" and ids[1].startswith("race#"), ids
    r = c.post("/prompt", json={"prompt": GRAPH, "prompt_id": "race"}, headers=bearer("alice-key"))
    assert r.status_code == 400 and "taken" in r.json()["detail"], r.text
