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

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from _comfy_live import live_client, run_prompt, view_image
from _live_server import server_config, shared_loader

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
    with live_client(server_config(tmp), loader=toy_loader) as (_, c):
        yield c


def base(width: int = 128, **nodes) -> dict:
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "empty": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 64, "batch_size": 1}},
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


def image(client: httpx.Client, graph: dict) -> np.ndarray:
    h = run_prompt(client, graph)
    assert h["status"]["status_str"] == "success", h["status"]
    (im,) = h["outputs"]["save"]["images"]
    return view_image(client, im, mode="RGB").astype(np.int16)


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


@pytest.mark.slow  # three prompts
def test_area_strength_weighs_combined_prompts(client):
    """ConditioningSetAreaStrength of 3 on "red" combined with "blue": the mean of their predictions weighted
    3 : 1, which for the toy is ConditioningAverage(red, blue, 0.75)."""
    got = image(
        client,
        base(
            64,
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
            64,
            avg={"class_type": "ConditioningAverage",
                 "inputs": {"conditioning_to": ["red", 0], "conditioning_from": ["blue", 0],
                            "conditioning_to_strength": 0.75}},
            **sampler("ks", "avg"), **output("ks"),
        ),
    )  # fmt: skip
    plain = image(
        client,
        base(
            64,
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["blue", 0]}},
            **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip
    assert np.abs(got - want).max() <= 1
    assert np.abs(plain - want).mean() > 2  # equal weights give another image
    # a CFG++ sampler reads the negative entries' x0 of the regional sum: "blue" at strength 0 changes nothing
    zero = {"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["blue", 0], "strength": 0.0}}
    both = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0], "conditioning_2": ["z", 0]}}
    regional = image(client, base(64, z=zero, both=both, **sampler("ks", "both", "euler_cfg_pp"), **output("ks")))
    alone = image(client, base(64, **sampler("ks", "red", "euler_cfg_pp"), **output("ks")))
    euler = image(client, base(64, **sampler("ks", "red", "euler"), **output("ks")))
    assert np.abs(regional - alone).max() <= 1 and np.abs(alone - euler).mean() > 1


@pytest.mark.slow  # loads a ControlNet
def test_an_area_outside_the_latent_and_a_regional_controlnet_fail_at_the_sampler(client):
    h = run_prompt(
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
    # a ControlNet on an area entry: once refused here, it now runs on the area, as ComfyUI's
    # (tests/test_comfy_model_call.py checks what it is handed)
    hint = upload_mask(client, "hint.png", [0.0, 1.0] * 16)
    h = run_prompt(
        client,
        base(
            img={"class_type": "LoadImage", "inputs": {"image": hint}},
            cn={"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny"}},
            area={"class_type": "ConditioningSetArea",
                  "inputs": {"conditioning": ["blue", 0], "width": 64, "height": 64, "x": 64, "y": 0,
                             "strength": 1.0}},
            ctl={"class_type": "ControlNetApply",
                 "inputs": {"conditioning": ["area", 0], "control_net": ["cn", 0], "image": ["img", 0],
                            "strength": 1.0}},
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["ctl", 0]}},
            **sampler("ks", "both"), **output("ks"),
        ),
    )  # fmt: skip
    assert h["status"]["status_str"] == "success", h["status"]


# ------------------------------------------------------------------------- ConditioningZeroOut, sampler nodes


def custom(sampler_node: dict, positive: str = "red") -> dict:
    return base(
        smp=sampler_node,
        sig={"class_type": "BasicScheduler",
             "inputs": {"model": ["ckpt", 0], "scheduler": "karras", "steps": 3, "denoise": 1.0}},
        ks={"class_type": "SamplerCustom",
            "inputs": {"model": ["ckpt", 0], "add_noise": True, "noise_seed": SEED, "cfg": 4.0,
                       "positive": [positive, 0], "negative": ["neg", 0], "sampler": ["smp", 0],
                       "sigmas": ["sig", 0], "latent_image": ["empty", 0]}},
        **output("ks"),
    )  # fmt: skip


def select(name: str) -> dict:
    return {"class_type": "KSamplerSelect", "inputs": {"sampler_name": name}}


