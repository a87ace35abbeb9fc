"""SD3 / SD3.5 MMDiT files: the layouts, the architecture from the shapes, load and save.

The layouts users bring:

- a diffusers folder: the model's folder (``model_index.json`` beside ``transformer/``) or its ``transformer/``
  folder itself, holding ``config.json`` and ``diffusion_pytorch_model.safetensors``, or the weights cut into
  shards listed by ``diffusion_pytorch_model.safetensors.index.json`` (SD3.5 Large's). The names are diffusers'
  ``SD3Transformer2DModel``'s, which are :class:`~sdengine.models.mmdit.MMDiT`'s;
- Stability's single files (``sd3_medium.safetensors``, ``sd3.5_large.safetensors``, ``sd3.5_medium.safetensors``,
  the ``..._incl_clips(_t5xxlfp8)`` ones with the text encoders, whose other parts are left alone here): the
  MMDiT under ``model.diffusion_model.``, in the names of SD3's reference code; ComfyUI's "diffusion model
  only" files hold the same names without that prefix.

Stability's names -> sdengine's (= diffusers'), for block ``i`` (``x`` = ``joint_blocks.i.x_block``, ``c`` =
``joint_blocks.i.context_block``):

============================================  =================================================================
``x.attn.qkv`` (q, k, v stacked by rows)      ``transformer_blocks.i.attn.to_q`` / ``to_k`` / ``to_v``
``c.attn.qkv``                                ``...attn.add_q_proj`` / ``add_k_proj`` / ``add_v_proj``
``x.attn.ln_q`` / ``ln_k``                    ``...attn.norm_q`` / ``norm_k`` (SD3.5's RMS norms)
``c.attn.ln_q`` / ``ln_k``                    ``...attn.norm_added_q`` / ``norm_added_k``
``x.attn.proj`` / ``c.attn.proj``             ``...attn.to_out.0`` / ``...attn.to_add_out`` (not in the last block)
``x.attn2.qkv`` / ``ln_q`` / ``ln_k`` / ``proj``  ``...attn2.to_q/k/v`` / ``norm_q`` / ``norm_k`` / ``to_out.0``
``x.adaLN_modulation.1``                      ``...norm1.linear``
``c.adaLN_modulation.1``                      ``...norm1_context.linear``; in the last block (2 vectors) the halves
                                              swapped: Stability stores shift, scale; diffusers scale, shift
``x.mlp.fc1`` / ``fc2`` (``c.`` likewise)     ``...ff.net.0.proj`` / ``ff.net.2`` (``ff_context``, not in the last)
``x_embedder.proj``, ``pos_embed``            ``pos_embed.proj``, ``pos_embed.pos_embed``
``t_embedder.mlp.0`` / ``.2``                 ``time_text_embed.timestep_embedder.linear_1`` / ``linear_2``
``y_embedder.mlp.0`` / ``.2``                 ``time_text_embed.text_embedder.linear_1`` / ``linear_2``
``context_embedder``                          ``context_embedder``
``final_layer.linear``                        ``proj_out``
``final_layer.adaLN_modulation.1``            ``norm_out.linear``, halves swapped as above
============================================  =================================================================

A single file carries no config; the shapes give it: the number of joint blocks (SD3's depth), the width from
``x_embedder``, the heads by SD3's rule of one head per block (its reference code: ``num_heads = depth``,
``hidden = 64 * depth``, so 64-channel heads in every release; the head size is read as width / depth), the patch
size and the latent channels from its kernel, the position grid from ``pos_embed``'s length, the text widths
from ``context_embedder`` and ``y_embedder``, the output channels from ``final_layer.linear``, ``qk_norm`` from
the presence of ``ln_q``, the MMDiT-X blocks from the presence of ``attn2``. ``sample_size`` (128 in every
release) only scales a freshly built position table; a loaded model takes the file's. Every unknown key, a
missing layer or a shape that does not fit is one :class:`~sdengine.weights.io.WeightsError` line.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.mmdit import MMDiT, MMDiTConfig
from sdengine.nn.meta_init import skip_meta_init

from .detect import is_sd3_state_dict, model_family
from .io import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    StateDict,
    WeightsError,
    load_file,
    parse_dtype,
    save_safetensors,
)
from .loading import check_keys

PREFIX = "model.diffusion_model."
WEIGHTS_STEM = "diffusion_pytorch_model"
INDEX_NAME = f"{WEIGHTS_STEM}.safetensors.index.json"
SAMPLE_SIZE = 128  # every SD3 release's training latent size (only scales a freshly built position table)
_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.")
# Parts of a whole checkpoint that are not the MMDiT (text encoders, VAE): left alone.
OTHER_PARTS = ("text_encoders.", "first_stage_model.", "cond_stage_model.", "conditioner.")


# ------------------------------------------------------------------------------------------- the name table


def _pairs(i: int, cfg: MMDiTConfig) -> list[tuple[str, str]]:
    """(Stability name, sdengine name) of block ``i``'s one-to-one tensors, without ``.weight``/``.bias``."""
    x, c, t = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
    last = i == cfg.num_layers - 1
    out = [
        (f"{x}.attn.proj", f"{t}.attn.to_out.0"),
        (f"{x}.adaLN_modulation.1", f"{t}.norm1.linear"),
        (f"{c}.adaLN_modulation.1", f"{t}.norm1_context.linear"),
        (f"{x}.mlp.fc1", f"{t}.ff.net.0.proj"),
        (f"{x}.mlp.fc2", f"{t}.ff.net.2"),
    ]
    if not last:
        out += [
            (f"{c}.attn.proj", f"{t}.attn.to_add_out"),
            (f"{c}.mlp.fc1", f"{t}.ff_context.net.0.proj"),
            (f"{c}.mlp.fc2", f"{t}.ff_context.net.2"),
        ]
    dual = i in cfg.dual_attention_layers
    if dual:
        out.append((f"{x}.attn2.proj", f"{t}.attn2.to_out.0"))
    return out


