"""Subgraphs and group nodes of ComfyUI UI-format workflows -> API prompts (server/comfy/workflow.py).

The workflows are written by hand in the layout ComfyUI's frontend saves: a subgraph's definition in
``definitions.subgraphs`` (its own ``nodes``, schema-1 ``links``, ``inputs`` / ``outputs`` with ``linkIds``; links
from its input node have origin -10, links into its output node target -20), an instance being a node whose
``type`` is the definition's id, with an input entry per subgraph input (``widget`` on one whose value is a
promoted widget, its value in the instance's ``widgets_values``); a group node (``workflow>NAME``) with its
``extra.groupNodes`` entry (``nodes``, ``links`` ``[from, from_slot, to, to_slot, origin_id, type]`` with
``from`` null for a link from outside, ``external``). The expected prompts follow the frontend's flattening: an
inner node's id is the instance ids down to it and its own, joined by ':'. The image ``comfy run`` makes of each
equals the one of the flat graph.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sdengine.cli import main
from sdengine.server.comfy.workflow import WorkflowError, convert

SEED = 1234
STEPS = 2
SAMPLER = "4f6c2a9e-1b3d-4c5e-8f7a-0123456789ab"
DECODE = "9a8b7c6d-5e4f-4a3b-9c2d-fedcba987654"
KSAMPLER_WIDGETS = [999, "randomize", STEPS, 5.0, "dpmpp_2m", "karras", 1.0]


def _out(name, kind, links, **kw):
    return {"name": name, "type": kind, "links": links, **kw}


def _in(name, kind, link, **kw):
    return {"name": name, "type": kind, "link": link, **kw}


def _link(lid, origin, oslot, target, tslot, kind):
    return {
        "id": lid,
        "origin_id": origin,
        "origin_slot": oslot,
        "target_id": target,
        "target_slot": tslot,
        "type": kind,
    }


def _outer_nodes() -> list[dict]:
    """The nodes of the default graph that stay outside: the loader, the prompts, the latent, the saver."""
    return [
        {
            "id": 4,
            "type": "CheckpointLoaderSimple",
            "mode": 0,
            "inputs": [],
            "outputs": [_out("MODEL", "MODEL", [1]), _out("CLIP", "CLIP", [3, 5]), _out("VAE", "VAE", [8])],
            "widgets_values": ["emoji"],
        },
        {
            "id": 6,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [_in("clip", "CLIP", 3)],
            "outputs": [_out("CONDITIONING", "CONDITIONING", [4])],
            "widgets_values": ["a red apple"],
        },
        {
            "id": 7,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [_in("clip", "CLIP", 5)],
            "outputs": [_out("CONDITIONING", "CONDITIONING", [6])],
            "widgets_values": [""],
        },
        {
            "id": 5,
            "type": "EmptyLatentImage",
            "mode": 0,
            "inputs": [],
            "outputs": [_out("LATENT", "LATENT", [2])],
            "widgets_values": [64, 64, 1],
        },
        {
            "id": 9,
            "type": "SaveImage",
            "mode": 0,
            "inputs": [_in("images", "IMAGE", 9)],
            "outputs": [],
            "widgets_values": ["ComfyUI"],
        },
    ]


# the links of the outer graph: into the instance (node 10) and from its output to the SaveImage
OUTER_LINKS = [
    [1, 4, 0, 10, 0, "MODEL"],
    [2, 5, 0, 10, 3, "LATENT"],
    [3, 4, 1, 6, 0, "CLIP"],
    [4, 6, 0, 10, 1, "CONDITIONING"],
    [5, 4, 1, 7, 0, "CLIP"],
    [6, 7, 0, 10, 2, "CONDITIONING"],
    [8, 4, 2, 10, 4, "VAE"],
    [9, 10, 0, 9, 0, "IMAGE"],
]


def flat_workflow() -> dict:
    """The same graph without a subgraph: KSampler 3 and VAEDecode 8 in the root graph."""
    nodes = _outer_nodes() + [
        {
            "id": 3,
            "type": "KSampler",
            "mode": 0,
            "inputs": [
                _in("model", "MODEL", 1),
                _in("positive", "CONDITIONING", 4),
                _in("negative", "CONDITIONING", 6),
                _in("latent_image", "LATENT", 2),
            ],
            "outputs": [_out("LATENT", "LATENT", [7])],
            "widgets_values": [SEED, "fixed", STEPS, 5.0, "dpmpp_2m", "karras", 1.0],
        },
        {
            "id": 8,
            "type": "VAEDecode",
            "mode": 0,
            "inputs": [_in("samples", "LATENT", 7), _in("vae", "VAE", 8)],
            "outputs": [_out("IMAGE", "IMAGE", [9])],
            "widgets_values": [],
        },
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 8, 1, "VAE"],
        [9, 8, 0, 9, 0, "IMAGE"],
    ]
    return {"last_node_id": 9, "last_link_id": 9, "nodes": nodes, "links": links, "version": 0.4}


def _instance(nid: int, kind: str, seed_widget: bool = True, **kw) -> dict:
    """A node of the sampler subgraph: its inputs are the subgraph's, the seed promoted to a widget."""
    seed = _in("seed", "INT", None, widget={"name": "seed"}) if seed_widget else _in("seed", "INT", None)
    return {
        "id": nid,
        "type": kind,
        "mode": 0,
        "inputs": [
            _in("model", "MODEL", 1),
            _in("positive", "CONDITIONING", 4),
            _in("negative", "CONDITIONING", 6),
            _in("latent_image", "LATENT", 2),
            _in("vae", "VAE", 8),
            seed,
        ],
        "outputs": [_out("IMAGE", "IMAGE", [9])],
        "widgets_values": [SEED],
        **kw,
    }


