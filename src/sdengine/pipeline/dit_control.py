"""ControlNets on SD3 / SD3.5, Flux and Qwen-Image while sampling: the transformer with its ControlNets' residuals.

:func:`build_controlled_dit` is what :func:`sdengine.pipeline.control.build_controlled_unet` is for the U-Nets:
it loads each :class:`~sdengine.pipeline.control.ControlUnit`'s ControlNet (:mod:`sdengine.control.dit_files`),
encodes its control image with the pipeline's VAE and returns a :class:`ControlledDiT`, called in place of the
transformer. At each call it runs every unit that is active at the sampler's step (the unit's ``start``/``end``
window, counted by :func:`sdengine.pipeline.control.step_keep` over the steps that run: diffusers'
``controlnet_keep`` by default), sums their residuals and runs the transformer with them.

The control image, as diffusers' ``StableDiffusion3ControlNetPipeline`` / ``FluxControlNetPipeline`` prepare it:
resized to the output size, taken to [-1, 1], encoded by the VAE (here the posterior's mean; diffusers draws a
sample of it, which differs by the VAE's tiny posterior spread) and scaled into the model's latent space:
``(z - shift) * scaling`` with the VAE's factors, except that InstantX's SD3 ControlNets (those with
``force_zeros_for_pooled_projection``) were trained without the shift: ``z * scaling``. Flux packs it into 2x2
patches with the latent (inside :class:`sdengine.models.dit_controlnet.FluxControlNet`).

What the ControlNet reads: SD3: the latent rows, the timestep, the text states (none for Stability's SD3.5
ControlNets) and the pooled text, zeros when ``force_zeros_for_pooled_projection``; Flux: the same as the
transformer (text, pooled text, the distilled guidance scale where the ControlNet embeds one) and, for a Union
ControlNet, the unit's ``union_mode`` (:data:`UNION_MODES`). Every row runs with its own text: with CFG the
unconditional rows get the ControlNet's answer to the negative prompt (as diffusers' SD3 pipeline; its Flux
pipeline's true CFG reuses the positive rows' residuals instead).

SD3 inpainting ControlNets (``extra_conditioning_channels`` 1: Alimama's SD3-Controlnet-Inpainting), as diffusers'
``StableDiffusion3ControlNetInpaintingPipeline`` prepares them: the unit's ``image`` is the picture to inpaint and
its ``mask`` (white = repaint) is read as diffusers' mask processor reads it (resized like the image, grey, 1 where
it is at least 0.5). The masked pixels are set to black (-1 in the VAE's range) before the encode, the latent is
scaled with the shift, ``(z - shift) * scaling``, whatever ``force_zeros_for_pooled_projection`` says, and one
channel more follows it: the mask taken to the latent's size (nearest) and inverted (1 = keep). The copy reads a
pooled text vector of zeros. The base model starts from noise as in a plain generation: the ControlNet alone
carries the picture (no known region is put back, as in diffusers' pipeline; the request's own ``init_image`` and
``mask`` inpaint on top when given). A mask on any other unit, an inpainting ControlNet without one, or one
that takes another number of extra channels is refused in one line.

Qwen-Image's ControlNets (InstantX's Union and Inpainting; :mod:`sdengine.models.qwen_controlnet`, run by
:class:`ControlledQwen`), as diffusers' ``QwenImageControlNetPipeline`` / ``QwenImageControlNetInpaintPipeline``:
the control image encoded as the picture of an img2img run is (the posterior's mean, normalised by the VAE's
``latents_mean`` / ``latents_std``), packed into 2x2 patches inside the ControlNet. The copy reads the conditional
rows' text only, and every unconditional row of true CFG reuses the residuals of its conditional row (diffusers'
pipeline runs the ControlNet once per step, on the prompt). Several units sum their residuals (diffusers'
``QwenImageMultiControlNetModel`` runs one Union ControlNet over several images; here each unit may also have its
own ControlNet of the same depth). The inpainting ControlNet (``extra_condition_channels`` 4) takes the unit's
``mask`` as the SD3 one does (masked pixels black, the mask at the latent's size, 1 = keep, one channel after
the latent's 16). A ControlNet of another width than the transformer, or whose latents have another channel
count, is refused in one line.

Z-Image's ControlNets (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union 1.0 / 2.0 / 2.1;
:mod:`sdengine.models.z_image_controlnet`, run by :class:`ControlledZImage`), as diffusers'
``ZImageControlNetPipeline`` / ``ZImageControlNetInpaintPipeline``: the control image encoded as Flux's is (the
posterior's mean, ``(z - shift) * scaling``); every row runs the ControlNet with its own text (the negative rows
with the negative prompt, as diffusers' pipelines do). A 2.x ControlNet (33 input channels) reads zeros after the
16 unless the unit inpaints: its ``mask`` (white = repaint, read as the SD3 one) and ``inpaint_image`` (the picture
to inpaint) give the mask at the latent's size (nearest, 1 = keep) and the masked picture's latent (the masked
pixels mid-grey: 0 in the VAE's range, as diffusers multiplies its [-1, 1] picture by the kept mask). As in
diffusers' pipeline the generation starts from noise: the ControlNet alone carries the picture.

Not for the transformers (one line each): U-Net ControlNets, T2I-Adapters, reference units, guess mode,
sd-webui-controlnet's soft control modes, ComfyUI's sigma window rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sdengine.control.dit_files import DiTControlNet, read_dit_controlnet
from sdengine.control.preprocess import load_control_image
from sdengine.diffusion.samplers import SamplerStep
from sdengine.errors import ControlNetError
from sdengine.io.resize import resize_image, resize_tensor
from sdengine.models.dit_controlnet import FluxControlNet, SD3ControlNet
from sdengine.models.qwen_controlnet import INPAINT_EXTRA, QwenImageControlNet
from sdengine.models.z_image_controlnet import LATENT_CHANNELS, ZImageControlNet
from sdengine.pipeline.control import (
    HINT_NEAREST_CENTRE,
    ControlUnit,
    check_unit_settings,
    control_image_tensor,
    no_step_message,
    step_keep,
)

# The control kinds of the Flux Union ControlNets (InstantX's FLUX.1-dev-Controlnet-Union and Shakker-Labs'
# Union-Pro): a unit's union_mode is one of these names or its number
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")
FAMILY_NAMES = {"sd3": "SD3", "flux": "Flux", "qwen_image": "Qwen-Image", "z_image": "Z-Image"}
CLASS_NAMES = {
    "sd3": "SD3ControlNetModel",
    "flux": "FluxControlNetModel",
    "qwen_image": "QwenImageControlNetModel",
    "z_image": "ZImageControlNetModel",
}


def union_mode_id(mode: int | str | None, count: int, name: str) -> int:
    """A unit's Union control mode as the embedding's row: a number below ``count`` or a name of
    :data:`UNION_MODES`."""
    if mode is None:
        raise ControlNetError(
            f"{name} is a Union ControlNet: give its union_mode ({', '.join(UNION_MODES)} or a number below {count})"
        )
    if isinstance(mode, str):
        key = mode.strip().lower()
        if key.isdigit():
            mode = int(key)
        elif key in UNION_MODES:
            mode = UNION_MODES.index(key)
        else:
            raise ControlNetError(f"{name}: unknown union_mode {mode!r}; use one of {', '.join(UNION_MODES)}")
    if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode < count:
        raise ControlNetError(f"{name}: union_mode must be below {count} (this ControlNet's modes), got {mode!r}")
    return mode


@dataclass
class PreparedDiTUnit:
    """A loaded unit: the ControlNet on the run's device and dtype, its control latent(s) (N, C, h, w), scale,
    per-step on/off list, and a Union ControlNet's mode id."""

    net: DiTControlNet
    latent: Tensor
    scale: float
    keep: list[bool]
    mode: int | None = None
    inpaint: bool = False  # an inpainting ControlNet (SD3's pooled text is zeros)


