"""``sdengine convert`` of SD3 / SD3.5 and FLUX.1 models (sdengine.pipeline.dit_convert): diffusers folders <->
Stability's single files, BFL's transformer file and ComfyUI's all-in-one checkpoint. Round trips give equal tensors,
a converted model generates the same image through sdengine, diffusers loads a written folder, and what cannot be
done is one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import sdengine
from _flux_models import diffusers_flux, make_flux_folder
from _sd3_models import diffusers_sd3, make_sd3_folder, write_single_file
from sdengine.cli import main
from sdengine.pipeline.dit_convert import DiTConvertError, convert_dit

PROMPT = "a red apple on a table"
SIZE = 32


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    """A file's tensors, or a component folder's (CLIP names as transformers 4 wrote them: ``text_model.*``)."""
    if path.is_file():
        return load_file(path)
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    if (path / "config.json").is_file() and "CLIP" in (path / "config.json").read_text():
        out = {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in out.items()}
    return out


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:6]
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def _assert_same_folders(a: Path, b: Path, subs: tuple[str, ...]) -> None:
    for sub in subs:
        _assert_equal(_tensors(a / sub), _tensors(b / sub))


def _image(model: Path, **kw) -> np.ndarray:
    pipe = sdengine.load_pipeline(model, device="cpu", **kw)
    return pipe(PROMPT, steps=2, seed=3, width=SIZE, height=SIZE, progress=False).arrays


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return make_sd3_folder(tmp_path_factory.mktemp("sd3") / "tiny-sd35", sd35=True)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    return make_flux_folder(tmp_path_factory.mktemp("flux") / "tiny-flux-dev", guidance=True)


SD3_SUBS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
FLUX_SUBS = ("transformer", "vae", "text_encoder", "text_encoder_2")


# -- SD3 --------------------------------------------------------------------------------------------------------


def test_sd3_folder_to_stability_file_and_back_is_exact(sd3, tmp_path):
    """folder -> file: Stability's layout with CLIP-L, bigG and T5 (sd3_medium_incl_clips_t5xxlfp16's); file ->
    folder -> file: equal tensors; the folder's components equal the original folder's."""
    write_single_file(sd3, tmp_path / "reference.safetensors")
    convert_dit(sd3, tmp_path / "sd3.safetensors")
    _assert_equal(load_file(tmp_path / "sd3.safetensors"), load_file(tmp_path / "reference.safetensors"))
    convert_dit(tmp_path / "sd3.safetensors", tmp_path / "folder")
    _assert_same_folders(sd3, tmp_path / "folder", SD3_SUBS)
    convert_dit(tmp_path / "folder", tmp_path / "again.safetensors")
    _assert_equal(load_file(tmp_path / "again.safetensors"), load_file(tmp_path / "sd3.safetensors"))
    index = json.loads((tmp_path / "folder" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"
    sched = json.loads((tmp_path / "folder" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0


def test_sd3_converted_models_generate_the_same_image_and_the_folder_loads_in_diffusers(sd3, tmp_path):
    """The converted file generates what a Stability file of the same weights does, the folder made from it what
    the original folder does (bit for bit); a file and a folder differ by float rounding only."""
    convert_dit(sd3, tmp_path / "sd3.safetensors")
    convert_dit(tmp_path / "sd3.safetensors", tmp_path / "folder")
    write_single_file(sd3, tmp_path / "reference.safetensors")
    want, single = _image(sd3), _image(tmp_path / "sd3.safetensors")
    assert np.array_equal(single, _image(tmp_path / "reference.safetensors"))
    assert np.array_equal(_image(tmp_path / "folder"), want)
    assert np.abs(single - want).max() < 1e-5
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")
    theirs = diffusers_sd3(tmp_path / "folder")(PROMPT, generator=torch.Generator().manual_seed(3), **args).images
    ref = diffusers_sd3(sd3)(PROMPT, generator=torch.Generator().manual_seed(3), **args).images
    assert np.array_equal(theirs, ref)


def test_sd3_without_t5_and_text_encoders_given_apart(sd3, tmp_path):
    """--no-t5: sd3_medium_incl_clips' layout, and a folder whose model_index says null; a file without CLIP
    encoders (sd3_medium's) takes them from --clip-l / --clip-g."""
    convert_dit(sd3, tmp_path / "clips.safetensors", with_t5=False)
    keys = list(load_file(tmp_path / "clips.safetensors"))
    assert not any(k.startswith("text_encoders.t5xxl.") for k in keys)
    assert any(k.startswith("text_encoders.clip_g.") for k in keys)
    convert_dit(sd3, tmp_path / "no-t5", with_t5=False)
    index = json.loads((tmp_path / "no-t5" / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and not (tmp_path / "no-t5" / "text_encoder_3").exists()
    without = _image(tmp_path / "no-t5")
    assert np.abs(without - _image(tmp_path / "clips.safetensors")).max() < 1e-5  # folder vs file: rounding
    assert np.abs(without - _image(sd3)).max() > 1e-3  # T5 is really left out
    write_single_file(sd3, tmp_path / "bare.safetensors", clips=False, t5=False)
    with pytest.raises(DiTConvertError, match="holds no clip_l text encoder: give it with --clip-l"):
        convert_dit(tmp_path / "bare.safetensors", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    convert_dit(
        tmp_path / "bare.safetensors",
        tmp_path / "given",
        clip_l=sd3 / "text_encoder",
        clip_g=sd3 / "text_encoder_2",
        t5=sd3 / "text_encoder_3",
    )
    _assert_same_folders(sd3, tmp_path / "given", SD3_SUBS)


def test_sd3_transformer_only_and_fp16(sd3, tmp_path):
    from sdengine.weights.mmdit_file import read_mmdit

    convert_dit(sd3, tmp_path / "dm.safetensors", transformer_only=True)
    keys = list(load_file(tmp_path / "dm.safetensors"))
    assert keys and all(k.startswith(("joint_blocks.", "x_embedder.", "pos_embed", "t_embedder.", "y_embedder.",
                                      "context_embedder.", "final_layer.")) for k in keys)  # fmt: skip
    _, ours = read_mmdit(tmp_path / "dm.safetensors")
    _assert_equal(ours, _tensors(sd3 / "transformer"))
    convert_dit(sd3, tmp_path / "half", dtype="fp16")
    for sub in SD3_SUBS:
        a, b = _tensors(sd3 / sub), _tensors(tmp_path / "half" / sub)
        assert set(a) == set(b)
        floats = [k for k in a if a[k].is_floating_point()]
        assert all(b[k].dtype == torch.float16 and torch.equal(b[k], a[k].half()) for k in floats)


# -- Flux -------------------------------------------------------------------------------------------------------


def test_flux_folder_to_comfyui_checkpoint_and_bfl_file_and_back_is_exact(flux, tmp_path):
    from sdengine.weights.flux_file import diffusers_to_bfl

    convert_dit(flux, tmp_path / "flux1-dev-comfy.safetensors")
    keys = load_file(tmp_path / "flux1-dev-comfy.safetensors")
    prefixes = {k.split(".")[0] + "." + (k.split(".")[1] if k.startswith("text_encoders.") else "") for k in keys}
    assert prefixes == {"model.", "vae.", "text_encoders.clip_l", "text_encoders.t5xxl"}
    convert_dit(tmp_path / "flux1-dev-comfy.safetensors", tmp_path / "folder")
    _assert_same_folders(flux, tmp_path / "folder", FLUX_SUBS)
    convert_dit(flux, tmp_path / "flux1-dev.safetensors", transformer_only=True)
    bfl = diffusers_to_bfl(_tensors(flux / "transformer"))
    _assert_equal(load_file(tmp_path / "flux1-dev.safetensors"), {k: v.contiguous() for k, v in bfl.items()})
    convert_dit(tmp_path / "folder", tmp_path / "again.safetensors")
    _assert_equal(load_file(tmp_path / "again.safetensors"), load_file(tmp_path / "flux1-dev-comfy.safetensors"))


def test_flux_bfl_files_to_folder_generate_the_same_image_and_load_in_diffusers(flux, tmp_path):
    """BFL's flux1 file + ae / clip_l / t5xxl (the parts given apart) -> a folder equal to the original."""
    convert_dit(flux, tmp_path / "flux1.safetensors", transformer_only=True)
    convert_dit(flux, tmp_path / "comfy.safetensors")
    parts = dict(vae=flux / "vae", clip_l=flux / "text_encoder", t5=flux / "text_encoder_2")
    convert_dit(tmp_path / "flux1.safetensors", tmp_path / "folder", **parts)
    _assert_same_folders(flux, tmp_path / "folder", FLUX_SUBS)
    want = _image(flux)
    assert np.array_equal(_image(tmp_path / "folder"), want)
    for single in (_image(tmp_path / "comfy.safetensors"), _image(tmp_path / "flux1.safetensors", **parts)):
        assert np.abs(single - want).max() < 1e-5  # a file's weights vs a folder's: float rounding only
    args = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np")
    theirs = diffusers_flux(tmp_path / "folder")(PROMPT, generator=torch.Generator().manual_seed(3), **args).images
    ref = diffusers_flux(flux)(PROMPT, generator=torch.Generator().manual_seed(3), **args).images
    assert np.array_equal(theirs, ref)


# -- the command line -------------------------------------------------------------------------------------------


def test_cli_converts_sd3_and_flux_both_ways(sd3, flux, tmp_path, capsys):
    assert main(["convert", str(sd3), str(tmp_path / "sd3.safetensors"), "--no-t5"]) == 0
    assert main(["convert", str(tmp_path / "sd3.safetensors"), str(tmp_path / "sd3-folder")]) == 0
    assert not (tmp_path / "sd3-folder" / "text_encoder_3").exists()
    bfl = ["--transformer-only", "--dtype", "bf16"]
    assert main(["convert", str(flux), str(tmp_path / "flux1.safetensors"), *bfl]) == 0
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "flux1.safetensors").values())
    args = ["--vae", str(flux / "vae"), "--clip-l", str(flux / "text_encoder"), "--t5", str(flux / "text_encoder_2")]
    assert main(["convert", str(tmp_path / "flux1.safetensors"), str(tmp_path / "flux-folder"), *args]) == 0
    out = capsys.readouterr().out
    assert out.count("converted ") == 4
    assert _tensors(tmp_path / "flux-folder" / "transformer")["x_embedder.weight"].dtype == torch.bfloat16
    # an existing model folder is replaced as the SD convert replaces one; one holding other files is refused
    (tmp_path / "flux-folder" / "README.md").write_text("mine")
    assert main(["convert", str(tmp_path / "flux1.safetensors"), str(tmp_path / "flux-folder"), *args]) == 2
    assert (tmp_path / "flux-folder" / "README.md").read_text() == "mine"


def test_sd_models_refuse_the_dit_flags(tiny_sd1_folder, tmp_path, capsys):
    assert main(["convert", str(tiny_sd1_folder), str(tmp_path / "x.safetensors"), "--t5", "t5.safetensors"]) == 2
    assert "--t5: for SD3 / SD3.5 and FLUX.1 models only" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_a_float8_flux_file_is_written_in_bf16(flux, tmp_path):
    """sdengine writes no float8: a float8 transformer file (flux1-dev-fp8's) becomes bfloat16 weights equal to the
    float8 ones, as loading reads them."""
    from safetensors.torch import save_file

    convert_dit(flux, tmp_path / "flux1.safetensors", transformer_only=True)
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in load_file(tmp_path / "flux1.safetensors").items()}
    save_file(fp8, tmp_path / "flux1-fp8.safetensors")
    parts = dict(vae=flux / "vae", clip_l=flux / "text_encoder", t5=flux / "text_encoder_2")
    convert_dit(tmp_path / "flux1-fp8.safetensors", tmp_path / "back.safetensors", transformer_only=True, **parts)
    back = load_file(tmp_path / "back.safetensors")
    assert set(back) == set(fp8)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], fp8[k].to(torch.bfloat16)) for k in fp8)


