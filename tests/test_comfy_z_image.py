"""Z-Image through sdengine's ComfyUI nodes: ComfyUI's own Z-Image-Turbo graph (its ``image_z_image_turbo``
template: UNETLoader, CLIPLoader type ``lumina2``, VAELoader ``ae.safetensors``, ModelSamplingAuraFlow shift 3,
CLIPTextEncode, ConditioningZeroOut for the negative, EmptySD3LatentImage, KSampler res_multistep / simple cfg 1,
VAEDecode) on ComfyUI's three files written from a tiny random diffusers folder (``tests/_z_image_models.py``,
128-wide heads; Qwen2's tokenizer in ComfyUI's ``qwen25_tokenizer`` layout beside the text encoder), held against
sdengine's own Z-Image pipeline on the same files.

The pipeline matches ComfyUI's graph with one setting changed, ComfyUI's schedule (ModelSamplingAuraFlow's shift on
its 1000-entry table, the ``simple`` grid, instead of diffusers' ``linspace(1, 1/n, n)``); its text states (the same
template and layer; no cut at 512 tokens), its timestep (``1 - sigma``), its CFG (``u + s (c - u)`` is diffusers'
``c + (s - 1)(c - u)``) and its latent format (FLUX.1's) are the pipeline's."""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _z_image_models import make_z_folder  # noqa: E402
from test_comfy_sd3_flux import TOL, _ldm_vae, _node_error, _pixels, _run, ksampler_node  # noqa: E402
from test_z_image_files import original_layout  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry low quality, watermark"
SEED, STEPS, SHIFT = 5, 3, 3.0  # 3 steps: ComfyUI's simple grid is not diffusers' linspace (1000 / 3 is not whole)
SIDE = 64  # EmptySD3LatentImage 64: an 8 x 8 latent (4 x 4 patches), 16 pixels out of the tiny 2x VAE
MODEL, TEXT = "z_image_turbo_tiny.safetensors", "qwen_3_4b_tiny.safetensors"


@pytest.fixture(scope="module")
def zimg(tmp_path_factory):
    """ComfyUI's files of a tiny Z-Image under models/ (the folder itself too: CheckpointLoaderSimple lists it), the
    VAE in vaes/; the pipeline loaded from the same three files."""
    root = tmp_path_factory.mktemp("comfy_z_image")
    folder = make_z_folder(root / "models" / "z-folder", wide_heads=True)
    models = root / "models"
    (models / "diffusion_models").mkdir()
    (models / "text_encoders").mkdir()
    (root / "vaes").mkdir()
    transformer = load_file(next((folder / "transformer").glob("*.safetensors")))
    model = models / "diffusion_models" / MODEL
    save_file(original_layout(transformer), model)
    save_file(original_layout(transformer, prefix=""), models / "diffusion_models" / "z_image_bare.safetensors")
    text = models / "text_encoders" / TEXT
    te = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    save_file(te, text)
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = root / "vaes" / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in _ldm_vae(folder).items()}, vae)
    pipe = sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae)
    return root, pipe, {"model": model, "text": text, "vae": vae, "te": te}


def z_graph(*, cfg: float = 1.0, negative: str | None = None, sampler: str = "res_multistep", side: int = SIDE) -> dict:
    """ComfyUI's Z-Image-Turbo template, API format; ``negative``: a CLIPTextEncode instead of ConditioningZeroOut."""
    neg: dict[str, Any] = {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["6", 0]}}
    if negative is not None:
        neg = {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["39", 0]}}
    return {
        "37": {"class_type": "UNETLoader", "inputs": {"unet_name": MODEL, "weight_dtype": "default"}},
        "39": {"class_type": "CLIPLoader", "inputs": {"clip_name": TEXT, "type": "lumina2", "device": "default"}},
        "40": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}},
        "11": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["37", 0], "shift": SHIFT}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["39", 0]}},
        "7": neg,
        "13": {"class_type": "EmptySD3LatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}},
        "3": ksampler_node(["11", 0], ["6", 0], ["7", 0], ["13", 0], sampler=sampler, steps=STEPS, cfg=cfg),
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["40", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "z-image"}},
    }


