"""``sdengine bench --device cuda``: sdengine against diffusers on one GPU, in one prepared run.

What it measures (docs/performance.md, "GPU", has the results and the command), every engine on the same weights
(a diffusers folder, or random weights of SD 1.5's real architecture), the same prompt, negative prompt, seed,
sampler, steps and guidance scale, half precision:

* the GPU: name, torch version, the bf16 matrix-product rate (the ceiling the step times are read against), and
  each fused attention kernel's time at the U-Net's largest self-attention (:mod:`sdengine.sdpa_backends`);
  the fastest is used by every engine of the run, and cuDNN's algorithm search is on for all of them;
* per engine: the whole generation (text, every step with CFG, VAE decode, PIL images; the median of
  ``repeats`` calls after a warm-up), one U-Net CFG step, one VAE decode, peak allocated GPU memory;
* engines: sdengine eager; sdengine with channels_last + CUDA graphs, and with CUDA graphs alone (NCHW);
  sdengine with torch.compile + CUDA graphs
  in two fresh processes, the first with an empty compile cache (cold start) and the second with the cache the
  first left (warm start), each timed from process start to its first image; the same two with the networks
  compiled ahead of time (``aot``, sdengine.aot) instead of torch.compile; diffusers eager; diffusers
  compiled as its documentation recommends (channels_last, ``torch.compile(mode="reduce-overhead",
  fullgraph=True)`` of the U-Net);
* batch 8: images per second of sdengine (graphs; compiled, in the warm process after its first image) and
  diffusers eager;
* agreement: mean absolute difference on 0..1 pixels of each engine's image against sdengine's fp32 image and
  against diffusers' fp16 image.

Every phase is guarded: one that fails is recorded with its error and the run goes on; one that would not fit
in what is left of ``budget_s`` is skipped and says so. The JSON is rewritten after every phase, so a run cut
short still leaves what it measured. diffusers is imported by the first diffusers phase (a machine without it
runs every sdengine phase), and the summaries at the end (agreement, ratios, the images' PNG) are guarded each.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.bench import NEGATIVE, PROMPT, BenchError, mean_abs, peer_module, run_worker

FILE_NAME = "bench_gpu.json"
GRAPH_OPTIONS = ("channels_last", "cuda_graphs")
NCHW_GRAPH_OPTIONS = ("cuda_graphs",)  # channels_last's own share: at batch 8 the graphs path was slower than
# diffusers' eager NCHW one (5.12 against 5.53 images/s) though both launch the same operations
COMPILED_OPTIONS = ("channels_last", "compile", "cuda_graphs")
# fused query/key/value products (sdengine.nn.attention), opt-in until a GPU measures them: these two
# phases are that measurement, each against the same path without it (sdengine_graphs, sdengine_compiled_warm)
FUSED_GRAPH_OPTIONS = ("channels_last", "fused_qkv", "cuda_graphs")
FUSED_COMPILED_OPTIONS = ("channels_last", "fused_qkv", "compile", "cuda_graphs")
AOT_OPTIONS = ("channels_last", "aot", "cuda_graphs")
FP8_OPTIONS = ("channels_last", "fp8", "compile", "cuda_graphs")
# Every phase of a run, in the order they run (``only=`` picks some; "info" always runs: it picks the attention
# kernel every later phase uses). Without compile the two sdengine processes are the graphs_process ones.
PHASES = (
    "info",
    "sdengine_eager",
    "sdengine_graphs",
    "sdengine_graphs_nchw",
    "sdengine_graphs_fused",
    "sdengine_fp32",
    "diffusers_eager",
    "sdengine_compiled_cold",
    "sdengine_compiled_warm",
    "sdengine_compiled_fused",
    "sdengine_graphs_process_cold",
    "sdengine_graphs_process_warm",
    "sdengine_default_process",
    "sdengine_aot_cold",
    "sdengine_aot_warm",
    "sdengine_fp8",
    "diffusers_compiled",
    "diffusers_compiled_batch8",
)


def _sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mb(device: Any) -> float | None:
    import torch

    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def timed(fn: Callable[[], Any], device: Any, n: int) -> list[float]:
    """Seconds of each of ``n`` calls, the device synchronised around each."""
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def matmul_tflops(device: Any) -> float | None:
    """bf16 8192^3 matrix products per second, in TFLOP/s (the ceiling the run is read against)."""
    import torch

    if torch.device(device).type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn_like(a)
    for _ in range(3):
        a @ b
    t = statistics.median(timed(lambda: a @ b, device, 10))
    return 2 * 8192**3 / t / 1e12


# ---------------------------------------------------------------------------------------------------
# sdengine
# ---------------------------------------------------------------------------------------------------


def sdengine_gen(
    pipe: Any, cfg: dict[str, Any], batch: int, keep: dict[str, Any] | None = None
) -> Callable[[], np.ndarray]:
    """One generation; with ``keep``, its final latent (``keep["latent"]``, as a CPU float array) and the
    result's notes (``keep["notes"]``) are kept too."""
    from sdengine.text import encode_cache

    def last_latent(info: Any) -> None:
        if keep is not None and info.step == info.steps:
            keep["latent"] = info.latents.float().cpu().numpy()

    def run() -> np.ndarray:
        # Every timed call encodes its text, as the peer does: the text-encoder cache would answer the repeated
        # prompt (sdengine.text.encode_cache; benchmarks/text_cache.py measures what it saves).
        encode_cache.clear()
        result = pipe(
            PROMPT,
            NEGATIVE,
            steps=cfg["steps"],
            sampler=cfg["sampler"],
            schedule="normal",
            cfg_scale=cfg["cfg"],
            seed=cfg["seed"],
            width=cfg["size"],
            height=cfg["size"],
            batch_size=batch,
            progress=False,
            callback=last_latent if keep is not None else None,
        )
        if keep is not None:
            keep["notes"] = list(result.notes)
        return result.arrays

    return run


