"""SD3 and Flux through sdengine's ComfyUI nodes (server/comfy/nodes_sd3_flux.py) on tiny random models saved in
the real layouts: Stability's SD3 single file with its text encoders, ComfyUI's separate files (a diffusion model
in ``diffusion_models/``, ``clip_l`` / ``clip_g`` / ``t5xxl`` in ``text_encoders/``, a VAE in ``--vaes-dir``), BFL's
Flux transformer and ``ae.safetensors``.

API-format workflows run through the executor ``sdengine comfy run`` and the server use (graph.validate +
Executor); the IMAGE each VAEDecode gives is held against the Python pipeline's image of the same settings (the
pipeline's own call, whose noise for one image is ComfyUI's, on the same 8x-smaller latent) within 1e-5. Node errors
are one line."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _sd3_models import make_sd3_folder, write_single_file  # noqa: E402
from sdengine.server.catalog import Catalog  # noqa: E402
from sdengine.server.comfy.graph import Executor, NodeFailed, validate  # noqa: E402
from sdengine.server.comfy.nodes import Outputs, RunContext  # noqa: E402
from sdengine.server.comfy.nodes_sd3_flux import forget_parts  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED, STEPS = 5, 4
SIDE = 64  # the graph's image side: EmptySD3LatentImage's latent is 8x8 (the tiny VAEs are 2x: 16 pixels out)
TOL = 1e-5


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def _ldm_vae(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from sdengine.weights import keymaps as km
    from sdengine.weights.detect import vae_layout_from_diffusers

    vae = load_file(folder / "vae" / "diffusion_pytorch_model.safetensors")
    ldm, unknown = km.vae_diffusers_to_ldm(vae, vae_layout_from_diffusers(vae))
    assert not unknown
    return ldm


def _clip_file(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    sd = load_file(folder / sub / "model.safetensors")
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v for k, v in sd.items()}


def save_comfy_files(
    folder: Path, root: Path, unet: str = "unet/flux1-tiny.safetensors", *, chroma: bool = False
) -> None:
    """A tiny diffusers Flux (or ``chroma``) folder's parts as ComfyUI's files under ``root``: the transformer in
    BFL's names at ``models/<unet>``, CLIP-L (Flux's) and T5 in ``models/text_encoders/``, the VAE as
    ``vaes/ae.safetensors``."""
    from safetensors.torch import load_file

    from sdengine.weights import chroma_file, flux_file

    to_bfl = chroma_file.diffusers_to_bfl if chroma else flux_file.diffusers_to_bfl
    models = root / "models"
    _save(to_bfl(load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")), models / unet)
    if not chroma:
        _save(_clip_file(folder, "text_encoder"), models / "text_encoders" / "clip_l.safetensors")
    t5 = folder / ("text_encoder" if chroma else "text_encoder_2") / "model.safetensors"
    _save(load_file(t5), models / "text_encoders" / "t5xxl.safetensors")
    _save(_ldm_vae(folder), root / "vaes" / "ae.safetensors")


def save_sd3_files(root: Path) -> Path:
    """A tiny SD3 as a single file (``models/sd3-tiny.safetensors``, returned) and its parts as ComfyUI keeps them:
    the MMDiT in Stability's names (``models/diffusion_models/sd3-mmdit.safetensors``), CLIP-L and bigG in
    ``models/text_encoders/``, T5 in ``models/clip/``, the VAE as ``vaes/sd3_vae.safetensors``."""
    from safetensors.torch import load_file

    from sdengine.weights.mmdit_file import load_mmdit, sdengine_to_stability

    folder = make_sd3_folder(root / "sd3-folder")
    models = root / "models"
    models.mkdir()
    write_single_file(folder, models / "sd3-tiny.safetensors")
    mmdit = load_mmdit(folder, dtype=torch.float32)
    _save(
        sdengine_to_stability(mmdit.state_dict(), mmdit.config), models / "diffusion_models" / "sd3-mmdit.safetensors"
    )
    _save(_clip_file(folder, "text_encoder"), models / "text_encoders" / "clip_l.safetensors")
    _save(_clip_file(folder, "text_encoder_2"), models / "text_encoders" / "clip_g.safetensors")
    _save(load_file(folder / "text_encoder_3" / "model.safetensors"), models / "clip" / "t5xxl_tiny.safetensors")
    _save(_ldm_vae(folder), root / "vaes" / "sd3_vae.safetensors")
    return models / "sd3-tiny.safetensors"


def sd3_parts(weight_dtype: str = "default") -> dict[str, dict]:
    """The loader nodes of :func:`save_sd3_files`' parts: UNETLoader "1", TripleCLIPLoader "2", VAELoader "9",
    ModelSamplingSD3 "10" (shift 3)."""
    unet = {"unet_name": "sd3-mmdit.safetensors", "weight_dtype": weight_dtype}
    clips = {
        "clip_name1": "clip_l.safetensors",
        "clip_name2": "clip_g.safetensors",
        "clip_name3": "t5xxl_tiny.safetensors",
    }
    return {
        "1": {"class_type": "UNETLoader", "inputs": unet},
        "2": {"class_type": "TripleCLIPLoader", "inputs": clips},
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}},
        "10": {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}},
    }


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    """An SD3 single file in models/, and its parts as ComfyUI keeps them."""
    root = tmp_path_factory.mktemp("comfy_sd3")
    return root, sdengine.load_pipeline(save_sd3_files(root), device="cpu")


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """FLUX.1 [dev]: BFL's transformer in diffusion_models/, CLIP-L and T5 in text_encoders/, ae in vaes/."""

    root = tmp_path_factory.mktemp("comfy_flux")
    folder = make_flux_folder(root / "flux-folder", guidance=True)
    save_comfy_files(folder, root)
    return root, sdengine.load_pipeline(folder, device="cpu")


