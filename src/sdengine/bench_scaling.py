"""``sdengine bench --scaling``: how time and peak memory grow with resolution and batch, for both engines.

Whole generations at 768 or 1024 pixels take far too long on a small CPU to repeat, so the parts are measured
apart and composed:

* For every point (size, batch), from the same weights (:func:`sdengine.bench.make_random_folder` or a folder):
  ONE U-Net call on the CFG batch (``2 * batch`` latents of ``size / 8``, with the text context; each engine's
  U-Net called as its pipeline calls it) and ONE VAE decode of ``batch`` latents (sdengine: one image at a
  time, tiled by its automatic rule; diffusers: the whole batch at once). One warm-up call of each, timed and
  reported apart; then ``repeats`` timed calls, the engines taking turns; medians.
* The text encoder once per engine (a warm-up call, then one timed call): it does not depend on the point.
* The composed end-to-end estimate of a generation: ``text + calls * step + decode``, where ``calls`` is the
  number of U-Net calls the sampler makes in ``steps`` steps, counted by running it on a 2x2 latent with a
  stand-in denoiser (DPM++ 2M, the default: one per step; Heun: two but for the last). The sampler's own
  arithmetic, a few element-wise operations per step, is left out.
* Agreement: the U-Net outputs of the two engines on the same inputs (latents, timestep, and sdengine's text
  context for both), max absolute difference; the same for the decoded images and the token states.
* Peak memory: for each point and engine a fresh child process (:func:`sdengine.bench.run_worker`) loads the
  engine, encodes the text and runs one step and one decode at that point; its ``VmHWM`` in MiB.
* Before a point runs, sdengine's own memory estimate (:meth:`sdengine.pipeline.Pipeline.estimate_memory`, with
  the VAE decode of the whole batch for an engine that decodes it at once) is compared with 90% of the memory
  available now (or a given budget): an engine whose need is larger is skipped at that point, with the reason,
  instead of running the machine out of memory. Before each peak-memory child the same check runs with a copy
  of the weights and a process added (the child runs beside this process): a child that would not fit is
  skipped, and the point keeps its times.
* ``max_seconds``: once a point's step (the slower engine's median) took longer, every later point at least
  as large in both size and batch is skipped, with the reason. Every loop here is bounded by the number of
  points, engines and repeats.

diffusers is only reached through ``benchmarks/peer_diffusers.py`` (:func:`sdengine.bench.peer_module`). torch is
imported inside the functions: the child process sets its thread environment before torch loads.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from sdengine.bench import NEGATIVE, PROMPT, BenchError, load_now, peak_rss_mb, peer_module, run_worker
from sdengine.errors import SdengineError

DEFAULT_SIZES = (256, 512)
DEFAULT_BATCHES = (1,)
ENGINES = ("sdengine", "diffusers")
SIZE_MULTIPLE = 8  # the VAE's downscale factor for every SD model
MAX_SIZE = 8192  # the pipeline's largest side (sdengine.pipeline.core.MAX_SIDE)
MAX_BATCH = 64
MAX_POINTS = 64  # sizes x batches; a bench of more points would run for days on a CPU
MEMORY_FRACTION = 0.9  # of the memory available now, as the pipeline's own check (Pipeline._check_memory)
CHILD_OVERHEAD = 512 * 2**20  # a child process's interpreter, torch's libraries and a diffusers import
TIMESTEP = 500.0  # a mid-schedule timestep; the U-Net's cost does not depend on it
GIB = 2**30


# ---------------------------------------------------------------------------------------------------
# The points
# ---------------------------------------------------------------------------------------------------


def _parse_list(text: str, flag: str, *, multiple: int, largest: int, what: str) -> tuple[int, ...]:
    items = [s.strip() for s in str(text).split(",")]
    if not items or any(not s for s in items):
        raise BenchError(f"{flag} takes comma-separated {what}s, e.g. {flag} 256,512; got {text!r}")
    values = []
    for s in items:
        try:
            v = int(s)
        except ValueError:
            raise BenchError(f"{flag}: {s!r} is not a whole number ({what}s, comma-separated)") from None
        if v <= 0:
            raise BenchError(f"{flag}: {v} is not positive")
        if v % multiple:
            raise BenchError(f"{flag}: {v} is not a multiple of {multiple}")
        if v > largest:
            raise BenchError(f"{flag}: {v} is over the largest {what} {largest}")
        values.append(v)
    return tuple(sorted(set(values)))  # ascending: the --max-seconds rule skips the points after a slow one


def parse_sizes(text: str) -> tuple[int, ...]:
    """``"256,512"`` -> (256, 512): image sides in pixels, positive multiples of 8, sorted, without repeats."""
    return _parse_list(text, "--sizes", multiple=SIZE_MULTIPLE, largest=MAX_SIZE, what="image side")


def parse_batches(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4): batch sizes, sorted, without repeats."""
    return _parse_list(text, "--batches", multiple=1, largest=MAX_BATCH, what="batch size")


