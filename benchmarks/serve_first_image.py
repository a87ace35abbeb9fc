"""A server's first image, timed from its process start: ``sdengine serve`` (the built-in emoji model) is started,
``/healthz`` polled until it answers, one 25-step job posted and polled until it is done.

    python benchmarks/serve_first_image.py SRC_DIR PORT

``SRC_DIR``: the ``src`` folder of the sdengine to run (so two checkouts compare in the same environment).
Binds 127.0.0.1 only; every wait is bounded.
"""

import os
import subprocess
import sys
import time

import httpx

src = sys.argv[1]
port = int(sys.argv[2])
env = dict(os.environ, PYTHONPATH=src)
t0 = time.time()
p = subprocess.Popen(
    [sys.executable, "-m", "sdengine", "serve", "--port", str(port), "--host", "127.0.0.1"],
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
    cwd="/tmp",
)
try:
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    t_ready = time.time()
    j = httpx.post(url + "/v1/jobs", json={"prompt": "a cat", "steps": 25, "seed": 1}, timeout=30).json()
    for _ in range(1200):
        s = httpx.get(f"{url}/v1/jobs/{j['id']}", timeout=5).json()
        if s["state"] in ("done", "failed"):
            break
        time.sleep(0.02)
    t_done = time.time()
    print(f"ready {t_ready - t0:.2f} s, first image {t_done - t0:.2f} s ({s['state']})")
finally:
    p.terminate()
    p.wait(timeout=30)
