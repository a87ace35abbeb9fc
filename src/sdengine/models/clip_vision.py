"""CLIP vision encoder (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; the image tower is a ViT, Dosovitskiy et al. 2021), the image encoder IP-Adapter conditions on.

The network: the image is cut into ``patch_size`` squares by a bias-free convolution, a learned class token
is put in front, learned position embeddings are added, a LayerNorm ("pre_layrnorm", transformers' spelling)
precedes a stack of pre-LayerNorm transformer layers (full, non-causal self-attention and a two-layer MLP with
quick_gelu or exact gelu); the class token's final state, LayerNorm'd ("post_layernorm"), is the pooled
output, and a bias-free Linear ("visual_projection") maps it into the joint image-text space.

Parameter names are those of transformers' ``CLIPVisionModelWithProjection`` as saved on disk
(``vision_model.embeddings.patch_embedding.weight``, ``vision_model.encoder.layers.N.self_attn.q_proj.weight``,
..., ``visual_projection.weight``), so such a state dict loads with a strict ``load_state_dict`` after
:func:`hf_key` (which only drops the constant ``position_ids`` buffer). File handling is in
:mod:`sdengine.weights.clip_vision_file`.

IP-Adapter reads ``image_embeds`` (the plain adapters) or ``penultimate_hidden_state`` (the hidden states of
the second-to-last layer, transformers' ``hidden_states[-2]``, before any LayerNorm; the "Plus" adapters).

:func:`clip_image_tensor` is the preprocessing of transformers' ``CLIPImageProcessor`` with its defaults (what
ViT-L/14 and ViT-H/14 ship): shortest side to ``size`` (bicubic), centre crop, scale to [0, 1], normalise with
OpenAI CLIP's mean and std.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from sdengine.errors import UsageError
from sdengine.models.clip_text import quick_gelu
from sdengine.models.config_checks import ConfigError, check_config
from sdengine.nn.attention import scaled_dot_product_attention

Activation = Literal["quick_gelu", "gelu"]

# OpenAI CLIP's per-channel statistics of its training images (RGB), which every CLIP ViT release normalises
# with (OpenCLIP's ViT-H/bigG too).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    projection_dim: int | None = 1024
    layer_norm_eps: float = 1e-5
    hidden_act: Activation = "gelu"

    def __post_init__(self) -> None:
        check_config("clip_vision", self)  # every number bounded before anything reads it
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"CLIP vision config: hidden_size {self.hidden_size} not divisible by {self.num_heads} heads"
            )
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"CLIP vision config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size}"
            )
        if self.num_patches > 16384:
            raise ConfigError(f"CLIP vision config: {self.num_patches} patches per image (limit 16384)")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"CLIP vision config: unsupported hidden_act {self.hidden_act!r} (quick_gelu or gelu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_transformers(cls, config: dict[str, Any]) -> CLIPVisionConfig:
        """From a transformers ``CLIPVisionConfig`` dict (``image_encoder/config.json``) or a full ``CLIPConfig``
        dict (its ``vision_config``). Missing keys take transformers' defaults (ViT-B/32's numbers)."""
        projection = config.get("projection_dim", 512)
        vision = config.get("vision_config")
        if isinstance(vision, dict):  # a full CLIPConfig: the projection width is one level up
            config = vision
        named = {  # transformers' names, so that an error names the file's field
            "hidden_size": config.get("hidden_size", 768),
            "intermediate_size": config.get("intermediate_size", 3072),
            "num_hidden_layers": config.get("num_hidden_layers", 12),
            "num_attention_heads": config.get("num_attention_heads", 12),
            "patch_size": config.get("patch_size", 32),
            "image_size": config.get("image_size", 224),
            "projection_dim": projection,
            "layer_norm_eps": config.get("layer_norm_eps", 1e-5),
        }
        check_config("clip_vision", named)  # before anything could coerce 1.5 or "16"
        channels = config.get("num_channels", 3)
        if channels != 3:
            raise ConfigError(f"CLIP vision config: num_channels={channels!r}, only 3 (RGB) is supported")
        raw = dict(named, num_layers=named.pop("num_hidden_layers"), num_heads=named.pop("num_attention_heads"))
        return cls(**raw, hidden_act=config.get("hidden_act", "quick_gelu"))

    def to_transformers(self) -> dict[str, Any]:
        """A transformers ``CLIPVisionConfig`` dict describing the same network."""
        return {
            "architectures": ["CLIPVisionModelWithProjection"],
            "model_type": "clip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "patch_size": self.patch_size,
            "image_size": self.image_size,
            "projection_dim": self.projection_dim,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": self.hidden_act,
            "num_channels": 3,
        }


# OpenCLIP ViT-H/14 (laion2B): the image encoder of IP-Adapter SD 1.5 / "plus" and of ComfyUI's clip_vision_h.
VIT_H = CLIPVisionConfig()
# OpenCLIP ViT-bigG/14: IP-Adapter SDXL's (non-"vit-h") image encoder, ComfyUI's clip_vision_g.
VIT_BIGG = CLIPVisionConfig(hidden_size=1664, intermediate_size=8192, num_layers=48, projection_dim=1280)
# OpenAI CLIP ViT-L/14.
VIT_L = CLIPVisionConfig(
    hidden_size=1024, intermediate_size=4096, num_layers=24, projection_dim=768, hidden_act="quick_gelu"
)
TINY = CLIPVisionConfig(
    hidden_size=32, intermediate_size=37, num_layers=3, num_heads=4, patch_size=4, image_size=32, projection_dim=24
)
PRESETS: dict[str, CLIPVisionConfig] = {"vit_h": VIT_H, "vit_bigg": VIT_BIGG, "vit_l": VIT_L, "tiny": TINY}


class CLIPVisionOutput(NamedTuple):
    image_embeds: Tensor  # (B, P): visual_projection(pooled); the pooled output itself without a projection
    last_hidden_state: Tensor  # (B, 1 + N, C): the last layer's output (no final LayerNorm)
    penultimate_hidden_state: Tensor  # (B, 1 + N, C): the second-to-last layer's output (transformers' [-2])
    pooled: Tensor  # (B, C): post_layernorm of the class token's last state
    hidden_states: tuple[Tensor, ...] | None = None  # pre_layrnorm'd embeddings, then each layer's output


class ViTLayers(Protocol):
    """The numbers a ViT's pre-LayerNorm layer stack reads (CLIP's and SigLIP's towers share it)."""

    @property
    def hidden_size(self) -> int: ...
    @property
    def intermediate_size(self) -> int: ...
    @property
    def num_layers(self) -> int: ...
    @property
    def num_heads(self) -> int: ...
    @property
    def layer_norm_eps(self) -> float: ...
    @property
    def hidden_act(self) -> str: ...