class ControlledNetwork:
    """A transformer (``base``) run with prepared ControlNet ``units``: what the sampler asks of it (the step, the
    CFG rows' kinds) and its attributes (config, dtype, ...) passed through; :meth:`active` says which units act at
    a step."""

    takes_step = True
    takes_row_kinds = True
    references = None  # no reference units here (the core asks)

    def __init__(self, base: Any, units: list[PreparedDiTUnit]) -> None:
        self.base = base
        self.units = units

    def __getattr__(self, name: str) -> Any:  # config, dtype, ... of the transformer
        if name == "base":
            raise AttributeError(name)
        return getattr(self.base, name)

    def active(self, step: int) -> list[bool]:
        return [u.keep[min(step, len(u.keep) - 1)] for u in self.units]


class ControlledDiT(ControlledNetwork):
    """``model(x, t, *, encoder_hidden_states, pooled_projections, [guidance], step, row_kinds, **kw)``: the SD3 or
    Flux transformer with the active units' residuals (``step``: the run's step index or a SamplerStep)."""

    def __init__(self, base: Any, units: list[PreparedDiTUnit], family: str) -> None:
        super().__init__(base, units)
        self.family = family

    def residuals(
        self,
        x: Tensor,
        t: Tensor,
        context: Tensor,
        pooled: Tensor,
        guidance: Tensor | None,
        kinds: Sequence[str],
        active: Sequence[bool],
    ) -> tuple[list[Tensor], list[Tensor]] | None:
        """The summed residuals of the active units (SD3: the second list empty); None where none acts."""
        total: tuple[list[Tensor], list[Tensor]] | None = None
        b = x.shape[0]
        for unit, on in zip(self.units, active, strict=True):
            if not on:
                continue
            net = unit.net
            dt = net.dtype
            cond = _maps_for_rows(unit.latent, kinds)
            tt = t.expand(b) if t.ndim == 0 else t
            got: tuple[list[Tensor], list[Tensor]]
            if isinstance(net, SD3ControlNet):
                zeros = net.config.force_zeros_for_pooled_projection or unit.inpaint
                ctx = context.to(dt) if net.config.joint_attention_dim is not None else None
                vec = torch.zeros_like(pooled, dtype=dt) if zeros else pooled.to(dt)
                got = (net(x.to(dt), cond, tt, ctx, vec, conditioning_scale=unit.scale), [])
            else:
                if not isinstance(net, FluxControlNet):
                    raise ControlNetError(f"ControlNet {net.name} is not an SD3 or Flux ControlNet")
                g = guidance if net.config.guidance_embeds else None
                if net.config.guidance_embeds and g is None:
                    raise ControlNetError(
                        f"ControlNet {net.name}: it embeds the distilled guidance scale, which this model does not take"
                    )
                mode = torch.full((b,), unit.mode, device=x.device) if unit.mode is not None else None
                got = net(x.to(dt), cond, tt, context.to(dt), pooled.to(dt), g, mode, conditioning_scale=unit.scale)
            total = got if total is None else (_add(total[0], got[0]), _add(total[1], got[1]))
        return total

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        *,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        step: Any = None,
        row_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> Tensor:
        index = _step_index(step)
        kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        res = self.residuals(
            x, t, encoder_hidden_states, pooled_projections, kw.get("guidance"), kinds, self.active(index)
        )
        if res is not None:
            if self.family == "sd3":
                kw["block_controlnet_hidden_states"] = res[0]
            else:
                kw["controlnet_block_samples"] = res[0] or None
                kw["controlnet_single_block_samples"] = res[1] or None
        return self.base(x, t, encoder_hidden_states=encoder_hidden_states, pooled_projections=pooled_projections, **kw)


