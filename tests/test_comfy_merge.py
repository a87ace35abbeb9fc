"""ComfyUI's model-merging nodes through the live server's /prompt: ModelMergeSimple / Add / Subtract, the CLIP
merges and CheckpointSave, on tiny random SD 1.x single files in a --models-dir.

The reference of each merge is a checkpoint file written by the test with ComfyUI's patch formula applied to the
files' tensors (``W1 * strength_model + strength_patch * W2``, ComfyUI's ``add_patches`` / ``calculate_weight``,
in float32 as its intermediate dtype): the merged graph must give that file's image exactly (same weights, same
sampling), and the loaded model must stay as it was (the plain graph's image before and after)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from _comfy_live import live_client, prompt_image, run_prompt
from _live_server import server_config
from sdengine.weights import convert, load_file, save_safetensors
from sdengine.weights.io import safetensors_metadata

STEPS, SEED = 3, 5
# a kohya LoRA on one U-Net layer (diffusers' down_blocks.0...attn1.to_q; LDM input_blocks.1.1...attn1.to_q)
LORA_LAYER = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
LORA_KEY = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
UNET, TE, VAE = "model.diffusion_model.", "cond_stage_model.", "first_stage_model."


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


def _write_reference(models: Path, name: str, parts: dict[str, dict[str, torch.Tensor]], base: Path) -> None:
    """``base``'s file with the tensors of ``parts`` (by prefix) replaced: a reference checkpoint in the folder."""
    sd = _tensors(base)
    for prefix, values in parts.items():
        for k, v in values.items():
            assert k.startswith(prefix) and sd[k].shape == v.shape
            sd[k] = v
    save_safetensors(sd, models / f"{name}.safetensors", metadata=safetensors_metadata(base))


@pytest.fixture(scope="module")
def env(tiny_sd1_folder, tiny_sd2_folder, tiny_inpaint_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_merge")
    models = tmp / "models"
    models.mkdir()
    a = convert(tiny_sd1_folder, models / "a.safetensors")
    b = _perturbed(a, models / "b.safetensors", 1)
    c = _perturbed(a, models / "c.safetensors", 2)
    convert(tiny_sd2_folder, models / "sd2.safetensors")
    convert(tiny_inpaint_folder, models / "inpaint.safetensors")
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    loras = tmp / "loras"
    g = torch.Generator().manual_seed(9)
    down, up = torch.randn(4, 32, generator=g) * 0.2, torch.randn(32, 4, generator=g) * 0.2
    save_safetensors(
        {
            f"{LORA_LAYER}.lora_down.weight": down,
            f"{LORA_LAYER}.lora_up.weight": up,
            f"{LORA_LAYER}.alpha": torch.tensor(2.0),
        },
        loras / "q.safetensors",
    )

    def part(prefix: str, fn) -> dict[str, torch.Tensor]:
        return {k: fn(ta[k], tb[k], tc[k]) for k in ta if k.startswith(prefix) and ta[k].is_floating_point()}

    r = 0.3  # ModelMergeSimple: model1 * ratio + (1 - ratio) * model2
    _write_reference(models, "ref_simple", {UNET: part(UNET, lambda x, y, z: x * r + (1.0 - r) * y)}, a)
    m = 0.7  # ModelMergeAdd(a, ModelMergeSubtract(b, c, m)): a * 1 + 1 * (b * m + (-m) * c)
    _write_reference(models, "ref_add", {UNET: part(UNET, lambda x, y, z: x * 1.0 + 1.0 * (y * m + (-m) * z))}, a)
    _write_reference(models, "ref_clip", {TE: part(TE, lambda x, y, z: x * 0.5 + 0.5 * y)}, a)
    config = server_config(tmp, models_dir=models, model="a", loras_dir=loras, max_queue=8)
    with live_client(config, timeout=300) as (_, client):
        yield {"client": client, "tmp": tmp, "models": models, "t": (ta, tb, tc), "lora": (down, up, 2.0 / 4)}


def _graph(ckpt: str = "a", extra: dict[str, Any] | None = None, model=("4", 0), clip=("4", 1)) -> dict:
    g: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "24": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "c"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": list(clip)}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": list(clip)}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": SEED,
                "steps": STEPS,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
                "model": list(model),
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
        },  # fmt: skip
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "merge", "images": ["8", 0]}},
    }
    g.update(extra or {})
    return g


