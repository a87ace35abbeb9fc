"""ComfyUI's ModelMergeBlocks / ModelMergeSD1 / ModelMergeSDXL, ModelSave / CLIPSave / VAESave and
SamplerLCMUpscale: the pure rules through their functions (block ratios, the LCM upscale loop re-derived in float64
on a toy denoiser), the nodes through a live server's /prompt on tiny random SD 1.x single files.

References are written here from ComfyUI's rules, not from the code under test: a merged weight is
``W1 * ratio + (1 - ratio) * W2`` (``add_patches(.., 1 - ratio, ratio)``: ratio is model1's share) with the ratio of
the longest ComfyUI input name that prefixes the weight's LDM name (the first input's otherwise); the saved files hold
ComfyUI's keys (``model.diffusion_model.*``; transformers' ``text_model.*`` per text encoder; the LDM VAE without
``first_stage_model.``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _comfy_live import live_client, prompt_image, run_prompt
from _live_server import server_config
from _sdxl_models import make_sdxl_folder
from sdengine.server.comfy.nodes import NodeError, SamplerChoice
from sdengine.server.comfy.nodes_merge import (
    BLOCK_INPUTS,
    SD1_BLOCK_INPUTS,
    SDXL_BLOCK_INPUTS,
    block_ratio,
    unet_ldm_names,
)
from sdengine.server.comfy.nodes_sampling import lcm_upscale_loop, lcm_upscales, sampler_lcm_upscale
from sdengine.weights import convert, load_file, save_safetensors
from sdengine.weights.io import safetensors_metadata
from sdengine.weights.loading import build_vae, load_checkpoint, load_checkpoint_vae, load_vae

UNET, TE, VAE = "model.diffusion_model.", "cond_stage_model.transformer.", "first_stage_model."
SEED = 7

# ------------------------------------------------------------------------------------------ block ratio rule


def _comfy_blocks_ratio(k: str, input: float, middle: float, out: float) -> float:
    """ModelMergeBlocks written out for its three inputs: "out" prefixes output_blocks.* and out.*."""
    if k.startswith("middle"):
        return middle
    if k.startswith("out"):
        return out
    return input  # input_blocks.*, and time_embed.* / label_emb.* by the first input's default


@pytest.mark.parametrize(
    "key",
    [
        "input_blocks.0.0.weight",
        "input_blocks.4.1.proj_in.weight",
        "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        "output_blocks.11.1.norm.bias",
        "out.0.weight",
        "out.2.bias",
        "time_embed.0.weight",
        "label_emb.0.0.weight",
    ],
)
def test_model_merge_blocks_ratio_is_comfyuis_prefix_rule(key):
    blocks = tuple(zip(BLOCK_INPUTS, (0.2, 0.5, 0.8), strict=True))
    assert block_ratio(key, blocks) == _comfy_blocks_ratio(key, 0.2, 0.5, 0.8)


def test_sd1_and_sdxl_block_ratios_take_the_longest_prefix():
    ratios = {name: i / 100 for i, name in enumerate(SD1_BLOCK_INPUTS)}
    blocks = tuple(ratios.items())
    assert block_ratio("input_blocks.1.0.in_layers.0.weight", blocks) == ratios["input_blocks.1."]
    assert block_ratio("input_blocks.10.0.in_layers.0.weight", blocks) == ratios["input_blocks.10."]
    assert block_ratio("output_blocks.11.0.skip_connection.weight", blocks) == ratios["output_blocks.11."]
    assert block_ratio("out.2.weight", blocks) == ratios["out."]
    assert block_ratio("label_emb.0.2.bias", blocks) == ratios["label_emb."]
    assert block_ratio("something_else.weight", blocks) == ratios["time_embed."]  # the first input: the default
    xl = {name: i / 100 for i, name in enumerate(SDXL_BLOCK_INPUTS)}
    assert block_ratio("input_blocks.8.0.in_layers.2.weight", tuple(xl.items())) == xl["input_blocks.8"]
    assert len(SD1_BLOCK_INPUTS) == 2 + 12 + 3 + 12 + 1 and len(SDXL_BLOCK_INPUTS) == 2 + 9 + 3 + 9 + 1


# ------------------------------------------------------------------------------------------ LCM upscale loop


def _resize(x: torch.Tensor, w: int, h: int, method: str) -> torch.Tensor:
    if method in ("bilinear", "bicubic"):
        return F.interpolate(x, size=(h, w), mode=method, align_corners=False)
    return F.interpolate(x, size=(h, w), mode=method)


def _comfy_lcm_upscale(model, x, sigmas, total_upscale, upscale_steps, method, noises):
    """ComfyUI's sample_lcm_upscale, re-derived (upscale_steps None: the default), its noise from ``noises``."""
    if upscale_steps is None:
        upscale_steps = max(len(sigmas) // 2 + 1, 2)
    else:
        upscale_steps = min(upscale_steps + 1, len(sigmas) + 1)
    upscales = np.linspace(1.0, total_upscale, upscale_steps)[1:]
    h, w = x.shape[-2:]
    for i in range(len(sigmas) - 1):
        x = model(x, sigmas[i])
        if i < len(upscales):
            x = _resize(x, round(w * upscales[i]), round(h * upscales[i]), method)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noises[i][..., : x.shape[-2], : x.shape[-1]]
    return x


def _toy(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """A denoiser with an x0 that depends on x and sigma nonlinearly."""
    return torch.tanh(x) / (1.0 + sigma**2) + 0.05 * sigma * x.mean(dim=(2, 3), keepdim=True)


@pytest.mark.parametrize(
    ("total", "steps", "method"),
    [(2.0, -1, "bilinear"), (1.5, 1, "nearest-exact"), (1.7, 1000, "bicubic"), (0.5, 2, "area"), (1.0, -1, "area")],
)
def test_lcm_upscale_loop_is_comfyuis_in_float64(total, steps, method):
    sigmas = [14.6, 6.1, 2.4, 0.9, 0.3, 0.0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 6, generator=g, dtype=torch.float64) * sigmas[0]
    noises = [torch.randn(2, 4, 40, 40, generator=g, dtype=torch.float64) for _ in sigmas]
    want = _comfy_lcm_upscale(_toy, x, sigmas, total, None if steps < 0 else steps, method, noises)
    seen = []

    def denoise(z: torch.Tensor, i: int) -> torch.Tensor:
        seen.append((i, tuple(z.shape)))
        return _toy(z, sigmas[i])

    got = lcm_upscale_loop(
        denoise, x, sigmas, total, steps, method, lambda shape, i: noises[i][..., : shape[-2], : shape[-1]]
    )
    assert got.dtype == torch.float64 and got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert [i for i, _ in seen] == list(range(len(sigmas) - 1))
    k = max(len(sigmas) // 2 + 1, 2) if steps < 0 else min(steps + 1, len(sigmas) + 1)
    last = np.linspace(1.0, total, k)[1:][: len(sigmas) - 1][-1]  # the last scale a step applies
    assert tuple(got.shape[-2:]) == (round(8 * last), round(6 * last))


def test_lcm_upscales_follow_comfyuis_step_count():
    assert lcm_upscales(6, 2.0, -1) == pytest.approx([4 / 3, 5 / 3, 2.0])  # max(6 // 2 + 1, 2) = 4 points
    assert lcm_upscales(6, 2.0, 1) == [2.0]  # at the first step
    assert len(lcm_upscales(6, 2.0, 1000)) == 6  # at most len(sigmas) + 1 points
    assert lcm_upscales(2, 3.0, -1) == [3.0]  # max(2, 2)


def test_sampler_lcm_upscale_node_gives_its_settings_and_refuses_bad_ones():
    (s,) = sampler_lcm_upscale(None, 1.5, 3, "bislerp")
    assert isinstance(s, SamplerChoice) and s.name == "lcm_upscale"
    assert dict(s.options) == {"total_upscale": 1.5, "upscale_steps": 3, "upscale_method": "bislerp"}
    for bad in ((1.5, 3, "lanczos"), (0.0, 3, "area"), (math.nan, 3, "area"), (1.5, -2, "area")):
        with pytest.raises(NodeError, match="SamplerLCMUpscale"):
            sampler_lcm_upscale(None, *bad)


# --------------------------------------------------------------------------------------------- live server


def _perturbed(src: Path, dst: Path, seed: int, scale: float = 0.05) -> Path:
    sd, meta = load_file(src)
    g = torch.Generator().manual_seed(seed)
    out = {
        k: v + torch.randn(v.shape, generator=g).to(v.dtype) * scale if v.is_floating_point() else v
        for k, v in sd.items()
    }
    save_safetensors(out, dst, metadata=meta)
    return dst


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_file(path)[0].items()}


@pytest.fixture(scope="module")
def env(tiny_sd1_folder, tiny_sd2_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_save_merge")
    models = tmp / "models"
    models.mkdir()
    a = convert(tiny_sd1_folder, models / "a.safetensors")
    b = _perturbed(a, models / "b.safetensors", 1)
    convert(tiny_sd2_folder, models / "sd2.safetensors")
    xl = convert(make_sdxl_folder(tmp / "tiny-sdxl"), models / "xl.safetensors")
    _perturbed(xl, models / "xl_b.safetensors", 3)
    ta, tb = _tensors(a), _tensors(b)
    # the reference of ModelMergeBlocks(a, b, input=0.2, middle=0.5, out=0.8), written from ComfyUI's rule
    ref = dict(ta)
    for k in ta:
        if k.startswith(UNET) and ta[k].is_floating_point():
            r = _comfy_blocks_ratio(k.removeprefix(UNET), 0.2, 0.5, 0.8)
            ref[k] = ta[k] * r + (1.0 - r) * tb[k]
    save_safetensors(ref, models / "ref_blocks.safetensors", metadata=safetensors_metadata(a))
    config = server_config(tmp, models_dir=models, model="a", max_queue=8)
    with live_client(config, timeout=300) as (_, client):
        yield {"client": client, "tmp": tmp, "models": models, "t": (ta, tb)}


def _graph(model: list[Any], ckpt: str = "a", vae: list[Any] | None = None) -> dict[str, Any]:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": SEED,
                "steps": 3,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": model,
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },  # fmt: skip
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae or ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "savemerge", "images": ["8", 0]}},
    }


