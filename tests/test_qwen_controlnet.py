"""Qwen-Image ControlNets end to end against diffusers' QwenImageControlNetPipeline /
QwenImageControlNetInpaintPipeline on the tiny random Qwen-Image folder (tests/_qwen_models.py) and random
``QwenImageControlNetModel``s saved by diffusers: images on 0..1 pixels within TOL (mean absolute difference) for
one unit, a scale and a step window, two units (diffusers' multi-ControlNet over one Union ControlNet), true CFG
with a negative prompt, a batch of two, the inpainting ControlNet; single files; the refusals.

The oracle's VAE encodes the control image to its posterior's mean here, as sdengine does (diffusers draws a
sample)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _qwen_models import QWEN_TEXT, QWEN_TRANSFORMER, diffusers_qwen, make_qwen_folder, perturb  # noqa: E402
from sdengine.control.dit_files import read_dit_controlnet  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from sdengine.weights.io import load_file, save_safetensors  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels
SIZE = 32  # 16x16 latents (the tiny VAE's 4x), 8x8 tokens
SEED = 7
PROMPT, NEGATIVE = "a red apple on a table", "blurry, low quality"


@pytest.fixture(autouse=True)
def _posterior_mean(monkeypatch):
    from diffusers.models.autoencoders import vae as dvae

    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    value = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    print(f"mean abs difference {value:.2e}")
    return value


def _picture(seed: int = 0, w: int = SIZE, h: int = SIZE):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


def _mask(w: int = SIZE, h: int = SIZE):
    from PIL import Image

    m = np.zeros((h, w), dtype=np.uint8)
    m[h // 4 : 3 * h // 4, w // 8 : w // 2] = 255
    return Image.fromarray(m)


def _controlnet(dst: Path, seed: int, **extra) -> Path:
    from diffusers import QwenImageControlNetModel

    cfg = {**QWEN_TRANSFORMER, "joint_attention_dim": QWEN_TEXT["hidden_size"], "num_layers": 1, **extra}
    torch.manual_seed(seed)
    cn = perturb(QwenImageControlNetModel(**cfg), seed + 1, 0.1).eval()
    cn.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwencn")
    folder = make_qwen_folder(root / "qwen-tiny")
    cn = _controlnet(root / "qwen-cn", 41)
    inpaint = _controlnet(root / "qwen-cn-inpaint", 42, extra_condition_channels=4)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_qwen(folder), cn, inpaint


def _ref(ref, net: Path, n: int = 1, inpaint: bool = False):
    import diffusers

    model = diffusers.QwenImageControlNetModel.from_pretrained(net)
    cn = model if n == 1 else diffusers.QwenImageMultiControlNetModel([model])
    cls = diffusers.QwenImageControlNetInpaintPipeline if inpaint else diffusers.QwenImageControlNetPipeline
    pipe = cls(**ref.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, prompt=PROMPT, *, cfg=1.0, negative=None, steps=3, **kw):
    with torch.no_grad():
        return pipe(
            prompt,
            negative_prompt=negative,
            true_cfg_scale=cfg,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
            **kw,
        ).images


def _ours(pipe, units, prompt=PROMPT, *, cfg=1.0, negative="", steps=3, **kw):
    return pipe(prompt, negative_prompt=negative, cfg_scale=cfg, steps=steps, seed=SEED, width=SIZE, height=SIZE,
                controlnets=units, progress=False, **kw)  # fmt: skip


def test_residuals_and_the_transformer_with_them_match_diffusers(tmp_path):
    """The ControlNet's residuals (two blocks, a masked shorter prompt, a non-square grid, an inpainting one's 17
    channels) and a three-block transformer taking them (block i: residual i // ceil(3 / 2)) against diffusers'."""
    from _qwen_models import qwen_transformer
    from sdengine.models.flux import pack_latents
    from sdengine.models.qwen_image import QwenImageConfig, QwenImageTransformer

    ref_t = qwen_transformer(seed=3, num_layers=3, joint_attention_dim=QWEN_TEXT["hidden_size"])
    ours_t = QwenImageTransformer(QwenImageConfig.from_diffusers(dict(ref_t.config))).eval()
    ours_t.load_state_dict(ref_t.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    h, w, L = 6, 10, 7
    latent = torch.randn(2, 16, h, w, generator=g)
    states = torch.randn(2, L, QWEN_TEXT["hidden_size"], generator=g)
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1, 5:] = 0
    t = torch.tensor([700.0, 300.0])
    import diffusers

    for extra in (0, 4):
        folder = _controlnet(tmp_path / f"cn{extra}", 13 + extra, num_layers=2, extra_condition_channels=extra)
        ref_cn = diffusers.QwenImageControlNetModel.from_pretrained(folder).eval()
        ours_cn = read_dit_controlnet(folder)
        cond = torch.randn(2, 16 + extra // 4, h, w, generator=g)
        shapes = [[(1, h // 2, w // 2)]] * 2
        with torch.no_grad():
            want = ref_cn(hidden_states=pack_latents(latent), controlnet_cond=pack_latents(cond),
                          conditioning_scale=0.6, encoder_hidden_states=states, encoder_hidden_states_mask=mask,
                          timestep=t / 1000, img_shapes=shapes, return_dict=False)  # fmt: skip
            got = ours_cn(latent, cond, t, states, mask, conditioning_scale=0.6)
            worst = max((a - b).abs().max().item() for a, b in zip(got, want, strict=True))
            print(f"residuals (extra {extra}): max abs {worst:.2e}")
            assert len(got) == 2 and worst < 2e-5
            v_want = ref_t(hidden_states=pack_latents(latent), encoder_hidden_states=states,
                           encoder_hidden_states_mask=mask, timestep=t / 1000, img_shapes=shapes,
                           controlnet_block_samples=want, return_dict=False)[0]  # fmt: skip
            v_got = ours_t(latent, t, states, mask, controlnet_block_samples=got)
            plain = ours_t(latent, t, states, mask)
        worst = (pack_latents(v_got) - v_want).abs().max().item()
        print(f"transformer with them: max abs {worst:.2e}")
        assert worst < 2e-5
        assert (v_got - plain).abs().max().item() > 1e-3


def test_one_unit_with_a_scale_and_a_window_matches_diffusers(qwen):
    _, pipe, ref, cn, _ = qwen
    image = _picture(5)
    ours = _ours(pipe, [ControlUnit(str(cn), image, scale=0.7, start=0.0, end=0.5)], steps=4)
    theirs = _theirs(
        _ref(ref, cn),
        control_image=image,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.0,
        control_guidance_end=0.5,
        steps=4,
    )
    assert _mad(ours.arrays, theirs) <= TOL
    plain = pipe(PROMPT, cfg_scale=1.0, steps=4, seed=SEED, width=SIZE, height=SIZE, progress=False)
    assert _mad(ours.arrays, plain.arrays) > 100 * TOL  # the ControlNet changed the picture


def test_true_cfg_and_two_units_match_diffusers_multi_controlnet(qwen):
    _, pipe, ref, cn, _ = qwen
    a, b = _picture(1), _picture(2)
    units = [ControlUnit(str(cn), a, scale=0.8), ControlUnit(str(cn), b, scale=0.5, start=0.3, end=1.0)]
    ours = _ours(pipe, units, cfg=3.0, negative=NEGATIVE)
    theirs = _theirs(
        _ref(ref, cn, n=2),
        cfg=3.0,
        negative=NEGATIVE,
        control_image=[a, b],
        controlnet_conditioning_scale=[0.8, 0.5],
        control_guidance_start=[0.0, 0.3],
        control_guidance_end=[1.0, 1.0],
    )
    assert _mad(ours.arrays, theirs) <= TOL


def test_batch_of_two_with_cfg_matches_diffusers(qwen):
    _, pipe, ref, cn, _ = qwen
    image = _picture(3)
    prompts = [PROMPT, "a cat sitting in the sun"]
    ours = pipe(prompts, negative_prompt=NEGATIVE, cfg_scale=2.5, steps=2, seed=SEED, width=SIZE, height=SIZE,
                controlnets=[ControlUnit(str(cn), image, scale=1.2)], progress=False)  # fmt: skip
    with torch.no_grad():
        theirs = _ref(ref, cn)(
            prompts,
            negative_prompt=[NEGATIVE, NEGATIVE],
            true_cfg_scale=2.5,
            height=SIZE,
            width=SIZE,
            num_inference_steps=2,
            generator=[torch.Generator().manual_seed(SEED), torch.Generator().manual_seed(SEED + 1)],
            output_type="np",
            control_image=image,
            controlnet_conditioning_scale=1.2,
        ).images
    assert _mad(ours.arrays, theirs) <= TOL


def test_inpainting_controlnet_matches_diffusers(qwen):
    _, pipe, ref, _, inpaint = qwen
    image, mask = _picture(9), _mask()
    ours = _ours(pipe, [ControlUnit(str(inpaint), image, scale=0.9, mask=mask)], cfg=2.0, negative=NEGATIVE)
    theirs = _theirs(
        _ref(ref, inpaint, inpaint=True),
        cfg=2.0,
        negative=NEGATIVE,
        control_image=image,
        control_mask=mask,
        controlnet_conditioning_scale=0.9,
    )
    assert _mad(ours.arrays, theirs) <= TOL


def test_single_file_with_narrow_heads_is_refused(qwen, tmp_path):
    """A single file's config comes from its shapes with 128-wide heads assumed (the releases'); these tiny ones
    have 32-wide heads: refused in one line (their folder loads)."""
    _, _, _, cn, _ = qwen
    one = tmp_path / "tiny.safetensors"
    save_safetensors(load_file(cn / "diffusion_pytorch_model.safetensors")[0], one)
    with pytest.raises(SdengineError, match="32-wide heads: its RoPE axes are not Qwen-Image's") as e:
        read_dit_controlnet(one)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra", [0, 4])
def test_single_file_with_128_wide_heads_equals_its_folder(tmp_path, extra):
    """InstantX's / ComfyUI's single files (diffusers' names): the config read off the shapes is the folder's,
    the Union and the inpainting ControlNet alike, and so are the residuals."""
    cfg = dict(num_attention_heads=1, attention_head_dim=128, axes_dims_rope=[16, 56, 56], num_layers=2)
    folder = _controlnet(tmp_path / "wide", 5, extra_condition_channels=extra, **cfg)
    one = tmp_path / "wide.safetensors"
    save_safetensors(load_file(folder / "diffusion_pytorch_model.safetensors")[0], one)
    a, b = read_dit_controlnet(folder), read_dit_controlnet(one)
    assert a.config == b.config and a.config.num_layers == 2 and a.config.extra_condition_channels == extra
    x, c = torch.randn(1, 16, 4, 4), torch.randn(1, 16 + extra // 4, 4, 4)
    text = torch.randn(1, 3, QWEN_TEXT["hidden_size"])
    ra, rb = a(x, c, torch.tensor([500.0]), text), b(x, c, torch.tensor([500.0]), text)
    assert len(ra) == 2 and all(torch.equal(p, q) for p, q in zip(ra, rb, strict=True))


def test_refusals_are_one_line(qwen, tmp_path, tiny_sd1_folder):
    from _flux_models import make_flux_folder

    _, pipe, _, cn, inpaint = qwen
    img = _picture()
    args = dict(steps=2, seed=SEED, width=SIZE, height=SIZE, progress=False)
    flux_folder = make_flux_folder(tmp_path / "tiny-flux")
    flux_cfg = json.loads((flux_folder / "transformer" / "config.json").read_text())
    from diffusers import FluxControlNetModel

    flux_cfg = {k: v for k, v in flux_cfg.items() if not k.startswith("_") and k != "out_channels"}
    FluxControlNetModel(**{**flux_cfg, "num_layers": 1, "num_single_layers": 1}).save_pretrained(tmp_path / "fcn")
    wide = _controlnet(tmp_path / "wide", 3, num_attention_heads=3)
    blockwise = tmp_path / "blockwise.safetensors"
    save_safetensors(
        {"img_in.weight": torch.zeros(8, 64), "controlnet_blocks.0.x_rms.weight": torch.zeros(8)}, blockwise
    )
    cases = [
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(tmp_path / "fcn"), img)], **args),
         "is a Flux ControlNet; this model is Qwen-Image"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(wide), img)], **args),
         "has width \\(heads x head width\\) 96, this Qwen-Image transformer 64"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(blockwise), img)], **args),
         "DiffSynth's Qwen-Image Blockwise ControlNet"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(inpaint), img)], **args),
         "is a Qwen-Image inpainting ControlNet: give the unit its mask"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(cn), img, mask=_mask())], **args),
         "is not an inpainting ControlNet"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(cn), img, union_mode="canny")], **args),
         "Qwen-Image ControlNets take no union_mode"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(cn), img, mode="prompt")], **args),
         "control mode 'prompt' is sd-webui-controlnet's soft weighting"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(cn), img)], guess_mode=True, **args), "guess_mode"),
    ]  # fmt: skip
    for run, message in cases:
        with pytest.raises(SdengineError, match=message) as e:
            run()
        assert "\n" not in str(e.value)
    flux = sdengine.load_pipeline(flux_folder, device="cpu")
    with pytest.raises(SdengineError, match="is a Qwen-Image ControlNet; this model is Flux") as e:
        flux(PROMPT, controlnets=[ControlUnit(str(cn), _picture(0, 48, 32))], steps=1, width=48, height=32,
             progress=False)  # fmt: skip
    assert "\n" not in str(e.value)
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    one = tmp_path / "qwen_cn.safetensors"
    save_safetensors(load_file(cn / "diffusion_pytorch_model.safetensors")[0], one)
    for model in (str(cn), read_dit_controlnet(cn), str(one)):
        with pytest.raises(SdengineError, match="Qwen") as e:
            sd1("x", controlnets=[ControlUnit(model, _picture(0, 64, 64))], steps=1, width=64, height=64,
                progress=False)  # fmt: skip
        assert "\n" not in str(e.value)


