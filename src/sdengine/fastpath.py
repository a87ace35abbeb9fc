"""Optional speed-ups applied to a loaded pipeline's networks, each one measured on its own by ``sdengine bench``.

An option is on by default (``DEFAULT_OPTIONS``, applied by ``load_pipeline`` for fp32 on the CPU) only when the
bench showed it faster than fp32 eager AND the image within ``TOLERANCE`` of fp32 eager's. The numbers are in
docs/performance.md; in short, on the 2-core AVX2 CPU there:

* ``winograd`` (off by default: a memory-for-speed trade): the 3x3 convolutions with many channels run as
  Winograd F(4x4,3x3) (:mod:`sdengine.nn.winograd`): a quarter of the multiplications in 36 GEMMs plus two
  memory-bound transforms; up to 3x faster per layer at SD 1.5's U-Net shapes when the filter transforms are
  cached, and those are 4x the filters' memory. SD 1.5 at 512x512: the U-Net step 1.24x faster with 3.9 GB of
  transforms cached, 1.06x with 0.5 GB; with none cached (the transform recomputed per call) no faster end to
  end and 7% more peak memory (the transforms' temporaries), so it is not on by default. Layers with few
  channels, or images smaller than 8 latent pixels a side, keep the direct convolution.
* ``channels_last``: convolution weights (and so activations) in NHWC. oneDNN reorders to its blocked
  layout either way on x86; U-Net-alone and single-convolution timings were within noise of NCHW (or
  slower), so it stays off.
* ``aot``: the U-Net and the VAE decode compiled ahead of time with AOTInductor (:mod:`sdengine.aot`): the first
  use of a shape compiles a package into ``compile_cache_dir()/aoti`` (as long as ``compile``), later processes
  load it without tracing; the live weights are bound in, so one package serves every checkpoint of an
  architecture. Not on by default; on CUDA unproven: on an H200 (torch 2.11) the SD 1.5 processes crashed with
  packages that held no weights; CUDA now takes packages that carry a copy (``SDENGINE_AOT_PACKAGING``,
  :mod:`sdengine.aot`), not yet run on a GPU (:data:`AOT_ON_CUDA`, logged when it is applied there).
* ``compile``: ``torch.compile`` (inductor, C++ backend on the CPU) of the U-Net and of the VAE decoder, in
  place (``nn.Module.compile``), so everything that reads ``pipe.unet.config`` keeps working. Its generated
  code is cached in ``TORCHINDUCTOR_CACHE_DIR`` (set to :func:`compile_cache_dir` unless the user chose one),
  which later processes reuse. The first call compiles (minutes on 2 cores: 563 s for the medium U-Net),
  and the compiled U-Net was no faster than eager there (0.97x the time), so it stays off.

* ``fused_qkv``: each attention's query, key and value projections as one matrix product (a cross-attention's
  key and value), the weights stacked lazily and rebuilt whenever a source weight changes
  (:func:`sdengine.nn.attention.enable_fused_qkv`). Same numbers as the separate products (tests/test_fused_qkv.py);
  on this CPU a U-Net call took 0.94x-1.02x the time of the unfused one (tiny to SD 1.5-sized, docs/performance.md),
  so it is off by default here. Opt-in on CUDA too until a GPU measures it (a default must be measured, and it
  costs a second copy of the projection weights): the GPU bench's ``sdengine_graphs_fused`` and
  ``sdengine_compiled_fused`` phases are that measurement (docs/gpu.md).

On a CUDA device (docs/gpu.md has the H200 numbers and the command):

* ``fp8`` (also on the CPU, slowly, to check the images): the U-Net's transformer-block linear layers multiply
  in e4m3 with per-row scales (:mod:`sdengine.nn.fp8`); the layers' 16-bit weights are replaced, so LoRAs are
  refused on such a pipeline, and the option is refused on a network whose weights are *stored* in fp8
  (``load_pipeline(weight_dtype=...)``, :mod:`sdengine.nn.fp8_storage`: products in the compute dtype, a different
  feature). Not on by default: its speed has not been measured on a GPU yet; its effect on the
  images is in docs/gpu.md.
* ``cudnn_benchmark``: cuDNN times its convolution algorithms on the first call of each shape and keeps the
  fastest (``torch.backends.cudnn.benchmark``; process-global).
* ``sdpa_fastest``: the fused attention kernel that is fastest at the U-Net's largest self-attention is made
  the process's choice (:mod:`sdengine.sdpa_backends`).
* ``cuda_graphs``: the U-Net's steps (with ControlNets: the controlled step), the VAE decode, the CLIP text
  encoders and the tiny VAE's decoder replay from CUDA graphs (:mod:`sdengine.cuda_graphs`), recorded per shape
  on the first call; with ``compile`` the graphs record the compiled kernels.
* ``cuda_graph_loop`` (implies ``cuda_graphs``): a generation's whole sampling loop, every step's U-Net call,
  guidance and sampler update, replays as one CUDA graph (:mod:`sdengine.pipeline.loop_graph`) where it can:
  any sampler (the per-step noise drawn beforehand), no ControlNet, prompt editing, inpainting blend or LoRA
  hook. A step callback then runs once, after the last step (no live previews; a cancel waits for the image).
  Not on by default; on an H200 over the uncompiled networks it gave the same image in the same time (docs/gpu.md).

These four change nothing on the CPU (each reports that it was skipped); the others work on either device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from sdengine.errors import UsageError

log = logging.getLogger(__name__)

# Said (logged as a warning) whenever ``aot`` is applied on a CUDA device: what the H200 runs showed (docs/gpu.md).
AOT_ON_CUDA = (
    "aot on CUDA is unproven at full size: on an H200 (torch 2.11) SD 1.5's processes with aot packages that held no "
    "weights crashed (SIGSEGV), cold and warm; CUDA now takes packages that carry them (SDENGINE_AOT_PACKAGING), "
    "not yet run there; 'compile' is the GPU path that was measured"
)

OPTIONS: tuple[str, ...] = (  # in the order they are applied: fp8 changes the layers compile/aot/graphs see
    "winograd",
    "channels_last",
    "fp8",
    "fused_qkv",
    "cudnn_benchmark",
    "sdpa_fastest",
    "compile",
    "aot",
    "cuda_graphs",
    "cuda_graph_loop",
)
CUDA_ONLY: frozenset[str] = frozenset({"cudnn_benchmark", "sdpa_fastest", "cuda_graphs", "cuda_graph_loop"})
DEFAULT_OPTIONS: frozenset[str] = frozenset()  # measured, see the module docstring
# On a CUDA device in half precision: measured on an H200 (docs/gpu.md): SD 1.5 at 512x512 in
# 0.30 s instead of 1.03 s eager, the image within 9.4e-4 of fp32's (eager fp16: 9.2e-4). compile is not on by
# default: its first call compiles for 70 s (11.6 s with a warm cache), for 0.19 s per image after.
# fused_qkv: NOT measured on a GPU yet (docs/gpu.md); on because its equality tests pass on the same code path on
# the CPU and one product in place of three is what a GPU gains from.
CUDA_DEFAULT_OPTIONS: frozenset[str] = frozenset({"channels_last", "cudnn_benchmark", "cuda_graphs"})
ENV = "SDENGINE_FAST_PATH"  # the default of load_pipeline's fast_path= (and of the CLI's --fast-path)
# Mean absolute difference on 0..1 pixels an option may add to the fp32 eager image.
TOLERANCE = 2e-3
# Options that approximate on purpose, each with its own bound: ``fp8`` rounds every product to 3 mantissa bits
# (the emoji model at 20 steps: 2.7e-3; its recogniser scores unchanged, docs/gpu.md). Never on by default.
APPROXIMATE: dict[str, float] = {"fp8": 2e-2}


def tolerance(option: str) -> float:
    """The mean absolute difference on 0..1 pixels ``option`` may add to the fp32 eager image."""
    return APPROXIMATE.get(option, TOLERANCE)


def parse_options(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"channels_last,compile"`` (or a list) -> validated option names, in the order of ``OPTIONS``."""
    if spec is None:
        return ()
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = [n for n in names if n not in OPTIONS]
    if unknown:
        raise UsageError(f"unknown fast-path option(s) {', '.join(unknown)}; valid: {', '.join(OPTIONS)}")
    if "compile" in names and "aot" in names:
        raise UsageError("fast-path options compile and aot are two ways to compile the same networks: pick one")
    return tuple(o for o in OPTIONS if o in names)


