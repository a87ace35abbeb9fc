"""From a path to renamed state dicts + configs per component, and into models; `convert` between layouts.

Two sources:
- a diffusers folder (`model_index.json`; `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`): its
  weights already carry our names, its configs are read as they are;
- a single LDM file (`.safetensors`, or `.ckpt`/`.pt` through the weights-only loader): split by prefix,
  renamed through `keymaps`, configs synthesised from the shapes (`detect`), unless the file carries configs
  in its metadata (files written by `convert`) or a `config=` diffusers folder is given.

Strictness (docs/CONTRACTS.md, Model files): keys that real checkpoints carry but inference ignores are
skipped and logged at DEBUG; any other key that matches no table is an error naming the first few;
missing/mis-shaped parameters are errors from `load_into` when a model is built.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdengine.io.atomic import atomic_dir
from sdengine.io.paths import UnsafePathError, resolve_inside
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.meta_init import skip_meta_init

from . import keymaps as km
from .detect import (
    SD_VAE_SCALING_FACTOR,
    Detected,
    check_supported,
    clip_config_from_weights,
    detect_ldm,
    openclip_num_blocks,
    unet_layout_from_diffusers,
    vae_config_from_ldm,
    vae_layout_from_diffusers,
    vae_layout_from_ldm,
)
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    StateDict,
    WeightsError,
    convert_dtype,
    load_file,
    save_safetensors,
)
from .ldm_config import (
    LDMConfig,
    ModelConfigError,
    apply_ldm_config,
    check_folder_configs,
    check_ldm_network,
    config_beside,
    is_yaml_config,
    read_ldm_config,
)
from .sdxl_files import (
    SDXL_VAE_SCALING_FACTOR,
    V_PRED_KEY,
    ZTSNR_KEY,
    is_sdxl_ldm,
    prediction_markers,
    sdxl_components_to_ldm,
    sdxl_ldm_to_components,
)
from .vae_file import check_vae_fits

log = logging.getLogger(__name__)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__


COMPONENTS = ("unet", "vae", "text_encoder")
# Which bounds (sdengine.models.config_checks) a component's config is checked against.
COMPONENT_KINDS = {
    "unet": "unet",
    "vae": "vae",
    "text_encoder": "clip_text",
    "text_encoder_2": "clip_text",
    "scheduler": "scheduler",
}
# SDXL folders add a second text encoder (OpenCLIP bigG with its projection); the refiner has only that one.
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
# diffusers, transformers (safetensors) and transformers' pickle (`pytorch_model.bin`, older text_encoder/ folders)
WEIGHT_FILE_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
CONFIG_METADATA_KEY = "sdengine.configs"  # JSON {unet, vae, text_encoder, scheduler} in files we write
DIFFUSERS_VERSION = "0.42.1"  # the diffusers release our configs are written for and tested against


class MissingVAEError(WeightsError):
    pass


def _name_some(keys: list[str], n: int = 5) -> str:
    shown = ", ".join(keys[:n])
    return f"{shown}{f', ... ({len(keys)} in all)' if len(keys) > n else f' ({len(keys)} in all)'}"


@dataclass
class LoadedCheckpoint:
    """Weights in sdengine (diffusers/transformers) names plus diffusers-style configs, per component."""

    source: Path
    layout: Literal["diffusers", "single_file"]
    state_dicts: dict[str, StateDict]  # "unet", "vae", "text_encoder"
    configs: dict[str, dict[str, Any]]  # the same names plus "scheduler"
    prediction_type: str
    family: str = "custom"
    inpainting: bool = False
    tokenizer_dir: Path | None = None
    skipped: list[str] = field(default_factory=list)  # known-unused keys that were dropped
    notes: list[str] = field(default_factory=list)
    # "clip" (weights in state_dicts["text_encoder"]) or "minilm": sdengine's own folders (the built-in emoji
    # model) whose text encoder is all-MiniLM-L6-v2 by reference; only its config is here, no weights.
    text_encoder_type: Literal["clip", "minilm"] = "clip"
    tokenizer_2_dir: Path | None = None  # SDXL's second tokenizer (pads with "!")
    # model_index.json's force_zeros_for_empty_prompt (SDXL base: an empty negative prompt is all zeros)
    force_zeros_for_empty_prompt: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in self.state_dicts.values() for t in sd.values())


# ------------------------------------------------------------------------------------------ text encoder


def _clean_text_encoder(sd: Mapping[str, torch.Tensor], skipped: list[str]) -> StateDict:
    out: StateDict = {}
    for k, v in km.normalize_clip_keys(sd).items():
        if km.is_known_unused(k):
            skipped.append(k)
        else:
            out[k] = v
    return out


def pipeline_index_class(path: Path, prefix: str) -> str | None:
    """The ``_class_name`` of a diffusers folder's ``model_index.json`` when it names one of a family's pipelines
    (``{prefix}...Pipeline``), else None (no folder, no index, an unreadable one, another family)."""
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
        return None
    return name if isinstance(name, str) and name.startswith(prefix) and name.endswith("Pipeline") else None


def text_encoder_kind(config: Mapping[str, Any]) -> Literal["clip", "openclip"]:
    """OpenAI CLIP (SD1) uses quick_gelu; OpenCLIP ViT-H (SD2) exact gelu: that decides the LDM layout."""
    return "openclip" if config.get("hidden_act") == "gelu" else "clip"


# --------------------------------------------------------------------------------------- diffusers folder


def _find_weights(folder: Path) -> list[Path]:
    for stem in WEIGHT_FILE_STEMS:
        for suffix in (".safetensors", ".bin"):
            for variant in ("", ".fp16"):
                f = folder / f"{stem}{variant}{suffix}"
                if f.is_file():
                    return [f]
                # sharded weights: diffusers and transformers name a variant's index
                # `{stem}{suffix}.index.fp16.json` (shards `{stem}.fp16-00001-of-00002{suffix}`)
                for index in (
                    folder / f"{stem}{suffix}.index{variant}.json",
                    folder / f"{stem}{variant}{suffix}.index.json",
                ):
                    if index.is_file():
                        return _shards_of(index)
    raise WeightsError(
        f"{folder}: no weights found (expected diffusion_pytorch_model.safetensors, model.safetensors or "
        "pytorch_model.bin)"
    )


def component_weight_files(folder: str | Path) -> list[Path]:
    """The weights files the loader reads for one diffusers component folder (``unet/``, ``vae/``, ...): one
    file, or a sharded one's shards in order. WeightsError when there is none."""
    return _find_weights(Path(folder))


