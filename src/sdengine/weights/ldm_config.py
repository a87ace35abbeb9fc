"""A single file's own config: the LDM `.yaml` beside it (as A1111 reads it) or a diffusers folder's configs.

Weight shapes cannot say how many attention heads a layer splits into, nor whether the model predicts epsilon
or v. Original Stable Diffusion releases ship an LDM config (`v2-inference-v.yaml`); A1111 uses the `.yaml` of
the same stem beside a checkpoint (`model.safetensors` + `model.yaml`). diffusers' `from_single_file(config=DIR)`
takes the component configs of a diffusers folder instead. Both are read here:

- the YAML is parsed with `yaml.safe_load` (no object construction) and only these numbers are used:
  `model.params.parameterization` ("v" = v_prediction, anything else epsilon, as LDM defaults),
  `scale_factor`, `linear_start` / `linear_end` / `timesteps` (the noise schedule), and from `unet_config`
  `num_heads` / `num_head_channels` (the heads); `model_channels` x `channel_mult`,
  `num_res_blocks`, `context_dim`, `use_linear_in_transformer`, `transformer_depth`, `in_channels` and
  `out_channels` are checked against the weights, as are `first_stage_config`'s `embed_dim` / `ddconfig`
  numbers and which text encoder `cond_stage_config` names (`unet_config.image_size` is unused in LDM
  configs, 32 in SD's own, so the default size stays the family's). LDM names the text encoder by its release
  (CLIP ViT-L/14, OpenCLIP ViT-H/14), whose heads are 64 wide, so the YAML adds no text-encoder heads: a text
  encoder of another head width needs the diffusers configs (`config=DIR`).
- sgm's configs (SDXL's `sd_xl_base.yaml` / `sd_xl_refiner.yaml` / `sd_xl_v.yaml`, sgm's SD 2.x ones) name
  the U-Net `network_config` and the text encoders `conditioner_config.params.emb_models`: the same U-Net
  numbers are read from there (plus `adm_in_channels`, SDXL's added conditioning; `context_dim` may be one
  per level, `transformer_depth` one per level, checked at the levels with attention), the embedders say which
  text encoders (CLIP ViT-L and/or OpenCLIP bigG, or OpenCLIP ViT-H), and the denoiser's scaling the
  prediction type.
- a folder's configs are taken as they are, after their key numbers are checked against the weights.

Anything that contradicts the weights is a one-line `ModelConfigError` naming the field, both values and the
config file; nothing is guessed past it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .io import WeightsError

YAML_SUFFIXES = (".yaml", ".yml")
# sgm's text embedders: CLIP ViT-L, OpenCLIP ViT-bigG (SDXL, with pooled output), OpenCLIP ViT-H (SD 2.x)
SGM_TEXT_ENCODERS = ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2", "FrozenOpenCLIPEmbedder")
# what each text-encoder kind is, for messages (the weights' kind: clip / openclip, or the SDXL family)
TEXT_ENCODER_NAMES = {
    "clip": "CLIP ViT-L (SD 1.x)",
    "openclip": "OpenCLIP ViT-H (SD 2.x)",
    "sdxl": "CLIP ViT-L + OpenCLIP ViT-bigG (SDXL base)",
    "sdxl_refiner": "OpenCLIP ViT-bigG only (SDXL refiner)",
}
MAX_YAML_BYTES = 1 << 20  # LDM configs are ~2 KB; a bigger file is not one


class ModelConfigError(WeightsError):
    """A single file's config (LDM YAML or diffusers folder) that cannot be read or contradicts the weights."""


def config_beside(checkpoint: str | Path) -> Path | None:
    """The LDM config A1111 pairs with a checkpoint: same folder, same stem, `.yaml` (or `.yml`)."""
    p = Path(checkpoint)
    for suffix in YAML_SUFFIXES:
        cand = p.with_suffix(suffix)
        if cand.is_file():
            return cand
    return None


