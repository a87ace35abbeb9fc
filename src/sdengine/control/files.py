"""ControlNet files: a diffusers folder (``config.json`` + weights), a diffusers-layout single file, or an
original ``control_*.safetensors``/``.pth`` file (``control_model.*`` keys), SD 1.x and SD 2.x; reading,
building, saving, and the check that a ControlNet fits the base U-Net (the mismatch named)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.catalog import builtin_names, builtin_path
from sdengine.errors import ControlNetError
from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import UNetConfig
from sdengine.names import did_you_mean
from sdengine.weights import controlnet_keys as ck
from sdengine.weights.io import PICKLE_SUFFIXES, SAFETENSORS_SUFFIXES, WeightsError, load_file, parse_dtype

CONFIG_METADATA_KEY = "sdengine.controlnet_config"  # diffusers config JSON in original-layout files we write
WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
)


def family(cross_attention_dim: int | None) -> str:
    """ "SD 1.x" / "SD 2.x" by text width, for messages."""
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(cross_attention_dim or 0, f"a {cross_attention_dim}-wide text encoder")


def check_compatible(cn: ControlNetConfig, base: UNetConfig, *, name: str = "ControlNet") -> None:
    """Raise ControlNetError naming every way the ControlNet's encoder differs from the base U-Net's."""
    u = cn.unet
    if u.cross_attention_dim != base.cross_attention_dim:
        raise ControlNetError(
            f"{name} is for {family(u.cross_attention_dim)} (cross-attention width {u.cross_attention_dim}) "
            f"but the model is {family(base.cross_attention_dim)} (width {base.cross_attention_dim})"
        )
    fields = (
        "block_out_channels",
        "layers_per_block",
        "attention",
        "mid_block",
        "use_linear_projection",
        "flip_sin_to_cos",
        "freq_shift",
    )
    diffs = [
        f"{f} {getattr(u, f)!r} vs model {getattr(base, f)!r}" for f in fields if getattr(u, f) != getattr(base, f)
    ]
    if _depths_used(u) != _depths_used(base):  # levels without attention may say any depth (SDXL's first)
        diffs.append(
            f"transformer_layers_per_block {u.transformer_layers_per_block!r} "
            f"vs model {base.transformer_layers_per_block!r}"
        )
    if u.projection_class_embeddings_input_dim is not None and (
        u.projection_class_embeddings_input_dim != base.projection_class_embeddings_input_dim
    ):
        diffs.append(
            f"pooled text vector of {u.projection_class_embeddings_input_dim} "
            f"vs model {base.projection_class_embeddings_input_dim}"
        )
    if diffs:
        raise ControlNetError(f"{name} does not fit this model's U-Net: " + "; ".join(diffs))


def _depths_used(u: UNetConfig) -> tuple[int, ...]:
    """Transformer depth at each attention level and in the middle block (0 where there is no attention)."""
    n = len(u.block_out_channels)
    levels = tuple(u.depth_at(i) if u.attention[i] != "none" else 0 for i in range(n))
    return (*levels, u.depth_at(n - 1) if u.mid_block and u.mid_attention != "none" else 0)


def _hint_channels(sd: Mapping[str, Tensor], original: bool) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, conditioning_embedding_out_channels) from hint-encoder shapes."""
    if original:
        idx = sorted(int(k.split(".")[1]) for k in sd if k.startswith("input_hint_block.") and k.endswith(".weight"))
        convs = [sd[f"input_hint_block.{i}.weight"] for i in idx[:-1]]  # the last is conv_out
    else:
        n = len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")})
        convs = [sd["controlnet_cond_embedding.conv_in.weight"]]
        convs += [sd[f"controlnet_cond_embedding.blocks.{k}.weight"] for k in range(n)]
    # conv_in, then pairs (same-size conv, stride-2 conv): the level widths are conv_in's output and
    # every stride-2 conv's output.
    widths = [int(convs[0].shape[0])] + [int(c.shape[0]) for c in convs[2::2]]
    return int(convs[0].shape[1]), tuple(widths)


def hint_channels_of(sd: Mapping[str, Tensor]) -> tuple[int, tuple[int, ...]]:
    """(conditioning channels, conditioning_embedding_out_channels) of an original-named hint encoder."""
    return _hint_channels(sd, original=True)