def _shards_of(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each resolved (realpath) inside the index's own folder: an
    index is data from outside, so `../x`, `/abs/x` or a symlink out of the folder is refused, never read."""
    weight_map = _read_json(index, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: the shard index needs a 'weight_map' object of tensor name -> file name")
    shards = []
    for name in sorted(set(weight_map.values())):
        try:
            shards.append(resolve_inside(index.parent, name, "shard"))
        except UnsafePathError as e:
            raise WeightsError(f"{index}: {e}") from None
        except FileNotFoundError:
            raise WeightsError(f"{index}: shard {name!r} not found in {index.parent}") from None
    return shards


def _check_config(where: Path | str, kind: str, cfg: Mapping[str, Any]) -> None:
    """Bounds on every number of a component config, before its weights are read or a model is built."""
    try:
        check_config(kind, cfg)
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def _load_component_folder(
    folder: Path, kind: str, dtype: str | torch.dtype | None = None
) -> tuple[StateDict, dict[str, Any]]:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: missing config.json")
    cfg = _read_json(cfg_path, "config")
    _check_config(cfg_path, kind, cfg)
    sd: StateDict = {}
    for f in _find_weights(folder):
        sd.update(load_file(f, dtype)[0])
    return sd, cfg


def load_component_folder(
    folder: Path, kind: str, dtype: str | torch.dtype | None = None
) -> tuple[StateDict, dict[str, Any]]:
    """One diffusers component folder (``vae/``, ``text_encoder/``, ...) -> (state dict, config): its
    ``config.json`` checked against ``kind``'s bounds (:mod:`sdengine.models.config_checks`) before any weight is
    read, then its weights file(s)."""
    return _load_component_folder(folder, kind, dtype)


MINILM_TEXT_ENCODER = ["sdengine", "MiniLMTextEncoder"]  # model_index.json entry of the emoji format


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the {what} ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: the {what} is not a JSON object")
    return obj


def _minilm_config(folder: Path) -> dict[str, Any]:
    """``text_encoder/config.json`` of an emoji-format folder: the MiniLM reference (package, context length)."""
    cfg_path = folder / "text_encoder" / "config.json"
    if not cfg_path.is_file():
        raise WeightsError(f"{folder}: missing text_encoder/config.json (the MiniLM text encoder's settings)")
    cfg = _read_json(cfg_path, "text encoder config")
    _check_config(cfg_path, "minilm", cfg)
    if cfg.get("model_type") != "bert" or not isinstance(cfg.get("context_length"), int) or cfg["context_length"] < 2:
        raise WeightsError(f"{cfg_path}: expected a MiniLM config (model_type bert, integer context_length >= 2)")
    return cfg


def load_diffusers_folder(
    folder: str | Path,
    *,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedCheckpoint:
    """A diffusers folder -> LoadedCheckpoint. sdengine's own format (``model_index.json`` names
    ``"text_encoder": ["sdengine", "MiniLMTextEncoder"]``, the emoji model) carries no text-encoder weights:
    they come from the all-MiniLM-L6-v2 pip package, so only the config is read and ``text_encoder_type`` is
    "minilm". ``dtype``: floating weights converted as they are read (:func:`load_file`); None keeps the
    files' dtypes (zero-copy)."""
    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightsError(f"{folder}: not a diffusers folder (no model_index.json)")
    model_index = _read_json(index, "model_index.json")
    minilm = list(model_index.get("text_encoder") or []) == MINILM_TEXT_ENCODER
    # SDXL: a text_encoder_2/ (the refiner has no text_encoder/: model_index says [null, null])
    sdxl = (folder / "text_encoder_2").is_dir() and not minilm
    components = (
        tuple(c for c in SDXL_COMPONENTS if c != "text_encoder" or (folder / c).is_dir()) if sdxl else COMPONENTS
    )
    # Every config is checked before any weights are read: a crafted number fails fast, whatever its file.
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        _check_config(sched, "scheduler", _read_json(sched, "scheduler config"))
    for comp in components:
        cfg_path = folder / comp / "config.json"
        if comp == "text_encoder" and minilm:
            _minilm_config(folder)
        elif cfg_path.is_file() and not (comp == "vae" and vae is not None):
            _check_config(cfg_path, COMPONENT_KINDS[comp], _read_json(cfg_path, f"{comp} config"))
    sds: dict[str, StateDict] = {}
    cfgs: dict[str, dict[str, Any]] = {}
    skipped: list[str] = []
    for comp in components:
        if comp == "vae" and vae is not None:
            continue
        if comp == "text_encoder" and minilm:
            cfgs[comp] = _minilm_config(folder)
            continue
        sub = folder / comp
        if not sub.is_dir():
            raise WeightsError(f"{folder}: missing the {comp}/ subfolder")
        sds[comp], cfgs[comp] = _load_component_folder(sub, COMPONENT_KINDS[comp], dtype)
    if vae is not None:
        own = folder / "vae" / "config.json"
        own_cfg = _read_json(own, "vae config") if own.is_file() else None
        scale = _scaling_factor_of(own_cfg, SDXL_VAE_SCALING_FACTOR if sdxl else SD_VAE_SCALING_FACTOR)
        sds["vae"], cfgs["vae"] = load_vae_for_model(vae, scale, own_cfg)
    if not minilm and "text_encoder" in sds:
        sds["text_encoder"] = _clean_text_encoder(sds["text_encoder"], skipped)
    if "text_encoder_2" in sds:
        from sdengine.models.clip_text import add_projection_prefix

        sds["text_encoder_2"] = {
            k: v for k, v in add_projection_prefix(sds["text_encoder_2"]).items() if not km.is_known_unused(k)
        }
    cfgs["scheduler"] = _read_json(sched, "scheduler config") if sched.is_file() else {}
    pred = prediction_type or cfgs["scheduler"].get("prediction_type", "epsilon")
    cfgs["scheduler"]["prediction_type"] = pred
    cross = cfgs["unet"].get("cross_attention_dim")
    tok = folder / "tokenizer"
    tok2 = folder / "tokenizer_2"
    if sdxl:
        family = "sdxl" if "text_encoder" in components else "sdxl_refiner"
    else:
        family = "custom" if minilm else {768: "sd1", 1024: "sd2"}.get(cross if isinstance(cross, int) else 0, "custom")
    return LoadedCheckpoint(
        source=folder,
        layout="diffusers",
        state_dicts=sds,
        configs=cfgs,
        prediction_type=pred,
        family=family,
        inpainting=cfgs["unet"].get("in_channels") == 9,
        tokenizer_dir=tok if tok.is_dir() else None,
        skipped=skipped,
        text_encoder_type="minilm" if minilm else "clip",
        tokenizer_2_dir=tok2 if tok2.is_dir() else None,
        force_zeros_for_empty_prompt=bool(model_index.get("force_zeros_for_empty_prompt", False)),
    )