def comfy_rules(pipe: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The pipeline on ComfyUI's schedule: the fixed shift on the 1000-entry table (the `simple` grid is asked for
    at the call)."""
    from sdengine.diffusion.flow import FlowSchedule

    monkeypatch.setattr(pipe, "flow_schedule", lambda w, h: FlowSchedule.sd3(SHIFT))
    return pipe


def _image(pipe: Any, *, cfg: float = 1.0, negative: str = "", sampler: str = "res_multistep", **kw: Any) -> np.ndarray:
    kw = {"schedule": "simple", **kw}
    out = pipe(PROMPT, negative, steps=STEPS, seed=SEED, width=SIDE // 4, height=SIDE // 4, sampler=sampler,
               cfg_scale=cfg, progress=False, **kw)  # fmt: skip
    return out.arrays[0].astype(np.float64)


def test_template_graph_equals_the_pipeline_with_comfyuis_rules(zimg, monkeypatch):
    root, pipe, files = zimg
    out = _run(root, z_graph())
    ours = _pixels(out["8"][0])
    assert ours.shape == (SIDE // 4, SIDE // 4, 3) and ours.std() > 0.01
    # the text: diffusers' states of every token (the template, Qwen3's hidden_states[-2]), no padding or mask
    entry = out["6"][0][0]
    cond = pipe.conditioner.text(PROMPT)
    n = int(cond["text_mask"].sum())
    assert entry.cond["crossattn"].shape == (1, n, 48) and "text_mask" not in entry.cond
    assert torch.allclose(entry.cond["crossattn"], cond["crossattn"][:, :n].float(), atol=1e-6)
    # the image: the pipeline on ComfyUI's schedule
    own = _image(pipe, schedule="normal")  # the pipeline's own grid (linspace(1, 1/n, n)): another image
    theirs = _image(comfy_rules(pipe, monkeypatch))
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert np.abs(ours - own).mean() > 1e-3
    # no ModelSamplingAuraFlow: ComfyUI's ZImage sampling settings (shift 3) are the template's; the file without
    # ComfyUI's model.diffusion_model. prefix is the same model
    g = z_graph()
    g["3"]["inputs"]["model"] = ["37", 0]
    g["37"]["inputs"]["unet_name"] = "z_image_bare.safetensors"
    assert np.abs(_pixels(_run(root, g)["8"][0]) - ours).max() < 1e-6
    # another shift is another image
    g = z_graph()
    g["11"]["inputs"]["shift"] = 6.0
    assert np.abs(_pixels(_run(root, g)["8"][0]) - ours).max() > 1e-3


def test_cfg_with_a_real_negative_a_batch_and_fp8_storage(zimg, monkeypatch):
    """cfg 3 with a negative CLIPTextEncode of another token count (the two run at their own lengths): ComfyUI's
    plain CFG is the pipeline's Z-Image CFG; ConditioningZeroOut's zeros as the negative are another image; a batch
    of 2 (its first row the single image), UNETLoader's fp8 storage near it."""
    root, pipe, _ = zimg
    ours = _pixels(_run(root, z_graph(cfg=3.0, negative=NEGATIVE, sampler="euler"))["8"][0])
    theirs = _image(comfy_rules(pipe, monkeypatch), cfg=3.0, negative=NEGATIVE, sampler="euler")
    gap = np.abs(ours - theirs)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    zeros = _pixels(_run(root, z_graph(cfg=3.0, sampler="euler"))["8"][0])
    assert np.abs(zeros - ours).max() > 1e-3
    g = z_graph(cfg=3.0, negative=NEGATIVE, sampler="euler")
    g["13"]["inputs"]["batch_size"] = 2  # a batch: its first row is the single image (ComfyUI's noise of the batch)
    rows = _run(root, g)["8"][0]
    assert rows.shape[0] == 2 and np.abs(rows[0].numpy() - theirs).mean() < TOL
    assert np.abs(rows[1].numpy() - theirs).max() > 1e-3
    g = z_graph(cfg=3.0, negative=NEGATIVE, sampler="euler")
    g["37"]["inputs"]["weight_dtype"] = "fp8_e4m3fn"  # UNETLoader's fp8 storage: float8 weights, near the image
    stored = _pixels(_run(root, g)["8"][0])
    assert np.isfinite(stored).all() and 0 < np.abs(stored - theirs).mean() < 0.02


