"""ComfyUI_IPAdapter_plus's IPAdapterModelLoader / IPAdapterAdvanced / IPAdapter (nodes_ipadapter.py) on a tiny
random SD 1.x checkpoint, a tiny random CLIP vision file and random adapter files: the unit a node builds against
the one built by hand from CLIPVisionEncode's outputs (the pack's negatives and combine rules), the pack's per-layer
weights and K+V scalings against their formulas, and workflows through the live /prompt API: weight 0 is no
adapter, start/end windows equal a run switched by hand (KSamplerAdvanced halves), chained adapters, composition
with LoRA-free model patches (FreeU_V2), and ComfyUI-style node errors."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import sdengine
from _comfy_live import live_client, prompt_image, run_prompt
from _ip_models import random_adapter, random_encoder
from _live_server import server_config
from sdengine.nn.attention import scaled_dot_product_attention
from sdengine.nn.ip_adapter import DecoupledAttention, cross_attention_layers, transformer_places
from sdengine.server.catalog import Catalog
from sdengine.server.comfy import nodes_clip_vision as ncv
from sdengine.server.comfy import nodes_ipadapter as nip
from sdengine.server.comfy.nodes import ModelHandle, NodeError, RunContext
from sdengine.weights import convert
from sdengine.weights.ip_adapter_file import save_ip_adapter

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SEED, STEPS = 5, 4
HIDDEN, PROJ = 64, 16  # the tiny encoder's widths (Plus reads the hidden states, plain the projected embedding)


def _picture(seed: int, h: int = 40, w: int = 48) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = 0.5 + 0.4 * np.sin(6 * xx[:, :, None] * (1 + seed) + 4 * yy[:, :, None] + np.arange(3))
    return np.clip(base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1)


@pytest.fixture(scope="module")
def env(tiny_sd1_folder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("comfy_ipa")
    models, cv, ipa = tmp / "models", tmp / "clip_vision", tmp / "ipadapter"
    for d in (models, cv, ipa):
        d.mkdir()
    convert(tiny_sd1_folder, models / "a.safetensors")
    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    for name, enc in (
        ("tiny.safetensors", random_encoder(HIDDEN, PROJ, 0, heads=HIDDEN // 64, intermediate=40)),
        ("wide.safetensors", random_encoder(128, 24, 1, heads=128 // 64, intermediate=40)),
    ):
        safetensors_torch.save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(cv / name))
    save_ip_adapter(
        random_adapter(pipe.unet, "plain", PROJ, 1, width=64, depth=2, heads=1, queries=4), ipa / "plain.safetensors"
    )
    save_ip_adapter(
        random_adapter(pipe.unet, "plus", HIDDEN, 2, width=64, depth=2, heads=1, queries=4), ipa / "plus.safetensors"
    )
    save_ip_adapter(
        random_adapter(pipe.unet, "plain", PROJ, 3, width=64, depth=2, heads=1, queries=4, drop_last=True),
        ipa / "other_model.safetensors",
    )
    # the names the unified loader's presets look for (the pack's file-name rules)
    (cv / "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors").write_bytes((cv / "tiny.safetensors").read_bytes())
    (ipa / "ip-adapter_sd15.safetensors").write_bytes((ipa / "plain.safetensors").read_bytes())
    (ipa / "ip-adapter-plus_sd15.safetensors").write_bytes((ipa / "plus.safetensors").read_bytes())
    loras = tmp / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(9)  # a kohya LoRA on one U-Net layer
    layer = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    safetensors_torch.save_file(
        {
            f"{layer}.lora_down.weight": torch.randn(4, 32, generator=g) * 0.3,
            f"{layer}.lora_up.weight": torch.randn(32, 4, generator=g) * 0.3,
            f"{layer}.alpha": torch.tensor(2.0),
        },
        str(loras / "q.safetensors"),
    )
    config = server_config(
        tmp, models_dir=models, model="a", clip_vision_dir=cv, ip_adapters_dir=ipa, loras_dir=loras, max_queue=8
    )
    catalog = Catalog(None, None, None, clip_vision_dir=cv, ip_adapters_dir=ipa)
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=catalog, folders=None)  # type: ignore[arg-type]
    with live_client(config, timeout=300) as (_, client):
        names = []
        for i in range(3):
            buf = io.BytesIO()
            Image.fromarray((_picture(i) * 255).round().astype(np.uint8)).save(buf, format="PNG")
            r = client.post("/upload/image", files={"image": (f"ref{i}.png", buf.getvalue(), "image/png")})
            assert r.status_code == 200, r.text
            names.append(r.json()["name"])
        yield {"client": client, "pipe": pipe, "ctx": ctx, "images": names}


# ---------------------------------------------------------------------------------------------- in process


def _img(*seeds: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([_picture(s) for s in seeds])).float()


def test_the_unit_is_the_one_built_by_hand_from_the_encoder_outputs(env):
    ctx = env["ctx"]
    (cv,) = ncv.clip_vision_loader(ctx, "tiny.safetensors")
    (plain,) = nip.ipadapter_model_loader(ctx, "plain.safetensors")
    (plus,) = nip.ipadapter_model_loader(ctx, "plus.safetensors")
    base = ModelHandle("a")
    images = _img(0, 1)
    (out,) = ncv.clip_vision_encode(ctx, cv, images, "center")
    (black,) = ncv.clip_vision_encode(ctx, cv, torch.zeros(1, 32, 32, 3), "center")
    # plain, concat: both images' embeddings side by side, zeros for the unconditional rows
    (m,) = nip.ipadapter_advanced(ctx, base, plain, images, 0.7, clip_vision=cv)
    (u,) = m.ip_adapters
    assert torch.equal(u.embeds, out.image_embeds.unsqueeze(0)) and u.scale == 0.7
    assert torch.equal(u.negative, torch.zeros(1, 2, PROJ)) and u.layer_scales is None and u.scaling == "output"
    # Plus, average: the mean of the hidden states; the black picture's for the unconditional rows
    (m2,) = nip.ipadapter_advanced(ctx, m, plus, images, 1.0, combine_embeds="average", clip_vision=cv)
    first, second = m2.ip_adapters  # chained: one unit each, in order
    assert first is u
    assert torch.allclose(second.embeds, out.penultimate_hidden_states.mean(0, keepdim=True).unsqueeze(0))
    assert torch.equal(second.negative, black.penultimate_hidden_states.unsqueeze(0))
    assert black.penultimate_hidden_states.abs().max() > 0.1  # a black picture encodes to something, not zeros
    # image_negative: its encoding, repeated to the image count
    (m3,) = nip.ipadapter_advanced(ctx, base, plain, images, 1.0, image_negative=_img(2), clip_vision=cv)
    (neg,) = ncv.clip_vision_encode(ctx, cv, _img(2), "center")
    assert torch.equal(m3.ip_adapters[0].negative, neg.image_embeds.expand(2, -1).unsqueeze(0))
    # subtract / norm average: the pack's formulas on the encodings
    (m4,) = nip.ipadapter_advanced(ctx, base, plain, _img(0, 1, 2), combine_embeds="subtract", clip_vision=cv)
    (three,) = ncv.clip_vision_encode(ctx, cv, _img(0, 1, 2), "center")
    e = three.image_embeds
    assert torch.allclose(m4.ip_adapters[0].embeds[0], (e[0] - (e[1] + e[2]) / 2).unsqueeze(0), atol=1e-6)
    (m5,) = nip.ipadapter_advanced(ctx, base, plain, _img(0, 1, 2), combine_embeds="norm average", clip_vision=cv)
    want = (e / e.norm(dim=0, keepdim=True)).mean(0)
    assert torch.allclose(m5.ip_adapters[0].embeds[0, 0], want, atol=1e-6)


def test_weight_types_follow_the_packs_per_layer_rules(env):
    places = transformer_places(env["pipe"].unet)
    kinds = [k for k, _ in places]
    idx = [t for _, t in places]
    n = len(places)
    w = 0.8
    widths = [64] * n
    assert nip.layer_scales("linear", w, places, False, widths, "V only") is None
    ease_in = nip.layer_scales("ease in", w, places, False, widths, "V only")
    assert ease_in == tuple(w * (0.05 + 0.95 * (1 - t / 16)) for t in idx)
    ease_out = nip.layer_scales("ease out", w, places, False, widths, "V only")
    assert ease_out == tuple(w * (0.05 + 0.95 * t / 16) for t in idx)
    weak_mid = nip.layer_scales("weak middle", w, places, False, widths, "V only")
    assert weak_mid == tuple(w * 0.2 if k == "middle" else w for k in kinds)
    strong_mid = nip.layer_scales("strong middle", w, places, False, widths, "V only")
    assert strong_mid == tuple(w if k == "middle" else w * 0.2 for k in kinds)
    comp = nip.layer_scales("composition", w, places, False, widths, "V only")
    assert comp == tuple({4: w * 0.25, 5: w}.get(t, 0.0) for t in idx)
    style = nip.layer_scales("style transfer", w, places, False, widths, "V only")
    assert style == tuple(w if t in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15) else 0.0 for t in idx)
    # the C penalty: each layer times its width over 1280
    pen = nip.layer_scales("linear", w, places, False, list(range(1, n + 1)), "K+V w/ C penalty")
    assert pen == tuple(w * c / 1280 for c in range(1, n + 1))
    # the real SD 1.5 placement: the input blocks' transformers 0-5, the middle's 6, the output blocks' 7-15
    from sdengine.models import unet as unet_mod

    with torch.device("meta"):
        full = transformer_places(unet_mod.UNet(unet_mod.SD15))
    assert full == [*(("input", i) for i in range(6)), *(("output", i) for i in range(7, 16)), ("middle", 6)]


@pytest.mark.parametrize("scaling", ["kv", "k_mean_v"])
def test_kv_scalings_are_the_packs_formulas(env, scaling):
    layer = cross_attention_layers(env["pipe"].unet)[0]
    g = torch.Generator().manual_seed(0)
    to_k = nn.Linear(layer.to_k.in_features, layer.to_k.out_features, bias=False)
    to_v = nn.Linear(layer.to_k.in_features, layer.to_k.out_features, bias=False)
    tokens = torch.randn(2, 4, layer.to_k.in_features, generator=g)
    q = torch.randn(2, 10, layer.to_k.out_features, generator=g)
    s = 0.6
    got = DecoupledAttention(layer, [(to_k, to_v, s, 0, 4, scaling)], tokens)(q)
    k, v = to_k(tokens) * s, to_v(tokens)
    if scaling == "kv":
        v = v * s
    else:
        mean = v.mean(dim=1, keepdim=True)
        v = (v - mean) + mean * s
    want = scaled_dot_product_attention(q, k, v, layer.heads)
    assert got is not None and torch.allclose(got, want, atol=1e-6)
    plain = DecoupledAttention(layer, [(to_k, to_v, s, 0, 4, "output")], tokens)(q)
    assert plain is not None and (plain - got).abs().max() > 1e-4  # K+V is not the output scaled


def test_bad_inputs_are_one_line_node_errors(env):
    ctx = env["ctx"]
    (cv,) = ncv.clip_vision_loader(ctx, "tiny.safetensors")
    (wide,) = ncv.clip_vision_loader(ctx, "wide.safetensors")
    (plain,) = nip.ipadapter_model_loader(ctx, "plain.safetensors")
    (other,) = nip.ipadapter_model_loader(ctx, "other_model.safetensors")
    base, images = ModelHandle("a"), _img(0)
    cases = [
        (dict(ipadapter=plain, clip_vision=None), "Missing CLIPVision model"),
        (dict(ipadapter=plain, clip_vision=wide), "image embeddings of width 16"),
        (dict(ipadapter=other, clip_vision=cv), "has 3 cross-attention layers and this U-Net has 4"),
        (dict(ipadapter=plain, clip_vision=cv, attn_mask=torch.ones(1, 8, 8)), "attn_mask is not supported"),
        (dict(ipadapter=plain, clip_vision=cv, weight_type="composition precise"), "use one of: linear"),
        (dict(ipadapter=plain, clip_vision=cv, start_at=0.6, end_at=0.2), "start 0.6 is after its end 0.2"),
    ]
    for kw, said in cases:
        with pytest.raises(NodeError) as e:
            nip.ipadapter_advanced(ctx, base, image=images, **kw)
        assert said in str(e.value) and "\n" not in str(e.value), (kw, str(e.value))
    with pytest.raises(NodeError, match="use IPAdapterAdvanced"):
        nip.ipadapter_simple(ctx, base, plain, images)
    for preset, said in (
        ("VIT-G (medium strength)", "ClipVision model not found"),
        ("LIGHT - SD1.5 only (low strength)", "IPAdapter model not found"),
    ):
        with pytest.raises(NodeError, match=said):
            nip.ipadapter_unified_loader(ctx, base, preset)


# --------------------------------------------------------------------------------------- through the API


def _graph(
    *adapters: dict[str, Any], image: str, sampler: dict | None = None, extra: dict | None = None
) -> dict[str, Any]:
    g: dict[str, Any] = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "a"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red apple", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "20": {"class_type": "LoadImage", "inputs": {"image": image}},
        "21": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "tiny.safetensors"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ipa", "images": ["8", 0]}},
    }
    model: list[Any] = ["4", 0]
    for i, a in enumerate(adapters):
        loader, node = str(30 + 2 * i), str(31 + 2 * i)
        g[loader] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": a.pop("file")}}
        inputs = {
            "model": model, "ipadapter": [loader, 0], "image": ["20", 0], "weight": 1.0, "weight_type": "linear",
            "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only",
            "clip_vision": ["21", 0],
        }  # fmt: skip
        g[node] = {"class_type": "IPAdapterAdvanced", "inputs": {**inputs, **a}}
        model = [node, 0]
    g["3"] = sampler or {
        "class_type": "KSampler",
        "inputs": {
            "seed": SEED, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
            "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
        },
    }  # fmt: skip
    if sampler is not None:
        g["3"]["inputs"]["model"] = model
    g.update(extra or {})
    return g


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


def test_weight_zero_is_no_adapter_and_chained_adapters_add_up(env):
    c, img = env["client"], env["images"][0]
    plain = prompt_image(c, _graph(image=img))
    assert np.array_equal(prompt_image(c, _graph({"file": "plain.safetensors", "weight": 0.0}, image=img)), plain)
    one = prompt_image(c, _graph({"file": "plain.safetensors"}, image=img))
    assert _diff(one, plain) > 1.0
    other = prompt_image(c, _graph({"file": "plain.safetensors"}, image=env["images"][1]))
    assert _diff(one, other) > 0.5  # the picture matters
    two = prompt_image(c, _graph({"file": "plain.safetensors"}, {"file": "plus.safetensors"}, image=img))
    assert _diff(two, one) > 1.0
    # the second one at weight 0 leaves the first alone
    zero2 = _graph({"file": "plain.safetensors"}, {"file": "plus.safetensors", "weight": 0.0}, image=img)
    assert np.array_equal(prompt_image(c, zero2), one)
    # K+V (the same as V only at weight 1) differs from V only at another weight
    assert np.array_equal(
        prompt_image(c, _graph({"file": "plain.safetensors", "embeds_scaling": "K+V"}, image=img)), one
    )
    v_only = prompt_image(c, _graph({"file": "plain.safetensors", "weight": 0.5}, image=img))
    kv = prompt_image(c, _graph({"file": "plain.safetensors", "weight": 0.5, "embeds_scaling": "K+V"}, image=img))
    assert _diff(kv, v_only) > 0.2
    # a model patch before or after: FreeU_V2 with the adapter at weight 0 is FreeU_V2 alone
    freeu = {"40": {"class_type": "FreeU_V2", "inputs": {"model": ["31", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9,
                                                          "s2": 0.2}}}  # fmt: skip
    with_freeu = _graph({"file": "plain.safetensors", "weight": 0.0}, image=img, extra=freeu)
    with_freeu["3"]["inputs"]["model"] = ["40", 0]
    alone = _graph(image=img, extra={"40": {**freeu["40"], "inputs": {**freeu["40"]["inputs"], "model": ["4", 0]}}})
    alone["3"]["inputs"]["model"] = ["40", 0]
    assert np.array_equal(prompt_image(c, with_freeu), prompt_image(c, alone))
    with_freeu["31"]["inputs"]["weight"] = 1.0
    assert _diff(prompt_image(c, with_freeu), prompt_image(c, alone)) > 1.0


def _advanced(start: int, end: int, add_noise: str, leftover: str, model: list, latent: list) -> dict:
    return {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "add_noise": add_noise, "noise_seed": SEED, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "positive": ["6", 0], "negative": ["7", 0], "latent_image": latent,
            "start_at_step": start, "end_at_step": end, "return_with_leftover_noise": leftover, "model": model,
        },
    }  # fmt: skip


def test_start_end_window_equals_a_run_switched_by_hand(env):
    c, img = env["client"], env["images"][0]
    pipe = env["pipe"]
    plain = prompt_image(c, _graph(image=img))
    full = prompt_image(c, _graph({"file": "plain.safetensors", "start_at": 0.0, "end_at": 1.0}, image=img))
    assert _diff(full, plain) > 1.0
    # start == end: no call's sigma lies in the window -> no adapter
    for edge in (0.0, 0.5, 1.0):
        g = _graph({"file": "plain.safetensors", "start_at": edge, "end_at": edge}, image=img)
        assert np.array_equal(prompt_image(c, g), plain), edge
    # the first half: the calls at sigma >= percent_to_sigma(0.5); by hand: KSamplerAdvanced with the adapter for
    # the steps whose sigma is in the window, then the plain model for the rest
    from sdengine.diffusion import sampling
    from sdengine.diffusion.schedules import percent_to_sigma
    from sdengine.server.comfy.nodes import SAMPLER_NAMES, SCHEDULER_NAMES

    grid = sampling.make_grid(SAMPLER_NAMES["euler"], STEPS, pipe.noise_schedule, SCHEDULER_NAMES["normal"],
                              pipe.scheduler_config, 1.0, comfy_grid=True)  # fmt: skip
    low = percent_to_sigma(pipe.noise_schedule.log_sigmas, 0.5)
    k = sum(1 for s in grid.sigmas[:STEPS] if float(s) >= low)
    assert 0 < k < STEPS, (k, grid.sigmas)
    half = prompt_image(c, _graph({"file": "plain.safetensors", "end_at": 0.5}, image=img))
    by_hand = _graph({"file": "plain.safetensors"}, image=img)
    by_hand["3"] = _advanced(0, k, "enable", "enable", ["31", 0], ["5", 0])
    by_hand["13"] = _advanced(k, STEPS, "disable", "disable", ["4", 0], ["3", 0])
    by_hand["8"]["inputs"]["samples"] = ["13", 0]
    hand = prompt_image(c, by_hand)
    assert np.abs(half.astype(int) - hand).max() <= 1, np.abs(half.astype(int) - hand).max()
    assert _diff(half, plain) > 1.0 and _diff(half, full) > 0.1  # neither the whole run nor none of it


def test_errors_are_comfyui_node_errors(env):
    c, img = env["client"], env["images"][0]
    r = c.post("/prompt", json={"prompt": _graph({"file": "plain.safetensors", "weight_type": "composition precise"},
                                                 image=img)})  # fmt: skip
    assert r.status_code == 400, r.text
    (err,) = r.json()["node_errors"]["31"]["errors"]
    assert err["type"] == "value_not_in_list" and "composition precise" in err["details"]
    for a, node_type, said in (
        ({"file": "other_model.safetensors"}, "IPAdapterAdvanced", "made for another model family"),
        ({"file": "plain.safetensors", "clip_vision": ["22", 0]}, "IPAdapterAdvanced", "of width 16"),
    ):
        extra = {"22": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "wide.safetensors"}}}
        h = run_prompt(c, _graph(a, image=img, extra=extra))
        assert h["status"]["status_str"] == "error", h["status"]
        failed = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"][0]
        assert failed["node_type"] == node_type and said in failed["exception_message"], failed
        assert "\n" not in failed["exception_message"]
    simple = _graph(image=img)
    simple["30"] = {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "plain.safetensors"}}
    simple["31"] = {"class_type": "IPAdapter", "inputs": {"model": ["4", 0], "ipadapter": ["30", 0], "image": ["20", 0],
                                                          "weight": 1.0, "start_at": 0.0, "end_at": 1.0,
                                                          "weight_type": "standard"}}  # fmt: skip
    simple["3"]["inputs"]["model"] = ["31", 0]
    h = run_prompt(c, simple)
    failed = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"][0]
    assert failed["node_type"] == "IPAdapter" and "IPAdapterAdvanced" in failed["exception_message"]
    assert Path(str(failed)).name  # the message names no server path


def test_the_workflows_latent_is_sample_latents_with_the_units_built_by_hand(env, tiny_sd1_folder):
    """Two chained adapters (plain, then Plus in the first half only) through /prompt, saved as a latent; the
    reference: sample_latents on the same checkpoint with units built by hand from the encoder's outputs on
    ComfyUI's preprocessing of the uploaded picture (zeros / a black picture's hidden states for the negatives)."""
    from safetensors.torch import load as load_safetensors

    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.pipeline.ip_adapter import IPAdapterUnit
    from sdengine.server.comfy.nodes import SAMPLER_NAMES, SCHEDULER_NAMES
    from sdengine.server.comfy.nodes_files import LATENT_KEY
    from sdengine.weights.clip_vision_file import load_clip_vision
    from sdengine.weights.ip_adapter_file import load_ip_adapter

    c, img = env["client"], env["images"][0]
    save = {"9": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0], "filename_prefix": "ipa"}}}
    second = {"file": "plus.safetensors", "weight": 0.6, "end_at": 0.5}
    g = _graph({"file": "plain.safetensors", "weight": 0.8}, second, image=img, extra=save)
    del g["8"]
    h = run_prompt(c, g)
    assert h["status"]["status_str"] == "success", h["status"]
    item = h["outputs"]["9"]["latents"][0]
    r = c.get("/view", params={"filename": item["filename"], "subfolder": item["subfolder"], "type": "output"})
    got = load_safetensors(r.content)[LATENT_KEY]

    root = Path(env["ctx"].catalog.ip_adapters_dir).parent
    pipe = sdengine.load_pipeline(root / "models" / "a.safetensors", device="cpu")
    encoder = load_clip_vision(root / "clip_vision" / "tiny.safetensors")
    png = c.get("/view", params={"filename": img, "type": "input"}).content
    picture = torch.from_numpy(np.array(Image.open(io.BytesIO(png)))) / 255.0  # LoadImage's IMAGE
    with torch.no_grad():
        out = encoder(ncv.comfy_clip_preprocess(picture[None, ..., :3].float(), 32, True))
        black = encoder(ncv.comfy_clip_preprocess(torch.zeros(1, 32, 32, 3), 32, True))
    plain = IPAdapterUnit(load_ip_adapter(root / "ipadapter" / "plain.safetensors"), out.image_embeds[None], 0.8)
    plus = IPAdapterUnit(
        load_ip_adapter(root / "ipadapter" / "plus.safetensors"), out.penultimate_hidden_state[None], 0.6,
        black.penultimate_hidden_state[None], end=0.5,
    )  # fmt: skip
    with torch.inference_mode():
        want = sample_latents(
            pipe, [encode_text(pipe, "a red apple")], [encode_text(pipe, "blurry")], torch.zeros_like(got),
            seed=SEED, steps=STEPS, cfg=5.0, sampler=SAMPLER_NAMES["euler"], schedule=SCHEDULER_NAMES["normal"],
            seed_rule="comfyui", ip_adapters=[plain, plus],
        ).cpu()  # fmt: skip
        without = sample_latents(
            pipe, [encode_text(pipe, "a red apple")], [encode_text(pipe, "blurry")], torch.zeros_like(got),
            seed=SEED, steps=STEPS, cfg=5.0, sampler=SAMPLER_NAMES["euler"], schedule=SCHEDULER_NAMES["normal"],
            seed_rule="comfyui", ip_adapters=[plain],
        ).cpu()  # fmt: skip
    assert (got - want).abs().max().item() <= 1e-5, (got - want).abs().max().item()
    assert (got - without).abs().max().item() > 1e-2  # the second adapter counts


def test_the_pipeline_runs_a_units_window_by_the_calls_sigma(env, monkeypatch):
    """sdengine's own pipeline call (GenerationRequest.ip_adapters) with start / end: the adapter acts in exactly the
    calls whose sigma is in ComfyUI's window; start == end is no adapter."""
    from sdengine.diffusion.schedules import percent_to_sigma
    from sdengine.nn import ip_adapter as nn_ipa
    from sdengine.pipeline.ip_adapter import IPAdapterUnit
    from sdengine.weights.ip_adapter_file import load_ip_adapter

    pipe = env["pipe"]
    root = Path(env["ctx"].catalog.ip_adapters_dir)
    adapter = load_ip_adapter(root / "plain.safetensors")
    embeds = torch.randn(1, PROJ, generator=torch.Generator().manual_seed(3))

    texts: list[str] = []

    def run(**kw: Any) -> np.ndarray:
        units = [IPAdapterUnit(adapter, embeds, 1.0, **kw)] if kw else None
        r = pipe("a red apple", "blurry", ip_adapters=units, steps=STEPS, sampler="euler", seed=SEED, width=32,
                 height=32, progress=False)  # fmt: skip
        texts.append(r.infotexts[0])
        return r.arrays

    plain = run()
    assert np.array_equal(run(start=0.4, end=0.4), plain)
    seen: list[tuple[float, bool]] = []
    active = nn_ipa.IPAdapterNet.active

    def spy(self: Any, sigma: float | None) -> list[bool]:
        on = active(self, sigma)
        seen.append((float(sigma) if sigma is not None else -1.0, on[0]))
        return on

    monkeypatch.setattr(nn_ipa.IPAdapterNet, "active", spy)
    half = run(start=0.0, end=0.5)
    assert "Start: 0, End: 0.5" in texts[-1]  # the window is recorded (and read back by --from-png)
    low = percent_to_sigma(pipe.noise_schedule.log_sigmas, 0.5)
    assert seen and all(on == (s >= low) for s, on in seen), (low, seen)
    assert {on for _, on in seen} == {True, False}
    assert not np.array_equal(half, plain) and not np.array_equal(half, run(start=0.0, end=1.0))
    with pytest.raises(sdengine.pipeline.GenerationError, match="start 0.7 is after its end 0.2"):
        run(start=0.7, end=0.2)


