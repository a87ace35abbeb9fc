"""The job queue: bounded FIFO, one worker thread per device, per-job cancel, progress and previews.

A :class:`Job` is one :class:`~sdengine.server.requests.Generation` and its life: queued -> running ->
done | failed | cancelled. Workers take the oldest queued job; each keeps its own pipeline (one model at a
time, switched between jobs). Cancel touches one job: a queued job leaves the queue, a running one stops
at the end of the current sampler step (the pipeline's step callback returns False). Nothing of a job
stays on the model after it: the pipeline removes the LoRAs it applied and builds ControlNets per call.
A job that fails (bad input found late, out of memory, a bug) fails alone; the worker takes the next.

Threads and the event loop meet in :meth:`Job.subscribe`: each change of a job sets the asyncio events of
its subscribers through ``loop.call_soon_threadsafe``, so waiting costs no polling.
"""

from __future__ import annotations

import asyncio
import io
import logging
import re
import secrets
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from sdengine.errors import SdengineError
from sdengine.server.errors import NotFound, QueueFull
from sdengine.server.requests import Generation

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})

Loader = Callable[[str, str], Any]  # (model reference, device) -> a pipeline


KEEP_IMAGES = 32  # finished jobs whose images stay in memory (older ones keep names, seeds and infotexts)


@dataclass
class JobImage:
    image: Image.Image | None  # released for older finished jobs (see KEEP_IMAGES)
    seed: int
    infotext: str
    name: str | None = None  # file name in the outputs folder when saved


