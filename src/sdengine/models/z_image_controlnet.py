"""Z-Image's ControlNets: alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union (1.0, 2.0, 2.1; VideoX-Fun's), in the
layout and the way diffusers' ``ZImageControlNetModel`` runs them with ``ZImageTransformer2DModel``.

The ControlNet borrows the transformer's embedders, refiners, pad tokens and positions and owns:

* ``control_all_x_embedder.2-1``: a Linear of the control latent's 2x2 patches (``(dy, dx, c)`` order, as the
  image's), ``control_in_dim`` channels: 16 (the control image's latent) or 33 (2.x: the control latent, the
  inpainting mask at the latent's size with 1 = keep, the masked picture's latent; zeros when not inpainting).
  The image's pad positions take the transformer's ``x_pad_token``;
* ``control_layers``: control blocks (a transformer block, modulated by the timestep, over the control tokens
  ``c``) at the main layers ``control_layers_places``. The first (``before_proj``, zero-initialised) starts with
  ``c = before_proj(c) + x`` where ``x`` is the transformer's joint sequence ``[image, caption]`` before its first
  layer; each block's output through its ``after_proj`` is the residual (``hint``) of its place, times the
  conditioning scale, added to the joint sequence after main layer ``control_layers_places[j]``. The control
  tokens of the joint stage are ``[c (image positions), caption]``, the caption the transformer's refined one;
* the control tokens' own refinement before that, by ``add_control_noise_refiner`` (diffusers' three kinds):

  - None (1.0): ``control_noise_refiner``, plain modulated blocks over ``c`` alone;
  - ``"control_layers"`` (2.0): the control blocks themselves over ``c`` with the embedded image tokens (not yet
    refined) as ``x``; their first hints go into the ControlNet's own run of the transformer's noise refiner
    (after refiner block ``control_refiner_layers_places[j]``), whose output is the ``x`` of the joint stage;
  - ``"control_noise_refiner"`` (2.1): the same with control blocks of their own (``control_noise_refiner``).

  As in diffusers, those refiner hints change only the ControlNet's view of the image tokens: the transformer's
  own noise refiner runs without them.

:meth:`ZImageControlNet.forward` takes the transformer's embedded inputs (:class:`sdengine.models.z_image.ZImageState`)
and the refined image tokens, so the caption is refined once per call for the transformer and its ControlNets.

ComfyUI applies the same files otherwise (its ``ZImageFunControlnet``; :meth:`ZImageControlNet.comfy_start` /
:meth:`ZImageControlNet.comfy_main`, used by :mod:`sdengine.server.comfy.nodes_z_image_control`): the control tokens
are the image's real positions alone (no pad tokens, no caption), the residuals go to the image tokens after main
layers ``j * round(30 / blocks)``, and 2.x's refiner residuals go into the transformer's own noise refiner
(``forward``'s ``refiner_control``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.z_image import (
    PATCH,
    PATCH_KEY,
    Z_IMAGE_TURBO,
    Block,
    ZImageConfig,
    ZImageState,
    ZImageTransformer,
    patchify,
)

WHAT = "Z-Image ControlNet config"
REFINER_KINDS = (None, "control_layers", "control_noise_refiner")
LATENT_CHANNELS = 16


@dataclass(frozen=True)
class ZImageControlNetConfig:
    """Architecture of a Z-Image ControlNet; diffusers' ``ZImageControlNetModel`` config names and defaults."""

    control_layers_places: tuple[int, ...] = (0, 5, 10, 15, 20, 25)
    control_refiner_layers_places: tuple[int, ...] | None = None
    control_in_dim: int = LATENT_CHANNELS
    add_control_noise_refiner: str | None = None
    all_patch_size: tuple[int, ...] = (2,)
    all_f_patch_size: tuple[int, ...] = (1,)
    dim: int = 3840
    n_refiner_layers: int = 2
    n_heads: int = 30
    n_kv_heads: int = 30
    norm_eps: float = 1e-5
    qk_norm: bool = True

    def __post_init__(self) -> None:
        for name in ("control_layers_places", "control_refiner_layers_places", "all_patch_size", "all_f_patch_size"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
            elif not (isinstance(value, tuple) or (value is None and name == "control_refiner_layers_places")):
                raise ConfigError(f"{WHAT}: {name}={value!r} is not a list")
        places = self.control_layers_places
        if not places or not all(type(p) is int and 0 <= p < 1000 for p in places) or len(set(places)) != len(places):
            raise ConfigError(f"{WHAT}: control_layers_places={list(places)} must be distinct layer numbers")
        if 0 not in places:
            raise ConfigError(f"{WHAT}: control_layers_places must hold 0 (the block that reads the image tokens)")
        if self.add_control_noise_refiner not in REFINER_KINDS:
            raise ConfigError(
                f"{WHAT}: add_control_noise_refiner={self.add_control_noise_refiner!r} is not one of "
                "null, 'control_layers', 'control_noise_refiner'"
            )
        refiner = self.control_refiner_layers_places
        if self.add_control_noise_refiner is not None:
            if refiner is None or not all(type(p) is int and 0 <= p < self.n_refiner_layers for p in refiner):
                raise ConfigError(
                    f"{WHAT}: control_refiner_layers_places={refiner!r} must be refiner block numbers below "
                    f"n_refiner_layers={self.n_refiner_layers}"
                )
            width = len(places) if self.add_control_noise_refiner == "control_layers" else self.n_refiner_layers
            if len(refiner) > width:
                raise ConfigError(f"{WHAT}: {len(refiner)} control_refiner_layers_places for {width} control blocks")
        if type(self.control_in_dim) is not int or not 1 <= self.control_in_dim <= 1024:
            raise ConfigError(f"{WHAT}: control_in_dim={self.control_in_dim!r} is not a channel count")
        if self.all_patch_size != (PATCH,) or self.all_f_patch_size != (1,):
            raise ConfigError(f"{WHAT}: only 2x2 patches of one frame are supported")
        self.block_config()

    def block_config(self) -> ZImageConfig:
        """The transformer config the control blocks are built from (width, heads, norms: checked there). Its RoPE
        axes are a valid split of the head and not used: the positions are the transformer's."""
        if type(self.n_heads) is not int or self.n_heads < 1 or type(self.dim) is not int or self.dim % self.n_heads:
            raise ConfigError(f"{WHAT}: dim={self.dim!r} is not a multiple of n_heads={self.n_heads!r}")
        head = self.dim // self.n_heads
        third = 2 * (head // 6)
        axes = (head - 2 * third, third, third)
        return dataclasses.replace(
            Z_IMAGE_TURBO,
            dim=self.dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            n_refiner_layers=self.n_refiner_layers,
            norm_eps=self.norm_eps,
            qk_norm=self.qk_norm,
            axes_dims=axes,
            n_layers=1,
        )

    @property
    def inpainting(self) -> bool:
        """Whether it reads an inpainting mask and masked picture (2.x: 16 + 1 + 16 channels)."""
        return self.control_in_dim == 2 * LATENT_CHANNELS + 1

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> ZImageControlNetConfig:
        """A diffusers ``config.json`` of a ``ZImageControlNetModel``; unknown keys are refused in one line."""
        if not isinstance(config, Mapping):
            raise ConfigError(f"a Z-Image ControlNet config must be a mapping, got {type(config).__name__}")
        name = config.get("_class_name")
        if name is not None and name != "ZImageControlNetModel":
            raise ConfigError(f"not a Z-Image ControlNet config: _class_name={name!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ConfigError(f"unknown Z-Image ControlNet config options: {', '.join(unknown)}")
        try:
            return cls(**{k: v for k, v in config.items() if k in known})
        except TypeError as e:
            raise ConfigError(f"{WHAT}: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "ZImageControlNetModel"}
        for k, v in dataclasses.asdict(self).items():
            out[k] = list(v) if isinstance(v, tuple) else v
        return out


class ControlBlock(Block):
    """A control block (diffusers' ``ZImageControlTransformerBlock``): a modulated transformer block over the control
    tokens; ``before_proj`` (the first of its stack only) adds them to the tokens they steer, ``after_proj`` makes
    the hint."""

    def __init__(self, cfg: ZImageConfig, first: bool) -> None:
        super().__init__(cfg, True)
        if first:
            self.before_proj = nn.Linear(cfg.dim, cfg.dim)
        self.after_proj = nn.Linear(cfg.dim, cfg.dim)
        self.first = first

    def step(
        self, c: Tensor, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, vec: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(the control tokens after the block, its hint)."""
        if self.first:
            c = self.before_proj(c) + x
        c = super().forward(c, rope, mask, vec)
        return c, self.after_proj(c)


def _run_stack(
    blocks: Sequence[nn.Module], c: Tensor, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, vec: Tensor
) -> tuple[Tensor, list[Tensor]]:
    hints = []
    for block in blocks:
        assert isinstance(block, ControlBlock)
        c, hint = block.step(c, x, rope, mask, vec)
        hints.append(hint)
    return c, hints


class ZImageControlNet(nn.Module):
    """A Z-Image ControlNet (see the module docstring): ``forward(transformer, state, x, control_latent, scale)`` ->
    the residuals by main layer for :meth:`sdengine.models.z_image.ZImageTransformer.forward`'s ``control``."""

    family = "z_image"

    def __init__(self, config: ZImageControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.name = ""  # the file it came from (set by the loader)
        bc = config.block_config()
        self.control_layers = nn.ModuleList(
            ControlBlock(bc, first=i == 0) for i in range(len(config.control_layers_places))
        )
        self.control_all_x_embedder = nn.ModuleDict(
            {PATCH_KEY: nn.Linear(PATCH * PATCH * config.control_in_dim, config.dim)}
        )
        self.control_noise_refiner: nn.ModuleList | None
        kind = config.add_control_noise_refiner
        if kind is None:
            self.control_noise_refiner = nn.ModuleList(Block(bc, True) for _ in range(config.n_refiner_layers))
        elif kind == "control_noise_refiner":
            self.control_noise_refiner = nn.ModuleList(
                ControlBlock(bc, first=i == 0) for i in range(config.n_refiner_layers)
            )
        else:
            self.control_noise_refiner = None

    @property
    def embedder(self) -> nn.Linear:
        layer = self.control_all_x_embedder[PATCH_KEY]
        assert isinstance(layer, nn.Linear)
        return layer

    @property
    def dtype(self) -> torch.dtype:
        return self.embedder.weight.dtype

    def check_fits(self, transformer: ZImageTransformer) -> str | None:
        """Why this ControlNet cannot steer ``transformer`` (one line), or None."""
        cfg, base = self.config, transformer.config
        for label, mine, theirs in (
            ("dim", cfg.dim, base.dim),
            ("n_heads", cfg.n_heads, base.n_heads),
            ("qk_norm", cfg.qk_norm, base.qk_norm),
            ("n_refiner_layers", cfg.n_refiner_layers, base.n_refiner_layers),
        ):
            if mine != theirs:
                return f"it has {label} {mine}, the Z-Image transformer {theirs}"
        if max(cfg.control_layers_places) >= base.n_layers:
            return f"it steers main layer {max(cfg.control_layers_places)}; the Z-Image transformer has {base.n_layers}"
        if cfg.control_in_dim not in (base.in_channels, 2 * base.in_channels + 1):
            return (
                f"it reads {cfg.control_in_dim}-channel control latents; the transformer's latents have "
                f"{base.in_channels} channels (so {base.in_channels} or {2 * base.in_channels + 1})"
            )
        return None

    def forward(
        self,
        transformer: ZImageTransformer,
        state: ZImageState,
        x: Tensor,
        control_latent: Tensor,
        conditioning_scale: float = 1.0,
    ) -> dict[int, Tensor]:
        """The residuals (B, N_joint, dim) by main layer, each times ``conditioning_scale``, for the control latent
        (B, control_in_dim, H, W) (the latent's size; a 16-channel one on a 33-channel ControlNet is padded with
        zeros, as diffusers' text-to-image pipeline does); ``state`` / ``x``: the transformer's embedded inputs and
        refined image tokens of this call."""
        cfg = self.config
        why = self.check_fits(transformer)
        if why is not None:
            raise UsageError(f"Z-Image ControlNet {self.name}: {why}")
        B = state.x.shape[0]
        want = (B, cfg.control_in_dim, state.height, state.width)
        if control_latent.ndim == 4 and control_latent.shape[1] < cfg.control_in_dim:
            extra = control_latent.new_zeros(B, cfg.control_in_dim - control_latent.shape[1], *control_latent.shape[2:])
            control_latent = (
                torch.cat([control_latent, extra], dim=1) if control_latent.shape[0] == B else control_latent
            )
        if tuple(control_latent.shape) != want:
            raise UsageError(
                f"Z-Image ControlNet: the control latent must be {want}, got {tuple(control_latent.shape)}"
            )
        dtype = self.dtype
        n, n_img = state.n, state.x.shape[1]
        c = self.embedder(patchify(control_latent.to(dtype)))
        c = torch.cat([c, transformer.x_pad_token.to(c.dtype).expand(B, n_img - n, -1)], dim=1)
        vec, img_rope = state.vec.to(dtype), state.img_rope
        kind = cfg.add_control_noise_refiner
        if kind is None:
            assert self.control_noise_refiner is not None
            for block in self.control_noise_refiner:
                c = block(c, img_rope, None, vec)
        else:
            stack = self.control_layers if kind == "control_layers" else self.control_noise_refiner
            assert stack is not None
            c, hints = _run_stack(list(stack), c, state.x.to(dtype), img_rope, None, vec)
            places = cfg.control_refiner_layers_places or ()
            refiner_hints = {p: hints[j] * conditioning_scale for j, p in enumerate(places)}
            x = transformer.refine_image(state, refiner_hints)
        joint = torch.cat([x, state.cap], dim=1).to(dtype)
        c = torch.cat([c, state.cap.to(dtype)], dim=1)
        _, hints = _run_stack(list(self.control_layers), c, joint, state.joint_rope, state.mask, vec)
        return {p: hints[j] * conditioning_scale for j, p in enumerate(cfg.control_layers_places)}

    # ---------------------------------------------------------------------------------------------------
    # ComfyUI's way (its ZImageFunControlnet / ModelPatchLoader: comfy_extras/nodes_model_patch.py's
    # ZImageControlPatch, comfy/ldm/lumina/controlnet.py's ZImage_Control)
    # ---------------------------------------------------------------------------------------------------

    def comfy_start(self, state: ZImageState, control_latent: Tensor) -> tuple[Tensor, dict[int, Tensor]]:
        """ComfyUI's first stage: (the control tokens (B, n, dim) the main stage starts from, the residuals
        (B, n, dim) by noise refiner block, not yet times the strength). The control tokens are the real image
        positions only (no pad tokens) and never see the caption. 1.0: ``control_noise_refiner``'s plain blocks over
        them, no residuals; 2.1 (``control_noise_refiner`` control blocks): block ``i`` with the embedded image tokens
        (before the refiner) as ``x`` gives refiner block ``i``'s residual; 2.0 (``control_layers``, ComfyUI's
        "broken" file: an all-zero ``control_noise_refiner``): control block 0 gives refiner block 0's, and each later
        refiner block runs control blocks 1.. all, the first's output its residual."""
        n, B = state.n, state.x.shape[0]
        dtype = self.dtype
        c = self.embedder(patchify(control_latent.to(device=state.x.device, dtype=dtype)))
        if c.shape[0] != B:
            c = c.expand(B, -1, -1)
        vec = state.vec.to(dtype)
        rope = (state.img_rope[0][:, :n], state.img_rope[1][:, :n])
        x_in = state.x[:, :n].to(dtype)
        kind = self.config.add_control_noise_refiner
        hints: dict[int, Tensor] = {}
        if kind is None:
            assert self.control_noise_refiner is not None
            for block in self.control_noise_refiner:
                c = block(c, rope, None, vec)
        elif kind == "control_noise_refiner":
            assert self.control_noise_refiner is not None
            for i, block in enumerate(self.control_noise_refiner):
                assert isinstance(block, ControlBlock)
                c, hints[i] = block.step(c, x_in, rope, None, vec)
        else:
            blocks = list(self.control_layers)
            for i in range(self.config.n_refiner_layers):
                if i == 0:
                    first = blocks[0]
                    assert isinstance(first, ControlBlock)
                    c, hints[0] = first.step(c, x_in, rope, None, vec)
                    continue
                out: Tensor | None = None
                for block in blocks[1:]:
                    assert isinstance(block, ControlBlock)
                    c, hint = block.step(c, x_in, rope, None, vec)
                    out = hint if out is None else out
                if out is not None:
                    hints[i] = out
        return c, hints

    def comfy_main(self, state: ZImageState, c: Tensor, x: Tensor, n_layers: int) -> dict[int, Tensor]:
        """ComfyUI's main stage: the residuals (B, n, dim) by main layer (not yet times the strength), for the
        real image tokens: control block ``j`` over the control tokens alone, the first with the transformer's
        refined image tokens ``x`` (B, N_pad, dim) as its ``x``, goes after main layer ``j * round(30 / blocks)``
        (:func:`comfy_places`); places past the transformer's ``n_layers`` are never run."""
        n, dtype = state.n, self.dtype
        vec = state.vec.to(dtype)
        rope = (state.img_rope[0][:, :n], state.img_rope[1][:, :n])
        x_main = x[:, :n].to(dtype)
        out: dict[int, Tensor] = {}
        places = comfy_places(len(self.control_layers))
        for place, block in zip(places, self.control_layers, strict=True):
            if place >= n_layers:
                break
            assert isinstance(block, ControlBlock)
            c, out[place] = block.step(c, x_main, rope, None, vec)
        return out


COMFY_LAYERS = 30  # ComfyUI's ZImageControlPatch spreads the control blocks over 30 main layers (Z-Image's depth)


def comfy_places(blocks: int) -> list[int]:
    """The main layer after which ComfyUI adds each of ``blocks`` control blocks' residuals: ``j * round(30 /
    blocks)`` (6 blocks: 0, 5, .., 25; 15: 0, 2, .., 28; 3: 0, 10, 20)."""
    step = round(COMFY_LAYERS / blocks)
    return [j * step for j in range(blocks)]


__all__ = [
    "COMFY_LAYERS",
    "LATENT_CHANNELS",
    "ControlBlock",
    "ZImageControlNet",
    "ZImageControlNetConfig",
    "comfy_places",
]