@pytest.mark.slow  # eight prompts
def test_sampler_option_nodes_give_samplercustom_their_settings(client):
    euler = image(client, custom(select("euler")))
    ancestral = image(client, custom(select("euler_ancestral")))
    eta0 = image(client, custom({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.0, "s_noise": 1.0}}))
    eta1 = image(client, custom({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}}))
    assert np.abs(eta0 - euler).max() <= 1  # no ancestral noise: Euler's steps
    # (3 Karras steps from sigma_max, ComfyUI's list: the last steps from 1.3 down wash much of the noise out)
    assert np.array_equal(eta1, ancestral) and np.abs(eta1 - euler).mean() > 0.3
    cfgpp = {"class_type": "SamplerEulerAncestralCFGPP", "inputs": {"eta": 1.0, "s_noise": 1.0}}
    assert np.array_equal(image(client, custom(cfgpp)), image(client, custom(select("euler_ancestral_cfg_pp"))))
    heun = image(client, custom(select("dpmpp_2m_sde_heun")))
    node = {"class_type": "SamplerDPMPP_2M_SDE",
            "inputs": {"solver_type": "heun", "eta": 1.0, "s_noise": 1.0, "noise_device": "gpu"}}  # fmt: skip
    assert np.array_equal(image(client, custom(node)), heun)
    quiet = image(client, custom({**node, "inputs": {**node["inputs"], "eta": 0.0}}))
    assert np.abs(quiet - heun).mean() > 0.5  # eta reaches the sampler
    lms = image(client, custom({"class_type": "SamplerLMS", "inputs": {"order": 1}}))
    assert np.abs(lms - euler).max() <= 1  # first-order linear multistep is Euler
    # a setting sdengine's sampler has not: the node fails, naming it
    h = run_prompt(client, custom({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 0.5}}))
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "smp" and "s_noise 0.5" in err["exception_message"]


@pytest.mark.slow  # three prompts (and the first one loads the model)
def test_conditioning_zero_out_zeroes_the_text(client):
    """The toy's prediction is the token states' mean: zeroed, "red" and "blue" give one image."""
    zero = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["red", 0]}}
    red0 = image(client, base(64, z=zero, **sampler("ks", "z"), **output("ks")))
    blue0 = image(client, base(64, z={**zero, "inputs": {"conditioning": ["blue", 0]}}, **sampler("ks", "z"),
                               **output("ks")))  # fmt: skip
    red = image(client, base(64, **sampler("ks", "red"), **output("ks")))
    assert np.array_equal(red0, blue0) and np.abs(red - red0).mean() > 2


# ------------------------------------------------------------------------------------------- composites


@pytest.mark.slow  # five prompts
def test_latent_and_image_composites(client):
    """LatentComposite pastes its source's top left corner at (x, y) (the emoji model's latent pixel is 4 x 4);
    ImageCompositeMasked pastes pixels, weighted by the mask."""
    g = base(
        **sampler("ks_red", "red"), **sampler("ks_blue", "blue"),
        comp={"class_type": "LatentComposite",
              "inputs": {"samples_to": ["ks_red", 0], "samples_from": ["ks_blue", 0], "x": 0, "y": 0,
                         "feather": 0}},
        **output("comp"),
    )  # fmt: skip
    blue = image(client, base(**sampler("ks_blue", "blue"), **output("ks_blue")))
    red = image(client, base(**sampler("ks_red", "red"), **output("ks_red")))
    assert np.array_equal(image(client, g), blue)  # the whole of samples_to covered
    mask = upload_mask(client, "left.png", [1.0] * 16 + [0.0] * 16)
    g = base(
        **sampler("ks_red", "red"), **sampler("ks_blue", "blue"),
        dred={"class_type": "VAEDecode", "inputs": {"samples": ["ks_red", 0], "vae": ["ckpt", 2]}},
        dblue={"class_type": "VAEDecode", "inputs": {"samples": ["ks_blue", 0], "vae": ["ckpt", 2]}},
        m={"class_type": "LoadImageMask", "inputs": {"image": mask, "channel": "red"}},
        dec={"class_type": "ImageCompositeMasked",
             "inputs": {"destination": ["dred", 0], "source": ["dblue", 0], "x": 40, "y": 8,
                        "resize_source": False, "mask": ["m", 0]}},
        save={"class_type": "SaveImage", "inputs": {"filename_prefix": "regional", "images": ["dec", 0]}},
    )  # fmt: skip
    got = image(client, g)
    # the source's left half (where the mask is 1) lands at x 40..103, y 8..63; the rest is the destination
    assert np.array_equal(got[8:, 40:104], blue[:56, :64])
    keep = np.ones(got.shape[:2], bool)
    keep[8:, 40:104] = False
    assert np.array_equal(got[keep], red[keep]) and np.abs(red - blue).mean() > 2


