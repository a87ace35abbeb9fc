"""SDXL LoRAs (kohya lora_unet_ with LDM names, lora_te1_, lora_te2_; PEFT/diffusers text_encoder_2.) on a
tiny random SDXL folder: images equal diffusers' load_lora_weights."""

from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("peft")

import sdengine  # noqa: E402
from _pipeline_models import diffusers_scheduler  # noqa: E402
from _sdxl_models import diffusers_sdxl, make_sdxl_folder  # noqa: E402
from sdengine.weights import save_safetensors  # noqa: E402
from sdengine.weights.lora import LoRAError, apply_loras, unet_ldm_names  # noqa: E402

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj", "linear_1"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1"]
KW = dict(width=32, height=32, cfg_scale=5.0, seed=11, steps=4, sampler="euler", schedule="normal", progress=False)


@pytest.fixture
def relaxed_peft_check(monkeypatch):
    """transformers may ask for a newer peft than the one installed for its text-encoder LoRA path."""
    import transformers.integrations.peft as tp
    from packaging import version

    installed = importlib.metadata.version("peft")
    if version.parse(installed) < version.parse(tp.MIN_PEFT_VERSION):
        monkeypatch.setattr(tp, "MIN_PEFT_VERSION", installed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_sdxl_folder(tmp_path_factory.mktemp("sdxl-lora") / "tiny-sdxl")


def _peft_pairs(model, targets, seed: int, r: int, alpha: float) -> tuple[dict, dict]:
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    model.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False, target_modules=targets))
    sd = get_peft_model_state_dict(model)
    pairs = {}
    for k in sd:
        if k.endswith(".lora_A.weight"):
            mod = k.removesuffix(".lora_A.weight")
            pairs[mod] = (sd[k].clone(), sd[f"{mod}.lora_B.weight"].clone())
    return pairs, sd


def _write_kohya(folder, dst, ours_unet):
    """A kohya SDXL file as sd-scripts writes it: U-Net layers by LDM name, lora_te1_ / lora_te2_."""
    ref = diffusers_sdxl(folder)
    unet_pairs, _ = _peft_pairs(ref.unet, UNET_TARGETS, 1, 4, 2.0)
    te1_pairs, _ = _peft_pairs(ref.text_encoder, TE_TARGETS, 2, 4, 8.0)
    te2_pairs, _ = _peft_pairs(ref.text_encoder_2, TE_TARGETS, 3, 2, 1.0)
    ldm = unet_ldm_names(ours_unet)
    out = {}
    for prefix, pairs, alpha in (
        ("lora_unet_", {ldm[m]: p for m, p in unet_pairs.items()}, 2.0),
        ("lora_te1_text_model_", {m.removeprefix("text_model."): p for m, p in te1_pairs.items()}, 8.0),
        ("lora_te2_text_model_", {m.removeprefix("text_model."): p for m, p in te2_pairs.items()}, 1.0),
    ):
        for mod, (down, up) in pairs.items():
            name = prefix + mod.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
            out[f"{name}.alpha"] = torch.tensor(alpha)
    assert any(k.startswith("lora_unet_input_blocks_") for k in out)
    assert any(k.startswith("lora_unet_label_emb_0_0") for k in out)  # add_embedding.linear_1
    save_safetensors(out, dst)
    return dst


def test_kohya_sdxl_lora_matches_diffusers(folder, tmp_path, relaxed_peft_check):
    pipe = sdengine.load_pipeline(folder, device="cpu")
    path = _write_kohya(folder, tmp_path / "xl.safetensors", pipe.unet)
    base = pipe("a red apple", **KW).arrays
    got = pipe("a red apple", loras=[(path, 1.0)], **KW).arrays
    handle = apply_loras(pipe.unet, pipe.text_encoder, [(path, 1.0)], text_encoder_2=pipe.text_encoder_2)
    report = handle.reports[0]
    handle.remove()
    assert report.complete, report.summary()
    assert {m.split(":")[0] for m in report.matched} == {"unet", "text_encoder", "text_encoder_2"}
    ref = diffusers_sdxl(folder)
    ref.scheduler = diffusers_scheduler(folder, "euler")
    ref.load_lora_weights(str(path))
    theirs = ref(
        "a red apple",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(11),
    ).images
    err = float(np.abs(got - theirs).mean())
    effect = float(np.abs(got - base).mean())
    print(f"sdxl kohya LoRA vs diffusers load_lora_weights: mean abs {err:.2e} (LoRA effect {effect:.2e})")
    assert err < 1e-3 and effect > 1e-2


