"""IP-Adapter units of the server's requests (the native job's ``ip_adapters``, OpenAI's ``extra_body``, the A1111
ControlNet extension's IP-Adapter units) -> :class:`sdengine.pipeline.ip_adapter.IPAdapterUnit` values with the
files' paths (the worker loads the files and encodes the pictures, kept for the next job).

Which CLIP vision encoder a unit uses: the one it names (a name of ``GET /v1/clip_vision``), else the one of
``--clip-vision-dir`` whose output width fits the adapter, read from the files' headers (shapes only, no weights):
a plain adapter reads the encoder's image embedding (its projection's width), Plus and full-face adapters its hidden
states (the tower's width). The released adapters each fit one family only (ViT-H/14: embedding 1024, hidden
1280; ViT-bigG/14: embedding 1280, hidden 1664; XLabs' FLUX.1 adapter: ViT-L/14's embedding, 768), so the width
decides; when several files of the folder fit (two
copies of ViT-H), a native job must name one (a 400 lists them) and an A1111 unit takes the first listed. The
A1111 module (``ip-adapter_clip_h``, ``ip-adapter_clip_g``, ...) names the family; an encoder of the other family is
not taken (a ViT-bigG module with an adapter that reads ViT-H's width is a 400 saying so).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from sdengine.server.catalog import Catalog, strip_title
from sdengine.server.errors import BadRequest, redact_paths
from sdengine.server.units import unit_objects

MAX_IP_ADAPTERS = 4  # IP-Adapter units of one request
SCALE_RANGE = (-1.0, 5.0)  # a unit's scale (ComfyUI_IPAdapter_plus's weight range; A1111's 0-2 lies inside it)
NEGATIVE_RULES = ("diffusers", "comfyui")  # sdengine.pipeline.ip_adapter.NEGATIVE_RULES (torch-free here)
UNIT_KEYS = ("model", "image", "scale", "clip_vision", "negative_rule", "start", "end")  # a native / OpenAI unit's

# The CLIP vision families by the tower's width (hidden size), and what each is called in errors
FAMILY_WIDTHS = {"vit-h": 1280, "vit-bigg": 1664}
XLABS_PROJ_WEIGHT = "ip_adapter_proj_model.proj.weight"  # XLabs' flux-ip-adapter (reads ViT-L/14's embedding)
FAMILY_NAMES = {"vit-h": "ViT-H/14", "vit-bigg": "ViT-bigG/14"}
# sd-webui-controlnet's IP-Adapter preprocessors (their names and the labels its newer versions show) -> the
# family of the encoder each runs (its ``clip(config='clip_h' | 'clip_g')``); ip-adapter-auto picks by the model,
# here by the adapter's width (None)
A1111_MODULES: dict[str, str | None] = {
    "ip-adapter_clip_sd15": "vit-h",
    "ip-adapter_clip_h": "vit-h",
    "ip-adapter_clip_sdxl_plus_vith": "vit-h",
    "ip-adapter_clip_sdxl": "vit-bigg",
    "ip-adapter_clip_g": "vit-bigg",
    "ip-adapter-auto": None,
}


@dataclass(frozen=True)
class IPAdapterRequest:
    """One IP-Adapter unit as a route received it: ``model`` a name of ``GET /v1/ip_adapters``, ``image`` an upload
    id, base64 or a decoded picture, ``clip_vision`` a name of ``GET /v1/clip_vision`` or None (chosen by width,
    within ``family`` when an A1111 module names one); ``several``: what None does when several encoders fit
    ("refuse": a 400, "first": the first listed). ``start`` / ``end``: the window of steps (A1111's
    guidance_start / guidance_end), when the pipeline's unit has one."""

    model: str
    image: Any
    scale: float = 1.0
    clip_vision: str | None = None
    negative_rule: str = "diffusers"
    family: str | None = None
    several: str = "refuse"
    start: float = 0.0
    end: float = 1.0


def parse_units(raw: Any, what: str = "ip_adapters") -> list[IPAdapterRequest]:
    """A list of unit objects (the native job's shape, as OpenAI's JSON body or a form's JSON string sends it) ->
    requests; one-line 400s for another shape (the values are checked by :func:`build_units`)."""
    out = []
    for k, u in enumerate(unit_objects(raw, what, UNIT_KEYS)):
        clip = u.get("clip_vision")
        if clip is not None and not isinstance(clip, str):
            raise BadRequest(f"{what}[{k}].clip_vision must be a name of GET /v1/clip_vision or null")
        rule = u.get("negative_rule", "diffusers")
        out.append(
            IPAdapterRequest(
                str(u["model"]),
                u["image"],
                u.get("scale", 1.0),
                clip or None,
                rule if rule is not None else "",
                start=u.get("start", 0.0),
                end=u.get("end", 1.0),
            )
        )
    return out


