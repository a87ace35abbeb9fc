"""Z-Image through ``sdengine serve`` on ComfyUI's three files (``diffusion_models/z_image_turbo_*.safetensors`` in the
original layout, ``text_encoders/qwen_3_4b.safetensors`` with Qwen2's tokenizer beside it as ``qwen25_tokenizer/``,
``--vaes-dir``'s ``ae.safetensors`` in BFL's names), paired by ``server.dit_parts`` as FLUX.2 [klein]'s and
Qwen-Image's are, and on a diffusers folder. Both written from one tiny random folder (``tests/_z_image_models.py``,
128-wide heads: a single file's config assumes them).

Listed by GET /v1/models (family ``z_image``, Turbo's defaults) and GET /sdapi/v1/sd-models; a native job, A1111's
txt2img / img2img / inpainting (through the real ``webuiapi`` client) and OpenAI's generations / edits (through the
real ``openai`` client) give the Python call's image (equal pixels: the same code on the same CPU), the Python API
loading the same three files (``load_pipeline(file, qwen_text=, vae=)``) or the folder. A missing part is a one-line
400 before any job."""

from __future__ import annotations

import base64
import io
import shutil

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
openai = pytest.importorskip("openai")
webuiapi = pytest.importorskip("webuiapi")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

import sdengine  # noqa: E402
from _live_server import live_server, one_line_400, run_job, server_config  # noqa: E402
from _pipeline_models import picture  # noqa: E402
from _webpage import chromium  # noqa: E402
from _z_image_models import make_z_folder  # noqa: E402
from test_comfy_sd3_flux import _ldm_vae  # noqa: E402
from test_z_image_files import original_layout  # noqa: E402

PROMPT = "a red apple on a table"
W, H = 32, 48  # the tiny VAE's 2x, 2x2 patches: multiples of 4
FILES = "diffusion_models/z_image_turbo_tiny.safetensors"
FOLDER = "tiny-z"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_z_files")
    models, vaes = root / "models", root / "vaes"
    folder = make_z_folder(models / FOLDER, wide_heads=True)
    for sub in ("diffusion_models", "text_encoders"):
        (models / sub).mkdir()
    vaes.mkdir()
    model = models / FILES
    save_file(original_layout(load_file(next((folder / "transformer").glob("*.safetensors")))), model)
    text = models / "text_encoders" / "qwen_3_4b.safetensors"
    save_file(load_file(next((folder / "text_encoder").glob("*.safetensors"))), text)
    shutil.copytree(folder / "tokenizer", models / "text_encoders" / "qwen25_tokenizer")
    vae = vaes / "ae.safetensors"
    save_file({k: v.contiguous() for k, v in _ldm_vae(folder).items()}, vae)
    pipes = {
        FILES: sdengine.load_pipeline(model, device="cpu", qwen_text=text, vae=vae),
        FOLDER: sdengine.load_pipeline(folder, device="cpu"),
    }
    config = server_config(root, models_dir=models, vaes_dir=vaes)
    with live_server(config, loader=None) as server:  # the server's own loader: it pairs the files
        with httpx.Client(base_url=server.url, timeout=300) as client:
            yield server, client, pipes, {"vae": vae, "model": model}


def _rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode()


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _box_mask() -> tuple[Image.Image, np.ndarray]:
    m = np.zeros((H, W), np.uint8)
    m[8:40, 4:28] = 255
    return Image.fromarray(m, "L"), m > 127


def test_the_files_are_listed_with_the_family_and_turbos_defaults(served):
    _, client, _, _ = served
    listed = {m["id"]: m for m in client.get("/v1/models").json()["data"]}
    for name in (FILES, FOLDER):
        assert listed[name]["family"] == "z_image", name
        assert listed[name]["defaults"] == {"steps": 9, "cfg_scale": 1.0, "sampler": "euler", "schedule": "normal"}
    a1111 = {m["model_name"] for m in client.get("/sdapi/v1/sd-models").json()}
    assert {FILES, FOLDER} <= a1111
    # the text encoder and the VAE are parts, not models
    assert not any("qwen_3_4b" in n or "ae.safetensors" in n for n in a1111), a1111