def test_sdxl_lora_on_an_sd1_model_is_still_refused(folder, tmp_path, tiny_sd1_folder):
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    xl = sdengine.load_pipeline(folder, device="cpu")
    path = _write_kohya(folder, tmp_path / "xl.safetensors", xl.unet)
    with pytest.raises(LoRAError, match="SDXL"):
        sd1("a red apple", loras=[(path, 1.0)], **KW)


def test_peft_sdxl_lora_written_by_diffusers_matches(folder, tmp_path, relaxed_peft_check):
    """A PEFT-format SDXL LoRA as diffusers' save_lora_weights writes it (unet., text_encoder., text_encoder_2.)."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    src = diffusers_sdxl(folder)
    metas = {}
    layers = {}
    for comp, model, targets, seed in (
        ("unet", src.unet, UNET_TARGETS, 4),
        ("text_encoder", src.text_encoder, TE_TARGETS, 5),
        ("text_encoder_2", src.text_encoder_2, TE_TARGETS, 6),
    ):
        _peft_pairs(model, targets, seed, 4, 4.0)
        layers[comp] = get_peft_model_state_dict(model)
        metas[comp] = model.peft_config["default"].to_dict()
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "peft",
        unet_lora_layers=layers["unet"],
        text_encoder_lora_layers=layers["text_encoder"],
        text_encoder_2_lora_layers=layers["text_encoder_2"],
        unet_lora_adapter_metadata=metas["unet"],
        text_encoder_lora_adapter_metadata=metas["text_encoder"],
        text_encoder_2_lora_adapter_metadata=metas["text_encoder_2"],
    )
    path = tmp_path / "peft" / "pytorch_lora_weights.safetensors"
    pipe = sdengine.load_pipeline(folder, device="cpu")
    handle = apply_loras(pipe.unet, pipe.text_encoder, [(path, 1.0)], text_encoder_2=pipe.text_encoder_2)
    report = handle.reports[0]
    handle.remove()
    assert report.complete, report.summary()
    assert {m.split(":")[0] for m in report.matched} == {"unet", "text_encoder", "text_encoder_2"}
    got = pipe("a red apple", loras=[(path, 0.8)], **KW).arrays
    ref = diffusers_sdxl(folder)
    ref.scheduler = diffusers_scheduler(folder, "euler")
    ref.load_lora_weights(str(path), adapter_name="a")
    ref.set_adapters(["a"], adapter_weights=[0.8])
    theirs = ref(
        "a red apple",
        num_inference_steps=4,
        guidance_scale=5.0,
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(11),
    ).images
    err = float(np.abs(got - theirs).mean())
    print(f"sdxl PEFT LoRA (weight 0.8) vs diffusers load_lora_weights + set_adapters: mean abs {err:.2e}")
    assert err < 1e-3


def test_comfyui_lora_loader_applies_an_sdxl_lora_in_two_parts(folder, tmp_path, relaxed_peft_check):
    """ComfyUI's LoraLoader adapts the U-Net when sampling and both text encoders when encoding; each part once
    failed on SDXL ("a LoRA for SDXL; the model is a custom model": a U-Net given alone was not seen as SDXL,
    and the CLIP part never passed the second encoder). Together they give the pipeline's LoRA image."""
    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.pipeline.request import GenerationRequest
    from sdengine.server.comfy.nodes import ClipHandle, RunContext, clip_text_encode

    pipe = sdengine.load_pipeline(folder, device="cpu")
    path = _write_kohya(folder, tmp_path / "xl.safetensors", pipe.unet)
    req = GenerationRequest(prompt="a red apple", negative_prompt="blurry", loras=[(path, 1.0)], **KW)
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    with torch.inference_mode():
        want = pipe.sample_latents(pipe.prepare(req.replace(loras=None)))  # the base image's latents
        clip = ClipHandle("x", loras=((str(path), 1.0),))  # LoraLoader's CLIP: both prompts are encoded with it
        (pos,) = clip_text_encode(ctx, "a red apple", clip)[0]
        (neg_lora,) = clip_text_encode(ctx, "blurry", clip)[0]  # (an empty one: zeros in the pipeline, not ComfyUI)
        neg = encode_text(pipe, "blurry")
        empty = torch.zeros(1, 4, 16, 16)
        args = {"seed": KW["seed"], "steps": KW["steps"], "cfg": KW["cfg_scale"], "sampler": "euler"}
        got = sample_latents(pipe, [pos], [neg_lora], empty, schedule="normal", loras=[(str(path), 1.0)], **args)
        plain = sample_latents(pipe, [encode_text(pipe, "a red apple")], [neg], empty, schedule="normal", **args)
        handle = apply_loras(pipe.unet, pipe.text_encoder, [(path, 1.0)], text_encoder_2=pipe.text_encoder_2)
        try:
            want_lora = pipe.sample_latents(pipe.prepare(req.replace(loras=None)))  # the whole LoRA, at once
        finally:
            handle.remove()
    assert float((plain - want).abs().max()) < 1e-5  # without the LoRA: the pipeline's latents
    assert float((got - plain).abs().mean()) > 1e-3  # the LoRA acts
    assert float((got - want_lora).abs().max()) < 1e-4  # and in two parts it is the pipeline's LoRA


