"""Qwen-Image's text encoder (Qwen2.5-VL's language model, text-only path): the same last hidden state as
transformers' ``Qwen2_5_VLForConditionalGeneration`` (``output_hidden_states=True``'s ``hidden_states[-1]``) on tiny
random weights, its files in every accepted layout (transformers 5 folder, sharded folder, pipeline folder, the older
``model.layers`` layout with a vision tower and LM head beside it, a single file), and one-line errors for the
rest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdengine.errors import UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_text import QwenTextConfig, QwenTextEncoder, rope_cos_sin
from sdengine.weights.qwen_text_file import QwenTextFileError, config_from_shapes, load_qwen_text_encoder

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 2e-5
VOCAB = 300


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (norms and biases too, so that a misplaced one shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)


def hf_qwen(*, layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, seed: int = 0, **text):
    """A tiny random ``Qwen2_5_VLForConditionalGeneration`` (its vision tower tiny too)."""
    text_config = {
        "vocab_size": VOCAB,
        "hidden_size": heads * head_dim,
        "intermediate_size": 48,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, head_dim // 2 - 2]},
        "bos_token_id": None,
        "eos_token_id": None,
        **text,
    }
    vision = {
        "depth": 1,
        "hidden_size": 16,
        "intermediate_size": 16,
        "num_heads": 2,
        "out_hidden_size": heads * head_dim,
    }
    cfg = transformers.Qwen2_5_VLConfig(text_config=text_config, vision_config=vision)
    model = transformers.Qwen2_5_VLForConditionalGeneration(cfg).eval()
    _randomize(model, seed)
    return model


def _batch(length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, length), generator=g)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, length // 2 + 1 :] = 0  # right padding in row 1
    mask[2, 1:] = 0  # row 2: one real token
    return ids, mask


@torch.no_grad()
def _reference(hf, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return hf(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]


def _assert_close_on_tokens(ours: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, tol: float) -> float:
    keep = mask.bool()
    err = float((ours[keep].float() - ref[keep].float()).abs().max())
    assert err < tol, err
    return err


@pytest.fixture(scope="module")
def hf_model():
    return hf_qwen()


@pytest.fixture(scope="module")
def saved(hf_model, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("qwen_te") / "text_encoder"
    hf_model.save_pretrained(folder, max_shard_size="40KB")  # sharded: model.safetensors.index.json + shards
    return folder


def test_forward_matches_transformers_with_padding(hf_model, saved):
    assert (saved / "model.safetensors.index.json").is_file()
    ours = load_qwen_text_encoder(saved)
    assert ours.config.num_key_value_heads == 2 and ours.config.head_dim == 8
    ids, mask = _batch(11, 1)
    out = ours(ids, mask)
    assert out.shape == (3, 11, 32) and out.dtype == torch.float32
    _assert_close_on_tokens(out, _reference(hf_model, ids, mask), mask, TOL)
    # no mask: every position, and the same numbers a batch of one gives (row 0 alone)
    full = ours(ids)
    torch.testing.assert_close(full, _reference(hf_model, ids, None), atol=TOL, rtol=0)
    torch.testing.assert_close(ours(ids[:1])[0], full[0], atol=1e-6, rtol=0)


def test_gqa_and_mha_variants_match(tmp_path):
    for heads, kv in ((4, 1), (4, 4)):
        hf = hf_qwen(heads=heads, kv_heads=kv, seed=heads + kv)
        hf.save_pretrained(tmp_path / f"m{kv}")
        ours = load_qwen_text_encoder(tmp_path / f"m{kv}")
        ids, mask = _batch(7, kv)
        _assert_close_on_tokens(ours(ids, mask), _reference(hf, ids, mask), mask, TOL)


def test_left_padding_matches_transformers(hf_model, saved):
    """transformers gives text-only input the positions 0..L-1 whatever the mask; so does this module (a left-padded
    row's tokens are not at the same positions as the row alone), and its leading padding gives no NaN."""
    ours = load_qwen_text_encoder(saved)
    ids, _ = _batch(9, 2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    out = ours(ids, mask)
    assert torch.isfinite(out).all()
    _assert_close_on_tokens(out, _reference(hf_model, ids, mask), mask, TOL)


def test_text_only_mrope_is_plain_rope(hf_model):
    """The three multimodal position axes are equal for text, so the mrope_section bands recombine into 1-D RoPE."""
    rotary = hf_model.model.language_model.rotary_emb
    positions = torch.arange(13)
    x = torch.zeros(1, 13, 32)
    cos_ref, sin_ref = rotary(x, positions[None, None].expand(3, 1, -1))
    cfg = QwenTextConfig.from_transformers(hf_model.config.to_dict())
    cos, sin = rope_cos_sin(cfg, positions, torch.float32)
    torch.testing.assert_close(cos, cos_ref[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(sin, sin_ref[0], atol=1e-6, rtol=0)


def test_bfloat16_close_to_transformers(hf_model, saved):
    hf16 = hf_qwen().to(torch.bfloat16)
    ours = load_qwen_text_encoder(saved, dtype="bf16")
    assert ours.dtype == torch.bfloat16
    ids, mask = _batch(8, 3)
    out = ours(ids, mask)
    assert out.dtype == torch.bfloat16
    _assert_close_on_tokens(out, _reference(hf16, ids, mask), mask, 0.1)


def _old_layout_state(hf) -> dict[str, torch.Tensor]:
    """The pre-4.52 ``Qwen2_5_VLForConditionalGeneration`` names (Qwen-Image's text_encoder files): ``model.*`` for
    the language model, ``visual.*``, ``lm_head.weight``."""
    out = {}
    for k, v in hf.state_dict().items():
        if k.startswith("model.language_model."):
            out["model." + k[len("model.language_model.") :]] = v.contiguous()
        elif k.startswith("model.visual."):
            out["visual." + k[len("model.visual.") :]] = v.contiguous()
        else:
            out[k] = v.contiguous()
    return out


def test_old_layout_folder_pipeline_folder_and_single_file(hf_model, tmp_path):
    pipe = tmp_path / "pipe"
    te = pipe / "text_encoder"
    te.mkdir(parents=True)
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    # the older top-level config (no text_config, rope_scaling + rope_theta), as Qwen-Image's text_encoder has
    text = hf_model.config.text_config.to_dict()
    old_cfg = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")},
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        "use_sliding_window": False,
        "sliding_window": 32768,
        "hidden_act": "silu",
    }
    (te / "config.json").write_text(json.dumps(old_cfg))
    state = _old_layout_state(hf_model)
    assert any(k.startswith("visual.") for k in state) and "lm_head.weight" in state
    safetensors_torch.save_file(state, str(te / "model.safetensors"))
    ids, mask = _batch(6, 4)
    ref = _reference(hf_model, ids, mask)
    _assert_close_on_tokens(load_qwen_text_encoder(pipe)(ids, mask), ref, mask, TOL)
    # a single file: the config from the shapes (head width 128), so build a model with 128-wide heads
    hf128 = hf_qwen(
        heads=2,
        kv_heads=1,
        head_dim=128,
        layers=1,
        seed=5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    single = tmp_path / "qwen_2.5_vl.safetensors"
    safetensors_torch.save_file(_old_layout_state(hf128), str(single))
    ours = load_qwen_text_encoder(single)
    assert (ours.config.num_attention_heads, ours.config.num_key_value_heads) == (2, 1)
    _assert_close_on_tokens(ours(ids, mask), _reference(hf128, ids, mask), mask, TOL)


def _bare_state(hf) -> dict[str, torch.Tensor]:
    return {
        k[len("model.language_model.") :]: v.contiguous()
        for k, v in hf.state_dict().items()
        if k.startswith("model.language_model.")
    }


def test_refusals(hf_model, saved, tmp_path):
    cfg = json.loads((saved / "config.json").read_text())
    # config contents this module does not run
    for change, words in (
        ({"model_type": "t5"}, "not Qwen2.5-VL"),
        ({"text_config": {**cfg["text_config"], "use_sliding_window": True}}, "sliding"),
        ({"text_config": {**cfg["text_config"], "hidden_act": "gelu"}}, "hidden_act"),
        ({"text_config": {**cfg["text_config"], "num_key_value_heads": 3}}, "multiple of num_key_value_heads"),
        ({"text_config": {**cfg["text_config"], "num_hidden_layers": 1.5}}, "not an integer"),
        (
            {"text_config": {**cfg["text_config"], "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}},
            "rope_type",
        ),
        (
            {
                "text_config": {
                    **cfg["text_config"],
                    "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 1]},
                }
            },
            "mrope_section",
        ),
    ):
        with pytest.raises(ConfigError, match=words):
            QwenTextConfig.from_transformers({**cfg, **change})
    # a config.json that disagrees with the weights
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in saved.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "config.json").write_text(json.dumps({**cfg, "text_config": {**cfg["text_config"], "num_hidden_layers": 1}}))
    with pytest.raises(QwenTextFileError, match="layer 1 but the config says num_hidden_layers=1"):
        load_qwen_text_encoder(bad)
    (bad / "config.json").write_text(
        json.dumps({**cfg, "text_config": {**cfg["text_config"], "num_key_value_heads": 4}})
    )
    with pytest.raises(QwenTextFileError, match="k_proj.weight is"):
        load_qwen_text_encoder(bad)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(QwenTextFileError, match="cannot read the config"):
        load_qwen_text_encoder(bad)
    # missing shard, missing tensor, stray key, other encoders, integer weights, dtype, no such path
    (bad / "config.json").write_text(json.dumps(cfg))
    shard = next(bad.glob("model-0000*-of-*.safetensors"))
    shard.unlink()
    with pytest.raises(QwenTextFileError, match="is missing"):
        load_qwen_text_encoder(bad)
    state = _bare_state(hf_model)
    for name, sd, words in (
        ("missing", {k: v for k, v in state.items() if k != "norm.weight"}, "without norm.weight"),
        ("stray", {**state, "model.foo": torch.zeros(1)}, "unexpected Qwen text encoder keys: model.foo"),
        ("t5", {"shared.weight": torch.zeros(4, 4), "encoder.block.0.x": torch.zeros(1)}, "CLIP or T5"),
        (
            "gap",
            {k: v for k, v in state.items() if not k.startswith("layers.0.")},
            "without layers.0.self_attn.q_proj.weight",
        ),
        ("ints", {**state, "norm.weight": torch.ones(32, dtype=torch.int32)}, "not floating-point"),
        ("mixed", {**{"model.language_model." + k: v for k, v in state.items()}, "other.x": torch.zeros(1)}, "beside"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(cfg))
        safetensors_torch.save_file(sd, str(folder / "model.safetensors"))
        with pytest.raises(QwenTextFileError, match=words):
            load_qwen_text_encoder(folder)
    single = tmp_path / "tiny_heads.safetensors"  # 8-wide heads: not the releases' 128, so no config from shapes
    safetensors_torch.save_file(state, str(single))
    with pytest.raises(QwenTextFileError, match="not multiples of the head width 128"):
        load_qwen_text_encoder(single)
    with pytest.raises(QwenTextFileError, match="no such"):
        load_qwen_text_encoder(tmp_path / "nothing")
    with pytest.raises(QwenTextFileError, match="no config.json"):
        load_qwen_text_encoder(tmp_path)
    with pytest.raises(QwenTextFileError, match="compute dtype"):
        load_qwen_text_encoder(saved, dtype=torch.float64)


def test_config_from_shapes_reads_releases_numbers():
    shapes = {
        "embed_tokens.weight": (152064, 3584),
        "layers.0.self_attn.q_proj.weight": (3584, 3584),
        "layers.0.self_attn.q_proj.bias": (3584,),  # every Qwen2.5-VL has q / k / v biases
        "layers.0.self_attn.k_proj.weight": (512, 3584),
        "layers.0.mlp.gate_proj.weight": (18944, 3584),
        **{f"layers.{i}.input_layernorm.weight": (3584,) for i in range(28)},
    }
    assert config_from_shapes(shapes) == QwenTextConfig()  # Qwen2.5-VL-7B's numbers, Qwen-Image's text encoder
    # neither biases nor q / k norms: Mistral Small 3 (FLUX.2 [dev]'s; ComfyUI's mistral_3_small_flux2 file), its
    # text_config's numbers (Mistral-Small-3.1-24B-Instruct-2503's config.json)
    mistral = {
        "embed_tokens.weight": (131072, 5120),
        "layers.0.self_attn.q_proj.weight": (4096, 5120),
        "layers.0.self_attn.k_proj.weight": (1024, 5120),
        "layers.0.mlp.gate_proj.weight": (32768, 5120),
        **{f"layers.{i}.input_layernorm.weight": (5120,) for i in range(40)},
    }
    release = {"model_type": "mistral3", "text_config": {"model_type": "mistral", "vocab_size": 131072,
               "hidden_size": 5120, "intermediate_size": 32768, "num_hidden_layers": 40, "num_attention_heads": 32,
               "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1e9,
               "sliding_window": None}}  # fmt: skip
    assert config_from_shapes(mistral) == QwenTextConfig.from_transformers(release)


def test_bad_inputs_are_one_line_errors(saved):
    ours = load_qwen_text_encoder(saved)
    for ids, mask, words in (
        (torch.zeros(2, 3), None, "integer tensor"),
        (torch.zeros(3, dtype=torch.long), None, "integer tensor"),
        (torch.zeros(1, 0, dtype=torch.long), None, "no tokens"),
        (torch.full((1, 3), VOCAB), None, "outside the vocabulary"),
        (torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4), "must match"),
    ):
        with pytest.raises(UsageError, match=words):
            ours(ids, mask)
    assert isinstance(ours, QwenTextEncoder)


def test_fp8_and_scaled_fp8_single_files(tmp_path):
    """float8 weights are upcast; ComfyUI's scaled-fp8 files (marker, per-Linear scale_weight, ignored scale_input)
    give weight * scale, the same encoder as the float8-rounded one; scales without the marker are refused."""
    hf = hf_qwen(
        heads=2,
        kv_heads=1,
        head_dim=128,
        layers=1,
        seed=9,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    )
    state = _old_layout_state(hf)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() == 2 and "visual" not in k else v) for k, v in state.items()}
    safetensors_torch.save_file(fp8, str(tmp_path / "fp8.safetensors"))
    plain = load_qwen_text_encoder(tmp_path / "fp8.safetensors")
    want = {k[len("model.") :]: v.float() for k, v in fp8.items() if k.startswith("model.")}
    got = plain.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    scaled = dict(fp8)
    scaled["scaled_fp8"] = torch.zeros(0, dtype=torch.float8_e4m3fn)
    scales = {}
    for k, v in state.items():
        if k.startswith("model.layers.") and k.endswith("proj.weight"):
            s = v.abs().max() / 400.0
            scaled[k] = (v / s).to(torch.float8_e4m3fn)
            scaled[k[: -len(".weight")] + ".scale_weight"] = s.reshape(1)
            scaled[k[: -len(".weight")] + ".scale_input"] = torch.ones(1)
            scales[k] = s
    safetensors_torch.save_file(scaled, str(tmp_path / "scaled.safetensors"))
    ours = load_qwen_text_encoder(tmp_path / "scaled.safetensors")
    for k, s in scales.items():
        expect = scaled[k].float() * s
        assert torch.equal(ours.state_dict()[k[len("model.") :]], expect)
    ids, mask = _batch(6, 5)
    ref = _reference(hf, ids, mask)
    err = float((ours(ids, mask) - ref)[mask.bool()].abs().max())
    assert err < 0.2 * float(ref.abs().max()), err  # fp8 rounding, not a wrong layout
    del scaled["scaled_fp8"]
    safetensors_torch.save_file(scaled, str(tmp_path / "nomarker.safetensors"))
    with pytest.raises(QwenTextFileError, match="without the scaled_fp8 marker"):
        load_qwen_text_encoder(tmp_path / "nomarker.safetensors")