class ControlledQwen(ControlledNetwork):
    """``model(x, t, text, text_mask, *, step, row_kinds)``: the Qwen-Image transformer with the active units'
    residuals, computed on the conditional rows and reused by each unconditional row (see the module docstring)."""

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        step: Any = None,
        row_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> Tensor:
        b = x.shape[0]
        kinds = _row_kinds(row_kinds, b)
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(b) if t.ndim == 0 else t
        cond = [i for i, k in enumerate(kinds) if k == "cond"] or list(range(b))
        rows = torch.tensor(cond, device=x.device)
        total: list[Tensor] | None = None
        for unit, on in zip(self.units, self.active(_step_index(step)), strict=True):
            if not on:
                continue
            net = unit.net
            dt = net.dtype
            maps = _maps_for_rows(unit.latent, kinds)[rows]
            mask = None if text_mask is None else text_mask[rows]
            got = net(x[rows].to(dt), maps, t[rows], text[rows].to(dt), mask, conditioning_scale=unit.scale)
            total = got if total is None else _add(total, got)
        if total is not None:
            index = torch.tensor(_kind_order(kinds, len(cond)), device=x.device)  # row j of its kind: cond row j
            kw["controlnet_block_samples"] = [r[index] for r in total]
        return self.base(x, t, text, text_mask, **kw)


