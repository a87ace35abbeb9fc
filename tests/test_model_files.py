"""The model files users bring, in the layouts diffusers, transformers and A1111 write them: each loads, with
the oracle's tensors, and a broken variant is a one-line error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdengine.weights import load_checkpoint


def test_fp16_sharded_variant_folder_loads(tmp_path, tiny_sd1_folder):
    # diffusers' save_pretrained(variant="fp16", max_shard_size=...) names the index
    # `diffusion_pytorch_model.safetensors.index.fp16.json` (transformers: `model.safetensors.index.fp16.json`)
    from _pipeline_models import diffusers_pipeline

    dst = tmp_path / "fp16-sharded"
    diffusers_pipeline(tiny_sd1_folder).to(torch.float16).save_pretrained(dst, variant="fp16", max_shard_size="20KB")
    assert (dst / "unet" / "diffusion_pytorch_model.safetensors.index.fp16.json").is_file()
    assert (dst / "text_encoder" / "model.safetensors.index.fp16.json").is_file()
    got = load_checkpoint(dst)
    want = load_checkpoint(tiny_sd1_folder)
    for comp in ("unet", "vae", "text_encoder"):
        assert got.state_dicts[comp].keys() == want.state_dicts[comp].keys(), comp
        for k, v in want.state_dicts[comp].items():
            assert got.state_dicts[comp][k].dtype == torch.float16
            assert torch.equal(got.state_dicts[comp][k], v.half()), (comp, k)


def _ldm_vae_file(tmp_path):
    """A VAE for 4-channel latents as an A1111 `.vae.safetensors` (LDM layout, 32-group norms, no config), and
    the diffusers AutoencoderKL it was written from."""
    from diffusers import AutoencoderKL

    from sdengine.weights import save_safetensors
    from sdengine.weights.detect import vae_layout_from_diffusers
    from sdengine.weights.keymaps import vae_diffusers_to_ldm

    torch.manual_seed(7)
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=32,
    ).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape) * 0.02)
    ldm, bad = vae_diffusers_to_ldm(vae.state_dict(), vae_layout_from_diffusers(vae.state_dict()))
    assert not bad
    path = tmp_path / "sdxl_vae.safetensors"
    save_safetensors(ldm, path)
    return path, vae


@pytest.fixture(scope="module")
def sdxl_with_vae_file(tmp_path_factory):
    from _sdxl_models import make_sdxl_folder

    tmp = tmp_path_factory.mktemp("sdxl-vae")
    folder = make_sdxl_folder(tmp / "tiny-sdxl")
    return folder, *_ldm_vae_file(tmp)


def test_a_vae_file_on_sdxl_keeps_sdxls_scaling_factor(sdxl_with_vae_file, tmp_path):
    # An LDM VAE file carries no config: the latents' scale is the model's (SDXL 0.13025), as A1111 reads it from
    # the model's config; 0.18215 (SD's) would decode every SDXL image from wrongly scaled latents.
    from sdengine.weights import convert

    folder, vae_file, _ = sdxl_with_vae_file
    single = convert(folder, tmp_path / "tiny-sdxl.safetensors")
    for model in (folder, single):
        assert load_checkpoint(model).configs["vae"]["scaling_factor"] == 0.13025
        assert load_checkpoint(model, vae=vae_file).configs["vae"]["scaling_factor"] == 0.13025, model


def test_sdxl_images_with_a_vae_file_equal_diffusers_with_that_vae(sdxl_with_vae_file):
    import numpy as np

    import sdengine
    from _pipeline_models import diffusers_scheduler
    from _sdxl_models import diffusers_sdxl

    folder, vae_file, vae = sdxl_with_vae_file
    ref = diffusers_sdxl(folder)
    vae.register_to_config(scaling_factor=ref.vae.config.scaling_factor)  # the model's latent scale
    ref.vae = vae
    ref.scheduler = diffusers_scheduler(folder, "euler")
    theirs = ref(
        "a red apple",
        negative_prompt="blurry",
        num_inference_steps=3,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(3),
        output_type="np",
        width=32,
        height=32,
    ).images
    pipe = sdengine.load_pipeline(folder, device="cpu", vae=vae_file)
    ours = pipe(
        "a red apple",
        "blurry",
        steps=3,
        sampler="euler",
        schedule="normal",
        cfg_scale=5.0,
        seed=3,
        width=32,
        height=32,
        progress=False,
    ).arrays
    assert float(np.abs(np.asarray(ours, np.float64) - np.asarray(theirs, np.float64)).mean()) < 1e-4


def test_a_vae_file_keeps_the_scale_factor_of_the_models_yaml(tiny_sd1_folder, tmp_path):
    from sdengine.weights import convert, load_file, save_safetensors

    single = convert(tiny_sd1_folder, tmp_path / "m.safetensors")
    sd, _ = load_file(single)  # without sdengine's config metadata and without its VAE: a pruned A1111 file
    save_safetensors({k: v for k, v in sd.items() if not k.startswith("first_stage_model.")}, single)
    vae_file, _ = _ldm_vae_file(tmp_path)
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    scale_factor: 0.5\n")
    assert load_checkpoint(single, vae=vae_file).configs["vae"]["scaling_factor"] == 0.5


@pytest.mark.parametrize("sharded", [False, True])
def test_a_text_encoder_saved_as_pytorch_model_bin_loads(tmp_path, tiny_sd1_folder, sharded):
    # transformers' pickle names (older SD folders, DreamBooth outputs): pytorch_model.bin, or
    # pytorch_model.bin.index.json + pytorch_model-0000N-of-0000M.bin
    import json
    import shutil

    from transformers import CLIPTextModel

    from sdengine.weights import load_file

    dst = tmp_path / "bin-model"
    shutil.copytree(tiny_sd1_folder, dst)
    te = dst / "text_encoder"
    sd, _ = load_file(te / "model.safetensors")
    (te / "model.safetensors").unlink()
    if sharded:
        keys = sorted(sd)
        halves = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        for name, part in halves.items():
            torch.save({k: sd[k].clone() for k in part}, te / name)
        index = {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}
        (te / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    else:
        torch.save({k: v.clone() for k, v in sd.items()}, te / "pytorch_model.bin")
    oracle = CLIPTextModel.from_pretrained(te).state_dict()  # transformers reads it
    got = load_checkpoint(dst).state_dicts["text_encoder"]
    want = load_checkpoint(tiny_sd1_folder).state_dicts["text_encoder"]
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), k
        if k in oracle:
            assert torch.equal(oracle[k], v), k


def _without_scheduler(folder, dst):
    """A copy of a diffusers folder's configs for `config=` that says nothing about the scheduler."""
    import shutil

    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("*.safetensors", "scheduler"))
    return dst


