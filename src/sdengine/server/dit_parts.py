"""The parts an SD3 / Flux single file lacks (text encoders, Flux's VAE), filled from the server's folders.

BFL's ``flux1-dev.safetensors`` holds the transformer only: its CLIP-L, T5-XXL and 16-channel VAE
(``ae.safetensors``) are separate files; Stability's ``sd3.5_medium.safetensors`` lacks its CLIP-L / bigG / T5.
Forge serves such files by picking those parts from its folders, by kind, and lets a request choose among several
of one kind (its A1111 field ``forge_additional_modules``). The server does the same: the text encoders of
``--models-dir``'s ``text_encoders/`` (or ``clip/``) and the VAEs of ``--vaes-dir``, each told by its tensors
(T5 by its block names, CLIP-L and bigG by their width 768 / 1280, a 16-channel VAE by its decoder's input).
ComfyUI's Qwen-Image release is served the same way: ``diffusion_models/qwen_image_*.safetensors`` with a Qwen2.5-VL
text encoder of ``text_encoders/`` (told by its ``layers.N.self_attn`` and ``embed_tokens`` names) and a Qwen-Image
VAE of ``--vaes-dir`` (its 3-D decoder: the original Wan names or diffusers' 5-D ``decoder.conv_in``); Qwen2's
tokenizer is the folder beside the text encoder (``text_encoders/qwen25_tokenizer/`` or ``tokenizer/``,
:func:`sdengine.pipeline.qwen_image_loading.tokenizer_beside`), a one-line 400 when there is none.

FLUX.2 [klein]'s (``diffusion_models/flux-2-klein-4b.safetensors``) likewise: a Qwen3 text encoder of
``text_encoders/`` (told from Qwen2.5-VL's by its q / k norms, ``self_attn.q_norm``) with Qwen2's tokenizer beside it,
and a FLUX.2 VAE of ``--vaes-dir`` (told by its batch-norm statistics, ``bn.running_var``). FLUX.2 [dev]'s
(``diffusion_models/flux2-dev.safetensors``, told by its guidance embedding) takes a Mistral Small 3 text encoder of
``text_encoders/`` (told by having neither Qwen3's q / k norms nor Qwen2.5-VL's q / k / v biases; ComfyUI's
``mistral_3_small_flux2_bf16.safetensors``) with Mistral's tokenizer inside it (ComfyUI's ``tekken_model``) or beside
it (``text_encoders/mistral_tokenizer/`` or ``tokenizer/``: FLUX.2-dev's ``tokenizer/`` folder,
:func:`sdengine.pipeline.flux2_loading.dev_tokenizer_beside`), and the same FLUX.2 VAE.

Z-Image's (``diffusion_models/z_image_turbo_bf16.safetensors``, told by its pad tokens and first layer's modulation,
:func:`sdengine.weights.z_image_file.is_z_image_state_dict`) takes a Qwen3 text encoder of ``text_encoders/``
(ComfyUI's ``qwen_3_4b.safetensors``, told as FLUX.2 [klein]'s is) with Qwen2's tokenizer beside it, and a 16-channel
VAE of ``--vaes-dir`` (FLUX.1's ``ae.safetensors``).

The parts chosen become part of the model's loader reference (:func:`compose`): ``PATH`` then ``\\0kind=PATH`` for
each part (NUL never occurs in a path), so that a worker reloads when another part is chosen, and the loader
splits it back (:func:`split`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sdengine.server.errors import BadRequest

SEP = "\x00"
KINDS = ("clip_l", "clip_g", "t5", "vae", "qwen_text", "qwen_vae", "qwen3_text", "flux2_vae", "mistral_text")
KIND_NAMES = {
    "clip_l": "CLIP-L",
    "clip_g": "CLIP bigG",
    "t5": "T5-XXL",
    "vae": "16-channel VAE",
    "qwen_text": "Qwen2.5-VL text encoder",
    "qwen_vae": "Qwen-Image VAE",
    "qwen3_text": "Qwen3 text encoder",
    "flux2_vae": "FLUX.2 VAE",
    "mistral_text": "Mistral Small 3 text encoder",
}
VAE_KINDS = ("vae", "qwen_vae", "flux2_vae")  # the kinds picked from --vaes-dir
CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g"}
MAX_MODULES = 8


def compose(ref: str, parts: dict[str, str]) -> str:
    """A loader reference of ``ref`` with its parts given apart (``ref`` itself when there are none)."""
    return ref + "".join(f"{SEP}{k}={parts[k]}" for k in KINDS if k in parts)


def split(ref: str) -> tuple[str, dict[str, str]]:
    """(model path, parts) of a reference made by :func:`compose`."""
    base, *rest = ref.split(SEP)
    return base, dict(item.split("=", 1) for item in rest)


_READ: dict[tuple[str, str, int, int], Any] = {}  # (what, path, mtime, size) -> what was read of a file's header


def _once(what: str, path: Path, read: Any) -> Any:
    """``read(path)``, kept while the file is unchanged: the listings and every request ask again."""
    try:
        st = path.stat()
    except OSError:
        return read(path)
    key = (what, str(path), st.st_mtime_ns, st.st_size)
    if key not in _READ:
        if len(_READ) > 4096:
            _READ.clear()
        _READ[key] = read(path)
    return _READ[key]


def _header(path: Path) -> dict[str, Any]:
    from sdengine.weights.io import WeightsError, read_safetensors_header

    try:
        return read_safetensors_header(path)[0]
    except (OSError, WeightsError):
        return {}


def _kind_of(path: Path) -> tuple[str, int] | None:
    """(``clip``, its width), (``t5``, 0), (``vae``, 16), (``qwen_text``, 0), (``qwen_vae``, 0), (``qwen3_text``, 0),
    (``flux2_vae``, 0) or (``mistral_text``, 0) by a file's tensors; None for anything else."""
    from sdengine.weights.qwen_vae_file import is_original_layout

    entries = _header(path)
    if any(n.endswith("layers.0.self_attn.q_proj.weight") for n in entries) and any(
        n.endswith("embed_tokens.weight") for n in entries
    ):
        qwen3 = any(n.endswith("layers.0.self_attn.q_norm.weight") for n in entries)  # Qwen3's q / k norms
        if qwen3:
            return ("qwen3_text", 0)
        biased = any(n.endswith("layers.0.self_attn.q_proj.bias") for n in entries)  # Qwen2.5-VL's biases
        return ("qwen_text", 0) if biased else ("mistral_text", 0)
    if "bn.running_var" in entries and any(n.startswith("decoder.") for n in entries):  # FLUX.2's batch norm
        return ("flux2_vae", 0)
    conv_in = entries.get("decoder.conv_in.weight")
    if is_original_layout(entries) or (isinstance(conv_in, dict) and len(conv_in.get("shape") or ()) == 5):
        return ("qwen_vae", 0)
    if any(".block.0.layer.0." in n or n.endswith("shared.weight") for n in entries):
        return ("t5", 0)
    for n, info in entries.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if n.endswith("embeddings.token_embedding.weight") and shape and len(shape) == 2:
            return ("clip", int(shape[1]))
        if n.endswith("decoder.conv_in.weight") and shape and len(shape) == 4 and int(shape[1]) == 16:
            return ("vae", 16)
    return None


