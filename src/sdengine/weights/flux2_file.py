"""FLUX.2 files: a diffusers pipeline folder's ``transformer/`` (``Flux2Transformer2DModel``, sharded too) and
``vae/`` (``AutoencoderKLFlux2``) folders; BFL's / ComfyUI's single files.

The names are diffusers', which :class:`sdengine.models.flux2.Flux2Transformer` and
:class:`sdengine.models.flux2_vae.Flux2VAE` keep; a folder's config is its ``config.json``, checked against the
weights (one line naming the first missing, unexpected or misshapen tensor). Reading, dtype choice and the
meta-device build are Flux's (:func:`sdengine.weights.flux_file.load_transformer`).

Single files:

* the transformer (BFL's ``flux-2-klein-*.safetensors``, ComfyUI's ``diffusion_models/`` copy, with or without
  ComfyUI's ``model.diffusion_model.`` prefix; told by ``single_stream_modulation.lin.weight``) in BFL's names,
  renamed as diffusers' ``convert_flux2_transformer_checkpoint_to_diffusers`` renames them (:func:`bfl_to_diffusers`):
  ``img_in`` / ``txt_in`` -> ``x_embedder`` / ``context_embedder``, ``time_in`` / ``guidance_in`` -> the
  ``time_guidance_embed`` MLPs, the modulations' ``lin`` -> ``linear``, a double block's fused ``qkv`` split in
  three (image: ``to_q/k/v``, text: ``add_q/k/v_proj``), ``proj`` -> ``to_out.0`` / ``to_add_out``, ``mlp.0`` /
  ``mlp.2`` -> ``linear_in`` / ``linear_out``, ``norm.query_norm.scale`` -> ``norm_q.weight`` (text:
  ``norm_added_q``), a single block's ``linear1`` / ``linear2`` -> ``to_qkv_mlp_proj`` / ``to_out``,
  ``final_layer.linear`` -> ``proj_out`` and ``final_layer.adaLN_modulation.1`` -> ``norm_out.linear`` with its
  (shift, scale) halves swapped. A file in diffusers' names is read as it is. The config comes from the shapes
  (:func:`config_from_shapes`); what they do not say is the release's (RoPE axes 32 x 4 for 128-wide heads, theta
  2000, eps 1e-6): other head widths are refused.
* the VAE (ComfyUI's ``vae/flux2-vae.safetensors``, BFL's ``ae.safetensors`` of FLUX.2): the LDM names of SD's /
  FLUX.1's VAE files with the quant convolutions inside the encoder / decoder (``encoder.quant_conv``,
  ``decoder.post_quant_conv``; top-level ones are read too) and the batch norm's ``bn.running_mean`` /
  ``bn.running_var``; or diffusers' names in one file. The config from the shapes (the encoder's and the decoder's
  widths apart), the release's 32 GroupNorm groups and batch-norm eps 1e-4.

ComfyUI's mixed-precision transformer files (``flux2_dev_fp8mixed.safetensors``: ``<layer>.comfy_quant`` naming
``float8_e4m3fn``, ``<layer>.weight_scale``, ``<layer>.input_scale``) are read as plain weights float(weight) x scale in
the compute dtype (:func:`dequantize_comfy`); another format is one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.flux2 import Flux2Config, Flux2Transformer
from sdengine.models.flux2_vae import Flux2VAE, Flux2VAEConfig

from .encoder_files import checked_scale
from .flux_file import (
    build_from_state,
    compute_dtype,
    load_transformer,
    read_shards,
    stored_dtype,
    swap_halves,
    tensor_shape,
)
from .io import WeightsError, parse_dtype
from .loading import check_keys, component_weight_files, parameters_on_meta

MARKER = "single_stream_modulation.lin.weight"  # BFL's name that tells a FLUX.2 transformer (diffusers' marker)
_TOP = (  # BFL's top-level names -> diffusers'
    ("img_in.", "x_embedder."),
    ("txt_in.", "context_embedder."),
    ("time_in.in_layer.", "time_guidance_embed.timestep_embedder.linear_1."),
    ("time_in.out_layer.", "time_guidance_embed.timestep_embedder.linear_2."),
    ("guidance_in.in_layer.", "time_guidance_embed.guidance_embedder.linear_1."),
    ("guidance_in.out_layer.", "time_guidance_embed.guidance_embedder.linear_2."),
    ("double_stream_modulation_img.lin.", "double_stream_modulation_img.linear."),
    ("double_stream_modulation_txt.lin.", "double_stream_modulation_txt.linear."),
    ("single_stream_modulation.lin.", "single_stream_modulation.linear."),
    ("final_layer.linear.", "proj_out."),
)
_DOUBLE = {  # a double block's BFL module -> diffusers' (the fused qkv apart)
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_QKV = {
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
}
_SINGLE = {
    "linear1": "attn.to_qkv_mlp_proj",
    "linear2": "attn.to_out",
    "norm.query_norm": "attn.norm_q",
    "norm.key_norm": "attn.norm_k",
}
_BLOCK = re.compile(r"^(double|single)_blocks\.(\d+)\.(.+)\.(weight|bias|scale)$")
RELEASE_HEAD = 128  # FLUX.2's heads; a single file's RoPE axes (32 x 4) are read for them only


def is_bfl_flux2(keys: Iterable[str]) -> bool:
    """Whether these tensor names (ComfyUI's prefix removed) are a FLUX.2 transformer in BFL's names."""
    return MARKER in set(keys)


def bfl_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """A FLUX.2 transformer state dict in BFL's names -> diffusers' (module docstring); a name it does not know is
    one line."""
    out: dict[str, Any] = {}

    def put(key: str, value: Any) -> None:
        if key in out:
            raise WeightsError(f"{where}: {key} is in the file twice")
        out[key] = value

    for k, v in sd.items():
        m = _BLOCK.match(k)
        if m is not None:
            kind, n, module, param = m.groups()
            param = "weight" if param == "scale" else param
            table = _DOUBLE if kind == "double" else _SINGLE
            prefix = f"{'transformer_blocks' if kind == 'double' else 'single_transformer_blocks'}.{n}."
            if kind == "double" and module in _QKV:
                if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] % 3:
                    raise WeightsError(f"{where}: {k} is not q, k and v stacked (rows not a multiple of 3)")
                for name, part in zip(_QKV[module], v.chunk(3, dim=0), strict=True):
                    put(f"{prefix}{name}.{param}", part)
                continue
            if module not in table:
                raise WeightsError(f"{where}: {k} is not a FLUX.2 transformer tensor")
            put(f"{prefix}{table[module]}.{param}", v)
            continue
        if k.startswith("final_layer.adaLN_modulation.1."):
            if not isinstance(v, torch.Tensor) or v.ndim == 0 or v.shape[0] % 2:
                raise WeightsError(f"{where}: {k} is not (shift, scale) stacked")
            put("norm_out.linear." + k.rsplit(".", 1)[1], swap_halves(v))
            continue
        new = next((n + k[len(o) :] for o, n in _TOP if k.startswith(o)), None)
        if new is None:
            raise WeightsError(f"{where}: {k} is not a FLUX.2 transformer tensor")
        put(new, v)
    return out


def _count(sd: Mapping[str, Any], prefix: str) -> int:
    found = {int(k[len(prefix) :].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    return len(found) if found == set(range(len(found))) else -1


def config_from_shapes(sd: Mapping[str, Any], where: str = "<state dict>") -> Flux2Config:
    """The architecture a FLUX.2 state dict (diffusers' names) describes; what the shapes cannot tell is the
    release's (module docstring)."""
    hidden, channels = tensor_shape(sd, "x_embedder.weight", 2, where, "FLUX.2")
    _, text = tensor_shape(sd, "context_embedder.weight", 2, where, "FLUX.2")
    _, sinusoid = tensor_shape(sd, "time_guidance_embed.timestep_embedder.linear_1.weight", 2, where, "FLUX.2")
    out_channels = tensor_shape(sd, "proj_out.weight", 2, where, "FLUX.2")[0]
    doubles, singles = _count(sd, "transformer_blocks."), _count(sd, "single_transformer_blocks.")
    if doubles < 0 or singles < 0 or doubles + singles == 0:
        raise WeightsError(f"{where}: not a FLUX.2 transformer (its blocks are not numbered 0, 1, ...)")
    first = "transformer_blocks.0." if doubles else "single_transformer_blocks.0."
    head = tensor_shape(sd, first + "attn.norm_q.weight", 1, where, "FLUX.2")[0]
    if head != RELEASE_HEAD:
        raise WeightsError(
            f"{where}: {head}-wide heads: a single file's RoPE axes are read for FLUX.2's {RELEASE_HEAD}-wide heads "
            "only (use a diffusers folder with its config.json)"
        )
    if hidden <= 0 or hidden % head:
        raise WeightsError(f"{where}: not a FLUX.2 transformer (width {hidden} is not a positive multiple of {head})")
    if doubles:
        mlp = tensor_shape(sd, "transformer_blocks.0.ff.linear_in.weight", 2, where, "FLUX.2")[0] // 2
    else:
        mlp = (tensor_shape(sd, first + "attn.to_qkv_mlp_proj.weight", 2, where, "FLUX.2")[0] - 3 * hidden) // 2
    try:
        return Flux2Config(
            in_channels=channels,
            out_channels=None if out_channels == channels else out_channels,
            num_layers=doubles,
            num_single_layers=singles,
            attention_head_dim=head,
            num_attention_heads=hidden // head,
            joint_attention_dim=text,
            timestep_guidance_channels=sinusoid,
            mlp_ratio=mlp / hidden,
            guidance_embeds="time_guidance_embed.guidance_embedder.linear_1.weight" in sd,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def flux2_from_state(
    sd: Mapping[str, Any],
    where: str = "<state dict>",
    *,
    config: Flux2Config | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Flux2Transformer:
    """A :class:`Flux2Transformer` from a state dict in diffusers' or BFL's names (strict: one line naming the first
    difference); the config from the shapes unless given."""
    stored = next((v.dtype for v in sd.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if any(k.endswith(COMFY_QUANT) for k in sd):
        sd = dequantize_comfy(sd, where, compute_dtype(stored, dtype))
    ours = bfl_to_diffusers(sd, where) if is_bfl_flux2(sd) else dict(sd)
    if config is None:
        config = config_from_shapes(ours, where)
    return build_from_state(Flux2Transformer, config, ours, f"{where}: FLUX.2 transformer", device, dtype, stored)


COMFY_QUANT = ".comfy_quant"  # ComfyUI's mixed-precision files: one JSON (uint8 tensor) per quantized Linear
COMFY_FLOAT8 = ("float8_e4m3fn", "float8_e5m2")  # the formats read: float8 weights with one scale each


def dequantize_comfy(sd: Mapping[str, Any], where: str, target: torch.dtype) -> dict[str, Any]:
    """ComfyUI's mixed-precision layout (``flux2_dev_fp8mixed.safetensors``: ``<layer>.comfy_quant`` JSON naming the
    format, the float8 ``<layer>.weight`` with its ``<layer>.weight_scale``, an ``<layer>.input_scale`` for fp8
    matmuls) -> plain weights float(weight) x scale in ``target``, one tensor at a time; the other layers as they
    are. A format other than float8, or a quantized layer without its scale, is one line."""
    import json

    out = dict(sd)
    for k in [k for k in sd if k.endswith(COMFY_QUANT)]:
        layer = k[: -len(COMFY_QUANT)]
        raw = out.pop(k)
        try:
            spec = json.loads(bytes(raw.to(torch.uint8).flatten().tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError, AttributeError, TypeError):
            raise WeightsError(f"{where}: {k} is not ComfyUI's quantization JSON") from None
        fmt = spec.get("format") if isinstance(spec, dict) else None
        if fmt not in COMFY_FLOAT8:
            raise WeightsError(
                f"{where}: {k} says format {fmt!r}: ComfyUI's quantized weights are read in float8 only "
                f"({', '.join(COMFY_FLOAT8)})"
            )
        weight, scale = out.get(layer + ".weight"), out.pop(layer + ".weight_scale", None)
        out.pop(layer + ".input_scale", None)
        if not isinstance(weight, torch.Tensor) or not isinstance(scale, torch.Tensor):
            raise WeightsError(f"{where}: {layer} is quantized ({fmt}) without its weight and weight_scale")
        if not weight.is_floating_point() or weight.ndim == 0:
            raise WeightsError(
                f"{where}: {layer}.weight is {weight.dtype} {tuple(weight.shape)}, not a quantized ({fmt}) matrix"
            )
        factor = checked_scale(scale, f"{layer}.weight_scale", weight, where, WeightsError)
        rows = (weight.shape[0], *([1] * (weight.ndim - 1)))
        factor = factor.reshape(()) if factor.numel() == 1 else factor.reshape(rows)
        out[layer + ".weight"] = (weight.float() * factor).to(target)
    return out


def load_flux2_transformer(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Flux2Transformer:
    """The FLUX.2 transformer of a diffusers folder (a pipeline folder or its ``transformer/``) or a single file
    (BFL's / ComfyUI's, or diffusers' names) on ``device`` in ``dtype`` (default: the files'; bfloat16 for
    float8)."""
    model: Flux2Transformer = load_transformer(
        path,
        what="FLUX.2",
        from_diffusers=Flux2Config.from_diffusers,
        from_state=flux2_from_state,
        device=device,
        dtype=dtype,
    )
    return model


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WeightsError(f"{path}: cannot read the config ({type(e).__name__})") from None
    if not isinstance(raw, dict):
        raise WeightsError(f"{path}: not a JSON object")
    return raw


BN = "bn."  # the batch norm's statistics (running mean / variance, the step counter)
_VAE_PREFIXES = ("vae.", "first_stage_model.")  # a VAE saved inside a bigger file


def vae_to_diffusers(sd: Mapping[str, Any], where: str = "<state dict>") -> dict[str, Any]:
    """A FLUX.2 VAE state dict in BFL's / ComfyUI's LDM names (the quant convolutions inside the encoder / decoder
    or at the top) or diffusers' -> diffusers' ``AutoencoderKLFlux2`` names (module docstring)."""
    from . import keymaps as km
    from .detect import vae_layout_from_ldm

    prefix = next((p for p in _VAE_PREFIXES if any(k.startswith(p) for k in sd)), "")
    sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    stats = {k: v for k, v in sd.items() if k.startswith(BN)}
    rest = {}
    for k, v in sd.items():
        if k.startswith(BN):
            continue
        for old, new in (("encoder.quant_conv.", "quant_conv."), ("decoder.post_quant_conv.", "post_quant_conv.")):
            if k.startswith(old):
                k = new + k[len(old) :]
        rest[k] = v
    if "encoder.down.0.block.0.conv1.weight" in rest:
        rest, unknown = km.vae_ldm_to_diffusers(rest, vae_layout_from_ldm(rest))
        if unknown:
            raise WeightsError(f"{where}: not a FLUX.2 VAE tensor: {sorted(unknown)[0]}")
    elif "encoder.down_blocks.0.resnets.0.conv1.weight" not in rest:
        raise WeightsError(f"{where}: not a VAE (no encoder.down.* or encoder.down_blocks.* weights)")
    if "bn.running_mean" not in stats or "bn.running_var" not in stats:
        raise WeightsError(
            f"{where}: no bn.running_mean / bn.running_var: not a FLUX.2 VAE (FLUX.1's ae.safetensors has none)"
        )
    return {**rest, **stats}


def vae_config_from_shapes(sd: Mapping[str, Any], where: str = "<state dict>") -> Flux2VAEConfig:
    """The architecture a FLUX.2 VAE state dict (diffusers' names) describes: the encoder's and the decoder's widths,
    the layers per level, the latent channels, the quant convolutions and the middle attention; the release's 32
    GroupNorm groups and batch-norm eps (module docstring)."""

    def shape(key: str, ndim: int) -> tuple[int, ...]:
        return tensor_shape(sd, key, ndim, where, "FLUX.2 VAE")

    levels = _count(sd, "encoder.down_blocks.")
    if levels <= 0 or _count(sd, "decoder.up_blocks.") != levels:
        raise WeightsError(f"{where}: not a FLUX.2 VAE (its encoder and decoder levels do not fit)")
    layers = _count(sd, "encoder.down_blocks.0.resnets.")
    widths = [shape(f"encoder.down_blocks.{i}.resnets.0.conv1.weight", 4)[0] for i in range(levels)]
    decoder = [shape(f"decoder.up_blocks.{levels - 1 - i}.resnets.0.conv2.weight", 4)[0] for i in range(levels)]
    try:
        return Flux2VAEConfig(
            in_channels=shape("encoder.conv_in.weight", 4)[1],
            out_channels=shape("decoder.conv_out.weight", 4)[0],
            block_out_channels=tuple(widths),
            decoder_block_out_channels=tuple(decoder) if decoder != widths else None,
            layers_per_block=layers,
            latent_channels=shape("decoder.conv_in.weight", 4)[1],
            use_quant_conv="quant_conv.weight" in sd,
            use_post_quant_conv="post_quant_conv.weight" in sd,
            mid_block_add_attention="encoder.mid_block.attentions.0.to_q.weight" in sd,
        )
    except ConfigError as e:
        raise WeightsError(f"{where}: {e}") from None


def load_flux2_vae(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None
) -> Flux2VAE:
    """The FLUX.2 VAE of a diffusers folder (a pipeline folder's ``vae/`` or the ``vae/`` folder itself) or a single
    file (ComfyUI's ``flux2-vae.safetensors``, module docstring) on ``device`` in ``dtype`` (default: the files');
    the batch norm's statistics come with it."""
    from .io import load_file

    p = Path(path)
    if p.is_dir():
        folder = next((f for f in (p / "vae", p) if (f / "config.json").is_file()), None)
        if folder is None:
            raise WeightsError(f"{p}: not a FLUX.2 VAE folder (no vae/config.json or config.json)")
        try:
            config = Flux2VAEConfig.from_diffusers(_read_json(folder / "config.json"))
        except ConfigError as e:
            raise WeightsError(f"{folder / 'config.json'}: {e}") from None
        files = component_weight_files(folder)
        target = compute_dtype(stored_dtype(files[0]), parse_dtype(dtype))
        sd = read_shards(files, target)
        where = str(folder)
    else:
        if not p.is_file():
            raise WeightsError(f"{p}: no such FLUX.2 VAE file or folder")
        target = compute_dtype(stored_dtype(p), parse_dtype(dtype))
        sd = vae_to_diffusers(load_file(p)[0], str(p))
        config = vae_config_from_shapes(sd, str(p))
        where = str(p)
    with parameters_on_meta():
        model = Flux2VAE(config)
    own = model.state_dict()
    if "bn.num_batches_tracked" in own and "bn.num_batches_tracked" not in sd:  # (unused in eval mode)
        sd["bn.num_batches_tracked"] = torch.zeros((), dtype=torch.long)
    check_keys(own, sd, name=f"{where}: FLUX.2 VAE")
    dev = torch.device(device)
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise WeightsError(f"{where}: {k} is not a tensor")
        if not v.is_floating_point() and k != "bn.num_batches_tracked":
            raise WeightsError(f"{where}: {k} holds {v.dtype}, not floating-point weights")
    model.load_state_dict(
        {k: v.to(device=dev, dtype=target) if v.is_floating_point() else v.to(dev) for k, v in sd.items()},
        strict=True,
        assign=True,
    )
    model.name = p.name
    return model.eval().requires_grad_(False)


__all__ = [
    "MARKER",
    "RELEASE_HEAD",
    "bfl_to_diffusers",
    "config_from_shapes",
    "flux2_from_state",
    "is_bfl_flux2",
    "load_flux2_transformer",
    "load_flux2_vae",
    "vae_config_from_shapes",
    "vae_to_diffusers",
]