def is_yaml_config(path: str | Path) -> bool:
    return Path(path).suffix.lower() in YAML_SUFFIXES


@dataclass
class LDMConfig:
    """The numbers of an LDM inference config that sdengine uses (None: the file does not say)."""

    source: Path
    prediction_type: str = "epsilon"
    scale_factor: float | None = None
    linear_start: float | None = None
    linear_end: float | None = None
    timesteps: int | None = None
    num_heads: int | None = None  # LDM: -1 or absent when num_head_channels is given
    num_head_channels: int | None = None
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)  # component -> {diffusers key: value}
    text_encoder: str | None = None  # a TEXT_ENCODER_NAMES key (cond_stage_config, or sgm's conditioner_config)
    text_layer: str | None = None
    states_prediction: bool = False  # the file says the prediction type (parameterization, or sgm's scaling)


def _section(obj: Any, where: str, *keys: str) -> dict[str, Any]:
    for k in keys:
        if not isinstance(obj, Mapping):
            raise ModelConfigError(f"{where}: {'.'.join(keys)} is not a mapping")
        obj = obj.get(k, {})
    if obj is None:
        return {}
    if not isinstance(obj, Mapping):
        raise ModelConfigError(f"{where}: {'.'.join(keys)} is not a mapping")
    return dict(obj)


def _int(section: Mapping[str, Any], key: str, where: str) -> int | None:
    v = section.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v <= 1 << 20:
        raise ModelConfigError(f"{where}: {key} must be an integer, got {v!r}")
    return v


def _float(section: Mapping[str, Any], key: str, where: str) -> float | None:
    v = section.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < float(v) < 1e3:
        raise ModelConfigError(f"{where}: {key} must be a positive number, got {v!r}")
    return float(v)


def _int_list(section: Mapping[str, Any], key: str, where: str) -> list[int] | None:
    v = section.get(key)
    if v is None:
        return None
    if not isinstance(v, list | tuple) or not 1 <= len(v) <= 16:
        raise ModelConfigError(f"{where}: {key} must be a list of 1 to 16 integers, got {v!r}")
    out = []
    for x in v:
        if isinstance(x, bool) or not isinstance(x, int) or not 0 < x <= 1 << 16:
            raise ModelConfigError(f"{where}: {key} must be a list of positive integers, got {v!r}")
        out.append(x)
    return out


