"""Names a request may use for models, LoRAs and ControlNets, and the files they select.

A name is a built-in (``emoji``, the LoRA ``emoji-fruit``, the ControlNet ``emoji-controlnet-canny``) or a
file/folder inside the configured folder, resolved with :func:`sdengine.io.paths.resolve_inside` (no ``..``,
absolute paths, symlinks out or percent-encoded variants). Model files load only through safetensors: a
pickle checkpoint (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) is refused by name, before its file is opened.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdengine.catalog import VAE_SUFFIXES, WEIGHT_SUFFIXES, ambiguous_files
from sdengine.io.paths import UnsafePathError, is_inside, resolve_inside
from sdengine.server.errors import BadRequest

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN_MODELS = {"emoji": "emoji"}  # name -> what load_pipeline takes
BUILTIN_LORAS = {p.stem: p for p in sorted((ASSETS / "loras").glob("*.safetensors"))}
BUILTIN_CONTROLNETS = {"emoji-controlnet-canny": ASSETS / "models" / "emoji-controlnet-canny"}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
MODEL_SUFFIXES = WEIGHT_SUFFIXES["models"]  # what `sdengine list models` lists (a bare name of two is refused)
# the files --clip-vision-dir and --ip-adapters-dir list: safetensors, and .bin pickles (IP-Adapter's own
# ip-adapter_sd15.bin, transformers' pytorch_model.bin), which are only ever read weights-only
WEIGHT_FILE_SUFFIXES = (".safetensors", ".bin")
FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a diffusers image_encoder/ folder's weights
# ComfyUI's model sub-folders, looked for inside --models-dir (its checkpoints sit at the top, as ever)
DIFFUSION_MODEL_FOLDERS = ("diffusion_models", "unet")
TEXT_ENCODER_FOLDERS = ("text_encoders", "clip")
STYLE_MODEL_FOLDERS = ("style_models",)  # ComfyUI's models/style_models (FLUX.1 Redux)
_HASH_SUFFIX = re.compile(r"\s*\[[0-9a-fA-F]{6,64}\]$")  # A1111 titles: "name [hash]"


def strip_title(name: str) -> str:
    """A1111 writes models as ``name.safetensors [abcdef1234]``: the name without the hash."""
    return _HASH_SUFFIX.sub("", name.strip())


class AmbiguousModelName(BadRequest):
    """A bare model name that two files of --models-dir share (``dup.safetensors`` and ``dup.ckpt``)."""


@dataclass(frozen=True)
class Entry:
    name: str  # what requests use
    ref: str  # what the loader takes: a built-in name or an absolute path
    builtin: bool


class Catalog:
    """Lists and resolves names inside the configured folders (each may be None: built-ins only)."""

    def __init__(
        self,
        models_dir: Path | None,
        loras_dir: Path | None,
        controlnets_dir: Path | None,
        startup_model: str = "emoji",
        tiny_vae: Path | None = None,
        vaes_dir: Path | None = None,
        upscalers_dir: Path | None = None,
        clip_vision_dir: Path | None = None,
        ip_adapters_dir: Path | None = None,
    ) -> None:
        self.models_dir = models_dir
        self.clip_vision_dir = clip_vision_dir
        self.ip_adapters_dir = ip_adapters_dir
        self.upscalers_dir = upscalers_dir
        self.tiny_vae = tiny_vae  # the server's --tiny-vae: ComfyUI's VAELoader offers it as "taesd"
        self.vaes_dir = vaes_dir
        self.loras_dir = loras_dir
        self.controlnets_dir = controlnets_dir
        self.extra_models: dict[str, str] = {}
        if startup_model not in BUILTIN_MODELS and not self._in_models_dir(startup_model):
            # The operator's own --model path (trusted: it came from the command line, not a request).
            p = Path(startup_model).expanduser().resolve()
            if p.suffix.lower() in PICKLE_SUFFIXES:
                raise BadRequest(
                    f"model {startup_model!r}: pickle checkpoints are not loaded; convert it to "
                    ".safetensors (sdengine convert)"
                )
            if not p.exists():
                raise BadRequest(f"model {startup_model!r} is not a built-in name, a name in --models-dir or a path")
            self.extra_models[p.name.removesuffix(".safetensors")] = str(p)
        self.startup_name = self.model_name_of(startup_model)

    # -- models -----------------------------------------------------------------------------------------

    def _in_models_dir(self, name: str) -> bool:
        try:
            self._resolve_in_models_dir(name)
            return True
        except AmbiguousModelName:
            raise
        except (BadRequest, UnsafePathError, FileNotFoundError):
            return False

    def _resolve_in_models_dir(self, name: str) -> Path:
        if self.models_dir is None:
            raise FileNotFoundError(name)
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise BadRequest(
                f"model {name!r}: pickle checkpoints are not loaded by the server; convert it to "
                ".safetensors (sdengine convert)"
            )
        path = resolve_inside(self.models_dir, name, "model", suffixes=("", ".safetensors"))
        if path.name != Path(name).name and (same := ambiguous_files(self.models_dir, name, MODEL_SUFFIXES)):
            names = ", ".join(p.name for p in same)
            raise AmbiguousModelName(
                f"model {name!r} is ambiguous: --models-dir holds {names}; name the file ({path.name})"
            )
        if path.is_dir() and not (path / "model_index.json").is_file():
            raise BadRequest(f"model {name!r}: a folder without model_index.json is not a model")
        if path.is_file() and path.suffix.lower() != ".safetensors":
            raise BadRequest(f"model {name!r}: only .safetensors files and diffusers folders are loaded")
        return path

    def models(self) -> list[Entry]:
        out = [Entry(n, r, True) for n, r in BUILTIN_MODELS.items()]
        out += [Entry(n, r, False) for n, r in self.extra_models.items()]
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.name.startswith("."):
                    continue
                if p.name.lower().endswith(VAE_SUFFIXES):
                    continue  # a model's own VAE beside it (NAME.vae.safetensors), not a model (as in A1111)
                if not is_inside(self.models_dir, p):
                    continue  # a symlink out of the folder: resolve_model refuses it, so it is not offered
                if (p.is_dir() and (p / "model_index.json").is_file()) or (
                    p.is_file() and p.suffix.lower() == ".safetensors"
                ):
                    out.append(Entry(p.name, str(p.resolve()), False))
        # the SD3 / Flux diffusion-model files of diffusion_models/ and unet/, by their path in --models-dir: a job
        # on one gets its text encoders and VAE from the folders (sdengine.server.dit_parts)
        out += [Entry(e.name, e.ref, False) for e in self.dit_models()]
        return out

    def dit_models(self) -> list[Entry]:
        """The SD3 / Flux / Qwen-Image / FLUX.2 / Z-Image diffusion-model files of ``--models-dir``'s
        ``diffusion_models/`` and ``unet/`` (those lacking parts, :mod:`sdengine.server.dit_parts`), named by their
        path in ``--models-dir`` (``diffusion_models/flux1-dev.safetensors``), which :meth:`resolve_model` takes."""
        from sdengine.server.dit_parts import needed, optional

        out: list[Entry] = []
        if self.models_dir is None:
            return out
        for sub in DIFFUSION_MODEL_FOLDERS:
            root = self.models_dir / sub
            if root.is_dir() and is_inside(self.models_dir, root):
                for e in _weight_entries(root, (".safetensors",), folders=False):
                    if needed(Path(e.ref)) or optional(Path(e.ref)):
                        out.append(Entry(f"{sub}/{e.name}", e.ref, False))
        return out

    def resolve_model(self, name: str) -> str:
        """A model name (A1111 ``name [hash]`` titles too) -> the loader's reference; BadRequest if unknown."""
        name = strip_title(name)
        if name in BUILTIN_MODELS:
            return BUILTIN_MODELS[name]
        if name in self.extra_models:
            return self.extra_models[name]
        try:
            return str(self._resolve_in_models_dir(name))
        except UnsafePathError as e:
            raise BadRequest(str(e)) from None
        except FileNotFoundError:
            have = ", ".join(e.name for e in self.models())
            raise BadRequest(f"unknown model {name!r}; available: {have}") from None

    def model_name_of(self, ref_or_name: str) -> str:
        """The name listed for a reference (the inverse of :meth:`resolve_model`; a reference with parts given
        apart, :mod:`sdengine.server.dit_parts`, is its model's)."""
        ref_or_name = ref_or_name.split("\x00")[0]
        for e in self.models():
            if ref_or_name in (e.name, e.ref):
                return e.name
        return Path(ref_or_name).name

    # -- LoRAs and ControlNets -----------------------------------------------------------------------------

    def loras(self) -> list[Entry]:
        out = [Entry(n, str(p), True) for n, p in BUILTIN_LORAS.items()]
        if self.loras_dir is not None and self.loras_dir.is_dir():
            root = self.loras_dir.resolve()
            for p in sorted(self.loras_dir.rglob("*.safetensors")):
                if p.resolve().is_relative_to(root):
                    out.append(Entry(p.relative_to(self.loras_dir).with_suffix("").as_posix(), str(p.resolve()), False))
        return out

    def resolve_lora(self, name: str) -> Path:
        name = name.strip()
        if self.loras_dir is not None:
            try:
                return self._safetensors_inside(self.loras_dir, name, "LoRA")
            except FileNotFoundError:
                pass
        if name in BUILTIN_LORAS:
            return BUILTIN_LORAS[name]
        have = ", ".join(e.name for e in self.loras())
        raise BadRequest(f"unknown LoRA {name!r}; available: {have}")

    def controlnets(self) -> list[Entry]:
        out = [Entry(n, str(p), True) for n, p in BUILTIN_CONTROLNETS.items()]
        if self.controlnets_dir is not None and self.controlnets_dir.is_dir():
            for p in sorted(self.controlnets_dir.iterdir()):
                if p.name.startswith("."):
                    continue
                if (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".safetensors"):
                    out.append(Entry(p.name.removesuffix(".safetensors"), str(p.resolve()), False))
        return out

    def resolve_controlnet(self, name: str) -> Path:
        name = strip_title(name)
        if name in BUILTIN_CONTROLNETS:
            return BUILTIN_CONTROLNETS[name]
        if self.controlnets_dir is not None:
            try:
                return self._safetensors_inside(self.controlnets_dir, name, "ControlNet", folders=True)
            except FileNotFoundError:
                pass
        have = ", ".join(e.name for e in self.controlnets())
        raise BadRequest(f"unknown ControlNet {name!r}; available: {have}")

    # -- VAEs (ComfyUI's VAELoader) --------------------------------------------------------------------------

    def vaes(self) -> list[Entry]:
        """The VAE files (``.safetensors``) and diffusers VAE folders (with ``config.json``) in ``--vaes-dir``,
        listed by their file name, as ComfyUI lists its ``models/vae``."""
        out: list[Entry] = []
        if self.vaes_dir is not None and self.vaes_dir.is_dir():
            root = self.vaes_dir.resolve()
            for p in sorted(self.vaes_dir.iterdir()):
                if p.name.startswith(".") or not p.resolve().is_relative_to(root):
                    continue
                if (p.is_dir() and (p / "config.json").is_file()) or (p.is_file() and p.suffix == ".safetensors"):
                    out.append(Entry(p.name, str(p.resolve()), False))
        return out

    def _vae_in_vaes_dir(self, name: str) -> Path | None:
        if self.vaes_dir is not None:
            try:
                return self._safetensors_inside(self.vaes_dir, name, "VAE", folders=True)
            except FileNotFoundError:
                pass
        return None

    def resolve_vae(self, name: str) -> Path:
        name = strip_title(name)
        found = self._vae_in_vaes_dir(name)
        if found is not None:
            return found
        have = ", ".join(e.name for e in self.vaes()) or "none (serve --vaes-dir DIR lists them)"
        raise BadRequest(f"unknown VAE {name!r}; available: {have}")

    # -- A1111's sd_vae -----------------------------------------------------------------------------------------

    def sd_vaes(self) -> list[Entry]:
        """A1111's VAE list (GET /sdapi/v1/sd-vae, ``sd_vae``): the files and folders of ``--vaes-dir``, then the
        ``NAME.vae.safetensors`` files of ``--models-dir`` (A1111 lists those of its checkpoint folder too)."""
        out = self.vaes()
        have = {e.name for e in out}
        if self.models_dir is not None and self.models_dir.is_dir():
            for p in sorted(self.models_dir.iterdir()):
                if p.is_file() and p.name.lower().endswith(".vae.safetensors") and p.name not in have:
                    if is_inside(self.models_dir, p):
                        out.append(Entry(p.name, str(p.resolve()), False))
        return out

    def resolve_sd_vae(self, name: str) -> Path:
        """An ``sd_vae`` file name (as GET /sdapi/v1/sd-vae lists it) -> its path; BadRequest when unknown or
        unsafe (``..``, absolute paths, links out of the folder), or a pickle file."""
        name = strip_title(name)
        found = self._vae_in_vaes_dir(name)
        if found is not None:
            return found
        if self.models_dir is not None and name.lower().endswith(".vae.safetensors"):
            try:
                return self._safetensors_inside(self.models_dir, name, "VAE")
            except FileNotFoundError:
                pass
        have = ", ".join(e.name for e in self.sd_vaes()) or "none (serve --vaes-dir DIR lists them)"
        raise BadRequest(f"unknown VAE {name!r}; available: Automatic, None, {have}")

    def automatic_vae(self, model_ref: str) -> Path | None:
        """A1111's "Automatic" for a model: the VAE of ``--vaes-dir`` named as the model (``NAME.safetensors`` or
        ``NAME.vae.safetensors`` for the model file ``NAME.safetensors`` or folder ``NAME``); None: the model's
        VAE as it loads (its own, or the ``NAME.vae.safetensors`` beside it, or the server's ``--vae``). A1111
        takes any VAE whose file name *starts* with the model's name; sdengine takes the same name only, so that
        a model ``sd`` never picks ``sdxl_vae.safetensors``."""
        if self.vaes_dir is None or not self.vaes_dir.is_dir():
            return None
        ref = Path(model_ref.split("\x00")[0])  # a model with parts given apart (server.dit_parts): its file
        stem = ref.name.removesuffix(ref.suffix) if ref.suffix.lower() == ".safetensors" else ref.name
        for e in self.vaes():
            p = Path(e.ref)
            if p.is_file() and e.name in (f"{stem}.safetensors", f"{stem}.vae.safetensors"):
                return p
        return None

    # -- upscaler models (hires fix, A1111's extras, ComfyUI's UpscaleModelLoader) ---------------------------------

    def upscalers(self) -> list[Entry]:
        """The upscaler models (ESRGAN, Real-ESRGAN ``.pth`` / ``.safetensors``) of ``--upscalers-dir``, by the file
        name without its suffix (A1111's name for them)."""
        from sdengine.weights.upscaler_file import upscaler_files

        return [Entry(n, str(p), False) for n, p in upscaler_files(self.upscalers_dir).items()]

    def resolve_upscaler(self, name: str) -> tuple[str, Path]:
        """(listed name, file) of an upscaler model name (with or without its suffix); BadRequest when unknown or
        unsafe. The ``.pth`` files are read by ``torch.load(weights_only=True)`` only."""
        from sdengine.weights.upscaler_file import UpscalerFileError, resolve_upscaler

        if self.upscalers_dir is None:
            raise BadRequest(f"unknown upscaler {name!r}: the server has no upscaler models (serve --upscalers-dir)")
        try:
            return resolve_upscaler(name, self.upscalers_dir)
        except UpscalerFileError as e:
            raise BadRequest(str(e)) from None

    # -- CLIP vision encoders and IP-Adapters (ComfyUI's models/clip_vision and models/ipadapter) ------------------

    def clip_visions(self) -> list[Entry]:
        """The CLIP vision encoders of ``--clip-vision-dir``: ``.safetensors`` / ``.bin`` files and diffusers
        ``image_encoder`` folders (``config.json`` with ``model.safetensors`` or ``pytorch_model.bin``), by their path
        in the folder (``sub/name.safetensors`` in a sub-folder), as ComfyUI lists its ``models/clip_vision``."""
        return _weight_entries(self.clip_vision_dir, WEIGHT_FILE_SUFFIXES, folders=True)

    def resolve_clip_vision(self, name: str) -> Path:
        """A listed CLIP vision name -> its file or folder; BadRequest when unknown, of another type, or unsafe
        (``..``, an absolute path, a link out of the folder)."""
        return _resolve_listed(self.clip_vision_dir, name, "CLIP vision", "--clip-vision-dir", self.clip_visions)

    def ip_adapters(self) -> list[Entry]:
        """The IP-Adapter files (``.safetensors``, ``.bin``) of ``--ip-adapters-dir``, by their path in the folder,
        as ComfyUI lists ``models/ipadapter``."""
        return _weight_entries(self.ip_adapters_dir, WEIGHT_FILE_SUFFIXES, folders=False)

    def resolve_ip_adapter(self, name: str) -> Path:
        """A listed IP-Adapter name -> its file; BadRequest as :meth:`resolve_clip_vision`."""
        return _resolve_listed(self.ip_adapters_dir, name, "IP-Adapter", "--ip-adapters-dir", self.ip_adapters)

    # -- ComfyUI's diffusion models and text encoders (UNETLoader, DualCLIPLoader, TripleCLIPLoader) --------------

    def _sub_entries(self, folders: tuple[str, ...]) -> list[Entry]:
        """The ``.safetensors`` files of these sub-folders of ``--models-dir`` (ComfyUI's ``models/`` names), by
        their path inside their sub-folder; a name in two of them is the first one's."""
        out: dict[str, Entry] = {}
        if self.models_dir is None:
            return []
        for sub in folders:
            root = self.models_dir / sub
            if root.is_dir() and is_inside(self.models_dir, root):
                for e in _weight_entries(root, (".safetensors",), folders=False):
                    out.setdefault(e.name, e)
        return sorted(out.values(), key=lambda e: e.name)

    def diffusion_models(self) -> list[Entry]:
        """UNETLoader's files: ``--models-dir``'s ``diffusion_models/`` and ``unet/`` (ComfyUI's two names)."""
        return self._sub_entries(DIFFUSION_MODEL_FOLDERS)

    def resolve_diffusion_model(self, name: str) -> Path:
        return _resolve_sub(self.models_dir, DIFFUSION_MODEL_FOLDERS, name, "diffusion model", self.diffusion_models)

    def text_encoders(self) -> list[Entry]:
        """The CLIP loaders' files: ``--models-dir``'s ``text_encoders/`` and ``clip/`` (ComfyUI's two names)."""
        return self._sub_entries(TEXT_ENCODER_FOLDERS)

    def resolve_text_encoder(self, name: str) -> Path:
        return _resolve_sub(self.models_dir, TEXT_ENCODER_FOLDERS, name, "text encoder", self.text_encoders)

    def style_models(self) -> list[Entry]:
        """StyleModelLoader's files (FLUX.1 Redux): ``--models-dir``'s ``style_models/`` (ComfyUI's name)."""
        return self._sub_entries(STYLE_MODEL_FOLDERS)

    def resolve_style_model(self, name: str) -> Path:
        return _resolve_sub(self.models_dir, STYLE_MODEL_FOLDERS, name, "style model", self.style_models)

    @staticmethod
    def _safetensors_inside(root: Path, name: str, what: str, folders: bool = False) -> Path:
        if name.lower().endswith(PICKLE_SUFFIXES):
            raise BadRequest(f"{what} {name!r}: pickle files are not loaded by the server; use .safetensors")
        try:
            path = resolve_inside(root, name, what, suffixes=(".safetensors", ""))
        except UnsafePathError as e:
            raise BadRequest(str(e)) from None
        if path.is_dir() and not folders:
            raise FileNotFoundError(name)
        if path.is_file() and path.suffix.lower() != ".safetensors":
            raise BadRequest(f"{what} {name!r}: only .safetensors files are loaded")
        return path


