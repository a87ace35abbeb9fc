"""Qwen-Image-Edit through sdengine's ComfyUI nodes: ComfyUI's own Qwen-Image-Edit graph (its ``qwen_image_edit``
template: UNETLoader on the Edit transformer file, CLIPLoader type ``qwen_image`` on the Qwen2.5-VL file *with its
vision tower* (``visual.*``), VAELoader, LoadImage -> ImageScaleToTotalPixels -> TextEncodeQwenImageEdit for the
positive and, with an empty prompt, the negative, VAEEncode of the scaled image as the latent,
ModelSamplingAuraFlow, KSampler, VAEDecode) on ComfyUI-layout files written from a tiny random Qwen-Image-Edit folder,
held against sdengine's Edit pipeline on that folder run with ComfyUI's rules; CFGNorm (the template's) against
the pipeline with it written in its velocities; TextEncodeQwenImageEditPlus (Edit-2509, two images) against the
2509 pipeline on the same parts.

ComfyUI's rules that differ from diffusers' (each set on the pipeline here, the gaps measured in docs/qwen-image.md):
plain CFG instead of the norm-preserving true CFG; ModelSamplingAuraFlow's fixed shift on the 1000-entry table; the
image's size (``round`` of each scaled side instead of multiples of 32; both at a 56 x 56 area here instead of
1024 x 1024, for a fast CPU test); the text's RoPE start from the generated latent's grid alone (diffusers': the
largest grid, the reference's too); the template's tokens up to ``<|im_start|>user\\n`` dropped (diffusers' fixed 64,
which the tiny tokenizer gives too). The input image is 56 x 56: ComfyUI's "area" resize, its bilinear resize for the
vision tower and diffusers' Lanczos / the processor's bicubic all leave it as it is."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pixels, _run, ksampler_node  # noqa: E402

PROMPT = "make the apple green"
SEED, STEPS, SHIFT, CFG = 5, 2, 3.0, 2.5
SIDE = 56  # the input image and the (patched) edit area: 56 x 56 pixels, a 28 x 28 latent out of the tiny 2x VAE
# 16 heads (what a single file's vision config reads), no full-attention block (ComfyUI's 7, 15, 23, 31 are past it)
TEXT_GAIN = 8.0
VISION = dict(depth=2, hidden_size=64, intermediate_size=32, num_heads=16, fullatt_block_indexes=[], window_size=112)


def make_folder(dst: Path, seed: int = 0) -> Path:
    """A tiny Qwen-Image-Edit folder (tests/_qwen_edit_models.py's layout) with the releases' 128-wide heads and a
    16-head vision tower, so that ComfyUI's single files written from it load with their configs read off shapes."""
    import json

    import diffusers
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from _qwen_edit_models import MODEL_INDEX, RELEASE_PIXELS, qwen_vl_encoder, write_edit_tokenizer
    from _qwen_models import QWEN_SCHEDULER, WIDE_TEXT, WIDE_TRANSFORMER, qwen_transformer, qwen_vae

    write_edit_tokenizer(dst / "tokenizer")
    tokenizer = Qwen2TokenizerFast.from_pretrained(dst / "tokenizer")
    tokenizer.save_pretrained(dst / "processor")
    Qwen2VLImageProcessorPil(**RELEASE_PIXELS).save_pretrained(dst / "processor")
    diffusers.FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER).save_pretrained(dst / "scheduler")
    qwen_vae(seed + 10).save_pretrained(dst / "vae")
    qwen_vl_encoder(tokenizer, seed + 20, text=WIDE_TEXT, vision=VISION).save_pretrained(dst / "text_encoder")
    net = qwen_transformer(seed + 30, **WIDE_TRANSFORMER, joint_attention_dim=WIDE_TEXT["hidden_size"])
    with torch.no_grad():  # the text's values louder, so that the prompt (and the CFG) moves the tiny image more
        for name, p in net.named_parameters():
            if ".attn.add_v_proj." in name or ".attn.to_add_out." in name:
                p.mul_(TEXT_GAIN)
    net.save_pretrained(dst / "transformer")
    (dst / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return dst


def write_comfy_edit_files(folder: Path, root: Path) -> dict[str, Path]:
    """ComfyUI's layout: diffusion_models/ (``model.diffusion_model.``), text_encoders/ (ComfyUI's Qwen2.5-VL names:
    ``model.layers.*``, ``visual.*``, ``lm_head``; the tokenizer folder beside it), vae/ (the original Wan names)."""
    from sdengine.weights.qwen_vae_file import diffusers_to_original
    from test_qwen_image_files import write_comfy_tokenizer

    files = {
        "model": root / "diffusion_models" / "qwen_image_edit_tiny.safetensors",
        "text": root / "text_encoders" / "qwen_2.5_vl_tiny.safetensors",
        "vae": root / "vae" / "qwen_image_vae.safetensors",
    }
    for f in files.values():
        f.parent.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, str(files["model"]))
    te = load_file(str(next((folder / "text_encoder").glob("*.safetensors"))))
    renamed = {}
    for k, v in te.items():
        k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
        renamed[k] = v.contiguous()
    assert any(k.startswith("visual.") for k in renamed) and any(k.startswith("model.layers.") for k in renamed)
    save_file(renamed, str(files["text"]))
    save_file({k: v for k, v in renamed.items() if not k.startswith("visual.")},
              str(files["text"].with_name("qwen_2.5_vl_text_only.safetensors")))  # fmt: skip
    vae = load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors"))
    save_file({k: v.contiguous() for k, v in diffusers_to_original(vae).items()}, str(files["vae"]))
    files["tokenizer"] = write_comfy_tokenizer(folder / "tokenizer", root / "text_encoders" / "qwen25_tokenizer")
    return files


