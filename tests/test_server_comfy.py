"""ComfyUI API-format workflows on a live ``sdengine serve`` (127.0.0.1, the emoji model, 64x64, few steps).

ComfyUI's own example clients (script_examples/basic_api_example.py and websockets_api_example.py,
their functions as they are, pointed at the test server) run the default workflow; hand-written API-format
workflows give the native API's images for the same settings; broken workflows give ComfyUI's error shape
naming the node. Seed mapping: native ``seed`` S = KSampler ``seed`` S (one image); img2img and inpainting
also set ``extra_data.sdengine.seed_rule = "sdengine"`` (the pipeline's draw order, see docs/comfyui.md).
"""

from __future__ import annotations

import io
import json
import math
import re
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import websocket  # websocket-client, what ComfyUI's example uses
from PIL import Image, ImageDraw

from _live_server import live_server, server_config, shared_loader, wait_job

STEPS = 3  # the splits at step 2 (KSamplerAdvanced, SplitSigmas) still leave a step after them
SEED = 11


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    from sdengine.pipeline import BUILTIN_SD

    tmp = tmp_path_factory.mktemp("comfy")
    make_vaes_dir(tmp / "vaes")
    # --tiny-vae: the emoji model's own tiny VAE, which VAELoader then offers as "taesd"
    config = server_config(tmp, max_queue=8, tiny_vae=BUILTIN_SD["emoji"] / "vae_tiny", vaes_dir=tmp / "vaes")
    with live_server(config) as s:
        yield s


def make_vaes_dir(root: Path) -> Path:
    """--vaes-dir: the emoji model's VAE folder as it is ("emoji-vae"), and with its last convolution's bias
    raised ("emoji-vae-bright"), so that a decode through it is told apart; and a file that is not a VAE."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sdengine.pipeline import BUILTIN_SD

    shutil.copytree(BUILTIN_SD["emoji"] / "vae", root / "emoji-vae")
    shutil.copytree(BUILTIN_SD["emoji"] / "vae", root / "emoji-vae-bright")
    weights = root / "emoji-vae-bright" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["decoder.conv_out.bias"] = sd["decoder.conv_out.bias"] + 0.3
    save_file(sd, weights)
    save_file({"x": torch.zeros(2)}, root / "not-a-vae.safetensors")
    return root


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def wait_history(client: httpx.Client, prompt_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = client.get(f"/history/{prompt_id}").json()
        if prompt_id in h:
            return h[prompt_id]
        time.sleep(0.05)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def native_image(client: httpx.Client, **body) -> np.ndarray:
    r = client.post("/v1/jobs", json={"width": 64, "height": 64, "steps": STEPS, "seed": SEED, **body})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["state"] == "done", job
    return np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)).convert("RGB"))


def comfy_image(client: httpx.Client, prompt: dict, **extra) -> np.ndarray:
    r = client.post("/prompt", json={"prompt": prompt, **extra})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    (out,) = [o for o in h["outputs"].values() if "images" in o]
    im = out["images"][0]
    v = client.get("/view", params={"filename": im["filename"], "subfolder": im["subfolder"], "type": im["type"]})
    assert v.status_code == 200 and v.headers["x-content-type-options"] == "nosniff"
    return np.asarray(Image.open(io.BytesIO(v.content)).convert("RGB"))


def txt2img_graph(
    prompt="a red apple",
    negative="",
    sampler="dpmpp_2m",
    scheduler="karras",
    cfg=5.0,
    latent=("5", 0),
    model=("4", 0),
    clip=("4", 1),
    denoise=1.0,
) -> dict:
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": list(clip)}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": list(clip)}},
        "3": {
            "class_type": "KSampler",
            "inputs": {
                "seed": SEED,
                "steps": STEPS,
                "cfg": cfg,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "denoise": denoise,
                "model": list(model),
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": list(latent),
            },
        },
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "test", "images": ["8", 0]}},
    }


def upload(client: httpx.Client, im: Image.Image, name: str) -> tuple[str, str]:
    """(native upload id, ComfyUI input file name)"""
    data = png_bytes(im)
    native = client.post("/v1/uploads", files={"file": (name, data, "image/png")})
    comfy = client.post("/upload/image", files={"image": (name, data, "image/png")}, data={"overwrite": "true"})
    assert native.status_code == 201 and comfy.status_code == 200, (native.text, comfy.text)
    assert comfy.json()["type"] == "input"
    return native.json()["id"], comfy.json()["name"]


def picture() -> Image.Image:
    im = Image.new("RGB", (64, 64), (240, 230, 200))
    d = ImageDraw.Draw(im)
    d.ellipse((12, 12, 52, 52), fill=(200, 30, 30), outline=(20, 20, 20), width=3)
    return im


# ------------------------------------------------------------------------------- ComfyUI's example clients


def test_comfyui_example_clients_run_the_default_workflow(server, client):
    server_address = f"127.0.0.1:{server.port}"
    client_id = str(uuid.uuid4())

    # ---- websockets_api_example.py, its functions as they are
    def queue_prompt(prompt):
        p = {"prompt": prompt, "client_id": client_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request("http://{}/prompt".format(server_address), data=data)  # noqa: UP032
        return json.loads(urllib.request.urlopen(req).read())

    def get_image(filename, subfolder, folder_type):
        data = {"filename": filename, "subfolder": subfolder, "type": folder_type}
        url_values = urllib.parse.urlencode(data)
        with urllib.request.urlopen("http://{}/view?{}".format(server_address, url_values)) as response:  # noqa: UP032
            return response.read()

    def get_history(prompt_id):
        with urllib.request.urlopen("http://{}/history/{}".format(server_address, prompt_id)) as response:  # noqa: UP032
            return json.loads(response.read())

    events: list[str] = []
    previews: list[bytes] = []

    def get_images(ws, prompt):
        prompt_id = queue_prompt(prompt)["prompt_id"]
        output_images = {}
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                events.append(message["type"])
                if message["type"] == "executing":
                    data = message["data"]
                    if data["node"] is None and data["prompt_id"] == prompt_id:
                        break  # Execution is done
            else:
                previews.append(out)
                continue  # previews are binary data

        history = get_history(prompt_id)[prompt_id]
        for node_id in history["outputs"]:
            node_output = history["outputs"][node_id]
            if "images" in node_output:
                images_output = []
                for image in node_output["images"]:
                    image_data = get_image(image["filename"], image["subfolder"], image["type"])
                    images_output.append(image_data)
            output_images[node_id] = images_output
        return output_images

    default_workflow = txt2img_graph(
        prompt="masterpiece best quality girl", negative="bad hands", sampler="euler", scheduler="normal", cfg=8
    )
    default_workflow["3"]["inputs"]["seed"] = 8566257
    prompt = json.loads(json.dumps(default_workflow))
    prompt["6"]["inputs"]["text"] = "masterpiece best quality man"
    prompt["3"]["inputs"]["seed"] = 5

    ws = websocket.WebSocket()
    ws.connect("ws://{}/ws?clientId={}".format(server_address, client_id), timeout=120)  # noqa: UP032
    try:
        images = get_images(ws, prompt)
    finally:
        ws.close()
    (node_images,) = images.values()
    im = Image.open(io.BytesIO(node_images[0]))
    assert im.size == (64, 64) and im.format == "PNG"
    assert np.asarray(im).std() > 5  # a picture, not a flat image
    for kind in (
        "status",
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "executed",
        "execution_success",
    ):
        assert kind in events, (kind, events)
    # binary previews in ComfyUI's framing: >I event 1 (PREVIEW_IMAGE), >I image type 2 (PNG), the PNG
    assert previews and all(p[:8] == b"\x00\x00\x00\x01\x00\x00\x00\x02" and p[8:12] == b"\x89PNG" for p in previews)
    # the emoji model's tiny VAE draws them at the image's size (the latent map would be 16x16)
    assert Image.open(io.BytesIO(previews[-1][8:])).size == (64, 64)

    # ---- basic_api_example.py: queue_prompt as it is (no client id, fire and forget)
    def basic_queue_prompt(prompt):
        p = {"prompt": prompt}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request("http://{}/prompt".format(server_address), data=data)  # noqa: UP032
        urllib.request.urlopen(req)

    prompt["3"]["inputs"]["seed"] = 6
    before = set(client.get("/history").json())
    basic_queue_prompt(prompt)
    deadline = time.monotonic() + 120
    while not set(client.get("/history").json()) - before:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (pid,) = set(client.get("/history").json()) - before
    h = client.get(f"/history/{pid}").json()[pid]
    assert h["status"]["status_str"] == "success"
    # only the sampler (new seed) and what follows it ran again; loader and text came from the cache
    (cached,) = [m[1]["nodes"] for m in h["status"]["messages"] if m[0] == "execution_cached"]
    assert set(cached) == {"4", "5", "6", "7"}


# ------------------------------------------------------------------------------ same images as the native API


@pytest.fixture(scope="module")
def plain(server) -> np.ndarray:
    """The native API's txt2img image of the settings every equality test starts from."""
    with httpx.Client(base_url=server.url, timeout=120) as c:
        return native_image(c, prompt="a red apple", sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0)


def test_txt2img_lora_equal_native(client, plain):
    assert np.array_equal(comfy_image(client, txt2img_graph()), plain)
    g = txt2img_graph(model=("10", 0), clip=("10", 1))
    g["10"] = {
        "class_type": "LoraLoader",
        "inputs": {
            "model": ["4", 0],
            "clip": ["4", 1],
            "lora_name": "emoji-fruit",
            "strength_model": 0.8,
            "strength_clip": 0.8,
        },
    }
    a = comfy_image(client, g)
    b = native_image(client, prompt="a red apple", cfg_scale=5.0, loras=[{"name": "emoji-fruit", "weight": 0.8}])
    assert np.array_equal(a, b) and not np.array_equal(a, plain)


@pytest.mark.parametrize(
    "comfy,native",
    [
        (("dpmpp_2s_ancestral", "beta"), ("DPM++ 2S a", "Beta")),
        (("dpmpp_3m_sde", "ddim_uniform"), ("DPM++ 3M SDE", "DDIM")),
    ],
)
def test_comfyuis_newer_sampler_and_scheduler_names_equal_native(client, comfy, native):
    """KSampler's dpmpp_2s_ancestral / dpmpp_3m_sde and the beta / ddim_uniform schedulers (once refused as unknown
    choices) are the native API's samplers and schedules of those A1111 names."""
    info = client.get("/object_info/KSampler").json()["KSampler"]["input"]["required"]
    assert comfy[0] in info["sampler_name"][0] and comfy[1] in info["scheduler"][0]
    graph = txt2img_graph(sampler=comfy[0], scheduler=comfy[1])
    a = comfy_image(client, graph, extra_data={"sdengine": {"seed_rule": "sdengine"}})  # the native per-step noise
    b = native_image(client, prompt="a red apple", sampler=native[0], schedule=native[1], cfg_scale=5.0)
    assert np.array_equal(a, b)


NEW_COMFY_SAMPLERS = (
    "exp_heun_2_x0",
    "exp_heun_2_x0_sde",
    "gradient_estimation",
    "gradient_estimation_cfg_pp",
    "seeds_2",
    "seeds_3",
    "sa_solver",
    "sa_solver_pece",
)


@pytest.mark.slow  # trimmed from make test (time); make test-all runs it
def test_comfyuis_solver_samplers_run_end_to_end(client):
    """ComfyUI's exp_heun_2_x0(_sde), gradient_estimation(_cfg_pp), seeds_2/3 and sa_solver(_pece) are KSampler
    choices that run a whole prompt: each image is repeatable under its seed and differs from euler's."""
    info = client.get("/object_info/KSampler").json()["KSampler"]["input"]["required"]
    euler = comfy_image(client, txt2img_graph(sampler="euler", scheduler="karras"))
    images = {}
    for name in NEW_COMFY_SAMPLERS:
        assert name in info["sampler_name"][0]
        images[name] = comfy_image(client, txt2img_graph(sampler=name, scheduler="karras"))
        assert not np.array_equal(images[name], euler), name
    again = comfy_image(client, txt2img_graph(sampler="seeds_2", scheduler="karras"))
    assert np.array_equal(again, images["seeds_2"])
    assert not np.array_equal(images["sa_solver"], images["sa_solver_pece"])


def test_img2img_and_inpainting_equal_native(client):
    init_id, init_name = upload(client, picture(), "init.png")
    mask = Image.new("L", (64, 64), 0)
    ImageDraw.Draw(mask).rectangle((16, 16, 48, 48), fill=255)
    mask_id, mask_name = upload(client, mask.convert("RGB"), "mask.png")
    g = txt2img_graph(prompt="a red apple", latent=("11", 0), denoise=0.6)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": init_name}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    rule = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}
    a = comfy_image(client, g, **rule)
    b = native_image(client, prompt="a red apple", cfg_scale=5.0, init_image=init_id, strength=0.6)
    assert np.array_equal(a, b)
    g["12"] = {"class_type": "LoadImageMask", "inputs": {"image": mask_name, "channel": "red"}}
    g["13"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["11", 0], "mask": ["12", 0]}}
    g["3"]["inputs"].update(latent_image=["13", 0], denoise=0.8)
    a = comfy_image(client, g, **rule)
    b = native_image(client, prompt="a red apple", cfg_scale=5.0, init_image=init_id, mask=mask_id, strength=0.8)
    assert np.array_equal(a, b)
    outside = np.asarray(mask) < 128
    assert np.abs(a[outside].astype(int) - np.asarray(picture())[outside]).mean() < 40  # known region kept


def test_taesd_from_vae_loader_decodes_and_encodes_as_the_native_api(client):
    info = client.get("/object_info/VAELoader").json()["VAELoader"]
    assert info["input"]["required"]["vae_name"][0][0] == "taesd" and info["output"] == ["VAE"]
    g = txt2img_graph(prompt="a red apple")
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    g["8"]["inputs"]["vae"] = ["20", 0]
    rule = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}
    a = comfy_image(client, g, **rule)
    b = native_image(client, prompt="a red apple", cfg_scale=5.0, vae_decode="tiny")
    assert np.array_equal(a, b)
    # img2img with the tiny encoder (and the checkpoint's VAE to decode): the native vae_encode "tiny" image
    init_id, init_name = upload(client, picture(), "init-taesd.png")
    g = txt2img_graph(prompt="a red apple", latent=("11", 0), denoise=0.6)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": init_name}}
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["20", 0]}}
    a = comfy_image(client, g, **rule)
    b = native_image(client, prompt="a red apple", cfg_scale=5.0, init_image=init_id, strength=0.6, vae_encode="tiny")
    assert np.array_equal(a, b)
    full = native_image(client, prompt="a red apple", cfg_scale=5.0, init_image=init_id, strength=0.6)
    assert not np.array_equal(a, full)  # the tiny encoder's latent, not the VAE's


def test_vae_files_from_vae_loader(client, server, plain):
    import sdengine

    names = client.get("/object_info/VAELoader").json()["VAELoader"]["input"]["required"]["vae_name"][0]
    assert names == ["taesd", "emoji-vae", "emoji-vae-bright", "not-a-vae.safetensors"]
    rule = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}
    g = txt2img_graph(prompt="a red apple")
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "emoji-vae"}}
    g["8"]["inputs"]["vae"] = ["20", 0]
    assert np.array_equal(comfy_image(client, g, **rule), plain)  # the checkpoint's own VAE, from a folder
    g["20"]["inputs"]["vae_name"] = "emoji-vae-bright"
    bright = comfy_image(client, g, **rule)
    assert bright.mean() > plain.mean() + 10  # decoded by that file's weights
    # img2img encoded and decoded by the file's VAE: the Python API with vae= gives the same image
    init_id, init_name = upload(client, picture(), "init-vae.png")
    g = txt2img_graph(prompt="a red apple", latent=("11", 0), denoise=0.6)
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": init_name}}
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "emoji-vae-bright"}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["20", 0]}}
    g["8"]["inputs"]["vae"] = ["20", 0]
    a = comfy_image(client, g, **rule)
    pipe = sdengine.load_pipeline("emoji", device="cpu", vae=server.services.config.vaes_dir / "emoji-vae-bright")
    want = pipe(
        "a red apple",
        "",
        init_image=picture(),
        strength=0.6,
        steps=STEPS,
        seed=SEED,
        cfg_scale=5.0,
        sampler="dpmpp_2m",
        schedule="karras",
        progress=False,
    ).images[0]
    assert np.array_equal(a, np.asarray(want))
    # a file that is not a VAE fails at its node, in one line
    g = txt2img_graph(prompt="a red apple")
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "not-a-vae.safetensors"}}
    g["8"]["inputs"]["vae"] = ["20", 0]
    r = client.post("/prompt", json={"prompt": g})
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "error"
    err = [m for m in h["status"]["messages"] if m[0] == "execution_error"][0][1]
    assert err["node_id"] == "20" and "not a VAE" in err["exception_message"], err


