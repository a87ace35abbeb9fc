"""``sdengine serve`` on SD3 / Flux diffusion-model files: the text encoders and VAE come from the folders.

BFL's layout (a Flux transformer alone in ``diffusion_models/``, ``clip_l`` and ``t5xxl`` in ``text_encoders/``,
``ae`` in ``--vaes-dir``), as Forge serves it: the native job's image equals ``load_pipeline(file, clip_l=, t5=,
vae=)``'s for the same settings; the A1111 route takes Forge's ``forge_additional_modules``; several files of a
kind without a choice, and a kind with no file, are one-line 400s.
"""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, one_line_400, run_job, server_config  # noqa: E402
from _sd3_models import make_sd3_folder, write_single_file  # noqa: E402
from test_comfy_sd3_flux import _clip_file, _save, save_comfy_files  # noqa: E402

PROMPT = "a red apple on a table"
W, H, STEPS, SEED = 48, 32, 3, 11
MODEL = "diffusion_models/flux1-tiny.safetensors"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(server, client, root): BFL's Flux files, and a second T5 in clip/ only a choice picks."""

    root = tmp_path_factory.mktemp("serve_dit_files")
    folder = make_flux_folder(root / "flux-folder", guidance=True)
    models = root / "models"
    save_comfy_files(folder, root, "diffusion_models/flux1-tiny.safetensors")
    config = server_config(root, models_dir=models, vaes_dir=root / "vaes")
    with live_server(config, loader=None) as server:  # the server's own loader: it fills the parts
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, root


def _reference(root, **kw) -> np.ndarray:
    models = root / "models"
    pipe = sdengine.load_pipeline(
        models / "diffusion_models" / "flux1-tiny.safetensors",
        device="cpu",
        clip_l=models / "text_encoders" / "clip_l.safetensors",
        t5=models / "text_encoders" / "t5xxl.safetensors",
        vae=root / "vaes" / "ae.safetensors",
    )
    with torch.no_grad():
        out = pipe(prompt=PROMPT, steps=STEPS, seed=SEED, width=W, height=H, **kw)
    return np.asarray(out.images[0].convert("RGB"))


def test_diffusion_model_files_are_listed_as_models(served):
    _, client, _ = served
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert listed[MODEL]["family"] == "flux"
    assert MODEL in {m["title"] for m in client.get("/sdapi/v1/sd-models").json()}
    # ComfyUI's checkpoint loader does not list them (UNETLoader does)
    ckpts = client.get("/object_info/CheckpointLoaderSimple").json()["CheckpointLoaderSimple"]
    assert MODEL not in ckpts["input"]["required"]["ckpt_name"][0]


def test_native_job_equals_load_pipeline_with_the_parts(served):
    _, client, root = served
    body = {"model": MODEL, "prompt": PROMPT, "steps": STEPS, "seed": SEED, "width": W, "height": H}
    pixels, job = run_job(client, body)
    want = _reference(root, sampler="euler", schedule="normal", cfg_scale=1.0)
    assert np.abs(pixels.astype(int) - want.astype(int)).max() == 0
    assert job["model"] == MODEL


def test_a1111_forge_additional_modules_choose_among_several(served):
    _, client, root = served
    models = root / "models"
    extra = models / "clip" / "t5xxl_other.safetensors"
    extra.parent.mkdir(exist_ok=True)
    shutil.copy(models / "text_encoders" / "t5xxl.safetensors", extra)
    try:
        body = {
            "prompt": PROMPT,
            "steps": STEPS,
            "seed": SEED,
            "width": W,
            "height": H,
            "cfg_scale": 1.0,
            "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": MODEL},
        }
        # two T5 files and no choice: a one-line 400 naming both
        one_line_400(client.post("/sdapi/v1/txt2img", json=body), "t5xxl.safetensors", "t5xxl_other.safetensors")
        r = client.post("/v1/jobs", json={"model": MODEL, "prompt": PROMPT, "steps": 1, "width": W, "height": H})
        one_line_400(r, "several", "modules")
        # Forge sends its own paths: the file name picks the module
        body["forge_additional_modules"] = [
            "D:\\forge\\models\\VAE\\ae.safetensors",
            "/forge/models/text_encoder/clip_l.safetensors",
            "t5xxl.safetensors",
        ]
        r = client.post("/sdapi/v1/txt2img", json=body)
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]))).convert("RGB"))
        want = _reference(root, sampler="euler", schedule="normal", cfg_scale=1.0, distilled_cfg_scale=3.5)
        assert np.abs(got.astype(int) - want.astype(int)).max() == 0
        # a module that is no such file, and two of one kind: 400s
        body["forge_additional_modules"] = ["nothing.safetensors"]
        one_line_400(client.post("/sdapi/v1/txt2img", json=body), "nothing.safetensors", "available")
        body["forge_additional_modules"] = ["t5xxl.safetensors", "t5xxl_other.safetensors"]
        one_line_400(client.post("/sdapi/v1/txt2img", json=body), "both T5-XXL")
    finally:
        extra.unlink()


