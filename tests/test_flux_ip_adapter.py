"""IP-Adapters on FLUX.1 (XLabs' ``flux-ip-adapter`` layout) against diffusers' ``FluxPipeline.load_ip_adapter`` on a
tiny random Flux [dev] folder with two double blocks, a tiny random adapter saved in XLabs' names and a tiny CLIP
vision encoder saved by transformers (``image_encoder`` folder; diffusers loads both from the local paths): scales
0.5 and 1, true CFG with a negative prompt (the unconditional pass takes a black picture's tokens, diffusers'
``negative_ip_adapter_image`` default); scale 0 is no adapter; the file layouts; the one-line refusals (an SD adapter
on Flux, a Flux adapter on SD, Chroma, a sigma window)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _flux_models import DEV_SCHEDULER, FLUX_TRANSFORMER, flux_components, perturbed, write_t5_tokenizer  # noqa: E402
from _ip_models import random_adapter, random_encoder  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.models.ip_adapter import ImageProjModel, IPAdapter  # noqa: E402
from sdengine.pipeline.ip_adapter import IPAdapterUnit, unit_from_images  # noqa: E402
from sdengine.weights.clip_vision_file import load_clip_vision  # noqa: E402
from sdengine.weights.io import WeightsError, load_file  # noqa: E402
from sdengine.weights.ip_adapter_file import load_ip_adapter, save_ip_adapter  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels (fp32, CPU)
PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
SEED, STEPS, W, H = 3, 3, 32, 32
DOUBLE = 2  # double blocks of the tiny transformer (FLUX.1: 19)
CLIP_HIDDEN, CLIP_EMBED = 48, 40  # the tiny encoder's widths (ViT-L/14: 1024 and 768)
IP_FILE = "flux-ip-adapter.safetensors"


def _flux_folder(dst: Path) -> Path:
    """A tiny random FLUX.1 [dev] diffusers folder as _flux_models' (two double blocks here)."""
    import diffusers
    from transformers import CLIPTokenizer, T5TokenizerFast

    from sdengine.weights.loading import write_clip_tokenizer

    parts = flux_components(guidance=True, seed=4)
    shape = {**FLUX_TRANSFORMER, "num_layers": DOUBLE}
    torch.manual_seed(5)
    parts["transformer"] = perturbed(diffusers.FluxTransformer2DModel(**shape, guidance_embeds=True), 6).eval()
    write_clip_tokenizer(dst / "tokenizer")
    write_t5_tokenizer(dst / "tokenizer_2")
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER),
        tokenizer=CLIPTokenizer.from_pretrained(dst / "tokenizer"),
        tokenizer_2=T5TokenizerFast.from_pretrained(dst / "tokenizer_2"),
        **parts,
    )
    pipe.save_pretrained(dst)
    return dst


def flux_adapter(transformer, embed: int, seed: int, *, tokens: int = 4, blocks: int | None = None) -> IPAdapter:
    """A random Flux adapter for ``transformer``: a plain projection to ``tokens`` tokens as wide as T5's states, a
    key / value pair with biases per double block (``blocks``: another count, made for another model)."""
    cfg = transformer.config
    torch.manual_seed(seed)
    n = len(transformer.transformer_blocks) if blocks is None else blocks
    proj = ImageProjModel(embed, cfg.joint_attention_dim, tokens)
    adapter = IPAdapter("plain", proj, embed, cfg.joint_attention_dim, [cfg.hidden_size] * n, family="flux")
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(torch.randn(p.shape) * (0.3 if p.dim() > 1 else 0.1))
    return adapter.eval()


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
    """(adapters folder, model folder, pipeline): ``models/tiny-flux``, ``ipadapter/flux-ip-adapter.safetensors``
    and ``ipadapter/image_encoder`` (transformers' layout) under one temporary folder."""
    base = tmp_path_factory.mktemp("flux-ip")
    folder = _flux_folder(base / "models" / "tiny-flux")
    pipe = sdengine.load_pipeline(folder, device="cpu")
    root = base / "ipadapter"
    random_encoder(CLIP_HIDDEN, CLIP_EMBED, 0, layers=2).save_pretrained(root / "image_encoder")
    save_ip_adapter(flux_adapter(pipe.transformer, CLIP_EMBED, 1), root / IP_FILE)
    return root, folder, pipe


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def _diffusers(root: Path, folder: Path):
    """diffusers' FluxPipeline with the adapter and the encoder loaded from the local paths (float32), and the
    ``CLIPImageProcessor`` of the tiny encoder's 32-pixel input."""
    import diffusers
    import transformers

    ref = diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(
        str(root),
        weight_name=IP_FILE,
        image_encoder_pretrained_model_name_or_path=str(root / "image_encoder"),
        image_encoder_dtype=torch.float32,
        low_cpu_mem_usage=False,
    )
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref.register_modules(feature_extractor=processor)
    return ref