def _tanh_gelu(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# the MLP's activation by transformers' ``hidden_act`` name: exact (erf) GELU for OpenCLIP, tanh-approximated for
# SigLIP
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "quick_gelu": quick_gelu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": _tanh_gelu,
}


class VisionAttention(nn.Module):
    def __init__(self, cfg: ViTLayers) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, c)
        self.k_proj = nn.Linear(c, c)
        self.v_proj = nn.Linear(c, c)
        self.out_proj = nn.Linear(c, c)

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, T, C); every token attends to every token; scale 1/sqrt(head_dim)
        y = scaled_dot_product_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.out_proj(y)  # (B, T, C)


class VisionMLP(nn.Module):
    def __init__(self, cfg: ViTLayers) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionEncoderLayer(nn.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: ViTLayers) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEncoder(nn.Module):
    """The stack of :class:`VisionEncoderLayer` (``layers.N``), transformers' names."""

    def __init__(self, cfg: ViTLayers) -> None:
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(cfg) for _ in range(cfg.num_layers))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.patch_embedding = nn.Conv2d(3, c, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(c) * c**-0.5)
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, c)

    def forward(self, pixel_values: Tensor) -> Tensor:
        w = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=w.dtype))  # (B, C, g, g)
        patches = patches.flatten(2).transpose(1, 2)  # (B, g*g, C), row-major over the grid
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + g*g, C)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig) -> None:
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


def hf_key(key: str) -> str | None:
    """The parameter name of a transformers ``CLIPVisionModelWithProjection`` key in :class:`CLIPVisionModel`
    (the same name), or None for the constant ``position_ids`` buffer, which is not a weight."""
    if key == "vision_model.embeddings.position_ids":
        return None
    return key


