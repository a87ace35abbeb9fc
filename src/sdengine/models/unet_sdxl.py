"""SDXL's U-Net (Podell et al. 2023, "SDXL: Improving Latent Diffusion Models for High-Resolution Image
Synthesis"): the presets of the base and refiner layouts, and the added-conditioning vector.

The network itself is :class:`sdengine.models.unet.UNet`; what SDXL adds is configuration (a transformer
depth per level, no attention at the highest resolution, linear projections) and "micro-conditioning":
the pooled text embedding of the second text encoder plus sinusoidal features of a few numbers (base:
original size, crop top-left, target size, six numbers; refiner: original size, crop top-left and an
aesthetic score, five numbers) form one vector that an MLP (``add_embedding``) adds to the timestep
embedding. sgm calls that vector the ``"vector"`` conditioning; it is what this module builds.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sdengine.errors import GenerationError
from sdengine.models.config_checks import ConfigError
from sdengine.models.unet import UNetConfig
from sdengine.nn.embeddings import timestep_embedding


def text_time_vector(text_embeds: Tensor, time_ids: Tensor, cfg: UNetConfig) -> Tensor:
    """(B, P) pooled text and (B, K) size/crop/score numbers -> the (B, P + K * addition_time_embed_dim)
    vector that a text_time U-Net takes as ``class_labels``. The features are float32 and come back in
    ``text_embeds``' dtype."""
    if cfg.addition_time_embed_dim is None or cfg.projection_class_embeddings_input_dim is None:
        raise ConfigError("this U-Net has no text_time (SDXL) added conditioning")
    if text_embeds.ndim != 2 or time_ids.ndim != 2 or text_embeds.shape[0] != time_ids.shape[0]:
        raise GenerationError(
            f"text_embeds (B, P) and time_ids (B, K) expected, "
            f"got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}"
        )
    b, k = time_ids.shape
    width = text_embeds.shape[1] + k * cfg.addition_time_embed_dim
    if width != cfg.projection_class_embeddings_input_dim:
        raise GenerationError(
            f"pooled text ({text_embeds.shape[1]}) + {k} numbers x {cfg.addition_time_embed_dim} = {width}, "
            f"but the U-Net's add_embedding takes {cfg.projection_class_embeddings_input_dim}"
        )
    feats = timestep_embedding(
        time_ids.reshape(-1),
        cfg.addition_time_embed_dim,
        flip_sin_to_cos=cfg.flip_sin_to_cos,
        freq_shift=cfg.freq_shift,
    ).reshape(b, -1)  # (B, K * dim): one block of features per number, in order
    return torch.cat([text_embeds, feats.to(device=text_embeds.device, dtype=text_embeds.dtype)], dim=-1)


def time_id_count(cfg: UNetConfig, pooled_dim: int) -> int:
    """How many size/crop/score numbers the U-Net's vector holds (6 for the base, 5 for the refiner)."""
    if cfg.addition_time_embed_dim is None or cfg.projection_class_embeddings_input_dim is None:
        raise ConfigError("this U-Net has no text_time (SDXL) added conditioning")
    k, rest = divmod(cfg.projection_class_embeddings_input_dim - pooled_dim, cfg.addition_time_embed_dim)
    if rest or k < 1:
        raise ConfigError(
            f"add_embedding input {cfg.projection_class_embeddings_input_dim} is not {pooled_dim} pooled text "
            f"+ a whole number of {cfg.addition_time_embed_dim}-wide features"
        )
    return k


# stabilityai/stable-diffusion-xl-base-1.0's U-Net: 2.57 B parameters.
SDXL_BASE = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    attention=("none", "cross", "cross"),
    num_heads=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    transformer_layers_per_block=(1, 2, 10),
    projection_class_embeddings_input_dim=2816,  # 1280 pooled + 6 x 256
    addition_time_embed_dim=256,
)
# stabilityai/stable-diffusion-xl-refiner-1.0: bigG states only (1280), aesthetic score instead of the
# target size (1280 + 5 x 256).
SDXL_REFINER = UNetConfig(
    in_channels=4,
    out_channels=4,
    sample_size=128,
    block_out_channels=(384, 768, 1536, 1536),
    layers_per_block=2,
    attention=("none", "cross", "cross", "none"),
    num_heads=(6, 12, 24, 24),
    cross_attention_dim=1280,
    use_linear_projection=True,
    transformer_layers_per_block=4,
    projection_class_embeddings_input_dim=2560,
    addition_time_embed_dim=256,
)
# Tiny versions for tests: same block types, per-level depth and conditioning, a fraction of the width.
TINY_SDXL = dataclasses.replace(
    SDXL_BASE,
    sample_size=16,
    block_out_channels=(32, 64),
    attention=("none", "cross"),
    num_heads=(2, 4),
    cross_attention_dim=80,  # 32 (CLIP-L) + 48 (bigG)
    transformer_layers_per_block=(1, 2),
    projection_class_embeddings_input_dim=32 + 6 * 8,
    addition_time_embed_dim=8,
    norm_num_groups=8,
)
TINY_SDXL_REFINER = dataclasses.replace(
    SDXL_REFINER,
    sample_size=16,
    block_out_channels=(32, 64, 64),
    attention=("none", "cross", "none"),
    num_heads=(2, 4, 4),
    cross_attention_dim=48,
    transformer_layers_per_block=2,
    projection_class_embeddings_input_dim=32 + 5 * 8,
    addition_time_embed_dim=8,
    norm_num_groups=8,
)
PRESETS: dict[str, UNetConfig] = {
    "sdxl_base": SDXL_BASE,
    "sdxl_refiner": SDXL_REFINER,
    "tiny_sdxl": TINY_SDXL,
    "tiny_sdxl_refiner": TINY_SDXL_REFINER,
}

__all__ = [
    "PRESETS",
    "SDXL_BASE",
    "SDXL_REFINER",
    "TINY_SDXL",
    "TINY_SDXL_REFINER",
    "text_time_vector",
    "time_id_count",
]
