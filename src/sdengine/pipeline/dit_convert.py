"""``sdengine convert`` for SD3 / SD3.5 and FLUX.1: diffusers folders <-> Stability's, BFL's and ComfyUI's files.

What is read (any layout the loaders read, :mod:`sdengine.weights.sd3_files`, :mod:`sdengine.pipeline.flux_loading`):

* SD3: a diffusers ``StableDiffusion3Pipeline`` folder, or a Stability single file (``model.diffusion_model.*``,
  ``first_stage_model.*``, optionally ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*``); ``clip_l=`` /
  ``clip_g=`` / ``t5=`` / ``vae=`` (``--clip-l`` ...) give a part apart or replace the model's own;
* Flux: a diffusers ``FluxPipeline`` folder, BFL's transformer file (``flux1-dev.safetensors``) with ``vae=`` /
  ``clip_l=`` / ``t5=`` (``ae.safetensors``, ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``), or ComfyUI's
  all-in-one checkpoint.

What is written (a ``.safetensors`` DST: one file; any other DST: a diffusers folder):

* SD3 file: Stability's layout, as ``sd3_medium_incl_clips_t5xxlfp16.safetensors`` holds it (the MMDiT under
  ``model.diffusion_model.`` with q/k/v stacked, the VAE in LDM names under ``first_stage_model.``, CLIP-L, bigG
  and T5 under ``text_encoders.*.transformer.`` in transformers' names); ``with_t5=False`` leaves T5 out
  (``sd3_medium_incl_clips``); a model without CLIP encoders is written without them (``sd3_medium``);
* Flux file: ComfyUI's all-in-one checkpoint (``model.diffusion_model.*`` in BFL's names, ``vae.*`` in LDM's,
  ``text_encoders.clip_l.transformer.*``, ``text_encoders.t5xxl.transformer.*``);
* ``transformer_only=True``: the diffusion model alone, without any prefix: BFL's ``flux1-*.safetensors`` layout,
  or ComfyUI's SD3 "diffusion model only" file;
* a folder: what diffusers' ``from_pretrained`` and sdengine load: ``transformer/``, ``vae/``, the text encoders
  (``text_encoder``, ``_2``, SD3's ``_3``; without T5 SD3's ``model_index.json`` says null), the scheduler config,
  the tokenizers (the source folder's, else sdengine's shipped CLIP and T5 v1.1 vocabularies, which are SD3's
  and Flux's) and ``model_index.json``.

Tensors are copied as they are (only renamed, q/k/v stacked or split, the final modulation's halves swapped),
so a round trip gives equal tensors; ``dtype`` casts every floating tensor on write. Float8 weights are written in
bfloat16 unless ``dtype`` says otherwise (ComfyUI's scaled float8 multiplied out, as loading does): sdengine
writes no float8. A single file carries no scheduler or VAE config: a folder whose scheduler or latent scaling
is not what a single file of its family reads back is refused rather than written into a file that would
generate other images. Every part is checked against its model's names and shapes before anything is written;
a folder is written whole or not at all, a file atomically.
"""

from __future__ import annotations

import gzip
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from sdengine.errors import UsageError
from sdengine.weights.io import SAFETENSORS_SUFFIXES, StateDict, WeightsError, load_file

Family = Literal["sd3", "flux"]
FLAGS = {"vae": "--vae", "clip_l": "--clip-l", "clip_g": "--clip-g", "t5": "--t5"}
T5_TOKENIZER_CONFIG = {
    "tokenizer_class": "T5Tokenizer",
    "model_max_length": 512,
    "eos_token": "</s>",
    "pad_token": "<pad>",
    "unk_token": "<unk>",
    "extra_ids": 100,
}
FLUX_VAE_PREFIX = "vae."  # ComfyUI's Flux checkpoints (flux_loading also reads first_stage_model.)
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class DiTConvertError(UsageError):
    """An SD3 / Flux conversion that cannot be done as asked: one line, nothing written."""


@dataclass
class Part:
    """One component: tensors in the names its diffusers / transformers folder holds, and that folder's config."""

    sd: StateDict
    config: dict[str, Any]