# -- the files' widths, from their headers (kept per file: path, size, modification time) -----------------------

_WIDTHS: dict[tuple[str, int, int], Any] = {}
_WIDTHS_LOCK = threading.Lock()


def _kept(path: Path, read: Callable[[Path], Any]) -> Any:
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _WIDTHS_LOCK:
        if key in _WIDTHS:
            return _WIDTHS[key]
    value = read(path)
    with _WIDTHS_LOCK:
        if len(_WIDTHS) > 256:
            _WIDTHS.clear()
        _WIDTHS[key] = value
    return value


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensors' shapes of a weights file: a safetensors header, or a weights-only pickle (memory-mapped, its
    nested ``image_proj`` / ``ip_adapter`` groups flattened as ``group.name``)."""
    from sdengine.weights.io import PICKLE_SUFFIXES, load_pickle_checkpoint, read_safetensors_header

    if path.suffix.lower() in PICKLE_SUFFIXES:
        out: dict[str, tuple[int, ...]] = {}

        def walk(obj: Mapping[str, Any], prefix: str) -> None:
            for k, v in obj.items():
                if isinstance(v, Mapping):
                    walk(v, f"{prefix}{k}.")
                elif hasattr(v, "shape"):
                    out[f"{prefix}{k}"] = tuple(int(n) for n in v.shape)

        walk(load_pickle_checkpoint(path), "")
        return out
    header = read_safetensors_header(path)[0]
    return {k: tuple(int(n) for n in e["shape"]) for k, e in header.items()}


def adapter_file_kind(path: Path) -> tuple[str, int]:
    """(kind, the CLIP width it reads) of an IP-Adapter file, by its image projection's shapes (a safetensors
    header; no weights read): ``plain`` reads the image embedding, ``plus`` (a resampler) and ``full`` (full face:
    an MLP) the hidden states. A file that is not one (or a FaceID one) is a one-line WeightsError."""
    from sdengine.weights.io import WeightsError

    sd = _shapes(path)
    if len(sd.get(XLABS_PROJ_WEIGHT, ())) == 2:  # XLabs' flux-ip-adapter: the plain projection
        return "plain", sd[XLABS_PROJ_WEIGHT][1]
    faceid = "image_proj.norm.weight" in sd and "image_proj.proj.0.weight" in sd
    if faceid or any(k.startswith("image_proj.perceiver_resampler.") for k in sd):
        raise WeightsError(f"{path}: IP-Adapter FaceID files are not supported (an id-embedding projection)")
    if len(sd.get("image_proj.proj_in.weight", ())) == 2:  # Plus: the resampler reads the hidden states
        return "plus", sd["image_proj.proj_in.weight"][1]
    if "image_proj.proj.3.weight" in sd and len(sd.get("image_proj.proj.0.weight", ())) == 2:  # full face: an MLP
        return "full", sd["image_proj.proj.0.weight"][1]
    if len(sd.get("image_proj.proj.weight", ())) == 2:
        return "plain", sd["image_proj.proj.weight"][1]
    raise WeightsError(f"{path}: not an IP-Adapter file (no image_proj.proj / proj_in weights; names {sorted(sd)[:3]})")


def adapter_file_family(path: Path) -> str:
    """The model family an IP-Adapter file is made for, by its names (no weights read): "flux" for XLabs'
    flux-ip-adapter names or key / value biases (diffusers' converted Flux groups), else "unet" (SD 1.x / 2.x /
    SDXL)."""
    flux_names = ("ip_adapter_proj_model.", "double_blocks.")
    flux = any(k.startswith(flux_names) or k.endswith((".to_k_ip.bias", ".to_v_ip.bias")) for k in _shapes(path))
    return "flux" if flux else "unet"


def check_adapter_family(units: Sequence[Any], flux_model: bool, name: str) -> None:
    """A one-line 400 for a unit whose IP-Adapter file is made for another model family than the model ``name``
    (an SD adapter on a FLUX.1 model, XLabs' Flux adapter on an SD one); a file that cannot be read is left to the
    job, which names what is wrong with it."""
    from sdengine.errors import SdengineError

    for k, u in enumerate(units):
        path = getattr(u, "adapter", None)
        if not isinstance(path, str | Path):
            continue
        try:
            family = adapter_file_family(Path(path))
        except (SdengineError, OSError):
            continue
        if (family == "flux") != flux_model:
            what = "a FLUX.1 (XLabs flux-ip-adapter)" if family == "flux" else "an SD 1.x / 2.x / SDXL (U-Net)"
            model = "a FLUX.1 model" if flux_model else "not a FLUX.1 model"
            raise BadRequest(f"IP-Adapter unit {k}: {Path(path).name} is {what} IP-Adapter and {name} is {model}")


def _adapter_input(path: Path) -> tuple[bool, int]:
    """(reads hidden states, the CLIP width it reads) of an IP-Adapter file (:func:`adapter_file_kind`)."""
    kind, width = adapter_file_kind(path)
    return kind != "plain", width


def encoder_file_info(path: Path) -> dict[str, Any]:
    """A CLIP vision file's or folder's ``width`` (the tower's hidden size), ``layers`` (its transformer layers) and
    ``projection`` (the image embedding's width, None without a projection), by its shapes (no weights read from a
    safetensors file). One that is not an encoder is a one-line WeightsError."""
    from sdengine.weights.clip_vision_file import FOLDER_WEIGHTS
    from sdengine.weights.io import WeightsError

    where = path
    if path.is_dir():
        where = next((path / n for n in FOLDER_WEIGHTS if (path / n).is_file()), path / FOLDER_WEIGHTS[0])
    sd = _shapes(where)
    emb = sd.get("vision_model.embeddings.class_embedding") or sd.get("embeddings.class_embedding")
    if emb is None or len(emb) != 1:
        raise WeightsError(f"{where}: not a CLIP vision encoder (no vision_model.embeddings.class_embedding)")
    proj = sd.get("visual_projection.weight")
    layers = set()
    for k in sd:
        rest = k.removeprefix("vision_model.").removeprefix("encoder.layers.")
        if rest != k.removeprefix("vision_model.") and rest.split(".", 1)[0].isdigit():
            layers.add(int(rest.split(".", 1)[0]))
    return {
        "width": emb[0],
        "layers": len(layers),
        "projection": proj[0] if proj is not None and len(proj) == 2 else None,
    }


def _encoder_widths(path: Path) -> tuple[int, int | None]:
    """(hidden width, image embedding width or None) of a CLIP vision file or folder (:func:`encoder_file_info`)."""
    info = encoder_file_info(path)
    return info["width"], info["projection"]


def adapter_input(path: Path, name: str) -> tuple[bool, int]:
    """:func:`_adapter_input` of a listed file, kept; a one-line 400 naming ``name`` for a file it cannot read."""
    from sdengine.errors import SdengineError

    try:
        return _kept(path, _adapter_input)  # type: ignore[no-any-return]
    except (SdengineError, OSError) as e:
        raise BadRequest(f"IP-Adapter {name!r}: {redact_paths(str(e))}") from None


def encoder_widths(path: Path, name: str) -> tuple[int, int | None]:
    """:func:`_encoder_widths` of a listed encoder, kept; a one-line 400 naming ``name`` for one it cannot read."""
    from sdengine.errors import SdengineError

    try:
        return _kept(path, _encoder_widths)  # type: ignore[no-any-return]
    except (SdengineError, OSError) as e:
        raise BadRequest(f"CLIP vision {name!r}: {redact_paths(str(e))}") from None


def family_of(hidden: int) -> str | None:
    """The CLIP vision family of a tower width (None: another width, a test's tiny encoder)."""
    return next((f for f, w in FAMILY_WIDTHS.items() if w == hidden), None)


def gives(widths: tuple[int, int | None], reads_hidden: bool) -> int:
    """The width an encoder of ``widths`` gives an adapter (pipeline.ip_adapter.encoder_width's rule)."""
    hidden, projection = widths
    return hidden if reads_hidden else (projection or hidden)


def choose_clip_vision(catalog: Catalog, req: IPAdapterRequest, adapter: Path, label: str) -> Path:
    """The CLIP vision encoder of unit ``label``: the one it names, else the one of --clip-vision-dir whose width
    fits the adapter (module docstring); one-line 400s when none does, or several do and ``req.several`` is
    "refuse"."""
    reads_hidden, width = adapter_input(adapter, req.model)
    what = "hidden states" if reads_hidden else "image embeddings"
    if catalog.clip_vision_dir is None:
        raise BadRequest(
            f"{label}: an IP-Adapter needs a CLIP vision encoder and the server has none (serve --clip-vision-dir DIR)"
        )
    if req.clip_vision is not None:
        path = catalog.resolve_clip_vision(req.clip_vision)
        got = gives(encoder_widths(path, req.clip_vision), reads_hidden)
        if got != width:
            raise BadRequest(
                f"{label}: {req.model} reads CLIP vision {what} of width {width} and {req.clip_vision} gives {got}; "
                "choose an encoder it fits (ViT-H/14 for the SD 1.5 and *_vit-h adapters, ViT-bigG/14 for "
                "ip-adapter_sdxl, ViT-L/14 for XLabs flux-ip-adapter) or leave clip_vision null"
            )
        return path
    listed = catalog.clip_visions()
    fits, have = [], []
    for e in listed:
        widths = encoder_widths(Path(e.ref), e.name)
        fam = family_of(widths[0])
        have.append(f"{e.name} ({gives(widths, reads_hidden)})")
        if gives(widths, reads_hidden) == width and (req.family is None or fam in (None, req.family)):
            fits.append(e)
    if not fits:
        family = f" of the {FAMILY_NAMES[req.family]} family its module runs" if req.family else ""
        listing = ", ".join(have) or "none"
        raise BadRequest(
            f"{label}: {req.model} reads CLIP vision {what} of width {width}, and no encoder{family} in "
            f"--clip-vision-dir gives it (have: {listing})"
        )
    if len(fits) > 1 and req.several == "refuse":
        names = ", ".join(e.name for e in fits)
        raise BadRequest(
            f"{label}: several CLIP vision encoders fit {req.model} ({names}): choose one with clip_vision"
        )
    return Path(fits[0].ref)


def _finite(value: Any, what: str, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise BadRequest(f"{what} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise BadRequest(f"{what} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def has_window() -> bool:
    """Whether the pipeline's IP-Adapter unit takes a window of steps (``start`` / ``end``)."""
    from sdengine.pipeline.ip_adapter import IPAdapterUnit

    return {"start", "end"} <= {f.name for f in dataclasses.fields(IPAdapterUnit)}


def build_units(
    catalog: Catalog,
    units: Sequence[IPAdapterRequest],
    image: Callable[[Any, str], Image.Image | None],
    what: str = "IP-Adapter unit",
) -> list[Any]:
    """The pipeline's units for ``units``: every name resolved inside its folder, the encoder chosen, the picture
    decoded (upright by its EXIF orientation, RGB) by ``image``; one-line 400s for anything that cannot run."""
    from sdengine.pipeline.ip_adapter import IPAdapterUnit

    if len(units) > MAX_IP_ADAPTERS:
        raise BadRequest(f"at most {MAX_IP_ADAPTERS} IP-Adapter units per request, got {len(units)}")
    out = []
    for k, u in enumerate(units):
        label = f"{what} {k}"
        if not isinstance(u.model, str):
            raise BadRequest(f"{label}: model must be a name of GET /v1/ip_adapters")
        if catalog.ip_adapters_dir is None:
            raise BadRequest(f"{label}: the server has no IP-Adapter files (serve --ip-adapters-dir DIR)")
        adapter = catalog.resolve_ip_adapter(u.model)
        scale = _finite(u.scale, f"{label} scale", *SCALE_RANGE)
        if u.negative_rule not in NEGATIVE_RULES:
            rule = repr(u.negative_rule)[:100]
            raise BadRequest(f"{label}: unknown negative_rule {rule}; use one of: {', '.join(NEGATIVE_RULES)}")
        start = _finite(u.start, f"{label} start", 0.0, 1.0)
        end = _finite(u.end, f"{label} end", 0.0, 1.0)
        window: dict[str, float] = {}
        if (start, end) != (0.0, 1.0):
            if not has_window():
                raise BadRequest(
                    f"{label}: an IP-Adapter runs on every step here; a window of steps (start {start:g}, end "
                    f"{end:g}) is not supported: send 0 and 1"
                )
            if start >= end:
                raise BadRequest(f"{label}: start ({start:g}) must be less than end ({end:g})")
            window = {"start": start, "end": end}
        encoder = choose_clip_vision(catalog, u, adapter, label)
        picture = image(u.image, f"{label} image")
        if picture is None:
            raise BadRequest(f"{label}: no image")
        picture = ImageOps.exif_transpose(picture).convert("RGB")
        out.append(
            IPAdapterUnit(
                str(adapter),
                scale=scale,
                images=picture,
                clip_vision=str(encoder),
                negative_rule=u.negative_rule,
                **window,  # type: ignore[arg-type]  # the unit's window, where it has one
            )
        )
    return out


def unit_names(catalog: Catalog) -> list[str]:
    """The IP-Adapters as A1111's ControlNet extension lists models: the file's path in the folder without its
    suffix (``/controlnet/model_list``)."""
    return [Path(e.name).with_suffix("").as_posix() for e in catalog.ip_adapters()]


def resolve_a1111_model(catalog: Catalog, name: str) -> str | None:
    """An A1111 unit's ``model`` (``name [hash]``, with or without its suffix) -> the name of GET /v1/ip_adapters;
    None when no IP-Adapter has that name."""
    name = strip_title(name)
    entries = [e.name for e in catalog.ip_adapters()]
    if name in entries:
        return name
    stems = [e for e in entries if Path(e).with_suffix("").as_posix() == name]
    return stems[0] if stems else None
