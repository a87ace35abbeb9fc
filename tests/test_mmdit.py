"""SD3's MMDiT (sdengine.models.mmdit) and its files (sdengine.weights.mmdit_file) against diffusers'
SD3Transformer2DModel and its single-file converter, on tiny random models (float32, max abs <= 1e-5)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

from sdengine.errors import GenerationError, UsageError
from sdengine.models.config_checks import ConfigError
from sdengine.models.mmdit import TINY_MMDIT, MMDiT, MMDiTConfig, parameter_count
from sdengine.weights.detect import UnsupportedModelError, check_supported, is_sd3_state_dict, model_family
from sdengine.weights.io import WeightsError, load_file, save_safetensors
from sdengine.weights.mmdit_file import (
    PREFIX,
    config_from_stability,
    load_mmdit,
    save_mmdit,
    save_mmdit_single_file,
    sdengine_to_stability,
)

TOL = 1e-5
PLAIN = dataclasses.replace(TINY_MMDIT, dual_attention_layers=(), qk_norm=None)
QK = dataclasses.replace(TINY_MMDIT, dual_attention_layers=())
DUAL = TINY_MMDIT  # qk norm and MMDiT-X's second attention in block 0
DUAL_ALL = dataclasses.replace(TINY_MMDIT, dual_attention_layers=(0, 1, 2), qk_norm=None, patch_size=1)
CONFIGS = {"plain": PLAIN, "qk_norm": QK, "dual": DUAL, "dual_all_patch1": DUAL_ALL}


def diffusers_kwargs(cfg: MMDiTConfig) -> dict:
    return {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}


def reference(cfg: MMDiTConfig, seed: int = 0) -> SD3Transformer2DModel:
    """diffusers' model of ``cfg`` with random weights everywhere (the zero-initialised gates too); the
    position table stays diffusers' own."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**diffusers_kwargs(cfg)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.ndim > 1 else 0.5) + (1.0 if "norm_" in name else 0.0))
    return ref


def inputs(cfg: MMDiTConfig, batch: int = 2, h: int = 6, w: int = 10, tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, h, w, generator=g)
    t = torch.rand(batch, generator=g) * 1000
    ctx = torch.randn(batch, tokens, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    return x, t, ctx, pooled


def ours_from(ref: SD3Transformer2DModel, cfg: MMDiTConfig) -> MMDiT:
    model = MMDiT(cfg).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model


def run_both(ref, model, x, t, ctx, pooled, skip=()):
    with torch.no_grad():
        want = ref(x, ctx, pooled, t, skip_layers=list(skip) or None).sample
        got = model(x, t, ctx, pooled, skip_layers=skip)
    return want, got


# ----------------------------------------------------------------------------------------------- the network


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("size", [(6, 10), (12, 4), (2, 2)])
def test_parity_with_diffusers(name, size):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    model = ours_from(ref, cfg)
    x, t, ctx, pooled = inputs(cfg, h=size[0], w=size[1])
    want, got = run_both(ref, model, x, t, ctx, pooled)
    assert got.shape == (2, cfg.out_channels, *size)
    assert (want - got).abs().max().item() <= TOL
    assert want.abs().max().item() > 1.0  # the comparison is of real numbers, not of zeros


@pytest.mark.parametrize("skip", [(0,), (1,), (2,), (0, 2), (0, 1, 2)])
def test_skip_layers_as_diffusers(skip):
    ref = reference(DUAL)
    model = ours_from(ref, DUAL)
    x, t, ctx, pooled = inputs(DUAL)
    want, got = run_both(ref, model, x, t, ctx, pooled, skip)
    assert (want - got).abs().max().item() <= TOL
    full = run_both(ref, model, x, t, ctx, pooled)[1]
    assert (full - got).abs().max().item() > 1e-3  # skipping a block changes the result


def test_batch_rows_are_independent_and_scalar_timestep():
    ref = reference(QK)
    model = ours_from(ref, QK)
    x, t, ctx, pooled = inputs(QK)
    with torch.no_grad():
        both = model(x, t, ctx, pooled)
        one = model(x[1:], t[1:], ctx[1:], pooled[1:])
        same_t = model(x, torch.tensor(300.0), ctx, pooled)
        per_row = model(x, torch.full((2,), 300.0), ctx, pooled)
    # a row alone is the same row (up to the summation order of a batched matrix product: relative 1e-6)
    assert (both[1:] - one).abs().max().item() <= 1e-6 * one.abs().max().item()
    assert torch.equal(same_t, per_row)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_equals_diffusers(dtype):
    """In half precision the same operations in the same order: the same numbers as diffusers' model in that
    dtype (measured: bit-identical on the CPU; the test allows one unit in the last place of the output)."""
    ref = reference(DUAL).to(dtype)
    x, t, ctx, pooled = inputs(DUAL)
    with torch.no_grad():
        want = ref(x.to(dtype), ctx.to(dtype), pooled.to(dtype), t).sample
        got = ours_from(ref, DUAL).to(dtype)(x, t, ctx, pooled)
    assert got.dtype == dtype
    scale = want.float().abs().max().item()
    ulp = torch.finfo(dtype).eps * 2.0 ** int(torch.tensor(scale).log2().floor())  # at the output's magnitude
    assert (want.float() - got.float()).abs().max().item() <= ulp


def test_position_table_equals_diffusers():
    for cfg in (PLAIN, dataclasses.replace(PLAIN, sample_size=16, pos_embed_max_size=9)):
        torch.manual_seed(0)
        ref = SD3Transformer2DModel(**diffusers_kwargs(cfg))
        ours = MMDiT(cfg).pos_embed.pos_embed
        assert ours.shape == ref.pos_embed.pos_embed.shape
        assert (ours - ref.pos_embed.pos_embed).abs().max().item() <= 1e-6


def test_state_dict_names_and_count_equal_diffusers():
    for cfg in CONFIGS.values():
        ref = SD3Transformer2DModel(**diffusers_kwargs(cfg))
        model = MMDiT(cfg)
        assert set(model.state_dict()) == set(ref.state_dict())
        assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())
        assert parameter_count(cfg) == sum(p.numel() for p in ref.parameters())


