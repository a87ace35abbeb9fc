"""Z-Image's hires fix (a latent and a pixel upscaler) and a LoRA through ``sdengine serve``'s native (``POST
/v1/jobs``) and A1111 (``/sdapi/v1/txt2img`` through the real ``webuiapi`` client) routes, against the Python call
on the same tiny random Z-Image folder (``tests/_z_image_models.py``) and a tiny random Z-Image LoRA (the layout of
``tests/test_lora_z_image.py``): equal pixels (the same code on the same CPU)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
webuiapi = pytest.importorskip("webuiapi")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _z_image_models import make_z_folder  # noqa: E402
from test_lora_z_image import _layout, _pairs, _write  # noqa: E402

PROMPT, NEG = "a red apple on a table", "blurry"
W, H = 32, 48
FOLDER, LORA = "tiny-z", "zlora"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_z_hires")
    models, loras = root / "models", root / "loras"
    folder = make_z_folder(models / FOLDER)
    pipe = sdengine.load_pipeline(folder, device="cpu")
    lora = _write(_layout(_pairs(pipe.transformer, seed=1), "diffusers"), loras / f"{LORA}.safetensors")
    config = server_config(root, models_dir=models, loras_dir=loras)
    with live_server(config, loader=None) as server, httpx.Client(base_url=server.url, timeout=300) as client:
        yield server, client, pipe, lora


def _rgb(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


HIRES = [("Latent", 1.5), ("Lanczos", 1.5)]


@pytest.mark.parametrize(("upscaler", "scale"), HIRES, ids=["latent", "lanczos"])
def test_native_and_a1111_hires_fix_give_the_python_calls_image(served, upscaler, scale):
    server, client, pipe, _ = served
    call = dict(steps=3, width=W, height=H, cfg_scale=2.0, progress=False)
    hr = dict(enable_hr=True, hr_scale=scale, hr_upscaler=upscaler, hr_second_pass_steps=2)
    body = {"model": FOLDER, "prompt": PROMPT, "negative_prompt": NEG, "steps": 3, "width": W, "height": H}
    body |= {"cfg_scale": 2.0, "seed": 5, "strength": 0.6, "sampler": "euler", "schedule": "normal"}
    body["hires"] = {"hr_scale": scale, "hr_upscaler": upscaler, "hr_second_pass_steps": 2}
    got, record = run_job(client, body)
    want = pipe(PROMPT, NEG, seed=5, strength=0.6, sampler="euler", schedule="normal", **hr, **call)
    assert got.shape == (int(H * scale), int(W * scale), 3)
    np.testing.assert_array_equal(got, _rgb(want.images[0]))
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    r = api.txt2img(prompt=PROMPT, negative_prompt=NEG, steps=3, width=W, height=H, seed=7, cfg_scale=2.0,
                    enable_hr=True, hr_scale=scale, hr_upscaler=upscaler, hr_second_pass_steps=2,
                    denoising_strength=0.6, override_settings={"sd_model_checkpoint": FOLDER})  # fmt: skip
    want = pipe(PROMPT, NEG, seed=7, strength=0.6, sampler="euler", **hr, **call)  # the flow models' step rule
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want.images[0]))


def test_native_and_a1111_lora_give_the_python_calls_image(served):
    """The native ``loras`` field and a ``<lora:NAME:W>`` tag (native and A1111's prompt): the Python call's image
    with ``loras=`` and with the same tag (``lora_dir``). The tag at the prompt's end leaves a space the server once
    kept, which Qwen3's tokenizer reads (15 and 19 levels off); it is dropped as the pipeline drops it."""
    server, client, pipe, lora = served
    call = dict(steps=3, width=W, height=H, cfg_scale=2.0, progress=False, sampler="euler", schedule="normal")
    body = {"model": FOLDER, "prompt": PROMPT, "negative_prompt": NEG, "steps": 3, "width": W, "height": H}
    body |= {"cfg_scale": 2.0, "seed": 5, "sampler": "euler", "schedule": "normal"}
    got, _ = run_job(client, {**body, "loras": [{"name": LORA, "weight": 0.8}]})
    want = _rgb(pipe(PROMPT, NEG, seed=5, loras=[(lora, 0.8)], **call).images[0])
    np.testing.assert_array_equal(got, want)
    tagged = f"{PROMPT} <lora:{LORA}:0.8>"
    np.testing.assert_array_equal(run_job(client, {**body, "prompt": tagged})[0], want)
    np.testing.assert_array_equal(_rgb(pipe(tagged, NEG, seed=5, lora_dir=lora.parent, **call).images[0]), want)
    plain, _ = run_job(client, body)
    assert np.abs(plain.astype(int) - got.astype(int)).mean() > 1  # the LoRA changed the image
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    r = api.txt2img(prompt=tagged, negative_prompt=NEG, steps=3, width=W, height=H, seed=7, cfg_scale=2.0,
                    override_settings={"sd_model_checkpoint": FOLDER})  # fmt: skip
    want = pipe(PROMPT, NEG, seed=7, loras=[(lora, 0.8)], **call).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))
    assert r.info["infotexts"][0].startswith(tagged + "\nNegative prompt: blurry\n")
