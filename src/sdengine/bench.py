"""``sdengine bench``: how long a generation takes and how much memory it needs, against diffusers when asked.

What is measured, and how (docs/performance.md has the results and the commands):

* Both engines load the SAME weights: a diffusers folder (``--model``) or one written here with random
  weights of a named architecture (:func:`make_random_folder`: ``tiny``, ``medium``, ``sd15``), and
  generate the same image: prompt, negative prompt, seed(s), steps, sampler (the diffusers scheduler
  sdengine's sampler table names), guidance scale, size, fp32.
* A call is timed whole: text encoding (the text-encoder cache cleared first, so it is not skipped), sampling,
  VAE decode, conversion to PIL images. One warm-up call
  per engine is timed and reported apart; then the repeats run interleaved (sdengine, diffusers,
  sdengine, ...) in one process, so that load from other processes hits both alike. Medians and the
  ratio of medians are reported.
* Agreement: mean absolute difference of the two engines' images on 0..1 pixels (before quantisation).
* Peak memory: each engine's peak RSS is measured in a fresh child process (load, one warm-up, one
  generation): peaks inside one process would mix the two engines.
* Fast-path options (:mod:`sdengine.fastpath`): each measured on its own against sdengine's fp32 eager in
  the same process, with its image's distance to the eager one.
* ``--under-load``: the generation timed in child processes on an otherwise idle machine and next to one
  competing busy process, with sdengine's start-up thread choice (:mod:`sdengine.threads`) and with
  torch's defaults, to show why the choice is made.

diffusers is a development extra (a test oracle): it is imported only by ``benchmarks/peer_diffusers.py``,
which only the comparison path here imports, lazily.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sdengine.diffusion.schedules import SD_BETAS
from sdengine.errors import SdengineError

PROMPT = "a photograph of an astronaut riding a horse, detailed, sharp focus"
NEGATIVE = "blurry, low quality"
RANDOM_PRESETS = ("tiny", "medium", "sd15")
# SD 1.5's scheduler config (the PNDM one its folders ship); the bench's sampler reads its betas and spacing.
SD1_SCHEDULER: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    **SD_BETAS,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "timestep_spacing": "leading",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
}


class BenchError(SdengineError, ValueError):
    """A bench that cannot run as asked (missing comparison package, bad option)."""


# ---------------------------------------------------------------------------------------------------
# The weights
# ---------------------------------------------------------------------------------------------------


def preset_configs(preset: str) -> tuple[Any, Any, Any]:
    """(UNetConfig, VAEConfig, CLIPTextConfig) of a random-weights architecture."""
    import dataclasses as dc

    from sdengine.models import clip_text, unet, vae

    if preset == "tiny":
        text = clip_text.CLIPTextConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
        )
        u, v = unet.TINY_SD, vae.TINY
    elif preset == "medium":  # the size the pipeline tests use
        text = clip_text.CLIPTextConfig(
            hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4
        )
        u, v = unet.MEDIUM_SD, vae.MEDIUM
    elif preset == "sd15":  # Stable Diffusion 1.5's real sizes
        text, u, v = clip_text.SD1, unet.SD15, vae.SD
    else:
        raise BenchError(f"unknown random model {preset!r}; valid: {', '.join(RANDOM_PRESETS)}")
    return dc.replace(u, cross_attention_dim=text.hidden_size), v, text


def make_random_folder(dst: str | Path, preset: str, *, seed: int = 0, dtype: str | None = None) -> Path:
    """Write a diffusers folder with random weights of ``preset`` at ``dst`` (reused when it is already there).

    Default initialisation plus small noise on every parameter, so that norms and biases are not all 1/0.
    ``dtype="fp16"`` stores the weights in half precision, as SD checkpoints usually ship (the GPU bench).
    """
    import torch

    from sdengine.models.clip_text import CLIPTextModel
    from sdengine.models.unet import UNet
    from sdengine.models.vae import AutoencoderKL
    from sdengine.weights.loading import LoadedCheckpoint, save_diffusers_folder

    dst = Path(dst)
    if (dst / "model_index.json").is_file():
        return dst
    ucfg, vcfg, tcfg = preset_configs(preset)
    torch.manual_seed(seed)
    models = {"unet": UNet(ucfg), "vae": AutoencoderKL(vcfg), "text_encoder": CLIPTextModel(tcfg)}
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in models.values():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g), alpha=0.02)
    ckpt = LoadedCheckpoint(
        source=dst,
        layout="diffusers",
        state_dicts={k: {n: t.contiguous() for n, t in m.state_dict().items()} for k, m in models.items()},
        configs={
            "unet": ucfg.to_diffusers(),
            "vae": vcfg.to_diffusers(),
            "text_encoder": tcfg.to_transformers(),
            "scheduler": dict(SD1_SCHEDULER),
        },
        prediction_type="epsilon",
        family="sd1",
    )
    tmp = dst.with_name(dst.name + ".partial")
    save_diffusers_folder(ckpt, tmp, dtype=dtype)
    tmp.rename(dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# What is generated, and by whom
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenSpec:
    """One generation, the same for every engine."""

    size: int
    steps: int = 25
    batch: int = 1
    sampler: str = "dpmpp_2m"
    cfg: float = 7.5
    seed: int = 0
    device: str = "cpu"  # any torch device; the seeds' generators stay on the CPU for both engines
    dtype: str = "fp32"  # sdengine's (the peer runs fp32, eager: what its users get on a CPU)

    @property
    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.batch)]  # sdengine's rule for a batch


Engine = Callable[[], np.ndarray]  # one timed generation -> (N, H, W, 3) float pixels in 0..1


def sdengine_engine(folder: Path, spec: GenSpec, options: tuple[str, ...] = ()) -> tuple[Engine, list[str]]:
    """sdengine's pipeline for ``folder``, in ``spec.dtype`` on ``spec.device``, with fast-path ``options`` applied."""
    import sdengine
    from sdengine.fastpath import apply_fast_path
    from sdengine.text import encode_cache

    pipe = sdengine.load_pipeline(folder, device=spec.device, dtype=spec.dtype, fast_path="none")
    notes = apply_fast_path(pipe, options)

    def run() -> np.ndarray:
        # Every timed call encodes its text, as the peer does: the text-encoder cache would answer the repeated
        # prompt (sdengine.text.encode_cache; benchmarks/text_cache.py measures what it saves).
        encode_cache.clear()
        return pipe(
            PROMPT,
            NEGATIVE,
            steps=spec.steps,
            sampler=spec.sampler,
            schedule="normal",
            cfg_scale=spec.cfg,
            seed=spec.seed,
            width=spec.size,
            height=spec.size,
            batch_size=spec.batch,
            progress=False,
        ).arrays

    return run, notes


