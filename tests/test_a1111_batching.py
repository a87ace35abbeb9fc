"""Request batching of the A1111 routes: /sdapi/v1/txt2img and /sdapi/v1/img2img jobs that differ only in prompt,
negative prompt, seed and batch size (and, for img2img / inpainting, in the init image and mask) run as ONE
pipeline call, each job's images, infotexts and seeds equal to the same request on a server that never batches.

Against live servers on 127.0.0.1 (the emoji model, 64x64), through the webuiapi client, whose loader hands out a
recording wrapper of the shared pipeline (tests/_live_server.py's Recorder): it records each call, so a test sees
which jobs shared one, and holds the first call on a gate while the test queues the others behind it.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from _live_server import Recorder, live_server, server_config
from sdengine.server.jobs import Job, batch_key
from sdengine.server.requests import Generation

# the bar of the native batches (tests/test_server_batching.py); measured here at most 6.5e-6 (txt2img, Euler a),
# 5.8e-6 (img2img), 3.7e-6 (inpainting) and 1.7e-6 (the tiny SDXL model)
ROW_TOL = 1e-4
COMMON: dict[str, Any] = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 5.0, "sampler_name": "Euler a"}
BLOCKER = {"prompt": "a hold", "steps": 1, "width": 64, "height": 64, "seed": 0}  # native, steps differ: alone


def ramp(w: int = 64, h: int = 64) -> Image.Image:
    return Image.fromarray(np.tile(np.linspace(0, 255, w, dtype=np.uint8)[None, :, None], (h, 1, 3)))


def box(x0: int, y0: int, x1: int, y1: int) -> Image.Image:
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (x0, y0, x1, y1))
    return m


def call(api: webuiapi.WebUIApi, kind: str, kw: dict[str, Any]) -> Any:
    return api.txt2img(**kw) if kind == "txt2img" else api.img2img(**kw)


def queued_behind_a_blocker(tmp, rec: Recorder, requests: list[tuple[str, dict[str, Any]]], **config: Any) -> list:
    """Each (route, webuiapi keywords) request sent while a native job holds the worker, one after another in the
    queue (each request waits until the one before is queued), then the gate opens; the webuiapi results in order
    (an exception where the request failed)."""
    out: list[Any] = [None] * len(requests)
    with live_server(server_config(tmp, max_queue=32, **config), loader=lambda ref, device: rec) as s:
        manager = s.services.manager
        rec.gate.clear()
        assert httpx.post(f"{s.url}/v1/jobs", json=BLOCKER, timeout=60).status_code == 202
        deadline = time.monotonic() + 60
        while not rec.calls:  # the blocker is in the pipeline
            assert time.monotonic() < deadline
            time.sleep(0.02)

        def send(k: int, kind: str, kw: dict[str, Any]) -> None:
            try:
                out[k] = call(webuiapi.WebUIApi(host="127.0.0.1", port=s.port), kind, kw)
            except Exception as e:  # noqa: BLE001 - the test looks at it
                out[k] = e

        threads = []
        for k, (kind, kw) in enumerate(requests):
            t = threading.Thread(target=send, args=(k, kind, kw), daemon=True)
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
    """The same requests on a server that never batches (--max-batch 1), one after another."""
    rec = Recorder()
    with live_server(server_config(tmp, max_queue=32, max_batch_jobs=1), loader=lambda ref, device: rec) as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
        return rec, [call(api, kind, kw) for kind, kw in requests]


def prompts(rec: Recorder) -> list[Any]:
    return [k["prompt"] for k in rec.calls[1:]]


def assert_equal_alone(batched: Any, single: Any, batch_arrays: np.ndarray, alone_arrays: np.ndarray) -> None:
    """A job's answer from a batch against the same request alone: the pipeline's rows within ROW_TOL, the served
    images within one 8-bit level, the infotexts and seeds exactly."""
    assert float(np.abs(batch_arrays - alone_arrays).max()) <= ROW_TOL
    for key in ("infotexts", "all_seeds", "all_prompts", "all_negative_prompts", "seed", "width", "height"):
        assert batched.info[key] == single.info[key], key
    assert len(batched.images) == len(single.images)
    for a, b in zip(batched.images, single.images, strict=True):
        assert a.size == b.size
        diff = np.abs(np.asarray(a.convert("RGB")).astype(int) - np.asarray(b.convert("RGB")).astype(int))
        assert int(diff.max()) <= 1


def test_a1111_txt2img_jobs_share_a_call_and_each_equals_its_request_alone(tmp_path):
    requests = [
        ("txt2img", {**COMMON, "prompt": "a red apple", "seed": 11}),
        ("txt2img", {**COMMON, "prompt": "a blue car", "negative_prompt": "blurry", "seed": 20, "batch_size": 2}),
        ("txt2img", {**COMMON, "prompt": "a green tree", "seed": 31, "override_settings": {"sd_vae": "Automatic"}}),
        ("txt2img", {**COMMON, "prompt": "a [cat:dog:2]", "negative_prompt": "dark", "seed": 41}),
    ]
    rec = Recorder()
    got = queued_behind_a_blocker(tmp_path / "b", rec, requests)
    assert prompts(rec) == [["a red apple", "a blue car", "a blue car", "a green tree", "a [cat:dog:2]"]]
    assert rec.calls[1]["seed"] == [11, 20, 21, 31, 41]
    single_rec, single = alone(tmp_path / "a", requests)
    assert len(single_rec.calls) == len(requests)  # one call per request
    batch, row = rec.results[1].arrays, 0
    for (_, kw), g, s, res in zip(requests, got, single, single_rec.results, strict=True):
        n = kw.get("batch_size", 1)
        assert_equal_alone(g, s, batch[row : row + n], res.arrays)
        assert g.info["all_seeds"] == [kw["seed"] + k for k in range(n)]
        row += n


def test_a1111_jobs_differing_in_one_setting_never_share_a_call(tmp_path):
    base = {**COMMON, "seed": 5}
    variants: list[tuple[str, dict[str, Any]]] = [
        ("clip skip", {"override_settings": {"CLIP_stop_at_last_layers": 2}}),
        ("sampler", {"sampler_name": "DPM++ 2M"}),
        ("schedule", {"scheduler": "Karras"}),
        ("cfg", {"cfg_scale": 6.0}),
        ("steps", {"steps": 2}),
        ("hires fix", {"enable_hr": True, "hr_scale": 1.5, "hr_second_pass_steps": 1, "denoising_strength": 0.5}),
        ("tiling", {"tiling": True}),
        ("ensd", {"override_settings": {"eta_noise_seed_delta": 31337}}),
        ("variation", {"subseed": 3, "subseed_strength": 0.5}),
        ("n_iter", {"n_iter": 2}),
        ("size", {"width": 72}),
    ]
    requests = [("txt2img", {**base, "prompt": "first"})]
    requests += [("txt2img", {**base, "prompt": name, **change}) for name, change in variants]
    requests += [("txt2img", {**base, "prompt": "twin"})]  # the first's settings: joins it over all the others
    rec = Recorder()
    got = queued_behind_a_blocker(tmp_path, rec, requests)
    assert all(not isinstance(g, Exception) for g in got), got
    want = [["first", "twin"]] + [name for name, _ in variants]
    want.insert(want.index("n_iter") + 1, "n_iter")  # its two iterations: two calls of its own
    assert prompts(rec) == want
    # face restoration is refused before any job is queued
    with live_server(server_config(tmp_path / "r", max_queue=4)) as s:
        r = httpx.post(f"{s.url}/sdapi/v1/txt2img", json={**base, "prompt": "x", "restore_faces": True}, timeout=60)
        assert r.status_code == 422 and "restore_faces" in r.text
        assert s.services.manager.jobs() == []


def test_a1111_img2img_and_inpainting_jobs_share_calls_and_each_equals_its_request_alone(tmp_path):
    red, grad = Image.new("RGB", (64, 64), "red"), ramp()
    i2i = {**COMMON, "denoising_strength": 0.6}
    inpaint = {**i2i, "inpainting_fill": 1, "mask_blur": 4}
    requests = [
        ("img2img", {**i2i, "images": [grad], "prompt": "an apple", "seed": 11}),
        ("img2img", {**i2i, "images": [red], "prompt": "a car", "seed": 20, "batch_size": 2}),
        # inpainting, the whole picture and "only masked" (each job's own crop, scaled and pasted back), other blurs
        ("img2img", {**inpaint, "images": [grad], "mask_image": box(16, 16, 48, 48), "prompt": "a cat", "seed": 5}),
        ("img2img", {**inpaint, "images": [red], "mask_image": box(0, 0, 32, 64), "prompt": "a dog", "seed": 6,
                     "mask_blur": 2}),
        ("img2img", {**inpaint, "images": [grad], "mask_image": box(8, 24, 40, 40), "prompt": "a fox", "seed": 7,
                     "inpaint_full_res": True, "inpaint_full_res_padding": 4}),
        ("img2img", {**inpaint, "images": [red], "mask_image": box(30, 4, 60, 30), "prompt": "an owl", "seed": 8,
                     "inpaint_full_res": True, "inpaint_full_res_padding": 8}),
    ]  # fmt: skip
    rec = Recorder()
    got = queued_behind_a_blocker(tmp_path / "b", rec, requests)
    assert prompts(rec) == [["an apple", "a car", "a car"], ["a cat", "a dog", "a fox", "an owl"]]
    assert len(rec.calls[2]["init_image"]) == len(rec.calls[2]["mask"]) == 4
    single_rec, single = alone(tmp_path / "a", requests)
    assert len(single_rec.calls) == 6
    rows = [(1, 0, 1), (1, 1, 3), (2, 0, 1), (2, 1, 2), (2, 2, 3), (2, 3, 4)]
    for (call_no, a, b), g, s, res in zip(rows, got, single, single_rec.results, strict=True):
        assert_equal_alone(g, s, rec.results[call_no].arrays[a:b], res.arrays)
    assert "Mask blur: 4" in got[2].info["infotexts"][0] and "Mask blur: 2" in got[3].info["infotexts"][0]
    # the overlay / crop are the job's own: its answer keeps its own init image outside its mask
    for k, init in ((2, grad), (3, red), (4, grad), (5, red)):
        corner = np.asarray(got[k].image.convert("RGB"))[63, 63].astype(int)
        assert np.abs(corner - np.asarray(init)[63, 63].astype(int)).max() <= 1, k


def _a1111_job(**generation: Any) -> Job:
    kw: dict[str, Any] = {
        "prompt": "a",
        "negative_prompt": "",
        "steps": 3,
        "sampler": "euler_a",
        "schedule": "uniform",
        "cfg_scale": 7.0,
        "seed": 1,
        "width": 64,
        "height": 64,
        "batch_size": 1,
        "init_image": Image.new("RGB", (64, 64)),
        "strength": 0.75,
        "mask": None,
        "mask_blur": 0.0,
        "controlnets": None,
        "loras": None,
        "clip_skip": 1,
        "image_cfg_scale": 1.5,
        "strength_rule": "a1111",
        "clip_skip_rule": "a1111",
    }
    kw.update(generation.pop("kwargs", {}))
    g = Generation(model="emoji", model_name="emoji", kwargs=kw, sdxl_options={"force_zeros_for_empty_prompt": True})
    for k, v in generation.items():
        setattr(g, k, v)
    return Job(g, protocol="a1111")


def test_batch_key_of_a1111_jobs():
    base = batch_key(_a1111_job())
    assert base is not None
    # per job, not per call: the overlay / only-masked paste, the infotext's own entries, the prompts and seeds
    same = _a1111_job(finish=lambda im: im, infotext_extra={"Mask blur": "4"}, kwargs={"prompt": "b", "seed": 9})
    assert batch_key(same) == base
    assert batch_key(_a1111_job(kwargs={"image_cfg_scale": 1.2})) != base
    assert batch_key(_a1111_job(vae="/v/x.safetensors")) != base
    assert batch_key(_a1111_job(checkpoint_vae=True)) != base
    assert batch_key(_a1111_job(sdxl_options={"force_zeros_for_empty_prompt": False})) != base
    # alone: a script that calls the pipeline itself (SD upscale), n_iter > 1, a refiner, another hires model,
    # SDXL options beyond the empty-negative rule, and settings batch_key does not know (a latent mask, ...)
    for change in (
        {"script": lambda inner, **kw: inner(**kw)},
        {"n_iter": 2},
        {"refiner": "xl-refiner"},
        {"hr_model": "other"},
        {"sdxl_options": {"force_zeros_for_empty_prompt": True, "crop_coords_top_left": (8, 8)}},
        {"kwargs": {"latent_mask": Image.new("L", (64, 64))}},
        {"kwargs": {"enable_hr": True}},
        {"kwargs": {"noise_seed_delta": 31337}},
        {"kwargs": {"subseed": 3, "subseed_strength": 0.5}},
        {"kwargs": {"soft_inpainting": True, "mask": Image.new("L", (64, 64))}},
    ):
        assert batch_key(_a1111_job(**change)) is None, change


def test_sd_upscale_jobs_never_share_a_call(tmp_path):
    """Two SD upscale requests of equal settings: each its own script (a call per tile), never one batch."""
    request = {**COMMON, "images": [ramp(32, 32)], "denoising_strength": 0.5, "script_name": "SD upscale",
               "script_args": [None, 16, 1, 2]}  # fmt: skip
    requests = [
        ("img2img", {**request, "prompt": "one", "seed": 1}),
        ("img2img", {**request, "prompt": "two", "seed": 2}),
    ]
    rec = Recorder()
    got = queued_behind_a_blocker(tmp_path, rec, requests)
    assert all(not isinstance(g, Exception) for g in got), got
    assert all(isinstance(p, str) for p in prompts(rec))  # no call of several jobs' rows
    assert {p for p in prompts(rec)} == {"one", "two"}


class SDXLRecorder(Recorder):
    """The Recorder over a tiny SDXL base whose conditioner does not zero an empty negative prompt by itself (as a
    model folder saying force_zeros_for_empty_prompt false), so that A1111's rule (zeros) changes a call."""

    def __init__(self, pipe: Any) -> None:
        super().__init__()
        self.pipe = pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from _sdxl_models import make_sdxl_folder
    from sdengine.pipeline import load_pipeline

    pipe = load_pipeline(make_sdxl_folder(tmp_path_factory.mktemp("xl") / "xl"), device="cpu")
    assert pipe.text_kind == "sdxl"
    pipe.conditioner.force_zeros = False
    return pipe


