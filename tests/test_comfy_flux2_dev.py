"""FLUX.2 [dev] through sdengine's ComfyUI nodes: ComfyUI's own [dev] graph (its ``image_flux2`` template:
UNETLoader of the [dev] transformer file, CLIPLoader type ``flux2`` on ComfyUI's Mistral Small 3 file with its
tokenizer inside (``tekken_model``), VAELoader ``flux2-vae.safetensors``, CLIPTextEncode, FluxGuidance,
EmptyFlux2LatentImage, Flux2Scheduler, KSamplerSelect euler, RandomNoise, BasicGuider, SamplerCustomAdvanced,
VAEDecode; edit with VAEEncode + ReferenceLatent) on ComfyUI's files written from a tiny random [dev] folder
(``tests/_flux2_dev_models.py``), held against sdengine's FLUX.2 pipeline on the same files run with ComfyUI's
text rules.

ComfyUI's Mistral text rules differ from diffusers' (the pipeline's): ``<s>`` and BFL's system prompt around the
text as the pipeline's, layers 10 / 20 / 30 as the pipeline's, but no padding (``Mistral3Tokenizer``'s
``min_length`` 1, never cut) where diffusers pads to 512 tokens with a mask; the transformer then gets the states
zero-padded in front to 512 (``model_base.Flux2``). The oracle for those states is transformers' Mistral3 from the
folder on the folder's tokenizer's ids; the pipeline is run with them in place of its own text."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux2_dev_models import make_dev_folder, tekken_json  # noqa: E402
from _flux2_models import FILE_TRANSFORMER, FILE_VAE  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pixels, _run  # noqa: E402
from test_flux2_dev_files import MISTRAL_FILE_TEXT, comfy_mistral_layout  # noqa: E402
from test_flux2_files import bfl_layout, comfy_vae_layout  # noqa: E402

PROMPT = "a red apple on a table"
SEED, STEPS = 5, 3
SIDE = 64  # EmptyFlux2LatentImage 64: a 4 x 4 latent of 128 channels, 32 pixels out of the tiny 4x VAE
PIXELS = SIDE // 2
MODEL, TEXT, VAE = "flux2_dev_tiny.safetensors", "mistral_3_small_flux2_tiny.safetensors", "flux2-vae.safetensors"


@pytest.fixture(scope="module")
def dev(tmp_path_factory):
    """ComfyUI's files of a tiny [dev] under models/ (the VAE in vaes/); the pipeline loaded from the same files."""
    root = tmp_path_factory.mktemp("comfy_flux2_dev")
    models = root / "models"
    folder = make_dev_folder(
        root / "dev-folder",
        seed=7,
        transformer={**FILE_TRANSFORMER, "in_channels": 128},
        text=MISTRAL_FILE_TEXT,
        vae={**FILE_VAE, "latent_channels": 32},
    )
    for d in (models / "diffusion_models", models / "text_encoders", root / "vaes"):
        d.mkdir(parents=True)
    model = models / "diffusion_models" / MODEL
    save_file(
        bfl_layout(load_file(next((folder / "transformer").glob("*.safetensors"))), "model.diffusion_model."), model
    )
    te: dict[str, torch.Tensor] = {}
    for f in sorted((folder / "text_encoder").glob("*.safetensors")):
        te |= load_file(f)
    text = models / "text_encoders" / TEXT
    save_file(comfy_mistral_layout(te, tekken_json(folder / "tokenizer")), text)
    save_file(comfy_mistral_layout(te, None), models / "text_encoders" / "mistral_bare_tiny.safetensors")
    vae = root / "vaes" / VAE
    save_file(comfy_vae_layout(load_file(next((folder / "vae").glob("*.safetensors")))), vae)
    pipe = sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae)
    assert pipe.dev
    return root, pipe, {"folder": folder, "model": model, "text": text, "vae": vae}


