"""FLUX.2 [klein] through ``sdengine serve``: a live server whose models folder holds two tiny random klein folders
(tests/_flux2_models.py), one step-distilled and one base. GET /v1/models tells the family "flux2" and each kind's
defaults before the model loads; a native job (with reference images too: klein edit; with an init image and a
mask: inpainting), A1111's txt2img and img2img (inpainting with A1111's overlay) through the real ``webuiapi``
client and OpenAI's generations through the real ``openai`` client give the Python pipeline's image (equal pixels:
the same code on the same CPU); what FLUX.2 refuses is a one-line 400 before any job."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _flux2_models import make_klein_folder  # noqa: E402
from _live_server import live_server, run_job, server_config  # noqa: E402
from _pipeline_models import picture  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48  # the tiny VAE's 4x, 2x2 patches: multiples of 8


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serverklein")
    models = root / "models"
    make_klein_folder(models / "tiny-klein", seed=1, distilled=True)
    make_klein_folder(models / "tiny-klein-base", seed=2)
    pipes = {name: sdengine.load_pipeline(models / name, device="cpu") for name in ("tiny-klein", "tiny-klein-base")}
    loras = root / "loras"
    loras.mkdir()
    g = torch.Generator().manual_seed(0)
    lora = {}  # a random LoRA in diffusers' names on every Linear of the transformer
    for name, m in pipes["tiny-klein"].transformer.named_modules():
        if isinstance(m, torch.nn.Linear):
            lora[f"transformer.{name}.lora_A.weight"] = torch.randn(2, m.in_features, generator=g) * 0.2
            lora[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, 2, generator=g) * 0.2
    save_file(lora, loras / "klein-style.safetensors")
    # a FLUX.2 transformer file (its marker tensor is enough: the load stops at the missing text encoder)
    save_file({"single_stream_modulation.lin.weight": torch.zeros(6, 2)}, models / "flux-2-klein-4b.safetensors")
    with live_server(server_config(root, models_dir=models, loras_dir=loras)) as server:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipes, loras


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_models_list_the_flux2_family_and_each_kinds_defaults(served):
    _, client, _, _ = served
    data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    assert data["tiny-klein"]["family"] == data["tiny-klein-base"]["family"] == "flux2"
    assert data["tiny-klein"]["defaults"] == {"steps": 4, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
    assert data["flux-2-klein-4b.safetensors"]["family"] == "flux2"
    assert data["flux-2-klein-4b.safetensors"]["defaults"]["steps"] == 4  # distilled, by BFL's name
    assert data["tiny-klein-base"]["defaults"] == {
        "steps": 50,
        "cfg_scale": 4.0,
        "sampler": "euler",
        "schedule": "normal",
    }


def test_what_flux2_refuses_is_a_one_line_400(served):
    """Before the model loads (its refusals without the model) on every route; A1111's reference images too."""
    _, client, _, _ = served
    base = {"model": "tiny-klein", "prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 1}
    for extra, needle in (
        ({"cfg_scale": 3}, "is step-distilled (is_distilled) and runs without CFG"),
        ({"distilled_cfg_scale": 4}, "distilled_cfg_scale"),
        ({"freeu": [1.1, 1.2, 0.9, 0.2]}, "FreeU"),
        ({"pag_scale": 3.0}, "pag_scale"),
        ({"hires": {"hr_scale": 2}}, "the hires fix is not supported for FLUX.2"),
    ):
        r = client.post("/v1/jobs", json={**base, **extra})
        assert r.status_code == 400, (extra, r.status_code, r.text)
        message = r.json()["detail"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message
    png = io.BytesIO()
    picture(W, H).save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    a1111 = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "cfg_scale": 1}
    a1111 |= {"override_settings": {"sd_model_checkpoint": "tiny-klein"}}
    for route, extra, needle in (
        ("img2img", {"init_images": [b64], "resize_mode": 3}, "init_latent_resize: A1111's latent upscale is not"),
        ("txt2img", {"reference_images": [b64]}, "on POST /v1/jobs (reference_images)"),
    ):
        r = client.post(f"/sdapi/v1/{route}", json={**a1111, **extra})
        assert r.status_code == 400, (route, r.status_code, r.text)
        message = r.json()["detail"] if "detail" in r.json() else r.json()["error"]
        assert isinstance(message, str) and "\n" not in message and needle in message, message


def test_a_single_file_without_its_parts_is_a_one_line_400(served):
    _, client, _, _ = served
    job = {"model": "flux-2-klein-4b.safetensors", "prompt": PROMPT, "width": W, "height": H}
    r = client.post("/v1/jobs", json=job)
    assert r.status_code == 400, r.text
    message = r.json()["detail"]
    assert "needs a Qwen3 text encoder file: put one in text_encoders/" in message and "\n" not in message, message


def test_single_files_with_their_parts_from_the_folders(tmp_path):
    """ComfyUI's three files (diffusion_models/flux-2-klein-4b.safetensors, text_encoders/qwen_3_4b.safetensors with
    the tokenizer beside it, --vaes-dir's flux2-vae.safetensors): listed, and a native job gives
    load_pipeline(file, qwen_text=, vae=)'s image."""
    import shutil

    from safetensors.torch import load_file

    from _flux2_models import FILE_TRANSFORMER, FILE_VAE
    from test_flux2_files import bfl_layout, comfy_vae_layout

    folder = make_klein_folder(tmp_path / "klein", seed=7, distilled=True, transformer=FILE_TRANSFORMER, vae=FILE_VAE)
    models, vaes = tmp_path / "models", tmp_path / "vaes"
    for sub in ("diffusion_models", "text_encoders"):
        (models / sub).mkdir(parents=True)
    vaes.mkdir()
    net = load_file(next((folder / "transformer").glob("*.safetensors")))
    save_file(bfl_layout(net, "model.diffusion_model."), models / "diffusion_models" / "flux-2-klein-4b.safetensors")
    te = load_file(next((folder / "text_encoder").glob("*.safetensors")))
    save_file({k: v.contiguous() for k, v in te.items()}, models / "text_encoders" / "qwen_3_4b.safetensors")
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = load_file(next((folder / "vae").glob("*.safetensors")))
    save_file(comfy_vae_layout(vae), vaes / "flux2-vae.safetensors")
    name = "diffusion_models/flux-2-klein-4b.safetensors"
    job = {"model": name, "prompt": PROMPT, "steps": 2, "seed": 3, "width": W, "height": H}
    with live_server(server_config(tmp_path, models_dir=models, vaes_dir=vaes), loader=None) as server:  # its own
        with httpx.Client(base_url=server.url, timeout=300) as client:
            data = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
            assert data[name]["family"] == "flux2" and data[name]["defaults"]["steps"] == 4
            got, _ = run_job(client, job)
    text = models / "text_encoders" / "qwen_3_4b.safetensors"
    pipe = sdengine.load_pipeline(models / name, device="cpu", qwen_text=text, vae=vaes / "flux2-vae.safetensors")
    want = pipe(PROMPT, steps=2, seed=3, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(got, _rgb(want))
    plain = sdengine.load_pipeline(folder, device="cpu")(PROMPT, steps=2, seed=3, width=W, height=H).images[0]
    # the folder the files were written from: float numbers within 2.1e-6 (the split q / k / v are views of the
    # fused tensor), here one pixel of 4608 one level off
    assert np.abs(got.astype(int) - _rgb(plain).astype(int)).max() <= 1


def test_native_jobs_give_the_pipelines_image(served):
    """A base model with CFG and a negative prompt; a distilled one with a reference image (klein edit)."""
    _, client, pipes, _ = served
    job = {"model": "tiny-klein-base", "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "cfg_scale": 3}
    got, _ = run_job(client, {**job, "width": W, "height": H, "seed": 5})
    want = pipes["tiny-klein-base"](
        PROMPT, "blurry", steps=3, cfg_scale=3, sampler="euler", schedule="normal", seed=5, width=W, height=H
    )
    np.testing.assert_array_equal(got, _rgb(want.images[0]))
    ref = picture(72, 64)
    png = io.BytesIO()
    ref.save(png, format="PNG")
    b64 = base64.b64encode(png.getvalue()).decode()
    got, _ = run_job(
        client, {"model": "tiny-klein", "prompt": PROMPT, "steps": 2, "seed": 6, "reference_images": [b64]}
    )
    want = pipes["tiny-klein"](PROMPT, steps=2, seed=6, reference_images=[ref], progress=False)
    assert want.images[0].size == (72, 64)  # the reference's size (no size given)
    np.testing.assert_array_equal(got, _rgb(want.images[0]))


def test_native_jobs_with_a_lora_give_the_pipelines_image(served):
    """A native job's ``loras`` (a name of the LoRA folder, a weight), and a ``<lora:...>`` tag inside the prompt:
    the Python pipeline's image with that file, not the image without it."""
    _, client, pipes, loras = served
    job = {"model": "tiny-klein", "steps": 2, "seed": 9, "width": W, "height": H}
    got, _ = run_job(client, {**job, "prompt": PROMPT, "loras": [{"name": "klein-style", "weight": 0.7}]})
    pipe = pipes["tiny-klein"]
    want = pipe(PROMPT, steps=2, seed=9, width=W, height=H, loras=[(loras / "klein-style.safetensors", 0.7)])
    np.testing.assert_array_equal(got, _rgb(want.images[0]))
    plain = pipe(PROMPT, steps=2, seed=9, width=W, height=H, progress=False)
    assert np.abs(got.astype(int) - _rgb(plain.images[0]).astype(int)).mean() > 1  # the LoRA acts
    tagged = "a red apple <lora:klein-style:0.7> on a table"  # (the server takes the tag out, the text around stays)
    got, _ = run_job(client, {**job, "prompt": tagged})
    want = pipe(tagged, steps=2, seed=9, width=W, height=H, lora_dir=loras, progress=False)
    np.testing.assert_array_equal(got, _rgb(want.images[0]))


def test_a1111_txt2img_through_webuiapi_gives_the_pipelines_image(served):
    """webuiapi sends A1111's cfg_scale 7 for every model: on a step-distilled klein it is listed as ignored and the
    image is the one of no CFG; a base model takes it."""
    server, _, pipes, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    common = {"prompt": PROMPT, "steps": 2, "width": W, "height": H, "seed": 7}
    r = api.txt2img(**common, override_settings={"sd_model_checkpoint": "tiny-klein"})
    assert "cfg_scale" in r.info.get("ignored", []), r.info
    want = pipes["tiny-klein"](PROMPT, steps=2, seed=7, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))
    r = api.txt2img(
        **common, negative_prompt="blurry", cfg_scale=3, override_settings={"sd_model_checkpoint": "tiny-klein-base"}
    )
    want = pipes["tiny-klein-base"](
        PROMPT, "blurry", steps=2, cfg_scale=3, sampler="euler", schedule="normal", seed=7, width=W, height=H
    ).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))