def _run(root: Path, prompt: dict[str, Any], pipes: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run an API prompt as `sdengine comfy run` does; every node's outputs by id."""
    forget_parts()
    loras = root / "loras" if (root / "loras").is_dir() else None
    catalog = Catalog(root / "models", loras, None, vaes_dir=root / "vaes")
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
    ctx = RunContext(
        pipeline=pipeline,
        catalog=catalog,
        folders=folders,
        seed_rule="comfyui",
        device="cpu",
        save_lock=threading.Lock(),
    )
    ex = Executor()
    ex.run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    return {nid: entry.outputs for nid, entry in ex.cache.items()}


def ksampler_node(model: list, pos: list, neg: list, latent: list, sampler="euler", scheduler="simple", **kw) -> dict:
    """A KSampler node, full denoise (``kw``: cfg 4, SEED, STEPS unless given)."""
    return {
        "class_type": "KSampler",
        "inputs": {
            "model": model, "seed": SEED, "steps": STEPS, "cfg": 4.0, "sampler_name": sampler,
            "scheduler": scheduler, "positive": pos, "negative": neg, "latent_image": latent, "denoise": 1.0, **kw,
        },
    }  # fmt: skip


def _pixels(image: torch.Tensor) -> np.ndarray:
    return image[0].numpy().astype(np.float64)


def _pipeline_image(pipe: Any, **kw: Any) -> np.ndarray:
    """The pipeline's image of a 16 x 16 picture (latent 8 x 8: the graph's), HWC in [0, 1]."""
    args: dict[str, Any] = dict(steps=STEPS, seed=SEED, width=16, height=16, sampler="euler", progress=False)
    args.update(kw)
    return pipe(PROMPT, NEGATIVE, **args).arrays[0].astype(np.float64)


def sd3_graph(loader: dict[str, dict], model: list, clip: list, vae: list, **sampler: Any) -> dict:
    return {
        **loader,
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": clip}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": clip}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "6": ksampler_node(model, ["3", 0], ["4", 0], ["5", 0], **sampler),
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": vae}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": "sd3"}},
    }


# -- SD3 ------------------------------------------------------------------------------------------------------------


def test_sd3_checkpoint_workflow_equals_the_pipeline(sd3):
    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    out = _run(root, sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2]), {ref: pipe})
    ours = _pixels(out["7"][0])
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01  # an image, not a flat field
    assert out["6"][0]["samples"].shape == (1, 16, 8, 8)
    assert list((root / "out").glob("sd3_*.png"))


def test_sd3_separate_files_equal_the_checkpoint(sd3):
    root, pipe = sd3
    parts = sd3_parts()
    out = _run(root, sd3_graph(parts, ["10", 0], ["2", 0], ["9", 0], sampler="dpmpp_2m", scheduler="sgm_uniform"))
    theirs = _pipeline_image(pipe, sampler="dpmpp_2m", schedule="sgm_uniform", cfg_scale=4.0)
    assert np.abs(_pixels(out["7"][0]) - theirs).max() < TOL
    # another shift is another schedule: another image
    parts["10"]["inputs"]["shift"] = 6.0
    other = _run(root, sd3_graph(parts, ["10", 0], ["2", 0], ["9", 0], sampler="dpmpp_2m", scheduler="sgm_uniform"))
    assert np.abs(_pixels(other["7"][0]) - theirs).max() > 1e-3
    pipe6 = _pipeline_image(pipe, sampler="dpmpp_2m", schedule="sgm_uniform", cfg_scale=4.0, shift=6.0)
    assert np.abs(_pixels(other["7"][0]) - pipe6).max() < TOL


def test_clip_text_encode_sd3_with_one_text_equals_clip_text_encode(sd3):
    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
    g["3"] = {
        "class_type": "CLIPTextEncodeSD3",
        "inputs": {"clip": ["1", 1], "clip_l": PROMPT, "clip_g": PROMPT, "t5xxl": PROMPT, "empty_padding": "none"},
    }
    out = _run(root, g, {ref: pipe})
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert np.abs(_pixels(out["7"][0]) - theirs).max() < TOL
    g["3"]["inputs"]["t5xxl"] = "a green pear"  # T5 reads another text: another image
    assert np.abs(_pixels(_run(root, g, {ref: pipe})["7"][0]) - theirs).max() > 1e-3