def test_latent_composite_feathers_the_inner_edges_as_comfyui():
    """ComfyUI's LatentComposite: the source's edges inside the destination ramp over feather // 8 latent
    pixels ((t + 1) / feather from the edge in), its edges on the destination's border do not; a source running
    past the border is cut; an empty latent pastes zeros."""
    from sdengine.server.comfy.nodes import latent_composite

    def lat(z: torch.Tensor | None, size: tuple[int, int, int]) -> dict:
        return {"samples": z, "size": size, "posterior": None, "noise_mask": None}

    to = lat(torch.zeros(1, 4, 8, 8), (1, 64, 64))
    src = lat(torch.ones(1, 4, 4, 4), (1, 32, 32))
    (out,) = latent_composite(None, to, src, 16, 8, 16)
    ramp = torch.tensor([0.5, 1.0, 1.0, 0.5])
    want = torch.zeros(8, 8)
    want[1:5, 2:6] = ramp[:, None] * ramp[None, :]
    assert torch.equal(out["samples"][0, 2], want)
    (corner,) = latent_composite(None, to, src, 0, 0, 16)  # on the top and left border: no ramp there
    assert corner["samples"][0, 0, 0, :4].tolist() == [1.0, 1.0, 1.0, 0.5]
    (cut,) = latent_composite(None, to, lat(torch.arange(16.0).reshape(1, 1, 4, 4).expand(1, 4, 4, 4), (1, 32, 32)),
                              48, 0, 0)  # fmt: skip
    assert cut["samples"][0, 0, :4, 6:].tolist() == [[0, 1], [4, 5], [8, 9], [12, 13]]
    (empty,) = latent_composite(None, lat(torch.ones(1, 4, 8, 8), (1, 64, 64)), lat(None, (1, 16, 16)), 8, 8, 0)
    assert float(empty["samples"].sum()) == 4 * 64 - 4 * 4 and empty["samples"].shape == (1, 4, 8, 8)
    from sdengine.server.comfy.nodes import NodeError

    with pytest.raises(NodeError, match="a batch of 2 does not fit into a batch of 3"):
        latent_composite(None, lat(torch.zeros(3, 4, 8, 8), (3, 64, 64)), lat(torch.ones(2, 4, 4, 4), (2, 32, 32)),
                         0, 0, 0)  # fmt: skip


@pytest.mark.slow  # three prompts
def test_timestep_ranges_switch_the_prompt_where_comfyui_does(client):
    """ConditioningSetTimestepRange: "red" over the first half of the denoising, "blue" over the second, is
    KSamplerAdvanced's two stages (red up to the first step whose sigma is below the schedule's sigma at 50 %,
    blue from there: Euler keeps no history), as ComfyUI judges the range at each model call's sigma."""
    from sdengine.diffusion import sampling
    from sdengine.pipeline.control import percent_to_sigma

    pipe = shared_loader("emoji", "cpu")
    grid = sampling.make_grid("euler", 4, pipe.noise_schedule, "karras", pipe.scheduler_config, comfy_grid=True)
    half = percent_to_sigma(pipe.noise_schedule.log_sigmas, 0.5)
    k = sum(float(s) >= half for s in grid.sigmas[:-1])
    assert 0 < k < 4 and all(abs(float(s) - half) > 1e-3 for s in grid.sigmas)

    def ranged(node: str, start: float, end: float) -> dict:
        return {"class_type": "ConditioningSetTimestepRange",
                "inputs": {"conditioning": [node, 0], "start": start, "end": end}}  # fmt: skip

    switch = base(
        64, r1=ranged("red", 0.0, 0.5), r2=ranged("blue", 0.5, 1.0),
        both={"class_type": "ConditioningCombine",
              "inputs": {"conditioning_1": ["r1", 0], "conditioning_2": ["r2", 0]}},
        **sampler("ks", "both"), **output("ks"),
    )  # fmt: skip
    switch["ks"]["inputs"]["steps"] = 4

    def stage(positive: str, start: int, end: int, first: bool) -> dict:
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "add_noise": "enable" if first else "disable", "noise_seed": SEED, "steps": 4, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "karras", "positive": [positive, 0], "negative": ["neg", 0],
            "latent_image": ["empty", 0] if first else ["a", 0], "start_at_step": start, "end_at_step": end,
            "return_with_leftover_noise": "enable" if first else "disable", "model": ["ckpt", 0]}}  # fmt: skip

    two = base(64, a=stage("red", 0, k, True), b=stage("blue", k, 10000, False), **output("b"))
    got, want = image(client, switch), image(client, two)
    red = image(client, base(64, **sampler("ks", "red"), **output("ks")))
    assert np.abs(got - want).max() <= 1 and np.abs(red - want).mean() > 1


