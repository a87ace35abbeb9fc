"""Checkpoints into sdengine's own models (meta + assign, strict), compared with diffusers/transformers."""

from __future__ import annotations

import pytest
import torch

from sdengine.weights import build_models, load_checkpoint, save_safetensors
from sdengine.weights.loading import LoadedCheckpoint, components_to_ldm
from test_weights_common import randomize, state, tiny_clip, tiny_unet, tiny_vae


@pytest.mark.parametrize("kind", ["sd1", "sd2", pytest.param("inpaint", marks=pytest.mark.slow)])
def test_single_file_into_sdengine_models(tmp_path, kind):
    unet = randomize(tiny_unet(kind), 1).eval()
    vae = randomize(tiny_vae(), 2)
    te = randomize(tiny_clip("sd2" if kind == "sd2" else "sd1"), 3)
    ck = LoadedCheckpoint(
        source=tmp_path,
        layout="diffusers",
        state_dicts={"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": state(te)},
        configs={
            "unet": dict(unet.config),
            "vae": dict(vae.config),
            "text_encoder": te.config.to_dict(),
            "scheduler": {},
        },
        prediction_type="epsilon",
    )
    from sdengine.weights.loading import save_single_file

    path = save_single_file(ck, tmp_path / "m.safetensors")
    loaded = load_checkpoint(path)
    models = build_models(loaded)
    assert set(models) == {"unet", "vae", "text_encoder"}
    # every parameter is a view of the file's memory map: nothing was copied
    assert all(p.device.type == "cpu" for m in models.values() for p in m.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (2, 9), generator=g)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        h_ref = te(ids).last_hidden_state
        h = models["text_encoder"](ids).last_hidden_state
        torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-5)
        out = models["unet"](x, t, encoder_hidden_states=h_ref)
        out = out.sample if hasattr(out, "sample") else out
        torch.testing.assert_close(out, unet(x, t, h_ref).sample, rtol=1e-4, atol=1e-5)
        img = torch.randn(1, 3, 16, 16, generator=g)
        ref = vae.decode(vae.encode(img).latent_dist.mode()).sample
        torch.testing.assert_close(models["vae"](img), ref, rtol=1e-4, atol=1e-5)


def test_plain_ldm_file_sdengine_unet_config(tmp_path):
    """No metadata: the synthesised SD1-style config is accepted by sdengine's UNetConfig."""
    unet = randomize(tiny_unet("sd1", cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32), 1).eval()
    vae = randomize(tiny_vae(block_out_channels=(32, 64), norm_num_groups=32), 2)
    te = randomize(
        tiny_clip("sd1", hidden_size=768, num_attention_heads=12, intermediate_size=64, num_hidden_layers=1), 3
    )
    ck = LoadedCheckpoint(
        source=tmp_path,
        layout="diffusers",
        state_dicts={"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": state(te)},
        configs={
            "unet": dict(unet.config),
            "vae": dict(vae.config),
            "text_encoder": te.config.to_dict(),
            "scheduler": {},
        },
        prediction_type="epsilon",
    )
    p = tmp_path / "plain.safetensors"
    save_safetensors(components_to_ldm(ck), p)
    models = build_models(load_checkpoint(p), components=("unet", "text_encoder"))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ctx = torch.randn(1, 5, 768, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = models["unet"](x, torch.tensor([7]), encoder_hidden_states=ctx)
        out = out.sample if hasattr(out, "sample") else out
        torch.testing.assert_close(out, unet(x, 7, ctx).sample, rtol=1e-4, atol=1e-5)
