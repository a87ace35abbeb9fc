"""The FastAPI app: the native ``/v1`` API here, the AUTOMATIC1111 and OpenAI routes from their modules.

``create_app(config)`` builds one server: catalog (names -> files), upload store, job manager with one
worker per device, the security middleware, and the routes. ``loader`` (model reference, device) ->
pipeline can be replaced (tests, benchmarks); the default is :func:`sdengine.pipeline.load_pipeline`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from sdengine.errors import SdengineError
from sdengine.server.catalog import Catalog
from sdengine.server.config import ServerConfig
from sdengine.server.errors import BadRequest, NotFound, QueueFull, redact_paths, register_client_folder, status_of
from sdengine.server.ip_adapters import IPAdapterRequest
from sdengine.server.jobs import FINISHED, Job, JobManager, Loader, visible
from sdengine.server.requests import ControlRequest, Generation, build_generation
from sdengine.server.schemas import JobRequest
from sdengine.server.security import SecurityMiddleware, is_loopback
from sdengine.server.uploads import UploadStore

log = logging.getLogger(__name__)


def a1111_sampler_options() -> dict[str, Any]:
    from sdengine.server.a1111 import HYPERTILE_OPTIONS, SAMPLER_OPTIONS

    return {**SAMPLER_OPTIONS, **HYPERTILE_OPTIONS}


@dataclass
class Services:
    """What every route needs; one per app (``app.state.services``)."""

    config: ServerConfig
    catalog: Catalog
    uploads: UploadStore
    manager: JobManager
    options: dict[str, Any]  # A1111 options (sd_model_checkpoint, CLIP_stop_at_last_layers)
    # What a built generation is checked against before it is queued (a size off the model's multiple, a tiny VAE
    # the model lacks): a 400 now instead of a job that fails when it runs. The native routes install it.
    precheck: Callable[[Generation], None] = lambda generation: None

    def build(self, **fields: Any) -> Generation:
        return build_generation(
            self.config,
            self.catalog,
            self.uploads,
            default_model=str(self.options.get("sd_model_checkpoint") or self.config.model),
            **fields,
        )

    def submit(self, generation: Generation, **job_fields: Any) -> tuple[Job, int]:
        job = Job(generation, **job_fields)
        return job, self.manager.submit(job)

    def _model(self, model: str | None) -> tuple[str | None, Any]:
        """The loader reference of ``model`` (None: the current model; None for an unknown name) and the pipeline a
        worker holds of it (None before its first load)."""
        try:
            ref = self.catalog.resolve_model(model or str(self.options.get("sd_model_checkpoint") or self.config.model))
        except SdengineError:
            return None, None
        return ref, next((w.pipe for w in self.manager.workers if w.model == ref and w.pipe is not None), None)

    def family(self, model: str | None) -> str | None:
        """The family of ``model`` (page_api.FAMILIES; None: the current model): its loaded pipeline's, else read
        from its files; None when not told (an unknown name, an unreadable file)."""
        from sdengine.server.page_api import family_before_load, family_of_pipe

        ref, loaded = self._model(model)
        if ref is None:
            return None
        return family_of_pipe(loaded) if loaded is not None else family_before_load(ref)

    def qwen_edit(self, model: str | None) -> str | None:
        """Whether ``model`` (None: the current one) is Qwen-Image-Edit: "edit", "plus" (2509's
        ``QwenImageEditPlusPipeline``) or None (another model, an unknown name)."""
        from sdengine.server.page_api import qwen_edit_before_load, qwen_edit_plus_before_load

        ref, loaded = self._model(model)
        if ref is None:
            return None
        if loaded is not None:
            variant = getattr(loaded, "variant", None)
            return {"qwen_image_edit": "edit", "qwen_image_edit_plus": "plus"}.get(str(variant))
        if not qwen_edit_before_load(ref):
            return None
        return "plus" if qwen_edit_plus_before_load(ref) else "edit"

    def flux2_distilled(self, model: str | None) -> bool:
        """Whether ``model`` (None: the current one) is a FLUX.2 model that runs without CFG: a step-distilled
        [klein] or [dev] (guidance-distilled): its loaded pipeline's ``distilled`` / ``dev``, else read from its
        files (False for other models and when not told)."""
        from sdengine.server.page_api import flux2_dev_before_load, flux2_distilled_before_load

        ref, loaded = self._model(model)
        if ref is None:
            return False
        if loaded is not None:
            no_cfg = bool(getattr(loaded, "distilled", False)) or bool(getattr(loaded, "dev", False))
            return no_cfg and getattr(loaded, "text_kind", "") == "flux2"
        return flux2_distilled_before_load(ref) is True or flux2_dev_before_load(ref)

    def family_defaults(self, model: str | None) -> dict[str, Any]:
        """The settings a job on ``model`` (None: the current one) takes where its request gives none, when they
        are not SD's (the native job's and OpenAI's defaults: 25 steps of dpmpp_2m / karras at cfg 7.5): an SD3
        or Flux model's own (its pipeline's ``family_defaults``: Euler on the flow's ``normal`` grid, cfg 7 for
        SD3, cfg 1 for Flux). {} for other models (and an unknown name: the build answers it)."""
        from sdengine.server.page_api import family_defaults_before_load

        ref, loaded = self._model(model)
        if ref is None:
            return {}
        own = getattr(loaded, "family_defaults", None) if loaded is not None else family_defaults_before_load(ref)
        keys = ("steps", "cfg_scale", "sampler", "schedule")  # the rest (distilled guidance) is the pipeline's
        return {k: v for k, v in (own or {}).items() if k in keys}


def resolve_devices(names: tuple[str, ...]) -> list[str]:
    """``auto`` -> every visible CUDA GPU (one worker each), else the CPU; other names as given."""
    import torch

    out: list[str] = []
    for n in names:
        if n == "auto":
            if torch.cuda.is_available():
                out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
            else:
                out.append("cpu")
        else:
            from sdengine.devices import resolve_device

            out.append(str(resolve_device(n)))
    return out or ["cpu"]


def default_loader(
    dtype: str | None,
    *,
    vae: Path | None = None,
    embeddings_dir: Path | None = None,
    tiny_vae: Path | None = None,
    weight_dtype: str | None = None,
) -> Loader:
    """How the workers load a model reference; ``weight_dtype`` (``serve --weight-dtype``): every model's diffusion
    network held in fp8 (:mod:`sdengine.nn.fp8_storage`)."""

    def load(ref: str, device: str) -> Any:
        pipe = load_model(ref, device)
        if tiny_vae is not None and hasattr(pipe, "set_tiny_vae"):
            try:
                pipe.set_tiny_vae(tiny_vae)
            except SdengineError as e:  # a model of another latent space keeps its own (or the latent previews)
                log.warning("%s: not using --tiny-vae: %s", ref, e)
        return pipe

    def load_model(ref: str, device: str) -> Any:
        from sdengine.pipeline import load_pipeline
        from sdengine.server.dit_parts import split

        path, parts = split(ref)
        if parts:  # an SD3 / Flux / Qwen-Image file with its text encoders (and VAE) from the folders
            return load_pipeline(
                path,
                device=device,
                dtype=dtype,
                vae=parts.get("vae", parts.get("qwen_vae", parts.get("flux2_vae", vae))),
                clip_l=parts.get("clip_l"),
                clip_g=parts.get("clip_g"),
                t5=parts.get("t5"),
                qwen_text=parts.get("qwen_text", parts.get("qwen3_text", parts.get("mistral_text"))),
                weight_dtype=weight_dtype,
            )
        if embeddings_dir is not None:
            from sdengine.text.embeddings import EmbeddingsUnsupported

            try:
                return stored_or_plain(ref, device, embeddings_dir=embeddings_dir)
            except EmbeddingsUnsupported as e:
                # The folder serves the SD models; a MiniLM or pixel model runs without it (said once here).
                log.warning("%s", e)
        return stored_or_plain(ref, device)

    def stored_or_plain(ref: str, device: str, **kw: Any) -> Any:
        from sdengine.nn.fp8_storage import StorageError
        from sdengine.pipeline import load_pipeline

        try:
            return load_pipeline(ref, device=device, dtype=dtype, vae=vae, weight_dtype=weight_dtype, **kw)
        except StorageError as e:  # a pixel model (nothing to store), a weight beyond the format: said, loaded plain
            if weight_dtype in (None, "default"):
                raise
            log.warning("%s: not using --weight-dtype %s: %s", ref, weight_dtype, e)
        return load_pipeline(ref, device=device, dtype=dtype, vae=vae, **kw)

    return load


def create_app(config: ServerConfig, *, loader: Loader | None = None, preload: bool = True) -> FastAPI:
    """The server for ``config``. ``preload``: each worker loads the default model at start."""
    catalog = Catalog(
        config.models_dir,
        config.loras_dir,
        config.controlnets_dir,
        config.model,
        tiny_vae=config.tiny_vae,
        vaes_dir=config.vaes_dir,
        upscalers_dir=config.upscalers_dir,
        clip_vision_dir=config.clip_vision_dir,
        ip_adapters_dir=config.ip_adapters_dir,
    )
    config.model = catalog.startup_name
    folders = (config.outputs_dir, config.models_dir, config.loras_dir, config.controlnets_dir, config.vaes_dir)
    for folder in (*folders, config.upscalers_dir, config.clip_vision_dir, config.ip_adapters_dir):
        register_client_folder(folder)  # errors name a file of these by its name inside them (errors.redact_paths)
    manager = JobManager(
        loader=loader
        or default_loader(
            config.dtype,
            vae=config.vae,
            embeddings_dir=config.embeddings_dir,
            tiny_vae=config.tiny_vae,
            weight_dtype=config.weight_dtype,
        ),
        devices=resolve_devices(config.devices),
        outputs_dir=config.outputs_dir,
        max_queue=config.max_queue,
        keep_jobs=config.keep_jobs,
        preview_every=config.preview_every,
        max_batch_jobs=config.max_batch_jobs,
        max_batch_rows=config.max_batch,
        preview=config.preview,
        affinity_s=config.model_affinity_s,
        max_queued_per_client=config.max_queued_per_client,
        fair=config.fair_queue,
    )
    services = Services(
        config,
        catalog,
        UploadStore(config.max_image_pixels),
        manager,
        {
            "sd_model_checkpoint": catalog.startup_name,
            "CLIP_stop_at_last_layers": 1,
            "sdxl_clip_l_skip": False,  # A1111's "Clip skip SDXL": its Clip skip for SDXL's CLIP-L too
            "sd_vae": "Automatic",  # A1111's sd_vae of jobs that give none (a1111.check_sd_vae)
            "sd_vae_decode_method": "Full",
            "sd_vae_encode_method": "Full",
            "eta_noise_seed_delta": 0,  # A1111's ENSD
            # A1111's "Random number generator source": sdengine's default is CPU (A1111's is GPU, on NVIDIA cards
            # the numbers of NV, which sdengine draws on any device: set "GPU" or "NV" to reproduce such images)
            "randn_source": "CPU",
            "initial_noise_multiplier": 1.0,  # A1111's img2img noise multiplier
            "img2img_fix_steps": False,  # A1111's "With img2img, do exactly the amount of steps the slider specifies"
            "always_discard_next_to_last_sigma": False,  # A1111's "Always discard next-to-last sigma"
            "sd_noise_schedule": "Default",  # A1111's "Noise schedule for sampling" (or "Zero Terminal SNR")
            "hires_fix_refiner_pass": "second pass",  # A1111's: which pass of the hires fix hands off to the refiner
            "tiling": False,  # A1111's Tiling of requests that give none
            "img2img_background_color": "#ffffff",  # what A1111 lays a transparent img2img init image over
            # eta_ancestral, s_churn, ..., uni_pc_order, hypertile_enable_unet, ...: what the server runs
            **a1111_sampler_options(),
        },
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if preload:
            for w in manager.workers:
                w.preload = catalog.resolve_model(config.model)
        manager.start()
        try:
            yield
        finally:
            await asyncio.to_thread(manager.stop)
            from sdengine.server import comfy

            comfy.uninstall(app)  # the temp folder's liveness lock (comfy.install cleaned the folder)

    app = FastAPI(
        title="sdengine",
        version=_version(),
        lifespan=lifespan,
        description="Native job API, AUTOMATIC1111 /sdapi/v1 and OpenAI Images routes over one queue.",
    )
    app.state.services = services
    app.add_middleware(
        SecurityMiddleware,
        api_key=config.api_key,
        more_api_keys=config.more_api_keys,
        admin_key=config.admin_key,
        cors_origins=config.cors_origins,
        max_body_bytes=config.max_body_bytes,
        body_timeout_s=config.body_timeout_s,
        loopback_only_hosts=not config.auth_required and is_loopback(config.host),
    )
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        # Added last = outermost: the security rules' own answers (401 wrong key, 413, 403) carry the CORS
        # headers too, so that a page of a listed origin can read why it was refused (not a bare CORS error).
        # As the Origin rule reads them: "http://app.example/" is the origin "http://app.example" (a browser's
        # Origin header never ends in a slash; unstripped, the rule let it in but no CORS header matched it).
        origins = [o.strip().rstrip("/") for o in config.cors_origins]
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"], allow_headers=["*"])
    _install_error_handlers(app)
    _native_routes(app, services)
    _install_openapi(app, config)
    from sdengine.server import a1111, comfy, openai_images, page_api

    a1111.install(app, services)
    openai_images.install(app, services)
    app.include_router(comfy.router)  # ComfyUI API-format workflows (server/comfy/)
    comfy.install(app)  # its folders; the temp folder emptied, as ComfyUI does at start
    page_api.install(app, services)  # the web page at / and its routes
    return app


def make_server(app: FastAPI, *, host: str, port: int, grace: float = 10.0, **uvicorn_options: Any) -> Any:
    """The uvicorn server of ``sdengine serve``, whose shutdown (Ctrl-C, SIGTERM) first stops the job queue: the
    listening socket closes, queued jobs end ``cancelled``, running ones get ``grace`` seconds to finish (a second
    Ctrl-C cancels them at once), so that every event stream and waiting request ends with the job's final state
    instead of being cut off; then uvicorn closes the (now idle) connections. The head of every request must
    arrive within the config's ``header_timeout_s`` (:func:`~sdengine.server.security.header_timeout_protocol`),
    and ``max_connections`` is uvicorn's ``limit_concurrency``."""
    import uvicorn

    from sdengine.server.security import header_timeout_protocol

    manager: JobManager = app.state.services.manager
    config: ServerConfig = app.state.services.config

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            for server in self.servers:  # no new connections while the jobs stop
                server.close()
            await asyncio.to_thread(manager.stop, grace=grace, hurry=lambda: bool(self.force_exit))
            await super().shutdown(sockets)

    uvicorn_options.setdefault("timeout_graceful_shutdown", grace + 5)
    uvicorn_options.setdefault("http", header_timeout_protocol(config.header_timeout_s))
    uvicorn_options.setdefault("limit_concurrency", config.max_connections)
    return Server(uvicorn.Config(app, host=host, port=port, **uvicorn_options))