def sdengine_parts(pipe: Any, cfg: dict[str, Any]) -> dict[str, Callable[[], Any]]:
    """One U-Net CFG step (batch 2), one VAE decode, one tiny VAE decode (the live previews' and
    ``vae_decode="tiny"``'s cost: the pipeline's tiny VAE, else TAESD's architecture with random weights, set on the
    pipeline) and the text encoding of the prompt and the negative (the cache emptied first), each through the
    pipeline's graphs when it has them."""
    import torch

    from sdengine.models.tiny_vae import TinyAutoencoder, taesd_config

    dev, dt = pipe.device, pipe.dtype
    side = cfg["size"] // pipe.vae_scale_factor
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(2, pipe.latent_channels, side, side, generator=g).to(dev, dt)
    cond, uncond = pipe.encode_prompt(PROMPT, NEGATIVE)
    ctx = torch.cat([cond, uncond]).to(dev, dt)
    t = torch.full((2,), 500.0, device=dev)
    z = torch.randn(1, pipe.latent_channels, side, side, generator=g).to(dev, dt)
    if pipe.tiny_vae is None:
        torch.manual_seed(0)
        pipe.set_tiny_vae(TinyAutoencoder(taesd_config(pipe.vae_scale_factor, pipe.latent_channels)))
    unet = pipe.graphed("unet") or pipe.unet
    decode = pipe.graphed("vae") or pipe.vae.decode
    tiny_decode = pipe.tiny_vae.decode  # through the pipeline's graphs when it has them (cuda_graphs.through)

    def step() -> Any:
        with torch.inference_mode():
            return unet(x, t, encoder_hidden_states=ctx)

    def vae() -> Any:
        with torch.inference_mode():
            return decode(z)

    def tiny_vae() -> Any:
        with torch.inference_mode():
            return tiny_decode(z)

    def text() -> Any:  # the prompt and the negative, as each generation encodes them (the cache emptied)
        from sdengine.text import encode_cache

        encode_cache.clear()
        with torch.inference_mode():
            return pipe.encode_prompt(PROMPT, NEGATIVE)

    return {"step": step, "vae": vae, "tiny_vae": tiny_vae, "text": text}