def _input_image(side: int = SIDE, seed: int = 3) -> Image.Image:
    g = np.random.default_rng(seed)
    base = np.linspace(0, 255, side, dtype=np.float32)
    img = np.stack([base[None, :].repeat(side, 0), base[:, None].repeat(side, 1), np.full((side, side), 90.0)], -1)
    return Image.fromarray(np.clip(img + g.normal(0, 20, img.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def edit(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_qwen_edit")
    folder = make_folder(root / "Qwen-Image-Edit")
    files = write_comfy_edit_files(folder, root / "models")
    (root / "vaes").mkdir()
    files["vae"] = files["vae"].rename(root / "vaes" / files["vae"].name)
    (root / "in").mkdir()
    _input_image().save(root / "in" / "edit.png")
    _input_image(seed=7).transpose(Image.Transpose.ROTATE_90).save(root / "in" / "edit2.png")
    _input_image(96, 4).resize((150, 84)).save(root / "in" / "wide.png")
    return root, folder, files


@pytest.fixture
def small_area(monkeypatch):
    """ComfyUI's ~1024 x 1024 pixels for the Edit image, at 56 x 56 (the same rule at another area)."""
    from sdengine.server.comfy import nodes_qwen

    monkeypatch.setattr(nodes_qwen, "EDIT_AREA", SIDE * SIDE)


def edit_graph(image: str = "edit.png", cfg: float = CFG) -> dict[str, Any]:
    """ComfyUI's Qwen-Image-Edit template, API format (its CFGNorm between ModelSamplingAuraFlow and KSampler left
    out: test_cfg_norm_as_the_template_has_it puts it in)."""

    def encode(prompt: str) -> dict[str, Any]:
        return {"class_type": "TextEncodeQwenImageEdit",
                "inputs": {"clip": ["38", 0], "prompt": prompt, "vae": ["39", 0], "image": ["93", 0]}}  # fmt: skip

    return {
        "37": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "qwen_image_edit_tiny.safetensors", "weight_dtype": "default"},
        },  # fmt: skip
        "38": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "qwen_2.5_vl_tiny.safetensors", "type": "qwen_image", "device": "default"},
        },  # fmt: skip
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "78": {"class_type": "LoadImage", "inputs": {"image": image}},
        "93": {  # the template's ImageScaleToTotalPixels (1 megapixel; its least is 0.01): ImageScale to SIDE^2 here
            "class_type": "ImageScale",
            "inputs": {"image": ["78", 0], "upscale_method": "area", "width": SIDE, "height": SIDE, "crop": "disabled"},
        },
        "66": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["37", 0], "shift": SHIFT}},
        "76": encode(PROMPT),
        "77": encode(""),
        "88": {"class_type": "VAEEncode", "inputs": {"pixels": ["93", 0], "vae": ["39", 0]}},
        "3": ksampler_node(["66", 0], ["76", 0], ["77", 0], ["88", 0], steps=STEPS, cfg=cfg),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
        "60": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def _plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def comfy_drop(folder: Path) -> int:
    """ComfyUI's template_end on the Edit template with the tiny tokenizer."""
    from sdengine.server.comfy.nodes_qwen import EDIT_TEMPLATE, template_end
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer

    tok = load_qwen_tokenizer(folder / "tokenizer")
    ids = tok.encode(EDIT_TEMPLATE.format(PROMPT))
    one = [tok.encode(t) for t in ("user", "\n")]
    return template_end(ids, tok.token_id("<|im_start|>"), one[0][0], one[1][0])


