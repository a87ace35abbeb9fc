"""HyperTile on A1111's routes: its Hypertile U-Net options (``hypertile_enable_unet``, ``..._secondpass``,
``hypertile_max_tile_unet``, ``..._swap_size_unet``, ``..._max_depth_unet``) in ``override_settings`` and ``POST
/sdapi/v1/options`` become the job's ``hypertile`` (the pipeline's keywords are recorded), its infotext keys are read
back into those options (the VAE's too: tests/test_hypertile_vae.py), bad values are one-line 400s; the image is the
Python API's."""

from __future__ import annotations

import base64
import io
import json
import threading
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from _live_server import live_server, server_config, shared_loader

A1111_BODY = {"prompt": "a red apple", "seed": 3, "steps": 3, "width": 64, "height": 64, "cfg_scale": 7.0}
A1111_BODY |= {"sampler_name": "DPM++ 2M", "scheduler": "Karras"}
GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras", "cfg_scale": 7.0}


class Recorder:
    """The shared emoji pipeline, recording each call's keywords."""

    def __init__(self) -> None:
        self.pipe = shared_loader("emoji", "cpu")
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kw: Any) -> Any:
        with self.lock:
            self.calls.append(kw)
        return self.pipe(**kw)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    rec = Recorder()
    config = server_config(tmp_path_factory.mktemp("hypertile_server"))
    with live_server(config, loader=lambda ref, device: rec) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        yield rec, c


def _txt2img(c: httpx.Client, **extra: Any) -> tuple[np.ndarray, dict[str, Any]]:
    r = c.post("/sdapi/v1/txt2img", json={**A1111_BODY, **extra})
    assert r.status_code == 200, r.text
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
    return image, json.loads(r.json()["info"])


def _ht(kw: dict[str, Any]) -> tuple[Any, Any]:
    return kw.get("hypertile"), kw.get("hypertile_hires_only")


def test_override_settings_turn_hypertile_on(served) -> None:
    rec, c = served
    image, info = _txt2img(c, override_settings={"hypertile_enable_unet": True, "hypertile_swap_size_unet": 2})
    assert _ht(rec.calls[-1]) == ((256, 2, 3), False)
    want = shared_loader("emoji", "cpu")("a red apple", progress=False, hypertile=(256, 2, 3), **GEN)
    np.testing.assert_array_equal(image, np.asarray(want.images[0].convert("RGB")))
    text = info["infotexts"][0]
    assert text == want.infotexts[0] and "Hypertile U-Net: True, Hypertile U-Net swap size: 2" in text, text
    assert info["ignored"] == []
    # the second-pass switch alone: the hires fix's second pass only
    _txt2img(
        c,
        enable_hr=True,
        hr_scale=1.5,
        denoising_strength=0.5,
        override_settings={"hypertile_enable_unet_secondpass": True, "hypertile_max_tile_unet": 128.0},
    )
    assert _ht(rec.calls[-1]) == ((128, 3, 3), True)
    # both switches off (A1111's default): no HyperTile
    _txt2img(c, override_settings={"hypertile_max_depth_unet": 1})
    assert _ht(rec.calls[-1]) == (None, None)


def test_the_options_route_sets_hypertile_for_later_requests(served) -> None:
    rec, c = served
    got = c.get("/sdapi/v1/options").json()
    assert got["hypertile_enable_unet"] is False and got["hypertile_max_tile_unet"] == 256
    assert got["hypertile_enable_vae"] is False
    r = c.post("/sdapi/v1/options", json={"hypertile_enable_unet": True, "hypertile_max_depth_unet": 0})
    assert r.status_code == 200 and set(r.json()["applied"]) == {"hypertile_enable_unet", "hypertile_max_depth_unet"}
    try:
        _txt2img(c)
        assert _ht(rec.calls[-1]) == ((256, 3, 0), False)
        _txt2img(c, override_settings={"hypertile_enable_unet": False})  # a request's own switch wins
        assert _ht(rec.calls[-1]) == (None, None)
    finally:
        c.post("/sdapi/v1/options", json={"hypertile_enable_unet": False, "hypertile_max_depth_unet": 3})


