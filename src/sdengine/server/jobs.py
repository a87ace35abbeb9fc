"""The job queue: bounded, round robin between clients, one worker thread per device, per-job cancel, progress and
previews.

Each client's jobs are FIFO, and clients take turns (``fair``; ``fair=False``: one FIFO; see
:meth:`JobManager.submit`), for every protocol but one: a ComfyUI prompt may be placed by its ``front`` flag or
priority ``number`` (sdengine.server.comfy.routes: ComfyUI prompts stay ordered by number among themselves).

A :class:`Job` is one :class:`~sdengine.server.requests.Generation` and its life: queued -> running ->
done | failed | cancelled. Workers take the job at the head of the queue; each keeps its own pipeline (one model at a
time, switched between jobs). Model affinity: a free worker whose model is loaded takes the first queued job for
THAT model instead, skipping jobs for other models ahead of it, unless a job it would skip has waited
``affinity_s`` seconds or more (then the head: nothing starves) or is a ComfyUI prompt (never overtaken).
Cancel touches one job: a queued job leaves the queue, a running one stops
at the end of the current sampler step (the pipeline's step callback returns False). Nothing of a job
stays on the model after it: the pipeline removes the LoRAs it applied and builds ControlNets per call.
A job that fails (bad input found late, out of memory, a bug) fails alone; the worker takes the next.

Batching: a worker takes the job at the head of the queue and, when ``max_batch_jobs`` > 1, the later queued jobs that
:func:`batch_key` says are compatible with it (up to ``max_batch_jobs`` jobs and ``max_batch_rows`` images), and
runs them as ONE pipeline call with a prompt, negative prompt and seed per row, and an img2img / inpainting job's
init image and mask on its rows (each row's image equals the same job run alone: the pipeline gives every row its
own generator and starts it from its own image). The result is split back per job. Cancelling
(or A1111-skipping) one job of a running batch stops the batch at the end of the step; that job ends, the
others go back to the FRONT of the queue in their order and run again from the start (no image is lost or
mixed up; they only lose the steps already done).

Threads and the event loop meet in :meth:`Job.subscribe`: each change of a job sets the asyncio events of
its subscribers through ``loop.call_soon_threadsafe``, so waiting costs no polling.

Previews are lazy: every ``preview_every`` steps the worker decodes a preview (the tiny VAE or the latent map)
and encodes its PNG only while someone watches the job (an event stream: :meth:`Job.updates`); otherwise it only
keeps that step's latent (a reference, no work) and :meth:`Job.preview` decodes it when asked (``GET
/v1/jobs/{id}/preview``, A1111's progress with its current image). A job nobody looks at pays nothing for previews.
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
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image

from sdengine.errors import SdengineError
from sdengine.server import security
from sdengine.server.errors import BadRequest, ClientQueueFull, NotFound, QueueFull, ServerStopping, redact_paths
from sdengine.server.requests import Generation
from sdengine.server.security import REQUEST_CALLER, Caller

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = frozenset({DONE, FAILED, CANCELLED})
SSE_KEEPALIVE_S = 15.0  # an event stream sends a comment line after this many seconds of silence
FAIR_WAIT_S = 60.0  # round robin never places a new job ahead of one that has waited this long (nothing starves)
DISCONNECT_POLL_S = 0.5  # an event stream asks whether its client is still there this often while silent

Loader = Callable[[str, str], Any]  # (model reference, device) -> a pipeline


KEEP_IMAGES = 32  # finished jobs whose images stay in memory (older ones keep names, seeds and infotexts)


@dataclass
class JobImage:
    image: Image.Image | None  # released for older finished jobs (see KEEP_IMAGES)
    seed: int
    infotext: str
    name: str | None = None  # file name in the outputs folder when saved


@dataclass(eq=False)  # a job is itself: the queue's lookups (position, cancel) never compare requests' images
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
    preview_png: bytes | None = None  # the newest preview encoded so far (see preview())
    preview_step: int = 0
    # the newest preview's latent not encoded yet: (latents (1, C, h, w), step, latents -> uint8 RGB), or None
    preview_source: tuple[Any, int, Callable[[Any], Any]] | None = None
    version: int = 0  # bumped on every change
    cancel: threading.Event = field(default_factory=threading.Event)
    skip: threading.Event = field(default_factory=threading.Event)
    device: str | None = None
    # the client that sent it (its key's user or its address, see security.Caller and JobManager.submit): its share
    # of the queue, and the one client (besides the admin) that may see, cancel or delete it (may_see)
    owner: str | None = None
    _subscribers: list[tuple[asyncio.AbstractEventLoop, asyncio.Event, bool]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _preview_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.steps = int(self.generation.kwargs["steps"]) * self.generation.n_iter
        self.task_id = self.task_id or self.id
        self.notes.extend(n for n in getattr(self.generation, "notes", ()) if n not in self.notes)  # the route's

    # -- change notification ---------------------------------------------------------------------------

    def changed(self) -> None:
        with self._lock:
            self.version += 1
            subs = list(self._subscribers)
        for loop, ev, _ in subs:
            try:
                loop.call_soon_threadsafe(ev.set)
            except RuntimeError:  # that loop is closed: its subscriber is gone
                pass

    def subscribe(self, *, previews: bool = False) -> asyncio.Event:
        """An event set on every change; ``previews``: this subscriber shows previews (the worker then encodes
        them as it goes, see :attr:`watched`)."""
        ev = asyncio.Event()
        with self._lock:
            self._subscribers.append((asyncio.get_running_loop(), ev, previews))
        return ev

    def unsubscribe(self, ev: asyncio.Event) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[1] is not ev]

    @property
    def watched(self) -> bool:
        """Someone shows this job's previews as they come (an event stream is open)."""
        with self._lock:
            return any(s[2] for s in self._subscribers)

    def keep_preview(self, latents: Any, step: int, to_rgb: Callable[[Any], Any]) -> None:
        """Keep a step's latents (one image) to decode only if someone asks (:meth:`preview`): costs nothing."""
        self.preview_source = (latents, step, to_rgb)

    def set_preview(self, png: bytes, step: int) -> None:
        with self._preview_lock:
            self.preview_png, self.preview_step = png, step
            src = self.preview_source
            if src is not None and src[1] <= step:
                self.preview_source = None

    def preview(self) -> tuple[bytes, int] | None:
        """The newest preview (PNG, step), decoding the kept latents when they are newer than the last PNG (on
        the caller's thread: call it from a worker thread or a threadpool route); None before the first."""
        with self._preview_lock:
            src = self.preview_source
            if src is not None and (self.preview_png is None or src[1] > self.preview_step):
                try:
                    import torch

                    with torch.inference_mode():
                        frame = src[2](src[0]).cpu().numpy()
                    self.preview_png, self.preview_step = png_bytes(Image.fromarray(frame[0])), src[1]
                except Exception:  # noqa: BLE001 - a preview is optional
                    log.debug("could not decode a preview", exc_info=True)
                self.preview_source = None
            if self.preview_png is None:
                return None
            return self.preview_png, self.preview_step

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

    async def updates(
        self,
        is_disconnected: Callable[[], Awaitable[bool]],
        keepalive_s: float = SSE_KEEPALIVE_S,
        poll_s: float = DISCONNECT_POLL_S,
    ) -> AsyncGenerator[bool, None]:
        """What drives an event stream of this job: yields True at once and after every change, False after
        ``keepalive_s`` of silence (send a keep-alive comment); ends when the client has gone, which it asks
        ``is_disconnected`` after every change and every ``poll_s`` seconds of silence: a stream whose client left
        stops making the worker encode previews within ``poll_s``, whatever the ASGI server (uvicorn's spec 2.3
        lets Starlette cancel the stream at once; a server of spec 2.4 tells it only when a send fails). The caller
        stops after the final state; use it under ``contextlib.aclosing`` so the subscription ends with the stream.
        Its subscriber shows previews: while it is open the worker encodes them as it goes."""
        ev = self.subscribe(previews=True)
        try:
            while True:
                ev.clear()  # before the caller looks, so that a change while it sends wakes the next turn
                yield True
                keepalive_at = time.monotonic() + keepalive_s
                while True:
                    if await is_disconnected():
                        return
                    left = keepalive_at - time.monotonic()
                    if left <= 0:
                        yield False
                        keepalive_at = time.monotonic() + keepalive_s
                        continue
                    try:
                        await asyncio.wait_for(ev.wait(), min(poll_s, left))
                        break
                    except TimeoutError:
                        pass
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