def test_controlnet_equal_native(client, plain):
    _, init_name = upload(client, picture(), "control.png")
    g = txt2img_graph()
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": init_name}}
    g["11"] = {"class_type": "Canny", "inputs": {"image": ["10", 0], "low_threshold": 0.4, "high_threshold": 0.8}}
    g["12"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny"}}
    g["13"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0],
            "negative": ["7", 0],
            "control_net": ["12", 0],
            "image": ["11", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
        },
    }
    g["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    a = comfy_image(client, g)
    # ComfyUI's Canny is kornia's (blurred, thresholds in 0..1; sdengine.control.canny_fractions), not OpenCV's
    from sdengine.control import canny_fractions

    edges = canny_fractions(np.asarray(picture(), np.float32) / 255.0, 0.4, 0.8)
    edges_id, _ = upload(client, Image.fromarray(np.repeat(edges[..., None] * 255, 3, 2).astype(np.uint8)), "e.png")
    b = native_image(
        client,
        prompt="a red apple",
        cfg_scale=5.0,
        controlnets=[{"model": "emoji-controlnet-canny", "image": edges_id, "preprocessor": "none"}],
    )
    assert np.array_equal(a, b) and not np.array_equal(a, plain)
    # The old ControlNetApply on the positive and again on the negative (the same hint): one ControlNet on both
    # halves, the Advanced node's image at strength 1 (it was once applied twice: strength 2's image).
    del g["13"]
    for nid, cond in (("14", "6"), ("15", "7")):
        g[nid] = {
            "class_type": "ControlNetApply",
            "inputs": {"conditioning": [cond, 0], "control_net": ["12", 0], "image": ["11", 0], "strength": 1.0},
        }
    g["3"]["inputs"].update(positive=["14", 0], negative=["15", 0])
    assert np.array_equal(comfy_image(client, g), a)


def _comfy_window_oracle(percent_start: float, percent_end: float, sigmas: list[float]) -> list[bool]:
    """ComfyUI's rule, written from its formula: percent -> timestep (1 - p) * 999 -> sigma by log-sigma
    interpolation on SD's scaled-linear schedule (percent 0: above all, 1: 0.0); a call runs the ControlNet
    unless sigma > sigma(start) or sigma < sigma(end)."""
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    ac = np.cumprod(1.0 - betas)
    log_s = np.log(((1 - ac) / ac) ** 0.5)

    def p2s(p: float) -> float:
        if p <= 0:
            return 1e9
        if p >= 1:
            return 0.0
        t = (1 - p) * 999
        lo = int(np.floor(t))
        hi = min(lo + 1, 999)
        return float(np.exp(log_s[lo] + (t - lo) * (log_s[hi] - log_s[lo])))

    high, low = p2s(percent_start), p2s(percent_end)
    return [not (s > high or s < low) for s in sigmas]


@pytest.mark.parametrize("schedule", ["normal", "karras", "exponential"])
def test_controlnet_percents_follow_comfyuis_sigma_window(schedule):
    """ComfyUI judges a ControlNet's start/end percents on sigma (model_sampling.percent_to_sigma, compared at each
    model call); they were once counted as fractions of the steps (diffusers' rule), another set of steps on a
    Karras schedule."""
    from sdengine.diffusion import sampling
    from sdengine.pipeline.control import comfy_sigma_window, sigma_keep, step_keep

    pipe = shared_loader("emoji", "cpu")
    grid = sampling.make_grid("euler", 20, pipe.noise_schedule, schedule, pipe.scheduler_config)
    sigmas = [float(v) for v in grid.sigmas[:-1]]
    differs = False
    for start, end in ((0.0, 1.0), (0.0, 0.5), (0.2, 0.7), (0.35, 0.9), (0.5, 1.0), (0.1, 0.15)):
        got = sigma_keep(sigmas, comfy_sigma_window(pipe.noise_schedule.log_sigmas, start, end))
        assert got == _comfy_window_oracle(start, end, sigmas), (schedule, start, end)
        differs |= got != step_keep(20, start, end)
    assert all(sigma_keep(sigmas, comfy_sigma_window(pipe.noise_schedule.log_sigmas, 0.0, 1.0)))
    assert differs or schedule == "normal"


def test_controlnet_percents_on_a_karras_heun_workflow_equal_the_python_api(client):
    """A ControlNetApplyAdvanced window (0.2-0.7) on Heun + kl_optimal: ComfyUI's sigma window at every model call
    (Heun's second calls included) gives the Python API's image with rule="comfyui", and not diffusers' step
    fractions. (Named for the Karras schedule it ran on while ComfyUI's karras was the native API's grid; kl_optimal,
    Karras-like, is one list in both APIs, where karras for Heun on this `leading` model is diffusers' grid in the
    native API and ComfyUI's list in ComfyUI's.) Under sdengine's seed rule, whose network sees the native API's
    timesteps (ComfyUI's rule hands it the nearest table timestep, another image)."""
    from sdengine.pipeline.control import ControlUnit
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    hint = Image.fromarray(((np.asarray(picture()).mean(axis=2) < 150) * 255).astype(np.uint8)).convert("RGB")
    _, hint_name = upload(client, hint, "hint-window.png")
    g = txt2img_graph(sampler="heun", scheduler="kl_optimal")
    g["3"]["inputs"]["steps"] = 6
    g["10"] = {"class_type": "LoadImage", "inputs": {"image": hint_name}}
    g["12"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny"}}
    g["13"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["12", 0], "image": ["10", 0],
            "strength": 1.0, "start_percent": 0.2, "end_percent": 0.7,
        },
    }  # fmt: skip
    g["3"]["inputs"].update(positive=["13", 0], negative=["13", 1])
    a = comfy_image(client, g, extra_data={"sdengine": {"seed_rule": "sdengine"}})
    pipe = shared_loader("emoji", "cpu")
    cn = str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"])

    def api(rule: str) -> np.ndarray:
        unit = ControlUnit(cn, hint, 1.0, 0.2, 0.7, rule)
        kw = {"steps": 6, "seed": SEED, "cfg_scale": 5.0, "sampler": "heun", "schedule": "kl_optimal"}
        kw["progress"] = False
        return np.asarray(pipe("a red apple", "", controlnets=[unit], **kw).images[0])

    assert np.array_equal(a, api("comfyui"))
    assert not np.array_equal(a, api("diffusers"))


def test_a_cached_output_node_still_sends_its_images(client):
    """ComfyUI sends `executed` with a cached output node's images: a websocket client of an identical prompt once
    got no images (only `execution_cached`)."""
    cid = uuid.uuid4().hex
    ws = websocket.create_connection(
        f"ws://{client.base_url.host}:{client.base_url.port}/ws?clientId={cid}", timeout=60
    )
    try:
        g = txt2img_graph(prompt="a cached apple")
        for _ in range(2):
            pid = client.post("/prompt", json={"prompt": g, "client_id": cid}).json()["prompt_id"]
            executed = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = ws.recv()
                if isinstance(msg, bytes):
                    continue
                m = json.loads(msg)
                if m["type"] == "executed" and m["data"].get("prompt_id", pid) == pid:
                    executed.append(m["data"]["node"])
                if m["type"] == "executing" and m["data"].get("node") is None and m["data"].get("prompt_id") == pid:
                    break
            assert executed == ["9"], executed  # the SaveImage node, run or cached
    finally:
        ws.close()


# ------------------------------------------------------------------------------------- broken workflows


@pytest.mark.parametrize(
    "break_it, node, kind",
    [
        (lambda g: g["3"].update(class_type="NoSuchNode"), "3", "missing_node_type"),
        (lambda g: g["3"]["inputs"].pop("seed"), "3", "required_input_missing"),
        (lambda g: g["3"]["inputs"].update(steps="many"), "3", "invalid_input_type"),
        (lambda g: g["3"]["inputs"].update(cfg=1000), "3", "value_bigger_than_max"),
        (lambda g: g["3"]["inputs"].update(sampler_name="nope"), "3", "value_not_in_list"),
        (lambda g: g["8"]["inputs"].update(samples=["99", 0]), "8", "invalid_link"),
        (lambda g: g["8"]["inputs"].update(samples=["4", 0]), "8", "return_type_mismatch"),
        (lambda g: g["4"]["inputs"].update(ckpt_name="../etc/passwd"), "4", "value_not_in_list"),
        (
            lambda g: (
                g["6"]["inputs"].update(clip=["20", 0]),
                g.update(
                    {
                        "20": {
                            "class_type": "CLIPSetLastLayer",
                            "inputs": {"clip": ["21", 0], "stop_at_clip_layer": -1},
                        },
                        "21": {
                            "class_type": "CLIPSetLastLayer",
                            "inputs": {"clip": ["20", 0], "stop_at_clip_layer": -1},
                        },
                    }
                ),
            ),
            "20",
            "dependency_cycle",
        ),
    ],
)
def test_broken_workflows_name_the_node(client, break_it, node, kind):
    g = txt2img_graph()
    break_it(g)
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400, r.text
    body = r.json()
    assert {"type", "message", "details", "extra_info"} <= set(body["error"])
    errors = body["node_errors"][node]
    assert errors["class_type"] == g[node]["class_type"]
    assert kind in [e["type"] for e in errors["errors"]], errors


def test_failures_at_run_time_and_interrupt_name_the_node(client, server):
    g = txt2img_graph()
    g["5"]["inputs"].update(width=66)  # a changed latent (66 is cut to the emoji VAE's factor 4, as ComfyUI)
    # valid for the node, too small for the model's 1000 timesteps (int(steps / denoise)): fails when it runs
    g["3"]["inputs"].update(denoise=0.001)
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "3" and err["node_type"] == "KSampler" and "denoise" in err["exception_message"]
    # as ComfyUI: the nodes run before it (the changed latent at least; not those reused from the cache), the
    # failing node's inputs, and the reused nodes' ids as a list
    assert (
        "5" in err["executed"] and "3" not in err["executed"] and not set(err["executed"]) & set(err["current_outputs"])
    ), err
    assert err["current_inputs"]["denoise"] == [0.001] and err["current_inputs"]["latent_image"] != [], err
    # server still serves; a long prompt is interrupted within a step
    g = txt2img_graph()
    g["3"]["inputs"].update(steps=150, seed=99)
    pid = client.post("/prompt", json={"prompt": g}).json()["prompt_id"]
    deadline = time.monotonic() + 120
    while not client.get("/queue").json()["queue_running"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.post("/interrupt", json={"prompt_id": pid}).status_code == 200
    h = wait_history(client, pid, timeout=120)
    assert h["status"]["status_str"] == "error" and not h["status"]["completed"]  # ComfyUI's two: success, error
    assert any(m[0] == "execution_interrupted" and m[1]["node_id"] == "3" for m in h["status"]["messages"])


# ----------------------------------------------------------------------------------- the other routes


def test_routes_view_upload_queue_object_info(client, server):
    info = client.get("/object_info").json()
    assert "dpmpp_2m" in info["KSampler"]["input"]["required"]["sampler_name"][0]
    assert "karras" in info["KSampler"]["input"]["required"]["scheduler"][0]
    assert info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == ["emoji"]
    assert info["KSampler"]["input"]["required"]["seed"][1]["max"] == 0xFFFFFFFFFFFFFFFF
    assert client.get("/api/object_info/KSampler").json()["KSampler"]["output"] == ["LATENT"]
    assert client.get("/object_info/Nope").json() == {}
    # ComfyUI's model folders: what each loader lists (these routes were missing: 404)
    folders = ["checkpoints", "loras", "controlnet", "vae", "clip_vision", "diffusion_models", "text_encoders"]
    assert client.get("/models").json() == [*folders, "ipadapter"]
    assert client.get("/models/clip_vision").json() == [] and client.get("/models/ipadapter").json() == []  # no folders
    assert client.get("/api/models/checkpoints").json() == ["emoji"]
    assert client.get("/models/loras").json() == info["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert client.get("/models/vae").json() == info["VAELoader"]["input"]["required"]["vae_name"][0]
    assert client.get("/models/upscale_models").status_code == 404
    q = client.get("/api/queue").json()
    assert q == {"queue_running": [], "queue_pending": []}
    assert client.post("/queue", json={"clear": True}).status_code == 200
    assert client.get("/system_stats").json()["devices"][0]["type"] == "cpu"
    assert client.post("/free", json={"free_memory": True}).status_code == 200
    # /view: contained, images only, nosniff
    for params in (
        {"filename": "../../etc/passwd.png"},
        {"filename": "x.png", "subfolder": "../.."},
        {"filename": "/etc/hosts.png"},
        {"filename": "a.txt"},
        {"filename": "x.png", "type": "other"},
    ):
        r = client.get("/view", params=params)
        assert r.status_code in (400, 403, 404), (params, r.text)
        assert str(server.services.config.outputs_dir) not in r.text, (params, r.text)
    r = client.get("/view", params={"filename": "nope.png"})  # the message names the file, not the server's folder
    assert r.status_code == 404 and r.json()["detail"] == "'nope.png' is not a file", r.text
    assert "not a file name" in client.get("/view", params={"filename": "../out/x.png"}).json()["detail"]
    # /upload/image: a bomb is refused before decoding, a traversal name is refused
    big = io.BytesIO()
    Image.new("1", (20000, 20000)).save(big, format="PNG")
    r = client.post("/upload/image", files={"image": ("big.png", big.getvalue(), "image/png")})
    assert r.status_code == 413
    r = client.post(
        "/upload/image", files={"image": ("ok.png", png_bytes(picture()), "image/png")}, data={"subfolder": "../x"}
    )
    assert r.status_code == 400
    # a foreign page cannot queue prompts nor open the websocket
    r = client.post("/prompt", json={"prompt": txt2img_graph()}, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403
    with pytest.raises(websocket.WebSocketException):
        websocket.create_connection(
            f"ws://127.0.0.1:{server.port}/ws?clientId=x", origin="http://evil.example", timeout=10
        )


def test_advanced_sampler_upscales_and_the_other_nodes(client):
    def images_of(g: dict) -> dict[str, list[np.ndarray]]:
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
        out = {}
        for nid, o in h["outputs"].items():
            out[nid] = [
                np.asarray(Image.open(io.BytesIO(client.get("/view", params=im).content)).convert("RGB"))
                for im in o["images"]
            ]
        return out

    def adv(latent, start, end, add_noise="enable", leftover="disable"):
        return {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "add_noise": add_noise,
                "noise_seed": SEED,
                "steps": STEPS,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": list(latent),
                "model": ["4", 0],
                "start_at_step": start,
                "end_at_step": end,
                "return_with_leftover_noise": leftover,
            },
        }

    g = txt2img_graph(sampler="euler", scheduler="normal")
    g["20"] = adv(("5", 0), 0, 10000)  # the whole run: KSampler's image
    g["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["4", 2]}}
    g["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    g["30"] = adv(("5", 0), 0, 2, leftover="enable")  # the same run in two halves
    g["31"] = adv(("30", 0), 2, 10000, add_noise="disable")
    g["32"] = {"class_type": "VAEDecode", "inputs": {"samples": ["31", 0], "vae": ["4", 2]}}
    g["33"] = {"class_type": "SaveImage", "inputs": {"images": ["32", 0], "filename_prefix": "halves/x"}}
    out = images_of(g)
    full, whole, halves = out["9"][0], out["22"][0], out["33"][0]
    assert np.array_equal(full, whole)
    assert np.abs(full.astype(int) - halves).max() <= 2

    # hires fix: upscale the latent, sample again at denoise 0.5; inpaint-encode; combine; clip layer; LoRA only
    g = txt2img_graph(clip=("40", 0), model=("41", 0))
    g["40"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1], "stop_at_clip_layer": -1}}
    g["41"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["4", 0], "lora_name": "emoji-fruit", "strength_model": 0.5},
    }
    g["42"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 1.5},
    }
    g["43"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["6", 0], "conditioning_2": ["7", 0]}}
    g["44"] = {
        "class_type": "KSampler",
        "inputs": {**g["3"]["inputs"], "latent_image": ["42", 0], "denoise": 0.5, "positive": ["43", 0]},
    }
    g["45"] = {"class_type": "VAEDecode", "inputs": {"samples": ["44", 0], "vae": ["4", 2]}}
    g["46"] = {
        "class_type": "ImageScale",
        "inputs": {"image": ["45", 0], "upscale_method": "lanczos", "width": 48, "height": 0, "crop": "disabled"},
    }
    g["47"] = {"class_type": "SaveImage", "inputs": {"images": ["46", 0], "filename_prefix": "hires"}}
    g["48"] = {
        "class_type": "VAEEncodeForInpaint",
        "inputs": {"pixels": ["8", 0], "vae": ["4", 2], "mask": ["49", 0], "grow_mask_by": 2},
    }
    g["49"] = {
        "class_type": "LoadImageMask",
        "inputs": {"image": upload(client, picture(), "m.png")[1], "channel": "red"},
    }
    g["50"] = {"class_type": "KSampler", "inputs": {**g["3"]["inputs"], "latent_image": ["48", 0]}}
    g["51"] = {"class_type": "VAEDecode", "inputs": {"samples": ["50", 0], "vae": ["4", 2]}}
    g["52"] = {"class_type": "SaveImage", "inputs": {"images": ["51", 0], "filename_prefix": "inpaint"}}
    g["53"] = {"class_type": "PreviewImage", "inputs": {"images": ["45", 0]}}
    out = images_of(g)
    assert out["9"][0].shape == (64, 64, 3)
    assert out["53"][0].shape == (96, 96, 3)  # the 1.5x latent
    assert out["47"][0].shape == (48, 48, 3)  # scaled to width 48, height by the aspect
    assert out["52"][0].shape == (64, 64, 3) and not np.array_equal(out["52"][0], out["9"][0])


def test_websocket_needs_the_api_key(tmp_path):
    with live_server(server_config(tmp_path, api_key="s3cret")) as s:
        url = f"ws://127.0.0.1:{s.port}/ws?clientId=abc"
        with pytest.raises(websocket.WebSocketException):
            websocket.create_connection(url, timeout=10)
        for ws in (
            websocket.create_connection(url + "&token=s3cret", timeout=10),
            websocket.create_connection(url, header=["Authorization: Bearer s3cret"], timeout=10),
        ):
            first = json.loads(ws.recv())
            ws.close()
            assert first["type"] == "status" and first["data"]["sid"] == "abc"
        assert httpx.post(f"{s.url}/prompt", json={"prompt": {}}).status_code == 401