def _clip_kind(name: str, width: int, widths: set[int]) -> str:
    """CLIP-L (768 wide) or bigG (1280); a CLIP of another width (a small test model) is bigG when its file name
    says so (``clip_g``, ``bigG``) or it is not the narrowest of the folder's, else CLIP-L."""
    if width in CLIP_WIDTHS:
        return CLIP_WIDTHS[width]
    odd = {w for w in widths if w not in CLIP_WIDTHS}
    lower = _base_name(name).lower()
    return "clip_g" if "clip_g" in lower or "bigg" in lower or width != min(odd) else "clip_l"


def _needed(path: Path) -> tuple[str, ...]:
    """The parts an SD3 / Flux / Qwen-Image / FLUX.2 / Z-Image single file lacks (required ones only: SD3's T5 is
    optional, see :func:`optional`); () for any other model or a folder."""
    from sdengine.pipeline.flux2_loading import is_dev_file, is_flux2_file
    from sdengine.pipeline.flux_loading import COMFY_CLIP_L, COMFY_T5, VAE_PREFIXES, is_flux_file
    from sdengine.pipeline.qwen_image_loading import is_qwen_image_state_dict
    from sdengine.weights.z_image_file import is_z_image_state_dict

    if not path.is_file():
        return ()
    names = list(_header(path))
    if is_qwen_image_state_dict(names):
        return ("qwen_text", "qwen_vae")
    if is_z_image_state_dict(names):  # Z-Image: Qwen3-4B and FLUX.1's ae.safetensors
        return ("qwen3_text", "vae")
    if is_flux2_file(path):  # before FLUX.1's: its double_blocks names are FLUX.1's too
        return ("mistral_text", "flux2_vae") if is_dev_file(path) else ("qwen3_text", "flux2_vae")
    if is_flux_file(path):
        held = {
            "clip_l": any(n.startswith(COMFY_CLIP_L) for n in names),
            "t5": any(n.startswith(COMFY_T5) for n in names),
            "vae": any(n.startswith(VAE_PREFIXES) for n in names),
        }
        return tuple(k for k, has in held.items() if not has)
    from sdengine.weights import sd3_files as sf

    if sf.is_sd3_file(path):
        return tuple(k for k in ("clip_l", "clip_g") if not sf.has_clip(names, k))
    return ()


