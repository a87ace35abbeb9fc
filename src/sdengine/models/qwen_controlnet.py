"""ControlNets for Qwen-Image (:mod:`sdengine.models.qwen_image`): InstantX's Qwen-Image-ControlNet-Union and
Qwen-Image-ControlNet-Inpainting, in the layout of diffusers' ``QwenImageControlNetModel``.

The idea is ControlNet's (Zhang, Rao & Agrawala 2023) as InstantX put it on the Flux transformer
(:mod:`sdengine.models.dit_controlnet`): a copy of Qwen-Image's first blocks (5 of the 60 in the releases) sees the
control image too, and what each block of the copy gives is projected by a zero-initialised Linear
(``controlnet_blocks.j``) and added to the image tokens of the base transformer. The copy has the base model's
parts under the base model's names (``time_text_embed``, ``txt_norm``, ``img_in``, ``txt_in``,
``transformer_blocks``), so a diffusers ControlNet folder loads with a strict ``load_state_dict``; the control
image gets in as a zero-initialised Linear (``controlnet_x_embedder``) of its packed 2x2 latent patches, added to
the copy's image tokens right after ``img_in``.

The inpainting ControlNet (``extra_condition_channels`` 4) reads the masked picture's latent with one channel
more, the mask at the latent's size (1 = keep), packed with it: 17 channels x 4 = 68 numbers per patch.

Which base block gets which residual (diffusers' ``QwenImageTransformer2DModel``): with ``n`` base blocks and ``m``
residuals, block ``i`` gets residual ``i // ceil(n / m)`` added to its image output
(:meth:`sdengine.models.qwen_image.QwenImageTransformer.forward`'s ``controlnet_block_samples``).

The copy reads the timestep, the text states and their mask as the base transformer does; the positions are the
base model's (:func:`sdengine.models.qwen_image.rope_tables`, image centred, text after it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.dit_controlnet import config_values
from sdengine.models.flux import pack_latents
from sdengine.models.qwen_image import PATCH, DualStreamBlock, QwenImageConfig, TimeEmbedding, rope_tables

# the inpainting ControlNet's extra numbers per 2x2 patch: one mask channel, packed
INPAINT_EXTRA = PATCH * PATCH


@dataclass(frozen=True)
class QwenImageControlNetConfig:
    """Architecture of a Qwen-Image ControlNet; diffusers' ``QwenImageControlNetModel`` config names and defaults.
    The fields shared with :class:`sdengine.models.qwen_image.QwenImageConfig` mean what they mean there
    (``num_layers``: the copy's blocks, 5 in InstantX's); ``extra_condition_channels``: numbers per patch of the
    control latent beyond the latent's (0: Union; 4: the inpainting one's mask)."""

    patch_size: int = 2
    in_channels: int = 64
    out_channels: int | None = 16
    num_layers: int = 60
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 3584
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    extra_condition_channels: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.axes_dims_rope, list):
            object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        extra = self.extra_condition_channels
        if type(extra) is not int or not 0 <= extra <= 1024:
            raise ConfigError(f"Qwen-Image ControlNet config: extra_condition_channels={extra!r} is not a count")
        self.base()

    def base(self) -> QwenImageConfig:
        """The transformer config of the copy (its checks are the base model's)."""
        names = {f.name for f in dataclasses.fields(QwenImageConfig)}
        return QwenImageConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_channels(self) -> int:
        return self.in_channels // (PATCH * PATCH)

    @property
    def control_channels(self) -> int:
        """Channels of the unpacked control latent: the latent's and the extra ones (a mask: 16 + 1)."""
        return (self.in_channels + self.extra_condition_channels) // (PATCH * PATCH)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> QwenImageControlNetConfig:
        """A diffusers ``config.json`` of a ``QwenImageControlNetModel``; unknown keys are refused in one line."""
        values = config_values(cls, config, "QwenImageControlNetModel", "Qwen-Image")
        if values.get("extra_condition_channels", 0) % (PATCH * PATCH):
            raise ConfigError(
                f"Qwen-Image ControlNet config: extra_condition_channels={values['extra_condition_channels']} is not "
                "a multiple of 4 (2x2 patches)"
            )
        try:
            return cls(**values)
        except TypeError as e:
            raise ConfigError(f"Qwen-Image ControlNet config: {e}") from None

    def to_diffusers(self) -> dict[str, Any]:
        out: dict[str, Any] = {"_class_name": "QwenImageControlNetModel"}
        out.update(dataclasses.asdict(self))
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return out


class QwenImageControlNet(nn.Module):
    """A Qwen-Image ControlNet: ``forward(latent, control_latent, timestep, text, text_mask, conditioning_scale)``
    -> the residuals of its blocks for :meth:`sdengine.models.qwen_image.QwenImageTransformer.forward`."""

    family = "qwen_image"

    def __init__(self, config: QwenImageControlNetConfig) -> None:
        super().__init__()
        self.config = config
        self.name = ""  # the file it came from (set by the loader)
        dim, heads, hd = config.hidden_size, config.num_attention_heads, config.attention_head_dim
        self.time_text_embed = TimeEmbedding(dim)
        self.txt_norm = nn.RMSNorm(config.joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(config.in_channels, dim)
        self.txt_in = nn.Linear(config.joint_attention_dim, dim)
        self.transformer_blocks = nn.ModuleList(DualStreamBlock(dim, heads, hd) for _ in range(config.num_layers))
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_layers))
        self.controlnet_x_embedder = nn.Linear(config.in_channels + config.extra_condition_channels, dim)
        self._rope: Any = None

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.weight.dtype

    def forward(
        self,
        hidden_states: Tensor,
        controlnet_cond: Tensor,
        timestep: Tensor,
        encoder_hidden_states: Tensor,
        encoder_hidden_states_mask: Tensor | None = None,
        conditioning_scale: float = 1.0,
        *,
        rope_centre: str = "diffusers",
    ) -> list[Tensor]:
        """The latent (B, 16, H, W) and the control latent (B, 16 [+ 1 mask], H, W) (both unpacked), ``timestep``
        (B,) on 0..1000, the text states (B, L, joint_attention_dim) and their mask (B, L) or None -> one residual
        (B, N, dim) per block, each times ``conditioning_scale``; ``rope_centre``: how an odd grid is centred
        (:func:`sdengine.models.qwen_image.rope_tables`; "comfyui" on sdengine's ComfyUI route)."""
        cfg = self.config
        dtype = self.dtype
        B, C, H, W = hidden_states.shape
        if C != cfg.latent_channels or H % PATCH or W % PATCH:
            raise UsageError(
                f"Qwen-Image ControlNet: the latent must be (B, {cfg.latent_channels}, H, W) with even sides, "
                f"got {tuple(hidden_states.shape)}"
            )
        want = (B, cfg.control_channels, H, W)
        if tuple(controlnet_cond.shape) != want:
            raise UsageError(
                f"Qwen-Image ControlNet: the control latent must be {want}, got {tuple(controlnet_cond.shape)}"
            )
        text = encoder_hidden_states
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != cfg.joint_attention_dim:
            raise UsageError(
                f"Qwen-Image ControlNet: the text states must be ({B}, L, {cfg.joint_attention_dim}), "
                f"got {tuple(text.shape)}"
            )
        L = text.shape[1]
        x = self.img_in(pack_latents(hidden_states.to(dtype)))
        x = x + self.controlnet_x_embedder(pack_latents(controlnet_cond.to(dtype)))
        t = torch.as_tensor(timestep, device=x.device, dtype=torch.float32)
        t = t.expand(B) if t.ndim == 0 else t
        vec = self.time_text_embed(t / 1000.0, dtype)
        mask = None
        if encoder_hidden_states_mask is not None:
            if tuple(encoder_hidden_states_mask.shape) != (B, L):
                raise UsageError(
                    f"Qwen-Image ControlNet: the text mask must be ({B}, {L}), "
                    f"got {tuple(encoder_hidden_states_mask.shape)}"
                )
            image = torch.ones(B, (H // PATCH) * (W // PATCH), dtype=torch.bool, device=x.device)
            mask = torch.cat([encoder_hidden_states_mask.to(device=x.device, dtype=torch.bool), image], dim=1)
        context = self.txt_in(self.txt_norm(text.to(dtype)))
        key = (H // PATCH, W // PATCH, L, x.device, rope_centre)
        if self._rope is None or self._rope[0] != key:
            cos, sin = rope_tables(H // PATCH, W // PATCH, L, cfg.axes_dims_rope, rope_centre)
            self._rope = (key, (cos.to(x.device), sin.to(x.device)))
        rope = self._rope[1]
        out: list[Tensor] = []
        for block, proj in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            x, context = block(x, context, vec, rope, mask)
            out.append(proj(x) * conditioning_scale)
        return out


__all__ = ["INPAINT_EXTRA", "QwenImageControlNet", "QwenImageControlNetConfig"]