def test_vaes_dir_must_be_a_folder(tmp_path, capsys):
    from sdengine.cli import main

    assert main(["serve", "--vaes-dir", str(tmp_path / "nowhere"), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--vaes-dir" in err and "not a folder" in err, err


def test_a_replaced_input_image_runs_its_nodes_again(client):
    """ComfyUI's LoadImage hashes its file (IS_CHANGED): an input replaced under the same name is read again, where
    the cache once answered the old image's outputs (a silently wrong result)."""

    def run(color):
        data = png_bytes(Image.new("RGB", (64, 64), color))
        r = client.post("/upload/image", files={"image": ("swap.png", data, "image/png")}, data={"overwrite": "true"})
        assert r.status_code == 200, r.text
        g = {
            "1": {"class_type": "LoadImage", "inputs": {"image": r.json()["name"]}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "swap"}},
        }
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        (cached,) = [m[1]["nodes"] for m in h["status"]["messages"] if m[0] == "execution_cached"]
        im = h["outputs"]["2"]["images"][0]
        v = client.get("/view", params={"filename": im["filename"], "subfolder": im["subfolder"], "type": "output"})
        return cached, Image.open(io.BytesIO(v.content)).convert("RGB").getpixel((5, 5))

    assert run((255, 0, 0))[1] == (255, 0, 0)
    cached, pixel = run((0, 0, 255))
    assert pixel == (0, 0, 255) and "1" not in cached
    assert run((0, 0, 255))[0] == ["1", "2"]  # the same file again: cached, as in ComfyUI


def test_history_routes_refuse_bad_bodies_and_a_lone_surrogate_cannot_break_them(client):
    for body in ({"delete": 5}, {"delete": "abc"}, [1]):
        r = client.post("/history", json=body)
        assert r.status_code == 400 and "\n" not in r.json()["detail"], (body, r.text)
    raw = json.dumps({"prompt": txt2img_graph()}).replace("a red apple", "a \\ud800 apple")
    r = client.post("/prompt", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "lone surrogate" in r.json()["detail"], r.text
    assert client.get("/history").status_code == 200 and client.get("/history?max_items=1").status_code == 200


def test_denoise_zero_passes_the_latent_through_and_the_largest_seed_takes_a_batch(client):
    """KSampler with denoise 0 runs no step and answers its latent (ComfyUI's behaviour; it once failed at run
    time), and seed 2**64 - 1 with batch 2 runs under ComfyUI's rule (row seeds wrap) where it once overflowed;
    under sdengine's rule (the pipeline's) it is refused in one line."""
    g = txt2img_graph(denoise=0.0)
    g["5"]["inputs"]["batch_size"] = 2
    r = client.post("/prompt", json={"prompt": g})
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    g = txt2img_graph()
    g["5"]["inputs"]["batch_size"] = 2
    g["3"]["inputs"]["seed"] = 2**64 - 1
    g["3"]["inputs"]["steps"] = 2
    h = wait_history(client, client.post("/prompt", json={"prompt": g}).json()["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    rule = {"extra_data": {"sdengine": {"seed_rule": "sdengine"}}}  # the same graph: not answered from the cache
    h = wait_history(client, client.post("/prompt", json={"prompt": g, **rule}).json()["prompt_id"])
    errs = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert len(errs) == 1 and "out of range for a batch of 2" in errs[0]["exception_message"], h["status"]


def test_inpaint_encoding_image_scale_and_an_empty_sampler_window_follow_comfyui():
    """Three node behaviours checked against ComfyUI's own rules: VAEEncodeForInpaint greys the mask itself and
    grows only the noise mask by a g x g box (once a (2g+1)-box, both greyed); ImageScale's Lanczos cuts the centre
    first (once silently bicubic); KSamplerAdvanced with no step in its window answers its latent (once an error)."""
    from sdengine.server.comfy.nodes import (
        RunContext,
        VaeHandle,
        image_scale,
        ksampler_advanced,
        vae_encode,
        vae_encode_for_inpaint,
    )

    pipe = shared_loader("emoji", "cpu")
    ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
    pixels = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 64, 64)
    mask[:, 24:40, 24:40] = 1.0  # 16 x 16
    for grow, side in ((0, 16), (1, 16), (6, 21)):  # ComfyUI: 256, 256 and 441 pixels
        (latent,) = vae_encode_for_inpaint(ctx, pixels, VaeHandle("emoji"), mask, grow)
        assert int(latent["noise_mask"].sum()) == side * side, (grow, int(latent["noise_mask"].sum()))
    grey = pixels.clone()
    grey[:, 24:40, 24:40, :] = 0.5
    (want,) = vae_encode(ctx, grey, VaeHandle("emoji"))
    assert torch.equal(latent["samples"], want["samples"])  # only the 16 x 16 square was greyed
    # an image that is no multiple of the VAE's factor (4 here): image and mask are cut alike, centred, first (the
    # mask was once kept whole, 66 x 66 over a 64 x 64 image, a pixel off and stretched over the latent)
    wide = torch.rand(1, 66, 66, 3, generator=torch.Generator().manual_seed(2))
    mask66 = torch.zeros(1, 66, 66)
    mask66[:, 25:41, 25:41] = 1.0
    (cut,) = vae_encode_for_inpaint(ctx, wide, VaeHandle("emoji"), mask66, 0)
    assert torch.equal(cut["noise_mask"][0, 0], mask66[0, 1:65, 1:65])
    grey = wide[:, 1:65, 1:65].clone()
    grey[:, 24:40, 24:40, :] = 0.5
    assert torch.equal(cut["samples"], vae_encode(ctx, grey, VaeHandle("emoji"))[0]["samples"])
    # ImageScale: Lanczos with a centre cut equals PIL's Lanczos of the centre
    img = torch.rand(1, 48, 64, 3, generator=torch.Generator().manual_seed(1))
    (out,) = image_scale(ctx, img, "lanczos", 40, 40, "center")
    (bicubic,) = image_scale(ctx, img, "bicubic", 40, 40, "center")
    centre = Image.fromarray((img[0, :, 8:56].numpy() * 255).round().astype(np.uint8)).resize((40, 40), Image.LANCZOS)
    assert float((out[0] * 255 - torch.from_numpy(np.asarray(centre, np.float32))).abs().max()) <= 1.0
    assert not torch.equal(out, bicubic)
    # LatentUpscale to a size off the latent factor rounds down, as ComfyUI's width // 8 (once a node error)
    from sdengine.server.comfy.nodes import latent_upscale

    z = torch.rand(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    (up,) = latent_upscale(ctx, {"samples": z, "size": (1, 64, 64)}, "bilinear", 102, 86, "disabled")
    assert up["samples"].shape == (1, 4, 21, 25) and up["size"] == (1, 84, 100)
    want = torch.nn.functional.interpolate(z, size=(21, 25), mode="bilinear", align_corners=False)
    assert torch.equal(up["samples"], want)
    # KSamplerAdvanced: start_at_step at or past the end of its window
    latent = {"samples": torch.ones(1, 4, 16, 16), "size": (1, 64, 64), "posterior": None, "noise_mask": None}
    for start, end in ((4, 10000), (2, 2)):
        (same,) = ksampler_advanced(
            ctx, "enable", 1, start, end, "disable", model=None, steps=4, cfg=5.0, sampler_name="euler",
            scheduler="normal", positive=[], negative=[], latent_image=latent,
        )  # fmt: skip
        assert torch.equal(same["samples"], latent["samples"])


def _bislerp_oracle(z: np.ndarray, width: int, height: int) -> np.ndarray:
    """ComfyUI's bislerp, pixel by pixel in float64 (from its facts): along the width first, then the height, each
    output position's source is (j + 0.5) * old / new - 0.5 clamped to the edges; its two neighbours' channel
    vectors are slerped (directions on the sphere, lengths linearly); directions within 1e-5 of equal keep the
    first, within 1e-5 of opposite are lerped; a zero vector's direction is zero."""

    def slerp(a: np.ndarray, b: np.ndarray, r: float) -> np.ndarray:
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        ua = a / na if na else np.zeros_like(a)
        ub = b / nb if nb else np.zeros_like(b)
        d = float(ua @ ub)
        if d > 1 - 1e-5:
            return a
        if d < 1e-5 - 1:
            return a * (1 - r) + b * r
        om = math.acos(d)
        return (math.sin((1 - r) * om) * ua + math.sin(r * om) * ub) / math.sin(om) * (na * (1 - r) + nb * r)

    def source(j: int, old: int, new: int) -> tuple[int, int, float]:
        p = min(max((j + 0.5) * old / new - 0.5, 0.0), old - 1)
        lo = math.floor(p)
        return lo, min(lo + 1, old - 1), p - lo

    n, c, h, w = z.shape
    mid = np.zeros((n, c, h, width))
    for b in range(n):
        for y in range(h):
            for j in range(width):
                lo, hi, r = source(j, w, width)
                mid[b, :, y, j] = slerp(z[b, :, y, lo], z[b, :, y, hi], r)
    out = np.zeros((n, c, height, width))
    for b in range(n):
        for i in range(height):
            lo, hi, r = source(i, h, height)
            for x in range(width):
                out[b, :, i, x] = slerp(mid[b, :, lo, x], mid[b, :, hi, x], r)
    return out


def test_latent_upscale_bislerp_as_comfyui(client):
    """LatentUpscale/LatentUpscaleBy offer ComfyUI's `bislerp` (a workflow with it was refused as value_not_in_list):
    the slerp along the width then the height, checked against a per-pixel oracle, edge cases included."""
    from sdengine.nn.resize import bislerp
    from sdengine.server.comfy.nodes import RunContext, latent_upscale

    g = torch.Generator().manual_seed(4)
    z = torch.randn(2, 4, 5, 6, generator=g)
    z[0, :, 1, 1] = 0.0  # no direction
    z[0, :, 2, 2] = z[0, :, 2, 3] * 2.0  # the same direction, another length
    z[1, :, 3, 0] = -z[1, :, 3, 1]  # opposite directions
    for width, height in ((15, 11), (6, 5), (4, 3), (13, 7)):
        got = bislerp(z, width, height)
        assert got.shape == (2, 4, height, width) and got.dtype == z.dtype
        want = _bislerp_oracle(z.double().numpy(), width, height)
        assert np.allclose(got.numpy(), want, atol=2e-5), (width, height, np.abs(got.numpy() - want).max())
    assert not torch.allclose(bislerp(z, 15, 11), torch.nn.functional.interpolate(z, size=(11, 15), mode="bilinear"))
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]
    (up,) = latent_upscale(ctx, {"samples": z, "size": (2, 40, 48)}, "bislerp", 96, 80, "disabled")
    assert torch.equal(up["samples"], bislerp(z, 12, 10)) and up["size"] == (2, 80, 96)
    # a workflow through LatentUpscaleBy with bislerp runs
    wf = txt2img_graph()
    wf["42"] = {
        "class_type": "LatentUpscaleBy",
        "inputs": {"samples": ["3", 0], "upscale_method": "bislerp", "scale_by": 1.5},
    }
    wf["8"]["inputs"]["samples"] = ["42", 0]
    assert comfy_image(client, wf).shape == (96, 96, 3)


def test_controlnet_hints_per_row_and_of_another_aspect():
    """A batch of hints gives each latent row its own (the first alone was once used for every row); a hint of
    another aspect is cut to its centre, as ComfyUI cuts it (it was once stretched)."""
    from dataclasses import replace

    from sdengine.latent_sampling import ControlHint, encode_text, sample_latents
    from sdengine.server.catalog import BUILTIN_CONTROLNETS
    from sdengine.server.comfy.nodes import RunContext, controlnet_apply

    pipe = shared_loader("emoji", "cpu")
    cn = str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"])
    g = torch.Generator().manual_seed(0)
    a, b = (torch.rand(1, 3, 64, 64, generator=g).round() for _ in range(2))
    args = {"seed": 5, "steps": 3, "cfg": 5.0, "sampler": "euler", "schedule": "normal"}

    def run(hint, batch):
        if hint.shape[0] > 1:  # through the node, as a Canny of a decoded batch reaches it: (B, H, W, 3)
            ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
            (conds,) = controlnet_apply(ctx, [encode_text(pipe, "a star")], cn, hint.permute(0, 2, 3, 1), 1.0)
            pos = conds[0]
        else:
            pos = replace(encode_text(pipe, "a star"), controls=(ControlHint(cn, hint, 1.0),))
        with torch.inference_mode():
            return sample_latents(pipe, [pos], [encode_text(pipe, "")], torch.zeros(batch, 4, 16, 16), **args)

    both = run(torch.cat([a, b]), 2)
    assert torch.equal(both[1:], run(torch.cat([b, b]), 2)[1:]) and not torch.equal(both[1:], run(a, 2)[1:])
    wide = torch.cat([torch.zeros(1, 3, 64, 32), a, torch.ones(1, 3, 64, 32)], dim=3)  # a, with side bands
    assert torch.allclose(run(wide, 1), run(a, 1), atol=1e-5)


def test_a_controlnet_acts_only_on_the_cfg_halves_whose_conditioning_carries_it():
    """ComfyUI runs a ControlNet with the conditioning that carries it: on the negative only (the Advanced node's
    negative output wired alone, or ControlNetApply on the negative) it acts on the unconditional half only, on the
    positive only on the conditional half only. It once acted on both halves whichever carried it. Exact checks:
    at cfg 0 only the unconditional half counts, at cfg 1 only the conditional one (the other is not run)."""
    from dataclasses import replace

    from sdengine.latent_sampling import ControlHint, encode_text, sample_latents
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    pipe = shared_loader("emoji", "cpu")
    hint = ControlHint(str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"]), picture_hint(), 1.0)
    pos, neg = encode_text(pipe, "a star"), encode_text(pipe, "")

    def run(cfg: float, on_pos: bool, on_neg: bool) -> torch.Tensor:
        p = replace(pos, controls=(hint,)) if on_pos else pos
        n = replace(neg, controls=(hint,)) if on_neg else neg
        with torch.inference_mode():
            return sample_latents(
                pipe, [p], [n], torch.zeros(1, 4, 16, 16), seed=3, steps=2, cfg=cfg, sampler="euler", schedule="normal"
            )

    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.allclose(a, b, atol=1e-5)

    assert same(run(0.0, True, False), run(0.0, False, False))  # positive only: the unconditional half is plain
    assert same(run(0.0, False, True), run(0.0, True, True))  # negative only: it is controlled
    assert same(run(1.0, False, True), run(1.0, False, False))  # negative only: the conditional half is plain
    neg_only = run(5.0, False, True)
    for other in (run(5.0, False, False), run(5.0, True, True)):
        assert not same(neg_only, other)


def picture_hint() -> torch.Tensor:
    """A canny map of the test picture, (1, 3, 64, 64) in [0, 1]."""
    from sdengine.control import canny

    edges = canny(picture().resize((64, 64)).convert("RGB"), 100, 200).convert("RGB")
    return torch.from_numpy(np.asarray(edges, np.float32) / 255).permute(2, 0, 1)[None]


# ------------------------------------------------------------------------------ the queue, on a gated server


@pytest.fixture()
def gated(tmp_path):
    """A server whose worker waits in the model load until ``gate`` is set: the first job then runs (held)
    and the next ones stay queued, so that a test sees the queue's order and a running prompt."""
    import threading

    gate = threading.Event()

    def loader(ref: str, device: str):
        assert gate.wait(120), "the test never opened the gate"
        return shared_loader(ref, device)

    with live_server(server_config(tmp_path, max_queue=16), loader=loader) as s:
        s.gate = gate
        try:
            with httpx.Client(base_url=s.url, timeout=60) as c:
                yield s, c
        finally:
            gate.set()


def wait_running(client: httpx.Client, job_id: str) -> None:
    deadline = time.monotonic() + 60
    while client.get(f"/v1/jobs/{job_id}").json()["state"] != "running":
        assert time.monotonic() < deadline, "the first job never started"
        time.sleep(0.02)


def test_front_and_number_order_the_comfyui_prompts_in_the_shared_queue(gated):
    """ComfyUI's queue is a heap by ``number``: ``front`` gives the counter negated (it runs next), a given
    ``number`` is the priority as it is (a float). In the shared queue the ComfyUI prompts keep that order
    among themselves; a front prompt goes to the head of the whole queue; native jobs keep their FIFO order."""
    server, c = gated
    held = c.post("/v1/jobs", json={"width": 64, "height": 64, "steps": 2}).json()["id"]
    wait_running(c, held)
    names = {}
    for name, extra in [("a", {}), ("b", {}), ("native", None), ("front", {"front": True}), ("half", {"number": 0.5})]:
        if extra is None:
            names[c.post("/v1/jobs", json={"width": 64, "height": 64, "steps": 2}).json()["id"]] = name
            continue
        r = c.post("/prompt", json={"prompt": txt2img_graph(), **extra})
        assert r.status_code == 200, r.text
        names[r.json()["prompt_id"]] = name
        expected = {"a": 0, "b": 1, "front": -2, "half": 0.5}[name]
        assert r.json()["number"] == expected and type(r.json()["number"]) is type(expected), r.json()
    pending = c.get("/queue").json()["queue_pending"]
    assert [(e[0], names[e[1]]) for e in pending] == [(-2, "front"), (0, "a"), (0.5, "half"), (1, "b")]
    queued = [names[j.id] for j in server.services.manager.queued()]
    assert queued == ["front", "a", "half", "b", "native"], queued  # the native job keeps its place after b
    for bad in ("x", float("nan"), True, [1]):
        r = c.post("/prompt", content=json.dumps({"prompt": txt2img_graph(), "number": bad}).replace("NaN", '"nan"'))
        assert r.status_code == 400 and "number" in r.json()["detail"], r.text
    # a prompt_id another protocol's job has is refused: the job table is keyed by id, and the second job once
    # replaced the first there (a native job vanished from /v1/jobs)
    native = next(jid for jid, name in names.items() if name == "native")
    for taken in (native, held):
        r = c.post("/prompt", json={"prompt": txt2img_graph(), "prompt_id": taken})
        assert r.status_code == 400 and "taken" in r.json()["detail"], r.text
    assert c.get(f"/v1/jobs/{native}").json()["state"] == "queued" and len(server.services.manager.queued()) == 5
    # the client's own queued prompt_id is queued again, as ComfyUI queues it: two prompts of that id, in number order
    first = next(iter(names))
    r = c.post("/prompt", json={"prompt": txt2img_graph(), "prompt_id": first})
    assert r.status_code == 200 and r.json()["prompt_id"] == first and r.json()["number"] == 3, r.text
    pending = c.get("/queue").json()["queue_pending"]
    assert [e[0] for e in pending if e[1] == first] == [0, 3] and len(server.services.manager.queued()) == 6
    r = c.post("/prompt", json={"prompt": txt2img_graph(), "prompt_id": 7})  # ComfyUI: str(prompt_id)
    assert r.status_code == 200 and r.json()["prompt_id"] == "7", r.text
    names["7"] = "seven"
    c.post("/queue", json={"clear": True})
    for jid, name in names.items():
        if name == "native":
            c.delete(f"/v1/jobs/{jid}")
    assert server.services.manager.queued() == []
    server.gate.set()
    assert c.delete(f"/v1/jobs/{held}").json()["state"] in ("cancelled", "done")


def ws_until(ws, kind: str, pred=lambda d: True, timeout: float = 60.0) -> dict:
    """The data of the next JSON message of type ``kind`` that ``pred`` accepts (binary frames skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        ws.settimeout(max(0.1, deadline - time.monotonic()))
        msg = ws.recv()
        if isinstance(msg, str):
            m = json.loads(msg)
            if m["type"] == kind and pred(m["data"]):
                return m["data"]
        assert time.monotonic() < deadline, f"no {kind} message in {timeout} s"


def test_a_reconnecting_client_is_told_the_running_node_and_an_interrupt_lists_the_executed_nodes(gated):
    """ComfyUI, on a websocket (re)connect of the running prompt's client, sends `executing` with the node running
    after `status` (sdengine once sent `status` only); `execution_interrupted` lists the nodes already run
    (`executed`, once always [])."""
    server, c = gated
    sid = uuid.uuid4().hex
    url = f"ws://127.0.0.1:{server.port}/ws?clientId={sid}"
    ws = websocket.create_connection(url, timeout=30)
    ws_until(ws, "status")
    pid = c.post("/prompt", json={"prompt": txt2img_graph(), "client_id": sid}).json()["prompt_id"]
    ws_until(ws, "executing", lambda d: d["node"] == "4")  # CheckpointLoaderSimple: held in the model load
    ws.close()
    ws = websocket.create_connection(url, timeout=30)
    try:
        ws.settimeout(10)
        first, second = json.loads(ws.recv()), json.loads(ws.recv())
        assert first["type"] == "status" and first["data"]["sid"] == sid, first
        assert second == {"type": "executing", "data": {"node": "4", "display_node": "4", "prompt_id": pid}}
        other = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId=someone-else", timeout=30)
        other.settimeout(1)
        assert json.loads(other.recv())["type"] == "status"
        with pytest.raises(websocket.WebSocketTimeoutException):  # another client's prompt: nothing to tell
            other.recv()
        other.close()
        assert c.post("/interrupt", json={"prompt_id": pid}).status_code == 200
        server.gate.set()
        stopped = ws_until(ws, "execution_interrupted")
        assert stopped["node_id"] == "5" and stopped["executed"] == ["4"], stopped  # 4 ran, then the interrupt
        assert ws_until(ws, "executing")["node"] is None
    finally:
        ws.close()


def test_a_prompt_id_run_again_overwrites_its_history_entry(client):
    """ComfyUI queues a prompt_id it already has and the later run overwrites the history entry (its execution.py
    task_done: history[prompt_id] = ...), which keeps its place: one entry, the second prompt's, its images new."""
    pid = f"again-{uuid.uuid4().hex[:8]}"
    before = client.get("/history").json()
    first, second = txt2img_graph(), txt2img_graph(prompt="a blue boat")
    r = client.post("/prompt", json={"prompt": first, "prompt_id": pid})
    assert r.status_code == 200 and r.json()["prompt_id"] == pid, r.text
    old = wait_history(client, pid)
    assert old["prompt"][2] == first and old["status"]["status_str"] == "success"
    r = client.post("/prompt", json={"prompt": second, "prompt_id": pid})
    assert r.status_code == 200 and r.json()["prompt_id"] == pid, r.text
    deadline = time.monotonic() + 300
    while client.get(f"/history/{pid}").json()[pid]["prompt"][2] != second:
        assert time.monotonic() < deadline, "the second run never replaced the entry"
        time.sleep(0.05)
    new = client.get(f"/history/{pid}").json()[pid]
    assert new["status"]["status_str"] == "success" and new["prompt"][1] == pid
    assert new["outputs"]["9"]["images"] != old["outputs"]["9"]["images"]
    listed = [k for k in client.get("/history").json() if k not in before]
    assert listed == [pid]  # one entry


def test_the_client_id_in_extra_data_targets_the_events_and_is_listed(server, client):
    """ComfyUI keeps the client id in extra_data, and its executor reads it there: a prompt whose client id is
    sent in extra_data alone sends its events to that client only (they once went to every socket), and /history
    lists extra_data with client_id (and without ComfyUI's sensitive keys)."""
    mine, theirs = uuid.uuid4().hex, uuid.uuid4().hex
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={mine}", timeout=30)
    other = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={theirs}", timeout=30)
    try:
        extra = {"client_id": mine, "api_key_comfy_org": "secret", "extra_pnginfo": {"workflow": {}}}
        r = client.post("/prompt", json={"prompt": txt2img_graph(), "extra_data": extra})
        assert r.status_code == 200, r.text
        pid = r.json()["prompt_id"]
        seen_kinds: list[str] = []
        while not seen_kinds or seen_kinds[-1] != "done":
            m = ws.recv()
            if isinstance(m, str):
                m = json.loads(m)
                final = m["type"] == "executing" and m["data"]["node"] is None and m["data"]["prompt_id"] == pid
                seen_kinds.append("done" if final else m["type"])
        # ComfyUI's order at the end: the queue's status (its task_done), then "executing" None (status came after)
        assert seen_kinds[-3:] == ["execution_success", "status", "done"], seen_kinds
        other.settimeout(0.5)
        seen = []
        with pytest.raises(websocket.WebSocketTimeoutException):
            while True:
                m = other.recv()
                seen += [m] if isinstance(m, str) and pid in m else []
        assert seen == [], seen
        listed = wait_history(client, pid)["prompt"][3]
        assert listed == {"client_id": mine, "extra_pnginfo": {"workflow": {}}}, listed
        r = client.post("/prompt", json={"prompt": txt2img_graph(), "client_id": theirs})  # top level: listed too
        assert wait_history(client, r.json()["prompt_id"])["prompt"][3] == {"client_id": theirs}
    finally:
        ws.close()
        other.close()


def test_upload_image_keeps_one_copy_of_the_same_image_and_numbers_other_ones(client, server):
    """ComfyUI's /upload/image: the same image again under a name it already has answers that name and stores no
    copy (sdengine once stored "x (1).png", "x (2).png", ... for every upload of one image); another image under
    the name gets "x (1).png"; overwrite replaces; a subfolder is created and answered; /view serves each."""
    sub = f"up{uuid.uuid4().hex[:8]}"
    red, blue = png_bytes(Image.new("RGB", (8, 8), (255, 0, 0))), png_bytes(Image.new("RGB", (8, 8), (0, 0, 255)))

    def up(data: bytes, **form: str) -> str:
        r = client.post("/upload/image", files={"image": ("x.png", data, "image/png")}, data={"subfolder": sub, **form})
        assert r.status_code == 200 and r.json()["subfolder"] == sub and r.json()["type"] == "input", r.text
        return r.json()["name"]

    assert [up(red), up(red), up(blue), up(blue), up(red)] == ["x.png", "x.png", "x (1).png", "x (1).png", "x.png"]
    folder = Path(server.services.config.outputs_dir) / "input" / sub
    assert sorted(p.name for p in folder.iterdir()) == ["x (1).png", "x.png"]
    assert up(blue, overwrite="true") == "x.png"
    v = client.get("/view", params={"filename": "x.png", "subfolder": sub, "type": "input"})
    assert v.status_code == 200 and v.content == blue
    listed = client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"][0]
    assert f"{sub}/x (1).png" in listed


def test_upload_image_writes_off_the_event_loop(client, server):
    """/upload/image stores the file in a worker thread: while the save lock is held (a running prompt's SaveImage
    holds it while it writes), an upload waits without stalling the server; it once wrote inside the event loop,
    so every other request waited too. The upload then lands with its usual answer."""
    import threading

    lock = server.app.state.comfy.save_lock
    name = f"held{uuid.uuid4().hex[:8]}.png"
    answers: list[httpx.Response] = []
    data = png_bytes(Image.new("RGB", (8, 8), (0, 255, 0)))
    with httpx.Client(base_url=server.url, timeout=60) as other:
        t = threading.Thread(
            target=lambda: answers.append(other.post("/upload/image", files={"image": (name, data, "image/png")}))
        )
        assert lock.acquire(timeout=30)
        try:
            t.start()
            time.sleep(0.3)  # the upload reaches the lock
            r = client.get("/prompt", timeout=5)  # answered while the upload waits
        finally:
            lock.release()
            t.join(60)
    assert r.status_code == 200, r.text
    assert answers[0].status_code == 200 and answers[0].json() == {"name": name, "subfolder": "", "type": "input"}
    assert (Path(server.services.config.outputs_dir) / "input" / name).read_bytes() == data


def test_lora_and_controlnet_names_with_their_file_suffix(client):
    """ComfyUI lists LoRA and ControlNet files with their suffix: a workflow written for it names
    "x.safetensors" where sdengine lists "x" (it was refused: value_not_in_list). Both name the same file: the
    second prompt is the first one, all cached."""
    g = txt2img_graph(model=("10", 0), clip=("10", 1))
    g["10"] = {
        "class_type": "LoraLoader",
        "inputs": {"model": ["4", 0], "clip": ["4", 1], "lora_name": "emoji-fruit.safetensors"}
        | {"strength_model": 0.7, "strength_clip": 0.7},
    }
    g["11"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "emoji-controlnet-canny.safetensors"}}
    g["12"] = {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}}
    g["13"] = {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["4", 2]}}
    g["14"] = {
        "class_type": "ControlNetApply",
        "inputs": {"conditioning": ["6", 0], "control_net": ["11", 0], "image": ["13", 0], "strength": 0.5},
    }
    g["3"]["inputs"]["positive"] = ["14", 0]
    for suffix in (".safetensors", ""):
        g["10"]["inputs"]["lora_name"] = "emoji-fruit" + suffix
        g["11"]["inputs"]["control_net_name"] = "emoji-controlnet-canny" + suffix
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
    (cached,) = [m[1]["nodes"] for m in h["status"]["messages"] if m[0] == "execution_cached"]
    assert sorted(cached) == sorted(g), cached
    g["10"]["inputs"]["lora_name"] = "emoji-fruit.ckpt"
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400 and r.json()["node_errors"]["10"]["errors"][0]["type"] == "value_not_in_list"


def test_a_broken_output_is_left_out_and_partial_execution_targets_pick_the_outputs(client):
    """As ComfyUI: an output node whose nodes have errors is left out while the valid outputs run (200, with the
    errors in node_errors; the whole prompt was once refused); partial_execution_targets runs only the outputs it
    names (it was ignored); no output left -> 400 with the errors summed up in error.details."""
    g = txt2img_graph()
    g["20"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}}
    g["21"] = {"class_type": "SaveImage", "inputs": {"images": ["20", 0], "filename_prefix": "second"}}
    g["22"] = {"class_type": "VAEDecode", "inputs": {"samples": ["99", 0], "vae": ["4", 2]}}  # a dangling link
    g["23"] = {"class_type": "PreviewImage", "inputs": {"images": ["22", 0]}}
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    errors = r.json()["node_errors"]
    assert list(errors) == ["22"] and errors["22"]["dependent_outputs"] == ["23"], errors
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "success" and sorted(h["outputs"]) == ["21", "9"], h
    r = client.post("/prompt", json={"prompt": g, "partial_execution_targets": ["21"]})
    assert r.status_code == 200 and r.json()["node_errors"] == {}, r.text
    assert sorted(wait_history(client, r.json()["prompt_id"])["outputs"]) == ["21"]
    r = client.post("/prompt", json={"prompt": g, "partial_execution_targets": ["6"]})  # not an output node
    assert r.status_code == 400 and r.json()["error"]["type"] == "prompt_no_outputs", r.text
    r = client.post("/prompt", json={"prompt": g, "partial_execution_targets": ["23"]})
    assert r.status_code == 400 and "samples" in r.json()["error"]["details"], r.text
    r = client.post("/prompt", json={"prompt": g, "partial_execution_targets": "21"})
    assert r.status_code == 400 and "partial_execution_targets" in r.json()["detail"], r.text