# The pipeline keywords a batchable job may have; any other key (a future feature) makes the job run alone.
_BATCH_SETTINGS = (
    "steps",
    "sampler",
    "schedule",
    "cfg_scale",
    "width",
    "height",
    "strength",
    "mask_blur",
    "clip_skip",
    "clip_skip_rule",
    "loras",
    "guess_mode",
    "vae_decode",
    "vae_encode",
    "sag_scale",  # self-attention guidance: one scale and blur per call (left out when off)
    "sag_blur_sigma",
    "sag_rule",
    "pag_scale",  # perturbed-attention guidance: one scale and one set of layers per call (left out when off)
    "pag_layers",
    "freeu",  # FreeU: one set of factors, version and rule per call (left out when off)
    "freeu_version",
    "freeu_rule",
    "strength_rule",  # how strength counts the steps (A1111's grid and Brownian noise are per row too)
    "resize_mode",  # img2img / inpainting: how each row's init image is fitted, what the mask's latent fill is, ...
    "masked_content",
    "mask_round",
    "noise_multiplier",
    "image_cfg_scale",  # A1111's img2img sends it always (instruct-pix2pix's; other models ignore it, with a note)
)
_PER_ROW = ("prompt", "negative_prompt", "seed", "batch_size", "init_image", "mask")
_NEVER_BATCHED = ("controlnets",)


def _image_size(v: Any) -> tuple[int, int] | None:
    """A decoded image's (width, height); None for anything else (a job with such an input runs alone)."""
    return tuple(v.size) if isinstance(v, Image.Image) else None  # type: ignore[return-value]


def batch_key(job: Job) -> tuple[Any, ...] | None:
    """What must be equal for jobs to share one pipeline call; None = this job always runs alone.

    Conservative on purpose: only txt2img, img2img and inpainting jobs of one iteration (``n_iter`` 1), with no
    ControlNet (its units would have to be compared and stacked per row), batch together, and only when the
    model and every setting that is one per call (size, sampler, schedule, steps, cfg, strength, mask blur, clip
    skip, the LoRAs and their weights, ...) are equal. What may differ per row is only the prompt, the negative
    prompt, the seed (and ``batch_size``: a job's rows stay consecutive) and the init image and mask (each row
    its own job's: ``Pipeline`` takes them as lists), which must be there or not alike and of one size each (an
    init image of another size, or a mask beside none, is another batch). A job that runs itself (a ComfyUI
    graph, ``run_on``) or through a script (A1111's SD upscale, ``Generation.script``) never batches. What an
    A1111 job has beside its call (``finish``: the inpainting overlay and "only masked" paste; ``infotext_extra``)
    is applied per job by :meth:`Worker.run_batch`, so it is not in the key."""
    if getattr(job, "run_on", None) is not None:
        return None
    g = job.generation
    # a base -> refiner hand-off, another hires model, a script that calls the pipeline itself (A1111's SD upscale),
    # A1111's SDXL options other than its empty-negative rule: alone
    if g.refiner is not None or getattr(g, "hr_model", None) is not None or getattr(g, "script", None) is not None:
        return None
    if set(g.sdxl_options or ()) - {"force_zeros_for_empty_prompt"}:
        return None
    kw = g.kwargs
    if g.n_iter != 1 or any(kw.get(k) is not None for k in _NEVER_BATCHED):
        return None
    if set(kw) - set(_BATCH_SETTINGS) - set(_PER_ROW) - set(_NEVER_BATCHED):
        return None
    init, mask = kw.get("init_image"), kw.get("mask")
    images = (_image_size(init) if init is not None else None, _image_size(mask) if mask is not None else None)
    if (init is not None and images[0] is None) or (mask is not None and images[1] is None):
        return None  # an input that is not a decoded image: alone
    loras = kw.get("loras")
    # a weight is a float or a LoRAWeight (separate text-encoder / U-Net multipliers): both hashable, compared as is
    lora_key = tuple((str(p), w) for p, w in loras) if loras else ()
    xl = tuple(sorted((g.sdxl_options or {}).items()))  # an A1111 job and a native one zero differently
    vae = (getattr(g, "vae", None), getattr(g, "checkpoint_vae", False))  # one VAE per call
    return (g.model, *(kw.get(k) for k in _BATCH_SETTINGS if k != "loras"), lora_key, xl, vae, images)