def read_ldm_config(path: str | Path) -> LDMConfig:
    """Parse an LDM inference YAML (safe_load only) into the numbers sdengine uses."""
    import yaml

    path = Path(path)
    where = str(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise ModelConfigError(f"{where}: {path.stat().st_size} bytes is too large for an LDM config")
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except ModelConfigError:
        raise
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ModelConfigError(f"{where}: cannot read the LDM config ({type(e).__name__}: {line})") from None
    if not isinstance(doc, Mapping):
        raise ModelConfigError(f"{where}: not an LDM config (no model.params)")
    model = _section(doc, where, "model")
    params = _section(model, where, "params")
    if not params:
        raise ModelConfigError(f"{where}: not an LDM config (no model.params)")
    cfg = LDMConfig(source=path)
    param = params.get("parameterization", "eps")
    if param not in ("eps", "v", "x0"):
        raise ModelConfigError(f"{where}: parameterization {param!r} is not eps, v or x0")
    cfg.prediction_type = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}[param]
    # sgm (SDXL) configs say it with the denoiser's scaling instead: VScaling (sd_xl_v.yaml) or EpsScaling
    scaling = str(
        _section(_section(params, where, "denoiser_config", "params"), where, "scaling_config").get("target", "")
    )
    if scaling.endswith(".VScaling"):
        cfg.prediction_type, cfg.states_prediction = "v_prediction", True
    elif scaling.endswith(".EpsScaling"):
        cfg.states_prediction = True
    else:
        cfg.states_prediction = "parameterization" in params
    cfg.scale_factor = _float(params, "scale_factor", where)
    cfg.linear_start = _float(params, "linear_start", where)
    cfg.linear_end = _float(params, "linear_end", where)
    cfg.timesteps = _int(params, "timesteps", where)

    unet = _section(params, where, "unet_config", "params")
    if not unet:  # sgm (SDXL, and sgm's SD 2.x configs) names the U-Net network_config
        unet = _section(params, where, "network_config", "params")
    heads, head_ch = _int(unet, "num_heads", where), _int(unet, "num_head_channels", where)
    cfg.num_heads = heads if heads not in (None, -1) else None
    cfg.num_head_channels = head_ch if head_ch not in (None, -1) else None
    if cfg.num_heads is None and cfg.num_head_channels is None and unet:
        raise ModelConfigError(f"{where}: unet_config names neither num_heads nor num_head_channels")
    if (cfg.num_heads is not None and cfg.num_heads < 1) or (
        cfg.num_head_channels is not None and cfg.num_head_channels < 1
    ):
        raise ModelConfigError(f"{where}: num_heads / num_head_channels must be positive")
    u: dict[str, Any] = {}
    mc, mult = _int(unet, "model_channels", where), _int_list(unet, "channel_mult", where)
    if mc is not None and mult is not None:
        u["block_out_channels"] = [mc * m for m in mult]
    context = unet.get("context_dim")
    if isinstance(context, list | tuple):  # sgm's refiner config: one per level, all the same
        ctx = _int_list(unet, "context_dim", where) or []
        if len(set(ctx)) != 1:
            raise ModelConfigError(f"{where}: context_dim {context!r} differs between levels (not supported)")
        u["cross_attention_dim"] = ctx[0]
    for ldm_key, ours in (
        ("num_res_blocks", "layers_per_block"),
        ("context_dim", "cross_attention_dim"),
        ("in_channels", "in_channels"),
        ("out_channels", "out_channels"),
        ("adm_in_channels", "projection_class_embeddings_input_dim"),  # sgm: SDXL's added conditioning
    ):
        if ours not in u and (val := _int(unet, ldm_key, where)) is not None:
            u[ours] = val
    if "use_linear_in_transformer" in unet:
        u["use_linear_projection"] = bool(unet["use_linear_in_transformer"])
    depth = unet.get("transformer_depth")
    if isinstance(depth, list | tuple):  # sgm: one per level (levels without attention ignore theirs)
        if not depth or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in depth):
            raise ModelConfigError(f"{where}: transformer_depth {depth!r} is not a list of block counts")
        u["transformer_layers_per_block"] = depth[0] if all(d == depth[0] for d in depth) else list(depth)
    elif depth is not None:
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ModelConfigError(f"{where}: transformer_depth {depth!r} is not one positive integer")
        u["transformer_layers_per_block"] = depth
    cfg.checks["unet"] = u

    first = _section(params, where, "first_stage_config", "params")
    dd = _section(first, where, "ddconfig")
    v: dict[str, Any] = {}
    if (embed := _int(first, "embed_dim", where)) is not None:
        v["latent_channels"] = embed
    ch, ch_mult = _int(dd, "ch", where), _int_list(dd, "ch_mult", where)
    if ch is not None and ch_mult is not None:
        v["block_out_channels"] = [ch * m for m in ch_mult]
    if (nrb := _int(dd, "num_res_blocks", where)) is not None:
        v["layers_per_block"] = nrb
    cfg.checks["vae"] = v

    cond = _section(params, where, "cond_stage_config")
    target = str(cond.get("target", ""))
    if target.endswith("FrozenOpenCLIPEmbedder"):
        cfg.text_encoder = "openclip"
        cfg.text_layer = str(_section(cond, where, "params").get("layer", "last"))
    elif target.endswith("FrozenCLIPEmbedder"):
        cfg.text_encoder = "clip"
        cfg.text_layer = str(_section(cond, where, "params").get("layer", "last"))
    elif target:
        raise ModelConfigError(f"{where}: text encoder {target!r} is not CLIP or OpenCLIP (not an SD1/SD2 config)")
    emb = _section(params, where, "conditioner_config", "params").get("emb_models")
    if emb is not None:  # sgm: the text encoders are embedders of a GeneralConditioner
        if not isinstance(emb, list):
            raise ModelConfigError(f"{where}: conditioner_config.params.emb_models is not a list")
        names = [str(e.get("target", "")).rsplit(".", 1)[-1] for e in emb if isinstance(e, Mapping)]
        clip_l, big_g, open_h = (n in names for n in SGM_TEXT_ENCODERS)
        cfg.text_encoder = (
            ("sdxl" if clip_l else "sdxl_refiner") if big_g else "openclip" if open_h else "clip" if clip_l else None
        )
    return cfg