def test_a1111_sdxl_jobs_with_and_without_an_empty_negative_prompt_run_as_two_calls(tmp_path, sdxl_pipe):
    """A1111's empty-negative rule goes into a call (and its infotext) only when a row has an empty negative prompt:
    the jobs with one and the jobs without run as two calls, each infotext as its request's alone."""
    xl = {**COMMON, "width": 32, "height": 32}
    requests = [
        ("txt2img", {**xl, "prompt": "an apple", "seed": 1}),
        ("txt2img", {**xl, "prompt": "a car", "negative_prompt": "blurry", "seed": 2}),
        ("txt2img", {**xl, "prompt": "a tree", "seed": 3}),
        ("txt2img", {**xl, "prompt": "a star", "negative_prompt": "dark", "seed": 4}),
    ]
    rec = SDXLRecorder(sdxl_pipe)
    got = queued_behind_a_blocker(tmp_path / "b", rec, requests)
    assert prompts(rec) == [["an apple", "a tree"], ["a car", "a star"]]
    assert [k.get("sdxl") for k in rec.calls[1:]] == [{"force_zeros_for_empty_prompt": True}, None]
    single_rec = SDXLRecorder(sdxl_pipe)
    with live_server(server_config(tmp_path / "a", max_batch_jobs=1), loader=lambda ref, device: single_rec) as s:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=s.port)
        single = [call(api, kind, kw) for kind, kw in requests]
    for (call_no, row), g, s_, res in zip(
        ((1, 0), (2, 0), (1, 1), (2, 1)), got, single, single_rec.results, strict=True
    ):
        assert_equal_alone(g, s_, rec.results[call_no].arrays[row : row + 1], res.arrays)
    assert "SDXL options" in got[0].info["infotexts"][0] and "SDXL options" not in got[1].info["infotexts"][0]


