"""The web page at ``/`` and the few routes it needs beyond the native job API.

* ``GET /`` and ``/static/...``: the page (plain HTML/CSS/JavaScript from ``static/``, no build step).
  Public even with ``--api-key`` (the page holds no secret; it asks for the key and sends it as a bearer
  header on every API call).
* ``GET /v1/sizes``: each model's default size and the multiple its width/height must be, so that the
  page can fill and snap the size fields before a job is sent.
* ``POST /v1/controlnets/preprocess``: the control map a ControlNet unit would get (an upload id or a
  base64 image, a preprocessor and its options) as a PNG, to look at before generating.
* ``GET /v1/gallery``: the PNGs of the outputs folder, newest first, paged, each with its ``parameters``.
* ``DELETE /v1/images/{name}``: removes one image the server wrote from the outputs folder (the gallery's
  *Delete*); any other file there is refused (:func:`written_by_server`).
"""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Query
from fastapi.responses import FileResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from sdengine.server.errors import BadRequest, Forbidden, NotFound

if TYPE_CHECKING:
    from sdengine.server.app import Services

STATIC_DIR = Path(__file__).resolve().parent / "static"
DEFAULT_SIZE, DEFAULT_MULTIPLE = 512, 8  # a single-file checkpoint's size is only known once loaded
GALLERY_MAX_PAGE = 100
# The names the server gives the images it writes: NNNNN-SEED.png (the native, A1111 and OpenAI routes' jobs) and
# PREFIX_NNNNN_.png (ComfyUI's SaveImage); with the metadata each writes (A1111's "parameters", ComfyUI's "prompt")
SERVER_NAMES = (re.compile(r"\d{5,}-\d+\.png", re.ASCII), re.compile(r"[^/\\]+_\d{5,}_\.png", re.ASCII))
SERVER_METADATA = ("parameters", "prompt")


class PreprocessRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image: str = Field(..., min_length=1, description="an upload id (POST /v1/uploads) or a base64 image")
    preprocessor: str = Field("none", max_length=64)
    low: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, description="canny low threshold")
    high: float | None = Field(None, ge=0, le=255, allow_inf_nan=False, description="canny high threshold")


