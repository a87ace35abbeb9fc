"""FLUX.1 Redux units of the server's requests (the native job's ``redux``, OpenAI's ``extra_body``) ->
:class:`sdengine.pipeline.redux.ReduxUnit` values with the files' paths (the worker loads the files).

A unit names its Redux image encoder (``model``: a name of ``GET /v1/style_models``, the ``.safetensors`` files of
``--models-dir``'s ``style_models/``, as ComfyUI's StyleModelLoader lists them), its SigLIP encoder (``siglip``: a
name of ``GET /v1/clip_vision``; null: the one SigLIP encoder of ``--clip-vision-dir``, read from the files'
headers), its image (an upload id or base64, as the job's other images) and its strength (0 to 10).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from sdengine.server.catalog import Catalog
from sdengine.server.errors import BadRequest
from sdengine.server.units import unit_objects

MAX_REDUX_UNITS = 8  # sdengine.pipeline.redux.MAX_REDUX_UNITS (torch-free here)
MAX_STRENGTH = 10.0
UNIT_KEYS = ("model", "image", "siglip", "strength")


def parse_units(raw: Any, what: str = "redux") -> list[dict[str, Any]]:
    """A list of unit objects (the native job's shape, as OpenAI's JSON body or a form's JSON string sends it) ->
    checked dicts; one-line 400s for another shape or value."""
    out = []
    for k, u in enumerate(unit_objects(raw, what, UNIT_KEYS, MAX_REDUX_UNITS)):
        siglip = u.get("siglip")
        if siglip is not None and (not isinstance(siglip, str) or not siglip):
            raise BadRequest(f"{what}[{k}].siglip must be a name of GET /v1/clip_vision or null")
        s = u.get("strength", 1.0)
        if isinstance(s, bool) or not isinstance(s, int | float) or not math.isfinite(s) or not 0 <= s <= MAX_STRENGTH:
            raise BadRequest(f"{what}[{k}].strength must be a number from 0 to {MAX_STRENGTH:g}, got {s!r}")
        out.append({"model": u["model"], "image": u["image"], "siglip": siglip, "strength": float(s)})
    return out


def _siglip_of(catalog: Catalog, name: str | None, label: str) -> Path:
    """The SigLIP encoder a unit names, else the one SigLIP encoder of --clip-vision-dir (one-line 400s)."""
    from sdengine.weights.redux_file import is_siglip_path

    if catalog.clip_vision_dir is None:
        raise BadRequest(
            f"{label}: Redux needs the SigLIP encoder and the server has none (serve --clip-vision-dir DIR)"
        )
    if name is not None:
        path = catalog.resolve_clip_vision(name)
        if not is_siglip_path(path):
            raise BadRequest(f"{label}: {name} is not a SigLIP encoder (Redux reads sigclip_vision_patch14_384)")
        return path
    found = [e for e in catalog.clip_visions() if is_siglip_path(Path(e.ref))]
    if not found:
        raise BadRequest(
            f"{label}: no SigLIP encoder in --clip-vision-dir (Redux reads sigclip_vision_patch14_384.safetensors)"
        )
    if len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise BadRequest(f"{label}: several SigLIP encoders ({names}): choose one with siglip")
    return Path(found[0].ref)


def build_units(
    catalog: Catalog, raw: Any, image: Callable[[Any, str], Image.Image | None], what: str = "redux"
) -> list[Any]:
    """The pipeline's units of a request's ``redux``: the names resolved inside their folders, the pictures
    decoded (upright by their EXIF orientation, RGB) by ``image``; one-line 400s for anything that cannot run."""
    units = parse_units(raw, what)
    if not units:
        return []
    from sdengine.pipeline.redux import ReduxUnit

    out = []
    for k, u in enumerate(units):
        label = f"{what}[{k}]"
        if catalog.models_dir is None:
            raise BadRequest(
                f"{label}: the server has no style_models/ folder for Redux files (serve --models-dir DIR)"
            )
        model = catalog.resolve_style_model(u["model"])
        siglip = _siglip_of(catalog, u["siglip"], label)
        picture = image(u["image"], f"{label} image")
        if picture is None:
            raise BadRequest(f"{label}: no image")
        picture = ImageOps.exif_transpose(picture).convert("RGB")
        out.append(ReduxUnit(str(model), picture, str(siglip), u["strength"]))
    return out


def check_family(units: Sequence[Any], family: str, name: str) -> None:
    """A one-line 400 for Redux units on a model that is not FLUX.1."""
    if units and family != "flux":
        raise BadRequest(f"redux (FLUX.1 Redux image prompts) applies to FLUX.1 models; {name} is not one")


__all__ = ["MAX_REDUX_UNITS", "UNIT_KEYS", "build_units", "check_family", "parse_units"]