@pytest.mark.parametrize("markers", [(), ("v_pred",), ("v_pred", "ztsnr")])
def test_sdxl_v_prediction_markers_set_the_prediction_type(sdxl_with_vae_file, tmp_path, markers):
    # NoobAI-XL V-Pred and other v-prediction SDXL fine-tunes carry empty `v_pred` (and `ztsnr`: zero terminal
    # SNR) tensors, which ComfyUI and A1111 read; they were refused as unexpected keys
    from sdengine.weights import convert, load_file, save_safetensors

    folder = sdxl_with_vae_file[0]
    sd, _ = load_file(convert(folder, tmp_path / "sdengine.safetensors"))
    path = tmp_path / "vpred.safetensors"  # as other tools write it: no sdengine config metadata
    save_safetensors({**sd, **{k: torch.tensor([]) for k in markers}}, path)
    ck = load_checkpoint(path, config=_without_scheduler(folder, tmp_path / "cfg"))
    assert ck.prediction_type == ("v_prediction" if markers else "epsilon")
    assert ck.configs["scheduler"].get("rescale_betas_zero_snr", False) == ("ztsnr" in markers)
    assert not any(k in ck.state_dicts["unet"] for k in markers)


def test_a_v_prediction_sdxl_model_converts_with_its_markers(sdxl_with_vae_file, tmp_path):
    import json
    import shutil

    from sdengine.weights import convert, load_file

    folder = shutil.copytree(sdxl_with_vae_file[0], tmp_path / "vpred-folder")
    sched = folder / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    sched.write_text(json.dumps({**cfg, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}))
    sd, _ = load_file(convert(folder, tmp_path / "vpred.safetensors"))
    assert sd["v_pred"].numel() == 0 and sd["ztsnr"].numel() == 0  # what ComfyUI and A1111 read
    back = load_checkpoint(convert(tmp_path / "vpred.safetensors", tmp_path / "back"))
    assert back.prediction_type == "v_prediction" and back.configs["scheduler"]["rescale_betas_zero_snr"] is True


