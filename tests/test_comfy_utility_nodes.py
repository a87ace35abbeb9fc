"""ComfyUI's primitive, string and small image nodes (nodes_utility.py) against hand computations, and end to end
through the ComfyUI HTTP API: primitives and GetImageSize linked into widget inputs give the image of the same
prompt with the values typed in; a linked value outside the input's range fails the node in one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image

from _comfy_live import live_client, prompt_image, run_prompt
from _live_server import server_config
from sdengine.server.comfy import nodes_utility as nu
from sdengine.server.comfy.graph import NodeFailed, PromptInvalid, validate
from sdengine.server.comfy.nodes import NodeError, RunContext
from sdengine.server.comfy.workflow import convert

CTX = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]


def rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- node functions


def test_primitives_and_strings_give_their_values():
    for name, value in (
        ("PrimitiveInt", -(2**40)),
        ("PrimitiveFloat", 2.5),
        ("PrimitiveString", "a cat"),
        ("PrimitiveStringMultiline", "a\ncat"),
        ("PrimitiveBoolean", True),
    ):
        assert nu.UTILITY_NODES[name].fn(CTX, value=value) == (value,)
    assert nu.string_concatenate(CTX, "a cat", "a hat", ", ") == ("a cat, a hat",)
    assert nu.string_concatenate(CTX, "ab", "cd", "") == ("abcd",)
    assert nu.string_replace(CTX, "a cat, a cat", "cat", "dog") == ("a dog, a dog",)
    assert nu.string_replace(CTX, "ab", "", "-") == ("-a-b-",)  # Python's rule for an empty find, as ComfyUI's


def test_get_image_size_is_width_height_batch():
    assert nu.get_image_size(CTX, torch.zeros(3, 24, 40, 3)) == (40, 24, 3)
    assert nu.get_image_size(CTX, torch.zeros(1, 8, 8, 4)) == (8, 8, 1)


def test_max_dimension_keeps_the_aspect_and_area_halves_by_2x2_means():
    assert nu.max_dimension_size(300, 200, 512) == (512, round(200 / 300 * 512))  # 341
    assert nu.max_dimension_size(200, 300, 512) == (341, 512)
    assert nu.max_dimension_size(64, 64, 100) == (100, 100)
    x = rand(2, 8, 16, 3, seed=1)
    (y,) = nu.image_scale_to_max_dimension(CTX, x, "area", 8)
    want = x.double().reshape(2, 4, 2, 8, 2, 3).mean(dim=(2, 4))
    assert y.shape == (2, 4, 8, 3)
    assert torch.allclose(y.double(), want, atol=1e-6)


def test_resize_and_pad_centres_the_fitted_image_on_the_colour():
    x = rand(1, 4, 8, 3, seed=2)  # 8 wide, 4 high into 4 x 6: scale min(4/8, 6/4) = 0.5 -> 4 x 2, 2 rows above
    (y,) = nu.resize_and_pad_image(CTX, x, 4, 6, "white", "area")
    assert y.shape == (1, 6, 4, 3)
    want = x.double().reshape(1, 2, 2, 4, 2, 3).mean(dim=(2, 4))
    assert torch.allclose(y[:, 2:4].double(), want, atol=1e-6)
    assert torch.equal(y[:, :2], torch.ones(1, 2, 4, 3)) and torch.equal(y[:, 4:], torch.ones(1, 2, 4, 3))
    # 8 x 4 into 6 x 6: scale 0.75 -> 6 x 3, the odd margin: (6 - 3) // 2 = 1 row above, 2 below; black
    (z,) = nu.resize_and_pad_image(CTX, x, 6, 6, "black", "nearest-exact")
    assert torch.equal(z[:, :1], torch.zeros(1, 1, 6, 3)) and torch.equal(z[:, 4:], torch.zeros(1, 2, 6, 3))
    rows = [int((i + 0.5) * 4 / 3) for i in range(3)]
    cols = [int((j + 0.5) * 8 / 6) for j in range(6)]
    assert torch.equal(z[0, 1:4], x[0][rows][:, cols])


def test_add_noise_draws_comfyuis_noise_from_the_seed():
    x = rand(2, 6, 5, 3, seed=3)
    for seed in (0, 7, 2**64 - 1):
        state = torch.get_rng_state()
        torch.manual_seed(seed)  # ComfyUI's draw: the global CPU generator seeded, then randn of the image's shape
        noise = torch.randn(x.shape)
        torch.set_rng_state(state)
        want = (x.double() + 0.3 * noise.double()).clamp(0, 1)
        (y,) = nu.image_add_noise(CTX, x, seed, 0.3)
        assert torch.allclose(y.double(), want, atol=1e-6)
    before = torch.get_rng_state()
    nu.image_add_noise(CTX, x, 5, 0.5)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    assert torch.equal(nu.image_add_noise(CTX, x, 9, 0.0)[0], x)


def test_stitch_pads_and_spaces_by_hand():
    a, b = rand(1, 4, 5, 3, seed=4), rand(1, 2, 3, 3, seed=5)
    (y,) = nu.image_stitch(CTX, a, "right", False, 3, "red", b)  # spacing 3 -> 4; b padded 1 row above, 1 below
    assert y.shape == (1, 4, 5 + 4 + 3, 3)
    assert torch.equal(y[:, :, :5], a)
    red = torch.tensor([1.0, 0.0, 0.0]).expand(1, 4, 4, 3)
    assert torch.equal(y[:, :, 5:9], red)
    assert torch.equal(y[:, 1:3, 9:], b) and torch.equal(y[:, 0, 9:], torch.zeros(1, 3, 3))
    assert torch.equal(y[:, 3, 9:], torch.zeros(1, 3, 3))  # a colour of three values pads with 0, as ComfyUI
    # left: image2 first; an RGB image next to an RGBA one gets alpha 1; white padding of 3 rows: 1 above, 2 below
    rgba = rand(1, 5, 2, 4, seed=6)
    (z,) = nu.image_stitch(CTX, a[:, :2], "left", False, 0, "white", rgba)
    assert z.shape == (1, 5, 7, 4)
    assert torch.equal(z[:, :, :2], rgba)
    assert torch.equal(z[:, 1:3, 2:, :3], a[:, :2]) and torch.equal(z[:, 1:3, 2:, 3], torch.ones(1, 2, 5))
    assert torch.equal(z[:, 0, 2:], torch.ones(1, 5, 4)) and torch.equal(z[:, 3:, 2:], torch.ones(1, 2, 5, 4))
    assert torch.equal(nu.image_stitch(CTX, a, "down", True, 8, "blue")[0], a)  # no image2: image1 as it is


def test_stitch_matches_image2_by_lanczos_and_fills_the_batch():
    a = rand(2, 4, 6, 3, seed=7)
    px = (rand(3, 3, 3, seed=8) * 255).round().to(torch.uint8)
    b = (px.float() / 255)[None]
    (y,) = nu.image_stitch(CTX, a, "up", True, 2, "black", b)  # b to a's width 6, height int(6 / (3 / 3)) = 6
    want = torch.from_numpy(np.array(Image.fromarray(px.numpy()).resize((6, 6), Image.Resampling.LANCZOS)))
    want = want.float() / 255
    assert y.shape == (2, 6 + 2 + 4, 6, 3)
    for row in range(2):  # the one image2 serves both rows (the shorter batch repeats its last image)
        assert torch.allclose(y[row, :6], want, atol=1e-6)
        assert torch.equal(y[row, 6:8], torch.zeros(2, 6, 3))
        assert torch.equal(y[row, 8:], a[row])


def test_bad_inputs_fail_in_one_line():
    for call in (
        lambda: nu.get_image_size(CTX, torch.zeros(8, 8)),
        lambda: nu.image_scale_to_max_dimension(CTX, torch.zeros(1, 1, 100, 3), "area", 1),  # 1 x 0
        lambda: nu.image_scale_to_max_dimension(CTX, torch.zeros(1, 8, 8, 3), "area", 0),
        lambda: nu.image_scale_to_max_dimension(CTX, torch.zeros(1, 8, 8, 3), "area", 9000),  # over --max-side
        lambda: nu.resize_and_pad_image(CTX, torch.zeros(1, 1, 100, 3), 10, 10, "white", "area"),
        lambda: nu.resize_and_pad_image(CTX, torch.zeros(1, 8, 8, 3), 9000, 64, "white", "area"),
        lambda: nu.image_stitch(CTX, torch.zeros(1, 1, 100, 3), "down", True, 0, "white", torch.zeros(1, 1, 200, 3)),
        lambda: nu.image_stitch(
            RunContext(pipeline=lambda ref: None, catalog=None, folders=None, max_pixels=100),  # type: ignore[arg-type]
            torch.zeros(1, 10, 10, 3),
            "right",
            False,
            0,
            "white",
            torch.zeros(1, 10, 10, 3),
        ),
    ):
        with pytest.raises(NodeError) as e:
            call()
        assert "\n" not in str(e.value)


def test_linked_values_are_checked_as_literals():
    env = type("Env", (), {"limits": {"side": 2048, "steps": 150, "batch": 8}})()
    g = {
        "1": {"class_type": "PrimitiveInt", "inputs": {"value": sys.maxsize}},
        "2": {"class_type": "PrimitiveFloat", "inputs": {"value": 1.5}},
        "3": {"class_type": "EmptyImage", "inputs": {"width": ["1", 0], "height": 8, "batch_size": 1, "color": 0}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}},
    }
    graph, outputs, errors = validate(g, env)  # an INT output into an INT widget: a valid link
    assert outputs == ["4"] and not errors
    bad = {**g, "3": {**g["3"], "inputs": {**g["3"]["inputs"], "width": ["2", 0]}}}  # FLOAT into INT: refused
    with pytest.raises(PromptInvalid) as e:
        validate(bad, env)
    (err,) = e.value.body["node_errors"]["3"]["errors"]
    assert err["type"] == "return_type_mismatch"
    # run: the linked width over the server's side limit fails the node that reads it, in one line
    from sdengine.server.comfy.graph import Executor

    with pytest.raises(NodeFailed) as f:
        Executor().run(graph, CTX, cancelled=lambda: False, event=lambda *a: None)
    assert f.value.node_id == "3" and "\n" not in str(f.value) and "bigger than max of 2048" in str(f.value)


def test_a_ui_workflows_primitive_int_has_comfyuis_control_widget():
    """ComfyUI's page saves a PrimitiveInt as [value, "fixed"] (its control_after_generate widget): it converts,
    linked into the sampler's seed widget."""
    wf = {
        "nodes": [
            {"id": 1, "type": "PrimitiveInt", "widgets_values": [77, "fixed"], "outputs": [{"type": "INT"}]},
            {"id": 2, "type": "StringConcatenate", "widgets_values": ["a", "cat", " "]},
            {"id": 3, "type": "ImageAddNoise", "widgets_values": [0, "randomize", 0.25],
             "inputs": [{"name": "image", "type": "IMAGE", "link": None},
                        {"name": "seed", "type": "INT", "widget": {"name": "seed"}, "link": 9}]},
        ],
        "links": [[9, 1, 0, 3, 1, "INT"]],
    }  # fmt: skip
    p = convert(wf)
    assert p["1"]["inputs"] == {"value": 77}
    assert p["2"]["inputs"] == {"string_a": "a", "string_b": "cat", "delimiter": " "}
    assert p["3"]["inputs"] == {"seed": ["1", 0], "strength": 0.25}
    assert nu.UTILITY_NODES["PrimitiveInt"].inputs[0].control