def _optional(path: Path) -> tuple[str, ...]:
    """An SD3 file's T5 when it lacks one (it runs without, as diffusers' pipeline with ``text_encoder_3=None``)."""
    from sdengine.weights import sd3_files as sf

    if path.is_file() and sf.is_sd3_file(path) and not any(n.startswith(sf.T5_PREFIX) for n in _header(path)):
        return ("t5",)
    return ()


def candidates(catalog: Any) -> dict[str, list[tuple[str, Path]]]:
    """Each kind's files: (listed name, path) of ``text_encoders/`` / ``clip/`` and ``--vaes-dir``."""
    out: dict[str, list[tuple[str, Path]]] = {k: [] for k in KINDS}
    encoders = [(e.name, Path(e.ref), kind_of(Path(e.ref))) for e in catalog.text_encoders()]
    widths = {k[1] for _, _, k in encoders if k is not None and k[0] == "clip"}
    for name, p, k in encoders:
        if k is not None and k[0] in ("t5", "qwen_text", "qwen3_text", "mistral_text"):
            out[k[0]].append((name, p))
        elif k is not None and k[0] == "clip":
            out[_clip_kind(name, k[1], widths)].append((name, p))
    for e in catalog.vaes():
        p = Path(e.ref)
        if p.is_file() and kind_of(p) == ("vae", 16):
            out["vae"].append((e.name, p))
        elif p.is_file() and kind_of(p) == ("qwen_vae", 0):
            out["qwen_vae"].append((e.name, p))
        elif p.is_file() and kind_of(p) == ("flux2_vae", 0):
            out["flux2_vae"].append((e.name, p))
    return out


