"""End-to-end generation time, sdengine vs diffusers, same run, same weights: now ``sdengine bench``.

Kept as a thin wrapper so that older commands still work. The defaults here are the random MEDIUM SD1
model at 128x128, 20 steps DPM++ 2M, CFG 7.5; every flag is passed on to ``sdengine bench`` (see
docs/performance.md), e.g. ``.venv/bin/python benchmarks/pipeline.py --steps 10 --repeats 2``.
"""

from __future__ import annotations

import sys

from sdengine.cli import main

DEFAULTS = ["--random", "medium", "--size", "128", "--steps", "20"]

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--model" in args:
        DEFAULTS = DEFAULTS[2:]  # a folder instead of the random model
    sys.exit(main(["bench", *DEFAULTS, *args]))
