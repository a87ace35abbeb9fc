"""A single file with its config: the LDM `.yaml` beside it (A1111's rule) or `config=DIR` (a diffusers folder's
configs, as diffusers' `from_single_file(config=...)`). Shapes cannot give attention heads or the prediction
type; with the config, plain LDM files (no sdengine metadata) of non-standard widths give the images of
diffusers on the same weights. Contradictions are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler  # noqa: E402
from sdengine.weights import convert, load_checkpoint, load_file, save_safetensors  # noqa: E402
from sdengine.weights.ldm_config import ModelConfigError  # noqa: E402
from sdengine.weights.loading import write_clip_tokenizer  # noqa: E402

SIZE, STEPS, SEED = 32, 4, 5
PROMPT, NEGATIVE = "a red apple on a table", "blurry"
TOL = 1e-5  # mean abs on 0..1 pixels


def _perturb(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _mad(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).mean())


def _ours(pipe):
    return pipe(
        PROMPT,
        NEGATIVE,
        steps=STEPS,
        sampler="euler",
        schedule="normal",
        cfg_scale=7.0,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    ).arrays


def _theirs(pipe, folder):
    pipe.scheduler = diffusers_scheduler(folder, "euler")
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(SEED)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        num_inference_steps=STEPS,
        guidance_scale=7.0,
        generator=gen,
        width=SIZE,
        height=SIZE,
        output_type="np",
    ).images


def plain_single_file(folder: Path, dst: Path, *, extra_openclip_block: bool = False) -> Path:
    """The folder as an LDM single file the way other tools write it: no sdengine config metadata. SD2 files
    carry one more OpenCLIP block than SD2 reads (it takes the penultimate layer's output)."""
    tmp = convert(folder, dst.with_name(dst.stem + "-meta.safetensors"))
    sd, _ = load_file(tmp)
    sd = dict(sd)
    if extra_openclip_block:
        prefix = "cond_stage_model.model.transformer.resblocks."
        last = max(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix))
        for k in [k for k in sd if k.startswith(f"{prefix}{last}.")]:
            sd[k.replace(f"{prefix}{last}.", f"{prefix}{last + 1}.")] = sd[k].clone() * 0.5
    save_safetensors(sd, dst)
    tmp.unlink()
    return dst


# ------------------------------------------------------------------------------- config=DIR (diffusers configs)


@pytest.fixture(scope="module")
def sd1_file(tiny_sd1_folder, tmp_path_factory):
    return plain_single_file(tiny_sd1_folder, tmp_path_factory.mktemp("cfg1") / "tiny-sd1.safetensors")


def test_four_text_encoder_heads_need_the_config(tiny_sd1_folder, sd1_file):
    """The tiny SD1 text encoder has 4 heads of width 8: shapes say 1 (64-wide heads); config=DIR says 4."""
    assert json.loads((tiny_sd1_folder / "text_encoder" / "config.json").read_text())["num_attention_heads"] == 4
    assert load_checkpoint(sd1_file).configs["text_encoder"]["num_attention_heads"] == 1
    ck = load_checkpoint(sd1_file, config=tiny_sd1_folder)
    assert ck.configs["text_encoder"]["num_attention_heads"] == 4
    assert ck.configs["unet"]["norm_num_groups"] == 8 and ck.tokenizer_dir == tiny_sd1_folder / "tokenizer"


def test_sd1_single_file_with_config_dir_matches_diffusers(tiny_sd1_folder, sd1_file):
    from diffusers import StableDiffusionPipeline

    ours = _ours(sdengine.load_pipeline(sd1_file, device="cpu", config=tiny_sd1_folder))
    ref = StableDiffusionPipeline.from_single_file(
        str(sd1_file), config=str(tiny_sd1_folder), local_files_only=True, safety_checker=None
    )
    theirs = _theirs(ref, tiny_sd1_folder)
    truth = _theirs(diffusers_pipeline(tiny_sd1_folder), tiny_sd1_folder)
    assert _mad(theirs, truth) < 1e-6
    err = _mad(ours, theirs)
    print(f"SD1 single file + config=DIR: mean abs difference to diffusers {err:.2e}")
    assert ours.std() > 0.05 and err <= TOL


