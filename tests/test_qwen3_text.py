"""Qwen3 as a text encoder (Z-Image's and FLUX.2 [klein]'s): the hidden states transformers' ``Qwen3ForCausalLM``
gives with ``output_hidden_states=True`` (the last one after the final norm, the others raw block outputs) on tiny
random weights with a head width apart from the model width; its folder and single-file layouts; one-line refusals of
the wrong family in either direction and of hidden layers that do not exist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdengine.errors import UsageError
from sdengine.models.qwen_text import QWEN3_4B, QwenTextConfig
from sdengine.weights.qwen_text_file import QwenTextFileError, config_from_shapes, family_of, load_qwen_text_encoder

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

VOCAB = 300
LAYERS = 4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def hf_qwen3(seed: int = 0, **over):
    """A tiny random ``Qwen3ForCausalLM``: 4 heads of 16 on a 48-wide stream (head width not hidden / heads)."""
    cfg = transformers.Qwen3Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        tie_word_embeddings=False,
        **over,
    )
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    _randomize(model, seed)
    return model


@pytest.fixture(scope="module")
def hf_model():
    return hf_qwen3()


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen3") / "text_encoder"
    hf_model.save_pretrained(folder)
    return folder


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 6:] = 0  # right padding, as the pipelines pad to their max length
    return ids, mask


def _err(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return float((ours[keep].float() - ref[keep].float()).abs().max())


def test_hidden_states_match_transformers(hf_model, saved):
    ids, mask = _batch()
    with torch.no_grad():
        ref = hf_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    enc = load_qwen_text_encoder(saved, family="qwen3")
    assert enc.config.head_dim == 16 and enc.config.qk_norm and not enc.config.attention_bias
    with torch.no_grad():
        asked = [-2, 0, 1, 3, LAYERS, -1]
        states = enc(ids, mask, hidden_layers=asked)
        last = enc(ids, mask)
    assert len(states) == len(asked)
    for i, got in zip(asked, states, strict=True):
        assert _err(got, ref[i], mask) < 2e-5, i
    assert _err(last, ref[-1], mask) < 2e-5
    # the final norm applies to the last state only: block LAYERS-1's raw output differs from the normed last one
    assert _err(states[0], ref[-1], mask) > 1e-2


def test_single_file_and_shapes_config(hf_model, saved, tmp_path):
    # ComfyUI's qwen_3_4b.safetensors layout: model.* plus lm_head, no config
    state = {k: v.contiguous() for k, v in hf_model.state_dict().items()}
    assert any(k.startswith("model.layers.0.self_attn.q_norm") for k in state)
    single = tmp_path / "qwen_3_tiny.safetensors"
    safetensors_torch.save_file(state, str(single))
    enc = load_qwen_text_encoder(single, family="qwen3")
    folder = load_qwen_text_encoder(saved)
    assert enc.config.head_dim == 16 and enc.config.num_attention_heads == 4 and enc.config.num_key_value_heads == 2
    ids, mask = _batch()
    with torch.no_grad():
        assert torch.equal(enc(ids, mask, hidden_layers=[2])[0], folder(ids, mask, hidden_layers=[2])[0])
    shapes = {k.removeprefix("model."): tuple(v.shape) for k, v in state.items() if k.startswith("model.")}
    cfg = config_from_shapes(shapes)
    assert family_of(cfg) == "qwen3" and cfg.head_dim == 16 and not cfg.o_proj_bias


def test_qwen3_4b_numbers():
    cfg = QwenTextConfig.from_transformers(
        {
            "model_type": "qwen3",
            "vocab_size": 151936,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1_000_000,
            "attention_bias": False,
            "use_sliding_window": False,
            "layer_types": ["full_attention"] * 36,
        }
    )
    assert cfg == QWEN3_4B


def test_refusals(hf_model, saved, tmp_path):
    with pytest.raises(QwenTextFileError, match=r"a Qwen3 text encoder .*needs Qwen2\.5-VL") as e:
        load_qwen_text_encoder(saved, family="qwen2.5-vl")
    assert "\n" not in str(e.value)
    with pytest.raises(QwenTextFileError, match="family 'qwen4'"):
        load_qwen_text_encoder(saved, family="qwen4")
    for change, words in (
        ({"layer_types": ["full_attention", "sliding_attention"]}, "sliding"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 1.5}, "head_dim"),
    ):
        with pytest.raises(Exception, match=words):
            QwenTextConfig.from_transformers({"model_type": "qwen3", "hidden_size": 48, **change})
    enc = load_qwen_text_encoder(saved)
    ids, mask = _batch()
    for bad in ([LAYERS + 1], [-(LAYERS + 2)], [], [1.0]):
        with pytest.raises(UsageError, match="hidden"):
            enc(ids, mask, hidden_layers=bad)