def _io(name, kind, link_ids):
    return {"id": f"io-{name}", "name": name, "type": kind, "linkIds": link_ids}


def _sampler_definition(decode_in_subgraph: bool = False) -> dict:
    """KSampler 3 + VAEDecode 8 (or an instance 12 of the decode subgraph) as subgraph 'Sampler'."""
    decode: dict = {
        "id": 8,
        "type": "VAEDecode",
        "mode": 0,
        "inputs": [_in("samples", "LATENT", 7), _in("vae", "VAE", 5)],
        "outputs": [_out("IMAGE", "IMAGE", [8])],
        "widgets_values": [],
    }
    if decode_in_subgraph:
        decode = {**decode, "id": 12, "type": DECODE}
    did = decode["id"]
    return {
        "id": SAMPLER,
        "version": 1,
        "state": {"lastNodeId": 12, "lastLinkId": 8},
        "revision": 0,
        "config": {},
        "name": "Sampler",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 160]},
        "outputNode": {"id": -20, "bounding": [900, 0, 120, 60]},
        "inputs": [
            _io("model", "MODEL", [1]),
            _io("positive", "CONDITIONING", [2]),
            _io("negative", "CONDITIONING", [3]),
            _io("latent_image", "LATENT", [4]),
            _io("vae", "VAE", [5]),
            _io("seed", "INT", [6]),
        ],
        "outputs": [_io("IMAGE", "IMAGE", [8])],
        "widgets": [],
        "nodes": [
            {
                "id": 3,
                "type": "KSampler",
                "mode": 0,
                "inputs": [
                    _in("model", "MODEL", 1),
                    _in("positive", "CONDITIONING", 2),
                    _in("negative", "CONDITIONING", 3),
                    _in("latent_image", "LATENT", 4),
                    _in("seed", "INT", 6, widget={"name": "seed"}),
                ],
                "outputs": [_out("LATENT", "LATENT", [7])],
                "widgets_values": KSAMPLER_WIDGETS,  # its own seed (999) is not sent: the instance's is
            },
            decode,
        ],
        "links": [
            _link(1, -10, 0, 3, 0, "MODEL"),
            _link(2, -10, 1, 3, 1, "CONDITIONING"),
            _link(3, -10, 2, 3, 2, "CONDITIONING"),
            _link(4, -10, 3, 3, 3, "LATENT"),
            _link(5, -10, 4, did, 1, "VAE"),
            _link(6, -10, 5, 3, 4, "INT"),
            _link(7, 3, 0, did, 0, "LATENT"),
            _link(8, did, 0, -20, 0, "IMAGE"),
        ],
        "groups": [],
        "extra": {},
    }


