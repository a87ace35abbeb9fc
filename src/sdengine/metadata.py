"""Generation parameters in A1111's ``parameters`` infotext: write, read, store in PNGs, replay.

The format (what AUTOMATIC1111's webui writes into the PNG ``parameters`` text chunk, and what
ComfyUI, InvokeAI, civitai, ... read)::

    a red apple, (detailed:1.2)
    second line of the prompt
    Negative prompt: blurry
    Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, ...

The prompt (any number of lines), then ``Negative prompt: ...`` (omitted when empty; may run over
several lines), then one line of ``Key: value`` fields joined by ``", "``. A value that contains a
comma, a colon or a newline is written as a JSON string (A1111's ``quote``).

Reading follows A1111's ``parse_generation_parameters``: the text is stripped and split into lines;
the last line is the field line only if A1111's field regex finds at least 3 fields in it (else it is
part of the prompt); every other line is stripped; lines from the first one starting with
``Negative prompt:`` on belong to the negative prompt. Field values in double quotes are JSON-decoded.

Differences from A1111, on purpose:

* :func:`format_parameters` also quotes a value that starts with ``"`` or has leading/trailing
  spaces (A1111 writes those bare, and then reads them back changed); A1111 reads ours correctly.
* :func:`parse_parameters` returns the fields as written (``"Size": "512x512"``, no defaults filled
  in), where A1111's dict splits ``Size-1``/``Size-2`` and adds defaults (``Clip skip: 1``,
  ``Schedule type: Automatic``, ...); :func:`to_generate_kwargs` applies the defaults that matter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from sdengine import __version__
from sdengine.diffusion.sampling import A1111_DISCARD_SAMPLERS, BROWNIAN_SAMPLERS, SAMPLERS, SCHEDULE_A1111, resolve
from sdengine.diffusion.schedules import A1111_GRID_SAMPLERS
from sdengine.errors import SdengineError
from sdengine.image_info import ImageInfoError, png_text_chunks
from sdengine.io.atomic import atomic_write
from sdengine.nn.deep_shrink import FIELDS as DEEP_SHRINK_FIELDS
from sdengine.nn.deep_shrink import INFOTEXT_FIELDS as DEEP_SHRINK_INFOTEXT_FIELDS

log = logging.getLogger(__name__)

VERSION = f"sdengine {__version__}"
PARAMETERS_KEY = "parameters"  # the PNG text chunk A1111 writes and reads

# A1111's field regex: a key (word chars, spaces, '-', '/'), ": ", then a JSON string or anything
# up to the next comma.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_KEY = re.compile(r"\w[\w \-/]+")
_RE_SIZE = re.compile(r"^(\d+)x(\d+)$")

# Our parameter names -> A1111's field names, in the order A1111's create_infotext writes them.
# "prompt" and "negative_prompt" are the text lines, "width"/"height" make "Size".
FIELD_ORDER: tuple[tuple[str, str], ...] = (
    ("steps", "Steps"),
    ("sampler", "Sampler"),
    ("schedule", "Schedule type"),
    ("cfg_scale", "CFG scale"),
    ("seed", "Seed"),
    ("size", "Size"),
    ("model_hash", "Model hash"),
    ("model", "Model"),
    ("vae_hash", "VAE hash"),
    ("vae", "VAE"),
    ("strength", "Denoising strength"),
    ("clip_skip", "Clip skip"),
    ("lora_hashes", "Lora hashes"),
)
# lower-case fields of Forge's built-in scripts that sdengine writes as they are (Kohya HRFix Integrated: Deep Shrink)
EXTENSION_FIELDS = frozenset(DEEP_SHRINK_INFOTEXT_FIELDS)
KNOWN_KEYS = frozenset({"prompt", "negative_prompt", "width", "height", "version"} | {k for k, _ in FIELD_ORDER})

# Fields that describe the run but do not change the image; to_generate_kwargs skips them quietly.
_DESCRIPTIVE_FIELDS = frozenset(
    {"Model hash", "Model", "Lora hashes", "Version", "VAE hash", "VAE", "TI hashes", "User", "Hashes"}
)


class MetadataError(SdengineError, ValueError):
    """Infotext or PNG metadata that cannot be read or written."""


# ---------------------------------------------------------------------------------------- writing


def quote(value: object) -> str:
    """A1111's ``quote``: JSON-encode a value containing ``,`` ``:`` or a newline (else it would end
    its field early); also one that starts with ``"`` or has outer spaces (see the module notes)."""
    text = str(value)
    if any(c in text for c in ",:\n") or text.startswith('"') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def _number(value: float | int) -> str:
    """Whole floats without ".0" (A1111 shows "CFG scale: 7"), others with Python's shortest repr."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return repr(value) if isinstance(value, float) else str(value)


def format_lora_hashes(hashes: Mapping[str, str] | Sequence[tuple[str, str]]) -> str:
    """A1111's "Lora hashes" value: ``"name: hash, name2: hash2"``; ``:`` and ``,`` are removed
    from names, as A1111 does, so that the value splits back unambiguously."""
    items = hashes.items() if isinstance(hashes, Mapping) else hashes
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in items)


def parse_lora_hashes(value: str) -> dict[str, str]:
    """``"name: hash, name2: hash2"`` -> ``{name: hash}``."""
    out = {}
    for item in value.split(","):
        name, sep, h = item.rpartition(":")
        if sep:
            out[name.strip()] = h.strip()
    return out


def format_parameters(params: Mapping[str, Any]) -> str:
    """The A1111 infotext of ``params``.

    Keys (all optional except ``prompt``; ``None`` values are left out):

    ``prompt``, ``negative_prompt`` (left out when empty), ``steps``, ``sampler`` (ours, e.g.
    ``"dpmpp_2m"``, or A1111's, e.g. ``"DPM++ 2M Karras"``; written as A1111's display name),
    ``schedule`` (ours or A1111's; written as "Schedule type"), ``cfg_scale``, ``seed``, ``width``
    and ``height`` (together: "Size: WxH"), ``model_hash`` (:func:`model_hash`), ``model`` (a name),
    ``vae_hash`` and ``vae`` (a separate VAE's :func:`model_hash` and file name: "VAE hash", "VAE"),
    ``strength`` ("Denoising strength", for img2img/inpainting), ``clip_skip`` (written unless 1, as A1111
    does), ``lora_hashes`` (``{name: lora_hash(file)}`` or a list of pairs), ``version``
    (default ``"sdengine X.Y.Z"``).

    Keys in A1111's spelling (starting with an upper-case letter, e.g. ``"Hires upscale"``) are
    written as given, after the known fields and before "Version". Any other key is a
    ``MetadataError``, so that a misspelt name is not dropped silently. An unknown sampler or
    schedule is an error too.
    """
    if "prompt" not in params:
        raise MetadataError("format_parameters needs a 'prompt'")
    unknown = [k for k in params if k not in KNOWN_KEYS and not k[:1].isupper() and k not in EXTENSION_FIELDS]
    if unknown:
        raise MetadataError(f"unknown parameter names {unknown}; known: {sorted(KNOWN_KEYS)} or A1111 field names")

    values: dict[str, Any] = {k: v for k, v in params.items() if v is not None}
    if values.get("sampler") is not None:
        name, sched = resolve(str(values["sampler"]), values.get("schedule"))
        values["sampler"] = SAMPLERS[name].a1111
        # A combined A1111 name ("DPM++ 2M Karras") implies its schedule; write it separately as
        # A1111 >= 1.9 does. A plain sampler with no schedule given writes none.
        if values.get("schedule") is not None or sched != "normal":
            values["schedule"] = SCHEDULE_A1111[sched]
    elif values.get("schedule") is not None:
        _, sched = resolve("euler", values["schedule"])  # any sampler that takes every schedule
        values["schedule"] = SCHEDULE_A1111[sched]
    if ("width" in values) != ("height" in values):
        raise MetadataError("width and height go together (A1111's 'Size: WxH')")
    if "width" in values:
        values["size"] = f"{int(values['width'])}x{int(values['height'])}"
    if "clip_skip" in values and int(values["clip_skip"]) == 1:
        del values["clip_skip"]  # A1111 writes Clip skip only when it is not the default (sdengine's SDXL has a 0)
    if "lora_hashes" in values:
        if not isinstance(values["lora_hashes"], str):
            values["lora_hashes"] = format_lora_hashes(values["lora_hashes"])
        if not values["lora_hashes"]:
            del values["lora_hashes"]

    fields: list[tuple[str, Any]] = [(a1111, values[ours]) for ours, a1111 in FIELD_ORDER if ours in values]
    fields += [(k, v) for k, v in values.items() if k[:1].isupper() or k in EXTENSION_FIELDS]
    fields.append(("Version", values.get("version", VERSION)))

    parts = []
    for key, value in fields:
        if not _RE_KEY.fullmatch(key):
            raise MetadataError(f"field name {key!r} cannot be read back (A1111 allows letters, digits, ' ', '-', '/')")
        text = _number(value) if isinstance(value, int | float) and not isinstance(value, bool) else str(value)
        parts.append(f"{key}: {quote(text)}")

    negative = str(values.get("negative_prompt", ""))
    negative_line = f"\nNegative prompt: {negative}" if negative else ""
    return f"{values['prompt']}{negative_line}\n{', '.join(parts)}".strip()


# ---------------------------------------------------------------------------------------- reading


def _unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return str(json.loads(text))
    except ValueError:
        return text


# Pieces of _RE_PARAM, each matched at one position (no search, no backtracking across pieces).
_RE_SPACE = re.compile(r"\s*")
_RE_KEY_RUN = re.compile(r"[\w \-/]*")
_RE_QUOTED_BODY = re.compile(r'(?:\\.|[^\\"])*')
_RE_BARE = re.compile(r"[^,]*")


def _match_end(rx: re.Pattern[str], line: str, pos: int) -> int:
    """End of ``rx`` matched at ``pos``: the patterns used here match the empty string, so they always match."""
    m = rx.match(line, pos)
    assert m is not None
    return m.end()


def parse_fields(line: str) -> list[tuple[str, str]]:
    """``_RE_PARAM.findall(line)`` (A1111's field regex: the same pairs on every input) in linear time.

    The regex itself is quadratic: where no field starts, ``findall`` retries at the next character
    and rescans the whole run of key characters (a 200 KB word took minutes), and every unterminated
    quoted value rescans to the end of the line. Here a failed key skips its whole run (every start
    inside it fails the same way: the run ends on the same non-``:`` character), and the end of a
    quoted value is remembered (a later value starting inside an already scanned body lines up with
    the same escapes, so it ends at the same quote).
    """
    out: list[tuple[str, str]] = []
    n, pos = len(line), 0
    scan_from, quote_end = n + 1, -1  # last body scan: its start (none yet) and its closing quote (-1: none)
    while pos < n:
        k = _match_end(_RE_SPACE, line, pos)
        if k >= n:
            break
        if not (line[k].isalnum() or line[k] == "_"):  # a key starts with a word character (\w)
            pos = k + 1
            continue
        e = _match_end(_RE_KEY_RUN, line, k + 1)
        if e - k < 2 or e >= n or line[e] != ":":
            pos = e if e > k + 1 else k + 1
            continue
        v = _match_end(_RE_SPACE, line, e + 1)
        value_end = -1
        if v < n and line[v] == '"':
            b = v + 1
            if not (scan_from < b and (quote_end == -1 or b <= quote_end)):
                scan_from = b
                m = _match_end(_RE_QUOTED_BODY, line, b)
                quote_end = m if m < n and line[m] == '"' else -1
            if quote_end > b and (quote_end + 1 == n or line[quote_end + 1] == ","):
                value_end = quote_end + 1
        if value_end < 0:
            value_end = _match_end(_RE_BARE, line, v)
        out.append((line[k:e], line[v:value_end]))
        pos = value_end + 1 if value_end < n else n  # past the comma
    return out


# Far above any real infotext (A1111 prompts are a few KB; Pillow caps a PNG text chunk near 1 MB), and
# small enough that a crafted text cannot make reading it slow.
MAX_INFOTEXT_CHARS = 1_000_000


def parse_parameters(text: str) -> dict[str, str]:
    """Read an A1111 infotext: ``{"Prompt": ..., "Negative prompt": ..., "Steps": "25", ...}``.

    Every field of the last line is kept, in order, with its value as a string (JSON strings
    decoded), including fields sdengine does not use ("Hires upscale", "ADetailer model", ...).
    "Prompt" and "Negative prompt" are always present (possibly empty). Linear in the text's length;
    a text over ``MAX_INFOTEXT_CHARS`` is a ``MetadataError``.
    """
    if not isinstance(text, str):
        raise MetadataError(f"infotext must be text (str), got {type(text).__name__}")
    if len(text) > MAX_INFOTEXT_CHARS:
        raise MetadataError(
            f"infotext of {len(text):,} characters is over the limit of {MAX_INFOTEXT_CHARS:,}; not a generation's "
            "parameters"
        )
    *lines, last = text.strip().split("\n")
    if len(parse_fields(last)) < 3:
        # A1111's rule: fewer than 3 fields means the last line is part of the prompt.
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        target = negative_lines if in_negative else prompt_lines
        # A1111 joins with "\n" only after the first non-empty text (so leading empty lines vanish).
        if target or line:
            target.append(line)

    res: dict[str, str] = {"Prompt": "\n".join(prompt_lines), "Negative prompt": "\n".join(negative_lines)}
    for key, value in parse_fields(last):
        res[key] = _unquote(value)
    return res


def _parse_int(parsed: Mapping[str, str], key: str) -> int:
    try:
        return int(parsed[key])
    except ValueError:
        raise MetadataError(f"{key}: {parsed[key]!r} is not an integer") from None


def _number_or_none(text: str | None) -> float | None:
    """``text`` as a float, or None when it is missing or not a number."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


_FREEU_FACTOR_FIELDS = ("freeu_b1", "freeu_b2", "freeu_s1", "freeu_s2")
# A1111's Hypertile U-Net fields and sdengine's two
HYPERTILE_UNET_FIELDS = (
    "Hypertile U-Net",
    "Hypertile U-Net second pass",
    "Hypertile U-Net max depth",
    "Hypertile U-Net max tile size",
    "Hypertile U-Net swap size",
    "Hypertile rule",
    "Hypertile scale depth",
)
# A1111's Hypertile VAE fields (the request's hypertile_vae)
HYPERTILE_VAE_FIELDS = (
    "Hypertile VAE",
    "Hypertile VAE max depth",
    "Hypertile VAE max tile size",
    "Hypertile VAE swap size",
)

# sdengine's MultiDiffusion fields (the request's tiled_diffusion: sdengine.diffusion.multidiffusion)
TILED_DIFFUSION_FIELDS = (
    "Tiled Diffusion",
    "Tiled Diffusion window",
    "Tiled Diffusion stride",
    "Tiled Diffusion circular",
    "Tiled Diffusion batch",
)


def tiled_diffusion_kwargs(parsed: Mapping[str, str]) -> dict[str, Any] | None:
    """The request's ``tiled_diffusion`` mapping of sdengine's "Tiled Diffusion: MultiDiffusion", "Tiled Diffusion
    window: WxH" (latent cells), "Tiled Diffusion stride", "... circular: True" and "... batch" (1 where missing);
    None without the first (or with the A1111 extension's dictionary there)."""
    if "Tiled Diffusion" not in parsed or parsed["Tiled Diffusion"].strip().startswith("{"):
        # the A1111 Tiled Diffusion extension writes one field, a dictionary of its settings: its tiles are laid
        # out otherwise, so it is left to the "not reproduced" warning
        return None
    window = parsed.get("Tiled Diffusion window", "").strip()
    sides = window.lower().split("x")
    if len(sides) != 2 or not all(x.strip().isdigit() for x in sides):
        raise MetadataError(f"Tiled Diffusion window must be WIDTHxHEIGHT in latent cells, got {window!r}")
    w, h = (int(x) for x in sides)
    return {
        "method": parsed["Tiled Diffusion"].strip(),
        "window": w,
        "window_height": None if h == w else h,
        "stride": _parse_int(parsed, "Tiled Diffusion stride"),
        "circular": _true(parsed, "Tiled Diffusion circular"),
        "view_batch": _parse_int(parsed, "Tiled Diffusion batch") if "Tiled Diffusion batch" in parsed else 1,
    }


def _true(parsed: Mapping[str, str], key: str) -> bool:
    """Whether a field reads "True" (A1111 writes booleans so); a missing one is False, another value an error."""
    if key not in parsed:
        return False
    text = parsed[key].strip().lower()
    if text not in ("true", "false"):
        raise MetadataError(f"{key}: {parsed[key]!r} is not True or False")
    return text == "true"


def _parse_float(parsed: Mapping[str, str], key: str) -> float:
    try:
        return float(parsed[key])
    except ValueError:
        raise MetadataError(f"{key}: {parsed[key]!r} is not a number") from None


def deep_shrink_kwargs(parsed: Mapping[str, str]) -> dict[str, Any] | None:
    """Forge's Kohya HRFix fields (``kohya_hrfix_enabled: True``, ``kohya_hrfix_block_number`` ...) as the
    request's ``deep_shrink`` mapping (a missing field takes the script's default); None when not enabled."""
    if parsed.get("kohya_hrfix_enabled", "").strip().lower() != "true":
        return None
    out: dict[str, Any] = {}
    for name, key in zip(DEEP_SHRINK_FIELDS, DEEP_SHRINK_INFOTEXT_FIELDS[1:], strict=True):
        if key not in parsed:
            continue
        if name == "block":
            out[name] = _parse_int(parsed, key)
        elif name == "after_skip":
            value = parsed[key].strip().lower()
            if value not in ("true", "false"):
                raise MetadataError(f"{key}: {parsed[key]!r} is not True or False")
            out[name] = value == "true"
        elif name.endswith("_method"):
            out[name] = parsed[key].strip()
        else:
            out[name] = _parse_float(parsed, key)
    return out


def made_by_sdengine(parsed: Mapping[str, str]) -> bool:
    """Whether an infotext is sdengine's own ("Version: sdengine X.Y.Z"): its settings have sdengine's meaning
    unless a field says otherwise ("Strength rule", "Clip skip rule"); any other (A1111's, Forge's) has
    A1111's."""
    return parsed.get("Version", "").strip().startswith("sdengine")


# A1111's randn_source values and sdengine's noise_source for each: its GPU source on an NVIDIA card draws
# torch.randn on CUDA, the numbers its NV source reproduces on any device (sdengine.diffusion.philox)
A1111_RANDN_SOURCES = {"GPU": "nv", "NV": "nv", "CPU": "cpu"}


# SD3's skip-layer guidance in the infotext (beside "Skip layers"): field -> GenerationRequest.sd3 key
SKIP_LAYER_FIELDS = {
    "Skip layer guidance": "skip_layer_guidance_scale",
    "Skip layer start": "skip_layer_guidance_start",
    "Skip layer stop": "skip_layer_guidance_stop",
}
# how a base -> refiner hand-off picks its switch step (sdengine.pipeline.sdxl.switch_step): diffusers' rule, A1111's
REFINER_SWITCH_RULES = ("diffusers", "a1111")


def refiner_switch(parsed: Mapping[str, str]) -> tuple[float, str] | None:
    """The base -> refiner hand-off an infotext records (A1111's "Refiner"): (switch, rule) for
    :meth:`sdengine.pipeline.sdxl.SDXLPipeline.generate_with_refiner`, None without a refiner. The switch is
    "Refiner switch at", else 0 (A1111 writes none for its default None, where its refiner runs from the first
    step); the rule sdengine's "Refiner switch rule", else A1111's ("a1111") in an infotext not made by sdengine
    and diffusers' in an sdengine one (written without the field). A bad number or rule is a MetadataError."""
    if not parsed.get("Refiner"):
        return None
    switch = _parse_float(parsed, "Refiner switch at") if "Refiner switch at" in parsed else 0.0
    rule = parsed.get("Refiner switch rule", "diffusers" if made_by_sdengine(parsed) else "a1111").strip()
    if rule not in REFINER_SWITCH_RULES:
        raise MetadataError(f"Refiner switch rule: {rule!r} is not one of {', '.join(REFINER_SWITCH_RULES)}")
    return switch, rule


def noise_source_of(value: Any, what: str = "randn_source") -> str:
    """sdengine's ``noise_source`` for A1111's ``randn_source`` ``value`` ("GPU", "NV", "CPU"; any case), or a
    :class:`MetadataError` naming ``what`` and the values."""
    key = value.strip().upper() if isinstance(value, str) else None
    if key not in A1111_RANDN_SOURCES:
        raise MetadataError(f"{what}: {value!r} is not one of {', '.join(A1111_RANDN_SOURCES)}")
    return A1111_RANDN_SOURCES[key]


def to_generate_kwargs(
    parsed: Mapping[str, str],
    *,
    hires: bool = False,
    refiner: bool = False,
    hr_checkpoint: bool = False,
    hr_refiner: bool = False,
) -> dict[str, Any]:
    """The pipeline's arguments from :func:`parse_parameters`' result.

    Gives ``prompt``, ``negative_prompt``, and those of ``steps``, ``sampler``, ``schedule`` (our
    names), ``cfg_scale``, ``seed``, ``width``, ``height``, ``strength``, ``clip_skip``, ``mask_blur``,
    ``guidance_rescale`` ("CFG Rescale phi"), ``soft_inpainting`` (A1111's "Soft inpainting enabled: True" and its
    settings' keys: :func:`soft_inpainting_kwargs`), ``pag_scale`` and ``pag_layers`` (sdengine's "PAG scale", "PAG
    layers"), ``sag_scale``, ``sag_blur_sigma`` and ``sag_rule`` (sdengine's "SAG scale", "SAG blur sigma", "SAG
    rule" where not diffusers; Forge's "sag_enabled: True", "sag_scale", "sag_blur_sigma", its rule "comfyui"),
    ``freeu``, ``freeu_version`` and ``freeu_rule`` (sdengine's "FreeU: b1,b2,s1,s2", "FreeU version",
    "FreeU rule" where not 2 and width; Forge's "freeu_enabled: True", "freeu_b1" ... "freeu_s2"), ``deep_shrink``
    (Forge's "kohya_hrfix_enabled: True", "kohya_hrfix_block_number" ...: :func:`deep_shrink_kwargs`), ``hypertile``,
    ``hypertile_hires_only``, ``hypertile_rule`` and ``hypertile_scale_depth`` (A1111's "Hypertile U-Net: True" or
    "Hypertile U-Net second pass: True", its "Hypertile U-Net max tile size" / "max depth" / "swap size", 256 / 3 / 3
    where missing; sdengine's "Hypertile rule", "Hypertile scale depth"), ``hypertile_vae`` (A1111's "Hypertile VAE:
    True", its "Hypertile VAE max tile size" / "swap size" / "max depth", 128 / 3 / 3 where missing), ``subseed`` and
    ``subseed_strength`` ("Variation seed", "Variation seed strength"), ``seed_resize_from_w`` and
    ``seed_resize_from_h`` ("Seed resize from: WxH"), ``tiling``
    ("Tiling: True"), ``noise_multiplier`` (A1111's img2img "Noise multiplier"), ``noise_seed_delta`` ("ENSD"),
    ``noise_source`` ("RNG": A1111's NV and GPU are "nv", its CPU "cpu"; a text without it is "nv", A1111's default
    GPU, unless sdengine made it: then it keeps sdengine's default), ``sampler_options`` (A1111's "Eta" / "Eta DDIM",
    "Sigma ..." and, with UniPC, "UniPC variant" / "UniPC order", A1111's defaults bh1 and 3 where an A1111 text
    has none; sdengine's "Sampler options" JSON),
    ``discard_penultimate_sigma`` ("Discard penultimate sigma: True"), ``zero_terminal_snr`` ("Noise Schedule: Zero
    Terminal SNR", A1111's sd_noise_schedule),
    ``vae_decode`` ("tiny" when sdengine's "Tiny VAE" field is there), ``vae_encode`` ("tiny" for
    "Tiny VAE encode"), ``strength_rule`` (sdengine's "Strength rule"), ``clip_skip_rule`` (sdengine's "Clip
    skip rule"), ``sdxl`` (sdengine's "SDXL options": prompt_2, sizes) that the text has (``clip_skip`` defaults
    to 1, as in A1111, where a missing "Clip skip" means 1). An infotext not made by sdengine
    (:func:`made_by_sdengine`: A1111's, Forge's) gets A1111's meanings: ``strength_rule`` "a1111" with a
    "Denoising strength" or a sampler whose run A1111's rule changes (DDIM, PLMS, DPM2, DPM2 a, the SDE samplers),
    ``clip_skip_rule`` "a1111" with a "Clip skip". LoRAs stay
    in the prompt as ``<lora:...>`` tags (:func:`sdengine.prompts.extract_lora_tags`). An unknown
    sampler or schedule is a ``ValueError`` listing valid names. Fields that would change the image
    but that sdengine does not reproduce ("Hires upscale", "Face restoration", ...) are logged as a
    warning. With ``hires=True`` the hires-fix fields are read too (:func:`hires_kwargs`; then "Denoising
    strength" is the second pass's). ``refiner=True`` says the caller reproduces A1111's "Refiner" and
    "Refiner switch at" (an SDXL base -> refiner hand-off, not a request setting), so they are not warned of.
    With ``hires=True``, ``hr_checkpoint=True`` and ``hr_refiner=True`` say the caller reproduces A1111's "Hires
    checkpoint" (the second pass's model) and "Hires refiner" (the pass that handed off); else they are warned of.
    A1111's "Image CFG scale" (an instruct-pix2pix model's image guidance) gives ``image_cfg_scale``, Forge's
    "Distilled CFG Scale" (FLUX.1 [dev]'s distilled guidance) ``distilled_cfg_scale``.
    """
    kwargs: dict[str, Any] = {
        "prompt": parsed.get("Prompt", ""),
        "negative_prompt": parsed.get("Negative prompt", ""),
    }
    if "Steps" in parsed:
        kwargs["steps"] = _parse_int(parsed, "Steps")
    if "Sampler" in parsed:
        try:
            kwargs["sampler"], kwargs["schedule"] = resolve(parsed["Sampler"], parsed.get("Schedule type"))
        except ValueError as e:
            raise MetadataError(f"cannot regenerate from this infotext: {e}") from None
    elif "Schedule type" in parsed:
        _, kwargs["schedule"] = resolve("euler", parsed["Schedule type"])
    if "CFG scale" in parsed:
        kwargs["cfg_scale"] = _parse_float(parsed, "CFG scale")
    if "Seed" in parsed:
        kwargs["seed"] = _parse_int(parsed, "Seed")
    if "Size" in parsed:
        m = _RE_SIZE.match(parsed["Size"])
        if m is None:
            raise MetadataError(f"Size: {parsed['Size']!r} is not WIDTHxHEIGHT")
        kwargs["width"], kwargs["height"] = int(m.group(1)), int(m.group(2))
    if "Denoising strength" in parsed:
        kwargs["strength"] = _parse_float(parsed, "Denoising strength")
    kwargs["clip_skip"] = _parse_int(parsed, "Clip skip") if "Clip skip" in parsed else 1
    if "Clip skip rule" in parsed:  # sdengine's field: whose meaning the Clip skip has
        from sdengine.text.conditioners import CLIP_SKIP_RULES

        clip_rule = parsed["Clip skip rule"].strip()
        if clip_rule not in CLIP_SKIP_RULES:
            raise MetadataError(f"Clip skip rule: {clip_rule!r} is not one of {', '.join(CLIP_SKIP_RULES)}")
        kwargs["clip_skip_rule"] = clip_rule
    elif "Clip skip" in parsed and not made_by_sdengine(parsed):
        kwargs["clip_skip_rule"] = "a1111"  # A1111's Clip skip: applied to SD 1.x's CLIP only (not SD 2.x, SDXL)
    if "Mask blur" in parsed:
        kwargs["mask_blur"] = _parse_float(parsed, "Mask blur")
    if "CFG Rescale phi" in parsed:
        kwargs["guidance_rescale"] = _parse_float(parsed, "CFG Rescale phi")
    if "Image CFG scale" in parsed:  # A1111's: an instruct-pix2pix model's image guidance
        kwargs["image_cfg_scale"] = _parse_float(parsed, "Image CFG scale")
    if "Distilled CFG Scale" in parsed:  # Forge's: FLUX.1 [dev]'s distilled guidance scale
        kwargs["distilled_cfg_scale"] = _parse_float(parsed, "Distilled CFG Scale")
    if "Control preprocessor" in parsed:  # sdengine's: FLUX.1 Depth / Canny's map made from the control image
        kwargs["control_preprocessor"] = parsed["Control preprocessor"].strip()
    if parsed.get("Reference resize", "").strip().lower() == "off":  # sdengine's: FLUX.1 Kontext's auto-resize off
        kwargs["reference_auto_resize"] = False
    if "PAG scale" in parsed:  # sdengine's: perturbed-attention guidance, its layers "mid" unless written
        kwargs["pag_scale"] = _parse_float(parsed, "PAG scale")
        kwargs["pag_layers"] = parsed.get("PAG layers", "mid").strip()
    if "SAG scale" in parsed:  # sdengine's: self-attention guidance, its blur sigma 1 (diffusers') unless written
        kwargs["sag_scale"] = _parse_float(parsed, "SAG scale")
        kwargs["sag_blur_sigma"] = _parse_float(parsed, "SAG blur sigma") if "SAG blur sigma" in parsed else 1.0
        if "SAG rule" in parsed:  # written when not diffusers'
            kwargs["sag_rule"] = _sag_rule(parsed["SAG rule"])
    elif parsed.get("sag_enabled", "").strip().lower() == "true":  # Forge's SAG script: ComfyUI's node, its defaults
        kwargs["sag_scale"] = _parse_float(parsed, "sag_scale") if "sag_scale" in parsed else 0.5
        kwargs["sag_blur_sigma"] = _parse_float(parsed, "sag_blur_sigma") if "sag_blur_sigma" in parsed else 2.0
        kwargs["sag_rule"] = "comfyui"
    if "FreeU" in parsed:  # sdengine's: "FreeU: b1,b2,s1,s2", "FreeU version" / "FreeU rule" unless 2 / width
        try:
            factors = tuple(float(x) for x in parsed["FreeU"].strip().strip('"').split(","))
        except ValueError:
            factors = ()
        if len(factors) != 4:
            raise MetadataError(f"FreeU: {parsed['FreeU']!r} is not four numbers b1,b2,s1,s2")
        kwargs["freeu"] = factors
        kwargs["freeu_version"] = _parse_int(parsed, "FreeU version") if "FreeU version" in parsed else 2
        kwargs["freeu_rule"] = parsed.get("FreeU rule", "width").strip()
    elif parsed.get("freeu_enabled", "").strip().lower() == "true":  # Forge's FreeU fields (its FreeU is version 2)
        missing = [k for k in _FREEU_FACTOR_FIELDS if k not in parsed]
        if missing:
            raise MetadataError(f"freeu_enabled: True without {', '.join(missing)}")
        kwargs["freeu"] = tuple(_parse_float(parsed, k) for k in _FREEU_FACTOR_FIELDS)
        kwargs["freeu_version"] = _parse_int(parsed, "freeu_version") if "freeu_version" in parsed else 2
        kwargs["freeu_rule"] = parsed.get("freeu_rule", "width").strip()  # sdengine's, when not the width rule
    shrink = deep_shrink_kwargs(parsed)  # Forge's Kohya HRFix Integrated (Deep Shrink)
    if shrink is not None:
        kwargs["deep_shrink"] = shrink
    hypertile = _true(parsed, "Hypertile U-Net")
    if hypertile or _true(parsed, "Hypertile U-Net second pass"):
        # A1111's Hypertile U-Net (its settings where not its defaults 256, 3, 3); sdengine's rule and scale depth
        kwargs["hypertile"] = tuple(
            _parse_int(parsed, f"Hypertile U-Net {name}") if f"Hypertile U-Net {name}" in parsed else default
            for name, default in (("max tile size", 256), ("swap size", 3), ("max depth", 3))
        )
        kwargs["hypertile_hires_only"] = not hypertile
        kwargs["hypertile_rule"] = parsed.get("Hypertile rule", "a1111").strip()
        if "Hypertile scale depth" in parsed:
            kwargs["hypertile_scale_depth"] = _true(parsed, "Hypertile scale depth")
    if _true(parsed, "Hypertile VAE"):  # A1111's Hypertile VAE (its settings where not its defaults 128, 3, 3)
        kwargs["hypertile_vae"] = tuple(
            _parse_int(parsed, f"Hypertile VAE {name}") if f"Hypertile VAE {name}" in parsed else default
            for name, default in (("max tile size", 128), ("swap size", 3), ("max depth", 3))
        )
    tiled = tiled_diffusion_kwargs(parsed)  # sdengine's MultiDiffusion
    if tiled is not None:
        kwargs["tiled_diffusion"] = tiled
    if "Variation seed" in parsed:
        kwargs["subseed"] = _parse_int(parsed, "Variation seed")
        # A1111 writes the strength only when it is not 0; a missing one is 0 (the seed's image)
        kwargs["subseed_strength"] = (
            _parse_float(parsed, "Variation seed strength") if "Variation seed strength" in parsed else 0.0
        )
    if "Seed resize from" in parsed:  # A1111's "Resize seed from width/height", written WIDTHxHEIGHT
        m = _RE_SIZE.match(parsed["Seed resize from"].strip())
        if m is None:
            raise MetadataError(f"Seed resize from: {parsed['Seed resize from']!r} is not WIDTHxHEIGHT")
        kwargs["seed_resize_from_w"], kwargs["seed_resize_from_h"] = int(m.group(1)), int(m.group(2))
    if "Tiling" in parsed:  # A1111 writes "Tiling: True"
        value = parsed["Tiling"].strip().lower()
        if value not in ("true", "false"):
            raise MetadataError(f"Tiling: {parsed['Tiling']!r} is not True or False")
        kwargs["tiling"] = value == "true"

    if "Masked content" in parsed:  # sdengine's: A1111's latent noise / latent nothing inpainting
        kwargs["masked_content"] = parsed["Masked content"].strip()
        if kwargs["masked_content"] not in MASKED_CONTENT:
            raise MetadataError(
                f"Masked content: {parsed['Masked content']!r} is not one of {', '.join(MASKED_CONTENT)}"
            )
    if "Differential diffusion" in parsed:  # sdengine's: GenerationRequest.differential_diffusion
        kwargs["differential_diffusion"] = _parse_float(parsed, "Differential diffusion")
        if not 0.0 <= kwargs["differential_diffusion"] <= 1.0:
            raise MetadataError(f"Differential diffusion: {parsed['Differential diffusion']!r} is not in [0, 1]")
    soft = soft_inpainting_kwargs(parsed)
    if soft is not None:  # A1111's soft inpainting script (GenerationRequest.soft_inpainting)
        kwargs["soft_inpainting"] = soft
    if "RNG" in parsed:  # A1111's randn_source, written when not its default GPU: NV, CPU (GPU read too)
        kwargs["noise_source"] = noise_source_of(parsed["RNG"], "RNG")
    elif not made_by_sdengine(parsed):  # A1111 writes none for its default GPU source (its parse_generation_parameters
        kwargs["noise_source"] = "nv"  # fills in "RNG: GPU"); sdengine writes "RNG: NV" for nv, none for its cpu
    if "ENSD" in parsed:  # A1111's eta noise seed delta
        kwargs["noise_seed_delta"] = _parse_int(parsed, "ENSD")
    if "Discard penultimate sigma" in parsed:  # A1111's always_discard_next_to_last_sigma
        value = parsed["Discard penultimate sigma"].strip().lower()
        if value not in ("true", "false"):
            raise MetadataError(
                f"Discard penultimate sigma: {parsed['Discard penultimate sigma']!r} is not True or False"
            )
        kwargs["discard_penultimate_sigma"] = value == "true"
    if "Noise Schedule" in parsed:  # A1111's sd_noise_schedule, written when it is Zero Terminal SNR
        value = parsed["Noise Schedule"].strip()
        if value not in ("Default", "Zero Terminal SNR"):
            raise MetadataError(
                f"Noise Schedule: {parsed['Noise Schedule']!r} is not one of 'Default', 'Zero Terminal SNR'"
            )
        kwargs["zero_terminal_snr"] = value == "Zero Terminal SNR"
    if "Noise multiplier" in parsed:  # A1111's img2img initial_noise_multiplier
        kwargs["noise_multiplier"] = _parse_float(parsed, "Noise multiplier")
    if "Resize mode" in parsed:  # sdengine's field: how init and control images were fitted
        from sdengine.io.resize import LATENT_UPSCALE, resize_mode_name

        try:
            if parsed["Resize mode"].strip().lower() == LATENT_UPSCALE:  # A1111's resize mode 3
                kwargs["init_latent_resize"] = True
            else:
                kwargs["resize_mode"] = resize_mode_name(parsed["Resize mode"])
        except SdengineError as e:
            raise MetadataError(f"cannot regenerate from this infotext: {e}") from None
    options = _sampler_options(parsed, kwargs.get("sampler"))
    if options:
        kwargs["sampler_options"] = options
    if "Strength rule" in parsed:  # sdengine's field: how the strength counted the img2img / hires steps
        from sdengine.diffusion.schedules import STRENGTH_RULES

        rule = parsed["Strength rule"].strip()
        if rule not in STRENGTH_RULES:
            raise MetadataError(f"Strength rule: {rule!r} is not one of {', '.join(STRENGTH_RULES)}")
        kwargs["strength_rule"] = rule
    elif not made_by_sdengine(parsed) and (
        "Denoising strength" in parsed
        or kwargs.get("sampler") in (*A1111_GRID_SAMPLERS, *A1111_DISCARD_SAMPLERS, *BROWNIAN_SAMPLERS)
    ):  # A1111 counted its img2img / hires steps its own way, walked its own DDIM / PLMS grid, dropped the
        # next-to-last sigma of DPM2, DPM2 a and DPM++ 3M SDE, and drew its SDE samplers' noise from Brownian trees
        kwargs["strength_rule"] = "a1111"
    if "SDXL options" in parsed:  # sdengine's field: SDXL's prompt_2 and size numbers (GenerationRequest.sdxl)
        try:
            sdxl = json.loads(parsed["SDXL options"])
        except ValueError:
            sdxl = None
        if not isinstance(sdxl, dict) or not sdxl:
            raise MetadataError(f"SDXL options: {parsed['SDXL options']!r} is not a JSON object of SDXL settings")
        kwargs["sdxl"] = sdxl
    if "Shift" in parsed:  # a flow model's time shift (SD3; Forge's field name)
        kwargs["shift"] = _parse_float(parsed, "Shift")
    if "Skip layers" in parsed:  # sdengine's fields: SD3's skip-layer guidance (GenerationRequest.sd3)
        try:
            layers = [int(x) for x in parsed["Skip layers"].split(",")]
        except ValueError:
            raise MetadataError(f"Skip layers: {parsed['Skip layers']!r} is not a list of block numbers") from None
        slg: dict[str, Any] = {"skip_guidance_layers": layers}
        for field, key in SKIP_LAYER_FIELDS.items():
            if field in parsed:
                slg[key] = _parse_float(parsed, field)
        kwargs["sd3"] = slg
    if "PAG adaptive scale" in parsed:  # sdengine's field: SD3's adaptive PAG scale (GenerationRequest.sd3)
        kwargs["sd3"] = {**kwargs.get("sd3", {}), "pag_adaptive_scale": _parse_float(parsed, "PAG adaptive scale")}
    if parsed.get("Tiny VAE"):  # sdengine's field: the tiny VAE decoded (the run needs one loaded again)
        kwargs["vae_decode"] = "tiny"
    if parsed.get("Tiny VAE encode"):  # and this one: its encoder made the init image's latent
        kwargs["vae_encode"] = "tiny"

    hires_used: set[str] = set()
    if hires:
        found = hires_kwargs(parsed)
        kwargs.update(found)
        if found:
            hires_used = {k for k in parsed if k in _HIRES_FIELDS}
    used = {"Prompt", "Negative prompt", "Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Size"}
    used |= hires_used
    if refiner:
        used |= {"Refiner", "Refiner switch at", "Refiner switch rule"}
    if hires:
        used |= {k for k, on in (("Hires checkpoint", hr_checkpoint), ("Hires refiner", hr_refiner)) if on}
    used |= {
        "Denoising strength",
        "Clip skip",
        "Mask blur",
        "CFG Rescale phi",
        "Image CFG scale",
        "Distilled CFG Scale",
        "Reference images",  # FLUX.1 Kontext's: the images themselves are the caller's (--reference-image)
        "Reference image size",
        "Reference resize",
        "Control preprocessor",
        "PAG scale",
        "PAG layers",
        "SAG scale",
        "SAG blur sigma",
        "SAG rule",
        "sag_enabled",
        "sag_scale",
        "sag_blur_sigma",
        "FreeU",
        "FreeU version",
        "FreeU rule",
        "freeu_enabled",
        *_FREEU_FACTOR_FIELDS,
        "freeu_version",
        "freeu_rule",
        *DEEP_SHRINK_INFOTEXT_FIELDS,
        *HYPERTILE_UNET_FIELDS,
        *HYPERTILE_VAE_FIELDS,
        "Variation seed",
        "Variation seed strength",
        "Seed resize from",
        "Tiling",
        "Noise multiplier",
        "ENSD",
        "RNG",
        "Discard penultimate sigma",
        "Noise Schedule",
        "Masked content",
        "Differential diffusion",
        SOFT_INPAINTING_ENABLED,
        *SOFT_INPAINTING_KEYS.values(),
        "Tiny VAE",
        "Tiny VAE encode",
        "Resize mode",
        "Strength rule",
        "Clip skip rule",
        "Sampler options",
        "SDXL options",
        "Shift",
        "Skip layers",
        *SKIP_LAYER_FIELDS,
        "PAG adaptive scale",
        "Prediction type",  # a loading option: the caller's (sdengine generate --from-png passes it on)
        "Pad conds",  # A1111's padding of the shorter of prompt and negative prompt: what sdengine always does
    }
    if options:
        used |= {"Eta", "Eta DDIM", *(A1111_SAMPLER_FIELDS[k] for k in options if k in A1111_SAMPLER_FIELDS)}
    # Forge's SAG mask threshold: its default (sdengine's, fixed) is reproduced; another is warned of
    used |= {"sag_threshold"} if _number_or_none(parsed.get("sag_threshold")) == 1.0 else set()
    # Forge's FreeU window (fractions of the steps): its whole run is what sdengine's FreeU does; another is warned of
    used |= {k for k, whole in (("freeu_start", 0.0), ("freeu_end", 1.0)) if _number_or_none(parsed.get(k)) == whole}
    if kwargs.get("sampler") == "unipc":
        used |= {name for name, _ in A1111_UNIPC_FIELDS.values()}
        # the skip type and the lower order at the end that sdengine's UniPC runs: others are warned of below
        used |= {k for k, v in A1111_UNIPC_FIXED.items() if parsed.get(k, v).strip() == v}
    # "ControlNet N" fields (and their step rule) are the caller's: they need the control image (see
    # recorded_controlnets)
    used |= {"ControlNet step rule", "ControlNet guess mode"}
    if "tiled_diffusion" in kwargs:  # sdengine's MultiDiffusion fields (not the A1111 extension's dictionary)
        used |= set(TILED_DIFFUSION_FIELDS)
    ignored = [
        k
        for k in parsed
        if k not in used
        and k not in _DESCRIPTIVE_FIELDS
        and not _RE_CONTROLNET.match(k)
        and not _RE_IP_ADAPTER.match(k)  # the caller's too: they need the picture (recorded_ip_adapters)
    ]
    if ignored:
        log.warning("infotext fields not reproduced by sdengine (the image may differ): %s", ", ".join(ignored))
    return kwargs


def _sag_rule(text: str) -> str:
    from sdengine.diffusion.sag import SAG_RULES

    rule = text.strip()
    if rule not in SAG_RULES:
        raise MetadataError(f"SAG rule: {rule!r} is not one of {', '.join(SAG_RULES)}")
    return rule


# A1111's inpainting "Masked content" done in the latent (GenerationRequest.masked_content; "fill" is on the image)
MASKED_CONTENT = ("original", "latent noise", "latent nothing")
# sampler options A1111 writes under its own names (its KDiffusionSampler.initialize; only where not the default)
A1111_SAMPLER_FIELDS = {
    "s_churn": "Sigma churn",
    "s_tmin": "Sigma tmin",
    "s_tmax": "Sigma tmax",
    "s_noise": "Sigma noise",
}

# A1111's built-in soft inpainting script's infotext (GenerationRequest.soft_inpainting): "Soft inpainting enabled:
# True" and each setting under its key, in the script's argument order (sdengine.pipeline.soft_inpaint.FIELDS)
SOFT_INPAINTING_ENABLED = "Soft inpainting enabled"
SOFT_INPAINTING_KEYS: dict[str, str] = {
    "schedule_bias": "Soft inpainting schedule bias",
    "preservation_strength": "Soft inpainting preservation strength",
    "transition_contrast_boost": "Soft inpainting transition contrast boost",
    "mask_influence": "Soft inpainting mask influence",
    "difference_threshold": "Soft inpainting difference threshold",
    "difference_contrast": "Soft inpainting difference contrast",
}


def soft_inpainting_kwargs(parsed: Mapping[str, str]) -> dict[str, float] | None:
    """The soft inpainting settings an infotext records (A1111's keys, by setting name; a missing one left out:
    its default), None when "Soft inpainting enabled" is not true; a value that is not a number is one line
    (the ranges are checked by the request)."""
    if parsed.get(SOFT_INPAINTING_ENABLED, "").strip().lower() != "true":
        return None
    return {name: _parse_float(parsed, key) for name, key in SOFT_INPAINTING_KEYS.items() if key in parsed}


# A1111's UniPC options (its uni_pc_variant, uni_pc_order; shared_options.py): their infotext fields and A1111's
# defaults, which an A1111 infotext without them means (A1111 writes them only where not the default). sdengine's
# own UniPC defaults are another (bh2 of order 2), so sdengine writes both fields for every UniPC image.
A1111_UNIPC_FIELDS: dict[str, tuple[str, Any]] = {"variant": ("UniPC variant", "bh1"), "order": ("UniPC order", 3)}
# A1111's other UniPC options, and the one value of each that sdengine's UniPC runs
A1111_UNIPC_FIXED = {"UniPC skip type": "time_uniform", "UniPC lower order final": "True"}


def eta_field(sampler: str | None) -> tuple[str, float]:
    """A1111's infotext field for a sampler's ``eta`` and the value it leaves unwritten (its Sampler.initialize:
    ``eta_infotext_field`` / ``eta_default``): "Eta DDIM" and 0 for DDIM (its CompVis samplers), else "Eta" and 1
    (its k-diffusion samplers, eta_ancestral)."""
    return ("Eta DDIM", 0.0) if sampler == "ddim" else ("Eta", 1.0)


def _unipc_options(parsed: Mapping[str, str]) -> dict[str, Any]:
    """UniPC's ``variant`` and ``order`` from A1111's "UniPC variant" / "UniPC order" fields; where a field is
    missing, A1111's default in an infotext not made by sdengine (sdengine's own default otherwise: left out)."""
    from sdengine.diffusion.samplers import UNIPC_VARIANTS

    a1111 = not made_by_sdengine(parsed)
    out: dict[str, Any] = {}
    name, default = A1111_UNIPC_FIELDS["variant"]
    if name in parsed or a1111:
        variant = parsed.get(name, str(default)).strip()
        if variant not in UNIPC_VARIANTS:
            raise MetadataError(
                f"{name}: {variant!r} is not one of {', '.join(UNIPC_VARIANTS)} (A1111's vary_coeff is not "
                "implemented in sdengine)"
            )
        out["variant"] = variant
    name, default = A1111_UNIPC_FIELDS["order"]
    if name in parsed or a1111:
        order = _parse_int(parsed, name) if name in parsed else default
        if order not in (1, 2, 3):
            raise MetadataError(f"{name}: {order} is not 1, 2 or 3 (the orders sdengine's UniPC has)")
        out["order"] = order
    return out


def _sampler_options(parsed: Mapping[str, str], sampler: str | None) -> dict[str, Any]:
    """``sampler_options`` from sdengine's "Sampler options" field (JSON) and A1111's own fields: "Eta" (its
    k-diffusion samplers) or "Eta DDIM" (DDIM) when the sampler takes an ``eta``, "Sigma churn", ..., and with
    UniPC "UniPC variant" / "UniPC order" (A1111's defaults bh1 and 3 where an A1111 infotext has none)."""
    from sdengine.diffusion.sampling import sampler_option_names

    takes = set(sampler_option_names(sampler)) if sampler is not None else set()
    # A1111's "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise" (k-diffusion's options), where the sampler
    # takes them (A1111 writes them only for the samplers it passes them to)
    found: dict[str, Any] = {}
    for key, name in A1111_SAMPLER_FIELDS.items():
        if name in parsed and key in takes:
            found[key] = _parse_float(parsed, name)
    key = eta_field(sampler)[0]
    if key in parsed and "eta" in takes:
        found["eta"] = _parse_float(parsed, key)
    if sampler == "unipc":
        found.update(_unipc_options(parsed))
    if "Sampler options" in parsed:
        try:
            options = json.loads(parsed["Sampler options"])
        except ValueError:
            options = None
        if not isinstance(options, dict) or not all(
            isinstance(k, str)
            and ((isinstance(v, int | float) and math.isfinite(v)) or (k == "variant" and isinstance(v, str)))
            for k, v in options.items()
        ):  # numbers; UniPC's variant, a name (written there before its A1111 field)
            raise MetadataError(f"Sampler options: {parsed['Sampler options']!r} is not a JSON object of numbers")
        return {**options, **found}
    return found


def hires_fix_fields(parsed: Mapping[str, str]) -> dict[str, str]:
    """The fields of A1111's hires fix in :func:`parse_parameters`' result ("Hires upscale", "Hires steps",
    "Hires upscaler", "Hires resize", ...), in order; empty for an image made without it. Such an image is a
    txt2img pass followed by an upscaled img2img pass, and its "Denoising strength" is that second pass's, not
    an img2img of a user's picture (:func:`hires_kwargs` reads them)."""
    return {k: v for k, v in parsed.items() if k.startswith("Hires ")}


# A1111's hires-fix fields that sdengine reproduces (sdengine.pipeline.hires); the pipeline's names.
_HIRES_FIELDS = {
    "Hires upscale": "hr_scale",
    "Hires resize": "hr_resize",
    "Hires steps": "hr_second_pass_steps",
    "Hires upscaler": "hr_upscaler",
    "Hires sampler": "hr_sampler",
    "Hires schedule type": "hr_schedule",
    "Hires prompt": "hr_prompt",
    "Hires negative prompt": "hr_negative_prompt",
}
# A1111's latent_upscale_modes and its pixel Lanczos upscalers: what sdengine.pipeline.hires runs.
HIRES_UPSCALERS = (
    "Latent",
    "Latent (antialiased)",
    "Latent (bicubic)",
    "Latent (bicubic antialiased)",
    "Latent (nearest)",
    "Latent (nearest-exact)",
    "None",
    "Lanczos",
)


# A1111's built-in upscalers of other architectures than ESRGAN's ("SwinIR 4x", "LDSR", "ScuNET PSNR", "DAT x4":
# their names' first word, lower case): refused by name
OTHER_UPSCALER_FAMILIES = ("swinir", "ldsr", "scunet", "dat")


def hires_kwargs(parsed: Mapping[str, str]) -> dict[str, Any]:
    """The hires-fix arguments of an infotext (``enable_hr``, ``hr_scale`` or ``hr_resize_x``/``hr_resize_y``,
    ``hr_second_pass_steps``, ``hr_upscaler``, ``hr_sampler``, ``hr_schedule``, ``hr_prompt``,
    ``hr_negative_prompt``); empty
    when it has neither "Hires upscale" nor "Hires resize" (A1111's test for a hires image). A missing "Hires
    upscaler" is A1111's default "Latent". Another name is an upscaler model's (ESRGAN, Real-ESRGAN: the file name
    without its suffix, or A1111's "R-ESRGAN 4x+" names), kept as it is: the generation looks it up in its
    upscalers folder and fails in one line where it is not there. A1111's upscalers that are no such model
    (SwinIR, LDSR, ScuNET, BSRGAN, DAT) are a MetadataError naming them, never a silently different image."""
    if "Hires upscale" not in parsed and "Hires resize" not in parsed:
        return {}
    out: dict[str, Any] = {"enable_hr": True}
    if "Hires upscale" in parsed:
        out["hr_scale"] = _parse_float(parsed, "Hires upscale")
    if "Hires resize" in parsed:
        m = _RE_SIZE.match(parsed["Hires resize"].strip())
        if m is None:
            raise MetadataError(f"Hires resize: {parsed['Hires resize']!r} is not WIDTHxHEIGHT")
        out["hr_resize_x"], out["hr_resize_y"] = int(m.group(1)), int(m.group(2))
    if "Hires steps" in parsed:
        out["hr_second_pass_steps"] = _parse_int(parsed, "Hires steps")
    upscaler = parsed.get("Hires upscaler", "Latent").strip()
    if not upscaler or upscaler.split()[0].lower() in OTHER_UPSCALER_FAMILIES:
        raise MetadataError(
            f"made with A1111's hires fix and the upscaler {upscaler!r}, which sdengine does not have (it has "
            f"{', '.join(HIRES_UPSCALERS)} and ESRGAN / Real-ESRGAN models): the image cannot be made again"
        )
    out["hr_upscaler"] = upscaler
    if "Hires sampler" in parsed:
        try:
            out["hr_sampler"], implied = resolve(parsed["Hires sampler"])
        except ValueError as e:
            raise MetadataError(f"cannot regenerate from this infotext: Hires sampler: {e}") from None
        if parsed["Hires sampler"] not in SAMPLERS and implied != "normal":
            out["hr_schedule"] = implied  # an old combined name ("DPM++ 2M Karras") names its schedule
    if "Hires schedule type" in parsed:
        try:
            _, out["hr_schedule"] = resolve("euler", parsed["Hires schedule type"])  # any sampler takes any
        except ValueError as e:
            raise MetadataError(f"cannot regenerate from this infotext: Hires schedule type: {e}") from None
    if "Hires prompt" in parsed:
        out["hr_prompt"] = parsed["Hires prompt"]
    if "Hires negative prompt" in parsed:
        out["hr_negative_prompt"] = parsed["Hires negative prompt"]
    return out


# sd-webui-controlnet's "Control Mode" names -> pipeline.control.CONTROL_MODES (its ControlMode values)
CONTROL_MODE_NAMES = {
    "balanced": "Balanced",
    "prompt": "My prompt is more important",
    "controlnet": "ControlNet is more important",
}
_RE_CONTROLNET = re.compile(r"^ControlNet(?: (\d+))?$")
_RE_MODEL_HASH = re.compile(r"^(.*?)\s*\[([0-9a-fA-F]{6,64})\]$")
_RE_CONTROLNET_SEPARATORS = re.compile(r"[,:\n]")

# A1111's ControlNet extension's module names (its "Module" field, the API's "module") -> sdengine's preprocessor
# (sdengine.control.PREPROCESSORS), where sdengine has that preprocessor; sdengine writes its own names
CONTROLNET_MODULES = {
    "none": "none",
    "canny": "canny",
    "invert": "invert",
    "invert (from white bg & black line)": "invert",
    "threshold": "threshold",
    "scribble": "scribble",
    "softedge": "softedge",
    "softedge_sobel": "softedge",
}
# The extension's reference preprocessors: units without a model (sdengine.nn.reference), the "Style Fidelity" slider
# (threshold_a, in [0, 1], 0.5 by default) their one option
REFERENCE_MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
REFERENCE_FIDELITY_DEFAULT = 0.5
# The preprocessor options the extension's "Threshold A" / "Threshold B" sliders hold, per preprocessor (canny's
# low and high thresholds, the threshold of threshold and scribble; softedge's blur is sdengine's own)
CONTROLNET_THRESHOLDS: dict[str, tuple[str, ...]] = {
    "canny": ("low", "high"),
    "threshold": ("threshold",),
    "scribble": ("threshold",),
    "softedge": ("blur",),
    # the reference units' (no model) "Style Fidelity" slider
    "reference_only": ("style_fidelity",),
    "reference_adain": ("style_fidelity",),
    "reference_adain+attn": ("style_fidelity",),
}
# The extension scales the control image to a short side of its "Processor Res" before these preprocessors (its
# resize_image_with_pad); a unit's -1 is the preprocessor's default resolution, 512 for each of them (its
# bound_check_params: the "Resolution" slider's value). "none" and "invert" take the image as it is.
CONTROLNET_PROCESSOR_RES = 512
CONTROLNET_PROCESSOR_RES_RANGE = (64, 2048)  # the extension's "Resolution" slider (its API's processor_res)
CONTROLNET_SCALED = frozenset({"canny", "threshold", "scribble", "softedge"})


def format_controlnet(
    model: str,
    *,
    weight: float = 1.0,
    start: float = 0.0,
    end: float = 1.0,
    module: str | None = None,
    options: Mapping[str, float] | None = None,
    processor_res: int | None = None,
    mode: str = "balanced",
    hires_mode: str | None = None,
) -> str:
    """A ``ControlNet N`` field's value as A1111's ControlNet extension writes it (its ``serialize_unit``: the
    unit's fields as ``Display Name: value`` in the unit's order, the extension's hidden -1 values left out):
    ``Module: canny, Model: NAME, Weight: W, Processor Res: R, Threshold A: LOW, Threshold B: HIGH, Guidance
    Start: S, Guidance End: E, Control Mode: ...``. ``module`` is the preprocessor that made the control image
    (None: not known, left out), ``options`` its options (written as the Threshold sliders hold them,
    :data:`CONTROLNET_THRESHOLDS`), ``processor_res`` the short side the image was scaled to before it;
    ``mode`` the extension's control mode (:data:`CONTROL_MODE_NAMES`; written where not the default, Balanced),
    ``hires_mode`` sdengine's ``Hires Control Mode`` (the hires fix's second pass, where not ``mode``).
    Numbers are written exactly (read back to the same float)."""
    parts: list[tuple[str, Any]] = []
    if module is not None:
        parts.append(("Module", module))
    parts += [("Model", model), ("Weight", float(weight))]
    if processor_res is not None:
        parts.append(("Processor Res", int(processor_res)))
    names = CONTROLNET_THRESHOLDS.get(module or "", ())
    for slider, name in zip(("Threshold A", "Threshold B"), names, strict=False):
        if options and name in options:
            parts.append((slider, float(options[name])))
    parts += [("Guidance Start", float(start)), ("Guidance End", float(end))]
    if mode != "balanced":  # the extension's field and names
        parts.append(("Control Mode", CONTROL_MODE_NAMES[mode]))
    if hires_mode is not None and hires_mode != mode:  # sdengine's field: the hires fix's second pass
        parts.append(("Hires Control Mode", CONTROL_MODE_NAMES[hires_mode]))
    out = []
    for key, value in parts:
        text = _number(value) if isinstance(value, int | float) else str(value)
        # the extension splits the value on "," and ": ": a name holding them loses them (as Lora hashes' names)
        out.append(f"{key}: {_RE_CONTROLNET_SEPARATORS.sub('', text)}")
    return ", ".join(out)


@dataclass(frozen=True)
class RecordedControlNet:
    """One ``ControlNet N`` field of an infotext: the model's name (A1111 writes ``NAME [HASH]``; the hash is
    None when absent), its weight and guidance start/end, and the preprocessor (``Module``) where given."""

    name: str
    hash: str | None
    weight: float
    start: float
    end: float
    module: str | None
    rule: str = "diffusers"  # how start/end pick the steps: sdengine's "ControlNet step rule" field, else A1111's
    options: Mapping[str, float] = dataclasses.field(default_factory=dict)  # the preprocessor's (Threshold A/B)
    processor_res: int | None = None  # "Processor Res": the short side the control image was scaled to first
    mode: str = "balanced"  # the extension's "Control Mode" (pipeline.control.CONTROL_MODES), else balanced
    resize_mode: str | None = None  # the extension's per-unit "Resize Mode" (sdengine.io.resize.RESIZE_MODES' name)
    hires_mode: str | None = None  # sdengine's "Hires Control Mode": the hires fix's second pass, None = mode
    # the extension's "Pixel Perfect": the processor resolution is worked out from the control image's size and
    # the output's (sdengine.control.preprocess.pixel_perfect_resolution), not the recorded Processor Res
    pixel_perfect: bool = False
    union_mode: str | None = None  # sdengine's "Union Mode": a Flux Union ControlNet's control kind

    @property
    def preprocessor(self) -> str | None:
        """sdengine's preprocessor for the recorded ``Module`` (:data:`CONTROLNET_MODULES`); None when there is
        none or sdengine does not have it."""
        return None if self.module is None else CONTROLNET_MODULES.get(self.module.strip().lower())


def _control_mode(key: str, field: str, text: str) -> str:
    mode = next((k for k, n in CONTROL_MODE_NAMES.items() if n.lower() == text.strip().lower()), None)
    if mode is None:
        raise MetadataError(f"{key}: unknown {field} {text!r}; known: {', '.join(CONTROL_MODE_NAMES.values())}")
    return mode


def recorded_controlnets(parsed: Mapping[str, str]) -> list[RecordedControlNet]:
    """The ControlNets an infotext records (sdengine's and A1111's ``ControlNet N: "Module: ..., Model: ...,
    Weight: ...`` fields), in their order: the model, weight, guidance start/end, the preprocessor (``Module``)
    with its options (``Threshold A`` / ``Threshold B``, :data:`CONTROLNET_THRESHOLDS`; the preprocessor's
    defaults where absent) and ``Processor Res``, the ``Control Mode`` (and sdengine's ``Hires Control Mode``)
    and the extension's per-unit ``Resize Mode``. The step rule is sdengine's ``ControlNet step rule`` field
    (one rule, or one per ControlNet); without it an sdengine image's is diffusers' and any other's (A1111's
    extension's) is A1111's. A field without a model, a bad number, or a rule list of another length is a
    MetadataError, as is an unknown Control Mode. A ``Processor Res`` of -1 is the extension's default resolution
    (:data:`CONTROLNET_PROCESSOR_RES`) for a preprocessor that scales the image (:data:`CONTROLNET_SCALED`);
    ``Pixel Perfect: True`` is kept (``pixel_perfect``): the resolution then comes from the control image's size
    and the output's, which the reader works out."""
    out: list[tuple[int, RecordedControlNet]] = []
    default_rule = "diffusers" if made_by_sdengine(parsed) else "a1111"
    for key, value in parsed.items():
        m = _RE_CONTROLNET.match(key)
        if m is None:
            continue
        fields = {k.strip(): v.strip() for k, v in parse_fields(value)}
        model = fields.get("Model", "").strip()
        kind = fields.get("Module", "").strip().lower()
        if kind in REFERENCE_MODULES:  # a reference unit: no model to load
            raise MetadataError(
                f"{key}: a {kind} unit (no model): --from-png does not remake reference units; give it with "
                f"--control {kind}:IMAGE and its settings"
            )
        if not model or model.lower() == "none":
            raise MetadataError(f"{key}: no model recorded in {value!r}")
        hm = _RE_MODEL_HASH.match(model)
        name, digest = (hm.group(1), hm.group(2).lower()) if hm else (model, None)
        try:
            weight = float(fields.get("Weight", "1"))
            start = float(fields.get("Guidance Start", "0"))
            end = float(fields.get("Guidance End", "1"))
            res = int(float(fields["Processor Res"])) if "Processor Res" in fields else -1
            sliders = [float(fields[k]) if k in fields else -1.0 for k in ("Threshold A", "Threshold B")]
        except ValueError:
            raise MetadataError(
                f"{key}: a weight, guidance or preprocessor value is not a number in {value!r}"
            ) from None
        module = fields.get("Module")
        preprocessor = None if module is None else CONTROLNET_MODULES.get(module.lower())
        options = {
            option: v
            for option, v in zip(CONTROLNET_THRESHOLDS.get(preprocessor or "", ()), sliders, strict=False)
            if v != -1  # the extension's hidden slider
        }
        mode = _control_mode(key, "Control Mode", fields.get("Control Mode", "Balanced"))
        hr = fields.get("Hires Control Mode")
        hires_mode = None if hr is None else _control_mode(key, "Hires Control Mode", hr)
        pixel_perfect = fields.get("Pixel Perfect", "False").strip().lower() == "true"
        # a recorded -1 is the extension's "default", its preprocessor's 512 (no field: not scaled, as sdengine writes)
        if "Processor Res" in fields and res == -1 and preprocessor in CONTROLNET_SCALED:
            res = CONTROLNET_PROCESSOR_RES
        resize_mode = None
        if "Resize Mode" in fields:  # the extension's per-unit fit of the control image ("Crop and Resize")
            from sdengine.io.resize import resize_mode_name

            try:
                resize_mode = resize_mode_name(fields["Resize Mode"])
            except SdengineError:
                raise MetadataError(f"{key}: Resize Mode {fields['Resize Mode']!r} is not a resize mode") from None
        unit = RecordedControlNet(
            name,
            digest,
            weight,
            start,
            end,
            module,
            default_rule,
            options,
            None if res == -1 else res,
            mode,
            resize_mode,
            hires_mode,
            pixel_perfect and preprocessor in CONTROLNET_SCALED,
            fields.get("Union Mode"),
        )
        out.append((int(m.group(1) or 0), unit))
    units = [r for _, r in sorted(out, key=lambda t: t[0])]
    text = parsed.get("ControlNet step rule")
    if text is None or not units:
        return units
    rules = [r.strip() for r in text.split(",")]
    if len(rules) == 1:
        rules *= len(units)
    if len(rules) != len(units):
        raise MetadataError(f"ControlNet step rule: {text!r} names {len(rules)} rules for {len(units)} ControlNets")
    return [dataclasses.replace(u, rule=r) for u, r in zip(units, rules, strict=True)]


_RE_IP_ADAPTER = re.compile(r"^IP-Adapter (\d+)$")


def _named(name: str, digest: str | None) -> str:
    """``NAME [HASH]`` (A1111's way of naming a model file), the separators A1111's readers split on removed."""
    clean = _RE_CONTROLNET_SEPARATORS.sub("", name)
    return f"{clean} [{digest}]" if digest else clean


def format_ip_adapter(
    model: str,
    *,
    model_hash: str | None = None,
    weight: float = 1.0,
    clip_vision: str | None = None,
    clip_vision_hash: str | None = None,
    negative_rule: str | None = None,
    images: int | None = None,
    start: float = 0.0,
    end: float = 1.0,
    scaling: str = "output",
    layer_scales: Sequence[float] | None = None,
) -> str:
    """An ``IP-Adapter N`` field's value (sdengine's own field): ``Model: NAME [HASH], Weight: W, CLIP vision: NAME
    [HASH], Negative rule: R, Images: K`` (``Start`` / ``End`` where the unit ran over part of the steps;
    ``Scaling: S`` where it is not "output"; ``Layer weights: W1 W2 ...`` where each layer had its own). The
    adapter's and the encoder's names are their file stems (a folder's name), the hashes :func:`model_hash` of the
    file (a folder's weights file); ``clip_vision``, ``negative_rule`` and ``images`` are left out for a unit given
    CLIP vision outputs instead of pictures. Numbers are written exactly (read back to the same float)."""
    parts: list[tuple[str, Any]] = [("Model", _named(model, model_hash)), ("Weight", float(weight))]
    if clip_vision is not None:
        parts.append(("CLIP vision", _named(clip_vision, clip_vision_hash)))
    if negative_rule is not None:
        parts.append(("Negative rule", negative_rule))
    if images is not None:
        parts.append(("Images", int(images)))
    if float(start) != 0.0 or float(end) != 1.0:
        parts += [("Start", float(start)), ("End", float(end))]
    if scaling != "output":
        parts.append(("Scaling", scaling))
    if layer_scales is not None:
        parts.append(("Layer weights", " ".join(_number(float(v)) for v in layer_scales)))
    return ", ".join(f"{k}: {_number(v) if isinstance(v, int | float) else v}" for k, v in parts)


@dataclass(frozen=True)
class RecordedIPAdapter:
    """One ``IP-Adapter N`` field of an infotext (:func:`format_ip_adapter`): the adapter's name and hash (None when
    not written), its weight, the CLIP vision encoder's name and hash, the negative rule and the number of pictures
    (None where not written: a unit given CLIP vision outputs), the start and end fractions of the steps."""

    name: str
    hash: str | None
    weight: float
    clip_vision: str | None = None
    clip_vision_hash: str | None = None
    negative_rule: str | None = None
    images: int | None = None
    start: float = 0.0
    end: float = 1.0
    scaling: str = "output"
    layer_scales: tuple[float, ...] | None = None


def _name_and_hash(text: str) -> tuple[str, str | None]:
    hm = _RE_MODEL_HASH.match(text.strip())
    return (hm.group(1).strip(), hm.group(2).lower()) if hm else (text.strip(), None)


def recorded_ip_adapters(parsed: Mapping[str, str]) -> list[RecordedIPAdapter]:
    """The IP-Adapters an infotext records (sdengine's ``IP-Adapter N`` fields), in their order. A field without a
    model, or with a weight, start, end or picture count that is not a number, is a MetadataError."""
    out: list[tuple[int, RecordedIPAdapter]] = []
    for key, value in parsed.items():
        m = _RE_IP_ADAPTER.match(key)
        if m is None:
            continue
        fields = {k.strip(): v.strip() for k, v in parse_fields(value)}
        model = fields.get("Model", "")
        if not model:
            raise MetadataError(f"{key}: no model recorded in {value!r}")
        name, digest = _name_and_hash(model)
        try:
            weight = float(fields.get("Weight", "1"))
            start, end = float(fields.get("Start", "0")), float(fields.get("End", "1"))
            images = int(fields["Images"]) if "Images" in fields else None
            layers = tuple(float(v) for v in fields["Layer weights"].split()) if "Layer weights" in fields else None
        except ValueError:
            raise MetadataError(
                f"{key}: a weight, start, end, layer weight or picture count is not a number in {value!r}"
            ) from None
        if layers is not None and (not layers or not all(math.isfinite(v) for v in layers)):
            raise MetadataError(f"{key}: Layer weights must be finite numbers ({value!r})")
        if not math.isfinite(weight) or (images is not None and images < 1):
            raise MetadataError(f"{key}: weight {weight} / Images {images} cannot be run again ({value!r})")
        encoder, encoder_hash = _name_and_hash(fields["CLIP vision"]) if "CLIP vision" in fields else (None, None)
        unit = RecordedIPAdapter(
            name,
            digest,
            weight,
            encoder,
            encoder_hash,
            fields.get("Negative rule"),
            images,
            start,
            end,
            fields.get("Scaling", "output"),
            layers,
        )
        out.append((int(m.group(1)), unit))
    return [r for _, r in sorted(out, key=lambda t: t[0])]


_RE_REDUX = re.compile(r"^Redux (\d+)$")


def format_redux(
    *,
    image: str | None,
    image_hash: str | None,
    strength: float,
    model: str,
    model_hash: str | None = None,
    siglip: str | None = None,
    siglip_hash: str | None = None,
) -> str:
    """A ``Redux N`` field's value (sdengine's own field, as A1111 / Forge extensions write theirs): ``Image: NAME
    [HASH], Strength: S, Model: NAME [HASH], SigLIP: NAME [HASH]``. The image cannot be embedded: its file name and
    the hash of its pixels (:func:`sdengine.pipeline.redux.image_hash`) name it; ``image`` None: the unit was given
    SigLIP tokens (``Tokens: given``). ``siglip`` None: the SigLIP encoder beside a FluxPriorReduxPipeline folder."""
    parts: list[str] = [f"Image: {_named(image, image_hash)}" if image is not None else "Tokens: given"]
    parts.append(f"Strength: {_number(float(strength))}")
    parts.append(f"Model: {_named(model, model_hash)}")
    if siglip is not None:
        parts.append(f"SigLIP: {_named(siglip, siglip_hash)}")
    return ", ".join(parts)


@dataclass(frozen=True)
class RecordedRedux:
    """One ``Redux N`` field of an infotext (:func:`format_redux`); ``image`` None: SigLIP tokens were given."""

    image: str | None
    image_hash: str | None
    strength: float
    model: str
    model_hash: str | None
    siglip: str | None = None
    siglip_hash: str | None = None


def recorded_redux(parsed: Mapping[str, str]) -> list[RecordedRedux]:
    """The FLUX.1 Redux units an infotext records (``Redux N`` fields), in their order; a field without a model or
    an image, or whose strength is not a number from 0 to 10, is a MetadataError."""
    out: list[tuple[int, RecordedRedux]] = []
    for key, value in parsed.items():
        m = _RE_REDUX.match(key)
        if m is None:
            continue
        fields = {k.strip(): v.strip() for k, v in parse_fields(value)}
        if not fields.get("Model") or not (fields.get("Image") or fields.get("Tokens")):
            raise MetadataError(f"{key}: no Redux model or image recorded in {value!r}")
        try:
            strength = float(fields.get("Strength", "1"))
        except ValueError:
            strength = float("nan")
        if not 0 <= strength <= 10:
            raise MetadataError(f"{key}: Strength must be a number from 0 to 10 in {value!r}")
        image, image_digest = _name_and_hash(fields["Image"]) if fields.get("Image") else (None, None)
        model, model_digest = _name_and_hash(fields["Model"])
        siglip, siglip_digest = _name_and_hash(fields["SigLIP"]) if fields.get("SigLIP") else (None, None)
        unit = RecordedRedux(image, image_digest, strength, model, model_digest, siglip, siglip_digest)
        out.append((int(m.group(1)), unit))
    return [r for _, r in sorted(out, key=lambda t: t[0])]


# ---------------------------------------------------------------------------------------- files


def save_png(image: Image.Image, path: str | Path, parameters_text: str) -> Path:
    """Write ``image`` as a PNG with ``parameters_text`` in a ``parameters`` text chunk (``tEXt``
    when the text is Latin-1, else ``iTXt``, as Pillow and A1111 do). Written under a temporary
    name in the same folder and renamed (:func:`sdengine.io.atomic.atomic_write`), so a reader never sees
    half a file; the file's mode follows the umask."""
    path = Path(path)
    info = PngImagePlugin.PngInfo()
    info.add_text(PARAMETERS_KEY, parameters_text)
    with atomic_write(path) as f:  # the mode follows the umask, like every other output
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path: str | Path) -> str | None:
    """The ``parameters`` text of a PNG (``None`` when it has none); a ``MetadataError`` naming the
    file when it is missing or not an image that can be read. PNGs are read chunk by chunk (no
    pixel is decoded, whatever the image size); other formats through Pillow's header."""
    path = Path(path)
    try:
        chunks = png_text_chunks(path)  # the chunk reader (sdengine.image_info), with its limits
    except ImageInfoError as e:
        raise MetadataError(str(e)) from None
    if chunks is not None:
        return chunks.get(PARAMETERS_KEY)
    try:
        with Image.open(path) as img:
            text = img.info.get(PARAMETERS_KEY)
    except Image.DecompressionBombError as e:
        raise MetadataError(f"cannot read image metadata from {path}: image too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise MetadataError(f"cannot read image metadata from {path}: {e}") from e
    return None if text is None else str(text)


# ---------------------------------------------------------------------------------------- hashes

_BLOCK = 1 << 20


def _sha256(path: str | Path, offset: int = 0) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        for block in iter(lambda: f.read(_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def model_hash(path: str | Path) -> str:
    """A1111's "Model hash": the first 10 hex digits of the file's SHA-256 (read in 1 MiB blocks)."""
    return _sha256(path)[:10]


def legacy_hash(path: str | Path) -> str:
    """A1111's old model hash (its ``model_hash``/``legacy_hash``, also kohya's ``ss_sd_model_hash`` and the hash
    sd-webui-controlnet writes beside a ControlNet's name): SHA-256 of the 64 KiB at offset 1 MiB, first 8 hex
    digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(0x100000)
        h.update(f.read(0x10000))
    return h.hexdigest()[:8]


def files_hash(paths: Sequence[str | Path]) -> str:
    """ "Model hash" / "VAE hash" of weights stored as several files (a sharded diffusers component): the first 10
    hex digits of the SHA-256 of the files' bytes one after the other, in the order given (the shards' own
    order, 00001, 00002, ...). Of one file, its :func:`model_hash`."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_BLOCK), b""):
                h.update(block)
    return h.hexdigest()[:10]


def lora_hash(path: str | Path) -> str:
    """A1111's "Lora hashes" entry: 12 hex digits of SHA-256; for ``.safetensors`` of the file after
    its header (kohya's "addnet" hash, which A1111 uses so that editing metadata keeps the hash)."""
    path = Path(path)
    offset = 0
    if path.suffix.lower() == ".safetensors":
        with open(path, "rb") as f:
            header = f.read(8)
        if len(header) < 8:
            raise MetadataError(f"{path} is too short to be a safetensors file")
        offset = 8 + int.from_bytes(header, "little")
    return _sha256(path, offset)[:12]


__all__ = [
    "RecordedRedux",
    "format_redux",
    "recorded_redux",
    "CONTROL_MODE_NAMES",
    "MASKED_CONTENT",
    "SOFT_INPAINTING_ENABLED",
    "SOFT_INPAINTING_KEYS",
    "MAX_INFOTEXT_CHARS",
    "PARAMETERS_KEY",
    "VERSION",
    "MetadataError",
    "files_hash",
    "format_lora_hashes",
    "format_parameters",
    "hires_fix_fields",
    "hires_kwargs",
    "HIRES_UPSCALERS",
    "OTHER_UPSCALER_FAMILIES",
    "lora_hash",
    "model_hash",
    "parse_fields",
    "parse_lora_hashes",
    "parse_parameters",
    "quote",
    "read_png_parameters",
    "save_png",
    "soft_inpainting_kwargs",
    "made_by_sdengine",
    "refiner_switch",
    "REFINER_SWITCH_RULES",
    "eta_field",
    "to_generate_kwargs",
    "recorded_controlnets",
    "RecordedControlNet",
    "CONTROLNET_MODULES",
    "CONTROLNET_THRESHOLDS",
    "REFERENCE_FIDELITY_DEFAULT",
    "REFERENCE_MODULES",
    "format_controlnet",
    "format_ip_adapter",
    "recorded_ip_adapters",
    "RecordedIPAdapter",
]