# ---------------------------------------------------------------------------------------------------
# The engines, cut into the parts a generation runs
# ---------------------------------------------------------------------------------------------------


class Parts(Protocol):
    """What a scaling point calls on an engine."""

    def text(self, prompt: str, negative: str) -> tuple[Any, Any]: ...  # (uncond, cond), each (1, L, D)

    def step(self, x: Any, t: Any, context: Any) -> Any: ...  # the U-Net on the CFG batch

    def decode(self, latents: Any) -> Any: ...  # (B, C, h, w) latents -> (B, 3, H, W) images in 0..1


class SdengineParts:
    """sdengine's pipeline (fp32) cut as :meth:`sdengine.pipeline.Pipeline.generate` runs it: the conditioner's
    text pair, the U-Net through the pipeline's :class:`UNetAdapter`, the VAE one image at a time
    (:func:`sdengine.vae_utils.decode` with its automatic tiling, then ``to_unit``), in ``inference_mode``."""

    def __init__(self, folder: Path, device: str, options: tuple[str, ...] = ()) -> None:
        import sdengine
        from sdengine.fastpath import apply_fast_path
        from sdengine.pipeline import Pipeline
        from sdengine.pipeline.unet_adapter import UNetAdapter

        pipe = sdengine.load_pipeline(folder, device=device, dtype="fp32")
        if not isinstance(pipe, Pipeline) or pipe.pooled_dim is not None:
            # a pixel DDPM has no VAE; a U-Net that reads a pooled text vector (SDXL) takes more than the context
            raise BenchError(f"--scaling measures SD 1.x/2.x models; {folder} is not one")
        self.pipe = pipe
        self.notes = apply_fast_path(self.pipe, options)
        self.model = UNetAdapter(self.pipe.unet, self.pipe.dtype)

    def text(self, prompt: str, negative: str) -> tuple[Any, Any]:
        import torch

        from sdengine.text import encode_cache

        # Timed like the peer's: encoded every call, never answered by the text-encoder cache.
        encode_cache.clear()
        with torch.inference_mode():
            cond, uncond = self.pipe.encode_prompt(prompt, negative)
        return uncond, cond

    def step(self, x: Any, t: Any, context: Any) -> Any:
        import torch

        with torch.inference_mode():
            return self.model(x, t, crossattn=context)

    def decode(self, latents: Any) -> Any:
        import torch

        from sdengine import vae_utils

        with torch.inference_mode():
            out = []
            for i in range(latents.shape[0]):
                img, _ = vae_utils.decode(self.pipe.vae, latents[i : i + 1], tiled=None, warn=False)
                out.append(vae_utils.to_unit(img))
            return torch.cat(out)


def make_parts(engine: str, folder: Path, device: str, options: tuple[str, ...] = ()) -> Parts:
    if engine == "sdengine":
        return SdengineParts(folder, device, options)
    if engine == "diffusers":
        return peer_module().Parts(folder, device)  # type: ignore[no-any-return]
    raise BenchError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")


def cfg_context(uncond: Any, cond: Any, batch: int) -> Any:
    """The CFG batch's text context: ``batch`` rows of the negative prompt's states, then ``batch`` of the prompt's
    (diffusers' order; sdengine's CFG batches the same rows)."""
    import torch

    return torch.cat([uncond.expand(batch, -1, -1), cond.expand(batch, -1, -1)])