_ERROR_SCHEMA = {
    "type": "object",
    "properties": {
        # one line; a request the schemas refuse has FastAPI's list of what each field got wrong
        "detail": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "object"}}]},
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"anyOf": [{"type": "string"}, {"type": "null"}]},
                "code": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["message", "type"],
        },
    },
    "required": ["error"],
}
OPENAI_IMAGE_ROUTES = "/v1/images/generations", "/v1/images/edits", "/v1/images/variations"
_PNG = {"image/png": {"schema": {"type": "string", "format": "binary"}}}
_NATIVE_ERRORS = {  # the native routes' answers besides 200 and 422, as they really are
    ("post", "/v1/jobs"): {
        "400": "a value the server or the pipeline refuses (one line)",
        "413": "body or image over the limits",
        "429": "the queue, or this client's share of it (--max-queued-per-client), is full (Retry-After)",
        "503": "the server is stopping (Retry-After)",
    },
    ("post", "/v1/uploads"): {"400": "not a PNG, JPEG or WebP image", "413": "body or image over the limits"},
    ("get", "/v1/jobs/{job_id}"): {"404": "no such job (or forgotten)"},
    ("delete", "/v1/jobs/{job_id}"): {"404": "no such job (or forgotten)"},
    ("get", "/v1/jobs/{job_id}/events"): {"404": "no such job (or forgotten)"},
    ("get", "/v1/jobs/{job_id}/preview"): {"400": "no preview yet", "404": "no such job (or forgotten)"},
    ("get", "/v1/images/{name}"): {"400": "not a PNG name in the outputs folder", "404": "no such image"},
    ("get", "/v1/models/{model_id}"): {"404": "no such model (OpenAI's shape: param model, code model_not_found)"},
}