def _blocks(model1: list[Any], model2: list[Any], **ratios: float) -> dict[str, Any]:
    return {"class_type": "ModelMergeBlocks", "inputs": {"model1": model1, "model2": model2, **ratios}}


def _ok(h: dict) -> None:
    assert h["status"]["status_str"] == "success", h["status"]


def _only(tmp: Path, pattern: str) -> Path:
    (f,) = sorted((tmp / "outputs").rglob(pattern))
    return f


def test_model_merge_blocks_samples_and_saves_comfyuis_blocks(env):
    """ModelMergeBlocks' image is the reference checkpoint's (its weights by ComfyUI's rule), and ModelSave writes
    exactly those U-Net weights under model.diffusion_model.*, ComfyUI's names, in the output folder."""
    c, (ta, _) = env["client"], env["t"]
    g = _graph(["10", 0])
    g["10"] = _blocks(["4", 0], ["14", 0], input=0.2, middle=0.5, out=0.8)
    merged = prompt_image(c, g)
    assert np.array_equal(merged, prompt_image(c, _graph(["4", 0], ckpt="ref_blocks")))
    assert not np.array_equal(merged, prompt_image(c, _graph(["4", 0])))
    save = {
        "4": g["4"],
        "14": g["14"],
        "10": g["10"],
        "9": {"class_type": "ModelSave", "inputs": {"model": ["10", 0], "filename_prefix": "diffusion_models/blk"}},
    }
    _ok(run_prompt(c, save))
    f = _only(env["tmp"], "blk_*_.safetensors")
    assert f.name == "blk_00001_.safetensors" and f.parent.name == "diffusion_models"
    saved = _tensors(f)
    assert sorted(saved) == sorted(k for k in ta if k.startswith(UNET))
    ref = _tensors(env["models"] / "ref_blocks.safetensors")
    for k, v in saved.items():
        assert torch.equal(v, ref[k]), k
    meta = safetensors_metadata(f)
    assert meta["modelspec.predict_key"] == "epsilon" and "v_pred" not in saved
    assert json.loads(meta["prompt"])["9"]["class_type"] == "ModelSave"
    # the saved U-Net is loadable: put into a's file in place of its own, it gives the merged image
    whole = {**ta, **saved}
    meta_a = safetensors_metadata(env["models"] / "a.safetensors")
    save_safetensors(whole, env["models"] / "blk_whole.safetensors", metadata=meta_a)
    assert np.array_equal(prompt_image(c, _graph(["4", 0], ckpt="blk_whole")), merged)


