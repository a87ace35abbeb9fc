"""What the text-encoder cache (sdengine.text.encode_cache) saves when a prompt comes again.

1. SD 1.5's text encoder (CLIP ViT-L/14 shape, random weights): a prompt and negative prompt encoded as a
   generation encodes them (``encode_prompt_pair``), cold and then from the cache.
2. The built-in ``emoji`` model: one whole generation (64x64, 20 steps DPM++ 2M) of a repeated prompt with the
   cache off (``SDENGINE_TEXT_CACHE=0``) and on, interleaved.

Medians of ``--repeats``. Run: ``.venv/bin/python benchmarks/text_cache.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import sdengine
from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdengine.prompts import encode_prompt_pair
from sdengine.text import SD1_PAD_TOKEN_ID, CLIPTokenizer
from sdengine.text.encode_cache import clear

PROMPT = "a watercolor painting of a lighthouse on a cliff at dusk, (soft light:1.2), seagulls"
NEGATIVE = "blurry, low quality, text, watermark"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    te = CLIPTextModel(CLIPTextConfig()).eval()  # the defaults are CLIP ViT-L/14's text tower (SD 1.x)
    tok = CLIPTokenizer.load()

    def pair() -> None:
        encode_prompt_pair(te, tok, PROMPT, NEGATIVE, pad_token_id=SD1_PAD_TOKEN_ID)

    cold, warm = [], []
    with torch.inference_mode():
        pair()  # warm-up (allocator, oneDNN)
        for _ in range(args.repeats):
            clear()
            cold.append(timed(pair))
            warm.append(timed(pair))
    c, w = statistics.median(cold), statistics.median(warm)
    print(f"SD 1.5 text encoder, prompt + negative: cold {c * 1e3:.1f} ms, cached {w * 1e3:.2f} ms ({c / w:.0f}x)")

    pipe = sdengine.load_pipeline("emoji", device="cpu")
    call = {"steps": 20, "seed": 1, "width": 64, "height": 64, "progress": False}

    def generate() -> None:
        pipe("grinning face", "", **call)

    generate()  # warm-up
    off, on = [], []
    for _ in range(args.repeats):
        os.environ["SDENGINE_TEXT_CACHE"] = "0"
        off.append(timed(generate))
        os.environ.pop("SDENGINE_TEXT_CACHE")
        generate()  # fills the cache (once per repeat: cheap)
        on.append(timed(generate))
    a, b = statistics.median(off), statistics.median(on)
    print(f"emoji 64x64, 20 steps: cache off {a * 1e3:.0f} ms, on {b * 1e3:.0f} ms, saved {(a - b) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