@pytest.fixture(scope="module")
def ref(flux):
    root, folder, _ = flux
    return _diffusers(root, folder)


def _ours(pipe, root, scale, **kw):
    unit = IPAdapterUnit(root / IP_FILE, scale=scale, images=picture(40, 48), clip_vision=root / "image_encoder")
    args = dict(steps=STEPS, seed=SEED, width=W, height=H, progress=False)
    args.update(kw)
    return pipe(PROMPT, ip_adapters=[unit], **args)


def _theirs(ref, scale, **kw) -> np.ndarray:
    ref.set_ip_adapter_scale(scale)
    args = dict(num_inference_steps=STEPS, width=W, height=H, guidance_scale=3.5, output_type="np")
    args.update(kw)
    return ref(PROMPT, ip_adapter_image=picture(40, 48), generator=torch.Generator().manual_seed(SEED), **args).images


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_matches_diffusers(flux, ref, scale):
    root, _, pipe = flux
    ours = _ours(pipe, root, scale)
    assert _mad(ours.arrays, _theirs(ref, scale)) < TOL
    plain = pipe(PROMPT, steps=STEPS, seed=SEED, width=W, height=H, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 30 * TOL  # the adapter changes the image


def test_true_cfg_matches_diffusers(flux, ref):
    """cfg_scale above 1 with a negative prompt is diffusers' true_cfg_scale: the negative pass takes the tokens of a
    black picture (diffusers' default negative_ip_adapter_image)."""
    root, _, pipe = flux
    ours = _ours(pipe, root, 0.8, negative_prompt=NEGATIVE, cfg_scale=2.5)
    theirs = _theirs(ref, 0.8, negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    assert _mad(ours.arrays, theirs) < TOL


def test_two_adapters_match_diffusers(flux, tmp_path):
    """Two units at once (their tokens side by side, each with its scale and picture) against diffusers' two
    adapters (``load_ip_adapter`` with a list of files, ``set_ip_adapter_scale([a, b])``), with true CFG."""
    import shutil

    import diffusers
    import transformers

    root, folder, pipe = flux
    shutil.copy(root / IP_FILE, tmp_path / IP_FILE)
    save_ip_adapter(flux_adapter(pipe.transformer, CLIP_EMBED, 7), tmp_path / "second.safetensors")
    images = [picture(40, 48), picture(36, 36, seed=2)]
    units = [
        IPAdapterUnit(tmp_path / name, scale=s, images=im, clip_vision=root / "image_encoder")
        for name, s, im in zip((IP_FILE, "second.safetensors"), (0.5, 0.7), images, strict=True)
    ]
    ours = pipe(PROMPT, NEGATIVE, steps=2, seed=SEED, width=W, height=H, cfg_scale=2.0, ip_adapters=units,
                progress=False)  # fmt: skip
    ref = diffusers.FluxPipeline.from_pretrained(folder, local_files_only=True)
    ref.set_progress_bar_config(disable=True)
    ref.load_ip_adapter(
        str(tmp_path),
        weight_name=[IP_FILE, "second.safetensors"],
        image_encoder_pretrained_model_name_or_path=str(root / "image_encoder"),
        image_encoder_dtype=torch.float32,
        low_cpu_mem_usage=False,
    )
    processor = transformers.CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref.register_modules(feature_extractor=processor)
    ref.set_ip_adapter_scale([0.5, 0.7])
    theirs = ref(PROMPT, negative_prompt=NEGATIVE, true_cfg_scale=2.0, ip_adapter_image=images, num_inference_steps=2,
                 width=W, height=H, guidance_scale=3.5, output_type="np",
                 generator=torch.Generator().manual_seed(SEED)).images  # fmt: skip
    assert _mad(ours.arrays, theirs) < TOL


def test_scale_zero_is_no_adapter_and_blocks_restored(flux):
    root, _, pipe = flux
    plain = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, progress=False).arrays
    assert np.array_equal(_ours(pipe, root, 0.0, steps=2).arrays, plain)
    _ours(pipe, root, 1.0, steps=2)
    assert all(b.ip_attention is None for b in pipe.transformer.transformer_blocks)
    assert np.array_equal(pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, progress=False).arrays, plain)


