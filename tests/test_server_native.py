"""The native job API of ``sdengine serve`` against a live server on 127.0.0.1 (the emoji model, 64x64)."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from _live_server import live_server, server_config, shared_loader, wait_job

BASE = {"prompt": "a red apple", "steps": 3, "width": 64, "height": 64, "seed": 7}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("native")
    with live_server(server_config(tmp, max_queue=4)) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def emoji():
    return shared_loader("emoji", "cpu")


def png_of(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def fetch_image(client: httpx.Client, url: str) -> tuple[Image.Image, httpx.Response]:
    r = client.get(url)
    assert r.status_code == 200, r.text
    im = Image.open(io.BytesIO(r.content))
    im.load()
    return im, r


def run(client: httpx.Client, body: dict) -> dict:
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202, r.text
    return wait_job(client, r.json()["id"])


def test_lists_health_and_openapi(client):
    h = client.get("/healthz").json()
    assert h["status"] == "ok" and h["workers"][0]["device"] == "cpu"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["emoji"]
    assert client.get("/v1/models").json()["data"][0]["tiny_vae"] is True  # its vae_tiny/
    assert "emoji-fruit" in [x["name"] for x in client.get("/v1/loras").json()["loras"]]
    cn = client.get("/v1/controlnets").json()
    assert "emoji-controlnet-canny" in [x["name"] for x in cn["controlnets"]] and "canny" in cn["preprocessors"]
    s = client.get("/v1/samplers").json()
    assert any(x["name"] == "dpmpp_2m" and x["a1111"] == "DPM++ 2M" for x in s["samplers"])
    assert any(x["name"] == "euler_cfg_pp" for x in s["samplers"])  # every sampler, ComfyUI's own too
    spec = client.get("/openapi.json").json()
    for route in (
        "/v1/jobs",
        "/v1/jobs/{job_id}",
        "/v1/jobs/{job_id}/events",
        "/v1/uploads",
        "/sdapi/v1/txt2img",
        "/v1/images/generations",
    ):
        assert route in spec["paths"], route


def test_job_image_equals_python_api_and_is_saved_with_parameters(client, server):
    j = run(client, BASE)
    assert j["state"] == "done", j
    assert j["step"] == j["steps"] == 3 and len(j["images"]) == 1
    im, r = fetch_image(client, j["images"][0]["url"])
    assert r.headers["content-type"] == "image/png" and r.headers["x-content-type-options"] == "nosniff"
    assert im.info["parameters"] == j["infotexts"][0]
    assert "Seed: 7" in j["infotexts"][0] and "Steps: 3" in j["infotexts"][0]
    ref = emoji()(progress=False, **BASE)
    assert ref.infotexts[0] == j["infotexts"][0]
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
    saved = Path(server.services.config.outputs_dir) / j["images"][0]["name"]
    assert saved.is_file()


def test_a1111_clip_skip_rule_and_masked_content_fields(client):
    """The job's clip_skip_rule "a1111" (what the page sends for an A1111 image's Clip skip) runs the MiniLM
    model as at clip skip 1, where sdengine's own clip_skip 2 is refused; masked_content is A1111's latent fill."""
    j = run(client, {**BASE, "clip_skip": 2, "clip_skip_rule": "a1111"})
    assert j["state"] == "done", j
    ref = emoji()(progress=False, **BASE)
    im, _ = fetch_image(client, j["images"][0]["url"])
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
    assert "Clip skip: 2, Clip skip rule: a1111" in j["infotexts"][0]
    bad = client.post("/v1/jobs", json={**BASE, "clip_skip": 2})
    assert bad.status_code == 202  # refused by the model, when the job runs
    assert "clip_skip 2 does not apply" in wait_job(client, bad.json()["id"])["error"]
    bad = client.post("/v1/jobs", json={**BASE, "clip_skip_rule": "comfy"})
    assert bad.status_code == 422 and "clip_skip_rule" in bad.text
    init = client.post("/v1/uploads", files={"file": ("i.png", png_of(Image.new("RGB", (64, 64), "red")))}).json()
    mask = client.post("/v1/uploads", files={"file": ("m.png", png_of(Image.new("L", (64, 64), 255)))}).json()
    body = {**BASE, "init_image": init["id"], "mask": mask["id"], "strength": 1.0, "strength_rule": "a1111"}
    j = run(client, {**body, "masked_content": "latent nothing"})
    assert j["state"] == "done" and "Masked content: latent nothing" in j["infotexts"][0], j


def test_events_stream_progress_previews_and_the_result(client):
    jid = client.post("/v1/jobs", json={**BASE, "steps": 4, "seed": 11}).json()["id"]
    events = []
    with client.stream("GET", f"/v1/jobs/{jid}/events") as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
                if name in ("done", "failed", "cancelled"):
                    break
    assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 1
    steps = [d["step"] for n, d in events if n == "progress" and d["state"] == "running"]
    assert steps == sorted(steps) and max(steps) >= 3
    previews = [d["preview"] for n, d in events if "preview" in d]
    assert previews and previews[0].startswith("data:image/png;base64,")


def test_tiny_vae_decode_and_full_size_previews(client):
    """The emoji model ships a tiny VAE: previews are its full-size decode, and vae_decode "tiny" is its image."""
    j = run(client, {**BASE, "steps": 4, "vae_decode": "tiny"})
    assert j["state"] == "done", j
    ref = emoji()(progress=False, **BASE, vae_decode="tiny")
    assert "Tiny VAE: vae_tiny" in j["infotexts"][0] and ref.infotexts[0] != j["infotexts"][0]  # steps differ
    ref4 = emoji()(progress=False, **{**BASE, "steps": 4}, vae_decode="tiny")
    im, _ = fetch_image(client, j["images"][0]["url"])
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref4.images[0]))
    preview, r = fetch_image(client, f"/v1/jobs/{j['id']}/preview")
    assert preview.size == (64, 64)  # the tiny VAE's full size, not the 16x16 latent map
    r = client.post("/v1/jobs", json={**BASE, "vae_decode": "taesd"})
    assert r.status_code == 422


def test_cancel_running_job_stops_within_a_step_and_the_next_job_runs(client):
    long = client.post("/v1/jobs", json={**BASE, "steps": 150, "seed": 1}).json()["id"]
    # The worker may still be finishing the previous test's job: wait until it has taken this one, so the
    # positions below do not depend on thread scheduling.
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{long}").json()["state"] == "queued":
        assert time.monotonic() < deadline
        time.sleep(0.02)
    nxt = client.post("/v1/jobs", json={**BASE, "seed": 2}).json()
    queued = client.post("/v1/jobs", json={**BASE, "seed": 3}).json()
    assert nxt["position"] == 0 and queued["position"] == 1
    # Cancelling a queued job touches only that job.
    c = client.delete(f"/v1/jobs/{queued['id']}").json()
    assert c["state"] == "cancelled"
    deadline = time.monotonic() + 120
    while client.get(f"/v1/jobs/{long}").json()["step"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    t0 = time.monotonic()
    j = client.delete(f"/v1/jobs/{long}").json()
    took = time.monotonic() - t0
    assert j["state"] == "cancelled" and 2 <= j["step"] < 150, j
    per_step = (j["finished"] - j["started"]) / j["step"]
    assert took < 2 * per_step + 2.0, (took, per_step)
    after = wait_job(client, nxt["id"])
    assert after["state"] == "done" and "Seed: 2" in after["infotexts"][0]


def test_upload_img2img_and_inpaint_equal_python_api(client):
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    up = client.post("/v1/uploads", files={"file": ("init.png", png_of(init), "image/png")})
    assert up.status_code == 201 and up.json()["width"] == 64
    mid = client.post("/v1/uploads", content=png_of(mask), headers={"content-type": "image/png"}).json()["id"]
    body = {**BASE, "steps": 4, "init_image": up.json()["id"], "strength": 0.5, "mask": mid, "mask_blur": 2}
    j = run(client, body)
    assert j["state"] == "done", j
    im, _ = fetch_image(client, j["images"][0]["url"])
    ref = emoji()(progress=False, **{**body, "init_image": init, "mask": mask})
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
    assert "Denoising strength: 0.5" in j["infotexts"][0]


def test_an_init_image_and_mask_are_turned_upright_by_their_exif_orientation(client):
    """A phone's JPEG (pixels stored on their side, EXIF Orientation 6) was used as stored: the page shows it
    upright and paints the mask on that, so the job squashed the sideways pixels into the size and masked the
    wrong part. Init image and mask are now turned by their orientation first, as A1111's fix_image does."""
    upright = Image.fromarray(np.tile(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 64 wide, 32 high; Orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="PNG", exif=exif.tobytes())
    mask = Image.new("L", (32, 64), 0)
    mask.paste(255, (0, 0, 32, 24))
    mask_stored = mask.transpose(Image.Transpose.ROTATE_90)
    mbuf = io.BytesIO()
    mask_stored.save(mbuf, format="PNG", exif=exif.tobytes())
    ids = [
        client.post("/v1/uploads", content=data, headers={"content-type": "image/png"}).json()["id"]
        for data in (buf.getvalue(), mbuf.getvalue())
    ]
    body = {**BASE, "width": 32, "height": 64, "init_image": ids[0], "strength": 0.5, "mask": ids[1], "mask_blur": 0}
    j = run(client, body)
    assert j["state"] == "done", j
    im, _ = fetch_image(client, j["images"][0]["url"])
    ref = emoji()(progress=False, **{**body, "init_image": upright, "mask": mask})
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))