def _norms(i: int, cfg: MMDiTConfig) -> list[tuple[str, str]]:
    """(Stability name, sdengine name) of block ``i``'s RMS-norm weights (they have no bias)."""
    if cfg.qk_norm is None:
        return []
    x, c, t = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
    out = [
        (f"{x}.attn.ln_q", f"{t}.attn.norm_q"),
        (f"{x}.attn.ln_k", f"{t}.attn.norm_k"),
        (f"{c}.attn.ln_q", f"{t}.attn.norm_added_q"),
        (f"{c}.attn.ln_k", f"{t}.attn.norm_added_k"),
    ]
    if i in cfg.dual_attention_layers:
        out += [(f"{x}.attn2.ln_q", f"{t}.attn2.norm_q"), (f"{x}.attn2.ln_k", f"{t}.attn2.norm_k")]
    return out


def _qkvs(i: int, cfg: MMDiTConfig) -> list[tuple[str, tuple[str, str, str]]]:
    """(Stability's stacked qkv, sdengine's three projections) of block ``i``."""
    x, c, t = f"joint_blocks.{i}.x_block", f"joint_blocks.{i}.context_block", f"transformer_blocks.{i}"
    out = [
        (f"{x}.attn.qkv", (f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")),
        (f"{c}.attn.qkv", (f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj", f"{t}.attn.add_v_proj")),
    ]
    if i in cfg.dual_attention_layers:
        out.append((f"{x}.attn2.qkv", (f"{t}.attn2.to_q", f"{t}.attn2.to_k", f"{t}.attn2.to_v")))
    return out


_GLOBAL_PAIRS = [
    ("x_embedder.proj", "pos_embed.proj"),
    ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    ("context_embedder", "context_embedder"),
    ("final_layer.linear", "proj_out"),
    ("final_layer.adaLN_modulation.1", "norm_out.linear"),
]


def _swapped(cfg: MMDiTConfig) -> frozenset[str]:
    """sdengine's names whose two halves Stability stores the other way round (shift, scale)."""
    last = cfg.num_layers - 1
    return frozenset(
        f"{name}.{p}"
        for name in ("norm_out.linear", f"transformer_blocks.{last}.norm1_context.linear")
        for p in ("weight", "bias")
    )


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def name_table(cfg: MMDiTConfig) -> tuple[dict[str, str], dict[str, tuple[str, str, str]]]:
    """(Stability tensor name -> sdengine's, for the one-to-one tensors; Stability's stacked qkv tensor name ->
    sdengine's three) of an MMDiT of this architecture, all with ``.weight``/``.bias``."""
    one: dict[str, str] = {"pos_embed": "pos_embed.pos_embed"}
    three: dict[str, tuple[str, str, str]] = {}
    pairs = list(_GLOBAL_PAIRS)
    for i in range(cfg.num_layers):
        pairs += _pairs(i, cfg)
        one.update({f"{s}.weight": f"{d}.weight" for s, d in _norms(i, cfg)})
        for s, ds in _qkvs(i, cfg):
            for p in ("weight", "bias"):
                three[f"{s}.{p}"] = (f"{ds[0]}.{p}", f"{ds[1]}.{p}", f"{ds[2]}.{p}")
    for s, d in pairs:
        one.update({f"{s}.weight": f"{d}.weight", f"{s}.bias": f"{d}.bias"})
    return one, three


# ------------------------------------------------------------------------------------------ layouts


def mmdit_part(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """The MMDiT's tensors of a Stability-layout state dict, keyed without ``model.diffusion_model.``: those under
    that prefix (a whole checkpoint; its text encoders and VAE are left out), or all of them (a "diffusion
    model only" file)."""
    if any(k.startswith(PREFIX) for k in sd):
        part = {k.removeprefix(PREFIX): v for k, v in sd.items() if k.startswith(PREFIX)}
        stray = [k for k in sd if not k.startswith(PREFIX) and not k.startswith(OTHER_PARTS)]
        if stray:
            raise WeightsError(f"{where}: unexpected keys beside the MMDiT: {_some(stray)}")
        return part
    return dict(sd)


def _some(names: Iterable[str], n: int = 4) -> str:
    names = sorted(names)
    more = f" (+{len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more


def _need(sd: Mapping[str, Any], key: str, where: str, ndim: int) -> tuple[int, ...]:
    t = sd.get(key)
    if t is None:
        raise WeightsError(f"{where}: missing key {key}: not a complete SD3 MMDiT")
    shape = tuple(int(s) for s in t.shape)
    if len(shape) != ndim:
        raise WeightsError(f"{where}: {key} has shape {shape}, expected {ndim} dimensions")
    return shape


def config_from_stability(sd: Mapping[str, Any], where: str = "<state dict>") -> MMDiTConfig:
    """The architecture of an MMDiT in Stability's names (without the prefix) from its shapes (see the module
    docstring)."""
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if not blocks:
        raise WeightsError(f"{where}: no joint_blocks.*: not an SD3 MMDiT")
    n = max(blocks) + 1
    if len(blocks) != n:
        gone = sorted(set(range(n)) - blocks)
        raise WeightsError(f"{where}: joint_blocks {_some(map(str, gone))} missing (found {len(blocks)} of {n})")
    width, in_ch, p, p2 = _need(sd, "x_embedder.proj.weight", where, 4)
    if p != p2:
        raise WeightsError(f"{where}: x_embedder.proj.weight has a {p}x{p2} kernel; SD3's patches are square")
    if width % n:
        raise WeightsError(f"{where}: the width {width} does not split into {n} heads (SD3: one head per block)")
    _, cells, pos_width = _need(sd, "pos_embed", where, 3)
    grid = math.isqrt(cells)
    if grid * grid != cells or pos_width != width:
        raise WeightsError(
            f"{where}: pos_embed has shape {tuple(sd['pos_embed'].shape)}, not (1, M*M, {width}) of a square grid"
        )
    context_width, joint_dim = _need(sd, "context_embedder.weight", where, 2)
    _, pooled_dim = _need(sd, "y_embedder.mlp.0.weight", where, 2)
    out_width, _ = _need(sd, "final_layer.linear.weight", where, 2)
    if out_width % (p * p):
        raise WeightsError(f"{where}: final_layer.linear has {out_width} outputs, not a multiple of {p}x{p} patches")
    dual = sorted({int(m.group(1)) for k in sd if ".x_block.attn2." in k and (m := _BLOCK.match(k))})
    try:
        return MMDiTConfig(
            sample_size=SAMPLE_SIZE,
            patch_size=p,
            in_channels=in_ch,
            num_layers=n,
            attention_head_dim=width // n,
            num_attention_heads=n,
            joint_attention_dim=joint_dim,
            caption_projection_dim=context_width,
            pooled_projection_dim=pooled_dim,
            out_channels=out_width // (p * p),
            pos_embed_max_size=grid,
            dual_attention_layers=tuple(dual),
            qk_norm="rms_norm" if any(".attn.ln_q." in k or ".attn2.ln_q." in k for k in sd) else None,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def stability_to_sdengine(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig, where: str = "<state dict>") -> StateDict:
    """Stability's names (without the prefix) -> sdengine's (= diffusers'): q/k/v split, the final adaLN halves
    swapped. A key the table does not know is a WeightsError naming it; a missing one is left for the strict
    load to name."""
    one, three = name_table(cfg)
    swapped = _swapped(cfg)
    unknown = [k for k in sd if k not in one and k not in three]
    if unknown:
        raise WeightsError(f"{where}: keys that are not part of this MMDiT: {_some(unknown)}")
    out: StateDict = {}
    for k, v in sd.items():
        if k in three:
            if v.shape[0] % 3:
                raise WeightsError(f"{where}: {k} has {v.shape[0]} rows, not q, k and v stacked")
            for name, part in zip(three[k], v.chunk(3, dim=0), strict=True):
                out[name] = part
        else:
            name = one[k]
            out[name] = _swap_halves(v) if name in swapped else v
    return out


def sdengine_to_stability(sd: Mapping[str, torch.Tensor], cfg: MMDiTConfig) -> StateDict:
    """The inverse of :func:`stability_to_sdengine` (names without the prefix)."""
    one, three = name_table(cfg)
    swapped = _swapped(cfg)
    out: StateDict = {}
    for s, d in one.items():
        out[s] = _swap_halves(sd[d]) if d in swapped else sd[d]
    for s, (q, k, v) in three.items():
        out[s] = torch.cat([sd[q], sd[k], sd[v]], dim=0)
    return out


# ------------------------------------------------------------------------------------------ diffusers folders


def _transformer_folder(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    sub = folder / "transformer"
    if (sub / "config.json").is_file():
        return sub
    if (folder / "model_index.json").is_file():
        raise WeightsError(f"{folder}: a diffusers model folder without transformer/config.json (not SD3?)")
    raise WeightsError(f"{folder}: not a diffusers SD3 folder (no config.json, no transformer/config.json)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read it ({type(e).__name__})") from None


def _folder_weights(folder: Path) -> StateDict:
    """The tensors of a diffusers model folder: one file, or the shards its index lists."""
    index = folder / INDEX_NAME
    if index.is_file():
        data = _read_json(index)
        wmap = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wmap, dict) or not wmap or not all(isinstance(v, str) for v in wmap.values()):
            raise WeightsError(f"{index}: no weight_map of tensor names to shard files")
        out: StateDict = {}
        for shard in sorted(set(wmap.values())):
            if Path(shard).name != shard or not shard.endswith(SAFETENSORS_SUFFIXES):
                raise WeightsError(f"{index}: shard {shard!r} is not a .safetensors file in the folder")
            tensors = load_file(folder / shard)[0]
            listed = {k for k, v in wmap.items() if v == shard}
            if set(tensors) != listed:
                odd = set(tensors) ^ listed
                raise WeightsError(f"{folder / shard}: its tensors are not the ones the index lists ({_some(odd)})")
            out.update(tensors)
        return out
    for ext in (".safetensors", ".bin"):
        f = folder / f"{WEIGHTS_STEM}{ext}"
        if f.is_file():
            return load_file(f)[0]
    raise WeightsError(f"{folder}: no {WEIGHTS_STEM}.safetensors (nor a sharded {INDEX_NAME})")


def read_mmdit(path: str | Path) -> tuple[MMDiTConfig, StateDict]:
    """(config, state dict in sdengine's names, tensors in the file's dtypes) of any layout above."""
    p = Path(path)
    if p.is_dir():
        folder = _transformer_folder(p)
        raw = _read_json(folder / "config.json")
        try:
            cfg = MMDiTConfig.from_diffusers(raw)
        except (ConfigError, TypeError) as e:
            raise WeightsError(f"{folder / 'config.json'}: {e}") from None
        return cfg, _folder_weights(folder)
    if not p.is_file():
        raise WeightsError(f"{p}: no such SD3 file or folder")
    if not p.name.lower().endswith(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES):
        raise WeightsError(f"{p}: expected a .safetensors (or .ckpt/.pt/.bin) file or a diffusers folder")
    sd = load_file(p)[0]  # safetensors: a memory map, tensors not read until used (text encoders never are)
    if model_family(sd) != "sd3":
        hint = " (looks like Flux)" if any("double_blocks." in k for k in sd) else ""
        raise WeightsError(f"{p}: not an SD3 MMDiT (no joint_blocks.*){hint}")
    if any(k.startswith("transformer_blocks.") for k in sd):
        raise WeightsError(
            f"{p}: diffusers names (transformer_blocks.*) in a single file: give its folder (with config.json)"
        )
    part = mmdit_part(sd, str(p))
    cfg = config_from_stability(part, str(p))
    return cfg, stability_to_sdengine(part, cfg, str(p))


def _common_dtype(sd: Mapping[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(t.dtype for t in sd.values() if t.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def load_mmdit(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> MMDiT:
    """An MMDiT from a diffusers folder (or its ``transformer/``) or a Stability / ComfyUI single file, in eval
    mode without gradients, on ``device``, in ``dtype`` (None: the dtype most of the file's tensors have)."""
    cfg, sd = read_mmdit(path)
    target = parse_dtype(dtype) or _common_dtype(sd)
    with torch.device("meta"), skip_meta_init():
        model = MMDiT(cfg)
    check_keys(model.state_dict(), sd, name=f"{Path(path).name} (SD3 MMDiT)")
    dev = torch.device(device)
    tensors = {k: v.to(device=dev, dtype=target if v.is_floating_point() else None) for k, v in sd.items()}
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ------------------------------------------------------------------------------------------------ saving


def save_mmdit(model: MMDiT, folder: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
    """Write ``model`` as a diffusers ``transformer`` folder (config.json + one safetensors file)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    save_safetensors(model.state_dict(), out / f"{WEIGHTS_STEM}.safetensors", dtype=dtype)
    (out / "config.json").write_text(json.dumps(model.config.to_diffusers(), indent=2) + "\n", encoding="utf-8")
    return out


def save_mmdit_single_file(
    model: MMDiT, path: str | Path, *, dtype: str | torch.dtype | None = None, prefix: str = PREFIX
) -> Path:
    """Write ``model`` in Stability's layout (``prefix`` ``""``: ComfyUI's diffusion-model-only file)."""
    sd = sdengine_to_stability(model.state_dict(), model.config)
    save_safetensors({prefix + k: v for k, v in sd.items()}, path, dtype=dtype)
    return Path(path)


__all__ = [
    "PREFIX",
    "config_from_stability",
    "is_sd3_state_dict",
    "load_mmdit",
    "mmdit_part",
    "name_table",
    "read_mmdit",
    "save_mmdit",
    "save_mmdit_single_file",
    "sdengine_to_stability",
    "stability_to_sdengine",
]