def test_sd2_v_single_file_with_config_dir_matches_diffusers(tiny_sd2_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    single = plain_single_file(tiny_sd2_folder, tmp_path / "tiny-sd2.safetensors")
    pipe = sdengine.load_pipeline(single, device="cpu", config=tiny_sd2_folder)
    assert pipe.prediction_type == "v_prediction"
    ours = _ours(pipe)
    ref = StableDiffusionPipeline.from_single_file(
        str(single), config=str(tiny_sd2_folder), local_files_only=True, safety_checker=None
    )
    assert ref.scheduler.config.prediction_type == "v_prediction"
    theirs = _theirs(ref, tiny_sd2_folder)
    err = _mad(ours, theirs)
    print(f"SD2 (v) single file + config=DIR: mean abs difference to diffusers {err:.2e}")
    assert ours.std() > 0.05 and err <= TOL


def test_config_dir_of_another_model_is_refused(sd1_file, tiny_sd2_folder, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for comp in ("unet", "vae", "text_encoder"):
        (other / comp).mkdir()
        cfg = json.loads((tiny_sd2_folder / comp / "config.json").read_text())
        if comp == "unet":
            cfg["cross_attention_dim"] = 48
        (other / comp / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelConfigError, match=r"unet cross_attention_dim is 48 in the config but 32 in the weights"):
        load_checkpoint(sd1_file, config=other)
    with pytest.raises(ModelConfigError, match="expected a diffusers model folder or an LDM .yaml"):
        load_checkpoint(sd1_file, config=tmp_path / "missing")
    with pytest.raises(sdengine.pipeline.GenerationError, match="config= is for single files"):
        sdengine.load_pipeline(tiny_sd2_folder, device="cpu", config=other)


# ------------------------------------------------------------------------------------------- the LDM .yaml


def _ldm_shaped_folder(dst: Path, kind: str) -> Path:
    """A small model as LDM files have them (32-group norms, 64-wide text heads) whose U-Net heads are not
    the family default: SD1-style 2 heads per layer, or SD2-style 16-channel heads with v-prediction."""
    from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from _pipeline_models import SD1_SCHEDULER, SD2_SCHEDULER

    torch.manual_seed(0)
    sd2 = kind == "sd2"
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=[2, 4] if sd2 else 2,
        use_linear_projection=sd2,
        upcast_attention=sd2,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=32,
    )
    te = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=1,
            hidden_act="gelu" if sd2 else "quick_gelu",
            projection_dim=64,
        )
    ).eval()
    write_clip_tokenizer(dst / "tokenizer", pad="!" if sd2 else None)
    if sd2:
        scheduler = DDIMScheduler(**SD2_SCHEDULER)
    else:
        scheduler = PNDMScheduler(**{k: v for k, v in SD1_SCHEDULER.items() if k != "clip_sample"})
    StableDiffusionPipeline(
        unet=_perturb(unet, 1),
        vae=_perturb(vae, 2),
        text_encoder=_perturb(te, 3),
        tokenizer=CLIPTokenizer.from_pretrained(dst / "tokenizer"),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(dst)
    return dst


def ldm_yaml(kind: str, *, v: bool | None = None, vae_mult: tuple[int, ...] = (1, 1), **unet_over) -> str:
    sd2 = kind == "sd2"
    v = sd2 if v is None else v
    unet = {
        "image_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [1],
        "num_res_blocks": 1,
        "channel_mult": [1, 2],
        "use_spatial_transformer": True,
        "transformer_depth": 1,
        "context_dim": 64,
        "legacy": False,
        **({"num_head_channels": 16, "use_linear_in_transformer": True} if sd2 else {"num_heads": 2}),
        **unet_over,
    }
    cond = (
        {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": "penultimate"},
        }
        if sd2
        else {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    )
    doc = {
        "model": {
            "base_learning_rate": 1e-4,
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                **({"parameterization": "v"} if v else {}),
                "linear_start": 0.00085,
                "linear_end": 0.012,
                "timesteps": 1000,
                "scale_factor": 0.18215,
                "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.AutoencoderKL",
                    "params": {
                        "embed_dim": 4,
                        "ddconfig": {
                            "double_z": True,
                            "z_channels": 4,
                            "resolution": 32,
                            "in_channels": 3,
                            "out_ch": 3,
                            "ch": 32,
                            "ch_mult": list(vae_mult),
                            "num_res_blocks": 1,
                        },
                    },
                },
                "cond_stage_config": cond,
            },
        }
    }
    import yaml

    return yaml.safe_dump(doc)


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def yaml_model(request, tmp_path_factory):
    kind = request.param
    tmp = tmp_path_factory.mktemp(f"yaml-{kind}")
    folder = _ldm_shaped_folder(tmp / "folder", kind)
    single = plain_single_file(folder, tmp / "model.safetensors", extra_openclip_block=kind == "sd2")
    truth = _theirs(diffusers_pipeline(folder, kind), folder)
    return kind, folder, single, truth


def test_yaml_beside_the_file_gives_the_heads_and_prediction_type(yaml_model):
    kind, folder, single, truth = yaml_model
    beside = single.with_suffix(".yaml")
    beside.unlink(missing_ok=True)
    without = _ours(sdengine.load_pipeline(single, device="cpu"))
    beside.write_text(ldm_yaml(kind))
    try:
        pipe = sdengine.load_pipeline(single, device="cpu")  # the .yaml of the same stem is found
        ck = load_checkpoint(single)
    finally:
        beside.unlink()
    want_heads = [2, 4] if kind == "sd2" else 2
    assert ck.configs["unet"]["attention_head_dim"] == want_heads
    assert pipe.prediction_type == ("v_prediction" if kind == "sd2" else "epsilon")
    ours = _ours(pipe)
    err, err_without = _mad(ours, truth), _mad(without, truth)
    print(f"{kind} + LDM yaml: mean abs difference to diffusers {err:.2e} (without the yaml {err_without:.2e})")
    assert ours.std() > 0.05 and err <= TOL
    assert err_without > 1e-4  # the yaml is what made it right