def dev_graph(*, guidance: float | None = 4.0, steps: int = STEPS, text: str = PROMPT) -> dict:
    """ComfyUI's FLUX.2 [dev] text-to-image template, API format (FluxGuidance left out where ``guidance`` is None)."""
    g = {
        "12": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "38": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT, "type": "flux2", "device": "default"}},
        "10": {"class_type": "VAELoader", "inputs": {"vae_name": VAE}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["38", 0]}},
        "26": {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": guidance}},
        "22": {"class_type": "BasicGuider", "inputs": {"model": ["12", 0], "conditioning": ["26", 0]}},
        "47": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "48": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": SIDE, "height": SIDE}},
        "16": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "25": {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}},
        "13": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["25", 0], "guider": ["22", 0],
               "sampler": ["16", 0], "sigmas": ["48", 0], "latent_image": ["47", 0]}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["13", 0], "vae": ["10", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux2_dev"}},
    }  # fmt: skip
    if guidance is None:
        del g["26"]
        g["22"]["inputs"]["conditioning"] = ["6", 0]
    return g


def comfy_states(folder: Any, prompt: str) -> torch.Tensor:
    """ComfyUI's Mistral states by transformers: ``<s>`` + BFL's system prompt template (the folder's tokenizer, no
    padding), Mistral3's hidden states 10, 20, 30 side by side per token; (1, tokens, 3 x hidden)."""
    from transformers import Mistral3ForConditionalGeneration, PreTrainedTokenizerFast

    from sdengine.text.flux2_prompt import DEV_PROMPT_TEMPLATE

    tok = PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer")
    ids = tok(DEV_PROMPT_TEMPLATE.replace("{}", prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert int(ids[0, 0]) == 1 and int(ids[0, 1]) == tok.convert_tokens_to_ids("[SYSTEM_PROMPT]")
    model = Mistral3ForConditionalGeneration.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    states = torch.stack([out.hidden_states[i] for i in (10, 20, 30)], dim=1)  # (1, 3, L, hidden)
    return states.permute(0, 2, 1, 3).reshape(1, ids.shape[1], -1).float()


def _comfy_rules(pipe: Any, monkeypatch: Any, states: torch.Tensor) -> None:
    """The pipeline's text replaced by ComfyUI's states, zero-padded in front to its 512 tokens
    (``model_base.Flux2``)."""
    c = pipe.conditioner
    padded = torch.nn.functional.pad(states, (0, 0, c.max_sequence_length - int(states.shape[1]), 0))
    monkeypatch.setattr(c, "module", None)
    monkeypatch.setattr(c, "encode_texts", lambda texts: padded)


def _image(pipe: Any, guidance: float, steps: int = STEPS, **kw: Any) -> np.ndarray:
    out = pipe(PROMPT, steps=steps, seed=SEED, width=PIXELS, height=PIXELS, sampler="euler", schedule="normal",
               cfg_scale=1.0, distilled_cfg_scale=guidance, progress=False, **kw)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_pipeline_with_comfyuis_text_rules(dev, monkeypatch):
    """The template's text states are transformers' Mistral on ComfyUI's unpadded tokens; its sigmas the pipeline's
    grid; its image the pipeline's run on those states (FluxGuidance 4: the pipeline's distilled_cfg_scale 4);
    another guidance (2.5, or none: ComfyUI's Flux default 3.5) another image, the pipeline's at that guidance."""
    from sdengine.diffusion.flow import flow_grid

    root, pipe, files = dev
    out = _run(root, dev_graph())
    entry = out["6"][0][0]
    want = comfy_states(files["folder"], PROMPT)
    assert 60 < want.shape[1] < 512  # the system prompt's tokens and the text's, no padding
    assert entry.cond["crossattn"].shape == want.shape and "text_mask" not in entry.cond
    gap = (entry.cond["crossattn"] - want).abs().max().item()
    assert gap < 1e-5, gap
    assert float(out["26"][0][0].cond["guidance"][0]) == 4.0
    sigmas = out["48"][0].values
    grid = flow_grid(pipe.flow_schedule(PIXELS, PIXELS, STEPS), STEPS, "normal").sigmas
    assert torch.allclose(sigmas, grid.float(), atol=1e-6), (sigmas, grid)
    ours = _pixels(out["8"][0])
    assert ours.shape == (PIXELS, PIXELS, 3) and ours.std() > 0.01
    # the pipeline's own text (padded to 512 with a mask, diffusers') is another image: the rules differ
    own = _image(pipe, 4.0)
    assert np.abs(ours - own).max() > 1e-4
    _comfy_rules(pipe, monkeypatch, want)
    theirs = _image(pipe, 4.0)
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    for guidance, node in ((2.5, 2.5), (3.5, None)):
        other = _pixels(_run(root, dev_graph(guidance=node))["8"][0])
        assert np.abs(other - ours).max() > 1e-3  # the guidance counts
        gap = np.abs(other - _image(pipe, guidance))
        assert gap.mean() < TOL and gap.max() < 1e-4, (guidance, gap.mean(), gap.max())


def _reference_png(root: Any) -> Any:
    from PIL import Image

    g = torch.Generator().manual_seed(11)
    field = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=(64, 64), mode="bilinear")
    pixels = (field[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    (root / "in").mkdir(exist_ok=True)
    path = root / "in" / "dev_ref.png"
    Image.fromarray(pixels).save(path)
    return path


def test_reference_latent_equals_the_pipelines_reference_image(dev, monkeypatch):
    """[dev] edit as ComfyUI wires it (VAEEncode with the FLUX.2 VAE, ReferenceLatent on the conditioning): the
    pipeline's image with the same picture as ``reference_images`` (ComfyUI's text rules)."""
    root, pipe, files = dev
    path = _reference_png(root)
    g = dev_graph()
    g.update({
        "80": {"class_type": "LoadImage", "inputs": {"image": path.name}},
        "81": {"class_type": "VAEEncode", "inputs": {"pixels": ["80", 0], "vae": ["10", 0]}},
        "82": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["26", 0], "latent": ["81", 0]}},
    })  # fmt: skip
    g["22"]["inputs"]["conditioning"] = ["82", 0]
    ours = _pixels(_run(root, g)["8"][0])
    _comfy_rules(pipe, monkeypatch, comfy_states(files["folder"], PROMPT))
    gap = np.abs(ours - _image(pipe, 4.0, reference_images=[str(path)]))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - _image(pipe, 4.0)).max() > 1e-3  # the reference counts