def test_tiling_and_seed_resize_are_the_python_apis_images(client):
    """A1111's Tiling and "Resize seed from", on the native route too (once only the A1111 route took them)."""
    for extra, want in (
        ({"tiling": True}, {"tiling": True}),
        ({"seed_resize_from": [48, 80]}, {"seed_resize_from_w": 48, "seed_resize_from_h": 80}),
    ):
        j = run(client, {**BASE, **extra})
        assert j["state"] == "done", j
        im, _ = fetch_image(client, j["images"][0]["url"])
        ref = emoji()(progress=False, **BASE, **want)
        np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
        assert j["infotexts"][0] == ref.infotexts[0]
    r = client.post("/v1/jobs", json={**BASE, "seed_resize_from": [48]})
    assert r.status_code == 422, r.text


def test_noise_source_nv_is_the_python_apis_image(client):
    """noise_source "nv" (NVIDIA's numbers, A1111's NV / GPU source) on the native route; another value is a 422."""
    j = run(client, {**BASE, "noise_source": "nv", "sampler": "euler_a"})
    assert j["state"] == "done", j
    im, _ = fetch_image(client, j["images"][0]["url"])
    ref = emoji()(progress=False, **{**BASE, "sampler": "euler_a"}, noise_source="nv")
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
    assert j["infotexts"][0] == ref.infotexts[0] and "RNG: NV" in ref.infotexts[0]
    r = client.post("/v1/jobs", json={**BASE, "noise_source": "gpu"})
    assert r.status_code == 422, r.text


def test_vae_encode_tiny_is_the_python_apis_image(client):
    """The emoji model's tiny VAE has an encoder (its models entry says so): an img2img job with vae_encode "tiny"
    gives the Python API's image."""
    assert client.get("/v1/models").json()["data"][0]["tiny_vae_encoder"] is True
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    up = client.post("/v1/uploads", files={"file": ("init.png", png_of(init), "image/png")}).json()["id"]
    body = {**BASE, "steps": 3, "init_image": up, "strength": 0.5, "vae_encode": "tiny"}
    j = run(client, body)
    assert j["state"] == "done" and "Tiny VAE encode: vae_tiny" in j["infotexts"][0], j
    im, _ = fetch_image(client, j["images"][0]["url"])
    ref = emoji()(progress=False, **{**body, "init_image": init})
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))
    assert client.post("/v1/jobs", json={**BASE, "vae_encode": "taesd"}).status_code == 422


