"""LDM <-> diffusers name tables: exact round trips, and diffusers' own converter as the oracle for our LDM names."""

from __future__ import annotations

import pytest
import torch

from sdengine.weights import keymaps as km
from sdengine.weights.detect import (
    unet_layout_from_diffusers,
    unet_layout_from_ldm,
    vae_layout_from_diffusers,
    vae_layout_from_ldm,
)
from test_weights_common import assert_same_tensors, randomize, state, tiny_clip, tiny_unet, tiny_vae


@pytest.mark.parametrize("kind", ["sd1", "sd2", "inpaint"])
@pytest.mark.parametrize("lpb", [1, 2])
def test_unet_round_trip_and_diffusers_oracle(kind, lpb):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet = tiny_unet(kind, layers_per_block=lpb)
    sd = unet.state_dict()
    layout = km.UNetLayout.from_config(unet.config)
    assert layout == unet_layout_from_diffusers(sd)
    ldm, bad = km.unet_diffusers_to_ldm(sd, layout)
    assert not bad
    assert unet_layout_from_ldm(ldm) == layout
    back, bad = km.unet_ldm_to_diffusers(ldm, layout)
    assert not bad
    assert_same_tensors(back, sd)
    ldm2, _ = km.unet_diffusers_to_ldm(back, layout)
    assert_same_tensors(ldm2, ldm)
    # diffusers' converter reads our LDM names back to the same tensors: our names are the LDM ones.
    oracle = convert_ldm_unet_checkpoint({km.UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert_same_tensors(oracle, sd)
    assert "input_blocks.0.0.weight" in ldm and "out.2.weight" in ldm and "middle_block.1.norm.weight" in ldm
    assert ldm["input_blocks.0.0.weight"].shape[1] == (9 if kind == "inpaint" else 4)
    # SD2 keeps Linear projections in both layouts, SD1 1x1 convs in both: no reshape either way.
    assert ldm["input_blocks.1.1.proj_in.weight"].ndim == (2 if kind == "sd2" else 4)


def test_unet_rename_is_zero_copy():
    sd = tiny_unet().state_dict()
    layout = km.UNetLayout.from_config(tiny_unet().config)
    ldm, _ = km.unet_diffusers_to_ldm(sd, layout)
    ptrs = {t.data_ptr() for t in sd.values()}
    assert all(t.data_ptr() in ptrs for t in ldm.values())


@pytest.mark.parametrize("levels,lpb", [(2, 1), (4, 2)])
def test_vae_round_trip_and_diffusers_oracle(levels, lpb):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    chans = (8, 16, 16, 16)[:levels]
    vae = randomize(
        tiny_vae(
            block_out_channels=chans,
            down_block_types=("DownEncoderBlock2D",) * levels,
            up_block_types=("UpDecoderBlock2D",) * levels,
            layers_per_block=lpb,
        )
    )
    sd = vae.state_dict()
    layout = km.VAELayout.from_config(vae.config)
    assert layout == vae_layout_from_diffusers(sd)
    ldm, bad = km.vae_diffusers_to_ldm(sd, layout)
    assert not bad
    assert vae_layout_from_ldm(ldm) == layout
    # LDM's mid attention uses 1x1 convs
    for n in ("q", "k", "v", "proj_out"):
        assert ldm[f"decoder.mid.attn_1.{n}.weight"].shape == (chans[-1], chans[-1], 1, 1)
    assert ldm["decoder.mid.attn_1.norm.weight"].ndim == 1
    # decoder levels are numbered from the lowest resolution in LDM
    assert f"decoder.up.{levels - 1}.block.0.conv1.weight" in ldm
    assert torch.equal(
        ldm[f"decoder.up.{levels - 1}.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    back, bad = km.vae_ldm_to_diffusers(ldm, layout)
    assert not bad
    assert_same_tensors(back, sd)
    oracle = convert_ldm_vae_checkpoint({km.VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    assert_same_tensors(oracle, sd)


def test_clip_sd1_round_trip_and_oracle():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    sd = state(tiny_clip())
    ldm, bad = km.clip_diffusers_to_ldm(sd)
    assert not bad and all(k.startswith("text_model.") for k in ldm)
    back, _ = km.clip_ldm_to_diffusers(ldm)
    assert_same_tensors(back, sd)
    oracle = convert_ldm_clip_checkpoint({km.CLIP_PREFIX + k: v for k, v in ldm.items()})
    assert_same_tensors(km.normalize_clip_keys(oracle), sd)
    # very old SD1 files lack the text_model. level
    old = {k.removeprefix("text_model."): v for k, v in ldm.items()}
    assert_same_tensors(km.clip_ldm_to_diffusers(old)[0], sd)


def test_openclip_split_and_fuse_round_trip_and_oracle():
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    model = randomize(tiny_clip("sd2"))
    sd = state(model)
    ldm, bad = km.openclip_diffusers_to_ldm(sd)
    assert not bad
    d = model.config.hidden_size
    assert ldm["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * d, d)
    assert ldm["transformer.resblocks.0.attn.in_proj_bias"].shape == (3 * d,)
    assert ldm["positional_embedding"].shape == (77, d)
    # one extra (zero, unused) block, as SD2 files carry 24 blocks for a 23-layer text encoder
    n = model.config.num_hidden_layers
    assert f"transformer.resblocks.{n}.ln_1.weight" in ldm
    assert not ldm[f"transformer.resblocks.{n}.attn.in_proj_weight"].any()
    back, bad = km.openclip_ldm_to_diffusers(ldm, num_layers=n)
    assert not bad
    assert_same_tensors(back, sd)
    fused_again, _ = km.openclip_diffusers_to_ldm(back)
    assert_same_tensors(fused_again, ldm)
    full = {km.OPENCLIP_PREFIX + k: v for k, v in ldm.items() if f"resblocks.{n}." not in k}
    oracle = convert_open_clip_checkpoint(model, full)
    assert_same_tensors(km.normalize_clip_keys(oracle), sd)


@pytest.mark.parametrize(
    "key",
    [
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "posterior_mean_coef1",
        "posterior_log_variance_clipped",
        "model_ema.decay",
        "model_ema.diffusion_modelinput_blocks00weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.model.text_projection",
        "cond_stage_model.model.logit_scale",
    ],
)
def test_known_unused(key):
    assert km.is_known_unused(key)


@pytest.mark.parametrize(
    "key",
    ["model.diffusion_model.input_blocks.0.0.weight", "foo", "betas2", "first_stage_model.encoder.conv_in.weight"],
)
def test_not_known_unused(key):
    assert not km.is_known_unused(key)


def test_split_ldm_sets_aside_unused_and_unknown():
    t = torch.zeros(1)
    parts, unused, unknown = km.split_ldm(
        {
            "model.diffusion_model.out.2.weight": t,
            "first_stage_model.quant_conv.weight": t,
            "cond_stage_model.transformer.text_model.final_layer_norm.weight": t,
            "betas": t,
            "weird.key": t,
        }
    )
    assert set(parts["unet"]) == {"out.2.weight"} and set(parts["vae"]) == {"quant_conv.weight"}
    assert set(parts["clip"]) == {"text_model.final_layer_norm.weight"} and not parts["openclip"]
    assert unused == ["betas"] and unknown == ["weird.key"]