def measure_sdengine(pipe: Any, cfg: dict[str, Any], repeats: int, *, batch8: bool = False) -> dict[str, Any]:
    """Image time (warm-up apart), step and decode times, peak memory, the warm-up's image."""
    dev = pipe.device
    gen = sdengine_gen(pipe, cfg, 1)
    _reset_peak(dev)
    kept: dict[str, Any] = {}
    t0 = time.perf_counter()
    image = sdengine_gen(pipe, cfg, 1, kept)()
    warm = time.perf_counter() - t0
    times = timed(gen, dev, repeats)
    peak = _peak_mb(dev)
    parts = sdengine_parts(pipe, cfg)
    for f in parts.values():
        f()  # records the parts' own graphs (their shapes may differ from a generation's)
    step = statistics.median(timed(parts["step"], dev, 20))
    vae = statistics.median(timed(parts["vae"], dev, 5))
    tiny = statistics.median(timed(parts["tiny_vae"], dev, 5))
    text = statistics.median(timed(parts["text"], dev, 10))
    out: dict[str, Any] = {
        "warmup_s": warm,
        "image_s": statistics.median(times),
        "image_all_s": times,
        "unet_step_ms": step * 1000,
        "vae_decode_ms": vae * 1000,
        "tiny_vae_decode_ms": tiny * 1000,
        "text_encode_ms": text * 1000,
        "peak_allocated_mb": peak,
        "vae_upcast": bool(pipe.vae_upcast),
        "call_notes": kept.get("notes", []),
        "_image": image,
        "_latent": kept.get("latent"),
    }
    if batch8:
        out.update(measure_batch(sdengine_gen(pipe, cfg, 8), dev, 8, max(2, repeats // 2)))
    return out


def measure_graph_loop(
    pipe: Any,
    cfg: dict[str, Any],
    repeats: int,
    reference: np.ndarray,
    *,
    backend: Any = None,
    device_type: str = "cuda",
) -> dict[str, Any]:
    """The same generation with its whole sampling loop replayed as one CUDA graph (fast-path
    ``cuda_graph_loop``, sdengine.pipeline.loop_graph) on top of ``pipe``'s graphs: image time (warm-up apart),
    batch 8, the image against ``reference`` (the step graphs' image), where its time goes
    (:func:`sdengine.bench_timeline.profile_image`). The loop is dropped again afterwards. ``backend`` and
    ``device_type``: how the loop is recorded (the tests record on the CPU with a stand-in)."""
    if not pipe.enable_loop_graph(backend=backend, device_type=device_type, record_after=0):  # timed from the start
        return {"skipped": f"CUDA only (the pipeline is on {pipe.device})"}
    try:
        loop = pipe.cuda_graphs["loop"]
        gen = sdengine_gen(pipe, cfg, 1)
        t0 = time.perf_counter()
        image = gen()
        warm = time.perf_counter() - t0
        times = timed(gen, pipe.device, repeats)
        out: dict[str, Any] = {
            "warmup_s": warm,
            "image_s": statistics.median(times),
            "image_all_s": times,
            "vs_step_graphs_mean_abs": mean_abs(image, reference),
        }
        out.update(measure_batch(sdengine_gen(pipe, cfg, 8), pipe.device, 8, max(2, repeats // 2)))
        out.update({"recordings": loop.recordings, "replays": loop.replays})
        out["image_timeline"] = _timeline(pipe, cfg)
        return out
    finally:
        pipe.cuda_graphs = {k: v for k, v in pipe.cuda_graphs.items() if k != "loop"}


def vae_decode_by_layout(pipe: Any, cfg: dict[str, Any], n: int = 5) -> dict[str, Any]:
    """The VAE decode's milliseconds, eager (no graph), with the VAE's weights in NHWC and in NCHW, in one process:
    whether ``channels_last`` pays for the VAE (on the H200 the graphed NHWC decode took 25.7 ms where eager NCHW
    ones took 21.5-21.7, in other runs). The VAE's layout is restored afterwards; its graphs, which see new weight
    tensors, record again on their next call (so this runs after the phase's other measurements)."""
    import torch

    side = cfg["size"] // pipe.vae_scale_factor
    z = torch.randn(1, pipe.latent_channels, side, side, generator=torch.Generator("cpu").manual_seed(0))
    z = z.to(pipe.device, pipe.dtype)
    vae = pipe.vae
    convs = [m.weight for m in vae.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-1] > 1]
    was_nhwc = bool(convs) and convs[0].is_contiguous(memory_format=torch.channels_last)

    def decode() -> Any:
        with torch.inference_mode():
            return vae.decode(z)

    out: dict[str, Any] = {"weights_were": "nhwc" if was_nhwc else "nchw"}
    try:
        for name, fmt in (("nhwc", torch.channels_last), ("nchw", torch.contiguous_format)):
            vae.to(memory_format=fmt)
            decode()  # cuDNN's search for this layout
            out[name] = statistics.median(timed(decode, pipe.device, n)) * 1000
    finally:
        vae.to(memory_format=torch.channels_last if was_nhwc else torch.contiguous_format)
    return out


def _diagnosis(fn: Callable[[], dict[str, Any]]) -> dict[str, Any] | str:
    """``fn()``, or its error in one line: a diagnosis is never a reason to lose the phase's timings."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - see the docstring
        return f"{type(e).__name__}: {e}"


def _timeline(pipe: Any, cfg: dict[str, Any]) -> dict[str, Any] | str:
    from sdengine.bench_timeline import profile_image

    return _diagnosis(lambda: profile_image(pipe, sdengine_gen(pipe, cfg, 1)))


def measure_batch(gen: Callable[[], Any], device: Any, batch: int, repeats: int) -> dict[str, Any]:
    gen()  # warm-up (records the batch's graphs, picks its cuDNN algorithms)
    t = statistics.median(timed(gen, device, repeats))
    return {f"batch{batch}_s": t, f"batch{batch}_images_per_s": batch / t}


def load_sdengine(
    folder: Path, device: str, dtype: str, options: tuple[str, ...], times: dict[str, float] | None = None
) -> tuple[Any, list[str]]:
    """The pipeline with ``options`` applied; with ``times``, the seconds of each part (``weights_s``: read,
    build, move to the device; ``fast_path_s``: the options, e.g. loading AOT packages)."""
    import sdengine
    from sdengine.fastpath import apply_fast_path

    t0 = time.perf_counter()
    pipe = sdengine.load_pipeline(folder, device=device, dtype=dtype, fast_path="none")
    t1 = time.perf_counter()
    notes = apply_fast_path(pipe, options)
    if times is not None:
        times.update({"weights_s": t1 - t0, "fast_path_s": time.perf_counter() - t1})
    return pipe, notes


# ---------------------------------------------------------------------------------------------------
# The child process: start-up to first image (cold and warm compile cache)
# ---------------------------------------------------------------------------------------------------


def child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process started at ``job["started"]`` (the parent's clock): load, apply the options,
    generate the first image, then time as :func:`measure_sdengine` does."""
    import torch

    torch.backends.cudnn.benchmark = True
    from sdengine.sdpa_backends import use_backend

    use_backend(job["sdpa"])
    t_import = time.time()
    parts: dict[str, float] = {}
    if torch.device(job["device"]).type == "cuda":  # the driver's start-up, apart from the weights' load
        torch.zeros(1, device=job["device"])
        parts["cuda_init_s"] = time.time() - t_import
    dtype = job.get("dtype", "fp16")  # the parent's: fp16 on a GPU, fp32 on the CPU (where fp16 is slow and unused)
    pipe, notes = load_sdengine(Path(job["folder"]), job["device"], dtype, tuple(job["options"]), parts)
    t_load = time.time()
    cfg = job["cfg"]
    with torch.inference_mode():
        sdengine_gen(pipe, cfg, 1)()
    _sync(pipe.device)
    t_first = time.time()
    first_compile = compile_time_split()  # before later shapes (batch 8) compile more
    out = measure_sdengine(pipe, cfg, int(job["repeats"]), batch8=bool(job.get("batch8")))
    if first_compile:
        out["first_call_compile_s"] = first_compile
    if job.get("profile") and pipe.device.type == "cuda":
        try:
            out["unet_step_kernels"] = kernel_profile(pipe, cfg)
        except Exception as e:  # noqa: BLE001 - the profile is a diagnosis, never a reason to lose the run
            out["unet_step_kernels"] = f"{type(e).__name__}: {e}"
        out["image_timeline"] = _timeline(pipe, cfg)
        if pipe.cuda_graphs is not None:  # the compiled networks inside one recorded loop
            out["graph_loop"] = _diagnosis(lambda: measure_graph_loop(pipe, cfg, int(job["repeats"]), out["_image"]))
    np.save(job["image_path"], out.pop("_image"))
    latent = out.pop("_latent")
    if latent is not None:
        np.save(str(job["image_path"]).replace(".npy", "_latent.npy"), latent)
    out.update(
        {
            "notes": notes,
            "dtype": str(pipe.dtype).removeprefix("torch."),
            "first_image_s": t_first - job["started"],
            "import_s": t_import - job["started"],
            "load_s": t_load - t_import,
            "first_call_s": t_first - t_load,
            "load_parts_s": parts,
        }
    )
    if pipe.aot:  # which packaging, and whether each network ran from its package (sdengine.aot)
        out["aot"] = {
            name: {
                "packaging": a.packaging,
                "compiled": a.compiled,
                "loaded": a.loaded,
                "failed": len(a.failed),
                "seconds": round(a.seconds, 2),
            }
            for name, a in pipe.aot.items()
        }
    return out


def compile_time_split(top: int = 30) -> dict[str, float]:
    """Where torch.compile's time went in this process so far (Dynamo's own accounting,
    ``torch._dynamo.utils.compile_times``): seconds per phase (tracing, cache look-ups, loading the compiled
    module, waiting for kernels, building guards), the ``top`` largest; empty when nothing was compiled. For the
    warm compiled process, whose first call (11.6 s on an H200) is most of its first image."""
    import sys

    if "torch._dynamo" not in sys.modules:  # nothing compiled: do not import the compiler for this
        return {}
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv")
    split = {}
    for name, value in zip(names, values, strict=True):
        try:
            split[name] = round(sum(float(v) for v in str(value).split(",") if v.strip()), 3)
        except ValueError:
            continue
    return dict(sorted(split.items(), key=lambda kv: -kv[1])[:top])


def kernel_profile(pipe: Any, cfg: dict[str, Any], steps: int = 5, top: int = 25) -> dict[str, Any]:
    """Where a U-Net CFG step's GPU time goes: the network called directly (compiled when it is, no graph, so
    the profiler sees each kernel), ``steps`` calls; the ``top`` kernels by total time, per step."""
    from torch.profiler import ProfilerActivity, profile

    cuda_graphs, pipe.cuda_graphs = pipe.cuda_graphs, None  # the plain network, not its graph
    try:
        step = sdengine_parts(pipe, cfg)["step"]
        step()
        _sync(pipe.device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
            _sync(pipe.device)
    finally:
        pipe.cuda_graphs = cuda_graphs
    rows = []
    for ev in prof.key_averages():
        t = float(getattr(ev, "device_time_total", 0.0) or getattr(ev, "cuda_time_total", 0.0))
        if t <= 0 or ev.key.startswith(("ProfilerStep", "cudaGraph")):
            continue
        rows.append({"kernel": ev.key[:100], "ms_per_step": t / 1000 / steps, "calls_per_step": ev.count / steps})
    rows.sort(key=lambda r: -r["ms_per_step"])
    return {"kernel_ms_per_step": sum(r["ms_per_step"] for r in rows), "top": rows[:top]}


def save_images(images: dict[str, np.ndarray], path: Path) -> None:
    """The engines' first images side by side (0..1 floats -> one PNG), labelled in the JSON's order."""
    from PIL import Image

    from sdengine.io.images import to_uint8

    tiles = [to_uint8(img[:1])[0] for img in images.values()]
    if tiles:
        Image.fromarray(np.concatenate(tiles, axis=1)).save(path)


def _saved_images(images: dict[str, np.ndarray], path: Path) -> list[str]:
    save_images(images, path)
    return list(images)


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------


class Run:
    """The phases' results, written to ``out_dir/bench_gpu.json`` after each phase."""

    def __init__(self, out_dir: Path, budget_s: float, only: frozenset[str] | None = None) -> None:
        self.out_dir = out_dir
        self.only = only  # the phases asked for (None: all); the others are recorded as skipped
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / FILE_NAME
        self.start = time.monotonic()
        self.budget_s = budget_s
        self.data: dict[str, Any] = {"phases": {}, "skipped": {}, "errors": {}}
        self.images: dict[str, np.ndarray] = {}
        self.latents: dict[str, np.ndarray] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def phase(self, name: str, need_s: float, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any] | None:
        if self.only is not None and name != "info" and name not in self.only:
            self.data["skipped"][name] = "not asked for"
            return None
        if self.left() < need_s:
            self.data["skipped"][name] = f"needs about {need_s:.0f} s, {self.left():.0f} s left"
            _say(f"{name}: skipped ({self.data['skipped'][name]})")
            self.save()
            return None
        _say(f"{name}: start ({self.left():.0f} s left)")
        t0 = time.monotonic()
        try:
            res = fn()
        except Exception as e:  # noqa: BLE001 - a failed phase is recorded; the run goes on
            self.data["errors"][name] = f"{type(e).__name__}: {e}"
            _say(f"{name}: FAILED {type(e).__name__}: {e}")
            traceback.print_exc()
            self.save()
            return None
        if res is not None:
            image, latent = res.pop("_image", None), res.pop("_latent", None)
            if image is not None:
                self.images[name] = image
            if latent is not None:
                self.latents[name] = np.asarray(latent, dtype=np.float32)
            res["phase_s"] = time.monotonic() - t0
            self.data["phases"][name] = res
            _say(f"{name}: {_short(res)}")
        self.save()
        return res

    def save(self) -> None:
        self.data["elapsed_s"] = time.monotonic() - self.start
        self.path.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def _short(res: dict[str, Any]) -> str:
    keys = (
        "image_s",
        "unet_step_ms",
        "vae_decode_ms",
        "tiny_vae_decode_ms",
        "text_encode_ms",
        "first_image_s",
        "batch8_images_per_s",
        "compile_s",
    )
    return ", ".join(f"{k} {res[k]:.4g}" for k in keys if isinstance(res.get(k), int | float))


def _say(line: str) -> None:
    print(f"[bench-gpu] {line}", file=sys.stderr, flush=True)


def run_gpu_bench(
    folder: Path,
    *,
    model: str,
    out_dir: Path,
    size: int = 512,
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    cfg_scale: float = 7.5,
    seed: int = 0,
    repeats: int = 5,
    device: str = "cuda",
    compare: bool = True,
    compile: bool = True,
    budget_s: float = 480.0,
    fp32_check: bool = True,
    aot: bool = True,
    fp8: bool = True,
    only: Iterable[str] | None = None,
) -> dict[str, Any]:
    """The whole GPU comparison (module docstring); returns the JSON's dict and writes it to ``out_dir``.
    ``device="cpu"`` runs the same phases on the CPU (the tests do, with a tiny model and ``compile=False``).
    ``only``: the phases to run (names of :data:`PHASES`; "info" always runs), for a device session too short
    for all of them."""
    import torch

    chosen = parse_phases(only)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: torch {torch.__version__} sees no CUDA device")
    run = Run(Path(out_dir), budget_s, chosen)
    cfg = {"size": size, "steps": steps, "sampler": sampler, "cfg": cfg_scale, "seed": seed}
    run.data.update({"model": model, "folder": str(folder), "config": cfg, "repeats": repeats, "device": device})
    is_cuda = torch.device(device).type == "cuda"

    def info() -> dict[str, Any]:
        from sdengine.sdpa_backends import fastest, time_backends, use_backend

        out: dict[str, Any] = {"torch": torch.__version__}
        if is_cuda:
            out["gpu"] = torch.cuda.get_device_name(device)
            out["bf16_matmul_tflops"] = matmul_tflops(device)
            torch.backends.cudnn.benchmark = True
            out["cudnn_benchmark"] = True
        side = size // 8
        times = time_backends(device, torch.float16 if is_cuda else torch.float32, tokens=side * side, repeats=10)
        out["sdpa_ms"] = times
        out["sdpa_chosen"] = fastest(times) if is_cuda else "default"
        try:
            use_backend(out["sdpa_chosen"])
        except Exception as e:  # noqa: BLE001 - an older torch cannot order the kernels: keep its own order
            out["sdpa_error"] = f"{type(e).__name__}: {e}"
            out["sdpa_chosen"] = "default"
        return out

    info_res = run.phase("info", 0, info) or {}
    state = {"sdpa": info_res.get("sdpa_chosen", "default")}
    dtype = "fp16" if is_cuda else "fp32"
    held: dict[str, Any] = {}

    def sd_eager() -> dict[str, Any]:
        pipe, _ = load_sdengine(folder, device, dtype, ())
        held["eager"] = pipe
        return measure_sdengine(pipe, cfg, repeats)

    run.phase("sdengine_eager", 30, sd_eager)

    def sd_graphs() -> dict[str, Any]:
        pipe = held.get("eager")
        if pipe is None:
            pipe, notes = load_sdengine(folder, device, dtype, GRAPH_OPTIONS)
        else:
            from sdengine.fastpath import apply_fast_path

            notes = apply_fast_path(pipe, GRAPH_OPTIONS)
        res = measure_sdengine(pipe, cfg, repeats, batch8=True)
        res["notes"] = notes
        held["probe"] = pipe  # kept for the stage-by-stage comparison with diffusers
        if is_cuda:  # inside a graph the kernels' order can differ from the micro-benchmark's: time each
            by_kernel = graph_step_by_backend(pipe, cfg)
            res["unet_step_ms_by_attention"] = by_kernel
            if by_kernel:
                from sdengine.sdpa_backends import use_backend

                state["sdpa"] = min(by_kernel, key=lambda k: by_kernel[k])
                use_backend(state["sdpa"])
        res["image_timeline"] = _timeline(pipe, cfg)
        res["graph_loop"] = _diagnosis(functools.partial(measure_graph_loop, pipe, cfg, repeats, res["_image"]))
        res["vae_decode_ms_by_layout"] = _diagnosis(functools.partial(vae_decode_by_layout, pipe, cfg))  # last
        held.pop("eager", None)
        del pipe
        return res

    run.phase("sdengine_graphs", 55, sd_graphs)
    run.data["sdpa_used"] = state["sdpa"]  # by every later engine (and the compiled processes)
    _free(device)

    def sd_graphs_nchw() -> dict[str, Any]:
        pipe, notes = load_sdengine(folder, device, dtype, NCHW_GRAPH_OPTIONS)
        res = measure_sdengine(pipe, cfg, repeats, batch8=True)
        res["notes"] = notes
        del pipe
        return res

    run.phase("sdengine_graphs_nchw", 40, sd_graphs_nchw)
    _free(device)

    def sd_graphs_fused() -> dict[str, Any]:
        pipe, notes = load_sdengine(folder, device, dtype, FUSED_GRAPH_OPTIONS)
        res = measure_sdengine(pipe, cfg, repeats, batch8=True)
        res["notes"] = notes
        del pipe
        return res

    run.phase("sdengine_graphs_fused", 40, sd_graphs_fused)
    _free(device)

    def sd_fp32() -> dict[str, Any]:
        pipe, _ = load_sdengine(folder, device, "fp32", ())
        kept: dict[str, Any] = {}
        t0 = time.perf_counter()
        image = sdengine_gen(pipe, cfg, 1, kept)()
        return {"image_s": time.perf_counter() - t0, "_image": image, "_latent": kept.get("latent")}

    if fp32_check:
        run.phase("sdengine_fp32", 30, sd_fp32)
        _free(device)

    # The children's compile caches, AOT packages and images: large, removed when the run ends however it ends.
    with tempfile.TemporaryDirectory(prefix="sdengine-gpu-bench-") as tmp:
        scratch = Path(tmp)
        cache_dir = scratch / "inductor"

        def sd_child(
            label: str, batch8: bool, options: tuple[str, ...] | None = None, cache: Path | None = None
        ) -> dict[str, Any]:
            image_path = Path(tempfile.mkdtemp(prefix="child-", dir=scratch)) / "image.npy"
            env = dict(os.environ)
            env["TORCHINDUCTOR_CACHE_DIR"] = str(cache or cache_dir)
            job = {
                "engine": f"sdengine ({label})",
                "folder": str(folder),
                "device": device,
                "dtype": dtype,
                "options": list(options or (COMPILED_OPTIONS if compile else GRAPH_OPTIONS)),
                "cfg": cfg,
                "repeats": repeats,
                "sdpa": state["sdpa"],
                "batch8": batch8,
                "profile": label in ("warm cache", "aot warm", "fused"),  # the kernels, the timeline, the loop graph
                "image_path": str(image_path),
                "started": time.time(),  # the child's first image is timed from here
            }
            log = run.out_dir / f"child_{label.replace(' ', '_')}.log"  # its stderr, kept when it fails
            res = run_worker(
                job, env=env, timeout=max(60.0, run.left() - 5), module="sdengine.bench_gpu", stderr_path=log
            )
            res["_image"] = np.load(image_path)
            latent_path = Path(str(image_path).replace(".npy", "_latent.npy"))
            if latent_path.is_file():
                res["_latent"] = np.load(latent_path)
            return res

        loaded: dict[str, Any] = {}

        def peer() -> Any:  # diffusers, imported by the first diffusers phase: a run without it (a device image
            # that lacks the package) still runs every sdengine phase, and each diffusers phase fails in one line
            if "peer" not in loaded:
                loaded["peer"] = peer_module()
            return loaded["peer"]

        dpipe: dict[str, Any] = {}
        if compare:  # early: cheap, and the stage-by-stage comparison needs the graphs pipeline still loaded

            def df_eager() -> dict[str, Any]:
                engine = peer().GpuEngine(folder, device, sampler, size)
                dpipe["engine"] = engine
                res = engine.measure(PROMPT, NEGATIVE, cfg, repeats, batch8=True)
                probe = held.pop("probe", None)
                if probe is not None:
                    try:
                        res["stages_vs_sdengine"] = stage_agreement(probe, engine.pipe, cfg)
                    except Exception as e:  # noqa: BLE001 - a diagnosis; the timings stand without it
                        res["stages_vs_sdengine"] = f"{type(e).__name__}: {e}"
                other = "default" if state["sdpa"] != "default" else "math"
                try:
                    check, latent = attention_order_check(engine, cfg, state["sdpa"], other)
                    res["attention_order_check"] = check
                    run.latents[f"diffusers_eager_attention_{other}"] = latent
                except Exception as e:  # noqa: BLE001 - a diagnosis; the timings stand without it
                    res["attention_order_check"] = f"{type(e).__name__}: {e}"
                try:
                    res["noise_check"], latent, image = noise_check(engine, cfg)
                    run.latents["diffusers_eager_sdengine_noise"] = latent
                    run.images["diffusers_eager_sdengine_noise"] = image
                except Exception as e:  # noqa: BLE001 - a diagnosis; the timings stand without it
                    res["noise_check"] = f"{type(e).__name__}: {e}"
                return res

            run.phase("diffusers_eager", 40, df_eager)

        child_name = "sdengine_compiled" if compile else "sdengine_graphs_process"
        run.phase(f"{child_name}_cold", 150, lambda: sd_child("cold cache", False))
        # The warm process also times batch 8 after its first image (compiled: one more shape to compile)
        run.phase(f"{child_name}_warm", 120 if compile else 45, lambda: sd_child("warm cache", True))
        if compile:  # fused q/k/v products over the compiled path (its own compile: another graph)
            run.phase("sdengine_compiled_fused", 150, lambda: sd_child("fused", False, FUSED_COMPILED_OPTIONS))
        if compile:  # the default CUDA path (graphs, nothing compiled) from process start: its first image too
            run.phase("sdengine_default_process", 45, lambda: sd_child("default", False, GRAPH_OPTIONS))
        if aot:  # the same with the networks compiled ahead of time (sdengine.aot): no tracing in a warm process
            aot_cache = scratch / "aoti"  # its own: the cold one starts from nothing
            run.phase("sdengine_aot_cold", 150, lambda: sd_child("aot cold", False, AOT_OPTIONS, aot_cache))
            run.phase("sdengine_aot_warm", 60, lambda: sd_child("aot warm", False, AOT_OPTIONS, aot_cache))

        if fp8:  # the e4m3 linear layers (sdengine.nn.fp8) under compile (the same inductor cache) and graphs
            fp8_options = FP8_OPTIONS if compile else tuple(o for o in FP8_OPTIONS if o != "compile")
            run.phase("sdengine_fp8", 150 if compile else 45, lambda: sd_child("fp8", False, fp8_options))

        def df_compiled() -> dict[str, Any]:
            engine = dpipe.get("engine") or peer().GpuEngine(folder, device, sampler, size)
            engine.compile()
            dpipe["engine"] = engine
            res = engine.measure(PROMPT, NEGATIVE, cfg, repeats, batch8=False)
            res["compile_s"] = res["warmup_s"]  # the first call compiles (and generates one image)
            return res

        def df_compiled_batch8() -> dict[str, Any]:  # its warm-up compiles the batch's shape (a minute on the H200)
            engine = dpipe["engine"]
            return measure_batch(
                lambda: engine.generate(PROMPT, NEGATIVE, cfg, 8, "pil"), device, 8, max(2, repeats // 2)
            )

        if compare and compile:  # last: its compile is the longest, and run 1 of docs/gpu.md has it
            if run.phase("diffusers_compiled", 120, df_compiled) is not None:
                run.phase("diffusers_compiled_batch8", 90, df_compiled_batch8)
        dpipe.clear()
        _free(device)

        # The summaries, each on its own: one that fails (images of other shapes) is an error line, not a lost run
        summaries: dict[str, Callable[[], Any]] = {
            "agreement": lambda: agreement(run.images),
            "latent_agreement": lambda: latent_agreement(run.latents),
            "ratios": lambda: ratios(run.data["phases"]),
            "images_png": lambda: _saved_images(run.images, run.out_dir / "images.png"),
        }
        for key, make in summaries.items():
            try:
                run.data[key] = make()
            except Exception as e:  # noqa: BLE001 - see above
                run.data["errors"][key] = f"{type(e).__name__}: {e}"
                _say(f"{key}: FAILED {type(e).__name__}: {e}")
        run.save()
        return run.data


def parse_phases(only: Iterable[str] | None) -> frozenset[str] | None:
    """``only`` checked against :data:`PHASES` (a comma-separated string or names); None means every phase."""
    if only is None:
        return None
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    unknown = [n for n in names if n not in PHASES]
    if unknown or not names:
        raise BenchError(f"unknown phase(s) {', '.join(unknown) or '(none given)'}; valid: {', '.join(PHASES)}")
    return frozenset(names)


def stage_agreement(pipe: Any, peer: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """Where the two engines part, stage by stage, on identical inputs (each difference divided by the mean
    absolute value of diffusers' output): the text states of the prompt and the negative prompt, one U-Net CFG
    call, one VAE decode, and the sampler's timesteps and sigmas against the diffusers scheduler's."""
    import torch

    from sdengine.diffusion import sampling

    def rel(a: Any, b: Any) -> float:
        a, b = a.float(), b.float()
        return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))

    dev, dt = pipe.device, pipe.dtype
    out: dict[str, Any] = {}
    with torch.inference_mode():
        cond, uncond = pipe.encode_prompt(PROMPT, NEGATIVE)
        p_cond, p_uncond = peer.encode_prompt(PROMPT, dev, 1, True, NEGATIVE)
        out["text_cond"], out["text_uncond"] = rel(cond, p_cond), rel(uncond, p_uncond)
        side = cfg["size"] // pipe.vae_scale_factor
        g = torch.Generator("cpu").manual_seed(1)
        x = torch.randn(2, pipe.latent_channels, side, side, generator=g).to(dev, dt)
        ctx = torch.cat([p_cond, p_uncond]).to(dev, dt)
        t = torch.full((2,), 500.0, device=dev)
        ours = pipe.unet(x, t, encoder_hidden_states=ctx)
        theirs = peer.unet(x, t, encoder_hidden_states=ctx, return_dict=False)[0]
        out["unet"] = rel(ours, theirs)
        z = torch.randn(1, pipe.latent_channels, side, side, generator=g).to(dev, dt)
        out["vae_decode"] = rel(pipe.vae.decode(z), peer.vae.decode(z, return_dict=False)[0])
    grid = sampling.make_grid(cfg["sampler"], cfg["steps"], pipe.noise_schedule, "normal", pipe.scheduler_config)
    peer.scheduler.set_timesteps(cfg["steps"])
    ts = peer.scheduler.timesteps.float().cpu()
    out["timesteps_max_abs"] = float((grid.timesteps.float() - ts).abs().max()) if len(ts) == grid.steps else None
    sig = getattr(peer.scheduler, "sigmas", None)
    if sig is not None and len(sig) == len(grid.sigmas):
        out["sigmas_max_rel"] = float(
            ((grid.sigmas - sig.float().cpu()).abs() / sig.float().cpu().clamp_min(1e-6)).max()
        )
    return out


def attention_order_check(peer: Any, cfg: dict[str, Any], chosen: str, other: str) -> tuple[dict[str, Any], np.ndarray]:
    """diffusers' text states, one U-Net CFG call and final latent with the run's attention kernel first
    (``chosen``) against the same with ``other`` first (each difference divided by the mean absolute value of the
    ``chosen`` output), and the ``other`` final latent (compared with every engine's by :func:`latent_agreement`).
    On the H200 diffusers' samples parted from sdengine's while each engine agreed with itself (docs/gpu.md):
    this says in one run whether the kernel order given to every engine is why. The run's order is restored."""
    import torch

    from sdengine.sdpa_backends import use_backend

    def states() -> dict[str, Any]:
        side = cfg["size"] // peer.pipe.vae_scale_factor
        g = torch.Generator("cpu").manual_seed(2)
        x = torch.randn(2, 4, side, side, generator=g).to(peer.device, peer.dtype)
        with torch.inference_mode():
            cond, uncond = peer.pipe.encode_prompt(PROMPT, peer.device, 1, True, NEGATIVE)
            t = torch.full((2,), 500.0, device=peer.device)
            eps = peer.pipe.unet(x, t, encoder_hidden_states=torch.cat([uncond, cond]), return_dict=False)[0]
        latent = peer.generate(PROMPT, NEGATIVE, cfg, 1, "latent")
        return {"text_cond": cond, "text_uncond": uncond, "unet": eps, "latent": latent}

    def rel(a: Any, b: Any) -> float:
        a, b = a.float(), b.float()
        return float((a - b).abs().mean() / b.abs().mean().clamp_min(1e-12))

    first = states()
    try:
        use_backend(other)
        second = states()
    finally:
        use_backend(chosen)
    out: dict[str, Any] = {"chosen": chosen, "other": other}
    out.update({f"{k}_rel": rel(second[k], first[k]) for k in first})
    return out, second["latent"].float().cpu().numpy()


def noise_check(peer: Any, cfg: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Whether diffusers' start noise is sdengine's. diffusers draws it with ``randn(..., dtype=half)`` on the
    CPU generator, sdengine by its seed contract in float32 (:func:`sdengine.diffusion.samplers.row_noise`) and
    then casts; ``randn_half_vs_float`` is their mean absolute difference on this torch (0: the same numbers).
    The returned final latent and image are diffusers' generation started from sdengine's noise (``latents=``),
    which :func:`latent_agreement` and :func:`agreement` compare with every engine's: the two engines on the same
    inputs end to end."""
    import torch

    from sdengine.diffusion.samplers import row_noise

    side = cfg["size"] // peer.pipe.vae_scale_factor
    shape = (4, side, side)
    ours = row_noise([torch.Generator("cpu").manual_seed(cfg["seed"])], shape)
    half = torch.randn((1, *shape), generator=torch.Generator("cpu").manual_seed(cfg["seed"]), dtype=torch.float16)
    out = {"randn_half_vs_float": float((half.float() - ours.half().float()).abs().mean())}
    start = ours.to(peer.device, peer.dtype)
    latent = peer.generate(PROMPT, NEGATIVE, cfg, 1, "latent", latents=start)
    image = np.asarray(peer.generate(PROMPT, NEGATIVE, cfg, 1, "np", latents=start), dtype=np.float32)
    return out, latent.float().cpu().numpy(), image


def graph_step_by_backend(pipe: Any, cfg: dict[str, Any]) -> dict[str, float]:
    """The graphed U-Net CFG step's milliseconds with each fused attention kernel first (graphs recorded anew
    for each); the process's choice is restored afterwards."""
    from sdengine.sdpa_backends import current_backend, use_backend

    before, out = current_backend(), {}
    try:
        for name in ("flash", "efficient", "cudnn"):
            try:
                use_backend(name)
            except Exception:  # noqa: BLE001 - a kernel this torch lacks
                continue
            for g in (pipe.cuda_graphs or {}).values():
                g.reset()
            step = sdengine_parts(pipe, cfg)["step"]
            step()
            out[name] = statistics.median(timed(step, pipe.device, 20)) * 1000
    finally:
        use_backend(before)
        for g in (pipe.cuda_graphs or {}).values():
            g.reset()
    return out


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def agreement(images: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean absolute difference of each image against the fp32 image, diffusers' fp16 image, and diffusers' fp16
    image from sdengine's start noise."""
    out: dict[str, float] = {}
    for ref in ("sdengine_fp32", "diffusers_eager", "diffusers_eager_sdengine_noise"):
        if ref not in images:
            continue
        for name, img in images.items():
            if name != ref:
                out[f"{name} vs {ref}"] = mean_abs(img, images[ref])
    return out


def latent_agreement(latents: dict[str, np.ndarray]) -> dict[str, float]:
    """The final latents (before the VAE) compared as :func:`agreement` compares images, each difference
    divided by the reference latent's mean absolute value (so 0.01 is 1% of the latent's size)."""
    out: dict[str, float] = {}
    for ref in ("sdengine_fp32", "diffusers_eager", "diffusers_eager_sdengine_noise"):
        if ref not in latents:
            continue
        scale = float(np.abs(latents[ref]).mean()) or 1.0
        for name, z in latents.items():
            if name != ref and z.shape == latents[ref].shape:
                out[f"{name} vs {ref}"] = float(np.abs(z - latents[ref]).mean()) / scale
    return out


def ratios(phases: dict[str, Any]) -> dict[str, float]:
    """peer time / sdengine time for image, step and decode (above 1: sdengine faster)."""
    out: dict[str, float] = {}
    pairs = [
        ("sdengine_eager", "diffusers_eager"),
        ("sdengine_graphs", "diffusers_eager"),
        ("sdengine_graphs_nchw", "diffusers_eager"),
        ("sdengine_graphs", "sdengine_graphs_nchw"),  # > 1: channels_last pays
        ("sdengine_graphs_fused", "sdengine_graphs"),  # > 1: fused_qkv pays (graphs path)
        ("sdengine_compiled_fused", "sdengine_compiled_warm"),  # > 1: fused_qkv pays (compiled path)
        ("sdengine_compiled_warm", "diffusers_eager"),
        ("sdengine_compiled_warm", "diffusers_compiled"),
        ("sdengine_aot_warm", "diffusers_eager"),
        ("sdengine_aot_warm", "diffusers_compiled"),
        ("sdengine_graphs", "diffusers_compiled"),
        ("sdengine_compiled_warm", "diffusers_compiled_batch8"),
        ("sdengine_aot_warm", "diffusers_compiled_batch8"),
        ("sdengine_graphs", "diffusers_compiled_batch8"),
        ("sdengine_fp8", "diffusers_eager"),
        ("sdengine_fp8", "diffusers_compiled"),
        ("sdengine_fp8", "sdengine_compiled_warm"),
    ]
    for ours, peer in pairs:
        a, b = phases.get(ours), phases.get(peer)
        if not a or not b:
            continue
        for key in ("image_s", "unet_step_ms", "vae_decode_ms", "text_encode_ms", "batch8_s"):
            if isinstance(a.get(key), int | float) and isinstance(b.get(key), int | float) and a[key] > 0:
                out[f"{peer}/{ours} {key}"] = b[key] / a[key]
    return out


def table(data: dict[str, Any]) -> str:
    """The run as a text table (what the CLI prints)."""
    info = data["phases"].get("info", {})
    lines = [
        f"{data['model']}, {data['config']['size']}x{data['config']['size']}, {data['config']['steps']} steps "
        f"{data['config']['sampler']}, CFG {data['config']['cfg']}, on {info.get('gpu', data['device'])} "
        f"(torch {info.get('torch')}, attention: {info.get('sdpa_chosen')})",
        f"{'engine':28} {'image ms':>9} {'step ms':>8} {'decode ms':>9} {'text ms':>8} {'batch-8 img/s':>13} "
        f"{'first image s':>13}",
    ]
    for name, r in data["phases"].items():
        if name in ("info", "sdengine_fp32"):
            continue

        def f(key: str, scale: float = 1.0, fmt: str = "{:.1f}", r: dict[str, Any] = r) -> str:
            v = r.get(key)
            return fmt.format(v * scale) if isinstance(v, int | float) else "-"

        lines.append(
            f"{name:28} {f('image_s', 1000):>9} {f('unet_step_ms', fmt='{:.2f}'):>8} {f('vae_decode_ms'):>9} "
            f"{f('text_encode_ms', fmt='{:.2f}'):>8} {f('batch8_images_per_s', fmt='{:.2f}'):>13} "
            f"{f('first_image_s'):>13}"
        )
    for k, v in data.get("agreement", {}).items():
        lines.append(f"agreement {k}: {v:.5f}")
    for k, v in data.get("ratios", {}).items():
        lines.append(f"ratio {k}: {v:.2f}")
    for k, v in data.get("skipped", {}).items():
        lines.append(f"skipped {k}: {v}")
    for k, v in data.get("errors", {}).items():
        lines.append(f"error {k}: {v}")
    return "\n".join(lines)


if __name__ == "__main__":  # a child process of the bench: python -m sdengine.bench_gpu '<job json>'
    print(json.dumps(child(json.loads(sys.argv[1])), default=str))
