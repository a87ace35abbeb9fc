"""OpenAI's Images API (``/v1/images/generations``, ``/edits``, ``/variations``) over the same queue.

What the ``openai`` client sends maps onto the pipeline this way:

* ``n`` -> ``batch_size`` (1 to 10 as OpenAI's, at most ``--max-batch-size``); ``size`` ``"WxH"``
  (``"auto"``/absent: the model's own size, for edits the input image's size rounded down to a multiple of 8);
  ``response_format`` ``b64_json`` or ``url`` (the PNG in the outputs folder, at ``/v1/images/NAME``, so ``url``
  takes output_format png only); ``output_format`` png, jpeg or webp (exactly: OpenAI refuses ``jpg``) for
  ``b64_json``, ``output_compression`` the JPEG/WebP quality (default 100, as OpenAI's; with png only 100, as
  OpenAI's); ``quality``, ``style``, ``user``, ``background``, ``moderation``, ``safety_identifier``,
  ``complexity``, ``input_fidelity`` have no effect but take only OpenAI's values, and ``background``
  ``transparent`` is refused (these models draw opaque images); edits take no ``style`` and no ``quality`` ``hd``
  (nor do OpenAI's). A request naming one of OpenAI's GPT image models (``gpt-image-...``, ``chatgpt-image-...``) is
  refused what those refuse: ``response_format``, ``style``, ``quality`` ``standard``/``hd`` (its retired DALL-E
  models'), and ``quality`` ``xhigh``/``max`` unless it is one of the GPT image models that take them
  (``gpt-image-2.5-sunburst``, ``gpt-image-2.5-flare`` and their snapshots); ``user`` is a string, never null
  (OpenAI's type; every other field may be null, as OpenAI's). A field a route does not read is refused (400,
  ``param`` the field), as OpenAI refuses an unknown
  parameter; so are OpenAI's ``markup`` and the GIF/SVG fields. A field of the wrong type or out of range is a 400
  too (OpenAI's status; the native routes answer those 422).
* ``edits``: one image (``image``, or the client's one-item list ``image[]``). Several are refused: OpenAI's GPT
  image models combine them into one new picture (the mask being the first image's), which img2img cannot; except
  with ``reference_images`` ``true`` (an extension, ``extra_body``) on a Flux model: then the images (1 to 4) are
  FLUX.1 Kontext's reference images, not an init image (the edit made as OpenAI's GPT image models make it, a
  new picture from the references and the prompt): no mask, no ``strength`` (400s), ``size`` "auto" / absent the
  first reference's size as Kontext fits it, ``reference_auto_resize`` ``false`` keeps their own sizes. Without
  it an edit stays img2img / inpainting on every model (a request never changes meaning with the model it names).
  Likewise ``control_image`` ``true`` (``extra_body``, FLUX.1 Depth / Canny models): the one image is the control
  map (the native job's ``control_image``), or a photo made into one by ``control_preprocessor`` ``canny``; no mask,
  no ``strength`` (400s, as with ``reference_images``, which it does not combine with); ``size`` "auto" / absent the
  image's size floored to a multiple of 16.
  On a Qwen-Image-Edit model, which has no img2img, the image (Edit-2509: 1 to 3, ``image[]``) is the edit's input
  image (the native job's ``reference_images``; no flag needed), read as RGB; a mask or ``strength`` is a 400;
  ``size`` "auto" / absent the last image's size as the pipeline fits it.
  ``mask`` follows OpenAI: fully transparent pixels (alpha 0) are the part to repaint (a mask without one, which
  would edit nothing, is refused); without a mask, the image's own transparency is its mask; with neither, the
  whole image is redrawn (img2img, strength 0.75).
* ``variations``: img2img of the one image with an empty prompt (strength 0.75; ``prompt`` is an extension). It
  takes the fields of OpenAI's (retired, DALL-E 2) variations endpoint only: ``image``, ``model``, ``n``,
  ``size`` (any ``WxH`` here, as generations), ``response_format`` (``url`` when not sent, as OpenAI's
  default there) and ``user``; the GPT image fields (``output_format``, ``quality``, ``style``, ...) are unknown
  parameters there, as they were to OpenAI.
* sdengine extensions (sent with the client's ``extra_body``; OpenAI itself refuses them): ``seed``, ``steps``,
  ``negative_prompt``, ``cfg_scale``, ``sampler``, ``schedule``, ``vae`` (the job's VAE, as the native job's
  ``vae``: a name of ``GET /v1/vaes``, ``None`` or ``Automatic``; its one-line 400 has ``param`` ``vae``),
  ``pag_scale`` and ``pag_layers`` (perturbed-attention guidance, as the native job's), ``freeu``,
  ``freeu_version`` and ``freeu_rule`` (FreeU, as the native job's; in a form ``freeu`` is "b1,b2,s1,s2"),
  ``sag_scale``, ``sag_blur_sigma`` and ``sag_rule`` (self-attention guidance), ``deep_shrink`` (Deep Shrink, the
  native job's object; also, and in a form, a JSON object or "block,factor[,start,end]"), ``hypertile``,
  ``hypertile_hires_only``, ``hypertile_rule`` and ``hypertile_scale_depth`` (HyperTile, as the native job's; in a
  form ``hypertile`` is "tile_size,swap_size,max_depth" and the switches ``true``/``false``), ``hypertile_vae``
  (HyperTile on the VAE's decoder, as the native job's; in a form "tile_size,swap_size,max_depth"),
  ``tiled_diffusion`` (MultiDiffusion, the native job's object, the defaults for settings left out; in a form a
  JSON object), ``ip_adapters`` (IP-Adapter units, the native job's list of objects; in a form one JSON string),
  ``redux`` (FLUX.1 Redux units, the native job's list of objects; in a form one JSON string),
  ``distilled_cfg_scale`` (FLUX.1 [dev]'s distilled guidance), ``shift`` and ``sd3`` (SD3's time shift and
  skip-layer guidance; in a form ``sd3`` is a JSON object), each as the native job's (a model of another family
  answers a 400), ``sdxl`` (SDXL's second prompts, micro-conditioning and a refiner's aesthetic scores, the native
  job's object; in a form a JSON object; an unknown setting or a bad value is a 400 with ``param`` ``sdxl``, a model
  that is not SDXL fails the job as the native job does), and ``strength`` (edits, variations).
* ``generations`` with ``stream: true`` (``n`` 1): Server-Sent Events as OpenAI streams them, ``partial_images``
  (0 to 3) ``image_generation.partial_image`` events spread over the steps (the job's previews: the model's tiny
  VAE's picture when it has one, else the latent colour map scaled up to the image's size), then one
  ``image_generation.completed`` event with the image (the events carry the request's ``quality``); what the
  plain request refuses up front (a size off the model's multiple) is the same 400 before any event; a job that
  fails once it runs is one event with an ``error`` object (the client raises it). ``edits`` stream the same
  way (one image, ``n`` 1), as ``image_edit.*`` events.
* a plain (not streamed) request whose client goes away cancels its jobs (it looks every 0.5 s while waiting).
* ``openapi_paths`` documents the routes as they behave (the fields each reads, the event stream's events).
"""

from __future__ import annotations

import base64
import functools
import io
import json
import re
import time
from contextlib import aclosing
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from sdengine.errors import SdengineError
from sdengine.server.errors import BadRequest, status_of
from sdengine.server.jobs import DONE, FAILED, FINISHED, Job
from sdengine.server.security import decode_image