SGM_YAML = """model:
  target: sgm.models.diffusion.DiffusionEngine
  params:
    scale_factor: 0.13025
    denoiser_config:
      target: sgm.modules.diffusionmodules.denoiser.DiscreteDenoiser
      params:
        num_idx: 1000
        scaling_config:
          target: sgm.modules.diffusionmodules.denoiser_scaling.{scaling}
"""


@pytest.mark.parametrize("scaling", ["VScaling", "EpsScaling"])
def test_sdxl_yaml_beside_the_file_gives_its_prediction_type(sdxl_with_vae_file, tmp_path, scaling):
    # A1111 pairs a v-prediction SDXL file with sd_xl_v.yaml (denoiser scaling VScaling); the yaml was ignored
    from sdengine.weights import convert, load_file, save_safetensors

    sd, _ = load_file(convert(sdxl_with_vae_file[0], tmp_path / "sdengine.safetensors"))
    path = tmp_path / "model.safetensors"
    save_safetensors(sd, path)  # no sdengine config metadata, as A1111 users' files
    (tmp_path / "model.yaml").write_text(SGM_YAML.format(scaling=scaling))
    want = "v_prediction" if scaling == "VScaling" else "epsilon"
    ck = load_checkpoint(path)
    assert ck.prediction_type == want and ck.configs["scheduler"]["prediction_type"] == want
    assert load_checkpoint(path, prediction_type="epsilon").prediction_type == "epsilon"  # the caller's word wins


def _plain_sd1_file(folder, dst, extra=None):
    """An SD 1.x LDM single file as other tools write it (no sdengine config metadata), plus `extra` keys."""
    from sdengine.weights import convert, load_file, save_safetensors

    sd, _ = load_file(convert(folder, dst.with_name("meta-" + dst.name)))
    save_safetensors({**sd, **(extra or {})}, dst)
    return dst


@pytest.mark.parametrize("markers", [(), ("v_pred",), ("v_pred", "ztsnr"), ("ztsnr",)])
def test_sd1_v_pred_marker_sets_the_prediction_type(tiny_sd1_folder, tmp_path, markers):
    # ComfyUI writes an empty `v_pred` tensor into every v-prediction model it saves (SD 1.x v fine-tunes
    # too); an SD 1.x file with it was refused as "unexpected keys". `ztsnr` counts only with `v_pred`.
    path = _plain_sd1_file(tiny_sd1_folder, tmp_path / "m.safetensors", {k: torch.tensor([]) for k in markers})
    ck = load_checkpoint(path)
    v = "v_pred" in markers
    assert ck.prediction_type == ("v_prediction" if v else "epsilon")
    assert ck.configs["scheduler"]["prediction_type"] == ck.prediction_type
    assert ck.configs["scheduler"].get("rescale_betas_zero_snr", False) == (v and "ztsnr" in markers)
    assert set(markers) <= set(ck.skipped)
    assert load_checkpoint(path, prediction_type="epsilon").prediction_type == "epsilon"  # the caller's word wins


def test_a_yaml_that_states_the_prediction_type_wins_over_the_v_pred_marker(tiny_sd1_folder, tmp_path):
    path = _plain_sd1_file(tiny_sd1_folder, tmp_path / "m.safetensors", {"v_pred": torch.tensor([])})
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: eps\n")
    assert load_checkpoint(path).prediction_type == "epsilon"
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    scale_factor: 0.5\n")  # says nothing: the marker
    assert load_checkpoint(path).prediction_type == "v_prediction"