@dataclass
class Job:
    generation: Generation
    protocol: str = "native"
    save: bool = True
    task_id: str | None = None  # A1111's id_task (force_task_id)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    step: int = 0  # steps finished, over all iterations
    steps: int = 0  # steps of all iterations (known once sampling starts; the request's count before)
    error: str | None = None
    images: list[JobImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    preview_png: bytes | None = None
    preview_step: int = 0
    version: int = 0  # bumped on every change
    cancel: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    device: str | None = None
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.steps = int(self.generation.kwargs["steps"]) * self.generation.n_iter
        self.task_id = self.task_id or self.id

    # -- change notification ---------------------------------------------------------------------------

    def changed(self) -> None:
        with self._lock:
            self.version += 1
            subs = list(self._subscribers)
        for loop, ev in subs:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its subscriber is gone
                pass

    def subscribe(self) -> asyncio.Event:
        ev = asyncio.Event()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), ev))
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        with self._lock:
            self._subscribers = [(lp, e) for lp, e in self._subscribers if e is not ev]

    async def wait_finished(self, timeout: float | None = None) -> bool:
        """Wait (without polling) until the job is finished; False on timeout."""
        ev = self.subscribe()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while self.state not in FINISHED:
                ev.clear()
                if self.state in FINISHED:
                    break
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                try:
                    await asyncio.wait_for(ev.wait(), left)
                except TimeoutError:
                    return self.state in FINISHED
            return True
        finally:
            self.unsubscribe(ev)

    # -- facts -----------------------------------------------------------------------------------------

    @property
    def progress(self) -> float:
        if self.state == DONE:
            return 1.0
        return min(1.0, self.step / self.steps) if self.steps else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left by the mean time per step so far (None before the first step)."""
        if self.state != RUNNING or self.started is None or self.step == 0:
            return None
        per = (time.time() - self.started) / self.step
        return max(0.0, per * (self.steps - self.step))


class JobManager:
    """The queue, the job table and the workers."""

    def __init__(
        self,
        *,
        loader: Loader,
        devices: list[str],
        outputs_dir: Path,
        max_queue: int,
        keep_jobs: int = 256,
        preview_every: int = 2,
    ) -> None:
        self.loader = loader
        self.outputs_dir = Path(outputs_dir)
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self.preview_every = max(1, preview_every)
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self.stopping = False
        self._out_lock = threading.Lock()
        self._next_index: int | None = None
        self.workers = [Worker(self, d) for d in devices]
        self.completed = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything and wait (bounded) for the workers to end."""
        with self._cond:
            self.stopping = True
            queued = list(self._queue)
            self._queue.clear()
            running = [j for j in self._jobs.values() if j.state == RUNNING]
            self._cond.notify_all()
        for j in queued:
            self.finish(j, CANCELLED, "the server stopped")
        for j in running:
            j.cancel.set()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            w.join(max(0.0, deadline - time.monotonic()))

    # -- the queue -------------------------------------------------------------------------------------

    def submit(self, job: Job) -> int:
        """Queue ``job``; its position (0 = next). QueueFull when ``max_queue`` jobs are waiting."""
        with self._cond:
            if self.stopping:
                raise QueueFull("the server is stopping", retry_after=30)
            if len(self._queue) >= self.max_queue:
                busy = max(1, len(self.workers))
                raise QueueFull(
                    f"the queue is full ({self.max_queue} jobs waiting); retry later",
                    retry_after=max(1, len(self._queue) // busy),
                )
            self._queue.append(job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cond.notify()
            return len(self._queue) - 1

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs beyond ``keep_jobs`` and the images of all but the newest finished
        ones (the routes that answer with images read them as soon as the job finishes)."""
        finished = [j for j in self._jobs.values() if j.state in FINISHED]
        for j in finished[:-KEEP_IMAGES]:
            for im in j.images:
                im.image = None
        while len(self._jobs) > self.keep_jobs + self.max_queue:
            for jid, j in self._jobs.items():
                if j.state in FINISHED:
                    del self._jobs[jid]
                    break
            else:
                return

    def take(self, timeout: float = 0.5) -> Job | None:
        with self._cond:
            if not self._queue and not self.stopping:
                self._cond.wait(timeout)
            if self.stopping or not self._queue:
                return None
            job = self._queue.popleft()
            job.state = RUNNING
            job.started = time.time()
        job.changed()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    def by_task_id(self, task_id: str) -> Job | None:
        with self._cond:
            for j in reversed(self._jobs.values()):
                if j.task_id == task_id:
                    return j
        return None

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self._queue.index(job)
            except ValueError:
                return None

    def jobs(self) -> list[Job]:
        with self._cond:
            return list(self._jobs.values())

    def running(self) -> list[Job]:
        with self._cond:
            return [j for j in self._jobs.values() if j.state == RUNNING]

    def queued_count(self) -> int:
        with self._cond:
            return len(self._queue)

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue now; a running one stops after its current step."""
        with self._cond:
            if job.state == QUEUED and job in self._queue:
                self._queue.remove(job)
                removed = True
            else:
                removed = False
            job.cancel.set()
        if removed:
            self.finish(job, CANCELLED, "cancelled while queued")
        elif job.state == RUNNING:
            job.changed()

    def finish(self, job: Job, state: str, error: str | None = None) -> None:
        job.state = state
        job.error = error
        job.finished = time.time()
        if state == DONE:
            self.completed += 1
        job.changed()

    # -- outputs ---------------------------------------------------------------------------------------

    def save(self, image: Image.Image, seed: int, infotext: str) -> str:
        """Write a PNG with its ``parameters`` text as NNNNN-SEED.png; its file name."""
        from sdengine.metadata import save_png

        with self._out_lock:
            if self._next_index is None:
                used = (
                    [int(m.group(1)) for p in self.outputs_dir.glob("*.png") if (m := re.match(r"^(\d{5,})-", p.name))]
                    if self.outputs_dir.is_dir()
                    else []
                )
                self._next_index = max(used, default=-1) + 1
            index = self._next_index
            self._next_index += 1
        name = f"{index:05d}-{seed}.png"
        save_png(image, self.outputs_dir / name, infotext)
        return name


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


class Worker(threading.Thread):
    """Runs jobs on one device with its own pipeline (loaded on first use, switched between jobs)."""

    def __init__(self, manager: JobManager, device: str) -> None:
        super().__init__(name=f"sdengine-worker-{device}", daemon=True)
        self.manager = manager
        self.device = device
        self.pipe: Any = None
        self.model: str | None = None
        self.current: Job | None = None
        self.preload: str | None = None  # a model to load before the first job (set before start)

    def run(self) -> None:
        if self.preload is not None:
            try:
                self.pipeline(self.preload)
            except Exception as e:  # noqa: BLE001 - the first job that needs it reports the error
                log.warning("could not load %s on %s: %s", self.preload, self.device, e)
        while True:
            job = self.manager.take()
            if job is None:
                if self.manager.stopping:
                    return
                continue
            self.current = job
            try:
                self.run_job(job)
            except BaseException as e:  # noqa: BLE001 - a job never takes the worker down
                log.exception("job %s failed", job.id)
                self.manager.finish(job, FAILED, f"internal error: {type(e).__name__}: {e}")
            finally:
                self.current = None

    def pipeline(self, model: str) -> Any:
        if self.model != model:
            self.pipe = None  # free the old model before loading the next
            self.model = None
            self.pipe = self.manager.loader(model, self.device)
            self.model = model
        return self.pipe

    def run_job(self, job: Job) -> None:
        import torch

        from sdengine.pipeline import Cancelled

        m = self.manager
        job.device = self.device
        g = job.generation
        try:
            pipe = self.pipeline(g.model)
        except (SdengineError, OSError, ValueError) as e:
            m.finish(job, FAILED, f"cannot load model {g.model_name!r}: {e}")
            return
        base_seed = int(g.kwargs["seed"])
        batch = int(g.kwargs["batch_size"])
        done_steps = 0
        for it in range(g.n_iter):
            if job.cancel.is_set():
                break
            kwargs = dict(g.kwargs, seed=base_seed + it * batch)
            run_steps = [0]

            def callback(info: Any, _before: int = done_steps, _it: int = it, run_steps: list[int] = run_steps) -> bool:
                if run_steps[0] == 0 and _it == 0:
                    job.steps = info.steps * g.n_iter  # img2img runs fewer steps than asked
                run_steps[0] = info.steps
                job.step = _before + info.step
                if job.cancel.is_set() or job.skip.is_set():
                    return False
                if info.step % m.preview_every == 0 or info.step == info.steps:
                    try:
                        job.preview_png = png_bytes(Image.fromarray(info.preview()[0]))
                        job.preview_step = job.step
                    except Exception:  # noqa: BLE001 - a preview is optional
                        pass
                job.changed()
                return True

            try:
                result = pipe(**kwargs, callback=callback, progress=False)
            except Cancelled as e:
                if job.skip.is_set() and not job.cancel.is_set():
                    job.skip.clear()
                    done_steps += run_steps[0]
                    continue
                if e.preview is not None:
                    job.preview_png = png_bytes(Image.fromarray(e.preview[0]))
                m.finish(job, CANCELLED, f"cancelled after step {job.step} of {job.steps}")
                return
            except torch.OutOfMemoryError:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                m.finish(job, FAILED, "out of memory: use a smaller size or batch")
                return
            except (SdengineError, ValueError, OSError) as e:
                m.finish(job, FAILED, str(e))
                return
            done_steps += run_steps[0] or int(kwargs["steps"])
            job.notes.extend(n for n in result.notes if n not in job.notes)
            for image, seed, text in zip(result.images, result.seeds, result.infotexts, strict=True):
                ji = JobImage(image, int(seed), text)
                if job.save:
                    ji.name = m.save(image, int(seed), text)
                job.images.append(ji)
            job.step = done_steps
            job.changed()
        if job.cancel.is_set() and not job.images:
            m.finish(job, CANCELLED, f"cancelled after step {job.step} of {job.steps}")
        else:
            m.finish(job, DONE)