def _decode_definition() -> dict:
    """VAEDecode 1 then a bypassed ImageInvert 2, as subgraph 'Decode' (nested in 'Sampler')."""
    return {
        "id": DECODE,
        "version": 1,
        "state": {"lastNodeId": 2, "lastLinkId": 4},
        "revision": 0,
        "name": "Decode",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 60]},
        "outputNode": {"id": -20, "bounding": [600, 0, 120, 60]},
        "inputs": [_io("samples", "LATENT", [1]), _io("vae", "VAE", [2])],
        "outputs": [_io("IMAGE", "IMAGE", [4])],
        "nodes": [
            {
                "id": 1,
                "type": "VAEDecode",
                "mode": 0,
                "inputs": [_in("samples", "LATENT", 1), _in("vae", "VAE", 2)],
                "outputs": [_out("IMAGE", "IMAGE", [3])],
                "widgets_values": [],
            },
            {
                "id": 2,
                "type": "ImageInvert",
                "mode": 4,  # bypassed: the subgraph's output reads the VAEDecode's image
                "inputs": [_in("image", "IMAGE", 3)],
                "outputs": [_out("IMAGE", "IMAGE", [4])],
                "widgets_values": [],
            },
        ],
        "links": [
            _link(1, -10, 0, 1, 0, "LATENT"),
            _link(2, -10, 1, 1, 1, "VAE"),
            _link(3, 1, 0, 2, 0, "IMAGE"),
            _link(4, 2, 0, -20, 0, "IMAGE"),
        ],
    }


def subgraph_workflow() -> dict:
    """The default graph with KSampler + VAEDecode wrapped in subgraph 'Sampler' (instance node 10)."""
    return {
        "id": "00000000-0000-4000-8000-000000000001",
        "revision": 0,
        "last_node_id": 10,
        "last_link_id": 9,
        "nodes": [*_outer_nodes(), _instance(10, SAMPLER)],
        "links": OUTER_LINKS,
        "version": 0.4,
        "definitions": {"subgraphs": [_sampler_definition()]},
        "extra": {"frontendVersion": "1.30.0"},
    }


def nested_workflow() -> dict:
    """As subgraph_workflow, the VAEDecode being in subgraph 'Decode' (node 12 of 'Sampler') with a bypassed
    ImageInvert after it."""
    wf = subgraph_workflow()
    wf["definitions"]["subgraphs"] = [_sampler_definition(decode_in_subgraph=True), _decode_definition()]
    return wf


def _api_node(kind: str, title: str, **inputs) -> dict:
    return {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}


def expected_prompt(sampler: str = "10:3", decode: str = "10:8") -> dict:
    return {
        "4": _api_node("CheckpointLoaderSimple", "Load Checkpoint", ckpt_name="emoji"),
        "6": _api_node("CLIPTextEncode", "CLIP Text Encode (Prompt)", text="a red apple", clip=["4", 1]),
        "7": _api_node("CLIPTextEncode", "CLIP Text Encode (Prompt)", text="", clip=["4", 1]),
        "5": _api_node("EmptyLatentImage", "Empty Latent Image", width=64, height=64, batch_size=1),
        "9": _api_node("SaveImage", "Save Image", filename_prefix="ComfyUI", images=[decode, 0]),
        sampler: _api_node(
            "KSampler",
            "KSampler",
            seed=SEED,
            steps=STEPS,
            cfg=5.0,
            sampler_name="dpmpp_2m",
            scheduler="karras",
            denoise=1.0,
            model=["4", 0],
            positive=["6", 0],
            negative=["7", 0],
            latent_image=["5", 0],
        ),
        decode: _api_node("VAEDecode", "VAE Decode", samples=[sampler, 0], vae=["4", 2]),
    }