def test_vae_encode_and_partial_denoise_follow_comfyuis_rules(zimg):
    """img2img: VAEEncode's raw mean, the Flux latent format, ComfyUI's denoise grid (the last 4 + 1 sigmas of 8
    steps) and its start ``s0 noise + (1 - s0) latent``, written out from the pipeline's public pieces."""
    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid
    from sdengine.diffusion.guidance import CFGDenoiser

    root, pipe, _ = zimg
    g = z_graph(cfg=2.0, negative=NEGATIVE, sampler="euler")
    g["13"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["12", 0], "vae": ["40", 0]}}
    g["12"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x6040A0}}
    g["3"]["inputs"]["denoise"] = 0.5
    out = _run(root, g)
    raw = out["13"][0]["samples"]
    picture = out["12"][0][0].contiguous().permute(2, 0, 1)[None] * 2 - 1  # the route's layout (its rounding)
    with torch.inference_mode():
        mean = vae_utils.encode_moments(pipe.vae, picture).mean.float()
    assert torch.allclose(raw, mean, atol=1e-6)
    cond, uncond = pipe.conditioner.pair(PROMPT, NEGATIVE)
    schedule = FlowSchedule.sd3(SHIFT)
    den = CFGDenoiser(FlowDenoiser(pipe.network_adapter(pipe.unet), schedule), 2.0, uncond, rule="comfyui")
    sigmas = flow_grid(schedule, 2 * STEPS, "simple", comfy=True).sigmas[-(STEPS + 1) :]
    noise = torch.randn((1, 16, 8, 8), generator=torch.Generator().manual_seed(SEED))
    with torch.inference_mode():
        x = sampling.sample(den, noise, sampler="euler", steps=STEPS, sigmas=sigmas, extra_args=cond,
                            init_latent=(raw - 0.1159) * 0.3611, start_step=0, noise_schedule=schedule)  # fmt: skip
        expected = vae_utils.to_unit(vae_utils.decode(pipe.vae, pipe.vae.scale_latents(x / 0.3611 + 0.1159))[0])
    gap = np.abs(_pixels(out["8"][0]) - expected[0].permute(1, 2, 0).numpy())
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())


def test_lora_loader_model_only_equals_the_pipelines_lora(zimg, monkeypatch):
    """LoraLoaderModelOnly with a LoRA in ComfyUI's original Z-Image layout (fused qkv) gives the pipeline's image
    with the same LoRA (loras=)."""
    from test_lora_z_image import _layout, _pairs, _write

    root, pipe, _ = zimg
    lora = _write(_layout(_pairs(pipe.transformer, 7), "comfy"), root / "loras" / "z_lora.safetensors")
    try:
        g = z_graph()
        g["20"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["37", 0], "lora_name": lora.name, "strength_model": 0.8}}  # fmt: skip
        g["11"]["inputs"]["model"] = ["20", 0]
        ours = _pixels(_run(root, g)["8"][0])
        theirs = _image(comfy_rules(pipe, monkeypatch), loras=[(lora, 0.8)])
        assert np.abs(ours - theirs).mean() < TOL, np.abs(ours - theirs).mean()
        assert np.abs(ours - _pixels(_run(root, z_graph())["8"][0])).max() > 1e-3
    finally:
        shutil.rmtree(root / "loras")