def test_diffusers_single_file_loader_reads_the_sd3_file(sd3, tmp_path):
    """diffusers' ``from_single_file`` (its own Stability-layout reader) gives the folder's MMDiT and VAE from the
    written file. (Its pipeline loader takes CLIP's projection width for the hidden width, true of the real
    encoders, not of the tiny ones; Flux's transformer reader assumes FLUX.1's 3072 width: neither is run here.)"""
    import diffusers

    convert_dit(sd3, tmp_path / "sd3.safetensors")
    for cls, sub in ((diffusers.SD3Transformer2DModel, "transformer"), (diffusers.AutoencoderKL, "vae")):
        theirs = cls.from_single_file(str(tmp_path / "sd3.safetensors"), config=str(sd3), subfolder=sub)
        ref = cls.from_pretrained(sd3, subfolder=sub)
        _assert_equal(dict(theirs.state_dict()), dict(ref.state_dict()))


def test_a_scaled_float8_t5_file_is_multiplied_out_as_loading_does(flux, tmp_path):
    """ComfyUI's scaled float8 T5 (``scaled_fp8`` marker, ``scale_weight`` per Linear): the written encoder holds
    weight x scale in bf16, what sdengine's T5 loader computes from the file."""
    from safetensors.torch import save_file

    from sdengine.weights.t5_file import load_t5_encoder

    t5 = _tensors(flux / "text_encoder_2")
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}
    for k, v in t5.items():
        if k.endswith(".weight") and v.ndim == 2 and k != "shared.weight":
            scale = v.abs().max().float() / 448
            scaled[k] = (v / scale).to(torch.float8_e4m3fn)
            scaled[k[: -len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            scaled[k] = v
    save_file(scaled, tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    convert_dit(flux, tmp_path / "flux1.safetensors", transformer_only=True)
    parts = dict(vae=flux / "vae", clip_l=flux / "text_encoder", t5=tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors")
    convert_dit(tmp_path / "flux1.safetensors", tmp_path / "folder", **parts)
    written = _tensors(tmp_path / "folder" / "text_encoder_2")
    loaded = load_t5_encoder(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", dtype=torch.bfloat16).state_dict()
    assert set(written) == set(loaded)
    for k, v in loaded.items():
        assert torch.equal(written[k].to(v.dtype), v), k
    assert written["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.bfloat16