def group_workflow() -> dict:
    """KSampler + VAEDecode as group node 'Sampler' (node 10, type workflow>Sampler): its config is the
    page's copy of the two nodes (index 0 and 1), the links among them and from outside (from: null)."""
    inner_sampler = {
        "id": 3,
        "type": "KSampler",
        "pos": [0, 0],
        "mode": 0,
        "inputs": [
            _in("model", "MODEL", None),
            _in("positive", "CONDITIONING", None),
            _in("negative", "CONDITIONING", None),
            _in("latent_image", "LATENT", None),
        ],
        "outputs": [_out("LATENT", "LATENT", [], slot_index=0)],
        "widgets_values": [1, "fixed", 20, 8.0, "euler", "normal", 1.0],  # the values when it was grouped
        "index": 0,
    }
    inner_decode = {
        "id": 8,
        "type": "VAEDecode",
        "pos": [300, 0],
        "mode": 0,
        "inputs": [_in("samples", "LATENT", None), _in("vae", "VAE", None)],
        "outputs": [_out("IMAGE", "IMAGE", [], slot_index=0)],
        "widgets_values": [],
        "index": 1,
    }
    config = {
        "nodes": [inner_sampler, inner_decode],
        "links": [
            [None, 0, 0, 0, 4, "MODEL"],
            [None, 0, 0, 1, 6, "CONDITIONING"],
            [None, 0, 0, 2, 7, "CONDITIONING"],
            [None, 0, 0, 3, 5, "LATENT"],
            [0, 0, 1, 0, 3, "LATENT"],
            [None, 2, 1, 1, 4, "VAE"],
        ],
        "external": [[1, 0, "IMAGE"]],
    }
    instance = {
        "id": 10,
        "type": "workflow>Sampler",
        "mode": 0,
        "inputs": [
            _in("model", "MODEL", 1),
            _in("positive", "CONDITIONING", 4),
            _in("negative", "CONDITIONING", 6),
            _in("latent_image", "LATENT", 2),
            _in("vae", "VAE", 8),
        ],
        "outputs": [_out("IMAGE", "IMAGE", [9])],
        # the group node's widgets: the KSampler's (its seed's control_after_generate too)
        "widgets_values": [SEED, "fixed", STEPS, 5.0, "dpmpp_2m", "karras", 1.0],
    }
    return {
        "last_node_id": 10,
        "last_link_id": 9,
        "nodes": [*_outer_nodes(), instance],
        "links": OUTER_LINKS,
        "version": 0.4,
        "extra": {"groupNodes": {"Sampler": config}},
    }


def _node(nodes: list[dict], nid: int) -> dict:
    return next(n for n in nodes if n["id"] == nid)


def test_a_subgraph_flattens_to_the_inner_nodes_with_path_ids():
    assert convert(subgraph_workflow()) == expected_prompt()
    # the flat graph is the same prompt with the plain ids
    flat = convert(flat_workflow())
    assert flat == expected_prompt("3", "8")
    # schema 1 at the top level (links as objects) reads the same
    wf = subgraph_workflow()
    wf["links"] = [_link(*link) for link in wf["links"]]
    wf["version"] = 1
    assert convert(wf) == expected_prompt()


def test_promoted_widget_values_and_unlinked_subgraph_inputs():
    # a value list one longer per seed (an older page's control_after_generate slot) is read too
    wf = subgraph_workflow()
    _node(wf["nodes"], 10)["widgets_values"] = [SEED, "fixed"]
    assert convert(wf) == expected_prompt()
    # no promoted widget on the seed input, nothing linked: the inner KSampler keeps its own seed (999)
    wf = subgraph_workflow()
    _node(wf["nodes"], 10).update(inputs=_instance(10, SAMPLER, seed_widget=False)["inputs"], widgets_values=[])
    assert convert(wf)["10:3"]["inputs"]["seed"] == 999
    # the promoted seed fed by a PrimitiveNode of the outer graph: its value
    wf = subgraph_workflow()
    _node(wf["nodes"], 10)["inputs"][5]["link"] = 20
    wf["nodes"].append(
        {"id": 11, "type": "PrimitiveNode", "mode": 0, "outputs": [_out("INT", "INT", [20])], "widgets_values": [77]}
    )
    wf["links"] = [*wf["links"], [20, 11, 0, 10, 5, "INT"]]
    assert convert(wf)["10:3"]["inputs"]["seed"] == 77
    # a subgraph input connected to nothing outside leaves a link input out (the page sends none)
    wf = subgraph_workflow()
    _node(wf["nodes"], 10)["inputs"][4]["link"] = None
    assert "vae" not in convert(wf)["10:8"]["inputs"]


