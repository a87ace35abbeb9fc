"""SD3 and Flux ControlNets through sdengine's ComfyUI nodes (ControlNetLoader, ControlNetApplyAdvanced with its
vae, ControlNetApplySD3, SetUnionControlNetType): a workflow's image equals the Python pipeline's with the same
unit within 1e-5 on tiny random models and ControlNets saved by diffusers; what does not fit is a one-line node
error."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
import test_comfy_sd3_flux as base  # noqa: E402
from _emoji_models import TINY_EMOJI_UNET  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from sdengine.server.catalog import Catalog  # noqa: E402
from sdengine.server.comfy.graph import Executor, NodeFailed, validate  # noqa: E402
from sdengine.server.comfy.nodes import Outputs, RunContext  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import forget_parts  # noqa: E402
from test_comfy_sd3_flux import NEGATIVE, PROMPT, SEED, STEPS, TOL, _pipeline_image, _pixels, flux_graph  # noqa: E402
from test_dit_control_pipeline import _flux_controlnet, _picture, _sd3_controlnet  # noqa: E402

sd3, flux = base.sd3, base.flux  # their fixtures: the tiny SD3 and Flux models in ComfyUI's files

SD3_CKPT = "sd3-tiny.safetensors"


@pytest.fixture(scope="module")
def sd3_cn(sd3):
    root, pipe = sd3
    cns = root / "controlnets"
    _sd3_controlnet(root / "sd3-folder", cns / "sd3-cn", 31)
    _sd3_controlnet(root / "sd3-folder", cns / "sd3-cn2", 32)
    (root / "in").mkdir(exist_ok=True)
    _picture(16, 16, 3).save(root / "in" / "hint.png")
    return root, pipe


@pytest.fixture(scope="module")
def flux_cn(flux):
    root, pipe = flux
    cns = root / "controlnets"
    _flux_controlnet(root / "flux-folder", cns / "flux-cn", 41)
    _flux_controlnet(root / "flux-folder", cns / "flux-union", 42, num_mode=4)
    (root / "in").mkdir(exist_ok=True)
    _picture(16, 16, 4).save(root / "in" / "hint.png")
    return root, pipe


def _run(root: Path, prompt: dict[str, Any], pipes: dict[str, Any] | None = None) -> dict[str, Any]:
    forget_parts()
    catalog = Catalog(root / "models", None, root / "controlnets", vaes_dir=root / "vaes")
    folders = Outputs(root / "out", root / "in", root / "temp")
    loaded = dict(pipes or {})

    def pipeline(ref: str) -> Any:
        if ref not in loaded:
            loaded[ref] = sdengine.load_pipeline(ref, device="cpu")
        return loaded[ref]

    class Env:
        def __init__(self) -> None:
            self.catalog, self.folders, self.limits = catalog, folders, {}

    graph, _, errors = validate(prompt, Env())
    assert not errors, errors
    ctx = RunContext(pipeline=pipeline, catalog=catalog, folders=folders, seed_rule="comfyui", device="cpu",
                     save_lock=threading.Lock())  # fmt: skip
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    return {nid: entry.outputs for nid, entry in ex.cache.items()}


def _control(pos: list, neg: list, net: list, vae: list | None, strength: float, start=0.0, end=1.0) -> dict:
    inputs = {"positive": pos, "negative": neg, "control_net": net, "image": ["h", 0], "strength": strength,
              "start_percent": start, "end_percent": end}  # fmt: skip
    if vae is not None:
        inputs["vae"] = vae
    return {"class_type": "ControlNetApplyAdvanced", "inputs": inputs}


def sd3_cn_graph(name: str = "sd3-cn", vae: bool = True, **apply: Any) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD3_CKPT}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["1", 1]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["1", 1]}},
        "c": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}},
        "h": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "a": _control(["3", 0], ["4", 0], ["c", 0], ["1", 2] if vae else None, **{"strength": 0.8, **apply}),
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": SEED,
                "steps": STEPS,
                "cfg": 4.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["a", 0],
                "negative": ["a", 1],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }


def _ref(root: Path, pipe: Any) -> dict[str, Any]:
    return {str((root / "models" / SD3_CKPT).resolve()): pipe}


def _fails(root: Path, graph: dict, pipes: dict | None = None) -> str:
    with pytest.raises(NodeFailed) as e:
        _run(root, graph, pipes)
    msg = str(e.value)
    print(msg)
    assert "\n" not in msg.strip(), msg
    return msg


def test_sd3_controlnet_workflow_equals_the_pipeline(sd3_cn):
    root, pipe = sd3_cn
    out = _run(root, sd3_cn_graph(), _ref(root, pipe))
    ours = _pixels(out["7"][0])
    hint = _picture(16, 16, 3)
    unit = ControlUnit(str(root / "controlnets" / "sd3-cn"), hint, scale=0.8)
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, controlnets=[unit])
    diff = np.abs(ours - theirs).max()
    print(f"SD3 ControlNet workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    plain = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert np.abs(ours - plain).max() > 1e-3  # the ControlNet acts
    # ComfyUI's deprecated ControlNetApplySD3 is the same node with its vae required
    g = sd3_cn_graph()
    g["a"] = {"class_type": "ControlNetApplySD3", "inputs": {**g["a"]["inputs"], "vae": ["1", 2]}}
    assert np.abs(_pixels(_run(root, g, _ref(root, pipe))["7"][0]) - ours).max() == 0


def test_sd3_controlnet_window_is_comfyuis_sigma_window(sd3_cn):
    """end_percent 0.4 on SD3's shift-3 schedule: percent_to_sigma(0.4) = 0.818; the 4 simple steps' sigmas are
    1, 0.9, 0.75, 0.5: the first two steps act, as the pipeline's end 0.5 by diffusers' step rule."""
    root, pipe = sd3_cn
    out = _run(root, sd3_cn_graph(end=0.4), _ref(root, pipe))
    unit = ControlUnit(str(root / "controlnets" / "sd3-cn"), _picture(16, 16, 3), scale=0.8, end=0.5)
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, controlnets=[unit])
    diff = np.abs(_pixels(out["7"][0]) - theirs).max()
    print(f"SD3 ControlNet window workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    whole = _run(root, sd3_cn_graph(), _ref(root, pipe))["7"][0]
    assert np.abs(_pixels(out["7"][0]) - _pixels(whole)).max() > 1e-4


def test_two_sd3_controlnets_sum_as_the_pipelines_two_units(sd3_cn):
    root, pipe = sd3_cn
    g = sd3_cn_graph()
    g["c2"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd3-cn2"}}
    g["h2"] = {"class_type": "ImageInvert", "inputs": {"image": ["h", 0]}}
    g["a2"] = _control(["a", 0], ["a", 1], ["c2", 0], ["1", 2], 0.5)
    g["a2"]["inputs"]["image"] = ["h2", 0]
    g["6"]["inputs"]["positive"], g["6"]["inputs"]["negative"] = ["a2", 0], ["a2", 1]
    ours = _pixels(_run(root, g, _ref(root, pipe))["7"][0])
    from PIL import ImageOps

    hint = _picture(16, 16, 3)
    units = [ControlUnit(str(root / "controlnets" / "sd3-cn"), hint, 0.8),
             ControlUnit(str(root / "controlnets" / "sd3-cn2"), ImageOps.invert(hint), 0.5)]  # fmt: skip
    diff = np.abs(ours - _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, controlnets=units)).max()
    print(f"two SD3 ControlNets workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    one = _pixels(_run(root, sd3_cn_graph(), _ref(root, pipe))["7"][0])
    assert np.abs(ours - one).max() > 1e-4


def _flux_cn_graph(name: str, union: str | None = None, strength: float = 0.9, vae: bool = True) -> dict:
    g = flux_graph()
    g["c"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": name}}
    net = ["c", 0]
    if union is not None:
        g["u"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["c", 0], "type": union}}
        net = ["u", 0]
    g["h"] = {"class_type": "LoadImage", "inputs": {"image": "hint.png"}}
    g["a"] = _control(["4", 0], ["5", 0], net, ["9", 0] if vae else None, strength)
    g["8"]["inputs"]["positive"], g["8"]["inputs"]["negative"] = ["a", 0], ["a", 1]
    return g


def test_flux_controlnet_and_union_workflows_equal_the_pipeline(flux_cn):
    root, pipe = flux_cn
    hint = _picture(16, 16, 4)
    kw = dict(schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    ours = _pixels(_run(root, _flux_cn_graph("flux-cn"))["10"][0])
    theirs = _pipeline_image(pipe, controlnets=[ControlUnit(str(root / "controlnets" / "flux-cn"), hint, 0.9)], **kw)
    diff = np.abs(ours - theirs).max()
    print(f"Flux ControlNet workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    assert np.abs(ours - _pipeline_image(pipe, **kw)).max() > 1e-3
    # SetUnionControlNetType "depth" is ComfyUI's type 1, handed to the mode embedding as it is
    union = _pixels(_run(root, _flux_cn_graph("flux-union", "depth"))["10"][0])
    unit = ControlUnit(str(root / "controlnets" / "flux-union"), hint, 0.9, union_mode=1)
    diff = np.abs(union - _pipeline_image(pipe, controlnets=[unit], **kw)).max()
    print(f"Flux Union ControlNet workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    other = _pixels(_run(root, _flux_cn_graph("flux-union", "openpose"))["10"][0])
    assert np.abs(other - union).max() > 1e-6  # the type reaches the ControlNet


def test_refusals_are_one_line_node_errors(sd3_cn, flux_cn, tmp_path):
    root, pipe = sd3_cn
    pipes = _ref(root, pipe)
    assert "needs a VAE" in _fails(root, sd3_cn_graph(vae=False), pipes)
    g = sd3_cn_graph()
    g["6"]["inputs"]["negative"] = ["4", 0]  # the ControlNet on the positive alone at cfg 4
    assert "apply it to both positive and negative" in _fails(root, g, pipes)
    g = sd3_cn_graph()
    g["u"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["c", 0], "type": "depth"}}
    g["a"]["inputs"]["control_net"] = ["u", 0]
    assert "not a Union ControlNet" in _fails(root, g, pipes)
    froot, _ = flux_cn
    assert "set its type with SetUnionControlNetType" in _fails(froot, _flux_cn_graph("flux-union"))
    assert "set its type" in _fails(froot, _flux_cn_graph("flux-union", "auto"))
    # a 4-mode Union ControlNet has no type 6 (tile)
    assert "union_mode must be below 4" in _fails(froot, _flux_cn_graph("flux-union", "tile"))
    # a Flux ControlNet on an SD3 model, a U-Net ControlNet on an SD3 model
    import shutil

    shutil.copytree(froot / "controlnets" / "flux-cn", root / "controlnets" / "flux-cn", dirs_exist_ok=True)
    assert "is a Flux ControlNet; this model is SD3" in _fails(root, sd3_cn_graph("flux-cn"), pipes)
    # a Qwen-Image ControlNet on an SD3 model: named as Qwen-Image's (once "is a Flux ControlNet")
    from test_qwen_controlnet import _controlnet as _qwen_controlnet

    _qwen_controlnet(root / "controlnets" / "qwen-cn", 5)
    assert "is a Qwen-Image ControlNet; this model is SD3" in _fails(root, sd3_cn_graph("qwen-cn"), pipes)
    from sdengine.control import save_controlnet
    from sdengine.models.controlnet import ControlNet
    from sdengine.models.unet import UNet

    save_controlnet(ControlNet.from_unet(UNet(TINY_EMOJI_UNET)), root / "controlnets" / "unet-cn")
    _sd3_controlnet(root / "sd3-folder", root / "controlnets" / "sd3-inpaint-cn", 33, extra_conditioning_channels=1)
    assert "inpainting ControlNet" in _fails(root, sd3_cn_graph("sd3-inpaint-cn"), pipes)
    msg = _fails(root, sd3_cn_graph("unet-cn"), pipes)
    assert "on an SD3 model" in msg and "holds a ControlNetModel" in msg


def test_union_type_and_dit_controlnets_on_a_unet_model_are_refused(sd3_cn):
    root, _ = sd3_cn
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "c": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny"}},
        "u": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["c", 0], "type": "depth"}},
        "h": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "a": _control(["6", 0], ["7", 0], ["u", 0], None, 1.0),
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["4", 0],
                "seed": SEED,
                "steps": 2,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["a", 0],
                "negative": ["a", 1],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },  # fmt: skip
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    assert "Union ControlNet for U-Nets (ControlNet++) is not supported" in _fails(root, g)
    g["a"]["inputs"]["control_net"] = ["c2", 0]
    g["c2"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sd3-cn"}}
    assert "SD3ControlNetModel" in _fails(root, g)