def test_save_image_prefix_variables_and_a_prefix_that_looks_like_a_pattern(tmp_path):
    """SaveImage as ComfyUI: %width% %height% %year% ... in the prefix, %batch_num% per image; the counter goes on
    after the highest file of the prefix, also for a prefix with glob characters ("shot[1]": every run once wrote
    over the first images)."""
    import threading

    from sdengine.server.comfy.nodes import Outputs, RunContext, save_image

    folders = Outputs(tmp_path / "out", tmp_path / "in", tmp_path / "temp")
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=folders, save_lock=threading.Lock())
    images = torch.rand(2, 8, 12, 3)

    def names(prefix: str) -> list[str]:
        return [f"{i['subfolder']}/{i['filename']}" for i in save_image(ctx, images, prefix)["ui"]["images"]]

    assert names("shot[1]") + names("shot[1]") == [f"/shot[1]_0000{k}_.png" for k in (1, 2, 3, 4)]
    year = time.strftime("%Y")
    assert names("%year%/w%width%h%height%") == [f"{year}/w12h8_00001_.png", f"{year}/w12h8_00002_.png"]
    assert names("b%batch_num%") + names("b%batch_num%") == ["/b0_00001_.png", "/b1_00002_.png"] + [
        "/b0_00003_.png",
        "/b1_00004_.png",
    ]
    assert len(list((tmp_path / "out").rglob("*.png"))) == 10  # nothing written over


def test_load_image_reads_annotated_names_of_the_output_and_temp_folders(client):
    """ComfyUI's LoadImage takes "name [output]" (and [input], [temp]): a client loads an image the server saved
    without uploading it again (it was refused: value_not_in_list); /object_info marks the input image_upload."""
    g = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "x"}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "annotated"}},
    }
    saved = np.asarray(picture())
    init_id, init_name = upload(client, picture(), "annotate-me.png")
    g["1"]["inputs"]["image"] = f"{init_name} [input]"
    first = wait_history(client, client.post("/prompt", json={"prompt": g}).json()["prompt_id"])
    out = first["outputs"]["2"]["images"][0]
    for kind in ("output", "input"):
        name = f"{out['subfolder']}/{out['filename']}".lstrip("/") if kind == "output" else init_name
        g["1"]["inputs"]["image"] = f"{name} [{kind}]"
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
        im = h["outputs"]["2"]["images"][0]
        v = client.get("/view", params={"filename": im["filename"], "subfolder": im["subfolder"], "type": "output"})
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(v.content)).convert("RGB")), saved)
    for bad in ("nope.png [output]", "../x.png [output]", f"{init_name} [elsewhere]"):
        g["1"]["inputs"]["image"] = bad
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400 and r.json()["node_errors"]["1"]["errors"][0]["type"] == "value_not_in_list"
    spec = client.get("/object_info/LoadImage").json()["LoadImage"]["input"]["required"]["image"]
    assert spec[1] == {"image_upload": True}, spec
    # /view takes the annotated names too (it once answered 400: "only PNG, JPEG and WebP files are served")
    v = client.get("/view", params={"filename": f"{out['filename']} [output]", "subfolder": out["subfolder"]})
    assert v.status_code == 200 and np.array_equal(np.asarray(Image.open(io.BytesIO(v.content)).convert("RGB")), saved)
    assert client.get("/view", params={"filename": f"{init_name} [output]"}).status_code == 404


