"""ControlNet: residual parity with diffusers' ControlNetModel, from_unet, zero convolutions, original-layout key
tables (vs diffusers' converter), loading both layouts, sampling parity with StableDiffusionControlNetPipeline
(latents, same text states), preprocessors, CLI spec parsing and every bad input of issue 6."""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine import control as C
from sdengine.commands import generate as G
from sdengine.diffusion.samplers import SamplerStep
from sdengine.models.controlnet import SD15_CONTROLNET, SD21_CONTROLNET, ControlNet, ControlNetConfig
from sdengine.models.unet import TINY_SD, UNet, UNetConfig
from sdengine.pipeline import control as PC
from sdengine.weights import controlnet_keys as ck
from sdengine.weights.io import save_safetensors

diffusers = pytest.importorskip("diffusers")
for _name in ("diffusers", "transformers"):
    logging.getLogger(_name).setLevel(logging.ERROR)

TOL = 1e-4
HINT = (8, 16)  # 2 hint levels: control images 2x the latent size (the tiny VAE's factor)

TINY_SD2 = dataclasses.replace(
    TINY_SD,
    num_heads=(2, 4),
    cross_attention_dim=24,
    use_linear_projection=True,
    upcast_attention=True,
    attention=("cross", "cross"),
)
TINY_THREE = dataclasses.replace(
    TINY_SD,
    block_out_channels=(32, 32, 64),
    attention=("cross", "cross", "none"),
    num_heads=(2, 4, 4),
    transformer_layers_per_block=2,
    layers_per_block=2,
)


def _perturb(module: torch.nn.Module, seed: int, amount: float = 0.05) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # zero convolutions must matter in parity tests
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * amount)


def _pair(cfg: ControlNetConfig, seed: int = 0):
    d = cfg.to_diffusers()
    assert d.pop("_class_name") == "ControlNetModel"
    torch.manual_seed(seed)
    ref = diffusers.ControlNetModel(**d).eval()
    _perturb(ref, seed)
    ours = ControlNet(ControlNetConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ model parity


@pytest.mark.parametrize(
    "cfg,size,opts",
    [
        (ControlNetConfig.from_unet(TINY_SD, conditioning_embedding_out_channels=HINT), 8, {}),
        (ControlNetConfig.from_unet(TINY_SD2, conditioning_embedding_out_channels=HINT), 8, {}),
        (ControlNetConfig.from_unet(TINY_THREE, conditioning_embedding_out_channels=(8, 16, 16)), 9, {}),
        (ControlNetConfig.from_unet(TINY_SD, conditioning_embedding_out_channels=HINT), 8, {"guess_mode": True}),
        (
            dataclasses.replace(
                ControlNetConfig.from_unet(TINY_SD, conditioning_embedding_out_channels=HINT),
                global_pool_conditions=True,
                channel_order="bgr",
                conditioning_channels=1,
            ),
            8,
            {},
        ),
    ],
    ids=["sd1", "sd2_linear_proj", "three_levels_odd_size", "guess_mode", "global_pool_bgr_1ch"],
)
def test_residuals_parity_with_diffusers(cfg: ControlNetConfig, size: int, opts: dict) -> None:
    ref, ours = _pair(cfg)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 5, cfg.unet.cross_attention_dim, generator=g)
    img_size = size * cfg.downscale
    img = torch.rand(2, cfg.conditioning_channels, img_size, img_size, generator=g)
    t = torch.tensor([981, 21])
    with torch.no_grad():
        want, want_mid = ref(
            x, t, encoder_hidden_states=ctx, controlnet_cond=img, conditioning_scale=0.7, return_dict=False, **opts
        )
        got, got_mid = ours(x, t, img, encoder_hidden_states=ctx, scale=0.7, **opts)
    assert len(got) == len(want) == ours.num_residuals
    assert max(_err(a, b) for a, b in zip(got, want, strict=True)) < TOL
    assert _err(got_mid, want_mid) < TOL
    assert got_mid.abs().max() > 1e-3  # the perturbed zero convs really contribute


def test_from_unet_copies_the_encoder_like_diffusers() -> None:
    ref_unet_cfg = TINY_THREE.to_diffusers()
    ref_unet_cfg.pop("_class_name")
    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(**ref_unet_cfg)
    _perturb(ref_unet, 3)
    unet = UNet(TINY_THREE)
    unet.load_state_dict(ref_unet.state_dict())
    ref = diffusers.ControlNetModel.from_unet(ref_unet, conditioning_embedding_out_channels=HINT)
    ours = ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT)
    assert ours.config == ControlNetConfig.from_diffusers(dict(ref.config))
    want, got = ref.state_dict(), ours.state_dict()
    assert set(want) == set(got)
    for k, v in want.items():
        if k.startswith("controlnet_cond_embedding.") and not k.startswith("controlnet_cond_embedding.conv_out"):
            continue  # random initialisation on both sides
        assert torch.equal(v, got[k]), k
    zero = [
        k
        for k in got
        if k.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
    ]
    assert zero and all(not got[k].any() for k in zero)