@dataclass
class DiTModel:
    """An SD3 or Flux model's parts, read from any layout (:func:`read_model`)."""

    family: Family
    source: Path
    transformer: Part  # diffusers' (= sdengine's) names
    vae: Part | None
    text: dict[str, Part | None] = field(default_factory=dict)  # clip_l, clip_g (SD3), t5
    scheduler: dict[str, Any] = field(default_factory=dict)
    tokenizers: dict[str, Path] = field(default_factory=dict)  # a source folder's tokenizer folders
    single_file_scheduler: dict[str, Any] = field(default_factory=dict)  # what a single file reads back


def family_of(src: Path) -> Family | None:
    """``"sd3"`` / ``"flux"`` for an SD3 or Flux folder or file, None for anything else. A Chroma model (Flux's
    blocks too) is refused in one line: it is not converted."""
    from sdengine.pipeline.chroma_loading import is_chroma_file, is_chroma_folder
    from sdengine.pipeline.flux_loading import is_flux_file, is_flux_folder
    from sdengine.weights.sd3_files import is_sd3

    if not src.exists():
        return None
    if is_sd3(src):
        return "sd3"
    if is_chroma_folder(src) if src.is_dir() else is_chroma_file(src):
        raise UsageError(
            f"{src}: a Chroma model; sdengine convert handles SD 1.x / 2.x, SDXL, SD3 and FLUX.1 (Chroma folders and "
            "files load as they are)"
        )
    if is_flux_folder(src) if src.is_dir() else is_flux_file(src):
        return "flux"
    return None


# -- reading ----------------------------------------------------------------------------------------------------


def _readable(sd: Mapping[str, torch.Tensor], where: str) -> StateDict:
    """Float8 tensors upcast to bfloat16 (sdengine writes no float8); everything else as it is."""
    out: StateDict = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{where}: {k} is not a tensor")
        out[k] = v.to(torch.bfloat16) if v.dtype in FLOAT8 else v
    return out


def _check(factory: Any, sd: Mapping[str, torch.Tensor], name: str) -> None:
    """``sd`` fits the model ``factory`` builds (names and shapes), checked on the meta device."""
    from sdengine.weights.loading import check_keys, parameters_on_meta

    with parameters_on_meta():
        model = factory()
    check_keys(model.state_dict(), sd, name=name)


