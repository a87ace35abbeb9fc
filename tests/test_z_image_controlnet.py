"""Z-Image's ControlNets (alibaba-pai's Z-Image-Turbo-Fun-Controlnet-Union as diffusers runs it) against diffusers'
ZImageControlNetModel + ZImageTransformer2DModel and its ZImageControlNetPipeline / ZImageControlNetInpaintPipeline,
on tiny random weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _z_image_models import Z_TRANSFORMER, perturb, z_transformer
from sdengine.control.dit_files import read_dit_controlnet
from sdengine.models.z_image import ZImageConfig, ZImageTransformer
from sdengine.models.z_image_controlnet import ZImageControlNet, ZImageControlNetConfig

KINDS = {
    "1.0": dict(control_layers_places=[0, 1], control_in_dim=16),
    "2.0": dict(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=33,
        add_control_noise_refiner="control_layers",
    ),
    "2.1": dict(
        control_layers_places=[0, 1],
        control_refiner_layers_places=[0, 1],
        control_in_dim=33,
        add_control_noise_refiner="control_noise_refiner",
    ),
}


def z_controlnet(seed: int, **cfg):
    """A tiny random diffusers ``ZImageControlNetModel`` for the transformer of ``_z_image_models`` (fp32, eval)."""
    import diffusers

    torch.manual_seed(seed)
    shape = {k: Z_TRANSFORMER[k] for k in ("dim", "n_refiner_layers", "n_heads", "n_kv_heads", "norm_eps", "qk_norm")}
    net = diffusers.ZImageControlNetModel(**shape, **cfg)
    return perturb(net, seed + 1).eval()


def save_controlnet(dst: Path, seed: int, **cfg) -> Path:
    z_controlnet(seed, **cfg).save_pretrained(dst)
    return dst


@pytest.mark.parametrize("kind", list(KINDS))
def test_residuals_and_the_transformer_with_them_match_diffusers(kind: str) -> None:
    """A batch of two with captions of different lengths (the shorter row masked), a 6 x 10 latent (60 tokens padded
    to 64), scale 0.6: the whole controlled transformer against diffusers' ControlNet + transformer."""
    ref = z_transformer(seed=1)
    cn = z_controlnet(5, **KINDS[kind])
    ours = ZImageTransformer(ZImageConfig.from_diffusers(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    net = ZImageControlNet(ZImageControlNetConfig.from_diffusers(dict(cn.config))).eval()
    net.load_state_dict(cn.state_dict(), strict=True)
    g = torch.Generator().manual_seed(3)
    latent = torch.randn(2, 16, 6, 10, generator=g)
    control = torch.randn(2, KINDS[kind]["control_in_dim"], 6, 10, generator=g)
    lengths = (7, 40)
    caps = [torch.randn(n, Z_TRANSFORMER["cap_feat_dim"], generator=g) for n in lengths]
    t = torch.tensor([0.3, 0.7865])
    import diffusers

    diffusers.ZImageControlNetModel.from_transformer(cn, ref)
    with torch.no_grad():
        xs = list(latent.unsqueeze(2).unbind(0))
        samples = cn(xs, t, caps, list(control.unsqueeze(2).unbind(0)), conditioning_scale=0.6)
        want = torch.stack(ref(xs, t, caps, controlnet_block_samples=samples, return_dict=False)[0]).squeeze(2)
        plain = torch.stack(ref(xs, t, caps, return_dict=False)[0]).squeeze(2)
    states = torch.zeros(2, max(lengths), Z_TRANSFORMER["cap_feat_dim"])
    mask = torch.zeros(2, max(lengths), dtype=torch.bool)
    for i, c in enumerate(caps):
        states[i, : len(c)], mask[i, : len(c)] = c, True
    with torch.no_grad():
        got = ours(latent, t, states, mask, control=lambda s, x: net(ours, s, x, control, 0.6))
    diff = (got - want).abs().max().item()
    print(f"{kind}: max abs difference {diff:.2e} (outputs up to {want.abs().max().item():.2f})")
    assert diff < 5e-6, diff
    assert (want - plain).abs().max().item() > 1e-2  # the ControlNet changes the output


# ----------------------------------------------------------------------------------------------------------
# The pipeline against diffusers' ZImageControlNetPipeline / ZImageControlNetInpaintPipeline

SIZE = 32  # 16 x 16 latents, 8 x 8 tokens
SEED = 7
PROMPT = "a red apple on a table"
TOL = 1e-4  # mean abs difference on 0..1 pixels


def _picture(seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8))


def _mask():
    from PIL import Image

    m = np.zeros((SIZE, SIZE), dtype=np.uint8)
    m[SIZE // 4 : 3 * SIZE // 4, SIZE // 8 : SIZE // 2] = 255
    return Image.fromarray(m)


@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    import sdengine
    from _z_image_models import make_z_folder

    root = tmp_path_factory.mktemp("zimagecn")
    folder = make_z_folder(root / "z-image-tiny")
    nets = {kind: save_controlnet(root / f"cn-{kind}", 40 + i, **KINDS[kind]) for i, kind in enumerate(KINDS)}
    return folder, sdengine.load_pipeline(folder, device="cpu"), nets


def _theirs(folder: Path, net: Path, *, scale: float, cfg: float, negative: str | None, steps: int = 3, **kw):
    import diffusers

    from _z_image_models import diffusers_z

    base = diffusers_z(folder)
    cn = diffusers.ZImageControlNetModel.from_pretrained(net)
    inpaint = "mask_image" in kw
    cls = diffusers.ZImageControlNetInpaintPipeline if inpaint else diffusers.ZImageControlNetPipeline
    pipe = cls(**base.components, controlnet=cn)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        return pipe(
            PROMPT,
            negative_prompt=negative,
            guidance_scale=cfg - 1.0,
            height=SIZE,
            width=SIZE,
            num_inference_steps=steps,
            controlnet_conditioning_scale=scale,
            generator=torch.Generator().manual_seed(SEED),
            output_type="np",
            **kw,
        ).images


def _ours(pipe, units, *, cfg: float, negative: str, steps: int = 3):
    return pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=steps, seed=SEED, width=SIZE, height=SIZE,
                controlnets=units, progress=False)  # fmt: skip


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    value = float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
    print(f"mean abs difference {value:.2e}")
    return value


@pytest.mark.parametrize(
    ("kind", "scale", "cfg", "negative"),
    [("1.0", 1.0, 1.0, ""), ("2.1", 0.6, 3.0, "blurry"), ("2.0", 0.6, 1.0, ""), ("1.0", 0.6, 4.0, "")],
)
def test_text_to_image_matches_diffusers(zimage, kind: str, scale: float, cfg: float, negative: str) -> None:
    """The folder by sdengine (its own prompt encoding) with one unit against ``ZImageControlNetPipeline``; a 2.x
    ControlNet without a mask reads zeros after the control latent."""
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    control = _picture(1)
    got = _ours(pipe, [ControlUnit(str(nets[kind]), control, scale)], cfg=cfg, negative=negative)
    want = _theirs(folder, nets[kind], scale=scale, cfg=cfg, negative=negative, control_image=control)
    assert _mad(got.arrays, want) < TOL
    plain = pipe(PROMPT, negative_prompt=negative, cfg_scale=cfg, steps=3, seed=SEED, width=SIZE, height=SIZE,
                 progress=False)  # fmt: skip
    assert _mad(plain.arrays, want) > 50 * TOL  # the ControlNet changes the image


@pytest.mark.parametrize(("scale", "cfg"), [(1.0, 3.0), (0.6, 1.0)])
def test_inpainting_matches_diffusers(zimage, scale: float, cfg: float) -> None:
    """A 2.1 unit with ``mask`` and ``inpaint_image`` against ``ZImageControlNetInpaintPipeline``."""
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    control, photo, mask = _picture(1), _picture(2), _mask()
    unit = ControlUnit(str(nets["2.1"]), control, scale, mask=mask, inpaint_image=photo)
    got = _ours(pipe, [unit], cfg=cfg, negative="blurry")
    want = _theirs(folder, nets["2.1"], scale=scale, cfg=cfg, negative="blurry", control_image=control, image=photo,
                   mask_image=mask)  # fmt: skip
    assert _mad(got.arrays, want) < TOL
    no_mask = _ours(pipe, [ControlUnit(str(nets["2.1"]), control, scale)], cfg=cfg, negative="blurry")
    assert _mad(no_mask.arrays, want) > 10 * TOL  # the mask and the picture are read


@pytest.mark.parametrize(
    ("release", "count", "refiner"),
    [("1.0", 6, None), ("2.0", 15, "control_layers"), ("2.1", 15, "control_noise_refiner")],
)
def test_single_file_reads_the_release_config(tmp_path, release: str, count: int, refiner) -> None:
    """VideoX-Fun's single files (diffusers' names), told apart as diffusers' single-file loader does: the places by
    the number of control blocks, 2.0 by its zero (or absent) ``control_noise_refiner.0.before_proj``; the loaded
    tensors are the file's."""
    from sdengine.weights.io import save_safetensors

    places = list(range(0, 30, 5)) if count == 6 else list(range(0, 30, 2))
    cfg = dict(control_layers_places=places, control_in_dim=16 if count == 6 else 33)
    if refiner is not None:
        cfg.update(control_refiner_layers_places=[0, 1], add_control_noise_refiner="control_noise_refiner")
    ref = z_controlnet(9, **cfg)
    tensors = {k: v.contiguous() for k, v in ref.state_dict().items()}
    if release == "2.0":  # the 2.0 file's refiner blocks are unused: zero before_proj
        tensors["control_noise_refiner.0.before_proj.weight"] = torch.zeros_like(
            tensors["control_noise_refiner.0.before_proj.weight"]
        )
    one = tmp_path / f"Z-Image-Turbo-Fun-Controlnet-Union-{release}.safetensors"
    save_safetensors(tensors, one)
    net = read_dit_controlnet(one)
    assert isinstance(net, ZImageControlNet)
    assert net.config.control_layers_places == tuple(places)
    assert net.config.add_control_noise_refiner == refiner
    assert net.config.control_refiner_layers_places == (None if refiner is None else (0, 1))
    assert (net.config.dim, net.config.n_heads, net.config.control_in_dim) == (64, 2, cfg["control_in_dim"])
    mine = net.state_dict()
    used = {k: v for k, v in tensors.items() if release != "2.0" or not k.startswith("control_noise_refiner.")}
    assert set(mine) == set(used)
    assert all(torch.equal(mine[k], used[k]) for k in used)


def test_refusals_are_one_line(zimage, tmp_path) -> None:
    from sdengine.errors import SdengineError
    from sdengine.pipeline.control import ControlUnit
    from sdengine.weights.io import save_safetensors

    folder, pipe, nets = zimage
    img = _picture(0)
    args = dict(steps=2, seed=SEED, width=SIZE, height=SIZE, progress=False)
    wide = save_controlnet(tmp_path / "deep", 3, control_layers_places=[0, 5], control_in_dim=16)
    odd = tmp_path / "odd.safetensors"
    save_safetensors({k: v.contiguous() for k, v in z_controlnet(4, **KINDS["1.0"]).state_dict().items()}, odd)
    cases = [
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(wide), img)], **args),
         "steers main layer 5; the Z-Image transformer has 2"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(odd), img)], **args),
         "with 2 control blocks: which main layers they steer is not in the file"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(nets["1.0"]), img, mask=_mask(), inpaint_image=img)],
                      **args), "reads no inpainting mask"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(nets["2.1"]), img, mask=_mask())], **args),
         "takes both its mask"),
        (lambda: ControlUnit(str(nets["2.1"]), img, inpaint_image=img), "needs its mask too"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(nets["1.0"]), img, union_mode="canny")], **args),
         "Z-Image ControlNets take no union_mode"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(nets["1.0"]), img, mode="prompt")], **args),
         "soft weighting"),
    ]  # fmt: skip
    for run, message in cases:
        with pytest.raises(SdengineError, match=message) as e:
            run()
        assert "\n" not in str(e.value)


