"""FLUX.2 [klein] through sdengine's ComfyUI nodes: ComfyUI's own klein graph (its ``image_flux2_klein`` templates:
UNETLoader, CLIPLoader type ``flux2``, VAELoader ``flux2-vae.safetensors``, CLIPTextEncode, EmptyFlux2LatentImage,
Flux2Scheduler, KSamplerSelect euler, RandomNoise, CFGGuider, SamplerCustomAdvanced, VAEDecode; klein edit with
VAEEncode + ReferenceLatent) on ComfyUI's three files written from a tiny random klein folder
(``tests/_flux2_models.py``, 128-wide heads, the release's 128 latent channels: a 32-channel VAE; Qwen2's tokenizer
in ComfyUI's ``qwen25_tokenizer`` layout beside the text encoder), held against sdengine's own FLUX.2 pipeline on the
same files.

The pipeline is ComfyUI's graph with no setting changed: Flux2Scheduler's list is the pipeline's ``normal`` grid
(diffusers' ``linspace(1, 1/n, n)`` shifted by the empirical ``mu``, then 0), its text states are diffusers' for a
prompt of up to 512 tokens (the template, layers 9 / 18 / 27, padded to 512 with every position attended), its
latent format is the VAE's normalised 2x2 patches and a reference's ids are diffusers'. The differences (a prompt over
512 tokens: kept whole there, cut here; KSampler's schedule: ComfyUI's ``mu`` 2.02) are their own tests."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux2_models import FILE_TRANSFORMER, FILE_VAE, make_klein_folder  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pixels, _run  # noqa: E402
from test_flux2_files import bfl_layout, comfy_vae_layout  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry low quality, watermark"
SEED, STEPS = 5, 4
SIDE = 64  # EmptyFlux2LatentImage 64: a 4 x 4 latent of 128 channels, 32 pixels out of the tiny 4x VAE (its 2x2
# patches: 8 pixels a latent pixel); the pipeline's 32 x 32 image has the same 16 image tokens
PIXELS = SIDE // 2
MODEL, TEXT, VAE = "flux-2-klein-4b-tiny.safetensors", "qwen_3_4b_tiny.safetensors", "flux2-vae.safetensors"


@pytest.fixture(scope="module")
def klein(tmp_path_factory):
    """ComfyUI's files of a tiny klein under models/ (the folder itself too: CheckpointLoaderSimple lists it), the VAE
    in vaes/; the pipeline loaded from the same three files."""
    root = tmp_path_factory.mktemp("comfy_flux2")
    models = root / "models"
    folder = make_klein_folder(
        models / "klein-folder",
        seed=3,
        distilled=True,
        transformer={**FILE_TRANSFORMER, "in_channels": 128},
        vae={**FILE_VAE, "latent_channels": 32},
    )
    (models / "diffusion_models").mkdir()
    (models / "text_encoders").mkdir()
    (root / "vaes").mkdir()
    net = load_file(next((folder / "transformer").glob("*.safetensors")))
    model = models / "diffusion_models" / MODEL
    save_file(bfl_layout(net, "model.diffusion_model."), model)
    text = models / "text_encoders" / TEXT
    te = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    save_file({k: v.contiguous() for k, v in te.items()}, text)
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = root / "vaes" / VAE
    save_file(comfy_vae_layout(load_file(next((folder / "vae").glob("*.safetensors")))), vae)
    pipe = sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae)
    return root, pipe, {"model": model, "text": text, "vae": vae, "te": te, "folder": folder}


def klein_graph(*, cfg: float = 1.0, negative: str = "", steps: int = STEPS, side: int = SIDE) -> dict:
    """ComfyUI's klein text-to-image template, API format."""
    return {
        "75": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "71": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT, "type": "flux2", "device": "default"}},
        "72": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "74": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["71", 0]}},
        "76": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["71", 0]}},
        "63": {"class_type": "CFGGuider",
               "inputs": {"model": ["75", 0], "positive": ["74", 0], "negative": ["76", 0], "cfg": cfg}},
        "66": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "62": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": side, "height": side}},
        "61": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "73": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "64": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["73", 0], "guider": ["63", 0],
               "sampler": ["61", 0], "sigmas": ["62", 0], "latent_image": ["66", 0]}},
        "65": {"class_type": "VAEDecode", "inputs": {"samples": ["64", 0], "vae": ["72", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["65", 0], "filename_prefix": "klein"}},
    }  # fmt: skip


