"""ComfyUI's HTTP routes and websocket on sdengine's server (each path plain and under ``/api``).

Prompts are jobs of the server's one queue (:class:`ComfyJob`), run by its workers, cancelled by its
cancel; the security middleware applies to every HTTP route here, and the websocket checks the same
rules itself (the middleware only sees HTTP). Events go to the websocket of the prompt's ``client_id``
(a prompt without one sends only progress, previews and execution_interrupted, to every socket, as ComfyUI),
in ComfyUI's JSON shapes; a prompt's events reach only the sockets of its own client (its key's user or address,
:func:`sdengine.server.jobs.may_see`) and the admin's, and /queue, /history and /interrupt show and touch only
the caller's prompts (the admin's: every client's), as the native and A1111 routes; previews are binary frames
in ComfyUI's framing: ``>I`` event 1 (PREVIEW_IMAGE), ``>I`` image type (2 = PNG), then the image bytes.
"""

from __future__ import annotations

import asyncio
import json
import math
import posixpath
import struct
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse, JSONResponse, Response
from PIL import Image

from sdengine.server.comfy.graph import Executor, Interrupted, NodeFailed, PromptInvalid, validate
from sdengine.server.comfy.nodes import IMAGE_SUFFIXES, NodeError, Outputs, RunContext, object_info, split_annotation
from sdengine.server.comfy.nodes_files import LATENT_SUFFIX, check_latent_file
from sdengine.server.comfy.registry import NODES
from sdengine.server.errors import BadRequest, Forbidden, NotFound, redact_paths, redact_tree, register_client_folder
from sdengine.server.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    QUEUED,
    RUNNING,
    Job,
    JobImage,
    may_see,
    owned,
    png_bytes,
    visible,
)
from sdengine.server.requests import Generation
from sdengine.server.security import REQUEST_CALLER, Caller

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
PNG_TYPE = 2
MAX_HISTORY = 200
SENSITIVE = ("auth_token_comfy_org", "api_key_comfy_org")  # ComfyUI's SENSITIVE_EXTRA_DATA_KEYS
MEDIA_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}

router = APIRouter(tags=["comfyui"])


# ------------------------------------------------------------------------------------------------ state