def test_wrong_combinations_are_one_line_node_errors(zimg, tiny_sd1_folder, tmp_path):
    root, pipe, files = zimg
    # a Qwen2.5-VL text encoder under lumina2: Qwen3 without q/k norms, biased q/k/v
    te = files["te"]
    qwen25 = {k: v for k, v in te.items() if "_norm." not in k or "layernorm" in k}
    for k, v in te.items():
        if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            qwen25[k.replace(".weight", ".bias")] = torch.zeros(v.shape[0])
    save_file(qwen25, root / "models" / "text_encoders" / "qwen_2.5_vl_tiny.safetensors")
    g = z_graph()
    g["39"]["inputs"]["clip_name"] = "qwen_2.5_vl_tiny.safetensors"
    assert "is Qwen2.5-VL (Qwen-Image's text encoder, type qwen_image)" in _node_error(root, g)
    # Lumina Image 2.0's Gemma under lumina2
    save_file({"model.layers.0.pre_feedforward_layernorm.weight": torch.ones(4)},
              root / "models" / "text_encoders" / "gemma_2_2b_tiny.safetensors")  # fmt: skip
    g["39"]["inputs"]["clip_name"] = "gemma_2_2b_tiny.safetensors"
    assert "Gemma 2" in _node_error(root, g)
    # no tokenizer folder beside the file
    tokenizer = root / "models" / "text_encoders" / "qwen25_tokenizer"
    tokenizer.rename(tmp_path / "moved")
    try:
        assert "CLIPLoader type lumina2: no Qwen2 tokenizer beside qwen_3_4b_tiny" in _node_error(root, z_graph())
    finally:
        (tmp_path / "moved").rename(tokenizer)
    # type qwen_image with a Qwen3 file: ComfyUI's Z-Image text encoder too
    g = z_graph()
    g["39"]["inputs"]["type"] = "qwen_image"
    assert np.abs(_pixels(_run(root, g)["8"][0]) - _pixels(_run(root, z_graph())["8"][0])).max() < 1e-6
    # a Z-Image model with an SD 1.x checkpoint's CLIP; the Z-Image CLIP's conditioning into the SD 1.x model
    sd1 = shutil.copytree(tiny_sd1_folder, root / "models" / "tiny-sd")
    try:
        g = z_graph()
        g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd1.name}}
        g["6"]["inputs"]["clip"] = ["1", 1]
        assert "not this Z-Image model's" in _node_error(root, g)
        g = z_graph()
        g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": sd1.name}}
        g["3"]["inputs"]["model"] = ["1", 0]
        g["8"]["inputs"]["vae"] = ["1", 2]
        g["13"] = {"class_type": "EmptyLatentImage", "inputs": {"width": SIDE, "height": SIDE, "batch_size": 1}}
        assert "48 wide" in _node_error(root, g) and "U-Net reads 32" in _node_error(root, g)
    finally:
        shutil.rmtree(sd1)
    # CheckpointLoaderSimple on the Z-Image folder, ModelSamplingSD3, strength_clip, CLIPSetLastLayer (an odd latent
    # side runs: test_comfy_odd_latents.py)
    g = z_graph()
    g["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "z-folder"}}
    g["11"]["inputs"]["model"] = ["1", 0]
    assert "CLIPLoader type lumina2" in _node_error(root, g)
    g = z_graph()
    g["11"] = {"class_type": "ModelSamplingSD3", "inputs": {"model": ["37", 0], "shift": 3.0}}
    assert "use ModelSamplingAuraFlow" in _node_error(root, g)
    g = z_graph()
    g["20"] = {"class_type": "LoraLoader", "inputs": {"model": ["37", 0], "clip": ["39", 0], "lora_name": "x",
               "strength_model": 0.0, "strength_clip": 0.5}}  # fmt: skip
    (root / "loras").mkdir(exist_ok=True)
    save_file({"x": torch.zeros(1)}, root / "loras" / "x.safetensors")
    try:
        g["6"]["inputs"]["clip"] = ["20", 1]
        assert "strength_clip on Z-Image: its LoRAs adapt the transformer only" in _node_error(root, g)
    finally:
        shutil.rmtree(root / "loras")
    g = z_graph()
    g["22"] = {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["6", 0], "latent": ["13", 0]}}
    g["3"]["inputs"]["positive"] = ["22", 0]
    assert "ReferenceLatent is FLUX.1 Kontext's" in _node_error(root, g)
    g = z_graph()
    g["21"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["39", 0], "stop_at_clip_layer": -2}}
    g["6"]["inputs"]["clip"] = ["21", 0]
    assert "CLIPSetLastLayer" in _node_error(root, g)