# -------------------------------------------------------------------------------------------- single file


def _ldm_vae_to_diffusers(vae: Mapping[str, torch.Tensor], where: str) -> StateDict:
    renamed, unknown = km.vae_ldm_to_diffusers(vae, vae_layout_from_ldm(vae))
    if unknown:
        raise WeightsError(f"{where}: unexpected VAE keys: {_name_some(unknown)}")
    return renamed


def load_vae(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """A VAE on its own: an LDM-layout file (with or without `first_stage_model.`), a diffusers-layout file,
    or a diffusers folder / its `vae/` subfolder. Returns (diffusers-named state dict, config)."""
    path = Path(path)
    if path.is_dir():
        sub = path / "vae" if (path / "vae" / "config.json").is_file() else path
        return _load_component_folder(sub, "vae")
    sd, _ = load_file(path)
    if any(k.startswith(km.UNET_PREFIX) for k in sd):
        raise WeightsError(f"{path}: a whole checkpoint (model.diffusion_model.* weights), not a VAE file")
    sd = {k.removeprefix(km.VAE_PREFIX): v for k, v in sd.items() if not km.is_known_unused(k)}
    if "encoder.down.0.block.0.conv1.weight" in sd:
        return _ldm_vae_to_diffusers(sd, str(path)), vae_config_from_ldm(sd)
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        ldm, unknown = km.vae_diffusers_to_ldm(sd, vae_layout_from_diffusers(sd))
        if unknown:
            raise WeightsError(f"{path}: unexpected VAE keys: {_name_some(unknown)}")
        return sd, vae_config_from_ldm(ldm)
    from .tiny_vae_file import is_tiny_vae_state

    if is_tiny_vae_state(sd):
        raise WeightsError(f"{path}: a tiny VAE (TAESD), not a full VAE: give it as --tiny-vae / tiny_vae=")
    raise WeightsError(f"{path}: not a VAE (no encoder.down.* or encoder.down_blocks.* weights)")


def load_vae_for_model(
    path: str | Path, model_scaling_factor: float, model_vae_config: Mapping[str, Any] | None = None
) -> tuple[StateDict, dict[str, Any]]:
    """:func:`load_vae` for a model whose latents are scaled by ``model_scaling_factor``. A VAE *file* carries
    no config, so its scaling factor is the model's (A1111 takes it from the model's config whatever VAE is
    loaded): an SDXL model with the LDM-layout ``sdxl_vae.safetensors`` keeps 0.13025, never SD's 0.18215. A
    diffusers VAE folder states its own, used as diffusers uses it. The GroupNorm group count, which no weight
    shows, is the model's own VAE's (``model_vae_config``) where the file has that VAE's widths and depth (a VAE
    made for this model: A1111 loads a VAE file into the model's own VAE network), else LDM's 32.

    The latent statistics (``latents_mean`` / ``latents_std``: Playground v2.5's normalisation, docs/edm.md) are
    the model's, as ComfyUI's latent format belongs to the model and not to the VAE: where the model's own VAE
    config has them, the given VAE (a file, or a folder with none or other ones) gets them and the model's
    scaling factor, which goes with them; a VAE's own statistics on a model without any are dropped. A folder's
    differing ones are logged (the U-Net samples in the model's latent space whatever decodes it). Without
    ``model_vae_config`` the VAE's config stays as it is."""
    sd, cfg = load_vae(path)
    own = model_vae_config or {}
    if model_vae_config is not None:  # the model's own VAE config known: its latent format
        _keep_model_latent_format(cfg, own, model_scaling_factor, path)
    if not Path(path).is_dir():
        cfg["scaling_factor"] = float(model_scaling_factor)
        groups = own.get("norm_num_groups")
        same_network = [int(c) for c in own.get("block_out_channels") or ()] == list(cfg["block_out_channels"]) and (
            own.get("layers_per_block") == cfg["layers_per_block"]
        )
        if same_network and isinstance(groups, int) and not isinstance(groups, bool) and groups > 0:
            cfg["norm_num_groups"] = groups
    return sd, cfg


def _keep_model_latent_format(
    cfg: dict[str, Any], own: Mapping[str, Any], model_scaling_factor: float, path: str | Path
) -> None:
    """The model's latents_mean / latents_std (and with them its scaling factor) onto a given VAE's ``cfg``; a
    VAE's own statistics off it where the model has none (see :func:`load_vae_for_model`)."""
    mean, std = own.get("latents_mean"), own.get("latents_std")
    theirs = (cfg.get("latents_mean"), cfg.get("latents_std"))
    if mean is not None and std is not None:
        model = ([float(x) for x in mean], [float(x) for x in std])
        if theirs[0] is not None and ([float(x) for x in theirs[0]], [float(x) for x in theirs[1] or ()]) != model:
            log.warning("VAE %s: its latent statistics differ from the model's; the model's are used", path)
        cfg["latents_mean"], cfg["latents_std"] = model
        cfg["scaling_factor"] = float(model_scaling_factor)
    elif theirs[0] is not None or theirs[1] is not None:
        log.warning("VAE %s: the model has no latent statistics; the VAE's are not used", path)
        cfg.pop("latents_mean", None)
        cfg.pop("latents_std", None)


def build_vae(
    path: str | Path,
    *,
    scaling_factor: float,
    model_vae_config: Mapping[str, Any] | None = None,
    unet_config: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> torch.nn.Module:
    """A separate VAE (:func:`load_vae_for_model`: a file keeps the model's ``scaling_factor``) built as
    :func:`build_models` builds a model's own, strictly (wrong keys or shapes: a one-line WeightsError); with
    ``unet_config``, refused when its latents are not that U-Net's (:func:`check_vae_fits`)."""
    from sdengine.models.vae import AutoencoderKL, VAEConfig

    from .io import parse_dtype

    sd, cfg = load_vae_for_model(path, scaling_factor, model_vae_config)
    if unet_config is not None:
        check_vae_fits(cfg, unet_config, path)
    try:
        vcfg = VAEConfig.from_diffusers(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{path}: not a usable VAE config ({_first_line(e)})") from None
    model = build_on_meta(lambda: AutoencoderKL(vcfg), sd, name=f"VAE {Path(path).name}", dtype=parse_dtype(dtype))
    return model.to(device) if device is not None else model


def load_checkpoint_vae(path: str | Path) -> tuple[StateDict, dict[str, Any]]:
    """The VAE a model carries itself (a diffusers folder's ``vae/``, a single file's ``first_stage_model.*``),
    whatever VAE file sits beside it: A1111's ``sd_vae`` "None". MissingVAEError when it has none."""
    path = Path(path)
    if path.is_dir():
        if not (path / "vae" / "config.json").is_file():
            raise MissingVAEError(f"{path}: this model folder has no vae/ of its own")
        return _load_component_folder(path / "vae", "vae")
    ckpt = load_checkpoint(path)
    if "vae" not in ckpt.state_dicts:
        raise MissingVAEError(f"{path}: this checkpoint has no VAE of its own (no first_stage_model.* weights)")
    return ckpt.state_dicts["vae"], ckpt.configs["vae"]


def _scaling_factor_of(cfg: Mapping[str, Any] | None, default: float) -> float:
    value = (cfg or {}).get("scaling_factor")
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default


def _configs_from_folder(folder: Path) -> dict[str, dict[str, Any]]:
    cfgs = {
        c: _read_json(folder / c / "config.json", f"{c} config")
        for c in (*COMPONENTS, "text_encoder_2")
        if (folder / c / "config.json").is_file()
    }
    sched = folder / "scheduler" / "scheduler_config.json"
    if sched.is_file():
        cfgs["scheduler"] = _read_json(sched, "scheduler config")
    return cfgs


def _configs_from_metadata(path: Path, text: str) -> dict[str, dict[str, Any]]:
    """The component configs our `convert` writes into a single file's metadata (any other writer's too)."""
    try:
        cfgs = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON ({_first_line(e)})") from None
    if not isinstance(cfgs, dict) or not all(isinstance(v, dict) for v in cfgs.values()):
        raise WeightsError(f"{path}: metadata {CONFIG_METADATA_KEY!r} is not an object of component configs")
    return cfgs


def ldm_to_components(
    sd: Mapping[str, torch.Tensor],
    *,
    info: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
    configs: Mapping[str, Mapping[str, Any]] | None = None,
    where: str = "<checkpoint>",
) -> tuple[dict[str, StateDict], Detected, list[str]]:
    """Flat LDM state dict -> ({unet, vae?, text_encoder?} in our names, detection, skipped keys)."""
    check_supported(sd)
    markers = [k for k in (V_PRED_KEY, ZTSNR_KEY) if k in sd]  # empty marker tensors (see V_PRED_KEY)
    if markers:
        sd = {k: v for k, v in sd.items() if k not in markers}
    parts, skipped, unknown = km.split_ldm(sd)
    skipped += markers
    if unknown:
        raise WeightsError(f"{where}: unexpected keys (not SD1/SD2 LDM names): {_name_some(unknown)}")
    out: dict[str, StateDict] = {}
    if parts["clip"] and parts["openclip"]:
        raise WeightsError(f"{where}: holds both a CLIP and an OpenCLIP text encoder; not an SD1/SD2 checkpoint")

    te_kind: Literal["clip", "openclip"] | None = None
    te_cfg = (configs or {}).get("text_encoder")
    if parts["clip"]:
        te_kind = "clip"
        te, bad = km.clip_ldm_to_diffusers(parts["clip"])
        out["text_encoder"] = _clean_text_encoder(te, skipped)
    elif parts["openclip"]:
        te_kind = "openclip"
        n_file = openclip_num_blocks(parts["openclip"])
        # SD2 reads the penultimate layer: the file's last block is unused unless a config says otherwise.
        n_used = int(te_cfg["num_hidden_layers"]) if te_cfg else max(n_file - 1, 1)
        te, bad = km.openclip_ldm_to_diffusers(parts["openclip"], num_layers=n_used)
        if bad:
            named = [km.OPENCLIP_PREFIX + k for k in bad]
            raise WeightsError(f"{where}: unexpected text-encoder keys: {_name_some(named)}")
        skipped += [
            km.OPENCLIP_PREFIX + k
            for k in parts["openclip"]
            if k.startswith("transformer.resblocks.") and int(k.split(".")[2]) >= n_used
        ]
        out["text_encoder"] = te

    unet_layout = km.UNetLayout.from_config(configs["unet"]) if configs and "unet" in configs else None
    det = detect_ldm(
        parts["unet"],
        parts["vae"] or None,
        out.get("text_encoder"),
        te_kind,
        prediction_type=prediction_type,
        info=info,
    )
    unet, bad = km.unet_ldm_to_diffusers(parts["unet"], unet_layout or _layout_of(det.unet_config))
    if bad:
        raise WeightsError(f"{where}: unexpected UNet keys: {_name_some([km.UNET_PREFIX + k for k in bad])}")
    out["unet"] = unet
    if parts["vae"]:
        out["vae"] = _ldm_vae_to_diffusers(parts["vae"], where)
    return out, det, skipped


def _layout_of(unet_config: Mapping[str, Any]) -> km.UNetLayout:
    return km.UNetLayout.from_config(unet_config)


def load_single_file(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    config: str | Path | None = None,
) -> LoadedCheckpoint:
    """An LDM single file -> LoadedCheckpoint. `config`: a diffusers folder whose configs (and tokenizer)
    to use instead of synthesised ones, like diffusers' `from_single_file(config=...)`, or an LDM `.yaml`
    (see `ldm_config`); without one, a `.yaml` of the same stem beside the file is used as A1111 does."""
    path = Path(path)
    ldm_cfg: LDMConfig | None = None
    folder_cfg: Path | None = None
    if config is None and (beside := config_beside(path)) is not None:
        config = beside  # A1111's rule: `model.yaml` beside `model.safetensors` is its config
        log.info("%s: using the LDM config beside it, %s", path, beside.name)
    if config is not None:
        if Path(config).is_dir():
            folder_cfg = Path(config)
        elif is_yaml_config(config) and Path(config).is_file():
            ldm_cfg = read_ldm_config(config)
        else:
            raise ModelConfigError(f"{config}: expected a diffusers model folder or an LDM .yaml config")
    sd, info = load_file(path)
    cfg_src: dict[str, dict[str, Any]] = {}
    if CONFIG_METADATA_KEY in info:  # written by our convert: exact configs
        cfg_src = _configs_from_metadata(path, info[CONFIG_METADATA_KEY])
    if folder_cfg is not None:
        cfg_src = _configs_from_folder(folder_cfg)
        if not cfg_src.get("unet"):
            raise ModelConfigError(f"{folder_cfg}: no unet/config.json (not a diffusers model folder)")
    for comp, cfg in cfg_src.items():  # before the configs steer any key mapping
        if comp in COMPONENT_KINDS:
            _check_config(config if config is not None else path, COMPONENT_KINDS[comp], cfg)
    if is_sdxl_ldm(sd):
        if prediction_type is None and ldm_cfg is not None and ldm_cfg.states_prediction and "scheduler" not in cfg_src:
            prediction_type = ldm_cfg.prediction_type  # A1111's sd_xl_v.yaml beside a v-prediction SDXL file
        return _load_sdxl_single_file(
            path, sd, cfg_src, config=config, vae=vae, prediction_type=prediction_type, ldm_cfg=ldm_cfg
        )
    # The `v_pred` marker (ComfyUI writes it into every v-prediction model it saves, SD 1.x/2.x included; `ztsnr`
    # beside it: zero terminal SNR) says the prediction type unless the caller, a config that states it, or
    # the file's own scheduler config does.
    zero_snr = False
    if (
        prediction_type is None
        and V_PRED_KEY in sd
        and not (ldm_cfg is not None and ldm_cfg.states_prediction)
        and "scheduler" not in cfg_src
    ):
        prediction_type, zero_snr = "v_prediction", ZTSNR_KEY in sd
    comps, det, skipped = ldm_to_components(
        sd, info=info, prediction_type=prediction_type, configs=cfg_src or None, where=str(path)
    )
    if zero_snr:
        det.scheduler_config["rescale_betas_zero_snr"] = True
    cfgs: dict[str, dict[str, Any]] = {
        "unet": det.unet_config,
        "scheduler": det.scheduler_config,
    }
    if det.vae_config:
        cfgs["vae"] = det.vae_config
    if det.text_encoder_config:
        cfgs["text_encoder"] = det.text_encoder_config
    if folder_cfg is not None:  # the folder's numbers that shapes fix must be the file's
        check_folder_configs(folder_cfg, cfg_src, cfgs)
    for k, v in cfg_src.items():
        cfgs[k] = dict(v)
    if ldm_cfg is not None:  # heads, prediction type, schedule and scale factor from the LDM config
        pred_cfg = apply_ldm_config(
            ldm_cfg, cfgs, text_encoder_kind=det.text_encoder_kind, prediction_type=prediction_type
        )
        det.notes = [n for n in det.notes if "prediction type" not in n]
        if det.family == "sd2" and "unet" not in cfg_src:  # SD 2.x: 768 px for v, 512 px "base" for epsilon
            v768 = pred_cfg == "v_prediction"
            cfgs["unet"].update(sample_size=96 if v768 else 64, upcast_attention=v768)
            if "vae" in cfgs and "vae" not in cfg_src:
                cfgs["vae"]["sample_size"] = 768 if v768 else 512
    for comp, cfg in cfgs.items():
        if comp in COMPONENT_KINDS:
            _check_config(config if config is not None else path, COMPONENT_KINDS[comp], cfg)
    pred = prediction_type or cfgs["scheduler"].get("prediction_type", det.prediction_type)
    cfgs["scheduler"]["prediction_type"] = pred
    if vae is not None:
        if "vae" in comps:
            skipped += [f"{km.VAE_PREFIX}* (replaced by vae={vae})"]
        own_scale = ldm_cfg.scale_factor if ldm_cfg is not None and ldm_cfg.scale_factor is not None else None
        scale = _scaling_factor_of(cfgs.get("vae"), own_scale if own_scale is not None else SD_VAE_SCALING_FACTOR)
        comps["vae"], cfgs["vae"] = load_vae_for_model(vae, scale, cfgs.get("vae"))
    if "vae" not in comps:
        raise MissingVAEError(
            f"{path}: this checkpoint has no VAE (no first_stage_model.* weights); pass vae=PATH "
            "(a VAE .safetensors or a diffusers folder)"
        )
    if "text_encoder" not in comps:
        raise WeightsError(f"{path}: this checkpoint has no text encoder (no cond_stage_model.* weights)")
    if skipped:
        log.debug("%s: skipped %d known-unused keys: %s", path, len(skipped), ", ".join(skipped))
    tok = Path(config) / "tokenizer" if config is not None else None
    return LoadedCheckpoint(
        source=path,
        layout="single_file",
        state_dicts=comps,
        configs=cfgs,
        prediction_type=pred,
        family=det.family,
        inpainting=det.inpainting,
        tokenizer_dir=tok if tok is not None and tok.is_dir() else None,
        skipped=skipped,
        notes=det.notes,
    )


def _load_sdxl_single_file(
    path: Path,
    sd: Mapping[str, torch.Tensor],
    cfg_src: Mapping[str, Mapping[str, Any]],
    *,
    config: str | Path | None,
    vae: str | Path | None,
    prediction_type: str | None,
    ldm_cfg: LDMConfig | None = None,
) -> LoadedCheckpoint:
    """An SDXL (sgm layout) single file; see sdengine.weights.sdxl_files. `ldm_cfg`: its `.yaml` (sgm's
    network numbers checked against the weights; heads and scale factor taken from it)."""
    comps, cfgs, family, skipped = sdxl_ldm_to_components(sd, configs=cfg_src or None, where=str(path))
    if ldm_cfg is not None:
        check_ldm_network(ldm_cfg, cfgs, text_encoder_kind=family)
    for comp, cfg in cfgs.items():
        if comp in COMPONENT_KINDS:
            _check_config(config if config is not None else path, COMPONENT_KINDS[comp], cfg)
    pred = prediction_type or cfgs["scheduler"].get("prediction_type", "epsilon")
    cfgs["scheduler"]["prediction_type"] = pred
    if vae is not None:
        own_scale = ldm_cfg.scale_factor if ldm_cfg is not None and ldm_cfg.scale_factor is not None else None
        scale = _scaling_factor_of(cfgs.get("vae"), own_scale if own_scale is not None else SDXL_VAE_SCALING_FACTOR)
        comps["vae"], cfgs["vae"] = load_vae_for_model(vae, scale, cfgs.get("vae"))
    if "vae" not in comps:
        raise MissingVAEError(f"{path}: this checkpoint has no VAE (no first_stage_model.* weights); pass vae=PATH")
    folder = Path(config) if config is not None else None
    tok = folder / "tokenizer" if folder is not None else None
    tok2 = folder / "tokenizer_2" if folder is not None else None
    index = folder / "model_index.json" if folder is not None else None
    # diffusers' SDXL default: the base zeroes an empty negative prompt, the refiner does not
    force_zeros = family == "sdxl"
    if index is not None and index.is_file():
        force_zeros = bool(_read_json(index, "model_index.json").get("force_zeros_for_empty_prompt", force_zeros))
    return LoadedCheckpoint(
        source=path,
        layout="single_file",
        state_dicts=comps,
        configs=cfgs,
        prediction_type=pred,
        family=family,
        tokenizer_dir=tok if tok is not None and tok.is_dir() else None,
        tokenizer_2_dir=tok2 if tok2 is not None and tok2.is_dir() else None,
        skipped=skipped,
        force_zeros_for_empty_prompt=force_zeros,
    )


def load_checkpoint(
    path: str | Path,
    *,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Diffusers folder or single file -> LoadedCheckpoint (state dicts in our names + configs).

    `dtype` ('fp16'/'bf16'/'fp32') casts floating tensors (a copy; a diffusers folder's as they are read, one at
    a time, so the load never holds the files' weights and their conversion together); None keeps the file's
    dtype (zero-copy for safetensors)."""
    path = Path(path)
    if path.is_dir():
        ckpt = load_diffusers_folder(path, vae=vae, prediction_type=prediction_type, dtype=dtype)
    elif path.suffix.lower() in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        ckpt = load_single_file(path, vae=vae, prediction_type=prediction_type, config=config)
    elif not path.exists():
        raise WeightsError(f"{path}: no such file or folder")
    else:
        raise WeightsError(f"{path}: expected a diffusers folder or a .safetensors/.ckpt file")
    if vae is not None:  # its latents must be the U-Net's (one-line error, before any model is built)
        check_vae_fits(ckpt.configs["vae"], ckpt.configs["unet"], vae)
    if dtype is not None:
        ckpt.state_dicts = {k: convert_dtype(v, dtype) for k, v in ckpt.state_dicts.items()}
    return ckpt


# ------------------------------------------------------------------------------------------- into models


def check_keys(expected: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], *, name: str = "model") -> None:
    """WeightsError naming the missing, unexpected or wrongly shaped tensors of ``sd`` against a model's
    ``expected`` state dict (what strict loading refuses)."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing:
        raise WeightsError(f"{name}: missing keys: {_name_some(missing)}")
    if unexpected:
        raise WeightsError(f"{name}: unexpected keys: {_name_some(unexpected)}")
    wrong = [
        f"{k} (file {tuple(sd[k].shape)}, model {tuple(v.shape)})"
        for k, v in expected.items()
        if tuple(sd[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise WeightsError(f"{name}: wrong tensor shapes: {_name_some(wrong, 3)}")


def load_into(module: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, name: str = "model") -> torch.nn.Module:
    """Strict, shape-checked `load_state_dict(assign=True)`: the tensors become the parameters (no copy, so a
    model built on the meta device ends up backed by the file's memory map)."""
    check_keys(module.state_dict(), sd, name=name)
    module.load_state_dict(dict(sd), strict=True, assign=True)
    return module


# parameters_on_meta patches nn.Module.register_parameter, which every thread shares; the server's workers (one per
# device) load models at the same time. So the patch is installed once while any thread is inside (a count under a
# lock) and acts only for the threads that asked for it (a thread-local flag): another thread's modules stay real,
# and the original method is put back when the last one leaves.
_META_LOCK = threading.Lock()
_META_USERS = 0
_META_ORIGINAL: Any = None
_META_THREAD = threading.local()


def _register_on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
    _META_ORIGINAL(module, name, param)
    if getattr(_META_THREAD, "depth", 0) and param is not None and param.device.type != "meta":
        kind = type(param)  # the class registered just now (Parameter or a subclass)
        module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every nn.Parameter on the meta device while the module is built (accelerate's trick).

    Unlike `with torch.device("meta")`, buffers stay real: non-persistent buffers (position ids, frequency
    tables) are in no file, so they must be computed by the constructor. Initialisers then run on meta
    tensors, which costs nothing, so building a 1B-parameter model takes milliseconds and no memory.
    Only the calling thread's modules are affected (see the note above)."""
    global _META_USERS, _META_ORIGINAL
    with _META_LOCK:
        if _META_USERS == 0:
            _META_ORIGINAL = torch.nn.Module.register_parameter
            torch.nn.Module.register_parameter = _register_on_meta  # type: ignore[method-assign, assignment]
        _META_USERS += 1
    _META_THREAD.depth = getattr(_META_THREAD, "depth", 0) + 1
    try:
        with skip_meta_init():  # the initialisers' first meta call would import ~1 s of PyTorch machinery
            yield
    finally:
        _META_THREAD.depth -= 1
        with _META_LOCK:
            _META_USERS -= 1
            if _META_USERS == 0:
                torch.nn.Module.register_parameter = _META_ORIGINAL  # type: ignore[method-assign]


def build_on_meta(
    factory: Callable[[], torch.nn.Module],
    sd: Mapping[str, torch.Tensor],
    *,
    name: str = "model",
    dtype: torch.dtype | None = None,
) -> torch.nn.Module:
    """Construct with no memory/initialisation cost (parameters on meta), then adopt the weights (no copy)."""
    with parameters_on_meta():
        module = factory()
    if dtype is not None:
        sd = convert_dtype(sd, dtype)
    load_into(module, sd, name=name)
    return module.eval()


# --------------------------------------------------------------------------------------------- writing


def components_to_ldm(ckpt: LoadedCheckpoint) -> StateDict:
    """Our names -> one flat LDM state dict (what A1111/ComfyUI/diffusers' from_single_file read)."""
    if ckpt.text_encoder_type != "clip":
        raise WeightsError(
            f"{ckpt.source}: its text encoder is {ckpt.text_encoder_type} (by reference, no weights here); "
            "only CLIP-based SD models can be written as an LDM file or a diffusers folder"
        )
    out: StateDict = {}
    unet_cfg = ckpt.configs.get("unet")
    layout = km.UNetLayout.from_config(unet_cfg) if unet_cfg else unet_layout_from_diffusers(ckpt.state_dicts["unet"])
    unet, bad = km.unet_diffusers_to_ldm(ckpt.state_dicts["unet"], layout)
    if bad:
        raise WeightsError(f"{ckpt.source}: UNet keys with no LDM name: {_name_some(bad)}")
    out.update({km.UNET_PREFIX + k: v for k, v in unet.items()})
    vae_sd = ckpt.state_dicts["vae"]
    vae, bad = km.vae_diffusers_to_ldm(vae_sd, vae_layout_from_diffusers(vae_sd))
    if bad:
        raise WeightsError(f"{ckpt.source}: VAE keys with no LDM name: {_name_some(bad)}")
    out.update({km.VAE_PREFIX + k: v for k, v in vae.items()})
    te_sd = ckpt.state_dicts["text_encoder"]
    if text_encoder_kind(ckpt.configs.get("text_encoder", {})) == "openclip":
        te, bad = km.openclip_diffusers_to_ldm(te_sd)
        prefix = km.OPENCLIP_PREFIX
    else:
        te, bad = km.clip_diffusers_to_ldm(te_sd)
        prefix = km.CLIP_PREFIX
    if bad:
        raise WeightsError(f"{ckpt.source}: text-encoder keys with no LDM name: {_name_some(bad)}")
    out.update({prefix + k: v for k, v in te.items()})
    scheduler = dict(ckpt.configs.get("scheduler") or {})
    scheduler["prediction_type"] = ckpt.prediction_type  # what the file says it is (its metadata too)
    out.update(prediction_markers(scheduler))  # v_pred / ztsnr, as for SDXL
    return out


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_diffusers_folder(
    ckpt: LoadedCheckpoint,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """Write ``dst`` as a diffusers folder, as a whole or not at all: it is filled under a temporary name and
    renamed into place, so an error (a full disk) leaves no half folder and an older ``dst`` untouched. An
    existing ``dst`` is replaced only when it is a model folder (has ``model_index.json``) or empty."""
    dst = Path(dst)
    if ckpt.text_encoder_type != "clip":
        raise WeightsError(
            f"{ckpt.source}: its text encoder is {ckpt.text_encoder_type} (by reference, no weights here); "
            "copy the folder instead of converting it"
        )
    if dst.exists() and not dst.is_dir():
        raise WeightsError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / "model_index.json").is_file():
        raise WeightsError(f"{dst}: exists and is not a diffusers model folder; refusing to replace it")
    with atomic_dir(dst) as tmp:
        _fill_diffusers_folder(ckpt, tmp, dtype=dtype, tokenizer_dir=tokenizer_dir)
    return dst


def _fill_diffusers_folder(
    ckpt: LoadedCheckpoint, dst: Path, *, dtype: str | torch.dtype | None, tokenizer_dir: str | Path | None
) -> None:
    cfgs = ckpt.configs
    sdxl = ckpt.family in ("sdxl", "sdxl_refiner")
    sched_cls = cfgs["scheduler"].get("_class_name", "EulerDiscreteScheduler" if sdxl else "PNDMScheduler")
    parts = [
        ("unet", "UNet2DConditionModel", "diffusers", "diffusion_pytorch_model"),
        ("vae", "AutoencoderKL", "diffusers", "diffusion_pytorch_model"),
        ("text_encoder", "CLIPTextModel", "transformers", "model"),
    ]
    if sdxl:
        parts.append(("text_encoder_2", "CLIPTextModelWithProjection", "transformers", "model"))
    for comp, cls, lib, fname in parts:
        if comp not in ckpt.state_dicts:  # the SDXL refiner has no first text encoder
            continue
        cfg = dict(cfgs[comp])
        if lib == "diffusers":
            cfg.setdefault("_class_name", cls)
            cfg.setdefault("_diffusers_version", DIFFUSERS_VERSION)
        sd = ckpt.state_dicts[comp]
        _write_json(dst / comp / "config.json", cfg)
        save_safetensors(sd, dst / comp / f"{fname}.safetensors", metadata={"format": "pt"}, dtype=dtype)
    _write_json(
        dst / "scheduler" / "scheduler_config.json",
        {"_diffusers_version": DIFFUSERS_VERSION, **cfgs["scheduler"], "_class_name": sched_cls},
    )
    tok_src = Path(tokenizer_dir) if tokenizer_dir else ckpt.tokenizer_dir
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionInpaintPipeline"
        if ckpt.inpainting
        else "StableDiffusionInstructPix2PixPipeline"
        if cfgs["unet"].get("in_channels") == 8
        else "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"] if tok_src else [None, None],
        "scheduler": ["diffusers", sched_cls],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    }
    if sdxl:
        _sdxl_index(ckpt, dst, index, tok_src)
    elif tok_src and Path(tok_src).resolve() != (dst / "tokenizer").resolve():
        shutil.copytree(tok_src, dst / "tokenizer", dirs_exist_ok=True)
    elif not tok_src and write_clip_tokenizer(dst / "tokenizer", pad="!" if _pads_with_bang(ckpt) else None):
        index["tokenizer"] = ["transformers", "CLIPTokenizer"]
    _write_json(dst / "model_index.json", index)


def _pads_with_bang(ckpt: LoadedCheckpoint) -> bool:
    """OpenCLIP text encoders pad with "!" whatever the model's width (a small SD2-layout model is family
    "custom"): what the pipeline's loader does, so a converted folder loads back to the same image."""
    return ckpt.family == "sd2" or text_encoder_kind(ckpt.configs.get("text_encoder", {})) == "openclip"


def _sdxl_index(ckpt: LoadedCheckpoint, dst: Path, index: dict[str, Any], tok_src: str | Path | None) -> None:
    """model_index.json entries and tokenizers of an SDXL folder (base: two encoders; refiner: the second)."""
    refiner = "text_encoder" not in ckpt.state_dicts
    for key in ("safety_checker", "feature_extractor", "requires_safety_checker"):
        index.pop(key)
    index.update(
        _class_name="StableDiffusionXLImg2ImgPipeline"
        if refiner
        else "StableDiffusionXLInpaintPipeline"
        if ckpt.inpainting
        else "StableDiffusionXLInstructPix2PixPipeline"
        if ckpt.configs["unet"].get("in_channels") == 8
        else "StableDiffusionXLPipeline",
        text_encoder=[None, None] if refiner else ["transformers", "CLIPTextModel"],
        tokenizer=[None, None] if refiner else ["transformers", "CLIPTokenizer"],
        text_encoder_2=["transformers", "CLIPTextModelWithProjection"],
        tokenizer_2=["transformers", "CLIPTokenizer"],
        force_zeros_for_empty_prompt=ckpt.force_zeros_for_empty_prompt,
    )
    if refiner:
        index["requires_aesthetics_score"] = True
    for name, src, pad in (("tokenizer", tok_src, None), ("tokenizer_2", ckpt.tokenizer_2_dir, "!")):
        if name == "tokenizer" and refiner:
            continue
        if src and Path(src).resolve() != (dst / name).resolve():
            shutil.copytree(src, dst / name, dirs_exist_ok=True)
        elif not src:
            write_clip_tokenizer(dst / name, pad=pad)


def write_clip_tokenizer(dst: Path, *, pad: str | None = None) -> bool:
    """Single files carry no tokenizer; SD1 and SD2 both use OpenAI CLIP's BPE vocabulary, which sdengine
    ships, so write it as a transformers CLIPTokenizer folder (SD2's pads with "!", SD1's with EOS)."""
    import gzip

    assets = Path(__file__).resolve().parent.parent / "assets" / "clip"
    if not (assets / "vocab.json.gz").is_file() or not (assets / "merges.txt.gz").is_file():
        return False
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        (dst / name).write_bytes(gzip.decompress((assets / f"{name}.gz").read_bytes()))
    eos = "<|endoftext|>"
    _write_json(
        dst / "tokenizer_config.json",
        {
            "tokenizer_class": "CLIPTokenizer",
            "model_max_length": 77,
            "do_lower_case": True,
            "errors": "replace",
            "add_prefix_space": False,
            "bos_token": "<|startoftext|>",
            "eos_token": eos,
            "unk_token": eos,
            "pad_token": pad or eos,
        },
    )
    _write_json(
        dst / "special_tokens_map.json",
        {"bos_token": "<|startoftext|>", "eos_token": eos, "unk_token": eos, "pad_token": pad or eos},
    )
    return True


def save_single_file(ckpt: LoadedCheckpoint, dst: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    dst = Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise WeightsError(f"{dst}: sdengine writes single files as .safetensors only")
    sdxl = ckpt.family in ("sdxl", "sdxl_refiner")
    cfgs = {k: v for k, v in ckpt.configs.items() if k in (*SDXL_COMPONENTS, "scheduler")}
    meta = {
        "format": "pt",
        CONFIG_METADATA_KEY: json.dumps(cfgs, sort_keys=True),
        "sdengine.prediction_type": ckpt.prediction_type,
    }
    flat = sdxl_components_to_ldm(ckpt.state_dicts, ckpt.configs) if sdxl else components_to_ldm(ckpt)
    save_safetensors(flat, dst, metadata=meta, dtype=dtype)
    return dst


def convert(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    vae: str | Path | None = None,
    prediction_type: str | None = None,
    config: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
) -> Path:
    """`sdengine convert SRC DST`: a `.safetensors` DST gets one LDM single file, any other DST a diffusers
    folder. SRC is either form (a `.ckpt` is read weights-only). `dtype` fp32/fp16/bf16 converts on write."""
    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise WeightsError(f"{dst}: refusing to convert a checkpoint onto itself")
    if config is not None and src.is_dir():  # it was read for single files only: ignored without a word
        raise WeightsError(
            f"{src}: --config is a single file's config (an LDM .yaml or a diffusers folder); a diffusers folder "
            "carries its own configs: drop --config"
        )
    ckpt = load_checkpoint(src, vae=vae, prediction_type=prediction_type, config=config)
    for comp, sd in ckpt.state_dicts.items():  # what loading would refuse, refused before anything is written
        factory = _model_factory(comp, ckpt.configs[comp])
        if factory is not None:
            with parameters_on_meta():
                check_keys(factory().state_dict(), sd, name=comp)
    if dst.suffix.lower() in PICKLE_SUFFIXES:
        raise WeightsError(f"{dst}: sdengine does not write pickle checkpoints; use .safetensors")
    dst.parent.mkdir(parents=True, exist_ok=True)  # `convert SRC out/new/model.safetensors` makes out/new
    if dst.suffix.lower() in SAFETENSORS_SUFFIXES:
        return save_single_file(ckpt, dst, dtype=dtype)
    return save_diffusers_folder(ckpt, dst, dtype=dtype, tokenizer_dir=tokenizer_dir)


__all__ = [
    "LoadedCheckpoint",
    "MissingVAEError",
    "build_models",
    "build_on_meta",
    "clip_config_from_weights",
    "component_weight_files",
    "components_to_ldm",
    "convert",
    "ldm_to_components",
    "load_checkpoint",
    "load_diffusers_folder",
    "load_into",
    "load_single_file",
    "load_vae",
    "save_diffusers_folder",
    "save_single_file",
]


# ------------------------------------------------------------------------------------- sdengine's models


def build_models(
    ckpt: LoadedCheckpoint,
    *,
    components: tuple[str, ...] = COMPONENTS,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> dict[str, torch.nn.Module]:
    """sdengine models for the checkpoint's components, built on meta and loaded strictly (zero-copy when no
    dtype/device change is asked for). A component whose model class has not been written yet is skipped
    with a log line."""
    from .io import parse_dtype

    target = parse_dtype(dtype)
    out: dict[str, torch.nn.Module] = {}
    for comp in components:
        if comp not in ckpt.state_dicts:  # a text encoder by reference (MiniLM): the caller loads it
            log.info("%s: no %s weights in the checkpoint: not built", ckpt.source, comp)
            continue
        factory = _model_factory(comp, ckpt.configs[comp])
        if factory is None:
            log.info("no sdengine model class for %s yet: not built", comp)
            continue
        model = build_on_meta(factory, ckpt.state_dicts[comp], name=comp, dtype=target)
        out[comp] = model.to(device) if device is not None else model
    return out


def _model_factory(comp: str, config: Mapping[str, Any]) -> Callable[[], torch.nn.Module] | None:
    if comp == "unet":
        from sdengine.models.unet import UNet, UNetConfig

        ucfg = UNetConfig.from_diffusers(config)
        return lambda: UNet(ucfg)
    if comp == "text_encoder":
        from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel

        tcfg = CLIPTextConfig.from_transformers(config)
        return lambda: CLIPTextModel(tcfg)
    if comp == "text_encoder_2":
        from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModelWithProjection

        t2cfg = CLIPTextConfig.from_transformers(config)
        return lambda: CLIPTextModelWithProjection(t2cfg)
    if comp == "vae":
        from sdengine.models.vae import AutoencoderKL, VAEConfig

        vcfg = VAEConfig.from_diffusers(config)
        return lambda: AutoencoderKL(vcfg)
    raise WeightsError(f"unknown component {comp!r}")
