"""Shared neural-network blocks (attention, residual blocks, embeddings, transformer) used by the models."""

from sdengine.nn.attention import Attention, SpatialSelfAttention, scaled_dot_product_attention
from sdengine.nn.embeddings import TimestepEmbedding, timestep_embedding
from sdengine.nn.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from sdengine.nn.transformer import BasicTransformerBlock, FeedForward, SpatialTransformer

__all__ = [
    "Attention",
    "BasicTransformerBlock",
    "Downsample2D",
    "FeedForward",
    "ResnetBlock2D",
    "SpatialSelfAttention",
    "SpatialTransformer",
    "TimestepEmbedding",
    "Upsample2D",
    "scaled_dot_product_attention",
    "timestep_embedding",
]