def test_an_instance_saved_by_an_older_page_matches_its_inputs_by_name():
    # frontend 1.24 saved an instance without the inputs of its promoted widgets, in its own order: the inputs
    # are matched to the subgraph's by name, and the subgraph input that feeds an inner widget is the promoted one
    wf = subgraph_workflow()
    instance = _node(wf["nodes"], 10)
    instance["inputs"] = list(reversed(instance["inputs"][:5]))
    assert convert(wf) == expected_prompt()
    # a later page's instance that promotes nothing (its proxyWidgets show the inner widget): the inner value
    instance.update(widgets_values=[], properties={"proxyWidgets": [["3", "seed"]]})
    assert convert(wf)["10:3"]["inputs"]["seed"] == 999


def test_two_instances_of_one_subgraph_get_their_own_ids_and_widget_values():
    wf = subgraph_workflow()
    second = _instance(11, SAMPLER, widgets_values=[SEED + 1])
    second["outputs"] = [_out("IMAGE", "IMAGE", [21])]
    wf["nodes"] += [
        second,
        {"id": 12, "type": "SaveImage", "mode": 0, "inputs": [_in("images", "IMAGE", 21)], "widgets_values": ["b"]},
    ]
    wf["links"] = [*wf["links"], [21, 11, 0, 12, 0, "IMAGE"]]
    got = convert(wf)
    assert got["10:3"]["inputs"]["seed"] == SEED and got["11:3"]["inputs"]["seed"] == SEED + 1
    assert got["11:8"]["inputs"]["samples"] == ["11:3", 0] and got["12"]["inputs"]["images"] == ["11:8", 0]


def test_nested_subgraphs_and_a_bypassed_inner_node():
    assert convert(nested_workflow()) == expected_prompt("10:3", "10:12:1")


def test_muted_and_bypassed_instances_and_inner_nodes_follow_the_pages_rules():
    # a muted instance: none of its nodes is sent, and the input linked to it is left out
    wf = subgraph_workflow()
    _node(wf["nodes"], 10)["mode"] = 2
    got = convert(wf)
    assert not [k for k in got if k.startswith("10")] and "images" not in got["9"]["inputs"]
    # a bypassed instance: passed through by type (it has no IMAGE input: the SaveImage's images is left out)
    _node(wf["nodes"], 10)["mode"] = 4
    got = convert(wf)
    assert not [k for k in got if k.startswith("10")] and "images" not in got["9"]["inputs"]
    # a muted inner node is dropped as an ordinary one: the VAEDecode's samples are left out
    wf = subgraph_workflow()
    _node(wf["definitions"]["subgraphs"][0]["nodes"], 3)["mode"] = 2
    got = convert(wf)
    assert "10:3" not in got and "samples" not in got["10:8"]["inputs"]
    # the bypassed ImageInvert of the nested subgraph, un-bypassed, is sent with its path id
    wf = nested_workflow()
    _node(wf["definitions"]["subgraphs"][1]["nodes"], 2)["mode"] = 0
    got = convert(wf)
    assert got["10:12:2"]["inputs"] == {"image": ["10:12:1", 0]} and got["9"]["inputs"]["images"] == ["10:12:2", 0]


INVERT = "0a1b2c3d-4e5f-4a6b-8c7d-8e9fa0b1c2d3"


def invert_workflow(mode: int) -> dict:
    """The flat graph with an instance (node 20, ``mode``) of subgraph 'Invert' (IMAGE in, ImageInvert 1, IMAGE
    out, and the input passed straight to a second output) between the VAEDecode and the SaveImage."""
    wf = flat_workflow()
    _node(wf["nodes"], 8)["outputs"] = [_out("IMAGE", "IMAGE", [30])]
    _node(wf["nodes"], 9)["inputs"] = [_in("images", "IMAGE", 31)]
    wf["nodes"].append(
        {
            "id": 20,
            "type": INVERT,
            "mode": mode,
            "inputs": [_in("image", "IMAGE", 30)],
            "outputs": [_out("IMAGE", "IMAGE", [31]), _out("original", "IMAGE", [32])],
        }
    )
    wf["nodes"].append(
        {"id": 21, "type": "PreviewImage", "mode": 0, "inputs": [_in("images", "IMAGE", 32)], "widgets_values": []}
    )
    wf["links"] = [
        *[link for link in wf["links"] if link[0] != 9],
        [30, 8, 0, 20, 0, "IMAGE"],
        [31, 20, 0, 9, 0, "IMAGE"],
        [32, 20, 1, 21, 0, "IMAGE"],
    ]
    wf["definitions"] = {
        "subgraphs": [
            {
                "id": INVERT,
                "version": 1,
                "state": {},
                "revision": 0,
                "name": "Invert",
                "inputNode": {"id": -10, "bounding": [0, 0, 1, 1]},
                "outputNode": {"id": -20, "bounding": [0, 0, 1, 1]},
                "inputs": [_io("image", "IMAGE", [1, 3])],
                "outputs": [_io("IMAGE", "IMAGE", [2]), _io("original", "IMAGE", [3])],
                "nodes": [
                    {
                        "id": 1,
                        "type": "ImageInvert",
                        "mode": 0,
                        "inputs": [_in("image", "IMAGE", 1)],
                        "outputs": [_out("IMAGE", "IMAGE", [2])],
                        "widgets_values": [],
                    }
                ],
                "links": [
                    _link(1, -10, 0, 1, 0, "IMAGE"),
                    _link(2, 1, 0, -20, 0, "IMAGE"),
                    _link(3, -10, 0, -20, 1, "IMAGE"),
                ],
            }
        ]
    }
    return wf