def test_yaml_given_as_config(yaml_model, tmp_path):
    kind, _, single, truth = yaml_model
    cfg = tmp_path / "any-name.yaml"
    cfg.write_text(ldm_yaml(kind))
    assert _mad(_ours(sdengine.load_pipeline(single, device="cpu", config=cfg)), truth) <= TOL


def test_yaml_that_contradicts_the_weights_is_refused(yaml_model, tmp_path):
    kind, _, single, _ = yaml_model
    cfg = tmp_path / "wrong.yaml"
    cfg.write_text(ldm_yaml(kind, context_dim=768))
    with pytest.raises(ModelConfigError, match=r"unet cross_attention_dim is 768 in the config but 64 in the weights"):
        load_checkpoint(single, config=cfg)
    cfg.write_text(ldm_yaml(kind, channel_mult=[1, 4]))
    with pytest.raises(ModelConfigError, match=r"block_out_channels is \[32, 128\] in the config but \[32, 64\]"):
        load_checkpoint(single, config=cfg)
    cfg.write_text(ldm_yaml(kind, num_heads=3, num_head_channels=-1))
    with pytest.raises(ModelConfigError, match="num_heads 3 does not divide"):
        load_checkpoint(single, config=cfg)
    other = "sd1" if kind == "sd2" else "sd2"
    cfg.write_text(ldm_yaml(other))
    with pytest.raises(ModelConfigError, match="text encoder but the weights hold"):
        load_checkpoint(single, config=cfg)


@pytest.mark.parametrize(
    "text, match",
    [
        ("model: [1, 2", "cannot read the LDM config"),
        ("!!python/object/apply:os.system ['true']", "cannot read the LDM config"),
        ("model:\n  target: x\n", "not an LDM config"),
        ("just a string", "not an LDM config"),
        ("", "not an LDM config"),
        ("model:\n  params:\n    unet_config:\n      params:\n        num_heads: -1\n", "neither num_heads"),
        ("model:\n  params:\n    unet_config:\n      params:\n        num_heads: 1.5\n", "must be an integer"),
        ("model:\n  params:\n    unet_config:\n      params: [1]\n", "is not a mapping"),
        ("model:\n  params:\n    parameterization: z\n", "parameterization 'z'"),
    ],
)
def test_bad_yaml_is_one_line(sd1_file, tmp_path, text, match):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ModelConfigError, match=match) as e:
        load_checkpoint(sd1_file, config=cfg)
    assert "\n" not in str(e.value)


def test_sd2_yaml_decides_base_or_768(tmp_path):
    """SD 2.x files do not say epsilon or v: without a config a 768 v-model is assumed (with a note); the
    v2-inference.yaml of a 512 "base" model makes it epsilon at 512 px, its unused image_size (32) ignored."""
    from sdengine.weights.loading import LoadedCheckpoint, components_to_ldm
    from test_weights_common import randomize, tiny_clip, tiny_unet, tiny_vae

    unet = randomize(
        tiny_unet(
            "sd2",
            block_out_channels=(64, 128, 128),
            cross_attention_dim=1024,
            attention_head_dim=(1, 2, 2),
            norm_num_groups=32,
        ),
        1,
    )
    te = randomize(
        tiny_clip("sd2", hidden_size=1024, num_attention_heads=16, intermediate_size=64, num_hidden_layers=2), 3
    )
    vae = randomize(tiny_vae(block_out_channels=(32, 64), norm_num_groups=32), 2)
    ck = LoadedCheckpoint(
        source=tmp_path,
        layout="diffusers",
        state_dicts={"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": te.state_dict()},
        configs={
            "unet": dict(unet.config),
            "vae": dict(vae.config),
            "text_encoder": te.config.to_dict(),
            "scheduler": {},
        },
        prediction_type="epsilon",
    )
    single = tmp_path / "sd2-base.safetensors"
    save_safetensors(components_to_ldm(ck), single)
    guessed = load_checkpoint(single)
    assert guessed.prediction_type == "v_prediction" and guessed.configs["unet"]["sample_size"] == 96
    doc = ldm_yaml(
        "sd2",
        v=False,
        vae_mult=(1, 2),
        model_channels=64,
        channel_mult=[1, 2, 2],
        num_res_blocks=2,
        context_dim=1024,
        num_head_channels=64,
        image_size=32,
    )
    single.with_suffix(".yaml").write_text(doc)
    base = load_checkpoint(single)
    assert base.prediction_type == "epsilon" and base.configs["unet"]["sample_size"] == 64
    assert base.configs["unet"]["attention_head_dim"] == [1, 2, 2] and not base.notes


def test_oversized_yaml_is_refused_unread(sd1_file, tmp_path):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("# padding\n" * 120_000)
    with pytest.raises(ModelConfigError, match="too large for an LDM config"):
        load_checkpoint(sd1_file, config=cfg)