def test_regional_conditioning_with_an_adapter_is_one_line(env):
    from dataclasses import replace

    from sdengine.latent_sampling import LatentSamplingError, encode_text, sample_latents
    from sdengine.pipeline.ip_adapter import IPAdapterUnit
    from sdengine.weights.ip_adapter_file import load_ip_adapter

    pipe = env["pipe"]
    unit = IPAdapterUnit(load_ip_adapter(Path(env["ctx"].catalog.ip_adapters_dir) / "plain.safetensors"),
                         torch.zeros(1, PROJ))  # fmt: skip
    pos = replace(encode_text(pipe, "a red apple"), strength=0.5)
    with pytest.raises(LatentSamplingError) as e:
        sample_latents(pipe, [pos], [encode_text(pipe, "")], torch.zeros(1, 4, 4, 4), seed=1, steps=2, cfg=5.0,
                       sampler="euler", ip_adapters=[unit])  # fmt: skip
    assert "IP-Adapter cannot run with conditioning areas" in str(e.value) and "\n" not in str(e.value)


def test_the_adapter_composes_with_lora_and_pag(env):
    """LoraLoaderModelOnly before the adapter and PerturbedAttentionGuidance after it: at weight 0 the image of the
    two patches alone, at weight 1 another one (the adapter acts with both)."""
    c, img = env["client"], env["images"][0]
    lora = {"40": {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["4", 0], "lora_name": "q.safetensors", "strength_model": 1.0}}}  # fmt: skip

    def graph(weight: float | None) -> dict[str, Any]:
        adapters = [{"file": "plain.safetensors", "weight": weight}] if weight is not None else []
        g = _graph(*adapters, image=img, extra=lora)
        if adapters:
            g["31"]["inputs"]["model"] = ["40", 0]
        g["41"] = {"class_type": "PerturbedAttentionGuidance",
                   "inputs": {"model": ["31", 0] if adapters else ["40", 0], "scale": 2.0}}  # fmt: skip
        g["3"]["inputs"]["model"] = ["41", 0]
        return g

    alone = prompt_image(c, graph(None))
    assert _diff(alone, prompt_image(c, _graph(image=img))) > 1.0  # the patches act
    assert np.array_equal(prompt_image(c, graph(0.0)), alone)
    assert _diff(prompt_image(c, graph(1.0)), alone) > 1.0