def test_a_kind_without_a_file_is_a_one_line_400(served):
    _, client, root = served
    vae = root / "vaes" / "ae.safetensors"
    moved = root / "ae.safetensors"
    vae.rename(moved)
    try:
        r = client.post("/v1/jobs", json={"model": MODEL, "prompt": PROMPT, "steps": 1, "width": W, "height": H})
        one_line_400(r, "16-channel VAE", "--vaes-dir")
    finally:
        moved.rename(vae)


def test_openai_extra_body_modules(served):
    _, client, root = served
    models = root / "models"
    extra = models / "clip" / "t5xxl_other.safetensors"
    extra.parent.mkdir(exist_ok=True)
    shutil.copy(models / "text_encoders" / "t5xxl.safetensors", extra)
    try:
        body = {"model": MODEL, "prompt": PROMPT, "size": f"{W}x{H}", "seed": SEED, "steps": STEPS}
        r = client.post("/v1/images/generations", json=body)
        assert r.status_code == 400 and "t5xxl_other.safetensors" in r.json()["error"]["message"], r.text
        r = client.post("/v1/images/generations", json={**body, "modules": ["t5xxl.safetensors"]})
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB"))
        assert np.abs(got.astype(int) - _reference(root).astype(int)).max() == 0  # Flux's defaults on both
    finally:
        extra.unlink()


def test_sd3_file_without_its_encoders_takes_them_from_the_folders(tmp_path):
    """Stability's layout without text encoders (sd3.5_medium.safetensors): CLIP-L, bigG and the optional T5 from
    text_encoders/ (the tiny CLIPs, of one width, told apart by their names)."""
    from safetensors.torch import load_file

    folder = make_sd3_folder(tmp_path / "sd3-folder")
    models = tmp_path / "models"
    (models / "unet").mkdir(parents=True)
    file = write_single_file(folder, models / "unet" / "sd3-tiny.safetensors", clips=False, t5=False)
    enc = models / "text_encoders"
    _save(_clip_file(folder, "text_encoder"), enc / "clip_l.safetensors")
    _save(_clip_file(folder, "text_encoder_2"), enc / "clip_g.safetensors")
    _save(load_file(folder / "text_encoder_3" / "model.safetensors"), enc / "t5xxl.safetensors")
    with live_server(server_config(tmp_path, models_dir=models), loader=None) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            listed = {m["id"]: m["family"] for m in client.get("/v1/models").json()["data"]}
            assert listed["unet/sd3-tiny.safetensors"] == "sd3"
            body = {"model": "unet/sd3-tiny.safetensors", "prompt": PROMPT, "steps": STEPS, "seed": SEED}
            pixels, _ = run_job(client, {**body, "width": W, "height": H})
            bad = client.post("/v1/jobs", json={**body, "modules": ["clip_l.safetensors", "clip_l.safetensors", "x"]})
            one_line_400(bad, "'x'", "available: clip_l.safetensors, clip_g.safetensors, t5xxl.safetensors")
    pipe = sdengine.load_pipeline(
        file,
        device="cpu",
        clip_l=enc / "clip_l.safetensors",
        clip_g=enc / "clip_g.safetensors",
        t5=enc / "t5xxl.safetensors",
    )
    with torch.no_grad():
        want = pipe(prompt=PROMPT, seed=SEED, width=W, height=H, **pipe.family_defaults | {"steps": STEPS})
    assert np.abs(pixels.astype(int) - np.asarray(want.images[0].convert("RGB")).astype(int)).max() == 0