def test_config_round_trip_and_published_sd_configs() -> None:
    for cfg in (SD15_CONTROLNET, SD21_CONTROLNET):
        assert ControlNetConfig.from_diffusers(cfg.to_diffusers()) == cfg
    d15 = SD15_CONTROLNET.to_diffusers()  # lllyasviel/control_v11p_sd15_canny config.json values
    assert d15["cross_attention_dim"] == 768 and d15["attention_head_dim"] == [8, 8, 8, 8]
    assert d15["block_out_channels"] == [320, 640, 1280, 1280] and d15["conditioning_embedding_out_channels"] == [
        16,
        32,
        96,
        256,
    ]
    published_sd21 = {  # thibaud/controlnet-sd21-canny-diffusers config.json (fields that matter)
        "_class_name": "ControlNetModel",
        "attention_head_dim": [5, 10, 20, 20],
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "conditioning_channels": 3,
        "controlnet_conditioning_channel_order": "rgb",
        "global_pool_conditions": False,
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "upcast_attention": False,
        "num_class_embeds": None,
        "class_embed_type": None,
        "in_channels": 4,
    }
    cfg = ControlNetConfig.from_diffusers(published_sd21)
    assert cfg.unet.num_heads == SD21_CONTROLNET.unet.num_heads and cfg.unet.cross_attention_dim == 1024
    with pytest.raises(ValueError, match="addition_embed_type"):
        ControlNetConfig.from_diffusers({**published_sd21, "addition_embed_type": "text_time"})


# ---------------------------------------------------------------------------------- zero convolutions


def test_fresh_controlnet_leaves_the_output_exactly_unchanged() -> None:
    torch.manual_seed(0)
    unet = UNet(TINY_SD).eval()
    _perturb(unet, 5)
    nets = [ControlNet.from_unet(unet, conditioning_embedding_out_channels=HINT) for _ in range(2)]
    img = torch.rand(1, 3, 16, 16)
    grid = torch.tensor([999.0, 500.0, 1.0])
    for guess in (False, True):
        m = PC.build_controlled_unet(
            unet,
            [(nets[0], img, 1.0, 0.0, 1.0), (nets[1], img, 0.5, 0.0, 0.6)],
            width=16,
            height=16,
            grid=grid,
            guess_mode=guess,
        )
        x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 3, 32)
        for i, t in enumerate(grid):
            with torch.no_grad():
                a = unet(x, t.expand(2), encoder_hidden_states=ctx)
                b = m(x, t.expand(2), encoder_hidden_states=ctx, step=i)
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------ original-layout tables


def _original(sd: dict, cfg: ControlNetConfig) -> dict:
    from sdengine.control import controlnet_layout as _layout

    out, bad = ck.controlnet_diffusers_to_original(sd, _layout(cfg), len(cfg.conditioning_embedding_out_channels))
    assert not bad
    return {ck.CONTROL_PREFIX + k: v for k, v in out.items()}


@pytest.mark.parametrize("which", ["tiny_three", "sd15_meta", "sd21_meta"])
def test_original_names_match_diffusers_converter(which: str) -> None:
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint

    if which == "tiny_three":
        # 4 hint levels: diffusers' converter hard-codes conv_out at input_hint_block.14 (our table counts)
        cfg = ControlNetConfig.from_unet(TINY_THREE, conditioning_embedding_out_channels=(8, 8, 16, 16))
        ref, _ = _pair(cfg)
    else:
        cfg = SD15_CONTROLNET if which == "sd15_meta" else SD21_CONTROLNET
        d = cfg.to_diffusers()
        d.pop("_class_name")
        with torch.device("meta"):
            ref = diffusers.ControlNetModel(**d)
    want = ref.state_dict()
    original = _original(want, cfg)
    # the published files' names (lllyasviel/ControlNet-v1-1 control_v11p_sd15_canny.pth)
    for name in (
        "control_model.input_hint_block.14.weight",
        "control_model.zero_convs.0.0.weight",
        "control_model.middle_block_out.0.bias",
        "control_model.time_embed.0.weight",
    ):
        assert name in original or which == "tiny_three"
    converted = convert_controlnet_checkpoint(original, dict(ref.config))
    assert set(converted) == set(want)
    for k, v in want.items():
        assert converted[k] is original_value(original, v), k
    back, bad = ck.controlnet_original_to_diffusers(
        ck.strip_prefix(original), C.controlnet_layout(cfg), len(cfg.conditioning_embedding_out_channels)
    )
    assert not bad and set(back) == set(want)


def original_value(original: dict, v: torch.Tensor) -> torch.Tensor:
    """The tensor object in ``original`` that is ``v`` (the tables only rename: no copies)."""
    return next(t for t in original.values() if t is v)


# ------------------------------------------------------------------------------------------- loading


def _tiny_net(cfg: UNetConfig = TINY_SD, seed: int = 0) -> ControlNet:
    torch.manual_seed(seed)
    net = ControlNet(ControlNetConfig.from_unet(cfg, conditioning_embedding_out_channels=HINT)).eval()
    _perturb(net, seed + 10)
    return net


def _residuals(net: ControlNet, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    u = net.config.unet
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 3, u.cross_attention_dim, generator=g)
    img = torch.rand(1, 3, 16, 16, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([400]), img, encoder_hidden_states=ctx)


def _same(a, b) -> None:
    assert all(torch.equal(p, q) for p, q in zip(a[0], b[0], strict=True)) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("base", [TINY_SD, TINY_SD2], ids=["sd1", "sd2"])