# names apps hard-code: the server's current model answers
OPENAI_MODEL_PREFIXES = ("dall-e", "gpt-image", "chatgpt-image")
# OpenAI's output_format values (exactly these: OpenAI refuses ``jpg`` and ``PNG``)
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MAX_N = 10  # OpenAI's most images of one request (``n``); this server's --max-batch-size may lower it
# the names of OpenAI's GPT image models, which refuse what only its retired DALL-E models took
GPT_IMAGE_PREFIXES = ("gpt-image", "chatgpt-image")
DALLE_ONLY = {"response_format": None, "style": None, "quality": ("standard", "hd")}
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$", re.ASCII)  # ASCII: "６４x64" is no size (int() took its digits)
DISCONNECT_POLL_S = 0.5  # how often a waiting plain request looks whether its client is still there
MAX_PROMPT = 32000  # OpenAI's limit for its GPT image models, on every route that takes a prompt
# OpenAI's values for the fields that change nothing here: another value is refused, as OpenAI refuses it
CHOICES = {
    "quality": ("auto", "low", "medium", "high", "xhigh", "max", "standard", "hd"),
    "moderation": ("auto", "low"),
    "style": ("vivid", "natural"),
    "background": ("auto", "opaque", "transparent"),
    "complexity": ("low", "medium", "high"),
    "input_fidelity": ("high", "low"),
}
# OpenAI's edits take no ``quality`` ``hd`` (a generations value of DALL-E 3's) and no ``style``
EDIT_QUALITY = tuple(q for q in CHOICES["quality"] if q != "hd")
# sdengine's own fields (the client's ``extra_body``)
EXTENSIONS: tuple[str, ...] = ("seed", "steps", "negative_prompt", "cfg_scale", "sampler", "schedule", "vae")
EXTENSIONS += ("pag_scale", "pag_layers")
EXTENSIONS += ("freeu", "freeu_version", "freeu_rule")
EXTENSIONS += ("sag_scale", "sag_blur_sigma", "sag_rule")
EXTENSIONS += ("deep_shrink", "hypertile", "hypertile_hires_only", "hypertile_rule", "hypertile_scale_depth")
EXTENSIONS += ("hypertile_vae", "tiled_diffusion")
EXTENSIONS += ("ip_adapters", "redux")
EXTENSIONS += ("distilled_cfg_scale", "shift", "sd3")  # the model family's own (Flux [dev]; SD3)
EXTENSIONS += ("sdxl",)  # SDXL's second prompts, micro-conditioning, refiner scores (the native job's object)
EXTENSIONS += ("modules",)  # an SD3 / Flux file's text encoders and VAE (server.dit_parts)
_SHARED = "model n size response_format output_format output_compression quality moderation style background user"
# the fields each route reads, from a JSON body (generations) or a multipart form (edits, variations); any other
# field is refused as OpenAI refuses an unknown parameter, never dropped (a misspelt ``seed`` would draw another
# image). ``safety_identifier``, ``complexity``, ``input_fidelity`` are OpenAI's and change nothing here.
ROUTE_FIELDS: dict[str, tuple[str, ...]] = {
    "generations": ("prompt", *_SHARED.split(), "safety_identifier", "complexity", "stream", "partial_images")
    + EXTENSIONS,
    "edits": ("image", "mask", "prompt", *_SHARED.replace(" style", "").split())
    + ("safety_identifier", "complexity", "input_fidelity")
    + ("stream", "partial_images", *EXTENSIONS, "strength")
    + ("reference_images", "reference_auto_resize")  # FLUX.1 Kontext: the images are references (edit_references)
    + ("control_image", "control_preprocessor"),  # FLUX.1 Depth / Canny: the image is the control map (edit_control)
    # OpenAI's (retired, DALL-E 2) variations took only these: image, model, n, response_format, size, user
    "variations": ("image", "prompt", "model", "n", "size", "response_format", "user", *EXTENSIONS, "strength"),
}
# the response_format a route answers when none is sent: OpenAI's variations answered a URL (DALL-E 2's default)
DEFAULT_RESPONSE_FORMAT = {"generations": "b64_json", "edits": "b64_json", "variations": "url"}
# the qualities only these of OpenAI's GPT image models take (their dated snapshots too); the others refuse them
TOP_QUALITIES = ("xhigh", "max")
TOP_QUALITY_MODELS = ("gpt-image-2.5-sunburst", "gpt-image-2.5-flare")
# OpenAI's fields this server cannot honour: refused with the reason
UNSUPPORTED = {
    "markup": "markup (a drawing over the image to guide the edit) is not supported: send a mask instead",
    "frame_count": "frame_count is for output_format gif, which this server does not make",
    "frame_duration_ms": "frame_duration_ms is for output_format gif, which this server does not make",
    "svg": "svg is for output_format svg, which this server does not make",
}


class GenerationsRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    prompt: str = Field(..., max_length=MAX_PROMPT)
    model: str | None = None
    n: int | None = Field(1, ge=1)  # at most 10 and --max-batch-size: checked (and documented) with that limit
    size: str | None = None
    response_format: str | None = "b64_json"
    output_format: str | None = "png"
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    safety_identifier: str | None = None
    complexity: str | None = None
    output_compression: int | None = Field(None, ge=0, le=100)
    seed: int | None = None
    steps: int | None = None
    negative_prompt: str | None = None
    cfg_scale: float | None = None
    sampler: str | None = None
    schedule: str | None = None
    vae: str | None = None
    sag_scale: float | None = None
    sag_blur_sigma: float | None = None
    sag_rule: Any = None  # checked by the request builder
    pag_scale: float | None = None
    pag_layers: str | list[str] | None = None
    freeu: Any = None  # a list, or "b1,b2,s1,s2" as in a form (checked by the request builder)
    freeu_version: Any = None  # checked by the request builder (a boolean is not a version)
    freeu_rule: Any = None
    # Deep Shrink and HyperTile: checked by patch_fields (a string as in a form), then by the request builder
    deep_shrink: Any = None
    hypertile: Any = None
    hypertile_hires_only: Any = None
    hypertile_rule: Any = None
    hypertile_scale_depth: Any = None
    hypertile_vae: Any = None
    tiled_diffusion: Any = None  # the native job's object (or a JSON string, as in a form): checked by patch_fields
    ip_adapters: Any = None  # the native job's list of units (checked by the request builder)
    redux: Any = None  # FLUX.1 Redux: the native job's list of units (checked by the request builder)
    distilled_cfg_scale: Any = None  # Flux [dev]'s; SD3's shift and sd3 settings: checked by patch_fields, the builder
    shift: Any = None
    sd3: Any = None
    sdxl: Any = None  # SDXL's settings (the native job's object, or a JSON string): checked by patch_fields, builder
    modules: Any = None  # an SD3 / Flux file's text encoders and VAE: checked by the request builder
    stream: bool | None = False
    partial_images: int | None = Field(None, ge=0, le=3)


PARAMS = frozenset(name for fields in ROUTE_FIELDS.values() for name in fields)