# --------------------------------------------------------------------------------------- through the API


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):
    with live_client(server_config(tmp_path_factory.mktemp("comfyutil"))) as (_, c):
        yield c


def _txt2img(seed, steps, width, text) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": 32, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "util"}},
    }  # fmt: skip


def test_linked_primitives_give_the_image_of_the_literal_values(client):
    info = client.get("/object_info/GetImageSize").json()["GetImageSize"]
    assert info["output"] == ["INT", "INT", "INT"] and info["output_name"] == ["width", "height", "batch_size"]
    prim = client.get("/object_info/PrimitiveInt").json()["PrimitiveInt"]
    assert prim["output"] == ["INT"] and prim["input"]["required"]["value"][1]["control_after_generate"] is True
    literal = prompt_image(client, _txt2img(11, 2, 40, "a red cat"))
    g = _txt2img(["10", 0], ["11", 0], ["13", 0], ["14", 0])
    g |= {
        "10": {"class_type": "PrimitiveInt", "inputs": {"value": 11}},
        "11": {"class_type": "PrimitiveInt", "inputs": {"value": 2}},
        "12": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 8, "batch_size": 1, "color": 0}},
        "13": {"class_type": "GetImageSize", "inputs": {"image": ["12", 0]}},
        "14": {"class_type": "StringConcatenate", "inputs": {"string_a": "a red", "string_b": "cat", "delimiter": " "}},
    }  # fmt: skip
    linked = prompt_image(client, g)
    assert linked.shape == (32, 40, 3)
    assert np.array_equal(linked, literal)
    assert not np.array_equal(prompt_image(client, _txt2img(12, 2, 40, "a red cat")), literal)  # the seed counts
    # a linked steps of 0 (KSampler's min is 1) fails the sampler in one line, not a 500 or a silent run
    g["11"] = {"class_type": "PrimitiveInt", "inputs": {"value": 0}}
    h = run_prompt(client, g)
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "5" and "\n" not in err["exception_message"]
    assert "linked input steps: Value 0 smaller than min of 1" in err["exception_message"]