def _image(pipe: Any, *, cfg: float = 1.0, negative: str = "", steps: int = STEPS, **kw: Any) -> np.ndarray:
    kw = {"schedule": "normal", **kw}
    out = pipe(PROMPT, negative, steps=steps, seed=SEED, width=PIXELS, height=PIXELS, sampler="euler",
               cfg_scale=cfg, progress=False, **kw)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_pipeline(klein):
    """The template's image is the pipeline's (no rule changed); its text states are the pipeline's (512 tokens,
    the padding's kept), Flux2Scheduler's sigmas the pipeline's grid."""
    from sdengine.diffusion.flow import flow_grid

    root, pipe, _ = klein
    out = _run(root, klein_graph())
    ours = _pixels(out["65"][0])
    assert ours.shape == (PIXELS, PIXELS, 3) and ours.std() > 0.01
    entry = out["74"][0][0]
    cond = pipe.conditioner.text(PROMPT)
    assert entry.cond["crossattn"].shape == (1, 512, 3 * 16) and "text_mask" not in entry.cond
    assert torch.allclose(entry.cond["crossattn"], cond["crossattn"].float(), atol=1e-6)
    sigmas = out["62"][0].values
    grid = flow_grid(pipe.flow_schedule(PIXELS, PIXELS, STEPS), STEPS, "normal").sigmas
    assert sigmas.shape == (STEPS + 1,) and float(sigmas[-1]) == 0.0
    assert torch.allclose(sigmas, grid.float(), atol=1e-6), (sigmas, grid)
    latent = out["64"][0]["samples"]
    assert latent.shape == (1, 128, SIDE // 16, SIDE // 16)
    theirs = _image(pipe)
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    # another step count is another image
    assert np.abs(_pixels(_run(root, klein_graph(steps=2))["65"][0]) - ours).max() > 1e-3


def _reference_png(root: Any) -> Any:
    """A 64 x 64 picture in the route's input folder (a smooth random field: the VAE sees structure)."""
    from PIL import Image

    g = torch.Generator().manual_seed(11)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear")
    pixels = (field[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    (root / "in").mkdir(exist_ok=True)
    path = root / "in" / "klein_ref.png"
    Image.fromarray(pixels).save(path)
    return path


def test_reference_latent_edit_equals_the_pipelines_reference_image(klein):
    """klein edit as ComfyUI's template wires it (LoadImage, VAEEncode with the FLUX.2 VAE, ReferenceLatent on the
    positive): the pipeline's image with the same picture as ``reference_images`` (the VAE mean's normalised patches
    at time index 10, diffusers' ids); two chained references: the pipeline's two."""
    root, pipe, _ = klein
    path = _reference_png(root)
    g = klein_graph()
    g.update({
        "80": {"class_type": "LoadImage", "inputs": {"image": path.name}},
        "81": {"class_type": "VAEEncode", "inputs": {"pixels": ["80", 0], "vae": ["72", 0]}},
        "82": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["74", 0], "latent": ["81", 0]}},
    })  # fmt: skip
    g["63"]["inputs"]["positive"] = ["82", 0]
    out = _run(root, g)
    encoded = out["81"][0]["samples"]
    assert encoded.shape == (1, 128, 8, 8) and out["81"][0]["posterior"] is None
    ours = _pixels(out["65"][0])
    theirs = _image(pipe, reference_images=[str(path)])
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - _image(pipe)).max() > 1e-3  # the reference counts
    g["83"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["82", 0], "latent": ["81", 0]}}
    g["63"]["inputs"]["positive"] = ["83", 0]
    two = _pixels(_run(root, g)["65"][0])
    gap = np.abs(two - _image(pipe, reference_images=[str(path), str(path)]))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())


