"""Qwen-Image through sdengine's ComfyUI nodes: ComfyUI's own Qwen-Image graph (its ``qwen_image`` template:
UNETLoader, CLIPLoader type ``qwen_image``, VAELoader, ModelSamplingAuraFlow shift 3.1, EmptySD3LatentImage,
CLIPTextEncode, KSampler euler / simple cfg 2.5, VAEDecode) on ComfyUI's three files written from a tiny random
diffusers folder (``tests/_qwen_models.py``, 128-wide heads; the tokenizer in ComfyUI's ``qwen25_tokenizer``
layout beside the text encoder), held against sdengine's own Qwen-Image pipeline on the same files.

The pipeline matches ComfyUI's graph with two settings changed, each a documented difference of ComfyUI's rules
from diffusers' (docs/qwen-image.md): its schedule (ModelSamplingAuraFlow's fixed shift on ComfyUI's 1000-entry
table instead of diffusers' dynamic shift and terminal stretch) and its CFG (plain ``u + s (c - u)`` instead of the
norm-preserving true CFG). ComfyUI's template rule (the tokens up to ``<|im_start|>user\\n`` dropped) drops
diffusers' fixed 34 on Qwen2's vocabulary and on the tiny test tokenizer alike; an odd grid of patches is centred
as ComfyUI centres it."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _qwen_models import make_qwen_folder  # noqa: E402
from test_comfy_sd3_flux import TOL, _node_error, _pixels, _run, ksampler_node  # noqa: E402
from test_qwen_image_files import write_comfy_files  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry low quality"
SEED, STEPS, SHIFT, CFG = 5, 3, 3.1, 2.5
SIDE = 64  # EmptySD3LatentImage 64: an 8 x 8 latent (4 x 4 patches), 32 pixels out of the tiny 2x VAE


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_qwen")
    folder = make_qwen_folder(root / "models" / "qwen-folder", wide_heads=True)  # listed: CheckpointLoaderSimple
    files = write_comfy_files(folder, root / "models")
    (root / "vaes").mkdir()
    files["vae"] = files["vae"].rename(root / "vaes" / files["vae"].name)
    sd = load_file(str(files["model"]))
    save_file({k.removeprefix("model.diffusion_model."): v for k, v in sd.items()},
              str(files["model"].with_name("qwen_image_bare.safetensors")))  # fmt: skip
    pipe = sdengine.load_pipeline(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"],
                                  qwen_tokenizer=files["tokenizer"])  # fmt: skip
    return root, pipe, files


def qwen_graph(side: int = SIDE, cfg: float = CFG, negative: str = NEGATIVE) -> dict[str, Any]:
    """ComfyUI's Qwen-Image template, API format."""
    return {
        "37": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": "qwen_image_tiny.safetensors", "weight_dtype": "default"},
        },  # fmt: skip
        "38": {
            "class_type": "CLIPLoader",
            "inputs": {"clip_name": "qwen_2.5_vl_tiny.safetensors", "type": "qwen_image", "device": "default"},
        },  # fmt: skip
        "39": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "66": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["37", 0], "shift": SHIFT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["38", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["38", 0]}},
        "58": {"class_type": "EmptySD3LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "3": ksampler_node(["66", 0], ["6", 0], ["7", 0], ["58", 0], steps=STEPS, cfg=cfg),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["39", 0]}},
        "60": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "ComfyUI"}},
    }


def comfy_drop(pipe: Any, files: dict[str, Path]) -> int:
    """ComfyUI's template_end on the tiny tokenizer (the tokens before the prompt)."""
    from sdengine.server.comfy.nodes_qwen import TEMPLATE, QwenComfyText, template_end

    text = QwenComfyText(pipe.text_encoder, _tokenizer(files), "t")
    return template_end(text.tokenizer.encode(TEMPLATE.format(PROMPT)), text.im_start, text.user, text.newline)


def _tokenizer(files: dict[str, Path]) -> Any:
    from sdengine.text.qwen_tokenizer import load_qwen_tokenizer

    return load_qwen_tokenizer(files["tokenizer"])