def _is_encoder_folder(p: Path) -> bool:
    return (p / "config.json").is_file() and any((p / n).is_file() for n in FOLDER_WEIGHTS)


def _weight_entries(root: Path | None, suffixes: tuple[str, ...], *, folders: bool) -> list[Entry]:
    """The files of ``root`` and its sub-folders with one of ``suffixes`` (and, with ``folders``, the folders
    holding a ``config.json`` and weights, not looked into), by their ``/``-separated path in ``root``, sorted;
    hidden names and links out of the folder are left out."""
    from sdengine.io.paths import walk_folders_once

    if root is None or not root.is_dir():
        return []
    out: list[Entry] = []
    for dirpath, dirs, names in walk_folders_once(root):
        here = Path(dirpath)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if folders:
            for d in list(dirs):
                if _is_encoder_folder(here / d):
                    dirs.remove(d)
                    if is_inside(root, here / d):
                        out.append(Entry((here / d).relative_to(root).as_posix(), str((here / d).resolve()), False))
        for n in names:
            p = here / n
            if not n.startswith(".") and n.lower().endswith(suffixes) and p.is_file() and is_inside(root, p):
                out.append(Entry(p.relative_to(root).as_posix(), str(p.resolve()), False))
    return sorted(out, key=lambda e: e.name)


