"""SDXL's text encoders: the second one (OpenCLIP bigG layout, transformers' CLIPTextModelWithProjection)
on the same random weights as transformers: penultimate hidden states, pooled output at the EOS token and
its projection."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.models.clip_text import (
    TINY_SDXL_G,
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    add_projection_prefix,
)
from sdengine.text import CLIPTokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5


def _hf_model(cfg: CLIPTextConfig, seed: int = 0):
    d = cfg.to_transformers()
    d["architectures"] = ["CLIPTextModelWithProjection"]
    hf_cfg = transformers.CLIPTextConfig(**d)
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.CLIPTextModelWithProjection(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _ids() -> torch.Tensor:
    # SDXL's second tokenizer pads with "!" (id 0), so the EOS is not the only 49407 in a row.
    ids = CLIPTokenizer.load()(["a photo of a cat", "", "masterpiece, a castle at sunset"], pad_token_id=0)
    return ids


@pytest.mark.parametrize("pooled_rule", ["argmax", "first_eos"])
def test_with_projection_parity(pooled_rule, tmp_path):
    cfg = dataclasses.replace(TINY_SDXL_G, pooled_rule=pooled_rule)
    hf = _hf_model(cfg)
    hf.save_pretrained(tmp_path)
    flat = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert "text_projection.weight" in flat
    # Both layouts: transformers 5 (no text_model. prefix) and transformers 4 (the hub's SDXL folders).
    legacy = add_projection_prefix(flat)
    assert "text_projection.weight" in legacy and "text_model.final_layer_norm.weight" in legacy
    ids = _ids()
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        for sd in (flat, legacy):
            ours = CLIPTextModelWithProjection.from_state_dict(sd, cfg).eval()
            out = ours(ids, output_hidden_states=True)
            assert (out.hidden_states[-2] - ref.hidden_states[-2]).abs().max().item() <= TOL
            assert (out.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
            assert (out.text_embeds - ref.text_embeds).abs().max().item() <= TOL
    assert out.text_embeds.shape == (3, cfg.projection_dim)


def test_config_round_trip_keeps_projection_dim():
    d = TINY_SDXL_G.to_transformers()
    assert d["projection_dim"] == TINY_SDXL_G.projection_dim
    assert CLIPTextConfig.from_transformers(d) == TINY_SDXL_G