def test_a_late_failure_fails_alone(tmp_path):
    """A LoRA file that is found by name but matches none of the model's layers: only loading it into the model
    finds that, so the job is queued and fails once it runs; the next job runs as usual. (SDXL settings on a model
    that is not SDXL, the example here once, are a 400 up front now: test_sdxl_settings_on_another_model_are_a_400;
    a hires schedule over the model's 1000 steps, the one before: test_a1111_fields.py.)"""
    from safetensors.torch import save_file

    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(
        {
            "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 8),
            "lora_unet_no_such_layer.lora_up.weight": torch.zeros(8, 2),
        },
        str(loras / "elsewhere.safetensors"),
    )
    with (
        live_server(server_config(tmp_path, max_queue=4, loras_dir=loras)) as s,
        httpx.Client(base_url=s.url, timeout=120) as c,
    ):
        bad = run(c, {**BASE, "loras": [{"name": "elsewhere"}]})
        assert bad["state"] == "failed", bad
        assert "none of its 1 layers match this model's layer names" in bad["error"], bad
        good = run(c, {**BASE, "seed": 5})
        assert good["state"] == "done"


def test_sdxl_settings_on_another_model_are_a_400(client):
    """The native field sdxl (SDXL's second prompts and micro-conditioning) on the emoji model (an SD 1.x-style
    model, its family read before it loads): a one-line 400 before the job is queued, as sd3 settings on a model
    that is not SD3, with the pipeline's own words."""
    r = client.post("/v1/jobs", json={**BASE, "sdxl": {"prompt_2": "a green pear"}})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "sdxl settings apply to SDXL models only; emoji is not one"
    assert client.get("/healthz").json()["queued"] == 0


def test_a_size_the_model_cannot_make_is_a_400_not_a_failed_job(client):
    """A width or height off the model's multiple was queued (202) and failed when it ran; the synchronous routes
    answer it with a 400, and so does the job route now, with the pipeline's own message."""
    for field, value, near in (("width", 60, 64), ("height", 70, 72)):
        r = client.post("/v1/jobs", json={**BASE, field: value})
        assert r.status_code == 400, r.text
        assert r.json()["detail"] == f"{field} {value} is not a multiple of 8; the nearest valid {field} is {near}"
    assert client.get("/healthz").json()["queued"] == 0


def test_bad_requests_are_400_or_422_with_one_line(client):
    r = client.post("/v1/jobs", json={**BASE, "sampler": "nope"})
    assert r.status_code == 400 and "unknown sampler" in r.json()["detail"]
    assert client.post("/v1/jobs", json={**BASE, "steps": 0}).status_code == 422
    assert client.post("/v1/jobs", json={**BASE, "loras": [{"name": "missing"}]}).status_code == 400
    r = client.post("/v1/jobs", json={**BASE, "init_image": "https://example.com/x.png"})
    assert r.status_code == 400 and "not fetched" in r.json()["detail"]
    assert client.get("/v1/jobs/doesnotexist").status_code == 404


def test_the_frameworks_own_errors_have_the_one_error_shape(client):
    """An unknown route, a wrong method and a broken multipart body answered `{"detail": ...}` only; OpenAI
    clients show `error.message`, so every error carries both."""
    for r, status in (
        (client.get("/v1/nothing-here"), 404),
        (client.put("/v1/jobs"), 405),
        (client.post("/v1/uploads", content=b"garbage", headers={"content-type": "multipart/form-data"}), 400),
        (client.post("/v1/uploads", files=[("file", ("a.png", b"x")), ("image", ("b.png", b"y"))]), 400),
    ):
        body = r.json()
        assert r.status_code == status and body["error"]["message"] == body["detail"] != "", (status, body)
    assert "POST" in client.put("/v1/jobs").headers["allow"]  # the framework's headers are kept


def test_loras_are_removed_after_each_job(client):
    plain = {**BASE, "prompt": "a green apple", "seed": 3}
    first = run(client, plain)
    with_lora = run(client, {**plain, "loras": [{"name": "emoji-fruit", "weight": 1.0}]})
    tagged = run(client, {**plain, "prompt": "a green apple <lora:emoji-fruit:0.5>"})
    again = run(client, plain)
    assert all(j["state"] == "done" for j in (first, with_lora, tagged, again))
    a = np.asarray(fetch_image(client, first["images"][0]["url"])[0])
    b = np.asarray(fetch_image(client, with_lora["images"][0]["url"])[0])
    c = np.asarray(fetch_image(client, tagged["images"][0]["url"])[0])
    d = np.asarray(fetch_image(client, again["images"][0]["url"])[0])
    assert not np.array_equal(a, b) and not np.array_equal(b, c)
    np.testing.assert_array_equal(a, d)
    assert "<lora:emoji-fruit:0.5>" in tagged["infotexts"][0]


def test_lora_unet_weight_and_per_part_tags(client):
    """A ``loras`` entry's ``unet_weight`` (and A1111's ``<lora:NAME:TE:UNET>`` / ``te=`` / ``unet=`` tags) give the
    U-Net layers their own multiplier; the infotext writes A1111's tag. emoji-fruit has U-Net layers only, so
    te 0.5 with U-Net 1 is the image of weight 1. A bad tag is a 400 with one line."""
    plain = {**BASE, "prompt": "a green apple", "seed": 3}
    split = run(client, {**plain, "loras": [{"name": "emoji-fruit", "weight": 0.5, "unet_weight": 1.0}]})
    tagged = run(client, {**plain, "prompt": "a green apple <lora:emoji-fruit:te=0.5:unet=1>"})
    full = run(client, {**plain, "loras": [{"name": "emoji-fruit", "weight": 1.0}]})
    half = run(client, {**plain, "loras": [{"name": "emoji-fruit", "weight": 0.5}]})
    assert all(j["state"] == "done" for j in (split, tagged, full, half))
    a, b, c, d = (np.asarray(fetch_image(client, j["images"][0]["url"])[0]) for j in (split, tagged, full, half))
    np.testing.assert_array_equal(a, c)
    np.testing.assert_array_equal(b, c)
    assert not np.array_equal(a, d)
    assert split["infotexts"][0].splitlines()[0] == "a green apple <lora:emoji-fruit:0.5:1>"
    for prompt in ("<lora:emoji-fruit:foo=1>", "<lora:emoji-fruit:unet=1:unet=2>", "<lora:emoji-fruit:te=abc>"):
        r = client.post("/v1/jobs", json={**plain, "prompt": prompt})
        assert r.status_code == 400 and "\n" not in r.json()["detail"] and "LoRA tag" in r.json()["detail"], r.text
    r = client.post("/v1/jobs", json={**plain, "loras": [{"name": "emoji-fruit", "unet_weight": 11}]})
    assert r.status_code in (400, 422), r.text


