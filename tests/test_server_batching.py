"""Request batching in ``sdengine serve``: compatible queued jobs run as ONE pipeline call, split back per job.

Against a live server on 127.0.0.1 (the emoji model, 64x64) whose loader hands out a recording wrapper of the
shared pipeline: it records every call the worker makes (so a test sees which jobs shared a call) and can hold
the first call on a gate, so that the jobs a test submits meanwhile are all queued together.
"""

from __future__ import annotations

import io
import time
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from _live_server import Recorder, free_port, live_server, server_config, shared_loader, wait_job
from sdengine.server.jobs import Job, batch_key
from sdengine.server.requests import Generation

BASE = {"prompt": "a red apple", "steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0}
BLOCKER = {"prompt": "a hold", "steps": 1, "width": 64, "height": 64, "seed": 0}  # steps differ: runs alone
# Rows of one batch equal the same job alone up to float32 summation-order noise of the batched matmuls
# (measured up to 3.1e-5 on the emoji model for a 4-row batch): well below one 8-bit level (3.9e-3).
ROW_TOL = 1e-4


@pytest.fixture()
def rec() -> Recorder:
    return Recorder()


def serve(tmp, rec: Recorder, **kw: Any):
    return live_server(server_config(tmp, max_queue=16, **kw), loader=lambda ref, device: rec)


def submit(client: httpx.Client, body: dict) -> str:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return r.json()["id"]


def pixels(client: httpx.Client, url: str) -> np.ndarray:
    r = client.get(url)
    assert r.status_code == 200
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))


def single_call_kwargs(batch_kw: dict[str, Any], prompt: str, negative: str, seed: int, n: int) -> dict[str, Any]:
    kw = {k: v for k, v in batch_kw.items() if k not in ("callback", "progress")}
    return dict(kw, prompt=prompt, negative_prompt=negative, seed=seed, batch_size=n, progress=False)


def test_compatible_jobs_run_as_one_call_and_equal_each_job_alone(tmp_path, rec):
    jobs = [
        {**BASE, "prompt": "a red apple", "seed": 11},
        {**BASE, "prompt": "a blue car", "negative_prompt": "blurry", "seed": 20, "batch_size": 2},
        {**BASE, "prompt": "a green tree", "seed": 31},
        {**BASE, "prompt": "a yellow star", "negative_prompt": "dark", "seed": 41},
    ]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        rec.gate.clear()
        blocker = submit(c, BLOCKER)
        ids = [submit(c, b) for b in jobs]
        rec.gate.set()
        assert wait_job(c, blocker)["state"] == "done"
        done = [wait_job(c, i) for i in ids]
        assert [d["state"] for d in done] == ["done"] * 4, done
        # One call after the blocker's, one row per image, each job's rows consecutive with its own seeds.
        assert len(rec.calls) == 2, [k["prompt"] for k in rec.calls]
        kw = rec.calls[1]
        assert kw["prompt"] == ["a red apple", "a blue car", "a blue car", "a green tree", "a yellow star"]
        assert kw["negative_prompt"] == ["", "blurry", "blurry", "", "dark"]
        assert kw["seed"] == [11, 20, 21, 31, 41]
        batch = rec.results[1]
        row = 0
        for body, d in zip(jobs, done, strict=True):
            n = body.get("batch_size", 1)
            assert d["step"] == d["steps"] == 3 and len(d["images"]) == n
            alone = rec.pipe(**single_call_kwargs(kw, body["prompt"], body.get("negative_prompt", ""), body["seed"], n))
            assert float(np.abs(batch.arrays[row : row + n] - alone.arrays).max()) <= ROW_TOL
            assert d["infotexts"] == alone.infotexts  # its own prompt, negative prompt and seeds
            assert [im["seed"] for im in d["images"]] == alone.seeds
            for k, im in enumerate(d["images"]):
                served = pixels(c, im["url"])
                assert np.array_equal(served, np.asarray(batch.images[row + k]))  # the split is the right row
                assert int(np.abs(served.astype(int) - np.asarray(alone.images[k]).astype(int)).max()) <= 1
            row += n


def test_incompatible_jobs_are_not_batched_and_max_batch_1_turns_it_off(tmp_path, rec):
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        rec.gate.clear()
        blocker = submit(c, BLOCKER)
        x = submit(c, {**BASE, "steps": 2, "seed": 1})
        y = submit(c, {**BASE, "steps": 3, "seed": 2})  # other step count
        z = submit(c, {**BASE, "steps": 2, "cfg_scale": 3.0, "seed": 3})  # other cfg
        w = submit(c, {**BASE, "steps": 2, "prompt": "a cat", "seed": 4})  # compatible with x
        rec.gate.set()
        for i in (blocker, x, y, z, w):
            assert wait_job(c, i)["state"] == "done"
    prompts = [(k["prompt"], k["steps"], k["cfg_scale"]) for k in rec.calls]
    assert prompts == [
        ("a hold", 1, 7.5),
        (["a red apple", "a cat"], 2, 5.0),  # x and the later w; y and z waited their turn, alone
        ("a red apple", 3, 5.0),
        ("a red apple", 2, 3.0),
    ]

    rec2 = Recorder()
    with serve(tmp_path / "off", rec2, max_batch_jobs=1) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        rec2.gate.clear()
        ids = [
            submit(c, BLOCKER),
            submit(c, {**BASE, "steps": 2, "seed": 1}),
            submit(c, {**BASE, "steps": 2, "seed": 2}),
        ]
        rec2.gate.set()
        assert [wait_job(c, i)["state"] for i in ids] == ["done"] * 3
    assert [k["seed"] for k in rec2.calls] == [0, 1, 2]


