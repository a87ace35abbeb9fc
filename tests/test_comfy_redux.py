"""FLUX.1 Redux through sdengine's ComfyUI nodes: CLIPVisionLoader on a SigLIP file, CLIPVisionEncode (ComfyUI's
preprocessing with SigLIP's mean and std; the tokens against transformers' SiglipVisionModel), StyleModelLoader and
StyleModelApply held against the Python pipeline's ``redux`` units given the same SigLIP tokens, on the tiny
random Flux [dev] files of tests/test_comfy_sd3_flux.py; the one-line refusals."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from _pipeline_models import picture  # noqa: E402
from sdengine.models.siglip_vision import SIGLIP_MEAN, SIGLIP_STD  # noqa: E402
from sdengine.pipeline.redux import ReduxUnit  # noqa: E402
from sdengine.server.catalog import Catalog  # noqa: E402
from sdengine.server.comfy.graph import Executor, NodeFailed, validate  # noqa: E402
from sdengine.server.comfy.nodes import Outputs, RunContext  # noqa: E402
from sdengine.server.comfy.nodes_clip_vision import comfy_clip_preprocess  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import forget_parts  # noqa: E402
from sdengine.weights.redux_file import load_redux  # noqa: E402
from test_comfy_sd3_flux import TOL, _pipeline_image, _pixels, flux, flux_graph  # noqa: E402, F401
from test_siglip_redux import _randomize, hf_siglip  # noqa: E402

SIGLIP_SIDE = 32


@pytest.fixture(scope="module")
def redux_files(flux):  # noqa: F811 (the imported fixture)
    """A tiny SigLIP (64 wide: one 64-wide head, what a file's shapes tell) in clip_vision/, a Redux file in
    models/style_models/, the reference picture in in/."""
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder

    root, pipe = flux
    siglip = hf_siglip(seed=11, hidden=64, heads=1, image=SIGLIP_SIDE)
    (root / "clip_vision").mkdir(exist_ok=True)
    sd = {
        ("vision_model." + k if not k.startswith("vision_model.") else k): v.contiguous()
        for k, v in siglip.state_dict().items()
    }
    safetensors_torch.save_file(sd, str(root / "clip_vision" / "sigclip_tiny.safetensors"))
    torch.manual_seed(1)
    embedder = ReduxImageEncoder(redux_dim=64, txt_in_features=32).eval()
    _randomize(embedder, 12)
    (root / "models" / "style_models").mkdir(parents=True, exist_ok=True)
    redux_file = root / "models" / "style_models" / "flux1-redux-tiny.safetensors"
    safetensors_torch.save_file({k: v.contiguous() for k, v in embedder.state_dict().items()}, str(redux_file))
    (root / "in").mkdir(exist_ok=True)
    picture(40, 24, seed=3).save(root / "in" / "redux.png")
    return root, pipe, siglip, redux_file


def _run(root: Path, prompt: dict[str, Any]) -> dict[str, Any]:
    forget_parts()
    catalog = Catalog(root / "models", None, None, vaes_dir=root / "vaes", clip_vision_dir=root / "clip_vision")
    folders = Outputs(root / "out", root / "in", root / "temp")

    class Env:
        def __init__(self) -> None:
            self.catalog, self.folders, self.limits = catalog, folders, {}

    graph, _, errors = validate(prompt, Env())
    assert not errors, errors
    ctx = RunContext(
        pipeline=lambda ref: None,
        catalog=catalog,
        folders=folders,
        seed_rule="comfyui",
        device="cpu",
        save_lock=threading.Lock(),
    )
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    return {nid: entry.outputs for nid, entry in ex.cache.items()}


def _redux_graph(strength: float = 0.8, strength_type: str = "multiply", crop: str = "center", cfg: float = 1.0):
    g = flux_graph()
    g["20"] = {"class_type": "LoadImage", "inputs": {"image": "redux.png"}}
    g["21"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "sigclip_tiny.safetensors"}}
    g["22"] = {"class_type": "CLIPVisionEncode", "inputs": {"clip_vision": ["21", 0], "image": ["20", 0], "crop": crop}}
    g["23"] = {"class_type": "StyleModelLoader", "inputs": {"style_model_name": "flux1-redux-tiny.safetensors"}}
    g["24"] = {
        "class_type": "StyleModelApply",
        "inputs": {
            "conditioning": ["3", 0],
            "style_model": ["23", 0],
            "clip_vision_output": ["22", 0],
            "strength": strength,
            "strength_type": strength_type,
        },
    }
    g["4"]["inputs"]["conditioning"] = ["24", 0]
    g["8"]["inputs"]["cfg"] = cfg
    return g


@pytest.mark.parametrize("crop", ["center", "none"])
def test_style_model_apply_equals_the_pipelines_redux_unit(redux_files, crop):
    root, pipe, siglip, redux_file = redux_files
    out = _run(root, _redux_graph(crop=crop))
    ours = _pixels(out["10"][0])
    image = out["20"][0]  # LoadImage's IMAGE (1, 24, 40, 3)
    pixels = comfy_clip_preprocess(image, SIGLIP_SIDE, crop == "center", SIGLIP_MEAN, SIGLIP_STD)
    with torch.no_grad():
        want = siglip(pixel_values=pixels).last_hidden_state  # transformers on ComfyUI's pixels
    encoded = out["22"][0]
    assert encoded.last_hidden_state.shape == (1, 64, 64)
    assert (encoded.last_hidden_state - want).abs().max().item() < 1e-5
    assert torch.equal(encoded.image_embeds, encoded.last_hidden_state)  # ComfyUI's SigLIP "pooled" output
    text = out["3"][0][0].cond["crossattn"]
    assert out["24"][0][0].cond["crossattn"].shape == (1, text.shape[1] + 64, 32)
    unit = ReduxUnit(load_redux(redux_file), siglip_tokens=encoded.last_hidden_state[0], strength=0.8)
    theirs = _pipeline_image(pipe, cfg_scale=1.0, schedule="simple", distilled_cfg_scale=3.5, redux=[unit])
    assert np.abs(ours - theirs).max() < TOL
    plain = _pixels(_run(root, flux_graph())["10"][0])
    assert np.abs(ours - plain).max() > 1e-3  # the image's tokens change the picture


def test_attn_bias_at_one_is_multiply_and_cfg_runs(redux_files):
    root, _, _, _ = redux_files
    a = _pixels(_run(root, _redux_graph(1.0, "multiply"))["10"][0])
    b = _pixels(_run(root, _redux_graph(1.0, "attn_bias"))["10"][0])
    np.testing.assert_array_equal(a, b)
    guided = _pixels(_run(root, _redux_graph(cfg=2.0))["10"][0])  # the positive longer than the negative: apart
    assert np.isfinite(guided).all() and np.abs(guided - a).max() > 1e-3


def _node_error(root: Path, prompt: dict) -> str:
    with pytest.raises(NodeFailed) as info:
        _run(root, prompt)
    return str(info.value.error if hasattr(info.value, "error") else info.value)


def test_refusals(redux_files, tmp_path):
    root, _, _, redux_file = redux_files
    assert "attn_bias with a strength other than 1" in _node_error(root, _redux_graph(0.5, "attn_bias"))
    g = _redux_graph()
    g["23"]["inputs"]["style_model_name"] = "clip_tiny.safetensors"
    safetensors_torch.save_file(
        {"vision_model.embeddings.patch_embedding.weight": torch.zeros(8, 3, 4, 4)},
        str(root / "models" / "style_models" / "clip_tiny.safetensors"),
    )
    assert "a vision encoder, not a FLUX.1 Redux file" in _node_error(root, g)
    narrow = root / "models" / "style_models" / "narrow.safetensors"
    safetensors_torch.save_file(
        {
            "redux_up.weight": torch.zeros(96, 16),
            "redux_up.bias": torch.zeros(96),
            "redux_down.weight": torch.zeros(32, 96),
            "redux_down.bias": torch.zeros(32),
        },
        str(narrow),
    )
    g["23"]["inputs"]["style_model_name"] = "narrow.safetensors"
    assert "the image tokens are 64-wide, narrow.safetensors takes 16" in _node_error(root, g)
    wide = root / "models" / "style_models" / "wide.safetensors"
    safetensors_torch.save_file(
        {
            "redux_up.weight": torch.zeros(120, 64),
            "redux_up.bias": torch.zeros(120),
            "redux_down.weight": torch.zeros(40, 120),
            "redux_down.bias": torch.zeros(40),
        },
        str(wide),
    )
    g["23"]["inputs"]["style_model_name"] = "wide.safetensors"
    assert "makes 40-wide tokens, the conditioning's are 32 wide" in _node_error(root, g)