def comfy_pipeline(folder: Path, monkeypatch: pytest.MonkeyPatch, *, rules: bool = True) -> Any:
    """sdengine's Edit pipeline on the folder with ComfyUI's rules (the module docstring); ``rules`` False: its own."""
    import sdengine.pipeline.qwen_image as qi
    import sdengine.pipeline.qwen_image_edit as qe
    import sdengine.text.qwen_prompt as qp
    from sdengine.diffusion.flow import FlowSchedule

    pipe = sdengine.load_pipeline(folder, device="cpu")
    pipe.edit_area = SIDE * SIDE
    if not rules:
        return pipe
    monkeypatch.setattr(qi, "norm_preserving_cfg", _plain_cfg)
    monkeypatch.setattr(pipe, "flow_schedule", lambda w, h: FlowSchedule.sd3(SHIFT))
    monkeypatch.setattr(qp, "EDIT_TEMPLATE_DROP", comfy_drop(folder))

    def comfy_size(width: int, height: int, area: int = SIDE * SIDE) -> tuple[int, int]:
        from sdengine.server.comfy.nodes_qwen import edit_size

        return edit_size(width, height, area)

    monkeypatch.setattr(qe, "edit_dimensions", comfy_size)
    net = pipe.transformer
    monkeypatch.setattr(net, "forward", functools.partial(type(net).forward, net, rope_centre="comfyui"))
    return pipe


def _edit(pipe: Any, root: Path, cfg: float = CFG, **size: int) -> np.ndarray:
    out = pipe(PROMPT, "", steps=STEPS, seed=SEED, sampler="euler", schedule="simple", cfg_scale=cfg, progress=False,
               reference_images=[str(root / "in" / "edit.png")], **size)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_edit_pipeline_with_comfyuis_rules(edit, small_area, monkeypatch):
    root, folder, files = edit
    out = _run(root, edit_graph())
    ours = _pixels(out["8"][0])
    assert ours.shape == (SIDE, SIDE, 3) and ours.std() > 0.01
    entry = out["76"][0][0]
    assert len(entry.references) == 1 and tuple(entry.references[0].shape) == (1, 16, SIDE // 2, SIDE // 2)
    # the kept states: the image's 16 merged tokens (112 px -> 8 x 8 patches -> 4 x 4) and the prompt's after them
    theirs = _edit(comfy_pipeline(folder, monkeypatch), root)
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    # ComfyUI's plain CFG matters here: the pipeline with its norm-preserving one gives another image
    import sdengine.pipeline.qwen_image as qi

    monkeypatch.undo()
    true_cfg = qi.norm_preserving_cfg
    other = comfy_pipeline(folder, monkeypatch)
    monkeypatch.setattr(qi, "norm_preserving_cfg", true_cfg)
    assert np.abs(ours - _edit(other, root)).max() > 1e-3
    # ComfyUI's template_end drops 64 tokens of the Edit template here too (diffusers' fixed count)
    assert comfy_drop(folder) == 64
    monkeypatch.undo()
    # the pipeline's own rules differ: its size (multiples of 32: 64 x 64 here)
    own = _edit(comfy_pipeline(folder, monkeypatch, rules=False), root)
    assert own.shape == (64, 64, 3)


def test_an_output_smaller_than_the_reference(edit, small_area, monkeypatch):
    """A 16 x 16 latent (an 8 x 8 grid of patches beside the reference's 14 x 14): the text's RoPE starts
    after the generated grid (ComfyUI's txt_start, 4), not after the largest (diffusers', 7)."""
    root, folder, _ = edit
    g = edit_graph()
    g["58"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}}
    g["3"]["inputs"]["latent_image"] = ["58", 0]  # ComfyUI's 8 pixels a latent pixel: 16 x 16, 32 px of the 2x VAE
    ours = _pixels(_run(root, g)["8"][0])
    assert ours.shape == (32, 32, 3)
    other = comfy_pipeline(folder, monkeypatch)
    gap = np.abs(ours - _edit(other, root, width=32, height=32))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    monkeypatch.delattr(other.transformer, "forward")  # diffusers' RoPE start: another image
    assert np.abs(ours - _edit(other, root, width=32, height=32)).max() > 1e-3


