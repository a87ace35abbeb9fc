"""LoRAs on Chroma against diffusers, on the tiny random Chroma pipeline of ``tests/_chroma_models.py``.

One random LoRA is written in three vocabularies: diffusers' names (``transformer.transformer_blocks.0.attn.to_q``
and ``text_encoder.`` for T5, ``lora_A`` / ``lora_B``: ai-toolkit, SimpleTuner), ComfyUI's BFL names
(``diffusion_model.double_blocks.0.img_attn.qkv``, ``text_encoders.t5xxl.transformer.``) and kohya's
(``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_te3_``, with ``alpha``). The fused layers' LoRA is the same
change as one per part with the same ``down`` and the part's rows of ``up``, so the three files are one LoRA.
Oracle: diffusers' ``ChromaPipeline.load_lora_weights`` on the diffusers-named file's transformer layers (its
text mask made boolean: diffusers 0.42 issue #12116, see docs/chroma.md), its T5 with the T5 layers' update
written into the weights (diffusers 0.42's loader reads T5 layers of no name: its text-encoder converter knows
CLIP's only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sdengine  # noqa: E402
from _chroma_models import bool_masked_embeds, diffusers_chroma, make_chroma_folder  # noqa: E402
from sdengine.cli import main  # noqa: E402
from sdengine.weights.io import load_safetensors, save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAFileError, apply_loras  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED, STEPS = 3, 3
W, H = 48, 32
RANK, ALPHA = 4, 2.0  # kohya's alpha: the update is alpha / rank * up @ down

# BFL name -> the diffusers modules whose outputs its rows are, in order (the tiny model: one double block, two
# single blocks, a two-layer approximator)
TRANSFORMER = {
    "double_blocks.0.img_attn.qkv": [f"transformer_blocks.0.attn.to_{p}" for p in "qkv"],
    "double_blocks.0.txt_attn.qkv": [f"transformer_blocks.0.attn.add_{p}_proj" for p in "qkv"],
    "double_blocks.0.img_attn.proj": ["transformer_blocks.0.attn.to_out.0"],
    "double_blocks.0.txt_mlp.0": ["transformer_blocks.0.ff_context.net.0.proj"],
    "double_blocks.0.img_mlp.2": ["transformer_blocks.0.ff.net.2"],
    "single_blocks.1.linear1": [*(f"single_transformer_blocks.1.attn.to_{p}" for p in "qkv"),
                                "single_transformer_blocks.1.proj_mlp"],
    "single_blocks.0.linear2": ["single_transformer_blocks.0.proj_out"],
    "distilled_guidance_layer.in_proj": ["distilled_guidance_layer.in_proj"],
    "distilled_guidance_layer.layers.1.in_layer": ["distilled_guidance_layer.layers.1.linear_1"],
    "distilled_guidance_layer.layers.0.out_layer": ["distilled_guidance_layer.layers.0.linear_2"],
    "img_in": ["x_embedder"],
    "final_layer.linear": ["proj_out"],
}  # fmt: skip
T5_LAYERS = ["encoder.block.0.layer.0.SelfAttention.q", "encoder.block.1.layer.1.DenseReluDense.wi_1"]


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):
    folder = make_chroma_folder(tmp_path_factory.mktemp("chroma") / "tiny-chroma")
    return folder, sdengine.load_pipeline(folder, device="cpu")


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _lora_files(pipe, dst: Path) -> dict[str, Path]:
    """The one random LoRA (transformer and T5 layers) as diffusers', ComfyUI's and kohya's files."""
    modules = dict(pipe.transformer.named_modules())
    t5 = dict(pipe.text_encoder.named_modules())
    g = torch.Generator().manual_seed(11)
    diffusers_sd, comfy, kohya = {}, {}, {}
    layers = [(bfl, [modules[m] for m in parts], parts, "transformer.") for bfl, parts in TRANSFORMER.items()]
    layers += [(name, [t5[name]], [name], "text_encoder.") for name in T5_LAYERS]
    for bfl, mods, parts, prefix in layers:
        down = torch.randn(RANK, mods[0].in_features, generator=g) * 0.3 / mods[0].in_features ** 0.5
        up = torch.randn(sum(m.out_features for m in mods), RANK, generator=g) * 0.3
        start = 0
        for m, part in zip(mods, parts, strict=True):
            rows = up[start : start + m.out_features] * (ALPHA / RANK)
            start += m.out_features
            diffusers_sd[f"{prefix}{part}.lora_A.weight"] = down.clone()
            diffusers_sd[f"{prefix}{part}.lora_B.weight"] = rows.contiguous()
        if prefix == "text_encoder.":
            c, k = f"text_encoders.t5xxl.transformer.{bfl}", "lora_te3_" + bfl.replace(".", "_")
        else:
            c, k = f"diffusion_model.{bfl}", "lora_unet_" + bfl.replace(".", "_")
        comfy[f"{c}.lora_A.weight"], comfy[f"{c}.lora_B.weight"] = down.clone(), up * (ALPHA / RANK)
        kohya[f"{k}.lora_down.weight"], kohya[f"{k}.lora_up.weight"] = down.clone(), up.clone()
        kohya[f"{k}.alpha"] = torch.tensor(ALPHA)
    dst.mkdir(exist_ok=True)
    out = {}
    for name, sd in (("diffusers", diffusers_sd), ("comfy", comfy), ("kohya", kohya)):
        out[name] = dst / f"chroma-{name}.safetensors"
        save_safetensors(sd, out[name])
    return out