class ControlledZImage(ControlledNetwork):
    """``model(x, t, text, text_mask, *, step, row_kinds)``: the Z-Image transformer with the active units'
    residuals (summed by main layer), every row with its own text (see the module docstring)."""

    def __call__(
        self,
        x: Tensor,
        t: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        step: Any = None,
        row_kinds: Sequence[str] | None = None,
        **kw: Any,
    ) -> Tensor:
        b = x.shape[0]
        kinds = _row_kinds(row_kinds, b)
        units = [u for u, on in zip(self.units, self.active(_step_index(step)), strict=True) if on]
        if not units:
            return self.base(x, t, text, text_mask, **kw)
        base = self.base

        def control(state: Any, refined: Tensor) -> dict[int, Tensor]:
            total: dict[int, Tensor] = {}
            for unit in units:
                net = unit.net
                assert isinstance(net, ZImageControlNet)
                got = net(base, state, refined, _maps_for_rows(unit.latent, kinds), unit.scale)
                for place, hint in got.items():
                    total[place] = total[place] + hint if place in total else hint
            return total

        return self.base(x, t, text, text_mask, control=control, **kw)


def _step_index(step: Any) -> int:
    if step is None:
        raise ControlNetError("the controlled transformer needs the sampler's step (step=SamplerStep(...))")
    return step.index if isinstance(step, SamplerStep) else int(step)


def _maps_for_rows(maps: Tensor, kinds: Sequence[str]) -> Tensor:
    """The control latent of each row: one for every row, or one per image: row ``j`` of its CFG kind (the
    conditional rows in order, then the unconditional ones) takes latent ``j % len(maps)``."""
    m, n = int(maps.shape[0]), len(kinds)
    if m == 1:
        return maps.expand(n, -1, -1, -1)
    return maps[torch.tensor(_kind_order(kinds, m), device=maps.device)]


def _row_kinds(row_kinds: Sequence[str] | None, b: int) -> tuple[str, ...]:
    """Each row's CFG kind ("cond" / "uncond"; all "cond" where not given), one per row or one line."""
    kinds = tuple(row_kinds) if row_kinds is not None else ("cond",) * b
    if len(kinds) != b:
        raise ControlNetError(f"the controlled transformer got {len(kinds)} row kinds for {b} rows")
    return kinds


def _kind_order(kinds: Sequence[str], m: int) -> list[int]:
    """For each row, its place among the rows of its kind, modulo ``m`` (row j of its kind takes item j % m)."""
    seen: dict[str, int] = {}
    order = []
    for k in kinds:
        order.append(seen.get(k, 0) % m)
        seen[k] = seen.get(k, 0) + 1
    return order