@dataclass
class ComfyState:
    """One per app: the executor's cache, the history, the prompt counter and the websockets."""

    folders: Outputs
    executor: Executor = field(default_factory=Executor)
    history: OrderedDict[str, dict[str, Any]] = field(default_factory=OrderedDict)
    owners: dict[str, str | None] = field(default_factory=dict)  # each history entry's client (Job.owner)
    number: int = 0
    # each socket's loop, queue and caller (whose prompts' events it may get)
    sockets: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any], Caller | None]] = field(
        default_factory=dict
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    run_lock: threading.Lock = field(default_factory=threading.Lock)  # one graph at a time (one cache)
    save_lock: threading.Lock = field(default_factory=threading.Lock)
    free_pending: bool | None = None  # a /free waiting for the running prompt (True: unload the models too)

    def send(self, event: str | int, data: Any, sid: Any, job: Job | None = None) -> None:
        """Queue a JSON event (or binary frame when ``event`` is an int) for ``sid``'s socket(s); thread-safe.
        An event of ``job`` reaches only the sockets of its client (and the admin's): :func:`may_see`."""
        msg = json.dumps({"type": event, "data": data}) if isinstance(event, str) else struct.pack(">I", event) + data
        with self.lock:  # as ComfyUI: no sid is every socket; a sid no socket has (5, a gone client) no one
            if sid is None:
                targets = list(self.sockets.values())
            else:
                targets = [self.sockets[sid]] if isinstance(sid, str) and sid in self.sockets else []
        if job is not None:  # a caller-less socket (None) is the server's own: every job
            targets = [t for t in targets if t[2] is None or may_see(job, t[2])]
        for loop, q, _ in targets:
            try:
                loop.call_soon_threadsafe(_put, q, msg)
            except RuntimeError:  # that socket's loop is closed
                pass


MAX_SOCKETS_PER_CLIENT = 64  # websockets one client (its key or address) may hold open at once
PREVIEW_BACKLOG = 8  # a socket this many messages behind gets no more preview frames until it catches up


def _put(q: asyncio.Queue[Any], msg: Any) -> None:
    """Queue ``msg`` for a socket; a client that stopped reading (its queue full) loses it (the full queue's
    error was once logged by the event loop for every message after, a stack trace each). A preview frame (binary:
    up to a full-size PNG each) is dropped while the socket is behind: a client that does not read once made the
    server hold every preview of every prompt for it (10000 frames of a megabyte each), and a newer preview
    replaces an older one anyway."""
    if isinstance(msg, bytes | bytearray) and q.qsize() >= PREVIEW_BACKLOG:
        return
    try:
        q.put_nowait(msg)
    except asyncio.QueueFull:
        pass


def state(app: FastAPI) -> ComfyState:
    st = getattr(app.state, "comfy", None)
    if st is None:
        out = Path(app.state.services.config.outputs_dir)
        extra = app.state.services.config.extra
        st = ComfyState(Outputs(out, Path(str(extra.get("comfy_input_dir", out / "input"))), out / "temp"))
        for folder in (st.folders.output, st.folders.input, st.folders.temp):
            register_client_folder(folder)  # an error names a file by its name in the folder (/view's)
        app.state.comfy = st
    return st


class Env:
    """What validation and /object_info read: the catalog and the folders."""

    def __init__(self, services: Any, st: ComfyState) -> None:
        self.catalog = services.catalog
        self.folders = st.folders
        config = services.config  # the limits some inputs' max follow (nodes.Input.limit)
        self.limits = {"side": config.max_side, "steps": config.max_steps, "batch": config.max_batch}


# ------------------------------------------------------------------------------------------------ jobs


class ComfyJob(Job):
    """A prompt in the server's queue; a worker calls :meth:`run_on` instead of its pipeline call."""

    def __init__(
        self,
        *,
        services: Any,
        st: ComfyState,
        graph: dict[str, Any],
        outputs: list[str],
        prompt: dict[str, Any],
        prompt_id: str,
        number: int | float,
        client_id: Any,
        extra_data: dict[str, Any],
        seed_rule: str,
        job_id: str | None = None,
    ) -> None:
        # the job's step estimate: the literal steps (a linked one, a PrimitiveInt's, is known only when it runs)
        steps = sum(v for n in graph.values() if isinstance(v := n["inputs"].get("steps"), int)) or 1
        generation = Generation(
            model=services.config.model,
            model_name=str(services.options.get("sd_model_checkpoint")),
            kwargs={"steps": steps, "batch_size": 1, "seed": 0},
        )
        # the job table's id: the prompt_id, or one of its own where the client queued its prompt_id again (ComfyUI
        # queues both; the events, /queue and /history name the prompt_id)
        super().__init__(generation, protocol="comfyui", save=True, id=job_id or prompt_id)
        self.prompt_id = prompt_id
        self.services = services
        self.st = st
        self.graph = graph
        self.outputs = outputs
        self.prompt = prompt
        self.number = number
        self.client_id = client_id
        self.extra_data = extra_data
        self.seed_rule = seed_rule
        self.messages: list[list[Any]] = []
        self.node: str | None = None  # the node running now (told again to a websocket that reconnects)

    def queue_item(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    def event(self, name: str, data: dict[str, Any]) -> None:
        data = {**data, "prompt_id": self.prompt_id}
        if name == "executing":
            self.node = data.get("node")
        if name in (
            "execution_start",
            "execution_cached",
            "execution_success",
            "execution_error",
            "execution_interrupted",
        ):
            data["timestamp"] = int(time.time() * 1000)
            self.messages.append([name, data])
        # ComfyUI (execution.py): a prompt without a client id sends none of its events (they are kept in the
        # history's messages) but execution_interrupted, which goes to every socket; progress and previews are
        # sent to its client id (every socket when none). A client id that is not a socket's (5) reaches no one.
        if self.client_id is not None or name == "execution_interrupted":
            self.st.send(name, data, self.client_id, self)

    def run_on(self, worker: Any) -> None:
        m = worker.manager
        self.device = worker.device
        st, services = self.st, self.services
        preview_every = m.preview_every

        def progress(step: int, steps: int, denoised: Any, rgb_map: Any = None) -> bool:
            self.step, self.steps = step, steps
            node = ctx.current_node
            data = {"value": step, "max": steps, "prompt_id": self.prompt_id, "node": node}
            self.st.send("progress", data, self.client_id, self)
            if step % preview_every == 0 or step == steps:
                try:
                    from sdengine import vae_utils

                    # the model's tiny VAE or latent map; a DiT sampler (nodes_sd3_flux) names its model's map, its
                    # model being parts the worker's pipeline is not
                    to_rgb = vae_utils.latent_rgb_for(rgb_map) if rgb_map is not None else m.preview_rgb(worker.pipe)
                    rgb = to_rgb(denoised[:1]).cpu().numpy() if to_rgb else vae_utils.latent_preview(denoised[:1])
                    png = png_bytes(Image.fromarray(rgb[0]))
                    self.preview_png, self.preview_step = png, step
                    st.send(PREVIEW_IMAGE, struct.pack(">I", PNG_TYPE) + png, self.client_id, self)
                except Exception:  # noqa: BLE001 - a preview is optional
                    pass
            self.changed()
            return not self.cancel.is_set()

        def send_image(png: bytes, index: int, count: int) -> None:  # ComfyUI's ProgressBar with an image
            data = {"value": index, "max": count, "prompt_id": self.prompt_id, "node": ctx.current_node}
            st.send("progress", data, self.client_id, self)
            st.send(PREVIEW_IMAGE, struct.pack(">I", PNG_TYPE) + png, self.client_id, self)

        ctx = RunContext(
            pipeline=worker.pipeline,
            catalog=services.catalog,
            folders=st.folders,
            seed_rule=self.seed_rule,
            progress=progress,
            prompt=self.prompt,
            extra_pnginfo=dict(self.extra_data.get("extra_pnginfo") or {}),
            max_pixels=services.config.max_image_pixels,
            save_lock=st.save_lock,
            max_steps=services.config.max_steps,
            max_side=services.config.max_side,
            max_batch=services.config.max_batch,
            device=str(worker.device),
            send_image=send_image,
        )
        self.event("execution_start", {})
        status, outputs = "success", {}
        with st.run_lock:
            try:
                outputs = st.executor.run(self.graph, ctx, cancelled=self.cancel.is_set, event=self.event)
            except Exception as e:  # noqa: BLE001 - every failure ends the prompt with its events
                if not isinstance(e, Interrupted | NodeFailed):
                    nid = str(ctx.current_node)
                    e = NodeFailed(nid, str(self.graph.get(nid, {}).get("class_type")), e)
                status = self._failed(e)
                outputs = e.outputs  # as ComfyUI: the images of the output nodes that ran before it stay listed
        for node_out in outputs.values():
            for im in node_out.get("images", []):
                if im["type"] == "output" and not im["subfolder"]:
                    self.images.append(JobImage(Image.new("RGB", (1, 1)), 0, "", im["filename"]))
        self.record(status, outputs)
        if status == "success":
            self.event("execution_success", {})
            m.finish(self, DONE)
        self.node = None
        send_status(st, services)  # ComfyUI's order: the queue's status (task_done), then "executing" None
        if self.client_id is not None:
            done = {"node": None, "display_node": None, "prompt_id": self.prompt_id}
            self.st.send("executing", done, self.client_id, self)
        with st.run_lock:  # a /free sent while the prompt ran
            apply_free(st, services, worker)

    def _failed(self, e: Interrupted | NodeFailed) -> str:
        m = self.services.manager
        if isinstance(e, Interrupted):
            self.event(
                "execution_interrupted", {"node_id": e.node_id, "node_type": e.class_type, "executed": e.executed}
            )
            m.finish(self, CANCELLED, f"interrupted at node {e.node_id} ({e.class_type})")
            return "error"  # ComfyUI's history knows two: success and error (the messages say it was interrupted)
        self.event(
            "execution_error",
            {
                "node_id": e.node_id,
                "node_type": e.class_type,
                "executed": e.executed,
                "exception_message": redact_paths(str(e.exc)),
                "exception_type": type(e.exc).__name__,
                "traceback": [redact_paths(t) for t in traceback.format_exception_only(type(e.exc), e.exc)],
                "current_inputs": redact_tree(e.inputs),
                "current_outputs": e.cached,
            },
        )
        m.finish(self, FAILED, str(e))
        return "error"

    def record(self, status: str, outputs: dict[str, Any]) -> None:
        st = self.st
        with st.lock:
            # ComfyUI: a prompt_id run again overwrites its entry (which keeps its place in the history's order)
            st.owners[self.prompt_id] = self.owner
            st.history[self.prompt_id] = {
                "prompt": self.queue_item(),
                "outputs": outputs,
                "status": {"status_str": status, "completed": status == "success", "messages": self.messages},
                "meta": {
                    nid: {"node_id": nid, "display_node": nid, "parent_node": None, "real_node_id": nid}
                    for nid in outputs
                },
            }
            while len(st.history) > MAX_HISTORY:
                st.owners.pop(st.history.popitem(last=False)[0], None)


def comfy_jobs(services: Any) -> list[ComfyJob]:
    """Every client's prompts (for counts); the routes that show or touch prompts use :func:`my_prompts`."""
    return [j for j in services.manager.jobs() if isinstance(j, ComfyJob)]


def my_prompts(services: Any) -> list[ComfyJob]:
    """The request's client's prompts (the admin's: every client's)."""
    return [j for j in comfy_jobs(services) if may_see(j)]


def my_history(st: ComfyState) -> list[tuple[str, dict[str, Any]]]:
    """The history entries of the request's client's prompts (the admin's: all), oldest first (lock held)."""
    return [(k, v) for k, v in st.history.items() if owned(st.owners.get(k))]


def queue_remaining(services: Any) -> int:
    return sum(1 for j in comfy_jobs(services) if j.state in (QUEUED, RUNNING))


def send_status(st: ComfyState, services: Any, sid: str | None = None) -> None:
    data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": queue_remaining(services)}}}
    if sid is not None:
        data["sid"] = sid
    st.send("status", data, sid)


# ------------------------------------------------------------------------------------------------ routes


def _both(path: str) -> list[str]:
    return [path, "/api" + path]


def _route(method: str, path: str, **kw: Any) -> Any:
    def deco(fn: Any) -> Any:
        for p in _both(path):
            router.add_api_route(p, fn, methods=[method], include_in_schema=p == path, **kw)
        return fn

    return deco


class _NotJsonNumber(ValueError):
    pass


def _no_constant(name: str) -> Any:
    """Python's JSON reader takes NaN, Infinity and -Infinity, which JSON has not: a prompt holding one could
    never be answered back (/queue, /history and the 400 naming it once failed to render, a 500)."""
    raise _NotJsonNumber(name)


async def _json_body(request: Request) -> Any:
    raw = await request.body()  # ComfyUI's clients post JSON without a JSON content type
    try:
        body = json.loads(raw or b"{}", parse_constant=_no_constant)
    except _NotJsonNumber as e:
        raise BadRequest(f"the body holds {e}, which is no JSON number: send a number or text") from None
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be JSON") from None
    except RecursionError:  # [[[[...]]]] thousands deep
        raise BadRequest("the body's JSON is nested too deeply") from None
    try:  # a JSON escape of a lone surrogate (\ud800) decodes to a string that is not text: it could never be
        json.dumps(body, ensure_ascii=False).encode("utf-8")  # stored in the history or sent back
    except UnicodeEncodeError:
        raise BadRequest("the body holds a lone surrogate escape (such as \\ud800), which is not text") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    return body


@_route("POST", "/prompt")
async def post_prompt(request: Request) -> Any:
    """Queue an API-format workflow: ``{prompt, client_id, extra_data}`` -> ``{prompt_id, number, node_errors}``,
    or 400 ``{error, node_errors}`` naming the node and input that is wrong."""
    services = request.app.state.services
    st = state(request.app)
    body = await _json_body(request)
    if not isinstance(body, dict) or "prompt" not in body:
        return JSONResponse(
            {
                "error": {"type": "no_prompt", "message": "No prompt provided", "details": "", "extra_info": {}},
                "node_errors": {},
            },
            status_code=400,
        )
    prompt = body["prompt"]
    targets = body.get("partial_execution_targets")
    if targets is not None and (not isinstance(targets, list) or not all(isinstance(t, str) for t in targets)):
        raise BadRequest("partial_execution_targets must be a list of node ids")
    try:
        graph, outputs, node_errors = await asyncio.to_thread(validate, prompt, Env(services, st), targets)
    except PromptInvalid as e:
        return JSONResponse(redact_tree(e.body), status_code=400)
    raw_extra = body.get("extra_data")
    # ComfyUI keeps the client id in extra_data (where its executor reads it: a client id sent there alone is
    # the prompt's too) and never lists its sensitive keys (API keys of its partner nodes) in /queue or /history
    extra: dict[str, Any] = (
        {k: v for k, v in raw_extra.items() if k not in SENSITIVE} if isinstance(raw_extra, dict) else {}
    )
    if not isinstance(extra.get("extra_pnginfo") or {}, dict):  # SaveImage writes each key as a PNG text: a
        # value of another kind once passed and failed the job outside its nodes (no history, no executing None)
        raise BadRequest("extra_data.extra_pnginfo must be an object {key: value} (SaveImage's PNG texts)")
    options = extra.get("sdengine")
    seed_rule = str(options.get("seed_rule", "comfyui")) if isinstance(options, dict) else "comfyui"
    if seed_rule not in ("comfyui", "sdengine"):
        raise BadRequest(f"extra_data.sdengine.seed_rule must be 'comfyui' or 'sdengine', got {seed_rule!r}")
    given = _priority_number(body.get("number")) if "number" in body else None
    raw_id = body.get("prompt_id")
    if "client_id" in body:  # ComfyUI keeps any value (its executor: a null is no client id, 5 nobody's socket)
        extra["client_id"] = body["client_id"]
    client_id = extra.get("client_id")
    if raw_id is None:
        prompt_id = str(uuid.uuid4())
    elif isinstance(raw_id, str | int) and not isinstance(raw_id, bool):  # ComfyUI: str(prompt_id)
        prompt_id = str(raw_id)
    else:
        raise BadRequest("prompt_id must be a string")
    if not 0 < len(prompt_id) <= 100:
        raise BadRequest("prompt_id must be 1 to 100 characters")
    job_id = _job_id_for(services, st, prompt_id)
    number: int | float
    front = False
    if given is not None:  # ComfyUI: a given number is the priority as it is (a float); the counter stays
        number = given
    else:
        with st.lock:
            number = st.number
            st.number += 1
        front = bool(body.get("front"))
        if front:  # ComfyUI's rule: the counter negated, below every number given so far
            number = -number
    for attempt in range(2):
        job = ComfyJob(
            services=services,
            st=st,
            graph=graph,
            outputs=outputs,
            prompt=prompt,
            prompt_id=prompt_id,
            number=number,
            client_id=client_id,
            extra_data=extra,
            seed_rule=seed_rule,
            job_id=job_id,
        )
        try:
            services.manager.submit(job, place=lambda queued: _place(queued, number, front))
            break
        except BadRequest:  # the job table's "job id ... is taken": another request queued this id meanwhile
            if attempt or job_id != prompt_id:
                raise
            job_id = _job_id_for(services, st, prompt_id)  # judged again: the caller's own gets an id of its own
    send_status(st, services)
    return {"prompt_id": prompt_id, "number": number, "node_errors": node_errors}


def _job_id_for(services: Any, st: ComfyState, prompt_id: str) -> str:
    """The job-table id of a new prompt of ``prompt_id``. ComfyUI queues a prompt_id it already has (queued, running
    or in the history) as a prompt of its own, the later run overwriting the history entry: so here for the caller's
    own prompts, the second one getting a job id of its own (the table is keyed by id). An id another client's
    prompt or history entry has, or any job of the other APIs, is refused, with one answer whoever's it is
    (docs/server.md "Who may see and cancel a job": a client never sees nor overwrites another's entries)."""
    caller = REQUEST_CALLER.get()
    me = caller.client if caller is not None else None
    with st.lock:
        theirs = prompt_id in st.history and st.owners.get(prompt_id) != me
    for j in services.manager.jobs():
        named = j.prompt_id == prompt_id if isinstance(j, ComfyJob) else False
        if (named or j.id == prompt_id) and (not isinstance(j, ComfyJob) or j.owner != me):
            theirs = True
    if theirs:
        raise BadRequest(f"prompt_id {prompt_id!r} is taken (another client's prompt, or a job of another API, has it)")
    return prompt_id if not services.manager.has_id(prompt_id) else f"{prompt_id}#{uuid.uuid4().hex[:12]}"


def _priority_number(value: Any) -> float:
    """``number`` of a POST /prompt: a finite number (or its text), as ComfyUI's ``float(number)``."""
    try:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ValueError
        number = float(value)
    except (ValueError, OverflowError):
        raise BadRequest(f"number must be a number (the prompt's priority), got {str(value)[:50]!r}") from None
    if not math.isfinite(number):
        raise BadRequest(f"number must be a finite number, got {number}")
    return number


def _place(queued: list[Job], number: int | float, front: bool) -> int:
    """Where a ComfyUI prompt goes in the server's shared queue: with ``front``, at its head (it runs next);
    else just before the first queued ComfyUI prompt with a higher number (ComfyUI's queue is ordered by
    number), at the end when there is none. Jobs of the other protocols keep their order: FIFO."""
    if front:
        return 0
    for i, j in enumerate(queued):
        if isinstance(j, ComfyJob) and j.number > number:
            return i
    return len(queued)


@_route("GET", "/prompt")
def get_prompt_status(request: Request) -> Any:
    return {"exec_info": {"queue_remaining": queue_remaining(request.app.state.services)}}


@_route("GET", "/queue")
def get_queue(request: Request) -> Any:
    services = request.app.state.services
    return {
        "queue_running": [j.queue_item() for j in my_prompts(services) if j.state == RUNNING],
        # in the order they will run (ComfyUI lists its heap; its page sorts by number: the same order here); the
        # caller's prompts only: another client's graph (its prompts, its images' names) is not this one's to read
        "queue_pending": [j.queue_item() for j in visible(services.manager.queued()) if isinstance(j, ComfyJob)],
    }


@_route("POST", "/queue")
async def post_queue(request: Request) -> Any:
    """``{"clear": true}`` removes every pending prompt; ``{"delete": [prompt_id, ...]}`` those named."""
    services = request.app.state.services
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("send {clear: true} or {delete: [prompt ids]}")
    pending = [j for j in my_prompts(services) if j.state == QUEUED]  # the caller's (the admin's: every client's)
    if body.get("clear"):
        for j in pending:
            services.manager.cancel(j)
    delete = body.get("delete")
    if delete is not None:
        if not isinstance(delete, list) or not all(isinstance(d, str) for d in delete):
            raise BadRequest("delete must be a list of prompt ids")
        for j in pending:
            if j.prompt_id in delete:
                services.manager.cancel(j)
    send_status(state(request.app), services)
    return {}


@_route("POST", "/interrupt")
async def interrupt(request: Request) -> Any:
    """Stop the running prompt (``{"prompt_id": ...}``: only that one) within one sampler step. As ComfyUI: a
    body that is not JSON (or empty, or no object) and an empty ``prompt_id`` are a global interrupt."""
    services = request.app.state.services
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError, RecursionError):  # ComfyUI: json_data = {} on a JSONDecodeError
        body = {}
    pid = body.get("prompt_id") if isinstance(body, dict) else None
    for j in my_prompts(services):  # a global interrupt stops the caller's running prompts, never another's
        if j.state == RUNNING and (not pid or j.prompt_id == str(pid)):
            services.manager.cancel(j)
    return {}


@_route("GET", "/history")
def get_history(request: Request, max_items: int | None = None, offset: int = -1) -> Any:
    """ComfyUI's paging: from the ``offset``-th oldest entry (without one, the last ``max_items``), at most
    ``max_items`` entries."""
    st = state(request.app)
    with st.lock:
        items = my_history(st)
    if offset < 0 and max_items is not None:
        offset = len(items) - max_items
    out: dict[str, Any] = {}
    for k, v in items[max(offset, 0) :]:
        out[k] = v
        if max_items is not None and len(out) >= max_items:
            break
    return out


@_route("GET", "/history/{prompt_id}")
def get_history_one(request: Request, prompt_id: str) -> Any:
    st = state(request.app)
    with st.lock:
        item = dict(my_history(st)).get(prompt_id)
    return {prompt_id: item} if item is not None else {}


@_route("POST", "/history")
async def post_history(request: Request) -> Any:
    st = state(request.app)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest("send {clear: true} or {delete: [prompt ids]}")
    delete = body.get("delete")
    if delete is not None and (not isinstance(delete, list) or not all(isinstance(d, str) for d in delete)):
        raise BadRequest("delete must be a list of prompt ids")
    with st.lock:
        mine = {k for k, _ in my_history(st)}  # another client's entries are not the caller's to clear
        for pid in (mine if body.get("clear") else set()) | (set(delete or []) & mine):
            st.history.pop(pid, None)
            st.owners.pop(pid, None)
    return {}


@_route("GET", "/view")
def view(
    request: Request,
    filename: str,
    subfolder: str = "",
    type: str = "output",  # noqa: A002
    channel: str | None = None,
    preview: str | None = None,
) -> Any:
    """A file of the output, input or temp folder: realpath-contained, image types only, nosniff. As ComfyUI:
    ``channel`` ``rgb`` (a PNG without the alpha), ``a`` (a PNG whose alpha is the image's, black; what its mask
    editor reads), ``rgba`` (the file); ``preview=webp;90`` or ``jpeg;80`` a re-encoded copy (format, quality)."""
    from sdengine.io.paths import UnsafePathError, resolve_inside

    st = state(request.app)
    plain, kind = split_annotation(filename)
    if plain != filename:  # ComfyUI: "name.png [temp]" names the folder itself
        filename, type = plain, kind
    if type not in ("output", "input", "temp"):
        raise BadRequest("type must be output, input or temp")
    # as ComfyUI: a name starting with "/" or holding ".." is refused; then only its last part is the file's name
    # (the folder is `subfolder`'s: "sub/x.png" is x.png of the folder itself, as ComfyUI's os.path.basename)
    if not filename or filename.startswith("/") or ".." in filename:
        raise BadRequest(f"{filename!r}: not a file name of the {type} folder")
    filename = filename.rpartition("/")[2]
    suffix = Path(filename).suffix.lower()
    if not filename or filename.startswith("."):
        raise BadRequest(f"{filename!r}: not a file name of the {type} folder")
    if suffix not in IMAGE_SUFFIXES and suffix != LATENT_SUFFIX:
        raise BadRequest(f"{filename!r}: only PNG, JPEG, WebP and .latent files are served")
    if _leaves(subfolder):  # as ComfyUI: a subfolder outside the folder ("../..", "/etc") is a 403
        raise Forbidden(f"subfolder {subfolder[:200]!r} is outside the {type} folder")
    name = f"{subfolder.strip('/')}/{filename}" if subfolder else filename
    try:  # the messages name the request's file, never the server's folders
        path = resolve_inside(st.folders.root(type), name, "file")
    except UnsafePathError:
        raise BadRequest(f"{name!r} is outside the {type} folder") from None
    except FileNotFoundError:
        raise NotFound(f"{name!r} is not a file") from None
    if not path.is_file():
        raise NotFound(f"{name!r} is not a file")
    if channel not in (None, "rgba", "rgb", "a"):
        raise BadRequest(f"channel must be rgba, rgb or a, got {channel[:20]!r}")
    if suffix == LATENT_SUFFIX:  # SaveLatent's file: data, not an image (ComfyUI serves it as octet-stream)
        if preview is not None or channel not in (None, "rgba"):
            raise BadRequest(f"{name!r} is a latent, not an image: no preview or channel of it")
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=filename,  # Starlette quotes (or percent-encodes) the name in Content-Disposition
            content_disposition_type="attachment",
            headers={"X-Content-Type-Options": "nosniff"},
        )
    if preview is not None or channel in ("rgb", "a"):
        body, media = _view_converted(path, name, channel, preview, request.app.state.services.config.max_image_pixels)
        return Response(
            body, media_type=media, headers={"X-Content-Type-Options": "nosniff", "Content-Disposition": "inline"}
        )
    return FileResponse(
        path,
        media_type=MEDIA_TYPES[suffix],
        headers={"X-Content-Type-Options": "nosniff", "Content-Disposition": "inline"},
    )


