"""Parity of sdengine's U-Net with diffusers' UNet2DConditionModel (Stable Diffusion) on random weights."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from sdengine.models.unet import MEDIUM_SD, SD15, SD15_INPAINT, SD21, TINY_SD, UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

TINY_SD2 = dataclasses.replace(
    TINY_SD,
    num_heads=(2, 4),
    cross_attention_dim=24,
    use_linear_projection=True,
    upcast_attention=True,
    attention=("cross", "cross"),
)
TINY_THREE_LEVELS = dataclasses.replace(
    TINY_SD,
    block_out_channels=(32, 32, 64),
    attention=("cross", "cross", "none"),
    num_heads=(2, 4, 4),
    transformer_layers_per_block=2,
    layers_per_block=2,
)


def _pair(cfg: UNetConfig, seed: int = 0):
    dcfg = cfg.to_diffusers()
    assert dcfg.pop("_class_name") == "UNet2DConditionModel"
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**dcfg).eval()
    with torch.no_grad():  # perturb so that zero-initialised and unit-initialised layers matter too
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours = UNet(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _inputs(cfg: UNetConfig, size: int = 16, batch: int = 2, seq: int = 7, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    ctx = torch.randn(batch, seq, cfg.cross_attention_dim, generator=g)
    return x, ctx


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize(
    "cfg,size",
    [
        (TINY_SD, 16),
        (TINY_SD2, 16),
        (dataclasses.replace(TINY_SD, in_channels=9), 16),
        (dataclasses.replace(TINY_SD, num_class_embeds=4), 16),
        (dataclasses.replace(TINY_SD, projection_class_embeddings_input_dim=6), 16),  # the emoji model's pooled text
        (TINY_THREE_LEVELS, 18),  # 18 -> 9 -> 5: up-sampling must follow the skip sizes
    ],
    ids=[
        "sd1",
        "sd2_linear_proj_head_dims",
        "inpaint_9ch",
        "class_embeds",
        "projection_class_embedding",
        "three_levels_odd_size",
    ],
)
def test_unet2d_condition_parity(cfg: UNetConfig, size: int) -> None:
    ref, ours = _pair(cfg)
    x, ctx = _inputs(cfg, size)
    t = torch.tensor([999, 1])
    kw = {"class_labels": torch.tensor([0, 3])} if cfg.num_class_embeds else {}
    if cfg.projection_class_embeddings_input_dim:
        kw = {
            "class_labels": torch.randn(
                2, cfg.projection_class_embeddings_input_dim, generator=torch.Generator().manual_seed(3)
            )
        }
    with torch.no_grad():
        want = ref(x, t, encoder_hidden_states=ctx, **kw).sample
        got = ours(x, t, encoder_hidden_states=ctx, **kw)
    assert got.shape == want.shape == (2, cfg.out_channels, size, size)
    assert _err(got, want) < TOL
    if kw:  # the class input matters, and a U-Net with class conditioning needs it
        with torch.no_grad():
            other = ours(x, t, encoder_hidden_states=ctx, class_labels=kw["class_labels"].flip(0))
        assert _err(got, other) > 1e-3
        with pytest.raises(ValueError, match="class-conditional"):
            ours(x, t, encoder_hidden_states=ctx)


def test_projection_class_embedding_round_trips_and_rejects_bad_input() -> None:
    cfg = dataclasses.replace(TINY_SD, projection_class_embeddings_input_dim=6)
    d = cfg.to_diffusers()
    assert d["class_embed_type"] == "projection" and d["projection_class_embeddings_input_dim"] == 6
    assert UNetConfig.from_diffusers(d) == cfg
    with pytest.raises(ValueError, match="class_embed_type"):
        UNetConfig.from_diffusers({**d, "projection_class_embeddings_input_dim": None})
    with pytest.raises(ValueError, match="exclude each other"):
        dataclasses.replace(cfg, num_class_embeds=3)
    ours = UNet(cfg).eval()
    x, ctx = _inputs(cfg)
    with pytest.raises(ValueError, match=r"must be \(2, 6\) vectors"):
        ours(x, 10, encoder_hidden_states=ctx, class_labels=torch.randn(2, 5))
    plain = UNet(TINY_SD).eval()
    with pytest.raises(ValueError, match="without class conditioning"):
        plain(x, 10, encoder_hidden_states=ctx, class_labels=torch.randn(2, 6))


def test_controlnet_residuals_parity() -> None:
    cfg = TINY_THREE_LEVELS
    ref, ours = _pair(cfg)
    x, ctx = _inputs(cfg)
    t = torch.tensor(500.0)
    with torch.no_grad():  # the shapes ControlNet produces: one per skip connection, plus the middle
        h = ours.conv_in(x)
        skips = [h]
        emb = ours.embed(x, t)
        for block in ours.down_blocks:
            h, s = block(h, emb, ctx)
            skips.extend(s)
        g = torch.Generator().manual_seed(5)
        down_res = [torch.randn(s.shape, generator=g) * 0.5 for s in skips]
        mid_res = torch.randn(h.shape, generator=g) * 0.5
        want = ref(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=tuple(down_res),
            mid_block_additional_residual=mid_res,
        ).sample
        got = ours(
            x,
            t,
            encoder_hidden_states=ctx,
            down_block_additional_residuals=down_res,
            mid_block_additional_residual=mid_res,
        )
        plain = ours(x, t, encoder_hidden_states=ctx)
    assert _err(got, want) < TOL
    assert _err(got, plain) > 1e-3
    with pytest.raises(ValueError, match="down_block_additional_residuals"):
        ours(x, t, encoder_hidden_states=ctx, down_block_additional_residuals=down_res[:-1])


def test_output_depends_on_text_and_timestep() -> None:
    ours = UNet(TINY_SD).eval()
    x, ctx = _inputs(TINY_SD)
    with torch.no_grad():
        a = ours(x, 10, encoder_hidden_states=ctx)
        b = ours(x, 11, encoder_hidden_states=ctx)
        c = ours(x, 10, encoder_hidden_states=ctx.flip(0))
    assert _err(a, b) > 1e-4 and _err(a, c) > 1e-4
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        ours(x, 10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_forward(dtype: torch.dtype) -> None:
    ours = UNet(TINY_SD2).eval()
    x, ctx = _inputs(TINY_SD2)
    with torch.no_grad():
        want = ours(x, 10, encoder_hidden_states=ctx)
        got = ours.to(dtype)(x.to(dtype), 10, encoder_hidden_states=ctx.to(dtype))
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert _err(got.float(), want) < 0.1 * want.abs().max().item()


def test_from_diffusers_real_sd_configs() -> None:
    # The U-Net config.json of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 (abridged
    # to the keys they carry).
    sd15 = {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": "0.6.0",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "center_input_sample": False,
        "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    }
    assert UNetConfig.from_diffusers(sd15) == SD15
    assert UNetConfig.from_diffusers({**sd15, "in_channels": 9}) == SD15_INPAINT
    sd21 = {
        **sd15,
        "attention_head_dim": [5, 10, 20, 20],
        "cross_attention_dim": 1024,
        "sample_size": 96,
        "use_linear_projection": True,
        "upcast_attention": True,
        "dual_cross_attention": False,
        "num_class_embeds": None,
    }
    assert UNetConfig.from_diffusers(sd21) == SD21
    for cfg in (SD15, SD21, TINY_SD, TINY_SD2, TINY_THREE_LEVELS, MEDIUM_SD):
        assert UNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    # text_time (SDXL) is supported, but not without its addition_time_embed_dim; time_cond_proj_dim never
    with pytest.raises(ValueError, match="time_cond_proj_dim=256.*addition_embed_type='text_time' needs"):
        UNetConfig.from_diffusers({**sd15, "addition_embed_type": "text_time", "time_cond_proj_dim": 256})
    with pytest.raises(ValueError, match="cross_attention_dim"):
        UNetConfig.from_diffusers({**sd15, "cross_attention_dim": [768, 768, 1024, 1024]})


def test_meta_device_build_and_assign_load() -> None:
    t0 = time.perf_counter()
    with torch.device("meta"):
        meta = UNet(SD15)
    assert time.perf_counter() - t0 < 2.0  # no random init of 860M parameters
    n = sum(p.numel() for p in meta.parameters())
    assert 859e6 < n < 860e6, n
    # load real tensors into a meta-built tiny model and check it computes the same as a normal one
    cfg = TINY_SD2
    ref = UNet(cfg).eval()
    with torch.device("meta"):
        lazy = UNet(cfg)
    lazy.load_state_dict(ref.state_dict(), strict=True, assign=True)
    lazy.eval()
    assert all(p.device.type == "cpu" for p in lazy.parameters())
    x, ctx = _inputs(cfg)
    with torch.no_grad():
        assert torch.equal(lazy(x, 3, encoder_hidden_states=ctx), ref(x, 3, encoder_hidden_states=ctx))


@pytest.mark.slow
def test_medium_sd_parity() -> None:
    ref, ours = _pair(MEDIUM_SD)
    x, ctx = _inputs(MEDIUM_SD, size=32, seq=77)
    with torch.no_grad():
        want = ref(x, torch.tensor([999, 0]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([999, 0]), encoder_hidden_states=ctx)
    assert _err(got, want) < TOL


@pytest.mark.slow
def test_full_size_sd15_parity() -> None:
    # 860M parameters, batch 1 at 32x32 latents (256 px) to keep CPU time and memory reasonable.
    torch.manual_seed(0)
    dcfg = SD15.to_diffusers()
    dcfg.pop("_class_name")
    ref = diffusers.UNet2DConditionModel(**dcfg).eval()
    with torch.device("meta"):
        ours = UNet(SD15)
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    ours.eval()
    x, ctx = _inputs(SD15, size=32, batch=1, seq=77)
    with torch.no_grad():
        want = ref(x, torch.tensor([500]), encoder_hidden_states=ctx).sample
        got = ours(x, torch.tensor([500]), encoder_hidden_states=ctx)
    assert _err(got, want) < TOL
