"""How many CPU threads torch uses, and how its OpenMP threads wait, chosen once at start-up.

Why: torch's OpenMP threads meet at a barrier after every parallel operator. With GNU OpenMP's default
wait policy a thread that arrives first spins for a while; when another process keeps a core busy, the
thread it waits for is descheduled and the spinning one burns the time slice the late one needs. On a
2-core machine with one competing busy process that made a generation 10-20x slower than with one
thread (the output was identical). Two measures, both cheap:

* the wait policy, unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``: when other processes keep
  a CPU busy at start-up, or the command runs for long (``serve``, whose load will change),
  ``OMP_WAIT_POLICY=PASSIVE``: waiting threads sleep instead of spinning. On an idle machine sleeping costs
  a wake-up at every barrier (a medium-size generation took 4.2 s instead of 3.1-3.5 s), so there
  ``GOMP_SPINCOUNT=10000``: a short spin, then sleep (2.9-3.2 s idle; beside a busy process it degrades
  like the default, 10-11 s against PASSIVE's 5.5 s, which is why a busy machine gets PASSIVE). The OpenMP
  runtime reads both once, when torch is first imported, so :func:`prepare_environment` must run before
  that (the CLI calls it before importing anything that imports torch). Numbers: docs/performance.md.
* the thread count: the CPUs this process may run on (``os.sched_getaffinity``) minus those other
  processes keep busy right now (the kernel's count of runnable tasks, sampled a few times), at least 1.
  Under torchrun (``LOCAL_WORLD_SIZE`` > 1) the CPUs are split evenly between the processes of this machine.

``--threads N`` (or ``SDENGINE_THREADS``) overrides the count. Library users who never go through the CLI
keep torch's defaults unless they call :func:`configure_threads` themselves.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

from sdengine.errors import UsageError

log = logging.getLogger(__name__)

WAIT_POLICY_ENV = "OMP_WAIT_POLICY"
SPINCOUNT_ENV = "GOMP_SPINCOUNT"
IDLE_SPINCOUNT = "10000"  # measured: see the module docstring
THREADS_ENV = "SDENGINE_THREADS"


@dataclass(frozen=True)
class ThreadSettings:
    """What :func:`configure_threads` chose, and why (printed by ``sdengine bench``)."""

    threads: int
    cpus: int  # CPUs this process may use
    busy_elsewhere: int  # CPUs other processes kept busy when the choice was made
    wait_policy: str  # the OMP_WAIT_POLICY in effect ("default" when unset; with GOMP_SPINCOUNT if set)
    source: str  # "--threads", "SDENGINE_THREADS", "auto" or "auto (torchrun)"

    def describe(self) -> str:
        return (
            f"{self.threads} thread(s) ({self.source}; {self.cpus} CPU(s) usable, {self.busy_elsewhere} busy "
            f"elsewhere), OpenMP wait policy {self.wait_policy}"
        )


def prepare_environment(long_running: bool = False) -> bool:
    """Choose the OpenMP wait policy (module docstring) unless the user set ``OMP_WAIT_POLICY`` or
    ``GOMP_SPINCOUNT``: ``PASSIVE`` when ``long_running`` or when other processes keep a CPU busy now, else a
    short spin. True when it can still take effect (torch not imported yet); the environment keeps the
    choice either way, so child processes get it."""
    if WAIT_POLICY_ENV not in os.environ and SPINCOUNT_ENV not in os.environ:
        if long_running or busy_elsewhere() > 0:
            os.environ[WAIT_POLICY_ENV] = "PASSIVE"
        else:
            os.environ[SPINCOUNT_ENV] = IDLE_SPINCOUNT
    return "torch" not in sys.modules


def wait_policy() -> str:
    """The wait policy in effect, as :class:`ThreadSettings` reports it."""
    policy = os.environ.get(WAIT_POLICY_ENV, "default")
    spin = os.environ.get(SPINCOUNT_ENV)
    return f"{policy}, {SPINCOUNT_ENV}={spin}" if spin else policy


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup CPU quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _running_tasks() -> int | None:
    """The kernel's count of runnable tasks right now (``procs_running`` in /proc/stat), this one included."""
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def busy_elsewhere(samples: int = 10, interval: float = 0.01) -> int:
    """How many CPUs other processes keep busy: the smallest of a few samples of runnable tasks (over ~0.1 s),
    minus this one. The smallest, because a busy process is runnable in every sample while a burst is not: right
    after start-up this process's own new threads (OpenBLAS's, when numpy is imported) spin for a few ms and
    were read as another busy CPU by a median of five samples (seen on an idle machine: the idle run of
    ``sdengine bench --under-load`` chose PASSIVE). Falls back to the 1-minute load average where /proc is not
    there."""
    counts = []
    for i in range(samples):
        n = _running_tasks()
        if n is None:
            break
        counts.append(n - 1)
        if i + 1 < samples:
            time.sleep(interval)
    if counts:
        return max(0, min(counts))
    try:
        return max(0, round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0


def threads_for(cpus: int, busy: int) -> int:
    """The automatic choice: one thread per CPU that nothing else is running on, at least 1."""
    return max(1, min(cpus, cpus - busy))


def choose_threads(requested: int | None = None) -> tuple[int, str, int]:
    """(threads, source, busy CPUs): ``requested``, else ``SDENGINE_THREADS``, else usable CPUs minus busy."""
    cpus = usable_cpus()
    if requested is not None:
        if not isinstance(requested, int) or requested < 1:
            raise UsageError(f"--threads must be a positive integer, got {requested!r}")
        return requested, "--threads", 0
    env = os.environ.get(THREADS_ENV)
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise UsageError(f"{THREADS_ENV} must be a positive integer, got {env!r}")
        return n, THREADS_ENV, 0
    local_procs = os.environ.get("LOCAL_WORLD_SIZE", "")  # set by torchrun: the processes on this machine
    if local_procs.isdigit() and int(local_procs) > 1:
        # The other ranks are about to be busy too: split the CPUs between them instead of sampling the load.
        return max(1, cpus // int(local_procs)), "auto (torchrun)", 0
    busy = busy_elsewhere()
    return threads_for(cpus, busy), "auto", busy


def configure_threads(requested: int | None = None) -> ThreadSettings:
    """Choose the thread count (see :func:`choose_threads`) and give it to torch."""
    import torch

    n, source, busy = choose_threads(requested)
    if n > usable_cpus():  # torch's threads then wait on each other: a 64x64 image took 20x as long at 1000 on 2
        log.warning(
            "%s gives %d threads for %d usable CPUs: more threads than CPUs make torch slower, not faster",
            source,
            n,
            usable_cpus(),
        )
    torch.set_num_threads(n)
    return ThreadSettings(
        threads=n,
        cpus=usable_cpus(),
        busy_elsewhere=busy,
        wait_policy=wait_policy(),
        source=source,
    )