def test_native_and_a1111_txt2img_on_the_files_give_the_python_apis_image(served):
    server, client, pipes, _ = served
    pipe = pipes[FILES]
    job = {"model": FILES, "prompt": PROMPT, "negative_prompt": "blurry", "steps": 3, "width": W, "height": H}
    got, record = run_job(client, {**job, "seed": 5})
    want = pipe(PROMPT, "blurry", **{**pipe.family_defaults, "steps": 3}, seed=5, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, _rgb(want.images[0]))
    assert record["model"] == FILES
    got, _ = run_job(client, {**job, "seed": 6, "cfg_scale": 3})
    want = pipe(PROMPT, "blurry", steps=3, cfg_scale=3, seed=6, width=W, height=H, progress=False)
    np.testing.assert_array_equal(got, _rgb(want.images[0]))
    # the folder the files were written from gives the same image (float numbers within 1e-6)
    plain = pipes[FOLDER](PROMPT, "blurry", steps=3, cfg_scale=3, seed=6, width=W, height=H, progress=False)
    assert np.abs(got.astype(int) - _rgb(plain.images[0]).astype(int)).max() <= 1
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    r = api.txt2img(prompt=PROMPT, negative_prompt="blurry", steps=3, width=W, height=H, seed=7, cfg_scale=3,
                    override_settings={"sd_model_checkpoint": FILES})  # fmt: skip
    want = pipe(PROMPT, "blurry", steps=3, seed=7, width=W, height=H, cfg_scale=3, progress=False).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))


@pytest.mark.parametrize("model", [FILES, FOLDER])
def test_a1111_img2img_and_inpainting_give_the_python_calls_image(served, model):
    """A1111's img2img through ``webuiapi`` (``image_cfg_scale=None``: InstructPix2Pix's, which the flow families
    refuse): without a mask the Python img2img call's image (diffusers' step rule, ``int(steps x strength)``, as on
    the other flow models); with one ("original" masked content, no blur, "whole picture") the Python inpainting call's
    image inside the mask and the init image outside it (A1111's overlay); "only masked" keeps the outside too."""
    server, _, pipes, _ = served
    pipe = pipes[model]
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler")
    init, (mask, inside) = picture(W, H, seed=5), _box_mask()
    common = {"prompt": PROMPT, "steps": 4, "width": W, "height": H, "seed": 7, "cfg_scale": 2, "image_cfg_scale": None}
    common |= {"negative_prompt": "blurry", "override_settings": {"sd_model_checkpoint": model}}
    call = {"steps": 4, "seed": 7, "width": W, "height": H, "cfg_scale": 2, "init_image": init, "progress": False}
    r = api.img2img(images=[init], denoising_strength=0.6, **common)
    want = pipe(PROMPT, "blurry", strength=0.6, **call).images[0]
    np.testing.assert_array_equal(_rgb(r.image), _rgb(want))
    inpaint = {"mask_image": mask, "mask_blur": 0, "inpainting_fill": 1, "inpaint_full_res": False}
    r = api.img2img(images=[init], denoising_strength=0.8, **inpaint, **common)
    want = pipe(PROMPT, "blurry", strength=0.8, mask=mask, **call).images[0]
    got = _rgb(r.image)
    np.testing.assert_array_equal(got[inside], _rgb(want)[inside])
    np.testing.assert_array_equal(got[~inside], _rgb(init)[~inside])
    assert np.abs(got[inside].astype(int) - _rgb(init)[inside].astype(int)).mean() > 1  # repainted
    r = api.img2img(images=[init], denoising_strength=0.8, **{**inpaint, "inpaint_full_res": True}, **common)
    got = _rgb(r.image)
    np.testing.assert_array_equal(got[~inside], _rgb(init)[~inside])
    assert np.abs(got[inside].astype(int) - _rgb(init)[inside].astype(int)).mean() > 1