def _block_indices(prefix: str, keys: list[str]) -> list[int]:
    pat = re.compile(rf"^{re.escape(prefix)}\.transformer_blocks\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def config_from_weights(sd: Mapping[str, Tensor], *, base: UNetConfig | None) -> ControlNetConfig:
    """Synthesise a ControlNetConfig from original-layout shapes (files carry no config).

    Shapes give the layout, widths, context width and projection kind; not the number of attention
    heads: SD1 uses 8 heads, SD2 64-wide heads, anything else copies the base model's."""
    from sdengine.weights.detect import unet_layout_from_ldm

    layout = unet_layout_from_ldm(sd)
    lpb = layout.layers_per_block
    chs = tuple(
        int(sd[f"input_blocks.{1 + lv * (lpb + 1)}.0.out_layers.3.weight"].shape[0]) for lv in range(layout.num_levels)
    )
    first_attn = next(
        (f"input_blocks.{1 + lv * (lpb + 1)}.1" for lv in range(layout.num_levels) if layout.down_attention[lv]),
        "middle_block.1",
    )
    to_k = sd.get(f"{first_attn}.transformer_blocks.0.attn2.to_k.weight")
    context = int(to_k.shape[1]) if to_k is not None else None
    proj_in = sd.get(f"{first_attn}.proj_in.weight")
    linear = proj_in is not None and proj_in.ndim == 2
    depth: int | tuple[int, ...] = len(_block_indices(first_attn, list(sd))) or 1
    attention = tuple("cross" if a else "none" for a in layout.down_attention)
    label = sd.get("label_emb.0.0.weight")  # SDXL: the added-conditioning MLP
    text_time: dict[str, Any] = {}
    if label is not None:
        from sdengine.weights.sdxl_files import transformer_depths

        d = transformer_depths(sd, layout)
        depth = tuple(d) if isinstance(d, list) else d
        time_dim = base.addition_time_embed_dim if base is not None and base.addition_time_embed_dim else 256
        text_time = {"projection_class_embeddings_input_dim": int(label.shape[1]), "addition_time_embed_dim": time_dim}
    if base is not None and base.block_out_channels == chs and base.cross_attention_dim == context:
        heads, upcast = base.num_heads, base.upcast_attention
    elif context == 1024 or label is not None:
        heads, upcast = tuple(max(c // 64, 1) for c in chs), False
    else:
        heads, upcast = (8,) * len(chs), False
    cond_ch, hint = _hint_channels(sd, original=True)
    ucfg = UNetConfig(
        in_channels=int(sd["input_blocks.0.0.weight"].shape[1]),
        out_channels=4,
        block_out_channels=chs,
        layers_per_block=lpb,
        attention=attention,  # type: ignore[arg-type]
        num_heads=heads,
        mid_block="middle_block.0.in_layers.0.weight" in sd,
        mid_attention="cross",
        cross_attention_dim=context,
        use_linear_projection=linear,
        transformer_layers_per_block=depth,
        upcast_attention=upcast,
        norm_num_groups=base.norm_num_groups if base is not None else 32,
        **text_time,
    )
    return ControlNetConfig(ucfg, conditioning_channels=cond_ch, conditioning_embedding_out_channels=hint)


def controlnet_layout(cfg: ControlNetConfig) -> Any:
    """The original-layout block map (weights.keymaps.UNetLayout) of a ControlNet config."""
    from sdengine.weights.keymaps import UNetLayout

    u = cfg.unet
    n = len(u.block_out_channels)
    return UNetLayout(
        n,
        u.layers_per_block,
        tuple(a != "none" for a in u.attention),
        (False,) * n,
        u.mid_block and u.mid_attention != "none",
    )


def _find_weights(folder: Path) -> Path:
    for name in WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise ControlNetError(f"{folder}: no ControlNet weights (expected {WEIGHT_NAMES[0]})")


@dataclass
class LoadedControlNet:
    """A ControlNet state dict in diffusers names, its config, and where it came from."""

    state_dict: dict[str, Tensor]
    config: ControlNetConfig
    source: Path
    layout: str  # "diffusers" or "original"


def read_controlnet(path: str | Path, *, base: UNetConfig | None = None) -> LoadedControlNet:
    """Read a ControlNet from disk into diffusers names + config, without building the model. A name that is
    no path but a shipped ControlNet's (``emoji-controlnet-canny``) reads the shipped one."""
    if not Path(path).exists() and isinstance(path, str):
        path = builtin_path("controlnets", path) or path
    path = Path(path)
    if path.is_dir():
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            sub = path / "controlnet"
            if (sub / "config.json").is_file():
                return read_controlnet(sub, base=base)
            raise ControlNetError(f"{path}: not a ControlNet folder (no config.json)")
        raw = json.loads(cfg_path.read_text())
        if raw.get("_class_name") not in (None, "ControlNetModel"):
            raise ControlNetError(f"{path}: holds a {raw.get('_class_name')}, not a ControlNetModel")
        try:
            cfg = ControlNetConfig.from_diffusers(raw)
        except ValueError as e:
            raise ControlNetError(f"{path}: {e}") from None
        sd, _ = load_file(_find_weights(path))
        return LoadedControlNet(dict(sd), cfg, path, "diffusers")
    if not path.exists():
        guess = did_you_mean(path, builtin_names("controlnets")) if len(path.parts) == 1 else ""
        raise ControlNetError(f"ControlNet not found: {path}{guess}")
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES:
        raise ControlNetError(f"{path}: expected a ControlNet folder or a .safetensors/.pth/.ckpt file")
    sd, info = load_file(path)
    return controlnet_from_state(sd, info, path, base)


def controlnet_from_state(
    sd: Mapping[str, Tensor], info: Mapping[str, Any], path: Path, base: UNetConfig | None
) -> LoadedControlNet:
    """A LoadedControlNet from a single file's tensors (``info``: its metadata), either naming."""
    sd = ck.strip_prefix(sd)
    if "lora_controlnet" in sd:
        raise ControlNetError(
            f"{path}: a Control-LoRA holds only its changes to a base model's U-Net: use it with the model it was "
            "made for (in a pipeline, or load_control_model(..., base_unet=unet))"
        )
    keys = list(sd)
    if "controlnet_cond_embedding.conv_in.weight" in sd:  # diffusers names in one file
        cfg_json = info.get(CONFIG_METADATA_KEY)
        if cfg_json is None and (path.parent / "config.json").is_file():
            cfg_json = (path.parent / "config.json").read_text()
        if cfg_json is not None:
            return LoadedControlNet(dict(sd), ControlNetConfig.from_diffusers(json.loads(cfg_json)), path, "diffusers")
        # No config: go through the original names to read the architecture off the shapes.
        from sdengine.weights.detect import unet_layout_from_diffusers

        layout = unet_layout_from_diffusers(sd)
        hint = 1 + len({k.split(".")[2] for k in sd if k.startswith("controlnet_cond_embedding.blocks.")}) // 2
        original, _ = ck.controlnet_diffusers_to_original(sd, layout, hint, sdxl="add_embedding.linear_1.weight" in sd)
        cfg = config_from_weights(original, base=base)
        return LoadedControlNet(dict(sd), cfg, path, "diffusers")
    if "input_hint_block.0.weight" not in sd:
        if "style_embedding" in sd:
            raise ControlNetError(
                f"{path}: a T2I-Adapter style model (image tokens for the prompt, ComfyUI's StyleModelLoader), "
                "not a ControlNet or a T2I-Adapter; sdengine does not read it"
            )
        if any(k.startswith("model.diffusion_model.") for k in keys):
            raise ControlNetError(f"{path}: this is a Stable Diffusion checkpoint, not a ControlNet")
        if any(k.startswith(("lora_", "lora_unet_")) or ".lora_" in k for k in keys):
            raise ControlNetError(f"{path}: this is a LoRA, not a ControlNet")
        from sdengine.control.dit_files import LABELS, dit_controlnet_kind

        kind = dit_controlnet_kind(sd)
        if kind is not None:
            raise ControlNetError(
                f"{path}: a {LABELS[kind]} ControlNet (for {LABELS[kind]} models); SD 1.x / 2.x / SDXL take U-Net "
                "ControlNets"
            )
        prefixes = sorted({k.split(".")[0] for k in keys})[:6]
        raise ControlNetError(
            f"{path}: not a ControlNet (no input_hint_block / controlnet_cond_embedding weights; "
            f"top-level names: {prefixes})"
        )
    sdxl = "label_emb.0.0.weight" in sd  # SDXL's added-conditioning MLP
    if CONFIG_METADATA_KEY in info:
        cfg = ControlNetConfig.from_diffusers(json.loads(info[CONFIG_METADATA_KEY]))
    else:
        try:
            cfg = config_from_weights(sd, base=base)
        except (KeyError, WeightsError) as e:
            raise ControlNetError(f"{path}: cannot read the ControlNet architecture ({e})") from None
    renamed, unknown = ck.controlnet_original_to_diffusers(
        sd, controlnet_layout(cfg), len(cfg.conditioning_embedding_out_channels), sdxl=sdxl
    )
    if unknown:
        shown = ", ".join(unknown[:5])
        raise ControlNetError(f"{path}: unexpected ControlNet keys: {shown} ({len(unknown)} in all)")
    return LoadedControlNet(renamed, cfg, path, "original")


def load_controlnet(
    path: str | Path,
    *,
    base: UNetConfig | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    read: LoadedControlNet | None = None,
) -> ControlNet:
    """A ControlNet from a diffusers folder, a diffusers-layout file or an original ``control_*`` file.

    ``base``: the U-Net config it will be used with; a ControlNet that does not fit is refused with the
    mismatch named (an SD 2.x ControlNet on an SD 1.x model, ...). ``read``: what ``read_controlnet(path)``
    gave already (not read again)."""
    from sdengine.weights.loading import build_on_meta

    loaded = read_controlnet(path, base=base) if read is None else read
    if base is not None:
        check_compatible(loaded.config, base, name=f"ControlNet {Path(path).name}")
    cfg = loaded.config
    try:
        net = build_on_meta(
            lambda: ControlNet(cfg), loaded.state_dict, name=f"ControlNet {path}", dtype=parse_dtype(dtype)
        )
    except WeightsError as e:
        raise ControlNetError(str(e)) from None
    assert isinstance(net, ControlNet)
    return net.to(device) if device is not None else net


def save_controlnet(
    net: ControlNet, dst: str | Path, *, layout: str = "diffusers", dtype: str | torch.dtype | None = None
) -> Path:
    """Write ``net`` as a diffusers folder (``layout="diffusers"``: config.json +
    diffusion_pytorch_model.safetensors) or an original-layout ``control_model.*`` ``.safetensors`` file
    (``layout="original"``, the config kept in the file's metadata so it loads back exactly)."""
    from sdengine.weights.io import save_safetensors
    from sdengine.weights.loading import DIFFUSERS_VERSION

    dst = Path(dst)
    sd = {k: v.detach() for k, v in net.state_dict().items()}
    cfg = {**net.config.to_diffusers(), "_diffusers_version": DIFFUSERS_VERSION}
    if layout == "diffusers":
        dst.mkdir(parents=True, exist_ok=True)
        from sdengine.io.atomic import write_text_atomic

        write_text_atomic(dst / "config.json", json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_safetensors(sd, dst / WEIGHT_NAMES[0], metadata={"format": "pt"}, dtype=dtype)
        return dst
    if layout != "original":
        raise ControlNetError(f"unknown ControlNet layout {layout!r}; valid: diffusers, original")
    if dst.suffix.lower() != ".safetensors":
        raise ControlNetError(f"{dst}: original-layout ControlNets are written as .safetensors")
    original, bad = ck.controlnet_diffusers_to_original(
        sd, controlnet_layout(net.config), len(net.config.conditioning_embedding_out_channels)
    )
    if bad:
        raise ControlNetError(f"ControlNet keys with no original name: {', '.join(bad[:5])}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(
        {ck.CONTROL_PREFIX + k: v for k, v in original.items()},
        dst,
        metadata={"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg, sort_keys=True)},
        dtype=dtype,
    )
    return dst


__all__ = [
    "CONFIG_METADATA_KEY",
    "WEIGHT_NAMES",
    "LoadedControlNet",
    "check_compatible",
    "config_from_weights",
    "controlnet_from_state",
    "controlnet_layout",
    "hint_channels_of",
    "family",
    "load_controlnet",
    "read_controlnet",
    "save_controlnet",
]
