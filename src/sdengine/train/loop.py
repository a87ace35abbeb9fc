"""The training loop every sdengine trainer shares.

What it does, in order, each step: draw the step's randomness from a generator seeded by
``(seed, step)`` (so a resumed run draws exactly what an uninterrupted one would), compute the loss
(under bf16 autocast where the device supports it), back-propagate, clip the gradient norm, take an
AdamW step with linear warm-up, and update the EMA weights. It stops with a clear message when the
loss stops being finite, leaving the last good checkpoint as it was.

A trainer plugs in by giving a ``loss_fn(step, generator) -> scalar tensor`` and, optionally, a
``sample_fn(ema_model, step, path)`` that writes a sample grid.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sdengine import distributed
from sdengine.errors import SdengineError, UsageError
from sdengine.io.atomic import atomic_write, remove_stale_temp_files
from sdengine.weights.io import WeightsError
from sdengine.weights.loading import check_keys

from .checkpoint import CHECKPOINT_NAME, CheckpointError, load_checkpoint, locks_out_dir, save_checkpoint

MixedPrecision = Literal["auto", "no", "bf16"]


class TrainingDiverged(SdengineError, RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 10_000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    mixed_precision: MixedPrecision = "auto"
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000
    checkpoint_every: int = 1000
    # Stop early, at a step boundary, once this much wall-clock time has passed (None: no limit). The
    # schedule (warm-up, then constant) does not depend on the total, so a run stopped at step k equals
    # a run with ``steps=k``.
    max_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # UsageError: the command line prints one line (a ValueError too)
        if self.steps < 1:
            raise UsageError(f"steps must be >= 1, got {self.steps}")
        if self.batch_size < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"learning rate must be a finite number > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise UsageError(f"ema decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            raise UsageError(f"warm-up steps must be >= 0 (0: none), got {self.warmup_steps}")
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            raise UsageError(f"gradient clipping must be a finite number >= 0 (0: none), got {self.grad_clip}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise UsageError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise UsageError(
                f"checkpoint interval must be >= 0 steps (0: at the end only), got {self.checkpoint_every}"
            )
        if self.sample_every < 0:
            raise UsageError(f"sample interval must be >= 0 steps (0: none), got {self.sample_every}")
        if self.mixed_precision not in ("auto", "no", "bf16"):
            raise UsageError(f"mixed precision must be auto, no or bf16, got {self.mixed_precision!r}")
        if self.max_seconds is not None and not (self.max_seconds > 0 and math.isfinite(self.max_seconds)):
            raise UsageError(f"the time limit must be a finite number of minutes > 0, got {self.max_seconds / 60:g}")


class EMA:
    """Exponential moving average of a model's parameters (and a copy of its buffers).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not dominated by
    the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for eb, b in zip(self.model.buffers(), model.buffers(), strict=True):
            eb.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "num_updates": self.num_updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        self.model.load_state_dict(state["model"])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to ``cfg.lr``, then constant."""
    if cfg.warmup_steps <= 0:
        return cfg.lr
    return cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps)


def step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """The generator for one training step: a pure function of (seed, step)."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + 12_345) % (2**63 - 1))
    return g


def autocast_dtype(mode: MixedPrecision, device: torch.device) -> torch.dtype | None:
    if mode == "no":
        return None
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if mode == "bf16":
        if device.type == "cpu":  # asked for: CPU autocast runs convs and matmuls in bf16 (1.5-2x here)
            return torch.bfloat16
        raise ValueError(f"bf16 mixed precision is not supported on {device}")
    return None  # "auto" on CPU: fp32, exact (bf16 is faster but changes numerics: ask for it)


@dataclass
class TrainResult:
    step: int
    losses: list[float]
    out_dir: Path
    checkpoint: Path
    seconds: float = 0.0  # wall-clock time of the optimisation steps alone (no sampling, no checkpoints)


