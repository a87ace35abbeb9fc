"""Full-size SD 1.5 / SD 2.1 names and shapes, on the meta device (no memory): key maps against diffusers'
converters, and configs synthesised from shapes against the real published configs."""

from __future__ import annotations

import pytest
import torch

from sdengine.weights import keymaps as km
from sdengine.weights.loading import LoadedCheckpoint, components_to_ldm, ldm_to_components
from test_weights_common import state

SD15_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8, sample_size=64
)
SD21_UNET = dict(
    block_out_channels=(320, 640, 1280, 1280),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
    sample_size=96,
    upcast_attention=True,
)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
)
CLIP_L = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    hidden_act="quick_gelu",
    projection_dim=768,
)
OPENCLIP_H = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    hidden_act="gelu",
    projection_dim=512,
)


def _meta_models(unet_kw, te_kw, in_channels=4):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_kw, in_channels=in_channels)
        vae = AutoencoderKL(**SD_VAE, sample_size=unet_kw["sample_size"] * 8)
        te = CLIPTextModel(
            CLIPTextConfig(
                **te_kw, vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1
            )
        )
    return unet, vae, te


def _norm(v):
    return list(v) if isinstance(v, list | tuple) else v


def _assert_same_meta(a, b):
    assert set(a) == set(b), (sorted(set(a) - set(b))[:5], sorted(set(b) - set(a))[:5])
    for k in a:
        assert a[k].shape == b[k].shape, k


@pytest.mark.parametrize("name", ["sd15", "sd15-inpaint", "sd21"])
def test_full_size_names_and_synthesised_configs(name):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    sd2 = name == "sd21"
    unet, vae, te = _meta_models(
        SD21_UNET if sd2 else SD15_UNET, OPENCLIP_H if sd2 else CLIP_L, in_channels=9 if "inpaint" in name else 4
    )
    ck = LoadedCheckpoint(
        source=None,
        layout="diffusers",  # type: ignore[arg-type]
        state_dicts={"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": state(te)},
        configs={
            "unet": dict(unet.config),
            "vae": dict(vae.config),
            "text_encoder": te.config.to_dict(),
            "scheduler": {},
        },
        prediction_type="v_prediction" if sd2 else "epsilon",
    )
    ldm = components_to_ldm(ck)
    # real SD files: 686 UNet tensors for SD1.5 (in LDM names), 24 OpenCLIP blocks for SD2's 23-layer encoder
    assert sum(k.startswith(km.UNET_PREFIX) for k in ldm) == len(unet.state_dict())
    if sd2:
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in ldm
        assert ldm["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (3072, 1024)
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320)
    else:
        assert "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias" in ldm
        assert ldm["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)
    assert ldm["first_stage_model.decoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    _assert_same_meta(convert_ldm_unet_checkpoint(ldm, dict(unet.config)), unet.state_dict())
    _assert_same_meta(convert_ldm_vae_checkpoint(ldm, dict(vae.config)), vae.state_dict())

    comps, det, skipped = ldm_to_components(ldm)
    assert det.family == ("sd2" if sd2 else "sd1") and det.inpainting == ("inpaint" in name)
    for comp in ("unet", "vae", "text_encoder"):
        _assert_same_meta(comps[comp], ck.state_dicts[comp])
    if sd2:
        # the 23-layer encoder's unused 24th block, and the v-prediction marker (ComfyUI's, written by convert)
        assert "v_pred" in skipped and det.prediction_type == "v_prediction"
        assert all("resblocks.23." in k for k in skipped if k != "v_pred") and len(skipped) == 13
    want_unet = dict(unet.config)
    for key, got in det.unet_config.items():
        if key.startswith("_") or key == "mid_block_type":
            continue
        assert _norm(got) == _norm(want_unet[key]), (key, got, want_unet[key])
    for key, got in det.vae_config.items():
        if not key.startswith("_"):
            assert _norm(got) == _norm(dict(vae.config)[key]), key
    te_cfg = te.config.to_dict()
    for key, got in det.text_encoder_config.items():
        if key in te_cfg and key != "architectures":
            assert got == te_cfg[key], key
