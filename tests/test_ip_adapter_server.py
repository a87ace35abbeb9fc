"""IP-Adapter on the server: the native job's ``ip_adapters``, the A1111 ControlNet extension's IP-Adapter units (the
real ``webuiapi`` client), OpenAI's ``extra_body`` (the real ``openai`` client); each job's image equals the Python
API called with the same unit (``IPAdapterUnit(file, images=picture, clip_vision=file)``) on the emoji model at
64x64, with tiny random adapters fitted to its U-Net and tiny random CLIP vision encoders; the 400s of each API."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import webuiapi
from PIL import Image

from _ip_models import random_adapter, random_encoder
from _live_server import live_server, run_job, server_config, shared_loader

transformers = pytest.importorskip("transformers")

from sdengine.pipeline.ip_adapter import IPAdapterUnit  # noqa: E402
from sdengine.weights.ip_adapter_file import save_ip_adapter  # noqa: E402

GEN = {"seed": 3, "steps": 3, "width": 64, "height": 64, "sampler": "dpmpp_2m", "schedule": "karras"}
PROMPT = "a red apple"
EMBED, HIDDEN = 24, 40  # encoder "small": image embedding 24, hidden 40; encoder "big": 48 and 64


def make_folders(tmp: Path) -> dict[str, Path]:
    """``tmp``/ipadapter (plain.safetensors, sub/plus.bin, big.safetensors, odd.safetensors, junk.safetensors) and
    ``tmp``/clip_vision (small: a folder; big.safetensors: a file) for the emoji model."""
    unet = shared_loader("emoji", "cpu").unet
    ipa, clip = tmp / "ipadapter", tmp / "clip_vision"
    (ipa / "sub").mkdir(parents=True)
    clip.mkdir()
    save_ip_adapter(
        random_adapter(unet, "plain", EMBED, 1, width=64, depth=1, heads=1, queries=4, jitter=0.5),
        ipa / "plain.safetensors",
    )
    save_ip_adapter(
        random_adapter(unet, "plus", HIDDEN, 2, width=64, depth=1, heads=1, queries=4, jitter=0.5),
        ipa / "sub" / "plus.bin",
    )
    save_ip_adapter(
        random_adapter(unet, "plain", 48, 3, width=64, depth=1, heads=1, queries=4, jitter=0.5), ipa / "big.safetensors"
    )  # fits the "big" encoder
    save_ip_adapter(
        random_adapter(unet, "plain", 32, 4, width=64, depth=1, heads=1, queries=4, jitter=0.5), ipa / "odd.safetensors"
    )  # no encoder gives 32
    (ipa / "junk.safetensors").write_bytes(b"not weights at all")
    random_encoder(HIDDEN, EMBED, 5).save_pretrained(clip / "small")  # a folder: config.json + model.safetensors
    from safetensors.torch import save_file

    big = random_encoder(64, 48, 6)
    save_file({k: v.contiguous() for k, v in big.state_dict().items()}, str(clip / "big.safetensors"))
    return {"tmp": tmp, "ipa": ipa, "clip": clip}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_folders(tmp_path_factory.mktemp("ip_server"))


@pytest.fixture(scope="module")
def server(folders):
    config = server_config(folders["tmp"], ip_adapters_dir=folders["ipa"], clip_vision_dir=folders["clip"])
    with live_server(config) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c


def picture() -> Image.Image:
    y, x = np.mgrid[0:48, 0:40]
    return Image.fromarray(np.stack([x * 6, y * 5, (x + y) * 3], -1).astype(np.uint8))


def b64(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def decode(data: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))


def python_api(
    folders: dict[str, Path], units: list[tuple[str, float, str, str]], window: tuple[float, float] = (0, 1), **kw: Any
) -> np.ndarray:
    """The Python API's image with units (adapter file in the folder, scale, encoder in the folder, rule), each
    acting in ``window`` (start, end)."""
    ip = [
        IPAdapterUnit(
            folders["ipa"] / a,
            scale=s,
            images=picture(),
            clip_vision=folders["clip"] / c,
            negative_rule=r,
            start=window[0],
            end=window[1],
        )
        for a, s, c, r in units
    ]
    r = shared_loader("emoji", "cpu")(PROMPT, progress=False, ip_adapters=ip or None, **{**GEN, **kw})
    return np.asarray(r.images[0].convert("RGB"))


def test_lists_and_a_native_job_equal_the_python_api(client, folders) -> None:
    """GET /v1/ip_adapters and /v1/clip_vision list the folders; a job with a unit (its picture uploaded, or base64)
    is the Python API's image with that unit; clip_vision null takes the encoder whose width fits (the folder's
    "small" for both the plain adapter, by its image embedding, and the Plus one, by its hidden states); two units
    at once; the image differs from the plain one, and scale 0 is the plain one."""
    names = [e["name"] for e in client.get("/v1/ip_adapters").json()["ip_adapters"]]
    assert names == ["big.safetensors", "junk.safetensors", "odd.safetensors", "plain.safetensors", "sub/plus.bin"]
    assert [e["name"] for e in client.get("/v1/clip_vision").json()["clip_vision"]] == ["big.safetensors", "small"]
    upload = client.post("/v1/uploads", files={"file": ("p.png", base64.b64decode(b64(picture())), "image/png")})
    image_id = upload.json()["id"]
    plain = python_api(folders, [])
    want = python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")])
    assert np.abs(want.astype(int) - plain.astype(int)).max() > 8
    got, job = run_job(
        client,
        {"prompt": PROMPT, **GEN, "ip_adapters": [{"model": "plain.safetensors", "image": image_id, "scale": 0.8}]},
    )
    np.testing.assert_array_equal(got, want)
    one = want
    # the Plus adapter with ComfyUI's negative, named encoder; and both units together
    want = python_api(folders, [("sub/plus.bin", 1.2, "small", "comfyui")])
    unit = {
        "model": "sub/plus.bin",
        "image": b64(picture()),
        "scale": 1.2,
        "clip_vision": "small",
        "negative_rule": "comfyui",
    }
    got, _ = run_job(client, {"prompt": PROMPT, **GEN, "ip_adapters": [unit]})
    np.testing.assert_array_equal(got, want)
    both = [("plain.safetensors", 0.5, "small", "diffusers"), ("big.safetensors", 0.7, "big.safetensors", "diffusers")]
    body = [
        {"model": "plain.safetensors", "image": image_id, "scale": 0.5},
        {"model": "big.safetensors", "image": image_id, "scale": 0.7},
    ]
    got, _ = run_job(client, {"prompt": PROMPT, **GEN, "ip_adapters": body})
    np.testing.assert_array_equal(got, python_api(folders, both))
    windowed = python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")], (0.2, 0.7))
    unit = {"model": "plain.safetensors", "image": image_id, "scale": 0.8, "start": 0.2, "end": 0.7}
    got, _ = run_job(client, {"prompt": PROMPT, **GEN, "ip_adapters": [unit]})
    np.testing.assert_array_equal(got, windowed)
    assert np.abs(windowed.astype(int) - one.astype(int)).max() > 0  # the window changes the image
    got, _ = run_job(
        client,
        {"prompt": PROMPT, **GEN, "ip_adapters": [{"model": "plain.safetensors", "image": image_id, "scale": 0}]},
    )
    np.testing.assert_array_equal(got, plain)


def test_native_errors_are_one_line_400s(client, folders) -> None:
    image = b64(picture())

    def post(**unit: Any) -> httpx.Response:
        return client.post("/v1/jobs", json={"prompt": PROMPT, **GEN, "ip_adapters": [{"image": image, **unit}]})

    for unit, said in (
        ({"model": "nope.safetensors"}, "unknown IP-Adapter 'nope.safetensors'; available: big.safetensors"),
        ({"model": "../x.safetensors"}, "x.safetensors"),
        ({"model": "junk.safetensors"}, "IP-Adapter 'junk.safetensors': "),
        (
            {"model": "odd.safetensors"},
            "width 32, and no encoder in --clip-vision-dir gives it (have: big.safetensors (48), small (24))",
        ),
        (
            {"model": "plain.safetensors", "clip_vision": "big.safetensors"},
            "plain.safetensors reads CLIP vision image embeddings of width 24 and big.safetensors gives 48",
        ),
        (
            {"model": "plain.safetensors", "clip_vision": "nope"},
            "unknown CLIP vision 'nope'; available: big.safetensors, small",
        ),
        ({"model": "plain.safetensors", "image": "not-an-image"}, "IP-Adapter unit 0 image"),
        (
            {"model": "plain.safetensors", "start": 0.8, "end": 0.2},
            "IP-Adapter unit 0: start (0.8) must be less than end (0.2)",
        ),
    ):
        r = post(**unit)
        assert r.status_code == 400, (unit, r.text)
        message = r.json()["detail"] if isinstance(r.json().get("detail"), str) else r.text
        assert said in r.text and "\n" not in message, (unit, r.text)
        assert str(folders["tmp"]) not in r.text
    for unit in (
        {"model": "plain.safetensors", "scale": 9},
        {"model": "plain.safetensors", "negative_rule": "a1111"},
        {"model": "plain.safetensors", "start": 1.5},
        {"model": "plain.safetensors", "weight": 0.5},
    ):
        assert post(**unit).status_code == 422, unit
    r = client.post(
        "/v1/jobs", json={"prompt": PROMPT, **GEN, "ip_adapters": [{"model": "plain.safetensors", "image": image}] * 5}
    )
    assert r.status_code == 422
    # several encoders that fit, none named: a 400 asking to choose
    shutil.copytree(folders["clip"] / "small", folders["clip"] / "small2")
    try:
        r = post(model="plain.safetensors")
        assert (
            r.status_code == 400
            and "several CLIP vision encoders fit plain.safetensors (small, small2): choose one with clip_vision"
            in r.text
        )
        run_job(
            client,
            {
                "prompt": PROMPT,
                **GEN,
                "ip_adapters": [{"model": "plain.safetensors", "image": image, "clip_vision": "small2"}],
            },
        )
    finally:
        shutil.rmtree(folders["clip"] / "small2")
    assert client.get("/v1/jobs").json()["queued"] == 0


def test_a_server_without_the_folders_says_which_flag(tmp_path, folders) -> None:
    image = b64(picture())
    body = {"prompt": PROMPT, **GEN, "ip_adapters": [{"model": "plain.safetensors", "image": image}]}
    with live_server(server_config(tmp_path)) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 400 and "serve --ip-adapters-dir DIR" in r.text, r.text
        assert c.get("/v1/ip_adapters").json() == {"ip_adapters": []}
    with (
        live_server(server_config(tmp_path, ip_adapters_dir=folders["ipa"])) as s,
        httpx.Client(base_url=s.url, timeout=60) as c,
    ):
        r = c.post("/v1/jobs", json=body)
        assert r.status_code == 400 and "the server has none (serve --clip-vision-dir DIR)" in r.text, r.text


def test_a1111_ip_adapter_units(server, folders) -> None:
    """webuiapi's ControlNetUnit with the extension's IP-Adapter modules: the model as the extension lists it (no
    suffix, a hash title too), weight the scale; the module's family picks the encoder (a ViT-H module takes the
    tiny encoders, whose family is unknown, by width); the lists name them; a window is the pipeline's (said in
    the notes); unknown models and encoders that do not fit are 400s."""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DPM++ 2M", scheduler="Karras")
    assert {"plain", "sub/plus"} <= set(api.controlnet_model_list())
    assert {"ip-adapter_clip_h", "ip-adapter_clip_sd15", "ip-adapter-auto"} <= set(api.controlnet_module_list())
    common = {"steps": 3, "width": 64, "height": 64, "cfg_scale": 7.5, "seed": 3}
    unit = webuiapi.ControlNetUnit(image=picture(), module="ip-adapter_clip_h", model="plain [abcdef12]", weight=0.8)
    r = api.txt2img(prompt=PROMPT, controlnet_units=[unit], alwayson_scripts={}, **common)
    want = python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")], strength_rule="a1111")
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert not any("controlnet" in k for k in r.info.get("ignored", [])), r.info
    unit = webuiapi.ControlNetUnit(image=picture(), module="ip-adapter-auto", model="sub/plus", weight=1.2)
    r = api.txt2img(prompt=PROMPT, controlnet_units=[unit], alwayson_scripts={}, **common)
    np.testing.assert_array_equal(
        np.asarray(r.image.convert("RGB")), python_api(folders, [("sub/plus.bin", 1.2, "small", "diffusers")])
    )

    def refused(**kw: Any) -> str:
        u = webuiapi.ControlNetUnit(image=picture(), **kw)
        body = {"prompt": PROMPT, **common, "alwayson_scripts": {"controlnet": {"args": [u.to_dict()]}}}
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert r.status_code in (400, 422), r.text
        return r.text

    assert "unknown IP-Adapter 'nope'; available: big, junk, odd, plain, sub/plus" in refused(
        module="ip-adapter_clip_h", model="nope"
    )
    assert "width 32, and no encoder of the ViT-bigG/14 family its module runs in --clip-vision-dir" in refused(
        module="ip-adapter_clip_g", model="odd"
    )
    # a window: the pipeline's (ComfyUI's sigma rule), said in the notes
    unit = webuiapi.ControlNetUnit(
        image=picture(), module="ip-adapter_clip_h", model="plain", weight=0.8, guidance_start=0.3, guidance_end=0.9
    )
    r = api.txt2img(prompt=PROMPT, controlnet_units=[unit], alwayson_scripts={}, **common)
    want = python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")], (0.3, 0.9))
    np.testing.assert_array_equal(np.asarray(r.image.convert("RGB")), want)
    assert any("judged by each model call's sigma" in n for n in r.info["notes"]), r.info
    assert "start (0.9) must be less than end (0.3)" in refused(
        module="ip-adapter_clip_h", model="plain", guidance_start=0.9, guidance_end=0.3
    )
    r = httpx.post(
        f"{server.url}/controlnet/detect",
        json={"controlnet_module": "ip-adapter_clip_h", "controlnet_input_images": [b64(picture())]},
    )
    assert r.status_code == 422 and "makes no detected map" in r.text


def test_the_module_family_and_width_pick_the_encoder(monkeypatch) -> None:
    """With the real widths (ViT-H/14: tower 1280, embedding 1024; ViT-bigG/14: 1664 and 1280) the width alone picks
    the encoder of each released adapter; a module of the other family finds none (a 400 naming the family); an
    A1111 unit takes the first of several that fit, a native one is asked to choose."""
    from sdengine.server import ip_adapters as ipa
    from sdengine.server.catalog import Entry
    from sdengine.server.errors import BadRequest

    encoders = {"CLIP-ViT-H-14.safetensors": (1280, 1024), "CLIP-ViT-bigG-14.safetensors": (1664, 1280)}
    adapters = {
        "ip-adapter_sd15": (False, 1024),
        "ip-adapter-plus_sd15": (True, 1280),
        "ip-adapter_sdxl": (False, 1280),
    }
    adapters |= {"ip-adapter-plus_sdxl_vit-h": (True, 1280), "ip-adapter_sdxl_vit-h": (False, 1024)}

    class Catalog:
        clip_vision_dir = Path("clip")

        def __init__(self, names: list[str]) -> None:
            self.names = names

        def clip_visions(self) -> list[Entry]:
            return [Entry(n, n, False) for n in self.names]

    monkeypatch.setattr(ipa, "encoder_widths", lambda path, name: encoders[name.removesuffix("-copy")])
    monkeypatch.setattr(ipa, "adapter_input", lambda path, name: adapters[name])
    both = Catalog(list(encoders))

    def pick(model: str, family: str | None = None, catalog: Any = both, several: str = "refuse") -> str:
        req = ipa.IPAdapterRequest(model, None, family=family, several=several)
        return ipa.choose_clip_vision(catalog, req, Path(model), "unit 0").name  # type: ignore[arg-type]

    h, g = "CLIP-ViT-H-14.safetensors", "CLIP-ViT-bigG-14.safetensors"
    for model, want in (
        ("ip-adapter_sd15", h),
        ("ip-adapter-plus_sd15", h),
        ("ip-adapter_sdxl", g),
        ("ip-adapter-plus_sdxl_vit-h", h),
        ("ip-adapter_sdxl_vit-h", h),
    ):
        assert pick(model) == want, model
        assert pick(model, "vit-h" if want == h else "vit-bigg") == want, model
    for model, family in (("ip-adapter_sd15", "vit-bigg"), ("ip-adapter_sdxl", "vit-h")):
        with pytest.raises(BadRequest, match="no encoder of the .* family its module runs in --clip-vision-dir"):
            pick(model, family)
    twice = Catalog([h, f"{h}-copy"])
    with pytest.raises(BadRequest, match="several CLIP vision encoders fit ip-adapter_sd15"):
        pick("ip-adapter_sd15", catalog=twice)
    assert pick("ip-adapter_sd15", "vit-h", twice, "first") == h


def test_openai_extra_body(server, folders) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-test", max_retries=0, timeout=300)
    extra = {"seed": 3, "steps": 3, "sampler": "dpmpp_2m", "schedule": "karras", "cfg_scale": 7.5}
    units = [{"model": "plain.safetensors", "image": b64(picture()), "scale": 0.8}]
    r = client.images.generate(model="emoji", prompt=PROMPT, size="64x64", extra_body={**extra, "ip_adapters": units})
    np.testing.assert_array_equal(
        decode(r.data[0].b64_json), python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")])
    )
    for value, said in (
        ([{"model": "nope", "image": b64(picture())}], "unknown IP-Adapter 'nope'"),
        ([{"model": "plain.safetensors"}], "ip_adapters[0].image must be a non-empty string"),
        ([{"model": "plain.safetensors", "image": "x", "weight": 1}], "ip_adapters[0]: unknown field 'weight'"),
        ({"model": "plain.safetensors"}, "ip_adapters must be a list of units"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(
                model="emoji", prompt=PROMPT, size="64x64", extra_body={**extra, "ip_adapters": value}
            )
        assert said in e.value.body["message"] and "\n" not in e.value.body["message"], e.value.body
    # the edits form: the units as one JSON string
    import json

    init = Image.new("RGB", (64, 64), (250, 200, 40))
    form = {"prompt": PROMPT, "model": "emoji", "size": "64x64", "seed": "3", "steps": "3", "strength": "0.6"}
    form |= {"sampler": "dpmpp_2m", "schedule": "karras", "ip_adapters": json.dumps(units)}
    files = {"image": ("i.png", base64.b64decode(b64(init)), "image/png")}
    r = httpx.post(f"{server.url}/v1/images/edits", data=form, files=files, timeout=300)
    assert r.status_code == 200, r.text
    want = python_api(folders, [("plain.safetensors", 0.8, "small", "diffusers")], init_image=init, strength=0.6)
    np.testing.assert_array_equal(decode(r.json()["data"][0]["b64_json"]), want)
    r = httpx.post(f"{server.url}/v1/images/edits", data={**form, "ip_adapters": "[{"}, files=files, timeout=300)
    assert r.status_code == 400 and "ip_adapters must be a JSON list of units" in r.text, r.text


def test_a_worker_switching_models_drops_the_kept_ip_adapter_files(folders, tmp_path, monkeypatch) -> None:
    """The adapters and CLIP vision encoder a job kept (on the worker's device) go when the worker loads another
    model, as the model itself does (pipeline.ip_adapter.forget_loaded)."""
    from _emoji_models import make_tiny_emoji_folder
    from sdengine.pipeline import ip_adapter

    calls: list[int] = []
    real = ip_adapter.forget_loaded
    monkeypatch.setattr(ip_adapter, "forget_loaded", lambda: (calls.append(1), real())[1])
    make_tiny_emoji_folder(tmp_path / "models" / "tiny")
    config = server_config(
        tmp_path, models_dir=tmp_path / "models", ip_adapters_dir=folders["ipa"], clip_vision_dir=folders["clip"]
    )
    unit = {"model": "plain.safetensors", "image": b64(picture()), "scale": 0.8}
    with live_server(config) as s, httpx.Client(base_url=s.url, timeout=300) as c:
        run_job(c, {"prompt": PROMPT, **GEN, "ip_adapters": [unit]})
        assert calls == []  # the first load: nothing kept yet
        run_job(c, {"prompt": PROMPT, **GEN, "model": "tiny"})
        assert calls == [1]