def test_dev_refusals_are_one_line(dev):
    """A Mistral file without its tokenizer inside; CLIPSetLastLayer; LoraLoader's strength_clip; a klein-width
    mismatch (a Qwen3 CLIP of another width is another model's conditioning)."""
    root, _, _ = dev
    g = dev_graph()
    g["38"]["inputs"]["clip_name"] = "mistral_bare_tiny.safetensors"
    assert "is Mistral Small 3 without its tokenizer (tekken_model" in _node_error(root, g)
    g = dev_graph()
    g["21"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["38", 0], "stop_at_clip_layer": -2}}
    g["6"]["inputs"]["clip"] = ["21", 0]
    assert "CLIPSetLastLayer does not apply to FLUX.2" in _node_error(root, g)


def test_lora_loader_model_only_equals_the_pipelines_lora(dev, monkeypatch):
    """LoraLoaderModelOnly (a ComfyUI-layout FLUX.2 LoRA at 0.8) on the [dev] template: the pipeline's image (ComfyUI's
    text rules) with the same LoRA (``loras=``); LoraLoader's strength_clip is one line."""
    from test_comfy_flux2 import _lora_file

    root, pipe, files = dev
    path = _lora_file(root, pipe.unet, "dev-lora.safetensors")
    g = dev_graph()
    g["70"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["12", 0], "lora_name": path.name, "strength_model": 0.8}}  # fmt: skip
    g["22"]["inputs"]["model"] = ["70", 0]
    ours = _pixels(_run(root, g)["8"][0])
    plain = _pixels(_run(root, dev_graph())["8"][0])
    assert np.abs(ours - plain).mean() > 1e-3  # the LoRA counts
    _comfy_rules(pipe, monkeypatch, comfy_states(files["folder"], PROMPT))
    gap = np.abs(ours - _image(pipe, 4.0, loras=[(path, 0.8)]))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    g["70"] = {"class_type": "LoraLoader", "inputs": {"model": ["12", 0], "clip": ["38", 0], "lora_name": path.name,
                                                     "strength_model": 0.8, "strength_clip": 1.0}}  # fmt: skip
    g["6"]["inputs"]["clip"] = ["70", 1]
    assert "LoraLoader's strength_clip on FLUX.2: LoRAs on its text encoder" in _node_error(root, g)


