"""Loading Flux.1: a diffusers ``FluxPipeline`` folder, or Black Forest Labs' / ComfyUI's files -> FluxPipeline.

Accepted (:func:`load_flux_pipeline`, reached through :func:`sdengine.pipeline.load_pipeline`):

* a diffusers folder whose ``model_index.json`` names ``FluxPipeline``: ``transformer/``, ``vae/``,
  ``text_encoder/`` (CLIPTextModel, CLIP-L), ``text_encoder_2/`` (T5EncoderModel, T5-XXL), ``tokenizer/``,
  ``tokenizer_2/`` (its ``tokenizer.json``), ``scheduler/``;
* a diffusion-model file (BFL's ``flux1-dev.safetensors`` / ``flux1-schnell.safetensors``, or one with
  ComfyUI's ``model.diffusion_model.`` prefix) with the other parts given apart: ``vae`` (``--vae``; BFL's
  ``ae.safetensors``, whose names are LDM's without the ``first_stage_model.`` prefix, or a diffusers VAE
  folder), ``clip_l`` (``--clip-l``; ComfyUI's ``clip_l.safetensors``, transformers' CLIPTextModel names, or a
  folder) and ``t5`` (``--t5``; ComfyUI's ``t5xxl_fp16.safetensors`` / fp8, or a folder);
* a ComfyUI all-in-one checkpoint: ``model.diffusion_model.*`` with ``vae.*`` (or ``first_stage_model.*``),
  ``text_encoders.clip_l.transformer.*`` and ``text_encoders.t5xxl.transformer.*`` in the same file (the
  layout diffusers' ``single_file_utils`` reads); a part given apart replaces the file's.

A single file has no scheduler or tokenizer: the scheduler config is FLUX.1 [dev]'s (dynamic shift) for a
transformer with the guidance embedding and [schnell]'s (no shift) without; the tokenizers are the shipped
CLIP vocabulary and the shipped T5 v1.1 one (Flux's are those). A VAE read from a file gets Flux.1's latent
scaling (``scaling_factor`` 0.3611, ``shift_factor`` 0.1159; a diffusers VAE folder keeps its config's). A part
that is missing is one line naming the flag that gives it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.errors import GenerationError
from sdengine.pipeline.flux import FluxPipeline

FLUX_VAE_SCALING = 0.3611  # Flux.1's ae.safetensors: diffusers' vae/config.json scaling_factor
FLUX_VAE_SHIFT = 0.1159  # and its shift_factor
FLUX_VAE_SIZE = 1024  # its sample_size (the pipeline's default image size)
COMFY_CLIP_L = "text_encoders.clip_l.transformer."
COMFY_T5 = "text_encoders.t5xxl.transformer."
VAE_PREFIXES = ("vae.", "first_stage_model.")
TRANSFORMER_PREFIX = "model.diffusion_model."
FLAGS = {"vae": "--vae", "clip_l": "--clip-l", "t5": "--t5"}  # the command line's names of the parts given apart
CLIP_L_FILE = "ComfyUI's clip_l.safetensors"
T5_FILE = "ComfyUI's t5xxl_fp16.safetensors"
# what each part given apart is, and an example of its file (a single file's missing part names them)
PARTS = {
    "vae": ("VAE", "Flux's ae.safetensors"),
    "clip_l": ("CLIP-L text encoder", CLIP_L_FILE),
    "t5": ("T5 text encoder", T5_FILE),
}

# scheduler/scheduler_config.json of FLUX.1-dev and FLUX.1-schnell
DEV_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
SCHNELL_SCHEDULER: dict[str, Any] = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}


def is_pipeline_folder(path: Path, family: str) -> bool:
    """A diffusers folder whose ``model_index.json`` names a ``{family}...Pipeline`` class."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return False
    return isinstance(name, str) and name.startswith(family) and name.endswith("Pipeline")