def _install_openapi(app: FastAPI, config: ServerConfig) -> None:
    """``/openapi.json`` (and ``/docs``) as the server behaves: the job fields' limits are this server's
    (``--max-steps``...: the request models leave them out, the request builder checks them), the event stream,
    preview and images are documented with their media types, the upload's body is the multipart file or raw image it
    reads, the native routes' error answers are listed, and with ``--api-key`` the bearer key is declared so that
    the docs page's "Authorize" sends it."""
    from fastapi.openapi.utils import get_openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schemas = spec.get("components", {}).get("schemas", {})
        limits = {"steps": config.max_steps, "batch_size": config.max_batch, "width": config.max_side}
        limits["height"] = config.max_side
        for schema, name, maximum in (
            *(("JobRequest", name, maximum) for name, maximum in limits.items()),
            ("HiresSpec", "hr_second_pass_steps", config.max_steps),
            ("HiresSpec", "hr_resize_x", config.max_side),
            ("HiresSpec", "hr_resize_y", config.max_side),
        ):
            prop = schemas.get(schema, {}).get("properties", {}).get(name, {})
            for option in [prop, *prop.get("anyOf", [])]:
                if option.get("type") == "integer":  # the schema has no upper bound: the server checks its own
                    option["maximum"] = maximum
        schemas["Error"] = _ERROR_SCHEMA
        from sdengine.server import openai_images

        openai_images.openapi_paths(spec, config, {"$ref": "#/components/schemas/Error"})
        paths = spec.get("paths", {})

        def ok(path: str, method: str, content: dict[str, Any]) -> None:
            op = paths.get(path, {}).get(method)
            if op is not None:
                op["responses"][next(c for c in op["responses"] if c.startswith("2"))]["content"] = content

        ok("/v1/jobs/{job_id}/events", "get", {"text/event-stream": {"schema": {"type": "string"}}})
        ok("/v1/jobs/{job_id}/preview", "get", _PNG)
        ok("/v1/images/{name}", "get", _PNG)
        upload = paths.get("/v1/uploads", {}).get("post")
        if upload is not None:
            binary = {"schema": {"type": "string", "format": "binary"}}
            form = {"type": "object", "properties": {"file": binary["schema"]}, "required": ["file"]}
            upload["requestBody"] = {
                "required": True,
                "content": {
                    "multipart/form-data": {"schema": form},
                    **{f"image/{kind}": binary for kind in ("png", "jpeg", "webp")},
                    "application/octet-stream": binary,
                },
            }
        for (method, path), answers in _NATIVE_ERRORS.items():
            op = paths.get(path, {}).get(method)
            if op is None:
                continue
            for code, text in answers.items():
                op["responses"][code] = {
                    "description": text,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
        if config.auth_required:
            spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            spec["security"] = [{"bearer": []}]
        app.openapi_schema = spec
        return spec

    app.openapi = openapi  # type: ignore[method-assign]


def _version() -> str:
    from sdengine import __version__

    return str(__version__)


def listing_hint(message: str, path: str) -> str:
    """``message`` with the CLI's "`sdengine list samplers` lists all" (an unknown sampler or schedule) turned into
    the route of the protocol the client speaks that lists them: a client of the server has no CLI."""
    from sdengine.diffusion import sampling

    a1111 = path.startswith("/sdapi/")
    hints = {
        sampling.SAMPLERS_HINT: "GET /sdapi/v1/samplers lists all" if a1111 else "GET /v1/samplers lists all",
        sampling.SCHEDULES_HINT: "GET /sdapi/v1/schedulers lists all" if a1111 else "GET /v1/samplers lists all",
    }
    for cli, route in hints.items():
        message = message.replace(cli, route)
    return message


def error_body(message: str, kind: str) -> dict[str, Any]:
    """One error shape that A1111 clients (``detail``) and OpenAI clients (``error.message``) both read; a path of
    the server's in ``message`` is cut to the name the client gave (an OSError names the file it failed on)."""
    message = redact_paths(message)
    return {"detail": message, "error": {"message": message, "type": kind, "param": None, "code": None}}


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(SdengineError)
    async def sdengine_error(request: Request, exc: SdengineError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if isinstance(exc, QueueFull) else None
        message = listing_hint(str(exc), request.url.path)
        return JSONResponse(error_body(message, type(exc).__name__), status_code=status_of(exc), headers=headers)

    @app.exception_handler(FileNotFoundError)
    async def not_found(request: Request, exc: FileNotFoundError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), "NotFound"), status_code=404)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # OpenAI answers a field of the wrong type or out of range with 400 (the client's BadRequestError)
        status = 400 if request.url.path.startswith(OPENAI_IMAGE_ROUTES) else 422
        return JSONResponse(validation_body(exc.errors()), status_code=status)

    from starlette.exceptions import HTTPException

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Starlette's own answers (unknown route 404, 405, a broken multipart body 400) in the one error shape."""
        message = str(exc.detail)
        return JSONResponse(
            error_body(message, "invalid_request_error"), status_code=exc.status_code, headers=exc.headers
        )