def _plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = list(range(1, len(losses) + 1))
    ax.plot(xs, losses, lw=0.6, alpha=0.35, color="tab:blue", label="loss")
    k = max(1, len(losses) // 50)
    if len(losses) > k:
        smooth = [
            sum(losses[max(0, i - k + 1) : i + 1]) / len(losses[max(0, i - k + 1) : i + 1]) for i in range(len(losses))
        ]
        ax.plot(xs, smooth, lw=1.5, color="tab:blue", label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png")
    finally:
        plt.close(fig)


@locks_out_dir
def train(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, int, torch.Generator], torch.Tensor],
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    sample_fn: Callable[[nn.Module, int, Path], None] | None = None,
    progress: bool = True,
    meta: dict[str, Any] | None = None,
    sync: Literal["ddp", "allreduce"] = "ddp",
) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimizer steps, writing checkpoints under ``out_dir``.

    ``loss_fn(model, step, generator)`` returns the scalar loss for that step; all randomness must
    come from ``generator`` (and from the data order, which the trainer derives from ``step``).
    With ``resume=True`` the run continues from ``out_dir/checkpoint.pt`` and reproduces, bit for bit
    on the same device, what an uninterrupted run would have done.

    Under ``torchrun`` (see :mod:`sdengine.distributed` and docs/distributed.md) every rank runs this function:
    ``cfg.batch_size`` is the global batch, ``loss_fn`` computes the rows :func:`sdengine.distributed.local_rows`
    gives it, and the gradients are averaged over the ranks by DistributedDataParallel around ``model``
    (``sync="ddp"``: ``loss_fn`` calls the model it is given) or by an all-reduce after the backward pass
    (``sync="allreduce"``: for trained modules that are patched into another network and never called). Only
    rank 0 writes the checkpoint, the loss plot and the samples; the others wait for it.
    """
    device = distributed.setup(device)
    world = distributed.current_world()
    if cfg.batch_size % world.size:
        raise distributed.DistributedError(
            f"--batch-size {cfg.batch_size} is the global batch: it must be divisible by the {world.size} processes"
        )
    progress = progress and world.is_main
    out_dir = Path(out_dir)
    ckpt_path = out_dir / CHECKPOINT_NAME
    # Read the checkpoint before touching anything in out_dir, so a bad --resume changes nothing.
    state = load_checkpoint(ckpt_path) if resume else None
    if state is not None:
        saved_seed = state["train_config"].get("seed")
        if saved_seed != cfg.seed:
            raise CheckpointError(f"checkpoint {ckpt_path} was trained with seed {saved_seed}, not {cfg.seed}")
        try:  # another trainer, rank, text-encoder choice, embedding width... (was load_state_dict's page)
            check_keys(model.state_dict(), state["model"], name="its model")
        except WeightsError as e:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was written by another kind of run ({e}): resume with that run's "
                "settings, or train into another --out"
            ) from None
    out_dir.mkdir(parents=True, exist_ok=True)
    # Temporary files of a run that was killed mid-write (they are never read; this only tidies up). Rank 0 only:
    # another machine's rank cannot tell whether rank 0's writer is alive.
    if world.is_main:
        remove_stale_temp_files(out_dir, recursive=True)

    model = model.to(device)
    model.train()
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        (decay if p.ndim >= 2 else no_decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
        fused=device.type == "cuda",
    )
    ema = EMA(model, cfg.ema_decay)
    losses: list[float] = []
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        losses = list(state["losses"])
        start = int(state["step"])
        # Each rank's own global generator state when the world size is the one saved (exact resume per world
        # size), else rank 0's; the trainers draw from the per-step generator, so only layers that use the
        # global generator (dropout) see a difference.
        same_world = int(state.get("world_size", 1)) == world.size and "rng_cpu_ranks" in state
        torch.set_rng_state(state["rng_cpu_ranks"][world.rank] if same_world else state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            cuda_state = state["rng_cuda_ranks"][world.rank] if same_world and "rng_cuda_ranks" in state else None
            torch.cuda.set_rng_state(cuda_state if cuda_state is not None else state["rng_cuda"], device)
        if start >= cfg.steps:
            if progress:  # said, so that --steps below the run's step is not taken for a shorter run
                print(f"{ckpt_path} is at step {start}, at or past --steps {cfg.steps}: nothing to train")
            return TrainResult(start, losses, out_dir, ckpt_path)

    # Every rank starts from the same weights (same seed, or the same checkpoint); DDP also broadcasts rank 0's.
    forward_model: nn.Module = model
    if world.size > 1 and sync == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        forward_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    trained = [p for p in model.parameters() if p.requires_grad]

    amp = autocast_dtype(cfg.mixed_precision, device)

    def checkpoint(step: int) -> None:
        # The step (and the global batch in train_config) fix the data position whatever the world size.
        rng_cpu = distributed.gather_objects(torch.get_rng_state())
        rng_cuda = distributed.gather_objects(torch.cuda.get_rng_state(device) if device.type == "cuda" else None)
        if world.is_main:
            extra: dict[str, Any] = {"rng_cpu_ranks": rng_cpu, "rng_cuda_ranks": rng_cuda} if world.size > 1 else {}
            save_checkpoint(
                ckpt_path,
                {
                    "step": step,
                    "model": model.state_dict(),
                    "ema": ema.state_dict(),
                    "optimizer": opt.state_dict(),
                    "losses": losses,
                    "rng_cpu": rng_cpu[0],
                    "rng_cuda": rng_cuda[0],
                    "world_size": world.size,
                    **extra,
                    "train_config": _plain(asdict(cfg)),
                    "meta": _plain(meta or {}),
                },
            )
        distributed.barrier()  # nobody reads or passes the checkpoint before it is complete

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
    t0 = time.perf_counter()
    step = done = start
    overhead = 0.0  # time spent on checkpoints, plots and sample grids, not on optimisation
    # On a GPU, reading the loss every step would stall the queue: losses are read in blocks, and
    # always before a checkpoint, so a non-finite loss is still caught before anything is saved.
    sync_every = 1 if device.type == "cpu" else 25
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if not pending:
            return
        values = distributed.mean_over_ranks(torch.stack(pending).float()).tolist()
        first = step - len(pending) + 1
        pending.clear()
        for i, value in enumerate(values):
            if not math.isfinite(value):
                where = f"; the last good checkpoint is {ckpt_path}" if ckpt_path.exists() else ""
                raise TrainingDiverged(f"loss became {value} at step {first + i}: training stopped{where}")
            losses.append(value)

    try:
        for step in range(start, cfg.steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            g = step_generator(cfg.seed, step, device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(forward_model, step, g)
            pending.append(loss.detach())
            if device.type == "cpu":
                flush()  # before the update, so a NaN step never reaches the weights
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sync == "allreduce":
                distributed.average_gradients(trained)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            done = step + 1
            ckpt_due = cfg.checkpoint_every > 0 and done % cfg.checkpoint_every == 0 and done != cfg.steps
            out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 - overhead > cfg.max_seconds
            if cfg.max_seconds is not None:  # the ranks' clocks differ: stop together when one is out of time
                out_of_time = distributed.any_rank(out_of_time, device)
            sample_due = cfg.sample_every > 0 and done % cfg.sample_every == 0 or done == cfg.steps or out_of_time
            if len(pending) >= sync_every or ckpt_due or sample_due:
                flush()
            if bar is not None:
                bar.update(1)
                if done % max(1, cfg.log_every) == 0 or done == cfg.steps:
                    recent = losses[-cfg.log_every :]
                    if recent:
                        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{lr_at(step, cfg):.1e}")
            if ckpt_due or sample_due:
                t_extra = time.perf_counter()
                if ckpt_due:
                    checkpoint(done)
                if sample_due:
                    if world.is_main:
                        _plot_losses(losses, out_dir / "loss.png")
                        if sample_fn is not None:
                            sample_fn(ema.model, done, out_dir / f"samples_{done:07d}.png")
                    distributed.barrier()
                overhead += time.perf_counter() - t_extra
            if out_of_time:
                if progress:
                    print(f"time limit of {cfg.max_seconds:.0f} s reached at step {done}")
                break
        flush()
        step = done
        checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
    step_seconds = time.perf_counter() - t0 - overhead
    if progress:
        print(f"trained {step - start} steps in {step_seconds:.1f} s (+{overhead:.1f} s sampling/saving); {ckpt_path}")
    return TrainResult(step, losses, out_dir, ckpt_path, step_seconds)


def _plain(obj: Any) -> Any:
    """Make a config JSON-like (tuples to lists, paths to str) so it loads with weights_only."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_777 + epoch))


def data_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Indices of the examples in batch ``step``: epochs of seeded permutations, stateless.

    Being a pure function of the step is what lets a resumed run see the same batches.
    """
    first = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(first + len(out), n)
        perm = _epoch_permutation(seed, epoch, n)
        take = min(batch_size - len(out), n - offset)
        out.extend(perm[offset : offset + take].tolist())
    return torch.tensor(out, dtype=torch.long)