def test_sd3_ksampler_advanced_halves_equal_one_run(sd3):
    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
    common = {"model": ["1", 0], "noise_seed": SEED, "steps": STEPS, "cfg": 4.0, "sampler_name": "euler",
              "scheduler": "simple", "positive": ["3", 0], "negative": ["4", 0]}  # fmt: skip
    g["6"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "enable", "latent_image": ["5", 0],
              "start_at_step": 0, "end_at_step": 2, "return_with_leftover_noise": "enable"}}  # fmt: skip
    g["11"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "add_noise": "disable", "latent_image": ["6", 0],
               "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}  # fmt: skip
    g["7"]["inputs"]["samples"] = ["11", 0]
    out = _run(root, g, {ref: pipe})
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert np.abs(_pixels(out["7"][0]) - theirs).max() < 1e-4  # Euler split in two: the same steps


# -- Flux -----------------------------------------------------------------------------------------------------------


def flux_graph(guidance: float = 3.5) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-tiny.safetensors", "weight_dtype": "default"}},
        "2": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "t5xxl.safetensors", "clip_name2": "clip_l.safetensors", "type": "flux"},
        },
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "4": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": guidance}},
        "5": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["3", 0]}},
        "6": {
            "class_type": "ModelSamplingFlux",
            "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": SIDE, "height": SIDE},
        },
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "8": ksampler_node(["6", 0], ["4", 0], ["5", 0], ["7", 0], cfg=1.0),
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {"class_type": "SaveImage", "inputs": {"images": ["10", 0], "filename_prefix": "flux"}},
    }


def test_flux_separate_files_workflow_equals_the_pipeline(flux):
    root, pipe = flux
    out = _run(root, flux_graph())
    ours = _pixels(out["10"][0])
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01
    other = _run(root, flux_graph(guidance=6.0))["10"][0]  # the distilled guidance reaches the transformer
    assert (
        np.abs(_pixels(other) - _pipeline_image(pipe, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=6.0)).max()
        < TOL
    )
    assert np.abs(_pixels(other) - ours).max() > 1e-3


def test_flux_sampler_custom_advanced_equals_ksampler(flux):
    root, _ = flux
    g = flux_graph()
    plain = _pixels(_run(root, g)["10"][0])
    del g["8"], g["5"]
    g.update({
        "12": {"class_type": "BasicGuider", "inputs": {"model": ["6", 0], "conditioning": ["4", 0]}},
        "13": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "14": {"class_type": "BasicScheduler", "inputs": {"model": ["6", 0], "scheduler": "simple", "steps": STEPS,
                                                          "denoise": 1.0}},
        "15": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "16": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["15", 0], "guider": ["12", 0],
               "sampler": ["13", 0], "sigmas": ["14", 0], "latent_image": ["7", 0]}},
    })  # fmt: skip
    g["10"]["inputs"]["samples"] = ["16", 0]
    assert np.abs(_pixels(_run(root, g)["10"][0]) - plain).max() < TOL


# -- node errors ----------------------------------------------------------------------------------------------------


def _node_error(root: Path, prompt: dict, pipes: dict | None = None) -> str:
    with pytest.raises(NodeFailed) as info:
        _run(root, prompt, pipes)
    message = str(info.value.error if hasattr(info.value, "error") else info.value)
    assert "\n" not in message
    return message


def test_refusals_are_one_line_node_errors(sd3, flux, tiny_sd1_folder):
    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2], sampler="ddim")
    assert "ddim" in _node_error(root, g, {ref: pipe})
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
    g["10"] = {"class_type": "FreeU", "inputs": {"model": ["1", 0], "b1": 1.1, "b2": 1.2, "s1": 0.9, "s2": 0.2}}
    g["6"]["inputs"]["model"] = ["10", 0]
    assert "FreeU" in _node_error(root, g, {ref: pipe})
    # an SD 1.x CLIP into CLIPTextEncodeSD3
    import shutil

    if not (root / "models" / "sd1").is_dir():
        shutil.copytree(tiny_sd1_folder, root / "models" / "sd1")
    sd1 = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1"}}}
    g = sd3_graph(sd1, ["1", 0], ["1", 1], ["1", 2])
    texts = {"clip_l": "a", "clip_g": "a", "t5xxl": "a", "empty_padding": "none"}
    g["3"] = {"class_type": "CLIPTextEncodeSD3", "inputs": {"clip": ["1", 1], **texts}}
    sd1_pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    sd1_ref = {str((root / "models" / "sd1").resolve()): sd1_pipe}
    assert "not SD3's" in _node_error(root, g, sd1_ref)
    # SkipLayerGuidanceSD3 on a U-Net, and on Flux with a block it lacks
    g = sd3_graph(sd1, ["10", 0], ["1", 1], ["1", 2])
    g["10"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["1", 0], "layers": "1", "scale": 3.0,
               "start_percent": 0.01, "end_percent": 0.15}}  # fmt: skip
    assert "this model is a U-Net" in _node_error(root, g, sd1_ref)
    # ModelSamplingSD3 on Flux
    froot, _ = flux
    fg = flux_graph()
    fg["6"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["1", 0], "shift": 3.0}}
    assert "ModelSamplingSD3 is for SD3 models" in _node_error(froot, fg)
    fg["6"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": {"model": ["1", 0], "layers": "1", "scale": 3.0,
               "start_percent": 0.01, "end_percent": 0.15}}  # fmt: skip
    assert "(1 double blocks 0-0, 2 single blocks 0-1)" in _node_error(froot, fg)  # Flux's one double block