def test_cli_control_equals_the_pipeline(zimage, tmp_path, capsys) -> None:
    """``--control`` / ``--controlnet`` (and ``--control-mask`` / ``--control-inpaint-image``) give the Python
    call's image; ``--control-inpaint-image`` without ``--control-mask``, or one per two ``--control``, is a one-line
    error."""
    from PIL import Image

    from sdengine.cli import main
    from sdengine.metadata import parse_parameters
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    hint, photo, mask = tmp_path / "hint.png", tmp_path / "photo.png", tmp_path / "mask.png"
    _picture(8).save(hint)
    _picture(9).save(photo)
    _mask().save(mask)
    args = ["generate", PROMPT, "--model", str(folder), "--seed", "5", "--steps", "2", "--width", str(SIZE)]
    args += ["--height", str(SIZE), "--cfg", "2", "--no-progress", "--out"]
    out, again = tmp_path / "out", tmp_path / "again"
    assert main([*args, str(out), "--control", f"none:{hint}:0.9", "--controlnet", str(nets["2.1"])]) == 0
    made = next(out.glob("*.png"))
    assert "Weight: 0.9" in parse_parameters(Image.open(made).info["parameters"])["ControlNet 0"]
    unit = ControlUnit(str(nets["2.1"]), Image.open(hint).convert("RGB"), scale=0.9)
    direct = pipe(PROMPT, cfg_scale=2.0, steps=2, seed=5, width=SIZE, height=SIZE, controlnets=[unit], progress=False)
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(direct.images[0]))
    control = ["--control", f"none:{hint}", "--controlnet", str(nets["2.1"]), "--control-mask", str(mask)]
    assert main([*args, str(again), *control, "--control-inpaint-image", str(photo)]) == 0
    unit = ControlUnit(str(nets["2.1"]), Image.open(hint).convert("RGB"), mask=Image.open(mask),
                       inpaint_image=Image.open(photo).convert("RGB"))  # fmt: skip
    inpainted = pipe(PROMPT, cfg_scale=2.0, steps=2, seed=5, width=SIZE, height=SIZE, controlnets=[unit],
                     progress=False)  # fmt: skip
    assert np.array_equal(np.asarray(Image.open(next(again.glob("*.png")))), np.asarray(inpainted.images[0]))
    assert not np.array_equal(np.asarray(inpainted.images[0]), np.asarray(direct.images[0]))
    capsys.readouterr()
    two = [*control[:4], *control, "--control-mask", str(mask)]  # two units, two masks
    for extra, needle in (
        ([*control[:4], "--control-inpaint-image", str(photo)], "--control-inpaint-image (a Z-Image inpainting"),
        ([*two, "--control-inpaint-image", str(photo)], "1 --control-inpaint-image for 2 --control"),
    ):
        assert main([*args, str(tmp_path / "no"), *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_native_job_controlnets_equal_the_pipeline(zimage, tmp_path) -> None:
    """A native job's ``controlnets`` on a Z-Image folder (a plain unit; an inpainting one with ``mask`` and
    ``inpaint_image``) give the Python call's image."""
    import base64
    import io

    from PIL import Image

    from _comfy_live import live_client
    from _live_server import server_config, wait_job
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    hint, photo, mask = _picture(4), _picture(9), _mask()

    def b64(pic) -> str:
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=nets["2.1"].parent)
    body = {"model": folder.name, "prompt": PROMPT, "negative_prompt": "blurry", "seed": SEED, "steps": 2}
    body.update(width=SIZE, height=SIZE, cfg_scale=2.0)
    name = nets["2.1"].name
    units = [
        {"model": name, "image": b64(hint), "weight": 0.8, "end": 0.5},
        {"model": name, "image": b64(hint), "mask": b64(mask), "inpaint_image": b64(photo), "weight": 0.9},
    ]
    got = []
    with live_client(config, timeout=120) as (_, client):
        for unit in units:
            r = client.post("/v1/jobs", json={**body, "controlnets": [unit]})
            assert r.status_code == 202, r.text
            job = wait_job(client, r.json()["id"], timeout=120)
            assert job["state"] == "done", (job.get("error"), job)
            data = client.get(job["images"][0]["url"]).content
            got.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
        # inpaint_image without its mask, and on a reference unit: a one-line 400 before a job
        for unit, needle in (
            ({"model": name, "image": b64(hint), "inpaint_image": b64(photo)}, "inpaint_image (Z-Image's inpainting"),
            ({"model": "reference_only", "image": b64(hint), "inpaint_image": b64(photo)}, "takes none"),
        ):
            r = client.post("/v1/jobs", json={**body, "controlnets": [unit]})
            assert r.status_code == 400, r.text
            message = r.json()["detail"]
            assert isinstance(message, str) and "\n" not in message and needle in message, message
        # mask + inpaint_image on a Union 1.0 ControlNet (16 control channels): the job fails in one line
        one = {"model": nets["1.0"].name, "image": b64(hint), "mask": b64(mask), "inpaint_image": b64(photo)}
        r = client.post("/v1/jobs", json={**body, "controlnets": [one]})
        assert r.status_code == 202, r.text
        job = wait_job(client, r.json()["id"], timeout=120)
        assert job["state"] == "failed" and "reads no inpainting mask" in job["error"], job
        assert "\n" not in job["error"]
    wants = [
        ControlUnit(str(nets["2.1"]), hint, scale=0.8, end=0.5),
        ControlUnit(str(nets["2.1"]), hint, 0.9, mask=mask, inpaint_image=photo),
    ]
    for arr, unit in zip(got, wants, strict=True):
        want = _ours(pipe, [unit], cfg=2.0, negative="blurry", steps=2)
        np.testing.assert_array_equal(arr, np.asarray(want.images[0].convert("RGB")))


def test_a1111_units_equal_the_pipeline(zimage, tmp_path) -> None:
    """sd-webui-controlnet's ``alwayson_scripts.controlnet.args`` on a Z-Image model (A1111's txt2img): the unit
    runs as the pipeline's with the extension's step rule (equal pixels); a unit's mask is listed as ignored (the
    extension has no picture to inpaint: Z-Image's inpainting units are the native job's); a soft control mode is
    a one-line 400."""
    import base64
    import io
    import json

    import httpx
    from PIL import Image

    from _live_server import live_server, server_config
    from sdengine.pipeline.control import ControlUnit

    folder, pipe, nets = zimage
    hint = _picture(6)

    def b64(pic) -> str:
        buf = io.BytesIO()
        pic.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode()

    unit = {"image": b64(hint), "module": "none", "model": nets["2.1"].name, "weight": 0.7, "guidance_end": 0.7,
            "resize_mode": "Just Resize"}  # fmt: skip
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": SIZE, "height": SIZE, "seed": 7,
            "cfg_scale": 3, "sampler_name": "Euler"}  # fmt: skip
    body["override_settings"] = {"sd_model_checkpoint": folder.name}
    config = server_config(tmp_path, models_dir=folder.parent, controlnets_dir=nets["2.1"].parent)
    with live_server(config) as server, httpx.Client(base_url=server.url, timeout=300) as client:

        def post(**extra):
            scripts = {"controlnet": {"args": [{**unit, **extra}]}}
            return client.post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": scripts})

        r = post()
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        masked = post(mask_image=b64(_mask()))
        assert masked.status_code == 200, masked.text
        soft = post(control_mode="My prompt is more important")
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=SIZE, height=SIZE, cfg_scale=3, progress=False,
                controlnets=[ControlUnit(str(nets["2.1"]), hint, 0.7, 0.0, 0.7, rule="a1111")]).images[0]  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want.convert("RGB")))
    plain = pipe(PROMPT, "blurry", steps=3, seed=7, width=SIZE, height=SIZE, cfg_scale=3, progress=False).images[0]
    assert not np.array_equal(got, np.asarray(plain.convert("RGB")))
    info = masked.json()["info"]
    print(json.loads(info).get("ignored"))
    again = np.asarray(Image.open(io.BytesIO(base64.b64decode(masked.json()["images"][0]))).convert("RGB"))
    np.testing.assert_array_equal(again, got)
    assert "controlnet.args[0].mask_image" in json.loads(info)["ignored"]
    assert soft.status_code == 400, soft.text
    message = soft.json()["detail"]
    assert isinstance(message, str) and "\n" not in message, message
    print(message)


