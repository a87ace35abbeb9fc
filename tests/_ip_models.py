"""Random IP-Adapters and CLIP vision encoders for the IP-Adapter tests (test_ip_adapter*, test_comfy_ipadapter):
an adapter of each kind for a U-Net's cross-attention layers, and a tiny transformers
``CLIPVisionModelWithProjection`` (the oracle's model; sdengine reads what it saves), every weight moved off its
default so that a wrong mapping shows."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sdengine.models.ip_adapter import ImageProjModel, IPAdapter, MLPProjModel, Resampler
from sdengine.nn.ip_adapter import cross_attention_layers


def random_adapter(
    unet: Any,
    kind: str,
    embed: int,
    seed: int,
    *,
    width: int = 128,
    depth: int = 4,
    heads: int = 2,
    queries: int = 16,
    jitter: float = 0.3,
    drop_last: bool = False,
) -> IPAdapter:
    """A random adapter of ``kind`` ("plain": reads image embeddings of width ``embed``; "full" / "plus": hidden
    states of width ``embed``; Plus's resampler ``width`` wide, ``depth`` layers of ``heads`` heads of 64, ``queries``
    tokens) for ``unet``; ``drop_last``: one layer short (made for another model)."""
    torch.manual_seed(seed)
    layers = cross_attention_layers(unet)
    cross = layers[0].to_k.in_features
    proj: nn.Module
    if kind == "plain":
        proj = ImageProjModel(embed, cross, 4)
    elif kind == "full":
        proj = MLPProjModel(embed, cross)
    else:
        proj = Resampler(embed, width, cross, depth=depth, heads=heads, num_queries=queries)
    widths = [layer.to_k.out_features for layer in layers]
    adapter = IPAdapter(kind, proj, embed, cross, widths[:-1] if drop_last else widths)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * (jitter if p.dim() > 1 else 0.1))
    return adapter.eval()


def random_encoder(
    hidden: int, projection: int, seed: int = 0, *, layers: int = 2, heads: int = 4, intermediate: int = 64
) -> Any:
    """A random transformers ``CLIPVisionModelWithProjection``: ``hidden`` wide, image embeddings of ``projection``,
    patch 8 on 32x32 pixels, gelu (what sdengine infers for a width other than 1024)."""
    import transformers

    cfg = transformers.CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=8,
        image_size=32,
        projection_dim=projection,
        hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return model