def test_meta_build_has_no_storage():
    from sdengine.nn.meta_init import skip_meta_init

    with torch.device("meta"), skip_meta_init():
        model = MMDiT(DUAL)
    assert all(t.device.type == "meta" for t in model.state_dict().values())


@pytest.mark.parametrize(
    ("shape", "msg"),
    [
        ((1, 4, 5, 6), r"latent size 5x6 is not a multiple of the patch size 2"),
        ((1, 4, 26, 4), r"13x2 patches, more than the position grid's 12x12 \(at most 24x24"),
        ((1, 3, 4, 4), r"latents \(B, 4, H, W\) expected, got \(1, 3, 4, 4\)"),
    ],
)
def test_bad_latents(shape, msg):
    model = MMDiT(DUAL)
    x = torch.zeros(shape)
    ctx, pooled = torch.zeros(1, 3, 12), torch.zeros(1, 10)
    with pytest.raises(GenerationError, match=msg):
        model(x, torch.zeros(1), ctx, pooled)


def test_bad_conditioning_and_skip_layers():
    model = MMDiT(DUAL)
    x = torch.zeros(2, 4, 4, 4)
    ctx, pooled, t = torch.zeros(2, 3, 12), torch.zeros(2, 10), torch.zeros(2)
    with pytest.raises(GenerationError, match=r"encoder_hidden_states \(2, L, 12\) expected, got \(2, 3, 11\)"):
        model(x, t, torch.zeros(2, 3, 11), pooled)
    with pytest.raises(GenerationError, match=r"pooled_projections \(2, 10\) expected, got \(1, 10\)"):
        model(x, t, ctx, torch.zeros(1, 10))
    with pytest.raises(GenerationError, match=r"timestep \(\) or \(2,\) expected, got \(3,\)"):
        model(x, torch.zeros(3), ctx, pooled)
    with pytest.raises(UsageError, match=r"skip_layers entry 3 is not a block index \(0 to 2\)"):
        model(x, t, ctx, pooled, skip_layers=(3,))