def _add(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """Two units' residuals summed block by block (units of one family and depth: diffusers' multi-ControlNet sum)."""
    if len(a) != len(b):
        raise ControlNetError(
            f"ControlNet units give {len(a)} and {len(b)} residuals: several units must have as many blocks"
        )
    return [x + y for x, y in zip(a, b, strict=True)]


def _load(unit: ControlUnit, family: str, name: str) -> DiTControlNet:
    model = unit.model
    want = FAMILY_NAMES[family]
    if isinstance(model, SD3ControlNet | FluxControlNet | QwenImageControlNet | ZImageControlNet):
        net = model
    elif isinstance(model, str | Path):
        net = read_dit_controlnet(model)
    else:
        raise ControlNetError(
            f"{name}: a {type(model).__name__} is made for U-Nets (SD 1.x / 2.x / SDXL); {want} takes an {want} "
            f"ControlNet ({CLASS_NAMES[family]})"
        )
    if net.family != family:
        raise ControlNetError(f"{name} is a {FAMILY_NAMES[net.family]} ControlNet; this model is {want}")
    return net


def control_mask_tensor(mask: Any, width: int, height: int, resize_mode: str = "just resize") -> Tensor:
    """(1, 1, height, width) float32 of 0 and 1 (1 = repaint): an inpainting ControlNet's mask as diffusers' mask
    processor reads it: resized as the control image is (Lanczos for pictures), made grey, 1 where it is at least
    0.5. A picture, a path, an (H, W) array or a (1, 1, H, W) / (1, H, W) / (H, W) float tensor in [0, 1]."""
    if isinstance(mask, list | tuple) or (
        isinstance(mask, Tensor | np.ndarray) and mask.ndim == 4 and mask.shape[0] != 1
    ):
        raise ControlNetError("an inpainting ControlNet unit takes one mask (used for every row)")
    if isinstance(mask, Tensor) and mask.is_floating_point():
        t = mask.detach().float()
        t = t.reshape(1, 1, *t.shape[-2:]) if t.ndim == 2 or (t.ndim in (3, 4) and t.shape[-3] == 1) else t
        if t.ndim != 4 or t.shape[:2] != (1, 1):
            raise ControlNetError(f"a mask tensor must be (1, 1, H, W), (1, H, W) or (H, W), got {tuple(mask.shape)}")
        grey = resize_tensor(t, width, height, resize_mode).clamp(0, 1)
    elif resize_mode == HINT_NEAREST_CENTRE:
        rgb = control_image_tensor(mask, width, height, resize_mode)
        grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        picture = resize_image(load_control_image(mask), width, height, resize_mode).convert("L")
        grey = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 255.0)[None, None]
    if not bool(torch.isfinite(grey).all()):
        raise ControlNetError("the inpainting ControlNet's mask has values that are not finite")
    return (grey >= 0.5).float()


def vae_encoder(vae: Any) -> dict[str, Any]:
    """``encode`` and ``vae_factors`` of :func:`build_controlled_dit` for a pipeline's VAE: the posterior's mean
    of images in [0, 1], and (scaling_factor, shift_factor)."""
    from sdengine.vae_utils import encode_moments

    def encode(images: Tensor) -> Tensor:
        return encode_moments(vae, images * 2.0 - 1.0).mean

    return {"encode": encode, "vae_factors": (float(vae.config.scaling_factor), float(vae.config.shift_factor or 0.0))}


def qwen_vae_encoder(vae: Any) -> dict[str, Any]:
    """``encode`` and ``vae_factors`` of :func:`build_controlled_dit` for Qwen-Image's VAE: the posterior's mean of
    images in [0, 1] normalised by the VAE (``(z - latents_mean) / latents_std``), so the factors are (1, 0)."""
    from sdengine.vae_utils import encode_moments

    def encode(images: Tensor) -> Tensor:
        return vae.scale_latents(encode_moments(vae, images * 2.0 - 1.0).mean.float())

    return {"encode": encode, "vae_factors": (1.0, 0.0)}