def test_base_model_cfg_and_ksampler_schedule(klein, tmp_path, monkeypatch):
    """cfg 2.5 with a negative text (CFGGuider): the base pipeline's CFG (ComfyUI's ``u + s (c - u)`` on x0 is
    diffusers' on the velocity); KSampler (euler / simple) walks ComfyUI's klein model sampling (ModelSamplingFlux,
    ``mu`` 2.02): the pipeline on that schedule, not its own; ModelSamplingFlux's node sets another ``mu``."""
    from sdengine.diffusion.flow import FlowSchedule

    root, _, files = klein
    base = tmp_path / "flux-2-klein-base-4b-tiny.safetensors"
    base.symlink_to(files["model"])
    pipe = sdengine.load_pipeline(base, device="cpu", qwen_text=files["text"], vae=files["vae"])
    assert not pipe.distilled
    ours = _pixels(_run(root, klein_graph(cfg=2.5, negative=NEGATIVE))["65"][0])
    gap = np.abs(ours - _image(pipe, cfg=2.5, negative=NEGATIVE))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - _pixels(_run(root, klein_graph())["65"][0])).max() > 1e-3
    g = klein_graph()
    g["3"] = {"class_type": "KSampler", "inputs": {
        "model": ["75", 0], "seed": SEED, "steps": STEPS, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": ["74", 0], "negative": ["76", 0], "latent_image": ["66", 0], "denoise": 1.0}}  # fmt: skip
    g["65"]["inputs"]["samples"] = ["3", 0]
    ksampler = _pixels(_run(root, g)["65"][0])
    monkeypatch.setattr(pipe, "flow_schedule", lambda w, h, steps=None: FlowSchedule.flux(mu=2.02))
    gap = np.abs(ksampler - _image(pipe, schedule="simple"))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    g["11"] = {"class_type": "ModelSamplingFlux", "inputs": {"model": ["75", 0], "max_shift": 1.15,
               "base_shift": 0.5, "width": SIDE, "height": SIDE}}  # fmt: skip
    g["3"]["inputs"]["model"] = ["11", 0]
    assert np.abs(_pixels(_run(root, g)["65"][0]) - ksampler).max() > 1e-3


def test_long_prompt_is_kept_whole_and_the_text_read_as_comfyuis_tokenizer(klein, monkeypatch):
    """A prompt over 512 tokens: ComfyUI keeps every token (the pipeline cuts at 512: its states are the route's
    first 512, causal attention); a negative of another token count at cfg other than 1 runs apart from the
    positive, as ComfyUI's CONDRegular runs it (once refused in one line): the latent equals a loop calling the
    transformer once per text; ``\\(`` read as ``(``; ``embedding:NAME`` refused in one line."""
    from _flow_runs import capture_flow_runs, per_text_euler
    from sdengine.server.comfy import nodes_flux2

    root, pipe, files = klein
    long_prompt = " ".join(["a red apple on a wooden table"] * 48)
    text = nodes_flux2.load_text(files["text"], torch.device("cpu"), torch.float32)
    with torch.inference_mode():
        states = text.encode(long_prompt)
    cut = pipe.conditioner.text(long_prompt)["crossattn"]
    assert states.shape[1] > 550 and cut.shape[1] == 512
    assert torch.allclose(states[:, :512], cut.float(), atol=1e-6)
    runs = capture_flow_runs(monkeypatch)
    _run(root, klein_graph(cfg=2.0, negative=long_prompt))
    (run,) = runs
    lengths = [int(e[0].cond["crossattn"].shape[1]) for e in run["args"][1:3]]
    assert lengths[0] == 512 and lengths[1] > 550, lengths
    gap = (run["out"] - per_text_euler(run)).abs().max()
    assert gap <= 1e-5, gap
    g = klein_graph()
    g["74"]["inputs"]["text"] = "a \\(red\\) apple"
    escaped = _run(root, g)["74"][0][0].cond["crossattn"]
    assert torch.allclose(escaped, pipe.conditioner.text("a (red) apple")["crossattn"].float(), atol=1e-6)
    g["74"]["inputs"]["text"] = "an apple embedding:shiny"
    assert "'embedding:' names a textual-inversion embedding, which FLUX.2 does not take" in _node_error(root, g)


def test_wrong_combinations_are_one_line_node_errors(klein, tmp_path):
    from sdengine.server.comfy.registry import NODES

    root, _, files = klein
    assert "flux2" in NODES["CLIPLoader"].input("type").choices
    te = files["te"]
    texts = root / "models" / "text_encoders"
    # a Qwen2.5-VL text encoder (no q/k norms, biased q/k/v) and a Mistral one (neither) under flux2
    qwen25 = {k: v for k, v in te.items() if "_norm." not in k or "layernorm" in k}
    for k, v in te.items():
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            qwen25[k.replace(".weight", ".bias")] = torch.zeros(v.shape[0])
    save_file(qwen25, texts / "qwen_2.5_vl_tiny.safetensors")
    mistral = {k: v for k, v in te.items() if "_norm." not in k or "layernorm" in k}
    save_file(mistral, texts / "mistral_3_small_tiny.safetensors")
    try:
        g = klein_graph()
        g["71"]["inputs"]["clip_name"] = "qwen_2.5_vl_tiny.safetensors"
        assert "CLIPLoader type flux2 takes FLUX.2 [klein]'s Qwen3 text encoder" in _node_error(root, g)
        g["71"]["inputs"]["clip_name"] = "mistral_3_small_tiny.safetensors"
        assert "is Mistral Small 3 without its tokenizer (tekken_model" in _node_error(root, g)
    finally:
        (texts / "qwen_2.5_vl_tiny.safetensors").unlink()
        (texts / "mistral_3_small_tiny.safetensors").unlink()
    # no tokenizer folder beside the text encoder
    tokenizer = texts / "qwen25_tokenizer"
    tokenizer.rename(tmp_path / "moved")
    try:
        assert "CLIPLoader type flux2: no Qwen2 tokenizer beside qwen_3_4b_tiny" in _node_error(root, klein_graph())
    finally:
        (tmp_path / "moved").rename(tokenizer)
    # the same Qwen3 as Z-Image's text encoder (type lumina2): another model's conditioning
    g = klein_graph()
    g["71"]["inputs"]["type"] = "lumina2"
    assert "not this FLUX.2 model's" in _node_error(root, g)
    # FLUX.1's / SD3's empty latent; ModelSamplingSD3; CLIPSetLastLayer
    g = klein_graph()
    g["66"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}}
    assert "the latent has 16 channels" in _node_error(root, g) and "reads 128" in _node_error(root, g)
    g = klein_graph()
    g["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["75", 0], "shift": 3.0}}
    g["63"]["inputs"]["model"] = ["11", 0]
    assert "ModelSamplingSD3 is not FLUX.2's" in _node_error(root, g)
    g = klein_graph()
    g["21"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["71", 0], "stop_at_clip_layer": -2}}
    g["74"]["inputs"]["clip"] = ["21", 0]
    assert "CLIPSetLastLayer does not apply to FLUX.2" in _node_error(root, g)
    # CheckpointLoaderSimple on the klein folder
    g = klein_graph()
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "klein-folder"}}
    g["63"]["inputs"]["model"] = ["1", 0]
    assert "CLIPLoader type flux2 (qwen_3_4b.safetensors)" in _node_error(root, g)
    # a broken FLUX.2 transformer file (its marker and nothing else): one line naming it
    dev = root / "models" / "diffusion_models" / "flux2_broken_tiny.safetensors"
    save_file({"single_stream_modulation.lin.weight": torch.zeros(4, 4), "guidance_in.in_layer.weight":
               torch.zeros(4, 4)}, dev)  # fmt: skip
    try:
        g = klein_graph()
        g["75"]["inputs"]["unet_name"] = dev.name
        assert "flux2_broken_tiny.safetensors: " in _node_error(root, g)
    finally:
        dev.unlink()