# ---------------------------------------------------------------------------------------------- mask nodes


def test_mask_nodes_as_comfyui():
    from sdengine.server.comfy.nodes import feather_mask, grow_mask, invert_mask, mask_composite

    dot = torch.zeros(1, 5, 5)
    dot[0, 2, 2] = 1.0
    (cross,) = grow_mask(None, dot, 1, True)  # tapered: the 3 x 3 cross footprint
    assert cross[0].tolist()[1:4] == [[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]]
    (square,) = grow_mask(None, dot, 2, False)
    assert float(square.sum()) == 25  # two steps of the 3 x 3 square cover the 5 x 5 mask
    (back,) = grow_mask(None, square, -2, False)  # the border is its own neighbour: erosion keeps a full mask
    assert float(back.sum()) == 25
    block = torch.zeros(1, 5, 5)
    block[0, 1:4, 1:4] = 1.0
    (eroded,) = grow_mask(None, block, -1, True)
    assert torch.equal(eroded, dot)
    (f,) = feather_mask(None, torch.ones(1, 2, 6), 2, 0, 2, 0)
    # left: 1/2 then 1; ComfyUI's right ramp indexes -0 (the first column) then -1
    assert f[0, 0].tolist() == [0.25, 1.0, 1.0, 1.0, 1.0, 1.0]
    a, b = torch.tensor([[[0.25, 0.5, 0.75]]]), torch.tensor([[[0.75, 0.75]]])
    assert mask_composite(None, a, b, 1, 0, "add")[0].tolist() == [[[0.25, 1.0, 1.0]]]  # clamped
    assert mask_composite(None, a, b, 1, 0, "subtract")[0].tolist() == [[[0.25, 0.0, 0.0]]]
    # and / or / xor on the masks rounded (0.5 rounds to 0, as torch.round does)
    assert mask_composite(None, a, b, 1, 0, "and")[0].tolist() == [[[0.25, 0.0, 1.0]]]
    assert mask_composite(None, a, b, 0, 0, "xor")[0].tolist() == [[[1.0, 1.0, 0.75]]]
    assert mask_composite(None, a, b, 5, 0, "multiply")[0].tolist() == a.tolist()  # off the mask: unchanged
    assert invert_mask(None, a)[0].tolist() == [[[0.75, 0.5, 0.25]]]
    from sdengine.server.comfy.nodes import NodeError, image_to_mask

    with pytest.raises(NodeError, match="a batch of 2 masks does not fit one of 3"):
        mask_composite(None, torch.zeros(3, 4, 4), torch.zeros(2, 4, 4), 0, 0, "add")
    rgb = torch.rand(1, 4, 4, 3)
    assert torch.equal(image_to_mask(None, rgb, "green")[0], rgb[..., 1])
    with pytest.raises(NodeError, match="no alpha channel"):
        image_to_mask(None, rgb, "alpha")