def test_original_file_and_diffusers_folder_give_the_same_output(tmp_path, base: UNetConfig) -> None:
    net = _tiny_net(base)
    folder = C.save_controlnet(net, tmp_path / "cn")
    single = C.save_controlnet(net, tmp_path / "control_tiny.safetensors", layout="original")
    # as published: original names, no config in the file (architecture read off the shapes + base model)
    plain = tmp_path / "control_plain.safetensors"
    save_safetensors(_original(net.state_dict(), net.config), plain)
    bare = tmp_path / "thibaud_style.safetensors"  # no control_model. prefix
    save_safetensors(ck.strip_prefix(_original(net.state_dict(), net.config)), bare)
    dfile = tmp_path / "diffusers_single.safetensors"  # diffusers names, no config beside it
    save_safetensors(net.state_dict(), dfile)
    want = _residuals(net)
    for path in (folder, single, plain, bare, dfile):
        loaded = C.load_controlnet(path, base=base)
        assert loaded.config == net.config, path
        got = loaded.state_dict()
        assert set(got) == set(net.state_dict()) and all(torch.equal(v, got[k]) for k, v in net.state_dict().items())
        # Loaded parameters are views of the file's memory map; their alignment can pick other SIMD paths
        # (float32 rounding ~1e-6), so compare outputs both as loaded and copied into ordinary memory.
        fresh = ControlNet(loaded.config).eval()
        fresh.load_state_dict(got)
        _same(_residuals(fresh), want)
        res = _residuals(loaded)
        assert max(_err(a, b) for a, b in zip(res[0], want[0], strict=True)) < 1e-5
    assert C.read_controlnet(single).layout == "original" and C.read_controlnet(folder).layout == "diffusers"
    # diffusers reads our folder too
    ref = diffusers.ControlNetModel.from_pretrained(folder)
    assert set(ref.state_dict()) == set(net.state_dict())


def test_sd1_and_sd2_architectures_read_off_full_size_shapes() -> None:
    for cfg in (SD15_CONTROLNET, SD21_CONTROLNET):
        with torch.device("meta"):
            net = ControlNet(cfg)
        original = ck.strip_prefix(_original(net.state_dict(), cfg))
        got = C.config_from_weights(original, base=None)
        assert got.unet.num_heads == cfg.unet.num_heads
        assert dataclasses.replace(
            got, unet=dataclasses.replace(got.unet, upcast_attention=False)
        ) == dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, upcast_attention=False))


def test_controlnet_for_another_base_is_refused(tmp_path) -> None:
    path = C.save_controlnet(_tiny_net(TINY_SD2), tmp_path / "cn2")
    with pytest.raises(C.ControlNetError, match="cross-attention width 24.*width 32"):
        C.load_controlnet(path, base=TINY_SD)
    other = dataclasses.replace(TINY_SD, block_out_channels=(32, 32))
    with pytest.raises(C.ControlNetError, match="block_out_channels"):
        C.check_compatible(_tiny_net(TINY_SD).config, other)
    sd15 = C.family(768)
    assert sd15 == "SD 1.x" and C.family(1024) == "SD 2.x"
    with pytest.raises(C.ControlNetError, match="is for SD 2.x .* but the model is SD 1.x"):
        C.check_compatible(SD21_CONTROLNET, SD15_CONTROLNET.unet)
    unet = UNet(TINY_SD)
    with pytest.raises(C.ControlNetError, match="cross-attention width"):
        PC.build_controlled_unet(
            unet,
            [(_tiny_net(TINY_SD2), np.zeros((16, 16, 3), np.uint8), 1.0, 0.0, 1.0)],
            width=16,
            height=16,
            grid=torch.tensor([500.0]),
        )


def test_files_that_are_not_controlnets_are_named(tmp_path) -> None:
    sd_file = tmp_path / "model.safetensors"
    save_safetensors({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, sd_file)
    with pytest.raises(C.ControlNetError, match="Stable Diffusion checkpoint, not a ControlNet"):
        C.load_controlnet(sd_file)
    with pytest.raises(C.ControlNetError, match="not found"):
        C.load_controlnet(tmp_path / "missing.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.ControlNetError, match="no config.json"):
        C.load_controlnet(tmp_path / "empty")


# --------------------------------------------------------------- sampling parity with the diffusers pipeline


def _diffusers_pipe(unet_ref, controlnets):
    from diffusers import AutoencoderKL, StableDiffusionControlNetPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=16,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=1,
            vocab_size=100,
            max_position_embeddings=8,
        )
    )
    return StableDiffusionControlNetPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=None,
        unet=unet_ref,
        scheduler=diffusers.DDIMScheduler(),
        controlnet=controlnets if len(controlnets) > 1 else controlnets[0],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


