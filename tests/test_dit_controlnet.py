"""SD3 and Flux ControlNets (sdengine.models.dit_controlnet) and the residual hooks of the MMDiT and the Flux
transformer, against diffusers' SD3ControlNetModel / FluxControlNetModel and transformers on tiny random
configs (same weights, loaded strictly; max abs difference <= 1e-5)."""

from __future__ import annotations

import logging

import pytest
import torch

from sdengine.models.config_checks import ConfigError
from sdengine.models.dit_controlnet import FluxControlNet, FluxControlNetConfig, SD3ControlNet, SD3ControlNetConfig
from sdengine.models.flux import FluxConfig, FluxTransformer
from sdengine.models.mmdit import MMDiT, MMDiTConfig

logging.getLogger("diffusers").setLevel(logging.ERROR)

SD3_BASE = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=4,
    attention_head_dim=8,
    num_attention_heads=3,
    joint_attention_dim=12,
    caption_projection_dim=24,
    pooled_projection_dim=10,
    out_channels=4,
    pos_embed_max_size=12,
)
FLUX_BASE = dict(
    patch_size=1,
    in_channels=16,
    num_layers=3,
    num_single_layers=5,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=12,
    pooled_projection_dim=10,
    axes_dims_rope=[4, 6, 6],
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _sd3_pair(seed: int, **cfg):
    from diffusers import SD3ControlNetModel, SD3Transformer2DModel

    base = {**SD3_BASE, **{k: v for k, v in cfg.items() if k in ("qk_norm", "dual_attention_layers")}}
    theirs_t = SD3Transformer2DModel(**base).eval()
    _randomise(theirs_t, seed)
    ours_t = MMDiT(MMDiTConfig(**base)).eval()
    ours_t.load_state_dict(theirs_t.state_dict(), strict=True)
    ccfg = {**SD3_BASE, "num_layers": 2, **cfg}
    theirs_c = SD3ControlNetModel(**ccfg).eval()
    _randomise(theirs_c, seed + 1)
    ours_c = SD3ControlNet(SD3ControlNetConfig.from_diffusers(dict(theirs_c.config))).eval()
    if not ccfg.get("use_pos_embed", True):
        theirs_c.pos_embed = theirs_c._get_pos_embed_from_transformer(theirs_t)
        ours_c.share_patch_embed(ours_t)
        missing = ours_c.load_state_dict(
            {k: v for k, v in theirs_c.state_dict().items() if not k.startswith("pos_embed.")}
        )
    else:
        missing = ours_c.load_state_dict(theirs_c.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return theirs_t, theirs_c, ours_t, ours_c


@pytest.mark.parametrize(
    "cfg",
    [
        {},  # InstantX's SD3 layout: joint blocks, sincos positions
        {"qk_norm": "rms_norm", "dual_attention_layers": [0]},  # SD3.5 Medium's blocks
        {"joint_attention_dim": None, "pos_embed_type": None, "use_pos_embed": False},  # Stability's SD3.5 ones
    ],
    ids=["instantx", "sd35_medium_blocks", "sd35_official"],
)
def test_sd3_controlnet_and_hook_match_diffusers(cfg):
    theirs_t, theirs_c, ours_t, ours_c = _sd3_pair(0, **cfg)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 6, generator=g)
    cond = torch.randn(2, 4, 8, 6, generator=g)
    t = torch.tensor([700.0, 300.0])
    ctx = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    c_ctx = ctx if cfg.get("joint_attention_dim", 12) is not None else None
    with torch.no_grad():
        (want,) = theirs_c(
            hidden_states=x,
            controlnet_cond=cond,
            conditioning_scale=0.7,
            encoder_hidden_states=c_ctx,
            pooled_projections=pooled,
            timestep=t,
            return_dict=False,
        )
        got = ours_c(x, cond, t, c_ctx, pooled, conditioning_scale=0.7)
        assert len(got) == len(want) == 2
        for a, b in zip(got, want, strict=True):
            assert (a - b).abs().max() <= 1e-5
        v_want = theirs_t(x, ctx, pooled, t, block_controlnet_hidden_states=want, return_dict=False)[0]
        v_got = ours_t(x, t, ctx, pooled, block_controlnet_hidden_states=got)
        plain = ours_t(x, t, ctx, pooled)
    assert (v_got - v_want).abs().max() <= 1e-5
    assert (v_got - plain).abs().max() > 1e-2  # the residuals do change the output


def test_sd3_hook_adds_residuals_to_skipped_blocks_as_diffusers():
    theirs_t, theirs_c, ours_t, ours_c = _sd3_pair(1)
    g = torch.Generator().manual_seed(4)
    x, ctx, pooled = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 3, 12, generator=g),
        torch.randn(1, 10, generator=g),
    )
    t = torch.tensor([500.0])
    res = [torch.randn(1, 16, 24, generator=g) for _ in range(3)]
    with torch.no_grad():
        want = theirs_t(x, ctx, pooled, t, block_controlnet_hidden_states=res, skip_layers=[1], return_dict=False)[0]
        got = ours_t(x, t, ctx, pooled, skip_layers=[1], block_controlnet_hidden_states=res)
    assert (got - want).abs().max() <= 1e-5