def folder_default_size(folder: Path) -> int:
    """A diffusers folder's own image side, read from its configs without loading it: the U-Net's sample size x
    the VAE's downscale factor (512 for SD 1.x, 64 for the built-in emoji model)."""
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{folder}: cannot read its size from unet/ and vae/config.json ({e}): give --size") from None


def check_peer_loads(folder: Path) -> None:
    """Refuse, in one line before any timing, a folder diffusers cannot load: one whose ``model_index.json`` names
    sdengine's own classes (the built-in ``emoji`` model's MiniLM text encoder and BERT tokenizer), which
    diffusers' pipeline loader stops on with a traceback."""
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BenchError(f"{folder}: cannot read model_index.json ({e})") from None
    ours = [
        f"{key} ({v[1]})"
        for key, v in index.items()
        if isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0] == "sdengine"
    ]
    if ours:
        raise BenchError(
            f"{folder}: diffusers cannot load this model (its {', '.join(ours)} "
            f"{'is' if len(ours) == 1 else 'are'} sdengine's own): give --compare none to time sdengine alone"
        )


def diffusers_engine(folder: Path, spec: GenSpec) -> Engine:
    """diffusers' StableDiffusionPipeline for ``folder`` (fp32, CPU, eager): the comparison.

    diffusers is a test oracle, never a dependency of the package: the peer engine lives in the repository's
    ``benchmarks/peer_diffusers.py`` and is loaded from there by path (a source checkout with the dev extras)."""
    return peer_module().engine(folder, spec, PROMPT, NEGATIVE)