SCHED = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@pytest.mark.parametrize(
    "sampler,n_nets,scales,starts,ends,guess",
    [
        ("dpmpp_2m", 1, [0.8], [0.0], [1.0], False),
        ("ddim", 2, [1.3, 0.6], [0.0, 0.2], [0.5, 1.0], False),
        ("euler", 2, [1.0, 0.7], [0.1, 0.0], [1.0, 0.75], True),
    ],
    ids=["one_dpmpp2m", "two_ddim_start_end", "two_euler_guess_mode"],
)
def test_sampling_parity_with_controlnet_pipeline(sampler, n_nets, scales, starts, ends, guess) -> None:
    """Same random weights and text states: our sampler over the controlled U-Net vs the diffusers pipeline's
    latents (output_type='latent'); the control images are 20x20 and get resized to 16x16 on both sides."""
    from sdengine.diffusion import sampling
    from sdengine.diffusion.denoisers import Denoiser
    from sdengine.diffusion.guidance import CFGDenoiser
    from sdengine.diffusion.schedules import NoiseSchedule

    ucfg = dataclasses.replace(TINY_SD, block_out_channels=(32, 64), attention=("cross", "cross"))
    d = ucfg.to_diffusers()
    d.pop("_class_name")
    torch.manual_seed(0)
    unet_ref = diffusers.UNet2DConditionModel(**d).eval()
    _perturb(unet_ref, 1, 0.02)
    unet = UNet(ucfg).eval()
    unet.load_state_dict(unet_ref.state_dict())
    refs, ours = [], []
    for k in range(n_nets):
        r = diffusers.ControlNetModel.from_unet(unet_ref, conditioning_embedding_out_channels=HINT).eval()
        _perturb(r, 20 + k, 0.05)
        refs.append(r)
        o = ControlNet(ControlNetConfig.from_diffusers(dict(r.config))).eval()
        o.load_state_dict(r.state_dict())
        ours.append(o)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n_nets)]
    g = torch.Generator().manual_seed(7)
    pos, neg = torch.randn(1, 5, 32, generator=g), torch.randn(1, 5, 32, generator=g)
    steps, seed, cfg_scale = 6, 11, 5.0

    cls_name, kwargs = sampling.diffusers_equivalent(sampler, "normal", SCHED)
    pipe = _diffusers_pipe(unet_ref, refs)
    pipe.scheduler = getattr(diffusers, cls_name).from_config({**SCHED, **kwargs})
    pipe.set_progress_bar_config(disable=True)
    multi = n_nets > 1
    with torch.no_grad():
        want = pipe(
            prompt_embeds=pos,
            negative_prompt_embeds=neg,
            image=images if multi else images[0],
            height=16,
            width=16,
            num_inference_steps=steps,
            guidance_scale=cfg_scale,
            generator=torch.Generator().manual_seed(seed),
            output_type="latent",
            controlnet_conditioning_scale=scales if multi else scales[0],
            control_guidance_start=starts if multi else starts[0],
            control_guidance_end=ends if multi else ends[0],
            guess_mode=guess,
        ).images

    ns = NoiseSchedule.from_config(**SCHED)
    grid = sampling.make_grid(sampler, steps, ns, "normal", SCHED)
    units = [(o, im, s, a, b) for o, im, s, a, b in zip(ours, images, scales, starts, ends, strict=True)]
    model = PC.build_controlled_unet(unet, units, width=16, height=16, grid=grid, guess_mode=guess)
    den = CFGDenoiser(Denoiser(model, ns, "epsilon"), cfg_scale, {"encoder_hidden_states": neg})
    gens = [torch.Generator().manual_seed(seed)]
    noise = torch.randn((1, 4, 8, 8), generator=gens[0])
    with torch.no_grad():
        got = sampling.sample(
            den,
            noise,
            sampler=sampler,
            steps=steps,
            scheduler_config=SCHED,
            generators=gens,
            extra_args={"encoder_hidden_states": pos},
        )
    assert got.shape == want.shape
    err = (got - want).abs().max().item()
    assert err < 1e-3, err
    # and the ControlNets matter: without them the result moves
    plain = CFGDenoiser(Denoiser(unet, ns, "epsilon"), cfg_scale, {"encoder_hidden_states": neg})
    with torch.no_grad():
        base = sampling.sample(
            plain,
            noise,
            sampler=sampler,
            steps=steps,
            scheduler_config=SCHED,
            generators=[torch.Generator().manual_seed(seed)],
            extra_args={"encoder_hidden_states": pos},
        )
    assert (base - want).abs().max().item() > 100 * max(err, 1e-6)


def test_step_keep_and_the_sampler_step_follow_diffusers() -> None:
    n = 10
    for s, e in ((0.0, 1.0), (0.2, 0.5), (0.33, 0.9)):
        want = [1.0 - float(i / n < s or (i + 1) / n > e) for i in range(n)]
        assert [float(k) for k in PC.step_keep(n, s, e)] == want
    unet = UNet(TINY_SD)
    net = _tiny_net()
    ts = torch.tensor([981.0, 801.0, 601.0, 401.0, 201.0, 1.0])
    m = PC.build_controlled_unet(
        unet, [(net, torch.rand(1, 3, 16, 16), 1.0, 0.0, 0.5)], width=16, height=16, grid=ts, start_step=2
    )  # img2img: 4 steps run
    assert m.units[0].keep == [True, True, False, False]
    # The step comes from the sampler loop, never from the timestep: the same t at steps 1 and 2 is
    # controlled at step 1 only.
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32), torch.tensor([500.0])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx)
        assert not torch.equal(m(x, t, encoder_hidden_states=ctx, step=SamplerStep(1)), plain)
        assert torch.equal(m(x, t, encoder_hidden_states=ctx, step=SamplerStep(2)), plain)
    with pytest.raises(C.ControlNetError, match="needs the sampler's step"):
        m(x, t, encoder_hidden_states=ctx)