def test_model_merge_sd1_takes_one_ratio_per_block(env):
    c, (ta, tb) = env["client"], env["t"]
    ratios = {"time_embed.": 0.3, "input_blocks.1.": 0.1, "middle_block.1.": 0.6, "output_blocks.2.": 0.0, "out.": 0.9}
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "10": {
            "class_type": "ModelMergeSD1",
            "inputs": {"model1": ["4", 0], "model2": ["14", 0], **{n: ratios.get(n, 1.0) for n in SD1_BLOCK_INPUTS}},
        },
        "9": {"class_type": "ModelSave", "inputs": {"model": ["10", 0], "filename_prefix": "sd1blocks"}},
    }
    _ok(run_prompt(c, g))
    saved = _tensors(_only(env["tmp"], "sd1blocks_*_.safetensors"))
    checked = set()
    for k, v in saved.items():
        name = k.removeprefix(UNET)
        hits = [n for n in SD1_BLOCK_INPUTS if name.startswith(n)]
        r = ratios.get(max(hits, key=len), 1.0) if hits else ratios["time_embed."]
        assert torch.equal(v, ta[k] * r + (1.0 - r) * tb[k]), k
        checked.add(r)
    assert checked == {0.3, 0.1, 0.6, 0.0, 0.9, 1.0}  # every ratio given is used on some weight