class ParamError(BadRequest):
    """A refusal about the request field ``param`` (OpenAI's ``error.param``) that its message does not start with."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def check_fields(route: str, names: Any) -> None:
    """Refuse a field ``route`` does not read (its name is the error's ``param``), as OpenAI refuses one; fields sent
    as ``name[...]`` (``image[]``, ``svg[model]``) are ``name``'s."""
    known = ROUTE_FIELDS[route]
    for raw in names:
        name = str(raw).split("[", 1)[0]
        if name in known:
            continue
        if name in UNSUPPORTED:
            raise ParamError(UNSUPPORTED[name], name)
        if route == "variations" and name in ("stream", "partial_images"):
            raise ParamError(f"{name} is not supported for variations (nor by OpenAI): leave it out", name)
        raise ParamError(f"unknown parameter {name!r}: /v1/images/{route} takes {', '.join(known)}", name)


def param_of(message: str) -> str | None:
    """The request field an error message is about, for OpenAI's ``error.param``: its first word ("size must ...",
    "unknown model ..."), or its first two joined ("tiled diffusion stride ..." is ``tiled_diffusion``'s);
    ``width``/``height`` and a ``WxH`` the model refuses ("1024x1024 is too large ...") come from ``size``."""
    words = message.removeprefix("unknown ").split(" ", 1)
    word = words[0].strip("'\":,")
    two = "_".join(message.removeprefix("unknown ").split(" ", 2)[:2]).strip("'\":,").lower()
    if word not in PARAMS and two in PARAMS:  # the request builder's "tiled diffusion ...", "deep shrink ..."
        return two
    word = "size" if word in ("width", "height") or _SIZE.match(word) else word
    return word if word in PARAMS else None


def openai_errors(route: Any) -> Any:
    """A refused request (400, 404, 413) answered in OpenAI's shape: ``type`` ``invalid_request_error`` (not the
    server's class name) and ``param`` the field it is about, as the client's ``error.param`` reads it."""

    @functools.wraps(route)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await route(*args, **kwargs)
        except SdengineError as exc:
            status = status_of(exc)
            if status not in (400, 404, 413):
                raise  # 429/503 keep the app's answer (Retry-After)
            from sdengine.server.app import error_body, listing_hint

            body = error_body(listing_hint(str(exc), "/v1/"), "invalid_request_error")
            body["error"]["param"] = getattr(exc, "param", None) or param_of(str(exc))
            return JSONResponse(body, status_code=status)

    return wrapper


def freeu_numbers(raw: str) -> list[float] | None:
    """FreeU's factors sent as one string "b1,b2,s1,s2" (a form field): the numbers ("" or blank: None, off);
    how many and their range are the request builder's to check."""
    if not raw.strip():
        return None
    try:
        return [float(x) for x in raw.split(",")]
    except ValueError:
        raise BadRequest(f"freeu must be four numbers b1,b2,s1,s2 (e.g. 1.3,1.4,0.9,0.2), got {raw[:100]!r}") from None


def deep_shrink_of(value: Any) -> dict[str, Any] | None:
    """The ``deep_shrink`` extension as the native job's object (every setting, the defaults for those left out):
    an object of the settings, or a string (a form field) holding a JSON object or "block,factor[,start,end]";
    "" or null: off. A bad one is a one-line 400 with ``param`` ``deep_shrink``."""
    from sdengine.nn.deep_shrink import FIELDS, DeepShrink

    shape = (
        "deep_shrink must be an object {block, factor, start, end, after_skip, downscale_method, upscale_method} "
        'or "block,factor[,start,end]" (e.g. 3,2,0,0.35)'
    )
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError:
                raise ParamError(f"{shape}; got {text[:100]!r} (not JSON)", "deep_shrink") from None
        else:
            parts = [x.strip() for x in text.split(",")]
            try:
                numbers = [float(x) for x in parts]
            except ValueError:
                raise ParamError(f"{shape}; got {text[:100]!r}", "deep_shrink") from None
            if len(numbers) not in (2, 4) or not numbers[0].is_integer():
                raise ParamError(f"{shape}; got {text[:100]!r}", "deep_shrink")
            value = dict(zip(("block", "factor", "start", "end"), [int(numbers[0]), *numbers[1:]], strict=False))
    if not isinstance(value, dict):
        raise ParamError(f"{shape}; got {repr(value)[:100]}", "deep_shrink")
    try:
        settings = DeepShrink.coerce(value)
    except SdengineError as e:
        raise ParamError(f"deep_shrink: {e}", "deep_shrink") from None
    return dict(zip(FIELDS, settings.key, strict=True))


def hypertile_of(value: Any, key: str = "hypertile") -> list[int] | None:
    """The ``hypertile`` (or ``hypertile_vae``: ``key``) extension as the native job's [tile_size, swap_size,
    max_depth]: a list of three whole numbers, or a string (a form field) "tile_size,swap_size,max_depth"; "" or
    null: off. Their ranges are the request builder's to check (its message starts with the field's name)."""
    example = "[128, 3, 3]" if key == "hypertile_vae" else "[256, 3, 3]"
    shape = f"{key} must be three whole numbers [tile_size, swap_size, max_depth] (e.g. {example}), got"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = [int(x.strip()) for x in text.split(",")]
        except ValueError:
            raise ParamError(f"{shape} {text[:100]!r}", key) from None
    if not isinstance(value, list) or len(value) != 3:
        raise ParamError(f"{shape} {repr(value)[:100]}", key)
    for x in value:
        if isinstance(x, bool) or not isinstance(x, int):
            raise ParamError(f"{shape} {repr(value)[:100]}", key)
    return value


def tiled_diffusion_of(value: Any) -> dict[str, Any] | None:
    """The ``tiled_diffusion`` extension as the native job's object, every setting (the defaults for those left
    out), checked as the native job checks it: an object, or a string (a form field) holding one; "" or null: off.
    A bad one is a one-line 400 with ``param`` ``tiled_diffusion``."""
    from pydantic import ValidationError

    from sdengine.server.schemas import TiledDiffusionSpec

    shape = "tiled_diffusion must be an object {window, window_height, stride, circular, view_batch, method}"
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            raise ParamError(f"{shape}; got {text[:100]!r} (not JSON)", "tiled_diffusion") from None
    if not isinstance(value, dict):
        raise ParamError(f"{shape}; got {repr(value)[:100]}", "tiled_diffusion")
    try:
        return TiledDiffusionSpec.model_validate(value).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(x) for x in err["loc"])
        got = repr(err.get("input"))[:100]
        raise ParamError(f"tiled_diffusion.{where}: {err['msg']} (got {got})", "tiled_diffusion") from None


def family_number(value: Any, key: str) -> float | None:
    """``distilled_cfg_scale`` or ``shift`` as a number (a form sends text; "" is not sent); a one-line 400 with
    ``param`` ``key`` for anything else. The ranges and the model's family are the request builder's to check."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = float(value)
        except ValueError:
            raise ParamError(f"{key} must be a number, got {value[:100]!r}", key) from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(f"{key} must be a number, got {repr(value)[:100]}", key)
    return float(value)


OBJECT_SHAPES = {
    "sd3": "sd3 must be an object {skip_guidance_layers, skip_layer_guidance_scale, _start, _stop}",
    "sdxl": "sdxl must be an object {prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size, "
    "negative_*, aesthetic_score, negative_aesthetic_score}",
}


def sd3_of(value: Any, key: str = "sd3") -> dict[str, Any] | None:
    """The ``sd3`` extension (SD3's skip-layer guidance; ``key`` "sdxl": SDXL's settings) as the native job's object:
    an object, or a string (a form field) holding one; "" or null: none. Its keys and ranges are checked by the
    request builder."""
    shape = OBJECT_SHAPES[key]
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        try:
            value = json.loads(text)
        except ValueError:
            raise ParamError(f"{shape}; got {text[:100]!r} (not JSON)", key) from None
    if not isinstance(value, dict):
        raise ParamError(f"{shape}; got {repr(value)[:100]}", key)
    return value


def patch_fields(out: dict[str, Any]) -> dict[str, Any]:
    """Deep Shrink's, HyperTile's and MultiDiffusion's extensions in ``out`` (those sent) checked and in the native
    job's shapes, so that a bad one is a 400 naming its field before the request builder sees it."""
    from sdengine.nn.hypertile import HYPERTILE_RULES

    if "deep_shrink" in out:
        out["deep_shrink"] = deep_shrink_of(out["deep_shrink"])
    if "hypertile" in out:
        out["hypertile"] = hypertile_of(out["hypertile"])
    if "hypertile_vae" in out:
        out["hypertile_vae"] = hypertile_of(out["hypertile_vae"], "hypertile_vae")
    if "tiled_diffusion" in out:
        out["tiled_diffusion"] = tiled_diffusion_of(out["tiled_diffusion"])
    for key in ("distilled_cfg_scale", "shift"):  # numbers (a form's as text), as the native job's
        if key in out:
            out[key] = family_number(out[key], key)
    for key in ("sd3", "sdxl"):
        if key in out:
            out[key] = sd3_of(out[key], key)
    for key in ("hypertile_hires_only", "hypertile_scale_depth"):
        if key in out and not isinstance(out[key], bool):
            raise ParamError(f"{key} must be true or false, got {repr(out[key])[:100]}", key)
    rule = out.get("hypertile_rule")
    if "hypertile_rule" in out and (not isinstance(rule, str) or rule not in HYPERTILE_RULES):
        raise ParamError(f"unknown hypertile_rule {repr(rule)[:100]}; use one of: {', '.join(HYPERTILE_RULES)}",
                         "hypertile_rule")  # fmt: skip
    return {k: v for k, v in out.items() if v is not None}


def check_prompt(prompt: str) -> str:
    """OpenAI's rule for ``prompt``: required, not blank, at most 32000 characters."""
    if not prompt.strip():
        raise BadRequest("prompt is required: say what the image should show")
    if len(prompt) > MAX_PROMPT:
        raise BadRequest(f"prompt may be at most {MAX_PROMPT} characters, got {len(prompt)}")
    return prompt


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    if size in (None, "", "auto"):
        return None, None
    m = _SIZE.match(size.strip())
    if not m:
        raise BadRequest(f"size must be 'WIDTHxHEIGHT' or 'auto', got {size!r}")
    return int(m.group(1)), int(m.group(2))


def encode(image: Image.Image, fmt: str, compression: int | None = None) -> str:
    """The image as base64 ``fmt``; JPEG and WebP at quality ``compression`` (OpenAI's ``output_compression``,
    0-100, default 100)."""
    buf = io.BytesIO()
    options = {} if FORMATS[fmt] == "PNG" else {"quality": 100 if compression is None else compression}
    image.convert("RGB").save(buf, format=FORMATS[fmt], **options)
    return base64.b64encode(buf.getvalue()).decode()