# -- more loaders and nodes -------------------------------------------------------------------------------------------


def test_flux_all_in_one_checkpoint_and_clip_text_encode_flux(flux):
    root, pipe = flux
    from safetensors.torch import load_file

    models = root / "models"
    one = {f"model.diffusion_model.{k}": v for k, v in load_file(models / "unet" / "flux1-tiny.safetensors").items()}
    one.update({f"vae.{k}": v for k, v in load_file(root / "vaes" / "ae.safetensors").items()})
    clip = load_file(models / "text_encoders" / "clip_l.safetensors")
    one.update({f"text_encoders.clip_l.transformer.{k}": v for k, v in clip.items()})
    t5 = load_file(models / "text_encoders" / "t5xxl.safetensors")
    one.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.items()})
    _save(one, models / "flux1-tiny-aio.safetensors")
    g = flux_graph()
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux1-tiny-aio.safetensors"}}
    del g["2"], g["9"]
    g["3"]["inputs"]["clip"] = ["1", 1]
    g["10"]["inputs"]["vae"] = ["1", 2]
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    assert np.abs(_pixels(_run(root, g)["10"][0]) - theirs).max() < TOL
    # CLIPTextEncodeFlux with the prompt in both boxes and guidance 3.5 is CLIPTextEncode + FluxGuidance
    g["4"] = {
        "class_type": "CLIPTextEncodeFlux",
        "inputs": {"clip": ["1", 1], "clip_l": PROMPT, "t5xxl": PROMPT, "guidance": 3.5},
    }
    assert np.abs(_pixels(_run(root, g)["10"][0]) - theirs).max() < TOL


def test_sd3_dual_clip_loader_without_t5_equals_a_model_without_t5(sd3, tmp_path):
    root, _ = sd3
    folder = root / "sd3-folder"
    no_t5 = write_single_file(folder, tmp_path / "sd3-no-t5.safetensors", t5=False)
    pipe = sdengine.load_pipeline(no_t5, device="cpu")
    parts = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd3-mmdit.safetensors", "weight_dtype": "default"}},
        "2": {
            "class_type": "DualCLIPLoader",
            "inputs": {"clip_name1": "clip_l.safetensors", "clip_name2": "clip_g.safetensors", "type": "sd3"},
        },
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "sd3_vae.safetensors"}},
    }
    out = _run(root, sd3_graph(parts, ["1", 0], ["2", 0], ["9", 0]))
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert np.abs(_pixels(out["7"][0]) - theirs).max() < TOL


def test_sd3_vae_encode_and_partial_denoise_follow_comfyuis_rules(sd3):
    """VAEEncode's raw mean, ComfyUI's process_in, its denoise grid (the last 4 + 1 sigmas of 8 steps) and its start
    ``s0 noise + (1 - s0) latent``, written out from the public pieces."""
    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.diffusion.guidance import CFGDenoiser

    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
    g["5"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["1", 2]}}
    g["12"] = {"class_type": "ImageScale", "inputs": {"image": ["13", 0], "upscale_method": "nearest-exact",
               "width": 16, "height": 16, "crop": "disabled"}}  # fmt: skip
    g["13"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}}
    g["6"]["inputs"]["denoise"] = 0.5  # from EmptyImage's black picture
    out = _run(root, g, {ref: pipe})
    raw = out["5"][0]["samples"]
    with torch.inference_mode():
        black = torch.zeros(1, 3, 16, 16) - 1.0
        mean = vae_utils.encode_moments(pipe.vae, black).mean.float()
    assert torch.allclose(raw, mean, atol=1e-6)  # VAEEncode: the raw posterior mean
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    schedule = FlowSchedule.sd3(3.0)
    den = CFGDenoiser(FlowDenoiser(pipe.network_adapter(pipe.unet), schedule), 4.0, uncond, rule="comfyui")
    sigmas = flow_grid(schedule, 2 * STEPS, "simple", comfy=True).sigmas[-(STEPS + 1) :]
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SEED))
    start = (raw - 0.0609) * 1.5305
    with torch.inference_mode():
        x = sampling.sample(den, noise, sampler="euler", steps=STEPS, sigmas=sigmas, extra_args=cond,
                            init_latent=start, start_step=0, noise_schedule=schedule)  # fmt: skip
        expected = vae_utils.to_unit(vae_utils.decode(pipe.vae, pipe.vae.scale_latents(x / 1.5305 + 0.0609))[0])
    assert np.abs(_pixels(out["7"][0]) - expected[0].permute(1, 2, 0).numpy()).max() < TOL
    assert np.abs(_pixels(out["7"][0]) - _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)).max() > 1e-3