def is_flux_folder(path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names ``FluxPipeline`` (or ``FluxImg2ImgPipeline``)."""
    return is_pipeline_folder(path, "Flux")


def tensor_names(path: Path) -> list[str]:
    """The tensor names of a weights file (a safetensors header only; a pickle is read whole)."""
    from sdengine.weights.io import SAFETENSORS_SUFFIXES, SafetensorsReader, load_file

    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        with SafetensorsReader(path) as reader:
            return list(reader.names)
    return list(load_file(path)[0])


def file_holds(path: Path, test: Callable[[list[str]], bool]) -> bool:
    """Whether ``path`` is a weights file whose tensor names pass ``test`` (an unreadable one: False, the ordinary
    loader says what is wrong with it)."""
    from sdengine.weights.io import WeightsError

    if not path.is_file():
        return False
    try:
        return test(tensor_names(path))
    except WeightsError:
        return False


def is_flux_file(path: Path) -> bool:
    """A single file holding a Flux transformer in BFL's layout (with or without ComfyUI's prefix)."""
    from sdengine.weights.detect import is_flux_state_dict

    return file_holds(path, is_flux_state_dict)


def check_given(given: Mapping[str, str | Path | None]) -> None:
    """Each part given apart (``PARTS``' keys) is there: one line naming its flag."""
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise GenerationError(f"{FLAGS[key]} {value}: no such file or folder")


def refuse_missing(path: Path, given: Mapping[str, str | Path | None], held: Mapping[str, bool]) -> None:
    """A single file that lacks a part (``held``: whether it has it) not given apart: one line naming the flag
    that gives it; checked before the transformer (the large part) is read."""
    for key, has in held.items():
        if given[key] is None and not has:
            what, example = PARTS[key]
            raise GenerationError(
                f"{path.name} holds no {what}: give it with {FLAGS[key]} FILE ({key}= in Python; e.g. {example})"
            )


def read_prefixed(path: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` under the first of ``prefixes`` it has, the prefix taken off (only those read)."""
    from sdengine.weights.io import SAFETENSORS_SUFFIXES, SafetensorsReader, load_file

    names = tensor_names(path)
    prefix = next((p for p in prefixes if any(n.startswith(p) for n in names)), None)
    if prefix is None:
        return {}
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        with SafetensorsReader(path) as reader:
            return {n[len(prefix) :]: reader.read(n) for n in names if n.startswith(prefix)}
    sd = load_file(path)[0]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


# -- the parts ------------------------------------------------------------------------------------------------


def _build_vae(
    sd: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], where: str, dtype: torch.dtype, device: Any
) -> Any:
    from sdengine.models.config_checks import ConfigError
    from sdengine.models.vae import AutoencoderKL, VAEConfig
    from sdengine.weights.loading import build_on_meta

    try:
        vcfg = VAEConfig.from_diffusers(cfg)
    except ConfigError as e:
        raise GenerationError(f"{where}: {e}") from None
    return build_on_meta(lambda: AutoencoderKL(vcfg), sd, name=f"{where}: VAE", dtype=dtype).to(device)


def _flux_vae_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A VAE config read off a file's shapes, with Flux.1's latent scaling and size."""
    return {**cfg, "scaling_factor": FLUX_VAE_SCALING, "shift_factor": FLUX_VAE_SHIFT, "sample_size": FLUX_VAE_SIZE}


def load_flux_vae(path: Path, dtype: torch.dtype, device: Any) -> Any:
    """Flux's VAE from a diffusers VAE folder (its own config) or a file (BFL's ``ae.safetensors``: LDM names
    without a prefix; or diffusers names); a file gets Flux.1's scaling and shift factors."""
    from sdengine.weights.loading import load_vae

    sd, cfg = load_vae(path)
    if not path.is_dir():
        cfg = _flux_vae_config(cfg)
    return _build_vae(sd, cfg, str(path), dtype, device)


def vae_of_checkpoint(path: Path, names: list[str], dtype: torch.dtype, device: Any) -> Any | None:
    """The VAE inside a ComfyUI all-in-one checkpoint (``vae.*`` or ``first_stage_model.*``), or None."""
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_config_from_ldm, vae_layout_from_ldm
    from sdengine.weights.io import WeightsError

    if not any(n.startswith(VAE_PREFIXES) for n in names):
        return None
    ldm = read_prefixed(path, VAE_PREFIXES)
    try:
        sd, unknown = km.vae_ldm_to_diffusers(ldm, vae_layout_from_ldm(ldm))
        cfg = vae_config_from_ldm(ldm)
    except WeightsError as e:
        raise GenerationError(f"{path}: its VAE: {e}") from None
    if unknown:
        raise GenerationError(f"{path}: unexpected VAE keys: {', '.join(sorted(unknown)[:4])}")
    return _build_vae(sd, _flux_vae_config(cfg), str(path), dtype, device)


def _clip_from_state(sd: Mapping[str, torch.Tensor], where: str, dtype: torch.dtype, device: Any) -> Any:
    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
    from sdengine.weights.detect import clip_config_from_weights
    from sdengine.weights.io import WeightsError

    sd = {
        k: v for k, v in sd.items() if k.startswith("text_model.")
    }  # logit_scale, text_projection: not CLIP-L's text tower
    if not sd:
        raise GenerationError(f"{where}: no CLIP text encoder weights (text_model.*): not CLIP-L")
    try:
        cfg = CLIPTextConfig.from_transformers(clip_config_from_weights(sd, family="sd1"))
        return CLIPTextModel.from_state_dict(sd, cfg, device=device, dtype=dtype)
    except (WeightsError, RuntimeError, ValueError) as e:
        raise GenerationError(f"{where}: CLIP-L: {str(e).splitlines()[0]}") from None


def load_clip_l(path: Path, dtype: torch.dtype, device: Any) -> Any:
    """CLIP-L from a transformers folder (``text_encoder/``, its config) or a file (ComfyUI's ``clip_l.safetensors``:
    transformers' names, with or without ``text_model.`` and an all-in-one's ``text_encoders.clip_l.transformer.``
    prefix; the architecture from the shapes)."""
    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel, add_text_model_prefix
    from sdengine.weights.io import load_file
    from sdengine.weights.loading import component_weight_files

    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise GenerationError(f"{path}: not a CLIP text encoder folder (no config.json)")
        cfg = CLIPTextConfig.from_transformers(json.loads(cfg_path.read_text()))
        sd: dict[str, torch.Tensor] = {}
        for f in component_weight_files(folder):
            sd.update(load_file(f)[0])
        sd = {k: v for k, v in add_text_model_prefix(sd).items() if k.startswith("text_model.")}
        return CLIPTextModel.from_state_dict(sd, cfg, device=device, dtype=dtype)
    if not path.is_file():
        raise GenerationError(f"{path}: no such CLIP-L file or folder")
    inner = read_prefixed(path, (COMFY_CLIP_L,))
    sd = inner or load_file(path)[0]
    return _clip_from_state(add_text_model_prefix(sd), str(path), dtype, device)


def load_t5(path: Path, dtype: torch.dtype, device: Any) -> Any:
    """T5-XXL from a folder or file (:func:`sdengine.weights.t5_file.load_t5_encoder`; an all-in-one's
    ``text_encoders.t5xxl.transformer.*`` too)."""
    from sdengine.weights.t5_file import load_t5_encoder

    return load_t5_encoder(path, device=device, dtype=dtype)


def vae_t5_and_scheduler(
    path: Path,
    names: list[str],
    vae: str | Path | None,
    t5: str | Path | None,
    *,
    t5_folder: str,
    t5_tokenizer: str,
    scheduler: dict[str, Any],
    dtype: torch.dtype,
    device: Any,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """The VAE, T5, T5 tokenizer and scheduler config of a Flux-family model: a diffusers folder's (``vae/``,
    ``<t5_folder>/``, ``<t5_tokenizer>/`` or the shipped vocabulary, ``scheduler/`` or ``scheduler``) or a single
    file's (its own VAE (``names``: its tensors) and T5, the shipped vocabulary, ``scheduler``); ``vae`` / ``t5``
    given apart replace the model's."""
    from sdengine.text.t5_tokenizer import load_t5_tokenizer

    if path.is_dir():
        vae_model = load_flux_vae(Path(vae) if vae is not None else path / "vae", dtype, device)
        t5_model = load_t5(Path(t5) if t5 is not None else path / t5_folder, dtype, device)
        tok = path / t5_tokenizer
        tokenizer = load_t5_tokenizer(tok if (tok / "tokenizer.json").is_file() else None)
        sched_path = path / "scheduler" / "scheduler_config.json"
        return vae_model, t5_model, tokenizer, json.loads(sched_path.read_text()) if sched_path.is_file() else scheduler
    vae_model = (
        load_flux_vae(Path(vae), dtype, device) if vae is not None else vae_of_checkpoint(path, names, dtype, device)
    )
    t5_model = load_t5(Path(t5) if t5 is not None else path, dtype, device)
    return vae_model, t5_model, load_t5_tokenizer(None), scheduler


# -- the pipeline ---------------------------------------------------------------------------------------------


def load_flux_pipeline(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    t5: str | Path | None = None,
    name: str | None = None,
    lora_dir: Any = None,
) -> FluxPipeline:
    """A Flux folder or file (see the module docstring) -> :class:`FluxPipeline` on ``device`` in ``dtype``."""
    from sdengine.pipeline.loading import clip_pad_token_id, clip_tokenizer
    from sdengine.weights.flux_file import load_flux_transformer
    from sdengine.weights.io import WeightsError

    name = name or path.name.removesuffix(path.suffix) or path.name
    given = {"vae": vae, "clip_l": clip_l, "t5": t5}
    check_given(given)
    try:
        names = [] if path.is_dir() else tensor_names(path)
        if not path.is_dir():
            refuse_missing(
                path,
                given,
                {
                    "vae": any(n.startswith(VAE_PREFIXES) for n in names),
                    "clip_l": any(n.startswith(COMFY_CLIP_L) for n in names),
                    "t5": any(n.startswith(COMFY_T5) for n in names),
                },
            )
        transformer = load_flux_transformer(path, device=device, dtype=dtype)
        vae_model, t5_model, tokenizer_2, scheduler = vae_t5_and_scheduler(
            path, names, vae, t5, t5_folder="text_encoder_2", t5_tokenizer="tokenizer_2",
            scheduler=DEV_SCHEDULER if transformer.config.guidance_embeds else SCHNELL_SCHEDULER,
            dtype=dtype, device=device,
        )  # fmt: skip
        if path.is_dir():
            clip = load_clip_l(Path(clip_l) if clip_l is not None else path / "text_encoder", dtype, device)
            tok_dir = path / "tokenizer"
            tokenizer = clip_tokenizer(tok_dir)
            pad = clip_pad_token_id(tok_dir if tok_dir.is_dir() else None, tokenizer.vocab, "sd1")
        else:
            clip = load_clip_l(Path(clip_l) if clip_l is not None else path, dtype, device)
            tokenizer = clip_tokenizer(None)
            pad = clip_pad_token_id(None, tokenizer.vocab, "sd1")  # CLIP-L pads with its end token
    except WeightsError as e:
        raise GenerationError(str(e).splitlines()[0]) from None
    return FluxPipeline(
        transformer=transformer,
        vae=vae_model,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5_model,
        tokenizer_2=tokenizer_2,
        scheduler_config=scheduler,
        pad_token_id=pad,
        device=device,
        dtype=dtype,
        name=name,
        source=path,
        lora_dir=lora_dir,
        vae_source=Path(vae) if vae is not None else None,  # named in the infotext ("VAE", "VAE hash")
    )


__all__ = [
    "DEV_SCHEDULER",
    "FLUX_VAE_SCALING",
    "FLUX_VAE_SHIFT",
    "PARTS",
    "SCHNELL_SCHEDULER",
    "check_given",
    "file_holds",
    "is_pipeline_folder",
    "refuse_missing",
    "vae_t5_and_scheduler",
    "vae_of_checkpoint",
    "is_flux_file",
    "is_flux_folder",
    "load_clip_l",
    "load_flux_pipeline",
    "load_flux_vae",
    "load_t5",
    "read_prefixed",
]