def check_options(get: Any, of: str, route: str = "generations") -> int | None:
    """The OpenAI fields with fixed values (``get(name)`` reads one): unknown values and what these models cannot
    draw are refused, never answered with another image. Returns ``output_compression``."""
    for key, allowed in CHOICES.items():
        allowed = EDIT_QUALITY if (route, key) == ("edits", "quality") else allowed
        value = get(key)
        if value not in (None, "") and value not in allowed:
            raise BadRequest(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    if get("background") == "transparent":
        raise BadRequest(
            "background 'transparent' is not supported: these models draw opaque images (send 'auto' or 'opaque')"
        )
    raw = get("output_compression")
    if raw in (None, ""):
        return None
    try:
        compression = int(raw)
    except (TypeError, ValueError):
        raise BadRequest(f"output_compression must be a whole number in [0, 100], got {raw!r}") from None
    if not 0 <= compression <= 100:
        raise BadRequest(f"output_compression must be in [0, 100], got {compression}")
    if FORMATS[of] == "PNG" and compression < 100:  # OpenAI takes 100 with png (lossless), refuses less
        raise BadRequest(
            f"output_compression {compression} is for output_format jpeg or webp: png is lossless (100 only)"
        )
    return compression


def check_gpt_image(get: Any) -> None:
    """OpenAI's GPT image models (``model`` ``gpt-image-...``, ``chatgpt-image-...``) refuse the fields of its retired
    DALL-E models: ``response_format`` (they always answer ``b64_json``), ``style``, and ``quality`` ``standard``
    or ``hd``; so does this server when the request names one (``get(name)``: a field as sent, None when not)."""
    model = str(get("model") or "")
    if not model.lower().startswith(GPT_IMAGE_PREFIXES):
        return
    quality = get("quality")
    if quality in TOP_QUALITIES and not model.lower().startswith(TOP_QUALITY_MODELS):
        raise ParamError(
            f"quality {quality!r} is not taken with model {model!r} (OpenAI's {' and '.join(TOP_QUALITY_MODELS)} "
            "take it, its other GPT image models refuse it): send low, medium, high or auto, or name this "
            "server's model",
            "quality",
        )
    for key, values in DALLE_ONLY.items():
        value = get(key)
        if value in (None, "") or (values is not None and value not in values):
            continue
        what = f"{key} {value!r}" if values is not None else key
        raise ParamError(
            f"{what} is not taken with model {model!r} (OpenAI's GPT image models refuse it; it was DALL-E's): "
            "leave it out, or name this server's model",
            key,
        )


def openai_mask(mask: Image.Image) -> Image.Image:
    """OpenAI's mask (alpha 0 = edit) -> sdengine's (white = repaint)."""
    if mask.mode not in ("RGBA", "LA") and "transparency" not in mask.info:
        raise BadRequest("mask must be a PNG with an alpha channel: transparent pixels mark what to edit")
    alpha = np.asarray(mask.convert("RGBA"))[..., 3]
    if not (alpha == 0).any():  # the answer would be the image unchanged; often a black-and-white mask, opaque
        raise BadRequest(
            "mask has no fully transparent pixel, so nothing would be edited: alpha 0 marks what to edit "
            "(black or white pixels do not)"
        )
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), "L")


def partial_image(png: bytes, kwargs: dict[str, Any]) -> Image.Image:
    """A job's preview PNG at the image's size: the tiny VAE's preview already is; the latent colour map is
    scaled up (nearest, so its pixels stay visible as what they are)."""
    preview = Image.open(io.BytesIO(png)).convert("RGB")
    w, h = kwargs.get("width"), kwargs.get("height")
    if w and h and preview.size != (w, h):
        preview = preview.resize((int(w), int(h)), Image.Resampling.NEAREST)
    return preview


def has_transparency(image: Image.Image) -> bool:
    if image.mode not in ("RGBA", "LA") and "transparency" not in image.info:
        return False
    return bool((np.asarray(image.convert("RGBA"))[..., 3] == 0).any())