def test_model_merge_simple_ratio_weighs_model1_and_leaves_the_model_unchanged(env):
    c = env["client"]
    plain = prompt_image(c, _graph())
    merge = {
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["14", 0], "ratio": 0.3}}
    }
    merged = prompt_image(c, _graph(extra=merge, model=("10", 0)))
    assert np.array_equal(merged, prompt_image(c, _graph("ref_simple")))  # model1 * 0.3 + model2 * 0.7, exactly
    assert np.abs(merged.astype(float) - plain).mean() > 0.5
    assert c.post("/free", json={"free_memory": True}).status_code == 200  # the kept merge goes with the cache
    merge["10"]["inputs"]["ratio"] = 0.30000001  # (not the cached node: computed again, the same weights in fp32)
    assert np.array_equal(prompt_image(c, _graph(extra=merge, model=("10", 0))), merged)
    merge["10"]["inputs"]["ratio"] = 1.0  # ratio 1: model1 itself
    assert np.array_equal(prompt_image(c, _graph(extra=merge, model=("10", 0))), plain)
    assert np.array_equal(prompt_image(c, _graph()), plain)  # the loaded model was never changed


def test_add_of_a_subtract_is_add_difference(env):
    extra = {
        "10": {
            "class_type": "ModelMergeSubtract",
            "inputs": {"model1": ["14", 0], "model2": ["24", 0], "multiplier": 0.7},
        },
        "11": {"class_type": "ModelMergeAdd", "inputs": {"model1": ["4", 0], "model2": ["10", 0]}},
    }
    got = prompt_image(env["client"], _graph(extra=extra, model=("11", 0)))
    assert np.array_equal(got, prompt_image(env["client"], _graph("ref_add")))


def test_clip_merge_simple_merges_the_text_encoder(env):
    extra = {"10": {"class_type": "CLIPMergeSimple", "inputs": {"clip1": ["4", 1], "clip2": ["14", 1], "ratio": 0.5}}}
    got = prompt_image(env["client"], _graph(extra=extra, clip=("10", 0)))
    assert np.array_equal(got, prompt_image(env["client"], _graph("ref_clip")))
    assert not np.array_equal(got, prompt_image(env["client"], _graph()))


def test_checkpoint_save_writes_the_merged_model_into_the_output_folder(env):
    c, (ta, tb, _) = env["client"], env["t"]
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["14", 0], "ratio": 0.3}},
        "9": {
            "class_type": "CheckpointSave",
            "inputs": {"model": ["10", 0], "clip": ["4", 1], "vae": ["4", 2], "filename_prefix": "checkpoints/mix"},
        },
    }
    for ratio in (0.4, 0.3):  # (the same graph twice would not run again: ComfyUI caches unchanged nodes)
        g["10"]["inputs"]["ratio"] = ratio
        h = run_prompt(c, g)
        assert h["status"]["status_str"] == "success", h["status"]
    files = sorted((env["tmp"] / "outputs").rglob("mix_*_.safetensors"))
    assert [f.name for f in files] == ["mix_00001_.safetensors", "mix_00002_.safetensors"]
    assert files[0].parent.name == "checkpoints"
    saved = _tensors(files[1])  # the counter follows the highest number: 00002 is ratio 0.3
    assert sorted(saved) == sorted(ta)
    for k, v in ta.items():
        want = v * 0.3 + (1.0 - 0.3) * tb[k] if k.startswith(UNET) else v
        assert torch.equal(saved[k], want), k
    meta = safetensors_metadata(files[1])
    assert json.loads(meta["prompt"])["9"]["class_type"] == "CheckpointSave"
    # the saved file is a model again: the merge's image from it, through the same server
    (env["models"] / "saved.safetensors").write_bytes(files[1].read_bytes())
    assert np.array_equal(prompt_image(c, _graph("saved")), prompt_image(c, _graph("ref_simple")))
    # a prefix that leaves the output folder: a node error, nothing written
    g["9"]["inputs"]["filename_prefix"] = "../../escape"
    h = run_prompt(c, g)
    assert h["status"]["status_str"] == "error" and "CheckpointSave" in str(h["status"]["messages"])
    assert not list(env["tmp"].rglob("escape*"))


