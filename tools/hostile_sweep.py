"""A sweep of hostile and careless inputs against ``sdengine generate`` and the Python API, on the shipped
``emoji`` model (64x64, 2 steps): every case must end as an image that is not black (exit 0) or as one line of a
named error (non-zero exit), within a time bound. Prints one line per case and a summary; exits 1 when any case
crashed (a traceback), hung, or wrote a black/non-finite image.

    PYTHONPATH=src python tools/hostile_sweep.py [--only SUBSTRING] [--timeout 120]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

BASE = ["--steps", "2", "--seed", "1", "--no-progress"]
EMOJI = Path(__file__).resolve().parents[1] / "src" / "sdengine" / "assets" / "models" / "emoji"
EMOJI_VAE, EMOJI_TINY = EMOJI / "vae", EMOJI / "vae_tiny"


class Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise Hang()


def png_with(path: Path, text: str | None) -> Path:
    info = PngImagePlugin.PngInfo()
    if text is not None:
        info.add_text("parameters", text)
    Image.new("RGB", (64, 64), (120, 30, 30)).save(path, pnginfo=info)
    return path


def cli_cases(tmp: Path) -> list[tuple[str, list[str]]]:
    import torch

    from sdengine.weights import save_safetensors

    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    huge = tmp / "huge.safetensors"
    save_safetensors(
        {f"{layer}.lora_down.weight": torch.full((2, 64), 1e30), f"{layer}.lora_up.weight": torch.ones(64, 2)}, huge
    )
    rank0 = tmp / "rank0.safetensors"
    save_safetensors(
        {f"{layer}.lora_down.weight": torch.ones(0, 64), f"{layer}.lora_up.weight": torch.ones(64, 0)}, rank0
    )
    big_alpha = tmp / "alpha.safetensors"
    save_safetensors(
        {
            f"{layer}.lora_down.weight": torch.ones(2, 64),
            f"{layer}.lora_up.weight": torch.ones(64, 2),
            f"{layer}.alpha": torch.tensor(1e30),
        },
        big_alpha,
    )
    loras = tmp / "loras"  # a LoRA folder; the crafted files lie next to it, outside
    loras.mkdir()
    init = png_with(tmp / "init.png", None)
    mask = tmp / "mask.png"
    Image.new("L", (64, 64), 255).save(mask)
    afile = tmp / "afile"
    afile.write_text("x")
    fields = "Steps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64"
    digits = "1" + "0" * 39
    return [
        ("ok: red heart", ["red heart"]),
        ("cfg 1e308", ["red heart", "--cfg", "1e308"]),
        ("cfg inf", ["red heart", "--cfg", "inf"]),
        ("cfg nan", ["red heart", "--cfg", "nan"]),
        ("cfg 101", ["red heart", "--cfg", "101"]),
        ("cfg 100 (allowed)", ["red heart", "--cfg", "100"]),
        ("weight (heart:1e39) is text", ["(heart:1e39)"]),
        ("weight 1e39 in digits", [f"(heart:{digits})"]),
        ("weight 1e39 in --negative", ["red heart", "--negative", f"(x:{digits})"]),
        ("weight -1e39", [f"(heart:-{digits})"]),
        ("nested weights 1e6", ["((((heart:100):100):100))"]),
        ("10000 (", ["(" * 10000 + "heart"]),
        ("10000 [", ["[" * 10000 + "heart"]),
        ("10000 (( in --negative", ["heart", "--negative", "(" * 10000]),
        ("<lora: x 5000", ["<lora:" * 5000]),
        ("invalid utf-8 byte", ["red \udcff heart"]),
        ("BREAK x 500", [" BREAK ".join(["heart"] * 500)]),
        ("--lora emoji-fruit:1e30", ["apple", "--lora", "emoji-fruit:1e30"]),
        ("--lora emoji-fruit:inf", ["apple", "--lora", "emoji-fruit:inf"]),
        ("--lora emoji-fruit:nan", ["apple", "--lora", "emoji-fruit:nan"]),
        ("<lora:emoji-fruit:1e30>", ["apple <lora:emoji-fruit:1e30>"]),
        ("<lora:../x:1>", ["apple <lora:../x:1>"]),
        ("<lora:/etc/passwd:1>", ["apple <lora:/etc/passwd:1>"]),
        ("<lora:../x:1> with --lora-dir", ["apple <lora:../huge:1>", "--lora-dir", str(loras)]),
        ("<lora:/abs:1> with --lora-dir", [f"apple <lora:{huge}:1>", "--lora-dir", str(loras)]),
        ("LoRA file with 1e30 tensors", ["apple", "--lora", str(huge)]),
        ("LoRA file with alpha 1e30", ["apple", "--lora", str(big_alpha)]),
        ("LoRA file of rank 0", ["apple", "--lora", str(rank0)]),
        ("seed 2**64", ["heart", "--seed", str(2**64)]),
        ("seed 2**64-1 batch 2", ["heart", "--seed", str(2**64 - 1), "--batch", "2"]),
        ("seed -5", ["heart", "--seed", "-5"]),
        ("seed 1.5", ["heart", "--seed", "1.5"]),
        ("4096x4096", ["heart", "--width", "4096", "--height", "4096"]),
        ("100000x64", ["heart", "--width", "100000", "--height", "64"]),
        ("width 0", ["heart", "--width", "0"]),
        ("width 63", ["heart", "--width", "63"]),
        ("steps 0", ["heart", "--steps", "0"]),
        ("steps 100000", ["heart", "--steps", "100000"]),
        ("mask-blur inf", ["heart", "--init-image", str(init), "--mask", str(mask), "--mask-blur", "inf"]),
        ("mask-blur nan", ["heart", "--init-image", str(init), "--mask", str(mask), "--mask-blur", "nan"]),
        ("mask-blur 1e9", ["heart", "--init-image", str(init), "--mask", str(mask), "--mask-blur", "1e9"]),
        ("--from-png empty text", ["--from-png", str(png_with(tmp / "empty.png", ""))]),
        ("--from-png no text", ["--from-png", str(png_with(tmp / "none.png", None))]),
        ("--from-png weight 1e39", ["--from-png", str(png_with(tmp / "w.png", f"(heart:{digits})\n{fields}"))]),
        ("--from-png 10000 (", ["--from-png", str(png_with(tmp / "p.png", "(" * 10000 + f"\n{fields}"))]),
        (
            "--from-png cfg 1e308",
            ["--from-png", str(png_with(tmp / "c.png", "heart\n" + fields.replace("7", "1e308")))],
        ),
        (
            "--from-png 200 KB last line",
            ["--from-png", str(png_with(tmp / "l.png", "heart\n" + "a: " + "x," * 100000))],
        ),
        (
            "--from-png lora escape",
            ["--from-png", str(png_with(tmp / "e.png", f"x <lora:../../etc/passwd:1>\n{fields}"))],
        ),
        ("--from-png not a PNG", ["--from-png", str(afile)]),
        ("--out under a file", ["heart", "--out", str(afile / "x.png")]),
        ("--out .jpg", ["heart", "--out", str(tmp / "x.jpg")]),
        ("--tiny-vae missing", ["heart", "--tiny-vae", str(tmp / "nope.safetensors")]),
        ("--tiny-vae a text file", ["heart", "--tiny-vae", str(afile)]),
        ("--tiny-vae the full VAE", ["heart", "--tiny-vae", str(EMOJI_VAE)]),
        ("--vae a tiny VAE", ["heart", "--vae", str(EMOJI_TINY)]),
        ("--vae-decode tiny (its own)", ["heart", "--vae-decode", "tiny"]),
        ("--vae-encode tiny (its own)", ["heart", "--init-image", str(init), "--vae-encode", "tiny"]),
        ("--vae-encode tiny, nothing to encode", ["heart", "--vae-encode", "tiny"]),
        ("--vae-encode TAESD", ["heart", "--init-image", str(init), "--vae-encode", "TAESD"]),
    ]


def api_cases() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("api seed 1.5", {"seed": 1.5}),
        ("api seed True", {"seed": True}),
        ("api seed 2**64", {"seed": 2**64}),
        ("api prompt bytes", {"prompt": b"red heart"}),
        ("api prompt nested list", {"prompt": [["red heart"]]}),
        ("api prompt list of 2 (a batch)", {"prompt": ["red heart", "apple"]}),
        ("api loras=[('x',)]", {"loras": [("x",)]}),
        ("api loras weight 1e30", {"loras": [("emoji-fruit", 1e30)]}),
        ("api sampler_options unknown key", {"sampler_options": {"nope": 1}}),
        ("api cfg_scale nan", {"cfg_scale": float("nan")}),
        ("api width 4096", {"width": 4096, "height": 4096}),
        ("api mask_blur inf", {"mask_blur": float("inf")}),
        ("api steps 2.5", {"steps": 2.5}),
        ("api vae_decode TAESD", {"vae_decode": "TAESD"}),
        ("api vae_decode list", {"vae_decode": ["tiny"]}),
        ("api vae_encode TAESD", {"vae_encode": "TAESD"}),
        ("api vae_encode list", {"vae_encode": ["tiny"]}),
        ("api vae_encode None", {"vae_encode": None}),
    ]


def judge_images(paths: list[Path]) -> str | None:
    for p in paths:
        a = np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)
        if a.max() <= 1 or a.std() == 0:
            return f"{p.name}: a black or constant image"
    return None


def run_case(fn: Callable[[], tuple[int, str, list[Path]]], timeout: int) -> tuple[str, str, float]:
    t = time.perf_counter()
    signal.alarm(timeout)
    try:
        rc, err, images = fn()
    except Hang:
        return "HANG", f"over {timeout} s", time.perf_counter() - t
    except SystemExit as e:  # argparse
        rc, err, images = int(e.code or 0), "", []
    except Exception as e:  # noqa: BLE001 - the sweep reports every escape
        return "CRASH", f"{type(e).__name__}: {e}".splitlines()[0][:150], time.perf_counter() - t
    finally:
        signal.alarm(0)
    took = time.perf_counter() - t
    if "Traceback" in err:
        return "CRASH", err.strip().splitlines()[-1][:150], took
    if rc == 0:
        bad = judge_images(images)
        return ("BLACK", bad, took) if bad else ("image", f"{len(images)} PNG", took)
    lines = [ln for ln in err.strip().splitlines() if "error" in ln]
    return ("error", lines[-1][:150] if lines else f"exit {rc}", took)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default="")
    ap.add_argument("--timeout", type=int, default=120)
    a = ap.parse_args()
    signal.signal(signal.SIGALRM, _alarm)
    from sdengine.cli import main as cli

    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results = []
        for i, (name, args) in enumerate(cli_cases(tmp)):
            if a.only not in name:
                continue
            out = tmp / f"out{i}"

            def call(args: list[str] = args, out: Path = out) -> tuple[int, str, list[Path]]:
                err = io.StringIO()
                full = ["generate", *BASE, *args]  # args last: a repeated option wins
                if "--out" not in args:
                    full += ["--out", str(out)]
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    try:
                        rc = cli(full)
                    except BaseException as e:
                        if isinstance(e, SystemExit | Hang):
                            raise
                        err.write("Traceback (most recent call last):\n" + traceback.format_exc())
                        rc = 1
                return rc, err.getvalue(), sorted(out.glob("*.png")) if out.is_dir() else []

            results.append((name, *run_case(call, a.timeout)))
            print(f"{results[-1][1]:6} {results[-1][3]:6.1f}s  {name}: {results[-1][2]}", flush=True)

        import sdengine
        from sdengine.errors import SdengineError

        pipe = sdengine.load_pipeline("emoji", device="cpu")
        for name, kw in api_cases():
            if a.only not in name:
                continue

            def api(kw: dict[str, Any] = kw) -> tuple[int, str, list[Path]]:
                args = {"prompt": "red heart", "steps": 2, "seed": 1, "progress": False, **kw}
                try:
                    result = pipe(**args)
                except SdengineError as e:
                    return 2, f"error: {type(e).__name__}: {e}", []
                paths = []
                for j, im in enumerate(result.images):
                    paths.append(tmp / f"api{j}.png")
                    im.save(paths[-1])
                if not np.isfinite(result.arrays).all():
                    return 0, "", [tmp / "nonfinite"]
                return 0, "", paths

            results.append((name, *run_case(api, a.timeout)))
            print(f"{results[-1][1]:6} {results[-1][3]:6.1f}s  {name}: {results[-1][2]}", flush=True)

    for _, kind, _, _ in results:
        counts[kind] = counts.get(kind, 0) + 1
    print(f"\n{len(results)} inputs: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    failures = [r for r in results if r[1] in ("CRASH", "HANG", "BLACK")]
    for name, kind, why, _ in failures:
        print(f"FAIL {kind}: {name}: {why}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
