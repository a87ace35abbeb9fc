"""Qwen-Image through ``sdengine serve``: a live server whose models folder holds a tiny random Qwen-Image folder
(tests/_qwen_models.py). GET /v1/models tells the family "qwen_image" and its defaults before the model loads; a
native job gives the Python pipeline's image (equal pixels: the same code on the same CPU); what Qwen-Image refuses
is a one-line 400 before any job."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")

import httpx  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _qwen_models import make_qwen_folder  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 24


def _write_lora(pipe, path):
    """A random kohya-style LoRA (musubi-tuner's names, with alpha) on a few of the transformer's layers."""
    from sdengine.weights.io import save_safetensors

    g = torch.Generator().manual_seed(3)
    sd = {}
    for name in (
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.1.img_mod.1",
        "transformer_blocks.0.txt_mlp.net.2",
    ):
        m = pipe.transformer.get_submodule(name)
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(4, m.in_features, generator=g) * 0.3 / m.in_features**0.5
        sd[f"{key}.lora_up.weight"] = torch.randn(m.out_features, 4, generator=g) * 0.3
        sd[f"{key}.alpha"] = torch.tensor(2.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(sd, path)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serverqwen")


@pytest.fixture(scope="module")
def served(root):
    models = root / "models"
    make_qwen_folder(models / "tiny-qwen")
    pipe = sdengine.load_pipeline(models / "tiny-qwen", device="cpu")
    _write_lora(pipe, root / "loras" / "qwen-style.safetensors")
    with live_server(server_config(root, models_dir=models, loras_dir=root / "loras")) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipe


def test_models_list_the_qwen_family_and_defaults(served):
    _, client, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-qwen"]["family"] == "qwen_image"
    assert data["tiny-qwen"]["defaults"] == {"steps": 50, "cfg_scale": 4.0, "sampler": "euler", "schedule": "normal"}


def test_native_job_gives_the_pipelines_image(served):
    _, client, pipe = served
    job = {"model": "tiny-qwen", "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H}
    got, _ = run_job(client, {**job, "seed": 5})
    want = pipe(PROMPT, "blurry", **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))


def test_native_job_with_a_lora_gives_the_pipelines_image(served, root):
    """A native job's ``loras`` (a name from GET /v1/loras, a weight): the Python pipeline's image with that file,
    not the image without it."""
    _, client, pipe = served
    assert "qwen-style" in [e["name"] for e in client.get("/v1/loras").json()["loras"]]
    job = {"model": "tiny-qwen", "prompt": PROMPT, "steps": 3, "width": W, "height": H, "seed": 5}
    got, _ = run_job(client, {**job, "loras": [{"name": "qwen-style", "weight": 0.8}]})
    lora = root / "loras" / "qwen-style.safetensors"
    want = pipe(PROMPT, **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, loras=[(lora, 0.8)],
                progress=False)  # fmt: skip
    np.testing.assert_array_equal(got, np.asarray(want.images[0].convert("RGB")))
    plain = pipe(PROMPT, **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    assert not np.array_equal(got, np.asarray(plain.images[0].convert("RGB")))  # the LoRA acts


def test_what_qwen_refuses_is_a_one_line_400(served):
    _, client, _ = served
    base = {"model": "tiny-qwen", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    for extra, needle in (
        ({"distilled_cfg_scale": 4}, "distilled_cfg_scale"),
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "FreeU"),
        ({"pag_scale": 3.0}, "pag_scale"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message


def _b64_image(data: str):
    import base64
    import io

    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_a1111_txt2img_and_img2img_give_the_pipelines_images(served):
    _, client, pipe = served
    body = {"prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H, "seed": 7}
    body |= {"cfg_scale": 3, "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-qwen"}}
    r = client.post("/sdapi/v1/txt2img", json=body)
    assert r.status_code == 200, r.text
    image = _b64_image(r.json()["images"][0])
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, progress=False).images[0]
    np.testing.assert_array_equal(np.asarray(image.convert("RGB")), np.asarray(want.convert("RGB")))
    # img2img of that picture: diffusers' step count (int(steps x strength)), as the pipeline's img2img
    r = client.post(
        "/sdapi/v1/img2img", json={**body, "init_images": [r.json()["images"][0]], "denoising_strength": 0.7}
    )
    assert r.status_code == 200, r.text
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, init_image=image.convert("RGB"),
                strength=0.7, progress=False).images[0]  # fmt: skip
    got = _b64_image(r.json()["images"][0])
    np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(want.convert("RGB")))