def test_other_families_are_refused_in_one_line(zimage, tmp_path, tiny_sd1_folder) -> None:
    """A Flux ControlNet on Z-Image, a Z-Image ControlNet of another width, and a Z-Image ControlNet (its folder, the
    loaded network, its single file) on a Flux and an SD 1.x model."""
    import json

    import diffusers

    import sdengine
    from _flux_models import make_flux_folder
    from sdengine.errors import SdengineError
    from sdengine.pipeline.control import ControlUnit
    from sdengine.weights.io import load_file, save_safetensors

    folder, pipe, nets = zimage
    img = _picture(0)
    args = dict(steps=1, seed=SEED, width=SIZE, height=SIZE, progress=False)
    flux_folder = make_flux_folder(tmp_path / "tiny-flux")
    flux_cfg = json.loads((flux_folder / "transformer" / "config.json").read_text())
    flux_cfg = {k: v for k, v in flux_cfg.items() if not k.startswith("_") and k != "out_channels"}
    diffusers.FluxControlNetModel(**{**flux_cfg, "num_layers": 1, "num_single_layers": 1}).save_pretrained(
        tmp_path / "fcn"
    )
    shape = {k: Z_TRANSFORMER[k] for k in ("n_refiner_layers", "norm_eps", "qk_norm")}
    wide = tmp_path / "wide"
    diffusers.ZImageControlNetModel(dim=96, n_heads=3, n_kv_heads=3, **shape, **KINDS["1.0"]).save_pretrained(wide)
    one = tmp_path / "z_cn.safetensors"
    save_safetensors(load_file(nets["1.0"] / "diffusion_pytorch_model.safetensors")[0], one)
    flux = sdengine.load_pipeline(flux_folder, device="cpu")
    sd1 = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    cases = [
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(tmp_path / "fcn"), img)], **args),
         "is a Flux ControlNet; this model is Z-Image"),
        (lambda: pipe(PROMPT, controlnets=[ControlUnit(str(wide), img)], **args),
         "it has dim 96, the Z-Image transformer 64: not a ControlNet for this model"),
        (lambda: flux(PROMPT, controlnets=[ControlUnit(str(nets["1.0"]), img)], **args),
         "is a Z-Image ControlNet; this model is Flux"),
    ]  # fmt: skip
    for model in (str(nets["1.0"]), read_dit_controlnet(nets["1.0"]), str(one)):
        cases.append(
            (
                lambda m=model: sd1("x", controlnets=[ControlUnit(m, _picture(0))], **args),
                "Z-Image|ZImageControlNetModel",
            )
        )
    for run, message in cases:
        with pytest.raises(SdengineError, match=message) as e:
            run()
        print(e.value)
        assert "\n" not in str(e.value)