def test_validation_of_deep_and_diamond_shaped_graphs_is_linear(client, tmp_path):
    """Validation walked each path of the graph (a chain of ConditioningCombine nodes fed twice by the one before:
    2**depth steps, a few bytes of JSON that held a server thread for ever) and recursed per link (a chain of 5000
    nodes: RecursionError, a 500); a body of deeply nested JSON was a 500 too."""
    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import PromptInvalid, validate
    from sdengine.server.comfy.nodes import Outputs

    class Env:
        catalog = Catalog(None, None, None)
        folders = Outputs(tmp_path, tmp_path, tmp_path)

    g = txt2img_graph()
    prev = ["6", 0]
    for i in range(60):
        g[f"c{i}"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": prev, "conditioning_2": prev}}
        prev = [f"c{i}", 0]
    g["3"]["inputs"]["positive"] = prev
    clip = ["4", 1]
    for i in range(5000):
        g[f"s{i}"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": clip, "stop_at_clip_layer": -1}}
        clip = [f"s{i}", 0]
    g["7"]["inputs"]["clip"] = clip
    import threading

    got: list = []
    walker = threading.Thread(target=lambda: got.append(validate(g, Env())), daemon=True)  # a daemon: a hang fails
    walker.start()
    walker.join(10)
    assert got, "validation took over 10 s"
    graph, outputs, errors = got[0]
    assert outputs == ["9"] and errors == {} and len(graph) == len(g)
    g["s0"]["inputs"]["clip"] = ["s4999", 0]  # a cycle 5000 nodes long
    with pytest.raises(PromptInvalid) as e:
        validate(g, Env())
    assert [x["type"] for n in e.value.body["node_errors"].values() for x in n["errors"]] == ["dependency_cycle"]
    r = client.post("/prompt", content=b'{"prompt": ' + b"[" * 100000 + b"]" * 100000 + b"}")
    assert r.status_code == 400 and "nested too deeply" in r.json()["detail"], r.text
    # running such a graph would double the conditioning list at each node: refused at the node, past 64
    from sdengine.server.comfy.nodes import NodeError, conditioning_combine

    assert len(conditioning_combine(None, [1] * 32, [2] * 32)[0]) == 64  # type: ignore[arg-type]
    with pytest.raises(NodeError, match="over the limit of 64"):
        conditioning_combine(None, [1] * 33, [2] * 32)  # type: ignore[arg-type]


def test_load_image_reads_a_16_bit_grayscale_png_at_its_values(tmp_path):
    """A 16-bit grayscale PNG (PIL's mode I;16) loaded almost all white: convert("RGB") clips every value over
    255. LoadImage and LoadImageMask now scale it to [0, 1]."""
    from sdengine.server.comfy.nodes import Outputs, RunContext, load_image, load_image_mask

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    (tmp_path / "in").mkdir()
    Image.fromarray(ramp).save(tmp_path / "in" / "deep.png")
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=Outputs(tmp_path, tmp_path / "in", tmp_path))
    rgb, mask = load_image(ctx, "deep.png")
    want = torch.from_numpy(np.round(ramp / 65535 * 255) / 255).float()
    assert torch.allclose(rgb[0, :, :, 0], want) and torch.equal(rgb[..., 0], rgb[..., 2]) and not mask.any()
    (red,) = load_image_mask(ctx, "deep.png", "red")
    assert torch.allclose(red[0], want)


def test_load_image_masks_the_transparent_colour_of_a_palette_png(tmp_path):
    """A palette PNG with a transparent colour gave no mask (it has no "A" band), so an inpainting workflow fed
    by it repainted nothing; ComfyUI takes its alpha as the mask, as now LoadImage and LoadImageMask do."""
    from sdengine.server.comfy.nodes import Outputs, RunContext, load_image, load_image_mask

    im = Image.new("P", (16, 16), 0)
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    ImageDraw.Draw(im).rectangle((4, 4, 11, 11), fill=1)  # colour 1 (blue) is the transparent one
    (tmp_path / "in").mkdir()
    im.save(tmp_path / "in" / "pal.png", transparency=1)
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=Outputs(tmp_path, tmp_path / "in", tmp_path))
    rgb, mask = load_image(ctx, "pal.png")
    want = torch.zeros(1, 16, 16)
    want[:, 4:12, 4:12] = 1.0
    assert torch.equal(mask, want) and rgb[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert torch.equal(load_image_mask(ctx, "pal.png", "alpha")[0], want)


def test_a_failed_prompt_keeps_the_images_of_the_outputs_that_ran_before_the_failure(client):
    """As ComfyUI, /history lists the images of the output nodes that ran before a node failed (they were saved
    and announced by `executed`, yet the history once listed no output)."""
    g = txt2img_graph()
    g["20"] = {"class_type": "VAELoader", "inputs": {"vae_name": "not-a-vae.safetensors"}}  # fails when it runs
    g["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["20", 0]}}
    g["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 0], "filename_prefix": "never"}}
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert h["status"]["status_str"] == "error" and err["node_id"] == "20", h["status"]
    assert list(h["outputs"]) == ["9"], h["outputs"]
    im = h["outputs"]["9"]["images"][0]
    assert client.get("/view", params=im).status_code == 200


def test_comfyui_websocket_images_example_gets_its_images(server, client):
    """ComfyUI's script_examples/websockets_api_example_ws_images.py: SaveImageWebsocket sends each image as a
    binary frame while its node runs (the node was unknown: missing_node_type), never from the cache."""
    server_address = f"127.0.0.1:{server.port}"
    client_id = str(uuid.uuid4())

    # ---- websockets_api_example_ws_images.py, its functions as they are
    def queue_prompt(prompt):
        p = {"prompt": prompt, "client_id": client_id}
        data = json.dumps(p).encode("utf-8")
        req = urllib.request.Request("http://{}/prompt".format(server_address), data=data)  # noqa: UP032
        return json.loads(urllib.request.urlopen(req).read())

    def get_images(ws, prompt):
        prompt_id = queue_prompt(prompt)["prompt_id"]
        output_images = {}
        current_node = ""
        while True:
            out = ws.recv()
            if isinstance(out, str):
                message = json.loads(out)
                if message["type"] == "executing":
                    data = message["data"]
                    if data["prompt_id"] == prompt_id:
                        if data["node"] is None:
                            break  # Execution is done
                        else:
                            current_node = data["node"]
            else:
                if current_node == "save_image_websocket_node":
                    images_output = output_images.get(current_node, [])
                    images_output.append(out[8:])
                    output_images[current_node] = images_output
        return output_images

    prompt = txt2img_graph()
    del prompt["9"]
    prompt["save_image_websocket_node"] = {"class_type": "SaveImageWebsocket", "inputs": {"images": ["8", 0]}}
    prompt["5"]["inputs"]["batch_size"] = 2
    ws = websocket.WebSocket()
    ws.connect("ws://{}/ws?clientId={}".format(server_address, client_id), timeout=120)  # noqa: UP032
    try:
        for _ in range(2):  # the second time all but the websocket node come from the cache: it still sends
            images = get_images(ws, prompt)
            pictures = [Image.open(io.BytesIO(b)) for b in images["save_image_websocket_node"]]
            assert [(p.format, p.size) for p in pictures] == [("PNG", (64, 64))] * 2
            assert np.asarray(pictures[0]).std() > 5 and not np.array_equal(*map(np.asarray, pictures))
    finally:
        ws.close()


def test_load_image_gives_every_frame_of_an_animated_image(tmp_path):
    """ComfyUI's LoadImage reads an animated image (APNG, animated WebP) as a batch of its frames; only the
    first was read (a silently different batch). Frames over the server's batch limit: one line at the node."""
    from sdengine.server.comfy.nodes import NodeError, Outputs, RunContext, load_image, load_image_mask

    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (8, 8), c) for c in colours]
    (tmp_path / "in").mkdir()
    frames[0].save(tmp_path / "in" / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(tmp_path / "in" / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    folders = Outputs(tmp_path, tmp_path / "in", tmp_path)
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=folders)
    for name in ("anim.png", "anim.webp"):
        rgb, mask = load_image(ctx, name)
        assert rgb.shape == (3, 8, 8, 3) and mask.shape == (3, 8, 8), name
        assert [tuple(int(v) for v in (rgb[i, 0, 0] * 255).round()) for i in range(3)] == colours, name
        assert load_image_mask(ctx, name, "red")[0].shape == (1, 8, 8)  # ComfyUI: the first frame only
    small = RunContext(pipeline=lambda ref: None, catalog=None, folders=folders, max_batch=2)
    with pytest.raises(NodeError, match="3 frames, over the server's batch limit of 2"):
        load_image(small, "anim.png")


def test_run_order_of_a_wide_graph_is_fast_and_any_node_id_runs(client):
    """The run order re-sorted its list of ready nodes at each step: a node read by 20000 others took minutes
    before anything ran. A node id such as "²" (a digit for str.isdigit, not for int()) failed the prompt with
    node "None"; ComfyUI takes any string as a node id."""
    import threading

    from sdengine.server.comfy.graph import topological_order

    wide = {"0": {"class_type": "x", "inputs": {}, "_links": []}}
    wide |= {str(i): {"class_type": "x", "inputs": {}, "_links": ["0"]} for i in range(1, 20000)}
    got: list = []
    sorter = threading.Thread(target=lambda: got.append(topological_order(wide)), daemon=True)
    sorter.start()
    sorter.join(10)
    assert got and got[0][:3] == ["0", "1", "2"] and len(got[0]) == 20000, "ordering took over 10 s"
    g = {("²" if k == "8" else k): v for k, v in txt2img_graph().items()}
    g["9"]["inputs"]["images"] = ["²", 0]
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]["messages"][-1]


def test_validation_lists_the_input_folder_once_per_prompt(tmp_path):
    """Each LoadImage's value was checked against a fresh listing of the input folder (a walk of the whole folder
    per node: a prompt of many LoadImage nodes over a full input folder took minutes); once per prompt now."""
    from sdengine.server.catalog import Catalog
    from sdengine.server.comfy.graph import validate
    from sdengine.server.comfy.nodes import Outputs

    (tmp_path / "in").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "in" / "a.png")

    class CountingEnv:
        catalog = Catalog(None, None, None)
        walks = 0

        @property
        def folders(self) -> Outputs:
            CountingEnv.walks += 1
            return Outputs(tmp_path, tmp_path / "in", tmp_path)

    g = {}
    for i in range(50):
        g[f"l{i}"] = {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
        g[f"p{i}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"l{i}", 0]}}
    graph, outputs, errors = validate(g, CountingEnv())
    assert len(outputs) == 50 and errors == {} and CountingEnv.walks == 1, CountingEnv.walks


def test_a_socket_whose_client_stopped_reading_loses_messages_quietly(tmp_path):
    """Events go to each socket's bounded queue; once a client stopped reading and its queue was full, every
    further event raised QueueFull in the event loop (an error with a stack trace logged per message)."""
    import asyncio

    from sdengine.server.comfy.nodes import Outputs
    from sdengine.server.comfy.routes import ComfyState

    st = ComfyState(Outputs(tmp_path, tmp_path, tmp_path))
    loop = asyncio.new_event_loop()
    errors: list = []
    loop.set_exception_handler(lambda lp, context: errors.append(context))
    try:
        q: asyncio.Queue = asyncio.Queue(maxsize=2)
        st.sockets["stuck"] = (loop, q, None)
        for i in range(5):
            st.send("progress", {"value": i}, "stuck")
        loop.run_until_complete(asyncio.sleep(0.05))
        assert errors == [] and q.qsize() == 2
        assert [json.loads(q.get_nowait())["data"]["value"] for _ in range(2)] == [0, 1]
    finally:
        loop.close()


def test_a_shorter_batch_of_control_maps_is_cycled_alike_on_both_cfg_halves():
    """Two control maps over a latent batch of 3: each half of CFG takes maps a, b, a (ComfyUI cycles them); the
    unconditional half once took b, a, b (the maps tiled over both halves at once), so the rows differed from
    the same run with the maps a, b, a given in full."""
    from dataclasses import replace

    from sdengine.latent_sampling import ControlHint, encode_text, sample_latents
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    pipe = shared_loader("emoji", "cpu")
    cn = str(BUILTIN_CONTROLNETS["emoji-controlnet-canny"])
    g = torch.Generator().manual_seed(4)
    a, b = (torch.rand(1, 3, 64, 64, generator=g).round() for _ in range(2))

    def run(maps: torch.Tensor) -> torch.Tensor:
        hint = ControlHint(cn, maps, 1.0)
        pos = replace(encode_text(pipe, "a star"), controls=(hint,))
        neg = replace(encode_text(pipe, ""), controls=(hint,))
        with torch.inference_mode():
            return sample_latents(
                pipe, [pos], [neg], torch.zeros(3, 4, 16, 16), seed=9, steps=2, cfg=5.0, seed_rule="sdengine"
            )

    assert torch.allclose(run(torch.cat([a, b])), run(torch.cat([a, b, a])), atol=1e-5)


def test_upload_mask_stores_the_image_with_the_masks_alpha(client):
    """ComfyUI's /upload/mask (its mask editor's upload; the route was missing, 404): the original_ref's image
    with the mask's alpha, stored like an upload; LoadImage of it gives MASK = 1 - alpha."""
    orig = picture()
    _, orig_name = upload(client, orig, "to-mask.png")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=(0, 0, 0, 0))  # transparent = repaint

    def post(ref: object, m: Image.Image = mask, name: str = "clipspace-mask.png") -> httpx.Response:
        files = {"image": (name, png_bytes(m), "image/png")}
        return client.post("/upload/mask", files=files, data={"original_ref": json.dumps(ref), "overwrite": "true"})

    r = post({"filename": orig_name, "subfolder": "", "type": "input"})
    assert r.status_code == 200 and r.json()["type"] == "input", r.text
    v = client.get("/view", params={"filename": r.json()["name"], "type": "input"})
    stored = Image.open(io.BytesIO(v.content))
    assert stored.mode == "RGBA" and np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(orig))
    assert np.array_equal(np.asarray(stored.getchannel("A")), np.asarray(mask.getchannel("A")))
    assert post({"filename": f"{orig_name} [input]"}).status_code == 200  # annotated, as ComfyUI
    assert post({"filename": "nope.png", "type": "input"}).status_code == 404
    assert post({"filename": "../x.png", "type": "input"}).status_code == 400
    assert post({"filename": orig_name, "type": "input"}, m=mask.resize((32, 32))).status_code == 400
    assert post({"filename": orig_name, "type": "input"}, name="m.jpg").status_code == 400
    r = client.post("/upload/mask", files={"image": ("m.png", png_bytes(mask), "image/png")})
    assert r.status_code == 400 and "original_ref" in r.json()["detail"], r.text


def test_view_channel_and_preview_as_comfyui(client, server):
    """ComfyUI's /view: `channel=a` answers the image's alpha as a PNG (its mask editor reads the mask so),
    `channel=rgb` the colours without the alpha, `preview=webp;90` / `jpeg;80` a re-encoded copy (sdengine once
    ignored both and sent the file as it is); another channel is refused."""
    im = Image.new("RGBA", (16, 12), (200, 40, 10, 255))
    ImageDraw.Draw(im).rectangle((4, 4, 11, 7), fill=(10, 200, 40, 0))
    folder = Path(server.services.config.outputs_dir) / f"view{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    (folder / "rgba.png").write_bytes(png_bytes(im))

    def view(**params: str) -> httpx.Response:
        r = client.get("/view", params={"filename": "rgba.png", "subfolder": folder.name, **params})
        assert r.status_code != 200 or r.headers["x-content-type-options"] == "nosniff"
        return r

    a = view(channel="a")
    assert a.status_code == 200 and a.headers["content-type"] == "image/png", a.text
    alpha = Image.open(io.BytesIO(a.content))
    assert alpha.mode == "RGBA" and np.array_equal(np.asarray(alpha.getchannel("A")), np.asarray(im.getchannel("A")))
    assert not np.asarray(alpha.convert("RGB")).any()  # black: only the alpha is the answer
    rgb = Image.open(io.BytesIO(view(channel="rgb").content))
    assert rgb.mode == "RGB" and np.array_equal(np.asarray(rgb), np.asarray(im.convert("RGB")))
    assert view(channel="rgba").content == png_bytes(im)
    w = view(preview="webp;90")
    assert w.headers["content-type"] == "image/webp" and Image.open(io.BytesIO(w.content)).format == "WEBP"
    j = view(preview="jpeg;80")
    assert j.headers["content-type"] == "image/jpeg" and j.content[:3] == b"\xff\xd8\xff"
    assert Image.open(io.BytesIO(j.content)).size == (16, 12)
    assert len(view(preview="jpeg;10").content) < len(view(preview="jpeg;95").content)  # the quality is used
    assert view(preview="jpeg;80", channel="a").headers["content-type"] == "image/webp"  # as ComfyUI: alpha kept
    assert view(channel="red").status_code == 400
    assert view(preview="jpeg;101").status_code == 400
    # an image without alpha: channel=a is opaque
    (folder / "rgb.jpg").write_bytes(view(preview="jpeg;80").content)
    r = client.get("/view", params={"filename": "rgb.jpg", "subfolder": folder.name, "channel": "a"})
    assert np.asarray(Image.open(io.BytesIO(r.content)).getchannel("A")).min() == 255


def test_upload_image_into_the_output_folder(client, server):
    """ComfyUI's /upload/image takes `type=output` (sdengine once answered 400), with the same rules: the name
    stays inside the folder."""
    sub = f"up{uuid.uuid4().hex[:8]}"
    data = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    r = client.post(
        "/upload/image", files={"image": ("o.png", data, "image/png")}, data={"type": "output", "subfolder": sub}
    )
    assert r.status_code == 200 and r.json() == {"name": "o.png", "subfolder": sub, "type": "output"}, r.text
    assert (Path(server.services.config.outputs_dir) / sub / "o.png").read_bytes() == data
    assert client.get("/view", params={"filename": "o.png", "subfolder": sub}).content == data
    for form in ({"type": "output", "subfolder": "../x"}, {"type": "models"}):
        r = client.post("/upload/image", files={"image": ("o.png", data, "image/png")}, data=form)
        assert r.status_code == 400, (form, r.text)
    r = client.post("/upload/image", files={"image": ("../../o.png", data, "image/png")}, data={"type": "output"})
    assert r.status_code == 400  # as ComfyUI: a name leading out of the folder (it was once stored as o.png)
    r = client.post("/upload/image", files={"image": (f"{sub}/o2.png", data, "image/png")}, data={"type": "output"})
    assert r.status_code == 200 and r.json()["name"] == "o2.png"  # the name's folders inside it are dropped
    assert (Path(server.services.config.outputs_dir) / "o2.png").is_file()


