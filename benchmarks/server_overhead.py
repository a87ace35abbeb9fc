"""Per-request overhead of ``sdengine serve`` on loopback, against calling the same pipeline directly.

The model is trivial (a callable with the pipeline's signature that returns one 64x64 image at once, after
one step callback), so nearly all of the measured time is the server's: HTTP parsing, validation,
``build_generation``, the queue hand-off to the worker thread, the wake-up of the waiting request, PNG
encoding of the answer. Three ways are timed, one request at a time, on one keep-alive connection:

* direct: ``build_generation(...)`` + the trivial pipeline call + PNG encoding, in-process (the peer);
* A1111: ``POST /sdapi/v1/txt2img`` (one blocking request with the base64 PNG in the answer);
* native: ``POST /v1/jobs`` then ``GET /v1/jobs/{id}/events`` until the final event (two requests, and the
  image saved to the outputs folder as a PNG with its parameters).

``GET /healthz`` is timed too: the floor of one HTTP round trip (httpx client + uvicorn) on this machine.

Run: ``.venv/bin/python benchmarks/server_overhead.py [--n 300]``. Prints medians and the overhead
(server median - direct median) per request.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from sdengine.pipeline import GenerationResult, StepInfo
from sdengine.server.app import create_app
from sdengine.server.config import ServerConfig
from sdengine.server.requests import build_generation


class TrivialPipeline:
    """The pipeline's call signature, no model: one step callback, one flat image per row."""

    def __call__(
        self,
        prompt: str = "",
        negative_prompt: str = "",
        *,
        seed: int = 0,
        batch_size: int = 1,
        width: int | None = None,
        height: int | None = None,
        steps: int = 1,
        callback: Any = None,
        **_: Any,
    ) -> GenerationResult:
        import torch

        w, h = width or 64, height or 64
        if callback is not None:
            z = torch.zeros(batch_size, 4, h // 8, w // 8)
            callback(StepInfo(1, 1, 1.0, z, z))
        arr = np.full((batch_size, h, w, 3), 0.5, np.float32)
        images = [Image.fromarray((a * 255).astype(np.uint8)) for a in arr]
        seeds = [seed + i for i in range(batch_size)]
        params = {"prompt": prompt, "seed": seed}
        return GenerationResult(images, arr, params, seeds, [f"{prompt}\nSeed: {s}" for s in seeds])


def trivial_loader(ref: str, device: str) -> TrivialPipeline:
    return TrivialPipeline()


BODY = {"prompt": "a cat", "steps": 1, "seed": 1, "width": 64, "height": 64}


def median_ms(fn: Any, n: int) -> tuple[float, float]:
    """(median wall ms, mean CPU ms of this whole process - client, server and worker threads) per call.
    The CPU figure does not count waiting for a core, so it holds on a loaded machine; wall does not."""
    for _ in range(min(20, n)):
        fn()  # warm-up
    times = []
    c0 = time.process_time()
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000, (time.process_time() - c0) / n * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        config = ServerConfig(outputs_dir=Path(d), devices=("cpu",))
        app = create_app(config, loader=trivial_loader, preload=True)
        services = app.state.services
        pipe = TrivialPipeline()

        def direct() -> None:
            g = build_generation(
                config, services.catalog, services.uploads, model=None, **{k: v for k, v in BODY.items()}
            )
            result = pipe(**g.kwargs, callback=lambda info: True, progress=False)
            buf = io.BytesIO()
            result.images[0].save(buf, format="PNG")

        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:

                def a1111() -> None:
                    r = c.post("/sdapi/v1/txt2img", json={**BODY, "sampler_name": "DPM++ 2M"})
                    assert r.status_code == 200 and r.json()["images"]

                def native() -> None:
                    jid = c.post("/v1/jobs", json=BODY).json()["id"]
                    with c.stream("GET", f"/v1/jobs/{jid}/events") as ev:
                        for line in ev.iter_lines():
                            if line.startswith("event: done"):
                                break

                t_direct = median_ms(direct, a.n)
                t_floor = median_ms(lambda: c.get("/healthz"), a.n)
                t_a1111 = median_ms(a1111, a.n)
                t_native = median_ms(native, a.n)
        finally:
            server.should_exit = True
            thread.join(30)
    print(
        f"requests: {a.n} each, one at a time, loopback, trivial 64x64 model; wall = median, CPU = mean of "
        "this process (client + server)"
    )
    rows = [
        ("direct (build + call + PNG)", t_direct),
        ("HTTP floor GET /healthz", t_floor),
        ("A1111 POST /sdapi/v1/txt2img", t_a1111),
        ("native POST /v1/jobs + SSE events", t_native),
    ]
    for name, (wall, cpu) in rows:
        print(f"{name:36s} wall {wall:7.2f} ms   CPU {cpu:6.2f} ms")
    for name, (wall, cpu), floors in (("A1111", t_a1111, 1), ("native", t_native, 2)):
        print(
            f"{name} overhead over direct: wall {wall - t_direct[0]:6.2f} ms, CPU {cpu - t_direct[1]:6.2f} ms; "
            f"beyond {floors} HTTP floor(s): wall {wall - floors * t_floor[0] - t_direct[0]:6.2f} ms, "
            f"CPU {cpu - floors * t_floor[1] - t_direct[1]:6.2f} ms"
        )
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
