"""Bounds for every number in a model or scheduler config, checked before anything is built.

A config file is data from outside: ``layers_per_block: 1000000`` would build modules until memory runs
out, ``block_out_channels: [1e9, 2e9]`` asks for one tensor of hundreds of GB, ``num_train_timesteps:
1e8`` a schedule table of GBs, ``norm_num_groups: 0`` divides by zero. Every config class calls
:func:`check_config` on the raw dict (before mapping it) and on itself (``__post_init__``), and the loaders
call it on each component config, so a bad number is one ``ConfigError`` line naming the field, its value
and the allowed range, whatever the entry point.

The bounds are generous (several times the largest Stable Diffusion model sdengine runs) and there is a
total-size bound as well: a rough lower estimate of the parameter count, so that combinations of
individually allowed numbers cannot describe a network of tens of billions of parameters either.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

from sdengine.errors import SdengineError


class ConfigError(SdengineError, ValueError):
    """A model or scheduler config with a number (or a type) sdengine will not build."""


KINDS = {
    "unet": "U-Net",
    "vae": "VAE",
    "controlnet": "ControlNet",
    "clip_text": "CLIP text",
    "bert": "BERT text",
    "minilm": "MiniLM text",
    "clip_vision": "CLIP vision",
    "mmdit": "MMDiT",
    "t5": "T5 text",
    "scheduler": "scheduler",
    "flux": "Flux transformer",
    "qwen_image": "Qwen-Image transformer",
    "flux2": "FLUX.2 transformer",
    "z_image": "Z-Image transformer",
}

# Integer fields (diffusers / transformers names, which the dataclasses share): inclusive bounds. A field
# may also hold a list of such integers (one per level) where diffusers allows it.
INT_BOUNDS: dict[str, tuple[int, int]] = {
    "in_channels": (1, 64),
    "out_channels": (1, 64),
    "latent_channels": (1, 64),
    "conditioning_channels": (1, 64),
    "sample_size": (1, 16384),
    "block_out_channels": (1, 4096),
    "conditioning_embedding_out_channels": (1, 4096),
    "layers_per_block": (1, 32),
    "transformer_layers_per_block": (1, 64),
    "attention_head_dim": (1, 4096),
    "num_attention_heads": (1, 1024),
    "num_heads": (1, 1024),
    "cross_attention_dim": (1, 8192),
    "num_class_embeds": (1, 1_000_000),
    "projection_class_embeddings_input_dim": (1, 8192),
    "addition_time_embed_dim": (1, 4096),
    "norm_num_groups": (1, 1024),
    "attn_norm_num_groups": (1, 1024),
    "time_embedding_dim": (1, 16384),
    "downsample_padding": (0, 16),
    # text encoders
    "vocab_size": (1, 1_000_000),
    "hidden_size": (1, 16384),
    "intermediate_size": (1, 65536),
    "num_hidden_layers": (1, 128),
    "max_position_embeddings": (1, 8192),
    "type_vocab_size": (1, 1024),
    "eos_token_id": (0, 10_000_000),
    "context_length": (2, 512),  # MiniLM reads at most 512 positions
    # vision encoders (CLIP ViT: the largest, bigG, is 48 layers of 1664 with 257 positions)
    "num_layers": (1, 128),
    "patch_size": (1, 1024),
    "image_size": (1, 4096),
    "projection_dim": (1, 16384),
    # diffusion transformers (SD3's MMDiT: 24-38 blocks of 1536-2432, a 192 or 384 position grid)
    "joint_attention_dim": (1, 16384),
    "caption_projection_dim": (1, 16384),
    "pooled_projection_dim": (1, 16384),
    "pos_embed_max_size": (1, 1024),
    # T5 encoders (T5-XXL: d_model 4096, d_kv 64, d_ff 10240, 24 layers of 64 heads, 32 buckets up to 128)
    "d_model": (1, 16384),
    "d_kv": (1, 1024),
    "d_ff": (1, 65536),
    "relative_attention_num_buckets": (2, 1024),
    "relative_attention_max_distance": (2, 65536),
    # Flux's transformer (dev/schnell: 19 double-stream and 38 single-stream blocks, RoPE axes 16 + 56 + 56 = the
    # 128-wide head; its text and pooled widths are the diffusion transformers' above)
    "num_single_layers": (0, 256),
    "axes_dims_rope": (2, 4096),
    # scheduler
    "num_train_timesteps": (1, 100_000),
    "steps_offset": (0, 100_000),
}

# Float fields: (low, high, low included). Ints are accepted as floats; NaN and infinities never.
FLOAT_BOUNDS: dict[str, tuple[float, float, bool]] = {
    "norm_eps": (0.0, 1.0, False),
    "layer_norm_eps": (0.0, 1.0, False),
    "layer_norm_epsilon": (0.0, 1.0, False),
    "scaling_factor": (0.0, 1000.0, False),
    "shift_factor": (-1000.0, 1000.0, True),
    "freq_shift": (-1000.0, 1000.0, True),
    "mid_block_scale_factor": (0.0, 1000.0, False),
    "dropout": (0.0, 1.0, True),
    "beta_start": (0.0, 1.0, False),
    "beta_end": (0.0, 1.0, False),
}

# Fields where None means "not used" / "the default".
NULLABLE = frozenset(
    {
        "attention_head_dim",
        "num_attention_heads",
        "cross_attention_dim",
        "num_class_embeds",
        "projection_class_embeddings_input_dim",
        "addition_time_embed_dim",
        "attn_norm_num_groups",
        "time_embedding_dim",
        "shift_factor",
        "projection_dim",  # a CLIP vision tower without visual_projection
        "norm_num_groups",  # diffusers writes null for some pixel U-Nets; the U-Net mapping names it if unusable
    }
)

MAX_LEVELS = 8  # entries in a per-level list (SD has 4)
MAX_TRAINED_BETAS = INT_BOUNDS["num_train_timesteps"][1]
# Rough lower estimate of a network's parameter count: above this it is not a model sdengine runs (SDXL's
# U-Net has 2.6 B) and building even its meta skeleton or reading its file would be a hazard.
MAX_PARAMETERS = 5_000_000_000
# Kinds whose real models are larger get their own limit (SD3.5 Large's MMDiT has 8.1 B parameters, Flux.1's
# transformer 11.9 B).
MAX_PARAMETERS_BY_KIND = {
    "mmdit": 20_000_000_000,
    "flux": 30_000_000_000,
    "qwen_image": 40_000_000_000,
    "flux2": 60_000_000_000,  # FLUX.2 [dev]'s transformer has 32 B
    "z_image": 30_000_000_000,
}
# a kind's own bounds where INT_BOUNDS' do not fit it: FLUX.1 Fill's image tokens take 384 numbers (64 noise, 64
# masked-image latent, 256 mask), Depth / Canny's 128; FLUX.2's latent pixels are 128 numbers (32 channels in 2x2)
INT_BOUNDS_BY_KIND: dict[str, dict[str, tuple[int, int]]] = {
    "flux": {"in_channels": (1, 512)},
    "flux2": {"in_channels": (1, 1024), "out_channels": (1, 1024)},
    # Z-Image's own names (Z-Image-Turbo: 30 layers + 2 x 2 refiners of 3840, 30 heads, Qwen3-4B's 2560-wide states,
    # RoPE axes 32 + 48 + 48 over positions under 1536 / 512 / 512)
    "z_image": {
        "dim": (1, 16384),
        "n_layers": (1, 128),
        "n_refiner_layers": (0, 16),
        "n_heads": (1, 1024),
        "n_kv_heads": (1, 1024),
        "cap_feat_dim": (1, 16384),
        "all_patch_size": (1, 16),
        "all_f_patch_size": (1, 16),
        "axes_dims": (2, 4096),
        "axes_lens": (1, 65536),
    },
}


def _values(config: Any) -> Mapping[str, Any]:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    if not isinstance(config, Mapping):
        raise ConfigError(f"a config must be a mapping of names to values, got {type(config).__name__}")
    return config


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_int(what: str, name: str, value: Any, kind: str = "") -> None:
    lo, hi = INT_BOUNDS_BY_KIND.get(kind, {}).get(name) or INT_BOUNDS[name]
    if value is None and name in NULLABLE:
        return
    items: Sequence[Any]
    if isinstance(value, list | tuple):
        if not 1 <= len(value) <= MAX_LEVELS:
            raise ConfigError(f"{what} config: {name} has {len(value)} entries, expected 1 to {MAX_LEVELS}")
        items = value
    else:
        items = (value,)
    for v in items:
        if type(v) is not int:  # bool is an int subclass, 1e8 is a float: neither is a count
            raise ConfigError(f"{what} config: {name}={_show(value)} is not an integer")
        if not lo <= v <= hi:
            raise ConfigError(f"{what} config: {name}={_show(value)} is out of range ({lo} to {hi})")


def _check_float(what: str, name: str, value: Any) -> None:
    lo, hi, lo_in = FLOAT_BOUNDS[name]
    if value is None and name in NULLABLE:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{what} config: {name}={_show(value)} is not a number")
    if not math.isfinite(value) or not ((lo <= value) if lo_in else (lo < value)) or value > hi:
        raise ConfigError(
            f"{what} config: {name}={_show(value)} is out of range ({lo:g} {'to' if lo_in else '(excluded) to'} {hi:g})"
        )


def _levels(values: Mapping[str, Any], name: str, n: int) -> list[int]:
    v = values.get(name)
    if isinstance(v, list | tuple):
        return [int(x) for x in v][:n] + [int(v[-1])] * max(n - len(v), 0)
    return [int(v)] * n if isinstance(v, int) else [1] * n


def estimate_parameters(kind: str, values: Mapping[str, Any]) -> int:
    """A lower estimate of the parameter count (the 3x3 convolutions, the attention and MLP matrices, the
    embedding tables); only for refusing absurd configs, not an exact count."""
    if kind in ("unet", "vae", "controlnet"):
        chs = values.get("block_out_channels") or ()
        if not isinstance(chs, list | tuple) or not chs:
            return 0
        n = len(chs)
        layers = _levels(values, "layers_per_block", n)
        depth = _levels(values, "transformer_layers_per_block", n)
        cross = values.get("cross_attention_dim") or 0
        cross = max(cross) if isinstance(cross, list | tuple) else int(cross)
        if "attention" in values:  # a config dataclass
            attends = [a != "none" for a in values["attention"]]
        else:  # a diffusers dict: attention levels are the "...Attn...DownBlock2D" ones
            attends = [("Attn" in str(b)) for b in values.get("down_block_types") or ()]
        attends = (attends + [False] * n)[:n]
        total = 0
        for ch, lay, dep, att in zip(chs, layers, depth, attends, strict=True):
            resnets = lay if kind == "controlnet" else 2 * lay + 1  # down (and up) path
            total += resnets * 2 * 9 * ch * ch  # two 3x3 convolutions per resnet
            if att and kind != "vae":
                total += resnets * dep * (12 * ch * ch + 2 * ch * cross)
        return total + 2 * 2 * 9 * chs[-1] * chs[-1]  # the middle block's two resnets
    if kind in ("clip_text", "bert"):
        h = values.get("hidden_size") or 0
        per_layer = 4 * h * h + 2 * h * (values.get("intermediate_size") or 0)
        tables = ((values.get("vocab_size") or 0) + (values.get("max_position_embeddings") or 0)) * h
        return (values.get("num_hidden_layers") or 0) * per_layer + tables
    if kind == "mmdit":

        def one(name: str) -> int:  # lists are refused by the MMDiT config itself; count them as nothing here
            v = values.get(name)
            return v if type(v) is int else 0

        h = one("num_attention_heads") * one("attention_head_dim")
        grid = one("pos_embed_max_size")
        # per block: two streams of q/k/v/out (4 h^2), a 4x MLP (8 h^2) and the adaLN modulation (6 h^2)
        return one("num_layers") * 36 * h * h + grid * grid * h
    if kind == "t5":
        d, inner = values.get("d_model") or 0, (values.get("num_heads") or 0) * (values.get("d_kv") or 0)
        gated = str(values.get("feed_forward_proj", "")).startswith("gated")
        per_layer = 4 * d * inner + (3 if gated else 2) * d * (values.get("d_ff") or 0)
        return (values.get("num_layers") or 0) * per_layer + (values.get("vocab_size") or 0) * d
    if kind == "clip_vision":
        h = values.get("hidden_size") or 0
        per_layer = 4 * h * h + 2 * h * (values.get("intermediate_size") or 0)
        return (values.get("num_layers") or 0) * per_layer
    if kind == "flux":
        heads, head = values.get("num_attention_heads") or 0, values.get("attention_head_dim") or 0
        h = int(heads) * int(head) if isinstance(heads, int) and isinstance(head, int) else 0
        double = values.get("num_layers") or 0  # two streams x (qkv, out, 4x MLP in and out, 6 modulations)
        single = values.get("num_single_layers") or 0  # fused qkv + MLP in, attention + MLP out, 3 modulations
        return int(double) * 36 * h * h + int(single) * 15 * h * h
    if kind == "qwen_image":  # Qwen-Image: 60 dual-stream blocks of 3072 (20 B parameters), as Flux's double ones
        heads, head = values.get("num_attention_heads") or 0, values.get("attention_head_dim") or 0
        h = int(heads) * int(head) if isinstance(heads, int) and isinstance(head, int) else 0
        blocks = values.get("num_layers")
        return (blocks if type(blocks) is int else 0) * 36 * h * h
    if kind == "flux2":  # FLUX.2: double blocks of two streams' q/k/v/out and SwiGLU MLPs, fused single blocks
        heads, head = values.get("num_attention_heads") or 0, values.get("attention_head_dim") or 0
        h = int(heads) * int(head) if isinstance(heads, int) and isinstance(head, int) else 0
        double, single = values.get("num_layers"), values.get("num_single_layers")
        double = double if type(double) is int else 0
        single = single if type(single) is int else 0
        return double * 8 * h * h + single * 4 * h * h
    if kind == "z_image":  # Z-Image: single-stream blocks of q/k/v/out (4 d^2) and a SwiGLU MLP (8 d^2)
        counts = [values.get(k) for k in ("dim", "n_layers", "n_refiner_layers")]
        if not all(type(v) is int for v in counts):
            return 0
        width, main, refiners = (v if isinstance(v, int) else 0 for v in counts)
        return (main + 2 * refiners) * 12 * width * width
    return 0


def check_scalar_ints(what: str, config: Any) -> None:
    """Raise ConfigError (one line: ``what``, the field) unless every field of the config dataclass annotated ``int``
    (or ``int | None``, None allowed) holds one integer: :func:`check_config` lets a list through where diffusers
    allows one per level, which these fields do not (``"num_layers": [1]`` would fail deep in the build)."""
    for f in dataclasses.fields(config):
        if f.type not in ("int", "int | None", int):
            continue
        value = getattr(config, f.name)
        if value is None and f.type == "int | None":
            continue
        if type(value) is not int:
            raise ConfigError(f"{what}: {f.name}={_show(value)} is not an integer")


def check_config(kind: str, config: Any) -> None:
    """Raise ConfigError (one line: the kind, the field, its value, the range) unless every number in
    ``config`` (a raw config dict or a config dataclass) is of the right type and within bounds."""
    what = KINDS[kind]
    values = _values(config)
    own = INT_BOUNDS_BY_KIND.get(kind, {})
    for name, value in values.items():
        if name in INT_BOUNDS or name in own:
            _check_int(what, name, value, kind)
        elif name in FLOAT_BOUNDS:
            _check_float(what, name, value)
    if kind == "scheduler":
        trained = values.get("trained_betas")
        if trained is not None:
            if not isinstance(trained, list | tuple) or not 1 <= len(trained) <= MAX_TRAINED_BETAS:
                raise ConfigError(f"{what} config: trained_betas must be a list of 1 to {MAX_TRAINED_BETAS} numbers")
            if not all(isinstance(b, int | float) and not isinstance(b, bool) and 0 < b < 1 for b in trained):
                raise ConfigError(f"{what} config: trained_betas must all be numbers in (0, 1)")
    for name in ("block_out_channels", "conditioning_embedding_out_channels"):
        if name in values and not isinstance(values[name], list | tuple):
            raise ConfigError(f"{what} config: {name}={_show(values[name])} is not a list of channel counts")
    n = estimate_parameters(kind, values)
    limit = MAX_PARAMETERS_BY_KIND.get(kind, MAX_PARAMETERS)
    if n > limit:
        raise ConfigError(
            f"{what} config describes a network of at least {n:.2e} parameters (limit {limit:.0e}); "
            "refusing to build it"
        )


__all__ = [
    "check_scalar_ints",
    "FLOAT_BOUNDS",
    "INT_BOUNDS",
    "INT_BOUNDS_BY_KIND",
    "MAX_PARAMETERS",
    "MAX_PARAMETERS_BY_KIND",
    "ConfigError",
    "check_config",
    "estimate_parameters",
]
