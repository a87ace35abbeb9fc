"""``hypertile_vae`` and ``tiled_diffusion`` on OpenAI's image routes: the native job's newest fields sent with the
real ``openai`` client's ``extra_body`` (and as the edits form's text fields) give the native job's image
(POST /v1/jobs with the same fields); bad values are OpenAI's 400 with ``param`` the field."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from _live_server import live_server, run_job, server_config
from sdengine.weights import convert

EXTRA = {"seed": 3, "steps": 2, "sampler": "euler", "schedule": "karras"}  # 2 steps: the routes agree at any count
TILED = {"window": 6, "stride": 3, "view_batch": 2}  # 96x64 px: a 12x8 latent in overlapping 6x6 windows
VAE_TILES = [128, 1, 0]  # the tiny SD model's VAE middle attention at 256x256 in 2x2 tiles (A1111's rule)


@pytest.fixture(scope="module")
def server(tiny_sd1_folder, tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("openai_tiled")
    models = tmp / "models"
    models.mkdir()
    convert(tiny_sd1_folder, models / "tiny.safetensors")  # a VAE with middle attention (emoji's has none)
    with live_server(server_config(tmp, models_dir=models)) as s:
        yield s


@pytest.fixture()
def api(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)


@pytest.fixture()
def native(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generate(api: openai.OpenAI, model: str, size: str, **extra: Any) -> np.ndarray:
    r = api.images.generate(model=model, prompt="a red apple", size=size, extra_body={**EXTRA, **extra})
    return decode(r.data[0].b64_json)


def job(native: httpx.Client, model: str, width: int, height: int, **fields: Any) -> np.ndarray:
    body = {"model": model, "prompt": "a red apple", "width": width, "height": height, **EXTRA, **fields}
    return run_job(native, body)[0]


def refused(api: openai.OpenAI, **extra: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as e:
        generate(api, "emoji", "96x64", **extra)
    body: dict[str, Any] = e.value.body  # type: ignore[assignment]
    assert "\n" not in body["message"], body
    return body


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_tiled_diffusion_is_the_native_jobs(api, native, server) -> None:
    want = job(native, "emoji", 96, 64, tiled_diffusion=TILED)
    assert not np.array_equal(want, job(native, "emoji", 96, 64))  # MultiDiffusion changes this image
    np.testing.assert_array_equal(generate(api, "emoji", "96x64", tiled_diffusion=TILED), want)
    # the defaults for settings left out, as the native job's
    np.testing.assert_array_equal(
        generate(api, "emoji", "96x64", tiled_diffusion={**TILED, "circular": False, "method": "multidiffusion"}),
        want,
    )
    np.testing.assert_array_equal(generate(api, "emoji", "96x64", tiled_diffusion='{"window": 6, "stride": 3, '
                                           '"view_batch": 2}'), want)  # fmt: skip
    # the edits form: a JSON string, the native job's img2img with the same settings
    buf = io.BytesIO()
    init = Image.new("RGB", (96, 64), (250, 200, 40))
    init.save(buf, format="PNG")
    form = {"prompt": "a red apple", "model": "emoji", "size": "96x64", "strength": "0.6", "tiled_diffusion": (
        '{"window": 6, "stride": 3}'), **{k: str(v) for k, v in EXTRA.items()}}  # fmt: skip
    r = httpx.post(
        f"{server.url}/v1/images/edits", data=form, files={"image": ("i.png", buf.getvalue(), "image/png")}, timeout=300
    )
    assert r.status_code == 200, r.text
    init_b64 = base64.b64encode(buf.getvalue()).decode()
    want = job(native, "emoji", 96, 64, init_image=init_b64, strength=0.6, tiled_diffusion={"window": 6, "stride": 3})
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    assert not np.array_equal(want, job(native, "emoji", 96, 64, init_image=init_b64, strength=0.6))


@pytest.mark.slow  # ~35 s on a CPU: the tiny SD model at 256x256
def test_hypertile_vae_is_the_native_jobs(api, native) -> None:
    one = {"steps": 1}  # a 256x256 image (the smallest with two VAE tiles a side): one step is enough here
    want = job(native, "tiny", 256, 256, hypertile_vae=VAE_TILES, **one)
    plain = job(native, "tiny", 256, 256, **one)
    assert not np.array_equal(want, plain)  # the tiled VAE changes this image
    np.testing.assert_array_equal(generate(api, "tiny", "256x256", hypertile_vae=VAE_TILES, **one), want)
    np.testing.assert_array_equal(generate(api, "tiny", "256x256", hypertile_vae="128, 1, 0", **one), want)
    np.testing.assert_array_equal(generate(api, "tiny", "256x256", hypertile_vae="", **one), plain)  # "": off


@pytest.mark.parametrize(
    "field,value,said",
    [
        ("tiled_diffusion", {"window": 0}, "tiled_diffusion.window: Input should be greater than or equal to 1"),
        ("tiled_diffusion", {"window": "16"}, "tiled_diffusion.window: Input should be a valid integer"),
        ("tiled_diffusion", {"overlap": 8}, "tiled_diffusion.overlap: Extra inputs are not permitted"),
        ("tiled_diffusion", {"method": "mixture"}, "tiled_diffusion.method: Input should be 'multidiffusion'"),
        ("tiled_diffusion", {"circular": 1}, "tiled_diffusion.circular: Input should be a valid boolean"),
        ("tiled_diffusion", [6, 3], "tiled_diffusion must be an object {window, window_height, stride"),
        ("tiled_diffusion", "{window: 6}", "(not JSON)"),
        ("tiled_diffusion", {"window": 8, "stride": 16}, "tiled diffusion stride 16 is larger than the window"),
        ("hypertile_vae", [32, 1], "hypertile_vae must be three whole numbers [tile_size, swap_size, max_depth]"),
        ("hypertile_vae", "32,x,0", "hypertile_vae must be three whole numbers"),
        ("hypertile_vae", [32, True, 0], "hypertile_vae must be three whole numbers"),
        ("hypertile_vae", [32, 1, 99], "hypertile_vae max_depth"),
        ("hypertile_vae", VAE_TILES, "hypertile_vae: HyperTile VAE tiles"),  # emoji's VAE has no middle attention
    ],
)
def test_bad_values_are_a_400_with_their_param(api, field, value, said) -> None:
    if said.startswith("hypertile_vae: "):  # checked up front once a worker holds the model (the job fails later)
        generate(api, "emoji", "64x64", steps=1)
    body = refused(api, **{field: value})
    assert body["param"] == field and said in body["message"], body