def test_cancel_of_one_batched_job_leaves_the_others_done(tmp_path, rec):
    bodies = [{**BASE, "steps": 8, "prompt": p, "seed": 50 + k} for k, p in enumerate(["a dog", "a cat", "a fox"])]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        rec.gate.clear()
        blocker = submit(c, BLOCKER)
        ids = [submit(c, b) for b in bodies]
        rec.gate.set()
        assert wait_job(c, blocker)["state"] == "done"
        deadline = time.monotonic() + 120
        while c.get(f"/v1/jobs/{ids[1]}").json()["step"] < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert all(c.get(f"/v1/jobs/{i}").json()["state"] == "running" for i in ids)
        gone = c.delete(f"/v1/jobs/{ids[1]}").json()
        assert gone["state"] == "cancelled" and gone["images"] == []
        left = [wait_job(c, ids[0]), wait_job(c, ids[2])]
        assert [d["state"] for d in left] == ["done", "done"]
        assert c.get(f"/v1/jobs/{ids[1]}").json()["state"] == "cancelled"
    assert rec.calls[1]["prompt"] == ["a dog", "a cat", "a fox"]  # the batch that was stopped
    assert rec.calls[2]["prompt"] == ["a dog", "a fox"] and rec.calls[2]["seed"] == [50, 52]  # the others, again
    assert len(rec.calls) == 3
    for d, body, k in zip(left, (bodies[0], bodies[2]), (0, 1), strict=True):
        assert len(d["images"]) == 1 and d["step"] == d["steps"] == 8
        assert d["infotexts"] == [rec.results[-1].infotexts[k]]
        assert f"Seed: {body['seed']}" in d["infotexts"][0] and body["prompt"] in d["infotexts"][0]


def _job(**changes: Any) -> Job:
    kw: dict[str, Any] = {
        "prompt": "a",
        "negative_prompt": "",
        "steps": 3,
        "sampler": "dpmpp_2m",
        "schedule": "karras",
        "cfg_scale": 5.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "init_image": None,
        "strength": 0.75,
        "mask": None,
        "mask_blur": 0.0,
        "controlnets": None,
        "loras": None,
        "clip_skip": 1,
    }
    n_iter = changes.pop("n_iter", 1)
    model = changes.pop("model", "emoji")
    kw.update(changes)
    return Job(Generation(model=model, model_name=model, kwargs=kw, n_iter=n_iter))


def test_batch_key_is_conservative():
    base = batch_key(_job())
    assert base is not None
    # Per-row fields may differ.
    assert batch_key(_job(prompt="b", negative_prompt="x", seed=9, batch_size=3)) == base
    # Every per-call setting must be equal.
    for change in (
        {"model": "other"},
        {"steps": 4},
        {"sampler": "euler"},
        {"schedule": None},
        {"cfg_scale": 5.5},
        {"width": 72},
        {"height": 72},
        {"clip_skip": 2},
        {"strength": 0.5},
        {"mask_blur": 1.0},
        {"loras": [("/l/a.safetensors", 0.5)]},
        {"guess_mode": True},
    ):
        assert batch_key(_job(**change)) != base, change
    assert batch_key(_job(loras=[("/l/a.safetensors", 0.5)])) == batch_key(_job(loras=[("/l/a.safetensors", 0.5)]))
    assert batch_key(_job(loras=[("/l/a.safetensors", 0.5)])) != batch_key(_job(loras=[("/l/a.safetensors", 0.6)]))
    # Never batched: several iterations, ControlNets, a setting it does not know (an init image or mask: another
    # batch, tests/test_img2img_batching.py).
    img = Image.new("RGB", (64, 64))
    assert batch_key(_job(init_image=img)) not in (None, base)
    for change in (
        {"n_iter": 2},
        {"controlnets": [("/c/cn.safetensors", img, 1.0, 0.0, 1.0)]},
        {"vae_tiling": True},
    ):
        assert batch_key(_job(**change)) is None, change


def test_max_batch_below_1_is_refused(capsys):
    from sdengine.cli import main

    assert main(["serve", "--max-batch", "0", "--port", str(free_port())]) == 2
    assert "--max-batch must be >= 1, got 0" in capsys.readouterr().err