def test_clip_save_and_vae_save_write_comfyuis_layouts_that_load_back(env):
    c, (ta, tb) = env["client"], env["t"]
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "10": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["4", 1], "clip2": ["14", 1], "ratio": 0.25}},
        "11": {"class_type": "CLIPSave", "inputs": {"clip": ["10", 0], "filename_prefix": "clip/mixed"}},
        "12": {"class_type": "VAESave", "inputs": {"vae": ["4", 2], "filename_prefix": "vae/mine"}},
    }
    _ok(run_prompt(c, g))
    f = _only(env["tmp"], "mixed_clip_l_*_.safetensors")  # SD 1.x: one encoder, ComfyUI's clip_l
    assert f.name == "mixed_clip_l_00001_.safetensors" and f.parent.name == "clip"
    clip = _tensors(f)
    te = {k.removeprefix(TE): k for k in ta if k.startswith(TE) and not k.endswith(".position_ids")}
    assert sorted(clip) == sorted(te) and all(k.startswith("text_model.") for k in clip)
    for k, full in te.items():
        assert torch.equal(clip[k], ta[full] * 0.25 + (1.0 - 0.25) * tb[full]), k
    assert json.loads(safetensors_metadata(f)["prompt"])["11"]["class_type"] == "CLIPSave"
    # VAESave: the LDM VAE without first_stage_model., tensor for tensor; sdengine's VAE loader reads it back
    v = _only(env["tmp"], "mine_*_.safetensors")
    assert v.parent.name == "vae"
    vae = _tensors(v)
    assert sorted(vae) == sorted(k.removeprefix(VAE) for k in ta if k.startswith(VAE))
    for k, t in vae.items():
        assert torch.equal(t, ta[VAE + k]), k
    loaded, _ = load_vae(v)
    own, _ = load_checkpoint_vae(env["models"] / "a.safetensors")
    assert sorted(loaded) == sorted(own) and all(torch.equal(loaded[k], own[k]) for k in own)
    # ... built into a VAE network by sdengine's loader (the model's own GroupNorm count: the tiny test VAE's 16
    # channels do not take LDM's 32 groups, so the server's VAELoader cannot build this tiny one)
    cfg = load_checkpoint(env["models"] / "a.safetensors").configs["vae"]
    net = build_vae(v, scaling_factor=0.18215, model_vae_config=cfg)
    state = net.state_dict()
    assert sorted(state) == sorted(own) and all(torch.equal(state[k], own[k]) for k in own)