def _view_converted(
    path: Path, name: str, channel: str | None, preview: str | None, max_pixels: int
) -> tuple[bytes, str]:
    """/view's conversions, as ComfyUI's: a ``preview`` (``format;quality``: webp or jpeg, another format or a
    channel with ``a`` gives webp; quality 90 unless the last part is a number; jpeg and ``channel=rgb`` drop the
    alpha), else ``channel=rgb`` (PNG, alpha dropped) or ``a`` (PNG: black, with the image's alpha; opaque
    when it has none)."""
    import io

    from sdengine.server.security import decode_image

    img = decode_image(path.read_bytes(), repr(name), max_pixels)
    buf = io.BytesIO()
    if preview is not None:
        parts = preview.split(";")
        fmt = parts[0] if parts[0] in ("webp", "jpeg") and "a" not in (channel or "") else "webp"
        quality = int(parts[-1]) if parts[-1].isdigit() else 90
        if not 0 <= quality <= 100:
            raise BadRequest(f"the preview's quality must be 0 to 100, got {quality}")
        has_alpha = "A" in img.getbands() or "transparency" in img.info
        img = img.convert("RGB") if fmt == "jpeg" or channel == "rgb" or not has_alpha else img.convert("RGBA")
        img.save(buf, format=fmt.upper(), quality=quality)
        return buf.getvalue(), f"image/{fmt}"
    if channel == "rgb":
        img.convert("RGB").save(buf, format="PNG")
    else:
        alpha = img.convert("RGBA").getchannel("A")
        out = Image.new("RGBA", img.size, (0, 0, 0, 0))
        out.putalpha(alpha)
        out.save(buf, format="PNG")
    return buf.getvalue(), "image/png"