def sgm_yaml(*, refiner: bool = False, embedders: tuple[str, ...] | None = None, **unet_over) -> str:
    """sgm's sd_xl_base.yaml / sd_xl_refiner.yaml, with the numbers of the tiny SDXL models (tests/_sdxl_models)."""
    import yaml

    unet = {
        "adm_in_channels": 72 if refiner else 80,
        "num_classes": "sequential",
        "in_channels": 4,
        "out_channels": 4,
        "model_channels": 32,
        "attention_resolutions": [2],
        "num_res_blocks": 2,
        "channel_mult": [1, 2, 2] if refiner else [1, 2],
        "num_head_channels": 16,
        "use_linear_in_transformer": True,
        "transformer_depth": 2 if refiner else [1, 2],  # the first level has no attention
        "context_dim": [48, 48, 48] if refiner else 80,  # as sd_xl_refiner.yaml writes it: one per level
        **unet_over,
    }
    if embedders is None:
        embedders = ("FrozenOpenCLIPEmbedder2",) if refiner else ("FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder2")
    emb = [{"input_key": "txt", "target": f"sgm.modules.encoders.modules.{e}", "params": {}} for e in embedders]
    emb.append({"input_key": "crop_coords_top_left", "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND"})
    scaling = {"target": "sgm.modules.diffusionmodules.denoiser_scaling.EpsScaling"}
    ddconfig = {"double_z": True, "z_channels": 4, "ch": 16, "ch_mult": [1, 2], "num_res_blocks": 1}
    params = {
        "scale_factor": 0.13025,
        "denoiser_config": {"params": {"scaling_config": scaling}},
        "network_config": {"target": "sgm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
        "conditioner_config": {"target": "sgm.modules.GeneralConditioner", "params": {"emb_models": emb}},
        "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": ddconfig}},
    }
    return yaml.safe_dump({"model": {"target": "sgm.models.diffusion.DiffusionEngine", "params": params}})


@pytest.fixture(scope="module")
def plain_sdxl_file(sdxl_with_vae_file, tmp_path_factory):
    from sdengine.weights import convert, load_file, save_safetensors

    tmp = tmp_path_factory.mktemp("plain-sdxl")
    sd, _ = load_file(convert(sdxl_with_vae_file[0], tmp / "meta.safetensors"))
    save_safetensors(dict(sd), tmp / "sdxl.safetensors")  # as A1111 users' files: no sdengine config metadata
    return tmp / "sdxl.safetensors"


def test_an_sgm_yaml_that_fits_gives_the_heads(plain_sdxl_file, sdxl_with_vae_file, tmp_path):
    import json

    cfg = tmp_path / "sd_xl_base.yaml"
    cfg.write_text(sgm_yaml())
    ck = load_checkpoint(plain_sdxl_file, config=cfg)
    folder_unet = json.loads((sdxl_with_vae_file[0] / "unet" / "config.json").read_text())
    assert ck.configs["unet"]["attention_head_dim"] == list(folder_unet["attention_head_dim"])  # 16-wide heads
    assert (
        load_checkpoint(plain_sdxl_file).configs["unet"]["attention_head_dim"]
        != ck.configs["unet"]["attention_head_dim"]
    )  # without the yaml the shapes cannot tell


@pytest.mark.parametrize(
    "over, match",
    [
        ({"context_dim": 2048}, r"unet cross_attention_dim is 2048 in the config but 80 in the weights"),
        ({"model_channels": 320}, r"unet block_out_channels is \[320, 640\] in the config but \[32, 64\]"),
        ({"num_res_blocks": 3}, r"unet layers_per_block is 3 in the config but 2"),
        ({"transformer_depth": [1, 10]}, r"transformer_layers_per_block is \[1, 10\] in the config but 2"),
        ({"adm_in_channels": 2816}, r"projection_class_embeddings_input_dim is 2816 in the config but 80"),
        ({"use_linear_in_transformer": False}, r"use_linear_projection is False in the config but True"),
        ({"num_head_channels": 24}, r"num_head_channels 24 does not divide 64"),
        ({"refiner": True}, r"names a OpenCLIP ViT-bigG only \(SDXL refiner\) text encoder but the weights hold"),
        ({"embedders": ("FrozenOpenCLIPEmbedder",)}, r"names a OpenCLIP ViT-H \(SD 2.x\) text encoder"),
    ],
)
def test_an_sgm_yaml_that_contradicts_the_sdxl_weights_is_one_line(plain_sdxl_file, tmp_path, over, match):
    # sgm's network_config / conditioner_config were not read: a wrong sd_xl_*.yaml beside a file went unnoticed
    from sdengine.weights.ldm_config import ModelConfigError

    beside = tmp_path / "m.safetensors"
    beside.symlink_to(plain_sdxl_file)
    (tmp_path / "m.yaml").write_text(sgm_yaml(**over))  # found beside the file, as A1111 pairs them
    with pytest.raises(ModelConfigError, match=match) as e:
        load_checkpoint(beside)
    assert "\n" not in str(e.value) and "m.yaml" in str(e.value)