def test_clip_save_names_sd2s_openclip_clip_h(env):
    """SD 2.x's OpenCLIP text encoder is ComfyUI's clip_h: its file, in transformers' names, holds the encoder that
    the checkpoint's OpenCLIP weights load into."""
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd2"}},
        "11": {"class_type": "CLIPSave", "inputs": {"clip": ["4", 1], "filename_prefix": "sd2text"}},
    }
    _ok(run_prompt(env["client"], g))
    f = _only(env["tmp"], "sd2text_*_.safetensors")
    assert f.name == "sd2text_clip_h_00001_.safetensors"
    saved = _tensors(f)
    own = load_checkpoint(env["models"] / "sd2.safetensors").state_dicts["text_encoder"]
    own = {k: v for k, v in own.items() if not k.endswith(".position_ids")}
    assert sorted(saved) == sorted(own) and all(torch.equal(saved[k], own[k]) for k in own)


def test_sdxl_blocks_merge_and_its_two_text_encoders_save(env):
    """ModelMergeSDXL's prefixes (no final dot) on an SDXL U-Net, ModelSave's SDXL modelspec, and CLIPSave's two
    files: clip_l and clip_g (with its text projection), each the checkpoint's encoder in transformers' names."""
    ta, tb = _tensors(env["models"] / "xl.safetensors"), _tensors(env["models"] / "xl_b.safetensors")
    ratios = {"label_emb.": 0.25, "input_blocks.4": 0.5, "middle_block.1": 0.75, "output_blocks.0": 0.0}
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "xl"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "xl_b"}},
        "10": {
            "class_type": "ModelMergeSDXL",
            "inputs": {"model1": ["4", 0], "model2": ["14", 0], **{n: ratios.get(n, 1.0) for n in SDXL_BLOCK_INPUTS}},
        },
        "9": {"class_type": "ModelSave", "inputs": {"model": ["10", 0], "filename_prefix": "xlunet"}},
        "11": {"class_type": "CLIPSave", "inputs": {"clip": ["4", 1], "filename_prefix": "xltext"}},
    }
    _ok(run_prompt(env["client"], g))
    f = _only(env["tmp"], "xlunet_*_.safetensors")
    saved = _tensors(f)
    assert sorted(saved) == sorted(k for k in ta if k.startswith(UNET))
    used = set()
    for k, v in saved.items():
        name = k.removeprefix(UNET)
        hits = [n for n in SDXL_BLOCK_INPUTS if name.startswith(n)]
        r = ratios.get(max(hits, key=len), 1.0) if hits else 1.0
        assert torch.equal(v, ta[k] * r + (1.0 - r) * tb[k]), k
        used.add(r)
    assert used == {0.25, 0.5, 0.75, 0.0, 1.0}
    assert safetensors_metadata(f)["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    own = load_checkpoint(env["models"] / "xl.safetensors").state_dicts
    for name, role in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        text = _tensors(_only(env["tmp"], f"xltext_{name}_*_.safetensors"))
        want = {k: v for k, v in own[role].items() if not k.endswith(".position_ids")}
        assert sorted(text) == sorted(want) and all(torch.equal(text[k], want[k]) for k in want), name
    assert "text_projection.weight" in text


def test_unet_ldm_names_are_the_checkpoints_own(env):
    """sdengine's U-Net names map onto exactly the LDM keys of the file the model came from."""
    ta, _ = env["t"]
    names = list(load_checkpoint(env["models"] / "a.safetensors").state_dicts["unet"])
    ldm = unet_ldm_names(names)
    assert sorted(ldm) == sorted(names)
    assert sorted(ldm.values()) == sorted(k.removeprefix(UNET) for k in ta if k.startswith(UNET))
    assert ldm["conv_in.weight"] == "input_blocks.0.0.weight" and ldm["conv_out.bias"] == "out.2.bias"
    with pytest.raises(NodeError, match="no LDM"):
        unet_ldm_names([*names, "extra_head.weight"])


def test_save_nodes_refuse_a_prefix_outside_the_output_folder_and_bad_ratios(env):
    c = env["client"]
    for node, inputs in (
        ("ModelSave", {"model": ["4", 0]}),
        ("CLIPSave", {"clip": ["4", 1]}),
        ("VAESave", {"vae": ["4", 2]}),
    ):
        g = {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
            "9": {"class_type": node, "inputs": {**inputs, "filename_prefix": "../../escape"}},
        }
        h = run_prompt(c, g)
        assert h["status"]["status_str"] == "error" and node in str(h["status"]["messages"]), (node, h["status"])
    assert not list(env["tmp"].rglob("escape*"))
    g = _graph(["10", 0])
    g["10"] = _blocks(["4", 0], ["14", 0], input=0.2, middle=1.5, out=0.8)  # over ComfyUI's max 1.0: a 400
    r = c.post("/prompt", json={"prompt": g})
    assert r.status_code == 400 and "10" in r.json()["node_errors"], r.text
    info = c.get("/object_info").json()
    assert list(info["ModelMergeBlocks"]["input"]["required"]) == ["model1", "model2", "input", "middle", "out"]
    assert list(info["ModelMergeSD1"]["input"]["required"])[2:] == list(SD1_BLOCK_INPUTS)
    assert info["ModelSave"]["input"]["required"]["filename_prefix"][1]["default"] == "diffusion_models/ComfyUI"
    assert info["VAESave"]["input"]["required"]["filename_prefix"][1]["default"] == "vae/ComfyUI_vae"
    assert info["CLIPSave"]["output_node"] is True


def _lcm_graph(scale: float, scale_steps: int, method: str, steps: int, sampler: dict | None = None) -> dict:
    g = _graph(["4", 0])
    del g["3"]
    g["20"] = sampler or {
        "class_type": "SamplerLCMUpscale",
        "inputs": {"scale_ratio": scale, "scale_steps": scale_steps, "upscale_method": method},
    }
    g["21"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["4", 0], "scheduler": "normal", "steps": steps, "denoise": 1.0},
    }
    g["3"] = {
        "class_type": "SamplerCustom",
        "inputs": {
            "model": ["4", 0], "add_noise": True, "noise_seed": SEED, "cfg": 4.0, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["20", 0], "sigmas": ["21", 0], "latent_image": ["5", 0],
        },
    }  # fmt: skip
    return g