def build_controlled_dit(
    base: Any,
    units: Sequence[ControlUnit | tuple[Any, ...]],
    *,
    family: str,
    encode: Callable[[Tensor], Tensor],
    vae_factors: tuple[float, float],
    width: int,
    height: int,
    grid: Any,
    guess_mode: bool = False,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    start_step: int = 0,
    resize_mode: str = "just resize",
    note: Callable[[str], None] | None = None,
    **_: Any,
) -> ControlledDiT | ControlledQwen | ControlledZImage:
    """The SD3 (``family="sd3"``), Flux (``"flux"``) or Qwen-Image (``"qwen_image"``) transformer ``base`` with the
    ControlNets of ``units``.

    ``encode``: (N, 3, H, W) images in [0, 1] -> the VAE posterior's mean (unscaled); ``vae_factors``: the VAE's
    (scaling_factor, shift_factor); ``grid`` / ``start_step``: the run's steps, as for
    :func:`sdengine.pipeline.control.build_controlled_unet` (whose other arguments are taken and not used)."""
    want = FAMILY_NAMES[family]
    if guess_mode:
        raise ControlNetError(f"guess_mode is a U-Net ControlNet setting; {want} ControlNets do not take it")
    timesteps = torch.as_tensor(getattr(grid, "timesteps", grid)).reshape(-1)[start_step:]
    steps = int(timesteps.shape[0])
    if steps < 1:
        raise ControlNetError("no steps to control")
    param = next(base.parameters(), None) if isinstance(base, torch.nn.Module) else None
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    run_dtype = dtype if isinstance(dtype, torch.dtype) else (param.dtype if param is not None else torch.float32)
    scaling, shift = vae_factors
    prepared: list[PreparedDiTUnit] = []
    for k, raw in enumerate(units):
        unit = ControlUnit.coerce(raw)
        model = unit.model
        name = f"ControlNet {Path(model).name}" if isinstance(model, str | Path) else f"ControlNet {k + 1}"
        if unit.reference is not None:
            raise ControlNetError(f"{unit.reference} (reference control) works on U-Net layers; not for {want}")
        if unit.rule == "comfyui":
            raise ControlNetError(f"{name}: the comfyui step rule is not supported for {want}; use diffusers or a1111")
        for label, value in (("control mode", unit.mode), ("hires control mode", unit.hires_mode or "balanced")):
            if value != "balanced":
                raise ControlNetError(
                    f"{name}: {label} {value!r} is sd-webui-controlnet's soft weighting of U-Net residuals; "
                    f"{want} ControlNets run 'balanced'"
                )
        check_unit_settings(float(unit.scale), float(unit.start), float(unit.end), name=name)
        net = _load(unit, family, name)
        mode: int | None = None
        union_mode = getattr(unit, "union_mode", None)
        if isinstance(net, FluxControlNet) and net.controlnet_mode_embedder is not None:
            mode = union_mode_id(union_mode, net.controlnet_mode_embedder.num_embeddings, name)
        elif union_mode is not None and isinstance(net, QwenImageControlNet | ZImageControlNet):
            raise ControlNetError(
                f"{name}: {want} ControlNets take no union_mode (the Union ones read the kind off the image)"
            )
        elif union_mode is not None:
            raise ControlNetError(f"{name} is not a Union ControlNet: it takes no union_mode")
        inpaint_image = getattr(unit, "inpaint_image", None)
        if isinstance(net, ZImageControlNet):
            _check_z_image_fit(net, base, name)
            mask_extra = LATENT_CHANNELS + 1
            extra = mask_extra if net.config.inpainting else 0
            mask_given = getattr(unit, "mask", None) is not None
            if mask_given != (inpaint_image is not None):
                raise ControlNetError(
                    f"{name}: a Z-Image inpainting unit takes both its mask (white = repaint) and inpaint_image "
                    "(the picture to inpaint)"
                )
            if mask_given and not net.config.inpainting:
                raise ControlNetError(
                    f"{name} reads no inpainting mask (16 control channels, Union 1.0): mask and inpaint_image are "
                    "for the 33-channel ones (Union 2.x)"
                )
            if not mask_given:
                extra = 0  # a 2.x ControlNet without a mask: zeros after the control latent (diffusers' pipeline)
        elif inpaint_image is not None:
            raise ControlNetError(f"{name}: inpaint_image is a Z-Image inpainting unit's; {want} takes its mask only")
        elif isinstance(net, QwenImageControlNet):
            _check_qwen_fit(net, base, name)
            extra, mask_extra = net.config.extra_condition_channels, INPAINT_EXTRA
        else:
            extra = net.config.extra_conditioning_channels if isinstance(net, SD3ControlNet) else 0
            mask_extra = 1
        if extra not in (0, mask_extra):
            raise ControlNetError(
                f"{name} takes {extra} extra control channels; sdengine knows the inpainting ControlNets' "
                f"{mask_extra} (the mask)"
            )
        inpaint = extra == mask_extra
        mask_given = getattr(unit, "mask", None) is not None
        if inpaint and not mask_given:
            raise ControlNetError(
                f"{name} is {'an' if family == 'sd3' else 'a'} {want} inpainting ControlNet: give the unit its mask "
                "(white = repaint) with the image to inpaint"
            )
        if mask_given and not inpaint:
            raise ControlNetError(
                f"{name} is not an inpainting ControlNet (no mask channel): a unit mask is for SD3 / Qwen-Image "
                "inpainting ControlNets"
            )
        net = net.to(device=dev, dtype=run_dtype)
        if isinstance(net, SD3ControlNet):
            net.share_patch_embed(base)
        images = control_image_tensor(unit.image, width, height, resize_mode)
        repaint = control_mask_tensor(unit.mask, width, height, resize_mode) if inpaint else None
        picture: Tensor | None = None
        if repaint is not None and isinstance(net, ZImageControlNet) and inpaint_image is not None:
            # the picture to inpaint, its masked pixels mid-grey (0 in the VAE's range); the control image as is
            picture = control_image_tensor(inpaint_image, width, height, resize_mode)
            picture = picture * (1.0 - repaint) + 0.5 * repaint
        elif repaint is not None:
            images = images * (1.0 - repaint)  # the area to repaint black: -1 in the VAE's range
        with torch.no_grad():
            mean = encode(images.to(dev)).float()
            masked = encode(picture.to(dev)).float() if picture is not None else None
        if isinstance(net, ZImageControlNet):
            want_ch = LATENT_CHANNELS
        elif isinstance(net, QwenImageControlNet):
            want_ch = net.config.latent_channels
        else:
            want_ch = net.config.in_channels if isinstance(net, SD3ControlNet) else net.config.in_channels // 4
        if mean.shape[1] != want_ch:
            raise ControlNetError(
                f"{name} takes {want_ch}-channel control latents; this model's VAE makes {mean.shape[1]}"
            )
        no_shift = isinstance(net, SD3ControlNet) and net.config.force_zeros_for_pooled_projection and not inpaint
        latent = (mean - (0.0 if no_shift else shift)) * scaling
        if repaint is not None:
            kept = 1.0 - F.interpolate(repaint.to(latent.device), size=tuple(latent.shape[-2:]), mode="nearest")
            parts = [latent, kept.expand(latent.shape[0], -1, -1, -1)]
            if masked is not None:
                masked_latent = (masked - shift) * scaling
                if masked_latent.shape[0] != latent.shape[0]:
                    masked_latent = masked_latent.expand(latent.shape[0], -1, -1, -1)
                parts.append(masked_latent)
            latent = torch.cat(parts, dim=1)
        keep = step_keep(steps, float(unit.start), float(unit.end), unit.rule)
        if not any(keep):
            msg = no_step_message(name, steps, float(unit.start), float(unit.end), unit.rule)
            if note is not None:
                note(msg)
        prepared.append(PreparedDiTUnit(net, latent.to(run_dtype), float(unit.scale), keep, mode, inpaint))
    if family == "qwen_image":
        return ControlledQwen(base, prepared)
    if family == "z_image":
        return ControlledZImage(base, prepared)
    return ControlledDiT(base, prepared, family)


