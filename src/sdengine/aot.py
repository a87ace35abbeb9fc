"""Ahead-of-time compiled networks (AOTInductor): compiled once per architecture and shape, loaded in a second.

``torch.compile`` traces the network again in every new process (11.6 s of SD 1.5's 23.1 s warm start on an H200,
docs/gpu.md) even when its compiled kernels come from the cache. AOTInductor compiles an exported program into a
package (a shared library with the kernels) that a later process loads without tracing anything.

:class:`AOTCompiled` wraps a network: the first call with a new signature (tensor shapes, dtypes, strides;
constant arguments) exports the network with those inputs and compiles it into
``cache_dir/NAME-DIGEST.pt2``, or loads that file when an earlier process made it. The digest covers what the
compiled code depends on: torch's version, the device (and GPU generation), the network's class and config, every
weight's name, shape, dtype and strides (their memory layout), and the call's signature. The package holds no
weights: the live module's parameters are bound into it (``load_constants(..., user_managed=True)``), so one
package serves every checkpoint of an architecture.

Whether the package also carries a copy of the weights it was compiled with is its *packaging*
(:data:`PACKAGINGS`; ``SDENGINE_AOT_PACKAGING`` picks one, else :func:`default_packaging` by device): ``bound``
packages hold none (small files), ``carried`` ones hold them in the shared library (AOTInductor's default layout),
``disk`` ones in a blob beside it; the last two make a larger file, and on a GPU a second copy of the weights in
memory, as the live ones are bound over the package's. On an H200 (torch 2.11) SD 1.5's processes with ``bound``
packages crashed (docs/gpu.md), so CUDA takes ``carried`` until a GPU says otherwise; a CUDA test runs every
packaging in child processes and reports which work. Either way the weights are
folded into derived constants at run time (``use_runtime_constant_folding``): without it AOTInductor folds
weight-derived constants (a linear layer's bias in its product, for one) when it compiles, and a package would
silently compute with the weights it was compiled with; a compiled package whose constants do not name every
weight the program uses is refused.

Compiled code may fold weights into derived constants when they are bound, so it is bound again whenever the
module's fingerprint (sdengine.nn.fingerprint.module_fingerprint: storage, version counters, hooks) moved; while
the module carries forward hooks (a patched LoRA) every call goes to the module itself. A signature that fails to
export, compile, load or run its first call runs on the module from then on, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sdengine.cuda_graphs import call_signature
from sdengine.errors import UsageError
from sdengine.nn.fingerprint import ModuleWatch

log = logging.getLogger(__name__)

# What every package is compiled with (besides its packaging): weights folded into derived constants when they are
# bound, not when compiled (then frozen; module docstring).
COMPILE_OPTIONS: dict[str, Any] = {"aot_inductor.use_runtime_constant_folding": True}

# packaging -> how it is compiled (module docstring): whether the package carries a copy of the weights, and where
PACKAGINGS: dict[str, dict[str, Any]] = {
    "bound": {"aot_inductor.package_constants_in_so": False},  # no weights in the file
    "carried": {"aot_inductor.package_constants_in_so": True},  # in the shared library: AOTInductor's default
    "disk": {  # beside the library in the package, one blob the loader reads
        "aot_inductor.package_constants_in_so": False,
        "aot_inductor.package_constants_on_disk_format": "binary_blob",
    },
}


def default_packaging(device_type: str) -> str:
    """``SDENGINE_AOT_PACKAGING`` when set (one of :data:`PACKAGINGS`), else ``carried`` on CUDA, ``bound``
    elsewhere (module docstring)."""
    chosen = os.environ.get("SDENGINE_AOT_PACKAGING", "").strip()
    if chosen:
        if chosen not in PACKAGINGS:
            raise UsageError(f"SDENGINE_AOT_PACKAGING={chosen!r}: expected one of {', '.join(PACKAGINGS)}")
        return chosen
    return "carried" if device_type == "cuda" else "bound"


def _device_tag(tensors: list[torch.Tensor]) -> str:
    dev = tensors[0].device if tensors else torch.device("cpu")
    if dev.type == "cuda":
        major, minor = torch.cuda.get_device_capability(dev)
        return f"cuda-sm{major}{minor}"
    return dev.type


def package_digest(module: nn.Module, key: Hashable, device_tag: str, packaging: str = "bound") -> str:
    """What the compiled package depends on, as a hex digest (the module docstring lists it)."""
    weights = [
        (name, tuple(t.shape), str(t.dtype), tuple(t.stride()))
        for name, t in (*module.named_parameters(), *module.named_buffers())
    ]
    facts = {
        "torch": torch.__version__,
        "device": device_tag,
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "config": repr(getattr(module, "config", None)),
        "weights": weights,
        "call": repr(key),
        "packaging": packaging,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]


class AOTCompiled:
    """``module`` run from AOTInductor packages (module docstring). Calls it cannot serve go to ``module``."""

    def __init__(self, module: nn.Module, *, name: str, cache_dir: str | Path, packaging: str | None = None) -> None:
        if packaging is not None and packaging not in PACKAGINGS:
            raise UsageError(f"AOT packaging {packaging!r}: expected one of {', '.join(PACKAGINGS)}")
        if packaging is None:
            default_packaging("cpu")  # a wrong SDENGINE_AOT_PACKAGING fails here, not as a silent plain run later
        self.module = module
        self.packaging = packaging  # None: default_packaging() of the first call's device
        self.name = name
        self.cache_dir = Path(cache_dir)
        self.runners: dict[Hashable, Any] = {}
        self.failed: set[Hashable] = set()
        self.watch = ModuleWatch(module)
        self.compiled = 0  # packages compiled by this process
        self.loaded = 0  # packages loaded from the cache
        self.seconds = 0.0  # spent exporting, compiling and loading

    def reset(self) -> None:
        """Drop the loaded packages (their weights are bound again on the next call)."""
        self.runners.clear()

    def usable(self) -> bool:
        """False while the module carries forward hooks; packages re-bound when its weights moved."""
        moved, hooked = self.watch.check()
        if moved:
            self.reset()
        return not hooked

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        sig = call_signature(args, kwargs)
        if sig is None or (torch.is_grad_enabled() and any(t.requires_grad for t in sig[1])):
            return self.module(*args, **kwargs)
        key, tensors = sig
        if key in self.failed:
            return self.module(*args, **kwargs)
        runner = self.runners.get(key)
        if runner is not None:
            return runner(*args, **kwargs)
        runner = self._prepare(key, args, kwargs, tensors)
        if runner is None:
            return self.module(*args, **kwargs)
        try:  # its first run sets up the bound weights and folds the constants (on CUDA: unproven, docs/gpu.md)
            return runner(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - a package that cannot run: this signature runs plainly from now on
            self.runners.pop(key, None)
            self.failed.add(key)
            log.warning(
                "%s: the package failed on its first run (%s: %s); running it as it is", self.name, type(e).__name__, e
            )
            return self.module(*args, **kwargs)

    def _prepare(self, key: Hashable, args: Any, kwargs: dict[str, Any], tensors: list[torch.Tensor]) -> Any:
        t0 = time.perf_counter()
        try:
            if self.packaging is None:
                self.packaging = default_packaging(tensors[0].device.type if tensors else "cpu")
            digest = package_digest(self.module, key, _device_tag(tensors), self.packaging)
            path = self.cache_dir / f"{self.name}-{digest}.pt2"
            used: set[str] = set()
            if not path.is_file():
                used = self._compile(path, args, kwargs, PACKAGINGS[self.packaging])
                self.compiled += 1
            else:
                self.loaded += 1
            runner = torch._inductor.aoti_load_package(str(path))
            state = {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}
            # The folded constants (names starting _FOLDED_CONST) are derived from these when the package first
            # runs after they are bound; every other constant must be a weight of the module.
            names = [n for n in runner.get_constant_fqns() if not n.startswith("_FOLDED_CONST")]
            missing = [n for n in names if n not in state]
            if missing:
                raise KeyError(f"the package needs constants the module lacks: {', '.join(missing[:3])}")
            baked = sorted(used - set(names))  # checked once, when compiled (the digest then pins the compiler)
            if baked:
                path.unlink(missing_ok=True)
                raise RuntimeError(f"the package baked in weights it would not take from the module: {baked[:3]}")
            runner.load_constants({n: state[n] for n in names}, check_full_update=False, user_managed=True)
        except Exception as e:  # noqa: BLE001 - any failure to compile or load means: run this signature plainly
            self.failed.add(key)
            log.warning("%s: not compiled ahead of time (%s: %s); running it as it is", self.name, type(e).__name__, e)
            return None
        finally:
            self.seconds += time.perf_counter() - t0
        self.runners[key] = runner
        return runner

    def _compile(self, path: Path, args: Any, kwargs: dict[str, Any], packaging: dict[str, Any]) -> set[str]:
        """Compile the package into ``path``; the names of the weights the exported program uses."""
        path.parent.mkdir(parents=True, exist_ok=True)
        # Outside inference mode (the pipeline calls from inside it): export traces with ordinary tensors.
        with torch.inference_mode(False), torch.no_grad():
            plain = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            named = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            program = torch.export.export(self.module, tuple(plain), named, strict=False)
        weights = {**program.graph_signature.inputs_to_parameters, **program.graph_signature.inputs_to_buffers}
        used = {weights[n.name] for n in program.graph.nodes if n.op == "placeholder" and n.name in weights and n.users}
        tmp = path.with_name(f".partial-{os.getpid()}-{path.name}")  # the packager wants a name ending in .pt2
        try:
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=str(tmp),
                inductor_configs={**COMPILE_OPTIONS, **packaging},
            )
            os.replace(tmp, path)  # whole or not at all: a second process may be compiling the same package
        finally:
            tmp.unlink(missing_ok=True)
        return used


class Decode(nn.Module):
    """``vae.decode`` as a module of its own (what is exported for the VAE): its weights are the VAE's."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)  # type: ignore[operator]


__all__ = ["COMPILE_OPTIONS", "PACKAGINGS", "AOTCompiled", "Decode", "default_packaging", "package_digest"]