def _plain_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


def comfy_pipeline(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch, pipe: Any, *, centre: str = "", schedule: Any = None
) -> Any:
    """sdengine's Qwen-Image pipeline on the same files with ComfyUI's rules: plain CFG, the fixed shift on the
    1000-entry table (and ComfyUI's centring of an odd grid with ``centre``)."""
    import sdengine.pipeline.qwen_image as qi
    from sdengine.diffusion.flow import FlowSchedule

    monkeypatch.setattr(qi, "norm_preserving_cfg", _plain_cfg)
    other = sdengine.load_pipeline(files["model"], device="cpu", qwen_text=files["text"], vae=files["vae"])
    fixed = schedule or FlowSchedule.sd3(SHIFT)
    monkeypatch.setattr(other, "flow_schedule", lambda w, h: fixed)
    if centre:
        net = other.transformer
        monkeypatch.setattr(net, "forward", functools.partial(type(net).forward, net, rope_centre=centre))
    return other


def _image(pipe: Any, side: int, negative: str = NEGATIVE, cfg: float = CFG) -> np.ndarray:
    out = pipe(PROMPT, negative, steps=STEPS, seed=SEED, width=side, height=side, sampler="euler", schedule="simple",
               cfg_scale=cfg, progress=False)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_pipeline_with_comfyuis_rules(qwen, monkeypatch):
    root, pipe, files = qwen
    out = _run(root, qwen_graph())
    ours = _pixels(out["8"][0])
    assert ours.shape == (SIDE // 4, SIDE // 4, 3) and ours.std() > 0.01
    theirs = _image(comfy_pipeline(files, monkeypatch, pipe), SIDE // 4)
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    # the text: no padding, the tokens after "<|im_start|>user\n" (ComfyUI's template_end: diffusers' 34 here too)
    from sdengine.text.qwen_prompt import TEMPLATE_DROP

    assert comfy_drop(pipe, files) == TEMPLATE_DROP
    states = out["6"][0][0].cond["crossattn"]
    n = len(_tokenizer(files).encode(
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        f"relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{PROMPT}<|im_end|>\n"
        "<|im_start|>assistant\n"))  # fmt: skip
    assert states.shape == (1, n - comfy_drop(pipe, files), 256) and "text_mask" not in out["6"][0][0].cond
    # the pipeline's own rules (norm-preserving CFG, dynamic shift, 34 dropped) give another image
    own = _image(pipe, SIDE // 4)
    assert np.abs(ours - own).max() > 1e-3
    # ComfyUI's repackaged file without the model.diffusion_model. prefix: the same model
    g = qwen_graph()
    g["37"]["inputs"]["unet_name"] = "qwen_image_bare.safetensors"
    assert np.array_equal(_pixels(_run(root, g)["8"][0]), ours)


def test_template_graph_posted_to_the_server(qwen):
    """The template graph through a live server's POST /prompt: the PNG is the executor's image (within one level);
    /object_info offers CLIPLoader's qwen_image type and ModelSamplingAuraFlow."""
    pytest.importorskip("fastapi")
    from _comfy_live import live_client, prompt_image
    from _live_server import server_config
    from sdengine.server.comfy.nodes_sd3_flux import forget_parts

    root, _, _ = qwen
    want = _pixels(_run(root, qwen_graph())["8"][0])
    forget_parts()
    config = server_config(root / "server", models_dir=root / "models", vaes_dir=root / "vaes")
    with live_client(config) as (_, client):
        info = client.get("/object_info").json()
        assert "qwen_image" in info["CLIPLoader"]["input"]["required"]["type"][0]
        assert "ModelSamplingAuraFlow" in info and "TextEncodeQwenImageEdit" in info
        assert "qwen_image_tiny.safetensors" in info["UNETLoader"]["input"]["required"]["unet_name"][0]
        png = prompt_image(client, qwen_graph())
    assert png.shape == (SIDE // 4, SIDE // 4, 3)
    assert np.abs(png.astype(np.float64) - np.round(want * 255)).max() <= 1


def test_graph_route_live_previews_are_qwen_images_colours(qwen):
    """The template graph posted with a client id: its live previews (the websocket's binary PREVIEW_IMAGE frames)
    are Qwen-Image's map (ComfyUI's Wan21 factors) of each step's x0, in colour: the map of the family the
    KSampler samples, not of the worker's loaded pipeline (none here: the parts are UNETLoader's), which gave the
    grey channel mean. Each frame equals the map of the x0 an in-process run of the same graph reports."""
    pytest.importorskip("fastapi")
    import io
    import threading
    import uuid

    import websocket
    from PIL import Image

    from _comfy_live import live_client
    from _live_server import server_config
    from sdengine import vae_utils
    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import Executor, validate
    from sdengine.server.comfy.nodes import Outputs, RunContext
    from sdengine.server.comfy.nodes_sd3_flux import forget_parts

    root, _, _ = qwen
    forget_parts()
    seen: list[tuple[torch.Tensor, object]] = []

    def progress(step: int, steps: int, denoised: torch.Tensor, rgb_map: object = None) -> bool:
        seen.append((denoised.float().clone(), rgb_map))
        return True

    class Env:
        catalog = Catalog(root / "models", None, None, vaes_dir=root / "vaes")
        folders, limits = Outputs(root / "out", root / "in", root / "temp"), {}

    graph, _, errors = validate(qwen_graph(), Env())
    assert not errors, errors
    ctx = RunContext(pipeline=sdengine.load_pipeline, catalog=Env.catalog, folders=Env.folders, device="cpu",
                     save_lock=threading.Lock(), progress=progress)  # fmt: skip
    Executor().run(graph, ctx, cancelled=lambda: False, event=lambda name, data: None)
    assert len(seen) == STEPS and all(m is vae_utils.QWEN_IMAGE_LATENT_RGB for _, m in seen)
    want = [vae_utils.latent_rgb(d[:1], vae_utils.QWEN_IMAGE_LATENT_RGB)[0].numpy() for d, _ in seen]
    forget_parts()
    config = server_config(root / "server2", models_dir=root / "models", vaes_dir=root / "vaes")
    cid = uuid.uuid4().hex
    with live_client(config) as (_, client):
        url = f"ws://{client.base_url.host}:{client.base_url.port}/ws?clientId={cid}"
        ws = websocket.create_connection(url, timeout=120)
        try:
            pid = client.post("/prompt", json={"prompt": qwen_graph(), "client_id": cid}).json()["prompt_id"]
            frames = []
            while True:
                msg = ws.recv()
                if isinstance(msg, bytes):
                    frames.append(np.asarray(Image.open(io.BytesIO(msg[8:])).convert("RGB")))
                elif '"executing"' in msg and '"node": null' in msg and pid in msg:
                    break
        finally:
            ws.close()
    # previews every 2 steps and at the last (the server's preview_every): steps 2 and 3 of 3
    assert [f.shape for f in frames] == [(SIDE // 8, SIDE // 8, 3)] * 2
    for frame, w in zip(frames, want[1:], strict=True):
        np.testing.assert_array_equal(frame, w)
        assert not np.array_equal(frame[..., 0], frame[..., 1])  # colour, not the grey channel mean


def test_cfg_one_an_empty_negative_a_batch_and_fp8_storage(qwen, monkeypatch):
    root, pipe, files = qwen
    other = comfy_pipeline(files, monkeypatch, pipe)
    for cfg, negative in ((1.0, NEGATIVE), (CFG, "")):
        ours = _pixels(_run(root, qwen_graph(cfg=cfg, negative=negative))["8"][0])
        assert np.abs(ours - _image(other, SIDE // 4, negative, cfg)).mean() < TOL
    g = qwen_graph()
    g["58"]["inputs"]["batch_size"] = 2  # a batch: its first row is the single image (ComfyUI's noise of the batch)
    rows = _run(root, g)["8"][0]
    assert rows.shape[0] == 2 and np.abs(rows[0].numpy() - _image(other, SIDE // 4)).mean() < TOL
    g = qwen_graph()
    g["37"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"  # UNETLoader's fp8 storage: float8 weights, near the image
    stored = _pixels(_run(root, g)["8"][0])
    assert np.isfinite(stored).all() and 0 < np.abs(stored - _image(other, SIDE // 4)).mean() < 0.02


def test_without_a_model_sampling_node_comfyuis_default_shift(qwen, monkeypatch):
    """No ModelSamplingAuraFlow: ComfyUI's Qwen-Image model sampling, ModelSamplingFlux with shift (mu) 1.15 on its
    10000-entry table."""
    from sdengine.diffusion.flow import FlowSchedule

    root, pipe, files = qwen
    g = qwen_graph()
    g["3"]["inputs"]["model"] = ["37", 0]
    ours = _pixels(_run(root, g)["8"][0])
    other = comfy_pipeline(files, monkeypatch, pipe, schedule=FlowSchedule.flux(mu=1.15))
    assert np.abs(ours - _image(other, SIDE // 4)).mean() < TOL
    assert np.abs(ours - _pixels(_run(root, qwen_graph())["8"][0])).max() > 1e-3  # shift 3.1 is another image


def test_odd_patch_grid_is_centred_as_comfyui(qwen, monkeypatch):
    """48 pixels: a 6 x 6 latent, 3 x 3 patches; ComfyUI's rows -1, 0, 1 (diffusers' -2, -1, 0)."""
    from sdengine.models.qwen_image import rope_tables

    cos_c, _ = rope_tables(3, 3, 2, (16, 56, 56), "comfyui")
    cos_d, _ = rope_tables(3, 3, 2, (16, 56, 56))
    assert torch.equal(cos_c[2:][4], torch.ones(128)) and not torch.equal(cos_d[2:][4], torch.ones(128))
    root, pipe, files = qwen
    ours = _pixels(_run(root, qwen_graph(side=48))["8"][0])
    comfy = _image(comfy_pipeline(files, monkeypatch, pipe, centre="comfyui"), 12)
    assert np.abs(ours - comfy).mean() < TOL
    diffusers = _image(comfy_pipeline(files, monkeypatch, pipe), 12)
    assert np.abs(ours - diffusers).max() > 1e-4


def test_img2img_follows_comfyuis_rules(qwen, monkeypatch):
    """VAEEncode's raw posterior mean, the Wan21 latent format in, ComfyUI's denoise grid (the last 3 + 1 sigmas of
    6 steps on the 3.1 table) from ``s0 noise + (1 - s0) latent``, plain CFG, written out from the pipeline's parts."""
    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.diffusion.guidance import CFGDenoiser

    root, pipe, files = qwen
    g = qwen_graph()
    g["58"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["70", 0], "vae": ["39", 0]}}
    g["70"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x3366CC}}
    g["3"]["inputs"]["denoise"] = 0.5
    out = _run(root, g)
    raw = out["58"][0]["samples"]
    image = torch.tensor([0x33, 0x66, 0xCC], dtype=torch.float32).reshape(1, 3, 1, 1).expand(1, 3, 16, 16) / 255
    with torch.inference_mode():
        mean = vae_utils.encode_moments(pipe.vae, image * 2 - 1).mean.float()
    assert raw.shape == (1, 16, 8, 8) and torch.allclose(raw, mean, atol=1e-6)
    other = comfy_pipeline(files, monkeypatch, pipe)
    cond, uncond = other.conditioner.pair(PROMPT, NEGATIVE)
    schedule = FlowSchedule.sd3(SHIFT)
    den = CFGDenoiser(FlowDenoiser(other.network_adapter(other.unet), schedule), CFG, uncond, rule="comfyui")
    sigmas = flow_grid(schedule, 2 * STEPS, "simple", comfy=True).sigmas[-(STEPS + 1) :]
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        x = sampling.sample(den, noise, sampler="euler", steps=STEPS, sigmas=sigmas, extra_args=cond,
                            init_latent=other.vae.scale_latents(raw), start_step=0,
                            noise_schedule=schedule)  # fmt: skip
        expected = vae_utils.to_unit(vae_utils.decode(other.vae, x)[0])[0].permute(1, 2, 0).numpy()
    gap = np.abs(_pixels(out["8"][0]) - expected)
    assert gap.mean() < TOL and gap.max() < 1e-4


def test_inpainting_keeps_the_unmasked_latent(qwen):
    """SetLatentNoiseMask: outside the mask the sampled latent is the encoded one (ComfyUI's KSamplerX0Inpaint)."""
    root, _, _ = qwen
    g = qwen_graph()
    g["58"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["70", 0], "vae": ["39", 0]}}
    g["70"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x3366CC}}
    g["71"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 8, "height": 8}}
    g["72"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["58", 0], "mask": ["73", 0]}}
    g["73"] = {"class_type": "MaskComposite", "inputs": {"destination": ["71", 0], "source": ["74", 0], "x": 0,
               "y": 0, "operation": "add"}}  # fmt: skip
    g["74"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 4, "height": 8}}
    g["3"]["inputs"]["latent_image"] = ["72", 0]
    out = _run(root, g)
    before, after = out["58"][0]["samples"], out["3"][0]["samples"]
    assert torch.allclose(after[..., 4:], before[..., 4:], atol=1e-5)
    assert (after[..., :4] - before[..., :4]).abs().max() > 1e-2


def test_refusals_are_one_line(qwen):
    root, _, _ = qwen
    cases: list[tuple[str, Any]] = []
    g = qwen_graph()
    g["66"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["37", 0], "shift": 3.0}}
    cases.append(("ModelSamplingSD3 is for SD3 models", g))
    g = qwen_graph()
    g["9"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["6", 0], "guidance": 3.5}}
    g["3"]["inputs"]["positive"] = ["9", 0]
    cases.append(("FluxGuidance does not apply to Qwen-Image", g))
    import shutil

    shutil.copy(
        root / "vaes" / "qwen_image_vae.safetensors", root / "models" / "text_encoders" / "not_qwen.safetensors"
    )
    g = qwen_graph()
    g["38"]["inputs"]["clip_name"] = "not_qwen.safetensors"  # not a text encoder
    cases.append(("CLIPLoader type qwen_image takes Qwen2.5-VL's text encoder", g))
    g = qwen_graph()
    g["9"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["38", 0], "stop_at_clip_layer": -2}}
    g["6"]["inputs"]["clip"] = ["9", 0]
    cases.append(("CLIPSetLastLayer does not apply to Qwen-Image", g))
    for want, graph in cases:
        error = _node_error(root, graph)
        assert want in error and "\n" not in error, (want, error)
    folder = root / "models" / "qwen-folder"  # a diffusers folder: CheckpointLoaderSimple names the template's nodes
    g = qwen_graph()
    g["37"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "qwen-folder"}}
    error = _node_error(root, g, {str(folder.resolve()): sdengine.load_pipeline(folder, device="cpu")})
    assert "CheckpointLoaderSimple: qwen-folder is a Qwen-Image model; on the ComfyUI route load its parts" in error
    tokenizer = root / "models" / "text_encoders" / "qwen25_tokenizer"
    tokenizer.rename(tokenizer.with_name("away"))
    try:
        assert "no Qwen2 tokenizer beside qwen_2.5_vl_tiny.safetensors" in _node_error(root, qwen_graph())
    finally:
        tokenizer.with_name("away").rename(tokenizer)


def test_other_families_clip_and_model_refused():
    """A Qwen-Image model with a T5 / CLIP conditioning, and ModelSamplingAuraFlow on another family's model."""
    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes import NodeError
    from sdengine.server.comfy.nodes_qwen import fit_conditioning

    with pytest.raises(NodeError, match="not this Qwen-Image model's"):
        fit_conditioning([TextCondition({"crossattn": torch.zeros(1, 5, 64), "vector": torch.zeros(1, 8)})], 256)
    with pytest.raises(NodeError, match="not this Qwen-Image model's"):
        fit_conditioning([TextCondition({"crossattn": torch.zeros(1, 5, 4096)})], 256)
    from sdengine.server.comfy.nodes import ModelHandle
    from sdengine.server.comfy.nodes_qwen import refuse_aura_flow

    with pytest.raises(NodeError, match="ModelSamplingAuraFlow is for Qwen-Image models here.*an SD3 model"):
        refuse_aura_flow("sd3", ModelHandle("x", flow_sampling=("auraflow", 3.1)))
    refuse_aura_flow("qwen_image", ModelHandle("x", flow_sampling=("auraflow", 3.1)))


def test_template_end_follows_comfyuis_rule():
    from sdengine.server.comfy.nodes_qwen import template_end

    assert template_end([9, 1, 5, 5, 1, 7, 8, 4, 4], 1, 7, 8) == 7  # second <|im_start|>, then user + newline
    assert template_end([9, 1, 5, 5, 1, 6, 8, 4, 4], 1, 7, 8) == 4  # no "user" after it: at the <|im_start|>
    assert template_end([1, 4, 4], 1, 7, 8) == 0  # one <|im_start|>
    assert template_end([4, 4], 1, 7, 8) == -1  # none: ComfyUI keeps the last state


def test_comfy_text_reads_the_prompt_as_comfyuis_tokenizer():
    """Weights disabled: ``(cat:1.2)`` is text; ComfyUI's escape / unescape drops the backslash of ``\\(``; a
    textual-inversion name is refused (ComfyUI splits the text there)."""
    from sdengine.server.comfy.nodes import NodeError
    from sdengine.server.comfy.nodes_qwen import comfy_text

    assert comfy_text("a (cat:1.2) \\(b\\)") == "a (cat:1.2) (b)"
    assert comfy_text("embedding:x alone") == "embedding:x alone"  # not after a space: the text's own
    with pytest.raises(NodeError, match="'embedding:' names a textual-inversion embedding"):
        comfy_text("a photo of embedding:style")


def test_lora_loader_model_only_equals_the_pipelines_lora(qwen, monkeypatch):
    """LoraLoaderModelOnly (a ComfyUI-layout ``diffusion_model.`` Qwen-Image LoRA) before ModelSamplingAuraFlow: the
    pipeline with ComfyUI's rules given the same LoRA (``loras=``); LoraLoader's strength_clip is one line (Qwen-Image
    LoRAs adapt the transformer only), its model part alone (strength_clip 0) runs as LoraLoaderModelOnly."""
    from test_lora_qwen_image import _layout, _pairs

    root, pipe, files = qwen
    path = root / "loras" / "qwen-lora.safetensors"
    path.parent.mkdir(exist_ok=True)
    save_file({k: v.clone() for k, v in _layout(_pairs(pipe.transformer, 3), "comfy").items()}, str(path))
    g = qwen_graph()
    g["70"] = {"class_type": "LoraLoaderModelOnly",
               "inputs": {"model": ["37", 0], "lora_name": path.name, "strength_model": 0.8}}  # fmt: skip
    g["66"]["inputs"]["model"] = ["70", 0]
    ours = _pixels(_run(root, g)["8"][0])
    other = comfy_pipeline(files, monkeypatch, pipe)
    out = other(PROMPT, NEGATIVE, steps=STEPS, seed=SEED, width=SIDE // 4, height=SIDE // 4, sampler="euler",
                schedule="simple", cfg_scale=CFG, progress=False, loras=[(path, 0.8)])  # fmt: skip
    gap = np.abs(ours - out.arrays[0].astype(np.float64))
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - _pixels(_run(root, qwen_graph())["8"][0])).mean() > 1e-3  # the LoRA changed the image
    g["70"] = {"class_type": "LoraLoader", "inputs": {"model": ["37", 0], "clip": ["38", 0], "lora_name": path.name,
                                                     "strength_model": 0.8, "strength_clip": 0.0}}  # fmt: skip
    assert np.array_equal(_pixels(_run(root, g)["8"][0]), ours)
    g["70"]["inputs"]["strength_clip"] = 1.0
    g["6"]["inputs"]["clip"] = ["70", 1]
    assert "adapt the transformer only" in _node_error(root, g)