@_route("POST", "/upload/image")
async def upload_image(request: Request) -> Any:
    """Multipart ``image`` (+ ``subfolder``, ``type`` input|temp|output, ``overwrite``) into that folder;
    the pixel limit is checked from the header before decoding."""
    return await _upload(request, mask=False)


@_route("POST", "/upload/mask")
async def upload_mask(request: Request) -> Any:
    """ComfyUI's mask upload (its mask editor): ``image`` is a mask in its alpha, ``original_ref`` (JSON
    ``{filename, subfolder, type}``, type ``output`` by default) the image it masks; stored as that image with
    the mask's alpha (a PNG, the original's text kept), as /upload/image stores a file. LoadImage of it gives
    the image and MASK = 1 - alpha."""
    return await _upload(request, mask=True)


def _leaves(*parts: str) -> bool:
    """ComfyUI's containment test (its ``os.path.commonpath`` of the folder and the joined path): ``parts`` joined
    onto the folder, ``..`` folded, leave it; an absolute part leaves too (the join drops the folder)."""
    joined = posixpath.normpath(posixpath.join(".", *(p for p in parts if p)))
    return joined.startswith("/") or joined == ".." or joined.startswith("../")


def _masked_original(st: ComfyState, ref_text: Any, mask_data: bytes, max_pixels: int) -> bytes:
    """The PNG of ``original_ref``'s image with the alpha of the mask image ``mask_data``."""
    import io

    from PIL.PngImagePlugin import PngInfo

    from sdengine.io.paths import UnsafePathError, resolve_inside
    from sdengine.server.security import decode_image

    try:
        ref = json.loads(str(ref_text))
    except ValueError:
        ref = None
    if not isinstance(ref, dict) or not isinstance(ref.get("filename"), str):
        raise BadRequest("original_ref must be JSON {filename, subfolder, type} naming the masked image")
    name, kind = split_annotation(ref["filename"])
    if name == ref["filename"]:
        kind = str(ref.get("type") or "output")
    if kind not in ("output", "input", "temp"):
        raise BadRequest("original_ref.type must be output, input or temp")
    if not name or name.startswith("/") or ".." in name:  # as ComfyUI's /upload/mask: 400
        raise BadRequest(f"original_ref {name!r}: not a file name of the {kind} folder")
    sub = str(ref.get("subfolder") or "")
    if _leaves(sub):  # as ComfyUI: a subfolder outside the folder is a 403
        raise Forbidden(f"original_ref subfolder {sub!r} is outside the {kind} folder")
    sub = sub.strip("/")
    shown = f"{sub}/{name}" if sub else name
    try:
        path = resolve_inside(st.folders.root(kind), shown, "original_ref")
    except UnsafePathError:
        raise BadRequest(f"original_ref {shown!r} is outside the {kind} folder") from None
    except FileNotFoundError:
        raise NotFound(f"original_ref {shown!r} is not a file of the {kind} folder") from None
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise BadRequest(f"original_ref {shown!r}: only PNG, JPEG and WebP images are masked")
    original = decode_image(path.read_bytes(), f"original_ref {shown!r}", max_pixels)
    mask = decode_image(mask_data, "image", max_pixels)
    if mask.size != original.size:
        raise BadRequest(f"the mask is {mask.size[0]}x{mask.size[1]}, the image {original.size[0]}x{original.size[1]}")
    info = PngInfo()
    for k, v in getattr(original, "text", {}).items():
        info.add_text(k, v)
    out = original.convert("RGBA")
    out.putalpha(mask.convert("RGBA").getchannel("A"))
    buf = io.BytesIO()
    out.save(buf, format="PNG", pnginfo=info, compress_level=4)
    return buf.getvalue()