@dataclass(frozen=True)
class Shapes:
    """The tensors a point feeds the engines, from the model's channels and VAE factor."""

    in_channels: int  # the U-Net's input (9 for an inpainting model)
    latent_channels: int
    factor: int

    def inputs(self, size: int, batch: int, seed: int, device: str) -> tuple[Any, Any, Any]:
        """(x, t, z): the CFG batch's latents (2 * batch rows), its timesteps, and ``batch`` latents to decode;
        drawn from ``seed`` on the CPU so that both engines (and the child processes) get the same ones."""
        import torch

        h = size // self.factor
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2 * batch, self.in_channels, h, h, generator=g).to(device)
        z = torch.randn(batch, self.latent_channels, h, h, generator=g).to(device)
        t = torch.full((2 * batch,), TIMESTEP, device=device)
        return x, t, z


def shapes_of(parts: SdengineParts) -> Shapes:
    p = parts.pipe
    return Shapes(int(p.unet.config.in_channels), int(p.latent_channels), int(p.vae_scale_factor))


def unet_calls(pipe: Any, sampler: str, steps: int) -> int:
    """How many U-Net calls ``sampler`` makes in ``steps`` steps: counted by running sdengine's sampler on a
    tiny latent with a denoiser that only counts (it returns zeros, a valid x0)."""
    import torch

    from sdengine.diffusion import sampling

    calls = 0

    def count(x: Any, sigma: Any, **cond: Any) -> Any:
        nonlocal calls
        calls += 1
        return torch.zeros_like(x)

    sampling.sample(
        count,
        torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)),
        sampler=sampler,
        steps=steps,
        scheduler_config=pipe.scheduler_config,
        generators=[torch.Generator().manual_seed(0)],
        noise_schedule=pipe.noise_schedule,
    )
    return calls


# ---------------------------------------------------------------------------------------------------
# Memory: sdengine's own estimate, before a point runs
# ---------------------------------------------------------------------------------------------------


def weights_bytes(pipe: Any) -> int:
    """Bytes of the pipeline's weights (U-Net, VAE, text encoder): what a child process loads once more."""
    total = 0
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        params = getattr(m, "parameters", None)
        if callable(params):
            total += sum(p.numel() * p.element_size() for p in params())
    return total


def memory_need(pipe: Any, size: int, batch: int, *, engine: str = "sdengine", child: bool = True) -> int:
    """Bytes a point needs for ``engine``, from sdengine's estimate of one call's activations
    (:meth:`Pipeline.estimate_memory` with CFG; the VAE tiled where sdengine's automatic rule tiles it), the
    decode of the whole batch at once for diffusers (which neither decodes one image at a time nor tiles), and,
    with ``child``, the weights and a process for the peak-memory child (it runs while this process holds its
    own copy)."""
    from sdengine import vae_utils

    latent = size // pipe.vae_scale_factor
    if engine == "diffusers":
        act = pipe.estimate_memory(size, size, batch, cfg=True, tiled=False)
        bytes_per = 4  # fp32
        act += (batch - 1) * vae_utils.vae_decode_bytes(pipe.vae, size, size, tiled=False, bytes_per=bytes_per)
    else:
        tiled = latent * latent > vae_utils.AUTO_TILE_LATENT_AREA
        act = pipe.estimate_memory(size, size, batch, cfg=True, tiled=tiled)
    if child:
        act += weights_bytes(pipe) + CHILD_OVERHEAD
    return int(act)


def memory_budget_now(device: str) -> int | None:
    """:data:`MEMORY_FRACTION` of the memory available on ``device`` now (None when it cannot be told)."""
    import torch

    from sdengine import vae_utils

    avail = vae_utils.available_memory(torch.device(device))
    return None if avail is None else int(avail * MEMORY_FRACTION)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------


@dataclass
class TextTime:
    warmup_s: float
    time_s: float


@dataclass
class EnginePoint:
    """One engine at one point: its times, its peak RSS, or why something is missing."""

    name: str
    step_warmup_s: float | None = None
    step_times_s: list[float] = field(default_factory=list)
    decode_warmup_s: float | None = None
    decode_times_s: list[float] = field(default_factory=list)
    total_s: float | None = None  # the composed estimate: text + steps * step + decode
    peak_rss_mb: float | None = None
    need_bytes: int | None = None  # sdengine's estimate of what timing this point needs for this engine
    child_need_bytes: int | None = None  # and of what its peak-memory child needs besides this process
    skipped: str | None = None  # set when the engine did not run at this point
    peak_note: str | None = None  # why the peak is missing (skipped for memory, the child failed)

    @property
    def step_s(self) -> float | None:
        return statistics.median(self.step_times_s) if self.step_times_s else None

    @property
    def decode_s(self) -> float | None:
        return statistics.median(self.decode_times_s) if self.decode_times_s else None


