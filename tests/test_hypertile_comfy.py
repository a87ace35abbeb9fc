"""ComfyUI's HyperTile node: listed with ComfyUI's inputs, its image the pipeline's HyperTile of rule "comfyui" (the
emoji model at 64x64: a 16x16 latent, a smallest tile of max(32, 32) // 4 = 8 cells, so 2 or 1 tiles a side), the
U-Net plain again after it, and a value out of range refused in ComfyUI's shape."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

from _comfy_live import prompt_image
from _live_server import live_server, server_config, shared_loader

STEPS, SEED = 3, 11
SDENGINE_RULE = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_server(server_config(tmp_path_factory.mktemp("comfy_hypertile"), max_queue=8)) as s:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            yield c


def comfy_image(client: httpx.Client, prompt: dict) -> np.ndarray:
    return prompt_image(client, prompt, **SDENGINE_RULE)


def graph(tiles: dict[str, Any] | None = None) -> dict:
    g: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hypertile", "images": ["8", 0]}},
    }
    model = ["4", 0]
    if tiles is not None:
        g["10"] = {"class_type": "HyperTile", "inputs": {"model": model, **tiles}}
        model = ["10", 0]
    g["3"] = {
        "class_type": "KSampler",
        "inputs": {
            "seed": SEED, "steps": STEPS, "cfg": 5.0, "sampler_name": "dpmpp_2m", "scheduler": "karras",
            "denoise": 1.0, "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        },
    }  # fmt: skip
    return g


def direct(**kw: Any) -> np.ndarray:
    pipe = shared_loader("emoji", "cpu")
    args: dict[str, Any] = dict(steps=STEPS, sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0, seed=SEED)
    res = pipe("a red apple", "blurry", width=64, height=64, progress=False, **args, **kw)
    return np.asarray(res.images[0].convert("RGB"))


def test_the_node_is_listed_with_comfyuis_inputs(client):
    info = client.get("/object_info").json()["HyperTile"]
    req = info["input"]["required"]
    assert req["model"][0] == "MODEL"
    defaults = {k: (v[0], v[1]["default"]) for k, v in req.items() if k != "model"}
    assert defaults == {
        "tile_size": ("INT", 256),
        "swap_size": ("INT", 2),
        "max_depth": ("INT", 0),
        "scale_depth": ("BOOLEAN", False),
    }
    assert (req["tile_size"][1]["min"], req["tile_size"][1]["max"]) == (1, 2048)
    assert (req["swap_size"][1]["min"], req["swap_size"][1]["max"]) == (1, 128)
    assert (req["max_depth"][1]["min"], req["max_depth"][1]["max"]) == (0, 10)
    assert req["scale_depth"][0] == "BOOLEAN" and info["output"] == ["MODEL"]
    assert info["category"] == "model_patches/unet"


def test_the_node_equals_the_pipelines_hypertile(client):
    plain = comfy_image(client, graph())
    assert np.array_equal(plain, direct())
    for swap in (1, 2):
        got = comfy_image(client, graph({"tile_size": 32, "swap_size": swap, "max_depth": 0, "scale_depth": False}))
        want = direct(hypertile=(32, swap, 0), hypertile_rule="comfyui", hypertile_scale_depth=False)
        assert np.array_equal(got, want), swap
        assert not np.array_equal(got, plain)
    # ComfyUI's defaults at this size: 256 px -> 32 cells > 16, one tile: the plain image
    assert np.array_equal(comfy_image(client, graph({"tile_size": 256, "swap_size": 2, "max_depth": 0,
                                                     "scale_depth": False})), plain)  # fmt: skip
    assert np.array_equal(comfy_image(client, graph()), plain)  # the U-Net's layers restored


def test_a_value_out_of_range_is_refused(client):
    r = client.post(
        "/prompt", json={"prompt": graph({"tile_size": 32, "swap_size": 0, "max_depth": 0, "scale_depth": False})}
    )
    assert r.status_code == 400, r.text
    assert "swap_size" in r.text
