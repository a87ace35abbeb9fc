"""CLIP text encoder: parity with transformers' CLIPTextModel on the same random weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sdengine.models.clip_text import SD1, SD2, TINY_SD1, TINY_SD2, CLIPTextConfig, CLIPTextModel
from sdengine.text import SD1_PAD_TOKEN_ID, SD2_PAD_TOKEN_ID, CLIPTokenizer

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-4  # max abs difference, fp32

PROMPTS = [
    "a photo of a cat",
    "masterpiece, best quality, a castle on a hill at sunset, highly detailed",
    "",
    " ".join(["tree"] * 100),  # truncated: no padding at all
]

# text_encoder/config.json of the SD 1.5 and SD 2.1 diffusers folders (the keys that matter).
SD15_TEXT_ENCODER_CONFIG = {
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "pad_token_id": 1,
    "projection_dim": 768,
    "vocab_size": 49408,
}
SD21_TEXT_ENCODER_CONFIG = {
    **SD15_TEXT_ENCODER_CONFIG,
    "hidden_act": "gelu",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 512,
}


def _hf_model(cfg: CLIPTextConfig, seed: int = 0):
    hf_cfg = transformers.CLIPTextConfig(**cfg.to_transformers())
    hf_cfg._attn_implementation = "eager"  # the plain matmul-softmax path, independent of SDPA
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(hf_cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Perturb every tensor so that LayerNorm gains/biases and all biases matter.
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    return model


def _saved_state_dict(hf_model, tmp_path) -> dict[str, torch.Tensor]:
    """The state dict as a diffusers SD folder's text_encoder/model.safetensors holds it.

    transformers 5 saves CLIPTextModel without the ``text_model.`` prefix; the SD folders on the
    hub were written by transformers 4, with it. The prefix is added back here.
    """
    hf_model.save_pretrained(tmp_path)
    flat = safetensors_torch.load_file(str(tmp_path / "model.safetensors"))
    assert not any(k.startswith("text_model.") for k in flat)
    return {f"text_model.{k}": v for k, v in flat.items()}


def _inputs(pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = CLIPTokenizer.load()(PROMPTS, pad_token_id=pad)
    g = torch.Generator().manual_seed(3)
    rand = torch.randint(0, 49406, (2, 77), generator=g)
    rand[:, 0] = 49406
    rand[0, 40] = 49407
    rand[1, 76] = 49407
    ids = torch.cat([ids, rand])
    mask = torch.ones_like(ids)
    mask[:, 60:] = 0  # right padding, for the attention-mask path
    return ids, mask


@pytest.mark.parametrize(
    ("cfg", "pad"), [(TINY_SD1, SD1_PAD_TOKEN_ID), (TINY_SD2, SD2_PAD_TOKEN_ID)], ids=["sd1_tiny", "sd2_tiny"]
)
def test_parity_with_transformers(cfg, pad, tmp_path):
    hf = _hf_model(cfg)
    sd = _saved_state_dict(hf, tmp_path)
    assert all(k.startswith("text_model.") for k in sd)
    ours = CLIPTextModel.from_state_dict(sd, cfg).eval()
    ids, mask = _inputs(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids, output_hidden_states=True)
        out2 = ours(ids, clip_skip=2)
        ref_masked = hf(input_ids=ids, attention_mask=mask)
        out_masked = ours(ids, mask)
    assert len(out.hidden_states) == len(ref.hidden_states) == cfg.num_hidden_layers + 1
    for a, b in zip(out.hidden_states, ref.hidden_states, strict=True):
        assert (a - b).abs().max().item() <= TOL
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
    assert (out.pooled - ref.pooler_output).abs().max().item() <= TOL
    # clip_skip=2 (A1111) = final LayerNorm applied to transformers' hidden_states[-2]
    # (diffusers' clip_skip=1).
    penult = hf.final_layer_norm(ref.hidden_states[-2])
    assert (out2.last_hidden_state - penult).abs().max().item() <= TOL
    assert (out2.pooled - ref.pooler_output).abs().max().item() <= TOL  # pooled is from the last layer
    assert (out_masked.last_hidden_state - ref_masked.last_hidden_state).abs().max().item() <= TOL
    # The comparison can fail: the penultimate layer is not the last one.
    assert (out2.last_hidden_state - ref.last_hidden_state).abs().max().item() > 1e-2


def test_clip_skip_deeper_and_range(tmp_path):
    cfg = TINY_SD1
    hf = _hf_model(cfg, seed=5)
    ours = CLIPTextModel.from_state_dict(_saved_state_dict(hf, tmp_path), cfg).eval()
    ids, _ = _inputs(SD1_PAD_TOKEN_ID)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        for skip in range(1, cfg.num_hidden_layers + 1):
            want = hf.final_layer_norm(ref.hidden_states[-skip])
            got = ours(ids, clip_skip=skip).last_hidden_state
            assert (got - want).abs().max().item() <= TOL
    for bad in (0, cfg.num_hidden_layers + 1):
        with pytest.raises(ValueError, match="clip_skip"):
            ours(ids, clip_skip=bad)


@pytest.mark.parametrize("rule", ["argmax", "first_eos"])
def test_pooled_rule_matches_transformers_with_added_tokens(rule, tmp_path):
    # Two extra ids (textual-inversion style) above EOS: the two rules then disagree.
    cfg = dataclasses.replace(TINY_SD1, vocab_size=49410, pooled_rule=rule)
    hf = _hf_model(cfg, seed=2)
    assert hf.eos_token_id == (2 if rule == "argmax" else 49407)
    ours = CLIPTextModel.from_state_dict(_saved_state_dict(hf, tmp_path), cfg).eval()
    ids = CLIPTokenizer.load()(["a photo of a cat", "a dog"], pad_token_id=0)
    ids[:, 2] = 49409
    with torch.no_grad():
        ref = hf(input_ids=ids).pooler_output
        got = ours(ids).pooled
    assert (got - ref).abs().max().item() <= TOL
    expect_pos = 2 if rule == "argmax" else (ids[0] == 49407).nonzero()[0].item()
    assert (got[0] - ours(ids).last_hidden_state[0, expect_pos]).abs().max().item() == 0


def test_strict_loading_rules(tmp_path):
    cfg = TINY_SD2
    sd = _saved_state_dict(_hf_model(cfg), tmp_path)
    ours = CLIPTextModel(cfg)
    assert set(ours.state_dict()) == set(sd)
    expected = {
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.2.self_attn.out_proj.bias",
        "text_model.encoder.layers.1.layer_norm1.weight",
        "text_model.encoder.layers.1.layer_norm2.bias",
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "text_model.encoder.layers.1.mlp.fc2.bias",
        "text_model.final_layer_norm.weight",
    }
    assert expected <= set(sd)
    # Older checkpoints carry the position_ids buffer: accepted.
    with_pos = {**sd, "text_model.embeddings.position_ids": torch.arange(77)[None]}
    ours.load_state_dict(with_pos, strict=True)
    # Anything else unexpected, or anything missing, is an error.
    with pytest.raises(RuntimeError, match="Unexpected"):
        ours.load_state_dict({**sd, "text_model.encoder.layers.3.mlp.fc1.weight": torch.zeros(1)}, strict=True)
    missing = dict(sd)
    missing.pop("text_model.final_layer_norm.bias")
    with pytest.raises(RuntimeError, match="Missing"):
        CLIPTextModel.from_state_dict(missing, cfg)
    # transformers-5 layout (no prefix) is accepted by from_state_dict.
    flat = {k.removeprefix("text_model."): v for k, v in sd.items()}
    CLIPTextModel.from_state_dict(flat, cfg)


def test_meta_build_assigns_checkpoint_tensors(tmp_path):
    sd = _saved_state_dict(_hf_model(TINY_SD1), tmp_path)
    model = CLIPTextModel.from_state_dict(sd, TINY_SD1)
    w = model.text_model.final_layer_norm.weight
    assert w.device.type == "cpu" and w.data_ptr() == sd["text_model.final_layer_norm.weight"].data_ptr()
    assert not any(p.is_meta for p in model.parameters())
    half = CLIPTextModel.from_state_dict(sd, TINY_SD1, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}


def test_from_transformers_configs():
    assert CLIPTextConfig.from_transformers(SD15_TEXT_ENCODER_CONFIG) == SD1
    assert CLIPTextConfig.from_transformers(SD21_TEXT_ENCODER_CONFIG) == SD2
    assert CLIPTextConfig.from_transformers({"text_config": SD15_TEXT_ENCODER_CONFIG}) == SD1
    new = CLIPTextConfig.from_transformers({**SD15_TEXT_ENCODER_CONFIG, "eos_token_id": 49407})
    assert new.pooled_rule == "first_eos" and new.eos_token_id == 49407
    for cfg in (SD1, SD2, TINY_SD1, TINY_SD2, new):
        assert CLIPTextConfig.from_transformers(cfg.to_transformers()) == cfg
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig.from_transformers({**SD15_TEXT_ENCODER_CONFIG, "hidden_act": "relu"})
    with pytest.raises(ValueError, match="divisible"):
        CLIPTextConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SD1.hidden_size = 1  # type: ignore[misc]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_fp32(dtype, tmp_path):
    sd = _saved_state_dict(_hf_model(TINY_SD2), tmp_path)
    ref_model = CLIPTextModel.from_state_dict(sd, TINY_SD2).eval()
    low = CLIPTextModel.from_state_dict(sd, TINY_SD2, dtype=dtype).eval()
    ids, _ = _inputs(0)
    with torch.no_grad():
        ref = ref_model(ids, clip_skip=2)
        out = low(ids, clip_skip=2)
    assert out.last_hidden_state.dtype == dtype and out.pooled.dtype == dtype
    assert torch.isfinite(out.last_hidden_state).all()
    tol = 0.1 if dtype == torch.bfloat16 else 0.02  # outputs are LayerNorm-ed: O(1) values
    assert (out.last_hidden_state.float() - ref.last_hidden_state).abs().max().item() < tol


def test_inputs_embeds_equals_ids(tmp_path):
    sd = _saved_state_dict(_hf_model(TINY_SD1), tmp_path)
    model = CLIPTextModel.from_state_dict(sd, TINY_SD1).eval()
    ids, _ = _inputs(SD1_PAD_TOKEN_ID)
    with torch.no_grad():
        a = model(ids).last_hidden_state
        b = model(ids, inputs_embeds=model.text_model.embeddings.token_embedding(ids)).last_hidden_state
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="longer"):
        model(torch.zeros(1, 78, dtype=torch.long))


@pytest.mark.slow
@pytest.mark.parametrize(("cfg", "pad"), [(SD1, SD1_PAD_TOKEN_ID), (SD2, SD2_PAD_TOKEN_ID)], ids=["sd1", "sd2"])
def test_parity_full_size(cfg, pad, tmp_path):
    hf = _hf_model(cfg, seed=11)
    # Shares the tensors (no 1.4 GB write): same keys as a saved SD text_encoder folder.
    sd = {f"text_model.{k}": v for k, v in hf.state_dict().items()}
    ours = CLIPTextModel.from_state_dict(sd, cfg).eval()
    ids, _ = _inputs(pad)
    with torch.no_grad():
        ref = hf(input_ids=ids, output_hidden_states=True)
        out = ours(ids)
        out2 = ours(ids, clip_skip=2)
    assert (out.last_hidden_state - ref.last_hidden_state).abs().max().item() <= TOL
    assert (out.pooled - ref.pooler_output).abs().max().item() <= TOL
    penult = hf.final_layer_norm(ref.hidden_states[-2])
    assert (out2.last_hidden_state - penult).abs().max().item() <= TOL
