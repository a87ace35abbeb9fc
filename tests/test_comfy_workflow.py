"""ComfyUI UI-format workflows -> API prompts (server/comfy/workflow.py) and ``sdengine comfy run|convert``.

The UI workflow is written here from the layout of ComfyUI's default workflow (node ids 3-9, the page's widget
order: KSampler's ``[seed, control_after_generate, steps, cfg, sampler_name, scheduler, denoise]``), plus the
frontend-only pieces the converter has to undo: a Reroute on the VAE, a PrimitiveNode feeding the seed through a
converted widget, a Note, a muted SaveImage and a bypassed ImageInvert. The expected API prompt is what ComfyUI's
page queues for that graph (its ``graphToPrompt``: titles are the nodes' display names). The CLI's image of the
UI form equals the image ``POST /prompt`` of a live server makes for the API form.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from _comfy_live import live_client, run_prompt, view_image
from _live_server import server_config
from sdengine.cli import main
from sdengine.server.comfy.workflow import WorkflowError, convert, read_workflow_file

SEED = 1234
STEPS = 2


def ui_workflow() -> dict:
    def out(name, kind, links, **kw):
        return {"name": name, "type": kind, "links": links, **kw}

    def inp(name, kind, link, **kw):
        return {"name": name, "type": kind, "link": link, **kw}

    nodes = [
        {
            "id": 4,
            "type": "CheckpointLoaderSimple",
            "mode": 0,
            "inputs": [],
            "outputs": [out("MODEL", "MODEL", [1]), out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [8])],
            "widgets_values": ["emoji"],
        },
        {
            "id": 6,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [inp("clip", "CLIP", 3)],
            "outputs": [out("CONDITIONING", "CONDITIONING", [4])],
            "widgets_values": ["a red apple"],
        },
        {
            "id": 7,
            "type": "CLIPTextEncode",
            "mode": 0,
            "inputs": [inp("clip", "CLIP", 5)],
            "outputs": [out("CONDITIONING", "CONDITIONING", [6])],
            "widgets_values": [""],
        },
        {
            "id": 5,
            "type": "EmptyLatentImage",
            "mode": 0,
            "inputs": [],
            "outputs": [out("LATENT", "LATENT", [2])],
            "widgets_values": [64, 64, 1],
        },
        {
            "id": 3,
            "type": "KSampler",
            "mode": 0,
            "inputs": [
                inp("model", "MODEL", 1),
                inp("positive", "CONDITIONING", 4),
                inp("negative", "CONDITIONING", 6),
                inp("latent_image", "LATENT", 2),
                inp("seed", "INT", 10, widget={"name": "seed"}),  # converted to an input, fed by the primitive
            ],
            "outputs": [out("LATENT", "LATENT", [7])],
            # the widget's own seed (999) is not sent: the primitive's value is
            "widgets_values": [999, "randomize", STEPS, 5.0, "dpmpp_2m", "karras", 1.0],
        },
        {
            "id": 10,
            "type": "Reroute",
            "mode": 0,
            "inputs": [inp("", "*", 8)],
            "outputs": [out("", "VAE", [13])],
            "properties": {"showOutputText": False, "horizontal": False},
        },
        {
            "id": 8,
            "type": "VAEDecode",
            "mode": 0,
            "inputs": [inp("samples", "LATENT", 7), inp("vae", "VAE", 13)],
            "outputs": [out("IMAGE", "IMAGE", [9, 14])],
            "widgets_values": [],
        },
        {
            "id": 12,  # bypassed: SaveImage reads VAEDecode's image
            "type": "ImageInvert",
            "mode": 4,
            "inputs": [inp("image", "IMAGE", 9)],
            "outputs": [out("IMAGE", "IMAGE", [11])],
            "widgets_values": [],
        },
        {
            "id": 9,
            "type": "SaveImage",
            "mode": 0,
            "inputs": [inp("images", "IMAGE", 11)],
            "outputs": [],
            "widgets_values": ["ComfyUI"],
        },
        {
            "id": 15,  # muted: not sent
            "type": "SaveImage",
            "mode": 2,
            "inputs": [inp("images", "IMAGE", 14)],
            "outputs": [],
            "widgets_values": ["muted"],
        },
        {
            "id": 11,
            "type": "PrimitiveNode",
            "mode": 0,
            "inputs": [],
            "outputs": [out("INT", "INT", [10], widget={"name": "seed"})],
            "title": "seed",
            "widgets_values": [SEED, "fixed"],
        },
        {"id": 14, "type": "Note", "mode": 0, "inputs": [], "outputs": [], "widgets_values": ["sampler notes"]},
    ]
    links = [
        [1, 4, 0, 3, 0, "MODEL"],
        [2, 5, 0, 3, 3, "LATENT"],
        [3, 4, 1, 6, 0, "CLIP"],
        [4, 6, 0, 3, 1, "CONDITIONING"],
        [5, 4, 1, 7, 0, "CLIP"],
        [6, 7, 0, 3, 2, "CONDITIONING"],
        [7, 3, 0, 8, 0, "LATENT"],
        [8, 4, 2, 10, 0, "*"],
        [9, 8, 0, 12, 0, "IMAGE"],
        [10, 11, 0, 3, 4, "INT"],
        [11, 12, 0, 9, 0, "IMAGE"],
        [13, 10, 0, 8, 1, "VAE"],
        [14, 8, 0, 15, 0, "IMAGE"],
    ]
    return {
        "last_node_id": 15,
        "last_link_id": 14,
        "nodes": nodes,
        "links": links,
        "groups": [{"title": "sampling", "bounding": [0, 0, 100, 100]}],
        "config": {},
        "extra": {"ds": {"scale": 1, "offset": [0, 0]}},
        "version": 0.4,
    }


def expected_prompt() -> dict:
    return {
        "3": {
            "inputs": {
                "seed": SEED,
                "steps": STEPS,
                "cfg": 5.0,
                "sampler_name": "dpmpp_2m",
                "scheduler": "karras",
                "denoise": 1.0,
                "model": ["4", 0],
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": ["5", 0],
            },
            "class_type": "KSampler",
            "_meta": {"title": "KSampler"},
        },
        "4": {
            "inputs": {"ckpt_name": "emoji"},
            "class_type": "CheckpointLoaderSimple",
            "_meta": {"title": "Load Checkpoint"},
        },
        "5": {
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
            "class_type": "EmptyLatentImage",
            "_meta": {"title": "Empty Latent Image"},
        },
        "6": {
            "inputs": {"text": "a red apple", "clip": ["4", 1]},
            "class_type": "CLIPTextEncode",
            "_meta": {"title": "CLIP Text Encode (Prompt)"},
        },
        "7": {
            "inputs": {"text": "", "clip": ["4", 1]},
            "class_type": "CLIPTextEncode",
            "_meta": {"title": "CLIP Text Encode (Prompt)"},
        },
        "8": {
            "inputs": {"samples": ["3", 0], "vae": ["4", 2]},
            "class_type": "VAEDecode",
            "_meta": {"title": "VAE Decode"},
        },
        "9": {
            "inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]},
            "class_type": "SaveImage",
            "_meta": {"title": "Save Image"},
        },
    }


def schema1(wf: dict) -> dict:
    """The same graph in workflow schema 1.0: links as objects."""
    wf = copy.deepcopy(wf)
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    wf["links"] = [dict(zip(keys, link, strict=True)) for link in wf["links"]]
    wf["version"] = 1
    return wf


def test_the_default_graph_converts_to_the_prompt_comfyuis_page_queues():
    assert convert(ui_workflow()) == expected_prompt()
    assert convert(schema1(ui_workflow())) == expected_prompt()


def test_muted_and_bypassed_nodes_follow_the_pages_rules():
    # an input linked to a muted node is left out (the page's last pass), so the sampler misses its latent
    wf = ui_workflow()
    next(n for n in wf["nodes"] if n["id"] == 5)["mode"] = 2
    got = convert(wf)
    assert "5" not in got and "latent_image" not in got["3"]["inputs"]
    # a bypassed node with no input of the consumer's type: the input is left out too
    wf = ui_workflow()
    node = next(n for n in wf["nodes"] if n["id"] == 12)
    node["inputs"][0]["type"] = "MASK"
    assert "images" not in convert(wf)["9"]["inputs"]
    # a bypassed or muted node need not be known (a custom node switched off)
    wf = ui_workflow()
    _set(wf, 12, type="SomeCustomFilter")
    _set(wf, 15, type="SomeCustomSaver")
    assert convert(wf) == expected_prompt()
    # a widget converted to an input but linked to nothing keeps its widget value; the control value is not sent
    wf = ui_workflow()
    ks = next(n for n in wf["nodes"] if n["id"] == 3)
    ks["inputs"][4]["link"] = None
    assert convert(wf)["3"]["inputs"]["seed"] == 999 and "control_after_generate" not in convert(wf)["3"]["inputs"]


def _set(wf: dict, node_id: int, **fields) -> dict:
    next(n for n in wf["nodes"] if n["id"] == node_id).update(fields)
    return wf


@pytest.mark.parametrize(
    "break_it,says",
    [
        (lambda wf: _set(wf, 6, type="NoSuchNode"), "node 6 (NoSuchNode): unknown node type"),
        (lambda wf: _set(wf, 3, widgets_values=[SEED, 2, 5.0, "euler", "normal", 1.0]), "node 3 (KSampler): 6 widget"),
        (lambda wf: _set(wf, 8, inputs=[{"name": "samples", "type": "LATENT", "link": 99}]), "node 8 (VAEDecode)"),
        (lambda wf: {**wf, "links": [*wf["links"][:-1], [14, 77, 0, 15, 0, "IMAGE"]]}, "node 15 (SaveImage)"),
        (lambda wf: {**wf, "links": [[1, 2]]}, "workflow link #0 is malformed"),
        (lambda wf: _set(wf, 5, widgets_values="64"), "node 5 (EmptyLatentImage): widgets_values"),
    ],
)
def test_bad_workflows_are_one_line_naming_the_node(break_it, says):
    wf = break_it(ui_workflow())
    if says == "node 15 (SaveImage)":  # a link from an absent node: even into a muted node it is caught on use
        _set(wf, 15, mode=0)
    with pytest.raises(WorkflowError) as e:
        convert(wf)
    assert says in str(e.value) and "\n" not in str(e.value)


def _png_with(path: Path, **texts: str) -> Path:
    info = PngInfo()
    for k, v in texts.items():
        info.add_text(k, v)
    Image.new("RGB", (8, 8), (40, 40, 40)).save(path, pnginfo=info)
    return path


def _cli_image(capsys, workflow: Path, out: Path) -> np.ndarray:
    capsys.readouterr()
    assert main(["comfy", "run", str(workflow), "--out", str(out), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and Path(lines[0]).parent == out, lines
    with Image.open(lines[0]) as im:
        assert json.loads(im.text["prompt"])["3"]["inputs"]["seed"] == SEED  # ComfyUI's PNG text, as SaveImage
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def server_image(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    """The image a live server's POST /prompt makes for the API form."""
    with live_client(server_config(tmp_path_factory.mktemp("comfyrun"))) as (_, c):
        (im,) = run_prompt(c, expected_prompt())["outputs"]["9"]["images"]
        return view_image(c, im, mode="RGB")