def test_image_pad_for_outpaint_through_the_api(client):
    """ImagePadForOutpaint: the image on a grey canvas and the mask (1 on the margin, feathered into the image by
    ((feathering - d) / feathering) ** 2 towards the padded side); MaskToImage shows the mask."""
    a = np.zeros((8, 8, 3), np.uint8)
    a[:, :, 0] = 200
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": ("pad.png", buf.getvalue(), "image/png")}, data={"overwrite": "1"})
    name = r.json()["name"]
    g = {
        "img": {"class_type": "LoadImage", "inputs": {"image": name}},
        "pad": {"class_type": "ImagePadForOutpaint",
                "inputs": {"image": ["img", 0], "left": 8, "top": 0, "right": 0, "bottom": 0, "feathering": 2}},
        "m": {"class_type": "MaskToImage", "inputs": {"mask": ["pad", 1]}},
        "save": {"class_type": "SaveImage", "inputs": {"filename_prefix": "pad", "images": ["pad", 0]}},
        "savem": {"class_type": "SaveImage", "inputs": {"filename_prefix": "padmask", "images": ["m", 0]}},
    }  # fmt: skip
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]

    def saved(node: str) -> np.ndarray:
        (im,) = h["outputs"][node]["images"]
        return np.asarray(Image.open(io.BytesIO(client.get("/view", params=im).content)).convert("RGB"))

    padded, mask = saved("save"), saved("savem")
    assert padded.shape == (8, 16, 3) and (padded[:, :8] == 128).all() and (padded[:, 8:] == a).all()
    assert mask[0, :, 0].tolist() == [255] * 9 + [64] + [0] * 6  # 1 on the margin; (2 - d)**2 / 4 for d = 0, 1


def test_empty_image_invert_and_crop_through_the_api(client):
    g = {
        "e": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 2, "color": 0x336699}},
        "inv": {"class_type": "ImageInvert", "inputs": {"image": ["e", 0]}},
        "crop": {"class_type": "ImageCrop", "inputs": {"image": ["inv", 0], "width": 4, "height": 4, "x": 10, "y": 6}},
        "save": {"class_type": "SaveImage", "inputs": {"filename_prefix": "crop", "images": ["crop", 0]}},
    }
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "success", h["status"]
    images = h["outputs"]["save"]["images"]
    assert len(images) == 2
    a = np.asarray(Image.open(io.BytesIO(client.get("/view", params=images[1]).content)).convert("RGB"))
    assert a.shape == (2, 4, 3) and (a == [255 - 0x33, 255 - 0x66, 255 - 0x99]).all()  # cut to the image
    info = client.get("/object_info/EmptyImage").json()["EmptyImage"]["input"]["required"]
    assert info["color"] == ["INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}]


@pytest.mark.slow  # two encodes and decodes
def test_vae_encode_tiled_is_close_to_vae_encode(client):
    """VAEEncodeTiled on 64-pixel tiles of a 128 x 64 picture: blended at the seams, near VAE Encode's latent but
    not its bits (the encoder's GroupNorm statistics are per tile)."""
    a = np.zeros((64, 128, 3), np.uint8)
    a[:, :, 0] = np.linspace(0, 255, 128, dtype=np.uint8)[None, :]
    a[16:48, 40:90] = (30, 160, 220)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": ("enc.png", buf.getvalue(), "image/png")}, data={"overwrite": "1"})
    name = r.json()["name"]

    def roundtrip(encode: dict) -> np.ndarray:
        g = {
            "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
            "img": {"class_type": "LoadImage", "inputs": {"image": name}},
            "enc": {**encode, "inputs": {**encode["inputs"], "pixels": ["img", 0], "vae": ["ckpt", 2]}},
            **output("enc"),
        }
        return image(client, g)

    whole = roundtrip({"class_type": "VAEEncode", "inputs": {}})
    tiled = roundtrip({"class_type": "VAEEncodeTiled", "inputs": {"tile_size": 64, "overlap": 32}})
    assert tiled.shape == whole.shape == (64, 128, 3)
    diff = np.abs(tiled - whole)
    assert 0.2 < diff.mean() < 6, diff.mean()


# ------------------------------------------------------------------- ControlNets with regional entries (real model)


@pytest.fixture(scope="module")
def real_client(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regional-real")
    with live_client(server_config(tmp)) as (_, c):
        yield c


@pytest.mark.slow  # the emoji model and its ControlNet, four prompts
def test_a_controlnet_acts_on_the_regional_entries_that_carry_it(real_client):
    """ "red" with a ControlNet combined with "blue" at strength 0 (ConditioningSetAreaStrength: the regional
    path, where blue weighs nothing) is the plain ControlNet run; without the ControlNet it is another image."""
    client = real_client
    a = np.zeros((64, 64, 3), np.uint8)
    a[16:48, 16:48] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    r = client.post("/upload/image", files={"image": ("cn.png", buf.getvalue(), "image/png")}, data={"overwrite": "1"})
    hint = r.json()["name"]

    def graph(positive: str) -> dict:
        g = base(
            64,
            img={"class_type": "LoadImage", "inputs": {"image": hint}},
            cn={"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny"}},
            ctl={"class_type": "ControlNetApply",
                 "inputs": {"conditioning": ["red", 0], "control_net": ["cn", 0], "image": ["img", 0],
                            "strength": 1.0}},
            zero={"class_type": "ConditioningSetAreaStrength", "inputs": {"conditioning": ["blue", 0],
                                                                           "strength": 0.0}},
            both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["ctl", 0],
                                                                  "conditioning_2": ["zero", 0]}},
            bare={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["red", 0],
                                                                  "conditioning_2": ["zero", 0]}},
            **sampler("ks", positive), **output("ks"),
        )  # fmt: skip
        return g

    controlled, regional, bare = image(client, graph("ctl")), image(client, graph("both")), image(client, graph("bare"))
    assert np.abs(regional - controlled).max() <= 2  # the same up to float rounding (other batches)
    assert np.abs(bare - controlled).mean() > 2  # the ControlNet shows