def test_flux_workflow_posted_to_the_server(flux):
    from _comfy_live import live_client, prompt_image
    from _live_server import server_config

    root, pipe = flux
    forget_parts()
    config = server_config(root / "server", models_dir=root / "models", vaes_dir=root / "vaes")
    with live_client(config) as (_, client):
        info = client.get("/object_info").json()
        assert info["UNETLoader"]["input"]["required"]["unet_name"][0] == ["flux1-tiny.safetensors"]
        assert "t5xxl.safetensors" in info["DualCLIPLoader"]["input"]["required"]["clip_name1"][0]
        assert {"diffusion_models", "text_encoders"} <= set(client.get("/models").json())
        assert client.get("/models/unet").json() == client.get("/models/diffusion_models").json()
        assert client.get("/models/clip").json() == ["clip_l.safetensors", "t5xxl.safetensors"]
        png = prompt_image(client, flux_graph())
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    assert png.shape == (16, 16, 3)
    assert np.abs(png.astype(np.float64) - np.round(theirs * 255)).max() <= 1


def test_skip_layer_guidance_sd3_adds_comfyuis_term_in_its_window(sd3):
    """SkipLayerGuidanceSD3 as ComfyUI's post-CFG function, written out: in the sigma window the guided x0 plus
    ``scale * (x0_cond - x0_cond with block 1 left out)``; outside it plain CFG."""
    from functools import partial

    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.diffusion.guidance import CFGDenoiser
    from sdengine.pipeline.sd3 import MMDiTAdapter

    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["10", 0], ["1", 1], ["1", 2])
    slg = {"model": ["1", 0], "layers": "[1]", "scale": 2.5, "start_percent": 0.2, "end_percent": 0.7}
    g["10"] = {"class_type": "SkipLayerGuidanceSD3", "inputs": slg}
    ours = _pixels(_run(root, g, {ref: pipe})["7"][0])

    schedule = FlowSchedule.sd3(3.0)
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    plain = FlowDenoiser(pipe.network_adapter(pipe.unet), schedule)
    skipped = FlowDenoiser(MMDiTAdapter(partial(pipe.unet, skip_layers=(1,)), pipe.dtype), schedule)
    guided = CFGDenoiser(plain, 4.0, uncond, rule="comfyui")
    high, low = schedule.percent_to_sigma(0.2), schedule.percent_to_sigma(0.7)
    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    inside = [float(s) for s in sigmas[:-1] if low <= float(s) <= high]
    assert 0 < len(inside) < STEPS  # the window takes some of the steps, not all

    def slg_den(x, sigma, **kw):
        out = guided(x, sigma, **kw)
        if low <= float(sigma) <= high:
            out = out + 2.5 * (plain(x, sigma, **kw) - skipped(x, sigma, **kw))
        return out

    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        x = sampling.sample(slg_den, noise, sampler="euler", steps=STEPS, sigmas=sigmas, extra_args=cond,
                            noise_schedule=schedule)  # fmt: skip
        image = vae_utils.to_unit(vae_utils.decode(pipe.vae, x)[0])[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - image).max() < TOL
    assert np.abs(ours - _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)).max() > 1e-3
    # a block the MMDiT does not have, and the node on a U-Net: one-line node errors
    g["10"]["inputs"]["layers"] = "7, 8, 9"
    assert "skip_layers" in _node_error(root, g, {ref: pipe})


def test_flux_noise_mask_inpaints_as_comfyuis_x0_inpaint(flux):
    """SetLatentNoiseMask on a Flux latent: every call reads the known half on its noising path ``s noise + (1 - s)
    latent`` and answers the latent there (ComfyUI's KSamplerX0Inpaint), written out from the public pieces."""
    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.pipeline.flux import FluxAdapter

    root, pipe = flux
    g = flux_graph()
    g.update({
        "20": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x3366CC}},
        "21": {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["9", 0]}},
        "22": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 16, "height": 16}},
        "23": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 16}},
        "24": {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["23", 0], "x": 0,
                                                          "y": 0, "operation": "add"}},
        "25": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["24", 0]}},
    })  # fmt: skip
    g["8"]["inputs"]["latent_image"] = ["25", 0]
    out = _run(root, g)
    raw = out["21"][0]["samples"]
    assert raw.shape == (1, 16, 8, 8)

    schedule = FlowSchedule.flux(mu=float(out["6"][0].flow_sampling[1]))
    cond = pipe.conditioner.with_guidance(pipe.conditioner.text(PROMPT), 3.5)
    den = FlowDenoiser(FluxAdapter(pipe.unet, pipe.dtype), schedule)
    latent = (raw - 0.1159) * 0.3611
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SEED))
    mask = torch.zeros(1, 16, 8, 8)
    mask[..., :4] = 1.0  # the left half is repainted

    def inpaint(x, sigma, **kw):
        s = float(sigma)
        x = x * mask + (s * noise + (1 - s) * latent) * (1 - mask)
        return den(x, sigma, **kw) * mask + latent * (1 - mask)

    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    with torch.inference_mode():
        x = sampling.sample(inpaint, noise, sampler="euler", steps=STEPS, sigmas=sigmas, extra_args=cond,
                            noise_schedule=schedule)  # fmt: skip
        image = vae_utils.to_unit(vae_utils.decode(pipe.vae, x)[0])[0].permute(1, 2, 0).numpy()
    ours = _pixels(out["10"][0])
    assert np.abs(ours - image).max() < TOL
    assert torch.allclose(out["8"][0]["samples"][..., 4:], raw[..., 4:], atol=1e-5)  # the known half is the latent


