"""SD3, Flux and Qwen-Image ControlNet files (:mod:`sdengine.models.dit_controlnet`,
:mod:`sdengine.models.qwen_controlnet`): a diffusers folder (``config.json`` of an ``SD3ControlNetModel`` /
``FluxControlNetModel`` / ``QwenImageControlNetModel`` + ``diffusion_pytorch_model[.fp16].safetensors``), or one
``.safetensors`` file in diffusers' names (as InstantX ships some, and ComfyUI's repackaged InstantX Qwen-Image
ControlNets), whose config is read from the tensors' shapes. Other layouts (XLabs' Flux ControlNets, BFL-named
files, U-Net ControlNets, DiffSynth's Qwen-Image Blockwise ControlNets / ComfyUI's "model patches") are refused in
one line.

What shapes cannot tell, a single file takes from the releases: an SD3 ControlNet without RMS q/k norms has
64-wide heads (every SD3 / SD3.5 release), its pooled text is zeros when it has a text stream (InstantX's) and
the real pooled text when not (Stability's SD3.5 ones), its control latent has the latent's channels where it
borrows the base model's patch embedding; a Flux ControlNet's heads are 128 wide with RoPE axes 16, 56, 56
(Flux.1's); a Qwen-Image ControlNet's heads are 128 wide with RoPE axes 16, 56, 56 (Qwen-Image's). A folder's
``config.json`` says all of it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sdengine.errors import ControlNetError, SdengineError
from sdengine.models.config_checks import ConfigError
from sdengine.models.dit_controlnet import FluxControlNet, FluxControlNetConfig, SD3ControlNet, SD3ControlNetConfig
from sdengine.models.qwen_controlnet import QwenImageControlNet, QwenImageControlNetConfig
from sdengine.models.z_image_controlnet import ZImageControlNet, ZImageControlNetConfig
from sdengine.weights.io import WeightsError, load_file

DiTControlNet = SD3ControlNet | FluxControlNet | QwenImageControlNet | ZImageControlNet
WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
CLASSES = ("SD3ControlNetModel", "FluxControlNetModel", "QwenImageControlNetModel", "ZImageControlNetModel")
KINDS = {
    "SD3ControlNetModel": "sd3",
    "FluxControlNetModel": "flux",
    "QwenImageControlNetModel": "qwen_image",
    "ZImageControlNetModel": "z_image",
}
LABELS = {"sd3": "SD3", "flux": "Flux", "qwen_image": "Qwen-Image", "z_image": "Z-Image"}
# alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union releases by their number of control blocks: the main layers they
# steer (VideoX-Fun's configs, diffusers' hlky/Z-Image-Turbo-Fun-Controlnet-Union[-2.0|-2.1] config.json)
Z_IMAGE_PLACES = {6: (0, 5, 10, 15, 20, 25), 15: tuple(range(0, 30, 2))}
Z_IMAGE_EMBEDDER = "control_all_x_embedder.2-1.weight"


def _count(sd: Mapping[str, Tensor], prefix: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def dit_controlnet_kind(sd: Mapping[str, Tensor]) -> str | None:
    """ "sd3", "flux", "qwen_image" or "z_image" for a state dict in diffusers' names of that ControlNet, else
    None."""
    if Z_IMAGE_EMBEDDER in sd and any(k.startswith("control_layers.") for k in sd):
        return "z_image"
    if {"img_in.weight", "txt_norm.weight", "controlnet_x_embedder.weight"} <= set(sd) and any(
        k.startswith("controlnet_blocks.") for k in sd
    ):
        return "qwen_image"
    if "pos_embed_input.proj.weight" in sd and any(k.startswith("controlnet_blocks.") for k in sd):
        return "sd3"
    if "controlnet_x_embedder.weight" in sd and any(k.startswith("controlnet_blocks.") for k in sd):
        return "flux"
    return None


def sd3_config_from_weights(sd: Mapping[str, Tensor]) -> SD3ControlNetConfig:
    """An SD3 ControlNet's config from its tensors' shapes (see the module docstring for what is assumed)."""
    w_in = sd["pos_embed_input.proj.weight"]  # (D, C + extra, p, p)
    dim, cond_ch, patch = int(w_in.shape[0]), int(w_in.shape[1]), int(w_in.shape[2])
    proj = sd.get("pos_embed.proj.weight")
    table = sd.get("pos_embed.pos_embed")
    in_ch = int(proj.shape[1]) if proj is not None else cond_ch
    norm_q = sd.get("transformer_blocks.0.attn.norm_q.weight")
    head = int(norm_q.shape[0]) if norm_q is not None else 64
    if dim % head:
        raise ControlNetError(f"an SD3 ControlNet of width {dim} does not split into {head}-wide heads")
    ctx = sd.get("context_embedder.weight")
    n = _count(sd, "controlnet_blocks")
    dual = tuple(i for i in range(n) if f"transformer_blocks.{i}.attn2.to_q.weight" in sd)
    values: dict[str, Any] = dict(
        patch_size=patch,
        in_channels=in_ch,
        out_channels=in_ch,
        num_layers=n,
        attention_head_dim=head,
        num_attention_heads=dim // head,
        joint_attention_dim=int(ctx.shape[1]) if ctx is not None else None,
        caption_projection_dim=dim,
        pooled_projection_dim=int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        extra_conditioning_channels=cond_ch - in_ch,
        dual_attention_layers=dual,
        qk_norm="rms_norm" if norm_q is not None else None,
        pos_embed_type="sincos" if table is not None else None,
        use_pos_embed=proj is not None,
        force_zeros_for_pooled_projection=ctx is not None,
    )
    if table is not None:
        side = math.isqrt(int(table.shape[1]))
        if side * side != int(table.shape[1]):
            raise ControlNetError(f"an SD3 ControlNet's position table of {table.shape[1]} entries is not a square")
        values["pos_embed_max_size"] = side
    return SD3ControlNetConfig(**values)


def flux_config_from_weights(sd: Mapping[str, Tensor]) -> FluxControlNetConfig:
    """A Flux ControlNet's config from its tensors' shapes (128-wide heads, Flux.1's RoPE axes)."""
    dim, in_ch = (int(s) for s in sd["x_embedder.weight"].shape)
    head = int(sd["transformer_blocks.0.attn.norm_q.weight"].shape[0]) if _count(sd, "transformer_blocks") else 128
    if head != 128:
        raise ControlNetError(
            f"a single-file Flux ControlNet with {head}-wide heads: its RoPE axes are not Flux.1's; give the "
            "diffusers folder with its config.json"
        )
    mode = sd.get("controlnet_mode_embedder.weight")
    return FluxControlNetConfig(
        in_channels=in_ch,
        num_layers=_count(sd, "controlnet_blocks"),
        num_single_layers=_count(sd, "controlnet_single_blocks"),
        attention_head_dim=head,
        num_attention_heads=dim // head,
        joint_attention_dim=int(sd["context_embedder.weight"].shape[1]),
        pooled_projection_dim=int(sd["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in sd),
        num_mode=int(mode.shape[0]) if mode is not None else None,
    )


def qwen_config_from_weights(sd: Mapping[str, Tensor]) -> QwenImageControlNetConfig:
    """A Qwen-Image ControlNet's config from its tensors' shapes (128-wide heads, Qwen-Image's RoPE axes)."""
    dim, in_ch = (int(s) for s in sd["img_in.weight"].shape)
    cond_ch = int(sd["controlnet_x_embedder.weight"].shape[1])
    norm_q = sd.get("transformer_blocks.0.attn.norm_q.weight")
    head = int(norm_q.shape[0]) if norm_q is not None else 128
    if head != 128:
        raise ControlNetError(
            f"a single-file Qwen-Image ControlNet with {head}-wide heads: its RoPE axes are not Qwen-Image's; give "
            "the diffusers folder with its config.json"
        )
    if dim % head:
        raise ControlNetError(f"a Qwen-Image ControlNet of width {dim} does not split into {head}-wide heads")
    return QwenImageControlNetConfig(
        in_channels=in_ch,
        out_channels=in_ch // 4,
        num_layers=_count(sd, "controlnet_blocks"),
        attention_head_dim=head,
        num_attention_heads=dim // head,
        joint_attention_dim=int(sd["txt_in.weight"].shape[1]),
        extra_condition_channels=cond_ch - in_ch,
    )


def z_image_config_from_weights(sd: Mapping[str, Tensor]) -> tuple[ZImageControlNetConfig, dict[str, Tensor]]:
    """A Z-Image ControlNet single file (VideoX-Fun's Union 1.0 / 2.0 / 2.1, diffusers' names) -> its config and the
    tensors it loads, as diffusers' single-file loader tells the releases apart: 15 control blocks are 2.x (refiner
    hints into refiner blocks 0 and 1, 33 input channels); a ``control_noise_refiner.0.before_proj`` that is absent or
    all zeros is 2.0 (its control blocks refine the control tokens: the ``control_noise_refiner`` tensors are not
    used), otherwise 2.1; 6 control blocks are 1.0. Other counts are refused (their places are not in the file)."""
    embedder = sd[Z_IMAGE_EMBEDDER]
    if embedder.ndim != 2:
        raise ControlNetError(f"{Z_IMAGE_EMBEDDER} should be 2-d, it is {tuple(embedder.shape)}")
    dim, width = (int(s) for s in embedder.shape)
    if width % 4:
        raise ControlNetError(f"a Z-Image ControlNet's control embedder reads {width} numbers: not 2x2 patches")
    count = _count(sd, "control_layers")
    places = Z_IMAGE_PLACES.get(count)
    if places is None:
        raise ControlNetError(
            f"a Z-Image ControlNet file with {count} control blocks: which main layers they steer is not in the file "
            "(known: 6, Union 1.0; 15, Union 2.0 / 2.1); give a diffusers folder with its config.json"
        )
    norm_q = sd.get("control_layers.0.attention.norm_q.weight")
    if norm_q is not None and norm_q.ndim != 1:
        raise ControlNetError(f"control_layers.0.attention.norm_q.weight should be 1-d, it is {tuple(norm_q.shape)}")
    head = int(norm_q.shape[0]) if norm_q is not None else 128
    if head <= 0 or dim <= 0 or dim % head:
        raise ControlNetError(f"a Z-Image ControlNet of width {dim} does not split into {head}-wide heads")
    refiners = _count(sd, "control_noise_refiner") or 2
    kind: str | None = None
    refiner_places: tuple[int, ...] | None = None
    tensors = dict(sd)
    if count == 15:
        refiner_places = (0, 1)
        before = sd.get("control_noise_refiner.0.before_proj.weight")
        refines = before is not None and not bool((before == 0).all())
        kind = "control_noise_refiner" if refines else "control_layers"
        if kind == "control_layers":
            tensors = {k: v for k, v in sd.items() if not k.startswith("control_noise_refiner.")}
    config = ZImageControlNetConfig(
        control_layers_places=places,
        control_refiner_layers_places=refiner_places,
        control_in_dim=width // 4,
        add_control_noise_refiner=kind,
        dim=dim,
        n_refiner_layers=refiners,
        n_heads=dim // head,
        n_kv_heads=dim // head,
        qk_norm=norm_q is not None,
    )
    return config, tensors


def _build(kind: str, config: Any, sd: Mapping[str, Tensor], name: str, where: str) -> DiTControlNet:
    """The ControlNet ``name`` (its display name) of ``sd``; ``where`` (the file or folder name) in its errors."""
    net: DiTControlNet
    with torch.device("meta"):
        if kind == "z_image":
            net = ZImageControlNet(config)
        elif kind == "qwen_image":
            net = QwenImageControlNet(config)
        else:
            net = SD3ControlNet(config) if kind == "sd3" else FluxControlNet(config)
    own = net.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (" ..." if len(missing) > 3 else ""))
        if extra:
            parts.append(f"unexpected {', '.join(extra[:3])}" + (" ..." if len(extra) > 3 else ""))
        raise ControlNetError(f"{where}: not a {LABELS[kind]} ControlNet of its config ({'; '.join(parts)})")
    for k, v in sd.items():  # (load_state_dict would raise a multi-line RuntimeError for these)
        if not isinstance(v, Tensor) or not v.is_floating_point():
            have = v.dtype if isinstance(v, Tensor) else type(v).__name__
            raise ControlNetError(f"{where}: {k} holds {have}, not floating-point weights")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ControlNetError(
                f"{where}: {k} is {tuple(v.shape)}, a {LABELS[kind]} ControlNet of its config needs "
                f"{tuple(own[k].shape)}"
            )
    net.load_state_dict(dict(sd), strict=True, assign=True)
    for mod_name, buf in list(net.named_buffers()):
        if buf.is_meta:
            raise ControlNetError(f"{where}: no weights for {mod_name}")
    net.name = name
    return net.eval().requires_grad_(False)


def _refuse_layout(sd: Mapping[str, Tensor], name: str) -> ControlNetError:
    keys = list(sd)
    if any(k.startswith(("controlnet_down_blocks.", "control_model.", "input_blocks.", "down_blocks.")) for k in keys):
        return ControlNetError(
            f"{name} is a U-Net ControlNet (SD 1.x / 2.x / SDXL); SD3, Flux and Qwen-Image take their own "
            "ControlNets (diffusers' SD3ControlNetModel / FluxControlNetModel / QwenImageControlNetModel)"
        )
    if any(k.startswith("controlnet_blocks.") and (".x_rms." in k or ".input_proj." in k) for k in keys):
        return ControlNetError(
            f"{name}: DiffSynth's Qwen-Image Blockwise ControlNet (a ComfyUI model patch) is not supported; use "
            "InstantX's Qwen-Image ControlNets (diffusers' QwenImageControlNetModel)"
        )
    if any(k.startswith(("double_blocks.", "single_blocks.", "input_hint_block.")) for k in keys):
        return ControlNetError(
            f"{name}: a Flux ControlNet in XLabs' / BFL's layout is not supported; use one in diffusers' names "
            "(InstantX, Shakker-Labs)"
        )
    return ControlNetError(f"{name}: not an SD3, Flux, Qwen-Image or Z-Image ControlNet in diffusers' names")


def read_dit_controlnet(path: str | Path) -> DiTControlNet:
    """An SD3, Flux or Qwen-Image ControlNet from a diffusers folder or a single ``.safetensors`` file (float32
    weights as stored; the pipeline moves it to its device and dtype)."""
    p = Path(path)
    if not p.exists():
        raise ControlNetError(f"ControlNet {p}: no such file or folder")
    name = p.name.removesuffix(p.suffix) if p.is_file() else p.name
    try:
        if p.is_dir():
            cfg_file = p / "config.json"
            if not cfg_file.is_file():
                raise ControlNetError(f"ControlNet folder {p.name} has no config.json")
            try:
                raw = json.loads(cfg_file.read_text())
            except (OSError, ValueError) as e:
                raise ControlNetError(f"ControlNet folder {p.name}: config.json is not JSON ({e})") from None
            cls = raw.get("_class_name") if isinstance(raw, dict) else None
            if cls not in CLASSES:
                raise ControlNetError(
                    f"ControlNet folder {p.name} holds a {cls or 'model without _class_name'}, not an "
                    f"SD3ControlNetModel, FluxControlNetModel, QwenImageControlNetModel or ZImageControlNetModel"
                )
            weights = next((p / w for w in WEIGHT_NAMES if (p / w).is_file()), None)
            if weights is None:
                raise ControlNetError(f"ControlNet folder {p.name} has no {WEIGHT_NAMES[0]}")
            sd, _ = load_file(weights)
            kind = KINDS[cls]
            reader: Any = {
                "sd3": SD3ControlNetConfig,
                "flux": FluxControlNetConfig,
                "qwen_image": QwenImageControlNetConfig,
                "z_image": ZImageControlNetConfig,
            }[kind]
            config: Any = reader.from_diffusers(raw)
            return _build(kind, config, sd, name, f"ControlNet {p.name}")
        if p.suffix.lower() != ".safetensors":
            raise ControlNetError(
                f"ControlNet {p.name}: an SD3 / Flux / Qwen-Image / Z-Image ControlNet file must be .safetensors"
            )
        sd, _ = load_file(p)
        found = dit_controlnet_kind(sd)
        if found is None:
            raise _refuse_layout(sd, p.name)
        try:
            if found == "z_image":
                config, sd = z_image_config_from_weights(sd)
            elif found == "qwen_image":
                config = qwen_config_from_weights(sd)
            else:
                config = sd3_config_from_weights(sd) if found == "sd3" else flux_config_from_weights(sd)
        except SdengineError:
            raise
        except KeyError as e:  # a tensor the shapes are read from is missing
            raise ControlNetError(
                f"ControlNet {p.name}: no {e.args[0]} (incomplete {LABELS[found]} ControlNet)"
            ) from None
        except (IndexError, ValueError, ZeroDivisionError):  # a tensor of another rank, an empty one
            raise ControlNetError(
                f"ControlNet {p.name}: its tensors' shapes do not describe a {LABELS[found]} ControlNet"
            ) from None
        return _build(found, config, sd, name, f"ControlNet {p.name}")
    except (ConfigError, WeightsError) as e:
        raise ControlNetError(f"ControlNet {p.name}: {e}") from None
    except ControlNetError as e:  # (what the shapes say is wrong, told without the file's name)
        if p.name in str(e):
            raise
        raise ControlNetError(f"ControlNet {p.name}: {e}") from None


def is_sd3_inpainting_controlnet(path: str | Path) -> bool:
    """Whether ``path`` holds an inpainting ControlNet whose unit takes a mask: SD3's (``extra_conditioning_channels``
    1) or Qwen-Image's (``extra_condition_channels`` 4), read from a folder's ``config.json`` or a single file's
    header (no tensor loaded). False for anything else, unreadable files included (their load says what is
    wrong)."""
    from sdengine.weights.io import read_safetensors_header

    p = Path(path)
    try:
        if p.is_dir():
            raw = json.loads((p / "config.json").read_text())
            if not isinstance(raw, dict):
                return False
            if raw.get("_class_name") == "QwenImageControlNetModel":
                return raw.get("extra_condition_channels") == 4
            return raw.get("_class_name") == "SD3ControlNetModel" and raw.get("extra_conditioning_channels") == 1
        if p.suffix.lower() != ".safetensors":
            return False
        entries, _, _ = read_safetensors_header(p)
    except (OSError, ValueError, WeightsError):
        return False

    def shape(key: str) -> list[Any]:
        entry = entries.get(key)
        found = entry.get("shape") if isinstance(entry, dict) else None
        return found if isinstance(found, list) else []

    if "txt_norm.weight" in entries:  # Qwen-Image: the x embedder reads the mask's 4 numbers per patch more
        cond, img = shape("controlnet_x_embedder.weight"), shape("img_in.weight")
        return len(cond) == 2 and len(img) == 2 and cond[1] - img[1] == 4
    shape_in, proj = shape("pos_embed_input.proj.weight"), shape("pos_embed.proj.weight")
    return len(shape_in) == 4 and len(proj) == 4 and shape_in[1] - proj[1] == 1


__all__ = [
    "DiTControlNet",
    "is_sd3_inpainting_controlnet",
    "dit_controlnet_kind",
    "flux_config_from_weights",
    "qwen_config_from_weights",
    "read_dit_controlnet",
    "sd3_config_from_weights",
    "z_image_config_from_weights",
]
