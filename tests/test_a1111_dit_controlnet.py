"""SD3 and Flux ControlNets through the A1111 route (sd-webui-controlnet's ``alwayson_scripts.controlnet.args``
units, sent by the real ``webuiapi`` client) against a live server whose models folder holds tiny random SD3 and
FLUX.1 [dev] folders and whose controlnets folder holds random ControlNets saved by diffusers: each image equals
the Python pipeline's with the same unit (equal pixels); what does not fit is a one-line 400 or a failed job."""

from __future__ import annotations

from typing import Any

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("diffusers")
webuiapi = pytest.importorskip("webuiapi")

import sdengine  # noqa: E402
from _flux_models import make_flux_folder  # noqa: E402
from _live_server import live_server, server_config  # noqa: E402
from _sd3_models import make_sd3_folder  # noqa: E402
from sdengine.pipeline.control import ControlUnit  # noqa: E402
from test_dit_control_pipeline import _flux_controlnet, _picture, _sd3_controlnet  # noqa: E402

PROMPT, NEGATIVE = "a red apple on a table", "blurry, dark"
W, H, STEPS = 48, 32, 3


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("a1111dit")
    models, cns = root / "models", root / "controlnets"
    sd3 = make_sd3_folder(models / "tiny-sd3")
    flux = make_flux_folder(models / "tiny-flux", guidance=True)
    _sd3_controlnet(sd3, cns / "sd3-cn", 51)
    _flux_controlnet(flux, cns / "flux-cn", 52)
    _flux_controlnet(flux, cns / "flux-union", 53, num_mode=4)
    pipes = {"sd3": sdengine.load_pipeline(sd3, device="cpu"), "flux": sdengine.load_pipeline(flux, device="cpu")}
    with live_server(server_config(root, models_dir=models, controlnets_dir=cns)) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", scheduler="Automatic")
        yield api, pipes, cns


def _arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _a1111(api: Any, family: str, units: list, **kw: Any) -> Any:
    cfg = 5 if family == "sd3" else 1
    scripts = kw.pop("alwayson_scripts", {})
    return api.txt2img(prompt=PROMPT, negative_prompt=NEGATIVE, seed=9, steps=STEPS, width=W, height=H,
                       cfg_scale=cfg, controlnet_units=units, alwayson_scripts=scripts,
                       override_settings={"sd_model_checkpoint": f"tiny-{family}"}, **kw)  # fmt: skip


def _python(pipes: dict, family: str, units: list) -> Any:
    cfg = 5 if family == "sd3" else 1
    return pipes[family](PROMPT, NEGATIVE, seed=9, steps=STEPS, width=W, height=H, cfg_scale=cfg, sampler="euler",
                         schedule="normal", controlnets=units, progress=False).images[0]  # fmt: skip


def test_sd3_unit_equals_the_pipeline(served):
    api, pipes, cns = served
    hint = _picture(W, H, 7)
    unit = webuiapi.ControlNetUnit(image=hint, module="none", model="sd3-cn", weight=0.8, guidance_end=0.7,
                                   resize_mode="Just Resize")  # fmt: skip
    r = _a1111(api, "sd3", [unit])
    want = _python(pipes, "sd3", [ControlUnit(str(cns / "sd3-cn"), hint, 0.8, 0.0, 0.7, rule="a1111")])
    np.testing.assert_array_equal(_arr(r.image), _arr(want))
    assert not np.array_equal(_arr(r.image), _arr(_python(pipes, "sd3", [])))
    assert 'ControlNet 0: "Module: none, Model: sd3-cn, Weight: 0.8' in r.info["infotexts"][0]
    # the extension's step rule: end 0.7 of 3 steps controls all three (diffusers' rule leaves the last out)
    diffusers_rule = _python(pipes, "sd3", [ControlUnit(str(cns / "sd3-cn"), hint, 0.8, 0.0, 0.7)])
    assert not np.array_equal(_arr(r.image), _arr(diffusers_rule))