def test_controlnet_unit_by_name_with_a_preprocessor(client):
    src = Image.new("RGB", (64, 64), "white")
    src.paste((0, 0, 0), (20, 20, 44, 44))
    body = {
        **BASE,
        "controlnets": [
            {"model": "emoji-controlnet-canny", "image": png_b64(src), "preprocessor": "canny", "weight": 1.0}
        ],
    }
    j = run(client, body)
    assert j["state"] == "done", j
    assert "ControlNet 0: " in j["infotexts"][0] and "emoji-controlnet-canny" in j["infotexts"][0]


def test_a_controlnet_units_step_rule_is_the_python_apis(client):
    """A unit's `rule` (diffusers', A1111's extension's, ComfyUI's sigma window) on the native route: the same image
    as the Python API's ControlUnit with that rule (once the route had no way to ask for one)."""
    from sdengine.pipeline import ControlUnit
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    src = Image.new("RGB", (64, 64), "white")
    src.paste((0, 0, 0), (20, 20, 44, 44))
    images = {}
    for rule in ("diffusers", "a1111", "comfyui"):
        unit = {"model": "emoji-controlnet-canny", "image": png_b64(src), "end": 0.6, "rule": rule}
        j = run(client, {**BASE, "controlnets": [unit]})
        assert j["state"] == "done", j
        im, _ = fetch_image(client, j["images"][0]["url"])
        cu = ControlUnit(BUILTIN_CONTROLNETS["emoji-controlnet-canny"], src, 1.0, 0.0, 0.6, rule=rule)
        ref = emoji()(progress=False, **BASE, controlnets=[cu])
        images[rule] = np.asarray(im.convert("RGB"))
        np.testing.assert_array_equal(images[rule], np.asarray(ref.images[0]))
    assert not np.array_equal(images["diffusers"], images["a1111"])  # end 0.6 of 3 steps: 1 step there, 2 here
    r = client.post("/v1/jobs", json={**BASE, "controlnets": [{**unit, "rule": "forge"}]})
    assert r.status_code == 422, r.text


def test_an_unknown_control_mode_is_a_422(client):
    unit = {"model": "emoji-controlnet-canny", "image": png_b64(Image.new("RGB", (64, 64))), "mode": "guess"}
    r = client.post("/v1/jobs", json={**BASE, "controlnets": [unit]})
    assert r.status_code == 422 and "mode" in r.text and "'balanced', 'prompt' or 'controlnet'" in r.text, r.text


@pytest.mark.slow  # two generations; the modes' weights and rows are held fast in test_controlnet_modes.py
def test_a_controlnet_units_control_mode_is_the_python_apis(client):
    """A unit's `mode` (sd-webui-controlnet's control modes) on the native route: the Python API's ControlUnit with
    that mode, recorded in the infotext as the extension writes it; an unknown mode is a 422."""
    from sdengine.pipeline import ControlUnit
    from sdengine.server.catalog import BUILTIN_CONTROLNETS

    src = Image.new("RGB", (64, 64), "white")
    src.paste((0, 0, 0), (20, 20, 44, 44))
    unit = {"model": "emoji-controlnet-canny", "image": png_b64(src), "mode": "controlnet"}
    j = run(client, {**BASE, "controlnets": [unit]})
    assert j["state"] == "done", j
    assert "Control Mode: ControlNet is more important" in j["infotexts"][0]
    im, _ = fetch_image(client, j["images"][0]["url"])
    cu = ControlUnit(BUILTIN_CONTROLNETS["emoji-controlnet-canny"], src, mode="controlnet")
    ref = emoji()(progress=False, **BASE, controlnets=[cu])
    np.testing.assert_array_equal(np.asarray(im.convert("RGB")), np.asarray(ref.images[0]))


def test_a_controlnet_window_that_ends_before_it_starts_is_a_400(client):
    """start 0.8, end 0.2 was queued (202) and failed when it ran: now refused before anything is queued."""
    src = Image.new("RGB", (64, 64), "white")
    unit = {"model": "emoji-controlnet-canny", "image": png_b64(src), "start": 0.8, "end": 0.2}
    r = client.post("/v1/jobs", json={**BASE, "controlnets": [unit]})
    assert r.status_code == 400, r.text
    assert r.json()["detail"] == "ControlNet unit 0: start (0.8) must be less than end (0.2)"
    assert client.get("/healthz").json()["queued"] == 0


def png_b64(im: Image.Image) -> str:
    import base64

    return base64.b64encode(png_of(im)).decode()


def test_saved_png_parameters_regenerate_the_image(client, server):
    """What --from-png reads from a saved output gives the same image again."""
    from sdengine.metadata import parse_parameters, read_png_parameters, to_generate_kwargs

    j = run(client, {**BASE, "prompt": "a blue heart", "seed": 21, "sampler": "euler_a", "schedule": "normal"})
    path = Path(server.services.config.outputs_dir) / j["images"][0]["name"]
    kwargs = to_generate_kwargs(parse_parameters(read_png_parameters(path)))
    prompt = kwargs.pop("prompt")
    again = emoji()(prompt, progress=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(again.images[0]))