def _vae_part(sd: StateDict, cfg: dict[str, Any], where: str) -> Part:
    from sdengine.models.config_checks import ConfigError
    from sdengine.models.vae import AutoencoderKL, VAEConfig

    try:
        vcfg = VAEConfig.from_diffusers(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{where}: not a usable VAE config ({e})") from None
    if vcfg.latent_channels != 16:
        raise WeightsError(f"{where}: the VAE makes {vcfg.latent_channels}-channel latents; SD3's and Flux's make 16")
    sd = _readable(sd, where)
    _check(lambda: AutoencoderKL(vcfg), sd, f"{where} (VAE)")
    return Part(sd, {"_class_name": "AutoencoderKL", **cfg})


def _vae_from_ldm(ldm: Mapping[str, torch.Tensor], where: str, factors: dict[str, float], size: int) -> Part:
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_config_from_ldm, vae_layout_from_ldm

    sd, unknown = km.vae_ldm_to_diffusers(ldm, vae_layout_from_ldm(ldm))
    if unknown:
        raise WeightsError(f"{where}: unexpected VAE keys: {', '.join(sorted(unknown)[:4])}")
    cfg = {**vae_config_from_ldm(ldm, sample_size=size), **factors}
    return _vae_part(sd, cfg, where)


def _vae_given(path: Path, factors: dict[str, float], size: int) -> Part:
    """A VAE given apart (``--vae``): a diffusers folder keeps its config, a file gets the family's factors."""
    from sdengine.weights.loading import load_vae

    sd, cfg = load_vae(path)
    if not path.is_dir():
        cfg = {**cfg, **factors, "sample_size": size}
    return _vae_part(sd, cfg, str(path))


def _checked_clip(sd: Mapping[str, torch.Tensor], cfg: dict[str, Any], where: str, *, projection: bool) -> Part:
    """CLIP text tensors (transformers' names) checked against CLIPTextModel(WithProjection)."""
    from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    from sdengine.models.config_checks import ConfigError

    if projection and "text_projection.weight" not in sd:
        raise WeightsError(
            f"{where}: no text_projection.weight: SD3's CLIP encoders are CLIPTextModelWithProjection (give the "
            "encoder with its projection, e.g. ComfyUI's clip_l.safetensors / clip_g.safetensors)"
        )
    try:
        tcfg = CLIPTextConfig.from_transformers(cfg)
    except (ConfigError, TypeError, ValueError) as e:
        raise WeightsError(f"{where}: not a usable CLIP text config ({e})") from None
    sd = _readable(sd, where)
    if projection:
        _check(lambda: CLIPTextModelWithProjection(tcfg), sd, where)
    else:
        _check(lambda: CLIPTextModel(tcfg), sd, where)
    return Part(sd, cfg)


def _sd3_clip(path: Path, which: str, whole: Mapping[str, torch.Tensor] | None = None) -> Part:
    """SD3's CLIP-L / bigG from a ``text_encoder*/`` folder, a separate file or a Stability file that holds it."""
    from sdengine.weights import sd3_files as sf
    from sdengine.weights.loading import load_component_folder

    where = f"{path.name} ({which})"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightsError(f"{path}: not a text encoder folder (no config.json)")
        sd, cfg = load_component_folder(path, "clip_text")
        return _checked_clip(sf.clip_part(sd, which), cfg, where, projection=True)
    sd = dict(whole) if whole is not None else load_file(path)[0]
    other = "clip_g" if which == "clip_l" else "clip_l"
    if sf.has_clip(sd, other) and not sf.has_clip(sd, which):
        raise WeightsError(f"{path}: holds SD3's {other}, not its {which}")
    part = sf.clip_part(sd, which)
    if "text_model.embeddings.token_embedding.weight" not in part or "text_projection.weight" not in part:
        raise WeightsError(
            f"{path}: not a CLIP text encoder with a projection (text_model.* and text_projection.weight), as SD3's "
            f"{which} is"
        )
    return _checked_clip(part, sf.clip_config(part, which, str(path)), where, projection=True)


def _flux_clip(path: Path) -> Part:
    """Flux's CLIP-L (a CLIPTextModel: ``text_model.*`` only) from a folder, a file or an all-in-one checkpoint."""
    from sdengine.models.clip_text import add_text_model_prefix
    from sdengine.pipeline.flux_loading import COMFY_CLIP_L, read_prefixed
    from sdengine.weights.detect import clip_config_from_weights
    from sdengine.weights.loading import load_component_folder

    if path.is_dir():
        folder = path / "text_encoder" if (path / "text_encoder" / "config.json").is_file() else path
        if not (folder / "config.json").is_file():
            raise WeightsError(f"{path}: not a CLIP text encoder folder (no config.json)")
        sd, cfg = load_component_folder(folder, "clip_text")
        sd = {k: v for k, v in add_text_model_prefix(sd).items() if k.startswith("text_model.")}
        return _checked_clip(sd, cfg, str(folder), projection=False)
    sd = read_prefixed(path, (COMFY_CLIP_L,)) or load_file(path)[0]
    sd = {k: v for k, v in add_text_model_prefix(sd).items() if k.startswith("text_model.")}
    if not sd:
        raise WeightsError(f"{path}: no CLIP text encoder weights (text_model.*): not CLIP-L")
    cfg = {**clip_config_from_weights(sd, family="sd1"), "architectures": ["CLIPTextModel"]}
    return _checked_clip(sd, cfg, str(path), projection=False)


def _t5(path: Path) -> Part:
    """A T5 encoder's tensors (transformers' ``T5EncoderModel`` names) and config from a folder, a ComfyUI
    ``t5xxl_*`` file or a checkpoint that holds it (``text_encoders.t5xxl.transformer.*``)."""
    from sdengine.models.t5_text import EMBED_ALIAS, T5Config, T5Encoder
    from sdengine.weights import t5_file as tf
    from sdengine.weights.encoder_files import folder_weight_files, read_json

    if path.is_dir():
        folder = tf.t5_folder(path)
        raw = read_json(folder / "config.json", "config", tf.T5FileError)
        try:
            config = T5Config.from_transformers(raw)
        except (ValueError, TypeError) as e:
            raise tf.T5FileError(f"{folder / 'config.json'}: {e}") from None
        files = folder_weight_files(folder, tf.T5FileError)
        sd: StateDict = {}
        for f in files:
            sd.update(load_file(f)[0])
        where = str(folder)
        sd = {k: v for k, v in sd.items() if not k.startswith(tf.IGNORED_PREFIXES)}
        cfg = dict(raw)
    else:
        whole = load_file(path)[0]
        where = str(path)
        names, scaled = tf.select_t5_names(list(whole), where)
        sd = {ours: whole[theirs] for ours, theirs in names.items()}
        if scaled:
            sd = _unscale(sd)
        sd = {k: v for k, v in sd.items() if not k.startswith(tf.IGNORED_PREFIXES)}
        config = tf.config_from_shapes({k: tuple(v.shape) for k, v in sd.items()}, where)
        cfg = config.to_transformers()
    if "shared.weight" not in sd and EMBED_ALIAS in sd:
        sd["shared.weight"] = sd[EMBED_ALIAS]
    sd.pop(EMBED_ALIAS, None)  # transformers ties it to shared.weight (its files hold shared.weight)
    sd = _readable(sd, where)
    _check(lambda: T5Encoder(config), sd, f"{where} (T5 encoder)")
    return Part(sd, cfg)


def _unscale(sd: StateDict) -> StateDict:
    """ComfyUI's scaled float8 T5: each weight times its ``scale_weight`` (in float32, then bfloat16), as loading
    does; the scales and the marker are dropped."""
    out: StateDict = {}
    for k, v in sd.items():
        if k.endswith((".scale_weight", ".scale_input")):
            continue
        scale_name = k[: -len("weight")] + "scale_weight" if k.endswith(".weight") else None
        scale = sd.get(scale_name) if scale_name else None
        if scale is not None:
            s = scale.float().reshape(-1, *([1] * (v.ndim - 1))) if scale.numel() > 1 else scale.float()
            v = (v.float() * s).to(torch.bfloat16)
        out[k] = v
    return out


def _need(part: Part | None, key: str, src: Path, what: str, example: str) -> Part:
    if part is None:
        raise DiTConvertError(f"{src.name} holds no {what}: give it with {FLAGS[key]} FILE (e.g. {example})")
    return part


def _read_sd3(src: Path, *, vae: Path | None, given: dict[str, Path | None]) -> DiTModel:
    from sdengine.weights import sd3_files as sf
    from sdengine.weights.loading import load_component_folder
    from sdengine.weights.mmdit_file import read_mmdit

    factors = {"scaling_factor": sf.SD3_VAE_SCALING_FACTOR, "shift_factor": sf.SD3_VAE_SHIFT_FACTOR}
    cfg, sd = read_mmdit(src)
    transformer = Part(_readable(sd, str(src)), {"_class_name": "SD3Transformer2DModel", **cfg.to_diffusers()})
    text: dict[str, Part | None] = {}
    tokenizers: dict[str, Path] = {}
    if src.is_dir():
        raw = json.loads((src / "transformer" / "config.json").read_text(encoding="utf-8"))
        transformer.config = {**transformer.config, **raw}
        if vae is None:
            if not (src / "vae" / "config.json").is_file():
                raise WeightsError(f"{src}: missing vae/config.json")
            vsd, vcfg = load_component_folder(src / "vae", "vae")
            vae_part: Part | None = _vae_part(vsd, vcfg, str(src / "vae"))
        else:
            vae_part = _vae_given(vae, factors, 1024)
        for key, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2"), ("t5", "text_encoder_3")):
            p = given[key] or sf.folder_component(src, sub)
            text[key] = None if p is None else _t5(p) if key == "t5" else _sd3_clip(p, key)
        tokenizers = {n: src / n for n in ("tokenizer", "tokenizer_2", "tokenizer_3") if (src / n).is_dir()}
    else:
        whole = load_file(src)[0]  # a memory map
        if vae is not None:
            vae_part = _vae_given(vae, factors, 1024)
        else:
            ldm = {k[len(sf.VAE_PREFIX) :]: v for k, v in whole.items() if k.startswith(sf.VAE_PREFIX)}
            vae_part = _vae_from_ldm(ldm, str(src), factors, 1024) if ldm else None
        for key in ("clip_l", "clip_g"):
            p = given[key]
            if p is not None:
                text[key] = _sd3_clip(p, key)
            else:
                text[key] = _sd3_clip(src, key, whole) if sf.has_clip(whole, key) else None
        t5 = given["t5"]
        has_t5 = any(k.startswith(sf.T5_PREFIX) for k in whole)
        text["t5"] = _t5(t5) if t5 is not None else _t5(src) if has_t5 else None
    return DiTModel(
        "sd3",
        src,
        transformer,
        vae_part,
        text,
        sf.scheduler_config(src),
        tokenizers,
        dict(sf.SD3_SCHEDULER),
    )


def _read_flux(src: Path, *, vae: Path | None, given: dict[str, Path | None]) -> DiTModel:
    from sdengine.pipeline import flux_loading as fl
    from sdengine.weights.flux_file import load_flux_transformer

    factors = {"scaling_factor": fl.FLUX_VAE_SCALING, "shift_factor": fl.FLUX_VAE_SHIFT}
    model = load_flux_transformer(src)  # the file's dtype (float8: bfloat16), tensors not copied
    cfg = {"_class_name": "FluxTransformer2DModel", **model.config.to_diffusers()}
    transformer = Part(dict(model.state_dict()), cfg)
    default = dict(fl.DEV_SCHEDULER if model.config.guidance_embeds else fl.SCHNELL_SCHEDULER)
    text: dict[str, Part | None] = {"clip_l": None, "t5": None}
    tokenizers: dict[str, Path] = {}
    scheduler = dict(default)
    if src.is_dir():
        raw = json.loads((src / "transformer" / "config.json").read_text(encoding="utf-8"))
        transformer.config = {**transformer.config, **raw}
        if vae is None:
            from sdengine.weights.loading import load_component_folder

            vsd, vcfg = load_component_folder(src / "vae", "vae")
            vae_part: Part | None = _vae_part(vsd, vcfg, str(src / "vae"))
        else:
            vae_part = _vae_given(vae, factors, fl.FLUX_VAE_SIZE)
        text["clip_l"] = _flux_clip(given["clip_l"] or src / "text_encoder")
        text["t5"] = _t5(given["t5"] or src / "text_encoder_2")
        sched = src / "scheduler" / "scheduler_config.json"
        if sched.is_file():
            scheduler = json.loads(sched.read_text(encoding="utf-8"))
        tokenizers = {n: src / n for n in ("tokenizer", "tokenizer_2") if (src / n).is_dir()}
    else:
        names = fl.tensor_names(src)
        if vae is not None:
            vae_part = _vae_given(vae, factors, fl.FLUX_VAE_SIZE)
        elif any(n.startswith(fl.VAE_PREFIXES) for n in names):
            ldm = fl.read_prefixed(src, fl.VAE_PREFIXES)
            vae_part = _vae_from_ldm(ldm, str(src), factors, fl.FLUX_VAE_SIZE)
        else:
            vae_part = None
        clip, t5 = given["clip_l"], given["t5"]
        has_clip = any(n.startswith(fl.COMFY_CLIP_L) for n in names)
        has_t5 = any(n.startswith(fl.COMFY_T5) for n in names)
        text["clip_l"] = _flux_clip(clip) if clip is not None else _flux_clip(src) if has_clip else None
        text["t5"] = _t5(t5) if t5 is not None else _t5(src) if has_t5 else None
    return DiTModel("flux", src, transformer, vae_part, text, scheduler, tokenizers, default)


def read_model(
    src: str | Path,
    *,
    vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
) -> DiTModel:
    """An SD3 or Flux model's parts from any layout (see the module docstring); parts given apart replace the
    model's own."""
    src = Path(src)
    family = family_of(src)
    if family is None:
        raise DiTConvertError(f"{src}: not an SD3 / SD3.5 or FLUX.1 folder or single file")
    given = {"clip_l": clip_l, "clip_g": clip_g, "t5": t5, "vae": vae}
    for key, value in given.items():
        if value is not None and not Path(value).exists():
            raise DiTConvertError(f"{FLAGS[key]} {value}: no such file or folder")
    if family == "flux" and clip_g is not None:
        raise DiTConvertError("--clip-g is SD3's second text encoder (OpenCLIP bigG); a Flux model has none")
    paths = {k: Path(v) if v is not None else None for k, v in given.items()}
    if family == "sd3":
        return _read_sd3(src, vae=paths["vae"], given=paths)
    return _read_flux(src, vae=paths["vae"], given=paths)


# -- writing ----------------------------------------------------------------------------------------------------


def _sd3_to_stability(m: DiTModel) -> StateDict:
    from sdengine.models.mmdit import MMDiTConfig
    from sdengine.weights.mmdit_file import PREFIX, sdengine_to_stability

    cfg = MMDiTConfig.from_diffusers(m.transformer.config)
    return {PREFIX + k: v for k, v in sdengine_to_stability(m.transformer.sd, cfg).items()}


def _ldm_vae(part: Part, where: Path) -> StateDict:
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers

    ldm, bad = km.vae_diffusers_to_ldm(part.sd, vae_layout_from_diffusers(part.sd))
    if bad:
        raise WeightsError(f"{where}: VAE keys with no LDM name: {', '.join(sorted(bad)[:4])}")
    return ldm


def _differing(a: Mapping[str, Any], b: Mapping[str, Any], keys: Any) -> list[str]:
    return [k for k in keys if k != "_class_name" and a.get(k, b.get(k)) != b.get(k)]


def _check_single_file_reads_back(m: DiTModel) -> None:
    """A single file carries no scheduler or VAE config: what it would read back must be the model's own."""
    from sdengine.pipeline.flux_loading import FLUX_VAE_SCALING, FLUX_VAE_SHIFT
    from sdengine.weights.sd3_files import SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR

    differ = _differing(m.scheduler, m.single_file_scheduler, m.single_file_scheduler)
    if differ:
        k = differ[0]
        raise DiTConvertError(
            f"{m.source}: its scheduler has {k}={m.scheduler.get(k)!r}; a single file carries no scheduler config "
            f"and reads back with {m.single_file_scheduler[k]!r}: keep it a diffusers folder"
        )
    if m.vae is not None:
        want = (
            (SD3_VAE_SCALING_FACTOR, SD3_VAE_SHIFT_FACTOR) if m.family == "sd3" else (FLUX_VAE_SCALING, FLUX_VAE_SHIFT)
        )
        have = (m.vae.config.get("scaling_factor"), m.vae.config.get("shift_factor"))
        if tuple(float(x) if x is not None else None for x in have) != want:
            raise DiTConvertError(
                f"{m.source}: its VAE scales latents by {have[0]} and shifts them by {have[1]}; a single file carries "
                f"no VAE config and reads back with {want[0]}, {want[1]}: keep it a diffusers folder"
            )


def single_file_tensors(m: DiTModel, *, with_t5: bool = True, transformer_only: bool = False) -> StateDict:
    """The tensors of the single file :func:`convert_dit` writes (see the module docstring)."""
    from sdengine.pipeline.flux_loading import COMFY_CLIP_L, COMFY_T5, TRANSFORMER_PREFIX
    from sdengine.weights import sd3_files as sf
    from sdengine.weights.flux_file import diffusers_to_bfl

    if m.family == "sd3":
        out = _sd3_to_stability(m)
    else:
        out = {TRANSFORMER_PREFIX + k: v for k, v in diffusers_to_bfl(m.transformer.sd).items()}
    if transformer_only:
        return {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in out.items()}
    _check_single_file_reads_back(m)
    if m.family == "sd3":
        vae = _need(m.vae, "vae", m.source, "VAE", "the VAE of an SD3 diffusers folder")
        out.update({sf.VAE_PREFIX + k: v for k, v in _ldm_vae(vae, m.source).items()})
        clips = [k for k in ("clip_l", "clip_g") if m.text.get(k) is not None]
        if len(clips) == 1:
            other = "clip_g" if clips[0] == "clip_l" else "clip_l"
            _need(None, other, m.source, f"{other} text encoder", f"ComfyUI's {other}.safetensors")
        for key in clips:
            part = m.text[key]
            assert part is not None
            out.update({sf.CLIP_PREFIXES[key] + k: v for k, v in part.sd.items()})
        t5 = m.text.get("t5")
        if t5 is not None and with_t5:
            out.update({sf.T5_PREFIX + k: v for k, v in t5.sd.items()})
        return out
    vae = _need(m.vae, "vae", m.source, "VAE", "Flux's ae.safetensors")
    clip = _need(m.text.get("clip_l"), "clip_l", m.source, "CLIP-L text encoder", "ComfyUI's clip_l.safetensors")
    t5 = _need(m.text.get("t5"), "t5", m.source, "T5 text encoder", "ComfyUI's t5xxl_fp16.safetensors")
    out.update({FLUX_VAE_PREFIX + k: v for k, v in _ldm_vae(vae, m.source).items()})
    out.update({COMFY_CLIP_L + k: v for k, v in clip.sd.items()})
    out.update({COMFY_T5 + k: v for k, v in t5.sd.items()})
    return out


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_t5_tokenizer(dst: Path) -> None:
    """sdengine's shipped T5 v1.1 vocabulary (SD3's tokenizer_3, Flux's tokenizer_2) as a transformers folder."""
    from sdengine.text.t5_tokenizer import shipped_tokenizer_path

    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_bytes(gzip.decompress(shipped_tokenizer_path().read_bytes()))
    _write_json(dst / "tokenizer_config.json", T5_TOKENIZER_CONFIG)
    special = {k: T5_TOKENIZER_CONFIG[k] for k in ("eos_token", "pad_token", "unk_token")}
    _write_json(dst / "special_tokens_map.json", special)


def _write_component(dst: Path, part: Part, lib: str, cls: str, dtype: str | torch.dtype | None) -> None:
    from sdengine.weights.io import save_safetensors
    from sdengine.weights.loading import DIFFUSERS_VERSION

    cfg = dict(part.config)
    if lib == "diffusers":
        cfg.update(_class_name=cls)
        cfg.setdefault("_diffusers_version", DIFFUSERS_VERSION)
        fname = "diffusion_pytorch_model.safetensors"
    else:
        cfg.setdefault("architectures", [cls])
        fname = "model.safetensors"
    _write_json(dst / "config.json", cfg)
    sd = {k: v.contiguous() for k, v in part.sd.items()}
    save_safetensors(sd, dst / fname, metadata={"format": "pt"}, dtype=dtype)


def _tokenizer(m: DiTModel, dst: Path, name: str, kind: str) -> None:
    from sdengine.weights.loading import write_clip_tokenizer

    src = m.tokenizers.get(name)
    if src is not None:
        shutil.copytree(src, dst / name)
    elif kind == "t5":
        _write_t5_tokenizer(dst / name)
    elif not write_clip_tokenizer(dst / name, pad="!" if kind == "clip_bang" else None):
        raise DiTConvertError("sdengine's CLIP vocabulary is missing from its install: cannot write the tokenizer")


def _fill_folder(m: DiTModel, dst: Path, dtype: str | torch.dtype | None, with_t5: bool) -> None:
    from sdengine.weights.loading import DIFFUSERS_VERSION

    vae = _need(m.vae, "vae", m.source, "VAE", "Flux's ae.safetensors" if m.family == "flux" else "an SD3 VAE folder")
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": DIFFUSERS_VERSION, **m.scheduler}
    sched["_class_name"] = "FlowMatchEulerDiscreteScheduler"
    _write_json(dst / "scheduler" / "scheduler_config.json", sched)
    if m.family == "sd3":
        clips = {}
        for key in ("clip_l", "clip_g"):
            clips[key] = _need(m.text.get(key), key, m.source, f"{key} text encoder", f"ComfyUI's {key}.safetensors")
        t5 = m.text.get("t5") if with_t5 else None
        _write_component(dst / "transformer", m.transformer, "diffusers", "SD3Transformer2DModel", dtype)
        _write_component(dst / "vae", vae, "diffusers", "AutoencoderKL", dtype)
        clip_cls = "CLIPTextModelWithProjection"
        _write_component(dst / "text_encoder", clips["clip_l"], "transformers", clip_cls, dtype)
        _write_component(dst / "text_encoder_2", clips["clip_g"], "transformers", clip_cls, dtype)
        _tokenizer(m, dst, "tokenizer", "clip")
        _tokenizer(m, dst, "tokenizer_2", "clip_bang")  # bigG pads with "!"
        if t5 is not None:
            _write_component(dst / "text_encoder_3", t5, "transformers", "T5EncoderModel", dtype)
            _tokenizer(m, dst, "tokenizer_3", "t5")
        index: dict[str, Any] = {
            "_class_name": "StableDiffusion3Pipeline",
            "transformer": ["diffusers", "SD3Transformer2DModel"],
            "text_encoder": ["transformers", clip_cls],
            "text_encoder_2": ["transformers", clip_cls],
            "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 is not None else [None, None],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 is not None else [None, None],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
    else:
        clip = _need(m.text.get("clip_l"), "clip_l", m.source, "CLIP-L text encoder", "ComfyUI's clip_l.safetensors")
        t5 = _need(m.text.get("t5"), "t5", m.source, "T5 text encoder", "ComfyUI's t5xxl_fp16.safetensors")
        _write_component(dst / "transformer", m.transformer, "diffusers", "FluxTransformer2DModel", dtype)
        _write_component(dst / "vae", vae, "diffusers", "AutoencoderKL", dtype)
        _write_component(dst / "text_encoder", clip, "transformers", "CLIPTextModel", dtype)
        _write_component(dst / "text_encoder_2", t5, "transformers", "T5EncoderModel", dtype)
        _tokenizer(m, dst, "tokenizer", "clip")
        _tokenizer(m, dst, "tokenizer_2", "t5")
        index = {
            "_class_name": "FluxPipeline",
            "transformer": ["diffusers", "FluxTransformer2DModel"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "T5EncoderModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "T5TokenizerFast"],
            "image_encoder": [None, None],
            "feature_extractor": [None, None],
        }
    index.update(
        _diffusers_version=DIFFUSERS_VERSION,
        vae=["diffusers", "AutoencoderKL"],
        scheduler=["diffusers", "FlowMatchEulerDiscreteScheduler"],
    )
    _write_json(dst / "model_index.json", index)


def convert_dit(
    src: str | Path,
    dst: str | Path,
    *,
    dtype: str | torch.dtype | None = None,
    vae: str | Path | None = None,
    clip_l: str | Path | None = None,
    clip_g: str | Path | None = None,
    t5: str | Path | None = None,
    with_t5: bool = True,
    transformer_only: bool = False,
) -> Path:
    """``sdengine convert`` of an SD3 / Flux model: a ``.safetensors`` DST gets one file, any other DST a
    diffusers folder (see the module docstring)."""
    from sdengine.io.atomic import atomic_dir
    from sdengine.weights.io import PICKLE_SUFFIXES, parse_dtype, save_safetensors

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise DiTConvertError(f"{dst}: refusing to convert a model onto itself")
    if dst.suffix.lower() in PICKLE_SUFFIXES:
        raise DiTConvertError(f"{dst}: sdengine does not write pickle checkpoints; use .safetensors")
    to_file = dst.suffix.lower() in SAFETENSORS_SUFFIXES
    if transformer_only and not to_file:
        raise DiTConvertError(f"{dst}: --transformer-only writes one .safetensors file; a folder holds every part")
    target = parse_dtype(dtype)
    if target is not None and target not in (torch.float32, torch.float16, torch.bfloat16):
        raise DiTConvertError(f"dtype {target}: sdengine convert writes fp32, fp16 or bf16 (no float8)")
    if not to_file:
        if dst.exists() and not dst.is_dir():
            raise DiTConvertError(f"{dst}: exists and is not a folder")
        if dst.is_dir() and any(dst.iterdir()) and not (dst / "model_index.json").is_file():
            raise DiTConvertError(f"{dst}: exists and is not a diffusers model folder; refusing to replace it")
    if not with_t5 and t5 is not None:
        raise DiTConvertError("--t5 and --no-t5: a T5 encoder given and left out; give one of them")
    m = read_model(src, vae=vae, clip_l=clip_l, clip_g=clip_g, t5=t5)
    if not with_t5 and m.family == "flux":
        raise DiTConvertError("--no-t5: a Flux model needs its T5 encoder (only SD3 runs without one)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if to_file:
        tensors = single_file_tensors(m, with_t5=with_t5, transformer_only=transformer_only)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_safetensors(tensors, dst, metadata={"format": "pt"}, dtype=dtype)
        return dst
    with atomic_dir(dst) as tmp:
        _fill_folder(m, tmp, dtype, with_t5)
    return dst


__all__ = ["DiTConvertError", "DiTModel", "convert_dit", "family_of", "read_model", "single_file_tensors"]