def install(app: FastAPI, services: Any) -> None:
    config, catalog = services.config, services.catalog

    def model_name(name: str | None) -> str | None:
        if not name or name.lower().startswith(OPENAI_MODEL_PREFIXES):
            return None  # the server's current model
        catalog.resolve_model(name)  # unknown or unsafe names: 400 here
        return name

    def check_formats(
        response_format: str | None, output_format: str | None, route: str = "generations"
    ) -> tuple[str, str]:
        rf = response_format or DEFAULT_RESPONSE_FORMAT[route]
        of = output_format or "png"
        if rf not in ("b64_json", "url"):
            raise BadRequest(f"response_format must be b64_json or url, got {rf!r}")
        if of not in FORMATS:
            raise BadRequest(f"output_format must be png, jpeg or webp, got {output_format!r}")
        if rf == "url" and FORMATS[of] != "PNG":  # the URL serves the saved file, which is a PNG
            raise BadRequest(f"response_format url serves the saved PNG: output_format {of} needs b64_json")
        return rf, of

    async def run_all(
        request: Request,
        fields_list: list[dict[str, Any]],
        rf: str,
        of: str,
        prompt: str,
        size: str | None,
        compression: int | None = None,
        quality: str | None = None,
    ) -> Response:
        gens = [await run_in_threadpool(functools.partial(services.build, **f)) for f in fields_list]
        for g in gens:  # a size off the model's multiple: a 400 (param size) before any job is queued
            services.precheck(g)
        jobs: list[Job] = []
        try:
            for g in gens:
                jobs.append(services.submit(g, protocol="openai", save=rf == "url")[0])
        except Exception:
            for j in jobs:  # all or nothing: a 429 on the second image leaves no orphan job behind
                services.manager.cancel(j)
            raise
        if not await wait_or_cancel(request, jobs):
            return Response(status_code=499)  # the client went away: nobody reads this
        failed = [j for j in jobs if j.state != DONE]
        if failed:
            j = failed[0]
            status = 500 if j.state == FAILED and (j.error or "").startswith("internal error") else 400
            from sdengine.server.app import error_body

            message = j.error or j.state
            if status == 400 and param_of(message):  # a field the pipeline refused once the job ran
                body = error_body(message, "invalid_request_error")
                body["error"]["param"] = param_of(message)
            else:
                body = error_body(message, "image_generation_error")
            return JSONResponse(body, status_code=status)
        base = str(request.base_url).rstrip("/")
        data = []
        for j in jobs:
            for im in j.images:
                item: dict[str, Any] = {"revised_prompt": prompt}
                if rf == "url":
                    item["url"] = f"{base}/v1/images/{im.name}"
                elif im.image is not None:
                    item["b64_json"] = encode(im.image, of, compression)
                data.append(item)
        first = jobs[0].images[0].image if jobs and jobs[0].images and jobs[0].images[0].image else None
        return JSONResponse(
            {
                "created": int(time.time()),
                "background": "opaque",
                "data": data,
                "output_format": of,
                "quality": quality or "auto",
                "size": f"{first.width}x{first.height}" if first else size,
                "usage": no_usage(),
            }
        )

    async def wait_or_cancel(request: Request, jobs: list[Job]) -> bool:
        """Wait until every job has finished; False when the client went away first. Its unfinished jobs are
        then cancelled (nobody will read their images), as they are when this request's task is cancelled."""
        try:
            for j in jobs:
                while not await j.wait_finished(DISCONNECT_POLL_S):
                    if await request.is_disconnected():
                        return False
            return True
        finally:
            for j in jobs:
                if j.state not in FINISHED:
                    services.manager.cancel(j)

    def common(req: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in EXTENSIONS:
            if req.get(k) is not None:
                out[k] = req[k]
        if isinstance(out.get("freeu"), str):  # "b1,b2,s1,s2", as in a form
            out["freeu"] = freeu_numbers(out["freeu"])
        return patch_fields(out)

    @app.post("/v1/images/generations", tags=["openai"])
    @openai_errors
    async def generations(req: GenerationsRequest, request: Request) -> Response:
        check_fields("generations", req.model_extra or {})
        if "user" in req.model_fields_set and req.user is None:  # OpenAI's user is a string, never null
            raise ParamError("user must be a string, got null: send the end user's id, or leave user out", "user")
        check_gpt_image(lambda key: getattr(req, key) if key in req.model_fields_set else None)
        rf, of = check_formats(req.response_format, req.output_format)
        compression = check_options(lambda key: getattr(req, key, None), of)
        check_prompt(req.prompt)
        w, h = parse_size(req.size)
        model = model_name(req.model)
        fields = dict(
            model=model,
            prompt=req.prompt,
            width=w,
            height=h,
            batch_size=images_per_request(req.n or 1),
            **{**services.family_defaults(model), **common(req.model_dump())},  # an SD3 / Flux model's own defaults
        )
        if req.stream:
            check_stream(req.n or 1, rf)
            partial = int(req.partial_images or 0)
            return await stream_one(request, fields, of, partial, compression, "image_generation", req.quality)
        if req.partial_images:
            raise BadRequest("partial_images needs stream: true")
        return await run_all(request, [fields], rf, of, req.prompt, req.size, compression, req.quality)

    def check_stream(n: int, rf: str) -> None:
        if n != 1:
            raise BadRequest("stream takes n=1 (one image per streamed request)")
        if rf != "b64_json":
            raise BadRequest("stream sends the image itself: response_format must be b64_json")

    def no_usage() -> dict[str, Any]:
        usage: dict[str, Any] = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        usage["input_tokens_details"] = {"image_tokens": 0, "text_tokens": 0}  # no tokens here
        return usage

    async def stream_one(
        request: Request,
        fields: dict[str, Any],
        of: str,
        partial: int,
        compression: int | None,
        kind: str,
        quality: str | None,
    ) -> StreamingResponse:
        """OpenAI's streamed answer: ``kind`` is ``image_generation`` or ``image_edit`` (the events' prefix);
        the events carry the request's ``quality`` (``auto`` when not given), as OpenAI's do."""
        generation = await run_in_threadpool(functools.partial(services.build, **fields))
        services.precheck(generation)  # a 400 before the stream starts, as the plain request answers it
        job = services.submit(generation, protocol="openai", save=False)[0]

        def event(name: str, data: dict[str, Any]) -> str:
            return f"event: {name}\ndata: {json.dumps({'type': name, **data})}\n\n"

        def common_fields(image: Image.Image) -> dict[str, Any]:
            return {
                "background": "opaque",
                "created_at": int(time.time()),
                "output_format": of,
                "quality": quality or "auto",
                "size": f"{image.width}x{image.height}",
            }

        async def events() -> Any:
            sent = 0  # partial images sent
            try:
                async with aclosing(job.updates(request.is_disconnected)) as updates:
                    async for changed in updates:
                        if not changed:
                            yield ": keep-alive\n\n"
                            continue
                        finished = job.state in FINISHED
                        if not finished and sent < partial and job.preview_png is not None and job.steps:
                            # the k-th partial image once the run is past (k + 1) / (partial + 1) of its steps
                            if job.preview_step * (partial + 1) >= (sent + 1) * job.steps:
                                image = partial_image(job.preview_png, generation.kwargs)
                                data = {"b64_json": encode(image, of, compression), "partial_image_index": sent}
                                yield event(f"{kind}.partial_image", {**data, **common_fields(image)})
                                sent += 1
                        if finished:
                            images = [im.image for im in job.images if im.image is not None]
                            if job.state != DONE or not images:
                                error = {"message": job.error or job.state, "type": "image_generation_error"}
                                yield f"data: {json.dumps({'type': 'error', 'error': error})}\n\n"
                                return
                            b64 = encode(images[0], of, compression)
                            data = {"b64_json": b64, "usage": no_usage(), **common_fields(images[0])}
                            yield event(f"{kind}.completed", data)
                            return
            finally:
                # the client went away (the server cancels this generator, or the loop saw it) before the image:
                # nobody reads it, so the worker is freed
                if job.state not in FINISHED:
                    services.manager.cancel(job)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        )

    async def form_of(request: Request) -> tuple[dict[str, str], dict[str, list[bytes]]]:
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise BadRequest("send multipart/form-data (image, mask, prompt, ...)")
        form = await request.form(max_files=16, max_fields=64, max_part_size=config.max_body_bytes)
        fields: dict[str, str] = {}
        files: dict[str, list[bytes]] = {}
        for key, value in form.multi_items():
            if isinstance(value, str):
                fields[key] = value
            else:
                files.setdefault(key.removesuffix("[]"), []).append(await value.read())
        return fields, files

    def images_per_request(n: int) -> int:
        """``n``, checked against the server's batch limit here so that the error names ``n``, not the
        ``batch_size`` it becomes."""
        most = min(MAX_N, config.max_batch)
        if not 1 <= n <= most:
            where = "on this server" if most < MAX_N else "(OpenAI's limit)"
            raise BadRequest(f"n must be in [1, {most}] {where}, got {n}")
        return n

    def number(fields: dict[str, str], key: str, kind: type, default: Any) -> Any:
        if key not in fields or fields[key] == "":
            return default
        try:
            return kind(fields[key])
        except ValueError:
            raise BadRequest(f"{key} must be a number, got {fields[key]!r}") from None

    def edit_fields(
        fields: dict[str, str], image: Image.Image, mask: Image.Image | None, prompt: str, kontext: bool = False
    ) -> dict:
        w, h = parse_size(fields.get("size"))
        if w is None and not kontext:  # Kontext: the first reference's size, as the pipeline fits it
            w, h = max(8, image.width // 8 * 8), max(8, image.height // 8 * 8)
        if mask is None and has_transparency(image) and not kontext:
            mask = openai_mask(image)
        model = model_name(fields.get("model"))
        out = dict(
            model=model,
            prompt=prompt,
            width=w,
            height=h,
            batch_size=images_per_request(number(fields, "n", int, 1)),
            init_image=image.convert("RGB"),
            mask=mask,
            strength=number(fields, "strength", float, 1.0 if mask is not None else 0.75),
            **common(
                {
                    "seed": number(fields, "seed", int, None),
                    "steps": number(fields, "steps", int, None),
                    "cfg_scale": number(fields, "cfg_scale", float, None),
                    "negative_prompt": fields.get("negative_prompt"),
                    "sampler": fields.get("sampler"),
                    "schedule": fields.get("schedule"),
                    "vae": fields.get("vae") or None,
                    "sag_scale": number(fields, "sag_scale", float, None),
                    "sag_blur_sigma": number(fields, "sag_blur_sigma", float, None),
                    "sag_rule": fields.get("sag_rule") or None,
                    "pag_scale": number(fields, "pag_scale", float, None),
                    "pag_layers": fields.get("pag_layers") or None,  # a form field: one comma-separated string
                    **form_freeu(fields),
                    "deep_shrink": fields.get("deep_shrink") or None,  # a JSON object or "block,factor[,start,end]"
                    "hypertile": fields.get("hypertile") or None,  # "tile_size,swap_size,max_depth"
                    "hypertile_hires_only": form_flag(fields, "hypertile_hires_only"),
                    "hypertile_rule": fields.get("hypertile_rule") or None,
                    "hypertile_scale_depth": form_flag(fields, "hypertile_scale_depth"),
                    "hypertile_vae": fields.get("hypertile_vae") or None,  # "tile_size,swap_size,max_depth"
                    "tiled_diffusion": fields.get("tiled_diffusion") or None,  # a JSON object
                    "ip_adapters": fields.get("ip_adapters") or None,  # a JSON list of units
                    "redux": fields.get("redux") or None,  # a JSON list of units
                    "distilled_cfg_scale": fields.get("distilled_cfg_scale") or None,  # Flux [dev]'s
                    "shift": fields.get("shift") or None,  # SD3's
                    "sd3": fields.get("sd3") or None,  # a JSON object
                    "sdxl": fields.get("sdxl") or None,  # a JSON object
                    # "clip_l.safetensors,t5xxl.safetensors": an SD3 / Flux file's text encoders and VAE
                    "modules": [m.strip() for m in fields["modules"].split(",")] if fields.get("modules") else None,
                }
            ),
        )
        return {**services.family_defaults(model), **out}  # an SD3 / Flux model's own defaults, under those sent

    def form_freeu(fields: dict[str, str]) -> dict[str, Any]:
        """FreeU's form fields: ``freeu`` one comma-separated string "b1,b2,s1,s2" (the factors as numbers),
        ``freeu_version`` a whole number, ``freeu_rule`` as sent; empty ones left out (their defaults)."""
        out: dict[str, Any] = {"freeu": freeu_numbers(fields.get("freeu") or "")}
        out["freeu_version"] = number(fields, "freeu_version", int, None)
        out["freeu_rule"] = fields.get("freeu_rule") or None
        return out

    def form_flag(fields: dict[str, str], key: str) -> bool | None:
        """A true/false form field; None when not sent (its default)."""
        if not fields.get(key, "").strip():
            return None
        value = fields[key].strip().lower()
        if value not in ("true", "false", "1", "0"):
            raise ParamError(f"{key} must be true or false, got {fields[key][:100]!r}", key)
        return value in ("true", "1")

    def flag(fields: dict[str, str], key: str) -> bool:
        value = fields.get(key, "").strip().lower()
        if value not in ("", "true", "false", "1", "0"):
            raise BadRequest(f"{key} must be true or false, got {fields[key]!r}")
        return value in ("true", "1")

    @app.post("/v1/images/edits", tags=["openai"])
    @openai_errors
    async def edits(request: Request) -> Response:
        """multipart: one ``image`` (or ``image[]``), optional ``mask`` (alpha 0 = edit), ``prompt``."""
        fields, files = await form_of(request)
        check_fields("edits", [*fields, *files])
        check_gpt_image(fields.get)
        rf, of = check_formats(fields.get("response_format"), fields.get("output_format"))
        compression = check_options(fields.get, of, "edits")
        prompt = check_prompt(fields.get("prompt", ""))
        stream = flag(fields, "stream")
        partial = number(fields, "partial_images", int, 0)
        if not 0 <= partial <= 3:
            raise BadRequest(f"partial_images must be in [0, 3], got {partial}")
        if partial and not stream:
            raise BadRequest("partial_images needs stream: true")
        if stream:
            check_stream(number(fields, "n", int, 1), rf)
        if form_flag(fields, "control_image"):  # FLUX.1 Depth / Canny: the image is the control map
            if form_flag(fields, "reference_images"):
                raise ParamError(
                    "control_image: true and reference_images: true cannot run together (FLUX.1 Depth / Canny and "
                    "Kontext are different models): send one",
                    "control_image",
                )
            f = await edit_control(fields, files, prompt)
            if stream:
                return await stream_one(request, f, of, partial, compression, "image_edit", fields.get("quality"))
            return await run_all(request, [f], rf, of, prompt, fields.get("size"), compression, fields.get("quality"))
        if fields.get("control_preprocessor", "none") not in ("", "none"):  # "none": the default, harmless
            raise ParamError(
                "control_preprocessor applies with control_image: true (FLUX.1 Depth / Canny)", "control_preprocessor"
            )
        if form_flag(fields, "reference_images"):  # FLUX.1 Kontext: the images are references
            f = await edit_references(fields, files, prompt)
            if stream:
                return await stream_one(request, f, of, partial, compression, "image_edit", fields.get("quality"))
            return await run_all(request, [f], rf, of, prompt, fields.get("size"), compression, fields.get("quality"))
        if form_flag(fields, "reference_auto_resize") is not None:
            raise ParamError(
                "reference_auto_resize applies with reference_images: true (FLUX.1 Kontext)", "reference_auto_resize"
            )
        edit_kind = await run_in_threadpool(services.qwen_edit, model_name(fields.get("model")))
        if edit_kind is not None:  # Qwen-Image-Edit: the image(s) are its input images (reference_images)
            f = await edit_qwen(fields, files, prompt, edit_kind == "plus")
            if stream:
                return await stream_one(request, f, of, partial, compression, "image_edit", fields.get("quality"))
            return await run_all(request, [f], rf, of, prompt, fields.get("size"), compression, fields.get("quality"))
        image = await one_image(files, "edits")
        mask = None
        if files.get("mask"):
            if len(files["mask"]) > 1:
                raise ParamError(f"send one mask, got {len(files['mask'])}", "mask")
            mask = openai_mask(await run_in_threadpool(decode_image, files["mask"][0], "mask", config.max_image_pixels))
            if mask.size != image.size:  # OpenAI refuses a mask that does not cover the image exactly
                w, h = mask.size
                size = f"{image.width}x{image.height}"
                raise BadRequest(f"the mask ({w}x{h}) and the image ({size}) must be the same size")
        f = edit_fields(fields, image, mask, prompt)
        if stream:
            return await stream_one(request, f, of, partial, compression, "image_edit", fields.get("quality"))
        return await run_all(request, [f], rf, of, prompt, fields.get("size"), compression, fields.get("quality"))

    async def edit_references(fields: dict[str, str], files: dict[str, list[bytes]], prompt: str) -> dict[str, Any]:
        """An edit with ``reference_images: true``: its images (``image`` / ``image[]``, 1 to 4) are FLUX.1
        Kontext's references (the native job's ``reference_images``); whether the model takes them is the
        precheck's (a model that is not Flux: a 400). What only img2img / inpainting reads is refused, never
        dropped: a mask, ``strength``."""
        from sdengine.pipeline.request import MAX_REFERENCE_IMAGES

        if files.get("mask"):
            raise ParamError(
                "reference_images: true makes the images FLUX.1 Kontext's references, which take no mask: leave "
                "the mask out (or reference_images, to inpaint)",
                "mask",
            )
        if fields.get("strength", "") != "":
            raise ParamError(
                "strength is img2img's: with reference_images: true the images are FLUX.1 Kontext's references, "
                "not a starting image",
                "strength",
            )
        images = files.get("image", [])
        if not images:
            raise ParamError("send the reference image(s) (field 'image', or 'image[]' for several)", "image")
        if len(images) > MAX_REFERENCE_IMAGES:
            raise ParamError(f"at most {MAX_REFERENCE_IMAGES} reference images, got {len(images)}", "image")
        refs = [
            await run_in_threadpool(decode_image, data, f"image[{k}]", config.max_image_pixels)
            for k, data in enumerate(images)
        ]
        f = edit_fields(fields, refs[0], None, prompt, kontext=True)
        f.update(init_image=None, mask=None, reference_images=[r.convert("RGB") for r in refs])
        f.pop("strength", None)
        resize = form_flag(fields, "reference_auto_resize")
        if resize is not None:
            f["reference_auto_resize"] = resize
        return f

    async def edit_qwen(
        fields: dict[str, str], files: dict[str, list[bytes]], prompt: str, plus: bool
    ) -> dict[str, Any]:
        """An edit on a Qwen-Image-Edit model: its ``image`` (2509: 1 to 3, ``image[]``) are the edit's input
        images (the native job's ``reference_images``), read as RGB (their transparency is not a mask); ``size``
        "auto" / absent: the last image's fitted size (the pipeline's). A mask and ``strength`` are refused, never
        dropped: the model redraws the whole picture from the prompt."""
        from sdengine.pipeline.qwen_image_edit import PLUS_MAX_IMAGES

        kind = "Qwen-Image-Edit-2509" if plus else "Qwen-Image-Edit"
        if files.get("mask"):
            raise ParamError(
                f"mask is not supported by {kind}: it redraws the whole image from the prompt (no inpainting); "
                "leave the mask out",
                "mask",
            )
        if fields.get("strength", "") != "":
            raise ParamError(f"strength is img2img's: {kind} takes the image as its input image", "strength")
        images = files.get("image", [])
        most = PLUS_MAX_IMAGES if plus else 1
        if not images:
            raise ParamError("send the image to edit (field 'image', or 'image[]' for several)", "image")
        if len(images) > most:
            raise ParamError(
                f"{kind} takes {'1 to ' + str(most) + ' images' if plus else 'one image'}, got {len(images)}", "image"
            )
        refs = [
            await run_in_threadpool(decode_image, data, f"image[{k}]", config.max_image_pixels)
            for k, data in enumerate(images)
        ]
        f = edit_fields(fields, refs[-1], None, prompt, kontext=True)
        f.update(init_image=None, mask=None, reference_images=[r.convert("RGB") for r in refs])
        f.pop("strength", None)
        return f

    async def edit_control(fields: dict[str, str], files: dict[str, list[bytes]], prompt: str) -> dict[str, Any]:
        """An edit with ``control_image: true``: its one image is FLUX.1 Depth / Canny's control map (the native
        job's ``control_image``), or a photo made into one by ``control_preprocessor`` (``canny``); text to image
        from it, no init image. ``size`` "auto" / absent: the image's size floored to a multiple of 16 (FLUX.1's
        2x2 patches of the 8x VAE's latent). Whether the model takes it is the precheck's and the pipeline's. A
        mask and ``strength`` (img2img's) are refused, never dropped."""
        if files.get("mask"):
            raise ParamError(
                "control_image: true makes the image FLUX.1 Depth / Canny's control map, which takes no mask: leave "
                "the mask out (or control_image, to inpaint)",
                "mask",
            )
        if fields.get("strength", "") != "":
            raise ParamError(
                "strength is img2img's: with control_image: true the image is FLUX.1 Depth / Canny's control map, "
                "not a starting image",
                "strength",
            )
        image = await one_image(files, "edits")
        f = edit_fields(fields, image, None, prompt, kontext=True)
        if f["width"] is None:
            f["width"], f["height"] = max(16, image.width // 16 * 16), max(16, image.height // 16 * 16)
        f.update(init_image=None, mask=None, control_image=image.convert("RGB"))
        f.pop("strength", None)
        if fields.get("control_preprocessor", "") != "":
            f["control_preprocessor"] = fields["control_preprocessor"]
        return f

    async def one_image(files: dict[str, list[bytes]], route: str) -> Image.Image:
        """The one image of an edit or variation. Several are refused: OpenAI's GPT image models take them as
        references combined into one new picture (its mask is the first image's), which img2img cannot do, and
        editing each on its own would answer something else than asked (``n`` images per input, not ``n``)."""
        images = files.get("image", [])
        if not images:
            raise ParamError(f"send the image (field 'image'){' to edit' if route == 'edits' else ''}", "image")
        if len(images) > 1 and route == "variations":
            raise ParamError(f"send one image, got {len(images)}: a variation starts from one image", "image")
        if len(images) > 1:
            raise ParamError(
                f"send one image, got {len(images)}: this server edits one image per request (OpenAI's GPT image "
                "models combine several into one new picture; on a FLUX.1 Kontext model send reference_images: "
                "true to use them as its references); send one request per image",
                "image",
            )
        return await run_in_threadpool(decode_image, images[0], "image", config.max_image_pixels)

    @app.post("/v1/images/variations", tags=["openai"])
    @openai_errors
    async def variations(request: Request) -> Response:
        fields, files = await form_of(request)
        check_fields("variations", [*fields, *files])
        check_gpt_image(fields.get)
        rf, of = check_formats(fields.get("response_format"), None, "variations")
        compression = check_options(fields.get, of)
        image = await one_image(files, "variations")
        f = edit_fields(fields, image, None, fields.get("prompt", ""))
        f["mask"] = None
        f["strength"] = number(fields, "strength", float, 0.75)
        return await run_all(request, [f], rf, of, f["prompt"], fields.get("size"), compression, fields.get("quality"))


# ------------------------------------------------------------------------------------------------ OpenAPI

_BINARY = {"type": "string", "format": "binary"}


def field_schemas(config: Any) -> dict[str, dict[str, Any]]:
    """Each request field's JSON schema, as the routes check it (``config``: this server's limits)."""
    text = {"type": "string"}
    out: dict[str, dict[str, Any]] = {
        "image": {**_BINARY, "description": "one image (PNG, JPEG or WebP); a one-item list is image[]"},
        "mask": {**_BINARY, "description": "a PNG with alpha, the image's size: alpha 0 marks what to redraw"},
        "prompt": {"type": "string", "maxLength": MAX_PROMPT, "description": "not blank (edits, generations)"},
        "model": {"type": "string", "description": "a listed model, or an OpenAI name (the server's model)"},
        "n": {"type": "integer", "minimum": 1, "maximum": min(MAX_N, config.max_batch), "default": 1},
        "size": {"type": "string", "pattern": r"^(\d{1,5}x\d{1,5}|auto)$", "default": "auto"},
        "response_format": {
            "type": "string",
            "enum": ["b64_json", "url"],
            "default": "b64_json",
            "description": "refused with a gpt-image or chatgpt-image model, as OpenAI refuses it",
        },
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"], "default": "png"},
        "output_compression": {"type": "integer", "minimum": 0, "maximum": 100, "default": 100},
        "stream": {"type": "boolean", "default": False, "description": "n 1, b64_json: a text/event-stream answer"},
        "partial_images": {"type": "integer", "minimum": 0, "maximum": 3, "default": 0},
        "user": text,
        "safety_identifier": text,
        "seed": {"type": "integer", "description": "sdengine: image i of n has seed + i"},
        "steps": {"type": "integer", "minimum": 1, "maximum": config.max_steps, "description": "sdengine"},
        "negative_prompt": {**text, "description": "sdengine"},
        "cfg_scale": {"type": "number", "description": "sdengine"},
        "sampler": {**text, "description": "sdengine: a sampler name (GET /v1/samplers)"},
        "schedule": {**text, "description": "sdengine: a schedule name"},
        "vae": {**text, "description": "sdengine: the job's VAE, a name of GET /v1/vaes, 'None' or 'Automatic'"},
        "strength": {"type": "number", "minimum": 0, "maximum": 1, "description": "sdengine: img2img strength"},
        "reference_images": {
            "type": "boolean",
            "default": False,
            "description": "sdengine (edits, Flux models): the images (1 to 4) are FLUX.1 Kontext's reference "
            "images, not an init image; no mask, no strength",
        },
        "control_image": {
            "type": "boolean",
            "default": False,
            "description": "sdengine (edits, FLUX.1 Depth / Canny models): the one image is the control map (or a "
            "photo, with control_preprocessor), not an init image; no mask, no strength; size auto: the image's, "
            "floored to a multiple of 16",
        },
        "control_preprocessor": {
            "type": "string",
            "default": "none",
            "description": "sdengine (edits with control_image true): 'none' or 'canny'; canny makes the map from a "
            "photo (Canny edges, thresholds 100 / 200); a depth estimator is refused (none here)",
        },
        "reference_auto_resize": {
            "type": "boolean",
            "default": True,
            "description": "sdengine (edits with reference_images true): false keeps each reference's own size "
            "(floored to the model's multiple) instead of Kontext's preferred resolution",
        },
        "sag_scale": {
            "type": "number",
            "minimum": -10,
            "maximum": 10,
            "default": 0,
            "description": "sdengine: self-attention guidance's scale (0: off), as the native job's sag_scale",
        },
        "sag_blur_sigma": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 10,
            "default": 1,
            "description": "sdengine: SAG's blur sigma, as the native job's sag_blur_sigma",
        },
        "sag_rule": {
            "type": "string",
            "enum": ["diffusers", "comfyui"],
            "default": "diffusers",
            "description": "sdengine: where SAG's term goes, as the native job's sag_rule",
        },
        "pag_scale": {
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "default": 0,
            "description": "sdengine: perturbed-attention guidance's scale (0: off), as the native job's pag_scale",
        },
        "pag_layers": {
            "oneOf": [text, {"type": "array", "items": text}],
            "default": "mid",
            "description": "sdengine: the layers PAG perturbs, as the native job's pag_layers (comma-separated in a "
            "form)",
        },
        "freeu": {
            "oneOf": [
                {
                    "type": "array",
                    "items": {"type": "number", "minimum": 0, "maximum": 10},
                    "minItems": 4,
                    "maxItems": 4,
                },
                text,
            ],
            "description": "sdengine: FreeU's [b1, b2, s1, s2] as the native job's freeu (\"b1,b2,s1,s2\" in a form); "
            "none: off",
        },
        "freeu_version": {"type": "integer", "enum": [1, 2], "default": 2, "description": "sdengine: FreeU's version"},
        "freeu_rule": {
            "type": "string",
            "enum": ["width", "diffusers"],
            "default": "width",
            "description": "sdengine: which up blocks FreeU changes, as the native job's freeu_rule",
        },
        "deep_shrink": {
            "oneOf": [
                {"type": "object", "additionalProperties": False, "properties": spec_schema("DeepShrinkSpec")},
                text,
            ],
            "description": "sdengine: Deep Shrink (kohya's, ComfyUI's PatchModelAddDownscale, Forge's Kohya HRFix) as "
            "the native job's deep_shrink object (the defaults for settings left out); a string (a form) holds a JSON "
            'object or "block,factor[,start,end]"; none: off',
        },
        "hypertile": {
            "oneOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "maxItems": 3},
                text,
            ],
            "description": "sdengine: HyperTile's [tile_size (0-2048), swap_size (0-128), max_depth (0-10)] as the "
            'native job\'s hypertile ("tile_size,swap_size,max_depth" in a form); none: off',
        },
        "hypertile_hires_only": {
            "type": "boolean",
            "default": False,
            "description": "sdengine: HyperTile on the hires fix's second pass only, as the native job's",
        },
        "hypertile_rule": {
            "type": "string",
            "enum": ["a1111", "comfyui"],
            "default": "a1111",
            "description": "sdengine: how HyperTile picks its tiles, as the native job's hypertile_rule",
        },
        "hypertile_scale_depth": {
            "type": "boolean",
            "default": True,
            "description": "sdengine: the smallest tile doubles with each depth, as the native job's",
        },
        "hypertile_vae": {
            "oneOf": [
                {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 3, "maxItems": 3},
                text,
            ],
            "description": "sdengine: HyperTile on the VAE's decoder (A1111's Hypertile VAE) as the native job's "
            'hypertile_vae [tile_size, swap_size, max_depth] ("tile_size,swap_size,max_depth" in a form); none: off',
        },
        "tiled_diffusion": {
            "oneOf": [
                {"type": "object", "additionalProperties": False, "properties": spec_schema("TiledDiffusionSpec")},
                text,
            ],
            "description": "sdengine: MultiDiffusion (the latent denoised as overlapping windows) as the native job's "
            "tiled_diffusion object (the defaults for settings left out; a form sends it as a JSON string); none: off",
        },
        "distilled_cfg_scale": {
            "type": "number",
            "minimum": 0,
            "maximum": 100,
            "description": "sdengine: FLUX.1 [dev] models only, the distilled guidance scale, as the native job's "
            "distilled_cfg_scale (none: 3.5); another model answers a 400",
        },
        "shift": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 100,
            "description": "sdengine: SD3 models only, the flow schedule's time shift, as the native job's shift "
            "(none: the model's 3.0); another model answers a 400",
        },
        "sd3": {
            "oneOf": [{"type": "object"}, text],
            "description": "sdengine: SD3 models only, skip-layer guidance {skip_guidance_layers, "
            "skip_layer_guidance_scale, skip_layer_guidance_start, skip_layer_guidance_stop}, as the native job's sd3 "
            "(in a form: one JSON string); another model answers a 400",
        },
        "sdxl": {
            "oneOf": [{"type": "object"}, text],
            "description": "sdengine: SDXL models only, the second prompts, micro-conditioning and a refiner's "
            "aesthetic scores {prompt_2, negative_prompt_2, original_size, crops_coords_top_left, target_size, "
            "negative_original_size, negative_crops_coords_top_left, negative_target_size, aesthetic_score, "
            "negative_aesthetic_score} ([height, width] pixels), as the native job's sdxl (in a form: one JSON "
            "string); a bad one answers a 400",
        },
        "modules": {
            "oneOf": [{"type": "array", "maxItems": 8, "items": {"type": "string"}}, text],
            "description": "sdengine: an SD3 / Flux diffusion-model file's text encoders and VAE when the folders hold "
            "several of a kind, as the native job's modules (Forge's forge_additional_modules; in a form: file names "
            "separated by commas)",
        },
        "ip_adapters": {
            "oneOf": [{"type": "array", "maxItems": 4, "items": {"type": "object"}}, text],
            "description": "sdengine: IP-Adapter units {model, image, scale, clip_vision, negative_rule}, as the "
            "native job's ip_adapters (in a form: one JSON string)",
        },
        "redux": {
            "oneOf": [{"type": "array", "maxItems": 8, "items": {"type": "object"}}, text],
            "description": "sdengine: FLUX.1 Redux units {model, image, siglip, strength}, as the native job's redux "
            "(in a form: one JSON string)",
        },
    }
    for key, allowed in CHOICES.items():  # transparent: refused, so not listed
        out[key] = {"type": "string", "enum": [v for v in allowed if v != "transparent"]}
    out["style"]["description"] = "refused with a gpt-image or chatgpt-image model, as OpenAI refuses it"
    out["quality"]["description"] = (
        "standard and hd refused with a gpt-image or chatgpt-image model; xhigh and max with one other than "
        + " or ".join(f"{m}(-snapshot)" for m in TOP_QUALITY_MODELS)
    )
    return out


