"""Qwen-Image's VAE: the same numbers as diffusers' ``AutoencoderKLQwenImage`` on tiny random weights (encode's
posterior mean and log-variance, decode; float32 and bfloat16; batch 2, non-square), the pipeline's view of it
through ``sdengine.vae_utils`` (seeded posterior samples and the latents_mean / latents_std scaling against
diffusers' Qwen-Image pipelines' formulas), its files (a diffusers ``vae/`` folder written by diffusers, sharded,
saved back for diffusers; the original Wan / ComfyUI names, cross-checked with diffusers' own converter), and
one-line errors for bad inputs, configs and files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sdengine import vae_utils
from sdengine.models.config_checks import ConfigError
from sdengine.models.qwen_vae import QwenImageVAE, QwenVAEConfig, QwenVAEError
from sdengine.weights.io import WeightsError, save_safetensors
from sdengine.weights.qwen_vae_file import (
    config_from_shapes,
    diffusers_to_original,
    is_original_layout,
    load_qwen_vae,
    original_to_diffusers,
    qwen_vae_from_state,
    save_qwen_vae,
)

diffusers = pytest.importorskip("diffusers")

# Two levels of downsampling, one spatial-only and one temporal (so both resampling kinds are built), one
# residual block per level, 4 latent channels with their own statistics.
TINY = {
    "base_dim": 8,
    "z_dim": 4,
    "dim_mult": [1, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True],
    "latents_mean": [0.1, -0.2, 0.3, 0.0],
    "latents_std": [1.5, 0.5, 2.0, 1.0],
}
# The released layout's depth (4 levels, 2 residual blocks, 16 latent channels) at a tiny width: what diffusers'
# single-file converter for the original names is written for.
FULL_DEPTH = {"base_dim": 4, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2}
TOL = 1e-5


def _reference(seed: int = 0, **config):
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLQwenImage(**(config or TINY)).eval()
    with torch.no_grad():  # diffusers initialises the norms' gammas to one: make every weight count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _ours(ref, dtype=torch.float32) -> QwenImageVAE:
    model = QwenImageVAE(QwenVAEConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    return model.to(dtype)


@pytest.fixture(scope="module")
def ref():
    return _reference()


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, 32, 48) * 2 - 1


# ----------------------------------------------------------------------------------------------------------
# Parity with diffusers


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, TOL), (torch.bfloat16, 0.02)])
def test_encode_and_decode_match_diffusers(ref, images, dtype, tol):
    r = _reference().to(dtype) if dtype != torch.float32 else ref
    ours = _ours(ref, dtype)
    x = images.to(dtype)
    with torch.no_grad():
        want = r.encode(x[:, :, None]).latent_dist  # diffusers takes (B, C, frames, H, W)
        got = ours.encode(x)
        assert got.mean.shape == (2, 4, 8, 12)
        assert (got.mean.float() - want.mean[:, :, 0].float()).abs().max() <= tol
        assert (got.logvar.float() - want.logvar[:, :, 0].float()).abs().max() <= tol
        z = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2)).to(dtype)
        want_img = r.decode(z[:, :, None]).sample[:, :, 0]
        got_img = ours.decode(z)
    assert got_img.shape == (2, 3, 32, 48)
    assert float(want_img.float().abs().max()) > 0.5  # not a trivially small output
    assert (got_img.float() - want_img.float()).abs().max() <= tol
    assert float(got_img.abs().max()) <= 1.0  # clamped as diffusers' decode


def test_seeded_encode_and_decode_through_vae_utils_match_diffusers_pipelines(ref, images):
    """What the pipeline calls: ``vae_utils.encode`` with one generator per row (diffusers' img2img
    ``retrieve_latents(vae.encode(image[i:i+1]), generator[i])`` then ``(z - mean) * (1 / std)``) and
    ``vae_utils.decode`` (``QwenImagePipeline``: ``z / (1 / std) + mean``, decode, frame 0)."""
    ours = _ours(ref)
    cfg = ref.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1)
    with torch.no_grad():
        gens = [torch.Generator().manual_seed(s) for s in (7, 8)]
        want = torch.cat(
            [ref.encode(images[i : i + 1, :, None]).latent_dist.sample(generator=gens[i]) for i in range(2)]
        )
        want = ((want - mean) * inv_std)[:, :, 0]
        got = vae_utils.encode(ours, images, [torch.Generator().manual_seed(s) for s in (7, 8)], tiled=False)
        assert (got - want).abs().max() <= TOL
        assert float((got - ours.scale_latents(ours.encode(images).mean)).abs().max()) > 0.01  # a real sample

        latents = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(3))
        want_img = ref.decode(latents[:, :, None] / inv_std + mean).sample[:, :, 0]
        got_img, upcast = vae_utils.decode(ours, latents, tiled=False)
    assert not upcast
    assert (got_img - want_img).abs().max() <= TOL
    assert torch.allclose(ours.unscale_latents(ours.scale_latents(latents)), latents, atol=1e-6)


def test_pipeline_facing_config_names():
    cfg = QwenVAEConfig()  # the released VAE's
    assert (cfg.latent_channels, cfg.downscale_factor, cfg.scaling_factor, cfg.shift_factor) == (16, 8, 1.0, None)
    assert (cfg.in_channels, cfg.out_channels, cfg.sample_size) == (3, 3, 1024)
    assert cfg.block_out_channels == (96, 192, 384, 384)
    assert QwenVAEConfig.from_diffusers(cfg.to_diffusers()) == cfg
    ref = diffusers.AutoencoderKLQwenImage()  # diffusers' defaults are the released config too
    assert QwenVAEConfig.from_diffusers(dict(ref.config)) == cfg


# ----------------------------------------------------------------------------------------------------------
# Files


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


def test_diffusers_folder_loads_and_saves_back(ref, tmp_path):
    ref.save_pretrained(tmp_path / "pipe" / "vae")  # a pipeline folder's vae/, written by diffusers
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "QwenImagePipeline"}')
    model = load_qwen_vae(tmp_path / "pipe")
    assert model.name == "pipe" and next(model.parameters()).dtype == torch.float32
    assert model.config == QwenVAEConfig.from_diffusers(dict(ref.config))
    _same_weights(model, ref)
    half = load_qwen_vae(tmp_path / "pipe" / "vae", dtype="bf16")
    assert next(half.parameters()).dtype == torch.bfloat16

    ref.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    _same_weights(load_qwen_vae(tmp_path / "sharded"), ref)

    out = save_qwen_vae(model, tmp_path / "saved")
    back = diffusers.AutoencoderKLQwenImage.from_pretrained(out).eval()
    _same_weights(back, ref)
    assert list(back.config.latents_std) == TINY["latents_std"]


def test_original_layout_single_file_matches_diffusers_converter(tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    ref = _reference(**FULL_DEPTH)
    sd = ref.state_dict()
    original = diffusers_to_original(sd)
    assert is_original_layout(original) and not is_original_layout(sd)
    assert "decoder.upsamples.4.shortcut.weight" in original and "encoder.head.2.weight" in original
    assert convert_wan_vae_to_diffusers(dict(original)).keys() == sd.keys()  # diffusers reads our names back
    assert original_to_diffusers(original).keys() == sd.keys()
    cfg = config_from_shapes(sd)
    assert cfg == QwenVAEConfig.from_diffusers(dict(ref.config))  # Qwen-Image's statistics, the shapes' widths

    save_safetensors(original, tmp_path / "qwen_image_vae.safetensors")
    save_safetensors(sd, tmp_path / "diffusers_names.safetensors")
    for name in ("qwen_image_vae.safetensors", "diffusers_names.safetensors"):
        model = load_qwen_vae(tmp_path / name)
        _same_weights(model, ref)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        want = ref.encode(x[:, :, None]).latent_dist.mean[:, :, 0]
        assert (model.encode(x).mean - want).abs().max() <= TOL


# ----------------------------------------------------------------------------------------------------------
# Refusals


def test_bad_inputs_are_one_line_errors(ref):
    ours = _ours(ref)
    cases = [
        (lambda: ours.encode(torch.zeros(1, 3, 2, 32, 32)), "single images only"),
        (lambda: ours.encode(torch.zeros(1, 4, 32, 32)), "3 channels, got 4"),
        (lambda: ours.encode(torch.zeros(1, 3, 30, 32)), "multiples of 4, got 30x32"),
        (lambda: ours.decode(torch.zeros(1, 16, 8, 8)), "4 channels, got 16"),
        (lambda: ours.decode(torch.zeros(4, 8, 8)), "single images only"),
    ]
    for call, message in cases:
        with pytest.raises(QwenVAEError, match=message) as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"_class_name": "AutoencoderKLWan"}, "not a Qwen-Image VAE config"),
        ({"is_residual": True}, "not supported by sdengine: is_residual"),
        ({"attn_scales": [0.5]}, "attn_scales=.* is not supported"),
        ({"temperal_downsample": [False, True, True]}, "3 entries, expected one per downsampling"),
        ({"latents_std": [1.0, 1.0, 0.0, 1.0]}, "latents_std must be 4 finite numbers above 0"),
        ({"latents_mean": [0.0, 0.0]}, "latents_mean must be 4 finite numbers"),
        ({"base_dim": 100000}, "out of range"),
        ({"dim_mult": [1, 2, 1000]}, "dim_mult"),
        ({"num_res_blocks": 1.5}, "num_res_blocks=1.5 is not an integer"),
        ({"dim_mult": 4}, "dim_mult=4 is not a list"),
    ],
)
def test_bad_configs_are_refused_by_name(change, message):
    with pytest.raises(ConfigError, match=message) as e:
        QwenVAEConfig.from_diffusers({**TINY, **change})
    assert "\n" not in str(e.value)


def test_bad_files_are_refused(ref, tmp_path):
    sd = ref.state_dict()
    cfg = QwenVAEConfig.from_diffusers(dict(ref.config))
    with pytest.raises(WeightsError, match="missing keys: decoder.conv_out.bias"):
        qwen_vae_from_state({k: v for k, v in sd.items() if k != "decoder.conv_out.bias"}, config=cfg)
    with pytest.raises(WeightsError, match="unexpected keys: extra.weight"):
        qwen_vae_from_state({**sd, "extra.weight": torch.zeros(1)}, config=cfg)
    with pytest.raises(WeightsError, match="wrong tensor shapes: decoder.conv_out.bias"):
        qwen_vae_from_state({**sd, "decoder.conv_out.bias": torch.zeros(5)}, config=cfg)
    with pytest.raises(WeightsError, match="quant_conv.bias holds torch.int64"):
        qwen_vae_from_state({**sd, "quant_conv.bias": torch.zeros(8, dtype=torch.int64)}, config=cfg)
    with pytest.raises(WeightsError, match="4 latent channels; a single file has no latents_mean"):
        qwen_vae_from_state(sd)  # no config and not Qwen-Image's 16 channels
    with pytest.raises(WeightsError, match="unknown Qwen-Image VAE tensor 'encoder.downsamples.0.odd.weight'"):
        original_to_diffusers({**diffusers_to_original(sd), "encoder.downsamples.0.odd.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="not a Qwen-Image VAE .no encoder.conv_in.weight"):
        config_from_shapes({})
    with pytest.raises(WeightsError, match="float16 or bfloat16, not"):
        qwen_vae_from_state(sd, config=cfg, dtype=torch.float8_e4m3fn)

    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match="no vae/config.json or config.json"):
        load_qwen_vae(tmp_path / "empty")
    with pytest.raises(WeightsError, match="no such Qwen-Image VAE file or folder"):
        load_qwen_vae(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad" / "vae"
    bad.mkdir(parents=True)
    (bad / "config.json").write_text("{not json")
    with pytest.raises(WeightsError, match="cannot read the config"):
        load_qwen_vae(tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps({**TINY, "_class_name": "AutoencoderKL"}))
    with pytest.raises(WeightsError, match="config.json: not a Qwen-Image VAE config"):
        load_qwen_vae(tmp_path / "bad")
    (bad / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(WeightsError, match="no weights found"):
        load_qwen_vae(tmp_path / "bad")
    text = Path(tmp_path / "vae.txt")
    text.write_text("x")
    with pytest.raises(WeightsError, match="expected a .safetensors file"):
        load_qwen_vae(text)


def test_latent_preview_map_is_wan21s():
    """ComfyUI's Wan21 latent format's factors and bias (spot checks), one row per latent channel, applied to the
    standardised latents as ``rgb = latent @ factors + bias``."""
    m = vae_utils.QWEN_IMAGE_LATENT_RGB
    assert m.channels == QwenVAEConfig().latent_channels == 16
    assert m.factors[0] == (-0.1299, -0.1692, 0.2932) and m.factors[6] == (-0.3477, -0.4059, -0.2925)
    assert m.factors[15] == (0.1984, 0.0913, 0.1861) and m.bias == (-0.1835, -0.0868, -0.3360)
    assert vae_utils.LATENT_RGB_MAPS["qwen_image"] is m
    z = torch.randn(1, 16, 3, 5, generator=torch.Generator().manual_seed(4))
    rgb = torch.einsum("bchw,cr->bhwr", z, torch.tensor(m.factors)) + torch.tensor(m.bias)
    want = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
    assert torch.equal(vae_utils.latent_rgb(z, m), want)
