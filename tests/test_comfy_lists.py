"""ComfyUI's list semantics in the graph executor and its list nodes (RebatchLatents, RebatchImages): a node after an
OUTPUT_IS_LIST output runs once per element (two lists of different lengths: the shorter repeats its last), an
INPUT_IS_LIST node gets the whole lists, SaveImage saves every element's images and reports them all; a rebatched
latent's batches sample as each slice alone (ComfyUI's noise rule for ``batch_index``)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdengine.server.catalog import Catalog
from sdengine.server.comfy.graph import Executor, NodeFailed, PromptInvalid, node_calls, validate
from sdengine.server.comfy.nodes import NodeError, Outputs, RunContext, object_info
from sdengine.server.comfy.nodes_lists import rebatch_images, rebatch_latents
from sdengine.server.comfy.registry import NODES
from sdengine.server.comfy.workflow import convert

CTX = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]


def _latent(n: int, h: int = 32, w: int = 32, **extra: Any) -> dict[str, Any]:
    z = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1).expand(n, 4, h // 8, w // 8).clone()
    return {"samples": z, "size": (n, h, w), "posterior": None, **extra}


def _env(tmp_path):
    folders = Outputs(tmp_path / "out", tmp_path / "in", tmp_path / "temp")
    env = type("Env", (), {"catalog": Catalog(None, None, None), "folders": folders, "limits": {}})()
    return env, folders


def _run(g: dict, tmp_path, pipe: Any = None) -> tuple[Executor, dict, list]:
    env, folders = _env(tmp_path)
    try:
        graph, outputs, errors = validate(g, env)
    except PromptInvalid as e:
        raise AssertionError(e.body) from None
    assert not errors, errors
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=env.catalog, folders=folders, device="cpu",
                     save_lock=threading.Lock())  # fmt: skip
    events: list = []
    ex = Executor()
    ui = ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: events.append((name, data)))
    return ex, ui, events


# ------------------------------------------------------------------------------------------------ the nodes


def test_the_list_nodes_are_listed_with_their_list_flags():
    for name in ("RebatchLatents", "RebatchImages"):
        info = object_info(NODES[name], None)
        assert info["output_is_list"] == [True] and info["is_input_list"] is True
        assert info["input"]["required"]["batch_size"][1] == {"default": 1, "min": 1, "max": 4096, "step": 1}
    plain = object_info(NODES["KSampler"], None)
    assert plain["output_is_list"] == [False] and plain["is_input_list"] is False


def test_rebatch_latents_cuts_rows_keeps_indices_and_masks():
    mask = torch.zeros(1, 1, 32, 32)
    a = _latent(2, noise_mask=mask)  # one mask row stands for both rows
    b = _latent(3)
    (out,) = rebatch_latents(CTX, [a, b], [2])
    assert [o["size"][0] for o in out] == [2, 2, 1]
    assert [o["batch_index"] for o in out] == [[0, 1], [2, 3], [4]]  # each row's place in the whole list
    assert torch.equal(out[0]["samples"][:, 0, 0, 0], torch.tensor([0.0, 1.0]))
    assert torch.equal(out[1]["samples"][:, 0, 0, 0], torch.tensor([0.0, 1.0]))  # b's rows 0, 1
    assert torch.equal(out[0]["noise_mask"], torch.zeros(2, 1, 32, 32))
    assert "noise_mask" not in out[1] and "noise_mask" not in out[2]  # all ones: none, as ComfyUI
    # a batch of a masked row and an unmasked one keeps both rows' masks (ones for the unmasked)
    (mixed,) = rebatch_latents(CTX, [_latent(1, noise_mask=mask), _latent(1)], [2])
    assert len(mixed) == 1 and mixed[0]["noise_mask"][:, 0, 0, 0].tolist() == [0.0, 1.0]
    # a latent's own batch_index is kept; a new size closes the batch being filled
    c = _latent(2, batch_index=[7, 9])
    (out,) = rebatch_latents(CTX, [c, _latent(1, 64, 64), _latent(1)], [4])
    assert [(o["size"], o["batch_index"]) for o in out] == [
        ((2, 32, 32), [7, 9]),
        ((1, 64, 64), [2]),
        ((1, 32, 32), [3]),
    ]
    # an empty latent (no samples yet) rebatches by its rows
    (out,) = rebatch_latents(CTX, [{"samples": None, "size": (3, 32, 32), "posterior": None}], [2])
    assert [(o["samples"], o["size"][0], o["batch_index"]) for o in out] == [(None, 2, [0, 1]), (None, 1, [2])]


def test_rebatch_images_and_their_refusals():
    x = torch.rand(3, 8, 8, 3)
    y = torch.rand(2, 8, 8, 3)
    (out,) = rebatch_images(CTX, [x, y], [2])
    assert [o.shape[0] for o in out] == [2, 2, 1]
    assert torch.equal(torch.cat(out), torch.cat([x, y]))
    with pytest.raises(NodeError, match=r"^RebatchImages: images of different sizes \(8x4, 8x8\) in one batch of 2$"):
        rebatch_images(CTX, [torch.rand(1, 8, 8, 3), torch.rand(1, 4, 8, 3)], [2])
    with pytest.raises(NodeError, match="not a latent"):
        rebatch_latents(CTX, ["x"], [2])
    with pytest.raises(NodeError, match="batch_size must be at least 1"):
        rebatch_images(CTX, [x], [0])


def test_calls_follow_comfyuis_mapping_over_lists():
    plain, listed = NODES["ImageBlend"], NODES["RebatchImages"]
    calls = node_calls(plain, {"image1": [1, 2, 3], "image2": ["a", "b"], "blend_factor": [0.5]})
    assert [(c["image1"], c["image2"], c["blend_factor"]) for c in calls] == [
        (1, "a", 0.5),
        (2, "b", 0.5),
        (3, "b", 0.5),
    ]
    assert node_calls(listed, {"images": [1, 2], "batch_size": [3]}) == [{"images": [1, 2], "batch_size": [3]}]
    assert node_calls(NODES["EmptyImage"], {}) == [{}]
    with pytest.raises(NodeError, match="^input image2 is an empty list: nothing to run the node on$"):
        node_calls(plain, {"image1": [1], "image2": []})


# --------------------------------------------------------------------------------------------- the executor


def _colours(*groups: tuple[int, int]) -> dict:
    """EmptyImage batches (rows, colour) batched together as node "b"."""
    g: dict[str, Any] = {}
    prev = None
    for i, (rows, colour) in enumerate(groups):
        g[f"e{i}"] = {
            "class_type": "EmptyImage",
            "inputs": {"width": 8, "height": 8, "batch_size": rows, "color": colour},
        }
        if prev is None:
            prev = [f"e{i}", 0]
        else:
            g[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": prev, "image2": [f"e{i}", 0]}}
            prev = [f"b{i}", 0]
    g["b"] = {
        "class_type": "ImageScaleBy",
        "inputs": {"image": prev, "upscale_method": "nearest-exact", "scale_by": 1.0},
    }
    return g


def test_an_image_list_is_saved_element_by_element(tmp_path):
    g = _colours((2, 0xFF0000), (3, 0x0000FF))
    g["r"] = {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": 2}}
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["r", 0], "filename_prefix": "lst"}}
    g["p"] = {"class_type": "PreviewImage", "inputs": {"images": ["r", 0]}}
    ex, ui, events = _run(g, tmp_path)
    saved = ui["s"]["images"]
    assert [i["filename"] for i in saved] == [f"lst_{n:05d}_.png" for n in range(1, 6)]
    pixels = [np.asarray(Image.open(tmp_path / "out" / i["subfolder"] / i["filename"]))[0, 0].tolist() for i in saved]
    assert pixels == [[255, 0, 0]] * 2 + [[0, 0, 255]] * 3
    assert len(ui["p"]["images"]) == 5 and {i["type"] for i in ui["p"]["images"]} == {"temp"}
    # one "executed" message per output node, with all its images (as ComfyUI's merged UI output)
    executed = [d for n, d in events if n == "executed" and d["node"] == "s"]
    assert len(executed) == 1 and executed[0]["output"]["images"] == saved
    assert [t.shape[0] for t in ex.cache["r"].lists[0]] == [2, 2, 1]
    # run again: the cached output nodes report every image again, nothing is saved twice
    env, folders = _env(tmp_path)
    graph, _, _ = validate(g, env)
    ctx = RunContext(pipeline=lambda ref: None, catalog=env.catalog, folders=folders, save_lock=threading.Lock())
    again = ex.run(graph, ctx, cancelled=lambda: False, event=lambda *a: None)
    assert again["s"]["images"] == saved and len(list((tmp_path / "out").glob("lst_*.png"))) == 5


def test_two_lists_of_different_lengths_repeat_the_shorters_last(tmp_path):
    g = _colours((3, 0xFF0000))
    g |= {f"c{k}": v for k, v in _colours((1, 0x000000), (1, 0x0000FF)).items()}
    g["cb"]["inputs"]["image"] = ["cb1", 0]
    g["cb1"]["inputs"] = {"image1": ["ce0", 0], "image2": ["ce1", 0]}
    g["r3"] = {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": 1}}  # 3 elements
    g["r2"] = {"class_type": "RebatchImages", "inputs": {"images": ["cb", 0], "batch_size": 1}}  # 2 elements
    g["m"] = {"class_type": "ImageBlend", "inputs": {"image1": ["r3", 0], "image2": ["r2", 0], "blend_factor": 0.5,
                                                     "blend_mode": "normal"}}  # fmt: skip
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["m", 0], "filename_prefix": "mix"}}
    ex, ui, events = _run(g, tmp_path)
    blended = ex.cache["m"].lists[0]
    assert len(blended) == 3 and len(ui["s"]["images"]) == 3
    red, black, blue = torch.tensor([1.0, 0, 0]), torch.zeros(3), torch.tensor([0, 0, 1.0])
    want = [(red + black) / 2, (red + blue) / 2, (red + blue) / 2]  # the third call reuses list 2's last
    for got, w in zip(blended, want, strict=True):
        assert torch.allclose(got[0, 0, 0], w)


def test_a_bad_element_fails_the_node_in_one_line(tmp_path):
    """A list element a node cannot take fails that node in one line, its inputs shown as the whole lists."""
    g = _colours((5, 0xFF0000))
    g["r"] = {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": 2}}  # 2, 2, 1 rows
    g["t"] = {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 3, "color": 0}}
    g["m"] = {"class_type": "ImageBlend", "inputs": {"image1": ["r", 0], "image2": ["t", 0], "blend_factor": 0.5,
                                                     "blend_mode": "normal"}}  # fmt: skip
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["m", 0], "filename_prefix": "bad"}}
    with pytest.raises(NodeFailed) as e:
        _run(g, tmp_path)
    assert e.value.node_id == "m" and "\n" not in str(e.value)
    assert (
        str(e.value)
        == "node m (ImageBlend): ImageBlend: image1 has 2 rows and image2 3; give batches of the same size, or one row"
    )
    assert e.value.inputs["image1"] == ["tensor of shape (2, 8, 8, 3)"] * 2 + ["tensor of shape (1, 8, 8, 3)"]
    assert e.value.inputs["blend_factor"] == [0.5]


def test_batch_size_out_of_range_is_a_validation_error(tmp_path):
    g = {
        "l": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 2}},
        "r": {"class_type": "RebatchLatents", "inputs": {"latents": ["l", 0], "batch_size": 0}},
        "s": {"class_type": "SaveLatent", "inputs": {"samples": ["r", 0], "filename_prefix": "l"}},
    }
    env, _ = _env(tmp_path)
    with pytest.raises(PromptInvalid) as e:
        validate(g, env)
    (err,) = e.value.body["node_errors"]["r"]["errors"]
    assert err["type"] == "value_smaller_than_min" and err["message"] == "Value 0 smaller than min of 1"
    # linked, the value is checked as a literal when the node runs (each element of an INPUT_IS_LIST node's list)
    g = _colours((2, 0))
    g["n"] = {"class_type": "PrimitiveInt", "inputs": {"value": 0}}
    g["r"] = {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": ["n", 0]}}
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["r", 0], "filename_prefix": "x"}}
    with pytest.raises(NodeFailed) as f:
        _run(g, tmp_path)
    assert str(f.value) == "node r (RebatchImages): linked input batch_size: Value 0 smaller than min of 1 (0)"
    assert not list(tmp_path.glob("out/x_*.png"))


def test_a_ui_workflow_with_list_nodes_converts_as_any_other():
    wf = {
        "nodes": [
            {"id": 1, "type": "EmptyLatentImage", "widgets_values": [32, 32, 3]},
            {"id": 2, "type": "RebatchLatents", "widgets_values": [2],
             "inputs": [{"name": "latents", "type": "LATENT", "link": 7}]},
            {"id": 3, "type": "RebatchImages", "widgets_values": [1],
             "inputs": [{"name": "images", "type": "IMAGE", "link": None}]},
        ],
        "links": [[7, 1, 0, 2, 0, "LATENT"]],
    }  # fmt: skip
    p = convert(wf)
    assert p["2"]["class_type"] == "RebatchLatents" and p["2"]["inputs"] == {"latents": ["1", 0], "batch_size": 2}
    assert p["3"]["inputs"] == {"batch_size": 1}


# ------------------------------------------------------------------------------------------ with a sampler


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    from sdengine.pipeline import load_pipeline

    return load_pipeline(tiny_sd1_folder, device="cpu")


def _sampling(latent: dict[str, Any], sampler: str = "euler_ancestral") -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a star", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 3}},
        **latent,
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 17, "steps": 3, "cfg": 3.0, "sampler_name": sampler, "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "k"}},
    }  # fmt: skip


def test_a_rebatched_latent_samples_each_batch_as_its_slice_alone(sd1, tmp_path):
    """EmptyLatentImage(3) -> RebatchLatents(2) -> KSampler runs twice, on rows [0, 1] and [2]; each batch equals
    the KSampler of LatentFromBatch's slice alone (the same batch_index, so the same noise rows under ComfyUI's
    rule), and the SaveImage saves all three images."""
    g = _sampling({"5": {"class_type": "RebatchLatents", "inputs": {"latents": ["4", 0], "batch_size": 2}}})
    ex, ui, _ = _run(g, tmp_path / "list", sd1)
    got = [d["samples"] for d in ex.cache["6"].lists[0]]
    assert [z.shape[0] for z in got] == [2, 1] and len(ui["8"]["images"]) == 3
    for k, (start, length) in enumerate(((0, 2), (2, 1))):
        alone = _sampling({"5": {"class_type": "LatentFromBatch",
                                 "inputs": {"samples": ["4", 0], "batch_index": start, "length": length}}})  # fmt: skip
        ref, _, _ = _run(alone, tmp_path / f"alone{k}", sd1)
        want = ref.cache["6"].outputs[0]["samples"]
        assert torch.equal(got[k], want), (k, (got[k] - want).abs().max())
    # the row's index counts: the last batch is not a fresh one-row latent's sample
    fresh = _sampling({"5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}})
    one, _, _ = _run(fresh, tmp_path / "fresh", sd1)
    assert (one.cache["6"].outputs[0]["samples"] - got[1]).abs().max() > 1e-2


# ------------------------------------------------------------------------------------------ through the API


def test_through_the_api_the_history_lists_every_elements_images(tmp_path):
    from _comfy_live import live_client, run_prompt, view_image
    from _live_server import server_config

    g = _colours((2, 0x00FF00), (1, 0xFFFFFF))
    g["r"] = {"class_type": "RebatchImages", "inputs": {"images": ["b", 0], "batch_size": 1}}
    g["s"] = {"class_type": "SaveImage", "inputs": {"images": ["r", 0], "filename_prefix": "api"}}
    with live_client(server_config(tmp_path)) as (_, c):
        info = c.get("/object_info/RebatchLatents").json()["RebatchLatents"]
        assert info["output_is_list"] == [True] and info["is_input_list"] is True
        h = run_prompt(c, g)
        assert h["status"]["status_str"] == "success", h["status"]
        images = h["outputs"]["s"]["images"]
        assert len(images) == 3
        assert [view_image(c, i, mode="RGB")[0, 0].tolist() for i in images] == [[0, 255, 0]] * 2 + [[255] * 3]
        bad = {**g, "r": {**g["r"], "inputs": {"images": ["b", 0], "batch_size": 5000}}}
        r = c.post("/prompt", json={"prompt": bad})
        assert r.status_code == 400 and r.json()["node_errors"]["r"]["errors"][0]["type"] == "value_bigger_than_max"