def test_at_cfg_1_a_long_text_beside_a_short_negative_runs_unrepeated(klein):
    """At cfg 1 the negative does not run (ComfyUI's cfg-1 shortcut), so a positive over 512 tokens beside the empty
    negative's 512 is not repeated to their least common multiple (651 and 512: 333,312 tokens, which made this
    graph run for many minutes): the image is the one with a negative of the positive's own length."""
    root, _, _ = klein
    long_prompt = " ".join(["a red apple on a wooden table"] * 48)
    g = klein_graph()
    g["74"]["inputs"]["text"] = long_prompt
    short_negative = _pixels(_run(root, g)["65"][0])
    g["76"]["inputs"]["text"] = long_prompt
    same_length = _pixels(_run(root, g)["65"][0])
    np.testing.assert_array_equal(short_negative, same_length)


def _lora_file(root: Any, net: Any, name: str) -> Any:
    """A random LoRA on every Linear of the transformer (its guidance embedder's aside) in ComfyUI's layout (BFL's
    names behind ``diffusion_model.``, ``lora_down`` / ``lora_up`` / ``alpha``), under the route's loras/."""
    from test_lora_flux2 import _layout, _pairs

    pairs = {k: v for k, v in _pairs(net, 3).items() if "guidance_embedder" not in k}
    path = root / "loras" / name
    path.parent.mkdir(exist_ok=True)
    save_file({k: v.clone() for k, v in _layout(pairs, "comfy").items()}, str(path))
    return path