def _resolve_listed(root: Path | None, name: str, what: str, flag: str, listed: Any) -> Path:
    """``name``, exactly as ``listed()`` lists it, -> its file or folder; a name that leaves ``root``
    (:func:`resolve_inside`: ``..``, absolute, a link out) or is not listed (another type, hidden, missing) is a
    one-line BadRequest, the latter naming the choices."""
    if not isinstance(name, str):
        raise BadRequest(f"{what} name must be a string, got {type(name).__name__}")
    if root is None:
        raise BadRequest(f"unknown {what} {name!r}: the server has no {what} files (serve {flag} DIR)")
    try:
        resolve_inside(root, name, what)  # a name that leaves the folder is said so, whether or not it exists
    except UnsafePathError as e:
        raise BadRequest(str(e)) from None
    except FileNotFoundError:
        pass
    entries = listed()
    for entry in entries:
        if entry.name == name:
            return Path(entry.ref)
    have = ", ".join(x.name for x in entries) or f"none ({flag} has no {what} files)"
    raise BadRequest(f"unknown {what} {name!r}; available: {have}")


def _resolve_sub(models_dir: Path | None, folders: tuple[str, ...], name: str, what: str, listed: Any) -> Path:
    """``name`` as ``listed()`` lists the files of ``folders`` inside ``models_dir``; a one-line BadRequest naming
    the choices (or the folders to make) when it is not one of them, a name that leaves its folder said so."""
    if not isinstance(name, str):
        raise BadRequest(f"{what} name must be a string, got {type(name).__name__}")
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise BadRequest(f"{what} {name!r}: pickle files are not loaded by the server; use .safetensors")
    for entry in listed():
        if entry.name == name:
            return Path(entry.ref)
    if models_dir is not None:
        for sub in folders:
            try:
                resolve_inside(models_dir / sub, name, what)
            except UnsafePathError as e:
                raise BadRequest(str(e)) from None
            except FileNotFoundError:
                pass
    where = " or ".join(f"{sub}/" for sub in folders)
    have = ", ".join(e.name for e in listed()) or f"none (put them in {where} of --models-dir)"
    raise BadRequest(f"unknown {what} {name!r}; available: {have}")
