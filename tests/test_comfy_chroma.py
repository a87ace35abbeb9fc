"""Chroma through sdengine's ComfyUI nodes: UNETLoader on a Chroma transformer file (BFL's names with the
``distilled_guidance_layer``), CLIPLoader type ``chroma`` on a T5-XXL file, CLIPTextEncode with a real negative,
ModelSamplingFlux and KSampler, on a tiny random Chroma saved by diffusers, held against the Python pipeline
(pipeline/chroma.py) on the same weights.

ComfyUI's Chroma text (its PixArt T5 tokenizer: the prompt's pieces and ``</s>``, no padding, no mask) differs from
diffusers' ChromaPipeline's in one token: diffusers pads to 512 and the transformer attends to the first ``<pad>``
too (``KEPT_PADS`` 1). The workflow equals the pipeline with ``KEPT_PADS`` 0 (T5 runs with its mask, so the
prompt's states are the same); with the pipeline's own rule the images differ by that pad token's attention."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _chroma_models import make_chroma_folder  # noqa: E402
from test_comfy_sd3_flux import (  # noqa: E402
    NEGATIVE,
    PROMPT,
    TOL,
    _node_error,
    _pixels,
    _run,
    _save,
    ksampler_node,
    save_comfy_files,
)

SEED, STEPS, SIDE = 5, 4, 64  # EmptySD3LatentImage 64: an 8 x 8 latent, 16 pixels out of the tiny 2x VAE


@pytest.fixture(scope="module")
def chroma(tmp_path_factory):

    root = tmp_path_factory.mktemp("comfy_chroma")
    folder = make_chroma_folder(root / "chroma-folder", seed=2)
    save_comfy_files(folder, root, "diffusion_models/chroma-tiny.safetensors", chroma=True)
    return root, sdengine.load_pipeline(folder, device="cpu")


def chroma_graph(cfg: float = 4.0, negative: str = NEGATIVE) -> dict[str, Any]:
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "chroma-tiny.safetensors", "weight_dtype": "default"},
        },
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "t5xxl.safetensors", "type": "chroma"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["2", 0]}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["2", 0]}},
        "6": {
            "class_type": "ModelSamplingFlux",
            "inputs": {"model": ["1", 0], "max_shift": 1.15, "base_shift": 0.5, "width": SIDE, "height": SIDE},
        },
        "7": {"class_type": "EmptySD3LatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}},
        "8": ksampler_node(["6", 0], ["3", 0], ["4", 0], ["7", 0], cfg=cfg),
        "9": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["8", 0], "vae": ["9", 0]}},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def _pipeline(pipe: Any, negative: str = NEGATIVE, **kw: Any) -> np.ndarray:
    args: dict[str, Any] = dict(steps=STEPS, seed=SEED, width=16, height=16, sampler="euler", schedule="simple")
    args.update(kw)
    return pipe(PROMPT, negative, progress=False, **args).arrays[0].astype(np.float64)


def test_chroma_workflow_equals_the_pipeline_without_the_kept_pad(chroma, monkeypatch):
    import sdengine.text.chroma_conditioner as cc

    root, pipe = chroma
    out = _run(root, chroma_graph())
    ours = _pixels(out["10"][0])
    states = out["3"][0][0].cond["crossattn"]
    assert states.ndim == 3 and states.shape[1] < 512 and "vector" not in out["3"][0][0].cond  # no padding
    own = _pipeline(pipe, cfg_scale=4.0)  # the pipeline's rule: one <pad> attended
    monkeypatch.setattr(cc, "KEPT_PADS", 0)
    theirs = _pipeline(pipe, cfg_scale=4.0)
    assert ours.shape == theirs.shape == (16, 16, 3)
    assert np.abs(ours - theirs).max() < TOL
    assert ours.std() > 0.01
    assert np.abs(ours - own).max() > 1e-4  # the kept pad token is the difference
    empty = _pixels(_run(root, chroma_graph(negative=""))["10"][0])  # an empty negative: "</s>" alone
    assert np.abs(empty - _pipeline(pipe, "", cfg_scale=4.0)).max() < TOL


def test_chroma_refusals(chroma):
    root, _ = chroma
    g = chroma_graph()
    g["5"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["3", 0], "guidance": 3.5}}
    g["8"]["inputs"]["positive"] = ["5", 0]
    assert "FluxGuidance on a Chroma model" in _node_error(root, g)
    g = chroma_graph()
    g["2"] = {
        "class_type": "DualCLIPLoader",
        "inputs": {"clip_name1": "t5xxl.safetensors", "clip_name2": "t5xxl.safetensors", "type": "flux"},
    }
    assert "t5xxl.safetensors, t5xxl.safetensors are all T5 encoders" in _node_error(root, g)
    g = chroma_graph()
    g["12"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["3", 0], "latent": ["7", 0]}}
    g["8"]["inputs"]["positive"] = ["12", 0]
    g["8"]["inputs"]["cfg"] = 1.0
    assert "ReferenceLatent is FLUX.1 Kontext's; chroma-tiny.safetensors is a Chroma model" in _node_error(root, g)
    g = chroma_graph()
    g["12"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["2", 0], "stop_at_clip_layer": -2}}
    g["3"]["inputs"]["clip"] = ["12", 0]
    assert "CLIPSetLastLayer does not apply to Chroma (it has no CLIP" in _node_error(root, g)


def test_clip_loader_refuses_other_types(chroma):
    from sdengine.server.comfy.nodes import NodeError
    from sdengine.server.comfy.nodes_sd3_flux import clip_loader

    with pytest.raises(NodeError, match="CLIPLoader: type 'stable_diffusion' is not supported here; use chroma"):
        clip_loader(None, "t5xxl.safetensors", "stable_diffusion")  # type: ignore[arg-type]


def test_chroma_texts_of_other_lengths_run_apart():
    """ComfyUI's Chroma (a Flux model) holds its text in a CONDRegular: texts of different lengths never batch, each
    runs at its own length (once: repeated to their lcm where that was at most 4 x the shorter). Here both padded
    with zeros to the longer and the padding masked out, at every cfg."""
    import torch

    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes_qwen import own_lengths

    def entry(n: int) -> list[Any]:
        return [TextCondition({"crossattn": torch.ones(1, n, 4)})]

    for a, b in ((6, 3), (9, 5)):  # lcm 6 = 2 x 3 (once batched, repeated), lcm 45 = 9 x 5
        pos, neg = own_lengths(entry(a), entry(b))
        assert pos[0].cond["crossattn"].shape[1] == neg[0].cond["crossattn"].shape[1] == a
        assert neg[0].cond["text_mask"].sum() == b and neg[0].cond["crossattn"][0, b:].abs().max() == 0
        assert pos[0].cond["text_mask"].all()
    pos, neg = own_lengths(entry(4), entry(4))
    assert "text_mask" not in pos[0].cond and "text_mask" not in neg[0].cond


def test_t5_tokenizer_options_pad_as_comfyui(chroma):
    """T5TokenizerOptions min_padding 2 / min_length: the pads after </s> that ComfyUI's tokenizer adds, T5 run over
    them unmasked (held against transformers' T5 on the same ids), every token attended; refused on other CLIPs."""
    import torch
    from transformers import T5EncoderModel, T5TokenizerFast

    from sdengine.server.comfy.nodes import ClipHandle, NodeError
    from sdengine.server.comfy.nodes_sd3_flux import t5_tokenizer_options

    root, _ = chroma
    g = chroma_graph()
    g["12"] = {"class_type": "T5TokenizerOptions", "inputs": {"clip": ["2", 0], "min_padding": 2, "min_length": 0}}
    g["3"]["inputs"]["clip"] = ["12", 0]
    out = _run(root, g)
    ours = out["3"][0][0].cond["crossattn"].float()
    folder = root / "chroma-folder"
    ids = T5TokenizerFast.from_pretrained(folder / "tokenizer")(PROMPT).input_ids  # the pieces and </s>
    t5 = T5EncoderModel.from_pretrained(folder / "text_encoder").eval()
    with torch.no_grad():
        theirs = t5(torch.tensor([[*ids, 0, 0]])).last_hidden_state
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 1e-5
    assert np.isfinite(_pixels(out["10"][0])).all()
    g["12"]["inputs"].update(min_padding=0, min_length=len(ids) + 3)
    assert _run(root, g)["3"][0][0].cond["crossattn"].shape[1] == len(ids) + 3
    g["12"]["inputs"].update(min_length=600)
    assert "T5TokenizerOptions: 600 tokens" in _node_error(root, g)
    with pytest.raises(NodeError, match="T5TokenizerOptions applies to Chroma's T5"):
        t5_tokenizer_options(None, ClipHandle("x", encoders=(("t5xxl", "t"),), clip_type="flux"), 1, 0)  # type: ignore[arg-type]


def test_lora_loader_on_chroma_equals_the_pipelines_lora(chroma, monkeypatch):
    """A Chroma LoRA in ComfyUI's names (``diffusion_model.`` BFL layers, the fused qkv and ``linear1``, the
    ``distilled_guidance_layer``, and ``text_encoders.t5xxl.transformer.`` T5 layers) through LoraLoader on
    UNETLoader's model and CLIPLoader's T5: the Chroma pipeline's image with the same file (its text with
    ``KEPT_PADS`` 0, as above); the transformer and T5 kept between graphs are their own again after the call."""
    import torch

    import sdengine.text.chroma_conditioner as cc
    import test_comfy_sd3_flux
    from sdengine.weights.lora import LoRAWeight
    from test_lora_chroma import _lora_files

    root, pipe = chroma
    lora = _lora_files(pipe, root / "loras")["comfy"]
    graph = chroma_graph()
    graph["12"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["2", 0],
                   "lora_name": lora.name, "strength_model": 1.0, "strength_clip": 0.8}}  # fmt: skip
    graph["6"]["inputs"]["model"] = ["12", 0]
    graph["3"]["inputs"]["clip"] = graph["4"]["inputs"]["clip"] = ["12", 1]
    ours = _pixels(_run(root, graph)["10"][0])
    monkeypatch.setattr(cc, "KEPT_PADS", 0)
    theirs = _pipeline(pipe, cfg_scale=4.0, loras=[(lora, LoRAWeight(te=0.8, unet=1.0))])
    plain = _pipeline(pipe, cfg_scale=4.0)
    assert np.abs(ours - theirs).max() < TOL
    assert np.abs(ours - plain).max() > 1e-3  # the LoRA changed the image
    transformer_only = _pipeline(pipe, cfg_scale=4.0, loras=[(lora, LoRAWeight(te=0.0, unet=1.0))])
    assert np.abs(ours - transformer_only).max() > 1e-3  # the T5's layers count too
    # the next graph on the same loaded transformer and T5 (the same files: kept, as a server keeps them)
    monkeypatch.setattr(test_comfy_sd3_flux, "forget_parts", lambda: None)
    after = _pixels(_run(root, chroma_graph())["10"][0])
    assert np.abs(after - plain).max() < TOL  # and is gone after the call
    inner = pipe.transformer.x_embedder.out_features  # a Flux.1 LoRA on a modulation linear Chroma lacks: refused
    layer = "lora_unet_double_blocks_0_img_mod_lin"
    _save({f"{layer}.lora_down.weight": torch.randn(4, inner), f"{layer}.lora_up.weight": torch.randn(6 * inner, 4)},
          root / "loras" / "flux-mod.safetensors")  # fmt: skip
    graph["12"]["inputs"]["lora_name"] = "flux-mod.safetensors"
    error = _node_error(root, graph)
    assert error.startswith("node 8 (KSampler): LoRA: ") and "flux-mod.safetensors: a LoRA for Flux.1" in error
    assert f"it adapts {layer}, a layer Chroma does not have" in error
    assert np.abs(_pixels(_run(root, chroma_graph())["10"][0]) - plain).max() < TOL  # nothing was applied