class SlowSteps:
    """A loader: the emoji pipeline with every sampler step made ``delay`` seconds longer (a long job on a tiny
    model), so that a shutdown finds a job running."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    def __call__(self, ref: str, device: str):
        pipe = shared_loader(ref, device)
        delay = self.delay

        class Slow:
            def __getattr__(self, name: str):
                return getattr(pipe, name)

            def __call__(self, callback=None, **kw):
                def slow(info):
                    time.sleep(delay)
                    return callback(info) if callback is not None else True

                return pipe(callback=slow, **kw)

        return Slow()


def start_server(tmp: Path, loader, grace: float, preload: bool = False, **config):
    """``sdengine serve``'s own uvicorn server (make_server) in a thread; its ``should_exit`` is what Ctrl-C sets."""
    import threading

    from _live_server import free_port
    from sdengine.server.app import create_app, make_server

    port = free_port()
    app = create_app(server_config(tmp, host="127.0.0.1", port=port, **config), loader=loader, preload=preload)
    server = make_server(app, host="127.0.0.1", port=port, grace=grace, log_level="warning", access_log=False)
    server.config.timeout_graceful_shutdown = 3  # the fallback that cuts streams off; the drain must come first
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


def final_event(url: str, job_id: str, out: dict) -> None:
    """Read a job's event stream to its end; ``out[job_id]`` = (last event name, its data) or the error."""
    try:
        name, data = None, None
        with httpx.stream("GET", f"{url}/v1/jobs/{job_id}/events", timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
        out[job_id] = (name, data)
    except Exception as e:  # noqa: BLE001 - a stream cut off is what the test looks for
        out[job_id] = (f"error: {type(e).__name__}", None)


def wait_state(url: str, job_id: str, state: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/v1/jobs/{job_id}").json()["state"] != state:
        assert time.monotonic() < deadline, f"job {job_id} never {state}"
        time.sleep(0.02)


def test_shutdown_ends_every_event_stream_with_the_jobs_final_state(tmp_path):
    """Ctrl-C with a job running and one queued, both watched: the queued one ends `cancelled` at once, the running
    one gets the grace period, then is cancelled at its next step, and both streams end with that final event
    (before, both streams waited for uvicorn's timeout and were cut off without one, the job still running)."""
    import threading

    server, thread, url = start_server(tmp_path, SlowSteps(0.1), grace=0.6)
    body = {**BASE, "steps": 150}
    running = httpx.post(f"{url}/v1/jobs", json=body).json()["id"]
    queued = httpx.post(f"{url}/v1/jobs", json={**body, "seed": 8}).json()["id"]
    wait_state(url, running, "running")
    out: dict = {}
    readers = [threading.Thread(target=final_event, args=(url, j, out)) for j in (running, queued)]
    for t in readers:
        t.start()
    time.sleep(0.3)  # both streams open
    t0 = time.monotonic()
    server.should_exit = True  # what Ctrl-C does
    for t in readers:
        t.join(20)
    thread.join(20)
    assert not thread.is_alive() and time.monotonic() - t0 < 15, time.monotonic() - t0  # bounded; the events say how
    name, data = out[queued]
    assert name == "cancelled" and data["error"] == "the server stopped before it started", out[queued]
    name, data = out[running]
    assert name == "cancelled" and "(the server stopped)" in data["error"] and data["step"] < 150, out[running]


def test_shutdown_lets_a_running_job_finish_within_the_grace_period(tmp_path):
    """A job that ends within the grace period is done, its image saved, though nobody watches it (before, with
    no open connection, the job was cancelled at once)."""
    server, thread, url = start_server(tmp_path, SlowSteps(0.1), grace=10)
    job = httpx.post(f"{url}/v1/jobs", json={**BASE, "steps": 8}).json()["id"]
    wait_state(url, job, "running")
    j = server.config.app.state.services.manager.get(job)
    server.should_exit = True
    thread.join(20)
    assert not thread.is_alive()
    assert j.state == "done" and len(j.images) == 1, (j.state, j.error)
    assert (tmp_path / "outputs" / j.images[0].name).is_file()


def test_a_queued_jobs_event_stream_follows_its_position(tmp_path):
    """Watching a queued job: when a job ahead of it leaves the queue (cancelled, or taken by the worker), its
    stream gets a progress event with the new position (before, it kept saying the first position until the job
    started, 15 s keep-alives apart)."""
    import threading

    gate = threading.Event()

    def gated(ref: str, device: str):
        pipe = shared_loader(ref, device)

        class Gated:
            def __getattr__(self, name: str):
                return getattr(pipe, name)

            def __call__(self, **kw):
                assert gate.wait(60), "the test never opened the gate"
                return pipe(**kw)

        return Gated()

    with (
        live_server(server_config(tmp_path, max_batch_jobs=1), loader=gated) as s,
        httpx.Client(base_url=s.url, timeout=30) as c,
    ):
        try:
            a, b, d, e = (c.post("/v1/jobs", json={**BASE, "seed": k}).json()["id"] for k in range(4))
            wait_state(s.url, a, "running")
            positions: list = []

            def watch() -> None:
                with httpx.stream("GET", f"{s.url}/v1/jobs/{e}/events", timeout=30) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            data = json.loads(line[6:])
                            positions.append(data["position"])
                            if data["state"] != "queued":
                                return

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            deadline = time.monotonic() + 10
            while positions != [2]:
                assert time.monotonic() < deadline, positions
                time.sleep(0.02)
            c.delete(f"/v1/jobs/{b}")  # b leaves the queue: only d is ahead of e now
            while positions[-1] != 1:
                assert time.monotonic() < deadline, positions
                time.sleep(0.02)
            gate.set()  # a finishes, d runs: e is next (0), then runs
            watcher.join(30)
            assert positions[:2] == [2, 1] and positions[-1] is None, positions  # then 0 (unless coalesced)
            assert all(p is None or p in (0, 1) for p in positions[2:]), positions
            assert wait_job(c, e)["state"] == "done" and wait_job(c, d)["state"] == "done"
        finally:
            gate.set()


def test_openapi_document_matches_the_servers_behaviour(tmp_path):
    """/openapi.json says what the server does: this server's limits on the job fields (it said 1000 steps and
    8192 pixels whatever the server took), the media types of the event stream, preview and images (it said JSON),
    the upload's body (it had none), the error answers; with a key, the document and /docs are public (as A1111
    serves them) and declare the bearer key, while the API still needs it."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    cfg = server_config(tmp_path, max_steps=40, max_side=512, max_batch=3, api_key="k3y")
    client = TestClient(create_app(cfg, loader=shared_loader, preload=False))  # no lifespan: nothing runs
    r = client.get("/openapi.json")
    assert r.status_code == 200, r.text
    spec = r.json()
    props = spec["components"]["schemas"]["JobRequest"]["properties"]
    assert props["steps"]["maximum"] == 40 and props["batch_size"]["maximum"] == 3
    assert (
        [o.get("maximum") for o in props["width"]["anyOf"]]
        == [512, None]
        == [o.get("maximum") for o in props["height"]["anyOf"]]
    )
    key = {"Authorization": "Bearer k3y"}
    for steps, status in ((40, 202), (41, 400)):  # the documented bound is the real one
        assert client.post("/v1/jobs", json={**BASE, "steps": steps}, headers=key).status_code == status
    for path, kind in (("/v1/jobs/{job_id}/events", "text/event-stream"), ("/v1/images/{name}", "image/png")):
        assert list(spec["paths"][path]["get"]["responses"]["200"]["content"]) == [kind]
    assert list(spec["paths"]["/v1/jobs/{job_id}/preview"]["get"]["responses"]["200"]["content"]) == ["image/png"]
    body = spec["paths"]["/v1/uploads"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary" and "image/png" in body
    assert {"400", "413", "429", "503"} <= set(spec["paths"]["/v1/jobs"]["post"]["responses"])
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert client.get("/docs").status_code == 200 and "swagger" in client.get("/docs").text.lower()
    assert client.get("/v1/models").status_code == 401 and client.post("/v1/jobs", json=BASE).status_code == 401


def test_a_file_another_writer_made_meanwhile_is_never_replaced(client, server):
    """The server numbers its files on from the folder as it was; an image another writer saved since under the
    next name (`sdengine generate --out` on the same folder with the same seed) was silently replaced. Now the
    server counts on past it."""
    first = run(client, {**BASE, "seed": 31})["images"][0]["name"]
    index = int(first.split("-")[0])
    outputs = server.services.config.outputs_dir
    theirs = {outputs / f"{index + k:05d}-31.png": f"another writer's image {k}".encode() for k in (1, 2)}
    theirs[outputs / f"{index + 5:05d}-99.png"] = b"a later number, another seed"
    for path, data in theirs.items():
        path.write_bytes(data)
    second = run(client, {**BASE, "seed": 31})["images"][0]["name"]
    assert all(path.read_bytes() == data for path, data in theirs.items())
    assert second == f"{index + 6:05d}-31.png", second  # on from the folder's highest number
    im, _ = fetch_image(client, f"/v1/images/{second}")
    assert im.size == (64, 64)


def test_finished_jobs_do_not_keep_their_input_images(client, server, monkeypatch):
    """The job table remembers hundreds of finished jobs; each kept its decoded init image, mask and control
    images (up to the pixel limit each: gigabytes over a day of img2img), though only its result's record is
    read after it finished. Beyond the newest finished jobs, the inputs are dropped; the record stays."""
    from sdengine.server import jobs

    monkeypatch.setattr(jobs, "KEEP_IMAGES", 1)
    init = Image.new("RGB", (64, 64), (200, 40, 40))
    up = client.post("/v1/uploads", content=png_of(init), headers={"content-type": "image/png"}).json()["id"]
    body = {**BASE, "steps": 2, "init_image": up, "strength": 0.5, "mask": up}
    unit = {"model": "emoji-controlnet-canny", "image": up, "preprocessor": "canny"}
    old = run(client, {**body, "controlnets": [unit]})
    new = run(client, body)
    assert old["state"] == new["state"] == "done"
    manager = server.services.manager
    kept, dropped = manager.get(new["id"]).generation, manager.get(old["id"]).generation
    assert kept.kwargs["init_image"] is not None and kept.kwargs["mask"] is not None  # the newest: as it ran
    assert dropped.kwargs["init_image"] is None and dropped.kwargs["mask"] is None
    assert [u.image for u in dropped.kwargs["controlnets"]] == [None]
    again = client.get(f"/v1/jobs/{old['id']}").json()
    assert again["infotexts"] == old["infotexts"] and again["images"][0]["url"] == old["images"][0]["url"]


def test_a_stopping_server_answers_503_with_retry_after(tmp_path):
    """While the server stops (the queue drained, the running jobs given their grace), a job sent on a kept-alive
    connection was a 429 "queue is full"; it is a 503 with Retry-After, which load balancers retry elsewhere."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    app = create_app(server_config(tmp_path), loader=shared_loader, preload=False)
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: no worker runs
    app.state.services.manager.stop(timeout=1)
    r = client.post("/v1/jobs", json=BASE)
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1 and "stopping" in r.json()["detail"]


def test_a_tiny_vae_the_model_lacks_is_a_400_not_a_failed_job(tmp_path):
    """GET /v1/models says a model has no tiny VAE, yet a job asking it for vae_decode "tiny" was queued (202) and
    failed when it ran; it is a 400 now, and the same job on a model with one runs."""
    from _emoji_models import make_tiny_emoji_folder

    make_tiny_emoji_folder(tmp_path / "models" / "tiny")
    with (
        live_server(server_config(tmp_path, models_dir=tmp_path / "models")) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        listed = {m["id"]: m["tiny_vae"] for m in c.get("/v1/models").json()["data"]}
        assert listed == {"emoji": True, "tiny": False}
        init = c.post(
            "/v1/uploads", content=png_of(Image.new("RGB", (64, 64), "red")), headers={"content-type": "image/png"}
        )
        for extra, words in (
            ({"vae_decode": "tiny"}, "vae_decode 'tiny' needs a tiny VAE and tiny has none"),
            ({"vae_encode": "tiny", "init_image": init.json()["id"]}, "vae_encode 'tiny' needs a tiny VAE with an"),
        ):
            r = c.post("/v1/jobs", json={**BASE, "model": "tiny", **extra})
            assert r.status_code == 400 and words in r.json()["detail"], r.text
        assert c.get("/healthz").json()["queued"] == 0
        assert run(c, {**BASE, "model": "emoji", "vae_decode": "tiny"})["state"] == "done"
        assert run(c, {**BASE, "model": "tiny"})["state"] == "done"  # loaded now: the pipeline is asked
        r = c.post("/v1/jobs", json={**BASE, "model": "tiny", "vae_decode": "tiny"})
        assert r.status_code == 400 and "tiny has none" in r.json()["detail"]


def test_readyz_says_when_the_server_can_run_jobs(tmp_path):
    """/healthz said "ok" from the first moment, while the default model was still loading, and forever after
    that load failed (every job then failing): a load balancer sent work to a server that could not do it.
    /readyz is 503 while loading and after a failed load (with the error), 200 once the model is there."""
    import threading

    gate = threading.Event()
    loads: list[str] = []

    def loader(ref: str, device: str):
        loads.append(ref)
        assert gate.wait(30), "the test never opened the gate"
        if len(loads) == 1:
            raise OSError("broken weights")
        return shared_loader(ref, device)

    server, thread, url = start_server(tmp_path, loader, grace=1, preload=True)
    try:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["workers"][0]["state"] == "loading", r.text
        h = httpx.get(f"{url}/healthz")
        assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["ready"] is False
        gate.set()
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{url}/readyz")).json()["workers"][0]["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        w = r.json()["workers"][0]
        assert r.status_code == 503 and w["state"] == "failed" and "broken weights" in w["error"], r.text
        job = httpx.post(f"{url}/v1/jobs", json=BASE).json()["id"]  # the next load works: the job runs
        with httpx.Client(base_url=url, timeout=30) as c:
            assert wait_job(c, job)["state"] == "done"
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 200 and r.json()["workers"][0]["state"] == "ready", r.text
        assert httpx.get(f"{url}/healthz").json()["ready"] is True
    finally:
        gate.set()
        server.should_exit = True
        thread.join(20)


def test_a_load_error_on_the_public_health_routes_is_for_key_holders_only(tmp_path):
    """/healthz and /readyz answer without a key (health checks); the load error they carry may name the model's
    files, so only a request with the key sees it."""

    def broken(ref: str, device: str):
        raise OSError("cannot read /secret/models/x.safetensors")

    server, thread, url = start_server(tmp_path, broken, grace=1, preload=True, api_key="k3y")
    try:
        deadline = time.monotonic() + 10
        while (r := httpx.get(f"{url}/readyz")).json()["workers"][0]["state"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert r.status_code == 503 and r.json()["workers"][0]["state"] == "failed"
        for route in ("/readyz", "/healthz"):
            public = httpx.get(f"{url}{route}").json()["workers"][0]["error"]
            keyed = httpx.get(f"{url}{route}", headers={"Authorization": "Bearer k3y"}).json()["workers"][0]["error"]
            assert "/secret" not in public and "hidden" in public, public
            assert "/secret/models/x.safetensors" in keyed, keyed
    finally:
        server.should_exit = True
        thread.join(20)


class CountedTinyVae:
    """The emoji model's tiny VAE, its decodes (the previews' cost) counted."""

    def __init__(self, tiny: Any) -> None:
        self.tiny = tiny
        self.decodes = 0

    def parameters(self) -> Any:
        return self.tiny.parameters()

    def decode(self, latents: Any) -> Any:
        self.decodes += 1
        return self.tiny.decode(latents)


def test_previews_are_decoded_only_when_someone_looks(tmp_path) -> None:
    """Nobody watches a job (no event stream): its previews cost nothing while it runs; A1111's progress and
    GET /preview decode the newest step's latents when asked (once per step), and an event stream gets them."""
    tiny = CountedTinyVae(emoji().tiny_vae)
    reached, gate = threading.Event(), threading.Event()

    class Held:  # the emoji pipeline, held after its step 4 until the gate opens
        def __getattr__(self, name: str) -> Any:
            return tiny if name == "tiny_vae" else getattr(emoji(), name)

        def __call__(self, **kw: Any) -> Any:
            callback = kw.pop("callback")

            def held(info: Any) -> bool:
                ok = callback(info)
                if info.step == 4 and not gate.is_set():
                    reached.set()
                    assert gate.wait(60), "the test never opened the gate"
                return ok

            return emoji()(**kw, callback=held)

    def loader(ref: str, device: str) -> Any:
        return Held()

    with live_server(server_config(tmp_path), loader=loader) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        jid = c.post("/v1/jobs", json={**BASE, "steps": 8}).json()["id"]
        assert reached.wait(60)
        assert tiny.decodes == 0  # steps 2 and 4 were preview steps: nothing decoded, nobody looked
        p = c.get("/sdapi/v1/progress").json()
        assert p["state"]["sampling_step"] == 4 and tiny.decodes == 1
        assert Image.open(io.BytesIO(base64.b64decode(p["current_image"]))).size == (64, 64)
        assert c.get("/sdapi/v1/progress").json()["current_image"] == p["current_image"] and tiny.decodes == 1
        gate.set()
        j = wait_job(c, jid)
        assert j["state"] == "done" and tiny.decodes == 1  # steps 6 and 8: not decoded either
        preview, _ = fetch_image(c, f"/v1/jobs/{jid}/preview")  # the last step's, decoded now
        assert preview.size == (64, 64) and tiny.decodes == 2
        gate.clear()
        reached.clear()
        jid = c.post("/v1/jobs", json={**BASE, "steps": 8}).json()["id"]
        assert reached.wait(60)
        before = tiny.decodes
        with c.stream("GET", f"/v1/jobs/{jid}/events") as r:
            gate.set()
            events = [line for line in r.iter_lines() if line.startswith("data:")]
        # the first event has the preview of step 4 (kept before the stream opened, decoded for it), the
        # later ones those the worker decoded as the watched job ran (steps 6, 8)
        assert '"step": 4' in events[0] and '"preview": "data:image/png;base64,' in events[0]
        assert tiny.decodes - before >= 3


def test_over_limit_answers_name_this_servers_limits_before_any_model_is_loaded(tmp_path):
    """The request model's fixed bounds answered first, so a width of 99999 was told "8192" on a server that takes
    2048 (and steps 5000 "1000" where 150 apply, batch_size 100 "64" where 8 apply); and a width over the model's
    own limit (emoji: 512) was queued (202) and failed when it ran whenever no worker held the model yet (the
    first request after start). Now each is a 400 up front that names the number that applies, native and OpenAI
    (plain and streamed) alike, and nothing is queued."""
    import openai
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    app = create_app(server_config(tmp_path, max_steps=150, max_side=2048, max_batch=8), loader=shared_loader)
    client = TestClient(app, base_url="http://127.0.0.1")  # no lifespan: no worker runs, no model is loaded
    for body, message in (
        ({"width": 99999}, "width must be in [8, 2048], got 99999"),
        ({"height": 8000}, "height must be in [8, 2048], got 8000"),
        ({"steps": 5000}, "steps must be in [1, 150], got 5000"),
        ({"batch_size": 100}, "batch_size must be in [1, 8], got 100"),
        ({"hires": {"hr_second_pass_steps": 5000}}, "hr_second_pass_steps must be in [0, 150], got 5000"),
        ({"hires": {"hr_resize_x": 9000}}, "hr_resize_x must be in [0, 2048], got 9000"),
        ({"width": 1024}, "width 1024 is over emoji's limit: each side may be at most 512 px"),
        # the hires fix's second pass (was queued and failed when it ran): by its scale or its target size
        ({"hires": {"hr_scale": 16}}, "the hires fix's width 1024 (from 64x64) is over emoji's limit"),
        ({"hires": {"hr_resize_y": 1000}}, "the hires fix's width 1000 (from 64x64) is over emoji's limit"),
        ({"hires": {"hr_scale": 0.05}}, "the hires size 0x0 (from 64x64) is below the model's size step 8"),
    ):
        r = client.post("/v1/jobs", json={**BASE, **body})
        assert r.status_code == 400 and r.json()["detail"].startswith(message), (body, r.text)
    # the list bounds are the builder's: 33 LoRAs were told "at most 32" (and 17 "at most 16"), 9 units "at most 8"
    lora, unit = {"name": "emoji-fruit"}, {"model": "emoji-controlnet-canny", "image": "x"}
    tags = " <lora:emoji-fruit:0.1>" * 7  # a prompt's tags count with the list
    for body, message in (
        ({"loras": [lora] * 33}, "loras: List should have at most 16 items"),
        ({"loras": [lora] * 10, "prompt": "x" + tags}, "at most 16 LoRAs per request, got 17"),
        ({"controlnets": [unit] * 9}, "controlnets: List should have at most 4 items"),
    ):
        r = client.post("/v1/jobs", json={**BASE, **body})
        assert r.status_code in (400, 422) and r.json()["error"]["message"].startswith(message), (body, r.text)
    assert app.state.services.manager.queued_count() == 0
    oa = openai.OpenAI(base_url="http://127.0.0.1/v1", api_key="x", http_client=client, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError, match="width 1024 is over emoji's limit") as e:
            oa.images.generate(prompt="x", size="1024x1024", stream=stream, extra_body={"steps": 2})
        assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match=r"width must be in \[8, 2048\], got 9000"):
        oa.images.generate(prompt="x", size="9000x64", extra_body={"steps": 2})
    assert app.state.services.manager.queued_count() == 0


def test_an_infinite_or_nan_number_is_a_4xx_on_every_route(tmp_path):
    """JSON's 1e400 is read as infinity and NaN is accepted by Python's reader; the refusal echoed the value,
    which JSON cannot hold, so every such request was a 500 (native, A1111, OpenAI). Now a 4xx naming the field."""
    from fastapi.testclient import TestClient

    from sdengine.server.app import create_app

    client = TestClient(create_app(server_config(tmp_path), loader=shared_loader), base_url="http://127.0.0.1")
    for path, body, field in (
        ("/v1/jobs", '{"prompt": "x", "steps": 1e400}', "steps"),
        ("/v1/jobs", '{"prompt": "x", "cfg_scale": NaN}', "cfg_scale"),
        ("/v1/jobs", '{"prompt": "x", "width": -1e400}', "width"),
        ("/sdapi/v1/txt2img", '{"prompt": "x", "steps": 1e400}', "steps"),
        ("/v1/images/generations", '{"prompt": "x", "n": 1e400}', "n"),
    ):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422), (path, body, r.status_code, r.text)
        message = r.json()["error"]["message"]
        assert message.startswith(f"{field}: ") and "\n" not in message, (path, message)


def test_job_json_reads_the_eta_once_while_the_job_finishes():
    """GET /v1/jobs/{id} read a job's eta twice (is it None? then round it): a job finishing between the two
    reads made round(None), a 500 (seen as a flaky JSONDecodeError of a test polling its job)."""
    from types import SimpleNamespace

    from sdengine.server.app import job_json
    from sdengine.server.jobs import Job

    class Finishing(Job):
        reads = 0

        @property
        def eta(self):  # a running job at the first read, finished at the next
            type(self).reads += 1
            return 1.234 if type(self).reads == 1 else None

    job = Finishing(generation=SimpleNamespace(model_name="m", kwargs={"steps": 4}, n_iter=1))  # type: ignore[arg-type]
    services = SimpleNamespace(manager=SimpleNamespace(position=lambda j: None))
    assert job_json(job, services)["eta"] in (1.23, None)  # type: ignore[arg-type]