def test_comfy_run_command_and_server_route(zimg, tmp_path, capsys):
    """`sdengine comfy run` on the template (API format) writes the executor's image; a live server's POST /prompt
    gives it too, and /object_info offers CLIPLoader's lumina2 type and the Z-Image file."""
    import json

    from PIL import Image

    from sdengine.cli import main

    root, _, _ = zimg
    want = np.round(_pixels(_run(root, z_graph())["8"][0]) * 255)
    path = tmp_path / "z_image_turbo.json"
    path.write_text(json.dumps(z_graph()))
    capsys.readouterr()
    argv = ["comfy", "run", str(path), "--out", str(tmp_path / "out"), "--models-dir", str(root / "models"),
            "--vaes-dir", str(root / "vaes"), "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    (line,) = capsys.readouterr().out.splitlines()
    with Image.open(line) as im:
        assert np.abs(np.asarray(im.convert("RGB")).astype(np.float64) - want).max() <= 1
    pytest.importorskip("fastapi")
    from _comfy_live import live_client, prompt_image
    from _live_server import server_config
    from sdengine.server.comfy.nodes_sd3_flux import forget_parts

    forget_parts()
    config = server_config(root / "server", models_dir=root / "models", vaes_dir=root / "vaes")
    with live_client(config) as (_, client):
        info = client.get("/object_info").json()
        assert "lumina2" in info["CLIPLoader"]["input"]["required"]["type"][0]
        assert MODEL in info["UNETLoader"]["input"]["required"]["unet_name"][0]
        png = prompt_image(client, z_graph())
    assert np.abs(png.astype(np.float64) - want).max() <= 1


def test_the_ui_format_template_converts_and_runs(zimg):
    """The template as ComfyUI's page saves it (UI format, KSampler's seed with its control widget, CLIPLoader's
    device widget) converts to the API graph and gives its image."""
    from sdengine.server.comfy.workflow import convert

    root, _, _ = zimg

    def node(i, kind, inputs, outputs, widgets):
        ins = [{"name": n, "type": t, "link": link} for n, t, link in inputs]
        outs = [{"name": t, "type": t, "links": links} for t, links in outputs]
        return {"id": i, "type": kind, "mode": 0, "inputs": ins, "outputs": outs, "widgets_values": widgets}

    nodes = [
        node(16, "UNETLoader", [], [("MODEL", [1])], [MODEL, "default"]),
        node(18, "CLIPLoader", [], [("CLIP", [2])], [TEXT, "lumina2", "default"]),
        node(17, "VAELoader", [], [("VAE", [3])], ["ae.safetensors"]),
        node(11, "ModelSamplingAuraFlow", [("model", "MODEL", 1)], [("MODEL", [4])], [SHIFT]),
        node(6, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", [5, 6])], [PROMPT]),
        node(7, "ConditioningZeroOut", [("conditioning", "CONDITIONING", 6)], [("CONDITIONING", [7])], []),
        node(13, "EmptySD3LatentImage", [], [("LATENT", [8])], [SIDE, SIDE, 1]),
        node(
            3,
            "KSampler",
            [
                ("model", "MODEL", 4),
                ("positive", "CONDITIONING", 5),
                ("negative", "CONDITIONING", 7),
                ("latent_image", "LATENT", 8),
            ],
            [("LATENT", [9])],
            [SEED, "randomize", STEPS, 1, "res_multistep", "simple", 1],
        ),  # fmt: skip
        node(8, "VAEDecode", [("samples", "LATENT", 9), ("vae", "VAE", 3)], [("IMAGE", [10])], []),
        node(9, "SaveImage", [("images", "IMAGE", 10)], [], ["z-image"]),
    ]
    links = [
        [1, 16, 0, 11, 0, "MODEL"], [2, 18, 0, 6, 0, "CLIP"], [3, 17, 0, 8, 1, "VAE"], [4, 11, 0, 3, 0, "MODEL"],
        [5, 6, 0, 3, 1, "CONDITIONING"], [6, 6, 0, 7, 0, "CONDITIONING"], [7, 7, 0, 3, 2, "CONDITIONING"],
        [8, 13, 0, 3, 3, "LATENT"], [9, 3, 0, 8, 0, "LATENT"], [10, 8, 0, 9, 0, "IMAGE"],
    ]  # fmt: skip
    prompt = convert({"nodes": nodes, "links": links})
    assert prompt["18"]["inputs"]["type"] == "lumina2" and prompt["3"]["inputs"]["sampler_name"] == "res_multistep"
    ours = _pixels(_run(root, prompt)["8"][0])
    assert np.abs(ours - _pixels(_run(root, z_graph())["8"][0])).max() < 1e-6


def test_comfy_text_reads_the_prompt_as_comfyuis_tokenizer(zimg):
    """ComfyUI's Z-Image text: not cut at 512 tokens (diffusers' max_sequence_length: the pipeline cuts there, the
    route keeps every token, its first 512 states the pipeline's), ``\\(`` read as ``(`` (weights off), and
    ``embedding:NAME`` after a space refused in one line."""
    root, pipe, _ = zimg
    long_prompt = " ".join(["a red apple on a wooden table"] * 48)
    g = z_graph()
    g["6"]["inputs"]["text"] = long_prompt
    out = _run(root, g)
    states = out["6"][0][0].cond["crossattn"]
    notes: list[str] = []
    cut = pipe.conditioner.text(long_prompt, note=notes.append)
    assert states.shape[1] > 550 and int(cut["text_mask"].sum()) == 512 and notes
    assert torch.allclose(states[:, :512], cut["crossattn"][:, :512].float(), atol=1e-6)
    assert np.isfinite(_pixels(out["8"][0])).all()
    g["6"]["inputs"]["text"] = " ".join([long_prompt] * 3)  # past the transformer's RoPE (1536 on the release)
    assert "is too long for this model's positions" in _node_error(root, g)
    g = z_graph()
    g["6"]["inputs"]["text"] = "a \\(red\\) apple"
    escaped = _run(root, g)["6"][0][0].cond["crossattn"]
    assert torch.allclose(escaped, pipe.conditioner.text("a (red) apple")["crossattn"][:, : escaped.shape[1]].float())
    g["6"]["inputs"]["text"] = "an apple embedding:shiny"
    assert "'embedding:' names a textual-inversion embedding, which Z-Image does not take" in _node_error(root, g)


def test_set_latent_noise_mask_inpaints_as_comfyuis_x0_inpaint(zimg):
    """SetLatentNoiseMask on a Z-Image latent: every call reads the known half on its noising path ``s noise +
    (1 - s) latent`` and answers the latent there (ComfyUI's KSamplerX0Inpaint), written out from the pipeline's
    public pieces (its transformer adapter and text conditioning)."""
    from sdengine import vae_utils
    from sdengine.diffusion import sampling
    from sdengine.diffusion.flow import FlowDenoiser, FlowSchedule, flow_grid

    root, pipe, _ = zimg
    g = z_graph(sampler="euler")
    g.update({
        "20": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0x3366CC}},
        "21": {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["40", 0]}},
        "22": {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 16, "height": 16}},
        "23": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 16}},
        "24": {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["23", 0], "x": 0,
                                                          "y": 0, "operation": "add"}},
        "25": {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["21", 0], "mask": ["24", 0]}},
    })  # fmt: skip
    g["3"]["inputs"]["latent_image"] = ["25", 0]
    out = _run(root, g)
    raw = out["21"][0]["samples"]
    schedule = FlowSchedule.sd3(SHIFT)
    den = FlowDenoiser(pipe.network_adapter(pipe.unet), schedule)
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
        x = sampling.sample(inpaint, noise, sampler="euler", steps=STEPS, sigmas=sigmas,
                            extra_args=pipe.conditioner.text(PROMPT), noise_schedule=schedule)  # fmt: skip
        image = vae_utils.to_unit(vae_utils.decode(pipe.vae, x)[0])[0].permute(1, 2, 0).numpy()
    gap = np.abs(_pixels(out["8"][0]) - image)
    assert gap.mean() < TOL and gap.max() < 1e-4, (gap.mean(), gap.max())
    assert torch.allclose(out["3"][0]["samples"][..., 4:], raw[..., 4:], atol=1e-5)  # the known half is the latent