def test_lora_loader_model_only_equals_the_pipelines_lora(klein):
    """LoraLoaderModelOnly (a ComfyUI-layout klein LoRA at 0.8) on the template: the pipeline's image with the same
    LoRA (``loras=``); LoraLoader at strength_clip 0 the same image; its strength_clip is one line (LoRAs on the
    Qwen3 text encoder are not supported)."""
    root, pipe, _ = klein
    path = _lora_file(root, pipe.unet, "klein-lora.safetensors")
    g = klein_graph()
    g["70"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["75", 0], "lora_name": path.name, "strength_model": 0.8}}  # fmt: skip
    g["63"]["inputs"]["model"] = ["70", 0]
    ours = _pixels(_run(root, g)["65"][0])
    gap = np.abs(ours - _image(pipe, loras=[(path, 0.8)]))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - _pixels(_run(root, klein_graph())["65"][0])).mean() > 1e-3  # the LoRA counts
    g["70"] = {"class_type": "LoraLoader", "inputs": {"model": ["75", 0], "clip": ["71", 0], "lora_name": path.name,
                                                     "strength_model": 0.8, "strength_clip": 0.0}}  # fmt: skip
    assert np.array_equal(_pixels(_run(root, g)["65"][0]), ours)
    g["70"]["inputs"]["strength_clip"] = 1.0
    g["74"]["inputs"]["clip"] = ["70", 1]
    assert "LoraLoader's strength_clip on FLUX.2: LoRAs on its text encoder" in _node_error(root, g)


# ComfyUI's img2img / inpainting graphs: a 64 x 32 picture VAEEncoded (an 8 x 4 latent: the tiny VAE's 8 pixels a latent
# pixel; ComfyUI's Flux2Scheduler size for that latent is 128 x 64), denoise 0.6
IMG_W, IMG_H = 64, 32
TOTAL_STEPS, DENOISE = 6, 0.6  # Flux2Scheduler(6) -> SplitSigmasDenoise(0.6): its last round(3.6) = 4 steps