def test_sdxl_latents_take_a_windowed_adapter(tmp_path):
    """The sampler path on SDXL (its size vectors beside the image tokens, transformer depths): weight 0 is no
    adapter, per-layer weights with K+V scaling and a window run; the style-transfer weights sit on the real SDXL's
    transformer 6 (up_blocks.0's second transformer, ten layers) only."""
    from _sdxl_models import make_sdxl_folder
    from sdengine.latent_sampling import encode_text, sample_latents
    from sdengine.pipeline.ip_adapter import IPAdapterUnit

    pipe = sdengine.load_pipeline(make_sdxl_folder(tmp_path / "tiny-sdxl"), device="cpu")
    adapter = random_adapter(pipe.unet, "plain", PROJ, 4, width=64, depth=2, heads=1, queries=4)
    from sdengine.models import unet as unet_mod
    from sdengine.models.unet_sdxl import SDXL_BASE

    with torch.device("meta"):
        full_places = transformer_places(unet_mod.UNet(SDXL_BASE))
    style = nip.layer_scales("style transfer", 1.0, full_places, True, [64] * 70, "V only")
    assert style is not None and [i for i, v in enumerate(style) if v] == list(range(34, 44))  # up_blocks.0.attn.1
    places = transformer_places(pipe.unet)
    ease = nip.layer_scales("ease in", 1.0, places, True, [64] * len(places), "V only")
    embeds = torch.randn(1, PROJ, generator=torch.Generator().manual_seed(2))

    def run(*units: IPAdapterUnit) -> torch.Tensor:
        with torch.inference_mode():
            return sample_latents(
                pipe, [encode_text(pipe, "a red apple")], [encode_text(pipe, "blurry")], torch.zeros(1, 4, 8, 8),
                seed=1, steps=3, cfg=5.0, sampler="euler", seed_rule="comfyui", ip_adapters=list(units),
            )  # fmt: skip

    plain = run()
    assert torch.equal(run(IPAdapterUnit(adapter, embeds, 0.0)), plain)
    full = run(IPAdapterUnit(adapter, embeds, 1.0))
    windowed = run(IPAdapterUnit(adapter, embeds, 1.0, start=0.0, end=0.5, layer_scales=ease, scaling="kv"))
    assert (full - plain).abs().max() > 1e-3 and (windowed - plain).abs().max() > 1e-4
    assert (windowed - full).abs().max() > 1e-4