def test_a_note_about_one_jobs_prompt_stays_with_that_job(tmp_path, rec):
    """A note the pipeline makes about one prompt (BREAK read as a space, a prompt longer than the context) went to
    every job of the batch, so that a job's notes depended on what it was batched with; each job now gets the
    notes it gets alone."""
    long = "a " + " ".join(f"word{k}" for k in range(40))  # over the emoji model's 32-token context
    jobs = [
        {**BASE, "prompt": "a red apple BREAK on a table", "seed": 1},
        {**BASE, "prompt": long, "seed": 2},
        {**BASE, "prompt": "a plain cat", "seed": 3},
    ]
    with serve(tmp_path, rec) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        rec.gate.clear()
        blocker = submit(c, BLOCKER)
        ids = [submit(c, b) for b in jobs]
        rec.gate.set()
        assert wait_job(c, blocker)["state"] == "done"
        batched = [wait_job(c, i)["notes"] for i in ids]
        assert len(rec.calls) == 2 and len(rec.calls[1]["prompt"]) == 3  # one batch
        assert len(set(rec.results[1].notes)) == 2  # the call made both notes
        alone = [wait_job(c, submit(c, b))["notes"] for b in jobs]  # one at a time: each runs alone
    assert len(rec.calls) == 5 and all(isinstance(k["prompt"], str) for k in rec.calls[2:])
    assert batched == alone, (batched, alone)
    assert ["BREAK" in " ".join(n) for n in alone] == [True, False, False] and alone[2] == []
    assert "tokens long" in " ".join(alone[1])


def test_a_long_job_that_finishes_last_keeps_its_images(tmp_path, monkeypatch):
    """Finished jobs beyond the newest few drop their images; "newest" was by submission, so a long job that
    finished after many later-submitted ones (two workers) lost its images the moment it finished, before its
    synchronous route (A1111, OpenAI) could answer with them."""
    from sdengine.server import jobs as jobs_module
    from sdengine.server.jobs import JobImage, JobManager

    monkeypatch.setattr(jobs_module, "KEEP_IMAGES", 2)
    m = JobManager(loader=shared_loader, devices=["cpu"], outputs_dir=tmp_path, max_queue=8)  # not started

    def job() -> Job:
        j = Job(Generation("emoji", "emoji", {"steps": 1, "batch_size": 1, "prompt": "x", "init_image": None}))
        m.submit(j)
        j.images.append(JobImage(Image.new("RGB", (8, 8)), 1, "x"))
        return j

    long_job, *short = [job() for _ in range(4)]
    for j in short:
        m.finish(j, "done")
        time.sleep(0.01)
    m.finish(long_job, "done")  # submitted first, finished last
    assert long_job.images[0].image is not None
    assert [j.images[0].image is None for j in short] == [True, True, False]  # the oldest finished dropped


def test_a_job_placed_ahead_tells_the_jobs_behind_it_their_new_place(tmp_path):
    """ComfyUI's ``front`` / ``number`` insert a prompt ahead of queued jobs: their watchers are told (a progress
    event with the new position), as when a job ahead leaves; the jobs ahead of the insertion are not."""
    from sdengine.server.jobs import JobManager

    m = JobManager(loader=shared_loader, devices=["cpu"], outputs_dir=tmp_path, max_queue=8)  # not started

    def job() -> Job:
        return Job(Generation("emoji", "emoji", {"steps": 1, "batch_size": 1, "prompt": "x", "init_image": None}))

    first, second, third = job(), job(), job()
    for j in (first, second, third):
        m.submit(j)
    before = {j.id: j.version for j in (first, second, third)}
    assert m.submit(job(), place=lambda queued: 1) == 1
    assert [m.position(j) for j in (first, second, third)] == [0, 2, 3]
    assert first.version == before[first.id]
    assert second.version > before[second.id] and third.version > before[third.id]


def test_each_batched_job_previews_its_own_row_when_asked(tmp_path, rec):
    """Lazy previews in a batch: nobody watched, so each job kept its own row's latents, decoded when asked; the
    two jobs' previews are their own rows (different prompts and seeds), each the model's full size."""
    rec.gate.clear()
    with serve(tmp_path, rec, max_batch_jobs=4) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        hold = submit(c, BLOCKER)  # runs alone; the next two wait and batch
        deadline = time.monotonic() + 60
        while len(rec.calls) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        ids = [submit(c, {**BASE, "prompt": p, "seed": s}) for p, s in (("a red apple", 3), ("a green pear", 9))]
        rec.gate.set()
        for i in (hold, *ids):
            assert wait_job(c, i)["state"] == "done"
        assert len(rec.calls) == 2 and rec.calls[1]["batch_size"] == 2  # the two ran as one call
        previews = []
        for i in ids:
            r = c.get(f"/v1/jobs/{i}/preview")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png"
            previews.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
        assert previews[0].shape == (64, 64, 3) and not np.array_equal(previews[0], previews[1])
