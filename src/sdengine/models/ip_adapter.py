"""IP-Adapter's image projections (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for
Text-to-Image Diffusion Models", Tencent AI Lab): CLIP vision outputs -> image tokens of the U-Net's cross-attention
width, which the decoupled cross-attention (:mod:`sdengine.nn.ip_adapter`) attends to beside the text.

Three projections, told apart by the file's tensor names (parameter names are the original release's, so its
``image_proj`` state dict loads with a strict ``load_state_dict``):

* :class:`ImageProjModel` (``ip-adapter_sd15``, ``ip-adapter_sdxl``, ...): the pooled, projected CLIP image embedding
  ``[B, D]`` -> ``Linear(D, tokens * C)`` -> ``[B, tokens, C]`` -> LayerNorm (4 tokens in every release);
* :class:`MLPProjModel` (``ip-adapter-full-face``): the penultimate hidden states ``[B, 257, H]`` -> Linear, GELU,
  Linear, LayerNorm, one token per CLIP token;
* :class:`Resampler` (the "Plus" adapters): a perceiver resampler (Jaegle et al. 2021; Alayrac et al. 2022) from the
  penultimate hidden states ``[B, 257, H]`` to ``num_queries`` (16) tokens: learned latent queries, ``proj_in``, layers
  of (:class:`PerceiverAttention`: the latents attend to the projected image tokens and to themselves; a feed-forward),
  ``proj_out``, ``norm_out``.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdengine.errors import UsageError

# the width of one perceiver attention head in every IP-Adapter Plus release (the heads are counted from it)
PERCEIVER_HEAD_DIM = 64


class ImageProjModel(nn.Module):
    """``[B, D]`` image embedding -> ``[B, tokens, C]`` (keys ``proj.*``, ``norm.*``)."""

    def __init__(self, embed_dim: int, cross_dim: int, tokens: int = 4) -> None:
        super().__init__()
        self.tokens = tokens
        self.cross_dim = cross_dim
        self.proj = nn.Linear(embed_dim, tokens * cross_dim)
        self.norm = nn.LayerNorm(cross_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        x = self.proj(embeds)  # (B, tokens * C)
        return self.norm(x.reshape(embeds.shape[0], self.tokens, self.cross_dim))  # (B, tokens, C)


class MLPProjModel(nn.Module):
    """``[B, L, H]`` hidden states -> ``[B, L, C]``: Linear(H, H), GELU, Linear(H, C), LayerNorm (keys ``proj.0``,
    ``proj.2``, ``proj.3``)."""

    def __init__(self, embed_dim: int, cross_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.GELU(), nn.Linear(embed_dim, cross_dim), nn.LayerNorm(cross_dim)
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.proj(hidden)


class PerceiverAttention(nn.Module):
    """The latents ``[B, Q, W]`` attend to ``cat(image tokens, latents)`` (both layer-normed first: ``norm1`` the
    image tokens, ``norm2`` the latents); keys and values from one product ``to_kv``; no biases."""

    def __init__(self, width: int, heads: int, head_dim: int = PERCEIVER_HEAD_DIM) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.to_q = nn.Linear(width, inner, bias=False)
        self.to_kv = nn.Linear(width, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, width, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        # x: (B, L, W) projected image tokens; latents: (B, Q, W)
        x = self.norm1(x)
        latents = self.norm2(latents)
        B, Q, _ = latents.shape
        q = self.to_q(latents)  # (B, Q, inner)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)  # (B, L + Q, inner) each
        h = self.heads

        def heads(t: Tensor) -> Tensor:
            return t.reshape(B, t.shape[1], h, -1).transpose(1, 2)  # (B, h, n, d)

        out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v))  # (B, h, Q, d)
        return self.to_out(out.transpose(1, 2).reshape(B, Q, -1))  # (B, Q, W)


def _feed_forward(width: int, mult: int) -> nn.Sequential:
    """LayerNorm, Linear(W, mult W), GELU, Linear(mult W, W), no biases (keys ``0``, ``1``, ``3``)."""
    return nn.Sequential(
        nn.LayerNorm(width),
        nn.Linear(width, width * mult, bias=False),
        nn.GELU(),
        nn.Linear(width * mult, width, bias=False),
    )


class Resampler(nn.Module):
    """``[B, L, E]`` hidden states -> ``[B, num_queries, C]`` (IP-Adapter Plus; keys ``latents``, ``proj_in``,
    ``layers.N.0`` (:class:`PerceiverAttention`), ``layers.N.1`` (feed-forward), ``proj_out``, ``norm_out``)."""

    def __init__(
        self, embed_dim: int, width: int, cross_dim: int, *, depth: int, heads: int, num_queries: int, ff_mult: int = 4
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, width) / width**0.5)
        self.proj_in = nn.Linear(embed_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(width, heads), _feed_forward(width, ff_mult)]) for _ in range(depth)
        )
        self.proj_out = nn.Linear(width, cross_dim)
        self.norm_out = nn.LayerNorm(cross_dim)

    def forward(self, hidden: Tensor) -> Tensor:
        latents = self.latents.expand(hidden.shape[0], -1, -1)  # (B, Q, W)
        x = self.proj_in(hidden)  # (B, L, W)
        for layer in self.layers:
            attn, ff = cast(nn.ModuleList, layer)
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))  # (B, Q, C)


KINDS = ("plain", "full", "plus")
FAMILIES = ("unet", "flux")  # sdengine.nn.ip_adapter.FAMILIES: SD 1.x / 2.x / SDXL U-Nets, FLUX.1's transformer


class IPAdapter(nn.Module):
    """A loaded IP-Adapter: its image projection (``image_proj``, one of the three above by ``kind``) and, for each
    cross-attention layer of the U-Net in the file's order (:func:`sdengine.nn.ip_adapter.cross_attention_layers`),
    the key and value projections of the image tokens (``to_k_ip.i`` / ``to_v_ip.i``: ``Linear(C, width)``, no bias).
    ``embed_dim``: the width of the CLIP vision output it reads (the image embedding's for "plain", the hidden
    states' for "full" and "plus").

    ``family`` "flux": a FLUX.1 adapter (XLabs' ``flux-ip-adapter``): one key / value pair per double-stream block of
    the transformer, ``Linear(C, width)`` with a bias, ``C`` the width of T5's states (4096)."""

    def __init__(
        self,
        kind: str,
        image_proj: nn.Module,
        embed_dim: int,
        cross_dim: int,
        widths: list[int],
        name: str = "",
        *,
        family: str = "unet",
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise UsageError(f"unknown IP-Adapter kind {kind!r}")
        if family not in FAMILIES:
            raise UsageError(f"unknown IP-Adapter family {family!r}")
        self.kind = kind
        self.family = family
        self.image_proj = image_proj
        self.embed_dim = embed_dim
        self.cross_dim = cross_dim
        self.name = name or "IP-Adapter"
        bias = family == "flux"
        self.to_k_ip = nn.ModuleList(nn.Linear(cross_dim, w, bias=bias) for w in widths)
        self.to_v_ip = nn.ModuleList(nn.Linear(cross_dim, w, bias=bias) for w in widths)

    @property
    def reads_hidden_states(self) -> bool:
        """Whether it reads the CLIP vision model's penultimate hidden states (else its pooled image embedding)."""
        return self.kind != "plain"

    def input_shape(self) -> str:
        """What :meth:`forward` takes, in words (for errors)."""
        if self.reads_hidden_states:
            return f"[images, tokens, {self.embed_dim}] penultimate CLIP vision hidden states"
        return f"[images, {self.embed_dim}] CLIP image embeddings"

    def forward(self, embeds: Tensor) -> Tensor:
        """The image tokens ``[n, k * T, C]`` of CLIP vision outputs for ``n`` rows of ``k`` images each:
        ``[n, D]`` / ``[n, k, D]`` image embeddings ("plain"), ``[n, L, H]`` / ``[n, k, L, H]`` hidden states (the
        others); a single image's (``[D]``, ``[L, H]``) is one row. The ``k`` images' tokens follow each other."""
        one = 1 if self.reads_hidden_states else 0  # the dims of one image's input, less one
        if embeds.dim() == one + 1:
            embeds = embeds.unsqueeze(0)
        if embeds.dim() == one + 2:
            embeds = embeds.unsqueeze(1)  # (n, 1, ...)
        if embeds.dim() != one + 3 or embeds.shape[-1] != self.embed_dim:
            raise UsageError(f"{self.name} takes {self.input_shape()}, got a tensor of shape {tuple(embeds.shape)}")
        n, k = embeds.shape[:2]
        param = next(self.parameters())
        tokens = self.image_proj(embeds.reshape(n * k, *embeds.shape[2:]).to(param.device, param.dtype))
        return tokens.reshape(n, k * tokens.shape[1], tokens.shape[2])  # (n, k * T, C)


__all__ = [
    "FAMILIES",
    "KINDS",
    "PERCEIVER_HEAD_DIM",
    "IPAdapter",
    "ImageProjModel",
    "MLPProjModel",
    "PerceiverAttention",
    "Resampler",
]