def sdxl_request(g: Any, pipe: Any, refiner: Any, negatives: list[Any]) -> dict[str, Any] | None:
    """The ``sdxl`` settings of a job on ``pipe`` (and ``refiner`` in a hand-off): the request's own, over A1111's
    SDXL options (``Generation.sdxl_options``) where the model is an SDXL one. The refiner's aesthetic scores go
    to a refiner only; A1111's empty-negative rule only where it changes something (a model that would not zero
    an empty negative prompt, and an empty one is there), so that a base model's infotext does not carry it."""
    own = g.kwargs.get("sdxl")
    if not g.sdxl_options or getattr(pipe, "text_kind", None) != "sdxl":
        return own
    xl = dict(g.sdxl_options)
    if not getattr(pipe, "refiner", False) and refiner is None:  # the scores are a refiner's
        xl.pop("aesthetic_score", None)
        xl.pop("negative_aesthetic_score", None)
    rule = xl.get("force_zeros_for_empty_prompt")
    if rule is not None:
        rows = [n for v in negatives for n in (v if isinstance(v, list | tuple) else [v])]
        same = all(getattr(m.conditioner, "force_zeros", rule) == rule for m in (pipe, refiner) if m is not None)
        if same or all(isinstance(n, str) and n != "" for n in rows):
            xl.pop("force_zeros_for_empty_prompt")
    if not xl:
        return own
    return {**xl, **(own or {})}


def batch_notes(pipe: Any, jobs: list[Job], notes: list[str]) -> dict[str, list[str]]:
    """Each job's share of a batched call's notes: a note about one job's prompt (a BREAK read as a space, a
    prompt cut at the context length, a '[' that is not prompt editing) goes to that job only, as if it had run
    alone; the call's other notes (tiled VAE decode, ...) go to all. A job's own prompt notes are found by reading
    its prompts again as the pipeline reads one job's (the conditioner caches the encodings: cheap), only when the
    call made notes at all; when that cannot be done, every job gets every note, as before."""
    if not notes:
        return {j.id: [] for j in jobs}
    try:
        from sdengine.pipeline.prompt_editing import row_schedules
        from sdengine.text.conditioners import effective_clip_skip

        own: dict[str, list[str]] = {}
        for job in jobs:
            kw = job.generation.kwargs
            mine: list[str] = []
            skip = effective_clip_skip(
                pipe.conditioner, int(kw.get("clip_skip") or 1), kw.get("clip_skip_rule") or "sdengine"
            )
            plain = row_schedules(
                pipe.conditioner,
                [kw["prompt"]],
                [kw["negative_prompt"]],
                int(kw["steps"]),
                clip_skip=skip,
                note=mine.append,
            )
            if plain is None:  # no prompt editing: the pipeline encodes the pair
                pipe.conditioner.pair(kw["prompt"], kw["negative_prompt"], clip_skip=skip, note=mine.append)
            own[job.id] = mine
    except Exception:  # noqa: BLE001 - attributing notes is best effort
        log.debug("could not attribute a batch's notes", exc_info=True)
        return {j.id: list(notes) for j in jobs}
    about_prompts = {n for mine in own.values() for n in mine}
    return {j.id: [n for n in notes if n not in about_prompts or n in own[j.id]] for j in jobs}


J = TypeVar("J", bound=Job)


def may_see(job: Job, caller: Caller | None = None) -> bool:
    """Whether ``caller`` (by default the request being handled's) may see, cancel or delete ``job``: its own
    client's job, or any job for the admin. Outside a request (the workers, the server's own code) every job.
    Every route that names or lists jobs asks this, so that another client's job is as unknown as one that does
    not exist (404, never 403: its id is not confirmed)."""
    return owned(job.owner, caller)


def owned(owner: str | None, caller: Caller | None = None) -> bool:
    """:func:`may_see` for a thing whose client is ``owner`` (a job, a ComfyUI history entry)."""
    return security.owned(owner, caller)