async def _upload(request: Request, *, mask: bool) -> Any:
    from sdengine.io.paths import check_name
    from sdengine.server.security import decode_image

    services = request.app.state.services
    st = state(request.app)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest("send multipart/form-data with the file in the field 'image'")
    form = await request.form(max_files=1, max_fields=8)
    part = form.get("image")
    if part is None or isinstance(part, str):
        raise BadRequest("send the image in the multipart file field 'image'")
    data = await part.read()
    limit = services.config.max_image_pixels
    # a .latent file (LoadLatent's; ComfyUI's upload takes any file): checked as LoadLatent checks it
    latent = not mask and str(part.filename or "").endswith(LATENT_SUFFIX)
    if latent:
        await asyncio.to_thread(_check_latent_upload, data, str(part.filename), services.config)
    else:
        await asyncio.to_thread(decode_image, data, "image", limit)
    if mask:
        if not str(part.filename or "mask.png").lower().endswith(".png"):
            raise BadRequest("a masked image is stored as a PNG: give the file a .png name")
        data = await asyncio.to_thread(_masked_original, st, form.get("original_ref"), data, limit)
    kind = str(form.get("type") or "input")
    if kind not in ("input", "temp", "output"):  # ComfyUI's three folders
        raise BadRequest("type must be input, temp or output")
    raw_sub, raw_name = str(form.get("subfolder") or ""), str(part.filename or "image.png")
    # as ComfyUI: a name or subfolder that leads out of the folder ("../x.png", "/etc/x.png", subfolder "/etc") is
    # a 400, never stored under another name; a name's own folders inside it are dropped ("a/x.png" is x.png)
    if _leaves(raw_sub, raw_name) or _leaves(raw_name):
        raise BadRequest(f"{raw_name[:200]!r} in subfolder {raw_sub[:200]!r} leaves the {kind} folder")
    subfolder = raw_sub.strip("/")
    overwrite = str(form.get("overwrite") or "").lower() in ("true", "1")
    filename = Path(raw_name).name
    try:
        check_name(filename, "filename")
        if subfolder:
            check_name(subfolder, "subfolder")
    except ValueError as e:
        raise BadRequest(str(e)) from None
    if (Path(filename).suffix.lower() not in IMAGE_SUFFIXES and not latent) or filename.startswith("."):
        raise BadRequest(f"{filename!r}: only .png, .jpg, .jpeg, .webp (and .latent) names are stored")
    name = await asyncio.to_thread(_store_upload, st, kind, subfolder, filename, data, overwrite)
    return {"name": name, "subfolder": subfolder, "type": kind}