def test_the_unified_loader_and_the_simple_node_are_the_advanced_node_on_the_presets_files(env):
    """IPAdapterUnifiedLoader's STANDARD / PLUS presets pick the pack's file names (the ViT-H encoder, ip-adapter_sd15,
    ip-adapter-plus_sd15); IPAdapter on its pipeline is IPAdapterAdvanced on those files ("standard": linear,
    "prompt is more important": ease out), and IPAdapterAdvanced takes the pipeline's encoder too."""
    c, img = env["client"], env["images"][0]
    (_, pipe) = nip.ipadapter_unified_loader(env["ctx"], ModelHandle("a"), "PLUS (high strength)")
    assert pipe.ipadapter.name == "ip-adapter-plus_sd15.safetensors"
    assert pipe.clip_vision.name == "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"

    def simple(weight_type: str, preset: str = "STANDARD (medium strength)") -> dict[str, Any]:
        g = _graph(image=img)
        g["30"] = {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["4", 0], "preset": preset}}
        g["31"] = {"class_type": "IPAdapter", "inputs": {"model": ["30", 0], "ipadapter": ["30", 1], "image": ["20", 0],
                                                         "weight": 0.9, "start_at": 0.0, "end_at": 1.0,
                                                         "weight_type": weight_type}}  # fmt: skip
        g["3"]["inputs"]["model"] = ["31", 0]
        return g

    for weight_type, advanced in (("standard", "linear"), ("prompt is more important", "ease out")):
        want = _graph({"file": "ip-adapter_sd15.safetensors", "weight": 0.9, "weight_type": advanced}, image=img)
        want["21"]["inputs"]["clip_name"] = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
        got = prompt_image(c, simple(weight_type))
        assert np.array_equal(got, prompt_image(c, want)), weight_type
    assert _diff(prompt_image(c, simple("standard")), prompt_image(c, simple("prompt is more important"))) > 0.5
    # IPAdapterAdvanced on the pipeline, no clip_vision connected: the pipeline's encoder
    g = simple("standard", "PLUS (high strength)")
    g["31"] = {"class_type": "IPAdapterAdvanced", "inputs": {
        "model": ["30", 0], "ipadapter": ["30", 1], "image": ["20", 0], "weight": 0.9, "weight_type": "linear",
        "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0, "embeds_scaling": "V only"}}  # fmt: skip
    want = _graph({"file": "ip-adapter-plus_sd15.safetensors", "weight": 0.9}, image=img)
    want["21"]["inputs"]["clip_name"] = "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"
    assert np.array_equal(prompt_image(c, g), prompt_image(c, want))


def test_free_with_unload_models_drops_the_files_the_jobs_units_kept(env, monkeypatch):
    """POST /free with unload_models dropped the Comfy loaders' adapters and encoders but not the ones the native
    and OpenAI jobs' units keep (sdengine.pipeline.ip_adapter's file cache: a ViT-H encoder is 632M parameters):
    a unit resolved after the /free reads its files again (new objects), one resolved before it is kept."""
    import sdengine.weights.clip_vision_file as cvf
    from sdengine.pipeline.ip_adapter import IPAdapterUnit, resolve_unit

    reads = []
    real = cvf.load_clip_vision
    monkeypatch.setattr(cvf, "load_clip_vision", lambda *a, **kw: reads.append(a[0]) or real(*a, **kw))
    ipa, cv = env["ctx"].catalog.ip_adapters_dir, env["ctx"].catalog.clip_vision_dir
    unit = IPAdapterUnit(
        Path(ipa) / "plain.safetensors", images=_picture(0), clip_vision=Path(cv) / "tiny.safetensors", scale=0.5
    )

    def loaded() -> tuple[Any, Any]:
        done = resolve_unit(unit, torch.device("cpu"), torch.float32)
        return done.adapter, done.embeds

    adapter, embeds = loaded()
    again, same_embeds = loaded()
    assert again is adapter and torch.equal(same_embeds, embeds) and len(reads) <= 1  # kept between calls
    c = env["client"]
    assert c.post("/free", json={"free_memory": True, "unload_models": False}).status_code == 200
    before = len(reads)
    assert loaded()[0] is adapter and len(reads) == before  # the node cache only: the files stay
    assert c.post("/free", json={"unload_models": True}).status_code == 200
    fresh, fresh_embeds = loaded()
    assert fresh is not adapter and torch.equal(fresh_embeds, embeds)  # read again, the same weights
    assert len(reads) == before + 1  # the encoder too