def _text_safe(value: Any) -> Any:
    """``value`` with every string made encodable (a lone surrogate from a JSON ``\\ud800`` escape as ``\\ud800``)
    and every float too: JSON has no infinity or NaN (``1e400`` in a body is read as inf), so such a value is
    given as its text ("inf"), where it made the refusal a 500."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_text_safe(k): _text_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_text_safe(v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return _text_safe(str(value))


def validation_body(errors: Any) -> dict[str, Any]:
    """A request the schemas refuse (422): FastAPI's ``detail`` list (the web page and A1111 clients read it), its
    values made encodable (a lone surrogate in the body once made this answer a 500), and ``error.message``, one
    line naming the first field, for OpenAI clients, which show only that."""
    detail = [
        {k: _text_safe(v) for k, v in e.items() if k in ("type", "loc", "msg", "input")} for e in list(errors or [])
    ]
    first = detail[0] if detail else {"loc": [], "msg": "invalid request"}
    loc = [str(x) for x in first.get("loc", []) if x != "body"]
    message = f"{'.'.join(loc) or 'request'}: {first.get('msg', 'invalid')}"
    if first.get("type") == "json_invalid":  # its loc is the character where the JSON broke, not a field
        message = f"the body is not valid JSON (it breaks at character {'.'.join(loc) or '?'})"
        loc = []
    if len(detail) > 1:
        message += f" (and {len(detail) - 1} more)"
    error = {"message": message, "type": "invalid_request_error", "param": loc[0] if loc else None, "code": None}
    return {"detail": detail, "error": error}


# ------------------------------------------------------------------------------------------------ native


def image_url(name: str) -> str:
    return f"/v1/images/{name}"


def job_json(job: Job, services: Services) -> dict[str, Any]:
    eta = job.eta  # read once: the job may finish between two reads (None then, and round(None) was a 500)
    return {
        "id": job.id,
        "state": job.state,
        "position": services.manager.position(job),
        "step": job.step,
        "steps": job.steps,
        "progress": round(job.progress, 4),
        "eta": None if eta is None else round(eta, 2),
        "error": job.error,
        "model": job.generation.model_name,
        "created": job.created,
        "started": job.started,
        "finished": job.finished,
        "images": [
            {"name": im.name, "url": image_url(im.name) if im.name else None, "seed": im.seed, "infotext": im.infotext}
            for im in job.images
        ],
        "infotexts": [im.infotext for im in job.images],
        "notes": job.notes,
        "vae": job_vae_name(job),
    }


def job_vae_name(job: Job) -> str | None:
    """The VAE a job chose (its ``vae``, A1111's ``sd_vae``): the file's name, "None" for the model file's own;
    None where it took the VAE the model was loaded with."""
    g = job.generation
    name = getattr(g, "vae_name", None)
    return name if name else ("None" if getattr(g, "checkpoint_vae", False) else None)


def progress_json(job: Job, services: Services) -> dict[str, Any]:
    out = {k: v for k, v in job_json(job, services).items() if k not in ("images", "infotexts")}
    if job.state in FINISHED:
        out = job_json(job, services)
    return out


def preview_data_url(job: Job) -> str | None:
    if job.preview_png is None:
        return None
    return "data:image/png;base64," + base64.b64encode(job.preview_png).decode()


def _native_routes(app: FastAPI, services: Services) -> None:
    config, catalog, manager = services.config, services.catalog, services.manager

    def workers_json(request: Request) -> list[dict[str, Any]]:
        # These routes are public: a load error (it may name files) is shown only to holders of the key.
        from sdengine.server.security import caller_of

        headers = {k.lower(): v for k, v in request.headers.items()}
        caller = caller_of(request.scope, headers, config.user_keys, config.admin_key)
        trusted = not config.auth_required or caller is not None
        return [
            {
                "device": w.device,
                "model": catalog.model_name_of(w.model) if w.model else None,
                "busy": w.current is not None,
                "state": w.state,
                "error": w.load_error if trusted or w.load_error is None else "hidden (send the API key to see it)",
            }
            for w in manager.workers
        ]

    def ready() -> bool:
        return not manager.stopping and all(w.state == "ready" for w in manager.workers)

    @app.get("/healthz", tags=["native"])
    def healthz(request: Request) -> dict[str, Any]:
        """Liveness: always 200 while the process answers; ``ready`` says whether it can run jobs now."""
        return {
            "status": "ok",
            "ready": ready(),
            "version": _version(),
            "model": services.options.get("sd_model_checkpoint"),
            "queued": manager.queued_count(),
            "running": len(manager.running()),
            "completed": manager.completed,
            "workers": workers_json(request),
        }

    @app.get("/readyz", tags=["native"], responses={503: {"description": "loading, a failed load, or stopping"}})
    def readyz(request: Request) -> JSONResponse:
        """Readiness, for a load balancer's health check: 200 when every worker has its default model loaded;
        503 while one is still loading it, when that load failed, or while the server stops."""
        ok = ready()
        body = {"ready": ok, "stopping": manager.stopping, "workers": workers_json(request)}
        return JSONResponse(body, status_code=200 if ok else 503)

    def loaded_pipe(generation: Generation) -> Any:
        """The pipeline of the job's model that a worker holds now, or None (before its first load): the checks
        below judge a request against it up front, else the job fails with the same line when it runs."""
        return next((w.pipe for w in manager.workers if w.model == generation.model and w.pipe is not None), None)

    def check_size_multiple(generation: Generation) -> None:
        """A width or height the model cannot make is a 400 now, as the synchronous routes answer it, instead of a
        queued job that fails when it runs: the multiple is the loaded pipeline's, else read from the model
        folder's configs, else 8 (every model's least)."""
        from sdengine.server.page_api import model_size

        loaded = loaded_pipe(generation)
        m = model_size(generation.model, loaded)["multiple"]
        for what in ("width", "height"):
            value = generation.kwargs.get(what)
            if value is not None and value % m:
                lo, hi = max(m, value // m * m), value // m * m + m
                near = lo if value - lo < hi - value else hi
                raise BadRequest(f"{what} {value} is not a multiple of {m}; the nearest valid {what} is {near}")

    def check_tiny_vae(generation: Generation) -> None:
        """vae_decode "tiny" (and vae_encode "tiny" of an init image) on a model without that tiny VAE is a 400
        now, by what GET /v1/models says (or the loaded pipeline), instead of a job that fails when it runs."""
        kw = generation.kwargs
        encode = kw.get("vae_encode") == "tiny" and kw.get("init_image") is not None
        if kw.get("vae_decode") != "tiny" and not encode:
            return
        loaded = loaded_pipe(generation)
        if loaded is not None and hasattr(loaded, "tiny_vae"):
            tiny = loaded.tiny_vae
            decodes, encodes = tiny is not None, tiny is not None and getattr(tiny, "encoder", None) is not None
        else:
            decodes, encodes = has_tiny_vae(generation.model), has_tiny_encoder(generation.model)
        name = generation.model_name
        if kw.get("vae_decode") == "tiny" and not decodes:
            raise BadRequest(
                f"vae_decode 'tiny' needs a tiny VAE and {name} has none (GET /v1/models: tiny_vae); "
                "serve it with --tiny-vae FILE, or decode with 'full'"
            )
        if encode and not encodes:
            raise BadRequest(
                f"vae_encode 'tiny' needs a tiny VAE with an encoder and {name} has none (GET /v1/models: "
                "tiny_vae_encoder); encode with 'full'"
            )

    def check_pag_layers(generation: Generation) -> None:
        """pag_layers that match no self-attention layer of the model are a 400 now when a worker holds the model
        (the pipeline's ``pag_perturber``: a U-Net's self-attention or an MMDiT's joint-attention layer names);
        before its first load the job fails with the same line when it runs."""
        kw = generation.kwargs
        if not kw.get("pag_scale"):
            return
        perturber = getattr(loaded_pipe(generation), "pag_perturber", None)
        if perturber is None:
            return
        try:
            perturber(list(kw["pag_layers"]))
        except SdengineError as e:
            raise BadRequest(f"pag_layers: {e}") from None

    def check_freeu_blocks(generation: Generation) -> None:
        """FreeU that would change no up block of the model (none of the widths its rule picks) is a 400 now when a
        worker holds the model; before its first load the job fails with the same line when it runs."""
        kw = generation.kwargs
        if kw.get("freeu") is None:
            return
        loaded = loaded_pipe(generation)
        unet = getattr(loaded, "unet", None)
        if unet is None:
            return
        from sdengine.nn.freeu import FreeU, check_freeu

        try:
            b1, b2, s1, s2 = kw["freeu"]
            check_freeu(unet, FreeU(b1, b2, s1, s2, version=kw["freeu_version"], rule=kw["freeu_rule"]))
        except SdengineError as e:
            raise BadRequest(f"freeu: {e}") from None

    def check_deep_shrink_block(generation: Generation) -> None:
        """A Deep Shrink block the model does not have is a 400 now when a worker holds the model; before its first
        load the job fails with the same line when it runs."""
        shrink = generation.kwargs.get("deep_shrink")
        if shrink is None:
            return
        loaded = loaded_pipe(generation)
        unet = getattr(loaded, "unet", None)
        if unet is None:
            return
        from sdengine.nn.deep_shrink import DeepShrink, check_deep_shrink

        try:
            check_deep_shrink(unet, DeepShrink.coerce(shrink))
        except SdengineError as e:
            raise BadRequest(f"deep_shrink: {e}") from None

    def check_sag_size(generation: Generation) -> None:
        """Self-attention guidance (diffusers' rule) on an image too small for its blur is a 400 now when a worker
        holds the model (its latent factor); before its first load the job fails with the same line when it runs."""
        kw = generation.kwargs
        if not kw.get("sag_scale") or kw.get("sag_rule", "diffusers") != "diffusers":
            return
        factor = getattr(loaded_pipe(generation), "vae_scale_factor", None)
        if factor is None:
            return
        from sdengine.pipeline.core import sag_size_error

        too_small = sag_size_error(kw.get("width"), kw.get("height"), int(factor))
        if too_small:
            raise BadRequest(too_small)

    def check_hypertile_layers(generation: Generation) -> None:
        """HyperTile that would tile no self-attention layer of the model is a 400 now when a worker holds the
        model; before its first load the job fails with the same line when it runs."""
        kw = generation.kwargs
        if kw.get("hypertile") is None and kw.get("hypertile_vae") is None:
            return
        loaded = next((w.pipe for w in manager.workers if w.model == generation.model and w.pipe is not None), None)
        from sdengine.nn.hypertile import HyperTile, check_hypertile, vae_hypertile_layer

        if kw.get("hypertile_vae") is not None and getattr(loaded, "vae", None) is not None:
            try:
                vae_hypertile_layer(loaded.vae)  # type: ignore[union-attr]
            except SdengineError as e:
                raise BadRequest(f"hypertile_vae: {e}") from None
        if kw.get("hypertile") is None:
            return
        unet = getattr(loaded, "unet", None)
        if unet is None:
            return
        try:
            tile, swap, depth = kw["hypertile"]
            rule, scale = kw.get("hypertile_rule", "a1111"), kw.get("hypertile_scale_depth", True)
            check_hypertile(unet, HyperTile(tile, swap, depth, rule=rule, scale_depth=scale))
        except SdengineError as e:
            raise BadRequest(f"hypertile: {e}") from None

    def check_not_too_large(generation: Generation) -> None:
        """A width or height over the model's limit (8x its training size) is a 400 now, instead of a queued job
        (or a started stream) that fails when it runs: the limit is the loaded pipeline's when a worker holds the
        model, else read from a diffusers folder's configs (also before the model's first load); a single file's
        is only known once loaded."""
        from sdengine.server.page_api import max_side_before_load, model_size

        loaded = loaded_pipe(generation)
        if loaded is not None and callable(getattr(loaded, "max_side", None)):
            limit: int | None = int(loaded.max_side())
        else:
            limit = max_side_before_load(generation.model)
        if limit is None:
            return
        kw = generation.kwargs
        for what in ("width", "height"):
            value = kw.get(what)
            if value is not None and value > limit:
                raise BadRequest(
                    f"{what} {value} is over {generation.model_name}'s limit: each side may be at most {limit} px "
                    "(larger sizes take very long and only repeat the subject)"
                )
        if kw.get("reference_images") and not is_qwen_edit(generation, loaded):  # FLUX.1 Kontext: each
            check_reference_tokens(generation, loaded, limit)  # reference's tokens join every step's
        if kw.get("enable_hr"):  # the hires fix's second pass makes its own size
            from sdengine.pipeline import GenerationRequest
            from sdengine.pipeline.hires import hires_size

            size = model_size(generation.model, loaded)  # known, as the limit is
            width, height = kw.get("width") or size["width"], kw.get("height") or size["height"]
            sizes = hires_size(GenerationRequest(**kw), width, height, size["multiple"])
            for what, value in zip(("width", "height"), sizes, strict=True):
                if value > limit:
                    raise BadRequest(
                        f"the hires fix's {what} {value} (from {width}x{height}) is over {generation.model_name}'s "
                        f"limit: each side may be at most {limit} px; lower hr_scale or hr_resize_x/hr_resize_y"
                    )

    def is_qwen_edit(generation: Generation, loaded: Any) -> bool:
        """Whether the job's model is Qwen-Image-Edit (its one input image is the job's reference_images)."""
        from sdengine.server.page_api import qwen_edit_before_load

        if loaded is not None:
            return getattr(loaded, "variant", None) in ("qwen_image_edit", "qwen_image_edit_plus")
        return qwen_edit_before_load(generation.model)

    def check_reference_tokens(generation: Generation, loaded: Any, limit: int) -> None:
        """FLUX.1 Kontext's reference images add their tokens to every step: the image's and theirs together may
        be at most those of a limit x limit image (:func:`sdengine.pipeline.flux.token_refusal`, the pipeline's
        own rule), counted from the decoded references' sizes as the pipeline fits them."""
        from sdengine.errors import SdengineError
        from sdengine.pipeline.flux import token_refusal
        from sdengine.pipeline.flux2_references import fitted_size
        from sdengine.pipeline.flux_kontext import kontext_size
        from sdengine.server.page_api import family_before_load, family_of_pipe, model_size

        kw = generation.kwargs
        size = model_size(generation.model, loaded)
        m, auto = int(size["multiple"]), bool(kw.get("reference_auto_resize", True))
        refs = [im for im in kw["reference_images"] if hasattr(im, "size")]  # decoded PIL images
        family = family_of_pipe(loaded) if loaded is not None else family_before_load(generation.model)
        try:
            if family == "flux2":  # FLUX.2 [klein]'s own fitting (sdengine.pipeline.flux2_references)
                sizes = [fitted_size(im.width, im.height, m, k)[1] for k, im in enumerate(refs)]
            else:
                sizes = [kontext_size(im.width, im.height, m, auto) for im in refs]
        except SdengineError as e:
            raise BadRequest(str(e)) from None
        if not sizes:
            return
        width, height = kw.get("width"), kw.get("height")
        if width is None and height is None:  # the first reference's size, as the pipeline makes it
            width, height = sizes[0]
        why = token_refusal(width or size["width"], height or size["height"], sizes, m, limit, generation.model_name)
        if why is not None:
            raise BadRequest(why)

    def check_hires_not_too_small(generation: Generation) -> None:
        """A hires fix whose size is below the model's size step (hr_scale 0.05 of 64 px) is a 400 now, instead of
        a queued job that fails when it runs; where the model's default size is not known yet (a single file not
        loaded), only with the width and height given."""
        from sdengine.errors import SdengineError
        from sdengine.pipeline import GenerationRequest
        from sdengine.pipeline.hires import check_hires_size
        from sdengine.server.page_api import folder_size, model_size

        kw = generation.kwargs
        if not kw.get("enable_hr"):
            return
        loaded = loaded_pipe(generation)
        size = model_size(generation.model, loaded)
        known = loaded is not None or folder_size(generation.model) is not None
        width, height = kw.get("width"), kw.get("height")
        if not known and (width is None or height is None):
            return
        try:
            w, h = width or size["width"], height or size["height"]
            check_hires_size(GenerationRequest(**kw), w, h, size["multiple"])
        except SdengineError as e:
            raise BadRequest(str(e)) from None

    def check_schedule_steps(generation: Generation) -> None:
        """A schedule longer than the model's training timesteps (steps over it, with a --max-steps over 1000; A1111's
        step rules make one of steps / strength steps: the hires fix's second pass, img2img with img2img_fix_steps)
        is a 400 now, instead of a job that
        fails once it runs (after the model's load); the limit is the loaded pipeline's, else a folder's scheduler
        config's, else 1000 (every Stable Diffusion model's)."""
        from sdengine.diffusion import sampling
        from sdengine.diffusion.schedules import img2img_steps
        from sdengine.errors import SdengineError
        from sdengine.pipeline import GenerationRequest
        from sdengine.pipeline.hires import check_hires_steps, hires_sampler
        from sdengine.server.page_api import train_timesteps

        kw = generation.kwargs
        fixed = kw.get("init_image") is not None and kw.get("strength_rule") == "a1111_fix_steps"
        if not kw.get("enable_hr") and not fixed and int(kw.get("steps") or 0) <= 1000:
            return  # nothing over any model's schedule (a --max-steps over 1000 is checked below)
        loaded = loaded_pipe(generation)
        schedule = getattr(loaded, "noise_schedule", None)
        limit = int(schedule.num_train_timesteps) if schedule is not None else train_timesteps(generation.model)
        if int(kw.get("steps") or 0) > limit:
            raise BadRequest(f"steps must be at most {limit} (the model's training timesteps), got {kw['steps']}")
        try:
            r = GenerationRequest(**kw)
            sampler = sampling.resolve(r.sampler, r.schedule)[0]
            if r.enable_hr and (r.hr_sampler or r.hr_schedule is not None):
                hr_sampler = hires_sampler(r)[0]
            else:
                hr_sampler = sampler
            total = img2img_steps(int(r.steps), float(r.strength), r.strength_rule, sampler)[0] if fixed else 0
        except (SdengineError, ValueError, TypeError):
            return  # a bad sampler or field: the build or the job names it, as before
        if fixed:
            if total > limit:
                raise BadRequest(
                    f"strength {r.strength} with {r.steps} steps and img2img_fix_steps needs a schedule of {total} "
                    f"steps (steps / strength), over the model's {limit}: raise strength or lower the steps"
                )
        if r.enable_hr:
            try:
                check_hires_steps(r, hr_sampler, limit)
            except SdengineError as e:
                raise BadRequest(str(e)) from None

    def check_family_settings(generation: Generation) -> None:
        """What the job's model family does not take is a 400 now (never a setting silently dropped, nor a job
        that fails once it runs): a family's own settings on another family (distilled_cfg_scale on anything but
        FLUX.1 [dev], shift or sd3 settings on anything but SD3, sdxl settings on anything but SDXL) and the U-Net
        settings SD3 and Flux refuse (their pipelines' one-line reasons). The family is the loaded pipeline's, else
        read from the model's folder or file; when it cannot be told the job says it when it runs."""
        from sdengine.errors import SdengineError
        from sdengine.pipeline import GenerationRequest
        from sdengine.server.page_api import (
            family_before_load,
            family_of_pipe,
            flux2_dev_before_load,
            flux_distilled_before_load,
            transformer_blocks_before_load,
        )

        kw = generation.kwargs
        loaded = loaded_pipe(generation)
        family = family_of_pipe(loaded) if loaded is not None else family_before_load(generation.model)
        if family is None:
            return
        name = generation.model_name
        flux2_dev = family == "flux2" and (
            bool(getattr(loaded, "dev", False)) if loaded is not None else flux2_dev_before_load(generation.model)
        )
        if kw.get("distilled_cfg_scale") is not None and not flux2_dev:  # FLUX.2 [dev] takes it too
            if family != "flux":
                raise BadRequest(f"distilled_cfg_scale applies to FLUX.1 [dev] models only; {name} is not a Flux model")
            dev = loaded.guidance_distilled if loaded is not None else flux_distilled_before_load(generation.model)
            if dev is False:
                raise BadRequest(
                    f"distilled_cfg_scale applies to FLUX.1 [dev] models only; {name} is [schnell]-like (no "
                    "guidance embedding): drop it"
                )
        if kw.get("shift") is not None and family != "sd3":
            why = "Flux shifts its schedule by the image size" if family == "flux" else f"{name} is not one"
            raise BadRequest(f"shift applies to SD3 models only; {why}")
        if kw.get("sd3") is not None and family != "sd3":
            raise BadRequest(f"sd3 settings apply to SD3 models only; {name} is not one")
        if kw.get("sdxl") is not None and family != "sdxl":  # (an SDXL refiner file reads "sdxl": its job says it)
            raise BadRequest(f"sdxl settings apply to SDXL models only; {name} is not one")
        edit = family == "qwen_image" and is_qwen_edit(generation, loaded)
        if kw.get("reference_images") and family not in ("flux", "flux2") and not edit:  # (flux2: klein edit)
            raise BadRequest(f"reference_images are FLUX.1 Kontext's; {name} is not a Flux model")
        if kw.get("control_image") is not None and family != "flux":
            raise BadRequest(
                f"control_image is the control map of FLUX.1 Depth / Canny; {name} is not a Flux model (a ControlNet "
                "takes its map in controlnets)"
            )
        if kw.get("redux"):  # FLUX.1 Redux: FLUX.1 models only
            from sdengine.server.redux import check_family

            check_family(kw["redux"], family, name)
        if kw.get("ip_adapters") and family not in ("sd3", "chroma", "qwen_image", "z_image", "flux2"):  # (refuse all)
            from sdengine.server.ip_adapters import check_adapter_family

            check_adapter_family(kw["ip_adapters"], family == "flux", name)
        if family not in ("sd3", "flux", "chroma", "qwen_image", "z_image", "flux2"):
            return
        try:
            r = GenerationRequest(**kw)
        except TypeError:
            return  # the build checked the fields; the job names anything else
        try:
            if family == "sd3":
                from sdengine.pipeline.sd3 import SD3Options, refusals

                reasons = refusals(r)
                if reasons:
                    raise BadRequest(f"{reasons[0]} ({name} is an SD3 model)")
                if kw.get("sd3") is not None:
                    if loaded is not None:
                        blocks = getattr(getattr(getattr(loaded, "unet", None), "config", None), "num_layers", None)
                    else:
                        blocks = transformer_blocks_before_load(generation.model)
                    SD3Options.coerce(kw["sd3"], None if blocks is None else int(blocks))
            elif loaded is not None:  # Flux, Chroma: the pipeline's own check (what it refuses, one line each)
                loaded.check_request(r)
            elif family == "qwen_image" and edit:  # Qwen-Image-Edit not loaded yet: its refusals
                from sdengine.pipeline.qwen_image_edit import edit_refusals
                from sdengine.server.page_api import qwen_edit_plus_before_load

                plus = qwen_edit_plus_before_load(generation.model)
                reasons = edit_refusals(r, plus)
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a Qwen-Image-Edit{'-2509' if plus else ''} model")
            elif family == "qwen_image":  # Qwen-Image not loaded yet: its refusals, without the model
                from sdengine.pipeline.qwen_image import qwen_refusals

                reasons = qwen_refusals(r)
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a Qwen-Image model")
            elif family == "flux2":  # FLUX.2 not loaded yet: its refusals, without the model
                from sdengine.pipeline.flux2 import distilled_cfg_refusal, flux2_refusals
                from sdengine.server.page_api import flux2_distilled_before_load

                reasons = flux2_refusals(r, dev=flux2_dev)
                if not flux2_dev and flux2_distilled_before_load(generation.model):
                    reasons += [why for why in [distilled_cfg_refusal(r.cfg_scale, name)] if why]
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a FLUX.2 model")
            elif family == "z_image":  # Z-Image not loaded yet: its refusals, without the model
                from sdengine.pipeline.z_image import z_image_refusals

                reasons = z_image_refusals(r)
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a Z-Image model")
            elif family == "chroma":  # Chroma not loaded yet: its refusals, without the model
                from sdengine.pipeline.chroma import chroma_refusals

                reasons = chroma_refusals(r)
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a Chroma model")
            else:  # Flux not loaded yet: the same refusals, without the model
                from sdengine.pipeline.flux import refusals as flux_refusals

                reasons = flux_refusals(r)
                if reasons:
                    raise BadRequest(f"{reasons[0]}; {name} is a Flux model")
        except SdengineError as e:
            raise BadRequest(str(e)) from None

    def native_refiner(generation: Generation, req: JobRequest) -> None:
        """The job's ``refiner`` (an SDXL base -> refiner hand-off, the Python API's ``generate_with_refiner``):
        what the hand-off cannot run is a 400 before any job is queued (its settings, by the pipeline's own check;
        a model that is not SDXL, by the loaded pipeline or the model's files; the job's own model). A switch at 1
        leaves the refiner no step: the job's model runs alone, said in the job's notes."""
        from sdengine.errors import SdengineError
        from sdengine.pipeline import GenerationRequest
        from sdengine.pipeline.sdxl import check_hand_off
        from sdengine.server.page_api import sdxl_before_load

        assert req.refiner is not None
        ref = services.catalog.resolve_model(req.refiner)  # a 400 naming the models for an unknown one
        name = services.catalog.model_name_of(ref)
        if ref == generation.model:
            raise BadRequest(f"refiner: {name!r} is the job's own model; name another SDXL model, or leave refiner out")
        loaded = loaded_pipe(generation)
        base = hasattr(loaded, "generate_with_refiner") if loaded is not None else sdxl_before_load(generation.model)
        if base is False:
            raise BadRequest(f"refiner: a refiner needs an SDXL base model; {generation.model_name!r} is not one")
        if sdxl_before_load(ref) is False:
            raise BadRequest(f"refiner: {name!r} is not an SDXL model (a refiner must be one)")
        if req.refiner_switch_at >= 1:  # no step reaches the switch (A1111 runs no refiner then either)
            generation.notes.append(f"refiner_switch_at 1: no step reaches the refiner {name!r}; the model ran alone")
            return
        try:
            request = GenerationRequest(**generation.kwargs)
            check_hand_off(request, req.refiner_switch_at, req.refiner_switch_rule, req.refiner_hires_pass)
        except SdengineError as e:
            raise BadRequest(f"refiner: {e}") from None
        generation.refiner, generation.refiner_name = ref, name
        generation.refiner_switch_at = float(req.refiner_switch_at)
        generation.refiner_switch_rule = req.refiner_switch_rule
        generation.hires_refiner_pass = req.refiner_hires_pass

    def precheck(generation: Generation) -> None:
        check_family_settings(generation)
        check_size_multiple(generation)
        check_not_too_large(generation)
        check_hires_not_too_small(generation)
        check_tiny_vae(generation)
        check_pag_layers(generation)
        check_freeu_blocks(generation)
        check_deep_shrink_block(generation)
        check_sag_size(generation)
        check_hypertile_layers(generation)
        check_schedule_steps(generation)

    services.precheck = precheck

    @app.post("/v1/jobs", status_code=202, tags=["native"])
    async def create_job(req: JobRequest) -> dict[str, Any]:
        """Queue a generation; answers at once with the job id and its place in the queue (0 = next)."""
        hand_off = {"refiner", "refiner_switch_at", "refiner_switch_rule", "refiner_hires_pass"}
        fields = req.model_dump(exclude={"controlnets", "loras", "ip_adapters", *hand_off})
        # an SD3 / Flux model's own defaults for the settings the request leaves out (SD's are the schema's)
        given = req.model_fields_set
        fields.update({k: v for k, v in services.family_defaults(req.model).items() if k not in given})
        fields["ip_adapters"] = [
            IPAdapterRequest(u.model, u.image, u.scale, u.clip_vision, u.negative_rule, start=u.start, end=u.end)
            for u in req.ip_adapters
        ]
        fields["controlnets"] = [
            ControlRequest(
                c.model,
                c.image,
                c.weight,
                c.start,
                c.end,
                c.preprocessor,
                {
                    k: v
                    for k, v in (("low", c.low), ("high", c.high), ("style_fidelity", c.style_fidelity))
                    if v is not None
                },
                c.rule,
                mode=c.mode,
                mask=c.mask,
                union_mode=c.union_mode,
                inpaint_image=c.inpaint_image,
            )
            for c in req.controlnets
        ]
        fields["loras"] = [
            (lo.name, lo.weight if lo.unet_weight is None else (lo.weight, lo.unet_weight)) for lo in req.loras
        ]
        cheap = not req.controlnets and not req.ip_adapters and not req.redux and req.vae is None
        if (
            req.init_image is None
            and req.mask is None
            and not req.reference_images
            and req.control_image is None
            and cheap
        ):
            generation = services.build(**fields)  # no image to decode (nor VAE file to read): cheap, no thread hop
        else:
            generation = await asyncio.to_thread(lambda: services.build(**fields))
        precheck(generation)
        if req.refiner is not None:
            native_refiner(generation, req)
        job, position = services.submit(generation, protocol="native", save=True)
        return {
            "id": job.id,
            "position": position,
            "state": job.state,
            "url": f"/v1/jobs/{job.id}",
            "events": f"/v1/jobs/{job.id}/events",
        }

    @app.get("/v1/jobs", tags=["native"])
    def list_jobs() -> dict[str, Any]:
        """This client's jobs (the admin's: every client's), newest first; ``queued``: every job waiting."""
        jobs = visible(manager.jobs())[-100:]
        return {"jobs": [progress_json(j, services) for j in reversed(jobs)], "queued": manager.queued_count()}

    @app.get("/v1/jobs/{job_id}", tags=["native"])
    def get_job(job_id: str) -> dict[str, Any]:
        return job_json(manager.get(job_id), services)

    @app.delete("/v1/jobs/{job_id}", tags=["native"])
    async def cancel_job(job_id: str) -> dict[str, Any]:
        """Cancel: a queued job leaves the queue; a running one stops after its current sampler step (the
        answer waits for that, at most 60 s)."""
        job = manager.get(job_id)
        if job.state not in FINISHED:
            manager.cancel(job)
            await job.wait_finished(timeout=60.0)
        return job_json(job, services)

    @app.get("/v1/jobs/{job_id}/preview", tags=["native"])
    def job_preview(job_id: str) -> Any:
        job = manager.get(job_id)
        got = job.preview()  # decodes the newest step's latents when nobody watched the job (lazy previews)
        if got is None:
            raise BadRequest("no preview yet")
        from fastapi.responses import Response

        return Response(
            got[0],
            media_type="image/png",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"},
        )

    @app.get("/v1/jobs/{job_id}/events", tags=["native"])
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``progress`` (state, step/steps, eta, a ``preview`` data URL every few steps),
        then one final ``done``, ``failed`` or ``cancelled`` event with the whole job, then the end."""
        job = manager.get(job_id)

        async def stream() -> AsyncIterator[str]:
            sent_version = -1
            sent_preview = -1
            async with aclosing(job.updates(request.is_disconnected)) as updates:
                async for changed in updates:
                    if not changed:
                        yield ": keep-alive\n\n"
                        continue
                    version = job.version
                    if version != sent_version:
                        sent_version = version
                        final = job.state in FINISHED
                        data = progress_json(job, services)
                        if job.preview_source is not None and not final:  # kept before this stream watched
                            await run_in_threadpool(job.preview)
                        if job.preview_png is not None and job.preview_step != sent_preview and not final:
                            sent_preview = job.preview_step
                            data["preview"] = preview_data_url(job)
                        name = job.state if final else "progress"
                        yield f"event: {name}\nid: {version}\ndata: {json.dumps(data)}\n\n"
                        if final:
                            return

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    @app.post("/v1/uploads", status_code=201, tags=["native"])
    async def upload(request: Request) -> dict[str, Any]:
        """An init image, mask or control image: multipart field ``file`` (or ``image``), or the raw image as
        the body with an ``image/*`` content type. Answers ``{id, width, height}``; use the id in a job."""
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            form = await request.form(max_files=1, max_fields=4)
            part = form.get("file") or form.get("image")
            if part is None or isinstance(part, str):
                raise BadRequest("send the image as the multipart file field 'file'")
            data = await part.read()
        elif ctype.startswith("image/") or ctype == "application/octet-stream":
            data = await request.body()
        else:
            raise BadRequest("send multipart/form-data with a 'file' field, or the image with an image/* type")
        upload_id, image = await asyncio.to_thread(services.uploads.add, data, "upload")
        return {"id": upload_id, "width": image.width, "height": image.height}

    @app.get("/v1/images/{name:path}", tags=["native"])
    def get_image(name: str) -> FileResponse:
        """A generated image: only PNG files directly in the outputs folder."""
        from sdengine.io.paths import UnsafePathError, resolve_inside

        if "/" in name or name.startswith(".") or not name.lower().endswith(".png"):
            raise BadRequest(f"image {name!r}: only names of PNG files in the outputs folder are served")
        try:
            path = resolve_inside(config.outputs_dir, name, "image")
        except UnsafePathError as e:
            raise BadRequest(str(e)) from None
        except FileNotFoundError:  # its message named the server's outputs folder (a path a client has no need of)
            raise NotFound(f"image {name!r} not found in the outputs folder") from None
        return FileResponse(path, media_type="image/png", headers={"X-Content-Type-Options": "nosniff"})

    @app.get("/v1/samplers", tags=["native"])
    def samplers() -> dict[str, Any]:
        from sdengine.diffusion import sampling
        from sdengine.diffusion.schedules import A1111_GRID_SAMPLERS

        return {
            "samplers": [
                {
                    "name": s.name,
                    "a1111": s.a1111,
                    "schedules": list(s.schedules),
                    # what A1111's "Schedule type: Automatic" runs with it (the page reads A1111 PNGs by it)
                    "a1111_automatic": sampling.resolve(s.name, "Automatic")[1],
                    # whether A1111's step rules (strength_rule a1111) walk A1111's own grid (DDIM, PLMS)
                    "a1111_grid": s.name in A1111_GRID_SAMPLERS,
                }
                for s in sampling.SAMPLERS.values()
            ],
            "schedules": list(sampling.ALL_SCHEDULES),
            # each schedule's A1111 "Schedule type" label (two may share one: the first is A1111's reading)
            "schedule_labels": {k: sampling.SCHEDULE_A1111[k] for k in sampling.ALL_SCHEDULES},
        }

    @app.get("/v1/loras", tags=["native"])
    def loras() -> dict[str, Any]:
        return {"loras": [{"name": e.name, "builtin": e.builtin} for e in catalog.loras()]}

    @app.get("/v1/vaes", tags=["native"])
    def vaes() -> dict[str, Any]:
        """The VAEs a job's ``vae`` may name (the files and folders of --vaes-dir, then the NAME.vae.safetensors of
        --models-dir: A1111's GET /sdapi/v1/sd-vae list), besides "Automatic" and "None"."""
        return {"vaes": [{"name": e.name} for e in catalog.sd_vaes()], "choices": ["Automatic", "None"]}

    @app.get("/v1/upscalers", tags=["native"])
    def upscalers() -> dict[str, Any]:
        """What a hires fix's ``hr_upscaler`` may name, in order: the latent modes (``kind`` latent), the pixel
        upscalers None and Lanczos (pixel), then the upscaler models of --upscalers-dir by file name without its
        suffix (model; no server path is told)."""
        from sdengine.pipeline.hires import LATENT_UPSCALERS, PIXEL_UPSCALERS

        out = [{"name": n, "kind": "latent"} for n in LATENT_UPSCALERS]
        out += [{"name": n, "kind": "pixel"} for n in PIXEL_UPSCALERS]
        out += [{"name": e.name, "kind": "model"} for e in catalog.upscalers()]
        return {"upscalers": out}

    @app.get("/v1/clip_vision", tags=["native"])
    def clip_visions() -> dict[str, Any]:
        """The CLIP vision encoders of --clip-vision-dir by their path in it (no server path is told)."""
        return {"clip_vision": [{"name": e.name} for e in catalog.clip_visions()]}

    @app.get("/v1/style_models", tags=["native"])
    def style_models() -> dict[str, Any]:
        """FLUX.1 Redux's image encoders (--models-dir's style_models/, ComfyUI's StyleModelLoader's) by name."""
        return {"style_models": [{"name": e.name} for e in catalog.style_models()]}

    @app.get("/v1/ip_adapters", tags=["native"])
    def ip_adapters() -> dict[str, Any]:
        """The IP-Adapter files of --ip-adapters-dir by their path in it (no server path is told)."""
        return {"ip_adapters": [{"name": e.name} for e in catalog.ip_adapters()]}

    @app.get("/v1/controlnets", tags=["native"])
    def controlnets() -> dict[str, Any]:
        from sdengine.control import PREPROCESSORS

        return {
            "controlnets": [{"name": e.name, "builtin": e.builtin} for e in catalog.controlnets()],
            "preprocessors": list(PREPROCESSORS),
        }

    def has_tiny_vae(ref: str) -> bool:
        """Whether jobs on this model may ask for vae_decode "tiny": its folder has a vae_tiny/, or the server
        loads one with every SD model (--tiny-vae; a model it does not fit keeps none, said in the log)."""
        from sdengine.catalog import TINY_VAE_FOLDER
        from sdengine.pipeline import BUILTIN_SD

        folder = BUILTIN_SD.get(ref, Path(ref))
        return config.tiny_vae is not None or (Path(folder) / TINY_VAE_FOLDER / "config.json").is_file()

    def has_tiny_encoder(ref: str) -> bool:
        """Whether jobs on this model may ask for vae_encode "tiny": the tiny VAE it would get has an encoder."""
        from sdengine.catalog import TINY_VAE_FOLDER
        from sdengine.pipeline import BUILTIN_SD
        from sdengine.weights.tiny_vae_file import tiny_vae_has_encoder

        if config.tiny_vae is not None:
            return tiny_vae_has_encoder(config.tiny_vae)
        own = Path(BUILTIN_SD.get(ref, Path(ref))) / TINY_VAE_FOLDER
        return own.is_dir() and tiny_vae_has_encoder(own)

    def model_family(ref: str) -> str | None:
        """The family GET /v1/models tells (page_api.FAMILIES): the loaded pipeline's, else read from the files."""
        from sdengine.server.page_api import family_before_load, family_of_pipe

        loaded = next((w.pipe for w in manager.workers if w.model == ref and w.pipe is not None), None)
        return family_of_pipe(loaded) if loaded is not None else family_before_load(ref)

    def model_kind(ref: str, family: str | None) -> str | None:
        """A Flux model's kind GET /v1/models tells ("plain": [dev] / [schnell] / Kontext, "fill": FLUX.1 Fill,
        "control": FLUX.1 Depth / Canny): the loaded pipeline's, else read from a diffusers folder's configs; a FLUX.2
        model's "klein" or "dev"; None for other families and when not told before the model loads (a single
        file)."""
        if family == "flux2":
            from sdengine.server.page_api import flux2_dev_before_load

            return "dev" if flux2_dev_before_load(ref) else "klein"
        if family != "flux":
            return None
        from sdengine.server.page_api import flux_kind_before_load

        loaded = next((w.pipe for w in manager.workers if w.model == ref and w.pipe is not None), None)
        if loaded is not None and hasattr(loaded, "kind"):
            return str(loaded.kind)
        return flux_kind_before_load(ref)

    @app.get("/v1/models", tags=["native", "openai"])
    def models() -> dict[str, Any]:
        """The models jobs may name (OpenAI's list shape; ``current`` marks the default; ``tiny_vae``: it can
        decode with a tiny VAE; ``tiny_vae_encoder``: encode with one; ``family``: "sd", "sdxl", "sd3", "flux",
        "chroma", "qwen_image", "z_image", "flux2" or "pixel", which settings its jobs take; null when not told
        before the model loads; ``kind``: a Flux model's "plain" (its jobs may take reference_images), "fill" or
        "control" (its jobs take a control_image), a FLUX.2 model's "klein" or "dev", else null; ``defaults``: an
        SD3, Flux, Chroma, Qwen-Image, Z-Image or FLUX.2 model's own steps, cfg_scale, sampler and schedule, which its
        jobs get where they give none)."""
        now = int(time.time())
        current = services.options.get("sd_model_checkpoint")
        data = []
        for e in catalog.models():
            family = model_family(e.ref)
            data.append(
                {
                    "id": e.name,
                    "object": "model",
                    "created": now,
                    "owned_by": "sdengine",
                    "builtin": e.builtin,
                    "current": e.name == current,
                    "tiny_vae": has_tiny_vae(e.ref),
                    "tiny_vae_encoder": has_tiny_encoder(e.ref),
                    "family": family,
                    "kind": model_kind(e.ref, family),
                    "defaults": services.family_defaults(e.name),
                }
            )
        return {"object": "list", "data": data}

    @app.get("/v1/models/{model_id:path}", tags=["native", "openai"])
    def model(model_id: str) -> Any:
        """One entry of GET /v1/models (OpenAI's ``models.retrieve``); an OpenAI name (``gpt-image-1``...) is the
        server's current model, as the image routes take it. Unknown: 404 in OpenAI's shape."""
        from sdengine.server.openai_images import OPENAI_MODEL_PREFIXES

        entries = models()["data"]
        for entry in entries:
            if entry["id"] == model_id:
                return entry
        if model_id.lower().startswith(OPENAI_MODEL_PREFIXES):
            for entry in entries:
                if entry["current"]:
                    return {**entry, "id": model_id}
        message = f"model {model_id!r} does not exist here (GET /v1/models lists them)"
        body = error_body(message, "invalid_request_error")
        body["error"].update(param="model", code="model_not_found")
        return JSONResponse(body, status_code=404)