def test_sampler_lcm_upscale_runs_in_sampler_custom(env):
    c = env["client"]
    plain = prompt_image(c, _lcm_graph(1.0, -1, "bislerp", 3))
    big = prompt_image(c, _lcm_graph(2.0, -1, "bilinear", 3))
    assert big.shape[0] == 2 * plain.shape[0] and big.shape[1] == 2 * plain.shape[1]
    assert big.std() > 1.0  # an image, not a flat field
    # one step at scale 1 is the model's x0 at the first sigma: SamplerCustom's one Euler step to 0 (which lands
    # there up to rounding)
    one = prompt_image(c, _lcm_graph(1.0, -1, "area", 1))
    euler = prompt_image(
        c, _lcm_graph(1.0, -1, "area", 1, {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}})
    )
    assert np.abs(one.astype(int) - euler.astype(int)).max() <= 1
    # a method that is not ComfyUI's: a 400 for the node
    r = c.post("/prompt", json={"prompt": _lcm_graph(2.0, -1, "lanczos", 3)})
    assert r.status_code == 400 and "20" in r.json()["node_errors"], r.text


def test_model_save_marks_a_v_prediction_model(env):
    """ModelSamplingDiscrete v_prediction (zsnr) before ModelSave: ComfyUI's v_pred and ztsnr markers and
    predict_key "v" in the file."""
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "10": {
            "class_type": "ModelSamplingDiscrete",
            "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True},
        },
        "9": {"class_type": "ModelSave", "inputs": {"model": ["10", 0], "filename_prefix": "vmodel"}},
    }
    _ok(run_prompt(env["client"], g))
    f = _only(env["tmp"], "vmodel_*_.safetensors")
    saved = _tensors(f)
    assert saved["v_pred"].numel() == 0 and saved["ztsnr"].numel() == 0
    assert safetensors_metadata(f)["modelspec.predict_key"] == "v"