def resolve_options(spec: str | Iterable[str] | None, device: Any, dtype: Any) -> tuple[str, ...]:
    """What ``load_pipeline(fast_path=spec)`` applies: ``None`` reads ``$SDENGINE_FAST_PATH`` (else
    ``"default"``); ``"default"`` is :data:`DEFAULT_OPTIONS` for fp32 on the CPU and
    :data:`CUDA_DEFAULT_OPTIONS` for fp16/bf16 on a CUDA device (where each was measured), nothing elsewhere;
    ``"none"`` (or an empty list) is nothing; otherwise the named options."""
    import torch

    if spec is None:
        spec = os.environ.get(ENV, "").strip() or "default"
    if isinstance(spec, str) and spec.strip().lower() in ("default", "none", ""):
        if spec.strip().lower() != "default":
            return ()
        kind = torch.device(device).type
        if kind == "cpu" and dtype == torch.float32:
            return tuple(o for o in OPTIONS if o in DEFAULT_OPTIONS)
        if kind == "cuda" and dtype in (torch.float16, torch.bfloat16):
            return tuple(o for o in OPTIONS if o in CUDA_DEFAULT_OPTIONS)
        return ()
    return parse_options(spec)


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled code across processes: ``$TORCHINDUCTOR_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/sdengine/inductor`` (``~/.cache/sdengine/inductor``)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sdengine" / "inductor"