def model_size(ref: str, loaded: Any | None = None) -> dict[str, int]:
    """Default side and size multiple of a model: from its loaded pipeline when a worker holds it, else
    from a diffusers folder's configs (U-Net sample size x the VAE's downscale factor)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    if loaded is not None:
        side, multiple = int(loaded.default_size), int(loaded.size_multiple)
        return {"width": side, "height": side, "multiple": multiple}
    known = folder_size(ref)
    if known is not None:
        return known
    return {"width": DEFAULT_SIZE, "height": DEFAULT_SIZE, "multiple": DEFAULT_MULTIPLE}


def folder_size(ref: str) -> dict[str, int] | None:
    """:func:`model_size` from a diffusers folder's configs (U-Net sample size x the VAE's downscale factor, what
    the loaded pipeline's ``default_size`` is); None when ``ref`` is not such a folder (a single file's size is
    only known once loaded)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.pipeline import BUILTIN_SD

    folder = Path(BUILTIN_SD.get(ref, Path(ref)))
    try:
        vae = json.loads((folder / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        if (folder / "transformer").is_dir():  # SD3 (MMDiT) and Flux: sizes step by the VAE factor x the patches
            net = json.loads((folder / "transformer" / "config.json").read_text())
            patch = int(net.get("patch_size", 1))
            if "sample_size" in net and "pooled_projection_dim" in net and patch > 1:  # SD3: latent sample size
                side, multiple = int(net["sample_size"]) * factor, factor * patch
            else:  # Flux packs 2x2 latent patches itself (its config's patch_size is 1); the VAE's sample size
                side, multiple = int(vae["sample_size"]), factor * 2
        else:
            unet = json.loads((folder / "unet" / "config.json").read_text())
            side, multiple = int(unet["sample_size"]) * factor, max(8, factor)
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    if side <= 0 or factor <= 0 or multiple <= 0:
        return None
    return {"width": side, "height": side, "multiple": multiple}


# The model families the server tells apart (GET /v1/models' ``family``): which settings a job may give
FAMILIES = ("sd", "sdxl", "sd3", "flux", "chroma", "qwen_image", "z_image", "flux2", "pixel")


def family_before_load(ref: str) -> str | None:
    """A model's family (:data:`FAMILIES`), read without loading it: an SD3 or Flux diffusers folder or single file
    (by its ``model_index.json`` or its tensor names), SDXL (:func:`sdxl_before_load`), a built-in pixel model; "sd"
    for any other Stable Diffusion folder or file; None when that cannot be told (an unreadable file)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.pipeline import BUILTIN_PIXEL, BUILTIN_SD

    if ref in BUILTIN_PIXEL:
        return "pixel"
    path = Path(BUILTIN_SD.get(ref, Path(ref)))
    try:  # a file's header is read once (and again when it changes): GET /v1/models asks for every model
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_mtime_ns, st.st_size) if path.is_file() else None
    if key is not None and key in _FAMILIES_READ:
        return _FAMILIES_READ[key]
    family = _family_of_path(ref, path)
    if key is not None:
        if len(_FAMILIES_READ) > 1024:
            _FAMILIES_READ.clear()
        _FAMILIES_READ[key] = family
    return family


_FAMILIES_READ: dict[tuple[str, int, int], str | None] = {}  # model files' families (path, mtime, size)


def _family_of_path(ref: str, path: Path) -> str | None:
    """:func:`family_before_load` of an existing folder or file (SD3 and Flux first: their files are no SD's)."""
    from sdengine.pipeline.chroma_loading import is_chroma_file, is_chroma_folder
    from sdengine.pipeline.flux2_loading import is_flux2_file, is_flux2_folder
    from sdengine.pipeline.flux_loading import is_flux_file, is_flux_folder
    from sdengine.pipeline.qwen_image_loading import is_qwen_image_file, is_qwen_image_folder
    from sdengine.pipeline.z_image_loading import is_z_image_file, is_z_image_folder
    from sdengine.weights.sd3_files import is_sd3

    if is_flux2_folder(path) if path.is_dir() else is_flux2_file(path):  # before Flux: its blocks' names too
        return "flux2"
    if is_z_image_folder(path) if path.is_dir() else is_z_image_file(path):
        return "z_image"
    if is_qwen_image_folder(path) if path.is_dir() else is_qwen_image_file(path):
        return "qwen_image"
    if is_sd3(path):
        return "sd3"
    if is_chroma_folder(path) if path.is_dir() else is_chroma_file(path):  # before Flux: its blocks too
        return "chroma"
    if is_flux_folder(path) if path.is_dir() else is_flux_file(path):
        return "flux"
    xl = sdxl_before_load(ref)
    if xl is None:
        return None
    if not xl and path.is_dir() and not (path / "model_index.json").is_file():
        return "pixel"  # a pixel DDPM folder
    return "sdxl" if xl else "sd"


def family_of_pipe(pipe: Any) -> str:
    """A loaded pipeline's family (:data:`FAMILIES`), by its text side (``text_kind``)."""
    kind = str(getattr(pipe, "text_kind", ""))
    if kind in ("sd3", "flux", "chroma", "qwen_image", "z_image", "flux2", "sdxl"):
        return kind
    return "sd" if getattr(pipe, "vae", None) is not None else "pixel"


def family_defaults_before_load(ref: str) -> dict[str, Any]:
    """An SD3 or Flux model's ``family_defaults`` (the loaded pipeline's, :mod:`sdengine.pipeline.sd3`,
    :mod:`sdengine.pipeline.flux`), read without loading it; {} for the other families."""
    family = family_before_load(ref)
    if family == "sd3":
        from sdengine.pipeline.sd3 import SD3_DEFAULTS

        return dict(SD3_DEFAULTS)
    if family == "chroma":
        from sdengine.pipeline.chroma import CHROMA_CFG, CHROMA_STEPS

        return {"steps": CHROMA_STEPS, "cfg_scale": CHROMA_CFG, "sampler": "euler", "schedule": "normal"}
    if family == "qwen_image":
        from sdengine.pipeline.qwen_image import QWEN_CFG, QWEN_STEPS

        return {"steps": QWEN_STEPS, "cfg_scale": QWEN_CFG, "sampler": "euler", "schedule": "normal"}
    if family == "z_image":
        from sdengine.pipeline.z_image import TURBO_CFG, TURBO_STEPS

        return {"steps": TURBO_STEPS, "cfg_scale": TURBO_CFG, "sampler": "euler", "schedule": "normal"}
    if family == "flux2":  # FLUX.2 [klein]: step-distilled (4 steps, no CFG) or base (50 steps, CFG 4); [dev]
        from sdengine.pipeline.flux2 import BASE_CFG, BASE_STEPS, DEV_STEPS, DISTILLED_STEPS

        if flux2_dev_before_load(ref):  # no CFG; its distilled guidance (4) is the pipeline's default
            return {"steps": DEV_STEPS, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
        distilled = flux2_distilled_before_load(ref)
        if distilled is None:  # a file whose name does not say (its load says so in one line)
            return {}
        if not distilled:
            return {"steps": BASE_STEPS, "cfg_scale": BASE_CFG, "sampler": "euler", "schedule": "normal"}
        return {"steps": DISTILLED_STEPS, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
    if family == "flux":
        from sdengine.pipeline.flux import DEV_STEPS, SCHNELL_STEPS

        schnell = flux_distilled_before_load(ref) is False
        return {"steps": SCHNELL_STEPS if schnell else DEV_STEPS, "cfg_scale": 1.0, "sampler": "euler",
                "schedule": "normal"}  # fmt: skip
    return {}


def transformer_blocks_before_load(ref: str) -> int | None:
    """The joint blocks of an SD3 diffusers folder's MMDiT (its config's ``num_layers``: what skip-layer guidance
    may name); None when not known before loading (a single file)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    try:
        value = json.loads((Path(ref) / "transformer" / "config.json").read_text()).get("num_layers")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def qwen_edit_before_load(ref: str) -> bool:
    """Whether a folder's ``model_index.json`` names Qwen-Image-Edit (``QwenImageEditPipeline``, or 2509's
    ``QwenImageEditPlusPipeline``)."""
    from sdengine.pipeline.qwen_image_loading import pipeline_class

    return pipeline_class(Path(ref.split("\x00")[0])) in ("QwenImageEditPipeline", "QwenImageEditPlusPipeline")


def qwen_edit_plus_before_load(ref: str) -> bool:
    """Whether a folder's ``model_index.json`` names Qwen-Image-Edit-2509 (``QwenImageEditPlusPipeline``)."""
    from sdengine.pipeline.qwen_image_loading import pipeline_class

    return pipeline_class(Path(ref.split("\x00")[0])) == "QwenImageEditPlusPipeline"


def flux_distilled_before_load(ref: str) -> bool | None:
    """Whether a Flux diffusers folder's transformer takes the distilled guidance ([dev]: ``guidance_embeds``);
    None when not known before loading (a single file)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    try:
        net = json.loads((Path(ref) / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return bool(net.get("guidance_embeds", False)) if isinstance(net, dict) else None


def flux2_distilled_before_load(ref: str) -> bool | None:
    """Whether a FLUX.2 [klein] model is step-distilled: a folder's ``model_index.json`` ``is_distilled``, a single
    file's name (:func:`sdengine.pipeline.flux2_loading.distilled_from_name`); None when not told (the load says
    why)."""
    from sdengine.pipeline.flux2_loading import distilled_before_load

    return distilled_before_load(Path(ref.split("\x00")[0]))


def flux2_dev_before_load(ref: str) -> bool:
    """Whether a folder's ``model_index.json`` names FLUX.2 [dev] (``Flux2Pipeline``), or a FLUX.2 transformer file
    has the guidance embedding (``guidance_in``: [dev]'s)."""
    from sdengine.pipeline.flux2_loading import DEV, is_dev_file, is_flux2_file, pipeline_class

    path = Path(ref.split("\x00")[0])
    return pipeline_class(path) == DEV or (path.is_file() and is_flux2_file(path) and is_dev_file(path))


def flux_kind_before_load(ref: str) -> str | None:
    """A Flux diffusers folder's kind (:func:`sdengine.pipeline.flux_fill.flux_kind`: "plain", "fill" or
    "control"), read from its transformer's and VAE's configs without loading it; None when not known before
    loading (a single file, an unreadable or odd config: the load says what is wrong)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.errors import SdengineError
    from sdengine.pipeline.flux_fill import flux_kind

    try:
        net = json.loads((Path(ref) / "transformer" / "config.json").read_text())
        vae = json.loads((Path(ref) / "vae" / "config.json").read_text())
        cin = int(net["in_channels"])
        cout = int(net.get("out_channels") or cin)
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
        return flux_kind(cin, cout, factor, ref)
    except (OSError, ValueError, TypeError, KeyError, AttributeError, SdengineError):
        return None


def train_timesteps(ref: str) -> int:
    """A model's training timesteps (its noise schedule's length), read without loading it: a diffusers folder's
    scheduler config, else 1000 (every Stable Diffusion model's)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.pipeline import BUILTIN_SD

    folder = Path(BUILTIN_SD.get(ref, Path(ref)))
    try:
        value = json.loads((folder / "scheduler" / "scheduler_config.json").read_text()).get("num_train_timesteps")
    except (OSError, ValueError, AttributeError):
        return 1000
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 1000


def sdxl_before_load(ref: str) -> bool | None:
    """Whether a model is an SDXL one (base or refiner), read without loading it: a diffusers folder has a
    ``text_encoder_2`` folder, a ``.safetensors`` file SDXL's ``conditioner.embedders.*`` keys; None when that
    cannot be told (another file kind, an unreadable header)."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.pipeline import BUILTIN_PIXEL, BUILTIN_SD

    if ref in BUILTIN_PIXEL:
        return False
    path = Path(BUILTIN_SD.get(ref, Path(ref)))
    if path.is_dir():
        if (path / "model_index.json").is_file():
            return (path / "text_encoder_2").is_dir()
        return False if (path / "config.json").is_file() else None  # a pixel DDPM folder
    if path.suffix.lower() == ".safetensors" and path.is_file():
        from sdengine.weights.io import read_safetensors_header

        try:
            entries = read_safetensors_header(path)[0]
        except (OSError, ValueError):
            return None
        return any(k.startswith("conditioner.embedders.") for k in entries)
    return None


def max_side_before_load(ref: str) -> int | None:
    """The largest width or height the model takes (the pipeline's ``max_side``: 8x its training size, never
    over 8192), read from a diffusers folder's configs without loading it; None when not known before loading."""
    ref = ref.split("\x00")[0]  # a model with parts given apart (server.dit_parts): its file
    from sdengine.pipeline.core import MAX_SIDE, MAX_SIZE_FACTOR

    known = folder_size(ref)
    return None if known is None else min(MAX_SIDE, MAX_SIZE_FACTOR * known["width"])


def gallery_files(outputs_dir: Path) -> list[Path]:
    """PNG files directly in the outputs folder (what GET /v1/images serves), newest first."""
    if not outputs_dir.is_dir():
        return []
    files = []
    with os.scandir(outputs_dir) as it:
        for e in it:
            if e.name.startswith(".") or not e.name.lower().endswith(".png") or not e.is_file(follow_symlinks=False):
                continue
            files.append((e.stat().st_mtime_ns, e.name))
    files.sort(reverse=True)  # newest first; equal times: the higher file number first
    return [outputs_dir / name for _, name in files]


def png_parameters(path: Path) -> tuple[str | None, int, int]:
    """The ``parameters`` text and size of a PNG, without decoding its pixels (text after the image
    data is not seen; sdengine and A1111 write it before)."""
    text, w, h, _ = png_summary(path)
    return text, w, h


def png_summary(path: Path) -> tuple[str | None, int, int, bool]:
    """:func:`png_parameters` and whether the server wrote the file (:func:`written_by_server`)."""
    try:
        with Image.open(path) as im:
            text = im.info.get("parameters")
            ours = _server_name(path.name) and any(isinstance(im.info.get(k), str) for k in SERVER_METADATA)
            return (None if text is None else str(text)), im.width, im.height, ours
    except (OSError, SyntaxError, ValueError):
        return None, 0, 0, False


def _server_name(name: str) -> bool:
    return any(p.fullmatch(name) for p in SERVER_NAMES)


def written_by_server(path: Path) -> bool:
    """Whether ``path`` is an image the server wrote: a regular file (no link) directly in the outputs folder,
    named as the server names its images, with the metadata it writes. Nothing else there is ever deleted (a
    file a user put in the folder, a link to elsewhere)."""
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return False
    except OSError:
        return False
    return png_summary(path)[3]


def delete_image(outputs_dir: Path, name: str) -> None:
    """Remove the image ``name`` the server wrote from the outputs folder; a clear refusal for anything else."""
    from sdengine.io.paths import UnsafePathError, check_name

    if "/" in name or name.startswith(".") or not name.lower().endswith(".png"):
        raise BadRequest(f"image {name!r}: only names of PNG files in the outputs folder can be deleted")
    try:
        check_name(name, "image")
    except UnsafePathError as e:
        raise BadRequest(str(e)) from None
    path = outputs_dir / name
    if not os.path.lexists(path):
        raise NotFound(f"image {name!r} not found in the outputs folder")
    if not written_by_server(path):
        raise Forbidden(
            f"image {name!r}: not an image this server wrote (only its NNNNN-SEED.png and ComfyUI SaveImage files, "
            "with their metadata, are deleted)"
        )
    try:
        path.unlink()
    except FileNotFoundError:
        raise NotFound(f"image {name!r} not found in the outputs folder") from None


def preprocess_image(services: Services, req: PreprocessRequest) -> bytes:
    from sdengine.control import PREPROCESSORS, ControlNetError, preprocess

    kind = (req.preprocessor or "none").strip().lower()
    if kind not in PREPROCESSORS:
        raise BadRequest(f"unknown preprocessor {req.preprocessor!r}; available: {', '.join(PREPROCESSORS)}")
    img = ImageOps.exif_transpose(services.uploads.image(req.image, "control image")).convert("RGB")
    accepted = set(list(inspect.signature(PREPROCESSORS[kind]).parameters)[1:])
    options = {n: float(v) for n, v in (("low", req.low), ("high", req.high)) if v is not None and n in accepted}
    try:
        out = preprocess(kind, img, **options)
    except (ControlNetError, ValueError) as e:
        raise BadRequest(f"preprocessor {kind}: {e}") from None
    buf = io.BytesIO()
    out.save(buf, format="PNG")
    return buf.getvalue()


def install(app: FastAPI, services: Services) -> None:
    """Add the page and its routes to ``app``."""
    from fastapi.staticfiles import StaticFiles

    class PageFiles(StaticFiles):
        """The page's files, revalidated on every load (``no-cache``; an unchanged file is a 304 by its ETag).
        Without it a browser could keep an older ``app.js`` by heuristic caching after an upgrade, beside the
        new ``index.html`` (which is ``no-cache``): a page whose script and markup disagree."""

        async def get_response(self, path: str, scope: Any) -> Response:
            response = await super().get_response(path, scope)
            response.headers["Cache-Control"] = "no-cache"
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

    config, catalog, manager = services.config, services.catalog, services.manager

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(
            STATIC_DIR / "index.html",
            media_type="text/html",
            headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
        )

    app.mount("/static", PageFiles(directory=STATIC_DIR), name="static")

    @app.get("/v1/sizes", tags=["page"])
    def sizes() -> dict[str, Any]:
        """Per model: ``{width, height, multiple}`` (default size; width and height must be multiples); and this
        server's ``limits`` (``--max-steps``, ``--max-side``, ``--max-batch-size``), which the page's inputs take as
        their maximum."""
        loaded = {w.model: w.pipe for w in manager.workers if w.model is not None and w.pipe is not None}
        return {
            "models": {e.name: model_size(e.ref, loaded.get(e.ref)) for e in catalog.models()},
            "limits": {"steps": config.max_steps, "side": config.max_side, "batch_size": config.max_batch},
        }

    @app.post(
        "/v1/controlnets/preprocess",
        tags=["page"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}},
    )
    async def controlnet_preprocess(req: PreprocessRequest) -> Response:
        """The control image a ControlNet unit with this preprocessor would get, as a PNG."""
        data = await asyncio.to_thread(preprocess_image, services, req)
        return Response(
            data, media_type="image/png", headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
        )

    @app.get("/v1/gallery", tags=["page"])
    def gallery(
        offset: int = Query(0, ge=0, le=10_000_000), limit: int = Query(24, ge=1, le=GALLERY_MAX_PAGE)
    ) -> dict[str, Any]:
        """Images of the outputs folder, newest first: ``{total, offset, items: [{name, url, width, height,
        parameters, deletable}]}`` (``deletable``: the server wrote it, DELETE /v1/images/{name} removes it)."""
        files = gallery_files(Path(config.outputs_dir))
        items = []
        for p in files[offset : offset + limit]:
            text, w, h, ours = png_summary(p)
            items.append(
                {
                    "name": p.name,
                    "url": f"/v1/images/{p.name}",
                    "width": w,
                    "height": h,
                    "parameters": text,
                    "deletable": ours,
                }
            )
        return {"total": len(files), "offset": offset, "limit": limit, "items": items}

    @app.delete("/v1/images/{name:path}", tags=["page"])
    def delete(name: str) -> dict[str, Any]:
        """Remove an image the server wrote (``deletable`` in the gallery) from the outputs folder:
        ``{deleted: name}``; 403 for any other file there, 404 for one that is not there."""
        delete_image(Path(config.outputs_dir), name)
        return {"deleted": name}