def test_a_bypassed_instance_passes_its_input_of_the_same_type_through():
    got = convert(invert_workflow(0))
    assert got["20:1"] == _api_node("ImageInvert", "Invert Image", image=["8", 0])
    assert got["9"]["inputs"]["images"] == ["20:1", 0] and got["21"]["inputs"]["images"] == ["8", 0]
    got = convert(invert_workflow(4))
    assert "20:1" not in got and got["9"]["inputs"]["images"] == ["8", 0] and got["21"]["inputs"]["images"] == ["8", 0]
    got = convert(invert_workflow(2))
    assert "20:1" not in got and "images" not in got["9"]["inputs"] and "images" not in got["21"]["inputs"]


def test_a_group_node_expands_to_its_nodes_with_its_widget_values():
    assert convert(group_workflow()) == expected_prompt("10:0", "10:1")
    # the older prefix workflow/NAME names the same group
    wf = group_workflow()
    _node(wf["nodes"], 10)["type"] = "workflow/Sampler"
    assert convert(wf) == expected_prompt("10:0", "10:1")


def test_a_group_nodes_converted_widget_is_an_input_after_the_others_and_a_widget_after_the_others():
    # the inner KSampler's seed was converted to an input: the group node's inputs end with it, its widgets too
    wf = group_workflow()
    config = wf["extra"]["groupNodes"]["Sampler"]
    config["nodes"][0]["inputs"].append(_in("seed", "INT", None, widget={"name": "seed"}))
    instance = _node(wf["nodes"], 10)
    instance["inputs"].append(_in("seed", "INT", 20, widget={"name": "seed"}))
    instance["widgets_values"] = [STEPS, 5.0, "dpmpp_2m", "karras", 1.0, 999, "fixed"]
    wf["nodes"].append(
        {"id": 11, "type": "PrimitiveNode", "mode": 0, "outputs": [_out("INT", "INT", [20])], "widgets_values": [SEED]}
    )
    wf["links"] = [*wf["links"], [20, 11, 0, 10, 5, "INT"]]
    assert convert(wf) == expected_prompt("10:0", "10:1")
    instance["inputs"][5]["link"] = None  # not linked: the group node's widget value
    assert convert(wf)["10:0"]["inputs"]["seed"] == 999


def test_object_info_widgets_give_the_same_prompts(tmp_path):
    from types import SimpleNamespace

    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.nodes import Outputs, object_info
    from sdengine.server.comfy.registry import NODES

    env = SimpleNamespace(
        catalog=Catalog(None, None, None), folders=Outputs(tmp_path, tmp_path / "in", tmp_path / "t"), limits={}
    )
    info = {name: object_info(ndef, env) for name, ndef in NODES.items()}
    assert convert(nested_workflow(), info) == expected_prompt("10:3", "10:12:1")
    assert convert(group_workflow(), info) == expected_prompt("10:0", "10:1")


def _missing_subgraph(wf: dict) -> dict:
    _node(wf["nodes"], 10)["type"] = "11111111-2222-4333-8444-555555555555"
    return wf


def _cycle(wf: dict) -> dict:
    wf = nested_workflow()
    wf["definitions"]["subgraphs"][1]["nodes"][0]["type"] = SAMPLER  # 'Decode' holds a 'Sampler'
    return wf