def test_a_window_shorter_than_a_step_is_said_not_silent() -> None:
    # 10 steps, start 0.31, end 0.39: diffusers' rule (i/10 >= 0.31 and (i+1)/10 <= 0.39) keeps no step, so the
    # ControlNet does nothing; that must be said, not left silent.
    unet, net, img = UNet(TINY_SD), _tiny_net(), torch.rand(1, 3, 16, 16)
    grid = torch.linspace(999.0, 1.0, 10)
    with pytest.warns(UserWarning, match=r"ControlNet 1: guidance start 0.31 and end 0.39 .* acts on no step"):
        m = PC.build_controlled_unet(unet, [(net, img, 1.0, 0.31, 0.39)], width=16, height=16, grid=grid)
    assert not any(m.units[0].keep)
    notes: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a note callback takes the message instead of a warning
        PC.build_controlled_unet(
            unet, [(net, img, 1.0, 0.0, 1.0), (net, img, 1.0, 0.31, 0.39)], width=16, height=16, grid=grid,
            note=notes.append,
        )  # fmt: skip
        assert len(notes) == 1 and notes[0].startswith("ControlNet 2:") and "of the 10 that run" in notes[0]
        # a window of exactly one step keeps that step and says nothing
        m = PC.build_controlled_unet(
            unet, [(net, img, 1.0, 0.3, 0.4)], width=16, height=16, grid=grid, note=notes.append
        )
    assert m.units[0].keep == [i == 3 for i in range(10)] and len(notes) == 1


def test_a1111_step_rule_counts_as_the_extension() -> None:
    # sd-webui-controlnet: guidance stopped when i/steps < start or i/steps > end (guidance_schedule_handler)
    for n, s, e in ((20, 0.0, 0.5), (10, 0.3, 0.35), (10, 0.31, 0.39), (7, 0.2, 0.9), (4, 0.0, 1.0)):
        assert PC.step_keep(n, s, e, "a1111") == [not (i / n < s or i / n > e) for i in range(n)]
    assert sum(PC.step_keep(20, 0.0, 0.5, "a1111")) == 11 and sum(PC.step_keep(20, 0.0, 0.5)) == 10
    unet, net, img = UNet(TINY_SD), _tiny_net(), torch.rand(1, 3, 16, 16)
    grid = torch.linspace(999.0, 1.0, 10)
    notes: list[str] = []
    unit = PC.ControlUnit(net, img, 1.0, 0.3, 0.35, rule="a1111")  # diffusers' rule: no step; A1111's: step 3
    m = PC.build_controlled_unet(unet, [unit], width=16, height=16, grid=grid, note=notes.append)
    assert m.units[0].keep == [i == 3 for i in range(10)] and not notes
    PC.build_controlled_unet(
        unet, [PC.ControlUnit(net, img, 1.0, 0.31, 0.39, rule="a1111")], width=16, height=16, grid=grid,
        note=notes.append,
    )  # fmt: skip
    assert len(notes) == 1 and "start <= i/10 <= end, as A1111's ControlNet extension counts" in notes[0]
    with pytest.raises(C.ControlNetError, match="unknown ControlNet step rule 'comfy'; use one of: diffusers, a1111"):
        PC.ControlUnit(net, img, rule="comfy")


def test_comfyui_rule_judges_each_call_on_its_sigma() -> None:
    """rule="comfyui" (ComfyUI's ControlNetApplyAdvanced): the percents become sigmas of the schedule and each model
    call is judged on its own sigma (a midpoint call of a second-order sampler on the midpoint's sigma, not on the
    step's); without the schedule or the grid's sigmas the unit is refused in one line."""
    from sdengine.diffusion.schedules import NoiseSchedule, SamplingGrid

    ns = NoiseSchedule.from_config(**SCHED)
    low, high = PC.comfy_sigma_window(ns.log_sigmas, 0.3, 0.6)
    assert PC.percent_to_sigma(ns.log_sigmas, 0.0) > ns.sigma_max and PC.percent_to_sigma(ns.log_sigmas, 1.0) == 0.0
    # the sigma at timestep (1 - p) * 999: 0.6 -> t 399.6, between the table's 399 and 400 in log-sigma
    ls = ns.log_sigmas.double()
    assert math.isclose(low, math.exp(0.4 * ls[399] + 0.6 * ls[400]), rel_tol=1e-5)
    assert math.isclose(high, math.exp(ls[699] + 0.3 * (ls[700] - ls[699])), rel_tol=1e-5)
    unet, net, img = UNet(TINY_SD), _tiny_net(), torch.rand(1, 3, 16, 16)
    sigmas = torch.tensor([high * 2, high * 1.01, high, (high + low) / 2, low, low * 0.99, 0.0])
    grid = SamplingGrid(sigmas, ns.sigma_to_t(sigmas[:-1]))
    unit = PC.ControlUnit(net, img, 1.0, 0.3, 0.6, rule="comfyui")
    m = PC.build_controlled_unet(unet, [unit], width=16, height=16, grid=grid, noise_schedule=ns)
    assert m.units[0].keep == [False, False, True, True, True, False]
    x, ctx, t = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 32), torch.tensor([500.0])
    with torch.no_grad():
        plain = unet(x, t, encoder_hidden_states=ctx)
        # step 1 is off, but a call of step 1 at a sigma inside the window runs the ControlNet, and the reverse
        assert not torch.equal(m(x, t, encoder_hidden_states=ctx, step=SamplerStep(1, sigma=high * 0.999)), plain)
        assert torch.equal(m(x, t, encoder_hidden_states=ctx, step=SamplerStep(3, sigma=low * 0.999)), plain)
    with pytest.raises(C.ControlNetError, match="comfyui step rule needs the noise schedule"):
        PC.build_controlled_unet(unet, [unit], width=16, height=16, grid=grid)
    with pytest.raises(C.ControlNetError, match="judged on sigmas"):
        PC.step_keep(10, 0.3, 0.6, "comfyui")


