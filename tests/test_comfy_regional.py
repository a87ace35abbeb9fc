"""Regional prompting and the composite / sampler-option nodes of the ComfyUI API, through POST /prompt.

The server's model is the emoji model with its U-Net replaced by a toy that is pixel-local and linear in the
text states (eps = 0.1 x + the mean of the token states' first channels): each latent pixel then evolves on its
own, and its final value is affine in the weight w of "blue" in its conditional prediction. ComfyUI's rule: an
entry with an area predicts there with weight strength x mask (the area's inner edges feathered over
min(8, side // 4) latent pixels), and the sampler divides the weighted sum of the predictions by the summed
weights. So "red" combined with "blue" on the right half at strength S gives, at a latent pixel of feather m,
w = S m / (1 + S m): the latent of "red" alone blended towards that of ConditioningAverage(blue, red,
w0 = S / (1 + S)) by w / w0, which LatentCompositeMasked of those two runs gives with that blend as its mask.
"""

from __future__ import annotations

import copy
import io
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from _live_server import live_server, server_config, shared_loader

SEED = 5
S = 3.0  # the area prompt's strength


class ToyUNet(torch.nn.Module):
    """Pixel-local and linear in the text states: eps = 0.1 x + mean over tokens of the states' first C channels."""

    def forward(self, x, t, encoder_hidden_states, **kw):
        g = encoder_hidden_states.float().mean(1)[:, : x.shape[1]]
        return 0.1 * x + g[:, :, None, None].to(x.dtype)


def toy_loader(ref: str, device: str):
    pipe = copy.copy(shared_loader(ref, device))  # the shared pipeline is left as it is
    pipe.unet = ToyUNet()
    return pipe


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regional")
    with live_server(server_config(tmp), loader=toy_loader) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def base(**nodes) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 64, "batch_size": 1}},
        "red": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["ckpt", 1]}},
        "blue": {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue sky at night", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
    }
    g.update(nodes)
    return g


def sampler(node: str, positive: str, sampler_name: str = "euler") -> dict:
    return {
        node: {
            "class_type": "KSampler",
            "inputs": {
                "seed": SEED,
                "steps": 3,
                "cfg": 4.0,
                "sampler_name": sampler_name,
                "scheduler": "karras",
                "denoise": 1.0,
                "model": ["ckpt", 0],
                "positive": [positive, 0],
                "negative": ["neg", 0],
                "latent_image": ["empty", 0],
            },  # fmt: skip
        }
    }


def output(latent: str) -> dict:
    return {
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": [latent, 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"filename_prefix": "regional", "images": ["dec", 0]}},
    }


def run(client: httpx.Client, graph: dict) -> dict:
    r = client.post("/prompt", json={"prompt": graph})
    assert r.status_code == 200, r.text
    pid = r.json()["prompt_id"]
    for _ in range(3000):  # bounded: 150 s
        h = client.get(f"/history/{pid}").json()
        if pid in h:
            return h[pid]
        time.sleep(0.05)
    raise TimeoutError(pid)


def image(client: httpx.Client, graph: dict) -> np.ndarray:
    h = run(client, graph)
    assert h["status"]["status_str"] == "success", h["status"]
    (im,) = h["outputs"]["save"]["images"]
    v = client.get("/view", params=im)
    return np.asarray(Image.open(io.BytesIO(v.content)).convert("RGB")).astype(np.int16)


def upload_mask(client: httpx.Client, name: str, columns: list[float]) -> str:
    """A 128 x 64 mask image whose equal bands of pixel columns (one latent column each: the emoji model's latent
    pixel is 4 x 4) have the given values: the bilinear resize to the latent, sampling each band's middle,
    gives them exactly."""
    a = np.zeros((64, 128, 3), np.uint8)
    band = 128 // len(columns)
    for j, v in enumerate(columns):
        a[:, band * j : band * (j + 1)] = round(v * 255)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": (name, buf.getvalue(), "image/png")}, data={"overwrite": "1"})
    assert r.status_code == 200, r.text
    return r.json()["name"]


def blend(m: float) -> float:
    """How far a latent pixel whose area weight is feathered by ``m`` goes from "red" towards the average."""
    return (S * m / (1 + S * m)) / (S / (1 + S))


RIGHT_HALF = [0.0] * 16 + [1.0] * 16
# ConditioningSetArea over latent columns 16..31 of 32 (16 wide): its inner (left) edge feathered over
# min(8, 16 // 4) = 4 columns, m = 1/4, 2/4, 3/4, then 1
FEATHERED = [0.0] * 16 + [blend(0.25), blend(0.5), blend(0.75)] + [1.0] * 13