def peer_module() -> Any:
    """``benchmarks/peer_diffusers.py`` loaded by path (a source checkout with the dev extras): the comparison
    engine's module (:func:`diffusers_engine`, and the scaling mode's parts in sdengine.bench_scaling)."""
    import importlib.util

    peer = Path(__file__).resolve().parents[2] / "benchmarks" / "peer_diffusers.py"
    if not peer.is_file():
        raise BenchError(f"--compare diffusers needs a source checkout of sdengine ({peer} not found)")
    module_spec = importlib.util.spec_from_file_location("sdengine_bench_peer_diffusers", peer)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:
        raise BenchError(f"--compare diffusers needs the dev extras (pip install -e '.[dev]'): {e}") from None
    return module


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


@dataclass
class EngineTimes:
    name: str
    warmup_s: float
    times_s: list[float] = field(default_factory=list)
    peak_rss_mb: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    @property
    def best_s(self) -> float:
        return min(self.times_s)


def mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two image batches in 0..1."""
    if a.shape != b.shape:
        raise BenchError(f"the engines made images of different shapes: {a.shape} vs {b.shape}")
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def interleaved(engines: dict[str, Engine], repeats: int) -> tuple[dict[str, EngineTimes], dict[str, np.ndarray]]:
    """One timed warm-up each (its image kept for the agreement check), then ``repeats`` rounds in turn."""
    results: dict[str, EngineTimes] = {}
    images: dict[str, np.ndarray] = {}
    for name, fn in engines.items():
        t0 = time.perf_counter()
        images[name] = fn()
        results[name] = EngineTimes(name, time.perf_counter() - t0)
        _progress(f"{name}: warm-up {results[name].warmup_s:.2f} s")
    for r in range(repeats):
        for name, fn in engines.items():
            t0 = time.perf_counter()
            fn()
            results[name].times_s.append(time.perf_counter() - t0)
            _progress(f"{name}: repeat {r + 1}/{repeats} {results[name].times_s[-1]:.2f} s")
    return results, images


def _progress(line: str) -> None:
    # stderr, as each call ends: a long bench on a busy machine shows where it is
    print(f"[bench] {line}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------
# Child processes: peak RSS and the under-load runs
# ---------------------------------------------------------------------------------------------------


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load one engine, warm up, time ``repeats`` generations, report peak RSS."""
    from sdengine.threads import configure_threads, prepare_environment

    if job.get("sdengine_threads", True):
        prepare_environment()
        settings = configure_threads(job.get("threads")).describe()
    else:  # torch's own defaults: as many threads as CPUs, OpenMP's default wait policy
        import torch

        settings = (
            f"torch defaults ({torch.get_num_threads()} threads, OMP_WAIT_POLICY "
            f"{os.environ.get('OMP_WAIT_POLICY', 'default')})"
        )
    spec = GenSpec(**job["spec"])
    folder = Path(job["folder"])
    if job["engine"] == "sdengine":
        fn, _ = sdengine_engine(folder, spec, tuple(job.get("options", ())))
    else:
        fn = diffusers_engine(folder, spec)
    t0 = time.perf_counter()
    fn()
    warm = time.perf_counter() - t0
    times = []
    for _ in range(int(job.get("repeats", 1))):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"warmup_s": warm, "times_s": times, "peak_rss_mb": peak_rss_mb(), "threads": settings}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, which starts afresh at exec. (getrusage's
    ru_maxrss does not: on Linux it keeps the forking parent's RSS, which would mix the engines.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux, bytes on macOS


def run_worker(
    job: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 3600,
    module: str = "sdengine.bench",
    stderr_path: Path | None = None,
) -> dict[str, Any]:
    """:func:`_worker` in a child process (``python -m sdengine.bench``); its JSON answer. ``module``: another
    module whose ``__main__`` reads the job from ``argv[1]`` and prints one JSON line (sdengine.bench_scaling).
    ``stderr_path``: where the child's whole stderr is kept when it fails (the error names its exception line)."""
    child_env = dict(os.environ if env is None else env)
    src = str(Path(__file__).resolve().parent.parent)
    child_env["PYTHONPATH"] = src + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        # -X faulthandler: a child killed by a signal (a native crash) still prints its Python stack to stderr
        [sys.executable, "-X", "faulthandler", "-m", module, json.dumps(job)],
        capture_output=True,
        text=True,
        env=child_env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        if stderr_path is not None:
            stderr_path.write_text(proc.stderr)
        why = failure_line(proc.stderr)
        raise BenchError(f"bench child process for {job['engine']} failed (exit {proc.returncode}): {why}")
    return json.loads(lines[-1])


def failure_line(stderr: str) -> str:
    """The line of a child's stderr that says why it failed: the last exception line (``ValueError: ...``) when
    there is one, else the last line (a warning's source line is not the reason)."""
    lines = [ln.rstrip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit|Failure)\b(:|$)", ln):
            return ln
    return lines[-1] if lines else "no output"


def peak_rss(folder: Path, spec: GenSpec, engine: str, threads: int | None, options: tuple[str, ...] = ()) -> float:
    """Peak RSS (MiB) of loading ``engine`` and generating twice (warm-up + one), in a fresh process."""
    job = {
        "engine": engine,
        "folder": str(folder),
        "spec": dataclasses.asdict(spec),
        "repeats": 1,
        "threads": threads,
        "options": list(options),
    }
    return float(run_worker(job)["peak_rss_mb"])


@dataclass
class LoadResult:
    setting: str
    idle_s: list[float] = field(default_factory=list)
    loaded_s: list[float] = field(default_factory=list)
    threads_idle: str = ""
    threads_loaded: str = ""

    @property
    def slowdown(self) -> float:
        return statistics.median(self.loaded_s) / statistics.median(self.idle_s)


def busy_process() -> subprocess.Popen:
    """A competing process that keeps one CPU busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def under_load(
    folder: Path, spec: GenSpec, repeats: int, threads: int | None, compare: str | None = None
) -> list[LoadResult]:
    """Generation time (median of ``repeats`` per child) idle and beside one busy process, interleaved,
    for sdengine's start-up thread choice and for torch's defaults (OMP_WAIT_POLICY and GOMP_SPINCOUNT unset,
    all CPUs);
    with ``compare``, diffusers with torch's defaults too (what its users get)."""
    base_env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    settings: list[tuple[str, str, dict[str, Any]]] = [
        ("sdengine, start-up choice", "sdengine", {"sdengine_threads": True, "threads": threads}),
        ("sdengine, torch defaults", "sdengine", {"sdengine_threads": False}),
    ]
    if compare == "diffusers":
        settings.append(("diffusers, torch defaults", "diffusers", {"sdengine_threads": False}))
    out = []
    for label, engine, extra in settings:
        res = LoadResult(label)
        job = {"engine": engine, "folder": str(folder), "spec": dataclasses.asdict(spec), "repeats": repeats, **extra}
        for _ in range(2):  # idle, loaded, idle, loaded
            r = run_worker(job, env=base_env)
            res.idle_s.append(statistics.median(r["times_s"]))
            res.threads_idle = r["threads"]
            hog = busy_process()
            try:
                time.sleep(0.5)  # let it be running when the child picks its threads
                r = run_worker(job, env=base_env)
            finally:
                hog.kill()
                hog.wait()
            res.loaded_s.append(statistics.median(r["times_s"]))
            res.threads_loaded = r["threads"]
        out.append(res)
    return out


# ---------------------------------------------------------------------------------------------------
# The whole bench
# ---------------------------------------------------------------------------------------------------


@dataclass
class OptionResult:
    option: str
    eager_s: float
    option_s: float
    first_call_s: float  # includes compilation for `compile`
    mean_abs: float
    max_abs: float
    eager_times_s: list[float] = field(default_factory=list)
    option_times_s: list[float] = field(default_factory=list)

    @property
    def speedup(self) -> float:
        return self.eager_s / self.option_s


@dataclass
class BenchReport:
    model: str
    spec: GenSpec
    threads: str
    repeats: int
    load: str
    engines: dict[str, EngineTimes]
    agreement: float | None = None
    options: list[OptionResult] = field(default_factory=list)
    under_load: list[LoadResult] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        """diffusers' median time / sdengine's (above 1: sdengine is faster)."""
        if "diffusers" not in self.engines:
            return None
        return self.engines["diffusers"].median_s / self.engines["sdengine"].median_s

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model": self.model,
            "spec": dataclasses.asdict(self.spec),
            "threads": self.threads,
            "repeats": self.repeats,
            "load": self.load,
            "agreement_mean_abs": self.agreement,
            "speedup_vs_diffusers": self.ratio,
            "engines": {
                k: {**dataclasses.asdict(v), "median_s": v.median_s, "best_s": v.best_s}
                for k, v in self.engines.items()
            },
            "options": [{**dataclasses.asdict(o), "speedup": o.speedup} for o in self.options],
            "under_load": [{**dataclasses.asdict(r), "slowdown": r.slowdown} for r in self.under_load],
        }
        return d

    def table(self) -> str:
        s = self.spec
        lines = [
            f"{self.model}: {s.size}x{s.size}, batch {s.batch}, {s.steps} steps {s.sampler}, cfg {s.cfg}, "
            f"sdengine {s.dtype}{', diffusers fp32' if 'diffusers' in self.engines else ''}, {s.device}",
            f"threads: {self.threads}; {self.repeats} interleaved repeats; load at start: {self.load}",
            f"{'engine':12s} {'warm-up s':>10s} {'median s':>10s} {'best s':>10s} {'peak RSS MiB':>13s}",
        ]
        for e in self.engines.values():
            rss = f"{e.peak_rss_mb:13.0f}" if e.peak_rss_mb is not None else f"{'-':>13s}"
            lines.append(f"{e.name:12s} {e.warmup_s:10.3f} {e.median_s:10.3f} {e.best_s:10.3f} {rss}")
        lines += [f"note: {n}" for e in self.engines.values() for n in e.notes if n.startswith("bf16 on this CPU")]
        if self.ratio is not None:
            ours, theirs = self.engines["sdengine"], self.engines["diffusers"]
            line = f"speed-up sdengine vs diffusers (median time ratio): {self.ratio:.2f}x"
            if ours.peak_rss_mb and theirs.peak_rss_mb:
                line += f"; peak RSS sdengine / diffusers: {ours.peak_rss_mb / theirs.peak_rss_mb:.2f}"
            lines.append(line)
            lines.append(f"images agree: mean |difference| {self.agreement:.2e} (0..1 pixels)")
        if self.options:
            lines.append(
                f"{'option':14s} {'eager s':>9s} {'option s':>9s} {'speed-up':>9s} {'1st call s':>11s} "
                f"{'mean |diff|':>12s} {'max |diff|':>11s}"
            )
            for o in self.options:
                lines.append(
                    f"{o.option:14s} {o.eager_s:9.3f} {o.option_s:9.3f} {o.speedup:8.2f}x "
                    f"{o.first_call_s:11.1f} {o.mean_abs:12.2e} {o.max_abs:11.2e}"
                )
        for r in self.under_load:
            lines.append(
                f"under load, {r.setting}: idle {statistics.median(r.idle_s):.2f} s, one busy process "
                f"{statistics.median(r.loaded_s):.2f} s -> {r.slowdown:.2f}x  "
                f"[idle: {r.threads_idle}; loaded: {r.threads_loaded}]"
            )
        return "\n".join(lines)