class CLIPVisionModel(nn.Module):
    """CLIP's image tower with transformers' ``CLIPVisionModelWithProjection`` parameter names; the projection
    is absent when ``config.projection_dim`` is None."""

    def __init__(self, config: CLIPVisionConfig = VIT_H) -> None:
        super().__init__()
        self.config = config
        self.vision_model = VisionTransformer(config)
        self.visual_projection = (
            nn.Linear(config.hidden_size, config.projection_dim, bias=False) if config.projection_dim else None
        )
        self.name = ""  # the file it came from (set by the loader)

    def forward(self, pixel_values: Tensor, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Encode ``pixel_values`` (B, 3, image_size, image_size), normalised as :func:`clip_image_tensor` makes
        them."""
        s = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (3, s, s):
            raise UsageError(
                f"CLIP vision encoder takes pixel values of shape (B, 3, {s}, {s}), got {tuple(pixel_values.shape)}"
            )
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(pixel_values))  # (B, 1 + N, C)
        hidden = [x] if output_hidden_states else None
        prev = x
        for layer in vm.encoder.layers:
            prev = x
            x = layer(x)
            if hidden is not None:
                hidden.append(x)
        pooled = vm.post_layernorm(x[:, 0])  # (B, C)
        embeds = self.visual_projection(pooled) if self.visual_projection is not None else pooled
        return CLIPVisionOutput(embeds, x, prev, pooled, tuple(hidden) if hidden is not None else None)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"width={c.hidden_size}, layers={c.num_layers}, heads={c.num_heads}, patch={c.patch_size}, "
            f"image={c.image_size}, projection={c.projection_dim}, act={c.hidden_act}"
        )


ImageLike = Image.Image | np.ndarray


def processor_rgb(image: ImageLike, index: int) -> Image.Image:
    """An RGB PIL image of a processor's input (``index``: its place in the list, for errors); transparency is
    composited onto white (what transformers' ``convert_rgb`` does)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise UsageError(f"image {index}: a uint8 array is expected, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] in (3, 4))):
            raise UsageError(
                f"image {index}: an (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array is expected, got {image.shape}"
            )
        image = Image.fromarray(image)
    elif not isinstance(image, Image.Image):
        raise UsageError(f"image {index}: a PIL image or a uint8 array is expected, got {type(image).__name__}")
    if image.width < 1 or image.height < 1:
        raise UsageError(f"image {index} is empty ({image.width}x{image.height})")
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def clip_image_tensor(images: ImageLike | Sequence[ImageLike], size: int = 224) -> Tensor:
    """PIL images or uint8 arrays (H, W[, C]) -> float32 pixel values (B, 3, size, size) for the CLIP vision
    encoder, as transformers' ``CLIPImageProcessor`` makes them with its defaults.

    Each image: to RGB (grey replicated, transparency composited onto white); its shorter side resized to
    ``size`` and its longer side to ``int(size * long / short)`` with PIL's bicubic filter on the 8-bit pixels;
    the centre ``size`` x ``size`` crop (offsets rounded down); divided by 255; normalised with OpenAI CLIP's
    mean and std.
    """
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 4096:
        raise UsageError(f"CLIP image size must be an integer from 1 to 4096, got {size!r}")
    items = [images] if isinstance(images, Image.Image | np.ndarray) else list(images)
    if not items:
        raise UsageError("no images to encode")
    mean = np.asarray(CLIP_MEAN, dtype=np.float32)
    std = np.asarray(CLIP_STD, dtype=np.float32)
    out = []
    for i, item in enumerate(items):
        im = processor_rgb(item, i)
        w, h = im.size
        short, long = min(w, h), max(w, h)
        new_long = int(size * long / short)
        nw, nh = (size, new_long) if w <= h else (new_long, size)
        im = im.resize((nw, nh), resample=Image.Resampling.BICUBIC)
        top, left = (nh - size) // 2, (nw - size) // 2
        a = np.asarray(im)[top : top + size, left : left + size]  # (size, size, 3) uint8
        if a.shape[:2] != (size, size):  # new_long rounds down: int(size * long / short) >= size always
            raise UsageError(f"image {i} ({w}x{h}) cannot be cropped to {size}x{size}")
        x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)  # as transformers rescales
        out.append(torch.from_numpy(((x - mean) / std).transpose(2, 0, 1).copy()))
    return torch.stack(out)  # (B, 3, size, size)


__all__ = [
    "ACTIVATIONS",
    "CLIP_MEAN",
    "CLIP_STD",
    "PRESETS",
    "TINY",
    "VIT_BIGG",
    "VIT_H",
    "VIT_L",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionOutput",
    "VisionEncoder",
    "ViTLayers",
    "clip_image_tensor",
    "hf_key",
    "processor_rgb",
]