def test_an_sdxl_yaml_beside_an_sd1_file_is_refused(tiny_sd1_folder, tmp_path):
    from sdengine.weights.ldm_config import ModelConfigError

    path = _plain_sd1_file(tiny_sd1_folder, tmp_path / "m.safetensors")
    (tmp_path / "m.yaml").write_text(sgm_yaml(embedders=()))  # only the U-Net: its added conditioning
    with pytest.raises(ModelConfigError, match=r"adm_in_channels 80\) but the weights have none"):
        load_checkpoint(path)
    (tmp_path / "m.yaml").write_text(sgm_yaml())
    with pytest.raises(ModelConfigError, match=r"SDXL base\) text encoder but the weights hold CLIP ViT-L"):
        load_checkpoint(path)


def test_model_hash_of_a_sharded_unet_covers_every_shard(tmp_path, tiny_sd1_folder):
    # "Model hash" of a folder hashed the first `unet/diffusion_pytorch_model*` file by name: of a sharded U-Net
    # only shard 1, and with an fp16 variant beside the full weights, the variant the loader does not read
    import hashlib
    import shutil

    import sdengine
    from _pipeline_models import diffusers_pipeline

    dst = tmp_path / "sharded"
    diffusers_pipeline(tiny_sd1_folder).save_pretrained(dst, max_shard_size="20KB")
    shards = sorted((dst / "unet").glob("diffusion_pytorch_model-*-of-*.safetensors"))
    assert len(shards) > 1
    h = hashlib.sha256()
    for f in shards:
        h.update(f.read_bytes())
    assert sdengine.load_pipeline(dst, device="cpu").model_hash() == h.hexdigest()[:10]

    both = shutil.copytree(tiny_sd1_folder, tmp_path / "both")
    full = both / "unet" / "diffusion_pytorch_model.safetensors"
    (both / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(full.read_bytes() + b" ")
    want = hashlib.sha256(full.read_bytes()).hexdigest()[:10]
    assert sdengine.load_pipeline(both, device="cpu").model_hash() == want  # the file the loader reads


def test_sgm_denoiser_sigmas_in_an_sdxl_file_are_skipped(plain_sdxl_file, tmp_path):
    # sgm's DiscreteDenoiser keeps its sigmas as buffers; SDXL files saved from sgm (or merged in A1111) carry
    # `denoiser.sigmas` / `denoiser.log_sigmas`, which were refused as "unexpected keys"
    from sdengine.weights import load_file, save_safetensors

    sd, _ = load_file(plain_sdxl_file)
    path = tmp_path / "merged.safetensors"
    save_safetensors({**sd, "denoiser.sigmas": torch.ones(1000), "denoiser.log_sigmas": torch.zeros(1000)}, path)
    ck = load_checkpoint(path)
    assert {"denoiser.sigmas", "denoiser.log_sigmas"} <= set(ck.skipped)
    want = load_checkpoint(plain_sdxl_file)
    assert ck.state_dicts.keys() == want.state_dicts.keys()
    assert all(ck.state_dicts[c].keys() == want.state_dicts[c].keys() for c in want.state_dicts)


@pytest.fixture(scope="module")
def config_free_sd1_file(tmp_path_factory):
    """A tiny SD 1.x LDM file whose architecture the shapes alone give (32-group norms, 768-wide context, 64-wide
    text-encoder heads): it loads without any config, as a real SD 1.5 file does."""
    from sdengine.weights import save_safetensors
    from sdengine.weights.loading import LoadedCheckpoint, components_to_ldm
    from test_weights_common import randomize, tiny_clip, tiny_unet, tiny_vae

    unet = randomize(tiny_unet("sd1", norm_num_groups=32, cross_attention_dim=768, attention_head_dim=8), 1)
    te = randomize(tiny_clip("sd1", hidden_size=768, num_attention_heads=12, intermediate_size=64), 3)
    vae = randomize(tiny_vae(block_out_channels=(32, 64), norm_num_groups=32), 2)
    parts = {"unet": unet, "vae": vae, "text_encoder": te}
    ck = LoadedCheckpoint(
        source=Path("tiny"),
        layout="diffusers",
        state_dicts={k: m.state_dict() for k, m in parts.items()},
        configs={"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": te.config.to_dict()},
        prediction_type="epsilon",
    )
    path = tmp_path_factory.mktemp("config-free") / "sd1.safetensors"
    save_safetensors(components_to_ldm(ck), path)
    return path


@pytest.mark.parametrize(
    "key",
    [
        "model.diffusion_model.input_blocks.0.0.weight",  # was "no model.diffusion_model.* UNet weights found"
        "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",  # was a bare KeyError
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight",  # "need cross_attention_dim"
        "model.diffusion_model.input_blocks.1.1.norm.weight",  # read as "no attention": 51 "unexpected UNet keys"
        "model.diffusion_model.middle_block.1.norm.weight",
        "model.diffusion_model.input_blocks.3.0.op.weight",  # "8 input blocks with 1 downsamplers do not make ..."
        "model.diffusion_model.input_blocks.6.0.op.bias",
        "first_stage_model.post_quant_conv.weight",  # KeyError
        "first_stage_model.encoder.conv_in.weight",  # KeyError
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight",  # KeyError
    ],
)
def test_a_file_missing_a_tensor_names_it(config_free_sd1_file, tmp_path, key):
    # a damaged or hand-pruned checkpoint: one tensor the architecture is read from is gone
    from sdengine.weights import WeightsError, load_file, save_safetensors
    from sdengine.weights.loading import build_models

    sd, _ = load_file(config_free_sd1_file)
    build_models(load_checkpoint(config_free_sd1_file))  # whole, it loads without a config
    assert key in sd
    path = tmp_path / "damaged.safetensors"
    save_safetensors({k: v for k, v in sd.items() if k != key}, path)
    with pytest.raises(WeightsError, match="missing") as e:
        build_models(load_checkpoint(path))
    msg = str(e.value)
    assert "\n" not in msg and "unexpected" not in msg
    assert key.split(".")[-2] in msg  # names the tensor (in the file's or the model's names)


@pytest.mark.parametrize(
    ("prefix", "named"),
    [
        ("input_blocks.3.0.op.", "input_blocks.3.0.op.weight/.bias"),  # a whole downsampler
        ("input_blocks.2.", "input_blocks.2.* (a residual block)"),
        ("input_blocks.8.", "input_blocks.8.* (a residual block)"),  # the last one: nothing after it to count
    ],
)
def test_a_file_missing_a_whole_input_block_names_it(config_free_sd1_file, tmp_path, prefix, named):
    # was "cannot read the UNet layout: 8 input blocks with 1 downsamplers ... (a missing or extra ...?)"
    from sdengine.weights import WeightsError, load_file, save_safetensors

    sd, _ = load_file(config_free_sd1_file)
    prefix = "model.diffusion_model." + prefix
    assert any(k.startswith(prefix) for k in sd)
    path = tmp_path / "damaged.safetensors"
    save_safetensors({k: v for k, v in sd.items() if not k.startswith(prefix)}, path)
    with pytest.raises(WeightsError) as e:
        load_checkpoint(path)
    assert str(e.value) == f"missing model.diffusion_model.{named}: the U-Net is incomplete (a damaged file?)"


def _lfs(path, sd):
    path.write_bytes(b"version https://git-lfs.github.com/spec/v1\noid sha256:4c8f7a\nsize 4265146304\n")


def _html(path, sd):
    path.write_bytes(b"<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>...</body></html>\n" * 40)


def _zip_as_safetensors(path, sd):
    torch.save({"state_dict": sd}, path)


def _safetensors_as_ckpt(path, sd):
    from sdengine.weights import save_safetensors

    save_safetensors(sd, path)


def _truncated_ckpt(path, sd):
    torch.save({"state_dict": sd}, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "name, write, match",
    [
        ("m.safetensors", _lfs, "a Git LFS pointer, not the weights"),
        ("m.ckpt", _lfs, "a Git LFS pointer, not the weights"),  # was "refusing ... pickle opcode 118"
        ("m.safetensors", _html, r"a web page \(HTML\), not weights"),
        ("m.ckpt", _html, r"a web page \(HTML\), not weights"),  # was "refusing ... could run code"
        ("m.safetensors", _zip_as_safetensors, r"a PyTorch checkpoint \(pickle\), not safetensors"),
        ("m.ckpt", _safetensors_as_ckpt, "a safetensors file named like a pickle checkpoint"),
        ("m.ckpt", _truncated_ckpt, "a truncated or damaged PyTorch checkpoint"),  # was miniz's text, cut off
    ],
)
def test_a_file_that_is_not_weights_says_what_it_is(tmp_path, name, write, match):
    # what downloads really leave behind: an LFS pointer, a login page, a file renamed to the other format
    from sdengine.weights import WeightsError

    sd = {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}
    path = tmp_path / name
    write(path, sd)
    with pytest.raises(WeightsError, match=match) as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value) and "run code" not in str(e.value)