def spec_schema(name: str) -> dict[str, Any]:
    """The native job's settings object ``name`` of :mod:`sdengine.server.schemas` (``DeepShrinkSpec``,
    ``TiledDiffusionSpec``: their ranges and defaults) as JSON Schema properties."""
    from sdengine.server import schemas

    props: dict[str, Any] = getattr(schemas, name).model_json_schema()["properties"]
    return {name: {k: v for k, v in prop.items() if k != "title"} for name, prop in props.items()}


def deep_shrink_schema() -> dict[str, Any]:
    """The native job's Deep Shrink settings as JSON Schema properties (:func:`spec_schema`)."""
    return spec_schema("DeepShrinkSpec")


def request_schema(route: str, config: Any) -> dict[str, Any]:
    """The body ``route`` reads: exactly its fields (another is refused), ``prompt`` required where it is."""
    fields = field_schemas(config)
    props = {name: fields[name] for name in ROUTE_FIELDS[route]}
    if route == "edits":
        props["quality"] = {**fields["quality"], "enum": list(EDIT_QUALITY)}
    if route == "variations":  # OpenAI's variations answered a URL unless asked otherwise
        props["response_format"] = {**fields["response_format"], "default": DEFAULT_RESPONSE_FORMAT[route]}
    if route != "generations":  # the openai client sends a list of images as image[]
        props["image[]"] = {"type": "array", "items": _BINARY, "minItems": 1, "maxItems": 1}
    required = {"generations": ["prompt"], "edits": ["prompt"], "variations": []}[route]
    body = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if route != "generations":  # the image, under either name
        body["oneOf"] = [{"required": ["image"]}, {"required": ["image[]"]}]
    return body


