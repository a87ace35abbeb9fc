"""FLUX.2 [klein] single files: BFL's / ComfyUI's transformer file (the layout checked against diffusers' own
single-file conversion), ComfyUI's ``flux2-vae.safetensors`` (LDM names, checked against diffusers' LDM VAE
conversion), a Qwen3 file; the three files written from a tiny klein folder give the folder's image. The kind
(step-distilled or base) from the file's name or ``config=``; wrong or missing parts refused in one line."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from _flux2_models import FILE_TRANSFORMER, FILE_VAE, make_klein_folder  # noqa: E402
from sdengine.errors import GenerationError  # noqa: E402
from sdengine.pipeline import load_pipeline  # noqa: E402
from sdengine.weights.flux2_file import load_flux2_transformer, load_flux2_vae  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48

_DOUBLE = {  # diffusers' double-block module -> BFL's (written independently of sdengine's table)
    "attn.norm_q": "img_attn.norm.query_norm",
    "attn.norm_k": "img_attn.norm.key_norm",
    "attn.to_out.0": "img_attn.proj",
    "ff.linear_in": "img_mlp.0",
    "ff.linear_out": "img_mlp.2",
    "attn.norm_added_q": "txt_attn.norm.query_norm",
    "attn.norm_added_k": "txt_attn.norm.key_norm",
    "attn.to_add_out": "txt_attn.proj",
    "ff_context.linear_in": "txt_mlp.0",
    "ff_context.linear_out": "txt_mlp.2",
}
_SINGLE = {
    "attn.to_qkv_mlp_proj": "linear1",
    "attn.to_out": "linear2",
    "attn.norm_q": "norm.query_norm",
    "attn.norm_k": "norm.key_norm",
}
_TOP = {
    "x_embedder": "img_in",
    "context_embedder": "txt_in",
    "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",  # FLUX.2 [dev]'s
    "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
    "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
    "single_stream_modulation.linear": "single_stream_modulation.lin",
    "proj_out": "final_layer.linear",
}


def bfl_layout(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers' FLUX.2 transformer names -> BFL's (fused qkv, ``.scale`` norms, (shift, scale) final modulation)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        module, param = k.rsplit(".", 1)
        if module.startswith("transformer_blocks."):
            _, n, rest = module.split(".", 2)
            if rest in ("attn.to_k", "attn.to_v", "attn.add_k_proj", "attn.add_v_proj"):
                continue
            if rest in ("attn.to_q", "attn.add_q_proj"):
                names = ("to_q", "to_k", "to_v") if rest == "attn.to_q" else ("add_q_proj", "add_k_proj", "add_v_proj")
                fused = torch.cat([sd[f"transformer_blocks.{n}.attn.{x}.{param}"] for x in names])
                out[f"double_blocks.{n}.{'img' if rest == 'attn.to_q' else 'txt'}_attn.qkv.{param}"] = fused
                continue
            new = _DOUBLE[rest]
            out[f"double_blocks.{n}.{new}.{'scale' if 'norm' in new else param}"] = v
        elif module.startswith("single_transformer_blocks."):
            _, n, rest = module.split(".", 2)
            new = _SINGLE[rest]
            out[f"single_blocks.{n}.{new}.{'scale' if 'norm' in new else param}"] = v
        elif module == "norm_out.linear":
            scale, shift = v.chunk(2)
            out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
        else:
            out[f"{_TOP[module]}.{param}"] = v
    return {prefix + k: v.clone().contiguous() for k, v in out.items()}


def comfy_vae_layout(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' ``AutoencoderKLFlux2`` names -> ComfyUI's ``flux2-vae.safetensors`` (LDM names; the quant
    convolutions inside the encoder / decoder, as BFL's)."""
    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers

    rest = {k: v for k, v in vae_sd.items() if not k.startswith("bn.")}
    ldm, unknown = km.vae_diffusers_to_ldm(rest, vae_layout_from_diffusers(rest))
    assert not unknown, unknown
    out = {}
    for k, v in ldm.items():
        k = k.replace("post_quant_conv.", "decoder.post_quant_conv.") if k.startswith("post_quant_conv.") else k
        k = k.replace("quant_conv.", "encoder.quant_conv.") if k.startswith("quant_conv.") else k
        out[k] = v.clone().contiguous()
    out |= {k: v.clone() for k, v in vae_sd.items() if k.startswith("bn.")}
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(the klein folder, {part: file}) with the single files written from the folder's weights."""
    from safetensors.torch import load_file

    root = tmp_path_factory.mktemp("kleinfiles")
    folder = make_klein_folder(root / "klein", seed=3, distilled=True, transformer=FILE_TRANSFORMER, vae=FILE_VAE)
    net = load_file(next((folder / "transformer").glob("*.safetensors")))
    vae = load_file(next((folder / "vae").glob("*.safetensors")))
    te = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    out = {
        "transformer": root / "diffusion_models" / "flux-2-klein-4b.safetensors",
        "vae": root / "vae" / "flux2-vae.safetensors",
        "text": root / "text_encoders" / "qwen_3_4b.safetensors",
    }
    for p in out.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    save_file(bfl_layout(net, "model.diffusion_model."), out["transformer"])
    save_file(comfy_vae_layout(vae), out["vae"])
    save_file({k: v.contiguous() for k, v in te.items()}, out["text"])
    return folder, out, net, vae


