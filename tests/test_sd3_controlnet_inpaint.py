"""SD3 inpainting ControlNets (Alimama's SD3-Controlnet-Inpainting: ``extra_conditioning_channels`` 1, the masked
picture's latent plus the inverted mask) against diffusers' ``StableDiffusion3ControlNetInpaintingPipeline`` on a
tiny random SD3 and a random inpainting ControlNet saved by diffusers: images on 0..1 pixels within TOL (mean
absolute difference), the single file as the folder, the mask's preparation, the CLI and native-job surfaces and
the refusals.

The oracle's VAE encodes the masked picture to its posterior's mean here, as sdengine does (diffusers draws a
sample from the global generator)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import sdengine  # noqa: E402
from _sd3_models import SIZE, diffusers_sd3, make_sd3_folder  # noqa: E402
from sdengine.errors import SdengineError  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from sdengine.pipeline.dit_control import control_mask_tensor  # noqa: E402
from sdengine.weights.io import save_safetensors  # noqa: E402

TOL = 1e-4  # mean absolute difference on 0..1 pixels
SEED = 5
PROMPT, NEGATIVE = "a cat on a bench", "blurry"


@pytest.fixture(autouse=True)
def _posterior_mean(monkeypatch):
    from diffusers.models.autoencoders import vae as dvae

    monkeypatch.setattr(dvae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def _controlnet(folder: Path, dst: Path, seed: int, **extra) -> Path:
    from diffusers import SD3ControlNetModel

    cfg = json.loads((folder / "transformer" / "config.json").read_text())
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    cfg.update({"num_layers": 2, **extra})
    cn = SD3ControlNetModel(**cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in cn.parameters():  # the zero-initialised projections too: the ControlNet must act
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    cn.save_pretrained(dst)
    return dst


def _picture(seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def _mask():
    from PIL import Image

    a = np.zeros((SIZE, SIZE), np.uint8)
    a[6:22, 10:30] = 255  # white: repaint (not on the 2x VAE's grid at the edges: the nearest pick matters)
    a[2, 3] = 200  # grey at or above 0.5 counts as masked, below it as kept
    a[3, 3] = 100
    return Image.fromarray(a, mode="L")


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd3inp")
    folder = make_sd3_folder(root / "tiny-sd3")
    inpaint = _controlnet(folder, root / "sd3-inpaint-cn", 31, extra_conditioning_channels=1)
    plain = _controlnet(folder, root / "sd3-cn", 32)
    return folder, sdengine.load_pipeline(folder, device="cpu"), diffusers_sd3(folder), inpaint, plain


def _theirs(ref, net: Path, **kw):
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetInpaintingPipeline

    pipe = StableDiffusion3ControlNetInpaintingPipeline(
        **ref.components, controlnet=SD3ControlNetModel.from_pretrained(net)
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator().manual_seed(SEED),
        output_type="np",
        width=SIZE,
        height=SIZE,
        **kw,
    ).images


def test_inpainting_controlnet_matches_diffusers(sd3):
    folder, pipe, ref, inpaint, _ = sd3
    image, mask = _picture(1), _mask()
    unit = ControlUnit(str(inpaint), image, scale=0.9, start=0.0, end=0.75, mask=mask)
    args = dict(steps=4, sampler="euler", cfg_scale=5.0, seed=SEED, width=SIZE, height=SIZE, progress=False)
    ours = pipe(PROMPT, NEGATIVE, controlnets=[unit], **args)
    theirs = _theirs(
        ref,
        inpaint,
        control_image=image,
        control_mask=mask,
        controlnet_conditioning_scale=0.9,
        control_guidance_start=0.0,
        control_guidance_end=0.75,
        num_inference_steps=4,
        guidance_scale=5.0,
    )
    diff = float(np.abs(ours.arrays.astype(np.float64) - theirs.astype(np.float64)).mean())
    print(f"inpainting ControlNet vs diffusers: mean abs difference {diff:.2e}")
    assert diff <= TOL
    # the mask is an input: another mask, another image
    other = ControlUnit(str(inpaint), image, scale=0.9, start=0.0, end=0.75, mask=mask.transpose(0))
    moved = pipe(PROMPT, NEGATIVE, controlnets=[other], **args)
    assert float(np.abs(moved.arrays - ours.arrays).mean()) > 10 * TOL  # measured 7.0e-3
    plain = pipe(PROMPT, NEGATIVE, **args)
    assert float(np.abs(plain.arrays - ours.arrays).mean()) > 100 * TOL


def test_resized_picture_and_grey_rgb_mask_match_diffusers(sd3):
    from PIL import Image

    folder, pipe, ref, inpaint, _ = sd3
    rng = np.random.default_rng(9)
    image = Image.fromarray((rng.random((40, 48, 3)) * 255).astype(np.uint8))  # resized to 32x32 (Lanczos)
    yy, xx = np.mgrid[0:40, 0:48]
    grey = ((xx + yy) * 255 / 86).astype(np.uint8)  # a ramp: the 0.5 cut after the resize decides
    mask = Image.fromarray(np.stack([grey, grey[::-1], grey], axis=2))  # RGB: made grey after the resize
    unit = ControlUnit(str(inpaint), image, scale=1.1, mask=mask)
    ours = pipe(
        PROMPT,
        NEGATIVE,
        controlnets=[unit],
        steps=3,
        sampler="euler",
        cfg_scale=4.5,
        seed=SEED,
        width=SIZE,
        height=SIZE,
        progress=False,
    )
    theirs = _theirs(
        ref,
        inpaint,
        control_image=image,
        control_mask=mask,
        controlnet_conditioning_scale=1.1,
        num_inference_steps=3,
        guidance_scale=4.5,
    )
    diff = float(np.abs(ours.arrays.astype(np.float64) - theirs.astype(np.float64)).mean())
    print(f"resized picture, RGB mask vs diffusers: mean abs difference {diff:.2e}")
    assert diff <= TOL


def test_single_file_runs_as_the_folder(sd3, tmp_path):
    from safetensors.torch import load_file

    folder, pipe, ref, _, _ = sd3
    # RMS q/k norms: a file's head width is read off them (without them it is taken as the releases' 64)
    inpaint = _controlnet(folder, tmp_path / "sd3-inpaint-qk", 33, extra_conditioning_channels=1, qk_norm="rms_norm")
    file = tmp_path / "sd3-inpaint.safetensors"
    save_safetensors(load_file(inpaint / "diffusion_pytorch_model.safetensors"), file)
    image, mask = _picture(2), _mask()
    args = dict(steps=2, seed=SEED, width=SIZE, height=SIZE, progress=False)
    a = pipe(PROMPT, controlnets=[ControlUnit(str(inpaint), image, mask=mask)], **args)
    b = pipe(PROMPT, controlnets=[ControlUnit(str(file), image, mask=mask)], **args)
    assert np.array_equal(a.arrays, b.arrays)


def test_mask_reads_as_diffusers_mask_processor():
    from diffusers.image_processor import VaeImageProcessor
    from PIL import Image

    rng = np.random.default_rng(7)
    rgb = Image.fromarray((rng.random((40, 52, 3)) * 255).astype(np.uint8))  # resized (Lanczos), then made grey
    proc = VaeImageProcessor(
        vae_scale_factor=8, do_resize=True, do_convert_grayscale=True, do_normalize=False, do_binarize=True
    )
    theirs = proc.preprocess(rgb, height=32, width=48)
    ours = control_mask_tensor(rgb, 48, 32)
    assert ours.shape == theirs.shape == (1, 1, 32, 48)
    assert torch.equal(ours, theirs.float())
    assert torch.equal(
        control_mask_tensor(torch.tensor([[0.2, 0.5], [0.7, 0.49]]), 2, 2)[0, 0], torch.tensor([[0.0, 1], [1, 0]])
    )


def test_cli_control_mask_equals_the_pipeline(sd3, tmp_path, capsys):
    from PIL import Image

    from sdengine.cli import main
    from sdengine.commands.generate import control_masks

    folder, pipe, _, inpaint, _ = sd3
    picture, mask = tmp_path / "picture.png", tmp_path / "mask.png"
    _picture(6).save(picture)
    _mask().save(mask)
    out = tmp_path / "out"
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--steps", "2", "--width", str(SIZE)]
    args += ["--height", str(SIZE), "--sampler", "euler", "--cfg", "5", "--no-progress", "--out", str(out)]
    control = ["--control", f"none:{picture}:0.9", "--controlnet", str(inpaint), "--control-mask", str(mask)]
    assert main([*args, *control]) == 0
    made = next(out.glob("*.png"))
    unit = ControlUnit(str(inpaint), Image.open(picture).convert("RGB"), scale=0.9, mask=Image.open(mask))
    direct = pipe(
        PROMPT,
        steps=2,
        seed=5,
        width=SIZE,
        height=SIZE,
        sampler="euler",
        cfg_scale=5.0,
        controlnets=[unit],
        progress=False,
    )
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    capsys.readouterr()
    assert main([*args, "--control-mask", str(mask)]) != 0  # without --control
    assert main([*args, *control, "--control-mask", str(mask)]) != 0  # two masks for one unit
    assert main([*args, *control[:4]]) != 0  # an inpainting ControlNet without its mask
    err = capsys.readouterr().err.strip().splitlines()
    assert any("needs --control/--controlnet" in e for e in err), err
    assert any("2 --control-mask for 1 --control" in e for e in err), err
    assert any("give the unit its mask" in e for e in err), err
    units = [ControlUnit("a", "x.png"), ControlUnit("b", "y.png")]
    kwargs = {"controlnets": units}
    control_masks(type("A", (), {"control_mask": ["m.png", "none"]})(), kwargs)
    assert [u.mask for u in kwargs["controlnets"]] == ["m.png", None]


def test_refusals_are_one_line(sd3, tiny_sd1_folder):
    folder, pipe, _, inpaint, plain = sd3
    image, mask = _picture(3), _mask()
    args = dict(steps=2, seed=SEED, width=SIZE, height=SIZE, progress=False)
    cases = [
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(inpaint), image)], **args), "give the unit its mask"),
        (
            lambda: pipe(PROMPT, controlnets=[ControlUnit(str(plain), image, mask=mask)], **args),
            "is not an inpainting ControlNet",
        ),
        (
            lambda: pipe(PROMPT, controlnets=[ControlUnit(str(inpaint), image, mask=[mask, mask])], **args),
            "takes one mask",
        ),
        (lambda: ControlUnit("reference_only", image, mask=mask), "reference units take none"),
    ]
    for run, message in cases:
        with pytest.raises(SdengineError, match=message) as e:
            run()
        assert "\n" not in str(e.value)
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    with pytest.raises(SdengineError, match="U-Net ControlNets take none"):
        sd1("x", controlnets=[ControlUnit("unused", _picture(), mask=mask)], steps=1, width=64, height=64)


def _b64(picture) -> str:
    import base64
    import io

    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_native_job_unit_mask(sd3, tmp_path):
    import io

    from PIL import Image

    from _comfy_live import live_client
    from _live_server import server_config, wait_job

    folder, pipe, _, inpaint, _ = sd3
    image, mask = _picture(4), _mask()
    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=inpaint.parent)
    body = {"model": folder.name, "prompt": PROMPT, "seed": SEED, "steps": 2, "width": SIZE, "height": SIZE}
    body.update(sampler="euler", cfg_scale=5.0, negative_prompt=NEGATIVE)
    unit = {"model": inpaint.name, "image": _b64(image), "mask": _b64(mask), "weight": 0.8}
    with live_client(config, timeout=120) as (_, client):
        r = client.post("/v1/jobs", json={**body, "controlnets": [unit]})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"], timeout=120)
        assert job["state"] == "done", job
        got = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB"))
        r = client.post("/v1/jobs", json={**body, "controlnets": [{**unit, "model": "reference_only"}]})
        assert r.status_code == 400 and "a mask is an SD3 inpainting ControlNet's" in r.json()["detail"], r.text
    want = pipe(
        PROMPT,
        NEGATIVE,
        sampler="euler",
        cfg_scale=5.0,
        seed=SEED,
        steps=2,
        width=SIZE,
        height=SIZE,
        controlnets=[ControlUnit(str(inpaint), image, scale=0.8, mask=mask)],
        progress=False,
    )
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