@pytest.mark.slow  # four prompts
def test_several_negative_conditionings_are_averaged_as_comfyui(client):
    """ComfyUI averages combined negative conditionings as it averages positive ones (calc_cond_batch): for the
    toy model that is ConditioningAverage of the two as the negative (the first one alone was once used)."""
    g = base(
        64,
        both={"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["neg", 0],
                                                              "conditioning_2": ["blue", 0]}},
        **sampler("ks", "red"), **output("ks"),
    )  # fmt: skip
    g["ks"]["inputs"]["negative"] = ["both", 0]
    want = base(
        64,
        avg={"class_type": "ConditioningAverage",
             "inputs": {"conditioning_to": ["neg", 0], "conditioning_from": ["blue", 0],
                        "conditioning_to_strength": 0.5}},
        **sampler("ks", "red"), **output("ks"),
    )  # fmt: skip
    want["ks"]["inputs"]["negative"] = ["avg", 0]
    first = image(client, base(64, **sampler("ks", "red"), **output("ks")))
    got, averaged = image(client, g), image(client, want)
    assert np.abs(got - averaged).max() <= 1 and np.abs(first - averaged).mean() > 1


@pytest.mark.slow  # two prompts (and the model's first load)
def test_samplercustom_hands_a_noisy_latent_on_as_comfyui(client):
    """SamplerCustom over the first half of a Karras schedule (SplitSigmas: a sigma list of no BasicScheduler, walked
    as given), then over the second half without noise, is SamplerCustom over the whole (Euler keeps no history):
    the noisy hand-off is x0 + sigma * eps as in ComfyUI (it once came in the network's scaling, x / sqrt(1 +
    sigma**2), and the second run read it as the other)."""

    def custom_on(name: str, sigmas: list, latent: list, add_noise: bool) -> dict:
        return {name: {"class_type": "SamplerCustom", "inputs": {
            "model": ["ckpt", 0], "add_noise": add_noise, "noise_seed": SEED, "cfg": 4.0, "positive": ["red", 0],
            "negative": ["neg", 0], "sampler": ["smp", 0], "sigmas": sigmas, "latent_image": latent}}}  # fmt: skip

    nodes = {
        "smp": select("euler"),
        "sig": {"class_type": "KarrasScheduler",
                "inputs": {"steps": 6, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}},
        "split": {"class_type": "SplitSigmas", "inputs": {"sigmas": ["sig", 0], "step": 3}},
    }  # fmt: skip
    whole = image(client, base(64, **nodes, **custom_on("one", ["sig", 0], ["empty", 0], True), **output("one")))
    two = base(
        64, **nodes, **custom_on("a", ["split", 0], ["empty", 0], True),
        **custom_on("b", ["split", 1], ["a", 0], False), **output("b"),
    )  # fmt: skip
    assert np.abs(image(client, two) - whole).max() <= 1