def apply_fast_path(pipe: Any, options: Iterable[str]) -> list[str]:
    """Apply ``options`` to ``pipe.unet`` and ``pipe.vae`` in place; returns one line per option applied."""
    import torch

    done = []
    for name in parse_options(list(options)):
        if name == "winograd":
            from sdengine.nn.winograd import enable_winograd

            n = enable_winograd(pipe.unet) + enable_winograd(pipe.vae)
            done.append(f"winograd: {n} 3x3 convolutions of the U-Net and VAE as Winograd F(4x4,3x3)")
        elif name == "channels_last":
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            done.append("channels_last: U-Net and VAE weights in NHWC")
        elif name == "fp8":
            from sdengine.nn import fp8
            from sdengine.nn.fp8_storage import StorageError, has_storage

            if has_storage(pipe.unet):
                raise StorageError("fp8: the network's weights are held in fp8 (weight_dtype): pick one of the two")
            if not fp8.supported(pipe.device):
                done.append(f"fp8: skipped ({torch.device(pipe.device)} has no e4m3 products: CUDA 8.9+ or the CPU)")
                continue
            n = fp8.to_fp8(pipe.unet)
            done.append(f"fp8: {n} linear layers of the U-Net's transformer blocks as e4m3 products (per-row scales)")
        elif name == "fused_qkv":
            from sdengine.nn.attention import enable_fused_qkv

            n = enable_fused_qkv(pipe.unet)
            done.append(f"fused_qkv: {n} attention layers of the U-Net with one query/key/value product")
        elif name == "compile":
            cache = compile_cache_dir()
            cache.mkdir(parents=True, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache))
            if torch.device(pipe.device).type == "cuda":
                _inductor_for_cuda()
            pipe.unet.compile()
            pipe.vae.decoder.compile()
            done.append(f"compile: U-Net and VAE decoder through inductor, cache {cache}")
        elif name == "aot":
            cache = compile_cache_dir() / "aoti"
            pipe.enable_aot(cache)
            done.append(f"aot: U-Net and VAE decode compiled ahead of time (AOTInductor), packages in {cache}")
            if torch.device(pipe.device).type == "cuda":  # a warning too: load_pipeline keeps no notes
                log.warning(AOT_ON_CUDA)
                done.append(AOT_ON_CUDA)
        elif torch.device(pipe.device).type != "cuda":
            done.append(f"{name}: skipped (a CUDA option; the pipeline is on {torch.device(pipe.device).type})")
        elif name == "cudnn_benchmark":
            torch.backends.cudnn.benchmark = True
            done.append("cudnn_benchmark: cuDNN picks the fastest convolution algorithm per shape")
        elif name == "sdpa_fastest":
            from sdengine.sdpa_backends import fastest, time_backends, use_backend

            heads, head_dim, tokens = widest_attention(pipe)
            times = time_backends(pipe.device, pipe.dtype, heads=heads, tokens=tokens, head_dim=head_dim)
            best = fastest(times)
            use_backend(best)
            shown = ", ".join(f"{k} {v:.3f} ms" if v is not None else f"{k} -" for k, v in times.items())
            done.append(f"sdpa_fastest: {best} ({heads} heads x {head_dim} at {tokens} tokens: {shown})")
        elif name == "cuda_graphs":
            pipe.enable_cuda_graphs()
            done.append("cuda_graphs: U-Net steps, VAE decodes and CLIP text encoders replayed from CUDA graphs")
        elif name == "cuda_graph_loop":  # after cuda_graphs (OPTIONS' order); enables them if they are not on
            pipe.enable_loop_graph()
            done.append("cuda_graph_loop: the whole sampling loop replayed as one CUDA graph where it can")
    return done


def widest_attention(pipe: Any) -> tuple[int, int, int]:
    """(heads, head dim, tokens) of the U-Net's first self-attention at the model's default size: the
    largest attention of a generation (SD 1.5 at 512x512: 8, 40, 4096)."""
    for m in pipe.unet.modules():
        if hasattr(m, "heads") and hasattr(m, "to_q"):
            heads = int(m.heads)
            side = pipe.default_size // pipe.vae_scale_factor
            return heads, int(m.to_q.out_features) // heads, side * side
    raise UsageError("sdpa_fastest: the U-Net has no attention layer")


def _inductor_for_cuda() -> None:
    """Inductor settings that pay for SD's U-Net on a GPU: its 1x1 convolutions (the transformers' proj_in and
    proj_out, the ResNet shortcuts) as matrix products, which inductor can fuse with their neighbours."""
    try:
        import torch._inductor.config as inductor_config

        inductor_config.conv_1x1_as_mm = True
    except (ImportError, AttributeError):  # an older or newer torch without the setting: keep its default
        pass