def _ours(pipe, prompt: str = PROMPT, **kw) -> np.ndarray:
    args = dict(negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, width=W, height=H, progress=False)
    return pipe(prompt, **{**args, **kw}).arrays


def test_chroma_lora_matches_diffusers_and_every_naming_is_the_same_lora(chroma, tmp_path):
    """A LoRA on the transformer (fused qkv / linear1 split by rows, the approximator, the embedders) and on T5:
    the image equals diffusers' ChromaPipeline with ``load_lora_weights``; ComfyUI's and kohya's names of the same
    LoRA give the same image; after the call the model is its own again."""
    folder, pipe = chroma
    files = _lora_files(pipe, tmp_path / "loras")
    plain = _ours(pipe)
    ours = {name: _ours(pipe, loras=[(path, 1.0)]) for name, path in files.items()}
    ref = diffusers_chroma(folder)
    sd = load_safetensors(files["diffusers"])
    ref.load_lora_weights({k: v for k, v in sd.items() if k.startswith("transformer.")}, adapter_name="chroma")
    # diffusers 0.42 reads no T5 layers (its text-encoder converter knows CLIP's names only): their update is
    # written into its T5's weights, W + up @ down
    with torch.no_grad():
        for name in T5_LAYERS:
            w = ref.text_encoder.get_submodule(name).weight
            w += sd[f"text_encoder.{name}.lora_B.weight"] @ sd[f"text_encoder.{name}.lora_A.weight"]
    theirs = ref(
        output_type="np",
        num_inference_steps=STEPS,
        height=H,
        width=W,
        generator=torch.Generator().manual_seed(SEED),
        **bool_masked_embeds(ref, PROMPT, NEGATIVE),
    ).images
    mad = _mad(ours["diffusers"], theirs)
    print(f"chroma LoRA (diffusers names) vs diffusers ChromaPipeline.load_lora_weights: mean abs {mad:.2e}")
    assert mad < TOL, mad
    assert _mad(ours["diffusers"], plain) > 1e-3  # the LoRA changed the image
    for name in ("comfy", "kohya"):
        mad = _mad(ours[name], ours["diffusers"])
        print(f"chroma LoRA ({name} names) vs diffusers names: mean abs {mad:.2e}")
        assert mad < 1e-6, (name, mad)
    np.testing.assert_array_equal(_ours(pipe), plain)  # unfused after the call
    for path in files.values():  # every layer found its module: nothing unmatched, T5's included
        with apply_loras(pipe.transformer, pipe.text_encoder, [(path, 1.0)], text_encoder_2=pipe.text_encoder) as h:
            assert h.reports[0].unmatched == [] and h.reports[0].complete
            assert sorted(m for m in h.reports[0].matched if m.startswith("text_encoder")) == [
                f"text_encoder:{name}" for name in T5_LAYERS
            ]


def test_chroma_lora_tag_and_cli(chroma, tmp_path):
    """``<lora:NAME:W>`` in the prompt equals ``loras=[(file, W)]`` (the infotext names it and its hash);
    ``sdengine generate --lora FILE:W`` writes
    that image (within PNG rounding); a tag naming no file is a one-line error."""
    folder, pipe = chroma
    files = _lora_files(pipe, tmp_path / "loras")
    want = _ours(pipe, loras=[(files["kohya"], 0.7)])
    args = dict(negative_prompt=NEGATIVE, steps=STEPS, seed=SEED, width=W, height=H, progress=False)
    tagged = pipe(f"{PROMPT} <lora:chroma-kohya:0.7>", lora_dir=tmp_path / "loras", **args)
    np.testing.assert_allclose(tagged.arrays, want, atol=1e-6)
    assert "Lora hashes: " in tagged.infotexts[0] and "<lora:chroma-kohya:0.7>" in tagged.infotexts[0]
    with pytest.raises(LoRAFileError, match="LoRA 'nope' not found in"):
        _ours(pipe, prompt="a <lora:nope:1>", lora_dir=tmp_path / "loras")
    from PIL import Image

    out = tmp_path / "a.png"
    args = ["generate", "--model", str(folder), PROMPT, "--negative", NEGATIVE, "--steps", str(STEPS)]
    args += ["--seed", str(SEED), "--width", str(W), "--height", str(H), "--out", str(out), "--no-progress"]
    assert main([*args, "--lora", f"{files['diffusers']}:0.7"]) == 0
    got = np.asarray(Image.open(out), dtype=np.float32) / 255
    assert _mad(got, want[0]) < 1.0 / 255


