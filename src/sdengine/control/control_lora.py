"""Control-LoRA files (Stability AI's ``control-lora-{canny,depth,recolor,sketch}-rank{128,256}.safetensors``): a
ControlNet stored as the changes to the base model's U-Net.

The file names the ControlNet's layers as the original ControlNet files do (``input_blocks.1.0.in_layers.2``,
``middle_block.1.proj_in``, ``label_emb.0.0``, ``input_hint_block.0``, ``zero_convs.0.0``, ``middle_block_out.0``)
and marks itself with a ``lora_controlnet`` entry. It holds two kinds of tensors:

* full tensors (``<layer>.weight`` / ``.bias``): the hint encoder, the zero convolutions, the norms and biases it
  retrained; they replace the base's;
* low-rank pairs (``<layer>.up``, ``<layer>.down``): the layer's weight is the base U-Net's plus
  ``up.flatten(1) @ down.flatten(1)`` reshaped to the weight's shape (no alpha, no scale).

Every other encoder weight is the base U-Net's. This is how ComfyUI's ``ControlLora`` (``comfy/controlnet.py``)
builds it: a ControlNet of the base U-Net's architecture, the base weights set first, the file's on top, the
products added where a layer has them. So a Control-LoRA is only usable with a base model: the pipeline hands
its U-Net over.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from sdengine.control.files import LoadedControlNet, controlnet_layout, hint_channels_of
from sdengine.errors import ControlNetError
from sdengine.models.controlnet import ControlNet, ControlNetConfig
from sdengine.models.unet import UNetConfig
from sdengine.weights import controlnet_keys as ck

MARKER = "lora_controlnet"


def is_control_lora(sd: Mapping[str, Tensor]) -> bool:
    """Whether a state dict is a Control-LoRA (the ``lora_controlnet`` entry, as ComfyUI tells it)."""
    return MARKER in sd or f"{ck.CONTROL_PREFIX}{MARKER}" in sd


def base_weights_of(unet: torch.nn.Module) -> dict[str, Tensor]:
    """The U-Net's weights by diffusers' names (a compiled module's ``_orig_mod.`` prefix dropped)."""
    return {k.replace("_orig_mod.", ""): v for k, v in unet.state_dict().items()}


def controlnet_from_control_lora(
    sd: Mapping[str, Tensor], path: Path, base: UNetConfig | None, base_weights: Mapping[str, Tensor] | None
) -> LoadedControlNet:
    """The ControlNet a Control-LoRA describes on the base U-Net (``base`` config, ``base_weights`` by diffusers'
    names): its state dict in diffusers' names, in the base weights' dtype and on their device."""
    if base is None or base_weights is None:
        raise ControlNetError(
            f"{path}: a Control-LoRA holds only its changes to a base model's U-Net: use it with the model it was "
            "made for (in a pipeline, or load_control_model(..., base_unet=unet))"
        )
    sd = {k: v for k, v in ck.strip_prefix(sd).items() if k != MARKER}
    if "input_hint_block.0.weight" not in sd:
        raise ControlNetError(f"{path}: a Control-LoRA without its hint encoder (no input_hint_block.0.weight)")
    try:
        cond_ch, hint = hint_channels_of(sd)
    except (KeyError, IndexError) as e:
        raise ControlNetError(f"{path}: cannot read the Control-LoRA's hint encoder ({e})") from None
    cfg = ControlNetConfig.from_unet(base, conditioning_channels=cond_ch, conditioning_embedding_out_channels=hint)
    renamed, unknown = ck.controlnet_original_to_diffusers(
        sd, controlnet_layout(cfg), len(hint), sdxl=bool(base.text_time)
    )
    if unknown:
        raise ControlNetError(f"{path}: unexpected Control-LoRA keys: {', '.join(unknown[:5])} ({len(unknown)} in all)")
    from sdengine.weights.loading import parameters_on_meta

    with parameters_on_meta():
        wanted = {k: tuple(v.shape) for k, v in ControlNet(cfg).state_dict().items()}
    ref = next(iter(base_weights.values()))
    dtype, device = ref.dtype, ref.device
    out: dict[str, Tensor] = {}
    for k in wanted:
        if k in renamed:
            out[k] = renamed[k].to(device=device, dtype=dtype)
        elif k in base_weights:
            out[k] = base_weights[k]
    pairs = sorted({k.rpartition(".")[0] for k in renamed if k.endswith((".up", ".down"))})
    for layer in pairs:
        up, down, key = renamed.get(f"{layer}.up"), renamed.get(f"{layer}.down"), f"{layer}.weight"
        if up is None or down is None:
            raise ControlNetError(f"{path}: Control-LoRA layer {layer} has only one of its up/down pair")
        if key not in out:
            raise ControlNetError(f"{path}: Control-LoRA changes {layer}, which this model's ControlNet has not")
        w = out[key]
        try:
            delta = (up.to(device).float().flatten(1) @ down.to(device).float().flatten(1)).reshape(w.shape)
        except RuntimeError:
            raise ControlNetError(
                f"{path}: Control-LoRA layer {layer}: up {tuple(up.shape)} x down {tuple(down.shape)} does not give "
                f"the model's {tuple(w.shape)} (a Control-LoRA for another base model?)"
            ) from None
        out[key] = (w.float() + delta).to(dtype)
    extra = sorted(k for k in renamed if k not in wanted and not k.endswith((".up", ".down")))
    if extra:
        raise ControlNetError(f"{path}: unexpected Control-LoRA keys: {', '.join(extra[:5])} ({len(extra)} in all)")
    return LoadedControlNet(out, cfg, path, "control-lora")


__all__ = ["MARKER", "base_weights_of", "controlnet_from_control_lora", "is_control_lora"]
