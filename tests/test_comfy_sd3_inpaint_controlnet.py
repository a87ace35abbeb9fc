"""SD3 inpainting ControlNets (Alimama's) through sdengine's ComfyUI node ControlNetInpaintingAliMamaApply: the
workflow's image equals the Python pipeline's with the same unit (picture + mask) within 1e-5 on a tiny random SD3
and an inpainting ControlNet saved by diffusers; what does not fit is a one-line node error."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")

import test_comfy_sd3_flux as base  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from test_comfy_dit_controlnet import _fails, _ref, _run, sd3_cn_graph  # noqa: E402
from test_comfy_sd3_flux import TOL, _pipeline_image, _pixels  # noqa: E402
from test_dit_control_pipeline import _picture  # noqa: E402
from test_sd3_controlnet_inpaint import _controlnet  # noqa: E402

sd3 = base.sd3


def _mask_picture():
    from PIL import Image

    a = np.zeros((16, 16), np.uint8)
    a[3:11, 5:14] = 255  # white: repaint
    a[1, 1] = 200  # grey above the 0.5 cut
    return Image.fromarray(a, mode="L")


@pytest.fixture(scope="module")
def sd3_inpaint(sd3):
    root, pipe = sd3
    cns = root / "controlnets"
    _controlnet(root / "sd3-folder", cns / "sd3-inpaint", 33, extra_conditioning_channels=1)
    _controlnet(root / "sd3-folder", cns / "sd3-plain", 34)
    (root / "in").mkdir(exist_ok=True)
    _picture(16, 16, 5).save(root / "in" / "photo.png")
    _mask_picture().save(root / "in" / "mask.png")
    return root, pipe


def _graph(mask: bool = True, name: str = "sd3-inpaint", **apply: Any) -> dict:
    g = sd3_cn_graph(name)
    g["h"] = {"class_type": "LoadImage", "inputs": {"image": "photo.png"}}
    if mask:
        g["m"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
        inputs = {"positive": ["3", 0], "negative": ["4", 0], "control_net": ["c", 0], "vae": ["1", 2],
                  "image": ["h", 0], "mask": ["m", 0], "strength": 0.9, "start_percent": 0.0,
                  "end_percent": 1.0}  # fmt: skip
        inputs.update(apply)
        g["a"] = {"class_type": "ControlNetInpaintingAliMamaApply", "inputs": inputs}
    return g


def test_inpainting_workflow_equals_the_pipeline(sd3_inpaint):
    root, pipe = sd3_inpaint
    ours = _pixels(_run(root, _graph(), _ref(root, pipe))["7"][0])
    unit = ControlUnit(str(root / "controlnets" / "sd3-inpaint"), _picture(16, 16, 5), scale=0.9, mask=_mask_picture())
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, controlnets=[unit])
    diff = np.abs(ours - theirs).max()
    print(f"SD3 inpainting ControlNet workflow vs pipeline: max abs {diff:.2e}")
    assert diff < TOL
    moved = ControlUnit(unit.model, unit.image, scale=0.9, mask=_mask_picture().transpose(0))
    assert np.abs(ours - _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, controlnets=[moved])).max() > 1e-3
    # a window: the unit acts at the model calls whose sigma lies in it (as the DiT ControlNet nodes)
    windowed = _pixels(_run(root, _graph(end_percent=0.5), _ref(root, pipe))["7"][0])
    assert np.abs(windowed - ours).max() > 1e-4


def test_refusals_are_one_line(sd3_inpaint):
    root, pipe = sd3_inpaint
    msg = _fails(root, _graph(mask=False), _ref(root, pipe))  # through ControlNetApplyAdvanced: no mask
    assert "apply it with ControlNetInpaintingAliMamaApply" in msg
    assert "not an inpainting ControlNet" in _fails(root, _graph(name="sd3-plain"), _ref(root, pipe))
    g = _graph()
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}}
    g["5"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 16, "height": 16, "batch_size": 1}}
    assert "this model is a U-Net" in _fails(root, g)