def test_an_infotext_sets_the_hypertile_options(served) -> None:
    rec, c = served
    text = (
        "a red apple\nSteps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3, Size: 64x64, "
        "RNG: CPU, Hypertile U-Net: True, Hypertile U-Net max tile size: 192, Hypertile U-Net max depth: 2"
    )
    _txt2img(c, infotext=text)
    assert _ht(rec.calls[-1]) == ((192, 3, 2), False)
    r = c.post("/sdapi/v1/txt2img", json={**A1111_BODY, "infotext": text + ", Hypertile rule: comfyui"})
    assert r.status_code == 400 and "Hypertile rule" in r.json()["detail"] and "\n" not in r.json()["detail"]
    # A1111's Hypertile VAE is run (tests/test_hypertile_vae.py): this model's VAE has no middle attention to tile
    r = c.post("/sdapi/v1/txt2img", json={**A1111_BODY, "infotext": text + ", Hypertile VAE: True"})
    assert r.status_code == 400 and "hypertile_vae: HyperTile VAE tiles" in r.json()["detail"], r.text
    assert "\n" not in r.json()["detail"]


@pytest.mark.parametrize(
    "option,value,said",
    [
        ("hypertile_enable_unet", 1, "hypertile_enable_unet must be true or false, got 1"),
        ("hypertile_enable_unet_secondpass", "yes", "must be true or false"),
        ("hypertile_max_tile_unet", 4096, "hypertile_max_tile_unet must be a whole number in [0, 2048], got 4096"),
        ("hypertile_swap_size_unet", 2.5, "hypertile_swap_size_unet must be a whole number in [0, 128]"),
        ("hypertile_max_depth_unet", -1, "hypertile_max_depth_unet must be a whole number in [0, 10]"),
        ("hypertile_enable_vae", "yes", "hypertile_enable_vae must be true or false"),
    ],
)
def test_bad_hypertile_options_are_one_line_400s(served, option, value, said) -> None:
    _, c = served
    for r in (
        c.post("/sdapi/v1/txt2img", json={**A1111_BODY, "override_settings": {option: value}}),
        c.post("/sdapi/v1/options", json={option: value}),
    ):
        assert r.status_code == 400 and said in r.json()["detail"], r.text
        assert "\n" not in r.json()["detail"]
    assert c.get("/sdapi/v1/options").json()[option] in (False, 256, 3)  # nothing was set


def test_a_native_jobs_hypertile_gives_the_python_apis_image(served) -> None:
    """POST /v1/jobs with ``hypertile`` (ComfyUI's rule at 64x64: the emoji model's 16x16 latent in 2x2 tiles) is the
    Python API's image and infotext; null is the plain image."""
    from _live_server import wait_job

    rec, c = served
    body = {"prompt": "a red apple", **GEN}
    tiles = {"hypertile": [32, 1, 0], "hypertile_rule": "comfyui", "hypertile_scale_depth": False}

    def job(extra: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
        r = c.post("/v1/jobs", json={**body, **extra})
        assert r.status_code == 202, r.text
        j = wait_job(c, r.json()["id"], timeout=300)
        assert j["state"] == "done", j
        png = Image.open(io.BytesIO(c.get(j["images"][0]["url"]).content))
        return np.asarray(png.convert("RGB")), j

    got, j = job(tiles)
    assert _ht(rec.calls[-1]) == ((32, 1, 0), False)
    want = shared_loader("emoji", "cpu")(
        "a red apple", progress=False, **GEN, hypertile=(32, 1, 0), hypertile_rule="comfyui",
        hypertile_scale_depth=False,
    )  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    assert j["infotexts"][0] == want.infotexts[0] and "Hypertile rule: comfyui" in want.infotexts[0]
    plain, j = job({**tiles, "hypertile": None})
    assert not np.array_equal(plain, got) and "Hypertile" not in j["infotexts"][0]


@pytest.mark.parametrize(
    "extra,status,said",
    [
        ({"hypertile": [256, True, 3]}, 422, "hypertile"),
        ({"hypertile": [256, 3]}, 422, "hypertile"),
        ({"hypertile": [256, 3, 3], "hypertile_rule": "forge"}, 422, "hypertile_rule"),
        ({"hypertile": [256, 200, 3]}, 400, "hypertile swap_size must be a whole number in [0, 128], got 200"),
        ({"hypertile": [256, 3, 11]}, 400, "hypertile max_depth must be a whole number in [0, 10], got 11"),
    ],
)
def test_bad_native_hypertile_values_are_refused(served, extra, status, said) -> None:
    _, c = served
    r = c.post("/v1/jobs", json={"prompt": "a red apple", **GEN, **extra})
    assert r.status_code == status and said in r.text, r.text
    if status == 400:
        assert "\n" not in r.json()["detail"]