def test_flux_unit_with_a_preprocessor_and_a_union_unit_equal_the_pipeline(served):
    api, pipes, cns = served
    import cv2
    from PIL import Image

    from sdengine.control import canny

    photo = _picture(W, H, 8)
    unit = webuiapi.ControlNetUnit(image=photo, module="canny", model="flux-cn", weight=0.9, guidance_start=0.3,
                                   resize_mode="Just Resize", processor_res=64)  # fmt: skip
    r = _a1111(api, "flux", [unit])
    scaled = Image.fromarray(cv2.resize(np.asarray(photo), (96, 64), interpolation=cv2.INTER_CUBIC))  # short side 64
    edges = canny(scaled, 100.0, 200.0)
    want = _python(pipes, "flux", [ControlUnit(str(cns / "flux-cn"), edges, 0.9, 0.3, 1.0, rule="a1111")])
    np.testing.assert_array_equal(_arr(r.image), _arr(want))
    # with the hires fix the extension forces its soft weights on a balanced canny unit's second pass (U-Net
    # residuals): an SD3 / Flux ControlNet runs that pass balanced, not refused
    r = _a1111(api, "flux", [unit], enable_hr=True, hr_scale=1.5, denoising_strength=0.5, hr_upscaler="Latent")
    assert r.image.size == (72, 48)
    # a Union unit: the extension's union_control_type ("Depth": its type 1, as ComfyUI's numbers)
    # (webuiapi's ControlNetUnit has no such field: its dict with the extension's key added)
    body = webuiapi.ControlNetUnit(image=photo, module="none", model="flux-union", resize_mode="Just Resize").to_dict()
    body["union_control_type"] = "Depth"
    r = _a1111(api, "flux", [], alwayson_scripts={"controlnet": {"args": [body]}})
    want = _python(pipes, "flux", [ControlUnit(str(cns / "flux-union"), photo, 1.0, rule="a1111", union_mode=1)])
    np.testing.assert_array_equal(_arr(r.image), _arr(want))
    assert "Union Mode: 1" in r.info["infotexts"][0]


def _post(api: Any, family: str, unit: dict) -> httpx.Response:
    body = {"prompt": PROMPT, "steps": STEPS, "width": W, "height": H, "seed": 1, "cfg_scale": 1,
            "override_settings": {"sd_model_checkpoint": family if family == "emoji" else f"tiny-{family}"},
            "alwayson_scripts": {"controlnet": {"args": [unit]}}}  # fmt: skip
    return httpx.post(f"{api.baseurl}/txt2img", json=body, timeout=300)


def test_refusals_are_one_line(served):
    api, _, _ = served
    image = webuiapi.raw_b64_img(_picture(W, H, 9))
    base = {"image": image, "module": "none", "resize_mode": "Just Resize"}

    def fails(family: str, unit: dict, *needles: str) -> None:
        r = _post(api, family, {**base, **unit})
        assert r.status_code in (400, 500), (r.status_code, r.text)
        msg = r.json().get("detail") or r.json().get("error") or r.text
        assert "\n" not in str(msg).strip(), msg
        for n in needles:
            assert n in str(msg), msg
        print(r.status_code, msg)

    fails("flux", {"model": "flux-union"}, "is a Union ControlNet: give its union_mode")
    fails("flux", {"model": "flux-cn", "union_control_type": "Depth"}, "not a Union ControlNet")
    fails("flux", {"model": "flux-union", "union_control_type": "Sideways"}, "union_control_type")
    fails("sd3", {"model": "flux-cn"}, "Flux ControlNet", "SD3")
    fails("sd3", {"model": "sd3-cn", "control_mode": "My prompt is more important"}, "balanced")
    fails("sd3", {"model": "emoji-controlnet-canny"}, "emoji-controlnet-canny", "ControlNetModel")
    fails("emoji", {"model": "sd3-cn"}, "SD3ControlNetModel")
    fails("emoji", {"model": "emoji-controlnet-canny", "union_control_type": "Depth"}, "U-Net ControlNets take none")


def test_native_job_takes_a_union_mode(served):
    from _live_server import run_job

    api, pipes, cns = served
    photo = _picture(W, H, 10)
    image = webuiapi.raw_b64_img(photo)
    client = httpx.Client(base_url=api.baseurl.removesuffix("/sdapi/v1"), timeout=300)
    body = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "model": "tiny-flux", "steps": STEPS, "width": W,
            "height": H, "seed": 9, "cfg_scale": 1, "sampler": "euler", "schedule": "normal",
            "controlnets": [{"model": "flux-union", "image": image, "union_mode": "depth", "weight": 0.7}]}  # fmt: skip
    got, _ = run_job(client, body)
    want = _python(pipes, "flux", [ControlUnit(str(cns / "flux-union"), photo, 0.7, union_mode="depth")])
    np.testing.assert_array_equal(got, _arr(want))
    body["controlnets"][0]["union_mode"] = "sideways"
    r = client.post("/v1/jobs", json=body)  # checked when the job runs (the ControlNet's modes): a failed job
    assert r.status_code == 202, r.text
    from _live_server import wait_job

    j = wait_job(client, r.json()["id"])
    assert j["state"] == "failed" and "unknown union_mode 'sideways'" in j["error"], j
    assert "\n" not in j["error"]