def test_sampler_lcm_upscale_refuses_what_it_cannot_walk(env):
    c = env["client"]
    flipped = _lcm_graph(1.0, -1, "area", 3)
    flipped["22"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["21", 0]}}
    flipped["3"]["inputs"]["sigmas"] = ["22", 0]
    masked = _lcm_graph(1.0, -1, "area", 3)
    masked["23"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 32}}
    masked["24"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["5", 0], "mask": ["23", 0]}}
    masked["3"]["inputs"]["latent_image"] = ["24", 0]
    huge = _lcm_graph(20.0, -1, "area", 3)
    huge["5"]["inputs"].update(width=512, height=512)
    for g, words in ((flipped, "rising sigmas"), (masked, "noise mask"), (huge, "limit")):
        h = run_prompt(c, g)
        assert h["status"]["status_str"] == "error", h["status"]
        text = str(h["status"]["messages"])
        assert words in text and "SamplerCustom" in text, text
    r = c.post("/prompt", json={"prompt": _lcm_graph(25.0, -1, "area", 3)})  # over ComfyUI's max 20
    assert r.status_code == 400 and "20" in r.json()["node_errors"], r.text


class _Ctx:
    """A RunContext stand-in whose pipeline has no CLIP text encoder (the emoji model's MiniLM)."""

    def pipeline(self, ref: str) -> Any:
        return type("Pipe", (), {"name": "emoji", "text_encoder": object()})()


def test_save_nodes_refuse_what_they_cannot_save_through_the_node_functions(tmp_path):
    from sdengine.server.comfy.nodes import ClipHandle, TinyVaeHandle
    from sdengine.server.comfy.nodes_merge import clip_save, model_merge_blocks, vae_save

    with pytest.raises(NodeError, match="MiniLM"):
        clip_save(_Ctx(), ClipHandle("emoji"), "clip/x")  # type: ignore[arg-type]
    with pytest.raises(NodeError, match="taesd"):
        vae_save(type("C", (), {})(), TinyVaeHandle("taesd"), "vae/x")  # type: ignore[arg-type]
    with pytest.raises(NodeError, match="no input 'outt'"):
        model_merge_blocks(_Ctx(), None, None, input=1.0, outt=0.5)  # type: ignore[arg-type]