def _same(a: Any, b: Any) -> bool:
    norm = lambda x: [int(i) for i in x] if isinstance(x, list | tuple) else x  # noqa: E731
    return norm(a) == norm(b)


def _check(where: Path | str, comp: str, want: Mapping[str, Any], have: Mapping[str, Any] | None) -> None:
    if not have:
        return
    for key, value in want.items():
        if key in have and have[key] is not None and not _same(value, have[key]):
            raise ModelConfigError(
                f"{where}: {comp} {key} is {value!r} in the config but {have[key]!r} in the weights: "
                "not this checkpoint's config"
            )


def _per_level(depth: Any, levels: int) -> list[int] | None:
    if isinstance(depth, list | tuple):
        return [int(d) for d in depth] if len(depth) == levels else None
    return [int(depth)] * levels


def _check_depth(where: Path | str, want: Any, unet: Mapping[str, Any]) -> None:
    """transformer_depth against the weights' blocks, at the levels with attention (sgm lists one number per
    level; the levels without attention ignore theirs)."""
    have = unet.get("transformer_layers_per_block")
    attn = [str(t).startswith("CrossAttn") for t in unet.get("down_block_types") or []]
    if have is None or not attn:
        return
    w, h = _per_level(want, len(attn)), _per_level(have, len(attn))
    if w is None or h is None or any(a and x != y for a, x, y in zip(attn, w, h, strict=True)):
        raise ModelConfigError(
            f"{where}: unet transformer_layers_per_block is {want!r} in the config but {have!r} in the weights "
            f"(levels with attention: {[i for i, a in enumerate(attn) if a]}): not this checkpoint's config"
        )