def test_flux_schnell_and_sd35_checkpoints_equal_their_pipelines(tmp_path):
    """FLUX.1 [schnell] (no guidance input: FluxGuidance is left out of its conditioning; its schedule unshifted) and
    SD3.5 Medium's MMDiT-X (a second attention, q/k norms) through the same nodes."""

    folder = make_flux_folder(tmp_path / "schnell", guidance=False, seed=1)
    models = tmp_path / "models"
    save_comfy_files(folder, tmp_path)
    g = flux_graph()
    del g["6"]  # [schnell]: ComfyUI's unshifted FLOW schedule, the pipeline's too
    g["8"]["inputs"]["model"] = ["1", 0]
    pipe = sdengine.load_pipeline(folder, device="cpu")
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=1.0)
    assert np.abs(_pixels(_run(tmp_path, g)["10"][0]) - theirs).max() < TOL

    sd35 = make_sd3_folder(tmp_path / "sd35", sd35=True, seed=2)
    write_single_file(sd35, models / "sd35-tiny.safetensors")
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd35-tiny.safetensors"}}}
    pipe = sdengine.load_pipeline(models / "sd35-tiny.safetensors", device="cpu")
    ref = str((models / "sd35-tiny.safetensors").resolve())
    out = _run(tmp_path, sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2], sampler="heun", scheduler="beta"), {ref: pipe})
    theirs = _pipeline_image(pipe, sampler="heun", schedule="beta", cfg_scale=4.0)
    assert np.abs(_pixels(out["7"][0]) - theirs).max() < TOL


def test_every_comfyui_sampler_runs_or_is_one_line_refused_on_sd3(sd3):
    from sdengine.server.comfy.nodes import SAMPLER_NAMES

    root, pipe = sd3
    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    refused = set()
    for name in SAMPLER_NAMES:
        g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2], sampler=name)
        g["6"]["inputs"]["steps"] = 2
        try:
            image = _run(root, g, {ref: pipe})["7"][0]
        except NodeFailed as e:
            assert "\n" not in str(e) and "cannot run on a flow model" in str(e), str(e)
            refused.add(name)
            continue
        assert bool(torch.isfinite(image).all()) and float(image.std()) > 0.01, name
    # the samplers of a VP model's timesteps, and those not right in the VE view yet (docs/flow-matching.md)
    assert refused == {"dpm_fast", "dpm_adaptive", "sa_solver", "sa_solver_pece", "ddpm", "lcm", "ddim"}