def test_skip_layer_guidance_dit_on_chroma_equals_comfyuis_function(chroma):
    """SkipLayerGuidanceDiT on Chroma (Flux's block structure; ComfyUI's Chroma takes the same ``dit`` block
    patches): the transformer's skipped blocks hand their tokens on, the extra conditional pass's term as ComfyUI's
    post-CFG function at cfg 1 (an Euler loop written here), not a no-op; a block it lacks: one line."""
    import torch

    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.latent_sampling import make_noise
    from sdengine.pipeline.chroma import ChromaAdapter
    from test_comfy_cfg_hooks import rel, without_blocks

    root, pipe = chroma
    net = pipe.unet
    D, S = len(net.transformer_blocks), len(net.single_transformer_blocks)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 16, 4, 4, generator=g), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=g))
    with torch.inference_mode():
        plain = net(*args)
        assert torch.equal(net(*args, skip_layers=(), skip_single_layers=()), plain)
        got = net(*args, skip_layers=(0,), skip_single_layers=(S - 1,))
        assert torch.equal(got, without_blocks(net, (0,), (S - 1,))(*args)) and (got - plain).abs().max() > 1e-4
    slg = {"double_layers": "0", "single_layers": str(S - 1), "scale": 2.0, "start_percent": 0.2,
           "end_percent": 0.7, "rescaling_scale": 0.5}  # fmt: skip
    graph = chroma_graph(cfg=1.0)
    graph["12"] = {"class_type": "SkipLayerGuidanceDiT", "inputs": {"model": ["6", 0], **slg}}
    graph["8"]["inputs"]["model"] = ["12", 0]
    out = _run(root, graph)
    got = out["8"][0]["samples"].float()
    schedule = FlowSchedule.flux(mu=float(out["6"][0].flow_sampling[1]))
    cond = dict(out["3"][0][0].cond)
    den = FlowDenoiser(ChromaAdapter(net, pipe.dtype), schedule)
    skipped = FlowDenoiser(ChromaAdapter(without_blocks(net, (0,), (S - 1,)), pipe.dtype), schedule)
    sigmas = flow_grid(schedule, STEPS, "simple", comfy=True).sigmas
    x = make_noise((1, 16, 8, 8), SEED, "comfyui")
    with torch.inference_mode():
        for i in range(sigmas.shape[0] - 1):
            s, nxt = float(sigmas[i]), float(sigmas[i + 1])
            x0 = x0_c = den(x, s, **cond)
            if schedule.percent_to_sigma(0.7) <= s <= schedule.percent_to_sigma(0.2):
                x0 = x0 + (x0_c - skipped(x, s, **cond)) * 2.0
                x0 = x0 * (0.5 * x0_c.std() / x0.std() + 0.5)
            x = x + (nxt - s) * (x - x0) / s
    assert rel(got, x / 0.3611 + 0.1159) < 1e-5
    assert (got - _run(root, chroma_graph(cfg=1.0))["8"][0]["samples"].float()).abs().max() > 1e-3
    graph["12"]["inputs"]["single_layers"] = str(S)
    msg = _node_error(root, graph)
    assert f"({D} double blocks 0-{D - 1}, {S} single blocks 0-{S - 1})" in msg and "\n" not in msg, msg