@pytest.mark.parametrize("model", [FILES, FOLDER])
def test_openai_generations_and_edits_give_the_python_calls_image(served, model):
    """``/v1/images/generations`` (Turbo's defaults under what is sent); ``/v1/images/edits`` without a mask:
    img2img at OpenAI's strength 0.75; with a mask (alpha 0 = repaint): inpainting at strength 1."""
    server, _, pipes, _ = served
    pipe = pipes[model]
    api = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    r = api.images.generate(model=model, prompt=PROMPT, size=f"{W}x{H}", extra_body={"seed": 8, "steps": 2})
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pipe(PROMPT, **{**pipe.family_defaults, "steps": 2}, seed=8, width=W, height=H, progress=False).images[0]
    np.testing.assert_array_equal(_rgb(got), _rgb(want))
    init = picture(W, H, seed=6)
    r = api.images.edit(model=model, image=("a.png", _png(init), "image/png"), prompt=PROMPT, size=f"{W}x{H}",
                        extra_body={"seed": 4, "steps": 4})  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pipe(PROMPT, **{**pipe.family_defaults, "steps": 4}, seed=4, width=W, height=H, init_image=init,
                strength=0.75, progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(_rgb(got), _rgb(want))
    mask, inside = _box_mask()
    alpha = np.where(inside, 0, 255).astype(np.uint8)  # OpenAI's mask: transparent = edit
    rgba = Image.fromarray(np.dstack([np.zeros((H, W, 3), np.uint8), alpha]), "RGBA")
    r = api.images.edit(model=model, image=("a.png", _png(init), "image/png"), mask=("m.png", _png(rgba), "image/png"),
                        prompt=PROMPT, size=f"{W}x{H}", extra_body={"seed": 4, "steps": 3})  # fmt: skip
    got = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    want = pipe(PROMPT, **{**pipe.family_defaults, "steps": 3}, seed=4, width=W, height=H, init_image=init,
                mask=mask, strength=1.0, progress=False).images[0]  # fmt: skip
    np.testing.assert_array_equal(_rgb(got), _rgb(want))


def test_a_missing_part_or_a_refused_setting_is_a_one_line_400(served):
    """A missing VAE or tokenizer or an unknown module before a job; what Z-Image refuses (FreeU; Forge's distilled
    guidance on A1111's route), the model loaded or not (the family told from the file's header)."""
    _, client, _, paths = served
    body = {"model": FILES, "prompt": PROMPT, "steps": 1, "width": W, "height": H}
    one_line_400(client.post("/v1/jobs", json={**body, "freeu": [1.1, 1.2, 0.9, 0.2]}), "FreeU")
    a1111 = {"prompt": PROMPT, "steps": 1, "width": W, "height": H, "distilled_cfg_scale": 4}
    one_line_400(client.post("/sdapi/v1/txt2img", json={**a1111, "override_settings": {"sd_model_checkpoint": FILES}}),
                 "distilled_cfg_scale applies to FLUX.1 [dev] models only")  # fmt: skip
    moved = paths["vae"].with_name("away.bin")
    paths["vae"].rename(moved)
    try:
        one_line_400(client.post("/v1/jobs", json=body), "needs a 16-channel VAE file", "--vaes-dir")
    finally:
        moved.rename(paths["vae"])
    tokenizer = paths["model"].parent.parent / "text_encoders" / "qwen25_tokenizer"
    away = tokenizer.with_name("tokenizer_away")
    shutil.move(tokenizer, away)
    try:
        one_line_400(
            client.post("/v1/jobs", json=body), "Qwen2's tokenizer beside its text encoder", "qwen25_tokenizer"
        )
    finally:
        shutil.move(away, tokenizer)
    r = client.post("/v1/jobs", json={**body, "modules": ["nope.safetensors"]})
    one_line_400(r, "module 'nope.safetensors' is no text encoder")


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_the_web_page_takes_the_files_defaults_and_gives_the_apis_image(served, browser):
    """The page (headless Chromium, as tests/test_webui_dit.py's Z-Image folder case) on the three files: Turbo's
    defaults (no CFG), the U-Net sections hidden, and the image shown is the native API's for the same body."""
    from test_webui import WAIT_MS, api_image, open_page, shown_image, wait_result
    from test_webui_dit import U_NET_ONLY

    server, client, _, _ = served
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(WAIT_MS)
    try:
        open_page(page, server.url)
        page.select_option("#model", FILES)
        for sel in U_NET_ONLY:
            assert page.is_hidden(sel), sel
        assert page.is_hidden("#distilled_cfg_scale") and page.is_hidden("#shift")
        assert page.input_value("#cfg_scale") == "1"  # (the page keeps the steps the user set, any family)
        chosen = {"sampler": page.input_value("#sampler"), "schedule": page.input_value("#schedule")}
        page.fill("#prompt", PROMPT)
        page.fill("#negative_prompt", "")
        for sel, value in (("#steps", "2"), ("#seed", "5"), ("#width", str(W)), ("#height", str(H))):
            page.fill(sel, value)
        page.click("#generate")
        params = wait_result(page)
        body = {"model": FILES, "prompt": PROMPT, "steps": 2, "seed": 5, "width": W, "height": H}
        expected, infotext = api_image(client, body | chosen | {"cfg_scale": 1.0})
        np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
        assert params == infotext
    finally:
        context.close()
    assert not errors, errors  # no uncaught JavaScript error on the page
