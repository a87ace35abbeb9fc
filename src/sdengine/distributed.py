"""Several processes under ``torchrun``: who this process is, the process group, and the few collectives the
trainers need.

``torchrun --nproc_per_node N -m sdengine ...`` starts N copies of the command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``) in their environment. Nothing here does anything
distributed unless those variables are set: a plain ``sdengine`` run is world size 1 and every function below is
then a no-op (or the identity).

* :func:`env_world` reads the variables (no process group needed: batch generation only shards a list).
* :func:`setup` starts the process group once, with NCCL for CUDA devices and gloo otherwise, and returns the
  device this rank must use (``cuda:LOCAL_RANK`` for CUDA).
* :func:`current_world` is the rank and size of the started group (world size 1 when there is none).
* :func:`local_rows` is the part of a global batch this rank computes: the batch is drawn whole on every rank
  (same indices, same noise) and each rank takes its contiguous block of rows, so that N ranks with a per-rank
  batch of B/N compute exactly the examples one process with batch B computes.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch

from sdengine.errors import UsageError

# The variables torchrun (torch.distributed.run) sets in every process it starts.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class DistributedError(UsageError):
    """The torchrun environment is inconsistent, or a setting does not fit the number of processes."""


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, samples, exports and prints progress."""
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's contiguous block of a global batch of ``batch`` rows (``batch`` divisible by the size)."""
        if batch % self.size:
            raise DistributedError(f"a global batch of {batch} does not split over {self.size} processes")
        per = batch // self.size
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, n: int) -> range:
        """Items ``rank, rank + size, ...`` of a list of ``n``: every item on exactly one rank."""
        return range(self.rank, n, self.size)


def env_world() -> World | None:
    """The world torchrun describes in the environment, or None when the variables are not set."""
    values = {k: os.environ.get(k) for k in ENV_VARS}
    if all(v is None for v in values.values()):
        return None
    missing = [k for k in ("RANK", "WORLD_SIZE") if values[k] is None]
    if missing:
        given = " ".join(f"{k}={v}" for k, v in values.items() if v is not None)
        raise DistributedError(
            f"torchrun environment is incomplete: {given} is set but not {' and '.join(missing)} (start the "
            "processes with torchrun, or unset the variable to run one process)"
        )
    try:
        rank = int(values["RANK"] or "")
        size = int(values["WORLD_SIZE"] or "")
        local = int(values["LOCAL_RANK"] or "0")
    except ValueError:
        raise DistributedError(
            f"torchrun environment is not integers: RANK={values['RANK']!r} WORLD_SIZE={values['WORLD_SIZE']!r} "
            f"LOCAL_RANK={values['LOCAL_RANK']!r}"
        ) from None
    if size < 1 or not 0 <= rank < size or local < 0:
        raise DistributedError(f"torchrun environment is inconsistent: RANK={rank} WORLD_SIZE={size}")
    return World(rank, size, local)


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def is_initialized() -> bool:
    dist = _dist()
    return bool(dist.is_available() and dist.is_initialized())


def current_world() -> World:
    """The started process group's rank and size; rank 0 of 1 when there is none."""
    if not is_initialized():
        return World()
    dist = _dist()
    env = env_world()
    return World(dist.get_rank(), dist.get_world_size(), env.local_rank if env is not None else 0)


def setup(device: str | torch.device) -> torch.device:
    """Start the process group if torchrun's variables are set (once per process); return the device to use.

    CUDA runs use NCCL and one GPU per process (``cuda:LOCAL_RANK``); every other device uses gloo. Without the
    variables this returns ``device`` unchanged and starts nothing.
    """
    device = torch.device(device)
    env = env_world()
    if env is None:
        return device
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", env.local_rank)
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DistributedError(
                f"rank {env.rank} (LOCAL_RANK {env.local_rank}) needs {device}, but {count} CUDA device(s) are "
                "visible: start at most one process per GPU (--nproc_per_node)"
            )
        torch.cuda.set_device(device)
    if env.size == 1 or is_initialized():
        return device
    dist = _dist()
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed: run without torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend=backend, rank=env.rank, world_size=env.size, **kwargs)
    atexit.register(shutdown)
    return device


def shutdown() -> None:
    """Leave the process group (registered at exit by :func:`setup`)."""
    if is_initialized():
        _dist().destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op when not distributed)."""
    if is_initialized() and _dist().get_world_size() > 1:
        _dist().barrier()


def local_rows(batch: int) -> slice:
    """The rows of a global batch of ``batch`` that this rank computes (all of them when not distributed)."""
    return current_world().rows(batch)


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """The average of ``t`` over the ranks (``t`` itself when not distributed). Every rank must call it."""
    world = current_world()
    if world.size == 1:
        return t
    out = t.detach().clone()
    _dist().all_reduce(out)
    return out / world.size


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on at least one (a shared decision, e.g. to stop)."""
    world = current_world()
    if world.size == 1:
        return flag
    t = torch.tensor([1 if flag else 0], device=device)
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return bool(t.item())


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over the ranks, for trainers whose trained module is not called
    through its ``forward`` (DistributedDataParallel only sees gradients of a wrapped forward)."""
    world = current_world()
    if world.size == 1:
        return
    dist = _dist()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world.size)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order, on every rank (``[obj]`` when not distributed)."""
    world = current_world()
    if world.size == 1:
        return [obj]
    out: list[Any] = [None] * world.size
    _dist().all_gather_object(out, obj)
    return out


__all__ = [
    "ENV_VARS",
    "DistributedError",
    "World",
    "any_rank",
    "average_gradients",
    "barrier",
    "current_world",
    "env_world",
    "gather_objects",
    "is_initialized",
    "local_rows",
    "mean_over_ranks",
    "setup",
    "shutdown",
]