def _check_latent_upload(data: bytes, filename: str, config: Any) -> None:
    """A 400 for an uploaded .latent file that LoadLatent would refuse (checked in a private temporary file)."""
    import os
    import tempfile

    fd, tmp = tempfile.mkstemp(suffix=LATENT_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        check_latent_file(Path(tmp), Path(filename).name, config.max_batch, config.max_side)
    except NodeError as e:
        raise BadRequest(str(e)) from None
    finally:
        os.unlink(tmp)


def _store_upload(st: ComfyState, kind: str, subfolder: str, filename: str, data: bytes, overwrite: bool) -> str:
    """Write an upload into the ``kind`` folder (off the event loop: the disk, and the save lock a running
    SaveImage holds, must not stall the server); a name taken by another image gets `` (1)``, `` (2)``, ...
    before its suffix, one taken by the same image is answered as it is (no copy), as ComfyUI. Returns the
    stored name."""
    from sdengine.io.paths import is_inside

    root = st.folders.make_root(kind)
    folder = root / subfolder
    if not is_inside(root, folder):
        raise BadRequest(f"subfolder {subfolder!r} leaves the {kind} folder")
    folder.mkdir(parents=True, exist_ok=True)
    with st.save_lock:
        target = folder / filename
        k = 1
        duplicate = False
        while target.exists() and not overwrite:
            if _same_file(target, data):  # ComfyUI: the same image under that name is not stored again
                duplicate = True
                break
            target = folder / f"{Path(filename).stem} ({k}){Path(filename).suffix}"
            k += 1
        if not is_inside(root, target.parent) or target.is_symlink():
            raise BadRequest(f"{filename!r} resolves outside the {kind} folder")
        if not duplicate:
            target.write_bytes(data)
    return target.name


def _same_file(path: Path, data: bytes) -> bool:
    """Whether ``path`` is a plain file holding exactly ``data``."""
    try:
        return (
            path.is_file() and not path.is_symlink() and path.stat().st_size == len(data) and path.read_bytes() == data
        )
    except OSError:
        return False


@_route("GET", "/object_info")
def get_object_info(request: Request) -> Any:
    env = Env(request.app.state.services, state(request.app))
    return {name: object_info(node, env) for name, node in NODES.items()}


@_route("GET", "/object_info/{node_class}")
def get_object_info_one(request: Request, node_class: str) -> Any:
    if node_class not in NODES:
        return {}
    env = Env(request.app.state.services, state(request.app))
    return {node_class: object_info(NODES[node_class], env)}


@_route("GET", "/system_stats")
def system_stats(request: Request) -> Any:
    import os
    import sys

    import psutil  # type: ignore[import-untyped]
    import torch

    from sdengine import __version__

    devices = []
    for w in request.app.state.services.manager.workers:
        dev = torch.device(w.device)
        entry: dict[str, Any] = {"name": str(dev), "type": dev.type, "index": dev.index}
        if dev.type == "cuda":
            free, total = torch.cuda.mem_get_info(dev)
            entry.update(
                vram_total=total,
                vram_free=free,
                torch_vram_total=torch.cuda.memory_reserved(dev),
                torch_vram_free=torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev),
            )
        else:
            vm = psutil.virtual_memory()
            entry.update(vram_total=vm.total, vram_free=vm.available, torch_vram_total=0, torch_vram_free=0)
        devices.append(entry)
    vm = psutil.virtual_memory()
    return {
        "system": {
            "os": os.name,  # ComfyUI's: "posix", "nt"
            "ram_total": vm.total,
            "ram_free": vm.available,
            "comfyui_version": f"sdengine-{__version__}",
            "python_version": sys.version,
            "pytorch_version": torch.__version__,
            "embedded_python": False,
            "argv": [],
        },
        "devices": devices,
    }