def test_cli_runs_the_ui_form_as_the_server_runs_the_api_form(tmp_path, capsys, server_image):
    ui = tmp_path / "ui.json"
    ui.write_text(json.dumps(ui_workflow()))
    got = _cli_image(capsys, ui, tmp_path / "out")
    assert got.shape == (64, 64, 3) and got.std() > 1  # a picture, not a flat colour
    assert np.array_equal(got, server_image)
    # the CLI's PNG carries both of ComfyUI's texts: it runs again, from its `prompt`
    prompt, workflow = read_workflow_file(next((tmp_path / "out").glob("*.png")))
    assert {k: {**v, "_meta": None} for k, v in prompt.items()} == {
        k: {**v, "_meta": None} for k, v in expected_prompt().items()
    }
    assert workflow == ui_workflow()
    # comfy convert writes the API form
    api = tmp_path / "api.json"
    assert main(["comfy", "convert", str(ui), "-o", str(api)]) == 0
    assert json.loads(api.read_text()) == expected_prompt()


def test_cli_runs_a_comfyui_png_from_its_prompt_or_its_workflow(tmp_path, capsys, server_image):
    both = _png_with(tmp_path / "both.png", prompt=json.dumps(expected_prompt()), workflow=json.dumps(ui_workflow()))
    assert np.array_equal(_cli_image(capsys, both, tmp_path / "a"), server_image)
    # the prompt text wins: a workflow text that would fail is not read
    wf_bad = _set(ui_workflow(), 6, type="NoSuchNode")
    mixed = _png_with(tmp_path / "mixed.png", prompt=json.dumps(expected_prompt()), workflow=json.dumps(wf_bad))
    assert read_workflow_file(mixed)[0] == expected_prompt()
    only_ui = _png_with(tmp_path / "ui.png", workflow=json.dumps(ui_workflow()))
    assert read_workflow_file(only_ui)[0] == expected_prompt()