@pytest.mark.slow  # about 5 s: the kohya file is made with diffusers' SDXL and PEFT
def test_comfyui_layout_sdxl_lora_equals_the_kohya_file(folder, tmp_path):
    """An SDXL LoRA in ComfyUI's own layout (`diffusion_model.<LDM name>`, `text_encoders.clip_l.transformer.` and
    `text_encoders.clip_g.transformer.`, fp16, kohya part names) gives the kohya file's image (which equals
    diffusers', above): all three parts found, the second encoder's by its clip_g name."""
    from sdengine.weights.lora import LoRAFile

    pipe = sdengine.load_pipeline(folder, device="cpu")
    kohya = _write_kohya(folder, tmp_path / "xl.safetensors", pipe.unet)
    names = {"lora_unet_" + d.replace(".", "_"): "diffusion_model." + d for d in unet_ldm_names(pipe.unet).values()}
    for prefix, clip, te in (("lora_te1_", "clip_l", pipe.text_encoder), ("lora_te2_", "clip_g", pipe.text_encoder_2)):
        for n, _ in te.named_modules():
            full = n if n.startswith("text_model.") else f"text_model.{n}"
            names[prefix + full.replace(".", "_")] = f"text_encoders.{clip}.transformer.{full}"
    comfy, same = {}, {}
    for key, w in LoRAFile.load(kohya).layers.items():
        for part, t in (("lora_down.weight", w.down), ("lora_up.weight", w.up), ("alpha", torch.tensor(w.alpha))):
            comfy[f"{names[key]}.{part}"] = same[f"{key}.{part}"] = t.half()
    assert any(k.startswith("text_encoders.clip_g.") for k in comfy)
    save_safetensors(comfy, tmp_path / "comfy.safetensors")
    save_safetensors(same, tmp_path / "kohya16.safetensors")
    handle = apply_loras(
        pipe.unet, pipe.text_encoder, [(tmp_path / "comfy.safetensors", 1.0)], text_encoder_2=pipe.text_encoder_2
    )
    report = handle.reports[0]
    handle.remove()
    assert report.complete, report.summary()
    assert {m.split(":")[0] for m in report.matched} == {"unet", "text_encoder", "text_encoder_2"}
    got = pipe("a red apple", loras=[(tmp_path / "comfy.safetensors", 1.0)], **KW).arrays
    want = pipe("a red apple", loras=[(tmp_path / "kohya16.safetensors", 1.0)], **KW).arrays
    base = pipe("a red apple", **KW).arrays
    assert np.array_equal(got, want) and float(np.abs(got - base).mean()) > 1e-2