def test_file_layouts(flux, tmp_path):
    """XLabs' names on disk; diffusers' two groups (a .bin) load the same weights; a unit from images equals the
    unit of the files."""
    root, _, pipe = flux
    names = sorted(load_file(root / IP_FILE)[0])
    assert "ip_adapter_proj_model.proj.weight" in names and "ip_adapter_proj_model.norm.bias" in names
    assert "double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias" in names
    adapter = load_ip_adapter(root / IP_FILE)
    assert adapter.family == "flux" and len(adapter.to_k_ip) == DOUBLE and adapter.to_k_ip[0].bias is not None
    again = load_ip_adapter(save_ip_adapter(adapter, tmp_path / "flux.bin"))
    assert again.family == "flux"
    for (k, a), (_, b) in zip(adapter.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    encoder = load_clip_vision(root / "image_encoder")
    unit = unit_from_images(adapter, encoder, picture(40, 48), 1.0)
    assert unit.negative is not None and unit.negative.abs().sum() > 0  # a black picture's embedding, not zeros
    by_units = pipe(PROMPT, steps=2, seed=SEED, width=W, height=H, ip_adapters=[unit], progress=False).arrays
    assert np.array_equal(by_units, _ours(pipe, root, 1.0, steps=2).arrays)


def test_refusals(flux, tiny_sd1_folder, tmp_path):
    root, folder, pipe = flux
    encoder = root / "image_encoder"
    image = picture(40, 48)
    sd = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    save_ip_adapter(random_adapter(sd.unet, "plain", CLIP_EMBED, 2), tmp_path / "ip-adapter_sd15.safetensors")
    save_ip_adapter(flux_adapter(pipe.transformer, CLIP_EMBED, 3, blocks=19), tmp_path / "flux19.safetensors")
    save_ip_adapter(flux_adapter(pipe.transformer, 24, 3), tmp_path / "flux_vit_h.safetensors")
    cases = [
        (pipe, "ip-adapter_sd15.safetensors", "is an SD 1.x / 2.x / SDXL (U-Net) IP-Adapter and this is a FLUX.1"),
        (sd, IP_FILE, "is a FLUX.1 (XLabs flux-ip-adapter) IP-Adapter and this is an SD 1.x / 2.x / SDXL model"),
        (pipe, "flux19.safetensors", "has 19 (FLUX.1) double blocks and this transformer has 2"),
        (pipe, "flux_vit_h.safetensors", "reads CLIP vision image embeddings of width 24"),
    ]
    for model, name, message in cases:
        where = root if name == IP_FILE else tmp_path
        unit = IPAdapterUnit(where / name, images=image, clip_vision=encoder)
        with pytest.raises(SdengineError, match=re.escape(message)) as e:
            model(PROMPT, steps=1, seed=1, width=W, height=H, ip_adapters=[unit], progress=False)
        assert "\n" not in str(e.value)
    windowed = IPAdapterUnit(root / IP_FILE, images=image, clip_vision=encoder, start=0.2)
    with pytest.raises(SdengineError, match="start / end .* not supported for Flux"):
        pipe(PROMPT, steps=1, seed=1, width=W, height=H, ip_adapters=[windowed], progress=False)


def test_bad_xlabs_files_are_one_line(tmp_path):
    from sdengine.weights.io import save_safetensors

    proj = {"ip_adapter_proj_model.proj.weight": torch.zeros(8, 4), "ip_adapter_proj_model.norm.weight": torch.ones(2)}
    proj["ip_adapter_proj_model.proj.bias"] = torch.zeros(8)
    proj["ip_adapter_proj_model.norm.bias"] = torch.zeros(2)
    kv = "double_blocks.0.processor.ip_adapter_double_stream_{}_proj.{}"
    whole = {
        kv.format(w, p): torch.zeros(6, 2) if p == "weight" else torch.zeros(6)
        for w in "kv"
        for p in ("weight", "bias")
    }
    cases = [
        ({**proj}, "needs ip_adapter_proj_model"),
        ({**proj, **whole, "double_blocks.0.other": torch.zeros(1)}, "unknown tensors"),
        ({**proj, **{k: v for k, v in whole.items() if not k.endswith("k_proj.bias")}}, "biases missing"),
        ({**proj, **{k.replace("blocks.0", "blocks.1"): v for k, v in whole.items()}}, "not 0, 1, 2"),
    ]
    for i, (flat, message) in enumerate(cases):
        save_safetensors(flat, tmp_path / f"x{i}.safetensors")
        with pytest.raises(WeightsError, match=message) as e:
            load_ip_adapter(tmp_path / f"x{i}.safetensors")
        assert "\n" not in str(e.value)
    save_safetensors({**proj, **whole}, tmp_path / "ok.safetensors")
    assert load_ip_adapter(tmp_path / "ok.safetensors").family == "flux"


def _sd_adapter(path: Path) -> Path:
    """An SD 1.x-shaped adapter file (16 cross-attention layers) whose projection reads the tiny encoder's width."""
    adapter = IPAdapter("plain", ImageProjModel(CLIP_EMBED, 32, 4), CLIP_EMBED, 32, [64] * 16)
    return save_ip_adapter(adapter, path)


def test_cli_equals_the_python_call(flux, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main

    root, folder, pipe = flux
    picture(40, 48).save(tmp_path / "cat.png")
    size = ["--steps", str(STEPS), "--seed", str(SEED), "--width", str(W), "--height", str(H), "--no-progress"]
    ip = ["--ip-adapter", str(root / IP_FILE), "--ip-image", str(tmp_path / "cat.png"), "--ip-scale", "0.5"]
    ip += ["--clip-vision", str(root / "image_encoder")]
    out = tmp_path / "cli.png"
    rc = main(["generate", PROMPT, "--model", str(folder), *size, *ip, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    want = _ours(pipe, root, 0.5)
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")), np.asarray(want.images[0]))
    text = Image.open(out).info["parameters"]
    assert text == want.infotexts[0] and 'IP-Adapter 0: "Model: flux-ip-adapter [' in text
    # --from-png makes it again: the adapter and the encoder looked up by name and hash, the picture given again
    again = tmp_path / "again.png"
    dirs = ["--ip-adapters-dir", str(root), "--clip-vision-dir", str(root), "--ip-image", str(tmp_path / "cat.png")]
    rc = main(["generate", "--from-png", str(out), "--model", str(folder), *dirs, "--no-progress", "--out", str(again)])
    assert rc == 0, capsys.readouterr().err
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), np.asarray(want.images[0]))
    # an SD adapter on the Flux model: one line, exit 2
    sd_file = _sd_adapter(tmp_path / "ip-adapter_sd15.safetensors")
    capsys.readouterr()
    ip[1] = str(sd_file)
    rc = main(["generate", PROMPT, "--model", str(folder), *size, *ip, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "is an SD 1.x / 2.x / SDXL (U-Net) IP-Adapter" in err, err


def test_native_job_equals_the_python_call(flux, tmp_path):
    """The server's native job with an ``ip_adapters`` unit on the Flux model (the encoder chosen by width) is the
    Python call's image; an SD adapter on the Flux model and the Flux adapter on an SD model are one-line 400s."""
    import base64
    import io
    import shutil

    httpx = pytest.importorskip("httpx")
    from _live_server import live_server, run_job, server_config

    root, folder, pipe = flux
    ipa, clip = tmp_path / "ipadapter", tmp_path / "clip_vision"
    ipa.mkdir()
    shutil.copy(root / IP_FILE, ipa / IP_FILE)
    shutil.copytree(root / "image_encoder", clip / "image_encoder")
    _sd_adapter(ipa / "ip-adapter_sd15.safetensors")
    buf = io.BytesIO()
    picture(40, 48).save(buf, format="PNG")
    image = base64.b64encode(buf.getvalue()).decode()
    config = server_config(tmp_path, models_dir=folder.parent, ip_adapters_dir=ipa, clip_vision_dir=clip)
    body = {"model": "tiny-flux", "prompt": PROMPT, "steps": STEPS, "seed": SEED, "width": W, "height": H}
    with live_server(config) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        got, _ = run_job(client, {**body, "ip_adapters": [{"model": IP_FILE, "image": image, "scale": 0.5}]})
        assert np.array_equal(got, np.asarray(_ours(pipe, root, 0.5).images[0].convert("RGB")))
        cases = [
            ("tiny-flux", "ip-adapter_sd15.safetensors", "is an SD 1.x / 2.x / SDXL (U-Net) IP-Adapter and tiny-flux"),
            ("emoji", IP_FILE, "is a FLUX.1 (XLabs flux-ip-adapter) IP-Adapter and emoji is not a FLUX.1 model"),
        ]
        for model, name, needle in cases:
            unit = {"model": name, "image": image, "clip_vision": "image_encoder"}
            r = client.post("/v1/jobs", json={**body, "model": model, "ip_adapters": [unit]})
            assert r.status_code == 400, r.text
            message = r.json()["detail"] if "detail" in r.json() else r.json()["error"]["message"]
            assert needle in message and "\n" not in message, message


def test_chroma_and_sd3_refuse_ip_adapters(flux):
    from sdengine.pipeline.chroma import chroma_refusals
    from sdengine.pipeline.flux import refusals
    from sdengine.pipeline.request import GenerationRequest
    from sdengine.pipeline.sd3 import refusals as sd3_refusals

    root = flux[0]
    r = GenerationRequest(prompt=PROMPT, ip_adapters=[IPAdapterUnit(root / IP_FILE, images=picture(8, 8))])
    assert refusals(r) == []  # Flux takes it
    assert "IP-Adapters are not supported for Chroma" in " ".join(chroma_refusals(r))
    assert "IP-Adapters are made for U-Nets; SD3 takes none here" in " ".join(sd3_refusals(r))