def test_cfg_one_and_reference_latent_node(edit, small_area, monkeypatch):
    """cfg 1 (the negative not run); ReferenceLatent on a Qwen-Image model's conditioning (ComfyUI's Qwen model
    reads reference_latents from it): TextEncodeQwenImageEdit without a vae + ReferenceLatent of the VAEEncode is
    the same conditioning."""
    root, folder, _ = edit
    g = edit_graph(cfg=1.0)
    ours = _pixels(_run(root, g)["8"][0])
    assert np.abs(ours - _edit(comfy_pipeline(folder, monkeypatch), root, cfg=1.0)).mean() < TOL
    for node in ("76", "77"):
        del g[node]["inputs"]["vae"]
        g["9" + node] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": [node, 0], "latent": ["88", 0]}}
    g["3"]["inputs"]["positive"], g["3"]["inputs"]["negative"] = ["976", 0], ["977", 0]
    assert np.array_equal(_pixels(_run(root, g)["8"][0]), ours)


def test_image_sizes_follow_comfyuis_rules(edit, small_area):
    """A 200 x 100 image: ~56^2 pixels by ComfyUI's rounding (79 x 40, 'area' resize), the reference latent of
    that size cropped to the VAE's factor (an odd 39 x 20, padded circularly to the patches at sampling); the vision
    tower's input its smart-resize (84 x 56: 6 x 4 patches)."""
    from sdengine.models.qwen_vision import QwenVisionConfig
    from sdengine.server.comfy.nodes_qwen import comfy_vision_pixels, edit_size

    root, _, _ = edit
    g = edit_graph("wide.png")
    scale = {"image": ["78", 0], "upscale_method": "area", "width": 200, "height": 100, "crop": "disabled"}
    g["93"] = {"class_type": "ImageScale", "inputs": scale}
    g["3"]["inputs"]["latent_image"] = ["58", 0]
    g["58"] = {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    out = _run(root, g)
    w, h = edit_size(200, 100, SIDE * SIDE)
    assert (w, h) == (79, 40)
    ref = out["76"][0][0].references[0]
    assert tuple(ref.shape) == (1, 16, 20, 39)  # 78 x 40 after the crop to the 2x VAE: 39 x 20, an odd width
    assert np.isfinite(_pixels(out["8"][0])).all()
    rows, grid = comfy_vision_pixels(torch.rand(40, 79, 3), QwenVisionConfig(hidden_size=64, num_heads=16))
    assert grid == (1, 4, 6) and rows.shape == (24, 3 * 2 * 14 * 14)  # grown to 3136 pixels: 56 x 84


def test_refusals_are_one_line(edit, small_area):
    root, _, _ = edit
    cases: list[tuple[str, Any]] = []
    g = edit_graph()
    g["38"]["inputs"]["clip_name"] = "qwen_2.5_vl_text_only.safetensors"
    cases.append(("no Qwen2.5-VL vision tower", g))
    g = edit_graph()
    g["94"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["93", 0], "amount": 2}}
    g["76"]["inputs"]["image"] = ["94", 0]
    cases.append(("a batch of 2 images", g))
    g = edit_graph()
    g["76"]["inputs"]["prompt"] = "a <|image_pad|> b"
    cases.append(("<|image_pad|> tokens of its own", g))
    g = edit_graph()
    g["77"]["inputs"]["vae"] = None
    del g["77"]["inputs"]["vae"]
    cases.append(("the negative conditioning's reference latents differ", g))
    g = edit_graph()
    g["76"]["class_type"] = "TextEncodeQwenImageEditPlus"
    g["76"]["inputs"]["image1"] = g["76"]["inputs"].pop("image")
    g["76"]["inputs"]["prompt"] = "<|image_pad|> twice"
    cases.append(("TextEncodeQwenImageEditPlus: the prompt holds <|image_pad|> tokens of its own", g))
    for want, graph in cases:
        error = _node_error(root, graph)
        assert want in error, (want, error)