def img2img_inputs(root: Any) -> tuple[Any, Any, torch.Tensor, torch.Tensor]:
    """(picture path, mask path, the picture (H, W, 3) in 0..1, the mask (H, W) in 0..1) in the route's input
    folder: a smooth random picture; a mask white in a box whose edges fall inside latent cells (between pixels 11 |
    12 and 43 | 44 across, 27 | 28 down) with a grey column (100), so that bilinear shrinking leaves grey cells."""
    from PIL import Image

    g = torch.Generator().manual_seed(12)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 4, 8, generator=g), size=(IMG_H, IMG_W), mode="bilinear")
    pixels = (field[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    m = np.zeros((IMG_H, IMG_W), np.uint8)
    m[4:28, 12:44] = 255
    m[4:28, 19:21] = 100
    (root / "in").mkdir(exist_ok=True)
    picture, mask = root / "in" / "img2img.png", root / "in" / "img2img_mask.png"
    Image.fromarray(pixels).save(picture)
    Image.fromarray(m, "L").save(mask)
    return picture, mask, torch.from_numpy(pixels).float() / 255, torch.from_numpy(m).float() / 255


def img2img_nodes(picture: Any, mask: Any, vae: list, *, masked: bool) -> tuple[dict, list]:
    """(LoadImage -> VAEEncode (-> LoadImageMask red + SetLatentNoiseMask), the latent to sample)."""
    g = {
        "80": {"class_type": "LoadImage", "inputs": {"image": picture.name}},
        "81": {"class_type": "VAEEncode", "inputs": {"pixels": ["80", 0], "vae": vae}},
    }
    if not masked:
        return g, ["81", 0]
    g["91"] = {"class_type": "LoadImageMask", "inputs": {"image": mask.name, "channel": "red"}}
    g["92"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["81", 0], "mask": ["91", 0]}}
    return g, ["92", 0]


def test_img2img_and_inpainting_graphs_follow_comfyuis_rules(klein):
    """ComfyUI's FLUX.2 img2img and inpainting on klein: VAEEncode of a picture (SetLatentNoiseMask with a grey-edged
    mask for inpainting) sampled (1) by SamplerCustomAdvanced along Flux2Scheduler(6) split by SplitSigmasDenoise 0.6
    and (2) by KSampler (euler / simple, denoise 0.6: ComfyUI's klein model sampling, ``mu`` 2.02), each held against
    ComfyUI's rules written out on diffusers' transformer and VAE (``_comfy_flux2_reference``: the sigmas, the
    noise, the start, the mask blended into every model call, no init-image reference) with diffusers' prompt
    states: mean abs on 0..1 pixels under 1e-5 (measured in docs/flux2.md)."""
    from _comfy_flux2_reference import (
        ComfyFlux2Reference,
        flux2_scheduler_sigmas,
        ksampler_simple_sigmas,
        split_sigmas_denoise,
    )
    from _flux2_models import diffusers_klein_folder

    root, _, files = klein
    picture, mask_path, pixels, mask = img2img_inputs(root)
    with torch.no_grad():
        states, _ = diffusers_klein_folder(files["folder"]).encode_prompt(PROMPT, device=torch.device("cpu"))
    ref = ComfyFlux2Reference(files["folder"])
    custom = split_sigmas_denoise(flux2_scheduler_sigmas(TOTAL_STEPS, 2 * IMG_W, 2 * IMG_H), DENOISE)
    ksampler = ksampler_simple_sigmas(4, DENOISE)
    images, gaps = {}, {}
    for masked in (False, True):
        g = klein_graph()
        nodes, latent = img2img_nodes(picture, mask_path, ["72", 0], masked=masked)
        g.update(nodes)
        del g["66"]
        g["62"]["inputs"].update({"steps": TOTAL_STEPS, "width": 2 * IMG_W, "height": 2 * IMG_H})
        g["90"] = {"class_type": "SplitSigmasDenoise", "inputs": {"sigmas": ["62", 0], "denoise": DENOISE}}
        g["64"]["inputs"].update({"sigmas": ["90", 1], "latent_image": latent})
        out = _run(root, g)
        assert torch.allclose(out["90"][1].values, custom, atol=1e-6) and custom.shape == (5,)
        images[("custom", masked)] = _pixels(out["65"][0])
        g["3"] = {"class_type": "KSampler", "inputs": {
            "model": ["75", 0], "seed": SEED, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["74", 0], "negative": ["76", 0], "latent_image": latent, "denoise": DENOISE}}  # fmt: skip
        g["65"]["inputs"]["samples"] = ["3", 0]
        out = _run(root, g)
        images[("ksampler", masked)] = _pixels(out["65"][0])
        if masked:  # outside the mask the sampled latent is the picture's (the last step's denoised there)
            keep = out["92"][0]["noise_mask"].reshape(1, 1, IMG_H, IMG_W)
            keep = torch.nn.functional.interpolate(keep, size=(IMG_H // 8, IMG_W // 8), mode="bilinear") == 0
            kept = keep.expand_as(out["81"][0]["samples"])
            assert bool(kept.any())
            assert torch.allclose(out["3"][0]["samples"][kept], out["81"][0]["samples"][kept], atol=1e-5)
            # InpaintModelConditioning (noise_mask on): FLUX.2 reads no concat image, so SetLatentNoiseMask's image
            g["93"] = {"class_type": "InpaintModelConditioning", "inputs": {"positive": ["74", 0], "negative": [
                "76", 0], "vae": ["72", 0], "pixels": ["80", 0], "mask": ["91", 0], "noise_mask": True}}  # fmt: skip
            g["3"]["inputs"].update({"positive": ["93", 0], "negative": ["93", 1], "latent_image": ["93", 2]})
            np.testing.assert_array_equal(_pixels(_run(root, g)["65"][0]), images[("ksampler", masked)])
        for kind, sigmas in (("custom", custom), ("ksampler", ksampler)):
            want, latent_mask = ref.sample(pixels, states, sigmas, SEED, mask=mask if masked else None)
            got = images[(kind, masked)]
            assert got.shape == (IMG_H, IMG_W, 3) and got.std() > 0.01
            gap = np.abs(got - want.numpy().astype(np.float64))
            gaps[(kind, masked)] = (float(gap.mean()), float(gap.max()))
            if latent_mask is not None:
                assert bool(((latent_mask > 0) & (latent_mask < 1)).any())  # grey edge cells
    print({f"{k[0]} {'inpaint' if k[1] else 'img2img'}": f"{v[0]:.2g} (max {v[1]:.2g})" for k, v in gaps.items()})
    for key, (mean, top) in gaps.items():
        assert mean < TOL and top < 1e-4, (key, mean, top)
    keys = list(images)
    for i, a in enumerate(keys):  # each graph is another image
        for b in keys[i + 1 :]:
            assert np.abs(images[a] - images[b]).max() > 1e-3, (a, b)
