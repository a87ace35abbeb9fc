"""FLUX.1 Kontext through sdengine's ComfyUI nodes: ReferenceLatent (the reference latents on the conditioning, their
tokens after the image's at sampling) held against the Python pipeline's ``reference_images`` on the same tiny
random Flux [dev] files (tests/test_comfy_sd3_flux.py's), FluxKontextImageScale's sizes, and the one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from _pipeline_models import picture  # noqa: E402
from sdengine.server.comfy.nodes import NodeError  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import flux_kontext_image_scale, reference_latent  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pipeline_image, _pixels, _run, flux, flux_graph  # noqa: E402, F401


def _kontext_graph(root, cfg: float = 1.0, negative_refs: bool = False) -> dict:
    picture(24, 16, seed=1).save(root / "in" / "ref.png")
    g = flux_graph()
    g["20"] = {"class_type": "LoadImage", "inputs": {"image": "ref.png"}}
    g["21"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["9", 0]}}
    g["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["21", 0]}}
    g["4"]["inputs"]["conditioning"] = ["22", 0]  # CLIPTextEncode -> ReferenceLatent -> FluxGuidance (the template)
    if negative_refs:
        g["5"]["inputs"]["conditioning"] = ["22", 0]
    g["8"]["inputs"]["cfg"] = cfg
    return g


def test_reference_latent_equals_the_pipelines_reference_image(flux):  # noqa: F811 (the imported fixture)
    root, pipe = flux
    (root / "in").mkdir(exist_ok=True)
    out = _run(root, _kontext_graph(root))
    ours = _pixels(out["10"][0])
    kw = dict(schedule="simple", distilled_cfg_scale=3.5, reference_auto_resize=False)
    theirs = _pipeline_image(pipe, cfg_scale=1.0, reference_images=picture(24, 16, seed=1), **kw)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - _pixels(_run(root, flux_graph())["10"][0])).max() > 1e-3  # the reference changes it
    assert out["22"][0][0].references[0].shape == (1, 16, 8, 12)
    # FluxKontextMultiReferenceLatentMethod: "index" puts one reference where "offset" does; "uxo" past the image
    for method, same in (("index", True), ("uxo/uno", False)):
        g = _kontext_graph(root)
        g["24"] = {
            "class_type": "FluxKontextMultiReferenceLatentMethod",
            "inputs": {"conditioning": ["22", 0], "reference_latents_method": method},
        }
        g["4"]["inputs"]["conditioning"] = ["24", 0]
        moved = _pixels(_run(root, g)["10"][0])
        assert (np.abs(moved - ours).max() < TOL) == same, method  # VAEEncode's raw latent of the 24 x 16 picture
    # cfg above 1 with the reference on both conditionings (ConditioningZeroOut keeps it): runs, both passes with it
    guided = _pixels(_run(root, _kontext_graph(root, cfg=2.0, negative_refs=True))["10"][0])
    assert np.isfinite(guided).all() and np.abs(guided - ours).max() > 1e-3


def test_reference_latent_refusals(flux):  # noqa: F811
    root, _ = flux
    (root / "in").mkdir(exist_ok=True)
    message = _node_error(root, _kontext_graph(root, cfg=2.0))
    assert "the negative conditioning's reference latents differ from the positive's" in message
    g = _kontext_graph(root)
    g["23"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["20", 0], "amount": 2}}
    g["21"]["inputs"]["pixels"] = ["23", 0]
    assert "ReferenceLatent 0: a batch of 2 reference latents for a latent batch of 1" in _node_error(root, g)
    with pytest.raises(NodeError, match="the latent must be a 16-channel VAE latent"):
        reference_latent(None, [], {"samples": torch.zeros(1, 4, 8, 8)})  # type: ignore[arg-type]
    assert reference_latent(None, ["c"], None) == (["c"],)  # type: ignore[arg-type]


class _Sizes:
    """The one thing of a run context the node asks: whether the size is within the server's limits."""

    def check_size(self, width: int, height: int) -> None:
        assert width <= 16384 and height <= 16384


def test_flux_kontext_image_scale_takes_the_nearest_resolution_cut_about_the_centre():
    image = torch.zeros(1, 30, 60, 3)
    image[:, :, 15:45] = 1.0  # a white middle half: the 2:1 picture cut to 2.02:1 keeps it centred
    (out,) = flux_kontext_image_scale(_Sizes(), image)  # type: ignore[arg-type]
    assert out.shape == (1, 720, 1456, 3)  # 60/30 = 2: nearest 1456/720 = 2.02 (1392/752 = 1.85, 1504/688 = 2.19)
    row = out[0, 360, :, 0]
    assert float(row[728]) > 0.99 and float(row[5]) < 0.01 and float(row[-6]) < 0.01
    assert abs(float(row[:728].mean()) - float(row[728:].mean())) < 0.01  # symmetric about the centre


def test_reference_latent_on_other_models_is_refused(flux, tiny_sd1_folder):  # noqa: F811
    import shutil

    import sdengine
    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes_sd3_flux import sampling_references

    root, _ = flux
    if not (root / "models" / "sd1").is_dir():
        shutil.copytree(tiny_sd1_folder, root / "models" / "sd1")
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a", "clip": ["1", 1]}},
        "3": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "4": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["2", 0], "latent": ["3", 0]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 1,
                "steps": 1,
                "cfg": 1.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["4", 0],
                "negative": ["2", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    message = _node_error(root, g, {str((root / "models" / "sd1").resolve()): pipe})
    assert "ReferenceLatent is FLUX.1 Kontext's; this model is a U-Net" in message
    entry = TextCondition({"crossattn": torch.zeros(1, 4, 8)}, references=(torch.zeros(1, 16, 4, 4),))
    with pytest.raises(NodeError, match="ReferenceLatent is FLUX.1 Kontext's; sd3-tiny is an SD3 model"):
        sampling_references("sd3", [entry], [entry], 1.0, "sd3-tiny")