def test_inpainting_unet_gets_the_latent_channels_only() -> None:
    torch.manual_seed(0)
    unet9 = UNet(dataclasses.replace(TINY_SD, in_channels=9)).eval()
    net = ControlNet.from_unet(unet9, conditioning_embedding_out_channels=HINT)
    assert net.config.unet.in_channels == 4
    assert torch.equal(net.conv_in.weight, unet9.conv_in.weight[:, :4])
    _perturb(net, 4)
    m = PC.build_controlled_unet(
        unet9, [(net, torch.rand(1, 3, 16, 16), 1.0, 0.0, 1.0)], width=16, height=16, grid=torch.tensor([500.0])
    )
    x = torch.randn(1, 9, 8, 8)
    ctx = torch.randn(1, 3, 32)
    with torch.no_grad():
        down, mid = net(x[:, :4], torch.tensor([500.0]), m.units[0].image, encoder_hidden_states=ctx)
        want = unet9(
            x,
            torch.tensor([500.0]),
            encoder_hidden_states=ctx,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        )
        got = m(x, torch.tensor([500.0]), encoder_hidden_states=ctx, step=0)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------ preprocessors


def _photo(size: int = 32) -> Image.Image:
    a = np.zeros((size, size, 3), np.uint8)
    a[8:24, 8:24] = (200, 120, 40)  # a square: edges on its border only
    return Image.fromarray(a)


def test_preprocessors() -> None:
    edges = np.asarray(C.preprocess("canny", _photo(), low=50, high=100))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) == {0, 255}
    assert edges[16, 16].max() == 0 and edges[:, 7:9].any()
    page = np.full((16, 16), 250, np.uint8)
    page[4:12, 8] = 10  # a dark stroke on a light page
    s = np.asarray(C.preprocess("scribble", Image.fromarray(page)))
    assert s[6, 8].tolist() == [255, 255, 255] and s[0, 0].tolist() == [0, 0, 0]
    th = np.asarray(C.preprocess("threshold", Image.fromarray(page), threshold=100))
    assert th[0, 0, 0] == 255 and th[6, 8, 0] == 0
    soft = np.asarray(C.preprocess("softedge", _photo()))
    assert soft.max() == 255 and soft[16, 16, 0] < soft[16, 8, 0] and soft[0, 0, 0] == 0
    inv = np.asarray(C.preprocess("invert", _photo()))
    assert inv[0, 0].tolist() == [255, 255, 255]
    assert np.array_equal(np.asarray(C.preprocess("none", _photo())), np.asarray(_photo()))