@_route("POST", "/free")
async def free(request: Request) -> Any:
    """``{"unload_models": true}`` unloads idle workers' models; ``{"free_memory": true}`` drops the cache and,
    as in ComfyUI (``flags.get("unload_models", free_memory)``), unloads the models too unless
    ``unload_models`` is given false."""
    services = request.app.state.services
    st = state(request.app)
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise BadRequest('send {"free_memory": true} or {"unload_models": true}')
    free_memory = bool(body.get("free_memory", False))
    unload = bool(body.get("unload_models", free_memory))
    if not (free_memory or unload):
        return {}
    # As ComfyUI (flags its worker reads after the prompt): a running prompt holds the cache, and frees the
    # memory once it ends; the request never waits for it (it once waited on the lock inside the event loop,
    # which froze every request and websocket of the server until the prompt ended).
    with st.lock:
        st.free_pending = unload or bool(st.free_pending)
    if st.run_lock.acquire(blocking=False):  # no prompt runs: now
        try:
            apply_free(st, services)
        finally:
            st.run_lock.release()
    return {}


def apply_free(st: ComfyState, services: Any, own: Any = None) -> None:
    """Apply a pending /free: drop the node cache and (when asked) unload the models of the idle workers and of
    ``own`` (the worker whose prompt just ended); the caller holds ``st.run_lock``."""
    with st.lock:
        pending, st.free_pending = st.free_pending, None
    if pending is None:
        return
    st.executor.clear()
    from sdengine.server.comfy.nodes_merge import forget_merges

    forget_merges()  # the merge nodes' kept weights go with the node cache
    if pending:
        from sdengine.server.comfy.nodes_clip_vision import forget_clip_visions

        forget_clip_visions()  # CLIPVisionLoader's kept encoders are models too (a later encode reloads its file)
        from sdengine.server.comfy.nodes_redux import forget_style_models

        forget_style_models()  # StyleModelLoader's kept Redux encoders: the same
        from sdengine.server.comfy.nodes_ipadapter import forget_ipadapters

        forget_ipadapters()  # IPAdapterModelLoader's kept adapters: the same
        from sdengine.pipeline.ip_adapter import forget_loaded

        forget_loaded()  # and the adapter / encoder files the native and OpenAI jobs' units kept (an encoder is large)
        for w in services.manager.workers:
            if w.current is None or w is own:
                w.pipe, w.model = None, None
                w.refiner_pipe, w.refiner_model = None, None
                w.hr_pipe, w.hr_model = None, None


# ComfyUI's older folder names, which its GET /models/{folder} still answers (folder_paths' legacy map)
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}


def _model_folders(env: Env) -> dict[str, list[str]]:
    """ComfyUI's model folders (``GET /models``) and what each lists, as the loaders' choices name them."""
    from sdengine.server.comfy.nodes import choices_of

    folders = {"checkpoints": ("CheckpointLoaderSimple", "ckpt_name"), "loras": ("LoraLoader", "lora_name")}
    folders |= {"controlnet": ("ControlNetLoader", "control_net_name"), "vae": ("VAELoader", "vae_name")}
    folders |= {"clip_vision": ("CLIPVisionLoader", "clip_name")}
    folders |= {"diffusion_models": ("UNETLoader", "unet_name"), "text_encoders": ("DualCLIPLoader", "clip_name1")}
    out = {}
    for folder, (node, name) in folders.items():
        inp = NODES[node].input(name)
        out[folder] = choices_of(inp, env) if inp is not None else []
    # IP-Adapter files (--ip-adapters-dir), under the folder name of ComfyUI's IP-Adapter nodes (ComfyUI_IPAdapter_plus)
    out["ipadapter"] = [e.name for e in env.catalog.ip_adapters()]
    return out