def visible(jobs: list[J], caller: Caller | None = None) -> list[J]:
    """The jobs of ``jobs`` that ``caller`` (by default the request's) may see (:func:`may_see`)."""
    return [j for j in jobs if may_see(j, caller)]


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
        max_batch_jobs: int = 1,
        max_batch_rows: int = 8,
        preview: str = "auto",
        affinity_s: float = 30.0,
        max_queued_per_client: int = 0,
        fair: bool = True,
        fair_wait_s: float = FAIR_WAIT_S,
    ) -> None:
        self.loader = loader
        self.outputs_dir = Path(outputs_dir)
        self.max_queue = max_queue
        self.keep_jobs = keep_jobs
        self.preview_every = max(1, preview_every)
        self.preview = preview  # "auto": the model's tiny VAE when it has one, else the latent RGB map; "latent"
        self.max_batch_jobs = max(1, max_batch_jobs)
        self.max_batch_rows = max(1, max_batch_rows)
        self.affinity_s = affinity_s  # longest a job is skipped for one of a worker's loaded model (0: FIFO)
        self.max_queued_per_client = max(0, max_queued_per_client)  # a client's most queued jobs (0: no limit)
        self.fair = fair  # place a client's job after one job of every other client with as many queued (round robin)
        self.fair_wait_s = fair_wait_s  # a job that has waited this long is not overtaken by a new one any more
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self.stopping = False
        self._out_lock = threading.Lock()
        self._next_index: int | None = None
        self.workers = [Worker(self, d) for d in devices]
        self.completed = 0

    # -- lifecycle -------------------------------------------------------------------------------------

    def preview_rgb(self, pipe: Any) -> Any:
        """The previews' latents -> RGB map for ``pipe``: its tiny VAE's decode (full size, close to the final
        image) when it has one and ``preview`` is "auto"; otherwise the cheap latent map of the model's latent space
        (``pipe.latent_rgb_map``: SD's, SD3's or Flux's colours; grey for a space without one)."""
        from sdengine.vae_utils import latent_rgb_for, tiny_vae_rgb

        tiny = getattr(pipe, "tiny_vae", None)
        if self.preview != "auto" or tiny is None:
            return latent_rgb_for(getattr(pipe, "latent_rgb_map", None))
        return tiny_vae_rgb(tiny)

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def stop(self, timeout: float = 30.0, *, grace: float = 0.0, hurry: Callable[[], bool] | None = None) -> None:
        """Stop: no job is taken or accepted any more, the queued ones end ``cancelled`` at once, the running ones
        get ``grace`` seconds to finish (less when ``hurry()`` turns true: a second Ctrl-C), then are cancelled at
        the end of their step; waits (bounded by ``timeout``) for the workers to end. Every job ends in a final
        state, so its event streams and waiting requests end with a final answer. Safe to call twice."""
        with self._cond:
            self.stopping = True
            queued = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for j in queued:
            self.finish(j, CANCELLED, "the server stopped before it started")
        running = self.running()
        if running and grace > 0:
            log.warning(
                "stopping: waiting up to %g s for %d running job(s) to finish (Ctrl-C again to cancel them now)",
                grace,
                len(running),
            )
            deadline = time.monotonic() + grace
            while self.running() and time.monotonic() < deadline and not (hurry is not None and hurry()):
                time.sleep(0.05)
        for j in self.running():
            if not j.cancel.is_set():
                log.warning("stopping: cancelling job %s at step %d of %d", j.id, j.step, j.steps)
            j.cancel.set()
            j.changed()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w.is_alive():
                w.join(max(0.0, deadline - time.monotonic()))

    def cancel_reason(self, job: Job) -> str:
        why = " (the server stopped)" if self.stopping else ""
        return f"cancelled after step {job.step} of {job.steps}{why}"

    # -- the queue -------------------------------------------------------------------------------------

    def submit(self, job: Job, place: Callable[[list[Job]], int] | None = None) -> int:
        """Queue ``job``; its position (0 = next). QueueFull when ``max_queue`` jobs are waiting, or when its
        client already has ``max_queued_per_client`` jobs waiting.

        The job's ``owner`` (unless set) is the client of the request being handled (its address). With ``fair``
        the job goes after the jobs of clients that have fewer jobs queued than its own client (round robin between
        clients: one client's many jobs never make another's one job wait behind all of them); with a single
        client that is the end of the queue (FIFO). ``place(queued)`` (called under the queue's lock with the
        queued jobs, head first) may give the index to insert the job at instead (ComfyUI's ``front`` and
        priority ``number``)."""
        if job.owner is None:
            caller = REQUEST_CALLER.get()
            job.owner = caller.client if caller is not None else None
        with self._cond:
            if self.stopping:
                raise ServerStopping("the server is stopping; no job is accepted", retry_after=30)
            if job.id in self._jobs:  # the table is keyed by id: a second job would hide the first
                raise BadRequest(f"job id {job.id!r} is taken")
            busy = max(1, len(self.workers))
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"the queue is full ({self.max_queue} jobs waiting); retry later",
                    retry_after=max(1, len(self._queue) // busy),
                )
            if self.max_queued_per_client:
                own = [i for i, j in enumerate(self._queue) if j.owner == job.owner]
                if len(own) >= self.max_queued_per_client:
                    raise ClientQueueFull(
                        f"this client ({job.owner}) already has {len(own)} job{'s' * (len(own) != 1)} waiting, its "
                        f"most (--max-queued-per-client {self.max_queued_per_client}); retry when one has started",
                        retry_after=max(1, (own[0] + 1) // busy),
                    )
            if place is not None:
                index = max(0, min(len(self._queue), place(list(self._queue))))
            elif self.fair:
                index = self._fair_index(job.owner)
            else:
                index = len(self._queue)
            self._queue.insert(index, job)
            self._jobs[job.id] = job
            self._forget_old()
            self._cond.notify()
            moved = list(self._queue)[index + 1 :]  # placed ahead of them (round robin, ComfyUI's front / number)
        self._moved(moved)
        return index

    def _fair_index(self, owner: str | None) -> int:
        """Where a job of ``owner`` goes (lock held): before the first queued job that is a later turn of its own
        client than this one's turn, a client's turn counting its running jobs, then its queued ones in order:
        round robin between clients (a client whose job is running waits behind another's first job). Never ahead
        of a job that has waited ``fair_wait_s`` or more: new clients arriving all the time cannot starve a client's
        later jobs."""
        seen: dict[str | None, int] = {}
        for j in self._jobs.values():
            if j.state == RUNNING:
                seen[j.owner] = seen.get(j.owner, 0) + 1
        turn = seen.get(owner, 0) + sum(1 for j in self._queue if j.owner == owner)
        now = time.time()
        floor = max((i + 1 for i, j in enumerate(self._queue) if now - j.created >= self.fair_wait_s), default=0)
        for i, j in enumerate(self._queue):
            t = seen.get(j.owner, 0)
            if t > turn and i >= floor:
                return i
            seen[j.owner] = t + 1
        return len(self._queue)

    def _forget_old(self) -> None:
        """Drop the oldest finished jobs beyond ``keep_jobs``, and the images (results and decoded inputs) of all
        but the newest finished ones (the routes that answer with images read them as soon as the job finishes)."""
        # By finish time, not submission: a long job that ends after many later ones keeps its images for the
        # route that waits to answer with them.
        finished = sorted((j for j in self._jobs.values() if j.state in FINISHED), key=lambda j: j.finished or 0.0)
        for j in finished[: max(0, len(finished) - KEEP_IMAGES)]:
            for im in j.images:
                im.image = None
            j.preview_source = None  # its latents (and the decoder they need)
            j.generation.release_images()
        while len(self._jobs) > self.keep_jobs + self.max_queue:
            for jid, j in self._jobs.items():
                if j.state in FINISHED:
                    del self._jobs[jid]
                    break
            else:
                return

    def _pick(self, model: str | None) -> Job:
        """The job a worker with ``model`` loaded takes next (lock held, queue not empty): the head of the queue, or the
        first for ``model`` when every job before it is of another known model and has waited < ``affinity_s``."""
        head = self._queue[0]
        if model is None or self.affinity_s <= 0:
            return head
        now = time.time()
        for j in self._queue:
            if getattr(j, "run_on", None) is not None:  # a ComfyUI prompt (any model): never overtaken
                return head
            if j.generation.model == model:
                return j
            if now - j.created >= self.affinity_s:  # waited long enough: the head, as without affinity
                return head
        return head

    def take(self, timeout: float = 0.5, model: str | None = None) -> list[Job]:
        """The next job (see :meth:`_pick`: the head, or the first for ``model``, the taking worker's loaded
        model) and the later ones compatible with it (see :func:`batch_key`), now running; [] when none came within
        ``timeout`` seconds or the server is stopping."""
        with self._cond:
            if not self._queue and not self.stopping:
                self._cond.wait(timeout)
            if self.stopping or not self._queue:
                return []
            first = self._pick(model)
            self._queue.remove(first)
            jobs = [first]
            key = batch_key(first) if self.max_batch_jobs > 1 else None
            if key is not None:
                rows = int(first.generation.kwargs["batch_size"])
                for j in list(self._queue):
                    if len(jobs) >= self.max_batch_jobs:
                        break
                    n = int(j.generation.kwargs["batch_size"])
                    if rows + n <= self.max_batch_rows and batch_key(j) == key:
                        self._queue.remove(j)
                        jobs.append(j)
                        rows += n
            now = time.time()
            for j in jobs:
                j.state = RUNNING
                j.started = now
            moved = list(self._queue)
        for j in jobs:
            j.changed()
        self._moved(moved)
        return jobs

    @staticmethod
    def _moved(jobs: list[Job]) -> None:
        """Jobs whose place in the queue changed (a job ahead left it): their watchers get the new position."""
        for j in jobs:
            j.changed()

    def requeue(self, jobs: list[Job]) -> None:
        """Put jobs of a stopped batch back at the FRONT of the queue, in their order, to run from the start
        (a job cancelled meanwhile, or any when the server stops, is finished as cancelled instead)."""
        gone = []
        with self._cond:
            for j in reversed(jobs):
                if self.stopping or j.cancel.is_set():
                    gone.append(j)
                    continue
                j.state = QUEUED
                j.started = None
                j.step = 0
                j.device = None
                j.preview_png = None
                j.preview_step = 0
                j.preview_source = None
                self._queue.appendleft(j)
            self._cond.notify()
            moved = [j for j in self._queue if j not in jobs]
        for j in gone:
            self.finish(j, CANCELLED, "the server stopped" if self.stopping else "cancelled while queued")
        for j in jobs:
            if j not in gone:
                j.changed()
        self._moved(moved)

    def has_id(self, job_id: str) -> bool:
        """Whether any client's job has the id ``job_id`` (a ComfyUI prompt_id a client chooses must be free: the
        table is keyed by id); says nothing of whose it is."""
        with self._cond:
            return job_id in self._jobs

    def get(self, job_id: str) -> Job:
        """The job ``job_id`` if the request's client may see it (:func:`may_see`); NotFound otherwise, the same
        answer as for an id that does not exist."""
        with self._cond:
            job = self._jobs.get(job_id)
        if job is None or not may_see(job):
            raise NotFound(f"no job {job_id!r} (finished jobs are kept for a while, then forgotten)")
        return job

    def by_task_id(self, task_id: str) -> Job | None:
        with self._cond:
            for j in reversed(self._jobs.values()):
                if j.task_id == task_id and may_see(j):  # another client's task is unknown to this one
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

    def queued(self) -> list[Job]:
        """The queued jobs in the order they will run."""
        with self._cond:
            return list(self._queue)

    def queued_count(self) -> int:
        with self._cond:
            return len(self._queue)

    def cancel(self, job: Job) -> None:
        """A queued job leaves the queue now; a running one stops after its current step."""
        moved: list[Job] = []
        with self._cond:
            if job.state == QUEUED and job in self._queue:
                at = self._queue.index(job)
                self._queue.remove(job)
                moved = list(self._queue)[at:]
                removed = True
            else:
                removed = False
            job.cancel.set()
        if removed:
            self.finish(job, CANCELLED, "cancelled while queued")
            self._moved(moved)
        elif job.state == RUNNING:
            job.changed()

    def finish(self, job: Job, state: str, error: str | None = None) -> None:
        if error is not None:  # what every protocol answers: the server's paths cut to the names clients gave
            shown = redact_paths(error)
            if shown != error:
                log.info("job %s: %s", job.id, error)  # the whole text stays in the server's log
            error = shown
        # the error and the time before the state: a route that sees a finished state reads them at once (the
        # state set first once let an A1111 answer say only "failed" when it read between the two)
        job.error = error
        job.finished = time.time()
        job.state = state
        if state == DONE:
            self.completed += 1
        with self._cond:
            self._forget_old()  # at once, not at the next submit: a quiet server holds no more than a busy one
        job.changed()

    # -- outputs ---------------------------------------------------------------------------------------

    def save(self, image: Image.Image, seed: int, infotext: str) -> str:
        """Write a PNG with its ``parameters`` text as NNNNN-SEED.png; its file name."""
        from sdengine.metadata import save_png

        with self._out_lock:
            if self._next_index is None:
                self._next_index = self._first_free_index()
            name = f"{self._next_index:05d}-{seed}.png"
            if (self.outputs_dir / name).exists():
                # Another writer (`sdengine generate --out` on the same folder, a second server) numbered on from
                # the same files: count on from the folder as it is now instead of replacing its image.
                self._next_index = max(self._next_index + 1, self._first_free_index())
                while (self.outputs_dir / (name := f"{self._next_index:05d}-{seed}.png")).exists():
                    self._next_index += 1
            self._next_index += 1
        save_png(image, self.outputs_dir / name, infotext)
        return name

    def _first_free_index(self) -> int:
        """One more than the highest NNNNN- number of a PNG in the outputs folder (0 when there is none)."""
        if not self.outputs_dir.is_dir():
            return 0
        used = [int(m.group(1)) for p in self.outputs_dir.glob("*.png") if (m := re.match(r"^(\d{5,})-", p.name))]
        return max(used, default=-1) + 1


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
        self.refiner_pipe: Any = None  # the SDXL refiner of the last hand-off job (kept for the next one)
        self.refiner_model: str | None = None
        self.hr_pipe: Any = None  # the hires fix's second-pass model of the last job that named another (kept too)
        self.hr_model: str | None = None
        self.current: Job | None = None
        self.batch: list[Job] = []  # the jobs of the running call (one, or a batch)
        self.preload: str | None = None  # a model to load before the first job (set before start)
        self.preloaded = False  # the preload was tried
        self.load_error: str | None = None  # why the preload failed (until that model loads)

    @property
    def state(self) -> str:
        """``loading`` (its default model, before the first job), ``failed`` (that load failed: every job on the
        default model would fail), ``stopped`` (the thread ended) or ``ready``."""
        if self.load_error is not None:
            return "failed"
        if self.preload is not None and not self.preloaded:
            return "loading"
        if self.ident is not None and not self.is_alive():
            return "stopped"
        return "ready"

    def run(self) -> None:
        if self.preload is not None:
            try:
                self.pipeline(self.preload)
            except Exception as e:  # noqa: BLE001 - the first job that needs it reports the error
                log.warning("could not load %s on %s: %s", self.preload, self.device, e)
                self.load_error = f"cannot load {self.preload}: {type(e).__name__}: {e}"
            finally:
                self.preloaded = True
        while True:
            jobs = self.manager.take(model=self.model)
            if not jobs:
                if self.manager.stopping:
                    return
                continue
            self.current = jobs[0]
            self.batch = jobs
            try:
                run_on = getattr(jobs[0], "run_on", None)  # a job that runs itself here (a ComfyUI graph)
                if run_on is not None and len(jobs) == 1:
                    run_on(self)
                elif len(jobs) == 1:
                    self.run_job(jobs[0])
                else:
                    self.run_batch(jobs)
            except BaseException as e:  # noqa: BLE001 - a job never takes the worker down
                log.exception("job(s) %s failed", ", ".join(j.id for j in jobs))
                for job in jobs:
                    if job.state == RUNNING:
                        self.manager.finish(job, FAILED, f"internal error: {type(e).__name__}: {e}")
            finally:
                self.current = None
                self.batch = []
                try:  # a job's VAE (A1111's sd_vae) is its own: the models go back to theirs
                    self.restore_vaes()
                except Exception:  # noqa: BLE001 - restoring assigns kept modules; never takes the worker down
                    log.exception("could not restore the models' VAEs")

    def pipeline(self, model: str) -> Any:
        if self.model != model:
            self.pipe = None  # free the old model (and a hand-off's refiner) before loading the next
            if self.model is not None:  # and the IP-Adapter files its jobs kept (a CLIP vision encoder is large)
                from sdengine.pipeline.ip_adapter import forget_loaded

                forget_loaded()
            self.model = None
            self.refiner_pipe, self.refiner_model = None, None
            self.hr_pipe, self.hr_model = None, None
            self.pipe = self.manager.loader(model, self.device)
            self.model = model
            if model == self.preload:
                self.load_error = None
        return self.pipe

    def refiner(self, model: str, keep: Any = ()) -> Any:
        """The refiner of a hand-off job, loaded beside the job's model (and kept for the next such job). A hires
        model kept from an earlier job that this one does not name (``keep``) is freed before a new load: the
        device holds at most the models the job runs."""
        if model == self.hr_model and self.refiner_model != model:  # one copy of a model in both roles
            self.refiner_pipe, self.refiner_model = self.hr_pipe, self.hr_model
            self.hr_pipe, self.hr_model = None, None
        if self.refiner_model != model:
            self.refiner_pipe = None
            self.refiner_model = None
            if self.hr_model is not None and self.hr_model not in keep:
                self.hr_pipe, self.hr_model = None, None
            self.refiner_pipe = self.manager.loader(model, self.device)
            self.refiner_model = model
        return self.refiner_pipe

    def hires_model(self, model: str, keep: Any = ()) -> Any:
        """The hires fix's second-pass model of a job (A1111's ``hr_checkpoint_name``), loaded beside the job's model
        and kept for the next such job; the refiner's pipeline where it is the same model (one copy). A refiner
        kept from an earlier job that this one does not name (``keep``) is freed before a new load."""
        if model == self.refiner_model:
            return self.refiner_pipe
        if self.hr_model != model:
            self.hr_pipe = None
            self.hr_model = None
            if self.refiner_model is not None and self.refiner_model not in keep:
                self.refiner_pipe, self.refiner_model = None, None
            self.hr_pipe = self.manager.loader(model, self.device)
            self.hr_model = model
        return self.hr_pipe

    def use_vae(self, g: Any, pipes: Sequence[Any]) -> str | None:
        """Set the job's VAE (A1111's sd_vae: ``Generation.vae`` / ``checkpoint_vae``; neither: the one each
        model was loaded with) on the pipelines it runs; None, or why it cannot (the job fails with that line)."""
        vae, own = getattr(g, "vae", None), getattr(g, "checkpoint_vae", False)
        for p in pipes:
            if p is None or not hasattr(p, "set_vae"):
                continue
            try:
                p.set_vae(vae, checkpoint_vae=own)
            except (SdengineError, OSError, ValueError) as e:
                what = f"VAE {getattr(g, 'vae_name', None) or vae!r}" if vae is not None else "the model's own VAE"
                return f"cannot use {what} with {getattr(p, 'name', 'the model')!r}: {e}"
        return None

    def restore_vaes(self) -> None:
        """Every kept pipeline back to the VAE it was loaded with (after each job)."""
        for p in (self.pipe, self.refiner_pipe, self.hr_pipe):
            if p is not None and hasattr(p, "set_vae"):
                p.set_vae(None)

    def run_job(self, job: Job) -> None:
        import torch

        from sdengine.pipeline import Cancelled
        from sdengine.vae_utils import LatentPreviewer

        m = self.manager
        job.device = self.device
        g = job.generation
        try:
            pipe = self.pipeline(g.model)
        except (SdengineError, OSError, ValueError) as e:
            m.finish(job, FAILED, f"cannot load model {g.model_name!r}: {e}")
            return
        call, refiner, hr = pipe, None, None
        if g.refiner is not None:
            try:
                refiner = self.refiner(g.refiner, keep={g.hr_model})
            except (SdengineError, OSError, ValueError) as e:
                m.finish(job, FAILED, f"cannot load the refiner {g.refiner_name!r}: {e}")
                return
            if not hasattr(pipe, "generate_with_refiner"):
                m.finish(job, FAILED, f"a refiner needs an SDXL base model; {g.model_name!r} is not one")
                return
        if g.hr_model is not None:
            try:
                hr = self.hires_model(g.hr_model, keep={g.refiner})
            except (SdengineError, OSError, ValueError) as e:
                m.finish(job, FAILED, f"cannot load the hires model {g.hr_model_name!r}: {e}")
                return

            def call(**kw: Any) -> Any:
                return pipe(hr_model=hr, **kw)

        if refiner is not None:

            def call(**kw: Any) -> Any:
                return pipe.generate_with_refiner(
                    refiner,
                    switch_at=g.refiner_switch_at,
                    switch_rule=getattr(g, "refiner_switch_rule", "a1111"),
                    hires_pass=g.hires_refiner_pass,
                    hr_model=hr,
                    **kw,
                )

        script = getattr(g, "script", None)
        if script is not None:  # A1111's SD upscale: the script calls the pipeline once per tile
            inner = call

            def call(**kw: Any) -> Any:
                return script(inner, **kw)

        failed = self.use_vae(g, (pipe, refiner, hr))
        if failed is not None:
            m.finish(job, FAILED, failed)
            return
        from sdengine.pipeline.request import batch_count_seeds

        base_kwargs = dict(g.kwargs)
        xl = sdxl_request(g, pipe, refiner, [g.kwargs.get("negative_prompt")])
        if xl is not None:
            base_kwargs["sdxl"] = xl
        seeds = g.kwargs["seed"]  # a list: one seed per row, the same for every iteration (A1111's variations)
        batch = int(g.kwargs["batch_size"])
        subseed = g.kwargs.get("subseed")
        done_steps = 0
        for it in range(g.n_iter):
            if job.cancel.is_set():
                break
            seed, sub = batch_count_seeds(seeds, subseed, g.kwargs.get("subseed_strength") or 0.0, batch, it)
            kwargs = dict(base_kwargs, seed=seed)
            if sub is not None:
                kwargs["subseed"] = sub
            run_steps = [0]
            previewer = LatentPreviewer(m.preview_rgb(pipe))

            def callback(
                info: Any,
                _before: int = done_steps,
                _it: int = it,
                run_steps: list[int] = run_steps,
                previewer: LatentPreviewer = previewer,
            ) -> bool:
                if run_steps[0] == 0 and _it == 0:
                    job.steps = info.steps * g.n_iter  # img2img runs fewer steps than asked
                run_steps[0] = info.steps
                job.step = _before + info.step
                if job.cancel.is_set() or job.skip.is_set():
                    return False
                if (info.step % m.preview_every == 0 or info.step == info.steps) and not job.watched:
                    job.keep_preview(info.denoised[:1].clone(), job.step, previewer.to_rgb)  # decoded only if asked
                elif info.step % m.preview_every == 0 or info.step == info.steps:
                    try:  # on a GPU the frame comes from an earlier step: the loop never waits for it
                        previewer.submit(info.denoised[:1], job.step)
                        got = previewer.take(wait=info.step == info.steps)
                        if got is not None:
                            job.set_preview(png_bytes(Image.fromarray(got[1][0])), got[0])
                    except Exception:  # noqa: BLE001 - a preview is optional
                        pass
                job.changed()
                return True

            try:
                result = call(**kwargs, callback=callback, progress=False)
            except Cancelled as e:
                if job.skip.is_set() and not job.cancel.is_set():
                    job.skip.clear()
                    done_steps += run_steps[0]
                    continue
                if e.preview is not None:
                    job.set_preview(png_bytes(Image.fromarray(e.preview[0])), job.step)
                m.finish(job, CANCELLED, m.cancel_reason(job))
                return
            except (torch.OutOfMemoryError, MemoryError):  # CUDA's, or the CPU allocator's
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                m.finish(job, FAILED, "out of memory: use a smaller size or batch")
                return
            except (SdengineError, ValueError, OSError) as e:
                m.finish(job, FAILED, str(e))
                return
            done_steps += run_steps[0] or int(kwargs["steps"])
            job.notes.extend(n for n in result.notes if n not in job.notes)
            masks = getattr(result, "composite_masks", None) or [None] * len(result.images)  # SD upscale has none
            for image, seed, text, mask in zip(result.images, result.seeds, result.infotexts, masks, strict=True):
                image, text = job.generation.finished(image, mask), job.generation.labelled(text)
                ji = JobImage(image, int(seed), text)
                if job.save:
                    try:  # a full disk fails this job only (save_png leaves no partial file)
                        ji.name = m.save(image, int(seed), text)
                    except OSError as e:
                        m.finish(job, FAILED, f"could not save the image: {e}")
                        return
                job.images.append(ji)
            job.step = done_steps
            job.changed()
        if job.cancel.is_set() and not job.images:
            m.finish(job, CANCELLED, m.cancel_reason(job))
        else:
            m.finish(job, DONE)

    def run_batch(self, jobs: list[Job]) -> None:
        """Compatible jobs (see :func:`batch_key`) as one pipeline call, one row per image, split back per job.

        A cancel or skip of one job stops the call: that job ends (cancelled; a skipped one done without
        images, as alone), the others are re-queued at the front. A failure the pipeline reports (bad input,
        out of memory) reruns each job alone, so that it fails alone."""
        import torch

        from sdengine.pipeline import Cancelled
        from sdengine.vae_utils import LatentPreviewer

        m = self.manager
        for job in [j for j in jobs if j.cancel.is_set()]:
            m.finish(job, CANCELLED, "cancelled before it started")
            jobs.remove(job)
        if len(jobs) <= 1:
            for job in jobs:
                self.run_job(job)
            return
        for job in jobs:
            job.device = self.device
        g0 = jobs[0].generation
        try:
            pipe = self.pipeline(g0.model)
        except (SdengineError, OSError, ValueError) as e:
            for job in jobs:
                m.finish(job, FAILED, f"cannot load model {g0.model_name!r}: {e}")
            return
        failed = self.use_vae(g0, (pipe,))  # the jobs' VAEs are equal (batch_key)
        if failed is not None:
            for job in jobs:
                m.finish(job, FAILED, failed)
            return
        # A1111's SDXL empty-negative rule is kept in a call only where a row has an empty negative prompt (and the
        # infotext then says so): jobs whose own call would keep it and jobs whose own would not run as two batches
        own_xl = [sdxl_request(j.generation, pipe, None, [j.generation.kwargs["negative_prompt"]]) for j in jobs]
        if any(x != own_xl[0] for x in own_xl):
            groups: dict[str, list[Job]] = {}
            for job, x in zip(jobs, own_xl, strict=True):
                groups.setdefault(repr(None if x is None else sorted(x.items())), []).append(job)  # equal: one
            for group in groups.values():
                self.run_batch(group)
            return
        prompts: list[str] = []
        negatives: list[str] = []
        seeds: list[int] = []
        inits: list[Any] = []  # each row's job's init image and mask (img2img / inpainting jobs: batch_key)
        masks: list[Any] = []
        spans: list[tuple[int, int]] = []  # each job's rows
        for job in jobs:
            kw = job.generation.kwargs
            n, seed = int(kw["batch_size"]), int(kw["seed"])
            spans.append((len(seeds), len(seeds) + n))
            prompts += [kw["prompt"]] * n
            negatives += [kw["negative_prompt"]] * n
            seeds += [seed + r for r in range(n)]  # as the pipeline numbers one job's rows
            inits += [kw.get("init_image")] * n
            masks += [kw.get("mask")] * n
        kwargs = dict(g0.kwargs, prompt=prompts, negative_prompt=negatives, seed=seeds, batch_size=len(seeds))
        if g0.kwargs.get("init_image") is not None:
            one_per_call = not getattr(pipe, "per_row_init_images", False) or getattr(pipe, "instruct_pix2pix", False)
            if one_per_call:  # a model that takes one init image per call (a DiT, instruct-pix2pix)
                for job in jobs:
                    self.current = job
                    self.run_job(job)
                return
            kwargs["init_image"] = inits
            if g0.kwargs.get("mask") is not None:
                kwargs["mask"] = masks
        xl = own_xl[0]  # each job's own (equal: above)
        if xl is not None:
            kwargs["sdxl"] = xl
        first = [True]
        previewer = LatentPreviewer(m.preview_rgb(pipe))

        def callback(info: Any) -> bool:
            stop = any(j.cancel.is_set() or j.skip.is_set() for j in jobs)
            preview, preview_step = None, info.step
            due = not stop and (info.step % m.preview_every == 0 or info.step == info.steps)
            if due and not any(j.watched for j in jobs):
                for job, (a, _) in zip(jobs, spans, strict=True):  # decoded only if asked
                    job.keep_preview(info.denoised[a : a + 1].clone(), info.step, previewer.to_rgb)
            elif due:
                try:  # on a GPU the frame comes from an earlier step: the loop never waits for it
                    previewer.submit(info.denoised, info.step)
                    got = previewer.take(wait=info.step == info.steps)
                    if got is not None:
                        preview_step, preview = got
                except Exception:  # noqa: BLE001 - a preview is optional
                    preview = None
            for job, (a, _) in zip(jobs, spans, strict=True):
                if first[0]:
                    job.steps = info.steps  # img2img runs fewer steps than asked
                job.step = info.step
                if preview is not None:
                    try:
                        job.set_preview(png_bytes(Image.fromarray(preview[a])), preview_step)
                    except Exception:  # noqa: BLE001 - a preview is optional
                        pass
                if not stop:
                    job.changed()
            first[0] = False
            return not stop

        try:
            result = pipe(**kwargs, callback=callback, progress=False)
        except Cancelled as e:
            keep = []
            for job, (a, _) in zip(jobs, spans, strict=True):
                if job.cancel.is_set():
                    if e.preview is not None:
                        job.set_preview(png_bytes(Image.fromarray(e.preview[a])), job.step)
                    m.finish(job, CANCELLED, m.cancel_reason(job))
                elif job.skip.is_set():
                    job.skip.clear()
                    m.finish(job, DONE)  # as alone: a skipped last (only) iteration leaves no image
                else:
                    keep.append(job)
            m.requeue(keep)
            return
        except (SdengineError, ValueError, OSError, torch.OutOfMemoryError, MemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.warning("a batch of %d jobs failed; running them one by one", len(jobs))
            for job in jobs:
                job.step = 0
                self.current = job
                self.run_job(job)
            return
        notes = batch_notes(pipe, jobs, list(result.notes))
        for job, (a, b) in zip(jobs, spans, strict=True):
            job.notes.extend(n for n in notes[job.id] if n not in job.notes)
            failed = None
            masks = (getattr(result, "composite_masks", None) or [None] * len(result.images))[a:b]
            rows = zip(result.images[a:b], result.seeds[a:b], result.infotexts[a:b], masks, strict=True)
            for image, seed, text, mask in rows:
                image, text = job.generation.finished(image, mask), job.generation.labelled(text)
                ji = JobImage(image, int(seed), text)
                if job.save:
                    try:  # a full disk fails this job only
                        ji.name = m.save(image, int(seed), text)
                    except OSError as e:
                        failed = f"could not save the image: {e}"
                        break
                job.images.append(ji)
            if failed is not None:
                m.finish(job, FAILED, failed)
                continue
            job.step = job.steps
            m.finish(job, DONE)
