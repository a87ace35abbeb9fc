"""convert/load_checkpoint on tiny random pipelines, with diffusers' own loaders as the oracle
(docs/CONTRACTS.md, Model files and Test oracles)."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch

from sdengine.weights import (
    MissingVAEError,
    UnsupportedModelError,
    WeightsError,
    build_on_meta,
    convert,
    load_checkpoint,
    load_into,
    read_prediction_type,
    save_safetensors,
)
from sdengine.weights.loading import LoadedCheckpoint, components_to_ldm
from test_weights_common import assert_same_tensors, randomize, state, tiny_clip, tiny_pipeline, tiny_unet, tiny_vae

COMPONENTS = ("unet", "vae", "text_encoder")


# inpainting differs from SD1 only in conv_in's width (covered fast by the key-map tests): its pipeline runs are slow
@pytest.fixture(scope="module", params=["sd1", "sd2", pytest.param("inpaint", marks=pytest.mark.slow)])
def made(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    pipe = tiny_pipeline(request.param, tmp)
    single = convert(tmp / "folder", tmp / "one.safetensors")
    return request.param, pipe, tmp, single


def _run(pipe, kind):
    kw = dict(num_inference_steps=2, height=16, width=16, output_type="np", guidance_scale=3.0)
    if kind == "inpaint":
        kw.update(image=torch.zeros(1, 3, 16, 16), mask_image=torch.ones(1, 1, 16, 16))
    return pipe("a red apple", generator=torch.Generator().manual_seed(0), **kw).images


def _assert_config_superset(got: dict, want: dict) -> None:
    for k, v in want.items():
        if not k.startswith("_"):
            assert json.dumps(got.get(k), sort_keys=True) == json.dumps(v, sort_keys=True), k


def _pipeline_class(kind):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    return StableDiffusionInpaintPipeline if kind == "inpaint" else StableDiffusionPipeline


def test_our_single_file_loads_in_diffusers_from_single_file(made):
    kind, pipe, tmp, single = made
    other = _pipeline_class(kind).from_single_file(
        str(single), config=str(tmp / "folder"), local_files_only=True, safety_checker=None
    )
    for comp in COMPONENTS:
        assert_same_tensors(state(getattr(other, comp)), state(getattr(pipe, comp)))
    assert other.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    np.testing.assert_allclose(_run(other, kind), _run(pipe, kind), rtol=0, atol=1e-5)


def test_single_file_to_folder_loads_in_diffusers_from_pretrained(made):
    kind, pipe, tmp, single = made
    folder = convert(single, tmp / "back", tokenizer_dir=tmp / "folder" / "tokenizer")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == _pipeline_class(kind).__name__
    other = _pipeline_class(kind).from_pretrained(folder, local_files_only=True)
    for comp in COMPONENTS:
        assert_same_tensors(state(getattr(other, comp)), state(getattr(pipe, comp)))
        if comp != "text_encoder":
            _assert_config_superset(dict(getattr(other, comp).config), dict(getattr(pipe, comp).config))
    assert type(other.scheduler) is type(pipe.scheduler)
    np.testing.assert_allclose(_run(other, kind), _run(pipe, kind), rtol=0, atol=1e-5)


def test_folder_and_single_file_give_the_same_state_dicts(made):
    kind, pipe, tmp, single = made
    a = load_checkpoint(tmp / "folder")
    b = load_checkpoint(single)
    assert a.layout == "diffusers" and b.layout == "single_file"
    for comp in COMPONENTS:
        assert_same_tensors(a.state_dicts[comp], state(getattr(pipe, comp)))
        assert_same_tensors(b.state_dicts[comp], a.state_dicts[comp])
    assert a.prediction_type == b.prediction_type == pipe.scheduler.config.prediction_type
    assert a.inpainting == b.inpainting == (kind == "inpaint")
    assert a.tokenizer_dir == tmp / "folder" / "tokenizer"


def test_build_on_meta_and_forward(made):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    kind, pipe, tmp, single = made
    ck = load_checkpoint(single)
    unet = build_on_meta(
        lambda: UNet2DConditionModel.from_config(ck.configs["unet"]), ck.state_dicts["unet"], name="unet"
    )
    vae = build_on_meta(lambda: AutoencoderKL.from_config(ck.configs["vae"]), ck.state_dicts["vae"], name="vae")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(1, 5, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, 10, ctx).sample, pipe.unet(x, 10, ctx).sample, rtol=1e-5, atol=1e-5)
        img = torch.randn(1, 3, 16, 16, generator=g)
        ref = pipe.vae.decode(pipe.vae.encode(img).latent_dist.mode()).sample
        torch.testing.assert_close(vae.decode(vae.encode(img).latent_dist.mode()).sample, ref, rtol=1e-5, atol=1e-5)


def test_fp16_convert(made):
    kind, pipe, tmp, single = made
    half = convert(tmp / "folder", tmp / "half.safetensors", dtype="fp16")
    ck = load_checkpoint(half)
    for comp in COMPONENTS:
        ref = {k: v.half() for k, v in state(getattr(pipe, comp)).items()}
        assert_same_tensors(ck.state_dicts[comp], ref)


# ------------------------------------------------------------------------------- configs from shapes alone


def _ldm_without_metadata(tmp, unet, vae, te, scheduler_pred="epsilon"):
    ck = LoadedCheckpoint(
        source=tmp,
        layout="diffusers",
        state_dicts={"unet": unet.state_dict(), "vae": vae.state_dict(), "text_encoder": state(te)},
        configs={
            "unet": dict(unet.config),
            "vae": dict(vae.config),
            "text_encoder": te.config.to_dict(),
            "scheduler": {},
        },
        prediction_type=scheduler_pred,
    )
    return components_to_ldm(ck)


def _check_synthesised(ck, unet, vae, te):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    for key in (
        "in_channels",
        "out_channels",
        "block_out_channels",
        "layers_per_block",
        "down_block_types",
        "up_block_types",
        "cross_attention_dim",
        "attention_head_dim",
        "use_linear_projection",
        "norm_num_groups",
    ):
        got, want = ck.configs["unet"][key], unet.config[key]
        assert (list(got) if isinstance(got, list | tuple) else got) == (
            list(want) if isinstance(want, list | tuple) else want
        ), key
    for key in ("block_out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        assert list(np.atleast_1d(ck.configs["vae"][key])) == list(np.atleast_1d(vae.config[key])), key
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "hidden_act", "vocab_size"):
        assert ck.configs["text_encoder"][key] == getattr(te.config, key), key
    u = build_on_meta(lambda: UNet2DConditionModel.from_config(ck.configs["unet"]), ck.state_dicts["unet"])
    v = build_on_meta(lambda: AutoencoderKL.from_config(ck.configs["vae"]), ck.state_dicts["vae"])
    cfg = CLIPTextConfig(**{k: v for k, v in ck.configs["text_encoder"].items() if k != "architectures"})
    te_sd = {k.removeprefix("text_model."): v for k, v in ck.state_dicts["text_encoder"].items()}
    t = build_on_meta(lambda: CLIPTextModel(cfg), te_sd)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 500, (1, 7), generator=g)
    x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g)
    with torch.no_grad():
        h = te(ids).last_hidden_state
        torch.testing.assert_close(t(ids).last_hidden_state, h, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(u(x, 3, h).sample, unet(x, 3, h).sample, rtol=1e-5, atol=1e-5)
        img = torch.randn(1, 3, 16, 16, generator=g)
        torch.testing.assert_close(
            v.decode(v.encode(img).latent_dist.mode()).sample,
            vae.decode(vae.encode(img).latent_dist.mode()).sample,
            rtol=1e-5,
            atol=1e-5,
        )


def _sd_shaped(kind):
    """SD1/SD2-shaped but small: the real context widths and head rules, 32-group norms, few channels."""
    if kind == "sd1":
        unet = tiny_unet("sd1", cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
        te = tiny_clip("sd1", hidden_size=768, num_attention_heads=12, intermediate_size=64, num_hidden_layers=1)
    else:
        unet = tiny_unet(
            "sd2",
            block_out_channels=(64, 128, 128),
            cross_attention_dim=1024,
            attention_head_dim=(1, 2, 2),
            norm_num_groups=32,
        )
        te = tiny_clip("sd2", hidden_size=1024, num_attention_heads=16, intermediate_size=64, num_hidden_layers=2)
    vae = tiny_vae(block_out_channels=(32, 64), norm_num_groups=32)
    return randomize(unet, 1), randomize(vae, 2), randomize(te, 3)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_configs_synthesised_from_shapes(tmp_path, kind):
    unet, vae, te = _sd_shaped(kind)
    p = tmp_path / "plain.safetensors"
    save_safetensors(_ldm_without_metadata(tmp_path, unet, vae, te), p)  # no sdengine metadata
    ck = load_checkpoint(p)
    assert ck.family == kind
    if kind == "sd2":
        assert ck.prediction_type == "v_prediction" and ck.configs["unet"]["sample_size"] == 96
        assert any("prediction_type='epsilon'" in n for n in ck.notes)
        assert ck.configs["scheduler"]["_class_name"] == "DDIMScheduler"
        # the padded last OpenCLIP block is the unused one
        assert any("resblocks.2." in k for k in ck.skipped)
    else:
        assert ck.prediction_type == "epsilon" and ck.configs["scheduler"]["_class_name"] == "PNDMScheduler"
    _check_synthesised(ck, unet, vae, te)


def test_sd2_prediction_type_override_and_global_step_hint(tmp_path):
    unet, vae, te = _sd_shaped("sd2")
    ldm = _ldm_without_metadata(tmp_path, unet, vae, te)
    p = tmp_path / "sd2.safetensors"
    save_safetensors(ldm, p)
    ck = load_checkpoint(p, prediction_type="epsilon")
    assert ck.prediction_type == "epsilon" and ck.configs["scheduler"]["prediction_type"] == "epsilon"
    assert ck.configs["unet"]["sample_size"] == 64
    c = tmp_path / "base.ckpt"
    torch.save({"state_dict": ldm, "global_step": 875000}, c)
    assert load_checkpoint(c).prediction_type == "epsilon"
    with pytest.raises(WeightsError, match="unknown prediction_type"):
        load_checkpoint(p, prediction_type="v")


def test_read_prediction_type(tmp_path):
    assert read_prediction_type(tmp_path) == "epsilon"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text('{"prediction_type": "v_prediction"}')
    assert read_prediction_type(tmp_path) == "v_prediction"


# --------------------------------------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def sd1_ldm(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    unet, vae, te = tiny_unet(), tiny_vae(), tiny_clip()
    return tmp, _ldm_without_metadata(tmp, unet, vae, te), (unet, vae, te)


def test_known_unused_keys_are_skipped_and_logged(sd1_ldm, caplog):
    tmp, ldm, _ = sd1_ldm
    extra = dict(ldm)
    for k in (
        "betas",
        "alphas_cumprod",
        "sqrt_alphas_cumprod",
        "posterior_variance",
        "model_ema.decay",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    ):
        extra[k] = torch.zeros(3)
    c = tmp / "real.ckpt"
    torch.save({"state_dict": extra, "global_step": 1}, c)
    with caplog.at_level(logging.DEBUG, logger="sdengine.weights"):
        ck = load_checkpoint(c)
    assert {"betas", "model_ema.decay"} <= set(ck.skipped)
    assert "betas" in caplog.text and "model_ema.decay" in caplog.text


def test_unexpected_keys_are_named(sd1_ldm):
    tmp, ldm, _ = sd1_ldm
    bad = dict(ldm)
    for i in range(7):
        bad[f"model.diffusion_model.extra_{i}.weight"] = torch.zeros(1)
    bad["something_else"] = torch.zeros(1)
    p = tmp / "unexpected.safetensors"
    save_safetensors(bad, p)
    with pytest.raises(WeightsError, match=r"unexpected keys \(not SD1/SD2 LDM names\): something_else \(1 in all\)"):
        load_checkpoint(p)
    del bad["something_else"]
    save_safetensors(bad, p)
    with pytest.raises(WeightsError, match=r"unexpected UNet keys: model\.diffusion_model\.extra_0\.weight.*7 in all"):
        load_checkpoint(p)


def test_missing_and_misshaped_keys(sd1_ldm):
    from diffusers import UNet2DConditionModel

    tmp, ldm, (unet, _, _) = sd1_ldm
    p = tmp / "ok.safetensors"
    save_safetensors(ldm, p)
    ck = load_checkpoint(p, config=None)
    sd = dict(ck.state_dicts["unet"])
    del sd["mid_block.resnets.0.conv1.weight"]
    cfg = dict(unet.config)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    with pytest.raises(WeightsError, match=r"unet: missing keys: mid_block\.resnets\.0\.conv1\.weight \(1 in all\)"):
        load_into(model, sd, name="unet")
    sd = dict(ck.state_dicts["unet"])
    sd["conv_in.weight"] = torch.zeros(32, 5, 3, 3)
    with pytest.raises(WeightsError, match=r"wrong tensor shapes: conv_in\.weight \(file \(32, 5, 3, 3\), model"):
        load_into(model, sd, name="unet")


def test_missing_vae_needs_vae_path(sd1_ldm):
    tmp, ldm, (_, vae, _) = sd1_ldm
    no_vae = {k: v for k, v in ldm.items() if not k.startswith("first_stage_model.")}
    p = tmp / "novae.safetensors"
    save_safetensors(no_vae, p)
    with pytest.raises(MissingVAEError, match="has no VAE.*vae="):
        load_checkpoint(p)
    # an LDM-layout VAE file (no prefix, as vae-ft-mse files ship), and a diffusers VAE folder
    vae_file = tmp / "vae.safetensors"
    save_safetensors(
        {k.removeprefix("first_stage_model."): v for k, v in ldm.items() if k.startswith("first_stage_model.")},
        vae_file,
    )
    vae.save_pretrained(tmp / "vae_folder")
    for src in (vae_file, tmp / "vae_folder"):
        ck = load_checkpoint(p, vae=src)
        assert_same_tensors(ck.state_dicts["vae"], vae.state_dict())
        assert ck.configs["vae"]["latent_channels"] == 4


@pytest.mark.parametrize(
    "keys,msg",
    [
        (
            {
                "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
                "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
            },
            "2816-wide label_emb: looks like SDXL",
        ),
        ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (4,)}, "SDXL"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": (4, 4)}, "LoRA"),
        ({"model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight": (4, 4)}, "SD3"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 7, 3, 3)}, "7 input channels"),
        ({"transformer.h.0.attn.weight": (4, 4)}, r"no model\.diffusion_model\.\* UNet weights found.*transformer"),
        ({"down_blocks.0.resnets.0.conv1.weight": (4, 4)}, "diffusers UNet names"),
    ],
)
def test_unknown_architectures(tmp_path, keys, msg):
    p = tmp_path / "x.safetensors"
    save_safetensors({k: torch.zeros(s) for k, s in keys.items()}, p)
    with pytest.raises((UnsupportedModelError, WeightsError), match=msg):
        load_checkpoint(p)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        load_checkpoint(tmp_path / "missing.safetensors")
    (tmp_path / "d").mkdir()
    with pytest.raises(WeightsError, match="not a diffusers folder"):
        load_checkpoint(tmp_path / "d")
    with pytest.raises(WeightsError, match="onto itself"):
        convert(tmp_path / "d", tmp_path / "d")


def test_single_file_to_folder_writes_clip_tokenizer(made):
    from transformers import CLIPTokenizer

    kind, pipe, tmp, single = made
    folder = convert(single, tmp / "with_tok")
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert json.loads((folder / "model_index.json").read_text())["tokenizer"] == ["transformers", "CLIPTokenizer"]


def test_cli_convert_creates_missing_parent_folders(made, tmp_path):
    from sdengine.cli import main

    _, _, tmp, single = made
    dst = tmp_path / "out" / "dir" / "model.safetensors"
    assert main(["convert", str(tmp / "folder"), str(dst)]) == 0
    a, b = load_checkpoint(dst), load_checkpoint(single)
    for comp in COMPONENTS:
        assert_same_tensors(a.state_dicts[comp], b.state_dicts[comp])


def test_cli_convert_refuses_a_config_for_a_folder(made, tmp_path, capsys):
    """--config is read for a single-file SRC only: with a diffusers folder it would change nothing, so it is
    refused in one line (as generate refuses config= for a folder), nothing written."""
    from sdengine.cli import main

    _, _, tmp, single = made
    (tmp_path / "c.yaml").write_text("model: {}\n")
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(tmp / "folder"), str(dst), "--config", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config" in err[0] and "drop --config" in err[0], err
    assert not dst.exists()


@pytest.mark.parametrize("name,why", [("emoji", "MiniLM"), ("fashion-mnist", "pixel DDPM")])
def test_cli_convert_of_a_builtin_says_why_not(tmp_path, capsys, name, why, monkeypatch):
    from sdengine.cli import main

    monkeypatch.chdir(tmp_path)  # the name is no file here
    assert main(["convert", name, str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"built-in model {name!r}" in err[0] and why in err[0], err
    assert "no such file" not in err[0]
    assert list(tmp_path.iterdir()) == []


def test_convert_to_folder_failing_midway_leaves_no_half_folder(made, tmp_path, monkeypatch):
    import sdengine.weights.loading as loading

    kind, pipe, tmp, single = made
    real, calls = loading.save_safetensors, []

    def disk_full(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 2:  # the U-Net is written, then the disk fills up on the VAE
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "save_safetensors", disk_full)
    with pytest.raises(OSError, match="No space left"):
        convert(single, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no `out`, no temporary folder
    # over an existing model folder: it stays exactly as it was
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model_index.json").write_text("{}")
    calls.clear()
    with pytest.raises(OSError, match="No space left"):
        convert(single, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model_index.json"]


def test_convert_refuses_to_replace_a_folder_that_is_not_a_model(made, tmp_path):
    kind, pipe, tmp, single = made
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(WeightsError, match=r"mine.* not a diffusers model folder") as e:
        convert(single, tmp_path / "mine")
    assert "\n" not in str(e.value) and (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_converted_folder_keeps_the_text_encoders_padding(tiny_sd2_folder, tmp_path):
    """A small SD2-layout model (OpenCLIP text encoder, family "custom") pads with "!" when loaded; the folder
    convert wrote from its single file padded with the end token, and gave another image."""
    import sdengine

    single = convert(tiny_sd2_folder, tmp_path / "one.safetensors")
    folder = convert(single, tmp_path / "back")
    args = {"steps": 2, "sampler": "euler", "seed": 1, "width": 32, "height": 32, "progress": False}
    want = sdengine.load_pipeline(tiny_sd2_folder, device="cpu", fast_path="none")("a red apple", **args).arrays
    for path in (single, folder):
        got = sdengine.load_pipeline(path, device="cpu", fast_path="none")("a red apple", **args).arrays
        np.testing.assert_array_equal(got, want)


def test_convert_refuses_a_checkpoint_that_would_not_load(made, tmp_path, capsys):
    """A missing tensor is refused by convert itself (it once wrote a model that then failed to load)."""
    from safetensors.torch import load_file, save_file

    from sdengine.cli import main

    _, _, _, single = made
    sd = load_file(single)
    key = next(k for k in sd if k.startswith("model.diffusion_model.") and k.endswith(".bias"))
    del sd[key]
    broken = tmp_path / "missing.safetensors"
    save_file(sd, broken)
    for dst in (tmp_path / "folder", tmp_path / "file.safetensors"):
        assert main(["convert", str(broken), str(dst)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "unet: missing keys" in err[0], err
        assert not dst.exists()


def test_cli_convert_keeps_what_a_model_folder_holds_besides_the_model(made, tmp_path, capsys):
    """`sdengine convert x.safetensors FOLDER` over a model folder replaces it whole: a README, sample images or a
    Hub download's safety_checker/ in it were deleted without a word. The command now refuses before loading,
    and converts over a folder that holds only what a conversion writes."""
    from sdengine.cli import main

    kind, pipe, tmp, single = made
    dst = tmp_path / "model"
    assert main(["convert", str(single), str(dst)]) == 0
    (dst / "README.md").write_text("my notes")
    (dst / "samples").mkdir()
    (dst / "samples" / "a.png").write_bytes(b"png")
    capsys.readouterr()
    assert main(["convert", str(single), str(dst)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "README.md, samples" in err[0] and "give a new folder" in err[0], err
    assert (dst / "README.md").read_text() == "my notes" and (dst / "samples" / "a.png").read_bytes() == b"png"
    (dst / "README.md").unlink()
    shutil.rmtree(dst / "samples")
    assert main(["convert", str(single), str(dst)]) == 0


def test_single_file_carries_the_v_pred_and_ztsnr_markers(made, tmp_path):
    # ComfyUI writes an empty `v_pred` tensor into every v-prediction model it saves (SD 1.x/2.x too) and
    # `ztsnr` beside it for zero terminal SNR; other tools read the prediction type from them.
    from safetensors import safe_open

    kind, _, tmp, single = made

    def keys(path):
        with safe_open(str(path), "pt") as f:
            return set(f.keys())

    assert ("v_pred" in keys(single)) == (kind == "sd2") and "ztsnr" not in keys(single)
    folder = tmp_path / "zsnr"
    shutil.copytree(tmp / "folder", folder)
    sched_file = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_file.read_text())
    sched.update(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sched_file.write_text(json.dumps(sched))
    out = convert(folder, tmp_path / "zsnr.safetensors")
    assert {"v_pred", "ztsnr"} <= keys(out)
    # without sdengine's metadata the markers alone say what the model is
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(str(out)), str(bare))
    ck = load_checkpoint(bare)
    assert ck.prediction_type == "v_prediction" and ck.configs["scheduler"].get("rescale_betas_zero_snr") is True


def test_sd3_and_flux_models_are_refused_by_convert_in_one_line(tmp_path, capsys):
    """SD3 / Flux models convert (tests/test_dit_convert.py); what such a conversion cannot do is one line naming
    the flag or the reason, exit code 2, nothing written (was: every SD3 / Flux model refused)."""
    from _flux_models import make_flux_folder
    from _sd3_models import make_sd3_folder
    from sdengine.cli import main
    from sdengine.pipeline.dit_convert import convert_dit

    flux, sd3 = make_flux_folder(tmp_path / "flux", guidance=True), make_sd3_folder(tmp_path / "sd3")
    convert_dit(flux, tmp_path / "flux1.safetensors", transformer_only=True)
    capsys.readouterr()  # what making the models printed
    (tmp_path / "shifted").mkdir()
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                "tokenizer_3", "scheduler", "model_index.json"):  # fmt: skip
        src = sd3 / sub
        (tmp_path / "shifted" / sub).symlink_to(src, target_is_directory=src.is_dir())
    (tmp_path / "shifted" / "scheduler").unlink()
    (tmp_path / "shifted" / "scheduler").mkdir()
    (tmp_path / "shifted" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 6.0}))
    cases = [
        ([str(tmp_path / "flux1.safetensors"), str(tmp_path / "out")], "holds no VAE: give it with --vae FILE"),
        ([str(flux), str(tmp_path / "out.safetensors"), "--no-t5"], "--no-t5: a Flux model needs its T5 encoder"),
        ([str(flux), str(tmp_path / "out.safetensors"), "--clip-g", str(sd3)], "--clip-g is SD3's second"),
        ([str(sd3), str(tmp_path / "out"), "--prediction-type", "epsilon"], "--prediction-type: for SD 1.x"),
        ([str(sd3), str(tmp_path / "out"), "--transformer-only"], "--transformer-only writes one .safetensors"),
        ([str(sd3), str(tmp_path / "out.safetensors"), "--t5", str(tmp_path / "nope")], "--t5 "),
        ([str(tmp_path / "shifted"), str(tmp_path / "out.safetensors")], "its scheduler has shift=6.0"),
        ([str(sd3), str(tmp_path / "out.safetensors"), "--dtype", "fp8"], "invalid choice"),
        ([str(sd3), str(tmp_path / "out"), "--no-t5", "--t5", str(sd3)], "--t5 and --no-t5"),
    ]
    for args, message in cases:
        try:
            code = main(["convert", *args])
        except SystemExit as e:  # argparse's own refusal (a --dtype it has no choice for)
            code = e.code
        assert code == 2, args
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()
