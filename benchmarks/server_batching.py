"""Throughput of ``sdengine serve`` request batching: 4 compatible jobs submitted together, batched vs not.

Two live servers on 127.0.0.1 over the same loaded pipeline (the built-in emoji model, 64x64, CPU unless
``--device`` says otherwise): one with ``max_batch_jobs`` 4 (the default of ``--max-batch``), one with 1
(batching off). Each round submits 4 jobs with different prompts and seeds (same model, size, sampler,
steps, cfg) through ``POST /v1/jobs`` one after the other and times until the last one is done; the servers
alternate rounds, so that a change of machine load hits both. An idle worker starts the first job as soon as
it arrives (the server never waits to fill a batch), so the 4 jobs usually run as 1 + 3; the jobs per call
are printed. With ``--busy`` each round starts with a 1-step job (timed in both), so that the 4 arrive while the
worker is busy and run as one call. The pipeline's own 4-row call vs 4 single calls (no server) is timed
once, as the ceiling, in a thread as the server's worker calls it: on an oversubscribed CPU the same call
from the main thread was measured 15x slower than from another thread (OpenMP waiting).
Prints the median wall time per round, jobs per second and the ratio.

Run: ``.venv/bin/python benchmarks/server_batching.py [--steps 20] [--rounds 3] [--device cpu] [--busy]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from sdengine.pipeline import load_pipeline
from sdengine.server.app import create_app
from sdengine.server.config import ServerConfig

PROMPTS = ["a red apple", "a blue car", "a green tree", "a yellow star"]


def start(config: ServerConfig, loader: Any) -> tuple[uvicorn.Server, threading.Thread, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(config, loader=loader, preload=False)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    return server, thread, f"http://127.0.0.1:{port}"


def one_round(url: str, steps: int, seed0: int, groups: list[list[int]], busy: bool) -> float:
    with httpx.Client(base_url=url, timeout=600) as c:
        t0 = time.perf_counter()
        if busy:  # a 1-step job of its own first: the 4 arrive while the worker is busy
            c.post("/v1/jobs", json={"prompt": "busy", "steps": 1, "seed": 0, "width": 64, "height": 64})
        ids = [
            c.post(
                "/v1/jobs",
                json={"prompt": p, "steps": steps, "seed": seed0 + k, "width": 64, "height": 64, "cfg_scale": 5.0},
            ).json()["id"]
            for k, p in enumerate(PROMPTS)
        ]
        started = []
        for jid in ids:
            deadline = time.monotonic() + 600
            while (j := c.get(f"/v1/jobs/{jid}").json())["state"] not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline, "job did not finish"
                time.sleep(0.005)
            assert j["state"] == "done", j
            started.append(j["started"])
        took = time.perf_counter() - t0
        groups.append([started.count(t) for t in sorted(set(started))])  # jobs of one call share a start
        return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--busy", action="store_true", help="a 1-step job before the 4 in each round (timed too)")
    a = ap.parse_args()
    pipe = load_pipeline("emoji", device=a.device)
    pipe("warm-up", seed=0, steps=2, progress=False)
    loader = lambda ref, device: pipe  # noqa: E731 - both servers share the loaded model
    times: dict[int, list[float]] = {4: [], 1: []}
    groups: dict[int, list[list[int]]] = {4: [], 1: []}
    with tempfile.TemporaryDirectory() as d:
        servers = {
            n: start(ServerConfig(outputs_dir=Path(d) / str(n), devices=(a.device,), max_batch_jobs=n), loader)
            for n in times
        }
        try:
            for r in range(a.rounds):
                for n in times:
                    times[n].append(one_round(servers[n][2], a.steps, 100 * r, groups[n], a.busy))
        finally:
            for server, thread, _ in servers.values():
                server.should_exit = True
                thread.join(30)
    first = "after a 1-step job, " if a.busy else ""
    print(f"4 compatible jobs ({first}emoji 64x64, {a.steps} steps, {a.device}), {a.rounds} rounds, median per round:")
    for n, ts in times.items():
        m = statistics.median(ts)
        label = "batched (--max-batch 4)" if n > 1 else "one by one (--max-batch 1)"
        print(
            f"  {label:27s} {m:7.2f} s   {4 / m:6.2f} jobs/s   rounds: {', '.join(f'{t:.2f}' for t in ts)}; "
            f"jobs per call: {groups[n]}"
        )
    kw = {"steps": a.steps, "width": 64, "height": 64, "cfg_scale": 5.0, "progress": False}
    timings: list[float] = []

    def ceiling() -> None:  # in a thread, as the server's worker calls the pipeline (see the docstring)
        t0 = time.perf_counter()
        pipe(PROMPTS, seed=[1, 2, 3, 4], **kw)
        timings.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for k, p in enumerate(PROMPTS):
            pipe(p, seed=1 + k, **kw)
        timings.append(time.perf_counter() - t0)

    th = threading.Thread(target=ceiling)
    th.start()
    th.join()
    t_rows, t_alone = timings
    print(
        f"  the pipeline alone, no server: one call of 4 rows {t_rows:.2f} s, 4 calls of 1 row {t_alone:.2f} s "
        f"({t_alone / t_rows:.2f}x)"
    )
    print(f"speed-up batched / one by one: {statistics.median(times[1]) / statistics.median(times[4]):.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
