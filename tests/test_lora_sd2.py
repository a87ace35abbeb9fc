"""LoRA on the SD2 layout (OpenCLIP-style text encoder with exact GELU, U-Net with Linear proj_in/proj_out): PEFT and
kohya files give diffusers' `load_lora_weights` outputs, layer by layer and as whole images."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_pipeline, diffusers_scheduler  # noqa: E402
from sdengine.weights.lora import apply_loras  # noqa: E402
from test_lora import (  # noqa: E402
    TOL,
    diffusers_load,
    diffusers_weights,
    make_lora,
    max_err,
    relaxed_peft_check,  # noqa: F401 - the fixture, used by name
    run_ours,
    run_ref,
    sdengine_models,
)
from test_weights_common import randomize, tiny_clip, tiny_unet  # noqa: E402

IMAGE_TOL = 1e-4  # mean abs on 0..1 pixels


def sd2_models():
    unet, te = randomize(tiny_unet("sd2"), 1).eval(), randomize(tiny_clip("sd2"), 2).eval()
    assert unet.config.use_linear_projection and te.config.hidden_act == "gelu"
    return unet, te


@pytest.fixture(scope="module")
def sd2_lora(tmp_path_factory):
    return make_lora(tmp_path_factory.mktemp("sd2-lora"), 20, models=sd2_models())


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_sd2_layer_outputs_match_diffusers(sd2_lora, fmt, relaxed_peft_check):  # noqa: F811
    ref_unet, ref_te = sd2_models()
    ours_unet, ours_te = sdengine_models(ref_unet, ref_te)
    base = run_ours(ours_unet, ours_te)
    diffusers_load(ref_unet, ref_te, sd2_lora[fmt], "a")
    diffusers_weights(ref_unet, ref_te, ["a"], [0.7])
    with apply_loras(ours_unet, ours_te, [(sd2_lora[fmt], 0.7)]) as handle:
        rep = handle.reports[0]
        assert rep.complete and rep.format == fmt
        assert any("proj_in" in m for m in rep.matched)  # the Linear projections of the SD2 layout
        ref, ours = run_ref(ref_unet, ref_te), run_ours(ours_unet, ours_te)
    err_unet, err_te = max_err(ref[0], ours[0]), max_err(ref[1], ours[1])
    print(f"SD2 {fmt}: max abs error U-Net {err_unet:.2e}, text encoder {err_te:.2e}")
    assert err_unet < TOL and err_te < TOL
    assert max_err(ours[0], base[0]) > 1e-3 and max_err(ours[1], base[1]) > 1e-3


@pytest.fixture(scope="module")
def sd2_pipeline_lora(tiny_sd2_folder, tmp_path_factory):
    """A LoRA made on the tiny SD2 pipeline's own U-Net and text encoder (diffusers writes the PEFT file)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd2_folder / "unet").eval()
    te = CLIPTextModel.from_pretrained(tiny_sd2_folder / "text_encoder").eval()
    return make_lora(tmp_path_factory.mktemp("sd2-pipe-lora"), 21, models=(unet, te))


@pytest.mark.parametrize("fmt", ["peft", "kohya"])
def test_sd2_images_match_diffusers_load_lora_weights(tiny_sd2_folder, sd2_pipeline_lora, fmt, relaxed_peft_check):  # noqa: F811
    path, weight, steps, seed = sd2_pipeline_lora[fmt], 0.8, 4, 9
    ref = diffusers_pipeline(tiny_sd2_folder, "sd2")
    ref.load_lora_weights(str(path), adapter_name="x")
    ref.set_adapters(["x"], [weight])
    ref.scheduler = diffusers_scheduler(tiny_sd2_folder, "euler")
    gen = torch.Generator("cpu").manual_seed(seed)
    kw = dict(num_inference_steps=steps, guidance_scale=7.0, width=32, height=32, output_type="np")
    theirs = ref("a red apple", negative_prompt="blurry", generator=gen, **kw).images
    pipe = sdengine.load_pipeline(tiny_sd2_folder, device="cpu")
    args = dict(steps=steps, sampler="euler", schedule="normal", cfg_scale=7.0, seed=seed, width=32, height=32)
    ours = pipe("a red apple", "blurry", loras=[(path, weight)], progress=False, **args).arrays
    plain = pipe("a red apple", "blurry", progress=False, **args).arrays
    err = float(np.abs(ours.astype(np.float64) - theirs).mean())
    print(f"SD2 {fmt} LoRA image: mean abs difference to diffusers {err:.2e}")
    assert err <= IMAGE_TOL
    assert float(np.abs(ours - plain).mean()) > 1e-3  # the LoRA changed the picture


def test_sd2_kohya_ldm_block_names_reach_the_same_layers(sd2_lora, tmp_path):
    """kohya files in LDM spelling (`lora_unet_input_blocks_1_1_proj_in`, as A1111-era tools write them) give
    the same SD2 outputs as the diffusers spelling."""
    from sdengine.weights import save_safetensors
    from sdengine.weights.lora import LoRAFile, unet_ldm_names

    ours_unet, ours_te = sdengine_models(*sd2_models())
    ldm = unet_ldm_names(ours_unet)
    renamed = {}
    for key, w in LoRAFile.load(sd2_lora["kohya"]).layers.items():
        if key.startswith("lora_unet_"):
            dotted = next(m for m in ldm if m.replace(".", "_") == key.removeprefix("lora_unet_"))
            key = "lora_unet_" + ldm[dotted].replace(".", "_")
        renamed[f"{key}.lora_down.weight"] = w.down
        renamed[f"{key}.lora_up.weight"] = w.up
        renamed[f"{key}.alpha"] = torch.tensor(w.alpha)
    assert any(k.startswith("lora_unet_input_blocks_1_1_proj_in") for k in renamed)  # a Linear projection
    path = tmp_path / "ldm-names.safetensors"
    save_safetensors(renamed, path)
    with apply_loras(ours_unet, ours_te, [(sd2_lora["kohya"], 0.9)]):
        expect = run_ours(ours_unet, ours_te)
    with apply_loras(ours_unet, ours_te, [(path, 0.9)]) as h:
        assert h.reports[0].complete
        got = run_ours(ours_unet, ours_te)
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])