def test_merging_different_networks_is_a_node_error(env):
    extra = {
        "24": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd2"}},
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["24", 0], "ratio": 0.5}},
    }
    h = run_prompt(env["client"], _graph(extra=extra, model=("10", 0)))
    assert h["status"]["status_str"] == "error"
    text = str(h["status"]["messages"])
    assert "different networks" in text and "cannot be merged" in text
    assert "ModelMergeSimple" in text  # the merge node fails, not the sampler after it


def test_the_nodes_are_listed_with_comfyuis_inputs(env):
    info = env["client"].get("/object_info").json()
    simple = info["ModelMergeSimple"]["input"]["required"]
    assert simple["ratio"][1]["default"] == 1.0 and simple["ratio"][1]["max"] == 1.0
    assert info["ModelMergeSubtract"]["input"]["required"]["multiplier"][1]["min"] == -10.0
    assert set(info["CLIPMergeAdd"]["input"]["required"]) == {"clip1", "clip2"}
    save = info["CheckpointSave"]
    assert (
        save["output_node"] is True
        and save["input"]["required"]["filename_prefix"][1]["default"] == "checkpoints/ComfyUI"
    )


def _save(c: httpx.Client, g: dict, prefix: str, tmp: Path) -> dict[str, torch.Tensor]:
    g = {**g, "9": {"class_type": "CheckpointSave", "inputs": {"filename_prefix": prefix, **g["9"]["inputs"]}}}
    h = run_prompt(c, g)
    assert h["status"]["status_str"] == "success", h["status"]
    (f,) = sorted((tmp / "outputs").rglob(f"{prefix}_*_.safetensors"))
    return _tensors(f)


def test_a_lora_before_a_merge_is_scaled_by_it_and_one_after_is_not(env):
    """ComfyUI's order of patches: LoraLoader -> ModelMergeSimple(ratio) gives r * (A + dW) + (1 - r) * B; the
    merge first and the LoRA after gives r * A + (1 - r) * B + dW (dW = (alpha / rank) * up @ down)."""
    c, (ta, tb, _), (down, up, scale) = env["client"], env["t"], env["lora"]
    dw = scale * (up.double() @ down.double())
    r = 0.4
    lora = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": "q", "strength_model": 1.0}}
    before = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "b"}},
        "11": {**lora, "inputs": {**lora["inputs"], "model": ["4", 0]}},
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["11", 0], "model2": ["14", 0], "ratio": r}},
        "9": {"inputs": {"model": ["10", 0], "clip": ["4", 1], "vae": ["4", 2]}},
    }
    after = {
        **before,
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["14", 0], "ratio": r}},
        "11": {**lora, "inputs": {**lora["inputs"], "model": ["10", 0]}},
        "9": {"inputs": {"model": ["11", 0], "clip": ["4", 1], "vae": ["4", 2]}},
    }
    a, b = ta[LORA_KEY].double(), tb[LORA_KEY].double()
    got = _save(c, before, "lora_before", env["tmp"])
    torch.testing.assert_close(got[LORA_KEY].double(), r * (a + dw) + (1 - r) * b, rtol=0, atol=1e-6)
    got = _save(c, after, "lora_after", env["tmp"])
    torch.testing.assert_close(got[LORA_KEY].double(), r * a + (1 - r) * b + dw, rtol=0, atol=1e-6)
    other = "model.diffusion_model.out.2.weight"  # a layer the LoRA does not touch: the plain merge
    assert torch.equal(got[other], ta[other] * r + (1.0 - r) * tb[other])


def test_an_inpainting_model1_keeps_its_input_convolution(env):
    """ComfyUI's "WEIGHT NOT MERGED": model1's 9-channel conv_in against model2's 4-channel one stays model1's;
    every other U-Net weight is merged."""
    c, (ta, _, _) = env["client"], env["t"]
    inp = _tensors(env["models"] / "inpaint.safetensors")
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "inpaint"}},
        "14": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "10": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["4", 0], "model2": ["14", 0], "ratio": 0.5}},
        "9": {"inputs": {"model": ["10", 0], "clip": ["4", 1], "vae": ["4", 2]}},
    }
    got = _save(c, g, "inpaint_mix", env["tmp"])
    conv_in = "model.diffusion_model.input_blocks.0.0.weight"
    assert got[conv_in].shape[1] == 9 and torch.equal(got[conv_in], inp[conv_in])
    k = "model.diffusion_model.out.2.weight"
    assert torch.equal(got[k], inp[k] * 0.5 + (1.0 - 0.5) * ta[k])
