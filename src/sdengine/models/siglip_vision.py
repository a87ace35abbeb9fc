"""SigLIP's vision tower (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training"): the image encoder of
FLUX.1 Redux (``siglip-so400m-patch14-384``).

The network is a ViT without a class token: the image is cut into ``patch_size`` squares by a biased convolution,
learned position embeddings (one per patch) are added, a stack of pre-LayerNorm transformer layers follows (full
self-attention with biased projections, a two-layer MLP with tanh-approximated GELU), and a final LayerNorm
(``post_layernorm``) gives ``last_hidden_state`` (B, N, C), the tokens Redux reads. SigLIP's attention-pooling head
(``head.*``) is not built: Redux reads no pooled output; its weights in a file are read past.

Parameter names are those of transformers' ``SiglipVisionModel`` (``vision_model.embeddings.patch_embedding.weight``,
``vision_model.encoder.layers.N.self_attn.q_proj.weight``, ``vision_model.post_layernorm.weight``), which ComfyUI's
``sigclip_vision_patch14_384.safetensors`` uses too. File handling is in :mod:`sdengine.weights.siglip_file`.

:func:`siglip_image_tensor` is transformers' ``SiglipImageProcessor`` with its defaults: each image squashed to
``size`` x ``size`` (no crop, aspect not kept) by PIL's bicubic filter on the 8-bit pixels, divided by 255,
normalised with mean 0.5 and std 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.clip_vision import ImageLike, VisionEncoder, processor_rgb
from sdengine.models.config_checks import ConfigError, check_config

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class SiglipVisionConfig:
    """transformers' ``SiglipVisionConfig`` numbers; the defaults are ``siglip-so400m-patch14-384``'s."""

    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"  # SigLIP's only activation (from_transformers refuses others)

    def __post_init__(self) -> None:
        check_config("clip_vision", self)  # the same fields and bounds as CLIP's tower
        if self.hidden_act != "gelu_pytorch_tanh":
            raise ConfigError(
                f"SigLIP vision config: hidden_act {self.hidden_act!r} is not supported (gelu_pytorch_tanh)"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"SigLIP vision config: hidden_size {self.hidden_size} not divisible by {self.num_heads} heads"
            )
        if self.num_patches > 16384 or self.image_size < self.patch_size:
            raise ConfigError(
                f"SigLIP vision config: image_size {self.image_size} with patch_size {self.patch_size} gives "
                f"{self.num_patches} patches (1 to 16384)"
            )

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> SiglipVisionConfig:
        """From a transformers ``SiglipVisionConfig`` dict or a full ``SiglipConfig`` (its ``vision_config``);
        missing keys take transformers' defaults."""
        vision = config.get("vision_config")
        if isinstance(vision, dict):
            config = vision
        named = {
            "hidden_size": config.get("hidden_size", 768),
            "intermediate_size": config.get("intermediate_size", 3072),
            "num_hidden_layers": config.get("num_hidden_layers", 12),
            "num_attention_heads": config.get("num_attention_heads", 12),
            "patch_size": config.get("patch_size", 16),
            "image_size": config.get("image_size", 224),
            "layer_norm_eps": config.get("layer_norm_eps", 1e-6),
        }
        check_config("clip_vision", named)
        act = config.get("hidden_act", "gelu_pytorch_tanh")
        if act != "gelu_pytorch_tanh":
            raise ConfigError(f"SigLIP vision config: hidden_act {act!r} is not supported (gelu_pytorch_tanh)")
        if config.get("num_channels", 3) != 3:
            raise ConfigError(f"SigLIP vision config: num_channels={config.get('num_channels')!r}, only 3 (RGB)")
        raw = dict(named, num_layers=named.pop("num_hidden_layers"), num_heads=named.pop("num_attention_heads"))
        return cls(**raw)


SO400M_384 = SiglipVisionConfig()
TINY = SiglipVisionConfig(hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, patch_size=4, image_size=16)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(cfg.num_patches, c)

    def forward(self, pixel_values: Tensor) -> Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=w.dtype))  # (B, C, g, g)
        return patches.flatten(2).transpose(1, 2) + self.position_embedding.weight  # (B, g*g, C), row-major


class SiglipTransformer(nn.Module):
    def __init__(self, cfg: SiglipVisionConfig) -> None:
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = VisionEncoder(cfg)  # CLIP's layer stack, with SigLIP's tanh GELU
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class SiglipVisionModel(nn.Module):
    """SigLIP's image tower under transformers' ``SiglipVisionModel`` names (no pooling head); ``forward`` gives
    ``last_hidden_state`` (B, (image/patch)^2, C), post-LayerNorm'd."""

    def __init__(self, config: SiglipVisionConfig = SO400M_384) -> None:
        super().__init__()
        self.config = config
        self.vision_model = SiglipTransformer(config)
        self.name = ""  # the file it came from (set by the loader)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.encode(pixel_values)[0]

    def encode(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """(``last_hidden_state``: the last layer's output post-LayerNorm'd, the penultimate layer's output as it
        is: transformers' ``hidden_states[-2]``), each (B, N, C)."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise UsageError(
                f"SigLIP vision encoder takes pixel values of shape (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}"
            )
        vm = self.vision_model
        x = vm.embeddings(pixel_values)
        prev = x
        for layer in vm.encoder.layers:
            prev = x
            x = layer(x)
        return vm.post_layernorm(x), prev

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"width={c.hidden_size}, layers={c.num_layers}, heads={c.num_heads}, patch={c.patch_size}, "
            f"image={c.image_size}"
        )


def siglip_image_tensor(images: ImageLike | Sequence[ImageLike], size: int = 384) -> Tensor:
    """PIL images or uint8 arrays (H, W[, C]) -> float32 pixel values (B, 3, size, size), as transformers'
    ``SiglipImageProcessor`` makes them with its defaults (and ``do_convert_rgb``): to RGB (grey replicated,
    transparency composited onto white), resized to ``size`` x ``size`` by PIL's bicubic filter on the 8-bit pixels
    (aspect not kept, no crop), divided by 255, ``(x - 0.5) / 0.5``."""
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
        raise UsageError(f"SigLIP image size must be an integer from 1 to 4096, got {size!r}")
    items = [images] if isinstance(images, Image.Image | np.ndarray) else list(images)
    if not items:
        raise UsageError("no images to encode")
    mean = np.asarray(SIGLIP_MEAN, dtype=np.float32)
    std = np.asarray(SIGLIP_STD, dtype=np.float32)
    out = []
    for i, item in enumerate(items):
        im = processor_rgb(item, i).resize((size, size), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(im).astype(np.float64) * (1 / 255)).astype(np.float32)  # as transformers rescales
        out.append(torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy()))
    return torch.stack(out)


__all__ = [
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "SO400M_384",
    "TINY",
    "SiglipVisionConfig",
    "SiglipVisionModel",
    "siglip_image_tensor",
]