def test_a_prompt_without_a_usable_client_id_sends_its_events_as_comfyui(server, client):
    """ComfyUI's executor sends a prompt's `execution_start`, `executing`, `executed`, `execution_success` only
    when it has a client id (progress and previews go to every socket when it has none); a client id that is not
    a string (5) is a client id all the same, whose socket does not exist: its events reach no one. sdengine once
    sent every event of both to every socket."""
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={uuid.uuid4().hex}", timeout=30)
    try:
        ws_until(ws, "status")

        def events_of(**body) -> list[str]:
            r = client.post("/prompt", json={"prompt": txt2img_graph(prompt=uuid.uuid4().hex), **body})
            assert r.status_code == 200, r.text
            pid = r.json()["prompt_id"]
            assert wait_history(client, pid)["status"]["status_str"] == "success"
            kinds = []
            ws.settimeout(1.0)
            with pytest.raises(websocket.WebSocketTimeoutException):
                while True:
                    m = ws.recv()
                    if isinstance(m, bytes):
                        kinds.append("preview")
                    elif pid in m:
                        kinds.append(json.loads(m)["type"])
            return kinds

        none = events_of()
        assert "progress" in none and "preview" in none, none
        assert not {"execution_start", "executing", "executed", "execution_success"} & set(none), none
        assert events_of(client_id=5) == []
        r = client.post("/prompt", json={"prompt": txt2img_graph(), "client_id": 5})
        assert wait_history(client, r.json()["prompt_id"])["prompt"][3] == {"client_id": 5}  # listed as given
    finally:
        ws.close()


def test_the_temp_folder_is_emptied_at_start_of_what_sdengine_wrote(tmp_path):
    """ComfyUI wipes its temp folder at start; sdengine's (OUTPUTS/temp) was never cleaned. A temp folder
    sdengine created is emptied at the next start; a user's own OUTPUTS/temp loses only PreviewImage's files."""
    config = server_config(tmp_path)
    temp = tmp_path / "outputs" / "temp"
    data = png_bytes(Image.new("RGB", (8, 8), (9, 9, 9)))
    with live_server(config) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        for sub in ("", "clip"):
            r = c.post(
                "/upload/image", files={"image": ("t.png", data, "image/png")}, data={"type": "temp", "subfolder": sub}
            )
            assert r.status_code == 200, r.text
    assert (temp / "t.png").is_file() and (temp / "clip" / "t.png").is_file()
    with live_server(config):
        assert sorted(p.name for p in temp.iterdir()) == [".sdengine-temp"]
    # a temp folder sdengine did not create: only PreviewImage's names go
    import shutil

    shutil.rmtree(temp)
    temp.mkdir()
    for name in ("mine.png", "ComfyUI_temp_00001_.png", "ComfyUI_temp_notes.png"):
        (temp / name).write_bytes(data)
    (temp / "keep").mkdir()
    (temp / "keep" / "ComfyUI_temp_00002_.png").write_bytes(data)
    with live_server(config):
        assert sorted(p.name for p in temp.iterdir()) == ["ComfyUI_temp_notes.png", "keep", "mine.png"]
    assert (temp / "keep" / "ComfyUI_temp_00002_.png").is_file()


def test_two_servers_on_one_outputs_folder_keep_each_others_temp_files(tmp_path):
    """A server starting on the outputs folder of a running one once emptied its temp folder, so the running
    server's previews (and temp uploads) were gone under its clients. Each server now names its previews with its
    own tag, as ComfyUI's PreviewImage (ComfyUI_temp_XXXXX_NNNNN_.png), and holds a lock file in the temp folder
    while it runs: a starting server keeps a live server's files and cleans those of servers that are gone."""
    config = server_config(tmp_path)
    temp = tmp_path / "outputs" / "temp"
    data = png_bytes(Image.new("RGB", (8, 8), (9, 9, 9)))
    g = {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "emoji"}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["4", 2]}},
        "9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}},
    }
    with live_server(config) as a, httpx.Client(base_url=a.url, timeout=120) as c:
        r = c.post("/upload/image", files={"image": ("t.png", data, "image/png")}, data={"type": "temp"})
        assert r.status_code == 200, r.text
        pid = c.post("/prompt", json={"prompt": g}).json()["prompt_id"]
        (im,) = wait_history(c, pid)["outputs"]["9"]["images"]
        assert im["type"] == "temp" and re.fullmatch(r"ComfyUI_temp_[a-z]{5}_00001_\.png", im["filename"]), im
        with live_server(config) as b, httpx.Client(base_url=b.url, timeout=120) as c2:
            assert c.get("/view", params=im).status_code == 200  # the running server's preview is kept
            assert (temp / "t.png").read_bytes() == data
            pid2 = c2.post("/prompt", json={"prompt": g}).json()["prompt_id"]
            (im2,) = wait_history(c2, pid2)["outputs"]["9"]["images"]
            assert im2["filename"] != im["filename"]  # its own tag: no numbering over the other's files
        assert c.get("/view", params=im).status_code == 200 and c.get("/view", params=im2).status_code == 200
    with live_server(config):  # no server runs there now: the folder sdengine created is emptied
        assert sorted(p.name for p in temp.iterdir()) == [".sdengine-temp"]


def test_free_memory_also_unloads_the_models_as_comfyui(server, client):
    """ComfyUI's /free: `free_memory` unloads the models too unless `unload_models` is given false (its worker
    reads `flags.get("unload_models", free_memory)`); sdengine once only dropped the node cache."""
    worker = server.services.manager.workers[0]

    def loaded() -> bool:
        native_image(client)  # a job that loads the model on the worker
        return worker.pipe is not None

    assert loaded()
    assert client.post("/free", json={"free_memory": True, "unload_models": False}).status_code == 200
    assert worker.pipe is not None
    assert client.post("/free", json={"free_memory": True}).status_code == 200
    assert worker.pipe is None
    assert loaded()
    assert client.post("/free", json={"unload_models": True}).status_code == 200 and worker.pipe is None
    assert client.post("/free", json=[1]).status_code == 400


def test_validation_errors_give_the_inputs_config_as_comfyui(client):
    """ComfyUI's value errors carry `extra_info.input_config`: the input as /object_info lists it (its frontend
    shows the range from it); sdengine's once had only input_name and received_value."""
    info = client.get("/object_info/KSampler").json()["KSampler"]["input"]["required"]
    for inputs, kind, name in (
        ({"steps": 100000}, "value_bigger_than_max", "steps"),
        ({"cfg": -1}, "value_smaller_than_min", "cfg"),
        ({"sampler_name": "nope"}, "value_not_in_list", "sampler_name"),
        ({"steps": "many"}, "invalid_input_type", "steps"),
    ):
        g = txt2img_graph()
        g["3"]["inputs"].update(inputs)
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400, r.text
        (error,) = r.json()["node_errors"]["3"]["errors"]
        assert error["type"] == kind and error["extra_info"]["input_name"] == name, error
        assert error["extra_info"]["input_config"] == info[name], error
    g = txt2img_graph()
    g["3"]["inputs"]["steps"] = 100000
    (error,) = client.post("/prompt", json={"prompt": g}).json()["node_errors"]["3"]["errors"]
    assert (
        error["message"] == "Value 100000 bigger than max of 150" and error["extra_info"]["received_value"] == 100000
    )  # the server's --max-steps (ComfyUI's own max, 10000, is higher)
    g = txt2img_graph()
    g["3"]["inputs"]["sampler_name"] = "nope"
    (error,) = client.post("/prompt", json={"prompt": g}).json()["node_errors"]["3"]["errors"]
    assert error["extra_info"]["received_value"] == "nope"  # the value as sent, as ComfyUI (not its repr)