def expected(client: httpx.Client, columns: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(red alone, red blended towards ConditioningAverage(blue, red, S / (1 + S)) by ``columns``)."""
    mask = upload_mask(client, "blend.png", columns)
    g = base(
        avg={"class_type": "ConditioningAverage",
             "inputs": {"conditioning_to": ["blue", 0], "conditioning_from": ["red", 0],
                        "conditioning_to_strength": S / (1 + S)}},
        m={"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        mix={"class_type": "LatentCompositeMasked",
             "inputs": {"destination": ["ks_red", 0], "source": ["ks_avg", 0], "x": 0, "y": 0,
                        "resize_source": False, "mask": ["m", 0]}},
        **sampler("ks_red", "red"), **sampler("ks_avg", "avg"), **output("mix"),
    )  # fmt: skip
    mixed = image(client, g)
    red = image(client, base(**sampler("ks_red", "red"), **output("ks_red")))
    return red, mixed


def regional(client: httpx.Client, area_node: dict) -> np.ndarray:
    g = base(
        area={**area_node, "inputs": {**area_node["inputs"], "conditioning": ["blue", 0]}},
        both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                              "conditioning_2": ["area", 0]}},
        **sampler("ks", "both"), **output("ks"),
    )  # fmt: skip
    return image(client, g)


def regional_with(client: httpx.Client, node: dict, **extra) -> np.ndarray:
    return image(
        client,
        base(
            area={**node, "inputs": {**node["inputs"], "conditioning": ["blue", 0]}},
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["area", 0]}},
            **extra, **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip


@pytest.mark.slow  # several prompts of a 128 x 64 image
def test_area_prompts_weigh_their_feathered_region_as_comfyui(client):
    red, want = expected(client, FEATHERED)
    assert np.abs(want[:, 72:] - red[:, 72:]).mean() > 5  # the right half's prompt shows
    for node in (
        {"class_type": "ConditioningSetArea", "inputs": {"width": 64, "height": 64, "x": 64, "y": 0, "strength": S}},
        {"class_type": "ConditioningSetAreaPercentage",
         "inputs": {"width": 0.5, "height": 1.0, "x": 0.5, "y": 0, "strength": S}},
    ):  # fmt: skip
        got = regional_with(client, node)
        # the same latents up to float rounding and the blend's 8-bit quantisation in the mask image
        assert np.abs(got - want).max() <= 2, node["class_type"]
        assert np.abs(got - want).mean() < 0.1, node["class_type"]


@pytest.mark.slow  # several prompts of a 128 x 64 image
def test_mask_prompt_weighs_its_region_as_comfyui(client):
    """ConditioningSetMask: weight strength x mask, no feathering; "mask bounds" runs the entry on the mask's
    bounding box only, which for this pixel-local model changes nothing."""
    _, want = expected(client, RIGHT_HALF)
    mask = upload_mask(client, "right.png", RIGHT_HALF)
    for bounds in ("default", "mask bounds"):
        node = {"class_type": "ConditioningSetMask",
                "inputs": {"mask": ["m", 0], "strength": S, "set_cond_area": bounds}}  # fmt: skip
        loaded = {"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}}
        got = regional_with(client, node, m=loaded)
        assert np.abs(got - want).max() <= 1, bounds


def test_area_strength_weighs_combined_prompts(client):
    """ConditioningSetAreaStrength of 3 on "red" combined with "blue": the mean of their predictions weighted
    3 : 1, which for the toy is ConditioningAverage(red, blue, 0.75); strength 0 leaves "blue" alone."""
    got = image(
        client,
        base(
            strong={"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["red", 0],
                                                                             "strength": 3.0}},
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["strong", 0],
                                                                  "conditioning_2": ["blue", 0]}},
            **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip
    want = image(
        client,
        base(
            avg={"class_type": "ConditioningAverage",
                 "inputs": {"conditioning_to": ["red", 0], "conditioning_from": ["blue", 0],
                            "conditioning_to_strength": 0.75}},
            **sampler("ks", "avg"), **output("ks"),
        ),
    )  # fmt: skip
    plain = image(
        client,
        base(
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["blue", 0]}},
            **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip
    assert np.abs(got - want).max() <= 1
    assert np.abs(plain - want).mean() > 2  # equal weights give another image


def test_an_area_outside_the_latent_fails_at_the_sampler(client):
    h = run(
        client,
        base(
            area={"class_type": "ConditioningSetArea",
                  "inputs": {"conditioning": ["blue", 0], "width": 64, "height": 64, "x": 128, "y": 0,
                             "strength": 1.0}},
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["area", 0]}},
            **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "ks" and "lies outside the latent of 128 x 64 pixels" in err["exception_message"]