def event_schema(kind: str, event: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "type": {"type": "string", "enum": [f"{kind}.{event}"]},
        "b64_json": {"type": "string"},
        "created_at": {"type": "integer"},
        "size": {"type": "string"},
        "quality": {"type": "string"},
        "background": {"type": "string", "enum": ["opaque"]},
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
    }
    if event == "partial_image":
        props["partial_image_index"] = {"type": "integer", "minimum": 0, "maximum": 2}
    else:
        props["usage"] = {"type": "object"}
    return {"type": "object", "properties": props, "required": list(props)}


ERROR_EVENT = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "enum": ["error"]},
        "error": {
            "type": "object",
            "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
            "required": ["message", "type"],
        },
    },
    "required": ["type", "error"],
}

IMAGES_RESPONSE = {
    "type": "object",
    "properties": {
        "created": {"type": "integer"},
        "background": {"type": "string", "enum": ["opaque"]},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "b64_json": {"type": "string"},
                    "url": {"type": "string"},
                    "revised_prompt": {"type": "string"},
                },
                "required": ["revised_prompt"],
            },
        },
        "output_format": {"type": "string", "enum": ["png", "jpeg", "webp"]},
        "quality": {"type": "string"},
        "size": {"type": "string"},
        "usage": {"type": "object"},
    },
    "required": ["created", "background", "data", "output_format", "quality", "size", "usage"],
}