def test_cli_control_equals_the_pipeline_and_writes_the_unit(qwen, tmp_path):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters

    folder, pipe, _, cn, _ = qwen
    hint = tmp_path / "hint.png"
    _picture(8).save(hint)
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--steps", "2", "--width", str(SIZE)]
    args += ["--height", str(SIZE), "--cfg", "2", "--no-progress", "--out", str(out)]
    assert main([*args, "--control", f"none:{hint}:0.9", "--controlnet", str(cn)]) == 0
    made = next(out.glob("*.png"))
    fields = parse_parameters(Image.open(made).info["parameters"])
    assert "Weight: 0.9" in fields["ControlNet 0"], fields
    unit = ControlUnit(str(cn), Image.open(hint).convert("RGB"), scale=0.9)
    direct = pipe(PROMPT, cfg_scale=2.0, steps=2, seed=5, width=SIZE, height=SIZE, controlnets=[unit], progress=False)
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    # the inpainting ControlNet: --control-mask
    picture, mask, again = tmp_path / "picture.png", tmp_path / "mask.png", tmp_path / "again"
    _picture(9).save(picture)
    _mask().save(mask)
    control = ["--control", f"none:{picture}", "--controlnet", str(folder.parent / "qwen-cn-inpaint")]
    assert main([*args[:-1], str(again), *control, "--control-mask", str(mask)]) == 0
    unit = ControlUnit(str(folder.parent / "qwen-cn-inpaint"), Image.open(picture).convert("RGB"),
                       mask=Image.open(mask))  # fmt: skip
    direct = pipe(PROMPT, cfg_scale=2.0, steps=2, seed=5, width=SIZE, height=SIZE, controlnets=[unit], progress=False)
    assert np.array_equal(np.asarray(Image.open(next(again.glob("*.png")))), np.asarray(direct.images[0]))