def test_file_layouts_are_diffusers_and_load_as_the_folders(files) -> None:
    """The written layouts are what diffusers' own conversions read; sdengine reads back the folder's tensors and
    config."""
    from diffusers.loaders.single_file_utils import (
        convert_flux2_transformer_checkpoint_to_diffusers,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    folder, out, net, vae = files
    back = convert_flux2_transformer_checkpoint_to_diffusers(bfl_layout(net))
    assert back.keys() == net.keys() and all(torch.equal(back[k], net[k]) for k in net)
    comfy = load_file(out["vae"])
    ldm = {k.replace("encoder.quant_conv.", "quant_conv.").replace("decoder.post_quant_conv.", "post_quant_conv."): v
           for k, v in comfy.items() if not k.startswith("bn.")}  # fmt: skip
    back = convert_ldm_vae_checkpoint(ldm, {"down_block_types": [""] * 3, "up_block_types": [""] * 3})
    plain = {k: v for k, v in vae.items() if not k.startswith("bn.")}
    assert back.keys() == plain.keys() and all(torch.equal(back[k], plain[k].reshape(back[k].shape)) for k in plain)

    model = load_flux2_transformer(out["transformer"])
    want = load_flux2_transformer(folder)
    assert model.config == want.config and model.config.out_channels is None and not model.config.guidance_embeds
    assert all(torch.equal(v, want.state_dict()[k]) for k, v in model.state_dict().items())
    v_file, v_folder = load_flux2_vae(out["vae"]), load_flux2_vae(folder)
    assert v_file.config.sample_size == 1024  # the release's (the tiny folder says 64)
    assert dataclasses.replace(v_file.config, sample_size=64) == v_folder.config
    assert v_file.config.decoder_block_out_channels == (32, 32, 64)
    assert all(torch.equal(v, v_folder.state_dict()[k]) for k, v in v_file.state_dict().items())


def test_files_give_the_folders_image(files, tmp_path: Path) -> None:
    """flux-2-klein-4b.safetensors (distilled, by its name) with qwen_3_4b / flux2-vae / the tokenizer: the folder's
    image; a renamed base copy with config= a base folder: the base folder's image with CFG."""
    folder, out, _, _ = files
    parts = {"qwen_text": str(out["text"]), "vae": str(out["vae"]), "qwen_tokenizer": str(folder / "tokenizer")}
    pipe = load_pipeline(out["transformer"], device="cpu", **parts)
    want_pipe = load_pipeline(folder, device="cpu")
    assert pipe.distilled and pipe.family_defaults == want_pipe.family_defaults
    got = pipe(PROMPT, seed=4, width=W, height=H, steps=3, progress=False).images[0]
    want = want_pipe(PROMPT, seed=4, width=W, height=H, steps=3, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the same weights as a base model: the name says so (cfg 2.5 with a negative runs CFG)
    base = tmp_path / "flux-2-klein-base-4b.safetensors"
    base.symlink_to(out["transformer"])
    pipe = load_pipeline(base, device="cpu", **parts)
    assert not pipe.distilled and pipe.family_defaults["steps"] == 50
    cfg = dict(seed=4, width=W, height=H, steps=2, cfg_scale=2.5, progress=False)
    got = pipe(PROMPT, "blurry", **cfg).images[0]
    assert not np.array_equal(np.asarray(got), np.asarray(want))
    # a name that tells nothing takes config=: the folder's is_distilled and scheduler
    odd = tmp_path / "my_finetune.safetensors"
    odd.symlink_to(out["transformer"])
    pipe = load_pipeline(odd, device="cpu", config=str(folder), **parts)
    assert pipe.distilled


def test_file_refusals(files, tmp_path: Path) -> None:
    folder, out, _, _ = files
    parts = {"qwen_text": str(out["text"]), "vae": str(out["vae"]), "qwen_tokenizer": str(folder / "tokenizer")}
    odd = tmp_path / "my_finetune.safetensors"
    odd.symlink_to(out["transformer"])
    cases = [
        (odd, parts, "cannot tell a step-distilled FLUX.2 [klein] (4 steps, no CFG) from a base one"),
        (out["transformer"], {"vae": parts["vae"]}, "holds no Qwen3 text encoder: give it with --qwen-text"),
        (out["transformer"], {**parts, "vae": None}, "holds no VAE: give it with --vae"),
        (odd, {**parts, "config": str(tmp_path)}, "--config"),
        (out["transformer"], {**parts, "vae": str(out["text"])}, "not a VAE"),
        (out["transformer"], {**parts, "t5": str(out["text"])}, "--clip-l / --clip-g / --t5 do not apply"),
        (folder, {"qwen_text": str(out["text"])}, "--qwen-text does not apply to a FLUX.2 folder"),
    ]
    for model, kw, needle in cases:
        with pytest.raises(GenerationError) as e:
            load_pipeline(model, device="cpu", **{k: v for k, v in kw.items() if v is not None})
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    flux1 = tmp_path / "ae.safetensors"  # a VAE without the batch-norm statistics (FLUX.1's)
    from safetensors.torch import load_file

    save_file({k: v for k, v in load_file(out["vae"]).items() if not k.startswith("bn.")}, flux1)
    with pytest.raises(GenerationError, match=r"no bn.running_mean / bn.running_var: not a FLUX.2 VAE"):
        load_pipeline(out["transformer"], device="cpu", **{**parts, "vae": str(flux1)})


def test_cli_generate_with_the_files(files, tmp_path: Path) -> None:
    """``sdengine generate --model flux-2-klein-4b.safetensors --qwen-text ... --vae ... --qwen-tokenizer ...``: the
    folder's image (the PNG of the same pipeline call)."""
    from PIL import Image

    from sdengine.cli import main

    folder, out, _, _ = files
    args = ["generate", PROMPT, "--steps", "2", "--seed", "6", "--width", str(W), "--height", str(H), "--no-progress"]
    parts = ["--qwen-text", str(out["text"]), "--vae", str(out["vae"]), "--qwen-tokenizer", str(folder / "tokenizer")]
    assert main([*args, "--model", str(out["transformer"]), *parts, "--out", str(tmp_path / "file")]) == 0
    assert main([*args, "--model", str(folder), "--out", str(tmp_path / "folder")]) == 0
    (a,), (b,) = ([np.asarray(Image.open(p)) for p in (tmp_path / d).glob("*.png")] for d in ("file", "folder"))
    assert a.shape == (H, W, 3)
    np.testing.assert_array_equal(a, b)