def _base_name(name: str) -> str:
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def fill(catalog: Any, ref: str, modules: Sequence[str] | None) -> str:
    """``ref`` with the parts its SD3 / Flux file lacks, picked by kind; ``modules`` (Forge's
    ``forge_additional_modules``): the request's choice, names as listed (a path's file name is matched too, as
    Forge sends its own paths). A one-line BadRequest for a module that is no such part, a kind with no file, or
    several files of a kind the request does not choose between."""
    if modules is not None and (
        not isinstance(modules, list | tuple) or not all(isinstance(m, str) and m for m in modules)
    ):
        raise BadRequest("modules (forge_additional_modules) must be a list of file names")
    if modules is not None and len(modules) > MAX_MODULES:
        raise BadRequest(f"modules: at most {MAX_MODULES} files, got {len(modules)}")
    path = Path(ref)
    need, may = needed(path), optional(path)
    if not need and not may:
        if modules:
            raise BadRequest(f"modules {', '.join(modules)}: {path.name} needs no text encoder or VAE given apart")
        return ref
    found = candidates(catalog)
    chosen: dict[str, tuple[str, Path]] = {}
    for m in modules or ():
        hits = [(k, n, p) for k in KINDS for n, p in found[k] if m in (n, p.name) or _base_name(m) in (n, p.name)]
        if not hits:
            have = ", ".join(n for k in KINDS for n, _ in found[k]) or "none"
            raise BadRequest(
                f"module {m!r} is no text encoder of text_encoders/ (clip/) nor a VAE of --vaes-dir; available: {have}"
            )
        kind, name, p = hits[0]
        if kind in chosen and chosen[kind][0] != name:
            raise BadRequest(f"modules: {chosen[kind][0]} and {name} are both {KIND_NAMES[kind]}; give one")
        chosen[kind] = (name, p)
    parts: dict[str, str] = {}
    for kind in (*need, *may):
        if kind in chosen:
            parts[kind] = str(chosen.pop(kind)[1])
            continue
        files = found[kind]
        where = "--vaes-dir" if kind in VAE_KINDS else "text_encoders/ (or clip/) of --models-dir"
        if len(files) > 1:
            raise BadRequest(
                f"{path.name} needs a {KIND_NAMES[kind]}: {where} holds several "
                f"({', '.join(n for n, _ in files)}); choose one with modules (forge_additional_modules)"
            )
        if files:
            parts[kind] = str(files[0][1])
        elif kind in need:
            raise BadRequest(f"{path.name} needs a {KIND_NAMES[kind]} file: put one in {where}")
    if chosen:  # a choice of a kind the file holds itself
        raise BadRequest(
            f"modules {', '.join(n for n, _ in chosen.values())}: {path.name} holds its own "
            f"{', '.join(KIND_NAMES[k] for k in chosen)}"
        )
    if "qwen_text" in parts or "qwen3_text" in parts:
        from sdengine.pipeline.qwen_image_loading import tokenizer_beside

        text = Path(parts.get("qwen_text") or parts["qwen3_text"])
        if tokenizer_beside(text) is None:
            raise BadRequest(
                f"{path.name} needs Qwen2's tokenizer beside its text encoder {text.name}: put the tokenizer folder "
                "(Qwen-Image's tokenizer/ or ComfyUI's comfy/text_encoders/qwen25_tokenizer) in text_encoders/ as "
                "qwen25_tokenizer/"
            )
    if "mistral_text" in parts:
        from sdengine.pipeline.flux2_loading import dev_tokenizer_beside, holds_tekken

        text = Path(parts["mistral_text"])
        if not holds_tekken(text) and dev_tokenizer_beside(text) is None:
            raise BadRequest(
                f"{path.name} needs Mistral's tokenizer: its text encoder {text.name} carries none (ComfyUI's "
                "tekken_model) and none is beside it: put FLUX.2-dev's tokenizer/ folder (its tokenizer.json) in "
                "text_encoders/ as mistral_tokenizer/"
            )
    return compose(ref, parts)


def kind_of(path: Path) -> tuple[str, int] | None:
    """:func:`_kind_of`, read once per version of the file."""
    result: tuple[str, int] | None = _once("kind_of", path, _kind_of)
    return result


def needed(path: Path) -> tuple[str, ...]:
    """:func:`_needed`, read once per version of the file."""
    result: tuple[str, ...] = _once("needed", path, _needed)
    return result


def optional(path: Path) -> tuple[str, ...]:
    """:func:`_optional`, read once per version of the file."""
    result: tuple[str, ...] = _once("optional", path, _optional)
    return result
