"""Upscaler models (ESRGAN, Real-ESRGAN) of ``serve --upscalers-dir`` through the real ``webuiapi`` client (the
upscaler list, the extras, the hires fix and its infotext) and ComfyUI's UpscaleModelLoader and
ImageUpscaleWithModel, on a live server (the emoji model, few steps)."""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import webuiapi
from PIL import Image

from _live_server import live_server, server_config, shared_loader
from sdengine.models.esrgan import UpscalerSpec, build_upscaler, upscale_once, upscale_tensor
from sdengine.weights.upscaler_file import load_upscaler, save_upscaler

COMMON = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
COMPACT = UpscalerSpec("compact", 4, 3, 3, 8, 1)
X2 = UpscalerSpec("esrgan", 2, 3, 3, 8, 1, grow=4, unshuffle=2)


def _model(spec: UpscalerSpec, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_upscaler(spec)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5) if p.ndim == 4 else torch.randn_like(p) * 0.1 + 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("upscalers")
    folder = tmp / "upscalers"
    folder.mkdir()
    save_upscaler(_model(COMPACT, 1), folder / "4x-Tiny.pth")
    torch.save({"params_ema": _model(X2, 2).state_dict()}, folder / "RealESRGAN_x2plus.pth")
    (folder / "notes.txt").write_text("not a model")
    with live_server(server_config(tmp, upscalers_dir=folder)) as s:
        s.folder = folder  # type: ignore[attr-defined]
        yield s


@pytest.fixture()
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", scheduler="Automatic")


def gradient() -> Image.Image:
    a = np.zeros((24, 32, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 32)[None, :]
    a[..., 1] = np.linspace(0, 255, 24)[:, None]
    a[..., 2] = 90
    return Image.fromarray(a)


def test_upscalers_list_and_extras(api, server):
    names = [u["name"] for u in api.get_upscalers()]
    assert names == ["None", "Lanczos", "4x-Tiny", "RealESRGAN_x2plus"]
    g = gradient()
    tiny = load_upscaler(server.folder / "4x-Tiny.pth")
    r = api.extra_single_image(image=g, upscaler_1="4x-Tiny", upscaling_resize=4)
    assert r.image.size == (128, 96) and "Postprocess upscaler: 4x-Tiny" in r.info
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(upscale_once(tiny, g)))
    # A1111's name of its Real-ESRGAN x2 download; by 3: x2 twice (x4), then Lanczos down to the size
    r = api.extra_single_image(image=g, upscaler_1="R-ESRGAN 2x+", upscaling_resize=3)
    assert r.image.size == (96, 72)
    x2 = load_upscaler(server.folder / "RealESRGAN_x2plus.pth")
    want = upscale_once(x2, upscale_once(x2, g)).resize((96, 72), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want))
    # upscaler_2 blended in at its visibility
    r = api.extra_single_image(
        image=g, upscaler_1="4x-Tiny", upscaler_2="Lanczos", extras_upscaler_2_visibility=0.5, upscaling_resize=2
    )
    one = upscale_once(tiny, g).resize((64, 48), Image.Resampling.LANCZOS)
    two = g.resize((64, 48), Image.Resampling.LANCZOS)
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(Image.blend(one, two, 0.5)))
    for bad, msg in (
        ({"upscaler_1": "4x-Nope"}, "unknown upscaler '4x-Nope'"),
        ({"upscaler_1": "../4x-Tiny"}, "'..' is not allowed"),
        ({"upscaler_1": "notes.txt"}, "unknown upscaler"),
        ({"upscaler_1": "SwinIR 4x"}, "upscaler_1"),
    ):
        r = httpx.post(f"{api.baseurl}/extra-single-image", json={"image": webuiapi.raw_b64_img(g), **bad}, timeout=30)
        assert r.status_code == 400 and msg in r.text and "\\n" not in r.json()["detail"], r.text