@_route("GET", "/models")
def list_model_folders(request: Request) -> Any:
    return list(_model_folders(Env(request.app.state.services, state(request.app))))


@_route("GET", "/models/{folder}")
def list_models(request: Request, folder: str) -> Any:
    """The names a folder's loader takes (ComfyUI: 404 for a folder it does not know)."""
    listed = _model_folders(Env(request.app.state.services, state(request.app)))
    folder = LEGACY_FOLDERS.get(folder, folder)
    if folder not in listed:
        raise NotFound(f"no model folder {folder!r}; the folders are {', '.join(listed)}")
    return listed[folder]


@_route("GET", "/embeddings")
def embeddings(request: Request) -> Any:
    """ComfyUI's list: each file's path in the folder without its suffix (``sub/name`` for a file in a
    subfolder, what its prompts write after ``embedding:``), sorted by that path with the suffix, as ComfyUI's
    ``folder_paths.get_filename_list``."""
    folder = request.app.state.services.config.embeddings_dir
    if folder is None:
        return []
    from sdengine.text.embeddings import list_embedding_files

    root = Path(folder)
    files = sorted(p.relative_to(root).as_posix() for paths in list_embedding_files(root).values() for p in paths)
    return [f[: -len(Path(f).suffix)] for f in files]


@_route("GET", "/extensions")
def extensions() -> Any:
    return []


def server_features(services: Any) -> dict[str, Any]:
    """ComfyUI's feature flags (comfy_api/feature_flags.py): previews here are plain PREVIEW_IMAGE frames (no
    metadata frames), and an upload may be as large as the server's body limit."""
    return {"supports_preview_metadata": False, "max_upload_size": int(services.config.max_body_bytes)}


@_route("GET", "/features")
def features(request: Request) -> Any:
    return server_features(request.app.state.services)


# ------------------------------------------------------------------------------------------ websocket


def _ws_caller(ws: WebSocket) -> Caller | str:
    """The middleware's rules for a websocket handshake: Host, Origin (cross-site websocket hijacking)
    and the API key (header, or ``?token=`` since browsers cannot set headers on websockets). The caller (whose
    prompts' events the socket gets), or why it is refused."""
    from sdengine.server.security import caller_of, is_loopback, origin_allowed

    services = ws.app.state.services
    config = services.config
    headers = {k.lower(): v for k, v in ws.headers.items()}
    host = headers.get("host", "")
    hostname = host[1:].split("]")[0] if host.startswith("[") else host.rsplit(":", 1)[0]
    if not config.auth_required and is_loopback(config.host) and host and not is_loopback(hostname):
        return "host"
    origin = headers.get("origin")
    if origin is not None and not origin_allowed(origin, host, tuple(o.rstrip("/") for o in config.cors_origins)):
        return "origin"
    token = ws.query_params.get("token")
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    caller = caller_of(ws.scope, headers, config.user_keys, config.admin_key)
    return "key" if caller is None else caller


async def websocket_endpoint(ws: WebSocket) -> None:
    caller = _ws_caller(ws)
    if not isinstance(caller, Caller):
        await ws.close(code=1008)
        return
    st = state(ws.app)
    sid = ws.query_params.get("clientId") or uuid.uuid4().hex
    with st.lock:
        held = st.sockets.get(sid)
        mine = sum(1 for k, t in st.sockets.items() if t[2] is not None and t[2].client == caller.client and k != sid)
    if held is not None and held[2] is not None and not caller.admin and held[2].client != caller.client:
        # another client's socket has this clientId: taking it over would cut that client off its own events
        await ws.close(code=1008)
        return
    if mine >= MAX_SOCKETS_PER_CLIENT:
        # each socket queues every status event (and its prompts' events) until read: a client opening thousands
        # that it never reads made the server hold all of them
        await ws.close(code=1008)
        return
    await ws.accept()
    services = ws.app.state.services
    q: asyncio.Queue[Any] = asyncio.Queue(maxsize=10000)
    with st.lock:
        st.sockets[sid] = (asyncio.get_running_loop(), q, caller)
    send_status(st, services, sid)
    for j in visible(comfy_jobs(services), caller):  # ComfyUI: a client that reconnects while its prompt runs is
        node = j.node  # told the node
        if j.state == RUNNING and j.client_id == sid and node is not None:
            st.send("executing", {"node": node, "display_node": node, "prompt_id": j.prompt_id}, sid)

    async def pump() -> None:
        while True:
            msg = await q.get()
            if isinstance(msg, bytes | bytearray):
                await ws.send_bytes(bytes(msg))
            else:
                await ws.send_text(msg)

    async def drain() -> None:
        first = True
        while True:
            msg = await ws.receive()
            if msg.get("type") == "websocket.disconnect":
                return
            if first and msg.get("text"):  # ComfyUI's frontend opens with its feature flags; answered with ours
                try:
                    hello = json.loads(msg["text"])
                except ValueError:
                    hello = None
                if isinstance(hello, dict) and hello.get("type") == "feature_flags":
                    st.send("feature_flags", server_features(services), sid)
            first = False

    tasks = [asyncio.create_task(pump()), asyncio.create_task(drain())]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        for t in tasks:
            t.cancel()
        with st.lock:
            if st.sockets.get(sid, (None, q, None))[1] is q:
                del st.sockets[sid]


for _p in _both("/ws"):
    router.add_api_websocket_route(_p, websocket_endpoint)


def install(app: FastAPI) -> None:
    """Create the per-app state now (folders from the config) and empty the temp folder, as ComfyUI does at
    start (only what sdengine wrote there: :func:`~sdengine.server.comfy.nodes.clean_temp`)."""
    from sdengine.server.comfy.nodes import clean_temp

    folders = state(app).folders
    clean_temp(folders.temp, folders.tag)


def uninstall(app: FastAPI) -> None:
    """The server stops: the temp folder's lock file that kept its previews from other servers goes."""
    st = getattr(app.state, "comfy", None)
    if st is not None:
        st.folders.release()