@pytest.mark.parametrize(
    ("change", "msg"),
    [
        ({"qk_norm": "layer_norm"}, r"qk_norm='layer_norm' is not supported"),
        ({"dual_attention_layers": (0, 3)}, r"dual_attention_layers entry 3 is not a block index \(0 to 2\)"),
        ({"dual_attention_layers": (1, 1)}, r"repeats a block"),
        ({"caption_projection_dim": 16}, r"caption_projection_dim=16 must equal the width .* = 24"),
        ({"num_layers": 0}, r"MMDiT config: num_layers=0 is out of range"),
        ({"num_layers": [3, 3]}, r"MMDiT config: num_layers=\[3, 3\] is not an integer"),
        ({"patch_size": 2.0}, r"MMDiT config: patch_size=2\.0 is not an integer"),
        ({"pos_embed_max_size": 5000}, r"pos_embed_max_size=5000 is out of range"),
        (
            {"num_layers": 120, "num_attention_heads": 200, "attention_head_dim": 64, "caption_projection_dim": 12800},
            r"MMDiT config describes a network of at least 7\.08e\+11 parameters \(limit 2e\+10\)",
        ),
    ],
)
def test_config_errors(change, msg):
    with pytest.raises(ConfigError, match=msg):
        dataclasses.replace(TINY_MMDIT, **change)


def test_config_from_diffusers_and_back():
    for cfg in CONFIGS.values():
        assert MMDiTConfig.from_diffusers(json.loads(json.dumps(cfg.to_diffusers()))) == cfg
    with pytest.raises(ConfigError, match=r"options sdengine does not implement: use_rope"):
        MMDiTConfig.from_diffusers({**PLAIN.to_diffusers(), "use_rope": True})
    with pytest.raises(ConfigError, match=r"_class_name is 'FluxTransformer2DModel'"):
        MMDiTConfig.from_diffusers({**PLAIN.to_diffusers(), "_class_name": "FluxTransformer2DModel"})


def test_release_presets_are_the_real_sizes():
    from sdengine.models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM

    # the released transformers' configs (diffusers' config.json); the meta test below checks the count against
    # diffusers' model of each
    assert round(parameter_count(SD3_MEDIUM) / 1e9, 2) == 2.03
    assert round(parameter_count(SD35_MEDIUM) / 1e9, 2) == 2.24
    assert round(parameter_count(SD35_LARGE) / 1e9, 2) == 8.06


# ------------------------------------------------------------------------------------------------- files


def test_load_diffusers_folder(tmp_path):
    ref = reference(DUAL)
    ref.save_pretrained(tmp_path / "sd3" / "transformer")
    (tmp_path / "sd3" / "model_index.json").write_text("{}")
    x, t, ctx, pooled = inputs(DUAL)
    for where in (tmp_path / "sd3", tmp_path / "sd3" / "transformer"):
        model = load_mmdit(where)
        assert model.config == DUAL
        want, got = run_both(ref, model, x, t, ctx, pooled)
        assert (want - got).abs().max().item() <= TOL


def test_load_sharded_diffusers_folder(tmp_path):
    ref = reference(QK)
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_mmdit(tmp_path / "transformer")
    want, got = run_both(ref, model, *inputs(QK))
    assert (want - got).abs().max().item() <= TOL


def test_bad_shard_index(tmp_path):
    ref = reference(PLAIN)
    folder = tmp_path / "transformer"
    ref.save_pretrained(folder, max_shard_size="40KB")
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    name = next(iter(data["weight_map"]))
    data["weight_map"][name] = "../elsewhere.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(WeightsError, match=r"shard '\.\./elsewhere\.safetensors' is not a \.safetensors file in"):
        load_mmdit(folder)


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"not a diffusers SD3 folder \(no config\.json"):
        load_mmdit(tmp_path / "empty")
    folder = tmp_path / "flux" / "transformer"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "FluxTransformer2DModel"}))
    with pytest.raises(WeightsError, match=r"config\.json: MMDiT config: _class_name is 'FluxTransformer2DModel'"):
        load_mmdit(tmp_path / "flux")
    reference(PLAIN).save_pretrained(tmp_path / "wrong")
    config = json.loads((tmp_path / "wrong" / "config.json").read_text())
    (tmp_path / "wrong" / "config.json").write_text(json.dumps({**config, "num_layers": 2}))
    with pytest.raises(WeightsError, match=r"wrong \(SD3 MMDiT\): unexpected keys: transformer_blocks\.1\.attn"):
        load_mmdit(tmp_path / "wrong")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_file_round_trip_and_diffusers_converter(tmp_path, name):
    cfg = CONFIGS[name]
    ref = reference(cfg)
    model = ours_from(ref, cfg)
    path = save_mmdit_single_file(model, tmp_path / "sd3.safetensors")
    stability = load_file(path)[0]
    assert all(k.startswith(PREFIX) for k in stability)
    assert f"{PREFIX}joint_blocks.0.x_block.attn.qkv.weight" in stability
    assert (f"{PREFIX}joint_blocks.0.x_block.attn2.qkv.weight" in stability) == (0 in cfg.dual_attention_layers)
    assert (f"{PREFIX}joint_blocks.0.x_block.attn.ln_q.weight" in stability) == (cfg.qk_norm is not None)
    # diffusers' own converter reads the file we wrote back into diffusers' names: the same tensors
    converted = convert_sd3_transformer_checkpoint_to_diffusers(dict(stability))
    want = ref.state_dict()
    assert set(converted) == set(want) - {"pos_embed.pos_embed"} | {"pos_embed.pos_embed"}
    for k, v in want.items():
        assert torch.equal(converted[k], v), k
    # ... and our reader takes it to the same outputs
    loaded = load_mmdit(path)
    assert loaded.config == dataclasses.replace(cfg, sample_size=128)
    x, t, ctx, pooled = inputs(cfg)
    want_out, got = run_both(ref, loaded, x, t, ctx, pooled, skip=(1,))
    assert (want_out - got).abs().max().item() <= TOL