def test_an_sd1_yaml_beside_an_sdxl_file_is_refused(plain_sdxl_file, tmp_path):
    # the SDXL path read only the prediction type from a .yaml: A1111's v1-inference.yaml beside an SDXL file
    # went unnoticed
    from sdengine.weights.ldm_config import ModelConfigError

    beside = tmp_path / "m.safetensors"
    beside.symlink_to(plain_sdxl_file)
    (tmp_path / "m.yaml").write_text(
        "model:\n  params:\n    cond_stage_config:\n      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder\n"
    )
    with pytest.raises(ModelConfigError, match=r"names a CLIP ViT-L \(SD 1.x\) text encoder but the weights hold"):
        load_checkpoint(beside)
    (tmp_path / "m.yaml").write_text(
        "model:\n  params:\n    unet_config:\n      params:\n        num_heads: 8\n        context_dim: 768\n"
    )
    with pytest.raises(ModelConfigError, match="unet cross_attention_dim is 768 in the config but 80 in the weights"):
        load_checkpoint(beside)


def test_a_file_with_only_the_ema_unet_says_so(config_free_sd1_file, tmp_path):
    # a training checkpoint pruned of its model weights keeps the EMA copy (model_ema.*, dots dropped from the
    # names) beside the VAE and text encoder: it was "no model.diffusion_model.* UNet weights found"
    from sdengine.weights import WeightsError, load_file, save_safetensors

    sd, _ = load_file(config_free_sd1_file)
    unet = "model.diffusion_model."
    ema = {"model_ema." + k[len(unet) :].replace(".", ""): v for k, v in sd.items() if k.startswith(unet)}
    path = tmp_path / "ema-only.safetensors"
    rest = {k: v for k, v in sd.items() if not k.startswith(unet)}
    save_safetensors({**rest, **ema, "model_ema.decay": torch.tensor(0.9999)}, path)
    with pytest.raises(WeightsError, match=r"holds only the EMA copy of the U-Net \(model_ema\.\*"):
        load_checkpoint(path)
    with_ema = tmp_path / "with-ema.safetensors"  # beside the model's own U-Net, the EMA copy is skipped
    save_safetensors({**sd, **ema, "model_ema.decay": torch.tensor(0.9999)}, with_ema)
    assert sum(k.startswith("model_ema.") for k in load_checkpoint(with_ema).skipped) == len(ema) + 1