def test_a_non_finite_latent_fails_at_the_sampler_instead_of_saving_a_black_image(tmp_path):
    """A model that overflows (here the emoji U-Net with an infinite output bias) gave NaN latents that the
    workflow decoded and saved as a black PNG, a success; the pipeline refuses them (NonFiniteError). The
    sampler node now fails in one line naming it, and no image is written."""
    import shutil

    from safetensors.torch import load_file, save_file

    from sdengine.pipeline import BUILTIN_SD

    model = tmp_path / "models" / "overflow"
    shutil.copytree(BUILTIN_SD["emoji"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["conv_out.bias"] = torch.full_like(sd["conv_out.bias"], float("inf"))
    save_file(sd, weights)
    vae = tmp_path / "vaes" / "overflow-vae"  # and a VAE whose decode overflows: VAE Decode fails
    shutil.copytree(BUILTIN_SD["emoji"] / "vae", vae)
    weights = vae / "diffusion_pytorch_model.safetensors"
    sd = load_file(weights)
    sd["decoder.conv_out.bias"] = torch.full_like(sd["decoder.conv_out.bias"], float("inf"))
    save_file(sd, weights)
    config = server_config(tmp_path, models_dir=tmp_path / "models", model="overflow", vaes_dir=tmp_path / "vaes")
    with live_server(config) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        g = txt2img_graph()
        g["4"]["inputs"]["ckpt_name"] = "overflow"
        g["3"]["inputs"]["steps"] = 2
        decode = txt2img_graph()
        decode["10"] = {"class_type": "VAELoader", "inputs": {"vae_name": "overflow-vae"}}
        decode["8"]["inputs"] = {"samples": ["5", 0], "vae": ["10", 0]}
        del decode["3"], decode["6"], decode["7"]
        failed = []
        for graph in (g, decode):
            r = c.post("/prompt", json={"prompt": graph})
            assert r.status_code == 200, r.text
            h = wait_history(c, r.json()["prompt_id"])
            assert h["status"]["status_str"] == "error" and h["outputs"] == {}, h
            (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
            assert "non-finite" in err["exception_message"], err
            failed.append(err["node_id"])
    assert failed == ["3", "8"]
    assert not list((tmp_path / "outputs").glob("test_*.png"))


def test_feature_flags_are_answered_as_comfyui(server, client):
    """ComfyUI's frontend opens its websocket with a `feature_flags` message and reads the server's in the
    answer (and from GET /features); sdengine once ignored the message and had no /features (404)."""
    flags = client.get("/features").json()
    assert flags == {"supports_preview_metadata": False, "max_upload_size": server.services.config.max_body_bytes}
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={uuid.uuid4().hex}", timeout=30)
    try:
        ws_until(ws, "status")
        ws.send(json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}))
        assert ws_until(ws, "feature_flags", timeout=10) == flags
    finally:
        ws.close()


def test_a_denoise_too_small_for_the_models_timesteps_is_named(client):
    """KSampler's denoise runs the last `steps` of int(steps / denoise) steps (ComfyUI's rule): at 3 steps and
    denoise 0.001 that is 3000 steps, more than the model's 1000 timesteps. The node's error once read "steps
    must be between 1 and 1000, got 3000" (the user gave 3); it now names denoise and the smallest that works."""
    g = txt2img_graph(denoise=0.001)
    g["3"]["inputs"]["steps"] = 3
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    assert err["node_id"] == "3" and "denoise 0.001 with 3 steps" in err["exception_message"], err
    assert "at least 0.003" in err["exception_message"], err


def test_extra_pnginfo_that_is_no_object_is_refused_at_the_prompt(client):
    """extra_data.extra_pnginfo is written by SaveImage as one PNG text per key; a string, list or number was once
    queued (200) and then failed the job before any node ran: no history entry and no `executing` None, so a
    ComfyUI client waited for ever. It is now a 400 naming the field; an object (or null) is taken."""
    for bad in ("abc", [1, 2], 5):
        r = client.post("/prompt", json={"prompt": txt2img_graph(), "extra_data": {"extra_pnginfo": bad}})
        assert r.status_code == 400 and "extra_pnginfo" in r.json()["detail"], r.text
    r = client.post("/prompt", json={"prompt": txt2img_graph(), "extra_data": {"extra_pnginfo": None}})
    assert r.status_code == 200, r.text
    assert wait_history(client, r.json()["prompt_id"])["status"]["status_str"] == "success"


def test_history_pages_with_offset_and_max_items_as_comfyui(client):
    """ComfyUI's GET /history takes `offset` (from the offset-th oldest entry) with `max_items`; sdengine once
    ignored offset and answered the last max_items entries."""
    for _ in range(3):
        wait_history(client, client.post("/prompt", json={"prompt": txt2img_graph()}).json()["prompt_id"])
    ids = list(client.get("/history").json())
    assert len(ids) >= 3
    assert list(client.get("/history", params={"offset": 1, "max_items": 2}).json()) == ids[1:3]
    assert list(client.get("/history", params={"offset": 2}).json()) == ids[2:]
    assert list(client.get("/history", params={"max_items": 2}).json()) == ids[-2:]
    assert client.get("/history", params={"max_items": 0}).json() == {}


def test_nan_and_infinity_are_refused_in_one_line_and_the_server_keeps_answering(client):
    """A FLOAT input sent as the text "nan" or "inf" (which float() reads) is an invalid_input_type naming the
    input and the text as sent; its error once held the converted NaN, which JSON cannot carry: the 400 failed to
    render (a 500, the connection dropped). NaN and Infinity written as bare JSON words (Python's json.dumps does)
    are a 400 for the body: such a prompt could never be listed back by /queue and /history."""
    for text in ("nan", "inf", "-Infinity"):
        g = txt2img_graph()
        g["3"]["inputs"]["cfg"] = text
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400, r.text
        (error,) = r.json()["node_errors"]["3"]["errors"]
        assert error["type"] == "invalid_input_type" and error["extra_info"]["received_value"] == text, error
    for where in ("prompt", "extra"):
        g = txt2img_graph()
        body = {"prompt": g, "extra_data": {"extra_pnginfo": {"x": 1.5}}}
        if where == "prompt":
            g["3"]["inputs"]["cfg"] = 1.5
        r = client.post("/prompt", content=json.dumps(body).replace("1.5", "NaN"))
        assert r.status_code == 400 and "NaN" in r.json()["detail"], r.text
    assert client.get("/queue").status_code == 200 and client.get("/history").status_code == 200


@pytest.mark.slow
def test_clip_text_encode_sdxl_conditions_on_its_sizes_as_the_native_sdxl_settings(tmp_path):
    """ComfyUI's CLIPTextEncodeSDXL and CLIPTextEncodeSDXLRefiner through the server: text_l for CLIP-L, text_g
    for bigG, and the size numbers it gives; the
    image equals the native API's with the same `sdxl` settings (prompt_2 = text_g, original/target size, crop),
    and at the latent's own size CLIPTextEncode's. On another model kind each is a node error naming the model."""
    from _sdxl_models import make_sdxl_folder

    make_sdxl_folder(tmp_path / "models" / "tiny-sdxl")
    config = server_config(tmp_path, models_dir=tmp_path / "models", model="tiny-sdxl")

    def sdxl_encode(text_l: str, text_g: str, w: int, h: int, crop: tuple[int, int], tw: int, th: int) -> dict:
        return {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {
                "clip": ["4", 1],
                "width": w,
                "height": h,
                "crop_w": crop[0],
                "crop_h": crop[1],
                "target_width": tw,
                "target_height": th,
                "text_g": text_g,
                "text_l": text_l,
            },
        }

    with live_server(config) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        g = txt2img_graph(negative="blurry")
        g["4"]["inputs"]["ckpt_name"] = "tiny-sdxl"
        plain = comfy_image(c, g)
        g["6"] = sdxl_encode("a red apple", "a red apple", 64, 64, (0, 0), 64, 64)
        g["7"] = sdxl_encode("blurry", "blurry", 64, 64, (0, 0), 64, 64)
        assert np.array_equal(comfy_image(c, g), plain)  # the latent's size: what CLIPTextEncode gives
        g["6"] = sdxl_encode("a red apple", "a green pear", 1024, 768, (16, 32), 512, 256)
        g["7"] = sdxl_encode("blurry", "dark", 1024, 768, (16, 32), 512, 256)
        sized = comfy_image(c, g)
        sdxl = {
            "prompt_2": "a green pear",
            "negative_prompt_2": "dark",
            "original_size": [768, 1024],
            "crops_coords_top_left": [32, 16],
            "target_size": [256, 512],
        }
        pipe = shared_loader(str(tmp_path / "models" / "tiny-sdxl"), "cpu")  # the pipeline's own SDXL settings
        kw = dict(steps=STEPS, seed=SEED, width=64, height=64, sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0)
        result = pipe("a red apple", "blurry", sdxl=sdxl, progress=False, **kw)
        native = np.asarray(result.images[0].convert("RGB"))
        assert np.array_equal(sized, native) and not np.array_equal(sized, plain)
        # the refiner's node on a base model, and CLIPTextEncodeSDXL on an SD1 model: errors naming the model
        g["7"] = {
            "class_type": "CLIPTextEncodeSDXLRefiner",
            "inputs": {"ascore": 2.5, "width": 64, "height": 64, "text": "blurry", "clip": ["4", 1]},
        }
        r = c.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(c, r.json()["prompt_id"])
        error = dict(h["status"]["messages"])["execution_error"]
        assert error["node_id"] == "7" and "CLIPTextEncodeSDXL" in error["exception_message"], error
        g["4"]["inputs"]["ckpt_name"] = "emoji"
        g["7"] = sdxl_encode("blurry", "blurry", 64, 64, (0, 0), 64, 64)
        h = wait_history(c, c.post("/prompt", json={"prompt": g}).json()["prompt_id"])
        error = dict(h["status"]["messages"])["execution_error"]
        assert "emoji is not one" in error["exception_message"], error


def test_the_sdxl_text_encoders_are_listed_and_refuse_another_model(client):
    """CLIPTextEncodeSDXL / CLIPTextEncodeSDXLRefiner with ComfyUI's inputs; on an SD1 model each fails at the
    node, naming it (the parity test on
    a tiny SDXL model is the slow test above)."""
    info = client.get("/object_info").json()
    sdxl = info["CLIPTextEncodeSDXL"]["input"]["required"]
    assert list(sdxl) == [
        "clip",
        "width",
        "height",
        "crop_w",
        "crop_h",
        "target_width",
        "target_height",
        "text_g",
        "text_l",
    ]
    assert sdxl["width"] == ["INT", {"default": 1024, "min": 0, "max": 16384, "step": 1}]
    assert list(info["CLIPTextEncodeSDXLRefiner"]["input"]["required"]) == ["ascore", "width", "height", "text", "clip"]
    for node in (
        {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": {"ascore": 2.5, "width": 64, "height": 64, "text": "x"}},
        {
            "class_type": "CLIPTextEncodeSDXL",
            "inputs": {"width": 64, "height": 64, "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}
            | {"text_g": "x", "text_l": "x"},
        },
    ):
        g = txt2img_graph()
        g["7"] = node
        node["inputs"]["clip"] = ["4", 1]
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        error = dict(h["status"]["messages"])["execution_error"]
        assert error["node_id"] == "7" and "CLIP; emoji is not one" in error["exception_message"], error


@pytest.mark.slow
def test_clip_text_encode_sdxl_refiner_conditions_on_its_score_and_size_as_the_pipeline(tmp_path):
    """CLIPTextEncodeSDXLRefiner's aesthetic score and size, as the refiner pipeline's `sdxl` settings (score 6
    for the prompt, 2.5 for the negative: the pipeline's defaults)."""
    from _sdxl_models import make_sdxl_folder

    make_sdxl_folder(tmp_path / "models" / "tiny-refiner", refiner=True)
    config = server_config(tmp_path, models_dir=tmp_path / "models", model="tiny-refiner")
    with live_server(config) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        g = txt2img_graph(negative="blurry")
        g["4"]["inputs"]["ckpt_name"] = "tiny-refiner"
        plain = comfy_image(c, g)
        for nid, text, score in (("6", "a red apple", 6.0), ("7", "blurry", 2.5)):
            inputs = {"ascore": score, "width": 1024, "height": 768, "text": text, "clip": ["4", 1]}
            g[nid] = {"class_type": "CLIPTextEncodeSDXLRefiner", "inputs": inputs}
        scored = comfy_image(c, g)
    pipe = shared_loader(str(tmp_path / "models" / "tiny-refiner"), "cpu")
    kw = dict(steps=STEPS, seed=SEED, width=64, height=64, sampler="dpmpp_2m", schedule="karras", cfg_scale=5.0)
    result = pipe("a red apple", "blurry", sdxl={"original_size": [768, 1024]}, progress=False, **kw)
    assert np.array_equal(scored, np.asarray(result.images[0].convert("RGB"))) and not np.array_equal(scored, plain)


def test_an_interrupt_of_a_prompt_without_a_client_id_is_told_to_every_socket(gated):
    """ComfyUI sends execution_interrupted to every socket when the prompt has no client id (its one broadcast
    event), while `executing` is not sent for it."""
    server, c = gated
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={uuid.uuid4().hex}", timeout=30)
    try:
        ws_until(ws, "status")
        pid = c.post("/prompt", json={"prompt": txt2img_graph()}).json()["prompt_id"]
        wait_running(c, pid)
        assert c.post("/interrupt", json={"prompt_id": pid}).status_code == 200
        server.gate.set()
        kinds = []
        deadline = time.monotonic() + 60
        while "execution_interrupted" not in kinds and time.monotonic() < deadline:
            ws.settimeout(max(0.1, deadline - time.monotonic()))
            m = ws.recv()
            if isinstance(m, str) and pid in m:
                kinds.append(json.loads(m)["type"])
        assert kinds == ["execution_interrupted"], kinds
        assert wait_history(c, pid)["status"]["status_str"] == "error"
    finally:
        ws.close()


@pytest.mark.parametrize("body", [b"stop", b'{"prompt_id": ""}'])
def test_an_interrupt_with_a_body_that_is_not_json_is_a_global_interrupt(gated, body):
    """ComfyUI reads a /interrupt body that is not JSON as {} (a global interrupt), and an empty prompt_id as none;
    sdengine once answered 400 to such a body and left the prompt running."""
    server, c = gated
    pid = c.post("/prompt", json={"prompt": txt2img_graph()}).json()["prompt_id"]
    wait_running(c, pid)  # held in the model load until the gate opens
    r = c.post("/interrupt", content=body, headers={"content-type": "text/plain"})
    assert r.status_code == 200, r.text
    server.gate.set()
    h = wait_history(c, pid)
    assert h["status"]["status_str"] == "error", h["status"]
    assert any(m[0] == "execution_interrupted" for m in h["status"]["messages"]), h["status"]


def test_system_stats_has_comfyuis_fields(client):
    """/system_stats in ComfyUI's shape; `os` is Python's os.name as ComfyUI sends it ("posix", "nt": its
    frontend tells Windows by "nt"), which sdengine once sent as platform.system() ("linux")."""
    import os

    stats = client.get("/system_stats").json()
    assert stats["system"]["os"] == os.name
    assert set(stats["system"]) >= {"os", "ram_total", "ram_free", "comfyui_version", "python_version"}
    assert set(stats["devices"][0]) == {"name", "type", "index", "vram_total", "vram_free"} | {
        "torch_vram_total",
        "torch_vram_free",
    }


def test_free_while_a_prompt_runs_answers_at_once_and_frees_after_it(gated):
    """POST /free while a prompt runs once waited for the prompt inside the event loop: every request and
    websocket of the server hung until the prompt ended. As ComfyUI (flags its worker reads after the prompt),
    it answers at once and frees the memory once the prompt is done."""
    server, c = gated
    pid = c.post("/prompt", json={"prompt": txt2img_graph()}).json()["prompt_id"]
    wait_running(c, pid)
    t0 = time.monotonic()
    assert c.post("/free", json={"free_memory": True}, timeout=10).status_code == 200
    assert c.post("/free", json={"unload_models": True}, timeout=10).status_code == 200
    assert c.get("/queue", timeout=10).json()["queue_running"][0][1] == pid
    assert time.monotonic() - t0 < 5
    server.gate.set()
    assert wait_history(c, pid)["status"]["status_str"] == "success"
    worker = server.services.manager.workers[0]
    deadline = time.monotonic() + 30
    while worker.pipe is not None:  # unloaded once the prompt is done
        assert time.monotonic() < deadline, "the models were never unloaded"
        time.sleep(0.05)


@pytest.mark.parametrize("method", ["bicubic", "lanczos"])
def test_image_scale_by_is_image_scale_to_the_rounded_size(client, method):
    """ComfyUI's ImageScaleBy (missing: workflows upscaling an image by a factor failed with missing_node_type):
    the image scaled to round(side * scale_by), as ImageScale to that size."""
    spec = client.get("/object_info/ImageScaleBy").json()["ImageScaleBy"]["input"]["required"]
    assert spec["scale_by"] == ["FLOAT", {"default": 1.0, "min": 0.01, "max": 8.0, "step": 0.01}]
    assert method in spec["upscale_method"][0]

    def scaled(node: dict) -> np.ndarray:
        g = txt2img_graph()
        g["11"] = node
        g["9"]["inputs"]["images"] = ["11", 0]
        return comfy_image(client, g)

    by = scaled(
        {"class_type": "ImageScaleBy", "inputs": {"image": ["8", 0], "upscale_method": method, "scale_by": 1.3}}
    )
    inputs = {"image": ["8", 0], "upscale_method": method, "width": 83, "height": 83, "crop": "disabled"}
    assert by.shape == (83, 83, 3) and np.array_equal(by, scaled({"class_type": "ImageScale", "inputs": inputs}))


def test_vae_decode_tiled_decodes_in_tiles_close_to_vae_decode(client):
    """ComfyUI's VAEDecodeTiled (missing: a hires workflow decoding with it failed with missing_node_type): one
    tile as large as the image is VAE Decode exactly; small tiles are blended, close to it but not equal."""

    def decoded(node: dict, side: int = 128) -> np.ndarray:
        g = txt2img_graph()
        g["5"]["inputs"].update(width=side, height=side)
        g["8"] = node
        return comfy_image(client, g).astype(int)

    whole = decoded({"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}})
    tiled = {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["3", 0], "vae": ["4", 2], "tile_size": 512}}
    tiled["inputs"]["overlap"] = 64
    assert np.array_equal(decoded(tiled), whole)
    tiled["inputs"].update(tile_size=64, overlap=32)
    small = decoded(tiled)
    # the tiny model's GroupNorm statistics of 16x16-latent tiles differ from the whole image's: close, not equal
    assert not np.array_equal(small, whole) and np.abs(small - whole).mean() < 16, np.abs(small - whole).mean()
    tiled["inputs"].update(overlap=16)  # as ComfyUI, an overlap over a quarter of the tile was cut to a quarter
    assert np.array_equal(decoded(tiled), small)


def test_the_servers_limits_are_the_inputs_max_and_refused_by_prompt(client):
    """--max-side, --max-steps and --max-batch-size were checked only when a node ran, so a prompt with a
    4096-pixel latent, 500 steps or a batch of 100 was queued (200) and failed later with an execution_error.
    Now /object_info lists the server's limit as the input's max and /prompt refuses a value over it up front
    (400, ComfyUI's value_bigger_than_max naming the node and the limit); nothing is queued."""
    info = client.get("/object_info").json()
    latent = info["EmptyLatentImage"]["input"]["required"]
    assert [latent[k][1]["max"] for k in ("width", "height", "batch_size")] == [2048, 2048, 8]
    assert info["KSampler"]["input"]["required"]["steps"][1]["max"] == 150
    assert info["KSamplerAdvanced"]["input"]["required"]["steps"][1]["max"] == 150
    assert info["LatentUpscale"]["input"]["required"]["width"][1]["max"] == 2048
    assert info["ImageScale"]["input"]["required"]["height"][1]["max"] == 2048
    before = client.get("/queue").json()
    for node, inputs, name, limit in (
        ("5", {"width": 4096}, "width", 2048),
        ("5", {"batch_size": 100}, "batch_size", 8),
        ("3", {"steps": 500}, "steps", 150),
    ):
        g = txt2img_graph()
        g[node]["inputs"].update(inputs)
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 400, r.text
        (error,) = r.json()["node_errors"][node]["errors"]
        value = inputs[name]
        assert error["type"] == "value_bigger_than_max" and error["details"] == name, error
        assert error["message"] == f"Value {value} bigger than max of {limit}", error
    assert client.get("/queue").json() == before


def test_an_infinite_or_nan_input_is_a_400_naming_the_input(client):
    """JSON's 1e400 is read as infinity (NaN is accepted too): the node error echoed it as received_value, which
    JSON cannot hold, so /prompt answered 500 with no body. Now ComfyUI's 400 naming the node and the input."""
    for node, name, literal in (("5", "width", "1e400"), ("3", "cfg", "NaN"), ("3", "steps", "-1e400")):
        g = txt2img_graph()
        g[node]["inputs"][name] = "@@"
        body = json.dumps({"prompt": g}).replace('"@@"', literal)
        r = client.post("/prompt", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 400, (name, r.status_code, r.text)
        if literal == "NaN":  # a bare word JSON has not: the body is refused whole, naming it
            assert "NaN" in r.json()["detail"], r.text
            continue
        (error,) = r.json()["node_errors"][node]["errors"]
        assert error["extra_info"]["input_name"] == name and isinstance(error["extra_info"]["received_value"], str)


def test_clip_set_last_layer_past_the_encoders_depth_reads_its_last_layer(tiny_sd1_folder, tiny_emoji_folder):
    """As ComfyUI (SDClipModel.set_clip_options: a layer past the depth is "last"), stop_at_clip_layer -24 on a
    CLIP of fewer layers reads its last layer, as -1 does; it once failed at CLIPTextEncode with "clip_skip must
    be an integer in 1..12, got 24" (A1111's terms). -n (the depth itself) is still the first layer's output.
    The emoji model's MiniLM has no CLIP layers: any other layer than -1 is a node error in ComfyUI's terms."""
    import sdengine
    from sdengine.server.comfy.nodes import ClipHandle, NodeError, RunContext, clip_set_last_layer, clip_text_encode

    def encoded(pipe, layer: int) -> torch.Tensor:
        ctx = RunContext(pipeline=lambda ref: pipe, catalog=None, folders=None)  # type: ignore[arg-type]
        (clip,) = clip_set_last_layer(ctx, ClipHandle("x"), layer)
        with torch.inference_mode():
            (got,) = clip_text_encode(ctx, "a red apple", clip)[0]
        return got.cond["crossattn"].clone()

    pipe = sdengine.load_pipeline(tiny_sd1_folder, device="cpu")
    n = int(pipe.conditioner.text_encoder.config.num_hidden_layers)
    last = encoded(pipe, -1)
    assert torch.equal(encoded(pipe, -(n + 1)), last) and torch.equal(encoded(pipe, -24), last)
    assert not torch.equal(encoded(pipe, -n), last)

    emoji = sdengine.load_pipeline(tiny_emoji_folder, device="cpu")
    assert encoded(emoji, -1).shape[0] == 1
    with pytest.raises(NodeError, match=r"^stop_at_clip_layer -24 does not apply to .*MiniLM.*\(use -1"):
        encoded(emoji, -24)


def test_save_image_never_writes_over_a_file_another_server_took(tmp_path, monkeypatch):
    """Two servers sharing an outputs folder each hold their own lock: both could list the folder, pick the same
    counter, and the later save wrote over the earlier image. Each file is now created exclusively and an image
    whose number was taken since the listing moves to the next one. The listing is made to miss the other
    server's file here (it was written after the listing), deterministically."""
    import pathlib
    import threading

    from sdengine.server.comfy.nodes import Outputs, RunContext, save_image

    folders = Outputs(output=tmp_path / "out", input=tmp_path / "in", temp=tmp_path / "temp")
    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=folders, save_lock=threading.Lock())
    (tmp_path / "out").mkdir()
    theirs = tmp_path / "out" / "shot_00001_.png"
    theirs.write_bytes(b"the other server's image")
    listed = pathlib.Path.iterdir
    monkeypatch.setattr(pathlib.Path, "iterdir", lambda self: iter(()) if self == theirs.parent else listed(self))
    out = save_image(ctx, torch.full((2, 8, 8, 3), 0.5), "shot")
    assert [im["filename"] for im in out["ui"]["images"]] == ["shot_00002_.png", "shot_00003_.png"]
    assert theirs.read_bytes() == b"the other server's image"
    assert Image.open(tmp_path / "out" / "shot_00003_.png").size == (8, 8)


def test_view_takes_the_folder_from_subfolder_only_as_comfyui(client, server):
    """ComfyUI's /view refuses a filename that starts with "/" or holds "..", and serves only its last part
    (os.path.basename) from the folder `subfolder` names: `filename=sub/x.png` is x.png of the output folder
    itself. sdengine once served sub/x.png, so a client got another file than ComfyUI would give it."""
    out = Path(server.services.config.outputs_dir)
    sub = out / f"viewsub-{uuid.uuid4().hex[:8]}"
    sub.mkdir(parents=True)
    name = f"v-{uuid.uuid4().hex[:8]}.png"
    top, inner = png_bytes(Image.new("RGB", (4, 4), "red")), png_bytes(Image.new("RGB", (4, 4), "blue"))
    (out / name).write_bytes(top)
    (sub / name).write_bytes(inner)
    (sub / "only-in-sub.png").write_bytes(inner)
    r = client.get("/view", params={"filename": f"{sub.name}/{name}"})
    assert r.status_code == 200 and r.content == top
    assert client.get("/view", params={"filename": name, "subfolder": sub.name}).content == inner
    assert client.get("/view", params={"filename": f"{sub.name}/only-in-sub.png"}).status_code == 404
    for bad in ("/x.png", "a..b.png", f"{sub.name}/../{name}"):
        r = client.get("/view", params={"filename": bad})
        assert r.status_code == 400 and str(out) not in r.text, (bad, r.text)


def test_an_off_factor_size_and_a_fractional_int_run_as_comfyui(client):
    """As ComfyUI: EmptyLatentImage takes width // 8 x height // 8 latent pixels (here the emoji VAE's factor 4),
    so 65x66 makes the 64x64 image, and an INT input is converted with int(): steps 2.7 runs 2 steps. sdengine
    once failed 65 at KSampler ("not a multiple of the VAE factor") and refused 2.7 (invalid_input_type)."""
    g = txt2img_graph()
    g["3"]["inputs"].update(steps=2, seed=5)
    want = comfy_image(client, g)
    g["5"]["inputs"].update(width=65, height=66)
    g["3"]["inputs"].update(steps=2.7, latent_image=[5, 0])  # a node id sent as a number is taken as its text
    got = comfy_image(client, g)
    assert got.shape == want.shape == (64, 64, 3) and np.array_equal(got, want)
    g["3"]["inputs"].update(steps="2.7")  # int("2.7") fails in ComfyUI too
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 400 and r.json()["node_errors"]["3"]["errors"][0]["type"] == "invalid_input_type"


def test_conditioning_average_and_concat_as_comfyui(client):
    """ComfyUI's ConditioningAverage and ConditioningConcat (once missing_node_type): strength 1 is
    conditioning_to itself, 0 the first entry of conditioning_from (tokens and the pooled vector alike, so the same
    image as that prompt alone); Concat appends conditioning_from's tokens to conditioning_to's."""
    from sdengine.latent_sampling import TextCondition
    from sdengine.server.comfy.nodes import conditioning_average, conditioning_concat

    def with_positive(node: dict | None, positive: list) -> np.ndarray:
        g = txt2img_graph()
        if node is not None:
            g["60"] = node
        g["3"]["inputs"]["positive"] = positive
        return comfy_image(client, g)

    def average(strength: float) -> dict:
        inputs = {"conditioning_to": ["6", 0], "conditioning_from": ["7", 0], "conditioning_to_strength": strength}
        return {"class_type": "ConditioningAverage", "inputs": inputs}

    prompt_alone, negative_alone = with_positive(None, ["6", 0]), with_positive(None, ["7", 0])
    assert not np.array_equal(prompt_alone, negative_alone)
    assert np.array_equal(with_positive(average(1.0), ["60", 0]), prompt_alone)
    assert np.array_equal(with_positive(average(0.0), ["60", 0]), negative_alone)
    concat = {
        "class_type": "ConditioningConcat",
        "inputs": {"conditioning_to": ["6", 0], "conditioning_from": ["7", 0]},
    }
    assert with_positive(concat, ["60", 0]).shape == (64, 64, 3)

    to = [TextCondition({"crossattn": torch.ones(1, 4, 3), "vector": torch.ones(1, 2)})]
    frm = [TextCondition({"crossattn": torch.full((1, 2, 3), 3.0), "vector": torch.zeros(1, 2)})]
    ((got,),) = conditioning_concat(None, to, frm)  # type: ignore[arg-type]
    assert got.cond["crossattn"].shape == (1, 6, 3) and torch.equal(
        got.cond["crossattn"][:, 4:], frm[0].cond["crossattn"]
    )
    assert torch.equal(got.cond["vector"], to[0].cond["vector"])
    ((avg,),) = conditioning_average(None, to, frm, 0.25)  # type: ignore[arg-type]
    want = torch.tensor([[[3.0 * 0.75 + 0.25] * 3] * 2 + [[0.25] * 3] * 2])  # from's 2 tokens, then zeros
    assert torch.allclose(avg.cond["crossattn"], want) and torch.allclose(avg.cond["vector"], torch.full((1, 2), 0.25))


def test_latent_from_batch_and_repeat_latent_batch_keep_each_rows_noise(client):
    """ComfyUI's LatentFromBatch and RepeatLatentBatch (once missing_node_type). A row cut out of a batch records
    its row (batch_index) and, under ComfyUI's seed rule, gets the noise it has in the whole batch: the same image
    as that row of the batch, not the batch's first row. Repeating an empty latent is a larger batch."""

    def images(g: dict) -> list[np.ndarray]:
        r = client.post("/prompt", json={"prompt": g})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "success", h["status"]
        ims = h["outputs"]["9"]["images"]
        return [np.asarray(Image.open(io.BytesIO(client.get("/view", params=im).content)).convert("RGB")) for im in ims]

    g = txt2img_graph()
    g["3"]["inputs"].update(seed=21, steps=2)
    g["5"]["inputs"].update(width=32, height=32)
    g["5"]["inputs"]["batch_size"] = 3
    whole = images(g)
    g["50"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["5", 0], "batch_index": 1, "length": 5}}
    g["3"]["inputs"]["latent_image"] = ["50", 0]
    cut = images(g)  # rows 1 and 2 (the length cut to the batch)
    assert len(cut) == 2
    assert np.abs(cut[0].astype(int) - whole[1]).max() <= 2 and np.abs(cut[1].astype(int) - whole[2]).max() <= 2
    assert np.abs(cut[0].astype(int) - whole[0]).mean() > 5  # not the first row's noise
    g["51"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["50", 0], "amount": 2}}
    g["3"]["inputs"]["latent_image"] = ["51", 0]
    again = images(g)  # rows 1, 2, then 3, 4 (as ComfyUI numbers the copies)
    assert len(again) == 4 and np.abs(again[1].astype(int) - whole[2]).max() <= 2
    g = txt2img_graph()
    g["3"]["inputs"].update(seed=21, steps=2)
    g["5"]["inputs"].update(width=32, height=32)
    g["51"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["5", 0], "amount": 3}}
    g["3"]["inputs"]["latent_image"] = ["51", 0]
    assert all(np.abs(a.astype(int) - b).max() <= 2 for a, b in zip(images(g), whole, strict=True))


def test_image_batch_appends_image2_scaled_to_image1s_size():
    """ComfyUI's ImageBatch (once missing_node_type): image2's rows after image1's, image2 scaled to image1's size
    (bilinear, cut to the aspect around its centre) when they differ."""
    from sdengine.server.comfy.nodes import RunContext, image_batch, image_scale

    ctx = RunContext(pipeline=lambda ref: None, catalog=None, folders=None)  # type: ignore[arg-type]
    a = torch.rand(2, 8, 12, 3, generator=torch.Generator().manual_seed(0))
    b = torch.rand(1, 16, 16, 3, generator=torch.Generator().manual_seed(1))
    (out,) = image_batch(ctx, a, b)
    assert out.shape == (3, 8, 12, 3) and torch.equal(out[:2], a)
    (want,) = image_scale(ctx, b, "bilinear", 12, 8, "center")
    assert torch.allclose(out[2:], want, atol=1e-6)
    (same,) = image_batch(ctx, a, a[:1])
    assert torch.equal(same, torch.cat([a, a[:1]]))
    with pytest.raises(Exception, match="batch_size 9 is over the server's limit of 8"):
        image_batch(ctx, torch.zeros(8, 4, 4, 3), torch.zeros(1, 4, 4, 3))


# ----------------------------------------------------------------------------- custom sampling (SIGMAS nodes)


def _custom_graph(sampler: str = "dpmpp_2m", scheduler: str = "karras") -> dict:
    """txt2img_graph's KSampler (node 3, saved by 9) beside the same run by the custom-sampling nodes."""

    def decode_preview(g: dict, sample: str, at: int, out: int = 0) -> None:
        g[str(at)] = {"class_type": "VAEDecode", "inputs": {"samples": [sample, out], "vae": ["4", 2]}}
        g[str(at + 1)] = {"class_type": "PreviewImage", "inputs": {"images": [str(at), 0]}}

    def custom(sigmas: list, latent: list, add_noise: bool = True) -> dict:
        return {
            "class_type": "SamplerCustom",
            "inputs": {
                "model": ["4", 0],
                "add_noise": add_noise,
                "noise_seed": SEED,
                "cfg": 5.0,
                "positive": ["6", 0],
                "negative": ["7", 0],
                "sampler": ["50", 0],
                "sigmas": sigmas,
                "latent_image": latent,
            },
        }

    def adv(latent: list, start: int, end: int, add_noise: str, leftover: str) -> dict:
        return {
            "class_type": "KSamplerAdvanced",
            "inputs": {
                "add_noise": add_noise,
                "noise_seed": SEED,
                "steps": STEPS,
                "cfg": 5.0,
                "sampler_name": sampler,
                "scheduler": scheduler,
                "positive": ["6", 0],
                "negative": ["7", 0],
                "latent_image": latent,
                "model": ["4", 0],
                "start_at_step": start,
                "end_at_step": end,
                "return_with_leftover_noise": leftover,
            },
        }

    g = txt2img_graph(sampler=sampler, scheduler=scheduler)
    g["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
    g["51"] = {
        "class_type": "BasicScheduler",
        "inputs": {"model": ["4", 0], "scheduler": scheduler, "steps": STEPS, "denoise": 1.0},
    }
    g["52"] = custom(["51", 0], ["5", 0])  # the whole schedule: KSampler's image
    decode_preview(g, "52", 53)
    decode_preview(g, "52", 55, out=1)  # denoised_output: the output itself at sigma 0
    # SplitSigmas hands over after step 2, as KSamplerAdvanced 0..2 (leftover noise) then 2..end (no noise)
    g["60"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["51", 0], "step": 2}}
    g["61"] = custom(["60", 0], ["5", 0])
    g["62"] = custom(["60", 1], ["61", 0], add_noise=False)
    decode_preview(g, "62", 63)
    g["70"] = adv(["5", 0], 0, 2, "enable", "enable")
    g["71"] = adv(["70", 0], 2, 10000, "disable", "disable")
    decode_preview(g, "71", 72)
    # SamplerCustomAdvanced with RandomNoise and CFGGuider: SamplerCustom's image
    g["80"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    g["81"] = {
        "class_type": "CFGGuider",
        "inputs": {"model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 5.0},
    }
    g["82"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {"noise": ["80", 0], "guider": ["81", 0], "sampler": ["50", 0], "sigmas": ["51", 0],
                   "latent_image": ["5", 0]},
    }  # fmt: skip
    decode_preview(g, "82", 83)
    return g


def _all_images(client: httpx.Client, g: dict) -> dict[str, np.ndarray]:
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "success", h["status"]
    return {
        nid: np.asarray(Image.open(io.BytesIO(client.get("/view", params=o["images"][0]).content)).convert("RGB"))
        for nid, o in h["outputs"].items()
    }


@pytest.mark.parametrize("sampler, scheduler", [("dpmpp_2m", "karras"), ("euler_ancestral", "normal")])
def test_custom_sampling_nodes_equal_ksampler(client, sampler, scheduler):
    """KSamplerSelect + BasicScheduler + SamplerCustom is KSampler bit for bit, SplitSigmas between two SamplerCustom
    is KSamplerAdvanced's hand-off, SamplerCustomAdvanced + RandomNoise + CFGGuider is SamplerCustom."""
    out = _all_images(client, _custom_graph(sampler, scheduler))
    ksampler = out["9"]
    assert np.array_equal(out["54"], ksampler)
    assert np.array_equal(out["56"], ksampler)
    assert np.array_equal(out["84"], ksampler)
    assert np.array_equal(out["64"], out["73"])


def test_ksampler_karras_walks_comfyuis_list(client):
    """KSampler euler + karras walks ComfyUI's Karras list (k-diffusion's between the model's sigma_min and
    sigma_max), bit for bit the run of SamplerCustom on the list a KarrasScheduler of those ends gives; it once
    walked diffusers' Euler grid, which on the emoji model's `leading` config starts at 5.9, not at 14.6."""
    from sdengine.diffusion import sampling

    pipe = shared_loader("emoji", "cpu")
    table = pipe.noise_schedule.sigmas
    lo, hi = float(table[0]), float(table[-1])
    steps = 3
    old = sampling.make_grid("euler", steps, pipe.noise_schedule, "karras", pipe.scheduler_config).sigmas
    assert float(old[0]) < 0.5 * hi  # diffusers' grid on a leading config
    g = txt2img_graph(sampler="euler", scheduler="karras")
    g["3"]["inputs"]["steps"] = steps
    g["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    for a, (top, bottom) in ((6, (hi, lo)), (7, (float(old[0]), float(old[-2])))):
        g[f"{a}1"] = {"class_type": "KarrasScheduler",
                      "inputs": {"steps": steps, "sigma_max": top, "sigma_min": bottom, "rho": 7.0}}  # fmt: skip
        g[f"{a}2"] = {"class_type": "SamplerCustom", "inputs": {
            "model": ["4", 0], "add_noise": True, "noise_seed": SEED, "cfg": 5.0, "positive": ["6", 0],
            "negative": ["7", 0], "sampler": ["50", 0], "sigmas": [f"{a}1", 0], "latent_image": ["5", 0]}}  # fmt: skip
        g[f"{a}3"] = {"class_type": "VAEDecode", "inputs": {"samples": [f"{a}2", 0], "vae": ["4", 2]}}
        g[f"{a}4"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{a}3", 0]}}
    out = _all_images(client, g)
    ksampler, comfy_list, diffusers_grid = (out[k].astype(int) for k in ("9", "64", "74"))
    assert np.array_equal(ksampler, comfy_list)
    assert np.abs(ksampler - diffusers_grid).mean() > 1


def test_custom_sampling_other_sigmas_and_bad_inputs(client):
    g = txt2img_graph(sampler="euler", scheduler="karras")
    g["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["51"] = {"class_type": "AlignYourStepsScheduler", "inputs": {"model_type": "SD1", "steps": STEPS, "denoise": 1.0}}
    g["52"] = {
        "class_type": "SamplerCustomAdvanced",
        "inputs": {"noise": ["80", 0], "guider": ["81", 0], "sampler": ["50", 0], "sigmas": ["51", 0],
                   "latent_image": ["5", 0]},
    }  # fmt: skip
    g["80"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    g["81"] = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0], "conditioning": ["6", 0]}}
    g["53"] = {"class_type": "VAEDecode", "inputs": {"samples": ["52", 0], "vae": ["4", 2]}}
    g["54"] = {"class_type": "PreviewImage", "inputs": {"images": ["53", 0]}}
    # BasicScheduler at denoise 0: no sigma, the latent passes through (ComfyUI's rule, as KSampler's denoise 0)
    g["60"] = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": 4,
                                                          "denoise": 0.0}}  # fmt: skip
    g["61"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": 1, "cfg": 5.0, "positive": ["6", 0],
        "negative": ["7", 0], "sampler": ["50", 0], "sigmas": ["60", 0], "latent_image": ["3", 0]}}  # fmt: skip
    g["62"] = {"class_type": "VAEDecode", "inputs": {"samples": ["61", 0], "vae": ["4", 2]}}
    g["63"] = {"class_type": "PreviewImage", "inputs": {"images": ["62", 0]}}
    out = _all_images(client, g)
    ays, base = out["54"], out["9"]
    assert np.array_equal(out["63"], base)  # passed through
    assert ays.std() > 10 and np.abs(ays.astype(int) - base).mean() > 0  # a picture, and another schedule's

    # a SIGMAS link into a LATENT input: ComfyUI's return_type_mismatch, before anything runs
    bad = {k: g[k] for k in ("4", "51")}
    bad["53"] = {"class_type": "VAEDecode", "inputs": {"samples": ["51", 0], "vae": ["4", 2]}}
    bad["54"] = g["54"]
    r = client.post("/prompt", json={"prompt": bad})
    assert r.status_code == 400, r.text
    assert "return_type_mismatch" in [e["type"] for e in r.json()["node_errors"]["53"]["errors"]]

    # sigmas that rise (sigma_min above sigma_max), and a timestep sampler on a free sigma list: the node fails
    for sigmas, sampler, words in ((5.0, "euler", "decreasing"), (0.5, "ddim", "its own timestep grid")):
        g2 = dict(g)
        g2["51"] = {"class_type": "KarrasScheduler",
                    "inputs": {"steps": 3, "sigma_max": 1.0, "sigma_min": sigmas, "rho": 7.0}}  # fmt: skip
        g2["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": sampler}}
        r = client.post("/prompt", json={"prompt": g2})
        assert r.status_code == 200, r.text
        h = wait_history(client, r.json()["prompt_id"])
        assert h["status"]["status_str"] == "error"
        (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
        assert err["node_id"] == "52" and words in err["exception_message"], err


@pytest.mark.slow
def test_flip_sigmas_unsamples_and_resamples(client):
    """ComfyUI's unsampling: FlipSigmas + SamplerCustom (add_noise off, euler) walks an image's latent up to noise,
    SamplerCustom on the same schedule brings it back: with a BasicScheduler (whose SIGMAS run on euler's own grid,
    and so do their flip, reversed) and with a free sigma list (KarrasScheduler, walked as it is)."""
    g = txt2img_graph(sampler="euler", scheduler="karras", cfg=1.0)
    g["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    custom = {"model": ["4", 0], "add_noise": False, "noise_seed": 5, "cfg": 1.0, "positive": ["6", 0],
              "negative": ["7", 0], "sampler": ["50", 0]}  # fmt: skip
    g["51"] = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "karras", "steps": 12,
                                                          "denoise": 1.0}}  # fmt: skip
    g["61"] = {"class_type": "KarrasScheduler",
               "inputs": {"steps": 12, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}}  # fmt: skip
    for a in (5, 6):  # nodes 5x: BasicScheduler's, 6x: KarrasScheduler's
        g[f"{a}2"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": [f"{a}1", 0]}}
        g[f"{a}3"] = {"class_type": "SamplerCustom",
                      "inputs": {**custom, "sigmas": [f"{a}2", 0], "latent_image": ["3", 0]}}  # fmt: skip
        g[f"{a}4"] = {"class_type": "SamplerCustom",
                      "inputs": {**custom, "sigmas": [f"{a}1", 0], "latent_image": [f"{a}3", 0]}}  # fmt: skip
        for k, src in ((5, f"{a}4"), (7, f"{a}3")):  # the image back, and the unsampled noise
            g[f"{a}{k}"] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": ["4", 2]}}
            g[f"{a}{k + 1}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"{a}{k}", 0]}}
    out = _all_images(client, g)
    start = out["9"].astype(float)
    for a in (5, 6):
        noisy, back = out[f"{a}8"].astype(float), out[f"{a}6"].astype(float)
        assert np.abs(noisy - start).mean() > 50, a  # the unsampled latent is noise
        assert np.abs(back - start).mean() < 4, a  # of 255: the round trip lands back on the image


def test_flip_sigmas_with_a_sampler_that_draws_noise_fails_at_its_node(client):
    """Rising sigmas (FlipSigmas) with an ancestral sampler, which would add noise sized for falling sigmas: the
    SamplerCustom fails before any step, in one line naming the sampler."""
    g = txt2img_graph()
    del g["3"], g["8"], g["9"]
    g["50"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler_ancestral"}}
    g["51"] = {"class_type": "KarrasScheduler",
               "inputs": {"steps": 3, "sigma_max": 14.614642, "sigma_min": 0.0291675, "rho": 7.0}}  # fmt: skip
    g["52"] = {"class_type": "FlipSigmas", "inputs": {"sigmas": ["51", 0]}}
    g["53"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": False, "noise_seed": 5, "cfg": 1.0, "positive": ["6", 0],
        "negative": ["7", 0], "sampler": ["50", 0], "sigmas": ["52", 0], "latent_image": ["5", 0]}}  # fmt: skip
    g["55"] = {"class_type": "VAEDecode", "inputs": {"samples": ["53", 0], "vae": ["4", 2]}}
    g["56"] = {"class_type": "PreviewImage", "inputs": {"images": ["55", 0]}}
    r = client.post("/prompt", json={"prompt": g})
    assert r.status_code == 200, r.text
    h = wait_history(client, r.json()["prompt_id"])
    assert h["status"]["status_str"] == "error"
    (err,) = [m[1] for m in h["status"]["messages"] if m[0] == "execution_error"]
    msg = err["exception_message"]
    assert err["node_id"] == "53" and "euler_ancestral cannot walk rising sigmas" in msg and "\n" not in msg, err