def _dangling(wf: dict) -> dict:
    _node(wf["definitions"]["subgraphs"][0]["nodes"], 8)["inputs"][1]["link"] = 77
    return wf


def _dangling_output(wf: dict) -> dict:
    wf["definitions"]["subgraphs"][0]["outputs"][0]["linkIds"] = [78]
    return wf


def _bad_group_widgets(wf: dict) -> dict:
    _node(wf["nodes"], 10)["widgets_values"] = [SEED, STEPS]
    return wf


def _unknown_group(wf: dict) -> dict:
    _node(wf["nodes"], 10)["type"] = "workflow>Other"
    return wf


@pytest.mark.parametrize(
    "make,break_it,says",
    [
        (subgraph_workflow, _missing_subgraph, "node 10 (11111111-2222-4333-8444-555555555555): uses subgraph 1111"),
        (subgraph_workflow, _cycle, "subgraphs contain each other: Sampler -> Decode -> Sampler"),
        (subgraph_workflow, _dangling, "node 10:8 (VAEDecode) in subgraph Sampler: input 'vae' uses link 77"),
        (subgraph_workflow, _dangling_output, "node 9 (SaveImage): input 'images' uses link 78"),
        (group_workflow, _bad_group_widgets, "node 10 (workflow>Sampler): group node 'Sampler': 2 widget values"),
        (group_workflow, _unknown_group, "group node 'Other' is not in the workflow's extra.groupNodes"),
        (
            subgraph_workflow,
            lambda wf: _node(wf["definitions"]["subgraphs"][0]["nodes"], 3).update(type="NoSuchNode") or wf,
            "node 10:3 (NoSuchNode) in subgraph Sampler: unknown node type",
        ),
    ],
)
def test_bad_subgraphs_are_one_line_errors(make, break_it, says):
    with pytest.raises(WorkflowError) as e:
        convert(break_it(make()))
    assert says in str(e.value) and "\n" not in str(e.value), str(e.value)


def _chain(levels: int, width: int) -> dict:
    """Subgraph k holding ``width`` instances of subgraph k+1, the last one a VAEDecode: 'width ** levels' nodes."""

    def sid(k: int) -> str:
        return f"00000000-0000-4000-8000-{k:012d}"

    defs = []
    for k in range(levels):
        inner = [{"id": j + 1, "type": sid(k + 1), "mode": 0, "inputs": []} for j in range(width)]
        if k == levels - 1:
            inner = [{"id": 1, "type": "VAEDecode", "mode": 0, "inputs": [], "widgets_values": []}]
        defs.append({"id": sid(k), "name": f"level{k}", "nodes": inner, "links": []})
    return {
        "nodes": [{"id": 1, "type": sid(0), "mode": 0, "inputs": []}],
        "links": [],
        "definitions": {"subgraphs": defs},
    }


def test_deep_or_huge_subgraph_nests_are_refused_in_one_line():
    assert list(convert(_chain(3, 2))) == [f"1:{a}:{b}:1" for a in (1, 2) for b in (1, 2)]
    with pytest.raises(
        WorkflowError, match=r"^node 1(:1){64} \(.*\) in subgraph level63: subgraphs nested more than 64 deep$"
    ):
        convert(_chain(70, 1))
    with pytest.raises(WorkflowError, match=r"the subgraphs expand to more than 100000 nodes$"):
        convert(_chain(20, 2))


def _cli_image(capsys, workflow: dict, tmp: Path, name: str) -> np.ndarray:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(workflow))
    capsys.readouterr()
    assert main(["comfy", "run", str(path), "--out", str(tmp / name), "--device", "cpu", "--no-progress"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    with Image.open(line) as im:
        return np.asarray(im.convert("RGB"))


def test_comfy_run_makes_the_flat_graphs_image_from_subgraphs_and_group_nodes(tmp_path, capsys):
    flat = _cli_image(capsys, flat_workflow(), tmp_path, "flat")
    assert flat.shape == (64, 64, 3) and flat.std() > 1  # a picture, not a flat colour
    for name, wf in [("subgraph", subgraph_workflow()), ("nested", nested_workflow()), ("group", group_workflow())]:
        assert np.array_equal(_cli_image(capsys, copy.deepcopy(wf), tmp_path, name), flat), name