def openapi_paths(spec: dict[str, Any], config: Any, error_ref: dict[str, Any]) -> None:
    """Document these routes as they behave: the request body each reads (JSON, or the multipart form of edits and
    variations, with exactly the fields it takes), the JSON answer, the ``text/event-stream`` answer of
    ``stream: true`` (its events' schemas), and the refusals (400 in OpenAI's shape, never 422)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["ImagesResponse"] = IMAGES_RESPONSE
    for kind in ("image_generation", "image_edit"):
        for event in ("partial_image", "completed"):
            schemas[f"{camel(kind)}{camel(event)}Event"] = event_schema(kind, event)
    schemas["ImageStreamErrorEvent"] = ERROR_EVENT
    paths = spec.get("paths", {})
    errors = {
        "400": "a value refused (error.param: the field), also a wrong type or a value out of range",
        "404": "no such model",
        "413": "body or image over the limits",
        "429": "the queue is full (Retry-After)",
    }
    streamed: dict[str, str | None] = {"generations": "image_generation", "edits": "image_edit", "variations": None}
    for route, prefix in streamed.items():
        op = paths.get(f"/v1/images/{route}", {}).get("post")
        if op is None:
            continue
        if route == "generations":  # the JSON body's own schema (its fields may be null), with the values checked
            body = schemas.get("GenerationsRequest", {})
            fields = field_schemas(config)
            for name, prop in body.get("properties", {}).items():
                for option in [prop, *prop.get("anyOf", [])]:
                    if option.get("type") == "string" and "enum" in fields.get(name, {}):
                        option["enum"] = fields[name]["enum"]
                    if option.get("type") == "integer" and "maximum" in fields.get(name, {}):
                        option["maximum"] = fields[name]["maximum"]  # n: this server's --max-batch-size
            body["additionalProperties"] = False
        else:
            schemas[f"{route.title()}Request"] = request_schema(route, config)
            ref = {"$ref": f"#/components/schemas/{route.title()}Request"}
            op["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": ref}}}
        content: dict[str, Any] = {"application/json": {"schema": {"$ref": "#/components/schemas/ImagesResponse"}}}
        if prefix is not None:
            names = [f"{camel(prefix)}{camel(event)}Event" for event in ("partial_image", "completed")]
            content["text/event-stream"] = {
                "schema": {
                    "description": "with stream: true, Server-Sent Events (`event: TYPE`, `data: JSON`): "
                    "partial_images partial images, then the completed image; a job that fails sends one "
                    "`data:` line with an error object. The schema is each event's data.",
                    "oneOf": [{"$ref": f"#/components/schemas/{n}"} for n in [*names, "ImageStreamErrorEvent"]],
                }
            }
        op["responses"] = {"200": {"description": "the images", "content": content}}
        for code, text in errors.items():
            op["responses"][code] = {"description": text, "content": {"application/json": {"schema": error_ref}}}


def camel(name: str) -> str:
    return "".join(w.title() for w in name.split("_"))