def test_a_ui_format_flux_workflow_converts_and_runs(flux):
    """ComfyUI's Flux example layout in the page's own (UI) format, as `sdengine comfy run` reads it: the widgets in
    ComfyUI's order (DualCLIPLoader without its newer `device` widget, RandomNoise with its control widget)."""
    from sdengine.server.comfy.workflow import convert

    root, pipe = flux

    def node(i, kind, inputs, outputs, widgets):
        ins = [{"name": n, "type": t, "link": link} for n, t, link in inputs]
        outs = [{"name": t, "type": t, "links": links} for t, links in outputs]
        return {"id": i, "type": kind, "mode": 0, "inputs": ins, "outputs": outs, "widgets_values": widgets}

    nodes = [
        node(1, "UNETLoader", [], [("MODEL", [1])], ["flux1-tiny.safetensors", "default"]),
        node(2, "DualCLIPLoader", [], [("CLIP", [2])], ["t5xxl.safetensors", "clip_l.safetensors", "flux"]),
        node(3, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", [3])], [PROMPT]),
        node(4, "FluxGuidance", [("conditioning", "CONDITIONING", 3)], [("CONDITIONING", [4])], [3.5]),
        node(5, "ModelSamplingFlux", [("model", "MODEL", 1)], [("MODEL", [5, 6])], [1.15, 0.5, SIDE, SIDE]),
        node(6, "BasicGuider", [("model", "MODEL", 5), ("conditioning", "CONDITIONING", 4)], [("GUIDER", [7])], []),
        node(7, "KSamplerSelect", [], [("SAMPLER", [8])], ["euler"]),
        node(8, "BasicScheduler", [("model", "MODEL", 6)], [("SIGMAS", [9])], ["simple", STEPS, 1.0]),
        node(9, "RandomNoise", [], [("NOISE", [10])], [SEED, "fixed"]),
        node(10, "EmptySD3LatentImage", [], [("LATENT", [11])], [SIDE, SIDE, 1]),
        node(
            11,
            "SamplerCustomAdvanced",
            [
                ("noise", "NOISE", 10),
                ("guider", "GUIDER", 7),
                ("sampler", "SAMPLER", 8),
                ("sigmas", "SIGMAS", 9),
                ("latent_image", "LATENT", 11),
            ],
            [("LATENT", [12]), ("LATENT", [])],
            [],
        ),  # fmt: skip
        node(12, "VAELoader", [], [("VAE", [13])], ["ae.safetensors"]),
        node(13, "VAEDecode", [("samples", "LATENT", 12), ("vae", "VAE", 13)], [("IMAGE", [14])], []),
        node(14, "SaveImage", [("images", "IMAGE", 14)], [], ["flux-ui"]),
    ]
    links = [
        [1, 1, 0, 5, 0, "MODEL"], [2, 2, 0, 3, 0, "CLIP"], [3, 3, 0, 4, 0, "CONDITIONING"],
        [4, 4, 0, 6, 1, "CONDITIONING"], [5, 5, 0, 6, 0, "MODEL"], [6, 5, 0, 8, 0, "MODEL"], [7, 6, 0, 11, 1, "GUIDER"],
        [8, 7, 0, 11, 2, "SAMPLER"], [9, 8, 0, 11, 3, "SIGMAS"], [10, 9, 0, 11, 0, "NOISE"],
        [11, 10, 0, 11, 4, "LATENT"], [12, 11, 0, 13, 0, "LATENT"], [13, 12, 0, 13, 1, "VAE"],
        [14, 13, 0, 14, 0, "IMAGE"],
    ]  # fmt: skip
    prompt = convert({"nodes": nodes, "links": links})
    assert prompt["2"]["inputs"]["type"] == "flux" and prompt["9"]["inputs"]["noise_seed"] == SEED
    out = _run(root, prompt)
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    assert np.abs(_pixels(out["13"][0]) - theirs).max() < TOL
    # a newer page writes the optional device widget too; fewer values than the required widgets stay an error
    from sdengine.server.comfy.workflow import WorkflowError

    nodes[1]["widgets_values"] = ["t5xxl.safetensors", "clip_l.safetensors", "flux", "default"]
    assert convert({"nodes": nodes, "links": links})["2"]["inputs"]["device"] == "default"
    nodes[1]["widgets_values"] = ["t5xxl.safetensors", "clip_l.safetensors"]
    with pytest.raises(WorkflowError, match="2 widget values for 4 widgets"):
        convert({"nodes": nodes, "links": links})


def test_part_handles_in_pipeline_nodes_and_unsampling_are_one_line_errors(flux):
    root, _ = flux
    g = flux_graph()
    g["12"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["13", 0]}}
    g["13"] = {"class_type": "BasicScheduler", "inputs": {"model": ["6", 0], "scheduler": "simple", "steps": STEPS,
                                                          "denoise": 1.0}}  # fmt: skip
    g["8"] = {"class_type": "SamplerCustom", "inputs": {"model": ["6", 0], "add_noise": True, "noise_seed": SEED,
              "cfg": 1.0, "positive": ["4", 0], "negative": ["5", 0], "sampler": ["14", 0], "sigmas": ["12", 0],
              "latent_image": ["7", 0]}}  # fmt: skip
    g["14"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    assert "unsampling" in _node_error(root, g)
    # a node that needs a checkpoint's pipeline, handed UNETLoader's MODEL
    g = flux_graph()
    g["10"] = {"class_type": "CheckpointSave", "inputs": {"model": ["1", 0], "clip": ["2", 0], "vae": ["9", 0],
               "filename_prefix": "x"}}  # fmt: skip
    del g["11"]
    assert "needs a checkpoint's model" in _node_error(root, g)


def test_lora_loader_on_sd3_equals_the_pipelines_lora(sd3):
    """A LoRA in diffusers' SD3 format (PEFT names behind ``transformer.``, ``text_encoder.``, ``text_encoder_2.``)
    through LoraLoader on the checkpoint: the pipeline's image with the same LoRA; the model is its own again after."""
    from peft import LoraConfig, get_peft_model_state_dict
    from safetensors.torch import save_file

    from _sd3_models import diffusers_sd3

    root, pipe = sd3
    maker = diffusers_sd3(root / "sd3-folder")
    torch.manual_seed(0)
    mmdit = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_out"]
    maker.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=mmdit, init_lora_weights=False))
    clip = ["q_proj", "k_proj", "v_proj", "out_proj"]
    maker.text_encoder.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=clip, init_lora_weights=False))
    maker.text_encoder_2.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=clip, init_lora_weights=False))
    sd = {f"transformer.{k}": v for k, v in get_peft_model_state_dict(maker.transformer).items()}
    sd.update({f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(maker.text_encoder).items()})
    sd.update({f"text_encoder_2.{k}": v for k, v in get_peft_model_state_dict(maker.text_encoder_2).items()})
    (root / "loras").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "loras" / "sd3-lora.safetensors"))

    ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
    ref = str((root / "models" / "sd3-tiny.safetensors").resolve())
    g = sd3_graph(ckpt, ["10", 0], ["10", 1], ["1", 2])
    g["10"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
               "lora_name": "sd3-lora.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}  # fmt: skip
    ours = _pixels(_run(root, g, {ref: pipe})["7"][0])
    lora = [(root / "loras" / "sd3-lora.safetensors", 1.0)]
    theirs = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0, loras=lora)
    plain = _pipeline_image(pipe, schedule="simple", cfg_scale=4.0)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - plain).max() > 1e-3  # the LoRA changed the image
    g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
    assert np.abs(_pixels(_run(root, g, {ref: pipe})["7"][0]) - plain).max() < TOL  # and is gone after the call