def _flux_pair(seed: int, guidance: bool = False, **cfg):
    from diffusers import FluxControlNetModel, FluxTransformer2DModel

    base = {**FLUX_BASE, "guidance_embeds": guidance}
    theirs_t = FluxTransformer2DModel(**base).eval()
    _randomise(theirs_t, seed)
    ours_t = FluxTransformer(FluxConfig.from_diffusers(dict(theirs_t.config))).eval()
    ours_t.load_state_dict(theirs_t.state_dict(), strict=True)
    theirs_c = FluxControlNetModel(**{**base, "num_layers": 2, "num_single_layers": 2, **cfg}).eval()
    _randomise(theirs_c, seed + 1)
    ours_c = FluxControlNet(FluxControlNetConfig.from_diffusers(dict(theirs_c.config))).eval()
    ours_c.load_state_dict(theirs_c.state_dict(), strict=True)
    return theirs_t, theirs_c, ours_t, ours_c


@pytest.mark.parametrize(
    "guidance,union", [(False, False), (True, False), (True, True)], ids=["schnell", "dev", "union"]
)
def test_flux_controlnet_and_hook_match_diffusers(guidance, union):
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    theirs_t, theirs_c, ours_t, ours_c = _flux_pair(0, guidance, **({"num_mode": 3} if union else {}))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 6, 8, generator=g)
    cond = torch.randn(2, 4, 6, 8, generator=g)
    ctx = torch.randn(2, 5, 12, generator=g)
    pooled = torch.randn(2, 10, generator=g)
    t = torch.tensor([0.8, 0.4])
    gd = torch.tensor([3.5, 3.5]) if guidance else None
    mode = torch.tensor([[2], [1]]) if union else None
    packed = FluxPipeline._pack_latents(x, 2, 4, 6, 8)
    packed_c = FluxPipeline._pack_latents(cond, 2, 4, 6, 8)
    img_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 4, "cpu", torch.float32)
    txt_ids = torch.zeros(5, 3)
    with torch.no_grad():
        d_want, s_want = theirs_c(
            hidden_states=packed,
            controlnet_cond=packed_c,
            controlnet_mode=mode,
            conditioning_scale=0.6,
            encoder_hidden_states=ctx,
            pooled_projections=pooled,
            timestep=t,
            img_ids=img_ids,
            txt_ids=txt_ids,
            guidance=gd,
            return_dict=False,
        )
        d_got, s_got = ours_c(x, cond, t * 1000, ctx, pooled, gd, mode, conditioning_scale=0.6)
        for a, b in zip([*d_got, *s_got], [*d_want, *s_want], strict=True):
            assert (a - b).abs().max() <= 1e-5
        want = theirs_t(
            hidden_states=packed,
            timestep=t,
            guidance=gd,
            pooled_projections=pooled,
            encoder_hidden_states=ctx,
            txt_ids=txt_ids,
            img_ids=img_ids,
            controlnet_block_samples=d_want,
            controlnet_single_block_samples=s_want,
            return_dict=False,
        )[0]
        got = ours_t(
            x, t * 1000, ctx, pooled, gd, controlnet_block_samples=d_got, controlnet_single_block_samples=s_got
        )
        plain = ours_t(x, t * 1000, ctx, pooled, gd)
    got_packed = FluxPipeline._pack_latents(got, 2, 4, 6, 8)
    assert (got_packed - want).abs().max() <= 1e-5
    assert (got - plain).abs().max() > 1e-2