def test_references_for_pads_odd_sides_circularly():
    from sdengine.server.comfy.nodes import NodeError
    from sdengine.server.comfy.nodes_qwen import references_for

    z = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(1, 2, 3, 5)
    (out,) = references_for([z])
    assert out.shape == (1, 2, 4, 6)
    assert torch.equal(out[..., 3, :5], z[..., 0, :]) and torch.equal(out[..., :3, 5], z[..., :, 0])
    assert references_for([]) == [] and len(references_for([z, z])) == 2
    assert len(references_for([z, z], "offset")) == 2  # several in "offset" / "uxo": test_comfy_odd_latents.py
    with pytest.raises(NodeError, match="'shuffle' on a Qwen-Image model is not supported here"):
        references_for([z, z], "shuffle")


def test_rope_text_start_comfyui_reads_the_generated_grid():
    """ComfyUI's txt_start is the generated latent's max(h//2, w//2); diffusers' the largest of all grids."""
    from sdengine.models.qwen_image import rope_tables

    cos_c, _ = rope_tables(2, 2, 1, (16, 56, 56), "comfyui", ((8, 8),))
    cos_d, _ = rope_tables(2, 2, 1, (16, 56, 56), "diffusers", ((8, 8),))
    freq0 = torch.tensor(1.0).cos()
    assert torch.isclose(cos_c[0, 0], freq0) and torch.isclose(cos_d[0, 0], torch.tensor(4.0).cos())