def test_single_file_names_match_stability_reference_layout():
    # The last block's context stream has no output projection and no MLP, and its adaLN two vectors; the final
    # adaLN stores shift before scale (diffusers' converter swaps both, we check against it above).
    sd = sdengine_to_stability(MMDiT(PLAIN).state_dict(), PLAIN)
    last = f"joint_blocks.{PLAIN.num_layers - 1}.context_block"
    assert f"{last}.attn.qkv.weight" in sd
    assert f"{last}.attn.proj.weight" not in sd and f"{last}.mlp.fc1.weight" not in sd
    assert sd[f"{last}.adaLN_modulation.1.weight"].shape == (2 * 24, 24)
    model = MMDiT(PLAIN)
    with torch.no_grad():
        model.norm_out.linear.bias.copy_(torch.arange(48.0))  # diffusers: scale = 0..23, shift = 24..47
    out = sdengine_to_stability(model.state_dict(), PLAIN)["final_layer.adaLN_modulation.1.bias"]
    assert torch.equal(out, torch.cat([torch.arange(24.0, 48.0), torch.arange(24.0)]))


def test_comfy_diffusion_only_file_and_whole_checkpoint(tmp_path):
    ref = reference(DUAL)
    model = ours_from(ref, DUAL)
    bare = save_mmdit_single_file(model, tmp_path / "bare.safetensors", prefix="")
    whole = dict(load_file(save_mmdit_single_file(model, tmp_path / "w.safetensors"))[0])
    whole["text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"] = torch.ones(3)
    whole["first_stage_model.decoder.conv_in.weight"] = torch.ones(2, 2, 1, 1)
    save_safetensors(whole, tmp_path / "whole.safetensors", dtype="float16")
    x, t, ctx, pooled = inputs(DUAL)
    for path, tol in ((bare, TOL), (tmp_path / "whole.safetensors", None)):
        loaded = load_mmdit(path)
        want, got = run_both(ref, loaded.float() if tol is None else loaded, x, t, ctx, pooled)
        if tol is None:  # weights stored in float16: the file's dtype by default
            assert load_mmdit(path).proj_out.weight.dtype == torch.float16
            assert (want - got).abs().max().item() <= 5e-2 * want.abs().max().item()
        else:
            assert (want - got).abs().max().item() <= tol