def check_ldm_network(ldm: LDMConfig, configs: dict[str, dict[str, Any]], *, text_encoder_kind: str | None) -> None:
    """Check `ldm`'s network numbers (U-Net, VAE, which text encoders) against the configs read off the
    weights, then write what it adds (heads, the VAE's scale factor) into them. `text_encoder_kind`: the
    weights' (a TEXT_ENCODER_NAMES key)."""
    where = ldm.source
    if ldm.text_encoder is not None and text_encoder_kind is not None and ldm.text_encoder != text_encoder_kind:
        want_te = TEXT_ENCODER_NAMES.get(ldm.text_encoder, ldm.text_encoder)
        have_te = TEXT_ENCODER_NAMES.get(text_encoder_kind, text_encoder_kind)
        raise ModelConfigError(
            f"{where}: names a {want_te} text encoder but the weights hold {have_te}: not this checkpoint's config"
        )
    if ldm.text_encoder in ("clip", "openclip"):
        want_layer = "penultimate" if ldm.text_encoder == "openclip" else "last"
        if ldm.text_layer is not None and ldm.text_layer != want_layer:
            raise ModelConfigError(
                f"{where}: text encoder layer {ldm.text_layer!r} is not supported for {ldm.text_encoder} "
                f"(sdengine reads {want_layer!r}; use clip_skip for other layers)"
            )
    unet = configs["unet"]
    want_unet = dict(ldm.checks.get("unet", {}))
    adm = want_unet.get("projection_class_embeddings_input_dim")
    if adm is not None and unet.get("projection_class_embeddings_input_dim") is None:
        raise ModelConfigError(
            f"{where}: its U-Net takes SDXL's added conditioning (adm_in_channels {adm}) but the weights have "
            "none (no label_emb): not this checkpoint's config"
        )
    if "transformer_layers_per_block" in want_unet:
        _check_depth(where, want_unet.pop("transformer_layers_per_block"), unet)
    _check(where, "unet", want_unet, unet)
    _check(where, "vae", ldm.checks.get("vae", {}), configs.get("vae"))
    channels = [int(c) for c in unet["block_out_channels"]]
    types = unet.get("down_block_types") or []
    attn = [str(t).startswith("CrossAttn") for t in types] if len(types) == len(channels) else [True] * len(channels)
    if not any(attn):
        attn = [True] * len(channels)
    attn_channels = [c for c, a in zip(channels, attn, strict=True) if a]
    if ldm.num_head_channels is not None:
        bad = [c for c in attn_channels if c % ldm.num_head_channels]
        if bad:
            raise ModelConfigError(f"{where}: num_head_channels {ldm.num_head_channels} does not divide {bad[0]}")
        unet["attention_head_dim"] = [max(c // ldm.num_head_channels, 1) for c in channels]
    elif ldm.num_heads is not None:
        bad = [c for c in attn_channels if c % ldm.num_heads]
        if bad:
            raise ModelConfigError(f"{where}: num_heads {ldm.num_heads} does not divide the {bad[0]} channels")
        unet["attention_head_dim"] = ldm.num_heads
    if ldm.scale_factor is not None and "vae" in configs:
        configs["vae"]["scaling_factor"] = ldm.scale_factor


def apply_ldm_config(
    ldm: LDMConfig,
    configs: dict[str, dict[str, Any]],
    *,
    text_encoder_kind: str | None,
    prediction_type: str | None,
) -> str:
    """Check `ldm` against the configs read off the weights and write what it adds (heads, prediction type,
    schedule, scale factor) into them. Returns the prediction type (`prediction_type`, the
    caller's, wins)."""
    check_ldm_network(ldm, configs, text_encoder_kind=text_encoder_kind)
    sched = configs["scheduler"]
    if ldm.linear_start is not None:
        sched["beta_start"] = ldm.linear_start
    if ldm.linear_end is not None:
        sched["beta_end"] = ldm.linear_end
    if ldm.timesteps is not None:
        sched["num_train_timesteps"] = ldm.timesteps
    pred = prediction_type or ldm.prediction_type
    sched["prediction_type"] = pred
    return pred


def check_folder_configs(
    where: Path | str, folder_cfgs: Mapping[str, Mapping[str, Any]], from_weights: Mapping[str, Mapping[str, Any]]
) -> None:
    """A diffusers folder's configs against what the single file's shapes say (one-line error on the first
    contradiction): the widths, block counts and text-encoder size that shapes do fix."""
    keys = {
        "unet": ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim"),
        "vae": ("latent_channels", "block_out_channels", "layers_per_block"),
        "text_encoder": ("hidden_size", "intermediate_size", "vocab_size", "num_hidden_layers"),
    }
    for comp, names in keys.items():
        cfg = folder_cfgs.get(comp)
        if cfg:
            _check(f"{where}/{comp}/config.json", comp, {k: cfg[k] for k in names if k in cfg}, from_weights.get(comp))


__all__ = [
    "LDMConfig",
    "ModelConfigError",
    "SGM_TEXT_ENCODERS",
    "TEXT_ENCODER_NAMES",
    "apply_ldm_config",
    "check_folder_configs",
    "check_ldm_network",
    "config_beside",
    "is_yaml_config",
    "read_ldm_config",
]