def with_cfg_norm(monkeypatch: pytest.MonkeyPatch, strength: float) -> None:
    """The pipeline's CFG (plain, as comfy_pipeline sets it) followed by ComfyUI's CFGNorm, written in the velocities
    the pipeline combines: x0 = x - sigma v (sigma = t / 1000), the guided x0 scaled at each latent pixel by
    ``min(1, |x0_cond| / (|x0_guided| + 1e-8))`` over the channels and by ``strength``, back to a velocity."""
    import sdengine.pipeline.qwen_image as qi

    plain = qi.QwenTrueCFG.__call__

    def call(self: Any, x: torch.Tensor, t: torch.Tensor, **cond: Any) -> torch.Tensor:
        seen: dict[str, torch.Tensor] = {}
        combine = qi.norm_preserving_cfg

        def capture(c: torch.Tensor, u: torch.Tensor, scale: float) -> torch.Tensor:
            seen["cond"] = c
            return combine(c, u, scale)

        qi.norm_preserving_cfg = capture
        try:
            v = plain(self, x, t, **cond)
        finally:
            qi.norm_preserving_cfg = combine
        v_c = seen.get("cond", v)
        sigma = (torch.as_tensor(t, dtype=torch.float32).reshape(-1) / 1000).reshape(-1, 1, 1, 1)
        x0_c, x0 = x - sigma * v_c, x - sigma * v
        ratio = (x0_c.norm(dim=1, keepdim=True) / (x0.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
        return (x - x0 * ratio * strength) / sigma

    monkeypatch.setattr(qi.QwenTrueCFG, "__call__", call)


@pytest.mark.parametrize("cfg", [CFG, 1.0])
def test_cfg_norm_as_the_template_has_it(edit, small_area, monkeypatch, cfg):
    """ModelSamplingAuraFlow -> CFGNorm (strength 1, the template's; 0.8 too) -> KSampler: the pipeline with ComfyUI's
    rules and CFGNorm written in its velocities (:func:`with_cfg_norm`)."""
    root, folder, _ = edit
    for strength in (1.0, 0.8):
        g = edit_graph(cfg=cfg)
        g["75"] = {"class_type": "CFGNorm", "inputs": {"model": ["66", 0], "strength": strength}}
        g["3"]["inputs"]["model"] = ["75", 0]
        ours = _pixels(_run(root, g)["8"][0])
        with pytest.MonkeyPatch.context() as mp:
            other = comfy_pipeline(folder, mp)
            with_cfg_norm(mp, strength)
            gap = np.abs(ours - _edit(other, root, cfg=cfg))
        assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
        if strength == 1.0 and cfg != 1.0:  # at cfg 1 the conditional x0 is the guided one: no change
            assert np.abs(ours - _pixels(_run(root, edit_graph(cfg=cfg))["8"][0])).max() > 1e-3


def test_cfg_norm_on_a_unet_is_one_line(tmp_path, tiny_sd1_folder):
    shutil.copytree(tiny_sd1_folder, tmp_path / "models" / "sd1")
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd1"}},
        "2": {"class_type": "CFGNorm", "inputs": {"model": ["1", 0], "strength": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["1", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "3": ksampler_node(["2", 0], ["4", 0], ["4", 0], ["5", 0], steps=1),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "x"}},
    }
    pipes = {str((tmp_path / "models" / "sd1").resolve()): sdengine.load_pipeline(tiny_sd1_folder, device="cpu")}
    assert "CFGNorm runs on flow models here" in _node_error(tmp_path, g, pipes)


def plus_graph(cfg: float = CFG) -> dict[str, Any]:
    """ComfyUI's Qwen-Image-Edit-2509 graph: TextEncodeQwenImageEditPlus with image1 and image2 (the positive and the
    empty negative), CFGNorm left out."""
    g = edit_graph(cfg=cfg)
    g["79"] = {"class_type": "LoadImage", "inputs": {"image": "edit2.png"}}
    for node, prompt in (("76", PROMPT), ("77", "")):
        g[node] = {"class_type": "TextEncodeQwenImageEditPlus",
                   "inputs": {"clip": ["38", 0], "prompt": prompt, "vae": ["39", 0], "image1": ["93", 0],
                              "image2": ["79", 0]}}  # fmt: skip
    return g


@pytest.fixture
def plus_areas(monkeypatch):
    """TextEncodeQwenImageEditPlus's ~384^2 (vision) and ~1024^2 (VAE) pixels, both at 56^2 here."""
    from sdengine.server.comfy import nodes_qwen

    monkeypatch.setattr(nodes_qwen, "EDIT_AREA", SIDE * SIDE)
    monkeypatch.setattr(nodes_qwen, "PLUS_VISION_AREA", SIDE * SIDE)


def test_edit_plus_graph_equals_the_2509_pipeline_with_comfyuis_rules(edit, plus_areas, monkeypatch):
    """Two 56 x 56 images: their reference latents frames 1 and 2, "Picture 1: ... Picture 2: ..." before the
    prompt; sdengine's QwenImageEditPlusPipeline on the same parts (its model_index.json's class) with ComfyUI's
    rules and both areas at 56^2."""
    import json

    root, folder, _ = edit
    plus = root / "Qwen-Image-Edit-2509"
    if not plus.exists():
        shutil.copytree(folder, plus)
        index = json.loads((plus / "model_index.json").read_text())
        (plus / "model_index.json").write_text(json.dumps({**index, "_class_name": "QwenImageEditPlusPipeline"}))
    out = _run(root, plus_graph())
    ours = _pixels(out["8"][0])
    assert [tuple(r.shape) for r in out["76"][0][0].references] == [(1, 16, SIDE // 2, SIDE // 2)] * 2
    pipe = comfy_pipeline(plus, monkeypatch)
    assert type(pipe).__name__ == "QwenImageEditPlusPipeline"
    pipe.condition_area = SIDE * SIDE
    images = [str(root / "in" / "edit.png"), str(root / "in" / "edit2.png")]
    theirs = pipe(PROMPT, "", steps=STEPS, seed=SEED, sampler="euler", schedule="simple", cfg_scale=CFG,
                  progress=False, reference_images=images).arrays[0].astype(np.float64)  # fmt: skip
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    # the second image matters
    g = plus_graph()
    for node in ("76", "77"):
        del g[node]["inputs"]["image2"]
    assert np.abs(_pixels(_run(root, g)["8"][0]) - ours).max() > 1e-3