@dataclass
class ScalingPoint:
    size: int
    batch: int
    engines: dict[str, EnginePoint] = field(default_factory=dict)
    unet_max_abs: float | None = None  # the engines' U-Net outputs on the same inputs
    decode_max_abs: float | None = None  # their decoded images (0..1) of the same latents

    def _ratio(self, attr: str) -> float | None:
        if set(self.engines) != set(ENGINES):
            return None
        ours, theirs = getattr(self.engines["sdengine"], attr), getattr(self.engines["diffusers"], attr)
        return ours / theirs if ours is not None and theirs else None

    @property
    def step_ratio(self) -> float | None:
        """sdengine's median step time / diffusers' (below 1: sdengine is faster)."""
        return self._ratio("step_s")

    @property
    def rss_ratio(self) -> float | None:
        """sdengine's peak RSS / diffusers' (below 1: sdengine needs less)."""
        return self._ratio("peak_rss_mb")


@dataclass
class ScalingReport:
    model: str
    steps: int
    repeats: int
    device: str
    threads: str
    load: str
    sizes: list[int]
    batches: list[int]
    text: dict[str, TextTime] = field(default_factory=dict)
    text_max_abs: float | None = None
    points: list[ScalingPoint] = field(default_factory=list)
    max_seconds: float | None = None
    sampler: str = "dpmpp_2m"
    unet_calls: int | None = None  # the sampler's U-Net calls in `steps` steps (None: one per step)

    @property
    def calls(self) -> int:
        return self.unet_calls if self.unet_calls is not None else self.steps

    def point(self, size: int, batch: int) -> ScalingPoint:
        for p in self.points:
            if (p.size, p.batch) == (size, batch):
                return p
        raise KeyError((size, batch))

    def to_json(self) -> dict[str, Any]:
        points = []
        for p in self.points:
            engines = {k: {**asdict(e), "step_s": e.step_s, "decode_s": e.decode_s} for k, e in p.engines.items()}
            points.append(
                {
                    "size": p.size,
                    "batch": p.batch,
                    "engines": engines,
                    "unet_max_abs": p.unet_max_abs,
                    "decode_max_abs": p.decode_max_abs,
                    "step_ratio_sdengine_over_diffusers": p.step_ratio,
                    "rss_ratio_sdengine_over_diffusers": p.rss_ratio,
                }
            )
        return {
            "mode": "scaling",
            "model": self.model,
            "steps": self.steps,
            "repeats": self.repeats,
            "device": self.device,
            "threads": self.threads,
            "load": self.load,
            "sizes": list(self.sizes),
            "batches": list(self.batches),
            "max_seconds": self.max_seconds,
            "sampler": self.sampler,
            "unet_calls": self.unet_calls,
            "text": {k: asdict(v) for k, v in self.text.items()},
            "text_max_abs": self.text_max_abs,
            "points": points,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ScalingReport:
        """The report :meth:`to_json` wrote (derived fields, medians and ratios, are recomputed)."""
        if d.get("mode") != "scaling":
            raise BenchError("not a scaling bench report (its 'mode' is not 'scaling')")
        names = {f for f in EnginePoint.__dataclass_fields__}
        points = [
            ScalingPoint(
                p["size"],
                p["batch"],
                {k: EnginePoint(**{f: v for f, v in e.items() if f in names}) for k, e in p["engines"].items()},
                p["unet_max_abs"],
                p["decode_max_abs"],
            )
            for p in d["points"]
        ]
        return cls(
            d["model"],
            d["steps"],
            d["repeats"],
            d["device"],
            d["threads"],
            d["load"],
            list(d["sizes"]),
            list(d["batches"]),
            {k: TextTime(**v) for k, v in d["text"].items()},
            d["text_max_abs"],
            points,
            d.get("max_seconds"),
            d.get("sampler", "dpmpp_2m"),
            d.get("unet_calls"),
        )

    def table(self) -> str:
        text = ", ".join(f"{k} {v.time_s:.3f} s (warm-up {v.warmup_s:.3f} s)" for k, v in self.text.items())
        lines = [
            f"{self.model}: scaling, fp32 {self.device}; est. total = text + {self.calls} x step + decode "
            f"({self.sampler}, {self.steps} steps: {self.calls} U-Net calls; the sampler's own arithmetic left out)",
            f"threads: {self.threads}; {self.repeats} interleaved repeats per part (medians), warm-up apart; "
            f"load at start: {self.load}",
            f"text encoder: {text}",
        ]
        if self.text_max_abs is not None:
            lines[-1] += f"; token states max |diff| {self.text_max_abs:.1e}"
        lines.append(
            f"{'size':>5s} {'batch':>5s} {'engine':10s} {'step s':>9s} {'warm-up s':>9s} {'decode s':>9s} "
            f"{'est. total s':>12s} {'peak RSS MiB':>12s} {'step ratio':>10s} {'RSS ratio':>9s} {'U-Net max|d|':>12s}"
        )

        def num(v: float | None, fmt: str, width: int) -> str:
            return f"{v:{width}{fmt}}" if v is not None else f"{'-':>{width}s}"

        for p in self.points:
            for name, e in p.engines.items():
                head = f"{p.size:5d} {p.batch:5d} {name:10s}"
                if e.skipped is not None:
                    lines.append(f"{head} skipped: {e.skipped}")
                    continue
                line = (
                    f"{head} {num(e.step_s, '.3f', 9)} {num(e.step_warmup_s, '.3f', 9)} {num(e.decode_s, '.3f', 9)} "
                    f"{num(e.total_s, '.1f', 12)} {num(e.peak_rss_mb, '.0f', 12)}"
                )
                if name == "sdengine" and len(p.engines) > 1:
                    sr, rr = p.step_ratio, p.rss_ratio
                    line += f" {num(sr, '.2f', 10)} {num(rr, '.2f', 9)} {num(p.unet_max_abs, '.1e', 12)}"
                if e.peak_note:
                    line += f"  (peak: {e.peak_note})"
                lines.append(line)
        lines.append("ratios: sdengine / diffusers (below 1: sdengine is faster, or needs less memory)")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------------


def _progress(line: str) -> None:
    print(f"[bench --scaling] {line}", file=sys.stderr, flush=True)


def _sync(device: str) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, device: str, *args: Any) -> tuple[float, Any]:
    _sync(device)
    t0 = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - t0, out