@pytest.mark.parametrize(
    "content,says",
    [
        (b"{not json", "is not JSON"),
        (b"[1, 2]", "not a ComfyUI workflow"),
        (json.dumps({"1": {"class_type": "Nope", "inputs": {}}}).encode(), "node 1 (Nope)"),
        (json.dumps(_set(ui_workflow(), 3, widgets_values=[1])).encode(), "node 3 (KSampler): 1 widget values"),
        (b"png", "a PNG without ComfyUI's 'prompt' or 'workflow' text"),
        (  # a value a node refuses when it runs: the node named
            json.dumps(
                {
                    **expected_prompt(),
                    "9": {**expected_prompt()["9"], "inputs": {"filename_prefix": "../x", "images": ["8", 0]}},
                }
            ).encode(),
            "node 9 (SaveImage)",
        ),
        (  # validation: the ComfyUI error and the node
            json.dumps(
                {**expected_prompt(), "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope"}}}
            ).encode(),
            "node 4 (CheckpointLoaderSimple): Value not in list",
        ),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path, capsys, content, says):
    path = tmp_path / "wf.json"
    if content == b"png":
        path = _png_with(tmp_path / "plain.png", parameters="a1111 text")
    else:
        path.write_bytes(content)
    capsys.readouterr()
    assert main(["comfy", "run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err, err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def _object_info_of_registry(tmp: Path) -> dict:
    from types import SimpleNamespace

    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.nodes import Outputs, object_info
    from sdengine.server.comfy.registry import NODES

    env = SimpleNamespace(catalog=Catalog(None, None, None), folders=Outputs(tmp, tmp / "in", tmp / "t"), limits={})
    return {name: object_info(ndef, env) for name, ndef in NODES.items()}


def test_object_info_gives_the_same_widgets_as_the_registry(tmp_path):
    from sdengine.server.comfy.registry import NODES
    from sdengine.server.comfy.workflow import widget_names, widget_names_from_info

    info = _object_info_of_registry(tmp_path)
    assert {n: widget_names_from_info(info[n]) for n in NODES} == {n: widget_names(d) for n, d in NODES.items()}
    assert widget_names(NODES["LoadImage"]) == ["image", "upload"]  # ComfyUI's ["example.png", "image"]
    assert convert(ui_workflow(), info) == expected_prompt()
    # LoadImage's upload button: its value ("image") is not sent, and a list that leaves it out is read too
    for values in (["example.png", "image"], ["example.png"]):
        got = convert({"nodes": [{"id": 1, "type": "LoadImage", "widgets_values": values}], "links": []})
        assert got["1"]["inputs"] == {"image": "example.png"}


def test_a_custom_nodes_object_info_converts_its_widgets_as_the_page_builds_them(tmp_path, capsys):
    info = {
        "MySampler": {
            "input": {
                "required": {
                    "model": ["MODEL"],
                    "strength": ["FLOAT", {"forceInput": True}],  # a socket, no widget
                    "noise_seed": ["INT", {"default": 0}],  # a seed: + control_after_generate
                    "mode": [["fast", "slow"], {"default": "fast"}],
                    "image": [["a.png"], {"image_upload": True}],  # + the upload button
                },
                "optional": {"jitter": ["INT", {"control_after_generate": True}], "note": ["STRING", {}]},
            },
            "input_order": {
                "required": ["model", "strength", "noise_seed", "mode", "image"],
                "optional": ["jitter", "note"],
            },
            "display_name": "My Sampler",
        },
        "MyLoader": {"input": {"required": {}}, "output": ["MODEL", "FLOAT"], "display_name": "My Loader"},
    }
    wf = {
        "nodes": [
            {"id": 1, "type": "MyLoader", "inputs": [], "widgets_values": []},
            {
                "id": 2,
                "type": "MySampler",
                "title": "sampler",
                "inputs": [
                    {"name": "model", "type": "MODEL", "link": 1},
                    {"name": "strength", "type": "FLOAT", "link": 2},
                ],
                "widgets_values": [7, "fixed", "slow", "b.png", "image", 3, "increment", "hi"],
            },
        ],
        "links": [[1, 1, 0, 2, 0, "MODEL"], [2, 1, 1, 2, 1, "FLOAT"]],
    }
    assert convert(wf, info) == {
        "1": {"inputs": {}, "class_type": "MyLoader", "_meta": {"title": "My Loader"}},
        "2": {
            "inputs": {
                "noise_seed": 7,
                "mode": "slow",
                "image": "b.png",
                "jitter": 3,
                "note": "hi",
                "model": ["1", 0],
                "strength": ["1", 1],
            },
            "class_type": "MySampler",
            "_meta": {"title": "sampler"},
        },
    }
    with pytest.raises(WorkflowError, match=r"node 2 \(MySampler\): 7 widget values for 8 widgets"):
        short = {**wf["nodes"][1], "widgets_values": [7, "slow", "b.png", "image", 3, "increment", "hi"]}
        convert({**wf, "nodes": [wf["nodes"][0], short]}, info)
    with pytest.raises(WorkflowError, match=r"node 2 \(KSampler\): unknown node type: a node type the object_info"):
        convert({"nodes": [{"id": 2, "type": "KSampler"}], "links": []}, info)
    # the same through `comfy convert --object-info`
    (tmp_path / "info.json").write_text(json.dumps(info))
    (tmp_path / "wf.json").write_text(json.dumps(wf))
    capsys.readouterr()
    assert main(["comfy", "convert", str(tmp_path / "wf.json"), "--object-info", str(tmp_path / "info.json")]) == 0
    assert json.loads(capsys.readouterr().out) == convert(wf, info)


def test_an_output_that_fails_validation_is_skipped_with_a_warning_line(tmp_path, capsys, server_image):
    prompt = {
        **expected_prompt(),
        "20": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
        "21": {"class_type": "SaveImage", "inputs": {"filename_prefix": "other", "images": ["20", 0]}},
    }
    path = tmp_path / "api.json"
    path.write_text(json.dumps({"prompt": prompt}))  # a POST /prompt body is read too
    capsys.readouterr()
    assert main(["comfy", "run", str(path), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    (line,) = captured.out.splitlines()
    assert Path(line).name.startswith("ComfyUI_") and np.array_equal(
        np.asarray(Image.open(line).convert("RGB")), server_image
    )
    (warning,) = captured.err.splitlines()
    assert warning.startswith("sdengine: warning: node 20 (LoadImage): ") and "skipped" in warning