def _check_z_image_fit(net: ZImageControlNet, base: Any, name: str) -> None:
    """A Z-Image ControlNet steers this transformer: the same width, heads and refiner depth, its places within the
    main layers, control channels the latent's (or 33 for 2.x)."""
    from sdengine.models.z_image import ZImageTransformer

    if isinstance(base, ZImageTransformer):
        why = net.check_fits(base)
        if why is not None:
            raise ControlNetError(f"{name}: {why}: not a ControlNet for this model")


def _check_qwen_fit(net: QwenImageControlNet, base: Any, name: str) -> None:
    """A Qwen-Image ControlNet's residuals fit the transformer: the same width, latent and text widths."""
    cfg = getattr(base, "config", None)
    if cfg is None:
        return
    for label, mine, theirs in (
        (
            "width (heads x head width)",
            net.config.hidden_size,
            int(cfg.num_attention_heads) * int(cfg.attention_head_dim),
        ),
        ("in_channels", net.config.in_channels, int(cfg.in_channels)),
        ("joint_attention_dim (text width)", net.config.joint_attention_dim, int(cfg.joint_attention_dim)),
    ):
        if mine != theirs:
            raise ControlNetError(
                f"{name} has {label} {mine}, this Qwen-Image transformer {theirs}: not a ControlNet for this model"
            )


__all__ = [
    "UNION_MODES",
    "ControlledDiT",
    "ControlledNetwork",
    "ControlledQwen",
    "ControlledZImage",
    "PreparedDiTUnit",
    "build_controlled_dit",
    "control_mask_tensor",
    "qwen_vae_encoder",
    "union_mode_id",
    "vae_encoder",
]