def test_native_job_controlnets_equal_the_pipeline(qwen, tmp_path):
    import base64
    import io

    from PIL import Image

    from _comfy_live import live_client
    from _live_server import server_config, wait_job

    folder, pipe, _, cn, inpaint = qwen
    image, picture, mask = _picture(4), _picture(9), _mask()

    def b64(pic) -> str:
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=cn.parent)
    body = {"model": folder.name, "prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED, "steps": 2}
    body.update(width=SIZE, height=SIZE, cfg_scale=2.0)
    units = [
        {"model": cn.name, "image": b64(image), "weight": 0.8, "end": 0.5},
        {"model": inpaint.name, "image": b64(picture), "mask": b64(mask), "weight": 0.9},
    ]
    got = []
    with live_client(config, timeout=120) as (_, client):
        for unit in units:
            r = client.post("/v1/jobs", json={**body, "controlnets": [unit]})
            assert r.status_code == 202, r.text
            job = wait_job(client, r.json()["id"], timeout=120)
            assert job["state"] == "done", job
            data = client.get(job["images"][0]["url"]).content
            got.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    wants = [ControlUnit(str(cn), image, scale=0.8, end=0.5), ControlUnit(str(inpaint), picture, 0.9, mask=mask)]
    for arr, unit in zip(got, wants, strict=True):
        want = _ours(pipe, [unit], cfg=2.0, negative=NEGATIVE, steps=2)
        np.testing.assert_array_equal(arr, np.asarray(want.images[0].convert("RGB")))


def test_a1111_units_equal_the_pipeline(qwen, tmp_path):
    webuiapi = pytest.importorskip("webuiapi")
    from _live_server import live_server, server_config

    folder, pipe, _, cn, inpaint = qwen
    hint, picture, mask = _picture(6), _picture(9), _mask()
    with live_server(server_config(tmp_path, models_dir=folder.parent, controlnets_dir=cn.parent)) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", scheduler="Automatic")
        unit = webuiapi.ControlNetUnit(image=hint, module="none", model=cn.name, weight=0.8, guidance_end=0.7,
                                       resize_mode="Just Resize")  # fmt: skip
        r = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=9, steps=3, width=SIZE, height=SIZE,
                        cfg_scale=2, controlnet_units=[unit],
                        override_settings={"sd_model_checkpoint": folder.name})  # fmt: skip
        masked = webuiapi.ControlNetUnit(image=picture, mask=mask, module="none", model=inpaint.name, weight=0.9,
                                         resize_mode="Just Resize")  # fmt: skip
        r2 = api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=9, steps=3, width=SIZE, height=SIZE,
                         cfg_scale=2, controlnet_units=[masked],
                         override_settings={"sd_model_checkpoint": folder.name})  # fmt: skip
    inpainted = pipe(PROMPT, NEGATIVE, seed=9, steps=3, width=SIZE, height=SIZE, cfg_scale=2.0, sampler="euler",
                     schedule="normal", controlnets=[ControlUnit(str(inpaint), picture, 0.9, rule="a1111", mask=mask)],
                     progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(r2.image.convert("RGB")), np.asarray(inpainted.convert("RGB")))
    units = [ControlUnit(str(cn), hint, 0.8, 0.0, 0.7, rule="a1111")]
    want = pipe(PROMPT, NEGATIVE, seed=9, steps=3, width=SIZE, height=SIZE, cfg_scale=2.0, sampler="euler",
                schedule="normal", controlnets=units, progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.convert("RGB")))
    assert f'ControlNet 0: "Module: none, Model: {cn.name}, Weight: 0.8' in r.info["infotexts"][0]


def test_controlnets_on_qwen_image_edit_are_refused_in_one_line():
    from sdengine.pipeline.qwen_image import qwen_refusals
    from sdengine.pipeline.qwen_image_edit import edit_refusals
    from sdengine.pipeline.request import GenerationRequest

    units = [("Qwen-Image-ControlNet-Union", _picture(), 1.0)]
    assert qwen_refusals(GenerationRequest(prompt="a cat", controlnets=units)) == []
    reasons = edit_refusals(GenerationRequest(prompt="a cat", controlnets=units, reference_images=[_picture()]))
    assert reasons == ["ControlNets are not supported for Qwen-Image-Edit (Qwen-Image's run on Qwen-Image models)"]
