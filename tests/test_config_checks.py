"""Crafted model and scheduler configs are refused before anything is built: one ConfigError line naming
the field, in bounded time, through every entry point (config classes, diffusers/transformers dicts, the
scheduler, the checkpoint loaders)."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch

from sdengine.diffusion.schedules import NoiseSchedule
from sdengine.errors import SdengineError
from sdengine.models import unet as unet_mod
from sdengine.models import vae as vae_mod
from sdengine.models.bert_text import BertConfig
from sdengine.models.clip_text import CLIPTextConfig
from sdengine.models.config_checks import ConfigError, check_config, estimate_parameters
from sdengine.models.controlnet import ControlNetConfig
from sdengine.weights import WeightsError
from sdengine.weights import loading as ld

UNET = unet_mod.TINY_SD.to_diffusers()
PIXEL = unet_mod.TINY_PIXEL.to_diffusers()
VAE = vae_mod.TINY.to_diffusers()
CLIP = CLIPTextConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4
).to_transformers()
BERT = {
    "vocab_size": 100,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}
CONTROLNET = ControlNetConfig.from_unet(unet_mod.TINY_SD).to_diffusers()

BAD_UNET = [
    ("layers_per_block", 1_000_000, "layers_per_block.*range"),
    ("layers_per_block", 2.0, "layers_per_block.*integer"),
    ("layers_per_block", True, "layers_per_block.*integer"),
    ("layers_per_block", -1, "layers_per_block.*range"),
    ("block_out_channels", [1e9, 2e9], "block_out_channels.*integer"),
    ("block_out_channels", [1_000_000_000, 2_000_000_000], "block_out_channels.*range"),
    ("block_out_channels", 64, "block_out_channels"),
    ("block_out_channels", [32] * 100, "block_out_channels.*entries"),
    ("norm_num_groups", 0, "norm_num_groups.*range"),
    ("norm_num_groups", "8", "norm_num_groups.*integer"),
    ("attention_head_dim", 0, "attention_head_dim.*range"),
    ("cross_attention_dim", -32, "cross_attention_dim.*range"),
    ("in_channels", 10**6, "in_channels.*range"),
    ("norm_eps", float("nan"), "norm_eps.*range"),
    ("norm_eps", "1e-5", "norm_eps.*number"),
    ("sample_size", 10**9, "sample_size.*range"),
    ("transformer_layers_per_block", 10**6, "transformer_layers_per_block.*range"),
]


def _timed_refusal(fn, match):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=match) as e:
        fn()
    assert time.perf_counter() - t0 < 2.0
    assert "\n" not in str(e.value)
    return e.value


@pytest.mark.parametrize("key,value,match", BAD_UNET, ids=[f"{k}={v!r}"[:40] for k, v, _ in BAD_UNET])
def test_unet_config_numbers_are_bounded(key, value, match):
    _timed_refusal(lambda: unet_mod.UNetConfig.from_diffusers({**UNET, key: value}), "U-Net config: " + match)


@pytest.mark.parametrize("key,value", [("norm_num_groups", 0), ("attention_head_dim", 0), ("layers_per_block", 10**6)])
def test_pixel_unet_config_numbers_are_bounded(key, value):
    _timed_refusal(lambda: unet_mod.UNetConfig.from_diffusers({**PIXEL, key: value}), key)


@pytest.mark.parametrize(
    "field,value",
    [
        ("layers_per_block", 10**6),
        ("norm_num_groups", 0),
        ("block_out_channels", (10**9, 2 * 10**9)),
        ("num_heads", (0, 2)),
    ],
)
def test_unet_config_dataclass_is_bounded(field, value):
    _timed_refusal(lambda: dataclasses.replace(unet_mod.TINY_SD, **{field: value}), field)


def test_allowed_numbers_that_add_up_to_a_giant_are_refused():
    cfg = {
        **UNET,
        "block_out_channels": [4096] * 4,
        "layers_per_block": 32,
        "norm_num_groups": 32,
        "attention_head_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D"] * 4,
        "up_block_types": ["CrossAttnUpBlock2D"] * 4,
    }
    _timed_refusal(lambda: unet_mod.UNetConfig.from_diffusers(cfg), "at least .* parameters")


@pytest.mark.parametrize(
    "key,value",
    [
        ("layers_per_block", 10**6),
        ("block_out_channels", [10**9, 2 * 10**9]),
        ("norm_num_groups", 0),
        ("latent_channels", 0),
        ("scaling_factor", float("inf")),
        ("sample_size", "512"),
    ],
)
def test_vae_config_numbers_are_bounded(key, value):
    _timed_refusal(lambda: vae_mod.VAEConfig.from_diffusers({**VAE, key: value}), "VAE config: " + key)
    _timed_refusal(lambda: dataclasses.replace(vae_mod.TINY, **{key: value}), key)


@pytest.mark.parametrize(
    "key,value",
    [
        ("conditioning_embedding_out_channels", [10**9]),
        ("conditioning_channels", 0),
        ("layers_per_block", 10**6),
        ("norm_num_groups", 0),
    ],
)
def test_controlnet_config_numbers_are_bounded(key, value):
    _timed_refusal(lambda: ControlNetConfig.from_diffusers({**CONTROLNET, key: value}), key)


@pytest.mark.parametrize(
    "key,value",
    [
        ("num_hidden_layers", 10**6),
        ("hidden_size", 0),
        ("vocab_size", 10**12),
        ("max_position_embeddings", 10**9),
        ("num_attention_heads", 0),
        ("intermediate_size", 1.5),
        ("layer_norm_eps", -1.0),
    ],
)
def test_text_config_numbers_are_bounded(key, value):
    _timed_refusal(lambda: CLIPTextConfig.from_transformers({**CLIP, key: value}), "CLIP text config: " + key)
    _timed_refusal(lambda: BertConfig.from_transformers({**BERT, key: value}), "BERT text config: " + key)


def test_text_configs_of_giant_size_are_refused():
    giant = {**CLIP, "vocab_size": 1_000_000, "hidden_size": 16384}
    _timed_refusal(lambda: CLIPTextConfig.from_transformers(giant), "parameters")


@pytest.mark.parametrize(
    "config,match",
    [
        ({"num_train_timesteps": 10**8}, "num_train_timesteps.*range"),
        ({"num_train_timesteps": 1e3}, "num_train_timesteps.*integer"),
        ({"num_train_timesteps": 0}, "num_train_timesteps.*range"),
        ({"beta_start": float("nan")}, "beta_start"),
        ({"beta_end": 2.0}, "beta_end"),
        ({"trained_betas": [0.5] * 200_000}, "trained_betas"),
        ({"trained_betas": [0.1, "x"]}, "trained_betas"),
        ({"trained_betas": [0.1, 1.5]}, "trained_betas"),
    ],
)
def test_scheduler_config_numbers_are_bounded(config, match):
    _timed_refusal(lambda: NoiseSchedule.from_config(**config), "scheduler config: " + match)


def test_shipped_and_preset_configs_pass():
    for cfg in unet_mod.PRESETS.values():
        check_config("unet", cfg)
        assert 0 < estimate_parameters("unet", cfg.to_diffusers()) <= 2_000_000_000
    for cfg in vae_mod.PRESETS.values():
        check_config("vae", cfg)
    sd15 = estimate_parameters("unet", unet_mod.SD15.to_diffusers())
    assert 0.4e9 < sd15 < 0.87e9  # a lower estimate of SD 1.5's 860 M parameters
    NoiseSchedule.from_config(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )


def test_config_errors_are_sdengine_value_errors():
    assert issubclass(ConfigError, SdengineError) and issubclass(ConfigError, ValueError)
    with pytest.raises(ConfigError, match="mapping"):
        check_config("unet", [1, 2])


# ------------------------------------------------------------------------------------------- loaders


def _folder(tmp_path, unet_cfg, *, minilm_ctx=None, scheduler=None):
    root = tmp_path / "model"
    for comp, cfg in (("unet", unet_cfg), ("vae", VAE)):
        (root / comp).mkdir(parents=True)
        (root / comp / "config.json").write_text(json.dumps(cfg))
        (root / comp / "diffusion_pytorch_model.safetensors").write_bytes(b"never read")
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}
    if minilm_ctx is not None:
        index["text_encoder"] = list(ld.MINILM_TEXT_ENCODER)
        (root / "text_encoder").mkdir()
        (root / "text_encoder" / "config.json").write_text(
            json.dumps({"model_type": "bert", "context_length": minilm_ctx})
        )
    if scheduler is not None:
        (root / "scheduler").mkdir()
        (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


@pytest.mark.parametrize(
    "key,value", [("layers_per_block", 1_000_000), ("block_out_channels", [10**9, 2 * 10**9]), ("norm_num_groups", 0)]
)
def test_loader_refuses_a_crafted_unet_config_before_reading_weights(tmp_path, key, value):
    root = _folder(tmp_path, {**UNET, key: value}, minilm_ctx=8)
    with pytest.raises(WeightsError, match=rf"unet.config\.json.*{key}") as e:
        ld.load_checkpoint(root)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("ctx", [10**9, 1])
def test_loader_refuses_an_absurd_minilm_context_length(tmp_path, ctx):
    root = _folder(tmp_path, UNET, minilm_ctx=ctx)
    with pytest.raises(WeightsError, match="context_length"):
        ld.load_checkpoint(root)


def test_loader_refuses_a_crafted_scheduler_config(tmp_path):
    root = _folder(tmp_path, UNET, minilm_ctx=8, scheduler={"num_train_timesteps": 100_000_000})
    with pytest.raises(WeightsError, match=r"scheduler_config\.json.*num_train_timesteps"):
        ld.load_checkpoint(root)


def test_single_file_with_crafted_config_metadata_is_refused_before_mapping(tmp_path):
    from sdengine.weights.io import save_safetensors

    p = tmp_path / "m.safetensors"
    cfgs = {"unet": {**UNET, "layers_per_block": 1_000_000}, "scheduler": {}}
    save_safetensors(
        {"model.diffusion_model.out.2.weight": torch.ones(1)}, p, metadata={ld.CONFIG_METADATA_KEY: json.dumps(cfgs)}
    )
    t0 = time.perf_counter()
    with pytest.raises(WeightsError, match=r"m\.safetensors.*layers_per_block"):
        ld.load_single_file(p)
    assert time.perf_counter() - t0 < 2.0