def _kornia_canny_oracle(rgb: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """kornia.filters.canny's algorithm (kornia 0.7/0.8, the one ComfyUI's Canny node calls), written here from
    its documented steps with torch ops as kornia does them: grey 0.299/0.587/0.114, 5x5 Gaussian of sigma 1
    (reflect border), unnormalised Sobel (replicate border), NMS by 8 difference kernels (zero padding) and
    gather, strict thresholds, hysteresis repeated until nothing changes. (1, 3, H, W) -> (1, 1, H, W) 0/1."""
    import torch.nn.functional as F

    grey = (rgb * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = torch.arange(5, dtype=torch.float32) - 2
    g = torch.exp(-(x**2) / 2.0)
    g = g / g.sum()
    blurred = F.conv2d(F.pad(grey, (2, 2, 2, 2), mode="reflect"), (g[:, None] * g[None, :])[None, None])
    sx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    grads = F.conv2d(F.pad(blurred, (1, 1, 1, 1), mode="replicate"), torch.stack([sx, sx.T])[:, None])
    gx, gy = grads[:, :1], grads[:, 1:]
    mag = torch.sqrt(gx * gx + gy * gy + 1e-6)
    angle = torch.round(torch.atan2(gy, gx) * (4 / math.pi))
    nms = torch.zeros(8, 1, 3, 3)
    for k, (dy, dx) in enumerate([(0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1), (-1, 0), (-1, 1)]):
        nms[k, 0, 1, 1], nms[k, 0, 1 + dy, 1 + dx] = 1.0, -1.0
    diffs = F.conv2d(mag, nms, padding=1)
    pos = torch.gather(diffs, 1, (angle % 8).long())
    neg = torch.gather(diffs, 1, ((angle + 4) % 8).long())
    mag = mag * (torch.minimum(pos, neg) > 0)
    edges = (mag > low) * 0.5 + (mag > high) * 0.5
    hyst = torch.zeros(8, 1, 3, 3)
    for k in range(9):
        if k != 4:
            hyst[k - (k > 4), 0, k // 3, k % 3] = 1.0
    old = -torch.ones_like(edges)
    while (old != edges).any():
        weak, strong = (edges == 0.5).float(), (edges == 1).float()
        grown = (F.conv2d(edges, hyst, padding=1) == 1).any(1, keepdim=True).float() * weak + strong
        old, edges = edges, grown + (grown == 0) * weak * 0.5
    return (edges == 1).float()


def test_comfyui_canny_follows_kornia_blur_and_fractional_thresholds() -> None:
    # ComfyUI's Canny node is kornia.filters.canny: a Gaussian blur first, thresholds in 0..1 on the L2 Sobel
    # magnitude. The node once ran OpenCV's Canny (no blur, L1, thresholds x255) and gave other edges.
    from sdengine.server.comfy.nodes import canny_node

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:56].astype(np.float32)
    img = np.zeros((48, 56, 3), np.float32)
    img[(x - 20) ** 2 + (y - 22) ** 2 < 150] = (0.9, 0.5, 0.2)  # a disc: edges all round, no exact ties
    img[30:41, 33:50] = (0.1, 0.8, 0.7)
    img += rng.normal(0, 0.04, img.shape).astype(np.float32)  # noise: the blur must keep it from making edges
    img = img.clip(0, 1)
    tensor = torch.from_numpy(img)[None]
    for low, high in ((0.4, 0.8), (0.1, 0.3), (0.2, 0.9)):
        want = _kornia_canny_oracle(tensor.permute(0, 3, 1, 2), low, high)[0, 0].numpy() > 0
        (out,) = canny_node(None, tensor, low, high)
        assert out.shape == (1, 48, 56, 3) and set(out.unique().tolist()) == {0.0, 1.0}
        got = out[0, :, :, 0].numpy() > 0
        assert want.sum() > 40 and (got != want).sum() <= 2, (low, high, want.sum(), (got != want).sum())
        assert torch.equal(out[..., 0], out[..., 2])
        assert np.array_equal(C.canny_fractions(img, low, high), got)
    # without the blur (what OpenCV's Canny does), the noise alone gives edges far from the shapes
    plain = np.asarray(C.canny(Image.fromarray((img * 255).round().astype(np.uint8)), 0.1 * 255, 0.3 * 255))[..., 0]
    blurred = C.canny_fractions(img, 0.1, 0.3)
    assert (plain > 0).sum() > 2 * blurred.sum()
    with pytest.raises(C.ControlNetError, match="0 < low <= high < 1"):
        C.canny_fractions(img, 0.8, 0.4)


def test_threshold_is_a1111s_every_channel_above() -> None:
    # sd-webui-controlnet's threshold: white where min(R, G, B) > thr_a; the luma of yellow (226) once made it white
    px = np.array([[[255, 255, 0], [255, 255, 255], [200, 200, 200], [120, 120, 120], [128, 250, 250]]], np.uint8)
    out = np.asarray(C.preprocess("threshold", Image.fromarray(px), threshold=127))
    assert out[0, :, 0].tolist() == [0, 255, 255, 0, 255] and (out[..., 0] == out[..., 2]).all()


def test_grayscale_and_rgba_control_images_are_converted(tmp_path) -> None:
    gray = Image.fromarray(np.full((10, 12), 77, np.uint8))
    rgb = C.load_control_image(gray)
    assert rgb.mode == "RGB" and np.asarray(rgb)[0, 0].tolist() == [77, 77, 77]
    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, :6, 3] = 255  # left half opaque white, right half transparent white
    path = tmp_path / "scribble.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(C.load_control_image(path))
    assert out[0, 0].tolist() == [255] * 3 and out[0, 11].tolist() == [0] * 3  # transparent -> black
    t = PC.control_image_tensor(path, width=8, height=6)
    assert t.shape == (1, 3, 6, 8) and 0 <= t.min() and t.max() <= 1
    t2 = PC.control_image_tensor(torch.rand(1, 1, 5, 5), width=8, height=8)
    assert t2.shape == (1, 3, 8, 8)


# -------------------------------------------------------------------------------------------- bad input


def test_unreadable_control_image_is_named(tmp_path) -> None:
    bad = tmp_path / "edges.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(C.ControlNetError, match=r"cannot read the control image .*edges\.png"):
        C.preprocess("canny", bad)
    with pytest.raises(C.ControlNetError, match=r"not found: .*nope\.png"):
        C.load_control_image(tmp_path / "nope.png")


def test_unknown_control_type_lists_the_valid_ones() -> None:
    said = "unknown control type 'edgez'; did you mean 'softedge'.*valid types: canny, scribble"
    with pytest.raises(C.ControlNetError, match=said):
        G.parse_control_spec("edgez:x.png")
    with pytest.raises(C.ControlNetError, match="'depth' needs a model .* use type 'none'"):
        C.preprocess("depth", _photo())


def test_weight_outside_0_2_is_warned_and_start_end_checked() -> None:
    with pytest.warns(UserWarning, match=r"weight 2.5 is outside the usual range \[0, 2\]"):
        assert G.parse_control_spec("canny:e.png:2.5") == ("canny", "e.png", 2.5)
    with pytest.warns(UserWarning, match="weight -0.5"):
        PC.check_unit_settings(-0.5, 0.0, 1.0)
    with pytest.raises(C.ControlNetError, match=r"start \(0.6\) must be less than end \(0.6\)"):
        G.parse_control_spec_full("canny:e.png:1:0.6:0.6")
    with pytest.raises(C.ControlNetError, match="start"):
        PC.build_controlled_unet(
            UNet(TINY_SD), [(_tiny_net(), _photo(16), 1.0, 0.8, 0.2)], width=16, height=16, grid=torch.tensor([500.0])
        )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PC.check_unit_settings(2.0, 0.0, 1.0)  # the edges of the range are fine


def test_parse_control_spec_forms() -> None:
    assert G.parse_control_spec("canny:edges.png:0.8") == ("canny", "edges.png", 0.8)
    assert G.parse_control_spec("none:depth.png") == ("none", "depth.png", 1.0)
    assert G.parse_control_spec(r"scribble:C:\img\a.png:1.2") == ("scribble", r"C:\img\a.png", 1.2)
    want = ("canny", PC.ControlUnit(None, "e.png", 0.5, 0.1, 0.9))
    assert G.parse_control_spec_full("canny:e.png:0.5:0.1:0.9") == want
    with pytest.raises(C.ControlNetError, match="expected TYPE:IMAGE"):
        G.parse_control_spec("canny")
    with pytest.raises(C.ControlNetError, match="--controlnet"):
        G.control_units_from_cli(["canny:a.png"], [])


def test_control_units_from_cli(tmp_path) -> None:
    path = tmp_path / "photo.png"
    _photo().save(path)
    units = G.control_units_from_cli([f"canny:{path}:0.7"], ["cn-folder"], low=50, high=100)
    ((model, image, weight, start, end),) = units
    assert model == "cn-folder" and weight == 0.7 and (start, end) == (0.0, 1.0)
    assert set(np.unique(np.asarray(image))) == {0, 255}


def test_control_units_from_cli_reproduce_an_a1111_pixel_perfect_unit(tmp_path) -> None:
    """A PNG's unit recorded with the extension's Pixel Perfect: the control image is scaled to the resolution
    worked out from its size and the output's (here 40x24 for 64x72: 24 x max(72/24, 64/40) = 72; "Resize and
    Fill" takes the smaller factor, 24 x 1.6 = 38), not to the recorded Processor Res (once: only warned of)."""
    from sdengine.control.preprocess import processor_resize
    from sdengine.metadata import parse_parameters, recorded_controlnets

    path = tmp_path / "photo.png"
    _photo().resize((40, 24)).save(path)
    text = (
        'a\nSteps: 2, Seed: 1, Size: 64x72, ControlNet 0: "Module: canny, Model: cn, Weight: 1, Resize Mode: Crop '
        "and Resize, Processor Res: 512, Threshold A: 100, Threshold B: 200, Guidance Start: 0, Guidance End: 1, "
        'Pixel Perfect: True", Version: v1.10.1'
    )
    for mode, res in (("Crop and Resize", 72), ("Resize and Fill", 38)):
        recorded = recorded_controlnets(parse_parameters(text.replace("Crop and Resize", mode)))
        (unit,) = G.control_units_from_cli([f"canny:{path}"], ["cn"], recorded, target=(64, 72))
        assert unit.processor_res == res, mode
        want = C.canny(processor_resize(Image.open(path).convert("RGB"), res), 100, 200)
        np.testing.assert_array_equal(np.asarray(unit.image), np.asarray(want))


def test_cli_preprocessor_threshold_flags(tmp_path) -> None:
    """--control-threshold-a / -b: the preprocessor's Threshold A / B sliders (canny's low / high, threshold's
    threshold), one for all --control or one per --control, -1 the default; recorded in the unit's options."""
    path = tmp_path / "photo.png"
    _photo().save(path)
    image = Image.open(path).convert("RGB")
    from sdengine.cli import build_parser
    from sdengine.errors import UsageError

    def flags(*args: str) -> list[list[float]]:
        return G.control_thresholds(build_parser().parse_args(["generate", "p", *args]))

    both = ("--control", "canny:x.png", "--control", "threshold:x.png")
    got = flags(*both, "--control-threshold-a", "30", "--control-threshold-a", "90", "--control-threshold-b", "120")
    assert got == [[30.0, 90.0], [120.0]]
    with pytest.raises(UsageError, match="3 --control-threshold-a for 2 --control"):
        flags(*both, *("--control-threshold-a", "1") * 3)
    with pytest.raises(UsageError, match="give --control TYPE:IMAGE"):
        flags("--control-threshold-b", "5")
    with pytest.raises(UsageError, match="finite number"):
        flags(*both, "--control-threshold-a", "nan")
    units = G.control_units_from_cli(
        [f"canny:{path}", f"threshold:{path}"], ["cn", "cn"], thresholds=[[30.0, 90.0], [120.0, -1.0]]
    )
    assert units[0].module_options == {"low": 30.0, "high": 120.0}
    np.testing.assert_array_equal(np.asarray(units[0].image), np.asarray(C.canny(image, 30, 120)))
    assert units[1].module_options == {"threshold": 90.0}
    np.testing.assert_array_equal(np.asarray(units[1].image), np.asarray(C.threshold(image, 90)))
    with pytest.raises(UsageError, match="preprocessor 'threshold' has no threshold B"):
        G.control_units_from_cli([f"threshold:{path}"], ["cn"], thresholds=[[], [50.0]])


def test_shipped_controlnet_reads_by_name(tmp_path, monkeypatch):
    from sdengine.catalog import ASSETS
    from sdengine.control.files import read_controlnet

    monkeypatch.chdir(tmp_path)  # not from the repository root
    loaded = read_controlnet("emoji-controlnet-canny")
    assert loaded.source == ASSETS / "models" / "emoji-controlnet-canny"
    assert loaded.layout == "diffusers" and loaded.state_dict
    with pytest.raises(Exception, match="ControlNet not found"):
        read_controlnet("emoji-controlnet-nothing")