def test_union_needs_its_mode_and_a_mode_in_range():
    _, _, _, ours_c = _flux_pair(2, False, num_mode=3)
    x = torch.zeros(1, 4, 4, 4)
    with pytest.raises(Exception, match="control mode"):
        ours_c(x, x, torch.tensor([500.0]), torch.zeros(1, 2, 12), torch.zeros(1, 10))
    with pytest.raises(Exception, match=r"one id in 0\.\.2"):
        ours_c(
            x, x, torch.tensor([500.0]), torch.zeros(1, 2, 12), torch.zeros(1, 10), controlnet_mode=torch.tensor([3])
        )


def test_configs_refuse_what_is_not_implemented():
    with pytest.raises(ConfigError, match="options sdengine does not implement: frobnicate"):
        SD3ControlNetConfig.from_diffusers({**SD3_BASE, "frobnicate": 1})
    with pytest.raises(ConfigError, match="conditioning_embedding_channels"):
        FluxControlNetConfig.from_diffusers({**FLUX_BASE, "conditioning_embedding_channels": 16})
    with pytest.raises(ConfigError, match="not 'FluxControlNetModel'"):
        FluxControlNetConfig.from_diffusers({"_class_name": "ControlNetModel"})


def test_full_size_flux_union_names_shapes_and_config_from_shapes():
    """InstantX's FLUX.1-dev-Controlnet-Union layout (5 double blocks, no single ones, 10 modes) at full size on the
    meta device: diffusers' names and shapes, and the config read back from them."""
    from diffusers import FluxControlNetModel

    from sdengine.control.dit_files import flux_config_from_weights

    cfg = dict(num_layers=5, num_single_layers=0, guidance_embeds=True, num_mode=10)
    with torch.device("meta"):
        theirs = FluxControlNetModel(**cfg)
        ours = FluxControlNet(FluxControlNetConfig(**cfg))
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    assert flux_config_from_weights(theirs.state_dict()) == FluxControlNetConfig(**cfg)


def test_full_size_sd35_large_controlnet_layout():
    """Stability's SD3.5 Large ControlNets' layout (no text stream, the base model's patch embedding, no position
    table, a caption width their blocks do not use) at full size on the meta device: diffusers' names and shapes."""
    from diffusers import SD3ControlNetModel

    cfg = dict(
        num_layers=19,
        num_attention_heads=38,
        attention_head_dim=64,
        caption_projection_dim=2048,
        joint_attention_dim=None,
        pos_embed_type=None,
        use_pos_embed=False,
        pos_embed_max_size=None,
        force_zeros_for_pooled_projection=False,
    )
    with torch.device("meta"):
        theirs = SD3ControlNetModel(**cfg)
        ours = SD3ControlNet(SD3ControlNetConfig.from_diffusers(dict(theirs.config)))
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    from sdengine.control.dit_files import sd3_config_from_weights

    read = sd3_config_from_weights(theirs.state_dict())
    assert (read.num_layers, read.num_attention_heads, read.attention_head_dim) == (19, 38, 64)
    assert read.joint_attention_dim is None and not read.use_pos_embed and not read.force_zeros_for_pooled_projection