def test_lora_loader_on_flux_equals_the_pipelines_lora(flux):
    """A kohya Flux LoRA (BFL transformer names with alpha, ``lora_te1_`` CLIP-L and ``lora_te3_`` T5 layers) through
    LoraLoader on UNETLoader's model and DualCLIPLoader's clip: the Flux pipeline's image with the same LoRA file;
    the model and encoders are their own again after the call."""
    from safetensors.torch import load_file, save_file

    root, pipe = flux
    g = torch.Generator().manual_seed(11)
    sd: dict[str, torch.Tensor] = {}

    def pair(base: str, out: int, inp: int) -> None:
        sd[f"{base}.lora_down.weight"] = torch.randn(2, inp, generator=g) * 0.4 / inp**0.5
        sd[f"{base}.lora_up.weight"] = torch.randn(out, 2, generator=g) * 0.4
        sd[f"{base}.alpha"] = torch.tensor(2.0)

    bfl = load_file(str(root / "models" / "unet" / "flux1-tiny.safetensors"))
    for k, v in bfl.items():
        if k.endswith(".weight") and v.ndim == 2 and "blocks" in k and not k.startswith("final_layer"):
            pair("lora_unet_" + k[: -len(".weight")].replace(".", "_"), *v.shape)
    q = pipe.text_encoder.text_model.encoder.layers[0].self_attn.q_proj.weight
    pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", *q.shape)
    t5q = pipe.text_encoder_2.encoder.block[0].layer[0].SelfAttention.q.weight
    pair("lora_te3_encoder_block_0_layer_0_SelfAttention_q", *t5q.shape)
    (root / "loras").mkdir(exist_ok=True)
    save_file(sd, str(root / "loras" / "flux-kohya.safetensors"))

    graph = flux_graph()
    graph["12"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                   "lora_name": "flux-kohya.safetensors", "strength_model": 1.0, "strength_clip": 1.0}}  # fmt: skip
    graph["6"]["inputs"]["model"] = ["12", 0]
    graph["3"]["inputs"]["clip"] = ["12", 1]
    ours = _pixels(_run(root, graph)["10"][0])
    kw: dict[str, Any] = dict(schedule="simple", cfg_scale=1.0, distilled_cfg_scale=3.5)
    theirs = _pipeline_image(pipe, loras=[(root / "loras" / "flux-kohya.safetensors", 1.0)], **kw)
    plain = _pipeline_image(pipe, **kw)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - plain).max() > 1e-3  # the LoRA changed the image
    assert np.abs(_pixels(_run(root, flux_graph())["10"][0]) - plain).max() < TOL  # and is gone after the call


# -- Texts of different lengths --------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_long_positive_beside_a_short_negative_runs_apart_at_cfg_above_1(family, request, monkeypatch):
    """ComfyUI holds an SD3 / Flux text in a CONDRegular: at cfg other than 1 a positive and a negative of different
    token counts run apart, each at its own length in a call of its own (here once refused in one line, or
    repeated to their least common multiple where that was at most 4 x the shorter, which changes a joint
    attention): SD3's long positive (its T5 states over 77 tokens) beside a one-word negative, Flux's positive
    made twice as long by ConditioningConcat. The graph runs and its latent equals a loop that calls the transformer
    once per text (max abs <= 1e-5)."""
    from _flow_runs import capture_flow_runs, per_text_euler

    root, pipe = request.getfixturevalue(family)
    long_prompt = " ".join(["a red apple on a wooden table"] * 96)
    if family == "sd3":
        ckpt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3-tiny.safetensors"}}}
        pipes = {str((root / "models" / "sd3-tiny.safetensors").resolve()): pipe}
        g = sd3_graph(ckpt, ["1", 0], ["1", 1], ["1", 2])
        g["3"]["inputs"]["text"] = long_prompt
        g["4"]["inputs"]["text"] = "dark"
        sampler, image = "6", "7"
    else:
        pipes = None  # Flux's T5 states are cut at 512 tokens here: ConditioningConcat makes 1024 (lcm 2 x 512)
        g = flux_graph()
        g["12"] = {"class_type": "ConditioningConcat", "inputs": {"conditioning_to": ["3", 0],
                   "conditioning_from": ["3", 0]}}  # fmt: skip
        g["4"]["inputs"]["conditioning"] = ["12", 0]
        g["5"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "dark", "clip": ["2", 0]}}
        g["8"]["inputs"]["cfg"] = 4.0
        sampler, image = "8", "10"
    runs = capture_flow_runs(monkeypatch)
    out = _run(root, g, pipes)
    (run,) = runs
    lengths = [int(e[0].cond["crossattn"].shape[1]) for e in run["args"][1:3]]
    assert lengths[0] > lengths[1], lengths
    gap = (run["out"] - per_text_euler(run)).abs().max()
    assert gap <= 1e-5, (lengths, gap)
    assert _pixels(out[image][0]).std() > 0.01 and out[sampler][0]["samples"].shape[-1] == 8