def _flux_and_chroma():
    from sdengine.models.chroma import ChromaConfig, ChromaTransformer
    from sdengine.models.flux import FluxConfig, FluxTransformer

    common = dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2, in_channels=16,
                  joint_attention_dim=32, axes_dims_rope=(4, 6, 6))  # fmt: skip
    flux = FluxTransformer(FluxConfig(**common, pooled_projection_dim=24, guidance_embeds=True)).eval()
    chroma = ChromaTransformer(
        ChromaConfig(**common, approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=2)
    ).eval()
    return flux, chroma


@pytest.mark.parametrize(
    "layer",
    ["lora_unet_double_blocks_0_img_mod_lin", "diffusion_model.single_blocks.0.modulation.lin",
     "transformer.transformer_blocks.0.norm1.linear", "lora_unet_time_in_in_layer"],
)  # fmt: skip
def test_a_flux_lora_with_layers_chroma_lacks_is_refused(layer, tmp_path):
    """A Flux.1 LoRA naming a modulation linear or an embedder Chroma does not have: one line naming the layer,
    nothing applied. The same file without that layer applies (Chroma's blocks are Flux's)."""
    flux, chroma = _flux_and_chroma()
    before = {k: v.clone() for k, v in chroma.state_dict().items()}
    sd = {
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.randn(RANK, 32),
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.randn(32, RANK),
    }
    path = tmp_path / "ok.safetensors"
    save_safetensors(sd, path)
    with apply_loras(chroma, None, [(path, 1.0)]) as h:
        assert h.reports[0].matched == ["unet:transformer_blocks.0.attn.to_out.0"]
    flux_mod = flux.get_submodule("transformer_blocks.0.norm1.linear")
    down, up = ("lora_A", "lora_B") if "." in layer else ("lora_down", "lora_up")
    sd[f"{layer}.{down}.weight"] = torch.randn(RANK, 32)
    sd[f"{layer}.{up}.weight"] = torch.randn(flux_mod.out_features, RANK)
    save_safetensors(sd, path)
    with pytest.raises(LoRAFileError, match=f"a LoRA for Flux.1: it adapts {layer}, a layer Chroma does not have"):
        apply_loras(chroma, None, [(path, 1.0)])
    for k, v in chroma.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_chroma_lora_on_flux_and_sd3_is_refused(tmp_path):
    """A LoRA with Chroma's approximator layers (``distilled_guidance_layer``) on Flux.1 is refused as Chroma's;
    an SD3 LoRA (``joint_blocks``) on Chroma as SD3's."""
    flux, chroma = _flux_and_chroma()
    sd = {
        "diffusion_model.distilled_guidance_layer.in_proj.lora_A.weight": torch.randn(RANK, 16),
        "diffusion_model.distilled_guidance_layer.in_proj.lora_B.weight": torch.randn(32, RANK),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_A.weight": torch.randn(RANK, 32),
        "diffusion_model.double_blocks.0.img_attn.proj.lora_B.weight": torch.randn(32, RANK),
    }
    path = tmp_path / "chroma.safetensors"
    save_safetensors(sd, path)
    with pytest.raises(LoRAFileError, match="a LoRA for Chroma; the model is Flux.1"):
        apply_loras(flux, None, [(path, 1.0)])
    with apply_loras(chroma, None, [(path, 1.0)]) as h:
        assert sorted(h.reports[0].matched) == [
            "unet:distilled_guidance_layer.in_proj",
            "unet:transformer_blocks.0.attn.to_out.0",
        ]
    sd3 = {
        "lora_unet_joint_blocks_0_x_block_attn_proj.lora_down.weight": torch.randn(RANK, 32),
        "lora_unet_joint_blocks_0_x_block_attn_proj.lora_up.weight": torch.randn(32, RANK),
    }
    save_safetensors(sd3, path)
    with pytest.raises(LoRAFileError, match=r"a LoRA for SD3 \(MMDiT\); the model is Chroma"):
        apply_loras(chroma, None, [(path, 1.0)])