def test_img2img_and_inpainting_graphs_follow_comfyuis_rules(dev):
    """ComfyUI's FLUX.2 [dev] img2img and inpainting: VAEEncode of a picture (SetLatentNoiseMask with a grey-edged
    mask for inpainting), FluxGuidance 4 (2.5 for KSampler), sampled by BasicGuider + SamplerCustomAdvanced along
    Flux2Scheduler(6) split by SplitSigmasDenoise 0.6, and by KSampler (euler / simple, denoise 0.6, ComfyUI's ``mu``
    2.02): each held against ComfyUI's rules written out on diffusers' transformer and VAE
    (``_comfy_flux2_reference``) with ComfyUI's text states (transformers' Mistral3, unpadded, zero-padded in front
    to 512) and the guidance: mean abs on 0..1 pixels under 1e-5 (measured in docs/flux2.md)."""
    from _comfy_flux2_reference import (
        ComfyFlux2Reference,
        flux2_scheduler_sigmas,
        ksampler_simple_sigmas,
        split_sigmas_denoise,
    )
    from test_comfy_flux2 import DENOISE, IMG_H, IMG_W, TOTAL_STEPS, img2img_inputs, img2img_nodes

    root, _, files = dev
    picture, mask_path, pixels, mask = img2img_inputs(root)
    states = comfy_states(files["folder"], PROMPT)
    states = torch.nn.functional.pad(states, (0, 0, 512 - int(states.shape[1]), 0))
    ref = ComfyFlux2Reference(files["folder"])
    custom = split_sigmas_denoise(flux2_scheduler_sigmas(TOTAL_STEPS, 2 * IMG_W, 2 * IMG_H), DENOISE)
    ksampler = ksampler_simple_sigmas(4, DENOISE)
    images, gaps = {}, {}
    for masked in (False, True):
        g = dev_graph()
        nodes, latent = img2img_nodes(picture, mask_path, ["10", 0], masked=masked)
        g.update(nodes)
        del g["47"]
        g["48"]["inputs"].update({"steps": TOTAL_STEPS, "width": 2 * IMG_W, "height": 2 * IMG_H})
        g["90"] = {"class_type": "SplitSigmasDenoise", "inputs": {"sigmas": ["48", 0], "denoise": DENOISE}}
        g["13"]["inputs"].update({"sigmas": ["90", 1], "latent_image": latent})
        images[("custom", masked)] = _pixels(_run(root, g)["8"][0])
        g["27"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 2.5}}
        g["3"] = {"class_type": "KSampler", "inputs": {
            "model": ["12", 0], "seed": SEED, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["27", 0], "negative": ["27", 0], "latent_image": latent, "denoise": DENOISE}}  # fmt: skip
        g["8"]["inputs"]["samples"] = ["3", 0]
        images[("ksampler", masked)] = _pixels(_run(root, g)["8"][0])
        for kind, sigmas, guidance in (("custom", custom, 4.0), ("ksampler", ksampler, 2.5)):
            want, latent_mask = ref.sample(
                pixels, states, sigmas, SEED, mask=mask if masked else None, guidance=guidance
            )
            got = images[(kind, masked)]
            assert got.shape == (IMG_H, IMG_W, 3) and got.std() > 0.01
            gap = np.abs(got - want.numpy().astype(np.float64))
            gaps[(kind, masked)] = (float(gap.mean()), float(gap.max()))
            if latent_mask is not None:
                assert bool(((latent_mask > 0) & (latent_mask < 1)).any())  # grey edge cells
            if kind == "custom" and not masked:  # another guidance is another image: the guidance reaches it
                other, _ = ref.sample(pixels, states, sigmas, SEED, guidance=2.5)
                assert float((other - want).abs().max()) > 1e-3
    print({f"{k[0]} {'inpaint' if k[1] else 'img2img'}": f"{v[0]:.2g} (max {v[1]:.2g})" for k, v in gaps.items()})
    for key, (mean, top) in gaps.items():
        assert mean < TOL and top < 1e-4, (key, mean, top)
    keys = list(images)
    for i, a in enumerate(keys):  # each graph is another image
        for b in keys[i + 1 :]:
            assert np.abs(images[a] - images[b]).max() > 1e-3, (a, b)