class HeldAtStep(Recorder):
    """The Recorder, holding a call of several jobs' rows at ``step`` (before its callback looks at the jobs) until
    ``go`` is set: a test sends its interrupt and skip there, at a known step."""

    def __init__(self, step: int) -> None:
        super().__init__()
        self.step, self.reached, self.go = step, threading.Event(), threading.Event()

    def __call__(self, **kw: Any) -> Any:
        inner = kw.get("callback")
        if isinstance(kw["prompt"], list) and inner is not None:

            def callback(info: Any) -> bool:
                if info.step == self.step and not self.reached.is_set():
                    self.reached.set()
                    assert self.go.wait(120), "the test never let the batch go on"
                return bool(inner(info))

            kw = dict(kw, callback=callback)
        return super().__call__(**kw)


def test_interrupt_and_skip_of_batched_a1111_jobs(tmp_path):
    """/sdapi/v1/interrupt of one job of a running batch and /sdapi/v1/skip of another: the batch stops at the end
    of the step; the interrupted job answers `interrupted` with its preview, the skipped one is done without an image
    of its own (its last preview, as alone), and the third runs again alone, equal to its request alone."""
    bodies = [{**COMMON, "steps": 12, "prompt": p, "seed": 60 + k, "force_task_id": f"t{k}"} for k, p in
              enumerate(["a dog", "a cat", "a fox"])]  # fmt: skip
    rec = HeldAtStep(3)
    out: list[Any] = [None] * 3
    with live_server(server_config(tmp_path / "b", max_queue=16), loader=lambda ref, device: rec) as s:
        manager = s.services.manager
        rec.gate.clear()
        assert httpx.post(f"{s.url}/v1/jobs", json=BLOCKER, timeout=60).status_code == 202

        def send(k: int) -> None:
            out[k] = httpx.post(f"{s.url}/sdapi/v1/txt2img", json=bodies[k], timeout=300)

        threads = [threading.Thread(target=send, args=(k,), daemon=True) for k in range(3)]
        deadline = time.monotonic() + 120
        for k, t in enumerate(threads):
            t.start()
            while manager.queued_count() < k + 1:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        rec.gate.set()
        assert rec.reached.wait(120)
        assert httpx.post(f"{s.url}/sdapi/v1/interrupt", json={"id_task": "t1"}, timeout=60).status_code == 200
        assert httpx.post(f"{s.url}/sdapi/v1/skip", json={"id_task": "t2"}, timeout=60).status_code == 200
        rec.go.set()
        for t in threads:
            t.join(300)
    assert prompts(rec) == [["a dog", "a cat", "a fox"], "a dog"]
    assert [r.status_code for r in out] == [200, 200, 200]
    answers = [r.json() for r in out]
    infos = [json.loads(a["info"]) for a in answers]
    assert [i["interrupted"] for i in infos] == [False, True, False]
    assert [len(a["images"]) for a in answers] == [1, 1, 1]  # the two stopped ones: their previews
    one = {k: v for k, v in bodies[0].items() if k != "force_task_id"}
    single_rec, single = alone(tmp_path / "a", [("txt2img", one)])
    assert float(np.abs(rec.results[-1].arrays - single_rec.results[0].arrays).max()) <= ROW_TOL
    assert infos[0]["infotexts"] == single[0].info["infotexts"]
    assert infos[0]["all_seeds"] == single[0].info["all_seeds"] == [60]