def test_hires_fix_with_a_model_upscaler_equals_the_python_api_and_reads_back(api, server):
    r = api.txt2img(
        prompt="a red apple",
        seed=4,
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="4x-Tiny",
        denoising_strength=0.5,
        hr_second_pass_steps=2,
        **COMMON,
    )
    assert r.image.size == (128, 128)
    assert "Hires upscaler: 4x-Tiny" in r.info["infotexts"][0]
    pipe = shared_loader("emoji", "cpu")
    want = pipe(
        prompt="a red apple",
        seed=4,
        steps=3,
        width=64,
        height=64,
        cfg_scale=7.0,
        sampler="euler",
        schedule="uniform",  # A1111's "Automatic" for Euler (k-diffusion's get_sigmas)
        enable_hr=True,
        hr_scale=2,
        hr_upscaler="4x-Tiny",
        strength=0.5,
        strength_rule="a1111",
        hr_second_pass_steps=2,
        upscalers_dir=server.folder,
        progress=False,
    )
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), np.asarray(want.images[0]))
    # the infotext read back by the server (A1111's infotext field) makes the same image
    again = api.custom_post("txt2img", {"infotext": r.info["infotexts"][0]}, baseurl=True)
    np.testing.assert_array_equal(np.asarray(again.image.convert("RGB")), np.asarray(r.image.convert("RGB")))
    with pytest.raises(RuntimeError, match="400.*unknown upscaler .*4x-Nope.*4x-Tiny"):
        api.txt2img(prompt="x", seed=1, enable_hr=True, hr_upscaler="4x-Nope", **COMMON)


def _history(client: httpx.Client, prompt_id: str) -> dict:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        h = client.get(f"/history/{prompt_id}").json()
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(prompt_id)


def test_comfy_upscale_model_nodes(server):
    g = gradient()
    buf = io.BytesIO()
    g.save(buf, format="PNG")
    with httpx.Client(base_url=server.url, timeout=120) as c:
        info = c.get("/object_info/UpscaleModelLoader").json()["UpscaleModelLoader"]
        assert info["input"]["required"]["model_name"][0] == ["4x-Tiny.pth", "RealESRGAN_x2plus.pth"]
        assert info["output"] == ["UPSCALE_MODEL"]
        up = c.get("/object_info/ImageUpscaleWithModel").json()["ImageUpscaleWithModel"]
        assert list(up["input"]["required"]) == ["upscale_model", "image"] and up["output"] == ["IMAGE"]
        name = c.post("/upload/image", files={"image": ("g.png", buf.getvalue(), "image/png")}).json()["name"]
        graph = {
            "1": {"class_type": "LoadImage", "inputs": {"image": name}},
            "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "4x-Tiny.pth"}},
            "3": {"class_type": "ImageUpscaleWithModel", "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
            "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "up"}},
        }
        r = c.post("/prompt", json={"prompt": graph})
        assert r.status_code == 200, r.text
        h = _history(c, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
        im = h["outputs"]["4"]["images"][0]
        got = Image.open(io.BytesIO(c.get("/view", params={**im}).content)).convert("RGB")
        x = torch.from_numpy(np.asarray(g, np.float32) / 255).permute(2, 0, 1)[None]
        y = upscale_tensor(load_upscaler(server.folder / "4x-Tiny.pth"), x, tile=0).clamp(0, 1)
        want = (y[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        assert got.size == (128, 96)
        np.testing.assert_array_equal(np.asarray(got), want)
        bad = dict(graph)
        bad["2"] = {"class_type": "UpscaleModelLoader", "inputs": {"model_name": "notes.txt"}}
        r = c.post("/prompt", json={"prompt": bad})
        assert r.status_code == 400 and "notes.txt" in r.text, r.text


def test_the_native_upscaler_list_names_what_hr_upscaler_takes(server):
    """GET /v1/upscalers: the latent modes, None and Lanczos, then the folder's models (no path), each kind said."""
    from sdengine.pipeline.hires import LATENT_UPSCALERS

    got = httpx.get(f"{server.url}/v1/upscalers", timeout=60).json()["upscalers"]
    want = [(n, "latent") for n in LATENT_UPSCALERS] + [("None", "pixel"), ("Lanczos", "pixel")]
    want += [("4x-Tiny", "model"), ("RealESRGAN_x2plus", "model")]
    assert [(u["name"], u["kind"]) for u in got] == want
    assert str(server.folder) not in json.dumps(got)


def test_serve_refuses_a_missing_upscalers_dir(tmp_path: Path, capsys) -> None:
    from sdengine.cli import main

    rc = main(["serve", "--upscalers-dir", str(tmp_path / "nope"), "--outputs-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "--upscalers-dir" in err, err