def _max_abs(a: Any, b: Any) -> float:
    if tuple(a.shape) != tuple(b.shape):
        raise BenchError(f"the engines gave outputs of different shapes: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.double().cpu() - b.double().cpu()).abs().max())


def _amount(n: int) -> str:
    # GiB for the sizes that matter; MiB below one GiB, where two amounts would otherwise print alike
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"


def _child(job: dict[str, Any]) -> dict[str, Any]:
    """Runs in a fresh process: load one engine, encode the text, one step and one decode at the job's point."""
    from sdengine.threads import configure_threads, prepare_environment

    prepare_environment()
    configure_threads(job.get("threads"))
    device = job["device"]
    parts = make_parts(job["engine"], Path(job["folder"]), device, tuple(job.get("options", ())))
    uncond, cond = parts.text(PROMPT, NEGATIVE)
    x, t, z = Shapes(*job["shapes"]).inputs(job["size"], job["batch"], job["seed"], device)
    step_s, _ = _timed(parts.step, device, x, t, cfg_context(uncond, cond, job["batch"]))
    decode_s, _ = _timed(parts.decode, device, z)
    return {"peak_rss_mb": peak_rss_mb(), "step_s": step_s, "decode_s": decode_s}


def peak_rss_at(
    folder: Path,
    engine: str,
    size: int,
    batch: int,
    shapes: Shapes,
    *,
    device: str = "cpu",
    threads: int | None = None,
    options: tuple[str, ...] = (),
    seed: int = 0,
    timeout: float = 3600,
) -> float:
    """Peak RSS (MiB) of a fresh process that loads ``engine`` and runs one step and one decode at the point."""
    job = {
        "engine": engine,
        "folder": str(folder),
        "device": device,
        "size": size,
        "batch": batch,
        "shapes": [shapes.in_channels, shapes.latent_channels, shapes.factor],
        "threads": threads,
        "options": list(options),
        "seed": seed,
    }
    return float(run_worker(job, timeout=timeout, module="sdengine.bench_scaling")["peak_rss_mb"])


def _too_slow(size: int, batch: int, slow: list[tuple[int, int, float]], limit: float | None) -> str | None:
    for s, b, took in slow:
        if size >= s and batch >= b:
            return f"the step at {s} px, batch {b} took {took:.3g} s, over --max-seconds {limit:g}"
    return None


def run_scaling(
    folder: Path,
    *,
    model: str,
    sizes: tuple[int, ...] = DEFAULT_SIZES,
    batches: tuple[int, ...] = DEFAULT_BATCHES,
    steps: int = 25,
    sampler: str = "dpmpp_2m",
    repeats: int = 3,
    compare: str | None = "diffusers",
    device: str = "cpu",
    options: tuple[str, ...] = (),
    memory: bool = True,
    max_seconds: float | None = None,
    memory_budget: int | None = None,
    seed: int = 0,
) -> ScalingReport:
    """The scaling bench (see the module docstring). ``options``: sdengine's fast path (default
    :data:`sdengine.fastpath.DEFAULT_OPTIONS`); ``memory``: measure peak RSS in child processes;
    ``memory_budget``: bytes a point may need (default: 90% of the memory available before each point)."""
    import torch

    from sdengine.fastpath import DEFAULT_OPTIONS

    if repeats < 1:
        raise BenchError(f"--repeats must be at least 1, got {repeats}")
    if steps < 1:
        raise BenchError(f"--steps must be at least 1, got {steps}")
    if compare not in (None, "diffusers"):
        raise BenchError(f"--compare takes 'diffusers' or 'none', got {compare!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise BenchError(f"--max-seconds must be positive, got {max_seconds}")
    if memory_budget is not None and memory_budget <= 0:
        raise BenchError(f"the memory budget must be positive, got {memory_budget}")
    sizes, batches = tuple(sorted(set(sizes))), tuple(sorted(set(batches)))
    if not sizes or not batches or len(sizes) * len(batches) > MAX_POINTS:
        raise BenchError(f"give 1 to {MAX_POINTS} points (sizes x batches), got {len(sizes)} x {len(batches)}")
    opts = tuple(options) if options else tuple(sorted(DEFAULT_OPTIONS))
    load = load_now()
    ours = SdengineParts(folder, device, opts)
    engines: dict[str, Parts] = {"sdengine": ours}
    if compare == "diffusers":
        engines["diffusers"] = make_parts("diffusers", folder, device)
    pipe = ours.pipe
    shapes = shapes_of(ours)
    for size in sizes:
        if size % pipe.size_multiple:
            raise BenchError(f"--sizes: {size} is not a multiple of {pipe.size_multiple} for {model}")
    report = ScalingReport(
        model, steps, repeats, device, f"{torch.get_num_threads()} torch thread(s)", load, list(sizes), list(batches)
    )
    report.max_seconds = max_seconds
    report.sampler = sampler
    try:
        report.unet_calls = unet_calls(pipe, sampler, steps)
    except SdengineError as err:
        raise BenchError(f"--sampler {sampler}: {err}") from None

    pairs: dict[str, tuple[Any, Any]] = {}
    for name, parts in engines.items():  # the text encoder: a warm-up call, then one timed call
        warm, _ = _timed(parts.text, device, PROMPT, NEGATIVE)
        took, pairs[name] = _timed(parts.text, device, PROMPT, NEGATIVE)
        report.text[name] = TextTime(warm, took)
        _progress(f"{name}: text encoder {took:.3f} s (warm-up {warm:.3f} s)")
    if "diffusers" in pairs:
        report.text_max_abs = max(
            _max_abs(pairs["sdengine"][i], pairs["diffusers"][i].to(pairs["sdengine"][i].dtype)) for i in (0, 1)
        )
    uncond, cond = pairs["sdengine"]  # the same text context for both engines' U-Nets: the outputs compare
    child_timeout = 3600.0 if max_seconds is None else max(600.0, 20 * max_seconds)

    slow: list[tuple[int, int, float]] = []  # points whose step took over max_seconds
    for size in sizes:
        for batch in batches:
            point = ScalingPoint(size, batch, {name: EnginePoint(name) for name in engines})
            report.points.append(point)
            too_slow = _too_slow(size, batch, slow, max_seconds)
            budget = memory_budget if memory_budget is not None else memory_budget_now(device)
            running: dict[str, Parts] = {}
            for name, parts in engines.items():
                e = point.engines[name]
                e.need_bytes = memory_need(pipe, size, batch, engine=name, child=False)
                e.child_need_bytes = memory_need(pipe, size, batch, engine=name, child=True) if memory else None
                if too_slow is not None:
                    e.skipped = too_slow
                elif budget is not None and e.need_bytes > budget:
                    e.skipped = f"needs ~{_amount(e.need_bytes)}, {_amount(budget)} available"
                else:
                    running[name] = parts
                if e.skipped:
                    _progress(f"{size} px, batch {batch}, {name}: skipped: {e.skipped}")
            if not running:
                continue
            x, t, z = shapes.inputs(size, batch, seed, device)
            ctx = cfg_context(uncond, cond, batch)
            outs: dict[str, Any] = {}
            images: dict[str, Any] = {}
            for name, parts in running.items():  # warm-up, kept for the agreement check
                e = point.engines[name]
                e.step_warmup_s, outs[name] = _timed(parts.step, device, x, t, ctx)
            for name, parts in running.items():
                e = point.engines[name]
                e.decode_warmup_s, images[name] = _timed(parts.decode, device, z)
                _progress(
                    f"{size} px, batch {batch}, {name}: warm-up step {e.step_warmup_s:.3f} s, "
                    f"decode {e.decode_warmup_s:.3f} s"
                )
            if len(outs) == 2:
                point.unet_max_abs = _max_abs(outs["sdengine"], outs["diffusers"])
                point.decode_max_abs = _max_abs(images["sdengine"], images["diffusers"])
            del outs, images
            for r in range(repeats):  # the engines take turns
                for name, parts in running.items():
                    took, _ = _timed(parts.step, device, x, t, ctx)
                    point.engines[name].step_times_s.append(took)
                for name, parts in running.items():
                    took, _ = _timed(parts.decode, device, z)
                    point.engines[name].decode_times_s.append(took)
                _progress(
                    f"{size} px, batch {batch}: repeat {r + 1}/{repeats} "
                    + ", ".join(
                        f"{n} step {point.engines[n].step_times_s[-1]:.3f} s decode "
                        f"{point.engines[n].decode_times_s[-1]:.3f} s"
                        for n in running
                    )
                )
            for name in running:
                e = point.engines[name]
                assert e.step_s is not None and e.decode_s is not None
                e.total_s = report.text[name].time_s + report.calls * e.step_s + e.decode_s
            if memory:
                for name in running:
                    e = point.engines[name]
                    assert e.child_need_bytes is not None
                    budget = memory_budget if memory_budget is not None else memory_budget_now(device)
                    if budget is not None and e.child_need_bytes > budget:
                        e.peak_note = f"skipped: needs ~{_amount(e.child_need_bytes)}, {_amount(budget)} available"
                        _progress(f"{size} px, batch {batch}, {name}: peak {e.peak_note}")
                        continue
                    try:
                        e.peak_rss_mb = peak_rss_at(
                            folder,
                            name,
                            size,
                            batch,
                            shapes,
                            device=device,
                            threads=torch.get_num_threads(),
                            options=opts if name == "sdengine" else (),
                            seed=seed,
                            timeout=child_timeout,
                        )
                        _progress(f"{size} px, batch {batch}, {name}: peak RSS {e.peak_rss_mb:.0f} MiB")
                    except subprocess.TimeoutExpired:
                        e.peak_note = f"the child process ran over {child_timeout:.0f} s"
                    except BenchError as err:
                        e.peak_note = str(err)
            slowest = max(point.engines[n].step_s or 0.0 for n in running)
            if max_seconds is not None and slowest > max_seconds:
                slow.append((size, batch, slowest))
    return report


def write_json(report: ScalingReport, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return out


if __name__ == "__main__":  # a child process of peak_rss_at (through sdengine.bench.run_worker)
    result = _child(json.loads(sys.argv[1]))
    print(json.dumps(result))