def load_now() -> str:
    from sdengine.threads import busy_elsewhere, usable_cpus

    try:
        avg = "load average " + "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        avg = "load average unknown"
    cpus = usable_cpus()  # more runnable tasks than CPUs still means every CPU (not "3 of 2")
    return f"{avg}, {min(busy_elsewhere(), cpus)} of {cpus} CPUs busy elsewhere"


def measure_options(folder: Path, spec: GenSpec, options: tuple[str, ...], repeats: int) -> list[OptionResult]:
    """Each option on its own against fp32 eager, interleaved in this process, with its image distance."""
    out = []
    for opt in options:
        eager, _ = sdengine_engine(folder, spec)
        fast, _ = sdengine_engine(folder, spec, (opt,))
        times, images = interleaved({"eager": eager, opt: fast}, repeats)
        diff = np.abs(images[opt].astype(np.float64) - images["eager"].astype(np.float64))
        out.append(
            OptionResult(
                opt,
                times["eager"].median_s,
                times[opt].median_s,
                times[opt].warmup_s,
                float(diff.mean()),
                float(diff.max()),
                times["eager"].times_s,
                times[opt].times_s,
            )
        )
    return out


def run_bench(
    folder: Path,
    spec: GenSpec,
    *,
    model: str,
    compare: str | None = "diffusers",
    repeats: int = 3,
    options: tuple[str, ...] = (),
    measure_options_of: tuple[str, ...] = (),
    memory: bool = True,
    load_test: bool = False,
    threads: int | None = None,
) -> BenchReport:
    """The bench: see the module docstring. ``options``: sdengine's fast path for the comparison (default
    :data:`sdengine.fastpath.DEFAULT_OPTIONS`); ``measure_options_of``: options each timed on its own."""
    import torch

    from sdengine.fastpath import DEFAULT_OPTIONS

    if repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {repeats}")
    if compare not in (None, "diffusers"):
        raise BenchError(f"--compare takes 'diffusers', got {compare!r}")
    opts = tuple(options) if options else tuple(sorted(DEFAULT_OPTIONS))
    load = load_now()
    ours, notes = sdengine_engine(folder, spec, opts)
    engines: dict[str, Engine] = {"sdengine": ours}
    if compare == "diffusers":
        engines["diffusers"] = diffusers_engine(folder, spec)
    times, images = interleaved(engines, repeats)
    from sdengine.devices import cpu_native_bf16, resolve_dtype

    if str(spec.device).startswith("cpu") and resolve_dtype(spec.dtype, torch.device("cpu")) == torch.bfloat16:
        native = cpu_native_bf16()
        notes = [*notes, "bf16 on this CPU: " + ("native (AVX-512-BF16 or AMX)" if native else "emulated")]
    times["sdengine"].notes = notes
    report = BenchReport(model, spec, f"{torch.get_num_threads()} torch thread(s)", repeats, load, times)
    if compare == "diffusers":
        report.agreement = mean_abs(images["sdengine"], images["diffusers"])
    if memory:
        for name in engines:
            times[name].peak_rss_mb = peak_rss(
                folder, spec, name, torch.get_num_threads(), opts if name == "sdengine" else ()
            )
    if measure_options_of:
        report.options = measure_options(folder, spec, measure_options_of, repeats)
    if load_test:
        report.under_load = under_load(folder, spec, max(1, repeats // 2), threads, compare)
    return report


if __name__ == "__main__":  # a child process of run_worker
    result = _worker(json.loads(sys.argv[1]))
    print(json.dumps(result))
