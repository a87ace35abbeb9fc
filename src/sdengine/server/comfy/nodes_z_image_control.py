"""Z-Image's Fun ControlNet Union on sdengine's ComfyUI route: ComfyUI's ``ModelPatchLoader`` and
``ZImageFunControlnet`` (its ``comfy_extras/nodes_model_patch.py``: ``ModelPatchLoader``, ``ZImageControlPatch``,
``QwenImageDiffsynthControlnet.diffsynth_controlnet``; ``comfy/ldm/lumina/controlnet.py``'s ``ZImage_Control``;
``comfy/ldm/lumina/model.py``'s ``noise_refiner`` and ``double_block`` patch calls), on sdengine's
:class:`sdengine.models.z_image_controlnet.ZImageControlNet`.

**ModelPatchLoader** lists and reads the server's ControlNet folder (``--controlnets-dir``; ComfyUI reads
``models/model_patches/``: sdengine has no folder of that name, and the Z-Image Fun files are ControlNets, so they sit
with the other ControlNets). It takes alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union files (1.0, 2.0, 2.1, read as
:func:`sdengine.control.dit_files.read_dit_controlnet` reads them); ComfyUI's other model patches (Qwen-Image's
DiffSynth block-wise ControlNets, USO's style projector, MultiTalk) and any other ControlNet are refused in one line.

**ZImageFunControlnet** (model, model_patch, vae, strength; optional image, inpaint_image, mask) patches a Z-Image
MODEL (UNETLoader's file); ComfyUI's rules, each where it differs from diffusers' ``ZImageControlNetPipeline`` (the
Python pipeline's, :mod:`sdengine.pipeline.dit_control`):

* **The control tokens**: the control latent's real image positions only (no pad tokens), and the control blocks
  attend among them alone: ComfyUI's ``ZImage_Control`` never sees the caption (diffusers' control blocks run over
  ``[control tokens, caption]`` with the caption as their ``x``'s second part). The first control block's ``x`` is
  the transformer's refined image tokens (the main layers' input), its RoPE the image's.
* **Where the residuals go**: control block ``j``'s after main layer ``j * round(30 / blocks)`` (6 blocks: 0, 5, ..,
  25; 15: 0, 2, .., 28, as the releases' configs), on the image tokens only (diffusers adds them to the whole joint
  sequence, caption and pad tokens too).
* **2.x's refiner hints** go into the transformer's own noise refiner (ComfyUI's ``noise_refiner`` patch adds them
  to the image tokens after refiner blocks 0 and 1), so they change the image the main layers see; in diffusers they
  change only the ControlNet's view. 2.0 (its ``control_noise_refiner`` all zeros: ComfyUI's ``broken`` file, told
  here by :func:`~sdengine.control.dit_files.read_dit_controlnet`) runs control block 0 for refiner block 0 and
  control blocks 1 .. 14 for refiner block 1 (the first's output its residual), then the main stage from block 0
  again, as ComfyUI.
* **Strength** multiplies every residual (refiner and main); several ZImageFunControlnet nodes add up.
* **The control latent**, made at sampling time for the latent's size: ``image`` resized to it (``area``, centre
  crop: ComfyUI's ``common_upscale``) and encoded by the VAE (the posterior's mean), in Flux's latent format
  (``(z - 0.1159) * 0.3611``). A 2.x ControlNet (33 channels) reads ``[control latent, mask, inpaint latent]``:
  without ``inpaint_image`` a mid-grey picture is encoded (diffusers' pipeline reads zeros there), without ``mask``
  the mask channel is 0, with one the picture's masked pixels (mask 1: ComfyUI's mask is inverted, 1 = keep after
  it) are mid-grey and the mask channel is the kept part (nearest, at the latent's size); without ``image`` a
  mid-grey control image is encoded.

Not built (one line each): a control image batch of more than one picture, ``mask`` or ``inpaint_image`` on a
16-channel (1.0) ControlNet (ComfyUI ignores them there), no ``image`` and no ``inpaint_image``, a model that is not
a Z-Image transformer, ComfyUI's 3-block "lite" layout (not a release sdengine reads).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdengine.errors import SdengineError
from sdengine.server.comfy.nodes import Input, ModelHandle, NodeDef, NodeError, RunContext, controlnet_names

Z_IMAGE_LATENT = (0.3611, 0.1159)  # ComfyUI's Flux latent format (scale, shift), Z-Image's


@dataclass(frozen=True)
class ModelPatch:
    """ModelPatchLoader's output (MODEL_PATCH): a Z-Image Fun ControlNet file of the server's ControlNet folder."""

    path: str


@dataclass(frozen=True, eq=False)
class ZImageControl:
    """One ZImageFunControlnet node on a MODEL: the ControlNet file, the VAE handle and images (B, H, W, C) in
    [0, 1] (None: not given), the MASK (B, H, W) with 1 = repaint (ComfyUI's input, not yet inverted), strength."""

    path: str
    vae: Any
    image: torch.Tensor | None
    inpaint_image: torch.Tensor | None
    mask: torch.Tensor | None
    strength: float


def _read(ctx: RunContext, path: str, node: str) -> Any:
    from sdengine.control.dit_files import read_dit_controlnet
    from sdengine.models.z_image_controlnet import ZImageControlNet
    from sdengine.server.comfy.nodes_sd3_flux import cached_part

    name = Path(path).name
    try:
        net = cached_part(
            "controlnet", str(ctx.device), (str(Path(path).resolve()),), lambda: read_dit_controlnet(path)
        )
    except (OSError, SdengineError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise NodeError(f"{node}: {name} is not a Z-Image Fun ControlNet ({first})") from None
    if not isinstance(net, ZImageControlNet):
        raise NodeError(
            f"{node}: {name} is a {getattr(net, 'family', 'other')} ControlNet; ModelPatchLoader takes Z-Image Fun "
            "ControlNet Union files here (load other ControlNets with ControlNetLoader)"
        )
    return net


def model_patch_loader(ctx: RunContext, name: str) -> tuple[Any]:
    """ComfyUI's ModelPatchLoader on the server's ControlNet folder: a Z-Image Fun ControlNet file, checked now."""
    path = str(ctx.catalog.resolve_controlnet(name))
    _read(ctx, path, "ModelPatchLoader")
    return (ModelPatch(path),)


def _is_z_image(model: ModelHandle) -> bool:
    if not model.diffusion_model:
        return False
    from sdengine.pipeline.z_image_loading import is_z_image_file

    try:
        return bool(is_z_image_file(Path(model.diffusion_model)))
    except (OSError, SdengineError):
        return False


def _one_row(x: torch.Tensor | None, what: str) -> None:
    if x is not None and int(x.shape[0]) != 1:
        raise NodeError(f"ZImageFunControlnet: {what} is a batch of {int(x.shape[0])}; give one picture here")


def z_image_fun_controlnet(
    ctx: RunContext,
    model: ModelHandle,
    model_patch: Any,
    vae: Any,
    strength: float,
    image: torch.Tensor | None = None,
    inpaint_image: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> tuple[Any]:
    """ComfyUI's ZImageFunControlnet: the MODEL with a Z-Image Fun ControlNet (module docstring)."""
    if not isinstance(model_patch, ModelPatch):
        raise NodeError("ZImageFunControlnet: model_patch must come from ModelPatchLoader")
    if not _is_z_image(model):
        raise NodeError(
            "ZImageFunControlnet: the model is not a Z-Image transformer (UNETLoader's z_image_*.safetensors); the "
            "Z-Image Fun ControlNet steers Z-Image only"
        )
    net = _read(ctx, model_patch.path, "ZImageFunControlnet")
    name = Path(model_patch.path).name
    if image is None and inpaint_image is None:
        raise NodeError("ZImageFunControlnet: give it an image (or, for a 2.x ControlNet, an inpaint_image)")
    if not net.config.inpainting and (inpaint_image is not None or mask is not None):
        raise NodeError(
            f"ZImageFunControlnet: {name} reads no inpainting inputs (16 control channels, Union 1.0): leave "
            "inpaint_image and mask out"
        )
    if mask is not None and mask.ndim != 3:
        raise NodeError(f"ZImageFunControlnet: mask must be a MASK (B, H, W), got {tuple(mask.shape)}")
    _one_row(image, "image")
    _one_row(inpaint_image, "inpaint_image")
    _one_row(mask, "mask")

    def pick(x: torch.Tensor | None) -> torch.Tensor | None:
        return None if x is None else x[..., :3].float()

    entry = ZImageControl(
        model_patch.path, vae, pick(image), pick(inpaint_image), None if mask is None else mask.float(), float(strength)
    )
    return (replace(model, z_image_controls=(*model.z_image_controls, entry)),)


# ---------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(1, H, W, C) -> (1, 3, height, width): ComfyUI's common_upscale "area" with a centre crop."""
    from sdengine.server.comfy.nodes import resize_nchw

    x = image.movedim(-1, 1)
    if tuple(x.shape[-2:]) == (height, width):
        return x
    return resize_nchw(x, width, height, "area", "center")


def _mask_at(mask: torch.Tensor, height: int, width: int, mode: str) -> torch.Tensor:
    """(1, 1, h, w) mask resized by ComfyUI's common_upscale (centre crop, then ``mode``: bilinear or nearest)."""
    from sdengine.server.comfy.nodes import center_box

    x0, y0, x1, y1 = center_box(int(mask.shape[-1]), int(mask.shape[-2]), width, height)
    m = mask[:, :, y0:y1, x0:x1]
    if mode == "bilinear":
        return F.interpolate(m, size=(height, width), mode="bilinear", align_corners=False)
    return F.interpolate(m, size=(height, width), mode="nearest")


def control_latent(control: ZImageControl, net: Any, vae: Any, height: int, width: int) -> torch.Tensor:
    """ComfyUI's ``ZImageControlPatch.encode_latent_cond`` at the latent's ``height`` x ``width`` (module
    docstring): (1, 16 or 33, height, width) in float32."""
    from sdengine.vae_utils import encode_moments

    factor = int(vae.config.downscale_factor)
    H, W = height * factor, width * factor
    scale, shift = Z_IMAGE_LATENT
    p = next(vae.parameters())

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            mean = encode_moments(vae, pixels.to(device=p.device, dtype=p.dtype) * 2.0 - 1.0).mean.float()
        return (mean - shift) * scale

    latent = encode(_fit(control.image, H, W)) if control.image is not None else None
    if not net.config.inpainting:
        assert latent is not None
        return latent
    grey = torch.full((1, 3, H, W), 0.5)
    picture = _fit(control.inpaint_image, H, W) if control.inpaint_image is not None else grey
    keep: torch.Tensor | None = None
    if control.mask is not None:
        keep = 1.0 - control.mask.reshape(1, 1, *control.mask.shape[-2:])
        picture = (picture - 0.5) * _mask_at(keep, H, W, "bilinear").round() + 0.5
    masked = encode(picture)
    if keep is None:
        channel = torch.zeros_like(masked[:, :1])
    else:
        channel = _mask_at(keep, height, width, "nearest").to(masked.device)
    if latent is None:
        latent = encode(grey)
    return torch.cat([latent, channel, masked], dim=1)


class ComfyControlledZImage:
    """``model(x, t, text, text_mask)``: the Z-Image transformer with ZImageFunControlnet's patches by ComfyUI's
    rules (module docstring); ``patches``: (ZImageControlNet, control latent (1, C, h, w), strength) each."""

    takes_step = False

    def __init__(self, base: Any, patches: list[tuple[Any, torch.Tensor, float]]) -> None:
        self.base = base
        self.patches = patches

    def __getattr__(self, name: str) -> Any:
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, text: torch.Tensor, text_mask: Any = None) -> torch.Tensor:
        starts: list[torch.Tensor] = []

        def refiner(state: Any) -> dict[int, torch.Tensor]:
            total: dict[int, torch.Tensor] = {}
            for net, latent, strength in self.patches:
                c, hints = net.comfy_start(state, latent)
                starts.append(c)
                for i, h in hints.items():
                    h = _pad(h * strength, state.x.shape[1])
                    total[i] = total[i] + h if i in total else h
            return total

        def main(state: Any, refined: torch.Tensor) -> dict[int, torch.Tensor]:
            joint = refined.shape[1] + state.cap.shape[1]
            total: dict[int, torch.Tensor] = {}
            for (net, _, strength), c in zip(self.patches, starts, strict=True):
                for i, h in net.comfy_main(state, c, refined, len(self.base.layers)).items():
                    h = _pad(h * strength, joint)
                    total[i] = total[i] + h if i in total else h
            return total

        return self.base(x, t, text, text_mask, control=main, refiner_control=refiner)


def _pad(h: torch.Tensor, length: int) -> torch.Tensor:
    """A residual of the real image tokens (B, n, dim) with zeros for the positions after them."""
    return torch.cat([h, h.new_zeros(h.shape[0], length - h.shape[1], h.shape[2])], dim=1)


def controlled_flow(ctx: RunContext, model: ModelHandle, flow: Any, height: int, width: int) -> Any:
    """The FlowModel whose network is the Z-Image transformer with the MODEL's ZImageFunControlnet patches, their
    control latents made for a ``height`` x ``width`` latent."""
    from sdengine.pipeline.z_image import ZImageAdapter
    from sdengine.server.comfy.nodes_sd3_flux import device_dtype, hint_vae, transformer_of

    family, net = transformer_of(ctx, model)
    if family != "z_image":
        raise NodeError("ZImageFunControlnet's patch is on a model that is not Z-Image")
    dev, dtype = device_dtype(ctx)
    patches = []
    for control in model.z_image_controls:
        cn = _read(ctx, control.path, "ZImageFunControlnet")
        name = Path(control.path).name
        why = cn.check_fits(net)
        if why is not None:
            raise NodeError(f"ZImageFunControlnet: {name} does not fit this Z-Image model: {why}")
        vae = hint_vae(ctx, control.vae, name)
        latent = control_latent(control, cn, vae, height, width)
        if latent.shape[1] != cn.config.control_in_dim:
            raise NodeError(
                f"ZImageFunControlnet: {name} reads {cn.config.control_in_dim} control channels; this VAE's latent "
                f"gives {latent.shape[1]}"
            )
        cn = cn.to(device=dev, dtype=dtype)
        patches.append((cn, latent.to(device=dev, dtype=dtype), control.strength))
    return replace(flow, network=ZImageAdapter(ComfyControlledZImage(net, patches), dtype), skipping=None)


Z_IMAGE_CONTROL_NODES: dict[str, NodeDef] = {
    n.name: n
    for n in (
        NodeDef(
            "ModelPatchLoader",
            "ModelPatchLoader",
            "advanced/loaders",
            (Input("name", "COMBO", choices=controlnet_names),),
            ("MODEL_PATCH",),
            model_patch_loader,
            description="A Z-Image Fun ControlNet Union file (alibaba-pai's 1.0 / 2.0 / 2.1) from the server's "
            "ControlNet folder (--controlnets-dir; ComfyUI reads models/model_patches/); other model patches are "
            "refused.",
        ),
        NodeDef(
            "ZImageFunControlnet",
            "ZImageFunControlnet",
            "advanced/loaders/zimage",
            (
                Input("model", "MODEL"),
                Input("model_patch", "MODEL_PATCH"),
                Input("vae", "VAE"),
                Input("strength", "FLOAT", 1.0, -10.0, 10.0, 0.01),
                Input("image", "IMAGE", optional=True),
                Input("inpaint_image", "IMAGE", optional=True),
                Input("mask", "MASK", optional=True),
            ),
            ("MODEL",),
            z_image_fun_controlnet,
            description="A Z-Image model steered by a Z-Image Fun ControlNet as ComfyUI applies it: the control "
            "blocks over the image tokens alone, residuals times strength on the image tokens after main layers "
            "j * round(30 / blocks) (2.x: and after the noise refiner's blocks); 2.x ControlNets inpaint with "
            "inpaint_image and mask (1 = repaint).",
        ),
    )
}

__all__ = [
    "Z_IMAGE_CONTROL_NODES",
    "ComfyControlledZImage",
    "ModelPatch",
    "ZImageControl",
    "control_latent",
    "controlled_flow",
    "model_patch_loader",
    "z_image_fun_controlnet",
]