def test_load_dtype_and_device(tmp_path):
    model = ours_from(reference(QK), QK)
    path = save_mmdit_single_file(model, tmp_path / "m.safetensors")
    loaded = load_mmdit(path, dtype="bfloat16", device="cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training
    x, t, ctx, pooled = (v.bfloat16() for v in inputs(QK))
    with torch.no_grad():
        out = loaded(x, t, ctx, pooled)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    with torch.no_grad():  # float32 inputs are taken in the model's dtype
        assert torch.equal(loaded(*(v.float() for v in (x, t, ctx, pooled))), out)


def test_config_from_shapes():
    for cfg in CONFIGS.values():
        sd = sdengine_to_stability(MMDiT(cfg).state_dict(), cfg)
        assert config_from_stability(sd) == dataclasses.replace(cfg, sample_size=128)


def _stability(cfg=PLAIN):
    return {PREFIX + k: v for k, v in sdengine_to_stability(MMDiT(cfg).state_dict(), cfg).items()}


def test_single_file_errors(tmp_path):
    def refuse(sd, msg):
        p = tmp_path / "bad.safetensors"
        save_safetensors(sd, p)
        with pytest.raises(WeightsError, match=msg):
            load_mmdit(p)

    sd = _stability()
    refuse({k: v for k, v in sd.items() if ".joint_blocks.1." not in k}, r"joint_blocks 1 missing \(found 2 of 3\)")
    refuse({**sd, PREFIX + "joint_blocks.0.x_block.extra.weight": torch.ones(1)}, r"not part of this MMDiT: joint")
    refuse({**sd, "vae.decoder.weight": torch.ones(1)}, r"unexpected keys beside the MMDiT: vae\.decoder\.weight")
    refuse(
        {k: v for k, v in sd.items() if not k.endswith("joint_blocks.0.x_block.mlp.fc2.bias")},
        r"missing keys: transformer_blocks\.0\.ff\.net\.2\.bias",
    )
    refuse({k: v for k, v in sd.items() if not k.endswith("pos_embed")}, r"missing key pos_embed")
    refuse({**sd, PREFIX + "pos_embed": torch.zeros(1, 140, 24)}, r"pos_embed has shape \(1, 140, 24\), not")
    refuse({"double_blocks.0.img_attn.qkv.weight": torch.ones(3, 1)}, r"not an SD3 MMDiT \(no joint_blocks\.\*\) \(l")
    refuse({"model.diffusion_model.input_blocks.0.0.weight": torch.ones(1)}, r"not an SD3 MMDiT")
    with pytest.raises(WeightsError, match=r"no such SD3 file or folder"):
        load_mmdit(tmp_path / "missing.safetensors")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(WeightsError, match=r"expected a \.safetensors"):
        load_mmdit(tmp_path / "x.txt")


def test_save_diffusers_folder_loads_in_diffusers(tmp_path):
    model = ours_from(reference(DUAL), DUAL)
    save_mmdit(model, tmp_path / "transformer")
    ref = SD3Transformer2DModel.from_pretrained(tmp_path / "transformer").eval()
    want, got = run_both(ref, model, *inputs(DUAL))
    assert (want - got).abs().max().item() <= TOL


# ------------------------------------------------------------------------------------------------ detection


def test_detection():
    sd = _stability()
    assert is_sd3_state_dict(sd) and model_family(sd) == "sd3"
    assert is_sd3_state_dict(k.removeprefix(PREFIX) for k in sd)
    assert is_sd3_state_dict(MMDiT(PLAIN).state_dict())  # diffusers' names
    assert not is_sd3_state_dict(["model.diffusion_model.input_blocks.0.0.weight"])
    assert not is_sd3_state_dict(["double_blocks.0.img_attn.qkv.weight", "transformer_blocks.0.attn.add_q_proj.weight"])
    assert not is_sd3_state_dict(["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"])
    assert model_family(["model.diffusion_model.input_blocks.0.0.weight"]) is None
    with pytest.raises(UnsupportedModelError, match=r"SD3's MMDiT \(joint_blocks\.\*\): an SD3 model, not an SD 1"):
        check_supported(sd)
    with pytest.raises(UnsupportedModelError, match=r"double_blocks\.\*: looks like Flux"):
        check_supported({"double_blocks.0.img_attn.qkv.weight": torch.ones(1)})


def test_release_layouts_on_meta_equal_diffusers_and_read_back_from_shapes():
    """The released architectures, built on the meta device (no memory): the same tensor names and shapes as
    diffusers' model of the same config, and a single file of them gives the config back from its shapes."""
    from sdengine.models.mmdit import SD3_MEDIUM, SD35_LARGE, SD35_MEDIUM
    from sdengine.nn.meta_init import skip_meta_init

    for cfg in (SD3_MEDIUM, SD35_MEDIUM, SD35_LARGE):
        with torch.device("meta"), skip_meta_init():
            ours = MMDiT(cfg).state_dict()
            model = SD3Transformer2DModel(**diffusers_kwargs(cfg))
        theirs = model.state_dict()
        assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
        assert config_from_stability(sdengine_to_stability(ours, cfg)) == cfg