def test_openai_generations_give_the_pipelines_image(served):
    server, _, pipes, _ = served
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    r = api.images.generate(model="tiny-klein", prompt=PROMPT, size=f"{W}x{H}", extra_body={"seed": 8, "steps": 2})
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json))).convert("RGB"))
    want = pipes["tiny-klein"](PROMPT, steps=2, seed=8, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(got, _rgb(want))


def test_openai_edit_with_reference_images_is_klein_edit(served):
    """OpenAI's ``/v1/images/edits`` with ``reference_images: true`` (extra_body) on a klein model: the images are
    klein edit's references, fitted by FLUX.2's rule (size "auto": the reference's fitted size)."""
    server, _, pipes, _ = served
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    ref = picture(76, 64, seed=2)
    png = io.BytesIO()
    ref.save(png, format="PNG")
    extra = {"reference_images": True, "seed": 4, "steps": 2}
    r = api.images.edit(
        model="tiny-klein", image=("a.png", png.getvalue(), "image/png"), prompt=PROMPT, extra_body=extra
    )
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pipes["tiny-klein"](PROMPT, steps=2, seed=4, reference_images=[ref], progress=False).images[0]
    assert got.size == want.size == (72, 64)  # FLUX.2's rule: floored to the size step
    np.testing.assert_array_equal(_rgb(got), _rgb(want))


def _b64png(image: Image.Image) -> str:
    png = io.BytesIO()
    image.save(png, format="PNG")
    return base64.b64encode(png.getvalue()).decode()


def _box_mask() -> tuple[Image.Image, np.ndarray]:
    m = np.zeros((H, W), np.uint8)
    m[8:40, 4:28] = 255
    return Image.fromarray(m, "L"), m > 127


def test_native_inpainting_job_gives_the_pipelines_image(served):
    """A native job with ``init_image``, ``mask`` and ``strength`` (FLUX.2 inpainting, diffusers'
    Flux2KleinInpaintPipeline's rules): the Python call's image; without the mask, img2img's."""
    _, client, pipes, _ = served
    init, (mask, _) = picture(W, H, seed=3), _box_mask()
    job = {"model": "tiny-klein-base", "prompt": PROMPT, "steps": 3, "cfg_scale": 2, "seed": 4, "width": W, "height": H}
    job |= {"init_image": _b64png(init), "strength": 0.6}
    call = {"steps": 3, "cfg_scale": 2, "sampler": "euler", "schedule": "normal", "seed": 4, "width": W, "height": H}
    call |= {"init_image": init, "strength": 0.6, "progress": False}
    got, _ = run_job(client, {**job, "mask": _b64png(mask)})
    want = pipes["tiny-klein-base"](PROMPT, mask=mask, **call).images[0]
    np.testing.assert_array_equal(got, _rgb(want))
    got2, _ = run_job(client, job)
    want = pipes["tiny-klein-base"](PROMPT, **call).images[0]
    np.testing.assert_array_equal(got2, _rgb(want))
    assert np.abs(got.astype(int) - got2.astype(int)).mean() > 1  # the mask acts


def test_a1111_img2img_through_webuiapi_gives_the_pipelines_image(served):
    """A1111's img2img on a distilled klein through ``webuiapi`` (``image_cfg_scale=None``: InstructPix2Pix's, which
    the flow families refuse, as the other DiT families' tests send it): without a mask the Python img2img call's image;
    with one ("original" masked content, no blur, "whole picture") the Python inpainting call's image inside the
    mask and the init image outside it (A1111's overlay)."""
    server, _, pipes, _ = served
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    init, (mask, inside) = picture(W, H, seed=5), _box_mask()
    common = {"prompt": PROMPT, "steps": 3, "width": W, "height": H, "seed": 7, "cfg_scale": 1, "image_cfg_scale": None}
    common |= {"override_settings": {"sd_model_checkpoint": "tiny-klein"}}
    call = {"steps": 3, "seed": 7, "width": W, "height": H, "init_image": init, "progress": False}
    r = api.img2img(images=[init], denoising_strength=0.6, **common)
    want = pipes["tiny-klein"](PROMPT, strength=0.6, **call).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))
    inpaint = {"mask_image": mask, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    r = api.img2img(images=[init], denoising_strength=0.6, **inpaint, **common)
    want = pipes["tiny-klein"](PROMPT, strength=0.6, mask=mask, **call).images[0]
    got = _rgb(r.image)
    np.testing.assert_array_equal(got[inside], _rgb(want)[inside])
    np.testing.assert_array_equal(got[~inside], _rgb(init)[~inside])
    # "only masked" (A1111's inpaint_full_res, webuiapi's default): the box around the mask inpainted at the size
    # asked and pasted back: the init image outside the mask
    r = api.img2img(images=[init], denoising_strength=0.6, **{**inpaint, "inpaint_full_res": True}, **common)
    got = _rgb(r.image)
    np.testing.assert_array_equal(got[~inside], _rgb(init)[~inside])
    assert np.abs(got[inside].astype(int) - _rgb(init)[inside].astype(int)).mean() > 1


def test_openai_edit_without_reference_images_is_img2img(served):
    """OpenAI's ``/v1/images/edits`` without ``reference_images: true``: FLUX.2 img2img of the image (OpenAI's
    strength 0.75), the Python call's image."""
    server, _, pipes, _ = served
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    init = picture(W, H, seed=6)
    png = io.BytesIO()
    init.save(png, format="PNG")
    r = api.images.edit(model="tiny-klein", image=("a.png", png.getvalue(), "image/png"), prompt=PROMPT,
                        size=f"{W}x{H}", extra_body={"seed": 4, "steps": 3})  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pipes["tiny-klein"](PROMPT, steps=3, seed=4, width=W, height=H, init_image=init, strength=0.75).images[0]
    np.testing.assert_array_equal(_rgb(got), _rgb(want))
