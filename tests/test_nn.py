"""Shared blocks: the attention wrapper against the textbook formula, embeddings against diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from sdengine.nn import Attention, SpatialTransformer, scaled_dot_product_attention, timestep_embedding


def _naive_attention(q, k, v, heads, mask=None):
    B, Lq, inner = q.shape
    d = inner // heads
    q, k, v = (z.reshape(B, -1, heads, d).transpose(1, 2).double() for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if mask is not None:
        scores = scores + mask.double()
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(B, Lq, inner)


def test_sdpa_matches_formula_with_and_without_mask() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 24, generator=g) for n in (5, 7, 7))
    assert torch.allclose(scaled_dot_product_attention(q, k, v, 3).double(), _naive_attention(q, k, v, 3), atol=1e-5)
    mask = torch.zeros(2, 1, 5, 7)
    mask[..., -2:] = float("-inf")  # e.g. padding tokens
    got = scaled_dot_product_attention(q, k, v, 3, mask=mask)
    assert torch.allclose(got.double(), _naive_attention(q, k, v, 3, mask), atol=1e-5)
    assert torch.allclose(got, scaled_dot_product_attention(q, k[:, :5], v[:, :5], 3), atol=1e-5)


def test_sdpa_causal_and_upcast() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 6, 16, generator=g) for _ in range(3))
    causal = torch.full((6, 6), float("-inf")).triu(1)
    want = _naive_attention(q, k, v, 2, causal)
    assert torch.allclose(scaled_dot_product_attention(q, k, v, 2, is_causal=True).double(), want, atol=1e-5)
    half = scaled_dot_product_attention(q.half(), k.half(), v.half(), 2, upcast=True)
    assert half.dtype == torch.float16 and torch.allclose(half.double(), _naive_attention(q, k, v, 2), atol=5e-3)


def test_timestep_embedding_matches_diffusers() -> None:
    emb_mod = pytest.importorskip("diffusers.models.embeddings")
    t = torch.tensor([0.0, 1.0, 17.5, 999.0])
    for dim, flip, shift in [(32, True, 0), (33, False, 1), (320, True, 0)]:
        want = emb_mod.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        got = timestep_embedding(t, dim, flip_sin_to_cos=flip, freq_shift=shift)
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6)


def test_cross_attention_uses_context_dim() -> None:
    attn = Attention(32, 4, 8, cross_attention_dim=12)
    out = attn(torch.randn(2, 9, 32), torch.randn(2, 5, 12))
    assert out.shape == (2, 9, 32)
    assert attn.to_k.weight.shape == (32, 12) and attn.to_q.bias is None and attn.to_out[0].bias is not None


@pytest.mark.parametrize("linear", [False, True])
def test_spatial_transformer_shapes_and_key_names(linear: bool) -> None:
    st = SpatialTransformer(32, 4, cross_attention_dim=16, use_linear_projection=linear)
    x = torch.randn(2, 32, 5, 3)
    assert st(x, torch.randn(2, 7, 16)).shape == x.shape
    keys = set(st.state_dict())
    assert {
        "norm.weight",
        "proj_in.weight",
        "transformer_blocks.0.attn2.to_k.weight",
        "transformer_blocks.0.ff.net.0.proj.weight",
        "transformer_blocks.0.ff.net.2.weight",
        "transformer_blocks.0.norm3.bias",
        "proj_out.bias",
    } <= keys
    assert st.proj_in.weight.ndim == (2 if linear else 4)
